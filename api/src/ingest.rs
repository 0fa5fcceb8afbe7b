//! The ingest transaction: an event and its outbox row are committed together, or neither is.
//!
//! Concurrent requests share transactions (group commit): `IngestWriter` tasks take whatever
//! requests are queued (up to `batch_max`), write them with multi-row statements, commit once,
//! then answer each request. Nobody is answered before the commit that holds their rows.
use std::collections::HashSet;
use std::sync::{Arc, LazyLock};

use chrono::Utc;
use entity::{EventStatus, outbox, webhook_event};
use relay::config::KafkaConfig;
use relay::event::{HEADER_EVENT_ID, HEADER_EVENT_TYPE};
use relay::wakeup::{NOTIFY_CHANNEL, OutboxWakeup};
use sea_orm::sea_query::{OnConflict, Query};
use sea_orm::{
    ConnectionTrait, DatabaseBackend, DatabaseConnection, DbErr, EntityName, Iden, Statement,
    TransactionTrait,
};
use serde::Serialize;
use serde_json::json;
use tokio::sync::{Mutex, mpsc, oneshot};

use crate::validation::ContactEvent;

/// What happened to one posted event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngestOutcome {
    /// Stored for the first time, with its outbox row.
    Accepted,
    /// The event id was already stored; nothing was written.
    Duplicate,
}

/// Inserts `events` and the outbox rows of the new ones, on `conn` (normally a transaction).
/// Outcomes are in input order. A repeated id, in the batch or in the table, is a duplicate.
pub async fn store_events<C: ConnectionTrait>(
    conn: &C,
    kafka: &KafkaConfig,
    events: &[&ContactEvent],
) -> Result<Vec<IngestOutcome>, DbErr> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let inserted = if conn.get_database_backend() == DatabaseBackend::Postgres {
        insert_postgres(conn, kafka, events).await?
    } else {
        insert_portable(conn, kafka, events).await?
    };
    // The first occurrence of a new id is accepted; any later one in this batch is a duplicate.
    let mut claimed = HashSet::new();
    Ok(events
        .iter()
        .map(|e| {
            if inserted.contains(&e.event_id) && claimed.insert(e.event_id.as_str()) {
                IngestOutcome::Accepted
            } else {
                IngestOutcome::Duplicate
            }
        })
        .collect())
}

/// The statement of `insert_postgres`: $1 the batch document, $2 the time, $3 the topic prefix
/// (the topic is `KafkaConfig::topic_for`'s `<prefix>.<event type>`, spelled in SQL).
static BATCH_INSERT_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH batch AS (SELECT * FROM jsonb_to_recordset($1::jsonb) \
           AS b(event_id text, event_type text, contact_id text, payload jsonb)), \
         new_events AS (INSERT INTO webhook_events \
           (event_id, event_type, contact_id, payload, status, created_at, updated_at) \
           SELECT event_id, event_type, contact_id, payload, '{pending}', $2, $2 \
           FROM batch ORDER BY event_id \
           ON CONFLICT (event_id) DO NOTHING \
           RETURNING event_id, event_type, contact_id, payload) \
         INSERT INTO outbox (event_id, topic, message_key, payload, headers, created_at, next_attempt_at) \
         SELECT event_id, $3 || '.' || event_type, contact_id, payload, \
           jsonb_build_object('{HEADER_EVENT_ID}', event_id, '{HEADER_EVENT_TYPE}', event_type), $2, $2 \
         FROM new_events ORDER BY event_id RETURNING event_id",
        pending = EventStatus::Pending.as_str(),
    )
});

/// One row of the batch document `insert_postgres` sends.
#[derive(Serialize)]
struct BatchRow<'a> {
    event_id: &'a str,
    event_type: &'a str,
    contact_id: &'a str,
    payload: &'a serde_json::Value,
}

