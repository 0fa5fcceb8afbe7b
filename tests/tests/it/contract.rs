//! The OpenAPI contract: `openapi.yaml` (which the drift test keeps equal to the code) describes
//! what the service really answers and accepts.
use std::path::PathBuf;
use std::time::{Duration, Instant};

use api::Roles;
use api::config::Secret;
use serde_json::{Map, Value, json};

use crate::support::*;

const ADMIN_TOKEN: &str = "contract-admin-token";

fn repository_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// `openapi.yaml` as JSON, with OpenAPI 3.0's `nullable: true` spelled the JSON Schema way
/// (`anyOf: [the schema, {type: null}]`), so a JSON Schema validator reads it as OpenAPI does.
fn spec_as_json_schema() -> Value {
    let text =
        std::fs::read_to_string(repository_root().join("openapi.yaml")).expect("openapi.yaml");
    let spec: Value = serde_yaml::from_str(&text).expect("openapi.yaml is YAML");
    fn convert(value: Value) -> Value {
        match value {
            Value::Object(object) => {
                let mut object: Map<String, Value> =
                    object.into_iter().map(|(k, v)| (k, convert(v))).collect();
                if object.remove("nullable") == Some(Value::Bool(true)) {
                    json!({ "anyOf": [Value::Object(object), { "type": "null" }] })
                } else {
                    Value::Object(object)
                }
            }
            Value::Array(items) => Value::Array(items.into_iter().map(convert).collect()),
            other => other,
        }
    }
    convert(spec)
}

/// A validator of the component schema `name` of `openapi.yaml` (formats checked too).
fn component_validator(name: &str) -> jsonschema::Validator {
    let spec = spec_as_json_schema();
    let schema = json!({
        "$ref": format!("#/components/schemas/{name}"),
        "components": spec["components"],
    });
    jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .unwrap_or_else(|e| panic!("the {name} schema compiles: {e}"))
}

fn assert_matches_schema(name: &str, value: &Value) {
    let validator = component_validator(name);
    let errors: Vec<String> = validator
        .iter_errors(value)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "this answer does not match the spec's {name} schema: {errors:#?}\n{value:#}"
    );
}

async fn get_json(app: &TestApp, path: &str) -> Value {
    let response = app
        .client
        .get(app.url(path))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("request sent");
    assert_eq!(response.status(), 200, "GET {path}");
    response.json().await.expect("a JSON body")
}

