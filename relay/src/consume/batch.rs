//! Applying bus messages, a batch at a time: in ONE transaction and a few statements per batch,
//! claim the events (`pending` -> `processed`), apply them to `contacts`, mark the ones that can
//! never be applied `failed`, and (Kafka) record the partitions' next offsets. A message whose
//! event is no longer `pending` changes nothing (re-delivery).
use std::collections::{BTreeMap, BTreeSet};

use entity::EventStatus;
use sea_orm::{ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbErr, TransactionTrait};
use serde_json::Value;

use super::error::{BatchError, ErrorClass, Unappliable};
use super::partitions::OffsetCommit;
use super::projection::{self, Applied};
use crate::bus::BusMessage;
use crate::event::{ContactEvent, HEADER_EVENT_ID};
use crate::webhook_events;

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
    Change(ContactEvent),
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
    match ContactEvent::parse_stored(payload) {
        Ok(change) => Parsed::Change(change),
        Err(fields) => Parsed::Unappliable {
            event_id: header_id.map(str::to_owned).or(payload_id),
            reason: Unappliable::Payload(fields),
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
    let event_id = message.event_id();
    let reason = Unappliable::Refused {
        class: ErrorClass::of(error),
        error: error.to_string(),
    };
    let Some(event_id) = event_id else {
        return Ok(Err(reason));
    };
    let events = webhook_events::lock(txn, &BTreeSet::from([event_id])).await?;
    match events.get(event_id) {
        Some(&(row, EventStatus::Pending)) => {
            webhook_events::mark_failed(txn, row, &reason.to_string()).await?;
            Ok(Err(reason))
        }
        Some(_) => Ok(Ok(Handled::AlreadyDone)),
        None => Ok(Err(Unappliable::UnknownEvent(event_id.to_owned()))),
    }
}

/// The events of a batch, locked, with their status as it is now.
type Locked = BTreeMap<String, (i64, EventStatus)>;

/// Applies `parsed` with a few statements for all of them (see [`EventProcessor::apply_batch`]):
/// claim the pending events that can be applied (one update), lock the batch's other events to
/// read their status (none, unless the batch holds re-deliveries or messages that cannot be
/// applied), fail the pending ones that never can, and apply the claimed changes to `contacts`.
async fn apply_parsed<C: ConnectionTrait>(
    txn: &C,
    parsed: &[Parsed],
) -> Result<Vec<Outcome>, DbErr> {
    let changes: BTreeSet<&str> = parsed
        .iter()
        .filter_map(|p| match p {
            Parsed::Change(change) => Some(change.event_id.as_str()),
            Parsed::Unappliable { .. } => None,
        })
        .collect();
    let claimed_rows = webhook_events::claim_pending(txn, &changes).await?;
    let others: BTreeSet<&str> = parsed
        .iter()
        .filter_map(Parsed::event_id)
        .filter(|id| !claimed_rows.contains_key(*id))
        .collect();
    let mut events = webhook_events::lock(txn, &others).await?;
    let (claimed, to_apply) = claimable(parsed, &claimed_rows);
    events.extend(
        claimed_rows
            .into_iter()
            .map(|(id, row)| (id, (row, EventStatus::Processed))),
    );
    let (decided, to_fail) = decide(parsed, &events, &claimed);
    for (row, reason) in to_fail {
        webhook_events::mark_failed(txn, row, &reason.to_string()).await?;
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

impl Parsed {
    fn event_id(&self) -> Option<&str> {
        match self {
            Parsed::Change(change) => Some(change.event_id.as_str()),
            Parsed::Unappliable { event_id, .. } => event_id.as_deref(),
        }
    }
}

/// The claimed events of `parsed` (each once), and their changes: the first message of each.
fn claimable<'a>(
    parsed: &'a [Parsed],
    claimed_rows: &BTreeMap<String, i64>,
) -> (BTreeSet<&'a str>, Vec<&'a ContactEvent>) {
    let mut claimed: BTreeSet<&str> = BTreeSet::new();
    let mut to_apply: Vec<&ContactEvent> = Vec::new();
    for p in parsed {
        if let Parsed::Change(change) = p
            && claimed_rows.contains_key(&change.event_id)
            && claimed.insert(&change.event_id)
        {
            to_apply.push(change);
        }
    }
    (claimed, to_apply)
}

/// What each message comes to: `Ok(Some(id))` its claimed event (the first message of it),
/// `Ok(None)` nothing to do, `Err` a reason it can never be applied. Also the pending events to
/// mark `failed` now (row id and reason), each once.
#[allow(clippy::type_complexity)]
fn decide<'a>(
    parsed: &'a [Parsed],
    events: &Locked,
    claimed: &BTreeSet<&'a str>,
) -> (
    Vec<Result<Option<&'a str>, Unappliable>>,
    Vec<(i64, Unappliable)>,
) {
    let mut applied: BTreeSet<&str> = BTreeSet::new();
    let mut failed_now: BTreeSet<&str> = BTreeSet::new();
    let mut to_fail = Vec::new();
    let decided = parsed
        .iter()
        .map(|p| match p {
            Parsed::Change(change) if claimed.contains(change.event_id.as_str()) => {
                // The same event twice in one batch is applied once.
                Ok(applied
                    .insert(&change.event_id)
                    .then_some(change.event_id.as_str()))
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
                    to_fail.push((row, reason.clone()));
                    Err(reason.clone())
                }
                Some(_) => Ok(None),
                None => Err(Unappliable::UnknownEvent(id.clone())),
            },
        })
        .collect();
    (decided, to_fail)
}
