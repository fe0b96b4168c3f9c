//! The client side of SMTP without IO: replies read incrementally out of
//! what a server sends ([`ReplyReceiver`]), the extensions of an EHLO reply
//! ([`Extensions`]), enhanced status codes ([`split_status`],
//! [`enhanced_status`]) and message content as it goes on the wire
//! ([`encode_content`] after DATA, [`encode_chunk`] after BDAT).
//!
//! The outbound delivery client and the load harness both read replies
//! with this; neither trusts the server, so the receiver bounds what it
//! keeps (a line, a number of lines) and reports anything off-syntax as an
//! error instead of waiting for more. [`RemoteHost`] names the server a
//! client talks to, in logs and in the queue's diagnostics.

use std::borrow::Cow;
use std::fmt;
use std::net::SocketAddr;

use bytes::{Buf, BytesMut};
use serde::{Deserialize, Serialize};

use crate::smtp::Reply;

/// Longest reply line accepted, CRLF included (RFC 5321 §4.5.3.1.5).
pub const MAX_REPLY_LINE: usize = 512;
/// Most lines in one reply; a longer one is a protocol error, which bounds
/// what a hostile server can make us buffer.
pub const MAX_REPLY_LINES: usize = 100;

/// A reply that breaks RFC 5321 §4.2 syntax, or the receiver's limits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReplyError {
    /// A line longer than the limit (the number), CRLF included.
    #[error("reply line longer than {0} octets")]
    LineTooLong(usize),
    /// More lines than the limit (the number).
    #[error("reply of more than {0} lines")]
    TooManyLines(usize),
    /// A line that is not `NNN`, `NNN text` or `NNN-text` with a code of
    /// 200 to 559 (first digit 2–5, second 0–5).
    #[error("malformed reply line {0:?}")]
    Malformed(String),
    /// The lines of one reply carried different codes (the two).
    #[error("reply code changed within a multi-line reply ({0} then {1})")]
    CodeChanged(u16, u16),
}

/// Reads replies out of a byte stream, one line at a time, across reads of
/// any size: the lines of an unfinished reply are taken out of the buffer
/// and kept here, so the caller's buffer never holds more than one partial
/// line, and a reply is never scanned twice.
///
/// Lines are `NNN-text` except the last, `NNN text` or `NNN`, all with one
/// code. A leading enhanced status code (`5.1.1`) of the reply's class is
/// taken out of each line; the first line's becomes [`Reply::status`]. The
/// lines' texts are joined by `\n` in [`Reply::text`]. A bare LF ends a line
/// too (servers that send one are common and harmless here).
///
/// After an error the conversation cannot be trusted to stay in step: the
/// caller drops the connection. The receiver itself starts afresh.
#[derive(Debug, Clone)]
pub struct ReplyReceiver {
    max_line: usize,
    max_lines: usize,
    /// The reply being read: its code, first line's status, text and lines.
    code: Option<u16>,
    status: Option<String>,
    text: String,
    lines: usize,
}

impl Default for ReplyReceiver {
    fn default() -> Self {
        ReplyReceiver::new()
    }
}

impl ReplyReceiver {
    /// A receiver with RFC 5321's limits ([`MAX_REPLY_LINE`],
    /// [`MAX_REPLY_LINES`]).
    pub fn new() -> Self {
        ReplyReceiver::with_limits(MAX_REPLY_LINE, MAX_REPLY_LINES)
    }

    /// A receiver with other limits: `max_line` counts the line ending, and
    /// is at least 6 (`NNN` CRLF); `max_lines` is at least 1.
    pub fn with_limits(max_line: usize, max_lines: usize) -> Self {
        ReplyReceiver {
            max_line: max_line.max(6),
            max_lines: max_lines.max(1),
            code: None,
            status: None,
            text: String::new(),
            lines: 0,
        }
    }

