//! The real `acme-webhooks` process: configured through its environment, stopped with SIGTERM,
//! its log output read back. What an operator runs, not the in-process `Service`.
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api::config::Config;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::support::*;

const DRAIN: Duration = Duration::from_secs(60);

/// One running service process and every line it wrote to stderr (where logs go).
pub struct ServiceProcess {
    child: Child,
    pub addr: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
    workdir: PathBuf,
}

impl ServiceProcess {
    /// Starts the binary (every role) with `config` expressed as `ACME_WEBHOOKS_*` variables
    /// (plus `extra`), in an empty working directory, and waits until `/healthz` answers.
    pub async fn start(config: &Config, extra: &[(&str, &str)]) -> Self {
        Self::start_role(config, None, extra).await
    }

    /// Starts the binary as `acme-webhooks <role>` (`serve`, `relay`, `consume`), or with every
    /// role when `role` is `None`.
    pub async fn start_role(config: &Config, role: Option<&str>, extra: &[(&str, &str)]) -> Self {
        let addr = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
            probe.local_addr().expect("addr")
        };
        let workdir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(unique("process"));
        std::fs::create_dir_all(&workdir).expect("workdir");
        let mut command = Command::new(env!("CARGO_BIN_EXE_acme-webhooks-under-test"));
        command.args(role);
        command
            .current_dir(&workdir)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("ACME_WEBHOOKS_HTTP__BIND", addr.to_string())
            .env("ACME_WEBHOOKS_DATABASE__URL", config.database_url())
            .env("ACME_WEBHOOKS_WEBHOOK__SECRETS", SECRET)
            .env(
                "ACME_WEBHOOKS_KAFKA__TOPIC_PREFIX",
                &config.kafka.topic_prefix,
            )
            .env("ACME_WEBHOOKS_KAFKA__GROUP_ID", &config.kafka.group_id)
            .env(
                "ACME_WEBHOOKS_KAFKA__PARTITIONS",
                config.kafka.partitions.to_string(),
            )
            .envs(extra.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(brokers) = &config.kafka.brokers {
            command.env("ACME_WEBHOOKS_KAFKA__BROKERS", brokers);
        }
        let mut child = command.spawn().expect("start the service binary");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("stderr is piped");
        let sink = logs.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                sink.lock().expect("log lines").push(line);
            }
        });
        let process = Self {
            child,
            addr,
            logs,
            workdir,
        };
        process.wait_until_healthy().await;
        process
    }

    async fn wait_until_healthy(&self) {
        let client = reqwest::Client::new();
        let url = self.url("/healthz");
        for _ in 0..300 {
            if let Ok(response) = client.get(&url).send().await
                && response.status() == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "the service did not become healthy:\n{}",
            self.logs().join("\n")
        );
    }

    /// Name and nice value of each of the process's threads.
    pub fn threads(&self) -> Vec<(String, i32)> {
        let pid = self.child.id().expect("the service runs");
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("its threads");
        tasks
            .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("stat")).ok())
            .filter_map(|stat| {
                let (head, rest) = stat.rsplit_once(") ")?;
                let name = head.split_once(" (")?.1.to_owned();
                // After the name: state, ppid, ... and the nice value 17th.
                let nice = rest.split(' ').nth(16)?.parse().ok()?;
                Some((name, nice))
            })
            .collect()
    }

    /// Posts `body` to `/api/webhooks` signed with the test secret, with `extra` headers.
    pub async fn post_webhook(&self, body: String, extra: &[(&str, &str)]) -> reqwest::Response {
        let mut request = reqwest::Client::new()
            .post(self.url("/api/webhooks"))
            .header("Content-Type", "application/json")
            .header("X-Acme-Signature", sign(SECRET, &body))
            .header("X-Acme-Timestamp", now_header());
        for (name, value) in extra {
            request = request.header(*name, *value);
        }
        request.body(body).send().await.expect("post")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().expect("log lines").clone()
    }

    /// SIGKILL: the process dies at once, with no chance to clean up.
    pub async fn kill(&mut self) {
        self.child.start_kill().expect("kill -9");
        let _ = self.child.wait().await;
    }

    /// Sends SIGTERM (what systemd, Kubernetes and `docker stop` send) and waits for the exit.
    pub async fn terminate(&mut self) -> ExitStatus {
        let pid = self.child.id().expect("the service is running");
        let sent = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await
            .expect("run kill");
        assert!(sent.success(), "kill -TERM {pid}");
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("the service exits within 30 s of SIGTERM")
            .expect("wait for the service")
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.workdir);
    }
}

