//! The store: the only module that touches sled. A typed API over users,
//! aliases, the intake spool, local mailboxes and the remote delivery queue,
//! with group commit.
//!
//! # Layout
//!
//! - this file: [`Store`], [`StoreError`], opening, keys and record codecs.
//! - `commit`: group commit behind [`Store::durable`].
//! - `users`: users (argon2id password hashes) and aliases.
//! - `mail`: the intake spool, content reference counts and local mailboxes.
//! - `queue`: the remote delivery queue and its schedule index.
//! - `space`: free-space reserve, ballast file, monitor thread.
//! - `rejected`: messages answered 4xx after they were written.
//! - `backup`: `check`, `export` and `import` for the offline tools.
//! - `trace`: each message's history (`postino trace ID`).
//!
//! # Durability
//!
//! Every state change is one sled transaction, so after a crash each of them
//! is either wholly there or wholly absent. A change is *durable* only after
//! a flush: [`Store::durable`] resolves once a flush that started after the
//! call has completed. sled flushes with `sync_file_range`, not `fsync`: that
//! survives a process crash (`kill -9`), not necessarily a power loss on a
//! disk with a volatile write cache; with `store.sync` (the default) the
//! group commit then `fdatasync`s the files the flush wrote (`commit`).
//!
//! # A full disk
//!
//! sled 0.34 does not survive running out of space gracefully: the first
//! failed write is kept as a global error and fails every later operation
//! of that `Db`, and a flush waiting for the failed buffer can hang for good
//! (the stall watchdog in `commit` then aborts). Three defences:
//!
//! - **A reserve** (`space.rs`, `store.min_free`, Postfix's
//!   `queue_minfree`): below it the SMTP server answers `MAIL` with `452
//!   4.3.1`, so sled does not reach `ENOSPC` through mail postino accepts,
//!   and service resumes by itself once space is free (a monitor thread
//!   looks every 250 ms). A 4 MiB **ballast** file is kept while space is
//!   plentiful and given up when it runs out or before opening on a full
//!   disk, so that the store opens and POP3 users can read and delete.
//! - **Rejections** (`rejected.rs`): a message answered 4xx after it was
//!   written is hidden and removed at the next open, since a short write of
//!   sled's log buffer can leave it recoverable although its flush failed.
//! - **Opening on a full disk** (below).
//!
//! # Opening on a full disk (issue 14)
//!
//! What sled writes while opening (`sled::Config::open`, 0.34.7):
//!
//! - `conf`, in place, but only when it is missing or ≤ 8 bytes long (a
//!   fresh store); cut short by a full disk it would make the next open
//!   fail to parse it, which the space check below prevents;
//! - `db` (the log): the tail of the last segment after the recovered tip
//!   is overwritten with "corrupted" markers, and segments found torn are
//!   zeroed; both only touch bytes past the last valid record, so a partial
//!   write there loses nothing that was durable;
//! - **a snapshot** whenever recovery got further than the last snapshot
//!   (after any unclean stop, or a stop whose last flush failed): written to
//!   `snap.<lsn>.generating`, synced, renamed to `snap.<lsn>`, then older
//!   snapshots are removed.
//!
//! The last one is the trap. sled lists snapshot files by the prefix
//! `snap.` and skips only names ending in `.in___motion`, so a
//! `.generating` file counts as a snapshot, and it sorts after the finished
//! one of the same lsn. A start with 0 bytes free fails halfway through
//! writing it (`No space left on device`), leaving a truncated
//! `.generating` file; every later start reads that file as the newest
//! snapshot, finds its checksum wrong and fails with `Read corrupted data`
//! — although the log, which holds every acknowledged message, is intact.
//! The full-disk test (`fulldisk_tests.rs`) reproduces it in most rounds.
//!
//! postino's open (`prepare_open`) therefore, under sled's lock and before
//! sled runs: removes every `snap.*.generating` (a finished snapshot is
//! renamed only after its sync, and the previous one is removed only after
//! the rename, so such a file is never the only copy of anything), and
//! refuses with [`StoreError::NoSpace`] when free space is below what the
//! open writes (a segment, twice the snapshot, slack), after giving up the
//! ballast if that was not enough. Postino's own writes at open are
//! conditional (schema, UIDL epoch and the obsolete queue length are
//! written only when missing or outdated), and come after that check. A
//! store that sled still reports as corrupt can be salvaged with
//! `postino store export`, which opens a copy without sled's snapshots:
//! sled then rebuilds its page table from the log alone.
//!
//! # Trees
//!
//! | tree | key | value |
//! |---|---|---|
//! | `meta` | name | schema version, UIDL epoch |
//! | `users` | address | argon2id PHC hash |
//! | `aliases` | alias | `Vec<String>` targets |
//! | `content` | id BE | message octets, stored once per message |
//! | `refs` | id BE | reference count BE ++ content length BE |
//! | `inbound` | id BE | [`Envelope`](crate::message::Envelope) not yet dispatched |
//! | `progress` | id BE | what dispatch of an inbound message has done |
//! | `mail` | mailbox ++ NUL ++ id BE | prefix and size of one mailbox entry [++ inline content] |
//! | `queue` | id BE | [`QueueEntry`] [++ inline content] |
//! | `schedule` | next attempt BE ++ id BE | empty: index of the queue by due time (held entries have none) |
//! | `held` | id BE | unix seconds BE when the entry was put on hold (`hold.rs`) |
//! | `usage` | mailbox | messages BE ++ octets BE, kept with every mailbox change |
//! | `quotas` | address | a user's own quota in octets BE (`u64::MAX`: unlimited) |
//! | `trace` | id BE ++ sequence BE | [`TraceEvent`]: one event of a message's history |
//! | `trace` | id BE ++ 0 BE ++ `01` | `Vec<TraceEvent>`: a message's first events ([`Store::trace_new`]) |
//!
//! Content references: the inbound record holds one from [`Store::spool`]
//! until [`Store::finish_inbound`]; each mailbox entry and each queue entry
//! holds one. The transaction that drops the last one deletes the content.
//!
//! Inline content: a message accepted for exactly one mailbox
//! ([`Store::accept_local`]) or only for remote recipients
//! ([`Store::accept_remote`]) is stored in its one record, after it (a
//! marker octet, then the octets), and holds no reference. Such a
//! message is written by a single-key insert, which is atomic by itself.
//! That mattered for speed: every sled 0.34 transaction seals the log buffer
//! twice (`PageCache::pin_log`), and each sealed buffer is a write and a
//! `sync_file_range` on sled's IO threads; a plain insert only appends to
//! the buffer that the next group commit writes. Measured: local delivery
//! 4,300 → 6,400 msg/s on 2 cores, a third less CPU per message. Mailbox
//! usage (schema 3, `quota.rs`) is kept in the same transaction as every
//! other mailbox change; for this one it is a second single-key update
//! after the insert, and `META_USAGE_DIRTY` (present while the store is
//! open) makes the next open count usage again after a crash in between.

