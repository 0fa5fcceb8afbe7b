//! The embedded (no configuration) experience: a generated secret kept in the data directory,
//! and a startup banner with the Swagger UI and console addresses and a signed sample `curl`.
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;
use rand::RngCore;
use serde_json::json;

use crate::config::{Config, Secret};
use crate::signature::sign;

/// File in `database.data_dir` holding the generated development secret.
pub const DEV_SECRET_FILE: &str = "dev-webhook-secret";

/// The secrets to verify with: the configured ones; in embedded mode without any, a generated
/// secret that stays the same across restarts of that data directory; otherwise an error.
pub fn resolve_secrets(config: &Config) -> anyhow::Result<Vec<Secret>> {
    if !config.webhook.secrets.is_empty() {
        return Ok(config.webhook.secrets.clone());
    }
    if !config.is_embedded_database() {
        anyhow::bail!(
            "invalid configuration: `webhook.secrets` is empty; set at least one secret \
             (e.g. ACME_WEBHOOKS_WEBHOOK__SECRETS='[\"...\"]') when using Postgres"
        );
    }
    let path = config.database.data_dir.join(DEV_SECRET_FILE);
    Ok(vec![load_or_create_secret(&path)?])
}

fn load_or_create_secret(path: &Path) -> anyhow::Result<Secret> {
    if let Ok(existing) = std::fs::read_to_string(path) {
        let existing = existing.trim();
        if !existing.is_empty() {
            return Ok(Secret::new(existing));
        }
    }
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let secret = format!("whsec_dev_{}", hex::encode(bytes));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    write_private(path, &secret).with_context(|| format!("writing {}", path.display()))?;
    Ok(Secret::new(secret))
}

#[cfg(unix)]
fn write_private(path: &Path, content: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(content.as_bytes())
}

#[cfg(not(unix))]
fn write_private(path: &Path, content: &str) -> std::io::Result<()> {
    std::fs::write(path, content)
}

/// The seed's sample `contact.created`, with a fresh event id.
pub fn sample_event_body() -> String {
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    json!({
        "event": "contact.created",
        "timestamp": now,
        "id": format!("evt_{}", uuid::Uuid::new_v4().simple()),
        "data": {
            "id": "c8b5f7d9-8e7a-4a1d-9b5c-1d2e3f4a5b6c",
            "firstName": "John",
            "lastName": "Smith",
            "email": "john.smith@example.com",
            "phone": "555-987-6543",
            "company": "Acme Inc",
            "title": "Senior Engineer",
            "createdAt": now,
            "updatedAt": now
        }
    })
    .to_string()
}

/// A ready-to-paste `curl` posting a signed sample event. The timestamp header is filled in by
/// the shell when the command runs (it is not signed), so the command works whenever it is pasted.
pub fn sample_curl(addr: SocketAddr, secret: &Secret) -> String {
    let body = sample_event_body();
    let signature = sign(secret.expose().as_bytes(), body.as_bytes());
    format!(
        "curl -sS -X POST http://{addr}/api/webhooks \\\n  \
         -H 'Content-Type: application/json' \\\n  \
         -H \"X-Acme-Timestamp: $(date +%s)\" \\\n  \
         -H 'X-Acme-Signature: sha256={signature}' \\\n  \
         --data-raw '{body}'"
    )
}

/// What the embedded mode prints at start.
pub fn banner(config: &Config, addr: SocketAddr, secrets: &[Secret], generated: bool) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nacme-webhooks is running (embedded mode: SQLite in {}, in-process bus)",
        config.database.data_dir.display()
    );
    let _ = writeln!(out, "  Swagger UI:   http://{addr}/docs");
    let _ = writeln!(out, "  OpenAPI spec: http://{addr}/openapi.yaml");
    let console = if config.admin.token.is_some() {
        "sign in with admin.token"
    } else {
        "off: set ACME_WEBHOOKS_ADMIN__TOKEN to turn it on"
    };
    let _ = writeln!(out, "  Console:      http://{addr}/console ({console})");
    if let Some(secret) = secrets.first() {
        if generated {
            let _ = writeln!(
                out,
                "  Dev webhook secret (generated, kept in {}): {}",
                config.database.data_dir.join(DEV_SECRET_FILE).display(),
                secret.expose()
            );
        }
        let _ = writeln!(
            out,
            "\nPost a signed sample event:\n\n{}\n",
            sample_curl(addr, secret)
        );
    }
    out
}
