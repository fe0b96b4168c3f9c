//! Local mailboxes: storing deliveries, and what a POP3 session changes
//! (the maildrop lock, deletions at QUIT). Plain functions over the
//! storage; the RFC 1939 maildrop lock is the storage's
//! ([`postino_core::storage::Mailboxes::lock_maildrop`]), so it holds
//! across every node sharing a store, and the POP3 connection holds it
//! while its session lasts.

use postino_core::logsafe::escape;
use postino_core::message::now_unix;
use postino_core::storage::{MaildropLock, Storage};
use postino_core::store::{LocalDelivery, MailEntry, StoreError, TraceKind};
use postino_core::MessageId;
use tracing::info;

/// Delivers a spooled message to local mailboxes, in one transaction
/// (idempotent per mailbox and message).
///
/// # Errors
///
/// The store's, when the transaction fails.
pub async fn deliver_local(
    store: &dyn Storage,
    id: MessageId,
    deliveries: &[LocalDelivery],
) -> Result<(), StoreError> {
    store.deliver_local(id, deliveries).await?;
    delivered(id, deliveries);
    Ok(())
}

/// Stores a message that goes only to local mailboxes: content and entries
/// at once.
///
/// # Errors
///
/// The store's, when the write fails.
pub async fn accept_local(
    store: &dyn Storage,
    id: MessageId,
    content: &[u8],
    deliveries: &[LocalDelivery],
) -> Result<(), StoreError> {
    store.accept_local(id, content, deliveries).await?;
    delivered(id, deliveries);
    Ok(())
}

fn delivered(id: MessageId, deliveries: &[LocalDelivery]) {
    for d in deliveries {
        info!(%id, to = %escape(&d.mailbox), status = "delivered", relay = "local", "delivered to mailbox");
    }
}

/// A maildrop locked for one POP3 session, and its messages.
pub type Opened = (Box<dyn MaildropLock>, Vec<MailEntry>);

/// Locks `mailbox` for a POP3 session on `node` and lists it. `None`:
/// another session (on any node) holds it.
///
/// # Errors
///
/// The store's; the lock is not kept then.
pub async fn open(
    store: &dyn Storage,
    mailbox: &str,
    node: &str,
) -> Result<Option<Opened>, StoreError> {
    let Some(lock) = store.lock_maildrop(mailbox, node).await? else {
        return Ok(None);
    };
    match store.maildrop(lock.mailbox()).await {
        Ok(entries) => Ok(Some((lock, entries))),
        Err(e) => {
            store.unlock_maildrop(lock).await;
            Err(e)
        }
    }
}

/// Deletes messages (POP3 UPDATE state), makes that durable, then releases
/// the lock: the +OK to QUIT says they are gone (RFC 1939 §6).
///
/// # Errors
///
/// The store's: nothing deleted, or not known to be durable. The lock is
/// released either way.
pub async fn expunge(
    store: &dyn Storage,
    lock: Box<dyn MaildropLock>,
    keys: Vec<u64>,
) -> Result<(), StoreError> {
    let mailbox = lock.mailbox().to_owned();
    let result = match store.delete_mail(&mailbox, &keys).await {
        Ok(deleted) => store.durable().await.map(|()| deleted),
        Err(e) => Err(e),
    };
    store.unlock_maildrop(lock).await;
    let deleted = result?;
    info!(mailbox = %escape(&mailbox), deleted, "pop3 expunge");
    // A mailbox entry's key is its message's id.
    let now = now_unix();
    for key in keys {
        let mailbox = mailbox.clone();
        store
            .trace(MessageId(key), now, TraceKind::Deleted { mailbox })
            .await;
    }
    Ok(())
}
