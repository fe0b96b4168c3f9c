//! Starting and stopping a server: the store, the core actors, the listeners,
//! connection limits, and the control socket. This is the library API that
//! `postino serve` and embedders use.
//!
//! ```no_run
//! # async fn run() -> Result<(), postino::ServerError> {
//! let config = postino_core::Config::load("postino.toml".as_ref())?;
//! let server = postino::Server::builder(config).start().await?;
//! println!("SMTP on {:?}", server.smtp_addrs());
//! server.stop().await;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use postino_core::config::ConfigError;
use postino_core::smtp::session::SessionConfig;
use postino_core::store::StoreError;
use postino_core::{Config, Store};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::auth::PasswordChecks;
use crate::delivery::actor::Delivery;
use crate::io::{Stream, TlsSlot};
use crate::mailbox::Mailbox;
use crate::policy::{DynPolicy, Policies, Policy};
use crate::pop3::{Pop3Connection, Pop3Shared};
use crate::router::{Dispatch, RouteRecipient, Router};
use crate::smtp::{SmtpConnection, SmtpShared};

/// Errors that stop a server from starting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The store could not be opened.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The control socket could not be created.
    #[error("control socket {path}: {source}")]
    Control {
        /// Its path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The TLS certificate or key could not be loaded.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// A worker arbiter went away during start.
    #[error("a worker thread stopped while the server was starting")]
    Worker,
    /// The password-checking threads could not be started.
    #[error("cannot start the password-checking threads: {0}")]
    AuthWorkers(std::io::Error),
}

/// Builds a [`Server`]; lets an embedder put its own routing actor in place.
pub struct ServerBuilder {
    config: Config,
    router: Option<RouterFactory>,
    /// The embedder's policies, in the order given.
    policies: Vec<Box<dyn DynPolicy>>,
    /// Where `config` was read from, for the startup line.
    config_file: Option<std::path::PathBuf>,
}

/// Makes the routing actor of one worker from that worker's default router.
/// Called once per worker arbiter, on that arbiter's thread, so the actor it
/// starts runs beside the connections that ask it.
type RouterFactory =
    Arc<dyn Fn(Recipient<RouteRecipient>) -> Recipient<RouteRecipient> + Send + Sync>;

/// A running postino server.
pub struct Server {
    smtp_addrs: Vec<SocketAddr>,
    submission_addrs: Vec<SocketAddr>,
    submissions_addrs: Vec<SocketAddr>,
    pop3_addrs: Vec<SocketAddr>,
    pop3s_addrs: Vec<SocketAddr>,
    store: Store,
    router: Addr<Router>,
    delivery: Addr<Delivery>,
    tls: TlsSlot,
    config: Arc<Config>,
    shutdown: watch::Sender<bool>,
    connections: Arc<Limits>,
    tasks: Vec<JoinHandle<()>>,
    workers: Vec<Arbiter>,
}

impl Server {
    /// A builder for a server with this configuration.
    pub fn builder(config: Config) -> ServerBuilder {
        ServerBuilder {
            config,
            router: None,
            policies: Vec::new(),
            config_file: None,
        }
    }

    /// Bound SMTP (MTA) addresses; with port 0 in the config, the real ports.
    pub fn smtp_addrs(&self) -> &[SocketAddr] {
        &self.smtp_addrs
    }
    /// Bound submission (port 587 style) addresses.
    pub fn submission_addrs(&self) -> &[SocketAddr] {
        &self.submission_addrs
    }
    /// Bound implicit-TLS submission (port 465 style) addresses.
    pub fn submissions_addrs(&self) -> &[SocketAddr] {
        &self.submissions_addrs
    }
    /// Bound POP3 addresses.
    pub fn pop3_addrs(&self) -> &[SocketAddr] {
        &self.pop3_addrs
    }
    /// Bound implicit-TLS POP3 addresses.
    pub fn pop3s_addrs(&self) -> &[SocketAddr] {
        &self.pop3s_addrs
    }
    /// The store the server uses (users, aliases, mail, queue).
    pub fn store(&self) -> &Store {
        &self.store
    }
    /// The configuration the server runs with.
    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }
    /// The default router (also when a custom one decides routes).
    pub fn router(&self) -> &Addr<Router> {
        &self.router
    }
    /// The delivery actor (queue manager).
    pub fn delivery(&self) -> &Addr<Delivery> {
        &self.delivery
    }

    /// Reads the TLS certificate and key again (SIGHUP). New handshakes use
    /// them; established sessions keep theirs.
    ///
    /// # Errors
    /// The old certificate stays in use when the new one cannot be read.
    pub fn reload_tls(&self) -> Result<(), ServerError> {
        if let Some(tls) = &self.config.tls {
            self.tls.set(crate::tls::acceptor(tls)?);
            info!("tls certificate reloaded");
        }
        Ok(())
    }

    /// Stops accepting, asks every session to finish (idle ones get `421`),
    /// waits up to `grace` for them, and flushes the store.
    pub async fn stop_within(mut self, grace: Duration) {
        info!("stopping");
        let _ = self.shutdown.send(true);
        for t in self.tasks.drain(..) {
            t.abort();
        }
        let _ = tokio::time::timeout(grace, self.connections.idle()).await;
        if let Err(e) = self.store.flush_blocking() {
            error!(error = %e, "final flush failed");
        }
        for w in self.workers.drain(..) {
            w.stop();
        }
        let _ = std::fs::remove_file(self.config.control_socket());
        info!("stopped");
    }

    /// [`Server::stop_within`] ten seconds.
    pub async fn stop(self) {
        self.stop_within(Duration::from_secs(10)).await
    }
}

