//! The operations console (`/console`) in a real browser (headless Chromium driven by
//! playwright-core, `tests/console/driver.mjs`) against the real service on PostgreSQL and
//! Kafka; its security rules with plain HTTP; and the admin API endpoints it added.
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use api::Roles;
use api::config::Secret;
use sea_orm::ConnectionTrait;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::process::ServiceProcess;
use crate::support::*;

const TOKEN: &str = "console-admin-token-0123";
const DRAIN: Duration = Duration::from_secs(60);
/// Events of the operator's story: more than a page of the list (50).
const EVENTS: u64 = 55;

/// Where the screenshots go (`target/tmp/console/`; docs/console.md links them).
fn screenshot(name: &str) -> String {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console");
    std::fs::create_dir_all(&dir).expect("screenshot directory");
    dir.join(name).display().to_string()
}

/// Headless Chromium behind `tests/console/driver.mjs`: one JSON command per line.
struct Browser {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    next: u64,
}

impl Browser {
    async fn start() -> Self {
        let playwright = std::env::var("ACME_TEST_PLAYWRIGHT_DIR").expect(
            "ACME_TEST_PLAYWRIGHT_DIR is not set: run the tests with scripts/test \
             (scripts/services.sh ensure_playwright installs playwright-core)",
        );
        let chromium = std::env::var("ACME_TEST_CHROMIUM").unwrap_or_else(|_| "chromium".into());
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/console/driver.mjs");
        let mut child = Command::new("node")
            .arg(script)
            .env("ACME_TEST_PLAYWRIGHT_DIR", playwright)
            .env("ACME_TEST_CHROMIUM", chromium)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("run node (scripts/test installs it with playwright-core)");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
        Self {
            child,
            stdin,
            stdout,
            next: 0,
        }
    }

    async fn try_call(&mut self, mut command: Value) -> Result<Value, String> {
        self.next += 1;
        command["id"] = json!(self.next);
        let line = format!("{command}\n");
        self.stdin
            .write_all(line.as_bytes())
            .await
            .expect("write to the driver");
        let answer = tokio::time::timeout(Duration::from_secs(90), self.stdout.next_line())
            .await
            .unwrap_or_else(|_| panic!("the driver did not answer {command} within 90 s"))
            .expect("read the driver")
            .unwrap_or_else(|| panic!("the driver exited during {command}"));
        let answer: Value = serde_json::from_str(&answer).expect("a JSON answer");
        assert_eq!(answer["id"], json!(self.next), "answers come in order");
        if answer["ok"] == true {
            Ok(answer["value"].clone())
        } else {
            Err(answer["error"].as_str().unwrap_or_default().to_owned())
        }
    }

    async fn call(&mut self, command: Value) -> Value {
        let shown = command.to_string();
        self.try_call(command)
            .await
            .unwrap_or_else(|error| panic!("{shown} failed: {error}"))
    }

    async fn goto(&mut self, url: &str) -> Value {
        self.call(json!({"cmd": "goto", "url": url})).await
    }

    async fn text(&mut self, selector: &str) -> String {
        self.call(json!({"cmd": "text", "selector": selector}))
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    async fn wait_for_text(&mut self, selector: &str, pattern: &str, timeout: Duration) -> String {
        self.call(
            json!({"cmd": "waitForText", "selector": selector, "pattern": pattern,
            "timeoutMs": timeout.as_millis() as u64}),
        )
        .await
        .as_str()
        .unwrap_or_default()
        .to_owned()
    }

    async fn click(&mut self, selector: &str) {
        self.call(json!({"cmd": "click", "selector": selector}))
            .await;
    }

    async fn click_and_wait(&mut self, selector: &str) -> Value {
        self.call(json!({"cmd": "clickAndWait", "selector": selector}))
            .await
    }

    async fn fill(&mut self, selector: &str, value: &str) {
        self.call(json!({"cmd": "fill", "selector": selector, "value": value}))
            .await;
    }

    async fn count(&mut self, selector: &str) -> u64 {
        self.call(json!({"cmd": "count", "selector": selector}))
            .await
            .as_u64()
            .unwrap_or_default()
    }

    async fn evaluate(&mut self, expression: &str) -> Value {
        self.call(json!({"cmd": "evaluate", "expression": expression}))
            .await
    }

    async fn screenshot(&mut self, name: &str) {
        let path = screenshot(name);
        self.call(json!({"cmd": "screenshot", "path": path})).await;
        let png = std::fs::read(&path).expect("the screenshot was written");
        assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "{path}");
        eprintln!("screenshot: {path}");
    }

    /// Signs in at `base` with `token` and lands on the overview.
    async fn sign_in(&mut self, base: &str, token: &str) {
        self.goto(&format!("{base}/console")).await;
        self.fill("#token", token).await;
        let landed = self.click_and_wait("button[type=submit]").await;
        assert_eq!(landed["status"], 200, "{landed}");
        self.call(json!({"cmd": "waitForSelector", "selector": "#overview"}))
            .await;
    }

    /// What the pages logged, and every native dialog a script opened.
    async fn log(&mut self) -> Value {
        self.call(json!({"cmd": "log"})).await
    }

