//! SMTP framing without IO: command lines out of a byte buffer
//! ([`LineReceiver`]), DATA content up to `<CR><LF>.<CR><LF>`
//! ([`DataReceiver`]), and BDAT chunks of an exact octet count
//! ([`ChunkReceiver`], RFC 3030), with bounded memory and no SMTP smuggling.
//!
//! The receivers take a `BytesMut` the caller reads into, consume what they
//! can and leave the rest: whatever follows a line or the end of data is the
//! next pipelined command. Neither buffers more than its limit: an overlong
//! line or message is drained and reported once its end is seen.

use bytes::{Buf, BytesMut};

use crate::config::BareLf;
use crate::smtp::Reply;

/// A command line that could not be framed.
#[derive(thiserror::Error, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineError {
    /// Longer than the limit; the whole line was discarded.
    #[error("command line too long")]
    TooLong,
    /// A bare LF, or a bare CR inside the line, under [`BareLf::Reject`].
    #[error("bare CR or LF in command line")]
    BareLineEnding,
}

impl LineError {
    /// `500 5.5.0` for a long line (the session goes on); `550 5.5.2` for a
    /// bare line ending, after which the session closes (as Postfix's
    /// `smtpd_forbid_bare_newline = reject` does).
    pub fn reply(&self) -> Reply {
        match self {
            LineError::TooLong => Reply::new(500, "5.5.0", "Error: line too long"),
            LineError::BareLineEnding => bare_line_ending_reply(),
        }
    }
}

/// Message content that was received to its end but cannot be accepted.
#[derive(thiserror::Error, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataError {
    /// Over the size limit; the content was drained, not stored.
    #[error("message too big")]
    TooBig,
    /// A bare CR or LF under [`BareLf::Reject`]. Reported in preference to
    /// `TooBig` when both happen, since the session closes.
    #[error("bare CR or LF in message content")]
    BareLineEnding,
}

impl DataError {
    /// The reply that refuses the message for this error.
    pub fn reply(&self) -> Reply {
        match self {
            DataError::TooBig => Reply::new(552, "5.3.4", "Error: message file too big"),
            DataError::BareLineEnding => bare_line_ending_reply(),
        }
    }
}

fn bare_line_ending_reply() -> Reply {
    Reply::new(
        550,
        "5.5.2",
        "Error: bare <CR> or <LF> received (see RFC 5321 section 2.3.8)",
    )
}

/// Splits command lines out of a buffer.
///
/// CRLF ends a line. A bare LF ends it too under [`BareLf::Normalize`] and is
/// an error under [`BareLf::Reject`]. A bare CR inside a line is an error
/// under `Reject` and kept as-is under `Normalize` (the command parser then
/// refuses the line, but the session goes on).
#[derive(Debug, Clone)]
pub struct LineReceiver {
    max_line: usize,
    bare_lf: BareLf,
    /// Inside an overlong line: discard up to and including the next LF.
    discarding: bool,
}

impl LineReceiver {
    /// `max_line` counts the line ending (RFC 5321's 512 includes CRLF).
    pub fn new(max_line: usize, bare_lf: BareLf) -> Self {
        LineReceiver {
            max_line: max_line.max(2),
            bare_lf,
            discarding: false,
        }
    }

    /// Takes one complete line (without its line ending) off the front of
    /// `buf`, or returns `Ok(None)` when no complete line is buffered yet.
    ///
    /// # Errors
    ///
    /// [`LineError::TooLong`] once the end of a line longer than `max_line`
    /// is seen; until then its bytes are discarded as they come, so the
    /// buffer never holds more than `max_line` bytes of it.
    /// [`LineError::BareLineEnding`] under `Reject`, with the offending line
    /// consumed. After an error, call again for the next line.
    pub fn next_line(&mut self, buf: &mut BytesMut) -> Result<Option<BytesMut>, LineError> {
        if self.discarding {
            match memchr::memchr(b'\n', buf) {
                Some(i) => {
                    buf.advance(i + 1);
                    self.discarding = false;
                    return Err(LineError::TooLong);
                }
                None => {
                    buf.clear();
                    return Ok(None);
                }
            }
        }
        // Lines are short (max_line), so scanning from the start again on
        // each call costs little and cannot go stale if the caller hands the
        // buffer to a DataReceiver or clears it for STARTTLS in between.
        let Some(lf) = memchr::memchr(b'\n', buf) else {
            // Without its line ending, the line would already exceed the
            // limit once the ending arrives.
            if buf.len() >= self.max_line {
                buf.clear();
                self.discarding = true;
            }
            return Ok(None);
        };
        if lf + 1 > self.max_line {
            buf.advance(lf + 1);
            return Err(LineError::TooLong);
        }
        let mut line = buf.split_to(lf + 1);
        let crlf = lf > 0 && line[lf - 1] == b'\r';
        line.truncate(if crlf { lf - 1 } else { lf });
        if self.bare_lf == BareLf::Reject && (!crlf || memchr::memchr(b'\r', &line).is_some()) {
            return Err(LineError::BareLineEnding);
        }
        Ok(Some(line))
    }

    /// Forgets a partly discarded overlong line, for when the caller drops
    /// its buffer (STARTTLS: input sent before the handshake is discarded).
    pub fn reset(&mut self) {
        self.discarding = false;
    }
}

