//! Service configuration: built-in defaults (the checked-in example file) < optional TOML file <
//! `ACME_WEBHOOKS_*` environment variables. Validated once at start; errors name the key.
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use ipnet::IpNet;
use relay::config::{
    ConsumerConfig, Invalid, KafkaConfig, RelayConfig, RetentionConfig, check, positive,
};
use serde::{Deserialize, Deserializer, Serialize};

/// The documented defaults; the same file users copy as a starting point.
pub const DEFAULTS_TOML: &str = include_str!("../../acme-webhooks.example.toml");
/// Config file read when `--config` is not given and the file exists.
pub const DEFAULT_CONFIG_FILE: &str = "acme-webhooks.toml";
/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "ACME_WEBHOOKS_";

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub http: HttpConfig,
    pub webhook: WebhookConfig,
    pub database: DatabaseConfig,
    pub kafka: KafkaConfig,
    pub ingest: IngestConfig,
    pub relay: RelayConfig,
    pub consumer: ConsumerConfig,
    pub retention: RetentionConfig,
    pub admin: AdminConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    pub bind: SocketAddr,
    pub max_body_bytes: usize,
    pub header_read_timeout_secs: u64,
    pub body_read_timeout_secs: u64,
    pub idle_timeout_secs: u64,
    pub max_connections: usize,
}

impl HttpConfig {
    fn validate(&self) -> Result<(), Invalid> {
        positive(self.max_body_bytes as u64, "http.max_body_bytes")?;
        positive(
            self.header_read_timeout_secs,
            "http.header_read_timeout_secs",
        )?;
        positive(self.body_read_timeout_secs, "http.body_read_timeout_secs")?;
        positive(self.idle_timeout_secs, "http.idle_timeout_secs")?;
        positive(self.max_connections as u64, "http.max_connections")
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// A single string is accepted as a list of one.
    #[serde(deserialize_with = "one_or_many")]
    pub secrets: Vec<Secret>,
    pub timestamp_tolerance_secs: u64,
    pub allowed_ips: Vec<IpNet>,
    pub trusted_proxies: Vec<IpNet>,
}

impl WebhookConfig {
    fn validate(&self) -> Result<(), Invalid> {
        positive(
            self.timestamp_tolerance_secs,
            "webhook.timestamp_tolerance_secs",
        )?;
        check(
            self.secrets.iter().any(|s| s.expose().is_empty()),
            "webhook.secrets",
            "must not contain an empty secret",
        )
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    pub url: Option<Secret>,
    pub data_dir: PathBuf,
    pub max_connections: u32,
    pub auto_migrate: bool,
}

impl DatabaseConfig {
    fn validate(&self) -> Result<(), Invalid> {
        check(
            self.url.as_ref().is_some_and(|url| {
                let url = url.expose();
                !(url.starts_with("postgres://")
                    || url.starts_with("postgresql://")
                    || url.starts_with("sqlite:"))
            }),
            "database.url",
            "must start with postgres://, postgresql:// or sqlite:",
        )?;
        positive(self.max_connections, "database.max_connections")
    }
}

/// `[ingest]`: group commit of the webhook write path.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    pub batch_max: usize,
    pub writers: usize,
    /// How many `nice` steps below HTTP and ingest the relay, the consumer and retention run.
    pub background_nice: i32,
}

impl IngestConfig {
    fn validate(&self) -> Result<(), Invalid> {
        positive(self.batch_max as u64, "ingest.batch_max")?;
        positive(self.writers as u64, "ingest.writers")?;
        check(
            !(0..=19).contains(&self.background_nice),
            "ingest.background_nice",
            "must be between 0 and 19",
        )
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub token: Option<Secret>,
}

impl AdminConfig {
    fn validate(&self) -> Result<(), Invalid> {
        check(
            self.token.as_ref().is_some_and(|t| t.expose().len() < 8),
            "admin.token",
            "must be at least 8 characters",
        )
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    pub backlog_refresh_secs: u64,
}

impl MetricsConfig {
    fn validate(&self) -> Result<(), Invalid> {
        positive(self.backlog_refresh_secs, "metrics.backlog_refresh_secs")
    }