/// Posts signed events one after another until `stop` is set or the server goes away; returns
/// the ids of the events that got a 200.
pub async fn post_until_stopped(
    url: String,
    prefix: &'static str,
    stop: Arc<AtomicBool>,
) -> BTreeSet<String> {
    let client = reqwest::Client::new();
    let mut acknowledged = BTreeSet::new();
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        let id = format!("{prefix}-{i}");
        let body = contact_event(
            "contact.updated",
            &id,
            &format!("contact-{}", i % 20),
            "2025-05-19T00:00:00Z",
        )
        .to_string();
        let sent = client
            .post(&url)
            .header("Content-Type", "application/json")
            .header("X-Acme-Signature", sign(SECRET, &body))
            .header("X-Acme-Timestamp", now_header())
            .body(body)
            .send()
            .await;
        match sent {
            Ok(response) if response.status() == 200 => {
                acknowledged.insert(id);
            }
            Ok(_) => {}
            Err(_) => break, // the server is gone
        }
        i += 1;
    }
    acknowledged
}

/// SIGTERM while webhooks keep arriving: the process finishes in-flight work and exits 0, and
/// after a restart every acknowledged event is processed, exactly once.
///
/// The relay's re-publish safety net is off: Tansu 0.6 answers a consumer that resumes at an
/// offset inside a record batch with the NEXT batch (which once left 24 to 125 events per run
/// `pending`); the consumer notices the jump and seeks back until the broker serves its offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_loses_no_acknowledged_event() {
    let database = fresh_database().await;
    let mut config = test_config(&database);
    config.kafka.brokers = Some(kafka_brokers());
    let safety_net = [("ACME_WEBHOOKS_RELAY__REPUBLISH_AFTER_SECS", "0")];
    let mut service = ServiceProcess::start(&config, &safety_net).await;
    let stop = Arc::new(AtomicBool::new(false));
    let sender = tokio::spawn(post_until_stopped(
        service.url("/api/webhooks"),
        "evt-load",
        stop.clone(),
    ));
    // SIGTERM while the load runs: once a few dozen events are in (however busy the machine).
    let db = connect(&config).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while count(&db, "SELECT COUNT(*) FROM webhook_events").await < 30 && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = service.terminate().await;
    stop.store(true, Ordering::Relaxed);
    let acknowledged = sender.await.expect("sender");
    assert!(status.success(), "clean exit after SIGTERM: {status}");
    assert!(
        acknowledged.len() > 10,
        "the load ran ({} acknowledged)",
        acknowledged.len()
    );

    let _restarted = ServiceProcess::start(&config, &safety_net).await;
    let db = connect(&config).await;
    wait_for_count(
        &db,
        "SELECT COUNT(*) FROM webhook_events WHERE status = 'processed'",
        acknowledged.len() as i64,
        DRAIN,
    )
    .await;
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM webhook_events").await,
        acknowledged.len() as i64,
        "only acknowledged events were stored"
    );
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM webhook_events WHERE attempts <> 1"
        )
        .await,
        0,
        "each event was applied exactly once"
    );
}

