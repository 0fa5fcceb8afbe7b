//! The consumer: applies batches of messages through `EventProcessor`, retrying transient
//! failures with backoff and dead-lettering permanent ones.
//!
//! Over Kafka, partitions are owned through PostgreSQL ([`crate::partitions`]) and assigned by
//! hand, and each batch records its partitions' next offsets in the transaction that applies
//! it: a batch is applied and its position moved together, or neither. Kafka's group protocol
//! plays no part; the applied offsets are committed to Kafka after the database commit only so
//! that Kafka's tools see the group (`BrokerOffsets`).
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::{Message, Offset, TopicPartitionList};
use sea_orm::DatabaseConnection;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::bus::BusMessage;
use crate::config::{ConsumerConfig, KafkaConfig, backoff};
use crate::error::ErrorClass;
use crate::event::{HEADER_ERROR, HEADER_EVENT_ID};
use crate::kafka::KafkaPublisher;
use crate::metric_names as names;
use crate::partitions::{
    GroupHealth, HealthWatch, Membership, OffsetCommit, TopicPartition, partition_states,
    record_watermarks,
};
use crate::processor::{Apply, BatchError, EventProcessor, ISOLATE_AFTER, Outcome};

/// How applying a batch ended.
enum BatchEnd {
    /// Applied and committed.
    Committed,
    /// Partitions of the batch belong to another member now; nothing was written.
    Fenced,
    /// Shutdown came first; nothing was written.
    Shutdown,
}

/// Applies `messages` until committed: transient failures retry the whole batch with backoff;
/// messages that can never be applied are marked `failed` and handed to `dead_letter` before
/// the commit (so a crash re-sends a dead letter rather than losing it). A batch the database
/// refuses for its data ([`ErrorClass::is_poison`]), or that fails the same way
/// [`ISOLATE_AFTER`] times, is applied again one message at a time, so that one poison message
/// is failed and the rest go through in the same pass.
async fn apply_until_committed<F, Fut>(
    processor: &EventProcessor,
    messages: &[BusMessage],
    offsets: Option<&OffsetCommit>,
    config: &ConsumerConfig,
    shutdown: &CancellationToken,
    mut dead_letter: F,
) -> BatchEnd
where
    F: FnMut(BusMessage, String) -> Fut,
    Fut: Future<Output = Option<()>>,
{
    let mut attempt = 0u32;
    let mut how = Apply::Whole;
    let mut stall = Stall::new(offsets);
    loop {
        let error = match processor.apply_batch(messages, offsets, how).await {
            Ok(mut batch) => {
                let outcomes = std::mem::take(&mut batch.outcomes);
                for (message, outcome) in messages.iter().zip(&outcomes) {
                    if let Err(reason) = outcome
                        && dead_letter(message.clone(), reason.to_string())
                            .await
                            .is_none()
                    {
                        return BatchEnd::Shutdown; // rolls back: redelivered after the restart
                    }
                }
                match batch.commit().await {
                    Ok(()) => {
                        stall.end();
                        record_outcomes(messages, &outcomes);
                        return BatchEnd::Committed;
                    }
                    Err(error) => error,
                }
            }
            Err(BatchError::Fenced(fenced)) => {
                stall.end();
                tracing::warn!(%fenced, "batch not applied");
                return BatchEnd::Fenced;
            }
            Err(BatchError::Database(error)) => error,
        };
        let class = ErrorClass::of(&error);
        let repeats = stall.failed(class, &error);
        metrics::counter!(names::CONSUMER_RETRIES_TOTAL).increment(1);
        if how == Apply::Whole
            && (class.is_poison() || (!class.is_transient() && repeats >= ISOLATE_AFTER))
        {
            tracing::warn!(%error, class = class.as_str(), batch = messages.len(),
                "the database refused the batch; applying it one message at a time");
            how = Apply::OneByOne;
            continue;
        }
        tracing::warn!(%error, class = class.as_str(), attempt, batch = messages.len(),
            "processing failed; retrying");
        if pause(config, &mut attempt, shutdown).await.is_none() {
            stall.end();
            return BatchEnd::Shutdown;
        }
    }
}

/// The failed attempts of the batch in progress, as the gauge
/// `consumer_batch_failed_attempts{topic, partition, class}` of each of its partitions: 0 once
/// the batch commits, so a partition held back by a failing batch shows within seconds.
struct Stall {
    partitions: Vec<(String, String)>,
    class: Option<ErrorClass>,
    last_error: String,
    repeats: u32,
    attempts: u32,
}

