//! What the operations console's overview and `GET /api/admin/overview` show: the pipeline's
//! counts and ages, its recent rates, the consumer group's partitions, readiness, and the alert
//! conditions that hold now.
//!
//! A sampler task of the HTTP role (only while the admin API is on) takes one snapshot every
//! `metrics.backlog_refresh_secs` and keeps the last ten minutes of rates in memory; a request
//! reads the newest snapshot and never queries the database itself, however many consoles are
//! open. Every figure comes from the shared database, so a `serve` process shows what the
//! `relay` and `consume` processes do.
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use poem_openapi::Object;
use sea_orm::{DatabaseBackend, DatabaseConnection, DbErr};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::app::OpsState;
use crate::routes::admin::EventView;
use crate::routes::health::{DependencyStatus, Readiness, readiness};

/// How far back the rates go.
pub const RATE_WINDOW: Duration = Duration::from_secs(600);
/// Events received this long before a sample are counted by it: an ingest transaction takes its
/// `created_at` a moment before it commits.
const COMMIT_LAG: chrono::Duration = chrono::Duration::milliseconds(1000);
/// How many of the newest failed events the overview lists.
const RECENT_SHOWN: u64 = 5;
/// The window of "failed recently" (the dead-letter alert looks back 10 minutes).
const RECENT_FAILURES: chrono::Duration = chrono::Duration::minutes(10);

/// Rates over one sampling interval, and the backlog at its end.
#[derive(Object, Debug, Clone, PartialEq, serde::Deserialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct RatePoint {
    /// End of the interval.
    pub at: DateTime<Utc>,
    /// Length of the interval in seconds.
    pub interval_secs: f64,
    /// Events acknowledged (stored) in the interval.
    pub received: u64,
    /// Events published to the bus in the interval (received minus the growth of the unpublished
    /// backlog; a retried event counts when it is published again).
    pub published: u64,
    /// Events applied (processed) in the interval (received minus the growth of the pending and
    /// failed events).
    pub processed: u64,
    /// Unprocessed events at the end of the interval.
    pub unprocessed: i64,
    /// Unpublished outbox rows at the end of the interval.
    pub unpublished: i64,
}

/// One partition of the consumer group: who holds it, where it is, how far behind.
#[derive(Object, Debug, Clone, PartialEq, serde::Deserialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct PartitionOwner {
    pub topic: String,
    pub partition: i32,
    /// The member recorded as owner (a dead one when `owned` is false; `null`: never taken).
    #[oai(nullable)]
    pub owner: Option<String>,
    /// Whether a live consumer holds it.
    pub owned: bool,
    /// The first offset not yet applied (`null`: nothing applied yet).
    #[oai(nullable)]
    pub next_offset: Option<i64>,
    /// Messages not yet applied, as of the last high watermark a consumer read.
    #[oai(nullable)]
    pub lag: Option<i64>,
    /// Seconds since its offset last moved or it was taken, whichever is later.
    #[oai(nullable)]
    pub idle_secs: Option<f64>,
}

/// One shipped Prometheus alert rule (`deploy/prometheus/acme-webhooks.rules.yml`) and whether its
/// condition holds now.
#[derive(Object, Debug, Clone, PartialEq, serde::Deserialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct AlertState {
    /// The rule's `alert` name.
    pub name: String,
    /// `page` or `ticket`.
    pub severity: String,
    /// Whether its condition can be evaluated from the database and this process.
    pub evaluated: bool,
    /// Whether the condition holds now (Prometheus fires once it has held for the rule's `for`).
    pub firing: bool,
    /// What the condition is, and the figure it was judged on.
    pub detail: String,
    /// The runbook entry (`docs/operations.md#...`).
    pub runbook: String,
}

