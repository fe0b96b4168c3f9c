//! Group commit of the intake writes.
//!
//! Every SMTP session's end of DATA sends its write (a message for local
//! mailboxes, for the queue, or for the spool) to one committer task and
//! waits. The committer takes every write waiting (up to `max_batch`) and
//! sends them as one pipeline on its own connection: `BEGIN`, one
//! statement per write, a `pg_notify` when the queue grew, `COMMIT`. The
//! requests go out before any answer is read, so a batch costs about one
//! round trip and one WAL flush, however many messages it carries; while
//! it runs, the next batch gathers. Each waiter is answered only after
//! `COMMIT` returned: that is the 250 to DATA.
//!
//! Writes never fail one another: a duplicate id is an `ON CONFLICT DO
//! NOTHING` that inserted nothing (that write alone gets
//! [`StoreError::Duplicate`]). Any statement error, or a failed `COMMIT`,
//! fails the whole batch (every waiter answers 4xx; PostgreSQL rolled it
//! back — a `COMMIT` whose answer was lost may have committed, and that
//! message is then removed again through `reject`). History events ride
//! along without a waiter: all of a batch's events go in one statement
//! (`trace::INSERT`, arrays of the events), after the batch's writes.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;

use bytes::Bytes;
use postino_core::message::MessageId;
use postino_core::store::StoreError;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::types::{Json, ToSql};
use tokio_postgres::{Client, NoTls, Statement};

use crate::db_err;

/// One write for the committer.
pub(crate) enum Write {
    /// A message for local mailboxes: (canonical mailbox, prefix) each,
    /// deduplicated. One mailbox: content inline in its entry.
    Local {
        id: MessageId,
        content: Bytes,
        entries: Vec<(String, Vec<u8>)>,
    },
    /// A message for remote recipients only, straight into the queue.
    Remote {
        id: MessageId,
        entry: serde_json::Value,
        next_attempt: i64,
        content: Bytes,
    },
    /// A message into the intake spool.
    Spool {
        id: MessageId,
        envelope: serde_json::Value,
        content: Bytes,
    },
    /// Nothing: answered once everything sent before it is committed
    /// (`Intake::durable`, for history events, which have no waiter).
    Barrier,
    /// A history event (no waiter).
    Trace {
        id: MessageId,
        at: i64,
        what: serde_json::Value,
        max: i64,
    },
}

struct Pending {
    write: Write,
    done: Option<oneshot::Sender<Result<(), StoreError>>>,
}

/// The handle the store keeps: sends writes to the committer task.
pub(crate) struct Committer {
    tx: mpsc::Sender<Pending>,
    stats: Arc<Stats>,
}

#[derive(Default)]
struct Stats {
    commits: AtomicU64,
    writes: AtomicU64,
}

/// Writes waiting for the committer at most (back-pressure on intake).
const QUEUE: usize = 4096;

impl Committer {
    /// Connects the committer's connection and starts its task (on the
    /// current runtime: the store's).
    pub(crate) async fn start(
        config: tokio_postgres::Config,
        max_batch: usize,
    ) -> Result<Committer, StoreError> {
        let conn = Conn::connect(&config).await?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let stats = Arc::new(Stats::default());
        tokio::spawn(run(config, conn, rx, max_batch.max(1), stats.clone()));
        Ok(Committer { tx, stats })
    }

    /// Commits `write` with whatever else is waiting; returns once it is
    /// committed.
    pub(crate) async fn commit(&self, write: Write) -> Result<(), StoreError> {
        let (done, answer) = oneshot::channel();
        self.tx
            .send(Pending {
                write,
                done: Some(done),
            })
            .await
            .map_err(|_| db_err("the group committer has stopped"))?;
        answer
            .await
            .map_err(|_| db_err("the group committer has stopped"))?
    }

