//! The JSON documents hardware readings are published as (DESIGN §5):
//! `{"ts":"2026-11-27T10:00:00.123Z","value":21.4,"unit":"°C"}`, GPIO
//! `{"ts":…,"state":1,"edge":"rising"}`, structured serial formats: `ts` and their fields.

use serde_json::{Map, Value};

use super::time::rfc3339_ms;

/// A GPIO level as published: `state` 1/0 and, for a change, the edge that caused it.
pub fn gpio_state(unix_ms: i64, state: bool, edge: Option<&str>) -> Vec<u8> {
    let ts = rfc3339_ms(unix_ms);
    let state = u8::from(state);
    match edge {
        Some(e) => format!(r#"{{"ts":"{ts}","state":{state},"edge":"{e}"}}"#),
        None => format!(r#"{{"ts":"{ts}","state":{state}}}"#),
    }
    .into_bytes()
}

/// A structured reading: `ts` first, then the parsed fields, then `unit` when configured (a field
/// of the same name from the device wins over the configured unit; our `ts` wins over theirs).
/// `ts` is written first by hand: serde_json's map (without `preserve_order`) sorts its keys.
pub fn reading(unix_ms: i64, mut fields: Map<String, Value>, unit: Option<&str>) -> Vec<u8> {
    fields.remove("ts");
    let mut out = format!(r#"{{"ts":"{}""#, rfc3339_ms(unix_ms)).into_bytes();
    let unit_field = match unit {
        Some(u) if !fields.contains_key("unit") => Some(u),
        _ => None,
    };
    let mut rest = Map::new();
    if let Some(u) = unit_field {
        rest.insert("unit".into(), u.into());
    }
    let parts = [fields, rest];
    for part in parts {
        // A map of JSON values always serializes; `{}` is the harmless fallback.
        let text = serde_json::to_vec(&Value::Object(part)).unwrap_or_else(|_| b"{}".to_vec());
        if text.len() > 2 {
            out.push(b',');
            out.extend_from_slice(&text[1..text.len() - 1]);
        }
    }
    out.push(b'}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gpio_change_reads_like_the_design() {
        let p = gpio_state(1_795_773_600_123, true, Some("rising"));
        assert_eq!(
            String::from_utf8(p).expect("JSON is UTF-8"),
            r#"{"ts":"2026-11-27T10:00:00.123Z","state":1,"edge":"rising"}"#
        );
    }

    #[test]
    fn a_value_reading_carries_its_unit() {
        let mut f = Map::new();
        f.insert("value".into(), 21.4.into());
        let p = reading(1_795_773_600_123, f, Some("°C"));
        assert_eq!(
            String::from_utf8(p).expect("JSON is UTF-8"),
            r#"{"ts":"2026-11-27T10:00:00.123Z","value":21.4,"unit":"°C"}"#
        );
    }
}
