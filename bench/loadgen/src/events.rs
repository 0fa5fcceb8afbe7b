//! What the load generator sends: realistic AcmeCRM contact events, signed exactly as AcmeCRM
//! signs them, built straight into one buffer per request.
//!
//! A body is a pure function of its [`EventSpec`], so a duplicate re-sends the *same bytes* as
//! the original (as a retrying AcmeCRM would), without keeping the bodies around.
use std::fmt::Write as _;

use chrono::{DateTime, SecondsFormat, Utc};
use hmac::{Hmac, Mac};
use rand::Rng;
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The three event types, in the proportions of a CRM's traffic: mostly updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Created,
    Updated,
    Deleted,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Created => "contact.created",
            Kind::Updated => "contact.updated",
            Kind::Deleted => "contact.deleted",
        }
    }

    /// 10% created, 80% updated, 10% deleted.
    pub fn pick(rng: &mut impl Rng) -> Self {
        match rng.random_range(0..10u8) {
            0 => Kind::Created,
            9 => Kind::Deleted,
            _ => Kind::Updated,
        }
    }
}

/// Everything a body is made from.
#[derive(Debug, Clone, Copy)]
pub struct EventSpec {
    /// Unique within a run; the event id is `evt_lg_<run>_<seq>`.
    pub seq: u64,
    pub kind: Kind,
    /// Index of the contact, below `--contacts`.
    pub contact: u32,
    /// The event's `timestamp` and `data.updatedAt` (unix milliseconds), so a contact's later
    /// events carry later versions, as the consumer's ordering rule expects.
    pub updated_ms: i64,
}

/// Names with their lower-case form for the e-mail address (no per-request lower-casing).
const FIRST_NAMES: [(&str, &str); 8] = [
    ("John", "john"),
    ("Maria", "maria"),
    ("Wei", "wei"),
    ("Aisha", "aisha"),
    ("Lars", "lars"),
    ("Sofia", "sofia"),
    ("Kenji", "kenji"),
    ("Amara", "amara"),
];
const LAST_NAMES: [(&str, &str); 8] = [
    ("Smith", "smith"),
    ("Garcia", "garcia"),
    ("Chen", "chen"),
    ("Okafor", "okafor"),
    ("Nilsson", "nilsson"),
    ("Rossi", "rossi"),
    ("Tanaka", "tanaka"),
    ("Mensah", "mensah"),
];
const COMPANIES: [&str; 4] = [
    "Acme Inc",
    "Globex Corporation",
    "Initech GmbH",
    "Umbrella Logistics Ltd",
];
const TITLES: [&str; 4] = [
    "Senior Engineer",
    "Head of Procurement",
    "Customer Success Manager",
    "Chief Financial Officer",
];
const CITIES: [(&str, &str, &str); 4] = [
    ("Berlin", "10115", "DE"),
    ("Lisbon", "1100-148", "PT"),
    ("Toronto", "M5H 2N2", "CA"),
    ("Osaka", "530-0001", "JP"),
];

/// Builds and signs bodies for one run.
pub struct EventFactory {
    run_id: String,
    /// Keyed once: cloning a keyed MAC is cheaper than re-deriving the key per request.
    key: HmacSha256,
    /// A key the service does not know, for the `--invalid-share` requests (answered 401).
    wrong_key: HmacSha256,
}

impl EventFactory {
    pub fn new(run_id: &str, secret: &[u8]) -> Self {
        let mut wrong = secret.to_vec();
        wrong.extend_from_slice(b"-not-the-secret");
        Self {
            run_id: run_id.to_owned(),
            key: HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length"),
            wrong_key: HmacSha256::new_from_slice(&wrong).expect("HMAC accepts keys of any length"),
        }
    }

    /// The prefix shared by every event id of this run (to find them in the database).
    pub fn event_id_prefix(&self) -> String {
        format!("evt_lg_{}_", self.run_id)
    }

    /// The sequence number inside an event id of this run.
    pub fn seq_of(&self, event_id: &str) -> Option<u64> {
        event_id
            .strip_prefix("evt_lg_")?
            .strip_prefix(self.run_id.as_str())?
            .strip_prefix('_')?
            .parse()
            .ok()
    }

    /// The JSON body of `spec`, about 0.8 KB for created/updated and 0.3 KB for deleted.
    pub fn body(&self, spec: &EventSpec) -> String {
        let mut out = String::with_capacity(1024);
        self.write_body(spec, &mut out);
        out
    }

