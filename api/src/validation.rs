//! Validation of the webhook body: the strict JSON reading (duplicate keys, NUL characters),
//! then the contact event parser the consumer uses too ([`relay::event::ContactEvent`]). Every
//! offending field is reported, not just the first.
use chrono::{DateTime, Datelike, Utc};
use relay::event::MAX_ID_LEN;
pub use relay::event::{ContactEvent, FieldError};

use crate::strict_json::{StrictJson, parse_strict};

/// Why a body was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValidationError {
    /// Not JSON at all; the parser's position message.
    Json(String),
    /// JSON, but not a valid contact event.
    Fields(Vec<FieldError>),
}

/// Parses and validates a webhook body.
/// Duplicate keys and NUL characters anywhere are reported along with the field checks.
pub fn validate_event(body: &[u8]) -> Result<ContactEvent, ValidationError> {
    let StrictJson { value, problems } =
        parse_strict(body).map_err(|e| ValidationError::Json(e.to_string()))?;
    ContactEvent::parse_after(value, problems).map_err(ValidationError::Fields)
}

/// Whether `id` could be a stored event or contact id: what validation accepts and the store can
/// hold (at most 255 bytes, no NUL). Path values that cannot be are answered 404 without a query.
pub fn is_storable_id(id: &str) -> bool {
    !id.trim().is_empty() && id.len() <= MAX_ID_LEN && !id.contains('\0')
}

