//! Waking the relay: an in-process signal from the ingest writers, Postgres LISTEN/NOTIFY from
//! other processes, and a fallback poll. Notifications only cut latency; the poll guarantees
//! progress if one is lost.
//!
//! The ingest transaction does not NOTIFY: PostgreSQL serialises the commits of notifying
//! transactions (a lock taken before the commit record and held until it is flushed), so
//! concurrent ingest commits could not share a WAL flush. A writer whose process runs relay
//! loops signals them in-process; one that does not (a serve-only process) asks for a NOTIFY
//! that is sent after the commit, on its own, committed without waiting for the flush, and
//! coalesced: at most one in flight, and the commits made meanwhile share the next.
//!
//! The relay loops of a process share ONE listening connection: whichever loop waits holds it,
//! the others wait for the in-process signal or the poll. (With a connection per loop every
//! commit woke every loop.)
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use sea_orm::sqlx::postgres::PgListener;
use sea_orm::{ConnectionTrait, DatabaseBackend, DatabaseConnection, Statement};
use tokio::sync::{Mutex, Notify};

use crate::outbox::NOTIFY_CHANNEL;

/// Shared in-process wake-up signal and the process's LISTEN connection; cheap to clone.
#[derive(Clone, Default)]
pub struct OutboxWakeup {
    local: Arc<Notify>,
    /// Connected by the first waiter on PostgreSQL; `None` elsewhere or when LISTEN failed.
    listener: Arc<Mutex<Option<PgListener>>>,
    /// Relay loops of this process (live [`Waiter`]s): while there are any, a commit signals
    /// them in-process and sends no NOTIFY.
    loops: Arc<AtomicUsize>,
    /// The NOTIFY asked for by commits of a process without relay loops.
    remote: Arc<std::sync::Mutex<RemoteNotify>>,
}

/// At most one NOTIFY in flight; `pending` when a commit came while it was.
#[derive(Default)]
struct RemoteNotify {
    in_flight: bool,
    pending: bool,
}

/// One NOTIFY as a transaction of its own, committed without waiting for the WAL flush (a lost
/// notification costs one poll interval, never an event), so the lock PostgreSQL holds over a
/// notifying commit is held for microseconds.
static NOTIFY_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT set_config('synchronous_commit', 'off', true), pg_notify('{NOTIFY_CHANNEL}', '')"
    )
});

impl OutboxWakeup {
    /// Called after a commit that wrote outbox rows: signals this process's relay loops, or,
    /// where there are none, has the relays of other processes notified on `db`.
    pub fn committed(&self, db: &DatabaseConnection) {
        if self.loops.load(Ordering::Relaxed) > 0 {
            self.local.notify_one();
        } else if db.get_database_backend() == DatabaseBackend::Postgres {
            self.notify_remote(db);
        }
    }

    /// Sends a NOTIFY unless one is in flight, in which case one more follows it.
    fn notify_remote(&self, db: &DatabaseConnection) {
        {
            let mut state = self.remote.lock().expect("wake-up state");
            if state.in_flight {
                state.pending = true;
                return;
            }
            state.in_flight = true;
        }
        let remote = self.remote.clone();
        let db = db.clone();
        tokio::spawn(async move {
            loop {
                let sent = db
                    .execute_raw(Statement::from_string(
                        DatabaseBackend::Postgres,
                        NOTIFY_SQL.as_str(),
                    ))
                    .await;
                if let Err(error) = sent {
                    tracing::debug!(%error, "NOTIFY failed; the relays' poll finds the rows");
                }
                let mut state = remote.lock().expect("wake-up state");
                if !std::mem::take(&mut state.pending) {
                    state.in_flight = false;
                    return;
                }
            }
        });
    }

    /// A waiter for one relay loop; the first one on PostgreSQL connects the shared listener.
    pub async fn waiter(&self, db: &DatabaseConnection) -> Waiter {
        let mut listener = self.listener.lock().await;
        if listener.is_none() && db.get_database_backend() == DatabaseBackend::Postgres {
            match listen(db).await {
                Ok(connected) => *listener = Some(connected),
                Err(error) => {
                    tracing::warn!(%error, "LISTEN failed; the relay falls back to polling");
                }
            }
        }
        self.loops.fetch_add(1, Ordering::Relaxed);
        Waiter {
            wakeup: self.clone(),
        }
    }
}

async fn listen(db: &DatabaseConnection) -> Result<PgListener, sea_orm::sqlx::Error> {
    let mut listener = PgListener::connect_with(db.get_postgres_connection_pool()).await?;
    listener.listen(NOTIFY_CHANNEL).await?;
    Ok(listener)
}

/// Waits for the next reason to look at the outbox.
pub struct Waiter {
    wakeup: OutboxWakeup,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.wakeup.loops.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Waiter {
    /// Returns on a local signal, a NOTIFY, or after `poll`, whichever comes first.
    pub async fn wait(&mut self, poll: Duration) {
        let notified = async {
            let mut guard = self.wakeup.listener.lock().await;
            let Some(listener) = guard.as_mut() else {
                return std::future::pending().await;
            };
            if let Err(error) = listener.recv().await {
                // PgListener reconnects by itself on the next recv; don't spin meanwhile. The
                // commits notified while it was gone are found by the poll.
                tracing::debug!(%error, "LISTEN connection lost");
                tokio::time::sleep(poll).await;
            }
            // The batch that follows sees every commit notified so far: drop the notifications
            // that arrived meanwhile, or each would wake a loop for a claim of its own.
            while listener.next_buffered().is_some() {}
        };
        tokio::select! {
            () = self.wakeup.local.notified() => {}
            () = notified => {}
            () = tokio::time::sleep(poll) => {}
        }
    }
}
