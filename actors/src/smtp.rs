//! The SMTP connection actor: one per client, a thin shell around
//! [`postino_core::smtp::Session`] that does the IO the session asks for.
//!
//! Flow: read → frame lines ([`LineReceiver`]) → [`Session::command`] → act on
//! the [`Step`]. Replies collect in the write buffer and are flushed when no
//! complete command is buffered, so pipelined commands (RFC 2920) get their
//! replies in order and in one write. While the actor waits for the router, a
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
use postino_core::smtp::receiver::{DataReceiver, LineError, LineReceiver};
use postino_core::smtp::session::{DataStep, Peer, SessionConfig, Step};
use postino_core::smtp::{request, Reply, Request, Session};
use postino_core::Store;
use tracing::{debug, info, warn, Instrument};

use crate::auth::PasswordChecks;
use crate::delivery::actor::Queued;
use crate::io::{Io, ReadOutcome, Stream, TlsSlot};
use crate::router::{Dispatch, RouteRecipient, Submit, Submitted};
use crate::server::{AuthFailures, ConnectionGuard};

/// What every SMTP connection of one listener shares.
pub struct SmtpShared {
    pub config: Arc<Config>,
    pub session: Arc<SessionConfig>,
    pub store: Store,
    pub router: Recipient<RouteRecipient>,
    /// The router of this connection's worker: stores accepted messages.
    pub submit: Recipient<Submit>,
    pub dispatch: Recipient<Dispatch>,
    /// The delivery actor, for remote-only mail queued at once.
    pub queued: Recipient<Queued>,
    pub tls: TlsSlot,
    /// Failed logins per client address (shared with POP3).
    pub failures: Arc<AuthFailures>,
    /// The password-checking threads (shared with POP3).
    pub checks: PasswordChecks,
}

/// One SMTP client connection.
pub struct SmtpConnection {
    shared: Arc<SmtpShared>,
    session: Session,
    io: Option<Io>,
    lines: LineReceiver,
    data: Option<DataTransfer>,
    /// When the command line being read must be complete: set when the
    /// session starts waiting for one, cleared when it is taken. The
    /// timeout counts for the whole line, not per read (Postfix's
    /// `smtpd_per_record_deadline`).
    deadline: Option<Instant>,
    peer: SocketAddr,
    span: tracing::Span,
    _guard: ConnectionGuard,
}

/// A DATA transfer in progress, with what the minimum-rate check needs.
struct DataTransfer {
    receiver: DataReceiver,
    started: Instant,
}

impl SmtpConnection {
    pub fn new(
        shared: Arc<SmtpShared>,
        stream: Stream,
        peer: SocketAddr,
        shutdown: tokio::sync::watch::Receiver<bool>,
        guard: ConnectionGuard,
    ) -> SmtpConnection {
        let tls = matches!(stream, Stream::Tls(_));
        let session = Session::new(
            shared.session.clone(),
            Peer {
                ip: peer.ip(),
                trusted: shared.config.may_relay(peer.ip()),
                tls,
            },
        );
        let lines = LineReceiver::new(
            shared.config.smtp.max_line_length,
            shared.config.smtp.bare_lf,
        );
        SmtpConnection {
            session,
            io: Some(Io::new(stream, shutdown)),
            lines,
            data: None,
            deadline: None,
            span: tracing::info_span!("smtp", %peer),
            peer,
            shared,
            _guard: guard,
        }
    }

    fn queue(&mut self, reply: &Reply) {
        if let Some(io) = &mut self.io {
            reply.write_to(&mut io.wbuf);
        }
    }

    /// Runs the state machine over everything buffered; returns when it must
    /// wait for input or for an answer.
    fn drive(&mut self, ctx: &mut Context<Self>) {
        let _enter = self.span.clone().entered();
        loop {
            let Some(io) = self.io.as_mut() else { return };
            if let Some(transfer) = &mut self.data {
                if !transfer.receiver.ingest(&mut io.rbuf) {
                    return self.read(ctx);
                }
                let transfer = self.data.take().expect("checked above");
                return self.end_of_data(transfer.receiver, ctx);
            }
            let next = self.lines.next_line(&mut io.rbuf);
            if !matches!(next, Ok(None)) {
                // A whole line (or a line error): the next one gets its own
                // deadline.
                self.deadline = None;
            }
            let line = match next {
                Ok(Some(line)) => line,
                Ok(None) => return self.read(ctx),
                Err(LineError::TooLong) => {
                    let step = self.session.line_too_long();
                    if !self.step(step, ctx) {
                        return;
                    }
                    continue;
                }
                Err(e @ LineError::BareLineEnding) => {
                    self.close_with(e.reply(), ctx);
                    return;
                }
            };
            let step = if self.session.in_auth() {
                self.session.auth_response(&line)
            } else {
                match Request::parse(&line) {
                    Ok(request) => {
                        debug!(command = %request::loggable(&line), "command");
                        if matches!(request, Request::Mail { .. }) {
                            self.session.set_storage_low(self.shared.store.space_low());
                        }
                        self.session.command(request)
                    }
                    Err(e) => self.session.bad_line(e.reply()),
                }
            };
            if !self.step(step, ctx) {
                return;
            }
        }
    }

