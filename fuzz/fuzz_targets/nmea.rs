//! NMEA parsing never panics, a sentence it accepts has a valid checksum, and a GGA or RMC
//! sentence built from a position (the fuzzer picks it) parses back to that position, fix,
//! satellites and altitude; with one byte of its body changed it is refused.
#![no_main]
use edgegate::codec::nmea;
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

/// Within the encoding's precision: minutes to 5 decimals (< 1e-7 degrees), parsed to 7 decimals.
const TOLERANCE: f64 = 2e-7;

fn round_trip(u: &mut Unstructured) -> Result<()> {
    let lat = f64::from(u.int_in_range(-900_000_000i32..=900_000_000)?) / 1e7;
    let lon = f64::from(u.int_in_range(-1_800_000_000i32..=1_800_000_000)?) / 1e7;
    let (lat_s, ns) = nmea::encode_degrees(lat, 2, 'N', 'S');
    let (lon_s, ew) = nmea::encode_degrees(lon, 3, 'E', 'W');
    let talker = *u.choose(&["GP", "GN", "GL", "GA"])?;
    let (body, expected_fix) = if u.arbitrary::<bool>()? {
        let fix: u8 = u.int_in_range(1..=8)?;
        let sats: u8 = u.int_in_range(0..=99)?;
        let alt_dm: i32 = u.int_in_range(-10_000..=900_000)?;
        let alt = format!("{:.1}", f64::from(alt_dm) / 10.0);
        let body = format!(
            "{talker}GGA,123519,{lat_s},{ns},{lon_s},{ew},{fix},{sats:02},0.9,{alt},M,46.9,M,,"
        );
        let r = nmea::parse(&nmea::with_checksum(&body))
            .unwrap_or_else(|e| panic!("{body}: a valid GGA refused: {e}"));
        assert_eq!(r["sats"], u64::from(sats), "{body}: {r:?}");
        let alt_back = r["alt"].as_f64().expect("alt");
        assert_eq!(alt_back, alt.parse::<f64>().unwrap(), "{body}: {r:?}");
        (body, u64::from(fix))
    } else {
        let body = format!("{talker}RMC,123519,A,{lat_s},{ns},{lon_s},{ew},,,230394,003.1,W");
        (body, 1)
    };
    let sentence = nmea::with_checksum(&body);
    let r = nmea::parse(&sentence).unwrap_or_else(|e| panic!("{sentence}: refused: {e}"));
    assert_eq!(r["fix"], expected_fix, "{sentence}: {r:?}");
    for (key, want) in [("lat", lat), ("lon", lon)] {
        let got = r[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{sentence}: no {key}: {r:?}"));
        assert!(
            (got - want).abs() <= TOLERANCE,
            "{sentence}: {key} {want} came back as {got}"
        );
    }

    // One byte of the body changed (to another printable byte): the checksum must catch it.
    let at = 1 + u.choose_index(body.len())?;
    let old = sentence.as_bytes()[at];
    let new = u.int_in_range(0x20u8..=0x7e)?;
    if new != old {
        let mut bytes = sentence.clone().into_bytes();
        bytes[at] = new;
        let damaged = String::from_utf8(bytes).expect("ASCII");
        assert!(
            nmea::parse(&damaged).is_err(),
            "{damaged}: accepted with byte {at} changed from {sentence}"
        );
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if nmea::parse(s).is_ok() {
            assert!(nmea::verify(s).is_ok());
        }
        // Also with a correct checksum, so the field decoding is reached.
        let _ = nmea::parse(&nmea::with_checksum(s));
    }
    let _ = round_trip(&mut Unstructured::new(data));
});
