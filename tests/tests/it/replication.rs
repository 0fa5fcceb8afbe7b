//! On a replicated Apache Kafka cluster (3 nodes, replication factor 3, `min.insync.replicas`
//! 2): the relay keeps every event through a partition leader's death.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use api::Roles;
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::support::*;

/// A Kafka cluster of the test's own, run by `scripts/kafka` in a directory of its own.
struct Cluster {
    dir: PathBuf,
    brokers: String,
}

fn kafka_script() -> String {
    std::env::var("ACME_TEST_KAFKA_SCRIPT")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/kafka").to_owned())
}

impl Cluster {
    fn start(nodes: usize) -> Self {
        let dir = std::env::temp_dir().join(unique("acme-kafka"));
        let mut cluster = Self {
            dir,
            brokers: String::new(),
        };
        cluster.brokers = cluster.run_start(Some(nodes));
        cluster
    }

    /// `scripts/kafka start`: creates the cluster, or restarts the nodes that are down.
    fn run_start(&self, nodes: Option<usize>) -> String {
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

    /// SIGKILL of node `id` (its `node.id`).
    fn kill(&self, id: i32) {
        let pid =
            std::fs::read_to_string(self.dir.join(format!("node-{id}.pid"))).expect("pid file");
        let _ = Command::new("kill").args(["-9", pid.trim()]).status();
    }

    /// The node leading each partition of `topic`.
    fn leaders(&self, topic: &str) -> BTreeMap<i32, i32> {
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
            .map(|p| (p.id(), p.leader()))
            .collect()
    }
}

impl Drop for Cluster {
    /// Kills every node (a clean stop of a cluster takes seconds per node) and deletes it all.
    fn drop(&mut self) {
        for id in 1..=3 {
            if self.dir.join(format!("node-{id}.pid")).exists() {
                self.kill(id);
            }
        }
        let _ = Command::new(kafka_script())
            .arg("stop")
            .arg("--dir")
            .arg(&self.dir)
            .arg("--purge")
            .status();
    }
}

/// Webhooks arrive at about 100/s while the leader of a partition is killed with SIGKILL and
/// restarted 10 s later: every acknowledged event is processed, each exactly once (one
/// attempt, one contact row each), and the topics hold every one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_keeps_every_event_through_a_leader_change() {
    let cluster = Cluster::start(3);
    let url = fresh_database().await;
    let mut config = test_config(&url);
    config.kafka.brokers = Some(cluster.brokers.clone());
    config.kafka.partitions = 3;
    config.kafka.replication_factor = 3;
    config.kafka.message_timeout_ms = 30_000;
    let app = Arc::new(TestApp::start(config.clone(), Roles::ALL).await);

    let sending = Arc::new(AtomicBool::new(true));
    let sender = {
        let (app, sending) = (app.clone(), sending.clone());
        tokio::spawn(async move {
            let mut acknowledged = 0usize;
            while sending.load(Ordering::Relaxed) {
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
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let topic = config.kafka.topic_for("contact.created");
    let before = cluster.leaders(&topic);
    let victim = before[&0];
    cluster.kill(victim);
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let during = cluster.leaders(&topic);
    assert_ne!(during[&0], victim, "leadership moved off the killed node");
    cluster.run_start(None);
    tokio::time::sleep(Duration::from_secs(3)).await;
    sending.store(false, Ordering::Relaxed);
    let acknowledged = sender.await.expect("sender") as i64;
    eprintln!(
        "leaders before {before:?}, after killing node {victim}: {during:?}; \
         {acknowledged} events acknowledged, the last {:?} after the kill",
        killed.elapsed()
    );
    assert!(acknowledged > 100);

    app.wait_for_count(
        "SELECT COUNT(*) FROM webhook_events WHERE status = 'processed' AND attempts = 1",
        acknowledged,
        Duration::from_secs(90),
    )
    .await;
    assert_eq!(
        app.count("SELECT COUNT(*) FROM webhook_events").await,
        acknowledged
    );
    assert_eq!(
        app.count("SELECT COUNT(*) FROM contacts WHERE last_event_id = 'evt-' || substr(id, 9)")
            .await,
        acknowledged
    );
    let messages = read_topics(
        &cluster.brokers,
        &[topic],
        acknowledged as usize * 2,
        Duration::from_secs(5),
    )
    .await;
    let mut copies: BTreeMap<String, usize> = BTreeMap::new();
    for message in &messages {
        *copies
            .entry(message.headers["event-id"].clone())
            .or_default() += 1;
    }
    assert_eq!(
        copies.len() as i64,
        acknowledged,
        "every event is on its topic"
    );
    let duplicated = copies.values().filter(|n| **n > 1).count();
    eprintln!(
        "{} messages on the topic, {duplicated} events published more than once",
        messages.len()
    );
}
