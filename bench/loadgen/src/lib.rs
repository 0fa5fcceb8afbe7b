//! `loadgen`: sends unique, correctly signed contact events to a running service
//! and reports throughput, ack latency and (with the database URL) end-to-end latency.
//!
//! Two models:
//! - **open loop** (`--rate`): request `i` is due at `t0 + i/rate` whatever happened before, and
//!   its latency counts from that due time. A stalled server therefore shows its stall in the
//!   percentiles instead of silently slowing the sender down (no coordinated omission).
//! - **closed loop** (no `--rate`): `--connections` senders post back to back; this finds the
//!   maximum sustainable rate.
//!
//! The client shares the machine with the server in the benchmarks, so it is kept cheap per
//! request: one keep-alive HTTP/1.1 client, bodies written straight into one buffer and signed
//! with a pre-keyed HMAC, one short mutex section to record the answer.
pub mod e2e;
pub mod events;
pub mod plot;
pub mod stats;

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use events::{EventFactory, EventSpec, Kind};
use stats::{Ack, Answer, Completion, LatencySummary, Stats};

/// Closed-loop senders when `--connections` is not given.
const DEFAULT_CLOSED_CONNECTIONS: usize = 32;
/// Open-loop cap on requests in flight when `--connections` is not given.
const DEFAULT_OPEN_CONNECTIONS: usize = 256;
/// A request without an answer after this counts as a transport error (bounds the drain).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How many recently sent events a duplicate may re-send.
const DUPLICATE_POOL: usize = 4096;

/// Options of `loadgen`.
#[derive(Parser, Clone)]
#[command(
    name = "loadgen",
    version,
    about = "Sends signed load to a running acme-webhooks service; reports rates and ack/end-to-end latencies"
)]
pub struct LoadgenArgs {
    /// The webhook endpoint.
    #[arg(long, default_value = "http://127.0.0.1:8080/api/webhooks")]
    pub url: String,
    /// The webhook secret the service verifies signatures with.
    #[arg(long, env = "ACME_LOADGEN_SECRET", hide_env_values = true)]
    pub secret: String,
    /// Open loop: fixed arrival rate in events/s, latency measured from the scheduled send time.
    /// Without it: closed loop, `--connections` senders back to back.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Closed loop: concurrent senders (default 32). Open loop: cap on requests in flight
    /// (default 256).
    #[arg(long)]
    pub connections: Option<usize>,
    /// Seconds of measured load.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds of load sent first and not recorded.
    #[arg(long, default_value_t = 0.0)]
    pub warmup: f64,
    /// Number of distinct contact ids in the mix.
    #[arg(long, default_value_t = 1000)]
    pub contacts: u32,
    /// Share of requests that re-send an already sent event (answered 200 `duplicate`).
    #[arg(long, default_value_t = 0.0)]
    pub duplicate_share: f64,
    /// Share of requests with a bad signature (answered 401).
    #[arg(long, default_value_t = 0.0)]
    pub invalid_share: f64,
    /// The service's database: after the run, wait for the accepted events to be processed and
    /// report end-to-end latency (processed_at - scheduled send time).
    #[arg(long)]
    pub database_url: Option<String>,
    /// Longest wait for processing after the run, in seconds (with --database-url).
    #[arg(long, default_value_t = 60.0)]
    pub e2e_timeout: f64,
    /// Write the result as JSON to this file.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
    /// Draw ack latency over time as SVG to this file.
    #[arg(long, value_name = "PATH.svg")]
    pub plot: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Seed of the event mix (the run id stays random so runs never collide).
    #[arg(long)]
    pub seed: Option<u64>,
}

impl LoadgenArgs {
    /// Parses the options exactly as `loadgen <args>` would, for code that drives the load
    /// generator (tests, scripts in Rust).
    pub fn from_args<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let argv = std::iter::once("loadgen".into()).chain(args.into_iter().map(Into::into));
        Self::try_parse_from(argv)
    }
}

