//! Output commands: arbitrary payloads never panic and never exceed the size limit unnoticed.
#![no_main]
use edgegate::codec::command::{parse_switch, MAX_COMMAND};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if parse_switch(data).is_ok() {
        assert!(data.len() <= MAX_COMMAND);
    }
});
