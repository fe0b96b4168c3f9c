//! Free space in the data directory: the reserve below which new mail is
//! refused (Postfix's `queue_minfree`), and a ballast file given up when
//! space runs out, so that the store can still be opened on a full disk and
//! POP3 users can read and delete their mail.
//!
//! Why a reserve at all: sled 0.34 keeps the first IO error it meets (a
//! write or flush that got `ENOSPC`) as a global error and fails every later
//! write and flush of that `Db`, and every read of a page not in its cache
//! (`Log::read` waits for the log to be stable first): that is why, in
//! issue 9, freeing space did not help and POP3 logins failed with
//! `[SYS/TEMP]` until a restart. Only a new `Db` clears it, and a flush
//! waiting for the failed buffer can even hang. Refusing new mail while
//! free space is below `store.min_free` keeps sled from reaching `ENOSPC`
//! through mail postino accepts, so service resumes by itself once space is
//! free. (Sessions already past `MAIL` may still write up to
//! `smtp.max_message_size` each; the reserve and the ballast cover that,
//! not other programs filling the disk.)
//!
//! The ballast is a file of [`BALLAST_SIZE`] bytes written (and synced)
//! when space is plentiful. It is deleted when free space falls below
//! [`OPEN_ROOM`] while running, or before sled is opened on a disk with less
//! than that: sled writes while opening (see `mod.rs`, "Opening on a full
//! disk"), and a POP3 `DELE` is a write too.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Name of the ballast file in the data directory.
pub(super) const BALLAST: &str = "ballast";
/// Size of the ballast: room for sled to open (snapshot, one 512 KiB
/// segment) and for some deletions, several times over.
pub const BALLAST_SIZE: u64 = 4 * 1024 * 1024;
/// Free space below which sled is not opened (unless the ballast gives
/// more) and the running server gives up its ballast.
pub const OPEN_ROOM: u64 = 2 * 1024 * 1024;
/// How often the monitor looks at free space.
const TICK: Duration = Duration::from_millis(250);

/// Bytes available to an unprivileged writer on the file system of `dir`
/// (statvfs `f_bavail`).
pub fn available(dir: &Path) -> std::io::Result<u64> {
    fs2::available_space(dir)
}

/// Room sled needs to open the database in `dir`: a fresh segment, the new
/// snapshot (at most about as large as the current one) written beside the
/// old one, and some slack for the shredded tail of the last segment.
pub(super) fn room_to_open(dir: &Path) -> u64 {
    let snapshots: u64 = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("snap."))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .max()
        .unwrap_or(0);
    OPEN_ROOM + 2 * snapshots
}

/// Deletes the ballast, if there is one. Returns whether it did.
pub(super) fn release_ballast(dir: &Path) -> bool {
    match std::fs::remove_file(dir.join(BALLAST)) {
        Ok(()) => {
            tracing::warn!(dir = %dir.display(), "free space ran out: deleted the ballast file to make room for the store");
            true
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(error) => {
            tracing::error!(%error, dir = %dir.display(), "cannot delete the ballast file");
            false
        }
    }
}

/// Writes the ballast under a temporary name, syncs it and renames it into
/// place: a half-written ballast never looks like a whole one.
fn create_ballast(dir: &Path) -> std::io::Result<()> {
    let tmp = dir.join(format!("{BALLAST}.tmp"));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        let chunk = vec![0u8; 64 * 1024];
        let mut left = BALLAST_SIZE;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            f.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, dir.join(BALLAST))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Watches free space on a thread of its own: keeps the room left for new
/// mail, read at every `MAIL`, gives up the ballast when space runs out and
/// writes it again once there is plenty.
pub(super) struct Monitor {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Shared {
    /// Free bytes above the reserve ([`Monitor::room`]); `u64::MAX` until
    /// the first look and when no reserve is kept.
    room: AtomicU64,
    stop: Mutex<bool>,
    wake: Condvar,
}

impl Monitor {
    /// `min_free`: refuse new mail below this many free bytes (0: never).
    pub(super) fn start(dir: PathBuf, min_free: u64) -> std::io::Result<Monitor> {
        let shared = Arc::new(Shared {
            room: AtomicU64::new(u64::MAX),
            stop: Mutex::new(false),
            wake: Condvar::new(),
        });
        check(&dir, min_free, &shared.room);
        let thread = std::thread::Builder::new()
            .name("postino-space".into())
            .spawn({
                let shared = shared.clone();
                move || {
                    let mut stop = shared.stop.lock().unwrap_or_else(|e| e.into_inner());
                    while !*stop {
                        stop = shared
                            .wake
                            .wait_timeout(stop, TICK)
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                        if !*stop {
                            check(&dir, min_free, &shared.room);
                        }
                    }
                }
            })?;
        Ok(Monitor {
            shared,
            thread: Some(thread),
        })
    }

    /// Free bytes above `store.min_free` (plus the ballast's size while
    /// there is no ballast), as of the last look, at most [`TICK`] ago:
    /// what new mail may take. 0: below the reserve; `u64::MAX`: no
    /// reserve.
    pub(super) fn room(&self) -> u64 {
        self.shared.room.load(Ordering::Relaxed)
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        *self.shared.stop.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One look at free space.
fn check(dir: &Path, min_free: u64, room: &AtomicU64) {
    let avail = match available(dir) {
        Ok(a) => a,
        Err(error) => {
            tracing::error!(%error, dir = %dir.display(), "cannot read free space");
            return;
        }
    };
    // While the ballast is not in place, its room counts as reserved too:
    // once given up for the store's own writes it must not be taken by
    // new mail, and mail resumes only when it could be written again.
    let ballast = if dir.join(BALLAST).exists() {
        0
    } else {
        BALLAST_SIZE
    };
    let reserve = min_free.saturating_add(ballast);
    let left = match min_free {
        0 => u64::MAX,
        _ => avail.saturating_sub(reserve),
    };
    let is_low = left == 0;
    if (room.swap(left, Ordering::Relaxed) == 0) != is_low {
        if is_low {
            tracing::warn!(
                available = avail,
                min_free,
                "free space below store.min_free: new mail is refused (452 4.3.1) until there is room again"
            );
        } else {
            tracing::info!(
                available = avail,
                "free space is back: accepting mail again"
            );
        }
    }
    if avail < OPEN_ROOM {
        release_ballast(dir);
    } else if avail >= min_free.saturating_add(2 * BALLAST_SIZE) && !dir.join(BALLAST).exists() {
        if let Err(error) = create_ballast(dir) {
            tracing::warn!(%error, "cannot write the ballast file");
        }
    }
}