/// `log.format = "json"`: every line is a JSON object; the request id and the event id follow
/// the event through ingest, relay and consumer; no secret, signature or payload is logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_request_and_event_ids_and_no_secrets() {
    // An empty database: the real binary migrates it at start (every other test gets one
    // cloned from the migrated template).
    let database = empty_database().await;
    let mut config = test_config(&database);
    config.kafka.brokers = Some(kafka_brokers());
    let mut service = ServiceProcess::start(
        &config,
        &[
            ("ACME_WEBHOOKS_LOG__FORMAT", "json"),
            ("ACME_WEBHOOKS_LOG__FILTER", "info,relay=debug"),
        ],
    )
    .await;
    let body = contact_event(
        "contact.created",
        "evt_logged_1",
        "contact-logged",
        "2025-05-19T00:00:00Z",
    )
    .to_string();
    let signature = sign(SECRET, &body);
    let response = service
        .post_webhook(body, &[("X-Request-Id", "req-from-acme-42")])
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers().get("x-request-id").map(|v| v.as_bytes()),
        Some(&b"req-from-acme-42"[..])
    );
    let db = connect(&config).await;
    wait_for_count(
        &db,
        "SELECT COUNT(*) FROM webhook_events WHERE status = 'processed'",
        1,
        DRAIN,
    )
    .await;
    assert!(service.terminate().await.success());

    let lines = service.logs();
    let records: Vec<Value> = lines
        .iter()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect();
    // The span list of a record, as (span name, field) lookups.
    let in_span = |record: &Value, span: &str, field: &str, value: &str| {
        record["spans"]
            .as_array()
            .is_some_and(|spans| spans.iter().any(|s| s["name"] == span && s[field] == value))
    };
    let accepted = records
        .iter()
        .find(|r| r["fields"]["message"] == "webhook accepted")
        .expect("an 'accepted' record");
    assert!(in_span(
        accepted,
        "request",
        "request_id",
        "req-from-acme-42"
    ));
    assert!(in_span(accepted, "ingest", "event_id", "evt_logged_1"));
    assert!(
        records
            .iter()
            .any(|r| in_span(r, "publish", "event_id", "evt_logged_1")),
        "the relay logged the delivery inside a span with the event id"
    );
    assert!(
        records
            .iter()
            .any(|r| in_span(r, "consume", "event_id", "evt_logged_1")),
        "the consumer logged the processing inside a span with the event id"
    );
    let everything = lines.join("\n");
    let hex = signature.trim_start_matches("sha256=");
    for secret in [SECRET, hex, "contact-logged@example.com"] {
        assert!(!everything.contains(secret), "the logs contain {secret}");
    }
}

/// The sender's ack first: with every role in one process, the relay's and the consumer's
/// threads, the Kafka client's among them, run `ingest.background_nice` steps below the threads
/// that serve HTTP and ingest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_and_consumer_threads_run_below_the_http_threads() {
    let database = fresh_database().await;
    let mut config = test_config(&database);
    config.kafka.brokers = Some(kafka_brokers());
    let nice = [("ACME_WEBHOOKS_INGEST__BACKGROUND_NICE", "7")];
    let service = ServiceProcess::start(&config, &nice).await;
    let of = |threads: &[(String, i32)], prefix: &str| -> Vec<i32> {
        threads
            .iter()
            .filter(|(name, _)| name.starts_with(prefix))
            .map(|(_, nice)| *nice)
            .collect()
    };
    let threads = service.threads();
    let (background, kafka, http) = (
        of(&threads, "background"),
        of(&threads, "rdk:main"),
        of(&threads, "tokio-rt-worker"),
    );
    assert!(
        !background.is_empty() && background.iter().all(|n| *n == 7),
        "{threads:?}"
    );
    assert!(
        !http.is_empty() && http.iter().all(|n| *n == 0),
        "{threads:?}"
    );
    // The relay's producer and the consumer's client at least (the readiness probe's client
    // belongs to the HTTP side).
    assert!(
        kafka.iter().filter(|n| **n == 7).count() >= 2,
        "{threads:?}"
    );

    // And the pipeline still runs end to end at that priority.
    let body = contact_event(
        "contact.created",
        "evt-nice",
        "c-nice",
        "2026-12-03T00:00:00Z",
    )
    .to_string();
    let response = service.post_webhook(body, &[]).await;
    assert_eq!(response.status(), 200);
    let db = connect(&config).await;
    wait_for_count(
        &db,
        "SELECT COUNT(*) FROM webhook_events WHERE status = 'processed'",
        1,
        DRAIN,
    )
    .await;
}
