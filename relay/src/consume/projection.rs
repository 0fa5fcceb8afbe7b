//! `contacts`: our mirror of AcmeCRM, a function of the SET of events applied to each contact,
//! whatever order or how many times they were delivered.
//!
//! Every event of a contact has a place in one total order, its version
//! ([`ContactEvent::version`]). The stored row is the state the greatest event of that order
//! describes; an event below it changes nothing.
//! A tombstone erases the personal fields and keeps only the contact id, when and by which event
//! it was deleted, so it does not depend on which version happened to arrive before the delete.
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DatabaseBackend, DbErr, Statement, Value as SqlValue};
use serde::Serialize;
use serde_json::{Value, json};

use crate::event::{ContactEvent, rfc3339_field};
use crate::sql::placeholders;

impl<'a> From<&'a ContactEvent> for ContactRow<'a> {
    /// The `contacts` row `event` describes when it is the greatest of its contact, borrowing
    /// from the event (a tombstone's `data` is the one value made anew).
    fn from(event: &'a ContactEvent) -> Self {
        let data = event.data();
        let deletion = event.is_deletion();
        let text = |field: &str| {
            (!deletion)
                .then(|| data.get(field).and_then(Value::as_str))
                .flatten()
        };
        Self {
            id: &event.contact_id,
            email: text("email"),
            first_name: text("firstName"),
            last_name: text("lastName"),
            phone: text("phone"),
            company: text("company"),
            title: text("title"),
            data: if deletion {
                Cow::Owned(json!({ "id": event.contact_id }))
            } else {
                Cow::Borrowed(data)
            },
            source_created_at: (!deletion)
                .then(|| rfc3339_field(data, "createdAt"))
                .flatten(),
            source_updated_at: event.updated_at,
            event_timestamp: event.timestamp,
            last_event_id: &event.event_id,
            deleted: deletion,
            deleted_at: deletion.then_some(event.timestamp),
        }
    }
}

/// A `contacts` row as the projection writes it (without the bookkeeping `updated_at`),
/// borrowed from the event it comes from.
#[derive(Debug, Clone, PartialEq)]
pub struct ContactRow<'a> {
    pub id: &'a str,
    pub email: Option<&'a str>,
    pub first_name: Option<&'a str>,
    pub last_name: Option<&'a str>,
    pub phone: Option<&'a str>,
    pub company: Option<&'a str>,
    pub title: Option<&'a str>,
    pub data: Cow<'a, Value>,
    pub source_created_at: Option<DateTime<Utc>>,
    pub source_updated_at: Option<DateTime<Utc>>,
    pub event_timestamp: DateTime<Utc>,
    pub last_event_id: &'a str,
    pub deleted: bool,
    pub deleted_at: Option<DateTime<Utc>>,
}

/// What applying an event did to `contacts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The contact now reflects this event.
    Changed,
    /// A greater version (or a tombstone) is stored or came in the same batch; nothing changed.
    Stale,
}

/// The greatest change of each contact among `changes`, ordered by contact id (the order rows
/// are locked in, so concurrent batches cannot deadlock on `contacts`).
pub fn greatest_per_contact<'a>(
    changes: impl IntoIterator<Item = &'a ContactEvent>,
) -> Vec<&'a ContactEvent> {
    let mut greatest: BTreeMap<&str, &ContactEvent> = BTreeMap::new();
    for change in changes {
        greatest
            .entry(change.contact_id.as_str())
            .and_modify(|current| {
                if change.version() > current.version() {
                    *current = change;
                }
            })
            .or_insert(change);
    }
    greatest.into_values().collect()
}

/// The columns the projection writes, with the PostgreSQL type each one is read as from the
/// upsert's document; `updated_at`, the time of the batch, comes last.
const COLUMNS: [(&str, &str); 14] = [
    ("id", "text"),
    ("email", "text"),
    ("first_name", "text"),
    ("last_name", "text"),
    ("phone", "text"),
    ("company", "text"),
    ("title", "text"),
    ("data", "jsonb"),
    ("source_created_at", "timestamptz"),
    ("source_updated_at", "timestamptz"),
    ("event_timestamp", "timestamptz"),
    ("last_event_id", "text"),
    ("deleted", "boolean"),
    ("deleted_at", "timestamptz"),
];

