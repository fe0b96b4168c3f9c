//! Strict RFC 5321 §4.1.2 mailbox parsing (with RFC 6531 UTF-8), and the
//! checks that keep `%`-hacks, bang paths and source routes from relaying.
//!
//! The grammar accepted, inside the angle brackets of a path:
//!
//! ```text
//! Path-content = [ A-d-l ":" ] Mailbox / "postmaster"          ; any case
//! A-d-l        = "@" Domain *( "," "@" Domain )                ; source route
//! Mailbox      = Local-part "@" ( Domain / address-literal )
//! Local-part   = Dot-string *( "@" Dot-string ) / Quoted-string
//! ```
//!
//! The `*( "@" Dot-string )` is a deliberate leniency: `user@remote@local`
//! parses (local part `user@remote`) so that the router can refuse it with
//! `554 5.7.1 Relay access denied` rather than a syntax error that invites the
//! client to try another spelling. [`Address::names_another_host`] is true for
//! it.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

/// RFC 5321 §4.5.3.1.1.
pub const MAX_LOCAL_PART: usize = 64;
/// RFC 5321 §4.5.3.1.2.
pub const MAX_DOMAIN: usize = 255;
/// RFC 5321 §4.5.3.1.3, angle brackets included.
pub const MAX_PATH: usize = 256;
/// RFC 1035 §2.3.4, for ASCII labels (a U-label's limit is on its A-label,
/// which this module does not compute).
const MAX_LABEL: usize = 63;

/// A mailbox from a `MAIL FROM` or `RCPT TO` path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Address {
    /// The local part with quoting removed: `"a b"@x` has local part `a b`.
    pub local_part: String,
    /// The domain as given (case kept), or an address literal with its
    /// brackets (`[192.0.2.1]`, `[IPv6:2001:db8::1]`). Empty only for the
    /// bare `postmaster` recipient, which the session qualifies with a local
    /// domain.
    pub domain: String,
    /// Source route domains (`@a,@b:` → `["a", "b"]`), recorded and otherwise
    /// ignored, as RFC 5321 §4.1.1.3 and appendix C allow.
    route: Vec<String>,
}

