//! What the ops team runs: the alert rules pass `promtool` (syntax and unit tests), and a real
//! Prometheus scraping a running service loads them, sees the target up, evaluates every rule
//! without error, and finds every metric the rules and the Grafana dashboard use; each dashboard
//! query answers with data. Needs Debian's `prometheus` package (scripts/test installs it).
//! The alerts' runbook links point at headings that exist, and no link of the README or of
//! `docs/` leaves the repository or names a heading that is not there.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use api::Roles;
use promql_parser::parser::Expr;
use promql_parser::util::{ExprVisitor, walk_expr};
use serde_json::Value;

use crate::support::*;

const RULES: &str = "deploy/prometheus/acme-webhooks.rules.yml";
const RULE_TESTS: &str = "deploy/prometheus/acme-webhooks.rules.test.yml";
const DASHBOARD: &str = "deploy/grafana/acme-webhooks.json";
/// The scrape job name the rules expect (`up{job=~"acme-webhooks.*"}`).
const JOB: &str = "acme-webhooks";

fn repo_file(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

/// `$env` if set, else `name` on the PATH; a clear failure when neither exists.
fn tool(name: &str, env: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        return PathBuf::from(path);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{name}` is not installed: run the tests with scripts/test (it installs Debian's \
                 `prometheus` package), `apt-get install prometheus`, or set {env}"
            )
        })
}

/// Every metric name an expression selects (`absent(x)` and `rate(x[5m])` included).
fn metric_names(expr: &str) -> BTreeSet<String> {
    struct Names(BTreeSet<String>);
    impl ExprVisitor for Names {
        type Error = ();
        fn pre_visit(&mut self, expr: &Expr) -> Result<bool, ()> {
            let selector = match expr {
                Expr::VectorSelector(vs) => Some(vs),
                Expr::MatrixSelector(ms) => Some(&ms.vs),
                _ => None,
            };
            if let Some(name) = selector.and_then(|vs| vs.name.clone()) {
                self.0.insert(name);
            }
            Ok(true)
        }
    }
    let parsed = promql_parser::parser::parse(expr)
        .unwrap_or_else(|e| panic!("`{expr}` is not valid PromQL: {e}"));
    let mut names = Names(BTreeSet::new());
    let _ = walk_expr(&mut names, &parsed);
    names.0
}

/// (alert name, expression) of every rule in the rules file.
fn alert_rules() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo_file(RULES)).expect("rules file");
    let yaml: serde_yaml::Value = serde_yaml::from_str(&text).expect("rules YAML");
    let mut rules = Vec::new();
    for group in yaml["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            rules.push((
                rule["alert"].as_str().expect("an alerting rule").to_owned(),
                rule["expr"].as_str().expect("expr").to_owned(),
            ));
        }
    }
    rules
}

/// (panel title, expression) of every query of the dashboard, with Grafana's `$__rate_interval`
/// replaced by what it is at a 1 s scrape interval.
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo_file(DASHBOARD)).expect("dashboard file");
    let dashboard: Value = serde_json::from_str(&text).expect("dashboard JSON");
    let mut queries = Vec::new();
    let mut panels: Vec<&Value> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .collect();
    while let Some(panel) = panels.pop() {
        if let Some(nested) = panel["panels"].as_array() {
            panels.extend(nested);
        }
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("a Prometheus query");
            queries.push((
                panel["title"].as_str().unwrap_or_default().to_owned(),
                expr.replace("$__rate_interval", "30s"),
            ));
        }
    }
    queries
}

#[test]
fn the_alert_rules_pass_promtool_check_and_their_unit_tests() {
    let promtool = tool("promtool", "ACME_TEST_PROMTOOL");
    for args in [["check", "rules", RULES], ["test", "rules", RULE_TESTS]] {
        let output = std::process::Command::new(&promtool)
            .args(args)
            .current_dir(repo_file("."))
            .output()
            .expect("promtool runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.status.success(), "promtool {args:?} failed:\n{text}");
        assert!(text.contains("SUCCESS"), "promtool {args:?}:\n{text}");
    }
}

#[test]
fn the_dashboard_is_importable_json_whose_queries_parse() {
    let text = std::fs::read_to_string(repo_file(DASHBOARD)).expect("dashboard file");
    let dashboard: Value = serde_json::from_str(&text).expect("dashboard JSON");
    assert!(
        dashboard["id"].is_null(),
        "an importable dashboard has no id"
    );
    assert_eq!(dashboard["uid"], "acme-webhooks");
    // Every panel asks the data source chosen at import (the `datasource` variable).
    let variable = &dashboard["templating"]["list"][0];
    assert_eq!(
        (variable["name"].as_str(), variable["type"].as_str()),
        (Some("datasource"), Some("datasource"))
    );
    for panel in dashboard["panels"].as_array().expect("panels") {
        if panel["type"] != "row" {
            assert_eq!(panel["datasource"]["uid"], "${datasource}", "{panel}");
            assert!(panel["gridPos"]["w"].as_u64().is_some(), "{panel}");
        }
    }
    let queries = dashboard_queries();
    assert!(queries.len() >= 20, "{} queries", queries.len());
    for (_, expr) in &queries {
        metric_names(expr); // panics on invalid PromQL
    }
}

/// GitHub's anchor of a heading: lowercase; letters, digits, `-` and `_` kept, each space made a
/// `-`, everything else dropped (`AcmeWebhooksBatchFailing` -> `acmewebhooksbatchfailing`,
/// `Production: PostgreSQL + Kafka` -> `production-postgresql--kafka`).
fn heading_slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The anchors of a markdown file's headings (`#` to `######` outside fenced code); a repeated
/// heading gets `-1`, `-2`, ... as on GitHub.
fn markdown_anchors(path: &Path) -> BTreeSet<String> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut anchors = BTreeSet::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        let hashes = line.len() - line.trim_start_matches('#').len();
        if (1..=6).contains(&hashes) && line[hashes..].starts_with(' ') {
            let slug = heading_slug(&line[hashes..]);
            let count = seen.entry(slug.clone()).or_insert(0);
            anchors.insert(if *count == 0 {
                slug
            } else {
                format!("{slug}-{count}")
            });
            *count += 1;
        }
    }
    anchors
}

