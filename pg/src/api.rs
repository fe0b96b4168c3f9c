//! [`PgStore`]'s async API: each call moves its arguments onto the
//! store's runtime and waits for the answer there (see the crate docs,
//! "Runtime"). The storage seam's traits are implemented on top of these
//! (`storage.rs`).

use std::time::Duration;

use bytes::Bytes;
use postino_core::message::{Envelope, MessageId};
use postino_core::store::{
    LocalDelivery, MailEntry, Notice, QueueEntry, QueueItem, QuotaSetting, Rescheduled, StoreError,
    TraceEvent, TraceKind, Usage,
};

use crate::mailbox::PgMaildropLock;
use crate::PgStore;
use postino_core::storage::Lease as Claim;

type Result<T> = std::result::Result<T, StoreError>;

#[allow(missing_docs)] // Each is documented on the storage seam's trait.
impl PgStore {
    pub async fn is_user(&self, address: &str) -> Result<bool> {
        let a = address.to_owned();
        self.run(|db| async move { db.is_user(&a).await }).await
    }
    pub async fn alias(&self, address: &str) -> Result<Option<Vec<String>>> {
        let a = address.to_owned();
        self.run(|db| async move { db.alias(&a).await }).await
    }
    pub async fn users(&self) -> Result<Vec<String>> {
        self.run(|db| async move { db.users().await }).await
    }
    pub async fn aliases(&self) -> Result<Vec<(String, Vec<String>)>> {
        self.run(|db| async move { db.aliases().await }).await
    }
    pub async fn add_user(&self, address: &str, password: &str) -> Result<()> {
        let (a, p) = (address.to_owned(), password.to_owned());
        self.run(|db| async move { db.add_user(&a, &p).await })
            .await
    }
    pub async fn set_password(&self, address: &str, password: &str) -> Result<()> {
        let (a, p) = (address.to_owned(), password.to_owned());
        self.run(|db| async move { db.set_password(&a, &p).await })
            .await
    }
    pub async fn delete_user(&self, address: &str) -> Result<()> {
        let a = address.to_owned();
        self.run(|db| async move { db.delete_user(&a).await }).await
    }
    pub async fn add_alias(&self, alias: &str, target: &str) -> Result<()> {
        let (a, t) = (alias.to_owned(), target.to_owned());
        self.run(|db| async move { db.add_alias(&a, &t).await })
            .await
    }
    pub async fn delete_alias(&self, alias: &str) -> Result<()> {
        let a = alias.to_owned();
        self.run(|db| async move { db.delete_alias(&a).await })
            .await
    }
    pub async fn password_hash(&self, address: &str) -> Result<Option<String>> {
        let a = address.to_owned();
        self.run(|db| async move { db.password_hash(&a).await })
            .await
    }
    pub async fn quota_setting(&self, address: &str) -> Result<QuotaSetting> {
        let a = address.to_owned();
        self.run(|db| async move { db.quota_setting(&a).await })
            .await
    }
    pub async fn set_quota(&self, address: &str, setting: QuotaSetting) -> Result<()> {
        let a = address.to_owned();
        self.run(|db| async move { db.set_quota(&a, setting).await })
            .await
    }
    pub async fn quota(&self, mailbox: &str) -> Result<Option<u64>> {
        let m = mailbox.to_owned();
        self.run(|db| async move { db.quota(&m).await }).await
    }
    pub async fn usage(&self, mailbox: &str) -> Result<Usage> {
        let m = mailbox.to_owned();
        self.run(|db| async move { db.usage(&m).await }).await
    }
    pub async fn is_full(&self, mailbox: &str) -> Result<bool> {
        let m = mailbox.to_owned();
        self.run(|db| async move { db.is_full(&m).await }).await
    }
    pub fn set_quota_policy(&self, default: Option<u64>) {
        self.inner.db.set_quota_policy(default);
    }

