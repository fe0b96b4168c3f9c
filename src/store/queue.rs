//! The remote delivery queue and its schedule index.
//!
//! `queue` maps id → [`QueueEntry`]; `schedule` holds one empty-valued key
//! (next attempt BE ++ id BE) per entry, so the entries due now are a range
//! scan from the start: a queue of a million deferred messages costs
//! O(due), not O(queue), to poll. Both change in the same transaction.
//!
//! Mail accepted only for remote recipients ([`Store::accept_remote`]) has
//! its content inline in the entry and is written without a transaction:
//! the schedule key first, then the entry; removed in the other order. A
//! crash in between leaves a schedule key without an entry, which
//! [`Store::due`] removes when it meets it; never an entry nobody schedules.
//!
//! The end of a delivery round is [`Store::settle_queue`]: the entry's new
//! state (or its removal) and the notifications it causes (bounce, delay
//! warning) are one transaction, so a crash can neither lose a bounce nor
//! send one twice.

use serde::{Deserialize, Serialize};
use sled::Transactional;

use bytes::Bytes;

use super::mail::{acquire, progress_of, release, spool_in};
use super::{
    abort, decode, encode, encode_inline, id_from_key, split_inline, tx_done, Store, StoreError,
};
use crate::message::{Envelope, MessageId};

/// A message waiting for remote delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueEntry {
    pub id: MessageId,
    /// The reverse path; `None` is `<>`.
    pub sender: Option<String>,
    /// Unix seconds when the message was accepted (queue lifetime counts
    /// from here).
    pub received_at: u64,
    /// Unix seconds of the next delivery attempt.
    pub next_attempt: u64,
    pub attempts: u32,
    pub recipients: Vec<QueueRecipient>,
    /// The client that handed the message in, for bounces and logs.
    pub client: String,
    /// Whether a delay warning was sent.
    pub warned: bool,
}

/// One remote recipient and how delivery to it stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRecipient {
    pub address: String,
    pub state: RecipientState,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecipientState {
    /// Not tried yet.
    Pending,
    /// Tried; a temporary failure. Retried later.
    Deferred {
        last_error: String,
    },
    Delivered {
        reply: String,
    },
    /// A permanent failure; the sender gets a bounce at the end of the
    /// delivery round.
    Failed {
        reply: String,
    },
    /// A permanent failure the sender has been sent a bounce about (in the
    /// same transaction that made this state). Added after `Failed`: bincode
    /// numbers variants in order, so records written before it still read.
    Bounced {
        reply: String,
    },
}

impl RecipientState {
    /// Whether delivery to this recipient still has to be tried.
    pub fn is_open(&self) -> bool {
        matches!(
            self,
            RecipientState::Pending | RecipientState::Deferred { .. }
        )
    }
}

/// A delivery status notification made at the end of a delivery round: the
/// envelope and content [`Store::settle_queue`] spools, as [`Store::spool`]
/// would.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub envelope: Envelope,
    pub content: Vec<u8>,
}

pub(super) fn schedule_key(next_attempt: u64, id: MessageId) -> [u8; 16] {
    let mut k = [0; 16];
    k[..8].copy_from_slice(&next_attempt.to_be_bytes());
    k[8..].copy_from_slice(&id.to_key());
    k
}

pub(super) fn parse_schedule_key(k: &[u8]) -> Result<(u64, MessageId), StoreError> {
    let bad = || StoreError::Codec(format!("bad schedule key {k:?}"));
    if k.len() != 16 {
        return Err(bad());
    }
    let at = u64::from_be_bytes(k[..8].try_into().map_err(|_| bad())?);
    Ok((at, id_from_key(&k[8..])?))
}

/// Whether a `queue` value carries its content inline.
#[cfg(test)]
pub(super) fn queue_is_inline(v: &[u8]) -> Result<bool, StoreError> {
    Ok(split_inline::<QueueEntry>("queue", v)?.1.is_some())
}

