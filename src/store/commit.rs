//! Group commit: one thread flushes sled on behalf of every waiting caller,
//! so a burst of N accepted messages costs one flush, not N.
//!
//! Callers take a *ticket* (a sequence number) under a mutex. The flusher
//! thread notes the highest ticket issued, flushes, then marks every ticket up
//! to that one done. A ticket issued after the flush started is above the
//! mark, so it waits for the next flush: each caller's writes (made before
//! its ticket) are always covered. Waiting costs no allocation: a ticket is a
//! `u64` and wakers live in one reused `Vec`.
//!
//! Under load, flushes are at least `commit_delay` apart
//! (`store.commit_delay`), unless a full batch ([`FULL_BATCH`] tickets) is
//! already waiting: tickets that arrive meanwhile join the next flush
//! instead of each starting one. "Under load" means the last flush served
//! more than one ticket; a lone writer, whose every flush is its own, never
//! waits (a delay would only cap it at one message per delay). Every flush wakes all of sled's idle IO threads, so fewer,
//! larger flushes save CPU: with 20 SMTP sessions on 2 cores, the default
//! 1 ms took sled's IO threads from 4.5 to 1.1 context switches per message
//! and local delivery from ~5,900 to ~7,300 msg/s (0.5 ms: 7,000; 2 ms:
//! 6,300, waiting starts to cost more than it saves). When flushes are rarer
//! than the delay (light load), nobody waits either.
//!
//! # Power loss
//!
//! sled's flush writes its log buffers into the `db` file with
//! `sync_file_range`: on disk as far as the kernel knows, but not
//! necessarily past the disk's volatile cache, and without the file's
//! metadata. With `store.sync` (the default) the flusher then
//! `fdatasync`s what the flush wrote ([`Syncer`]) before it releases the
//! tickets: the `db` file, and the blob files (values of more than about
//! 128 KiB, i.e. large messages) that sled writes beside it without any
//! sync, with their directory. `conf` is written once when the database
//! is created and synced at open; `snap.*` files are sled's own
//! recovery shortcut, written with `fsync` by sled, and rebuilt from `db`
//! if missing. That is what Postfix's `fsync` of the queue file before
//! the 250 promises.

use std::collections::HashMap;
use std::fs::File;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;

use super::{Store, StoreError};

/// Tickets that make a flush worth doing at once, commit delay or not: with
/// this many waiting, more waiting costs their latency and saves little.
/// Measured with 20 sessions: 8 beat waiting out the whole delay with both
/// smtp-source (one message per connection) and the pipelining harness.
pub(super) const FULL_BATCH: u64 = 8;

/// Owns the flusher thread; dropping it (with the last [`Store`] clone)
/// serves the tickets still outstanding, then stops and joins the thread.
pub(super) struct GroupCommit {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the flusher thread when a ticket is issued or on shutdown.
    work: Condvar,
    /// Completed flushes (group commits and [`Store::flush_blocking`]).
    flushes: AtomicU64,
}

#[derive(Default)]
struct State {
    /// Last ticket issued.
    issued: u64,
    /// Every ticket up to this one is covered by a completed flush.
    done: u64,
    /// A flush failed: sled keeps the error and fails every later
    /// operation, so every ticket above `done` fails too.
    failed: Option<sled::Error>,
    /// Tasks waiting for a ticket above `done`.
    waiters: Vec<(u64, Waker)>,
    shutdown: bool,
    /// When the running flush started, for the stall watchdog.
    flushing_since: Option<std::time::Instant>,
    /// When the last flush ended, if it served more than one ticket: only
    /// then is anyone else likely to ask soon, and the commit delay applies.
    /// A lone writer (each flush serving just its own ticket) never waits.
    last_shared_flush: Option<std::time::Instant>,
    /// Flushes started, and (start number, highest ticket covered) of each
    /// completed one: tests check that every caller was served by a flush
    /// that started after its call.
    #[cfg(test)]
    started: u64,
    #[cfg(test)]
    log: Vec<(u64, u64)>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves counters that are still
        // consistent (they only grow), so poisoning is not a reason to fail.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Makes what a sled flush wrote survive a power loss (see the module
/// docs): `fdatasync` of the `db` file and of blob files not yet synced.
pub(super) struct Syncer {
    db: File,
    blobs: PathBuf,
    /// Blob files synced, with their length then: sled writes each once,
    /// but one seen while still being written is synced again later.
    synced: HashMap<std::ffi::OsString, u64>,
}

impl Syncer {
    /// Opens the `db` file of the database in `dir`, and makes the files
    /// sled created at open (and their names) durable once.
    pub(super) fn open(dir: &Path) -> std::io::Result<Syncer> {
        let db = File::open(dir.join("db"))?;
        db.sync_all()?;
        if let Ok(conf) = File::open(dir.join("conf")) {
            conf.sync_all()?;
        }
        File::open(dir)?.sync_all()?;
        Ok(Syncer {
            db,
            blobs: dir.join("blobs"),
            synced: HashMap::new(),
        })
    }