    pub async fn new_id(&self) -> Result<MessageId> {
        self.run(|db| async move { db.new_id().await }).await
    }
    pub async fn accept_local(
        &self,
        id: MessageId,
        content: &[u8],
        deliveries: &[LocalDelivery],
    ) -> Result<()> {
        let (c, d) = (Bytes::copy_from_slice(content), deliveries.to_vec());
        self.run(|db| async move { db.accept_local(id, c, d).await })
            .await
    }
    pub async fn accept_remote(&self, entry: &QueueEntry, content: &[u8]) -> Result<()> {
        let (e, c) = (entry.clone(), Bytes::copy_from_slice(content));
        self.run(|db| async move { db.accept_remote(&e, c).await })
            .await
    }
    pub async fn spool(&self, envelope: &Envelope, content: &[u8]) -> Result<()> {
        let (e, c) = (envelope.clone(), Bytes::copy_from_slice(content));
        self.run(|db| async move { db.spool(&e, c).await }).await
    }
    pub async fn spool_bounce(
        &self,
        original: MessageId,
        bounce: &Envelope,
        content: &[u8],
    ) -> Result<bool> {
        let (e, c) = (bounce.clone(), content.to_vec());
        self.run(|db| async move { db.spool_bounce(original, &e, &c).await })
            .await
    }
    pub async fn inbound(&self) -> Result<Vec<Envelope>> {
        self.run(|db| async move { db.inbound().await }).await
    }
    pub async fn content(&self, id: MessageId) -> Result<Option<Bytes>> {
        self.run(|db| async move { db.content(id).await }).await
    }
    pub async fn deliver_local(&self, id: MessageId, deliveries: &[LocalDelivery]) -> Result<()> {
        let d = deliveries.to_vec();
        self.run(|db| async move { db.deliver_local(id, &d).await })
            .await
    }
    pub async fn enqueue(&self, entry: &QueueEntry) -> Result<()> {
        let e = entry.clone();
        self.run(|db| async move { db.enqueue(&e).await }).await
    }
    pub async fn finish_inbound(&self, id: MessageId) -> Result<()> {
        self.run(|db| async move { db.finish_inbound(id).await })
            .await
    }
    pub async fn reject(&self, id: MessageId) {
        if let Err(error) = self.run(|db| async move { db.reject(id).await }).await {
            tracing::warn!(%id, %error, "cannot remove a message answered 4xx");
        }
    }

    pub async fn maildrop(&self, mailbox: &str) -> Result<Vec<MailEntry>> {
        let m = mailbox.to_owned();
        self.run(|db| async move { db.maildrop(&m).await }).await
    }
    pub async fn read_mail(&self, mailbox: &str, key: u64) -> Result<Option<Vec<u8>>> {
        let m = mailbox.to_owned();
        self.run(|db| async move { db.read_mail(&m, key).await })
            .await
    }
    pub async fn delete_mail(&self, mailbox: &str, keys: &[u64]) -> Result<usize> {
        let (m, k) = (mailbox.to_owned(), keys.to_vec());
        self.run(|db| async move { db.delete_mail(&m, &k).await })
            .await
    }
    /// The cluster-wide maildrop lock of `mailbox`; `None` if any node's
    /// session holds it.
    pub async fn lock_maildrop(&self, mailbox: &str) -> Result<Option<PgMaildropLock>> {
        let m = mailbox.to_owned();
        self.run(|db| async move { db.lock_maildrop(&m).await })
            .await
    }

