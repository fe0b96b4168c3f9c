//! The SMTP server session state machine (RFC 5321, 1869, 2920, 3207, 4954,
//! 6409): commands in, replies and requests for the caller out. No IO.
//!
//! The session owns its receiving mode: command lines ([`LineReceiver`]),
//! SASL responses after a `334`, message content after a `354`
//! ([`DataReceiver`]), and the octets of a `BDAT` chunk (RFC 3030,
//! [`ChunkReceiver`]). The caller reads bytes into one buffer and calls
//! [`Session::ingest`] until it answers [`Step::Read`]; every other answer is
//! one [`Step`]: send a reply (perhaps after a delay), ask the router where a
//! recipient goes, verify credentials, start TLS, take a finished message, or
//! close. The caller never switches modes, and error limits (too many errors,
//! overlong lines, overlong SASL responses) are applied here, whatever
//! answer ends in an error. Pipelined commands are simply taken one after
//! another from the buffer; the caller flushes its replies when it reads.

use std::net::IpAddr;
use std::time::Duration;

use bytes::BytesMut;

use crate::address::Address;
use crate::config::BareLf;
use crate::esmtp::{EnvelopeParams, RecipientParams};
use crate::logsafe::Secret;
use crate::message::{MessageId, RoutedRecipient};
use crate::routing::Route;
use crate::smtp::receiver::{ChunkReceiver, DataError, DataReceiver, LineError, LineReceiver};
use crate::smtp::request::{MailParams, RcptParams, Request, RequestError};
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
    /// Longest command line, CRLF included (`smtp.max_line_length`).
    pub max_line_length: usize,
    /// Bare CR or LF in commands and content (`smtp.bare_lf`).
    pub bare_lf: BareLf,
    /// Past `soft_error_limit`, how long each error reply is held back
    /// (`smtp.error_delay`, Postfix's `smtpd_error_sleep_time`).
    pub error_delay: Duration,
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

/// What the caller must do next: the session's one answer to
/// [`Session::ingest`] and to every result the caller hands back. `Debug`
/// leaves the password out.
#[must_use]
pub enum Step {
    /// No complete command (or, during DATA, not the end of the content;
    /// after BDAT, not the rest of the chunk) is buffered: flush the
    /// replies, read more input, call [`Session::ingest`] again.
    Read,
    /// A command line was taken from the buffer, about to be carried out:
    /// count or log it, then call [`Session::ingest`] again, which answers
    /// it. Lines sent as SASL responses are not commands and come without.
    Command(Command),
    /// Send this reply, then (after `delay`, when there is one: the tarpit
    /// for a client past the soft error limit) call [`Session::ingest`]
    /// again.
    Reply {
        reply: Reply,
        delay: Option<Duration>,
    },
    /// Ask the router where this recipient goes, then pass the answer to
    /// [`Session::routed`] (or [`Session::route_failed`]).
    Route(RouteQuery),
    /// Check these credentials, then call [`Session::authenticated`] (or
    /// [`Session::authentication_unavailable`]).
    Authenticate { user: String, password: String },
    /// The sender of an authenticated client must be one of its addresses:
    /// check it, then call [`Session::sender_checked`] (or
    /// [`Session::sender_check_failed`]).
    CheckSender { user: String, sender: String },
    /// Send this `220` reply, discard any input buffered so far, run the TLS
    /// handshake, then call [`Session::tls_started`].
    StartTls(Reply),
    /// The content after DATA, or the last `BDAT` chunk, is complete:
    /// allocate the message's queue id and call [`Session::data_done`] (or
    /// [`Session::id_unavailable`]).
    EndOfData,
    /// The message is accepted for storage: store it durably, then send
    /// [`Session::accepted`]'s reply (or [`Session::storage_failed`]'s) and
    /// call [`Session::ingest`] again.
    Message(Accepted),
    /// Send this reply and close the connection.
    Close(Reply),
}

