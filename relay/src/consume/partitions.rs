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
//! Shares are even: with `n` partitions and `m` members, each member's share is `n / m`, and
//! the first `n % m` members by session pid take one more (`fair_share`); a member takes free
//! partitions up to its share and gives back what it holds above it.
use std::collections::{BTreeMap, BTreeSet};

use chrono::Utc;
use sea_orm::sqlx::postgres::{PgConnectOptions, PgConnection};
use sea_orm::sqlx::{self, ConnectOptions, Row};
use sea_orm::{ConnectionTrait, DbErr, Statement, Value as SqlValue};

use super::error::{BatchError, Fenced};
use crate::bus::TopicPartition;

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

impl OffsetCommit {
    /// Moves each partition's `next_offset` forward, only where this member is still the owner.
    pub async fn write<C: ConnectionTrait>(&self, conn: &C) -> Result<(), BatchError> {
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
        let new: Vec<&TopicPartition> = partitions.difference(&self.known).collect();
        if !new.is_empty() {
            self.create_rows(session, &new).await?;
        }
        let shares = self.read_shares(session, partitions).await?;
        self.known = partitions.clone();
        let fair = fair_share(shares.total, shares.members, shares.rank);
        let mut change = Rebalance::default();
        while self.held.len() > fair {
            let Some(tp) = self.held.keys().next_back().cloned() else {
                break;
            };
            self.release(session, &tp).await?;
            change.released.push(tp);
        }
        for (tp, key) in shares.free {
            if self.held.len() >= fair {
                break;
            }
            if let Some(next) = self.take(session, key).await? {
                self.held.insert(tp.clone(), key);
                change.acquired.push((tp, next));
            }
        }
        if !change.acquired.is_empty() || !change.released.is_empty() {
            tracing::info!(
                member = %self.member,
                members = shares.members,
                owned = self.held.len(),
                acquired = ?change.acquired.iter().map(|(tp, _)| tp.to_string()).collect::<Vec<_>>(),
                released = ?change.released.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "partition ownership changed"
            );
        }
        Ok(change)
    }

    /// Creates the rows of partitions seen for the first time (another member may have).
    async fn create_rows(
        &self,
        session: &mut PgConnection,
        new: &[&TopicPartition],
    ) -> Result<(), sqlx::Error> {
        let topics: Vec<&str> = new.iter().map(|tp| tp.topic.as_str()).collect();
        let numbers: Vec<i32> = new.iter().map(|tp| tp.partition).collect();
        sqlx::query(
            "INSERT INTO consumer_partitions (group_id, topic, partition) \
             SELECT $1, t, p FROM unnest($2::text[], $3::int4[]) AS x(t, p) \
             ON CONFLICT (group_id, topic, partition) DO NOTHING",
        )
        .bind(&self.group)
        .bind(&topics)
        .bind(&numbers)
        .execute(&mut *session)
        .await?;
        Ok(())
    }

    /// Every partition row of the group among `partitions`, whether some session holds its
    /// lock, how many members there are (this one included) and how many of them have a smaller
    /// session pid (this member's rank: the order that decides who takes one partition more).
    async fn read_shares(
        &self,
        session: &mut PgConnection,
        partitions: &BTreeSet<TopicPartition>,
    ) -> Result<Shares, sqlx::Error> {
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
        .bind(&self.group)
        .bind(i64::from(PARTITION_LOCK_CLASS))
        .bind(i64::from(MEMBER_LOCK_CLASS))
        .bind(i64::from(group_key(&self.group)))
        .fetch_all(&mut *session)
        .await?;
        let mut shares = Shares {
            members: 1,
            ..Shares::default()
        };
        for row in &rows {
            let tp = TopicPartition {
                topic: row.try_get("topic")?,
                partition: row.try_get("partition")?,
            };
            shares.members = usize::try_from(row.try_get::<i64, _>("members")?.max(1)).unwrap_or(1);
            shares.rank = usize::try_from(row.try_get::<i64, _>("rank")?).unwrap_or(0);
            if !partitions.contains(&tp) {
                continue; // a topic this member does not consume
            }
            shares.total += 1;
            if !row.try_get::<bool, _>("locked")? {
                shares.free.push((tp, row.try_get::<i32, _>("id")?));
            }
        }
        Ok(shares)
    }

    /// Takes the free partition whose lock key is `key`: `Some(next offset)` if this member got
    /// its lock, `None` if another member was faster.
    async fn take(
        &self,
        session: &mut PgConnection,
        key: i32,
    ) -> Result<Option<Option<i64>>, sqlx::Error> {
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
            .bind(PARTITION_LOCK_CLASS)
            .bind(key)
            .fetch_one(&mut *session)
            .await?;
        if !locked {
            return Ok(None);
        }
        // Taking `owner` waits for a commit of the previous owner still in flight, and reads
        // the offset that commit wrote.
        let next: Option<i64> = sqlx::query_scalar(
            "UPDATE consumer_partitions SET owner = $1, owned_since = now() \
             WHERE id = $2 RETURNING next_offset",
        )
        .bind(&self.member)
        .bind(key)
        .fetch_one(&mut *session)
        .await?;
        Ok(Some(next))
    }
}

/// What one reading of the group's rows found (see `Membership::read_shares`).
#[derive(Default)]
struct Shares {
    /// The group's partitions this member consumes.
    total: usize,
    members: usize,
    rank: usize,
    /// Partitions whose lock nobody holds, with their lock key.
    free: Vec<(TopicPartition, i32)>,
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
        // Members of different releases must lock the same key: the hash may never change.
        assert_eq!(group_key("acme-webhooks"), 0x5263_1bd4);
        assert_eq!(group_key(""), 0x011c_9dc5);
        assert_ne!(group_key("a"), group_key("b"));
        assert!(group_key("anything") >= 0);
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