    /// Takes complete lines off the front of `buf` until a reply is whole,
    /// and returns it; `Ok(None)` when `buf` ends inside one (its complete
    /// lines are taken and kept). Octets after the reply stay in `buf`.
    ///
    /// # Errors
    ///
    /// See [`ReplyError`].
    pub fn next_reply(&mut self, buf: &mut BytesMut) -> Result<Option<Reply>, ReplyError> {
        let (used, reply) = self.feed(buf)?;
        buf.advance(used);
        Ok(reply)
    }

    /// [`ReplyReceiver::next_reply`] over a slice: how many octets of `buf`
    /// were taken (complete lines only, none past the reply's end), and the
    /// reply if it is whole.
    ///
    /// # Errors
    ///
    /// See [`ReplyError`]; what was taken is then of no interest.
    pub fn feed(&mut self, buf: &[u8]) -> Result<(usize, Option<Reply>), ReplyError> {
        let mut pos = 0;
        loop {
            let rest = &buf[pos..];
            let window = &rest[..rest.len().min(self.max_line)];
            let Some(lf) = memchr::memchr(b'\n', window) else {
                if rest.len() >= self.max_line {
                    self.reset();
                    return Err(ReplyError::LineTooLong(self.max_line));
                }
                return Ok((pos, None));
            };
            let line = &rest[..lf];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            pos += lf + 1;
            match self.line(line) {
                Ok(Some(reply)) => return Ok((pos, Some(reply))),
                Ok(None) => {}
                Err(e) => {
                    self.reset();
                    return Err(e);
                }
            }
        }
    }

    /// One line without its ending: the reply when it was the last.
    fn line(&mut self, line: &[u8]) -> Result<Option<Reply>, ReplyError> {
        let malformed = || ReplyError::Malformed(String::from_utf8_lossy(line).into_owned());
        let digits = line.get(..3).ok_or_else(malformed)?;
        let valid = matches!(digits[0], b'2'..=b'5')
            && matches!(digits[1], b'0'..=b'5')
            && digits[2].is_ascii_digit();
        if !valid {
            return Err(malformed());
        }
        let this = u16::from(digits[0] - b'0') * 100
            + u16::from(digits[1] - b'0') * 10
            + u16::from(digits[2] - b'0');
        match self.code {
            Some(c) if c != this => return Err(ReplyError::CodeChanged(c, this)),
            _ => self.code = Some(this),
        }
        let last = match line.get(3) {
            None | Some(b' ') => true,
            Some(b'-') => false,
            Some(_) => return Err(malformed()),
        };
        let body = String::from_utf8_lossy(line.get(4..).unwrap_or_default());
        let (line_status, body) = split_status(this, &body);
        if self.lines == 0 {
            self.status = line_status.map(str::to_string);
        } else {
            self.text.push('\n');
        }
        self.text.push_str(body);
        self.lines += 1;
        if last {
            let reply = Reply {
                code: this,
                status: self.status.take().map(Cow::Owned),
                text: Cow::Owned(std::mem::take(&mut self.text)),
            };
            self.reset();
            return Ok(Some(reply));
        }
        if self.lines >= self.max_lines {
            return Err(ReplyError::TooManyLines(self.max_lines));
        }
        Ok(None)
    }

    fn reset(&mut self) {
        self.code = None;
        self.status = None;
        self.text.clear();
        self.lines = 0;
    }
}

/// Parses one complete reply from the front of `buf` with RFC 5321's
/// limits: the reply and the octets it took, or `Ok(None)` when more input
/// is needed. A one-shot [`ReplyReceiver`].
///
/// # Errors
///
/// See [`ReplyError`].
pub fn parse_reply(buf: &[u8]) -> Result<Option<(Reply, usize)>, ReplyError> {
    match ReplyReceiver::new().feed(buf)? {
        (used, Some(reply)) => Ok(Some((reply, used))),
        (_, None) => Ok(None),
    }
}

