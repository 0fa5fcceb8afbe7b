//! Consumer processes as an operator runs them (`acme-webhooks consume`, several at once):
//! partitions are shared out through PostgreSQL, and a consumer killed with SIGKILL is replaced
//! within seconds, whichever member it was, on the test broker too.
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use api::Roles;
use sea_orm::ConnectionTrait;

use crate::process::{ServiceProcess, post_until_stopped};
use crate::support::*;

/// The owner of every partition of the test's group (`None` for a partition nobody holds).
async fn owners(db: &sea_orm::DatabaseConnection) -> Vec<(String, Option<String>)> {
    let states = relay::consume::partition_states(db)
        .await
        .expect("partition states");
    states
        .into_iter()
        .map(|s| {
            (
                format!("{}[{}]", s.topic, s.partition),
                s.owned.then_some(s.owner).flatten(),
            )
        })
        .collect()
}

async fn distinct_owners(db: &sea_orm::DatabaseConnection) -> usize {
    let owners = owners(db).await;
    if owners.iter().any(|(_, o)| o.is_none()) {
        return 0;
    }
    owners
        .into_iter()
        .filter_map(|(_, o)| o)
        .collect::<BTreeSet<_>>()
        .len()
}

/// Waits (30 s at most) until every partition is owned, by `members` distinct members.
async fn wait_for_owners(db: &sea_orm::DatabaseConnection, members: usize) {
    wait_until(
        "members owning partitions",
        members,
        Duration::from_secs(30),
        || distinct_owners(db),
    )
    .await;
}

async fn processed(db: &sea_orm::DatabaseConnection) -> i64 {
    count(
        db,
        "SELECT COUNT(*) FROM webhook_events WHERE status = 'processed'",
    )
    .await
}

/// Two consumer processes share the partitions; one is killed (SIGKILL) while webhooks keep
/// arriving: the other takes its partitions and every acknowledged event is processed exactly
/// once; the restarted process gets its share back. Repeated for each of the two members, so
/// it covers whichever one a Kafka group would have made leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_consumer_is_replaced_within_seconds_and_nothing_is_applied_twice() {
    let database = fresh_database().await;
    let mut config = test_config(&database);
    config.kafka.brokers = Some(kafka_brokers());
    config.kafka.partitions = 3;
    let ingest = TestApp::start(config.clone(), INGEST_AND_RELAY).await;
    // Two group members per process: each of them owns partitions, and a kill ends both.
    let fast = [
        ("ACME_WEBHOOKS_CONSUMER__REBALANCE_INTERVAL_MS", "500"),
        ("ACME_WEBHOOKS_CONSUMER__MEMBERS", "2"),
    ];
    let per_process = 2;
    let mut members = [
        ServiceProcess::start_role(&config, Some("consume"), &fast).await,
        ServiceProcess::start_role(&config, Some("consume"), &fast).await,
    ];
    wait_for_owners(&ingest.db, 2 * per_process).await;

    let mut acknowledged = 0;
    for (round, prefix) in [(0usize, "evt-round-0"), (1, "evt-round-1")] {
        let stop = Arc::new(AtomicBool::new(false));
        let sender = tokio::spawn(post_until_stopped(
            ingest.url("/api/webhooks"),
            prefix,
            stop.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let victim = round % members.len();
        members[victim].kill().await;
        let killed_at = Instant::now();
        // The survivor owns every partition and catches up while the load goes on.
        wait_for_owners(&ingest.db, per_process).await;
        let taken_over_in = killed_at.elapsed();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        stop.store(true, Ordering::Relaxed);
        acknowledged += sender.await.expect("sender").len() as i64;
        wait_for_count(
            &ingest.db,
            "SELECT COUNT(*) FROM webhook_events WHERE status = 'processed'",
            acknowledged,
            Duration::from_secs(60),
        )
        .await;
        println!(
            "round {round}: member {victim} killed; partitions taken over in {taken_over_in:?}; \
             {acknowledged} events processed after {:?}",
            killed_at.elapsed()
        );
        members[victim] = ServiceProcess::start_role(&config, Some("consume"), &fast).await;
        wait_for_owners(&ingest.db, 2 * per_process).await;
    }
    assert_eq!(processed(&ingest.db).await, acknowledged);
    assert_eq!(
        count(
            &ingest.db,
            "SELECT COUNT(*) FROM webhook_events WHERE attempts <> 1 OR status <> 'processed'"
        )
        .await,
        0,
        "each event was applied exactly once"
    );
    // Every partition's stored position reaches the end of its log (watermarks are read every
    // few seconds): nothing is left behind on any partition. (Tansu 0.6 sometimes reports a
    // high watermark one below the offset after the last message, hence `<`.)
    wait_for_count(
        &ingest.db,
        "SELECT COUNT(*) FROM consumer_partitions \
         WHERE high_watermark IS NULL OR COALESCE(next_offset, 0) < high_watermark",
        0,
        Duration::from_secs(20),
    )
    .await;
}

/// A consumer that joins takes its share from the one already running, which gives it back
/// between batches: both end up owning partitions and nothing is applied twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_consumer_gets_its_share() {
    let database = fresh_database().await;
    let mut config = test_config(&database);
    config.kafka.brokers = Some(kafka_brokers());
    config.consumer.rebalance_interval_ms = 300;
    let per_process = config.consumer.members;
    let first = TestApp::start(config.clone(), Roles::ALL).await;
    wait_for_owners(&first.db, per_process).await;
    let second = TestApp::start(config.clone(), Roles::CONSUMER).await;
    wait_for_owners(&first.db, 2 * per_process).await;
    for i in 0..60 {
        let event = contact_event(
            "contact.created",
            &format!("evt-share-{i}"),
            &format!("contact-{i}"),
            "2025-05-19T10:00:00Z",
        );
        assert_eq!(first.post_signed_json(&event).await.status(), 200);
    }
    first
        .wait_for_count(
            "SELECT COUNT(*) FROM webhook_events WHERE status = 'processed' AND attempts = 1",
            60,
            Duration::from_secs(60),
        )
        .await;
    drop(second);
}

