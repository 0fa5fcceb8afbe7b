//! Retention: old published outbox rows and old processed events are deleted in batches; nothing
//! that a relay, the re-publish safety net, a retry or the dedupe promise still needs is touched.
use std::time::Duration;

use api::Roles;
use chrono::{DateTime, Utc};
use relay::retention::{PruneReport, Retention};
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::support::*;

const DRAIN: Duration = Duration::from_secs(60);
/// Published outbox rows older than this go.
const OUTBOX_SECS: u64 = 3600;
/// Processed events older than this go: the dedupe horizon of these tests.
const EVENTS_SECS: u64 = 7200;

fn ago(secs: i64) -> DateTime<Utc> {
    Utc::now() - chrono::Duration::seconds(secs)
}

/// The retention settings of these tests: 1 h / 2 h, tiny batches (so runs take several).
fn short_retention(config: &mut api::config::Config) {
    config.retention.enabled = true;
    config.retention.published_outbox_secs = OUTBOX_SECS;
    config.retention.processed_events_secs = EVENTS_SECS;
    config.retention.interval_secs = 1;
    config.retention.batch_size = 2;
    config.retention.batch_pause_ms = 0;
}

/// One event row and, optionally, one outbox row, with the given times. `$n` placeholders and
/// bound timestamps work on PostgreSQL and SQLite alike.
struct Seed<'a> {
    event_id: &'a str,
    status: &'a str,
    created_at: DateTime<Utc>,
    processed_at: Option<DateTime<Utc>>,
    /// `Some((published_at, next_attempt_at))`: an outbox row.
    outbox: Option<(Option<DateTime<Utc>>, DateTime<Utc>)>,
}

async fn seed<C: ConnectionTrait>(db: &C, seed: Seed<'_>) {
    let backend = db.get_database_backend();
    let payload = contact_event(
        "contact.created",
        seed.event_id,
        "contact-seeded",
        "2025-05-19T00:00:00Z",
    );
    db.execute_raw(Statement::from_sql_and_values(
        backend,
        "INSERT INTO webhook_events \
           (event_id, event_type, contact_id, payload, status, created_at, updated_at, processed_at) \
         VALUES ($1, 'contact.created', 'contact-seeded', $2, $3, $4, $4, $5)",
        [
            seed.event_id.into(),
            payload.clone().into(),
            seed.status.into(),
            seed.created_at.into(),
            seed.processed_at.into(),
        ],
    ))
    .await
    .expect("event seeded");
    if let Some((published_at, next_attempt_at)) = seed.outbox {
        db.execute_raw(Statement::from_sql_and_values(
            backend,
            "INSERT INTO outbox (event_id, topic, message_key, payload, headers, created_at, \
               published_at, next_attempt_at, attempts) \
             VALUES ($1, 't.contact.created', 'contact-seeded', $2, $3, $4, $5, $6, 1)",
            [
                seed.event_id.into(),
                payload.into(),
                serde_json::json!({ "event-id": seed.event_id }).into(),
                seed.created_at.into(),
                published_at.into(),
                next_attempt_at.into(),
            ],
        ))
        .await
        .expect("outbox row seeded");
    }
}

/// The rows retention must keep whatever their age, all received 3 h ago (past both horizons).
async fn seed_rows_that_must_stay<C: ConnectionTrait>(db: &C) {
    let old = ago(3 * 3600);
    // Pending, delivered long ago: the re-publish safety net reads this row.
    seed(
        db,
        Seed {
            event_id: "keep_pending",
            status: "pending",
            created_at: old,
            processed_at: None,
            outbox: Some((Some(old), old)),
        },
    )
    .await;
    // Failed: a retry re-publishes it, and its rows are its publish history.
    seed(
        db,
        Seed {
            event_id: "keep_failed",
            status: "failed",
            created_at: old,
            processed_at: None,
            outbox: Some((Some(old), old)),
        },
    )
    .await;
    // Processed, but a row of it waits out a publish backoff: neither may go.
    seed(
        db,
        Seed {
            event_id: "keep_unpublished",
            status: "processed",
            created_at: old,
            processed_at: Some(old),
            outbox: Some((None, Utc::now() + chrono::Duration::days(1))),
        },
    )
    .await;
    // Received long ago, processed only now (a late retry): kept for the full horizon.
    seed(
        db,
        Seed {
            event_id: "keep_processed_late",
            status: "processed",
            created_at: old,
            processed_at: Some(ago(60)),
            outbox: None,
        },
    )
    .await;
}

