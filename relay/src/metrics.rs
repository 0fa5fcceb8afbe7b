//! Every metric the service exports, in one table: its name (the constant the code records
//! with), kind, labels, which role exports it, and its help text (the `# HELP` line). The alert
//! rules (deploy/prometheus) and the dashboard speak of these names; [`describe`] registers the
//! help texts of a process's roles and creates its plain counters at zero, so that rules that
//! divide by them or watch them grow see them before their first event.

/// What a metric is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Which processes export a metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Every process (the operations endpoints, and the backlog read from the database).
    Every,
    Http,
    Relay,
    Consumer,
}

/// One row of [`CATALOG`].
#[derive(Clone, Copy, Debug)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub role: Role,
    /// Label names, comma-separated ("" for none).
    pub labels: &'static str,
    /// Created at 0 when the role starts (a counter without labels).
    pub zero: bool,
    pub help: &'static str,
}

macro_rules! catalog {
    ($($name:ident = $text:literal, $kind:ident, $role:ident, [$labels:literal], $zero:tt, $help:literal;)*) => {
        $(
            #[doc = concat!("`", $text, "` (", stringify!($kind), ", labels: ", $labels, "): ", $help, ".")]
            pub const $name: &str = $text;
        )*
        /// Every metric, in the order of this file.
        pub const CATALOG: &[Metric] = &[$(Metric {
            name: $text,
            kind: Kind::$kind,
            role: Role::$role,
            labels: $labels,
            zero: catalog!(@zero $zero),
            help: $help,
        }),*];
    };
    (@zero zero) => { true };
    (@zero _) => { false };
}

