//! Admin API (`/api/admin/...`): find events, re-run failed ones, watch the outbox backlog and the
//! pipeline's overview. Exists only when `admin.token` is configured; otherwise every admin route
//! answers 404. The operations console (`crate::console`) calls the same functions
//! ([`list_events`], [`event_detail`], [`retry_event`], [`retry_matching`]).
use std::sync::Arc;

use chrono::{DateTime, Utc};
use entity::{EventStatus, EventType, outbox as relay_outbox, webhook_event};
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
use crate::overview::Overview;
use crate::routes::ApiTags;
use crate::schema::{EXAMPLE_EVENT_ID, JsonString};
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
    /// The message's headers (`event-id`, `event-type`, ...), as published.
    pub headers: serde_json::Value,
}

/// One step of an event's life.
#[derive(Object, Debug, Clone, serde::Deserialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct TimelineEntry {
    pub at: DateTime<Utc>,
    /// `received`, `requeued` (a retry's new outbox row), `published`, `processed` or `failed`.
    pub step: String,
    /// The topic, for `received`, `requeued` and `published` (the partition follows from the
    /// key; the offset is not recorded).
    #[oai(nullable)]
    pub topic: Option<String>,
    /// The error of a failure, or a publish's attempts.
    #[oai(nullable)]
    pub detail: Option<String>,
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
    /// Received, published (per outbox row), processed or failed, oldest first.
    pub timeline: Vec<TimelineEntry>,
}

/// How many failed events went back to `pending`.
#[derive(Object, Debug, Clone, serde::Deserialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct RetryResult {
    /// Events set back to `pending` (0 for a dry run).
    pub requeued: u64,
    /// Failed events the filter matched (for a bulk retry; the one event for a single retry).
    pub matched: u64,
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
    /// Only this event.
    #[oai(nullable)]
    pub event_id: Option<JsonString>,
    /// Only events of this contact.
    #[oai(nullable)]
    pub contact_id: Option<JsonString>,
    /// Count the failed events that match, re-queue nothing (default false).
    #[oai(nullable)]
    pub dry_run: Option<bool>,
}

/// What a list of events asks for (the admin API's query, and the console's).
#[derive(Debug, Clone, Default)]
pub struct EventQuery {
    pub status: Option<EventStatus>,
    pub event_type: Option<EventType>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub event_id: Option<String>,
    pub contact_id: Option<String>,
    pub limit: Option<u64>,
    pub cursor: Option<i64>,
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
        /// Only this event (its `eventId`).
        #[oai(name = "eventId")]
        event_id: Query<Option<String>>,
        /// Only events of this contact (`data.id`).
        #[oai(name = "contactId")]
        contact_id: Query<Option<String>>,
        /// Page size, 1 to 500 (default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "500")))]
        limit: Query<Option<u64>>,
        /// `nextCursor` of the previous page (an integer, sent as the string it came as).
        cursor: Query<Option<i64>>,
    ) -> ApiResult<Json<EventPage>> {
        let query = EventQuery {
            status: status.0,
            event_type: event_type.0,
            since: since.0,
            until: until.0,
            event_id: event_id.0,
            contact_id: contact_id.0,
            limit: limit.0,
            cursor: cursor.0,
        };
        list_events(&state.db, &query).await.map(Json)
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
        event_detail(&state.db, &event_id.0).await.map(Json)
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
    async fn retry_one(
        &self,
        _auth: AdminToken,
        state: Data<&Arc<AppState>>,
        #[oai(example = "example_event_id")] event_id: Path<String>,
    ) -> ApiResult<Json<RetryResult>> {
        retry_event(&state, &event_id.0, Via::Api).await.map(Json)
    }

    /// Retry every failed event matching a filter
    ///
    /// With `"dryRun": true` nothing changes and `matched` says how many would be re-queued (the
    /// console's confirmation states it).
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
        retry_matching(&state, &filter, Via::Api).await.map(Json)
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

    /// Overview of the pipeline
    ///
    /// What the console's overview shows: counts and rates over the last minutes, the unpublished
    /// and unprocessed backlog and their ages, each partition's owner, position and lag, the
    /// readiness of each dependency, and the shipped alert rules with whether each condition
    /// holds now. A snapshot taken every `metrics.backlog_refresh_secs`; `generatedAt` says when.
    #[oai(
        path = "/api/admin/overview",
        method = "get",
        operation_id = "adminOverview"
    )]
    async fn overview(
        &self,
        _auth: AdminToken,
        state: Data<&Arc<AppState>>,
    ) -> ApiResult<Json<Overview>> {
        Ok(Json(state.activity.overview().await?))
    }
}

