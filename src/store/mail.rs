//! The intake spool, content reference counts and local mailboxes.
//!
//! Dispatch of an inbound message ([`Store::deliver_local`],
//! [`Store::enqueue`], [`Store::spool_bounce`], [`Store::finish_inbound`])
//! may be repeated after a crash. A `progress` record, written in the same
//! transaction as each step and removed with the inbound record, remembers
//! what was done, so a repeat delivers nothing twice — even to a mailbox
//! whose copy the user has already downloaded and deleted in between.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sled::transaction::TransactionalTree;
use sled::Transactional;

#[cfg(test)]
use super::id_from_key;
use super::quota::add_usage;
use super::{
    abort, canonical, decode, encode, encode_inline, split_inline, tx_done, Store, StoreError,
    TxResult,
};
use crate::message::{Envelope, MessageId};

/// One local delivery of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalDelivery {
    /// Canonical mailbox address (lower-cased here anyway).
    pub mailbox: String,
    /// Header lines put before the content when the message is read
    /// (`Return-Path:`, `Delivered-To:`, `X-Original-To:`), each ending in
    /// CRLF. Stored per mailbox entry; the content is shared.
    pub prefix: Vec<u8>,
}

/// One message in a mailbox, as POP3 lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailEntry {
    /// Identifies the entry within its mailbox: unique, never reused, and
    /// larger for messages accepted later. (Today it is the message id.)
    pub key: u64,
    /// POP3 unique id: 1–70 characters in 0x21–0x7E, the same across
    /// sessions and restarts, and not reused by a database made anew.
    pub uidl: String,
    /// Octets of prefix plus content, exactly what [`Store::read_mail`] returns.
    pub size: u64,
    /// The message's queue id.
    pub id: MessageId,
}

/// Whether a `mail` value carries its content inline (for consistency checks).
#[cfg(test)]
pub(super) fn mail_is_inline(v: &[u8]) -> bool {
    matches!(split_inline::<MailRecord>("mail", v), Ok((_, Some(_))))
}

/// The `mail` tree value.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct MailRecord {
    pub(super) prefix: Vec<u8>,
    pub(super) size: u64,
}

/// The `progress` tree value: what dispatch of an inbound message has done.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct Progress {
    /// Mailboxes delivered to.
    pub(super) local: Vec<String>,
    /// Whether the remote recipients were queued.
    pub(super) queued: bool,
    /// The bounce spooled for this message's failed recipients.
    pub(super) bounce: Option<MessageId>,
}

/// The `refs` tree value: references to a content and its length, so sizes
/// are known without reading the content.
#[derive(Debug, Clone, Copy)]
pub(super) struct Refs {
    pub(super) count: u64,
    pub(super) len: u64,
}

