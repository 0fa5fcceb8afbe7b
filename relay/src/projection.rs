//! `contacts`: our mirror of AcmeCRM. Events may arrive out of order; an older version of a
//! contact (by `data.updatedAt`, then the event `timestamp`) never overwrites a newer one, and a
//! deleted contact stays deleted (its tombstone is terminal).
use chrono::{DateTime, Utc};
use entity::contact;
use sea_orm::{
    ActiveValue::Set, ConnectionTrait, DatabaseBackend, DbErr, EntityTrait, QuerySelect,
};
use serde_json::Value;

use crate::event::{EventType, rfc3339_field};

/// An event as the projection needs it.
#[derive(Debug, Clone)]
pub struct ContactChange {
    pub event_id: String,
    pub event_type: EventType,
    pub timestamp: DateTime<Utc>,
    pub contact_id: String,
    pub data: Value,
    pub updated_at: Option<DateTime<Utc>>,
}

/// Why an event can never be applied (a retry would fail the same way).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct Unappliable(pub String);

impl ContactChange {
    /// Reads a stored event payload.
    pub fn from_payload(payload: &Value) -> Result<Self, Unappliable> {
        let bad = |what: &str| Unappliable(format!("event payload: {what}"));
        let event_id = payload
            .get("id")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("`id` is missing"))?;
        let event_type = payload
            .get("event")
            .and_then(Value::as_str)
            .and_then(EventType::parse)
            .ok_or_else(|| bad("`event` is not a contact event type"))?;
        let timestamp = rfc3339_field(payload, "timestamp")
            .ok_or_else(|| bad("`timestamp` is not RFC 3339"))?;
        let data = payload
            .get("data")
            .filter(|d| d.is_object())
            .ok_or_else(|| bad("`data` is not an object"))?;
        let contact_id = data
            .get("id")
            .and_then(Value::as_str)
            .filter(|id| !id.is_empty())
            .ok_or_else(|| bad("`data.id` is missing"))?;
        let updated_at = match data.get("updatedAt") {
            None | Some(Value::Null) => None,
            Some(_) => Some(
                rfc3339_field(data, "updatedAt")
                    .ok_or_else(|| bad("`data.updatedAt` is not RFC 3339"))?,
            ),
        };
        if event_type != EventType::Deleted && updated_at.is_none() {
            return Err(bad("`data.updatedAt` is required for created/updated"));
        }
        Ok(Self {
            event_id: event_id.to_owned(),
            event_type,
            timestamp,
            contact_id: contact_id.to_owned(),
            data: data.clone(),
            updated_at,
        })
    }

    /// The ordering key: the contact's version, then when the event was sent.
    fn version(&self) -> (DateTime<Utc>, DateTime<Utc>) {
        (self.updated_at.unwrap_or(self.timestamp), self.timestamp)
    }
}

fn stored_version(c: &contact::Model) -> (DateTime<Utc>, DateTime<Utc>) {
    (
        c.source_updated_at.unwrap_or(c.event_timestamp),
        c.event_timestamp,
    )
}

/// What applying an event did to `contacts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The contact now reflects this event.
    Changed,
    /// A newer version (or a tombstone) is already stored; nothing changed.
    Stale,
}

/// Applies `change` inside the caller's transaction.
pub async fn apply<C: ConnectionTrait>(conn: &C, change: &ContactChange) -> Result<Applied, DbErr> {
    let mut find = contact::Entity::find_by_id(change.contact_id.clone());
    if conn.get_database_backend() == DatabaseBackend::Postgres {
        find = find.lock_exclusive();
    }
    let existing = find.one(conn).await?;
    if let Some(current) = &existing {
        let newer =
            change.event_type == EventType::Deleted || change.version() > stored_version(current);
        if current.deleted || !newer {
            return Ok(Applied::Stale);
        }
    }
    let text = |field: &str| {
        change
            .data
            .get(field)
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let deleted = change.event_type == EventType::Deleted;
    let mut model = contact::ActiveModel {
        id: Set(change.contact_id.clone()),
        data: Set(change.data.clone()),
        event_timestamp: Set(change.timestamp),
        last_event_id: Set(change.event_id.clone()),
        deleted: Set(deleted),
        deleted_at: Set(deleted.then_some(change.timestamp)),
        updated_at: Set(Utc::now()),
        ..Default::default()
    };
    if deleted {
        // Keep what we knew of the contact; only mark it gone.
        model.source_updated_at = Set(change
            .updated_at
            .or(existing.as_ref().and_then(|c| c.source_updated_at)));
    } else {
        model.email = Set(text("email"));
        model.first_name = Set(text("firstName"));
        model.last_name = Set(text("lastName"));
        model.phone = Set(text("phone"));
        model.company = Set(text("company"));
        model.title = Set(text("title"));
        model.source_created_at = Set(rfc3339_field(&change.data, "createdAt"));
        model.source_updated_at = Set(change.updated_at);
    }
    match existing {
        Some(current) => {
            if deleted {
                model.data = Set(current.data);
            }
            contact::Entity::update(model).exec(conn).await?;
        }
        None => {
            contact::Entity::insert(model)
                .exec_without_returning(conn)
                .await?;
        }
    }
    Ok(Applied::Changed)
}
