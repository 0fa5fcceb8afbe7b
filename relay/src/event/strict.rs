//! The one reader of an event's bytes, at ingest and in the consumer: one pass of a serde visitor
//! over the document that builds no tree of values. On the way it
//!
//! - writes the document back out as compact JSON, the payload that is stored and published:
//!   strings re-escaped, numbers as serde_json reads them (f64 with `float_roundtrip`, written
//!   back in the shortest form that reads back exactly). The sender's number text is not copied:
//!   PostgreSQL's `numeric` cannot hold `1e-20000` (the store would refuse an event validation
//!   accepted), which reads as `0.0`;
//! - keeps the members a [`Shape`] asks for (the event's own fields), borrowed from the body
//!   where their text has no escapes;
//! - notes what a plain parse lets through but we must refuse: a key that occurs twice in one
//!   object (a plain parse keeps the last one, so what we stored would not be what was signed),
//!   and U+0000 in a string or key (PostgreSQL's `jsonb` and `text` cannot hold it).
//!
//! Lone surrogates (`"\ud800"`), numbers beyond f64 (`1e400`) and nesting deeper than 128 are
//! refused by serde_json itself, as invalid JSON.
use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashSet;
use std::fmt;
use std::ops::Range;

use serde::Serialize;
use serde::de::{DeserializeSeed, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};

use super::FieldError;

/// At most this many problems are listed; a body full of them is refused all the same.
const MAX_PROBLEMS: usize = 50;

const NUL_IN_STRING: &str = "must not contain the NUL character (\\u0000)";
const NUL_IN_KEY: &str = "the key must not contain the NUL character (\\u0000)";
const DUPLICATE_KEY: &str = "the key occurs more than once in its object";

/// The members of an object the reader keeps, each with the shape of its own members (for an
/// object value) or `None`.
#[derive(Debug)]
pub struct Shape {
    pub members: &'static [(&'static str, Option<&'static Shape>)],
}

impl Shape {
    /// Keeps nothing: only the checks and the payload.
    pub const NOTHING: Shape = Shape { members: &[] };

    fn member(&self, key: &str) -> Option<&(&'static str, Option<&'static Shape>)> {
        self.members.iter().find(|(name, _)| *name == key)
    }
}

/// A kept value.
#[derive(Debug, Clone, PartialEq)]
pub enum Field<'de> {
    Null,
    Str(Cow<'de, str>),
    /// An object: the members its shape keeps, and where it sits in the written payload.
    Object(Members<'de>, Range<usize>),
    /// A number, a boolean or an array.
    Other,
}

impl Field<'_> {
    pub fn is_null(&self) -> bool {
        matches!(self, Self::Null)
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// The kept members of an object, in document order (first occurrences only).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Members<'de>(Vec<(&'static str, Field<'de>)>);

impl<'de> Members<'de> {
    pub fn get(&self, key: &str) -> Option<&Field<'de>> {
        self.0.iter().find(|(name, _)| *name == key).map(|(_, f)| f)
    }
}

/// A document read strictly.
#[derive(Debug)]
pub struct Read<'de> {
    /// The document as compact JSON.
    pub payload: String,
    /// The root, with what `shape` asked for kept.
    pub root: Field<'de>,
    /// Duplicate keys and NUL characters, by path, in document order; at most 50.
    pub problems: Vec<FieldError>,
}

/// Reads `body` in one pass (see the module). Invalid JSON is an error with serde_json's message
/// and position.
pub fn read<'de>(body: &'de [u8], shape: &'static Shape) -> Result<Read<'de>, serde_json::Error> {
    let state = RefCell::new(State {
        out: Vec::with_capacity(body.len()),
        problems: Vec::new(),
    });
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let root = Walk {
        at: &Segment::Root,
        shape: Some(shape),
        keep: true,
        state: &state,
    }
    .deserialize(&mut deserializer)?;
    deserializer.end()?;
    let State { out, problems } = state.into_inner();
    // Only serde_json's own output was written, which is UTF-8.
    let payload = String::from_utf8(out).map_err(serde_json::Error::custom)?;
    Ok(Read {
        payload,
        root,
        problems,
    })
}

