//! `POST /api/webhooks`.
use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use poem::Request;
use poem::web::Data;
use poem_openapi::param::Header;
use poem_openapi::payload::Json;
use poem_openapi::registry::MetaSchemaRef;
use poem_openapi::types::{ParseFromParameter, ParseResult, Type};
use poem_openapi::{ApiResponse, OpenApi};
use relay::metrics as names;
use tracing::Instrument;

use crate::app::AppState;
use crate::error::{ApiError, ApiResult, code};
use crate::ingest::IngestOutcome;
use crate::raw_body::RawJsonBody;
use crate::routes::ApiTags;
use crate::schema::{AckStatus, WebhookAck};
use crate::telemetry::{self, Outcome};
use crate::timestamp::check_freshness;
use crate::validation::validate_event;

pub struct WebhookApi;

#[derive(ApiResponse)]
pub enum WebhookResponse {
    /// The event is durably stored with its outbox row (`accepted`), or was stored before
    /// (`duplicate`). Either way AcmeCRM can stop retrying.
    #[oai(status = 200)]
    Ok(Json<WebhookAck>),
}

/// A header the spec declares `required` whose absence the handler answers itself (401, like a
/// wrong value), instead of poem's parameter parsing (400).
pub struct RequiredHeader(pub Option<String>);

impl Type for RequiredHeader {
    const IS_REQUIRED: bool = true;
    type RawValueType = String;
    type RawElementValueType = String;

    fn name() -> Cow<'static, str> {
        String::name()
    }

    fn schema_ref() -> MetaSchemaRef {
        String::schema_ref()
    }

    fn as_raw_value(&self) -> Option<&Self::RawValueType> {
        self.0.as_ref()
    }

    fn raw_element_iter<'a>(
        &'a self,
    ) -> Box<dyn Iterator<Item = &'a Self::RawElementValueType> + 'a> {
        Box::new(self.0.iter())
    }
}

impl ParseFromParameter for RequiredHeader {
    fn parse_from_parameter(value: &str) -> ParseResult<Self> {
        Ok(Self(Some(value.to_owned())))
    }

    fn parse_from_parameters<I: IntoIterator<Item = A>, A: AsRef<str>>(
        iter: I,
    ) -> ParseResult<Self> {
        Ok(Self(iter.into_iter().next().map(|v| v.as_ref().to_owned())))
    }
}

/// `error`, counted and logged as a refused webhook under its code.
fn rejected(error: impl Into<ApiError>) -> ApiError {
    let error = error.into();
    telemetry::count_rejection(error.code());
    tracing::info!(reason = error.code(), "webhook rejected");
    error
}

#[OpenApi(tag = "ApiTags::Webhooks")]
impl WebhookApi {
    /// Receive an AcmeCRM contact event
    ///
    /// Checks, in this order: body size and content type, the HMAC-SHA256 signature of the raw
    /// body, the timestamp window, the client IP allowlist, then the JSON body. A 200 means the
    /// event and its outbox row are committed in one transaction; processing happens after.
    /// Any non-2xx answer changed nothing, and a 500 may be retried.
    ///
    /// The body schema has one variant per `event` type (`oneOf`, discriminated by `event`):
    /// `contact.created` and `contact.updated` need the contact's id, first and last name, email,
    /// `createdAt` and `updatedAt`; `contact.deleted` needs only `data.id`.
    ///
    /// What the schema cannot say, and the service checks all the same (400, every offending
    /// field in `details`): no string or key anywhere in the body, unknown fields included,
    /// contains U+0000; no object repeats a key; ids are at most 255 *bytes* of UTF-8
    /// (`maxLength` counts characters); nesting deeper than 128 levels and numbers beyond a
    /// 64-bit float are not valid JSON here. The other way round, the service accepts a little
    /// more than the schema: date-times with a space in place of `T`, and email addresses beyond
    /// RFC 5321's ASCII `format: email` (letters and digits of any script in the domain, any
    /// non-space character in a local part of at most 64 bytes: `ü@bücher.de`, `a..b@x.org`).
    #[oai(
        path = "/api/webhooks",
        method = "post",
        operation_id = "receiveWebhook"
    )]
    async fn receive(
        &self,
        state: Data<&Arc<AppState>>,
        request: &Request,
        /// `hex(HMAC-SHA256(secret, raw body))`, optionally prefixed `sha256=`, either case.
        /// Missing or wrong: 401.
        #[oai(name = "X-Acme-Signature")]
        signature: Header<RequiredHeader>,
        /// When the webhook was sent: unix seconds, unix milliseconds or RFC 3339. Missing, or
        /// more than `webhook.timestamp_tolerance_secs` (default 300) from now either way: 401.
        #[oai(name = "X-Acme-Timestamp")]
        timestamp: Header<RequiredHeader>,
        body: RawJsonBody,
    ) -> ApiResult<WebhookResponse> {
        let started = Instant::now();
        let body = body.0;
        state
            .verifier
            .verify(signature.0.0.as_deref(), &body)
            .map_err(rejected)?;
        let tolerance = state.config.webhook.timestamp_tolerance_secs;
        check_freshness(timestamp.0.0.as_deref(), Utc::now(), tolerance).map_err(rejected)?;
        if state.ip_policy.is_enabled() {
            let peer = request.remote_addr().as_socket_addr().map(|a| a.ip());
            let forwarded_for = request.header("X-Forwarded-For");
            let allowed = peer.is_some_and(|peer| {
                state
                    .ip_policy
                    .allows(state.ip_policy.client_ip(peer, forwarded_for))
            });
            if !allowed {
                return Err(rejected(ApiError::forbidden(
                    code::IP_FORBIDDEN,
                    "the client address is not allowed to post webhooks",
                )));
            }
        }
        let event = validate_event(&body).map_err(rejected)?;

        let event_id = event.event_id.clone();
        let span = tracing::info_span!("ingest", event_id = %event_id, event_type = event.event_type.as_str());
        let outcome = state
            .writer
            .ingest(event)
            .instrument(span.clone())
            .await
            .map_err(|error| {
                telemetry::count_outcome(Outcome::Error);
                ApiError::from(error)
            })?;
        metrics::histogram!(names::WEBHOOK_INGEST_SECONDS).record(started.elapsed().as_secs_f64());
        let _in_span = span.enter(); // no await below: the outcome is logged with the event id
        let status = match outcome {
            IngestOutcome::Accepted => {
                telemetry::count_outcome(Outcome::Accepted);
                tracing::info!("webhook accepted");
                AckStatus::Accepted
            }
            IngestOutcome::Duplicate => {
                telemetry::count_outcome(Outcome::Duplicate);
                tracing::info!("duplicate webhook acknowledged");
                AckStatus::Duplicate
            }
        };
        Ok(WebhookResponse::Ok(Json(WebhookAck { event_id, status })))
    }
}
