//! The ESMTP parameters a message carries from `MAIL`/`RCPT` to its delivery
//! and its notifications: DSN (RFC 3461: `RET`, `ENVID`, `NOTIFY`, `ORCPT`)
//! and SMTPUTF8 (RFC 6531), and the xtext encoding DSN values travel in.
//!
//! An [`Envelope`](crate::message::Envelope) or a queue entry holds them as
//! `Option<Box<EnvelopeParams>>`: `None` (the common case, a client that
//! sent none of them) costs nothing on disk (see `store/queue.rs`).

use serde::{Deserialize, Serialize};

/// `RET=` (RFC 3461 §4.3): what a failure DSN returns of the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ret {
    /// The whole message (up to [`crate::dsn::MAX_RETURNED_CONTENT`]).
    Full,
    /// Its header section only.
    Hdrs,
}

/// `NOTIFY=` (RFC 3461 §4.1): when the sender wants a DSN about this
/// recipient. `NEVER` is all three false.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notify {
    /// A DSN once delivered (or relayed to a host without DSN).
    pub success: bool,
    /// A DSN when delivery failed for good (a bounce).
    pub failure: bool,
    /// A DSN when delivery is late (a delay warning).
    pub delay: bool,
}

impl Notify {
    /// No `NOTIFY=` given: RFC 3461 §4.1 leaves it to the server; like
    /// Postfix, failures are reported, and delays when `delivery.delay_warning`
    /// is set.
    pub const DEFAULT: Notify = Notify {
        success: false,
        failure: true,
        delay: true,
    };

    /// Parses `NEVER` or a comma list of `SUCCESS`, `FAILURE`, `DELAY`
    /// (any case, each at most once). `None` when malformed.
    pub fn parse(v: &str) -> Option<Notify> {
        if v.eq_ignore_ascii_case("NEVER") {
            return Some(Notify {
                success: false,
                failure: false,
                delay: false,
            });
        }
        let mut n = Notify {
            success: false,
            failure: false,
            delay: false,
        };
        for word in v.split(',') {
            let slot = if word.eq_ignore_ascii_case("SUCCESS") {
                &mut n.success
            } else if word.eq_ignore_ascii_case("FAILURE") {
                &mut n.failure
            } else if word.eq_ignore_ascii_case("DELAY") {
                &mut n.delay
            } else {
                return None;
            };
            if *slot {
                return None;
            }
            *slot = true;
        }
        Some(n)
    }

    /// What the addresses an alias forwards to are given (RFC 3461 §6.2.7,
    /// Postfix's choice): this without `SUCCESS`, whose notice the alias
    /// answers itself (`expanded`); `NEVER` when nothing else was asked.
    pub fn forwarded(self) -> Notify {
        Notify {
            success: false,
            ..self
        }
    }

    /// The value as sent on in `NOTIFY=`.
    pub fn to_param(self) -> String {
        let words: Vec<&str> = [
            (self.success, "SUCCESS"),
            (self.failure, "FAILURE"),
            (self.delay, "DELAY"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, w)| *w)
        .collect();
        if words.is_empty() {
            "NEVER".into()
        } else {
            words.join(",")
        }
    }
}

/// `ORCPT=addr-type;xtext` (RFC 3461 §4.2), the address decoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Orcpt {
    /// e.g. `rfc822`, as sent.
    pub addr_type: String,
    /// The original recipient, xtext-decoded.
    pub address: String,
}

impl Orcpt {
    /// Parses `addr-type;xtext`; `None` when malformed.
    pub fn parse(v: &str) -> Option<Orcpt> {
        let (kind, addr) = v.split_once(';')?;
        let atom = !kind.is_empty() && kind.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-');
        if !atom || v.len() > 500 {
            return None;
        }
        Some(Orcpt {
            addr_type: kind.to_owned(),
            address: xtext_decode(addr)?,
        })
    }

    /// The value as sent on in `ORCPT=`.
    pub fn to_param(&self) -> String {
        format!("{};{}", self.addr_type, xtext_encode(&self.address))
    }
}

/// One recipient's DSN parameters, keyed by its address as given in `RCPT`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecipientParams {
    /// The recipient as `RCPT TO` gave it.
    pub address: String,
    /// `NOTIFY=`; `None`: not given ([`Notify::DEFAULT`]).
    pub notify: Option<Notify>,
    /// `ORCPT=`.
    pub orcpt: Option<Orcpt>,
}

/// What `MAIL` and `RCPT` asked of a message's delivery and notifications.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvelopeParams {
    /// `RET=`; `None`: not given (the whole message is returned).
    pub ret: Option<Ret>,
    /// `ENVID=`, xtext-decoded.
    pub envid: Option<String>,
    /// `MAIL … SMTPUTF8`, or UTF-8 in an envelope address: a next hop must
    /// offer SMTPUTF8 (RFC 6531 §3.4).
    pub smtputf8: bool,
    /// Recipients that came with `NOTIFY=` or `ORCPT=`.
    pub recipients: Vec<RecipientParams>,
}