impl ServerBuilder {
    /// The file the configuration came from (`None`: the built-in
    /// defaults), named in the startup log line.
    pub fn config_file(mut self, path: Option<std::path::PathBuf>) -> Self {
        self.config_file = path;
        self
    }

    /// Replace the routing decision. The closure receives the default
    /// router, so a custom router can delegate what it does not handle. It
    /// is called once per worker thread (connections ask the router of their
    /// own thread, so routing costs no thread switch); start the actor inside
    /// it with `.start()`.
    pub fn router(
        mut self,
        make: impl Fn(Recipient<RouteRecipient>) -> Recipient<RouteRecipient> + Send + Sync + 'static,
    ) -> Self {
        self.router = Some(Arc::new(make));
        self
    }

    /// Adds a [`Policy`] that decides at every stage of SMTP sessions
    /// (connect, HELO/EHLO, MAIL, RCPT, end of DATA); see
    /// [`crate::policy`]. Policies are asked in the order they are added;
    /// the RCPT stage asks the router (default or [`ServerBuilder::router`])
    /// after them. Without any, sessions run as before, at no cost.
    pub fn policy(mut self, policy: impl Policy) -> Self {
        self.policies.push(Box::new(policy));
        self
    }

    /// Opens the store, starts the actors and binds every listener. Must be
    /// called inside a running actix `System`.
    ///
    /// # Errors
    /// [`ServerError`] if the store cannot be opened (e.g. another process
    /// holds it) or a listener cannot be bound.
    pub async fn start(self) -> Result<Server, ServerError> {
        let config = Arc::new(self.config);
        let store = Store::open_configured(&config.data_dir, &config.store)?;
        store.remember_logins(config.auth.cache_ttl, config.auth.cache_size);
        store.watch_space(config.min_free())?;
        let tls = TlsSlot::new(config.tls.as_ref().map(crate::tls::acceptor).transpose()?);

        // The core actors share one arbiter of their own, so that sled writes
        // never stall a connection's thread.
        let core = Arbiter::new();
        let mailbox = {
            let store = store.clone();
            Mailbox::start_in_arbiter(&core.handle(), move |_| Mailbox::new(store))
        };
        let delivery = {
            let (store, config) = (store.clone(), config.clone());
            Delivery::start_in_arbiter(&core.handle(), move |_| Delivery::new(config, store))
        };
        let router = {
            let (store, config, mailbox, delivery) = (
                store.clone(),
                config.clone(),
                mailbox.clone(),
                delivery.clone().recipient(),
            );
            Router::start_in_arbiter(&core.handle(), move |_| {
                Router::new(config, store, mailbox, delivery)
            })
        };
        delivery.do_send(crate::delivery::actor::SetRouter(
            router.clone().recipient(),
        ));

        // Messages spooled but not yet handed on before a stop or crash.
        let pending = store.inbound()?;
        if !pending.is_empty() {
            info!(count = pending.len(), "re-dispatching spooled messages");
        }
        for envelope in pending {
            let id = envelope.id;
            if let Err(e) = router
                .send(Dispatch(envelope))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()))
            {
                warn!(%id, error = %e, "re-dispatch failed");
            }
        }

        let (shutdown, _) = watch::channel(false);
        let connections = Arc::new(Limits::default());
        let workers: Vec<Arbiter> = (0..worker_count()).map(|_| Arbiter::new()).collect();
        delivery.do_send(crate::delivery::actor::SetIoArbiters(
            workers.iter().map(|w| w.handle()).collect(),
        ));
        let mut server = Server {
            smtp_addrs: Vec::new(),
            submission_addrs: Vec::new(),
            submissions_addrs: Vec::new(),
            pop3_addrs: Vec::new(),
            pop3s_addrs: Vec::new(),
            store: store.clone(),
            router: router.clone(),
            delivery: delivery.clone(),
            tls: tls.clone(),
            config: config.clone(),
            shutdown,
            connections,
            tasks: Vec::new(),
            workers,
        };

        let failures = Arc::new(AuthFailures::new(
            config.pop3.auth_failure_delay,
            config.pop3.max_auth_failure_delay,
        ));
        let checks = PasswordChecks::start(store.clone(), config.auth.workers)
            .map_err(ServerError::AuthWorkers)?;
        let policies = (!self.policies.is_empty())
            .then(|| Arc::new(Policies::new(self.policies, config.smtp.timeout)));
        let smtp_shared = |auth_required: bool,
                           route: Recipient<RouteRecipient>,
                           router: Addr<Router>| {
            Arc::new(SmtpShared {
                config: config.clone(),
                session: Arc::new(SessionConfig {
                    hostname: config.hostname.clone(),
                    max_message_size: config.smtp.max_message_size,
                    max_recipients: config.smtp.max_recipients,
                    hop_limit: config.smtp.hop_limit,
                    soft_error_limit: config.smtp.soft_error_limit,
                    hard_error_limit: config.smtp.hard_error_limit,
                    tls_available: config.tls.is_some(),
                    auth_available: true,
                    auth_required,
                    allow_plaintext_auth: config.smtp.allow_plaintext_auth || config.tls.is_none(),
                    postmaster_domain: config
                        .routing
                        .local_domains
                        .first()
                        .cloned()
                        .unwrap_or_else(|| config.hostname.clone()),
                }),
                store: store.clone(),
                router: route,
                submit: router.clone().recipient(),
                dispatch: router.recipient(),
                queued: delivery.clone().recipient(),
                tls: tls.clone(),
                failures: failures.clone(),
                checks: checks.clone(),
                policy: policies.clone(),
            })
        };
        // Each worker arbiter gets its own router and mailbox actor: the
        // connections it runs route and deliver without a thread switch (the
        // per-message cost on 2 cores was dominated by wake-ups). POP3
        // sessions all use the core mailbox actor, which owns the locks.
        let mut per_worker = Vec::new();
        for worker in &server.workers {
            let handle = worker.handle();
            let local_mailbox = {
                let store = store.clone();
                Mailbox::start_in_arbiter(&handle, move |_| Mailbox::new(store))
            };
            let local_router = {
                let (store, config, delivery) =
                    (store.clone(), config.clone(), delivery.clone().recipient());
                Router::start_in_arbiter(&handle, move |_| {
                    Router::new(config, store, local_mailbox, delivery)
                })
            };
            let route: Recipient<RouteRecipient> = match &self.router {
                Some(make) => {
                    let (make, default) = (make.clone(), local_router.clone().recipient());
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    handle.spawn(async move {
                        let _ = tx.send(make(default));
                    });
                    rx.await.map_err(|_| ServerError::Worker)?
                }
                None => local_router.clone().recipient(),
            };
            per_worker.push((route, local_router));
        }
        let smtp_shared = |auth_required: bool| {
            Arc::new(
                per_worker
                    .iter()
                    .map(|(route, router)| {
                        smtp_shared(auth_required, route.clone(), router.clone())
                    })
                    .collect::<Vec<_>>(),
            )
        };
        let mta = smtp_shared(false);
        let submission = smtp_shared(true);
        for addr in config.smtp.listen.clone() {
            let bound = server.listen(addr, Kind::Smtp(mta.clone()), false).await?;
            server.smtp_addrs.push(bound);
        }
        for addr in config.smtp.submission.clone() {
            let bound = server
                .listen(addr, Kind::Smtp(submission.clone()), false)
                .await?;
            server.submission_addrs.push(bound);
        }
        for addr in config.smtp.submissions.clone() {
            let bound = server
                .listen(addr, Kind::Smtp(submission.clone()), true)
                .await?;
            server.submissions_addrs.push(bound);
        }
        let pop3_shared = Arc::new(Pop3Shared {
            config: config.clone(),
            store: store.clone(),
            mailbox: mailbox.clone(),
            tls: tls.clone(),
            failures: failures.clone(),
            checks: checks.clone(),
        });
        for addr in config.pop3.listen.clone() {
            let bound = server
                .listen(addr, Kind::Pop3(pop3_shared.clone()), false)
                .await?;
            server.pop3_addrs.push(bound);
        }
        for addr in config.pop3.pop3s.clone() {
            let bound = server
                .listen(addr, Kind::Pop3(pop3_shared.clone()), true)
                .await?;
            server.pop3s_addrs.push(bound);
        }
        let control = crate::control::serve(
            config.control_socket(),
            store.clone(),
            config.clone(),
            delivery.clone(),
        )
        .map_err(|source| ServerError::Control {
            path: config.control_socket().display().to_string(),
            source,
        })?;
        server.tasks.push(control);
        info!(
            smtp = ?server.smtp_addrs,
            submission = ?server.submission_addrs,
            submissions = ?server.submissions_addrs,
            pop3 = ?server.pop3_addrs,
            pop3s = ?server.pop3s_addrs,
            data_dir = %config.data_dir.display(),
            config = %self
                .config_file
                .as_deref()
                .map_or("built-in defaults".into(), |p| p.display().to_string()),
            "postino started"
        );
        Ok(server)
    }
}

