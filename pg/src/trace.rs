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
/// statement: event i is message `$1[i]`'s event `$3[i]` at `$2[i]`, in
/// the order sent. Each message keeps at most `$4` events and the last
/// one kept becomes `$5` (`Truncated`): an event is the r-th of its
/// message in this batch (`row_number()` in array order), and k = r + the
/// message's events before the statement is its number; it is stored if
/// k ≤ `$4`, as the marker if k = `$4` — what one insert per event, each
/// counting the rows before it, kept. k is computed once per event (the
/// `OFFSET 0` keeps the planner from copying the count into both the
/// test and the `CASE`, which counted twice). Rows are inserted in array
/// order (`ORDER BY ord`), so `seq` keeps each message's events in order.
pub(crate) const INSERT: &str = "INSERT INTO trace (id, at, what) \
     SELECT s.id, s.at, CASE WHEN s.k = $4::bigint THEN $5::jsonb ELSE s.what END \
     FROM (SELECT e.id, e.at, e.what, e.ord, h.n + e.r AS k \
           FROM (SELECT u.id, u.at, u.what, u.ord, \
                        row_number() OVER (PARTITION BY u.id ORDER BY u.ord) AS r \
                 FROM unnest($1::bigint[], $2::bigint[], $3::jsonb[]) \
                      WITH ORDINALITY AS u(id, at, what, ord)) AS e \
           JOIN (SELECT d.id, (SELECT count(*) FROM trace t WHERE t.id = d.id) AS n \
                 FROM (SELECT DISTINCT id FROM unnest($1::bigint[]) AS x(id)) AS d) AS h \
             ON h.id = e.id \
           OFFSET 0) AS s \
     WHERE s.k <= $4::bigint \
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
