//! The SMTP server session state machine (RFC 5321, 1869, 2920, 3207, 4954,
//! 6409): commands in, replies and requests for the caller out. No IO.
//!
//! The caller (an actor) frames lines with a [`LineReceiver`], feeds each to
//! [`Session::command`], and acts on the returned [`Step`]: send a reply, ask
//! the router where a recipient goes, receive DATA, verify credentials, start
//! TLS, or close. Pipelined commands are simply fed one after another; the
//! caller flushes its replies when no complete command is buffered.
//!
//! [`LineReceiver`]: super::LineReceiver

use std::net::IpAddr;

use crate::address::Address;
use crate::logsafe::Secret;
use crate::message::{MessageId, Recipient};
use crate::routing::Route;
use crate::smtp::receiver::{DataError, LineError};
use crate::smtp::request::{MailParams, Request, RequestError};
use crate::smtp::Reply;

/// What a session needs to know about the server, shared by all sessions of
/// one listener.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub hostname: String,
    pub max_message_size: u64,
    pub max_recipients: usize,
    pub hop_limit: usize,
    pub soft_error_limit: u32,
    pub hard_error_limit: u32,
    /// TLS can be started (a certificate is configured).
    pub tls_available: bool,
    /// AUTH is offered; required before MAIL on submission listeners.
    pub auth_available: bool,
    pub auth_required: bool,
    /// AUTH may be used without TLS.
    pub allow_plaintext_auth: bool,
    /// Domain for a bare `RCPT TO:<postmaster>` (the first local domain).
    pub postmaster_domain: String,
}

/// The client as the listener saw it.
#[derive(Debug, Clone)]
pub struct Peer {
    pub ip: IpAddr,
    /// The client address is in `relay_networks`.
    pub trusted: bool,
    /// The connection is already encrypted (implicit TLS).
    pub tls: bool,
}

/// What the caller must do next. `Debug` leaves the password out.
pub enum Step {
    /// Send this reply and read the next command.
    Reply(Reply),
    /// Ask the router where this recipient goes, then pass the answer to
    /// [`Session::routed`] and send the reply it returns.
    Route(RouteQuery),
    /// Send this `354` reply, then receive the content with a
    /// [`DataReceiver`](super::DataReceiver) limited to
    /// [`Session::data_limit`] and hand the result to [`Session::data_done`].
    Data(Reply),
    /// Check these credentials, then call [`Session::authenticated`].
    Authenticate { user: String, password: String },
    /// Send this `334` challenge and pass the client's next line to
    /// [`Session::auth_response`] instead of [`Session::command`].
    AuthChallenge(Reply),
    /// The sender of an authenticated client must be one of its addresses:
    /// check it, then call [`Session::sender_checked`].
    CheckSender { user: String, sender: String },
    /// Send this `220` reply, discard any input buffered so far, run the TLS
    /// handshake, then call [`Session::tls_started`].
    StartTls(Reply),
    /// Send this reply and close the connection.
    Close(Reply),
}

impl std::fmt::Debug for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Reply(r) => f.debug_tuple("Reply").field(r).finish(),
            Step::Route(q) => f.debug_tuple("Route").field(q).finish(),
            Step::Data(r) => f.debug_tuple("Data").field(r).finish(),
            Step::Authenticate { user, .. } => f
                .debug_struct("Authenticate")
                .field("user", user)
                .field("password", &Secret::new(()))
                .finish(),
            Step::AuthChallenge(r) => f.debug_tuple("AuthChallenge").field(r).finish(),
            Step::CheckSender { user, sender } => f
                .debug_struct("CheckSender")
                .field("user", user)
                .field("sender", sender)
                .finish(),
            Step::StartTls(r) => f.debug_tuple("StartTls").field(r).finish(),
            Step::Close(r) => f.debug_tuple("Close").field(r).finish(),
        }
    }
}

