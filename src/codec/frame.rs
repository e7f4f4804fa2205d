//! A byte stream → frames. Serial devices end each message with a newline (`\n` or `\r\n`) or a
//! delimiter of their own; the line between two delimiters is one frame.
//!
//! Memory is bounded by the maximum frame length: a frame that grows past it is reported once as
//! [`FrameError::TooLong`] and its bytes are dropped up to the next delimiter, so a device that
//! never sends a delimiter (wrong baud rate, binary noise) cannot make the gateway grow or stall.

/// How frames end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delimiter {
    /// `\n`; a `\r` before it is removed, so `\r\n` works as well.
    Newline,
    /// Any non-empty byte sequence, removed from the frame.
    Bytes(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame longer than {max} bytes (dropped up to the next delimiter)")]
    TooLong { max: usize },
}

impl FrameError {
    /// A short stable name for counting (`too_long`).
    pub fn reason(&self) -> &'static str {
        match self {
            FrameError::TooLong { .. } => "too_long",
        }
    }
}

/// Incremental framer: [`Framer::push`] bytes as they arrive, collect complete frames.
#[derive(Debug)]
pub struct Framer {
    delim: Vec<u8>,
    strip_cr: bool,
    max: usize,
    buf: Vec<u8>,
    /// Bytes of `buf` already searched for the delimiter (no delimiter starts before it).
    scanned: usize,
    /// Inside an over-long frame that was already reported: drop until the next delimiter.
    discarding: bool,
}

impl Framer {
    /// `max_len` is the longest frame accepted, delimiter excluded (at least 1).
    pub fn new(delimiter: Delimiter, max_len: usize) -> Framer {
        let (delim, strip_cr) = match delimiter {
            Delimiter::Newline => (b"\n".to_vec(), true),
            Delimiter::Bytes(b) if b.is_empty() => (b"\n".to_vec(), true),
            Delimiter::Bytes(b) => (b, false),
        };
        Framer {
            delim,
            strip_cr,
            max: max_len.max(1),
            buf: Vec::new(),
            scanned: 0,
            discarding: false,
        }
    }

    /// Feeds bytes; complete frames (and over-long ones as errors) are appended to `out` in
    /// stream order. Empty frames (blank lines) are skipped.
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<Result<Vec<u8>, FrameError>>) {
        self.buf.extend_from_slice(bytes);
        let dlen = self.delim.len();
        loop {
            let from = self.scanned;
            let found = self.buf[from..]
                .windows(dlen)
                .position(|w| w == self.delim.as_slice())
                .map(|p| p + from);
            match found {
                Some(pos) => {
                    let mut frame: Vec<u8> = self.buf.drain(..pos + dlen).collect();
                    frame.truncate(pos);
                    self.scanned = 0;
                    if std::mem::take(&mut self.discarding) {
                        continue;
                    }
                    if self.strip_cr && frame.last() == Some(&b'\r') {
                        frame.pop();
                    }
                    if frame.is_empty() {
                        continue;
                    }
                    if frame.len() > self.max {
                        out.push(Err(FrameError::TooLong { max: self.max }));
                    } else {
                        out.push(Ok(frame));
                    }
                }
                None => {
                    // Keep the tail that could be the start of a delimiter split across reads.
                    self.scanned = self.buf.len().saturating_sub(dlen - 1);
                    // `max + 1` leaves room for the `\r` of a `\r\n` ending.
                    if self.buf.len() > self.max + 1 + dlen {
                        if !self.discarding {
                            out.push(Err(FrameError::TooLong { max: self.max }));
                            self.discarding = true;
                        }
                        let keep = dlen - 1;
                        let cut = self.buf.len() - keep;
                        self.buf.drain(..cut);
                        self.scanned = 0;
                    }
                    return;
                }
            }
        }
    }

    /// Bytes held while waiting for a delimiter.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Forgets a partial frame (after the port was reopened: its start is gone).
    pub fn reset(&mut self) {
        self.buf.clear();
        self.scanned = 0;
        self.discarding = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frames(f: &mut Framer, input: &[u8]) -> Vec<Result<Vec<u8>, FrameError>> {
        let mut out = Vec::new();
        f.push(input, &mut out);
        out
    }

    #[test]
    fn newline_and_crlf_both_end_a_line_and_blank_lines_are_skipped() {
        let mut f = Framer::new(Delimiter::Newline, 64);
        let out = frames(&mut f, b"T=1\r\nT=2\n\n\r\nT=3");
        assert_eq!(out, vec![Ok(b"T=1".to_vec()), Ok(b"T=2".to_vec())]);
        assert_eq!(frames(&mut f, b"\n"), vec![Ok(b"T=3".to_vec())]);
    }

    #[test]
    fn a_custom_delimiter_split_across_reads_is_found() {
        let mut f = Framer::new(Delimiter::Bytes(b"<END>".to_vec()), 64);
        assert!(frames(&mut f, b"abc<E").is_empty());
        assert_eq!(frames(&mut f, b"ND>d"), vec![Ok(b"abc".to_vec())]);
    }

    #[test]
    fn an_over_long_frame_is_reported_once_and_the_next_one_arrives() {
        let mut f = Framer::new(Delimiter::Newline, 8);
        let mut out = frames(&mut f, &[b'x'; 100]);
        out.extend(frames(&mut f, &[b'y'; 100]));
        out.extend(frames(&mut f, b"zz\nok\n"));
        assert_eq!(
            out,
            vec![Err(FrameError::TooLong { max: 8 }), Ok(b"ok".to_vec())]
        );
        assert!(f.buffered() == 0);
    }

    #[test]
    fn a_frame_just_over_the_limit_in_one_read_is_too_long() {
        let mut f = Framer::new(Delimiter::Newline, 4);
        assert_eq!(
            frames(&mut f, b"12345\n1234\r\n"),
            vec![Err(FrameError::TooLong { max: 4 }), Ok(b"1234".to_vec())]
        );
    }

    proptest! {
        #[test]
        fn lines_survive_any_chunking(
            lines in prop::collection::vec("[a-zA-Z0-9=., ]{1,40}", 0..20),
            crlf in any::<bool>(),
            cuts in prop::collection::vec(1usize..17, 0..40),
        ) {
            let end = if crlf { "\r\n" } else { "\n" };
            let stream: String = lines.iter().map(|l| format!("{l}{end}")).collect();
            let bytes = stream.as_bytes();
            let mut f = Framer::new(Delimiter::Newline, 64);
            let mut out = Vec::new();
            let mut at = 0;
            for c in cuts {
                let to = (at + c).min(bytes.len());
                f.push(&bytes[at..to], &mut out);
                at = to;
            }
            f.push(&bytes[at..], &mut out);
            let got: Vec<String> = out
                .into_iter()
                .map(|r| String::from_utf8(r.expect("no line is too long")).expect("utf-8 in"))
                .collect();
            prop_assert_eq!(got, lines);
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_frames_stay_bounded(
            chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..200), 0..20),
            delim in prop::collection::vec(any::<u8>(), 0..4),
            max in 1usize..64,
        ) {
            let custom = !delim.is_empty();
            let mut f = Framer::new(Delimiter::Bytes(delim.clone()), max);
            let mut out = Vec::new();
            for c in &chunks {
                f.push(c, &mut out);
                prop_assert!(f.buffered() <= max + 1 + delim.len().max(1) + c.len());
            }
            for frame in out.into_iter().flatten() {
                prop_assert!(!frame.is_empty() && frame.len() <= max);
                if custom {
                    prop_assert!(!frame.windows(delim.len()).any(|w| w == delim.as_slice()));
                }
            }
        }
    }
}