    async fn close(mut self) {
        let _ = self.try_call(json!({"cmd": "close"})).await;
        let _ = self.child.wait().await;
    }
}

/// Posts `body` to `base` signed with the test secret; panics unless it is accepted.
async fn post_event(client: &reqwest::Client, base: &str, body: &Value) {
    let body = body.to_string();
    let response = client
        .post(format!("{base}/api/webhooks"))
        .header("Content-Type", "application/json")
        .header("X-Acme-Signature", sign(SECRET, &body))
        .header("X-Acme-Timestamp", now_header())
        .body(body.clone())
        .send()
        .await
        .expect("post a webhook");
    assert_eq!(response.status(), 200, "{body}");
}

fn poison(event_id: &str, contact_id: &str) -> Value {
    let mut event = contact_event(
        "contact.created",
        event_id,
        contact_id,
        "2025-05-19T10:00:00Z",
    );
    event["data"]["lastName"] = json!("Poison");
    event
}

const NO_POISON: &str = "ALTER TABLE contacts ADD CONSTRAINT no_poison CHECK (last_name IS DISTINCT FROM 'Poison') NOT VALID";
const POISON_FIXED: &str = "ALTER TABLE contacts DROP CONSTRAINT no_poison";

/// The whole operator's story in a browser, on the real binaries split by role (`serve` with
/// the console, `relay`, and later `consume`) over PostgreSQL and Kafka: sign in, watch a
/// backlog build while no consumer runs and drain once one starts, find an event with the
/// filter and open it and its contact, see a failed event's error, fix the cause, retry it from
/// its page and see it processed, then retry two more with the bulk action.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_signs_in_watches_the_backlog_drain_finds_an_event_and_retries_failures() {
    let database = fresh_database().await;
    let mut config = test_config(&database);
    config.kafka.brokers = Some(kafka_brokers());
    let db = connect(&config).await;
    db.execute_unprepared(NO_POISON).await.expect("constraint");
    let extra = [
        ("ACME_WEBHOOKS_ADMIN__TOKEN", TOKEN),
        ("ACME_WEBHOOKS_METRICS__BACKLOG_REFRESH_SECS", "1"),
        ("ACME_WEBHOOKS_RELAY__POLL_INTERVAL_MS", "200"),
        ("ACME_WEBHOOKS_KAFKA__MESSAGE_TIMEOUT_MS", "5000"),
    ];
    let serve = ServiceProcess::start_role(&config, Some("serve"), &extra).await;
    let _relay = ServiceProcess::start_role(&config, Some("relay"), &extra).await;
    let base = serve.url("");
    let client = reqwest::Client::new();
    let mut browser = Browser::start().await;

    // Sign in: the token travels in the form body; the cookie is HttpOnly and SameSite=Strict
    // and does not hold the token; no page carries it.
    let first = browser.goto(&format!("{base}/console")).await;
    assert_eq!(first["status"], 200);
    browser.screenshot("sign-in.png").await;
    browser.sign_in(&base, TOKEN).await;
    let url = browser.call(json!({"cmd": "url"})).await;
    assert!(!url.as_str().unwrap_or_default().contains(TOKEN), "{url}");
    let cookies = browser.call(json!({"cmd": "cookies"})).await;
    let cookie = &cookies.as_array().expect("cookies")[0];
    assert_eq!(cookie["name"], "acme_console");
    assert_eq!(cookie["httpOnly"], true);
    assert_eq!(cookie["sameSite"], "Strict");
    assert_eq!(cookie["path"], "/console");
    assert!(!cookie["value"].as_str().unwrap_or_default().contains(TOKEN));
    let page = browser.call(json!({"cmd": "html"})).await;
    assert!(!page.as_str().unwrap_or_default().contains(TOKEN));

    // A backlog builds while nobody consumes...
    for i in 0..EVENTS {
        let event = contact_event(
            "contact.created",
            &format!("evt-{i}"),
            &format!("contact-{i}"),
            "2025-05-19T10:00:00Z",
        );
        post_event(&client, &base, &event).await;
    }
    browser
        .wait_for_text("[data-field=unprocessed]", &format!("^{EVENTS}$"), DRAIN)
        .await;
    browser
        .wait_for_text("[data-field=received]", &format!("^{EVENTS}$"), DRAIN)
        .await;
    browser
        .wait_for_text(
            "#readiness li.down[data-dependency='consumer group']",
            "no consumer has joined",
            DRAIN,
        )
        .await;
    browser
        .wait_for_text(
            "tr[data-alert=AcmeWebhooksNotReady] td.state",
            "^ok$",
            DRAIN,
        )
        .await;
    browser.screenshot("overview-backlog.png").await;

    // ... and drains once a consumer starts; its partitions show their owner and lag.
    let _consumer = ServiceProcess::start_role(&config, Some("consume"), &extra).await;
    browser
        .wait_for_text("[data-field=unprocessed]", "^0$", DRAIN)
        .await;
    browser
        .wait_for_text("[data-field=processed]", &format!("^{EVENTS}$"), DRAIN)
        .await;
    browser
        .wait_for_text(
            "#readiness li.up[data-dependency='consumer group']",
            "up",
            DRAIN,
        )
        .await;
    browser.wait_for_text("#partitions", "\\S", DRAIN).await;
    assert_eq!(
        browser.count("#partitions tr").await,
        6,
        "3 topics x 2 partitions"
    );
    let owners = browser.text("#partitions").await;
    assert!(
        !owners.contains("none"),
        "every partition has an owner: {owners}"
    );
    assert_eq!(
        browser
            .count("#readiness li.up[data-dependency=database]")
            .await,
        1
    );
    assert_eq!(
        browser
            .count("#readiness li.up[data-dependency=kafka]")
            .await,
        1
    );
    assert_eq!(browser.count("svg#rate-chart polyline").await, 3);
    browser.screenshot("overview-drained.png").await;

    // Newest first, 50 a page, then the older ones; filter to one event, open it, then its
    // contact.
    browser.goto(&format!("{base}/console/events")).await;
    assert_eq!(browser.count("table.events tbody tr").await, 50);
    let newest = browser
        .text("table.events tbody tr:first-child a.event-link")
        .await;
    assert_eq!(newest, format!("evt-{}", EVENTS - 1));
    browser.click_and_wait("#older").await;
    assert_eq!(browser.count("table.events tbody tr").await, EVENTS - 50);
    assert_eq!(
        browser
            .text("table.events tbody tr:last-child a.event-link")
            .await,
        "evt-0"
    );
    assert_eq!(browser.count("#older").await, 0);
    browser.goto(&format!("{base}/console/events")).await;
    browser.fill("input[name=eventId]", "evt-7").await;
    browser
        .click_and_wait("form.filters button[type=submit]")
        .await;
    assert_eq!(browser.count("table.events tbody tr").await, 1);
    browser.screenshot("events-filtered.png").await;
    let opened = browser.click_and_wait("a.event-link").await;
    assert!(
        opened["url"]
            .as_str()
            .unwrap_or_default()
            .ends_with("/console/events/evt-7"),
        "{opened}"
    );
    assert_eq!(browser.text("#event-status").await, "processed");
    let timeline = browser.text("#timeline").await;
    for step in ["received", "published", "processed"] {
        assert!(timeline.contains(step), "{timeline}");
    }
    assert!(timeline.contains(&format!("{}.contact.created", config.kafka.topic_prefix)));
    let payload = browser.text("#payload").await;
    assert!(
        payload.contains("\"lastName\": \"Smith-evt-7\""),
        "{payload}"
    );
    browser.screenshot("event.png").await;
    browser.click_and_wait("#contact-link").await;
    let contact = browser.text("main").await;
    assert!(
        contact.contains("contact-7@example.com") && contact.contains("evt-7"),
        "{contact}"
    );
    browser.screenshot("contact.png").await;

    // An event the consumer cannot apply fails; the list of failed events shows it, its page
    // its error.
    post_event(&client, &base, &poison("evt-poison", "contact-poison")).await;
    wait_for_count(
        &db,
        "SELECT COUNT(*) FROM webhook_events WHERE event_id = 'evt-poison' AND status = 'failed'",
        1,
        DRAIN,
    )
    .await;
    browser.goto(&format!("{base}/console")).await;
    browser
        .wait_for_text(
            "tr[data-alert=AcmeWebhooksDeadLettersGrowing] td.state",
            "^FIRING$",
            DRAIN,
        )
        .await;
    browser
        .wait_for_text("#recent-failures", "evt-poison.*no_poison", DRAIN)
        .await;
    browser.screenshot("overview-failure.png").await;
    browser
        .goto(&format!("{base}/console/events?status=failed"))
        .await;
    assert_eq!(browser.count("table.events tbody tr").await, 1);
    browser
        .goto(&format!("{base}/console/events/evt-poison"))
        .await;
    assert_eq!(browser.text("#event-status").await, "failed");
    assert!(browser.text("#event-error").await.contains("no_poison"));
    browser.screenshot("event-failed.png").await;

    // The cause is fixed; retried from its page (a confirmation states how many), it is
    // published again and processed.
    db.execute_unprepared(POISON_FIXED).await.expect("fix");
    browser.click("#retry-event").await;
    browser
        .call(json!({"cmd": "waitForSelector", "selector": "dialog#confirm[open]"}))
        .await;
    let asked = browser.text("#confirm-text").await;
    assert!(asked.contains("Retry 1 failed event"), "{asked}");
    browser.screenshot("retry-confirm.png").await;
    browser.click("#confirm-ok").await;
    browser
        .wait_for_text("#flash", "Re-queued 1 event", DRAIN)
        .await;
    wait_for_count(
        &db,
        "SELECT COUNT(*) FROM webhook_events WHERE event_id = 'evt-poison' AND status = 'processed'",
        1,
        DRAIN,
    )
    .await;
    browser
        .goto(&format!("{base}/console/events/evt-poison"))
        .await;
    assert_eq!(browser.text("#event-status").await, "processed");
    let timeline = browser.text("#timeline").await;
    assert!(
        timeline.contains("requeued") && timeline.contains("processed"),
        "{timeline}"
    );
    browser.screenshot("event-retried.png").await;

    // Two more fail; the bulk retry of the failed list says it will retry 2, and does.
    db.execute_unprepared(NO_POISON).await.expect("constraint");
    post_event(&client, &base, &poison("evt-poison-2", "contact-p2")).await;
    post_event(&client, &base, &poison("evt-poison-3", "contact-p3")).await;
    wait_for_count(
        &db,
        "SELECT COUNT(*) FROM webhook_events WHERE status = 'failed'",
        2,
        DRAIN,
    )
    .await;
    db.execute_unprepared(POISON_FIXED).await.expect("fix");
    browser
        .goto(&format!("{base}/console/events?status=failed"))
        .await;
    browser.click("#retry-matching").await;
    browser
        .call(json!({"cmd": "waitForSelector", "selector": "dialog#confirm[open]"}))
        .await;
    let asked = browser.text("#confirm-text").await;
    assert!(asked.contains("Retry 2 failed events"), "{asked}");
    browser.screenshot("retry-matching-confirm.png").await;
    browser.click("#confirm-ok").await;
    browser
        .wait_for_text("#flash", "Re-queued 2 of 2", DRAIN)
        .await;
    wait_for_count(
        &db,
        "SELECT COUNT(*) FROM webhook_events WHERE status = 'processed'",
        EVENTS as i64 + 3,
        DRAIN,
    )
    .await;

    // Each action was logged and counted like the admin API's.
    let metrics = client
        .get(serve.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("admin_retries_total{via=\"console\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("admin_requeued_events_total{via=\"console\"} 3"));
    assert!(metrics.contains("console_sign_ins_total{outcome=\"ok\"} 1"));
    let logs = serve.logs().join("\n");
    assert!(logs.contains("retry of one event"), "{logs}");
    assert!(logs.contains("retry of the failed events matching a filter"));
    assert!(!logs.contains(TOKEN), "the token is never logged");

    // Signing out ends the session in this browser.
    browser.goto(&format!("{base}/console")).await;
    browser.click("#sign-out").await;
    browser
        .call(json!({"cmd": "waitForSelector", "selector": "#token"}))
        .await;
    let after = browser.goto(&format!("{base}/console/api/overview")).await;
    assert_eq!(after["status"], 401, "{after}");

    let log = browser.log().await;
    assert_eq!(log["dialogs"], json!([]), "{log}");
    let messages = log["messages"].as_array().cloned().unwrap_or_default();
    // The one expected error: the signed-out overview call just above.
    let messages: Vec<Value> = messages
        .into_iter()
        .filter(|m| !m["text"].as_str().unwrap_or_default().contains("401"))
        .collect();
    assert!(
        !messages.iter().any(|m| m["type"] == "pageerror"
            || m["text"]
                .as_str()
                .unwrap_or_default()
                .contains("Content Security Policy")),
        "{log}"
    );
    browser.close().await;
}