mod backup;
mod commit;
mod hold;
mod mail;
mod queue;
mod quota;
mod rejected;
mod space;
mod trace;
mod users;

#[cfg(test)]
mod churn_hang;
mod compact;
#[cfg(test)]
mod fulldisk_tests;
#[cfg(test)]
mod tests;

use std::fmt;
use std::path::{Path, PathBuf};

use crate::config::StoreConfig;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use crate::logsafe::escape;
use crate::message::MessageId;
use crate::routing::{Directory, DirectoryError};

// `ExportLine`, `EXPORT_FORMAT` and `hash_password`: for other backends
// (`postino-pg`), which share the export format and password hashes.
pub use backup::{
    read_export, BackupError, CheckReport, Counts, Line as ExportLine, EXPORT_FORMAT,
    EXPORT_VERSION,
};
pub use commit::Durable;
pub use compact::Compacted;
pub use hold::{QueueItem, Rescheduled};
pub use mail::{LocalDelivery, MailEntry};
pub use queue::{DeliveryDiagnostic, Notice, QueueEntry, QueueRecipient, RecipientState};
pub use quota::{QuotaSetting, Usage};
pub use trace::{
    TraceEvent, TraceKind, TraceLimits, DEFAULT_MAX_EVENTS_PER_MESSAGE, DEFAULT_TRACE_KEEP,
};
pub use users::{hash_password, verify_password_hash, LoginCache, PasswordScratch};

