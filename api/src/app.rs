//! Wiring: the OpenAPI service, the HTTP app, and `Service::start`, which runs the chosen roles
//! (HTTP ingest, outbox relay, consumer) under one shutdown token.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use poem::{Endpoint, EndpointExt, Route};
use poem_openapi::OpenApiService;
use relay::bus;
use relay::consume::LagReporter;
use relay::publish::OutboxWakeup;
use relay::roles::{self, RelaySettings};
use sea_orm::DatabaseConnection;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::client_ip::IpPolicy;
use crate::config::{Config, Secret};
use crate::console::ConsoleKeys;
use crate::http_server::{self, HttpLimits};
use crate::ingest::{GroupCommit, IngestWriter};
use crate::middleware::{AllowedMethods, allow_on_405};
use crate::overview::Activity;
use crate::raw_body::BodyLimit;
use crate::routes::admin::AdminApi;
use crate::routes::contacts::ContactsApi;
use crate::routes::health::HealthApi;
use crate::routes::webhooks::WebhookApi;
use crate::signature::SignatureVerifier;
use crate::{db, dev, telemetry};

/// What the operations endpoints (`/healthz`, `/readyz`, `/metrics`) need; every role serves
/// them.
pub struct OpsState {
    pub config: Arc<Config>,
    pub db: DatabaseConnection,
    /// The consumer's view of its group (consume role over Kafka): part of readiness.
    pub consumer: Option<LagReporter>,
    /// The newest readiness probe of the gauge loop (the console's overview shows it too, so
    /// the broker is probed by one loop only).
    pub readiness: tokio::sync::watch::Sender<Option<crate::routes::health::Readiness>>,
}

/// Everything a request handler needs.
pub struct AppState {
    pub config: Arc<Config>,
    pub db: DatabaseConnection,
    pub verifier: SignatureVerifier,
    pub ip_policy: IpPolicy,
    pub writer: IngestWriter,
    /// The overview's sampler (`GET /api/admin/overview`, the console).
    pub activity: Activity,
    /// The console's session keys (`None`: no admin token, console off).
    pub console: Option<ConsoleKeys>,
}

type Apis = (WebhookApi, ContactsApi, AdminApi, HealthApi);

/// The OpenAPI service: used by the server, `acme-webhooks openapi` and the spec drift test.
/// Needs no database.
pub fn make_api_service() -> OpenApiService<Apis, ()> {
    OpenApiService::new(
        (WebhookApi, ContactsApi, AdminApi, HealthApi),
        "AcmeCRM webhook receiver",
        env!("CARGO_PKG_VERSION"),
    )
    .description(
        "Receives AcmeCRM's signed contact events. Each accepted event is stored with an outbox \
         row in one transaction before the 200; a relay publishes the outbox to Kafka \
         (`<prefix>.contact.created|updated|deleted`, keyed by contact id) and a consumer applies \
         every event exactly once to the contacts mirror.\n\n\
         Every error answer has the shape `{\"code\", \"message\", \"details\"?}`.",
    )
}

/// The spec as YAML, as checked in at `openapi.yaml`.
pub fn openapi_yaml() -> String {
    make_api_service().spec_yaml()
}

/// The endpoints of a process that runs no HTTP API (`relay`, `consume`): the operations
/// endpoints alone, on `http.bind`.
pub fn ops_app(ops: Arc<OpsState>) -> impl Endpoint {
    let api = OpenApiService::new(
        HealthApi,
        "acme-webhooks operations",
        env!("CARGO_PKG_VERSION"),
    );
    let allowed = AllowedMethods::of::<HealthApi>();
    Route::new()
        .nest("/", api)
        .data(ops)
        .around(move |next, request| allow_on_405(next, request, allowed.clone()))
        .around(crate::middleware::observe)
}

