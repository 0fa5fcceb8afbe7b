//! Statement shapes of the batch paths.
//!
//! sqlx prepares every distinct statement text once per connection and keeps it (up to 100 per
//! connection, each with its parameter and column metadata); PostgreSQL keeps its own copy in the
//! connection's backend. A statement whose text grows with its batch (`IN ($1, ..., $n)`, one
//! `VALUES` row per item) is a new statement for every batch size on every connection: the
//! consumer's and relay's batch statements filled those caches with thousands of variants (the
//! contacts upsert alone had up to 3,840 parameters): after a minute at 3000 events/s with every
//! role in one process they held about 50 MB (peak RSS 113-117 MB, 64-68 MB without them, and
//! e2e p99 374-571 ms against 203-237 ms). On PostgreSQL every batch statement
//! therefore has ONE text whatever the batch size: a list travels as one array parameter, rows
//! as one JSON document (like the ingest batch). SQLite, one writer and the embedded mode, keeps
//! the plain lists.
use chrono::{DateTime, Utc};
use sea_orm::sea_query::Expr;
use sea_orm::sea_query::postgres_array::NotU8;
use sea_orm::{ColumnTrait, DatabaseBackend, DbErr, Value};

/// `column = ANY($1)` on PostgreSQL: one array parameter, one statement whatever the count;
/// `column IN (...)` elsewhere.
pub fn one_of<C, V>(
    backend: DatabaseBackend,
    column: C,
    values: impl IntoIterator<Item = V>,
) -> Expr
where
    C: ColumnTrait,
    V: Into<Value> + NotU8,
{
    match backend {
        DatabaseBackend::Postgres => column.eq_any(values),
        _ => column.is_in(values),
    }
}

/// The row-lock clause of a pruning statement over table alias `alias`: `FOR UPDATE OF alias SKIP
/// LOCKED` on PostgreSQL; nothing on SQLite (embedded mode), which has one writer and no row
/// locks, so the same statement runs there without them.
pub(crate) fn skip_locked(backend: DatabaseBackend, alias: &str) -> String {
    match backend {
        DatabaseBackend::Postgres => format!("FOR UPDATE OF {alias} SKIP LOCKED"),
        _ => String::new(),
    }
}

/// `($first+1, ..., $first+n)`: `$n` placeholders, which PostgreSQL and SQLite both take.
pub(crate) fn placeholders(first: usize, n: usize) -> String {
    let list: Vec<String> = (first + 1..=first + n).map(|i| format!("${i}")).collect();
    format!("({})", list.join(", "))
}

/// Where the next batch of a pruning run starts: after the last row the previous batch deleted
/// (its time, then id, in the order of the index the run walks), so a batch never walks the
/// index entries of rows deleted before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PruneCursor {
    pub at: DateTime<Utc>,
    pub id: i64,
}

impl PruneCursor {
    pub const START: Self = Self {
        at: DateTime::UNIX_EPOCH,
        id: 0,
    };

    /// The cursor after `rows` (each `(time, id)`, as a pruning statement returns them).
    pub fn after(self, rows: &[sea_orm::QueryResult]) -> Result<Self, DbErr> {
        let mut next = self;
        for row in rows {
            let at = Self {
                at: row.try_get_by_index(0)?,
                id: row.try_get_by_index(1)?,
            };
            next = next.max(at);
        }
        Ok(next)
    }
}