/// Version of the on-disk layout; bincode records are not self-describing,
/// so a database written by another layout is refused instead of misread.
/// Version 2 added inline content; a version 1 database has none and is
/// upgraded by writing the new number (an older postino then refuses it).
/// Version 3 keeps mailbox usage (`quota.rs`; opening an older database
/// computes it once, then writes the new number) and typed diagnostics in
/// queue recipients (new variants at the end of their state, see
/// `queue.rs`: records of versions 1 and 2 read as before, their texts
/// taken apart once when read). Version 4 keeps DSN and SMTPUTF8
/// parameters in queue entries and spooled envelopes (`QueueEntry`'s
/// stored `warned` and `Envelope`'s stored sender: older records read
/// unchanged, and the number keeps an older postino from misreading a
/// newer record); nothing is rewritten when a version 3 store is opened.
const SCHEMA_VERSION: u32 = 4;

/// Marks content stored inline after a record (see the module docs).
const INLINE: u8 = 1;

const META_SCHEMA: &[u8] = b"schema";
const META_UIDL_EPOCH: &[u8] = b"uidl_epoch";
/// Written by version 1 only (a transactional queue length); removed.
const META_QUEUE_LEN: &[u8] = b"queue_len";
/// Present while a store is open, removed when it is closed cleanly: found
/// at open, it means the last run stopped without closing (a crash, or a
/// last flush that failed), so mailbox usage, whose single-mailbox updates
/// are not in the mailbox write's transaction, is counted again.
const META_USAGE_DIRTY: &[u8] = b"usage_dirty";

/// Longest local part and domain accepted (RFC 5321 §4.5.3.1).
const MAX_LOCAL_PART: usize = 64;
const MAX_DOMAIN: usize = 255;