impl Store {
    /// Queues an inbound message for remote delivery, taking a content
    /// reference. Idempotent per id: once an inbound message was queued, a
    /// repeat does nothing, even if the entry was delivered and removed in
    /// between.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`] if the message is not inbound (never
    /// spooled, or already finished).
    pub fn enqueue(&self, entry: &QueueEntry) -> Result<(), StoreError> {
        let id = entry.id;
        let key = id.to_key();
        let record = encode("queue", entry)?;
        let sched = schedule_key(entry.next_attempt, id);
        let i = &self.inner;
        tx_done(
            (&i.inbound, &i.progress, &i.queue, &i.schedule, &i.refs).transaction(
                |(inbound, progress, queue, schedule, refs)| {
                    let mut done = progress_of(inbound, progress, id)?;
                    if done.queued {
                        return Ok(());
                    }
                    if queue.get(key)?.is_none() {
                        acquire(refs, id)?;
                        queue.insert(&key, record.as_slice())?;
                        schedule.insert(&sched, &[])?;
                    }
                    done.queued = true;
                    progress.insert(&key, encode("progress", &done).or_else(abort)?)?;
                    Ok(())
                },
            ),
        )
    }

    /// Stores a message that goes only to remote recipients: the queue
    /// entry with the content inline, and its schedule key. Two single-key
    /// writes, no transaction (see the module docs for why that is safe).
    /// Like [`Store::accept_local`], it never enters the intake spool: once
    /// written there is nothing left to dispatch. This is the hot path of
    /// relaying. Not durable until [`Store::durable`] resolves.
    ///
    /// # Errors
    ///
    /// [`StoreError::Duplicate`] if the id is already queued.
    pub fn accept_remote(&self, entry: &QueueEntry, content: &[u8]) -> Result<(), StoreError> {
        let id = entry.id;
        let value = encode_inline("queue", entry, Some(content))?;
        let i = &self.inner;
        let _writing = i
            .queue_writes
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        i.schedule
            .insert(schedule_key(entry.next_attempt, id), &[])?;
        // After the schedule key: a failure here leaves what a crash
        // between the two writes leaves.
        fail::fail_point!("store::accept_remote", |arg| Err(super::injected(arg)));
        match i
            .queue
            .compare_and_swap(id.to_key(), None as Option<&[u8]>, Some(value))?
        {
            Ok(()) => Ok(()),
            // The schedule key may now have no entry; `due` removes it.
            Err(_) => Err(StoreError::Duplicate(id)),
        }
    }

    /// The content of a queued message: inline in its entry, or shared.
    pub fn queued_content(&self, id: MessageId) -> Result<Option<Bytes>, StoreError> {
        let Some(v) = self.inner.queue.get(id.to_key())? else {
            return Ok(None);
        };
        let (_, inline): (QueueEntry, _) = split_inline("queue", &v)?;
        match inline {
            Some(content) => {
                let start = v.len() - content.len();
                Ok(Some(Bytes::from_owner(v).slice(start..)))
            }
            None => self.content(id),
        }
    }

    /// Records a new state of a queue entry (attempts, next attempt,
    /// recipient states) and moves it in the schedule.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`] if the entry is not queued.
    pub fn update_queue(&self, entry: &QueueEntry) -> Result<(), StoreError> {
        let id = entry.id;
        let key = id.to_key();
        let i = &self.inner;
        let trees = (&i.queue, &i.schedule, &i.held);
        tx_done(trees.transaction(|(queue, schedule, held)| {
            let Some(old) = queue.get(key)? else {
                return abort(StoreError::NotFound { what: "queue", id });
            };
            // Rewriting an entry keeps its inline content.
            let (old, inline): (QueueEntry, _) = split_inline("queue", &old).or_else(abort)?;
            let value = encode_inline("queue", entry, inline).or_else(abort)?;
            // A held entry stays off the schedule (`hold.rs`).
            if old.next_attempt != entry.next_attempt && held.get(key)?.is_none() {
                schedule.remove(&schedule_key(old.next_attempt, id))?;
                schedule.insert(&schedule_key(entry.next_attempt, id), &[])?;
            }
            queue.insert(&key, value)?;
            Ok(())
        }))
    }

