//! Test harness: a Postgres database per test (cloned from a migrated template, dropped when the
//! test ends), a unique topic prefix and consumer group per test, the service started in-process
//! on a port-0 listener, and signed-request helpers.
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

/// A database of one test's own, dropped (`WITH (FORCE)`: whatever is still connected to it is
/// cut off) when this guard goes, at the end of the test or while a panic unwinds it. Derefs to
/// its URL, so `test_config(&db)` takes it. Keep it bound (`let db = fresh_database().await;`)
/// until the test ends: `test_config(&fresh_database().await)` drops it at the end of that line.
/// A test process that is killed (nextest's timeout) leaves its database behind. The drop is not
/// free: PostgreSQL runs a checkpoint for every DROP DATABASE, and the test waits for it (about
/// half a second on the 2-core test machine with `fsync=on`, more while other tests write).
pub struct TestDatabase {
    url: String,
    name: String,
}

impl TestDatabase {
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl std::ops::Deref for TestDatabase {
    type Target = str;

    fn deref(&self) -> &str {
        &self.url
    }
}

impl std::fmt::Display for TestDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url)
    }
}

impl Drop for TestDatabase {
    /// Drop is synchronous and may run inside the test's runtime, even while it shuts down: the
    /// DROP DATABASE runs on a thread of its own with a runtime of its own, joined here.
    fn drop(&mut self) {
        let name = std::mem::take(&mut self.name);
        let dropped = std::thread::spawn({
            let name = name.clone();
            move || -> Result<(), String> {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                runtime.block_on(async {
                    let admin = admin_connection().await.map_err(|e| e.to_string())?;
                    let dropped = admin
                        .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await
                        .map(drop)
                        .map_err(|e| e.to_string());
                    let _ = admin.close().await;
                    dropped
                })
            }
        })
        .join();
        // Never a panic here: one during an unwind would abort the test process.
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(error)) => eprintln!("test database {name} left behind: {error}"),
            Err(_) => eprintln!("test database {name} left behind: its drop panicked"),
        }
    }
}

/// One connection to the admin database (a session: advisory locks are held by it).
async fn admin_connection() -> Result<DatabaseConnection, sea_orm::DbErr> {
    let mut options = sea_orm::ConnectOptions::new(admin_database_url());
    options
        .max_connections(1)
        .min_connections(1)
        .sqlx_logging(false);
    Database::connect(options).await
}

/// The URL of database `name` on the test server.
fn database_url(name: &str) -> String {
    let admin_url = admin_database_url();
    let base = admin_url
        .rsplit_once('/')
        .map_or(admin_url.as_str(), |(base, _)| base);
    format!("{base}/{name}")
}

/// Creates a database of its own for one test, cloned from the migrated template (see
/// [`template_database`]): the service's start-up migration finds nothing to do.
pub async fn fresh_database() -> TestDatabase {
    let template = template_database().await;
    create_database(&format!("TEMPLATE {template}")).await
}

/// Creates an EMPTY database of its own for one test (no tables, no migrations applied): for a
/// test that the service migrates a new database at start.
pub async fn empty_database() -> TestDatabase {
    create_database("").await
}

async fn create_database(options: &str) -> TestDatabase {
    let admin = admin_connection()
        .await
        .expect("connect to the test PostgreSQL server");
    let name = unique("acme_test");
    admin
        .execute_unprepared(&format!("CREATE DATABASE {name} {options}"))
        .await
        .expect("create test database");
    let _ = admin.close().await;
    TestDatabase {
        url: database_url(&name),
        name,
    }
}

/// The name of the template every test database is cloned from: `acme_test_template_` and a
/// hash of the migration set (the names `migration::Migrator` lists and the text of
/// migration/src), so a changed migration makes a new template and checkouts with the same
/// migrations share one. Nextest runs each test in a process of its own: the first process to
/// need a template builds it under an advisory lock on the admin database, the others wait for
/// it; it is built once per migration set, not per run, and stays on the server (drop it with
/// `ALTER DATABASE … IS_TEMPLATE false; DROP DATABASE …` when its migrations are gone).
pub async fn template_database() -> String {
    static TEMPLATE: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
    TEMPLATE.get_or_init(build_template).await.clone()
}

