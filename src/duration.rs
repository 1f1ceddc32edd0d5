//! Go-style durations (`720h`, `1h30m`, `1.5s`, `250ms`), as Slime's config and Kubernetes write
//! them, parsed with checked arithmetic: a value past Go's own limit (about 292 years of
//! nanoseconds) is an error, never an overflow.

use std::time::Duration;

/// The largest duration Go can represent (`math.MaxInt64` nanoseconds); Slime, which reads the
/// same fields with Go, refuses anything longer.
pub const MAX: Duration = Duration::from_nanos(i64::MAX as u64);

/// Why a duration could not be parsed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// Not of the form `<number><unit>...`.
    #[error("expected a duration like `30s`, `1h30m` or `250ms`")]
    Syntax,
    /// A unit other than `ns`, `us`, `µs`, `ms`, `s`, `m`, `h`.
    #[error("unknown unit {0:?} (use ns, us, ms, s, m or h)")]
    Unit(String),
    /// Negative.
    #[error("a duration must not be negative")]
    Negative,
    /// Longer than [`MAX`].
    #[error("too long (at most {}h)", MAX.as_secs() / 3600)]
    TooLong,
}

/// Parses a non-negative Go-style duration; `0` alone is allowed, as in Go.
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    let (negative, mut rest) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(DurationError::Syntax);
    }
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(digits);
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let per_unit: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => return Err(DurationError::Syntax),
            other => return Err(DurationError::Unit(other.to_string())),
        };
        total = total
            .checked_add(component_nanos(number, per_unit)?)
            .ok_or(DurationError::TooLong)?;
        rest = next;
    }
    if negative && total > 0 {
        return Err(DurationError::Negative);
    }
    let nanos = u64::try_from(total).map_err(|_| DurationError::TooLong)?;
    let d = Duration::from_nanos(nanos);
    if d > MAX {
        return Err(DurationError::TooLong);
    }
    Ok(d)
}

/// `number` (`12`, `1.5`, `.5`) times `per_unit` nanoseconds, fractions truncated to the
/// nanosecond as Go does.
fn component_nanos(number: &str, per_unit: u128) -> Result<u128, DurationError> {
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
        return Err(DurationError::Syntax);
    }
    let mut nanos: u128 = 0;
    for digit in whole.bytes() {
        nanos = nanos
            .checked_mul(10)
            .and_then(|n| n.checked_add(u128::from(digit - b'0')))
            .ok_or(DurationError::TooLong)?;
        // Past this, the product with any unit is past MAX already.
        if nanos > u128::from(u64::MAX) {
            return Err(DurationError::TooLong);
        }
    }
    nanos *= per_unit;
    let mut scale = per_unit;
    for digit in fraction.bytes() {
        scale /= 10;
        nanos += u128::from(digit - b'0') * scale;
    }
    Ok(nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_go_writes_and_refuses_the_rest() {
        let table: &[(&str, Result<Duration, DurationError>)] = &[
            ("0", Ok(Duration::ZERO)),
            ("30s", Ok(Duration::from_secs(30))),
            ("720h", Ok(Duration::from_secs(720 * 3600))),
            ("1h30m", Ok(Duration::from_secs(5400))),
            ("1.5s", Ok(Duration::from_millis(1500))),
            (".5m", Ok(Duration::from_secs(30))),
            ("250ms", Ok(Duration::from_millis(250))),
            ("10us", Ok(Duration::from_micros(10))),
            ("10µs", Ok(Duration::from_micros(10))),
            ("7ns", Ok(Duration::from_nanos(7))),
            ("+2s", Ok(Duration::from_secs(2))),
            ("2562047h", Ok(Duration::from_secs(2_562_047 * 3600))),
            ("2562048h", Err(DurationError::TooLong)),
            ("99999999999999999999s", Err(DurationError::TooLong)),
            (
                "99999999999999999999999999999999999999999h",
                Err(DurationError::TooLong),
            ),
            ("-1s", Err(DurationError::Negative)),
            ("", Err(DurationError::Syntax)),
            ("s", Err(DurationError::Syntax)),
            ("10", Err(DurationError::Syntax)),
            ("1..5s", Err(DurationError::Syntax)),
            (".s", Err(DurationError::Syntax)),
            ("10d", Err(DurationError::Unit("d".into()))),
            ("1h 30m", Err(DurationError::Unit("h ".into()))),
        ];
        for (text, want) in table {
            assert_eq!(&parse(text), want, "{text:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics(text in "[-+]?[0-9.]{0,30}(ns|us|ms|s|m|h|d)?([0-9.]{0,30}(s|m|h))?") {
            let _ = parse(&text);
        }

        #[test]
        fn seconds_round_trip(secs in 0u64..=MAX.as_secs()) {
            proptest::prop_assert_eq!(parse(&format!("{secs}s")), Ok(Duration::from_secs(secs)));
        }
    }
}
