//! Message histories (`postino trace`): one row per event. Events ride the
//! next group commit without a waiter (as on sled, a crash may lose the
//! last events of a history, never mail), capped per message: the last
//! event kept says the rest were dropped.

use std::sync::atomic::Ordering;
use std::time::Duration;

use postino_core::message::MessageId;
use postino_core::store::{StoreError, TraceEvent, TraceKind};

use crate::commit::Write;
use crate::{codec, db_err, Db};

/// Inserts the history events of one group-commit batch, in one
/// statement: event i is message `$1[i]`'s event `$3[i]` at `$2[i]`, the
/// `$4[i]`-th of that message in the batch, in the order sent. Each
/// message keeps at most `$5` events and the last one kept becomes `$6`
/// (`Truncated`): k = the event's place in the batch + the message's
/// events before the statement is its number; it is stored if k ≤ `$5`,
/// as the marker if k = `$5` — what one insert per event, each counting
/// the rows before it, kept. k is computed once per event (`OFFSET 0`
/// keeps the planner from copying the count into both the test and the
/// `CASE`). Rows are inserted in array order (`ORDER BY ord`), so `seq`
/// keeps each message's events in order.
pub(crate) const INSERT: &str = "INSERT INTO trace (id, at, what) \
     SELECT s.id, s.at, CASE WHEN s.k = $5::bigint THEN $6::jsonb ELSE s.what END \
     FROM (SELECT u.id, u.at, u.what, u.ord, \
                  u.r + (SELECT count(*) FROM trace t WHERE t.id = u.id) AS k \
           FROM unnest($1::bigint[], $2::bigint[], $3::jsonb[], $4::bigint[]) \
                WITH ORDINALITY AS u(id, at, what, r, ord) \
           OFFSET 0) AS s \
     WHERE s.k <= $5::bigint \
     ORDER BY s.ord";

/// `TraceKind::Truncated` as stored.
pub(crate) fn truncated() -> serde_json::Value {
    serde_json::to_value(TraceKind::Truncated).unwrap_or_default()
}

impl Db {
    pub(crate) fn trace(&self, id: MessageId, at: u64, what: TraceKind) {
        let max = self.trace_max.load(Ordering::Relaxed);
        if max == 0 {
            return;
        }
        match serde_json::to_value(&what) {
            Ok(what) => self.commit.send(Write::Trace {
                id,
                at: at as i64,
                what,
                max: max.min(i64::MAX as u64) as i64,
            }),
            Err(e) => tracing::warn!(%id, error = %e, "cannot record a history event"),
        }
    }

    pub(crate) async fn history(&self, id: MessageId) -> Result<Vec<TraceEvent>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT at, what FROM trace WHERE id = $1 ORDER BY seq",
                &[&(id.0 as i64)],
            )
            .await
            .map_err(db_err)?;
        rows.iter()
            .map(|r| {
                let what: serde_json::Value = r.get(1);
                Ok(TraceEvent {
                    at: r.get::<_, i64>(0) as u64,
                    what: serde_json::from_value(what).map_err(|e| codec("trace", e))?,
                })
            })
            .collect()
    }

    pub(crate) async fn sweep_trace(&self, now: u64, keep: Duration) -> Result<usize, StoreError> {
        let cutoff = now.saturating_sub(keep.as_secs()) as i64;
        let client = self.client().await?;
        let n = client
            .execute("DELETE FROM trace WHERE at < $1", &[&cutoff])
            .await
            .map_err(db_err)?;
        Ok(n as usize)
    }
}
