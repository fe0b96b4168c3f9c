//! Mailboxes as POP3 reads them, and the RFC 1939 maildrop lock held
//! cluster-wide.
//!
//! UIDLs are `epoch.id` with the database's epoch and the message's id,
//! both the same whichever node answers (the sled store's format, so an
//! export moved between backends keeps them).
//!
//! The maildrop lock is a PostgreSQL session advisory lock on a hash of the
//! mailbox, held on a pooled connection that the lock keeps for as long as
//! it lives: released when the lock is dropped (`pg_advisory_unlock`, then
//! the connection goes back to the pool), and by the server itself when
//! the connection ends — so a node that dies (`kill -9`, a lost network)
//! loses its locks as soon as PostgreSQL notices, never holding a maildrop
//! for good.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use postino_core::message::MessageId;
use postino_core::store::{canonical_mailbox as canonical, MailEntry, StoreError};

use crate::{db_err, uidl, Db};

/// A held maildrop lock. Dropping it releases the lock (in the background,
/// on the store's runtime).
pub struct PgMaildropLock {
    mailbox: String,
    conn: Option<deadpool_postgres::Object>,
    runtime: tokio::runtime::Handle,
    /// Releases under way, by mailbox: `unlock_maildrop` waits for its own.
    unlocking: Unlocking,
}

/// Releases under way, by mailbox.
pub(crate) type Unlocking = Arc<Mutex<HashMap<String, tokio::task::JoinHandle<()>>>>;

/// Waits until the release of `mailbox`'s lock (if one is under way) is
/// done.
pub(crate) async fn unlocked(unlocking: &Unlocking, mailbox: &str) {
    let handle = unlocking
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(mailbox);
    if let Some(handle) = handle {
        let _ = handle.await;
    }
}

impl std::fmt::Debug for PgMaildropLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgMaildropLock")
            .field("mailbox", &self.mailbox)
            .finish_non_exhaustive()
    }
}

impl PgMaildropLock {
    /// The (canonical) mailbox this locks.
    pub fn mailbox(&self) -> &str {
        &self.mailbox
    }
}

impl postino_core::storage::MaildropLock for PgMaildropLock {
    fn mailbox(&self) -> &str {
        &self.mailbox
    }
}

impl Drop for PgMaildropLock {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        let mailbox = self.mailbox.clone();
        let release = self.runtime.spawn(async move {
            let unlocked = conn
                .query_one(
                    "SELECT pg_advisory_unlock(hashtextextended($1, 0))",
                    &[&mailbox],
                )
                .await
                .map(|r| r.get::<_, bool>(0));
            if !matches!(unlocked, Ok(true)) {
                // Not sure it is released: end the connection, which
                // releases every lock it holds.
                drop(deadpool_postgres::Object::take(conn));
            }
        });
        self.unlocking
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(std::mem::take(&mut self.mailbox), release);
    }
}

impl Db {
    pub(crate) async fn maildrop(&self, mailbox: &str) -> Result<Vec<MailEntry>, StoreError> {
        let mailbox = canonical(mailbox)?;
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT id, size FROM mail WHERE mailbox = $1 ORDER BY id",
                &[&mailbox],
            )
            .await
            .map_err(db_err)?;
        let epoch = self.uidl_epoch.load(std::sync::atomic::Ordering::Relaxed);
        Ok(rows
            .iter()
            .map(|r| {
                let key = r.get::<_, i64>(0) as u64;
                MailEntry {
                    key,
                    uidl: uidl(epoch, key),
                    size: r.get::<_, i64>(1) as u64,
                    id: MessageId(key),
                }
            })
            .collect())
    }

    pub(crate) async fn read_mail(
        &self,
        mailbox: &str,
        key: u64,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let mailbox = canonical(mailbox)?;
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT m.prefix, coalesce(m.content, c.data) FROM mail m \
                 LEFT JOIN content c ON c.id = m.id WHERE m.mailbox = $1 AND m.id = $2",
                &[&mailbox, &(key as i64)],
            )
            .await
            .map_err(db_err)?;
        let Some(row) = row else {
            return Ok(None);
        };
        let mut out: Vec<u8> = row.get(0);
        let content: Option<&[u8]> = row.get(1);
        let content = content.ok_or(StoreError::NotFound {
            what: "content",
            id: MessageId(key),
        })?;
        out.extend_from_slice(content);
        Ok(Some(out))
    }

    pub(crate) async fn delete_mail(
        &self,
        mailbox: &str,
        keys: &[u64],
    ) -> Result<usize, StoreError> {
        let mailbox = canonical(mailbox)?;
        let keys: Vec<i64> = keys.iter().map(|k| *k as i64).collect();
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_err)?;
        let rows = tx
            .query(
                "DELETE FROM mail WHERE mailbox = $1 AND id = ANY ($2) \
                 RETURNING id, content IS NULL",
                &[&mailbox, &keys],
            )
            .await
            .map_err(db_err)?;
        let shared: Vec<i64> = rows
            .iter()
            .filter(|r| r.get::<_, bool>(1))
            .map(|r| r.get(0))
            .collect();
        crate::intake::release_all(&tx, &shared).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(rows.len())
    }

    pub(crate) async fn lock_maildrop(
        &self,
        mailbox: &str,
    ) -> Result<Option<PgMaildropLock>, StoreError> {
        let mailbox = canonical(mailbox)?;
        let conn = self.client().await?;
        let locked: bool = conn
            .query_one(
                "SELECT pg_try_advisory_lock(hashtextextended($1, 0))",
                &[&mailbox],
            )
            .await
            .map_err(db_err)?
            .get(0);
        if !locked {
            return Ok(None);
        }
        Ok(Some(PgMaildropLock {
            mailbox,
            conn: Some(conn),
            runtime: tokio::runtime::Handle::current(),
            unlocking: self.unlocking.clone(),
        }))
    }
}
