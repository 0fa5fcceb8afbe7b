//! `loadgen` (bench/loadgen) against a running service: what it reports is what the database holds.
use api::Roles;
use loadgen::{LoadgenArgs, LoadgenReport};

use crate::support::{SECRET, TestApp, fresh_database, test_config};

fn temp_path(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("acme-loadgen-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_loop_run_reports_what_the_database_holds() {
    let database_url = fresh_database().await;
    // Every role, no broker: the in-process bus carries the events to the consumer.
    let mut app = TestApp::start(test_config(&database_url), Roles::ALL).await;
    let json = temp_path("report.json");
    let svg = temp_path("latency.svg");
    let url = app.url("/api/webhooks");
    let args = LoadgenArgs::from_args([
        "--url",
        url.as_str(),
        "--secret",
        SECRET,
        "--rate",
        "200",
        "--duration",
        "1.5",
        "--contacts",
        "50",
        "--duplicate-share",
        "0.15",
        "--invalid-share",
        "0.1",
        "--database-url",
        database_url.url(),
        "--json",
        json.to_str().expect("utf-8 path"),
        "--plot",
        svg.to_str().expect("utf-8 path"),
        "--quiet",
        "--seed",
        "7",
    ])
    .expect("the documented options parse");

    let report = loadgen::run(args).await.expect("the load run succeeds");
    println!("{}", report.summary());

    assert_eq!(report.mode, "open");
    assert_eq!(report.target_rate, Some(200.0));
    assert!(report.sent >= 250, "about 300 requests due: {report:?}");
    assert_eq!(report.completed, report.sent, "every request answered");
    assert_eq!(report.status_counts.get("error"), None);

    // What the service stored is exactly what it acknowledged as accepted.
    let rows = app.count("SELECT COUNT(*) FROM webhook_events").await;
    assert_eq!(
        i64::try_from(report.outcomes.accepted).expect("small"),
        rows
    );

    // Badly signed requests are refused, and only those.
    assert!(report.invalid_sent > 0);
    assert_eq!(report.status_counts.get("401"), Some(&report.invalid_sent));
    // Re-sent events are acknowledged as duplicates and stored nothing.
    assert!(report.outcomes.duplicate > 0);
    assert_eq!(report.outcomes.duplicate, report.duplicates_sent);
    assert_eq!(
        report.outcomes.accepted,
        report.sent - report.invalid_sent - report.duplicates_sent
    );
    assert_eq!(
        report.status_counts.get("200"),
        Some(&(report.outcomes.accepted + report.outcomes.duplicate))
    );

    // Every accepted event was processed and timed end to end.
    assert_eq!(report.e2e_missing, Some(0));
    let e2e = report
        .e2e_latency_ms
        .as_ref()
        .expect("end-to-end latencies");
    assert_eq!(e2e.count, report.outcomes.accepted);
    assert!(e2e.p50 <= e2e.p99 && e2e.p99 <= e2e.max);
    assert_eq!(
        app.count("SELECT COUNT(*) FROM webhook_events WHERE status = 'processed'")
            .await,
        rows
    );
    assert_eq!(report.ack_latency_ms.count, report.sent);

    let written: LoadgenReport =
        serde_json::from_slice(&std::fs::read(&json).expect("the JSON report was written"))
            .expect("the JSON report parses");
    // Counts compare exactly; floats only approximately (JSON does not round-trip every f64).
    assert_eq!(written.sent, report.sent);
    assert_eq!(written.status_counts, report.status_counts);
    assert_eq!(written.outcomes, report.outcomes);
    assert_eq!(written.e2e_missing, report.e2e_missing);
    assert!((written.ack_latency_ms.p99 - report.ack_latency_ms.p99).abs() < 1e-6);
    let raw: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("JSON")).expect("JSON");
    for field in [
        "mode",
        "target_rate",
        "connections",
        "duration_s",
        "sent",
        "achieved_rate",
        "status_counts",
        "outcomes",
        "ack_latency_ms",
        "e2e_latency_ms",
        "e2e_missing",
    ] {
        assert!(raw.get(field).is_some(), "{field} is in the JSON report");
    }
    let plot = std::fs::read_to_string(&svg).expect("the plot was written");
    assert!(
        plot.starts_with("<svg") || plot.starts_with("<?xml"),
        "{}",
        &plot[..plot.len().min(200)]
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_loop_run_without_database_reports_acks_only() {
    let app = TestApp::http_only().await;
    let url = app.url("/api/webhooks");
    let args = LoadgenArgs::from_args([
        "--url",
        url.as_str(),
        "--secret",
        SECRET,
        "--connections",
        "4",
        "--duration",
        "0.5",
        "--warmup",
        "0.2",
        "--quiet",
    ])
    .expect("the documented options parse");

    let report = loadgen::run(args).await.expect("the load run succeeds");

    assert_eq!(report.mode, "closed");
    assert_eq!(report.target_rate, None);
    assert_eq!(report.connections, 4);
    assert!(report.sent > 0);
    assert_eq!(report.status_counts.get("200"), Some(&report.sent));
    assert_eq!(report.outcomes.accepted, report.sent);
    assert!(report.achieved_rate > 0.0);
    assert_eq!(report.e2e_latency_ms, None);
    assert_eq!(report.e2e_missing, None);
    // Warm-up events are stored too, but not counted in the report.
    let rows = app.count("SELECT COUNT(*) FROM webhook_events").await;
    assert!(rows > i64::try_from(report.outcomes.accepted).expect("small"));
}
