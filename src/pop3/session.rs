//! The POP3 server session: RFC 1939's AUTHORIZATION → TRANSACTION → UPDATE
//! states, fed one line at a time, asking its caller for everything that
//! needs IO.

use base64::Engine as _;

use super::receiver::{DEFAULT_MAX_AUTH_LINE, MAX_COMMAND_LINE};
use super::reply::{self, err, err_fmt, ok, ok_fmt, text};
use super::request::Request;
use crate::logsafe::Secret;

/// How many bad commands a session may send; the next one closes it.
pub const DEFAULT_MAX_BAD_COMMANDS: u32 = 20;

/// One message of a maildrop snapshot, as the caller loaded it at login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaildropEntry {
    /// Unique id for UIDL: the same for this message in every session.
    /// Anything outside RFC 1939's 1–70 octets of 0x21–0x7E is replaced by a
    /// stable stand-in ([`reply::sanitize_uidl`]).
    pub uidl: String,
    /// Octets of the content in CRLF form before dot-stuffing: what LIST and
    /// STAT report.
    pub size: u64,
    /// Opaque handle the session hands back in [`Step::Retrieve`] and
    /// [`Step::Commit`].
    pub key: u64,
}

/// The messages of a maildrop at login, in order: message `n` is `0[n - 1]`,
/// for the whole session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Maildrop(pub Vec<MaildropEntry>);

/// Per-connection settings, decided by the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionConfig {
    /// Named in the greeting.
    pub hostname: String,
    /// STLS can be offered (a certificate is configured).
    pub tls_available: bool,
    /// The connection is already encrypted (implicit TLS, port 995).
    pub tls_active: bool,
    /// USER/PASS and AUTH PLAIN are accepted. The caller sets this when TLS is
    /// active, no TLS is configured, or `allow_plaintext_auth` is on; the
    /// session turns it on itself after STLS.
    pub plaintext_auth_allowed: bool,
    /// Bad commands allowed before the session closes (Dovecot counts the
    /// same way: its own `-ERR` first, then `-ERR Too many bad commands.`).
    pub max_bad_commands: u32,
    /// Longest SASL continuation line, CRLF included.
    pub max_auth_line: usize,
}

impl SessionConfig {
    /// Defaults for a connection without TLS, where plaintext login is allowed.
    pub fn new(hostname: impl Into<String>) -> SessionConfig {
        SessionConfig {
            hostname: hostname.into(),
            tls_available: false,
            tls_active: false,
            plaintext_auth_allowed: true,
            max_bad_commands: DEFAULT_MAX_BAD_COMMANDS,
            max_auth_line: DEFAULT_MAX_AUTH_LINE,
        }
    }
}

/// What the caller found when it checked the credentials of a
/// [`Step::Authenticate`], and locked and loaded the maildrop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthResult {
    /// Credentials good, maildrop locked for this session and loaded.
    Ok(Maildrop),
    /// Unknown user or wrong password (the two are not told apart).
    BadCredentials,
    /// Credentials good, but another session holds the maildrop lock.
    InUse,
    /// The check could not be made (store error).
    TemporaryFailure,
}

/// What the caller must do after feeding the session. Replies are already
/// appended to the caller's output buffer when a step is returned. `Debug`
/// leaves the password out.
#[derive(Clone, PartialEq, Eq)]
#[must_use]
pub enum Step {
    /// Write the output (it may be batched with replies to further pipelined
    /// lines) and go on reading lines.
    Send,
    /// Check the credentials, lock and load the maildrop, then call
    /// [`Session::authenticated`]. Apply any failed-login delay before that
    /// call. Feed no line until then.
    Authenticate {
        /// The user name, as given.
        user: String,
        /// The password (never logged).
        password: String,
    },
    /// Read message `key`'s content, then call [`Session::retrieved`] (or
    /// [`Session::retrieve_failed`]). `top` is `Some(lines)` for TOP: pass the
    /// whole content all the same, the session cuts it.
    Retrieve {
        /// The message's store key.
        key: u64,
        /// TOP's line count; `None` for RETR.
        top: Option<u32>,
    },
    /// QUIT entered the UPDATE state: delete these messages (in message number
    /// order, never empty), then call [`Session::committed`]. A QUIT with
    /// nothing deleted, and a dropped connection, never ask for this.
    Commit {
        /// The store keys of the messages marked deleted.
        deleted: Vec<u64>,
    },
    /// `+OK Begin TLS negotiation.` is in the output: write it, discard any
    /// input already buffered (RFC 2595 §4; the STARTTLS injection of
    /// CVE-2011-0411), handshake, then call [`Session::tls_started`].
    StartTls,
    /// Write the output and close the connection. Release the maildrop lock
    /// if one is held: nothing is deleted.
    Close,
}