/// PostgreSQL: ONE statement of a fixed shape, whatever the batch size, so every connection
/// prepares and plans it once. The batch travels as one JSON document; each event that was new
/// gets its outbox row copied from it on the server. Rows go in in event-id order, so two
/// concurrent batches wait for each other's unique-index entries in the same order and cannot
/// deadlock. Returns the ids that were new.
async fn insert_postgres<C: ConnectionTrait>(
    conn: &C,
    kafka: &KafkaConfig,
    events: &[&ContactEvent],
) -> Result<HashSet<String>, DbErr> {
    let rows: Vec<BatchRow<'_>> = events
        .iter()
        .map(|e| BatchRow {
            event_id: &e.event_id,
            event_type: e.event_type.as_str(),
            contact_id: &e.contact_id,
            payload: &e.payload,
        })
        .collect();
    let batch = serde_json::to_string(&rows).map_err(|e| DbErr::Custom(e.to_string()))?;
    let inserted = conn
        .query_all_raw(Statement::from_sql_and_values(
            DatabaseBackend::Postgres,
            BATCH_INSERT_SQL.as_str(),
            [
                batch.into(),
                Utc::now().into(),
                kafka.topic_prefix.clone().into(),
            ],
        ))
        .await?
        .iter()
        .map(|row| row.try_get::<String>("", "event_id"))
        .collect::<Result<HashSet<_>, _>>()?;
    if !inserted.is_empty() {
        notify_relays(conn).await?;
    }
    Ok(inserted)
}

