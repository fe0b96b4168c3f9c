//! The POP3 connection actor: one per client, a thin shell around
//! [`postino_core::pop3::Session`]. The maildrop lock is the storage's
//! (held cluster-wide, `crate::mailbox`), kept by the connection while
//! its session lasts; content is read from the storage directly.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use postino_core::logsafe::escape;
use postino_core::pop3::{
    AuthResult, LineReceiver, Maildrop, MaildropEntry, Session, SessionConfig, Step,
};
use postino_core::storage::{MaildropLock, SharedStorage};
use postino_core::Config;
use tracing::{debug, info, warn};

use crate::auth::PasswordChecks;
use crate::io::{Io, ReadOutcome, Stream, TlsSlot};
use crate::limits::ConnectionGuard;
use crate::login_delay::AuthFailures;
use crate::sessions::{Kick, Pop3Sessions};

/// What every POP3 connection shares.
pub struct Pop3Shared {
    /// The configuration in use; each session takes the current one at its
    /// start and keeps it ([`crate::reload`]).
    pub config: crate::reload::LiveConfig,
    /// The storage (passwords, maildrops and their locks).
    pub store: SharedStorage,
    /// The TLS acceptor for STLS (reloadable), if TLS is configured.
    pub tls: TlsSlot,
    /// Failed logins per client address (shared with SMTP AUTH).
    pub failures: Arc<AuthFailures>,
    /// The password-checking threads (shared with SMTP AUTH).
    pub checks: PasswordChecks,
    /// The live sessions, for `postino who` and `kick`.
    pub sessions: Arc<Pop3Sessions>,
}

static SESSION_IDS: AtomicU64 = AtomicU64::new(1);

/// One POP3 client connection.
pub struct Pop3Connection {
    shared: Arc<Pop3Shared>,
    /// The configuration this session started with.
    settings: Arc<Config>,
    session: Session,
    io: Option<Io>,
    lines: LineReceiver,
    /// The maildrop this session has locked, if logged in.
    maildrop: Option<Box<dyn MaildropLock>>,
    /// Who logged in, for the line logged at the end.
    user: Option<String>,
    /// Why the connection ended, when not by QUIT or the session's own
    /// decision: `timeout`, `shutdown`, `kicked` or `disconnected`.
    ended: Option<&'static str>,
    /// When the command line being read must be complete: the timeout
    /// counts for the whole line, not per read, so a client dripping bytes
    /// is disconnected as an idle one is.
    deadline: Option<Instant>,
    id: u64,
    peer: SocketAddr,
    span: tracing::Span,
    _guard: ConnectionGuard,
}

impl Pop3Connection {
    /// A connection actor for a client socket accepted at `peer` (already
    /// encrypted for implicit TLS); it ends at `shutdown`, and holds
    /// `guard` (its connection slot) until it stops.
    pub fn new(
        shared: Arc<Pop3Shared>,
        stream: Stream,
        peer: SocketAddr,
        shutdown: tokio::sync::watch::Receiver<bool>,
        guard: ConnectionGuard,
    ) -> Pop3Connection {
        let tls_active = matches!(stream, Stream::Tls(_));
        let tls_available = shared.tls.is_configured();
        let settings = shared.config.current();
        let mut config = SessionConfig::new(settings.hostname.clone());
        config.tls_available = tls_available;
        config.tls_active = tls_active;
        config.plaintext_auth_allowed =
            tls_active || !tls_available || settings.smtp.allow_plaintext_auth;
        Pop3Connection {
            settings,
            session: Session::new(config),
            io: Some(Io::new(stream, shutdown)),
            lines: LineReceiver::new(),
            maildrop: None,
            user: None,
            ended: None,
            deadline: None,
            id: SESSION_IDS.fetch_add(1, Ordering::Relaxed),
            span: tracing::info_span!("pop3", %peer),
            peer,
            shared,
            _guard: guard,
        }
    }

    fn drive(&mut self, ctx: &mut Context<Self>) {
        let _enter = self.span.clone().entered();
        loop {
            let Some(io) = self.io.as_mut() else { return };
            let max = self.session.max_line_len();
            let step = match self.lines.next_line(&mut io.rbuf, max) {
                None => return self.read(ctx),
                Some(Ok(line)) => self.session.line(&line, &mut io.wbuf),
                Some(Err(_)) => self.session.line_too_long(&mut io.wbuf),
            };
            self.deadline = None;
            if !self.step(step, ctx) {
                return;
            }
        }
    }

