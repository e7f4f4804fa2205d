//! Output commands: arbitrary payloads never panic and are never guessed (only a payload of at
//! most MAX_COMMAND bytes that is one of the words or a `{"state": …}` object is accepted), and
//! every documented form built from the fuzzer's choices (any case, surrounding whitespace, bare
//! or in JSON) parses to the state it encodes.
#![no_main]
use edgegate::codec::command::{parse_switch, MAX_COMMAND};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

const ON: [&str; 3] = ["1", "on", "true"];
const OFF: [&str; 3] = ["0", "off", "false"];

fn encoded(u: &mut Unstructured) -> Result<(Vec<u8>, bool)> {
    let state: bool = u.arbitrary()?;
    let word = *u.choose(if state { &ON } else { &OFF })?;
    // Any mix of upper and lower case.
    let mut cased = String::new();
    for c in word.chars() {
        cased.push(if u.arbitrary()? {
            c.to_ascii_uppercase()
        } else {
            c
        });
    }
    let space = |u: &mut Unstructured| -> Result<String> {
        let n = u.int_in_range(0..=3)?;
        (0..n)
            .map(|_| Ok(*u.choose(&[' ', '\t', '\n', '\r'])?))
            .collect()
    };
    let inner = match u.int_in_range(0..=2)? {
        0 => cased,
        1 => format!("{{\"state\": \"{}{cased}{}\"}}", space(u)?, space(u)?),
        _ => format!("{{\"state\":{}}}", if state { "true" } else { "false" }),
    };
    Ok((
        format!("{}{inner}{}", space(u)?, space(u)?).into_bytes(),
        state,
    ))
}

fuzz_target!(|data: &[u8]| {
    if let Ok(state) = parse_switch(data) {
        assert!(data.len() <= MAX_COMMAND, "{} bytes accepted", data.len());
        let text = std::str::from_utf8(data)
            .expect("accepted non-UTF-8")
            .trim();
        let lower = text.to_ascii_lowercase();
        let word = if state { &ON } else { &OFF };
        assert!(
            word.contains(&lower.as_str()) || text.starts_with('{'),
            "{text:?} accepted as {state}: not a command word, not JSON"
        );
    }
    if let Ok((payload, state)) = encoded(&mut Unstructured::new(data)) {
        assert_eq!(
            parse_switch(&payload),
            Ok(state),
            "{:?} encodes {state}",
            String::from_utf8_lossy(&payload)
        );
    }
});
