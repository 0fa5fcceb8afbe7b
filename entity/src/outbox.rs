//! A message waiting to be published to Kafka, written in the same transaction as its event.
use sea_orm::entity::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize, Deserialize)]
#[sea_orm(table_name = "outbox")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub event_id: String,
    pub topic: String,
    /// Kafka message key: the contact id, so one contact's events stay in order.
    pub message_key: String,
    /// NULL on PostgreSQL: the relay publishes the event's stored payload. A copy here (rows from
    /// before that, and SQLite, which keeps writing it) is published instead.
    #[sea_orm(column_type = "JsonBinary", nullable)]
    pub payload: Option<Json>,
    /// JSON object of Kafka header name to string value.
    #[sea_orm(column_type = "JsonBinary")]
    pub headers: Json,
    pub created_at: DateTimeUtc,
    pub published_at: Option<DateTimeUtc>,
    pub attempts: i32,
    pub next_attempt_at: DateTimeUtc,
    #[sea_orm(column_type = "Text", nullable)]
    pub last_error: Option<String>,
    /// How many times the safety net published this row again (each waits twice as long).
    pub republished: i32,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
