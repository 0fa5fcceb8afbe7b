//! The name of every metric the service exports, in one place: the code that records them, the
//! registration of their `# HELP` lines, the alert rules (deploy/prometheus) and the dashboard
//! all speak of these. Labels are noted beside each.

// Operations (every role).
/// Gauge: 1 when /readyz would answer 200.
pub const SERVICE_READY: &str = "service_ready";
/// Gauge `{dependency}`: 1 when the dependency answered its last readiness probe.
pub const SERVICE_DEPENDENCY_UP: &str = "service_dependency_up";
/// Counter: connections answered 503 at once because `http.max_connections` were open.
pub const HTTP_CONNECTIONS_REFUSED_TOTAL: &str = "http_connections_refused_total";
/// Counter: accept() failures.
pub const HTTP_ACCEPT_ERRORS_TOTAL: &str = "http_accept_errors_total";

// Webhook ingest (HTTP role).
/// Counter `{outcome}`: accepted, duplicate, rejected, error.
pub const WEBHOOK_REQUESTS_TOTAL: &str = "webhook_requests_total";
/// Counter `{reason}`: the error code of a refused webhook, or `duplicate`.
pub const WEBHOOK_REJECTIONS_TOTAL: &str = "webhook_rejections_total";
/// Histogram: from a verified webhook to its committed ack.
pub const WEBHOOK_INGEST_SECONDS: &str = "webhook_ingest_seconds";
/// Histogram: events per group-commit transaction.
pub const INGEST_BATCH_SIZE: &str = "ingest_batch_size";
/// Histogram: duration of a group commit.
pub const INGEST_COMMIT_SECONDS: &str = "ingest_commit_seconds";

// Backlog (every role, from the database).
/// Gauge: unpublished outbox rows.
pub const OUTBOX_PENDING_TOTAL: &str = "outbox_pending_total";
/// Gauge `{topic}`: unpublished outbox rows of a topic.
pub const OUTBOX_PENDING: &str = "outbox_pending";
/// Gauge `{topic}`: of those, rows waiting out a retry backoff.
pub const OUTBOX_PARKED: &str = "outbox_parked";
/// Gauge `{topic}`: age of the oldest row the relay could publish now.
pub const OUTBOX_OLDEST_CLAIMABLE_AGE_SECONDS: &str = "outbox_oldest_claimable_age_seconds";
/// Gauge: the same, over every topic.
pub const OUTBOX_OLDEST_CLAIMABLE_AGE_SECONDS_MAX: &str = "outbox_oldest_claimable_age_seconds_max";
/// Gauge: acknowledged events not yet processed.
pub const EVENTS_UNPROCESSED: &str = "events_unprocessed";
/// Gauge: age of the oldest of them (the golden signal).
pub const EVENTS_OLDEST_UNPROCESSED_AGE_SECONDS: &str = "events_oldest_unprocessed_age_seconds";
/// Gauge: events waiting for an operator (`failed`).
pub const EVENTS_FAILED: &str = "events_failed";
/// Gauge: pending events the relay's safety net has published again.
pub const EVENTS_REPUBLISHED_PENDING: &str = "events_republished_pending";
/// Gauge `{topic, partition}`: messages not yet applied.
pub const CONSUMER_LAG: &str = "consumer_lag";
/// Gauge `{topic, partition}`: 1 when a live member holds the partition.
pub const CONSUMER_PARTITION_OWNED: &str = "consumer_partition_owned";
/// Gauge: partitions no live member holds.
pub const CONSUMER_PARTITIONS_UNOWNED: &str = "consumer_partitions_unowned";

// Relay and retention (relay role).
/// Counter: outbox rows published.
pub const RELAY_PUBLISHED_TOTAL: &str = "relay_published_total";
/// Counter: publish attempts that failed.
pub const RELAY_FAILED_TOTAL: &str = "relay_failed_total";
/// Counter: rows the safety net published again.
pub const RELAY_REPUBLISHED_TOTAL: &str = "relay_republished_total";
/// Histogram: how long a batch took to publish.
pub const RELAY_PUBLISH_SECONDS: &str = "relay_publish_seconds";
/// Histogram: rows per relay batch.
pub const RELAY_BATCH_SIZE: &str = "relay_batch_size";
/// Counter `{table}`: rows deleted by retention.
pub const RETENTION_PRUNED_TOTAL: &str = "retention_pruned_total";
/// Counter: retention runs that failed.
pub const RETENTION_FAILURES_TOTAL: &str = "retention_failures_total";
/// Gauge: unix time of this process's last completed retention run.
pub const RETENTION_LAST_RUN_TIMESTAMP_SECONDS: &str = "retention_last_run_timestamp_seconds";
/// Gauge: how long that run took.
pub const RETENTION_LAST_RUN_DURATION_SECONDS: &str = "retention_last_run_duration_seconds";

// Consumer (consume role). `consumer.rs` and `partitions.rs` still spell these names inline.
/// Counter: events applied.
pub const CONSUMER_PROCESSED_TOTAL: &str = "consumer_processed_total";
/// Counter: events that could not be applied (marked failed).
pub const CONSUMER_FAILED_TOTAL: &str = "consumer_failed_total";
/// Counter: messages published to the dead-letter topic.
pub const CONSUMER_DEAD_LETTERED_TOTAL: &str = "consumer_dead_lettered_total";
/// Counter: transient processing failures retried.
pub const CONSUMER_RETRIES_TOTAL: &str = "consumer_retries_total";
/// Counter: seeks back because the broker served a partition past the offset asked for.
pub const CONSUMER_REFETCHES_TOTAL: &str = "consumer_refetches_total";
/// Counter: offsets the broker never served that a consumer went past (gaps accepted).
pub const CONSUMER_OFFSETS_MISSING_TOTAL: &str = "consumer_offsets_missing_total";
/// Gauge `{topic, partition, class}`: failed attempts in a row of the batch a partition is
/// waiting on (0 once it commits); `class` is the database error's (`relay::error::ErrorClass`).
pub const CONSUMER_BATCH_FAILED_ATTEMPTS: &str = "consumer_batch_failed_attempts";
/// Histogram: messages per applied batch.
pub const CONSUMER_BATCH_SIZE: &str = "consumer_batch_size";
/// Gauge `{member}`: partitions a member holds.
pub const CONSUMER_PARTITIONS_OWNED: &str = "consumer_partitions_owned";
/// Gauge: partitions of this consumer with messages waiting that have not moved for 30 s.
pub const CONSUMER_PARTITIONS_STALLED: &str = "consumer_partitions_stalled";
