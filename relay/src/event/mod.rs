//! The AcmeCRM contact event: ONE reader, used by the webhook's validation (every offending
//! field reported, 400) and by the consumer (an event it cannot read is dead-lettered), so an
//! event answered 200 is always one the consumer can apply. It reads the bytes in one pass
//! ([`strict`]) and checks the fields it kept.
use std::borrow::Cow;

use chrono::{DateTime, Datelike, Utc};
use serde::Serialize;
use serde_json::Value;
use serde_json::value::RawValue;

use strict::{Field, Members, Shape};

pub mod strict;

pub use entity::{EventStatus, EventType};

/// Every event type's wire name, in the order their topics are listed.
pub const EVENT_TYPES: [&str; 3] = [
    EventType::Created.as_str(),
    EventType::Updated.as_str(),
    EventType::Deleted.as_str(),
];

/// Header carrying the event id on every Kafka message.
pub const HEADER_EVENT_ID: &str = "event-id";
/// Header carrying the event type on every Kafka message.
pub const HEADER_EVENT_TYPE: &str = "event-type";
/// Header carrying the processing error on dead-lettered messages.
pub const HEADER_ERROR: &str = "error";

/// Longest event id or contact id we store (the column width).
pub const MAX_ID_LEN: usize = 255;
/// RFC 5321 limit on an address.
const MAX_EMAIL_LEN: usize = 320;

/// One offending field, by JSON path (`data.email`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: &str, message: &str) -> Self {
        Self {
            field: field.to_owned(),
            message: message.to_owned(),
        }
    }
}

/// Why a body is not a contact event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadError {
    /// Not JSON at all; the parser's position message.
    Json(String),
    /// JSON, but not a valid contact event: every offending field.
    Fields(Vec<FieldError>),
}

impl ReadError {
    /// The reasons on one line (the consumer's record of a message it cannot apply).
    pub fn describe(&self) -> String {
        match self {
            Self::Json(message) => message.clone(),
            Self::Fields(errors) => {
                let fields: Vec<String> = errors
                    .iter()
                    .map(|e| format!("{} {}", e.field, e.message))
                    .collect();
                fields.join("; ")
            }
        }
    }
}

/// What the reader keeps of a body: the event's own fields.
const EVENT_SHAPE: Shape = Shape {
    members: &[
        ("event", None),
        ("id", None),
        ("timestamp", None),
        ("data", Some(&DATA_SHAPE)),
    ],
};

const DATA_SHAPE: Shape = Shape {
    members: &[
        ("id", None),
        ("email", None),
        ("firstName", None),
        ("lastName", None),
        ("createdAt", None),
        ("updatedAt", None),
        ("phone", None),
        ("company", None),
        ("title", None),
    ],
};

/// A contact event that passed every check.
#[derive(Debug, Clone)]
pub struct ContactEvent {
    pub event_id: String,
    pub event_type: EventType,
    /// The event's `timestamp`.
    pub timestamp: DateTime<Utc>,
    /// `data.id`.
    pub contact_id: String,
    /// `data.updatedAt`: required for created/updated, optional for a deletion.
    pub updated_at: Option<DateTime<Utc>>,
    /// The contact's fields; `None` for a deletion, which needs only the id.
    pub contact: Option<Contact>,
    /// The body as compact JSON, unknown fields included ([`strict`] says how it is written).
    pub payload: Box<RawValue>,
    /// `data` as compact JSON.
    pub data: Box<RawValue>,
}

/// The fields of a created or updated contact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contact {
    pub email: String,
    pub first_name: String,
    pub last_name: String,
    pub phone: Option<String>,
    pub company: Option<String>,
    pub title: Option<String>,
    pub created_at: DateTime<Utc>,
}

impl ContactEvent {
    /// Reads and checks a body; on failure, every offending field (duplicate keys and NUL
    /// characters anywhere first, in document order, then the field checks).
    pub fn read(body: &[u8]) -> Result<Self, ReadError> {
        let strict::Read {
            payload,
            root,
            problems: mut errors,
        } = strict::read(body, &EVENT_SHAPE).map_err(|e| ReadError::Json(e.to_string()))?;
        let Field::Object(root, _) = root else {
            errors.push(FieldError::new("$", "must be a JSON object"));
            return Err(ReadError::Fields(errors));
        };
        let event_type = match root.get("event") {
            None | Some(Field::Null) => {
                errors.push(FieldError::new("event", "is required"));
                None
            }
            Some(value) => {
                let parsed = value.as_str().and_then(EventType::parse);
                if parsed.is_none() {
                    errors.push(FieldError::new(
                        "event",
                        "must be one of contact.created, contact.updated, contact.deleted",
                    ));
                }
                parsed
            }
        };
        let event_id = required_id(&root, "id", "id", &mut errors);
        let timestamp = required_time(&root, "timestamp", "timestamp", &mut errors);
        let data = match root.get("data") {
            Some(Field::Object(data, span)) => {
                Some((check_data(data, event_type, &mut errors), span.clone()))
            }
            None | Some(Field::Null) => {
                errors.push(FieldError::new("data", "is required"));
                None
            }
            Some(_) => {
                errors.push(FieldError::new("data", "must be an object"));
                None
            }
        };
        match (event_type, event_id, timestamp, data) {
            (
                Some(event_type),
                Some(event_id),
                Some(timestamp),
                Some(((Some(contact_id), updated_at, contact), span)),
            ) if errors.is_empty() => {
                let raw = |text: String| {
                    RawValue::from_string(text).map_err(|e| ReadError::Json(e.to_string()))
                };
                Ok(Self {
                    event_id,
                    event_type,
                    timestamp,
                    contact_id,
                    updated_at,
                    contact,
                    data: raw(payload[span].to_owned())?,
                    payload: raw(payload)?,
                })
            }
            _ => Err(ReadError::Fields(errors)),
        }
    }

