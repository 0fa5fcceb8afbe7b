//! Liveness, readiness and Prometheus metrics; the loop that keeps the readiness gauges current.
use std::sync::Arc;
use std::time::Duration;

use poem::web::Data;
use poem_openapi::payload::{Json, PlainText};
use poem_openapi::{ApiResponse, Object, OpenApi};
use tokio_util::sync::CancellationToken;

use crate::app::OpsState;
use crate::routes::ApiTags;
use crate::telemetry::metrics_handle;

pub struct HealthApi;

/// State of one dependency.
#[derive(Object, Debug, Clone, serde::Deserialize)]
pub struct DependencyStatus {
    /// `database`, `kafka` or `consumer`.
    pub name: String,
    /// Whether it answered in time.
    pub up: bool,
    /// Why it is considered down.
    #[oai(skip_serializing_if_is_none)]
    pub error: Option<String>,
}

/// Readiness of the service and of each dependency.
#[derive(Object, Debug, Clone, serde::Deserialize)]
pub struct Readiness {
    pub ready: bool,
    pub dependencies: Vec<DependencyStatus>,
}

#[derive(ApiResponse)]
pub enum ReadyResponse {
    /// The database answers and, when Kafka is configured, the broker answers.
    #[oai(status = 200)]
    Ready(Json<Readiness>),
    /// A dependency is down; the body names it.
    #[oai(status = 503)]
    NotReady(Json<Readiness>),
}

const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

#[OpenApi(tag = "ApiTags::Operations")]
impl HealthApi {
    /// Liveness: the process is up
    #[oai(path = "/healthz", method = "get", operation_id = "healthz")]
    async fn healthz(&self) -> PlainText<&'static str> {
        PlainText("ok")
    }

    /// Readiness: the database and (when configured) the Kafka broker answer
    ///
    /// A `consume` process also reports its consumer group: not ready while a partition has no
    /// consumer or one of its own partitions has stopped moving with messages waiting.
    #[oai(path = "/readyz", method = "get", operation_id = "readyz")]
    async fn readyz(&self, state: Data<&Arc<OpsState>>) -> ReadyResponse {
        let body = Json(readiness(&state).await);
        if body.ready {
            ReadyResponse::Ready(body)
        } else {
            ReadyResponse::NotReady(body)
        }
    }

    /// Prometheus metrics
    ///
    /// Ingest requests by outcome and rejection reason, ingest latency, outbox backlog per topic,
    /// relay and consumer counters, consumer lag per partition.
    #[oai(path = "/metrics", method = "get", operation_id = "metrics")]
    async fn metrics(&self) -> PlainText<String> {
        PlainText(metrics_handle().render())
    }
}

/// Probes what `/readyz` reports: the database, the broker when configured, and the consumer
/// group of a `consume` process.
pub async fn readiness(state: &OpsState) -> Readiness {
    let database = match tokio::time::timeout(PROBE_TIMEOUT, state.db.ping()).await {
        Ok(Ok(())) => DependencyStatus {
            name: "database".into(),
            up: true,
            error: None,
        },
        Ok(Err(_)) => down("database", "the database did not answer"),
        Err(_) => down("database", "the database did not answer in time"),
    };
    let mut dependencies = vec![database];
    if state.config.kafka.brokers.is_some() {
        dependencies.push(
            match relay::bus::kafka::check_broker(&state.config.kafka, PROBE_TIMEOUT).await {
                Ok(()) => DependencyStatus {
                    name: "kafka".into(),
                    up: true,
                    error: None,
                },
                Err(_) => down(
                    "kafka",
                    "the broker did not answer a metadata request in time",
                ),
            },
        );
    }
    if let Some(health) = state.consumer.as_ref().and_then(|c| c.health()) {
        dependencies.push(if health.healthy() {
            DependencyStatus {
                name: "consumer".into(),
                up: true,
                error: None,
            }
        } else {
            DependencyStatus {
                name: "consumer".into(),
                up: false,
                error: Some(format!(
                    "partitions without a consumer: {:?}; stalled partitions of this process: {:?}",
                    health.unowned, health.stalled
                )),
            }
        });
    }
    let ready = dependencies.iter().all(|d| d.up);
    Readiness {
        ready,
        dependencies,
    }
}

fn down(name: &str, error: &str) -> DependencyStatus {
    DependencyStatus {
        name: name.into(),
        up: false,
        error: Some(error.into()),
    }
}

/// Keeps `service_ready` and `service_dependency_up{dependency}` current (probed every `every`,
/// never by a scrape), so an alert can see a process that is up but not ready.
pub async fn refresh_readiness_gauge(
    state: Arc<OpsState>,
    every: Duration,
    shutdown: CancellationToken,
) {
    while !shutdown.is_cancelled() {
        let readiness = readiness(&state).await;
        metrics::gauge!(relay::metrics::SERVICE_READY).set(if readiness.ready { 1.0 } else { 0.0 });
        for dependency in &readiness.dependencies {
            metrics::gauge!(relay::metrics::SERVICE_DEPENDENCY_UP, "dependency" => dependency.name.clone())
                .set(if dependency.up { 1.0 } else { 0.0 });
        }
        state.readiness.send_replace(Some(readiness));
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = tokio::time::sleep(every) => {}
        }
    }
}
