//! An outbox row no longer copies its event's payload on PostgreSQL: the relay reads the payload
//! from `webhook_events` when it publishes. The copy was 1.6 KB of the 5.4 KB of WAL an event
//! cost (written at ingest, then again by the relay's update, which rewrites the whole row).
//! Rows stored before keep their copy, and it is the one published. SQLite cannot drop a NOT
//! NULL without rebuilding the table, so the embedded mode keeps writing the copy.
use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DatabaseBackend;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() == DatabaseBackend::Postgres {
            manager
                .get_connection()
                .execute_unprepared("ALTER TABLE outbox ALTER COLUMN payload DROP NOT NULL")
                .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() == DatabaseBackend::Postgres {
            let db = manager.get_connection();
            db.execute_unprepared(
                "UPDATE outbox o SET payload = e.payload FROM webhook_events e \
                 WHERE o.payload IS NULL AND e.event_id = o.event_id",
            )
            .await?;
            db.execute_unprepared("ALTER TABLE outbox ALTER COLUMN payload SET NOT NULL")
                .await?;
        }
        Ok(())
    }
}
