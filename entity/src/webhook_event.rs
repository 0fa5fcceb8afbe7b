//! One received AcmeCRM event and where it is in its lifecycle.
use sea_orm::entity::prelude::*;
use serde::{Deserialize, Serialize};

/// `pending` until the consumer applied it (`processed`) or gave up on it (`failed`).
pub const STATUS_PENDING: &str = "pending";
/// The event was applied to `contacts`.
pub const STATUS_PROCESSED: &str = "processed";
/// The event could not be applied; `error` says why.
pub const STATUS_FAILED: &str = "failed";

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize, Deserialize)]
#[sea_orm(table_name = "webhook_events")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    #[sea_orm(unique)]
    pub event_id: String,
    pub event_type: String,
    pub contact_id: String,
    #[sea_orm(column_type = "JsonBinary")]
    pub payload: Json,
    pub status: String,
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