/// A recipient waiting for a routing decision.
#[derive(Debug, Clone)]
pub struct RouteQuery {
    pub recipient: Address,
    pub sender: Option<Address>,
    /// The client may send to other domains (trusted network or AUTH).
    pub may_relay: bool,
    pub client: IpAddr,
    pub authenticated: Option<String>,
}

/// What [`Session::data_done`] asks of the caller.
#[derive(Debug)]
pub enum DataStep {
    /// Store this message durably, then send [`Session::accepted`]'s reply.
    Accept(Accepted),
    /// Refuse it with this reply; the session goes on.
    Reply(Reply),
    /// Refuse it and close.
    Close(Reply),
}

/// A complete, accepted-for-storage message.
#[derive(Debug)]
pub struct Accepted {
    pub id: MessageId,
    pub sender: Option<String>,
    pub recipients: Vec<Recipient>,
    pub helo: String,
    /// The content, starting with our `Received:` header.
    pub content: Vec<u8>,
}

#[derive(Debug)]
struct Transaction {
    sender: Option<Address>,
    /// `MAIL` carried `SMTPUTF8`: UTF-8 recipients are allowed (RFC 6531).
    smtputf8: bool,
    recipients: Vec<Recipient>,
    /// Recipients asked about, accepted or not (for the RCPT limit).
    rcpt_commands: usize,
    /// The recipient whose routing decision is awaited.
    pending: Option<Address>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AuthState {
    None,
    /// `AUTH PLAIN` without initial response: waiting for it.
    Plain,
    /// `AUTH LOGIN`: waiting for the user name.
    LoginUser,
    /// `AUTH LOGIN`: waiting for the password.
    LoginPassword,
}

/// One SMTP server session.
#[derive(Debug)]
pub struct Session {
    config: std::sync::Arc<SessionConfig>,
    peer: Peer,
    tls: bool,
    helo: Option<String>,
    esmtp: bool,
    tx: Option<Transaction>,
    authenticated: Option<String>,
    auth: AuthState,
    login_user: String,
    errors: u32,
    /// Free space is below the reserve: `MAIL` gets `452 4.3.1`.
    storage_low: bool,
}

const SYNTAX_HELO: &str = "Syntax: HELO hostname";
const SYNTAX_EHLO: &str = "Syntax: EHLO hostname";

fn ok() -> Reply {
    Reply::new(250, "2.0.0", "Ok")
}

impl Session {
    pub fn new(config: std::sync::Arc<SessionConfig>, peer: Peer) -> Session {
        let tls = peer.tls;
        Session {
            config,
            peer,
            tls,
            helo: None,
            esmtp: false,
            tx: None,
            authenticated: None,
            auth: AuthState::None,
            login_user: String::new(),
            errors: 0,
            storage_low: false,
        }
    }

    /// Tells the session whether free space is below the reserve; the
    /// caller sets it before each `MAIL` (`store.min_free`).
    pub fn set_storage_low(&mut self, low: bool) {
        self.storage_low = low;
    }

    /// The `220` banner.
    pub fn greeting(&self) -> Reply {
        Reply::plain(220, format!("{} ESMTP postino", self.config.hostname))
    }

    /// The user name after a successful AUTH.
    pub fn authenticated_user(&self) -> Option<&str> {
        self.authenticated.as_deref()
    }

    /// The HELO/EHLO name the client gave, if any (for logs).
    pub fn helo(&self) -> Option<&str> {
        self.helo.as_deref()
    }

    /// `"ESMTP"` after EHLO, `"SMTP"` otherwise (Postfix's `proto=`).
    pub fn proto(&self) -> &'static str {
        if self.esmtp {
            "ESMTP"
        } else {
            "SMTP"
        }
    }

    /// The current transaction's sender: `Some("")` for the null sender,
    /// `None` outside a transaction (for logs).
    pub fn sender(&self) -> Option<String> {
        let tx = self.tx.as_ref()?;
        Some(
            tx.sender
                .as_ref()
                .map(|a| a.to_string())
                .unwrap_or_default(),
        )
    }

