//! The AcmeCRM contact event: ONE parser, used by the webhook's validation (every offending
//! field reported, 400) and by the consumer (an event it cannot read is dead-lettered), so an
//! event answered 200 is always one the consumer can apply.
use chrono::{DateTime, Datelike, Utc};
use serde_json::{Map, Value};

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

/// A contact event that passed every check; `payload` is the body as received, unknown fields
/// included.
#[derive(Debug, Clone, PartialEq)]
pub struct ContactEvent {
    pub event_id: String,
    pub event_type: EventType,
    /// The event's `timestamp`.
    pub timestamp: DateTime<Utc>,
    /// `data.id`.
    pub contact_id: String,
    /// `data.updatedAt`: required for created/updated, optional for a deletion.
    pub updated_at: Option<DateTime<Utc>>,
    pub payload: Value,
}

impl ContactEvent {
    /// Reads and checks a payload; on failure, every offending field.
    pub fn parse(payload: Value) -> Result<Self, Vec<FieldError>> {
        Self::parse_after(payload, Vec::new())
    }

    /// [`Self::parse`], after `problems` a reader found earlier (listed first).
    pub fn parse_after(
        payload: Value,
        mut errors: Vec<FieldError>,
    ) -> Result<Self, Vec<FieldError>> {
        let Some(root) = payload.as_object() else {
            errors.push(FieldError::new("$", "must be a JSON object"));
            return Err(errors);
        };
        let event_type = match root.get("event") {
            None | Some(Value::Null) => {
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
        let event_id = required_id(root, "id", "id", &mut errors);
        let timestamp = required_time(root, "timestamp", "timestamp", &mut errors);
        let data = match root.get("data") {
            Some(Value::Object(data)) => Some(check_data(data, event_type, &mut errors)),
            None | Some(Value::Null) => {
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
                Some((Some(contact_id), updated_at)),
            ) if errors.is_empty() => Ok(Self {
                event_id,
                event_type,
                timestamp,
                contact_id,
                updated_at,
                payload,
            }),
            _ => Err(errors),
        }
    }

    /// Reads a stored payload (the consumer's side): [`Self::parse`], its errors as one line.
    pub fn parse_stored(payload: Value) -> Result<Self, String> {
        Self::parse(payload).map_err(|errors| {
            let fields: Vec<String> = errors
                .iter()
                .map(|e| format!("{} {}", e.field, e.message))
                .collect();
            fields.join("; ")
        })
    }

    /// The `data` object.
    pub fn data(&self) -> &Value {
        self.payload.get("data").unwrap_or(&Value::Null)
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

/// Checks `data` for the event type; returns the contact id (when valid) and `updatedAt`.
fn check_data(
    data: &Map<String, Value>,
    event_type: Option<EventType>,
    errors: &mut Vec<FieldError>,
) -> (Option<String>, Option<DateTime<Utc>>) {
    let contact_id = required_id(data, "id", "data.id", errors);
    let mut updated_at = None;
    match event_type {
        Some(EventType::Created | EventType::Updated) => {
            match required_string(data, "email", "data.email", errors) {
                Some(email) if !is_valid_email(email) => {
                    errors.push(FieldError::new(
                        "data.email",
                        "must be a valid email address",
                    ));
                }
                _ => {}
            }
            required_string(data, "firstName", "data.firstName", errors);
            required_string(data, "lastName", "data.lastName", errors);
            required_time(data, "createdAt", "data.createdAt", errors);
            updated_at = required_time(data, "updatedAt", "data.updatedAt", errors);
            for field in ["phone", "company", "title"] {
                optional_string(data, field, errors);
            }
        }
        // A deletion needs only the id; a timestamp, when sent, must still be readable.
        Some(EventType::Deleted) if data.get("updatedAt").is_some_and(|v| !v.is_null()) => {
            let parsed = data
                .get("updatedAt")
                .and_then(Value::as_str)
                .map_or(Err(NOT_RFC3339), instant);
            match parsed {
                Ok(at) => updated_at = Some(at),
                Err(message) => errors.push(FieldError::new("data.updatedAt", message)),
            }
        }
        Some(EventType::Deleted) | None => {}
    }
    (contact_id, updated_at)
}

/// Reads an RFC 3339 string field of a JSON object (an instant [`instant`] accepts).
pub fn rfc3339_field(object: &Value, field: &str) -> Option<DateTime<Utc>> {
    instant(object.get(field)?.as_str()?).ok()
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
    object: &'a Map<String, Value>,
    key: &str,
    path: &str,
    errors: &mut Vec<FieldError>,
) -> Option<&'a str> {
    match object.get(key) {
        None | Some(Value::Null) => errors.push(FieldError::new(path, "is required")),
        Some(Value::String(s)) if s.trim().is_empty() => {
            errors.push(FieldError::new(path, "must not be empty"))
        }
        Some(Value::String(s)) => return Some(s),
        Some(_) => errors.push(FieldError::new(path, "must be a string")),
    }
    None
}

fn optional_string(object: &Map<String, Value>, key: &str, errors: &mut Vec<FieldError>) {
    if let Some(value) = object.get(key)
        && !(value.is_string() || value.is_null())
    {
        errors.push(FieldError {
            field: format!("data.{key}"),
            message: "must be a string".into(),
        });
    }
}

fn required_id(
    object: &Map<String, Value>,
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
    object: &Map<String, Value>,
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
        let errors = ContactEvent::parse(payload).expect_err("refused");
        assert_eq!(errors, [FieldError::new("data.createdAt", OUT_OF_RANGE)]);
    }
}
