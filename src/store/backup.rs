//! Offline tools over a stopped server's store: [`Store::check`] verifies
//! every record, [`Store::export`] writes a backup (and salvages what can be
//! read from a damaged store), [`Store::import`] builds a new store from one.
//!
//! # Export format, version 1
//!
//! JSON lines, UTF-8, one object per line, written while iterating the
//! trees (bounded memory: one record at a time). Octets (message content,
//! header prefixes) are standard base64.
//!
//! ```text
//! {"type":"header","format":"postino-store","version":1,"schema":4,"uidl_epoch":1234}
//! {"type":"user","address":"a@x.test","hash":"$argon2id$...","quota":1073741824}
//! {"type":"alias","alias":"b@x.test","targets":["a@x.test"]}
//! {"type":"mail","mailbox":"a@x.test","key":17,"prefix":"...","content":"..."}
//! {"type":"queue","entry":{..QueueEntry..},"content":"..."}
//! {"type":"inbound","envelope":{..Envelope..},"local_done":[..],"queued":false,"bounce":null,"content":"..."}
//! {"type":"end","users":1,"aliases":1,"mail":1,"queue":1,"inbound":0,"skipped":0}
//! ```
//!
//! A queue entry or envelope with DSN/SMTPUTF8 parameters has a `params`
//! object (schema 4); lines without it (older exports) import as before.
//!
//! `uidl_epoch` and each mail `key` together make the POP3 UIDL, so an
//! imported mailbox keeps its UIDLs. The `end` line tells a complete file
//! from a truncated one; import refuses a file without it. `skipped` counts
//! records export could not decode (a salvage from a damaged store).

use std::io::{BufRead, Write};
use std::path::Path;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};

use super::mail::{MailRecord, Progress, Refs};
use super::queue::schedule_key;
use super::users::UserRecord;
use super::{
    decode, encode, encode_inline, id_from_key, split_inline, utf8, QueueEntry, Store, StoreError,
    META_UIDL_EPOCH, SCHEMA_VERSION,
};
use crate::message::{Envelope, MessageId};

/// Version of the export format (not of the store's schema).
pub const EXPORT_VERSION: u32 = 1;
/// The `format` of an export's header line.
pub const EXPORT_FORMAT: &str = "postino-store";
const FORMAT: &str = EXPORT_FORMAT;

/// One line of an export (the format above); public so that other
/// backends (`postino-pg`) read and write the very same format.
#[derive(Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Line {
    Header {
        format: String,
        version: u32,
        schema: u32,
        uidl_epoch: u32,
    },
    User {
        address: String,
        hash: String,
        /// The user's own quota in octets, `u64::MAX` for unlimited;
        /// absent: `[mailbox] quota` applies (and in older exports).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        quota: Option<u64>,
    },
    Alias {
        alias: String,
        targets: Vec<String>,
    },
    Mail {
        mailbox: String,
        key: u64,
        prefix: String,
        content: String,
    },
    Queue {
        entry: QueueEntry,
        content: String,
    },
    Inbound {
        envelope: Envelope,
        local_done: Vec<String>,
        queued: bool,
        bounce: Option<MessageId>,
        content: String,
    },
    End(Counts),
}

/// How many records of each kind an export or import handled.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub users: u64,
    pub aliases: u64,
    pub mail: u64,
    pub queue: u64,
    pub inbound: u64,
    /// Records that could not be read (export) and were left out.
    pub skipped: u64,
}

/// Errors of [`Store::export`] and [`Store::import`] besides the store's own.
#[derive(thiserror::Error, Debug)]
#[non_exhaustive]
pub enum BackupError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("line {line}: {message}")]
    Format { line: u64, message: String },
    #[error("{} is not empty: import only into a new data directory", .0.display())]
    NotEmpty(std::path::PathBuf),
}

/// What [`Store::check`] found.
#[derive(Debug, Default)]
pub struct CheckReport {
    pub counts: Counts,
    /// Damage: records that do not decode, references that do not resolve,
    /// counts that do not match. Empty for a sound store.
    pub problems: Vec<String>,
    /// Harmless leftovers of a crash (a schedule key without its entry).
    pub notes: Vec<String>,
}

impl From<sled::Error> for BackupError {
    fn from(e: sled::Error) -> BackupError {
        BackupError::Store(StoreError::Sled(e))
    }
}