    /// Syncs what the last flush wrote.
    pub(super) fn sync(&mut self) -> std::io::Result<()> {
        self.db.sync_data()?;
        self.sync_blobs()
    }

    fn sync_blobs(&mut self) -> std::io::Result<()> {
        let entries = match std::fs::read_dir(&self.blobs) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut present = Vec::new();
        let mut new = false;
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            let len = entry.metadata()?.len();
            if self.synced.get(&name) != Some(&len) {
                match File::open(entry.path()) {
                    Ok(f) => f.sync_data()?,
                    // Collected by sled meanwhile.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
                self.synced.insert(name.clone(), len);
                new = true;
            }
            present.push(name);
        }
        if new {
            // The new files' names.
            File::open(&self.blobs)?.sync_all()?;
        }
        if present.len() < self.synced.len() {
            self.synced.retain(|name, _| present.contains(name));
        }
        Ok(())
    }
}

impl GroupCommit {
    /// Starts the flush thread, and with `stall_limit` a watchdog that
    /// aborts the process when one flush takes longer than that. Stock sled
    /// 0.34.7 could deadlock under load (sled #1412; the vendored sled has
    /// upstream's fix, vendor/sled/POSTINO.md): the watchdog stays as a
    /// last resort, since a server that hangs with mail in its clients is
    /// worse than one that restarts; a kill loses no acknowledged mail.
    pub(super) fn start(
        db: sled::Db,
        mut syncer: Option<Syncer>,
        stall_limit: Option<std::time::Duration>,
        commit_delay: std::time::Duration,
    ) -> Result<GroupCommit, StoreError> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            flushes: AtomicU64::new(0),
        });
        let thread = std::thread::Builder::new()
            .name("postino-flush".into())
            .spawn({
                let shared = shared.clone();
                move || flusher(&shared, &db, syncer.as_mut(), commit_delay)
            })
            .map_err(|e| StoreError::Sled(sled::Error::Io(e)))?;
        if let Some(limit) = stall_limit {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("postino-watchdog".into())
                .spawn(move || watchdog(&shared, limit))
                .map_err(|e| StoreError::Sled(sled::Error::Io(e)))?;
        }
        Ok(GroupCommit {
            shared,
            thread: Some(thread),
        })
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.work.notify_one();
        if let Some(thread) = self.thread.take() {
            // Joining makes sure the thread's `Db` handle is gone when the
            // last `Store` is, so the database can be reopened at once.
            if thread.join().is_err() {
                tracing::error!("the flush thread panicked");
            }
        }
    }
}

fn watchdog(shared: &Shared, limit: std::time::Duration) {
    let tick = (limit / 4).clamp(
        std::time::Duration::from_millis(10),
        std::time::Duration::from_secs(1),
    );
    loop {
        std::thread::sleep(tick);
        let state = shared.lock();
        if state.shutdown {
            return;
        }
        if let Some(since) = state.flushing_since {
            if since.elapsed() > limit {
                tracing::error!(
                    seconds = since.elapsed().as_secs(),
                    "the store has stopped making progress (a flush is stuck); aborting so that a supervisor restarts the server. Acknowledged mail is on disk."
                );
                eprintln!("postino: store flush stuck for over {limit:?}; aborting");
                std::process::abort();
            }
        }
    }
}

fn flusher(
    shared: &Shared,
    db: &sled::Db,
    mut syncer: Option<&mut Syncer>,
    commit_delay: std::time::Duration,
) {
    let mut ready: Vec<Waker> = Vec::new();
    let mut state = shared.lock();
    loop {
        while state.issued == state.done && !state.shutdown {
            state = shared
                .work
                .wait(state)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        if state.issued == state.done {
            // Shutdown with nothing outstanding.
            return;
        }
        if let Some(until) = state.last_shared_flush.map(|at| at + commit_delay) {
            // Too soon after the last flush: let more tickets gather, until
            // the delay is over or a full batch is waiting.
            while state.issued - state.done < FULL_BATCH && !state.shutdown {
                let left = until.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    break;
                }
                state = shared
                    .work
                    .wait_timeout(state, left)
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .0;
            }
        }
        // Every ticket issued so far was taken after its caller's writes, so
        // this flush covers them all.
        let target = state.issued;
        let shared_flush = target - state.done > 1;
        let batch = target - state.done;
        #[cfg(test)]
        let start = {
            state.started += 1;
            state.started
        };
        let began = std::time::Instant::now();
        state.flushing_since = Some(began);
        drop(state);
        let result = db.flush().and_then(|_| match syncer.as_deref_mut() {
            // A failed fdatasync is not retried: after one, the kernel may
            // have dropped the dirty pages and a second one can succeed
            // with the data lost ("fsyncgate"). Like a failed flush, it
            // fails every later commit until a restart.
            Some(syncer) => syncer.sync().map_err(sled::Error::Io),
            None => Ok(()),
        });
        let ended = shared_flush.then(std::time::Instant::now);
        crate::metrics::commit(batch as usize, began.elapsed().as_secs_f64());
        shared.flushes.fetch_add(1, Ordering::Relaxed);
        state = shared.lock();
        state.flushing_since = None;
        state.last_shared_flush = ended;
        let failed = match result {
            Ok(_) => {
                state.done = target;
                #[cfg(test)]
                state.log.push((start, target));
                false
            }
            Err(error) => {
                tracing::error!(%error, "flush failed; accepted mail can no longer be made durable");
                crate::metrics::store_error("flush");
                state.failed = Some(error);
                true
            }
        };
        // Wake the served waiters (or all of them after a failure) outside
        // the lock; `ready` keeps its capacity from one batch to the next.
        let done = state.done;
        let mut i = 0;
        while i < state.waiters.len() {
            if failed || state.waiters[i].0 <= done {
                ready.push(state.waiters.swap_remove(i).1);
            } else {
                i += 1;
            }
        }
        drop(state);
        for waker in ready.drain(..) {
            waker.wake();
        }
        if failed {
            // Later tickets see `failed` when polled; nothing left to do.
            return;
        }
        state = shared.lock();
    }
}

