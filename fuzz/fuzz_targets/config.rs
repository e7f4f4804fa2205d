//! The config loader never panics on any text, and every rejection names the file it came from
//! (check-config prints it as `file:line:col: field: problem`).
//!
//! `load_str` also resolves `password_file`/`password_env` and checks that referenced files open;
//! that touches the filesystem, but only to open or read paths the input names.
#![no_main]
use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let path = Path::new("fuzz.yaml");
    if let Err(e) = edgegate::config::load_str(text, path) {
        let message = e.to_string();
        assert!(message.contains("fuzz.yaml"), "error does not name the file: {message}");
    }
});
