//! The sled [`Store`] behind the storage seam: every method does the
//! store's synchronous work in place (sled answers from memory; the one
//! wait, the group commit, is a future already). What a cluster backend
//! keeps in its database, one process keeps here in memory: queue leases
//! and maildrop locks, since no other process can open the same sled
//! database.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::{
    Claimed, Directory, History, Intake, Lease, Mailboxes, MaildropLock, Queue, Storage,
    StoreResult,
};
use crate::message::{Envelope, MessageId};
use crate::store::{
    LocalDelivery, MailEntry, Notice, QueueEntry, QueueItem, QuotaSetting, Rescheduled, StoreError,
    TraceEvent, TraceKind, TraceLimits, Usage,
};
use crate::Store;

/// The sled store as a [`Storage`]. Clones share everything (leases and
/// maildrop locks too); make one per store and share it.
#[derive(Clone)]
pub struct SledStorage {
    store: Store,
    leases: Arc<Mutex<HashMap<MessageId, Held>>>,
    tokens: Arc<AtomicU64>,
    maildrops: Arc<Mutex<HashSet<String>>>,
}

/// A live claim on a queue entry.
#[derive(Debug, Clone, Copy)]
struct Held {
    until: u64,
    token: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl SledStorage {
    /// Puts `store` behind the seam.
    pub fn new(store: Store) -> SledStorage {
        SledStorage {
            store,
            leases: Arc::default(),
            tokens: Arc::new(AtomicU64::new(1)),
            maildrops: Arc::default(),
        }
    }

    /// The store itself.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Whether `id` is under a lease live at `now`.
    fn leased(leases: &HashMap<MessageId, Held>, id: MessageId, now: u64) -> bool {
        leases.get(&id).is_some_and(|h| h.until > now)
    }
}

impl std::fmt::Debug for SledStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStorage")
            .field("path", &self.store.path())
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl Directory for SledStorage {
    async fn is_user(&self, address: &str) -> StoreResult<bool> {
        self.store.is_user(address)
    }
    async fn alias(&self, address: &str) -> StoreResult<Option<Vec<String>>> {
        self.store.alias(address)
    }
    async fn users(&self) -> StoreResult<Vec<String>> {
        self.store.users()
    }
    async fn aliases(&self) -> StoreResult<Vec<(String, Vec<String>)>> {
        self.store.aliases()
    }
    async fn add_user(&self, address: &str, password: &str) -> StoreResult<()> {
        self.store.add_user(address, password)
    }
    async fn set_password(&self, address: &str, password: &str) -> StoreResult<()> {
        self.store.set_password(address, password)
    }
    async fn delete_user(&self, address: &str) -> StoreResult<()> {
        self.store.delete_user(address)
    }
    async fn add_alias(&self, alias: &str, target: &str) -> StoreResult<()> {
        self.store.add_alias(alias, target)
    }
    async fn delete_alias(&self, alias: &str) -> StoreResult<()> {
        self.store.delete_alias(alias)
    }
    async fn password_hash(&self, address: &str) -> StoreResult<Option<String>> {
        self.store.password_hash(address)
    }
    async fn quota_setting(&self, address: &str) -> StoreResult<QuotaSetting> {
        self.store.quota_setting(address)
    }
    async fn set_quota(&self, address: &str, setting: QuotaSetting) -> StoreResult<()> {
        self.store.set_quota(address, setting)
    }
    async fn quota(&self, mailbox: &str) -> StoreResult<Option<u64>> {
        self.store.quota(mailbox)
    }
    async fn usage(&self, mailbox: &str) -> StoreResult<Usage> {
        self.store.usage(mailbox)
    }
    async fn is_full(&self, mailbox: &str) -> StoreResult<bool> {
        Ok(self.store.over_quota(mailbox)?.is_some())
    }
}

#[async_trait]
impl Intake for SledStorage {
    async fn new_id(&self) -> StoreResult<MessageId> {
        self.store.new_id()
    }
    async fn accept_local(
        &self,
        id: MessageId,
        content: &[u8],
        deliveries: &[LocalDelivery],
    ) -> StoreResult<()> {
        self.store.accept_local(id, content, deliveries)
    }
    async fn accept_remote(&self, entry: &QueueEntry, content: &[u8]) -> StoreResult<()> {
        self.store.accept_remote(entry, content)
    }
    async fn spool(&self, envelope: &Envelope, content: &[u8]) -> StoreResult<()> {
        self.store.spool(envelope, content)
    }
    async fn spool_bounce(
        &self,
        original: MessageId,
        bounce: &Envelope,
        content: &[u8],
    ) -> StoreResult<bool> {
        self.store.spool_bounce(original, bounce, content)
    }
    async fn inbound(&self) -> StoreResult<Vec<Envelope>> {
        self.store.inbound()
    }
    async fn content(&self, id: MessageId) -> StoreResult<Option<Bytes>> {
        self.store.content(id)
    }
    async fn deliver_local(&self, id: MessageId, deliveries: &[LocalDelivery]) -> StoreResult<()> {
        self.store.deliver_local(id, deliveries)
    }
    async fn enqueue(&self, entry: &QueueEntry) -> StoreResult<()> {
        self.store.enqueue(entry)
    }
    async fn finish_inbound(&self, id: MessageId) -> StoreResult<()> {
        self.store.finish_inbound(id)
    }
    async fn reject(&self, id: MessageId) {
        self.store.reject(id);
    }
    async fn durable(&self) -> StoreResult<()> {
        self.store.durable().await
    }
}

/// A maildrop lock of this process.
#[derive(Debug)]
struct SledMaildrop {
    mailbox: String,
    held: Arc<Mutex<HashSet<String>>>,
}

impl MaildropLock for SledMaildrop {
    fn mailbox(&self) -> &str {
        &self.mailbox
    }
}

impl Drop for SledMaildrop {
    fn drop(&mut self) {
        lock(&self.held).remove(&self.mailbox);
    }
}

#[async_trait]
impl Mailboxes for SledStorage {
    async fn maildrop(&self, mailbox: &str) -> StoreResult<Vec<MailEntry>> {
        self.store.maildrop(mailbox)
    }
    async fn read_mail(&self, mailbox: &str, key: u64) -> StoreResult<Option<Vec<u8>>> {
        self.store.read_mail(mailbox, key)
    }
    async fn delete_mail(&self, mailbox: &str, keys: &[u64]) -> StoreResult<usize> {
        self.store.delete_mail(mailbox, keys)
    }
    async fn lock_maildrop(
        &self,
        mailbox: &str,
        _node: &str,
    ) -> StoreResult<Option<Box<dyn MaildropLock>>> {
        let mailbox = crate::store::canonical_mailbox(mailbox)?;
        if !lock(&self.maildrops).insert(mailbox.clone()) {
            return Ok(None);
        }
        Ok(Some(Box::new(SledMaildrop {
            mailbox,
            held: self.maildrops.clone(),
        })))
    }
}

#[async_trait]
impl Queue for SledStorage {
    async fn claim_due(
        &self,
        now: u64,
        node: &str,
        lease: Duration,
        limit: usize,
    ) -> StoreResult<Vec<Claimed>> {
        let mut leases = lock(&self.leases);
        leases.retain(|_, h| h.until > now);
        // Entries under a lease are due too: ask for that many more.
        let due = self.store.due(now, limit.saturating_add(leases.len()))?;
        let until = now.saturating_add(lease.as_secs().max(1));
        let mut out = Vec::new();
        for entry in due {
            if out.len() >= limit {
                break;
            }
            if Self::leased(&leases, entry.id, now) {
                continue;
            }
            let token = self.tokens.fetch_add(1, Ordering::Relaxed);
            leases.insert(entry.id, Held { until, token });
            out.push(Claimed {
                lease: Lease {
                    id: entry.id,
                    node: node.to_owned(),
                    until,
                    token,
                },
                entry,
            });
        }
        Ok(out)
    }

