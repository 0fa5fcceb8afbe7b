//! `X-Acme-Signature`: hex(HMAC-SHA256(secret, raw body)), optionally prefixed `sha256=`.
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Why a signature was refused. The messages are safe to show to the sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the X-Acme-Signature header is missing")]
    Missing,
    #[error("the X-Acme-Signature header is not a hex-encoded HMAC-SHA256 digest")]
    Malformed,
    #[error("the X-Acme-Signature header does not match the request body")]
    Mismatch,
}

/// Checks signatures against every active secret (several during a rotation).
#[derive(Clone)]
pub struct SignatureVerifier {
    /// Keyed MAC states, computed once: cloning one is cheaper than re-deriving the key.
    keys: Vec<HmacSha256>,
}

impl SignatureVerifier {
    pub fn new<S: AsRef<[u8]>>(secrets: impl IntoIterator<Item = S>) -> Self {
        let keys = secrets
            .into_iter()
            .map(|s| {
                HmacSha256::new_from_slice(s.as_ref()).expect("HMAC accepts keys of any length")
            })
            .collect();
        Self { keys }
    }

    /// Verifies `header` over the exact `body` bytes, in constant time per secret.
    pub fn verify(&self, header: Option<&str>, body: &[u8]) -> Result<(), SignatureError> {
        let header = header
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .ok_or(SignatureError::Missing)?;
        let digest = parse_signature(header).ok_or(SignatureError::Malformed)?;
        // Every key is tried, so timing does not tell which one (if any) matched.
        let matched = self.keys.iter().fold(false, |matched, key| {
            let mut mac = key.clone();
            mac.update(body);
            mac.verify_slice(&digest).is_ok() | matched
        });
        if matched {
            Ok(())
        } else {
            Err(SignatureError::Mismatch)
        }
    }
}

/// Accepts `sha256=<hex>` or bare `<hex>`, either case.
fn parse_signature(header: &str) -> Option<[u8; 32]> {
    let hex_part = match header.split_once('=') {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("sha256") => rest,
        Some(_) => return None,
        None => header,
    };
    let mut digest = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut digest).ok()?;
    Some(digest)
}

/// `hex(HMAC-SHA256(secret, body))`: how AcmeCRM signs (used by the dev curl and the load generator).
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    // GitHub's published X-Hub-Signature-256 example: the same scheme.
    const GITHUB_SECRET: &str = "It's a Secret to Everybody";
    const GITHUB_BODY: &str = "Hello, World!";
    const GITHUB_HEX: &str = "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";

    #[test]
    fn github_published_vector() {
        assert_eq!(
            sign(GITHUB_SECRET.as_bytes(), GITHUB_BODY.as_bytes()),
            GITHUB_HEX
        );
        let verifier = SignatureVerifier::new([GITHUB_SECRET]);
        let body = GITHUB_BODY.as_bytes();
        assert_eq!(
            verifier.verify(Some(&format!("sha256={GITHUB_HEX}")), body),
            Ok(())
        );
        assert_eq!(verifier.verify(Some(GITHUB_HEX), body), Ok(()));
        assert_eq!(
            verifier.verify(Some(&GITHUB_HEX.to_uppercase()), body),
            Ok(())
        );
        assert_eq!(
            verifier.verify(Some(&format!("SHA256={GITHUB_HEX}")), body),
            Ok(())
        );
    }

    #[test]
    fn stripe_node_vectors() {
        // stripe-node test/crypto/helpers.ts, key `test_secret`.
        let cases = [
            (
                "",
                "f7f9bd47fb987337b5796fdc1fdb9ba221d0d5396814bfcaf9521f43fd8927fd",
            ),
            (
                r#"{"obj1":"hello","obj2":"world"}"#,
                "bebb1a643997f419b315ddba19e6f5411e1ce7f810ba6d3617ce72823092f363",
            ),
            (
                "😀",
                "837da296d05c4fe31f61d5d7ead035099d9585a5bcde87de952012a78f0b0c43",
            ),
        ];
        let verifier = SignatureVerifier::new(["test_secret"]);
        for (body, expected) in cases {
            assert_eq!(sign(b"test_secret", body.as_bytes()), expected);
            assert_eq!(verifier.verify(Some(expected), body.as_bytes()), Ok(()));
        }
    }

    #[test]
    fn the_raw_bytes_are_signed_not_a_reserialisation() {
        let verifier = SignatureVerifier::new(["k"]);
        let signature = sign(b"k", br#"{"id":"evt_1"}"#);
        assert_eq!(
            verifier.verify(Some(&signature), br#"{"id":"evt_1"}"#),
            Ok(())
        );
        assert_eq!(
            verifier.verify(Some(&signature), br#"{"id": "evt_1"}"#),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verifier.verify(Some(&signature), b"{\"id\":\"evt_1\"}\n"),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn rotation_accepts_any_active_secret() {
        let verifier = SignatureVerifier::new(["old", "new"]);
        assert_eq!(verifier.verify(Some(&sign(b"old", b"x")), b"x"), Ok(()));
        assert_eq!(verifier.verify(Some(&sign(b"new", b"x")), b"x"), Ok(()));
        assert_eq!(
            verifier.verify(Some(&sign(b"gone", b"x")), b"x"),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn missing_and_malformed_headers() {
        let verifier = SignatureVerifier::new(["k"]);
        assert_eq!(verifier.verify(None, b"x"), Err(SignatureError::Missing));
        assert_eq!(
            verifier.verify(Some("  "), b"x"),
            Err(SignatureError::Missing)
        );
        for bad in [
            "zz",
            "sha1=abcd",
            "sha256=",
            &"a".repeat(63),
            &"a".repeat(66),
            "v1,abc",
        ] {
            assert_eq!(
                verifier.verify(Some(bad), b"x"),
                Err(SignatureError::Malformed),
                "{bad}"
            );
        }
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn any_header_and_body_are_verified_without_panicking(
                header in prop_oneof![any::<String>(), "(sha256=|SHA256=)?[0-9a-fA-F]{0,70}"],
                body in prop::collection::vec(any::<u8>(), 0..256),
            ) {
                let verifier = SignatureVerifier::new(["k"]);
                let verdict = verifier.verify(Some(&header), &body);
                // A random header is never a match.
                prop_assert!(verdict.is_err());
            }

            #[test]
            fn what_we_sign_verifies_in_every_accepted_spelling(
                body in prop::collection::vec(any::<u8>(), 0..256),
            ) {
                let verifier = SignatureVerifier::new(["k"]);
                let hex = sign(b"k", &body);
                for header in [hex.clone(), hex.to_uppercase(), format!("sha256={hex}")] {
                    prop_assert_eq!(verifier.verify(Some(&header), &body), Ok(()));
                }
            }
        }
    }
}
