//! Outbox -> Kafka -> consumer, end to end through real HTTP, PostgreSQL and a Kafka-protocol
//! broker (Apache Kafka).
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use api::Roles;
use relay::bus::BusMessage;
use relay::consume::batch::{Apply, EventProcessor, Handled};
use relay::consume::partitions::OffsetCommit;
use sea_orm::{ConnectionTrait, EntityTrait, TransactionTrait};
use serde_json::{Value, json};

use crate::support::*;

const DRAIN: Duration = Duration::from_secs(60);

fn at(minute: u32) -> String {
    format!("2025-05-19T10:{minute:02}:00.000Z")
}

/// Hundreds of creates, updates, deletes and duplicates, some updates posted out of order:
/// every event ends `processed`, `contacts` holds the newest state, and each topic holds the
/// messages keyed by contact id with their headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_event_is_published_and_applied_once() {
    let app = TestApp::with_kafka().await;
    let contacts = 60;
    let mut posts: Vec<Value> = Vec::new();
    let mut expected: BTreeMap<String, (String, bool)> = BTreeMap::new(); // contact -> (lastName, deleted)
    for c in 0..contacts {
        let contact = format!("contact-{c}");
        let create = contact_event("contact.created", &format!("evt-{c}-0"), &contact, &at(0));
        let updates: Vec<Value> = (1..=3)
            .map(|v| contact_event("contact.updated", &format!("evt-{c}-{v}"), &contact, &at(v)))
            .collect();
        posts.push(create.clone());
        if c % 3 == 0 {
            // Out of order: the newest update arrives before the older ones.
            posts.extend([updates[2].clone(), updates[0].clone(), updates[1].clone()]);
        } else {
            posts.extend(updates.iter().cloned());
        }
        let last_name = updates[2]["data"]["lastName"]
            .as_str()
            .expect("name")
            .to_owned();
        let mut deleted = false;
        if c % 5 == 0 {
            posts.push(delete_event(&format!("evt-{c}-del"), &contact, &at(10)));
            // A late update after the delete must not bring the contact back.
            posts.push(contact_event(
                "contact.updated",
                &format!("evt-{c}-late"),
                &contact,
                &at(20),
            ));
            deleted = true;
        }
        if c % 4 == 0 {
            posts.push(create.clone()); // AcmeCRM retried a delivery
        }
        expected.insert(contact, (last_name, deleted));
    }
    let unique_events: BTreeSet<String> = posts
        .iter()
        .map(|p| p["id"].as_str().expect("id").to_owned())
        .collect();

    let started = Instant::now();
    for chunk in posts.chunks(25) {
        let responses =
            futures::future::join_all(chunk.iter().map(|p| app.post_signed_json(p))).await;
        for response in responses {
            assert_eq!(response.status(), 200);
        }
    }
    let total = unique_events.len() as i64;
    app.wait_for_count(
        "SELECT COUNT(*) FROM webhook_events WHERE status = 'processed'",
        total,
        DRAIN,
    )
    .await;
    let drained_in = started.elapsed();
    assert_eq!(
        app.count("SELECT COUNT(*) FROM webhook_events").await,
        total
    );
    assert_eq!(
        app.count("SELECT COUNT(*) FROM outbox WHERE published_at IS NULL")
            .await,
        0
    );

    // contacts mirrors the newest state of each contact.
    let rows = entity::contact::Entity::find()
        .all(&app.db)
        .await
        .expect("contacts");
    assert_eq!(rows.len(), contacts);
    for row in rows {
        let (last_name, deleted) = &expected[&row.id];
        assert_eq!(row.deleted, *deleted, "{}", row.id);
        // A deletion freezes whatever version was applied before it (requests are concurrent,
        // so which one that is may vary); a live contact must hold its newest version.
        if !deleted {
            assert_eq!(
                row.last_name.as_deref(),
                Some(last_name.as_str()),
                "{}",
                row.id
            );
        }
    }

    // Each topic holds its messages, keyed by contact id, with the event headers.
    let topics: Vec<String> = relay::EVENT_TYPES
        .iter()
        .map(|t| app.config.kafka.topic_for(t))
        .collect();
    let messages = read_topics(
        &kafka_brokers(),
        &topics,
        unique_events.len(),
        Duration::from_secs(10),
    )
    .await;
    let mut seen: HashMap<String, usize> = HashMap::new();
    for m in &messages {
        let event_id = m.payload["id"].as_str().expect("id");
        assert_eq!(m.headers["event-id"], event_id);
        assert_eq!(
            m.headers["event-type"],
            m.payload["event"].as_str().expect("event")
        );
        assert_eq!(
            m.topic,
            app.config
                .kafka
                .topic_for(m.payload["event"].as_str().expect("event"))
        );
        assert_eq!(m.key, m.payload["data"]["id"].as_str().expect("contact id"));
        *seen.entry(event_id.to_owned()).or_default() += 1;
    }
    let published: BTreeSet<String> = seen.keys().cloned().collect();
    assert_eq!(published, unique_events);
    let duplicates_in_kafka: usize = seen.values().map(|n| n - 1).sum();
    println!(
        "posted {} requests, {} unique events; all processed in {:?}; {} duplicate messages in Kafka",
        posts.len(),
        unique_events.len(),
        drained_in,
        duplicates_in_kafka
    );
}