impl std::fmt::Debug for LoadgenArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadgenArgs")
            .field("url", &self.url)
            .field("secret", &"***")
            .field("rate", &self.rate)
            .field("connections", &self.connections)
            .field("duration", &self.duration)
            .field("warmup", &self.warmup)
            .field("contacts", &self.contacts)
            .field("duplicate_share", &self.duplicate_share)
            .field("invalid_share", &self.invalid_share)
            .field("database_url", &self.database_url.as_ref().map(|_| "***"))
            .field("json", &self.json)
            .field("plot", &self.plot)
            .field("seed", &self.seed)
            .finish_non_exhaustive()
    }
}

/// `accepted` / `duplicate` as the 200 bodies said.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Outcomes {
    pub accepted: u64,
    pub duplicate: u64,
}

/// The result of one run (the `--json` file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadgenReport {
    /// `open` (fixed arrival rate) or `closed` (back-to-back senders).
    pub mode: String,
    pub url: String,
    /// Random per run; every event id is `evt_lg_<run_id>_<n>`.
    pub run_id: String,
    /// When the measured window started (RFC 3339).
    pub started_at: String,
    /// Events/s asked for (open loop only).
    pub target_rate: Option<f64>,
    /// Senders (closed loop) or the in-flight cap (open loop).
    pub connections: usize,
    /// Configured measured duration.
    pub duration_s: f64,
    pub warmup_s: f64,
    /// From the start of the measured window to the last measured answer.
    pub measured_s: f64,
    /// Requests sent in the measured window (warm-up excluded).
    pub sent: u64,
    /// Of which deliberately re-sent events and badly signed ones.
    pub duplicates_sent: u64,
    pub invalid_sent: u64,
    /// Measured requests that got an HTTP answer.
    pub completed: u64,
    /// `completed / measured_s`.
    pub achieved_rate: f64,
    /// HTTP status → count, plus `error` for requests without an answer.
    pub status_counts: BTreeMap<String, u64>,
    pub outcomes: Outcomes,
    /// From the scheduled send time to the answer.
    pub ack_latency_ms: LatencySummary,
    /// From the scheduled send time to `processed_at` (with --database-url).
    pub e2e_latency_ms: Option<LatencySummary>,
    /// Accepted events not processed within the wait (with --database-url).
    pub e2e_missing: Option<u64>,
}

impl LoadgenReport {
    /// A few lines for a human.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let target = self
            .target_rate
            .map_or(String::new(), |r| format!(", target {r:.0}/s"));
        out.push_str(&format!(
            "{} loop, {} connections{target}: {} sent in {:.2} s, {:.0} answers/s\n",
            self.mode, self.connections, self.sent, self.measured_s, self.achieved_rate
        ));
        let statuses: Vec<String> = self
            .status_counts
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        out.push_str(&format!(
            "status {{{}}}, accepted {}, duplicate {}\n",
            statuses.join(", "),
            self.outcomes.accepted,
            self.outcomes.duplicate
        ));
        let line = |name: &str, l: &LatencySummary| {
            format!(
                "{name} latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}  mean {:.2}\n",
                l.p50, l.p90, l.p99, l.p999, l.max, l.mean
            )
        };
        out.push_str(&line("ack", &self.ack_latency_ms));
        if let Some(e2e) = &self.e2e_latency_ms {
            out.push_str(&line("e2e", e2e));
        }
        if let Some(missing) = self.e2e_missing {
            out.push_str(&format!("not processed within the wait: {missing}\n"));
        }
        out
    }
}

/// What one request does.
#[derive(Debug, Clone, Copy)]
enum Plan {
    /// A new event (or, when `valid` is false, one signed with a wrong key).
    Send { spec: EventSpec, valid: bool },
    /// Re-send an event sent before, byte for byte.
    Resend(EventSpec),
}

/// Chooses what each request sends: one RNG and the pool of events a duplicate may repeat.
struct Planner {
    rng: StdRng,
    next_seq: u64,
    contacts: u32,
    duplicate_share: f64,
    invalid_share: f64,
    recent: VecDeque<EventSpec>,
}