/// Webhook fields holding markup, `javascript:` URLs and U+202E are shown as text on every page
/// and run nothing: no injected element, no `window` flag, no dialog, no script error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_webhook_content_is_shown_as_text_and_runs_nothing() {
    let database = fresh_database().await;
    let mut config = test_config(&database);
    config.kafka.brokers = Some(kafka_brokers());
    config.admin.token = Some(Secret::new(TOKEN));
    let app = TestApp::start(config, Roles::ALL).await.owning(database);
    app.db
        .execute_unprepared(NO_POISON)
        .await
        .expect("constraint");
    let event_id = "evt-<script>window.__xss=1</script>";
    let contact_id = "javascript:window.__xss=2";
    let mut event = contact_event(
        "contact.created",
        event_id,
        contact_id,
        "2025-05-19T10:00:00Z",
    );
    event["data"]["firstName"] = json!("<script>window.__xss=3</script>");
    event["data"]["lastName"] = json!("\"><img src=x onerror=\"window.__xss=4\">");
    event["data"]["company"] = json!("javascript:window.__xss=5");
    event["data"]["title"] = json!("\u{202E}gnp.exe");
    event["data"]["notes"] = json!("</pre></bdi><svg onload=\"window.__xss=6\"></svg>");
    assert_eq!(app.post_signed_json(&event).await.status(), 200);
    // One that fails, so that the overview's list of failures (drawn by the script) shows it.
    let failing_id = "evt-\"><img src=x onerror=\"window.__xss=7\">\u{202E}";
    let failing = poison(failing_id, "contact-<b>bold</b>");
    assert_eq!(app.post_signed_json(&failing).await.status(), 200);
    app.wait_for_count(
        "SELECT COUNT(*) FROM webhook_events WHERE status <> 'pending'",
        2,
        DRAIN,
    )
    .await;
    let base = app.url("");
    let mut browser = Browser::start().await;
    browser.sign_in(&base, TOKEN).await;

    let inert = "window.__xss === undefined \
        && document.querySelectorAll('main img, main script, main svg[onload], main [onerror]').length === 0";
    browser.goto(&format!("{base}/console/events")).await;
    assert_eq!(browser.evaluate(inert).await, true);
    let list = browser.text("table.events").await;
    assert!(
        list.contains(event_id) && list.contains(contact_id),
        "{list}"
    );

    // The older of the two (the list is newest first).
    browser
        .click_and_wait("table.events tbody tr:last-child a.event-link")
        .await;
    assert_eq!(browser.evaluate(inert).await, true);
    let payload = browser.text("#payload").await;
    for shown in [
        "<script>window.__xss=3</script>",
        "\\\"><img src=x onerror=\\\"window.__xss=4\\\">",
        "javascript:window.__xss=5",
        "\\u202Egnp.exe",
        "</pre></bdi><svg onload=\\\"window.__xss=6\\\"></svg>",
    ] {
        assert!(payload.contains(shown), "{shown} in {payload}");
    }
    // U+202E itself is nowhere in the rendered text: it cannot reorder what follows it.
    assert_eq!(
        browser
            .evaluate("document.body.innerText.includes('\\u202E')")
            .await,
        false
    );
    let href = browser
        .call(json!({"cmd": "attribute", "selector": "#contact-link", "name": "href"}))
        .await;
    assert_eq!(href, "/console/contacts/javascript%3Awindow.__xss%3D2");
    browser.screenshot("event-hostile.png").await;

    browser.click_and_wait("#contact-link").await;
    assert_eq!(browser.evaluate(inert).await, true);
    let contact = browser.text("main").await;
    assert!(
        contact.contains("<script>window.__xss=3</script>"),
        "{contact}"
    );
    browser.goto(&format!("{base}/console")).await;
    let failures = browser
        .wait_for_text("#recent-failures", "no_poison", DRAIN)
        .await;
    assert!(
        failures.contains("evt-\"><img src=x onerror=\"window.__xss=7\">\\u202E")
            && failures.contains("contact-<b>bold</b>"),
        "{failures}"
    );
    assert_eq!(browser.evaluate(inert).await, true);
    assert_eq!(
        browser
            .evaluate("document.body.innerText.includes('\\u202E') || document.querySelector('main b') !== null")
            .await,
        false
    );
    browser.screenshot("overview-hostile.png").await;

    let log = browser.log().await;
    assert_eq!(log["dialogs"], json!([]), "{log}");
    assert!(
        !log["messages"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .any(|m| m["type"] == "pageerror" || m["type"] == "error"),
        "{log}"
    );
    browser.close().await;
}

