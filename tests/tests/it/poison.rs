//! One accepted event must never hold back another: what ingest accepts the consumer can store,
//! and a message the database refuses anyway is failed and dead-lettered while the rest of its
//! batch goes through; a database outage is waited out without failing anything.
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use api::Roles;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use relay::event::EventType;
use relay::outbox::{NewEvent, store_events};
use sea_orm::ConnectionTrait;
use serde_json::{Value, json};

use crate::support::*;

const DRAIN: Duration = Duration::from_secs(60);
const YEAR_MINUS_ONE: &str = "0000-01-01T00:00:00+01:00";

/// The request: year 0000 with a positive offset is year -1 in UTC, which the contacts
/// table cannot hold. Refused with 400 naming the field, for each of the three instants, and
/// nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instant_before_year_one_in_utc_is_refused_naming_the_field() {
    let app = TestApp::http_only().await;
    for (i, field) in ["timestamp", "data.createdAt", "data.updatedAt"]
        .into_iter()
        .enumerate()
    {
        let mut body = contact_event(
            "contact.created",
            &format!("e{i}"),
            "c1",
            "2025-05-19T00:00:00Z",
        );
        match field.split_once('.') {
            Some((_, inner)) => body["data"][inner] = json!(YEAR_MINUS_ONE),
            None => body[field] = json!(YEAR_MINUS_ONE),
        }
        let response = app.post_signed_json(&body).await;
        assert_eq!(response.status(), 400, "{field}");
        let answer: Value = response.json().await.expect("a JSON error");
        let fields: Vec<&str> = answer["details"]
            .as_array()
            .expect("the offending fields")
            .iter()
            .filter_map(|f| f["field"].as_str())
            .collect();
        assert_eq!(fields, [field], "{answer}");
    }
    assert_eq!(app.count("SELECT COUNT(*) FROM webhook_events").await, 0);
}

/// `n` creates of their own contacts, `evt-<i>` / `contact-<i>`.
fn creates(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            contact_event(
                "contact.created",
                &format!("evt-{i}"),
                &format!("contact-{i}"),
                "2025-05-19T10:00:00Z",
            )
        })
        .collect()
}

async fn post_all(app: &TestApp, events: &[Value]) {
    for event in events {
        assert_eq!(app.post_signed_json(event).await.status(), 200);
    }
}

/// Two events that pass validation but that this database refuses (a CHECK constraint, class
/// 23, and a column too narrow, class 22, added here as a schema change would), in the middle
/// of one batch on Kafka: exactly those two end `failed` with the database's reason and are in
/// the dead-letter topic, every other event of the batch is processed in the same pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_errors_in_the_middle_of_a_batch_dead_letter_exactly_their_events() {
    let url = fresh_database().await;
    let mut config = test_config(&url);
    config.kafka.brokers = Some(kafka_brokers());
    config.kafka.partitions = 1; // one partition: the whole backlog is one batch
    let mut senders = TestApp::start(config.clone(), INGEST_AND_RELAY).await;
    senders
        .db
        .execute_unprepared(
            "ALTER TABLE contacts ADD CONSTRAINT no_poison CHECK (last_name IS DISTINCT FROM 'Poison'); \
             ALTER TABLE contacts ALTER COLUMN title TYPE varchar(40)",
        )
        .await
        .expect("schema change");
    let mut events = creates(40);
    events[13]["data"]["lastName"] = json!("Poison");
    events[27]["data"]["title"] = json!("t".repeat(41));
    post_all(&senders, &events).await;
    senders
        .wait_for_count(
            "SELECT COUNT(*) FROM outbox WHERE published_at IS NOT NULL",
            40,
            DRAIN,
        )
        .await;

    let started = Instant::now();
    let consumer = TestApp::start(config.clone(), Roles::CONSUMER).await;
    senders
        .wait_for_count(
            "SELECT COUNT(*) FROM webhook_events WHERE status <> 'pending'",
            40,
            DRAIN,
        )
        .await;
    eprintln!(
        "40 events, 2 of them poison, settled {:?} after the consumer started",
        started.elapsed()
    );
    assert_eq!(
        senders
            .count("SELECT COUNT(*) FROM webhook_events WHERE status = 'processed'")
            .await,
        38
    );
    let failed = failed_events(&senders).await;
    assert_eq!(
        failed.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(),
        ["evt-13", "evt-27"]
    );
    assert!(
        failed[0].1.contains("(integrity)") && failed[0].1.contains("no_poison"),
        "{}",
        failed[0].1
    );
    assert!(
        failed[1].1.contains("(data)") && failed[1].1.contains("too long"),
        "{}",
        failed[1].1
    );
    assert_eq!(senders.count("SELECT COUNT(*) FROM contacts").await, 38);
    let dead = read_topics(
        &kafka_brokers(),
        &[config.kafka.dlq_topic()],
        3,
        Duration::from_secs(5),
    )
    .await;
    let dead_ids: BTreeSet<&str> = dead
        .iter()
        .map(|m| m.headers["event-id"].as_str())
        .collect();
    assert_eq!(dead_ids, BTreeSet::from(["evt-13", "evt-27"]));
    assert_eq!(dead.len(), 2);
    drop(consumer);
    senders.stop().await;
}