/// Errors of the store.
#[derive(thiserror::Error, Debug)]
#[non_exhaustive]
pub enum StoreError {
    #[error("storage error: {0}")]
    Sled(#[from] sled::Error),
    /// Another process (or another `Store` in this one) has the database open.
    #[error("the database at {} is locked by another process (is another postino running?)", path.display())]
    Locked { path: PathBuf },
    #[error("cannot create the database directory {}: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The database was written with another layout.
    #[error("the database has schema version {found}, this postino understands {expected}")]
    Schema { found: u32, expected: u32 },
    /// A record could not be encoded or decoded.
    #[error("{0}")]
    Codec(String),
    #[error("user {0} already exists")]
    UserExists(String),
    #[error("no such user: {0}")]
    NoSuchUser(String),
    #[error("no such alias: {0}")]
    NoSuchAlias(String),
    /// An alias would lead back to itself: the chain, `a -> b -> a`.
    #[error("alias loop: {0} (mail to it could never be delivered)")]
    AliasLoop(String),
    /// A record the operation needs is missing, e.g. the inbound record of a
    /// message that was already finished, or content that was never spooled.
    #[error("no {what} record for message {id}")]
    NotFound { what: &'static str, id: MessageId },
    /// [`Store::spool`] with an id that is already in use.
    #[error("message {0} is already spooled")]
    Duplicate(MessageId),
    #[error("invalid address {0:?}: expected local@domain")]
    InvalidAddress(String),
    #[error("password hashing failed: {0}")]
    Password(String),
    /// Too little free space to open the database without risking a write
    /// that cannot complete (see the module docs, "Opening on a full disk").
    #[error("not enough free space to open the database at {}: {available} bytes free, {needed} needed (free some space; nothing was written)", path.display())]
    NoSpace {
        path: PathBuf,
        available: u64,
        needed: u64,
    },
    /// Preparing the data directory for opening failed (reading free
    /// space, removing a stale snapshot).
    #[error("{}: {source}", path.display())]
    Prepare {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A queue lease ([`crate::storage::Lease`]) is no longer this
    /// claimer's: it expired and another node claimed the entry. Nothing
    /// was written.
    #[error("the lease on queue entry {id} was lost (another node claimed it)")]
    LeaseLost { id: MessageId },
    /// An error of a storage backend other than sled (a database
    /// connection, a failed transaction): temporary, like any store error.
    #[error("storage backend: {0}")]
    Backend(Box<dyn std::error::Error + Send + Sync>),
    /// A file system error while compacting ([`Store::compact`]).
    #[error("compaction: {}: {source}", path.display())]
    Compact {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Handle to the database. Clones are cheap and share everything; the group
/// commit thread ends when the last clone is dropped.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    db: sled::Db,
    users: sled::Tree,
    aliases: sled::Tree,
    content: sled::Tree,
    refs: sled::Tree,
    inbound: sled::Tree,
    progress: sled::Tree,
    mail: sled::Tree,
    queue: sled::Tree,
    schedule: sled::Tree,
    usage: sled::Tree,
    quotas: sled::Tree,
    /// Message histories (`trace.rs`) and the limits they are kept within.
    trace: sled::Tree,
    trace_limits: trace::Limits,
    /// `[mailbox]` quotas, once [`Store::set_quota_policy`] set them.
    quota_policy: std::sync::OnceLock<quota::QuotaPolicy>,
    /// Queue entries on hold (`hold.rs`).
    held: sled::Tree,
    /// Writers that add a schedule key before its queue entry (not in one
    /// transaction) hold this shared; removing a schedule key whose entry
    /// is missing (left by a crash) takes it exclusively, so it never
    /// removes the key of an entry being written.
    queue_writes: std::sync::RwLock<()>,
    /// Remembered logins, once [`Store::remember_logins`] turned it on.
    auth_cache: std::sync::OnceLock<users::AuthCache>,
    /// Random per database, part of every UIDL: a database wiped and created
    /// again restarts sled's id counter, and POP3 clients that "leave mail on
    /// the server" must not mistake new messages for ones they already have.
    uidl_epoch: u32,
    /// `store.sync`: group commits `fdatasync` the database files.
    sync: bool,
    commit: commit::GroupCommit,
    /// Free-space monitor, once [`Store::watch_space`] started it.
    space: std::sync::OnceLock<space::Monitor>,
    /// Messages answered 4xx after they were written (`rejected.rs`).
    rejected: rejected::Rejected,
    /// Last, so it is dropped after every sled handle (fields drop in
    /// order): waits until sled has let go of the database's lock.
    /// Tests: close as a crash would, leaving `META_USAGE_DIRTY`.
    #[cfg(test)]
    crashed: std::sync::atomic::AtomicBool,
    _released: Released,
}

/// Dropped with the last [`Store`] clone: returns only once the database
/// can be opened again.
///
/// sled locks its `db` file (`flock`) for as long as that file is open,
/// and more than the `Db` handles keep it open: sled's IO thread pool runs
/// log writes and file truncations as jobs that own the file through sled's
/// config, and a job drops it only after it has marked its write stable.
/// Dropping the last `Db` flushes, which waits for the writes to be stable
/// but not for the jobs to end, so for a moment after the last handle is
/// gone an IO thread still holds the lock, and opening the database again
/// at once failed with [`StoreError::Locked`] now and then (more often
/// under load, when that thread is not scheduled). sled offers no way to
/// wait for its pool, so this waits for the lock itself: it takes the
/// `flock` on a descriptor of its own, which succeeds once sled's is
/// closed, and lets it go.
struct Released {
    db_file: PathBuf,
}

/// Longest wait for sled's IO threads to let go of the database: they
/// finish a write in milliseconds; anything longer is another process that
/// took the lock meanwhile, and waiting for it would hang.
const RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl Drop for Inner {
    /// A clean close: the usage records are exact, so the next open need
    /// not count them again. If this last flush fails, the marker stays.
    fn drop(&mut self) {
        #[cfg(test)]
        if self.crashed.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        if let Ok(meta) = self.db.open_tree("meta") {
            if matches!(meta.remove(META_USAGE_DIRTY), Ok(Some(_))) {
                if let Err(e) = self.db.flush() {
                    tracing::warn!(error = %e, "closing the store: last flush failed");
                }
            }
        }
    }
}

impl Drop for Released {
    fn drop(&mut self) {
        wait_released(&self.db_file);
    }
}

/// Returns once no process holds the `flock` on sled's `db_file` (at most
/// [`RELEASE_WAIT`]): after the last handle of a sled database is dropped,
/// before it is opened again (see [`Released`]).
fn wait_released(db_file: &Path) {
    use std::os::fd::AsRawFd;
    let Ok(file) = std::fs::File::open(db_file) else {
        return;
    };
    let fd = file.as_raw_fd();
    let deadline = std::time::Instant::now() + RELEASE_WAIT;
    // SAFETY: flock on a descriptor we own, closed when `file` drops
    // (which also releases our lock).
    while unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        if std::time::Instant::now() > deadline {
            tracing::warn!(path = %db_file.display(), "the database is still locked after the store was closed");
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

impl StoreError {
    /// sled found damage in its files (`Read corrupted data`).
    pub fn is_corruption(&self) -> bool {
        matches!(self, StoreError::Sled(sled::Error::Corruption { .. }))
    }
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating if needed) the database in directory `dir`.
    ///
    /// # Errors
    ///
    /// [`StoreError::Locked`] if another process has it open,
    /// [`StoreError::Schema`] if it was written by an incompatible postino.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Store::open_with(dir, sled::Config::new())
    }

    /// Opens with the `[store]` settings of the configuration.
    ///
    /// # Errors
    ///
    /// As [`Store::open`].
    pub fn open_configured(dir: &Path, settings: &StoreConfig) -> Result<Store, StoreError> {
        let interval = settings.background_flush.as_millis() as u64;
        let config = sled::Config::new()
            .cache_capacity(settings.cache_size)
            .flush_every_ms((interval > 0).then_some(interval));
        let stall = (!settings.stall_abort.is_zero()).then_some(settings.stall_abort);
        Store::open_inner(dir, config, stall, settings.commit_delay, settings.sync)
    }

    /// Opens with a caller-made sled config (tests turn sled's own periodic
    /// flush off to prove that [`Store::durable`] alone makes data durable).
    fn open_with(dir: &Path, config: sled::Config) -> Result<Store, StoreError> {
        Store::open_inner(dir, config, None, std::time::Duration::ZERO, true)
    }

    fn open_inner(
        dir: &Path,
        config: sled::Config,
        stall_limit: Option<std::time::Duration>,
        commit_delay: std::time::Duration,
        sync: bool,
    ) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
            path: dir.to_owned(),
            source,
        })?;
        // A compaction interrupted after its commit point is finished first.
        compact::finish_interrupted(dir)?;
        prepare_open(dir)?;
        let db = config.path(dir).open().map_err(|e| match e {
            sled::Error::Io(ref io) if io.to_string().contains("could not acquire lock") => {
                StoreError::Locked {
                    path: dir.to_owned(),
                }
            }
            e => StoreError::Sled(e),
        })?;
        let meta = db.open_tree("meta")?;
        let compute_usage = check_schema(&meta)?;
        let unclean = meta.contains_key(META_USAGE_DIRTY)?;
        let uidl_epoch = uidl_epoch(&meta)?;
        let queue = db.open_tree("queue")?;
        // Only if present: a remove is a write even when there is nothing
        // to remove.
        if meta.contains_key(META_QUEUE_LEN)? {
            meta.remove(META_QUEUE_LEN)?;
        }
        let syncer = match sync {
            true => Some(commit::Syncer::open(dir).map_err(|e| StoreError::Sled(e.into()))?),
            false => None,
        };
        let commit = commit::GroupCommit::start(db.clone(), syncer, stall_limit, commit_delay)?;
        let inner = Inner {
            path: dir.to_owned(),
            users: db.open_tree("users")?,
            aliases: db.open_tree("aliases")?,
            content: db.open_tree("content")?,
            refs: db.open_tree("refs")?,
            inbound: db.open_tree("inbound")?,
            progress: db.open_tree("progress")?,
            mail: db.open_tree("mail")?,
            queue,
            schedule: db.open_tree("schedule")?,
            usage: db.open_tree("usage")?,
            quotas: db.open_tree("quotas")?,
            trace: db.open_tree("trace")?,
            trace_limits: trace::Limits::default(),
            quota_policy: std::sync::OnceLock::new(),
            held: db.open_tree("held")?,
            queue_writes: std::sync::RwLock::new(()),
            auth_cache: std::sync::OnceLock::new(),
            uidl_epoch,
            sync,
            commit,
            space: std::sync::OnceLock::new(),
            rejected: rejected::Rejected::default(),
            db,
            #[cfg(test)]
            crashed: std::sync::atomic::AtomicBool::new(false),
            _released: Released {
                db_file: dir.join("db"),
            },
        };
        let store = Store {
            inner: Arc::new(inner),
        };
        if compute_usage || unclean {
            // Before the new number: a crash in between computes it again.
            store.recompute_usage()?;
        }
        if compute_usage {
            store
                .meta()?
                .insert(META_SCHEMA, &SCHEMA_VERSION.to_be_bytes()[..])?;
        }
        if !unclean {
            store.meta()?.insert(META_USAGE_DIRTY, &[][..])?;
        }
        store.purge_rejected()?;
        Ok(store)
    }

    /// A fresh message id from sled's persistent counter: never repeats, even
    /// across crashes (sled skips ahead after an unclean stop).
    pub fn new_id(&self) -> Result<MessageId, StoreError> {
        Ok(MessageId(self.inner.db.generate_id()?))
    }

    /// Bytes the database occupies on disk.
    pub fn disk_size(&self) -> Result<u64, StoreError> {
        Ok(self.inner.db.size_on_disk()?)
    }

    /// The directory the database lives in.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Starts watching free space in the data directory: [`Store::mail_room`]
    /// is what is free above `min_free` bytes (the SMTP server refuses
    /// `MAIL` with `452 4.3.1` when it is 0 or below the `SIZE` the client
    /// declares), and a ballast file is kept while space is
    /// plentiful and given up when it runs out (see `space.rs`). Calling it
    /// again changes nothing.
    ///
    /// # Errors
    ///
    /// The monitor thread cannot be started.
    pub fn watch_space(&self, min_free: u64) -> Result<(), StoreError> {
        if self.inner.space.get().is_none() {
            let monitor =
                space::Monitor::start(self.inner.path.clone(), min_free).map_err(|source| {
                    StoreError::Prepare {
                        path: self.inner.path.clone(),
                        source,
                    }
                })?;
            let _ = self.inner.space.set(monitor);
        }
        Ok(())
    }

    /// Free bytes above the reserve given to [`Store::watch_space`] (as of
    /// at most a quarter second ago): what new mail may take. 0 below the
    /// reserve; `None` when nothing watches or there is no reserve.
    pub fn mail_room(&self) -> Option<u64> {
        let room = self.inner.space.get()?.room();
        (room != u64::MAX).then_some(room)
    }

    /// The `meta` tree (schema version, UIDL epoch).
    fn meta(&self) -> Result<sled::Tree, StoreError> {
        Ok(self.inner.db.open_tree("meta")?)
    }
}

/// Makes the data directory safe to hand to sled: nothing here writes into
/// the database, and sled is not opened where it could run out of space.
///
/// 1. Takes sled's lock (on the `db` file) for the duration, so nothing is
///    touched in a directory a running server owns.
/// 2. Removes `snap.*.generating` files: a snapshot sled could not finish
///    (see the module docs, "Opening on a full disk"). A finished snapshot
///    is renamed away from that name only after it was synced, and the
///    previous snapshot is removed only after that rename, so a
///    `.generating` file is never the only copy of anything.
/// 3. Checks that free space covers what sled writes while opening;
///    deletes the ballast file if it does not, and refuses if even that is
///    not enough ([`StoreError::NoSpace`]).
fn prepare_open(dir: &Path) -> Result<(), StoreError> {
    let io_err = |source| StoreError::Prepare {
        path: dir.to_owned(),
        source,
    };
    let db_file = dir.join("db");
    let _lock = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&db_file)
    {
        Ok(f) => {
            if fs2::FileExt::try_lock_exclusive(&f).is_err() {
                return Err(StoreError::Locked {
                    path: dir.to_owned(),
                });
            }
            Some(f)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err(e)),
    };
    for entry in std::fs::read_dir(dir).map_err(io_err)? {
        let entry = entry.map_err(io_err)?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            tracing::warn!(file = %name, "removing a snapshot sled could not finish writing (a full disk?)");
            std::fs::remove_file(entry.path()).map_err(io_err)?;
        }
    }
    let needed = space::room_to_open(dir);
    let mut available = space::available(dir).map_err(io_err)?;
    if available < needed && space::release_ballast(dir) {
        available = space::available(dir).map_err(io_err)?;
    }
    if available < needed {
        return Err(StoreError::NoSpace {
            path: dir.to_owned(),
            available,
            needed,
        });
    }
    Ok(())
}

