use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Contacts {
    Table,
    Id,
    Email,
    FirstName,
    LastName,
    Phone,
    Company,
    Title,
    Data,
    SourceCreatedAt,
    SourceUpdatedAt,
    EventTimestamp,
    LastEventId,
    Deleted,
    DeletedAt,
    UpdatedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Contacts::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(Contacts::Id)
                            .string_len(255)
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(Contacts::Email).text().null())
                    .col(ColumnDef::new(Contacts::FirstName).text().null())
                    .col(ColumnDef::new(Contacts::LastName).text().null())
                    .col(ColumnDef::new(Contacts::Phone).text().null())
                    .col(ColumnDef::new(Contacts::Company).text().null())
                    .col(ColumnDef::new(Contacts::Title).text().null())
                    .col(ColumnDef::new(Contacts::Data).json_binary().not_null())
                    .col(
                        ColumnDef::new(Contacts::SourceCreatedAt)
                            .timestamp_with_time_zone()
                            .null(),
                    )
                    .col(
                        ColumnDef::new(Contacts::SourceUpdatedAt)
                            .timestamp_with_time_zone()
                            .null(),
                    )
                    .col(
                        ColumnDef::new(Contacts::EventTimestamp)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(Contacts::LastEventId)
                            .string_len(255)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(Contacts::Deleted)
                            .boolean()
                            .not_null()
                            .default(false),
                    )
                    .col(
                        ColumnDef::new(Contacts::DeletedAt)
                            .timestamp_with_time_zone()
                            .null(),
                    )
                    .col(
                        ColumnDef::new(Contacts::UpdatedAt)
                            .timestamp_with_time_zone()
                            .not_null()
                            .default(Expr::current_timestamp()),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Contacts::Table).to_owned())
            .await
    }
}
