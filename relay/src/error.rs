//! The relay's error types: what failed, and (by variant) whether retrying can help.
use rdkafka::error::KafkaError;
use tokio::sync::mpsc::error::TrySendError;

use crate::bus::BusMessage;

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

/// Why a message can never be applied (a retry would fail the same way): its event is marked
/// `failed` with this text, and the message is dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unappliable {
    #[error("payload is not JSON: {0}")]
    NotJson(String),
    /// The payload is JSON but not a contact event: the offending fields.
    #[error("event payload: {0}")]
    Payload(String),
    #[error("message carries no event id")]
    NoEventId,
    #[error("unknown event id {0}")]
    UnknownEvent(String),
}