/// The consumer's single step: a re-delivered message changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_message_delivered_twice_changes_contacts_once() {
    let app = TestApp::http_only().await;
    let event = contact_event("contact.created", "evt_twice", "contact-twice", &at(1));
    assert_eq!(app.post_signed_json(&event).await.status(), 200);
    // No relay runs: the row is there to claim, as the relay would.
    let rows = relay::outbox::claim(&app.db, 1).await.expect("claim");
    let message = BusMessage::from_outbox(rows.first().expect("outbox row"));
    let processor = EventProcessor::new(app.db.clone());

    assert!(matches!(
        processor.handle(&message).await.expect("first"),
        Handled::Processed(_)
    ));
    let after_first = entity::contact::Entity::find_by_id("contact-twice")
        .one(&app.db)
        .await
        .expect("q")
        .expect("contact");
    assert_eq!(
        processor.handle(&message).await.expect("second"),
        Handled::AlreadyDone
    );
    let after_second = entity::contact::Entity::find_by_id("contact-twice")
        .one(&app.db)
        .await
        .expect("q")
        .expect("contact");
    assert_eq!(after_first, after_second);
    assert_eq!(
        app.count(
            "SELECT COUNT(*) FROM webhook_events WHERE status = 'processed' AND attempts = 1"
        )
        .await,
        1
    );
}

/// Through Kafka: a message produced twice is applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_kafka_message_is_skipped() {
    let app = TestApp::with_kafka().await;
    let event = contact_event("contact.created", "evt_dup_kafka", "contact-dup", &at(1));
    assert_eq!(app.post_signed_json(&event).await.status(), 200);
    app.wait_for_count(
        "SELECT COUNT(*) FROM webhook_events WHERE status = 'processed'",
        1,
        DRAIN,
    )
    .await;

    // Publish the same message again, as a relay that died before marking its batch would: the
    // row claimed as the relay claims it, in a transaction that un-marks it and is rolled back.
    let txn = app.db.begin().await.expect("begin");
    txn.execute_unprepared("UPDATE outbox SET published_at = NULL")
        .await
        .expect("unmark");
    let rows = relay::outbox::claim(&txn, 1).await.expect("claim");
    txn.rollback().await.expect("rollback");
    let publisher = relay::bus::KafkaPublisher::connect(&app.config.kafka)
        .await
        .expect("producer");
    let results = publisher
        .publish(&[BusMessage::from_outbox(rows.first().expect("outbox row"))])
        .await;
    assert!(results.iter().all(Result::is_ok));
    // A later event of the same contact (same partition) proves the duplicate was consumed.
    let sentinel = contact_event("contact.updated", "evt_sentinel", "contact-dup", &at(2));
    assert_eq!(app.post_signed_json(&sentinel).await.status(), 200);
    app.wait_for_count(
        "SELECT COUNT(*) FROM webhook_events WHERE status = 'processed'",
        2,
        DRAIN,
    )
    .await;
    assert_eq!(
        app.count(
            "SELECT COUNT(*) FROM webhook_events WHERE event_id = 'evt_dup_kafka' AND attempts = 1"
        )
        .await,
        1
    );
    assert_eq!(
        app.count("SELECT COUNT(*) FROM contacts WHERE last_event_id = 'evt_sentinel'")
            .await,
        1
    );
}

