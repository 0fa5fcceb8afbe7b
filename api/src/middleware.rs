//! Cross-cutting HTTP concerns: request ids and the rejections decided before a handler runs.
use poem::http::{HeaderValue, StatusCode};
use poem::{Endpoint, IntoResponse, Request, Response};
use tracing::Instrument;

/// Header carrying the request id, honoured when the client sends one.
pub const REQUEST_ID: &str = "x-request-id";

/// Gives every request an id (the client's `X-Request-Id`, else a new UUID), puts it in the
/// request's span and echoes it; counts webhook bodies refused for size or content type.
pub async fn observe<E: Endpoint>(next: E, request: Request) -> poem::Result<Response> {
    let request_id = request
        .header(REQUEST_ID)
        .filter(|id| !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned);
    let is_webhook = request.uri().path() == "/api/webhooks";
    let span = tracing::info_span!("request", request_id = %request_id, method = %request.method(), path = %request.uri().path());
    let result = next.call(request).instrument(span).await;
    let mut response = match result {
        Ok(response) => response.into_response(),
        Err(error) => crate::error::ApiError::from_poem(error),
    };
    if is_webhook {
        let reason = match response.status() {
            StatusCode::PAYLOAD_TOO_LARGE => Some("payload_too_large"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => Some("unsupported_media_type"),
            _ => None,
        };
        if let Some(reason) = reason {
            crate::routes::webhooks::count_rejection(reason);
        }
    }
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    Ok(response)
}
