//! The `outbox` table and every statement on it: rows are written inside the caller's
//! transaction ([`store_events`], [`enqueue`], [`requeue_failed`]), claimed and marked by the
//! relay ([`claim`], [`mark_published`], [`mark_failed`]), re-queued by the safety net
//! ([`republish_pending`]), summed up for operators ([`backlog`]) and pruned by retention
//! ([`prune_published`]).
//!
//! What a row says is decided once, by [`OutboxMessage::of`]: the topic
//! (`<prefix>.<event type>`), the key (the contact id), the payload as stored, and the headers.
pub mod backlog;

use std::collections::HashSet;
use std::sync::LazyLock;
use std::time::Duration;

use chrono::{DateTime, Utc};
use entity::outbox::Column as O;
use entity::{EventStatus, EventType, outbox, webhook_event};
use sea_orm::sea_query::{
    Expr, ExprTrait, IntoCondition, LockBehavior, LockType, OnConflict, Query,
};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseBackend, DatabaseConnection, DbErr, EntityName,
    EntityTrait, Iden, QueryFilter, QueryOrder, QuerySelect, Statement, TransactionTrait,
};
use serde::Serialize;
use serde_json::{Value, json};

pub use backlog::{Backlog, PartitionView, TopicBacklog, backlog, refresh_backlog_gauges};

use crate::config::KafkaConfig;
use crate::event::{ContactEvent, HEADER_EVENT_ID, HEADER_EVENT_TYPE};
use crate::sql::one_of;
use crate::wakeup::NOTIFY_CHANNEL;

/// An event to store or re-queue, as the outbox needs it.
#[derive(Debug, Clone, Copy)]
pub struct NewEvent<'a> {
    pub event_id: &'a str,
    pub event_type: EventType,
    pub contact_id: &'a str,
    pub payload: &'a Value,
}

impl<'a> From<&'a ContactEvent> for NewEvent<'a> {
    fn from(e: &'a ContactEvent) -> Self {
        Self {
            event_id: &e.event_id,
            event_type: e.event_type,
            contact_id: &e.contact_id,
            payload: &e.payload,
        }
    }
}

impl<'a> From<&'a webhook_event::Model> for NewEvent<'a> {
    fn from(e: &'a webhook_event::Model) -> Self {
        Self {
            event_id: &e.event_id,
            event_type: e.event_type,
            contact_id: &e.contact_id,
            payload: &e.payload,
        }
    }
}

/// What an outbox row carries to the bus.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutboxMessage {
    pub topic: String,
    /// The contact id: one contact's events stay in one partition, in order.
    pub key: String,
    pub payload: Value,
    /// Header name to string value.
    pub headers: Value,
}

impl OutboxMessage {
    /// The message of `event`: the one place the topic rule and the headers are written.
    pub fn of(kafka: &KafkaConfig, event: &NewEvent<'_>) -> Self {
        Self {
            topic: kafka.topic_for(event.event_type.as_str()),
            key: event.contact_id.to_owned(),
            payload: event.payload.clone(),
            headers: json!({
                HEADER_EVENT_ID: event.event_id,
                HEADER_EVENT_TYPE: event.event_type.as_str(),
            }),
        }
    }
}

/// Inserts the events that are new (by `event_id`) as `pending`, each with its outbox row, on
/// `conn` (normally the caller's transaction), and notifies the relays. Returns the ids that
/// were new; a repeated id, in `events` or in the table, is not.
pub async fn store_events<C: ConnectionTrait>(
    conn: &C,
    kafka: &KafkaConfig,
    events: &[NewEvent<'_>],
) -> Result<HashSet<String>, DbErr> {
    // Event-id order: two concurrent batches wait for each other's unique-index entries in the
    // same order and cannot deadlock. The first occurrence of a repeated id is the one stored.
    let mut seen = HashSet::new();
    let mut unique: Vec<&NewEvent<'_>> =
        events.iter().filter(|e| seen.insert(e.event_id)).collect();
    unique.sort_by_key(|e| e.event_id);
    if unique.is_empty() {
        return Ok(HashSet::new());
    }
    let inserted = if conn.get_database_backend() == DatabaseBackend::Postgres {
        store_postgres(conn, kafka, &unique).await?
    } else {
        store_portable(conn, kafka, &unique).await?
    };
    if !inserted.is_empty() {
        notify_relays(conn).await?;
    }
    Ok(inserted)
}

/// The statement of `store_postgres`: $1 the batch document, $2 the time.
static BATCH_INSERT_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH batch AS (SELECT * FROM jsonb_to_recordset($1::jsonb) \
           AS b(event_id text, event_type text, contact_id text, payload jsonb, \
                topic text, headers jsonb)), \
         new_events AS (INSERT INTO webhook_events \
           (event_id, event_type, contact_id, payload, status, created_at, updated_at) \
           SELECT event_id, event_type, contact_id, payload, '{pending}', $2, $2 \
           FROM batch ORDER BY event_id \
           ON CONFLICT (event_id) DO NOTHING \
           RETURNING event_id) \
         INSERT INTO outbox (event_id, topic, message_key, payload, headers, created_at, next_attempt_at) \
         SELECT b.event_id, b.topic, b.contact_id, b.payload, b.headers, $2, $2 \
         FROM new_events n JOIN batch b ON b.event_id = n.event_id \
         ORDER BY b.event_id RETURNING event_id",
        pending = EventStatus::Pending.as_str(),
    )
});