/// Splits `5.1.1 text` into the status and the text when the line starts
/// with an enhanced status code of the class of reply `code` (RFC 2034 §4:
/// `2`, `4` or `5`, then one to three digits twice); else no status and the
/// whole line.
pub fn split_status(code: u16, line: &str) -> (Option<&str>, &str) {
    let end = line.find(' ').unwrap_or(line.len());
    let candidate = &line[..end];
    let class = u8::try_from(code / 100).unwrap_or(0);
    match enhanced_status(candidate) {
        Some(s) if matches!(class, 2 | 4 | 5) && s.as_bytes()[0] == b'0' + class => {
            (Some(candidate), line[end..].trim_start_matches(' '))
        }
        _ => (None, line),
    }
}

/// `word` when it is an enhanced status code (RFC 3463): class `2`, `4` or
/// `5`, subject and detail of one to three digits each.
pub fn enhanced_status(word: &str) -> Option<&str> {
    let mut parts = word.split('.');
    let digits = |p: Option<&str>| {
        p.is_some_and(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
    };
    let ok = matches!(parts.next(), Some("2" | "4" | "5"))
        && digits(parts.next())
        && digits(parts.next())
        && parts.next().is_none();
    ok.then_some(word)
}

/// SMTP service extensions a server announced in its EHLO reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extensions {
    /// `PIPELINING` (RFC 2920): commands may be sent in groups.
    pub pipelining: bool,
    /// `SIZE` was announced (then MAIL carries `SIZE=n`).
    pub size: bool,
    /// The server's fixed limit from `SIZE n`; `None` for no limit (`SIZE`
    /// or `SIZE 0`, RFC 1870).
    pub size_limit: Option<u64>,
    /// `8BITMIME` (RFC 6152).
    pub eight_bit_mime: bool,
    /// `SMTPUTF8` (RFC 6531): UTF-8 addresses allowed.
    pub smtputf8: bool,
    /// `CHUNKING` (RFC 3030): the message may be sent with `BDAT`.
    pub chunking: bool,
    /// `STARTTLS` (RFC 3207).
    pub starttls: bool,
    /// `ENHANCEDSTATUSCODES` (RFC 2034): replies carry `x.y.z` codes.
    pub enhanced_status_codes: bool,
    /// `AUTH` listing the `PLAIN` mechanism (RFC 4616).
    pub auth_plain: bool,
    /// `DSN` (RFC 3461): MAIL and RCPT take the DSN parameters.
    pub dsn: bool,
}

impl Extensions {
    /// Reads the keywords of an EHLO reply (every line after the first).
    pub fn parse(ehlo: &Reply) -> Extensions {
        let mut ext = Extensions::default();
        for line in ehlo.text.split('\n').skip(1) {
            let mut words = line.split([' ', '=']).filter(|w| !w.is_empty());
            let Some(keyword) = words.next() else {
                continue;
            };
            match keyword.to_ascii_uppercase().as_str() {
                "PIPELINING" => ext.pipelining = true,
                "SIZE" => {
                    ext.size = true;
                    ext.size_limit = words
                        .next()
                        .and_then(|n| n.parse::<u64>().ok())
                        .filter(|n| *n > 0);
                }
                "8BITMIME" => ext.eight_bit_mime = true,
                "SMTPUTF8" => ext.smtputf8 = true,
                "DSN" => ext.dsn = true,
                "CHUNKING" => ext.chunking = true,
                "STARTTLS" => ext.starttls = true,
                "ENHANCEDSTATUSCODES" => ext.enhanced_status_codes = true,
                // `AUTH=PLAIN LOGIN` is the pre-standard form some servers
                // still send next to `AUTH PLAIN LOGIN`.
                "AUTH" => ext.auth_plain |= words.any(|m| m.eq_ignore_ascii_case("PLAIN")),
                _ => {}
            }
        }
        ext
    }
}