/// Where the DATA receiver is in the line structure of the content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a line. `proper` after CRLF or at the start of data:
    /// only there may `.` CRLF end the data.
    LineStart {
        proper: bool,
    },
    /// A leading dot was seen (and dropped: RFC 5321 §4.5.2 transparency).
    Dot {
        proper: bool,
    },
    /// `.` CR at a proper line start: an LF now ends the data.
    DotCr,
    /// Inside a line.
    Mid,
    /// A CR was seen; an LF makes it a line ending, anything else a bare CR.
    Cr,
    Done,
}

/// Receives DATA content after the `354`.
///
/// Dot-unstuffing removes the first `.` of every line. Only
/// `<CR><LF>.<CR><LF>` ends the data, where the first CRLF may be the start
/// of the data itself (so `.` CRLF right after the 354 is an empty message).
/// `LF.LF`, `CR.CR`, `LF.CRLF`, `CRLF.LF` and the like never end it: that is
/// what SMTP smuggling needs a receiver to mistake for the end.
///
/// Bare LF or bare CR in the content: under [`BareLf::Normalize`] each
/// becomes CRLF in the stored content (and starts a line, so a dot after it
/// is unstuffed, but it can never end the data); under [`BareLf::Reject`]
/// the receiver drains to the real end and then reports
/// [`DataError::BareLineEnding`].
///
/// Content over `max_size` (counted as stored: unstuffed, normalised) is
/// drained without being stored and reported as [`DataError::TooBig`].
#[derive(Debug)]
pub struct DataReceiver {
    max_size: u64,
    bare_lf: BareLf,
    state: State,
    content: Vec<u8>,
    received: u64,
    too_big: bool,
    bare_seen: bool,
}

impl DataReceiver {
    /// A receiver for one message of at most `max_size` octets (the rest is
    /// drained), with this bare-LF policy.
    pub fn new(max_size: u64, bare_lf: BareLf) -> Self {
        DataReceiver {
            max_size,
            bare_lf,
            state: State::LineStart { proper: true },
            content: Vec::new(),
            received: 0,
            too_big: false,
            bare_seen: false,
        }
    }

    /// Consumes as much of `buf` as it can. Returns true once the end-of-data
    /// marker was consumed; bytes after it stay in `buf` (they are the next
    /// pipelined command). After that, further calls consume nothing.
    pub fn ingest(&mut self, buf: &mut BytesMut) -> bool {
        if self.state == State::Done {
            return true;
        }
        if !self.discarding() {
            // Stored content is at most what comes in (plus one byte per
            // normalised bare ending), so this sizes the vector in one step
            // for a message that arrives in one read.
            let room = self.max_size.saturating_sub(self.content.len() as u64);
            self.content
                .reserve(usize::try_from(room).unwrap_or(usize::MAX).min(buf.len()));
        }
        let data = &buf[..];
        let mut i = 0;
        while i < data.len() {
            match self.state {
                State::Mid => match memchr::memchr2(b'\r', b'\n', &data[i..]) {
                    None => {
                        self.store(&data[i..]);
                        i = data.len();
                    }
                    Some(j) => {
                        let end = i + j;
                        if data[end] == b'\n' {
                            self.store(&data[i..end]);
                            i = end + 1;
                            self.bare_ending();
                        } else if data.get(end + 1) == Some(&b'\n') {
                            // The common case: the line and its CRLF in one copy.
                            self.store(&data[i..end + 2]);
                            i = end + 2;
                            self.state = State::LineStart { proper: true };
                        } else {
                            self.store(&data[i..end]);
                            i = end + 1;
                            self.state = State::Cr;
                        }
                    }
                },
                State::LineStart { proper } => {
                    if data[i] == b'.' {
                        i += 1;
                        self.state = State::Dot { proper };
                    } else {
                        self.state = State::Mid;
                    }
                }
                State::Dot { proper } => {
                    if proper && data[i] == b'\r' {
                        i += 1;
                        self.state = State::DotCr;
                    } else {
                        // The dot was stuffing; the rest of the line (even
                        // an immediate line ending) is handled as usual.
                        self.state = State::Mid;
                    }
                }
                State::DotCr => {
                    if data[i] == b'\n' {
                        i += 1;
                        self.state = State::Done;
                        break;
                    }
                    // `.` CR then not LF: the CR was bare, the line was just
                    // a stuffed dot. The byte is looked at again.
                    self.bare_ending();
                }
                State::Cr => {
                    if data[i] == b'\n' {
                        i += 1;
                        self.store(b"\r\n");
                        self.state = State::LineStart { proper: true };
                    } else {
                        self.bare_ending();
                    }
                }
                State::Done => break,
            }
        }
        self.received += i as u64;
        buf.advance(i);
        self.state == State::Done
    }

    /// The content: CRLF line endings, unstuffed, final `.` CRLF removed;
    /// it ends with CRLF unless empty.
    ///
    /// # Errors
    ///
    /// [`DataError::BareLineEnding`] if a bare CR or LF came under `Reject`,
    /// else [`DataError::TooBig`] if the content exceeded `max_size`.
    ///
    /// Called before [`ingest`](Self::ingest) returned true, it returns what
    /// was received so far; that is a caller bug, asserted in debug builds.
    pub fn finish(self) -> Result<Vec<u8>, DataError> {
        debug_assert_eq!(self.state, State::Done, "finish() before the end of data");
        if self.bare_seen {
            Err(DataError::BareLineEnding)
        } else if self.too_big {
            Err(DataError::TooBig)
        } else {
            Ok(self.content)
        }
    }

