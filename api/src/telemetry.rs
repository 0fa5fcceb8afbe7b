//! Logging (tracing) and the Prometheus recorder, each installed once per process.
use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::app::Roles;
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
        "service_ready",
        "1 when /readyz would answer 200 (database, broker and consumer group healthy), else 0"
    );
    describe_gauge!(
        "service_dependency_up",
        "1 when the dependency answered its last readiness probe, else 0"
    );
    describe_counter!(
        "http_connections_refused_total",
        "connections answered 503 at once because http.max_connections were open"
    );
    describe_counter!(
        "http_accept_errors_total",
        "accept() failures (out of file descriptors...)"
    );
    describe_gauge!(
        "events_unprocessed",
        "acknowledged events not yet processed (pending)"
    );
    describe_gauge!(
        "events_oldest_unprocessed_age_seconds",
        "age of the oldest acknowledged event not yet processed: the golden signal"
    );
    describe_gauge!(
        "events_failed",
        "events that could not be applied and wait for an operator (status failed)"
    );
    describe_gauge!(
        "events_republished_pending",
        "pending events the relay's safety net has published again"
    );
    describe_gauge!("outbox_pending_total", "unpublished outbox rows");
    describe_gauge!(
        "outbox_oldest_claimable_age_seconds_max",
        "age of the oldest outbox row the relay could publish now"
    );
    describe_gauge!(
        "consumer_lag",
        "messages not yet applied per partition of the consumer group"
    );
    describe_gauge!(
        "consumer_partitions_unowned",
        "partitions of the consumer group that no live consumer holds"
    );
    for counter in ["http_connections_refused_total", "http_accept_errors_total"] {
        metrics::counter!(counter).increment(0);
    }
    if roles.http {
        describe_counter!("webhook_requests_total", "webhook requests by outcome");
        describe_counter!(
            "webhook_rejections_total",
            "webhook requests refused (and duplicates), by reason"
        );
        describe_histogram!(
            "webhook_ingest_seconds",
            "time from a verified webhook to its committed ack"
        );
        for outcome in ["accepted", "duplicate", "rejected", "error"] {
            metrics::counter!("webhook_requests_total", "outcome" => outcome).increment(0);
        }
        for reason in [code::SIGNATURE_INVALID, code::TIMESTAMP_INVALID] {
            metrics::counter!("webhook_rejections_total", "reason" => reason).increment(0);
        }
    }
    if roles.relay {
        describe_counter!("relay_published_total", "outbox rows published");
        describe_counter!("relay_failed_total", "publish attempts that failed");
        describe_counter!(
            "relay_republished_total",
            "rows the safety net published again (event still pending long after delivery)"
        );
        describe_counter!(
            "retention_pruned_total",
            "rows deleted by retention, by table"
        );
        describe_counter!("retention_failures_total", "retention runs that failed");
        describe_gauge!(
            "retention_last_run_timestamp_seconds",
            "unix time at which the last retention run of this process completed"
        );
        describe_gauge!(
            "retention_last_run_duration_seconds",
            "how long the last completed retention run took"
        );
        for counter in [
            "relay_published_total",
            "relay_failed_total",
            "relay_republished_total",
        ] {
            metrics::counter!(counter).increment(0);
        }
    }
    if roles.consumer {
        describe_counter!("consumer_processed_total", "events applied");
        describe_counter!(
            "consumer_failed_total",
            "events that could not be applied (marked failed)"
        );
        describe_counter!(
            "consumer_dead_lettered_total",
            "messages published to the dead-letter topic"
        );
        describe_counter!(
            "consumer_retries_total",
            "transient processing failures retried"
        );
        describe_gauge!(
            "consumer_partitions_stalled",
            "partitions of this consumer with messages waiting that have not moved for 30 s"
        );
        for counter in [
            "consumer_processed_total",
            "consumer_failed_total",
            "consumer_dead_lettered_total",
            "consumer_retries_total",
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
    metrics::counter!("webhook_requests_total", "outcome" => label).increment(1);
    if outcome == Outcome::Duplicate {
        metrics::counter!("webhook_rejections_total", "reason" => "duplicate").increment(1);
    }
}

/// Counts one refused webhook under `code`, the code of the error answer it got.
pub fn count_rejection(code: &str) {
    count_outcome(Outcome::Rejected);
    metrics::counter!("webhook_rejections_total", "reason" => code.to_owned()).increment(1);
}
