//! The `webhook_events` table: every statement on it but the ingest insert, which shares one
//! statement with the event's outbox row (`outbox::store_events`), and the SQL of the outbox's
//! own statements that read an event's status.
//!
//! Who calls what: the admin API (and the console) finds, lists, counts and retries events
//! ([`find`], [`list`], [`count_failed_matching`], [`requeue_one`], [`requeue_failed`]) and sums
//! up what arrived and failed ([`count_received`], [`failed_summary`]); the consumer claims the
//! pending events of a batch ([`claim_pending`]), locks the others to read their status
//! ([`lock`]) and fails what can never be applied ([`mark_failed`]); retention deletes old processed ones
//! ([`prune_processed`]); the backlog counts what waits ([`unprocessed`], [`count_failed`]).
use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use entity::{EventStatus, EventType, webhook_event};
use sea_orm::sea_query::{Expr, ExprTrait, Keyword, LockBehavior, LockType, Query};
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, DatabaseConnection, DbErr, EntityTrait,
    FromQueryResult, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, QueryTrait, Statement,
    TransactionTrait, UpdateMany,
};

use crate::config::KafkaConfig;
use crate::outbox::{self, NewEvent};
use crate::sql::{PruneCursor, one_of, skip_locked};

use webhook_event::Column as E;

/// Which events: each set field narrows the set.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub status: Option<EventStatus>,
    pub event_type: Option<EventType>,
    /// Received at or after.
    pub since: Option<DateTime<Utc>>,
    /// Received before.
    pub until: Option<DateTime<Utc>>,
    /// This one event.
    pub event_id: Option<String>,
    /// The events of this contact (no index of its own: the newest-first scan stops at a page).
    pub contact_id: Option<String>,
}

impl Filter {
    fn condition(&self) -> Condition {
        Condition::all()
            .add_option(self.status.map(|s| E::Status.eq(s)))
            .add_option(self.event_type.map(|t| E::EventType.eq(t)))
            .add_option(self.since.map(|t| E::CreatedAt.gte(t)))
            .add_option(self.until.map(|t| E::CreatedAt.lt(t)))
            .add_option(self.event_id.as_deref().map(|id| E::EventId.eq(id)))
            .add_option(self.contact_id.as_deref().map(|id| E::ContactId.eq(id)))
    }
}

/// The event with this id.
pub async fn find<C: ConnectionTrait>(
    conn: &C,
    event_id: &str,
) -> Result<Option<webhook_event::Model>, DbErr> {
    webhook_event::Entity::find()
        .filter(E::EventId.eq(event_id))
        .one(conn)
        .await
}

/// Up to `limit` events matching `filter`, newest first, received before the row `before`
/// (keyset paging by primary key).
pub async fn list<C: ConnectionTrait>(
    conn: &C,
    filter: &Filter,
    before: Option<i64>,
    limit: u64,
) -> Result<Vec<webhook_event::Model>, DbErr> {
    webhook_event::Entity::find()
        .filter(filter.condition())
        .filter(Condition::all().add_option(before.map(|id| E::Id.lt(id))))
        .order_by_desc(E::Id)
        .limit(limit)
        .all(conn)
        .await
}

/// How many `failed` events match `filter` (what [`requeue_failed`] would re-queue now).
pub async fn count_failed_matching<C: ConnectionTrait>(
    conn: &C,
    filter: &Filter,
) -> Result<u64, DbErr> {
    webhook_event::Entity::find()
        .filter(E::Status.eq(EventStatus::Failed))
        .filter(filter.condition())
        .count(conn)
        .await
}