    /// Carries out a step; returns whether `drive` may go on at once.
    fn step(&mut self, step: Step, ctx: &mut Context<Self>) -> bool {
        match step {
            Step::Send => true,
            Step::Authenticate { user, password } => {
                self.authenticate(user, password, ctx);
                false
            }
            Step::Retrieve { key, .. } => {
                let Some(mailbox) = self.maildrop.as_ref().map(|l| l.mailbox().to_owned()) else {
                    return false;
                };
                let store = self.shared.store.clone();
                let read = async move { store.read_mail(&mailbox, key).await };
                ctx.wait(read.into_actor(self).map(move |content, act, ctx| {
                    let Some(io) = act.io.as_mut() else { return };
                    let next = match content {
                        // Not in the message's history: that would make every
                        // read a store write (and POP3 RETR half as fast);
                        // deletion at QUIT is recorded (`mailbox.rs`).
                        Ok(Some(content)) => act.session.retrieved(&content, &mut io.wbuf),
                        other => {
                            warn!(?other, key, "message unreadable");
                            act.session.retrieve_failed(&mut io.wbuf)
                        }
                    };
                    if act.step(next, ctx) {
                        act.drive(ctx);
                    }
                }));
                false
            }
            Step::Commit { deleted } => {
                let Some(lock) = self.maildrop.take() else {
                    return false;
                };
                let mailbox = lock.mailbox().to_owned();
                let store = self.shared.store.clone();
                // The +OK to QUIT says the messages are gone (RFC 1939 §6):
                // `expunge` makes the deletion durable first, or a crash
                // right after it brings them back.
                let fut = async move {
                    crate::mailbox::expunge(store.as_ref(), lock, deleted)
                        .await
                        .map_err(|e| e.to_string())
                };
                ctx.wait(fut.into_actor(self).map(move |res, act, ctx| {
                    let ok = res.is_ok();
                    if !ok {
                        warn!(parent: &act.span, mailbox = %escape(&mailbox), ?res, "expunge failed");
                    }
                    let Some(io) = act.io.as_mut() else { return };
                    let next = act.session.committed(ok, &mut io.wbuf);
                    if act.step(next, ctx) {
                        act.drive(ctx);
                    }
                }));
                false
            }
            Step::StartTls => {
                let Some(acceptor) = self.shared.tls.get() else {
                    self.close(ctx);
                    return false;
                };
                let Some(io) = self.io.take() else {
                    return false;
                };
                let fut = io.start_tls(acceptor, Duration::from_secs(60));
                ctx.wait(fut.into_actor(self).map(|res, act, ctx| match res {
                    Ok(io) => {
                        act.io = Some(io);
                        act.lines = LineReceiver::new();
                        act.session.tls_started();
                        act.drive(ctx);
                    }
                    Err(e) => {
                        debug!(parent: &act.span, error = %e, "tls handshake failed");
                        ctx.stop();
                    }
                }));
                false
            }
            Step::Close => {
                // Give the maildrop up before the last reply goes out: a
                // client that logs in again as soon as it reads QUIT's +OK
                // must not be told [IN-USE].
                if let Some(lock) = self.maildrop.take() {
                    let store = self.shared.store.clone();
                    let unlock = async move { store.unlock_maildrop(lock).await };
                    ctx.wait(unlock.into_actor(self).map(|(), act, ctx| act.close(ctx)));
                } else {
                    self.close(ctx);
                }
                false
            }
        }
    }

    fn authenticate(&mut self, user: String, password: String, ctx: &mut Context<Self>) {
        let shared = self.shared.clone();
        let node = self.settings.store.node.clone();
        let ip = self.peer.ip();
        let canonical = user.to_ascii_lowercase();
        let fut = async move {
            let mut delay = Duration::ZERO;
            let mut lock_held = None;
            // argon2 is deliberately slow: it runs on the checking
            // threads, a few at a time.
            let verified = shared
                .checks
                .verify(canonical.clone(), password)
                .await
                .map_err(|e| e.to_string());
            let result = match verified {
                Ok(true) => {
                    match crate::mailbox::open(shared.store.as_ref(), &canonical, &node).await {
                        Ok(Some((lock, entries))) => {
                            shared.failures.succeeded(ip);
                            postino_core::metrics::login("pop3", true);
                            lock_held = Some(lock);
                            AuthResult::Ok(Maildrop(
                                entries
                                    .into_iter()
                                    .map(|e| MaildropEntry {
                                        uidl: e.uidl,
                                        size: e.size,
                                        key: e.key,
                                    })
                                    .collect(),
                            ))
                        }
                        Ok(None) => AuthResult::InUse,
                        Err(e) => {
                            warn!(error = %e, "maildrop unavailable");
                            AuthResult::TemporaryFailure
                        }
                    }
                }
                Ok(false) => {
                    postino_core::metrics::login("pop3", false);
                    delay = shared.failures.failed(ip);
                    tokio::time::sleep(delay).await;
                    AuthResult::BadCredentials
                }
                Err(e) => {
                    warn!(error = %e, "password check failed");
                    AuthResult::TemporaryFailure
                }
            };
            (canonical, result, delay, lock_held)
        };
        ctx.wait(fut.into_actor(self).map(|(user, result, delay, lock), act, ctx| {
            match &result {
                AuthResult::Ok(drop) => {
                    info!(parent: &act.span, user = %escape(&user), messages = drop.0.len(), "pop3 login");
                    act.shared.sessions.logged_in(act.id, &user);
                    act.user = Some(user.clone());
                    act.maildrop = lock;
                }
                // The delay is logged so a postmaster (and the tests) can see
                // the tarpit growing per client address. fail2ban's filter
                // reads the wrong-password line: the client is the span's
                // peer and `result` comes before the (escaped) user name,
                // so no user name can forge either.
                AuthResult::BadCredentials => warn!(
                    parent: &act.span,
                    result = %"BadCredentials",
                    user = %escape(&user),
                    delay_ms = delay.as_millis() as u64,
                    "pop3 login failed"
                ),
                other => info!(
                    parent: &act.span,
                    result = ?other,
                    user = %escape(&user),
                    delay_ms = delay.as_millis() as u64,
                    "pop3 login failed"
                ),
            }
            let Some(io) = act.io.as_mut() else { return };
            let next = act.session.authenticated(result, &mut io.wbuf);
            if act.step(next, ctx) {
                act.drive(ctx);
            }
        }));
    }

