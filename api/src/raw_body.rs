//! The webhook body as raw bytes: the signature is computed over exactly what was sent, so serde
//! must not see it first. Documented in the spec as the contact event schema.
use futures::TryStreamExt;
use mediatype::{MediaType, ReadParams, names};
use poem::{Request, RequestBody};
use poem_openapi::error::ContentTypeError;
use poem_openapi::payload::{ParsePayload, Payload};
use poem_openapi::registry::{MetaMediaType, MetaRequest, MetaSchemaRef, Registry};
use poem_openapi::types::Type;
use poem_openapi::{ApiExtractor, ApiExtractorType, ExtractParamOptions};

use crate::error::BodyTooLarge;
use crate::schema::ContactEventSchema;

/// Body size limit, attached to the route as request data.
#[derive(Clone, Copy, Debug)]
pub struct BodyLimit(pub usize);

/// The unparsed `application/json` body of a webhook.
pub struct RawJsonBody(pub Vec<u8>);

impl Payload for RawJsonBody {
    const CONTENT_TYPE: &'static str = "application/json";

    fn check_content_type(content_type: &str) -> bool {
        is_json_media_type(content_type)
    }

    fn schema_ref() -> MetaSchemaRef {
        ContactEventSchema::schema_ref()
    }

    fn register(registry: &mut Registry) {
        ContactEventSchema::register(registry);
    }
}

impl ParsePayload for RawJsonBody {
    const IS_REQUIRED: bool = true;

    async fn from_request(request: &Request, body: &mut RequestBody) -> poem::Result<Self> {
        let limit = request.data::<BodyLimit>().map_or(usize::MAX, |l| l.0);
        read_limited(request, body, limit).await.map(Self)
    }
}

impl<'a> ApiExtractor<'a> for RawJsonBody {
    const TYPES: &'static [ApiExtractorType] = &[ApiExtractorType::RequestObject];
    type ParamType = ();
    type ParamRawType = ();

    fn register(registry: &mut Registry) {
        <Self as Payload>::register(registry);
    }

    fn request_meta() -> Option<MetaRequest> {
        Some(MetaRequest {
            description: None,
            content: vec![MetaMediaType {
                content_type: Self::CONTENT_TYPE,
                schema: Self::schema_ref(),
            }],
            required: true,
        })
    }

    async fn from_request(
        request: &'a Request,
        body: &mut RequestBody,
        _param_opts: ExtractParamOptions<Self::ParamType>,
    ) -> poem::Result<Self> {
        match request.content_type() {
            Some(content_type) if Self::check_content_type(content_type) => {
                <Self as ParsePayload>::from_request(request, body).await
            }
            Some(content_type) => Err(ContentTypeError::NotSupported {
                content_type: content_type.to_owned(),
            }
            .into()),
            None => Err(ContentTypeError::ExpectContentType.into()),
        }
    }
}

/// `application/json` or `application/<anything>+json`, parsed per RFC 9110 (names
/// case-insensitive, optional whitespace around `;`, parameters); a `charset` other than UTF-8
/// is refused, since JSON on the wire is UTF-8 (RFC 8259). The `mime` crate refuses whitespace
/// before `;` (`application/json ; charset=utf-8`), hence `mediatype`.
pub fn is_json_media_type(content_type: &str) -> bool {
    let Ok(media_type) = MediaType::parse(content_type.trim_matches([' ', '\t'])) else {
        return false;
    };
    media_type.ty == names::APPLICATION
        && (media_type.subty == names::JSON || media_type.suffix == Some(names::JSON))
        && media_type
            .get_param(names::CHARSET)
            .is_none_or(|charset| charset.unquoted_str().eq_ignore_ascii_case("utf-8"))
}

/// Reads at most `limit` bytes: a declared length over the limit is refused before reading,
/// and a chunked body is cut off as soon as it passes the limit.
async fn read_limited(
    request: &Request,
    body: &mut RequestBody,
    limit: usize,
) -> poem::Result<Vec<u8>> {
    let declared = request
        .headers()
        .get(poem::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(BodyTooLarge { limit }.into());
    }
    let mut stream = body.take()?.into_bytes_stream();
    let mut buffer = Vec::with_capacity(declared.map_or(8 * 1024, |len| len as usize));
    while let Some(chunk) = stream.try_next().await.map_err(poem::error::BadRequest)? {
        if buffer.len() + chunk.len() > limit {
            return Err(BodyTooLarge { limit }.into());
        }
        buffer.extend_from_slice(&chunk);
    }
    Ok(buffer)
}

#[cfg(test)]
mod tests {
    use super::is_json_media_type;

    #[test]
    fn json_media_types_per_rfc_9110() {
        for accepted in [
            "application/json",
            "APPLICATION/JSON",
            "Application/Json; Charset=UTF-8",
            "application/json;charset=utf-8",
            "application/json ; charset=utf-8",
            "application/json\t;\tcharset=\"utf-8\"",
            "application/json; charset=utf-8; profile=acme",
            "application/vnd.acme.event+json",
            " application/json ",
            // RFC 9110 allows empty parameters.
            "application/json;",
        ] {
            assert!(is_json_media_type(accepted), "{accepted:?}");
        }
        for refused in [
            "",
            "text/plain",
            "application/xml",
            "application/jsonx",
            "application/json; charset=latin1",
            "application/json; charset",
            "application /json",
            "application/json, text/plain",
            "application/*",
        ] {
            assert!(!is_json_media_type(refused), "{refused:?}");
        }
    }
}
