//! What may be written to the log: [`escape`] for values a peer chose, and
//! [`Secret`] for what must never be written at all.
//!
//! # Escaping
//!
//! A user name, HELO name, address or command line comes from the network
//! and may hold any byte. Written raw, a line feed in a POP3 `USER` name
//! starts a new, forged log line; a carriage return or a NUL confuses
//! whoever reads the log next. tracing's text formatter escapes ESC, BEL
//! and the C1 controls but not CR, LF or NUL, and a JSON formatter escapes
//! only what JSON needs. So every client-supplied value in a log field goes
//! through [`escape`], which escapes at the value level, before any
//! formatter sees it: the result holds for the text format, a JSON format
//! and anything else, because it contains no control character at all.
//!
//! The escaped form, like Dovecot's and Postfix's, keeps readable text
//! readable:
//!
//! - printable ASCII and printable non-ASCII characters (UTF-8 user names
//!   and SMTPUTF8 addresses) stay as they are;
//! - `\` becomes `\\`, so that an escape in the log always means the peer
//!   sent that byte, never that it typed a backslash and an `x`;
//! - ASCII controls (NUL, CR, LF, TAB, DEL, …) become `\xNN` (two lower-case
//!   hex digits: LF is `\x0a`);
//! - non-ASCII controls (C1) and the Unicode line and paragraph separators
//!   U+2028 and U+2029 become `\u{NNNN}`;
//! - a byte that is not part of valid UTF-8 becomes `\xNN`.
//!
//! # Secrets
//!
//! Passwords and SASL payloads travel in types whose `Debug` prints
//! `<redacted>`, so that a `?value` field or a `Debug` of the struct that
//! holds one cannot leak it: [`Secret`] for new fields, hand-written `Debug`
//! impls where a type cannot change (see `smtp::Step`).

use std::fmt;

/// A client-supplied value, displayed with every control character escaped
/// (see the [module docs](self) for the exact form). Made by [`escape`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Escaped<'a>(&'a [u8]);

/// Wraps a client-supplied value for a log field:
/// `info!(user = %escape(&user), "…")`.
///
/// The escaping happens here, at the value, not in a formatter: the text
/// handed to tracing holds no control character and no line separator, so
/// a record stays one line in the text format and in a JSON format alike
/// (JSON only adds its own `\\` for the backslashes). Use `%` (Display);
/// `?` (Debug) prints the same.
///
/// Takes anything that is bytes: `&str`, `String`, `&[u8]`, `BytesMut`.
pub fn escape<T: AsRef<[u8]> + ?Sized>(value: &T) -> Escaped<'_> {
    Escaped(value.as_ref())
}

impl Escaped<'_> {
    /// The raw bytes, unescaped.
    pub fn raw(&self) -> &[u8] {
        self.0
    }
}

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for chunk in self.0.utf8_chunks() {
            let text = chunk.valid();
            // Runs that need no escaping are written in one piece.
            let mut clean = 0;
            for (i, c) in text.char_indices() {
                if !needs_escape(c) {
                    continue;
                }
                f.write_str(&text[clean..i])?;
                clean = i + c.len_utf8();
                match c {
                    '\\' => f.write_str("\\\\")?,
                    c if c.is_ascii() => write!(f, "\\x{:02x}", c as u32)?,
                    c => write!(f, "\\u{{{:04x}}}", c as u32)?,
                }
            }
            f.write_str(&text[clean..])?;
            for byte in chunk.invalid() {
                write!(f, "\\x{byte:02x}")?;
            }
        }
        Ok(())
    }
}

/// The same as `Display`: a `?value` field must not bypass the escaping.
impl fmt::Debug for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

fn needs_escape(c: char) -> bool {
    c == '\\' || c.is_control() || c == '\u{2028}' || c == '\u{2029}'
}

/// A password, SASL payload or other credential. `Debug` prints
/// `<redacted>`; there is no `Display`. The value is there for whoever asks
/// for it by name ([`Secret::expose`]), which is easy to find in a review.
///
/// Serialized as the bare value (`serde(transparent)`), so wrapping a field
/// does not change a wire format.
#[derive(Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret<T = String>(T);

impl<T> Secret<T> {
    /// Wraps a value so that `Debug` hides it.
    pub fn new(value: T) -> Secret<T> {
        Secret(value)
    }

    /// The secret itself: hand it to the code that checks or hashes it,
    /// never to a log macro.
    pub fn expose(&self) -> &T {
        &self.0
    }

    /// The secret itself, unwrapped.
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes() {
        let cases: &[(&[u8], &str)] = &[
            (b"alice@example.test", "alice@example.test"),
            (b"", ""),
            (b"a b", "a b"),
            (
                b"mallory\n2026-12-01T00:00:00Z  INFO forged",
                "mallory\\x0a2026-12-01T00:00:00Z  INFO forged",
            ),
            (
                b"cr\rlf\nnul\0tab\tdel\x7fesc\x1b",
                "cr\\x0dlf\\x0anul\\x00tab\\x09del\\x7fesc\\x1b",
            ),
            // A backslash is doubled, so `\x0a` typed by the peer stays apart
            // from an escaped LF.
            (b"\\x0a", "\\\\x0a"),
            // Printable UTF-8 is kept; C1 controls and line separators are not.
            (
                "j\u{f6}rg@b\u{fc}ro.example".as_bytes(),
                "j\u{f6}rg@b\u{fc}ro.example",
            ),
            (
                "a\u{85}b\u{2028}c\u{2029}d\u{9b}".as_bytes(),
                "a\\u{0085}b\\u{2028}c\\u{2029}d\\u{009b}",
            ),
            // Invalid UTF-8, alone and between valid text.
            (b"\xff", "\\xff"),
            (b"ok\xc3(\xe2\x82end", "ok\\xc3(\\xe2\\x82end"),
        ];
        for (input, want) in cases {
            assert_eq!(escape(input).to_string(), *want, "input {input:?}");
            assert_eq!(format!("{:?}", escape(input)), *want, "Debug of {input:?}");
        }
    }

    #[test]
    fn escaped_text_has_no_control_characters() {
        let all: Vec<u8> = (0..=255).collect();
        let text = escape(&all).to_string();
        assert!(!text.chars().any(char::is_control), "{text}");
        assert!(text.is_ascii(), "invalid UTF-8 bytes are escaped: {text}");
        let unicode: String = (0..0x3000).filter_map(char::from_u32).collect();
        let text = escape(&unicode).to_string();
        assert!(!text
            .chars()
            .any(|c| c.is_control() || c == '\u{2028}' || c == '\u{2029}'));
    }

    #[test]
    fn secret_debug_is_redacted() {
        let s = Secret::new(String::from("hunter2"));
        assert_eq!(format!("{s:?}"), "<redacted>");
        assert_eq!(
            format!("{:?}", Some(Secret::new("hunter2"))),
            "Some(<redacted>)"
        );
        assert_eq!(s.expose(), "hunter2");
        // The wire form is the bare value.
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"hunter2\"");
        let back: Secret = serde_json::from_str("\"hunter2\"").unwrap();
        assert_eq!(back, s);
    }
}