    pub async fn claim_due(
        &self,
        now: u64,
        node: &str,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<(QueueEntry, Claim)>> {
        let n = node.to_owned();
        self.run(|db| async move { db.claim_due(now, &n, lease, limit).await })
            .await
    }
    pub async fn claim(
        &self,
        id: MessageId,
        now: u64,
        node: &str,
        lease: Duration,
    ) -> Result<Option<(QueueEntry, Claim)>> {
        let n = node.to_owned();
        self.run(|db| async move { db.claim(id, now, &n, lease).await })
            .await
    }
    pub async fn renew(&self, claim: &Claim, now: u64, extend: Duration) -> Result<Claim> {
        let c = claim.clone();
        self.run(|db| async move { db.renew(&c, now, extend).await })
            .await
    }
    pub async fn renew_all(
        &self,
        claims: &[Claim],
        now: u64,
        extend: Duration,
    ) -> Result<Vec<Claim>> {
        let c = claims.to_vec();
        self.run(|db| async move { db.renew_all(&c, now, extend).await })
            .await
    }
    pub async fn unclaim(&self, claim: &Claim) -> Result<()> {
        let c = claim.clone();
        self.run(|db| async move { db.unclaim(&c).await }).await
    }
    pub async fn settle(
        &self,
        claim: &Claim,
        entry: &QueueEntry,
        remove: bool,
        notices: &[Notice],
    ) -> Result<()> {
        let (c, e, n) = (claim.clone(), entry.clone(), notices.to_vec());
        self.run(|db| async move { db.settle(&c, &e, remove, &n).await })
            .await
    }
    pub async fn queue_entry(&self, id: MessageId) -> Result<Option<QueueEntry>> {
        self.run(|db| async move { db.queue_entry(id).await }).await
    }
    pub async fn queue_page(
        &self,
        after: Option<MessageId>,
        limit: usize,
    ) -> Result<Vec<QueueItem>> {
        self.run(|db| async move { db.queue_page(after, limit, None).await })
            .await
    }
    pub async fn queue_item(&self, id: MessageId) -> Result<Option<QueueItem>> {
        let after = id.0.checked_sub(1).map(MessageId);
        self.run(|db| async move { Ok(db.queue_page(after, 1, Some(id)).await?.pop()) })
            .await
    }
    pub async fn queue_len(&self) -> Result<usize> {
        self.run(|db| async move { db.queue_len().await }).await
    }
    pub async fn oldest_queued(&self) -> Result<Option<u64>> {
        self.run(|db| async move { db.oldest_queued().await }).await
    }
    pub async fn next_due_time(&self, now: u64) -> Result<Option<u64>> {
        self.run(|db| async move { db.next_due_time(now).await })
            .await
    }
    pub async fn queued_content(&self, id: MessageId) -> Result<Option<Bytes>> {
        self.run(|db| async move { db.queued_content(id).await })
            .await
    }
    pub async fn update_queue(&self, entry: &QueueEntry) -> Result<()> {
        let e = entry.clone();
        self.run(|db| async move { db.update_queue(&e).await })
            .await
    }
    pub async fn remove_queue(&self, id: MessageId) -> Result<()> {
        self.run(|db| async move { db.remove_queue(id).await })
            .await
    }
    pub async fn hold(&self, id: MessageId, now: u64) -> Result<bool> {
        self.run(|db| async move { db.hold(id, now).await }).await
    }
    pub async fn release(&self, id: MessageId, at: u64) -> Result<bool> {
        self.run(|db| async move { db.release(id, at).await }).await
    }
    pub async fn reschedule(&self, id: MessageId, at: u64, reset: bool) -> Result<Rescheduled> {
        self.run(|db| async move { db.reschedule(id, at, reset).await })
            .await
    }
    /// Resolves when a node queued, released or gave back work
    /// (`NOTIFY postino_queue`), or the listening connection was made
    /// again (notifications may have been missed).
    pub async fn wait_for_work(&self) {
        let queue = self.inner.db.notify.queue.clone();
        queue.notified().await;
    }
    /// Resolves when users or aliases changed on any node.
    pub async fn wait_for_users(&self) {
        let users = self.inner.db.notify.users.clone();
        users.notified().await;
    }

    pub fn trace(&self, id: MessageId, at: u64, what: TraceKind) {
        self.inner.db.trace(id, at, what);
    }
    pub async fn history(&self, id: MessageId) -> Result<Vec<TraceEvent>> {
        self.run(|db| async move { db.history(id).await }).await
    }
    pub async fn sweep_trace(&self, now: u64, keep: Duration) -> Result<usize> {
        self.run(|db| async move { db.sweep_trace(now, keep).await })
            .await
    }
    pub fn set_trace_limits(&self, max_events_per_message: u64) {
        self.inner
            .db
            .trace_max
            .store(max_events_per_message, std::sync::atomic::Ordering::Relaxed);
    }
}
