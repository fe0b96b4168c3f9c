//! SMTP command lines parsed into [`Request`]s (RFC 5321 §4.1 and the ESMTP
//! parameters postino knows), with the reply each syntax error deserves.
//! No IO and no session state: what a command means now is the session's
//! business.

use crate::address::{Address, AddressError};
use crate::esmtp::{xtext_decode, Notify, Orcpt, Ret};
use crate::logsafe::{escape, Escaped, Secret};
use crate::smtp::Reply;

/// One SMTP command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Ehlo {
        host: String,
    },
    Helo {
        host: String,
    },
    /// `from` is `None` for the null reverse path `<>` (bounces).
    Mail {
        from: Option<Address>,
        params: MailParams,
    },
    /// The address is parsed allowing UTF-8, because whether the transaction
    /// declared `SMTPUTF8` is session state: the session answers
    /// [`RequestError::NonAsciiRecipient`]'s reply when
    /// [`Address::needs_smtputf8`] and the `MAIL` had no `SMTPUTF8`.
    Rcpt {
        to: Address,
        params: RcptParams,
    },
    Data,
    Rset,
    /// Any argument is ignored (RFC 5321 §4.1.1.9).
    Noop,
    Quit,
    /// Any argument is ignored.
    Help,
    Vrfy(String),
    Expn(String),
    StartTls,
    /// `mechanism` is upper-cased; `initial` is the initial response as sent
    /// (base64, or `=` for an empty one), not decoded: a credential, so
    /// `Debug` does not show it.
    Auth {
        mechanism: String,
        initial: Option<Secret>,
    },
    Bdat {
        size: u64,
        last: bool,
    },
    /// A verb this parser does not know, as sent; the session answers
    /// `502 5.5.2`.
    Unknown(String),
}

/// The `MAIL FROM` parameters postino knows (RFC 1870, 6152, 6531, 4954,
/// 3461). Whether the session advertised them (`AUTH=`) is the session's
/// business.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MailParams {
    /// `SIZE=`: the client's estimate of the message size.
    pub size: Option<u64>,
    /// `BODY=`.
    pub body: Option<Body>,
    /// `SMTPUTF8`: UTF-8 allowed in addresses and headers.
    pub smtputf8: bool,
    /// `AUTH=`, xtext-decoded (RFC 4954 §5): `<>` or a mailbox.
    pub auth: Option<String>,
    /// `RET=` (RFC 3461 §4.3).
    pub ret: Option<Ret>,
    /// `ENVID=` (RFC 3461 §4.4), xtext-decoded.
    pub envid: Option<String>,
}

/// The `BODY=` parameter (RFC 6152).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    SevenBit,
    EightBitMime,
}

/// The `RCPT TO` parameters: DSN's `NOTIFY` and `ORCPT` (RFC 3461).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RcptParams {
    /// `NOTIFY=` (RFC 3461 §4.1).
    pub notify: Option<Notify>,
    /// `ORCPT=` (RFC 3461 §4.2).
    pub orcpt: Option<Orcpt>,
}