/// Applies `changes` inside the caller's transaction with ONE statement: an upsert of the
/// greatest change of each contact that overwrites a stored row only when it is greater in the
/// total order (the comparison runs on the locked, newest row, so concurrent consumers agree).
/// Returns the event ids that are now the state of their contact.
pub async fn apply<C: ConnectionTrait>(
    conn: &C,
    changes: &[&ContactEvent],
) -> Result<BTreeSet<String>, DbErr> {
    let rows: Vec<ContactRow<'_>> = greatest_per_contact(changes.iter().copied())
        .into_iter()
        .map(ContactRow::from)
        .collect();
    if rows.is_empty() {
        return Ok(BTreeSet::new());
    }
    let backend = conn.get_database_backend();
    let (sql, values) = match backend {
        DatabaseBackend::Postgres => (POSTGRES_UPSERT.clone(), document_values(&rows)?),
        _ => values_upsert(backend, rows),
    };
    let changed = conn
        .query_all_raw(Statement::from_sql_and_values(backend, sql, values))
        .await?;
    changed
        .iter()
        .map(|row| row.try_get_by_index::<String>(0))
        .collect()
}

/// The upsert of `apply`, reading its rows from `source` (a `VALUES` list or a `SELECT`).
fn upsert_sql(backend: DatabaseBackend, source: &str) -> String {
    // Event ids compare byte by byte, as Rust's `String` does (`greatest_per_contact`): a
    // PostgreSQL column compares by its locale's collation, which orders ids differently.
    let bytewise = match backend {
        DatabaseBackend::Postgres => " COLLATE \"C\"",
        _ => "", // SQLite compares text bytewise (BINARY) already
    };
    let version = |table: &str| {
        format!(
            "({table}.deleted, COALESCE({table}.source_updated_at, {table}.event_timestamp), \
             {table}.event_timestamp, {table}.last_event_id{bytewise})"
        )
    };
    let names = COLUMNS.map(|(name, _)| name);
    let updates: Vec<String> = names[1..]
        .iter()
        .chain(&["updated_at"])
        .map(|c| format!("{c} = excluded.{c}"))
        .collect();
    // Row values, ON CONFLICT ... WHERE and RETURNING: PostgreSQL and SQLite run both.
    format!(
        "INSERT INTO contacts ({}, updated_at) {source} ON CONFLICT (id) DO UPDATE SET {} \
         WHERE {} > {} RETURNING last_event_id",
        names.join(", "),
        updates.join(", "),
        version("excluded"),
        version("contacts"),
    )
}

/// PostgreSQL's upsert, built once: $1 the rows as ONE JSON document read by
/// `jsonb_to_recordset`, $2 the time, $3 the rows' instants as one typed `timestamptz[]`, so it
/// has one text (one prepared statement per connection) whatever the batch size (see `sql`).
/// Instants travel as bound timestamps, never as text PostgreSQL would parse again: in the
/// document a timestamp column holds the instant's index in $3 (`null` for none). Rows go in
/// contact-id order, bytewise like `greatest_per_contact`: the order they are locked in.
static POSTGRES_UPSERT: LazyLock<String> = LazyLock::new(|| {
    let is_instant = |pg_type: &str| pg_type == "timestamptz";
    let typed = COLUMNS.map(|(name, pg_type)| {
        format!(
            "{name} {}",
            if is_instant(pg_type) { "int4" } else { pg_type }
        )
    });
    let selected = COLUMNS.map(|(name, pg_type)| {
        if is_instant(pg_type) {
            format!("($3::timestamptz[])[r.{name}]")
        } else {
            format!("r.{name}")
        }
    });
    let source = format!(
        "SELECT {}, $2 FROM jsonb_to_recordset($1::jsonb) AS r({}) ORDER BY r.id COLLATE \"C\"",
        selected.join(", "),
        typed.join(", "),
    );
    upsert_sql(DatabaseBackend::Postgres, &source)
});

/// One row of [`POSTGRES_UPSERT`]'s document: the row's columns, its instants as 1-based
/// indexes into the statement's `timestamptz[]`.
#[derive(Serialize)]
struct DocumentRow<'a> {
    id: &'a str,
    email: Option<&'a str>,
    first_name: Option<&'a str>,
    last_name: Option<&'a str>,
    phone: Option<&'a str>,
    company: Option<&'a str>,
    title: Option<&'a str>,
    data: &'a Value,
    source_created_at: Option<usize>,
    source_updated_at: Option<usize>,
    event_timestamp: usize,
    last_event_id: &'a str,
    deleted: bool,
    deleted_at: Option<usize>,
}

