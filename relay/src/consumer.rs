//! The consumer: applies each message through `EventProcessor`, retrying transient failures with
//! backoff and dead-lettering permanent ones, and commits the Kafka offset only afterwards.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::Message;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::bus::BusMessage;
use crate::config::{ConsumerConfig, KafkaConfig, backoff};
use crate::event::{HEADER_ERROR, HEADER_EVENT_ID};
use crate::kafka::KafkaPublisher;
use crate::processor::{EventProcessor, Handled, ProcessError};

/// The final fate of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    Done(Handled),
    /// Could never be applied; the event is marked `failed` with this error.
    DeadLetter(String),
}

/// Handles `message` until it is done or permanently failed. `None` when shutdown interrupted
/// the retries: the message must not be acknowledged.
pub async fn handle_with_retry(
    processor: &EventProcessor,
    message: &BusMessage,
    config: &ConsumerConfig,
    shutdown: &CancellationToken,
) -> Option<Disposition> {
    let mut attempt = 0u32;
    let error = loop {
        match processor.handle(message).await {
            Ok(handled) => {
                metrics::counter!("consumer_processed_total").increment(1);
                tracing::debug!(?handled, "processed");
                return Some(Disposition::Done(handled));
            }
            Err(ProcessError::Permanent(error)) => break error,
            Err(ProcessError::Transient(error)) => {
                metrics::counter!("consumer_retries_total").increment(1);
                tracing::warn!(%error, attempt, "processing failed; retrying");
                pause(config, &mut attempt, shutdown).await?;
            }
        }
    };
    tracing::error!(%error, "event cannot be processed; dead-lettering it");
    metrics::counter!("consumer_failed_total").increment(1);
    let mut attempt = 0u32;
    while let Err(db_error) = processor.mark_failed(message, &error).await {
        tracing::warn!(error = %db_error, "could not record the failure; retrying");
        pause(config, &mut attempt, shutdown).await?;
    }
    Some(Disposition::DeadLetter(error))
}

/// Sleeps the next backoff step; `None` if shutdown came first.
async fn pause(
    config: &ConsumerConfig,
    attempt: &mut u32,
    shutdown: &CancellationToken,
) -> Option<()> {
    let delay = backoff(config.backoff_base_ms, config.backoff_max_ms, *attempt);
    *attempt = attempt.saturating_add(1);
    tokio::select! {
        () = shutdown.cancelled() => None,
        () = tokio::time::sleep(delay) => Some(()),
    }
}

fn span_for(message: &BusMessage) -> tracing::Span {
    tracing::info_span!("consume", event_id = message.header(HEADER_EVENT_ID).unwrap_or("?"), topic = %message.topic)
}

/// Consumer over the in-process bus (embedded mode).
pub async fn run_in_process(
    processor: EventProcessor,
    mut receiver: mpsc::Receiver<BusMessage>,
    config: ConsumerConfig,
    shutdown: CancellationToken,
) {
    loop {
        let message = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            message = receiver.recv() => match message { Some(m) => m, None => break },
        };
        let span = span_for(&message);
        if handle_with_retry(&processor, &message, &config, &shutdown)
            .instrument(span)
            .await
            .is_none()
        {
            break;
        }
    }
    tracing::info!("in-process consumer stopped");
}

/// A Kafka consumer-group member.
pub struct KafkaEventConsumer {
    consumer: Arc<StreamConsumer>,
    processor: EventProcessor,
    dead_letters: KafkaPublisher,
    kafka: KafkaConfig,
    config: ConsumerConfig,
}

impl KafkaEventConsumer {
    pub async fn connect(
        processor: EventProcessor,
        kafka: KafkaConfig,
        config: ConsumerConfig,
    ) -> Result<Self, rdkafka::error::KafkaError> {
        let consumer = Arc::new(crate::kafka::event_consumer(&kafka).await?);
        let dead_letters = KafkaPublisher::connect(&kafka).await?;
        Ok(Self {
            consumer,
            processor,
            dead_letters,
            kafka,
            config,
        })
    }

