//! What is waiting: the outbox backlog per topic, acknowledged events not yet processed, the
//! consumer group's partitions; and the loop that keeps their gauges current.
use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::{DatabaseBackend, DatabaseConnection, DbErr, FromQueryResult, Statement};
use tokio_util::sync::CancellationToken;

use crate::consume::partitions::{PartitionState, partition_states};
use crate::metrics as names;
use crate::webhook_events;

// These are also the admin API's answer (`GET /api/admin/outbox`): with the `openapi` feature
// they are poem-openapi objects, and their doc comments are the spec's descriptions.

/// Unpublished outbox rows of one topic.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(poem_openapi::Object))]
#[cfg_attr(feature = "openapi", oai(rename_all = "camelCase"))]
#[serde(rename_all = "camelCase")]
pub struct TopicBacklog {
    pub topic: String,
    /// Unpublished rows.
    pub pending: i64,
    /// Of those, rows waiting out a retry backoff.
    pub parked: i64,
    /// Age in seconds of the oldest row that could be published now (0 if none).
    pub oldest_claimable_age_secs: f64,
}

/// The outbox backlog.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(poem_openapi::Object))]
#[cfg_attr(
    feature = "openapi",
    oai(rename = "OutboxSummary", rename_all = "camelCase")
)]
#[serde(rename_all = "camelCase")]
pub struct Backlog {
    pub pending: i64,
    pub parked: i64,
    pub oldest_claimable_age_secs: f64,
    pub topics: Vec<TopicBacklog>,
    /// Acknowledged events not yet processed (published or not): the golden signal.
    pub unprocessed: i64,
    /// Age of the oldest of them, in seconds (0 when there is none).
    pub oldest_unprocessed_age_secs: f64,
    /// Events still pending that the relay's safety net has published again at least once.
    pub republished_pending: i64,
    /// Every partition of the consumer group (Kafka mode): its next offset, lag and owner.
    pub partitions: Vec<PartitionView>,
}

/// One partition of the consumer group.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(poem_openapi::Object))]
#[cfg_attr(feature = "openapi", oai(rename_all = "camelCase"))]
#[serde(rename_all = "camelCase")]
pub struct PartitionView {
    pub topic: String,
    pub partition: i32,
    /// The first offset not yet applied (`null`: nothing applied yet).
    #[cfg_attr(feature = "openapi", oai(nullable))]
    pub next_offset: Option<i64>,
    /// Messages not yet applied, as of the last high watermark a consumer read.
    #[cfg_attr(feature = "openapi", oai(nullable))]
    pub lag: Option<i64>,
    /// Whether a live consumer holds the partition.
    pub owned: bool,
}

impl From<PartitionState> for PartitionView {
    fn from(p: PartitionState) -> Self {
        Self {
            lag: p.lag(),
            topic: p.topic,
            partition: p.partition,
            next_offset: p.next_offset,
            owned: p.owned,
        }
    }
}

#[derive(FromQueryResult)]
struct BacklogRow {
    topic: String,
    pending: i64,
    parked: i64,
    oldest_claimable: Option<DateTime<Utc>>,
}

/// Current outbox backlog, per topic. Reads only unpublished rows (a partial index).
pub async fn backlog(db: &DatabaseConnection) -> Result<Backlog, DbErr> {
    let now = Utc::now();
    let backend = db.get_database_backend();
    // `$1` twice is one parameter for PostgreSQL and SQLite alike.
    let sql = "SELECT topic, COUNT(*) AS pending, \
                CAST(SUM(CASE WHEN next_attempt_at > $1 THEN 1 ELSE 0 END) AS BIGINT) AS parked, \
                MIN(CASE WHEN next_attempt_at <= $1 THEN created_at END) AS oldest_claimable \
         FROM outbox WHERE published_at IS NULL GROUP BY topic ORDER BY topic";
    let rows =
        BacklogRow::find_by_statement(Statement::from_sql_and_values(backend, sql, [now.into()]))
            .all(db)
            .await?;
    let age = |t: Option<DateTime<Utc>>| {
        t.map_or(0.0, |t| {
            ((now - t).num_milliseconds().max(0) as f64) / 1000.0
        })
    };
    let topics: Vec<TopicBacklog> = rows
        .into_iter()
        .map(|r| TopicBacklog {
            topic: r.topic,
            pending: r.pending,
            parked: r.parked,
            oldest_claimable_age_secs: age(r.oldest_claimable),
        })
        .collect();
    let unprocessed = webhook_events::unprocessed(db).await?;
    let partitions = if backend == DatabaseBackend::Postgres {
        partition_states(db)
            .await?
            .into_iter()
            .map(PartitionView::from)
            .collect()
    } else {
        Vec::new()
    };
    Ok(Backlog {
        unprocessed: unprocessed.unprocessed,
        oldest_unprocessed_age_secs: age(unprocessed.oldest),
        republished_pending: unprocessed.republished,
        partitions,
        pending: topics.iter().map(|t| t.pending).sum(),
        parked: topics.iter().map(|t| t.parked).sum(),
        oldest_claimable_age_secs: topics
            .iter()
            .map(|t| t.oldest_claimable_age_secs)
            .fold(0.0, f64::max),
        topics,
    })
}

