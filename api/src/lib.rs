//! acme-webhooks: receives AcmeCRM's signed contact events, stores each with an outbox row in one
//! transaction, relays the outbox to Kafka and applies every event exactly once.
pub mod app;
pub mod cli;
pub mod client_ip;
pub mod config;
pub mod console;
pub mod db;
pub mod dev;
pub mod error;
pub mod http_server;
pub mod ingest;
pub mod middleware;
pub mod overview;
pub mod raw_body;
pub mod routes;
pub mod schema;
pub mod signature;
pub mod strict_json;
pub mod telemetry;
pub mod timestamp;
pub mod validation;

pub use app::{Roles, Service, make_api_service};
pub use config::Config;