    /// How often the backlog gauges (and the consumer's lag) are refreshed.
    pub fn backlog_refresh(&self) -> Duration {
        Duration::from_secs(self.backlog_refresh_secs)
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    pub filter: String,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// A string that never shows up in `Debug` output or logs.
#[derive(Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

fn one_or_many<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<Secret>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(Secret),
        Many(Vec<Secret>),
    }
    Ok(match OneOrMany::deserialize(deserializer)? {
        OneOrMany::One(secret) => vec![secret],
        OneOrMany::Many(secrets) => secrets,
    })
}

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {0}")]
    Figment(#[from] Box<figment::Error>),
    #[error("invalid configuration: `{key}` {reason}")]
    Invalid { key: &'static str, reason: String },
}

impl From<Invalid> for ConfigError {
    fn from(Invalid { key, reason }: Invalid) -> Self {
        Self::Invalid { key, reason }
    }
}

impl Config {
    /// Defaults, then `file` (if it exists, or fails if it was asked for explicitly), then env.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Toml::string(DEFAULTS_TOML));
        match file {
            Some(path) => {
                if !path.exists() {
                    return Err(ConfigError::Invalid {
                        key: "--config",
                        reason: format!("file {} does not exist", path.display()),
                    });
                }
                figment = figment.merge(Toml::file(path));
            }
            None => figment = figment.merge(Toml::file(DEFAULT_CONFIG_FILE)),
        }
        Self::from_figment(figment.merge(Env::prefixed(ENV_PREFIX).split("__")))
    }

    /// Extracts and validates; used by `load` and by tests that build their own figment.
    pub fn from_figment(figment: Figment) -> Result<Self, ConfigError> {
        let config: Config = figment.extract().map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    /// The built-in defaults alone.
    pub fn defaults() -> Self {
        Self::from_figment(Figment::from(Toml::string(DEFAULTS_TOML)))
            .expect("the checked-in defaults are valid")
    }

    /// Each section's checks, in the order of the file; the first problem is reported.
    fn validate(&self) -> Result<(), ConfigError> {
        self.http.validate()?;
        self.webhook.validate()?;
        self.database.validate()?;
        self.kafka.validate()?;
        self.ingest.validate()?;
        self.consumer.validate()?;
        self.relay.validate()?;
        self.admin.validate()?;
        self.retention.validate()?;
        self.metrics.validate()?;
        Ok(())
    }

    /// True when no database URL is configured: SQLite file + in-process bus.
    pub fn is_embedded_database(&self) -> bool {
        self.database_url().starts_with("sqlite:")
    }

    /// The configured database URL, or the embedded SQLite file in `data_dir`.
    pub fn database_url(&self) -> String {
        match &self.database.url {
            Some(url) => url.expose().to_owned(),
            None => format!(
                "sqlite://{}?mode=rwc",
                self.database
                    .data_dir
                    .join("acme-webhooks.sqlite")
                    .display()
            ),
        }
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use super::*;
    use figment::Jail;

    #[test]
    fn defaults_match_the_documented_values() {
        let config = Config::defaults();
        assert_eq!(config.http.bind.to_string(), "127.0.0.1:8080");
        assert_eq!(config.http.max_body_bytes, 262_144);
        assert_eq!(config.http.header_read_timeout_secs, 10);
        assert_eq!(config.http.body_read_timeout_secs, 30);
        assert_eq!(config.http.idle_timeout_secs, 60);
        assert_eq!(config.http.max_connections, 10_000);
        assert_eq!(config.webhook.timestamp_tolerance_secs, 300);
        assert!(config.webhook.secrets.is_empty());
        assert!(config.database.url.is_none());
        assert!(config.database.auto_migrate);
        assert!(config.is_embedded_database());
        assert_eq!(config.kafka.topic_prefix, "acme");
        assert!(config.admin.token.is_none());
        assert!(config.retention.enabled);
        assert_eq!(config.retention.published_outbox_secs, 7 * 86_400);
        assert_eq!(config.retention.processed_events_secs, 30 * 86_400);
        assert_eq!(config.retention.interval_secs, 60);
        assert_eq!(config.retention.batch_size, 2000);
    }

    #[test]
    fn file_then_env_override_defaults() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "acme-webhooks.toml",
                r#"
                [http]
                bind = "0.0.0.0:9000"
                [webhook]
                secrets = ["from-file"]
                allowed_ips = ["10.0.0.0/8"]
                "#,
            )?;
            jail.set_env("ACME_WEBHOOKS_WEBHOOK__SECRETS", r#"["s1","s2"]"#);
            jail.set_env(
                "ACME_WEBHOOKS_DATABASE__URL",
                "postgres://postgres@127.0.0.1/x",
            );
            jail.set_env("ACME_WEBHOOKS_KAFKA__PROPERTIES__SECURITY_PROTOCOL", "SSL");
            // Numbers and booleans from the environment reach librdkafka as their text.
            jail.set_env("ACME_WEBHOOKS_KAFKA__PROPERTIES__LINGER_MS", "5");
            jail.set_env(
                "ACME_WEBHOOKS_KAFKA__PROPERTIES__ENABLE_SSL_CERTIFICATE_VERIFICATION",
                "false",
            );
            let config = Config::load(None).expect("valid");
            assert_eq!(config.http.bind.to_string(), "0.0.0.0:9000");
            let secrets: Vec<&str> = config.webhook.secrets.iter().map(Secret::expose).collect();
            assert_eq!(secrets, ["s1", "s2"]);
            assert_eq!(config.webhook.allowed_ips[0].to_string(), "10.0.0.0/8");
            assert!(!config.is_embedded_database());
            assert_eq!(config.kafka.properties["security_protocol"], "SSL");
            assert_eq!(config.kafka.properties["linger_ms"], "5");
            assert_eq!(
                config.kafka.properties["enable_ssl_certificate_verification"],
                "false"
            );
            Ok(())
        });
    }

