//! The SMTP connection actor: one per client, a thin shell around
//! [`postino_core::smtp::Session`] that does the IO the session asks for.
//!
//! Flow: read into the buffer → [`Session::ingest`] → act on the [`Step`],
//! until the session asks for more input. The session frames commands, SASL
//! responses and message content itself and applies the error limits; this
//! actor only does the IO. Replies collect in the write buffer and are
//! flushed when no complete command is buffered, so pipelined commands (RFC
//! 2920) get their replies in order and in one write. While the actor waits for the router, a
//! TLS handshake or the group commit, it reads nothing more: that is the
//! back-pressure from the store to the socket.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use postino_core::config::Config;
use postino_core::dsn::rfc5322_date;
use postino_core::logsafe::escape;
use postino_core::message::{now_unix, Envelope};
use postino_core::smtp::session::{Accepted, Command, Peer, Step};
use postino_core::smtp::{request, Reply, Session};
use tracing::{debug, info, warn, Instrument};

use crate::auth::PasswordChecks;
use crate::intake::Intake;
use crate::io::{Io, ReadOutcome, Stream, TlsSlot};
use crate::limits::ConnectionGuard;
use crate::login_delay::AuthFailures;
use crate::reload::LiveConfig;
use crate::router::RouteRecipient;
use crate::submission_limits::Event;

mod hooks;

/// What every SMTP connection of one listener shares.
pub struct SmtpShared {
    /// The configuration in use; each session takes the current one at its
    /// start and keeps it ([`crate::reload`]).
    pub config: LiveConfig,
    /// Whether the listener is for submission (AUTH before MAIL).
    pub auth_required: bool,
    /// The store (free space, sender checks).
    pub store: postino_core::storage::SharedStorage,
    /// Where each `RCPT TO` is routed: the default [`Router`](crate::Router)
    /// or the embedder's.
    pub router: Recipient<RouteRecipient>,
    /// The intake of this connection's worker: stores accepted messages.
    pub intake: Intake,
    /// The TLS acceptor for STARTTLS (reloadable), if TLS is configured.
    pub tls: TlsSlot,
    /// Failed logins per client address (shared with POP3).
    pub failures: Arc<AuthFailures>,
    /// The password-checking threads (shared with POP3).
    pub checks: PasswordChecks,
    /// The embedder's policies; `None` (none registered): no hook runs.
    pub(crate) policy: Option<Arc<crate::policy::Policies>>,
    /// Submission rates per user and client (`[limits]`), one for the
    /// whole server.
    pub(crate) rates: Arc<crate::submission_limits::SubmissionLimits>,
}

/// One SMTP client connection.
pub struct SmtpConnection {
    shared: Arc<SmtpShared>,
    /// The configuration this session started with.
    config: Arc<Config>,
    session: Session,
    io: Option<Io>,
    /// When the content after the current DATA began to arrive, for the
    /// minimum data rate.
    data_started: Option<Instant>,
    /// When the command line being read must be complete: set when the
    /// session starts waiting for one, cleared when it is taken. The
    /// timeout counts for the whole line, not per read (Postfix's
    /// `smtpd_per_record_deadline`).
    deadline: Option<Instant>,
    peer: SocketAddr,
    span: tracing::Span,
    /// The command waiting for its final reply (for the counts and the
    /// reject line).
    current: Option<Current>,
    counts: CommandCounts,
    /// TLS protocol and cipher suite, once encrypted (for the accepted line).
    tls: Option<(String, String)>,
    _guard: ConnectionGuard,
}

/// Commands as Postfix's smtpd counts them in its `disconnect from` line,
/// in its order.
const COMMANDS: [&str; 15] = [
    "helo", "ehlo", "starttls", "auth", "mail", "rcpt", "data", "bdat", "rset", "noop", "vrfy",
    "expn", "help", "quit", "unknown",
];
const UNKNOWN: usize = 14;

