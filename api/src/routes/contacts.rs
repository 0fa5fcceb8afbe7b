//! `GET /api/contacts/{id}`: the mirrored contact.
use std::sync::Arc;

use chrono::{DateTime, Utc};
use entity::contact;
use poem::web::Data;
use poem_openapi::param::Path;
use poem_openapi::payload::Json;
use poem_openapi::{Object, OpenApi};
use sea_orm::EntityTrait;

use crate::app::AppState;
use crate::error::{ApiError, ApiResult};
use crate::routes::ApiTags;
use crate::schema::EXAMPLE_CONTACT_ID;
use crate::validation::is_storable_id;

pub struct ContactsApi;

/// A contact as of the newest event applied to it.
#[derive(Object, Debug, Clone, serde::Deserialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct ContactView {
    pub id: String,
    #[oai(nullable)]
    pub email: Option<String>,
    #[oai(nullable)]
    pub first_name: Option<String>,
    #[oai(nullable)]
    pub last_name: Option<String>,
    #[oai(nullable)]
    pub phone: Option<String>,
    #[oai(nullable)]
    pub company: Option<String>,
    #[oai(nullable)]
    pub title: Option<String>,
    /// `data.createdAt` as AcmeCRM sent it.
    #[oai(nullable)]
    pub created_at: Option<DateTime<Utc>>,
    /// `data.updatedAt` of the applied event.
    #[oai(nullable)]
    pub updated_at: Option<DateTime<Utc>>,
    /// True once a `contact.deleted` was applied; a deleted contact is never brought back.
    pub deleted: bool,
    #[oai(nullable)]
    pub deleted_at: Option<DateTime<Utc>>,
    /// The event that produced this state.
    pub last_event_id: String,
    /// The full `data` object of that event, unknown fields included.
    pub data: serde_json::Value,
}

impl From<contact::Model> for ContactView {
    fn from(c: contact::Model) -> Self {
        Self {
            id: c.id,
            email: c.email,
            first_name: c.first_name,
            last_name: c.last_name,
            phone: c.phone,
            company: c.company,
            title: c.title,
            created_at: c.source_created_at,
            updated_at: c.source_updated_at,
            deleted: c.deleted,
            deleted_at: c.deleted_at,
            last_event_id: c.last_event_id,
            data: c.data,
        }
    }
}

/// The example of `id`: the contact of the spec's example event.
fn example_contact_id() -> String {
    EXAMPLE_CONTACT_ID.to_owned()
}

#[OpenApi(tag = "ApiTags::Contacts")]
impl ContactsApi {
    /// Get a mirrored contact
    #[oai(
        path = "/api/contacts/:id",
        method = "get",
        operation_id = "getContact"
    )]
    async fn get_contact(
        &self,
        state: Data<&Arc<AppState>>,
        #[oai(example = "example_contact_id")] id: Path<String>,
    ) -> ApiResult<Json<ContactView>> {
        find_contact(&state.db, &id.0).await.map(Json)
    }
}

/// The mirrored contact `id` (404 when there is none); the console shows it too.
pub async fn find_contact(db: &sea_orm::DatabaseConnection, id: &str) -> ApiResult<ContactView> {
    // An id validation would refuse (NUL, over 255 bytes) names no contact; the store could not
    // even be asked about it.
    if !is_storable_id(id) {
        return Err(ApiError::not_found("no contact with this id"));
    }
    let found = contact::Entity::find_by_id(id.to_owned()).one(db).await?;
    found
        .map(ContactView::from)
        .ok_or_else(|| ApiError::not_found(format!("no contact with id {id}")))
}
