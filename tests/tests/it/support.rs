//! Test harness: a fresh Postgres database per test, a unique topic prefix and consumer group per
//! test, the service started in-process on a port-0 listener, and signed-request helpers.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use api::config::{Config, Secret};
use api::{Roles, Service};
use chrono::Utc;
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, Statement};
use serde_json::{Value, json};

pub const SECRET: &str = "test-secret";

/// Admin URL of the test PostgreSQL server (scripts/test exports it).
pub fn admin_database_url() -> String {
    std::env::var("ACME_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// Bootstrap servers of the shared test broker (scripts/test starts one).
pub fn kafka_brokers() -> String {
    std::env::var("ACME_TEST_KAFKA_BROKERS")
        .expect("ACME_TEST_KAFKA_BROKERS is not set: run the tests with scripts/test")
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// Creates an empty database of its own for one test; returns its URL.
pub async fn fresh_database() -> String {
    let admin_url = admin_database_url();
    let admin = Database::connect(&admin_url)
        .await
        .expect("connect to the test PostgreSQL server");
    let name = unique("acme_test");
    admin
        .execute_unprepared(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create test database");
    let base = admin_url
        .rsplit_once('/')
        .map_or(admin_url.as_str(), |(base, _)| base);
    format!("{base}/{name}")
}

/// Configuration of one test: its own database, secret, topics and group.
pub fn test_config(database_url: &str) -> Config {
    let mut config = Config::defaults();
    config.database.url = Some(Secret::new(database_url));
    config.database.max_connections = 10;
    config.webhook.secrets = vec![Secret::new(SECRET)];
    config.kafka.topic_prefix = unique("t");
    config.kafka.group_id = unique("g");
    config.kafka.partitions = 2;
    config.kafka.message_timeout_ms = 5000;
    config.relay.poll_interval_ms = 200;
    config.relay.backoff_base_ms = 100;
    config.relay.backoff_max_ms = 1000;
    config.consumer.backoff_base_ms = 50;
    config.consumer.backoff_max_ms = 500;
    config.metrics.backlog_refresh_secs = 1;
    config
}

/// A running service and a client for it.
pub struct TestApp {
    pub config: Config,
    pub service: Option<Service>,
    pub addr: Option<SocketAddr>,
    pub client: reqwest::Client,
    pub db: DatabaseConnection,
}

impl TestApp {
    /// HTTP role only, on a fresh database (no broker needed).
    pub async fn http_only() -> Self {
        let url = fresh_database().await;
        Self::start(test_config(&url), Roles::HTTP).await
    }

    /// Every role, against the shared test broker.
    pub async fn with_kafka() -> Self {
        let url = fresh_database().await;
        let mut config = test_config(&url);
        config.kafka.brokers = Some(kafka_brokers());
        Self::start(config, Roles::ALL).await
    }

    pub async fn start(config: Config, roles: Roles) -> Self {
        // Logs go to the test's captured output; RUST_LOG raises the level.
        api::telemetry::init_tracing(&api::config::LogConfig {
            format: api::config::LogFormat::Text,
            filter: "warn".into(),
        });
        // Every role serves HTTP: the API, or the operations endpoints alone.
        let listener = Some(std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0"));
        let service = Service::start(config.clone(), roles, listener)
            .await
            .expect("service starts");
        let db = connect(&config).await;
        Self {
            addr: service.http_addr,
            service: Some(service),
            config,
            client: reqwest::Client::new(),
            db,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr.expect("the HTTP role runs"))
    }

    /// Posts `body` signed with the test secret and a current timestamp.
    pub async fn post_signed(&self, body: &str) -> reqwest::Response {
        self.post_with(body, Some(&sign(SECRET, body)), Some(&now_header()), &[])
            .await
    }

    /// Posts a JSON event signed with the test secret.
    pub async fn post_signed_json(&self, body: &Value) -> reqwest::Response {
        self.post_signed(&body.to_string()).await
    }

    /// Posts `body` with exactly the given signature/timestamp headers and extra headers.
    pub async fn post_with(
        &self,
        body: &str,
        signature: Option<&str>,
        timestamp: Option<&str>,
        extra: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut request = self
            .client
            .post(self.url("/api/webhooks"))
            .header("Content-Type", "application/json")
            .body(body.to_owned());
        if let Some(signature) = signature {
            request = request.header("X-Acme-Signature", signature);
        }
        if let Some(timestamp) = timestamp {
            request = request.header("X-Acme-Timestamp", timestamp);
        }
        for (name, value) in extra {
            request = request.header(*name, *value);
        }
        request.send().await.expect("request sent")
    }

    pub async fn count(&self, sql: &str) -> i64 {
        count(&self.db, sql).await
    }

    /// Waits until `sql` (a COUNT query) returns `expected`; panics with the last value otherwise.
    pub async fn wait_for_count(&self, sql: &str, expected: i64, timeout: Duration) {
        wait_for_count(&self.db, sql, expected, timeout).await;
    }

    /// `GET /readyz`: its status and its body.
    pub async fn readiness(&self) -> (u16, Value) {
        let response = self
            .client
            .get(self.url("/readyz"))
            .send()
            .await
            .expect("readyz");
        let status = response.status().as_u16();
        (status, response.json().await.expect("a JSON body"))
    }

    pub async fn stop(&mut self) {
        if let Some(service) = self.service.take() {
            service.stop().await;
        }
    }
}

pub async fn connect(config: &Config) -> DatabaseConnection {
    Database::connect(config.database_url())
        .await
        .expect("connect to the test database")
}

/// Polls `probe` every 100 ms until it returns `expected`; panics naming `what` and the last
/// value after `timeout`.
pub async fn wait_until<T, F>(
    what: &str,
    expected: T,
    timeout: Duration,
    mut probe: impl FnMut() -> F,
) where
    T: PartialEq + std::fmt::Debug,
    F: std::future::Future<Output = T>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let value = probe().await;
        if value == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} stayed at {value:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `sql` (a COUNT query) returns `expected`.
pub async fn wait_for_count(db: &DatabaseConnection, sql: &str, expected: i64, timeout: Duration) {
    wait_until(&format!("`{sql}`"), expected, timeout, || count(db, sql)).await;
}

pub async fn count(db: &DatabaseConnection, sql: &str) -> i64 {
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            sql.to_owned(),
        ))
        .await
        .expect("count query")
        .expect("one row");
    row.try_get_by_index::<i64>(0).expect("an integer")
}

pub fn sign(secret: &str, body: &str) -> String {
    format!(
        "sha256={}",
        api::signature::sign(secret.as_bytes(), body.as_bytes())
    )
}

pub fn now_header() -> String {
    Utc::now().timestamp().to_string()
}

/// A valid `contact.created`/`contact.updated` body.
pub fn contact_event(event: &str, event_id: &str, contact_id: &str, updated_at: &str) -> Value {
    json!({
        "event": event,
        "timestamp": updated_at,
        "id": event_id,
        "data": {
            "id": contact_id,
            "firstName": "John",
            "lastName": format!("Smith-{event_id}"),
            "email": format!("{contact_id}@example.com"),
            "phone": "555-987-6543",
            "company": "Acme Inc",
            "title": "Senior Engineer",
            "createdAt": "2025-05-19T00:00:00.000Z",
            "updatedAt": updated_at
        }
    })
}

pub fn delete_event(event_id: &str, contact_id: &str, timestamp: &str) -> Value {
    json!({ "event": "contact.deleted", "timestamp": timestamp, "id": event_id, "data": { "id": contact_id } })
}

/// An Apache Kafka cluster of a test's own, run by `scripts/kafka` in a directory of its own,
/// which the test may kill and restart on the same ports, with its data.
pub struct OwnBroker {
    dir: std::path::PathBuf,
    nodes: i32,
    brokers: String,
}

fn kafka_script() -> String {
    std::env::var("ACME_TEST_KAFKA_SCRIPT")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/kafka").to_owned())
}

impl OwnBroker {
    /// One node.
    pub fn start() -> Self {
        Self::start_nodes(1)
    }

    /// `nodes` combined broker + controller nodes (`node.id` 1 to `nodes`); from 3 on, topics
    /// default to replication factor 3 with `min.insync.replicas` 2.
    pub fn start_nodes(nodes: i32) -> Self {
        let mut cluster = Self {
            dir: std::env::temp_dir().join(unique("acme-kafka")),
            nodes,
            brokers: String::new(),
        };
        cluster.brokers = cluster.run_start(Some(nodes));
        cluster
    }

    pub fn brokers(&self) -> String {
        self.brokers.clone()
    }

    /// `scripts/kafka start`: creates the cluster, or restarts the nodes that are down.
    fn run_start(&self, nodes: Option<i32>) -> String {
        let mut command = Command::new(kafka_script());
        command.arg("start").arg("--dir").arg(&self.dir);
        if let Some(nodes) = nodes {
            command.args(["--nodes", &nodes.to_string()]);
        }
        let output = command.output().expect("run scripts/kafka");
        assert!(
            output.status.success(),
            "scripts/kafka start failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .find_map(|line| line.strip_prefix("KAFKA_BROKERS="))
            .expect("a KAFKA_BROKERS= line")
            .to_owned()
    }

    /// Starts the nodes that are down again, on their ports, with their data.
    pub fn restart(&mut self) {
        self.run_start(None);
    }

    /// SIGKILL of node `id` (its `node.id`).
    pub fn kill(&self, id: i32) {
        if let Ok(pid) = std::fs::read_to_string(self.dir.join(format!("node-{id}.pid"))) {
            let _ = Command::new("kill").args(["-9", pid.trim()]).status();
        }
    }

    /// SIGKILL of every node.
    pub fn stop(&mut self) {
        for id in 1..=self.nodes {
            self.kill(id);
        }
    }

    /// The node leading each partition of `topic`.
    pub fn leaders(&self, topic: &str) -> std::collections::BTreeMap<i32, i32> {
        self.partitions(topic)
            .into_iter()
            .map(|(partition, (leader, _))| (partition, leader))
            .collect()
    }

    /// Each partition of `topic`: its leader and how many replicas it has.
    pub fn partitions(&self, topic: &str) -> std::collections::BTreeMap<i32, (i32, usize)> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let client: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .create()
            .expect("metadata client");
        let metadata = client
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("metadata");
        metadata.topics()[0]
            .partitions()
            .iter()
            .map(|p| (p.id(), (p.leader(), p.replicas().len())))
            .collect()
    }
}

impl Drop for OwnBroker {
    /// Kills every node (a clean stop takes seconds per node) and deletes the cluster.
    fn drop(&mut self) {
        self.stop();
        let _ = Command::new(kafka_script())
            .arg("stop")
            .arg("--dir")
            .arg(&self.dir)
            .arg("--purge")
            .stderr(Stdio::null())
            .status();
    }
}

/// One message read back from Kafka.
#[derive(Debug, Clone)]
pub struct ReadMessage {
    pub topic: String,
    pub key: String,
    pub payload: Value,
    pub headers: std::collections::BTreeMap<String, String>,
}

/// Reads `topics` from the beginning with a fresh consumer group until `expected` messages
/// arrived, or nothing new came for `idle`.
pub async fn read_topics(
    brokers: &str,
    topics: &[String],
    expected: usize,
    idle: Duration,
) -> Vec<ReadMessage> {
    use rdkafka::Message;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::Headers;

    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("test consumer");
    let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics).expect("subscribe");
    let mut messages = Vec::new();
    while messages.len() < expected {
        let Ok(received) = tokio::time::timeout(idle, consumer.recv()).await else {
            break;
        };
        let message = received.expect("kafka message");
        let mut headers = std::collections::BTreeMap::new();
        if let Some(h) = message.headers() {
            for header in h.iter() {
                let value = header
                    .value
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default();
                headers.insert(header.key.to_owned(), value);
            }
        }
        messages.push(ReadMessage {
            topic: message.topic().to_owned(),
            key: String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned(),
            payload: serde_json::from_slice(message.payload().unwrap_or_default())
                .unwrap_or(Value::Null),
            headers,
        });
    }
    messages
}

/// The dependency `name` of a `/readyz` body (`up`, `error`), `Null` when it is not listed.
pub fn dependency(readiness: &Value, name: &str) -> Value {
    readiness["dependencies"]
        .as_array()
        .and_then(|dependencies| dependencies.iter().find(|d| d["name"] == name))
        .cloned()
        .unwrap_or_default()
}

/// Roles that take webhooks and publish them, without consuming.
pub const INGEST_AND_RELAY: Roles = Roles {
    http: true,
    relay: true,
    consumer: false,
};

/// AcmeCRM in the background: creates `evt-<i>` of `contact-<i>` one after another, about 100/s,
/// each posted again until it gets its 200, while `sending` holds and until `max` were
/// acknowledged; yields how many were.
pub fn send_creates_until(
    app: std::sync::Arc<TestApp>,
    sending: std::sync::Arc<std::sync::atomic::AtomicBool>,
    max: usize,
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let mut acknowledged = 0;
        while acknowledged < max && sending.load(std::sync::atomic::Ordering::Relaxed) {
            let i = acknowledged;
            let event = contact_event(
                "contact.created",
                &format!("evt-{i}"),
                &format!("contact-{i}"),
                "2025-05-19T10:00:00Z",
            );
            while app.post_signed_json(&event).await.status() != 200 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            acknowledged += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        acknowledged
    })
}
