//! Logging (tracing) and the Prometheus recorder, each installed once per process; the
//! registration of the metrics, the webhook counters, and the readiness gauge loop.
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use relay::metric_names as names;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::app::{OpsState, Roles};
use crate::config::{LogConfig, LogFormat};
use crate::error::code;

/// Installs the tracing subscriber; a second call (tests start many services) is a no-op.
pub fn init_tracing(config: &LogConfig) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match config.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// The process-wide Prometheus recorder.
pub fn metrics_handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let latency = [
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
        ];
        let sizes = [1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0];
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_size".into()), &sizes))
            .expect("bucket lists are non-empty")
            .build_recorder();
        let handle = recorder.handle();
        // Fails only if another recorder is installed, which this OnceLock rules out.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// Describes the metrics (their `# HELP` lines) and creates at zero the counters that alert rules
/// and the dashboard divide by or watch for growth, so they exist before their first event. Each
/// role registers its own; every role serves HTTP (the operations endpoints at least).
pub fn register_metrics(roles: Roles) {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(
        names::SERVICE_READY,
        "1 when /readyz would answer 200 (database, broker and consumer group healthy), else 0"
    );
    describe_gauge!(
        names::SERVICE_DEPENDENCY_UP,
        "1 when the dependency answered its last readiness probe, else 0"
    );
    describe_counter!(
        names::HTTP_CONNECTIONS_REFUSED_TOTAL,
        "connections answered 503 at once because http.max_connections were open"
    );
    describe_counter!(
        names::HTTP_ACCEPT_ERRORS_TOTAL,
        "accept() failures (out of file descriptors...)"
    );
    describe_gauge!(
        names::EVENTS_UNPROCESSED,
        "acknowledged events not yet processed (pending)"
    );
    describe_gauge!(
        names::EVENTS_OLDEST_UNPROCESSED_AGE_SECONDS,
        "age of the oldest acknowledged event not yet processed: the golden signal"
    );
    describe_gauge!(
        names::EVENTS_FAILED,
        "events that could not be applied and wait for an operator (status failed)"
    );
    describe_gauge!(
        names::EVENTS_REPUBLISHED_PENDING,
        "pending events the relay's safety net has published again"
    );
    describe_gauge!(names::OUTBOX_PENDING_TOTAL, "unpublished outbox rows");
    describe_gauge!(
        names::OUTBOX_OLDEST_CLAIMABLE_AGE_SECONDS_MAX,
        "age of the oldest outbox row the relay could publish now"
    );
    describe_gauge!(
        names::CONSUMER_LAG,
        "messages not yet applied per partition of the consumer group"
    );
    describe_gauge!(
        names::CONSUMER_PARTITIONS_UNOWNED,
        "partitions of the consumer group that no live consumer holds"
    );
    for counter in [
        names::HTTP_CONNECTIONS_REFUSED_TOTAL,
        names::HTTP_ACCEPT_ERRORS_TOTAL,
    ] {
        metrics::counter!(counter).increment(0);
    }
    if roles.http {
        describe_counter!(names::WEBHOOK_REQUESTS_TOTAL, "webhook requests by outcome");
        describe_counter!(
            names::WEBHOOK_REJECTIONS_TOTAL,
            "webhook requests refused (and duplicates), by reason"
        );
        describe_histogram!(
            names::WEBHOOK_INGEST_SECONDS,
            "time from a verified webhook to its committed ack"
        );
        for outcome in ["accepted", "duplicate", "rejected", "error"] {
            metrics::counter!(names::WEBHOOK_REQUESTS_TOTAL, "outcome" => outcome).increment(0);
        }
        for reason in [code::SIGNATURE_INVALID, code::TIMESTAMP_INVALID] {
            metrics::counter!(names::WEBHOOK_REJECTIONS_TOTAL, "reason" => reason).increment(0);
        }
    }
    if roles.relay {
        describe_counter!(names::RELAY_PUBLISHED_TOTAL, "outbox rows published");
        describe_counter!(names::RELAY_FAILED_TOTAL, "publish attempts that failed");
        describe_counter!(
            names::RELAY_REPUBLISHED_TOTAL,
            "rows the safety net published again (event still pending long after delivery)"
        );
        describe_counter!(
            names::RETENTION_PRUNED_TOTAL,
            "rows deleted by retention, by table"
        );
        describe_counter!(
            names::RETENTION_FAILURES_TOTAL,
            "retention runs that failed"
        );
        describe_gauge!(
            names::RETENTION_LAST_RUN_TIMESTAMP_SECONDS,
            "unix time at which the last retention run of this process completed"
        );
        describe_gauge!(
            names::RETENTION_LAST_RUN_DURATION_SECONDS,
            "how long the last completed retention run took"
        );
        for counter in [
            names::RELAY_PUBLISHED_TOTAL,
            names::RELAY_FAILED_TOTAL,
            names::RELAY_REPUBLISHED_TOTAL,
        ] {
            metrics::counter!(counter).increment(0);
        }
    }
    if roles.consumer {
        describe_counter!(names::CONSUMER_PROCESSED_TOTAL, "events applied");
        describe_counter!(
            names::CONSUMER_FAILED_TOTAL,
            "events that could not be applied (marked failed)"
        );
        describe_counter!(
            names::CONSUMER_DEAD_LETTERED_TOTAL,
            "messages published to the dead-letter topic"
        );
        describe_counter!(
            names::CONSUMER_RETRIES_TOTAL,
            "failed batch attempts retried"
        );
        describe_gauge!(
            names::CONSUMER_BATCH_FAILED_ATTEMPTS,
            "failed attempts in a row of the batch a partition waits on, by database error class"
        );
        describe_counter!(
            names::CONSUMER_REFETCHES_TOTAL,
            "seeks back because the broker served a partition past the offset asked for"
        );
        describe_counter!(
            names::CONSUMER_OFFSETS_MISSING_TOTAL,
            "offsets the broker never served that the consumer went past"
        );
        describe_gauge!(
            names::CONSUMER_PARTITIONS_STALLED,
            "partitions of this consumer with messages waiting that have not moved for 30 s"
        );
        for counter in [
            names::CONSUMER_PROCESSED_TOTAL,
            names::CONSUMER_FAILED_TOTAL,
            names::CONSUMER_DEAD_LETTERED_TOTAL,
            names::CONSUMER_RETRIES_TOTAL,
            names::CONSUMER_REFETCHES_TOTAL,
            names::CONSUMER_OFFSETS_MISSING_TOTAL,
        ] {
            metrics::counter!(counter).increment(0);
        }
    }
}

