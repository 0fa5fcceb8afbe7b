//! Why a batch or a message was not applied, and what kind of database failure it was: the
//! classes decide whether the consumer retries, isolates the batch's messages, or gives up on
//! one message (docs: "Poison messages").
use sea_orm::DbErr;

/// Why a batch was not applied; nothing of it was written.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// The database failed; its [`ErrorClass`] says whether a retry can help.
    #[error("database: {0}")]
    Database(#[from] DbErr),
    /// Another member owns some of the batch's partitions now: drop them, do not retry.
    #[error(transparent)]
    Fenced(#[from] Fenced),
}

/// Some partitions of a batch are owned by another member now.
#[derive(Debug, thiserror::Error)]
#[error("partitions no longer owned by this member: {0:?}")]
pub struct Fenced(pub Vec<String>);

/// Why a message can never be applied (a retry would fail the same way): its event is marked
/// `failed` with this text, and the message is dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unappliable {
    #[error("payload is not JSON: {0}")]
    NotJson(String),
    /// The payload is JSON but not a contact event: the offending fields.
    #[error("event payload: {0}")]
    Payload(String),
    #[error("message carries no event id")]
    NoEventId,
    #[error("unknown event id {0}")]
    UnknownEvent(String),
    /// The database refused to store it (a data exception, a constraint), found by applying its
    /// batch one message at a time.
    #[error("the database refused it ({class}): {error}", class = .class.as_str())]
    Refused { class: ErrorClass, error: String },
}

/// What kind of database failure stopped a batch, which decides what the consumer does next
/// (docs: "Poison messages"). On PostgreSQL it is read off the SQLSTATE; on SQLite off its
/// result code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// The database is unreachable or going away: no answer, a broken or refused connection, a
    /// pool timeout, SQLSTATE classes 08 (connection), 53 (insufficient resources), 57
    /// (operator intervention: shutdown, cannot connect now), 58 (system error) and 55000 (the
    /// database does not accept connections). Retried with backoff, for as long as it lasts,
    /// without moving the position.
    Unavailable,
    /// A lost race: class 40 (serialization failure, deadlock) and 55P03 (lock not available);
    /// SQLite's busy and locked. Retried with backoff.
    Conflict,
    /// Class 22, data exception: a value the columns cannot hold. Retrying cannot help: the
    /// batch is applied one message at a time and the offending event is failed and
    /// dead-lettered.
    Data,
    /// Class 23, integrity constraint violation (SQLite's constraint codes): as `Data`.
    Integrity,
    /// Anything else the server refused (a bug, a schema change). Retried; a batch that fails
    /// the same way [`super::retry::ISOLATE_AFTER`] times in a row is applied one message
    /// at a time as for `Data`.
    Other,
}

impl ErrorClass {
    pub fn of(error: &sea_orm::DbErr) -> Self {
        use sea_orm::{DbErr, RuntimeErr, sqlx};
        let sqlx_error = match error {
            DbErr::Conn(_) | DbErr::ConnectionAcquire(_) => return Self::Unavailable,
            DbErr::Exec(RuntimeErr::SqlxError(e)) | DbErr::Query(RuntimeErr::SqlxError(e)) => e,
            _ => return Self::Other,
        };
        match sqlx_error.as_ref() {
            sqlx::Error::Database(db) => {
                let code = db.code().unwrap_or_default();
                if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                    Self::of_sqlite(&code)
                } else {
                    Self::of_sqlstate(&code)
                }
            }
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::BeginFailed => Self::Unavailable,
            _ => Self::Other,
        }
    }

    fn of_sqlstate(code: &str) -> Self {
        match code {
            "55000" => Self::Unavailable, // object not in prerequisite state: no connections now
            "55P03" => Self::Conflict,    // lock not available
            _ => match code.get(..2) {
                Some("08" | "53" | "57" | "58") => Self::Unavailable,
                Some("40") => Self::Conflict,
                Some("22") => Self::Data,
                Some("23") => Self::Integrity,
                _ => Self::Other,
            },
        }
    }

    /// SQLite's (extended) result codes: the primary code is the low byte.
    fn of_sqlite(code: &str) -> Self {
        match code.parse::<u32>().map(|c| c & 0xff) {
            Ok(5 | 6) => Self::Conflict,           // SQLITE_BUSY, SQLITE_LOCKED
            Ok(19) => Self::Integrity,             // SQLITE_CONSTRAINT
            Ok(18 | 20 | 25) => Self::Data,        // SQLITE_TOOBIG, SQLITE_MISMATCH, SQLITE_RANGE
            Ok(10 | 13 | 14) => Self::Unavailable, // SQLITE_IOERR, SQLITE_FULL, SQLITE_CANTOPEN
            _ => Self::Other,
        }
    }

    /// Retrying the same batch cannot succeed: find the offending message now.
    pub fn is_poison(self) -> bool {
        matches!(self, Self::Data | Self::Integrity)
    }

    /// Says nothing about the batch: retry it as it is, never fail an event for it.
    pub fn is_transient(self) -> bool {
        matches!(self, Self::Unavailable | Self::Conflict)
    }

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unavailable => "unavailable",
            Self::Conflict => "conflict",
            Self::Data => "data",
            Self::Integrity => "integrity",
            Self::Other => "other",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ErrorClass;

    #[test]
    fn sqlstates_are_classed_by_what_a_retry_can_do() {
        for (code, class) in [
            ("22007", ErrorClass::Data),
            ("22008", ErrorClass::Data),
            ("23505", ErrorClass::Integrity),
            ("23514", ErrorClass::Integrity),
            ("40001", ErrorClass::Conflict),
            ("40P01", ErrorClass::Conflict),
            ("55P03", ErrorClass::Conflict),
            ("57P01", ErrorClass::Unavailable),
            ("08006", ErrorClass::Unavailable),
            ("55000", ErrorClass::Unavailable),
            ("53300", ErrorClass::Unavailable),
            ("42P01", ErrorClass::Other),
        ] {
            assert_eq!(ErrorClass::of_sqlstate(code), class, "{code}");
        }
        assert_eq!(ErrorClass::of_sqlite("2067"), ErrorClass::Integrity);
        assert_eq!(ErrorClass::of_sqlite("517"), ErrorClass::Conflict);
    }
}
