//! The Linux w1_therm driver's `w1_slave` file (DS18B20 and its family) → a temperature.
//!
//! ```text
//! 72 01 4b 46 7f ff 0e 10 57 : crc=57 YES
//! 72 01 4b 46 7f ff 0e 10 57 t=23125
//! ```
//!
//! The first line is the 9-byte scratchpad and the kernel's CRC verdict, the second the
//! temperature in m°C. We trust neither blindly: the Dallas/Maxim CRC-8 of the nine bytes is
//! computed here too (a flaky bus can make a driver say YES to a scratchpad read twice), an
//! all-zero scratchpad (a bus with the data line stuck low reads zeros, and zeros have a valid
//! CRC) is refused, and 85.000 °C — the power-on value a probe returns before its first
//! conversion, typically after a brown-out on a long cable — is its own error.

/// Family codes of the probes the w1_therm driver serves (the `28` of `28-0316a2793aff`).
pub const THERM_FAMILIES: [&str; 6] = ["10", "22", "28", "3b", "42", "7e"];

/// Whether a `/sys/bus/w1/devices` entry is a w1_therm probe (family code, `-`, 12 hex digits).
pub fn is_therm_id(id: &str) -> bool {
    let Some((family, serial)) = id.split_once('-') else {
        return false;
    };
    THERM_FAMILIES.contains(&family.to_ascii_lowercase().as_str())
        && serial.len() == 12
        && serial.chars().all(|c| c.is_ascii_hexdigit())
}

/// Power-on reset value of the DS18B20 family, in m°C.
pub const POWER_ON_RESET_MC: i32 = 85_000;

/// A checked reading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct W1Reading {
    /// Temperature in thousandths of a degree Celsius.
    pub millicelsius: i32,
    pub scratchpad: [u8; 9],
}