impl Store {
    /// Verifies every record: each decodes, each mailbox entry, queue entry
    /// and inbound record that shares content finds it, reference counts
    /// match the records that hold them, every queue entry is scheduled,
    /// every mailbox's kept usage matches its entries.
    pub fn check(&self) -> Result<CheckReport, StoreError> {
        let i = &self.inner;
        let mut r = CheckReport::default();
        let mut holders = std::collections::BTreeMap::<MessageId, u64>::new();
        for kv in i.users.iter() {
            let (k, v) = kv?;
            match (utf8("user", &k), decode::<UserRecord>("user", &v)) {
                (Ok(_), Ok(_)) => r.counts.users += 1,
                (Err(e), _) | (_, Err(e)) => r.problems.push(format!("users: {e}")),
            }
        }
        for kv in i.aliases.iter() {
            let (k, v) = kv?;
            match (utf8("alias", &k), decode::<Vec<String>>("alias", &v)) {
                (Ok(_), Ok(_)) => r.counts.aliases += 1,
                (Err(e), _) | (_, Err(e)) => r.problems.push(format!("aliases: {e}")),
            }
        }
        for kv in i.mail.iter() {
            let (k, v) = kv?;
            let Some(nul) = k.iter().position(|&b| b == 0) else {
                r.problems.push(format!("mail: key without mailbox {k:?}"));
                continue;
            };
            match (
                super::mail::entry_key(&k[nul..]),
                split_inline::<MailRecord>("mail", &v),
            ) {
                (Ok(key), Ok((_, inline))) => {
                    r.counts.mail += 1;
                    if inline.is_none() {
                        *holders.entry(MessageId(key)).or_default() += 1;
                    }
                }
                (Err(e), _) | (_, Err(e)) => r.problems.push(format!("mail: {e}")),
            }
        }
        for problem in self.check_usage()? {
            r.problems.push(problem);
        }
        for kv in i.queue.iter() {
            let (k, v) = kv?;
            match (id_from_key(&k), split_inline::<QueueEntry>("queue", &v)) {
                (Ok(id), Ok((entry, inline))) => {
                    r.counts.queue += 1;
                    if inline.is_none() {
                        *holders.entry(id).or_default() += 1;
                    }
                    // A held entry has no schedule key (`hold.rs`).
                    if !i
                        .schedule
                        .contains_key(schedule_key(entry.next_attempt, id))?
                        && !i.held.contains_key(id.to_key())?
                    {
                        r.problems
                            .push(format!("queue: message {id} is not in the schedule"));
                    }
                }
                (Err(e), _) | (_, Err(e)) => r.problems.push(format!("queue: {e}")),
            }
        }
        for k in i.schedule.iter().keys() {
            let k = k?;
            match super::queue::parse_schedule_key(&k) {
                Ok((_, id)) if !i.queue.contains_key(id.to_key())? => r
                    .notes
                    .push(format!("schedule: key of message {id} without a queue entry (left by a crash; removed when due)")),
                Ok(_) => {}
                Err(e) => r.problems.push(format!("schedule: {e}")),
            }
        }
        for kv in i.inbound.iter() {
            let (k, v) = kv?;
            match (id_from_key(&k), decode::<Envelope>("inbound", &v)) {
                (Ok(id), Ok(_)) => {
                    r.counts.inbound += 1;
                    *holders.entry(id).or_default() += 1;
                }
                (Err(e), _) | (_, Err(e)) => r.problems.push(format!("inbound: {e}")),
            }
        }
        for kv in i.progress.iter() {
            let (k, v) = kv?;
            if let Err(e) = decode::<Progress>("progress", &v) {
                r.problems.push(format!("progress: {e}"));
            } else if !i.inbound.contains_key(&k)? {
                r.notes
                    .push("progress: record without its inbound message".into());
            }
        }
        for kv in i.refs.iter() {
            let (k, v) = kv?;
            let id = match id_from_key(&k) {
                Ok(id) => id,
                Err(e) => {
                    r.problems.push(format!("refs: {e}"));
                    continue;
                }
            };
            let refs = match Refs::parse(id, &v) {
                Ok(refs) => refs,
                Err(e) => {
                    r.problems.push(format!("refs: {e}"));
                    continue;
                }
            };
            let held = holders.remove(&id).unwrap_or(0);
            if held != refs.count {
                r.problems.push(format!(
                    "refs: message {id} counts {} references, {held} records hold one",
                    refs.count
                ));
            }
            match i.content.get(k)? {
                Some(c) if c.len() as u64 == refs.len => {}
                Some(c) => r.problems.push(format!(
                    "content: message {id} has {} octets, its references say {}",
                    c.len(),
                    refs.len
                )),
                None => r
                    .problems
                    .push(format!("content: message {id} is referenced but missing")),
            }
        }
        for (id, n) in holders {
            r.problems.push(format!(
                "refs: {n} records of message {id} share content that has no reference count"
            ));
        }
        for k in i.content.iter().keys() {
            let k = k?;
            if !i.refs.contains_key(&k)? {
                r.problems.push(format!(
                    "content: {} stored without a reference count",
                    id_from_key(&k).map_or_else(|e| e.to_string(), |id| id.to_string())
                ));
            }
        }
        Ok(r)
    }