/// The parameters of [`POSTGRES_UPSERT`].
fn document_values(rows: &[ContactRow<'_>]) -> Result<Vec<SqlValue>, DbErr> {
    let mut instants: Vec<DateTime<Utc>> = Vec::with_capacity(rows.len() * 3);
    let mut index = |at: DateTime<Utc>| {
        instants.push(at);
        instants.len() // PostgreSQL arrays count from 1
    };
    let document: Vec<DocumentRow<'_>> = rows
        .iter()
        .map(|row| DocumentRow {
            id: row.id,
            email: row.email,
            first_name: row.first_name,
            last_name: row.last_name,
            phone: row.phone,
            company: row.company,
            title: row.title,
            data: &row.data,
            source_created_at: row.source_created_at.map(&mut index),
            source_updated_at: row.source_updated_at.map(&mut index),
            event_timestamp: index(row.event_timestamp),
            last_event_id: row.last_event_id,
            deleted: row.deleted,
            deleted_at: row.deleted_at.map(&mut index),
        })
        .collect();
    let document = serde_json::to_string(&document).map_err(|e| DbErr::Custom(e.to_string()))?;
    Ok(vec![document.into(), Utc::now().into(), instants.into()])
}

/// Any other database (SQLite): the upsert over `VALUES` with one row of placeholders per
/// contact, and its parameters.
fn values_upsert(backend: DatabaseBackend, rows: Vec<ContactRow<'_>>) -> (String, Vec<SqlValue>) {
    let now = Utc::now();
    let width = COLUMNS.len() + 1;
    let mut values: Vec<SqlValue> = Vec::with_capacity(rows.len() * width);
    let mut tuples = Vec::with_capacity(rows.len());
    for row in rows {
        tuples.push(placeholders(values.len(), width));
        values.extend([
            row.id.into(),
            row.email.into(),
            row.first_name.into(),
            row.last_name.into(),
            row.phone.into(),
            row.company.into(),
            row.title.into(),
            row.data.into_owned().into(),
            row.source_created_at.into(),
            row.source_updated_at.into(),
            row.event_timestamp.into(),
            row.last_event_id.into(),
            row.deleted.into(),
            row.deleted_at.into(),
            now.into(),
        ]);
    }
    let source = format!("VALUES {}", tuples.join(", "));
    (upsert_sql(backend, &source), values)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(event: &str, id: &str, updated_minute: Option<u32>, ts_minute: u32) -> ContactEvent {
        let at = |m: u32| format!("2025-05-19T10:{m:02}:00Z");
        let mut data = json!({
            "id": "c1", "email": format!("{id}@example.com"), "firstName": "Jane",
            "lastName": "Doe", "createdAt": at(0),
        });
        if let Some(m) = updated_minute {
            data["updatedAt"] = json!(at(m));
        }
        ContactEvent::parse_stored(json!({
            "id": id, "event": event, "timestamp": at(ts_minute), "data": data,
        }))
        .expect("valid")
    }

    #[test]
    fn a_deletion_outranks_any_update_and_ties_fall_to_the_event_id() {
        let update = change("contact.updated", "e1", Some(30), 30);
        let older_delete = change("contact.deleted", "e2", None, 1);
        assert!(older_delete.version() > update.version());
        let twin = change("contact.updated", "e0", Some(30), 30);
        assert!(update.version() > twin.version());
        let picked = greatest_per_contact([&twin, &update, &older_delete]);
        assert_eq!(picked.len(), 1);
        assert_eq!(picked[0].event_id, "e2");
    }

    #[test]
    fn a_tombstone_keeps_no_personal_field() {
        let deleted = change("contact.deleted", "e9", None, 5);
        let row = ContactRow::from(&deleted);
        assert!(row.deleted);
        assert_eq!(row.email, None);
        assert_eq!(*row.data, json!({ "id": "c1" }));
        assert_eq!(row.deleted_at, Some(row.event_timestamp));
    }
}
