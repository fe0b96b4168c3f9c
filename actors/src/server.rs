//! Starting and stopping a server: wires the store, the core actors, the
//! listeners (`accept.rs`, with the limits of `limits.rs` and the login
//! delays of `login_delay.rs`) and the control socket. This is the library
//! API that `postino serve` and embedders use.
//!
//! ```no_run
//! # async fn run() -> Result<(), postino::ServerError> {
//! let config = postino_core::Config::load("postino.toml".as_ref())?;
//! let server = postino::Server::builder(config).start().await?;
//! println!("SMTP on {:?}", server.smtp_addrs());
//! server.stop().await;
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use postino_core::config::ConfigError;
use postino_core::config::StoreBackend;
use postino_core::storage::{SharedStorage, SledStorage};
use postino_core::store::StoreError;
use postino_core::{Config, Store};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

pub use crate::accept::LISTEN_BACKLOG;
use crate::accept::{bind, Acceptor, Kind};
use crate::auth::PasswordChecks;
use crate::delivery::actor::{Delivery, Queued};
use crate::dispatch::dispatch;
use crate::intake::Intake;
use crate::io::TlsSlot;
use crate::limits::Limits;
use crate::login_delay::AuthFailures;
use crate::policy::{DynPolicy, Policies, Policy};
use crate::pop3::Pop3Shared;
use crate::reload::{LiveConfig, ReloadError, Reloaded, Reloader};
use crate::router::{RouteRecipient, Router};
use crate::smtp::SmtpShared;

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
    /// The storage backend cannot run this server.
    #[error("store: {0}")]
    Backend(String),
    /// A worker arbiter went away during start.
    #[error("a worker thread stopped while the server was starting")]
    Worker,
    /// The password-checking threads could not be started.
    #[error("cannot start the password-checking threads: {0}")]
    AuthWorkers(std::io::Error),
}

/// Reloads a running server's TLS certificate; see [`Server::tls_reloader`].
#[derive(Clone)]
pub struct TlsReloader {
    tls: TlsSlot,
    config: LiveConfig,
}

impl TlsReloader {
    /// Reads the TLS certificate and key again, for new handshakes. Without
    /// TLS in the configuration, does nothing.
    ///
    /// # Errors
    /// The old certificate stays in use when the new one cannot be read.
    pub fn reload(&self) -> Result<(), ServerError> {
        if let Some(tls) = &self.config.current().tls {
            self.tls.set(crate::tls::acceptor(tls)?);
            info!("tls certificate reloaded");
        }
        Ok(())
    }
}

/// Builds a [`Server`]; lets an embedder put its own routing actor in place.
pub struct ServerBuilder {
    config: Config,
    router: Option<RouterFactory>,
    /// The embedder's policies, in the order given.
    policies: Vec<Box<dyn DynPolicy>>,
    /// Where `config` was read from, for the startup line.
    config_file: Option<std::path::PathBuf>,
    /// The storage to run on, if the embedder brings one.
    storage: Option<SharedStorage>,
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
    storage: SharedStorage,
    store: Option<Store>,
    router: Addr<Router>,
    delivery: Addr<Delivery>,
    tls: TlsSlot,
    config: LiveConfig,
    /// Does SIGHUP's and `postino reload`'s work ([`crate::reload`]).
    pub(crate) reloader: Reloader,
    /// Tells every session to finish (they wait on a `watch`, see
    /// [`crate::io::Io`]).
    shutdown: watch::Sender<bool>,
    /// Ends the accept loops and the control socket's.
    stop: CancellationToken,
    /// The accept loops and the control socket's loop.
    tasks: TaskTracker,
    /// Open connections; [`Limits::idle`] when the last one ends.
    connections: Arc<Limits>,
    workers: Vec<Arbiter>,
    /// The admin HTTP listener's address, with `[admin] listen`.
    admin_addr: Option<SocketAddr>,
    admin: Option<crate::admin::Admin>,
}