/// The HTTP application around `state`.
pub fn http_app(state: Arc<AppState>, ops: Arc<OpsState>) -> impl Endpoint {
    let api = make_api_service();
    let docs = api.swagger_ui();
    let spec_json = api.spec_endpoint();
    let spec_yaml = api.spec_endpoint_yaml();
    let limit = BodyLimit(state.config.http.max_body_bytes);
    let body_timeout = Duration::from_secs(state.config.http.body_read_timeout_secs);
    let allowed = AllowedMethods::of::<Apis>();
    Route::new()
        .nest("/", api)
        .nest("/console", crate::console::routes())
        .nest("/docs", docs)
        .at("/openapi.json", spec_json)
        .at("/openapi.yaml", spec_yaml)
        .data(state)
        .data(ops)
        .data(limit)
        .around(move |next, request| {
            crate::middleware::read_body_within(next, request, body_timeout)
        })
        .around(move |next, request| allow_on_405(next, request, allowed.clone()))
        .around(crate::middleware::observe)
}

/// Which roles this process runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Roles {
    pub http: bool,
    pub relay: bool,
    pub consumer: bool,
}

impl Roles {
    /// The roles as the metrics catalog names them.
    pub fn metric_roles(self) -> Vec<relay::metrics::Role> {
        use relay::metrics::Role;
        [
            (self.http, Role::Http),
            (self.relay, Role::Relay),
            (self.consumer, Role::Consumer),
        ]
        .into_iter()
        .filter_map(|(on, role)| on.then_some(role))
        .collect()
    }

    pub const ALL: Self = Self {
        http: true,
        relay: true,
        consumer: true,
    };
    pub const HTTP: Self = Self {
        http: true,
        relay: false,
        consumer: false,
    };
    pub const RELAY: Self = Self {
        http: false,
        relay: true,
        consumer: false,
    };
    pub const CONSUMER: Self = Self {
        http: false,
        relay: false,
        consumer: true,
    };
}

/// A running service.
pub struct Service {
    /// Where the HTTP server listens (the API, or only the operations endpoints).
    pub http_addr: Option<SocketAddr>,
    /// The webhook secrets in force (generated ones included), for the startup banner.
    pub secrets: Vec<Secret>,
    pub db: DatabaseConnection,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

impl Service {
    /// Connects, migrates (if configured), and starts `roles`. `listener` overrides `http.bind`
    /// (tests pass a port-0 listener).
    pub async fn start(
        config: Config,
        roles: Roles,
        listener: Option<std::net::TcpListener>,
    ) -> anyhow::Result<Self> {
        let config = Arc::new(config);
        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();
        telemetry::metrics_handle();
        telemetry::register_metrics(&roles.metric_roles());

        let db = db::connect(&config)
            .await
            .context("connecting to the database")?;
        if config.database.auto_migrate {
            db::migrate(&db).await.context("migrating the database")?;
        }
        let (sink, source) = bus::new_pair(&config.kafka, roles.relay, roles.consumer).await?;
        let wakeup = OutboxWakeup::default();
        let background = roles::Background::new(config.ingest.background_nice);
        if roles.relay {
            let settings = RelaySettings {
                kafka: config.kafka.clone(),
                relay: config.relay.clone(),
                retention: config.retention.clone(),
            };
            roles::spawn_relay(
                &mut tasks,
                &background,
                &db,
                settings,
                sink,
                &wakeup,
                &shutdown,
            )
            .await?;
        }
        let consumer = if roles.consumer {
            let lag_every = config.metrics.backlog_refresh();
            let settings = config.consumer.clone();
            roles::spawn_consumer(
                &mut tasks,
                &background,
                &db,
                settings,
                source,
                lag_every,
                &shutdown,
            )
            .await?
        } else {
            None
        };
        let ops = Arc::new(OpsState {
            config: config.clone(),
            db: db.clone(),
            consumer,
            readiness: tokio::sync::watch::Sender::new(None),
        });
        let (http_addr, secrets) =
            spawn_http(&mut tasks, roles, ops.clone(), wakeup, listener, &shutdown)?;
        spawn_gauges(&mut tasks, ops, &shutdown);
        Ok(Self {
            http_addr,
            secrets,
            db,
            shutdown,
            tasks,
        })
    }

    /// A token that stops the service when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops every role gracefully: no new requests, in-flight ones answered, the relay's batch
    /// finished, consumer offsets committed.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
    }

    /// Runs until `shutdown` is cancelled (or a role ends), then stops.
    pub async fn wait(mut self) {
        tokio::select! {
            biased;
            () = self.shutdown.cancelled() => {}
            _ = self.tasks.join_next() => tracing::error!("a role stopped unexpectedly; shutting down"),
        }
        self.stop().await;
    }
}