impl std::fmt::Debug for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Read => f.write_str("Read"),
            Step::Command(c) => f.debug_tuple("Command").field(c).finish(),
            Step::Reply { reply, delay } => f
                .debug_struct("Reply")
                .field("reply", reply)
                .field("delay", delay)
                .finish(),
            Step::Route(q) => f.debug_tuple("Route").field(q).finish(),
            Step::Authenticate { user, .. } => f
                .debug_struct("Authenticate")
                .field("user", user)
                .field("password", &Secret::new(()))
                .finish(),
            Step::CheckSender { user, sender } => f
                .debug_struct("CheckSender")
                .field("user", user)
                .field("sender", sender)
                .finish(),
            Step::StartTls(r) => f.debug_tuple("StartTls").field(r).finish(),
            Step::EndOfData => f.write_str("EndOfData"),
            Step::Message(m) => f.debug_tuple("Message").field(m).finish(),
            Step::Close(r) => f.debug_tuple("Close").field(r).finish(),
        }
    }
}

/// A command line as the session took it, for the caller's counters and
/// logs ([`Step::Command`]).
#[derive(Debug)]
pub struct Command {
    /// The command's name as Postfix's smtpd counts it in its `disconnect
    /// from` line (`helo`, `ehlo`, `mail`, `rcpt`, `data`, …); `unknown`
    /// for an unrecognised, unparseable or overlong line.
    pub name: &'static str,
    /// MAIL's sender as the client gave it (`""` for the null sender).
    pub from: Option<String>,
    /// RCPT's recipient as the client gave it.
    pub to: Option<String>,
    /// AUTH's mechanism.
    pub mechanism: Option<String>,
    /// The line that parsed, for [`request::loggable`](super::request::loggable);
    /// `None` when it did not parse.
    pub line: Option<BytesMut>,
}

impl Command {
    fn of(request: &Request, line: BytesMut) -> Command {
        let name = match request {
            Request::Helo { .. } => "helo",
            Request::Ehlo { .. } => "ehlo",
            Request::StartTls => "starttls",
            Request::Auth { .. } => "auth",
            Request::Mail { .. } => "mail",
            Request::Rcpt { .. } => "rcpt",
            Request::Data => "data",
            Request::Bdat { .. } => "bdat",
            Request::Rset => "rset",
            Request::Noop => "noop",
            Request::Vrfy(_) => "vrfy",
            Request::Expn(_) => "expn",
            Request::Help => "help",
            Request::Quit => "quit",
            Request::Unknown(_) => "unknown",
        };
        let mut command = Command::unknown();
        command.name = name;
        command.line = Some(line);
        match request {
            Request::Mail { from, .. } => {
                command.from = Some(from.as_ref().map(|a| a.to_string()).unwrap_or_default())
            }
            Request::Rcpt { to, .. } => command.to = Some(to.to_string()),
            Request::Auth { mechanism, .. } => command.mechanism = Some(mechanism.clone()),
            _ => {}
        }
        command
    }