/// A markdown text without its fenced code blocks and inline code spans (a run of backticks up
/// to the next run of the same length), so that what remains `](` starts a link.
fn outside_code(text: &str) -> String {
    let mut prose = String::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced {
            prose.push_str(line);
        }
        prose.push('\n');
    }
    let chars: Vec<char> = prose.chars().collect();
    let backticks = |from: usize| chars[from..].iter().take_while(|&&c| c == '`').count();
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] != '`' {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        let run = backticks(i);
        let mut j = i + run;
        let mut close = None;
        while j < chars.len() {
            if chars[j] == '`' {
                let other = backticks(j);
                if other == run {
                    close = Some(j + other);
                    break;
                }
                j += other;
            } else {
                j += 1;
            }
        }
        match close {
            Some(end) => i = end,
            None => {
                // An unclosed run is literal text.
                out.extend(&chars[i..i + run]);
                i += run;
            }
        }
    }
    out
}

/// The target of every inline link `[text](target "title")` of a markdown text: its first word,
/// without `<>`.
fn link_targets(text: &str) -> Vec<String> {
    let prose = outside_code(text);
    let mut targets = Vec::new();
    let mut rest = prose.as_str();
    while let Some(at) = rest.find("](") {
        rest = &rest[at + 2..];
        let inside = rest.find(')').map_or("", |end| &rest[..end]);
        let target = inside.split_whitespace().next().unwrap_or_default();
        targets.push(
            target
                .trim_matches(|c: char| c == '<' || c == '>')
                .to_owned(),
        );
    }
    targets
}

