//! The HTTP ceiling for `scripts/bench`: a poem server whose webhook handler reads the body and
//! answers 200 with the same JSON shape as the service, and does nothing else (no signature, no
//! validation, no database). `cargo run --release --example bare_poem -- 127.0.0.1:18080`
use poem::listener::TcpListener;
use poem::web::Json;
use poem::{Body, Route, Server, handler, post};
use serde_json::{Value, json};

#[handler]
async fn receive(body: Body) -> poem::Result<Json<Value>> {
    let bytes = body.into_bytes().await?;
    Ok(Json(
        json!({ "eventId": "bare", "status": "accepted", "bytes": bytes.len() }),
    ))
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18080".to_owned());
    let app = Route::new().at("/api/webhooks", post(receive));
    Server::new(TcpListener::bind(addr)).run(app).await
}
