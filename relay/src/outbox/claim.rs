//! The relay's statements: claim due rows, mark them published, or record a failed publish.
use std::time::Duration;

use chrono::Utc;
use entity::outbox;
use entity::outbox::Column as O;
use sea_orm::prelude::Json;
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbErr, EntityTrait, FromQueryResult, QueryFilter, Statement,
};

use crate::sql::{one_of, skip_locked};

/// An outbox row claimed for publishing, with the payload to publish: the row's own copy if it
/// has one, otherwise its event's, as stored JSON text (it goes to the bus as it is, never parsed).
#[derive(Clone, Debug, PartialEq, FromQueryResult)]
pub struct ClaimedRow {
    pub id: i64,
    pub event_id: String,
    pub topic: String,
    pub message_key: String,
    /// JSON object of Kafka header name to string value.
    pub headers: Json,
    pub attempts: i32,
    pub payload: String,
}

/// Claims up to `limit` unpublished rows that are due, in `txn`, with their payloads; rows
/// another relay holds are skipped (`FOR UPDATE OF o SKIP LOCKED`: the outbox rows only, so the
/// consumer's claim of the events never waits for a relay; SQLite has one writer and no row
/// locks). A row's event is always there: retention deletes an event only after its last outbox
/// row.
pub async fn claim<C: ConnectionTrait>(txn: &C, limit: u64) -> Result<Vec<ClaimedRow>, DbErr> {
    let backend = txn.get_database_backend();
    // `ORDER BY` is the order of the partial index (next_attempt_at, id) WHERE published_at IS
    // NULL: a batch reads its rows off the index instead of sorting the whole backlog, and
    // finds each event by its unique id.
    let sql = format!(
        "SELECT o.id, o.event_id, o.topic, o.message_key, o.headers, o.attempts, \
           CAST(COALESCE(o.payload, e.payload) AS TEXT) AS payload \
         FROM outbox o JOIN webhook_events e ON e.event_id = o.event_id \
         WHERE o.published_at IS NULL AND o.next_attempt_at <= $1 \
         ORDER BY o.next_attempt_at, o.id LIMIT $2 {}",
        skip_locked(backend, "o")
    );
    ClaimedRow::find_by_statement(Statement::from_sql_and_values(
        backend,
        sql,
        [
            Utc::now().into(),
            i64::try_from(limit).unwrap_or(i64::MAX).into(),
        ],
    ))
    .all(txn)
    .await
}

/// Marks the rows `ids` published (delivered to the bus).
pub async fn mark_published<C: ConnectionTrait>(txn: &C, ids: Vec<i64>) -> Result<(), DbErr> {
    if ids.is_empty() {
        return Ok(());
    }
    outbox::Entity::update_many()
        .col_expr(O::PublishedAt, Expr::value(Utc::now()))
        .col_expr(O::Attempts, incremented(O::Attempts))
        .filter(one_of(txn.get_database_backend(), O::Id, ids))
        .exec(txn)
        .await?;
    Ok(())
}

/// Records a failed publish of row `id`: `error`, and the next attempt `retry_in` from now.
pub async fn mark_failed<C: ConnectionTrait>(
    txn: &C,
    id: i64,
    error: &str,
    retry_in: Duration,
) -> Result<(), DbErr> {
    outbox::Entity::update_many()
        .col_expr(O::Attempts, incremented(O::Attempts))
        .col_expr(O::LastError, Expr::value(error))
        .col_expr(O::NextAttemptAt, Expr::value(Utc::now() + retry_in))
        .filter(O::Id.eq(id))
        .exec(txn)
        .await?;
    Ok(())
}

/// `column + 1`.
fn incremented(column: outbox::Column) -> sea_orm::sea_query::Expr {
    Expr::col(column).add(1)
}