    /// Octets consumed from the connection so far, for the minimum data
    /// rate check.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Whether the end-of-data marker was seen.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Once the content is known to be refused, nothing more is stored.
    fn discarding(&self) -> bool {
        self.too_big || self.bare_seen
    }

    fn store(&mut self, bytes: &[u8]) {
        if self.discarding() {
            return;
        }
        if self.content.len() as u64 + bytes.len() as u64 > self.max_size {
            self.too_big = true;
            self.content = Vec::new();
            return;
        }
        self.content.extend_from_slice(bytes);
    }

    /// A CR or LF that is not part of a CRLF pair.
    fn bare_ending(&mut self) {
        match self.bare_lf {
            BareLf::Normalize => self.store(b"\r\n"),
            BareLf::Reject => {
                self.bare_seen = true;
                self.content = Vec::new();
            }
        }
        self.state = State::LineStart { proper: false };
    }
}

/// Receives the content of one message sent in `BDAT` chunks (RFC 3030).
///
/// The session announces each chunk with [`chunk`](Self::chunk); then
/// [`ingest`](Self::ingest) takes exactly that many octets, however they
/// were split across reads, and leaves whatever follows (the next pipelined
/// command). Nothing is unstuffed and nothing in the content ends it.
///
/// CHUNKING is offered without BINARYMIME, so the content is text: line
/// endings are handled as [`DataReceiver`] does (a bare CR or LF becomes
/// CRLF under [`BareLf::Normalize`], refuses the message under
/// [`BareLf::Reject`]), a CRLF split between two chunks is still one line
/// ending, and a last line without its CRLF gets one. The content then has
/// the same form as after DATA, for the store, POP3 sizes and relaying.
///
/// Content over `max_size` (counted as stored) is drained, not stored, and
/// reported by [`refused`](Self::refused) once its chunk is complete; a
/// chunk announced larger than the room left is known too big at once.
#[derive(Debug)]
pub struct ChunkReceiver {
    max_size: u64,
    bare_lf: BareLf,
    content: Vec<u8>,
    /// Octets of the current chunk still to come.
    remaining: u64,
    /// Octets of the current chunk taken so far.
    chunk_received: u64,
    /// Octets of all chunks taken so far, as sent.
    total_received: u64,
    /// The last octet taken was a CR: the next one (perhaps in the next
    /// chunk) decides whether it was a line ending.
    cr: bool,
    too_big: bool,
    bare_seen: bool,
}

impl ChunkReceiver {
    /// A receiver for one message of at most `max_size` octets, with this
    /// bare-LF policy. A receiver with `max_size` 0 drains whatever chunk it
    /// is given (for a chunk the session refuses anyway).
    pub fn new(max_size: u64, bare_lf: BareLf) -> Self {
        ChunkReceiver {
            max_size,
            bare_lf,
            content: Vec::new(),
            remaining: 0,
            chunk_received: 0,
            total_received: 0,
            cr: false,
            too_big: false,
            bare_seen: false,
        }
    }

    /// Starts a chunk of `size` octets (`BDAT size`).
    pub fn chunk(&mut self, size: u64) {
        self.remaining = size;
        self.chunk_received = 0;
        if !self.discarding() && self.content.len() as u64 + size > self.max_size {
            // Stored content is never less than what came in (line
            // endings only grow), so this chunk cannot fit: drain it.
            self.refuse_size();
        }
    }

    /// Takes what it can of the current chunk from the front of `buf`.
    /// Returns true once the whole chunk was taken (at once for `BDAT 0`);
    /// bytes after it stay in `buf`.
    pub fn ingest(&mut self, buf: &mut BytesMut) -> bool {
        let n = usize::try_from(self.remaining)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        if n > 0 {
            self.take(&buf[..n]);
            buf.advance(n);
            self.remaining -= n as u64;
            self.chunk_received += n as u64;
            self.total_received += n as u64;
        }
        self.remaining == 0
    }

    /// Octets of the current chunk taken so far, for the minimum data rate.
    pub fn received(&self) -> u64 {
        self.chunk_received
    }

    /// Octets of all chunks taken so far, as sent (for the reply to a
    /// chunk).
    pub fn total_received(&self) -> u64 {
        self.total_received
    }

    /// Octets stored so far.
    pub fn len(&self) -> usize {
        self.content.len()
    }

    /// Whether nothing is stored so far.
    pub fn is_empty(&self) -> bool {
        self.content.is_empty()
    }

    /// Why the message can no longer be accepted, once known:
    /// [`DataError::BareLineEnding`] in preference to
    /// [`DataError::TooBig`], as [`DataReceiver::finish`] reports them.
    pub fn refused(&self) -> Option<DataError> {
        if self.bare_seen {
            Some(DataError::BareLineEnding)
        } else if self.too_big {
            Some(DataError::TooBig)
        } else {
            None
        }
    }