#[derive(Clone)]
enum Kind {
    /// One shared state per worker arbiter, in worker order.
    Smtp(Arc<Vec<Arc<SmtpShared>>>),
    Pop3(Arc<Pop3Shared>),
}

impl Server {
    async fn listen(
        &mut self,
        addr: SocketAddr,
        kind: Kind,
        implicit_tls: bool,
    ) -> Result<SocketAddr, ServerError> {
        let listener = bind(addr).map_err(|source| ServerError::Bind { addr, source })?;
        let bound = listener
            .local_addr()
            .map_err(|source| ServerError::Bind { addr, source })?;
        let workers: Vec<ArbiterHandle> = self.workers.iter().map(|w| w.handle()).collect();
        let shutdown = self.shutdown.subscribe();
        let limits = self.connections.clone();
        let config = self.config.clone();
        let tls = self.tls.clone();
        let task = actix_rt::spawn(async move {
            let mut next = 0usize;
            let mut backoff = Duration::from_millis(5);
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(accepted) => {
                        backoff = Duration::from_millis(5);
                        accepted
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning or
                        // giving up (mini-redis does the same).
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                        continue;
                    }
                };
                let (per_ip, total, name) = match &kind {
                    Kind::Smtp(_) => (
                        config.smtp.max_connections_per_ip,
                        config.smtp.max_connections,
                        "smtp",
                    ),
                    Kind::Pop3(_) => (
                        config.pop3.max_connections_per_ip,
                        config.pop3.max_connections,
                        "pop3",
                    ),
                };
                let Some(guard) = limits.try_acquire(peer.ip(), per_ip, total, name) else {
                    warn!(%peer, "too many connections; refused");
                    actix_rt::spawn(refuse(
                        stream,
                        matches!(kind, Kind::Smtp(_)),
                        config.hostname.clone(),
                    ));
                    continue;
                };
                let Ok(std) = stream.into_std() else { continue };
                let index = next % workers.len();
                let worker = &workers[index];
                next = next.wrapping_add(1);
                let kind = kind.clone();
                let shutdown = shutdown.clone();
                let acceptor = implicit_tls.then(|| tls.get()).flatten();
                let handshake_timeout = config.smtp.timeout.min(Duration::from_secs(60));
                worker.spawn(async move {
                    // Registered with this worker's reactor, not the acceptor's.
                    let Ok(tcp) = TcpStream::from_std(std) else {
                        return;
                    };
                    let _ = tcp.set_nodelay(true);
                    let stream = match acceptor {
                        Some(acceptor) => {
                            match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp))
                                .await
                            {
                                Ok(Ok(tls)) => Stream::Tls(Box::new(tls)),
                                _ => return,
                            }
                        }
                        None => Stream::Plain(tcp),
                    };
                    match kind {
                        Kind::Smtp(shared) => {
                            let shared = shared[index % shared.len()].clone();
                            SmtpConnection::new(shared, stream, peer, shutdown, guard).start();
                        }
                        Kind::Pop3(shared) => {
                            Pop3Connection::new(shared, stream, peer, shutdown, guard).start();
                        }
                    }
                });
            }
        });
        self.tasks.push(task);
        Ok(bound)
    }
}

