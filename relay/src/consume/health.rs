//! The consumer group's health as one process sees it: high watermarks recorded for lag,
//! partitions nobody consumes, and owned partitions that stopped moving.
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use sea_orm::DatabaseConnection;

use super::partitions::{PartitionState, partition_states, record_watermarks};
use crate::bus::kafka::event_partitions;
use crate::config::KafkaConfig;
use crate::metrics as names;

/// Records high watermarks and checks the consumer group's health.
#[derive(Clone)]
pub struct LagReporter {
    consumer: Arc<StreamConsumer>,
    db: DatabaseConnection,
    kafka: KafkaConfig,
    members: Vec<String>,
    watch: Arc<std::sync::Mutex<HealthWatch>>,
}

impl LagReporter {
    pub(super) fn new(
        consumer: Arc<StreamConsumer>,
        db: DatabaseConnection,
        kafka: KafkaConfig,
        members: Vec<String>,
    ) -> Self {
        Self {
            consumer,
            db,
            kafka,
            members,
            watch: Arc::default(),
        }
    }

    /// The health found by the last `report` (`None` before the first).
    pub fn health(&self) -> Option<GroupHealth> {
        self.watch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last()
            .cloned()
    }

    /// Records the watermarks, then checks and logs the group's health (a WARN line when a
    /// partition has no consumer or a partition of this process's members stalled).
    pub async fn report(&self) {
        let partitions = match event_partitions(self.consumer.clone(), &self.kafka).await {
            Ok(partitions) => partitions,
            Err(error) => {
                tracing::debug!(%error, "topic metadata unavailable");
                return;
            }
        };
        let consumer = self.consumer.clone();
        let watermarks = tokio::task::spawn_blocking(move || {
            partitions
                .into_iter()
                .filter_map(|tp| {
                    let (_, high) = consumer
                        .fetch_watermarks(&tp.topic, tp.partition, Duration::from_secs(2))
                        .ok()?;
                    Some((tp, high))
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        if let Err(error) = record_watermarks(&self.db, &self.kafka.group_id, &watermarks).await {
            tracing::debug!(%error, "could not record watermarks");
        }
        match partition_states(&self.db).await {
            Ok(states) => {
                let health = self.watch.lock().unwrap_or_else(|e| e.into_inner()).check(
                    &states,
                    &self.members,
                    Instant::now(),
                );
                metrics::gauge!(names::CONSUMER_PARTITIONS_STALLED)
                    .set(health.stalled.len() as f64);
                if !health.healthy() {
                    tracing::warn!(unowned = ?health.unowned, stalled = ?health.stalled,
                        "consumer health: partitions not being consumed");
                }
            }
            Err(error) => tracing::debug!(%error, "could not read partition states"),
        }
    }
}

/// What a consumer process last found out about its group: partitions nobody consumes, and
/// partitions it owns that have messages waiting but did not move for a while.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GroupHealth {
    pub unowned: Vec<String>,
    pub stalled: Vec<String>,
}

impl GroupHealth {
    /// A partition one of `members` owns that did not move for this long while messages wait on
    /// it is stalled.
    pub const STALL_AFTER_SECS: f64 = 30.0;

    pub fn healthy(&self) -> bool {
        self.unowned.is_empty() && self.stalled.is_empty()
    }
}

/// Turns successive readings of the partition states into a [`GroupHealth`]. A partition is
/// briefly without an owner in normal work: a member creates its row and locks it in the next
/// statement, a member gives it back and another takes it at its next rebalance tick (well under
/// a second). So a partition counts as unowned only once it has been seen unowned for
/// [`HealthWatch::UNOWNED_AFTER`] without a break; a reading that finds it owned starts over.
#[derive(Debug, Default)]
pub struct HealthWatch {
    unowned_since: BTreeMap<String, Instant>,
    last: Option<GroupHealth>,
}

impl HealthWatch {
    /// How long a partition must stay unowned to be reported (a dead member's partitions are
    /// taken in under a second; this is well above that and well under the 15 s in which an
    /// orphaned partition must be consumed again).
    pub const UNOWNED_AFTER: Duration = Duration::from_secs(10);

    /// The health found by the last `check` (`None` before the first).
    pub fn last(&self) -> Option<&GroupHealth> {
        self.last.as_ref()
    }

    /// The health seen at `now` by a process whose group members are `members`; kept as `last`.
    pub fn check(
        &mut self,
        states: &[PartitionState],
        members: &[String],
        now: Instant,
    ) -> GroupHealth {
        let name = |s: &PartitionState| format!("{}[{}]", s.topic, s.partition);
        let unowned_now: BTreeSet<String> = states.iter().filter(|s| !s.owned).map(name).collect();
        self.unowned_since
            .retain(|partition, _| unowned_now.contains(partition));
        let unowned = unowned_now
            .into_iter()
            .filter(|partition| {
                let since = *self.unowned_since.entry(partition.clone()).or_insert(now);
                now.duration_since(since) >= Self::UNOWNED_AFTER
            })
            .collect();
        let health = GroupHealth {
            unowned,
            stalled: states
                .iter()
                .filter(|s| {
                    s.owned
                        && s.owner
                            .as_ref()
                            .is_some_and(|owner| members.contains(owner))
                        && s.lag().unwrap_or(0) > 0
                        && s.idle_secs.unwrap_or(0.0) > GroupHealth::STALL_AFTER_SECS
                })
                .map(name)
                .collect(),
        };
        self.last = Some(health.clone());
        health
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(partition: i32, owner: Option<&str>, owned: bool) -> PartitionState {
        PartitionState {
            topic: "t.contact.created".into(),
            partition,
            next_offset: Some(5),
            high_watermark: Some(5),
            owned,
            owner: owner.map(Into::into),
            idle_secs: Some(1.0),
        }
    }

    #[test]
    fn a_partition_between_owners_is_not_reported_one_left_unowned_is() {
        let members = ["m1".to_owned()];
        let mut watch = HealthWatch::default();
        let start = Instant::now();
        let at = |secs: u64| start + Duration::from_secs(secs);
        let both_free = [state(0, None, false), state(1, Some("gone"), false)];
        let one_taken = [state(0, Some("m1"), true), state(1, Some("gone"), false)];

        // A member that just created the rows and has not locked them yet: healthy.
        assert!(watch.check(&both_free, &members, at(0)).healthy());
        // Partition 0 is taken; partition 1 stays free past the grace and is named.
        assert!(watch.check(&one_taken, &members, at(5)).healthy());
        let health = watch.check(&one_taken, &members, at(10));
        assert_eq!(health.unowned, ["t.contact.created[1]"]);
        assert!(health.stalled.is_empty());
        // Partition 0 released again: its clock starts over, so only partition 1 is named.
        let health = watch.check(&both_free, &members, at(12));
        assert_eq!(health.unowned, ["t.contact.created[1]"]);
        // Once taken, partition 1 is healthy at once.
        let taken = [state(0, Some("m1"), true), state(1, Some("m1"), true)];
        assert!(watch.check(&taken, &members, at(13)).healthy());
        // A free spell after that is a new one: not reported before its own grace.
        assert!(watch.check(&both_free, &members, at(20)).healthy());
        assert_eq!(watch.check(&both_free, &members, at(30)).unowned.len(), 2);
    }
}
