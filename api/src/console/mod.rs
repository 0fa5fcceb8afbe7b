//! The operations console (`/console`): server-rendered HTML pages (maud, which escapes every
//! value it interpolates), one small script and one stylesheet compiled into the binary, and a
//! few JSON routes under `/console/api/` for what the pages refresh or change.
//!
//! Security: sign-in posts the admin token in a form body; the answer sets an `HttpOnly;
//! SameSite=Strict; Path=/console` cookie holding an expiry, a random nonce and an HMAC of both
//! under a key derived from the admin token (never the token itself), so every `serve` replica
//! with the same token accepts it and changing the token signs everyone out. State-changing
//! requests need that cookie, the session's CSRF token in `X-CSRF-Token` (the pages carry it in
//! a `<meta>` tag) and must not come from another site (`Sec-Fetch-Site`, `Origin`). Every
//! answer carries a Content-Security-Policy without inline script or foreign origins. The data
//! comes from the same functions as the admin API's (`crate::routes::admin`).
mod pages;
mod session;

use std::sync::Arc;

use poem::http::{HeaderValue, StatusCode, header};
use poem::web::{Data, Form, Path, Query};
use poem::{Endpoint, EndpointExt, IntoResponse, Request, Response, Route, get, handler, post};
use poem_openapi::types::ParseFromJSON;

pub use session::ConsoleKeys;
use session::Session;

use crate::app::AppState;
use crate::error::{ApiError, code};
use crate::routes::admin::{self, RetryFilter, Via};

/// The Content-Security-Policy of every console answer.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; \
    frame-ancestors 'none'; base-uri 'none'";

const SCRIPT: &str = include_str!("assets/console.js");
const STYLE: &str = include_str!("assets/console.css");

/// The console's routes, to nest at `/console`.
pub fn routes() -> impl Endpoint {
    Route::new()
        .at("/", get(home))
        .at("/session", post(sign_in))
        .at("/session/end", post(sign_out))
        .at("/events", get(events))
        .at("/events/:event_id", get(event))
        .at("/contacts/:contact_id", get(contact))
        .at("/api/overview", get(api_overview))
        .at("/api/events/retry", post(api_retry_matching))
        .at("/api/events/:event_id/retry", post(api_retry_one))
        .at("/assets/console.js", get(script))
        .at("/assets/console.css", get(style))
        .around(|next, request| async move {
            let mut response = next.call(request).await?.into_response();
            secure_headers(&mut response);
            Ok(response)
        })
}