    pub fn is_deletion(&self) -> bool {
        self.event_type == EventType::Deleted
    }

    /// This event's place in its contact's total order: a deletion above any create/update (a
    /// tombstone is terminal), then `data.updatedAt` (the event `timestamp` when a deletion has
    /// none), then the event `timestamp`, then the event id.
    pub fn version(&self) -> Version {
        (
            self.is_deletion(),
            self.updated_at.unwrap_or(self.timestamp),
            self.timestamp,
            self.event_id.clone(),
        )
    }
}

/// The place of an event in its contact's total order (compared field by field).
pub type Version = (bool, DateTime<Utc>, DateTime<Utc>, String);

/// JSON on its way to a store: text a reader wrote (sent as it is), or a value.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Json<'a> {
    Text(&'a RawValue),
    Value(Cow<'a, Value>),
}

impl Json<'_> {
    /// As a value, for a store whose driver binds one (SQLite).
    pub fn to_value(&self) -> Result<Value, serde_json::Error> {
        match self {
            Self::Text(text) => serde_json::from_str(text.get()),
            Self::Value(value) => Ok(value.as_ref().clone()),
        }
    }
}

/// Checks `data` for the event type; returns the contact id (when valid), `updatedAt` and,
/// for a creation or an update, the contact's fields.
fn check_data(
    data: &Members<'_>,
    event_type: Option<EventType>,
    errors: &mut Vec<FieldError>,
) -> (Option<String>, Option<DateTime<Utc>>, Option<Contact>) {
    let contact_id = required_id(data, "id", "data.id", errors);
    match event_type {
        Some(EventType::Created | EventType::Updated) => {
            let email = required_string(data, "email", "data.email", errors);
            if email.is_some_and(|email| !is_valid_email(email)) {
                errors.push(FieldError::new(
                    "data.email",
                    "must be a valid email address",
                ));
            }
            let first_name = required_string(data, "firstName", "data.firstName", errors);
            let last_name = required_string(data, "lastName", "data.lastName", errors);
            let created_at = required_time(data, "createdAt", "data.createdAt", errors);
            let updated_at = required_time(data, "updatedAt", "data.updatedAt", errors);
            let [phone, company, title] =
                ["phone", "company", "title"].map(|field| optional_string(data, field, errors));
            let contact = match (email, first_name, last_name, created_at) {
                (Some(email), Some(first_name), Some(last_name), Some(created_at)) => {
                    Some(Contact {
                        email: email.to_owned(),
                        first_name: first_name.to_owned(),
                        last_name: last_name.to_owned(),
                        phone,
                        company,
                        title,
                        created_at,
                    })
                }
                _ => None,
            };
            (contact_id, updated_at, contact)
        }
        // A deletion needs only the id; a timestamp, when sent, must still be readable.
        Some(EventType::Deleted) if data.get("updatedAt").is_some_and(|v| !v.is_null()) => {
            let parsed = data
                .get("updatedAt")
                .and_then(Field::as_str)
                .map_or(Err(NOT_RFC3339), instant);
            let updated_at = parsed
                .map_err(|message| errors.push(FieldError::new("data.updatedAt", message)))
                .ok();
            (contact_id, updated_at, None)
        }
        Some(EventType::Deleted) | None => (contact_id, None, None),
    }
}

/// Why a date-time field is refused.
const NOT_RFC3339: &str = "must be an RFC 3339 date-time";
const OUT_OF_RANGE: &str =
    "must be between 0001-01-01T00:00:00Z and 9999-12-31T23:59:59.999999Z once converted to UTC";

