//! A message's history (`postino trace ID`): events in the `trace` tree,
//! keyed by message id BE ++ sequence BE, each a small bincode record.
//!
//! Events are written as plain inserts, never in a transaction of their
//! own and never awaited: they ride the next group commit of the mail
//! they describe, so a crash may lose the last events of a history (never
//! mail). The sequence is sled's id counter, which only grows, so the
//! events of a message read back in the order they were written.
//!
//! What intake knows when a message arrives (received, and each
//! recipient's route) is one record, [`Store::trace_new`]: a list of
//! events under sequence 0 with a one-octet suffix (a 17-octet key), so
//! the message's first history costs one insert, no prefix scan and no
//! sequence number. Later events are single records as above.
//!
//! Space is bounded twice: a message keeps at most
//! [`TraceLimits::max_events_per_message`] events (the last one kept says
//! the rest were dropped), and [`Store::sweep_trace`] drops events older
//! than [`TraceLimits::keep`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{decode, encode, Store, StoreError};
use crate::message::{now_unix, MessageId};

/// Default of `[trace] keep`.
pub const DEFAULT_TRACE_KEEP: Duration = Duration::from_secs(7 * 24 * 3600);
/// Default of `[trace] max_events_per_message`.
pub const DEFAULT_MAX_EVENTS_PER_MESSAGE: u64 = 100;

/// How long and how much history is kept (`[trace]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceLimits {
    /// Events older than this are dropped by [`Store::sweep_trace`].
    pub keep: Duration,
    /// Most events kept for one message; 0 keeps none (history off).
    pub max_events_per_message: u64,
}

impl Default for TraceLimits {
    fn default() -> Self {
        TraceLimits {
            keep: DEFAULT_TRACE_KEEP,
            max_events_per_message: DEFAULT_MAX_EVENTS_PER_MESSAGE,
        }
    }
}

/// The limits the store applies, set by [`Store::set_trace_limits`].
pub(super) struct Limits {
    max_events: AtomicU64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_events: AtomicU64::new(DEFAULT_MAX_EVENTS_PER_MESSAGE),
        }
    }
}

/// One event of a message's history: when (Unix seconds) and what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceEvent {
    /// Unix time, seconds.
    pub at: u64,
    /// What happened.
    pub what: TraceKind,
}

/// What happened to a message. New variants go at the end (bincode
/// records name variants by their index).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TraceKind {
    /// Accepted over SMTP (or made by postino: `client` is `local`).
    Received {
        client: String,
        helo: String,
        /// The reverse path; `None` is `<>`.
        sender: Option<String>,
        size: u64,
        /// TLS protocol and cipher, when the session used TLS.
        tls: Option<String>,
        /// The SASL user, when the client logged in.
        auth: Option<String>,
        /// The `Message-ID:` header, if any.
        message_id: Option<String>,
    },
    /// Where one recipient goes and why.
    Routed { recipient: String, route: String },
    /// One delivery attempt for one recipient: the exchanger tried (or
    /// `none`), what came of it (`sent`, `deferred`, `bounced`) and the
    /// reply or error.
    Attempt {
        recipient: String,
        relay: String,
        status: String,
        reply: String,
    },
    /// The message waits in the queue until this Unix time.
    Deferred { next_attempt: u64 },
    /// A bounce or delay notification about this message was made: its id.
    Notified {
        notification: MessageId,
        kind: String,
        to: String,
    },
    /// This message is a notification about `original`.
    About { original: MessageId },
    /// Left the delivery queue (every recipient done).
    Dequeued,
    /// [`TraceLimits::max_events_per_message`] reached: later events dropped.
    Truncated,
    /// Read by a POP3 client from this mailbox (`RETR`). No longer recorded
    /// (it made every read a write); kept so that records written with it
    /// still decode, as variants are numbered by position.
    Retrieved { mailbox: String },
    /// Deleted from this mailbox by a POP3 client (`DELE`, then `QUIT`).
    Deleted { mailbox: String },
}