/// An event set to `failed` directly (no consumer needed for what these tests check).
async fn failed_event(app: &TestApp, event_id: &str) {
    let event = contact_event(
        "contact.created",
        event_id,
        "contact-1",
        "2025-05-19T10:00:00Z",
    );
    assert_eq!(app.post_signed_json(&event).await.status(), 200);
    app.db
        .execute_unprepared(&format!(
            "UPDATE webhook_events SET status = 'failed', error = 'boom' WHERE event_id = '{event_id}'"
        ))
        .await
        .expect("fail the event");
}

/// The session cookie and CSRF token of a sign-in over plain HTTP.
async fn sign_in_http(app: &TestApp) -> (String, String) {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let response = client
        .post(app.url("/console/session"))
        .form(&[("token", TOKEN)])
        .send()
        .await
        .expect("sign in");
    assert_eq!(response.status(), 303);
    let cookie = response.headers()["set-cookie"]
        .to_str()
        .expect("ascii")
        .split(';')
        .next()
        .expect("name=value")
        .to_owned();
    assert!(!cookie.contains(TOKEN));
    let page = client
        .get(app.url("/console"))
        .header("Cookie", &cookie)
        .send()
        .await
        .expect("overview")
        .text()
        .await
        .expect("html");
    assert!(!page.contains(TOKEN), "the token is not in the page");
    let csrf = page
        .split("name=\"csrf-token\" content=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the page carries a CSRF token")
        .to_owned();
    (cookie, csrf)
}