async fn failed_events(app: &TestApp) -> Vec<(String, String)> {
    let rows = app
        .db
        .query_all_raw(sea_orm::Statement::from_string(
            app.db.get_database_backend(),
            "SELECT event_id, error FROM webhook_events WHERE status = 'failed' ORDER BY event_id",
        ))
        .await
        .expect("failed events");
    rows.iter()
        .map(|r| {
            (
                r.try_get_by_index(0).expect("event_id"),
                r.try_get_by_index::<Option<String>>(1)
                    .expect("error")
                    .unwrap_or_default(),
            )
        })
        .collect()
}

/// An event an earlier release acknowledged with a year -1 instant sits in the outbox (it is
/// stored here as that release stored it): on Kafka it ends `failed` and the events posted
/// after it on the same partition are processed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_year_minus_one_event_is_failed_and_the_events_behind_it_are_processed() {
    let url = fresh_database().await;
    let mut config = test_config(&url);
    config.kafka.brokers = Some(kafka_brokers());
    config.kafka.partitions = 1;
    let app = TestApp::start(config.clone(), Roles::ALL).await;
    let mut poison = contact_event(
        "contact.created",
        "evt-old",
        "contact-old",
        "2025-05-19T10:00:00Z",
    );
    poison["data"]["createdAt"] = json!(YEAR_MINUS_ONE);
    let arrived = Instant::now();
    store_events(
        &app.db,
        &config.kafka,
        &[NewEvent {
            event_id: "evt-old",
            event_type: EventType::Created,
            contact_id: "contact-old",
            payload: &poison,
        }],
    )
    .await
    .expect("stored as an earlier release did");
    post_all(&app, &creates(20)).await;
    app.wait_for_count(
        "SELECT COUNT(*) FROM webhook_events WHERE status = 'processed'",
        20,
        DRAIN,
    )
    .await;
    eprintln!(
        "the events behind the poison were processed {:?} after it arrived",
        arrived.elapsed()
    );
    let failed = failed_events(&app).await;
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].0, "evt-old");
    assert!(failed[0].1.contains("data.createdAt"), "{}", failed[0].1);
}

/// The database refuses every connection for three seconds (connections cut, new ones
/// refused) while webhooks arrive: senders retry their 500s; afterwards every acknowledged event
/// is processed, none failed, nothing dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_is_retried_and_fails_nothing() {
    let url = fresh_database().await;
    let database = url.rsplit_once('/').expect("a database name").1.to_owned();
    let mut config = test_config(&url);
    config.kafka.brokers = Some(kafka_brokers());
    let app = Arc::new(TestApp::start(config.clone(), Roles::ALL).await);
    let sending = Arc::new(AtomicBool::new(true));
    let sender = send_creates_until(app.clone(), sending.clone(), 400);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let admin = sea_orm::Database::connect(admin_database_url())
        .await
        .expect("admin");
    let outage = Instant::now();
    admin
        .execute_unprepared(&format!(
            "ALTER DATABASE {database} WITH ALLOW_CONNECTIONS false; \
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{database}'"
        ))
        .await
        .expect("cut the database off");
    while outage.elapsed() < Duration::from_secs(3) {
        admin
            .execute_unprepared(&format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{database}'"
            ))
            .await
            .expect("keep it cut off");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    admin
        .execute_unprepared(&format!(
            "ALTER DATABASE {database} WITH ALLOW_CONNECTIONS true"
        ))
        .await
        .expect("let it back");
    tokio::time::sleep(Duration::from_secs(2)).await;
    sending.store(false, Ordering::Relaxed);
    let acknowledged = sender.await.expect("sender") as i64;
    assert!(acknowledged > 0);
    let db = connect(&config).await;
    wait_for_count(
        &db,
        "SELECT COUNT(*) FROM webhook_events WHERE status = 'processed'",
        acknowledged,
        DRAIN,
    )
    .await;
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM webhook_events").await,
        acknowledged
    );
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM contacts").await,
        acknowledged
    );
    let dead = read_topics(
        &kafka_brokers(),
        &[config.kafka.dlq_topic()],
        1,
        Duration::from_secs(3),
    )
    .await;
    assert!(dead.is_empty(), "nothing dead-lettered: {dead:?}");
}

/// Strings up to `max` characters, plain or from every plane of Unicode (no NUL: refused
/// anywhere in a body).
fn text(max: usize) -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9 ._-]{1,20}".prop_map(String::from),
        proptest::collection::vec(any::<char>().prop_filter("no NUL", |c| *c != '\0'), 1..=max)
            .prop_map(|chars| chars.into_iter().collect::<String>())
            .prop_filter("not blank", |s| !s.trim().is_empty()),
    ]
}