/// Checks the schema version; a new database gets the current one. True
/// when the database is older and readable: its mailbox usage must be
/// computed before the current number is written (the caller does both).
fn check_schema(meta: &sled::Tree) -> Result<bool, StoreError> {
    let want = SCHEMA_VERSION.to_be_bytes();
    match meta.compare_and_swap(META_SCHEMA, None as Option<&[u8]>, Some(&want[..]))? {
        Ok(()) => Ok(false),
        Err(cas) => {
            let found = cas
                .current
                .as_deref()
                .and_then(|v| v.try_into().ok())
                .map(u32::from_be_bytes)
                .unwrap_or(0);
            if found == SCHEMA_VERSION {
                Ok(false)
            } else if found == 3 {
                // Version 3 records read as they are (see SCHEMA_VERSION).
                meta.insert(META_SCHEMA, &want[..])?;
                Ok(false)
            } else if found == 1 || found == 2 {
                // Version 1 and 2 records read the same; only version 2 on
                // may carry inline content, only version 3 keeps usage and
                // typed diagnostics.
                Ok(true)
            } else {
                Err(StoreError::Schema {
                    found,
                    expected: SCHEMA_VERSION,
                })
            }
        }
    }
}

fn uidl_epoch(meta: &sled::Tree) -> Result<u32, StoreError> {
    let fresh = rand::random::<u32>().to_be_bytes();
    let stored =
        match meta.compare_and_swap(META_UIDL_EPOCH, None as Option<&[u8]>, Some(&fresh[..]))? {
            Ok(()) => fresh.to_vec(),
            Err(cas) => cas.current.map(|v| v.to_vec()).unwrap_or_default(),
        };
    stored
        .as_slice()
        .try_into()
        .map(u32::from_be_bytes)
        .map_err(|_| StoreError::Codec("meta uidl_epoch: not 4 bytes".into()))
}

