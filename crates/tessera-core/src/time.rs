//! RFC 3339 timestamps (UTC, whole seconds), formatted and parsed without a date library.
//! Pure: the caller passes the time in.

/// Seconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SSZ` (UTC).
pub fn format_rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Parses `YYYY-MM-DDTHH:MM:SSZ` (or a date alone, `YYYY-MM-DD`, meaning midnight UTC)
/// into seconds since the Unix epoch.
pub fn parse_rfc3339(s: &str) -> Result<u64, String> {
    let bad =
        || format!("invalid time {:?}: expected YYYY-MM-DDTHH:MM:SSZ (UTC)", s.chars().take(40).collect::<String>());
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Result<i64, String> {
        let part = s.get(r).ok_or_else(bad)?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return Err(bad());
        }
        part.parse().map_err(|_| bad())
    };
    if !(b.len() == 10 || b.len() == 20) || b[4] != b'-' || b[7] != b'-' {
        return Err(bad());
    }
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = if b.len() == 20 {
        if b[10] != b'T' || b[13] != b':' || b[16] != b':' || b[19] != b'Z' {
            return Err(bad());
        }
        (num(11..13)?, num(14..16)?, num(17..19)?)
    } else {
        (0, 0, 0)
    };
    if !(1970..=9999).contains(&y) || !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 59
    {
        return Err(bad());
    }
    // Hinnant's days-from-civil.
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    if format_rfc3339(secs as u64)[..10] != s[..10] {
        return Err(bad()); // e.g. February 30th
    }
    Ok(secs as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_rfc3339(1_795_297_845), "2026-11-21T21:50:45Z");
    }

    #[test]
    fn parses_what_it_formats() {
        for t in [0u64, 951_782_400, 1_795_297_845, 4_102_444_799] {
            assert_eq!(parse_rfc3339(&format_rfc3339(t)).unwrap(), t);
        }
        assert_eq!(parse_rfc3339("2026-11-21").unwrap(), 1_795_219_200);
        for bad in [
            "",
            "2026-13-01",
            "2026-02-30",
            "2026-11-21T25:00:00Z",
            "2026-11-21 10:00:00",
            "2026-11-21T10:00:00+01:00",
            "１９７０-01-01",
        ] {
            assert!(parse_rfc3339(bad).is_err(), "{bad:?}");
        }
    }
}

/// The longest duration accepted from outside (a request, a file, an argument): 30 days.
pub const MAX_DURATION: std::time::Duration = std::time::Duration::from_secs(30 * 86_400);

/// Converts a number of seconds that came from outside into a [`std::time::Duration`]:
/// it must be finite, at least a nanosecond and at most `max` (so no later arithmetic on it
/// can overflow). Errors say which.
pub fn seconds(value: f64, max: std::time::Duration) -> Result<std::time::Duration, String> {
    if !value.is_finite() || value <= 0.0 {
        return Err(format!("{value} is not a positive number of seconds"));
    }
    if value > max.as_secs_f64() {
        return Err(format!("{value} s is longer than the limit of {} s", max.as_secs_f64()));
    }
    let d = std::time::Duration::try_from_secs_f64(value).map_err(|e| format!("{value} s: {e}"))?;
    if d.is_zero() {
        return Err(format!("{value} s is shorter than a nanosecond"));
    }
    Ok(d)
}

/// Parses a command-line number of seconds (see [`seconds`], bounded by [`MAX_DURATION`]).
pub fn parse_seconds(text: &str) -> Result<std::time::Duration, String> {
    let value: f64 = text.trim().parse().map_err(|_| format!("{text:?} is not a number of seconds"))?;
    seconds(value, MAX_DURATION)
}

/// Like [`parse_seconds`], but zero is allowed (a wait that does not wait).
pub fn parse_wait(text: &str) -> Result<std::time::Duration, String> {
    let value: f64 = text.trim().parse().map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if value == 0.0 { Ok(std::time::Duration::ZERO) } else { seconds(value, MAX_DURATION) }
}

#[cfg(test)]
mod seconds_tests {
    use super::*;

    #[test]
    fn numbers_from_outside_are_bounded() {
        assert_eq!(parse_seconds("1.5").unwrap(), std::time::Duration::from_millis(1500));
        for bad in ["0", "-1", "nan", "inf", "1e20", "1e300", "abc", ""] {
            assert!(parse_seconds(bad).is_err(), "{bad}");
        }
        assert!(seconds(f64::MAX, MAX_DURATION).is_err());
        // Found by fuzzing: a positive number that rounds to no time at all.
        assert!(seconds(f64::MIN_POSITIVE, MAX_DURATION).is_err());
        assert!(seconds(8.224e-303, MAX_DURATION).is_err());
        assert_eq!(seconds(1e-9, MAX_DURATION).unwrap(), std::time::Duration::from_nanos(1));
    }
}
