//! Writing outbox rows inside the caller's transaction: with their events at ingest (the caller
//! wakes the relays after the commit), or alone for a retry (a NOTIFY delivered at commit).
use std::collections::HashSet;
use std::sync::LazyLock;

use chrono::Utc;
use entity::outbox::Column as O;
use entity::{EventStatus, outbox, webhook_event};
use sea_orm::sea_query::{OnConflict, Query};
use sea_orm::{ConnectionTrait, DatabaseBackend, DbErr, EntityName, Iden, Statement};
use serde::Serialize;
use serde_json::Value;

use super::{NewEvent, OutboxMessage};
use crate::config::KafkaConfig;

/// PostgreSQL channel the relays LISTEN on.
pub const NOTIFY_CHANNEL: &str = "acme_webhooks_outbox";

/// Inserts the events that are new (by `event_id`) as `pending`, each with its outbox row, on
/// `conn`. Returns the ids that were new; a repeated id, in `events` or in the table, is not.
/// The caller wakes the relays once the rows are committed ([`crate::publish::OutboxWakeup`]).
///
/// On PostgreSQL this is ONE statement, so it is atomic on its own:
/// `conn` may be the pool (the statement is then its own transaction, committed in the one
/// round trip that runs it) or a transaction. Elsewhere it is several statements: pass a
/// transaction.
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
    if conn.get_database_backend() == DatabaseBackend::Postgres {
        return store_postgres(conn, kafka, &unique).await;
    }
    store_portable(conn, kafka, &unique).await
}

/// The statement of `store_postgres`: $1 the batch document, $2 the time. The outbox rows carry
/// no copy of the payload (the relay publishes the event's). It does not NOTIFY: PostgreSQL
/// serialises notifying commits, WAL flush included, so the caller wakes the relays after the
/// commit ([`crate::publish::OutboxWakeup::committed`]).
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
           RETURNING event_id), \
         new_rows AS (INSERT INTO outbox \
           (event_id, topic, message_key, headers, created_at, next_attempt_at) \
           SELECT b.event_id, b.topic, b.contact_id, b.headers, $2, $2 \
           FROM new_events n JOIN batch b ON b.event_id = n.event_id \
           ORDER BY b.event_id RETURNING event_id) \
         SELECT event_id FROM new_rows",
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
    // PostgreSQL rows carry no copy of the payload; SQLite's column cannot be made nullable
    // without rebuilding the table, so the embedded mode keeps writing one.
    let copy = conn.get_database_backend() != DatabaseBackend::Postgres;
    for event in events {
        let message = OutboxMessage::of(kafka, event);
        let payload = copy.then(|| event.payload.clone());
        insert.values_panic([
            event.event_id.into(),
            message.topic.into(),
            message.key.into(),
            payload.into(),
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
