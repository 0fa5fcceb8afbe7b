//! Partition ownership and consumer offsets kept in PostgreSQL, next to the work they describe,
//! and a per-event count of safety-net re-publishes.
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum ConsumerPartitions {
    Table,
    Id,
    GroupId,
    Topic,
    Partition,
    NextOffset,
    Owner,
    OwnedSince,
    CommittedAt,
    HighWatermark,
    WatermarkAt,
}

#[derive(DeriveIden)]
enum Outbox {
    Table,
    Republished,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(ConsumerPartitions::Table)
                    .if_not_exists()
                    // The id is the partition's advisory-lock key: an int4, unique per database.
                    .col(
                        ColumnDef::new(ConsumerPartitions::Id)
                            .integer()
                            .not_null()
                            .auto_increment()
                            .primary_key(),
                    )
                    .col(
                        ColumnDef::new(ConsumerPartitions::GroupId)
                            .text()
                            .not_null(),
                    )
                    .col(ColumnDef::new(ConsumerPartitions::Topic).text().not_null())
                    .col(
                        ColumnDef::new(ConsumerPartitions::Partition)
                            .integer()
                            .not_null(),
                    )
                    // The first offset not yet applied; NULL: nothing applied yet.
                    .col(
                        ColumnDef::new(ConsumerPartitions::NextOffset)
                            .big_integer()
                            .null(),
                    )
                    // The member that holds the partition's lock: the fencing token every
                    // offset commit checks.
                    .col(ColumnDef::new(ConsumerPartitions::Owner).text().null())
                    .col(
                        ColumnDef::new(ConsumerPartitions::OwnedSince)
                            .timestamp_with_time_zone()
                            .null(),
                    )
                    .col(
                        ColumnDef::new(ConsumerPartitions::CommittedAt)
                            .timestamp_with_time_zone()
                            .null(),
                    )
                    .col(
                        ColumnDef::new(ConsumerPartitions::HighWatermark)
                            .big_integer()
                            .null(),
                    )
                    .col(
                        ColumnDef::new(ConsumerPartitions::WatermarkAt)
                            .timestamp_with_time_zone()
                            .null(),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("consumer_partitions_key")
                    .table(ConsumerPartitions::Table)
                    .col(ConsumerPartitions::GroupId)
                    .col(ConsumerPartitions::Topic)
                    .col(ConsumerPartitions::Partition)
                    .unique()
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(Outbox::Table)
                    .add_column(
                        ColumnDef::new(Outbox::Republished)
                            .integer()
                            .not_null()
                            .default(0),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Outbox::Table)
                    .drop_column(Outbox::Republished)
                    .to_owned(),
            )
            .await?;
        manager
            .drop_table(Table::drop().table(ConsumerPartitions::Table).to_owned())
            .await
    }
}
