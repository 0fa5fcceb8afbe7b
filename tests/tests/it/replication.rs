//! On a replicated Apache Kafka cluster (3 nodes, replication factor 3, `min.insync.replicas`
//! 2): the relay keeps every event through a partition leader's death.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use api::Roles;

use crate::support::*;

/// Webhooks arrive at about 100/s while the leader of a partition is killed with SIGKILL and
/// restarted 10 s later: every acknowledged event is processed, each exactly once (one
/// attempt, one contact row each), and the topics hold every one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_keeps_every_event_through_a_leader_change() {
    let mut cluster = OwnBroker::start_nodes(3);
    let url = fresh_database().await;
    let mut config = test_config(&url);
    config.kafka.brokers = Some(cluster.brokers());
    // The cluster's defaults: 3 partitions, replication factor 3 on three nodes.
    config.kafka.partitions = -1;
    config.kafka.replication_factor = -1;
    config.kafka.message_timeout_ms = 60_000;
    let app = Arc::new(TestApp::start(config.clone(), Roles::ALL).await);

    let sending = Arc::new(AtomicBool::new(true));
    let sender = send_creates_until(app.clone(), sending.clone(), usize::MAX);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let topic = config.kafka.topic_for("contact.created");
    let layout = cluster.partitions(&topic);
    assert_eq!(layout.len(), 3, "the cluster's num.partitions: {layout:?}");
    assert!(
        layout.values().all(|(_, replicas)| *replicas == 3),
        "{layout:?}"
    );
    let before = cluster.leaders(&topic);
    let victim = before[&0];
    cluster.kill(victim);
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let during = cluster.leaders(&topic);
    assert_ne!(during[&0], victim, "leadership moved off the killed node");
    cluster.restart();
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
        &cluster.brokers(),
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

/// A replication factor the cluster cannot satisfy (3 on one node) stops the service at start
/// with an error that names the setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replication_factor_the_cluster_cannot_satisfy_stops_the_start_naming_it() {
    let database = fresh_database().await;
    let mut config = test_config(&database);
    config.kafka.brokers = Some(kafka_brokers());
    config.kafka.replication_factor = 3;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let error = api::Service::start(config, Roles::ALL, Some(listener))
        .await
        .err()
        .expect("the start fails");
    let text = format!("{error:#}");
    assert!(
        text.contains("kafka.replication_factor = 3 cannot be satisfied"),
        "{text}"
    );
}
