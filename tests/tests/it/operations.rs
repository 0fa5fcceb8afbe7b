//! What operators use: metrics, backlog gauges, readiness, the admin API.
use std::collections::BTreeSet;
use std::time::Duration;

use api::Roles;
use api::config::Secret;
use serde_json::Value;

use crate::support::*;

const DRAIN: Duration = Duration::from_secs(60);

async fn metric(app: &TestApp, name: &str) -> f64 {
    let text = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("scrape")
        .text()
        .await
        .expect("text");
    // `name` is a full series: the metric name with its labels, exactly as exposed.
    text.lines()
        .find_map(|line| {
            line.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse::<f64>()
                .ok()
        })
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_accepted_duplicate_and_rejected_posts_and_pipeline_work() {
    let app = TestApp::with_kafka().await;
    let body = contact_event(
        "contact.created",
        "evt_m1",
        "contact-m",
        "2025-05-19T00:00:00Z",
    )
    .to_string();
    assert_eq!(app.post_signed(&body).await.status(), 200);
    assert_eq!(app.post_signed(&body).await.status(), 200);
    assert_eq!(
        app.post_with(&body, Some("sha256=00"), Some(&now_header()), &[])
            .await
            .status(),
        401
    );
    app.wait_for_count(
        "SELECT COUNT(*) FROM webhook_events WHERE status = 'processed'",
        1,
        DRAIN,
    )
    .await;

    assert_eq!(
        metric(&app, "webhook_requests_total{outcome=\"accepted\"}").await,
        1.0
    );
    assert_eq!(
        metric(&app, "webhook_requests_total{outcome=\"duplicate\"}").await,
        1.0
    );
    assert_eq!(
        metric(
            &app,
            "webhook_rejections_total{reason=\"signature_invalid\"}"
        )
        .await,
        1.0
    );
    assert_eq!(metric(&app, "relay_published_total").await, 1.0);
    assert_eq!(metric(&app, "consumer_processed_total").await, 1.0);
}

/// Polls `/metrics` until `series` equals `expected`.
async fn wait_for_metric(app: &TestApp, series: &str, expected: f64) {
    wait_until(series, expected, DRAIN, || metric(app, series)).await;
}

/// What ops watch: with no relay running the backlog gauges show rows piling up and getting
/// older; once a relay runs they drain to zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backlog_gauges_show_a_stopped_relay_and_drain_after_it_starts() {
    let app = TestApp::http_only().await; // no relay in this process yet
    for i in 0..5 {
        let body = contact_event(
            "contact.created",
            &format!("evt_backlog_{i}"),
            &format!("contact-b{i}"),
            "2025-05-19T00:00:00Z",
        );
        assert_eq!(app.post_signed_json(&body).await.status(), 200);
    }
    let topic = app.config.kafka.topic_for("contact.created");
    wait_for_metric(&app, "outbox_pending_total", 5.0).await;
    wait_for_metric(&app, &format!("outbox_pending{{topic=\"{topic}\"}}"), 5.0).await;
    let age = metric(&app, "outbox_oldest_claimable_age_seconds_max").await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let later = metric(&app, "outbox_oldest_claimable_age_seconds_max").await;
    assert!(
        later >= age + 1.0,
        "the oldest row's age grows while nothing relays ({age} s, then {later} s)"
    );

    // Start the relay and the consumer (in-process bus) on the same database.
    let _workers = TestApp::start(
        app.config.clone(),
        Roles {
            http: false,
            relay: true,
            consumer: true,
        },
    )
    .await;
    wait_for_metric(&app, "outbox_pending_total", 0.0).await;
    wait_for_metric(&app, "outbox_oldest_claimable_age_seconds_max", 0.0).await;
    app.wait_for_count(
        "SELECT COUNT(*) FROM webhook_events WHERE status = 'processed'",
        5,
        DRAIN,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_broker() {
    let mut broker = OwnBroker::start();
    let url = fresh_database().await;
    let mut config = test_config(&url);
    config.kafka.brokers = Some(broker.brokers());
    let app = TestApp::start(config, Roles::HTTP).await;
    assert_eq!(app.readiness().await.0, 200);
    broker.stop();
    let (status, body) = app.readiness().await;
    assert_eq!(status, 503);
    let kafka = dependency(&body, "kafka");
    assert_eq!(kafka["up"], false);
    broker.restart();
    assert_eq!(app.readiness().await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_needs_its_token_and_pages_every_event_exactly_once() {
    let url = fresh_database().await;
    let mut config = test_config(&url);
    config.admin.token = Some(Secret::new("admin-token-for-tests"));
    let app = TestApp::start(config, Roles::HTTP).await;
    let list = app.url("/api/admin/events?limit=7");
    assert_eq!(
        app.client.get(&list).send().await.expect("sent").status(),
        401
    );
    assert_eq!(
        app.client
            .get(&list)
            .bearer_auth("wrong-token")
            .send()
            .await
            .expect("sent")
            .status(),
        401
    );

    for i in 0..30 {
        let body = contact_event(
            "contact.created",
            &format!("evt-page-{i}"),
            "contact-page",
            "2025-05-19T00:00:00Z",
        );
        assert_eq!(app.post_signed_json(&body).await.status(), 200);
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    // About 6 pages (7 an answer, one new event a page): a cursor that never ends is a failure.
    for extra in 30.. {
        assert!(
            extra < 30 + 50,
            "still a nextCursor after 50 pages ({} events seen)",
            seen.len()
        );
        let page_url = match &cursor {
            Some(c) => format!("{list}&cursor={c}"),
            None => list.clone(),
        };
        let page: Value = app
            .client
            .get(&page_url)
            .bearer_auth("admin-token-for-tests")
            .send()
            .await
            .expect("sent")
            .json()
            .await
            .expect("json");
        for event in page["events"].as_array().expect("events") {
            seen.push(event["eventId"].as_str().expect("id").to_owned());
        }
        // New events keep arriving while we page.
        let body = contact_event(
            "contact.created",
            &format!("evt-page-{extra}"),
            "contact-page",
            "2025-05-19T00:00:00Z",
        );
        assert_eq!(app.post_signed_json(&body).await.status(), 200);
        match page["nextCursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    let unique: BTreeSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no event twice");
    for i in 0..30 {
        assert!(
            unique.contains(&format!("evt-page-{i}")),
            "evt-page-{i} missing"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_the_admin_api_does_not_exist() {
    let app = TestApp::http_only().await;
    let response = app
        .client
        .get(app.url("/api/admin/outbox"))
        .bearer_auth("anything-at-all")
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retrying_a_failed_event_through_the_admin_api_processes_it() {
    use sea_orm::ConnectionTrait;
    let url = fresh_database().await;
    let mut config = test_config(&url);
    config.kafka.brokers = Some(kafka_brokers());
    config.admin.token = Some(Secret::new("admin-token-for-tests"));
    let app = TestApp::start(config, Roles::ALL).await;
    // An event that failed earlier (say, before a fix was deployed).
    let payload = contact_event(
        "contact.created",
        "evt_failed",
        "contact-f",
        "2025-05-19T00:00:00Z",
    );
    app.db
        .execute_unprepared(&format!(
            "INSERT INTO webhook_events (event_id, event_type, contact_id, payload, status, error, attempts) \
             VALUES ('evt_failed', 'contact.created', 'contact-f', '{payload}', 'failed', 'boom', 1)"
        ))
        .await
        .expect("failed event inserted");
    let retry = app.url("/api/admin/events/evt_failed/retry");
    assert_eq!(
        app.client.post(&retry).send().await.expect("sent").status(),
        401
    );
    let response = app
        .client
        .post(&retry)
        .bearer_auth("admin-token-for-tests")
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.expect("json")["requeued"], 1);
    app.wait_for_count("SELECT COUNT(*) FROM webhook_events WHERE event_id = 'evt_failed' AND status = 'processed' AND error IS NULL", 1, DRAIN).await;
    assert_eq!(
        app.count("SELECT COUNT(*) FROM contacts WHERE id = 'contact-f'")
            .await,
        1
    );
    // A processed event cannot be retried.
    let again = app
        .client
        .post(&retry)
        .bearer_auth("admin-token-for-tests")
        .send()
        .await
        .expect("sent");
    assert_eq!(again.status(), 409);
    let detail: Value = app
        .client
        .get(app.url("/api/admin/events/evt_failed"))
        .bearer_auth("admin-token-for-tests")
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(detail["status"], "processed");
    assert_eq!(detail["outbox"].as_array().expect("outbox").len(), 1);
}
