//! Wire parsing the harness needs, without IO: SMTP replies (the core's
//! [`ReplyReceiver`], the one the delivery client uses, with the harness's
//! own limits), POP3 status lines and multi-line ends, the SMTP end-of-data
//! scanner, and address patterns.
//!
//! The harness talks to servers it does not trust to be correct (that is what it
//! tests), so every parser here bounds what it buffers and reports malformed
//! input as an error instead of waiting for more.

pub use postino_core::smtp::client::{ReplyError, ReplyReceiver};
/// One complete SMTP reply: its code, enhanced status and lines.
pub use postino_core::smtp::Reply as SmtpReply;

/// Longest reply or status line accepted from a server, CRLF included.
/// RFC 5321 allows 512; real servers stay well under this, and the harness
/// is lenient where that costs nothing.
pub const MAX_REPLY_LINE: usize = 4096;
/// Most lines in one multi-line SMTP reply (EHLO answers have a dozen).
pub const MAX_REPLY_LINES: usize = 128;

/// A malformed reply from the server under test, or a bad pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error(transparent)]
    Reply(#[from] ReplyError),
    #[error("malformed reply line {0:?}")]
    Malformed(String),
    #[error("reply line longer than {MAX_REPLY_LINE} octets")]
    LineTooLong,
    #[error("bad pattern {0:?}: {1}")]
    Pattern(String, &'static str),
}

/// A reply receiver with the harness's limits.
pub fn reply_receiver() -> ReplyReceiver {
    ReplyReceiver::with_limits(MAX_REPLY_LINE, MAX_REPLY_LINES)
}

/// What the harness asks of a reply.
pub trait ReplyExt {
    /// 2xx.
    fn is_ok(&self) -> bool;
    /// Whether an EHLO reply advertises `keyword` (case-insensitive, first
    /// word of a line after the greeting line).
    fn has_extension(&self, keyword: &str) -> bool;
}

impl ReplyExt for SmtpReply {
    fn is_ok(&self) -> bool {
        (200..300).contains(&self.code)
    }

    fn has_extension(&self, keyword: &str) -> bool {
        self.text.split('\n').skip(1).any(|l| {
            l.split_ascii_whitespace()
                .next()
                .is_some_and(|w| w.eq_ignore_ascii_case(keyword))
        })
    }
}

/// Returns the line at the front of `buf` without its line ending and the number
/// of octets it spans, or `None` while no LF has arrived. A bare LF ends a line
/// too: being lenient costs nothing here and keeps the harness usable against
/// sloppy servers.
fn take_line(buf: &[u8]) -> Result<Option<(&[u8], usize)>, ProtoError> {
    match memchr::memchr(b'\n', buf) {
        Some(i) if i + 1 > MAX_REPLY_LINE => Err(ProtoError::LineTooLong),
        Some(i) => {
            let line = &buf[..i];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            Ok(Some((line, i + 1)))
        }
        None if buf.len() >= MAX_REPLY_LINE => Err(ProtoError::LineTooLong),
        None => Ok(None),
    }
}

/// A POP3 status line: `+OK text` or `-ERR text`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pop3Status {
    pub ok: bool,
    pub text: String,
}

/// Parses the status line at the front of `buf`; `Ok(None)` while incomplete.
///
/// # Errors
/// A line that starts with neither `+OK` nor `-ERR`, or one that is too long.
pub fn parse_status(buf: &[u8]) -> Result<Option<(Pop3Status, usize)>, ProtoError> {
    let Some((line, used)) = take_line(buf)? else {
        return Ok(None);
    };
    let (ok, rest) = if let Some(rest) = line.strip_prefix(b"+OK") {
        (true, rest)
    } else if let Some(rest) = line.strip_prefix(b"-ERR") {
        (false, rest)
    } else {
        return Err(ProtoError::Malformed(
            String::from_utf8_lossy(line).into_owned(),
        ));
    };
    let text = String::from_utf8_lossy(rest.strip_prefix(b" ").unwrap_or(rest)).into_owned();
    Ok(Some((Pop3Status { ok, text }, used)))
}

