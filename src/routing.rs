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
    /// Whether the mailbox of user `address` is at or over its quota (new
    /// mail is refused, `552 5.2.2`). No quotas unless a directory says so.
    fn is_full(&self, address: &str) -> Result<bool, DirectoryError> {
        let _ = address;
        Ok(false)
    }
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

/// Enhanced status of a recipient whose alias expansion loops (Postfix:
/// "mail forwarding loop").
pub const LOOP_STATUS: &str = "5.4.6";

/// Why a client may send to a non-local domain, in words, for
/// [`explain`]: e.g. `client 127.0.0.1 is in routing.relay_networks
/// (127.0.0.0/8)` or `authenticated as alice@example.test`. `None`: it may not.
pub type RelayReason<'a> = Option<&'a str>;

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
    let route = decide_traced(
        config,
        dir,
        rcpt,
        may_relay.then_some("permitted"),
        &mut Trace(None),
    )?;
    if let Route::Bounce { status, reason } = &route {
        if status == LOOP_STATUS {
            tracing::warn!(status = %status, reason = %crate::logsafe::escape(reason), "alias loop; the recipient is bounced");
        }
    }
    Ok(route)
}

/// [`decide`], recording each step that led to the route: what `postino
/// route explain` prints (as `sendmail -bv`). It is the same code, so the
/// explanation cannot drift from the decision. `relay` says why the client
/// may relay, if it may.
///
/// # Errors
///
/// As [`decide`].
pub fn explain(
    config: &RoutingConfig,
    dir: &dyn Directory,
    rcpt: &Address,
    relay: RelayReason<'_>,
) -> Result<(Route, Vec<String>), DirectoryError> {
    let mut trace = Trace(Some(Vec::new()));
    let route = decide_traced(config, dir, rcpt, relay, &mut trace)?;
    Ok((route, trace.0.unwrap_or_default()))
}

/// [`decide`] over a directory that answers asynchronously (the storage
/// seam, [`crate::storage::Directory`]): the decision stays the pure
/// function above, run over the answers fetched for this one recipient.
/// Whenever it needs one not fetched yet, that address is looked up (alias,
/// user, quota, as `decide` asks them; an alias's targets with it) and the
/// decision runs again; so a lookup is never answered from anything older
/// than this call, and a user added through any node counts at once.
///
/// # Errors
///
/// As [`decide`].
pub async fn decide_async(
    config: &RoutingConfig,
    dir: &dyn crate::storage::Directory,
    rcpt: &Address,
    may_relay: bool,
) -> Result<Route, DirectoryError> {
    let known = Prefetched::default();
    loop {
        match decide(config, &known, rcpt, may_relay) {
            Err(_) if known.fetch_missing(dir).await? => continue,
            decided => return decided,
        }
    }
}

/// [`explain`] over an asynchronous directory, as [`decide_async`].
///
/// # Errors
///
/// As [`decide`].
pub async fn explain_async(
    config: &RoutingConfig,
    dir: &dyn crate::storage::Directory,
    rcpt: &Address,
    relay: RelayReason<'_>,
) -> Result<(Route, Vec<String>), DirectoryError> {
    let known = Prefetched::default();
    loop {
        match explain(config, &known, rcpt, relay) {
            Err(_) if known.fetch_missing(dir).await? => continue,
            decided => return decided,
        }
    }
}

/// What one address is, as far as routing asks.
#[derive(Debug, Clone, Default)]
struct Entry {
    alias: Option<Vec<String>>,
    user: bool,
    full: bool,
}

/// The directory answers fetched for one decision, and the addresses it
/// asked about that were not fetched yet.
#[derive(Default)]
struct Prefetched {
    known: std::sync::Mutex<(std::collections::HashMap<String, Entry>, Vec<String>)>,
}

/// Fetch rounds before a decision gives up: more than any alias chain
/// `decide` follows (each round fetches one more level).
const MAX_FETCH_ROUNDS: usize = 4 * MAX_ALIAS_DEPTH + 8;

impl Prefetched {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, (std::collections::HashMap<String, Entry>, Vec<String>)> {
        self.known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn get<T>(&self, address: &str, f: impl FnOnce(&Entry) -> T) -> Result<T, DirectoryError> {
        let mut known = self.lock();
        if let Some(e) = known.0.get(address) {
            return Ok(f(e));
        }
        known.1.push(address.to_owned());
        Err(DirectoryError::new("not fetched yet"))
    }