/// The command whose final reply is awaited.
struct Current {
    /// Index into [`COMMANDS`].
    command: usize,
    /// MAIL's sender, as the client gave it.
    from: Option<String>,
    /// RCPT's recipient, as the client gave it.
    to: Option<String>,
    /// AUTH's mechanism.
    mechanism: Option<String>,
    /// DATA got its 354: the next reply ends the message.
    end_of_data: bool,
}

impl Current {
    fn of(command: Command) -> Current {
        Current {
            command: COMMANDS
                .iter()
                .position(|c| *c == command.name)
                .unwrap_or(UNKNOWN),
            from: command.from,
            to: command.to,
            mechanism: command.mechanism,
            end_of_data: false,
        }
    }
}

/// Per command: how many succeeded, of how many sent.
#[derive(Default)]
struct CommandCounts([(u32, u32); COMMANDS.len()]);

impl CommandCounts {
    fn record(&mut self, command: usize, ok: bool) {
        let (good, all) = &mut self.0[command];
        *all += 1;
        if ok {
            *good += 1;
        }
    }
}

/// Postfix's form: `ehlo=1 mail=1 rcpt=1/2 data=1 quit=1 commands=5/6`
/// (`n` when all n succeeded, `good/all` otherwise).
impl std::fmt::Display for CommandCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let count = |f: &mut std::fmt::Formatter<'_>, name: &str, good: u32, all: u32| {
            if good == all {
                write!(f, "{name}={all}")
            } else {
                write!(f, "{name}={good}/{all}")
            }
        };
        let (mut good, mut all) = (0, 0);
        for (name, (g, a)) in COMMANDS.iter().zip(self.0) {
            if a > 0 {
                count(f, name, g, a)?;
                f.write_str(" ")?;
                good += g;
                all += a;
            }
        }
        count(f, "commands", good, all)
    }
}

/// The `Message-ID` header's value, if the header section has one.
fn message_id(content: &[u8]) -> Option<String> {
    let mut lines = content
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    while let Some(line) = lines.next() {
        if line.is_empty() {
            break;
        }
        if line.len() >= 11 && line[..11].eq_ignore_ascii_case(b"message-id:") {
            let mut value = line[11..].trim_ascii().to_vec();
            if value.is_empty() {
                // Folded onto the next line.
                value = lines.next().unwrap_or_default().trim_ascii().to_vec();
            }
            return Some(String::from_utf8_lossy(&value).into_owned());
        }
    }
    None
}

/// The TLS protocol version and cipher suite of an encrypted stream.
fn tls_description(io: &Io) -> Option<(String, String)> {
    let Stream::Tls(tls) = &io.stream else {
        return None;
    };
    let conn = tls.get_ref().1;
    let version = conn.protocol_version()?;
    let suite = conn.negotiated_cipher_suite()?.suite();
    // `TLSv1_3` is the enum variant's name; Postfix writes `TLSv1.3`.
    Some((
        format!("{version:?}").replace('_', "."),
        format!("{suite:?}"),
    ))
}

impl SmtpConnection {
    /// A connection actor for a client socket accepted at `peer` (already
    /// encrypted for implicit TLS); start it on the worker's arbiter. It
    /// ends at `shutdown` with `421`, and holds `guard` (its connection
    /// slot) until it stops.
    pub fn new(
        shared: Arc<SmtpShared>,
        stream: Stream,
        peer: SocketAddr,
        shutdown: tokio::sync::watch::Receiver<bool>,
        guard: ConnectionGuard,
    ) -> SmtpConnection {
        let tls = matches!(stream, Stream::Tls(_));
        let config = shared.config.current();
        let session = Session::new(
            crate::reload::smtp_session(&config, shared.auth_required),
            Peer {
                ip: peer.ip(),
                trusted: config.may_relay(peer.ip()),
                tls,
            },
        );
        let io = Io::new(stream, shutdown);
        SmtpConnection {
            config,
            session,
            tls: tls_description(&io),
            current: None,
            counts: CommandCounts::default(),
            io: Some(io),
            data_started: None,
            deadline: None,
            span: tracing::info_span!("smtp", %peer),
            peer,
            shared,
            _guard: guard,
        }
    }

