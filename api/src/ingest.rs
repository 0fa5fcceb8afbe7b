//! The ingest transaction: an event and its outbox row are committed together, or neither is.
//!
//! Concurrent requests share transactions (group commit): `IngestWriter` tasks take whatever
//! requests are queued (up to `batch_max`), write them with multi-row statements, commit once,
//! then answer each request. Nobody is answered before the commit that holds their rows.
use std::collections::HashSet;
use std::sync::Arc;

use relay::config::KafkaConfig;
use relay::metrics as names;
use relay::outbox::{self, NewEvent};
use relay::publish::OutboxWakeup;
use sea_orm::{ConnectionTrait, DatabaseBackend, DatabaseConnection, DbErr, TransactionTrait};
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
    let new: Vec<NewEvent<'_>> = events.iter().map(|e| NewEvent::from(*e)).collect();
    let inserted = outbox::store_events(conn, kafka, &new).await?;
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

/// Stores `events` in one transaction and commits. On PostgreSQL the store is one statement,
/// so it runs on the pool as a transaction of its own: one round trip to the database instead of
/// three (`BEGIN`, the statement, `COMMIT`).
pub async fn ingest_batch(
    db: &DatabaseConnection,
    kafka: &KafkaConfig,
    events: &[&ContactEvent],
) -> Result<Vec<IngestOutcome>, DbErr> {
    if db.get_database_backend() == DatabaseBackend::Postgres {
        return store_events(db, kafka, events).await;
    }
    let txn = db.begin().await?;
    let outcomes = store_events(&txn, kafka, events).await?;
    txn.commit().await?;
    Ok(outcomes)
}

/// Why an ingest failed; the request was not acknowledged.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IngestError {
    #[error("database error: {0}")]
    Database(Arc<DbErr>),
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
        metrics::histogram!(names::INGEST_BATCH_SIZE).record(events.len() as f64);
        match result {
            Ok(outcomes) => {
                if outcomes.contains(&IngestOutcome::Accepted) {
                    self.wakeup.committed(&self.db);
                }
                metrics::histogram!(names::INGEST_COMMIT_SECONDS)
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
                        self.wakeup.committed(&self.db);
                    }
                    let _ = reply.send(
                        outcome
                            .map(|o| o[0])
                            .map_err(|e| IngestError::Database(Arc::new(e))),
                    );
                }
            }
            Err(error) => {
                let error = Arc::new(error);
                for (_, reply) in batch {
                    let _ = reply.send(Err(IngestError::Database(error.clone())));
                }
            }
        }
    }
}
