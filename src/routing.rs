//! Routing decisions: where one recipient goes. Pure logic over a
//! [`Directory`]; the router actor asks this at RCPT time.

use serde::{Deserialize, Serialize};

use crate::address::Address;
use crate::config::{RoutingConfig, UnknownUser};
use crate::smtp::Reply;

/// Where one recipient goes, decided at RCPT time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Route {
    /// Accept; deliver to every target (an alias may expand to several).
    Deliver(Vec<Target>),
    /// Accept, then send the sender an RFC 3464 bounce with this status and
    /// reason (`unknown_user = "bounce"`).
    Bounce {
        /// Enhanced status code for the report, e.g. `5.1.1`.
        status: String,
        /// Why, for the report and the log.
        reason: String,
    },
    /// Refuse at RCPT with this reply.
    Reject(Reply),
}

/// One place a message is delivered to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Target {
    /// A local mailbox (canonical lower-case address). `original` is the
    /// recipient it was redirected from (postmaster redirect), recorded in an
    /// `X-Original-To:` header.
    Mailbox {
        /// The mailbox (canonical lower-case address).
        mailbox: String,
        /// The recipient it was redirected from, if any (`X-Original-To:`).
        original: Option<String>,
    },
    /// Queue for remote delivery to this address.
    Remote {
        /// The recipient address to deliver to.
        address: String,
    },
}

impl Route {
    /// Deliver to one local mailbox.
    pub fn mailbox(mailbox: impl Into<String>) -> Route {
        Route::Deliver(vec![Target::Mailbox {
            mailbox: mailbox.into(),
            original: None,
        }])
    }

    /// Whether the recipient is accepted (not [`Route::Reject`]).
    pub fn is_accepted(&self) -> bool {
        !matches!(self, Route::Reject(_))
    }
}

/// Read access to users and aliases, as the store provides it.
///
/// A lookup that fails (a storage error) must say so: "no such user" would
/// make the caller refuse good mail for good (`550`), where a temporary
/// refusal (`451`) has the sender try again.
pub trait Directory {
    /// Whether a mailbox exists for this canonical (lower-case) address.
    fn is_user(&self, address: &str) -> Result<bool, DirectoryError>;
    /// Targets of an alias, if `address` is one.
    fn alias(&self, address: &str) -> Result<Option<Vec<String>>, DirectoryError>;
}

