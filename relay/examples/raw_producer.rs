//! The Kafka ceiling for `scripts/bench`: the relay's producer settings (idempotent, acks=all,
//! linger 2 ms) sending `count` messages of `size` bytes, with a key and two headers like an
//! outbox row, as fast as the broker takes them; prints one JSON line with the rate.
//! `cargo run --release -p relay --example raw_producer -- BROKERS TOPIC COUNT SIZE`
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, brokers, topic, count, size] = args.as_slice() else {
        anyhow::bail!("usage: raw_producer BROKERS TOPIC COUNT SIZE");
    };
    let count: usize = count.parse()?;
    let size: usize = size.parse()?;

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    admin
        .create_topics(
            &[NewTopic::new(topic, 3, TopicReplication::Fixed(1))],
            &options,
        )
        .await?;

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "2")
        .create()?;
    let payload = vec![b'x'; size];
    let keys: Vec<String> = (0..count)
        .map(|i| format!("contact-{}", i % 1000))
        .collect();
    let ids: Vec<String> = (0..count).map(|i| format!("evt-raw-{i}")).collect();
    let started = Instant::now();
    let deliveries = (0..count).map(|i| {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "event-id",
                value: Some(&ids[i]),
            })
            .insert(Header {
                key: "event-type",
                value: Some("contact.updated"),
            });
        let record = FutureRecord::to(topic)
            .key(&keys[i])
            .payload(&payload)
            .headers(headers);
        producer.send(record, Timeout::Never)
    });
    let reports = futures::future::join_all(deliveries).await;
    let elapsed = started.elapsed().as_secs_f64();
    let failed = reports.iter().filter(|r| r.is_err()).count();
    println!(
        "{{\"messages\": {count}, \"failed\": {failed}, \"seconds\": {elapsed:.3}, \"rate\": {:.1}}}",
        (count - failed) as f64 / elapsed
    );
    Ok(())
}
