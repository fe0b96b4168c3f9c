//! The embedder's policy seam: a [`Policy`] decides at every stage of an SMTP
//! session (connect, HELO/EHLO, MAIL, RCPT, end of DATA) with a typed answer.
//!
//! Register one or more with [`ServerBuilder::policy`]; each method has a
//! default that leaves the decision to the next policy and, in the end, to
//! the server's own rules (so an embedder writes only the stages it cares
//! about). Policies are asked in the order they were registered; the first
//! that accepts or refuses ends the round, as samotop's guards do.
//!
//! ```
//! use postino::policy::{Client, Policy, RcptDecision};
//! use postino_core::{smtp::Reply, Address};
//!
//! /// Refuses every recipient in `spam.test`.
//! struct NoSpamTest;
//!
//! impl Policy for NoSpamTest {
//!     async fn rcpt(&self, _: &Client, _: Option<&Address>, to: &Address) -> RcptDecision {
//!         if to.domain.eq_ignore_ascii_case("spam.test") {
//!             return RcptDecision::Reject(Reply::new(550, "5.7.1", "not here"));
//!         }
//!         RcptDecision::Default
//!     }
//! }
//!
//! # fn build(config: postino_core::Config) -> postino::ServerBuilder {
//! postino::Server::builder(config).policy(NoSpamTest)
//! # }
//! ```
//!
//! What the server guarantees around a policy:
//!
//! - Replies are checked: a [`Decision::Reject`] must carry a 5xx reply and
//!   a [`Decision::TempFail`] a 4xx one, the text on one line or several
//!   (`\n`) without other control characters. A reply that breaks this is
//!   logged and answered `451 4.3.0` instead.
//! - A policy that panics, or takes longer than `smtp.timeout` to answer,
//!   is logged and the command answered `451 4.3.0`; the server and the
//!   connection go on. A slow policy holds up only the connection that asked
//!   (the session waits for the answer, as it waits for the router), but a
//!   policy that *blocks* its thread holds up every connection of that
//!   worker: do blocking work on `tokio::task::spawn_blocking`.
//! - Refusals are logged as the server's own are (`NOQUEUE: reject: RCPT
//!   from [ip]: 550 5.7.1 …`), and count towards `smtp.soft_error_limit`
//!   (the tarpit) and `smtp.hard_error_limit` (`421`, the session ends) as
//!   they do. A refused HELO/EHLO leaves the session without a name; a
//!   refused MAIL or message ends the transaction.
//! - Without a policy none of this runs: the session takes the same path as
//!   before this module existed.
//!
//! [`ServerBuilder::policy`]: crate::ServerBuilder::policy

use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use actix::Recipient;
use futures::FutureExt;
use postino_core::logsafe::escape;
use postino_core::message::RoutedRecipient;
use postino_core::smtp::session::{Accepted, RouteQuery};
use postino_core::smtp::Reply;
use postino_core::{Address, Route, Target};
use tracing::{debug, error, warn};

use crate::router::RouteRecipient;

/// The client a session talks to, as far as the session knows it when a
/// policy is asked.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Client {
    /// The client's address and port.
    pub peer: SocketAddr,
    /// The connection is encrypted (implicit TLS or after STARTTLS).
    pub tls: bool,
    /// The HELO/EHLO name, once given (`None` at connect and at HELO itself).
    pub helo: Option<String>,
    /// The user name after a successful AUTH.
    pub authenticated: Option<String>,
}

impl Client {
    /// A plain-text client at `peer` that has sent nothing yet (for testing
    /// a policy; the server fills in the rest as the session goes on).
    pub fn new(peer: SocketAddr) -> Client {
        Client {
            peer,
            tls: false,
            helo: None,
            authenticated: None,
        }
    }
}

/// A policy's answer at connect, HELO/EHLO and MAIL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// No opinion: ask the next policy, then go on as the server would.
    Continue,
    /// Go on as the server would, without asking the policies after this one.
    Accept,
    /// Refuse for good with this 5xx reply.
    Reject(Reply),
    /// Refuse for now with this 4xx reply: the client may try again later.
    TempFail(Reply),
}

