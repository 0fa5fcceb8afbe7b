//! The service's one error type: every failure leaves as `{"code", "message", "details"?}`.
use poem::http::StatusCode;
use poem::{IntoResponse, Response};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object};

use crate::ingest::IngestError;
use crate::signature::SignatureError;
use crate::timestamp::TimestampError;
use crate::validation::{FieldError, ValidationError};

/// The `code` of every error answer: the value a client sees, and the `reason` label under
/// which a refused webhook is counted (`webhook_rejections_total`).
pub mod code {
    pub const SIGNATURE_INVALID: &str = "signature_invalid";
    pub const TIMESTAMP_INVALID: &str = "timestamp_invalid";
    pub const IP_FORBIDDEN: &str = "ip_forbidden";
    pub const PAYLOAD_INVALID: &str = "payload_invalid";
    pub const PAYLOAD_TOO_LARGE: &str = "payload_too_large";
    pub const UNSUPPORTED_MEDIA_TYPE: &str = "unsupported_media_type";
    pub const REQUEST_TIMEOUT: &str = "request_timeout";
    pub const FILTER_INVALID: &str = "filter_invalid";
    pub const EVENT_NOT_FAILED: &str = "event_not_failed";
    pub const NOT_FOUND: &str = "not_found";
    pub const UNAUTHORIZED: &str = "unauthorized";
    /// A console request from another site, or without the session's CSRF token.
    pub const CROSS_SITE: &str = "cross_site_request";
    pub const UNAVAILABLE: &str = "unavailable";
    pub const INTERNAL_ERROR: &str = "internal_error";
}

/// The body of every error response.
#[derive(Object, Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ErrorBody {
    /// Stable machine-readable code, e.g. `signature_invalid`, `payload_invalid`.
    pub code: String,
    /// Human-readable explanation. Never contains internal details.
    pub message: String,
    /// The offending fields, for validation errors.
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<Vec<ErrorDetail>>,
}

/// One offending field of a request.
#[derive(Object, Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ErrorDetail {
    /// JSON path of the field, e.g. `data.email`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl From<FieldError> for ErrorDetail {
    fn from(e: FieldError) -> Self {
        Self {
            field: e.field,
            message: e.message,
        }
    }
}

/// Every error status the API answers with.
#[derive(ApiResponse, Debug)]
pub enum ApiError {
    /// The body is not valid JSON or not a valid contact event; `details` lists every bad field.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// Missing or wrong signature, stale or unreadable timestamp, or a missing/wrong admin token.
    #[oai(status = 401)]
    Unauthorized(Json<ErrorBody>),
    /// The client IP is not in the configured allowlist.
    #[oai(status = 403)]
    Forbidden(Json<ErrorBody>),
    /// No such resource.
    #[oai(status = 404)]
    NotFound(Json<ErrorBody>),
    /// The request body did not arrive within `http.body_read_timeout_secs`; the connection is
    /// closed.
    #[oai(status = 408)]
    RequestTimeout(Json<ErrorBody>),
    /// The state of the resource does not allow this (e.g. retrying an event that did not fail).
    #[oai(status = 409)]
    Conflict(Json<ErrorBody>),
    /// The body is larger than `http.max_body_bytes`.
    #[oai(status = 413)]
    PayloadTooLarge(Json<ErrorBody>),
    /// The body is not `application/json`.
    #[oai(status = 415)]
    UnsupportedMediaType(Json<ErrorBody>),
    /// Something failed on our side (logged); nothing was acknowledged, so the sender should retry.
    #[oai(status = 500)]
    Internal(Json<ErrorBody>),
    /// A dependency (database, broker) is unavailable.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
}

fn body(code: &str, message: impl Into<String>) -> Json<ErrorBody> {
    Json(ErrorBody {
        code: code.to_owned(),
        message: message.into(),
        details: None,
    })
}