/// Without the session, without the CSRF token, or from another site (headers a browser sets, a
/// forged form in a real browser on another origin): nothing, and the failed event stays failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_the_session_or_from_another_site_get_nothing_and_change_nothing() {
    let database = fresh_database().await;
    let mut config = test_config(&database);
    config.admin.token = Some(Secret::new(TOKEN));
    let app = TestApp::start(config, Roles::HTTP).await.owning(database);
    failed_event(&app, "evt-f").await;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let retry = app.url("/console/api/events/evt-f/retry");
    let still_failed = "SELECT COUNT(*) FROM webhook_events WHERE status = 'failed'";

    // No session.
    let status = |r: reqwest::Response| r.status().as_u16();
    assert_eq!(
        status(
            client
                .get(app.url("/console/api/overview"))
                .send()
                .await
                .expect("x")
        ),
        401
    );
    assert_eq!(status(client.post(&retry).send().await.expect("x")), 401);
    let page = client
        .get(app.url("/console/events"))
        .send()
        .await
        .expect("x");
    assert_eq!(
        page.status(),
        303,
        "a page sends a signed-out browser to sign in"
    );
    let forged = client
        .post(&retry)
        .header("Cookie", "acme_console=9999999999.00.00")
        .send()
        .await
        .expect("x");
    assert_eq!(forged.status(), 401);

    // Sign-in: a wrong token, or the right one from another site, gets no cookie.
    let wrong = client
        .post(app.url("/console/session"))
        .form(&[("token", "not-the-token")])
        .send()
        .await
        .expect("x");
    assert_eq!(wrong.status(), 401);
    assert!(wrong.headers().get("set-cookie").is_none());
    let cross = client
        .post(app.url("/console/session"))
        .header("Origin", "http://evil.example")
        .form(&[("token", TOKEN)])
        .send()
        .await
        .expect("x");
    assert_eq!(cross.status(), 403);
    assert!(cross.headers().get("set-cookie").is_none());

    // Signed in, but without the CSRF token, or sent from another site.
    let (cookie, csrf) = sign_in_http(&app).await;
    let attempt = |headers: Vec<(&'static str, String)>| {
        let mut request = client.post(&retry).header("Cookie", &cookie);
        for (name, value) in headers {
            request = request.header(name, value);
        }
        request.send()
    };
    let refused: [Vec<(&'static str, String)>; 4] = [
        vec![],
        vec![("X-CSRF-Token", "0".repeat(64))],
        vec![
            ("X-CSRF-Token", csrf.clone()),
            ("Origin", "http://evil.example".into()),
        ],
        vec![
            ("X-CSRF-Token", csrf.clone()),
            ("Sec-Fetch-Site", "cross-site".into()),
        ],
    ];
    for headers in refused {
        let shown = format!("{headers:?}");
        assert_eq!(status(attempt(headers).await.expect("x")), 403, "{shown}");
    }
    assert_eq!(app.count(still_failed).await, 1, "nothing changed");

    // A real browser, signed in, visits a page of another site that posts a form to the
    // console and tries a credentialed fetch: neither reaches the retry.
    let mut browser = Browser::start().await;
    browser.sign_in(&app.url(""), TOKEN).await;
    let evil = EvilSite::start(&app.url("/console/api/events/evt-f/retry")).await;
    // The page navigates away at once (its form): where `goto` lands does not matter.
    let _ = browser
        .try_call(json!({"cmd": "goto", "url": evil.url}))
        .await;
    let after = browser
        .wait_for_text("body", "unauthorized|cross_site_request", DRAIN)
        .await;
    assert!(
        after.contains("unauthorized") || after.contains("cross_site_request"),
        "{after}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        app.count(still_failed).await,
        1,
        "the forged form changed nothing"
    );
    browser.screenshot("forged-form-refused.png").await;
    browser.close().await;

    // The positive control: the same request with the session, its token, from the console.
    let allowed = attempt(vec![("X-CSRF-Token", csrf)]).await.expect("x");
    assert_eq!(allowed.status(), 200);
    let result: Value = allowed.json().await.expect("json");
    assert_eq!(result["requeued"], 1);
    assert_eq!(app.count(still_failed).await, 0);
}