fn secure_headers(response: &mut Response) {
    let headers = response.headers_mut();
    for (name, value) in [
        ("content-security-policy", CONTENT_SECURITY_POLICY),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "no-referrer"),
        ("x-frame-options", "DENY"),
        ("cache-control", "no-store"),
        ("cross-origin-opener-policy", "same-origin"),
        ("cross-origin-resource-policy", "same-origin"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
}

/// Who is asking: the console may be off, or the caller signed out.
enum Gate {
    Off,
    SignedOut,
    In(Session),
}

fn gate(request: &Request, state: &AppState) -> Gate {
    let Some(keys) = &state.console else {
        return Gate::Off;
    };
    match session::from_request(request).and_then(|cookie| keys.verify(cookie)) {
        Some(session) => Gate::In(session),
        None => Gate::SignedOut,
    }
}

/// Whether the browser says this request comes from a page of this origin (or from no page: a
/// typed address, a script outside a browser). `Sec-Fetch-Site` decides when the browser sends
/// it; else `Origin` must name this host. (Under `Referrer-Policy: no-referrer` Chromium sends
/// `Origin: null` even for the console's own form, so `Origin` alone cannot tell.)
fn same_origin(request: &Request) -> bool {
    if let Some(site) = request.header("sec-fetch-site") {
        return site == "same-origin" || site == "none";
    }
    if let Some(origin) = request.header("origin") {
        let host = request.header(header::HOST).unwrap_or_default();
        let authority = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"));
        return authority.is_some_and(|a| !host.is_empty() && a.eq_ignore_ascii_case(host));
    }
    true
}

/// A state-changing request's session: signed in, from this origin, with the CSRF token.
fn authorize_change(request: &Request, state: &AppState) -> Result<Session, ApiError> {
    let session = match gate(request, state) {
        Gate::Off => return Err(ApiError::not_found("the console is off (no admin.token)")),
        Gate::SignedOut => {
            return Err(ApiError::unauthorized(
                code::UNAUTHORIZED,
                "sign in to the console first",
            ));
        }
        Gate::In(session) => session,
    };
    let token = request.header("x-csrf-token").unwrap_or_default();
    if !same_origin(request) || !session.csrf_matches(token) {
        tracing::warn!("console request refused: cross-site or without the CSRF token");
        return Err(ApiError::forbidden(
            code::CROSS_SITE,
            "refused: a cross-site request, or one without the session's CSRF token",
        ));
    }
    Ok(session)
}

fn html(status: StatusCode, markup: maud::Markup) -> Response {
    Response::builder()
        .status(status)
        .content_type("text/html; charset=utf-8")
        .body(markup.into_string())
}

fn see_other(location: &str) -> Response {
    Response::builder()
        .status(StatusCode::SEE_OTHER)
        .header(header::LOCATION, location)
        .finish()
}

/// The session of a page's request, or the answer for the console off or a caller signed out.
fn signed_in(request: &Request, state: &AppState) -> Result<Session, Box<Response>> {
    match gate(request, state) {
        Gate::Off => Err(Box::new(html(StatusCode::NOT_FOUND, pages::console_off()))),
        Gate::SignedOut => Err(Box::new(see_other("/console"))),
        Gate::In(session) => Ok(session),
    }
}

#[handler]
async fn home(request: &Request, state: Data<&Arc<AppState>>) -> Response {
    match gate(request, &state) {
        Gate::Off => html(StatusCode::NOT_FOUND, pages::console_off()),
        Gate::SignedOut => html(StatusCode::OK, pages::sign_in(None)),
        Gate::In(session) => html(StatusCode::OK, pages::overview(&session)),
    }
}

#[derive(serde::Deserialize)]
struct SignInForm {
    #[serde(default)]
    token: String,
}

#[handler]
async fn sign_in(
    request: &Request,
    state: Data<&Arc<AppState>>,
    form: Option<Form<SignInForm>>,
) -> Response {
    let Some(keys) = &state.console else {
        return html(StatusCode::NOT_FOUND, pages::console_off());
    };
    let count = |outcome: &'static str| {
        metrics::counter!(relay::metrics::CONSOLE_SIGN_INS, "outcome" => outcome).increment(1);
    };
    if !same_origin(request) {
        count("forbidden");
        tracing::warn!(
            origin = request.header("origin").unwrap_or_default(),
            host = request.header(header::HOST).unwrap_or_default(),
            sec_fetch_site = request.header("sec-fetch-site").unwrap_or_default(),
            "console sign-in refused: cross-site"
        );
        return html(
            StatusCode::FORBIDDEN,
            pages::sign_in(Some("Refused: the form was not sent from this console.")),
        );
    }
    let token = form.map(|f| f.0.token).unwrap_or_default();
    if !keys.token_matches(&token) {
        count("refused");
        tracing::warn!("console sign-in refused: wrong admin token");
        return html(
            StatusCode::UNAUTHORIZED,
            pages::sign_in(Some("That is not the admin token.")),
        );
    }
    count("ok");
    tracing::info!("console sign-in");
    let secure = request
        .header("x-forwarded-proto")
        .is_some_and(|p| p.eq_ignore_ascii_case("https"));
    let mut response = see_other("/console");
    if let Ok(cookie) = HeaderValue::from_str(&keys.issue().set_cookie(secure)) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}

#[handler]
async fn sign_out(request: &Request, state: Data<&Arc<AppState>>) -> Response {
    if let Err(error) = authorize_change(request, &state) {
        return error.into_response();
    }
    tracing::info!("console sign-out");
    let mut response = StatusCode::NO_CONTENT.into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(session::CLEAR_COOKIE),
    );
    response
}

