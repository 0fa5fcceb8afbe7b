//! Waking the relay: an in-process signal from the ingest writers, Postgres LISTEN/NOTIFY from
//! other processes, and a fallback poll. Notifications only cut latency; the poll guarantees
//! progress if one is lost.
//!
//! The relay loops of a process share ONE listening connection: whichever loop waits holds it,
//! the others wait for the in-process signal or the poll. With a connection per loop every
//! commit woke every loop, and all but one claimed nothing: at 4000 events/s with every role in
//! one process, 5,500 of 8,900 claims (a transaction each) found no row. For the same reason
//! the in-process signal is only sent while no listener is connected: the NOTIFY of the same
//! commit wakes a loop anyway, and both would make two claims of one commit.
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sea_orm::sqlx::postgres::PgListener;
use sea_orm::{DatabaseBackend, DatabaseConnection};
use tokio::sync::{Mutex, Notify};

use crate::outbox::NOTIFY_CHANNEL;

/// Shared in-process wake-up signal and the process's LISTEN connection; cheap to clone.
#[derive(Clone, Default)]
pub struct OutboxWakeup {
    local: Arc<Notify>,
    /// Connected by the first waiter on PostgreSQL; `None` elsewhere or when LISTEN failed.
    listener: Arc<Mutex<Option<PgListener>>>,
    /// Whether `listener` is connected: then a commit's NOTIFY wakes a loop, and the in-process
    /// signal would only add a second, empty claim.
    listening: Arc<AtomicBool>,
}

impl OutboxWakeup {
    /// Called after a commit that wrote outbox rows.
    pub fn notify_local(&self) {
        if !self.listening.load(Ordering::Relaxed) {
            self.local.notify_one();
        }
    }

    /// A waiter for one relay loop; the first one on PostgreSQL connects the shared listener.
    pub async fn waiter(&self, db: &DatabaseConnection) -> Waiter {
        let mut listener = self.listener.lock().await;
        if listener.is_none() && db.get_database_backend() == DatabaseBackend::Postgres {
            match listen(db).await {
                Ok(connected) => {
                    *listener = Some(connected);
                    self.listening.store(true, Ordering::Relaxed);
                }
                Err(error) => {
                    tracing::warn!(%error, "LISTEN failed; the relay falls back to polling");
                }
            }
        }
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