/// Another site (`localhost` on a port of its own, while the console is on `127.0.0.1`): one
/// page whose script posts a form to the console and tries a credentialed fetch.
struct EvilSite {
    url: String,
    task: tokio::task::JoinHandle<()>,
}

impl EvilSite {
    async fn start(target: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let page = format!(
            "<!doctype html><html><body><form id=f method=post action=\"{target}\" \
             enctype=\"text/plain\"><input name='{{\"dryRun\":false,\"x\":\"' value='\"}}'></form>\
             <script>fetch(\"{target}\", {{method: \"POST\", credentials: \"include\", \
             headers: {{\"X-CSRF-Token\": \"guess\"}}}}).catch(() => {{}}); \
             document.getElementById(\"f\").submit();</script></body></html>"
        );
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                let page = page.clone();
                tokio::spawn(async move {
                    use tokio::io::AsyncReadExt;
                    let mut buffer = [0u8; 4096];
                    let _ = socket.read(&mut buffer).await;
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\n\
                         Connection: close\r\n\r\n{page}",
                        page.len()
                    );
                    let _ = socket.write_all(answer.as_bytes()).await;
                });
            }
        });
        Self {
            url: format!("http://localhost:{port}/"),
            task,
        }
    }
}

impl Drop for EvilSite {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// No admin token: the console is off, and its page says how to turn it on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_admin_token_the_console_is_off_and_says_how_to_turn_it_on() {
    let app = TestApp::http_only().await;
    let client = reqwest::Client::new();
    let response = client
        .get(app.url("/console"))
        .send()
        .await
        .expect("console");
    assert_eq!(response.status(), 404);
    assert_eq!(
        response.headers()["content-security-policy"],
        api::console::CONTENT_SECURITY_POLICY
    );
    assert_eq!(response.headers()["x-content-type-options"], "nosniff");
    assert_eq!(response.headers()["referrer-policy"], "no-referrer");
    assert_eq!(response.headers()["cache-control"], "no-store");
    let page = response.text().await.expect("html");
    assert!(
        page.contains("ACME_WEBHOOKS_ADMIN__TOKEN") && page.contains("admin.token"),
        "{page}"
    );
    for path in ["/console/events", "/console/api/overview"] {
        let status = client.get(app.url(path)).send().await.expect("x").status();
        assert_eq!(status, 404, "{path}");
    }
    let status = client
        .post(app.url("/console/session"))
        .form(&[("token", "anything-at-all")])
        .send()
        .await
        .expect("x")
        .status();
    assert_eq!(status, 404);
    // The assets ship in the binary and need no session.
    let script = client
        .get(app.url("/console/assets/console.js"))
        .send()
        .await
        .expect("x");
    assert_eq!(script.status(), 200);
    assert!(
        script.headers()["content-type"]
            .to_str()
            .expect("ascii")
            .starts_with("text/javascript")
    );
}