/// One row of the batch document `store_postgres` sends (ids are unique within it).
#[derive(Serialize)]
struct BatchRow<'a> {
    event_id: &'a str,
    event_type: &'static str,
    contact_id: &'a str,
    payload: &'a Value,
    topic: String,
    headers: Value,
}

/// PostgreSQL: ONE statement of a fixed shape, whatever the batch size, so every connection
/// prepares and plans it once. The batch travels as one JSON document; each event that was new
/// gets its outbox row from it on the server. The one backend fork of the outbox (benchmarked:
/// see docs/benchmarks.md).
async fn store_postgres<C: ConnectionTrait>(
    conn: &C,
    kafka: &KafkaConfig,
    events: &[&NewEvent<'_>],
) -> Result<HashSet<String>, DbErr> {
    let rows: Vec<BatchRow<'_>> = events
        .iter()
        .map(|e| {
            let message = OutboxMessage::of(kafka, e);
            BatchRow {
                event_id: e.event_id,
                event_type: e.event_type.as_str(),
                contact_id: e.contact_id,
                payload: e.payload,
                topic: message.topic,
                headers: message.headers,
            }
        })
        .collect();
    let batch = serde_json::to_string(&rows).map_err(|e| DbErr::Custom(e.to_string()))?;
    conn.query_all_raw(Statement::from_sql_and_values(
        DatabaseBackend::Postgres,
        BATCH_INSERT_SQL.as_str(),
        [batch.into(), Utc::now().into()],
    ))
    .await?
    .iter()
    .map(|row| row.try_get::<String>("", "event_id"))
    .collect()
}

/// Any other database (SQLite): a multi-row insert of the events, then of the new ones' outbox
/// rows.
async fn store_portable<C: ConnectionTrait>(
    conn: &C,
    kafka: &KafkaConfig,
    events: &[&NewEvent<'_>],
) -> Result<HashSet<String>, DbErr> {
    let now = Utc::now();
    use webhook_event::Column as E;
    let mut insert = Query::insert();
    insert
        .into_table(webhook_event::Entity.table_ref())
        .columns([
            E::EventId,
            E::EventType,
            E::ContactId,
            E::Payload,
            E::Status,
            E::CreatedAt,
            E::UpdatedAt,
        ])
        .on_conflict(OnConflict::column(E::EventId).do_nothing().to_owned())
        .returning_col(E::EventId);
    for e in events {
        insert.values_panic([
            e.event_id.into(),
            e.event_type.as_str().into(),
            e.contact_id.into(),
            e.payload.clone().into(),
            EventStatus::Pending.as_str().into(),
            now.into(),
            now.into(),
        ]);
    }
    let inserted: HashSet<String> = conn
        .query_all(&insert)
        .await?
        .iter()
        .map(|row| row.try_get::<String>("", &E::EventId.to_string()))
        .collect::<Result<_, _>>()?;
    let new: Vec<NewEvent<'_>> = events
        .iter()
        .filter(|e| inserted.contains(e.event_id))
        .map(|e| **e)
        .collect();
    insert_rows(conn, kafka, &new).await?;
    Ok(inserted)
}

/// Adds one outbox row per event on `conn` (the caller's transaction) and notifies the relays
/// (delivered at commit).
pub async fn enqueue<C: ConnectionTrait>(
    conn: &C,
    kafka: &KafkaConfig,
    events: &[NewEvent<'_>],
) -> Result<(), DbErr> {
    if insert_rows(conn, kafka, events).await? {
        notify_relays(conn).await?;
    }
    Ok(())
}

/// Inserts one outbox row per event; whether there was any.
async fn insert_rows<C: ConnectionTrait>(
    conn: &C,
    kafka: &KafkaConfig,
    events: &[NewEvent<'_>],
) -> Result<bool, DbErr> {
    if events.is_empty() {
        return Ok(false);
    }
    let now = Utc::now();
    let mut insert = Query::insert();
    insert.into_table(outbox::Entity.table_ref()).columns([
        O::EventId,
        O::Topic,
        O::MessageKey,
        O::Payload,
        O::Headers,
        O::CreatedAt,
        O::NextAttemptAt,
    ]);
    for event in events {
        let message = OutboxMessage::of(kafka, event);
        insert.values_panic([
            event.event_id.into(),
            message.topic.into(),
            message.key.into(),
            message.payload.into(),
            message.headers.into(),
            now.into(),
            now.into(),
        ]);
    }
    conn.execute(&insert).await?;
    Ok(true)
}

/// On Postgres, wakes the relays: the notification is delivered when the transaction commits.
async fn notify_relays<C: ConnectionTrait>(conn: &C) -> Result<(), DbErr> {
    if conn.get_database_backend() == DatabaseBackend::Postgres {
        conn.execute_raw(Statement::from_string(
            DatabaseBackend::Postgres,
            format!("NOTIFY {NOTIFY_CHANNEL}"),
        ))
        .await?;
    }
    Ok(())
}

/// Sets the `failed` events matching `filter` back to `pending` and gives each a new outbox
/// row, in one transaction. Returns how many were re-queued.
pub async fn requeue_failed(
    db: &DatabaseConnection,
    kafka: &KafkaConfig,
    filter: impl IntoCondition,
) -> Result<u64, DbErr> {
    let txn = db.begin().await?;
    // SQLite's query builder leaves the row lock out: one writer there.
    let events = webhook_event::Entity::find()
        .filter(webhook_event::Column::Status.eq(EventStatus::Failed))
        .filter(filter)
        .lock_with_behavior(LockType::Update, LockBehavior::SkipLocked)
        .all(&txn)
        .await?;
    if events.is_empty() {
        txn.commit().await?;
        return Ok(0);
    }
    webhook_event::Entity::update_many()
        .col_expr(
            webhook_event::Column::Status,
            Expr::value(EventStatus::Pending.as_str()),
        )
        .col_expr(
            webhook_event::Column::Error,
            Expr::value(Option::<String>::None),
        )
        .col_expr(webhook_event::Column::UpdatedAt, Expr::value(Utc::now()))
        .filter(one_of(
            txn.get_database_backend(),
            webhook_event::Column::Id,
            events.iter().map(|e| e.id),
        ))
        .exec(&txn)
        .await?;
    let new: Vec<NewEvent<'_>> = events.iter().map(NewEvent::from).collect();
    enqueue(&txn, kafka, &new).await?;
    txn.commit().await?;
    tracing::info!(requeued = events.len(), "failed events re-queued");
    Ok(events.len() as u64)
}

/// The outbox rows of one event, oldest first: its publish history.
pub async fn rows_of_event<C: ConnectionTrait>(
    conn: &C,
    event_id: &str,
) -> Result<Vec<outbox::Model>, DbErr> {
    outbox::Entity::find()
        .filter(O::EventId.eq(event_id))
        .order_by_asc(O::Id)
        .all(conn)
        .await
}

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

/// The longest the safety net waits between two re-publishes of one event.
pub const REPUBLISH_MAX_INTERVAL: Duration = Duration::from_secs(24 * 3600);

/// Makes the newest outbox row of events that are still `pending`, and whose rows were all
/// delivered long enough ago, unpublished again with `reason` as its last error, so the next
/// batch publishes it once more (processing is idempotent). "Long enough" doubles with each
/// re-publish of the row: `delivered_before * 2^republished`, at most a day, so an event that
/// cannot be processed is re-sent a few times a day, not every sweep. Only the newest row of an
/// event counts: an admin retry adds one. At most `limit` rows per call; returns how many were
/// re-queued.
///
/// Two users: the relay's safety net against messages lost on the bus, and embedded mode at
/// start (`Duration::ZERO`), because the in-process bus forgets its queue when the process stops.
pub async fn republish_pending(
    db: &DatabaseConnection,
    delivered_before: Duration,
    reason: &str,
    limit: u64,
) -> Result<u64, DbErr> {
    let now = Utc::now();
    let cutoff = now - delivered_before;
    let backend = db.get_database_backend();
    // `$n` placeholders are understood by both PostgreSQL and SQLite.
    let candidates = db
        .query_all_raw(Statement::from_sql_and_values(
            backend,
            "SELECT id, published_at, republished FROM outbox WHERE id IN ( \
               SELECT MAX(o.id) FROM outbox o JOIN webhook_events e ON e.event_id = o.event_id \
               WHERE e.status = $1 AND e.created_at <= $2 \
               GROUP BY o.event_id \
               HAVING SUM(CASE WHEN o.published_at IS NULL THEN 1 ELSE 0 END) = 0 \
                  AND MAX(o.published_at) <= $3) \
             ORDER BY id LIMIT $4",
            [
                EventStatus::Pending.as_str().into(),
                cutoff.into(),
                cutoff.into(),
                i64::try_from(limit).unwrap_or(i64::MAX).into(),
            ],
        ))
        .await?;
    let mut due = Vec::new();
    for row in candidates {
        let id: i64 = row.try_get_by_index(0)?;
        let published_at: Option<DateTime<Utc>> = row.try_get_by_index(1)?;
        let republished: i32 = row.try_get_by_index(2)?;
        let wait = republish_wait(delivered_before, republished);
        if published_at.is_some_and(|at| at + wait <= now) {
            due.push(id);
        }
    }
    if due.is_empty() {
        return Ok(0);
    }
    let result = outbox::Entity::update_many()
        .col_expr(O::PublishedAt, Expr::value(Option::<DateTime<Utc>>::None))
        .col_expr(O::NextAttemptAt, Expr::value(now))
        .col_expr(O::LastError, Expr::value(reason))
        .col_expr(O::Republished, incremented(O::Republished))
        .filter(one_of(backend, O::Id, due))
        .exec(db)
        .await?;
    Ok(result.rows_affected)
}

/// How long after its delivery a row re-published `republished` times is published again.
pub fn republish_wait(after: Duration, republished: i32) -> Duration {
    let doublings = Ord::min(u32::try_from(republished).unwrap_or(0), 20);
    after
        .saturating_mul(1 << doublings)
        .min(REPUBLISH_MAX_INTERVAL.max(after))
}

/// Where the next batch of a pruning run starts: after the last row the previous batch deleted
/// (its time, then id, in the order of the index the run walks), so a batch never walks the
/// index entries of rows deleted before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PruneCursor {
    pub at: DateTime<Utc>,
    pub id: i64,
}

impl PruneCursor {
    pub const START: Self = Self {
        at: DateTime::UNIX_EPOCH,
        id: 0,
    };

    /// The cursor after `rows` (each `(time, id)`, as a pruning statement returns them).
    pub fn after(self, rows: &[sea_orm::QueryResult]) -> Result<Self, DbErr> {
        let mut next = self;
        for row in rows {
            let at = Self {
                at: row.try_get_by_index(0)?,
                id: row.try_get_by_index(1)?,
            };
            next = next.max(at);
        }
        Ok(next)
    }
}

/// Deletes, in `txn`, at most `limit` rows published before `cutoff` and after `cursor` whose
/// event no longer needs them (it is `processed`, or gone); rows locked by anyone else are
/// skipped. Returns how many were deleted and where the next batch starts.
pub async fn prune_published<C: ConnectionTrait>(
    txn: &C,
    cutoff: DateTime<Utc>,
    cursor: PruneCursor,
    limit: u64,
) -> Result<(u64, PruneCursor), DbErr> {
    let backend = txn.get_database_backend();
    // SQLite (embedded mode) has one writer and no row locks: the same statement without them.
    let lock = if backend == DatabaseBackend::Postgres {
        "FOR UPDATE OF o SKIP LOCKED"
    } else {
        ""
    };
    // Ordered by the partial index on published_at; `id` breaks ties for the cursor. The
    // event's status is a scalar subquery (one unique-index lookup per row): as
    // `NOT EXISTS (... status <> 'processed')` PostgreSQL read every event for the anti-join
    // (0.5 s a batch at a million events). A row whose event is gone counts as processed.
    // `$n` placeholders are understood by both PostgreSQL and SQLite.
    let statement = Statement::from_sql_and_values(
        backend,
        format!(
            "WITH doomed AS ( \
               SELECT o.id FROM outbox o \
               WHERE o.published_at IS NOT NULL AND o.published_at < $1 \
                 AND (o.published_at, o.id) > ($2, $3) \
                 AND COALESCE((SELECT e.status FROM webhook_events e \
                   WHERE e.event_id = o.event_id), $4) = $4 \
               ORDER BY o.published_at, o.id LIMIT $5 {lock}) \
             DELETE FROM outbox WHERE id IN (SELECT id FROM doomed) \
             RETURNING published_at, id"
        ),
        [
            cutoff.into(),
            cursor.at.into(),
            cursor.id.into(),
            EventStatus::Processed.as_str().into(),
            i64::try_from(limit).unwrap_or(i64::MAX).into(),
        ],
    );
    let rows = txn.query_all_raw(statement).await?;
    Ok((rows.len() as u64, cursor.after(&rows)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_republish_waits_twice_as_long_up_to_a_day() {
        let after = Duration::from_secs(600);
        assert_eq!(republish_wait(after, 0), after);
        assert_eq!(republish_wait(after, 1), Duration::from_secs(1200));
        assert_eq!(republish_wait(after, 3), Duration::from_secs(4800));
        assert_eq!(republish_wait(after, 30), REPUBLISH_MAX_INTERVAL);
        assert_eq!(republish_wait(Duration::ZERO, 5), Duration::ZERO);
    }

    #[test]
    fn a_message_names_its_topic_key_and_headers() {
        let kafka: KafkaConfig = serde_json::from_value(json!({
            "brokers": null, "topic_prefix": "acme", "group_id": "g", "create_topics": false,
            "partitions": 1, "replication_factor": 1, "message_timeout_ms": 1000,
        }))
        .expect("config");
        let payload = json!({ "id": "evt_1" });
        let message = OutboxMessage::of(
            &kafka,
            &NewEvent {
                event_id: "evt_1",
                event_type: EventType::Deleted,
                contact_id: "c1",
                payload: &payload,
            },
        );
        assert_eq!(message.topic, "acme.contact.deleted");
        assert_eq!(message.key, "c1");
        assert_eq!(
            message.headers,
            json!({ "event-id": "evt_1", "event-type": "contact.deleted" })
        );
    }

    /// The portable (SQLite) statements, end to end: store, duplicate, backlog, claim, mark.
    #[tokio::test]
    async fn the_portable_statements_store_claim_and_sum_up_the_outbox() {
        use migration::MigratorTrait;
        let db = sea_orm::Database::connect("sqlite::memory:")
            .await
            .expect("in-memory SQLite");
        migration::Migrator::up(&db, None)
            .await
            .expect("migrations");
        let kafka: KafkaConfig = serde_json::from_value(json!({
            "brokers": null, "topic_prefix": "t", "group_id": "g", "create_topics": false,
            "partitions": 1, "replication_factor": 1, "message_timeout_ms": 1000,
        }))
        .expect("config");
        let payload = json!({ "id": "evt_1" });
        let event = |event_id| NewEvent {
            event_id,
            event_type: EventType::Updated,
            contact_id: "c1",
            payload: &payload,
        };
        let txn = db.begin().await.expect("begin");
        let new = store_events(
            &txn,
            &kafka,
            &[event("evt_1"), event("evt_2"), event("evt_1")],
        )
        .await
        .expect("store");
        txn.commit().await.expect("commit");
        assert_eq!(new, HashSet::from(["evt_1".to_owned(), "evt_2".to_owned()]));
        let again = store_events(&db, &kafka, &[event("evt_2")])
            .await
            .expect("store");
        assert!(again.is_empty());

        let summary = backlog(&db).await.expect("backlog");
        assert_eq!(
            (summary.pending, summary.parked, summary.unprocessed),
            (2, 0, 2)
        );
        assert_eq!(summary.topics.len(), 1);
        assert_eq!(summary.topics[0].topic, "t.contact.updated");

        let txn = db.begin().await.expect("begin");
        let rows = claim(&txn, 10).await.expect("claim");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].headers["event-type"], "contact.updated");
        mark_failed(&txn, rows[1].id, "broker down", Duration::from_secs(60))
            .await
            .expect("mark failed");
        mark_published(&txn, vec![rows[0].id]).await.expect("mark");
        txn.commit().await.expect("commit");
        let summary = backlog(&db).await.expect("backlog");
        assert_eq!((summary.pending, summary.parked), (1, 1));
        assert!(claim(&db, 10).await.expect("claim").is_empty());
    }
}