/// A policy's answer at `RCPT TO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptDecision {
    /// No opinion: ask the next policy, then the router (the default
    /// router, or the one given to [`ServerBuilder::router`]).
    ///
    /// [`ServerBuilder::router`]: crate::ServerBuilder::router
    Default,
    /// Route this address instead of the one the client gave: the next
    /// policies and the router see it. Mail delivered to a local mailbox
    /// records the address as given in `X-Original-To:`.
    Rewrite(Address),
    /// Refuse this recipient for good with this 5xx reply.
    Reject(Reply),
    /// Refuse this recipient for now with this 4xx reply.
    TempFail(Reply),
}

/// A policy's answer at the end of DATA, when the whole message is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataDecision {
    /// No opinion: ask the next policy, then store the message.
    Continue,
    /// Store the message without asking the policies after this one.
    Accept,
    /// Add this header (name, value) at the end of the header section, then
    /// ask the next policy. The name must be printable ASCII without `:`,
    /// the value must not contain CR or LF.
    AddHeader(String, String),
    /// Deliver the message to these recipients instead of the transaction's,
    /// each routed as a `RCPT TO` would be, then ask the next policy. A
    /// recipient that the router refuses refuses the message with the
    /// router's reply.
    Reroute(Vec<Address>),
    /// Refuse the message for good with this 5xx reply.
    Reject(Reply),
    /// Refuse the message for now with this 4xx reply.
    TempFail(Reply),
}

/// A received message as the end-of-DATA policy sees it: the envelope, and
/// the content as it will be stored (beginning with this server's
/// `Received:` header).
#[derive(Debug)]
pub struct Message<'a> {
    sender: Option<&'a str>,
    recipients: &'a [RoutedRecipient],
    content: &'a [u8],
}

impl<'a> Message<'a> {
    /// The envelope sender (`MAIL FROM`); `None` for the null sender `<>`.
    pub fn sender(&self) -> Option<&'a str> {
        self.sender
    }

    /// The accepted recipients, as the client gave them in `RCPT TO`.
    pub fn recipients(&self) -> impl Iterator<Item = &'a str> + 'a {
        self.recipients.iter().map(|r| r.address.as_str())
    }

    /// The whole content: header section, blank line, body (CRLF line ends).
    pub fn content(&self) -> &'a [u8] {
        self.content
    }

    /// Every header field in order, as (name, value) with folded lines
    /// joined and surrounding white space removed. Non-UTF-8 bytes are
    /// replaced.
    pub fn headers(&self) -> Vec<(String, String)> {
        let mut headers: Vec<(String, String)> = Vec::new();
        for line in self.content.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.is_empty() {
                break;
            }
            let text = String::from_utf8_lossy(line);
            if line[0] == b' ' || line[0] == b'\t' {
                if let Some((_, value)) = headers.last_mut() {
                    if !value.is_empty() {
                        value.push(' ');
                    }
                    value.push_str(text.trim());
                }
                continue;
            }
            if let Some((name, value)) = text.split_once(':') {
                headers.push((name.trim().to_owned(), value.trim().to_owned()));
            }
        }
        headers
    }

    /// The first header field of this name (any case), unfolded.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers()
            .into_iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// The body: everything after the first empty line (empty if none).
    pub fn body(&self) -> &'a [u8] {
        match header_end(self.content) {
            Some((_, body)) => &self.content[body..],
            None => &[],
        }
    }
}

/// Where the header section ends: the offset of its blank line and of the
/// body after it; `None` when the content has no blank line.
fn header_end(content: &[u8]) -> Option<(usize, usize)> {
    let mut start = 0;
    for line in content.split_inclusive(|&b| b == b'\n') {
        if line == b"\r\n" || line == b"\n" {
            return Some((start, start + line.len()));
        }
        start += line.len();
    }
    None
}

