//! The framer never panics, never holds more than a frame's worth, never yields a frame longer
//! than the maximum or containing the delimiter, whatever the bytes and the read boundaries.
#![no_main]
use edgegate::codec::frame::{Delimiter, Framer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else { return };
    let max = usize::from(ctl % 64) + 1;
    let dlen = usize::from(ctl >> 6);
    let (delim, stream) = rest.split_at(dlen.min(rest.len()));
    let mut f = Framer::new(Delimiter::Bytes(delim.to_vec()), max);
    let mut out = Vec::new();
    for chunk in stream.chunks(usize::from(ctl % 7) + 1) {
        f.push(chunk, &mut out);
        assert!(f.buffered() <= max + 1 + delim.len().max(1));
    }
    for frame in out.into_iter().flatten() {
        assert!(!frame.is_empty() && frame.len() <= max);
        if !delim.is_empty() {
            assert!(!frame.windows(delim.len()).any(|w| w == delim));
        }
    }
});
