//! The two background roles of this crate, each started by one call: the outbox relay (with
//! retention) and the consumer (with its lag reporting). The service's `Service::start` joins
//! them with the HTTP role under one shutdown token.
//!
//! They run on a runtime of their own, [`Background`], whose threads (and the Kafka client's,
//! which inherit their priority) may run at a lower CPU priority than HTTP and ingest: on a
//! busy host the sender's ack comes first, and the relay and the consumer take what is left.
use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::Context;
use sea_orm::{DatabaseBackend, DatabaseConnection};
use tokio::runtime::{Handle, Runtime};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::bus::{BusSink, BusSource};
use crate::config::{ConsumerConfig, KafkaConfig, RelayConfig, RetentionConfig};
use crate::consume::{EventProcessor, KafkaEventConsumer, LagReporter, run_in_process};
use crate::outbox::republish_pending;
use crate::publish::{OutboxWakeup, Relay};
use crate::retention::Retention;

/// Where the background roles run: the caller's runtime, or (with a positive `nice`) a runtime
/// whose worker threads run `nice` steps below the process's priority (Linux `setpriority` on
/// each thread; elsewhere the priority stays).
#[derive(Clone)]
pub struct Background {
    handle: Handle,
}

impl Background {
    /// With `nice == 0`, the current runtime; otherwise the process's background runtime, made
    /// on first use (one per process: its `nice` is the first caller's).
    pub fn new(nice: i32) -> Self {
        if nice <= 0 {
            return Self {
                handle: Handle::current(),
            };
        }
        static RUNTIME: OnceLock<Runtime> = OnceLock::new();
        let runtime = RUNTIME.get_or_init(|| {
            // Every thread of the runtime (its blocking pool's too, started from its workers)
            // gets the same value: `nice` below the thread that made the runtime.
            let priority = current_priority() + nice;
            tokio::runtime::Builder::new_multi_thread()
                .thread_name("background")
                .on_thread_start(move || set_priority(priority))
                .enable_all()
                .build()
                .expect("the background runtime starts")
        });
        Self {
            handle: runtime.handle().clone(),
        }
    }

    /// Runs `future` to completion on a background thread (a Kafka client created there starts
    /// its threads at the background priority).
    pub async fn run<F>(&self, future: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match self.handle.spawn(future).await {
            Ok(output) => output,
            Err(error) => std::panic::resume_unwind(error.into_panic()),
        }
    }

    fn spawn<F>(&self, tasks: &mut JoinSet<()>, future: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        tasks.spawn_on(future, &self.handle);
    }
}

/// The calling thread's nice value (0 where there is none to read).
fn current_priority() -> i32 {
    #[cfg(target_os = "linux")]
    return rustix::process::getpriority_process(None).unwrap_or(0);
    #[cfg(not(target_os = "linux"))]
    0
}

/// Sets the calling thread's nice value (on Linux it belongs to the thread, and the threads it
/// starts inherit it).
fn set_priority(priority: i32) {
    #[cfg(target_os = "linux")]
    if let Err(error) = rustix::process::setpriority_process(None, priority) {
        tracing::warn!(priority, %error, "could not lower the background threads' priority");
    }
    #[cfg(not(target_os = "linux"))]
    let _ = priority;
}

/// What the relay role is configured with.
pub struct RelaySettings {
    pub kafka: KafkaConfig,
    pub relay: RelayConfig,
    pub retention: RetentionConfig,
}

/// Starts the relay loops (`relay.workers`) publishing through `sink`, and retention when
/// enabled.
pub async fn spawn_relay(
    tasks: &mut JoinSet<()>,
    background: &Background,
    db: &DatabaseConnection,
    settings: RelaySettings,
    sink: BusSink,
    wakeup: &OutboxWakeup,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let recreate_topics = matches!(sink, BusSink::Kafka(_)) && settings.kafka.create_topics;
    if matches!(sink, BusSink::InProcess(_)) {
        // The in-process bus forgot its queue when the process stopped.
        let requeued = republish_pending(
            db,
            Duration::ZERO,
            "re-published: the in-process bus lost its queue at restart",
            u64::MAX,
        )
        .await?;
        if requeued > 0 {
            tracing::info!(requeued, "re-queued pending events for the in-process bus");
        }
    }
    let publisher = background.run(sink.connect()).await?;
    let mut relay = Relay::new(db.clone(), publisher, settings.relay.clone());
    if recreate_topics {
        relay = relay.recreate_topics_after_failures(settings.kafka.clone());
    }
    // Several loops overlap one batch's database work with another's delivery wait;
    // SKIP LOCKED keeps their batches apart.
    for _ in 1..settings.relay.workers {
        let relay = relay.another_loop();
        background.spawn(tasks, relay.run(wakeup.clone(), shutdown.clone()));
    }
    background.spawn(tasks, relay.run(wakeup.clone(), shutdown.clone()));
    if settings.retention.enabled {
        let retention = Retention::new(db.clone(), settings.retention);
        background.spawn(tasks, retention.run(shutdown.clone()));
    }
    Ok(())
}

/// Starts the consumer reading `source`: `consumer.members` group members over Kafka (with a
/// loop reporting their lag every `lag_every`, whose reporter is returned for readiness), or
/// the in-process consumer.
pub async fn spawn_consumer(
    tasks: &mut JoinSet<()>,
    background: &Background,
    db: &DatabaseConnection,
    config: ConsumerConfig,
    source: BusSource,
    lag_every: Duration,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<LagReporter>> {
    let kafka = match source {
        BusSource::InProcess(receiver) => {
            let processor = EventProcessor::new(db.clone());
            background.spawn(
                tasks,
                run_in_process(processor, receiver, config, shutdown.clone()),
            );
            return Ok(None);
        }
        BusSource::Kafka(kafka) => kafka,
    };
    if db.get_database_backend() != DatabaseBackend::Postgres {
        anyhow::bail!(
            "consuming from Kafka needs PostgreSQL (database.url): partition \
             ownership and offsets are kept there"
        );
    }
    let mut members = Vec::with_capacity(config.members);
    for _ in 0..config.members {
        let connect = KafkaEventConsumer::connect(db.clone(), kafka.clone(), config.clone());
        members.push(
            background
                .run(connect)
                .await
                .context("creating the Kafka consumer")?,
        );
    }
    let lag = KafkaEventConsumer::lag_reporter(&members);
    background.spawn(tasks, report_lag(lag.clone(), lag_every, shutdown.clone()));
    for member in members {
        background.spawn(tasks, member.run(shutdown.clone()));
    }
    Ok(Some(lag))
}

/// Reads the group's watermarks and reports its lag every `every`, until `shutdown`.
async fn report_lag(lag: LagReporter, every: Duration, shutdown: CancellationToken) {
    while !shutdown.is_cancelled() {
        lag.report().await;
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = tokio::time::sleep(every) => {}
        }
    }
}
