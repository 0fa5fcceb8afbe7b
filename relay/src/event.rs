//! The AcmeCRM event types and the parts of a stored event the pipeline reads.
use chrono::{DateTime, Utc};
use serde_json::Value;

/// Every event type, in the order their topics are listed.
pub const EVENT_TYPES: [&str; 3] = ["contact.created", "contact.updated", "contact.deleted"];

/// What happened to a contact.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventType {
    Created,
    Updated,
    Deleted,
}

impl EventType {
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "contact.created" => Some(Self::Created),
            "contact.updated" => Some(Self::Updated),
            "contact.deleted" => Some(Self::Deleted),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "contact.created",
            Self::Updated => "contact.updated",
            Self::Deleted => "contact.deleted",
        }
    }
}

/// Header carrying the event id on every Kafka message.
pub const HEADER_EVENT_ID: &str = "event-id";
/// Header carrying the event type on every Kafka message.
pub const HEADER_EVENT_TYPE: &str = "event-type";
/// Header carrying the processing error on dead-lettered messages.
pub const HEADER_ERROR: &str = "error";

/// Reads an RFC 3339 string field of a JSON object.
pub fn rfc3339_field(object: &Value, field: &str) -> Option<DateTime<Utc>> {
    object
        .get(field)?
        .as_str()
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
}
