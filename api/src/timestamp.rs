//! `X-Acme-Timestamp`: unix seconds, unix milliseconds or RFC 3339, within a tolerance of now.
use chrono::{DateTime, Utc};

/// Why a timestamp was refused. The messages are safe to show to the sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TimestampError {
    #[error("the X-Acme-Timestamp header is missing")]
    Missing,
    #[error("the X-Acme-Timestamp header is not unix seconds, unix milliseconds or RFC 3339")]
    Unparseable,
    #[error("the X-Acme-Timestamp header is outside the accepted window")]
    OutOfWindow,
}

/// Unix times above this are milliseconds (1e11 seconds is the year 5138).
const MILLIS_THRESHOLD: i64 = 100_000_000_000;

/// Parses the header value.
pub fn parse_timestamp(value: &str) -> Option<DateTime<Utc>> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        let n: i64 = value.parse().ok()?;
        return if n >= MILLIS_THRESHOLD {
            DateTime::from_timestamp_millis(n)
        } else {
            DateTime::from_timestamp(n, 0)
        };
    }
    DateTime::parse_from_rfc3339(value)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// Checks that `header` is present, parses, and lies within `tolerance_secs` of `now`.
pub fn check_freshness(
    header: Option<&str>,
    now: DateTime<Utc>,
    tolerance_secs: u64,
) -> Result<DateTime<Utc>, TimestampError> {
    let header = header
        .filter(|h| !h.trim().is_empty())
        .ok_or(TimestampError::Missing)?;
    let sent_at = parse_timestamp(header).ok_or(TimestampError::Unparseable)?;
    let skew = (now - sent_at).num_milliseconds().unsigned_abs();
    if skew > tolerance_secs.saturating_mul(1000) {
        return Err(TimestampError::OutOfWindow);
    }
    Ok(sent_at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2025-05-19T00:00:00Z")
            .expect("valid")
            .with_timezone(&Utc)
    }

    #[test]
    fn parses_every_documented_form() {
        let expected = now();
        assert_eq!(parse_timestamp("1747612800"), Some(expected));
        assert_eq!(parse_timestamp("1747612800000"), Some(expected));
        assert_eq!(parse_timestamp("2025-05-19T00:00:00.000Z"), Some(expected));
        assert_eq!(parse_timestamp("2025-05-19T02:00:00+02:00"), Some(expected));
        assert_eq!(parse_timestamp(" 1747612800 "), Some(expected));
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "abc",
            "-5",
            "2025-05-19",
            "1747612800.5",
            "2025-13-40T00:00:00Z",
        ] {
            assert_eq!(parse_timestamp(bad), None, "{bad}");
        }
    }

    #[test]
    fn window_is_inclusive_in_both_directions() {
        let at = |secs: i64| (now().timestamp() + secs).to_string();
        assert!(check_freshness(Some(&at(-300)), now(), 300).is_ok());
        assert!(check_freshness(Some(&at(300)), now(), 300).is_ok());
        assert_eq!(
            check_freshness(Some(&at(-301)), now(), 300),
            Err(TimestampError::OutOfWindow)
        );
        assert_eq!(
            check_freshness(Some(&at(301)), now(), 300),
            Err(TimestampError::OutOfWindow)
        );
        assert_eq!(
            check_freshness(None, now(), 300),
            Err(TimestampError::Missing)
        );
        assert_eq!(
            check_freshness(Some("soon"), now(), 300),
            Err(TimestampError::Unparseable)
        );
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn any_header_parses_or_is_refused_without_panicking(
                header in prop_oneof![any::<String>(), "[0-9]{1,25}", "[-+0-9:TZ.]{1,40}"],
                tolerance in any::<u64>(),
                now_secs in -100_000_000_000i64..100_000_000_000i64,
            ) {
                let now = DateTime::from_timestamp(now_secs, 0).expect("in range");
                let _ = parse_timestamp(&header);
                let _ = check_freshness(Some(&header), now, tolerance);
            }

            #[test]
            fn every_second_since_1970_reads_back(secs in 0i64..100_000_000_000i64) {
                let expected = DateTime::from_timestamp(secs, 0).expect("in range");
                prop_assert_eq!(parse_timestamp(&secs.to_string()), Some(expected));
                prop_assert_eq!(parse_timestamp(&expected.to_rfc3339()), Some(expected));
            }
        }
    }
}