/// Reads an RFC 3339 date-time as the instant every store holds and orders alike: in UTC, cut
/// to microseconds (PostgreSQL's precision, so the consumer's comparisons in Rust and in SQL
/// agree), a leap second (`23:59:60`) folded into the next second as PostgreSQL and POSIX do,
/// and within the UTC years 0001 to 9999. RFC 3339 can write `0000-01-01T00:00:00+01:00`,
/// which is in year -1 in UTC: such an instant is refused here (400) rather than accepted and
/// then never applied.
pub fn instant(text: &str) -> Result<DateTime<Utc>, &'static str> {
    let parsed = DateTime::parse_from_rfc3339(text).map_err(|_| NOT_RFC3339)?;
    // `timestamp_micros` counts a leap second as the next second's first microsecond.
    let utc = DateTime::from_timestamp_micros(parsed.with_timezone(&Utc).timestamp_micros())
        .ok_or(OUT_OF_RANGE)?;
    if (1..=9999).contains(&utc.year()) {
        Ok(utc)
    } else {
        Err(OUT_OF_RANGE)
    }
}

fn required_string<'a>(
    object: &'a Members<'_>,
    key: &str,
    path: &str,
    errors: &mut Vec<FieldError>,
) -> Option<&'a str> {
    match object.get(key) {
        None | Some(Field::Null) => errors.push(FieldError::new(path, "is required")),
        Some(Field::Str(s)) if s.trim().is_empty() => {
            errors.push(FieldError::new(path, "must not be empty"))
        }
        Some(Field::Str(s)) => return Some(s),
        Some(_) => errors.push(FieldError::new(path, "must be a string")),
    }
    None
}

fn optional_string(
    object: &Members<'_>,
    key: &str,
    errors: &mut Vec<FieldError>,
) -> Option<String> {
    match object.get(key) {
        None | Some(Field::Null) => None,
        Some(Field::Str(s)) => Some(s.to_string()),
        Some(_) => {
            errors.push(FieldError {
                field: format!("data.{key}"),
                message: "must be a string".into(),
            });
            None
        }
    }
}

fn required_id(
    object: &Members<'_>,
    key: &str,
    path: &str,
    errors: &mut Vec<FieldError>,
) -> Option<String> {
    let id = required_string(object, key, path, errors)?;
    if id.len() > MAX_ID_LEN {
        errors.push(FieldError::new(path, "must be at most 255 bytes"));
        return None;
    }
    Some(id.to_owned())
}

fn required_time(
    object: &Members<'_>,
    key: &str,
    path: &str,
    errors: &mut Vec<FieldError>,
) -> Option<DateTime<Utc>> {
    let value = required_string(object, key, path, errors)?;
    instant(value)
        .map_err(|message| errors.push(FieldError::new(path, message)))
        .ok()
}

/// A pragmatic address check: one `@`, a non-empty local part, a dotted domain, no spaces.
pub fn is_valid_email(email: &str) -> bool {
    if email.len() > MAX_EMAIL_LEN || email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return false;
    }
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && local.len() <= 64
        && !domain.contains('@')
        && domain.contains('.')
        && domain.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_alphanumeric() || c == '-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(text: &str) -> String {
        instant(text)
            .expect("accepted")
            .format("%Y-%m-%dT%H:%M:%S%.6fZ")
            .to_string()
    }

    #[test]
    fn instants_are_normalised_to_utc_microseconds_with_leap_seconds_folded() {
        assert_eq!(
            utc("2025-05-19T10:00:00.1234567+02:00"),
            "2025-05-19T08:00:00.123456Z"
        );
        assert_eq!(utc("2016-12-31T23:59:60.5Z"), "2017-01-01T00:00:00.500000Z");
        assert_eq!(
            utc("0000-12-31T23:00:00-01:00"),
            "0001-01-01T00:00:00.000000Z"
        );
        assert_eq!(
            utc("9999-12-31T23:59:59.999999Z"),
            "9999-12-31T23:59:59.999999Z"
        );
    }

    #[test]
    fn instants_outside_the_utc_years_0001_to_9999_are_refused() {
        for text in [
            "0000-01-01T00:00:00+01:00",
            "0000-12-31T23:59:59Z",
            "9999-12-31T23:59:60Z",
            "9999-12-31T23:00:00-01:00",
        ] {
            assert_eq!(instant(text), Err(OUT_OF_RANGE), "{text}");
        }
        assert_eq!(instant("yesterday"), Err(NOT_RFC3339));
    }

    #[test]
    fn an_out_of_range_created_at_is_refused_naming_the_field() {
        let payload = serde_json::json!({
            "event": "contact.created", "id": "e1", "timestamp": "2025-05-19T00:00:00Z",
            "data": { "id": "c1", "email": "a@example.com", "firstName": "A", "lastName": "B",
                      "createdAt": "0000-01-01T00:00:00+01:00", "updatedAt": "2025-05-19T00:00:00Z" }
        });
        let error = ContactEvent::read(payload.to_string().as_bytes()).expect_err("refused");
        assert_eq!(
            error,
            ReadError::Fields(vec![FieldError::new("data.createdAt", OUT_OF_RANGE)])
        );
    }
}