    /// Errors so far; past `soft_error_limit` the caller delays each reply.
    pub fn should_delay(&self) -> bool {
        self.errors > self.config.soft_error_limit
    }

    /// The content size limit for the DATA receiver.
    pub fn data_limit(&self) -> u64 {
        self.config.max_message_size
    }

    /// Whether the session is inside a transaction (for the idle timeout
    /// reply and logs).
    pub fn in_transaction(&self) -> bool {
        self.tx.is_some()
    }

    /// Whether the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// Counts an error reply; past the hard limit the session ends.
    fn error(&mut self, reply: Reply) -> Step {
        self.errors += 1;
        match self.error_limit_reply() {
            Some(close) => Step::Close(close),
            None => Step::Reply(reply),
        }
    }

    /// The `421` that ends the session once the hard error limit is
    /// reached. Replies that do not come as a [`Step`] (to [`routed`],
    /// [`sender_checked`], [`data_done`]) count errors too: after sending
    /// one, the caller checks this, so that a client probing addresses with
    /// RCPT (a directory harvest) is cut off like any other.
    ///
    /// [`routed`]: Session::routed
    /// [`sender_checked`]: Session::sender_checked
    /// [`data_done`]: Session::data_done
    pub fn error_limit_reply(&self) -> Option<Reply> {
        (self.errors >= self.config.hard_error_limit).then(|| {
            Reply::new(
                421,
                "4.7.0",
                format!("{} Error: too many errors", self.config.hostname),
            )
        })
    }

    /// An unparseable line, as the [`LineReceiver`](super::LineReceiver)
    /// or [`Request::parse`] reported it.
    pub fn bad_line(&mut self, reply: Reply) -> Step {
        self.error(reply)
    }

    /// The [`LineReceiver`](super::LineReceiver) dropped a line longer than
    /// its limit ([`LineError::TooLong`]). Inside an AUTH exchange that line
    /// was the client's SASL response: the exchange ends there with
    /// `500 5.5.6` (as Postfix answers, RFC 4954 §4), so that the next line
    /// is read as a command again and not as a credential. It counts as a
    /// protocol error, not as a failed login.
    pub fn line_too_long(&mut self) -> Step {
        if self.in_auth() {
            self.auth = AuthState::None;
            self.login_user.clear();
            return self.error(Reply::new(500, "5.5.6", "SASL response limit exceeded"));
        }
        self.error(LineError::TooLong.reply())
    }

    fn auth_offered(&self) -> bool {
        self.config.auth_available && (self.tls || self.config.allow_plaintext_auth)
    }

    fn may_relay(&self) -> bool {
        self.peer.trusted || self.authenticated.is_some()
    }

    /// Handles one parsed command.
    pub fn command(&mut self, request: Request) -> Step {
        match request {
            Request::Ehlo { host } => self.hello(host, true),
            Request::Helo { host } => self.hello(host, false),
            Request::Mail { from, params } => self.mail(from, params),
            Request::Rcpt { to, .. } => self.rcpt(to),
            Request::Data => self.data(),
            Request::Rset => {
                self.tx = None;
                Step::Reply(ok())
            }
            Request::Noop => Step::Reply(ok()),
            Request::Quit => Step::Close(Reply::new(221, "2.0.0", "Bye")),
            Request::Help => Step::Reply(Reply::new(
                214,
                "2.0.0",
                "Commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT HELP VRFY STARTTLS AUTH",
            )),
            Request::Vrfy(_) => {
                Step::Reply(Reply::new(252, "2.0.0", "Send some mail, I'll try my best"))
            }
            Request::Expn(_) => self.error(Reply::new(502, "5.5.1", "EXPN not available")),
            Request::StartTls => self.starttls(),
            Request::Auth { mechanism, initial } => self.auth(mechanism, initial),
            Request::Bdat { .. } => {
                self.error(Reply::new(502, "5.5.1", "Error: CHUNKING not supported"))
            }
            Request::Unknown(_) => {
                self.error(Reply::new(502, "5.5.2", "Error: command not recognized"))
            }
        }
    }