    /// Fetches what the last run missed; false if it missed nothing (its
    /// error was not a miss).
    async fn fetch_missing(
        &self,
        dir: &dyn crate::storage::Directory,
    ) -> Result<bool, DirectoryError> {
        let missing = std::mem::take(&mut self.lock().1);
        if missing.is_empty() || self.lock().0.len() > MAX_FETCH_ROUNDS * 4 {
            return Ok(false);
        }
        for address in missing {
            let entry = fetch(dir, &address).await?;
            let targets = entry.alias.clone().unwrap_or_default();
            self.lock().0.insert(address, entry);
            for t in targets {
                let t = t.to_ascii_lowercase();
                let known = self.lock().0.contains_key(&t);
                if !known {
                    let entry = fetch(dir, &t).await?;
                    self.lock().0.insert(t, entry);
                }
            }
        }
        Ok(true)
    }
}

async fn fetch(
    dir: &dyn crate::storage::Directory,
    address: &str,
) -> Result<Entry, DirectoryError> {
    let failed = |what: &'static str| {
        move |error: crate::store::StoreError| {
            tracing::error!(%error, address = %crate::logsafe::escape(address), "{what} lookup failed");
            DirectoryError::new(error)
        }
    };
    let alias = dir.alias(address).await.map_err(failed("alias"))?;
    if alias.is_some() {
        return Ok(Entry {
            alias,
            ..Entry::default()
        });
    }
    let user = dir.is_user(address).await.map_err(failed("user"))?;
    let full = user && dir.is_full(address).await.map_err(failed("quota"))?;
    Ok(Entry { alias, user, full })
}

impl Directory for Prefetched {
    fn is_user(&self, address: &str) -> Result<bool, DirectoryError> {
        self.get(address, |e| e.user)
    }
    fn alias(&self, address: &str) -> Result<Option<Vec<String>>, DirectoryError> {
        self.get(address, |e| e.alias.clone())
    }
    fn is_full(&self, address: &str) -> Result<bool, DirectoryError> {
        self.get(address, |e| e.full)
    }
}

/// The steps of a decision, when someone asks for them (formatting costs
/// nothing otherwise).
struct Trace(Option<Vec<String>>);

impl Trace {
    fn note(&mut self, depth: usize, step: impl FnOnce() -> String) {
        if let Some(steps) = &mut self.0 {
            steps.push(format!("{}{}", "  ".repeat(depth), step()));
        }
    }
}

