use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum WebhookEvents {
    Table,
    Id,
    EventId,
    EventType,
    ContactId,
    Payload,
    Status,
    Attempts,
    Error,
    CreatedAt,
    UpdatedAt,
    ProcessedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(WebhookEvents::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(WebhookEvents::Id)
                            .big_integer()
                            .not_null()
                            .auto_increment()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(WebhookEvents::EventId).string_len(255).not_null())
                    .col(ColumnDef::new(WebhookEvents::EventType).string_len(64).not_null())
                    .col(ColumnDef::new(WebhookEvents::ContactId).string_len(255).not_null())
                    .col(ColumnDef::new(WebhookEvents::Payload).json_binary().not_null())
                    .col(
                        ColumnDef::new(WebhookEvents::Status)
                            .string_len(16)
                            .not_null()
                            .default("pending"),
                    )
                    .col(ColumnDef::new(WebhookEvents::Attempts).integer().not_null().default(0))
                    .col(ColumnDef::new(WebhookEvents::Error).text().null())
                    .col(
                        ColumnDef::new(WebhookEvents::CreatedAt)
                            .timestamp_with_time_zone()
                            .not_null()
                            .default(Expr::current_timestamp()),
                    )
                    .col(
                        ColumnDef::new(WebhookEvents::UpdatedAt)
                            .timestamp_with_time_zone()
                            .not_null()
                            .default(Expr::current_timestamp()),
                    )
                    .col(ColumnDef::new(WebhookEvents::ProcessedAt).timestamp_with_time_zone().null())
                    .to_owned(),
            )
            .await?;
        // The replay defence: an event id is stored once, whoever races for it.
        manager
            .create_index(
                Index::create()
                    .name("webhook_events_event_id_key")
                    .table(WebhookEvents::Table)
                    .col(WebhookEvents::EventId)
                    .unique()
                    .to_owned(),
            )
            .await?;
        // Admin listing: newest first, filtered by status, paged by (created_at, id).
        manager
            .create_index(
                Index::create()
                    .name("webhook_events_status_created_idx")
                    .table(WebhookEvents::Table)
                    .col(WebhookEvents::Status)
                    .col(WebhookEvents::CreatedAt)
                    .col(WebhookEvents::Id)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("webhook_events_created_idx")
                    .table(WebhookEvents::Table)
                    .col(WebhookEvents::CreatedAt)
                    .col(WebhookEvents::Id)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(WebhookEvents::Table).to_owned())
            .await
    }
}
