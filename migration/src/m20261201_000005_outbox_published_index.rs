//! Retention deletes published outbox rows oldest first: index them by publication time. Partial,
//! so unpublished rows (the relay's hot set) cost nothing here; the relay's update that publishes
//! a row already writes new index entries (it changes the other partial index's predicate).
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // Same syntax on Postgres and SQLite.
        manager
            .get_connection()
            .execute_unprepared(
                "CREATE INDEX IF NOT EXISTS outbox_published_idx \
                 ON outbox (published_at, id) WHERE published_at IS NOT NULL",
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared("DROP INDEX IF EXISTS outbox_published_idx")
            .await?;
        Ok(())
    }
}