    /// The content after the last chunk: CRLF line endings, the last line
    /// ended.
    ///
    /// # Errors
    ///
    /// What [`refused`](Self::refused) says, including for a bare CR at
    /// the very end.
    pub fn finish(mut self) -> Result<Vec<u8>, DataError> {
        debug_assert_eq!(self.remaining, 0, "finish() inside a chunk");
        if std::mem::take(&mut self.cr) {
            self.bare_ending();
        }
        if !self.content.is_empty() && !self.content.ends_with(b"\r\n") {
            self.store(b"\r\n");
        }
        match self.refused() {
            Some(e) => Err(e),
            None => Ok(self.content),
        }
    }

    fn discarding(&self) -> bool {
        self.too_big || self.bare_seen
    }

    fn refuse_size(&mut self) {
        self.too_big = true;
        self.cr = false;
        self.content = Vec::new();
    }

    /// Stores octets of the content, making every line ending CRLF.
    fn take(&mut self, data: &[u8]) {
        if self.discarding() {
            return;
        }
        // Sized from what arrived, not from what the chunk announced: a
        // client announcing a large chunk and sending nothing costs nothing.
        self.content.reserve(data.len());
        let mut i = 0;
        if std::mem::take(&mut self.cr) {
            if data[0] == b'\n' {
                self.store(b"\r\n");
                i = 1;
            } else {
                self.bare_ending();
            }
        }
        while i < data.len() && !self.discarding() {
            let Some(j) = memchr::memchr2(b'\r', b'\n', &data[i..]) else {
                self.store(&data[i..]);
                break;
            };
            let end = i + j;
            if data[end] == b'\n' {
                self.store(&data[i..end]);
                self.bare_ending();
                i = end + 1;
            } else if end + 1 == data.len() {
                // A CR at the end of what arrived: wait for the next octet.
                self.store(&data[i..end]);
                self.cr = true;
                i = end + 1;
            } else if data[end + 1] == b'\n' {
                self.store(&data[i..end + 2]);
                i = end + 2;
            } else {
                self.store(&data[i..end]);
                self.bare_ending();
                i = end + 1;
            }
        }
    }

    fn store(&mut self, bytes: &[u8]) {
        if self.discarding() {
            return;
        }
        if self.content.len() as u64 + bytes.len() as u64 > self.max_size {
            self.refuse_size();
            return;
        }
        self.content.extend_from_slice(bytes);
    }

