//! `postino store export` and `import` for PostgreSQL, in the sled store's
//! export format (JSON lines, version 1, `postino_core::store::ExportLine`):
//! a sled export imports here and a PostgreSQL export imports into sled,
//! with message ids and UIDLs kept (the header's `uidl_epoch` and each
//! mailbox entry's key).
//!
//! Export reads page by page (bounded memory); import writes everything in
//! one transaction, so a failed import leaves the database as it was.

use std::io::{BufRead, Write};
use std::sync::atomic::Ordering;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use postino_core::message::{Envelope, MessageId};
use postino_core::store::{
    canonical_mailbox as canonical, read_export, BackupError, Counts, ExportLine as Line,
    QueueEntry, StoreError, EXPORT_FORMAT, EXPORT_VERSION,
};
use tokio::sync::mpsc;
use tokio_postgres::types::Json;

use crate::migrate::SCHEMA_VERSION;
use crate::{codec, db_err, PgStore};

/// Records read per query while exporting.
const PAGE: i64 = 500;

/// A user's quota stored for "unlimited" (the export writes `u64::MAX`).
const UNLIMITED: i64 = i64::MAX;

fn write_line(out: &mut dyn Write, line: &Line) -> Result<(), BackupError> {
    serde_json::to_writer(&mut *out, line).map_err(std::io::Error::from)?;
    out.write_all(b"\n")?;
    Ok(())
}