    async fn claim(
        &self,
        id: MessageId,
        now: u64,
        node: &str,
        lease: Duration,
    ) -> StoreResult<Option<Claimed>> {
        let mut leases = lock(&self.leases);
        if Self::leased(&leases, id, now) || self.store.is_held(id)? {
            return Ok(None);
        }
        let Some(entry) = self.store.queue_entry(id)? else {
            return Ok(None);
        };
        let until = now.saturating_add(lease.as_secs().max(1));
        let token = self.tokens.fetch_add(1, Ordering::Relaxed);
        leases.insert(id, Held { until, token });
        Ok(Some(Claimed {
            lease: Lease {
                id,
                node: node.to_owned(),
                until,
                token,
            },
            entry,
        }))
    }

    async fn renew(&self, lease: &Lease, now: u64, extend: Duration) -> StoreResult<Lease> {
        let mut leases = lock(&self.leases);
        match leases.get_mut(&lease.id) {
            Some(h) if h.token == lease.token => {
                h.until = now.saturating_add(extend.as_secs().max(1));
                Ok(Lease {
                    until: h.until,
                    ..lease.clone()
                })
            }
            _ => Err(StoreError::LeaseLost { id: lease.id }),
        }
    }

    async fn unclaim(&self, lease: &Lease) -> StoreResult<()> {
        let mut leases = lock(&self.leases);
        if leases
            .get(&lease.id)
            .is_some_and(|h| h.token == lease.token)
        {
            leases.remove(&lease.id);
        }
        Ok(())
    }

