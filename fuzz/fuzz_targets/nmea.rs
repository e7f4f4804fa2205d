//! NMEA parsing never panics, and a sentence it accepts has a valid checksum.
#![no_main]
use edgegate::codec::nmea;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if nmea::parse(s).is_ok() {
        assert!(nmea::verify(s).is_ok());
    }
    // Also with a correct checksum, so the field decoding is reached.
    let _ = nmea::parse(&nmea::with_checksum(s));
});