/// Decides at each stage of an SMTP session. Every method has a default
/// that has no opinion, so implement only the stages you need; write them
/// as `async fn`. The returned futures must be `Send` (a policy is shared by
/// the worker threads).
///
/// Each stage is asked only once the server's own checks have passed that
/// command (syntax, sequence, AUTH, size, relay rules run before or after as
/// noted), and never for a command the server refused.
pub trait Policy: Send + Sync + 'static {
    /// A client connected. Refusing sends that reply instead of the `220`
    /// greeting and closes the connection (Postfix answers `554` there).
    fn connect(&self, client: &Client) -> impl Future<Output = Decision> + Send {
        let _ = client;
        async { Decision::Continue }
    }

    /// `HELO`/`EHLO` with a non-empty `name`, before the server answers it.
    /// A refused greeting leaves the session as if it had not been sent.
    fn hello(&self, client: &Client, name: &str) -> impl Future<Output = Decision> + Send {
        let _ = (client, name);
        async { Decision::Continue }
    }

    /// `MAIL FROM` (`None`: the null sender `<>`) that the server accepted
    /// (after its AUTH and sender-ownership checks). Refusing ends the
    /// transaction.
    fn mail(
        &self,
        client: &Client,
        from: Option<&Address>,
    ) -> impl Future<Output = Decision> + Send {
        let _ = (client, from);
        async { Decision::Continue }
    }

    /// `RCPT TO` within the recipient limit, before the router is asked.
    fn rcpt(
        &self,
        client: &Client,
        from: Option<&Address>,
        to: &Address,
    ) -> impl Future<Output = RcptDecision> + Send {
        let _ = (client, from, to);
        async { RcptDecision::Default }
    }

    /// The whole message, after the server's size and hop checks, before it
    /// is stored (nothing is on disk yet; `250` follows only once it is).
    fn data(
        &self,
        client: &Client,
        message: &Message<'_>,
    ) -> impl Future<Output = DataDecision> + Send {
        let _ = (client, message);
        async { DataDecision::Continue }
    }
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// [`Policy`] made object-safe, so that policies of different types can be
/// kept in one list.
pub(crate) trait DynPolicy: Send + Sync {
    fn connect<'a>(&'a self, client: &'a Client) -> BoxFuture<'a, Decision>;
    fn hello<'a>(&'a self, client: &'a Client, name: &'a str) -> BoxFuture<'a, Decision>;
    fn mail<'a>(&'a self, client: &'a Client, from: Option<&'a Address>)
        -> BoxFuture<'a, Decision>;
    fn rcpt<'a>(
        &'a self,
        client: &'a Client,
        from: Option<&'a Address>,
        to: &'a Address,
    ) -> BoxFuture<'a, RcptDecision>;
    fn data<'a>(
        &'a self,
        client: &'a Client,
        message: &'a Message<'a>,
    ) -> BoxFuture<'a, DataDecision>;
}

impl<P: Policy> DynPolicy for P {
    fn connect<'a>(&'a self, client: &'a Client) -> BoxFuture<'a, Decision> {
        Box::pin(Policy::connect(self, client))
    }
    fn hello<'a>(&'a self, client: &'a Client, name: &'a str) -> BoxFuture<'a, Decision> {
        Box::pin(Policy::hello(self, client, name))
    }
    fn mail<'a>(
        &'a self,
        client: &'a Client,
        from: Option<&'a Address>,
    ) -> BoxFuture<'a, Decision> {
        Box::pin(Policy::mail(self, client, from))
    }
    fn rcpt<'a>(
        &'a self,
        client: &'a Client,
        from: Option<&'a Address>,
        to: &'a Address,
    ) -> BoxFuture<'a, RcptDecision> {
        Box::pin(Policy::rcpt(self, client, from, to))
    }
    fn data<'a>(
        &'a self,
        client: &'a Client,
        message: &'a Message<'a>,
    ) -> BoxFuture<'a, DataDecision> {
        Box::pin(Policy::data(self, client, message))
    }
}

