//! The outbox: the `outbox` table and every statement on it.
//!
//! - `store`: rows written inside the caller's transaction, with the events at ingest
//!   ([`store_events`], the writer then wakes the relays) or for a retry ([`enqueue`], NOTIFY at
//!   commit);
//! - `claim`: rows claimed and marked by the relay ([`claim`], [`mark_published`],
//!   [`mark_failed`]);
//! - `republish`: the safety net that publishes a pending event's row again
//!   ([`republish_pending`]);
//! - [`backlog`]: what waits, summed up for operators and gauges;
//! - `prune`: published rows deleted by retention ([`prune_published`]).
//!
//! What a row says is decided once, by [`OutboxMessage::of`]: the topic
//! (`<prefix>.<event type>`), the key (the contact id), the payload as stored, and the headers.
pub mod backlog;
mod claim;
mod prune;
mod republish;
mod store;

pub use backlog::{Backlog, PartitionView, TopicBacklog, backlog, refresh_backlog_gauges};
pub use claim::{ClaimedRow, claim, mark_failed, mark_published};
pub use prune::prune_published;
pub use republish::{REPUBLISH_MAX_INTERVAL, republish_pending, republish_wait};
pub use store::{NOTIFY_CHANNEL, enqueue, store_events};

use entity::outbox::Column as O;
use entity::{EventType, outbox, webhook_event};
use sea_orm::{ColumnTrait, ConnectionTrait, DbErr, EntityTrait, QueryFilter, QueryOrder};
use serde::Serialize;
use serde_json::{Value, json};

use crate::config::KafkaConfig;
use crate::event::{ContactEvent, HEADER_EVENT_ID, HEADER_EVENT_TYPE};

/// An event to store or re-queue, as the outbox needs it.
#[derive(Debug, Clone, Copy)]
pub struct NewEvent<'a> {
    pub event_id: &'a str,
    pub event_type: EventType,
    pub contact_id: &'a str,
    pub payload: &'a Value,
}

impl<'a> From<&'a ContactEvent> for NewEvent<'a> {
    fn from(e: &'a ContactEvent) -> Self {
        Self {
            event_id: &e.event_id,
            event_type: e.event_type,
            contact_id: &e.contact_id,
            payload: &e.payload,
        }
    }
}

impl<'a> From<&'a webhook_event::Model> for NewEvent<'a> {
    fn from(e: &'a webhook_event::Model) -> Self {
        Self {
            event_id: &e.event_id,
            event_type: e.event_type,
            contact_id: &e.contact_id,
            payload: &e.payload,
        }
    }
}

/// Where an outbox row sends its event, and with which headers. The payload is the event's own:
/// on PostgreSQL the row holds no copy, and the relay reads the stored event's when it publishes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutboxMessage {
    pub topic: String,
    /// The contact id: one contact's events stay in one partition, in order.
    pub key: String,
    /// Header name to string value.
    pub headers: Value,
}

impl OutboxMessage {
    /// The message of `event`: the one place the topic rule and the headers are written.
    pub fn of(kafka: &KafkaConfig, event: &NewEvent<'_>) -> Self {
        Self {
            topic: kafka.topic_for(event.event_type.as_str()),
            key: event.contact_id.to_owned(),
            headers: json!({
                HEADER_EVENT_ID: event.event_id,
                HEADER_EVENT_TYPE: event.event_type.as_str(),
            }),
        }
    }
}

/// The outbox rows of one event, oldest first: its publish history.
pub async fn rows_of_event<C: ConnectionTrait>(
    conn: &C,
    event_id: &str,
) -> Result<Vec<outbox::Model>, DbErr> {
    outbox::Entity::find()
        .filter(O::EventId.eq(event_id))
        .order_by_asc(O::Id)
        .all(conn)
        .await
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::time::Duration;

    use sea_orm::TransactionTrait;

    use super::*;

    #[test]
    fn a_message_names_its_topic_key_and_headers() {
        let kafka: KafkaConfig = serde_json::from_value(json!({
            "brokers": null, "topic_prefix": "acme", "group_id": "g", "create_topics": false,
            "partitions": 1, "replication_factor": 1, "message_timeout_ms": 1000,
        }))
        .expect("config");
        let payload = json!({ "id": "evt_1" });
        let message = OutboxMessage::of(
            &kafka,
            &NewEvent {
                event_id: "evt_1",
                event_type: EventType::Deleted,
                contact_id: "c1",
                payload: &payload,
            },
        );
        assert_eq!(message.topic, "acme.contact.deleted");
        assert_eq!(message.key, "c1");
        assert_eq!(
            message.headers,
            json!({ "event-id": "evt_1", "event-type": "contact.deleted" })
        );
    }

    /// The portable (SQLite) statements, end to end: store, duplicate, backlog, claim, mark.
    #[tokio::test]
    async fn the_portable_statements_store_claim_and_sum_up_the_outbox() {
        use migration::MigratorTrait;
        let db = sea_orm::Database::connect("sqlite::memory:")
            .await
            .expect("in-memory SQLite");
        migration::Migrator::up(&db, None)
            .await
            .expect("migrations");
        let kafka: KafkaConfig = serde_json::from_value(json!({
            "brokers": null, "topic_prefix": "t", "group_id": "g", "create_topics": false,
            "partitions": 1, "replication_factor": 1, "message_timeout_ms": 1000,
        }))
        .expect("config");
        let payload = json!({ "id": "evt_1" });
        let event = |event_id| NewEvent {
            event_id,
            event_type: EventType::Updated,
            contact_id: "c1",
            payload: &payload,
        };
        let txn = db.begin().await.expect("begin");
        let new = store_events(
            &txn,
            &kafka,
            &[event("evt_1"), event("evt_2"), event("evt_1")],
        )
        .await
        .expect("store");
        txn.commit().await.expect("commit");
        assert_eq!(new, HashSet::from(["evt_1".to_owned(), "evt_2".to_owned()]));
        let again = store_events(&db, &kafka, &[event("evt_2")])
            .await
            .expect("store");
        assert!(again.is_empty());

        let summary = backlog(&db).await.expect("backlog");
        assert_eq!(
            (summary.pending, summary.parked, summary.unprocessed),
            (2, 0, 2)
        );
        assert_eq!(summary.topics.len(), 1);
        assert_eq!(summary.topics[0].topic, "t.contact.updated");

        let txn = db.begin().await.expect("begin");
        let rows = claim(&txn, 10).await.expect("claim");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].headers["event-type"], "contact.updated");
        // The payload as stored, to go to the bus as it is.
        let published: Value = serde_json::from_str(&rows[0].payload).expect("JSON payload");
        assert_eq!(published, payload);
        mark_failed(&txn, rows[1].id, "broker down", Duration::from_secs(60))
            .await
            .expect("mark failed");
        mark_published(&txn, vec![rows[0].id]).await.expect("mark");
        txn.commit().await.expect("commit");
        let summary = backlog(&db).await.expect("backlog");
        assert_eq!((summary.pending, summary.parked), (1, 1));
        assert!(claim(&db, 10).await.expect("claim").is_empty());

        // The consumer's claim: pending events only, each once.
        let ids = std::collections::BTreeSet::from(["evt_1", "evt_3"]);
        let claimed = crate::webhook_events::claim_pending(&db, &ids)
            .await
            .expect("claim events");
        assert_eq!(claimed.keys().collect::<Vec<_>>(), ["evt_1"]);
        let again = crate::webhook_events::claim_pending(&db, &ids)
            .await
            .expect("claim events");
        assert!(again.is_empty(), "{again:?}");
    }
}
