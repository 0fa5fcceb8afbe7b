//! Waking the relay: an in-process signal from the ingest writers, Postgres LISTEN/NOTIFY from
//! other processes, and a fallback poll. Notifications only cut latency; the poll guarantees
//! progress if one is lost.
use std::sync::Arc;
use std::time::Duration;

use sea_orm::sqlx::postgres::PgListener;
use sea_orm::{DatabaseBackend, DatabaseConnection};
use tokio::sync::Notify;

use crate::outbox::NOTIFY_CHANNEL;

/// Shared in-process wake-up signal; cheap to clone.
#[derive(Clone, Default)]
pub struct OutboxWakeup {
    local: Arc<Notify>,
}

impl OutboxWakeup {
    /// Called after a commit that wrote outbox rows.
    pub fn notify_local(&self) {
        self.local.notify_one();
    }

    /// A waiter for one relay.
    pub async fn waiter(&self, db: &DatabaseConnection) -> Waiter {
        let listener = if db.get_database_backend() == DatabaseBackend::Postgres {
            match listen(db).await {
                Ok(listener) => Some(listener),
                Err(error) => {
                    tracing::warn!(%error, "LISTEN failed; the relay falls back to polling");
                    None
                }
            }
        } else {
            None
        };
        Waiter {
            local: self.local.clone(),
            listener,
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
    local: Arc<Notify>,
    listener: Option<PgListener>,
}

impl Waiter {
    /// Returns on a local signal, a NOTIFY, or after `poll`, whichever comes first.
    pub async fn wait(&mut self, poll: Duration) {
        let notified = async {
            match self.listener.as_mut() {
                Some(listener) => {
                    if let Err(error) = listener.recv().await {
                        // PgListener reconnects by itself on the next recv; don't spin meanwhile.
                        tracing::debug!(%error, "LISTEN connection lost");
                        tokio::time::sleep(poll).await;
                    }
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = self.local.notified() => {}
            () = notified => {}
            () = tokio::time::sleep(poll) => {}
        }
    }
}
