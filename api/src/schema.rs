//! Types that exist for the OpenAPI document: the webhook body as AcmeCRM sends it, and the
//! answers. The body itself is validated by `validation` (which reports every bad field and keeps
//! unknown ones), so these types only describe it.
use std::borrow::Cow;

use chrono::{DateTime, Utc};
use poem_openapi::registry::{MetaSchema, MetaSchemaRef};
use poem_openapi::types::{Example, ParseError, ParseFromJSON, ParseResult, ToJSON, Type};
use poem_openapi::{Enum, Object, Union};
use serde_json::Value;

/// The contact of the spec's example event (and of the seed event of `scripts/contract`).
pub const EXAMPLE_CONTACT_ID: &str = "c8b5f7d9-8e7a-4a1d-9b5c-1d2e3f4a5b6c";
/// The id of the spec's example event.
pub const EXAMPLE_EVENT_ID: &str = "evt_123456789";

/// A contact event posted by AcmeCRM, one schema per `event` type. Unknown extra fields, at any
/// level, are accepted and stored as sent.
#[derive(Union, Debug, Clone)]
#[oai(rename = "ContactEvent", discriminator_name = "event", one_of)]
pub enum ContactEventSchema {
    #[oai(mapping = "contact.created")]
    Created(ContactCreatedSchema),
    #[oai(mapping = "contact.updated")]
    Updated(ContactUpdatedSchema),
    #[oai(mapping = "contact.deleted")]
    Deleted(ContactDeletedSchema),
}

/// `contact.created`: a new contact, with every required field.
#[derive(Object, Debug, Clone)]
#[oai(rename = "ContactCreated", example)]
pub struct ContactCreatedSchema {
    /// When AcmeCRM emitted the event (RFC 3339).
    pub timestamp: DateTime<Utc>,
    /// Unique event id: not blank, at most 255 bytes. A repeated id is acknowledged as a duplicate
    /// and never processed twice.
    #[oai(validator(
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\u0000]*[^\u0000\t\n\u000b\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000][^\u0000]*$"
    ))]
    pub id: String,
    pub data: ContactDataSchema,
}

/// `contact.updated`: the contact's new state, with every required field.
#[derive(Object, Debug, Clone)]
#[oai(rename = "ContactUpdated")]
pub struct ContactUpdatedSchema {
    /// When AcmeCRM emitted the event (RFC 3339).
    pub timestamp: DateTime<Utc>,
    /// Unique event id: not blank, at most 255 bytes. A repeated id is acknowledged as a duplicate
    /// and never processed twice.
    #[oai(validator(
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\u0000]*[^\u0000\t\n\u000b\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000][^\u0000]*$"
    ))]
    pub id: String,
    pub data: ContactDataSchema,
}

/// `contact.deleted`: only the contact id is required; other `data` fields are stored unchecked.
#[derive(Object, Debug, Clone)]
#[oai(rename = "ContactDeleted")]
pub struct ContactDeletedSchema {
    /// When AcmeCRM emitted the event (RFC 3339).
    pub timestamp: DateTime<Utc>,
    /// Unique event id: not blank, at most 255 bytes. A repeated id is acknowledged as a duplicate
    /// and never processed twice.
    #[oai(validator(
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\u0000]*[^\u0000\t\n\u000b\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000][^\u0000]*$"
    ))]
    pub id: String,
    pub data: DeletedContactSchema,
}

/// The contact of a `contact.created` or `contact.updated` event, as AcmeCRM describes it.
#[derive(Object, Debug, Clone)]
#[oai(rename = "ContactData", rename_all = "camelCase")]
pub struct ContactDataSchema {
    /// AcmeCRM contact id (not blank, at most 255 bytes): the Kafka message key, so one
    /// contact's events stay in order.
    #[oai(validator(
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\u0000]*[^\u0000\t\n\u000b\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000][^\u0000]*$"
    ))]
    pub id: String,
    /// Not blank.
    #[oai(validator(
        min_length = 1,
        pattern = r"^[^\u0000]*[^\u0000\t\n\u000b\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000][^\u0000]*$"
    ))]
    pub first_name: String,
    /// Not blank.
    #[oai(validator(
        min_length = 1,
        pattern = r"^[^\u0000]*[^\u0000\t\n\u000b\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000][^\u0000]*$"
    ))]
    pub last_name: String,
    /// `local@domain.tld`: at most 320 bytes, no whitespace or control characters, one `@`, a
    /// local part of at most 64 bytes, a domain of at least two dot-separated labels made of
    /// letters, digits and inner hyphens.
    #[oai(validator(
        max_length = 320,
        pattern = r"^[^@\u0000-\u0020\u007f-\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]{1,64}@(?:[^\u0000-\u002c\u002e\u002f\u003a-\u0040\u005b-\u0060\u007b-\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+\.)+[^\u0000-\u002c\u002e\u002f\u003a-\u0040\u005b-\u0060\u007b-\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+$"
    ))]
    pub email: Email,
    #[oai(nullable, validator(pattern = r"^[^\u0000]*$"))]
    pub phone: Option<String>,
    #[oai(nullable, validator(pattern = r"^[^\u0000]*$"))]
    pub company: Option<String>,
    #[oai(nullable, validator(pattern = r"^[^\u0000]*$"))]
    pub title: Option<String>,
    /// RFC 3339.
    pub created_at: DateTime<Utc>,
    /// RFC 3339. Orders events of one contact: an older version never overwrites a newer one.
    pub updated_at: DateTime<Utc>,
}