/// The console's overview: `GET /api/admin/overview`.
#[derive(Object, Debug, Clone, serde::Deserialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct Overview {
    /// When this snapshot was taken.
    pub generated_at: DateTime<Utc>,
    /// Seconds covered by `rates` (and the window counts below).
    pub window_secs: f64,
    /// Events acknowledged within the window.
    pub received: u64,
    /// Events published within the window.
    pub published: u64,
    /// Events processed within the window.
    pub processed: u64,
    /// Events failed now (waiting for a retry).
    pub failed: i64,
    /// Of those, how many failed within the last 10 minutes.
    pub failed_recently: i64,
    /// Unpublished outbox rows now.
    pub unpublished: i64,
    /// Of those, rows waiting out a publish backoff.
    pub parked: i64,
    /// Acknowledged events not processed yet (published or not).
    pub unprocessed: i64,
    /// Age in seconds of the oldest outbox row that could be published now (0 if none).
    pub oldest_unpublished_age_secs: f64,
    /// Age in seconds of the oldest unprocessed event (0 if none).
    pub oldest_unprocessed_age_secs: f64,
    /// One point per sampling interval, oldest first.
    pub rates: Vec<RatePoint>,
    /// Every partition of the consumer group (Kafka mode; empty with the in-process bus).
    pub partitions: Vec<PartitionOwner>,
    /// What `/readyz` of this process answers, as the readiness gauges' loop last probed it
    /// (every 3 sampling intervals).
    pub readiness: Readiness,
    /// The consumer group as the partitions in the database show it, whichever process
    /// consumes: down while a partition has no live consumer or an owned one stalled with
    /// messages waiting (`null` with the in-process bus).
    #[oai(nullable)]
    pub consumer_group: Option<DependencyStatus>,
    /// Every shipped alert rule.
    pub alerts: Vec<AlertState>,
    /// The newest failed events (up to 5), with their errors.
    pub recent_failures: Vec<EventView>,
}

/// The stock a sample saw.
#[derive(Debug, Clone)]
struct Stock {
    at: DateTime<Utc>,
    unprocessed: i64,
    unpublished: i64,
    failed: i64,
}

#[derive(Default)]
struct Samples {
    last: Option<Stock>,
    /// What the derived counts of earlier intervals came out below zero (an event counted as
    /// received one interval after the backlog showed it), paid back before the next ones count.
    published_owed: i64,
    processed_owed: i64,
    rates: VecDeque<RatePoint>,
    snapshot: Option<Overview>,
}

/// The sampler's memory: the newest overview and the rates behind it.
#[derive(Clone)]
pub struct Activity {
    ops: Arc<OpsState>,
    every: Duration,
    samples: Arc<Mutex<Samples>>,
}

impl Activity {
    pub fn new(ops: Arc<OpsState>) -> Self {
        let every = ops.config.metrics.backlog_refresh();
        Self {
            ops,
            every,
            samples: Arc::default(),
        }
    }