    fn queue(&mut self, reply: &Reply) {
        self.settle(reply);
        if let Some(io) = &mut self.io {
            reply.write_to(&mut io.wbuf);
        }
    }

    /// Counts the current command once its final reply is known, and logs
    /// a refused HELO, MAIL, RCPT or DATA as Postfix's smtpd does.
    fn settle(&mut self, reply: &Reply) {
        if (300..400).contains(&reply.code) {
            // 334 or 354: the command goes on.
            if let Some(current) = &mut self.current {
                current.end_of_data = COMMANDS[current.command] == "data";
            }
            return;
        }
        let Some(current) = self.current.take() else {
            return;
        };
        let ok = reply.code < 400;
        self.counts.record(current.command, ok);
        if !ok
            && matches!(
                COMMANDS[current.command],
                "helo" | "ehlo" | "mail" | "rcpt" | "data" | "bdat"
            )
        {
            postino_core::metrics::message_rejected(reply.code, reply.status.as_deref());
            self.log_reject(&current, reply);
        }
    }

    /// `NOQUEUE: reject: RCPT from [ip]: 550 5.1.1 <text>; from=<s> to=<r>
    /// proto=ESMTP helo=<h>`, every client value escaped.
    fn log_reject(&self, current: &Current, reply: &Reply) {
        let verb = if current.end_of_data {
            "END-OF-MESSAGE".to_owned()
        } else {
            COMMANDS[current.command].to_ascii_uppercase()
        };
        let status = reply
            .status
            .as_deref()
            .map(|s| format!(" {s}"))
            .unwrap_or_default();
        let message = format!(
            "NOQUEUE: reject: {verb} from [{ip}]: {code}{status} {text};",
            ip = self.peer.ip(),
            code = reply.code,
            text = escape(reply.text.as_ref()),
        );
        let sender = current.from.clone().or_else(|| self.session.sender());
        let from = format!("<{}>", escape(&sender.unwrap_or_default()));
        let helo = format!("<{}>", escape(self.session.helo().unwrap_or_default()));
        let proto = self.session.proto();
        match &current.to {
            Some(to) => {
                let to = format!("<{}>", escape(to));
                info!(parent: &self.span, %from, %to, proto = %proto, %helo, "{message}");
            }
            None => info!(parent: &self.span, %from, proto = %proto, %helo, "{message}"),
        }
    }

    /// Runs the state machine over everything buffered; returns when it must
    /// wait for input or for an answer.
    fn drive(&mut self, ctx: &mut Context<Self>) {
        let _enter = self.span.clone().entered();
        loop {
            let Some(io) = self.io.as_mut() else { return };
            let step = self.session.ingest(&mut io.rbuf);
            if !matches!(step, Step::Read) {
                // A whole line (or a line error, or the end of the content):
                // the next one gets its own deadline.
                self.deadline = None;
            }
            if !self.step(step, ctx) {
                return;
            }
        }
    }

