//! The console's pages. maud escapes every interpolated value; on top of that, text from a
//! webhook goes through [`shown`], which turns invisible and direction-changing characters into
//! visible `\u202E`-style escapes, so a payload can neither inject markup nor reorder the display.
use chrono::{DateTime, Duration, Utc};
use entity::{EventStatus, EventType};
use maud::{DOCTYPE, Markup, html};

use super::session::Session;
use crate::routes::admin::{EventDetail, EventPage, EventQuery, EventView};
use crate::routes::contacts::ContactView;

/// Whether `c` would be invisible or change the direction of the text around it.
fn is_hidden(c: char) -> bool {
    matches!(c,
        '\u{0}'..='\u{8}' | '\u{b}'..='\u{1f}' | '\u{7f}'..='\u{9f}'
        | '\u{61c}' | '\u{180e}' | '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}'
        | '\u{2060}'..='\u{2069}' | '\u{feff}' | '\u{fff9}'..='\u{fffb}')
}

/// `text` as data: inside `<bdi>` (isolated from what surrounds it), each invisible or
/// direction-changing character shown as its escape (`\u202E`).
pub fn shown(text: &str) -> Markup {
    let mut parts: Vec<(bool, String)> = Vec::new();
    for c in text.chars() {
        let hidden = is_hidden(c);
        let piece = if hidden {
            format!("\\u{:04X}", u32::from(c))
        } else {
            c.to_string()
        };
        match parts.last_mut() {
            Some((h, s)) if *h == hidden && !hidden => s.push_str(&piece),
            _ => parts.push((hidden, piece)),
        }
    }
    html! {
        bdi.data {
            @for (hidden, part) in &parts {
                @if *hidden { span.ctl title="invisible or direction control character" { (part) } }
                @else { (part) }
            }
        }
    }
}

