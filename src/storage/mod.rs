//! The storage seam: what the actors need from a store, as async,
//! object-safe traits, so that a server holds one `Arc<dyn Storage>` and
//! does not care which backend is behind it.
//!
//! Two backends implement it: the embedded sled [`Store`](crate::Store)
//! ([`SledStorage`], the default and single-node fast path) and, in a
//! cluster of nodes sharing one database, PostgreSQL. The traits are
//! designed for the cluster from the start:
//!
//! - **Queue ids** come from the store ([`Intake::new_id`]): a sled
//!   counter, a database sequence; unique across nodes.
//! - **The delivery queue is claimed, not read**: [`Queue::claim_due`]
//!   hands out due entries with a [`Lease`] held by one node until it
//!   settles ([`Queue::settle`]) or the lease expires, after which another
//!   node may claim the entry again. A lease is checked when it is used: a
//!   node whose lease was taken over gets [`StoreError::LeaseLost`] and
//!   writes nothing.
//! - **The maildrop lock** (RFC 1939: one POP3 session per maildrop) is
//!   the store's ([`Mailboxes::lock_maildrop`]), held by whichever node
//!   serves the session; releasing is dropping the [`MaildropLock`].
//! - **Wake-ups**: [`Queue::wait_for_work`] resolves when another node may
//!   have made work (a backend may use `LISTEN/NOTIFY`); a single-process
//!   backend, where the actors already tell each other, never resolves it.
//! - **No snapshots**: every directory lookup asks the store, so a user
//!   added through any node is seen by every node at once. Routing stays a
//!   pure function over answers fetched beforehand, per recipient
//!   ([`crate::routing::decide_async`]).
//!
//! Every method answers the same promises as the sled store documents for
//! its namesake: a write is durable once [`Intake::durable`] resolves after
//! it (a backend that commits each write at once resolves it immediately);
//! any error is temporary from the client's point of view (4xx).
//!
//! Implementations check themselves against one suite,
//! `conformance` (feature `conformance`).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::message::{Envelope, MessageId};
pub use crate::store::{
    DeliveryDiagnostic, LocalDelivery, MailEntry, Notice, QueueEntry, QueueItem, QueueRecipient,
    QuotaSetting, RecipientState, Rescheduled, StoreError, TraceEvent, TraceKind, Usage,
};

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
mod sled;
#[cfg(test)]
mod tests;

pub use self::sled::SledStorage;

/// Result of every storage call.
pub type StoreResult<T> = Result<T, StoreError>;

/// Users, aliases, passwords and quotas.
#[async_trait]
pub trait Directory: Send + Sync {
    /// Whether a mailbox exists for this address (canonicalised: case of
    /// the address does not matter).
    async fn is_user(&self, address: &str) -> StoreResult<bool>;
    /// The targets of an alias, if `address` is one.
    async fn alias(&self, address: &str) -> StoreResult<Option<Vec<String>>>;
    /// Every user, sorted.
    async fn users(&self) -> StoreResult<Vec<String>>;
    /// Every alias with its targets, sorted by alias.
    async fn aliases(&self) -> StoreResult<Vec<(String, Vec<String>)>>;
    /// Adds a user with this password (hashed with argon2id here).
    ///
    /// # Errors
    /// [`StoreError::UserExists`], [`StoreError::InvalidAddress`].
    async fn add_user(&self, address: &str, password: &str) -> StoreResult<()>;
    /// Replaces a user's password. [`StoreError::NoSuchUser`] if none.
    async fn set_password(&self, address: &str, password: &str) -> StoreResult<()>;
    /// Removes a user (their mailbox with it). [`StoreError::NoSuchUser`] if none.
    async fn delete_user(&self, address: &str) -> StoreResult<()>;
    /// Adds `target` to the targets of `alias`; [`StoreError::AliasLoop`]
    /// if it would lead back to `alias`.
    async fn add_alias(&self, alias: &str, target: &str) -> StoreResult<()>;
    /// Removes an alias. [`StoreError::NoSuchAlias`] if none.
    async fn delete_alias(&self, alias: &str) -> StoreResult<()>;
    /// The stored password hash (PHC string) of a user, `None` if there is
    /// no such user. Checking a password against it is CPU work done by
    /// the caller ([`crate::store::verify_password_hash`]), never by the
    /// store.
    async fn password_hash(&self, address: &str) -> StoreResult<Option<String>>;
    /// A user's quota setting.
    async fn quota_setting(&self, address: &str) -> StoreResult<QuotaSetting>;
    /// Sets a user's quota. [`StoreError::NoSuchUser`] if none.
    async fn set_quota(&self, address: &str, setting: QuotaSetting) -> StoreResult<()>;
    /// The quota that applies to a mailbox in octets (the user's, else the
    /// default set with [`Storage::set_quota_policy`]); `None`: unlimited.
    async fn quota(&self, mailbox: &str) -> StoreResult<Option<u64>>;
    /// Messages and octets in a mailbox.
    async fn usage(&self, mailbox: &str) -> StoreResult<Usage>;
    /// Whether a mailbox is at or over its quota: new mail is refused.
    async fn is_full(&self, mailbox: &str) -> StoreResult<bool>;
}

