//! Applying bus messages, a batch at a time: in ONE transaction and a few statements per batch,
//! claim the events (`pending` -> `processed`), apply them to `contacts`, mark the ones that can
//! never be applied `failed`, and (Kafka) record the partitions' next offsets. A message whose
//! event is no longer `pending` changes nothing (re-delivery).
use std::collections::{BTreeMap, BTreeSet};

use chrono::Utc;
use entity::EventStatus;
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbErr, Statement, TransactionTrait,
    Value as SqlValue,
};
use serde_json::Value;

use crate::bus::BusMessage;
use crate::error::Unappliable;
use crate::event::HEADER_EVENT_ID;
use crate::partitions::{Fenced, OffsetCommit};
use crate::projection::{self, Applied, ContactChange, placeholders};

/// What handling a message did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// Claimed and marked `processed`; `Applied` says whether it is now its contact's state.
    Processed(Applied),
    /// Its event was already processed or failed: a re-delivery, nothing changed.
    AlreadyDone,
}

/// The outcome of one message: handled, or a reason it can never be applied (the event is marked
/// `failed` with it; dead-letter the message).
pub type Outcome = Result<Handled, Unappliable>;

/// Why a batch was not applied; nothing of it was written.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// Worth retrying (database unavailable, a lost race...).
    #[error("transient: {0}")]
    Transient(#[from] DbErr),
    /// Another member owns some of the batch's partitions now: drop them, do not retry.
    #[error(transparent)]
    Fenced(#[from] Fenced),
}

/// Why a single message was not handled.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error(transparent)]
    Batch(#[from] BatchError),
    /// Will never succeed: dead-letter it.
    #[error(transparent)]
    Permanent(#[from] Unappliable),
}

/// A batch applied inside a still open transaction: publish its dead letters, then `commit`.
pub struct AppliedBatch {
    txn: DatabaseTransaction,
    /// One per message, in order.
    pub outcomes: Vec<Outcome>,
}

impl AppliedBatch {
    pub async fn commit(self) -> Result<(), DbErr> {
        self.txn.commit().await
    }
}

/// Applies events to the database.
#[derive(Clone)]
pub struct EventProcessor {
    db: DatabaseConnection,
}

/// A message as read: a change to apply, or why it cannot be applied.
enum Parsed {
    Change(ContactChange),
    Unappliable {
        event_id: Option<String>,
        reason: Unappliable,
    },
}

fn parse(message: &BusMessage) -> Parsed {
    let payload: Value = match serde_json::from_slice(&message.payload) {
        Ok(payload) => payload,
        Err(error) => {
            return Parsed::Unappliable {
                event_id: message.header(HEADER_EVENT_ID).map(str::to_owned),
                reason: Unappliable::NotJson(error.to_string()),
            };
        }
    };
    match ContactChange::from_payload(&payload) {
        Ok(change) => Parsed::Change(change),
        Err(unappliable) => Parsed::Unappliable {
            event_id: message
                .header(HEADER_EVENT_ID)
                .or_else(|| payload.get("id").and_then(Value::as_str))
                .map(str::to_owned),
            reason: unappliable,
        },
    }
}

impl EventProcessor {
    pub fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }

    /// Handles one message in its own transaction; safe to call again with the same message.
    pub async fn handle(&self, message: &BusMessage) -> Result<Handled, ProcessError> {
        let mut batch = self
            .apply_batch(std::slice::from_ref(message), None)
            .await?;
        let outcome = batch.outcomes.pop().unwrap_or(Ok(Handled::AlreadyDone));
        batch.commit().await.map_err(BatchError::from)?;
        Ok(outcome?)
    }

    /// Applies `messages` in one transaction and leaves it open (see [`AppliedBatch`]). Messages
    /// that can never be applied are marked `failed` and come back as `Err(reason)` while the
    /// others go on. With `offsets`, the partitions' next offsets are written in the same
    /// transaction, fenced by ownership. An error means nothing was written.
    pub async fn apply_batch(
        &self,
        messages: &[BusMessage],
        offsets: Option<&OffsetCommit>,
    ) -> Result<AppliedBatch, BatchError> {
        let parsed: Vec<Parsed> = messages.iter().map(parse).collect();
        let txn = self.db.begin().await?;

        let change_ids: BTreeSet<&str> = parsed
            .iter()
            .filter_map(|p| match p {
                Parsed::Change(change) => Some(change.event_id.as_str()),
                Parsed::Unappliable { .. } => None,
            })
            .collect();
        let claimed = claim(&txn, &change_ids).await?;

        // Why the rest was not claimed: already done, still pending (unappliable), or unknown.
        let others: BTreeSet<&str> = parsed
            .iter()
            .filter_map(|p| match p {
                Parsed::Change(change) if !claimed.contains(&change.event_id) => {
                    Some(change.event_id.as_str())
                }
                Parsed::Unappliable { event_id, .. } => event_id.as_deref(),
                Parsed::Change(_) => None,
            })
            .collect();
        let statuses = statuses(&txn, &others).await?;

        let mut first_claim: BTreeSet<&str> = BTreeSet::new();
        let mut failed_now: BTreeSet<&str> = BTreeSet::new();
        let mut to_apply: Vec<&ContactChange> = Vec::new();
        let mut decided: Vec<Result<Option<&str>, Unappliable>> = Vec::with_capacity(parsed.len());
        for p in &parsed {
            decided.push(match p {
                Parsed::Change(change) if claimed.contains(&change.event_id) => {
                    if first_claim.insert(&change.event_id) {
                        to_apply.push(change);
                        Ok(Some(change.event_id.as_str()))
                    } else {
                        Ok(None) // the same event twice in one batch
                    }
                }
                Parsed::Change(change) => match statuses.get(&change.event_id) {
                    Some(_) => Ok(None),
                    None => Err(Unappliable::UnknownEvent(change.event_id.clone())),
                },
                Parsed::Unappliable { event_id: None, .. } => Err(Unappliable::NoEventId),
                Parsed::Unappliable {
                    event_id: Some(id),
                    reason,
                } => match statuses.get(id) {
                    Some(status)
                        if status == EventStatus::Pending.as_str() && failed_now.insert(id) =>
                    {
                        mark_failed(&txn, id, &reason.to_string()).await?;
                        Err(reason.clone())
                    }
                    Some(_) => Ok(None),
                    None => Err(Unappliable::UnknownEvent(id.clone())),
                },
            });
        }

        let changed = projection::apply(&txn, &to_apply).await?;
        if let Some(offsets) = offsets {
            offsets.write(&txn).await?;
        }
        let outcomes = decided
            .into_iter()
            .map(|d| {
                d.map(|claimed| match claimed {
                    Some(id) if changed.contains(id) => Handled::Processed(Applied::Changed),
                    Some(_) => Handled::Processed(Applied::Stale),
                    None => Handled::AlreadyDone,
                })
            })
            .collect();
        Ok(AppliedBatch { txn, outcomes })
    }
}

/// Marks the `pending` events among `ids` processed, in one statement; returns those it marked.
async fn claim<C: ConnectionTrait>(
    conn: &C,
    ids: &BTreeSet<&str>,
) -> Result<BTreeSet<String>, DbErr> {
    if ids.is_empty() {
        return Ok(BTreeSet::new());
    }
    let now = Utc::now();
    let mut values: Vec<SqlValue> = vec![
        EventStatus::Processed.as_str().into(),
        now.into(),
        now.into(),
        EventStatus::Pending.as_str().into(),
    ];
    values.extend(ids.iter().map(|id| SqlValue::from(*id)));
    let sql = format!(
        "UPDATE webhook_events SET status = $1, processed_at = $2, updated_at = $3, \
         error = NULL, attempts = attempts + 1 WHERE status = $4 AND event_id IN {} \
         RETURNING event_id",
        placeholders(4, ids.len())
    );
    let rows = conn
        .query_all_raw(Statement::from_sql_and_values(
            conn.get_database_backend(),
            sql,
            values,
        ))
        .await?;
    rows.iter().map(|r| r.try_get_by_index(0)).collect()
}

/// The status of each of `ids` that exists.
async fn statuses<C: ConnectionTrait>(
    conn: &C,
    ids: &BTreeSet<&str>,
) -> Result<BTreeMap<String, String>, DbErr> {
    if ids.is_empty() {
        return Ok(BTreeMap::new());
    }
    let sql = format!(
        "SELECT event_id, status FROM webhook_events WHERE event_id IN {}",
        placeholders(0, ids.len())
    );
    let rows = conn
        .query_all_raw(Statement::from_sql_and_values(
            conn.get_database_backend(),
            sql,
            ids.iter().map(|id| SqlValue::from(*id)),
        ))
        .await?;
    rows.iter()
        .map(|r| Ok((r.try_get_by_index(0)?, r.try_get_by_index(1)?)))
        .collect()
}

async fn mark_failed<C: ConnectionTrait>(
    conn: &C,
    event_id: &str,
    error: &str,
) -> Result<(), DbErr> {
    conn.execute_raw(Statement::from_sql_and_values(
        conn.get_database_backend(),
        "UPDATE webhook_events SET status = $1, error = $2, updated_at = $3, \
         attempts = attempts + 1 WHERE event_id = $4 AND status = $5",
        [
            EventStatus::Failed.as_str().into(),
            error.into(),
            Utc::now().into(),
            event_id.into(),
            EventStatus::Pending.as_str().into(),
        ],
    ))
    .await?;
    Ok(())
}
