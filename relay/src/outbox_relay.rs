//! The outbox relay: claims unpublished rows with `FOR UPDATE SKIP LOCKED`, publishes them, waits
//! for every delivery report, then marks the delivered rows published in the claiming transaction.
//! A row is never marked published without a delivery report; a relay that dies mid-batch rolls
//! back and another relay (or its restart) publishes the rows again.
use std::time::{Duration, Instant};

use chrono::Utc;
use entity::{EventStatus, outbox};
use sea_orm::sea_query::{Expr, ExprTrait, LockBehavior, LockType};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseBackend, DatabaseConnection, DbErr, EntityTrait,
    QueryFilter, QueryOrder, QuerySelect, Statement, TransactionTrait,
};
use tokio_util::sync::CancellationToken;

use crate::bus::{BusMessage, Publisher};
use crate::config::{RelayConfig, backoff};
use crate::wakeup::OutboxWakeup;

/// What one relay step did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RelayStep {
    pub published: usize,
    pub failed: usize,
}

/// Publishes the outbox to the bus.
#[derive(Clone)]
pub struct OutboxRelay {
    db: DatabaseConnection,
    publisher: Publisher,
    config: RelayConfig,
    /// Set when topics should be (re)created after failed publishes: a produce to a missing
    /// topic only times out, and a broker can come back without them.
    recreate_topics: Option<crate::config::KafkaConfig>,
    /// Whether this loop runs the re-publish safety net (one loop per process is enough).
    sweeps: bool,
}

impl OutboxRelay {
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
        let now = Utc::now();
        let txn = self.db.begin().await?;
        let mut claim = outbox::Entity::find()
            .filter(outbox::Column::PublishedAt.is_null())
            .filter(outbox::Column::NextAttemptAt.lte(now))
            // The order of the partial index (next_attempt_at, id) WHERE published_at IS NULL:
            // a batch reads its rows off the index instead of sorting the whole backlog.
            .order_by_asc(outbox::Column::NextAttemptAt)
            .order_by_asc(outbox::Column::Id)
            .limit(self.config.batch_size);
        if self.db.get_database_backend() == DatabaseBackend::Postgres {
            // Several relays share the outbox: each skips the rows another one holds.
            claim = claim.lock_with_behavior(LockType::Update, LockBehavior::SkipLocked);
        }
        let rows = claim.all(&txn).await?;
        if rows.is_empty() {
            txn.commit().await?;
            return Ok(RelayStep::default());
        }

        let started = Instant::now();
        let messages: Vec<BusMessage> = rows.iter().map(BusMessage::from_outbox).collect();
        let reports = self.publisher.publish(&messages).await;
        metrics::histogram!("relay_publish_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("relay_batch_size").record(rows.len() as f64);

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
                    outbox::Entity::update_many()
                        .col_expr(
                            outbox::Column::Attempts,
                            Expr::col(outbox::Column::Attempts).add(1),
                        )
                        .col_expr(outbox::Column::LastError, Expr::value(error))
                        .col_expr(
                            outbox::Column::NextAttemptAt,
                            Expr::value(Utc::now() + delay),
                        )
                        .filter(outbox::Column::Id.eq(row.id))
                        .exec(&txn)
                        .await?;
                }
            }
        }
        step.published = delivered.len();
        if !delivered.is_empty() {
            outbox::Entity::update_many()
                .col_expr(outbox::Column::PublishedAt, Expr::value(Utc::now()))
                .col_expr(
                    outbox::Column::Attempts,
                    Expr::col(outbox::Column::Attempts).add(1),
                )
                .filter(outbox::Column::Id.is_in(delivered))
                .exec(&txn)
                .await?;
        }
        txn.commit().await?;
        metrics::counter!("relay_published_total").increment(step.published as u64);
        metrics::counter!("relay_failed_total").increment(step.failed as u64);
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
            metrics::counter!("relay_republished_total").increment(requeued);
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
                        && let Err(error) = crate::kafka::ensure_topics(kafka).await
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
        let published_at: Option<chrono::DateTime<Utc>> = row.try_get_by_index(1)?;
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
        .col_expr(
            outbox::Column::PublishedAt,
            Expr::value(Option::<chrono::DateTime<Utc>>::None),
        )
        .col_expr(outbox::Column::NextAttemptAt, Expr::value(now))
        .col_expr(outbox::Column::LastError, Expr::value(reason))
        .col_expr(
            outbox::Column::Republished,
            Expr::col(outbox::Column::Republished).add(1),
        )
        .filter(outbox::Column::Id.is_in(due))
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
}