/// A key of the two-int advisory lock space for the template's build: "acmt", 1 (retention's
/// lock is "acmr", 1, and is taken in the test databases, not in the admin one).
const TEMPLATE_LOCK: (i32, i32) = (0x6163_6d74, 1);

fn migration_set_hash() -> String {
    use migration::MigratorTrait;
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    for migration in migration::Migrator::migrations() {
        hash.update(migration.name().as_bytes());
        hash.update(b"\n");
    }
    let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../migration/src"));
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(|e| Some(e.ok()?.path())).collect())
        .unwrap_or_default();
    files.sort();
    for file in files {
        if let Ok(text) = std::fs::read(&file) {
            hash.update(file.file_name().unwrap_or_default().as_encoded_bytes());
            hash.update(&text);
        }
    }
    hex::encode(&hash.finalize()[..8])
}

async fn build_template() -> String {
    let name = format!("acme_test_template_{}", migration_set_hash());
    let ready =
        format!("SELECT COUNT(*) FROM pg_database WHERE datname = '{name}' AND datistemplate");
    let admin = admin_connection()
        .await
        .expect("connect to the test PostgreSQL server");
    if count(&admin, &ready).await == 1 {
        let _ = admin.close().await;
        return name;
    }
    let (class, key) = TEMPLATE_LOCK;
    admin
        .execute_unprepared(&format!("SELECT pg_advisory_lock({class}, {key})"))
        .await
        .expect("the template's lock");
    // Another process may have built it while this one waited.
    if count(&admin, &ready).await == 0 {
        // Not a template yet: a build that died half-way. Start again.
        admin
            .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await
            .expect("drop a half-built template");
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create the template");
        let db = Database::connect(database_url(&name))
            .await
            .expect("connect to the template");
        // What the service runs at start (`database.auto_migrate`).
        api::db::migrate(&db).await.expect("migrate the template");
        // Nobody may be connected to a template while it is cloned.
        db.close().await.expect("disconnect from the template");
        // The mark that it is complete (and what lets it be cloned by name).
        admin
            .execute_unprepared(&format!("ALTER DATABASE {name} WITH IS_TEMPLATE true"))
            .await
            .expect("mark the template");
    }
    admin
        .execute_unprepared(&format!("SELECT pg_advisory_unlock({class}, {key})"))
        .await
        .expect("release the template's lock");
    let _ = admin.close().await;
    name
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
    /// The database the app was made with, if it owns it: dropped with the app (the last field,
    /// so after the service and the connections).
    pub database: Option<TestDatabase>,
}

impl TestApp {
    /// HTTP role only, on a fresh database (no broker needed).
    pub async fn http_only() -> Self {
        let database = fresh_database().await;
        Self::start(test_config(&database), Roles::HTTP)
            .await
            .owning(database)
    }

    /// Every role, against the shared test broker.
    pub async fn with_kafka() -> Self {
        let database = fresh_database().await;
        let mut config = test_config(&database);
        config.kafka.brokers = Some(kafka_brokers());
        Self::start(config, Roles::ALL).await.owning(database)
    }

    /// This app with `database`, which is then dropped with it.
    pub fn owning(mut self, database: TestDatabase) -> Self {
        self.database = Some(database);
        self
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
            database: None,
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

/// The longest a fresh reader's first message waits for its consumer group to form.
const GROUP_FORMS: Duration = Duration::from_secs(30);

/// Reads `topics` from the beginning with a fresh consumer group until `expected` messages
/// arrived, or nothing new came for `idle`. The first message may take longer: it waits for the
/// group to form, which a broker that just restarted answers only once its group coordinator has
/// loaded (seen to take over 5 s on a loaded machine).
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
        let wait = if messages.is_empty() {
            idle.max(GROUP_FORMS)
        } else {
            idle
        };
        let Ok(received) = tokio::time::timeout(wait, consumer.recv()).await else {
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
