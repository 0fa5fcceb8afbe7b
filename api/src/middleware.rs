//! Cross-cutting HTTP concerns: request ids and the rejections decided before a handler runs.
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use poem::http::{HeaderValue, StatusCode, header};
use poem::{Body, Endpoint, IntoResponse, Request, Response};
use tracing::Instrument;

use crate::error::ApiError;

/// Header carrying the request id, honoured when the client sends one.
pub const REQUEST_ID: &str = "x-request-id";

/// Gives every request an id (the client's `X-Request-Id`, else a new UUID), puts it in the
/// request's span and echoes it; counts webhook bodies refused for size, content type or time.
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
        Err(error) => ApiError::from_poem(error),
    };
    if is_webhook {
        let reason = match response.status() {
            StatusCode::PAYLOAD_TOO_LARGE => Some("payload_too_large"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => Some("unsupported_media_type"),
            StatusCode::REQUEST_TIMEOUT => Some("request_timeout"),
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

/// The request body must arrive in full within `timeout` of the request's head: a client that
/// stalls mid-body gets 408 and the connection is closed, whichever handler was reading.
pub async fn read_body_within<E: Endpoint>(
    next: E,
    mut request: Request,
    timeout: Duration,
) -> poem::Result<Response> {
    let timed_out = Arc::new(AtomicBool::new(false));
    let body = request.take_body().into_bytes_stream();
    request.set_body(Body::from_bytes_stream(BodyDeadline {
        inner: Box::pin(body),
        deadline: Box::pin(tokio::time::sleep(timeout)),
        timed_out: timed_out.clone(),
    }));
    let result = next.call(request).await;
    if timed_out.load(Ordering::Relaxed) {
        let mut response = ApiError::request_timeout(timeout).into_response();
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return Ok(response);
    }
    result.map(IntoResponse::into_response)
}

/// A body stream that fails with `TimedOut` once its deadline passes.
struct BodyDeadline<S> {
    inner: Pin<Box<S>>,
    deadline: Pin<Box<tokio::time::Sleep>>,
    timed_out: Arc<AtomicBool>,
}

impl<S, T> Stream for BodyDeadline<S>
where
    S: Stream<Item = std::io::Result<T>>,
{
    type Item = std::io::Result<T>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Poll::Ready(item) = self.inner.as_mut().poll_next(cx) {
            return Poll::Ready(item);
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            self.timed_out.store(true, Ordering::Relaxed);
            return Poll::Ready(Some(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "request body read timed out",
            ))));
        }
        Poll::Pending
    }
}