    fn hello(&mut self, host: String, esmtp: bool) -> Step {
        if host.is_empty() {
            let text = if esmtp { SYNTAX_EHLO } else { SYNTAX_HELO };
            return self.error(Reply::new(501, "5.5.2", text));
        }
        self.helo = Some(host);
        self.esmtp = esmtp;
        self.tx = None;
        if !esmtp {
            return Step::Reply(Reply::plain(250, self.config.hostname.clone()));
        }
        let mut text = format!(
            "{}\nPIPELINING\nSIZE {}",
            self.config.hostname, self.config.max_message_size
        );
        if self.config.tls_available && !self.tls {
            text.push_str("\nSTARTTLS");
        }
        if self.auth_offered() && self.authenticated.is_none() {
            text.push_str("\nAUTH PLAIN LOGIN");
        }
        text.push_str("\nENHANCEDSTATUSCODES\n8BITMIME\nSMTPUTF8");
        Step::Reply(Reply::plain(250, text))
    }

    fn mail(&mut self, from: Option<Address>, params: MailParams) -> Step {
        if self.helo.is_none() {
            return self.error(Reply::new(503, "5.5.1", "Error: send HELO/EHLO first"));
        }
        if self.tx.is_some() {
            return self.error(Reply::new(503, "5.5.1", "Error: nested MAIL command"));
        }
        if self.config.auth_required && self.authenticated.is_none() {
            return self.error(Reply::new(530, "5.7.0", "Authentication required"));
        }
        if params
            .size
            .is_some_and(|s| s > self.config.max_message_size)
        {
            return self.error(Reply::new(552, "5.3.4", "Message size exceeds fixed limit"));
        }
        if self.storage_low {
            // Postfix queue_minfree: refused before the client sends any
            // content, and not counted as a client error.
            return Step::Reply(Reply::new(452, "4.3.1", "Insufficient system storage"));
        }
        if let (Some(user), Some(sender)) = (&self.authenticated, &from) {
            let (user, sender) = (user.clone(), sender.canonical());
            self.tx = Some(Transaction::new(from, params.smtputf8));
            return Step::CheckSender { user, sender };
        }
        self.tx = Some(Transaction::new(from, params.smtputf8));
        Step::Reply(Reply::new(250, "2.1.0", "Ok"))
    }

    /// The answer to [`Step::CheckSender`].
    pub fn sender_checked(&mut self, allowed: bool) -> Reply {
        if allowed {
            return Reply::new(250, "2.1.0", "Ok");
        }
        let sender = self
            .tx
            .take()
            .and_then(|t| t.sender)
            .map(|a| a.to_string())
            .unwrap_or_default();
        self.errors += 1;
        Reply::new(
            553,
            "5.7.1",
            format!(
                "<{sender}>: Sender address rejected: not owned by user {}",
                self.authenticated.as_deref().unwrap_or("")
            ),
        )
    }

    /// [`Step::CheckSender`] could not be answered (a store error): the
    /// MAIL command is refused for now, not for good.
    pub fn sender_check_failed(&mut self) -> Reply {
        self.tx = None;
        Reply::new(
            451,
            "4.3.0",
            "Error: temporary failure checking the sender, try again later",
        )
    }