/// The registered policies in order, shared by every SMTP connection.
pub(crate) struct Policies {
    list: Vec<Box<dyn DynPolicy>>,
    /// Longest wait for one policy's answer (`smtp.timeout`).
    timeout: Duration,
}

/// What the server answers when a policy failed (panicked, timed out, or
/// gave a malformed reply).
fn policy_failed() -> Reply {
    Reply::new(
        451,
        "4.3.0",
        "Error: temporary policy failure, try again later",
    )
}

/// A policy's refusal, checked: 5xx for a rejection, 4xx for a temporary
/// one, and a text that cannot break the reply's framing.
fn checked(stage: &str, reply: Reply, permanent: bool) -> Reply {
    let code_ok = if permanent {
        reply.is_permanent() && reply.code < 600
    } else {
        reply.is_transient()
    };
    let text_ok = !reply.text.chars().any(|c| c.is_control() && c != '\n');
    let status_ok = reply
        .status
        .as_deref()
        .is_none_or(|s| s.bytes().all(|b| b.is_ascii_digit() || b == b'.'));
    if code_ok && text_ok && status_ok {
        return reply;
    }
    warn!(
        stage,
        code = reply.code,
        text = %escape(reply.text.as_ref()),
        "policy gave a malformed reply ({} must be {})",
        if permanent { "Reject" } else { "TempFail" },
        if permanent { "5xx" } else { "4xx" },
    );
    policy_failed()
}

/// Whether a header that a policy adds is well formed.
fn header_ok(name: &str, value: &str) -> bool {
    !name.is_empty()
        && name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
        && !value.contains(['\r', '\n'])
}

/// What a RCPT round decided.
enum RcptOutcome {
    /// Ask the router about this query (the address perhaps rewritten;
    /// `original` is the address as given when it was).
    Route {
        query: RouteQuery,
        original: Option<String>,
    },
    /// Refused with this reply.
    Refuse(Reply),
}

/// The changes that the end-of-DATA round asks for.
#[derive(Default)]
struct DataChanges {
    headers: Vec<(String, String)>,
    reroute: Option<Vec<Address>>,
}

impl Policies {
    /// Policies in registration order; `timeout` bounds each answer.
    pub(crate) fn new(list: Vec<Box<dyn DynPolicy>>, timeout: Duration) -> Policies {
        Policies { list, timeout }
    }