struct State {
    out: Vec<u8>,
    problems: Vec<FieldError>,
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

/// The keys seen in one object: a list while it is short, a hash set beyond (so a body of
/// 50,000 keys costs no quadratic scan).
enum Keys<'de> {
    Few(Vec<Cow<'de, str>>),
    Many(HashSet<Cow<'de, str>>),
}

impl<'de> Keys<'de> {
    const FEW: usize = 16;

    /// Whether `key` is new in its object.
    fn insert(&mut self, key: Cow<'de, str>) -> bool {
        match self {
            Self::Few(keys) if keys.contains(&key) => false,
            Self::Few(keys) if keys.len() < Self::FEW => {
                keys.push(key);
                true
            }
            Self::Few(keys) => {
                let mut set: HashSet<_> = keys.drain(..).collect();
                set.insert(key);
                *self = Self::Many(set);
                true
            }
            Self::Many(keys) => keys.insert(key),
        }
    }
}

/// Reads one value at `at`: writes it out, keeps it when `keep` (with the members `shape` names),
/// and notes problems instead of failing, so every one is reported.
struct Walk<'a> {
    at: &'a Segment<'a>,
    shape: Option<&'static Shape>,
    keep: bool,
    state: &'a RefCell<State>,
}

impl Walk<'_> {
    fn note(&self, at: &Segment<'_>, message: &str) {
        let problems = &mut self.state.borrow_mut().problems;
        if problems.len() < MAX_PROBLEMS {
            problems.push(FieldError {
                field: at.to_string(),
                message: message.to_owned(),
            });
        }
    }

    fn write<T: Serialize + ?Sized, E: serde::de::Error>(&self, value: &T) -> Result<(), E> {
        serde_json::to_writer(&mut self.state.borrow_mut().out, value).map_err(E::custom)
    }

    fn punctuate(&self, byte: u8) {
        self.state.borrow_mut().out.push(byte);
    }

    /// Checks a string for NUL and writes it out.
    fn text<E: serde::de::Error>(&self, v: &str) -> Result<(), E> {
        if v.contains('\0') {
            self.note(self.at, NUL_IN_STRING);
        }
        self.write(v)
    }

    /// The string as a kept value, made only when this value is kept.
    fn kept<'de>(&self, v: impl FnOnce() -> Cow<'de, str>) -> Field<'de> {
        if self.keep {
            Field::Str(v())
        } else {
            Field::Other
        }
    }
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = Field<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Field<'de>, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = Field<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Field<'de>, E> {
        self.write(&v)?;
        Ok(Field::Other)
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Field<'de>, E> {
        self.write(&v)?;
        Ok(Field::Other)
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Field<'de>, E> {
        self.write(&v)?;
        Ok(Field::Other)
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Field<'de>, E> {
        // serde_json never yields NaN or infinity (`1e400` is a syntax error).
        self.write(&v)?;
        Ok(Field::Other)
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Field<'de>, E> {
        self.write(&())?;
        Ok(Field::Null)
    }

    fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Field<'de>, E> {
        self.text(v)?;
        Ok(self.kept(|| Cow::Borrowed(v)))
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Field<'de>, E> {
        // Unescaped into the parser's scratch buffer: copied out only when kept.
        self.text(v)?;
        Ok(self.kept(|| Cow::Owned(v.to_owned())))
    }

    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Field<'de>, E> {
        self.text(&v)?;
        Ok(self.kept(|| Cow::Owned(v)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<Field<'de>, A::Error> {
        self.punctuate(b'[');
        let mut index = 0;
        loop {
            let at = Segment::Index(self.at, index);
            if index > 0 {
                // A comma before every element after the first, taken back if there is none.
                self.punctuate(b',');
            }
            let seed = Walk {
                at: &at,
                shape: None,
                keep: false,
                state: self.state,
            };
            if items.next_element_seed(seed)?.is_none() {
                if index > 0 {
                    self.state.borrow_mut().out.pop();
                }
                self.punctuate(b']');
                return Ok(Field::Other);
            }
            index += 1;
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut entries: A) -> Result<Field<'de>, A::Error> {
        let start = self.state.borrow().out.len();
        self.punctuate(b'{');
        let mut keys = Keys::Few(Vec::new());
        let mut kept = Members::default();
        let mut first = true;
        while let Some(key) = entries.next_key_seed(Key)? {
            let at = Segment::Key(self.at, &key);
            if key.contains('\0') {
                self.note(&at, NUL_IN_KEY);
            }
            if !first {
                self.punctuate(b',');
            }
            first = false;
            self.write(&*key)?;
            self.punctuate(b':');
            let wanted = self.shape.and_then(|shape| shape.member(&key));
            let value = entries.next_value_seed(Walk {
                at: &at,
                shape: wanted.and_then(|(_, shape)| *shape),
                keep: wanted.is_some(),
                state: self.state,
            })?;
            if !keys.insert(key.clone()) {
                self.note(&at, DUPLICATE_KEY);
            } else if let Some((name, _)) = wanted {
                kept.0.push((name, value));
            }
        }
        self.punctuate(b'}');
        let end = self.state.borrow().out.len();
        Ok(if self.keep {
            Field::Object(kept, start..end)
        } else {
            Field::Other
        })
    }
}

