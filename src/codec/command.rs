//! GPIO output commands: `1`/`0`, `on`/`off`, `true`/`false` (any case, surrounding whitespace
//! allowed) or a JSON object `{"state": …}` holding one of those; the object's other keys (a
//! `ts` the downlink judges the command's age by, an id) are not read. Anything else is refused:
//! an actuator must never guess.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("payload is {0} bytes; a command is at most {MAX_COMMAND} bytes")]
    TooLong(usize),
    #[error("not a command: expected 1/0, on/off, true/false or {{\"state\": …}}")]
    Unknown,
}

/// Longest payload considered a command.
pub const MAX_COMMAND: usize = 256;

/// The commanded logical state: `true` = on.
pub fn parse_switch(payload: &[u8]) -> Result<bool, CommandError> {
    if payload.len() > MAX_COMMAND {
        return Err(CommandError::TooLong(payload.len()));
    }
    let text = std::str::from_utf8(payload).map_err(|_| CommandError::Unknown)?;
    let text = text.trim();
    if let Some(v) = word(text) {
        return Ok(v);
    }
    if text.starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(text).map_err(|_| CommandError::Unknown)?;
        let obj = v.as_object().ok_or(CommandError::Unknown)?;
        return match obj.get("state") {
            Some(serde_json::Value::Bool(b)) => Ok(*b),
            Some(serde_json::Value::Number(n)) => match n.as_u64() {
                Some(1) => Ok(true),
                Some(0) => Ok(false),
                _ => Err(CommandError::Unknown),
            },
            Some(serde_json::Value::String(s)) => word(s.trim()).ok_or(CommandError::Unknown),
            _ => Err(CommandError::Unknown),
        };
    }
    Err(CommandError::Unknown)
}

fn word(s: &str) -> Option<bool> {
    match s.to_ascii_lowercase().as_str() {
        "1" | "on" | "true" => Some(true),
        "0" | "off" | "false" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn every_documented_form_is_understood() {
        for on in [
            "1",
            "on",
            "ON",
            " true\n",
            r#"{"state":1}"#,
            r#"{"state":"on"}"#,
            r#"{"state":true}"#,
            r#"{"ts":"2026-12-08T02:40:00Z","state":"on","id":7}"#,
        ] {
            assert_eq!(parse_switch(on.as_bytes()), Ok(true), "{on}");
        }
        for off in [
            "0",
            "off",
            "False",
            r#"{"state":0}"#,
            r#"{"state":"OFF"}"#,
            r#"{"state":false}"#,
        ] {
            assert_eq!(parse_switch(off.as_bytes()), Ok(false), "{off}");
        }
    }

    #[test]
    fn anything_else_is_refused() {
        for bad in [
            "",
            "2",
            "yes",
            "onn",
            r#"{"state":2}"#,
            r#"{"state":"yes","ts":1}"#,
            r#"{"value":1}"#,
            "[1]",
            "\u{ff}",
        ] {
            assert!(parse_switch(bad.as_bytes()).is_err(), "{bad}");
        }
        assert_eq!(parse_switch(&[b' '; 300]), Err(CommandError::TooLong(300)));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
            let _ = parse_switch(&bytes);
        }

        #[test]
        fn a_state_object_round_trips(state in any::<bool>(), as_number in any::<bool>()) {
            let doc = if as_number {
                serde_json::json!({"state": u8::from(state)})
            } else {
                serde_json::json!({"state": state})
            };
            prop_assert_eq!(parse_switch(doc.to_string().as_bytes()), Ok(state));
        }
    }
}
