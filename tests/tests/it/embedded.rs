//! The zero-configuration mode: SQLite file + in-process bus, as `cargo run --release` starts it.
use std::time::{Duration, Instant};

use api::config::Config;
use api::{Roles, Service, dev};

use crate::support::count;

fn embedded_config(data_dir: &std::path::Path) -> Config {
    let mut config = Config::defaults();
    config.database.data_dir = data_dir.to_owned();
    config.relay.poll_interval_ms = 100;
    config
}

async fn start(config: &Config) -> Service {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    Service::start(config.clone(), Roles::ALL, Some(listener))
        .await
        .expect("embedded mode starts")
}

/// The curl command of the banner, as a user would paste it into a shell.
fn curl_of(banner: &str) -> String {
    let start = banner.find("curl ").expect("the banner has a curl command");
    banner[start..].trim_end().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_printed_curl_gets_200_and_the_event_is_processed() {
    let data_dir = tempdir();
    let config = embedded_config(&data_dir);
    assert!(config.is_embedded_database());
    let service = start(&config).await;
    let addr = service.http_addr.expect("listening");
    let banner = dev::banner(&config, addr, &service.secrets, true);
    assert!(banner.contains(&format!("http://{addr}/docs")), "{banner}");
    assert!(
        banner.contains(service.secrets[0].expose()),
        "the banner prints the dev secret"
    );

    let output = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!("{} -w '\\n%{{http_code}}'", curl_of(&banner)))
        .output()
        .expect("bash runs curl");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let (body, status) = stdout.trim().rsplit_once('\n').expect("body and status");
    assert_eq!(status, "200", "{stdout}");
    let ack: serde_json::Value = serde_json::from_str(body).expect("JSON ack");
    assert_eq!(ack["status"], "accepted");

    // The in-process bus carries it through the same relay and consumer code.
    let deadline = Instant::now() + Duration::from_secs(10);
    while count(
        &service.db,
        "SELECT COUNT(*) FROM webhook_events WHERE status = 'processed'",
    )
    .await
        != 1
    {
        assert!(Instant::now() < deadline, "the event was not processed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(count(&service.db, "SELECT COUNT(*) FROM contacts").await, 1);
    let secret = service.secrets[0].clone();
    service.stop().await;

    // The generated secret survives a restart of the same data directory.
    let service = start(&config).await;
    assert_eq!(service.secrets, vec![secret]);
    service.stop().await;
}

fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("acme-embedded-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// The console in embedded mode: the banner names it (off without a token, saying how to turn it
/// on), and with a token it signs in and shows the overview of the SQLite store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_is_served_in_embedded_mode_and_the_banner_names_it() {
    let data_dir = tempdir();
    let mut config = embedded_config(&data_dir);
    let service = start(&config).await;
    let addr = service.http_addr.expect("listening");
    let banner = dev::banner(&config, addr, &service.secrets, true);
    assert!(
        banner.contains(&format!("http://{addr}/console"))
            && banner.contains("ACME_WEBHOOKS_ADMIN__TOKEN"),
        "{banner}"
    );
    let off = reqwest::get(format!("http://{addr}/console"))
        .await
        .expect("console");
    assert_eq!(off.status(), 404);
    service.stop().await;

    config.admin.token = Some(api::config::Secret::new("embedded-admin-token"));
    let service = start(&config).await;
    let addr = service.http_addr.expect("listening");
    let banner = dev::banner(&config, addr, &service.secrets, false);
    assert!(banner.contains("sign in with admin.token"), "{banner}");
    assert!(!banner.contains("embedded-admin-token"), "{banner}");
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let signed_in = client
        .post(format!("http://{addr}/console/session"))
        .form(&[("token", "embedded-admin-token")])
        .send()
        .await
        .expect("sign in");
    assert_eq!(signed_in.status(), 303);
    let cookie = signed_in.headers()["set-cookie"]
        .to_str()
        .expect("ascii")
        .split(';')
        .next()
        .expect("a cookie")
        .to_owned();
    let overview: serde_json::Value = client
        .get(format!("http://{addr}/console/api/overview"))
        .header("Cookie", cookie)
        .send()
        .await
        .expect("overview")
        .json()
        .await
        .expect("json");
    assert_eq!(overview["unprocessed"], 0, "{overview}");
    assert_eq!(overview["partitions"], serde_json::json!([]), "{overview}");
    assert_eq!(overview["readiness"]["ready"], true, "{overview}");
    service.stop().await;
}