/// Accepting messages: the 250 after DATA is earned here.
#[async_trait]
pub trait Intake: Send + Sync {
    /// A fresh queue id, unique across the nodes sharing this store and
    /// never repeated (even after a crash).
    async fn new_id(&self) -> StoreResult<MessageId>;
    /// Stores a message that goes only to local mailboxes, all or nothing.
    /// Durable once [`Intake::durable`] resolves after it.
    ///
    /// # Errors
    /// [`StoreError::Duplicate`] if the id is in use,
    /// [`StoreError::InvalidAddress`] for a bad mailbox name.
    async fn accept_local(
        &self,
        id: MessageId,
        content: &[u8],
        deliveries: &[LocalDelivery],
    ) -> StoreResult<()>;
    /// Stores a message that goes only to remote recipients straight into
    /// the delivery queue, due at `entry.next_attempt`.
    async fn accept_remote(&self, entry: &QueueEntry, content: &[u8]) -> StoreResult<()>;
    /// Stores an accepted message in the intake spool, to be dispatched
    /// ([`Intake::inbound`]). [`StoreError::Duplicate`] if the id is in use.
    async fn spool(&self, envelope: &Envelope, content: &[u8]) -> StoreResult<()>;
    /// Spools a bounce about `original` once: false (nothing spooled) if
    /// one was spooled already. [`StoreError::NotFound`] if `original` is
    /// not inbound.
    async fn spool_bounce(
        &self,
        original: MessageId,
        bounce: &Envelope,
        content: &[u8],
    ) -> StoreResult<bool>;
    /// Envelopes of spooled messages not yet finished, in id order.
    async fn inbound(&self) -> StoreResult<Vec<Envelope>>;
    /// The content of a spooled message, if still stored.
    async fn content(&self, id: MessageId) -> StoreResult<Option<Bytes>>;
    /// Delivers a spooled message to local mailboxes; idempotent per
    /// (mailbox, id). [`StoreError::NotFound`] if not inbound.
    async fn deliver_local(&self, id: MessageId, deliveries: &[LocalDelivery]) -> StoreResult<()>;
    /// Queues a spooled message for remote delivery; idempotent per id.
    /// [`StoreError::NotFound`] if not inbound.
    async fn enqueue(&self, entry: &QueueEntry) -> StoreResult<()>;
    /// Ends dispatch of a spooled message; repeating it does nothing.
    async fn finish_inbound(&self, id: MessageId) -> StoreResult<()>;
    /// Marks a message that was written but then answered 4xx (its commit
    /// failed): it must never be delivered. Best effort.
    async fn reject(&self, id: MessageId);
    /// Resolves once every write made before the call is durable. Many
    /// callers may share one commit (group commit).
    async fn durable(&self) -> StoreResult<()>;
}

/// A held maildrop lock (RFC 1939 §8). Dropping it releases the lock; a
/// backend whose release needs IO does it in the background.
pub trait MaildropLock: Send + Sync + fmt::Debug {
    /// The (canonical) mailbox this locks.
    fn mailbox(&self) -> &str;
}

