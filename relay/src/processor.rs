//! Applying one bus message: in ONE transaction, update `contacts` and mark the event
//! `processed`. A message whose event is no longer `pending` changes nothing (re-delivery).
use chrono::Utc;
use entity::webhook_event::{self, STATUS_FAILED, STATUS_PENDING, STATUS_PROCESSED};
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseBackend, DatabaseConnection, DatabaseTransaction, DbErr,
    EntityTrait, QueryFilter, QuerySelect, TransactionTrait,
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
        handle_on(&self.db, message).await
    }

    /// Handles `messages`, in order, in ONE transaction: one commit for the whole batch. Each
    /// message runs in a savepoint, so one that can never be applied is rolled back alone,
    /// marked `failed` in the same transaction and reported as `Err(reason)` (dead-letter it).
    /// A transient error rolls the whole batch back and is returned: retry the batch.
    pub async fn handle_batch(
        &self,
        messages: &[BusMessage],
    ) -> Result<Vec<Result<Handled, String>>, DbErr> {
        let txn = self.db.begin().await?;
        let mut outcomes = Vec::with_capacity(messages.len());
        for message in messages {
            let outcome = handle_on(&txn, message)
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

    /// Records a permanent failure on the event (when we know it).
    pub async fn mark_failed(&self, message: &BusMessage, error: &str) -> Result<(), DbErr> {
        mark_failed_on(&self.db, message, error).await
    }
}

/// Applies one message on `conn`: a transaction of its own, or a savepoint inside a batch.
async fn handle_on<C>(conn: &C, message: &BusMessage) -> Result<Handled, ProcessError>
where
    C: TransactionTrait<Transaction = DatabaseTransaction>,
{
    let payload: Value = serde_json::from_slice(&message.payload)
        .map_err(|e| ProcessError::Permanent(format!("payload is not JSON: {e}")))?;
    let change = ContactChange::from_payload(&payload).map_err(|e| ProcessError::Permanent(e.0));
    let event_id = match &change {
        Ok(change) => change.event_id.clone(),
        Err(_) => message
            .header(HEADER_EVENT_ID)
            .map(str::to_owned)
            .or_else(|| payload.get("id").and_then(Value::as_str).map(str::to_owned))
            .ok_or_else(|| ProcessError::Permanent("message carries no event id".into()))?,
    };

    let txn = conn.begin().await?;
    let mut find =
        webhook_event::Entity::find().filter(webhook_event::Column::EventId.eq(&event_id));
    if txn.get_database_backend() == DatabaseBackend::Postgres {
        find = find.lock_exclusive();
    }
    let Some(event) = find.one(&txn).await? else {
        return Err(ProcessError::Permanent(format!(
            "unknown event id {event_id}"
        )));
    };
    if event.status != STATUS_PENDING {
        txn.commit().await?;
        return Ok(Handled::AlreadyDone);
    }
    let change = change?;
    let applied = projection::apply(&txn, &change).await?;
    let now = Utc::now();
    webhook_event::Entity::update_many()
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
        .filter(webhook_event::Column::Id.eq(event.id))
        .exec(&txn)
        .await?;
    txn.commit().await?;
    Ok(Handled::Processed(applied))
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
