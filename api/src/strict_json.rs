//! The one reader of a webhook body: JSON as serde_json reads it, plus what a plain parse lets
//! through but we must refuse, found in the same single pass (a serde visitor building the value):
//!
//! - a key that occurs twice in one object: a plain parse keeps the last one, so what we stored
//!   and published would not be what was signed (a parser differential);
//! - U+0000 in a string or key: PostgreSQL's `jsonb` and `text` cannot hold it, so the event
//!   could never be stored (and SQLite would store what PostgreSQL refuses).
//!
//! Lone surrogates (`"\ud800"`), numbers beyond f64 (`1e400`) and nesting deeper than 128 are
//! refused by serde_json itself, as invalid JSON. Floats are read with serde_json's
//! `float_roundtrip` (the default parse can be one unit in the last place off, so the stored
//! number would differ from the signed one).
use std::cell::RefCell;
use std::fmt;

use relay::event::FieldError;
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// At most this many problems are listed; a body full of them is refused all the same.
const MAX_PROBLEMS: usize = 50;

/// A body read strictly: the value (where a key repeats, its first occurrence) and every
/// problem found on the way.
#[derive(Debug, Clone, PartialEq)]
pub struct StrictJson {
    pub value: Value,
    /// Duplicate keys and NUL characters, by path; at most `MAX_PROBLEMS`.
    pub problems: Vec<FieldError>,
}

/// Parses `body` in one pass, noting duplicate keys and NUL characters anywhere. Invalid JSON is
/// an error with serde_json's message and position.
pub fn parse_strict(body: &[u8]) -> Result<StrictJson, serde_json::Error> {
    let problems = RefCell::new(Vec::new());
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let value = Checked {
        at: &Segment::Root,
        problems: &problems,
    }
    .deserialize(&mut deserializer)?;
    deserializer.end()?;
    Ok(StrictJson {
        value,
        problems: problems.into_inner(),
    })
}

/// Where a value sits, rendered only when something is wrong there.
enum Segment<'a> {
    Root,
    Key(&'a Segment<'a>, &'a str),
    Index(&'a Segment<'a>, usize),
}

impl fmt::Display for Segment<'_> {
    /// `data.email`, `data.tags[2]`, `data["odd key"]`; the root itself is `$`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Root => f.write_str("$"),
            Self::Key(Self::Root, key) if is_identifier(key) => f.write_str(key),
            Self::Key(parent, key) if is_identifier(key) => write!(f, "{parent}.{key}"),
            Self::Key(parent, key) => {
                // JSON string syntax escapes NUL and quotes, so the path is printable.
                let quoted = serde_json::to_string(key).map_err(|_| fmt::Error)?;
                match parent {
                    Self::Root => write!(f, "[{quoted}]"),
                    parent => write!(f, "{parent}[{quoted}]"),
                }
            }
            Self::Index(parent, index) => write!(f, "{parent}[{index}]"),
        }
    }
}

fn is_identifier(key: &str) -> bool {
    let mut chars = key.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Reads one value at `at`, noting problems instead of failing, so every one is reported.
struct Checked<'a> {
    at: &'a Segment<'a>,
    problems: &'a RefCell<Vec<FieldError>>,
}

impl Checked<'_> {
    fn note(&self, at: &Segment<'_>, message: &str) {
        let mut problems = self.problems.borrow_mut();
        if problems.len() < MAX_PROBLEMS {
            problems.push(FieldError {
                field: at.to_string(),
                message: message.to_owned(),
            });
        }
    }
}

const NUL_IN_STRING: &str = "must not contain the NUL character (\\u0000)";
const NUL_IN_KEY: &str = "the key must not contain the NUL character (\\u0000)";
const DUPLICATE_KEY: &str = "the key occurs more than once in its object";

