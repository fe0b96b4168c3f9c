//! Frames POP3 command lines out of received bytes, with a length limit.

use bytes::BytesMut;

/// Longest command line, CRLF included (RFC 2449 §4 raised RFC 1939's 47 to 255).
pub const MAX_COMMAND_LINE: usize = 255;

/// Default longest SASL continuation line, CRLF included. RFC 5034 §4 exempts
/// these lines from the 255-octet limit; 8 KiB is far more than AUTH PLAIN
/// with any sane password needs.
pub const DEFAULT_MAX_AUTH_LINE: usize = 8192;

/// The line just received was longer than the limit; it has been discarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("line longer than {max} octets")]
pub struct LineTooLong {
    /// The limit, in octets.
    pub max: usize,
}

/// Splits lines, ended by CRLF (or a bare LF, as Dovecot accepts), out of a
/// receive buffer.
///
/// Overlong input is dropped as it arrives rather than buffered, so a peer
/// that never sends a line end costs at most `max_len` octets of memory; the
/// error is reported once, when the overlong line finally ends, so that the
/// `-ERR` reply keeps its place among pipelined replies and the session
/// resynchronises on the next line.
#[derive(Debug, Default)]
pub struct LineReceiver {
    /// Octets at the front of the buffer already searched for a line end, so
    /// input arriving in small fragments is scanned once, not quadratically.
    scanned: usize,
    /// Inside an overlong line whose start has been thrown away.
    discarding: bool,
}

impl LineReceiver {
    /// A receiver with nothing buffered.
    pub fn new() -> LineReceiver {
        LineReceiver::default()
    }

    /// Takes the next complete line out of `buf`, without its line end.
    ///
    /// `max_len` counts the line end too; pass
    /// [`Session::max_line_len`](super::Session::max_line_len) so that SASL
    /// continuation lines get their larger limit.
    ///
    /// Returns `None` when `buf` holds no complete line yet (read more and
    /// call again); `Some(Err(_))` once per overlong line, after its end.
    pub fn next_line(
        &mut self,
        buf: &mut BytesMut,
        max_len: usize,
    ) -> Option<Result<BytesMut, LineTooLong>> {
        // The caller may have cleared the buffer (e.g. at STLS) without telling us.
        let from = self.scanned.min(buf.len());
        match memchr::memchr(b'\n', &buf[from..]) {
            Some(i) => {
                let end = from + i + 1;
                self.scanned = 0;
                if self.discarding || end > max_len {
                    self.discarding = false;
                    let _ = buf.split_to(end);
                    return Some(Err(LineTooLong { max: max_len }));
                }
                let mut line = buf.split_to(end);
                line.truncate(end - 1);
                if line.last() == Some(&b'\r') {
                    line.truncate(end - 2);
                }
                Some(Ok(line))
            }
            None => {
                // Without its line end the line is already `buf.len()` long;
                // adding at least the LF, it cannot fit once `buf` is this long.
                if self.discarding || buf.len() >= max_len {
                    // Keep a trailing CR: it may be the first half of the CRLF.
                    let keep = usize::from(buf.last() == Some(&b'\r'));
                    let _ = buf.split_to(buf.len() - keep);
                    self.discarding = true;
                    self.scanned = buf.len();
                } else {
                    self.scanned = buf.len();
                }
                None
            }
        }
    }

    /// Forgets any partial state; call after discarding the buffer (STLS).
    pub fn reset(&mut self) {
        *self = LineReceiver::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `chunk` octets, collecting every line or error.
    fn run(input: &[u8], chunk: usize, max: usize) -> Vec<Result<Vec<u8>, LineTooLong>> {
        let mut rx = LineReceiver::new();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for piece in input.chunks(chunk) {
            buf.extend_from_slice(piece);
            while let Some(line) = rx.next_line(&mut buf, max) {
                got.push(line.map(|l| l.to_vec()));
            }
            // Never buffers more than one line's worth.
            assert!(buf.len() <= max, "buffered {} octets", buf.len());
        }
        got
    }

    #[test]
    fn table() {
        let long = |n: usize| -> Vec<u8> {
            let mut v = vec![b'x'; n];
            v.extend_from_slice(b"\r\n");
            v
        };
        let ok = |s: &[u8]| Ok(s.to_vec());
        let too_long = || Err(LineTooLong { max: 16 });
        #[allow(clippy::type_complexity)]
        let cases: Vec<(Vec<u8>, Vec<Result<Vec<u8>, LineTooLong>>)> = vec![
            (b"STAT\r\n".to_vec(), vec![ok(b"STAT")]),
            (
                b"STAT\r\nLIST 1\r\n".to_vec(),
                vec![ok(b"STAT"), ok(b"LIST 1")],
            ),
            // Bare LF ends a line too; a lone CR does not.
            (
                b"NOOP\nQU\rIT\r\n".to_vec(),
                vec![ok(b"NOOP"), ok(b"QU\rIT")],
            ),
            (b"\r\n".to_vec(), vec![ok(b"")]),
            // No line end yet: nothing.
            (b"STAT".to_vec(), vec![]),
            // 14 + CRLF = 16 fits exactly; 15 + CRLF does not.
            (long(14), vec![ok(&[b'x'; 14])]),
            (long(15), vec![too_long()]),
            // A 15-octet line with a bare LF is 16 octets: fits.
            (
                [vec![b'x'; 15], b"\n".to_vec()].concat(),
                vec![ok(&[b'x'; 15])],
            ),
            // Far overlong, then a good line: one error, then resync.
            (
                [long(100), b"NOOP\r\n".to_vec()].concat(),
                vec![too_long(), ok(b"NOOP")],
            ),
            (
                [long(40), long(40), b"QUIT\r\n".to_vec()].concat(),
                vec![too_long(), too_long(), ok(b"QUIT")],
            ),
        ];
        for (input, want) in &cases {
            for chunk in [1, 2, 3, 7, 1000] {
                assert_eq!(
                    &run(input, chunk, 16),
                    want,
                    "input {:?} chunk {chunk}",
                    String::from_utf8_lossy(input)
                );
            }
        }
    }

    #[test]
    fn limit_may_change_between_lines() {
        let mut rx = LineReceiver::new();
        let mut buf = BytesMut::from(&b"AUTH PLAIN\r\n"[..]);
        buf.extend_from_slice(&[b'A'; 1000]);
        buf.extend_from_slice(b"\r\n");
        assert_eq!(
            rx.next_line(&mut buf, MAX_COMMAND_LINE).unwrap().unwrap(),
            &b"AUTH PLAIN"[..]
        );
        let line = rx
            .next_line(&mut buf, DEFAULT_MAX_AUTH_LINE)
            .unwrap()
            .unwrap();
        assert_eq!(line.len(), 1000);
        assert!(rx.next_line(&mut buf, MAX_COMMAND_LINE).is_none());
    }

    #[test]
    fn reset_after_buffer_cleared() {
        let mut rx = LineReceiver::new();
        let mut buf = BytesMut::from(&b"partial line"[..]);
        assert!(rx.next_line(&mut buf, 255).is_none());
        buf.clear();
        rx.reset();
        buf.extend_from_slice(b"CAPA\r\n");
        assert_eq!(rx.next_line(&mut buf, 255).unwrap().unwrap(), &b"CAPA"[..]);
    }
}