    /// Acts on a step; returns whether `drive` may go on at once.
    fn step(&mut self, step: Step, ctx: &mut Context<Self>) -> bool {
        let step = self.apply_rates(step);
        match step {
            Step::Read => {
                self.read(ctx);
                false
            }
            Step::Command(command) => {
                if let Some(line) = &command.line {
                    debug!(command = %request::loggable(line), "command");
                }
                let mail = command.name == "mail";
                self.current = Some(Current::of(command));
                if mail {
                    self.session.set_storage_room(self.shared.store.mail_room());
                }
                // Policy hook: HELO/EHLO, before the session takes it.
                if self.shared.policy.is_some() {
                    if let Some(name) = self.session.pending_hello() {
                        let name = name.to_owned();
                        self.screen_hello(name, ctx);
                        return false;
                    }
                }
                true
            }
            // Policy hook: MAIL, once the session accepted it.
            Step::Reply { reply, .. }
                if self.shared.policy.is_some() && self.screens_mail(&reply) =>
            {
                self.screen_mail(reply, ctx);
                false
            }
            Step::Reply { reply, delay } => {
                self.queue(&reply);
                if let Some(delay) = delay {
                    // Tarpit (Postfix smtpd_error_sleep_time): flush, then wait.
                    ctx.run_later(delay, |act, ctx| act.drive(ctx));
                    return false;
                }
                true
            }
            Step::Route(query) => {
                // Policy hook: RCPT, before the router (answers as it does).
                let fut = match &self.shared.policy {
                    Some(policies) => futures::future::Either::Left(crate::policy::rcpt(
                        policies.clone(),
                        self.client(),
                        query,
                        self.shared.router.clone(),
                    )),
                    None => futures::future::Either::Right(
                        self.shared.router.send(RouteRecipient(query)),
                    ),
                };
                ctx.wait(fut.into_actor(self).map(|res, act, ctx| {
                    let step = match res {
                        Ok(Ok(route)) => act.session.routed(route),
                        Ok(Err(e)) => {
                            warn!(error = %e, "routing failed");
                            act.session.route_failed()
                        }
                        Err(e) => {
                            warn!(error = %e, "router unavailable");
                            act.session.route_failed()
                        }
                    };
                    if act.step(step, ctx) {
                        act.drive(ctx);
                    }
                }));
                false
            }
            Step::CheckSender { user, sender } => {
                let store = self.shared.store.clone();
                let check = async move { sender_allowed(store.as_ref(), &user, &sender).await };
                ctx.wait(check.into_actor(self).map(|allowed, act, ctx| {
                    let step = match allowed {
                        Ok(allowed) => act.session.sender_checked(allowed),
                        Err(e) => {
                            warn!(parent: &act.span, error = %e, "sender check failed");
                            act.session.sender_check_failed()
                        }
                    };
                    if act.step(step, ctx) {
                        act.drive(ctx);
                    }
                }));
                false
            }
            Step::Authenticate { user, password } => {
                let checks = self.shared.checks.clone();
                let failures = self.shared.failures.clone();
                let ip = self.peer.ip();
                let canonical = user.to_ascii_lowercase();
                // Named in the log when the login fails (Postfix's sasl_username).
                let tried = canonical.clone();
                let mechanism = self
                    .current
                    .as_ref()
                    .and_then(|c| c.mechanism.clone())
                    .unwrap_or_default();
                let check = async move {
                    // argon2 is deliberately slow: it runs on the checking
                    // threads, a few at a time.
                    match checks.verify(canonical.clone(), password).await {
                        Ok(true) => {
                            failures.succeeded(ip);
                            postino_core::metrics::login("smtp", true);
                            Ok((Some(canonical), Duration::ZERO))
                        }
                        Ok(false) => {
                            // Password guessing: the same growing delay per client
                            // address as POP3 logins (Dovecot's auth_failure_delay).
                            postino_core::metrics::login("smtp", false);
                            let delay = failures.failed(ip);
                            tokio::time::sleep(delay).await;
                            Ok((None, delay))
                        }
                        // The store could not say: not the client's fault,
                        // so no delay and no 535.
                        Err(e) => Err(e),
                    }
                };
                ctx.wait(check.into_actor(self).map(move |checked, act, ctx| {
                    let step = match checked {
                        Ok((user, delay)) => {
                            match &user {
                                Some(u) => info!(
                                    parent: &act.span,
                                    mechanism = %mechanism,
                                    user = %escape(u),
                                    "smtp auth ok"
                                ),
                                // fail2ban's filter reads this line: the
                                // client is the span's peer, written
                                // before any client value.
                                None => warn!(
                                    parent: &act.span,
                                    mechanism = %mechanism,
                                    user = %escape(&tried),
                                    delay_ms = delay.as_millis() as u64,
                                    "smtp auth failed"
                                ),
                            }
                            act.session.authenticated(user)
                        }
                        Err(error) => {
                            warn!(
                                parent: &act.span,
                                user = %escape(&tried),
                                %error,
                                "smtp auth: password check failed"
                            );
                            act.session.authentication_unavailable()
                        }
                    };
                    if act.step(step, ctx) {
                        act.drive(ctx);
                    }
                }));
                false
            }
            Step::StartTls(reply) => {
                self.queue(&reply);
                let Some(acceptor) = self.shared.tls.get() else {
                    self.close_with(Reply::new(454, "4.7.0", "TLS not available"), ctx);
                    return false;
                };
                let Some(io) = self.io.take() else {
                    return false;
                };
                let fut = io.start_tls(acceptor, self.config.smtp.timeout);
                ctx.wait(fut.into_actor(self).map(|res, act, ctx| match res {
                    Ok(io) => {
                        act.tls = tls_description(&io);
                        act.io = Some(io);
                        act.session.tls_started();
                        let (protocol, cipher) = act.tls.clone().unzip();
                        info!(
                            parent: &act.span,
                            protocol = protocol.as_ref().map(tracing::field::display),
                            cipher = cipher.as_ref().map(tracing::field::display),
                            "tls established"
                        );
                        act.drive(ctx);
                    }
                    Err(e) => {
                        debug!(error = %e, "tls handshake failed");
                        ctx.stop();
                    }
                }));
                false
            }
            Step::EndOfData => {
                self.data_started = None;
                let store = self.shared.store.clone();
                let id = async move { store.new_id().await };
                ctx.wait(id.into_actor(self).map(|id, act, ctx| {
                    let step = match id {
                        Ok(id) => act.session.data_done(id, &rfc5322_date(now_unix())),
                        Err(e) => {
                            warn!(parent: &act.span, error = %e, "cannot allocate a message id");
                            act.session.id_unavailable()
                        }
                    };
                    if act.step(step, ctx) {
                        act.drive(ctx);
                    }
                }));
                false
            }
            // Policy hook: end of DATA, before the message is stored.
            Step::Message(accepted) if self.shared.policy.is_some() => {
                self.screen_data(accepted, ctx);
                false
            }
            Step::Message(accepted) => {
                self.submit(accepted, ctx);
                false
            }
            Step::Close(reply) => {
                self.close_with(reply, ctx);
                false
            }
        }
    }