/// A line that is not a well-formed command. Each maps to one reply.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RequestError {
    /// NUL, another control character (except tab) or non-UTF-8 bytes.
    #[error("invalid character in command line")]
    BadCharacters,
    /// An empty line, or one starting with white space.
    #[error("empty command")]
    Empty,
    /// A known verb with malformed arguments; `syntax` is what was expected.
    #[error("syntax error, expected {syntax}")]
    Syntax { syntax: &'static str },
    #[error("bad sender address: {0}")]
    BadSender(AddressError),
    #[error("bad recipient address: {0}")]
    BadRecipient(AddressError),
    /// Not raised by [`Request::parse`]: the session's answer to a UTF-8
    /// recipient in a transaction without `SMTPUTF8`.
    #[error("non-ASCII recipient without SMTPUTF8")]
    NonAsciiRecipient,
    /// A `MAIL`/`RCPT` parameter this server does not support.
    #[error("unsupported parameter {0}")]
    UnsupportedParam(String),
    /// A supported parameter with a bad or repeated value.
    #[error("bad value for parameter {0}")]
    BadParamValue(&'static str),
}

impl RequestError {
    /// The reply for this error:
    ///
    /// | error | reply |
    /// |---|---|
    /// | `BadCharacters`, `Empty` | `500 5.5.2` |
    /// | `Syntax` | `501 5.5.2 Syntax: MAIL FROM:<address>` (etc.) |
    /// | `BadSender` | `501 5.1.7 Bad sender address syntax` (the text names a length limit when that was the fault); `553 5.6.7` for UTF-8 without `SMTPUTF8` |
    /// | `BadRecipient` | `501 5.1.3 Bad recipient address syntax` (likewise) |
    /// | `NonAsciiRecipient` | `553 5.6.7` |
    /// | `UnsupportedParam` | `555 5.5.4 Unsupported option: X` |
    /// | `BadParamValue` | `501 5.5.4 Bad X parameter` |
    pub fn reply(&self) -> Reply {
        match self {
            RequestError::BadCharacters => {
                Reply::new(500, "5.5.2", "Error: invalid character in command")
            }
            RequestError::Empty => Reply::new(500, "5.5.2", "Error: bad syntax"),
            RequestError::Syntax { syntax } => {
                Reply::new(501, "5.5.2", format!("Syntax: {syntax}"))
            }
            RequestError::BadSender(e) => address_reply(e, "5.1.7", "sender"),
            RequestError::BadRecipient(e) => address_reply(e, "5.1.3", "recipient"),
            RequestError::NonAsciiRecipient => non_ascii_reply(),
            RequestError::UnsupportedParam(name) => {
                Reply::new(555, "5.5.4", format!("Unsupported option: {name}"))
            }
            RequestError::BadParamValue(name) => {
                Reply::new(501, "5.5.4", format!("Bad {name} parameter"))
            }
        }
    }
}

fn address_reply(e: &AddressError, status: &'static str, which: &str) -> Reply {
    let why = match e {
        AddressError::NonAscii => return non_ascii_reply(),
        AddressError::LocalPartTooLong => ": local part longer than 64 octets",
        AddressError::DomainTooLong => ": domain longer than 255 octets",
        AddressError::PathTooLong => ": path longer than 256 octets",
        _ => "",
    };
    Reply::new(501, status, format!("Bad {which} address syntax{why}"))
}

fn non_ascii_reply() -> Reply {
    Reply::new(
        553,
        "5.6.7",
        "Must declare SMTPUTF8 to send Unicode address",
    )
}

const SYNTAX_EHLO: &str = "EHLO hostname";
const SYNTAX_HELO: &str = "HELO hostname";
const SYNTAX_MAIL: &str = "MAIL FROM:<address>";
const SYNTAX_RCPT: &str = "RCPT TO:<address>";
const SYNTAX_VRFY: &str = "VRFY address";
const SYNTAX_EXPN: &str = "EXPN mailing-list";
const SYNTAX_AUTH: &str = "AUTH mechanism [initial-response]";
const SYNTAX_BDAT: &str = "BDAT chunk-size [LAST]";

/// Space and tab separate words; Postfix accepts both.
const WSP: [char; 2] = [' ', '\t'];

/// How much of a command line [`loggable`] shows.
pub const MAX_LOGGED_COMMAND: usize = 64;

/// A command line as it may be logged (made by [`loggable`]).
#[derive(Debug, Clone, Copy)]
pub struct LoggedCommand<'a> {
    shown: Escaped<'a>,
    /// Octets left out: an AUTH initial response, or past the length cap.
    cut: bool,
    /// Not a known verb: only the length is shown.
    unknown: Option<usize>,
}

/// The verbs [`Request::parse`] knows.
const VERBS: [&[u8]; 14] = [
    b"EHLO",
    b"HELO",
    b"MAIL",
    b"RCPT",
    b"DATA",
    b"RSET",
    b"QUIT",
    b"STARTTLS",
    b"NOOP",
    b"HELP",
    b"VRFY",
    b"EXPN",
    b"AUTH",
    b"BDAT",
];

/// A command line for the log: its first [`MAX_LOGGED_COMMAND`] octets,
/// escaped ([`escape`]), and of an `AUTH` command only the verb and the
/// mechanism: the initial response is a credential (base64 of the password
/// for PLAIN) and never reaches a log. Anything left out shows as `…`.
///
/// A line whose verb is unknown shows as `<unknown command, N octets>`: a
/// client that sends a SASL response when no exchange is running (one that
/// pipelined its password after the server ended the exchange) would
/// otherwise have its password logged as a command.
pub fn loggable(line: &[u8]) -> LoggedCommand<'_> {
    let is_wsp = |b: &u8| *b == b' ' || *b == b'\t';
    let verb = line.iter().position(is_wsp).unwrap_or(line.len());
    if !VERBS.iter().any(|v| line[..verb].eq_ignore_ascii_case(v)) {
        return LoggedCommand {
            shown: escape(b""),
            cut: false,
            unknown: Some(line.len()),
        };
    }
    let mut end = line.len().min(MAX_LOGGED_COMMAND);
    if line[..verb].eq_ignore_ascii_case(b"AUTH") {
        // Keep `AUTH <mechanism>`, cut before the next word.
        let mechanism = line[verb..]
            .iter()
            .position(|b| !is_wsp(b))
            .map_or(line.len(), |i| verb + i);
        let after = line[mechanism..]
            .iter()
            .position(is_wsp)
            .map_or(line.len(), |i| mechanism + i);
        end = end.min(after);
    }
    LoggedCommand {
        shown: escape(&line[..end]),
        cut: end < line.len(),
        unknown: None,
    }
}