/// A message that can never be applied is marked failed, dead-lettered, and does not block the
/// partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_is_dead_lettered_and_the_next_one_is_processed() {
    let app = TestApp::with_kafka().await;
    // Bypass validation, as a bug or a schema change upstream would: an update without updatedAt.
    let poison = json!({ "event": "contact.updated", "id": "evt_poison", "timestamp": at(1), "data": { "id": "contact-p" } });
    let topic = app.config.kafka.topic_for("contact.updated");
    app.db
        .execute_unprepared(&format!(
            "WITH e AS (INSERT INTO webhook_events (event_id, event_type, contact_id, payload) \
               VALUES ('evt_poison', 'contact.updated', 'contact-p', '{poison}') RETURNING event_id) \
             INSERT INTO outbox (event_id, topic, message_key, payload, headers) \
             SELECT event_id, '{topic}', 'contact-p', '{poison}', \
                    '{{\"event-id\": \"evt_poison\", \"event-type\": \"contact.updated\"}}' FROM e"
        ))
        .await
        .expect("poison inserted");
    let next = contact_event("contact.updated", "evt_after_poison", "contact-p", &at(2));
    assert_eq!(app.post_signed_json(&next).await.status(), 200);

    app.wait_for_count("SELECT COUNT(*) FROM webhook_events WHERE event_id = 'evt_after_poison' AND status = 'processed'", 1, DRAIN).await;
    app.wait_for_count("SELECT COUNT(*) FROM webhook_events WHERE event_id = 'evt_poison' AND status = 'failed' AND error LIKE '%updatedAt%'", 1, DRAIN).await;
    let dead = read_topics(
        &kafka_brokers(),
        &[app.config.kafka.dlq_topic()],
        1,
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].headers["event-id"], "evt_poison");
    assert!(
        dead[0].headers["error"].contains("updatedAt"),
        "{:?}",
        dead[0].headers
    );
    assert_eq!(dead[0].key, "contact-p");
}

/// Two relays drain one outbox together: every row is published, none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_drain_one_outbox_without_losing_or_repeating_rows() {
    let mut ingest = TestApp::http_only().await;
    let bodies: Vec<Value> = (0..300)
        .map(|i| {
            contact_event(
                "contact.created",
                &format!("evt-r-{i}"),
                &format!("contact-r-{}", i % 50),
                &at(0),
            )
        })
        .collect();
    for chunk in bodies.chunks(50) {
        for response in
            futures::future::join_all(chunk.iter().map(|b| ingest.post_signed_json(b))).await
        {
            assert_eq!(response.status(), 200);
        }
    }
    ingest.stop().await;
    let mut config = ingest.config.clone();
    config.kafka.brokers = Some(kafka_brokers());
    config.relay.batch_size = 20;
    let first = TestApp::start(config.clone(), Roles::RELAY).await;
    let second = TestApp::start(config.clone(), Roles::RELAY).await;
    first
        .wait_for_count(
            "SELECT COUNT(*) FROM outbox WHERE published_at IS NULL",
            0,
            DRAIN,
        )
        .await;

    let topics = vec![config.kafka.topic_for("contact.created")];
    let messages = read_topics(&kafka_brokers(), &topics, 300, Duration::from_secs(10)).await;
    let ids: Vec<&str> = messages
        .iter()
        .map(|m| m.headers["event-id"].as_str())
        .collect();
    let unique: BTreeSet<&str> = ids.iter().copied().collect();
    assert_eq!(unique.len(), 300, "every row was published");
    assert_eq!(ids.len(), 300, "no row was published twice");
    drop((first, second));
}

