//! rdkafka clients: configuration, topic creation, the idempotent publisher, the consumer.
//! Creating, flushing and querying clients blocks, so it runs on the blocking thread pool.
use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use tracing::Instrument;

use super::message::{BusMessage, PublishError, TopicPartition};
use crate::config::KafkaConfig;
use crate::event::HEADER_EVENT_ID;

/// Base settings shared by every client: brokers, then the pass-through properties.
pub fn client_config(config: &KafkaConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    client.set(
        "bootstrap.servers",
        config.brokers.as_deref().unwrap_or_default(),
    );
    for (key, value) in &config.properties {
        // Environment keys cannot hold dots: `SASL_MECHANISMS` stands for `sasl.mechanisms`.
        client.set(key.replace('_', "."), value);
    }
    client
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("blocking Kafka call panicked")
}

/// Sets each property that `kafka.properties` left unset: a configured value wins.
fn set_defaults(client: &mut ClientConfig, defaults: &[(&str, &str)]) {
    for (key, value) in defaults {
        if client.get(key).is_none() {
            client.set(*key, *value);
        }
    }
}

/// Creates the event topics and the dead-letter topic when they are missing, with
/// `kafka.partitions` partitions and `kafka.replication_factor` replicas (`-1`: the cluster's
/// `num.partitions` / `default.replication.factor`). A cluster that cannot satisfy them fails
/// the start with an error naming the setting.
pub async fn ensure_topics(config: &KafkaConfig) -> anyhow::Result<()> {
    let client_config = client_config(config);
    let admin: AdminClient<DefaultClientContext> = blocking(move || client_config.create()).await?;
    let topics = config.all_topics();
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| {
            NewTopic::new(
                t,
                config.partitions,
                TopicReplication::Fixed(config.replication_factor),
            )
        })
        .collect();
    let options = AdminOptions::new()
        .operation_timeout(Some(Duration::from_secs(10)))
        .request_timeout(Some(Duration::from_secs(5)));
    for result in admin.create_topics(&new_topics, &options).await? {
        match result {
            Ok(topic) => tracing::info!(%topic, "created topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => anyhow::bail!("{}", topic_error(config, &topic, code)),
        }
    }
    Ok(())
}

/// Why the cluster refused to create `topic`, in terms of the setting to change.
fn topic_error(config: &KafkaConfig, topic: &str, code: RDKafkaErrorCode) -> String {
    match code {
        RDKafkaErrorCode::InvalidReplicationFactor => format!(
            "kafka.replication_factor = {} cannot be satisfied: the cluster refused topic {topic} \
             ({code}: it has fewer live brokers than that); lower kafka.replication_factor, or \
             set it to -1 for the cluster's default.replication.factor",
            config.replication_factor
        ),
        RDKafkaErrorCode::InvalidPartitions => format!(
            "kafka.partitions = {} cannot be satisfied: the cluster refused topic {topic} ({code})",
            config.partitions
        ),
        RDKafkaErrorCode::PolicyViolation | RDKafkaErrorCode::InvalidConfig => format!(
            "the cluster refused topic {topic} with kafka.partitions = {} and \
             kafka.replication_factor = {} ({code}); check the cluster's topic policy",
            config.partitions, config.replication_factor
        ),
        RDKafkaErrorCode::TopicAuthorizationFailed
        | RDKafkaErrorCode::ClusterAuthorizationFailed => {
            format!(
                "not allowed to create topic {topic} ({code}): create the topics beforehand \
                 and set kafka.create_topics = false, or grant CREATE"
            )
        }
        code => format!("could not create topic {topic}: {code}"),
    }
}

/// Asks the cluster for its metadata: the readiness probe of the broker.
pub async fn check_broker(config: &KafkaConfig, timeout: Duration) -> Result<(), KafkaError> {
    let client_config = client_config(config);
    blocking(move || {
        let consumer: rdkafka::consumer::BaseConsumer = client_config.create()?;
        consumer
            .fetch_metadata(None, Timeout::After(timeout))
            .map(|_| ())
    })
    .await
}

/// The relay's producer: idempotent, `acks=all`, one delivery report per message.
#[derive(Clone)]
pub struct KafkaPublisher {
    producer: Arc<RwLock<Arc<FutureProducer>>>,
    config: ClientConfig,
}

impl KafkaPublisher {
    pub async fn connect(config: &KafkaConfig) -> Result<Self, KafkaError> {
        let mut client_config = client_config(config);
        client_config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", config.message_timeout_ms.to_string());
        // The relay waits for every delivery report of a batch, so lingering delays each batch.
        set_defaults(&mut client_config, &[("linger.ms", "2")]);
        let producer = create_producer(client_config.clone()).await?;
        Ok(Self {
            producer: Arc::new(RwLock::new(producer)),
            config: client_config,
        })
    }