fn key(id: MessageId, seq: u64) -> [u8; 16] {
    let mut k = [0; 16];
    k[..8].copy_from_slice(&id.0.to_be_bytes());
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// The key of a message's first events, written together by
/// [`Store::trace_new`]: before every single event's key (sequence 0, and
/// sled's ids start above 0), told apart by its length.
fn first_key(id: MessageId) -> [u8; 17] {
    let mut k = [0; 17];
    k[..8].copy_from_slice(&id.0.to_be_bytes());
    k[16] = 1;
    k
}

/// The events of one record: a list under a [`first_key`], else one.
fn decode_record(key: &[u8], value: &[u8]) -> Result<Vec<TraceEvent>, StoreError> {
    if key.len() == 17 {
        decode("trace", value)
    } else {
        decode("trace", value).map(|e| vec![e])
    }
}

impl Store {
    /// Sets the `[trace]` limits that [`Store::trace`] applies.
    pub fn set_trace_limits(&self, limits: TraceLimits) {
        self.inner
            .trace_limits
            .max_events
            .store(limits.max_events_per_message, Ordering::Relaxed);
    }

    /// Appends an event to the history of message `id`, now. A plain
    /// insert, not flushed (see the module docs); a failure is logged, not
    /// returned: history must never stop mail.
    pub fn trace(&self, id: MessageId, what: TraceKind) {
        self.trace_at(id, now_unix(), what);
    }

    /// Records the first events of a new message `id` (received, where each
    /// recipient goes) as one record: one insert, riding the next group
    /// commit like [`Store::trace`]. The record counts as one towards
    /// [`TraceLimits::max_events_per_message`] (it is at most one event per
    /// recipient and one more); with history off nothing is written.
    pub fn trace_new(&self, id: MessageId, what: Vec<TraceKind>) {
        self.trace_new_at(id, now_unix(), what);
    }

    /// [`Store::trace_new`] at a given time.
    pub fn trace_new_at(&self, id: MessageId, at: u64, what: Vec<TraceKind>) {
        let max = self.inner.trace_limits.max_events.load(Ordering::Relaxed);
        if max == 0 || what.is_empty() {
            return;
        }
        let events: Vec<TraceEvent> = what
            .into_iter()
            .map(|what| TraceEvent { at, what })
            .collect();
        let done = encode("trace", &events)
            .and_then(|record| Ok(self.inner.trace.insert(first_key(id), record)?));
        if let Err(error) = done {
            tracing::warn!(%id, %error, "cannot record a history event");
        }
    }

    /// [`Store::trace`] at a given time (tests inject it).
    pub fn trace_at(&self, id: MessageId, at: u64, what: TraceKind) {
        if let Err(error) = self.try_trace(id, at, what) {
            tracing::warn!(%id, %error, "cannot record a history event");
        }
    }

    fn try_trace(&self, id: MessageId, at: u64, what: TraceKind) -> Result<(), StoreError> {
        let max = self.inner.trace_limits.max_events.load(Ordering::Relaxed);
        if max == 0 {
            return Ok(());
        }
        let tree = &self.inner.trace;
        // Few events per message: counting them is a short prefix scan.
        let have = tree.scan_prefix(id.0.to_be_bytes()).keys().count() as u64;
        let what = match have {
            n if n + 1 < max => what,
            n if n + 1 == max => TraceKind::Truncated,
            _ => return Ok(()),
        };
        let seq = self.inner.db.generate_id()?;
        let record = encode("trace", &TraceEvent { at, what })?;
        tree.insert(key(id, seq), record)?;
        Ok(())
    }

    /// The history of message `id`, oldest first; empty when none is kept.
    pub fn history(&self, id: MessageId) -> Result<Vec<TraceEvent>, StoreError> {
        let mut events = Vec::new();
        for kv in self.inner.trace.scan_prefix(id.0.to_be_bytes()) {
            let (k, v) = kv?;
            events.extend(decode_record(&k, &v)?);
        }
        Ok(events)
    }

    /// Drops the events older than `keep` at Unix time `now`; returns how
    /// many. Walks the whole tree: run it now and then (the delivery
    /// actor does, hourly), not per message.
    pub fn sweep_trace(&self, now: u64, keep: Duration) -> Result<usize, StoreError> {
        let cutoff = now.saturating_sub(keep.as_secs());
        let mut removed = 0;
        for kv in self.inner.trace.iter() {
            let (k, v) = kv?;
            // An unreadable record is dropped too: nobody can show it. A
            // first record's events all have the same time.
            let old =
                decode_record(&k, &v).map_or(true, |e| e.first().is_none_or(|e| e.at < cutoff));
            if old {
                self.inner.trace.remove(k)?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routed(n: usize) -> TraceKind {
        TraceKind::Routed {
            recipient: format!("r{n}@localhost"),
            route: "mailbox".into(),
        }
    }

    #[test]
    fn events_read_back_in_order_per_message() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (a, b) = (store.new_id().unwrap(), store.new_id().unwrap());
        store.trace_at(a, 10, routed(1));
        store.trace_at(b, 11, routed(9));
        store.trace_at(a, 12, routed(2));
        let got = store.history(a).unwrap();
        assert_eq!(
            got,
            vec![
                TraceEvent {
                    at: 10,
                    what: routed(1)
                },
                TraceEvent {
                    at: 12,
                    what: routed(2)
                }
            ]
        );
        assert_eq!(store.history(b).unwrap().len(), 1);
        assert!(store.history(MessageId(u64::MAX)).unwrap().is_empty());
    }

    #[test]
    fn first_events_are_one_record_read_back_before_later_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (a, b) = (store.new_id().unwrap(), store.new_id().unwrap());
        store.trace_new(a, vec![routed(1), routed(2)]);
        store.trace_at(a, 5, routed(3));
        store.trace_new(b, vec![routed(9)]);
        let got: Vec<TraceKind> = store
            .history(a)
            .unwrap()
            .into_iter()
            .map(|e| e.what)
            .collect();
        assert_eq!(got, vec![routed(1), routed(2), routed(3)]);
        assert_eq!(store.history(b).unwrap().len(), 1);
        assert_eq!(
            store.inner.trace.len(),
            3,
            "one record for the first events"
        );
        // The sweep reads the list record too, and drops it once old.
        let later = now_unix() + 8 * 24 * 3600;
        assert_eq!(store.sweep_trace(later, DEFAULT_TRACE_KEEP).unwrap(), 3);
        assert!(store.history(a).unwrap().is_empty());
        // History off: nothing written.
        store.set_trace_limits(TraceLimits {
            keep: DEFAULT_TRACE_KEEP,
            max_events_per_message: 0,
        });
        store.trace_new(a, vec![routed(1)]);
        assert!(store.history(a).unwrap().is_empty());
    }

    #[test]
    fn a_message_keeps_at_most_its_limit_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.set_trace_limits(TraceLimits {
            keep: DEFAULT_TRACE_KEEP,
            max_events_per_message: 3,
        });
        let id = store.new_id().unwrap();
        for n in 0..10 {
            store.trace_at(id, 1, routed(n));
        }
        let got: Vec<TraceKind> = store
            .history(id)
            .unwrap()
            .into_iter()
            .map(|e| e.what)
            .collect();
        assert_eq!(got, vec![routed(0), routed(1), TraceKind::Truncated]);
    }

    #[test]
    fn the_sweep_drops_only_expired_events() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let day = 24 * 3600;
        let now = 100 * day;
        let (old, new) = (store.new_id().unwrap(), store.new_id().unwrap());
        store.trace_at(old, now - 8 * day, routed(1));
        store.trace_at(old, now - 6 * day, routed(2));
        store.trace_at(new, now - 1, routed(3));
        assert_eq!(store.sweep_trace(now, DEFAULT_TRACE_KEEP).unwrap(), 1);
        let left: Vec<TraceKind> = store
            .history(old)
            .unwrap()
            .into_iter()
            .map(|e| e.what)
            .collect();
        assert_eq!(left, vec![routed(2)]);
        assert_eq!(store.history(new).unwrap().len(), 1);
        // A week later, nothing is left.
        assert_eq!(
            store
                .sweep_trace(now + 7 * day, DEFAULT_TRACE_KEEP)
                .unwrap(),
            2
        );
        assert!(store.history(old).unwrap().is_empty());
        assert!(store.history(new).unwrap().is_empty());
    }
}