/// Why a path is not a usable mailbox. Each maps to one reply in
/// [`crate::smtp::request::RequestError::reply`].
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AddressError {
    /// `<>` where a mailbox is needed.
    #[error("empty address")]
    Empty,
    /// Not RFC 5321 syntax; the text says what was wrong, for logs.
    #[error("address syntax: {0}")]
    Syntax(&'static str),
    /// The local part exceeds [`MAX_LOCAL_PART`].
    #[error("local part longer than 64 octets")]
    LocalPartTooLong,
    /// The domain exceeds [`MAX_DOMAIN`].
    #[error("domain longer than 255 octets")]
    DomainTooLong,
    /// The whole path exceeds [`MAX_PATH`].
    #[error("path longer than 256 octets")]
    PathTooLong,
    /// A UTF-8 address in a transaction not declared `SMTPUTF8`.
    #[error("non-ASCII address without SMTPUTF8")]
    NonAscii,
}

type Result<T> = std::result::Result<T, AddressError>;

impl Address {
    /// Parses what was inside `<...>` (without the brackets).
    ///
    /// `smtputf8` allows UTF-8 in the local part and domain (RFC 6531; the
    /// `MAIL` command carried `SMTPUTF8`). A source route `@a,@b:user@c` is
    /// accepted and recorded (RFC 5321 says servers must accept and may
    /// ignore it). `user@remote@local` parses leniently, see the module docs.
    ///
    /// Special case: a bare `postmaster` in any case (RFC 5321 §4.1.1.3,
    /// `RCPT TO:<Postmaster>`) parses to local part `postmaster` and an empty
    /// domain; the caller substitutes its own domain.
    ///
    /// Lengths are measured on the wire form: the local part with its quotes
    /// and escapes, the path with its angle brackets.
    ///
    /// # Errors
    ///
    /// [`AddressError::Empty`] for `""` (the null path `<>` is the `MAIL`
    /// parser's business), [`AddressError::NonAscii`] for UTF-8 without
    /// `smtputf8`, otherwise the syntax or length limit that failed. Syntax
    /// is checked before lengths, except that a domain over 255 octets is
    /// refused before its labels are looked at.
    pub fn parse(s: &str, smtputf8: bool) -> Result<Address> {
        if s.is_empty() {
            return Err(AddressError::Empty);
        }
        // Checked up front so that every later byte >= 0x80 is known to be
        // allowed; the input is a &str, so such bytes form valid UTF-8.
        if !smtputf8 && !s.is_ascii() {
            return Err(AddressError::NonAscii);
        }
        if s.eq_ignore_ascii_case("postmaster") {
            return Ok(Address {
                local_part: "postmaster".to_owned(),
                domain: String::new(),
                route: Vec::new(),
            });
        }
        let b = s.as_bytes();

        let mut route = Vec::new();
        let mut local_start = 0;
        if b[0] == b'@' {
            let Some(colon) = memchr::memchr(b':', b) else {
                return Err(AddressError::Syntax("source route without ':'"));
            };
            for hop in s[..colon].split(',') {
                let Some(domain) = hop.strip_prefix('@') else {
                    return Err(AddressError::Syntax("source route hop without '@'"));
                };
                check_domain_name(domain)?;
                route.push(domain.to_owned());
            }
            local_start = colon + 1;
        }

        // The domain follows the last '@', except that an address literal
        // may be a General-address-literal containing '@'; those are refused
        // below anyway, but finding the '[' keeps the error message right.
        let at = if b.ends_with(b"]") {
            match memchr::memrchr(b'[', b) {
                Some(lb) if lb > local_start && b[lb - 1] == b'@' => lb - 1,
                _ => return Err(AddressError::Syntax("bad address literal")),
            }
        } else {
            match memchr::memrchr(b'@', &b[local_start..]) {
                Some(i) => local_start + i,
                None => return Err(AddressError::Syntax("no '@' and domain")),
            }
        };
        let local = &s[local_start..at];
        let domain = &s[at + 1..];

        let local_part = if local.starts_with('"') {
            unquote(local)?
        } else {
            check_dot_strings(local)?;
            local.to_owned()
        };
        if domain.starts_with('[') {
            check_address_literal(domain)?;
        } else {
            check_domain_name(domain)?;
        }

        // The lenient `user@remote@local` is not a Dot-string: Display (and
        // so every copy of the address that is stored, logged or relayed)
        // writes it quoted. Its quotes count towards the limits, so that
        // every address that parses prints as one that parses again (found
        // by the `address` fuzz target: a 63-octet `a@b` local part printed
        // as 65 octets).
        let quotes = if !local.starts_with('"') && local.contains('@') {
            2
        } else {
            0
        };
        if local.len() + quotes > MAX_LOCAL_PART {
            return Err(AddressError::LocalPartTooLong);
        }
        if domain.len() > MAX_DOMAIN {
            return Err(AddressError::DomainTooLong);
        }
        if s.len() + quotes + 2 > MAX_PATH {
            return Err(AddressError::PathTooLong);
        }
        Ok(Address {
            local_part,
            domain: domain.to_owned(),
            route,
        })
    }

    /// True when the address names another host than its domain: a source
    /// route, `%` or `!` in the local part, or `@` in it (quoted, or the
    /// lenient `user@remote@local`). Such an address asks this server to
    /// forward to a host other than the one in its domain, so the router
    /// refuses it for clients that may not relay (no open relay via
    /// `%`-hacks or bang paths) and does not relay it for anyone.
    pub fn names_another_host(&self) -> bool {
        !self.route.is_empty()
            || memchr::memchr3(b'%', b'!', b'@', self.local_part.as_bytes()).is_some()
    }

    /// Lower-case `local@domain` for lookups: the [`Display`](fmt::Display)
    /// form lower-cased, so `"Joe"@X.test` and `joe@x.test` are the same key.
    pub fn canonical(&self) -> String {
        let mut s = self.to_string();
        if s.is_ascii() {
            s.make_ascii_lowercase();
            s
        } else {
            s.to_lowercase()
        }
    }

    /// The source route given before the mailbox, if any (`@a,@b:` → `a`, `b`).
    pub fn source_route(&self) -> &[String] {
        &self.route
    }

    /// Whether the address contains UTF-8, so that using it needs a
    /// transaction declared `SMTPUTF8` (`553 5.6.7` otherwise). `RCPT`
    /// addresses are parsed allowing UTF-8 because the request parser does
    /// not know the transaction; the session checks this.
    pub fn needs_smtputf8(&self) -> bool {
        !self.local_part.is_ascii()
            || !self.domain.is_ascii()
            || self.route.iter().any(|d| !d.is_ascii())
    }
}

impl fmt::Display for Address {
    /// `local@domain`, the local part quoted when it is not a Dot-string; the
    /// source route is left out. The bare postmaster shows as `postmaster`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if is_dot_string(&self.local_part) {
            f.write_str(&self.local_part)?;
        } else {
            f.write_str("\"")?;
            let mut rest = self.local_part.as_str();
            while let Some(i) = rest.find(['"', '\\']) {
                f.write_str(&rest[..i])?;
                f.write_str("\\")?;
                f.write_str(&rest[i..i + 1])?;
                rest = &rest[i + 1..];
            }
            f.write_str(rest)?;
            f.write_str("\"")?;
        }
        if !self.domain.is_empty() {
            f.write_str("@")?;
            f.write_str(&self.domain)?;
        }
        Ok(())
    }
}