/// Message content as it goes on the wire after DATA: every line end made
/// CRLF (a bare CR or LF becomes one), lines starting with `.` get another
/// (RFC 5321 §4.5.2), the last line is ended, and `.CRLF` follows.
pub fn encode_content(content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + content.len() / 32 + 5);
    let mut line_start = true;
    let mut i = 0;
    while i < content.len() {
        match content[i] {
            b'\r' => {
                out.extend_from_slice(b"\r\n");
                line_start = true;
                if content.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
            }
            b'\n' => {
                out.extend_from_slice(b"\r\n");
                line_start = true;
            }
            b => {
                if line_start && b == b'.' {
                    out.push(b'.');
                }
                out.push(b);
                line_start = false;
            }
        }
        i += 1;
    }
    if !line_start {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// Message content as it goes on the wire in one `BDAT … LAST` chunk (RFC
/// 3030): every line end made CRLF as [`encode_content`] does, the last
/// line ended, but no dot-stuffing and no end marker: the chunk's size
/// says where it ends.
pub fn encode_chunk(content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + content.len() / 64 + 2);
    let mut i = 0;
    while i < content.len() {
        match memchr::memchr2(b'\r', b'\n', &content[i..]) {
            None => {
                out.extend_from_slice(&content[i..]);
                break;
            }
            Some(j) => {
                let end = i + j;
                out.extend_from_slice(&content[i..end]);
                out.extend_from_slice(b"\r\n");
                i = end + 1;
                if content[end] == b'\r' && content.get(i) == Some(&b'\n') {
                    i += 1;
                }
            }
        }
    }
    if !out.is_empty() && !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// A remote host as a client talks to it: an exchanger's name and the one
/// address of it in use. Shown as `mx.example[192.0.2.1]:25` (Postfix's
/// form) in logs, queue diagnostics and bounces.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RemoteHost {
    /// Exchanger name (`Remote-MTA: dns; …` in a bounce).
    pub host: String,
    /// The address of it connected to (`[192.0.2.1]:25` in logs).
    pub addr: SocketAddr,
}