    #[test]
    fn a_single_secret_string_is_a_list_of_one() {
        Jail::expect_with(|jail| {
            jail.set_env("ACME_WEBHOOKS_WEBHOOK__SECRETS", "only-one");
            let config = Config::load(None).expect("valid");
            assert_eq!(config.webhook.secrets.len(), 1);
            Ok(())
        });
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            (
                "ACME_WEBHOOKS_WEBHOOK__ALLOWED_IPS",
                r#"["not-a-cidr"]"#,
                "allowed_ips",
            ),
            ("ACME_WEBHOOKS_HTTP__BIND", "nowhere", "bind"),
            (
                "ACME_WEBHOOKS_HTTP__MAX_BODY_BYTES",
                "0",
                "http.max_body_bytes",
            ),
            (
                "ACME_WEBHOOKS_HTTP__HEADER_READ_TIMEOUT_SECS",
                "0",
                "http.header_read_timeout_secs",
            ),
            (
                "ACME_WEBHOOKS_HTTP__BODY_READ_TIMEOUT_SECS",
                "0",
                "http.body_read_timeout_secs",
            ),
            (
                "ACME_WEBHOOKS_HTTP__IDLE_TIMEOUT_SECS",
                "0",
                "http.idle_timeout_secs",
            ),
            (
                "ACME_WEBHOOKS_HTTP__MAX_CONNECTIONS",
                "0",
                "http.max_connections",
            ),
            ("ACME_WEBHOOKS_DATABASE__URL", "mysql://x", "database.url"),
            (
                "ACME_WEBHOOKS_KAFKA__TOPIC_PREFIX",
                "bad prefix",
                "kafka.topic_prefix",
            ),
            ("ACME_WEBHOOKS_LOG__FORMAT", "xml", "format"),
            (
                "ACME_WEBHOOKS_RETENTION__PROCESSED_EVENTS_SECS",
                "60",
                "retention.processed_events_secs",
            ),
            (
                "ACME_WEBHOOKS_RETENTION__BATCH_SIZE",
                "0",
                "retention.batch_size",
            ),
            ("ACME_WEBHOOKS_HTTP__NO_SUCH_KEY", "1", "no_such_key"),
        ];
        for (var, value, key) in cases {
            Jail::expect_with(|jail| {
                jail.set_env(var, value);
                let err = Config::load(None).expect_err(var).to_string();
                assert!(
                    err.to_lowercase().contains(key),
                    "{var}={value}: `{err}` should name `{key}`"
                );
                Ok(())
            });
        }
    }

    #[test]
    fn secrets_are_redacted_in_debug_output() {
        Jail::expect_with(|jail| {
            jail.set_env("ACME_WEBHOOKS_WEBHOOK__SECRETS", r#"["hunter2-secret"]"#);
            jail.set_env("ACME_WEBHOOKS_ADMIN__TOKEN", "admin-token-123");
            let config = Config::load(None).expect("valid");
            let debug = format!("{config:?}");
            assert!(!debug.contains("hunter2-secret"));
            assert!(!debug.contains("admin-token-123"));
            Ok(())
        });
    }

    #[test]
    fn an_explicit_missing_config_file_is_an_error() {
        let err = Config::load(Some(Path::new("/nonexistent/acme.toml"))).expect_err("missing");
        assert!(err.to_string().contains("--config"));
    }
}
