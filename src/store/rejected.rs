//! Messages answered with a 4xx after their records were written: they
//! must never be delivered, or the sender's retry makes a duplicate.
//!
//! How a message answered `451` could be stored anyway (issue 9, "2 of 200
//! stored"): sled writes a whole log buffer — several messages — with one
//! `pwrite`. On a full disk that write can be short: the messages in the
//! part that reached the file are complete, checksummed log records, and
//! sled's recovery finds them at the next start, although the flush (and
//! so [`Store::durable`]) failed for every one of them. After such a
//! failure sled refuses every further write (its error is kept for the
//! life of the `Db`), so the records cannot be removed then and there.
//!
//! So [`Store::reject`] hides the message in this process (mailbox
//! listings and the delivery queue skip it) and appends its id to the file
//! `rejected` in the data directory (synced; if the disk is full, the
//! ballast is given up first to make room). [`Store::open`] removes every
//! record of those ids before anything reads the store, flushes, and only
//! then deletes the file.

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;

use super::{space, Store, StoreError};
use crate::message::MessageId;

const FILE: &str = "rejected";

/// Ids rejected in this process.
#[derive(Default)]
pub(super) struct Rejected {
    any: std::sync::atomic::AtomicBool,
    ids: std::sync::Mutex<HashSet<MessageId>>,
}

impl Rejected {
    pub(super) fn contains(&self, id: MessageId) -> bool {
        self.any.load(std::sync::atomic::Ordering::Relaxed)
            && self
                .ids
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .contains(&id)
    }
}

fn append(dir: &Path, id: MessageId) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(FILE))?;
    f.write_all(format!("{}\n", id.0).as_bytes())?;
    f.sync_data()
}

impl Store {
    /// Marks a message whose writer answered the client with a 4xx: it is
    /// hidden from now on and removed at the next [`Store::open`] (see the
    /// module docs). Call it for any failure after the message's id was
    /// used; an id with nothing stored under it costs nothing.
    pub fn reject(&self, id: MessageId) {
        let r = &self.inner.rejected;
        r.ids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id);
        r.any.store(true, std::sync::atomic::Ordering::Relaxed);
        let dir = &self.inner.path;
        let written = append(dir, id).or_else(|e| {
            if space::release_ballast(dir) {
                append(dir, id)
            } else {
                Err(e)
            }
        });
        if let Err(error) = written {
            tracing::error!(%id, %error, "cannot record a message answered 4xx; it may be delivered after a restart");
        }
    }

    /// Whether [`Store::reject`] hid this message.
    pub(super) fn is_rejected(&self, id: MessageId) -> bool {
        self.inner.rejected.contains(id)
    }

    /// Removes every record of the messages listed in the `rejected` file,
    /// flushes, and deletes the file. Run by [`Store::open`].
    pub(super) fn purge_rejected(&self) -> Result<(), StoreError> {
        let path = self.inner.path.join(FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(StoreError::Prepare { path, source }),
        };
        // A line cut short by a crash is not an id; skipping it is safe.
        let ids: HashSet<u64> = text.lines().filter_map(|l| l.parse().ok()).collect();
        let mut mail = Vec::new();
        for k in self.inner.mail.iter().keys() {
            let k = k?;
            let Some(nul) = k.iter().position(|&b| b == 0) else {
                continue;
            };
            if let Ok(key) = super::mail::entry_key(&k[nul..]) {
                if ids.contains(&key) {
                    mail.push((String::from_utf8_lossy(&k[..nul]).into_owned(), key));
                }
            }
        }
        for (mailbox, key) in &mail {
            self.delete_mail(mailbox, &[*key])?;
        }
        for &id in &ids {
            self.remove_queue(MessageId(id))?;
            self.finish_inbound(MessageId(id))?;
        }
        self.flush_blocking()?;
        tracing::warn!(
            messages = ids.len(),
            mailbox_entries = mail.len(),
            "removed what was stored of messages answered 4xx before the last stop"
        );
        std::fs::remove_file(&path).map_err(|source| StoreError::Prepare { path, source })
    }
}