impl std::fmt::Debug for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Send => f.write_str("Send"),
            Step::Authenticate { user, .. } => f
                .debug_struct("Authenticate")
                .field("user", user)
                .field("password", &Secret::new(()))
                .finish(),
            Step::Retrieve { key, top } => f
                .debug_struct("Retrieve")
                .field("key", key)
                .field("top", top)
                .finish(),
            Step::Commit { deleted } => f.debug_struct("Commit").field("deleted", deleted).finish(),
            Step::StartTls => f.write_str("StartTls"),
            Step::Close => f.write_str("Close"),
        }
    }
}

/// The RFC 1939 state of a session, for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Before login.
    Authorization,
    /// Logged in, the maildrop locked.
    Transaction,
    /// After QUIT, while deletions are committed.
    Update,
    /// The session is over.
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Authorization,
    /// `+ ` sent after `AUTH PLAIN`: the next line is the SASL response.
    SaslResponse,
    /// Waiting for [`Session::authenticated`].
    Authenticating,
    /// Waiting for [`Session::tls_started`].
    StartingTls,
    Transaction,
    /// Waiting for [`Session::retrieved`] for message `msg`.
    Retrieving {
        msg: u32,
        top: Option<u32>,
    },
    /// Waiting for [`Session::committed`].
    Update,
    Closed,
}

/// What a session did, for the line logged at its end (Dovecot's
/// `Logged out top=0/0, retr=1/1234, del=1/1, size=1234`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Activity {
    /// TOP replies sent, and the octets of message text in them.
    pub top: (u32, u64),
    /// RETR replies sent, and the octets of the messages.
    pub retr: (u32, u64),
    /// Messages deleted at QUIT: 0 unless the deletion was committed.
    pub deleted: u32,
    /// Messages in the maildrop at login.
    pub messages: u32,
    /// Their octets.
    pub size: u64,
    /// The client ended the session with QUIT (and its deletions, if any,
    /// were committed).
    pub quit: bool,
}

/// One POP3 server session. Does no IO: the caller feeds it lines and
/// carries out the [`Step`]s it returns.
#[derive(Debug)]
pub struct Session {
    config: SessionConfig,
    phase: Phase,
    /// Name given by USER, waiting for PASS.
    user: Option<String>,
    messages: Vec<MaildropEntry>,
    deleted: Vec<bool>,
    /// Messages not marked deleted, and their octets: what STAT reports.
    live_count: usize,
    live_size: u64,
    bad_commands: u32,
    activity: Activity,
}

impl Session {
    /// A session for a new connection; send [`Session::greeting`] first.
    pub fn new(config: SessionConfig) -> Session {
        Session {
            config,
            phase: Phase::Authorization,
            user: None,
            messages: Vec::new(),
            deleted: Vec::new(),
            live_count: 0,
            live_size: 0,
            bad_commands: 0,
            activity: Activity::default(),
        }
    }

    /// Appends the greeting, `+OK <hostname> POP3 ready.`.
    pub fn greeting(&self, out: &mut Vec<u8>) {
        ok_fmt(out, format_args!("{} POP3 ready.", self.config.hostname));
    }

    /// The RFC 1939 state the session is in.
    pub fn state(&self) -> State {
        match self.phase {
            Phase::Authorization
            | Phase::SaslResponse
            | Phase::Authenticating
            | Phase::StartingTls => State::Authorization,
            Phase::Transaction | Phase::Retrieving { .. } => State::Transaction,
            Phase::Update => State::Update,
            Phase::Closed => State::Closed,
        }
    }

    /// What the session did so far ([`Activity`]).
    pub fn activity(&self) -> Activity {
        self.activity
    }

