//! The storage seam (`postino_core::storage`) implemented by [`PgStore`]:
//! each method is the store's own (`api.rs`).

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use postino_core::message::{Envelope, MessageId};
use postino_core::storage::{
    Claimed, Directory, History, Intake, Lease, Mailboxes, MaildropLock, Queue, Storage,
    StoreResult,
};
use postino_core::store::{
    LocalDelivery, MailEntry, Notice, QueueEntry, QueueItem, QuotaSetting, Rescheduled, TraceEvent,
    TraceKind, TraceLimits, Usage,
};

use crate::PgStore;

#[async_trait]
impl Directory for PgStore {
    async fn is_user(&self, address: &str) -> StoreResult<bool> {
        PgStore::is_user(self, address).await
    }
    async fn alias(&self, address: &str) -> StoreResult<Option<Vec<String>>> {
        PgStore::alias(self, address).await
    }
    async fn users(&self) -> StoreResult<Vec<String>> {
        PgStore::users(self).await
    }
    async fn aliases(&self) -> StoreResult<Vec<(String, Vec<String>)>> {
        PgStore::aliases(self).await
    }
    async fn add_user(&self, address: &str, password: &str) -> StoreResult<()> {
        PgStore::add_user(self, address, password).await
    }
    async fn set_password(&self, address: &str, password: &str) -> StoreResult<()> {
        PgStore::set_password(self, address, password).await
    }
    async fn delete_user(&self, address: &str) -> StoreResult<()> {
        PgStore::delete_user(self, address).await
    }
    async fn add_alias(&self, alias: &str, target: &str) -> StoreResult<()> {
        PgStore::add_alias(self, alias, target).await
    }
    async fn delete_alias(&self, alias: &str) -> StoreResult<()> {
        PgStore::delete_alias(self, alias).await
    }
    async fn password_hash(&self, address: &str) -> StoreResult<Option<String>> {
        PgStore::password_hash(self, address).await
    }
    async fn quota_setting(&self, address: &str) -> StoreResult<QuotaSetting> {
        PgStore::quota_setting(self, address).await
    }
    async fn set_quota(&self, address: &str, setting: QuotaSetting) -> StoreResult<()> {
        PgStore::set_quota(self, address, setting).await
    }
    async fn quota(&self, mailbox: &str) -> StoreResult<Option<u64>> {
        PgStore::quota(self, mailbox).await
    }
    async fn usage(&self, mailbox: &str) -> StoreResult<Usage> {
        PgStore::usage(self, mailbox).await
    }
    async fn is_full(&self, mailbox: &str) -> StoreResult<bool> {
        PgStore::is_full(self, mailbox).await
    }
}

#[async_trait]
impl Intake for PgStore {
    async fn new_id(&self) -> StoreResult<MessageId> {
        PgStore::new_id(self).await
    }
    async fn accept_local(
        &self,
        id: MessageId,
        content: &[u8],
        deliveries: &[LocalDelivery],
    ) -> StoreResult<()> {
        PgStore::accept_local(self, id, content, deliveries).await
    }
    async fn accept_remote(&self, entry: &QueueEntry, content: &[u8]) -> StoreResult<()> {
        PgStore::accept_remote(self, entry, content).await
    }
    async fn spool(&self, envelope: &Envelope, content: &[u8]) -> StoreResult<()> {
        PgStore::spool(self, envelope, content).await
    }
    async fn spool_bounce(
        &self,
        original: MessageId,
        bounce: &Envelope,
        content: &[u8],
    ) -> StoreResult<bool> {
        PgStore::spool_bounce(self, original, bounce, content).await
    }
    async fn inbound(&self) -> StoreResult<Vec<Envelope>> {
        PgStore::inbound(self).await
    }
    async fn content(&self, id: MessageId) -> StoreResult<Option<Bytes>> {
        PgStore::content(self, id).await
    }
    async fn deliver_local(&self, id: MessageId, deliveries: &[LocalDelivery]) -> StoreResult<()> {
        PgStore::deliver_local(self, id, deliveries).await
    }
    async fn enqueue(&self, entry: &QueueEntry) -> StoreResult<()> {
        PgStore::enqueue(self, entry).await
    }
    async fn finish_inbound(&self, id: MessageId) -> StoreResult<()> {
        PgStore::finish_inbound(self, id).await
    }
    async fn reject(&self, id: MessageId) {
        PgStore::reject(self, id).await
    }
    /// Every intake write returned after its commit; this waits for the
    /// history events sent before it (a batch of nothing else costs no
    /// transaction).
    async fn durable(&self) -> StoreResult<()> {
        self.run(|db| async move { db.commit.barrier().await })
            .await
    }
}

