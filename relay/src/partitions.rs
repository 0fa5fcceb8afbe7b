//! Who consumes which partition, and from where: both kept in PostgreSQL, next to the work.
//!
//! Kafka's group protocol is not used. Each consumer process is a *member*: it holds a shared
//! advisory lock on its group's key on a session of its own, so the members alive are the
//! sessions holding that lock. Each partition has a row in `consumer_partitions`; its id is the
//! key of an exclusive advisory lock, and whoever holds the lock consumes the partition (with a
//! manual `assign()`), starting from the row's `next_offset`. Every batch writes the new
//! `next_offset` in the transaction that applies it, only while the row still names the member
//! as `owner` (the fencing token), so a member that lost its partition cannot move it.
//!
//! A member that dies loses its session, and PostgreSQL drops its locks at once (a killed
//! process closes its socket; a vanished host is noticed through TCP keepalives set on the
//! session). The other members see free partitions at their next rebalance tick and take them.
//! Shares are even: a member takes free partitions up to `ceil(partitions / members)` and gives
//! back what it holds above that.
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::{Duration, Instant};

use chrono::Utc;
use sea_orm::sqlx::postgres::{PgConnectOptions, PgConnection};
use sea_orm::sqlx::{self, ConnectOptions, Row};
use sea_orm::{ConnectionTrait, DbErr, Statement, Value as SqlValue};

/// A topic partition.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TopicPartition {
    pub topic: String,
    pub partition: i32,
}

impl fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]", self.topic, self.partition)
    }
}

/// First key of the members' shared lock (two-int advisory lock form): "acmm".
const MEMBER_LOCK_CLASS: i32 = 0x6163_6d6d;
/// First key of the partitions' exclusive locks: "acmp"; the second is the partition row id.
const PARTITION_LOCK_CLASS: i32 = 0x6163_6d70;

/// The second key of a group's member lock: a stable 31-bit hash of the group id (FNV-1a).
fn group_key(group: &str) -> i32 {
    let hash = group.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    (hash & 0x7fff_ffff) as i32
}

/// A batch's offsets for a member's partitions, to write in the batch's transaction.
#[derive(Clone, Debug)]
pub struct OffsetCommit {
    pub group: String,
    pub owner: String,
    /// Next offset to consume, per partition.
    pub next: BTreeMap<TopicPartition, i64>,
}

/// Some partitions of a batch are owned by another member now.
#[derive(Debug, thiserror::Error)]
#[error("partitions no longer owned by this member: {0:?}")]
pub struct Fenced(pub Vec<String>);

impl OffsetCommit {
    /// Moves each partition's `next_offset` forward, only where this member is still the owner.
    pub async fn write<C: ConnectionTrait>(
        &self,
        conn: &C,
    ) -> Result<(), crate::processor::BatchError> {
        if self.next.is_empty() {
            return Ok(());
        }
        let [topics, partitions, offsets] = partition_arrays(self.next.iter());
        let values: Vec<SqlValue> = vec![
            Utc::now().into(),
            self.group.clone().into(),
            self.owner.clone().into(),
            topics,
            partitions,
            offsets,
        ];
        let sql = "UPDATE consumer_partitions AS p \
             SET next_offset = GREATEST(COALESCE(p.next_offset, 0), v.next_offset), committed_at = $1 \
             FROM unnest($4::text[], $5::int4[], $6::int8[]) AS v(topic, partition, next_offset) \
             WHERE p.group_id = $2 AND p.owner = $3 AND p.topic = v.topic AND p.partition = v.partition \
             RETURNING p.topic, p.partition";
        let written = conn
            .query_all_raw(Statement::from_sql_and_values(
                conn.get_database_backend(),
                sql,
                values,
            ))
            .await?;
        if written.len() == self.next.len() {
            return Ok(());
        }
        let mut lost: BTreeSet<String> = self.next.keys().map(ToString::to_string).collect();
        for row in written {
            let tp = TopicPartition {
                topic: row.try_get_by_index(0)?,
                partition: row.try_get_by_index(1)?,
            };
            lost.remove(&tp.to_string());
        }
        Err(Fenced(lost.into_iter().collect()).into())
    }
}

/// What one rebalance changed for this member.
#[derive(Debug, Default)]
pub struct Rebalance {
    /// Newly owned partitions and the offset to start from (`None`: from the beginning).
    pub acquired: Vec<(TopicPartition, Option<i64>)>,
    /// Partitions given back (already unlocked: stop consuming them).
    pub released: Vec<TopicPartition>,
}