    /// The longest line, CRLF included, the next line may be: larger while a
    /// SASL response is expected. Give it to
    /// [`LineReceiver::next_line`](super::LineReceiver::next_line).
    pub fn max_line_len(&self) -> usize {
        match self.phase {
            Phase::SaslResponse => self.config.max_auth_line,
            _ => MAX_COMMAND_LINE,
        }
    }

    /// Handles one line (without its CRLF) and appends the reply to `out`.
    pub fn line(&mut self, line: &[u8], out: &mut Vec<u8>) -> Step {
        match self.phase {
            Phase::Authorization | Phase::Transaction => {}
            Phase::SaslResponse => return self.sasl_response(line, out),
            Phase::Closed => return Step::Close,
            Phase::Authenticating
            | Phase::StartingTls
            | Phase::Retrieving { .. }
            | Phase::Update => {
                // The caller broke the protocol of `Step`; during STLS this
                // could even be injected plaintext, so stop rather than guess.
                debug_assert!(false, "line fed while waiting for {:?}", self.phase);
                tracing::error!(phase = ?self.phase, "POP3 line fed while a step was pending");
                self.phase = Phase::Closed;
                return Step::Close;
            }
        }
        let request = match Request::parse(line) {
            Ok(request) => request,
            Err(error) => {
                err_fmt(out, format_args!("{error}"));
                return self.bad_command(out);
            }
        };
        let logged_in = self.phase == Phase::Transaction;
        match request {
            Request::Capa => self.capa(out),
            Request::Quit => self.quit(out),
            Request::User(_) | Request::Pass(_) | Request::Auth { .. } | Request::Stls
                if logged_in =>
            {
                self.fail(text::ALREADY_LOGGED_IN, out)
            }
            Request::User(name) => {
                if !self.config.plaintext_auth_allowed {
                    return self.fail(text::PLAINTEXT_DISALLOWED, out);
                }
                self.user = Some(name.to_owned());
                ok(out, "");
                Step::Send
            }
            Request::Pass(password) => {
                if !self.config.plaintext_auth_allowed {
                    return self.fail(text::PLAINTEXT_DISALLOWED, out);
                }
                match self.user.take() {
                    Some(user) => self.authenticate(user, password.expose().to_string()),
                    None => self.fail(text::NO_USERNAME, out),
                }
            }
            Request::Auth {
                mechanism,
                initial_response,
            } => self.auth(mechanism, initial_response.map(Secret::into_inner), out),
            Request::Stls => self.stls(out),
            _ if !logged_in => self.fail(text::NOT_LOGGED_IN, out),
            Request::Stat => {
                ok_fmt(out, format_args!("{} {}", self.live_count, self.live_size));
                Step::Send
            }
            Request::List(None) => {
                ok_fmt(
                    out,
                    format_args!("{} messages ({} octets)", self.live_count, self.live_size),
                );
                for (n, entry) in self.live() {
                    reply::line_fmt(out, format_args!("{n} {}", entry.size));
                }
                out.extend_from_slice(b".\r\n");
                Step::Send
            }
            Request::List(Some(n)) => {
                if let Some(entry) = self.lookup(n, out) {
                    ok_fmt(out, format_args!("{n} {}", entry.size));
                }
                Step::Send
            }
            Request::Uidl(None) => {
                ok(out, "");
                for (n, entry) in self.live() {
                    reply::line_fmt(out, format_args!("{n} {}", entry.uidl));
                }
                out.extend_from_slice(b".\r\n");
                Step::Send
            }
            Request::Uidl(Some(n)) => {
                if let Some(entry) = self.lookup(n, out) {
                    ok_fmt(out, format_args!("{n} {}", entry.uidl));
                }
                Step::Send
            }
            Request::Retr(n) => self.retrieve(n, None, out),
            Request::Top { msg, lines } => self.retrieve(msg, Some(lines), out),
            Request::Dele(n) => {
                if let Some(entry) = self.lookup(n, out) {
                    let size = entry.size;
                    self.deleted[n as usize - 1] = true;
                    self.live_count -= 1;
                    self.live_size -= size;
                    ok_fmt(out, format_args!("message {n} deleted"));
                }
                Step::Send
            }
            Request::Noop => {
                ok(out, "");
                Step::Send
            }
            Request::Rset => {
                self.deleted.fill(false);
                self.live_count = self.messages.len();
                self.live_size = self.messages.iter().map(|m| m.size).sum();
                ok_fmt(
                    out,
                    format_args!(
                        "maildrop has {} messages ({} octets)",
                        self.live_count, self.live_size
                    ),
                );
                Step::Send
            }
        }
    }