    /// Removes a queue entry (delivered, or bounced) and releases its
    /// content reference. Repeating it does nothing.
    pub fn remove_queue(&self, id: MessageId) -> Result<(), StoreError> {
        let key = id.to_key();
        let i = &self.inner;
        let trees = (&i.queue, &i.schedule, &i.refs, &i.content, &i.held);
        tx_done(trees.transaction(|(queue, schedule, refs, content, held)| {
            let Some(old) = queue.remove(&key)? else {
                return Ok(());
            };
            let (old, inline): (QueueEntry, _) = split_inline("queue", &old).or_else(abort)?;
            schedule.remove(&schedule_key(old.next_attempt, id))?;
            held.remove(&key)?;
            if inline.is_none() {
                release(refs, content, id)?;
            }
            Ok(())
        }))
    }

    /// Ends a delivery round in one transaction: spools `notices` (each
    /// then waits in [`Store::inbound`] to be dispatched, like any accepted
    /// message) and either records `entry` (moving it in the schedule) or,
    /// with `remove`, removes it and releases its content reference.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`] if the entry is no longer queued (deleted or
    /// bounced by the administrator meanwhile): nothing is written, so no
    /// notice goes out about a message that is no longer ours.
    /// [`StoreError::Duplicate`] if a notice's id is in use.
    pub fn settle_queue(
        &self,
        entry: &QueueEntry,
        remove: bool,
        notices: &[Notice],
    ) -> Result<(), StoreError> {
        fail::fail_point!("store::settle_queue", |arg| Err(super::injected(arg)));
        let id = entry.id;
        let key = id.to_key();
        let notice_records = notices
            .iter()
            .map(|n| encode("inbound", &n.envelope))
            .collect::<Result<Vec<_>, _>>()?;
        let i = &self.inner;
        if remove && notices.is_empty() {
            // The common end, delivered: an entry with inline content goes
            // without a transaction, entry first, then its schedule key.
            let Some(old) = i.queue.get(key)? else {
                return Err(StoreError::NotFound { what: "queue", id });
            };
            let (entry, inline): (QueueEntry, _) = split_inline("queue", &old)?;
            // A held entry (its round ran when it was put on hold) takes
            // the transaction below, which also ends the hold.
            if inline.is_some()
                && !i.held.contains_key(key)?
                && i.queue
                    .compare_and_swap(key, Some(&old), None as Option<&[u8]>)?
                    .is_ok()
            {
                i.schedule.remove(schedule_key(entry.next_attempt, id))?;
                return Ok(());
            }
        }
        let trees = (
            &i.queue,
            &i.schedule,
            &i.refs,
            &i.content,
            &i.inbound,
            &i.held,
        );
        tx_done(
            trees.transaction(|(queue, schedule, refs, content, inbound, held)| {
                let Some(old) = queue.get(key)? else {
                    return abort(StoreError::NotFound { what: "queue", id });
                };
                let (old, inline): (QueueEntry, _) = split_inline("queue", &old).or_else(abort)?;
                for (notice, record) in notices.iter().zip(&notice_records) {
                    spool_in(
                        content,
                        refs,
                        inbound,
                        notice.envelope.id,
                        record,
                        &notice.content,
                    )?;
                }
                if remove {
                    queue.remove(&key)?;
                    schedule.remove(&schedule_key(old.next_attempt, id))?;
                    held.remove(&key)?;
                    if inline.is_none() {
                        release(refs, content, id)?;
                    }
                } else {
                    // A held entry stays off the schedule (`hold.rs`).
                    if old.next_attempt != entry.next_attempt && held.get(key)?.is_none() {
                        schedule.remove(&schedule_key(old.next_attempt, id))?;
                        schedule.insert(&schedule_key(entry.next_attempt, id), &[])?;
                    }
                    queue.insert(&key, encode_inline("queue", entry, inline).or_else(abort)?)?;
                }
                Ok(())
            }),
        )
    }

    pub fn queue_entry(&self, id: MessageId) -> Result<Option<QueueEntry>, StoreError> {
        match self.inner.queue.get(id.to_key())? {
            Some(v) => Ok(Some(decode("queue", &v)?)),
            None => Ok(None),
        }
    }