#[async_trait]
impl Mailboxes for PgStore {
    async fn maildrop(&self, mailbox: &str) -> StoreResult<Vec<MailEntry>> {
        PgStore::maildrop(self, mailbox).await
    }
    async fn read_mail(&self, mailbox: &str, key: u64) -> StoreResult<Option<Vec<u8>>> {
        PgStore::read_mail(self, mailbox, key).await
    }
    async fn delete_mail(&self, mailbox: &str, keys: &[u64]) -> StoreResult<usize> {
        PgStore::delete_mail(self, mailbox, keys).await
    }
    async fn lock_maildrop(
        &self,
        mailbox: &str,
        _node: &str,
    ) -> StoreResult<Option<Box<dyn MaildropLock>>> {
        Ok(PgStore::lock_maildrop(self, mailbox)
            .await?
            .map(|l| Box::new(l) as Box<dyn MaildropLock>))
    }
    /// Drops the lock, then waits for its release (`pg_advisory_unlock`).
    async fn unlock_maildrop(&self, lock: Box<dyn MaildropLock>) {
        let mailbox = lock.mailbox().to_owned();
        drop(lock);
        let unlocking = self.inner.db.unlocking.clone();
        let _ = self
            .run(|_| async move {
                crate::mailbox::unlocked(&unlocking, &mailbox).await;
                Ok(())
            })
            .await;
    }
}

#[async_trait]
impl Queue for PgStore {
    async fn claim_due(
        &self,
        now: u64,
        node: &str,
        lease: Duration,
        limit: usize,
    ) -> StoreResult<Vec<Claimed>> {
        Ok(PgStore::claim_due(self, now, node, lease, limit)
            .await?
            .into_iter()
            .map(|(entry, lease)| Claimed { entry, lease })
            .collect())
    }
    async fn claim(
        &self,
        id: MessageId,
        now: u64,
        node: &str,
        lease: Duration,
    ) -> StoreResult<Option<Claimed>> {
        Ok(PgStore::claim(self, id, now, node, lease)
            .await?
            .map(|(entry, lease)| Claimed { entry, lease }))
    }
    async fn renew(&self, lease: &Lease, now: u64, extend: Duration) -> StoreResult<Lease> {
        PgStore::renew(self, lease, now, extend).await
    }
    async fn renew_all(
        &self,
        leases: &[Lease],
        now: u64,
        extend: Duration,
    ) -> StoreResult<Vec<Lease>> {
        PgStore::renew_all(self, leases, now, extend).await
    }
    async fn unclaim(&self, lease: &Lease) -> StoreResult<()> {
        PgStore::unclaim(self, lease).await
    }
    async fn settle(
        &self,
        lease: &Lease,
        entry: &QueueEntry,
        remove: bool,
        notices: &[Notice],
    ) -> StoreResult<()> {
        PgStore::settle(self, lease, entry, remove, notices).await
    }
    async fn queue_entry(&self, id: MessageId) -> StoreResult<Option<QueueEntry>> {
        PgStore::queue_entry(self, id).await
    }
    async fn queue_page(
        &self,
        after: Option<MessageId>,
        limit: usize,
    ) -> StoreResult<Vec<QueueItem>> {
        PgStore::queue_page(self, after, limit).await
    }
    async fn queue_item(&self, id: MessageId) -> StoreResult<Option<QueueItem>> {
        PgStore::queue_item(self, id).await
    }
    async fn queue_len(&self) -> StoreResult<usize> {
        PgStore::queue_len(self).await
    }
    async fn oldest_queued(&self) -> StoreResult<Option<u64>> {
        PgStore::oldest_queued(self).await
    }
    async fn next_due_time(&self, now: u64) -> StoreResult<Option<u64>> {
        PgStore::next_due_time(self, now).await
    }
    async fn queued_content(&self, id: MessageId) -> StoreResult<Option<Bytes>> {
        PgStore::queued_content(self, id).await
    }
    async fn update_queue(&self, entry: &QueueEntry) -> StoreResult<()> {
        PgStore::update_queue(self, entry).await
    }
    async fn remove_queue(&self, id: MessageId) -> StoreResult<()> {
        PgStore::remove_queue(self, id).await
    }
    async fn hold(&self, id: MessageId, now: u64) -> StoreResult<bool> {
        PgStore::hold(self, id, now).await
    }
    async fn release(&self, id: MessageId, at: u64) -> StoreResult<bool> {
        PgStore::release(self, id, at).await
    }
    async fn reschedule(&self, id: MessageId, at: u64, reset: bool) -> StoreResult<Rescheduled> {
        PgStore::reschedule(self, id, at, reset).await
    }
    async fn wait_for_work(&self) {
        PgStore::wait_for_work(self).await
    }
}

#[async_trait]
impl History for PgStore {
    async fn trace(&self, id: MessageId, at: u64, what: TraceKind) {
        PgStore::trace(self, id, at, what)
    }
    async fn history(&self, id: MessageId) -> StoreResult<Vec<TraceEvent>> {
        PgStore::history(self, id).await
    }
    async fn sweep_trace(&self, now: u64, keep: Duration) -> StoreResult<usize> {
        PgStore::sweep_trace(self, now, keep).await
    }
}

#[async_trait]
impl Storage for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }
    fn set_quota_policy(&self, default: Option<u64>, _warning_percent: u8) {
        PgStore::set_quota_policy(self, default)
    }
    fn set_trace_limits(&self, limits: TraceLimits) {
        PgStore::set_trace_limits(self, limits.max_events_per_message)
    }
}
