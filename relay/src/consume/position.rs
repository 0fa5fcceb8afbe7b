//! Where a member is on each partition it owns, and what to do with each fetched message
//! (`Position::admit`): the seek-backs that cover Tansu's out-of-order fetches (docs/brokers.md
//! says which case each covers on which broker). Also `BrokerOffsets`, the applied positions
//! reported to Kafka after each database commit.
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};

use crate::bus::TopicPartition;
use crate::metrics as names;

/// The pause before a member seeks back over messages the broker did not serve.
pub(super) const SEEK_PAUSE: Duration = Duration::from_millis(10);

/// Where this member is on one owned partition.
#[derive(Debug)]
pub(super) struct Position {
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
pub(super) enum Admit {
    Process,
    Skip,
    /// The broker skipped messages: seek back to this offset (see `Position::admit`).
    SeekBack(i64),
}

impl Position {
    /// How long a gap in an aligned partition is fetched again before it is taken as the log's
    /// own (see `admit`).
    const GAP_PATIENCE: Duration = Duration::from_secs(2);

    pub(super) fn new(next: Option<i64>) -> Self {
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
    pub(super) fn admit(&mut self, offset: i64, now: Instant) -> Admit {
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

/// The applied positions, committed to Kafka under the group id as well, so Kafka's tools
/// (`kafka-consumer-groups --describe`) and lag exporters see the group. PostgreSQL stays the
/// truth a member resumes from: these commits are asynchronous, never sent before the database
/// commit they report, and at most one request per [`Self::INTERVAL`].
#[derive(Default)]
pub(super) struct BrokerOffsets {
    pending: BTreeMap<TopicPartition, i64>,
    sent_at: Option<Instant>,
}

impl BrokerOffsets {
    const INTERVAL: Duration = Duration::from_millis(500);

    /// Records the next offsets of a batch whose database transaction committed.
    pub(super) fn applied(&mut self, next: BTreeMap<TopicPartition, i64>) {
        self.pending.extend(next);
    }

    /// Sends what is pending for the partitions still owned, if the last send is old enough.
    pub(super) fn commit_if_due(
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
        // Each probe seeks twice as far back: from 3, the beginning is reached in a few steps.
        for _ in 0..10 {
            match position.admit(50, now) {
                Admit::SeekBack(offset) => seeks.push(offset),
                Admit::Process => break,
                Admit::Skip => panic!("nothing before 50 exists"),
            }
        }
        assert_eq!(seeks, [2, 1, 0], "seeks back, then takes the gap");
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
