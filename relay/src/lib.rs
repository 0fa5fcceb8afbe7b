//! The outbox relay (outbox rows -> Kafka) and the consumer (Kafka -> `contacts` + event status),
//! over either a real Kafka cluster or an in-process bus for the embedded mode.
pub mod bus;
pub mod config;
pub mod consumer;
pub mod error;
pub mod event;
pub mod kafka;
pub mod metric_names;
pub mod outbox;
pub mod outbox_relay;
pub mod partitions;
pub mod processor;
pub mod projection;
pub mod retention;
pub mod roles;
pub mod sql;
pub mod wakeup;

pub use event::EVENT_TYPES;