/// Any other database (SQLite): a multi-row insert of the events, then of the new ones' outbox
/// rows. Returns the ids that were new.
async fn insert_portable<C: ConnectionTrait>(
    conn: &C,
    kafka: &KafkaConfig,
    events: &[&ContactEvent],
) -> Result<HashSet<String>, DbErr> {
    let now = Utc::now();
    let mut order: Vec<usize> = (0..events.len()).collect();
    order.sort_by(|&a, &b| events[a].event_id.cmp(&events[b].event_id));

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
    for &i in &order {
        let e = events[i];
        insert.values_panic([
            e.event_id.clone().into(),
            e.event_type.as_str().into(),
            e.contact_id.clone().into(),
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

    let mut queued = HashSet::new();
    let new_rows: Vec<OutboxSource<'_>> = order
        .iter()
        .map(|&i| events[i])
        .filter(|e| inserted.contains(&e.event_id) && queued.insert(e.event_id.as_str()))
        .map(|e| {
            (
                e.event_id.as_str(),
                e.event_type.as_str(),
                e.contact_id.as_str(),
                &e.payload,
            )
        })
        .collect();
    insert_outbox_rows(conn, kafka, &new_rows).await?;
    Ok(inserted)
}

/// What an outbox row is made from: event id, event type, contact id, payload.
pub type OutboxSource<'a> = (&'a str, &'a str, &'a str, &'a serde_json::Value);

/// Inserts one outbox row per event and, on Postgres, notifies the relays (delivered at commit).
pub async fn insert_outbox_rows<C: ConnectionTrait>(
    conn: &C,
    kafka: &KafkaConfig,
    rows: &[OutboxSource<'_>],
) -> Result<(), DbErr> {
    if rows.is_empty() {
        return Ok(());
    }
    use outbox::Column as O;
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
    for &(event_id, event_type, contact_id, payload) in rows {
        let headers = json!({ HEADER_EVENT_ID: event_id, HEADER_EVENT_TYPE: event_type });
        insert.values_panic([
            event_id.into(),
            kafka.topic_for(event_type).into(),
            contact_id.into(),
            payload.clone().into(),
            headers.into(),
            now.into(),
            now.into(),
        ]);
    }
    conn.execute(&insert).await?;
    notify_relays(conn).await
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

/// Stores `events` in one transaction and commits.
pub async fn ingest_batch(
    db: &DatabaseConnection,
    kafka: &KafkaConfig,
    events: &[&ContactEvent],
) -> Result<Vec<IngestOutcome>, DbErr> {
    let txn = db.begin().await?;
    let outcomes = store_events(&txn, kafka, events).await?;
    txn.commit().await?;
    Ok(outcomes)
}

/// Why an ingest failed; the request was not acknowledged.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IngestError {
    #[error("database error: {0}")]
    Database(String),
    #[error("the ingest writer is shutting down")]
    ShuttingDown,
}

type Reply = oneshot::Sender<Result<IngestOutcome, IngestError>>;

/// Group-commit settings.
#[derive(Clone, Copy, Debug)]
pub struct GroupCommit {
    /// Most events in one transaction.
    pub batch_max: usize,
    /// Transactions in flight at once.
    pub writers: usize,
}

/// Handle to the group-commit writers; cheap to clone.
#[derive(Clone)]
pub struct IngestWriter {
    queue: mpsc::Sender<(ContactEvent, Reply)>,
}

impl IngestWriter {
    /// Starts `settings.writers` writer tasks; they stop once every handle is dropped.
    pub fn spawn(
        db: DatabaseConnection,
        kafka: KafkaConfig,
        wakeup: OutboxWakeup,
        settings: GroupCommit,
    ) -> Self {
        let (queue, receiver) = mpsc::channel(settings.batch_max * settings.writers * 4);
        let receiver = Arc::new(Mutex::new(receiver));
        let kafka = Arc::new(kafka);
        for _ in 0..settings.writers.max(1) {
            let ctx = WriterTask {
                db: db.clone(),
                kafka: kafka.clone(),
                wakeup: wakeup.clone(),
                receiver: receiver.clone(),
                batch_max: settings.batch_max.max(1),
            };
            tokio::spawn(ctx.run());
        }
        Self { queue }
    }

    /// Stores one event; resolves after the commit that holds it.
    pub async fn ingest(&self, event: ContactEvent) -> Result<IngestOutcome, IngestError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send((event, reply))
            .await
            .map_err(|_| IngestError::ShuttingDown)?;
        answer.await.unwrap_or(Err(IngestError::ShuttingDown))
    }
}

struct WriterTask {
    db: DatabaseConnection,
    kafka: Arc<KafkaConfig>,
    wakeup: OutboxWakeup,
    receiver: Arc<Mutex<mpsc::Receiver<(ContactEvent, Reply)>>>,
    batch_max: usize,
}

impl WriterTask {
    async fn run(self) {
        let mut batch = Vec::with_capacity(self.batch_max);
        loop {
            // Waits for the first request, then takes whatever else is already queued: no
            // artificial delay, and batches grow exactly when the database is the bottleneck.
            // Ends once every `IngestWriter` handle is gone and the queue is empty.
            let received = self
                .receiver
                .lock()
                .await
                .recv_many(&mut batch, self.batch_max)
                .await;
            if received == 0 {
                return;
            }
            self.write(std::mem::take(&mut batch)).await;
        }
    }

    async fn write(&self, batch: Vec<(ContactEvent, Reply)>) {
        let started = std::time::Instant::now();
        let events: Vec<&ContactEvent> = batch.iter().map(|(e, _)| e).collect();
        let result = ingest_batch(&self.db, &self.kafka, &events).await;
        metrics::histogram!("ingest_batch_size").record(events.len() as f64);
        match result {
            Ok(outcomes) => {
                if outcomes.contains(&IngestOutcome::Accepted) {
                    self.wakeup.notify_local();
                }
                metrics::histogram!("ingest_commit_seconds")
                    .record(started.elapsed().as_secs_f64());
                for ((_, reply), outcome) in batch.into_iter().zip(outcomes) {
                    let _ = reply.send(Ok(outcome));
                }
            }
            // One bad event must not fail its neighbours: retry them one by one.
            Err(error) if batch.len() > 1 => {
                tracing::warn!(%error, size = batch.len(), "group commit failed; retrying one by one");
                for (event, reply) in batch {
                    let outcome = ingest_batch(&self.db, &self.kafka, &[&event]).await;
                    if matches!(outcome.as_deref(), Ok([IngestOutcome::Accepted])) {
                        self.wakeup.notify_local();
                    }
                    let _ = reply.send(
                        outcome
                            .map(|o| o[0])
                            .map_err(|e| IngestError::Database(e.to_string())),
                    );
                }
            }
            Err(error) => {
                for (_, reply) in batch {
                    let _ = reply.send(Err(IngestError::Database(error.to_string())));
                }
            }
        }
    }
}