/// The relays are woken, not polled: with a poll interval of ten minutes, a committed row is
/// published within seconds, by a relay in the writer's own process (the in-process signal) and
/// by one in another process (the NOTIFY the writer sends after its commit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_wakes_the_relays_of_its_own_process_and_of_others() {
    let url = fresh_database().await;
    let mut config = test_config(&url);
    config.kafka.brokers = Some(kafka_brokers());
    config.relay.poll_interval_ms = 600_000;
    let together = TestApp::start(config.clone(), INGEST_AND_RELAY).await;
    let serve_only = TestApp::start(config.clone(), Roles::HTTP).await;
    // Past the relay's first claim at start: from here on only a wake-up makes it look again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let published = "SELECT COUNT(*) FROM outbox WHERE published_at IS NOT NULL";
    let wake = Duration::from_secs(20);

    let own = contact_event("contact.created", "evt-w-1", "contact-w-1", &at(0));
    assert_eq!(together.post_signed_json(&own).await.status(), 200);
    together.wait_for_count(published, 1, wake).await;

    let other = contact_event("contact.created", "evt-w-2", "contact-w-2", &at(1));
    assert_eq!(serve_only.post_signed_json(&other).await.status(), 200);
    together.wait_for_count(published, 2, wake).await;
    drop((serve_only, together));
}

/// With the broker down, rows stay unpublished (no delivery report, no mark) and go out once it
/// is back; ingest keeps acknowledging meanwhile. The broker (SIGKILL, restarted with its log)
/// then holds the messages from before and from the outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_wait_out_a_broker_outage_and_are_published_after_it() {
    let mut broker = OwnBroker::start();
    let url = fresh_database().await;
    let mut config = test_config(&url);
    config.kafka.brokers = Some(broker.brokers());
    config.kafka.message_timeout_ms = 2000;
    let roles = Roles {
        http: true,
        relay: true,
        consumer: false,
    };
    let app = TestApp::start(config.clone(), roles).await;
    let post = |i: usize| {
        contact_event(
            "contact.created",
            &format!("evt-o-{i}"),
            &format!("contact-o-{i}"),
            &at(0),
        )
    };
    for i in 0..10 {
        assert_eq!(app.post_signed_json(&post(i)).await.status(), 200);
    }
    app.wait_for_count(
        "SELECT COUNT(*) FROM outbox WHERE published_at IS NULL",
        0,
        DRAIN,
    )
    .await;

    broker.stop();
    for i in 10..20 {
        assert_eq!(
            app.post_signed_json(&post(i)).await.status(),
            200,
            "ingest does not need the broker"
        );
    }
    // Past the delivery timeout: the relay tried, failed, and marked nothing published.
    app.wait_for_count(
        "SELECT COUNT(*) FROM outbox WHERE published_at IS NULL AND attempts > 0 AND last_error IS NOT NULL",
        10,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        app.count("SELECT COUNT(*) FROM outbox WHERE published_at IS NULL")
            .await,
        10
    );

    broker.restart();
    app.wait_for_count(
        "SELECT COUNT(*) FROM outbox WHERE published_at IS NULL",
        0,
        DRAIN,
    )
    .await;
    let topics = vec![config.kafka.topic_for("contact.created")];
    let messages = read_topics(&broker.brokers(), &topics, 21, Duration::from_secs(5)).await;
    let ids: BTreeSet<String> = messages
        .iter()
        .map(|m| m.headers["event-id"].clone())
        .collect();
    let expected: BTreeSet<String> = (0..20).map(|i| format!("evt-o-{i}")).collect();
    assert_eq!(ids, expected);
}

