//! The local-mailbox actor: stores deliveries in mailboxes, and serialises
//! what POP3 sessions change (the maildrop lock, deletions at QUIT).
//!
//! Reading a message does not go through this actor: sled reads are safe
//! from any thread, and RETR is the hot path of a POP3 server.

use std::collections::HashMap;

use actix::prelude::*;
use postino_core::logsafe::escape;
use postino_core::store::{LocalDelivery, MailEntry, StoreError};
use postino_core::{MessageId, Store};
use tracing::info;

/// Owns mailbox writes and maildrop locks.
pub struct Mailbox {
    store: Store,
    /// Mailbox → the POP3 session holding its lock (RFC 1939 §8: exclusive).
    locks: HashMap<String, u64>,
}

impl Mailbox {
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
        // Deliveries arrive from every SMTP session; senders await them, so
        // the mailbox itself needs room rather than a small bound.
        ctx.set_mailbox_capacity(4096);
    }
}

/// Store a message in local mailboxes (idempotent per mailbox and message).
#[derive(Message)]
#[rtype(result = "Result<(), StoreError>")]
pub struct Deliver {
    pub id: MessageId,
    pub deliveries: Vec<LocalDelivery>,
}

impl Handler<Deliver> for Mailbox {
    type Result = Result<(), StoreError>;

    fn handle(&mut self, msg: Deliver, _: &mut Self::Context) -> Self::Result {
        self.store.deliver_local(msg.id, &msg.deliveries)?;
        for d in &msg.deliveries {
            info!(id = %msg.id, to = %escape(&d.mailbox), status = "delivered", relay = "local", "delivered to mailbox");
        }
        Ok(())
    }
}

/// Store a message that goes only to local mailboxes: content and entries
/// in one transaction ([`Store::accept_local`]).
#[derive(Message)]
#[rtype(result = "Result<(), StoreError>")]
pub struct StoreLocal {
    pub id: MessageId,
    pub content: Vec<u8>,
    pub deliveries: Vec<LocalDelivery>,
}

impl Handler<StoreLocal> for Mailbox {
    type Result = Result<(), StoreError>;

    fn handle(&mut self, msg: StoreLocal, _: &mut Self::Context) -> Self::Result {
        self.store
            .accept_local(msg.id, &msg.content, &msg.deliveries)?;
        for d in &msg.deliveries {
            info!(id = %msg.id, to = %escape(&d.mailbox), status = "delivered", relay = "local", "delivered to mailbox");
        }
        Ok(())
    }
}

/// Lock a maildrop for a POP3 session and list it. `None`: another session
/// holds it.
#[derive(Message)]
#[rtype(result = "Result<Option<Vec<MailEntry>>, StoreError>")]
pub struct Open {
    pub mailbox: String,
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
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the maildrop lock of {0} is not held by this session")]
    LockLost(String),
}

/// Delete messages (POP3 UPDATE state) and release the lock.
#[derive(Message)]
#[rtype(result = "Result<(), ExpungeError>")]
pub struct Expunge {
    pub mailbox: String,
    pub session: u64,
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
        Ok(())
    }
}

/// Release a maildrop lock without deleting anything (dropped connection,
/// QUIT without deletions).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Release {
    pub mailbox: String,
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