impl Stall {
    fn new(offsets: Option<&OffsetCommit>) -> Self {
        let partitions: BTreeSet<(String, String)> = match offsets {
            Some(offsets) => offsets
                .next
                .keys()
                .map(|tp| (tp.topic.clone(), tp.partition.to_string()))
                .collect(),
            // The in-process bus has no partitions: one loop, one series.
            None => BTreeSet::from([(IN_PROCESS.0.to_owned(), IN_PROCESS.1.to_owned())]),
        };
        Self {
            partitions: partitions.into_iter().collect(),
            class: None,
            last_error: String::new(),
            repeats: 0,
            attempts: 0,
        }
    }

    /// Counts a failed attempt; returns how many attempts in a row failed with this error.
    fn failed(&mut self, class: ErrorClass, error: &sea_orm::DbErr) -> u32 {
        let text = error.to_string();
        self.repeats = if text == self.last_error {
            self.repeats + 1
        } else {
            1
        };
        self.last_error = text;
        if self.class.is_some_and(|c| c != class) {
            self.set(0.0);
        }
        self.class = Some(class);
        self.attempts += 1;
        self.set(f64::from(self.attempts));
        self.repeats
    }

    fn end(&mut self) {
        self.set(0.0);
        self.class = None;
    }

    fn set(&self, value: f64) {
        let Some(class) = self.class else { return };
        for (topic, partition) in &self.partitions {
            failed_attempts(topic, partition, class.as_str()).set(value);
        }
    }
}

/// The `topic` and `partition` labels of the in-process bus's one consumer loop.
const IN_PROCESS: (&str, &str) = ("in-process", "-");

/// One series of `consumer_batch_failed_attempts`.
fn failed_attempts(topic: &str, partition: &str, class: &'static str) -> metrics::Gauge {
    metrics::gauge!(names::CONSUMER_BATCH_FAILED_ATTEMPTS, "topic" => topic.to_owned(),
        "partition" => partition.to_owned(), "class" => class)
}

/// A partition starts with no failed attempt (`class="none"`), so the series exists, and the
/// alert on it can be checked, before anything fails.
fn no_failed_attempts(topic: &str, partition: &str) {
    failed_attempts(topic, partition, "none").set(0.0);
}

fn record_outcomes(messages: &[BusMessage], outcomes: &[Outcome]) {
    metrics::histogram!(names::CONSUMER_BATCH_SIZE).record(messages.len() as f64);
    let failed = outcomes.iter().filter(|o| o.is_err()).count();
    metrics::counter!(names::CONSUMER_PROCESSED_TOTAL).increment((outcomes.len() - failed) as u64);
    metrics::counter!(names::CONSUMER_FAILED_TOTAL).increment(failed as u64);
    for (message, outcome) in messages.iter().zip(outcomes) {
        let _span = span_for(message).entered();
        match outcome {
            Ok(handled) => tracing::debug!(?handled, "processed"),
            Err(error) => tracing::error!(%error, "event cannot be processed; dead-lettered"),
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
    no_failed_attempts(IN_PROCESS.0, IN_PROCESS.1);
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
        // Permanent failures are marked `failed`; there is no dead-letter topic here.
        let end = apply_until_committed(&processor, &batch, None, &config, &shutdown, |_, _| {
            std::future::ready(Some(()))
        })
        .await;
        if matches!(end, BatchEnd::Shutdown) {
            break;
        }
    }
    tracing::info!("in-process consumer stopped");
}

/// The pause before a member seeks back over messages the broker did not serve.
const SEEK_PAUSE: Duration = Duration::from_millis(10);

/// Where this member is on one owned partition.
#[derive(Debug)]
struct Position {
    /// The first offset not yet admitted: what the broker should serve next. (A batch admitted
    /// is committed before the next one is read, or the position is dropped.)
    next: i64,
    /// Whether the broker has served this partition from `next` or before since it was
    /// assigned or sought: until then, a message past `next` may mean the broker skipped some.
    aligned: bool,
    /// How far back the last alignment probe sought.
    probe: i64,
    /// Since when the broker, once aligned, has been serving messages past `next`.
    gap_since: Option<Instant>,
    /// No stored offset: the partition is read from its beginning, whatever offset that is.
    from_beginning: bool,
}

/// What to do with one fetched message.
#[derive(Debug, PartialEq)]
enum Admit {
    Process,
    Skip,
    /// The broker skipped messages: seek back to this offset (see `Position::admit`).
    SeekBack(i64),
}

impl Position {
    /// How long a gap in an aligned partition is fetched again before it is taken as the log's
    /// own (see `admit`).
    const GAP_PATIENCE: Duration = Duration::from_secs(2);

    fn new(next: Option<i64>) -> Self {
        Self {
            next: next.unwrap_or(0),
            aligned: false,
            probe: 0,
            gap_since: None,
            from_beginning: next.is_none(),
        }
    }

    /// Two ways Tansu 0.6 serves a message past `next`, never seen on Kafka:
    ///
    /// - Not yet aligned (just assigned or sought): a fetch that starts inside a record batch is
    ///   answered with the NEXT batch, where Kafka serves the batch holding the offset and the
    ///   client drops what precedes it. Until a message at or before `next` arrives, a message
    ///   past it seeks back twice as far each time (the start of the batch is at most one batch
    ///   back); from the log's beginning a gap is real (retention) and accepted.
    /// - Aligned: a producer reserves its batch's offsets (the high watermark moves) before it
    ///   stores the batch, so a fetch in between is served the batch of a producer that came
    ///   later, and the reserved offsets would be passed for good. The member seeks back to
    ///   `next` until the batch is there, for `GAP_PATIENCE`; after that the gap is accepted.
    fn admit(&mut self, offset: i64, now: Instant) -> Admit {
        if std::mem::take(&mut self.from_beginning) {
            return self.process(offset);
        }
        if offset < self.next {
            self.aligned = true;
            return Admit::Skip; // admitted already
        }
        if offset == self.next {
            return self.process(offset);
        }
        if self.aligned {
            let since = *self.gap_since.get_or_insert(now);
            if now.duration_since(since) < Self::GAP_PATIENCE {
                return Admit::SeekBack(self.next);
            }
            return self.accept_gap(offset);
        }
        if self.probe > self.next {
            return self.accept_gap(offset); // sought back to the log's beginning already
        }
        self.probe = (self.probe * 2).max(1);
        Admit::SeekBack((self.next - self.probe).max(0))
    }

    /// Takes `offset` although the broker never served the offsets from `next` to it.
    fn accept_gap(&mut self, offset: i64) -> Admit {
        tracing::warn!(
            expected = self.next,
            offset,
            "offsets missing from the log; going on"
        );
        metrics::counter!(names::CONSUMER_OFFSETS_MISSING_TOTAL)
            .increment(u64::try_from(offset - self.next).unwrap_or(0));
        self.process(offset)
    }

    fn process(&mut self, offset: i64) -> Admit {
        self.aligned = true;
        self.gap_since = None;
        self.next = offset + 1;
        Admit::Process
    }
}

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
        let consumer = Arc::new(crate::kafka::event_consumer(&kafka).await?);
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
        LagReporter {
            consumer: first.consumer.clone(),
            db: first.db.clone(),
            kafka: first.kafka.clone(),
            members: members
                .iter()
                .map(|m| m.membership.member_id().to_owned())
                .collect(),
            watch: Arc::default(),
        }
    }
}