/// A directory (or whatever a router consults) could not answer: a
/// temporary failure. SMTP answers `451 4.3.0` to the recipient.
#[derive(Debug, thiserror::Error)]
#[error("directory lookup failed: {0}")]
pub struct DirectoryError(#[source] pub Box<dyn std::error::Error + Send + Sync>);

impl DirectoryError {
    /// Wraps the error that kept the directory from answering.
    pub fn new(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> DirectoryError {
        DirectoryError(error.into())
    }
}

/// Most alias hops followed before giving up (alias loops).
pub const MAX_ALIAS_DEPTH: usize = 8;

/// The default routing policy, as Postfix's `local_recipient_maps`,
/// `virtual_alias_maps` and `smtpd_relay_restrictions` would decide.
///
/// `may_relay` is true for clients in `relay_networks` or authenticated.
///
/// # Errors
///
/// A directory lookup failed: nothing is decided (the caller refuses the
/// recipient temporarily).
pub fn decide(
    config: &RoutingConfig,
    dir: &dyn Directory,
    rcpt: &Address,
    may_relay: bool,
) -> Result<Route, DirectoryError> {
    let local = is_local(config, &rcpt.domain);
    if !local || rcpt.names_another_host() {
        if may_relay && !rcpt.names_another_host() {
            return Ok(Route::Deliver(vec![Target::Remote {
                address: rcpt.to_string(),
            }]));
        }
        return Ok(relay_denied(rcpt));
    }
    let canonical = rcpt.canonical();
    let mut targets = Vec::new();
    if !expand(config, dir, &canonical, 0, &mut targets)? {
        return Ok(unknown_user(config, rcpt, &canonical));
    }
    Ok(Route::Deliver(targets))
}

fn relay_denied(rcpt: &Address) -> Route {
    Route::Reject(Reply::new(
        554,
        "5.7.1",
        format!("<{rcpt}>: Relay access denied"),
    ))
}

fn is_local(config: &RoutingConfig, domain: &str) -> bool {
    config
        .local_domains
        .iter()
        .any(|d| d.eq_ignore_ascii_case(domain))
}

/// Follows aliases to mailboxes and remote addresses. Returns false when the
/// address is neither a user, an alias nor a postmaster.
fn expand(
    config: &RoutingConfig,
    dir: &dyn Directory,
    address: &str,
    depth: usize,
    out: &mut Vec<Target>,
) -> Result<bool, DirectoryError> {
    if depth > MAX_ALIAS_DEPTH {
        return Ok(false);
    }
    if let Some(targets) = dir.alias(address)? {
        for t in targets {
            let t = t.to_ascii_lowercase();
            let domain = t.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
            if is_local(config, domain) {
                if !expand(config, dir, &t, depth + 1, out)? {
                    // An alias to a missing local user: fall back to the postmaster.
                    push(out, postmaster_target(domain, Some(t.clone())));
                }
            } else {
                push(out, Target::Remote { address: t });
            }
        }
        return Ok(true);
    }
    if is_postmaster(address) || dir.is_user(address)? {
        push(
            out,
            Target::Mailbox {
                mailbox: address.to_owned(),
                original: None,
            },
        );
        return Ok(true);
    }
    Ok(false)
}

fn push(out: &mut Vec<Target>, t: Target) {
    if !out.contains(&t) {
        out.push(t);
    }
}

fn is_postmaster(address: &str) -> bool {
    address
        .split_once('@')
        .is_some_and(|(l, _)| l.eq_ignore_ascii_case("postmaster"))
}

fn postmaster_target(domain: &str, original: Option<String>) -> Target {
    Target::Mailbox {
        mailbox: format!("postmaster@{}", domain.to_ascii_lowercase()),
        original,
    }
}

fn unknown_user(config: &RoutingConfig, rcpt: &Address, canonical: &str) -> Route {
    match config.unknown_user {
        UnknownUser::Reject => Route::Reject(Reply::new(
            550,
            "5.1.1",
            format!("<{rcpt}>: Recipient address rejected: User unknown"),
        )),
        UnknownUser::Bounce => Route::Bounce {
            status: "5.1.1".into(),
            reason: format!("<{rcpt}>: user unknown"),
        },
        UnknownUser::Postmaster => Route::Deliver(vec![postmaster_target(
            &rcpt.domain,
            Some(canonical.to_owned()),
        )]),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    struct Dir {
        users: Vec<&'static str>,
        aliases: HashMap<&'static str, Vec<String>>,
    }

    impl Directory for Dir {
        fn is_user(&self, a: &str) -> Result<bool, DirectoryError> {
            Ok(self.users.contains(&a))
        }
        fn alias(&self, a: &str) -> Result<Option<Vec<String>>, DirectoryError> {
            Ok(self.aliases.get(a).cloned())
        }
    }

    /// A directory whose every lookup fails (a broken store).
    struct Broken;

    impl Directory for Broken {
        fn is_user(&self, _: &str) -> Result<bool, DirectoryError> {
            Err(DirectoryError::new("injected"))
        }
        fn alias(&self, _: &str) -> Result<Option<Vec<String>>, DirectoryError> {
            Err(DirectoryError::new("injected"))
        }
    }

    /// A failing lookup decides nothing (never "user unknown"), under
    /// every unknown-user policy; routes that need no lookup still work.
    #[test]
    fn lookup_failures_decide_nothing() {
        for policy in [
            UnknownUser::Reject,
            UnknownUser::Bounce,
            UnknownUser::Postmaster,
        ] {
            let (c, _) = setup(policy);
            for rcpt in [
                "alice@example.test",
                "bob@example.test",
                "sales@example.test",
            ] {
                assert!(decide(&c, &Broken, &addr(rcpt), false).is_err(), "{rcpt}");
            }
            let remote = decide(&c, &Broken, &addr("bob@remote.test"), true).unwrap();
            assert_eq!(describe(&remote), "remote bob@remote.test");
            let denied = decide(&c, &Broken, &addr("bob@remote.test"), false).unwrap();
            assert_eq!(describe(&denied), "reject 554 5.7.1");
        }
    }

    fn setup(unknown: UnknownUser) -> (RoutingConfig, Dir) {
        let c = RoutingConfig {
            local_domains: vec!["example.test".into()],
            unknown_user: unknown,
            ..Default::default()
        };
        let mut aliases = HashMap::new();
        aliases.insert(
            "sales@example.test",
            vec!["alice@example.test".into(), "x@remote.test".into()],
        );
        aliases.insert("loop@example.test", vec!["loop@example.test".into()]);
        (
            c,
            Dir {
                users: vec!["alice@example.test"],
                aliases,
            },
        )
    }

    fn addr(s: &str) -> Address {
        Address::parse(s, false).unwrap()
    }

    #[test]
    fn table() {
        let (c, d) = setup(UnknownUser::Reject);
        let cases: &[(&str, bool, &str)] = &[
            ("alice@example.test", false, "deliver alice@example.test"),
            ("Alice@EXAMPLE.test", false, "deliver alice@example.test"),
            (
                "postmaster@example.test",
                false,
                "deliver postmaster@example.test",
            ),
            ("bob@example.test", false, "reject 550 5.1.1"),
            ("bob@remote.test", false, "reject 554 5.7.1"),
            ("bob@remote.test", true, "remote bob@remote.test"),
            (
                "sales@example.test",
                false,
                "deliver alice@example.test remote x@remote.test",
            ),
            (
                "loop@example.test",
                false,
                "deliver postmaster@example.test",
            ),
        ];
        for (rcpt, relay, want) in cases {
            let got = describe(&decide(&c, &d, &addr(rcpt), *relay).unwrap());
            assert_eq!(&got, want, "{rcpt} relay={relay}");
        }
    }

    #[test]
    fn unknown_user_policies() {
        let (c, d) = setup(UnknownUser::Bounce);
        assert!(matches!(
            decide(&c, &d, &addr("bob@example.test"), false).unwrap(),
            Route::Bounce { .. }
        ));
        let (c, d) = setup(UnknownUser::Postmaster);
        match decide(&c, &d, &addr("bob@example.test"), false).unwrap() {
            Route::Deliver(t) => assert_eq!(
                t,
                vec![Target::Mailbox {
                    mailbox: "postmaster@example.test".into(),
                    original: Some("bob@example.test".into())
                }]
            ),
            other => panic!("{other:?}"),
        }
    }

    fn describe(r: &Route) -> String {
        match r {
            Route::Deliver(ts) => {
                let mut s = String::new();
                let mut first_local = true;
                for t in ts {
                    match t {
                        Target::Mailbox { mailbox, .. } => {
                            if first_local {
                                s.push_str("deliver");
                                first_local = false;
                            }
                            s.push(' ');
                            s.push_str(mailbox);
                        }
                        Target::Remote { address } => {
                            if !s.is_empty() {
                                s.push(' ');
                            }
                            s.push_str("remote ");
                            s.push_str(address);
                        }
                    }
                }
                s
            }
            Route::Bounce { .. } => "bounce".into(),
            Route::Reject(r) => format!("reject {} {}", r.code, r.status.as_deref().unwrap_or("")),
        }
    }
}
