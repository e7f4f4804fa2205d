//! NMEA 0183 sentences from GPS receivers: `$GPGGA,…*hh`. The checksum (XOR of the bytes between
//! `$` and `*`) is required and verified. GGA (fix data) and RMC (recommended minimum) become
//! readings; other sentence types are reported as [`NmeaError::Unsupported`] so the caller can
//! count them apart from damaged ones.

use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NmeaError {
    #[error("not an NMEA sentence (must start with `$` or `!`)")]
    NotASentence,
    #[error("no checksum (`*hh` at the end)")]
    MissingChecksum,
    #[error("checksum mismatch: sentence says {stated:02X}, bytes give {computed:02X}")]
    Checksum { stated: u8, computed: u8 },
    #[error("sentence type `{0}` is not decoded (GGA and RMC are)")]
    Unsupported(String),
    #[error("malformed {sentence} field `{field}`")]
    Field {
        sentence: &'static str,
        field: &'static str,
    },
}

impl NmeaError {
    pub fn reason(&self) -> &'static str {
        match self {
            NmeaError::Checksum { .. } | NmeaError::MissingChecksum => "nmea_checksum",
            NmeaError::Unsupported(_) => "nmea_unsupported",
            NmeaError::NotASentence | NmeaError::Field { .. } => "nmea_format",
        }
    }
}

/// XOR of every byte of `body` (the part between `$` and `*`).
pub fn checksum(body: &[u8]) -> u8 {
    body.iter().fold(0, |a, b| a ^ b)
}

/// Checks the frame and returns the comma-separated body (without `$` and `*hh`).
pub fn verify(frame: &str) -> Result<&str, NmeaError> {
    let rest = frame
        .strip_prefix('$')
        .or_else(|| frame.strip_prefix('!'))
        .ok_or(NmeaError::NotASentence)?;
    let (body, stated) = rest.rsplit_once('*').ok_or(NmeaError::MissingChecksum)?;
    let stated = (stated.len() == 2)
        .then(|| u8::from_str_radix(stated, 16).ok())
        .flatten()
        .ok_or(NmeaError::MissingChecksum)?;
    let computed = checksum(body.as_bytes());
    if stated != computed {
        return Err(NmeaError::Checksum { stated, computed });
    }
    Ok(body)
}

/// Decodes a verified GGA or RMC sentence into reading fields:
/// GGA → `sentence, fix` (quality 0–8), `sats`, and with a fix `lat, lon` (degrees, south and west
/// negative), `alt` (metres above mean sea level); RMC → `sentence, fix` (1 = valid, 0 = warning),
/// `lat, lon, speed` (m/s), `course` (degrees) when present.
pub fn parse(frame: &str) -> Result<Map<String, Value>, NmeaError> {
    let body = verify(frame)?;
    let fields: Vec<&str> = body.split(',').collect();
    let kind = fields[0];
    // Talker ids are 2 letters (GP, GN, GL…); proprietary sentences (P…) are not decoded.
    let sentence = kind.get(2..).filter(|_| kind.len() == 5 && kind.is_ascii());
    let field = |i: usize| fields.get(i).copied().unwrap_or("");
    let mut out = Map::new();
    match sentence {
        Some("GGA") => {
            const S: &str = "GGA";
            out.insert("sentence".into(), S.into());
            let fix: u64 = parse_num(field(6), S, "quality")?;
            out.insert("fix".into(), fix.into());
            if !field(7).is_empty() {
                let sats: u64 = parse_num(field(7), S, "satellites")?;
                out.insert("sats".into(), sats.into());
            }
            if fix > 0 {
                insert_position(&mut out, field(2), field(3), field(4), field(5), S)?;
                if !field(9).is_empty() {
                    let alt: f64 = parse_num(field(9), S, "altitude")?;
                    out.insert("alt".into(), number(alt));
                }
            }
        }
        Some("RMC") => {
            const S: &str = "RMC";
            out.insert("sentence".into(), S.into());
            let fix = match field(2) {
                "A" => 1u64,
                "V" => 0,
                _ => {
                    return Err(NmeaError::Field {
                        sentence: S,
                        field: "status",
                    })
                }
            };
            out.insert("fix".into(), fix.into());
            if fix == 1 {
                insert_position(&mut out, field(3), field(4), field(5), field(6), S)?;
                if !field(7).is_empty() {
                    let knots: f64 = parse_num(field(7), S, "speed")?;
                    out.insert("speed".into(), number(round(knots * 0.514_444, 3)));
                }
                if !field(8).is_empty() {
                    let course: f64 = parse_num(field(8), S, "course")?;
                    out.insert("course".into(), number(course));
                }
            }
        }
        _ => return Err(NmeaError::Unsupported(kind.chars().take(8).collect())),
    }
    Ok(out)
}

fn insert_position(
    out: &mut Map<String, Value>,
    lat: &str,
    ns: &str,
    lon: &str,
    ew: &str,
    sentence: &'static str,
) -> Result<(), NmeaError> {
    let lat = degrees(lat, 2, ns, 'N', 'S', 90.0).ok_or(NmeaError::Field {
        sentence,
        field: "latitude",
    })?;
    let lon = degrees(lon, 3, ew, 'E', 'W', 180.0).ok_or(NmeaError::Field {
        sentence,
        field: "longitude",
    })?;
    out.insert("lat".into(), number(lat));
    out.insert("lon".into(), number(lon));
    Ok(())
}