/// RFC 3339 date-times at the edges: years 0000, 0001, 9998 and 9999 (or any), offsets up to
/// +-23:59 or Z, a leap second, 0 to 9 fractional digits.
fn date_time() -> impl Strategy<Value = String> {
    let year = prop_oneof![Just(0), Just(1), Just(9998), Just(9999), 0..=9999i32];
    let edge_or_any = |edges: Vec<u32>, range: std::ops::RangeInclusive<u32>| {
        prop_oneof![proptest::sample::select(edges), range]
    };
    (
        year,
        edge_or_any(vec![1, 12], 1..=12),
        edge_or_any(vec![1, 28], 1..=28),
        edge_or_any(vec![0, 23], 0..=23),
        edge_or_any(vec![0, 59], 0..=59),
        edge_or_any(vec![0, 59, 60], 0..=60),
        0..=9usize,
        prop_oneof![
            Just(None),
            (any::<bool>(), 0..=23u32, 0..=59u32).prop_map(Some)
        ],
        any::<u64>(),
    )
        .prop_map(|(y, mo, d, h, mi, s, digits, offset, noise)| {
            let fraction = if digits == 0 {
                String::new()
            } else {
                format!(".{:0>9}", noise % 1_000_000_000)[..=digits].to_owned()
            };
            let zone = match offset {
                None => "Z".to_owned(),
                Some((east, oh, om)) => format!("{}{oh:02}:{om:02}", if east { '+' } else { '-' }),
            };
            format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}{fraction}{zone}")
        })
}

/// A contact event of any type with every field at its edges.
fn edge_event(i: usize) -> impl Strategy<Value = Value> {
    let id = |max| {
        text(max)
            .prop_map(|s| s.chars().take(255).collect::<String>())
            .prop_filter("at most 255 bytes", |s| s.len() <= 255)
    };
    (
        proptest::sample::select(vec!["contact.created", "contact.updated", "contact.deleted"]),
        id(255),
        id(255),
        date_time(),
        date_time(),
        date_time(),
        (text(64), text(200)),
        (text(300), text(300), text(300), text(300), text(300)),
    )
        .prop_map(move |(event, event_id, contact_id, timestamp, created, updated, email, names)| {
            let (local, domain) = email;
            // An address's local part is at most 64 bytes.
            let local: String = local.replace([' ', '@'], ".").chars().scan(0, |bytes, c| {
                *bytes += c.len_utf8();
                (*bytes <= 64).then_some(c)
            }).collect();
            let domain: String = domain.chars().filter(|c| c.is_alphanumeric()).take(60).collect();
            let (first, last, phone, company, title) = names;
            json!({
                "event": event,
                "id": format!("{i}-{event_id}"),
                "timestamp": timestamp,
                "data": {
                    "id": contact_id,
                    "email": format!("{local}@{}.example", if domain.is_empty() { "d".into() } else { domain }),
                    "firstName": first, "lastName": last, "phone": phone, "company": company, "title": title,
                    "createdAt": created, "updatedAt": updated,
                    "extra": { "nested": [1, "two", null] },
                }
            })
        })
}

/// Events generated at every edge ingest has (instants, offsets, leap seconds, fractional
/// digits, id and field lengths, any Unicode) are posted to the service on PostgreSQL: every
/// one answered 200 is then applied by the consumer, none ends `failed` or stays `pending`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_ingest_accepts_at_the_edges_is_applied() {
    const CASES: usize = 400;
    let database = fresh_database().await;
    let app = TestApp::start(test_config(&database), Roles::ALL).await;
    let mut runner = TestRunner::deterministic();
    let events: Vec<Value> = (0..CASES)
        .map(|i| {
            edge_event(i)
                .new_tree(&mut runner)
                .expect("a case")
                .current()
        })
        .collect();
    let mut accepted = 0i64;
    // Why the others were refused: field and message, with how often.
    let mut refused: std::collections::BTreeMap<String, usize> = Default::default();
    for chunk in events.chunks(16) {
        let answers =
            futures::future::join_all(chunk.iter().map(|e| app.post_signed_json(e))).await;
        for (event, answer) in chunk.iter().zip(answers) {
            match answer.status().as_u16() {
                200 => accepted += 1,
                400 => {
                    let error: Value = answer.json().await.expect("a JSON error");
                    for detail in error["details"].as_array().into_iter().flatten() {
                        *refused
                            .entry(format!("{} {}", detail["field"], detail["message"]))
                            .or_default() += 1;
                    }
                }
                status => panic!("{status} for {event}"),
            }
        }
    }
    eprintln!("{CASES} generated events: {accepted} accepted; refusals: {refused:#?}");
    // The generator reaches both sides of the edge: many accepted, and instants refused.
    assert!(
        accepted >= (CASES / 4) as i64,
        "only {accepted} accepted: {refused:#?}"
    );
    assert!(
        refused.keys().any(|k| k.contains("once converted to UTC")),
        "{refused:#?}"
    );
    app.wait_for_count(
        "SELECT COUNT(*) FROM webhook_events WHERE status <> 'pending'",
        accepted,
        DRAIN,
    )
    .await;
    let failed = failed_events(&app).await;
    assert!(failed.is_empty(), "accepted but not applied: {failed:?}");
}