    /// A CR or LF that is not part of a CRLF pair.
    fn bare_ending(&mut self) {
        match self.bare_lf {
            BareLf::Normalize => self.store(b"\r\n"),
            BareLf::Reject => {
                self.bare_seen = true;
                self.cr = false;
                self.content = Vec::new();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator, so failures can be replayed.
    struct XorShift(u64);

    impl XorShift {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }
    }

    /// The input whole, byte by byte, and in random splits.
    fn splits(input: &[u8]) -> Vec<Vec<&[u8]>> {
        let mut all = vec![vec![input], input.chunks(1).collect()];
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15 ^ input.len() as u64);
        for _ in 0..20 {
            let mut parts = Vec::new();
            let mut rest = input;
            while !rest.is_empty() {
                let n = 1 + rng.below(rest.len().min(16));
                parts.push(&rest[..n]);
                rest = &rest[n..];
            }
            all.push(parts);
        }
        all
    }

    type Lines = Vec<Result<String, LineError>>;

    /// Feeds `parts`, collecting every line and error, plus what is left.
    fn run_lines(max: usize, policy: BareLf, parts: &[&[u8]]) -> (Lines, Vec<u8>) {
        let mut rx = LineReceiver::new(max, policy);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for part in parts {
            buf.extend_from_slice(part);
            // Bounded: each call consumes a line or returns None.
            for _ in 0..=buf.len() + 1 {
                match rx.next_line(&mut buf) {
                    Ok(None) => {
                        assert!(
                            buf.len() < max,
                            "an incomplete line is kept only while it fits"
                        );
                        break;
                    }
                    Ok(Some(line)) => out.push(Ok(String::from_utf8_lossy(&line).into_owned())),
                    Err(e) => out.push(Err(e)),
                }
            }
        }
        (out, buf.to_vec())
    }

    #[test]
    fn lines_table() {
        use BareLf::{Normalize as N, Reject as R};
        use LineError::{BareLineEnding as Bare, TooLong};
        let ok = |s: &str| Ok(s.to_owned());
        let long = format!("MAIL FROM:<{}@x>\r\n", "a".repeat(40));
        // (input, max line, policy, lines and errors, what is left buffered)
        type Case<'a> = (&'a [u8], usize, BareLf, Lines, &'a [u8]);
        #[rustfmt::skip] // one case per line
        let cases: &[Case] = &[
            (b"EHLO x\r\n", 16, N, vec![ok("EHLO x")], b""),
            (b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n", 64, R,
                vec![ok("EHLO x"), ok("MAIL FROM:<a@b>"), ok("RCPT TO:<c@d>"), ok("DATA")], b""),
            (b"NOOP\r\nQUI", 16, N, vec![ok("NOOP")], b"QUI"),
            (b"NOOP\r", 16, N, vec![], b"NOOP\r"),
            (b"\r\n\r\n", 16, N, vec![ok(""), ok("")], b""),
            // Bare LF ends a line under Normalize, is an error under Reject.
            (b"NOOP\nQUIT\r\n", 16, N, vec![ok("NOOP"), ok("QUIT")], b""),
            (b"NOOP\nQUIT\r\n", 16, R, vec![Err(Bare), ok("QUIT")], b""),
            // A bare CR inside a line: kept, or an error.
            (b"NO\rOP\r\n", 16, N, vec![ok("NO\rOP")], b""),
            (b"NO\rOP\r\n", 16, R, vec![Err(Bare)], b""),
            (b"NOOP\r\r\n", 16, N, vec![ok("NOOP\r")], b""),
            // Exactly at the limit (CRLF included), and one over.
            (b"12345678\r\n", 10, N, vec![ok("12345678")], b""),
            (b"123456789\n", 10, N, vec![ok("123456789")], b""),
            (b"123456789\r\nNOOP\r\n", 10, N, vec![Err(TooLong), ok("NOOP")], b""),
            (b"1234567890\nNOOP\r\n", 10, N, vec![Err(TooLong), ok("NOOP")], b""),
            // Overlong lines are drained, then the next line is good.
            (long.as_bytes(), 32, N, vec![Err(TooLong)], b""),
            (b"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\r\nQUIT\r\nNOOP", 16, R,
                vec![Err(TooLong), ok("QUIT")], b"NOOP"),
            (b"xxxxxxxxxxxxxxxxxxxxxxxx\rxxxxxxxxxxxxxxxxx\r\n\r\n", 16, R, vec![Err(TooLong), ok("")], b""),
            // An overlong line not yet ended: nothing of it is kept.
            (b"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx", 16, N, vec![], b""),
        ];
        for (input, max, policy, want, rest) in cases {
            for parts in splits(input) {
                let (got, left) = run_lines(*max, *policy, &parts);
                let name = format!(
                    "{:?} {policy:?} in {} parts",
                    String::from_utf8_lossy(input),
                    parts.len()
                );
                assert_eq!(&got, want, "{name}");
                assert_eq!(&left, rest, "{name}");
            }
        }
    }

    #[derive(Debug, PartialEq)]
    struct DataOutcome {
        done: bool,
        result: Option<Result<Vec<u8>, DataError>>,
        left: Vec<u8>,
        received: u64,
    }

    fn run_data(max: u64, policy: BareLf, parts: &[&[u8]]) -> DataOutcome {
        let mut rx = DataReceiver::new(max, policy);
        let mut buf = BytesMut::new();
        let mut done = false;
        for part in parts {
            buf.extend_from_slice(part);
            done = rx.ingest(&mut buf);
            if !done {
                assert!(buf.is_empty(), "unfinished data must consume everything");
            }
        }
        let received = rx.received();
        DataOutcome {
            done,
            result: done.then(|| rx.finish()),
            left: buf.to_vec(),
            received,
        }
    }

    #[test]
    fn data_table() {
        use BareLf::{Normalize as N, Reject as R};
        use DataError::{BareLineEnding as Bare, TooBig};
        // (input, max size, policy, content or error, what is left after the end)
        // `None` as the outcome: the data has not ended.
        type Case<'a> = (
            &'a [u8],
            u64,
            BareLf,
            Option<Result<&'a [u8], DataError>>,
            &'a [u8],
        );
        #[rustfmt::skip] // one case per line
        let cases: &[Case] = &[
            // Empty message: the data starts at a line start.
            (b".\r\n", 100, R, Some(Ok(b"")), b""),
            (b".\r\nQUIT\r\n", 100, R, Some(Ok(b"")), b"QUIT\r\n"),
            (b"\r\n.\r\n", 100, R, Some(Ok(b"\r\n")), b""),
            (b"Subject: x\r\n\r\nbody\r\n.\r\nMAIL FROM:<a@b>\r\n", 100, R,
                Some(Ok(b"Subject: x\r\n\r\nbody\r\n")), b"MAIL FROM:<a@b>\r\n"),
            // Dot-stuffing.
            (b"..\r\n.\r\n", 100, R, Some(Ok(b".\r\n")), b""),
            (b"a\r\n..b\r\n...\r\n.x\r\n.\r\n", 100, R, Some(Ok(b"a\r\n.b\r\n..\r\nx\r\n")), b""),
            (b"a.\r\n.\r\n", 100, R, Some(Ok(b"a.\r\n")), b""),
            (b"a\r\n. \r\n.\r\n", 100, R, Some(Ok(b"a\r\n \r\n")), b""),
            // Not ended yet.
            (b"a\r\n.\r", 100, R, None, b""),
            (b"a\r\n.", 100, R, None, b""),
            (b"a\r\n", 100, R, None, b""),
            // Smuggling: none of these end the data, under either policy.
            (b"a\n.\nMAIL FROM:<x@y>\r\n", 100, N, None, b""),
            (b"a\r\n.\nMAIL FROM:<x@y>\r\n", 100, N, None, b""),
            (b"a\n.\r\nMAIL FROM:<x@y>\r\n", 100, N, None, b""),
            (b"a\r.\rMAIL FROM:<x@y>\r\n", 100, N, None, b""),
            (b"a\r\n.\r\r\nMAIL FROM:<x@y>\r\n", 100, N, None, b""),
            (b"a\n.\nMAIL FROM:<x@y>\r\n", 100, R, None, b""),
            (b"a\r\n.\r\r\nMAIL FROM:<x@y>\r\n", 100, R, None, b""),
            // ... and the real end afterwards: normalised, or refused.
            (b"a\n.\nb\r\n.\r\nQUIT\r\n", 100, N, Some(Ok(b"a\r\n\r\nb\r\n")), b"QUIT\r\n"),
            (b"a\r\n.\nb\r\n.\r\nQUIT\r\n", 100, N, Some(Ok(b"a\r\n\r\nb\r\n")), b"QUIT\r\n"),
            (b"a\n.\r\nb\r\n.\r\nQUIT\r\n", 100, N, Some(Ok(b"a\r\n\r\nb\r\n")), b"QUIT\r\n"),
            (b"a\r.\rb\r\n.\r\nQUIT\r\n", 100, N, Some(Ok(b"a\r\n\r\nb\r\n")), b"QUIT\r\n"),
            (b"a\r\n.\r\r\nb\r\n.\r\nQUIT\r\n", 100, N, Some(Ok(b"a\r\n\r\n\r\nb\r\n")), b"QUIT\r\n"),
            (b"a\n.\nb\r\n.\r\nQUIT\r\n", 100, R, Some(Err(Bare)), b"QUIT\r\n"),
            (b"a\r\n.\nb\r\n.\r\nQUIT\r\n", 100, R, Some(Err(Bare)), b"QUIT\r\n"),
            (b"a\n.\r\nb\r\n.\r\nQUIT\r\n", 100, R, Some(Err(Bare)), b"QUIT\r\n"),
            (b"a\r.\rb\r\n.\r\nQUIT\r\n", 100, R, Some(Err(Bare)), b"QUIT\r\n"),
            (b"a\r\n.\r\r\nb\r\n.\r\nQUIT\r\n", 100, R, Some(Err(Bare)), b"QUIT\r\n"),
            // Bare endings in ordinary content.
            (b"a\nb\rc\r\r\n\n\r\n.\r\n", 100, N, Some(Ok(b"a\r\nb\r\nc\r\n\r\n\r\n\r\n")), b""),
            (b"a\r\n\n.\r\n", 100, N, None, b""),
            (b"a\r\n\n.\r\n", 100, R, None, b""),
            (b"a\nb\r\n.\r\n", 100, R, Some(Err(Bare)), b""),
            // A bare LF before the dot line never makes it the end: the end
            // needs a real CRLF before the dot.
            (b"\n.\r\n.\r\n", 100, N, Some(Ok(b"\r\n\r\n")), b""),
            // Size: exactly at the limit, and one over (drained to the end).
            (b"12345678\r\n.\r\nQUIT\r\n", 10, R, Some(Ok(b"12345678\r\n")), b"QUIT\r\n"),
            (b"123456789\r\n.\r\nQUIT\r\n", 10, R, Some(Err(TooBig)), b"QUIT\r\n"),
            // Unstuffed dots and normalised endings count as stored.
            (b"..234567\r\n.\r\n", 9, R, Some(Ok(b".234567\r\n")), b""),
            (b"1234567\n\r\n.\r\n", 10, N, Some(Err(TooBig)), b""),
            (b"1234567\n\r\n.\r\n", 11, N, Some(Ok(b"1234567\r\n\r\n")), b""),
            // Bare endings win over size: the session must close.
            (b"123456789\n\r\n.\r\n", 5, R, Some(Err(Bare)), b""),
        ];
        for (input, max, policy, want, left) in cases {
            let reference = run_data(*max, *policy, &[input]);
            let name = format!("{:?} {policy:?} max {max}", String::from_utf8_lossy(input));
            match want {
                None => assert!(!reference.done, "{name}: ended"),
                Some(want) => {
                    assert!(reference.done, "{name}: did not end");
                    assert_eq!(
                        reference.result.as_ref().unwrap().as_deref(),
                        want.as_deref(),
                        "{name}"
                    );
                    assert_eq!(&reference.left, left, "{name}");
                    assert_eq!(
                        reference.received,
                        (input.len() - left.len()) as u64,
                        "{name}"
                    );
                }
            }
            for parts in splits(input) {
                assert_eq!(
                    run_data(*max, *policy, &parts),
                    reference,
                    "{name} in {} parts",
                    parts.len()
                );
            }
        }
    }

