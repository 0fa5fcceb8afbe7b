//! A consumer process over Kafka: a member of its group, consuming the partitions it owns.
//!
//! Partitions are owned through PostgreSQL ([`super::partitions`]) and assigned by hand, and
//! each batch records its partitions' next offsets in the transaction that applies it: a batch
//! is applied and its position moved together, or neither. Kafka's group protocol plays no
//! part; the applied offsets are committed to Kafka after the database commit only so that
//! Kafka's tools see the group ([`super::position`]).
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::{Message, Offset, TopicPartitionList};
use sea_orm::DatabaseConnection;
use tokio_util::sync::CancellationToken;

use super::batch::EventProcessor;
use super::health::LagReporter;
use super::partitions::{Membership, OffsetCommit};
use super::position::{Admit, BrokerOffsets, Position, SEEK_PAUSE};
use super::retry::{BatchEnd, apply_until_committed, no_failed_attempts, pause};
use crate::bus::kafka::{event_consumer, event_partitions};
use crate::bus::{BusMessage, KafkaPublisher, TopicPartition};
use crate::config::{ConsumerConfig, KafkaConfig};
use crate::event::HEADER_ERROR;
use crate::metrics as names;

/// A consumer process over Kafka: a member of its group, consuming the partitions it owns.
pub struct KafkaEventConsumer {
    consumer: Arc<StreamConsumer>,
    processor: EventProcessor,
    dead_letters: KafkaPublisher,
    membership: Membership,
    db: DatabaseConnection,
    kafka: KafkaConfig,
    config: ConsumerConfig,
}

impl KafkaEventConsumer {
    /// `db` must be PostgreSQL: ownership and offsets live there.
    pub async fn connect(
        db: DatabaseConnection,
        kafka: KafkaConfig,
        config: ConsumerConfig,
    ) -> Result<Self, rdkafka::error::KafkaError> {
        let consumer = Arc::new(event_consumer(&kafka).await?);
        let dead_letters = KafkaPublisher::connect(&kafka).await?;
        let options = db.get_postgres_connection_pool().connect_options();
        Ok(Self {
            consumer,
            processor: EventProcessor::new(db.clone()),
            dead_letters,
            membership: Membership::new((*options).clone(), &kafka.group_id),
            db,
            kafka,
            config,
        })
    }