catalog! {
    // Operations.
    SERVICE_READY = "service_ready", Gauge, Every, [""], _,
        "1 when /readyz would answer 200 (database, broker and consumer group healthy), else 0";
    SERVICE_DEPENDENCY_UP = "service_dependency_up", Gauge, Every, ["dependency"], _,
        "1 when the dependency answered its last readiness probe, else 0";
    HTTP_CONNECTIONS_REFUSED_TOTAL = "http_connections_refused_total", Counter, Every, [""], zero,
        "connections answered 503 at once because http.max_connections were open";
    HTTP_ACCEPT_ERRORS_TOTAL = "http_accept_errors_total", Counter, Every, [""], zero,
        "accept() failures (out of file descriptors...)";

    // Webhook ingest.
    WEBHOOK_REQUESTS_TOTAL = "webhook_requests_total", Counter, Http, ["outcome"], _,
        "webhook requests by outcome: accepted, duplicate, rejected, error";
    WEBHOOK_REJECTIONS_TOTAL = "webhook_rejections_total", Counter, Http, ["reason"], _,
        "webhook requests refused (and duplicates), by reason: the error code, or duplicate";
    WEBHOOK_INGEST_SECONDS = "webhook_ingest_seconds", Histogram, Http, [""], _,
        "time from a verified webhook to its committed ack";
    INGEST_BATCH_SIZE = "ingest_batch_size", Histogram, Http, [""], _,
        "events per group-commit transaction";
    INGEST_COMMIT_SECONDS = "ingest_commit_seconds", Histogram, Http, [""], _,
        "duration of a group commit";

    // Admin API and console actions.
    ADMIN_RETRIES = "admin_retries_total", Counter, Http, ["via"], _,
        "retry actions (one event, or the failed events matching a filter), by where they came from: api or console";
    ADMIN_REQUEUED = "admin_requeued_events_total", Counter, Http, ["via"], _,
        "failed events set back to pending by retry actions, by where they came from: api or console";
    CONSOLE_SIGN_INS = "console_sign_ins_total", Counter, Http, ["outcome"], _,
        "console sign-in attempts by outcome: ok, refused (wrong token), forbidden (cross-site)";

    // The backlog, read from the database by every role.
    OUTBOX_PENDING_TOTAL = "outbox_pending_total", Gauge, Every, [""], _,
        "unpublished outbox rows";
    OUTBOX_PENDING = "outbox_pending", Gauge, Every, ["topic"], _,
        "unpublished outbox rows of a topic";
    OUTBOX_PARKED = "outbox_parked", Gauge, Every, ["topic"], _,
        "unpublished outbox rows of a topic waiting out a retry backoff";
    OUTBOX_OLDEST_CLAIMABLE_AGE_SECONDS = "outbox_oldest_claimable_age_seconds", Gauge, Every, ["topic"], _,
        "age of the oldest row of a topic the relay could publish now";
    OUTBOX_OLDEST_CLAIMABLE_AGE_SECONDS_MAX = "outbox_oldest_claimable_age_seconds_max", Gauge, Every, [""], _,
        "age of the oldest outbox row the relay could publish now";
    EVENTS_UNPROCESSED = "events_unprocessed", Gauge, Every, [""], _,
        "acknowledged events not yet processed (pending)";
    EVENTS_OLDEST_UNPROCESSED_AGE_SECONDS = "events_oldest_unprocessed_age_seconds", Gauge, Every, [""], _,
        "age of the oldest acknowledged event not yet processed: the golden signal";
    EVENTS_FAILED = "events_failed", Gauge, Every, [""], _,
        "events that could not be applied and wait for an operator (status failed)";
    EVENTS_REPUBLISHED_PENDING = "events_republished_pending", Gauge, Every, [""], _,
        "pending events the relay's safety net has published again";
    CONSUMER_LAG = "consumer_lag", Gauge, Every, ["topic, partition"], _,
        "messages not yet applied per partition of the consumer group";
    CONSUMER_PARTITION_OWNED = "consumer_partition_owned", Gauge, Every, ["topic, partition"], _,
        "1 when a live member of the consumer group holds the partition, else 0";
    CONSUMER_PARTITIONS_UNOWNED = "consumer_partitions_unowned", Gauge, Every, [""], _,
        "partitions of the consumer group that no live consumer holds";

    // Relay and retention.
    RELAY_PUBLISHED_TOTAL = "relay_published_total", Counter, Relay, [""], zero,
        "outbox rows published";
    RELAY_FAILED_TOTAL = "relay_failed_total", Counter, Relay, [""], zero,
        "publish attempts that failed";
    RELAY_REPUBLISHED_TOTAL = "relay_republished_total", Counter, Relay, [""], zero,
        "rows the safety net published again (event still pending long after delivery)";
    RELAY_PUBLISH_SECONDS = "relay_publish_seconds", Histogram, Relay, [""], _,
        "how long a relay batch took to publish";
    RELAY_BATCH_SIZE = "relay_batch_size", Histogram, Relay, [""], _,
        "rows per relay batch";
    RETENTION_PRUNED_TOTAL = "retention_pruned_total", Counter, Relay, ["table"], _,
        "rows deleted by retention, by table";
    RETENTION_FAILURES_TOTAL = "retention_failures_total", Counter, Relay, [""], _,
        "retention runs that failed";
    RETENTION_LAST_RUN_TIMESTAMP_SECONDS = "retention_last_run_timestamp_seconds", Gauge, Relay, [""], _,
        "unix time at which the last retention run of this process completed";
    RETENTION_LAST_RUN_DURATION_SECONDS = "retention_last_run_duration_seconds", Gauge, Relay, [""], _,
        "how long the last completed retention run took";

    // Consumer.
    CONSUMER_PROCESSED_TOTAL = "consumer_processed_total", Counter, Consumer, [""], zero,
        "events applied";
    CONSUMER_FAILED_TOTAL = "consumer_failed_total", Counter, Consumer, [""], zero,
        "events that could not be applied (marked failed)";
    CONSUMER_DEAD_LETTERED_TOTAL = "consumer_dead_lettered_total", Counter, Consumer, [""], zero,
        "messages published to the dead-letter topic";
    CONSUMER_RETRIES_TOTAL = "consumer_retries_total", Counter, Consumer, [""], zero,
        "failed batch attempts retried";
    CONSUMER_REFETCHES_TOTAL = "consumer_refetches_total", Counter, Consumer, [""], zero,
        "seeks back because the broker served a partition past the offset asked for";
    CONSUMER_OFFSETS_MISSING_TOTAL = "consumer_offsets_missing_total", Counter, Consumer, [""], zero,
        "offsets the broker never served that the consumer went past";
    CONSUMER_BATCH_FAILED_ATTEMPTS = "consumer_batch_failed_attempts", Gauge, Consumer, ["topic, partition, class"], _,
        "failed attempts in a row of the batch a partition waits on, by database error class";
    CONSUMER_BATCH_SIZE = "consumer_batch_size", Histogram, Consumer, [""], _,
        "messages per applied batch";
    CONSUMER_PARTITIONS_OWNED = "consumer_partitions_owned", Gauge, Consumer, ["member"], _,
        "partitions a member of this process holds";
    CONSUMER_PARTITIONS_STALLED = "consumer_partitions_stalled", Gauge, Consumer, [""], _,
        "partitions of this consumer with messages waiting that have not moved for 30 s";
}

/// Registers the help texts of the metrics of `roles` (plus those of every role) and creates
/// their plain counters at 0.
pub fn describe(roles: &[Role]) {
    for metric in CATALOG
        .iter()
        .filter(|m| m.role == Role::Every || roles.contains(&m.role))
    {
        match metric.kind {
            Kind::Counter => metrics::describe_counter!(metric.name, metric.help),
            Kind::Gauge => metrics::describe_gauge!(metric.name, metric.help),
            Kind::Histogram => metrics::describe_histogram!(metric.name, metric.help),
        }
        if metric.zero {
            metrics::counter!(metric.name).increment(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_only_plain_counters_are_created_at_zero() {
        let mut seen = std::collections::BTreeSet::new();
        for m in CATALOG {
            assert!(seen.insert(m.name), "{} twice", m.name);
            assert!(
                m.name.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                "{}",
                m.name
            );
            assert!(
                m.kind != Kind::Counter || m.name.ends_with("_total"),
                "{}",
                m.name
            );
            assert!(
                !m.zero || (m.kind == Kind::Counter && m.labels.is_empty()),
                "{}",
                m.name
            );
            assert!(!m.help.is_empty());
        }
    }
}