/// A message that was delivered but never reached the consumer (lost by the broker, expired by
/// retention, a topic deleted by hand) is published again once its event has stayed `pending`
/// for `relay.republish_after_secs`, and then processed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_lost_on_the_bus_is_published_again_and_processed() {
    let url = fresh_database().await;
    let mut config = test_config(&url);
    config.kafka.brokers = Some(kafka_brokers());
    let ingest = TestApp::start(config.clone(), Roles::HTTP).await;
    let body = contact_event(
        "contact.created",
        "evt_lost_1",
        "contact-lost",
        "2025-05-19T00:00:00Z",
    );
    assert_eq!(ingest.post_signed_json(&body).await.status(), 200);
    // As if the relay had delivered it an hour ago and the broker had then lost it.
    ingest
        .count(
            "WITH lost AS (UPDATE outbox SET published_at = now() - interval '1 hour', attempts = 1 \
             RETURNING 1) SELECT COUNT(*) FROM lost",
        )
        .await;

    config.relay.republish_after_secs = 1;
    let _workers = TestApp::start(
        config.clone(),
        Roles {
            http: false,
            relay: true,
            consumer: true,
        },
    )
    .await;
    ingest
        .wait_for_count(
            "SELECT COUNT(*) FROM webhook_events WHERE status = 'processed'",
            1,
            DRAIN,
        )
        .await;
    assert_eq!(
        ingest
            .count(
                "SELECT COUNT(*) FROM outbox WHERE attempts = 2 AND published_at IS NOT NULL \
                 AND last_error LIKE 're-published%'"
            )
            .await,
        1,
        "the row was published a second time and says why"
    );
    let topics = vec![config.kafka.topic_for("contact.created")];
    let messages = read_topics(&kafka_brokers(), &topics, 2, Duration::from_secs(5)).await;
    assert_eq!(
        messages.len(),
        1,
        "only the re-published copy is on the topic"
    );
    assert_eq!(
        ingest
            .client
            .get(ingest.url("/api/contacts/contact-lost"))
            .send()
            .await
            .expect("get")
            .status(),
        200
    );
}

/// A migrated database behind ONE connection, with `seed` run on it: whatever a test reads from
/// the session (statistics, prepared statements) is what the statements before it did. The
/// database goes with the returned guard.
async fn one_connection_database(seed: &str) -> (TestDatabase, sea_orm::DatabaseConnection) {
    use migration::MigratorTrait;
    let database = fresh_database().await;
    let mut options = sea_orm::ConnectOptions::new(database.url());
    options.max_connections(1).min_connections(1);
    let db = sea_orm::Database::connect(options).await.expect("connect");
    migration::Migrator::up(&db, None).await.expect("migrate");
    db.execute_unprepared(seed).await.expect("seed");
    (database, db)
}

/// A `contact.updated` message as the relay publishes it.
fn update_message(event_id: String, contact_id: String, minute: u32) -> BusMessage {
    let body = contact_event("contact.updated", &event_id, &contact_id, &at(minute));
    BusMessage {
        topic: "t".into(),
        key: contact_id,
        payload: body.to_string().into_bytes(),
        headers: [("event-id".to_owned(), event_id)].into_iter().collect(),
    }
}

/// Applies `batch` (with `offsets`) and commits; every event of it must be processed.
async fn apply_all(
    processor: &EventProcessor,
    batch: &[BusMessage],
    offsets: Option<&OffsetCommit>,
) {
    let applied = processor
        .apply_batch(batch, offsets, Apply::Whole)
        .await
        .expect("apply");
    assert!(
        applied
            .outcomes
            .iter()
            .all(|o| matches!(o, Ok(Handled::Processed(_)))),
        "every event of the batch is applied"
    );
    applied.commit().await.expect("commit");
}