/// This process's membership: a PostgreSQL session of its own holding the locks.
pub struct Membership {
    options: PgConnectOptions,
    session: Option<PgConnection>,
    group: String,
    member: String,
    /// Owned partitions by lock key (the row id).
    held: BTreeMap<TopicPartition, i32>,
    /// The partitions whose rows exist.
    known: BTreeSet<TopicPartition>,
}

impl Membership {
    /// `options` are the service's database connection options (the session is separate from
    /// the pool: a pooled connection could be recycled and silently drop the locks).
    pub fn new(options: PgConnectOptions, group: &str) -> Self {
        let member = format!("{}-{}-{:x}", hostname(), std::process::id(), rand_suffix());
        Self {
            options,
            session: None,
            group: group.to_owned(),
            member,
            held: BTreeMap::new(),
            known: BTreeSet::new(),
        }
    }

    /// The fencing token written as `owner`.
    pub fn member_id(&self) -> &str {
        &self.member
    }

    pub fn group(&self) -> &str {
        &self.group
    }

    pub fn owned(&self) -> impl Iterator<Item = &TopicPartition> {
        self.held.keys()
    }

    /// Everything this member held is gone (its session died, or it was fenced): forget it
    /// and start a new session at the next rebalance. Returns what it held.
    pub fn reset(&mut self) -> Vec<TopicPartition> {
        self.session = None;
        std::mem::take(&mut self.held).into_keys().collect()
    }

    /// Gives back one partition on `session`.
    async fn release(
        &mut self,
        session: &mut PgConnection,
        tp: &TopicPartition,
    ) -> Result<(), sqlx::Error> {
        let Some(key) = self.held.remove(tp) else {
            return Ok(());
        };
        sqlx::query("UPDATE consumer_partitions SET owner = NULL WHERE id = $1 AND owner = $2")
            .bind(key)
            .bind(&self.member)
            .execute(&mut *session)
            .await?;
        sqlx::query("SELECT pg_advisory_unlock($1, $2)")
            .bind(PARTITION_LOCK_CLASS)
            .bind(key)
            .execute(&mut *session)
            .await?;
        Ok(())
    }

    /// The membership session, opened (and the group joined) if there is none.
    async fn take_session(&mut self) -> Result<PgConnection, sqlx::Error> {
        if let Some(session) = self.session.take() {
            return Ok(session);
        }
        let mut session = self
            .options
            .clone()
            .application_name("acme-webhooks consumer membership")
            .connect()
            .await?;
        // Let the server notice a vanished host within ~10 s, not the OS default of hours.
        sqlx::query(
            "SELECT set_config('tcp_keepalives_idle', '5', false), \
                    set_config('tcp_keepalives_interval', '1', false), \
                    set_config('tcp_keepalives_count', '5', false)",
        )
        .execute(&mut session)
        .await?;
        sqlx::query("SELECT pg_advisory_lock_shared($1, $2)")
            .bind(MEMBER_LOCK_CLASS)
            .bind(group_key(&self.group))
            .execute(&mut session)
            .await?;
        tracing::info!(member = %self.member, group = %self.group, "joined the consumer group");
        Ok(session)
    }

    /// One round: make sure `partitions` have rows, then take free partitions up to a fair
    /// share and give back any above it. An error means the session is unusable: `reset`.
    pub async fn rebalance(
        &mut self,
        partitions: &BTreeSet<TopicPartition>,
    ) -> Result<Rebalance, sqlx::Error> {
        // On error the session is dropped, which ends it and releases its locks: whatever
        // failed, this member then holds nothing, as `reset` assumes.
        let mut session = self.take_session().await?;
        let change = self.rebalance_on(&mut session, partitions).await?;
        self.session = Some(session);
        Ok(change)
    }

