//! Applying bus messages, a batch at a time: in ONE transaction and a few statements per batch,
//! claim the events (`pending` -> `processed`), apply them to `contacts`, mark the ones that can
//! never be applied `failed`, and (Kafka) record the partitions' next offsets. A message whose
//! event is no longer `pending` changes nothing (re-delivery).
use std::collections::{BTreeMap, BTreeSet};

use chrono::Utc;
use entity::{EventStatus, webhook_event};
use sea_orm::sea_query::{Expr, ExprTrait, LockType};
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbErr, EntityTrait, QueryFilter,
    QuerySelect, TransactionTrait,
};
use serde_json::Value;

use crate::bus::BusMessage;
use crate::error::{ErrorClass, Unappliable};
use crate::event::HEADER_EVENT_ID;
use crate::partitions::{Fenced, OffsetCommit};
use crate::projection::{self, Applied, ContactChange};
use crate::sql::one_of;

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
    /// The database failed; its [`ErrorClass`] says whether a retry can help.
    #[error("database: {0}")]
    Database(#[from] DbErr),
    /// Another member owns some of the batch's partitions now: drop them, do not retry.
    #[error(transparent)]
    Fenced(#[from] Fenced),
}

/// How many times in a row a batch may fail the same way (an error of class
/// [`ErrorClass::Other`]) before it is applied one message at a time.
pub const ISOLATE_AFTER: u32 = 3;

/// How a batch is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Apply {
    /// Every message in one go: a few statements for the whole batch.
    Whole,
    /// Each message under a savepoint of the one transaction: a message the database refuses
    /// (not for a transient reason) is failed with its error, the others are applied. For a
    /// batch that failed with a poison error; one statement round per message.
    OneByOne,
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
    let header_id = message.header(HEADER_EVENT_ID);
    // The payload's own id names the event when the header is missing and the payload fails.
    let payload_id = header_id
        .is_none()
        .then(|| payload.get("id").and_then(Value::as_str).map(str::to_owned))
        .flatten();
    match ContactChange::from_payload(payload) {
        Ok(change) => Parsed::Change(change),
        Err(unappliable) => Parsed::Unappliable {
            event_id: header_id.map(str::to_owned).or(payload_id),
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
            .apply_batch(std::slice::from_ref(message), None, Apply::Whole)
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
        how: Apply,
    ) -> Result<AppliedBatch, BatchError> {
        let parsed: Vec<Parsed> = messages.iter().map(parse).collect();
        let txn = self.db.begin().await?;
        let outcomes = match how {
            Apply::Whole => apply_parsed(&txn, &parsed).await?,
            Apply::OneByOne => apply_one_by_one(&txn, &parsed).await?,
        };
        if let Some(offsets) = offsets {
            offsets.write(&txn).await?;
        }
        Ok(AppliedBatch { txn, outcomes })
    }
}

/// [`Apply::OneByOne`]: each message under its own savepoint. A transient error ends the whole
/// batch (nothing written); any other refusal fails that message's event with the error.
async fn apply_one_by_one(
    txn: &DatabaseTransaction,
    parsed: &[Parsed],
) -> Result<Vec<Outcome>, DbErr> {
    let mut outcomes = Vec::with_capacity(parsed.len());
    for message in parsed {
        let savepoint = txn.begin().await?;
        match apply_parsed(&savepoint, std::slice::from_ref(message)).await {
            Ok(outcome) => {
                savepoint.commit().await?;
                outcomes.extend(outcome);
            }
            Err(error) if ErrorClass::of(&error).is_transient() => return Err(error),
            Err(error) => {
                savepoint.rollback().await?;
                outcomes.push(refuse(txn, message, &error).await?);
            }
        }
    }
    Ok(outcomes)
}

/// Fails the event of a message the database refused with `error` (when it is still pending).
async fn refuse(
    txn: &DatabaseTransaction,
    message: &Parsed,
    error: &DbErr,
) -> Result<Outcome, DbErr> {
    let event_id = match message {
        Parsed::Change(change) => Some(change.event_id.as_str()),
        Parsed::Unappliable { event_id, .. } => event_id.as_deref(),
    };
    let reason = Unappliable::Refused {
        class: ErrorClass::of(error),
        error: error.to_string(),
    };
    let Some(event_id) = event_id else {
        return Ok(Err(reason));
    };
    let events = lock_events(txn, &BTreeSet::from([event_id])).await?;
    match events.get(event_id) {
        Some(&(row, EventStatus::Pending)) => {
            mark_failed(txn, row, &reason.to_string()).await?;
            Ok(Err(reason))
        }
        Some(_) => Ok(Ok(Handled::AlreadyDone)),
        None => Ok(Err(Unappliable::UnknownEvent(event_id.to_owned()))),
    }
}

/// Applies `parsed` with a few statements for all of them (see [`EventProcessor::apply_batch`]).
async fn apply_parsed<C: ConnectionTrait>(
    txn: &C,
    parsed: &[Parsed],
) -> Result<Vec<Outcome>, DbErr> {
    // Every event of the batch, locked by its unique id, with its status as it is now.
    let ids: BTreeSet<&str> = parsed
        .iter()
        .filter_map(|p| match p {
            Parsed::Change(change) => Some(change.event_id.as_str()),
            Parsed::Unappliable { event_id, .. } => event_id.as_deref(),
        })
        .collect();
    let events = lock_events(txn, &ids).await?;
    let pending = |id: &str| events.get(id).is_some_and(|e| e.1 == EventStatus::Pending);

    // The pending events that can be applied are claimed; the rest changes nothing unless it
    // is pending and can never be applied (marked `failed`).
    let mut claimed: BTreeSet<&str> = BTreeSet::new();
    let mut to_apply: Vec<&ContactChange> = Vec::new();
    for p in parsed {
        if let Parsed::Change(change) = p
            && pending(&change.event_id)
            && claimed.insert(&change.event_id)
        {
            to_apply.push(change);
        }
    }
    claim(txn, claimed.iter().map(|id| events[*id].0)).await?;

    let mut applied: BTreeSet<&str> = BTreeSet::new();
    let mut failed_now: BTreeSet<&str> = BTreeSet::new();
    let mut decided: Vec<Result<Option<&str>, Unappliable>> = Vec::with_capacity(parsed.len());
    for p in parsed {
        decided.push(match p {
            Parsed::Change(change) if claimed.contains(change.event_id.as_str()) => {
                if applied.insert(&change.event_id) {
                    Ok(Some(change.event_id.as_str()))
                } else {
                    Ok(None) // the same event twice in one batch
                }
            }
            Parsed::Change(change) => match events.get(change.event_id.as_str()) {
                Some(_) => Ok(None),
                None => Err(Unappliable::UnknownEvent(change.event_id.clone())),
            },
            Parsed::Unappliable { event_id: None, .. } => Err(Unappliable::NoEventId),
            Parsed::Unappliable {
                event_id: Some(id),
                reason,
            } => match events.get(id.as_str()) {
                Some(&(row, EventStatus::Pending))
                    if !claimed.contains(id.as_str()) && failed_now.insert(id) =>
                {
                    mark_failed(txn, row, &reason.to_string()).await?;
                    Err(reason.clone())
                }
                Some(_) => Ok(None),
                None => Err(Unappliable::UnknownEvent(id.clone())),
            },
        });
    }

    let changed = projection::apply(txn, &to_apply).await?;
    Ok(decided
        .into_iter()
        .map(|d| {
            d.map(|claimed| match claimed {
                Some(id) if changed.contains(id) => Handled::Processed(Applied::Changed),
                Some(_) => Handled::Processed(Applied::Stale),
                None => Handled::AlreadyDone,
            })
        })
        .collect())
}

/// Locks the events among `ids` that exist (`FOR UPDATE`; SQLite has one writer at a time and the
/// query builder leaves the clause out there) and returns each one's row id and status.
///
/// The lookup is by the unique `event_id` alone, and the updates that follow go by primary key: a
/// `status = 'pending'` condition next to it lets the planner AND in a scan of the status index,
/// which reads every pending event and every dead version of one (a cost that grows with the
/// backlog and with the time since the last vacuum: 30 ms a batch at 195k events, found by a
/// 60 s run at 3000/s).
async fn lock_events<C: ConnectionTrait>(
    conn: &C,
    ids: &BTreeSet<&str>,
) -> Result<BTreeMap<String, (i64, EventStatus)>, DbErr> {
    if ids.is_empty() {
        return Ok(BTreeMap::new());
    }
    let rows: Vec<(i64, String, EventStatus)> = webhook_event::Entity::find()
        .select_only()
        .columns([
            webhook_event::Column::Id,
            webhook_event::Column::EventId,
            webhook_event::Column::Status,
        ])
        .filter(one_of(
            conn.get_database_backend(),
            webhook_event::Column::EventId,
            ids.iter().map(|id| (*id).to_owned()),
        ))
        .lock(LockType::Update)
        .into_tuple()
        .all(conn)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(id, event_id, status)| (event_id, (id, status)))
        .collect())
}