    fn rcpt(&mut self, mut to: Address) -> Step {
        let Some(smtputf8) = self.tx.as_ref().map(|tx| tx.smtputf8) else {
            return self.error(Reply::new(503, "5.5.1", "Error: need MAIL command"));
        };
        // The request parser allows UTF-8 in RCPT because only the session
        // knows whether this transaction's MAIL declared SMTPUTF8.
        if to.needs_smtputf8() && !smtputf8 {
            return self.error(RequestError::NonAsciiRecipient.reply());
        }
        let Some(tx) = &mut self.tx else {
            return self.error(Reply::new(503, "5.5.1", "Error: need MAIL command"));
        };
        if tx.rcpt_commands >= self.config.max_recipients {
            // Not counted as an error: clients are expected to send the rest later.
            return Step::Reply(Reply::new(452, "4.5.3", "Error: too many recipients"));
        }
        tx.rcpt_commands += 1;
        if to.domain.is_empty() {
            // RFC 5321 §4.1.1.3: `RCPT TO:<Postmaster>` without a domain.
            to = Address::parse(
                &format!("postmaster@{}", self.config.postmaster_domain),
                false,
            )
            .unwrap_or(to);
        }
        tx.pending = Some(to.clone());
        Step::Route(RouteQuery {
            recipient: to,
            sender: tx.sender.clone(),
            may_relay: self.peer.trusted || self.authenticated.is_some(),
            client: self.peer.ip,
            authenticated: self.authenticated.clone(),
        })
    }

    /// The router's answer to [`Step::Route`]; returns the RCPT reply.
    pub fn routed(&mut self, route: Route) -> Reply {
        let Some(tx) = &mut self.tx else {
            return Reply::new(503, "5.5.1", "Error: need MAIL command");
        };
        let Some(address) = tx.pending.take() else {
            return Reply::new(503, "5.5.1", "Error: no recipient pending");
        };
        match route {
            Route::Reject(reply) => {
                self.errors += 1;
                reply
            }
            route => {
                tx.recipients.push(Recipient {
                    address: address.to_string(),
                    route,
                });
                Reply::new(250, "2.1.5", "Ok")
            }
        }
    }

    /// The router failed (actor gone, store error): a temporary refusal.
    pub fn route_failed(&mut self) -> Reply {
        if let Some(tx) = &mut self.tx {
            tx.pending = None;
        }
        Reply::new(
            451,
            "4.3.0",
            "Error: temporary routing failure, try again later",
        )
    }

    fn data(&mut self) -> Step {
        let Some(tx) = &self.tx else {
            return self.error(Reply::new(503, "5.5.1", "Error: need MAIL command"));
        };
        if tx.recipients.is_empty() {
            if tx.rcpt_commands > 0 {
                // RFC 2920: with pipelining, all RCPTs may have failed.
                return self.error(Reply::new(554, "5.5.1", "Error: no valid recipients"));
            }
            return self.error(Reply::new(503, "5.5.1", "Error: need RCPT command"));
        }
        Step::Data(Reply::plain(354, "End data with <CR><LF>.<CR><LF>"))
    }

    /// The DATA receiver finished. On success the caller allocated `id` for
    /// the message; `date` is the RFC 5322 date for the `Received:` header.
    pub fn data_done(
        &mut self,
        result: Result<Vec<u8>, DataError>,
        id: MessageId,
        date: &str,
    ) -> DataStep {
        let Some(tx) = self.tx.take() else {
            return DataStep::Reply(Reply::new(503, "5.5.1", "Error: need MAIL command"));
        };
        let content = match result {
            Ok(content) => content,
            Err(DataError::TooBig) => {
                self.errors += 1;
                return DataStep::Reply(Reply::new(552, "5.3.4", "Error: message file too big"));
            }
            Err(DataError::BareLineEnding) => {
                return DataStep::Close(Reply::new(
                    550,
                    "5.5.2",
                    "Error: bare <CR> or <LF> received; closing (see RFC 5321 section 2.3.8)",
                ));
            }
        };
        if count_received(&content) >= self.config.hop_limit {
            self.errors += 1;
            return DataStep::Reply(Reply::new(554, "5.4.0", "Error: too many hops"));
        }
        let helo = self.helo.clone().unwrap_or_default();
        let received = self.received_header(&helo, id, &tx, date);
        let mut full = Vec::with_capacity(received.len() + content.len());
        full.extend_from_slice(received.as_bytes());
        full.extend_from_slice(&content);
        DataStep::Accept(Accepted {
            id,
            sender: tx.sender.as_ref().map(|a| a.to_string()),
            recipients: tx.recipients,
            helo,
            content: full,
        })
    }

