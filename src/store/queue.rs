//! The remote delivery queue and its schedule index.
//!
//! `queue` maps id → [`QueueEntry`]; `schedule` holds one empty-valued key
//! (next attempt BE ++ id BE) per entry, so the entries due now are a range
//! scan from the start: a queue of a million deferred messages costs
//! O(due), not O(queue), to poll. Both change in the same transaction.

use serde::{Deserialize, Serialize};
use sled::Transactional;

use super::mail::{acquire, progress_of, release};
use super::{
    abort, decode, encode, id_from_key, tx_done, Store, StoreError, TxResult, META_QUEUE_LEN,
};
use crate::message::MessageId;

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
    /// A permanent failure; the sender gets a bounce.
    Failed {
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

fn schedule_key(next_attempt: u64, id: MessageId) -> [u8; 16] {
    let mut k = [0; 16];
    k[..8].copy_from_slice(&next_attempt.to_be_bytes());
    k[8..].copy_from_slice(&id.to_key());
    k
}

fn parse_schedule_key(k: &[u8]) -> Result<(u64, MessageId), StoreError> {
    let bad = || StoreError::Codec(format!("bad schedule key {k:?}"));
    if k.len() != 16 {
        return Err(bad());
    }
    let at = u64::from_be_bytes(k[..8].try_into().map_err(|_| bad())?);
    Ok((at, id_from_key(&k[8..])?))
}

/// Adds `delta` to the persistent queue length (kept so that `queue_len` is
/// O(1); sled's own `len` walks the tree).
fn count(meta: &sled::transaction::TransactionalTree, delta: i64) -> TxResult<()> {
    let n = match meta.get(META_QUEUE_LEN)? {
        Some(b) => u64::from_be_bytes(b.as_ref().try_into().unwrap_or_default()),
        None => 0,
    };
    let n = n.saturating_add_signed(delta);
    meta.insert(META_QUEUE_LEN, &n.to_be_bytes())?;
    Ok(())
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
            (
                &i.inbound,
                &i.progress,
                &i.queue,
                &i.schedule,
                &i.refs,
                &i.meta,
            )
                .transaction(|(inbound, progress, queue, schedule, refs, meta)| {
                    let mut done = progress_of(inbound, progress, id)?;
                    if done.queued {
                        return Ok(());
                    }
                    if queue.get(key)?.is_none() {
                        acquire(refs, id)?;
                        queue.insert(&key, record.as_slice())?;
                        schedule.insert(&sched, &[])?;
                        count(meta, 1)?;
                    }
                    done.queued = true;
                    progress.insert(&key, encode("progress", &done).or_else(abort)?)?;
                    Ok(())
                }),
        )
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
        let record = encode("queue", entry)?;
        let i = &self.inner;
        tx_done((&i.queue, &i.schedule).transaction(|(queue, schedule)| {
            let Some(old) = queue.get(key)? else {
                return abort(StoreError::NotFound { what: "queue", id });
            };
            let old: QueueEntry = decode("queue", &old).or_else(abort)?;
            if old.next_attempt != entry.next_attempt {
                schedule.remove(&schedule_key(old.next_attempt, id))?;
                schedule.insert(&schedule_key(entry.next_attempt, id), &[])?;
            }
            queue.insert(&key, record.as_slice())?;
            Ok(())
        }))
    }

    /// Removes a queue entry (delivered, or bounced) and releases its
    /// content reference. Repeating it does nothing.
    pub fn remove_queue(&self, id: MessageId) -> Result<(), StoreError> {
        let key = id.to_key();
        let i = &self.inner;
        tx_done(
            (&i.queue, &i.schedule, &i.refs, &i.content, &i.meta).transaction(
                |(queue, schedule, refs, content, meta)| {
                    let Some(old) = queue.remove(&key)? else {
                        return Ok(());
                    };
                    let old: QueueEntry = decode("queue", &old).or_else(abort)?;
                    schedule.remove(&schedule_key(old.next_attempt, id))?;
                    count(meta, -1)?;
                    release(refs, content, id)
                },
            ),
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
            let (_, id) = parse_schedule_key(&k?)?;
            // Index and entry change together; an entry removed between the
            // two reads is simply no longer due.
            if let Some(entry) = self.queue_entry(id)? {
                out.push(entry);
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

    /// Number of queue entries, O(1).
    pub fn queue_len(&self) -> Result<usize, StoreError> {
        let n = match self.inner.meta.get(META_QUEUE_LEN)? {
            Some(b) => u64::from_be_bytes(
                b.as_ref()
                    .try_into()
                    .map_err(|_| StoreError::Codec("meta queue_len: not 8 bytes".into()))?,
            ),
            None => 0,
        };
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }
}