    /// The end of DATA: hands the accepted message to [`Intake`] (store,
    /// wait until durable, hand on) and sends the final reply (`250 …
    /// queued as` or a `451`); then reads on.
    fn submit(&mut self, accepted: Accepted, ctx: &mut Context<Self>) {
        let id = accepted.id;
        // For the accepted line (Postfix logs these in several).
        let sasl_username = self
            .session
            .authenticated_user()
            .map(|u| escape(u).to_string());
        let (tls_protocol, tls_cipher) = self.tls.clone().unzip();
        let message_id = message_id(&accepted.content).map(|m| escape(&m).to_string());
        let authenticated = self.session.authenticated_user().is_some();
        let mut envelope = Envelope {
            id,
            sender: accepted.sender,
            recipients: accepted.recipients,
            received_at: now_unix(),
            client: self.peer.ip().to_string(),
            helo: accepted.helo,
            size: accepted.content.len() as u64,
            params: accepted.params,
        };
        let shared = self.shared.clone();
        let fut = async move {
            let via = crate::intake::ReceivedVia {
                tls_protocol: tls_protocol.clone(),
                tls_cipher: tls_cipher.clone(),
                auth: sasl_username.clone(),
                message_id: message_id.clone(),
            };
            let logged = |envelope: &Envelope| {
                info!(
                    %id,
                    from = %escape(&envelope.sender_display()),
                    nrcpt = envelope.recipients.len(),
                    size = envelope.size,
                    message_id = message_id.as_ref().map(tracing::field::display),
                    sasl_username = sasl_username.as_ref().map(tracing::field::display),
                    tls_protocol = tls_protocol.as_ref().map(tracing::field::display),
                    tls_cipher = tls_cipher.as_ref().map(tracing::field::display),
                    "message accepted"
                );
                postino_core::metrics::message_accepted(envelope.size as usize);
            };
            // DKIM, once, before it is stored (intake.rs, dkim.rs).
            let content = (shared.intake)
                .sign(&mut envelope, accepted.content, authenticated)
                .await;
            shared.intake.accept(envelope, content, &via, logged).await
        }
        .instrument(self.span.clone());
        ctx.wait(fut.into_actor(self).map(move |res, act, ctx| {
            let reply = match res {
                Ok(id) => act.session.accepted(id),
                Err(e) => {
                    warn!(%id, error = %e, "storing the message failed");
                    postino_core::metrics::store_error("accept");
                    act.session.storage_failed()
                }
            };
            act.queue(&reply);
            act.drive(ctx);
        }));
    }

