//! Integration tests against real PostgreSQL and real Apache Kafka (scripts/kafka).
//! Run them with `scripts/test`, which provides both.
mod console;
mod consumers;
mod contract;
mod convergence;
mod docs;
mod embedded;
mod hostile;
mod ingest;
mod loadgen;
mod monitoring;
mod operations;
mod pipeline;
mod poison;
mod process;
mod replication;
mod retention;
mod support;