impl Planner {
    fn next(&mut self) -> Plan {
        let roll: f64 = self.rng.random();
        if roll < self.duplicate_share && !self.recent.is_empty() {
            let index = self.rng.random_range(0..self.recent.len());
            return Plan::Resend(self.recent[index]);
        }
        let valid =
            roll >= self.duplicate_share + self.invalid_share || roll < self.duplicate_share;
        let spec = EventSpec {
            seq: self.next_seq,
            kind: Kind::pick(&mut self.rng),
            contact: self.rng.random_range(0..self.contacts.max(1)),
            updated_ms: unix_us(SystemTime::now()) / 1000,
        };
        self.next_seq += 1;
        if valid {
            if self.recent.len() == DUPLICATE_POOL {
                self.recent.pop_front();
            }
            self.recent.push_back(spec);
        }
        Plan::Send { spec, valid }
    }
}

/// What every request task shares.
struct Shared {
    client: reqwest::Client,
    url: reqwest::Url,
    factory: EventFactory,
    planner: Mutex<Planner>,
    stats: Mutex<Stats>,
    /// Start of the measured window.
    measure_start: Instant,
    /// Wall-clock time of `measure_start`, to turn due times into unix time.
    measure_start_unix_us: i64,
    /// Requests started, warm-up included (for the progress bar).
    issued: AtomicU64,
    sent: AtomicU64,
    duplicates_sent: AtomicU64,
    invalid_sent: AtomicU64,
}

impl Shared {
    fn plan(&self) -> Plan {
        self.planner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .next()
    }

    /// Sends `plan`, due at `due`, and records the answer.
    async fn execute(&self, plan: Plan, due: Instant) {
        let measured = due >= self.measure_start;
        let (spec, valid) = match plan {
            Plan::Send { spec, valid } => (spec, valid),
            Plan::Resend(spec) => (spec, true),
        };
        self.issued.fetch_add(1, Ordering::Relaxed);
        if measured {
            self.sent.fetch_add(1, Ordering::Relaxed);
            match plan {
                Plan::Resend(_) => self.duplicates_sent.fetch_add(1, Ordering::Relaxed),
                Plan::Send { valid: false, .. } => {
                    self.invalid_sent.fetch_add(1, Ordering::Relaxed)
                }
                Plan::Send { .. } => 0,
            };
        }
        let body = self.factory.body(&spec);
        let signature = self.factory.signature(body.as_bytes(), valid);
        let now_s = unix_us(SystemTime::now()) / 1_000_000;
        let answer = match self
            .client
            .post(self.url.clone())
            .header("Content-Type", "application/json")
            .header("X-Acme-Signature", signature)
            .header("X-Acme-Timestamp", now_s)
            .body(body)
            .send()
            .await
        {
            Ok(response) => {
                let status = response.status().as_u16();
                match response.bytes().await {
                    Ok(bytes) if status == 200 => Answer::Status(status, parse_ack(&bytes)),
                    Ok(_) => Answer::Status(status, None),
                    Err(_) => Answer::TransportError,
                }
            }
            Err(_) => Answer::TransportError,
        };
        let latency_us = u64::try_from(due.elapsed().as_micros()).unwrap_or(u64::MAX);
        let offset_s = if measured {
            due.duration_since(self.measure_start).as_secs_f64()
        } else {
            -self.measure_start.duration_since(due).as_secs_f64()
        };
        let completion = Completion {
            seq: spec.seq,
            measured,
            scheduled_offset_s: offset_s,
            scheduled_unix_us: self.measure_start_unix_us + (offset_s * 1e6) as i64,
            latency_us,
            answer,
        };
        self.stats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .record(completion);
    }
}

/// The `status` field of a 200 answer (`{"eventId": …, "status": "accepted"|"duplicate"}`).
fn parse_ack(body: &[u8]) -> Option<Ack> {
    #[derive(Deserialize)]
    struct AckBody<'a> {
        #[serde(borrow)]
        status: &'a str,
    }
    match serde_json::from_slice::<AckBody<'_>>(body).ok()?.status {
        "accepted" => Some(Ack::Accepted),
        "duplicate" => Some(Ack::Duplicate),
        _ => None,
    }
}

