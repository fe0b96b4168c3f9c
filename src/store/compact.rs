//! Offline compaction: copies every live record into a fresh sled database
//! and swaps it in for the old one, giving back the space that sled 0.34
//! keeps after insert-then-delete churn (sled #1333).
//!
//! Nothing is lost at any point, even when the process dies mid-way:
//!
//! 1. the copy is built in `<dir>/compact.tmp` and flushed; a crash here
//!    leaves the old database untouched (the next run deletes the copy);
//! 2. renaming it to `compact.ready` is the commit point: from then on the
//!    copy is complete and will be installed;
//! 3. the old database's files (`conf`, `db`, `blobs`, `snap.*`) move into
//!    `compact.old`, then `compact.ready` becomes `compact.install`;
//! 4. the copy's files move into `<dir>`; `compact.install` and
//!    `compact.old` are deleted.
//!
//! [`finish_interrupted`] (run by every open and by the next compaction)
//! completes steps 3–4 from wherever they stopped. Each move is one
//! `rename(2)`, atomic on its own; the step markers are directories renamed
//! after the moves they cover. Other files in the data directory (the
//! control socket) are left alone.

use std::path::Path;

use super::{Store, StoreError};

const TMP: &str = "compact.tmp";
const READY: &str = "compact.ready";
const INSTALL: &str = "compact.install";
const OLD: &str = "compact.old";

/// Records copied per sled batch: large enough to amortize the batch,
/// small enough to keep memory bounded with large messages.
const BATCH: usize = 256;

/// What a compaction did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Compacted {
    /// Octets the database's files took before and after.
    pub before: u64,
    /// Octets after.
    pub after: u64,
    /// Records (keys) copied, over all trees.
    pub records: u64,
}

/// sled's files in a database directory: everything a compaction replaces.
fn is_sled_file(name: &str) -> bool {
    matches!(name, "conf" | "db" | "blobs") || name.starts_with("snap.")
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Compact {
        path: path.to_owned(),
        source,
    }
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

fn rename(from: &Path, to: &Path) -> Result<(), StoreError> {
    std::fs::rename(from, to).map_err(io(from))
}

fn remove_dir(dir: &Path) -> Result<(), StoreError> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(dir)(e)),
        _ => Ok(()),
    }
}

/// Names of the sled files directly in `dir`.
fn sled_files(dir: &Path) -> Result<Vec<String>, StoreError> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let name = entry.map_err(io(dir))?.file_name();
        if let Some(name) = name.to_str().filter(|n| is_sled_file(n)) {
            names.push(name.to_owned());
        }
    }
    Ok(names)
}

/// Octets taken by the sled files in `dir` (allocated blocks, as `du`).
fn files_size(dir: &Path) -> Result<u64, StoreError> {
    fn walk(path: &Path) -> std::io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::symlink_metadata(path)?;
        if !meta.is_dir() {
            return Ok(meta.blocks() * 512);
        }
        let mut total = 0;
        for entry in std::fs::read_dir(path)? {
            total += walk(&entry?.path())?;
        }
        Ok(total)
    }
    let mut total = 0;
    for name in sled_files(dir)? {
        let path = dir.join(name);
        total += walk(&path).map_err(io(&path))?;
    }
    Ok(total)
}

/// Completes a compaction that a crash interrupted after its commit point,
/// and deletes the leftovers of one interrupted before it. Cheap when there
/// is nothing to do (three `stat`s).
pub(super) fn finish_interrupted(dir: &Path) -> Result<(), StoreError> {
    let (ready, install, old) = (dir.join(READY), dir.join(INSTALL), dir.join(OLD));
    if ready.exists() {
        tracing::warn!(dir = %dir.display(), "finishing an interrupted compaction");
        std::fs::create_dir_all(&old).map_err(io(&old))?;
        for name in sled_files(dir)? {
            rename(&dir.join(&name), &old.join(&name))?;
        }
        sync_dir(&old)?;
        rename(&ready, &install)?;
        sync_dir(dir)?;
    }
    if install.exists() {
        for name in sled_files(&install)? {
            rename(&install.join(&name), &dir.join(&name))?;
        }
        sync_dir(dir)?;
        remove_dir(&install)?;
    }
    // Either finished above, or never committed: the old files or the
    // incomplete copy are garbage now.
    remove_dir(&old)?;
    remove_dir(&dir.join(TMP))?;
    Ok(())
}