    /// Consumes until `shutdown`: between batches, every `consumer.rebalance_interval_ms`,
    /// takes or gives back partitions; otherwise takes the messages already fetched (up to
    /// `consumer.batch_max`) and applies them with their offsets in one transaction.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut positions: HashMap<TopicPartition, Position> = HashMap::new();
        let mut partitions = Partitions::default();
        let mut broker_offsets = BrokerOffsets::default();
        let mut tick = tokio::time::interval(self.config.rebalance_interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch: Vec<BusMessage> = Vec::with_capacity(self.config.batch_max);
        loop {
            let first = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                _ = tick.tick() => {
                    broker_offsets.commit_if_due(&self.consumer, &positions);
                    let topics = partitions.current(&self.consumer, &self.kafka).await;
                    self.rebalance(&topics, &mut positions).await;
                    continue;
                }
                received = self.consumer.recv() => received,
            };
            batch.clear();
            let mut next: BTreeMap<TopicPartition, i64> = BTreeMap::new();
            let mut seeks: BTreeMap<TopicPartition, i64> = BTreeMap::new();
            let fetched_at = Instant::now();
            let mut received = Some(first);
            while let Some(result) = received.take() {
                match result {
                    Ok(message) => admit(
                        &message,
                        fetched_at,
                        &mut positions,
                        &mut batch,
                        &mut next,
                        &mut seeks,
                    ),
                    Err(error) => {
                        tracing::warn!(%error, "consumer error");
                        break;
                    }
                }
                if batch.len() < self.config.batch_max {
                    received = self.consumer.recv().now_or_never();
                }
            }
            if !seeks.is_empty() {
                self.seek(seeks).await;
            }
            if batch.is_empty() {
                continue;
            }
            let offsets = OffsetCommit {
                group: self.membership.group().to_owned(),
                owner: self.membership.member_id().to_owned(),
                next,
            };
            let end = apply_until_committed(
                &self.processor,
                &batch,
                Some(&offsets),
                &self.config,
                &shutdown,
                |message, error| self.dead_letter(message, error, &shutdown),
            )
            .await;
            match end {
                BatchEnd::Committed => {
                    // `admit` moved the positions already; Kafka learns them after the commit.
                    broker_offsets.applied(offsets.next);
                    broker_offsets.commit_if_due(&self.consumer, &positions);
                }
                BatchEnd::Fenced => self.reset(&mut positions),
                BatchEnd::Shutdown => break, // uncommitted: applied after the restart
            }
        }
        tracing::info!("consumer stopped");
    }

    /// Takes and gives back partitions; on a broken membership session gives up everything
    /// (the locks are gone with it) and rejoins at the next tick.
    async fn rebalance(
        &mut self,
        topics: &BTreeSet<TopicPartition>,
        positions: &mut HashMap<TopicPartition, Position>,
    ) {
        if topics.is_empty() {
            return; // metadata unavailable; keep what is owned
        }
        match self.membership.rebalance(topics).await {
            Ok(change) => {
                if !change.released.is_empty() {
                    let mut list = TopicPartitionList::new();
                    for tp in &change.released {
                        positions.remove(tp);
                        list.add_partition(&tp.topic, tp.partition);
                    }
                    if let Err(error) = self.consumer.incremental_unassign(&list) {
                        tracing::error!(%error, "could not unassign partitions; rejoining");
                        self.reset(positions);
                        return;
                    }
                }
                if !change.acquired.is_empty() {
                    let mut list = TopicPartitionList::new();
                    for (tp, next) in &change.acquired {
                        let offset = next.map_or(Offset::Beginning, Offset::Offset);
                        if let Err(error) =
                            list.add_partition_offset(&tp.topic, tp.partition, offset)
                        {
                            tracing::error!(%error, %tp, "bad partition offset");
                        }
                        positions.insert(tp.clone(), Position::new(*next));
                        no_failed_attempts(&tp.topic, &tp.partition.to_string());
                    }
                    if let Err(error) = self.consumer.incremental_assign(&list) {
                        tracing::error!(%error, "could not assign partitions; rejoining");
                        self.reset(positions);
                    }
                }
                metrics::gauge!(names::CONSUMER_PARTITIONS_OWNED, "member" => self.membership.member_id().to_owned())
                    .set(positions.len() as f64);
            }
            Err(error) => {
                tracing::warn!(%error, "consumer group session lost; rejoining");
                self.reset(positions);
            }
        }
    }

    /// Gives up every partition: stops fetching them and drops the membership session (which
    /// releases its locks) to rejoin at the next rebalance tick.
    fn reset(&mut self, positions: &mut HashMap<TopicPartition, Position>) {
        positions.clear();
        self.membership.reset();
        if let Err(error) = self.consumer.unassign() {
            tracing::error!(%error, "could not unassign partitions");
        }
        metrics::gauge!(names::CONSUMER_PARTITIONS_OWNED, "member" => self.membership.member_id().to_owned())
            .set(0.0);
    }

    /// Seeks the partitions of `seeks` back, after a pause that lets a batch being stored land
    /// (see `Position::admit`).
    async fn seek(&self, seeks: BTreeMap<TopicPartition, i64>) {
        tokio::time::sleep(SEEK_PAUSE).await;
        metrics::counter!(names::CONSUMER_REFETCHES_TOTAL).increment(seeks.len() as u64);
        let consumer = self.consumer.clone();
        let result = tokio::task::spawn_blocking(move || {
            let mut list = TopicPartitionList::new();
            for (tp, offset) in &seeks {
                tracing::info!(partition = %tp, offset, "broker skipped messages; seeking back");
                list.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(*offset))?;
            }
            consumer.seek_partitions(list, Duration::from_secs(5))
        })
        .await;
        match result {
            Ok(Ok(list)) => {
                for element in list.elements() {
                    if let Err(error) = element.error() {
                        tracing::warn!(%error, topic = element.topic(), "seek failed");
                    }
                }
            }
            Ok(Err(error)) => tracing::warn!(%error, "seek failed"),
            Err(error) => tracing::warn!(%error, "seek task failed"),
        }
    }

    /// Publishes the message to the dead-letter topic, retrying until it is delivered.
    async fn dead_letter(
        &self,
        mut dead: BusMessage,
        error: String,
        shutdown: &CancellationToken,
    ) -> Option<()> {
        let original = std::mem::replace(&mut dead.topic, self.kafka.dlq_topic());
        dead.headers.insert(HEADER_ERROR.to_owned(), error);
        dead.headers.insert("original-topic".to_owned(), original);
        let mut attempt = 0u32;
        loop {
            match self
                .dead_letters
                .publish(std::slice::from_ref(&dead))
                .await
                .pop()
            {
                Some(Ok(())) => {
                    metrics::counter!(names::CONSUMER_DEAD_LETTERED_TOTAL).increment(1);
                    return Some(());
                }
                failure => {
                    tracing::warn!(?failure, "dead-letter publish failed; retrying");
                    pause(&self.config, &mut attempt, shutdown).await?;
                }
            }
        }
    }

    /// Reads the partitions' high watermarks for the lag every role reports, and logs a
    /// health line when partitions have no consumer or stopped moving.
    /// The reporter of a process whose members are `members` (not empty): watermarks and the
    /// group's health belong to the group, so one reporter per process is enough.
    pub fn lag_reporter(members: &[Self]) -> LagReporter {
        let first = &members[0];
        LagReporter::new(
            first.consumer.clone(),
            first.db.clone(),
            first.kafka.clone(),
            members
                .iter()
                .map(|m| m.membership.member_id().to_owned())
                .collect(),
        )
    }
}