/// Who asked for an action: logged with it, and the label of its counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Api,
    Console,
}

impl Via {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Api => "api",
            Self::Console => "console",
        }
    }
}

/// One page of the events `query` asks for, newest first.
pub async fn list_events(db: &DatabaseConnection, query: &EventQuery) -> ApiResult<EventPage> {
    let limit = query.limit.unwrap_or(DEFAULT_PAGE).clamp(1, 500);
    let filter = Filter {
        status: query.status,
        ..events_filter(
            query.event_type,
            query.since,
            query.until,
            query.event_id.clone(),
            query.contact_id.clone(),
        )?
    };
    let mut rows = webhook_events::list(db, &filter, query.cursor, limit + 1).await?;
    let next_cursor = if rows.len() as u64 > limit {
        rows.truncate(limit as usize);
        rows.last().map(|r| r.id.to_string())
    } else {
        None
    };
    Ok(EventPage {
        events: rows.into_iter().map(EventView::from).collect(),
        next_cursor,
    })
}

/// The event `event_id` with its payload, outbox rows and timeline.
pub async fn event_detail(db: &DatabaseConnection, event_id: &str) -> ApiResult<EventDetail> {
    let event = find_event(db, event_id).await?;
    let rows = relay::outbox::rows_of_event(db, &event.event_id).await?;
    let timeline = timeline(&event, &rows);
    let outbox = rows
        .into_iter()
        .map(|o| OutboxView {
            topic: o.topic,
            message_key: o.message_key,
            created_at: o.created_at,
            published_at: o.published_at,
            attempts: o.attempts,
            next_attempt_at: o.next_attempt_at,
            last_error: o.last_error,
            headers: o.headers,
        })
        .collect();
    let payload = event.payload.clone();
    Ok(EventDetail {
        event: event.into(),
        payload,
        outbox,
        timeline,
    })
}

/// The steps of `event` and its outbox `rows`, in the order they happen: received, each retry's
/// new row, each publish, and how it ended. Not sorted by time: a row's `published_at` is when
/// the relay recorded the broker's delivery report, which can come after the consumer has
/// already read the message and applied it.
fn timeline(event: &webhook_event::Model, rows: &[relay_outbox::Model]) -> Vec<TimelineEntry> {
    let entry = |at, step: &str, topic: Option<&str>, detail: Option<String>| TimelineEntry {
        at,
        step: step.to_owned(),
        topic: topic.map(str::to_owned),
        detail,
    };
    let mut steps = vec![entry(
        event.created_at,
        "received",
        rows.first().map(|r| r.topic.as_str()),
        None,
    )];
    for (i, row) in rows.iter().enumerate() {
        if i > 0 {
            // Only a failed event is re-queued (its error was cleared then).
            let detail = Some("retried after it failed".to_owned());
            steps.push(entry(row.created_at, "requeued", Some(&row.topic), detail));
        }
        if let Some(at) = row.published_at {
            let detail = (row.attempts > 1).then(|| format!("after {} attempts", row.attempts));
            steps.push(entry(at, "published", Some(&row.topic), detail));
        } else if let Some(error) = &row.last_error {
            steps.push(entry(
                row.next_attempt_at,
                "publish-retry",
                Some(&row.topic),
                Some(format!("{} attempt(s) failed: {error}", row.attempts)),
            ));
        }
    }
    match event.status {
        EventStatus::Processed => {
            if let Some(at) = event.processed_at {
                steps.push(entry(at, "processed", None, None));
            }
        }
        EventStatus::Failed => {
            steps.push(entry(event.updated_at, "failed", None, event.error.clone()));
        }
        EventStatus::Pending => {}
    }
    steps
}