    /// Runs one policy call, catching a panic and bounding its time.
    async fn guarded<T>(&self, stage: &str, call: impl Future<Output = T>) -> Result<T, Reply> {
        match tokio::time::timeout(self.timeout, AssertUnwindSafe(call).catch_unwind()).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(panic)) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                error!(stage, panic = %escape(&what), "policy panicked");
                Err(policy_failed())
            }
            Err(_) => {
                warn!(stage, timeout = ?self.timeout, "policy did not answer in time");
                Err(policy_failed())
            }
        }
    }

    /// Runs the round of one of the plain stages: `Ok` goes on, `Err` is
    /// the reply to refuse with.
    async fn decide<'a>(
        &'a self,
        stage: &str,
        ask: impl Fn(&'a dyn DynPolicy) -> BoxFuture<'a, Decision>,
    ) -> Result<(), Reply> {
        for policy in &self.list {
            match self.guarded(stage, ask(policy.as_ref())).await? {
                Decision::Continue => {}
                Decision::Accept => break,
                Decision::Reject(reply) => return Err(checked(stage, reply, true)),
                Decision::TempFail(reply) => return Err(checked(stage, reply, false)),
            }
        }
        Ok(())
    }

    /// The connect round.
    pub(crate) async fn connect(&self, client: &Client) -> Result<(), Reply> {
        self.decide("connect", |p| p.connect(client)).await
    }

    /// The HELO/EHLO round.
    pub(crate) async fn hello(&self, client: &Client, name: &str) -> Result<(), Reply> {
        self.decide("helo", |p| p.hello(client, name)).await
    }

    /// The MAIL round.
    pub(crate) async fn mail(&self, client: &Client, from: Option<&Address>) -> Result<(), Reply> {
        self.decide("mail", |p| p.mail(client, from)).await
    }

    /// The RCPT round: the query to route, or a refusal.
    async fn rcpt(&self, client: &Client, mut query: RouteQuery) -> RcptOutcome {
        let mut original = None;
        for policy in &self.list {
            let call = policy.rcpt(client, query.sender.as_ref(), &query.recipient);
            match self.guarded("rcpt", call).await {
                Err(reply) => return RcptOutcome::Refuse(reply),
                Ok(RcptDecision::Default) => {}
                Ok(RcptDecision::Rewrite(to)) => {
                    debug!(from = %escape(&query.recipient.to_string()), to = %escape(&to.to_string()), "policy rewrote a recipient");
                    original.get_or_insert_with(|| query.recipient.canonical());
                    query.recipient = to;
                }
                Ok(RcptDecision::Reject(reply)) => {
                    return RcptOutcome::Refuse(checked("rcpt", reply, true))
                }
                Ok(RcptDecision::TempFail(reply)) => {
                    return RcptOutcome::Refuse(checked("rcpt", reply, false))
                }
            }
        }
        RcptOutcome::Route { query, original }
    }

    /// The end-of-DATA round over `message`: the changes to make, or a
    /// refusal.
    async fn data(&self, client: &Client, message: &Message<'_>) -> Result<DataChanges, Reply> {
        let mut changes = DataChanges::default();
        for policy in &self.list {
            match self.guarded("data", policy.data(client, message)).await? {
                DataDecision::Continue => {}
                DataDecision::Accept => break,
                DataDecision::AddHeader(name, value) => {
                    if !header_ok(&name, &value) {
                        warn!(name = %escape(&name), value = %escape(&value), "policy gave a malformed header");
                        return Err(policy_failed());
                    }
                    changes.headers.push((name, value));
                }
                DataDecision::Reroute(to) => changes.reroute = Some(to),
                DataDecision::Reject(reply) => return Err(checked("data", reply, true)),
                DataDecision::TempFail(reply) => return Err(checked("data", reply, false)),
            }
        }
        Ok(changes)
    }
}

/// What the router answers to [`RouteRecipient`].
pub(crate) type Routed = Result<Result<Route, postino_core::DirectoryError>, actix::MailboxError>;

/// The RCPT stage: asks the policies, then `router` about the query they let
/// through, and records the address as given on local deliveries when a
/// policy rewrote it. Answers as the router does, so the caller handles both
/// paths alike (a refusal is a [`Route::Reject`]).
pub(crate) async fn rcpt(
    policies: Arc<Policies>,
    client: Client,
    query: RouteQuery,
    router: Recipient<RouteRecipient>,
) -> Routed {
    let (query, original) = match policies.rcpt(&client, query).await {
        RcptOutcome::Route { query, original } => (query, original),
        RcptOutcome::Refuse(reply) => return Ok(Ok(Route::Reject(reply))),
    };
    let routed = router.send(RouteRecipient(query)).await;
    let Some(original) = original else {
        return routed;
    };
    let route = match routed? {
        Ok(route) => route,
        Err(e) => return Ok(Err(e)),
    };
    Ok(Ok(match route {
        Route::Deliver(targets) => Route::Deliver(
            targets
                .into_iter()
                .map(|t| match t {
                    Target::Mailbox {
                        mailbox,
                        original: None,
                    } => Target::Mailbox {
                        mailbox,
                        original: Some(original.clone()),
                    },
                    other => other,
                })
                .collect(),
        ),
        other => other,
    }))
}

/// The end-of-DATA stage: asks the policies about `accepted`, then makes
/// the changes they asked for. `query` makes the routing query of a
/// rerouted recipient. `Err` is the reply that refuses
/// the message.
pub(crate) async fn data(
    policies: Arc<Policies>,
    client: Client,
    mut accepted: Accepted,
    query: impl Fn(Address) -> RouteQuery,
    router: Recipient<RouteRecipient>,
) -> Result<Accepted, Reply> {
    let message = Message {
        sender: accepted.sender.as_deref(),
        recipients: &accepted.recipients,
        content: &accepted.content,
    };
    let changes = policies.data(&client, &message).await?;
    apply(
        changes,
        &mut accepted.content,
        &mut accepted.recipients,
        query,
        router,
    )
    .await?;
    Ok(accepted)
}