impl Store {
    /// Resolves once every write this store made before the call is on disk
    /// (sled's `sync_file_range`, then `fdatasync` with `store.sync`; see
    /// the module docs).
    ///
    /// Concurrent callers share one flush (group commit). Works from any
    /// executor: nothing here depends on a runtime.
    ///
    /// # Errors
    ///
    /// The flush failed; sled then fails every later operation too.
    pub fn durable(&self) -> Durable {
        let shared = self.inner.commit.shared.clone();
        let mut state = shared.lock();
        state.issued += 1;
        let ticket = state.issued;
        let pending = state.issued - state.done;
        #[cfg(test)]
        let started_before = state.started;
        drop(state);
        // The flusher waits for the first ticket, and during a commit delay
        // for a full batch: waking it for every ticket would cost a context
        // switch each.
        if pending == 1 || pending >= FULL_BATCH {
            shared.work.notify_one();
        }
        Durable {
            shared,
            ticket,
            registered: false,
            #[cfg(test)]
            started_before,
        }
    }

    /// Flushes on the calling thread and waits for it, for callers outside
    /// async code (the CLI, shutdown).
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        self.inner.db.flush()?;
        if self.inner.sync {
            // Rare (the CLI, shutdown): a syncer of its own, syncing every
            // blob file.
            Syncer::open(&self.inner.path)
                .and_then(|mut s| s.sync())
                .map_err(|e| StoreError::Sled(sled::Error::Io(e)))?;
        }
        self.inner
            .commit
            .shared
            .flushes
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Flushes completed so far, by group commit or [`Store::flush_blocking`].
    #[doc(hidden)]
    pub fn flush_count(&self) -> u64 {
        self.inner.commit.shared.flushes.load(Ordering::Relaxed)
    }

    /// Makes the flusher believe a flush that served several tickets has
    /// just ended: the commit delay applies to the next one.
    #[cfg(test)]
    pub(super) fn pretend_under_load(&self) {
        self.inner.commit.shared.lock().last_shared_flush = Some(std::time::Instant::now());
    }

    /// Makes the watchdog believe a flush has been stuck for an hour.
    #[cfg(test)]
    pub(super) fn pretend_flush_is_stuck(&self) {
        self.inner.commit.shared.lock().flushing_since =
            std::time::Instant::now().checked_sub(std::time::Duration::from_secs(3600));
    }

    /// (start number, highest ticket covered) of every completed flush.
    #[cfg(test)]
    pub(super) fn flush_log(&self) -> Vec<(u64, u64)> {
        self.inner.commit.shared.lock().log.clone()
    }
}

/// The future returned by [`Store::durable`]. `Send + 'static`; dropping it
/// early is harmless (the flush still happens).
#[must_use = "nothing is known to be durable until this resolves"]
pub struct Durable {
    shared: Arc<Shared>,
    ticket: u64,
    registered: bool,
    /// Flushes started before the ticket was issued.
    #[cfg(test)]
    pub(super) started_before: u64,
}

impl Durable {
    #[cfg(test)]
    pub(super) fn ticket(&self) -> u64 {
        self.ticket
    }
}

impl Future for Durable {
    type Output = Result<(), StoreError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        fail::fail_point!("store::durable", |arg| Poll::Ready(Err(super::injected(
            arg
        ))));
        let this = self.get_mut();
        let mut state = this.shared.lock();
        if this.ticket <= state.done {
            return Poll::Ready(Ok(()));
        }
        if let Some(error) = &state.failed {
            return Poll::Ready(Err(StoreError::Sled(error.clone())));
        }
        let ticket = this.ticket;
        if this.registered {
            // Polled again (spuriously or from another task): refresh the
            // waker in place instead of adding a second entry.
            if let Some(slot) = state.waiters.iter_mut().find(|(t, _)| *t == ticket) {
                slot.1.clone_from(cx.waker());
                return Poll::Pending;
            }
        }
        state.waiters.push((ticket, cx.waker().clone()));
        this.registered = true;
        Poll::Pending
    }
}

impl std::fmt::Debug for Durable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Durable")
            .field("ticket", &self.ticket)
            .finish_non_exhaustive()
    }
}