fn open_sled(config: sled::Config, dir: &Path) -> Result<sled::Db, StoreError> {
    config.path(dir).open().map_err(|e| match e {
        sled::Error::Io(ref io) if io.to_string().contains("could not acquire lock") => {
            StoreError::Locked {
                path: dir.to_owned(),
            }
        }
        e => StoreError::Sled(e),
    })
}

impl Store {
    /// Rewrites the database in `dir` with only its live records, and
    /// swaps the copy in (see the module docs for why nothing can be lost).
    /// The server must be stopped: the old database stays open, and so
    /// locked, until the copy has replaced it. Message ids continue above
    /// every id the old database gave out; UIDLs stay as they were.
    ///
    /// # Errors
    ///
    /// [`StoreError::Locked`] if the server (or anything else) has the
    /// database open; [`StoreError::Compact`] for a file system error, in
    /// which case the old database is still in place (or, after the commit
    /// point, the copy is, and the next open finishes installing it).
    pub fn compact(dir: &Path) -> Result<Compacted, StoreError> {
        finish_interrupted(dir)?;
        if !dir.join("db").exists() {
            // Never create a database just to compact it.
            return Err(StoreError::Compact {
                path: dir.join("db"),
                source: std::io::ErrorKind::NotFound.into(),
            });
        }
        let before = files_size(dir)?;
        let old = open_sled(sled::Config::new(), dir)?;
        super::check_schema(&old.open_tree("meta")?)?;
        // Above every id handed out: sled reserves ids ahead on each open.
        let next_id = old.generate_id()?.max(1);
        let tmp = dir.join(TMP);
        let mut records = 0;
        {
            let new = open_sled(sled::Config::new().idgen_persist_interval(next_id), &tmp)?;
            for name in old.tree_names() {
                let (from, to) = (old.open_tree(&name)?, new.open_tree(&name)?);
                let mut batch = sled::Batch::default();
                let mut pending = 0;
                for kv in from.iter() {
                    let (k, v) = kv?;
                    batch.insert(k, v);
                    pending += 1;
                    records += 1;
                    if pending == BATCH {
                        to.apply_batch(std::mem::take(&mut batch))?;
                        pending = 0;
                    }
                }
                to.apply_batch(batch)?;
                if from.len() != to.len() {
                    return Err(StoreError::Codec(format!(
                        "compaction copied {} of {} records of tree {:?}",
                        to.len(),
                        from.len(),
                        String::from_utf8_lossy(&name)
                    )));
                }
            }
            new.flush()?;
        }
        // sled's IO threads may hold the copy's lock a moment longer than
        // its last handle (see `Released`): reopening at once could fail.
        super::wait_released(&tmp.join("db"));
        {
            // A reopened sled database resumes its id counter at the last
            // persisted value plus twice the persist interval: here that is
            // 2 × next_id. One id taken persists that, so every later open
            // (with the default interval) starts above it too.
            let new = open_sled(sled::Config::new().idgen_persist_interval(next_id), &tmp)?;
            let first = new.generate_id()?;
            debug_assert!(first >= next_id);
            new.flush()?;
        }
        sync_dir(&tmp)?;
        // Nothing of `old` left to write once its files have moved.
        old.flush()?;
        // The commit point.
        rename(&tmp, &dir.join(READY))?;
        sync_dir(dir)?;
        // `old` stays open (and locked) while its files move: nobody can
        // open the database half-swapped.
        finish_interrupted(dir)?;
        drop(old);
        // `old`'s files were in `compact.old`, which `finish_interrupted`
        // deleted while they were open; nothing is left behind.
        let after = files_size(dir)?;
        tracing::info!(before, after, records, "store compacted");
        Ok(Compacted {
            before,
            after,
            records,
        })
    }
}

#[cfg(test)]
mod tests {
    use futures_executor::block_on;

    use super::*;
    use crate::message::now_unix;
    use crate::store::{LocalDelivery, QueueEntry, QueueRecipient, RecipientState};

    fn queue_entry(store: &Store) -> QueueEntry {
        QueueEntry {
            id: store.new_id().unwrap(),
            sender: Some("sender@example.org".into()),
            received_at: now_unix(),
            next_attempt: now_unix() + 3600,
            attempts: 1,
            recipients: vec![QueueRecipient {
                address: "bob@remote.test".into(),
                state: RecipientState::Pending,
            }],
            client: "192.0.2.7".into(),
            warned: false,
            params: None,
        }
    }