    /// The receiver dropped an overlong line: answers `-ERR line too long`,
    /// which counts as a bad command (and ends a SASL exchange).
    pub fn line_too_long(&mut self, out: &mut Vec<u8>) -> Step {
        match self.phase {
            Phase::Closed => return Step::Close,
            Phase::SaslResponse => self.phase = Phase::Authorization,
            _ => {}
        }
        self.fail(text::LINE_TOO_LONG, out)
    }

    /// The answer to [`Step::Authenticate`]. Returns [`Step::Send`], or
    /// [`Step::Close`] when failed logins used up the bad-command allowance.
    pub fn authenticated(&mut self, result: AuthResult, out: &mut Vec<u8>) -> Step {
        if self.phase != Phase::Authenticating {
            debug_assert!(false, "authenticated() without Step::Authenticate");
            return Step::Send;
        }
        self.phase = Phase::Authorization;
        match result {
            AuthResult::Ok(Maildrop(mut messages)) => {
                for entry in &mut messages {
                    if let std::borrow::Cow::Owned(fixed) = reply::sanitize_uidl(&entry.uidl) {
                        tracing::warn!(uidl = ?entry.uidl, %fixed, "invalid POP3 UIDL replaced");
                        entry.uidl = fixed;
                    }
                }
                self.live_count = messages.len();
                self.live_size = messages.iter().map(|m| m.size).sum();
                self.deleted = vec![false; messages.len()];
                self.activity.messages = messages.len().try_into().unwrap_or(u32::MAX);
                self.activity.size = self.live_size;
                self.messages = messages;
                self.phase = Phase::Transaction;
                ok(out, "Logged in.");
                Step::Send
            }
            // Failed logins count as bad commands, bounding password guesses
            // per connection on top of the caller's delays.
            AuthResult::BadCredentials => self.fail(text::AUTH_FAILED, out),
            AuthResult::InUse => {
                err(out, text::IN_USE);
                Step::Send
            }
            AuthResult::TemporaryFailure => {
                err(out, text::TEMPORARY_FAILURE);
                Step::Send
            }
        }
    }

    /// The answer to [`Step::Retrieve`]: `content` is the whole message in
    /// CRLF form. Appends `+OK <size> octets` (or the TOP reply) and the
    /// dot-stuffed content.
    pub fn retrieved(&mut self, content: &[u8], out: &mut Vec<u8>) -> Step {
        let Phase::Retrieving { msg, top } = self.phase else {
            debug_assert!(false, "retrieved() without Step::Retrieve");
            return Step::Send;
        };
        self.phase = Phase::Transaction;
        match top {
            None => {
                let listed = self.messages[msg as usize - 1].size;
                if listed != content.len() as u64 {
                    // LIST already promised `listed`; the octet count must
                    // describe what follows, so trust the content.
                    tracing::warn!(msg, listed, actual = content.len(), "POP3 size mismatch");
                }
                ok_fmt(out, format_args!("{} octets", content.len()));
                reply::write_multiline(content, out);
                self.activity.retr.0 += 1;
                self.activity.retr.1 += content.len() as u64;
            }
            Some(lines) => {
                ok(out, "top of message follows");
                let part = reply::top(content, lines);
                reply::write_multiline(part, out);
                self.activity.top.0 += 1;
                self.activity.top.1 += part.len() as u64;
            }
        }
        Step::Send
    }

    /// The message of a [`Step::Retrieve`] could not be read.
    pub fn retrieve_failed(&mut self, out: &mut Vec<u8>) -> Step {
        if !matches!(self.phase, Phase::Retrieving { .. }) {
            debug_assert!(false, "retrieve_failed() without Step::Retrieve");
            return Step::Send;
        }
        self.phase = Phase::Transaction;
        err(out, text::READ_FAILED);
        Step::Send
    }