    /// Flushes replies and waits for more input (or a timeout, or shutdown).
    fn read(&mut self, ctx: &mut Context<Self>) {
        let Some(mut io) = self.io.take() else { return };
        let timeout = self.read_timeout();
        let fut = async move {
            let outcome = io.flush_and_read(timeout).await;
            (io, outcome)
        };
        ctx.spawn(fut.into_actor(self).map(|(io, outcome), act, ctx| {
            act.io = Some(io);
            match outcome {
                ReadOutcome::Data => act.drive(ctx),
                ReadOutcome::Closed => {
                    debug!(parent: &act.span, "client closed the connection");
                    ctx.stop();
                }
                ReadOutcome::TimedOut => {
                    let host = act.config.hostname.clone();
                    act.close_with(
                        Reply::new(421, "4.4.2", format!("{host} Error: timeout exceeded")),
                        ctx,
                    );
                }
                ReadOutcome::Shutdown => {
                    let host = act.config.hostname.clone();
                    act.close_with(
                        Reply::new(421, "4.3.2", format!("{host} Service shutting down")),
                        ctx,
                    );
                }
                ReadOutcome::Error(e) => {
                    debug!(parent: &act.span, error = %e, "read error");
                    ctx.stop();
                }
            }
        }));
    }

    /// What is left of the command line's deadline, or during DATA what the
    /// minimum data rate allows.
    fn read_timeout(&mut self) -> Duration {
        let base = self.config.smtp.timeout;
        let rate = self.config.smtp.min_data_rate;
        match self.session.data_received() {
            Some(received) if rate > 0 => {
                // Postfix's smtpd_min_data_rate: the deadline grows with the
                // bytes received, so a slow trickle runs out of time.
                // It never exceeds the idle timeout, though: a client that
                // sent a large part fast must not earn a long stall. The
                // clock starts at the first read after the 354 (nothing is
                // awaited between the two).
                let started = *self.data_started.get_or_insert_with(Instant::now);
                let allowed = base + Duration::from_secs(received / rate);
                allowed
                    .saturating_sub(started.elapsed())
                    .min(base)
                    .max(Duration::from_millis(1))
            }
            // No minimum rate: each read may idle for the timeout.
            Some(_) => base,
            None => {
                // Between BDAT chunks: the next chunk gets its own clock.
                self.data_started = None;
                let deadline = *self.deadline.get_or_insert_with(|| Instant::now() + base);
                deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1))
            }
        }
    }

    /// Submission rates (`[limits]`): an accepted MAIL or a RCPT about to
    /// be routed is counted, or refused with `452 4.7.0` (MAIL ends the
    /// transaction; RCPT is answered like a refused recipient). Before the
    /// embedder's policies: a client over its rate costs them nothing.
    fn apply_rates(&mut self, step: Step) -> Step {
        let event = match &step {
            Step::Reply { reply, .. } if self.screens_mail(reply) => Event::Message,
            Step::Route(_) => Event::Recipient,
            _ => return step,
        };
        // The current configuration, so that a reload applies to open
        // connections too.
        let config = self.shared.config.current();
        let user = self.session.authenticated_user();
        match self
            .shared
            .rates
            .admit(&config.limits, event, user, self.peer.ip())
        {
            Ok(()) => step,
            Err(reply) => match event {
                Event::Message => self.session.refuse(reply),
                Event::Recipient => self.session.routed(postino_core::Route::Reject(reply)),
            },
        }
    }

    /// Sends a last reply and stops.
    fn close_with(&mut self, reply: Reply, ctx: &mut Context<Self>) {
        self.queue(&reply);
        if let Some(mut io) = self.io.take() {
            ctx.wait(
                async move { io.close().await }
                    .into_actor(self)
                    .map(|_, _, ctx| ctx.stop()),
            );
        } else {
            ctx.stop();
        }
    }
}

