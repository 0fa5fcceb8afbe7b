//! `loadgen`: signed load against a running acme-webhooks service (see the README).
use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = loadgen::LoadgenArgs::parse();
    match loadgen::main(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