    /// The answer to [`Step::Commit`]: whether every message was deleted.
    /// Always returns [`Step::Close`].
    pub fn committed(&mut self, deleted_all: bool, out: &mut Vec<u8>) -> Step {
        debug_assert_eq!(
            self.phase,
            Phase::Update,
            "committed() without Step::Commit"
        );
        self.phase = Phase::Closed;
        if deleted_all {
            self.activity.deleted = self.deleted.iter().filter(|&&d| d).count() as u32;
            self.activity.quit = true;
            ok(out, "Logging out.");
        } else {
            err(out, text::COMMIT_FAILED);
        }
        Step::Close
    }

    /// The TLS handshake after [`Step::StartTls`] succeeded. Nothing is sent
    /// (RFC 2595 §4: the client speaks next). Plaintext login is now allowed
    /// and anything said before is forgotten.
    pub fn tls_started(&mut self) {
        debug_assert_eq!(
            self.phase,
            Phase::StartingTls,
            "tls_started() without Step::StartTls"
        );
        self.phase = Phase::Authorization;
        self.config.tls_active = true;
        self.config.plaintext_auth_allowed = true;
        self.user = None;
    }

    /// The RFC 1939 autologout timer fired: appends a last `-ERR`. The caller
    /// closes; nothing is deleted (no UPDATE state).
    pub fn timed_out(&mut self, out: &mut Vec<u8>) {
        self.close_with(text::TIMED_OUT, out);
    }

    /// The server is stopping: appends a last `-ERR`. The caller closes;
    /// nothing is deleted.
    pub fn shutting_down(&mut self, out: &mut Vec<u8>) {
        self.close_with(text::SHUTTING_DOWN, out);
    }

    fn close_with(&mut self, text: &str, out: &mut Vec<u8>) {
        if self.phase != Phase::Closed {
            err(out, text);
            self.phase = Phase::Closed;
        }
    }

    /// Appends `-ERR <text>` and counts a bad command.
    fn fail(&mut self, text: &str, out: &mut Vec<u8>) -> Step {
        err(out, text);
        self.bad_command(out)
    }

    fn bad_command(&mut self, out: &mut Vec<u8>) -> Step {
        self.bad_commands += 1;
        if self.bad_commands > self.config.max_bad_commands {
            err(out, text::TOO_MANY_BAD_COMMANDS);
            self.phase = Phase::Closed;
            Step::Close
        } else {
            Step::Send
        }
    }

    fn authenticate(&mut self, user: String, password: String) -> Step {
        self.phase = Phase::Authenticating;
        Step::Authenticate { user, password }
    }

    fn capa(&self, out: &mut Vec<u8>) -> Step {
        ok(out, "Capability list follows");
        out.extend_from_slice(b"TOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\n");
        // RFC 2449 §5: capabilities may differ by state; login ones are
        // useless once logged in.
        if self.phase != Phase::Transaction {
            if self.config.tls_available && !self.config.tls_active {
                out.extend_from_slice(b"STLS\r\n");
            }
            if self.config.plaintext_auth_allowed {
                out.extend_from_slice(b"USER\r\nSASL PLAIN\r\n");
            }
        }
        out.extend_from_slice(b".\r\n");
        Step::Send
    }

    fn quit(&mut self, out: &mut Vec<u8>) -> Step {
        if self.phase == Phase::Transaction {
            let deleted: Vec<u64> = self
                .messages
                .iter()
                .zip(&self.deleted)
                .filter(|(_, &gone)| gone)
                .map(|(m, _)| m.key)
                .collect();
            if !deleted.is_empty() {
                self.phase = Phase::Update;
                return Step::Commit { deleted };
            }
        }
        self.phase = Phase::Closed;
        self.activity.quit = true;
        ok(out, "Logging out.");
        Step::Close
    }

    fn stls(&mut self, out: &mut Vec<u8>) -> Step {
        if !self.config.tls_available {
            return self.fail(text::TLS_UNAVAILABLE, out);
        }
        if self.config.tls_active {
            return self.fail(text::TLS_ACTIVE, out);
        }
        ok(out, "Begin TLS negotiation.");
        self.phase = Phase::StartingTls;
        Step::StartTls
    }

