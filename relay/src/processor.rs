//! Applying one bus message: in ONE transaction, update `contacts` and mark the event
//! `processed`. A message whose event is no longer `pending` changes nothing (re-delivery).
use chrono::Utc;
use entity::webhook_event::{self, STATUS_FAILED, STATUS_PENDING, STATUS_PROCESSED};
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DbErr, EntityTrait, QueryFilter, QuerySelect,
    TransactionTrait,
};
use serde_json::Value;
use tracing::Instrument;

use crate::bus::BusMessage;
use crate::event::HEADER_EVENT_ID;
use crate::projection::{self, Applied, ContactChange};

/// What handling a message did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// Applied (or recognised as older than what `contacts` holds) and marked `processed`.
    Processed(Applied),
    /// Its event was already processed or failed: a re-delivery, nothing changed.
    AlreadyDone,
}

/// Why a message was not handled.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// Worth retrying (database unavailable, a lost race...).
    #[error("transient: {0}")]
    Transient(#[from] DbErr),
    /// Will never succeed: dead-letter it.
    #[error("{0}")]
    Permanent(String),
}

/// Applies events to the database.
#[derive(Clone)]
pub struct EventProcessor {
    db: DatabaseConnection,
}

impl EventProcessor {
    pub fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }

    /// Handles one message in its own transaction; safe to call again with the same message.
    pub async fn handle(&self, message: &BusMessage) -> Result<Handled, ProcessError> {
        let txn = self.db.begin().await?;
        let handled = apply_message(&txn, message).await?; // an error drops (rolls back) txn
        txn.commit().await?;
        Ok(handled)
    }

    /// Handles `messages`, in order, in ONE transaction: one commit for the whole batch. A
    /// message that can never be applied is found out before anything is written for it, so it
    /// is marked `failed` in the same transaction and reported as `Err(reason)` (dead-letter
    /// it) while the others go on. A transient error rolls the whole batch back and is
    /// returned: retry the batch.
    pub async fn handle_batch(
        &self,
        messages: &[BusMessage],
    ) -> Result<Vec<Result<Handled, String>>, DbErr> {
        let txn = self.db.begin().await?;
        let mut outcomes = Vec::with_capacity(messages.len());
        for message in messages {
            let outcome = apply_message(&txn, message)
                .instrument(crate::consumer::span_for(message))
                .await;
            outcomes.push(match outcome {
                Ok(handled) => Ok(handled),
                Err(ProcessError::Permanent(error)) => {
                    mark_failed_on(&txn, message, &error).await?;
                    Err(error)
                }
                Err(ProcessError::Transient(error)) => return Err(error),
            });
        }
        txn.commit().await?;
        Ok(outcomes)
    }
}

/// Applies one message inside the caller's transaction, in as few statements as it can: the
/// event is claimed and marked `processed` by one UPDATE (which also locks it against a
/// concurrent re-delivery), then the contact is changed. Permanent failures are decided before
/// anything is written, so the transaction stays good for the next message of a batch.
async fn apply_message<C: ConnectionTrait>(
    conn: &C,
    message: &BusMessage,
) -> Result<Handled, ProcessError> {
    let payload: Value = serde_json::from_slice(&message.payload)
        .map_err(|e| ProcessError::Permanent(format!("payload is not JSON: {e}")))?;
    let change = match ContactChange::from_payload(&payload) {
        Ok(change) => change,
        Err(unappliable) => {
            let event_id = message
                .header(HEADER_EVENT_ID)
                .map(str::to_owned)
                .or_else(|| payload.get("id").and_then(Value::as_str).map(str::to_owned))
                .ok_or_else(|| ProcessError::Permanent("message carries no event id".into()))?;
            return match event_status(conn, &event_id).await? {
                Some(status) if status != STATUS_PENDING => Ok(Handled::AlreadyDone),
                Some(_) => Err(ProcessError::Permanent(unappliable.0)),
                None => Err(unknown_event(&event_id)),
            };
        }
    };

    let now = Utc::now();
    let claimed = webhook_event::Entity::update_many()
        .col_expr(webhook_event::Column::Status, Expr::value(STATUS_PROCESSED))
        .col_expr(webhook_event::Column::ProcessedAt, Expr::value(now))
        .col_expr(webhook_event::Column::UpdatedAt, Expr::value(now))
        .col_expr(
            webhook_event::Column::Error,
            Expr::value(Option::<String>::None),
        )
        .col_expr(
            webhook_event::Column::Attempts,
            Expr::col(webhook_event::Column::Attempts).add(1),
        )
        .filter(webhook_event::Column::EventId.eq(&change.event_id))
        .filter(webhook_event::Column::Status.eq(STATUS_PENDING))
        .exec(conn)
        .await?
        .rows_affected;
    if claimed == 0 {
        return match event_status(conn, &change.event_id).await? {
            Some(_) => Ok(Handled::AlreadyDone),
            None => Err(unknown_event(&change.event_id)),
        };
    }
    let applied = projection::apply(conn, &change).await?;
    Ok(Handled::Processed(applied))
}

async fn event_status<C: ConnectionTrait>(
    conn: &C,
    event_id: &str,
) -> Result<Option<String>, DbErr> {
    webhook_event::Entity::find()
        .select_only()
        .column(webhook_event::Column::Status)
        .filter(webhook_event::Column::EventId.eq(event_id))
        .into_tuple::<String>()
        .one(conn)
        .await
}

fn unknown_event(event_id: &str) -> ProcessError {
    ProcessError::Permanent(format!("unknown event id {event_id}"))
}

async fn mark_failed_on<C: ConnectionTrait>(
    conn: &C,
    message: &BusMessage,
    error: &str,
) -> Result<(), DbErr> {
    let Some(event_id) = message.header(HEADER_EVENT_ID) else {
        return Ok(());
    };
    let now = Utc::now();
    webhook_event::Entity::update_many()
        .col_expr(webhook_event::Column::Status, Expr::value(STATUS_FAILED))
        .col_expr(webhook_event::Column::Error, Expr::value(error))
        .col_expr(webhook_event::Column::UpdatedAt, Expr::value(now))
        .col_expr(
            webhook_event::Column::Attempts,
            Expr::col(webhook_event::Column::Attempts).add(1),
        )
        .filter(webhook_event::Column::EventId.eq(event_id))
        .filter(webhook_event::Column::Status.eq(STATUS_PENDING))
        .exec(conn)
        .await?;
    Ok(())
}
