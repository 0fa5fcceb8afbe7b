//! Schema migrations. Each migration describes the schema as it was on its day with its own
//! identifiers; none imports `entity`.
pub use sea_orm_migration::prelude::*;

mod m20261129_000001_create_webhook_events;
mod m20261129_000002_create_outbox;
mod m20261129_000003_create_contacts;
mod m20261129_000004_consumer_partitions;
mod m20261201_000005_outbox_published_index;
mod m20261203_000006_outbox_republished_index;
mod m20261203_000007_outbox_payload_optional;

/// Every migration of the service, in order.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261129_000001_create_webhook_events::Migration),
            Box::new(m20261129_000002_create_outbox::Migration),
            Box::new(m20261129_000003_create_contacts::Migration),
            Box::new(m20261129_000004_consumer_partitions::Migration),
            Box::new(m20261201_000005_outbox_published_index::Migration),
            Box::new(m20261203_000006_outbox_republished_index::Migration),
            Box::new(m20261203_000007_outbox_payload_optional::Migration),
        ]
    }
}