/// RFC 5322 atext, plus UTF-8 (RFC 6531); the caller has already refused
/// UTF-8 when it is not allowed.
fn is_atext(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&c) || c >= 0x80
}

/// `Atom *("." Atom)`.
fn is_dot_string(s: &str) -> bool {
    !s.is_empty()
        && s.split('.')
            .all(|atom| !atom.is_empty() && atom.bytes().all(is_atext))
}

/// `Dot-string *("@" Dot-string)`: the unquoted local part, lenient about
/// `@` so that `user@remote@local` reaches the relay check.
fn check_dot_strings(local: &str) -> Result<()> {
    if local.is_empty() {
        return Err(AddressError::Syntax("empty local part"));
    }
    if local.split('@').all(is_dot_string) {
        Ok(())
    } else {
        Err(AddressError::Syntax("bad local part"))
    }
}

/// `DQUOTE *QcontentSMTP DQUOTE`, returning the content without quoting.
fn unquote(quoted: &str) -> Result<String> {
    let b = quoted.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 1;
    loop {
        match b.get(i) {
            None => return Err(AddressError::Syntax("unterminated quoted string")),
            Some(b'"') => break,
            // quoted-pairSMTP: backslash, then any printable ASCII or space.
            Some(b'\\') => match b.get(i + 1) {
                Some(&c @ 32..=126) => {
                    out.push(c);
                    i += 2;
                }
                _ => return Err(AddressError::Syntax("bad quoted pair")),
            },
            // qtextSMTP: printable ASCII or space except '"' and '\' (UTF-8
            // allowed by RFC 6531).
            Some(&c) if (32..=126).contains(&c) || c >= 0x80 => {
                out.push(c);
                i += 1;
            }
            Some(_) => return Err(AddressError::Syntax("control character in quoted string")),
        }
    }
    if i + 1 != b.len() {
        return Err(AddressError::Syntax("text after quoted local part"));
    }
    // Only ASCII bytes were removed, at ASCII positions, so this stays UTF-8;
    // the fallback keeps this function panic-free if that ever changes.
    String::from_utf8(out).map_err(|_| AddressError::Syntax("bad UTF-8 in quoted string"))
}

/// `sub-domain *("." sub-domain)`, `sub-domain = Let-dig [Ldh-str]`, with
/// U-labels (any UTF-8) allowed by RFC 6531.
fn check_domain_name(domain: &str) -> Result<()> {
    if domain.is_empty() {
        return Err(AddressError::Syntax("empty domain"));
    }
    if domain.len() > MAX_DOMAIN {
        // Checked here too so that source-route hops cannot be huge.
        return Err(AddressError::DomainTooLong);
    }
    for label in domain.split('.') {
        let l = label.as_bytes();
        let let_dig = |c: u8| c.is_ascii_alphanumeric() || c >= 0x80;
        match (l.first(), l.last()) {
            (Some(&first), Some(&last)) if let_dig(first) && let_dig(last) => {}
            _ => return Err(AddressError::Syntax("bad domain label")),
        }
        if !l.iter().all(|&c| let_dig(c) || c == b'-') {
            return Err(AddressError::Syntax("bad character in domain"));
        }
        if l.len() > MAX_LABEL && label.is_ascii() {
            return Err(AddressError::Syntax("domain label longer than 63 octets"));
        }
    }
    Ok(())
}