#[handler]
async fn events(
    request: &Request,
    state: Data<&Arc<AppState>>,
    Query(params): Query<pages::EventParams>,
) -> Response {
    let session = match signed_in(request, &state) {
        Ok(session) => session,
        Err(answer) => return *answer,
    };
    let result = match params.to_query(chrono::Utc::now()) {
        Err(problem) => Err(problem),
        Ok(query) => admin::list_events(&state.db, &query)
            .await
            .map_err(|e| e.message().to_owned()),
    };
    html(StatusCode::OK, pages::events(&session, &params, &result))
}

#[handler]
async fn event(
    request: &Request,
    state: Data<&Arc<AppState>>,
    Path(event_id): Path<String>,
) -> Response {
    let session = match signed_in(request, &state) {
        Ok(session) => session,
        Err(answer) => return *answer,
    };
    match admin::event_detail(&state.db, &event_id).await {
        Ok(detail) => html(StatusCode::OK, pages::event(&session, &detail)),
        Err(error) => html(
            error.status(),
            pages::problem(&session, "Event", error.message()),
        ),
    }
}

#[handler]
async fn contact(
    request: &Request,
    state: Data<&Arc<AppState>>,
    Path(contact_id): Path<String>,
) -> Response {
    let session = match signed_in(request, &state) {
        Ok(session) => session,
        Err(answer) => return *answer,
    };
    let found = crate::routes::contacts::find_contact(&state.db, &contact_id).await;
    let query = admin::EventQuery {
        contact_id: Some(contact_id.clone()),
        ..admin::EventQuery::default()
    };
    let of_contact = admin::list_events(&state.db, &query)
        .await
        .map_err(|e| e.message().to_owned());
    html(
        StatusCode::OK,
        pages::contact(&session, &contact_id, found.ok().as_ref(), &of_contact),
    )
}

/// A JSON route's session (no CSRF needed to read), or its error answer.
fn authorize_read(request: &Request, state: &AppState) -> Result<(), ApiError> {
    match gate(request, state) {
        Gate::Off => Err(ApiError::not_found("the console is off (no admin.token)")),
        Gate::SignedOut => Err(ApiError::unauthorized(
            code::UNAUTHORIZED,
            "sign in to the console first",
        )),
        Gate::In(_) => Ok(()),
    }
}

#[handler]
async fn api_overview(request: &Request, state: Data<&Arc<AppState>>) -> Response {
    if let Err(error) = authorize_read(request, &state) {
        return error.into_response();
    }
    match state.activity.overview().await {
        Ok(overview) => poem_openapi::payload::Json(overview).into_response(),
        Err(error) => ApiError::from(error).into_response(),
    }
}

#[handler]
async fn api_retry_one(
    request: &Request,
    state: Data<&Arc<AppState>>,
    Path(event_id): Path<String>,
) -> Response {
    if let Err(error) = authorize_change(request, &state) {
        return error.into_response();
    }
    match admin::retry_event(&state, &event_id, Via::Console).await {
        Ok(result) => poem_openapi::payload::Json(result).into_response(),
        Err(error) => error.into_response(),
    }
}

#[handler]
async fn api_retry_matching(
    request: &Request,
    state: Data<&Arc<AppState>>,
    body: poem::Body,
) -> Response {
    if let Err(error) = authorize_change(request, &state) {
        return error.into_response();
    }
    // The admin API's own parser: the same fields, the same checks.
    let filter = match body.into_bytes().await {
        Ok(bytes) => serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|value| RetryFilter::parse_from_json(Some(value)).ok()),
        Err(_) => None,
    };
    let Some(filter) = filter else {
        return ApiError::bad_request(code::FILTER_INVALID, "not a retry filter", Vec::new())
            .into_response();
    };
    match admin::retry_matching(&state, &filter, Via::Console).await {
        Ok(result) => poem_openapi::payload::Json(result).into_response(),
        Err(error) => error.into_response(),
    }
}

#[handler]
fn script() -> Response {
    Response::builder()
        .content_type("text/javascript; charset=utf-8")
        .body(SCRIPT)
}

#[handler]
fn style() -> Response {
    Response::builder()
        .content_type("text/css; charset=utf-8")
        .body(STYLE)
}
