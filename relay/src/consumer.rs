//! The consumer: applies each message through `EventProcessor`, retrying transient failures with
//! backoff and dead-lettering permanent ones, and commits the Kafka offset only afterwards.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::bus::BusMessage;
use crate::config::{ConsumerConfig, KafkaConfig, backoff};
use crate::event::{HEADER_ERROR, HEADER_EVENT_ID};
use crate::kafka::KafkaPublisher;
use crate::processor::{EventProcessor, Handled};

/// The final fate of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    Done(Handled),
    /// Could never be applied; the event is marked `failed` with this error.
    DeadLetter(String),
}

/// Handles a batch until every message is done or permanently failed (those are already marked
/// `failed` and come back as `DeadLetter`). Transient failures retry the whole batch with
/// backoff. `None` when shutdown interrupted the retries: nothing may be acknowledged.
pub async fn handle_batch_with_retry(
    processor: &EventProcessor,
    messages: &[BusMessage],
    config: &ConsumerConfig,
    shutdown: &CancellationToken,
) -> Option<Vec<Disposition>> {
    let mut attempt = 0u32;
    loop {
        match processor.handle_batch(messages).await {
            Ok(outcomes) => {
                metrics::histogram!("consumer_batch_size").record(messages.len() as f64);
                let dispositions: Vec<Disposition> = outcomes
                    .into_iter()
                    .map(|outcome| match outcome {
                        Ok(handled) => Disposition::Done(handled),
                        Err(error) => Disposition::DeadLetter(error),
                    })
                    .collect();
                let failed = dispositions
                    .iter()
                    .filter(|d| matches!(d, Disposition::DeadLetter(_)))
                    .count();
                metrics::counter!("consumer_processed_total")
                    .increment((dispositions.len() - failed) as u64);
                metrics::counter!("consumer_failed_total").increment(failed as u64);
                for (message, disposition) in messages.iter().zip(&dispositions) {
                    let _span = span_for(message).entered();
                    match disposition {
                        Disposition::Done(handled) => tracing::debug!(?handled, "processed"),
                        Disposition::DeadLetter(error) => {
                            tracing::error!(%error, "event cannot be processed; dead-lettering it");
                        }
                    }
                }
                return Some(dispositions);
            }
            Err(error) => {
                metrics::counter!("consumer_retries_total").increment(1);
                tracing::warn!(%error, attempt, batch = messages.len(), "processing failed; retrying");
                pause(config, &mut attempt, shutdown).await?;
            }
        }
    }
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

pub(crate) fn span_for(message: &BusMessage) -> tracing::Span {
    tracing::info_span!("consume", event_id = message.header(HEADER_EVENT_ID).unwrap_or("?"), topic = %message.topic)
}

/// Consumer over the in-process bus (embedded mode): takes what is queued, up to `batch_max`.
pub async fn run_in_process(
    processor: EventProcessor,
    mut receiver: mpsc::Receiver<BusMessage>,
    config: ConsumerConfig,
    shutdown: CancellationToken,
) {
    let mut batch = Vec::with_capacity(config.batch_max);
    loop {
        batch.clear();
        let received = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            received = receiver.recv_many(&mut batch, config.batch_max) => received,
        };
        if received == 0 {
            break; // every sender is gone
        }
        // Permanent failures are already marked `failed`; there is no dead-letter topic here.
        if handle_batch_with_retry(&processor, &batch, &config, &shutdown)
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

    /// Consumes until `shutdown`. Takes the messages already fetched (up to
    /// `consumer.batch_max`), applies them in one database transaction, dead-letters the ones
    /// that can never be applied, and only then commits the offsets past the batch.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut batch: Vec<BusMessage> = Vec::with_capacity(self.config.batch_max);
        loop {
            let received = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                received = self.consumer.recv() => received,
            };
            batch.clear();
            let mut positions = TopicPartitionList::new();
            match received {
                Ok(message) => take(&message, &mut batch, &mut positions),
                Err(error) => {
                    tracing::warn!(%error, "consumer error");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            }
            while batch.len() < self.config.batch_max {
                match self.consumer.recv().now_or_never() {
                    Some(Ok(message)) => take(&message, &mut batch, &mut positions),
                    Some(Err(error)) => {
                        tracing::warn!(%error, "consumer error");
                        break;
                    }
                    None => break, // nothing more fetched yet
                }
            }
            let Some(dispositions) =
                handle_batch_with_retry(&self.processor, &batch, &self.config, &shutdown).await
            else {
                break; // shutting down mid-batch: leave it uncommitted, it will be redelivered
            };
            let mut dead_lettered = true;
            for (message, disposition) in batch.iter().zip(&dispositions) {
                if let Disposition::DeadLetter(error) = disposition
                    && self.dead_letter(message, error, &shutdown).await.is_none()
                {
                    dead_lettered = false;
                    break;
                }
            }
            if !dead_lettered {
                break; // shutdown before the dead letters were out: redeliver the batch
            }
            if let Err(error) = self.consumer.commit(&positions, CommitMode::Async) {
                tracing::warn!(%error, "offset commit failed; the batch may be redelivered");
            }
        }
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

/// Adds `message` to the batch and moves its partition's commit position past it.
fn take(
    message: &BorrowedMessage<'_>,
    batch: &mut Vec<BusMessage>,
    positions: &mut TopicPartitionList,
) {
    batch.push(to_bus_message(message));
    let next = Offset::Offset(message.offset() + 1);
    match positions.find_partition(message.topic(), message.partition()) {
        Some(mut element) => {
            let _ = element.set_offset(next);
        }
        None => {
            let _ = positions.add_partition_offset(message.topic(), message.partition(), next);
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
