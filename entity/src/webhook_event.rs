//! One received AcmeCRM event and where it is in its lifecycle.
use sea_orm::entity::prelude::*;
use serde::{Deserialize, Serialize};

// What happened to a contact: a payload's `event`, the `event_type` column, a topic's suffix.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, EnumIter, DeriveActiveEnum, Serialize, Deserialize,
)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::N(64))")]
#[cfg_attr(feature = "openapi", derive(poem_openapi::Enum))]
#[cfg_attr(feature = "openapi", oai(rename = "ContactEventType"))]
/// The type of a contact event.
pub enum EventType {
    #[sea_orm(string_value = "contact.created")]
    #[serde(rename = "contact.created")]
    #[cfg_attr(feature = "openapi", oai(rename = "contact.created"))]
    Created,
    #[sea_orm(string_value = "contact.updated")]
    #[serde(rename = "contact.updated")]
    #[cfg_attr(feature = "openapi", oai(rename = "contact.updated"))]
    Updated,
    #[sea_orm(string_value = "contact.deleted")]
    #[serde(rename = "contact.deleted")]
    #[cfg_attr(feature = "openapi", oai(rename = "contact.deleted"))]
    Deleted,
}

impl EventType {
    /// Every event type, in the order their topics are listed.
    pub const ALL: [Self; 3] = [Self::Created, Self::Updated, Self::Deleted];

    /// The wire name, e.g. `contact.created` (also the stored value and the topic suffix).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Created => "contact.created",
            Self::Updated => "contact.updated",
            Self::Deleted => "contact.deleted",
        }
    }

    /// The type named `value`, if any.
    pub fn parse(value: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == value)
    }
}

// `pending` until the consumer applied it (`processed`) or gave up on it (`failed`).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, EnumIter, DeriveActiveEnum, Serialize, Deserialize,
)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::N(16))")]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(poem_openapi::Enum))]
#[cfg_attr(feature = "openapi", oai(rename_all = "lowercase"))]
/// Lifecycle state of an event.
pub enum EventStatus {
    // Stored, with its outbox row; not yet applied.
    #[sea_orm(string_value = "pending")]
    Pending,
    // Applied to `contacts`.
    #[sea_orm(string_value = "processed")]
    Processed,
    // Could not be applied; `error` says why.
    #[sea_orm(string_value = "failed")]
    Failed,
}

impl EventStatus {
    /// The stored value, e.g. `pending`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Processed => "processed",
            Self::Failed => "failed",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize, Deserialize)]
#[sea_orm(table_name = "webhook_events")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    #[sea_orm(unique)]
    pub event_id: String,
    pub event_type: EventType,
    pub contact_id: String,
    #[sea_orm(column_type = "JsonBinary")]
    pub payload: Json,
    pub status: EventStatus,
    /// How many times the consumer tried to apply it.
    pub attempts: i32,
    #[sea_orm(column_type = "Text", nullable)]
    pub error: Option<String>,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
    pub processed_at: Option<DateTimeUtc>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
