//! Settings of the Kafka clients, the relay, the consumer and retention (sections of the
//! service config), each with the checks of its own values.
use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A setting that cannot be used: its dotted key and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{key}` {reason}")]
pub struct Invalid {
    pub key: &'static str,
    pub reason: String,
}

/// `Err` naming `key` when `bad`.
pub fn check(bad: bool, key: &'static str, reason: &str) -> Result<(), Invalid> {
    if bad {
        Err(Invalid {
            key,
            reason: reason.to_owned(),
        })
    } else {
        Ok(())
    }
}

/// `Err` naming `key` when `value` is 0.
pub fn positive(value: impl Into<u64>, key: &'static str) -> Result<(), Invalid> {
    check(value.into() == 0, key, "must be greater than 0")
}

/// `[kafka]`: where the bus is and how topics are named.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers; `None` selects the in-process bus.
    pub brokers: Option<String>,
    pub topic_prefix: String,
    pub group_id: String,
    pub create_topics: bool,
    pub partitions: i32,
    pub replication_factor: i32,
    pub message_timeout_ms: u64,
    /// Passed to every librdkafka client unchanged (security.protocol, sasl.*, ssl.*, ...).
    /// Numbers and booleans are taken as their text: `ACME_WEBHOOKS_KAFKA__PROPERTIES__LINGER_MS=5`
    /// arrives as a number, and librdkafka wants "5".
    #[serde(default, deserialize_with = "scalars_as_strings")]
    pub properties: BTreeMap<String, String>,
}

impl KafkaConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        check(
            self.brokers.as_deref().is_some_and(|b| b.trim().is_empty()),
            "kafka.brokers",
            "must not be empty when set",
        )?;
        check(
            self.topic_prefix.is_empty()
                || !self
                    .topic_prefix
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')),
            "kafka.topic_prefix",
            "must be non-empty and use only [a-zA-Z0-9._-]",
        )?;
        check(
            self.partitions < 1 && self.partitions != -1,
            "kafka.partitions",
            "must be at least 1, or -1 for the cluster's num.partitions",
        )?;
        check(
            self.replication_factor < 1 && self.replication_factor != -1,
            "kafka.replication_factor",
            "must be at least 1, or -1 for the cluster's default.replication.factor",
        )
    }

    /// The topic of one event type, e.g. `acme.contact.created`.
    pub fn topic_for(&self, event_type: &str) -> String {
        format!("{}.{}", self.topic_prefix, event_type)
    }

    /// Where messages that cannot be processed end up.
    pub fn dlq_topic(&self) -> String {
        format!("{}.webhooks.dlq", self.topic_prefix)
    }

    /// Every topic the service produces to or consumes from.
    pub fn all_topics(&self) -> Vec<String> {
        let mut topics: Vec<String> = crate::EVENT_TYPES
            .iter()
            .map(|t| self.topic_for(t))
            .collect();
        topics.push(self.dlq_topic());
        topics
    }
}

fn scalars_as_strings<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        Text(String),
        Integer(i64),
        Float(f64),
        Flag(bool),
    }
    let raw = BTreeMap::<String, Scalar>::deserialize(deserializer)?;
    Ok(raw
        .into_iter()
        .map(|(key, value)| {
            let text = match value {
                Scalar::Text(text) => text,
                Scalar::Integer(n) => n.to_string(),
                Scalar::Float(x) => x.to_string(),
                Scalar::Flag(flag) => flag.to_string(),
            };
            (key, text)
        })
        .collect())
}

/// `[relay]`: outbox claiming and publish retries.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    pub batch_size: u64,
    /// Relay loops per process, each claiming its own batches.
    pub workers: usize,
    pub poll_interval_ms: u64,
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    /// Re-publish rows whose event is still `pending` this long after delivery (0: never).
    pub republish_after_secs: u64,
}

impl RelayConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        positive(self.workers as u64, "relay.workers")?;
        positive(self.batch_size, "relay.batch_size")?;
        positive(self.poll_interval_ms, "relay.poll_interval_ms")
    }

    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms)
    }

    /// `None` when the safety net is off.
    pub fn republish_after(&self) -> Option<Duration> {
        (self.republish_after_secs > 0).then(|| Duration::from_secs(self.republish_after_secs))
    }
}

/// `[consumer]`: retries of transient processing failures.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConsumerConfig {
    /// Messages applied per database transaction, at most.
    pub batch_max: usize,
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    /// How often a member takes free partitions and gives back more than its share.
    pub rebalance_interval_ms: u64,
    /// Group members per consuming process (Kafka): each applies its own partitions' batches,
    /// so one process overlaps one batch's database round trips with another's.
    pub members: usize,
}

impl ConsumerConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        positive(self.batch_max as u64, "consumer.batch_max")?;
        positive(self.members as u64, "consumer.members")
    }

    pub fn rebalance_interval(&self) -> Duration {
        Duration::from_millis(self.rebalance_interval_ms.max(1))
    }
}

/// `[retention]`: how long published outbox rows and processed events are kept.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Prune at all (relay role, or the all-in-one process).
    pub enabled: bool,
    /// Outbox rows published longer ago than this are deleted, unless their event still needs
    /// them (not yet `processed`).
    pub published_outbox_secs: u64,
    /// `processed` events received and processed longer ago than this are deleted: the horizon
    /// within which a repeated event id is still answered `duplicate`.
    pub processed_events_secs: u64,
    /// Pause between two runs; a run deletes in batches until nothing old is left.
    pub interval_secs: u64,
    /// Rows deleted per statement (one short transaction each).
    pub batch_size: u64,
    /// Pause between two batches of a run, in milliseconds.
    pub batch_pause_ms: u64,
}

impl RetentionConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        positive(
            self.published_outbox_secs,
            "retention.published_outbox_secs",
        )?;
        // An event goes only after its outbox rows: a shorter event retention would not take
        // effect anyway.
        check(
            self.processed_events_secs < self.published_outbox_secs,
            "retention.processed_events_secs",
            "must be at least retention.published_outbox_secs",
        )?;
        positive(self.interval_secs, "retention.interval_secs")?;
        positive(self.batch_size, "retention.batch_size")
    }

    pub fn published_outbox(&self) -> Duration {
        Duration::from_secs(self.published_outbox_secs)
    }

    pub fn processed_events(&self) -> Duration {
        Duration::from_secs(self.processed_events_secs)
    }

    pub fn interval(&self) -> Duration {
        Duration::from_secs(self.interval_secs)
    }

    pub fn batch_pause(&self) -> Duration {
        Duration::from_millis(self.batch_pause_ms)
    }
}

/// Exponential backoff `base * 2^attempt`, capped at `max`.
pub fn backoff(base_ms: u64, max_ms: u64, attempt: u32) -> Duration {
    let factor = 1u64.checked_shl(attempt.min(32)).unwrap_or(u64::MAX);
    Duration::from_millis(base_ms.saturating_mul(factor).min(max_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(100, 1000, 0), Duration::from_millis(100));
        assert_eq!(backoff(100, 1000, 3), Duration::from_millis(800));
        assert_eq!(backoff(100, 1000, 4), Duration::from_millis(1000));
        assert_eq!(backoff(100, 1000, 200), Duration::from_millis(1000));
    }
}