impl EnvelopeParams {
    /// `None` when there is nothing to keep (the common case).
    pub fn boxed(self) -> Option<Box<EnvelopeParams>> {
        (self != EnvelopeParams::default()).then(|| Box::new(self))
    }

    /// The parameters `address` was given with, if any.
    pub fn recipient(&self, address: &str) -> Option<&RecipientParams> {
        self.recipients.iter().find(|r| r.address == address)
    }

    /// Keeps only the recipients in `keep` (a queue entry gets the ones it
    /// delivers); `None` when nothing is left to keep.
    pub fn only(&self, keep: &[String]) -> Option<Box<EnvelopeParams>> {
        let mut p = self.clone();
        p.recipients.retain(|r| keep.contains(&r.address));
        p.boxed()
    }
}

/// What `address`'s `NOTIFY` asks, given its message's parameters.
pub fn notify_of(params: Option<&EnvelopeParams>, address: &str) -> Notify {
    params
        .and_then(|p| p.recipient(address))
        .and_then(|r| r.notify)
        .unwrap_or(Notify::DEFAULT)
}

/// RFC 3461 §4 xtext: printable ASCII except `+` and `=`, and `+XX` hex
/// escapes. Decoded control characters are refused, since the result may
/// be logged and is written into notifications.
pub fn xtext_decode(v: &str) -> Option<String> {
    if v.is_empty() {
        return None;
    }
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                if !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
                    return None;
                }
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            c @ 33..=126 if c != b'=' => {
                out.push(c);
                i += 1;
            }
            _ => return None,
        }
    }
    let s = String::from_utf8(out).ok()?;
    (!s.chars().any(char::is_control)).then_some(s)
}

/// The xtext form of `v` (RFC 3461 §4): `+`, `=`, and octets outside
/// `!`..`~` as `+XX`.
pub fn xtext_encode(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for &c in v.as_bytes() {
        if (33..=126).contains(&c) && c != b'+' && c != b'=' {
            out.push(c as char);
        } else {
            out.push_str(&format!("+{c:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_parses_as_rfc3461_says() {
        let n = |s, f, d| {
            Some(Notify {
                success: s,
                failure: f,
                delay: d,
            })
        };
        #[rustfmt::skip]
        let cases: &[(&str, Option<Notify>)] = &[
            ("NEVER", n(false, false, false)),
            ("never", n(false, false, false)),
            ("SUCCESS", n(true, false, false)),
            ("success,FAILURE", n(true, true, false)),
            ("DELAY,FAILURE,SUCCESS", n(true, true, true)),
            ("NEVER,DELAY", None),
            ("SUCCESS,SUCCESS", None),
            ("", None),
            ("SUCCESS,", None),
            ("ALWAYS", None),
        ];
        for (v, want) in cases {
            assert_eq!(Notify::parse(v), *want, "{v}");
        }
        assert_eq!(
            Notify::parse("delay,success").unwrap().to_param(),
            "SUCCESS,DELAY"
        );
        assert_eq!(Notify::parse("NEVER").unwrap().to_param(), "NEVER");
    }

    #[test]
    fn xtext_round_trips() {
        for s in ["a@b.test", "x+y=z@b.test", "QQ314159", "j\u{f6}rg@b.test"] {
            let e = xtext_encode(s);
            assert!(
                e.bytes().all(|c| (33..=126).contains(&c) && c != b'='),
                "{e}"
            );
            assert_eq!(xtext_decode(&e).as_deref(), Some(s));
        }
        assert_eq!(xtext_encode("a+b=c"), "a+2Bb+3Dc");
        assert_eq!(xtext_decode("a+2"), None);
        assert_eq!(xtext_decode("a+0Ab"), None, "control characters");
        assert_eq!(xtext_decode("a=b"), None);
        assert_eq!(xtext_decode("a b"), None);
    }

    #[test]
    fn orcpt_needs_a_type_and_xtext() {
        let o = Orcpt::parse("rfc822;bob+2Bx@b.test").unwrap();
        assert_eq!(o.addr_type, "rfc822");
        assert_eq!(o.address, "bob+x@b.test");
        assert_eq!(o.to_param(), "rfc822;bob+2Bx@b.test");
        assert_eq!(Orcpt::parse("bob@b.test"), None);
        assert_eq!(Orcpt::parse(";bob@b.test"), None);
        assert_eq!(Orcpt::parse("rfc 822;bob@b.test"), None);
        assert_eq!(Orcpt::parse("rfc822;"), None);
    }
}
