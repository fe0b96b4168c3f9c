//! The delivery queue, shared by the nodes: due entries are claimed with a
//! lease (`FOR UPDATE SKIP LOCKED`, so two nodes claiming at once never get
//! the same entry and never wait for each other), settled by the lease's
//! holder only; an expired lease is claimable by any node, so the work of a
//! node that died is taken over once its leases run out (a message whose
//! round was cut short may then go out twice: only in that window).
//!
//! `entry` holds the [`QueueEntry`] as JSON; `next_attempt` and
//! `held_since` are columns of their own, which the schedule reads (the
//! entry's own `next_attempt` is kept equal).

use std::time::Duration;

use bytes::Bytes;
use postino_core::message::MessageId;
use postino_core::store::{Notice, QueueEntry, QueueItem, Rescheduled, StoreError};
use tokio_postgres::types::Json;
use tokio_postgres::{Row, SimpleQueryMessage};

use crate::intake::{release, spool_in};
use crate::{codec, db_err, Db};

use postino_core::storage::Lease as Claim;

fn entry_of(row: &Row, entry: usize, next_attempt: usize) -> Result<QueueEntry, StoreError> {
    let v: serde_json::Value = row.get(entry);
    let mut e: QueueEntry = serde_json::from_value(v).map_err(|e| codec("queue", e))?;
    e.next_attempt = row.get::<_, i64>(next_attempt) as u64;
    Ok(e)
}

fn json(entry: &QueueEntry) -> Result<serde_json::Value, StoreError> {
    serde_json::to_value(entry).map_err(|e| codec("queue", e))
}