    /// Acts on a step; returns whether `drive` may go on at once.
    fn step(&mut self, step: Step, ctx: &mut Context<Self>) -> bool {
        match step {
            Step::Reply(reply) => {
                self.queue(&reply);
                if reply.code >= 400 && self.session.should_delay() {
                    // Tarpit (Postfix smtpd_error_sleep_time): flush, then wait.
                    let delay = self.shared.config.smtp.error_delay;
                    ctx.run_later(delay, |act, ctx| act.drive(ctx));
                    return false;
                }
                true
            }
            Step::AuthChallenge(reply) => {
                self.queue(&reply);
                true
            }
            Step::Data(reply) => {
                self.queue(&reply);
                self.data = Some(DataTransfer {
                    receiver: DataReceiver::new(
                        self.session.data_limit(),
                        self.shared.config.smtp.bare_lf,
                    ),
                    started: Instant::now(),
                });
                true
            }
            Step::Route(query) => {
                let fut = self.shared.router.send(RouteRecipient(query));
                ctx.wait(fut.into_actor(self).map(|res, act, ctx| {
                    let reply = match res {
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
                    if act.answer(reply, ctx) {
                        act.drive(ctx);
                    }
                }));
                false
            }
            Step::CheckSender { user, sender } => {
                let reply = match sender_allowed(&self.shared.store, &user, &sender) {
                    Ok(allowed) => self.session.sender_checked(allowed),
                    Err(e) => {
                        warn!(error = %e, "sender check failed");
                        self.session.sender_check_failed()
                    }
                };
                self.answer(reply, ctx)
            }
            Step::Authenticate { user, password } => {
                let checks = self.shared.checks.clone();
                let failures = self.shared.failures.clone();
                let ip = self.peer.ip();
                let canonical = user.to_ascii_lowercase();
                // Named in the log when the login fails (Postfix's sasl_username).
                let tried = canonical.clone();
                let check = async move {
                    // argon2 is deliberately slow: it runs on the checking
                    // threads, a few at a time.
                    match checks.verify(canonical.clone(), password).await {
                        Ok(true) => {
                            failures.succeeded(ip);
                            Ok((Some(canonical), Duration::ZERO))
                        }
                        Ok(false) => {
                            // Password guessing: the same growing delay per client
                            // address as POP3 logins (Dovecot's auth_failure_delay).
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
                                Some(u) => {
                                    info!(parent: &act.span, user = %escape(u), "smtp auth ok")
                                }
                                None => warn!(
                                    parent: &act.span,
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
                let fut = io.start_tls(acceptor, self.shared.config.smtp.timeout);
                ctx.wait(fut.into_actor(self).map(|res, act, ctx| match res {
                    Ok(io) => {
                        act.io = Some(io);
                        act.session.tls_started();
                        act.lines = LineReceiver::new(
                            act.shared.config.smtp.max_line_length,
                            act.shared.config.smtp.bare_lf,
                        );
                        debug!("tls started");
                        act.drive(ctx);
                    }
                    Err(e) => {
                        debug!(error = %e, "tls handshake failed");
                        ctx.stop();
                    }
                }));
                false
            }
            Step::Close(reply) => {
                self.close_with(reply, ctx);
                false
            }
        }
    }

    /// Sends a reply that did not come as a [`Step`] (a routing decision,
    /// the sender check, the end of DATA) with the error handling of
    /// [`Step::Reply`]: past the soft error limit it is delayed, and at the
    /// hard limit it is followed by `421` and the session ends. Returns
    /// whether `drive` may go on at once.
    fn answer(&mut self, reply: Reply, ctx: &mut Context<Self>) -> bool {
        if reply.code >= 400 {
            if let Some(close) = self.session.error_limit_reply() {
                self.queue(&reply);
                self.close_with(close, ctx);
                return false;
            }
        }
        self.step(Step::Reply(reply), ctx)
    }

    fn end_of_data(&mut self, receiver: DataReceiver, ctx: &mut Context<Self>) {
        let result = receiver.finish();
        let id = match self.shared.store.new_id() {
            Ok(id) => id,
            Err(e) => {
                warn!(error = %e, "cannot allocate a message id");
                self.session.abort_transaction();
                let reply = self.session.storage_failed();
                self.queue(&reply);
                return self.drive(ctx);
            }
        };
        let date = rfc5322_date(now_unix());
        match self.session.data_done(result, id, &date) {
            DataStep::Reply(reply) => {
                if self.answer(reply, ctx) {
                    self.drive(ctx);
                }
            }
            DataStep::Close(reply) => {
                self.close_with(reply, ctx);
            }
            DataStep::Accept(accepted) => {
                let envelope = Envelope {
                    id,
                    sender: accepted.sender,
                    recipients: accepted.recipients,
                    received_at: now_unix(),
                    client: self.peer.ip().to_string(),
                    helo: accepted.helo,
                    size: accepted.content.len() as u64,
                };
                let submit = self.shared.submit.send(Submit {
                    envelope: envelope.clone(),
                    content: accepted.content,
                });
                let store = self.shared.store.clone();
                let dispatch = self.shared.dispatch.clone();
                let queued = self.shared.queued.clone();
                let fut = async move {
                    let submitted = submit
                        .await
                        .map_err(|e| e.to_string())?
                        .map_err(|e| e.to_string())?;
                    // The 250 is written only once a group commit that
                    // started after the write has flushed (REFERENCE.md:
                    // Postfix fsyncs first too).
                    store.durable().await.map_err(|e| e.to_string())?;
                    let rcpts = envelope.recipients.len();
                    info!(%id, from = %escape(&envelope.sender_display()), nrcpt = rcpts, size = envelope.size, "message accepted");
                    if let Submitted::Queued(q) = submitted {
                        // Nothing to wait for: the queue has it, and the
                        // next queue run tries it if this is lost.
                        queued.do_send(q);
                    } else if matches!(submitted, Submitted::Spooled) {
                        // Hand it on before answering, so that a client that
                        // reads its mailbox right after the 250 finds the
                        // message. A failed dispatch is retried at restart
                        // from the spool; the message is safe either way.
                        if let Err(e) = dispatch
                            .send(Dispatch(envelope))
                            .await
                            .map_err(|e| e.to_string())
                            .and_then(|r| r.map_err(|e| e.to_string()))
                        {
                            warn!(%id, error = %e, "dispatch failed; will retry at restart");
                        }
                    }
                    Ok::<(), String>(())
                }
                .instrument(self.span.clone());
                ctx.wait(fut.into_actor(self).map(move |res, act, ctx| {
                    let reply = match res {
                        Ok(()) => act.session.accepted(id),
                        Err(e) => {
                            warn!(%id, error = %e, "storing the message failed");
                            // Whatever of it reached the disk must never be
                            // delivered: the client will send it again.
                            act.shared.store.reject(id);
                            act.session.storage_failed()
                        }
                    };
                    act.queue(&reply);
                    act.drive(ctx);
                }));
            }
        }
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
                    let host = act.shared.config.hostname.clone();
                    act.close_with(
                        Reply::new(421, "4.4.2", format!("{host} Error: timeout exceeded")),
                        ctx,
                    );
                }
                ReadOutcome::Shutdown => {
                    let host = act.shared.config.hostname.clone();
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
        let base = self.shared.config.smtp.timeout;
        let rate = self.shared.config.smtp.min_data_rate;
        match &self.data {
            Some(t) if rate > 0 => {
                // Postfix's smtpd_min_data_rate: the deadline grows with the
                // bytes received, so a slow trickle runs out of time.
                // It never exceeds the idle timeout, though: a client that
                // sent a large part fast must not earn a long stall.
                let allowed = base + Duration::from_secs(t.receiver.received() / rate);
                allowed
                    .saturating_sub(t.started.elapsed())
                    .min(base)
                    .max(Duration::from_millis(1))
            }
            // No minimum rate: each read may idle for the timeout.
            Some(_) => base,
            None => {
                let deadline = *self.deadline.get_or_insert_with(|| Instant::now() + base);
                deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1))
            }
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
fn sender_allowed(
    store: &Store,
    user: &str,
    sender: &str,
) -> Result<bool, postino_core::DirectoryError> {
    if user.eq_ignore_ascii_case(sender) {
        return Ok(true);
    }
    Ok(
        postino_core::Directory::alias(store, &sender.to_ascii_lowercase())?
            .is_some_and(|targets| targets.iter().any(|t| t.eq_ignore_ascii_case(user))),
    )
}

impl Actor for SmtpConnection {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        debug!(parent: &self.span, "connected");
        let greeting = self.session.greeting();
        self.queue(&greeting);
        self.drive(ctx);
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        debug!(parent: &self.span, "disconnected");
    }
}