impl PgStore {
    /// Writes every user, alias, mailbox entry, queue entry and spooled
    /// message to `out` in the export format. Run it from outside async
    /// code (the offline tool).
    ///
    /// # Errors
    ///
    /// A database error, or writing `out` failed.
    pub fn export(&self, out: &mut dyn Write) -> Result<Counts, BackupError> {
        let mut c = Counts::default();
        write_line(
            out,
            &Line::Header {
                format: EXPORT_FORMAT.into(),
                version: EXPORT_VERSION,
                schema: SCHEMA_VERSION,
                uidl_epoch: self.inner.db.uidl_epoch.load(Ordering::Relaxed),
            },
        )?;
        let rows = self.block_on(|db| async move {
            let client = db.client().await?;
            let rows = client
                .query(
                    "SELECT address, hash, quota FROM users ORDER BY address",
                    &[],
                )
                .await
                .map_err(db_err)?;
            Ok(rows
                .iter()
                .map(|r| {
                    let quota: Option<i64> = r.get(2);
                    (
                        r.get::<_, String>(0),
                        r.get::<_, String>(1),
                        quota.map(|q| if q == UNLIMITED { u64::MAX } else { q as u64 }),
                    )
                })
                .collect::<Vec<_>>())
        })?;
        for (address, hash, quota) in rows {
            write_line(
                out,
                &Line::User {
                    address,
                    hash,
                    quota,
                },
            )?;
            c.users += 1;
        }
        let aliases = self.block_on(|db| async move { db.aliases().await })?;
        for (alias, targets) in aliases {
            write_line(out, &Line::Alias { alias, targets })?;
            c.aliases += 1;
        }
        let mut after = (String::new(), -1i64);
        loop {
            let from = after.clone();
            let page = self.block_on(|db| async move {
                let client = db.client().await?;
                let rows = client
                    .query(
                        "SELECT m.mailbox, m.id, m.prefix, coalesce(m.content, c.data) \
                         FROM mail m LEFT JOIN content c ON c.id = m.id \
                         WHERE (m.mailbox, m.id) > ($1, $2) ORDER BY m.mailbox, m.id LIMIT $3",
                        &[&from.0, &from.1, &PAGE],
                    )
                    .await
                    .map_err(db_err)?;
                Ok(rows
                    .iter()
                    .map(|r| {
                        (
                            r.get::<_, String>(0),
                            r.get::<_, i64>(1),
                            r.get::<_, Vec<u8>>(2),
                            r.get::<_, Option<Vec<u8>>>(3),
                        )
                    })
                    .collect::<Vec<_>>())
            })?;
            let Some(last) = page.last() else { break };
            after = (last.0.clone(), last.1);
            for (mailbox, key, prefix, content) in page {
                let Some(content) = content else {
                    eprintln!("postino: skipped a mail record: no content for {mailbox} {key}");
                    c.skipped += 1;
                    continue;
                };
                write_line(
                    out,
                    &Line::Mail {
                        mailbox,
                        key: key as u64,
                        prefix: B64.encode(prefix),
                        content: B64.encode(content),
                    },
                )?;
                c.mail += 1;
            }
        }
        let mut after = -1i64;
        loop {
            let page = self.block_on(move |db| async move {
                let client = db.client().await?;
                let rows = client
                    .query(
                        "SELECT q.id, q.entry, q.next_attempt, coalesce(q.content, c.data) \
                         FROM queue q LEFT JOIN content c ON c.id = q.id \
                         WHERE q.id > $1 ORDER BY q.id LIMIT $2",
                        &[&after, &PAGE],
                    )
                    .await
                    .map_err(db_err)?;
                rows.iter()
                    .map(|r| {
                        let v: serde_json::Value = r.get(1);
                        let mut entry: QueueEntry =
                            serde_json::from_value(v).map_err(|e| codec("queue", e))?;
                        entry.next_attempt = r.get::<_, i64>(2) as u64;
                        Ok((r.get::<_, i64>(0), entry, r.get::<_, Option<Vec<u8>>>(3)))
                    })
                    .collect::<Result<Vec<_>, StoreError>>()
            })?;
            let Some(last) = page.last() else { break };
            after = last.0;
            for (_, entry, content) in page {
                let Some(content) = content else {
                    eprintln!(
                        "postino: skipped a queue record: no content for {}",
                        entry.id
                    );
                    c.skipped += 1;
                    continue;
                };
                let content = B64.encode(content);
                write_line(out, &Line::Queue { entry, content })?;
                c.queue += 1;
            }
        }
        let inbound = self.block_on(|db| async move {
            let client = db.client().await?;
            let rows = client
                .query(
                    "SELECT i.envelope, i.local_done, i.queued, i.bounce, c.data \
                     FROM inbound i LEFT JOIN content c ON c.id = i.id ORDER BY i.id",
                    &[],
                )
                .await
                .map_err(db_err)?;
            rows.iter()
                .map(|r| {
                    let v: serde_json::Value = r.get(0);
                    let envelope: Envelope =
                        serde_json::from_value(v).map_err(|e| codec("inbound", e))?;
                    Ok((
                        envelope,
                        r.get::<_, Vec<String>>(1),
                        r.get::<_, bool>(2),
                        r.get::<_, Option<i64>>(3).map(|b| MessageId(b as u64)),
                        r.get::<_, Option<Vec<u8>>>(4),
                    ))
                })
                .collect::<Result<Vec<_>, StoreError>>()
        })?;
        for (envelope, local_done, queued, bounce, content) in inbound {
            let Some(content) = content else {
                eprintln!(
                    "postino: skipped an inbound record: no content for {}",
                    envelope.id
                );
                c.skipped += 1;
                continue;
            };
            write_line(
                out,
                &Line::Inbound {
                    envelope,
                    local_done,
                    queued,
                    bounce,
                    content: B64.encode(content),
                },
            )?;
            c.inbound += 1;
        }
        write_line(out, &Line::End(c.clone()))?;
        out.flush()?;
        Ok(c)
    }

    /// Fills an empty database from an export (of either backend), in one
    /// transaction. Ids and UIDLs stay what they were; new ids start above
    /// every imported one. Run it from outside async code.
    ///
    /// # Errors
    ///
    /// The database holds users, aliases, mail or queue entries already;
    /// the input is not a complete export; a database error.
    pub fn import(&self, input: &mut dyn BufRead) -> Result<Counts, BackupError> {
        let (tx, rx) = mpsc::channel::<Line>(256);
        let rt = self.inner.rt.as_ref().expect("runtime until drop");
        let db = self.inner.db.clone();
        let writer = rt.spawn(async move { write_import(db, rx).await });
        // A failed send: the writer stopped, and its error is the one to
        // report.
        let read = read_export(input, |_, line| Ok(tx.blocking_send(line).is_ok()));
        drop(tx);
        let written = std::thread::scope(|s| {
            s.spawn(|| rt.block_on(writer))
                .join()
                .unwrap_or_else(|_| Ok(Err(db_err("import panicked"))))
        })
        .unwrap_or_else(|e| Err(db_err(e)));
        let counts = read?;
        written?;
        Ok(counts)
    }
}