/// An object key, borrowed from the body unless it has escapes.
struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    fn problems(body: &str) -> Vec<(String, String)> {
        let read = read(body.as_bytes(), &Shape::NOTHING).expect("valid JSON");
        read.problems
            .into_iter()
            .map(|p| (p.field, p.message))
            .collect()
    }

    fn fields(body: &str) -> Vec<String> {
        problems(body).into_iter().map(|(field, _)| field).collect()
    }

    fn payload(body: &str) -> String {
        read(body.as_bytes(), &Shape::NOTHING)
            .expect("valid JSON")
            .payload
    }

    #[test]
    fn the_payload_is_the_document_as_serde_json_reads_it() {
        for body in [
            r#"{"a":1,"b":[true,null,-2,3.5,"x"],"c":{"d":{}},"e":[],"f":[[1],[]]}"#,
            r#"[]"#,
            r#""text""#,
            "18446744073709551615",
            r#"{"emoji":"😀","escaped":"\ud83d\ude00 \n \" é \/"}"#,
        ] {
            let expected: Value = serde_json::from_str(body).expect("valid JSON");
            let written = payload(body);
            let reread: Value = serde_json::from_str(&written).expect("the payload is JSON");
            assert_eq!(reread, expected, "{body} -> {written}");
        }
        // Compact, in document order, numbers in their shortest exact form.
        assert_eq!(
            payload(" { \"z\" : 1.50 , \"a\" : [ 1 , 2e2 ] , \"s\":\"\\u00e9\" } "),
            r#"{"z":1.5,"a":[1,200.0],"s":"é"}"#
        );
    }

    #[test]
    fn numbers_are_written_as_read_not_as_sent() {
        // PostgreSQL's numeric cannot hold 1e-20000 (the store would refuse an event that
        // validation accepted); as an f64 it is 0.
        assert_eq!(payload(r#"{"a":1e-20000}"#), r#"{"a":0.0}"#);
        assert_eq!(payload(r#"{"a":1e300}"#), r#"{"a":1e+300}"#);
        // Without serde_json's `float_roundtrip` this read as ...455e-219.
        assert_eq!(
            payload("-2.5253317714948458e-219"),
            "-2.5253317714948458e-219"
        );
    }

    #[test]
    fn kept_members_borrow_from_the_body_and_know_their_place() {
        const INNER: Shape = Shape {
            members: &[("id", None)],
        };
        const OUTER: Shape = Shape {
            members: &[("name", None), ("inner", Some(&INNER)), ("n", None)],
        };
        let body =
            br#"{"name":"plain","skip":{"id":"x"},"inner":{"id":"caf\u00e9","more":[1]},"n":2}"#;
        let read = read(body, &OUTER).expect("valid JSON");
        let Field::Object(root, _) = &read.root else {
            panic!("an object: {:?}", read.root)
        };
        assert!(matches!(
            root.get("name"),
            Some(Field::Str(Cow::Borrowed("plain")))
        ));
        assert_eq!(root.get("skip"), None);
        assert_eq!(root.get("n"), Some(&Field::Other));
        let Some(Field::Object(inner, span)) = root.get("inner") else {
            panic!("an object: {root:?}")
        };
        assert_eq!(inner.get("id").and_then(Field::as_str), Some("café"));
        assert_eq!(&read.payload[span.clone()], r#"{"id":"café","more":[1]}"#);
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
        assert_eq!(
            fields(r#"{"data":{"x":[{"k":1,"k":1}],"y":2,"y":3}}"#),
            ["data.x[0].k", "data.y"]
        );
        // Keys are compared after unescaping: these are the same key.
        assert_eq!(fields(r#"{"a":1,"\u0061":2}"#), ["a"]);
        assert_eq!(fields(r#"{"odd key":1,"odd key":2}"#), [r#"["odd key"]"#]);
        // Past the short list, the hash set still finds the repeat.
        let many: Vec<String> = (0..40).map(|i| format!(r#""k{i}":{i}"#)).collect();
        let body = format!(r#"{{{},"k3":0,"k39":0}}"#, many.join(","));
        assert_eq!(fields(&body), ["k3", "k39"]);
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
            assert!(read(body.as_bytes(), &Shape::NOTHING).is_err(), "{body}");
        }
    }
}
