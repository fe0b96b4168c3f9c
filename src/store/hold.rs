//! Administrator's queue tools on the store: holding and releasing entries
//! (Postfix's hold queue, `postsuper -h/-H`), rescheduling (`postsuper -r`,
//! `postqueue -f/-s`) and a streaming walk over the queue for listings.
//!
//! A held entry keeps its `queue` record but has no `schedule` key, so
//! [`Store::due`] never returns it and the delivery actor's poll costs
//! nothing for it; the `held` tree (id BE → unix seconds BE of the hold)
//! says it is held. Holding, releasing and every write that moves an entry
//! in the schedule read `held` in the same transaction, so a round that
//! ends while its entry is held leaves it unscheduled. The tree is new in
//! this layout, not a change of any record: an older store opens with an
//! empty one, and no schema upgrade is needed.

use sled::Transactional;

use super::queue::schedule_key;
use super::{abort, encode_inline, id_from_key, split_inline, tx_done, Store, StoreError};
use crate::message::MessageId;
use crate::store::QueueEntry;

/// One queue entry as the listing walk yields it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueItem {
    /// The entry itself.
    pub entry: QueueEntry,
    /// Whether it is on hold ([`Store::hold`]).
    pub held: bool,
    /// Size of the message content in octets.
    pub size: u64,
    /// The node that holds an unexpired lease on it (delivering it right
    /// now), where leases are in the store: on PostgreSQL, any node's. On
    /// sled `None`: leases are the running server's own, which knows its
    /// rounds.
    pub leased_by: Option<String>,
}

/// What [`Store::reschedule`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rescheduled {
    /// Now due at the time asked for.
    Done,
    /// Held: left off the schedule until released.
    Held,
}

impl Store {
    /// Puts a queued message on hold: it stays in the queue but is not
    /// tried until [`Store::release`]. A round already running finishes,
    /// and its outcome leaves the entry unscheduled. `Ok(false)`: it was
    /// held already.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`] if the message is not queued.
    pub fn hold(&self, id: MessageId, now: u64) -> Result<bool, StoreError> {
        let key = id.to_key();
        let i = &self.inner;
        tx_done(
            (&i.queue, &i.schedule, &i.held).transaction(|(queue, schedule, held)| {
                let Some(v) = queue.get(key)? else {
                    return abort(StoreError::NotFound { what: "queue", id });
                };
                if held.get(key)?.is_some() {
                    return Ok(false);
                }
                let (entry, _): (QueueEntry, _) = split_inline("queue", &v).or_else(abort)?;
                schedule.remove(&schedule_key(entry.next_attempt, id))?;
                held.insert(&key, &now.to_be_bytes())?;
                Ok(true)
            }),
        )
    }

