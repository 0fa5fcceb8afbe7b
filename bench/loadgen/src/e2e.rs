//! End-to-end latency: from the scheduled send time of each accepted event to the `processed_at`
//! the consumer stored, read back from the service's own database after the run.
use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use entity::EventStatus;
use entity::webhook_event::{Column, Entity};
use sea_orm::{ColumnTrait, Database, EntityTrait, PaginatorTrait, QueryFilter, QuerySelect};

use super::events::EventFactory;
use super::stats::{LatencySummary, histogram};

/// How often the database is polled while waiting.
const POLL: Duration = Duration::from_millis(250);

/// The end-to-end result.
pub struct EndToEnd {
    pub latency: Option<LatencySummary>,
    /// Accepted (measured) events not processed when the wait ended.
    pub missing: u64,
}

/// Waits (at most `wait`) until every accepted event of the run has left `pending`, then
/// computes `processed_at - scheduled send time` for the measured ones in `accepted_at`.
pub async fn measure(
    database_url: &str,
    factory: &EventFactory,
    accepted_at: &HashMap<u64, i64>,
    total_accepted: u64,
    wait: Duration,
) -> anyhow::Result<EndToEnd> {
    let db = Database::connect(database_url)
        .await
        .context("connecting to --database-url")?;
    let prefix = factory.event_id_prefix();
    let deadline = Instant::now() + wait;
    loop {
        // Processed or failed: either way the event will not move on by itself any more.
        let settled = Entity::find()
            .filter(Column::EventId.starts_with(&prefix))
            .filter(Column::Status.is_in([EventStatus::Processed, EventStatus::Failed]))
            .count(&db)
            .await
            .context("counting the run's processed events")?;
        if settled >= total_accepted || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    let rows: Vec<(String, Option<DateTime<Utc>>)> = Entity::find()
        .select_only()
        .column(Column::EventId)
        .column(Column::ProcessedAt)
        .filter(Column::EventId.starts_with(&prefix))
        .filter(Column::Status.eq(EventStatus::Processed))
        .into_tuple()
        .all(&db)
        .await
        .context("reading the run's processing times")?;
    let mut e2e = histogram();
    for (event_id, processed_at) in rows {
        let (Some(seq), Some(processed_at)) = (factory.seq_of(&event_id), processed_at) else {
            continue;
        };
        if let Some(&scheduled_us) = accepted_at.get(&seq) {
            let latency_us = processed_at.timestamp_micros() - scheduled_us;
            e2e.saturating_record(u64::try_from(latency_us).unwrap_or(0).max(1));
        }
    }
    let found = e2e.len();
    db.close().await.ok();
    Ok(EndToEnd {
        latency: (found > 0).then(|| LatencySummary::of(&e2e)),
        missing: (accepted_at.len() as u64).saturating_sub(found),
    })
}