/// `[IPv4]` or `[IPv6:addr]`. General-address-literals (`[tag:...]`) are
/// refused: IANA has registered no tag besides IPv6, so nothing could
/// deliver to one.
fn check_address_literal(literal: &str) -> Result<()> {
    let Some(inner) = literal.strip_prefix('[').and_then(|l| l.strip_suffix(']')) else {
        return Err(AddressError::Syntax("bad address literal"));
    };
    let ok = match inner.get(..5) {
        Some(tag) if tag.eq_ignore_ascii_case("IPv6:") => inner[5..].parse::<Ipv6Addr>().is_ok(),
        // std refuses leading zeros and short forms, as RFC 5321's
        // Snum "." Snum "." Snum "." Snum does in spirit.
        _ => inner.parse::<Ipv4Addr>().is_ok(),
    };
    if ok {
        Ok(())
    } else {
        Err(AddressError::Syntax("bad address literal"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Expected outcome: local part, domain, names_another_host, Display.
    type Want = std::result::Result<(&'static str, &'static str, bool, &'static str), AddressError>;

    fn check(input: &str, utf8: bool, want: Want) {
        let got = Address::parse(input, utf8);
        match (&got, &want) {
            (Ok(a), Ok((local, domain, another, shown))) => {
                assert_eq!(a.local_part, *local, "local part of {input:?}");
                assert_eq!(a.domain, *domain, "domain of {input:?}");
                assert_eq!(
                    a.names_another_host(),
                    *another,
                    "another host for {input:?}"
                );
                assert_eq!(a.to_string(), *shown, "display of {input:?}");
                // What Display prints must parse back to the same mailbox
                // (minus the source route, which Display leaves out).
                if !a.domain.is_empty() {
                    let again = Address::parse(&a.to_string(), utf8).unwrap();
                    assert_eq!(again.local_part, a.local_part, "round trip of {input:?}");
                    assert_eq!(again.domain, a.domain, "round trip of {input:?}");
                }
            }
            (Err(e), Err(w)) => assert_eq!(
                std::mem::discriminant(e),
                std::mem::discriminant(w),
                "{input:?}: got {e:?}, want {w:?}"
            ),
            _ => panic!("{input:?} (smtputf8={utf8}): got {got:?}, want {want:?}"),
        }
    }

    const SYNTAX: AddressError = AddressError::Syntax("");

    #[test]
    fn table() {
        #[rustfmt::skip] // one case per line
        let cases: &[(&str, bool, Want)] = &[
            // Plain mailboxes.
            ("user@example.test", false, Ok(("user", "example.test", false, "user@example.test"))),
            ("First.Last@Example.TEST", false, Ok(("First.Last", "Example.TEST", false, "First.Last@Example.TEST"))),
            ("a+tag=x/y{z}~@a-b.c9", false, Ok(("a+tag=x/y{z}~", "a-b.c9", false, "a+tag=x/y{z}~@a-b.c9"))),
            ("u@localhost", false, Ok(("u", "localhost", false, "u@localhost"))),
            ("u@123.example", false, Ok(("u", "123.example", false, "u@123.example"))),
            // Postmaster without a domain (RFC 5321 §4.1.1.3), any case.
            ("Postmaster", false, Ok(("postmaster", "", false, "postmaster"))),
            ("POSTMASTER", false, Ok(("postmaster", "", false, "postmaster"))),
            ("postmaster@example.test", false, Ok(("postmaster", "example.test", false, "postmaster@example.test"))),
            ("postmasterx", false, Err(SYNTAX)),
            // Empty and missing parts.
            ("", false, Err(AddressError::Empty)),
            ("user", false, Err(SYNTAX)),
            ("user@", false, Err(SYNTAX)),
            ("@example.test", false, Err(SYNTAX)),
            ("user@example.test.", false, Err(SYNTAX)),
            ("user@.example.test", false, Err(SYNTAX)),
            ("user@exa..mple", false, Err(SYNTAX)),
            ("user@-ex.test", false, Err(SYNTAX)),
            ("user@ex-.test", false, Err(SYNTAX)),
            ("user@ex_ample.test", false, Err(SYNTAX)),
            ("user@ex ample.test", false, Err(SYNTAX)),
            ("<user@example.test>", false, Err(SYNTAX)),
            // Dot-string rules.
            (".user@example.test", false, Err(SYNTAX)),
            ("user.@example.test", false, Err(SYNTAX)),
            ("us..er@example.test", false, Err(SYNTAX)),
            ("us er@example.test", false, Err(SYNTAX)),
            ("us\"er@example.test", false, Err(SYNTAX)),
            ("us(er)@example.test", false, Err(SYNTAX)),
            ("us\ter@example.test", false, Err(SYNTAX)),
            ("us\0er@example.test", false, Err(SYNTAX)),
            // Quoted strings, with escapes; Display re-quotes only when needed.
            ("\"user\"@example.test", false, Ok(("user", "example.test", false, "user@example.test"))),
            ("\"john smith\"@example.test", false, Ok(("john smith", "example.test", false, "\"john smith\"@example.test"))),
            (r#""a\"b\\c"@example.test"#, false, Ok((r#"a"b\c"#, "example.test", false, r#""a\"b\\c"@example.test"#))),
            (r#""\a\ b"@example.test"#, false, Ok(("a b", "example.test", false, "\"a b\"@example.test"))),
            ("\"..\"@example.test", false, Ok(("..", "example.test", false, "\"..\"@example.test"))),
            ("\"\"@example.test", false, Ok(("", "example.test", false, "\"\"@example.test"))),
            ("\"unterminated@example.test", false, Err(SYNTAX)),
            ("\"a\"b@example.test", false, Err(SYNTAX)),
            ("\"a\"\"b\"@example.test", false, Err(SYNTAX)),
            ("\"a\\\"@example.test", false, Err(SYNTAX)),
            ("\"a\tb\"@example.test", false, Err(SYNTAX)),
            ("\"a\\\tb\"@example.test", false, Err(SYNTAX)),
            ("\"a\"@b@example.test", false, Err(SYNTAX)),
            // Address literals.
            ("u@[192.0.2.1]", false, Ok(("u", "[192.0.2.1]", false, "u@[192.0.2.1]"))),
            ("u@[IPv6:2001:db8::1]", false, Ok(("u", "[IPv6:2001:db8::1]", false, "u@[IPv6:2001:db8::1]"))),
            ("u@[ipv6:::1]", false, Ok(("u", "[ipv6:::1]", false, "u@[ipv6:::1]"))),
            ("u@[IPv6:::ffff:192.0.2.1]", false, Ok(("u", "[IPv6:::ffff:192.0.2.1]", false, "u@[IPv6:::ffff:192.0.2.1]"))),
            ("u@[192.0.2.256]", false, Err(SYNTAX)),
            ("u@[192.0.2]", false, Err(SYNTAX)),
            ("u@[192.0.2.01]", false, Err(SYNTAX)),
            ("u@[2001:db8::1]", false, Err(SYNTAX)),
            ("u@[IPv6:2001:db8::g]", false, Err(SYNTAX)),
            ("u@[x-tag:a@b]", false, Err(SYNTAX)),
            ("u@[192.0.2.1", false, Err(SYNTAX)),
            ("u@192.0.2.1]", false, Err(SYNTAX)),
            ("u[192.0.2.1]", false, Err(SYNTAX)),
            // Relay hacks: they parse, and name another host.
            ("user%remote.test@example.test", false, Ok(("user%remote.test", "example.test", true, "user%remote.test@example.test"))),
            ("remote.test!user@example.test", false, Ok(("remote.test!user", "example.test", true, "remote.test!user@example.test"))),
            ("user@remote.test@example.test", false, Ok(("user@remote.test", "example.test", true, "\"user@remote.test\"@example.test"))),
            ("\"user@remote.test\"@example.test", false, Ok(("user@remote.test", "example.test", true, "\"user@remote.test\"@example.test"))),
            ("\"user%remote\"@example.test", false, Ok(("user%remote", "example.test", true, "user%remote@example.test"))),
            ("a@b@c@example.test", false, Ok(("a@b@c", "example.test", true, "\"a@b@c\"@example.test"))),
            ("user@@example.test", false, Err(SYNTAX)),
            ("user@remote..test@example.test", false, Err(SYNTAX)),
            // Source routes: accepted, recorded, left out of Display.
            ("@relay.test:user@example.test", false, Ok(("user", "example.test", true, "user@example.test"))),
            ("@a.test,@b.test:user@example.test", false, Ok(("user", "example.test", true, "user@example.test"))),
            ("@a.test,b.test:user@example.test", false, Err(SYNTAX)),
            ("@a.test:", false, Err(SYNTAX)),
            ("@a.test", false, Err(SYNTAX)),
            ("@:user@example.test", false, Err(SYNTAX)),
            ("@a..test:user@example.test", false, Err(SYNTAX)),
            ("@a.test;user@example.test", false, Err(SYNTAX)),
            // Non-ASCII: only with SMTPUTF8.
            ("jörg@example.test", false, Err(AddressError::NonAscii)),
            ("user@bücher.example", false, Err(AddressError::NonAscii)),
            ("\"jö rg\"@example.test", false, Err(AddressError::NonAscii)),
            ("jörg@example.test", true, Ok(("jörg", "example.test", false, "jörg@example.test"))),
            ("用户@例子.广告", true, Ok(("用户", "例子.广告", false, "用户@例子.广告"))),
            ("\"jö rg\"@example.test", true, Ok(("jö rg", "example.test", false, "\"jö rg\"@example.test"))),
            ("\"\\ö\"@example.test", true, Err(SYNTAX)),
            ("jörg@exa mple", true, Err(SYNTAX)),
        ];
        for (input, utf8, want) in cases {
            check(input, *utf8, want.clone());
        }
    }

    #[test]
    fn length_limits() {
        // A domain of exactly n octets: a short first label, then 10-octet labels.
        let dom = |n: usize| -> String {
            let m = (n - 1) / 11;
            format!("{}{}", "b".repeat(n - 11 * m), ".aaaaaaaaaa".repeat(m))
        };
        let d255 = dom(255);
        let d256 = dom(256);
        assert_eq!((d255.len(), d256.len()), (255, 256));
        let local = |n: usize| "l".repeat(n);
        let quoted = |n: usize| format!("\"{}\"", "q".repeat(n - 2));

        let ok = |s: &str| assert!(Address::parse(s, false).is_ok(), "{s} ({} octets)", s.len());
        let err = |s: &str, e: AddressError| {
            assert_eq!(Address::parse(s, false), Err(e), "{} octets", s.len())
        };

        ok(&format!("{}@x.test", local(64)));
        err(
            &format!("{}@x.test", local(65)),
            AddressError::LocalPartTooLong,
        );
        // Quotes count: the limit is on the local part as sent.
        ok(&format!("{}@x.test", quoted(64)));
        err(
            &format!("{}@x.test", quoted(65)),
            AddressError::LocalPartTooLong,
        );
        // A 255-octet domain is fine as a domain, but no mailbox with it fits
        // in a 256-octet path; 256 octets is too long as a domain.
        err(&format!("u@{d255}"), AddressError::PathTooLong);
        err(&format!("u@{d256}"), AddressError::DomainTooLong);
        // The path limit includes the angle brackets: 254 octets inside.
        let d = dom(254 - 1 - 64);
        ok(&format!("{}@{d}", local(64)));
        err(&format!("{}@{d}a", local(64)), AddressError::PathTooLong);
        // `user@remote@local` counts as written back, quoted (a fuzzer find:
        // the 63-octet local part below used to print as 65 octets).
        let lenient = format!("{}@{}@f", "a".repeat(31), "b".repeat(31));
        err(&lenient, AddressError::LocalPartTooLong);
        ok(&format!("{}@{}@f", "a".repeat(30), "b".repeat(31)));
        err(
            "#f`````'~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~H0`2'.H5@2``@f",
            AddressError::LocalPartTooLong,
        );
        let d = dom(254 - 1 - 62 - 2);
        ok(&format!("{}@{}@{d}", local(30), local(31)));
        err(
            &format!("{}@{}@{d}a", local(30), local(31)),
            AddressError::PathTooLong,
        );
        // Labels longer than 63 octets are not DNS names.
        let long_label = format!("u@{}.test", "a".repeat(64));
        assert!(matches!(
            Address::parse(&long_label, false),
            Err(AddressError::Syntax(_))
        ));
        // Source route hops count towards the path.
        err(
            &format!("@{}:u@x.test", dom(250)),
            AddressError::PathTooLong,
        );
    }

    #[test]
    fn canonical_and_route() {
        let a = Address::parse("@A.test,@b.TEST:\"Joe\"@X.Test", false).unwrap();
        assert_eq!(a.canonical(), "joe@x.test");
        assert_eq!(a.source_route(), ["A.test", "b.TEST"]);
        let b = Address::parse("\"John Smith\"@X.test", false).unwrap();
        assert_eq!(b.canonical(), "\"john smith\"@x.test");
        let c = Address::parse("Jörg@Bücher.Example", true).unwrap();
        assert_eq!(c.canonical(), "jörg@bücher.example");
        assert!(c.needs_smtputf8());
        assert!(!a.needs_smtputf8());
        assert_eq!(
            Address::parse("Postmaster", false).unwrap().canonical(),
            "postmaster"
        );
    }
}