    /// Releases a held message and schedules it for `at` (unix seconds).
    /// `Ok(false)`: it was not held (nothing changed).
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`] if the message is not queued.
    pub fn release(&self, id: MessageId, at: u64) -> Result<bool, StoreError> {
        let key = id.to_key();
        let i = &self.inner;
        tx_done(
            (&i.queue, &i.schedule, &i.held).transaction(|(queue, schedule, held)| {
                let Some(v) = queue.get(key)? else {
                    return abort(StoreError::NotFound { what: "queue", id });
                };
                if held.remove(&key)?.is_none() {
                    return Ok(false);
                }
                let (mut entry, inline): (QueueEntry, _) =
                    split_inline("queue", &v).or_else(abort)?;
                entry.next_attempt = at;
                queue.insert(&key, encode_inline("queue", &entry, inline).or_else(abort)?)?;
                schedule.insert(&schedule_key(at, id), &[])?;
                Ok(true)
            }),
        )
    }

    /// Whether a queued message is on hold.
    pub fn is_held(&self, id: MessageId) -> Result<bool, StoreError> {
        Ok(self.inner.held.contains_key(id.to_key())?)
    }

    /// Makes a queued message due at `at`; with `reset`, also forgets its
    /// attempts, so the retry schedule starts again from its first
    /// interval (`postsuper -r`). Only the schedule fields change, read and
    /// written in one transaction, so a concurrent delivery round's
    /// recipient states are never overwritten. A held message is left
    /// alone ([`Rescheduled::Held`]).
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`] if the message is not queued.
    pub fn reschedule(
        &self,
        id: MessageId,
        at: u64,
        reset: bool,
    ) -> Result<Rescheduled, StoreError> {
        let key = id.to_key();
        let i = &self.inner;
        tx_done(
            (&i.queue, &i.schedule, &i.held).transaction(|(queue, schedule, held)| {
                let Some(v) = queue.get(key)? else {
                    return abort(StoreError::NotFound { what: "queue", id });
                };
                if held.get(key)?.is_some() {
                    return Ok(Rescheduled::Held);
                }
                let (mut entry, inline): (QueueEntry, _) =
                    split_inline("queue", &v).or_else(abort)?;
                if entry.next_attempt == at && !(reset && entry.attempts > 0) {
                    return Ok(Rescheduled::Done);
                }
                schedule.remove(&schedule_key(entry.next_attempt, id))?;
                entry.next_attempt = at;
                if reset {
                    entry.attempts = 0;
                    entry.warned = false;
                }
                queue.insert(&key, encode_inline("queue", &entry, inline).or_else(abort)?)?;
                schedule.insert(&schedule_key(at, id), &[])?;
                Ok(Rescheduled::Done)
            }),
        )
    }

    /// Walks the queue in id order, one entry at a time (memory stays
    /// bounded whatever the queue's length), with each entry's hold state
    /// and content size. For listings and bulk actions.
    pub fn queue_items(&self) -> impl Iterator<Item = Result<QueueItem, StoreError>> + '_ {
        let mut held = self.inner.held.iter().keys().peekable();
        self.inner.queue.iter().map(move |kv| {
            let (k, v) = kv?;
            let id = id_from_key(&k)?;
            // Both trees are keyed by id BE: a merge walk, no lookups.
            let mut is_held = false;
            while let Some(h) = held.peek() {
                match h {
                    Ok(h) if h.as_ref() < k.as_ref() => {
                        held.next();
                    }
                    Ok(h) => {
                        is_held = h.as_ref() == k.as_ref();
                        break;
                    }
                    Err(_) => {
                        // Surface the error once, then stop merging.
                        if let Some(Err(e)) = held.next() {
                            return Err(e.into());
                        }
                    }
                }
            }
            let (entry, inline): (QueueEntry, _) = split_inline("queue", &v)?;
            let size = match inline {
                Some(c) => c.len() as u64,
                None => self.content_len(id)?,
            };
            Ok(QueueItem {
                entry,
                held: is_held,
                size,
                leased_by: None,
            })
        })
    }

    /// One queue entry with its hold state and size, if queued.
    pub fn queue_item(&self, id: MessageId) -> Result<Option<QueueItem>, StoreError> {
        let Some(v) = self.inner.queue.get(id.to_key())? else {
            return Ok(None);
        };
        let (entry, inline): (QueueEntry, _) = split_inline("queue", &v)?;
        let size = match inline {
            Some(c) => c.len() as u64,
            None => self.content_len(id)?,
        };
        Ok(Some(QueueItem {
            entry,
            held: self.is_held(id)?,
            size,
            leased_by: None,
        }))
    }

    /// Length of a shared content, from its reference record.
    fn content_len(&self, id: MessageId) -> Result<u64, StoreError> {
        Ok(match self.inner.refs.get(id.to_key())? {
            Some(r) => super::mail::Refs::parse(id, &r)?.len,
            None => 0,
        })
    }

    /// Number of held entries.
    pub fn held_len(&self) -> usize {
        self.inner.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{DeliveryDiagnostic, QueueRecipient, RecipientState};

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        (dir, store)
    }

    /// A remote-only message as the router stores it, due at `at`.
    fn accepted(store: &Store, at: u64) -> QueueEntry {
        let entry = QueueEntry {
            id: store.new_id().unwrap(),
            sender: Some("sender@example.test".into()),
            received_at: 100,
            next_attempt: at,
            attempts: 0,
            recipients: vec![QueueRecipient {
                address: "bob@remote.test".into(),
                state: RecipientState::Pending,
            }],
            client: "127.0.0.1".into(),
            warned: false,
            params: None,
        };
        store
            .accept_remote(&entry, b"Subject: x\r\n\r\nbody\r\n")
            .unwrap();
        entry
    }

    fn due(store: &Store) -> Vec<MessageId> {
        store
            .due(1_000, 10)
            .unwrap()
            .into_iter()
            .map(|e| e.id)
            .collect()
    }

    #[test]
    fn a_held_entry_is_never_due_until_released() {
        let (_dir, store) = open();
        let a = accepted(&store, 10);
        let b = accepted(&store, 20);
        assert!(store.hold(a.id, 50).unwrap());
        assert!(!store.hold(a.id, 50).unwrap(), "already held");
        assert_eq!(due(&store), [b.id]);
        assert_eq!(store.next_due_time().unwrap(), Some(20));
        assert_eq!(store.queue_len().unwrap(), 2, "held entries count");
        assert!(store.check().unwrap().problems.is_empty());

        // A round that ends while the entry is held leaves it unscheduled.
        let mut deferred = a.clone();
        deferred.attempts = 1;
        deferred.next_attempt = 30;
        deferred.recipients[0].state = RecipientState::Deferred {
            last_error: DeliveryDiagnostic::local("4.0.0", "later"),
        };
        store.settle_queue(&deferred, false, &[]).unwrap();
        store.update_queue(&deferred).unwrap();
        assert_eq!(due(&store), [b.id]);
        assert_eq!(
            store.reschedule(a.id, 5, true).unwrap(),
            Rescheduled::Held,
            "a flush leaves it held"
        );

        let items: Vec<QueueItem> = store.queue_items().map(Result::unwrap).collect();
        assert_eq!(items.len(), 2);
        assert!(items[0].held && !items[1].held);
        assert_eq!(items[0].entry, deferred);
        assert_eq!(items[0].size, 20);

        assert!(store.release(a.id, 5).unwrap());
        assert!(!store.release(a.id, 5).unwrap(), "not held any more");
        assert_eq!(due(&store), [a.id, b.id]);
        assert_eq!(store.queue_entry(a.id).unwrap().unwrap().attempts, 1);
        assert!(!store.queue_item(a.id).unwrap().unwrap().held);
    }

    #[test]
    fn the_end_of_a_held_entry_ends_its_hold() {
        let (_dir, store) = open();
        let a = accepted(&store, 10);
        let b = accepted(&store, 10);
        store.hold(a.id, 50).unwrap();
        store.hold(b.id, 50).unwrap();
        // Delivered in a round that ran when it was held.
        store.settle_queue(&a, true, &[]).unwrap();
        store.remove_queue(b.id).unwrap();
        assert_eq!(store.held_len(), 0);
        assert_eq!(store.queue_len().unwrap(), 0);
        assert!(matches!(
            store.hold(a.id, 50),
            Err(StoreError::NotFound { .. })
        ));
    }

    #[test]
    fn requeue_starts_the_schedule_again() {
        let (_dir, store) = open();
        let mut a = accepted(&store, 10);
        a.attempts = 3;
        a.warned = true;
        a.next_attempt = 900;
        store.update_queue(&a).unwrap();
        assert_eq!(due(&store), [a.id]);
        assert_eq!(store.reschedule(a.id, 20, true).unwrap(), Rescheduled::Done);
        let now = store.queue_entry(a.id).unwrap().unwrap();
        assert_eq!((now.next_attempt, now.attempts, now.warned), (20, 0, false));
        assert_eq!(store.due(15, 10).unwrap(), []);
        assert_eq!(due(&store), [a.id]);
        assert!(matches!(
            store.reschedule(MessageId(1), 20, false),
            Err(StoreError::NotFound { .. })
        ));
    }
}