/// Lower-cases and checks an address: exactly one `@`, non-empty local part
/// and domain within RFC 5321 lengths, no whitespace or control characters
/// (NUL separates the mailbox from the id in `mail` keys).
pub(crate) fn canonical(address: &str) -> Result<String, StoreError> {
    canonical_mailbox(address)
}

/// The canonical (lower-case, checked) form of a mailbox address, as every
/// store keys it. [`StoreError::InvalidAddress`] if it is not one.
pub fn canonical_mailbox(address: &str) -> Result<String, StoreError> {
    let invalid = || StoreError::InvalidAddress(address.to_owned());
    let (local, domain) = address.split_once('@').ok_or_else(invalid)?;
    if local.is_empty()
        || domain.is_empty()
        || domain.contains('@')
        || local.len() > MAX_LOCAL_PART
        || domain.len() > MAX_DOMAIN
        || address.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(invalid());
    }
    Ok(address.to_ascii_lowercase())
}

fn encode<T: Serialize>(what: &str, value: &T) -> Result<Vec<u8>, StoreError> {
    bincode::serde::encode_to_vec(value, bincode::config::standard())
        .map_err(|e| StoreError::Codec(format!("cannot encode {what} record: {e}")))
}

fn decode<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, StoreError> {
    split_inline(what, bytes).map(|(v, _)| v)
}