/// Listen backlog: thousands of clients may connect at once (an ISP relay,
/// `postino bench smtp --hold`); the default 1024 made some of 10,000 hang.
/// The kernel caps it at `net.core.somaxconn` (4096 here).
pub const LISTEN_BACKLOG: u32 = 8192;

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // Restarts must not wait for TIME_WAIT sockets to expire.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Answers a connection over the limits with a 421 (SMTP) or -ERR (POP3).
async fn refuse(mut stream: TcpStream, smtp: bool, hostname: String) {
    let line = if smtp {
        format!("421 4.7.0 {hostname} Error: too many connections\r\n")
    } else {
        "-ERR [SYS/TEMP] Too many connections\r\n".to_owned()
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.write_all(line.as_bytes())).await;
    let _ = stream.shutdown().await;
}

fn worker_count() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}

/// Failed logins per client address, POP3 and SMTP AUTH alike, for
/// Dovecot's growing delay: `pop3.auth_failure_delay` after the first
/// failure, doubling per further recent failure from the same address, up to
/// `pop3.max_auth_failure_delay` (Dovecot's `auth_failure_delay` covers the
/// SMTP AUTH that Postfix hands it too). A successful login forgets them.
pub struct AuthFailures {
    table: Mutex<HashMap<IpAddr, (u32, Instant)>>,
    base: Duration,
    max: Duration,
}