/// Finds the end of a POP3 multi-line response (`+OK ...` status line, data
/// lines, `.` line) that starts at `buf[0]`. Returns the octets it spans, or
/// `None` while the terminating `.` line has not arrived.
///
/// `searched` lets the caller resume: pass the value left in it by the last
/// call (start with 0) so a large RETR is not scanned from the top on every read.
pub fn multiline_end(buf: &[u8], searched: &mut usize) -> Option<usize> {
    // The status line's own CRLF counts as the CRLF before the first data
    // line, so an empty body ("+OK\r\n.\r\n") ends too.
    let first_crlf = memchr::memmem::find(buf, b"\r\n")?;
    let from = (*searched).max(first_crlf);
    match memchr::memmem::find(&buf[from..], b"\r\n.\r\n") {
        Some(i) => Some(from + i + 5),
        None => {
            // Keep the last four octets: the terminator may straddle reads.
            *searched = buf.len().saturating_sub(4).max(first_crlf);
            None
        }
    }
}

/// Finds `CRLF.CRLF`, the end of SMTP DATA, across reads of any size.
///
/// The scanner starts at the beginning of a line (right after the `354`), so a
/// body that is only `.CRLF` ends at once. Bare LFs never end the data, as in
/// Postfix: `LF.LF` is content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DotScanner {
    state: DotState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DotState {
    MidLine,
    Cr,
    LineStart,
    Dot,
    DotCr,
}

impl Default for DotScanner {
    fn default() -> Self {
        Self {
            state: DotState::LineStart,
        }
    }
}

impl DotScanner {
    /// Feeds the next chunk of data. Returns the number of octets of `chunk`
    /// up to and including the terminator, or `None` if it has not ended yet.
    pub fn feed(&mut self, chunk: &[u8]) -> Option<usize> {
        let mut i = 0;
        while i < chunk.len() {
            if self.state == DotState::MidLine {
                // Most octets are mid-line text: skip to the next CR fast.
                match memchr::memchr(b'\r', &chunk[i..]) {
                    Some(j) => {
                        i += j + 1;
                        self.state = DotState::Cr;
                        continue;
                    }
                    None => return None,
                }
            }
            let b = chunk[i];
            i += 1;
            self.state = match (self.state, b) {
                (DotState::DotCr, b'\n') => {
                    *self = Self::default();
                    return Some(i);
                }
                (DotState::Cr, b'\n') => DotState::LineStart,
                (DotState::LineStart, b'.') => DotState::Dot,
                (DotState::Dot, b'\r') => DotState::DotCr,
                (_, b'\r') => DotState::Cr,
                _ => DotState::MidLine,
            };
        }
        None
    }
}

/// An address pattern such as `user{n}@example.test`: each `{n}` becomes a
/// number that cycles over `1..=count`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    parts: Vec<String>,
    count: u64,
}

impl Pattern {
    /// # Errors
    /// `count` is 0, or the pattern has a `{` or `}` that is not part of `{n}`.
    pub fn new(pattern: &str, count: u64) -> Result<Self, ProtoError> {
        if count == 0 {
            return Err(ProtoError::Pattern(
                pattern.into(),
                "count must be at least 1",
            ));
        }
        let parts: Vec<String> = pattern.split("{n}").map(str::to_owned).collect();
        if parts.iter().any(|p| p.contains(['{', '}'])) {
            return Err(ProtoError::Pattern(
                pattern.into(),
                "only {n} may appear in braces",
            ));
        }
        if pattern.is_empty() || pattern.contains(['<', '>', '\r', '\n', ' ']) {
            return Err(ProtoError::Pattern(
                pattern.into(),
                "must be a bare address without <>, spaces or line breaks",
            ));
        }
        Ok(Self { parts, count })
    }

    /// The address for the `index`-th use (0-based): `{n}` = `1 + index % count`.
    pub fn expand(&self, index: u64) -> String {
        let n = (1 + index % self.count).to_string();
        self.parts.join(&n)
    }