    /// Adds `write` to the next commit without waiting for it (history).
    pub(crate) fn send(&self, write: Write) {
        if let Err(e) = self.tx.try_send(Pending { write, done: None }) {
            tracing::debug!(error = %e, "history event dropped: committer busy");
        }
    }

    /// Returns once everything sent before is committed.
    pub(crate) async fn barrier(&self) -> Result<(), StoreError> {
        self.commit(Write::Barrier).await
    }

    /// (commits, writes) so far.
    pub(crate) fn counts(&self) -> (u64, u64) {
        (
            self.stats.commits.load(Ordering::Relaxed),
            self.stats.writes.load(Ordering::Relaxed),
        )
    }
}

/// The committer's connection and its prepared statements.
struct Conn {
    client: Client,
    local_one: Statement,
    local_many: Statement,
    remote: Statement,
    spool: Statement,
    trace: Statement,
}

impl Conn {
    async fn connect(config: &tokio_postgres::Config) -> Result<Conn, StoreError> {
        let (client, connection) = config.connect(NoTls).await.map_err(db_err)?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "group commit connection lost");
            }
        });
        let local_one = client
            .prepare(
                "INSERT INTO mail (mailbox, id, prefix, size, content) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            )
            .await
            .map_err(db_err)?;
        let local_many = client
            .prepare(
                "WITH c AS (INSERT INTO content (id, data, refs) VALUES ($1, $2, $3) \
                 ON CONFLICT DO NOTHING RETURNING id) \
                 INSERT INTO mail (mailbox, id, prefix, size) \
                 SELECT m.mailbox, c.id, m.prefix, length(m.prefix) + $4::bigint \
                 FROM c, unnest($5::text[], $6::bytea[]) AS m(mailbox, prefix)",
            )
            .await
            .map_err(db_err)?;
        let remote = client
            .prepare(
                "INSERT INTO queue (id, entry, next_attempt, content) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            )
            .await
            .map_err(db_err)?;
        let spool = client
            .prepare(
                "WITH c AS (INSERT INTO content (id, data, refs) VALUES ($1, $2, 1) \
                 ON CONFLICT DO NOTHING RETURNING id) \
                 INSERT INTO inbound (id, envelope) SELECT id, $3 FROM c",
            )
            .await
            .map_err(db_err)?;
        let trace = client.prepare(crate::trace::INSERT).await.map_err(db_err)?;
        Ok(Conn {
            client,
            local_one,
            local_many,
            remote,
            spool,
            trace,
        })
    }
}

async fn run(
    config: tokio_postgres::Config,
    conn: Conn,
    mut rx: mpsc::Receiver<Pending>,
    max_batch: usize,
    stats: Arc<Stats>,
) {
    let mut conn = Some(conn);
    let mut batch = Vec::with_capacity(max_batch);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        if conn.as_ref().is_none_or(|c| c.client.is_closed()) {
            conn = match Conn::connect(&config).await {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "group commit: cannot reconnect");
                    None
                }
            };
        }
        let outcome = match &conn {
            // Only barriers: what came before is committed already.
            _ if batch.iter().all(|p| matches!(p.write, Write::Barrier)) => {
                Ok(batch.iter().map(|_| Ok(())).collect())
            }
            Some(c) => commit_batch(c, &batch).await,
            None => Err(db_err("no database connection")),
        };
        match outcome {
            Ok(results) => {
                let writes = batch
                    .iter()
                    .filter(|p| !matches!(p.write, Write::Barrier | Write::Trace { .. }))
                    .count();
                if batch.iter().any(|p| !matches!(p.write, Write::Barrier)) {
                    stats.commits.fetch_add(1, Ordering::Relaxed);
                }
                stats.writes.fetch_add(writes as u64, Ordering::Relaxed);
                for (p, r) in batch.drain(..).zip(results) {
                    if let Some(done) = p.done {
                        let _ = done.send(r);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, messages = batch.len(), "group commit failed");
                let text = e.to_string();
                for p in batch.drain(..) {
                    if let Some(done) = p.done {
                        let _ = done.send(Err(db_err(text.clone())));
                    }
                }
            }
        }
    }
}