/// How a webhook request ended, as counted by `webhook_requests_total{outcome}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Accepted,
    /// Acknowledged, not stored again (also counted as a rejection, reason `duplicate`).
    Duplicate,
    /// Refused before it was stored (see [`count_rejection`]).
    Rejected,
    /// Storing it failed (500).
    Error,
}

/// Counts one webhook request by how it ended.
pub fn count_outcome(outcome: Outcome) {
    let label = match outcome {
        Outcome::Accepted => "accepted",
        Outcome::Duplicate => "duplicate",
        Outcome::Rejected => "rejected",
        Outcome::Error => "error",
    };
    metrics::counter!(names::WEBHOOK_REQUESTS_TOTAL, "outcome" => label).increment(1);
    if outcome == Outcome::Duplicate {
        metrics::counter!(names::WEBHOOK_REJECTIONS_TOTAL, "reason" => "duplicate").increment(1);
    }
}

/// Counts one refused webhook under `code`, the code of the error answer it got.
pub fn count_rejection(code: &str) {
    count_outcome(Outcome::Rejected);
    metrics::counter!(names::WEBHOOK_REJECTIONS_TOTAL, "reason" => code.to_owned()).increment(1);
}

/// Keeps `service_ready` and `service_dependency_up{dependency}` current (probed every `every`,
/// never by a scrape), so an alert can see a process that is up but not ready.
pub async fn refresh_readiness_gauge(
    state: Arc<OpsState>,
    every: Duration,
    shutdown: CancellationToken,
) {
    while !shutdown.is_cancelled() {
        let readiness = crate::routes::health::readiness(&state).await;
        metrics::gauge!(names::SERVICE_READY).set(if readiness.ready { 1.0 } else { 0.0 });
        for dependency in readiness.dependencies {
            metrics::gauge!(names::SERVICE_DEPENDENCY_UP, "dependency" => dependency.name)
                .set(if dependency.up { 1.0 } else { 0.0 });
        }
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = tokio::time::sleep(every) => {}
        }
    }
}

/// Folds the histogram samples recorded since the last pass into their buckets every `every`.
/// The recorder keeps each sample until a scrape renders it, so a process nobody scrapes (or
/// scrapes rarely) would hold every request's latency in memory; this bounds it to `every`.
pub async fn fold_histograms(every: Duration, shutdown: CancellationToken) {
    while !shutdown.is_cancelled() {
        metrics_handle().run_upkeep();
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = tokio::time::sleep(every) => {}
        }
    }
}