/// Decides about one fetched message; a processed one joins `batch` and moves `next`.
fn admit(
    message: &BorrowedMessage<'_>,
    fetched_at: Instant,
    positions: &mut HashMap<TopicPartition, Position>,
    batch: &mut Vec<BusMessage>,
    next: &mut BTreeMap<TopicPartition, i64>,
    seeks: &mut BTreeMap<TopicPartition, i64>,
) {
    let tp = TopicPartition {
        topic: message.topic().to_owned(),
        partition: message.partition(),
    };
    if seeks.contains_key(&tp) {
        return; // fetched before the seek back: it will come again
    }
    let Some(position) = positions.get_mut(&tp) else {
        return; // a partition given back; its new owner reads it
    };
    match position.admit(message.offset(), fetched_at) {
        Admit::Process => {
            batch.push(to_bus_message(message));
            next.insert(tp, message.offset() + 1);
        }
        Admit::Skip => {}
        Admit::SeekBack(offset) => {
            seeks.insert(tp, offset);
        }
    }
}

/// The event topics' partitions, from the broker's metadata, refreshed every 10 s.
#[derive(Default)]
struct Partitions {
    known: BTreeSet<TopicPartition>,
    read_at: Option<Instant>,
}

impl Partitions {
    async fn current(
        &mut self,
        consumer: &Arc<StreamConsumer>,
        kafka: &KafkaConfig,
    ) -> BTreeSet<TopicPartition> {
        if self.known.is_empty() || self.read_at.is_none_or(|t| t.elapsed().as_secs() >= 10) {
            match event_partitions(consumer.clone(), kafka).await {
                Ok(found) if !found.is_empty() => {
                    self.known = found;
                    self.read_at = Some(Instant::now());
                }
                Ok(_) => tracing::warn!("the broker reports no partition of the event topics"),
                Err(error) => tracing::warn!(%error, "could not read topic metadata"),
            }
        }
        self.known.clone()
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
