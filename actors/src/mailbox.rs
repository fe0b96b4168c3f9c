//! The local-mailbox actor: serialises what POP3 sessions change (the
//! maildrop lock, deletions at QUIT); and the functions that store
//! deliveries in mailboxes.
//!
//! Neither reading nor delivering a message goes through this actor: sled
//! reads and transactions are safe from any thread, RETR is the hot path of
//! a POP3 server, and delivery that of intake.

use std::collections::HashMap;

use actix::prelude::*;
use postino_core::logsafe::escape;
use postino_core::store::{LocalDelivery, MailEntry, StoreError, TraceKind};
use postino_core::{MessageId, Store};
use tracing::info;

/// Owns mailbox writes and maildrop locks.
pub struct Mailbox {
    store: Store,
    /// Mailbox → the POP3 session holding its lock (RFC 1939 §8: exclusive).
    locks: HashMap<String, u64>,
}

impl Mailbox {
    /// The mailbox actor over `store`, holding no locks.
    pub fn new(store: Store) -> Mailbox {
        Mailbox {
            store,
            locks: HashMap::new(),
        }
    }
}

impl Actor for Mailbox {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Every POP3 session sends here and awaits the answer (`send`, never
        // `do_send`), so this bound is back-pressure, not loss.
        ctx.set_mailbox_capacity(4096);
    }
}

/// Delivers a spooled message to local mailboxes, in one transaction
/// ([`Store::deliver_local`]: idempotent per mailbox and message). A plain
/// function, not a message: any thread may write mailbox entries; only the
/// POP3 side needs this actor.
///
/// # Errors
///
/// The store's, when the transaction fails.
pub fn deliver_local(
    store: &Store,
    id: MessageId,
    deliveries: &[LocalDelivery],
) -> Result<(), StoreError> {
    store.deliver_local(id, deliveries)?;
    delivered(id, deliveries);
    Ok(())
}

/// Stores a message that goes only to local mailboxes: content and entries
/// at once ([`Store::accept_local`]).
///
/// # Errors
///
/// The store's, when the write fails.
pub fn accept_local(
    store: &Store,
    id: MessageId,
    content: &[u8],
    deliveries: &[LocalDelivery],
) -> Result<(), StoreError> {
    store.accept_local(id, content, deliveries)?;
    delivered(id, deliveries);
    Ok(())
}

fn delivered(id: MessageId, deliveries: &[LocalDelivery]) {
    for d in deliveries {
        info!(%id, to = %escape(&d.mailbox), status = "delivered", relay = "local", "delivered to mailbox");
    }
}

/// Lock a maildrop for a POP3 session and list it. `None`: another session
/// holds it.
#[derive(Message)]
#[rtype(result = "Result<Option<Vec<MailEntry>>, StoreError>")]
pub struct Open {
    /// The maildrop (canonical user address).
    pub mailbox: String,
    /// The POP3 session asking (its id).
    pub session: u64,
}

impl Handler<Open> for Mailbox {
    type Result = Result<Option<Vec<MailEntry>>, StoreError>;

    fn handle(&mut self, msg: Open, _: &mut Self::Context) -> Self::Result {
        match self.locks.get(&msg.mailbox) {
            Some(&holder) if holder != msg.session => return Ok(None),
            _ => {}
        }
        let entries = self.store.maildrop(&msg.mailbox)?;
        self.locks.insert(msg.mailbox, msg.session);
        Ok(Some(entries))
    }
}

/// Why an expunge did not happen.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExpungeError {
    /// The store failed; nothing was deleted, the lock is released.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The session no longer holds the maildrop's lock (the mailbox).
    #[error("the maildrop lock of {0} is not held by this session")]
    LockLost(String),
}

/// Delete messages (POP3 UPDATE state) and release the lock.
#[derive(Message)]
#[rtype(result = "Result<(), ExpungeError>")]
pub struct Expunge {
    /// The maildrop.
    pub mailbox: String,
    /// The session that holds its lock.
    pub session: u64,
    /// The messages to delete (their store keys).
    pub keys: Vec<u64>,
}

impl Handler<Expunge> for Mailbox {
    type Result = Result<(), ExpungeError>;

    fn handle(&mut self, msg: Expunge, _: &mut Self::Context) -> Self::Result {
        if self.locks.get(&msg.mailbox) != Some(&msg.session) {
            return Err(ExpungeError::LockLost(msg.mailbox));
        }
        let result = self.store.delete_mail(&msg.mailbox, &msg.keys);
        self.locks.remove(&msg.mailbox);
        let deleted = result?;
        info!(mailbox = %escape(&msg.mailbox), deleted, "pop3 expunge");
        // A mailbox entry's key is its message's id.
        for &key in &msg.keys {
            let mailbox = msg.mailbox.clone();
            (self.store).trace(MessageId(key), TraceKind::Deleted { mailbox });
        }
        Ok(())
    }
}

/// Release a maildrop lock without deleting anything (dropped connection,
/// QUIT without deletions).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Release {
    /// The maildrop.
    pub mailbox: String,
    /// The session that holds its lock.
    pub session: u64,
}

impl Handler<Release> for Mailbox {
    type Result = ();

    fn handle(&mut self, msg: Release, _: &mut Self::Context) {
        if self.locks.get(&msg.mailbox) == Some(&msg.session) {
            self.locks.remove(&msg.mailbox);
        }
    }
}