    fn read(&mut self, ctx: &mut Context<Self>) {
        let Some(mut io) = self.io.take() else { return };
        let base = self.settings.pop3.timeout;
        let deadline = *self.deadline.get_or_insert_with(|| Instant::now() + base);
        let timeout = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        let fut = async move {
            let outcome = io.flush_and_read(timeout).await;
            (io, outcome)
        };
        ctx.spawn(
            fut.into_actor(self)
                .map(|(mut io, outcome), act, ctx| match outcome {
                    ReadOutcome::Data => {
                        act.io = Some(io);
                        act.drive(ctx);
                    }
                    ReadOutcome::TimedOut => {
                        act.ended = Some("timeout");
                        act.session.timed_out(&mut io.wbuf);
                        act.io = Some(io);
                        act.close(ctx);
                    }
                    ReadOutcome::Shutdown => {
                        act.ended = Some("shutdown");
                        act.session.shutting_down(&mut io.wbuf);
                        act.io = Some(io);
                        act.close(ctx);
                    }
                    ReadOutcome::Closed | ReadOutcome::Error(_) => {
                        act.ended = Some("disconnected");
                        act.io = Some(io);
                        ctx.stop();
                    }
                }),
        );
    }

    /// Releases the maildrop lock, if held, without deleting anything (in
    /// the background: the connection is going away).
    fn release(&mut self) {
        if let Some(lock) = self.maildrop.take() {
            let store = self.shared.store.clone();
            actix_rt::spawn(async move { store.unlock_maildrop(lock).await });
        }
    }

    fn close(&mut self, ctx: &mut Context<Self>) {
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

impl Actor for Pop3Connection {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        debug!(parent: &self.span, "connected");
        let kick = ctx.address().recipient();
        self.shared.sessions.connected(self.id, self.peer, kick);
        if let Some(io) = self.io.as_mut() {
            self.session.greeting(&mut io.wbuf);
        }
        self.drive(ctx);
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        // A dropped connection deletes nothing; it only gives up the lock.
        self.release();
        self.shared.sessions.disconnected(self.id);
        let Some(user) = &self.user else {
            debug!(parent: &self.span, "disconnected");
            return;
        };
        // Dovecot's `Logged out top=0/0, retr=1/1234, del=1/1, size=1234`:
        // messages/octets sent, deleted/messages at login, octets at login.
        let a = self.session.activity();
        let reason = match a.quit {
            true => "quit",
            false => self.ended.unwrap_or("closed"),
        };
        info!(
            parent: &self.span,
            user = %escape(user),
            reason = %reason,
            top = %format_args!("{}/{}", a.top.0, a.top.1),
            retr = %format_args!("{}/{}", a.retr.0, a.retr.1),
            del = %format_args!("{}/{}", a.deleted, a.messages),
            size = a.size,
            "pop3 logout"
        );
    }
}

impl Handler<Kick> for Pop3Connection {
    type Result = ();

    /// Drops the connection: deletions marked in it are not made, the
    /// maildrop lock goes (`stopped`).
    fn handle(&mut self, _: Kick, ctx: &mut Self::Context) {
        info!(parent: &self.span, user = %escape(self.maildrop.as_ref().map_or("", |l| l.mailbox())), "pop3 session ended by the administrator");
        self.ended = Some("kicked");
        ctx.stop();
    }
}