    fn auth(
        &mut self,
        mechanism: Option<&str>,
        initial_response: Option<&str>,
        out: &mut Vec<u8>,
    ) -> Step {
        let Some(mechanism) = mechanism else {
            // RFC 1734's mechanism listing, which some clients still probe.
            ok(out, "");
            if self.config.plaintext_auth_allowed {
                out.extend_from_slice(b"PLAIN\r\n");
            }
            out.extend_from_slice(b".\r\n");
            return Step::Send;
        };
        if !mechanism.eq_ignore_ascii_case("PLAIN") {
            return self.fail(text::UNSUPPORTED_MECHANISM, out);
        }
        if !self.config.plaintext_auth_allowed {
            return self.fail(text::PLAINTEXT_DISALLOWED, out);
        }
        self.user = None;
        match initial_response {
            Some(response) => self.plain(response.as_bytes(), out),
            None => {
                // An empty server challenge (RFC 5034 §4).
                out.extend_from_slice(b"+ \r\n");
                self.phase = Phase::SaslResponse;
                Step::Send
            }
        }
    }

    fn sasl_response(&mut self, line: &[u8], out: &mut Vec<u8>) -> Step {
        self.phase = Phase::Authorization;
        if line == b"*" {
            // RFC 5034 §4: the client cancels; the server must answer -ERR.
            return self.fail(text::AUTH_CANCELLED, out);
        }
        self.plain(line, out)
    }

    /// Decodes and checks an RFC 4616 PLAIN message:
    /// `[authzid] NUL authcid NUL passwd`.
    fn plain(&mut self, response: &[u8], out: &mut Vec<u8>) -> Step {
        let decoded = if response == b"=" {
            Vec::new()
        } else {
            match base64::engine::general_purpose::STANDARD.decode(response.trim_ascii()) {
                Ok(decoded) => decoded,
                Err(_) => return self.fail(text::BAD_BASE64, out),
            }
        };
        let mut parts = decoded.split(|&b| b == 0);
        let (Some(authzid), Some(authcid), Some(password), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return self.fail(text::BAD_PLAIN, out);
        };
        let (Ok(authzid), Ok(authcid), Ok(password)) = (
            std::str::from_utf8(authzid),
            std::str::from_utf8(authcid),
            std::str::from_utf8(password),
        ) else {
            return self.fail(text::BAD_PLAIN, out);
        };
        if authcid.is_empty() || password.is_empty() {
            return self.fail(text::BAD_PLAIN, out);
        }
        // Acting as another user needs a master-user notion postino lacks.
        if !authzid.is_empty() && authzid != authcid {
            return self.fail(text::AUTHZID_REFUSED, out);
        }
        self.authenticate(authcid.to_owned(), password.to_owned())
    }

    fn retrieve(&mut self, n: u32, top: Option<u32>, out: &mut Vec<u8>) -> Step {
        match self.lookup(n, out) {
            Some(entry) => {
                let key = entry.key;
                self.phase = Phase::Retrieving { msg: n, top };
                Step::Retrieve { key, top }
            }
            None => Step::Send,
        }
    }

    /// Message `n` if it exists and is not deleted; else appends the `-ERR`.
    /// Not a bad command: the syntax was right.
    fn lookup(&self, n: u32, out: &mut Vec<u8>) -> Option<&MaildropEntry> {
        let index = (n as usize).wrapping_sub(1);
        // `0` wraps to `usize::MAX`, which no maildrop reaches.
        let Some(entry) = self.messages.get(index) else {
            err_fmt(out, format_args!("There's no message {n}."));
            return None;
        };
        if self.deleted[index] {
            err_fmt(out, format_args!("message {n} already deleted"));
            return None;
        }
        Some(entry)
    }

    /// Message numbers and entries not marked deleted.
    fn live(&self) -> impl Iterator<Item = (usize, &MaildropEntry)> {
        self.messages
            .iter()
            .zip(&self.deleted)
            .enumerate()
            .filter(|(_, (_, &gone))| !gone)
            .map(|(i, (m, _))| (i + 1, m))
    }
}