async fn write_import(
    db: std::sync::Arc<crate::Db>,
    mut rx: mpsc::Receiver<Line>,
) -> Result<(), StoreError> {
    let mut client = db.client().await?;
    let tx = client.transaction().await.map_err(db_err)?;
    let used: i64 = tx
        .query_one(
            "SELECT (SELECT count(*) FROM users) + (SELECT count(*) FROM aliases) \
             + (SELECT count(*) FROM mail) + (SELECT count(*) FROM queue) \
             + (SELECT count(*) FROM inbound)",
            &[],
        )
        .await
        .map_err(db_err)?
        .get(0);
    if used > 0 {
        return Err(db_err(
            "the database is not empty: import only into a new database",
        ));
    }
    let b64 = |s: &str| B64.decode(s).map_err(|e| codec("base64", e));
    let mut max_id = 0i64;
    let mut epoch = None;
    let mut ended = false;
    while let Some(line) = rx.recv().await {
        match line {
            Line::Header { uidl_epoch, .. } => {
                epoch = Some(uidl_epoch);
                tx.execute(
                    "UPDATE meta SET value = $1 WHERE name = 'uidl_epoch'",
                    &[&uidl_epoch.to_string()],
                )
                .await
                .map_err(db_err)?;
            }
            Line::User {
                address,
                hash,
                quota,
            } => {
                let quota = quota.map(|q| q.min(UNLIMITED as u64) as i64);
                tx.execute(
                    "INSERT INTO users (address, hash, quota) VALUES ($1, $2, $3)",
                    &[&canonical(&address)?, &hash, &quota],
                )
                .await
                .map_err(db_err)?;
            }
            Line::Alias { alias, targets } => {
                tx.execute(
                    "INSERT INTO aliases (alias, targets) VALUES ($1, $2)",
                    &[&canonical(&alias)?, &targets],
                )
                .await
                .map_err(db_err)?;
            }
            Line::Mail {
                mailbox,
                key,
                prefix,
                content,
            } => {
                let (prefix, content) = (b64(&prefix)?, b64(&content)?);
                let size = (prefix.len() + content.len()) as i64;
                tx.execute(
                    "INSERT INTO mail (mailbox, id, prefix, size, content) VALUES ($1, $2, $3, $4, $5)",
                    &[&canonical(&mailbox)?, &(key as i64), &prefix, &size, &content],
                )
                .await
                .map_err(db_err)?;
                max_id = max_id.max(key as i64);
            }
            Line::Queue { entry, content } => {
                let content = b64(&content)?;
                let value = serde_json::to_value(&entry).map_err(|e| codec("queue", e))?;
                tx.execute(
                    "INSERT INTO queue (id, entry, next_attempt, content) VALUES ($1, $2, $3, $4)",
                    &[
                        &(entry.id.0 as i64),
                        &Json(&value),
                        &(entry.next_attempt as i64),
                        &content,
                    ],
                )
                .await
                .map_err(db_err)?;
                max_id = max_id.max(entry.id.0 as i64);
            }
            Line::Inbound {
                envelope,
                local_done,
                queued,
                bounce,
                content,
            } => {
                let content = b64(&content)?;
                let id = envelope.id.0 as i64;
                let value = serde_json::to_value(&envelope).map_err(|e| codec("inbound", e))?;
                let bounce = bounce.map(|b| b.0 as i64);
                tx.execute(
                    "INSERT INTO content (id, data, refs) VALUES ($1, $2, 1)",
                    &[&id, &content],
                )
                .await
                .map_err(db_err)?;
                tx.execute(
                    "INSERT INTO inbound (id, envelope, local_done, queued, bounce) \
                     VALUES ($1, $2, $3, $4, $5)",
                    &[&id, &Json(&value), &local_done, &queued, &bounce],
                )
                .await
                .map_err(db_err)?;
                max_id = max_id.max(id).max(bounce.unwrap_or(0));
            }
            Line::End(_) => ended = true,
        }
    }
    if !ended {
        // The reader stopped early: roll back (dropping the transaction).
        return Ok(());
    }
    // New ids start above every imported one (a UIDL is never reused).
    tx.execute(
        "SELECT setval('message_ids', greatest($1, (SELECT last_value FROM message_ids)))",
        &[&max_id],
    )
    .await
    .map_err(db_err)?;
    tx.commit().await.map_err(db_err)?;
    if let Some(epoch) = epoch {
        db.uidl_epoch.store(epoch, Ordering::Relaxed);
    }
    Ok(())
}