/// `ddmm.mmmm` (or `dddmm.mmmm`) with a hemisphere letter → signed decimal degrees, 7 decimals
/// (about 1 cm).
fn degrees(
    v: &str,
    deg_digits: usize,
    hemi: &str,
    pos: char,
    neg: char,
    limit: f64,
) -> Option<f64> {
    if v.len() < deg_digits + 2
        || !v.is_ascii()
        || !v.as_bytes()[..deg_digits].iter().all(u8::is_ascii_digit)
    {
        return None;
    }
    let d: f64 = v[..deg_digits].parse().ok()?;
    let m: f64 = v[deg_digits..].parse().ok()?;
    if !(0.0..60.0).contains(&m) {
        return None;
    }
    let value = d + m / 60.0;
    if value > limit {
        return None;
    }
    let sign = match hemi.chars().next() {
        Some(c) if c == pos && hemi.len() == 1 => 1.0,
        Some(c) if c == neg && hemi.len() == 1 => -1.0,
        _ => return None,
    };
    Some(round(sign * value, 7))
}

fn parse_num<T: std::str::FromStr>(
    v: &str,
    sentence: &'static str,
    field: &'static str,
) -> Result<T, NmeaError> {
    v.parse().map_err(|_| NmeaError::Field { sentence, field })
}

fn round(v: f64, decimals: i32) -> f64 {
    let p = 10f64.powi(decimals);
    (v * p).round() / p
}

/// A finite f64 as a JSON number (NaN and infinities cannot come out of the parsers above, whose
/// inputs are bounded digit strings; null is the safe answer if they ever did).
fn number(v: f64) -> Value {
    serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number)
}

/// Builds a sentence with its checksum (tests, fuzz seeds, the simulated GPS).
pub fn with_checksum(body: &str) -> String {
    format!("${body}*{:02X}", checksum(body.as_bytes()))
}

/// `ddmm.mmmmm` + hemisphere for decimal degrees (the inverse of the parser, for tests).
pub fn encode_degrees(value: f64, deg_digits: usize, pos: char, neg: char) -> (String, char) {
    let hemi = if value < 0.0 { neg } else { pos };
    let a = value.abs();
    let mut d = a.trunc();
    let mut m = round((a - d) * 60.0, 5);
    if m >= 60.0 {
        d += 1.0;
        m = 0.0;
    }
    (format!("{:0w$}{:08.5}", d as u64, m, w = deg_digits), hemi)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_real_gga_sentence_gives_position_altitude_and_fix() {
        let s = "$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47";
        let r = parse(s).expect("valid GGA");
        assert_eq!(r["sentence"], "GGA");
        assert_eq!(r["fix"], 1);
        assert_eq!(r["sats"], 8);
        assert_eq!(r["lat"], 48.1173);
        assert_eq!(r["lon"], 11.516_666_7);
        assert_eq!(r["alt"], 545.4);
    }

    #[test]
    fn a_real_rmc_sentence_gives_position_and_speed_in_metres_per_second() {
        let s = "$GPRMC,123519,A,4807.038,N,01131.000,W,022.4,084.4,230394,003.1,W*78";
        let r = parse(s).expect("valid RMC");
        assert_eq!(r["fix"], 1);
        assert_eq!(r["lon"], -11.516_666_7);
        assert_eq!(r["speed"], 11.524);
        assert_eq!(r["course"], 84.4);
    }

    #[test]
    fn a_wrong_checksum_is_refused_and_named() {
        let s = "$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*48";
        assert_eq!(
            parse(s),
            Err(NmeaError::Checksum {
                stated: 0x48,
                computed: 0x47
            })
        );
        assert_eq!(
            parse("$GPGGA,1,2").map_err(|e| e.reason()),
            Err("nmea_checksum")
        );
    }

    #[test]
    fn other_sentences_are_unsupported_not_damaged() {
        let s = with_checksum("GPGSV,3,1,11,03,03,111,00");
        assert_eq!(parse(&s).map_err(|e| e.reason()), Err("nmea_unsupported"));
    }

    #[test]
    fn a_gga_without_fix_has_no_position() {
        let r = parse(&with_checksum("GPGGA,123519,,,,,0,00,,,M,,M,,")).expect("valid");
        assert_eq!(r["fix"], 0);
        assert!(r.get("lat").is_none());
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(s in "\\PC{0,100}") {
            let _ = parse(&s);
            let _ = parse(&format!("${s}"));
            let _ = parse(&with_checksum(&s));
        }

        #[test]
        fn well_formed_gga_round_trips(
            lat in -89.9f64..89.9,
            lon in -179.9f64..179.9,
            alt in -400.0f64..9000.0,
            sats in 0u64..40,
            quality in 1u64..9,
        ) {
            let (la, ns) = encode_degrees(lat, 2, 'N', 'S');
            let (lo, ew) = encode_degrees(lon, 3, 'E', 'W');
            let alt = round(alt, 1);
            let s = with_checksum(&format!(
                "GNGGA,101010.00,{la},{ns},{lo},{ew},{quality},{sats:02},0.9,{alt:.1},M,46.9,M,,"
            ));
            let r = parse(&s).expect("well-formed");
            prop_assert_eq!(r["fix"].as_u64(), Some(quality));
            prop_assert_eq!(r["sats"].as_u64(), Some(sats));
            prop_assert!((r["lat"].as_f64().expect("lat") - lat).abs() < 1e-5);
            prop_assert!((r["lon"].as_f64().expect("lon") - lon).abs() < 1e-5);
            prop_assert!((r["alt"].as_f64().expect("alt") - alt).abs() < 1e-9);
        }
    }
}