fn decide_traced(
    config: &RoutingConfig,
    dir: &dyn Directory,
    rcpt: &Address,
    relay: RelayReason<'_>,
    trace: &mut Trace,
) -> Result<Route, DirectoryError> {
    let local = is_local(config, &rcpt.domain);
    if !local || rcpt.names_another_host() {
        if rcpt.names_another_host() {
            trace.note(0, || {
                format!("<{rcpt}>: the local part names another host (%, ! or @): a relay attempt")
            });
        } else {
            trace.note(0, || {
                format!(
                    "<{rcpt}>: domain {} is not in routing.local_domains: remote",
                    rcpt.domain
                )
            });
        }
        if let (Some(reason), false) = (relay, rcpt.names_another_host()) {
            trace.note(0, || format!("relay permitted: {reason}"));
            return Ok(Route::Deliver(vec![Target::Remote {
                address: rcpt.to_string(),
            }]));
        }
        trace.note(0, || {
            "relay denied: the client is not in routing.relay_networks and not authenticated".into()
        });
        return Ok(relay_denied(rcpt));
    }
    trace.note(0, || {
        format!(
            "<{rcpt}>: domain {} is in routing.local_domains",
            rcpt.domain
        )
    });
    let canonical = rcpt.canonical();
    let mut targets = Vec::new();
    let mut chain = Vec::new();
    match expand(config, dir, &canonical, &mut chain, trace, &mut targets)? {
        Expanded::Found => Ok(Route::Deliver(targets)),
        Expanded::Unknown => {
            trace.note(0, || {
                format!(
                    "{canonical}: no such user or alias; routing.unknown_user = {}",
                    match config.unknown_user {
                        UnknownUser::Reject => "reject",
                        UnknownUser::Bounce => "bounce",
                        UnknownUser::Postmaster => "postmaster",
                    }
                )
            });
            Ok(unknown_user(config, rcpt, &canonical))
        }
        Expanded::Full(mailbox) => {
            trace.note(0, || format!("{mailbox}: mailbox is at or over its quota"));
            let text = if mailbox == canonical {
                format!("<{rcpt}>: Mailbox is full")
            } else {
                format!("<{rcpt}>: Mailbox is full ({mailbox})")
            };
            Ok(Route::Reject(Reply::new(552, "5.2.2", text)))
        }
        Expanded::Loop(chain) => {
            let chain = chain.join(" -> ");
            trace.note(0, || format!("alias loop: {chain}"));
            Ok(Route::Bounce {
                status: LOOP_STATUS.into(),
                reason: format!("<{rcpt}>: mail forwarding loop ({chain})"),
            })
        }
    }
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

/// What following an address led to.
enum Expanded {
    /// Targets were added.
    Found,
    /// Neither a user, an alias nor a postmaster.
    Unknown,
    /// An alias leads back to itself: the addresses from the first
    /// occurrence to the repeat.
    Loop(Vec<String>),
    /// This mailbox is at or over its quota.
    Full(String),
}

/// Follows aliases to mailboxes and remote addresses. `chain` holds the
/// aliases being expanded above `address`.
fn expand(
    config: &RoutingConfig,
    dir: &dyn Directory,
    address: &str,
    chain: &mut Vec<String>,
    trace: &mut Trace,
    out: &mut Vec<Target>,
) -> Result<Expanded, DirectoryError> {
    let depth = chain.len();
    if let Some(at) = chain.iter().position(|a| a == address) {
        let mut looped = chain[at..].to_vec();
        looped.push(address.to_owned());
        return Ok(Expanded::Loop(looped));
    }
    if depth > MAX_ALIAS_DEPTH {
        trace.note(depth, || {
            format!("{address}: more than {MAX_ALIAS_DEPTH} alias hops; not followed")
        });
        return Ok(Expanded::Unknown);
    }
    if let Some(targets) = dir.alias(address)? {
        trace.note(depth, || {
            format!("{address}: alias -> {}", targets.join(", "))
        });
        chain.push(address.to_owned());
        for t in targets {
            let t = t.to_ascii_lowercase();
            let domain = t.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
            if is_local(config, domain) {
                match expand(config, dir, &t, chain, trace, out)? {
                    Expanded::Found => {}
                    Expanded::Unknown => {
                        // An alias to a missing local user: fall back to the postmaster.
                        trace.note(depth + 1, || {
                            format!("{t}: no such user or alias; to postmaster@{domain}")
                        });
                        push(out, postmaster_target(domain, Some(t.clone())));
                    }
                    stop @ (Expanded::Loop(_) | Expanded::Full(_)) => return Ok(stop),
                }
            } else {
                trace.note(depth + 1, || format!("{t}: remote"));
                push(out, Target::Remote { address: t });
            }
        }
        chain.pop();
        return Ok(Expanded::Found);
    }
    if is_postmaster(address) {
        trace.note(depth, || {
            format!("{address}: postmaster, always accepted (RFC 5321 4.5.1): local mailbox")
        });
    } else if dir.is_user(address)? {
        trace.note(depth, || format!("{address}: local user: mailbox"));
        if dir.is_full(address)? {
            return Ok(Expanded::Full(address.to_owned()));
        }
    } else {
        return Ok(Expanded::Unknown);
    }
    push(
        out,
        Target::Mailbox {
            mailbox: address.to_owned(),
            original: None,
        },
    );
    Ok(Expanded::Found)
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
        full: Vec<&'static str>,
    }

    impl Directory for Dir {
        fn is_user(&self, a: &str) -> Result<bool, DirectoryError> {
            Ok(self.users.contains(&a))
        }
        fn alias(&self, a: &str) -> Result<Option<Vec<String>>, DirectoryError> {
            Ok(self.aliases.get(a).cloned())
        }
        fn is_full(&self, a: &str) -> Result<bool, DirectoryError> {
            Ok(self.full.contains(&a))
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
        aliases.insert("loop1@example.test", vec!["loop2@example.test".into()]);
        aliases.insert(
            "loop2@example.test",
            vec!["alice@example.test".into(), "loop1@example.test".into()],
        );
        aliases.insert("into-loop@example.test", vec!["loop1@example.test".into()]);
        // Two paths to one mailbox is not a loop.
        aliases.insert(
            "twice@example.test",
            vec!["sales@example.test".into(), "alice@example.test".into()],
        );
        (
            c,
            Dir {
                users: vec!["alice@example.test"],
                aliases,
                full: Vec::new(),
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
            ("loop@example.test", false, "bounce 5.4.6"),
            ("loop1@example.test", false, "bounce 5.4.6"),
            ("into-loop@example.test", false, "bounce 5.4.6"),
            (
                "twice@example.test",
                false,
                "deliver alice@example.test remote x@remote.test",
            ),
        ];
        for (rcpt, relay, want) in cases {
            let got = describe(&decide(&c, &d, &addr(rcpt), *relay).unwrap());
            assert_eq!(&got, want, "{rcpt} relay={relay}");
        }
    }

    /// A loop bounces naming the chain from the address that repeats.
    #[test]
    fn loops_name_their_chain() {
        let (c, d) = setup(UnknownUser::Reject);
        match decide(&c, &d, &addr("into-loop@example.test"), false).unwrap() {
            Route::Bounce { status, reason } => {
                assert_eq!(status, "5.4.6");
                assert!(
                    reason.contains(
                        "mail forwarding loop (loop1@example.test -> loop2@example.test -> loop1@example.test)"
                    ),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    /// `explain` gives the same route as `decide`, with the steps.
    #[test]
    fn explain_records_each_step() {
        let (c, d) = setup(UnknownUser::Reject);
        for (rcpt, relay) in [
            ("alice@example.test", None),
            ("sales@example.test", None),
            ("bob@example.test", None),
            ("bob@remote.test", None),
            (
                "bob@remote.test",
                Some("client 127.0.0.1 is in routing.relay_networks"),
            ),
            ("loop1@example.test", None),
        ] {
            let (route, _) = explain(&c, &d, &addr(rcpt), relay).unwrap();
            assert_eq!(
                route,
                decide(&c, &d, &addr(rcpt), relay.is_some()).unwrap(),
                "{rcpt}"
            );
        }
        let (_, steps) = explain(&c, &d, &addr("sales@example.test"), None).unwrap();
        assert_eq!(
            steps,
            [
                "<sales@example.test>: domain example.test is in routing.local_domains",
                "sales@example.test: alias -> alice@example.test, x@remote.test",
                "  alice@example.test: local user: mailbox",
                "  x@remote.test: remote",
            ]
        );
        let (_, steps) = explain(&c, &d, &addr("bob@example.test"), None).unwrap();
        assert_eq!(
            steps.last().unwrap(),
            "bob@example.test: no such user or alias; routing.unknown_user = reject"
        );
        let (_, steps) = explain(
            &c,
            &d,
            &addr("bob@remote.test"),
            Some("authenticated as alice"),
        )
        .unwrap();
        assert_eq!(
            steps.last().unwrap(),
            "relay permitted: authenticated as alice"
        );
    }

    /// A full mailbox is refused at RCPT with 552 5.2.2, directly or
    /// through an alias (naming the mailbox); the postmaster never is.
    #[test]
    fn full_mailboxes_are_refused() {
        let (c, mut d) = setup(UnknownUser::Reject);
        d.full = vec!["alice@example.test", "postmaster@example.test"];
        for (rcpt, text) in [
            (
                "alice@example.test",
                "<alice@example.test>: Mailbox is full",
            ),
            (
                "sales@example.test",
                "<sales@example.test>: Mailbox is full (alice@example.test)",
            ),
        ] {
            match decide(&c, &d, &addr(rcpt), false).unwrap() {
                Route::Reject(r) => {
                    assert_eq!((r.code, r.status.as_deref()), (552, Some("5.2.2")));
                    assert_eq!(r.text, text);
                }
                other => panic!("{rcpt}: {other:?}"),
            }
        }
        assert!(decide(&c, &d, &addr("postmaster@example.test"), false)
            .unwrap()
            .is_accepted());
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
            Route::Bounce { status, .. } => format!("bounce {status}"),
            Route::Reject(r) => format!("reject {} {}", r.code, r.status.as_deref().unwrap_or("")),
        }
    }
}