/// The applied positions, committed to Kafka under the group id as well, so Kafka's tools
/// (`kafka-consumer-groups --describe`) and lag exporters see the group. PostgreSQL stays the
/// truth a member resumes from: these commits are asynchronous, never sent before the database
/// commit they report, and at most one request per [`Self::INTERVAL`].
#[derive(Default)]
struct BrokerOffsets {
    pending: BTreeMap<TopicPartition, i64>,
    sent_at: Option<Instant>,
}

impl BrokerOffsets {
    const INTERVAL: Duration = Duration::from_millis(500);

    /// Records the next offsets of a batch whose database transaction committed.
    fn applied(&mut self, next: BTreeMap<TopicPartition, i64>) {
        self.pending.extend(next);
    }

    /// Sends what is pending for the partitions still owned, if the last send is old enough.
    fn commit_if_due(
        &mut self,
        consumer: &StreamConsumer,
        owned: &HashMap<TopicPartition, Position>,
    ) {
        if self.pending.is_empty() || self.sent_at.is_some_and(|at| at.elapsed() < Self::INTERVAL) {
            return;
        }
        let mut list = TopicPartitionList::new();
        for (tp, next) in std::mem::take(&mut self.pending) {
            // A partition given back is its new owner's to report.
            if owned.contains_key(&tp)
                && let Err(error) =
                    list.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(next))
            {
                tracing::debug!(%error, %tp, "bad partition offset");
            }
        }
        self.sent_at = Some(Instant::now());
        if list.count() == 0 {
            return;
        }
        if let Err(error) = consumer.commit(&list, rdkafka::consumer::CommitMode::Async) {
            tracing::debug!(%error, "could not commit offsets to Kafka");
        }
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

async fn event_partitions(
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

/// Records high watermarks and checks the consumer group's health.
#[derive(Clone)]
pub struct LagReporter {
    consumer: Arc<StreamConsumer>,
    db: DatabaseConnection,
    kafka: KafkaConfig,
    members: Vec<String>,
    watch: Arc<std::sync::Mutex<HealthWatch>>,
}

impl LagReporter {
    /// The health found by the last `report` (`None` before the first).
    pub fn health(&self) -> Option<GroupHealth> {
        self.watch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last()
            .cloned()
    }

    /// Records the watermarks, then checks and logs the group's health (a WARN line when a
    /// partition has no consumer or a partition of this process's members stalled).
    pub async fn report(&self) {
        let partitions = match event_partitions(self.consumer.clone(), &self.kafka).await {
            Ok(partitions) => partitions,
            Err(error) => {
                tracing::debug!(%error, "topic metadata unavailable");
                return;
            }
        };
        let consumer = self.consumer.clone();
        let watermarks = tokio::task::spawn_blocking(move || {
            partitions
                .into_iter()
                .filter_map(|tp| {
                    let (_, high) = consumer
                        .fetch_watermarks(&tp.topic, tp.partition, Duration::from_secs(2))
                        .ok()?;
                    Some((tp, high))
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        if let Err(error) = record_watermarks(&self.db, &self.kafka.group_id, &watermarks).await {
            tracing::debug!(%error, "could not record watermarks");
        }
        match partition_states(&self.db).await {
            Ok(states) => {
                let health = self.watch.lock().unwrap_or_else(|e| e.into_inner()).check(
                    &states,
                    &self.members,
                    Instant::now(),
                );
                metrics::gauge!(names::CONSUMER_PARTITIONS_STALLED)
                    .set(health.stalled.len() as f64);
                if !health.healthy() {
                    tracing::warn!(unowned = ?health.unowned, stalled = ?health.stalled,
                        "consumer health: partitions not being consumed");
                }
            }
            Err(error) => tracing::debug!(%error, "could not read partition states"),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_resuming_inside_a_batch_seeks_back_until_the_broker_serves_its_offset() {
        let now = Instant::now();
        let mut position = Position::new(Some(115));
        // Tansu answers offset 115 with the next batch, which starts at 229.
        assert_eq!(position.admit(229, now), Admit::SeekBack(114));
        assert_eq!(position.admit(229, now), Admit::SeekBack(113));
        assert_eq!(position.admit(229, now), Admit::SeekBack(111));
        // From 111 the broker serves the batch holding 100..228: 111..114 are skipped.
        assert_eq!(position.admit(100, now), Admit::Skip);
        assert_eq!(position.admit(114, now), Admit::Skip);
        assert_eq!(position.admit(115, now), Admit::Process);
        assert_eq!(position.admit(116, now), Admit::Process);
    }

    #[test]
    fn a_batch_served_late_is_fetched_again_and_a_lasting_gap_is_accepted() {
        let start = Instant::now();
        let at = |millis: u64| start + Duration::from_millis(millis);
        let mut position = Position::new(Some(100));
        assert_eq!(position.admit(100, at(0)), Admit::Process);
        // Offsets 101..104 are reserved by a producer that has not stored its batch yet; a
        // later producer's batch at 105 is served instead: fetch 101 again until it is there.
        assert_eq!(position.admit(105, at(0)), Admit::SeekBack(101));
        assert_eq!(position.admit(105, at(10)), Admit::SeekBack(101));
        assert_eq!(position.admit(101, at(20)), Admit::Process);
        for offset in 102..=106 {
            assert_eq!(position.admit(offset, at(20)), Admit::Process);
        }
        // A gap that lasts is the log's own: accepted after the patience, once.
        let late = Position::GAP_PATIENCE.as_millis() as u64;
        assert_eq!(position.admit(200, at(1000)), Admit::SeekBack(107));
        assert_eq!(
            position.admit(200, at(1000 + late - 1)),
            Admit::SeekBack(107)
        );
        assert_eq!(position.admit(200, at(1000 + late)), Admit::Process);
        assert_eq!(position.admit(201, at(1000 + late)), Admit::Process);
        // The next gap gets the whole patience again.
        assert_eq!(position.admit(300, at(5000)), Admit::SeekBack(202));
    }

    #[test]
    fn a_gap_from_the_beginning_of_the_log_is_accepted() {
        let now = Instant::now();
        let mut position = Position::new(Some(3));
        let mut seeks = Vec::new();
        loop {
            match position.admit(50, now) {
                Admit::SeekBack(offset) => seeks.push(offset),
                Admit::Process => break,
                Admit::Skip => panic!("nothing before 50 exists"),
            }
        }
        assert_eq!(seeks, [2, 1, 0]);
        assert_eq!(position.admit(51, now), Admit::Process);
    }

    #[test]
    fn a_new_partition_takes_whatever_comes_first() {
        let now = Instant::now();
        let mut position = Position::new(None);
        assert_eq!(position.admit(42, now), Admit::Process);
        assert_eq!(position.admit(43, now), Admit::Process);
        assert_eq!(position.admit(45, now), Admit::SeekBack(44));
    }
}