/// Every role over Kafka, with the admin API.
async fn full_app() -> TestApp {
    let database = fresh_database().await;
    let mut config = test_config(&database);
    config.kafka.brokers = Some(kafka_brokers());
    config.admin.token = Some(Secret::new(ADMIN_TOKEN));
    TestApp::start(config, Roles::ALL).await.owning(database)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_with_null_fields_match_the_spec() {
    let app = full_app().await;
    let at = "2025-05-19T00:00:00Z";
    for body in [
        contact_event("contact.created", "evt_keep", "c_keep", at),
        contact_event("contact.created", "evt_gone", "c_gone", at),
        delete_event("evt_delete", "c_gone", "2025-05-20T00:00:00Z"),
    ] {
        assert_eq!(app.post_signed_json(&body).await.status(), 200);
    }
    app.wait_for_count(
        "SELECT COUNT(*) FROM webhook_events WHERE status = 'processed'",
        3,
        Duration::from_secs(60),
    )
    .await;

    // A contact never deleted has `deletedAt: null`; a deleted one has null personal fields.
    let kept = get_json(&app, "/api/contacts/c_keep").await;
    assert!(kept["deletedAt"].is_null(), "{kept}");
    assert_matches_schema("ContactView", &kept);
    let gone = get_json(&app, "/api/contacts/c_gone").await;
    assert!(gone["email"].is_null() && gone["title"].is_null(), "{gone}");
    assert_matches_schema("ContactView", &gone);

    // The first page has a cursor, the last one `nextCursor: null`; no event has an `error`.
    let first = get_json(&app, "/api/admin/events?limit=2").await;
    assert!(first["nextCursor"].is_string(), "{first}");
    assert!(first["events"][0]["error"].is_null(), "{first}");
    assert_matches_schema("EventPage", &first);
    let cursor = first["nextCursor"].as_str().expect("a cursor");
    let last = get_json(&app, &format!("/api/admin/events?limit=2&cursor={cursor}")).await;
    assert!(last["nextCursor"].is_null(), "{last}");
    assert_matches_schema("EventPage", &last);

    // A published outbox row has no `lastError`.
    let detail = get_json(&app, "/api/admin/events/evt_keep").await;
    assert!(detail["error"].is_null(), "{detail}");
    assert!(detail["outbox"][0]["lastError"].is_null(), "{detail}");
    assert_matches_schema("EventDetail", &detail);

    assert_matches_schema("OutboxSummary", &get_json(&app, "/api/admin/outbox").await);
    assert_matches_schema("Readiness", &get_json(&app, "/readyz").await);
}

/// A valid `contact.created` body with `change` applied to it.
fn created(change: impl FnOnce(&mut Value)) -> Value {
    let mut body = contact_event("contact.created", "evt_1", "c1", "2025-05-19T00:00:00Z");
    change(&mut body);
    body
}

fn deleted(data: Value) -> Value {
    json!({ "event": "contact.deleted", "timestamp": "2025-05-19T00:00:00Z", "id": "evt_1", "data": data })
}

/// What the spec's `ContactEvent` schema and the service's validator say of `body`.
fn verdicts(schema: &jsonschema::Validator, body: &Value) -> (bool, bool) {
    let service = api::validation::validate_event(body.to_string().as_bytes()).is_ok();
    (schema.is_valid(body), service)
}

#[test]
fn the_spec_and_the_validator_agree_on_webhook_bodies() {
    let schema = component_validator("ContactEvent");
    let valid = [
        ("created", created(|_| {})),
        (
            "updated",
            created(|b| b["event"] = json!("contact.updated")),
        ),
        (
            "optional fields null",
            created(|b| {
                b["data"]["title"] = Value::Null;
                b["data"]["phone"] = Value::Null;
                b["data"]["company"] = Value::Null;
            }),
        ),
        (
            "unknown fields",
            created(|b| {
                b["data"]["favouriteColour"] = json!({ "name": "teal", "rgb": [0, 128, 128] });
                b["source"] = json!("import");
            }),
        ),
        (
            "id of 255 bytes",
            created(|b| b["id"] = json!("e".repeat(255))),
        ),
        ("deleted with only the id", deleted(json!({ "id": "c1" }))),
        (
            "deleted with updatedAt null",
            deleted(json!({ "id": "c1", "updatedAt": null })),
        ),
        (
            "deleted with other fields unchecked",
            deleted(json!({ "id": "c1", "firstName": 42, "email": "nope" })),
        ),
    ];
    let invalid = [
        (
            "created without firstName",
            created(|b| {
                b["data"].as_object_mut().map(|d| d.remove("firstName"));
            }),
        ),
        (
            "created with title a number",
            created(|b| b["data"]["title"] = json!(5)),
        ),
        (
            "created with createdAt null",
            created(|b| b["data"]["createdAt"] = Value::Null),
        ),
        (
            "blank firstName",
            created(|b| b["data"]["firstName"] = json!(" \t")),
        ),
        (
            "firstName of Unicode spaces",
            created(|b| b["data"]["firstName"] = json!("\u{3000}\u{85}\u{a0}")),
        ),
        (
            "NUL in lastName",
            created(|b| b["data"]["lastName"] = json!("Sm\u{0}ith")),
        ),
        (
            "NUL in the event id",
            created(|b| b["id"] = json!("evt\u{0}1")),
        ),
        ("empty event id", created(|b| b["id"] = json!(""))),
        (
            "event id of 256 bytes",
            created(|b| b["id"] = json!("e".repeat(256))),
        ),
        (
            "email without @",
            created(|b| b["data"]["email"] = json!("not-an-email")),
        ),
        (
            "email without a dot",
            created(|b| b["data"]["email"] = json!("a@example")),
        ),
        (
            "email with a space",
            created(|b| b["data"]["email"] = json!("a b@example.com")),
        ),
        (
            "email with an empty label",
            created(|b| b["data"]["email"] = json!("a@example..com")),
        ),
        (
            "email with two @",
            created(|b| b["data"]["email"] = json!("a@b@example.com")),
        ),
        (
            "unknown event",
            created(|b| b["event"] = json!("contact.merged")),
        ),
        (
            "no event",
            created(|b| {
                b.as_object_mut().map(|o| o.remove("event"));
            }),
        ),
        (
            "timestamp not a date",
            created(|b| b["timestamp"] = json!("yesterday")),
        ),
        ("data a string", created(|b| b["data"] = json!("c1"))),
        (
            "deleted without data.id",
            deleted(json!({ "updatedAt": null })),
        ),
        (
            "deleted with an unreadable updatedAt",
            deleted(json!({ "id": "c1", "updatedAt": "never" })),
        ),
        ("not an object", json!([1, 2])),
    ];
    let mut disagreements = Vec::new();
    for (expected, cases) in [(true, &valid[..]), (false, &invalid[..])] {
        for (name, body) in cases {
            let (spec, service) = verdicts(&schema, body);
            if (spec, service) != (expected, expected) {
                disagreements.push(format!(
                    "{name}: spec valid = {spec}, service valid = {service}, expected {expected}"
                ));
            }
        }
    }
    assert!(disagreements.is_empty(), "{disagreements:#?}");

    // What the receiveWebhook description says the schema cannot express, and nothing else.
    let beyond_the_schema = [
        (
            "id over 255 bytes but not characters",
            created(|b| b["id"] = json!("é".repeat(200))),
        ),
        (
            "NUL in an unknown field",
            created(|b| b["data"]["note"] = json!("a\u{0}b")),
        ),
        (
            "NUL in an unknown key",
            created(|b| b["data"]["a\u{0}b"] = json!(1)),
        ),
    ];
    for (name, body) in beyond_the_schema {
        assert_eq!(
            verdicts(&schema, &body),
            (true, false),
            "{name}: the spec accepts it, the service refuses it"
        );
    }
    let more_than_the_schema = [
        (
            "a space for `T` in a date-time",
            created(|b| b["data"]["updatedAt"] = json!("2025-05-19 00:00:00Z")),
        ),
        (
            "a non-ASCII email domain",
            created(|b| b["data"]["email"] = json!("ü@bücher.de")),
        ),
        (
            "an email local part beyond RFC 5321's dot-atom",
            created(|b| b["data"]["email"] = json!("a..b@example.com")),
        ),
    ];
    for (name, body) in more_than_the_schema {
        assert_eq!(
            verdicts(&schema, &body),
            (false, true),
            "{name}: the service accepts it, the spec does not"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_405_names_the_allowed_methods_and_list_parameters_keep_to_the_spec() {
    let database = fresh_database().await;
    let mut config = test_config(&database);
    config.admin.token = Some(Secret::new(ADMIN_TOKEN));
    let app = TestApp::start(config, Roles::HTTP).await;
    let trace = reqwest::Method::from_bytes(b"TRACE").expect("a method");
    for (method, path, allow) in [
        (trace.clone(), "/api/webhooks", "POST"),
        (trace, "/readyz", "GET, HEAD"),
        (reqwest::Method::DELETE, "/api/contacts/c1", "GET, HEAD"),
        (
            reqwest::Method::PUT,
            "/api/admin/events/evt_1/retry",
            "POST",
        ),
        // A literal segment wins over `{event_id}`, as in the router.
        (reqwest::Method::GET, "/api/admin/events/retry", "POST"),
    ] {
        let response = app
            .client
            .request(method.clone(), app.url(path))
            .send()
            .await
            .expect("request sent");
        assert_eq!(response.status(), 405, "{method} {path}");
        assert_eq!(
            response
                .headers()
                .get("allow")
                .and_then(|v| v.to_str().ok()),
            Some(allow),
            "{method} {path}"
        );
        let body: Value = response.json().await.expect("our error shape");
        assert_eq!(body["code"], "method_not_allowed", "{method} {path}");
    }

    // `limit` is 1 to 500 and `cursor` an integer, as the spec says; anything else is 400.
    for query in ["limit=0", "limit=501", "cursor=abc", "cursor=1.5"] {
        let response = app
            .client
            .get(app.url(&format!("/api/admin/events?{query}")))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("request sent");
        assert_eq!(response.status(), 400, "{query}");
    }
    for query in ["limit=1", "limit=500", "cursor=-5"] {
        let page = get_json(&app, &format!("/api/admin/events?{query}")).await;
        assert_matches_schema("EventPage", &page);
    }
}

/// Schemathesis (scripts/contract) against the real service on PostgreSQL and Kafka: every
/// operation, `--checks all`, coverage and fuzzing phases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_the_service_true_to_openapi_yaml() {
    let app = full_app().await;
    let started = Instant::now();
    let output = tokio::time::timeout(
        Duration::from_secs(600),
        tokio::process::Command::new(repository_root().join("scripts/contract"))
            .args(["--url", &app.url(""), "--secret", SECRET])
            .args(["--admin-token", ADMIN_TOKEN])
            .env(
                "ACME_CONTRACT_MAX_EXAMPLES",
                std::env::var("ACME_CONTRACT_MAX_EXAMPLES").unwrap_or_else(|_| "50".into()),
            )
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("scripts/contract finished within 600 s")
    .expect("scripts/contract runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let summary = stdout
        .find("SUMMARY")
        .map_or(stdout.as_ref(), |at| &stdout[at..]);
    eprintln!(
        "scripts/contract took {:.1} s\n{summary}",
        started.elapsed().as_secs_f64()
    );
    assert!(
        output.status.success(),
        "Schemathesis found the service and openapi.yaml apart:\n{stdout}\n{stderr}"
    );
    // Both phases ran, on every operation of the spec.
    let spec = std::fs::read_to_string(repository_root().join("openapi.yaml")).expect("the spec");
    let operations = spec.matches("operationId:").count();
    for line in [
        "✅ Coverage".to_owned(),
        "✅ Fuzzing".to_owned(),
        format!("Selected: {operations}/{operations}"),
        format!("Tested: {operations}"),
    ] {
        assert!(stdout.contains(&line), "`{line}` missing from:\n{stdout}");
    }
}