async fn admin_get(app: &TestApp, path: &str) -> Value {
    let response = app
        .client
        .get(app.url(path))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("admin request");
    assert_eq!(response.status(), 200, "{path}");
    response.json().await.expect("json")
}

/// `GET /api/admin/overview`: counts and rates over the window, every partition with its owner,
/// readiness, and one entry per shipped alert rule, in the rules file's order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_overview_has_counts_rates_partitions_readiness_and_every_alert_rule() {
    let database = fresh_database().await;
    let mut config = test_config(&database);
    config.kafka.brokers = Some(kafka_brokers());
    config.admin.token = Some(Secret::new(TOKEN));
    let app = TestApp::start(config, Roles::ALL).await.owning(database);
    let unauthorized = app
        .client
        .get(app.url("/api/admin/overview"))
        .send()
        .await
        .expect("x");
    assert_eq!(unauthorized.status(), 401);
    for i in 0..10 {
        let event = contact_event(
            "contact.created",
            &format!("e{i}"),
            &format!("c{i}"),
            "2025-05-19T10:00:00Z",
        );
        assert_eq!(app.post_signed_json(&event).await.status(), 200);
    }
    app.wait_for_count(
        "SELECT COUNT(*) FROM webhook_events WHERE status = 'processed'",
        10,
        DRAIN,
    )
    .await;
    let deadline = std::time::Instant::now() + DRAIN;
    let overview = loop {
        let overview = admin_get(&app, "/api/admin/overview").await;
        if overview["processed"] == 10 && overview["received"] == 10 && overview["unprocessed"] == 0
        {
            break overview;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the overview never counted the 10 events: {overview}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let rates = overview["rates"].as_array().expect("rates");
    assert!(!rates.is_empty());
    let summed: u64 = rates
        .iter()
        .map(|p| p["published"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(summed, 10, "{overview}");
    let partitions = overview["partitions"].as_array().expect("partitions");
    assert_eq!(partitions.len(), 6, "{overview}");
    assert!(
        partitions
            .iter()
            .all(|p| p["owned"] == true && p["owner"].is_string()),
        "{overview}"
    );
    assert_eq!(overview["readiness"]["ready"], true, "{overview}");
    assert_eq!(
        overview["consumerGroup"],
        json!({"name": "consumer group", "up": true}),
        "{overview}"
    );

    let rules: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/prometheus/acme-webhooks.rules.yml"
        ))
        .expect("rules file"),
    )
    .expect("yaml");
    let shipped: Vec<(String, String)> = rules["groups"][0]["rules"]
        .as_sequence()
        .expect("rules")
        .iter()
        .map(|r| {
            (
                r["alert"].as_str().unwrap_or_default().to_owned(),
                r["labels"]["severity"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect();
    let listed: Vec<(String, String)> = overview["alerts"]
        .as_array()
        .expect("alerts")
        .iter()
        .map(|a| {
            (
                a["name"].as_str().unwrap_or_default().to_owned(),
                a["severity"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(listed, shipped, "one entry per shipped rule, same severity");
    assert!(
        overview["alerts"]
            .as_array()
            .expect("alerts")
            .iter()
            .all(|a| a["firing"] == false),
        "a healthy pipeline fires nothing: {overview}"
    );
}

/// The list's `eventId` and `contactId` filters, an event's timeline and headers, and the bulk
/// retry's dry run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_filters_by_event_and_contact_shows_a_timeline_and_counts_a_retry() {
    let database = fresh_database().await;
    let mut config = test_config(&database);
    config.kafka.brokers = Some(kafka_brokers());
    config.admin.token = Some(Secret::new(TOKEN));
    let app = TestApp::start(config.clone(), Roles::ALL)
        .await
        .owning(database);
    app.db
        .execute_unprepared(NO_POISON)
        .await
        .expect("constraint");
    for (event_id, contact_id) in [("a1", "ca"), ("a2", "ca"), ("b1", "cb")] {
        let event = contact_event(
            "contact.updated",
            event_id,
            contact_id,
            &format!("2025-05-19T10:00:0{}Z", &event_id[1..]),
        );
        assert_eq!(app.post_signed_json(&event).await.status(), 200);
    }
    assert_eq!(
        app.post_signed_json(&poison("p1", "cp")).await.status(),
        200
    );
    app.wait_for_count(
        "SELECT COUNT(*) FROM webhook_events WHERE status <> 'pending'",
        4,
        DRAIN,
    )
    .await;

    let ids = |page: &Value| -> Vec<String> {
        page["events"]
            .as_array()
            .expect("events")
            .iter()
            .map(|e| e["eventId"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    assert_eq!(
        ids(&admin_get(&app, "/api/admin/events?contactId=ca").await),
        ["a2", "a1"]
    );
    assert_eq!(
        ids(&admin_get(&app, "/api/admin/events?eventId=b1").await),
        ["b1"]
    );
    assert_eq!(
        ids(&admin_get(&app, "/api/admin/events?eventId=b1&contactId=ca").await),
        Vec::<String>::new()
    );

    let detail = admin_get(&app, "/api/admin/events/a1").await;
    let steps: Vec<&str> = detail["timeline"]
        .as_array()
        .expect("timeline")
        .iter()
        .map(|s| s["step"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(steps, ["received", "published", "processed"], "{detail}");
    assert_eq!(
        detail["timeline"][1]["topic"],
        config.kafka.topic_for("contact.updated")
    );
    assert_eq!(detail["outbox"][0]["headers"]["event-id"], "a1", "{detail}");

    let deadline = std::time::Instant::now() + DRAIN;
    let overview = loop {
        let overview = admin_get(&app, "/api/admin/overview").await;
        if overview["failed"] == 1 {
            break overview;
        }
        assert!(std::time::Instant::now() < deadline, "{overview}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(overview["failedRecently"], 1);
    assert_eq!(overview["recentFailures"][0]["eventId"], "p1", "{overview}");
    let firing: Vec<&str> = overview["alerts"]
        .as_array()
        .expect("alerts")
        .iter()
        .filter(|a| a["firing"] == true)
        .filter_map(|a| a["name"].as_str())
        .collect();
    assert_eq!(firing, ["AcmeWebhooksDeadLettersGrowing"], "{overview}");

    let failed = admin_get(&app, "/api/admin/events/p1").await;
    let last = failed["timeline"]
        .as_array()
        .expect("timeline")
        .last()
        .cloned()
        .unwrap_or_default();
    assert_eq!(last["step"], "failed");
    assert!(
        last["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("no_poison")
    );

    let retry = |body: Value| {
        app.client
            .post(app.url("/api/admin/events/retry"))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
    };
    let dry: Value = retry(json!({"contactId": "cp", "dryRun": true}))
        .await
        .expect("x")
        .json()
        .await
        .expect("json");
    assert_eq!(dry, json!({"requeued": 0, "matched": 1}));
    let other: Value = retry(json!({"contactId": "ca", "dryRun": true}))
        .await
        .expect("x")
        .json()
        .await
        .expect("json");
    assert_eq!(other["matched"], 0);
    assert_eq!(
        app.count("SELECT COUNT(*) FROM webhook_events WHERE status = 'failed'")
            .await,
        1,
        "a dry run changes nothing"
    );
    app.db.execute_unprepared(POISON_FIXED).await.expect("fix");
    let done: Value = retry(json!({"contactId": "cp"}))
        .await
        .expect("x")
        .json()
        .await
        .expect("json");
    assert_eq!(done, json!({"requeued": 1, "matched": 1}));
    app.wait_for_count(
        "SELECT COUNT(*) FROM webhook_events WHERE status = 'processed'",
        4,
        DRAIN,
    )
    .await;
    let retried = admin_get(&app, "/api/admin/events/p1").await;
    let steps: Vec<&str> = retried["timeline"]
        .as_array()
        .expect("timeline")
        .iter()
        .map(|s| s["step"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        steps,
        [
            "received",
            "published",
            "requeued",
            "published",
            "processed"
        ],
        "{retried}"
    );
}

/// The events page's filters, as its form sends them, and what it says about a bad one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_events_page_filters_by_type_and_time_and_names_a_bad_filter() {
    let database = fresh_database().await;
    let mut config = test_config(&database);
    config.admin.token = Some(Secret::new(TOKEN));
    let app = TestApp::start(config, Roles::HTTP).await.owning(database);
    let created = contact_event("contact.created", "evt-c", "c1", "2025-05-19T10:00:00Z");
    let updated = contact_event("contact.updated", "evt-u", "c1", "2025-05-19T10:00:01Z");
    assert_eq!(app.post_signed_json(&created).await.status(), 200);
    assert_eq!(app.post_signed_json(&updated).await.status(), 200);
    let (cookie, _) = sign_in_http(&app).await;
    let page = |query: &'static str| {
        let request = app
            .client
            .get(app.url(&format!("/console/events?{query}")))
            .header("Cookie", &cookie);
        async move {
            let response = request.send().await.expect("events page");
            assert_eq!(response.status(), 200, "{query}");
            response.text().await.expect("html")
        }
    };
    let listed = |html: &str| -> Vec<String> {
        html.split("<tr data-event-id=\"")
            .skip(1)
            .filter_map(|rest| rest.split('"').next())
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(listed(&page("").await), ["evt-u", "evt-c"]);
    assert_eq!(listed(&page("type=contact.created").await), ["evt-c"]);
    assert_eq!(
        listed(&page("range=15m&status=pending").await),
        ["evt-u", "evt-c"]
    );
    assert_eq!(
        listed(&page("until=2000-01-01T00:00:00Z").await),
        Vec::<String>::new()
    );
    assert_eq!(listed(&page("contactId=c1&eventId=evt-u").await), ["evt-u"]);
    for (query, problem) in [
        ("since=yesterday", "since: not an RFC 3339 time"),
        ("status=lost", "status: pending, processed or failed"),
        ("range=1y", "range: 15m, 1h, 24h or 7d"),
        ("cursor=abc", "cursor: not a cursor"),
    ] {
        let html = page(query).await;
        assert!(html.contains(problem), "{query}: {html}");
        assert!(listed(&html).is_empty());
    }
}