impl Db {
    pub(crate) async fn claim_due(
        &self,
        now: u64,
        node: &str,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<(QueueEntry, Claim)>, StoreError> {
        let until = now.saturating_add(lease.as_secs().max(1));
        let client = self.client().await?;
        let rows = client
            .query(
                "UPDATE queue q SET lease_owner = $2, lease_until = $3, \
                     lease_token = nextval('lease_tokens') \
                 FROM (SELECT id FROM queue \
                       WHERE held_since IS NULL AND next_attempt <= $1 \
                         AND (lease_until IS NULL OR lease_until <= $1) \
                       ORDER BY next_attempt, id LIMIT $4 \
                       FOR UPDATE SKIP LOCKED) due \
                 WHERE q.id = due.id \
                 RETURNING q.entry, q.next_attempt, q.lease_token",
                &[&(now as i64), &node, &(until as i64), &(limit as i64)],
            )
            .await
            .map_err(db_err)?;
        let mut out = rows
            .iter()
            .map(|r| {
                let entry = entry_of(r, 0, 1)?;
                let claim = Claim {
                    id: entry.id,
                    node: node.to_owned(),
                    until,
                    token: r.get::<_, i64>(2) as u64,
                };
                Ok((entry, claim))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        out.sort_by_key(|(e, _)| (e.next_attempt, e.id));
        Ok(out)
    }

    /// Claims entry `id`, due or not, unless held or under a live lease.
    pub(crate) async fn claim(
        &self,
        id: MessageId,
        now: u64,
        node: &str,
        lease: Duration,
    ) -> Result<Option<(QueueEntry, Claim)>, StoreError> {
        let until = now.saturating_add(lease.as_secs().max(1));
        // A concurrent claim of the same row waits for the other's
        // commit, then sees its lease and claims nothing.
        let row = self
            .query_cached(
                "UPDATE queue SET lease_owner = $3, lease_until = $4, \
                     lease_token = nextval('lease_tokens') \
                 WHERE id = $1 AND held_since IS NULL \
                   AND (lease_until IS NULL OR lease_until <= $2) \
                 RETURNING entry, next_attempt, lease_token",
                &[&(id.0 as i64), &(now as i64), &node, &(until as i64)],
            )
            .await?;
        row.map(|r| {
            let entry = entry_of(&r, 0, 1)?;
            let claim = Claim {
                id,
                node: node.to_owned(),
                until,
                token: r.get::<_, i64>(2) as u64,
            };
            Ok((entry, claim))
        })
        .transpose()
    }

    pub(crate) async fn renew(
        &self,
        claim: &Claim,
        now: u64,
        extend: Duration,
    ) -> Result<Claim, StoreError> {
        let until = now.saturating_add(extend.as_secs().max(1));
        let client = self.client().await?;
        let n = client
            .execute(
                "UPDATE queue SET lease_until = $3 WHERE id = $1 AND lease_token = $2",
                &[&(claim.id.0 as i64), &(claim.token as i64), &(until as i64)],
            )
            .await
            .map_err(db_err)?;
        if n == 0 {
            return Err(StoreError::LeaseLost { id: claim.id });
        }
        Ok(Claim {
            until,
            ..claim.clone()
        })
    }

    /// [`Db::renew`] for many claims in one statement.
    pub(crate) async fn renew_all(
        &self,
        claims: &[Claim],
        now: u64,
        extend: Duration,
    ) -> Result<Vec<Claim>, StoreError> {
        if claims.is_empty() {
            return Ok(Vec::new());
        }
        let until = now.saturating_add(extend.as_secs().max(1));
        let ids: Vec<i64> = claims.iter().map(|c| c.id.0 as i64).collect();
        let tokens: Vec<i64> = claims.iter().map(|c| c.token as i64).collect();
        let client = self.client().await?;
        let rows = client
            .query(
                "UPDATE queue q SET lease_until = $3 \
                 FROM unnest($1::bigint[], $2::bigint[]) AS l(id, token) \
                 WHERE q.id = l.id AND q.lease_token = l.token \
                 RETURNING q.id, q.lease_token",
                &[&ids, &tokens, &(until as i64)],
            )
            .await
            .map_err(db_err)?;
        let kept: std::collections::HashSet<(i64, i64)> =
            rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        Ok(claims
            .iter()
            .filter(|c| kept.contains(&(c.id.0 as i64, c.token as i64)))
            .map(|c| Claim { until, ..c.clone() })
            .collect())
    }

    pub(crate) async fn unclaim(&self, claim: &Claim) -> Result<(), StoreError> {
        let client = self.client().await?;
        let n = client
            .execute(
                "UPDATE queue SET lease_owner = NULL, lease_until = NULL, lease_token = NULL \
                 WHERE id = $1 AND lease_token = $2",
                &[&(claim.id.0 as i64), &(claim.token as i64)],
            )
            .await
            .map_err(db_err)?;
        if n > 0 {
            client
                .batch_execute("NOTIFY postino_queue")
                .await
                .map_err(db_err)?;
        }
        Ok(())
    }

    pub(crate) async fn settle(
        &self,
        claim: &Claim,
        entry: &QueueEntry,
        remove: bool,
        notices: &[Notice],
    ) -> Result<(), StoreError> {
        let id = entry.id;
        let key = id.0 as i64;
        // The common end, a delivered message with its own content and no
        // notice: one round trip, not waiting for the WAL flush (as sled's
        // settle does not wait for its flush either). A crash of PostgreSQL
        // before the flush brings the entry back: delivered again, as
        // after any cut-short round. If it deleted nothing (lease lost,
        // entry gone, shared content), the transaction below finds out
        // which. Only integers go into the text.
        if remove && notices.is_empty() {
            let client = self.client().await?;
            let answers = match client
                .simple_query(&format!(
                    "BEGIN; SET LOCAL synchronous_commit = off; \
                     DELETE FROM queue WHERE id = {key} AND lease_token = {} \
                     AND content IS NOT NULL; COMMIT",
                    claim.token as i64
                ))
                .await
            {
                Ok(answers) => answers,
                Err(e) => {
                    // A statement failed after BEGIN: the connection goes
                    // back to the pool out of the aborted transaction.
                    let _ = client.batch_execute("ROLLBACK").await;
                    return Err(db_err(e));
                }
            };
            let deleted = answers
                .iter()
                .filter_map(|m| match m {
                    SimpleQueryMessage::CommandComplete(n) => Some(*n),
                    _ => None,
                })
                .nth(2);
            if deleted == Some(1) {
                return Ok(());
            }
        }
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_err)?;
        let row = tx
            .query_opt(
                "SELECT lease_token, content IS NULL FROM queue WHERE id = $1 FOR UPDATE",
                &[&key],
            )
            .await
            .map_err(db_err)?
            .ok_or(StoreError::NotFound { what: "queue", id })?;
        if row.get::<_, Option<i64>>(0) != Some(claim.token as i64) {
            return Err(StoreError::LeaseLost { id });
        }
        let shared: bool = row.get(1);
        for notice in notices {
            if !spool_in(&tx, &notice.envelope, &notice.content).await? {
                return Err(StoreError::Duplicate(notice.envelope.id));
            }
        }
        if remove {
            tx.execute("DELETE FROM queue WHERE id = $1", &[&key])
                .await
                .map_err(db_err)?;
            if shared {
                release(&tx, key).await?;
            }
        } else {
            tx.execute(
                "UPDATE queue SET entry = $2, next_attempt = $3, \
                     lease_owner = NULL, lease_until = NULL, lease_token = NULL \
                 WHERE id = $1",
                &[&key, &Json(json(entry)?), &(entry.next_attempt as i64)],
            )
            .await
            .map_err(db_err)?;
        }
        tx.commit().await.map_err(db_err)
    }

    pub(crate) async fn queue_entry(
        &self,
        id: MessageId,
    ) -> Result<Option<QueueEntry>, StoreError> {
        let row = self
            .query_cached(
                "SELECT entry, next_attempt FROM queue WHERE id = $1",
                &[&(id.0 as i64)],
            )
            .await?;
        row.map(|r| entry_of(&r, 0, 1)).transpose()
    }

    pub(crate) async fn queue_page(
        &self,
        after: Option<MessageId>,
        limit: usize,
        only: Option<MessageId>,
    ) -> Result<Vec<QueueItem>, StoreError> {
        let after = after.map_or(-1, |a| a.0 as i64);
        let only = only.map(|o| o.0 as i64);
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT q.entry, q.next_attempt, q.held_since IS NOT NULL, \
                     coalesce(octet_length(q.content), octet_length(c.data), 0), \
                     CASE WHEN q.lease_until > extract(epoch FROM now()) \
                          THEN q.lease_owner END \
                 FROM queue q LEFT JOIN content c ON c.id = q.id AND q.content IS NULL \
                 WHERE q.id > $1 AND ($3::bigint IS NULL OR q.id = $3) \
                 ORDER BY q.id LIMIT $2",
                &[&after, &(limit as i64), &only],
            )
            .await
            .map_err(db_err)?;
        rows.iter()
            .map(|r| {
                Ok(QueueItem {
                    entry: entry_of(r, 0, 1)?,
                    held: r.get(2),
                    size: r.get::<_, i32>(3) as u64,
                    leased_by: r.get(4),
                })
            })
            .collect()
    }

    pub(crate) async fn queue_len(&self) -> Result<usize, StoreError> {
        let client = self.client().await?;
        let n: i64 = client
            .query_one("SELECT count(*) FROM queue", &[])
            .await
            .map_err(db_err)?
            .get(0);
        Ok(n as usize)
    }

    pub(crate) async fn oldest_queued(&self) -> Result<Option<u64>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT entry, next_attempt FROM queue ORDER BY id LIMIT 1",
                &[],
            )
            .await
            .map_err(db_err)?;
        Ok(row
            .map(|r| entry_of(&r, 0, 1))
            .transpose()?
            .map(|e| e.received_at))
    }

    /// When the earliest entry not under a live lease is due (a node polls
    /// now and then, so it also finds leases that ran out).
    pub(crate) async fn next_due_time(&self, now: u64) -> Result<Option<u64>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT min(next_attempt) FROM queue \
                 WHERE held_since IS NULL AND (lease_until IS NULL OR lease_until <= $1)",
                &[&(now as i64)],
            )
            .await
            .map_err(db_err)?;
        Ok(row.get::<_, Option<i64>>(0).map(|t| t as u64))
    }

    pub(crate) async fn queued_content(&self, id: MessageId) -> Result<Option<Bytes>, StoreError> {
        let row = self
            .query_cached(
                "SELECT coalesce(q.content, c.data) FROM queue q \
                 LEFT JOIN content c ON c.id = q.id WHERE q.id = $1",
                &[&(id.0 as i64)],
            )
            .await?;
        Ok(row
            .and_then(|r| r.get::<_, Option<Vec<u8>>>(0))
            .map(Bytes::from))
    }

    pub(crate) async fn update_queue(&self, entry: &QueueEntry) -> Result<(), StoreError> {
        let client = self.client().await?;
        let n = client
            .execute(
                "UPDATE queue SET entry = $2, next_attempt = $3 WHERE id = $1",
                &[
                    &(entry.id.0 as i64),
                    &Json(json(entry)?),
                    &(entry.next_attempt as i64),
                ],
            )
            .await
            .map_err(db_err)?;
        if n == 0 {
            return Err(StoreError::NotFound {
                what: "queue",
                id: entry.id,
            });
        }
        Ok(())
    }

    pub(crate) async fn remove_queue(&self, id: MessageId) -> Result<(), StoreError> {
        let key = id.0 as i64;
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_err)?;
        let row = tx
            .query_opt(
                "DELETE FROM queue WHERE id = $1 RETURNING content IS NULL",
                &[&key],
            )
            .await
            .map_err(db_err)?;
        if row.is_some_and(|r| r.get::<_, bool>(0)) {
            release(&tx, key).await?;
        }
        tx.commit().await.map_err(db_err)
    }

    pub(crate) async fn hold(&self, id: MessageId, now: u64) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "WITH old AS (SELECT id, held_since FROM queue WHERE id = $1 FOR UPDATE) \
                 UPDATE queue q SET held_since = coalesce(old.held_since, $2) FROM old \
                 WHERE q.id = old.id RETURNING old.held_since IS NULL",
                &[&(id.0 as i64), &(now as i64)],
            )
            .await
            .map_err(db_err)?
            .ok_or(StoreError::NotFound { what: "queue", id })?;
        Ok(row.get(0))
    }

    pub(crate) async fn release(&self, id: MessageId, at: u64) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "WITH old AS (SELECT id, held_since FROM queue WHERE id = $1 FOR UPDATE) \
                 UPDATE queue q SET held_since = NULL, \
                     next_attempt = CASE WHEN old.held_since IS NULL THEN q.next_attempt ELSE $2 END, \
                     entry = CASE WHEN old.held_since IS NULL THEN q.entry \
                         ELSE jsonb_set(q.entry, '{next_attempt}', to_jsonb($2)) END \
                 FROM old WHERE q.id = old.id RETURNING old.held_since IS NOT NULL",
                &[&(id.0 as i64), &(at as i64)],
            )
            .await
            .map_err(db_err)?
            .ok_or(StoreError::NotFound { what: "queue", id })?;
        let released: bool = row.get(0);
        if released {
            client
                .batch_execute("NOTIFY postino_queue")
                .await
                .map_err(db_err)?;
        }
        Ok(released)
    }

    pub(crate) async fn reschedule(
        &self,
        id: MessageId,
        at: u64,
        reset: bool,
    ) -> Result<Rescheduled, StoreError> {
        let key = id.0 as i64;
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_err)?;
        let row = tx
            .query_opt(
                "SELECT entry, next_attempt, held_since IS NOT NULL FROM queue \
                 WHERE id = $1 FOR UPDATE",
                &[&key],
            )
            .await
            .map_err(db_err)?
            .ok_or(StoreError::NotFound { what: "queue", id })?;
        if row.get::<_, bool>(2) {
            return Ok(Rescheduled::Held);
        }
        let mut entry = entry_of(&row, 0, 1)?;
        entry.next_attempt = at;
        if reset {
            entry.attempts = 0;
            entry.warned = false;
        }
        tx.execute(
            "UPDATE queue SET entry = $2, next_attempt = $3 WHERE id = $1",
            &[&key, &Json(json(&entry)?), &(at as i64)],
        )
        .await
        .map_err(db_err)?;
        tx.batch_execute("NOTIFY postino_queue")
            .await
            .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        Ok(Rescheduled::Done)
    }
}
