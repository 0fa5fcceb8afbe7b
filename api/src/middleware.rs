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

use crate::error::{ApiError, code};

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
        let refused = match response.status() {
            StatusCode::PAYLOAD_TOO_LARGE => Some(code::PAYLOAD_TOO_LARGE),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => Some(code::UNSUPPORTED_MEDIA_TYPE),
            StatusCode::REQUEST_TIMEOUT => Some(code::REQUEST_TIMEOUT),
            _ => None,
        };
        if let Some(code) = refused {
            crate::telemetry::count_rejection(code);
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

/// The methods each path of an OpenAPI service answers, for the `Allow` header of a 405
/// (RFC 9110 §15.5.6: a 405 MUST list them). Built from the same metadata as the spec.
#[derive(Debug, Clone)]
pub struct AllowedMethods {
    /// Path templates split into segments (`None` for a `{parameter}`), with their `Allow` value.
    routes: Arc<Vec<(Vec<Option<String>>, HeaderValue)>>,
}

impl AllowedMethods {
    /// The table of the operations of `A`.
    pub fn of<A: poem_openapi::OpenApi>() -> Self {
        let mut routes = Vec::new();
        for path in A::meta().into_iter().flat_map(|api| api.paths) {
            let mut methods: Vec<String> = path
                .operations
                .iter()
                .map(|op| op.method.as_str().to_owned())
                .collect();
            // poem answers HEAD wherever it answers GET.
            if methods.iter().any(|m| m == "GET") {
                methods.push("HEAD".to_owned());
            }
            methods.sort();
            methods.dedup();
            let segments = path
                .path
                .split('/')
                .map(|segment| {
                    (!(segment.starts_with('{') && segment.ends_with('}')))
                        .then(|| segment.to_owned())
                })
                .collect();
            if let Ok(value) = HeaderValue::from_str(&methods.join(", ")) {
                routes.push((segments, value));
            }
        }
        Self {
            routes: Arc::new(routes),
        }
    }

    /// The `Allow` value of the route poem would pick for `path`: a literal segment wins over a
    /// parameter, as in poem's router.
    pub fn lookup(&self, path: &str) -> Option<&HeaderValue> {
        let segments: Vec<&str> = path.split('/').collect();
        self.routes
            .iter()
            .filter(|(template, _)| {
                template.len() == segments.len()
                    && template.iter().zip(&segments).all(|(t, s)| match t {
                        Some(literal) => literal == s,
                        None => !s.is_empty(),
                    })
            })
            .max_by(|(a, _), (b, _)| {
                // Compare literal-ness segment by segment, the first difference decides.
                let key =
                    |t: &Vec<Option<String>>| t.iter().map(Option::is_some).collect::<Vec<_>>();
                key(a).cmp(&key(b))
            })
            .map(|(_, value)| value)
    }
}

/// Gives every 405 answer its `Allow` header.
pub async fn allow_on_405<E: Endpoint>(
    next: E,
    request: Request,
    allowed: AllowedMethods,
) -> poem::Result<Response> {
    let path = request.uri().path().to_owned();
    let mut response = match next.call(request).await {
        Ok(response) => response.into_response(),
        Err(error) if error.status() == StatusCode::METHOD_NOT_ALLOWED => {
            ApiError::from_poem(error)
        }
        Err(error) => return Err(error),
    };
    if response.status() == StatusCode::METHOD_NOT_ALLOWED
        && let Some(value) = allowed.lookup(&path)
    {
        response.headers_mut().insert(header::ALLOW, value.clone());
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::AllowedMethods;
    use crate::routes::admin::AdminApi;
    use crate::routes::contacts::ContactsApi;
    use crate::routes::health::HealthApi;
    use crate::routes::webhooks::WebhookApi;

    #[test]
    fn allow_lists_the_methods_of_the_route_the_router_picks() {
        let allowed = AllowedMethods::of::<(WebhookApi, ContactsApi, AdminApi, HealthApi)>();
        let allow = |path: &str| allowed.lookup(path).and_then(|v| v.to_str().ok());
        assert_eq!(allow("/api/webhooks"), Some("POST"));
        assert_eq!(allow("/metrics"), Some("GET, HEAD"));
        assert_eq!(allow("/api/contacts/c1"), Some("GET, HEAD"));
        assert_eq!(allow("/api/admin/events/evt_1"), Some("GET, HEAD"));
        assert_eq!(allow("/api/admin/events/evt_1/retry"), Some("POST"));
        // A literal segment beats `{event_id}`.
        assert_eq!(allow("/api/admin/events/retry"), Some("POST"));
        assert_eq!(allow("/api/contacts/"), None);
        assert_eq!(allow("/nowhere"), None);
    }
}