    /// Whether the pattern varies at all.
    pub fn has_placeholder(&self) -> bool {
        self.parts.len() > 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` split at every possible point and checks that the parser
    /// gives the same answer as for the whole input.
    fn fragmented<T: PartialEq + std::fmt::Debug>(
        input: &[u8],
        parse: impl Fn(&[u8]) -> Result<Option<(T, usize)>, ProtoError>,
    ) -> Result<Option<(T, usize)>, ProtoError> {
        let whole = parse(input);
        for cut in 0..input.len() {
            match parse(&input[..cut]) {
                Ok(None) => {}
                // A prefix may already hold a complete reply (or an error) when
                // the input has trailing octets; it must then be the same one.
                other => assert_eq!(other, whole, "prefix {cut} of {input:?}"),
            }
        }
        whole
    }

    /// Input, and the expected (ok, text, octets used) if complete.
    type StatusCase<'a> = (&'a [u8], Option<(bool, &'a str, usize)>);

    /// Reads every reply in `input` with the harness's receiver, in pieces
    /// of `size` octets.
    fn replies(input: &[u8], size: usize) -> Result<Vec<SmtpReply>, ReplyError> {
        let mut rx = reply_receiver();
        let mut buf = bytes::BytesMut::new();
        let mut out = Vec::new();
        for piece in input.chunks(size) {
            buf.extend_from_slice(piece);
            while let Some(r) = rx.next_reply(&mut buf)? {
                out.push(r);
            }
        }
        Ok(out)
    }

    #[test]
    fn smtp_replies() {
        let input = b"250 ok\r\n250\r\n220 mx ESMTP\n250-mx\r\n250-PIPELINING\r\n250 SIZE 100\r\n354 go ahead\r\n";
        let want: &[(u16, &str)] = &[
            (250, "ok"),
            (250, ""),
            (220, "mx ESMTP"),
            (250, "mx\nPIPELINING\nSIZE 100"),
            (354, "go ahead"),
        ];
        for size in 1..=input.len() {
            let got = replies(input, size).unwrap();
            let got: Vec<(u16, &str)> = got.iter().map(|r| (r.code, &*r.text)).collect();
            assert_eq!(got, want, "pieces of {size}");
        }
    }

    /// The harness's limits: longer lines and more of them than RFC 5321's.
    #[test]
    fn smtp_reply_limits() {
        let long = format!("250 {}\r\n", "x".repeat(3000));
        assert_eq!(replies(long.as_bytes(), 512).unwrap()[0].text.len(), 3000);
        assert_eq!(
            replies(&[b'2'; MAX_REPLY_LINE], 64),
            Err(ReplyError::LineTooLong(MAX_REPLY_LINE))
        );
        let many = "250-x\r\n".repeat(MAX_REPLY_LINES);
        assert_eq!(
            replies(many.as_bytes(), 100),
            Err(ReplyError::TooManyLines(MAX_REPLY_LINES))
        );
        assert_eq!(
            replies(b"250-a\r\n251 b\r\n", 3),
            Err(ReplyError::CodeChanged(250, 251))
        );
        assert_eq!(
            replies(b"999 ok\r\n", 3),
            Err(ReplyError::Malformed("999 ok".into()))
        );
    }

    #[test]
    fn ehlo_extensions() {
        let r = &replies(
            b"250-mx.test hello\r\n250-pipelining\r\n250-SIZE 10240000\r\n250 STARTTLS\r\n",
            7,
        )
        .unwrap()[0];
        assert!(r.is_ok());
        assert!(r.has_extension("PIPELINING"));
        assert!(r.has_extension("size"));
        assert!(r.has_extension("STARTTLS"));
        // The greeting line's text is not an extension.
        assert!(!r.has_extension("mx.test"));
        assert!(!r.has_extension("8BITMIME"));
    }

    #[test]
    fn pop3_status() {
        let cases: &[StatusCase] = &[
            (b"+OK ready\r\n", Some((true, "ready", 11))),
            (b"+OK\r\n", Some((true, "", 5))),
            (b"-ERR [AUTH] no\r\n", Some((false, "[AUTH] no", 16))),
            (b"+OK 2 400\r\n1 200\r\n", Some((true, "2 400", 11))),
            (b"+OK", None),
        ];
        for (input, want) in cases {
            let got = fragmented(input, parse_status).unwrap();
            let got = got.map(|(s, n)| (s.ok, s.text, n));
            let want = want.map(|(ok, t, n)| (ok, t.to_string(), n));
            assert_eq!(got, want);
        }
        assert!(parse_status(b"OK\r\n").is_err());
    }

    #[test]
    fn pop3_multiline() {
        let cases: &[(&[u8], Option<usize>)] = &[
            (b"+OK\r\n.\r\n", Some(8)),
            (b"+OK 3 octets\r\nab\r\n.\r\nnext", Some(21)),
            // A dot-stuffed line is content.
            (b"+OK\r\n..x\r\n.\r\n", Some(13)),
            (b"+OK\r\nab\r\n", None),
            (b"+OK\r\nab\r\n.\r", None),
        ];
        for (input, want) in cases {
            // Whole, then grown one octet at a time with the resume offset kept.
            let mut searched = 0;
            assert_eq!(multiline_end(input, &mut searched), *want, "{input:?}");
            let mut searched = 0;
            let mut found = None;
            for len in 0..=input.len() {
                found = multiline_end(&input[..len], &mut searched);
                if found.is_some() {
                    break;
                }
            }
            assert_eq!(found, *want, "fragmented {input:?}");
        }
    }

    #[test]
    fn dot_scanner() {
        let cases: &[(&[u8], Option<usize>)] = &[
            (b".\r\n", Some(3)),
            (b"hello\r\n.\r\n", Some(10)),
            (b"hello\r\n.\r\nMAIL FROM", Some(10)),
            (b"a\r\n..\r\nb\r\n.\r\n", Some(13)),
            (b"a\n.\nb\r\n", None),
            (b"a\r\r\n.\r\n", Some(7)),
            (b"a\r\n.x\r\n", None),
            (b"a\r\n. \r\n", None),
            (b"a\r\n.\r.\r\n", None),
        ];
        for (input, want) in cases {
            assert_eq!(DotScanner::default().feed(input), *want, "{input:?}");
            // Every split into two fragments, and one octet at a time.
            for cut in 0..=input.len() {
                let mut s = DotScanner::default();
                let got = match s.feed(&input[..cut]) {
                    Some(n) => Some(n),
                    None => s.feed(&input[cut..]).map(|n| n + cut),
                };
                assert_eq!(got, *want, "{input:?} cut at {cut}");
            }
            let mut s = DotScanner::default();
            let got = input
                .iter()
                .enumerate()
                .find_map(|(i, b)| s.feed(std::slice::from_ref(b)).map(|_| i + 1));
            assert_eq!(got, *want, "{input:?} octet by octet");
        }
    }

    #[test]
    fn patterns() {
        let p = Pattern::new("user{n}@example.test", 3).unwrap();
        let got: Vec<String> = (0..5).map(|i| p.expand(i)).collect();
        assert_eq!(
            got,
            [
                "user1@example.test",
                "user2@example.test",
                "user3@example.test",
                "user1@example.test",
                "user2@example.test"
            ]
        );
        assert!(p.has_placeholder());
        let fixed = Pattern::new("a@b.test", 10).unwrap();
        assert_eq!(fixed.expand(7), "a@b.test");
        assert!(!fixed.has_placeholder());
        let twice = Pattern::new("{n}.{n}@x.test", 2).unwrap();
        assert_eq!(twice.expand(1), "2.2@x.test");
        for bad in ["user{i}@x", "{n@x", "<a@b>", "a b@c", ""] {
            assert!(Pattern::new(bad, 1).is_err(), "{bad}");
        }
        assert!(Pattern::new("a@b", 0).is_err());
    }
}