    /// Writes every user, alias, mailbox entry, queue entry and inbound
    /// message to `out` in the export format (module docs). A record that
    /// cannot be read is left out, counted in `skipped` and logged; the rest
    /// is still written.
    pub fn export(&self, out: &mut dyn Write) -> Result<Counts, BackupError> {
        let i = &self.inner;
        let mut c = Counts::default();
        write_line(
            out,
            &Line::Header {
                format: FORMAT.into(),
                version: EXPORT_VERSION,
                schema: SCHEMA_VERSION,
                uidl_epoch: i.uidl_epoch,
            },
        )?;
        let skip = |c: &mut Counts, what: &str, e: &dyn std::fmt::Display| {
            tracing::warn!(error = %e, "export: skipped a {what} record");
            eprintln!("postino: skipped a {what} record: {e}");
            c.skipped += 1;
        };
        for kv in i.users.iter() {
            match kv
                .map_err(StoreError::from)
                .and_then(|(k, v)| Ok((utf8("user", &k)?, decode::<UserRecord>("user", &v)?)))
            {
                Ok((address, rec)) => {
                    let quota = match i.quotas.get(address.as_bytes()) {
                        Ok(q) => q.and_then(|q| q.as_ref().try_into().ok().map(u64::from_be_bytes)),
                        Err(e) => {
                            skip(&mut c, "quota", &StoreError::from(e));
                            None
                        }
                    };
                    write_line(
                        out,
                        &Line::User {
                            address,
                            hash: rec.password,
                            quota,
                        },
                    )?;
                    c.users += 1;
                }
                Err(e) => skip(&mut c, "user", &e),
            }
        }
        for kv in i.aliases.iter() {
            match kv
                .map_err(StoreError::from)
                .and_then(|(k, v)| Ok((utf8("alias", &k)?, decode::<Vec<String>>("alias", &v)?)))
            {
                Ok((alias, targets)) => {
                    write_line(out, &Line::Alias { alias, targets })?;
                    c.aliases += 1;
                }
                Err(e) => skip(&mut c, "alias", &e),
            }
        }
        for kv in i.mail.iter() {
            let line = kv.map_err(StoreError::from).and_then(|(k, v)| {
                let nul = k
                    .iter()
                    .position(|&b| b == 0)
                    .ok_or_else(|| StoreError::Codec(format!("bad mail key {k:?}")))?;
                let mailbox = utf8("mail", &k[..nul])?;
                let key = super::mail::entry_key(&k[nul..])?;
                let (rec, inline): (MailRecord, _) = split_inline("mail", &v)?;
                let content = match inline {
                    Some(c) => B64.encode(c),
                    None => {
                        B64.encode(self.content(MessageId(key))?.ok_or(StoreError::NotFound {
                            what: "content",
                            id: MessageId(key),
                        })?)
                    }
                };
                Ok(Line::Mail {
                    mailbox,
                    key,
                    prefix: B64.encode(&rec.prefix),
                    content,
                })
            });
            match line {
                Ok(line) => {
                    write_line(out, &line)?;
                    c.mail += 1;
                }
                Err(e) => skip(&mut c, "mail", &e),
            }
        }
        for kv in i.queue.iter() {
            let line = kv.map_err(StoreError::from).and_then(|(_, v)| {
                let (entry, inline): (QueueEntry, _) = split_inline("queue", &v)?;
                let content = match inline {
                    Some(c) => B64.encode(c),
                    None => B64.encode(self.content(entry.id)?.ok_or(StoreError::NotFound {
                        what: "content",
                        id: entry.id,
                    })?),
                };
                Ok(Line::Queue { entry, content })
            });
            match line {
                Ok(line) => {
                    write_line(out, &line)?;
                    c.queue += 1;
                }
                Err(e) => skip(&mut c, "queue", &e),
            }
        }
        for kv in i.inbound.iter() {
            let line = kv.map_err(StoreError::from).and_then(|(k, v)| {
                let envelope: Envelope = decode("inbound", &v)?;
                let progress: Progress = match i.progress.get(&k)? {
                    Some(p) => decode("progress", &p)?,
                    None => Progress::default(),
                };
                let content = self.content(envelope.id)?.ok_or(StoreError::NotFound {
                    what: "content",
                    id: envelope.id,
                })?;
                Ok(Line::Inbound {
                    envelope,
                    local_done: progress.local,
                    queued: progress.queued,
                    bounce: progress.bounce,
                    content: B64.encode(content),
                })
            });
            match line {
                Ok(line) => {
                    write_line(out, &line)?;
                    c.inbound += 1;
                }
                Err(e) => skip(&mut c, "inbound", &e),
            }
        }
        write_line(out, &Line::End(c.clone()))?;
        out.flush()?;
        Ok(c)
    }

