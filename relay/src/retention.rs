//! Retention: deletes published outbox rows and processed events once they are old enough, in
//! small batches (one short transaction each, a pause between them), so neither table grows
//! without bound and no delete holds locks for long.
//!
//! Kept, whatever their age:
//! - outbox rows not yet published (the relay's work);
//! - outbox rows of an event that is not `processed`: the re-publish safety net
//!   ([`crate::outbox::republish_pending`]) reads the newest row of every pending event,
//!   and a failed event's rows are its publish history until an operator retries it;
//! - events that are `pending` or `failed`: a retry or a dead-letter redrive re-publishes the
//!   stored payload;
//! - processed events that still have an outbox row: the rows go first, so a row is never
//!   published for an event that no longer exists (the consumer would dead-letter it as unknown).
//!
//! A processed event is deleted once it was both received and processed more than
//! `processed_events_secs` ago; until then a repeated event id is answered `duplicate`.
//!
//! Several relay processes may run retention: on PostgreSQL each batch first takes a
//! transaction-scoped advisory lock, and a process that finds it taken ends its run (another
//! one is pruning). Rows locked by anyone else are skipped (`SKIP LOCKED`), never waited for.
use std::time::Instant;

use chrono::{DateTime, Utc};
use sea_orm::{
    ConnectionTrait, DatabaseBackend, DatabaseConnection, DbErr, Statement, TransactionTrait,
};
use tokio_util::sync::CancellationToken;

use crate::config::RetentionConfig;
use crate::metrics as names;
use crate::outbox;
use crate::sql::PruneCursor;
use crate::webhook_events;

/// First key of the pruners' advisory lock (two-int form): "acmr".
const RETENTION_LOCK_CLASS: i32 = 0x6163_6d72;
const RETENTION_LOCK_KEY: i32 = 1;

/// The tables retention prunes, as named in `retention_pruned_total{table}`.
pub const OUTBOX_TABLE: &str = "outbox";
pub const EVENTS_TABLE: &str = "webhook_events";

/// What one run did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PruneReport {
    /// Outbox rows deleted.
    pub outbox: u64,
    /// Events deleted.
    pub events: u64,
    /// Another process was pruning, so this one stopped early.
    pub yielded: bool,
    /// Stopped by shutdown before it was done.
    pub interrupted: bool,
}

/// Prunes old rows; see the module documentation for what is kept.
#[derive(Clone)]
pub struct Retention {
    db: DatabaseConnection,
    config: RetentionConfig,
}

enum Batch {
    /// Rows deleted, and the cursor after the last of them.
    Deleted(u64, PruneCursor),
    /// Another process holds the pruners' lock.
    Busy,
}

impl Retention {
    pub fn new(db: DatabaseConnection, config: RetentionConfig) -> Self {
        Self { db, config }
    }

    /// One run: outbox rows, then events, batch after batch until no old row is left (or
    /// `shutdown`, or another process is pruning).
    pub async fn prune_once(&self, shutdown: &CancellationToken) -> Result<PruneReport, DbErr> {
        let now = Utc::now();
        let mut report = PruneReport::default();
        for table in [OUTBOX_TABLE, EVENTS_TABLE] {
            let cutoff = now
                - if table == OUTBOX_TABLE {
                    self.config.published_outbox()
                } else {
                    self.config.processed_events()
                };
            let mut cursor = PruneCursor::START;
            loop {
                if shutdown.is_cancelled() {
                    report.interrupted = true;
                    return Ok(report);
                }
                let (deleted, next) = match self.delete_batch(table, cutoff, cursor).await? {
                    Batch::Busy => {
                        report.yielded = true;
                        return Ok(report);
                    }
                    Batch::Deleted(deleted, next) => (deleted, next),
                };
                metrics::counter!(names::RETENTION_PRUNED_TOTAL, "table" => table)
                    .increment(deleted);
                if table == OUTBOX_TABLE {
                    report.outbox += deleted;
                } else {
                    report.events += deleted;
                }
                if deleted < self.config.batch_size {
                    break;
                }
                cursor = next;
                tokio::select! {
                    () = shutdown.cancelled() => {}
                    () = tokio::time::sleep(self.config.batch_pause()) => {}
                }
            }
        }
        Ok(report)
    }

    /// Deletes at most `batch_size` old rows of `table` after `cursor`, in one transaction.
    async fn delete_batch(
        &self,
        table: &str,
        cutoff: DateTime<Utc>,
        cursor: PruneCursor,
    ) -> Result<Batch, DbErr> {
        let backend = self.db.get_database_backend();
        let postgres = backend == DatabaseBackend::Postgres;
        let txn = self.db.begin().await?;
        if postgres {
            let locked = txn
                .query_one_raw(Statement::from_sql_and_values(
                    backend,
                    "SELECT pg_try_advisory_xact_lock($1, $2)",
                    [RETENTION_LOCK_CLASS.into(), RETENTION_LOCK_KEY.into()],
                ))
                .await?
                .map(|row| row.try_get_by_index::<bool>(0))
                .transpose()?
                .unwrap_or(false);
            if !locked {
                txn.commit().await?;
                return Ok(Batch::Busy);
            }
        }
        if table == OUTBOX_TABLE {
            let (deleted, next) =
                outbox::prune_published(&txn, cutoff, cursor, self.config.batch_size).await?;
            txn.commit().await?;
            return Ok(Batch::Deleted(deleted, next));
        }
        let (deleted, next) =
            webhook_events::prune_processed(&txn, cutoff, cursor, self.config.batch_size).await?;
        txn.commit().await?;
        Ok(Batch::Deleted(deleted, next))
    }

    /// Prunes every `interval_secs` until `shutdown`. The first run starts at once.
    pub async fn run(self, shutdown: CancellationToken) {
        for table in [OUTBOX_TABLE, EVENTS_TABLE] {
            metrics::counter!(names::RETENTION_PRUNED_TOTAL, "table" => table).increment(0);
        }
        metrics::counter!(names::RETENTION_FAILURES_TOTAL).increment(0);
        while !shutdown.is_cancelled() {
            let started = Instant::now();
            match self.prune_once(&shutdown).await {
                Ok(report) if !report.interrupted => {
                    let elapsed = started.elapsed();
                    metrics::gauge!(names::RETENTION_LAST_RUN_TIMESTAMP_SECONDS)
                        .set(Utc::now().timestamp_millis() as f64 / 1000.0);
                    metrics::gauge!(names::RETENTION_LAST_RUN_DURATION_SECONDS)
                        .set(elapsed.as_secs_f64());
                    if report.outbox + report.events > 0 {
                        tracing::info!(
                            outbox = report.outbox,
                            events = report.events,
                            elapsed_ms = elapsed.as_millis() as u64,
                            "retention: old rows pruned"
                        );
                    }
                    if report.yielded {
                        tracing::debug!("retention: another process is pruning");
                    }
                }
                Ok(_) => {}
                Err(error) => {
                    metrics::counter!(names::RETENTION_FAILURES_TOTAL).increment(1);
                    tracing::warn!(%error, "retention run failed; trying again next interval");
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = tokio::time::sleep(self.config.interval()) => {}
            }
        }
    }
}