/// Keeps the `outbox_*`, `events_*` and partition gauges current, so a scrape never queries the
/// database. The per-topic gauges of `topics` exist from the start (at 0), not only once a
/// backlog was seen.
pub async fn refresh_backlog_gauges(
    db: DatabaseConnection,
    topics: Vec<String>,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut seen = BTreeSet::<String>::from_iter(topics);
    while !shutdown.is_cancelled() {
        match backlog(&db).await {
            Ok(summary) => {
                // Topics that drained disappear from the query; report them as empty.
                for topic in &seen {
                    if !summary.topics.iter().any(|t| &t.topic == topic) {
                        set_topic_gauges(topic, 0, 0, 0.0);
                    }
                }
                for t in &summary.topics {
                    seen.insert(t.topic.clone());
                    set_topic_gauges(&t.topic, t.pending, t.parked, t.oldest_claimable_age_secs);
                }
                set_gauges(&summary);
            }
            Err(error) => tracing::warn!(%error, "outbox backlog query failed"),
        }
        match webhook_events::count_failed(&db).await {
            Ok(failed) => metrics::gauge!(names::EVENTS_FAILED).set(failed as f64),
            Err(error) => tracing::warn!(%error, "failed events query failed"),
        }
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = tokio::time::sleep(every) => {}
        }
    }
}

fn set_gauges(summary: &Backlog) {
    metrics::gauge!(names::OUTBOX_PENDING_TOTAL).set(summary.pending as f64);
    metrics::gauge!(names::EVENTS_UNPROCESSED).set(summary.unprocessed as f64);
    metrics::gauge!(names::EVENTS_OLDEST_UNPROCESSED_AGE_SECONDS)
        .set(summary.oldest_unprocessed_age_secs);
    metrics::gauge!(names::EVENTS_REPUBLISHED_PENDING).set(summary.republished_pending as f64);
    metrics::gauge!(names::CONSUMER_PARTITIONS_UNOWNED)
        .set(summary.partitions.iter().filter(|p| !p.owned).count() as f64);
    for p in &summary.partitions {
        let labels = [
            ("topic", p.topic.clone()),
            ("partition", p.partition.to_string()),
        ];
        metrics::gauge!(names::CONSUMER_PARTITION_OWNED, &labels).set(if p.owned {
            1.0
        } else {
            0.0
        });
        if let Some(lag) = p.lag {
            metrics::gauge!(names::CONSUMER_LAG, &labels).set(lag as f64);
        }
    }
    metrics::gauge!(names::OUTBOX_OLDEST_CLAIMABLE_AGE_SECONDS_MAX)
        .set(summary.oldest_claimable_age_secs);
}

fn set_topic_gauges(topic: &str, pending: i64, parked: i64, oldest: f64) {
    let topic = topic.to_owned();
    metrics::gauge!(names::OUTBOX_PENDING, "topic" => topic.clone()).set(pending as f64);
    metrics::gauge!(names::OUTBOX_PARKED, "topic" => topic.clone()).set(parked as f64);
    metrics::gauge!(names::OUTBOX_OLDEST_CLAIMABLE_AGE_SECONDS, "topic" => topic).set(oldest);
}