    /// Samples every `metrics.backlog_refresh_secs` until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            if let Err(error) = self.sample().await {
                tracing::warn!(%error, "console overview sample failed");
            }
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = tokio::time::sleep(self.every) => {}
            }
        }
    }

    /// The newest snapshot (taken now if there is none yet).
    pub async fn overview(&self) -> Result<Overview, DbErr> {
        if let Some(snapshot) = self.samples.lock().await.snapshot.clone() {
            return Ok(snapshot);
        }
        self.sample().await
    }

    /// Takes one sample and makes the snapshot from it.
    async fn sample(&self) -> Result<Overview, DbErr> {
        let mut samples = self.samples.lock().await;
        let db = &self.ops.db;
        let now = Utc::now();
        let backlog = relay::outbox::backlog(db).await?;
        let failed = relay::webhook_events::failed_summary(db, now - RECENT_FAILURES).await?;
        let partitions = partitions(db).await?;
        let failed_filter = relay::webhook_events::Filter {
            status: Some(entity::EventStatus::Failed),
            ..Default::default()
        };
        let recent_failures = relay::webhook_events::list(db, &failed_filter, None, RECENT_SHOWN)
            .await?
            .into_iter()
            .map(EventView::from)
            .collect();
        let stock = Stock {
            at: now,
            unprocessed: backlog.unprocessed,
            unpublished: backlog.pending,
            failed: failed.failed,
        };
        if let Some(last) = samples.last.take() {
            let received =
                relay::webhook_events::count_received(db, last.at - COMMIT_LAG, now - COMMIT_LAG)
                    .await?;
            let received_now = i64::try_from(received).unwrap_or(i64::MAX);
            // Derived counts stay exact over time: a shortfall is carried, never clamped away.
            let settle = |raw: i64, owed: &mut i64| -> u64 {
                let total = raw + *owed;
                *owed = total.min(0);
                u64::try_from(total).unwrap_or(0)
            };
            let published = settle(
                received_now - (stock.unpublished - last.unpublished),
                &mut samples.published_owed,
            );
            let processed = settle(
                received_now
                    - (stock.unprocessed - last.unprocessed)
                    - (stock.failed - last.failed),
                &mut samples.processed_owed,
            );
            samples.rates.push_back(RatePoint {
                at: now,
                interval_secs: (now - last.at).num_milliseconds() as f64 / 1000.0,
                received,
                published,
                processed,
                unprocessed: stock.unprocessed,
                unpublished: stock.unpublished,
            });
            let window = chrono::Duration::from_std(RATE_WINDOW).unwrap_or_default();
            while samples.rates.front().is_some_and(|p| now - p.at > window) {
                samples.rates.pop_front();
            }
        }
        samples.last = Some(stock);
        // The gauge loop's newest probe (it opens a Kafka client: one loop does it); probed
        // here only before that loop's first round.
        let latest = self.ops.readiness.borrow().clone();
        let readiness = match latest {
            Some(readiness) => readiness,
            None => readiness(&self.ops).await,
        };
        let rates: Vec<RatePoint> = samples.rates.iter().cloned().collect();
        let mut overview = Overview {
            generated_at: now,
            window_secs: rates.iter().map(|p| p.interval_secs).sum(),
            received: rates.iter().map(|p| p.received).sum(),
            published: rates.iter().map(|p| p.published).sum(),
            processed: rates.iter().map(|p| p.processed).sum(),
            failed: failed.failed,
            failed_recently: failed.failed_recently,
            unpublished: backlog.pending,
            parked: backlog.parked,
            unprocessed: backlog.unprocessed,
            oldest_unpublished_age_secs: backlog.oldest_claimable_age_secs,
            oldest_unprocessed_age_secs: backlog.oldest_unprocessed_age_secs,
            rates,
            partitions,
            readiness,
            consumer_group: None,
            alerts: Vec::new(),
            recent_failures,
        };
        overview.consumer_group =
            consumer_group(&overview, self.ops.config.kafka.brokers.is_some());
        overview.alerts = alerts(&overview, failed.oldest_failed_at, now);
        samples.snapshot = Some(overview.clone());
        Ok(overview)
    }
}

async fn partitions(db: &DatabaseConnection) -> Result<Vec<PartitionOwner>, DbErr> {
    if db.get_database_backend() != DatabaseBackend::Postgres {
        return Ok(Vec::new());
    }
    Ok(relay::consume::partition_states(db)
        .await?
        .into_iter()
        .map(|p| PartitionOwner {
            lag: p.lag(),
            topic: p.topic,
            partition: p.partition,
            owner: p.owner,
            owned: p.owned,
            next_offset: p.next_offset,
            idle_secs: p.idle_secs,
        })
        .collect())
}

/// The consumer group's state from its partitions (Kafka mode only).
fn consumer_group(overview: &Overview, kafka: bool) -> Option<DependencyStatus> {
    if !kafka {
        return None;
    }
    let partitions = &overview.partitions;
    let unowned = partitions.iter().filter(|p| !p.owned).count();
    let stalled = partitions.iter().filter(|p| is_stalled(p)).count();
    let error = if partitions.is_empty() {
        Some("no partitions yet: no consumer has joined the group".to_owned())
    } else if unowned > 0 || stalled > 0 {
        Some(format!(
            "{unowned} partition(s) without a live consumer, {stalled} stalled with messages waiting"
        ))
    } else {
        None
    };
    Some(DependencyStatus {
        name: "consumer group".into(),
        up: error.is_none(),
        error,
    })
}

fn is_stalled(p: &PartitionOwner) -> bool {
    p.owned && p.lag.unwrap_or(0) > 0 && p.idle_secs.unwrap_or(0.0) >= STALLED_SECS
}