/// Applies the end-of-DATA changes to an accepted message: headers added at
/// the end of the header section, recipients replaced (each routed by
/// `router` as at RCPT). `Err` is the reply that refuses the message.
async fn apply(
    changes: DataChanges,
    content: &mut Vec<u8>,
    recipients: &mut Vec<RoutedRecipient>,
    query: impl Fn(Address) -> RouteQuery,
    router: Recipient<RouteRecipient>,
) -> Result<(), Reply> {
    if !changes.headers.is_empty() {
        let at = header_end(content)
            .map(|(blank, _)| blank)
            .unwrap_or(content.len());
        let mut added = Vec::new();
        for (name, value) in &changes.headers {
            added.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
        }
        content.splice(at..at, added);
    }
    if let Some(to) = changes.reroute {
        if to.is_empty() {
            warn!("policy rerouted a message to no recipient");
            return Err(policy_failed());
        }
        let mut rerouted = Vec::with_capacity(to.len());
        for address in to {
            match router.send(RouteRecipient(query(address.clone()))).await {
                Ok(Ok(Route::Reject(reply))) => return Err(reply),
                Ok(Ok(route)) => rerouted.push(RoutedRecipient {
                    address: address.to_string(),
                    route,
                }),
                Ok(Err(e)) => {
                    warn!(error = %e, "routing a rerouted recipient failed");
                    return Err(policy_failed());
                }
                Err(e) => {
                    warn!(error = %e, "router unavailable");
                    return Err(policy_failed());
                }
            }
        }
        debug!(
            to = %escape(&rerouted.iter().map(|r| r.address.as_str()).collect::<Vec<_>>().join(",")),
            "policy rerouted a message"
        );
        *recipients = rerouted;
    }
    Ok(())
}

#[cfg(test)]
fn message<'a>(
    sender: Option<&'a str>,
    recipients: &'a [RoutedRecipient],
    content: &'a [u8],
) -> Message<'a> {
    Message {
        sender,
        recipients,
        content,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_unfolded_and_end_at_the_blank_line() {
        let content = b"Received: from x\r\n\tby y;\r\nSubject: a\r\n b\r\nX-Flag:\r\n  yes\r\n\r\nX-Not: header\r\n";
        let m = message(None, &[], content);
        assert_eq!(
            m.headers(),
            [
                ("Received".to_owned(), "from x by y;".to_owned()),
                ("Subject".to_owned(), "a b".to_owned()),
                ("X-Flag".to_owned(), "yes".to_owned()),
            ]
        );
        assert_eq!(m.header("subject").as_deref(), Some("a b"));
        assert_eq!(m.header("x-not"), None);
        assert_eq!(m.body(), b"X-Not: header\r\n");
    }

    #[test]
    fn refusals_must_have_the_right_class() {
        let ok = Reply::new(550, "5.7.1", "no");
        assert_eq!(checked("rcpt", ok.clone(), true), ok);
        for (reply, permanent) in [
            (Reply::new(450, "4.7.1", "no"), true),
            (Reply::new(250, "2.0.0", "ok"), true),
            (Reply::new(550, "5.7.1", "no"), false),
            (Reply::new(650, "6.0.0", "no"), true),
            (Reply::new(550, "5.7.1", "a\r\n250 ok"), true),
        ] {
            assert_eq!(checked("rcpt", reply, permanent).code, 451);
        }
    }

    #[test]
    fn added_headers_are_checked() {
        assert!(header_ok("X-Filter", "passed"));
        assert!(!header_ok("X Filter", "passed"));
        assert!(!header_ok("X-Filter:", "passed"));
        assert!(!header_ok("X-Filter", "a\r\nBcc: x"));
    }
}