/// `value` percent-encoded for a path segment or a query value.
pub fn enc(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn event_href(event_id: &str) -> String {
    format!("/console/events/{}", enc(event_id))
}

fn contact_href(contact_id: &str) -> String {
    format!("/console/contacts/{}", enc(contact_id))
}

fn when(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn layout(title: &str, session: Option<&Session>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                @if let Some(session) = session {
                    meta name="csrf-token" content=(session.csrf());
                }
                title { (title) " · acme-webhooks console" }
                // No favicon request (it would be a 404 in every page's log).
                link rel="icon" href="data:,";
                link rel="stylesheet" href="/console/assets/console.css";
                script src="/console/assets/console.js" defer {}
            }
            body {
                header.top {
                    a.brand href="/console" { "acme-webhooks" span { "console" } }
                    @if session.is_some() {
                        nav {
                            a href="/console" { "Overview" }
                            a href="/console/events" { "Events" }
                            a href="/console/events?status=failed" { "Failed" }
                        }
                        button #sign-out type="button" { "Sign out" }
                    }
                }
                main { (body) }
                @if session.is_some() {
                    div #flash role="status" aria-live="polite" {}
                    dialog #confirm {
                        form method="dialog" {
                            p #confirm-text {}
                            div.buttons {
                                button value="cancel" { "Cancel" }
                                button #confirm-ok value="ok" { "Retry" }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The console with no admin token configured.
pub fn console_off() -> Markup {
    layout(
        "Console off",
        None,
        html! {
            section.card.narrow {
                h1 { "The console is off" }
                p { "The operations console signs in with the admin token, and no "
                    code { "admin.token" } " is configured, so both the admin API and the console are off." }
                p { "To turn them on, set a token of at least 8 characters and restart:" }
                pre { "ACME_WEBHOOKS_ADMIN__TOKEN=$(openssl rand -hex 24) acme-webhooks" }
                p { "or " code { "[admin] token = \"...\"" } " in " code { "acme-webhooks.toml" } "." }
            }
        },
    )
}

/// The sign-in form (the token goes in the POST body, never in a URL).
pub fn sign_in(error: Option<&str>) -> Markup {
    layout(
        "Sign in",
        None,
        html! {
            section.card.narrow {
                h1 { "Sign in" }
                p { "Sign in with the service's admin token (" code { "admin.token" } ")." }
                @if let Some(error) = error { p.error #sign-in-error role="alert" { (error) } }
                form method="post" action="/console/session" {
                    label for="token" { "Admin token" }
                    input #token type="password" name="token" autocomplete="current-password" required autofocus;
                    button type="submit" { "Sign in" }
                }
            }
        },
    )
}

/// The overview: a skeleton the script fills from `/console/api/overview` every 2 seconds.
pub fn overview(session: &Session) -> Markup {
    let figure = |field: &str, label: &str, hint: &str| {
        html! {
            div.figure {
                span.value data-field=(field) { "…" }
                span.label { (label) }
                span.hint { (hint) }
            }
        }
    };
    layout(
        "Overview",
        Some(session),
        html! {
            section #overview {
                div.heading {
                    h1 { "Overview" }
                    span.muted { "updated " span #updated { "…" } }
                }
                div.figures {
                    (figure("received", "acknowledged", "in the window"))
                    (figure("published", "published", "in the window"))
                    (figure("processed", "processed", "in the window"))
                    (figure("failed", "failed", "waiting for a retry"))
                    (figure("unpublished", "unpublished", "outbox rows"))
                    (figure("unprocessed", "unprocessed", "acknowledged, not applied"))
                    (figure("oldestUnpublishedAgeSecs", "oldest unpublished", "seconds"))
                    (figure("oldestUnprocessedAgeSecs", "oldest unprocessed", "seconds"))
                }
                div.charts {
                    div.card {
                        h2 { "Rates " span.muted { "events/s, last " span data-field="windowMinutes" { "…" } " min" } }
                        svg #rate-chart viewBox="0 0 600 180" role="img" aria-label="ingest, publish and processing rates" {}
                        p.legend { span.k.received { "acknowledged" } span.k.published { "published" } span.k.processed { "processed" } }
                    }
                    div.card {
                        h2 { "Backlog " span.muted { "events" } }
                        svg #backlog-chart viewBox="0 0 600 180" role="img" aria-label="unprocessed and unpublished backlog" {}
                        p.legend { span.k.unprocessed { "unprocessed" } span.k.unpublished { "unpublished" } }
                    }
                }
                div.columns.wide {
                    div.card {
                        h2 { "Partitions" span.muted { " of the consumer group: owner, position, lag" } }
                        table { thead { tr { th { "topic" } th { "partition" } th { "owner" } th { "next offset" } th { "lag" } } } tbody #partitions {} }
                        p.muted #no-partitions hidden { "No consumer group partitions (in-process bus, or none created yet)." }
                    }
                    div.card {
                        h2 { "Readiness" span.muted { " of this process's dependencies" } }
                        ul #readiness {}
                    }
                }
                div.card {
                    h2 { "Recent failures" span.muted { " the newest failed events, waiting for a retry" } }
                    table.events { thead { tr { th { "received" } th { "event" } th { "type" } th { "contact" } th { "error" } } } tbody #recent-failures {} }
                    p.muted #no-failures hidden { "No failed event." }
                    p #all-failures hidden { a href="/console/events?status=failed" { "Every failed event, and retrying them →" } }
                }
                div.card {
                    h2 { "Alerts" span.muted { " the shipped Prometheus rules' conditions, judged now (Prometheus fires once one has held for the rule's for:)" } }
                    table.alerts { thead { tr { th { "rule" } th { "severity" } th { "state" } th { "condition" } } } tbody #alerts {} }
                }
            }
        },
    )
}

/// The events list's query string, as the filter form sends it.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventParams {
    pub status: Option<String>,
    #[serde(rename = "type")]
    pub event_type: Option<String>,
    /// `15m`, `1h`, `24h`, `7d`: since that long ago (overrides `since`).
    pub range: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
    pub event_id: Option<String>,
    pub contact_id: Option<String>,
    pub cursor: Option<String>,
}

fn given(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

const RANGES: [(&str, &str, i64); 4] = [
    ("15m", "last 15 minutes", 15 * 60),
    ("1h", "last hour", 3600),
    ("24h", "last 24 hours", 86_400),
    ("7d", "last 7 days", 7 * 86_400),
];

impl EventParams {
    /// The admin API's query, or what is wrong with the filter.
    pub fn to_query(&self, now: DateTime<Utc>) -> Result<EventQuery, String> {
        let time = |name: &str, value: &Option<String>| -> Result<Option<DateTime<Utc>>, String> {
            given(value)
                .map(|v| {
                    DateTime::parse_from_rfc3339(v)
                        .map(|t| t.with_timezone(&Utc))
                        .map_err(|_| format!("{name}: not an RFC 3339 time (2026-12-03T06:00:00Z)"))
                })
                .transpose()
        };
        let status = match given(&self.status) {
            None => None,
            Some("pending") => Some(EventStatus::Pending),
            Some("processed") => Some(EventStatus::Processed),
            Some("failed") => Some(EventStatus::Failed),
            Some(_) => return Err("status: pending, processed or failed".into()),
        };
        let event_type = match given(&self.event_type) {
            None => None,
            Some(name) => Some(EventType::parse(name).ok_or("type: not an event type")?),
        };
        let since = match given(&self.range) {
            Some(range) => {
                let (_, _, secs) = RANGES
                    .iter()
                    .find(|(key, _, _)| *key == range)
                    .ok_or("range: 15m, 1h, 24h or 7d")?;
                Some(now - Duration::seconds(*secs))
            }
            None => time("since", &self.since)?,
        };
        let cursor = given(&self.cursor)
            .map(|c| c.parse::<i64>().map_err(|_| "cursor: not a cursor"))
            .transpose()?;
        Ok(EventQuery {
            status,
            event_type,
            since,
            until: time("until", &self.until)?,
            event_id: given(&self.event_id).map(str::to_owned),
            contact_id: given(&self.contact_id).map(str::to_owned),
            limit: Some(50),
            cursor,
        })
    }

    /// This filter's query string with another cursor.
    fn with_cursor(&self, cursor: &str) -> String {
        let mut pairs: Vec<(&str, &str)> = [
            ("status", &self.status),
            ("type", &self.event_type),
            ("range", &self.range),
            ("since", &self.since),
            ("until", &self.until),
            ("eventId", &self.event_id),
            ("contactId", &self.contact_id),
        ]
        .into_iter()
        .filter_map(|(k, v)| given(v).map(|v| (k, v)))
        .collect();
        pairs.push(("cursor", cursor));
        pairs
            .iter()
            .map(|(k, v)| format!("{k}={}", enc(v)))
            .collect::<Vec<_>>()
            .join("&")
    }
}

fn status_badge(status: &str) -> Markup {
    html! { span class={ "badge " (status) } { (status) } }
}

fn events_table(events: &[EventView]) -> Markup {
    html! {
        table.events {
            thead { tr { th { "received" } th { "event" } th { "type" } th { "contact" } th { "status" } th { "attempts" } th { "error" } } }
            tbody {
                @for e in events {
                    tr data-event-id=(e.event_id) {
                        td.time { (when(e.received_at)) }
                        td { a.event-link href=(event_href(&e.event_id)) { (shown(&e.event_id)) } }
                        td { (e.event_type) }
                        td { a href=(contact_href(&e.contact_id)) { (shown(&e.contact_id)) } }
                        td { (status_badge(&e.status)) }
                        td.num { (e.attempts) }
                        td.error { @if let Some(error) = &e.error { (shown(error)) } }
                    }
                }
            }
        }
    }
}

/// The events list with its filter form.
pub fn events(
    session: &Session,
    params: &EventParams,
    result: &Result<EventPage, String>,
) -> Markup {
    let query = params.to_query(Utc::now()).ok();
    let selected = |value: &Option<String>, option: &str| given(value) == Some(option);
    let bulk = query
        .as_ref()
        .is_some_and(|q| q.status.is_none_or(|s| s == EventStatus::Failed));
    layout(
        "Events",
        Some(session),
        html! {
            div.heading { h1 { "Events" } span.muted { "newest first" } }
            form.filters.card method="get" action="/console/events" {
                label { "status"
                    select name="status" {
                        option value="" { "any" }
                        @for s in ["pending", "processed", "failed"] {
                            option value=(s) selected[selected(&params.status, s)] { (s) }
                        }
                    }
                }
                label { "type"
                    select name="type" {
                        option value="" { "any" }
                        @for t in EventType::ALL {
                            option value=(t.as_str()) selected[selected(&params.event_type, t.as_str())] { (t.as_str()) }
                        }
                    }
                }
                label { "received"
                    select name="range" {
                        option value="" { "any time / since–until" }
                        @for (key, label, _) in RANGES {
                            option value=(key) selected[selected(&params.range, key)] { (label) }
                        }
                    }
                }
                label { "since" input type="text" name="since" placeholder="2026-12-03T06:00:00Z" value=[given(&params.since)]; }
                label { "until" input type="text" name="until" placeholder="RFC 3339" value=[given(&params.until)]; }
                label { "event id" input type="text" name="eventId" value=[given(&params.event_id)]; }
                label { "contact id" input type="text" name="contactId" value=[given(&params.contact_id)]; }
                div.buttons {
                    button type="submit" { "Filter" }
                    a.button.secondary href="/console/events" { "Clear" }
                }
            }
            @match result {
                Err(problem) => { p.error role="alert" { (problem) } }
                Ok(page) => {
                    @if bulk {
                        @if let Some(q) = &query {
                            div.actions {
                                button #retry-matching type="button"
                                    data-event-type=[q.event_type.map(EventType::as_str)]
                                    data-since=[q.since.map(when)]
                                    data-until=[q.until.map(when)]
                                    data-event-id=[q.event_id.as_deref()]
                                    data-contact-id=[q.contact_id.as_deref()]
                                    { "Retry the failed events matching this filter…" }
                            }
                        }
                    }
                    @if page.events.is_empty() { p.muted #no-events { "No event matches." } }
                    @else { (events_table(&page.events)) }
                    @if let Some(cursor) = &page.next_cursor {
                        p.pager { a #older href={ "/console/events?" (params.with_cursor(cursor)) } { "Older events →" } }
                    }
                }
            }
        },
    )
}

/// One event: what it is, its timeline, its payload and its outbox rows.
pub fn event(session: &Session, detail: &EventDetail) -> Markup {
    let e = &detail.event;
    let pretty = serde_json::to_string_pretty(&detail.payload).unwrap_or_default();
    layout(
        "Event",
        Some(session),
        html! {
            div.heading {
                h1 { "Event " (shown(&e.event_id)) }
                (status_badge(&e.status))
                @if e.status == "failed" {
                    button #retry-event type="button" data-retry-event=(e.event_id) { "Retry this event…" }
                }
            }
            div.columns {
                div.card {
                    h2 { "Details" }
                    dl {
                        dt { "type" } dd { (e.event_type) }
                        dt { "contact" } dd { a #contact-link href=(contact_href(&e.contact_id)) { (shown(&e.contact_id)) } }
                        dt { "status" } dd #event-status { (e.status) }
                        dt { "attempts" } dd { (e.attempts) }
                        dt { "error" } dd #event-error { @if let Some(error) = &e.error { span.error { (shown(error)) } } @else { "—" } }
                        dt { "received" } dd { (when(e.received_at)) }
                        dt { "updated" } dd { (when(e.updated_at)) }
                        dt { "processed" } dd { @if let Some(at) = e.processed_at { (when(at)) } @else { "—" } }
                    }
                    p { a href={ "/console/events?contactId=" (enc(&e.contact_id)) } { "Every event of this contact" } }
                }
                div.card {
                    h2 { "Timeline" }
                    ol.timeline #timeline {
                        @for step in &detail.timeline {
                            li class=(step.step) {
                                span.time { (when(step.at)) }
                                " "
                                strong { (step.step) }
                                @if let Some(topic) = &step.topic { " " span.muted { "topic " (shown(topic)) } }
                                @if let Some(text) = &step.detail { " " span.detail { (shown(text)) } }
                            }
                        }
                    }
                    p.muted { "Partition and offset are not recorded: the partition follows from the key (the contact id)." }
                }
            }
            div.card {
                h2 { "Stored payload" }
                pre.payload #payload { (shown(&pretty)) }
            }
            div.card {
                h2 { "Outbox rows" span.muted { " one per publication; a retry adds one" } }
                table {
                    thead { tr { th { "topic" } th { "key" } th { "created" } th { "published" } th { "attempts" } th { "last error" } th { "headers" } } }
                    tbody {
                        @for o in &detail.outbox {
                            tr {
                                td { (shown(&o.topic)) }
                                td { (shown(&o.message_key)) }
                                td.time { (when(o.created_at)) }
                                td.time { @if let Some(at) = o.published_at { (when(at)) } @else { "not yet" } }
                                td.num { (o.attempts) }
                                td.error { @if let Some(error) = &o.last_error { (shown(error)) } }
                                td { pre.headers { (shown(&serde_json::to_string_pretty(&o.headers).unwrap_or_default())) } }
                            }
                        }
                    }
                }
            }
        },
    )
}

/// A contact as mirrored, and its events.
pub fn contact(
    session: &Session,
    contact_id: &str,
    contact: Option<&ContactView>,
    events: &Result<EventPage, String>,
) -> Markup {
    layout(
        "Contact",
        Some(session),
        html! {
            div.heading { h1 { "Contact " (shown(contact_id)) } }
            div.card {
                h2 { "Mirrored state" }
                @match contact {
                    None => { p.muted { "Not in the contacts mirror (no event of it was applied yet)." } }
                    Some(c) => {
                        dl {
                            dt { "name" } dd { (shown(c.first_name.as_deref().unwrap_or(""))) " " (shown(c.last_name.as_deref().unwrap_or(""))) }
                            dt { "email" } dd { (shown(c.email.as_deref().unwrap_or("—"))) }
                            dt { "company" } dd { (shown(c.company.as_deref().unwrap_or("—"))) }
                            dt { "deleted" } dd { (if c.deleted { "yes" } else { "no" }) }
                            dt { "updated" } dd { @if let Some(at) = c.updated_at { (when(at)) } }
                            dt { "last event" } dd { a href=(event_href(&c.last_event_id)) { (shown(&c.last_event_id)) } }
                        }
                        pre.payload { (shown(&serde_json::to_string_pretty(&c.data).unwrap_or_default())) }
                    }
                }
            }
            div.card {
                h2 { "Events of this contact" }
                @match events {
                    Err(problem) => { p.error { (problem) } }
                    Ok(page) => { (events_table(&page.events)) }
                }
            }
        },
    )
}

/// A page saying what went wrong (an unknown event...).
pub fn problem(session: &Session, title: &str, message: &str) -> Markup {
    layout(
        title,
        Some(session),
        html! { div.card { h1 { (title) } p.error { (shown(message)) } p { a href="/console/events" { "Back to the events" } } } },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_text_stays_text() {
        let out = shown("<script>alert(1)</script>\"><img src=x onerror=alert(2)>\u{202e}gnp.exe")
            .into_string();
        assert!(!out.contains("<script>"), "{out}");
        assert!(!out.contains("<img"), "{out}");
        assert!(!out.contains('\u{202e}'), "{out}");
        assert!(out.contains("\\u202E"), "{out}");
        assert!(out.contains("&lt;script&gt;"), "{out}");
    }

    #[test]
    fn ids_are_percent_encoded_in_links() {
        assert_eq!(enc("evt/1?a=b&c"), "evt%2F1%3Fa%3Db%26c");
        assert_eq!(enc("javascript:alert(1)"), "javascript%3Aalert%281%29");
    }
}