    fn current(&self) -> Arc<FutureProducer> {
        self.producer
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces a producer that failed a whole batch. An idempotent producer keeps its producer
    /// id and sequence numbers across reconnects; a broker that came back without that state
    /// (or a fatal error) leaves it unable to deliver anything, while a fresh one starts clean.
    async fn replace(&self, failed: &Arc<FutureProducer>) {
        match failed.client().fatal_error() {
            Some((code, reason)) => {
                tracing::warn!(?code, %reason, "producer hit a fatal error; creating a new one")
            }
            None => {
                tracing::warn!("no message of the batch was delivered; creating a new producer")
            }
        }
        match create_producer(self.config.clone()).await {
            Ok(fresh) => {
                let mut current = self.producer.write().unwrap_or_else(|e| e.into_inner());
                if Arc::ptr_eq(&current, failed) {
                    *current = fresh;
                }
            }
            Err(error) => tracing::error!(%error, "could not create a new producer"),
        }
    }

    /// Sends every message and waits for every delivery report.
    pub async fn publish(&self, messages: &[BusMessage]) -> Vec<Result<(), PublishError>> {
        let producer = self.current();
        let deliveries = messages.iter().map(|message| {
            let mut headers = OwnedHeaders::new_with_capacity(message.headers.len());
            for (name, value) in &message.headers {
                headers = headers.insert(Header {
                    key: name,
                    value: Some(value),
                });
            }
            let record = FutureRecord::to(&message.topic)
                .key(&message.key)
                .payload(&message.payload)
                .headers(headers);
            let span = tracing::info_span!("publish",
                event_id = message.header(HEADER_EVENT_ID).unwrap_or("?"), topic = %message.topic);
            // Timeout::Never: a full local queue waits for room instead of failing the row;
            // `message.timeout.ms` still bounds how long a delivery may take.
            let delivery = producer.send(record, Timeout::Never);
            async move {
                let report = delivery.await;
                match &report {
                    Ok(delivered) => tracing::debug!(
                        partition = delivered.partition,
                        offset = delivered.offset,
                        "delivered"
                    ),
                    Err((error, _)) => tracing::debug!(%error, "not delivered"),
                }
                report
            }
            .instrument(span)
        });
        let reports: Vec<Result<(), PublishError>> = futures::future::join_all(deliveries)
            .await
            .into_iter()
            .map(|delivery| delivery.map(|_| ()).map_err(|(error, _)| error.into()))
            .collect();
        if reports.iter().all(Result::is_err) || producer.client().fatal_error().is_some() {
            self.replace(&producer).await;
        }
        reports
    }

    /// Waits for queued messages, at most `timeout`.
    pub async fn flush(&self, timeout: Duration) {
        let producer = self.current();
        if let Err(error) = blocking(move || producer.flush(Timeout::After(timeout))).await {
            tracing::warn!(%error, "producer flush did not complete");
        }
    }
}

async fn create_producer(config: ClientConfig) -> Result<Arc<FutureProducer>, KafkaError> {
    blocking(move || config.create().map(Arc::new)).await
}

/// The event consumer: partitions are assigned by hand (ownership lives in PostgreSQL, see
/// `partitions`), so it never joins the Kafka group (librdkafka wants a `group.id` for manual
/// assignment all the same) and commits nothing to Kafka.
pub async fn event_consumer(config: &KafkaConfig) -> Result<StreamConsumer, KafkaError> {
    let mut client_config = client_config(config);
    client_config
        .set("group.id", &config.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // Only for a stored offset the log no longer holds (retention): start from the oldest.
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false");
    // Latency and wake-ups: a fetch is answered once it has `fetch.min.bytes` or has waited
    // `fetch.wait.max.ms`. librdkafka's defaults (1 byte, 500 ms) make Apache Kafka answer
    // every fetch with whatever arrived since the last one: under load, a fetch and a consumer
    // wake-up per few messages. 32 KB or 10 ms batches them (at 2000-4000/s the consumer's CPU
    // per event fell 12-23% and the broker's 0-18%, end-to-end p99 within the runs' noise;
    // docs/benchmarks-notes.md) at a cost of at most 10 ms of latency when traffic is light.
    // Some brokers (Tansu among them) hold every fetch for the whole wait, so it stays short.
    // Memory: librdkafka prefetches up to 64 MB (`queued.max.messages.kbytes`) and 100k
    // messages per partition (`queued.min.messages`) while a backlog waits on the broker; a
    // consumer that applies 256 messages per transaction gains nothing from more than a few
    // batches in hand, so the defaults here bound the prefetch to 8 MB. Configured values win.
    set_defaults(
        &mut client_config,
        &[
            ("fetch.min.bytes", "32768"),
            ("fetch.wait.max.ms", "10"),
            ("queued.max.messages.kbytes", "8192"),
            ("queued.min.messages", "5000"),
        ],
    );
    blocking(move || client_config.create()).await
}

/// The partitions of the event topics, from the broker's metadata.
pub async fn event_partitions(
    consumer: Arc<StreamConsumer>,
    kafka: &KafkaConfig,
) -> Result<BTreeSet<TopicPartition>, rdkafka::error::KafkaError> {
    let topics: Vec<String> = crate::EVENT_TYPES
        .iter()
        .map(|t| kafka.topic_for(t))
        .collect();
    tokio::task::spawn_blocking(move || {
        let mut found = BTreeSet::new();
        for topic in topics {
            let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(5))?;
            for t in metadata.topics() {
                if t.error().is_some() {
                    continue;
                }
                for p in t.partitions() {
                    found.insert(TopicPartition {
                        topic: t.name().to_owned(),
                        partition: p.id(),
                    });
                }
            }
        }
        Ok(found)
    })
    .await
    .unwrap_or_else(|_| Ok(BTreeSet::new()))
}
