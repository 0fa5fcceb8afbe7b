//! Admin API (`/api/admin/...`): find events, re-run failed ones, watch the outbox backlog.
//! Exists only when `admin.token` is configured; otherwise every admin route answers 404.
use std::sync::Arc;

use chrono::{DateTime, Utc};
use entity::{EventStatus, EventType, webhook_event};
use poem::Request;
use poem::web::Data;
use poem_openapi::auth::Bearer;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{Object, OpenApi, SecurityScheme};
use relay::outbox::Backlog;
use relay::webhook_events::{self, Filter};
use sea_orm::DatabaseConnection;
use subtle::ConstantTimeEq;

use crate::app::AppState;
use crate::error::{ApiError, ApiResult, ErrorDetail, code};
use crate::routes::ApiTags;
use crate::schema::EXAMPLE_EVENT_ID;
use crate::validation::{check_time_filter, is_storable_id};

pub struct AdminApi;

/// `Authorization: Bearer <admin.token>`.
#[derive(SecurityScheme)]
#[oai(ty = "bearer", checker = "check_admin_token")]
pub struct AdminToken(());

async fn check_admin_token(request: &Request, bearer: Bearer) -> poem::Result<()> {
    let state = request
        .data::<Arc<AppState>>()
        .ok_or_else(|| poem::Error::from_status(poem::http::StatusCode::NOT_FOUND))?;
    let Some(expected) = &state.config.admin.token else {
        return Err(poem::Error::from_status(poem::http::StatusCode::NOT_FOUND));
    };
    if bool::from(bearer.token.as_bytes().ct_eq(expected.expose().as_bytes())) {
        Ok(())
    } else {
        Err(poem::Error::from_status(
            poem::http::StatusCode::UNAUTHORIZED,
        ))
    }
}

/// A stored event.
#[derive(Object, Debug, Clone, serde::Deserialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct EventView {
    pub event_id: String,
    pub event_type: String,
    pub contact_id: String,
    pub status: String,
    pub attempts: i32,
    #[oai(nullable)]
    pub error: Option<String>,
    pub received_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    #[oai(nullable)]
    pub processed_at: Option<DateTime<Utc>>,
}

impl From<webhook_event::Model> for EventView {
    fn from(e: webhook_event::Model) -> Self {
        Self {
            event_id: e.event_id,
            event_type: e.event_type.as_str().to_owned(),
            contact_id: e.contact_id,
            status: e.status.as_str().to_owned(),
            attempts: e.attempts,
            error: e.error,
            received_at: e.created_at,
            updated_at: e.updated_at,
            processed_at: e.processed_at,
        }
    }
}

/// One page of events, newest first.
#[derive(Object, Debug, Clone, serde::Deserialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct EventPage {
    pub events: Vec<EventView>,
    /// Pass as `cursor` to get the next page; `null` on the last page.
    #[oai(nullable)]
    pub next_cursor: Option<String>,
}

/// One outbox row of an event.
#[derive(Object, Debug, Clone, serde::Deserialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct OutboxView {
    pub topic: String,
    pub message_key: String,
    pub created_at: DateTime<Utc>,
    #[oai(nullable)]
    pub published_at: Option<DateTime<Utc>>,
    pub attempts: i32,
    pub next_attempt_at: DateTime<Utc>,
    #[oai(nullable)]
    pub last_error: Option<String>,
}

/// An event with its stored payload and outbox state.
#[derive(Object, Debug, Clone, serde::Deserialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct EventDetail {
    #[oai(flatten)]
    #[serde(flatten)]
    pub event: EventView,
    pub payload: serde_json::Value,
    pub outbox: Vec<OutboxView>,
}

/// How many failed events went back to `pending`.
#[derive(Object, Debug, Clone, serde::Deserialize)]
pub struct RetryResult {
    pub requeued: u64,
}

/// Filter of a bulk retry.
#[derive(Object, Debug, Clone, Default)]
#[oai(rename_all = "camelCase")]
pub struct RetryFilter {
    /// Only events of this type.
    #[oai(nullable)]
    pub event_type: Option<EventType>,
    /// Only events received at or after this time.
    #[oai(nullable)]
    pub since: Option<DateTime<Utc>>,
    /// Only events received before this time.
    #[oai(nullable)]
    pub until: Option<DateTime<Utc>>,
}

const DEFAULT_PAGE: u64 = 50;