    /// Consumes until `shutdown`, then commits what was handled.
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            let received = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                received = self.consumer.recv() => received,
            };
            let message = match received {
                Ok(message) => message,
                Err(error) => {
                    tracing::warn!(%error, "consumer error");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            let bus_message = to_bus_message(&message);
            let span = span_for(&bus_message);
            let handled = async {
                match handle_with_retry(&self.processor, &bus_message, &self.config, &shutdown)
                    .await?
                {
                    Disposition::Done(_) => Some(()),
                    Disposition::DeadLetter(error) => {
                        self.dead_letter(&bus_message, &error, &shutdown).await
                    }
                }
            }
            .instrument(span)
            .await;
            if handled.is_none() {
                break; // shutting down mid-message: leave it uncommitted, it will be redelivered
            }
            if let Err(error) = self.consumer.commit_message(&message, CommitMode::Async) {
                tracing::warn!(%error, "offset commit failed; the message may be redelivered");
            }
        }
        let consumer = self.consumer.clone();
        let _ =
            tokio::task::spawn_blocking(move || consumer.commit_consumer_state(CommitMode::Sync))
                .await;
        tracing::info!("consumer stopped");
    }

    /// Publishes the message to the dead-letter topic, retrying until it is delivered.
    async fn dead_letter(
        &self,
        message: &BusMessage,
        error: &str,
        shutdown: &CancellationToken,
    ) -> Option<()> {
        let mut dead = message.clone();
        dead.topic = self.kafka.dlq_topic();
        dead.headers
            .insert(HEADER_ERROR.to_owned(), error.to_owned());
        dead.headers
            .insert("original-topic".to_owned(), message.topic.clone());
        let mut attempt = 0u32;
        loop {
            match self
                .dead_letters
                .publish(std::slice::from_ref(&dead))
                .await
                .pop()
            {
                Some(Ok(())) => {
                    metrics::counter!("consumer_dead_lettered_total").increment(1);
                    return Some(());
                }
                failure => {
                    tracing::warn!(?failure, "dead-letter publish failed; retrying");
                    pause(&self.config, &mut attempt, shutdown).await?;
                }
            }
        }
    }

    /// Per partition: high watermark minus committed offset (blocking calls, off the runtime).
    pub fn lag_reporter(&self) -> LagReporter {
        LagReporter {
            consumer: self.consumer.clone(),
        }
    }
}

/// Reports consumer lag as `consumer_lag{topic, partition}` gauges.
#[derive(Clone)]
pub struct LagReporter {
    consumer: Arc<StreamConsumer>,
}

impl LagReporter {
    pub async fn report(&self) {
        let consumer = self.consumer.clone();
        let result = tokio::task::spawn_blocking(
            move || -> Result<Vec<(String, i32, i64)>, rdkafka::error::KafkaError> {
                let timeout = Duration::from_secs(2);
                let committed = consumer.committed(timeout)?;
                let mut lags = Vec::new();
                for element in committed.elements() {
                    let (_, high) =
                        consumer.fetch_watermarks(element.topic(), element.partition(), timeout)?;
                    let position = element.offset().to_raw().filter(|o| *o >= 0).unwrap_or(0);
                    lags.push((
                        element.topic().to_owned(),
                        element.partition(),
                        (high - position).max(0),
                    ));
                }
                Ok(lags)
            },
        )
        .await;
        match result {
            Ok(Ok(lags)) => {
                for (topic, partition, lag) in lags {
                    metrics::gauge!("consumer_lag", "topic" => topic, "partition" => partition.to_string()).set(lag as f64);
                }
            }
            Ok(Err(error)) => tracing::debug!(%error, "consumer lag unavailable"),
            Err(error) => tracing::debug!(%error, "consumer lag task failed"),
        }
    }
}

fn to_bus_message(message: &BorrowedMessage<'_>) -> BusMessage {
    let mut headers = BTreeMap::new();
    if let Some(h) = message.headers() {
        for header in h.iter() {
            if let Some(value) = header.value.and_then(|v| std::str::from_utf8(v).ok()) {
                headers.insert(header.key.to_owned(), value.to_owned());
            }
        }
    }
    BusMessage {
        topic: message.topic().to_owned(),
        key: message
            .key()
            .and_then(|k| std::str::from_utf8(k).ok())
            .unwrap_or_default()
            .to_owned(),
        payload: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        headers,
    }
}