    /// Forgets the transaction (storage could not even start).
    pub fn abort_transaction(&mut self) {
        self.tx = None;
    }

    /// The reply once the message is durably stored.
    pub fn accepted(&self, id: MessageId) -> Reply {
        Reply::new(250, "2.0.0", format!("Ok: queued as {id}"))
    }

    /// The reply when storing failed: nothing was promised, the client retries.
    pub fn storage_failed(&self) -> Reply {
        Reply::new(451, "4.3.0", "Error: queue file write error")
    }

    fn received_header(&self, helo: &str, id: MessageId, tx: &Transaction, date: &str) -> String {
        let protocol = match (self.esmtp, self.tls, self.authenticated.is_some()) {
            (false, _, _) => "SMTP",
            (true, false, false) => "ESMTP",
            (true, true, false) => "ESMTPS",
            (true, false, true) => "ESMTPA",
            (true, true, true) => "ESMTPSA",
        };
        let for_clause = match tx.recipients.as_slice() {
            [one] => format!("\r\n\tfor <{}>", one.address),
            _ => String::new(),
        };
        // The HELO name is client-controlled: keep it to printable ASCII so it
        // cannot inject header lines.
        let helo: String = helo
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .take(255)
            .collect();
        format!(
            "Received: from {helo} ([{ip}])\r\n\tby {host} (postino) with {protocol} id {id}{for_clause};\r\n\t{date}\r\n",
            ip = self.peer.ip,
            host = self.config.hostname,
        )
    }

    fn starttls(&mut self) -> Step {
        if self.tls {
            return self.error(Reply::new(554, "5.5.1", "Error: TLS already active"));
        }
        if !self.config.tls_available {
            return self.error(Reply::new(502, "5.5.1", "Error: command not implemented"));
        }
        Step::StartTls(Reply::new(220, "2.0.0", "Ready to start TLS"))
    }

    /// TLS is up: forget everything learned before it (RFC 3207 §4.2).
    pub fn tls_started(&mut self) {
        self.tls = true;
        self.helo = None;
        self.esmtp = false;
        self.tx = None;
        self.authenticated = None;
        self.auth = AuthState::None;
    }

    fn auth(&mut self, mechanism: String, initial: Option<Secret>) -> Step {
        if !self.config.auth_available {
            return self.error(Reply::new(
                502,
                "5.5.1",
                "Error: authentication not enabled",
            ));
        }
        if !self.tls && !self.config.allow_plaintext_auth {
            return self.error(Reply::new(
                538,
                "5.7.11",
                "Encryption required for requested authentication mechanism",
            ));
        }
        if self.helo.is_none() || !self.esmtp {
            return self.error(Reply::new(503, "5.5.1", "Error: send EHLO first"));
        }
        if self.authenticated.is_some() {
            return self.error(Reply::new(503, "5.5.1", "Error: already authenticated"));
        }
        if self.tx.is_some() {
            return self.error(Reply::new(
                503,
                "5.5.1",
                "Error: MAIL transaction in progress",
            ));
        }
        match mechanism.as_str() {
            "PLAIN" => match initial {
                Some(resp) => self.auth_plain(resp.expose()),
                None => {
                    self.auth = AuthState::Plain;
                    Step::AuthChallenge(Reply::plain(334, ""))
                }
            },
            "LOGIN" => match initial {
                Some(user) => {
                    self.auth = AuthState::LoginUser;
                    self.auth_response(user.expose().as_bytes())
                }
                None => {
                    self.auth = AuthState::LoginUser;
                    Step::AuthChallenge(Reply::plain(334, "VXNlcm5hbWU6"))
                }
            },
            _ => self.error(Reply::new(
                504,
                "5.5.4",
                "Error: Unsupported authentication mechanism",
            )),
        }
    }