    fn unknown() -> Command {
        Command {
            name: "unknown",
            from: None,
            to: None,
            mechanism: None,
            line: None,
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

/// A complete, accepted-for-storage message.
#[derive(Debug)]
pub struct Accepted {
    pub id: MessageId,
    pub sender: Option<String>,
    pub recipients: Vec<RoutedRecipient>,
    pub helo: String,
    /// The content, starting with our `Received:` header.
    pub content: Vec<u8>,
    /// DSN parameters and SMTPUTF8 (RFC 3461, 6531); `None` when the
    /// client sent none.
    pub params: Option<Box<EnvelopeParams>>,
}

#[derive(Debug)]
struct Transaction {
    sender: Option<Address>,
    /// `MAIL` carried `SMTPUTF8`: UTF-8 recipients are allowed (RFC 6531).
    smtputf8: bool,
    /// `RET`, `ENVID`, `SMTPUTF8`, and the accepted recipients' `NOTIFY`
    /// and `ORCPT`.
    params: EnvelopeParams,
    recipients: Vec<RoutedRecipient>,
    /// Recipients asked about, accepted or not (for the RCPT limit).
    rcpt_commands: usize,
    /// The recipient whose routing decision is awaited, and its parameters.
    pending: Option<(Address, RcptParams)>,
    /// The content of the `BDAT` chunks taken so far (RFC 3030), between
    /// chunks; `None` before the first.
    chunks: Option<ChunkReceiver>,
    /// A `BDAT` chunk of this transaction was refused with this reply: the
    /// transaction has failed, and chunks the client had already pipelined
    /// are drained and get the same reply, until the one marked `LAST`
    /// ends the transaction (RFC 3030 §2).
    chunks_failed: Option<Reply>,
}

/// A `BDAT` chunk being received: its octets are read instead of lines.
#[derive(Debug)]
struct Chunk {
    /// The transaction's content, or a receiver that drains a refused chunk.
    rx: ChunkReceiver,
    last: bool,
    end: ChunkEnd,
}

/// What the session does once a chunk's octets are all in.
#[derive(Debug)]
enum ChunkEnd {
    /// Keep the content: `250`, or at `LAST` the end of the message.
    Keep,
    /// Refuse the chunk with this error reply (counted as an error).
    Refuse(Reply),
    /// The transaction failed at an earlier chunk: this reply again, not
    /// counted again.
    Failed(Reply),
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

/// A line taken from the buffer and announced as a [`Step::Command`], to be
/// answered at the next [`Session::ingest`].
#[derive(Debug)]
enum Pending {
    Request(Request),
    /// The line could not be taken as a command: this error reply.
    Bad(Reply),
}

/// One SMTP server session. Does no IO: the caller feeds it bytes and
/// carries out the [`Step`]s it returns.
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
    /// Free bytes above the reserve, if known: `MAIL` gets `452 4.3.1` at
    /// 0, or when its `SIZE` is larger.
    storage_room: Option<u64>,
    /// Frames command lines and SASL responses.
    lines: LineReceiver,
    /// After a `354`: receives the content instead of lines.
    data: Option<DataReceiver>,
    /// After a `BDAT` command: receives that chunk's octets instead of lines.
    chunk: Option<Chunk>,
    /// Content received to its end, waiting for its queue id.
    finished: Option<Result<Vec<u8>, DataError>>,
    /// A command announced but not answered yet.
    pending: Option<Pending>,
    /// A reply just sent reached the hard error limit: this `421` closes
    /// the session at the next [`Session::ingest`].
    closing: Option<Reply>,
}

const SYNTAX_HELO: &str = "Syntax: HELO hostname";
const SYNTAX_EHLO: &str = "Syntax: EHLO hostname";

fn ok() -> Reply {
    Reply::new(250, "2.0.0", "Ok")
}

impl Session {
    /// A session for a new connection; send [`Session::greeting`] first.
    pub fn new(config: std::sync::Arc<SessionConfig>, peer: Peer) -> Session {
        let tls = peer.tls;
        let lines = LineReceiver::new(config.max_line_length, config.bare_lf);
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
            storage_room: None,
            lines,
            data: None,
            chunk: None,
            finished: None,
            pending: None,
            closing: None,
        }
    }

    /// Takes what it can from the front of `buf` (everything the client
    /// sent so far, as read) and answers with the next [`Step`]. Call it
    /// again after carrying out each step, until it answers [`Step::Read`];
    /// feed it nothing while a step that asks for an answer (routing,
    /// credentials, the sender check, TLS, the queue id, storage) is
    /// outstanding.
    pub fn ingest(&mut self, buf: &mut BytesMut) -> Step {
        if let Some(close) = self.closing.take() {
            return Step::Close(close);
        }
        if let Some(pending) = self.pending.take() {
            match pending {
                // BDAT goes on with the chunk's octets, already buffered
                // behind the command line or still to come.
                Pending::Request(Request::Bdat { size, last }) => self.bdat(size, last),
                Pending::Request(request) => return self.command(request),
                Pending::Bad(reply) => return self.error(reply),
            }
        }
        if let Some(chunk) = &mut self.chunk {
            if !chunk.rx.ingest(buf) {
                return Step::Read;
            }
            let chunk = self.chunk.take().expect("checked above");
            return self.chunk_done(chunk);
        }
        if let Some(data) = &mut self.data {
            if !data.ingest(buf) {
                return Step::Read;
            }
            let data = self.data.take().expect("checked above");
            self.finished = Some(data.finish());
            return Step::EndOfData;
        }
        let line = match self.lines.next_line(buf) {
            Ok(Some(line)) => line,
            Ok(None) => return Step::Read,
            Err(LineError::TooLong) if self.in_auth() => return self.sasl_too_long(),
            Err(e @ LineError::TooLong) => {
                self.pending = Some(Pending::Bad(e.reply()));
                return Step::Command(Command::unknown());
            }
            Err(e @ LineError::BareLineEnding) => return Step::Close(e.reply()),
        };
        if self.in_auth() {
            return self.auth_response(&line);
        }
        match Request::parse(&line) {
            Ok(request) => {
                let command = Command::of(&request, line);
                self.pending = Some(Pending::Request(request));
                Step::Command(command)
            }
            Err(e) => {
                self.pending = Some(Pending::Bad(e.reply()));
                Step::Command(Command::unknown())
            }
        }
    }

    /// Tells the session how many free bytes new mail may take before the
    /// reserve (`store.min_free`), if known; the caller sets it when a
    /// `MAIL` [`Step::Command`] comes.
    pub fn set_storage_room(&mut self, room: Option<u64>) {
        self.storage_room = room;
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

    /// While content after DATA, or a BDAT chunk, is being received: the
    /// octets of it taken so far (for the caller's minimum data rate, which
    /// so applies to each chunk); `None` otherwise.
    pub fn data_received(&self) -> Option<u64> {
        match (&self.data, &self.chunk) {
            (Some(data), _) => Some(data.received()),
            (None, Some(chunk)) => Some(chunk.rx.received()),
            (None, None) => None,
        }
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

    /// A reply the session goes on after; error replies are held back
    /// past the soft error limit (the tarpit).
    fn reply(&self, reply: Reply) -> Step {
        let delay = (reply.code >= 400 && self.errors > self.config.soft_error_limit)
            .then_some(self.config.error_delay);
        Step::Reply { reply, delay }
    }

    /// Counts an error reply; at the hard limit the session ends with
    /// `421` instead.
    fn error(&mut self, reply: Reply) -> Step {
        self.errors += 1;
        match self.error_limit_reply() {
            Some(close) => Step::Close(close),
            None => self.reply(reply),
        }
    }

    /// The answer to something the caller looked up (a routing decision,
    /// the sender check, the end of DATA), already counted if it is an
    /// error: once that reaches the hard limit the reply is sent all the
    /// same and the session closes with `421` after it, so that a client
    /// probing addresses with RCPT (a directory harvest) is cut off like any
    /// other.
    fn answer(&mut self, reply: Reply) -> Step {
        if reply.code >= 400 {
            if let Some(close) = self.error_limit_reply() {
                self.closing = Some(close);
                return Step::Reply { reply, delay: None };
            }
        }
        self.reply(reply)
    }

    /// The `421` that ends the session once the hard error limit is
    /// reached.
    fn error_limit_reply(&self) -> Option<Reply> {
        (self.errors >= self.config.hard_error_limit).then(|| {
            Reply::new(
                421,
                "4.7.0",
                format!("{} Error: too many errors", self.config.hostname),
            )
        })
    }

    /// The [`LineReceiver`] dropped a line longer than its limit inside an
    /// AUTH exchange: that line was the client's SASL response. The
    /// exchange ends there with `500 5.5.6` (as Postfix answers, RFC 4954
    /// §4), so that the next line is read as a command again and not as a
    /// credential. It counts as a protocol error, not as a failed login.
    fn sasl_too_long(&mut self) -> Step {
        self.auth = AuthState::None;
        self.login_user.clear();
        self.error(Reply::new(500, "5.5.6", "SASL response limit exceeded"))
    }

    fn auth_offered(&self) -> bool {
        self.config.auth_available && (self.tls || self.config.allow_plaintext_auth)
    }

    fn may_relay(&self) -> bool {
        self.peer.trusted || self.authenticated.is_some()
    }

    /// Handles one parsed command.
    fn command(&mut self, request: Request) -> Step {
        match request {
            Request::Ehlo { host } => self.hello(host, true),
            Request::Helo { host } => self.hello(host, false),
            Request::Mail { from, params } => self.mail(from, params),
            Request::Rcpt { to, params } => self.rcpt(to, params),
            Request::Data => self.data(),
            Request::Rset => {
                self.tx = None;
                self.reply(ok())
            }
            Request::Noop => self.reply(ok()),
            Request::Quit => Step::Close(Reply::new(221, "2.0.0", "Bye")),
            Request::Help => self.reply(Reply::new(
                214,
                "2.0.0",
                "Commands: HELO EHLO MAIL RCPT DATA BDAT RSET NOOP QUIT HELP VRFY STARTTLS AUTH",
            )),
            Request::Vrfy(_) => {
                self.reply(Reply::new(252, "2.0.0", "Send some mail, I'll try my best"))
            }
            Request::Expn(_) => self.error(Reply::new(502, "5.5.1", "EXPN not available")),
            Request::StartTls => self.starttls(),
            Request::Auth { mechanism, initial } => self.auth(mechanism, initial),
            // `ingest` takes BDAT itself and reads the chunk at once; were
            // it to come here, the chunk is read at the next `ingest`.
            Request::Bdat { size, last } => {
                self.bdat(size, last);
                Step::Read
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
            return self.reply(Reply::plain(250, self.config.hostname.clone()));
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
        text.push_str("\nENHANCEDSTATUSCODES\n8BITMIME\nDSN\nSMTPUTF8");
        // RFC 3030 BDAT; not BINARYMIME: chunk content is text, its line
        // endings made CRLF like DATA's (`ChunkReceiver`).
        text.push_str("\nCHUNKING");
        self.reply(Reply::plain(250, text))
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
        if params.auth.is_some() && !self.auth_offered() && self.authenticated.is_none() {
            // RFC 4954 §5 gives AUTH= to servers that advertise AUTH; as
            // for any parameter not advertised, 555 (RFC 5321 §4.1.1.11).
            return self.error(RequestError::UnsupportedParam("AUTH".into()).reply());
        }
        if params
            .size
            .is_some_and(|s| s > self.config.max_message_size)
        {
            return self.error(Reply::new(552, "5.3.4", "Message size exceeds fixed limit"));
        }
        if let Some(room) = self.storage_room {
            // Postfix queue_minfree: below the reserve, or with less room
            // than the SIZE declared (smtpd_check_size), refused before the
            // client sends any content, and not counted as a client error.
            if room == 0 || params.size.is_some_and(|size| size > room) {
                return self.reply(Reply::new(452, "4.3.1", "Insufficient system storage"));
            }
        }
        if let (Some(user), Some(sender)) = (&self.authenticated, &from) {
            let (user, sender) = (user.clone(), sender.canonical());
            self.tx = Some(Transaction::new(from, &params));
            return Step::CheckSender { user, sender };
        }
        self.tx = Some(Transaction::new(from, &params));
        self.reply(Reply::new(250, "2.1.0", "Ok"))
    }

    /// The answer to [`Step::CheckSender`]: the MAIL reply.
    pub fn sender_checked(&mut self, allowed: bool) -> Step {
        if allowed {
            return self.answer(Reply::new(250, "2.1.0", "Ok"));
        }
        let sender = self
            .tx
            .take()
            .and_then(|t| t.sender)
            .map(|a| a.to_string())
            .unwrap_or_default();
        self.errors += 1;
        let reply = Reply::new(
            553,
            "5.7.1",
            format!(
                "<{sender}>: Sender address rejected: not owned by user {}",
                self.authenticated.as_deref().unwrap_or("")
            ),
        );
        self.answer(reply)
    }

    /// [`Step::CheckSender`] could not be answered (a store error): the
    /// MAIL command is refused for now, not for good.
    pub fn sender_check_failed(&mut self) -> Step {
        self.tx = None;
        self.answer(Reply::new(
            451,
            "4.3.0",
            "Error: temporary failure checking the sender, try again later",
        ))
    }

    fn rcpt(&mut self, mut to: Address, params: RcptParams) -> Step {
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
        if tx.chunks.is_some() || tx.chunks_failed.is_some() {
            // The content has started: the recipients are settled.
            return self.error(Reply::new(503, "5.5.1", "Error: RCPT after BDAT"));
        }
        if tx.rcpt_commands >= self.config.max_recipients {
            // Not counted as an error: clients are expected to send the rest later.
            return self.reply(Reply::new(452, "4.5.3", "Error: too many recipients"));
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
        tx.pending = Some((to.clone(), params));
        Step::Route(RouteQuery {
            recipient: to,
            sender: tx.sender.clone(),
            may_relay: self.peer.trusted || self.authenticated.is_some(),
            client: self.peer.ip,
            authenticated: self.authenticated.clone(),
        })
    }

    /// The router's answer to [`Step::Route`]: the RCPT reply.
    pub fn routed(&mut self, route: Route) -> Step {
        let Some(tx) = &mut self.tx else {
            return self.answer(Reply::new(503, "5.5.1", "Error: need MAIL command"));
        };
        let Some((address, params)) = tx.pending.take() else {
            return self.answer(Reply::new(503, "5.5.1", "Error: no recipient pending"));
        };
        let reply = match route {
            Route::Reject(reply) => {
                self.errors += 1;
                reply
            }
            route => {
                let address = address.to_string();
                if params.notify.is_some() || params.orcpt.is_some() {
                    tx.params.recipients.push(RecipientParams {
                        address: address.clone(),
                        notify: params.notify,
                        orcpt: params.orcpt,
                    });
                }
                tx.recipients.push(RoutedRecipient { address, route });
                Reply::new(250, "2.1.5", "Ok")
            }
        };
        self.answer(reply)
    }

    /// The router failed (actor gone, store error): a temporary refusal.
    pub fn route_failed(&mut self) -> Step {
        if let Some(tx) = &mut self.tx {
            tx.pending = None;
        }
        self.answer(Reply::new(
            451,
            "4.3.0",
            "Error: temporary routing failure, try again later",
        ))
    }

    fn data(&mut self) -> Step {
        let Some(tx) = &self.tx else {
            return self.error(Reply::new(503, "5.5.1", "Error: need MAIL command"));
        };
        if tx.chunks.is_some() || tx.chunks_failed.is_some() {
            // RFC 3030 §2: DATA and BDAT may not be mixed in one transaction.
            return self.error(Reply::new(
                503,
                "5.5.1",
                "Error: DATA after BDAT in the same transaction",
            ));
        }
        if tx.recipients.is_empty() {
            if tx.rcpt_commands > 0 {
                // RFC 2920: with pipelining, all RCPTs may have failed.
                return self.error(Reply::new(554, "5.5.1", "Error: no valid recipients"));
            }
            return self.error(Reply::new(503, "5.5.1", "Error: need RCPT command"));
        }
        self.data = Some(DataReceiver::new(
            self.config.max_message_size,
            self.config.bare_lf,
        ));
        self.reply(Reply::plain(354, "End data with <CR><LF>.<CR><LF>"))
    }

    /// Starts receiving a `BDAT` chunk of `size` octets: kept for the
    /// transaction, or drained to be refused (the client sends the octets
    /// whatever the reply, so they must be read to stay in step).
    fn bdat(&mut self, size: u64, last: bool) {
        let end = match &self.tx {
            None => ChunkEnd::Refuse(Reply::new(503, "5.5.1", "Error: need MAIL command")),
            Some(tx) if tx.chunks_failed.is_some() => {
                ChunkEnd::Failed(tx.chunks_failed.clone().expect("checked"))
            }
            Some(tx) if tx.recipients.is_empty() && tx.rcpt_commands > 0 => {
                ChunkEnd::Refuse(Reply::new(554, "5.5.1", "Error: no valid recipients"))
            }
            Some(tx) if tx.recipients.is_empty() => {
                ChunkEnd::Refuse(Reply::new(503, "5.5.1", "Error: need RCPT command"))
            }
            Some(_) => ChunkEnd::Keep,
        };
        let mut rx = match (&end, &mut self.tx) {
            (ChunkEnd::Keep, Some(tx)) => tx.chunks.take().unwrap_or_else(|| {
                ChunkReceiver::new(self.config.max_message_size, self.config.bare_lf)
            }),
            _ => ChunkReceiver::new(0, self.config.bare_lf),
        };
        rx.chunk(size);
        self.chunk = Some(Chunk { rx, last, end });
    }

    /// A chunk's octets are all in: its reply, or at `LAST` the end of the
    /// message, which goes on as after DATA ([`Step::EndOfData`]).
    fn chunk_done(&mut self, chunk: Chunk) -> Step {
        let Chunk { rx, last, end } = chunk;
        let reply = match end {
            ChunkEnd::Keep => match rx.refused() {
                None if last => {
                    self.finished = Some(rx.finish());
                    return Step::EndOfData;
                }
                None => {
                    let reply = Reply::new(
                        250,
                        "2.0.0",
                        format!("Ok: {} octets received", rx.total_received()),
                    );
                    if let Some(tx) = &mut self.tx {
                        tx.chunks = Some(rx);
                    }
                    return self.reply(reply);
                }
                // The session closes, as at the end of DATA.
                Some(e @ DataError::BareLineEnding) => return Step::Close(e.reply()),
                Some(e @ DataError::TooBig) => e.reply(),
            },
            // No MAIL or no recipient: as DATA's refusal, a transaction
            // stays open for more recipients.
            ChunkEnd::Refuse(reply) => return self.error(reply),
            ChunkEnd::Failed(reply) => {
                if last {
                    self.tx = None;
                }
                return self.reply(reply);
            }
        };
        // Too big: the transaction has failed; chunks the client pipelined
        // after this one get the same reply until LAST.
        match &mut self.tx {
            Some(tx) if !last => tx.chunks_failed = Some(reply.clone()),
            _ => self.tx = None,
        }
        self.error(reply)
    }

    /// The answer to [`Step::EndOfData`]: the caller allocated `id` for
    /// the message; `date` is the RFC 5322 date for the `Received:` header.
    /// Answers [`Step::Message`] for content to store, or the refusal.
    pub fn data_done(&mut self, id: MessageId, date: &str) -> Step {
        let result = self.finished.take();
        let (Some(tx), Some(result)) = (self.tx.take(), result) else {
            return self.answer(Reply::new(503, "5.5.1", "Error: need MAIL command"));
        };
        let content = match result {
            Ok(content) => content,
            Err(DataError::TooBig) => {
                self.errors += 1;
                return self.answer(Reply::new(552, "5.3.4", "Error: message file too big"));
            }
            Err(DataError::BareLineEnding) => {
                return Step::Close(Reply::new(
                    550,
                    "5.5.2",
                    "Error: bare <CR> or <LF> received; closing (see RFC 5321 section 2.3.8)",
                ));
            }
        };
        if count_received(&content) >= self.config.hop_limit {
            self.errors += 1;
            return self.answer(Reply::new(554, "5.4.0", "Error: too many hops"));
        }
        let helo = self.helo.clone().unwrap_or_default();
        let received = self.received_header(&helo, id, &tx, date);
        let mut full = Vec::with_capacity(received.len() + content.len());
        full.extend_from_slice(received.as_bytes());
        full.extend_from_slice(&content);
        Step::Message(Accepted {
            id,
            sender: tx.sender.as_ref().map(|a| a.to_string()),
            recipients: tx.recipients,
            helo,
            content: full,
            params: tx.params.boxed(),
        })
    }

    /// No queue id could be allocated for [`Step::EndOfData`] (a store
    /// error): the transaction is dropped with a temporary refusal.
    pub fn id_unavailable(&mut self) -> Step {
        self.tx = None;
        self.finished = None;
        Step::Reply {
            reply: self.storage_failed(),
            delay: None,
        }
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

    /// TLS is up: forget everything learned before it (RFC 3207 §4.2),
    /// including a partly received line (the caller discarded the input
    /// buffered before the handshake).
    pub fn tls_started(&mut self) {
        self.lines.reset();
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
                    self.reply(Reply::plain(334, ""))
                }
            },
            "LOGIN" => match initial {
                Some(user) => {
                    self.auth = AuthState::LoginUser;
                    self.auth_response(user.expose().as_bytes())
                }
                None => {
                    self.auth = AuthState::LoginUser;
                    self.reply(Reply::plain(334, "VXNlcm5hbWU6"))
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
    fn in_auth(&self) -> bool {
        self.auth != AuthState::None
    }

    /// A client line sent in answer to a `334` challenge.
    fn auth_response(&mut self, line: &[u8]) -> Step {
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
                self.reply(Reply::plain(334, "UGFzc3dvcmQ6"))
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
                self.reply(Reply::new(235, "2.7.0", "Authentication successful"))
            }
            None => self.error(Reply::new(535, "5.7.8", "Error: authentication failed")),
        }
    }

    /// [`Step::Authenticate`] could not be answered (a store error): RFC
    /// 4954's temporary failure, so the client may try again later.
    pub fn authentication_unavailable(&self) -> Step {
        self.reply(Reply::new(454, "4.7.0", "Temporary authentication failure"))
    }

    /// The name a `HELO`/`EHLO` just announced with [`Step::Command`]
    /// gives, while it waits to be carried out (at the next
    /// [`Session::ingest`]); `None` for any other command, and for an empty
    /// name (the session refuses that itself). For a caller that screens
    /// greetings before the session takes them ([`Session::refuse`]).
    pub fn pending_hello(&self) -> Option<&str> {
        match &self.pending {
            Some(Pending::Request(Request::Helo { host } | Request::Ehlo { host }))
                if !host.is_empty() =>
            {
                Some(host)
            }
            _ => None,
        }
    }

    /// The caller refuses, with `reply`, what the session was about to
    /// do (an embedder's policy said no). A command announced with
    /// [`Step::Command`] and not answered yet is dropped unanswered by the
    /// session: it leaves no state (a refused `HELO` sets no name).
    /// Otherwise the refusal ends the current transaction: a `MAIL` the
    /// session had accepted, or a message after [`Step::Message`] that is
    /// not stored. An error reply counts towards the error limits like
    /// the session's own: past the soft limit it comes with the tarpit
    /// delay, and at the hard limit it is sent and then `421` closes the
    /// session.
    pub fn refuse(&mut self, reply: Reply) -> Step {
        if self.pending.take().is_none() {
            self.tx = None;
            self.finished = None;
        }
        if reply.code >= 400 {
            self.errors += 1;
        }
        self.answer(reply)
    }

    /// Whether recipients in other domains are allowed.
    pub fn relay_allowed(&self) -> bool {
        self.may_relay()
    }
}

impl Transaction {
    fn new(sender: Option<Address>, mail: &MailParams) -> Transaction {
        Transaction {
            sender,
            smtputf8: mail.smtputf8,
            params: EnvelopeParams {
                ret: mail.ret,
                envid: mail.envid.clone(),
                smtputf8: mail.smtputf8,
                recipients: Vec::new(),
            },
            recipients: Vec::new(),
            rcpt_commands: 0,
            pending: None,
            chunks: None,
            chunks_failed: None,
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
