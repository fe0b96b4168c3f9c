//! Accepting messages (through the group committer) and the dispatch
//! steps of spooled ones.
//!
//! Dispatch steps may be repeated after a crash, and in a cluster by two
//! nodes at once (a node recovering the spool while the one that accepted
//! the message is still at it): each step locks the message's `inbound`
//! row (`FOR UPDATE`) and records what it did in it, in one transaction,
//! so a repeat does nothing twice.

use bytes::Bytes;
use deadpool_postgres::GenericClient;
use postino_core::message::{Envelope, MessageId};
use postino_core::store::{canonical_mailbox as canonical, LocalDelivery, QueueEntry, StoreError};
use tokio_postgres::types::Json;

use crate::commit::Write;
use crate::{codec, db_err, Db};

/// Drops one reference to the shared content of message `id`, deleting it
/// with the last one.
pub(crate) async fn release(client: &impl GenericClient, id: i64) -> Result<(), StoreError> {
    client
        .execute(
            "WITH kept AS (UPDATE content SET refs = refs - 1 WHERE id = $1 AND refs > 1 \
             RETURNING id) \
             DELETE FROM content WHERE id = $1 AND NOT EXISTS (SELECT 1 FROM kept)",
            &[&id],
        )
        .await
        .map_err(db_err)?;
    Ok(())
}

/// [`release`] for several.
pub(crate) async fn release_all(
    client: &impl GenericClient,
    ids: &[i64],
) -> Result<(), StoreError> {
    for id in ids {
        release(client, *id).await?;
    }
    Ok(())
}

/// Spools `envelope` with `content` inside a transaction; false if the id
/// is in use.
pub(crate) async fn spool_in(
    client: &impl GenericClient,
    envelope: &Envelope,
    content: &[u8],
) -> Result<bool, StoreError> {
    let value = serde_json::to_value(envelope).map_err(|e| codec("inbound", e))?;
    let n = client
        .execute(
            "WITH c AS (INSERT INTO content (id, data, refs) VALUES ($1, $2, 1) \
             ON CONFLICT DO NOTHING RETURNING id) \
             INSERT INTO inbound (id, envelope) SELECT id, $3 FROM c",
            &[&(envelope.id.0 as i64), &content, &Json(&value)],
        )
        .await
        .map_err(db_err)?;
    Ok(n == 1)
}

impl Db {
    pub(crate) async fn accept_local(
        &self,
        id: MessageId,
        content: Bytes,
        deliveries: Vec<LocalDelivery>,
    ) -> Result<(), StoreError> {
        let mut entries: Vec<(String, Vec<u8>)> = Vec::with_capacity(deliveries.len());
        for d in deliveries {
            let mailbox = canonical(&d.mailbox)?;
            if !entries.iter().any(|(m, _)| *m == mailbox) {
                entries.push((mailbox, d.prefix));
            }
        }
        if entries.is_empty() {
            return Ok(());
        }
        self.commit
            .commit(Write::Local {
                id,
                content,
                entries,
            })
            .await
    }

    pub(crate) async fn accept_remote(
        &self,
        entry: &QueueEntry,
        content: Bytes,
    ) -> Result<(), StoreError> {
        let value = serde_json::to_value(entry).map_err(|e| codec("queue", e))?;
        self.commit
            .commit(Write::Remote {
                id: entry.id,
                entry: value,
                next_attempt: entry.next_attempt as i64,
                content,
            })
            .await
    }

    pub(crate) async fn spool(
        &self,
        envelope: &Envelope,
        content: Bytes,
    ) -> Result<(), StoreError> {
        let value = serde_json::to_value(envelope).map_err(|e| codec("inbound", e))?;
        self.commit
            .commit(Write::Spool {
                id: envelope.id,
                envelope: value,
                content,
            })
            .await
    }