    /// Builds a new store in `dir` (which must be empty or absent) from an
    /// export, and flushes it. Mailbox entries and queue entries get their
    /// content inline; message ids and UIDLs stay what they were, and new
    /// ids start above every imported one.
    pub fn import(dir: &Path, input: &mut dyn BufRead) -> Result<Counts, BackupError> {
        if std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some()) {
            return Err(BackupError::NotEmpty(dir.to_owned()));
        }
        let store = Store::open(dir)?;
        let i = &store.inner;
        let mut max_id = 0u64;
        let c = read_export(input, |n, line| {
            let bad = |message: String| BackupError::Format { line: n, message };
            let b64 = |s: &str| B64.decode(s).map_err(|e| bad(format!("base64: {e}")));
            match line {
                // Checked by read_export; the epoch is part of every UIDL:
                // keep it.
                Line::Header { uidl_epoch, .. } => {
                    store
                        .meta()?
                        .insert(META_UIDL_EPOCH, &uidl_epoch.to_be_bytes()[..])?;
                }
                Line::User {
                    address,
                    hash,
                    quota,
                } => {
                    let address = super::canonical(&address)?;
                    let rec = encode("user", &UserRecord { password: hash })?;
                    i.users.insert(address.as_bytes(), rec)?;
                    if let Some(q) = quota {
                        i.quotas.insert(address.as_bytes(), &q.to_be_bytes())?;
                    }
                }
                Line::Alias { alias, targets } => {
                    let alias = super::canonical(&alias)?;
                    i.aliases
                        .insert(alias.as_bytes(), encode("alias", &targets)?)?;
                }
                Line::Mail {
                    mailbox,
                    key,
                    prefix,
                    content,
                } => {
                    let (prefix, content) = (b64(&prefix)?, b64(&content)?);
                    let rec = MailRecord {
                        size: (prefix.len() + content.len()) as u64,
                        prefix,
                    };
                    let mailbox = super::canonical(&mailbox)?;
                    i.mail.insert(
                        super::mail::mail_key(&mailbox, key),
                        encode_inline("mail", &rec, Some(&content))?,
                    )?;
                    max_id = max_id.max(key);
                }
                Line::Queue { entry, content } => {
                    let content = b64(&content)?;
                    i.schedule
                        .insert(schedule_key(entry.next_attempt, entry.id), &[])?;
                    i.queue.insert(
                        entry.id.to_key(),
                        encode_inline("queue", &entry, Some(&content))?,
                    )?;
                    max_id = max_id.max(entry.id.0);
                }
                Line::Inbound {
                    envelope,
                    local_done,
                    queued,
                    bounce,
                    content,
                } => {
                    let content = b64(&content)?;
                    let key = envelope.id.to_key();
                    let refs = Refs {
                        count: 1,
                        len: content.len() as u64,
                    };
                    i.content.insert(key, content)?;
                    i.refs.insert(key, &refs.to_bytes())?;
                    i.inbound.insert(key, encode("inbound", &envelope)?)?;
                    let progress = Progress {
                        local: local_done,
                        queued,
                        bounce,
                    };
                    i.progress.insert(key, encode("progress", &progress)?)?;
                    max_id = max_id.max(envelope.id.0).max(bounce.map_or(0, |b| b.0));
                }
                Line::End(_) => {}
            }
            Ok(true)
        })?;
        // sled's id counter only counts up: take ids until it is past every
        // imported one, so new mail never reuses a key (and a UIDL).
        while store.new_id()?.0 <= max_id {}
        store.recompute_usage()?;
        store.flush_blocking()?;
        Ok(c)
    }
}