impl std::fmt::Display for LoggedCommand<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(len) = self.unknown {
            return write!(f, "<unknown command, {len} octets>");
        }
        write!(f, "{}", self.shown)?;
        if self.cut {
            f.write_str(" …")?;
        }
        Ok(())
    }
}

impl Request {
    /// Parses one command line, without its CRLF.
    ///
    /// Verbs and parameter names are case-insensitive. As in Postfix, space
    /// after `MAIL FROM:`/`RCPT TO:` and trailing white space are tolerated;
    /// the angle brackets are not optional.
    ///
    /// # Errors
    ///
    /// See [`RequestError`]; an unknown verb is not an error but
    /// [`Request::Unknown`].
    pub fn parse(line: &[u8]) -> Result<Request, RequestError> {
        let line = std::str::from_utf8(line).map_err(|_| RequestError::BadCharacters)?;
        // No control characters anywhere: they have no place in a command,
        // and arguments end up in logs, replies and Received: headers.
        if line.bytes().any(|c| (c < 0x20 && c != b'\t') || c == 0x7f) {
            return Err(RequestError::BadCharacters);
        }
        let line = line.trim_end_matches(WSP);
        let (verb, args) = match line.split_once(WSP) {
            Some((verb, args)) => (verb, args.trim_start_matches(WSP)),
            None => (line, ""),
        };
        if verb.is_empty() {
            return Err(RequestError::Empty);
        }
        // Upper-case into a stack buffer: no allocation per command.
        let mut upper = [0u8; 8];
        let Some(upper) = upper.get_mut(..verb.len()) else {
            return Ok(Request::Unknown(verb.to_owned()));
        };
        upper.copy_from_slice(verb.as_bytes());
        upper.make_ascii_uppercase();
        match &*upper {
            b"EHLO" => hello(args, SYNTAX_EHLO).map(|host| Request::Ehlo { host }),
            b"HELO" => hello(args, SYNTAX_HELO).map(|host| Request::Helo { host }),
            b"MAIL" => mail(args),
            b"RCPT" => rcpt(args),
            b"DATA" => no_args(args, Request::Data, "DATA"),
            b"RSET" => no_args(args, Request::Rset, "RSET"),
            b"QUIT" => no_args(args, Request::Quit, "QUIT"),
            b"STARTTLS" => no_args(args, Request::StartTls, "STARTTLS"),
            b"NOOP" => Ok(Request::Noop),
            b"HELP" => Ok(Request::Help),
            b"VRFY" => required(args, SYNTAX_VRFY).map(Request::Vrfy),
            b"EXPN" => required(args, SYNTAX_EXPN).map(Request::Expn),
            b"AUTH" => auth(args),
            b"BDAT" => bdat(args),
            _ => Ok(Request::Unknown(verb.to_owned())),
        }
    }
}

fn syntax(syntax: &'static str) -> RequestError {
    RequestError::Syntax { syntax }
}

fn no_args(args: &str, request: Request, name: &'static str) -> Result<Request, RequestError> {
    if args.is_empty() {
        Ok(request)
    } else {
        Err(syntax(name))
    }
}

fn required(args: &str, expected: &'static str) -> Result<String, RequestError> {
    if args.is_empty() {
        Err(syntax(expected))
    } else {
        Ok(args.to_owned())
    }
}

/// The HELO/EHLO argument as sent: like Postfix, not checked further here,
/// since broken clients send all sorts of names.
fn hello(args: &str, expected: &'static str) -> Result<String, RequestError> {
    required(args, expected)
}

/// `AUTH mechanism [initial-response]`; sasl-mech = 1*20 of A-Z, 0-9, `-`, `_`
/// (RFC 4422 §3.1), accepted in any case.
fn auth(args: &str) -> Result<Request, RequestError> {
    let mut words = args.split(WSP).filter(|w| !w.is_empty());
    let mechanism = words
        .next()
        .filter(|m| {
            m.len() <= 20
                && m.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        })
        .ok_or(syntax(SYNTAX_AUTH))?;
    let initial = words.next().map(|w| Secret::new(w.to_owned()));
    if words.next().is_some() {
        return Err(syntax(SYNTAX_AUTH));
    }
    Ok(Request::Auth {
        mechanism: mechanism.to_ascii_uppercase(),
        initial,
    })
}

/// `BDAT chunk-size [LAST]` (RFC 3030).
fn bdat(args: &str) -> Result<Request, RequestError> {
    let mut words = args.split(WSP).filter(|w| !w.is_empty());
    let size = words
        .next()
        .filter(|w| w.bytes().all(|c| c.is_ascii_digit()))
        .and_then(|w| w.parse().ok())
        .ok_or(syntax(SYNTAX_BDAT))?;
    let last = match words.next() {
        None => false,
        Some(w) if w.eq_ignore_ascii_case("LAST") => true,
        Some(_) => return Err(syntax(SYNTAX_BDAT)),
    };
    if words.next().is_some() {
        return Err(syntax(SYNTAX_BDAT));
    }
    Ok(Request::Bdat { size, last })
}

