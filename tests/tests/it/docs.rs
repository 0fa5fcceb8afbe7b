//! The Swagger UI, rendered by a real browser: what a developer reading `/docs` sees.
use std::path::PathBuf;
use std::time::Duration;

use api::Roles;
use api::config::Secret;
use tokio::process::Command;

use crate::support::*;

/// The Chromium binary: `ACME_TEST_CHROMIUM` (scripts/test sets it, installing Debian's
/// `chromium` when missing), else `chromium` on the PATH.
fn chromium() -> String {
    std::env::var("ACME_TEST_CHROMIUM").unwrap_or_else(|_| "chromium".into())
}

/// Runs headless Chromium on `url` with `extra` arguments and returns its stdout. The flags keep
/// it off the network (this machine has none) and away from any existing profile.
async fn headless_chromium(url: &str, extra: &[String]) -> String {
    let profile = tempfile_dir("chromium-profile");
    let output = tokio::time::timeout(
        Duration::from_secs(90),
        Command::new(chromium())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                "--disable-dev-shm-usage",
                // Let the page's scripts run (Swagger UI renders client-side) before dumping.
                "--virtual-time-budget=15000",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(extra)
            .arg(url)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("chromium finished within 90 s")
    .unwrap_or_else(|e| panic!("cannot run {} ({e}); scripts/test installs it", chromium()));
    let _ = std::fs::remove_dir_all(&profile);
    assert!(
        output.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A fresh directory under the test output (`target/tmp`).
fn tempfile_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(unique(name));
    std::fs::create_dir_all(&dir).expect("create a test directory");
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_swagger_ui_renders_the_webhook_and_admin_operations_in_a_browser() {
    let database = fresh_database().await;
    let mut config = test_config(&database);
    config.admin.token = Some(Secret::new("admin-token-123"));
    let app = TestApp::start(config, Roles::HTTP).await;
    let url = app.url("/docs");

    let dom = headless_chromium(&url, &["--dump-dom".to_owned()]).await;
    // Rendered operations are `opblock` elements holding the path; the raw page has none.
    assert!(
        dom.contains("opblock"),
        "Swagger UI did not render any operation:\n{dom:.2000}"
    );
    for path in [
        "/api/webhooks",
        "/api/contacts/{id}",
        "/api/admin/events",
        "/api/admin/events/{event_id}",
        "/api/admin/outbox",
    ] {
        assert!(
            dom.contains(&format!("data-path=\"{path}\"")),
            "the rendered docs do not list {path}"
        );
    }

    let screenshot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("docs-swagger-ui.png");
    let _ = std::fs::remove_file(&screenshot);
    headless_chromium(
        &url,
        &[
            format!("--screenshot={}", screenshot.display()),
            "--window-size=1280,2000".to_owned(),
        ],
    )
    .await;
    let png = std::fs::read(&screenshot).expect("the screenshot was written");
    assert!(png.starts_with(b"\x89PNG"), "the screenshot is a PNG");
    assert!(
        png.len() > 20_000,
        "the screenshot is not blank ({} bytes)",
        png.len()
    );
    eprintln!("screenshot: {}", screenshot.display());
}
