//! SeaORM entities of the service's tables. Schema changes go through `migration`.
pub mod contact;
pub mod outbox;
pub mod webhook_event;

pub use webhook_event::{EventStatus, EventType};

/// Short names for the entities.
pub mod prelude {
    pub use super::contact::Entity as Contact;
    pub use super::outbox::Entity as Outbox;
    pub use super::webhook_event::Entity as WebhookEvent;
}
