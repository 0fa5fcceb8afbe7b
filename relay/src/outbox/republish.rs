//! The safety net against messages lost on the bus: an event still pending long after its row
//! was delivered gets the row published again, less and less often.
use std::time::Duration;

use chrono::{DateTime, Utc};
use entity::EventStatus;
use entity::outbox;
use entity::outbox::Column as O;
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr, EntityTrait, QueryFilter, Statement};

use crate::sql::one_of;

/// The longest the safety net waits between two re-publishes of one event.
pub const REPUBLISH_MAX_INTERVAL: Duration = Duration::from_secs(24 * 3600);

/// Makes the newest outbox row of events that are still `pending`, and whose rows were all
/// delivered long enough ago, unpublished again with `reason` as its last error, so the next
/// batch publishes it once more (processing is idempotent). "Long enough" doubles with each
/// re-publish of the row: `delivered_before * 2^republished`, at most a day, so an event that
/// cannot be processed is re-sent a few times a day, not every sweep. Only the newest row of an
/// event counts: an admin retry adds one. At most `limit` rows per call; returns how many were
/// re-queued.
///
/// Two users: the relay's safety net against messages lost on the bus, and embedded mode at
/// start (`Duration::ZERO`), because the in-process bus forgets its queue when the process stops.
pub async fn republish_pending(
    db: &DatabaseConnection,
    delivered_before: Duration,
    reason: &str,
    limit: u64,
) -> Result<u64, DbErr> {
    let now = Utc::now();
    let cutoff = now - delivered_before;
    let backend = db.get_database_backend();
    // `$n` placeholders are understood by both PostgreSQL and SQLite.
    let candidates = db
        .query_all_raw(Statement::from_sql_and_values(
            backend,
            "SELECT id, published_at, republished FROM outbox WHERE id IN ( \
               SELECT MAX(o.id) FROM outbox o JOIN webhook_events e ON e.event_id = o.event_id \
               WHERE e.status = $1 AND e.created_at <= $2 \
               GROUP BY o.event_id \
               HAVING SUM(CASE WHEN o.published_at IS NULL THEN 1 ELSE 0 END) = 0 \
                  AND MAX(o.published_at) <= $3) \
             ORDER BY id LIMIT $4",
            [
                EventStatus::Pending.as_str().into(),
                cutoff.into(),
                cutoff.into(),
                i64::try_from(limit).unwrap_or(i64::MAX).into(),
            ],
        ))
        .await?;
    let mut due = Vec::new();
    for row in candidates {
        let id: i64 = row.try_get_by_index(0)?;
        let published_at: Option<DateTime<Utc>> = row.try_get_by_index(1)?;
        let republished: i32 = row.try_get_by_index(2)?;
        let wait = republish_wait(delivered_before, republished);
        if published_at.is_some_and(|at| at + wait <= now) {
            due.push(id);
        }
    }
    if due.is_empty() {
        return Ok(0);
    }
    let result = outbox::Entity::update_many()
        .col_expr(O::PublishedAt, Expr::value(Option::<DateTime<Utc>>::None))
        .col_expr(O::NextAttemptAt, Expr::value(now))
        .col_expr(O::LastError, Expr::value(reason))
        .col_expr(O::Republished, Expr::col(O::Republished).add(1))
        .filter(one_of(backend, O::Id, due))
        .exec(db)
        .await?;
    Ok(result.rows_affected)
}

/// How long after its delivery a row re-published `republished` times is published again.
pub fn republish_wait(after: Duration, republished: i32) -> Duration {
    let doublings = Ord::min(u32::try_from(republished).unwrap_or(0), 20);
    after
        .saturating_mul(1 << doublings)
        .min(REPUBLISH_MAX_INTERVAL.max(after))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_republish_waits_twice_as_long_up_to_a_day() {
        let after = Duration::from_secs(600);
        assert_eq!(republish_wait(after, 0), after);
        assert_eq!(republish_wait(after, 1), Duration::from_secs(1200));
        assert_eq!(republish_wait(after, 3), Duration::from_secs(4800));
        assert_eq!(republish_wait(after, 30), REPUBLISH_MAX_INTERVAL);
        assert_eq!(republish_wait(Duration::ZERO, 5), Duration::ZERO);
    }
}