const KEPT_EVENTS: &str = "SELECT COUNT(*) FROM webhook_events WHERE event_id IN \
     ('keep_pending', 'keep_failed', 'keep_unpublished', 'keep_processed_late')";
const KEPT_OUTBOX: &str = "SELECT COUNT(*) FROM outbox WHERE event_id IN \
     ('keep_pending', 'keep_failed', 'keep_unpublished')";

async fn metric(app: &TestApp, series: &str) -> f64 {
    let text = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("scrape")
        .text()
        .await
        .expect("text");
    text.lines()
        .find_map(|line| {
            line.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(-1.0)
}

async fn post_status(app: &TestApp, body: &Value) -> String {
    let response = app.post_signed_json(body).await;
    assert_eq!(response.status(), 200);
    let ack: Value = response.json().await.expect("ack");
    ack["status"].as_str().expect("status").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_published_and_processed_rows_are_pruned_and_what_is_still_needed_is_kept() {
    let url = fresh_database().await;
    let mut config = test_config(&url);
    short_retention(&mut config);
    // The safety net would re-publish the seeded pending event; these tests look at retention.
    config.relay.republish_after_secs = 0;
    // Every role, with the in-process bus: a real relay and consumer process the posted events.
    let app = TestApp::start(config, Roles::ALL).await;
    let start = Utc::now().timestamp() as f64;

    let body = |i: usize| {
        contact_event(
            "contact.updated",
            &format!("evt_ret_{i}"),
            &format!("contact-r{i}"),
            "2025-05-19T00:00:00Z",
        )
    };
    for i in 0..8 {
        assert_eq!(post_status(&app, &body(i)).await, "accepted");
    }
    app.wait_for_count(
        "SELECT COUNT(*) FROM webhook_events WHERE status = 'processed'",
        8,
        DRAIN,
    )
    .await;
    app.wait_for_count(
        "SELECT COUNT(*) FROM outbox WHERE published_at IS NOT NULL",
        8,
        DRAIN,
    )
    .await;

    // Move time: evt_ret_0..4 were received, processed and published 3 h ago (past both
    // horizons), evt_ret_5 90 min ago (past the outbox horizon, within the dedupe horizon),
    // evt_ret_6..7 just now. Plus the rows that must stay. One transaction: a run sees all or none.
    let txn = sea_orm::TransactionTrait::begin(&app.db)
        .await
        .expect("begin");
    for (ids, secs) in [("0,1,2,3,4", 3 * 3600), ("5", 90 * 60)] {
        let list: Vec<String> = ids.split(',').map(|i| format!("'evt_ret_{i}'")).collect();
        let list = list.join(",");
        txn.execute_unprepared(&format!(
            "UPDATE webhook_events SET created_at = now() - interval '{secs} seconds', \
               processed_at = now() - interval '{secs} seconds' WHERE event_id IN ({list}); \
             UPDATE outbox SET created_at = now() - interval '{secs} seconds', \
               published_at = now() - interval '{secs} seconds' WHERE event_id IN ({list})"
        ))
        .await
        .expect("backdated");
    }
    seed_rows_that_must_stay(&txn).await;
    txn.commit().await.expect("commit");

    // The retention task of the relay role prunes them within a few runs (1 s apart).
    app.wait_for_count(
        "SELECT COUNT(*) FROM outbox WHERE event_id IN \
           ('evt_ret_0','evt_ret_1','evt_ret_2','evt_ret_3','evt_ret_4','evt_ret_5')",
        0,
        DRAIN,
    )
    .await;
    app.wait_for_count(
        "SELECT COUNT(*) FROM webhook_events WHERE event_id IN \
           ('evt_ret_0','evt_ret_1','evt_ret_2','evt_ret_3','evt_ret_4')",
        0,
        DRAIN,
    )
    .await;
    // Let one more run pass: what is left stays.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(app.count(KEPT_EVENTS).await, 4, "kept events");
    assert_eq!(app.count(KEPT_OUTBOX).await, 3, "kept outbox rows");
    assert_eq!(
        app.count(
            "SELECT COUNT(*) FROM webhook_events WHERE event_id IN ('evt_ret_5','evt_ret_6','evt_ret_7')"
        )
        .await,
        3,
        "events within the horizon"
    );
    assert_eq!(
        app.count("SELECT COUNT(*) FROM outbox WHERE event_id IN ('evt_ret_6','evt_ret_7')")
            .await,
        2,
        "recently published rows"
    );

    // The metrics say what went, and that retention runs.
    wait_until(
        "retention_pruned_total{table=\"outbox\"}",
        6.0,
        DRAIN,
        || metric(&app, "retention_pruned_total{table=\"outbox\"}"),
    )
    .await;
    wait_until(
        "retention_pruned_total{table=\"webhook_events\"}",
        5.0,
        DRAIN,
        || metric(&app, "retention_pruned_total{table=\"webhook_events\"}"),
    )
    .await;
    let last_run = metric(&app, "retention_last_run_timestamp_seconds").await;
    assert!(
        last_run >= start,
        "last run {last_run} before the test {start}"
    );

    // Within the horizon a repeated id is still a duplicate (its outbox row is gone already);
    // past it, the id is new again.
    assert_eq!(post_status(&app, &body(5)).await, "duplicate");
    assert_eq!(post_status(&app, &body(7)).await, "duplicate");
    assert_eq!(post_status(&app, &body(0)).await, "accepted");
}

/// The same statements on the embedded SQLite database, driven one run at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_runs_on_the_embedded_sqlite_database() {
    let data_dir = std::env::temp_dir().join(unique("acme-retention"));
    let mut config = api::config::Config::defaults();
    config.database.data_dir = data_dir.clone();
    config.retention.enabled = false; // driven by hand below
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let service = api::Service::start(config.clone(), Roles::ALL, Some(listener))
        .await
        .expect("embedded mode starts");
    let db = service.db.clone();
    let old = ago(3 * 3600);
    for i in 0..5 {
        seed(
            &db,
            Seed {
                event_id: &format!("old_{i}"),
                status: "processed",
                created_at: old,
                processed_at: Some(old),
                outbox: Some((Some(old), old)),
            },
        )
        .await;
    }
    seed_rows_that_must_stay(&db).await;
    short_retention(&mut config);
    let report = Retention::new(db.clone(), config.retention.clone())
        .prune_once(&CancellationToken::new())
        .await
        .expect("a run");
    assert_eq!(
        report,
        PruneReport {
            outbox: 5,
            events: 5,
            ..PruneReport::default()
        }
    );
    assert_eq!(count(&db, KEPT_EVENTS).await, 4);
    assert_eq!(count(&db, KEPT_OUTBOX).await, 3);
    assert_eq!(count(&db, "SELECT COUNT(*) FROM webhook_events").await, 4);
    service.stop().await;
    let _ = std::fs::remove_dir_all(data_dir);
}

/// Two pruners at once (two relay replicas). While one is in the middle of a batch, the other
/// finds the pruners' lock taken: it ends its run at once, deletes nothing and says it yielded,
/// and the first one deletes every old row. Then both run together, round after round: no
/// error, every old row deleted exactly once, by one or the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pruners_share_the_work_without_errors() {
    let database = fresh_database().await;
    let mut config = test_config(&database);
    short_retention(&mut config);
    config.retention.batch_size = 7;
    let db: DatabaseConnection = {
        let app = TestApp::start(config.clone(), Roles::HTTP).await;
        app.db.clone()
    };
    let seed_old = async |prefix: &str| {
        let old = ago(3 * 3600);
        for i in 0..60 {
            seed(
                &db,
                Seed {
                    event_id: &format!("{prefix}_{i}"),
                    status: "processed",
                    created_at: old,
                    processed_at: Some(old),
                    outbox: Some((Some(old), old)),
                },
            )
            .await;
        }
    };
    let shutdown = CancellationToken::new();
    let a = Retention::new(db.clone(), config.retention.clone());
    let b = a.clone();

    // A gate that holds the first DELETE on the outbox (the first pruner's first batch, inside
    // its transaction) until the test opens it. Whoever arrives second passes straight through
    // (the gate's own advisory lock, of the one-key space, is the first one's): a pruner that
    // went ahead without the pruners' lock would prune while the first one waits.
    db.execute_unprepared(
        "CREATE TABLE retention_gate (open boolean NOT NULL); \
         INSERT INTO retention_gate VALUES (false); \
         CREATE FUNCTION hold_first_prune() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN \
           IF pg_try_advisory_xact_lock(hashtext('retention_gate')) THEN \
             WHILE NOT (SELECT open FROM retention_gate) LOOP PERFORM pg_sleep(0.05); END LOOP; \
           END IF; \
           RETURN NULL; \
         END $$; \
         CREATE TRIGGER hold_first_prune BEFORE DELETE ON outbox \
           FOR EACH STATEMENT EXECUTE FUNCTION hold_first_prune()",
    )
    .await
    .expect("the gate");
    seed_old("held").await;
    let first = tokio::spawn({
        let a = a.clone();
        let shutdown = shutdown.clone();
        async move { a.prune_once(&shutdown).await }
    });
    wait_until(
        "sessions waiting at the gate (the first pruner inside its first batch)",
        1,
        DRAIN,
        || {
            count(
                &db,
                "SELECT COUNT(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event = 'PgSleep'",
            )
        },
    )
    .await;
    let second = tokio::time::timeout(Duration::from_secs(10), b.prune_once(&shutdown))
        .await
        .expect("the second pruner ended its run while the first was in a batch")
        .expect("run b");
    assert_eq!(
        second,
        PruneReport {
            yielded: true,
            ..PruneReport::default()
        },
        "a pruner that finds another one in a batch yields and deletes nothing"
    );
    assert_eq!(count(&db, "SELECT COUNT(*) FROM outbox").await, 60);
    db.execute_unprepared("UPDATE retention_gate SET open = true")
        .await
        .expect("open the gate");
    let first = first.await.expect("run a").expect("run a");
    assert_eq!(
        first,
        PruneReport {
            outbox: 60,
            events: 60,
            ..PruneReport::default()
        },
        "the first pruner did all the work"
    );
    assert_eq!(count(&db, "SELECT COUNT(*) FROM webhook_events").await, 0);
    assert_eq!(count(&db, "SELECT COUNT(*) FROM outbox").await, 0);
    db.execute_unprepared("DROP TRIGGER hold_first_prune ON outbox")
        .await
        .expect("no gate");

    // Both at once, as two replicas' timers would start them.
    seed_old("old").await;
    let mut total = PruneReport::default();
    // Until nothing is left: a run that finds the other pruning stops early.
    for _ in 0..100 {
        let (ra, rb) = tokio::join!(a.prune_once(&shutdown), b.prune_once(&shutdown));
        for report in [ra.expect("run a"), rb.expect("run b")] {
            total.outbox += report.outbox;
            total.events += report.events;
        }
        if count(&db, "SELECT COUNT(*) FROM webhook_events").await == 0 {
            break;
        }
    }
    assert_eq!((total.outbox, total.events), (60, 60));
    assert_eq!(count(&db, "SELECT COUNT(*) FROM outbox").await, 0);
}
