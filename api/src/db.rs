//! Database connection and migrations.
use std::time::Duration;

use migration::{Migrator, MigratorTrait};
use sea_orm::{ConnectOptions, Database, DatabaseConnection, DbErr};

use crate::config::Config;

/// Connects to the configured database (creating the embedded SQLite file and its directory).
pub async fn connect(config: &Config) -> Result<DatabaseConnection, DbErr> {
    let url = config.database_url();
    let embedded = config.is_embedded_database();
    if embedded {
        std::fs::create_dir_all(&config.database.data_dir).map_err(|e| {
            DbErr::Custom(format!(
                "cannot create {}: {e}",
                config.database.data_dir.display()
            ))
        })?;
    }
    let mut options = ConnectOptions::new(url);
    options
        // SQLite has one writer; a single connection serialises the embedded mode simply.
        .max_connections(if embedded {
            1
        } else {
            config.database.max_connections
        })
        .min_connections(if embedded { 1 } else { 2 })
        .connect_timeout(Duration::from_secs(5))
        .acquire_timeout(Duration::from_secs(10))
        // sqlx pings a connection on every checkout by default: a round trip (and a wake-up of
        // its backend) in front of every ingest batch and every relay and consumer transaction.
        // Only a connection idle long enough to have been dropped by the server or a proxy is
        // pinged; a broken hot connection fails its statement, which every caller retries.
        .test_before_acquire_if_idle_for(Duration::from_secs(30))
        .sqlx_logging(false);
    Database::connect(options).await
}

/// Applies pending migrations.
pub async fn migrate(db: &DatabaseConnection) -> Result<(), DbErr> {
    Migrator::up(db, None).await
}
