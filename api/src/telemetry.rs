//! Logging (tracing) and the Prometheus recorder, each installed once per process; the
//! registration of the metrics, and the webhook counters.
use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use relay::metrics::{self as names, Role};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

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

/// Describes the metrics of the process's roles (their `# HELP` lines, from
/// [`relay::metrics::CATALOG`]) and creates at zero the counters that alert rules and the
/// dashboard divide by or watch for growth, so they exist before their first event. Every role
/// serves HTTP (the operations endpoints at least).
pub fn register_metrics(roles: &[Role]) {
    relay::metrics::describe(roles);
    if roles.contains(&Role::Http) {
        for outcome in ["accepted", "duplicate", "rejected", "error"] {
            metrics::counter!(names::WEBHOOK_REQUESTS_TOTAL, "outcome" => outcome).increment(0);
        }
        for reason in [code::SIGNATURE_INVALID, code::TIMESTAMP_INVALID] {
            metrics::counter!(names::WEBHOOK_REJECTIONS_TOTAL, "reason" => reason).increment(0);
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
