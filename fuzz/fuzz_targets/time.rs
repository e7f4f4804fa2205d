//! Timestamps: any accepted text formats back to itself; any instant round-trips.
#![no_main]
use edgegate::codec::time::{parse_rfc3339_ms, rfc3339_ms};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Some(ms) = parse_rfc3339_ms(s) {
            assert_eq!(rfc3339_ms(ms), s);
        }
    }
    if data.len() >= 8 {
        let ms = i64::from_le_bytes(data[..8].try_into().expect("8 bytes")).rem_euclid(253_402_300_800_000);
        assert_eq!(parse_rfc3339_ms(&rfc3339_ms(ms)), Some(ms));
    }
});