/// How many events were received in `[since, until)` (a range of the `created_at` index).
pub async fn count_received<C: ConnectionTrait>(
    conn: &C,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Result<u64, DbErr> {
    webhook_event::Entity::find()
        .filter(E::CreatedAt.gte(since))
        .filter(E::CreatedAt.lt(until))
        .count(conn)
        .await
}

/// The `failed` events: how many, how many failed at or after `recent`, and when the one that
/// has waited longest failed.
#[derive(Debug, Clone, Default, FromQueryResult)]
pub struct FailedSummary {
    pub failed: i64,
    pub failed_recently: i64,
    pub oldest_failed_at: Option<DateTime<Utc>>,
}

/// [`FailedSummary`] of the failed events (a range of the status index: failed events are few).
pub async fn failed_summary(
    db: &DatabaseConnection,
    recent: DateTime<Utc>,
) -> Result<FailedSummary, DbErr> {
    let found = FailedSummary::find_by_statement(Statement::from_sql_and_values(
        db.get_database_backend(),
        "SELECT COUNT(*) AS failed, \
           CAST(COALESCE(SUM(CASE WHEN updated_at >= $1 THEN 1 ELSE 0 END), 0) AS BIGINT) \
             AS failed_recently, \
           MIN(updated_at) AS oldest_failed_at \
         FROM webhook_events WHERE status = $2",
        [recent.into(), EventStatus::Failed.as_str().into()],
    ))
    .one(db)
    .await?;
    Ok(found.unwrap_or_default())
}

/// [`requeue_failed`] for the one event `event_id`.
pub async fn requeue_one(
    db: &DatabaseConnection,
    kafka: &KafkaConfig,
    event_id: &str,
) -> Result<u64, DbErr> {
    requeue(db, kafka, E::EventId.eq(event_id)).await
}

/// Sets the `failed` events matching `filter` back to `pending` and gives each a new outbox
/// row, in one transaction. Returns how many were re-queued.
pub async fn requeue_failed(
    db: &DatabaseConnection,
    kafka: &KafkaConfig,
    filter: &Filter,
) -> Result<u64, DbErr> {
    requeue(db, kafka, filter.condition()).await
}

async fn requeue(
    db: &DatabaseConnection,
    kafka: &KafkaConfig,
    condition: impl sea_orm::sea_query::IntoCondition,
) -> Result<u64, DbErr> {
    let txn = db.begin().await?;
    // SQLite's query builder leaves the row lock out: one writer there.
    let events = webhook_event::Entity::find()
        .filter(E::Status.eq(EventStatus::Failed))
        .filter(condition)
        .lock_with_behavior(LockType::Update, LockBehavior::SkipLocked)
        .all(&txn)
        .await?;
    if events.is_empty() {
        txn.commit().await?;
        return Ok(0);
    }
    webhook_event::Entity::update_many()
        .col_expr(E::Status, Expr::value(EventStatus::Pending.as_str()))
        .col_expr(E::Error, Expr::value(Option::<String>::None))
        .col_expr(E::UpdatedAt, Expr::value(Utc::now()))
        .filter(one_of(
            txn.get_database_backend(),
            E::Id,
            events.iter().map(|e| e.id),
        ))
        .exec(&txn)
        .await?;
    let new: Vec<NewEvent<'_>> = events.iter().map(NewEvent::from).collect();
    outbox::enqueue(&txn, kafka, &new).await?;
    txn.commit().await?;
    tracing::info!(requeued = events.len(), "failed events re-queued");
    Ok(events.len() as u64)
}

/// Locks the events among `ids` that exist (`FOR UPDATE`; SQLite has one writer at a time and the
/// query builder leaves the clause out there) and returns each one's row id and status.
///
/// The lookup is by the unique `event_id` alone, and the updates that follow go by primary key: a
/// `status = 'pending'` condition next to it lets the planner AND in a scan of the status index,
/// which reads every pending event and every dead version of one (a cost that grows with the
/// backlog and with the time since the last vacuum: 30 ms a batch at 195k events, found by a
/// 60 s run at 3000/s).
pub async fn lock<C: ConnectionTrait>(
    conn: &C,
    ids: &BTreeSet<&str>,
) -> Result<BTreeMap<String, (i64, EventStatus)>, DbErr> {
    if ids.is_empty() {
        return Ok(BTreeMap::new());
    }
    let rows: Vec<(i64, String, EventStatus)> = webhook_event::Entity::find()
        .select_only()
        .columns([E::Id, E::EventId, E::Status])
        .filter(one_of(
            conn.get_database_backend(),
            E::EventId,
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

/// Claims the `pending` events among `ids`: marks them processed in ONE statement and returns
/// the row id of each one it claimed, by event id. The update takes the row locks itself (held to
/// the end of the transaction), so the consumer writes each event once; a `SELECT ... FOR UPDATE`
/// first would write every row twice (the lock, then the new version). An event another
/// transaction holds is waited for and then, no longer pending, left out.
///
/// The status condition is written `(status = 'pending') IS TRUE`, which no index can answer, so
/// the planner never ANDs in a scan of the status index (see [`lock`]).
pub async fn claim_pending<C: ConnectionTrait>(
    conn: &C,
    ids: &BTreeSet<&str>,
) -> Result<BTreeMap<String, i64>, DbErr> {
    if ids.is_empty() {
        return Ok(BTreeMap::new());
    }
    let mut update = ended(EventStatus::Processed, None)
        .filter(one_of(
            conn.get_database_backend(),
            E::EventId,
            ids.iter().map(|id| (*id).to_owned()),
        ))
        .filter(Expr::expr(E::Status.eq(EventStatus::Pending)).is(Keyword::Custom("TRUE".into())))
        .into_query();
    update.returning(Query::returning().columns([E::EventId, E::Id]));
    conn.query_all(&update)
        .await?
        .iter()
        .map(|row| {
            Ok((
                row.try_get_by_index::<String>(0)?,
                row.try_get_by_index::<i64>(1)?,
            ))
        })
        .collect()
}

/// Marks the locked `pending` event `row` failed with `error`.
pub async fn mark_failed<C: ConnectionTrait>(conn: &C, row: i64, error: &str) -> Result<(), DbErr> {
    ended(EventStatus::Failed, Some(error))
        .filter(E::Id.eq(row))
        .exec(conn)
        .await?;
    Ok(())
}

/// The update that ends one attempt of an event with `status` and `error` (rows still to pick).
fn ended(status: EventStatus, error: Option<&str>) -> UpdateMany<webhook_event::Entity> {
    let now = Utc::now();
    let update = webhook_event::Entity::update_many()
        .col_expr(E::Status, Expr::value(status))
        .col_expr(E::Error, Expr::value(error))
        .col_expr(E::UpdatedAt, Expr::value(now))
        .col_expr(E::Attempts, Expr::col(E::Attempts).add(1));
    if status == EventStatus::Processed {
        update.col_expr(E::ProcessedAt, Expr::value(now))
    } else {
        update
    }
}

/// Deletes, in `txn`, at most `limit` events processed and received before `cutoff`, after
/// `cursor`, that have no outbox row left; rows locked by anyone else are skipped. Returns how
/// many were deleted and where the next batch starts.
pub async fn prune_processed<C: ConnectionTrait>(
    txn: &C,
    cutoff: DateTime<Utc>,
    cursor: PruneCursor,
    limit: u64,
) -> Result<(u64, PruneCursor), DbErr> {
    let backend = txn.get_database_backend();
    let lock = skip_locked(backend, "e");
    // Ordered by the index (status, created_at, id); `$n` placeholders are understood by
    // both PostgreSQL and SQLite.
    let statement = Statement::from_sql_and_values(
        backend,
        format!(
            "WITH doomed AS ( \
               SELECT e.id FROM webhook_events e \
               WHERE e.status = $1 AND e.created_at < $2 AND e.processed_at < $2 \
                 AND (e.created_at, e.id) > ($3, $4) \
                 AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.event_id = e.event_id) \
               ORDER BY e.created_at, e.id LIMIT $5 {lock}) \
             DELETE FROM webhook_events WHERE id IN (SELECT id FROM doomed) \
             RETURNING created_at, id"
        ),
        [
            EventStatus::Processed.as_str().into(),
            cutoff.into(),
            cursor.at.into(),
            cursor.id.into(),
            i64::try_from(limit).unwrap_or(i64::MAX).into(),
        ],
    );
    let rows = txn.query_all_raw(statement).await?;
    Ok((rows.len() as u64, cursor.after(&rows)?))
}

/// Acknowledged events not processed yet.
#[derive(Debug, Clone, Default, FromQueryResult)]
pub struct Unprocessed {
    /// How many are `pending`.
    pub unprocessed: i64,
    /// When the oldest of them was received.
    pub oldest: Option<DateTime<Utc>>,
    /// Of those, how many the relay's safety net published again at least once.
    pub republished: i64,
}

/// The `pending` events: how many, the oldest, how many were re-published.
pub async fn unprocessed(db: &DatabaseConnection) -> Result<Unprocessed, DbErr> {
    let found = Unprocessed::find_by_statement(Statement::from_sql_and_values(
        db.get_database_backend(),
        "SELECT COUNT(*) AS unprocessed, MIN(created_at) AS oldest, \
           (SELECT COUNT(DISTINCT o.event_id) FROM outbox o JOIN webhook_events e \
              ON e.event_id = o.event_id WHERE o.republished > 0 AND e.status = $1) AS republished \
         FROM webhook_events WHERE status = $2",
        [
            EventStatus::Pending.as_str().into(),
            EventStatus::Pending.as_str().into(),
        ],
    ))
    .one(db)
    .await?;
    Ok(found.unwrap_or_default())
}

/// How many events are `failed`, waiting for an operator's retry (an index-only count).
pub async fn count_failed(db: &DatabaseConnection) -> Result<u64, DbErr> {
    webhook_event::Entity::find()
        .filter(E::Status.eq(EventStatus::Failed))
        .count(db)
        .await
}