    async fn settle(
        &self,
        lease: &Lease,
        entry: &QueueEntry,
        remove: bool,
        notices: &[Notice],
    ) -> StoreResult<()> {
        // Held across the write: a claim of the same entry waits for it.
        let mut leases = lock(&self.leases);
        if leases.get(&lease.id).is_none_or(|h| h.token != lease.token) {
            return Err(StoreError::LeaseLost { id: lease.id });
        }
        let settled = self.store.settle_queue(entry, remove, notices);
        if !matches!(settled, Err(StoreError::Sled(_))) {
            // Settled, or nothing left to settle: the claim is over. A
            // storage fault keeps it, to be retried or to expire.
            leases.remove(&lease.id);
        }
        settled
    }

    async fn queue_entry(&self, id: MessageId) -> StoreResult<Option<QueueEntry>> {
        self.store.queue_entry(id)
    }

    async fn queue_page(
        &self,
        after: Option<MessageId>,
        limit: usize,
    ) -> StoreResult<Vec<QueueItem>> {
        let mut out = Vec::new();
        for entry in self.store.queue_page(after, limit)? {
            if let Some(item) = self.store.queue_item(entry.id)? {
                out.push(item);
            }
        }
        Ok(out)
    }

    async fn queue_item(&self, id: MessageId) -> StoreResult<Option<QueueItem>> {
        self.store.queue_item(id)
    }

    async fn queue_len(&self) -> StoreResult<usize> {
        self.store.queue_len()
    }

    async fn oldest_queued(&self) -> StoreResult<Option<u64>> {
        self.store.oldest_queued()
    }

    async fn next_due_time(&self, now: u64) -> StoreResult<Option<u64>> {
        let leases = lock(&self.leases).clone();
        self.store
            .next_due_time_except(|id| Self::leased(&leases, id, now))
    }

    async fn queued_content(&self, id: MessageId) -> StoreResult<Option<Bytes>> {
        self.store.queued_content(id)
    }

    async fn update_queue(&self, entry: &QueueEntry) -> StoreResult<()> {
        self.store.update_queue(entry)
    }

    async fn remove_queue(&self, id: MessageId) -> StoreResult<()> {
        self.store.remove_queue(id)
    }

    async fn hold(&self, id: MessageId, now: u64) -> StoreResult<bool> {
        self.store.hold(id, now)
    }

    async fn release(&self, id: MessageId, at: u64) -> StoreResult<bool> {
        self.store.release(id, at)
    }

    async fn reschedule(&self, id: MessageId, at: u64, reset: bool) -> StoreResult<Rescheduled> {
        self.store.reschedule(id, at, reset)
    }

    async fn wait_for_work(&self) {
        // One process: whoever makes work tells the delivery actor itself.
        std::future::pending::<()>().await;
    }
}

#[async_trait]
impl History for SledStorage {
    async fn trace(&self, id: MessageId, at: u64, what: TraceKind) {
        self.store.trace_at(id, at, what);
    }
    async fn trace_new(&self, id: MessageId, at: u64, what: Vec<TraceKind>) {
        self.store.trace_new_at(id, at, what);
    }
    async fn history(&self, id: MessageId) -> StoreResult<Vec<TraceEvent>> {
        self.store.history(id)
    }
    async fn sweep_trace(&self, now: u64, keep: Duration) -> StoreResult<usize> {
        self.store.sweep_trace(now, keep)
    }
}

impl Storage for SledStorage {
    fn backend(&self) -> &'static str {
        "sled"
    }
    fn set_quota_policy(&self, default: Option<u64>, warning_percent: u8) {
        self.store.set_quota_policy(default, warning_percent);
    }
    fn set_trace_limits(&self, limits: TraceLimits) {
        self.store.set_trace_limits(limits);
    }
    fn mail_room(&self) -> Option<u64> {
        self.store.mail_room()
    }
    fn flush_blocking(&self) -> StoreResult<()> {
        self.store.flush_blocking()
    }
    fn as_sled(&self) -> Option<&Store> {
        Some(&self.store)
    }
}