/// The contact of a `contact.deleted` event: its id, and optionally when it was deleted.
#[derive(Object, Debug, Clone)]
#[oai(rename = "DeletedContact", rename_all = "camelCase")]
pub struct DeletedContactSchema {
    /// AcmeCRM contact id (not blank, at most 255 bytes).
    #[oai(validator(
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\u0000]*[^\u0000\t\n\u000b\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000][^\u0000]*$"
    ))]
    pub id: String,
    /// RFC 3339, when sent; orders the deletion among the contact's events (else the event
    /// `timestamp` does).
    #[oai(nullable)]
    pub updated_at: Option<DateTime<Utc>>,
}

/// An email address (`type: string, format: email`); only documents the webhook body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Email(pub String);

impl Type for Email {
    const IS_REQUIRED: bool = true;
    type RawValueType = String;
    type RawElementValueType = String;

    fn name() -> Cow<'static, str> {
        "string_email".into()
    }

    fn schema_ref() -> MetaSchemaRef {
        MetaSchemaRef::Inline(Box::new(MetaSchema::new_with_format("string", "email")))
    }

    fn as_raw_value(&self) -> Option<&Self::RawValueType> {
        Some(&self.0)
    }

    fn raw_element_iter<'a>(
        &'a self,
    ) -> Box<dyn Iterator<Item = &'a Self::RawElementValueType> + 'a> {
        Box::new(self.as_raw_value().into_iter())
    }
}

impl ParseFromJSON for Email {
    fn parse_from_json(value: Option<Value>) -> ParseResult<Self> {
        match value {
            Some(Value::String(s)) => Ok(Self(s)),
            other => Err(ParseError::expected_type(other.unwrap_or_default())),
        }
    }
}

impl ToJSON for Email {
    fn to_json(&self) -> Option<Value> {
        Some(Value::String(self.0.clone()))
    }
}

fn at(rfc3339: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(rfc3339)
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_default()
}

impl Example for ContactCreatedSchema {
    fn example() -> Self {
        Self {
            timestamp: at("2025-05-19T00:00:00.000Z"),
            id: EXAMPLE_EVENT_ID.into(),
            data: ContactDataSchema {
                id: EXAMPLE_CONTACT_ID.into(),
                first_name: "John".into(),
                last_name: "Smith".into(),
                email: Email("john.smith@example.com".into()),
                phone: Some("555-987-6543".into()),
                company: Some("Acme Inc".into()),
                title: Some("Senior Engineer".into()),
                created_at: at("2025-05-19T00:00:00.000Z"),
                updated_at: at("2025-05-19T00:00:00.000Z"),
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

/// A JSON string, and only a string: poem-openapi's `String` also takes a number or a boolean
/// (as its text), which the spec's `type: string` does not allow.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JsonString(pub String);

impl poem_openapi::types::Type for JsonString {
    const IS_REQUIRED: bool = true;
    type RawValueType = Self;
    type RawElementValueType = Self;

    fn name() -> std::borrow::Cow<'static, str> {
        "string".into()
    }

    fn schema_ref() -> poem_openapi::registry::MetaSchemaRef {
        poem_openapi::registry::MetaSchemaRef::Inline(Box::new(
            poem_openapi::registry::MetaSchema::new("string"),
        ))
    }

    fn as_raw_value(&self) -> Option<&Self::RawValueType> {
        Some(self)
    }

    fn raw_element_iter<'a>(
        &'a self,
    ) -> Box<dyn Iterator<Item = &'a Self::RawElementValueType> + 'a> {
        Box::new(self.as_raw_value().into_iter())
    }
}

impl poem_openapi::types::ParseFromJSON for JsonString {
    fn parse_from_json(value: Option<serde_json::Value>) -> poem_openapi::types::ParseResult<Self> {
        match value.unwrap_or_default() {
            serde_json::Value::String(text) => Ok(Self(text)),
            other => Err(poem_openapi::types::ParseError::expected_type(other)),
        }
    }
}

impl poem_openapi::types::ToJSON for JsonString {
    fn to_json(&self) -> Option<serde_json::Value> {
        Some(serde_json::Value::String(self.0.clone()))
    }
}
