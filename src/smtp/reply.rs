//! SMTP replies: a code, an optional enhanced status code (RFC 3463) and text.

use std::borrow::Cow;
use std::fmt;

use serde::{Deserialize, Serialize};

/// One SMTP reply, possibly multi-line (lines separated by `\n` in `text`).
///
/// Static replies borrow their text, so the hot path allocates nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// The three-digit reply code.
    pub code: u16,
    /// Enhanced status code such as `2.1.0`; `None` for the greeting and EHLO.
    pub status: Option<Cow<'static, str>>,
    /// The text; `\n` separates the lines of a multi-line reply.
    pub text: Cow<'static, str>,
}

impl Reply {
    /// A reply with an enhanced status code.
    pub fn new(
        code: u16,
        status: impl Into<Cow<'static, str>>,
        text: impl Into<Cow<'static, str>>,
    ) -> Reply {
        Reply {
            code,
            status: Some(status.into()),
            text: text.into(),
        }
    }

    /// A reply without an enhanced status code (greeting, EHLO, 354).
    pub fn plain(code: u16, text: impl Into<Cow<'static, str>>) -> Reply {
        Reply {
            code,
            status: None,
            text: text.into(),
        }
    }

    /// 2xx or 3xx: the command succeeded or goes on.
    pub const fn is_positive(&self) -> bool {
        self.code < 400
    }

    /// 4xx: a temporary failure; the client may try again.
    pub const fn is_transient(&self) -> bool {
        self.code >= 400 && self.code < 500
    }

    /// 5xx: a permanent failure.
    pub const fn is_permanent(&self) -> bool {
        self.code >= 500
    }

    /// Appends the wire form (`250-a\r\n250 b\r\n`) to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let mut lines = self.text.split('\n').peekable();
        while let Some(line) = lines.next() {
            let sep = if lines.peek().is_some() { '-' } else { ' ' };
            // `write!` into a Vec cannot fail.
            let _ = std::io::Write::write_fmt(out, format_args!("{}{sep}", self.code));
            if let Some(status) = &self.status {
                out.extend_from_slice(status.as_bytes());
                out.push(b' ');
            }
            out.extend_from_slice(line.trim_end_matches('\r').as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }

    /// The wire form as bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.text.len() + 16);
        self.write_to(&mut out);
        out
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code)?;
        if let Some(status) = &self.status {
            write!(f, " {status}")?;
        }
        write!(f, " {}", self.text.replace('\n', " / "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_line_with_status() {
        let r = Reply::new(250, "2.1.0", "Ok");
        assert_eq!(r.to_bytes(), b"250 2.1.0 Ok\r\n");
    }

    #[test]
    fn multi_line_without_status() {
        let r = Reply::plain(250, "mx.test\nPIPELINING\nSIZE 100");
        assert_eq!(
            r.to_bytes(),
            b"250-mx.test\r\n250-PIPELINING\r\n250 SIZE 100\r\n"
        );
    }
}