impl Refs {
    pub(super) fn to_bytes(self) -> [u8; 16] {
        let mut b = [0; 16];
        b[..8].copy_from_slice(&self.count.to_be_bytes());
        b[8..].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    pub(super) fn parse(id: MessageId, b: &[u8]) -> Result<Refs, StoreError> {
        let bad = || StoreError::Codec(format!("refs record of {id}: not 16 bytes"));
        let (count, len) = b.split_at_checked(8).ok_or_else(bad)?;
        Ok(Refs {
            count: u64::from_be_bytes(count.try_into().map_err(|_| bad())?),
            len: u64::from_be_bytes(len.try_into().map_err(|_| bad())?),
        })
    }
}

/// Takes one more reference to `id`'s content.
pub(super) fn acquire(refs: &TransactionalTree, id: MessageId) -> TxResult<Refs> {
    let Some(bytes) = refs.get(id.to_key())? else {
        return abort(StoreError::NotFound {
            what: "content",
            id,
        });
    };
    let mut r = Refs::parse(id, &bytes).or_else(abort)?;
    r.count += 1;
    refs.insert(&id.to_key(), &r.to_bytes())?;
    Ok(r)
}

/// Drops one reference to `id`'s content, deleting it with the last one.
pub(super) fn release(
    refs: &TransactionalTree,
    content: &TransactionalTree,
    id: MessageId,
) -> TxResult<()> {
    let key = id.to_key();
    let Some(bytes) = refs.get(key)? else {
        // Better to finish the caller's removal than to wedge it on a count
        // that is already gone.
        tracing::error!(%id, "content reference released twice");
        return Ok(());
    };
    let r = Refs::parse(id, &bytes).or_else(abort)?;
    if r.count <= 1 {
        refs.remove(&key)?;
        content.remove(&key)?;
    } else {
        let r = Refs {
            count: r.count - 1,
            ..r
        };
        refs.insert(&key, &r.to_bytes())?;
    }
    Ok(())
}

/// Reads the progress record of an inbound message, failing if the inbound
/// record is gone (dispatch already finished).
pub(super) fn progress_of(
    inbound: &TransactionalTree,
    progress: &TransactionalTree,
    id: MessageId,
) -> TxResult<Progress> {
    let key = id.to_key();
    if inbound.get(key)?.is_none() {
        return abort(StoreError::NotFound {
            what: "inbound",
            id,
        });
    }
    match progress.get(key)? {
        Some(bytes) => decode("progress", &bytes).or_else(abort),
        None => Ok(Progress::default()),
    }
}

/// Writes a new message: content with one reference, held by its inbound
/// record.
pub(super) fn spool_in(
    content_tree: &TransactionalTree,
    refs: &TransactionalTree,
    inbound: &TransactionalTree,
    id: MessageId,
    record: &[u8],
    content: &[u8],
) -> TxResult<()> {
    let key = id.to_key();
    if refs.get(key)?.is_some() || inbound.get(key)?.is_some() {
        return abort(StoreError::Duplicate(id));
    }
    let r = Refs {
        count: 1,
        len: content.len() as u64,
    };
    content_tree.insert(&key, content)?;
    refs.insert(&key, &r.to_bytes())?;
    inbound.insert(&key, record)?;
    Ok(())
}

pub(super) fn mail_key(mailbox: &str, key: u64) -> Vec<u8> {
    let mut k = mail_prefix(mailbox);
    k.extend_from_slice(&key.to_be_bytes());
    k
}

/// `mailbox` ++ NUL: addresses hold no NUL, so no mailbox's prefix is
/// another's.
fn mail_prefix(mailbox: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(mailbox.len() + 9);
    k.extend_from_slice(mailbox.as_bytes());
    k.push(0);
    k
}

pub(super) fn entry_key(k: &[u8]) -> Result<u64, StoreError> {
    k.len()
        .checked_sub(8)
        .and_then(|at| k[at..].try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| StoreError::Codec(format!("bad mail key {k:?}")))
}

impl Store {
    /// Stores an accepted message: its content (one reference, held by the
    /// inbound record) and its envelope, in one transaction. Not durable
    /// until [`Store::durable`] resolves.
    ///
    /// # Errors
    ///
    /// [`StoreError::Duplicate`] if the id is already in use.
    pub fn spool(&self, envelope: &Envelope, content: &[u8]) -> Result<(), StoreError> {
        fail::fail_point!("store::spool", |arg| Err(super::injected(arg)));
        let record = encode("inbound", envelope)?;
        let i = &self.inner;
        tx_done(
            (&i.content, &i.refs, &i.inbound).transaction(|(c, refs, inbound)| {
                spool_in(c, refs, inbound, envelope.id, &record, content)
            }),
        )
    }

