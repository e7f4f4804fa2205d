//! Every serial format accepts arbitrary bytes without panicking, and what it accepts encodes
//! into a JSON reading.
#![no_main]
use edgegate::codec::format::{decode, Decoded, Format};
use edgegate::codec::payload;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let formats = [
        Format::Raw,
        Format::Value,
        Format::Json { fields: vec![] },
        Format::Json { fields: vec!["t".into()] },
        Format::Kv,
        Format::Csv { columns: vec!["a".into(), "b".into()] },
        Format::Nmea,
    ];
    for f in &formats {
        if let Ok(Decoded::Fields(fields)) = decode(f, data) {
            let doc = payload::reading(0, fields, Some("°C"));
            assert!(serde_json::from_slice::<serde_json::Value>(&doc).is_ok());
        }
    }
});