impl AuthFailures {
    /// A table whose delay starts at `base` and doubles per failure up to `max`.
    pub fn new(base: Duration, max: Duration) -> AuthFailures {
        AuthFailures {
            table: Mutex::new(HashMap::new()),
            base,
            max,
        }
    }

    /// Records a failed login from `ip`; returns how long to wait before
    /// answering it.
    pub fn failed(&self, ip: IpAddr) -> Duration {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        // Forget addresses quiet for a while, so the table stays small.
        table.retain(|_, (_, last)| now.duration_since(*last) < Duration::from_secs(300));
        let entry = table.entry(ip).or_insert((0, now));
        entry.0 = entry.0.saturating_add(1);
        entry.1 = now;
        let factor = 1u32 << (entry.0 - 1).min(16);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// Records a successful login from `ip`: its delay starts over.
    pub fn succeeded(&self, ip: IpAddr) {
        self.table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&ip);
    }
}

/// Connection counts per client address and in total (Postfix anvil).
#[derive(Default)]
pub struct Limits {
    per_ip: Mutex<HashMap<(IpAddr, &'static str), usize>>,
    total: Mutex<HashMap<&'static str, usize>>,
    all: AtomicUsize,
    idle: Notify,
}

impl Limits {
    fn try_acquire(
        self: &Arc<Self>,
        ip: IpAddr,
        per_ip: usize,
        total: usize,
        kind: &'static str,
    ) -> Option<ConnectionGuard> {
        let mut totals = self.total.lock().unwrap_or_else(|e| e.into_inner());
        let mut ips = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let t = totals.entry(kind).or_default();
        let n = ips.entry((ip, kind)).or_default();
        if *t >= total || *n >= per_ip {
            if *n == 0 {
                ips.remove(&(ip, kind));
            }
            return None;
        }
        *t += 1;
        *n += 1;
        self.all.fetch_add(1, Ordering::SeqCst);
        Some(ConnectionGuard {
            limits: self.clone(),
            ip,
            kind,
        })
    }

    /// Resolves when no connection is open.
    async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.all.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Open connections right now.
    pub fn open(&self) -> usize {
        self.all.load(Ordering::SeqCst)
    }
}

/// Held by a connection actor; releases its slot when the actor is dropped.
pub struct ConnectionGuard {
    limits: Arc<Limits>,
    ip: IpAddr,
    kind: &'static str,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        {
            let mut totals = self.limits.total.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(t) = totals.get_mut(self.kind) {
                *t = t.saturating_sub(1);
            }
            let mut ips = self.limits.per_ip.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = ips.get_mut(&(self.ip, self.kind)) {
                *n -= 1;
                if *n == 0 {
                    ips.remove(&(self.ip, self.kind));
                }
            }
        }
        if self.limits.all.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.limits.idle.notify_waiters();
        }
    }
}