impl fmt::Display for RemoteHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]:{}", self.host, self.addr.ip(), self.addr.port())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(code: u16, status: Option<&str>, text: &str) -> Reply {
        Reply {
            code,
            status: status.map(|s| Cow::Owned(s.to_string())),
            text: Cow::Owned(text.to_string()),
        }
    }

    /// Feeds `input` to one receiver in pieces of `size` octets (the
    /// caller's buffer keeps what was not taken, as a connection's would)
    /// and returns the first reply or error, and the octets left over.
    fn in_pieces(
        input: &[u8],
        size: usize,
        mut rx: ReplyReceiver,
    ) -> (Result<Option<Reply>, ReplyError>, Vec<u8>) {
        let mut buf = BytesMut::new();
        for piece in input.chunks(size.max(1)) {
            buf.extend_from_slice(piece);
            match rx.next_reply(&mut buf) {
                Ok(None) => {}
                other => return (other, buf.to_vec()),
            }
        }
        (Ok(None), buf.to_vec())
    }

    /// Replies whole, in every two-piece split, and one octet at a time:
    /// the same reply, with what follows it left in the buffer.
    #[test]
    fn replies_in_fragments() {
        let cases: &[(&[u8], Reply)] = &[
            (b"220 mx.test ESMTP\r\n", r(220, None, "mx.test ESMTP")),
            (b"250 2.1.0 Ok\r\n", r(250, Some("2.1.0"), "Ok")),
            (b"354\r\n", r(354, None, "")),
            (b"250 \r\n", r(250, None, "")),
            (
                b"250-mx.test\r\n250-PIPELINING\r\n250 SIZE 100\r\n",
                r(250, None, "mx.test\nPIPELINING\nSIZE 100"),
            ),
            (
                b"550-5.1.1 no such\r\n550 5.1.1 user here\r\n",
                r(550, Some("5.1.1"), "no such\nuser here"),
            ),
            // A status of another class is text, not a status.
            (b"550 4.1.1 odd\r\n", r(550, None, "4.1.1 odd")),
            (
                b"250 2.0 not a status\r\n",
                r(250, None, "2.0 not a status"),
            ),
            (b"251 2.1.5 Ok\r\n", r(251, Some("2.1.5"), "Ok")),
            (b"421 4.4.2 bye\n", r(421, Some("4.4.2"), "bye")),
            (b"250-a\n250 b\r\n", r(250, None, "a\nb")),
            (b"250 caf\xc3\xa9\r\n", r(250, None, "caf\u{e9}")),
            (b"250 \xff\r\n", r(250, None, "\u{fffd}")),
            (b"250 a\rb\r\n", r(250, None, "a\rb")),
        ];
        for (input, want) in cases {
            let shown = String::from_utf8_lossy(input);
            for split in 0..input.len() {
                assert_eq!(
                    parse_reply(&input[..split]),
                    Ok(None),
                    "{shown:?} cut at {split}"
                );
            }
            let mut more = input.to_vec();
            more.extend_from_slice(b"250 next\r\n");
            assert_eq!(
                parse_reply(&more),
                Ok(Some((want.clone(), input.len()))),
                "{shown:?}"
            );
            for size in [1, 2, 3, 5, 7, more.len()] {
                let (got, left) = in_pieces(&more, size, ReplyReceiver::new());
                assert_eq!(got, Ok(Some(want.clone())), "{shown:?} in {size}s");
                // The rest of the last piece stays for the next reply.
                assert!(b"250 next\r\n".starts_with(&left), "{shown:?} in {size}s");
            }
            for cut in 0..=more.len() {
                let mut rx = ReplyReceiver::new();
                let mut buf = BytesMut::from(&more[..cut]);
                let first = rx.next_reply(&mut buf).unwrap();
                buf.extend_from_slice(&more[cut..]);
                let got = match first {
                    Some(reply) => reply,
                    None => rx.next_reply(&mut buf).unwrap().unwrap(),
                };
                assert_eq!(got, *want, "{shown:?} cut at {cut}");
                assert_eq!(&buf[..], b"250 next\r\n", "{shown:?} cut at {cut}");
            }
        }
    }

    /// One receiver reads a stream of replies back to back.
    #[test]
    fn pipelined_replies() {
        let stream = b"250 2.1.0 Ok\r\n250-2.1.5 a\r\n250 2.1.5 b\r\n354 go\r\n";
        let want = [
            r(250, Some("2.1.0"), "Ok"),
            r(250, Some("2.1.5"), "a\nb"),
            r(354, None, "go"),
        ];
        for size in 1..=stream.len() {
            let mut rx = ReplyReceiver::new();
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for piece in stream.chunks(size) {
                buf.extend_from_slice(piece);
                while let Some(reply) = rx.next_reply(&mut buf).unwrap() {
                    got.push(reply);
                }
            }
            assert_eq!(got, want, "pieces of {size}");
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn malformed_replies() {
        let long = format!("250 {}\r\n", "x".repeat(MAX_REPLY_LINE));
        let many = "250-x\r\n".repeat(MAX_REPLY_LINES + 1);
        let cases: &[(&[u8], ReplyError)] = &[
            (b"hello\r\n", ReplyError::Malformed("hello".into())),
            (b"25\r\n", ReplyError::Malformed("25".into())),
            (b"\r\n", ReplyError::Malformed("".into())),
            (b"650 no\r\n", ReplyError::Malformed("650 no".into())),
            (b"190 no\r\n", ReplyError::Malformed("190 no".into())),
            (b"260 no\r\n", ReplyError::Malformed("260 no".into())),
            (b"2a0 no\r\n", ReplyError::Malformed("2a0 no".into())),
            (b"250_x\r\n", ReplyError::Malformed("250_x".into())),
            (b"250-a\r\n251 b\r\n", ReplyError::CodeChanged(250, 251)),
            (b"250-a\r\nxyz\r\n", ReplyError::Malformed("xyz".into())),
            (long.as_bytes(), ReplyError::LineTooLong(MAX_REPLY_LINE)),
            (many.as_bytes(), ReplyError::TooManyLines(MAX_REPLY_LINES)),
        ];
        for (input, want) in cases {
            let shown = String::from_utf8_lossy(input);
            assert_eq!(parse_reply(input), Err(want.clone()), "{shown:?}");
            for size in [1, 3, 7] {
                let (got, _) = in_pieces(input, size, ReplyReceiver::new());
                assert_eq!(got, Err(want.clone()), "{shown:?} in {size}s");
            }
        }
        // An over-long line is refused before its end arrives.
        assert_eq!(
            parse_reply(&vec![b'2'; MAX_REPLY_LINE]),
            Err(ReplyError::LineTooLong(MAX_REPLY_LINE))
        );
        // 510 octets plus CRLF is the most.
        let max = format!("250 {}\r\n", "x".repeat(MAX_REPLY_LINE - 6));
        assert!(parse_reply(max.as_bytes()).unwrap().is_some());
        // The most lines, and one too many.
        let most = format!("{}250 x\r\n", "250-x\r\n".repeat(MAX_REPLY_LINES - 1));
        assert!(parse_reply(most.as_bytes()).unwrap().is_some());
        let over = format!("{}250 x\r\n", "250-x\r\n".repeat(MAX_REPLY_LINES));
        assert_eq!(
            parse_reply(over.as_bytes()),
            Err(ReplyError::TooManyLines(MAX_REPLY_LINES))
        );
    }

    #[test]
    fn other_limits() {
        let mut rx = ReplyReceiver::with_limits(4096, 128);
        let long = format!("250 {}\r\n", "x".repeat(2000));
        let (got, _) = in_pieces(long.as_bytes(), 100, rx.clone());
        assert_eq!(got.unwrap().unwrap().text.len(), 2000);
        let many = "250-x\r\n".repeat(127) + "250 x\r\n";
        let mut buf = BytesMut::from(many.as_bytes());
        assert!(rx.next_reply(&mut buf).unwrap().is_some());
        let (got, _) = in_pieces(&vec![b'2'; 5000], 64, rx);
        assert_eq!(got, Err(ReplyError::LineTooLong(4096)));
    }

    /// After an error the receiver starts afresh (the caller drops the
    /// connection, but a receiver reused by mistake must not mix replies).
    #[test]
    fn error_resets() {
        let mut rx = ReplyReceiver::new();
        let mut buf = BytesMut::from(&b"250-a\r\n251 b\r\n"[..]);
        assert!(rx.next_reply(&mut buf).is_err());
        let mut buf = BytesMut::from(&b"220 c\r\n"[..]);
        assert_eq!(rx.next_reply(&mut buf), Ok(Some(r(220, None, "c"))));
    }

    #[test]
    fn status_splitting() {
        let cases: &[(u16, &str, Option<&str>, &str)] = &[
            (550, "5.1.1 user unknown", Some("5.1.1"), "user unknown"),
            (550, "5.1.10", Some("5.1.10"), ""),
            (556, "5.1.10  two spaces", Some("5.1.10"), "two spaces"),
            (250, "2.0.0 Ok", Some("2.0.0"), "Ok"),
            (451, "4.999.999 x", Some("4.999.999"), "x"),
            (550, "4.1.1 other class", None, "4.1.1 other class"),
            (354, "3.0.0 no such class", None, "3.0.0 no such class"),
            (550, "5.1 short", None, "5.1 short"),
            (550, "5.1.1.1 long", None, "5.1.1.1 long"),
            (550, "5.1000.1 wide", None, "5.1000.1 wide"),
            (550, "5..1 empty", None, "5..1 empty"),
            (550, "5.a.1 letter", None, "5.a.1 letter"),
            (550, "", None, ""),
        ];
        for &(code, line, status, text) in cases {
            assert_eq!(split_status(code, line), (status, text), "{code} {line:?}");
        }
        assert_eq!(enhanced_status("5.1.10"), Some("5.1.10"));
        assert_eq!(enhanced_status("2.0.0"), Some("2.0.0"));
        assert_eq!(enhanced_status("550"), None);
        assert_eq!(enhanced_status("1.0.0"), None);
    }

    #[test]
    fn content_encoding() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"", b".\r\n"),
            (b"a\r\n", b"a\r\n.\r\n"),
            (b"a", b"a\r\n.\r\n"),
            (b".\r\n", b"..\r\n.\r\n"),
            (b"a\r\n.b\r\n..c\r\n", b"a\r\n..b\r\n...c\r\n.\r\n"),
            (b"a.b\r\n", b"a.b\r\n.\r\n"),
            (b"a\nb\n", b"a\r\nb\r\n.\r\n"),
            (b"a\rb", b"a\r\nb\r\n.\r\n"),
            (b"a\r\r\nb", b"a\r\n\r\nb\r\n.\r\n"),
            (b"a\n.\n", b"a\r\n..\r\n.\r\n"),
            (b"\r\n.\r\n", b"\r\n..\r\n.\r\n"),
            (b"caf\xc3\xa9\r\n", b"caf\xc3\xa9\r\n.\r\n"),
        ];
        for (input, want) in cases {
            assert_eq!(
                encode_content(input),
                *want,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn chunk_encoding() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"", b""),
            (b"a\r\n", b"a\r\n"),
            (b"a", b"a\r\n"),
            // No dot-stuffing, no end marker.
            (b".\r\n", b".\r\n"),
            (b"a\r\n.b\r\n..c\r\n", b"a\r\n.b\r\n..c\r\n"),
            (b"a\nb\n", b"a\r\nb\r\n"),
            (b"a\rb", b"a\r\nb\r\n"),
            (b"a\r\r\nb", b"a\r\n\r\nb\r\n"),
            (b"a\r", b"a\r\n"),
            (b"caf\xc3\xa9\r\n", b"caf\xc3\xa9\r\n"),
        ];
        for (input, want) in cases {
            assert_eq!(
                encode_chunk(input),
                *want,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn ehlo_keywords() {
        let reply = r(
            250,
            None,
            "mx.test greets you\npipelining\nSIZE 10240000\n8BITMIME\nAUTH LOGIN PLAIN\nSTARTTLS\nENHANCEDSTATUSCODES\nSMTPUTF8\nDSN\nChunking",
        );
        let ext = Extensions::parse(&reply);
        assert_eq!(
            ext,
            Extensions {
                pipelining: true,
                size: true,
                size_limit: Some(10_240_000),
                eight_bit_mime: true,
                smtputf8: true,
                chunking: true,
                starttls: true,
                enhanced_status_codes: true,
                auth_plain: true,
                dsn: true,
            }
        );
        let ext = Extensions::parse(&r(250, None, "mx.test\nSIZE\nAUTH=LOGIN PLAIN"));
        assert!(ext.size && ext.size_limit.is_none() && ext.auth_plain);
        let ext = Extensions::parse(&r(250, None, "mx.test\nSIZE 0\nAUTH LOGIN"));
        assert!(ext.size && ext.size_limit.is_none() && !ext.auth_plain);
        let ext = Extensions::parse(&r(250, None, "mx.test\nSIZE x\n\n  \nVRFY"));
        assert!(ext.size && ext.size_limit.is_none());
        // The greeting line is not a keyword.
        assert_eq!(
            Extensions::parse(&r(250, None, "PIPELINING")),
            Extensions::default()
        );
        // Read off the wire: the same.
        let (wire, _) = parse_reply(b"250-mx.test\r\n250-SIZE 100\r\n250 PIPELINING\r\n")
            .unwrap()
            .unwrap();
        let ext = Extensions::parse(&wire);
        assert!(ext.pipelining && ext.size_limit == Some(100));
    }
}
