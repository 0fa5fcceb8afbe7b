//! The consumer of the in-process bus (embedded mode): one loop, no partitions, no dead-letter
//! topic (an event that can never be applied is marked `failed`, as on Kafka).
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::batch::EventProcessor;
use super::retry::{BatchEnd, IN_PROCESS, apply_until_committed, no_failed_attempts};
use crate::bus::BusMessage;
use crate::config::ConsumerConfig;

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