impl ApiError {
    pub fn bad_request(code: &str, message: impl Into<String>, details: Vec<ErrorDetail>) -> Self {
        let mut b = body(code, message);
        b.0.details = (!details.is_empty()).then_some(details);
        Self::BadRequest(b)
    }
    pub fn unauthorized(code: &str, message: impl Into<String>) -> Self {
        Self::Unauthorized(body(code, message))
    }
    pub fn forbidden(code: &str, message: impl Into<String>) -> Self {
        Self::Forbidden(body(code, message))
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::NotFound(body(code::NOT_FOUND, message))
    }
    pub fn conflict(code: &str, message: impl Into<String>) -> Self {
        Self::Conflict(body(code, message))
    }
    pub fn request_timeout(timeout: std::time::Duration) -> Self {
        Self::RequestTimeout(body(
            code::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {} s",
                timeout.as_secs()
            ),
        ))
    }
    pub fn payload_too_large(limit: usize) -> Self {
        Self::PayloadTooLarge(body(
            code::PAYLOAD_TOO_LARGE,
            format!("the body is larger than the {limit} bytes accepted"),
        ))
    }
    pub fn unsupported_media_type() -> Self {
        Self::UnsupportedMediaType(body(
            code::UNSUPPORTED_MEDIA_TYPE,
            "the body must be sent with Content-Type: application/json",
        ))
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::Unavailable(body(code::UNAVAILABLE, message))
    }

    /// Logs `error` with its context and answers a bare 500.
    pub fn internal(context: &str, error: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %error, "{context}");
        Self::Internal(body(
            code::INTERNAL_ERROR,
            "internal error; the request may be retried",
        ))
    }

    /// The answer's status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The `message` of the answer.
    pub fn message(&self) -> &str {
        &self.body().message
    }

    /// The `code` of the answer.
    pub fn code(&self) -> &str {
        &self.body().code
    }

    fn body(&self) -> &ErrorBody {
        let (Self::BadRequest(body)
        | Self::Unauthorized(body)
        | Self::Forbidden(body)
        | Self::NotFound(body)
        | Self::RequestTimeout(body)
        | Self::Conflict(body)
        | Self::PayloadTooLarge(body)
        | Self::UnsupportedMediaType(body)
        | Self::Internal(body)
        | Self::Unavailable(body)) = self;
        body
    }

    /// Converts errors raised outside our handlers (poem's parsers, routing) into our shape.
    pub fn from_poem(err: poem::Error) -> Response {
        // Our own error answers travel as errors too (so middleware sees them); keep them as is.
        if err.is_from_response() {
            return err.into_response();
        }
        let status = err.status();
        let api_error = match status {
            StatusCode::PAYLOAD_TOO_LARGE => match err.downcast_ref::<BodyTooLarge>() {
                Some(too_large) => Self::payload_too_large(too_large.limit),
                None => {
                    Self::PayloadTooLarge(body(code::PAYLOAD_TOO_LARGE, "the body is too large"))
                }
            },
            StatusCode::UNSUPPORTED_MEDIA_TYPE => Self::unsupported_media_type(),
            StatusCode::NOT_FOUND => Self::not_found("no such route"),
            StatusCode::UNAUTHORIZED => {
                Self::unauthorized(code::UNAUTHORIZED, "missing or invalid credentials")
            }
            status if status.is_server_error() => Self::internal("request failed", &err),
            status => {
                let code = status
                    .canonical_reason()
                    .unwrap_or("error")
                    .to_lowercase()
                    .replace(' ', "_");
                return (status, poem::web::Json(body(&code, err.to_string()).0)).into_response();
            }
        };
        api_error.into_response()
    }
}

impl From<SignatureError> for ApiError {
    fn from(error: SignatureError) -> Self {
        Self::unauthorized(code::SIGNATURE_INVALID, error.to_string())
    }
}

impl From<TimestampError> for ApiError {
    fn from(error: TimestampError) -> Self {
        Self::unauthorized(code::TIMESTAMP_INVALID, error.to_string())
    }
}

impl From<ValidationError> for ApiError {
    fn from(error: ValidationError) -> Self {
        match error {
            ValidationError::Json(message) => Self::bad_request(
                code::PAYLOAD_INVALID,
                format!("the body is not valid JSON: {message}"),
                vec![],
            ),
            ValidationError::Fields(errors) => Self::bad_request(
                code::PAYLOAD_INVALID,
                "the body is not a valid contact event",
                errors.into_iter().map(ErrorDetail::from).collect(),
            ),
        }
    }
}

impl From<IngestError> for ApiError {
    fn from(error: IngestError) -> Self {
        Self::internal("storing the webhook failed", &error)
    }
}

impl From<sea_orm::DbErr> for ApiError {
    fn from(error: sea_orm::DbErr) -> Self {
        Self::internal("database query failed", &error)
    }
}

/// Raised while reading a body that exceeds the limit.
#[derive(Debug, thiserror::Error)]
#[error("the body is larger than {limit} bytes")]
pub struct BodyTooLarge {
    pub limit: usize,
}

impl poem::error::ResponseError for BodyTooLarge {
    fn status(&self) -> StatusCode {
        StatusCode::PAYLOAD_TOO_LARGE
    }
}

/// Result of an API operation.
pub type ApiResult<T> = Result<T, ApiError>;