/// A record and the content stored inline after it, if any.
fn split_inline<'a, T: DeserializeOwned>(
    what: &str,
    bytes: &'a [u8],
) -> Result<(T, Option<&'a [u8]>), StoreError> {
    let (value, n) = bincode::serde::decode_from_slice(bytes, bincode::config::standard())
        .map_err(|e| StoreError::Codec(format!("cannot decode {what} record: {e}")))?;
    match &bytes[n..] {
        [] => Ok((value, None)),
        [INLINE, content @ ..] => Ok((value, Some(content))),
        _ => Err(StoreError::Codec(format!(
            "{what} record: unknown trailer after the record"
        ))),
    }
}

/// A record followed by inline content (if any), in one allocation.
fn encode_inline<T: Serialize>(
    what: &str,
    value: &T,
    content: Option<&[u8]>,
) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::with_capacity(content.map_or(0, |c| c.len() + 1) + 256);
    bincode::serde::encode_into_std_write(value, &mut out, bincode::config::standard())
        .map_err(|e| StoreError::Codec(format!("cannot encode {what} record: {e}")))?;
    if let Some(content) = content {
        out.push(INLINE);
        out.extend_from_slice(content);
    }
    Ok(out)
}

fn id_from_key(key: &[u8]) -> Result<MessageId, StoreError> {
    MessageId::from_key(key).ok_or_else(|| StoreError::Codec(format!("bad id key {key:?}")))
}