/// A consume process's `/readyz` names a partition nobody consumes, once it has stayed so for
/// the grace that covers a hand-over between members (and a member's own start), and is ready
/// again once the partition is gone or owned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_names_a_partition_left_without_a_consumer() {
    let app = TestApp::with_kafka().await;
    // `/readyz`'s status and its `consumer` dependency (`up`, `error`; none before the
    // consumer's first health reading).
    let readiness = || async {
        let (status, body) = app.readiness().await;
        (status, dependency(&body, "consumer"))
    };
    let consumer_up = || async { readiness().await.1["up"] == true };
    wait_until("consumer up", true, Duration::from_secs(30), consumer_up).await;
    assert_eq!(readiness().await.0, 200);

    // A partition of the group on a topic no member consumes: nobody will ever take it.
    let orphan = format!("{}.contact.archived", app.config.kafka.topic_prefix);
    let group = &app.config.kafka.group_id;
    app.db
        .execute_unprepared(&format!(
            "INSERT INTO consumer_partitions (group_id, topic, partition) \
             VALUES ('{group}', '{orphan}', 0)"
        ))
        .await
        .expect("insert the orphan partition");
    let inserted = Instant::now();

    // Within the grace it counts as a partition between owners (health is read every second).
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        consumer_up().await,
        "the consumer is healthy during the grace"
    );

    wait_until("consumer up", false, Duration::from_secs(30), consumer_up).await;
    assert!(
        inserted.elapsed() >= relay::consume::HealthWatch::UNOWNED_AFTER,
        "reported after {:?}",
        inserted.elapsed()
    );
    let (status, consumer) = readiness().await;
    assert_eq!(status, 503);
    let error = consumer["error"].as_str().expect("an error");
    assert!(error.contains(&format!("{orphan}[0]")), "{error}");
    assert!(
        !error.contains(".contact.created["),
        "only the orphan is named: {error}"
    );

    app.db
        .execute_unprepared(&format!(
            "DELETE FROM consumer_partitions WHERE topic = '{orphan}'"
        ))
        .await
        .expect("delete the orphan partition");
    wait_until("consumer up", true, Duration::from_secs(30), consumer_up).await;
}

/// The positions a group has applied, as Kafka reports them to its tools: a consumer of the
/// group's id asks the group coordinator (OffsetFetch, what `kafka-consumer-groups --describe`
/// reads) for every partition's committed offset; they equal the `next_offset`s in PostgreSQL
/// once the pipeline is drained, and each partition's is its message count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_sees_the_offsets_the_group_applied() {
    use rdkafka::consumer::{BaseConsumer, Consumer};

    let app = TestApp::with_kafka().await;
    let events = 30;
    for i in 0..events {
        let event = contact_event(
            "contact.created",
            &format!("evt-{i}"),
            &format!("contact-{i}"),
            "2025-05-19T10:00:00Z",
        );
        assert_eq!(app.post_signed_json(&event).await.status(), 200);
    }
    app.wait_for_count(
        "SELECT COUNT(*) FROM webhook_events WHERE status = 'processed'",
        events,
        Duration::from_secs(60),
    )
    .await;
    let in_database = || async {
        let rows = app
            .db
            .query_all_raw(sea_orm::Statement::from_string(
                app.db.get_database_backend(),
                format!(
                    "SELECT topic, partition, next_offset FROM consumer_partitions \
                     WHERE group_id = '{}' AND next_offset IS NOT NULL ORDER BY topic, partition",
                    app.config.kafka.group_id
                ),
            ))
            .await
            .expect("positions");
        rows.iter()
            .map(|r| {
                let topic: String = r.try_get_by_index(0).expect("topic");
                let partition: i32 = r.try_get_by_index(1).expect("partition");
                let next: i64 = r.try_get_by_index(2).expect("next_offset");
                (topic, partition, next)
            })
            .collect::<Vec<_>>()
    };
    let applied = in_database().await;
    assert_eq!(applied.iter().map(|(_, _, next)| next).sum::<i64>(), events);

    let group: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("group.id", &app.config.kafka.group_id)
        .set("enable.auto.commit", "false")
        .create()
        .expect("a client of the group");
    let mut asked = rdkafka::TopicPartitionList::new();
    for (topic, partition, _) in &applied {
        asked.add_partition(topic, *partition);
    }
    let committed = || {
        let list = group
            .committed_offsets(asked.clone(), Duration::from_secs(10))
            .expect("the group's committed offsets");
        list.elements()
            .iter()
            .map(|e| {
                let offset = match e.offset() {
                    rdkafka::Offset::Offset(offset) => offset,
                    _ => -1, // nothing committed
                };
                (e.topic().to_owned(), e.partition(), offset)
            })
            .collect::<Vec<_>>()
    };
    // Committed asynchronously after each database commit, at most every 500 ms.
    let deadline = Instant::now() + Duration::from_secs(10);
    while committed() != applied && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(committed(), applied);
}
