//! POST /api/webhooks through the real HTTP stack into a real PostgreSQL database.
use api::Roles;
use api::config::Secret;
use sea_orm::ConnectionTrait;
use serde_json::{Value, json};

use crate::support::*;

const CONTACT: &str = "c8b5f7d9-8e7a-4a1d-9b5c-1d2e3f4a5b6c";

fn created(event_id: &str) -> String {
    contact_event(
        "contact.created",
        event_id,
        CONTACT,
        "2025-05-19T00:00:00.000Z",
    )
    .to_string()
}

async fn json_body(response: reqwest::Response) -> Value {
    response.json().await.expect("a JSON body")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_event_is_accepted_with_its_outbox_row_and_a_repeat_is_a_duplicate() {
    let app = TestApp::http_only().await;
    let body = created("evt_1");

    let response = app.post_signed(&body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        json_body(response).await,
        json!({ "eventId": "evt_1", "status": "accepted" })
    );
    assert_eq!(
        app.count("SELECT COUNT(*) FROM webhook_events WHERE status = 'pending'")
            .await,
        1
    );
    let prefix = &app.config.kafka.topic_prefix;
    let outbox = app
        .count(&format!(
            "SELECT COUNT(*) FROM outbox WHERE event_id = 'evt_1' AND topic = '{prefix}.contact.created' \
             AND message_key = '{CONTACT}' AND headers->>'event-id' = 'evt_1' \
             AND headers->>'event-type' = 'contact.created' AND published_at IS NULL"
        ))
        .await;
    assert_eq!(outbox, 1);
    // The stored payload is the body as sent.
    let stored = app
        .count(&format!(
            "SELECT COUNT(*) FROM webhook_events WHERE payload = '{body}'::jsonb"
        ))
        .await;
    assert_eq!(stored, 1);

    let response = app.post_signed(&body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        json_body(response).await,
        json!({ "eventId": "evt_1", "status": "duplicate" })
    );
    assert_eq!(app.count("SELECT COUNT(*) FROM webhook_events").await, 1);
    assert_eq!(app.count("SELECT COUNT(*) FROM outbox").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_fields_are_kept_in_the_stored_payload() {
    let app = TestApp::http_only().await;
    let mut body = contact_event(
        "contact.updated",
        "evt_extra",
        CONTACT,
        "2025-05-19T00:00:00Z",
    );
    body["data"]["favouriteColour"] = json!("teal");
    body["source"] = json!("import");
    assert_eq!(app.post_signed(&body.to_string()).await.status(), 200);
    let kept = app
        .count("SELECT COUNT(*) FROM webhook_events WHERE payload->'data'->>'favouriteColour' = 'teal' AND payload->>'source' = 'import'")
        .await;
    assert_eq!(kept, 1);
}

/// Every way to be refused: the status, the error code, and nothing written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rejection_has_its_status_and_json_error_and_writes_nothing() {
    let app = TestApp::http_only().await;
    let body = created("evt_rejected");
    let good_signature = sign(SECRET, &body);
    let now = now_header();
    let stale = (chrono::Utc::now().timestamp() - 301).to_string();
    // Far beyond the 300 s tolerance, so a slow run cannot bring it back inside.
    let future = (chrono::Utc::now().timestamp() + 3600).to_string();
    let not_json = "{\"event\": ";
    let invalid = json!({ "event": "contact.created", "id": "evt_x", "timestamp": "now", "data": { "id": "c1", "email": "nope" } }).to_string();

    // (case, body, X-Acme-Signature, X-Acme-Timestamp, expected status, expected code)
    type Case<'a> = (
        &'a str,
        &'a str,
        Option<String>,
        Option<String>,
        u16,
        &'a str,
    );
    let cases: Vec<Case<'_>> = vec![
        (
            "no signature",
            &body,
            None,
            Some(now.clone()),
            401,
            "signature_invalid",
        ),
        (
            "wrong signature",
            &body,
            Some(sign("other-secret", &body)),
            Some(now.clone()),
            401,
            "signature_invalid",
        ),
        (
            "malformed signature",
            &body,
            Some("sha256=xyz".into()),
            Some(now.clone()),
            401,
            "signature_invalid",
        ),
        (
            "signature of another body",
            &body,
            Some(sign(SECRET, &created("evt_other"))),
            Some(now.clone()),
            401,
            "signature_invalid",
        ),
        (
            "no timestamp",
            &body,
            Some(good_signature.clone()),
            None,
            401,
            "timestamp_invalid",
        ),
        (
            "unreadable timestamp",
            &body,
            Some(good_signature.clone()),
            Some("yesterday".into()),
            401,
            "timestamp_invalid",
        ),
        (
            "stale timestamp",
            &body,
            Some(good_signature.clone()),
            Some(stale),
            401,
            "timestamp_invalid",
        ),
        (
            "future timestamp",
            &body,
            Some(good_signature.clone()),
            Some(future),
            401,
            "timestamp_invalid",
        ),
        (
            "not JSON",
            not_json,
            Some(sign(SECRET, not_json)),
            Some(now.clone()),
            400,
            "payload_invalid",
        ),
        (
            "invalid event",
            &invalid,
            Some(sign(SECRET, &invalid)),
            Some(now.clone()),
            400,
            "payload_invalid",
        ),
    ];
    for (name, body, signature, timestamp, status, code) in cases {
        let response = app
            .post_with(body, signature.as_deref(), timestamp.as_deref(), &[])
            .await;
        assert_eq!(response.status(), status, "{name}");
        let error = json_body(response).await;
        assert_eq!(error["code"], code, "{name}: {error}");
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{name}: {error}"
        );
        if let Some(signature) = &signature {
            let hex = signature.trim_start_matches("sha256=");
            assert!(
                !error.to_string().contains(hex),
                "{name}: the error echoes a signature"
            );
        }
    }

    // Content type: 415, checked before the signature.
    let response = app
        .client
        .post(app.url("/api/webhooks"))
        .header("Content-Type", "text/plain")
        .header("X-Acme-Signature", &good_signature)
        .header("X-Acme-Timestamp", now_header())
        .body(body.clone())
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 415);
    assert_eq!(json_body(response).await["code"], "unsupported_media_type");

    assert_eq!(app.count("SELECT COUNT(*) FROM webhook_events").await, 0);
    assert_eq!(app.count("SELECT COUNT(*) FROM outbox").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_event_lists_every_offending_field() {
    let app = TestApp::http_only().await;
    let mut body = contact_event(
        "contact.updated",
        "evt_bad",
        CONTACT,
        "2025-05-19T00:00:00Z",
    );
    body["data"]["email"] = json!("not-an-email");
    body["data"]["updatedAt"] = json!("last tuesday");
    body["data"]
        .as_object_mut()
        .expect("object")
        .remove("lastName");
    body["timestamp"] = json!(12);
    let response = app.post_signed(&body.to_string()).await;
    assert_eq!(response.status(), 400);
    let error = json_body(response).await;
    let fields: Vec<&str> = error["details"]
        .as_array()
        .expect("details")
        .iter()
        .map(|d| d["field"].as_str().expect("field"))
        .collect();
    assert_eq!(
        fields,
        ["timestamp", "data.email", "data.lastName", "data.updatedAt"]
    );
    assert_eq!(app.count("SELECT COUNT(*) FROM webhook_events").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_limit_get_413_whether_declared_or_streamed() {
    let url = fresh_database().await;
    let mut config = test_config(&url);
    config.http.max_body_bytes = 1024;
    let app = TestApp::start(config, Roles::HTTP).await;
    let mut big = contact_event(
        "contact.created",
        "evt_big",
        CONTACT,
        "2025-05-19T00:00:00Z",
    );
    big["data"]["title"] = json!("x".repeat(2000));
    let big = big.to_string();

    let response = app.post_signed(&big).await;
    assert_eq!(response.status(), 413);
    assert_eq!(json_body(response).await["code"], "payload_too_large");

    // Chunked, without Content-Length: cut off while reading.
    let chunks: Vec<Result<String, std::io::Error>> = big
        .as_bytes()
        .chunks(256)
        .map(|c| Ok(String::from_utf8_lossy(c).into_owned()))
        .collect();
    let response = app
        .client
        .post(app.url("/api/webhooks"))
        .header("Content-Type", "application/json")
        .header("X-Acme-Signature", sign(SECRET, &big))
        .header("X-Acme-Timestamp", now_header())
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 413);
    assert_eq!(app.count("SELECT COUNT(*) FROM webhook_events").await, 0);

    // Just under the limit is fine.
    let small = created("evt_small");
    assert!(small.len() < 1024);
    assert_eq!(app.post_signed(&small).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_copies_of_one_event_store_one_event_and_one_outbox_row() {
    let app = TestApp::http_only().await;
    let body = created("evt_race");
    let responses = futures::future::join_all((0..50).map(|_| app.post_signed(&body))).await;
    let mut statuses = Vec::new();
    for response in responses {
        assert_eq!(response.status(), 200);
        statuses.push(
            json_body(response).await["status"]
                .as_str()
                .expect("status")
                .to_owned(),
        );
    }
    assert_eq!(statuses.iter().filter(|s| *s == "accepted").count(), 1);
    assert_eq!(statuses.iter().filter(|s| *s == "duplicate").count(), 49);
    assert_eq!(app.count("SELECT COUNT(*) FROM webhook_events").await, 1);
    assert_eq!(app.count("SELECT COUNT(*) FROM outbox").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_distinct_concurrent_events_are_each_stored_once() {
    let app = TestApp::http_only().await;
    let bodies: Vec<String> = (0..200)
        .map(|i| created(&format!("evt_many_{i}")))
        .collect();
    let responses = futures::future::join_all(bodies.iter().map(|b| app.post_signed(b))).await;
    for response in responses {
        assert_eq!(response.status(), 200);
        assert_eq!(json_body(response).await["status"], "accepted");
    }
    assert_eq!(app.count("SELECT COUNT(*) FROM webhook_events").await, 200);
    assert_eq!(app.count("SELECT COUNT(*) FROM outbox").await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_is_not_stored_when_its_outbox_row_cannot_be() {
    let app = TestApp::http_only().await;
    // Make every outbox insert fail, as a full disk or a broken constraint would.
    app.db
        .execute_unprepared(
            "ALTER TABLE outbox ADD CONSTRAINT refuse_everything CHECK (false) NOT VALID",
        )
        .await
        .expect("constraint added");
    let body = created("evt_atomic");
    let response = app.post_signed(&body).await;
    assert_eq!(response.status(), 500);
    let error = json_body(response).await;
    assert_eq!(error["code"], "internal_error");
    let text = error.to_string();
    assert!(
        !text.contains("refuse_everything")
            && !text.contains("constraint")
            && !text.contains("outbox"),
        "{text}"
    );
    assert_eq!(app.count("SELECT COUNT(*) FROM webhook_events").await, 0);
    assert_eq!(app.count("SELECT COUNT(*) FROM outbox").await, 0);

    // The sender retries once we are healthy again, and the event goes through.
    app.db
        .execute_unprepared("ALTER TABLE outbox DROP CONSTRAINT refuse_everything")
        .await
        .expect("dropped");
    let response = app.post_signed(&body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(json_body(response).await["status"], "accepted");
    assert_eq!(app.count("SELECT COUNT(*) FROM webhook_events").await, 1);
    assert_eq!(app.count("SELECT COUNT(*) FROM outbox").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timestamps_in_every_form_inside_the_window_are_accepted_and_replays_outside_are_not() {
    let app = TestApp::http_only().await;
    let now = chrono::Utc::now();
    let forms = [
        now.timestamp().to_string(),
        now.timestamp_millis().to_string(),
        now.to_rfc3339(),
        (now.timestamp() - 290).to_string(),
    ];
    for (i, timestamp) in forms.iter().enumerate() {
        let body = created(&format!("evt_ts_{i}"));
        let response = app
            .post_with(&body, Some(&sign(SECRET, &body)), Some(timestamp), &[])
            .await;
        assert_eq!(response.status(), 200, "{timestamp}");
    }
    // A captured request replayed ten minutes later: a valid signature, but refused.
    let body = created("evt_replayed");
    let captured_at = (now.timestamp() - 600).to_string();
    let response = app
        .post_with(&body, Some(&sign(SECRET, &body)), Some(&captured_at), &[])
        .await;
    assert_eq!(response.status(), 401);
    assert_eq!(
        app.count("SELECT COUNT(*) FROM webhook_events WHERE event_id = 'evt_replayed'")
            .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_rotation_accepts_old_and_new_until_the_old_is_removed() {
    let url = fresh_database().await;
    let mut config = test_config(&url);
    config.webhook.secrets = vec![Secret::new("old-secret"), Secret::new("new-secret")];
    let mut app = TestApp::start(config.clone(), Roles::HTTP).await;
    for (i, secret) in ["old-secret", "new-secret"].iter().enumerate() {
        let body = created(&format!("evt_rot_{i}"));
        let response = app
            .post_with(&body, Some(&sign(secret, &body)), Some(&now_header()), &[])
            .await;
        assert_eq!(response.status(), 200, "{secret}");
    }
    app.stop().await;

    config.webhook.secrets = vec![Secret::new("new-secret")];
    let app = TestApp::start(config, Roles::HTTP).await;
    let body = created("evt_rot_2");
    let refused = app
        .post_with(
            &body,
            Some(&sign("old-secret", &body)),
            Some(&now_header()),
            &[],
        )
        .await;
    assert_eq!(refused.status(), 401);
    let accepted = app
        .post_with(
            &body,
            Some(&sign("new-secret", &body)),
            Some(&now_header()),
            &[],
        )
        .await;
    assert_eq!(accepted.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_allowlist_checks_the_peer_or_the_forwarded_client_behind_a_trusted_proxy() {
    let url = fresh_database().await;
    let mut config = test_config(&url);
    config.webhook.allowed_ips = vec!["203.0.113.0/24".parse().expect("cidr")];
    let app = TestApp::start(config.clone(), Roles::HTTP).await;

    // The test client (127.0.0.1) is not allowed, and cannot talk its way in.
    let body = created("evt_ip_1");
    let response = app.post_signed(&body).await;
    assert_eq!(response.status(), 403);
    assert_eq!(json_body(response).await["code"], "ip_forbidden");
    let spoofed = app
        .post_with(
            &body,
            Some(&sign(SECRET, &body)),
            Some(&now_header()),
            &[("X-Forwarded-For", "203.0.113.7")],
        )
        .await;
    assert_eq!(spoofed.status(), 403);

    // Behind a trusted proxy (here: the loopback peer), the forwarded client address counts.
    let mut config = test_config(&url);
    config.webhook.allowed_ips = vec!["203.0.113.0/24".parse().expect("cidr")];
    config.webhook.trusted_proxies = vec!["127.0.0.0/8".parse().expect("cidr")];
    let app = TestApp::start(config, Roles::HTTP).await;
    let allowed = app
        .post_with(
            &body,
            Some(&sign(SECRET, &body)),
            Some(&now_header()),
            &[("X-Forwarded-For", "198.51.100.1, 203.0.113.7")],
        )
        .await;
    assert_eq!(allowed.status(), 200);
    let outside = created("evt_ip_2");
    let refused = app
        .post_with(
            &outside,
            Some(&sign(SECRET, &outside)),
            Some(&now_header()),
            &[("X-Forwarded-For", "198.51.100.1")],
        )
        .await;
    assert_eq!(refused.status(), 403);
    assert_eq!(app.count("SELECT COUNT(*) FROM webhook_events").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_and_bad_parameters_answer_in_the_same_error_shape() {
    let app = TestApp::http_only().await;
    let response = app
        .client
        .get(app.url("/api/nowhere"))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 404);
    let error = json_body(response).await;
    assert_eq!(error["code"], "not_found");

    let response = app
        .client
        .get(app.url(&format!("/api/contacts/{CONTACT}")))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 404);
    assert_eq!(json_body(response).await["code"], "not_found");

    let response = app
        .client
        .get(app.url("/healthz"))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("x-request-id"));
    let response = app
        .client
        .get(app.url("/healthz"))
        .header("X-Request-Id", "req-42")
        .send()
        .await
        .expect("sent");
    assert_eq!(response.headers()["x-request-id"], "req-42");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_without_a_secret_refuses_to_start() {
    let url = fresh_database().await;
    let mut config = test_config(&url);
    config.webhook.secrets.clear();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let error = api::Service::start(config, Roles::HTTP, Some(listener))
        .await
        .err()
        .expect("refused");
    assert!(error.to_string().contains("webhook.secrets"), "{error}");
}