    fn write_body(&self, spec: &EventSpec, out: &mut String) {
        let when = DateTime::<Utc>::from_timestamp_millis(spec.updated_ms)
            .unwrap_or_default()
            .to_rfc3339_opts(SecondsFormat::Millis, true);
        let c = spec.contact as usize;
        let (first, first_l) = FIRST_NAMES[c % FIRST_NAMES.len()];
        let (last, last_l) = LAST_NAMES[(c / FIRST_NAMES.len()) % LAST_NAMES.len()];
        // Writing into a String cannot fail; the results are ignored for that reason.
        let _ = write!(
            out,
            r#"{{"event":"{}","timestamp":"{when}","id":"evt_lg_{}_{}","data":{{"id":"{}""#,
            spec.kind.as_str(),
            self.run_id,
            spec.seq,
            ContactId(spec.contact),
        );
        if spec.kind == Kind::Deleted {
            let _ = write!(
                out,
                r#","updatedAt":"{when}","deletedBy":{{"id":"usr_{:04}","email":"admin{}@acme-crm.example"}},"reason":"merged_duplicate"}}}}"#,
                c % 97,
                c % 7,
            );
            return;
        }
        let company = COMPANIES[c % COMPANIES.len()];
        let title = TITLES[(c / 3) % TITLES.len()];
        let (city, postal, country) = CITIES[(c / 5) % CITIES.len()];
        let _ = write!(
            out,
            concat!(
                r#","firstName":"{first}","lastName":"{last}","email":"{first_l}.{last_l}.{c}@example.com","#,
                r#""phone":"+1-555-{p1:03}-{p2:04}","company":"{company}","title":"{title}","#,
                r#""createdAt":"2025-01-{day:02}T09:30:00.000Z","updatedAt":"{when}","#,
                r#""address":{{"street":"{street} Market Street","city":"{city}","postalCode":"{postal}","country":"{country}"}},"#,
                r#""tags":["customer","newsletter","{tier}"],"source":"web-form","#,
                r#""owner":{{"id":"usr_{owner:04}","email":"owner{owner}@acme-crm.example"}},"#,
                r#""customFields":{{"lifecycleStage":"{stage}","leadScore":{score},"preferredLanguage":"en","marketingConsent":true}}}}}}"#,
            ),
            first = first,
            last = last,
            first_l = first_l,
            last_l = last_l,
            c = c,
            p1 = c % 1000,
            p2 = (spec.seq % 10_000),
            company = company,
            title = title,
            day = c % 28 + 1,
            when = when,
            street = c % 900 + 100,
            city = city,
            postal = postal,
            country = country,
            tier = if c.is_multiple_of(3) {
                "enterprise"
            } else {
                "smb"
            },
            owner = c % 97,
            stage = if spec.kind == Kind::Created {
                "lead"
            } else {
                "customer"
            },
            score = spec.seq % 100,
        );
    }

    /// The `X-Acme-Signature` value of `body`: `sha256=<hex HMAC-SHA256>`, with the real secret,
    /// or with a wrong one when `valid` is false.
    pub fn signature(&self, body: &[u8], valid: bool) -> String {
        let mut mac = if valid {
            self.key.clone()
        } else {
            self.wrong_key.clone()
        };
        mac.update(body);
        let digest = mac.finalize().into_bytes();
        let mut header = [0u8; 7 + 64];
        header[..7].copy_from_slice(b"sha256=");
        hex::encode_to_slice(digest, &mut header[7..]).expect("64 hex digits fit 32 bytes");
        String::from_utf8_lossy(&header).into_owned()
    }
}

/// A stable UUID-shaped contact id, the same across runs, so repeated runs update the same
/// contacts rather than growing the table.
struct ContactId(u32);

impl std::fmt::Display for ContactId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "0a1c0ad0-0000-4000-8000-{:012x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::signature::SignatureVerifier;
    use api::validation::validate_event;

    fn spec(kind: Kind) -> EventSpec {
        EventSpec {
            seq: 42,
            kind,
            contact: 123,
            updated_ms: 1_764_000_000_123,
        }
    }

    #[test]
    fn every_kind_is_a_valid_event_of_realistic_size() {
        let factory = EventFactory::new("r1", b"s");
        for kind in [Kind::Created, Kind::Updated, Kind::Deleted] {
            let body = factory.body(&spec(kind));
            let event = validate_event(body.as_bytes())
                .unwrap_or_else(|e| panic!("{kind:?} is invalid: {e:?}\n{body}"));
            assert_eq!(event.event_type.as_str(), kind.as_str());
            assert_eq!(event.event_id, "evt_lg_r1_42");
            assert_eq!(factory.seq_of(&event.event_id), Some(42));
            assert_eq!(event.contact_id, "0a1c0ad0-0000-4000-8000-00000000007b");
            let expected = if kind == Kind::Deleted {
                200..600
            } else {
                500..1100
            };
            assert!(expected.contains(&body.len()), "{kind:?}: {}", body.len());
        }
    }

    #[test]
    fn bodies_are_reproducible_and_signed_like_acmecrm() {
        let factory = EventFactory::new("r1", b"secret");
        let body = factory.body(&spec(Kind::Updated));
        assert_eq!(body, factory.body(&spec(Kind::Updated)));
        let verifier = SignatureVerifier::new(["secret"]);
        let good = factory.signature(body.as_bytes(), true);
        assert!(good.starts_with("sha256="));
        assert_eq!(verifier.verify(Some(&good), body.as_bytes()), Ok(()));
        let bad = factory.signature(body.as_bytes(), false);
        assert!(verifier.verify(Some(&bad), body.as_bytes()).is_err());
    }
}