    async fn rebalance_on(
        &mut self,
        session: &mut PgConnection,
        partitions: &BTreeSet<TopicPartition>,
    ) -> Result<Rebalance, sqlx::Error> {
        let group = self.group.clone();
        let member = self.member.clone();
        let new: Vec<&TopicPartition> = partitions.difference(&self.known).collect();
        if !new.is_empty() {
            let topics: Vec<&str> = new.iter().map(|tp| tp.topic.as_str()).collect();
            let numbers: Vec<i32> = new.iter().map(|tp| tp.partition).collect();
            sqlx::query(
                "INSERT INTO consumer_partitions (group_id, topic, partition) \
                 SELECT $1, t, p FROM unnest($2::text[], $3::int4[]) AS x(t, p) \
                 ON CONFLICT (group_id, topic, partition) DO NOTHING",
            )
            .bind(&group)
            .bind(&topics)
            .bind(&numbers)
            .execute(&mut *session)
            .await?;
        }
        // Every partition row of the group, whether some session holds its lock, how many
        // members there are (this one included) and how many of them have a smaller session pid
        // (this member's rank: the order that decides who takes one partition more).
        let rows = sqlx::query(
            "WITH locks AS (SELECT classid::int8 AS class, objid::int8 AS obj, pid FROM pg_locks \
               WHERE locktype = 'advisory' AND granted AND objsubid = 2 \
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())) \
             SELECT p.id, p.topic, p.partition, \
                    EXISTS (SELECT 1 FROM locks WHERE class = $2 AND obj = p.id) AS locked, \
                    (SELECT COUNT(*) FROM locks WHERE class = $3 AND obj = $4) AS members, \
                    (SELECT COUNT(*) FROM locks WHERE class = $3 AND obj = $4 \
                       AND pid < pg_backend_pid()) AS rank \
             FROM consumer_partitions p WHERE p.group_id = $1 ORDER BY p.topic, p.partition",
        )
        .bind(&group)
        .bind(i64::from(PARTITION_LOCK_CLASS))
        .bind(i64::from(MEMBER_LOCK_CLASS))
        .bind(i64::from(group_key(&group)))
        .fetch_all(&mut *session)
        .await?;
        self.known = partitions.clone();

        let mut free = Vec::new();
        let mut members = 1i64;
        let mut rank = 0i64;
        let mut total = 0usize;
        for row in &rows {
            let tp = TopicPartition {
                topic: row.try_get("topic")?,
                partition: row.try_get("partition")?,
            };
            members = row.try_get::<i64, _>("members")?.max(1);
            rank = row.try_get::<i64, _>("rank")?;
            if !partitions.contains(&tp) {
                continue; // a topic this member does not consume
            }
            total += 1;
            let locked: bool = row.try_get("locked")?;
            if !locked {
                free.push((tp, row.try_get::<i32, _>("id")?));
            }
        }
        let fair = fair_share(
            total,
            usize::try_from(members).unwrap_or(1),
            usize::try_from(rank).unwrap_or(0),
        );
        let mut change = Rebalance::default();

        while self.held.len() > fair {
            let Some(tp) = self.held.keys().next_back().cloned() else {
                break;
            };
            self.release(session, &tp).await?;
            change.released.push(tp);
        }
        for (tp, key) in free {
            if self.held.len() >= fair {
                break;
            }
            let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
                .bind(PARTITION_LOCK_CLASS)
                .bind(key)
                .fetch_one(&mut *session)
                .await?;
            if !locked {
                continue; // another member was faster
            }
            // Taking `owner` waits for a commit of the previous owner still in flight, and
            // reads the offset that commit wrote.
            let next: Option<i64> = sqlx::query_scalar(
                "UPDATE consumer_partitions SET owner = $1, owned_since = now() \
                 WHERE id = $2 RETURNING next_offset",
            )
            .bind(&member)
            .bind(key)
            .fetch_one(&mut *session)
            .await?;
            self.held.insert(tp.clone(), key);
            change.acquired.push((tp, next));
        }
        if !change.acquired.is_empty() || !change.released.is_empty() {
            tracing::info!(
                member = %self.member,
                members,
                owned = self.held.len(),
                acquired = ?change.acquired.iter().map(|(tp, _)| tp.to_string()).collect::<Vec<_>>(),
                released = ?change.released.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "partition ownership changed"
            );
        }
        Ok(change)
    }
}

/// How many of `total` partitions the member of rank `rank` (0-based) among `members` holds: an
/// even split, the first `total % members` members one more. Every member computes the same
/// split, so the shares add up to `total` and nobody is left idle while another holds extra (a
/// share rounded up for everyone could give 3, 3, 3 and 0 of 9 partitions to 4 members).
fn fair_share(total: usize, members: usize, rank: usize) -> usize {
    let members = members.max(1);
    total / members + usize::from(rank < total % members)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "host".to_owned())
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    hasher.finish() & 0xffff_ffff
}

/// Per partition of `group`: next offset, high watermark, whether a member holds it.
#[derive(Clone, Debug, PartialEq)]
pub struct PartitionState {
    pub topic: String,
    pub partition: i32,
    pub next_offset: Option<i64>,
    pub high_watermark: Option<i64>,
    pub owned: bool,
    /// The member recorded as owner (possibly a dead one, when `owned` is false).
    pub owner: Option<String>,
    /// Seconds since its offset last moved or it was taken, whichever is later.
    pub idle_secs: Option<f64>,
}

