//! Our mirror of an AcmeCRM contact, as of the newest event applied to it.
use sea_orm::entity::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize, Deserialize)]
#[sea_orm(table_name = "contacts")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub email: Option<String>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub phone: Option<String>,
    pub company: Option<String>,
    pub title: Option<String>,
    /// The `data` object of the event that produced this state, unknown fields included.
    #[sea_orm(column_type = "JsonBinary")]
    pub data: Json,
    pub source_created_at: Option<DateTimeUtc>,
    /// `data.updatedAt` of the applied event: the first ordering key.
    pub source_updated_at: Option<DateTimeUtc>,
    /// Event `timestamp` of the applied event: the tie-breaker.
    pub event_timestamp: DateTimeUtc,
    pub last_event_id: String,
    /// Tombstone: a deleted contact is never brought back by a later-arriving update.
    pub deleted: bool,
    pub deleted_at: Option<DateTimeUtc>,
    pub updated_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