/// Seconds a consumer's partition may sit still with messages waiting (the consumer's own
/// health check, behind `consumer_partitions_stalled`).
const STALLED_SECS: f64 = 30.0;

/// The shipped rules, in the rules file's order, each judged on `overview` where it can be.
fn alerts(
    overview: &Overview,
    oldest_failed_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Vec<AlertState> {
    let unowned = overview.partitions.iter().filter(|p| !p.owned).count();
    let stalled = overview
        .partitions
        .iter()
        .filter(|p| p.owned && p.lag.unwrap_or(0) > 0 && p.idle_secs.unwrap_or(0.0) >= STALLED_SECS)
        .count();
    let failed_for = oldest_failed_at.map_or(0, |t| (now - t).num_seconds());
    let down: Vec<&str> = overview
        .readiness
        .dependencies
        .iter()
        .filter(|d| !d.up)
        .map(|d| d.name.as_str())
        .collect();
    let judged = |name: &str, severity: &str, firing: bool, detail: String| AlertState {
        name: name.to_owned(),
        severity: severity.to_owned(),
        evaluated: true,
        firing,
        detail,
        runbook: runbook(name),
    };
    let prometheus_only = |name: &str, severity: &str, what: &str| AlertState {
        name: name.to_owned(),
        severity: severity.to_owned(),
        evaluated: false,
        firing: false,
        detail: format!("{what}: evaluated by Prometheus only"),
        runbook: runbook(name),
    };
    vec![
        judged(
            "AcmeWebhooksEventsUnprocessedTooOld",
            "page",
            overview.oldest_unprocessed_age_secs > 300.0,
            format!(
                "oldest unprocessed event {:.0} s old (threshold 300 s)",
                overview.oldest_unprocessed_age_secs
            ),
        ),
        judged(
            "AcmeWebhooksOutboxBacklogTooOld",
            "page",
            overview.oldest_unpublished_age_secs > 120.0,
            format!(
                "oldest publishable outbox row {:.0} s old (threshold 120 s)",
                overview.oldest_unpublished_age_secs
            ),
        ),
        judged(
            "AcmeWebhooksPartitionUnowned",
            "page",
            unowned > 0,
            format!("{unowned} partition(s) held by no live consumer"),
        ),
        judged(
            "AcmeWebhooksConsumerStalled",
            "page",
            stalled > 0,
            format!(
                "{stalled} owned partition(s) with messages waiting, unmoved for {STALLED_SECS:.0} s"
            ),
        ),
        prometheus_only(
            "AcmeWebhooksBatchFailing",
            "page",
            "a consume process's consumer_batch_failed_attempts",
        ),
        judged(
            "AcmeWebhooksDeadLettersGrowing",
            "ticket",
            overview.failed_recently > 0,
            format!(
                "{} event(s) failed in the last 10 minutes",
                overview.failed_recently
            ),
        ),
        judged(
            "AcmeWebhooksFailedEventsWaiting",
            "ticket",
            failed_for > 3600,
            format!(
                "{} failed event(s), the oldest failed {failed_for} s ago (threshold 1 h)",
                overview.failed
            ),
        ),
        prometheus_only(
            "AcmeWebhooksServerErrors",
            "page",
            "the rate of webhook 500s across every serve process",
        ),
        prometheus_only(
            "AcmeWebhooksConnectionsRefused",
            "ticket",
            "the rate of refused connections across every process",
        ),
        prometheus_only(
            "AcmeWebhooksSignatureRejections",
            "page",
            "the rate of signature rejections across every serve process",
        ),
        judged(
            "AcmeWebhooksNotReady",
            "page",
            !overview.readiness.ready,
            if down.is_empty() {
                "this process is ready".to_owned()
            } else {
                format!("not ready: {} down", down.join(", "))
            },
        ),
        prometheus_only(
            "AcmeWebhooksTargetDown",
            "page",
            "whether Prometheus can scrape each process",
        ),
        prometheus_only(
            "AcmeWebhooksRetentionNotRunning",
            "ticket",
            "the relay processes' retention_last_run_timestamp_seconds",
        ),
    ]
}

fn runbook(alert: &str) -> String {
    format!("docs/operations.md#{}", alert.to_lowercase())
}