/// Checks a date-time filter: RFC 3339 can only say years 0000 to 9999, and PostgreSQL's
/// `timestamptz` cannot hold much beyond them, so anything else is refused rather than sent.
pub fn check_time_filter(field: &str, value: Option<DateTime<Utc>>) -> Result<(), FieldError> {
    match value {
        Some(t) if !(0..=9999).contains(&t.year()) => Err(FieldError::new(
            field,
            "must be an RFC 3339 date-time between the years 0000 and 9999",
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay::event::{EventType, is_valid_email};
    use serde_json::{Value, json};

    pub(crate) fn seed_example() -> Value {
        json!({
            "event": "contact.created",
            "timestamp": "2025-05-19T00:00:00.000Z",
            "id": "evt_123456789",
            "data": {
                "id": "c8b5f7d9-8e7a-4a1d-9b5c-1d2e3f4a5b6c",
                "firstName": "John",
                "lastName": "Smith",
                "email": "john.smith@example.com",
                "phone": "555-987-6543",
                "company": "Acme Inc",
                "title": "Senior Engineer",
                "createdAt": "2025-05-19T00:00:00.000Z",
                "updatedAt": "2025-05-19T00:00:00.000Z"
            }
        })
    }

    fn fields(body: &Value) -> Vec<String> {
        match validate_event(body.to_string().as_bytes()) {
            Err(ValidationError::Fields(errors)) => errors.into_iter().map(|e| e.field).collect(),
            other => panic!("expected field errors, got {other:?}"),
        }
    }

    #[test]
    fn the_seed_example_is_valid_and_kept_whole() {
        let mut body = seed_example();
        body["data"]["favouriteColour"] = json!("teal");
        let event = validate_event(body.to_string().as_bytes()).expect("valid");
        assert_eq!(event.event_id, "evt_123456789");
        assert_eq!(event.event_type, EventType::Created);
        assert_eq!(event.contact_id, "c8b5f7d9-8e7a-4a1d-9b5c-1d2e3f4a5b6c");
        assert_eq!(event.payload["data"]["favouriteColour"], "teal");
    }

    #[test]
    fn every_offending_top_level_field_is_listed() {
        let mut body = seed_example();
        body["event"] = json!("contact.merged");
        body["id"] = json!("");
        body["timestamp"] = json!("yesterday");
        assert_eq!(fields(&body), ["event", "id", "timestamp"]);
    }

    #[test]
    fn every_offending_data_field_is_listed() {
        let mut body = seed_example();
        body["event"] = json!("contact.updated");
        body["data"]["email"] = json!("not-an-email");
        body["data"]["updatedAt"] = json!(42);
        body["data"]["phone"] = json!(5559876543_u64);
        body["data"]
            .as_object_mut()
            .expect("object")
            .remove("firstName");
        assert_eq!(
            fields(&body),
            [
                "data.email",
                "data.firstName",
                "data.updatedAt",
                "data.phone"
            ]
        );
    }

    #[test]
    fn missing_everything() {
        assert_eq!(fields(&json!({})), ["event", "id", "timestamp", "data"]);
        assert_eq!(fields(&json!([1, 2])), ["$"]);
        let mut body = seed_example();
        body["data"] = json!("c1");
        assert_eq!(fields(&body), ["data"]);
    }

    #[test]
    fn a_deletion_needs_only_the_contact_id() {
        let body = json!({
            "event": "contact.deleted", "id": "evt_9", "timestamp": "2025-05-19T00:00:00Z",
            "data": { "id": "c1" }
        });
        let event = validate_event(body.to_string().as_bytes()).expect("valid");
        assert_eq!(event.event_type, EventType::Deleted);
        assert_eq!(event.contact_id, "c1");
        let body = json!({
            "event": "contact.deleted", "id": "evt_9", "timestamp": "2025-05-19T00:00:00Z",
            "data": { "updatedAt": "never" }
        });
        assert_eq!(fields(&body), ["data.id", "data.updatedAt"]);
    }

    #[test]
    fn invalid_json_is_reported_as_such() {
        assert!(matches!(
            validate_event(b"{\"event\":"),
            Err(ValidationError::Json(_))
        ));
        assert!(matches!(validate_event(b""), Err(ValidationError::Json(_))));
    }

    #[test]
    fn nul_and_duplicate_keys_are_listed_with_the_field_errors() {
        let mut body = seed_example();
        body["id"] = json!("evt\u{0}1");
        body["data"]["nested"] = json!({ "list": ["ok", "bad\u{0}"] });
        body["data"]["email"] = json!("nope");
        assert_eq!(
            fields(&body),
            // The document's order (serde_json sorts keys), then the field checks.
            ["data.nested.list[1]", "id", "data.email"]
        );
        let text = r#"{"event":"contact.deleted","id":"evt_1","id":"evt_2",
            "timestamp":"2025-05-19T00:00:00Z","data":{"id":"c1"}}"#;
        match validate_event(text.as_bytes()) {
            Err(ValidationError::Fields(errors)) => {
                assert_eq!(errors.len(), 1);
                assert_eq!(errors[0].field, "id");
            }
            other => panic!("expected field errors, got {other:?}"),
        }
    }

    #[test]
    fn storable_ids_and_time_filters() {
        assert!(is_storable_id("c1"));
        assert!(is_storable_id(&"e".repeat(255)));
        for bad in ["", " ", "a\u{0}b", &"e".repeat(256)] {
            assert!(!is_storable_id(bad), "{bad:?}");
        }
        let at = |s: &str| s.parse::<DateTime<Utc>>().expect("a date-time");
        assert!(check_time_filter("since", None).is_ok());
        assert!(check_time_filter("since", Some(at("2025-05-19T00:00:00Z"))).is_ok());
        assert!(check_time_filter("since", Some(at("0000-01-01T00:00:00Z"))).is_ok());
        let err = check_time_filter("since", Some(at("-5000-01-01T00:00:00Z")));
        assert_eq!(err.map_err(|e| e.field), Err("since".to_owned()));
        assert!(check_time_filter("until", Some(at("+10000-01-01T00:00:00Z"))).is_err());
    }

    #[test]
    fn overlong_ids_are_refused() {
        let mut body = seed_example();
        body["id"] = json!("e".repeat(256));
        assert_eq!(fields(&body), ["id"]);
    }

    #[test]
    fn email_check() {
        for good in [
            "a@b.co",
            "john.smith+tag@example.com",
            "x@sub-domain.example.org",
        ] {
            assert!(is_valid_email(good), "{good}");
        }
        for bad in [
            "",
            "a",
            "@b.co",
            "a@",
            "a@b",
            "a b@c.com",
            "a@b..com",
            "a@-b.com",
            "a@b@c.com",
        ] {
            assert!(!is_valid_email(bad), "{bad}");
        }
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;
        use crate::strict_json::parse_strict;

        /// Any JSON value, with strings and keys drawn from all of Unicode (NUL included).
        fn json_value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(Value::from),
                any::<f64>()
                    .prop_filter("finite", |f| f.is_finite())
                    .prop_map(Value::from),
                any::<String>().prop_map(Value::String),
            ];
            leaf.prop_recursive(4, 64, 8, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                    prop::collection::btree_map(any::<String>(), inner, 0..8)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        fn no_nul_anywhere(value: &Value) -> bool {
            match value {
                Value::String(s) => !s.contains('\0'),
                Value::Array(items) => items.iter().all(no_nul_anywhere),
                Value::Object(map) => map
                    .iter()
                    .all(|(k, v)| !k.contains('\0') && no_nul_anywhere(v)),
                _ => true,
            }
        }

        /// The seed example with its bytes overwritten, inserted or cut at random places.
        fn mangled_event() -> impl Strategy<Value = Vec<u8>> {
            let seed = seed_example().to_string().into_bytes();
            let len = seed.len();
            prop::collection::vec((0..len, any::<u8>(), 0..3u8), 1..8).prop_map(move |edits| {
                let mut body = seed.clone();
                for (at, byte, kind) in edits {
                    let at = at.min(body.len().saturating_sub(1));
                    match kind {
                        0 => body[at] = byte,
                        1 => body.insert(at, byte),
                        _ => {
                            body.remove(at);
                        }
                    }
                }
                body
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..512)) {
                let _ = validate_event(&body);
            }

            #[test]
            fn mangled_events_never_panic_and_what_passes_is_storable(body in mangled_event()) {
                if let Ok(event) = validate_event(&body) {
                    prop_assert!(no_nul_anywhere(&event.payload));
                    prop_assert!(is_storable_id(&event.event_id));
                    prop_assert!(is_storable_id(&event.contact_id));
                }
            }

            #[test]
            fn strict_reading_keeps_every_value_and_flags_every_nul(value in json_value()) {
                let text = value.to_string();
                let read = parse_strict(text.as_bytes()).expect("serde_json's output is JSON");
                prop_assert_eq!(&read.value, &value);
                prop_assert_eq!(read.problems.is_empty(), no_nul_anywhere(&value));
            }

            #[test]
            fn any_event_that_passes_holds_no_nul(data in json_value(), id in any::<String>()) {
                let body = json!({
                    "event": "contact.deleted", "id": id, "timestamp": "2025-05-19T00:00:00Z",
                    "data": data,
                });
                if let Ok(event) = validate_event(body.to_string().as_bytes()) {
                    prop_assert!(no_nul_anywhere(&event.payload));
                    prop_assert!(is_storable_id(&event.event_id));
                }
            }
        }
    }
}