/// Local mailboxes, as POP3 reads them.
#[async_trait]
pub trait Mailboxes: Send + Sync {
    /// The messages in a mailbox, oldest first; an unknown mailbox is
    /// empty. [`MailEntry::uidl`] is the same on every node and across
    /// restarts.
    async fn maildrop(&self, mailbox: &str) -> StoreResult<Vec<MailEntry>>;
    /// Prefix plus content of one entry; `None` if deleted meanwhile.
    async fn read_mail(&self, mailbox: &str, key: u64) -> StoreResult<Option<Vec<u8>>>;
    /// Deletes entries, all or none; keys not there are skipped. Returns
    /// how many were deleted.
    async fn delete_mail(&self, mailbox: &str, keys: &[u64]) -> StoreResult<usize>;
    /// Takes the exclusive maildrop lock for `mailbox` on behalf of
    /// `node`; `None` if someone (on any node) holds it.
    async fn lock_maildrop(
        &self,
        mailbox: &str,
        node: &str,
    ) -> StoreResult<Option<Box<dyn MaildropLock>>>;
    /// Releases a maildrop lock and returns once it is released (the next
    /// [`Mailboxes::lock_maildrop`] on any node gets it). Dropping the lock
    /// releases it too, but a backend may finish that in the background.
    async fn unlock_maildrop(&self, lock: Box<dyn MaildropLock>) {
        drop(lock);
    }
}

/// A node's claim on a queue entry, from [`Queue::claim_due`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The entry claimed.
    pub id: MessageId,
    /// The node holding it.
    pub node: String,
    /// Unix seconds after which another node may claim the entry again.
    pub until: u64,
    /// Tells this claim from any other claim of the same entry.
    pub token: u64,
}

/// A queue entry claimed for one delivery round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    /// The entry as it was when claimed.
    pub entry: QueueEntry,
    /// The claim; pass it to [`Queue::settle`].
    pub lease: Lease,
}

