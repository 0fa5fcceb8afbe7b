//! Publish: the relay loop, outbox rows -> the bus. It claims unpublished rows with `FOR UPDATE SKIP LOCKED`, publishes them, waits
//! for every delivery report, then marks the delivered rows published in the claiming transaction.
//! A row is never marked published without a delivery report; a relay that dies mid-batch rolls
//! back and another relay (or its restart) publishes the rows again.
use std::time::{Duration, Instant};

use sea_orm::{DatabaseConnection, DbErr, TransactionTrait};
use tokio_util::sync::CancellationToken;

mod wakeup;

pub use wakeup::OutboxWakeup;

use crate::bus::{BusMessage, Publisher};
use crate::config::{RelayConfig, backoff};
use crate::metrics as names;
use crate::outbox::{self, republish_pending};

/// What one relay step did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RelayStep {
    pub published: usize,
    pub failed: usize,
}

/// Publishes the outbox to the bus.
#[derive(Clone)]
pub struct Relay {
    db: DatabaseConnection,
    publisher: Publisher,
    config: RelayConfig,
    /// Set when topics should be (re)created after failed publishes: a produce to a missing
    /// topic only times out, and a broker can come back without them.
    recreate_topics: Option<crate::config::KafkaConfig>,
    /// Whether this loop runs the re-publish safety net (one loop per process is enough).
    sweeps: bool,
}

impl Relay {
    pub fn new(db: DatabaseConnection, publisher: Publisher, config: RelayConfig) -> Self {
        Self {
            db,
            publisher,
            config,
            recreate_topics: None,
            sweeps: true,
        }
    }

    /// A further loop of the same relay: claims batches, leaves the safety net to the first.
    pub fn another_loop(&self) -> Self {
        Self {
            sweeps: false,
            ..self.clone()
        }
    }

    /// After a batch with failed publishes, make sure the topics exist before retrying.
    pub fn recreate_topics_after_failures(mut self, kafka: crate::config::KafkaConfig) -> Self {
        self.recreate_topics = Some(kafka);
        self
    }

    /// One batch: claim, publish, record the outcome, commit.
    pub async fn relay_once(&self) -> Result<RelayStep, DbErr> {
        let txn = self.db.begin().await?;
        let rows = outbox::claim(&txn, self.config.batch_size).await?;
        if rows.is_empty() {
            txn.commit().await?;
            return Ok(RelayStep::default());
        }

        let started = Instant::now();
        let messages: Vec<BusMessage> = rows.iter().map(BusMessage::from_outbox).collect();
        let reports = self.publisher.publish(&messages).await;
        metrics::histogram!(names::RELAY_PUBLISH_SECONDS).record(started.elapsed().as_secs_f64());
        metrics::histogram!(names::RELAY_BATCH_SIZE).record(rows.len() as f64);

        let mut delivered = Vec::with_capacity(rows.len());
        let mut step = RelayStep::default();
        for (row, report) in rows.iter().zip(reports) {
            match report {
                Ok(()) => delivered.push(row.id),
                Err(error) => {
                    step.failed += 1;
                    let delay = backoff(
                        self.config.backoff_base_ms,
                        self.config.backoff_max_ms,
                        u32::try_from(row.attempts).unwrap_or(0),
                    );
                    tracing::warn!(event_id = %row.event_id, %error, attempts = row.attempts + 1,
                        retry_in_ms = delay.as_millis() as u64, "publish failed");
                    outbox::mark_failed(&txn, row.id, &error.to_string(), delay).await?;
                }
            }
        }
        step.published = delivered.len();
        outbox::mark_published(&txn, delivered).await?;
        txn.commit().await?;
        metrics::counter!(names::RELAY_PUBLISHED_TOTAL).increment(step.published as u64);
        metrics::counter!(names::RELAY_FAILED_TOTAL).increment(step.failed as u64);
        tracing::debug!(
            published = step.published,
            failed = step.failed,
            "relay batch"
        );
        Ok(step)
    }

    /// The safety net: rows of events still `pending` more than `after` after their delivery
    /// are published again (see [`republish_pending`]).
    pub async fn republish_stale(&self, after: Duration) -> Result<u64, DbErr> {
        let reason = format!(
            "re-published: event still pending {} s after delivery",
            after.as_secs()
        );
        let requeued = republish_pending(&self.db, after, &reason, 1000).await?;
        if requeued > 0 {
            metrics::counter!(names::RELAY_REPUBLISHED_TOTAL).increment(requeued);
            tracing::warn!(
                requeued,
                "events still pending long after delivery; publishing them again"
            );
        }
        Ok(requeued)
    }

    /// Relays until `shutdown`: full batches back to back, otherwise waits for a wake-up or the
    /// poll interval. A batch in flight at shutdown is finished (its deliveries are awaited).
    pub async fn run(self, wakeup: OutboxWakeup, shutdown: CancellationToken) {
        let mut waiter = wakeup.waiter(&self.db).await;
        let mut failures = 0u32;
        let mut last_sweep = Instant::now();
        while !shutdown.is_cancelled() {
            if self.sweeps
                && let Some(after) = self.config.republish_after()
                && last_sweep.elapsed()
                    >= (after / 4).clamp(Duration::from_secs(1), Duration::from_secs(60))
            {
                last_sweep = Instant::now();
                if let Err(error) = self.republish_stale(after).await {
                    tracing::warn!(%error, "could not look for stale pending events");
                }
            }
            let idle = match self.relay_once().await {
                Ok(step) => {
                    failures = 0;
                    if step.failed > 0
                        && let Some(kafka) = &self.recreate_topics
                        && let Err(error) = crate::bus::kafka::ensure_topics(kafka).await
                    {
                        tracing::warn!(%error, "could not check the topics");
                    }
                    (step.published + step.failed) < self.config.batch_size as usize
                }
                Err(error) => {
                    failures += 1;
                    tracing::error!(%error, "relay step failed");
                    let delay = backoff(
                        self.config.backoff_base_ms,
                        self.config.backoff_max_ms,
                        failures,
                    );
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(delay) => {}
                    }
                    false
                }
            };
            if idle {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = waiter.wait(self.config.poll_interval()) => {}
                }
            }
        }
        if let Publisher::Kafka(kafka) = &self.publisher {
            kafka.flush(Duration::from_secs(5)).await;
        }
        tracing::info!("relay stopped");
    }
}
