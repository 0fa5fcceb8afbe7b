//! The `contacts` row is a function of the SET of events applied to the contact: any delivery
//! order, any duplication and any split into batches give the same row, on PostgreSQL.
use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use entity::{contact, webhook_event};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};
use relay::bus::BusMessage;
use relay::consume::batch::{Apply, EventProcessor};
use relay::consume::projection::{ContactRow, greatest_per_contact};
use relay::event::ContactEvent;
use sea_orm::{ActiveValue::Set, EntityTrait};
use serde_json::{Value, json};

use crate::support::*;

/// One event of a contact; few distinct minutes, so equal versions (ties) are common.
#[derive(Debug, Clone)]
struct Event {
    kind: usize,
    updated_minute: u32,
    sent_minute: u32,
    deletion_has_updated_at: bool,
}

fn event() -> impl Strategy<Value = Event> {
    (0usize..3, 0u32..3, 0u32..3, any::<bool>()).prop_map(
        |(kind, updated_minute, sent_minute, deletion_has_updated_at)| Event {
            kind,
            updated_minute,
            sent_minute,
            deletion_has_updated_at,
        },
    )
}

fn payload(contact_id: &str, event_id: &str, e: &Event) -> Value {
    let at = |m: u32| format!("2025-05-19T10:{m:02}:00Z");
    let kind = ["contact.created", "contact.updated", "contact.deleted"][e.kind];
    let mut data = json!({ "id": contact_id });
    if e.kind < 2 {
        data = json!({
            "id": contact_id, "email": format!("{event_id}@example.com"),
            "firstName": "Jane", "lastName": event_id, "createdAt": at(0),
            "updatedAt": at(e.updated_minute), "extra": { "from": event_id },
        });
    } else if e.deletion_has_updated_at {
        data["updatedAt"] = json!(at(e.updated_minute));
    }
    json!({ "id": event_id, "event": kind, "timestamp": at(e.sent_minute), "data": data })
}

/// The columns the projection owns (the bookkeeping `updated_at` aside).
type Projected = (
    Option<String>,
    Option<String>,
    Value,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
    DateTime<Utc>,
    String,
    bool,
    Option<DateTime<Utc>>,
);

fn projected(c: contact::Model) -> Projected {
    (
        c.email,
        c.last_name,
        c.data,
        c.source_created_at,
        c.source_updated_at,
        c.event_timestamp,
        c.last_event_id,
        c.deleted,
        c.deleted_at,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_order_duplication_and_batching_of_a_contacts_events_gives_the_same_row() {
    let app = TestApp::http_only().await;
    let processor = EventProcessor::new(app.db.clone());
    let cases = prop::collection::vec(event(), 1..6).prop_flat_map(|events| {
        let n = events.len();
        let deliveries = prop::collection::vec(0..n, 0..=n)
            .prop_map(move |extra| (0..n).chain(extra).collect::<Vec<_>>())
            .prop_shuffle();
        (Just(events), deliveries, 1usize..4)
    });
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 64,
        ..ProptestConfig::default()
    });
    let runtime = tokio::runtime::Handle::current();
    let result = runner.run(&cases, |(events, deliveries, batch)| {
        tokio::task::block_in_place(|| {
            runtime.block_on(async {
                let contact_id = unique("contact");
                let mut messages = BTreeMap::new();
                let mut changes = Vec::new();
                for (i, e) in events.iter().enumerate() {
                    let event_id = format!("{contact_id}-e{i}");
                    let body = payload(&contact_id, &event_id, e);
                    changes.push(ContactEvent::parse_stored(body.clone()).expect("valid"));
                    webhook_event::Entity::insert(webhook_event::ActiveModel {
                        event_id: Set(event_id.clone()),
                        event_type: Set(changes.last().expect("parsed").event_type),
                        contact_id: Set(contact_id.clone()),
                        payload: Set(body.clone()),
                        status: Set(entity::EventStatus::Pending),
                        attempts: Set(0),
                        created_at: Set(Utc::now()),
                        updated_at: Set(Utc::now()),
                        ..Default::default()
                    })
                    .exec_without_returning(&app.db)
                    .await
                    .expect("store the event");
                    let headers = [("event-id".to_owned(), event_id)].into_iter().collect();
                    messages.insert(
                        i,
                        BusMessage {
                            topic: "t".into(),
                            key: contact_id.clone(),
                            payload: body.to_string().into_bytes(),
                            headers,
                        },
                    );
                }
                let delivered: Vec<BusMessage> =
                    deliveries.iter().map(|i| messages[i].clone()).collect();
                for chunk in delivered.chunks(batch) {
                    let applied = processor
                        .apply_batch(chunk, None, Apply::Whole)
                        .await
                        .expect("apply");
                    prop_assert!(applied.outcomes.iter().all(Result::is_ok));
                    applied.commit().await.expect("commit");
                }
                let stored = contact::Entity::find_by_id(contact_id.clone())
                    .one(&app.db)
                    .await
                    .expect("query")
                    .expect("the contact exists");
                let expected = ContactRow::from(greatest_per_contact(&changes)[0]);
                let expected: Projected = (
                    expected.email.map(str::to_owned),
                    expected.last_name.map(str::to_owned),
                    expected.data.into_owned(),
                    expected.source_created_at,
                    expected.source_updated_at,
                    expected.event_timestamp,
                    expected.last_event_id.to_owned(),
                    expected.deleted,
                    expected.deleted_at,
                );
                prop_assert_eq!(projected(stored), expected);
                Ok::<(), TestCaseError>(())
            })
        })
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
}
