//! The relay's statements: claim due rows, mark them published, or record a failed publish.
use std::time::Duration;

use chrono::Utc;
use entity::outbox;
use entity::outbox::Column as O;
use sea_orm::sea_query::{Expr, ExprTrait, LockBehavior, LockType};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbErr, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
};

use crate::sql::one_of;

/// Claims up to `limit` unpublished rows that are due, in `txn`; rows another relay holds are
/// skipped (`FOR UPDATE SKIP LOCKED`; SQLite has one writer and no row locks).
pub async fn claim<C: ConnectionTrait>(txn: &C, limit: u64) -> Result<Vec<outbox::Model>, DbErr> {
    outbox::Entity::find()
        .filter(O::PublishedAt.is_null())
        .filter(O::NextAttemptAt.lte(Utc::now()))
        // The order of the partial index (next_attempt_at, id) WHERE published_at IS NULL:
        // a batch reads its rows off the index instead of sorting the whole backlog.
        .order_by_asc(O::NextAttemptAt)
        .order_by_asc(O::Id)
        .limit(limit)
        .lock_with_behavior(LockType::Update, LockBehavior::SkipLocked)
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