impl W1Reading {
    pub fn celsius(&self) -> f64 {
        f64::from(self.millicelsius) / 1000.0
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum W1Error {
    #[error("not a w1_slave file: {0}")]
    Format(&'static str),
    #[error("the driver reports a CRC error (crc=.. NO)")]
    CrcNo,
    #[error("the scratchpad's CRC-8 is wrong ({got:#04x}, the bytes give {want:#04x}) although the driver said YES")]
    CrcMismatch { got: u8, want: u8 },
    #[error("85.000 °C: the probe's power-on value (it lost power or has not converted yet)")]
    PowerOnReset,
    #[error("the scratchpad is all zeros (data line held low or the probe is gone)")]
    NoDevice,
    #[error("{0} m°C is outside the probe's range (-55 to 125 °C)")]
    OutOfRange(i32),
}

impl W1Error {
    /// Counter label: `format`, `crc_no`, `crc_mismatch`, `power_on_reset`, `no_device`,
    /// `out_of_range`.
    pub fn reason(&self) -> &'static str {
        match self {
            W1Error::Format(_) => "format",
            W1Error::CrcNo => "crc_no",
            W1Error::CrcMismatch { .. } => "crc_mismatch",
            W1Error::PowerOnReset => "power_on_reset",
            W1Error::NoDevice => "no_device",
            W1Error::OutOfRange(_) => "out_of_range",
        }
    }
}

/// Dallas/Maxim CRC-8 (polynomial x⁸ + x⁵ + x⁴ + 1, reflected 0x8C, initial 0). Over a whole
/// scratchpad including its CRC byte it is 0.
pub fn crc8(bytes: &[u8]) -> u8 {
    let mut crc = 0u8;
    for &b in bytes {
        let mut v = b;
        for _ in 0..8 {
            let mix = (crc ^ v) & 1;
            crc >>= 1;
            if mix != 0 {
                crc ^= 0x8C;
            }
            v >>= 1;
        }
    }
    crc
}

fn scratchpad(words: &[&str]) -> Result<[u8; 9], W1Error> {
    if words.len() < 9 {
        return Err(W1Error::Format("fewer than 9 scratchpad bytes"));
    }
    let mut out = [0u8; 9];
    for (o, w) in out.iter_mut().zip(words) {
        if w.len() != 2 {
            return Err(W1Error::Format("a scratchpad byte is not two hex digits"));
        }
        *o = u8::from_str_radix(w, 16)
            .map_err(|_| W1Error::Format("a scratchpad byte is not two hex digits"))?;
    }
    Ok(out)
}

/// Parses and checks the contents of a `w1_slave` file.
pub fn parse_w1_slave(text: &[u8]) -> Result<W1Reading, W1Error> {
    let text = std::str::from_utf8(text).map_err(|_| W1Error::Format("not UTF-8"))?;
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let first = lines.next().ok_or(W1Error::Format("empty"))?;
    let second = lines.next().ok_or(W1Error::Format("no temperature line"))?;
    let (bytes, verdict) = first
        .split_once(':')
        .ok_or(W1Error::Format("no `: crc=` on the first line"))?;
    let verdict: Vec<&str> = verdict.split_whitespace().collect();
    let (Some(crc), Some(word)) = (verdict.first(), verdict.get(1)) else {
        return Err(W1Error::Format("no `crc=.. YES|NO` on the first line"));
    };
    if !crc.starts_with("crc=") {
        return Err(W1Error::Format("no `crc=` on the first line"));
    }
    let pad = scratchpad(&bytes.split_whitespace().collect::<Vec<_>>())?;
    match *word {
        "YES" => {}
        "NO" => return Err(W1Error::CrcNo),
        _ => return Err(W1Error::Format("the CRC verdict is neither YES nor NO")),
    }
    let want = crc8(&pad[..8]);
    if want != pad[8] {
        return Err(W1Error::CrcMismatch { got: pad[8], want });
    }
    if pad.iter().all(|b| *b == 0) {
        return Err(W1Error::NoDevice);
    }
    let words: Vec<&str> = second.split_whitespace().collect();
    let t = words
        .iter()
        .find_map(|w| w.strip_prefix("t="))
        .ok_or(W1Error::Format("no `t=` on the second line"))?;
    let millicelsius: i32 = t
        .parse()
        .map_err(|_| W1Error::Format("`t=` is not a whole number"))?;
    if scratchpad(&words).ok() != Some(pad) {
        return Err(W1Error::Format("the two lines show different scratchpads"));
    }
    if millicelsius == POWER_ON_RESET_MC {
        return Err(W1Error::PowerOnReset);
    }
    if !(-55_000..=125_000).contains(&millicelsius) {
        return Err(W1Error::OutOfRange(millicelsius));
    }
    Ok(W1Reading {
        millicelsius,
        scratchpad: pad,
    })
}

/// A `w1_slave` text for a DS18B20 scratchpad at `millicelsius` (what the kernel would show):
/// for the simulated probe and tests. `crc_ok: false` writes a wrong CRC byte and `NO`.
pub fn w1_slave_text(millicelsius: i32, crc_ok: bool) -> String {
    let raw = (i64::from(millicelsius) * 16 / 1000) as i16;
    let [lo, hi] = raw.to_le_bytes();
    let mut pad = [lo, hi, 0x4b, 0x46, 0x7f, 0xff, 0x0c, 0x10, 0];
    pad[8] = crc8(&pad[..8]) ^ if crc_ok { 0 } else { 0x5a };
    let hex: Vec<String> = pad.iter().map(|b| format!("{b:02x}")).collect();
    let hex = hex.join(" ");
    let verdict = if crc_ok { "YES" } else { "NO" };
    format!(
        "{hex} : crc={:02x} {verdict}\n{hex} t={millicelsius}\n",
        pad[8]
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_good_reading_from_the_kernel_documentation_is_23_125_degrees() {
        let text = b"72 01 4b 46 7f ff 0e 10 57 : crc=57 YES\n72 01 4b 46 7f ff 0e 10 57 t=23125\n";
        let r = parse_w1_slave(text).expect("valid");
        assert_eq!(r.millicelsius, 23125);
        assert_eq!(r.celsius(), 23.125);
        assert_eq!(crc8(&r.scratchpad), 0, "a whole scratchpad checks to 0");
    }

    #[test]
    fn negative_temperatures_parse() {
        // -10.125 °C: raw 0xFF5E (1/16 °C steps), scratchpad built like a DS18B20's.
        let text =
            b"5e ff 4b 46 7f ff 0c 10 6a : crc=6a YES\n5e ff 4b 46 7f ff 0c 10 6a t=-10125\n";
        let pad = [0x5e, 0xff, 0x4b, 0x46, 0x7f, 0xff, 0x0c, 0x10];
        assert_eq!(crc8(&pad), 0x6a, "the scratchpad's CRC byte");
        assert_eq!(parse_w1_slave(text).map(|r| r.millicelsius), Ok(-10125));
    }

    #[test]
    fn the_driver_saying_no_is_a_crc_error() {
        let text = b"72 01 4b 46 7f ff 0e 10 58 : crc=58 NO\n72 01 4b 46 7f ff 0e 10 58 t=23125\n";
        assert_eq!(parse_w1_slave(text), Err(W1Error::CrcNo));
        assert_eq!(W1Error::CrcNo.reason(), "crc_no");
    }

    #[test]
    fn a_yes_over_a_wrong_crc_byte_is_caught_by_our_own_check() {
        let text = b"72 01 4b 46 7f ff 0e 10 58 : crc=58 YES\n72 01 4b 46 7f ff 0e 10 58 t=23125\n";
        assert_eq!(
            parse_w1_slave(text),
            Err(W1Error::CrcMismatch {
                got: 0x58,
                want: 0x57
            })
        );
    }

    #[test]
    fn eighty_five_degrees_is_the_power_on_value_not_a_reading() {
        let text = w1_slave_text(85_000, true);
        assert_eq!(parse_w1_slave(text.as_bytes()), Err(W1Error::PowerOnReset));
        assert_eq!(W1Error::PowerOnReset.reason(), "power_on_reset");
    }

    #[test]
    fn an_all_zero_scratchpad_is_no_device_although_its_crc_is_valid() {
        let z = "00 00 00 00 00 00 00 00 00";
        let text = format!("{z} : crc=00 YES\n{z} t=0\n");
        assert_eq!(parse_w1_slave(text.as_bytes()), Err(W1Error::NoDevice));
    }

    #[test]
    fn malformed_files_are_format_errors() {
        for bad in [
            "",
            "72 01 : crc=57 YES\n72 01 t=1\n",
            "72 01 4b 46 7f ff 0e 10 57 crc=57 YES\n",
            "72 01 4b 46 7f ff 0e 10 57 : crc=57 YES\n",
            "72 01 4b 46 7f ff 0e 10 57 : crc=57 MAYBE\n72 01 4b 46 7f ff 0e 10 57 t=23125\n",
            "72 01 4b 46 7f ff 0e 10 57 : crc=57 YES\n72 01 4b 46 7f ff 0e 10 57 t=abc\n",
            "72 01 4b 46 7f ff 0e 10 57 : crc=57 YES\n00 01 4b 46 7f ff 0e 10 57 t=23125\n",
            "zz 01 4b 46 7f ff 0e 10 57 : crc=57 YES\nzz 01 4b 46 7f ff 0e 10 57 t=23125\n",
        ] {
            assert!(
                matches!(parse_w1_slave(bad.as_bytes()), Err(W1Error::Format(_))),
                "{bad:?}: {:?}",
                parse_w1_slave(bad.as_bytes())
            );
        }
    }

    #[test]
    fn probe_ids_are_recognised_by_family_code() {
        assert!(is_therm_id("28-0316a2793aff"));
        assert!(is_therm_id("10-000802b4c2d5"));
        assert!(!is_therm_id("w1_bus_master1"));
        assert!(!is_therm_id("29-0316a2793aff"), "a DS2408 switch");
        assert!(!is_therm_id("28-0316a2793af"));
    }

    proptest! {
        #[test]
        fn simulated_files_read_back_to_their_temperature(mc in -55_000i32..=125_000) {
            // The scratchpad holds 1/16 °C: the file's t= is what the kernel would print.
            prop_assume!(mc != POWER_ON_RESET_MC);
            let text = w1_slave_text(mc, true);
            prop_assert_eq!(parse_w1_slave(text.as_bytes()).map(|r| r.millicelsius), Ok(mc));
            prop_assert_eq!(parse_w1_slave(w1_slave_text(mc, false).as_bytes()), Err(W1Error::CrcNo));
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_accepted_files_have_a_valid_crc(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(r) = parse_w1_slave(&bytes) {
                prop_assert_eq!(crc8(&r.scratchpad), 0);
            }
        }
    }
}