fn mail(args: &str) -> Result<Request, RequestError> {
    let (path, rest) = path_and_params(args, "FROM:").ok_or(syntax(SYNTAX_MAIL))?;
    let params = mail_params(rest)?;
    let from = if path.is_empty() {
        None
    } else {
        Some(Address::parse(path, params.smtputf8).map_err(RequestError::BadSender)?)
    };
    Ok(Request::Mail { from, params })
}

fn rcpt(args: &str) -> Result<Request, RequestError> {
    let (path, rest) = path_and_params(args, "TO:").ok_or(syntax(SYNTAX_RCPT))?;
    let params = rcpt_params(rest)?;
    let to = Address::parse(path, true).map_err(RequestError::BadRecipient)?;
    Ok(Request::Rcpt { to, params })
}

/// `FROM:<path> params` → (`path`, `params`). Space after the colon is
/// tolerated (Postfix); the brackets are required, and a `>` inside a
/// quoted local part does not close them.
fn path_and_params<'a>(args: &'a str, keyword: &str) -> Option<(&'a str, &'a str)> {
    let head = args.get(..keyword.len())?;
    if !head.eq_ignore_ascii_case(keyword) {
        return None;
    }
    let rest = args[keyword.len()..].trim_start_matches(WSP);
    let rest = rest.strip_prefix('<')?;
    let b = rest.as_bytes();
    let mut quoted = false;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' if quoted => i += 1,
            b'"' => quoted = !quoted,
            b'>' if !quoted => {
                let after = &rest[i + 1..];
                // Parameters must be separated from the path by white space.
                return (after.is_empty() || after.starts_with(WSP)).then_some((&rest[..i], after));
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// `keyword[=value]` pairs separated by white space. A malformed keyword is
/// a syntax error (and never echoed back in a reply).
fn params<'a>(
    rest: &'a str,
    expected: &'static str,
) -> impl Iterator<Item = Result<(&'a str, Option<&'a str>), RequestError>> {
    rest.split(WSP).filter(|p| !p.is_empty()).map(move |p| {
        let (key, value) = match p.split_once('=') {
            Some((key, value)) => (key, Some(value)),
            None => (p, None),
        };
        // esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")
        let ok = key
            .as_bytes()
            .first()
            .is_some_and(u8::is_ascii_alphanumeric)
            && key.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-');
        if ok {
            Ok((key, value))
        } else {
            Err(syntax(expected))
        }
    })
}

fn mail_params(rest: &str) -> Result<MailParams, RequestError> {
    let mut out = MailParams::default();
    for param in params(rest, SYNTAX_MAIL) {
        let (key, value) = param?;
        if key.eq_ignore_ascii_case("SIZE") {
            let size = value
                .filter(|v| !v.is_empty() && v.bytes().all(|c| c.is_ascii_digit()))
                .and_then(|v| v.parse().ok());
            once(&mut out.size, size, "SIZE")?;
        } else if key.eq_ignore_ascii_case("BODY") {
            let body = match value {
                Some(v) if v.eq_ignore_ascii_case("7BIT") => Some(Body::SevenBit),
                Some(v) if v.eq_ignore_ascii_case("8BITMIME") => Some(Body::EightBitMime),
                _ => None,
            };
            once(&mut out.body, body, "BODY")?;
        } else if key.eq_ignore_ascii_case("SMTPUTF8") {
            if value.is_some() || out.smtputf8 {
                return Err(RequestError::BadParamValue("SMTPUTF8"));
            }
            out.smtputf8 = true;
        } else if key.eq_ignore_ascii_case("AUTH") {
            once(&mut out.auth, value.and_then(xtext_decode), "AUTH")?;
        } else if key.eq_ignore_ascii_case("RET") {
            let ret = match value {
                Some(v) if v.eq_ignore_ascii_case("FULL") => Some(Ret::Full),
                Some(v) if v.eq_ignore_ascii_case("HDRS") => Some(Ret::Hdrs),
                _ => None,
            };
            once(&mut out.ret, ret, "RET")?;
        } else if key.eq_ignore_ascii_case("ENVID") {
            // At most 100 characters (RFC 3461 §4.4), counted as sent.
            let envid = value.filter(|v| v.len() <= 100).and_then(xtext_decode);
            once(&mut out.envid, envid, "ENVID")?;
        } else {
            return Err(RequestError::UnsupportedParam(key.to_owned()));
        }
    }
    Ok(out)
}

fn rcpt_params(rest: &str) -> Result<RcptParams, RequestError> {
    let mut out = RcptParams::default();
    for param in params(rest, SYNTAX_RCPT) {
        let (key, value) = param?;
        if key.eq_ignore_ascii_case("NOTIFY") {
            once(&mut out.notify, value.and_then(Notify::parse), "NOTIFY")?;
        } else if key.eq_ignore_ascii_case("ORCPT") {
            once(&mut out.orcpt, value.and_then(Orcpt::parse), "ORCPT")?;
        } else {
            return Err(RequestError::UnsupportedParam(key.to_owned()));
        }
    }
    Ok(out)
}

/// Stores a parameter value: a missing/bad value or a repeat is an error.
fn once<T>(slot: &mut Option<T>, value: Option<T>, name: &'static str) -> Result<(), RequestError> {
    match value {
        Some(v) if slot.is_none() => {
            *slot = Some(v);
            Ok(())
        }
        _ => Err(RequestError::BadParamValue(name)),
    }
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;

    use super::*;
    use crate::config::BareLf;
    use crate::smtp::receiver::LineReceiver;

    fn addr(s: &str) -> Address {
        Address::parse(s, true).unwrap()
    }

    fn mail(from: &str, params: MailParams) -> Request {
        let from = (!from.is_empty()).then(|| addr(from));
        Request::Mail { from, params }
    }

    fn rcpt(to: &str) -> Request {
        Request::Rcpt {
            to: addr(to),
            params: RcptParams::default(),
        }
    }

    #[rustfmt::skip] // one case per line
    fn cases() -> Vec<(&'static [u8], Result<Request, RequestError>)> {
        use RequestError::*;
        let p = MailParams::default;
        let sx = |s: &'static str| -> Result<Request, RequestError> { Err(Syntax { syntax: s }) };
        vec![
            // Verbs, any case.
            (b"EHLO mx.example.test", Ok(Request::Ehlo { host: "mx.example.test".into() })),
            (b"ehlo [192.0.2.1]", Ok(Request::Ehlo { host: "[192.0.2.1]".into() })),
            (b"HeLo  x  ", Ok(Request::Helo { host: "x".into() })),
            (b"EHLO", sx(SYNTAX_EHLO)),
            (b"EHLO   ", sx(SYNTAX_EHLO)),
            (b"DATA", Ok(Request::Data)),
            (b"data ", Ok(Request::Data)),
            (b"DATA x", sx("DATA")),
            (b"RSET", Ok(Request::Rset)),
            (b"QUIT", Ok(Request::Quit)),
            (b"QUIT now", sx("QUIT")),
            (b"NOOP", Ok(Request::Noop)),
            (b"NOOP anything at all", Ok(Request::Noop)),
            (b"HELP MAIL", Ok(Request::Help)),
            (b"STARTTLS", Ok(Request::StartTls)),
            (b"starttls x", sx("STARTTLS")),
            (b"VRFY bob", Ok(Request::Vrfy("bob".into()))),
            (b"VRFY", sx(SYNTAX_VRFY)),
            (b"EXPN staff list", Ok(Request::Expn("staff list".into()))),
            (b"AUTH plain", Ok(Request::Auth { mechanism: "PLAIN".into(), initial: None })),
            (b"AUTH PLAIN AGJvYgBzZWNyZXQ=", Ok(Request::Auth { mechanism: "PLAIN".into(), initial: Some(Secret::new("AGJvYgBzZWNyZXQ=".into())) })),
            (b"AUTH LOGIN =", Ok(Request::Auth { mechanism: "LOGIN".into(), initial: Some(Secret::new("=".into())) })),
            (b"AUTH", sx(SYNTAX_AUTH)),
            (b"AUTH PLAIN a b", sx(SYNTAX_AUTH)),
            (b"AUTH PL@IN", sx(SYNTAX_AUTH)),
            (b"AUTH ABCDEFGHIJKLMNOPQRSTU", sx(SYNTAX_AUTH)),
            (b"BDAT 1000", Ok(Request::Bdat { size: 1000, last: false })),
            (b"bdat 0 last", Ok(Request::Bdat { size: 0, last: true })),
            (b"BDAT", sx(SYNTAX_BDAT)),
            (b"BDAT -1", sx(SYNTAX_BDAT)),
            (b"BDAT 1 LAST x", sx(SYNTAX_BDAT)),
            (b"BDAT 99999999999999999999999", sx(SYNTAX_BDAT)),
            (b"BDAT 1 FIRST", sx(SYNTAX_BDAT)),
            // Unknown verbs are not errors.
            (b"XYZZY plugh", Ok(Request::Unknown("XYZZY".into()))),
            (b"GET / HTTP/1.1", Ok(Request::Unknown("GET".into()))),
            (b"STARTTLSX", Ok(Request::Unknown("STARTTLSX".into()))),
            (b"MAILFROM:<a@b.test>", Ok(Request::Unknown("MAILFROM:<a@b.test>".into()))),
            // Bad bytes and empty lines.
            (b"", Err(Empty)),
            (b"   ", Err(Empty)),
            (b" NOOP", Err(Empty)),
            (b"NO\0OP", Err(BadCharacters)),
            (b"MAIL FROM:<a@b.test>\0", Err(BadCharacters)),
            (b"EHLO \xff", Err(BadCharacters)),
            (b"EHLO a\rb", Err(BadCharacters)),
            (b"EHLO a\x1bb", Err(BadCharacters)),
            (b"EHLO a\x7fb", Err(BadCharacters)),
            // MAIL.
            (b"MAIL FROM:<a@b.test>", Ok(mail("a@b.test", p()))),
            (b"mail from:<a@b.test>", Ok(mail("a@b.test", p()))),
            (b"MAIL FROM: <a@b.test>", Ok(mail("a@b.test", p()))),
            (b"MAIL FROM:<>", Ok(mail("", p()))),
            (b"MAIL FROM:<> SIZE=0", Ok(mail("", MailParams { size: Some(0), ..p() }))),
            (b"MAIL FROM:a@b.test", sx(SYNTAX_MAIL)),
            (b"MAIL FROM:<a@b.test", sx(SYNTAX_MAIL)),
            (b"MAIL FROM:a@b.test>", sx(SYNTAX_MAIL)),
            (b"MAIL FROM <a@b.test>", sx(SYNTAX_MAIL)),
            (b"MAIL TO:<a@b.test>", sx(SYNTAX_MAIL)),
            (b"MAIL", sx(SYNTAX_MAIL)),
            (b"MAIL FROM:<a@b.test>SIZE=1", sx(SYNTAX_MAIL)),
            (b"MAIL FROM:<a@b.test>>", sx(SYNTAX_MAIL)),
            (b"MAIL FROM:<\"a>b\"@b.test>", Ok(mail("\"a>b\"@b.test", p()))),
            (b"MAIL FROM:<\"a\\\">\"@b.test>", Ok(mail("\"a\\\">\"@b.test", p()))),
            (b"MAIL FROM:<a b@b.test>", Err(BadSender(AddressError::Syntax("")))),
            (b"MAIL FROM:<<a@b.test>", Err(BadSender(AddressError::Syntax("")))),
            (b"MAIL FROM:<<a@b.test>>", sx(SYNTAX_MAIL)),
            (b"MAIL FROM:<a@b.test> SIZE=12345 BODY=8BITMIME", Ok(mail("a@b.test", MailParams { size: Some(12345), body: Some(Body::EightBitMime), ..p() }))),
            (b"MAIL FROM:<a@b.test>  size=1\tbody=7bit ", Ok(mail("a@b.test", MailParams { size: Some(1), body: Some(Body::SevenBit), ..p() }))),
            (b"MAIL FROM:<a@b.test> SIZE=", Err(BadParamValue("SIZE"))),
            (b"MAIL FROM:<a@b.test> SIZE", Err(BadParamValue("SIZE"))),
            (b"MAIL FROM:<a@b.test> SIZE=+1", Err(BadParamValue("SIZE"))),
            (b"MAIL FROM:<a@b.test> SIZE=99999999999999999999999", Err(BadParamValue("SIZE"))),
            (b"MAIL FROM:<a@b.test> SIZE=1 SIZE=2", Err(BadParamValue("SIZE"))),
            (b"MAIL FROM:<a@b.test> BODY=BINARYMIME", Err(BadParamValue("BODY"))),
            (b"MAIL FROM:<a@b.test> SMTPUTF8=yes", Err(BadParamValue("SMTPUTF8"))),
            (b"MAIL FROM:<a@b.test> AUTH=<>", Ok(mail("a@b.test", MailParams { auth: Some("<>".into()), ..p() }))),
            (b"MAIL FROM:<a@b.test> AUTH=x+2By@b.test", Ok(mail("a@b.test", MailParams { auth: Some("x+y@b.test".into()), ..p() }))),
            (b"MAIL FROM:<a@b.test> AUTH=x+0Ay", Err(BadParamValue("AUTH"))),
            (b"MAIL FROM:<a@b.test> AUTH=x+2", Err(BadParamValue("AUTH"))),
            (b"MAIL FROM:<a@b.test> RET=HDRS ENVID=QQ314159", Ok(mail("a@b.test", MailParams { ret: Some(Ret::Hdrs), envid: Some("QQ314159".into()), ..p() }))),
            (b"MAIL FROM:<a@b.test> ret=full envid=a+2Bb+3Dc", Ok(mail("a@b.test", MailParams { ret: Some(Ret::Full), envid: Some("a+b=c".into()), ..p() }))),
            (b"MAIL FROM:<a@b.test> RET=ALL", Err(BadParamValue("RET"))),
            (b"MAIL FROM:<a@b.test> RET", Err(BadParamValue("RET"))),
            (b"MAIL FROM:<a@b.test> RET=FULL RET=HDRS", Err(BadParamValue("RET"))),
            (b"MAIL FROM:<a@b.test> ENVID=", Err(BadParamValue("ENVID"))),
            (b"MAIL FROM:<a@b.test> ENVID=a+0Ab", Err(BadParamValue("ENVID"))),
            (b"MAIL FROM:<a@b.test> ENVID=x ENVID=y", Err(BadParamValue("ENVID"))),
            (b"MAIL FROM:<a@b.test> NOTIFY=NEVER", Err(UnsupportedParam("NOTIFY".into()))),
            (b"MAIL FROM:<a@b.test> X-FOO=1", Err(UnsupportedParam("X-FOO".into()))),
            (b"MAIL FROM:<a@b.test> REQUIRETLS", Err(UnsupportedParam("REQUIRETLS".into()))),
            (b"MAIL FROM:<a@b.test> =1", sx(SYNTAX_MAIL)),
            (b"MAIL FROM:<a@b.test> X<Y>=1", sx(SYNTAX_MAIL)),
            // Addresses: limits and UTF-8.
            (b"MAIL FROM:<j\xc3\xb6rg@b.test>", Err(BadSender(AddressError::NonAscii))),
            (b"MAIL FROM:<j\xc3\xb6rg@b.test> SMTPUTF8", Ok(mail("jörg@b.test", MailParams { smtputf8: true, ..p() }))),
            (b"MAIL FROM:<a@b.test> SMTPUTF8 SMTPUTF8", Err(BadParamValue("SMTPUTF8"))),
            (b"MAIL FROM:<@relay.test:a@b.test>", Ok(Request::Mail { from: Some(Address::parse("@relay.test:a@b.test", false).unwrap()), params: p() })),
            // RCPT.
            (b"RCPT TO:<c@d.test>", Ok(rcpt("c@d.test"))),
            (b"rcpt to: <c@d.test>", Ok(rcpt("c@d.test"))),
            (b"RCPT TO:<Postmaster>", Ok(rcpt("postmaster"))),
            (b"RCPT TO:<>", Err(BadRecipient(AddressError::Empty))),
            (b"RCPT TO:c@d.test", sx(SYNTAX_RCPT)),
            (b"RCPT FROM:<c@d.test>", sx(SYNTAX_RCPT)),
            (b"RCPT TO:<c@d.test@e.test>", Ok(rcpt("c@d.test@e.test"))),
            (b"RCPT TO:<c%d.test@e.test>", Ok(rcpt("c%d.test@e.test"))),
            (b"RCPT TO:<c@d..test>", Err(BadRecipient(AddressError::Syntax("")))),
            (b"RCPT TO:<j\xc3\xb6rg@d.test>", Ok(rcpt("jörg@d.test"))),
            (b"RCPT TO:<c@d.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;c+40d.test", Ok(Request::Rcpt {
                to: addr("c@d.test"),
                params: RcptParams {
                    notify: Some(Notify { success: true, failure: true, delay: false }),
                    orcpt: Some(Orcpt { addr_type: "rfc822".into(), address: "c@d.test".into() }),
                },
            })),
            (b"RCPT TO:<c@d.test> notify=never", Ok(Request::Rcpt {
                to: addr("c@d.test"),
                params: RcptParams { notify: Some(Notify { success: false, failure: false, delay: false }), orcpt: None },
            })),
            (b"RCPT TO:<c@d.test> NOTIFY=NEVER,DELAY", Err(BadParamValue("NOTIFY"))),
            (b"RCPT TO:<c@d.test> NOTIFY=", Err(BadParamValue("NOTIFY"))),
            (b"RCPT TO:<c@d.test> NOTIFY=DELAY NOTIFY=DELAY", Err(BadParamValue("NOTIFY"))),
            (b"RCPT TO:<c@d.test> ORCPT=rfc822;", Err(BadParamValue("ORCPT"))),
            (b"RCPT TO:<c@d.test> RET=FULL", Err(UnsupportedParam("RET".into()))),
            (b"RCPT TO:<c@d.test> ORCPT=c@d.test", Err(BadParamValue("ORCPT"))),
            (b"RCPT TO:<c@d.test> SIZE=1", Err(UnsupportedParam("SIZE".into()))),
        ]
    }

    /// Syntax errors carry a description for logs; compare only the kind.
    fn same(a: &Result<Request, RequestError>, b: &Result<Request, RequestError>) -> bool {
        match (a, b) {
            (Err(RequestError::BadSender(x)), Err(RequestError::BadSender(y)))
            | (Err(RequestError::BadRecipient(x)), Err(RequestError::BadRecipient(y))) => {
                std::mem::discriminant(x) == std::mem::discriminant(y)
            }
            _ => a == b,
        }
    }

    #[test]
    fn table() {
        for (line, want) in cases() {
            let got = Request::parse(line);
            assert!(
                same(&got, &want),
                "{:?}: got {got:?}, want {want:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    /// All table lines pipelined in one stream, framed by a LineReceiver fed
    /// whole, byte by byte and in pseudo-random splits: same requests.
    #[test]
    fn pipelined_in_fragments() {
        let cases = cases();
        let mut stream = Vec::new();
        for (line, _) in &cases {
            stream.extend_from_slice(line);
            stream.extend_from_slice(b"\r\n");
        }
        let mut seed = 0x2545_F491_4F6C_DD1D_u64;
        let mut sizes = vec![stream.len(), 1];
        for _ in 0..10 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            sizes.push(1 + (seed % 23) as usize);
        }
        for size in sizes {
            let mut rx = LineReceiver::new(512, BareLf::Normalize);
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for chunk in stream.chunks(size) {
                buf.extend_from_slice(chunk);
                while let Some(line) = rx.next_line(&mut buf).unwrap() {
                    got.push(Request::parse(&line));
                }
            }
            assert_eq!(got.len(), cases.len(), "chunks of {size}");
            for (g, (line, want)) in got.iter().zip(&cases) {
                assert!(
                    same(g, want),
                    "{:?} in chunks of {size}: {g:?}",
                    String::from_utf8_lossy(line)
                );
            }
        }
    }

    #[test]
    fn replies() {
        let reply = |line: &[u8]| Request::parse(line).unwrap_err().reply().to_string();
        #[rustfmt::skip] // one case per line
        let cases: &[(&[u8], &str)] = &[
            (b"MAIL FROM:a@b", "501 5.5.2 Syntax: MAIL FROM:<address>"),
            (b"RCPT TO:", "501 5.5.2 Syntax: RCPT TO:<address>"),
            (b"MAIL FROM:<a b@c>", "501 5.1.7 Bad sender address syntax"),
            (b"RCPT TO:<a b@c>", "501 5.1.3 Bad recipient address syntax"),
            (b"RCPT TO:<>", "501 5.1.3 Bad recipient address syntax"),
            (b"MAIL FROM:<\xc3\xa9@c>", "553 5.6.7 Must declare SMTPUTF8 to send Unicode address"),
            (b"MAIL FROM:<a@b> FOO=1", "555 5.5.4 Unsupported option: FOO"),
            (b"MAIL FROM:<a@b> SIZE=x", "501 5.5.4 Bad SIZE parameter"),
            (b"MAIL FROM:<a@b> RET=ALL", "501 5.5.4 Bad RET parameter"),
            (b"RCPT TO:<a@b> NOTIFY=NEVER,SUCCESS", "501 5.5.4 Bad NOTIFY parameter"),
            (b"RCPT TO:<a@b> X-DSN=1", "555 5.5.4 Unsupported option: X-DSN"),
            (b"\0", "500 5.5.2 Error: invalid character in command"),
            (b"NOOP \xc3", "500 5.5.2 Error: invalid character in command"),
            (b"", "500 5.5.2 Error: bad syntax"),
        ];
        for (line, want) in cases {
            assert_eq!(&reply(line), want, "{:?}", String::from_utf8_lossy(line));
        }
        let long = format!("MAIL FROM:<{}@b.test>", "a".repeat(65));
        assert_eq!(
            reply(long.as_bytes()),
            "501 5.1.7 Bad sender address syntax: local part longer than 64 octets"
        );
        let long = format!("RCPT TO:<a@{}.test>", "b.".repeat(130));
        assert_eq!(
            reply(long.as_bytes()),
            "501 5.1.3 Bad recipient address syntax: domain longer than 255 octets"
        );
        assert_eq!(RequestError::NonAsciiRecipient.reply().code, 553);
    }

    /// Issue 9 point 10 and issue 15: what the command log shows.
    #[test]
    fn loggable_hides_auth_payloads_and_escapes() {
        let long = format!("MAIL FROM:<{}@example.test>", "a".repeat(80));
        let cut = format!("{} …", &long[..64]);
        let cases: &[(&[u8], &str)] = &[
            (b"EHLO client.test", "EHLO client.test"),
            (
                b"AUTH PLAIN AGRhdmVAdHdvLnRlc3QAaHVudGVyMg==",
                "AUTH PLAIN …",
            ),
            (b"auth\tlogin  ZGF2ZQ==", "auth\\x09login …"),
            (b"AUTH LOGIN", "AUTH LOGIN"),
            (b"AUTH PLAIN =", "AUTH PLAIN …"),
            (b"AUTHX PLAIN AGRhdmU=", "<unknown command, 20 octets>"),
            // A SASL response sent as a command: only its length.
            (b"aHVudGVyMg==", "<unknown command, 12 octets>"),
            (b"HELO a\rb\x00", "HELO a\\x0db\\x00"),
            (long.as_bytes(), &cut),
        ];
        for (line, want) in cases {
            assert_eq!(
                loggable(line).to_string(),
                *want,
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
        // Nor does Debug show the payload.
        let request = Request::parse(b"AUTH PLAIN AGRhdmVAdHdvLnRlc3QAaHVudGVyMg==").unwrap();
        assert!(!format!("{request:?}").contains("AGRhdm"), "{request:?}");
    }
}