/// Marks the locked `pending` events `rows` processed, in one statement.
async fn claim<C: ConnectionTrait>(
    conn: &C,
    rows: impl IntoIterator<Item = i64>,
) -> Result<(), DbErr> {
    let rows: Vec<i64> = rows.into_iter().collect();
    if rows.is_empty() {
        return Ok(());
    }
    finish(conn, rows, EventStatus::Processed, None).await
}

/// Marks the locked `pending` event `row` failed with `error`.
async fn mark_failed<C: ConnectionTrait>(conn: &C, row: i64, error: &str) -> Result<(), DbErr> {
    finish(conn, vec![row], EventStatus::Failed, Some(error)).await
}

/// Ends one attempt of the events `rows` (by primary key) with `status` and `error`.
async fn finish<C: ConnectionTrait>(
    conn: &C,
    rows: Vec<i64>,
    status: EventStatus,
    error: Option<&str>,
) -> Result<(), DbErr> {
    let now = Utc::now();
    let mut update = webhook_event::Entity::update_many()
        .col_expr(webhook_event::Column::Status, Expr::value(status))
        .col_expr(webhook_event::Column::Error, Expr::value(error))
        .col_expr(webhook_event::Column::UpdatedAt, Expr::value(now))
        .col_expr(
            webhook_event::Column::Attempts,
            Expr::col(webhook_event::Column::Attempts).add(1),
        );
    if status == EventStatus::Processed {
        update = update.col_expr(webhook_event::Column::ProcessedAt, Expr::value(now));
    }
    update
        .filter(one_of(
            conn.get_database_backend(),
            webhook_event::Column::Id,
            rows,
        ))
        .exec(conn)
        .await?;
    Ok(())
}