impl PartitionState {
    /// Messages on the partition not yet applied (as of the last watermark reading).
    pub fn lag(&self) -> Option<i64> {
        self.high_watermark
            .map(|high| (high - self.next_offset.unwrap_or(0)).max(0))
    }
}

/// Reads every partition of every group in the database (PostgreSQL only).
pub async fn partition_states<C: ConnectionTrait>(conn: &C) -> Result<Vec<PartitionState>, DbErr> {
    let sql = format!(
        "SELECT p.topic, p.partition, p.next_offset, p.high_watermark, \
           EXISTS (SELECT 1 FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted \
             AND l.objsubid = 2 AND l.classid::int8 = {PARTITION_LOCK_CLASS} AND l.objid::int8 = p.id \
             AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())) \
           , p.owner, \
           CAST(EXTRACT(EPOCH FROM now() - GREATEST(p.committed_at, p.owned_since)) AS FLOAT8) \
         FROM consumer_partitions p ORDER BY p.topic, p.partition"
    );
    let rows = conn
        .query_all_raw(Statement::from_string(conn.get_database_backend(), sql))
        .await?;
    rows.iter()
        .map(|r| {
            Ok(PartitionState {
                topic: r.try_get_by_index(0)?,
                partition: r.try_get_by_index(1)?,
                next_offset: r.try_get_by_index(2)?,
                high_watermark: r.try_get_by_index(3)?,
                owned: r.try_get_by_index(4)?,
                owner: r.try_get_by_index(5)?,
                idle_secs: r.try_get_by_index(6)?,
            })
        })
        .collect()
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

/// Records the high watermarks a consumer read (for lag, shown by every role).
pub async fn record_watermarks<C: ConnectionTrait>(
    conn: &C,
    group: &str,
    watermarks: &[(TopicPartition, i64)],
) -> Result<(), DbErr> {
    if watermarks.is_empty() {
        return Ok(());
    }
    let [topics, partitions, highs] =
        partition_arrays(watermarks.iter().map(|(tp, high)| (tp, high)));
    let values: Vec<SqlValue> = vec![Utc::now().into(), group.into(), topics, partitions, highs];
    let sql = "UPDATE consumer_partitions AS p SET high_watermark = v.high, watermark_at = $1 \
         FROM unnest($3::text[], $4::int4[], $5::int8[]) AS v(topic, partition, high) \
         WHERE p.group_id = $2 AND p.topic = v.topic AND p.partition = v.partition";
    conn.execute_raw(Statement::from_sql_and_values(
        conn.get_database_backend(),
        sql,
        values,
    ))
    .await?;
    Ok(())
}

/// Per-partition numbers as three array parameters (topics, partitions, the numbers), for
/// `unnest($a::text[], $b::int4[], $c::int8[])`: one statement text however many partitions
/// (see `sql`).
fn partition_arrays<'a>(
    items: impl Iterator<Item = (&'a TopicPartition, &'a i64)>,
) -> [SqlValue; 3] {
    let (mut topics, mut partitions, mut numbers) = (Vec::new(), Vec::new(), Vec::new());
    for (tp, number) in items {
        topics.push(tp.topic.clone());
        partitions.push(tp.partition);
        numbers.push(*number);
    }
    [topics.into(), partitions.into(), numbers.into()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_keys_are_stable_non_negative_int4s() {
        assert_eq!(group_key("acme-webhooks"), group_key("acme-webhooks"));
        assert_ne!(group_key("a"), group_key("b"));
        assert!(group_key("anything") >= 0);
    }

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

    #[test]
    fn fair_shares_add_up_and_differ_by_at_most_one() {
        for total in 0..20 {
            for members in 1..8 {
                let shares: Vec<usize> = (0..members)
                    .map(|r| fair_share(total, members, r))
                    .collect();
                assert_eq!(
                    shares.iter().sum::<usize>(),
                    total,
                    "{total} over {members}"
                );
                let min = shares.iter().min().copied().unwrap_or_default();
                let max = shares.iter().max().copied().unwrap_or_default();
                assert!(max - min <= 1, "{total} over {members}: {shares:?}");
            }
        }
        assert_eq!(
            (0..4).map(|r| fair_share(9, 4, r)).collect::<Vec<_>>(),
            [3, 2, 2, 2]
        );
    }
}
