//! POP3 replies written straight into the caller's output buffer: status
//! lines, dot-stuffed multi-line bodies, TOP cuts and UIDL checks.
//!
//! Nothing here allocates except the growth of the output `Vec` itself.

use std::borrow::Cow;
use std::fmt;
use std::io::Write as _;

/// `-ERR` texts (after `-ERR `) that callers and tests may want to match.
/// Response codes in brackets are RFC 2449 / RFC 3206 ones, as Dovecot sends.
pub mod text {
    /// A command the server does not know.
    pub const UNKNOWN_COMMAND: &str = "Unknown command";
    /// A command line over the length limit.
    pub const LINE_TOO_LONG: &str = "line too long";
    /// The last reply before closing: too many errors.
    pub const TOO_MANY_BAD_COMMANDS: &str = "Too many bad commands.";
    /// USER/PASS/AUTH refused before TLS.
    pub const PLAINTEXT_DISALLOWED: &str =
        "[AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections.";
    /// Wrong user name or password.
    pub const AUTH_FAILED: &str = "[AUTH] Authentication failed.";
    /// The maildrop is locked by another session (RFC 2449 `IN-USE`).
    pub const IN_USE: &str = "[IN-USE] Mailbox is locked by another session.";
    /// The password could not be checked (a store error).
    pub const TEMPORARY_FAILURE: &str = "[SYS/TEMP] Temporary authentication failure.";
    /// AUTH PLAIN with an authorization identity other than the user.
    pub const AUTHZID_REFUSED: &str = "[AUTH] Authorization identity not permitted.";
    /// The client answered a SASL challenge with `*`.
    pub const AUTH_CANCELLED: &str = "Authentication cancelled.";
    /// A SASL response that is not base64.
    pub const BAD_BASE64: &str = "Invalid base64 data.";
    /// A SASL PLAIN response without its three parts.
    pub const BAD_PLAIN: &str = "Invalid SASL PLAIN response.";
    /// An AUTH mechanism other than PLAIN.
    pub const UNSUPPORTED_MECHANISM: &str = "Unsupported authentication mechanism.";
    /// PASS without USER first.
    pub const NO_USERNAME: &str = "No username given.";
    /// A transaction-state command before login.
    pub const NOT_LOGGED_IN: &str = "Not logged in.";
    /// USER, PASS, AUTH or STLS after login.
    pub const ALREADY_LOGGED_IN: &str = "Already logged in.";
    /// STLS without TLS configured.
    pub const TLS_UNAVAILABLE: &str = "TLS support isn't enabled.";
    /// STLS on an encrypted connection.
    pub const TLS_ACTIVE: &str = "TLS is already active.";
    /// RETR or TOP of a message the store could not read.
    pub const READ_FAILED: &str = "[SYS/TEMP] Message could not be read.";
    /// QUIT whose deletions could not be committed.
    pub const COMMIT_FAILED: &str = "[SYS/TEMP] Some deleted messages were not removed.";
    /// The last reply to an idle client.
    pub const TIMED_OUT: &str = "Disconnected for inactivity.";
    /// The last reply when the server stops.
    pub const SHUTTING_DOWN: &str = "[SYS/TEMP] Server shutting down.";
}

/// Appends `+OK <text>\r\n` (`+OK\r\n` for an empty text).
pub fn ok(out: &mut Vec<u8>, text: &str) {
    status(out, b"+OK", text);
}

/// Appends `-ERR <text>\r\n`.
pub fn err(out: &mut Vec<u8>, text: &str) {
    status(out, b"-ERR", text);
}

/// Appends `+OK <formatted>\r\n` without an intermediate `String`.
pub fn ok_fmt(out: &mut Vec<u8>, args: fmt::Arguments<'_>) {
    status_fmt(out, b"+OK ", args);
}

/// Appends `-ERR <formatted>\r\n` without an intermediate `String`.
pub fn err_fmt(out: &mut Vec<u8>, args: fmt::Arguments<'_>) {
    status_fmt(out, b"-ERR ", args);
}

/// Appends one line of a multi-line reply: `<formatted>\r\n`.
pub fn line_fmt(out: &mut Vec<u8>, args: fmt::Arguments<'_>) {
    status_fmt(out, b"", args);
}