#[OpenApi(tag = "ApiTags::Admin")]
impl AdminApi {
    /// List events
    ///
    /// Newest first, with keyset pagination: pass `nextCursor` back as `cursor`. Pages stay
    /// consistent while new events arrive.
    #[oai(
        path = "/api/admin/events",
        method = "get",
        operation_id = "adminListEvents"
    )]
    #[allow(clippy::too_many_arguments)]
    async fn list_events(
        &self,
        _auth: AdminToken,
        state: Data<&Arc<AppState>>,
        /// Only events in this state.
        status: Query<Option<EventStatus>>,
        /// Only events of this type.
        #[oai(name = "type")]
        event_type: Query<Option<EventType>>,
        /// Only events received at or after this time.
        since: Query<Option<DateTime<Utc>>>,
        /// Only events received before this time.
        until: Query<Option<DateTime<Utc>>>,
        /// Page size, 1 to 500 (default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "500")))]
        limit: Query<Option<u64>>,
        /// `nextCursor` of the previous page (an integer, sent as the string it came as).
        cursor: Query<Option<i64>>,
    ) -> ApiResult<Json<EventPage>> {
        let limit = limit.0.unwrap_or(DEFAULT_PAGE);
        let filter = Filter {
            status: status.0,
            ..events_filter(event_type.0, since.0, until.0)?
        };
        let mut rows = webhook_events::list(&state.db, &filter, cursor.0, limit + 1).await?;
        let next_cursor = if rows.len() as u64 > limit {
            rows.truncate(limit as usize);
            rows.last().map(|r| r.id.to_string())
        } else {
            None
        };
        Ok(Json(EventPage {
            events: rows.into_iter().map(EventView::from).collect(),
            next_cursor,
        }))
    }

    /// Get one event with its payload and outbox state
    #[oai(
        path = "/api/admin/events/:event_id",
        method = "get",
        operation_id = "adminGetEvent"
    )]
    async fn get_event(
        &self,
        _auth: AdminToken,
        state: Data<&Arc<AppState>>,
        #[oai(example = "example_event_id")] event_id: Path<String>,
    ) -> ApiResult<Json<EventDetail>> {
        let event = find_event(&state.db, &event_id.0).await?;
        let outbox = relay::outbox::rows_of_event(&state.db, &event.event_id)
            .await?
            .into_iter()
            .map(|o| OutboxView {
                topic: o.topic,
                message_key: o.message_key,
                created_at: o.created_at,
                published_at: o.published_at,
                attempts: o.attempts,
                next_attempt_at: o.next_attempt_at,
                last_error: o.last_error,
            })
            .collect();
        let payload = event.payload.clone();
        Ok(Json(EventDetail {
            event: event.into(),
            payload,
            outbox,
        }))
    }

    /// Retry one failed event
    ///
    /// Puts the event back to `pending` with a new outbox row, in one transaction; the relay and
    /// consumer then process it as usual. Also the way to redrive a dead-lettered message: its
    /// `event-id` header names the event.
    #[oai(
        path = "/api/admin/events/:event_id/retry",
        method = "post",
        operation_id = "adminRetryEvent"
    )]
    async fn retry_event(
        &self,
        _auth: AdminToken,
        state: Data<&Arc<AppState>>,
        #[oai(example = "example_event_id")] event_id: Path<String>,
    ) -> ApiResult<Json<RetryResult>> {
        let event = find_event(&state.db, &event_id.0).await?;
        if event.status != EventStatus::Failed {
            return Err(ApiError::conflict(
                code::EVENT_NOT_FAILED,
                format!(
                    "only failed events can be retried; this one is {}",
                    event.status.as_str()
                ),
            ));
        }
        let requeued =
            webhook_events::requeue_one(&state.db, &state.config.kafka, &event.event_id).await?;
        Ok(Json(RetryResult { requeued }))
    }

    /// Retry every failed event matching a filter
    #[oai(
        path = "/api/admin/events/retry",
        method = "post",
        operation_id = "adminRetryFailedEvents"
    )]
    async fn retry_failed(
        &self,
        _auth: AdminToken,
        state: Data<&Arc<AppState>>,
        filter: Json<RetryFilter>,
    ) -> ApiResult<Json<RetryResult>> {
        let filter = events_filter(filter.event_type, filter.since, filter.until)?;
        let requeued =
            webhook_events::requeue_failed(&state.db, &state.config.kafka, &filter).await?;
        Ok(Json(RetryResult { requeued }))
    }

    /// Outbox backlog
    ///
    /// The figures behind the `outbox_*` metrics, computed now.
    #[oai(
        path = "/api/admin/outbox",
        method = "get",
        operation_id = "adminOutboxSummary"
    )]
    async fn outbox_summary(
        &self,
        _auth: AdminToken,
        state: Data<&Arc<AppState>>,
    ) -> ApiResult<Json<Backlog>> {
        Ok(Json(relay::outbox::backlog(&state.db).await?))
    }
}

/// Events of `event_type` (if given) received in `[since, until)` (each bound if given); 400 for
/// a bound the database cannot represent.
fn events_filter(
    event_type: Option<EventType>,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
) -> ApiResult<Filter> {
    let errors: Vec<ErrorDetail> = [
        check_time_filter("since", since),
        check_time_filter("until", until),
    ]
    .into_iter()
    .filter_map(Result::err)
    .map(ErrorDetail::from)
    .collect();
    if !errors.is_empty() {
        return Err(ApiError::bad_request(
            code::FILTER_INVALID,
            "the filter cannot match any event",
            errors,
        ));
    }
    Ok(Filter {
        status: None,
        event_type,
        since,
        until,
    })
}

/// The example of `event_id`: the spec's example event (`scripts/contract` posts it first).
fn example_event_id() -> String {
    EXAMPLE_EVENT_ID.to_owned()
}

async fn find_event(db: &DatabaseConnection, event_id: &str) -> ApiResult<webhook_event::Model> {
    // An id validation would refuse (NUL, over 255 bytes) names no event; don't ask the store.
    if !is_storable_id(event_id) {
        return Err(ApiError::not_found("no event with this id"));
    }
    webhook_events::find(db, event_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no event with id {event_id}")))
}
