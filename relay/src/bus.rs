//! Where outbox messages go: a Kafka cluster, or (embedded mode) an in-process channel.
use std::collections::BTreeMap;

use entity::outbox;
use tokio::sync::mpsc;

use crate::error::PublishError;
use crate::kafka::KafkaPublisher;

/// One message as the consumer sees it, whichever bus carried it.
#[derive(Clone, Debug)]
pub struct BusMessage {
    pub topic: String,
    pub key: String,
    pub payload: Vec<u8>,
    pub headers: BTreeMap<String, String>,
}

impl BusMessage {
    /// The message an outbox row becomes.
    pub fn from_outbox(row: &outbox::Model) -> Self {
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
            payload: serde_json::to_vec(&row.payload).unwrap_or_default(),
            headers,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
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
