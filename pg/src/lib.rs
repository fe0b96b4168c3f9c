//! postino's PostgreSQL store: several postino nodes sharing one database.
//!
//! # Layout
//!
//! - this file: [`PgStore`] (opening, the pool, the runtime the database
//!   work runs on), [`PgOptions`], error mapping.
//! - `migrate`: the versioned schema (`migrations/V*.sql`), applied at open.
//! - `commit`: group commit of the intake writes: one transaction for many
//!   sessions' messages, sent as one pipeline.
//! - `ids`: queue ids from a database sequence, a block per round trip.
//! - `directory`: users, aliases, quotas (no caches: every node sees a
//!   change at once).
//! - `intake`: the spool and dispatch steps (deliver, enqueue, finish).
//! - `mailbox`: maildrops, and the cluster-wide RFC 1939 maildrop lock (an
//!   advisory lock held on a connection of its own).
//! - `queue`: the delivery queue with leases (`FOR UPDATE SKIP LOCKED`).
//! - `notify`: `LISTEN/NOTIFY` wake-ups between nodes.
//! - `trace`: message histories.
//! - `backup`: `postino store export`/`import` in the sled store's format.
//! - `testing` (feature `testing`): a throwaway PostgreSQL for tests.
//!
//! # Runtime
//!
//! The server runs many single-threaded runtimes (one per actix arbiter);
//! a database connection is driven by the runtime it was made on. So the
//! store owns a small runtime of its own and runs all database work there:
//! its callers may be on any runtime, or none.
//!
//! # Promises
//!
//! The same as the sled store's: a write the intake awaited is committed
//! (PostgreSQL's `COMMIT` returns after the WAL is flushed, with the
//! default `synchronous_commit = on`), so `kill -9` of a node loses nothing
//! acknowledged; every database error is a temporary failure (4xx).

#![warn(missing_docs)]

mod api;
mod backup;
mod commit;
mod directory;
mod ids;
mod intake;
mod mailbox;
mod migrate;
mod notify;
mod queue;
mod storage;
#[cfg(feature = "testing")]
pub mod testing;
mod trace;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use postino_core::store::StoreError;
use tokio_postgres::NoTls;

pub use mailbox::PgMaildropLock;
pub use migrate::SCHEMA_VERSION;

/// Settings of a [`PgStore`] (`[store]` with `backend = "postgres"`).
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// `postgresql://user@host:port/db` (libpq URL or key=value form).
    pub url: String,
    /// This node's name: lease owner in the queue, named in logs.
    pub node: String,
    /// Connections in the pool (besides the group committer's and the
    /// listener's, and one per held maildrop lock).
    pub pool_size: usize,
    /// Most messages in one group commit.
    pub max_batch: usize,
}

impl PgOptions {
    /// Defaults for a node named `node` on the database at `url`.
    pub fn new(url: impl Into<String>, node: impl Into<String>) -> PgOptions {
        PgOptions {
            url: url.into(),
            node: node.into(),
            pool_size: 16,
            max_batch: 256,
        }
    }
}

/// Handle to the PostgreSQL store. Clones are cheap and share the pool and
/// the committer.
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("node", &self.inner.db.node)
            .finish_non_exhaustive()
    }
}