fn unix_us(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

fn validate(args: &LoadgenArgs) -> anyhow::Result<()> {
    let share_ok = |s: f64| (0.0..=1.0).contains(&s);
    anyhow::ensure!(
        share_ok(args.duplicate_share)
            && share_ok(args.invalid_share)
            && args.duplicate_share + args.invalid_share <= 1.0,
        "--duplicate-share and --invalid-share must be in 0..=1 and add up to at most 1"
    );
    anyhow::ensure!(
        args.duration > 0.0 && args.duration.is_finite(),
        "--duration must be > 0"
    );
    anyhow::ensure!(
        args.warmup >= 0.0 && args.warmup.is_finite(),
        "--warmup must be >= 0"
    );
    if let Some(rate) = args.rate {
        anyhow::ensure!(rate > 0.0 && rate.is_finite(), "--rate must be > 0");
    }
    anyhow::ensure!(
        args.connections != Some(0),
        "--connections must be at least 1"
    );
    anyhow::ensure!(args.contacts > 0, "--contacts must be at least 1");
    Ok(())
}

/// Runs the load, waits for processing when a database URL is given, writes `--json` and
/// `--plot`, and returns the report.
pub async fn run(args: LoadgenArgs) -> anyhow::Result<LoadgenReport> {
    validate(&args)?;
    let url = reqwest::Url::parse(&args.url).context("--url is not a URL")?;
    let open = args.rate.is_some();
    let connections = args.connections.unwrap_or(if open {
        DEFAULT_OPEN_CONNECTIONS
    } else {
        DEFAULT_CLOSED_CONNECTIONS
    });
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(connections)
        .tcp_nodelay(true)
        .timeout(REQUEST_TIMEOUT)
        .build()
        .context("building the HTTP client")?;
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let seed = args.seed.unwrap_or_else(rand::random);
    let warmup = Duration::from_secs_f64(args.warmup);
    let duration = Duration::from_secs_f64(args.duration);
    let t0 = Instant::now();
    let measure_start = t0 + warmup;
    let measure_start_unix_us = unix_us(SystemTime::now() + warmup);
    let shared = Arc::new(Shared {
        client,
        url,
        factory: EventFactory::new(&run_id, args.secret.as_bytes()),
        planner: Mutex::new(Planner {
            rng: StdRng::seed_from_u64(seed),
            next_seq: 0,
            contacts: args.contacts,
            duplicate_share: args.duplicate_share,
            invalid_share: args.invalid_share,
            recent: VecDeque::with_capacity(DUPLICATE_POOL),
        }),
        stats: Mutex::new(Stats::new()),
        measure_start,
        measure_start_unix_us,
        issued: AtomicU64::new(0),
        sent: AtomicU64::new(0),
        duplicates_sent: AtomicU64::new(0),
        invalid_sent: AtomicU64::new(0),
    });
    let end = measure_start + duration;
    let progress = progress_bar(args.quiet, t0, end, Arc::clone(&shared));

    if let Some(rate) = args.rate {
        open_loop(&shared, t0, end, rate, connections).await;
    } else {
        closed_loop(&shared, t0, end, connections).await?;
    }
    // The bar's task ends by itself at the end of the window.
    let _ = progress.await;

    let stats = std::mem::take(
        &mut *shared
            .stats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    let measured_s = stats
        .last_completion
        .map_or(duration, |last| last.max(end).duration_since(measure_start))
        .as_secs_f64();
    let (e2e_latency_ms, e2e_missing) = match &args.database_url {
        Some(database_url) => {
            if !args.quiet {
                eprintln!(
                    "waiting for {} accepted events to be processed",
                    stats.accepted
                );
            }
            let e2e = e2e::measure(
                database_url,
                &shared.factory,
                &stats.accepted_at,
                stats.accepted + stats.warmup_accepted,
                Duration::from_secs_f64(args.e2e_timeout.max(0.0)),
            )
            .await?;
            (e2e.latency, Some(e2e.missing))
        }
        None => (None, None),
    };
    let report = LoadgenReport {
        mode: if open { "open" } else { "closed" }.to_owned(),
        url: args.url.clone(),
        run_id,
        started_at: chrono::DateTime::<chrono::Utc>::from_timestamp_micros(measure_start_unix_us)
            .unwrap_or_default()
            .to_rfc3339(),
        target_rate: args.rate,
        connections,
        duration_s: args.duration,
        warmup_s: args.warmup,
        measured_s,
        sent: shared.sent.load(Ordering::Relaxed),
        duplicates_sent: shared.duplicates_sent.load(Ordering::Relaxed),
        invalid_sent: shared.invalid_sent.load(Ordering::Relaxed),
        completed: stats.completed,
        achieved_rate: stats.completed as f64 / measured_s,
        status_counts: stats.status_counts.clone(),
        outcomes: Outcomes {
            accepted: stats.accepted,
            duplicate: stats.duplicate,
        },
        ack_latency_ms: LatencySummary::of(&stats.ack),
        e2e_latency_ms,
        e2e_missing,
    };
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report).context("serialising the report")?;
        std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        let title = match args.rate {
            Some(rate) => {
                format!("ack latency, open loop at {rate:.0}/s ({connections} max in flight)")
            }
            None => format!("ack latency, closed loop with {connections} connections"),
        };
        plot::draw(path, &stats.samples, measured_s, &title)?;
    }
    Ok(report)
}

