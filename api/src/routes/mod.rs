//! HTTP operations, grouped by audience.
pub mod admin;
pub mod contacts;
pub mod health;
pub mod webhooks;

use poem_openapi::Tags;

#[derive(Tags)]
pub enum ApiTags {
    /// Events posted by AcmeCRM.
    Webhooks,
    /// Our mirror of AcmeCRM contacts.
    Contacts,
    /// Liveness, readiness and metrics.
    Operations,
    /// Inspect and re-run events (bearer token; absent unless `admin.token` is configured).
    Admin,
}