/// The cost of applying a batch does not grow with the backlog: the batch's events are found by
/// their unique id, never through the status index (which holds every pending event, and every
/// dead version of one until a vacuum; a claim that ANDed it in took 30 ms a batch at 195k
/// events and made processing fall behind for good in a 60 s run at 3000/s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applying_a_batch_never_scans_the_backlog() {
    // A backlog of pending events.
    let (_database, db) = one_connection_database(
        "INSERT INTO webhook_events (event_id, event_type, contact_id, payload, status) \
         SELECT 'evt-' || n, 'contact.updated', 'c-' || (n % 500), '{}', 'pending' \
         FROM generate_series(1, 20000) AS n",
    )
    .await;

    let batch: Vec<BusMessage> = (1..=256)
        .map(|n| update_message(format!("evt-{n}"), format!("c-{}", n % 500), n % 60))
        .collect();
    let status_index_scans = || async {
        // Flushes this backend's counters first (PostgreSQL 15+), then reads them.
        db.execute_unprepared("SELECT pg_stat_force_next_flush()")
            .await
            .expect("flush statistics");
        count(
            &db,
            "SELECT idx_scan FROM pg_stat_user_indexes \
             WHERE indexrelname = 'webhook_events_status_created_idx'",
        )
        .await
    };
    let before = status_index_scans().await;

    apply_all(&EventProcessor::new(db.clone()), &batch, None).await;

    assert_eq!(
        status_index_scans().await,
        before,
        "applying a batch scanned the status index"
    );
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM webhook_events WHERE status = 'processed'"
        )
        .await,
        256
    );
}

/// The batch statements of the consumer and the relay have one text whatever the batch size, so
/// every connection prepares each of them once. A text that grew with the batch (`IN ($1..$n)`,
/// a `VALUES` row per contact) was a new prepared statement for every size on every connection,
/// kept by sqlx and by PostgreSQL: about 50 MB of a 115 MB peak after a minute at 3000 events/s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_batch_sizes_prepare_no_new_statements() {
    use relay::bus::TopicPartition;
    use relay::consume::partitions::record_watermarks;
    // Pending events and partitions this member owns.
    let (_database, db) = one_connection_database(
        "INSERT INTO webhook_events (event_id, event_type, contact_id, payload, status) \
         SELECT 'evt-' || n, 'contact.updated', 'c-' || n, '{}', 'pending' \
         FROM generate_series(1, 100) AS n; \
         INSERT INTO consumer_partitions (group_id, topic, partition, owner) \
         SELECT 'g', 't', p, 'me' FROM generate_series(0, 11) AS p",
    )
    .await;

    let processor = EventProcessor::new(db.clone());
    let mut next_event = 1;
    let mut apply_batches_of = async |sizes: std::ops::RangeInclusive<usize>| {
        for size in sizes {
            let batch: Vec<BusMessage> = (next_event..next_event + size)
                .map(|n| update_message(format!("evt-{n}"), format!("c-{n}"), 1))
                .collect();
            next_event += size;
            let partitions: Vec<TopicPartition> = (0..size as i32)
                .map(|partition| TopicPartition {
                    topic: "t".into(),
                    partition,
                })
                .collect();
            let offsets = OffsetCommit {
                group: "g".into(),
                owner: "me".into(),
                next: partitions.iter().map(|tp| (tp.clone(), 1)).collect(),
            };
            apply_all(&processor, &batch, Some(&offsets)).await;
            let watermarks: Vec<(TopicPartition, i64)> =
                partitions.into_iter().map(|tp| (tp, 5)).collect();
            record_watermarks(&db, "g", &watermarks)
                .await
                .expect("watermarks");
            relay::outbox::mark_published(&db, (1..=size as i64).collect())
                .await
                .expect("mark published");
        }
    };
    let prepared = async || count(&db, "SELECT COUNT(*) FROM pg_prepared_statements").await;

    apply_batches_of(1..=3).await;
    let after_first_sizes = prepared().await;
    apply_batches_of(4..=12).await;
    assert_eq!(
        prepared().await,
        after_first_sizes,
        "batches of 9 new sizes prepared new statements"
    );
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM webhook_events WHERE status = 'processed'"
        )
        .await,
        78
    );
    assert_eq!(count(&db, "SELECT COUNT(*) FROM contacts").await, 78);
}