    #[test]
    fn compaction_keeps_every_record_and_gives_space_back() {
        let dir = tempfile::tempdir().unwrap();
        let body = |n: usize| format!("message {n}\r\n").repeat(500).into_bytes();
        let (kept, queued, uidls, last_id) = {
            let store = Store::open(dir.path()).unwrap();
            store.add_user("alice@example.test", "secret").unwrap();
            store
                .add_alias("info@example.test", "alice@example.test")
                .unwrap();
            // Churn that leaves garbage behind: queued, then delivered.
            for _ in 0..400 {
                let entry = queue_entry(&store);
                store.accept_remote(&entry, &body(0)).unwrap();
                store.remove_queue(entry.id).unwrap();
            }
            let mut kept = Vec::new();
            for n in 0..20 {
                let id = store.new_id().unwrap();
                let to = LocalDelivery {
                    mailbox: "alice@example.test".into(),
                    prefix: b"Delivered-To: alice@example.test\r\n".to_vec(),
                };
                store.accept_local(id, &body(n), &[to]).unwrap();
                kept.push(id);
            }
            let queued = queue_entry(&store);
            store.accept_remote(&queued, &body(99)).unwrap();
            block_on(store.durable()).unwrap();
            let uidls: Vec<String> = store
                .maildrop("alice@example.test")
                .unwrap()
                .into_iter()
                .map(|e| e.uidl)
                .collect();
            let last_id = store.new_id().unwrap();
            (kept, queued, uidls, last_id)
        };

        let report = Store::compact(dir.path()).unwrap();
        // 20 mailbox entries, the queue entry and its schedule key, user, alias.
        assert!(report.records >= 24, "{report:?}");
        assert!(report.after < report.before, "{report:?}");
        for leftover in [TMP, READY, INSTALL, OLD] {
            assert!(
                !dir.path().join(leftover).exists(),
                "{leftover} left behind"
            );
        }

        let store = Store::open(dir.path()).unwrap();
        assert!(store
            .verify_password("alice@example.test", "secret")
            .unwrap());
        assert!(!store
            .verify_password("alice@example.test", "wrong")
            .unwrap());
        let maildrop = store.maildrop("alice@example.test").unwrap();
        assert_eq!(maildrop.iter().map(|e| e.id).collect::<Vec<_>>(), kept);
        assert_eq!(
            maildrop.iter().map(|e| e.uidl.clone()).collect::<Vec<_>>(),
            uidls
        );
        for (n, entry) in maildrop.iter().enumerate() {
            let mail = store
                .read_mail("alice@example.test", entry.key)
                .unwrap()
                .unwrap();
            assert!(mail.starts_with(b"Delivered-To: alice@example.test\r\n"));
            assert!(mail.ends_with(&body(n)));
        }
        assert_eq!(store.queue_len().unwrap(), 1);
        assert_eq!(store.queue_entry(queued.id).unwrap(), Some(queued.clone()));
        assert_eq!(
            &store.queued_content(queued.id).unwrap().unwrap()[..],
            &body(99)[..]
        );
        assert!(
            store.new_id().unwrap() > last_id,
            "message ids must not repeat"
        );
        drop(store);
        // And again, after another reopen with sled's default id interval.
        let store = Store::open(dir.path()).unwrap();
        assert!(store.new_id().unwrap() > last_id);
    }

    #[test]
    fn compaction_refuses_an_open_or_missing_store() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Store::compact(&dir.path().join("none")),
            Err(StoreError::Compact { .. })
        ));
        let store = Store::open(dir.path()).unwrap();
        assert!(matches!(
            Store::compact(dir.path()),
            Err(StoreError::Locked { .. })
        ));
        drop(store);
        Store::compact(dir.path()).unwrap();
    }

    /// A crash after the commit point: the copy is complete in
    /// `compact.ready` (here: the store compacted into a second directory,
    /// whose files stand for it) and the old files are still in place.
    /// Opening finishes the swap; the copy's records are what is read.
    #[test]
    fn an_interrupted_compaction_is_finished_on_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store.add_user("old@example.test", "secret").unwrap();
            block_on(store.durable()).unwrap();
        }
        let ready = dir.path().join(READY);
        {
            let store = Store::open(&ready).unwrap();
            store.add_user("new@example.test", "secret").unwrap();
            block_on(store.durable()).unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.users().unwrap(), vec!["new@example.test".to_string()]);
        for leftover in [TMP, READY, INSTALL, OLD] {
            assert!(
                !dir.path().join(leftover).exists(),
                "{leftover} left behind"
            );
        }
    }
}