fn status(out: &mut Vec<u8>, indicator: &[u8], text: &str) {
    out.extend_from_slice(indicator);
    if !text.is_empty() {
        out.push(b' ');
        out.extend_from_slice(text.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

fn status_fmt(out: &mut Vec<u8>, indicator: &[u8], args: fmt::Arguments<'_>) {
    out.extend_from_slice(indicator);
    // Writing into a Vec cannot fail.
    let _ = out.write_fmt(args);
    out.extend_from_slice(b"\r\n");
}

/// Appends `content` dot-stuffed (RFC 1939 §3: a line starting with `.` gets
/// one more), ending with CRLF, then the terminating `.\r\n`.
///
/// `content` should use CRLF line ends and end with CRLF, as the store keeps
/// it; if the last line lacks its CRLF one is added, since the terminator
/// must start a line.
pub fn write_multiline(content: &[u8], out: &mut Vec<u8>) {
    // Stuffing adds an octet per dot-line: rare, so reserve for the common case.
    out.reserve(content.len() + 5);
    write_dot_stuffed(content, out);
    if !content.is_empty() && !content.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
}

/// Appends `content` with every line that starts with `.` given an extra `.`.
///
/// Scans with `memmem` for `\n.` and copies the runs between hits whole.
pub fn write_dot_stuffed(content: &[u8], out: &mut Vec<u8>) {
    let mut copied = 0;
    if content.first() == Some(&b'.') {
        out.push(b'.');
    }
    for hit in memchr::memmem::find_iter(content, b"\n.") {
        let line_start = hit + 1;
        out.extend_from_slice(&content[copied..line_start]);
        out.push(b'.');
        copied = line_start;
    }
    out.extend_from_slice(&content[copied..]);
}

/// The part of a message that `TOP msg lines` sends: the header section, the
/// blank line after it, and the first `lines` lines of the body (all of the
/// body if it has fewer). A message without a blank line is all header.
pub fn top(content: &[u8], lines: u32) -> &[u8] {
    let body_start = if content.starts_with(b"\r\n") {
        2
    } else {
        match memchr::memmem::find(content, b"\r\n\r\n") {
            Some(i) => i + 4,
            None => return content,
        }
    };
    if lines == 0 {
        return &content[..body_start];
    }
    let body = &content[body_start..];
    match memchr::memchr_iter(b'\n', body).nth(lines as usize - 1) {
        Some(i) => &content[..body_start + i + 1],
        None => content,
    }
}

/// Longest unique-id listing RFC 1939 §7 allows.
pub const MAX_UIDL_LEN: usize = 70;

/// RFC 1939 §7: 1 to 70 characters, each in 0x21–0x7E.
pub fn is_valid_uidl(uidl: &str) -> bool {
    (1..=MAX_UIDL_LEN).contains(&uidl.len()) && uidl.bytes().all(|b| (0x21..=0x7E).contains(&b))
}

/// `uidl` itself if valid, else a stable stand-in: `~` and 16 hex digits of
/// its FNV-1a hash. Stable because clients that "leave mail on the server"
/// remember UIDLs across sessions and restarts; FNV is used rather than std's
/// hasher, whose output Rust does not promise to keep across releases.
pub fn sanitize_uidl(uidl: &str) -> Cow<'_, str> {
    if is_valid_uidl(uidl) {
        return Cow::Borrowed(uidl);
    }
    let hash = uidl.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    Cow::Owned(format!("~{hash:016x}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn multiline(content: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_multiline(content, &mut out);
        out
    }

    #[test]
    fn dot_stuffing() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"", b".\r\n"),
            (b"a\r\n", b"a\r\n.\r\n"),
            (b".\r\n", b"..\r\n.\r\n"),
            (
                b".a\r\nb\r\n..c\r\n.\r\n",
                b"..a\r\nb\r\n...c\r\n..\r\n.\r\n",
            ),
            (b"a.b\r\n x.\r\n", b"a.b\r\n x.\r\n.\r\n"),
            // Missing final CRLF is supplied so the terminator starts a line.
            (b"a\r\n.b", b"a\r\n..b\r\n.\r\n"),
            (b"\r\n\r\n.\r\n", b"\r\n\r\n..\r\n.\r\n"),
        ];
        for (content, want) in cases {
            assert_eq!(
                multiline(content),
                *want,
                "{:?}",
                String::from_utf8_lossy(content)
            );
        }
    }

    #[test]
    fn dot_stuffing_then_unstuffing_round_trips() {
        let content = b"Subject: x\r\n\r\n.\r\n..\r\n.x\r\nplain\r\n";
        let out = multiline(content);
        let body = out.strip_suffix(b".\r\n").unwrap();
        let mut back = Vec::new();
        for line in body.split_inclusive(|&b| b == b'\n') {
            back.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
        }
        assert_eq!(back, content);
    }

    #[test]
    fn top_cuts() {
        let msg: &[u8] = b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\nl3\r\n";
        let cases: &[(&[u8], u32, &[u8])] = &[
            (msg, 0, b"A: 1\r\nB: 2\r\n\r\n"),
            (msg, 1, b"A: 1\r\nB: 2\r\n\r\nl1\r\n"),
            (msg, 3, msg),
            (msg, 4, msg),
            (msg, u32::MAX, msg),
            // Header only, no blank line.
            (b"A: 1\r\n", 0, b"A: 1\r\n"),
            (b"A: 1\r\n", 5, b"A: 1\r\n"),
            // Empty header section.
            (b"\r\nbody\r\nmore\r\n", 0, b"\r\n"),
            (b"\r\nbody\r\nmore\r\n", 1, b"\r\nbody\r\n"),
            // Blank line that ends the message.
            (b"A: 1\r\n\r\n", 2, b"A: 1\r\n\r\n"),
            (b"", 3, b""),
        ];
        for (content, lines, want) in cases {
            assert_eq!(
                top(content, *lines),
                *want,
                "{:?} {lines}",
                String::from_utf8_lossy(content)
            );
        }
    }

    #[test]
    fn uidl_validity() {
        assert!(is_valid_uidl("0000000001"));
        assert!(is_valid_uidl("!~"));
        assert!(is_valid_uidl(&"x".repeat(70)));
        for bad in ["", "a b", "tab\t", "\u{e9}", "\x7f", &"x".repeat(71)] {
            assert!(!is_valid_uidl(bad), "{bad:?}");
            let fixed = sanitize_uidl(bad);
            assert!(is_valid_uidl(&fixed), "{fixed:?}");
            // Stable: the same input always maps to the same id.
            assert_eq!(fixed, sanitize_uidl(bad));
        }
        assert_ne!(sanitize_uidl("a b"), sanitize_uidl("a c"));
        assert!(matches!(sanitize_uidl("ok"), Cow::Borrowed("ok")));
    }

    #[test]
    fn status_lines() {
        let mut out = Vec::new();
        ok(&mut out, "");
        err(&mut out, text::UNKNOWN_COMMAND);
        ok_fmt(&mut out, format_args!("{} {}", 2, 320));
        err_fmt(&mut out, format_args!("message {} already deleted", 2));
        assert_eq!(
            out,
            b"+OK\r\n-ERR Unknown command\r\n+OK 2 320\r\n-ERR message 2 already deleted\r\n"
        );
    }
}