    /// Every queue entry, in id order (O(queue): for `postino queue list`).
    pub fn queue(&self) -> Result<Vec<QueueEntry>, StoreError> {
        self.inner
            .queue
            .iter()
            .values()
            .map(|v| decode("queue", &v?))
            .collect()
    }

    /// Up to `limit` entries whose next attempt is at or before `now`, the
    /// earliest first (ties in id order). Costs O(returned entries).
    pub fn due(&self, now: u64, limit: usize) -> Result<Vec<QueueEntry>, StoreError> {
        let end = schedule_key(now, MessageId(u64::MAX));
        let mut out = Vec::new();
        for k in self.inner.schedule.range(..=end).keys() {
            if out.len() >= limit {
                break;
            }
            let k = k?;
            let (_, id) = parse_schedule_key(&k)?;
            match self.queue_entry(id)? {
                // Answered 4xx: never delivered (see `rejected.rs`).
                Some(_) if self.is_rejected(id) => {}
                Some(entry) => out.push(entry),
                // Removed since the key was read, or a key a crash left
                // without its entry: remove the key unless an entry is
                // being written for it right now.
                None => {
                    let _alone = self
                        .inner
                        .queue_writes
                        .write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    if self.inner.queue.get(id.to_key())?.is_none() {
                        self.inner.schedule.remove(&k)?;
                    }
                }
            }
        }
        Ok(out)
    }

    /// When the earliest queue entry is due, if the queue is not empty.
    pub fn next_due_time(&self) -> Result<Option<u64>, StoreError> {
        match self.inner.schedule.first()? {
            Some((k, _)) => Ok(Some(parse_schedule_key(&k)?.0)),
            None => Ok(None),
        }
    }

    /// When the earliest queue entry that `skip` does not exclude is due.
    /// The delivery actor skips the entries it is trying right now (they stay
    /// due until their round ends, so that a crash retries them at once);
    /// costs O(skipped).
    pub fn next_due_time_except(
        &self,
        skip: impl Fn(MessageId) -> bool,
    ) -> Result<Option<u64>, StoreError> {
        for k in self.inner.schedule.iter().keys() {
            let (at, id) = parse_schedule_key(&k?)?;
            if !skip(id) {
                return Ok(Some(at));
            }
        }
        Ok(None)
    }