type Request<'a> = Pin<Box<dyn Future<Output = Result<u64, tokio_postgres::Error>> + Send + 'a>>;

/// One transaction for the batch, sent as one pipeline. Returns each
/// write's own outcome (a duplicate), or the batch's failure.
async fn commit_batch(
    c: &Conn,
    batch: &[Pending],
) -> Result<Vec<Result<(), StoreError>>, StoreError> {
    // Parameters first: the requests borrow them.
    let params: Vec<Vec<Box<dyn ToSql + Sync + Send + '_>>> = batch
        .iter()
        .map(|p| -> Vec<Box<dyn ToSql + Sync + Send + '_>> {
            match &p.write {
                Write::Local {
                    id,
                    content,
                    entries,
                } => match entries.as_slice() {
                    [(mailbox, prefix)] => vec![
                        Box::new(mailbox.as_str()),
                        Box::new(id.0 as i64),
                        Box::new(prefix.as_slice()),
                        Box::new((prefix.len() + content.len()) as i64),
                        Box::new(&content[..]),
                    ],
                    _ => vec![
                        Box::new(id.0 as i64),
                        Box::new(&content[..]),
                        Box::new(entries.len() as i32),
                        Box::new(content.len() as i64),
                        Box::new(entries.iter().map(|e| e.0.as_str()).collect::<Vec<_>>()),
                        Box::new(entries.iter().map(|e| e.1.as_slice()).collect::<Vec<_>>()),
                    ],
                },
                Write::Remote {
                    id,
                    entry,
                    next_attempt,
                    content,
                } => vec![
                    Box::new(id.0 as i64),
                    Box::new(Json(entry)),
                    Box::new(*next_attempt),
                    Box::new(&content[..]),
                ],
                Write::Spool {
                    id,
                    envelope,
                    content,
                } => vec![
                    Box::new(id.0 as i64),
                    Box::new(&content[..]),
                    Box::new(Json(envelope)),
                ],
                // History events: in the batch's one trace statement.
                Write::Barrier | Write::Trace { .. } => Vec::new(),
            }
        })
        .collect();
    let refs: Vec<Vec<&(dyn ToSql + Sync)>> = params
        .iter()
        .map(|p| p.iter().map(|b| &**b as &(dyn ToSql + Sync)).collect())
        .collect();
    let traces = trace_runs(batch);
    let truncated = Json(crate::trace::truncated());
    let trace_params: Vec<[&(dyn ToSql + Sync); 6]> = traces
        .iter()
        .map(|t| -> [&(dyn ToSql + Sync); 6] {
            [&t.ids, &t.ats, &t.whats, &t.ranks, &t.max, &truncated]
        })
        .collect();
    let queued = batch
        .iter()
        .any(|p| matches!(p.write, Write::Remote { .. }));
    let client = &c.client;
    let mut requests: Vec<Request<'_>> = Vec::with_capacity(batch.len() + 4);
    // Which write each request answers (`None`: BEGIN, the history, NOTIFY,
    // COMMIT), kept beside the requests so that answers are matched to the
    // writes that sent them, never by position in the batch (a barrier
    // ahead of a write once paired that write with COMMIT's answer, 0
    // rows: a committed message refused as a duplicate).
    let mut owners: Vec<Option<usize>> = Vec::with_capacity(batch.len() + 4);
    requests.push(Box::pin(async move {
        client.batch_execute("BEGIN").await.map(|_| 0)
    }));
    owners.push(None);
    for (i, (p, params)) in batch.iter().zip(&refs).enumerate() {
        let statement = match &p.write {
            // No statement of their own: no answer among the results.
            Write::Barrier | Write::Trace { .. } => continue,
            Write::Local { entries, .. } if entries.len() == 1 => &c.local_one,
            Write::Local { .. } => &c.local_many,
            Write::Remote { .. } => &c.remote,
            Write::Spool { .. } => &c.spool,
        };
        requests.push(Box::pin(client.execute(statement, params)));
        owners.push(Some(i));
    }
    for params in &trace_params {
        requests.push(Box::pin(client.execute(&c.trace, params)));
        owners.push(None);
    }
    if queued {
        requests.push(Box::pin(async move {
            client
                .batch_execute(concat!("NOTIFY ", "postino_queue"))
                .await
                .map(|_| 0)
        }));
        owners.push(None);
    }
    requests.push(Box::pin(async move {
        client.batch_execute("COMMIT").await.map(|_| 0)
    }));
    owners.push(None);
    let results = pipeline(requests).await;
    // A failed statement aborted the transaction (the COMMIT then rolled
    // it back): the first error is the batch's.
    if let Some(e) = results.iter().find_map(|r| r.as_ref().err()) {
        return Err(db_err(e.to_string()));
    }
    let mut answers: Vec<Option<u64>> = batch.iter().map(|_| None).collect();
    for (owner, result) in owners.iter().zip(&results) {
        if let (Some(i), Ok(rows)) = (owner, result) {
            answers[*i] = Some(*rows);
        }
    }
    Ok(batch
        .iter()
        .zip(answers)
        .map(|(p, answer)| match (&p.write, answer) {
            (
                Write::Local { id, .. } | Write::Remote { id, .. } | Write::Spool { id, .. },
                Some(0),
            ) => Err(StoreError::Duplicate(*id)),
            _ => Ok(()),
        })
        .collect())
}

