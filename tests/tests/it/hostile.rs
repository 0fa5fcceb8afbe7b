//! Hostile input, as an attacker or a fuzzer sends it: never a 5xx for a request that would fail
//! again, never a partial write, never a socket held hostage. One test per family of issue #10.
use std::time::{Duration, Instant};

use api::Roles;
use api::config::{Config, Secret};
use entity::webhook_event;
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, Statement};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

const ADMIN_TOKEN: &str = "hostile-admin-token";

/// An HTTP-only app on Postgres (or on SQLite in `data_dir`), with the admin API on and one
/// stored event, so "nothing changed" is checked against a non-empty store.
async fn app_with(configure: impl FnOnce(&mut Config), sqlite: bool) -> TestApp {
    let database = if sqlite {
        None
    } else {
        Some(fresh_database().await)
    };
    let mut config = if let Some(database) = &database {
        test_config(database)
    } else {
        let mut config = Config::defaults();
        let dir = std::env::temp_dir().join(unique("acme-hostile"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        config.database.data_dir = dir;
        config.webhook.secrets = vec![Secret::new(SECRET)];
        config
    };
    config.admin.token = Some(Secret::new(ADMIN_TOKEN));
    configure(&mut config);
    let mut app = TestApp::start(config, Roles::HTTP).await;
    app.database = database;
    let seed = contact_event("contact.created", "evt_seed", "c1", "2025-05-19T00:00:00Z");
    assert_eq!(app.post_signed_json(&seed).await.status(), 200);
    // No pooled connection stays open behind the tests' backs (it would count against the cap).
    app.client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    app
}

async fn app() -> TestApp {
    app_with(|_| {}, false).await
}

/// Every row of both tables, as text: equal before and after means nothing changed.
async fn snapshot(app: &TestApp) -> Vec<String> {
    let mut rows = Vec::new();
    for sql in [
        "SELECT event_id, status, payload FROM webhook_events ORDER BY id",
        "SELECT event_id, topic, headers FROM outbox ORDER BY id",
    ] {
        for row in app
            .db
            .query_all_raw(Statement::from_string(
                app.db.get_database_backend(),
                sql.to_owned(),
            ))
            .await
            .expect("snapshot query")
        {
            let event_id: String = row.try_get_by_index(0).expect("event_id");
            let second: String = row.try_get_by_index(1).expect("text column");
            let payload: Value = row.try_get_by_index(2).expect("payload or headers");
            rows.push(format!("{event_id} {second} {payload}"));
        }
    }
    rows
}

/// The project's error shape: `code` and `message` strings, optional `details`, nothing else.
async fn error_body(response: reqwest::Response) -> Value {
    let status = response.status();
    let body: Value = response.json().await.expect("a JSON error body");
    let object = body.as_object().expect("an object");
    assert!(object["code"].is_string(), "{status}: {body}");
    assert!(object["message"].is_string(), "{status}: {body}");
    assert!(
        object
            .keys()
            .all(|k| ["code", "message", "details"].contains(&k.as_str())),
        "{status}: {body}"
    );
    body
}

fn detail_fields(body: &Value) -> Vec<String> {
    body["details"]
        .as_array()
        .map(|details| {
            details
                .iter()
                .map(|d| d["field"].as_str().expect("field").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Bodies the store could never hold, or that JSON does not allow: 400 naming the field, the
/// same answer on PostgreSQL and on SQLite, and nothing stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unstorable_strings_are_400_naming_the_field_in_both_modes() {
    let valid = contact_event("contact.created", "evt_nul", "c2", "2025-05-19T00:00:00Z");
    let with = |pointer: &str, value: Value| {
        let mut body = valid.clone();
        *body.pointer_mut(pointer).expect("pointer") = value;
        body.to_string()
    };
    let mut extra_key = valid.clone();
    extra_key["data"]["nested"] = json!({ "bad\u{0}key": 1 });
    let deep = format!(
        r#"{{"event":"contact.deleted","id":"evt_deep","timestamp":"2025-05-19T00:00:00Z","data":{{"id":"c1","x":{}1{}}}}}"#,
        "[".repeat(200),
        "]".repeat(200)
    );
    // (case, body, expected `details` fields; None: invalid JSON, no details)
    let cases: Vec<(&str, String, Option<Vec<&str>>)> = vec![
        (
            "NUL in the event id",
            with("/id", json!("evt\u{0}")),
            Some(vec!["id"]),
        ),
        (
            "NUL in a name",
            with("/data/firstName", json!("Jo\u{0}hn")),
            Some(vec!["data.firstName"]),
        ),
        (
            "NUL in an unknown field",
            with("/data/company", json!({ "notes": ["ok", "\u{0}"] })),
            Some(vec!["data.company.notes[1]", "data.company"]),
        ),
        (
            "NUL in a key",
            extra_key.to_string(),
            Some(vec![r#"data.nested["bad\u0000key"]"#]),
        ),
        (
            "lone surrogate",
            with("/data/lastName", json!("x")).replace("\"x\"", r#""\ud800""#),
            None,
        ),
        (
            "number beyond jsonb",
            with("/data/title", json!(1)).replace(":1,", ":1e400,"),
            None,
        ),
        ("nesting beyond 128", deep, None),
    ];
    let mut answers = Vec::new();
    for sqlite in [false, true] {
        let app = app_with(|_| {}, sqlite).await;
        let before = snapshot(&app).await;
        let mut these = Vec::new();
        for (case, body, fields) in &cases {
            let response = app.post_signed(body).await;
            assert_eq!(response.status(), 400, "{case} (sqlite: {sqlite})");
            let error = error_body(response).await;
            assert_eq!(error["code"], "payload_invalid", "{case}: {error}");
            match fields {
                Some(fields) => assert_eq!(detail_fields(&error), *fields, "{case}: {error}"),
                None => assert!(error.get("details").is_none(), "{case}: {error}"),
            }
            these.push(error);
        }
        assert_eq!(snapshot(&app).await, before, "sqlite: {sqlite}");
        answers.push(these);
    }
    assert_eq!(answers[0], answers[1], "PostgreSQL and SQLite answer alike");
}

/// Numbers are stored as read, not as sent: `1e-20000` and `1.` with 17,000 zeros are JSON and
/// read as 0 and 1, but PostgreSQL's `numeric` cannot hold them as written, so a copy of the
/// sender's text would be an event answered 200 that the store refuses. Both modes store the
/// same values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbers_are_stored_as_read_in_both_modes() {
    let body = contact_event("contact.created", "evt_num", "c4", "2025-05-19T00:00:00Z")
        .to_string()
        .replacen(
            r#""data":{"#,
            &format!(
                r#""data":{{"tiny":1e-20000,"long":1.{},"huge":1.5e300,"exact":-2.5253317714948458e-219,"max":18446744073709551615,"#,
                "0".repeat(17_000)
            ),
            1,
        );
    let mut stored = Vec::new();
    for sqlite in [false, true] {
        let app = app_with(|_| {}, sqlite).await;
        assert_eq!(
            app.post_signed(&body).await.status(),
            200,
            "sqlite: {sqlite}"
        );
        let payload = webhook_event::Entity::find()
            .filter(webhook_event::Column::EventId.eq("evt_num"))
            .one(&app.db)
            .await
            .expect("query")
            .expect("the event is stored")
            .payload;
        let data = &payload["data"];
        assert_eq!(data["tiny"].as_f64(), Some(0.0), "sqlite: {sqlite}: {data}");
        assert_eq!(data["long"].as_f64(), Some(1.0), "sqlite: {sqlite}");
        assert_eq!(data["huge"].as_f64(), Some(1.5e300), "sqlite: {sqlite}");
        assert_eq!(
            data["exact"].as_f64(),
            Some(-2.5253317714948458e-219),
            "sqlite: {sqlite}"
        );
        assert_eq!(data["max"].as_u64(), Some(u64::MAX), "sqlite: {sqlite}");
        assert_eq!(data["email"], "c4@example.com", "sqlite: {sqlite}: {data}");
        stored.push(payload);
    }
    assert_eq!(stored[0], stored[1], "PostgreSQL and SQLite store alike");
}

/// What is stored is what was signed: a repeated key, at any depth, is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_keys_are_400_and_nothing_is_stored() {
    let app = app().await;
    let before = snapshot(&app).await;
    let valid =
        contact_event("contact.created", "evt_dup", "c3", "2025-05-19T00:00:00Z").to_string();
    let cases = [
        (
            "top level",
            valid.replacen(r#""id":"evt_dup""#, r#""id":"evt_dup","id":"evt_other""#, 1),
            "id",
        ),
        (
            "nested",
            valid.replacen(
                r#""firstName":"John""#,
                r#""firstName":"John","firstName":"Mallory""#,
                1,
            ),
            "data.firstName",
        ),
        (
            "unknown field",
            valid.replacen(r#""data":{"#, r#""data":{"x":{"k":1,"k":2},"#, 1),
            "data.x.k",
        ),
    ];
    for (case, body, field) in cases {
        assert_ne!(body, valid, "{case}: the body was changed");
        let response = app.post_signed(&body).await;
        assert_eq!(response.status(), 400, "{case}");
        let error = error_body(response).await;
        assert_eq!(error["code"], "payload_invalid", "{case}");
        assert_eq!(detail_fields(&error), [field], "{case}: {error}");
    }
    assert_eq!(snapshot(&app).await, before);
}

/// Posts a correctly signed `body` with exactly this `Content-Type`.
async fn post_as(app: &TestApp, content_type: &str, body: &str) -> reqwest::Response {
    app.client
        .post(app.url("/api/webhooks"))
        .header("Content-Type", content_type)
        .header("X-Acme-Signature", sign(SECRET, body))
        .header("X-Acme-Timestamp", now_header())
        .body(body.to_owned())
        .send()
        .await
        .expect("request sent")
}

/// `Content-Type` per RFC 9110: case-insensitive names, whitespace around `;`, parameters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_type_is_parsed_per_rfc_9110() {
    let app = app().await;
    let event = |n: usize| {
        contact_event(
            "contact.created",
            &format!("evt_ct_{n}"),
            "c4",
            "2025-05-19T00:00:00Z",
        )
        .to_string()
    };
    for (n, content_type) in [
        "application/json ; charset=utf-8",
        "Application/JSON;Charset=\"UTF-8\"",
        "application/vnd.acme+json",
    ]
    .into_iter()
    .enumerate()
    {
        let response = post_as(&app, content_type, &event(n)).await;
        assert_eq!(response.status(), 200, "{content_type}");
    }
    let before = snapshot(&app).await;
    for content_type in [
        "text/plain",
        "application/json; charset=latin1",
        "application /json",
    ] {
        let response = post_as(&app, content_type, &event(99)).await;
        assert_eq!(response.status(), 415, "{content_type}");
        assert_eq!(error_body(response).await["code"], "unsupported_media_type");
    }
    assert_eq!(snapshot(&app).await, before);
}

/// Path and query values the store cannot hold are answered before any query: 404 for an id
/// that cannot exist, 400 for a filter that cannot match.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_and_query_values_are_checked_before_the_store() {
    let app = app().await;
    let before = snapshot(&app).await;
    let long = "e".repeat(300);
    let cases: Vec<(&str, String, Option<Value>, u16)> = vec![
        ("GET", "/api/contacts/%00".into(), None, 404),
        ("GET", format!("/api/contacts/{long}"), None, 404),
        ("GET", "/api/admin/events/%00".into(), None, 404),
        ("GET", "/api/admin/events/evt%00seed".into(), None, 404),
        ("POST", "/api/admin/events/%00/retry".into(), None, 404),
        ("GET", "/api/admin/events?type=%00".into(), None, 400),
        ("GET", "/api/admin/events?status=%00".into(), None, 400),
        ("GET", "/api/admin/events?cursor=%00".into(), None, 400),
        (
            "GET",
            "/api/admin/events?since=-5000-01-01T00:00:00Z".into(),
            None,
            400,
        ),
        (
            "GET",
            "/api/admin/events?until=%2B10000-01-01T00:00:00Z".into(),
            None,
            400,
        ),
        (
            "POST",
            "/api/admin/events/retry".into(),
            Some(json!({ "eventType": "\u{0}" })),
            400,
        ),
        (
            "POST",
            "/api/admin/events/retry".into(),
            Some(json!({ "since": "-5000-01-01T00:00:00Z" })),
            400,
        ),
    ];
    for (method, path, body, expected) in cases {
        let mut request = app
            .client
            .request(method.parse().expect("method"), app.url(&path))
            .bearer_auth(ADMIN_TOKEN);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("request sent");
        assert_eq!(response.status().as_u16(), expected, "{method} {path}");
        error_body(response).await;
    }
    // The checks do not get in the way of real ids and filters.
    let response = app
        .client
        .get(app.url("/api/admin/events?type=contact.created&since=2000-01-01T00:00:00Z"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("request sent");
    assert_eq!(response.status(), 200);
    let page: Value = response.json().await.expect("JSON");
    assert_eq!(page["events"][0]["eventId"], "evt_seed");
    assert_eq!(snapshot(&app).await, before);
}

/// Reads until the server closes the connection (or `within` passes); returns what it sent.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> Option<String> {
    let mut received = Vec::new();
    match tokio::time::timeout(within, stream.read_to_end(&mut received)).await {
        Ok(_) => Some(String::from_utf8_lossy(&received).into_owned()),
        Err(_) => None,
    }
}

/// A stalled body gets 408 and the connection is closed; a client that sends nothing, trickles
/// its head, or idles after an answer is disconnected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_silent_clients_are_cut_off() {
    let app = app_with(
        |config| {
            config.http.header_read_timeout_secs = 1;
            config.http.body_read_timeout_secs = 1;
            config.http.idle_timeout_secs = 2;
        },
        false,
    )
    .await;
    let addr = app.addr.expect("listening");
    let before = snapshot(&app).await;

    // Stalled body: the head promises 100 bytes, 5 arrive.
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "POST /api/webhooks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: 100\r\nX-Acme-Signature: {}\r\nX-Acme-Timestamp: {}\r\n\r\n{{\"id\"",
        sign(SECRET, "{\"id\""),
        now_header()
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    let started = Instant::now();
    let answer = read_until_closed(&mut stream, Duration::from_secs(5))
        .await
        .expect("the server answers and closes a stalled body");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains(r#""code":"request_timeout""#), "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    // Silent client: connects and sends nothing.
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let started = Instant::now();
    let answer = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    assert_eq!(answer.as_deref(), Some(""), "closed without an answer");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    // Slowloris: a head trickled a byte every 200 ms never completes, so the head deadline
    // closes it although bytes keep coming.
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let started = Instant::now();
    let mut closed = false;
    while started.elapsed() < Duration::from_secs(5) {
        if stream.write_all(b"X").await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 64];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await
        {
            closed = true;
            break;
        }
    }
    assert!(closed, "a trickled head was held for 5 s");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    // Keep-alive idle: one answer, then silence.
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let started = Instant::now();
    let answer = read_until_closed(&mut stream, Duration::from_secs(5))
        .await
        .expect("an idle kept-alive connection is closed");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    assert_eq!(snapshot(&app).await, before);
}

/// 1,000 idle connections do not keep anyone else out, and they are let go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_answers_within_a_second_while_1000_idle_connections_are_held() {
    let app = app_with(|config| config.http.header_read_timeout_secs = 6, false).await;
    let addr = app.addr.expect("listening");
    let mut idle = Vec::new();
    for _ in 0..10 {
        let batch = futures::future::join_all((0..100).map(|_| TcpStream::connect(addr))).await;
        idle.extend(batch.into_iter().map(|s| s.expect("connect")));
    }
    let held_since = Instant::now();
    let client = reqwest::Client::new();
    let mut slowest = Duration::ZERO;
    for _ in 0..5 {
        // A new connection each time, queued behind the idle ones.
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .expect("client");
        let started = Instant::now();
        let response = tokio::time::timeout(
            Duration::from_secs(1),
            client.get(app.url("/healthz")).send(),
        )
        .await
        .expect("/healthz answers within 1 s")
        .expect("request sent");
        assert_eq!(response.status(), 200);
        slowest = slowest.max(started.elapsed());
    }
    assert!(
        held_since.elapsed() < Duration::from_secs(6),
        "the idle connections were still held"
    );
    println!("slowest /healthz with 1000 idle connections held: {slowest:?}");
    drop(client);
    // The header deadline then closes every one of them.
    for (n, stream) in idle.iter_mut().enumerate() {
        let answer = read_until_closed(stream, Duration::from_secs(10)).await;
        assert_eq!(
            answer.as_deref(),
            Some(""),
            "idle connection {n} was not closed"
        );
    }
}

/// Over `http.max_connections`, a connection gets 503 and is closed; below it again, service
/// resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_get_503_and_service_resumes() {
    let app = app_with(|config| config.http.max_connections = 20, false).await;
    let addr = app.addr.expect("listening");
    // The seeding client's connection has gone; let the server notice.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut held = Vec::new();
    for _ in 0..20 {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        // A complete request and its answer: the connection is surely accepted, and stays open.
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let mut buf = [0u8; 512];
        let n = stream.read(&mut buf).await.expect("read");
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(stream);
    }
    let mut over = TcpStream::connect(addr).await.expect("connect");
    let answer = read_until_closed(&mut over, Duration::from_secs(5))
        .await
        .expect("closed at once");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains(r#""code":"unavailable""#), "{answer}");

    held.pop();
    wait_until("/healthz status", 200, Duration::from_secs(5), || async {
        match reqwest::get(app.url("/healthz")).await {
            Ok(response) => response.status().as_u16(),
            Err(_) => 0,
        }
    })
    .await;
}

/// Signed bodies drawn at random (arbitrary bytes, valid events with bytes overwritten, events
/// with arbitrary Unicode in their fields): only 200 or 400, the same answer on PostgreSQL and on
/// SQLite, and a row only for a 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_signed_bodies_never_get_a_5xx_in_either_mode() {
    use proptest::prelude::*;
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    let seed = contact_event("contact.updated", "evt_p", "c5", "2025-05-19T00:00:00Z").to_string();
    let len = seed.len();
    let seed_bytes = seed.clone().into_bytes();
    let mangled = prop::collection::vec((0..len, any::<u8>()), 1..4).prop_map(move |edits| {
        let mut body = seed_bytes.clone();
        for (at, byte) in edits {
            body[at] = byte;
        }
        body
    });
    let unicode = (
        any::<String>(),
        any::<String>(),
        any::<String>(),
        0..1_000_000u32,
    )
        .prop_map(|(name, key, value, n)| {
            let mut event = contact_event(
                "contact.created",
                &format!("evt_u_{n}"),
                "c6",
                "2025-05-19T00:00:00Z",
            );
            event["data"]["firstName"] = json!(name);
            event["data"][key] = json!(value);
            event.to_string().into_bytes()
        });
    let bodies = prop_oneof![prop::collection::vec(any::<u8>(), 0..300), mangled, unicode,];
    let mut runner = TestRunner::deterministic();
    let cases: Vec<Vec<u8>> = (0..300)
        .map(|_| bodies.new_tree(&mut runner).expect("a case").current())
        .collect();

    let mut answers = Vec::new();
    for sqlite in [false, true] {
        let app = app_with(|_| {}, sqlite).await;
        let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
        let mut these = Vec::new();
        for body in &cases {
            let signature = format!("sha256={}", api::signature::sign(SECRET.as_bytes(), body));
            let response = app
                .client
                .post(app.url("/api/webhooks"))
                .header("Content-Type", "application/json")
                .header("X-Acme-Signature", signature)
                .header("X-Acme-Timestamp", now_header())
                .body(body.clone())
                .send()
                .await
                .expect("request sent");
            let status = response.status().as_u16();
            *statuses.entry(status).or_default() += 1;
            assert!(
                status == 200 || status == 400,
                "{status} for {:?}",
                String::from_utf8_lossy(body)
            );
            if status == 400 {
                error_body(response).await;
            }
            these.push(status);
        }
        println!("sqlite: {sqlite}; statuses: {statuses:?}");
        let accepted = these.iter().filter(|s| **s == 200).count() as i64;
        // The seed event, plus one row per accepted body (a repeated id is a duplicate).
        let stored = app.count("SELECT COUNT(*) FROM webhook_events").await;
        assert!(
            stored <= accepted + 1,
            "{stored} rows for {accepted} answers 200"
        );
        answers.push(these);
    }
    assert_eq!(answers[0], answers[1], "PostgreSQL and SQLite answer alike");
}