struct Inner {
    db: Arc<Db>,
    /// Runs every database call; shut down in the background on drop, so
    /// the last handle may be dropped on any thread.
    rt: Option<tokio::runtime::Runtime>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// What the database work shares (lives on the store's runtime).
struct Db {
    pool: Pool,
    node: String,
    commit: commit::Committer,
    ids: ids::Ids,
    notify: notify::Wakeups,
    /// Part of every UIDL (set again by an import).
    uidl_epoch: std::sync::atomic::AtomicU32,
    /// `[mailbox] quota` (`u64::MAX`: none).
    default_quota: AtomicU64,
    /// Maildrop locks being released.
    unlocking: mailbox::Unlocking,
    /// `[trace] max_events_per_message`.
    trace_max: AtomicU64,
}

/// A database error as the store reports it: temporary (4xx).
pub(crate) fn db_err(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> StoreError {
    StoreError::Backend(e.into())
}

/// A record (JSON column) that does not decode.
pub(crate) fn codec(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Codec(format!("{what} record: {e}"))
}

impl PgStore {
    /// Connects, applies the migrations this version knows (serialised
    /// between nodes starting at once), starts the group committer and the
    /// `LISTEN` connection.
    ///
    /// # Errors
    ///
    /// A bad URL, an unreachable database, a schema newer than this
    /// postino's ([`StoreError::Schema`]).
    pub fn open(options: &PgOptions) -> Result<PgStore, StoreError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("postino-pg")
            .enable_all()
            .build()
            .map_err(db_err)?;
        let options = options.clone();
        let db = std::thread::scope(|s| {
            // Block on the store's runtime from a thread of our own: the
            // caller may itself be inside a runtime.
            s.spawn(|| rt.block_on(Db::open(options)))
                .join()
                .unwrap_or_else(|_| Err(db_err("opening the database panicked")))
        });
        let db = match db {
            Ok(db) => db,
            Err(e) => {
                // Dropping a runtime blocks: not allowed if the caller is
                // itself on one.
                rt.shutdown_background();
                return Err(e);
            }
        };
        Ok(PgStore {
            inner: Arc::new(Inner {
                db: Arc::new(db),
                rt: Some(rt),
            }),
        })
    }

    /// Opens the store `[store]` names (`backend = "postgres"`, `url`,
    /// `node`).
    ///
    /// # Errors
    ///
    /// No `url` (the configuration check refuses that already), or as
    /// [`PgStore::open`].
    pub fn from_config(store: &postino_core::config::StoreConfig) -> Result<PgStore, StoreError> {
        let url = store
            .url
            .as_deref()
            .ok_or_else(|| db_err("[store] backend = \"postgres\" needs url"))?;
        PgStore::open(&PgOptions::new(url, store.node.clone()))
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.inner.db.node
    }

    /// Runs `f` on the store's runtime and waits for it.
    pub(crate) async fn run<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(Arc<Db>) -> Fut,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
        T: Send + 'static,
    {
        let db = self.inner.db.clone();
        let rt = self.inner.rt.as_ref().expect("runtime until drop");
        match rt.spawn(f(db)).await {
            Ok(r) => r,
            Err(e) => Err(db_err(e)),
        }
    }

    /// Runs `f` on the store's runtime from outside async code.
    pub(crate) fn block_on<T, Fut>(&self, f: impl FnOnce(Arc<Db>) -> Fut) -> Result<T, StoreError>
    where
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
        T: Send + 'static,
    {
        let db = self.inner.db.clone();
        let rt = self.inner.rt.as_ref().expect("runtime until drop");
        let handle = rt.spawn(f(db));
        std::thread::scope(|s| {
            s.spawn(|| rt.block_on(handle))
                .join()
                .unwrap_or_else(|_| Ok(Err(db_err("database call panicked"))))
        })
        .unwrap_or_else(|e| Err(db_err(e)))
    }

    /// Transactions committed in this database so far (PostgreSQL's
    /// `pg_stat_database.xact_commit`, which lags by up to a statistics
    /// flush): for measuring group commit.
    ///
    /// # Errors
    ///
    /// A database error.
    pub async fn commits(&self) -> Result<u64, StoreError> {
        self.run(|db| async move {
            let c = db.pool.get().await.map_err(db_err)?;
            // Reports the counters as of now, not as of the snapshot.
            c.batch_execute("SELECT pg_stat_force_next_flush()")
                .await
                .map_err(db_err)?;
            let row = c
                .query_one(
                    "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
                    &[],
                )
                .await
                .map_err(db_err)?;
            Ok(row.get::<_, i64>(0) as u64)
        })
        .await
    }

    /// Group commits made by this handle's committer and the messages
    /// they carried: (commits, writes).
    pub fn group_commits(&self) -> (u64, u64) {
        self.inner.db.commit.counts()
    }
}

impl Db {
    async fn open(options: PgOptions) -> Result<Db, StoreError> {
        let config: tokio_postgres::Config = options.url.parse().map_err(db_err)?;
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(2))
            .build()
            .map_err(db_err)?;
        {
            let mut client = pool.get().await.map_err(db_err)?;
            migrate::migrate(&mut client).await?;
        }
        let uidl_epoch = {
            let client = pool.get().await.map_err(db_err)?;
            let row = client
                .query_one("SELECT value FROM meta WHERE name = 'uidl_epoch'", &[])
                .await
                .map_err(db_err)?;
            let v: String = row.get(0);
            v.parse::<u32>().map_err(|e| codec("uidl_epoch", e))?
        };
        let commit = commit::Committer::start(config.clone(), options.max_batch).await?;
        let notify = notify::Wakeups::start(config.clone());
        Ok(Db {
            pool,
            node: options.node,
            commit,
            ids: ids::Ids::default(),
            notify,
            uidl_epoch: uidl_epoch.into(),
            default_quota: AtomicU64::new(u64::MAX),
            unlocking: Default::default(),
            trace_max: AtomicU64::new(postino_core::store::DEFAULT_MAX_EVENTS_PER_MESSAGE),
        })
    }

    /// A pooled connection.
    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(db_err)
    }

    /// A per-message statement: `sql` prepared once per pooled connection
    /// (`prepare_cached`), then one round trip for its row, if any.
    async fn query_cached(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Option<tokio_postgres::Row>, StoreError> {
        let client = self.client().await?;
        let statement = client.prepare_cached(sql).await.map_err(db_err)?;
        client.query_opt(&statement, params).await.map_err(db_err)
    }

    fn default_quota(&self) -> Option<u64> {
        match self.default_quota.load(Ordering::Relaxed) {
            u64::MAX => None,
            q => Some(q),
        }
    }
}

/// The UIDL of mailbox entry `key`: the same format as the sled store's.
pub(crate) fn uidl(epoch: u32, key: u64) -> String {
    format!("{epoch:08x}.{key:x}")
}