/// Reads an export line by line and checks its shape — the header first
/// and only there, in a format and version this postino reads; records
/// counted; the end line last, its counts those of the file — handing each
/// line and its number to `each`, which returns `false` to stop early.
/// Every backend's import reads through it. Returns the counts read.
///
/// # Errors
/// [`BackupError::Format`] naming the line, an IO error, or what `each`
/// returned.
pub fn read_export(
    input: &mut dyn BufRead,
    mut each: impl FnMut(u64, Line) -> Result<bool, BackupError>,
) -> Result<Counts, BackupError> {
    let mut c = Counts::default();
    let mut ended = false;
    let mut n = 0u64;
    let mut buf = String::new();
    loop {
        buf.clear();
        if input.read_line(&mut buf)? == 0 {
            break;
        }
        n += 1;
        let bad = |message: String| BackupError::Format { line: n, message };
        if ended {
            return Err(bad("data after the end line".into()));
        }
        let line: Line = serde_json::from_str(&buf).map_err(|e| bad(e.to_string()))?;
        match &line {
            Line::Header {
                format, version, ..
            } if n == 1 => {
                if format != FORMAT || *version != EXPORT_VERSION {
                    return Err(bad(format!(
                        "format {format} version {version}: this postino reads {FORMAT} version {EXPORT_VERSION}"
                    )));
                }
            }
            _ if n == 1 => return Err(bad("not a postino store export (no header)".into())),
            Line::Header { .. } => return Err(bad("a second header".into())),
            Line::User { .. } => c.users += 1,
            Line::Alias { .. } => c.aliases += 1,
            Line::Mail { .. } => c.mail += 1,
            Line::Queue { .. } => c.queue += 1,
            Line::Inbound { .. } => c.inbound += 1,
            Line::End(counts) => {
                let want = Counts {
                    skipped: counts.skipped,
                    ..c.clone()
                };
                if *counts != want {
                    return Err(bad(format!(
                        "the end line counts {counts:?}, the file holds {want:?}"
                    )));
                }
                c.skipped = counts.skipped;
                ended = true;
            }
        }
        if !each(n, line)? {
            return Ok(c);
        }
    }
    if !ended {
        return Err(BackupError::Format {
            line: n,
            message: "no end line: the export is incomplete".into(),
        });
    }
    Ok(c)
}

fn write_line(out: &mut dyn Write, line: &Line) -> Result<(), BackupError> {
    serde_json::to_writer(&mut *out, line).map_err(std::io::Error::from)?;
    out.write_all(b"\n")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str =
        r#"{"type":"header","format":"postino-store","version":1,"schema":4,"uidl_epoch":7}"#;
    const USER: &str = r#"{"type":"user","address":"a@x.test","hash":"h"}"#;
    const END_ONE_USER: &str =
        r#"{"type":"end","users":1,"aliases":0,"mail":0,"queue":0,"inbound":0,"skipped":0}"#;

    /// What `read_export` makes of `lines`: the counts and the lines it
    /// handed on, or the line and message of its refusal.
    fn read(lines: &[&str]) -> Result<(Counts, Vec<u64>), (u64, String)> {
        let text = lines.join("\n") + "\n";
        let mut seen = Vec::new();
        read_export(&mut text.as_bytes(), |n, _| {
            seen.push(n);
            Ok(true)
        })
        .map(|c| (c, seen))
        .map_err(|e| match e {
            BackupError::Format { line, message } => (line, message),
            other => panic!("not a format error: {other}"),
        })
    }

    #[test]
    fn a_whole_export_is_read_and_every_line_handed_on() {
        let (counts, seen) = read(&[HEADER, USER, END_ONE_USER]).unwrap();
        assert_eq!(counts.users, 1);
        assert_eq!(seen, [1, 2, 3]);
    }

    #[test]
    fn a_malformed_export_is_refused_naming_the_line() {
        let refused = |lines: &[&str]| read(lines).unwrap_err();
        assert_eq!(refused(&[USER, END_ONE_USER]).0, 1, "no header");
        assert!(
            refused(&[&HEADER.replace("\"version\":1", "\"version\":9"), USER])
                .1
                .contains("version 9")
        );
        assert_eq!(refused(&[HEADER, HEADER]), (2, "a second header".into()));
        assert_eq!(
            refused(&[HEADER, USER]),
            (2, "no end line: the export is incomplete".into())
        );
        assert_eq!(refused(&[HEADER, USER, USER, END_ONE_USER]).0, 4, "counts");
        assert_eq!(
            refused(&[HEADER, USER, END_ONE_USER, USER]),
            (4, "data after the end line".into())
        );
    }
}
