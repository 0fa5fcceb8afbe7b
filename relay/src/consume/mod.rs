//! Consume: bus messages applied to the database, each batch in one transaction with the
//! partitions' next offsets.
//!
//! - [`member`]: a consumer process over Kafka (fetch, admit, apply, dead-letter, rebalance);
//! - [`in_process`]: the consumer loop of the in-process bus (embedded mode);
//! - `retry`: one batch applied until committed, shared by both (backoff, isolation of poison
//!   messages, the `consumer_batch_failed_attempts` gauge);
//! - [`batch`]: what applying a batch writes (event status, contacts, offsets);
//! - [`projection`]: the `contacts` upsert, newest version wins;
//! - [`partitions`]: group membership and partition offsets, kept in PostgreSQL;
//! - `position`: which fetched messages a member admits, and the offsets it reports to Kafka;
//! - [`health`]: watermarks, lag and the group's health;
//! - [`error`]: why a batch or message was not applied, by class.
pub mod batch;
pub mod error;
pub mod health;
pub mod in_process;
pub mod member;
pub mod partitions;
mod position;
pub mod projection;
mod retry;

pub use batch::{EventProcessor, Handled};
pub use error::{ErrorClass, Unappliable};
pub use health::{GroupHealth, HealthWatch, LagReporter};
pub use in_process::run_in_process;
pub use member::KafkaEventConsumer;
pub use partitions::{PartitionState, partition_states};