#[test]
fn every_runbook_link_of_the_alert_rules_points_at_an_existing_heading() {
    let text = std::fs::read_to_string(repo_file(RULES)).expect("rules file");
    let yaml: serde_yaml::Value = serde_yaml::from_str(&text).expect("rules YAML");
    let mut problems = Vec::new();
    let mut alerts = 0;
    for group in yaml["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = rule["alert"].as_str().expect("an alerting rule");
            alerts += 1;
            let Some(runbook) = rule["annotations"]["runbook"].as_str() else {
                problems.push(format!("{name}: no runbook annotation"));
                continue;
            };
            let Some((path, anchor)) = runbook.split_once('#') else {
                problems.push(format!(
                    "{name}: runbook `{runbook}` is not <path>#<anchor>"
                ));
                continue;
            };
            let file = repo_file(path);
            if !file.is_file() {
                problems.push(format!("{name}: runbook file {path} does not exist"));
            } else if !markdown_anchors(&file).contains(anchor) {
                problems.push(format!(
                    "{name}: {path} has no heading whose anchor is #{anchor}"
                ));
            }
        }
    }
    assert!(alerts >= 10, "{alerts} alerts in {RULES}");
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn no_markdown_link_leaves_the_repository() {
    let root = repo_file(".").canonicalize().expect("repository root");
    let mut documents = vec![root.join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/")
        .map(|entry| entry.expect("docs/ entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "md"))
        .collect();
    docs.sort();
    documents.extend(docs);
    let mut problems = Vec::new();
    let mut checked = 0;
    for document in &documents {
        let text = std::fs::read_to_string(document).expect("markdown file");
        let shown = document
            .strip_prefix(&root)
            .unwrap_or(document.as_path())
            .display()
            .to_string();
        for target in link_targets(&text) {
            if ["http://", "https://", "mailto:"]
                .iter()
                .any(|scheme| target.starts_with(scheme))
            {
                continue;
            }
            checked += 1;
            if target.is_empty() {
                problems.push(format!("{shown}: a link without a target"));
                continue;
            }
            let (path, anchor) = target.split_once('#').unwrap_or((target.as_str(), ""));
            let resolved = if path.is_empty() {
                document.clone()
            } else {
                match document
                    .parent()
                    .expect("a directory")
                    .join(path)
                    .canonicalize()
                {
                    Ok(resolved) => resolved,
                    Err(e) => {
                        problems.push(format!("{shown}: ({target}) does not exist: {e}"));
                        continue;
                    }
                }
            };
            if !resolved.starts_with(&root) {
                problems.push(format!(
                    "{shown}: ({target}) leaves the repository: {}",
                    resolved.display()
                ));
            } else if !anchor.is_empty()
                && resolved.extension().is_some_and(|ext| ext == "md")
                && !markdown_anchors(&resolved).contains(anchor)
            {
                problems.push(format!("{shown}: ({target}) names no heading of that file"));
            }
        }
    }
    assert!(checked >= 30, "only {checked} relative links found");
    assert!(problems.is_empty(), "{problems:#?}");
}

/// A Prometheus process of the test's own, killed when dropped.
struct Prometheus {
    child: tokio::process::Child,
    port: u16,
    dir: PathBuf,
    client: reqwest::Client,
}

impl Prometheus {
    async fn start(target: std::net::SocketAddr) -> Self {
        let binary = tool("prometheus", "ACME_TEST_PROMETHEUS");
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(unique("prometheus"));
        std::fs::create_dir_all(&dir).expect("prometheus dir");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules}\n\
             scrape_configs:\n  - job_name: {JOB}\n    static_configs:\n      - targets: ['{target}']\n",
            rules = repo_file(RULES).display(),
        );
        std::fs::write(dir.join("prometheus.yml"), config).expect("prometheus.yml");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("free port")
            .local_addr()
            .expect("addr")
            .port();
        let child = tokio::process::Command::new(binary)
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start prometheus");
        let prometheus = Self {
            child,
            port,
            dir,
            client: reqwest::Client::new(),
        };
        let ready = format!("http://127.0.0.1:{port}/-/ready");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(response) = prometheus.client.get(&ready).send().await
                && response.status() == 200
            {
                break;
            }
            assert!(Instant::now() < deadline, "prometheus did not become ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        prometheus
    }

    /// `data` of a successful API answer.
    async fn api(&self, path: &str, query: &[(&str, &str)]) -> Value {
        let url = format!("http://127.0.0.1:{}{path}", self.port);
        let body: Value = self
            .client
            .get(&url)
            .query(query)
            .send()
            .await
            .expect("prometheus API")
            .json()
            .await
            .expect("JSON");
        assert_eq!(body["status"], "success", "{path} {query:?}: {body}");
        body["data"].clone()
    }

    /// Polls `probe` until it returns an empty list of problems; panics with the last list.
    async fn wait_until_none(&self, what: &str, mut probe: impl AsyncFnMut(&Self) -> Vec<String>) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let problems = probe(self).await;
            if problems.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: {problems:#?}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_service_loads_the_rules_and_finds_every_metric_used() {
    // Every role in one process over Kafka, so every metric has a reason to exist; retention
    // runs every second.
    let url = fresh_database().await;
    let mut config = test_config(&url);
    config.kafka.brokers = Some(kafka_brokers());
    config.retention.interval_secs = 1;
    let app = TestApp::start(config, Roles::ALL).await;
    let prometheus = Prometheus::start(app.addr.expect("HTTP")).await;

    // Some traffic: good events, a duplicate, bad signatures, a stale timestamp.
    for i in 0..5 {
        let body = contact_event(
            "contact.created",
            &format!("evt_prom_{i}"),
            &format!("contact-p{i}"),
            "2025-05-19T00:00:00Z",
        );
        assert_eq!(app.post_signed_json(&body).await.status(), 200);
        if i == 0 {
            assert_eq!(app.post_signed_json(&body).await.status(), 200);
        }
        let text = body.to_string();
        let wrong = sign("a-rotated-secret", &text);
        assert_eq!(
            app.post_with(&text, Some(&wrong), Some(&now_header()), &[])
                .await
                .status(),
            401
        );
    }
    let body = contact_event(
        "contact.created",
        "evt_prom_old",
        "contact-p",
        "2025-05-19T00:00:00Z",
    )
    .to_string();
    assert_eq!(
        app.post_with(&body, Some(&sign(SECRET, &body)), Some("1000000000"), &[])
            .await
            .status(),
        401
    );
    app.wait_for_count(
        "SELECT COUNT(*) FROM webhook_events WHERE status = 'processed'",
        5,
        Duration::from_secs(60),
    )
    .await;

    // The target is scraped and healthy.
    prometheus
        .wait_until_none("targets not up", async |p| {
            let data = p.api("/api/v1/targets", &[]).await;
            let targets = data["activeTargets"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if targets.is_empty() {
                return vec!["no active target".to_owned()];
            }
            targets
                .iter()
                .filter(|t| t["health"] != "up" || t["labels"]["job"] != JOB)
                .map(|t| format!("{} {} {}", t["labels"], t["health"], t["lastError"]))
                .collect()
        })
        .await;

    // Every rule of the file is loaded and evaluates without error.
    let expected_alerts: BTreeSet<String> =
        alert_rules().into_iter().map(|(name, _)| name).collect();
    prometheus
        .wait_until_none("rules not loaded or not evaluated cleanly", async |p| {
            let data = p.api("/api/v1/rules", &[]).await;
            let mut problems = Vec::new();
            let mut loaded = BTreeSet::new();
            for group in data["groups"].as_array().into_iter().flatten() {
                for rule in group["rules"].as_array().into_iter().flatten() {
                    let name = rule["name"].as_str().unwrap_or_default().to_owned();
                    if rule["type"] != "alerting" || rule["health"] != "ok" {
                        problems.push(format!(
                            "{name}: {} {} {}",
                            rule["type"], rule["health"], rule["lastError"]
                        ));
                    }
                    loaded.insert(name);
                }
            }
            for missing in expected_alerts.difference(&loaded) {
                problems.push(format!("{missing}: not loaded"));
            }
            problems
        })
        .await;

    // Every metric the rules and the dashboard select exists, in /metrics and in Prometheus.
    // `up` is Prometheus's own.
    let mut used: BTreeSet<String> = BTreeSet::new();
    for (_, expr) in alert_rules().iter().chain(dashboard_queries().iter()) {
        used.extend(metric_names(expr));
    }
    used.remove("up");
    assert!(used.len() >= 30, "{used:?}");
    let exposed: BTreeSet<String> = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("scrape")
        .text()
        .await
        .expect("text")
        .lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| line.split(['{', ' ']).next().map(str::to_owned))
        .collect();
    let missing: Vec<&String> = used.difference(&exposed).collect();
    assert!(missing.is_empty(), "not in /metrics: {missing:?}");
    prometheus
        .wait_until_none("metric names Prometheus has not seen", async |p| {
            let data = p.api("/api/v1/label/__name__/values", &[]).await;
            let known: BTreeSet<String> = data
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect();
            used.difference(&known).cloned().collect()
        })
        .await;

    // Each dashboard query answers, with data (a panel that would stay empty is a mistake).
    let queries = dashboard_queries();
    prometheus
        .wait_until_none("dashboard queries without data", async |p| {
            let mut empty = Vec::new();
            for (title, expr) in &queries {
                let data = p.api("/api/v1/query", &[("query", expr)]).await;
                if data["result"].as_array().is_none_or(Vec::is_empty) {
                    empty.push(format!("{title}: {expr}"));
                }
            }
            empty
        })
        .await;
}
