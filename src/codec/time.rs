//! UTC timestamps without a date crate: RFC 3339 with milliseconds (`2026-11-27T10:00:00.123Z`)
//! and the compact form used in file names (`20261127T100000`). The civil-date conversion is
//! Howard Hinnant's `civil_from_days` / `days_from_civil`, the only copy in the crate.

/// A unix-millisecond instant broken into proleptic Gregorian UTC fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Utc {
    pub year: i64,
    pub month: i64,
    pub day: i64,
    pub hour: i64,
    pub minute: i64,
    pub second: i64,
    pub milli: i64,
}

impl Utc {
    /// Any instant, before 1970 too.
    pub fn from_unix_ms(ms: i64) -> Utc {
        let days = ms.div_euclid(86_400_000);
        let rem = ms.rem_euclid(86_400_000);
        let (year, month, day) = civil_from_days(days);
        Utc {
            year,
            month,
            day,
            hour: rem / 3_600_000,
            minute: rem / 60_000 % 60,
            second: rem / 1000 % 60,
            milli: rem % 1000,
        }
    }

    /// `YYYY-MM-DDTHH:MM:SS.mmmZ`.
    pub fn rfc3339(&self) -> String {
        let Utc {
            year: y,
            month: m,
            day: d,
            hour: h,
            minute: min,
            second: s,
            milli,
        } = *self;
        format!("{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{s:02}.{milli:03}Z")
    }

    /// `YYYYMMDDTHHMMSS`, for file names.
    pub fn compact(&self) -> String {
        let Utc {
            year: y,
            month: m,
            day: d,
            hour: h,
            minute: min,
            second: s,
            ..
        } = *self;
        format!("{y:04}{m:02}{d:02}T{h:02}{min:02}{s:02}")
    }
}

/// Formats Unix milliseconds as `YYYY-MM-DDTHH:MM:SS.mmmZ`. Times before 1970 are clamped to the
/// epoch (a gateway clock that far off is a bug elsewhere; the reading is still published).
pub fn rfc3339_ms(unix_ms: i64) -> String {
    Utc::from_unix_ms(unix_ms.max(0)).rfc3339()
}

/// Parses exactly the form [`rfc3339_ms`] writes; `None` for anything else.
pub fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 24 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' {
        return None;
    }
    if b[16] != b':' || b[19] != b'.' || b[23] != b'Z' {
        return None;
    }
    let num = |from: usize, to: usize| -> Option<i64> {
        let t = s.get(from..to)?;
        if !t.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        t.parse().ok()
    };
    let (y, m, d) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (h, min, sec, milli) = (num(11, 13)?, num(14, 16)?, num(17, 19)?, num(20, 23)?);
    // Before 1970 is outside what `rfc3339_ms` writes (it clamps to the epoch).
    if y < 1970
        || !(1..=12).contains(&m)
        || !(1..=31).contains(&d)
        || h > 23
        || min > 59
        || sec > 59
    {
        return None;
    }
    let days = days_from_civil(y, m, d);
    if civil_from_days(days) != (y, m, d) {
        return None; // e.g. 31 February
    }
    Some(days * 86_400_000 + h * 3_600_000 + min * 60_000 + sec * 1000 + milli)
}

/// Parses RFC 3339 as clouds write it: `YYYY-MM-DDTHH:MM:SS`, an optional fraction of any
/// length (milliseconds kept), then `Z` or a `±HH:MM` offset; `t` or a space for `T` too.
/// Unix milliseconds, `None` for anything else or before 1970.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    if !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |t: &str| -> Option<i64> {
        if t.is_empty() || !t.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        t.parse().ok()
    };
    let (y, m, d) = (num(&s[0..4])?, num(&s[5..7])?, num(&s[8..10])?);
    let (h, min, sec) = (num(&s[11..13])?, num(&s[14..16])?, num(&s[17..19])?);
    let mut rest = &s[19..];
    let mut milli = 0;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let ms = format!("{:0<3}", &frac[..digits.min(3)]);
        milli = num(&ms)?;
        rest = &frac[digits..];
    }
    let offset_min = match rest {
        "Z" | "z" => 0,
        _ => {
            let r = rest.as_bytes();
            if r.len() != 6 || r[3] != b':' || !matches!(r[0], b'+' | b'-') {
                return None;
            }
            let (oh, om) = (num(&rest[1..3])?, num(&rest[4..6])?);
            if oh > 23 || om > 59 {
                return None;
            }
            let sign = if r[0] == b'-' { -1 } else { 1 };
            sign * (oh * 60 + om)
        }
    };
    if y < 1970
        || !(1..=12).contains(&m)
        || !(1..=31).contains(&d)
        || h > 23
        || min > 59
        || sec > 60
    {
        return None;
    }
    let days = days_from_civil(y, m, d);
    if civil_from_days(days) != (y, m, d) {
        return None;
    }
    let ms = days * 86_400_000 + h * 3_600_000 + min * 60_000 + sec.min(59) * 1000 + milli;
    Some(ms - offset_min * 60_000)
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_instants_format_as_rfc3339_utc_with_milliseconds() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_795_773_600_123), "2026-11-27T10:00:00.123Z");
        assert_eq!(rfc3339_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339_ms(-5), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn impossible_dates_are_not_parsed() {
        assert_eq!(parse_rfc3339_ms("2026-02-31T00:00:00.000Z"), None);
        assert_eq!(parse_rfc3339_ms("2026-11-27 10:00:00.123Z"), None);
        assert_eq!(parse_rfc3339_ms(""), None);
        assert_eq!(parse_rfc3339_ms("0000-01-01T00:00:00.000Z"), None);
    }

    proptest! {
        #[test]
        fn every_instant_until_year_9999_round_trips(ms in 0i64..253_402_300_799_999) {
            prop_assert_eq!(parse_rfc3339_ms(&rfc3339_ms(ms)), Some(ms));
        }

        #[test]
        fn arbitrary_text_never_panics_the_parser(s in ".{0,30}") {
            let _ = parse_rfc3339_ms(&s);
        }
    }

    #[test]
    fn clouds_rfc3339_forms_parse_to_the_same_instant() {
        let ms = parse_rfc3339_ms("2026-12-08T02:40:00.120Z").expect("ours parses");
        for form in [
            "2026-12-08T02:40:00.12Z",
            "2026-12-08T02:40:00.120000Z",
            "2026-12-08t02:40:00.120z",
            "2026-12-08 02:40:00.120Z",
            "2026-12-08T03:40:00.120+01:00",
            "2026-12-07T21:40:00.120-05:00",
        ] {
            assert_eq!(parse_rfc3339(form), Some(ms), "{form}");
        }
        assert_eq!(parse_rfc3339("2026-12-08T02:40:00Z"), Some(ms - 120));
        for bad in [
            "2026-12-08T02:40:00",
            "2026-12-08T02:40:00.Z",
            "2026-02-30T02:40:00Z",
            "2026-12-08T02:40:00+1:00",
            "1969-12-31T23:59:59Z",
            "",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }
}