/// Re-queues the one failed event `event_id` (409 when it is not failed).
pub async fn retry_event(state: &AppState, event_id: &str, via: Via) -> ApiResult<RetryResult> {
    let event = find_event(&state.db, event_id).await?;
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
    count_retry(via, requeued);
    tracing::info!(via = via.as_str(), event_id = %event.event_id, requeued, "retry of one event");
    Ok(RetryResult {
        requeued,
        matched: 1,
    })
}

/// Re-queues every failed event matching `filter` (or, for a dry run, counts them).
pub async fn retry_matching(
    state: &AppState,
    filter: &RetryFilter,
    via: Via,
) -> ApiResult<RetryResult> {
    let events = events_filter(
        filter.event_type,
        filter.since,
        filter.until,
        filter.event_id.clone().map(|id| id.0),
        filter.contact_id.clone().map(|id| id.0),
    )?;
    let matched = webhook_events::count_failed_matching(&state.db, &events).await?;
    if filter.dry_run == Some(true) {
        return Ok(RetryResult {
            requeued: 0,
            matched,
        });
    }
    let requeued = webhook_events::requeue_failed(&state.db, &state.config.kafka, &events).await?;
    count_retry(via, requeued);
    tracing::info!(
        via = via.as_str(),
        ?events,
        requeued,
        "retry of the failed events matching a filter"
    );
    Ok(RetryResult {
        requeued,
        matched: matched.max(requeued),
    })
}

fn count_retry(via: Via, requeued: u64) {
    metrics::counter!(relay::metrics::ADMIN_RETRIES, "via" => via.as_str()).increment(1);
    metrics::counter!(relay::metrics::ADMIN_REQUEUED, "via" => via.as_str()).increment(requeued);
}

/// Events of `event_type` (if given) received in `[since, until)` (each bound if given), of one
/// event or contact if given; 400 for a bound the database cannot represent.
fn events_filter(
    event_type: Option<EventType>,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
    event_id: Option<String>,
    contact_id: Option<String>,
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
    // An id no event can have (NUL, over 255 bytes) matches nothing; the store cannot hold it.
    let impossible = |id: &Option<String>| id.as_deref().is_some_and(|id| !is_storable_id(id));
    if impossible(&event_id) || impossible(&contact_id) {
        return Ok(Filter {
            // No event is received before the epoch's first instant.
            until: Some(DateTime::<Utc>::UNIX_EPOCH),
            ..Filter::default()
        });
    }
    Ok(Filter {
        status: None,
        event_type,
        since,
        until,
        event_id,
        contact_id,
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

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use serde_json::json;

    use super::*;

    /// The relay records a publication when the broker's delivery report is back, which can be
    /// after the consumer applied the message: the timeline keeps the order things happen in.
    #[test]
    fn a_timeline_is_in_the_order_of_the_pipeline_even_when_the_clocks_disagree() {
        let at = |ms: i64| {
            Utc.timestamp_millis_opt(1_764_720_000_000 + ms)
                .single()
                .expect("a valid instant")
        };
        let event = webhook_event::Model {
            id: 1,
            event_id: "evt_1".into(),
            event_type: EventType::Updated,
            contact_id: "c1".into(),
            payload: json!({}),
            status: EventStatus::Processed,
            attempts: 1,
            error: None,
            created_at: at(0),
            updated_at: at(80),
            processed_at: Some(at(80)),
        };
        let row = relay_outbox::Model {
            id: 1,
            event_id: "evt_1".into(),
            topic: "t.contact.updated".into(),
            message_key: "c1".into(),
            payload: None,
            headers: json!({}),
            created_at: at(0),
            published_at: Some(at(150)),
            attempts: 1,
            next_attempt_at: at(0),
            last_error: None,
            republished: 0,
        };
        let steps: Vec<String> = timeline(&event, &[row])
            .into_iter()
            .map(|s| s.step)
            .collect();
        assert_eq!(steps, ["received", "published", "processed"]);
    }
}