/// Request `i` is due at `t0 + i/rate`; each is spawned at its due time (or at once when the
/// scheduler is late) and timed from the due time. At most `cap` are in flight: past that the
/// scheduler waits, and the wait shows up in the latency of the requests it delays.
async fn open_loop(shared: &Arc<Shared>, t0: Instant, end: Instant, rate: f64, cap: usize) {
    let in_flight = Arc::new(Semaphore::new(cap));
    let total = (end.duration_since(t0).as_secs_f64() * rate).ceil() as u64;
    for i in 0..total {
        let due = t0 + Duration::from_secs_f64(i as f64 / rate);
        if due >= end {
            break;
        }
        if due > Instant::now() {
            tokio::time::sleep_until(due.into()).await;
        }
        let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else {
            break;
        };
        let plan = shared.plan();
        let shared = Arc::clone(shared);
        tokio::spawn(async move {
            shared.execute(plan, due).await;
            drop(permit);
        });
    }
    // Every permit back means every request finished.
    let all = u32::try_from(cap).unwrap_or(u32::MAX);
    let _ = in_flight.acquire_many(all).await;
}

/// `connections` senders, each posting its next request as soon as the previous one answered.
async fn closed_loop(
    shared: &Arc<Shared>,
    t0: Instant,
    end: Instant,
    connections: usize,
) -> anyhow::Result<()> {
    let mut senders = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let shared = Arc::clone(shared);
        senders.spawn(async move {
            loop {
                let due = Instant::now().max(t0);
                if due >= end {
                    break;
                }
                let plan = shared.plan();
                shared.execute(plan, due).await;
            }
        });
    }
    while let Some(result) = senders.join_next().await {
        result.context("a sender task failed")?;
    }
    Ok(())
}

/// A progress bar on stderr (hidden with --quiet or when stderr is not a terminal), updated
/// by its own task so the request path never touches it.
fn progress_bar(
    quiet: bool,
    t0: Instant,
    end: Instant,
    shared: Arc<Shared>,
) -> tokio::task::JoinHandle<()> {
    let total_ms = u64::try_from(end.duration_since(t0).as_millis()).unwrap_or(u64::MAX);
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total_ms)
    };
    if let Ok(style) =
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {percent}% {msg}")
    {
        bar.set_style(style);
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        let mut last = (Instant::now(), 0u64);
        loop {
            tick.tick().await;
            let now = Instant::now();
            let sent = shared.issued.load(Ordering::Relaxed);
            let rate = (sent - last.1) as f64 / now.duration_since(last.0).as_secs_f64().max(1e-3);
            last = (now, sent);
            let phase = if now < shared.measure_start {
                "warm-up"
            } else {
                "measuring"
            };
            bar.set_position(u64::try_from(now.duration_since(t0).as_millis()).unwrap_or(0));
            bar.set_message(format!("{phase}: {sent} sent, {rate:.0}/s"));
            if now >= end {
                bar.finish_and_clear();
                break;
            }
        }
    })
}

/// The `loadgen` binary: runs, then prints the summary on stdout.
pub async fn main(args: LoadgenArgs) -> anyhow::Result<()> {
    let report = run(args).await?;
    print!("{}", report.summary());
    Ok(())
}
