//! The two background roles of this crate, each started by one call: the outbox relay (with
//! retention) and the consumer (with its lag reporting). The service's `Service::start` joins
//! them with the HTTP role under one shutdown token.
use std::time::Duration;

use anyhow::Context;
use sea_orm::{DatabaseBackend, DatabaseConnection};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::bus::{BusSink, BusSource};
use crate::config::{ConsumerConfig, KafkaConfig, RelayConfig, RetentionConfig};
use crate::consume::{EventProcessor, KafkaEventConsumer, LagReporter, run_in_process};
use crate::outbox::republish_pending;
use crate::publish::{OutboxWakeup, Relay};
use crate::retention::Retention;

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
    let publisher = sink.connect().await?;
    let mut relay = Relay::new(db.clone(), publisher, settings.relay.clone());
    if recreate_topics {
        relay = relay.recreate_topics_after_failures(settings.kafka.clone());
    }
    // Several loops overlap one batch's database work with another's delivery wait;
    // SKIP LOCKED keeps their batches apart.
    for _ in 1..settings.relay.workers {
        tasks.spawn(relay.another_loop().run(wakeup.clone(), shutdown.clone()));
    }
    tasks.spawn(relay.run(wakeup.clone(), shutdown.clone()));
    if settings.retention.enabled {
        tasks.spawn(Retention::new(db.clone(), settings.retention).run(shutdown.clone()));
    }
    Ok(())
}

/// Starts the consumer reading `source`: `consumer.members` group members over Kafka (with a
/// loop reporting their lag every `lag_every`, whose reporter is returned for readiness), or
/// the in-process consumer.
pub async fn spawn_consumer(
    tasks: &mut JoinSet<()>,
    db: &DatabaseConnection,
    config: ConsumerConfig,
    source: BusSource,
    lag_every: Duration,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<LagReporter>> {
    let kafka = match source {
        BusSource::InProcess(receiver) => {
            tasks.spawn(run_in_process(
                EventProcessor::new(db.clone()),
                receiver,
                config,
                shutdown.clone(),
            ));
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
        members.push(
            KafkaEventConsumer::connect(db.clone(), kafka.clone(), config.clone())
                .await
                .context("creating the Kafka consumer")?,
        );
    }
    let lag = KafkaEventConsumer::lag_reporter(&members);
    tasks.spawn(report_lag(lag.clone(), lag_every, shutdown.clone()));
    for member in members {
        tasks.spawn(member.run(shutdown.clone()));
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
