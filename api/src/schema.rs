//! Types that exist for the OpenAPI document: the webhook body as AcmeCRM sends it, and the
//! answers. The body itself is validated by `validation` (which reports every bad field and keeps
//! unknown ones), so these types only describe it.
use chrono::{DateTime, Utc};
use poem_openapi::types::Example;
use poem_openapi::{Enum, Object};

/// The type of a contact event.
#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
#[oai(rename = "ContactEventType")]
pub enum EventTypeSchema {
    #[oai(rename = "contact.created")]
    ContactCreated,
    #[oai(rename = "contact.updated")]
    ContactUpdated,
    #[oai(rename = "contact.deleted")]
    ContactDeleted,
}

impl EventTypeSchema {
    /// The wire name, e.g. `contact.created`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ContactCreated => "contact.created",
            Self::ContactUpdated => "contact.updated",
            Self::ContactDeleted => "contact.deleted",
        }
    }
}

/// A contact event posted by AcmeCRM. Unknown extra fields are accepted and stored.
#[derive(Object, Debug, Clone)]
#[oai(rename = "ContactEvent", example)]
pub struct ContactEventSchema {
    /// What happened.
    pub event: EventTypeSchema,
    /// When AcmeCRM emitted the event (RFC 3339).
    pub timestamp: DateTime<Utc>,
    /// Unique event id (at most 255 bytes). A repeated id is acknowledged as a duplicate and
    /// never processed twice.
    pub id: String,
    /// The contact. For `contact.deleted` only `id` is required.
    pub data: ContactDataSchema,
}

/// The contact as AcmeCRM describes it.
#[derive(Object, Debug, Clone)]
#[oai(rename = "ContactData", rename_all = "camelCase")]
pub struct ContactDataSchema {
    /// AcmeCRM contact id: the Kafka message key, so one contact's events stay in order.
    pub id: String,
    /// Required for created/updated.
    pub first_name: Option<String>,
    /// Required for created/updated.
    pub last_name: Option<String>,
    /// Required for created/updated; must be a valid address.
    pub email: Option<String>,
    pub phone: Option<String>,
    pub company: Option<String>,
    pub title: Option<String>,
    /// Required for created/updated (RFC 3339).
    pub created_at: Option<DateTime<Utc>>,
    /// Required for created/updated (RFC 3339). Orders events of one contact: an older version
    /// never overwrites a newer one.
    pub updated_at: Option<DateTime<Utc>>,
}

fn at(rfc3339: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(rfc3339)
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_default()
}

impl Example for ContactEventSchema {
    fn example() -> Self {
        Self {
            event: EventTypeSchema::ContactCreated,
            timestamp: at("2025-05-19T00:00:00.000Z"),
            id: "evt_123456789".into(),
            data: ContactDataSchema {
                id: "c8b5f7d9-8e7a-4a1d-9b5c-1d2e3f4a5b6c".into(),
                first_name: Some("John".into()),
                last_name: Some("Smith".into()),
                email: Some("john.smith@example.com".into()),
                phone: Some("555-987-6543".into()),
                company: Some("Acme Inc".into()),
                title: Some("Senior Engineer".into()),
                created_at: Some(at("2025-05-19T00:00:00.000Z")),
                updated_at: Some(at("2025-05-19T00:00:00.000Z")),
            },
        }
    }
}

/// Whether the event was new or already known.
#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
#[oai(rename_all = "lowercase")]
pub enum AckStatus {
    /// Stored with its outbox row; it will be processed.
    Accepted,
    /// This event id was stored before; nothing was changed.
    Duplicate,
}

/// The acknowledgement of a webhook: the event is durably stored.
#[derive(Object, Debug, Clone)]
#[oai(rename_all = "camelCase")]
pub struct WebhookAck {
    pub event_id: String,
    pub status: AckStatus,
}