/// The remote delivery queue.
#[async_trait]
pub trait Queue: Send + Sync {
    /// Claims up to `limit` entries due at `now` (earliest first) that no
    /// live lease holds, for `node`, each until `now + lease`. A held entry
    /// is never due. An entry whose lease expired is claimable again.
    async fn claim_due(
        &self,
        now: u64,
        node: &str,
        lease: Duration,
        limit: usize,
    ) -> StoreResult<Vec<Claimed>>;
    /// Claims one entry for `node` until `now + lease`, due or not (mail
    /// just queued, to be tried at once; an administrator's bounce).
    /// `None` if it is not queued, is held, or a live lease holds it.
    async fn claim(
        &self,
        id: MessageId,
        now: u64,
        node: &str,
        lease: Duration,
    ) -> StoreResult<Option<Claimed>>;
    /// Extends a lease to `now + lease` (a long round).
    /// [`StoreError::LeaseLost`] if it is no longer ours.
    async fn renew(&self, lease: &Lease, now: u64, extend: Duration) -> StoreResult<Lease>;
    /// [`Queue::renew`] for each of `leases`, in as few round trips as the
    /// backend can (one statement on PostgreSQL: a node renews all it
    /// holds, up to the delivery actor's in-flight limit, well within a
    /// short lease). Returns the leases still ours, renewed; one left out
    /// was taken over.
    async fn renew_all(
        &self,
        leases: &[Lease],
        now: u64,
        extend: Duration,
    ) -> StoreResult<Vec<Lease>> {
        let mut out = Vec::with_capacity(leases.len());
        for lease in leases {
            match self.renew(lease, now, extend).await {
                Ok(renewed) => out.push(renewed),
                Err(StoreError::LeaseLost { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }
    /// Gives a claim back without a round (shutting down): the entry is
    /// due as it was. Not ours any more: nothing happens.
    async fn unclaim(&self, lease: &Lease) -> StoreResult<()>;
    /// Ends a delivery round in one transaction and releases the lease:
    /// spools `notices` and either records `entry` or, with `remove`,
    /// removes it.
    ///
    /// # Errors
    /// [`StoreError::LeaseLost`] if the lease was taken over (nothing is
    /// written), [`StoreError::NotFound`] if the entry is gone.
    async fn settle(
        &self,
        lease: &Lease,
        entry: &QueueEntry,
        remove: bool,
        notices: &[Notice],
    ) -> StoreResult<()>;
    /// One entry, claimed or not.
    async fn queue_entry(&self, id: MessageId) -> StoreResult<Option<QueueEntry>>;
    /// Up to `limit` entries with ids above `after`, in id order, with hold
    /// state and size: one page of `postino queue list`.
    async fn queue_page(
        &self,
        after: Option<MessageId>,
        limit: usize,
    ) -> StoreResult<Vec<QueueItem>>;
    /// One entry with its hold state and size.
    async fn queue_item(&self, id: MessageId) -> StoreResult<Option<QueueItem>>;
    /// Entries in the queue (held ones included).
    async fn queue_len(&self) -> StoreResult<usize>;
    /// When the oldest queued message arrived.
    async fn oldest_queued(&self) -> StoreResult<Option<u64>>;
    /// When the earliest entry not under a live lease is due.
    async fn next_due_time(&self, now: u64) -> StoreResult<Option<u64>>;
    /// The content of a queued message.
    async fn queued_content(&self, id: MessageId) -> StoreResult<Option<Bytes>>;
    /// Rewrites an entry outside a round (administration: bounce, expire).
    /// [`StoreError::NotFound`] if it is not queued.
    async fn update_queue(&self, entry: &QueueEntry) -> StoreResult<()>;
    /// Removes an entry outside a round (`postino queue delete`).
    async fn remove_queue(&self, id: MessageId) -> StoreResult<()>;
    /// Puts an entry on hold; false if it was held already.
    async fn hold(&self, id: MessageId, now: u64) -> StoreResult<bool>;
    /// Releases a held entry, due at `at`; false if it was not held.
    async fn release(&self, id: MessageId, at: u64) -> StoreResult<bool>;
    /// Makes an entry due at `at` (with `reset`, as if never tried).
    async fn reschedule(&self, id: MessageId, at: u64, reset: bool) -> StoreResult<Rescheduled>;
    /// Resolves when another node may have queued, released or given up
    /// work. A single-process backend never resolves it (the actors of the
    /// one process tell each other); callers race it with their own timer.
    async fn wait_for_work(&self);
}

/// Each message's history (`postino trace`).
#[async_trait]
pub trait History: Send + Sync {
    /// Records an event; best effort (a failure is logged, never returned:
    /// history must not fail mail).
    async fn trace(&self, id: MessageId, at: u64, what: TraceKind);
    /// Records the first events of a new message (received, where each
    /// recipient goes) together, at intake: a backend may write them as
    /// one record (sled does: one insert instead of one per event). The
    /// default records each with [`History::trace`].
    async fn trace_new(&self, id: MessageId, at: u64, what: Vec<TraceKind>) {
        for what in what {
            self.trace(id, at, what).await;
        }
    }
    /// Every event of a message, oldest first.
    async fn history(&self, id: MessageId) -> StoreResult<Vec<TraceEvent>>;
    /// Removes histories older than `keep`; returns how many events went.
    async fn sweep_trace(&self, now: u64, keep: Duration) -> StoreResult<usize>;
}

/// Everything a server needs from its store. Actors hold an
/// `Arc<dyn Storage>`.
pub trait Storage: Directory + Intake + Mailboxes + Queue + History {
    /// The backend's name, for logs and `postino status` (`sled`, `postgres`).
    fn backend(&self) -> &'static str;
    /// Sets the default quota and the warning threshold (`[mailbox]`),
    /// which the store applies to every mailbox without a quota of its own.
    fn set_quota_policy(&self, default: Option<u64>, warning_percent: u8);
    /// Sets the `[trace]` limits.
    fn set_trace_limits(&self, limits: crate::store::TraceLimits);
    /// Free bytes new mail may take before the store's free-space reserve
    /// (`452 4.3.1` to `MAIL` at 0, or when the declared `SIZE` is larger).
    /// Backends without a local disk answer `None`: no limit known.
    fn mail_room(&self) -> Option<u64> {
        None
    }
    /// Makes everything written so far durable, from outside async code
    /// (shutdown). The default does nothing (a backend that commits each
    /// write).
    fn flush_blocking(&self) -> StoreResult<()> {
        Ok(())
    }
    /// The sled store behind this, for the tools that only make sense on
    /// one (`store check/compact/export`, the free-space watch).
    fn as_sled(&self) -> Option<&crate::Store> {
        None
    }
}

/// Shared handle to a storage, as the actors hold it.
pub type SharedStorage = Arc<dyn Storage>;
