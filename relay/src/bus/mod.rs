//! The bus: where outbox messages go. A Kafka cluster ([`kafka`]), or (embedded mode) an
//! in-process channel. The bus is chosen once, by [`new_pair`]: the relay publishes through its
//! [`BusSink`], the consumer reads from its [`BusSource`]. [`BusMessage`] is a message as both
//! ends see it, whichever bus carried it.
use anyhow::Context;
use tokio::sync::mpsc;

pub mod kafka;
mod message;

pub use kafka::KafkaPublisher;
pub use message::{BusMessage, PublishError, TopicPartition};

use crate::config::KafkaConfig;

/// Messages the in-process bus holds before a publish counts as failed (and is retried).
const IN_PROCESS_CAPACITY: usize = 10_000;

/// The publishing end of the bus, before the relay connects it.
pub enum BusSink {
    InProcess(mpsc::Sender<BusMessage>),
    Kafka(KafkaConfig),
}

/// The receiving end of the bus, for the consumer.
pub enum BusSource {
    InProcess(mpsc::Receiver<BusMessage>),
    Kafka(KafkaConfig),
}

/// Chooses the bus (Kafka when `kafka.brokers` is set, else in-process) for a process running
/// the relay and/or the consumer, and creates the topics when configured to.
pub async fn new_pair(
    kafka: &KafkaConfig,
    relay: bool,
    consumer: bool,
) -> anyhow::Result<(BusSink, BusSource)> {
    if kafka.brokers.is_none() {
        if relay != consumer {
            anyhow::bail!(
                "the in-process bus needs the relay and the consumer in one process; \
                 set kafka.brokers to run `relay` or `consume` apart"
            );
        }
        let (sender, receiver) = mpsc::channel(IN_PROCESS_CAPACITY);
        return Ok((BusSink::InProcess(sender), BusSource::InProcess(receiver)));
    }
    if kafka.create_topics && (relay || consumer) {
        kafka::ensure_topics(kafka)
            .await
            .context("creating Kafka topics")?;
    }
    Ok((
        BusSink::Kafka(kafka.clone()),
        BusSource::Kafka(kafka.clone()),
    ))
}

impl BusSink {
    /// The publisher: for Kafka, a connected idempotent producer.
    pub async fn connect(self) -> anyhow::Result<Publisher> {
        Ok(match self {
            Self::InProcess(sender) => Publisher::InProcess(sender),
            Self::Kafka(kafka) => Publisher::Kafka(
                KafkaPublisher::connect(&kafka)
                    .await
                    .context("creating the Kafka producer")?,
            ),
        })
    }
}

/// The publishing side of the bus.
#[derive(Clone)]
pub enum Publisher {
    Kafka(KafkaPublisher),
    InProcess(mpsc::Sender<BusMessage>),
}

impl Publisher {
    /// Publishes every message and reports, per message and in order, whether it was delivered
    /// (for Kafka: acknowledged by all in-sync replicas).
    pub async fn publish(&self, messages: &[BusMessage]) -> Vec<Result<(), PublishError>> {
        match self {
            Self::Kafka(kafka) => kafka.publish(messages).await,
            // A full channel is a failed delivery: the row stays in the outbox and is retried.
            Self::InProcess(sender) => messages
                .iter()
                .map(|m| sender.try_send(m.clone()).map_err(PublishError::from))
                .collect(),
        }
    }
}