    /// Whether the next line is an AUTH continuation, not a command.
    pub fn in_auth(&self) -> bool {
        self.auth != AuthState::None
    }

    /// A client line sent in answer to a `334` challenge.
    pub fn auth_response(&mut self, line: &[u8]) -> Step {
        let state = std::mem::replace(&mut self.auth, AuthState::None);
        if line == b"*" {
            return self.error(Reply::new(501, "5.7.0", "Authentication aborted"));
        }
        let Some(decoded) = decode_base64(line) else {
            return self.error(Reply::new(501, "5.5.2", "Cannot decode response"));
        };
        match state {
            AuthState::None => self.error(Reply::new(503, "5.5.1", "Error: no AUTH in progress")),
            AuthState::Plain => {
                let text = String::from_utf8_lossy(line).into_owned();
                self.auth_plain(&text)
            }
            AuthState::LoginUser => {
                self.login_user = String::from_utf8_lossy(&decoded).into_owned();
                self.auth = AuthState::LoginPassword;
                Step::AuthChallenge(Reply::plain(334, "UGFzc3dvcmQ6"))
            }
            AuthState::LoginPassword => Step::Authenticate {
                user: std::mem::take(&mut self.login_user),
                password: String::from_utf8_lossy(&decoded).into_owned(),
            },
        }
    }

    fn auth_plain(&mut self, initial: &str) -> Step {
        let Some(decoded) = decode_base64(initial.as_bytes()) else {
            return self.error(Reply::new(501, "5.5.2", "Cannot decode response"));
        };
        let mut parts = decoded.split(|&b| b == 0);
        let (Some(authz), Some(user), Some(pass), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return self.error(Reply::new(501, "5.5.2", "Invalid AUTH PLAIN response"));
        };
        if !authz.is_empty() && authz != user {
            return self.error(Reply::new(
                535,
                "5.7.8",
                "Error: authentication failed: authorization identity not allowed",
            ));
        }
        Step::Authenticate {
            user: String::from_utf8_lossy(user).into_owned(),
            password: String::from_utf8_lossy(pass).into_owned(),
        }
    }

    /// The answer to [`Step::Authenticate`]: `Some(canonical user)` on success.
    pub fn authenticated(&mut self, user: Option<String>) -> Step {
        match user {
            Some(user) => {
                self.authenticated = Some(user);
                Step::Reply(Reply::new(235, "2.7.0", "Authentication successful"))
            }
            None => self.error(Reply::new(535, "5.7.8", "Error: authentication failed")),
        }
    }

    /// [`Step::Authenticate`] could not be answered (a store error): RFC
    /// 4954's temporary failure, so the client may try again later.
    pub fn authentication_unavailable(&self) -> Step {
        Step::Reply(Reply::new(454, "4.7.0", "Temporary authentication failure"))
    }

    /// Whether recipients in other domains are allowed.
    pub fn relay_allowed(&self) -> bool {
        self.may_relay()
    }
}

impl Transaction {
    fn new(sender: Option<Address>, smtputf8: bool) -> Transaction {
        Transaction {
            sender,
            smtputf8,
            recipients: Vec::new(),
            rcpt_commands: 0,
            pending: None,
        }
    }
}

fn decode_base64(input: &[u8]) -> Option<Vec<u8>> {
    use base64::Engine;
    if input == b"=" {
        return Some(Vec::new());
    }
    base64::engine::general_purpose::STANDARD
        .decode(input.trim_ascii())
        .ok()
}

/// Counts `Received:` headers in the header section (mail loop detection).
pub fn count_received(content: &[u8]) -> usize {
    let mut count = 0;
    for line in content.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        if line.len() >= 9 && line[..9].eq_ignore_ascii_case(b"received:") {
            count += 1;
        }
    }
    count
}

#[cfg(test)]
mod tests;