    pub(crate) async fn spool_bounce(
        &self,
        original: MessageId,
        bounce: &Envelope,
        content: &[u8],
    ) -> Result<bool, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_err)?;
        let row = tx
            .query_opt(
                "SELECT bounce FROM inbound WHERE id = $1 FOR UPDATE",
                &[&(original.0 as i64)],
            )
            .await
            .map_err(db_err)?
            .ok_or(StoreError::NotFound {
                what: "inbound",
                id: original,
            })?;
        if row.get::<_, Option<i64>>(0).is_some() {
            return Ok(false);
        }
        if !spool_in(&tx, bounce, content).await? {
            return Err(StoreError::Duplicate(bounce.id));
        }
        tx.execute(
            "UPDATE inbound SET bounce = $2 WHERE id = $1",
            &[&(original.0 as i64), &(bounce.id.0 as i64)],
        )
        .await
        .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        Ok(true)
    }

    pub(crate) async fn inbound(&self) -> Result<Vec<Envelope>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query("SELECT envelope FROM inbound ORDER BY id", &[])
            .await
            .map_err(db_err)?;
        rows.iter()
            .map(|r| {
                let v: serde_json::Value = r.get(0);
                serde_json::from_value(v).map_err(|e| codec("inbound", e))
            })
            .collect()
    }

    pub(crate) async fn content(&self, id: MessageId) -> Result<Option<Bytes>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt("SELECT data FROM content WHERE id = $1", &[&(id.0 as i64)])
            .await
            .map_err(db_err)?;
        Ok(row.map(|r| Bytes::from(r.get::<_, Vec<u8>>(0))))
    }

    pub(crate) async fn deliver_local(
        &self,
        id: MessageId,
        deliveries: &[LocalDelivery],
    ) -> Result<(), StoreError> {
        let wanted = deliveries
            .iter()
            .map(|d| Ok((canonical(&d.mailbox)?, d.prefix.as_slice())))
            .collect::<Result<Vec<_>, StoreError>>()?;
        let key = id.0 as i64;
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_err)?;
        let row = tx
            .query_opt(
                "SELECT local_done, (SELECT octet_length(data) FROM content WHERE id = $1) \
                 FROM inbound WHERE id = $1 FOR UPDATE",
                &[&key],
            )
            .await
            .map_err(db_err)?
            .ok_or(StoreError::NotFound {
                what: "inbound",
                id,
            })?;
        let mut done: Vec<String> = row.get(0);
        let len: Option<i32> = row.get(1);
        let len = len.ok_or(StoreError::NotFound {
            what: "content",
            id,
        })? as i64;
        let mut added = 0i32;
        let mut changed = false;
        for (mailbox, prefix) in wanted {
            if done.contains(&mailbox) {
                continue;
            }
            added += tx
                .execute(
                    "INSERT INTO mail (mailbox, id, prefix, size) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT DO NOTHING",
                    &[&mailbox, &key, &prefix, &(prefix.len() as i64 + len)],
                )
                .await
                .map_err(db_err)? as i32;
            done.push(mailbox);
            changed = true;
        }
        if !changed {
            return Ok(());
        }
        if added > 0 {
            tx.execute(
                "UPDATE content SET refs = refs + $2 WHERE id = $1",
                &[&key, &added],
            )
            .await
            .map_err(db_err)?;
        }
        tx.execute(
            "UPDATE inbound SET local_done = $2 WHERE id = $1",
            &[&key, &done],
        )
        .await
        .map_err(db_err)?;
        tx.commit().await.map_err(db_err)
    }

    pub(crate) async fn enqueue(&self, entry: &QueueEntry) -> Result<(), StoreError> {
        let id = entry.id;
        let key = id.0 as i64;
        let value = serde_json::to_value(entry).map_err(|e| codec("queue", e))?;
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_err)?;
        let row = tx
            .query_opt(
                "SELECT queued FROM inbound WHERE id = $1 FOR UPDATE",
                &[&key],
            )
            .await
            .map_err(db_err)?
            .ok_or(StoreError::NotFound {
                what: "inbound",
                id,
            })?;
        if row.get::<_, bool>(0) {
            return Ok(());
        }
        let n = tx
            .execute(
                "INSERT INTO queue (id, entry, next_attempt) VALUES ($1, $2, $3) \
                 ON CONFLICT DO NOTHING",
                &[&key, &Json(&value), &(entry.next_attempt as i64)],
            )
            .await
            .map_err(db_err)?;
        if n == 1 {
            tx.execute("UPDATE content SET refs = refs + 1 WHERE id = $1", &[&key])
                .await
                .map_err(db_err)?;
        }
        tx.execute("UPDATE inbound SET queued = true WHERE id = $1", &[&key])
            .await
            .map_err(db_err)?;
        tx.batch_execute("NOTIFY postino_queue")
            .await
            .map_err(db_err)?;
        tx.commit().await.map_err(db_err)
    }

    pub(crate) async fn finish_inbound(&self, id: MessageId) -> Result<(), StoreError> {
        let key = id.0 as i64;
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_err)?;
        let n = tx
            .execute("DELETE FROM inbound WHERE id = $1", &[&key])
            .await
            .map_err(db_err)?;
        if n == 1 {
            release(&tx, key).await?;
        }
        tx.commit().await.map_err(db_err)
    }

    /// A message whose commit answer was lost and that was answered 4xx:
    /// whatever of it was written goes (ids are unique, so every row with
    /// its id is its). Best effort.
    pub(crate) async fn reject(&self, id: MessageId) -> Result<(), StoreError> {
        let key = id.0 as i64;
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_err)?;
        for table in ["mail", "queue", "inbound", "content"] {
            tx.execute(&format!("DELETE FROM {table} WHERE id = $1"), &[&key])
                .await
                .map_err(db_err)?;
        }
        tx.commit().await.map_err(db_err)
    }
}
