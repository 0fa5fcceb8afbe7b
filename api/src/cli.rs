//! The `acme-webhooks` command line.
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::app::{Roles, Service};
use crate::config::Config;
use crate::{db, dev, telemetry};

/// Receives AcmeCRM webhooks and processes every one exactly once.
#[derive(Parser, Debug)]
#[command(name = "acme-webhooks", version, about)]
pub struct Cli {
    /// Config file (default: ./acme-webhooks.toml when it exists).
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run only the HTTP API (webhook ingest, contacts, admin, ops endpoints).
    Serve,
    /// Run only the outbox relay (several may run at once).
    Relay,
    /// Run only the Kafka consumer (several may run at once, one consumer group).
    Consume,
    /// Apply database migrations and exit.
    Migrate,
    /// Print the OpenAPI spec as YAML (no database needed).
    Openapi,
}

/// Entry point of the binary.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(Command::Openapi) = cli.command {
        print!("{}", crate::app::openapi_yaml());
        return Ok(());
    }
    let command = cli.command;
    let config = Config::load(cli.config.as_deref())?;
    telemetry::init_tracing(&config.log);
    let roles = match command {
        None => Roles::ALL,
        Some(Command::Serve) => Roles::HTTP,
        Some(Command::Relay) => Roles::RELAY,
        Some(Command::Consume) => Roles::CONSUMER,
        Some(Command::Migrate) => {
            let db = db::connect(&config)
                .await
                .context("connecting to the database")?;
            db::migrate(&db).await.context("migrating the database")?;
            println!("migrations applied");
            return Ok(());
        }
        Some(Command::Openapi) => unreachable!("handled above"),
    };
    let generated_secret = config.webhook.secrets.is_empty();
    let service = Service::start(config.clone(), roles, None).await?;
    if let Some(addr) = service.http_addr {
        if config.is_embedded_database() {
            println!(
                "{}",
                dev::banner(&config, addr, &service.secrets, generated_secret)
            );
        } else {
            tracing::info!(%addr, "listening; Swagger UI at /docs");
        }
    }
    let stop = service.shutdown_token();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutdown requested; finishing in-flight work");
        stop.cancel();
    });
    service.wait().await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
