//! What the load generator records while it runs, and the percentiles it reports.
use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Latencies are recorded in microseconds up to this (10 minutes), with 3 significant digits.
const MAX_LATENCY_US: u64 = 600_000_000;

/// A new latency histogram (microseconds).
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds")
}

/// Percentiles of one latency distribution, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// How many latencies were recorded.
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl LatencySummary {
    pub fn of(histogram: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            count: histogram.len(),
            p50: ms(histogram.value_at_quantile(0.50)),
            p90: ms(histogram.value_at_quantile(0.90)),
            p99: ms(histogram.value_at_quantile(0.99)),
            p999: ms(histogram.value_at_quantile(0.999)),
            max: ms(histogram.max()),
            mean: histogram.mean() / 1000.0,
        }
    }
}

/// How one request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// An HTTP status; for a 200, what the body said.
    Status(u16, Option<Ack>),
    /// No HTTP answer (connect error, reset, timeout).
    TransportError,
}

/// The `status` of a 200 answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    Accepted,
    Duplicate,
}

/// One finished request.
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    pub seq: u64,
    /// Sent during the measured window (not warm-up).
    pub measured: bool,
    /// When it was due, in seconds after the start of the measured window (negative in warm-up).
    pub scheduled_offset_s: f64,
    /// When it was due, unix microseconds: the start of its end-to-end latency.
    pub scheduled_unix_us: i64,
    /// From the scheduled send time to the complete answer.
    pub latency_us: u64,
    pub answer: Answer,
}

/// Everything recorded during a run; shared by the request tasks behind one mutex (held for a
/// few hundred nanoseconds per request, far below the cost of the request itself).
pub struct Stats {
    pub ack: Histogram<u64>,
    pub status_counts: BTreeMap<String, u64>,
    pub accepted: u64,
    pub duplicate: u64,
    /// Measured requests that got an HTTP answer.
    pub completed: u64,
    /// Accepted events by sequence number → scheduled send time (unix µs), measured ones only.
    pub accepted_at: HashMap<u64, i64>,
    /// Accepted events sent during warm-up (they reach the database too).
    pub warmup_accepted: u64,
    /// (scheduled offset in s, ack latency in µs) of measured requests, for the plot.
    pub samples: Vec<(f32, u32)>,
    /// When the last measured request finished.
    pub last_completion: Option<Instant>,
}

impl Stats {
    pub fn new() -> Self {
        Self {
            ack: histogram(),
            status_counts: BTreeMap::new(),
            accepted: 0,
            duplicate: 0,
            completed: 0,
            accepted_at: HashMap::new(),
            warmup_accepted: 0,
            samples: Vec::new(),
            last_completion: None,
        }
    }

    pub fn record(&mut self, c: Completion) {
        if !c.measured {
            if matches!(c.answer, Answer::Status(_, Some(Ack::Accepted))) {
                self.warmup_accepted += 1;
            }
            return;
        }
        self.last_completion = Some(Instant::now());
        self.ack.saturating_record(c.latency_us.max(1));
        self.samples.push((
            c.scheduled_offset_s as f32,
            u32::try_from(c.latency_us).unwrap_or(u32::MAX),
        ));
        match c.answer {
            Answer::Status(code, ack) => {
                self.completed += 1;
                *self.status_counts.entry(code.to_string()).or_default() += 1;
                match ack {
                    Some(Ack::Accepted) => {
                        self.accepted += 1;
                        self.accepted_at.insert(c.seq, c.scheduled_unix_us);
                    }
                    Some(Ack::Duplicate) => self.duplicate += 1,
                    None => {}
                }
            }
            Answer::TransportError => {
                *self.status_counts.entry("error".to_owned()).or_default() += 1;
            }
        }
    }
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}