    /// Random streams over the bytes that matter (`.`, CR, LF, one letter),
    /// checked against an oracle for the end of data rather than a table.
    #[test]
    fn random_streams() {
        let mut rng = XorShift(0xD1B5_4A32_D192_ED03);
        for _ in 0..2000 {
            let len = rng.below(40);
            let input: Vec<u8> = (0..len).map(|_| b".\r\na"[rng.below(4)]).collect();
            // The end is the first CRLF.CRLF, or a `.` CRLF as the first line.
            let end = if input.starts_with(b".\r\n") {
                Some(3)
            } else {
                input
                    .windows(5)
                    .position(|w| w == b"\r\n.\r\n")
                    .map(|k| k + 5)
            };
            for policy in [BareLf::Normalize, BareLf::Reject] {
                let whole = run_data(1000, policy, &[&input]);
                let bytes: Vec<&[u8]> = input.chunks(1).collect();
                assert_eq!(
                    run_data(1000, policy, &bytes),
                    whole,
                    "{input:?} byte by byte"
                );
                let cut = rng.below(len + 1);
                let halves = [&input[..cut], &input[cut..]];
                assert_eq!(
                    run_data(1000, policy, &halves),
                    whole,
                    "{input:?} cut at {cut}"
                );

                assert_eq!(whole.done, end.is_some(), "{input:?}");
                let Some(end) = end else { continue };
                assert_eq!(whole.received, end as u64, "{input:?}");
                assert_eq!(whole.left, &input[end..], "{input:?}");
                let bare = input[..end]
                    .windows(2)
                    .any(|w| (w[0] == b'\r') != (w[1] == b'\n'))
                    || input[..end].first() == Some(&b'\n');
                match (policy, whole.result.clone().unwrap()) {
                    (BareLf::Reject, Err(DataError::BareLineEnding)) => assert!(bare, "{input:?}"),
                    (BareLf::Reject, Ok(content)) => {
                        assert!(!bare, "{input:?}");
                        assert!(content.len() < end, "{input:?}");
                    }
                    (BareLf::Normalize, Ok(content)) => {
                        // CRLF only, ending in CRLF, and it survives the
                        // stuff-and-unstuff round trip a relay would do.
                        let mut stuffed = Vec::new();
                        for line in content.split_inclusive(|&c| c == b'\n') {
                            assert!(line.ends_with(b"\r\n"), "{input:?} → {content:?}");
                            assert!(
                                !line[..line.len() - 2].contains(&b'\r'),
                                "{input:?} → {content:?}"
                            );
                            if line.starts_with(b".") {
                                stuffed.push(b'.');
                            }
                            stuffed.extend_from_slice(line);
                        }
                        stuffed.extend_from_slice(b".\r\n");
                        let again = run_data(1000, BareLf::Reject, &[&stuffed]);
                        assert_eq!(again.result, Some(Ok(content)), "{input:?}");
                        assert_eq!(again.received, stuffed.len() as u64);
                    }
                    (policy, other) => panic!("{input:?} {policy:?}: {other:?}"),
                }
            }
            // The same streams as command lines: no line holds an LF, none
            // holds a CR under Reject, and splitting does not matter.
            for policy in [BareLf::Normalize, BareLf::Reject] {
                let whole = run_lines(8, policy, &[&input]);
                let bytes: Vec<&[u8]> = input.chunks(1).collect();
                assert_eq!(run_lines(8, policy, &bytes), whole, "{input:?}");
                for line in whole.0.iter().flatten() {
                    // The line ending counts: at least LF.
                    assert!(!line.contains('\n') && line.len() < 8, "{input:?}");
                    assert!(
                        policy == BareLf::Normalize || !line.contains('\r'),
                        "{input:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn ingest_after_end_consumes_nothing() {
        let mut rx = DataReceiver::new(100, BareLf::Reject);
        let mut buf = BytesMut::from(&b"x\r\n.\r\nNOOP\r\n"[..]);
        assert!(rx.ingest(&mut buf));
        assert!(rx.ingest(&mut buf));
        assert_eq!(&buf[..], b"NOOP\r\n");
        assert_eq!(rx.received(), 6);
        assert_eq!(rx.finish().unwrap(), b"x\r\n");
    }

    #[test]
    fn big_message_is_not_buffered() {
        let mut rx = DataReceiver::new(1000, BareLf::Normalize);
        let line = [b'x'; 998];
        let mut buf = BytesMut::new();
        for _ in 0..1000 {
            buf.extend_from_slice(&line);
            buf.extend_from_slice(b"\r\n");
            assert!(!rx.ingest(&mut buf));
            assert!(rx.content.capacity() <= 1000);
        }
        buf.extend_from_slice(b".\r\n");
        assert!(rx.ingest(&mut buf));
        assert_eq!(rx.received(), 1000 * 1000 + 3);
        assert_eq!(rx.finish(), Err(DataError::TooBig));
    }

    #[test]
    fn replies() {
        assert_eq!(
            LineError::TooLong.reply().to_bytes(),
            b"500 5.5.0 Error: line too long\r\n"
        );
        assert_eq!(
            DataError::TooBig.reply().to_bytes(),
            b"552 5.3.4 Error: message file too big\r\n"
        );
        assert_eq!(LineError::BareLineEnding.reply().code, 550);
        assert_eq!(DataError::BareLineEnding.reply().code, 550);
    }

    /// Feeds a message as BDAT chunks of the given octets, each chunk's
    /// octets cut by `split`, with `QUIT` (the next pipelined command)
    /// after the last one; returns the result and what was left.
    fn run_chunks(
        max: u64,
        policy: BareLf,
        chunks: &[&[u8]],
        split: impl Fn(&[u8]) -> Vec<Vec<u8>>,
    ) -> (Result<Vec<u8>, DataError>, Vec<u8>) {
        let mut rx = ChunkReceiver::new(max, policy);
        let mut buf = BytesMut::new();
        for (n, chunk) in chunks.iter().enumerate() {
            rx.chunk(chunk.len() as u64);
            let mut wire = chunk.to_vec();
            if n + 1 == chunks.len() {
                wire.extend_from_slice(b"QUIT\r\n");
            }
            let mut done = rx.ingest(&mut buf);
            for piece in split(&wire) {
                buf.extend_from_slice(&piece);
                if !done {
                    done = rx.ingest(&mut buf);
                }
            }
            assert!(done, "chunk {n} complete");
            assert_eq!(rx.received(), chunk.len() as u64);
            if n + 1 < chunks.len() {
                assert!(buf.is_empty(), "chunk {n}: exactly its octets taken");
            }
        }
        (rx.finish(), buf.to_vec())
    }

    #[test]
    fn chunk_table() {
        use BareLf::{Normalize, Reject};
        type Case<'a> = (u64, BareLf, &'a [&'a [u8]], Result<&'a [u8], DataError>);
        let cases: &[Case] = &[
            // No dot-unstuffing, no end marker inside a chunk.
            (100, Normalize, &[b"..a\r\n.\r\n"], Ok(b"..a\r\n.\r\n")),
            // A CRLF split across two chunks is one line ending.
            (100, Normalize, &[b"a\r", b"\nb\r\n"], Ok(b"a\r\nb\r\n")),
            // A last line without CRLF gets one; empty stays empty.
            (100, Normalize, &[b"a", b"b"], Ok(b"ab\r\n")),
            (100, Normalize, &[b""], Ok(b"")),
            (100, Normalize, &[b"a\r\n", b""], Ok(b"a\r\n")),
            // Bare endings, as after DATA.
            (100, Normalize, &[b"a\nb\rc\r"], Ok(b"a\r\nb\r\nc\r\n")),
            (100, Normalize, &[b"a\r", b"b"], Ok(b"a\r\nb\r\n")),
            (100, Reject, &[b"a\nb\r\n"], Err(DataError::BareLineEnding)),
            (
                100,
                Reject,
                &[b"a\r", b"b\r\n"],
                Err(DataError::BareLineEnding),
            ),
            (
                100,
                Reject,
                &[b"a\r\n", b"b\r"],
                Err(DataError::BareLineEnding),
            ),
            // Size over all chunks, counted as stored.
            (4, Normalize, &[b"ab\r\n"], Ok(b"ab\r\n")),
            (4, Normalize, &[b"ab", b"\r\n"], Ok(b"ab\r\n")),
            (4, Normalize, &[b"ab\r\n", b"c"], Err(DataError::TooBig)),
            (4, Normalize, &[b"abc"], Err(DataError::TooBig)),
            (4, Normalize, &[b"ab\n\n"], Err(DataError::TooBig)),
            // Once too big, the rest is drained unexamined (DATA has to
            // scan it for its end anyway; a chunk does not).
            (4, Reject, &[b"abcdef\n"], Err(DataError::TooBig)),
            (
                4,
                Reject,
                &[b"a\n", b"bcdef"],
                Err(DataError::BareLineEnding),
            ),
            (0, Normalize, &[b"x"], Err(DataError::TooBig)),
        ];
        for &(max, policy, chunks, want) in cases {
            let want = want.map(<[u8]>::to_vec);
            let all: Vec<u8> = chunks.concat();
            for parts in splits(&[all.as_slice(), b"QUIT\r\n"].concat()) {
                // The same split points, applied within each chunk's wire.
                let sizes: Vec<usize> = parts.iter().map(|p| p.len()).collect();
                let split = |wire: &[u8]| {
                    let mut out = Vec::new();
                    let mut rest = wire;
                    for &n in sizes.iter().cycle() {
                        if rest.is_empty() {
                            break;
                        }
                        let n = n.min(rest.len());
                        out.push(rest[..n].to_vec());
                        rest = &rest[n..];
                    }
                    out
                };
                let (got, left) = run_chunks(max, policy, chunks, split);
                assert_eq!(got, want, "{chunks:?} max {max} {policy:?}");
                assert_eq!(left, b"QUIT\r\n", "{chunks:?}: the next command is left");
            }
        }
    }

    #[test]
    fn announced_chunk_is_not_reserved() {
        let mut rx = ChunkReceiver::new(u64::MAX, BareLf::Normalize);
        rx.chunk(1 << 40);
        let mut buf = BytesMut::from(&b"abc"[..]);
        assert!(!rx.ingest(&mut buf));
        assert!(rx.content.capacity() < 1 << 20);
        assert_eq!(rx.received(), 3);
        assert_eq!(rx.refused(), None);
    }

    #[test]
    fn oversized_chunk_is_drained_not_stored() {
        let mut rx = ChunkReceiver::new(10, BareLf::Normalize);
        rx.chunk(1000 * 1000);
        assert_eq!(rx.refused(), Some(DataError::TooBig));
        for _ in 0..1000 {
            let mut buf = BytesMut::from(&[b'x'; 1000][..]);
            rx.ingest(&mut buf);
            assert!(buf.is_empty());
            assert_eq!(rx.len(), 0);
        }
        let mut buf = BytesMut::from(&b"RSET\r\n"[..]);
        assert!(rx.ingest(&mut buf));
        assert_eq!(&buf[..], b"RSET\r\n");
        assert_eq!(rx.finish(), Err(DataError::TooBig));
    }
}