fn utf8(what: &str, bytes: &[u8]) -> Result<String, StoreError> {
    String::from_utf8(bytes.to_vec())
        .map_err(|_| StoreError::Codec(format!("{what} key is not UTF-8")))
}

/// Result of a closure run inside a sled transaction.
type TxResult<T> = Result<T, ConflictableTransactionError<StoreError>>;

/// Aborts the running transaction with `e`.
fn abort<T>(e: StoreError) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(e))
}

/// Unwraps a transaction's outcome into the store's error type.
fn tx_done<T>(r: Result<T, TransactionError<StoreError>>) -> Result<T, StoreError> {
    r.map_err(|e| match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => StoreError::Sled(e),
    })
}

/// The error a failpoint hit returns (see [`crate::failpoints`]): an IO
/// error, ENOSPC when the action says `return(enospc)`, else EIO.
#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
fn injected(arg: Option<String>) -> StoreError {
    const EIO: i32 = 5;
    const ENOSPC: i32 = 28;
    let code = match arg.as_deref() {
        Some("enospc") => ENOSPC,
        _ => EIO,
    };
    StoreError::Sled(sled::Error::Io(std::io::Error::from_raw_os_error(code)))
}

/// Routing reads users and aliases through this. A storage failure is an
/// error, never "no such user": that would refuse good mail for good.
impl Directory for Store {
    fn is_user(&self, address: &str) -> Result<bool, DirectoryError> {
        Store::is_user(self, address).map_err(|error| {
            tracing::error!(%error, address = %escape(address), "user lookup failed");
            DirectoryError::new(error)
        })
    }

    fn alias(&self, address: &str) -> Result<Option<Vec<String>>, DirectoryError> {
        Store::alias(self, address).map_err(|error| {
            tracing::error!(%error, address = %escape(address), "alias lookup failed");
            DirectoryError::new(error)
        })
    }

    fn is_full(&self, mailbox: &str) -> Result<bool, DirectoryError> {
        match Store::over_quota(self, mailbox) {
            Ok(over) => Ok(over.is_some()),
            Err(error) => {
                tracing::error!(%error, mailbox = %escape(mailbox), "quota lookup failed");
                Err(DirectoryError::new(error))
            }
        }
    }
}