/// Whether an authenticated `user` may use `sender` as envelope sender: their
/// own address, or an alias that leads to them.
///
/// # Errors
///
/// The alias lookup failed.
async fn sender_allowed(
    store: &dyn postino_core::storage::Storage,
    user: &str,
    sender: &str,
) -> Result<bool, postino_core::DirectoryError> {
    if user.eq_ignore_ascii_case(sender) {
        return Ok(true);
    }
    Ok(store
        .alias(&sender.to_ascii_lowercase())
        .await
        .map_err(postino_core::DirectoryError::new)?
        .is_some_and(|targets| targets.iter().any(|t| t.eq_ignore_ascii_case(user))))
}

impl Actor for SmtpConnection {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        debug!(parent: &self.span, "connected");
        let greeting = self.session.greeting();
        // Policy hook: connect, before the greeting.
        if self.shared.policy.is_some() {
            return self.screen_connect(greeting, ctx);
        }
        self.queue(&greeting);
        self.drive(ctx);
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        // Postfix's session summary, one line per connection.
        info!(parent: &self.span, "disconnect from [{}] {}", self.peer.ip(), self.counts);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(name: &str) -> usize {
        COMMANDS.iter().position(|c| *c == name).unwrap()
    }

    #[test]
    fn counts_print_as_postfix_does() {
        let mut counts = CommandCounts::default();
        assert_eq!(counts.to_string(), "commands=0");
        for (name, ok) in [
            ("quit", true),
            ("rcpt", false),
            ("ehlo", true),
            ("rcpt", true),
            ("mail", true),
            ("unknown", false),
        ] {
            counts.record(index(name), ok);
        }
        assert_eq!(
            counts.to_string(),
            "ehlo=1 mail=1 rcpt=1/2 quit=1 unknown=0/1 commands=4/6"
        );
    }

    #[test]
    fn message_id_is_read_from_the_header_section_only() {
        let cases: [(&[u8], Option<&str>); 5] = [
            (
                b"Subject: x\r\nMessage-ID: <a@b>\r\n\r\nbody",
                Some("<a@b>"),
            ),
            (b"message-id:   <a@b>  \r\n\r\n", Some("<a@b>")),
            (b"Message-Id:\r\n <folded@b>\r\n\r\n", Some("<folded@b>")),
            (b"Subject: x\r\n\r\nMessage-ID: <in@body>\r\n", None),
            (b"Message-IDs: <no@b>\n\n", None),
        ];
        for (content, want) in cases {
            assert_eq!(message_id(content).as_deref(), want, "{content:?}");
        }
    }
}