/// Serves HTTP on `listener` (else `http.bind`): the whole API when `roles.http` (with the
/// group-commit writers behind it), otherwise the operations endpoints alone. Returns the
/// address and the webhook secrets in force.
fn spawn_http(
    tasks: &mut JoinSet<()>,
    roles: Roles,
    ops: Arc<OpsState>,
    wakeup: OutboxWakeup,
    listener: Option<std::net::TcpListener>,
    shutdown: &CancellationToken,
) -> anyhow::Result<(Option<SocketAddr>, Vec<Secret>)> {
    let config = ops.config.clone();
    let mut secrets = Vec::new();
    let app = if roles.http {
        secrets = dev::resolve_secrets(&config)?;
        let activity = Activity::new(ops.clone());
        // The overview samples only while someone may read it: the admin API is on.
        if config.admin.token.is_some() {
            tasks.spawn(activity.clone().run(shutdown.clone()));
        }
        let state = Arc::new(AppState {
            config: config.clone(),
            db: ops.db.clone(),
            verifier: SignatureVerifier::new(secrets.iter().map(Secret::expose)),
            ip_policy: IpPolicy::new(
                config.webhook.allowed_ips.clone(),
                config.webhook.trusted_proxies.clone(),
            ),
            writer: IngestWriter::spawn(
                ops.db.clone(),
                config.kafka.clone(),
                wakeup,
                GroupCommit {
                    batch_max: config.ingest.batch_max,
                    writers: config.ingest.writers,
                },
            ),
            activity,
            console: config.admin.token.as_ref().map(ConsoleKeys::new),
        });
        http_app(state, ops).map_to_response().boxed()
    } else {
        ops_app(ops).map_to_response().boxed()
    };
    let listener = match listener {
        Some(listener) => listener,
        None => std::net::TcpListener::bind(config.http.bind)
            .with_context(|| format!("binding http.bind = {}", config.http.bind))?,
    };
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let http_addr = Some(listener.local_addr()?);
    let limits = HttpLimits::from_config(&config.http);
    let stop = shutdown.clone();
    tasks.spawn(async move {
        if let Err(error) = http_server::serve(listener, app, limits, stop).await {
            tracing::error!(%error, "HTTP server failed");
        }
    });
    Ok((http_addr, secrets))
}

/// Keeps the gauges every role exports current: readiness, and the backlog from the database.
fn spawn_gauges(tasks: &mut JoinSet<()>, ops: Arc<OpsState>, shutdown: &CancellationToken) {
    let every = ops.config.metrics.backlog_refresh();
    let topics = relay::EVENT_TYPES
        .iter()
        .map(|t| ops.config.kafka.topic_for(t))
        .collect();
    tasks.spawn(relay::outbox::refresh_backlog_gauges(
        ops.db.clone(),
        topics,
        every,
        shutdown.clone(),
    ));
    // A readiness probe opens a Kafka client of its own: less often than the backlog query.
    tasks.spawn(crate::routes::health::refresh_readiness_gauge(
        ops,
        3 * every,
        shutdown.clone(),
    ));
    tasks.spawn(telemetry::fold_histograms(every, shutdown.clone()));
}

#[cfg(test)]
mod tests {
    /// `openapi.yaml` at the repository root is what the code generates.
    /// Regenerate it with `UPDATE_OPENAPI=1 cargo test -p acme-webhooks openapi`.
    #[test]
    fn openapi_yaml_matches_the_code() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../openapi.yaml");
        let generated = super::openapi_yaml();
        if std::env::var_os("UPDATE_OPENAPI").is_some() {
            std::fs::write(path, &generated).expect("write openapi.yaml");
            return;
        }
        let checked_in = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            checked_in == generated,
            "openapi.yaml is out of date: run `UPDATE_OPENAPI=1 cargo test -p acme-webhooks openapi`"
        );
    }

    #[test]
    fn the_spec_documents_the_webhook_operation() {
        let yaml = super::openapi_yaml();
        for needle in [
            "/api/webhooks:",
            "X-Acme-Signature",
            "X-Acme-Timestamp",
            "evt_123456789",
            "'401':",
            "'413':",
            "'415':",
            "/api/admin/events:",
            "bearer",
        ] {
            assert!(yaml.contains(needle), "the spec lacks {needle}");
        }
    }
}