    /// Stores a message that goes only to local mailboxes. For one mailbox
    /// (the common case) that is one insert of the mailbox entry with the
    /// content inline; for several, one transaction: the content, with one
    /// reference per mailbox, and the mailbox entries. It never enters the
    /// intake spool: there is nothing left to dispatch, so nothing to redo
    /// after a crash. This is the hot path of local delivery. Not durable
    /// until [`Store::durable`] resolves.
    ///
    /// # Errors
    ///
    /// [`StoreError::Duplicate`] if the id is in use,
    /// [`StoreError::InvalidAddress`] for a bad mailbox name.
    pub fn accept_local(
        &self,
        id: MessageId,
        content: &[u8],
        deliveries: &[LocalDelivery],
    ) -> Result<(), StoreError> {
        fail::fail_point!("store::accept_local", |arg| Err(super::injected(arg)));
        let mut mailboxes = Vec::with_capacity(deliveries.len());
        for d in deliveries {
            let mailbox = canonical(&d.mailbox)?;
            if !mailboxes.iter().any(|(m, _)| *m == mailbox) {
                mailboxes.push((mailbox, &d.prefix));
            }
        }
        if let [(mailbox, prefix)] = mailboxes.as_slice() {
            let record = MailRecord {
                prefix: prefix.to_vec(),
                size: prefix.len() as u64 + content.len() as u64,
            };
            let size = record.size as i64;
            let value = encode_inline("mail", &record, Some(content))?;
            // One atomic insert, no transaction (see the module's notes on
            // inline content); the usage follows as a second single-key
            // update, repaired at the next open after a crash in between.
            if self
                .inner
                .mail
                .compare_and_swap(mail_key(mailbox, id.0), None as Option<&[u8]>, Some(value))?
                .is_err()
            {
                return Err(StoreError::Duplicate(id));
            }
            let (before, after) = self.add_usage_now(mailbox, 1, size)?;
            self.warn_if_crossed(mailbox, before, after);
            return Ok(());
        }
        let records = mailboxes
            .iter()
            .map(|(mailbox, prefix)| {
                let record = MailRecord {
                    prefix: prefix.to_vec(),
                    size: prefix.len() as u64 + content.len() as u64,
                };
                Ok((
                    mailbox.as_str(),
                    mail_key(mailbox, id.0),
                    record.size as i64,
                    encode("mail", &record)?,
                ))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let key = id.to_key();
        let r = Refs {
            count: records.len() as u64,
            len: content.len() as u64,
        };
        let i = &self.inner;
        let crossed = tx_done(
            (&i.content, &i.refs, &i.inbound, &i.mail, &i.usage).transaction(
                |(c, refs, inbound, mail, usage)| {
                    if refs.get(key)?.is_some() || inbound.get(key)?.is_some() {
                        return abort(StoreError::Duplicate(id));
                    }
                    c.insert(&key, content)?;
                    refs.insert(&key, &r.to_bytes())?;
                    let mut crossed = Vec::with_capacity(records.len());
                    for (mailbox, k, size, v) in &records {
                        mail.insert(k.as_slice(), v.as_slice())?;
                        let (before, after) = add_usage(usage, mailbox, 1, *size)?;
                        crossed.push((*mailbox, before, after));
                    }
                    Ok(crossed)
                },
            ),
        )?;
        for (mailbox, before, after) in crossed {
            self.warn_if_crossed(mailbox, before, after);
        }
        Ok(())
    }

    /// Spools a bounce (or any message made from an inbound one) once per
    /// inbound message: the bounce and a mark on `original` are written in
    /// one transaction. Returns false, spooling nothing, if a bounce was
    /// already spooled for `original` — by a dispatch before a crash; it is
    /// then itself in [`Store::inbound`] and dispatched from there.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`] if `original` is not inbound,
    /// [`StoreError::Duplicate`] if the bounce's id is in use.
    pub fn spool_bounce(
        &self,
        original: MessageId,
        bounce: &Envelope,
        content: &[u8],
    ) -> Result<bool, StoreError> {
        let record = encode("inbound", bounce)?;
        let i = &self.inner;
        tx_done((&i.content, &i.refs, &i.inbound, &i.progress).transaction(
            |(c, refs, inbound, progress)| {
                let mut done = progress_of(inbound, progress, original)?;
                if done.bounce.is_some() {
                    return Ok(false);
                }
                spool_in(c, refs, inbound, bounce.id, &record, content)?;
                done.bounce = Some(bounce.id);
                let done = encode("progress", &done).or_else(abort)?;
                progress.insert(&original.to_key(), done)?;
                Ok(true)
            },
        ))
    }

    /// Envelopes of messages spooled but not finished, in id order: after a
    /// restart, dispatch each again.
    pub fn inbound(&self) -> Result<Vec<Envelope>, StoreError> {
        self.inner
            .inbound
            .iter()
            .values()
            .map(|v| decode("inbound", &v?))
            .collect()
    }

    /// Ends dispatch of a message: removes its inbound record and releases
    /// that record's content reference. Repeating it does nothing.
    pub fn finish_inbound(&self, id: MessageId) -> Result<(), StoreError> {
        let key = id.to_key();
        let i = &self.inner;
        tx_done((&i.inbound, &i.progress, &i.refs, &i.content).transaction(
            |(inbound, progress, refs, content)| {
                if inbound.remove(&key)?.is_none() {
                    return Ok(());
                }
                progress.remove(&key)?;
                release(refs, content, id)
            },
        ))
    }

    /// The shared content of a message (spooled, or delivered to several
    /// mailboxes), if still stored. Shares sled's buffer; no copy. Content
    /// stored inline is not here: read a queued message with
    /// [`Store::queued_content`] and a mailbox entry with
    /// [`Store::read_mail`].
    pub fn content(&self, id: MessageId) -> Result<Option<Bytes>, StoreError> {
        Ok(self.inner.content.get(id.to_key())?.map(Bytes::from_owner))
    }

    /// Delivers an inbound message to local mailboxes, in one transaction.
    /// Idempotent per (mailbox, id): mailboxes already delivered to by an
    /// earlier call for this message are skipped.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`] if the message is not inbound (never spooled,
    /// or already finished), [`StoreError::InvalidAddress`] for a bad
    /// mailbox name.
    pub fn deliver_local(
        &self,
        id: MessageId,
        deliveries: &[LocalDelivery],
    ) -> Result<(), StoreError> {
        let mailboxes = deliveries
            .iter()
            .map(|d| canonical(&d.mailbox))
            .collect::<Result<Vec<_>, _>>()?;
        let key = id.to_key();
        let i = &self.inner;
        let crossed = tx_done(
            (&i.inbound, &i.progress, &i.mail, &i.refs, &i.usage).transaction(
                |(inbound, progress, mail, refs, usage)| {
                    let mut done = progress_of(inbound, progress, id)?;
                    let mut changed = false;
                    let mut crossed = Vec::new();
                    for (mailbox, delivery) in mailboxes.iter().zip(deliveries) {
                        if done.local.contains(mailbox) {
                            continue;
                        }
                        let mk = mail_key(mailbox, id.0);
                        if mail.get(&mk)?.is_none() {
                            let r = acquire(refs, id)?;
                            let record = MailRecord {
                                prefix: delivery.prefix.clone(),
                                size: delivery.prefix.len() as u64 + r.len,
                            };
                            let size = record.size as i64;
                            mail.insert(mk, encode("mail", &record).or_else(abort)?)?;
                            let (before, after) = add_usage(usage, mailbox, 1, size)?;
                            crossed.push((mailbox.as_str(), before, after));
                        }
                        done.local.push(mailbox.clone());
                        changed = true;
                    }
                    if changed {
                        progress.insert(&key, encode("progress", &done).or_else(abort)?)?;
                    }
                    Ok(crossed)
                },
            ),
        )?;
        for (mailbox, before, after) in crossed {
            self.warn_if_crossed(mailbox, before, after);
        }
        Ok(())
    }

    /// The messages in a mailbox, oldest first. A mailbox nobody delivered
    /// to is empty, not an error.
    pub fn maildrop(&self, mailbox: &str) -> Result<Vec<MailEntry>, StoreError> {
        let mailbox = canonical(mailbox)?;
        let epoch = self.inner.uidl_epoch;
        self.inner
            .mail
            .scan_prefix(mail_prefix(&mailbox))
            .map(|kv| {
                let (k, v) = kv?;
                let key = entry_key(&k)?;
                // Answered 4xx: never shown (see `rejected.rs`).
                if self.is_rejected(MessageId(key)) {
                    return Ok(None);
                }
                let record: MailRecord = decode("mail", &v)?;
                Ok(Some(MailEntry {
                    key,
                    uidl: format!("{epoch:08x}.{key:x}"),
                    size: record.size,
                    id: MessageId(key),
                }))
            })
            .filter_map(Result::transpose)
            .collect()
    }

    /// Prefix plus content of one mailbox entry; `None` if it is not there
    /// (deleted meanwhile).
    pub fn read_mail(&self, mailbox: &str, key: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let mailbox = canonical(mailbox)?;
        let Some(v) = self.inner.mail.get(mail_key(&mailbox, key))? else {
            return Ok(None);
        };
        let (record, inline): (MailRecord, _) = split_inline("mail", &v)?;
        let mut out = record.prefix;
        if let Some(content) = inline {
            out.extend_from_slice(content);
            return Ok(Some(out));
        }
        let id = MessageId(key);
        // The entry holds a reference, so the content must be there.
        let content = self
            .inner
            .content
            .get(id.to_key())?
            .ok_or(StoreError::NotFound {
                what: "content",
                id,
            })?;
        out.extend_from_slice(&content);
        Ok(Some(out))
    }

    /// Deletes mailbox entries in one transaction (all or none), releasing
    /// their content references. Keys not there (already deleted, e.g. by a
    /// concurrent session) are skipped. Returns how many were deleted.
    pub fn delete_mail(&self, mailbox: &str, keys: &[u64]) -> Result<usize, StoreError> {
        let mailbox = canonical(mailbox)?;
        let i = &self.inner;
        tx_done((&i.mail, &i.refs, &i.content, &i.usage).transaction(
            |(mail, refs, content, usage)| {
                let mut deleted = 0;
                let mut octets = 0;
                for &key in keys {
                    if let Some(old) = mail.remove(mail_key(&mailbox, key))? {
                        let (record, inline): (MailRecord, _) =
                            split_inline("mail", &old).or_else(abort)?;
                        // Inline content goes with its record.
                        if inline.is_none() {
                            release(refs, content, MessageId(key))?;
                        }
                        deleted += 1;
                        octets += record.size as i64;
                    }
                }
                if deleted > 0 {
                    add_usage(usage, &mailbox, -(deleted as i64), -octets)?;
                }
                Ok(deleted)
            },
        ))
    }

    /// Up to `limit` entry keys of a mailbox.
    pub(super) fn mailbox_keys(&self, mailbox: &str, limit: usize) -> Result<Vec<u64>, StoreError> {
        self.inner
            .mail
            .scan_prefix(mail_prefix(mailbox))
            .keys()
            .take(limit)
            .map(|k| entry_key(&k?))
            .collect()
    }

    /// Ids of every stored content, for consistency checks.
    #[cfg(test)]
    pub(super) fn content_ids(&self) -> Result<Vec<MessageId>, StoreError> {
        self.inner
            .content
            .iter()
            .keys()
            .map(|k| id_from_key(&k?))
            .collect()
    }
}