    /// Number of queue entries: a walk over the schedule index's keys,
    /// O(queue) (about a second for a million entries), plus the held
    /// entries, which have none; a counter kept in the store would need a
    /// transaction per message.
    pub fn queue_len(&self) -> Result<usize, StoreError> {
        let mut n = self.inner.held.len();
        for k in self.inner.schedule.iter().keys() {
            k?;
            n += 1;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Recipient;
    use crate::routing::Route;

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        (dir, store)
    }

    fn envelope(id: MessageId, rcpt: &str, route: Route) -> Envelope {
        Envelope {
            id,
            sender: Some("sender@example.test".into()),
            recipients: vec![Recipient {
                address: rcpt.into(),
                route,
            }],
            received_at: 1_700_000_000,
            client: "127.0.0.1".into(),
            helo: "client.test".into(),
            size: 0,
        }
    }

    /// Spools a message for `bob@remote.test`, queues it and finishes its
    /// dispatch, as the router does.
    fn queued(store: &Store, next_attempt: u64, content: &[u8]) -> QueueEntry {
        let id = store.new_id().unwrap();
        let route = Route::Deliver(vec![crate::routing::Target::Remote {
            address: "bob@remote.test".into(),
        }]);
        store
            .spool(&envelope(id, "bob@remote.test", route), content)
            .unwrap();
        let entry = QueueEntry {
            id,
            sender: Some("sender@example.test".into()),
            received_at: 100,
            next_attempt,
            attempts: 0,
            recipients: vec![QueueRecipient {
                address: "bob@remote.test".into(),
                state: RecipientState::Pending,
            }],
            client: "127.0.0.1".into(),
            warned: false,
        };
        store.enqueue(&entry).unwrap();
        store.finish_inbound(id).unwrap();
        entry
    }

    fn notice(store: &Store, text: &str) -> Notice {
        let id = store.new_id().unwrap();
        Notice {
            envelope: Envelope {
                sender: None,
                ..envelope(
                    id,
                    "sender@example.test",
                    Route::mailbox("sender@example.test"),
                )
            },
            content: text.as_bytes().to_vec(),
        }
    }

    #[test]
    fn settle_removes_the_entry_and_spools_the_bounce_together() {
        let (_dir, store) = open();
        let mut entry = queued(&store, 10, b"original");
        entry.recipients[0].state = RecipientState::Bounced {
            reply: "550 5.1.1 no".into(),
        };
        let bounce = notice(&store, "bounce");
        store
            .settle_queue(&entry, true, std::slice::from_ref(&bounce))
            .unwrap();
        assert_eq!(store.queue_entry(entry.id).unwrap(), None);
        assert_eq!(store.queue_len().unwrap(), 0);
        assert_eq!(store.next_due_time().unwrap(), None);
        // The original's last reference went with the entry.
        assert_eq!(store.content(entry.id).unwrap(), None);
        assert_eq!(store.inbound().unwrap(), vec![bounce.envelope.clone()]);
        assert_eq!(
            store.content(bounce.envelope.id).unwrap().as_deref(),
            Some(&b"bounce"[..])
        );
    }

    #[test]
    fn settle_of_a_deleted_entry_writes_nothing() {
        let (_dir, store) = open();
        let entry = queued(&store, 10, b"original");
        store.remove_queue(entry.id).unwrap();
        let bounce = notice(&store, "bounce");
        let err = store
            .settle_queue(&entry, false, std::slice::from_ref(&bounce))
            .unwrap_err();
        assert!(
            matches!(err, StoreError::NotFound { what: "queue", .. }),
            "{err}"
        );
        assert!(store.inbound().unwrap().is_empty(), "no bounce spooled");
        assert_eq!(store.content(bounce.envelope.id).unwrap(), None);
        assert_eq!(store.queue_len().unwrap(), 0);
    }

    #[test]
    fn settle_keeps_and_reschedules() {
        let (_dir, store) = open();
        let mut entry = queued(&store, 10, b"original");
        let other = queued(&store, 20, b"other");
        entry.attempts = 1;
        entry.next_attempt = 30;
        entry.warned = true;
        entry.recipients[0].state = RecipientState::Deferred {
            last_error: "451 4.3.0 later".into(),
        };
        let warning = notice(&store, "delay");
        store
            .settle_queue(&entry, false, std::slice::from_ref(&warning))
            .unwrap();
        assert_eq!(store.queue_entry(entry.id).unwrap(), Some(entry.clone()));
        assert_eq!(store.queue_len().unwrap(), 2);
        let due: Vec<MessageId> = store
            .due(25, 10)
            .unwrap()
            .into_iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(due, [other.id]);
        assert_eq!(store.next_due_time().unwrap(), Some(20));
        assert_eq!(store.inbound().unwrap().len(), 1);
        assert!(store.content(entry.id).unwrap().is_some());
    }

    #[test]
    fn next_due_time_skips_what_is_being_tried() {
        let (_dir, store) = open();
        let a = queued(&store, 10, b"a");
        let b = queued(&store, 20, b"b");
        assert_eq!(store.next_due_time_except(|_| false).unwrap(), Some(10));
        assert_eq!(
            store.next_due_time_except(|id| id == a.id).unwrap(),
            Some(20)
        );
        assert_eq!(
            store
                .next_due_time_except(|id| id == a.id || id == b.id)
                .unwrap(),
            None
        );
    }

    /// Records written before `Bounced` existed still decode: the new
    /// variant only adds a number at the end.
    #[test]
    fn states_keep_their_encoding() {
        let cases = [
            (RecipientState::Pending, vec![0u8]),
            (
                RecipientState::Deferred {
                    last_error: "x".into(),
                },
                vec![1, 1, b'x'],
            ),
            (
                RecipientState::Delivered { reply: "x".into() },
                vec![2, 1, b'x'],
            ),
            (
                RecipientState::Failed { reply: "x".into() },
                vec![3, 1, b'x'],
            ),
            (
                RecipientState::Bounced { reply: "x".into() },
                vec![4, 1, b'x'],
            ),
        ];
        for (state, bytes) in cases {
            assert_eq!(encode("state", &state).unwrap(), bytes, "{state:?}");
            assert_eq!(decode::<RecipientState>("state", &bytes).unwrap(), state);
        }
    }

    /// Disk use under queue churn (sled #1333: space is not reclaimed under
    /// insert-then-delete): each message is spooled, queued, dispatched,
    /// deferred once and then delivered (removed), with a standing backlog
    /// of deferred entries, as a relay sees it. Run with
    /// `cargo test -p postino-core --lib store::queue::tests::queue_churn -- --ignored --nocapture`;
    /// `POSTINO_QUEUE_CHURN` (default 50,000 messages),
    /// `POSTINO_QUEUE_BACKLOG` (default 1,000) and `POSTINO_QUEUE_SIZE`
    /// (default 2,048 octets) change the shape.
    ///
    /// With stock sled 0.34.7, 8 KiB messages and a backlog of 5,000, about
    /// half the runs hung (sled #1412: a writer holds the segment
    /// accountant's lock in `bump_tip`, waiting for a file truncation queued
    /// on sled's IO pool behind stabilisations that wait for that lock). The
    /// vendored sled runs truncations on a thread of their own (upstream's
    /// #1269, vendor/sled/POSTINO.md). `benches/queue_disk.rs` measures the
    /// relay path with several writers.
    #[test]
    #[ignore = "measurement, prints numbers"]
    fn queue_churn_disk_growth() {
        let env = |name: &str, default: usize| -> usize {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        let messages = env("POSTINO_QUEUE_CHURN", 50_000);
        let backlog = env("POSTINO_QUEUE_BACKLOG", 1_000);
        let size = env("POSTINO_QUEUE_SIZE", 2048);
        let dir = tempfile::tempdir().unwrap();
        let content = vec![b'x'; size];
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let started = std::time::Instant::now();
        println!("{messages} messages of {size} octets through the queue, backlog {backlog}");
        println!("messages  size_on_disk_MiB  files_MiB  queued");
        {
            let store = Store::open(dir.path()).unwrap();
            let mut live = std::collections::VecDeque::new();
            for n in 1..=messages {
                let mut entry = queued(&store, n as u64, &content);
                // One deferral (the schedule moves), then later delivery.
                entry.attempts = 1;
                entry.next_attempt = n as u64 + 300;
                entry.recipients[0].state = RecipientState::Deferred {
                    last_error: "451 4.3.0 try again later".into(),
                };
                store.update_queue(&entry).unwrap();
                live.push_back(entry);
                if live.len() > backlog {
                    let mut done = live.pop_front().unwrap();
                    done.recipients[0].state = RecipientState::Delivered {
                        reply: "250 2.0.0 Ok".into(),
                    };
                    store.settle_queue(&done, true, &[]).unwrap();
                }
                if n % 64 == 0 {
                    // Group commit: one flush per few messages.
                    store.flush_blocking().unwrap();
                }
                if n % (messages / 10).max(1) == 0 {
                    println!(
                        "{n:>8}  {:>16.2}  {:>9.2}  {:>6}",
                        mib(store.disk_size().unwrap()),
                        mib(dir_size(dir.path())),
                        store.queue_len().unwrap()
                    );
                }
            }
            for entry in live {
                store.settle_queue(&entry, true, &[]).unwrap();
            }
            store.flush_blocking().unwrap();
            assert_eq!(store.queue_len().unwrap(), 0);
            assert!(store.inner.content.is_empty());
            println!(
                "emptied: size_on_disk {:.2} MiB, files {:.2} MiB; elapsed {:.1?}",
                mib(store.disk_size().unwrap()),
                mib(dir_size(dir.path())),
                started.elapsed()
            );
        }
        let store = Store::open(dir.path()).unwrap();
        println!(
            "after reopen: size_on_disk {:.2} MiB, files {:.2} MiB",
            mib(store.disk_size().unwrap()),
            mib(dir_size(dir.path()))
        );
    }

    fn dir_size(dir: &std::path::Path) -> u64 {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let meta = e.metadata().unwrap();
                if meta.is_dir() {
                    dir_size(&e.path())
                } else {
                    meta.len()
                }
            })
            .sum()
    }
}
