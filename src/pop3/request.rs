//! POP3 commands (RFC 1939, RFC 2449, RFC 5034, RFC 2595) parsed from one line.

use crate::logsafe::Secret;

/// One client command, borrowing its arguments from the line.
///
/// Message numbers are kept as given (`0` and numbers past the end included);
/// whether they name a message is the session's question, not the parser's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request<'a> {
    /// `USER name`.
    User(&'a str),
    /// `PASS password`: the rest of the line: RFC 1939 lets a password contain spaces.
    Pass(Secret<&'a str>),
    /// `AUTH` alone lists the mechanisms (RFC 1734, still sent by some clients).
    Auth {
        /// The SASL mechanism, as given.
        mechanism: Option<&'a str>,
        /// RFC 5034 §4: `=` is an empty initial response, kept as `"="` here.
        /// A credential (base64 of the password), so `Debug` hides it.
        initial_response: Option<Secret<&'a str>>,
    },
    /// `STAT`.
    Stat,
    /// `LIST [msg]`.
    List(Option<u32>),
    /// `RETR msg`.
    Retr(u32),
    /// `DELE msg`.
    Dele(u32),
    /// `NOOP`.
    Noop,
    /// `RSET`.
    Rset,
    /// `QUIT`.
    Quit,
    /// `TOP msg lines`.
    Top {
        /// The message number.
        msg: u32,
        /// How many body lines after the header section.
        lines: u32,
    },
    /// `UIDL [msg]`.
    Uidl(Option<u32>),
    /// `CAPA` (RFC 2449).
    Capa,
    /// `STLS` (RFC 2595).
    Stls,
}

/// Why a line is not a valid command; `Display` is the text after `-ERR `.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    /// Not a POP3 command.
    #[error("Unknown command")]
    Unknown,
    /// Wrong number or form of arguments; carries the command's usage.
    #[error("Syntax error, expected: {usage}")]
    Syntax {
        /// The usage line, e.g. `RETR <msg>`.
        usage: &'static str,
    },
    /// An argument that is not UTF-8.
    #[error("Invalid UTF-8 in argument")]
    NotUtf8,
}

impl<'a> Request<'a> {
    /// Parses one command line (without its CRLF). The keyword is
    /// case-insensitive (RFC 1939 §3).
    ///
    /// # Errors
    ///
    /// [`ParseError::Unknown`] for an unknown keyword (an empty line included),
    /// the others for bad arguments.
    pub fn parse(line: &'a [u8]) -> Result<Request<'a>, ParseError> {
        let (keyword, rest) = match memchr::memchr(b' ', line) {
            Some(i) => (&line[..i], Some(&line[i + 1..])),
            None => (line, None),
        };
        // POP3 keywords have three or four letters; anything longer is not one.
        if keyword.len() > 4 {
            return Err(ParseError::Unknown);
        }
        let mut upper = [0u8; 4];
        let upper = &mut upper[..keyword.len()];
        upper.copy_from_slice(keyword);
        upper.make_ascii_uppercase();
        let request = match &*upper {
            b"USER" => Request::User(whole(rest, "USER name")?),
            b"PASS" => Request::Pass(Secret::new(whole(rest, "PASS password")?)),
            b"AUTH" => {
                let mut args = words(rest);
                let usage = "AUTH [mechanism [initial-response]]";
                let mechanism = args.next().map(utf8).transpose()?;
                let initial_response = args.next().map(utf8).transpose()?.map(Secret::new);
                end(args, usage)?;
                Request::Auth {
                    mechanism,
                    initial_response,
                }
            }
            b"STAT" => none(rest, Request::Stat, "STAT")?,
            b"NOOP" => none(rest, Request::Noop, "NOOP")?,
            b"RSET" => none(rest, Request::Rset, "RSET")?,
            b"QUIT" => none(rest, Request::Quit, "QUIT")?,
            b"CAPA" => none(rest, Request::Capa, "CAPA")?,
            b"STLS" => none(rest, Request::Stls, "STLS")?,
            b"LIST" => Request::List(optional_number(rest, "LIST [msg]")?),
            b"UIDL" => Request::Uidl(optional_number(rest, "UIDL [msg]")?),
            b"RETR" => Request::Retr(one_number(rest, "RETR msg")?),
            b"DELE" => Request::Dele(one_number(rest, "DELE msg")?),
            b"TOP" => parse_top(rest)?,
            _ => return Err(ParseError::Unknown),
        };
        Ok(request)
    }
}

/// Parses `TOP msg n`, whose keyword has three letters.
fn parse_top(rest: Option<&[u8]>) -> Result<Request<'_>, ParseError> {
    let usage = "TOP msg n";
    let mut args = words(rest);
    let msg = args
        .next()
        .and_then(number)
        .ok_or(ParseError::Syntax { usage })?;
    let lines = args
        .next()
        .and_then(number)
        .ok_or(ParseError::Syntax { usage })?;
    end(args, usage)?;
    Ok(Request::Top { msg, lines })
}

/// Arguments split on runs of spaces (lenient: RFC 1939 asks for one).
fn words(rest: Option<&[u8]>) -> impl Iterator<Item = &[u8]> {
    rest.unwrap_or_default()
        .split(|&b| b == b' ')
        .filter(|w| !w.is_empty())
}

fn end<'a>(
    mut args: impl Iterator<Item = &'a [u8]>,
    usage: &'static str,
) -> Result<(), ParseError> {
    match args.next() {
        Some(_) => Err(ParseError::Syntax { usage }),
        None => Ok(()),
    }
}

fn utf8(bytes: &[u8]) -> Result<&str, ParseError> {
    std::str::from_utf8(bytes).map_err(|_| ParseError::NotUtf8)
}

/// The whole rest of the line as one non-empty argument.
fn whole<'a>(rest: Option<&'a [u8]>, usage: &'static str) -> Result<&'a str, ParseError> {
    match rest {
        Some(arg) if !arg.is_empty() => utf8(arg),
        _ => Err(ParseError::Syntax { usage }),
    }
}

fn none<'a>(
    rest: Option<&[u8]>,
    request: Request<'a>,
    usage: &'static str,
) -> Result<Request<'a>, ParseError> {
    end(words(rest), usage).map(|()| request)
}

fn optional_number(rest: Option<&[u8]>, usage: &'static str) -> Result<Option<u32>, ParseError> {
    let mut args = words(rest);
    let n = match args.next() {
        Some(arg) => Some(number(arg).ok_or(ParseError::Syntax { usage })?),
        None => None,
    };
    end(args, usage)?;
    Ok(n)
}

fn one_number(rest: Option<&[u8]>, usage: &'static str) -> Result<u32, ParseError> {
    optional_number(rest, usage)?.ok_or(ParseError::Syntax { usage })
}

/// Decimal digits only (no sign, unlike `u32::from_str`). Numbers too large
/// for `u32` saturate: they name no message either way.
fn number(arg: &[u8]) -> Option<u32> {
    if arg.is_empty() || !arg.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(arg.iter().fold(0u32, |n, &d| {
        n.saturating_mul(10).saturating_add(u32::from(d - b'0'))
    }))
}