impl Server {
    /// A builder for a server with this configuration.
    pub fn builder(config: Config) -> ServerBuilder {
        ServerBuilder {
            config,
            router: None,
            policies: Vec::new(),
            config_file: None,
            storage: None,
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
    /// Where the admin HTTP listener is bound, if `[admin] listen` is set.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }
    /// The sled store the server uses, when it runs on one (users,
    /// aliases, mail, queue); `None` on another backend.
    pub fn store(&self) -> Option<&Store> {
        self.store.as_ref()
    }

    /// The storage the server runs on (the seam every actor uses).
    pub fn storage(&self) -> &SharedStorage {
        &self.storage
    }
    /// The configuration in use now (a reload replaces it).
    pub fn config(&self) -> Arc<Config> {
        self.config.current()
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
        self.tls_reloader().reload()
    }

    /// A handle that does [`Server::reload_tls`] and outlives the borrow of
    /// the server (e.g. inside the future given to [`Server::run_until`]).
    pub fn tls_reloader(&self) -> TlsReloader {
        TlsReloader {
            tls: self.tls.clone(),
            config: self.config.clone(),
        }
    }

    /// Runs until `shutdown` completes, then stops gracefully
    /// ([`Server::stop`]: sessions are asked to finish, idle ones get
    /// `421`, a command in progress gets its answer).
    ///
    /// ```no_run
    /// # async fn run(config: postino_core::Config) -> Result<(), postino::ServerError> {
    /// let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    /// let server = postino::Server::builder(config).start().await?;
    /// // … hand `stop` to whatever decides when to stop …
    /// # drop(stop);
    /// server.run_until(async { let _ = stopped.await; }).await;
    /// # Ok(()) }
    /// ```
    pub async fn run_until(self, shutdown: impl std::future::Future<Output = ()>) {
        shutdown.await;
        self.stop().await
    }

    /// Stops accepting, asks every session to finish (idle ones get `421`),
    /// waits up to `grace` for them, and flushes the store.
    pub async fn stop_within(mut self, grace: Duration) {
        info!("stopping");
        let _ = self.shutdown.send(true);
        self.stop.cancel();
        // The listening sockets are closed once their loops are back.
        self.tasks.close();
        self.tasks.wait().await;
        if let Some(admin) = self.admin.take() {
            admin.stop().await;
        }
        let _ = tokio::time::timeout(grace, self.connections.idle()).await;
        if let Err(e) = self.storage.flush_blocking() {
            error!(error = %e, "final flush failed");
        }
        for w in self.workers.drain(..) {
            w.stop();
        }
        let _ = std::fs::remove_file(self.config.current().control_socket());
        info!("stopped");
    }

    /// [`Server::stop_within`] ten seconds.
    pub async fn stop(self) {
        self.stop_within(Duration::from_secs(10)).await
    }
}

impl ServerBuilder {
    /// Runs the server on `storage` instead of the one `[store]` names
    /// (an embedder's own backend). Not set: `[store] backend`.
    pub fn storage(mut self, storage: SharedStorage) -> Self {
        self.storage = Some(storage);
        self
    }

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
        let live = LiveConfig::new(config.clone());
        let storage: SharedStorage = match (self.storage, config.store.backend) {
            (Some(storage), _) => storage,
            (None, StoreBackend::Sled) => Arc::new(SledStorage::new(Store::open_configured(
                &config.data_dir,
                &config.store,
            )?)),
            (None, StoreBackend::Postgres) => return Err(ServerError::Backend(
                "[store] backend = \"postgres\": this postino has no PostgreSQL backend built in"
                    .into(),
            )),
        };
        storage.set_quota_policy(config.mailbox.quota, config.mailbox.quota_warning);
        storage.set_trace_limits(config.trace.limits());
        // Only a store on a local disk has a free-space reserve.
        let store = storage.as_sled().cloned();
        if let Some(store) = &store {
            store.watch_space(config.min_free())?;
        }
        let tls = TlsSlot::new(config.tls.as_ref().map(crate::tls::acceptor).transpose()?);
        let dkim = crate::dkim::DkimKeys::load(&config, self.config_file.as_deref())?;

        // The core actors share one arbiter of their own, so that sled writes
        // never stall a connection's thread.
        let core = Arbiter::new();
        let workers: Vec<Arbiter> = (0..worker_count()).map(|_| Arbiter::new()).collect();
        let delivery = {
            let (store, config, dkim) = (storage.clone(), live.clone(), dkim.clone());
            let io = workers.iter().map(|w| w.handle()).collect();
            Delivery::start_in_arbiter(&core.handle(), move |_| {
                Delivery::new(config, store, io).with_dkim(dkim)
            })
        };
        let router = {
            let (store, config) = (storage.clone(), live.clone());
            Router::start_in_arbiter(&core.handle(), move |_| Router::new(config, store))
        };

        // Messages spooled but not yet handed on before a stop or crash.
        let pending = storage.inbound().await?;
        if !pending.is_empty() {
            info!(count = pending.len(), "re-dispatching spooled messages");
        }
        for envelope in pending {
            let id = envelope.id;
            match dispatch(&config, &dkim, storage.as_ref(), &envelope).await {
                Ok(queued) => {
                    for id in queued {
                        // Awaited: nothing here comes from the network, and
                        // none of it may be dropped before the first poll.
                        let _ = delivery.send(Queued { id, content: None }).await;
                    }
                }
                Err(e) => warn!(%id, error = %e, "re-dispatch failed"),
            }
        }

        let (shutdown, _) = watch::channel(false);
        let connections = Arc::new(Limits::default());
        let mut server = Server {
            smtp_addrs: Vec::new(),
            submission_addrs: Vec::new(),
            submissions_addrs: Vec::new(),
            pop3_addrs: Vec::new(),
            pop3s_addrs: Vec::new(),
            storage: storage.clone(),
            store: store.clone(),
            router: router.clone(),
            delivery: delivery.clone(),
            tls: tls.clone(),
            config: live.clone(),
            reloader: Reloader {
                live: live.clone(),
                file: self.config_file.clone(),
                tls: tls.clone(),
                dkim: dkim.clone(),
                store: storage.clone(),
                delivery: delivery.clone().recipient(),
                busy: Default::default(),
            },
            shutdown,
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
            connections,
            workers,
            admin_addr: None,
            admin: None,
        };

        let failures = Arc::new(AuthFailures::new(
            config.pop3.auth_failure_delay,
            config.pop3.max_auth_failure_delay,
        ));
        let logins =
            postino_core::store::LoginCache::new(config.auth.cache_ttl, config.auth.cache_size);
        let checks = PasswordChecks::start(storage.clone(), config.auth.workers, logins)
            .map_err(ServerError::AuthWorkers)?;
        let sessions = Arc::new(crate::sessions::Pop3Sessions::default());
        let rates = Arc::new(crate::submission_limits::SubmissionLimits::default());
        let policies = (!self.policies.is_empty())
            .then(|| Arc::new(Policies::new(self.policies, config.smtp.timeout)));
        let smtp_shared =
            |auth_required: bool, route: Recipient<RouteRecipient>, intake: Intake| {
                Arc::new(SmtpShared {
                    config: live.clone(),
                    auth_required,
                    store: storage.clone(),
                    router: route,
                    intake,
                    tls: tls.clone(),
                    failures: failures.clone(),
                    checks: checks.clone(),
                    policy: policies.clone(),
                    rates: rates.clone(),
                })
            };
        // Each worker arbiter gets its own router actor and intake: the
        // connections it runs route and store mail without a thread switch
        // (the per-message cost on 2 cores was dominated by wake-ups). POP3
        // sessions all use the core mailbox actor, which owns the locks.
        let mut per_worker = Vec::new();
        for worker in &server.workers {
            let handle = worker.handle();
            let local_router = {
                let (store, config) = (storage.clone(), live.clone());
                Router::start_in_arbiter(&handle, move |_| Router::new(config, store))
            };
            let intake = Intake::new(live.clone(), storage.clone(), delivery.clone().recipient())
                .with_dkim(dkim.clone());
            let route: Recipient<RouteRecipient> = match &self.router {
                Some(make) => {
                    let (make, default) = (make.clone(), local_router.clone().recipient());
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    handle.spawn(async move {
                        let _ = tx.send(make(default));
                    });
                    rx.await.map_err(|_| ServerError::Worker)?
                }
                None => local_router.recipient(),
            };
            per_worker.push((route, intake));
        }
        let smtp_shared = |auth_required: bool| {
            Arc::new(
                per_worker
                    .iter()
                    .map(|(route, intake)| {
                        smtp_shared(auth_required, route.clone(), intake.clone())
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
            config: live.clone(),
            store: storage.clone(),
            tls: tls.clone(),
            failures: failures.clone(),
            checks: checks.clone(),
            sessions: sessions.clone(),
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
        let live = crate::control::Live {
            store: storage.clone(),
            config: live.clone(),
            reloader: Some(server.reloader.clone()),
            queue: delivery.clone().recipient(),
            queue_admin: delivery.clone().recipient(),
            active: delivery.clone().recipient(),
            sessions,
            destinations: delivery.clone().recipient(),
        };
        let control =
            crate::control::bind(config.control_socket(), live.clone()).map_err(|source| {
                ServerError::Control {
                    path: config.control_socket().display().to_string(),
                    source,
                }
            })?;
        actix_rt::spawn(server.tasks.track_future(control.run(server.stop.clone())));
        if let Some(addr) = config.admin.listen {
            let admin = crate::admin::serve(addr, live)
                .map_err(|source| ServerError::Bind { addr, source })?;
            server.admin_addr = Some(admin.addr);
            server.admin = Some(admin);
        }
        server.announce(&config, self.config_file.as_deref());
        Ok(server)
    }
}

impl Server {
    /// The "postino started" line, with the bound addresses (tests and
    /// operators read the ports from it), whatever the storage backend.
    fn announce(&self, config: &Config, config_file: Option<&std::path::Path>) {
        info!(
            smtp = ?self.smtp_addrs,
            submission = ?self.submission_addrs,
            submissions = ?self.submissions_addrs,
            pop3 = ?self.pop3_addrs,
            pop3s = ?self.pop3s_addrs,
            admin = ?self.admin_addr.as_slice(),
            data_dir = %config.data_dir.display(),
            config = %config_file.map_or("built-in defaults".into(), |p| p.display().to_string()),
            "postino started"
        );
    }
}

impl Server {
    /// Binds `addr` and starts its accept loop (see [`crate::accept`]).
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
        let acceptor = Acceptor {
            kind,
            implicit_tls,
            workers: self.workers.iter().map(|w| w.handle()).collect(),
            limits: self.connections.clone(),
            config: self.config.clone(),
            tls: self.tls.clone(),
            shutdown: self.shutdown.subscribe(),
        };
        actix_rt::spawn(
            self.tasks
                .track_future(acceptor.run(listener, self.stop.clone())),
        );
        Ok(bound)
    }
}

fn worker_count() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}

impl From<ReloadError> for ServerError {
    fn from(e: ReloadError) -> ServerError {
        match e {
            ReloadError::Config(e) => ServerError::Config(e),
            ReloadError::Tls(e) => ServerError::Tls(e),
        }
    }
}

impl Server {
    /// A handle that reloads this server's configuration (what SIGHUP and
    /// `postino reload` do) and outlives the borrow of the server.
    pub fn reloader(&self) -> Reloader {
        self.reloader.clone()
    }

    /// Puts `config` in place of the running configuration (see
    /// [`Reloader::apply`]): new sessions, routing decisions and delivery
    /// rounds use it; sessions in progress finish with theirs. Settings
    /// that need a restart (listeners, data directory, store tuning, ...)
    /// keep their running values and are named in the result and a warning.
    ///
    /// # Errors
    /// The TLS certificate or key cannot be read; nothing changed.
    pub fn reload(&self, config: Config) -> Result<Reloaded, ServerError> {
        Ok(self.reloader.apply(config)?)
    }
}
