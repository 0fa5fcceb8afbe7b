//! What travels on the bus: a message, a topic partition, and why a publish failed.
use std::collections::BTreeMap;
use std::fmt;

use rdkafka::error::KafkaError;
use tokio::sync::mpsc::error::TrySendError;

use crate::outbox::ClaimedRow;

/// One message as the consumer sees it, whichever bus carried it.
#[derive(Clone, Debug)]
pub struct BusMessage {
    pub topic: String,
    pub key: String,
    pub payload: Vec<u8>,
    pub headers: BTreeMap<String, String>,
}

impl BusMessage {
    /// The message a claimed outbox row becomes.
    pub fn from_outbox(row: &ClaimedRow) -> Self {
        let headers = row
            .headers
            .as_object()
            .map(|h| {
                h.iter()
                    .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned())))
                    .collect()
            })
            .unwrap_or_default();
        Self {
            topic: row.topic.clone(),
            key: row.message_key.clone(),
            payload: row.payload.clone().into_bytes(),
            headers,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// A topic partition.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TopicPartition {
    pub topic: String,
    pub partition: i32,
}

impl fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]", self.topic, self.partition)
    }
}

/// Why one message was not delivered to the bus; the outbox row stays unpublished and is
/// retried after a backoff.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PublishError {
    /// The broker did not acknowledge it (timeout, broker down, missing topic...).
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    /// The in-process bus's queue is full (embedded mode): the consumer is behind.
    #[error("in-process bus: no available capacity")]
    BusFull,
    /// The in-process bus's consumer is gone (shutting down).
    #[error("in-process bus: channel closed")]
    BusClosed,
}

impl From<TrySendError<BusMessage>> for PublishError {
    fn from(error: TrySendError<BusMessage>) -> Self {
        match error {
            TrySendError::Full(_) => Self::BusFull,
            TrySendError::Closed(_) => Self::BusClosed,
        }
    }
}