impl<'de> DeserializeSeed<'de> for Checked<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Checked<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        // serde_json never yields NaN or infinity (`1e400` is a syntax error).
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        if v.contains('\0') {
            self.note(self.at, NUL_IN_STRING);
        }
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        if v.contains('\0') {
            self.note(self.at, NUL_IN_STRING);
        }
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<Value, A::Error> {
        let mut values = Vec::with_capacity(items.size_hint().unwrap_or(0).min(1024));
        loop {
            let at = Segment::Index(self.at, values.len());
            let seed = Checked {
                at: &at,
                problems: self.problems,
            };
            match items.next_element_seed(seed)? {
                Some(value) => values.push(value),
                None => return Ok(Value::Array(values)),
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut entries: A) -> Result<Value, A::Error> {
        let mut map = Map::new();
        while let Some(key) = entries.next_key::<String>()? {
            let at = Segment::Key(self.at, &key);
            if key.contains('\0') {
                self.note(&at, NUL_IN_KEY);
            }
            let value = entries.next_value_seed(Checked {
                at: &at,
                problems: self.problems,
            })?;
            if map.contains_key(&key) {
                self.note(&at, DUPLICATE_KEY);
            } else {
                map.insert(key, value);
            }
        }
        Ok(Value::Object(map))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(body: &str) -> Vec<(String, String)> {
        let read = parse_strict(body.as_bytes()).expect("valid JSON");
        read.problems
            .into_iter()
            .map(|p| (p.field, p.message))
            .collect()
    }

    fn fields(body: &str) -> Vec<String> {
        problems(body).into_iter().map(|(field, _)| field).collect()
    }

    #[test]
    fn plain_json_reads_as_serde_json_reads_it() {
        for body in [
            r#"{"a":1,"b":[true,null,-2,3.5,"x"],"c":{"d":{}}}"#,
            r#"[]"#,
            r#""text""#,
            "18446744073709551615",
            r#"{"emoji":"😀","escaped":"\ud83d\ude00 \n \" é"}"#,
        ] {
            let expected: Value = serde_json::from_str(body).expect("valid JSON");
            let read = parse_strict(body.as_bytes()).expect("valid JSON");
            assert_eq!(read.value, expected, "{body}");
            assert!(read.problems.is_empty(), "{body}");
        }
    }

    #[test]
    fn floats_read_back_exactly() {
        // Without serde_json's `float_roundtrip` this read as ...455e-219: the stored number
        // would not have been the signed one.
        let read = parse_strict(b"-2.5253317714948458e-219").expect("valid JSON");
        assert_eq!(read.value.as_f64(), Some(-2.5253317714948458e-219));
    }

    #[test]
    fn nul_anywhere_is_named_by_its_path() {
        assert_eq!(fields(r#"{"id":"evt\u0000"}"#), ["id"]);
        assert_eq!(
            fields(r#"{"data":{"extra":{"deep":["ok","\u0000"]}}}"#),
            ["data.extra.deep[1]"]
        );
        assert_eq!(
            problems(r#"{"data":{"a\u0000b":1}}"#),
            [(r#"data["a\u0000b"]"#.to_owned(), NUL_IN_KEY.to_owned())]
        );
        assert_eq!(fields(r#""\u0000""#), ["$"]);
        assert_eq!(fields(r#"{"\u0000":"\u0000"}"#), [r#"["\u0000"]"#; 2]);
    }

    #[test]
    fn duplicate_keys_at_any_depth_are_refused() {
        assert_eq!(
            problems(r#"{"id":"a","id":"b"}"#),
            [("id".to_owned(), DUPLICATE_KEY.to_owned())]
        );
        // The first occurrence is the one kept.
        let read = parse_strict(br#"{"id":"a","id":"b"}"#).expect("valid JSON");
        assert_eq!(read.value, serde_json::json!({ "id": "a" }));
        assert_eq!(
            fields(r#"{"data":{"x":[{"k":1,"k":1}],"y":2,"y":3}}"#),
            ["data.x[0].k", "data.y"]
        );
        // Keys are compared after unescaping: these are the same key.
        assert_eq!(fields(r#"{"a":1,"\u0061":2}"#), ["a"]);
        assert_eq!(fields(r#"{"odd key":1,"odd key":2}"#), [r#"["odd key"]"#]);
    }

    #[test]
    fn the_list_of_problems_is_bounded() {
        let body = format!("[{}]", vec![r#""\u0000""#; 1000].join(","));
        assert_eq!(fields(&body).len(), MAX_PROBLEMS);
    }

    #[test]
    fn what_serde_json_refuses_is_invalid_json() {
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        for body in [
            r#"{"a":"\ud800"}"#,
            r#"{"a":"\udc00x"}"#,
            r#"{"a":1e400}"#,
            r#"{"a":-1e400}"#,
            "{\"a\":\"raw \u{0} byte\"}",
            r#"{"a":1} trailing"#,
            "",
            deep.as_str(),
        ] {
            assert!(parse_strict(body.as_bytes()).is_err(), "{body}");
        }
    }
}
