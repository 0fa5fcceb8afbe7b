//! Applying one batch until it is committed: transient failures are retried with backoff, a
//! batch the database refuses for its data is applied again one message at a time, and
//! messages that can never be applied are dead-lettered before the commit. Shared by both
//! consumers (the Kafka member and the in-process loop).
use std::collections::BTreeSet;

use tokio_util::sync::CancellationToken;

use super::batch::{Apply, EventProcessor, Outcome};
use super::error::{BatchError, ErrorClass};
use super::partitions::OffsetCommit;
use crate::bus::BusMessage;
use crate::config::{ConsumerConfig, backoff};
use crate::event::HEADER_EVENT_ID;
use crate::metrics as names;

/// How many times in a row a batch may fail the same way (an error of class
/// [`ErrorClass::Other`]) before it is applied one message at a time.
pub const ISOLATE_AFTER: u32 = 3;

/// How applying a batch ended.
pub(super) enum BatchEnd {
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
pub(super) async fn apply_until_committed<F, Fut>(
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
pub(super) const IN_PROCESS: (&str, &str) = ("in-process", "-");

/// One series of `consumer_batch_failed_attempts`.
fn failed_attempts(topic: &str, partition: &str, class: &'static str) -> metrics::Gauge {
    metrics::gauge!(names::CONSUMER_BATCH_FAILED_ATTEMPTS, "topic" => topic.to_owned(),
        "partition" => partition.to_owned(), "class" => class)
}

/// A partition starts with no failed attempt (`class="none"`), so the series exists, and the
/// alert on it can be checked, before anything fails.
pub(super) fn no_failed_attempts(topic: &str, partition: &str) {
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
pub(super) async fn pause(
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

pub(super) fn span_for(message: &BusMessage) -> tracing::Span {
    tracing::info_span!("consume", event_id = message.header(HEADER_EVENT_ID).unwrap_or("?"), topic = %message.topic)
}
