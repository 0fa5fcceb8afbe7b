//! Console sessions without server-side state: the cookie is `<expiry>.<nonce>.<mac>`, the MAC an
//! HMAC-SHA256 under a key derived from the admin token; the CSRF token is another HMAC of the
//! nonce. Neither contains the token, and a new admin token invalidates both.
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::config::Secret;

/// The session cookie's name.
pub const COOKIE: &str = "acme_console";
/// How long a sign-in lasts.
pub const LIFETIME_SECS: i64 = 8 * 3600;
/// The `Set-Cookie` that signs out.
pub const CLEAR_COOKIE: &str = "acme_console=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0";

type HmacSha256 = Hmac<Sha256>;

/// The keys of the console's sessions, derived from the admin token.
#[derive(Clone)]
pub struct ConsoleKeys {
    key: [u8; 32],
}

/// A signed-in browser.
pub struct Session {
    csrf: String,
}

/// A new session: its cookie value and CSRF token.
pub struct Issued {
    cookie: String,
}

impl Issued {
    /// The `Set-Cookie` header value (`Secure` when the browser reached us over HTTPS).
    pub fn set_cookie(&self, secure: bool) -> String {
        format!(
            "{COOKIE}={}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={LIFETIME_SECS}{}",
            self.cookie,
            if secure { "; Secure" } else { "" }
        )
    }
}

fn mac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes a key of any length");
    for part in parts {
        mac.update(part);
        mac.update(b"|");
    }
    mac.finalize().into_bytes().into()
}

impl ConsoleKeys {
    pub fn new(admin_token: &Secret) -> Self {
        Self {
            key: mac(
                admin_token.expose().as_bytes(),
                &[b"acme-webhooks console session v1"],
            ),
        }
    }

    /// Whether `candidate` is the admin token (compared as MACs: constant time, equal lengths).
    pub fn token_matches(&self, candidate: &str) -> bool {
        // The key is a MAC of the token: recompute it from the candidate and compare.
        let other = Self::new(&Secret::new(candidate));
        bool::from(self.key.ct_eq(&other.key))
    }

    /// A new session, valid for [`LIFETIME_SECS`].
    pub fn issue(&self) -> Issued {
        let mut nonce = [0u8; 16];
        rand::rng().fill_bytes(&mut nonce);
        let nonce = hex::encode(nonce);
        let expires = (chrono::Utc::now().timestamp() + LIFETIME_SECS).to_string();
        let tag = hex::encode(mac(
            &self.key,
            &[b"session", expires.as_bytes(), nonce.as_bytes()],
        ));
        Issued {
            cookie: format!("{expires}.{nonce}.{tag}"),
        }
    }

    /// The session of a cookie value, if it is ours and not expired.
    pub fn verify(&self, cookie: &str) -> Option<Session> {
        let mut parts = cookie.split('.');
        let (expires, nonce, tag) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let expected = hex::encode(mac(
            &self.key,
            &[b"session", expires.as_bytes(), nonce.as_bytes()],
        ));
        if !bool::from(expected.as_bytes().ct_eq(tag.as_bytes())) {
            return None;
        }
        if expires.parse::<i64>().ok()? <= chrono::Utc::now().timestamp() {
            return None;
        }
        Some(Session {
            csrf: hex::encode(mac(&self.key, &[b"csrf", nonce.as_bytes()])),
        })
    }
}

impl Session {
    /// The token the pages send back in `X-CSRF-Token`.
    pub fn csrf(&self) -> &str {
        &self.csrf
    }

    pub fn csrf_matches(&self, candidate: &str) -> bool {
        bool::from(self.csrf.as_bytes().ct_eq(candidate.as_bytes()))
    }
}

/// The session cookie's value in `request`, if it sent one.
pub fn from_request(request: &poem::Request) -> Option<&str> {
    request
        .headers()
        .get_all(poem::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            (name == COOKIE).then_some(value)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_verifies_under_its_token_only() {
        let keys = ConsoleKeys::new(&Secret::new("admin-token-123"));
        let issued = keys.issue();
        let session = keys.verify(&issued.cookie).expect("valid");
        assert_eq!(session.csrf().len(), 64);
        assert!(!issued.cookie.contains("admin-token-123"));
        assert!(
            ConsoleKeys::new(&Secret::new("another-token"))
                .verify(&issued.cookie)
                .is_none()
        );
        assert!(keys.token_matches("admin-token-123"));
        assert!(!keys.token_matches("admin-token-12"));
    }

    #[test]
    fn a_tampered_or_expired_cookie_is_refused() {
        let keys = ConsoleKeys::new(&Secret::new("admin-token-123"));
        let cookie = keys.issue().cookie;
        let (expires, rest) = cookie.split_once('.').expect("three parts");
        let later = format!("{}.{rest}", expires.parse::<i64>().expect("a number") + 1);
        assert!(keys.verify(&later).is_none());
        assert!(keys.verify("").is_none());
        assert!(keys.verify("1.2.3.4").is_none());
        let nonce = "00";
        let past = "1".to_owned();
        let tag = hex::encode(mac(
            &keys.key,
            &[b"session", past.as_bytes(), nonce.as_bytes()],
        ));
        assert!(keys.verify(&format!("{past}.{nonce}.{tag}")).is_none());
    }
}
