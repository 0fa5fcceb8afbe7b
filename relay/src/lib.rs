//! Everything behind the outbox: the stages an acknowledged event goes through after ingest
//! stored it, as rooms in the order an event meets them.
//!
//! | room | what it is | change it to... |
//! |---|---|---|
//! | [`event`] | the contact event: parsed and checked at ingest, read again by the consumer | accept or refuse a field |
//! | [`outbox`] | the `outbox` table: rows stored with their event, claimed, marked, re-published, summed up, pruned | change what a row says or how rows are claimed |
//! | [`publish`] | the relay loop: outbox rows to the bus, woken by LISTEN/NOTIFY | change how the relay batches or retries |
//! | [`bus`] | the message and both buses: Kafka (producer, consumer, topics) and the in-process channel | change a Kafka client setting |
//! | [`consume`] | bus messages applied: the Kafka member, partitions and offsets in PostgreSQL, batch apply, the `contacts` projection, poison handling, group health | change how an event is applied |
//! | [`webhook_events`] | every statement on `webhook_events` the admin API (and the console through it), the consumer and retention use | query or update events |
//! | [`retention`] | old published rows and processed events deleted in small batches | change what is kept |
//!
//! Around them: [`config`] (each section's struct and its checks), [`metrics`] (every metric's
//! name and help text), [`roles`] (the relay and consumer tasks a process starts) and [`sql`]
//! (statement shapes shared by the batch paths).
pub mod bus;
pub mod config;
pub mod consume;
pub mod event;
pub mod metrics;
pub mod outbox;
pub mod publish;
pub mod retention;
pub mod roles;
pub mod sql;
pub mod webhook_events;

pub use event::EVENT_TYPES;