/// The parameters of one history statement: consecutive events of the
/// batch under the same `[trace] max_events_per_message`.
struct TraceRun<'a> {
    max: i64,
    ids: Vec<i64>,
    ats: Vec<i64>,
    whats: Vec<Json<&'a serde_json::Value>>,
    /// Each event's place among its message's events in the run, from 1.
    ranks: Vec<i64>,
    /// Events per message so far in the run.
    seen: HashMap<i64, i64>,
}

/// The batch's history events, in the order sent, as few statements as
/// the cap allows: one, unless the cap changed (a configuration reload)
/// between two events; each run then counts the rows the runs before it
/// inserted, as one statement per event did.
fn trace_runs(batch: &[Pending]) -> Vec<TraceRun<'_>> {
    let mut runs: Vec<TraceRun<'_>> = Vec::new();
    for p in batch {
        if let Write::Trace { id, at, what, max } = &p.write {
            let run = match runs.last_mut() {
                Some(run) if run.max == *max => run,
                _ => {
                    runs.push(TraceRun {
                        max: *max,
                        ids: Vec::new(),
                        ats: Vec::new(),
                        whats: Vec::new(),
                        ranks: Vec::new(),
                        seen: HashMap::new(),
                    });
                    runs.last_mut().expect("just pushed")
                }
            };
            run.ids.push(id.0 as i64);
            run.ats.push(*at);
            run.whats.push(Json(what));
            let seen = run.seen.entry(id.0 as i64).or_insert(0);
            *seen += 1;
            run.ranks.push(*seen);
        }
    }
    runs
}

/// Polls every request in order until all are done. tokio-postgres sends a
/// request when its future is first polled, so polling them in order, all
/// before any answer, sends them as one pipeline in that order.
async fn pipeline(mut requests: Vec<Request<'_>>) -> Vec<Result<u64, tokio_postgres::Error>> {
    let mut results: Vec<Option<Result<u64, tokio_postgres::Error>>> =
        requests.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (request, result) in requests.iter_mut().zip(results.iter_mut()) {
            if result.is_none() {
                match request.as_mut().poll(cx) {
                    Poll::Ready(r) => *result = Some(r),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    results
        .into_iter()
        .map(|r| r.expect("polled to the end"))
        .collect()
}
