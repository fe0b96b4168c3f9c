//! The delivery actor: Postfix's queue manager. It keeps remote messages in
//! the sled queue, tries each when it is due, retries on the configured
//! schedule, and bounces what fails for good or outlives the queue lifetime.
//!
//! # A delivery round
//!
//! `Delivery::start` splits an entry's open recipients by destination
//! (domain, or the smarthost) and runs one task per destination, each under
//! that destination's traffic shaping ([`super::shaping`]: a concurrency
//! window that follows the outcomes, an optional rate; a dead destination's
//! recipients are deferred at once). Each task's outcomes are written to
//! the queue record as they come in, so a crash re-sends as little as
//! possible. When the last task of the round is back, `Delivery::finalize`
//! decides: bounce the recipients that failed for good (one RFC 3464 report
//! per round listing all of them, as Postfix's queue manager flushes its
//! bounce log after each pass), send a delay warning, reschedule the rest, or
//! remove the entry. That decision and the notifications it makes are one
//! store transaction ([`postino_core::storage::Queue::settle`]).
//!
//! While a round runs, its entry stays due in the store: after a crash it is
//! tried again at once (Postfix moves its active queue back to incoming on
//! restart). The actor itself skips entries it is trying.
//!
//! # When the store cannot write
//!
//! A round whose outcome cannot be written (a full disk: the remote side
//! has the message, our queue still says "due") is kept in memory
//! (`Delivery::unsettled`) and out of later rounds until the write
//! succeeds: otherwise every poll would send the message again. Meanwhile
//! the actor starts no rounds and retries the writes with a growing
//! interval ([`SETTLE_RETRY`] doubling to [`MAX_SETTLE_RETRY`]), logging
//! one line per retry, not one per message. Only a crash before the
//! write succeeds sends such a message once more.
//!
//! # In a cluster
//!
//! Entries are claimed with a lease (`[store] lease`) that names this node
//! and is renewed at a third of its length while the round lasts, in one
//! store call, by a task of its own (the actor may be waiting on the
//! store for its rounds; a renewal behind those came too late). A node
//! that dies (`kill -9`) stops renewing: once its leases expire, any other
//! node claims the entries (a poll happens at least every renewal period
//! for that reason, since nothing notifies the expiry). Only the entries
//! the dead node held can go out twice: at most [`MAX_IN_FLIGHT`], in
//! practice the ones its destinations' windows had on the wire.
//!
//! A message the dead node had spooled but not yet handed on (dispatched
//! into mailboxes and the queue) would otherwise wait in the spool for a
//! restart of that node: every node looks at the spool each renewal
//! period and dispatches the entries older than a lease (the node that
//! wrote one dispatches it within its DATA reply; one that failed to
//! retries it here too). Dispatch steps are idempotent and lock their
//! row, so two nodes doing it at once do nothing twice.
//!
//! # Timing
//!
//! `next_attempt` is stored in whole unix seconds, rounded up, so that a
//! deferred message never comes back before its retry interval has passed.
//! The actor sleeps until the earliest due entry (at most [`MAX_SLEEP`], so
//! that changes made by the offline CLI are seen) and is woken early by a
//! new message or by a round that schedules something sooner.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use bytes::Bytes;
use postino_core::config::DoubleBounce;
use postino_core::dsn::{self, RecipientStatus};
use postino_core::esmtp::{notify_of, EnvelopeParams};
use postino_core::logsafe::escape;
use postino_core::message::now_unix;
use postino_core::storage::{Claimed, Lease, SharedStorage, Storage};
use postino_core::store::{
    DeliveryDiagnostic, Notice, QueueEntry, QueueRecipient, RecipientState, StoreError, TraceKind,
};
use postino_core::{Config, Envelope, MessageId};
use tracing::{debug, error, info, warn};

use crate::bounce::{notice_events, notification};
use crate::dispatch::dispatch;
use crate::dkim::DkimKeys;

use super::attempt::{self, Outcome, RcptResult};
use super::shaping::{Destination, Feedback, Settings};
use crate::reload::{LiveConfig, Reconfigure};

mod admin;
pub use admin::{ActiveIds, Destinations, QueueAdmin};

/// Most messages being tried at once (each may hold several connections).
pub const MAX_IN_FLIGHT: usize = 512;
/// Rounds that must finish, once the actor was full, before it looks at
/// the queue again. One look per finished round made a backlog cost a
/// queue scan and a `next_due_time` per message (on PostgreSQL each one
/// walks past every entry under a lease: most of the database's time in
/// a 10,000-message relay backlog); a batch of slots shares one.
const REFILL: usize = MAX_IN_FLIGHT / 8;
/// Longest sleep between two looks at the queue.
pub const MAX_SLEEP: Duration = Duration::from_secs(60);
/// Shortest sleep: a due entry that could not be started (a failing store)
/// must not turn the actor into a busy loop.
const MIN_SLEEP: Duration = Duration::from_millis(100);
/// When a recipient asked for delay notices (`NOTIFY=DELAY`) and
/// `delivery.delay_warning` is off: sendmail's usual 4 hours.
pub const ASKED_DELAY_WARNING: Duration = Duration::from_secs(4 * 3600);
/// First wait before writing unsettled outcomes again; doubles per failure.
pub const SETTLE_RETRY: Duration = Duration::from_secs(1);
/// Longest wait between two tries to write unsettled outcomes.
pub const MAX_SETTLE_RETRY: Duration = Duration::from_secs(30);

/// A message intake has just put in the delivery queue and made durable
/// (with [`postino_core::storage::Intake::accept_remote`], or by dispatching it): try it now, with
/// the content in hand when there is one (no read back from the store). If
/// the actor is busy, the entry waits in the queue for the next poll like
/// any other.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Queued {
    pub id: MessageId,
    /// The message; `None`: read it from the queue.
    pub content: Option<Bytes>,
}

/// An administrator's change to the queue (`postino queue
/// flush|delete|bounce` on the control socket): made by this actor while it
/// runs, so that its schedule and the store never disagree. The answer is
/// typed; the control socket words it.
#[derive(Message, Debug, Clone, PartialEq, Eq)]
#[rtype(result = "Result<QueueChanged, QueueError>")]
#[non_exhaustive]
pub enum ChangeQueue {
    /// Make every queued message due now.
    Flush,
    /// Remove a message from the queue without a notice.
    Delete(MessageId),
    /// Fail a message's open recipients and send the sender a bounce.
    Bounce(MessageId),
}

/// What a [`ChangeQueue`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum QueueChanged {
    /// Queued messages now due: those made due, already due, or in a
    /// delivery round right now.
    Flushed {
        /// How many.
        due: usize,
    },
    /// The message is out of the queue.
    Deleted(MessageId),
    /// The message's open recipients failed; the bounce is on its way.
    Bounced(MessageId),
}

/// Why a [`ChangeQueue`] did nothing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueueError {
    /// No message with this id is in the queue.
    #[error("no queued message {0}")]
    NotQueued(MessageId),
    /// The message is being delivered right now (on this node or another):
    /// try again once its round has ended.
    #[error("message {0} is being delivered; try again when its delivery round has ended")]
    Busy(MessageId),
    /// The store could not be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The queue manager.
pub struct Delivery {
    config: Arc<Config>,
    store: SharedStorage,
    /// This node's name: its queue leases carry it (`[store] node`).
    node: String,
    /// How long a claim on a queue entry lasts without renewal
    /// (`[store] lease`, as at start): a node that dies mid-round gives its
    /// entries up to the other nodes this much later (a duplicate delivery
    /// is possible only in that window). Renewed at a third of it; and no
    /// node sleeps longer than that, so that another's expired leases are
    /// taken over even when nothing else wakes it.
    lease: Duration,
    /// The leases this node holds: entries in a round or unsettled.
    leases: Leases,
    /// Entries in a round, with the number of destination tasks still out.
    in_flight: HashMap<MessageId, usize>,
    /// Entries whose round is over but whose outcome the store refused
    /// (see the module docs): written again later, never tried meanwhile.
    unsettled: HashMap<MessageId, Settlement>,
    /// Outcomes of a round's finished destinations that could not be
    /// written while its other destinations were still out: newer than
    /// the store's entry, used when the round ends.
    unwritten: HashMap<MessageId, QueueEntry>,
    /// While the store fails: the wait before the next try to write the
    /// unsettled outcomes. No rounds start meanwhile.
    settle_retry: Option<Duration>,
    /// Per destination: its concurrency window and rate
    /// ([`shaping`](super::shaping)). Entries nobody holds and that
    /// remember nothing (no death, no rate wait) are dropped at each poll,
    /// so the map does not grow with every domain ever seen.
    destinations: HashMap<String, Arc<Destination>>,
    /// The pending wake-up and when (unix seconds) it fires.
    wakeup: Option<(f64, SpawnHandle)>,
    /// The actor was full since its last look at the queue: due entries
    /// may be waiting, so it looks again once [`REFILL`] slots are free.
    refill: bool,
    attempt: Arc<attempt::Attempt>,
    /// Arbiters that run the SMTP client sessions (the server's workers), in
    /// turn; this actor's own thread only keeps the books. Empty: run them
    /// here.
    io: Vec<ArbiterHandle>,
    next_io: usize,
    /// History events, written in the order they happen by one task.
    traces: tokio::sync::mpsc::UnboundedSender<(MessageId, u64, TraceKind)>,
    /// The DKIM keys that sign the notices it makes, shared with intake
    /// and swapped by a reload ([`crate::reload`]): always the current ones.
    dkim: DkimKeys,
}

/// The leases a node holds, shared by the actor and the task that renews
/// them ([`Delivery::renew_leases`]).
#[derive(Default)]
struct Leases(Arc<std::sync::Mutex<HeldLeases>>);

#[derive(Default)]
struct HeldLeases {
    held: HashMap<MessageId, Lease>,
    /// Entries whose settlement is being written: a renewal that misses
    /// one of them most likely came after the write (which ends the
    /// lease), not after another node's claim; the write itself finds out
    /// which.
    settling: HashSet<MessageId>,
}

impl Leases {
    fn lock(&self) -> std::sync::MutexGuard<'_, HeldLeases> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn insert(&self, id: MessageId, lease: Lease) {
        self.lock().held.insert(id, lease);
    }
    fn remove(&self, id: &MessageId) -> Option<Lease> {
        let mut leases = self.lock();
        leases.settling.remove(id);
        leases.held.remove(id)
    }
    fn get(&self, id: &MessageId) -> Option<Lease> {
        self.lock().held.get(id).cloned()
    }
    fn all(&self) -> Vec<Lease> {
        self.lock().held.values().cloned().collect()
    }
    /// The settlement of `id` is being written (`true`), or failed to be
    /// (`false`: the lease is held on for the next try).
    fn settling(&self, id: MessageId, writing: bool) {
        let mut leases = self.lock();
        match writing {
            true => leases.settling.insert(id),
            false => leases.settling.remove(&id),
        };
    }
    /// Records the renewal of `asked`: `renewed` are those still ours.
    /// Returns the ids of the others that are still held here and not
    /// being settled (one settled or given up meanwhile is gone from the
    /// store: not lost).
    fn renewed(&self, asked: &[Lease], renewed: Vec<Lease>) -> Vec<MessageId> {
        let mut leases = self.lock();
        let mut kept = HashSet::new();
        for lease in renewed {
            kept.insert((lease.id, lease.token));
            if let Some(held) = leases.held.get_mut(&lease.id) {
                if held.token == lease.token {
                    *held = lease;
                }
            }
        }
        asked
            .iter()
            .filter(|l| !kept.contains(&(l.id, l.token)))
            .filter(|l| leases.held.get(&l.id).map(|h| h.token) == Some(l.token))
            .filter(|l| !leases.settling.contains(&l.id))
            .map(|l| l.id)
            .collect()
    }
}

/// The end of a round as [`Queue::settle`] writes it.
struct Settlement {
    entry: QueueEntry,
    remove: bool,
    notices: Vec<Notice>,
    /// The wait until the retry (for the log).
    wait: Duration,
}

impl Delivery {
    /// A queue manager over `store`'s queue whose SMTP client sessions run
    /// on the `io` arbiters, in turn (empty: on its own).
    /// `config` is the configuration in use at start; a reload sends the
    /// next one ([`crate::reload::Reconfigure`]).
    pub fn new(
        config: impl Into<LiveConfig>,
        store: SharedStorage,
        io: Vec<ArbiterHandle>,
    ) -> Delivery {
        let config = config.into().current();
        let attempt = Arc::new(attempt::Attempt::new(config.clone()));
        let (traces, mut written) = tokio::sync::mpsc::unbounded_channel();
        let writer = store.clone();
        actix_rt::spawn(async move {
            while let Some((id, at, what)) = written.recv().await {
                writer.trace(id, at, what).await;
            }
        });
        Delivery {
            node: config.store.node.clone(),
            lease: config.store.lease,
            config,
            store,
            leases: Leases::default(),
            in_flight: HashMap::new(),
            unsettled: HashMap::new(),
            unwritten: HashMap::new(),
            settle_retry: None,
            destinations: HashMap::new(),
            wakeup: None,
            refill: false,
            attempt,
            io,
            next_io: 0,
            traces,
            dkim: DkimKeys::default(),
        }
    }

    /// This actor signs the notices it makes with `keys` (none unless
    /// given; the server gives the ones intake signs with).
    pub fn with_dkim(mut self, keys: DkimKeys) -> Delivery {
        self.dkim = keys;
        self
    }

    /// Records a history event (in order with this actor's others).
    fn trace(&self, id: MessageId, what: TraceKind) {
        let _ = self.traces.send((id, now_unix(), what));
    }

    /// Whether an entry is being tried or waits for its outcome to be
    /// written: either way, not to be started.
    fn busy(&self, id: MessageId) -> bool {
        self.in_flight.contains_key(&id) || self.unsettled.contains_key(&id)
    }

    /// Claims every due entry there is room for and starts them, then
    /// sleeps until the next. Claims are leases in the store: in a cluster,
    /// each due entry goes to one node.
    fn poll(&mut self, ctx: &mut Context<Self>) {
        if let Some((_, h)) = self.wakeup.take() {
            ctx.cancel_future(h);
        }
        if self.settle_retry.is_some() {
            // The store fails: the settle retry polls once it writes again.
            return;
        }
        let room = MAX_IN_FLIGHT.saturating_sub(self.in_flight.len());
        self.refill = false;
        let (store, node, lease) = (self.store.clone(), self.node.clone(), self.lease);
        let held = Leases(self.leases.0.clone());
        let scan = async move {
            let now = now_unix();
            let mut claimed = Vec::new();
            let mut failed = None;
            if room > 0 {
                match store.claim_due(now, &node, lease, room).await {
                    Ok(due) => {
                        // Renewed from now on: reading many contents may
                        // take longer than a short lease.
                        for c in &due {
                            held.insert(c.entry.id, c.lease.clone());
                        }
                        for c in due {
                            let content = store.queued_content(c.entry.id).await;
                            claimed.push((c, content));
                        }
                    }
                    Err(e) => failed = Some(e),
                }
            }
            // Every slot taken: the next look comes when slots free up
            // (`refill`), so when the next entry is due does not matter.
            let next = if room > 0 && claimed.len() == room {
                Ok(None)
            } else {
                store.next_due_time(now).await
            };
            (claimed, failed, next)
        };
        ctx.wait(
            scan.into_actor(self)
                .map(|(claimed, failed, next), act, ctx| {
                    if let Some(e) = failed {
                        error!(error = %e, "queue scan failed");
                    }
                    for (c, content) in claimed {
                        act.begin(c, content, ctx);
                    }
                    act.destinations
                        .retain(|_, d| Arc::strong_count(d) > 1 || d.remembers());
                    // Entries under another node's lease are not in `next`:
                    // look again within a renewal period, so that a dead
                    // node's leases are taken over soon after they expire.
                    let longest = MAX_SLEEP.min(act.renew_every());
                    let mut at = unix_time() + longest.as_secs_f64();
                    if act.in_flight.len() < MAX_IN_FLIGHT {
                        match next {
                            Ok(Some(t)) => at = at.min(t as f64),
                            Ok(None) => {}
                            Err(e) => error!(error = %e, "queue scan failed"),
                        }
                    }
                    act.wake_at(at, ctx);
                }),
        );
    }

    /// (Re)arms the wake-up for unix time `at`, unless one is due sooner.
    fn wake_at(&mut self, at: f64, ctx: &mut Context<Self>) {
        if let Some((current, h)) = self.wakeup {
            if current <= at {
                return;
            }
            ctx.cancel_future(h);
        }
        // Just past `at`, so that the whole second `at` names has begun.
        let wait = Duration::from_secs_f64((at - unix_time()).max(0.0) + 0.001).max(MIN_SLEEP);
        let handle = ctx.run_later(wait, |act, ctx| {
            act.wakeup = None;
            act.poll(ctx);
        });
        self.wakeup = Some((at, handle));
    }

    /// Waits for the store to say another node made work, then polls.
    fn watch(&mut self, ctx: &mut Context<Self>) {
        let store = self.store.clone();
        ctx.spawn(
            async move { store.wait_for_work().await }
                .into_actor(self)
                .map(|(), act, ctx| {
                    act.poll(ctx);
                    act.watch(ctx);
                }),
        );
    }

    /// How often the leases held are renewed: a third of the lease, so
    /// that two renewals may fail before one runs out.
    fn renew_every(&self) -> Duration {
        self.lease / 3
    }

    /// Renews the leases this node holds every [`Delivery::renew_every`],
    /// so that a long round (or an outcome waiting to be written) is not
    /// claimed by another node. A task of its own, not the actor's timer:
    /// the actor waits on the store for each step of its rounds, and under
    /// load a renewal queued behind those waits came after a short lease
    /// had run out (the other nodes then sent those messages again). A
    /// lease lost meanwhile is left alone: the round's settle will not
    /// write. The task ends with the actor.
    fn renew_leases(&self) {
        let held = Arc::downgrade(&self.leases.0);
        let (store, lease, every) = (self.store.clone(), self.lease, self.renew_every());
        actix_rt::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(leases) = held.upgrade().map(Leases) else {
                    return;
                };
                let asked = leases.all();
                drop(leases);
                if asked.is_empty() {
                    continue;
                }
                // One call for all: one by one took longer than a short
                // lease under load.
                let renewed = store.renew_all(&asked, now_unix(), lease).await;
                let Some(leases) = held.upgrade().map(Leases) else {
                    return;
                };
                match renewed {
                    Ok(renewed) => {
                        for lost in leases.renewed(&asked, renewed) {
                            warn!(id = %lost, "queue lease lost to another node");
                        }
                    }
                    Err(e) => warn!(error = %e, "cannot renew queue leases"),
                }
            }
        });
    }

    /// Asks for a flush without waiting for it: the change joins the next
    /// group commit, as intake does. Queue changes need not hold anything
    /// up (the message is safe in the spool or the queue either way), but
    /// they must reach the disk at once: a lost "delivered" means a second
    /// copy after a crash. Left to sled's periodic flush (500 ms), a
    /// `kill -9` under relay load sent up to 585 messages twice, delivered
    /// up to 1.6 s before it.
    fn flush_soon(&self) {
        let store = self.store.clone();
        actix_rt::spawn(async move {
            let _ = store.durable().await;
        });
    }

    /// An administrator asked for the queue to be tried now: dead
    /// destinations are tried too.
    fn revive_destinations(&self) {
        for d in self.destinations.values() {
            d.revive();
        }
    }

    fn destination(&mut self, name: &str) -> Arc<Destination> {
        let config = &self.config;
        self.destinations
            .entry(name.to_owned())
            .or_insert_with(|| Destination::new(name, Settings::of(config, name)))
            .clone()
    }

    /// Starts a round for a claimed entry whose content was read.
    fn begin(
        &mut self,
        claimed: Claimed,
        content: Result<Option<Bytes>, StoreError>,
        ctx: &mut Context<Self>,
    ) {
        let Claimed { entry, lease } = claimed;
        let id = entry.id;
        match content {
            Ok(Some(content)) => {
                self.leases.insert(id, lease);
                self.start_with(entry, content, ctx);
            }
            Ok(None) => {
                // The entry holds a reference, so this is a store bug; a
                // message without content cannot be sent or returned.
                error!(%id, "queued message has no content; removed");
                self.leases.remove(&id);
                let store = self.store.clone();
                actix_rt::spawn(async move {
                    let _ = store.remove_queue(id).await;
                    let _ = store.unclaim(&lease).await;
                });
            }
            Err(e) => {
                error!(%id, error = %e, "cannot read queued message");
                self.leases.remove(&id);
                let store = self.store.clone();
                actix_rt::spawn(async move {
                    let _ = store.unclaim(&lease).await;
                });
            }
        }
    }

    /// Starts a round for a claimed `entry`: one task per destination of
    /// its open recipients.
    fn start_with(&mut self, entry: QueueEntry, content: Bytes, ctx: &mut Context<Self>) {
        let mut by_domain: Vec<(String, Vec<String>)> = Vec::new();
        for r in entry.recipients.iter().filter(|r| r.state.is_open()) {
            let domain = r
                .address
                .rsplit_once('@')
                .map(|(_, d)| d)
                .unwrap_or("")
                .to_ascii_lowercase();
            match by_domain.iter_mut().find(|(d, _)| *d == domain) {
                Some((_, rcpts)) => rcpts.push(r.address.clone()),
                None => by_domain.push((domain, vec![r.address.clone()])),
            }
        }
        if by_domain.is_empty() {
            // Nothing left to try (a crash between a round's last result and
            // its settlement): settle now.
            self.finalize(entry, false, ctx);
            return;
        }
        let id = entry.id;
        self.in_flight.insert(id, by_domain.len());
        for (domain, rcpts) in by_domain {
            let destination = self.destination(&self.attempt.destination(&domain));
            let attempt = self.attempt.clone();
            let sender = entry.sender.clone();
            let params = entry.params.clone();
            let content = content.clone();
            let task = async move {
                let _permit = match destination.acquire().await {
                    Ok(permit) => permit,
                    Err(suspended) => {
                        // A dead destination: deferred without a
                        // connection, as Postfix's queue manager does.
                        let result = RcptResult::Deferred(suspended.diagnostic());
                        return rcpts
                            .into_iter()
                            .map(|recipient| Outcome {
                                recipient,
                                relay: None,
                                tls: None,
                                result: result.clone(),
                                dsn_passed_on: false,
                            })
                            .collect();
                    }
                };
                let outcomes = attempt
                    .deliver(
                        id,
                        &domain,
                        sender.as_deref(),
                        &rcpts,
                        &content,
                        params.as_deref(),
                    )
                    .await;
                destination.feedback(Feedback::of(&outcomes));
                outcomes
            };
            // The session itself runs on a worker arbiter: with thousands of
            // relayed messages a second, one thread could not both talk SMTP
            // and keep the queue.
            let (tx, rx) = tokio::sync::oneshot::channel();
            let run = async move {
                let _ = tx.send(task.await);
            };
            if self.io.is_empty() {
                actix_rt::spawn(run);
            } else {
                let handle = &self.io[self.next_io % self.io.len()];
                self.next_io = self.next_io.wrapping_add(1);
                // A stopped arbiter drops the task: the round then ends
                // without outcomes and the recipients are retried later.
                let _ = handle.spawn(run);
            }
            ctx.spawn(rx.into_actor(self).map(move |outcomes, act, ctx| {
                act.destination_done(id, outcomes.unwrap_or_default(), ctx)
            }));
        }
    }

    /// Gives up this node's claim on an entry whose round ended without a
    /// settlement.
    fn drop_lease(&mut self, id: MessageId) {
        if let Some(lease) = self.leases.remove(&id) {
            let store = self.store.clone();
            actix_rt::spawn(async move {
                let _ = store.unclaim(&lease).await;
            });
        }
    }

    /// One destination of a round is done: record its outcomes, and settle
    /// the round if it was the last.
    fn destination_done(&mut self, id: MessageId, outcomes: Vec<Outcome>, ctx: &mut Context<Self>) {
        let left = match self.in_flight.get_mut(&id) {
            Some(n) => {
                *n = n.saturating_sub(1);
                *n
            }
            None => 0,
        };
        if self.in_flight.len() >= MAX_IN_FLIGHT {
            self.refill = true;
        }
        if left == 0 {
            self.in_flight.remove(&id);
        }
        let refill = self.refill && self.in_flight.len() <= MAX_IN_FLIGHT - REFILL;
        let unwritten = self.unwritten.remove(&id);
        let store = self.store.clone();
        let read = async move { store.queue_entry(id).await };
        ctx.wait(read.into_actor(self).map(move |stored, act, ctx| {
            match stored {
                Ok(Some(stored)) => {
                    let mut entry = unwritten.unwrap_or(stored);
                    act.record(&mut entry, outcomes);
                    if left > 0 {
                        // Written now, so that a crash before the round ends
                        // does not send these recipients a second copy.
                        let (store, written) = (act.store.clone(), entry.clone());
                        let write = async move { store.update_queue(&written).await };
                        ctx.wait(write.into_actor(act).map(move |res, act, _| match res {
                            Ok(()) => act.flush_soon(),
                            Err(e) => {
                                warn!(%id, error = %e, "queue update failed");
                                act.unwritten.insert(id, entry);
                            }
                        }));
                    } else {
                        act.finalize(entry, true, ctx);
                    }
                }
                // Deleted or bounced by the administrator meanwhile.
                Ok(None) => {
                    debug!(%id, "entry left the queue during its round");
                    if left == 0 {
                        act.drop_lease(id);
                    }
                }
                Err(e) => {
                    error!(%id, error = %e, "cannot read queue entry");
                    if left == 0 {
                        act.drop_lease(id);
                    }
                }
            }
            if left == 0 && refill && act.refill {
                act.poll(ctx);
            }
        }));
    }

    /// Writes each outcome into its recipient's state and logs it, one line
    /// per recipient and attempt (Postfix's `status=sent|deferred|bounced`).
    fn record(&self, entry: &mut QueueEntry, outcomes: Vec<Outcome>) {
        let delay = now_unix().saturating_sub(entry.received_at);
        let attempt = entry.attempts + 1;
        for o in outcomes {
            let Some(r) = entry
                .recipients
                .iter_mut()
                .find(|r| r.address == o.recipient && r.state.is_open())
            else {
                continue;
            };
            let relay = o.relay_text();
            let tls = o.tls_text();
            if o.dsn_passed_on && matches!(o.result, RcptResult::Delivered(_)) {
                // The next hop got NOTIFY and reports success itself.
                success_honoured(&mut entry.params, &o.recipient);
            }
            // The reply of a delivery is logged without the server, which
            // `relay=` names: as Postfix logs `status=sent (250 …)`.
            let (state, status, text, dsn) = match o.result {
                RcptResult::Delivered(reply) => {
                    let (text, dsn) = (reply.reply_text(), dsn_status(&reply, "2.0.0"));
                    (RecipientState::Delivered { reply }, "sent", text, dsn)
                }
                RcptResult::Deferred(last_error) => {
                    let (text, dsn) = (last_error.to_string(), dsn_status(&last_error, "4.0.0"));
                    (
                        RecipientState::Deferred { last_error },
                        "deferred",
                        text,
                        dsn,
                    )
                }
                RcptResult::Failed(reply) => {
                    let (text, dsn) = (reply.to_string(), dsn_status(&reply, "5.0.0"));
                    (RecipientState::Failed { reply }, "bounced", text, dsn)
                }
            };
            info!(
                id = %entry.id,
                to = %escape(&o.recipient),
                relay = %escape(&relay),
                tls = %tls,
                delay,
                attempt,
                dsn = %dsn,
                status = %status,
                detail = %escape(&text),
                "delivery attempt"
            );
            postino_core::metrics::delivery(status);
            self.trace(
                entry.id,
                TraceKind::Attempt {
                    recipient: o.recipient.clone(),
                    // The record has no field of its own for TLS (bincode
                    // records are positional): it goes with the relay.
                    relay: match &o.tls {
                        Some(tls) => format!("{relay} ({tls})"),
                        None => relay,
                    },
                    status: status.to_owned(),
                    reply: text,
                },
            );
            r.state = state;
        }
    }

    /// Ends a round (or settles an entry without one): counts the attempt,
    /// expires what outlived the queue lifetime, bounces failed recipients,
    /// sends a due delay warning, then reschedules or removes the entry.
    fn finalize(&mut self, mut entry: QueueEntry, attempted: bool, ctx: &mut Context<Self>) {
        let id = entry.id;
        if attempted {
            entry.attempts += 1;
        }
        let age = now_unix().saturating_sub(entry.received_at);
        let lifetime = self.config.delivery.max_queue_lifetime.as_secs();
        let open = entry.recipients.iter().any(|r| r.state.is_open());
        if open && age >= lifetime {
            for r in entry.recipients.iter_mut().filter(|r| r.state.is_open()) {
                let last = match &r.state {
                    RecipientState::Deferred { last_error } => last_error.to_string(),
                    _ => "never tried".to_owned(),
                };
                r.state = RecipientState::Failed {
                    reply: DeliveryDiagnostic::local(
                        "4.4.7",
                        format!(
                            "message expired after {} in the queue ({} attempts); last error: {last}",
                            humantime::format_duration(Duration::from_secs(age)),
                            entry.attempts
                        ),
                    ),
                };
            }
            info!(%id, from = %escape(&sender_text(&entry)), attempts = entry.attempts, status = "expired", "message expired, returned to sender");
        }
        let failed = entry
            .recipients
            .iter()
            .any(|r| matches!(r.state, RecipientState::Failed { .. }));
        // Failed recipients become bounced ones, which are not open
        // either: whether a delay warning is due does not depend on it.
        let open = entry.recipients.iter().any(|r| r.state.is_open());
        // `NOTIFY=DELAY` asks for a warning even when they are off.
        let asked = entry.params.as_ref().is_some_and(|p| {
            p.recipients
                .iter()
                .any(|r| r.notify.is_some_and(|n| n.delay))
        });
        let warn_after = match (self.config.delivery.delay_warning, asked) {
            (Some(after), _) => Some(after),
            (None, true) => Some(ASKED_DELAY_WARNING),
            (None, false) => None,
        };
        let warn_now =
            open && !entry.warned && warn_after.is_some_and(|after| age >= after.as_secs());
        // Delivered to a next hop without DSN: a `relayed` notice for those
        // that asked for success (RFC 3461 §6.2.1); once, in the same
        // settlement as the round.
        let relayed: Vec<String> = entry
            .recipients
            .iter()
            .filter(|r| matches!(r.state, RecipientState::Delivered { .. }))
            .filter(|r| notify_of(entry.params.as_deref(), &r.address).success)
            .map(|r| r.address.clone())
            .collect();
        let (store, config, about) = (self.store.clone(), self.config.clone(), entry.clone());
        let dkim = self.dkim.clone();
        let notice = move |kind| {
            let (store, config, about, dkim) =
                (store.clone(), config.clone(), about.clone(), dkim.clone());
            async move { notice(&config, &dkim, store.as_ref(), &about, kind).await }
        };
        let make = async move {
            let failure = match failed {
                true => Some(notice(dsn::Kind::Failure).await),
                false => None,
            };
            let delay = match warn_now {
                true => Some(notice(dsn::Kind::Delay).await),
                false => None,
            };
            let success = match relayed.is_empty() {
                false => Some(notice(dsn::Kind::Relayed).await),
                true => None,
            };
            (failure, delay, success, relayed)
        };
        ctx.wait(
            make.into_actor(self)
                .map(move |(failure, delay, success, relayed), act, ctx| {
                    let mut notices = Vec::new();
                    match success {
                        Some(Ok(notice)) => {
                            if let Some(n) = &notice {
                                for (about, what) in
                                    notice_events(id, &n.envelope, dsn::Kind::Relayed)
                                {
                                    act.trace(about, what);
                                }
                            }
                            notices.extend(notice);
                            for r in &relayed {
                                success_honoured(&mut entry.params, r);
                            }
                        }
                        Some(Err(e)) => error!(%id, error = %e, "cannot make the success notice"),
                        None => {}
                    }
                    let mut keep_for_notice = false;
                    match failure {
                        Some(Ok(notice)) => {
                            if let Some(n) = &notice {
                                for (about, what) in
                                    notice_events(id, &n.envelope, dsn::Kind::Failure)
                                {
                                    act.trace(about, what);
                                }
                            }
                            notices.extend(notice);
                            for r in &mut entry.recipients {
                                if let RecipientState::Failed { reply } = &r.state {
                                    r.state = RecipientState::Bounced {
                                        reply: reply.clone(),
                                    };
                                }
                            }
                        }
                        Some(Err(e)) => {
                            // Keep the entry (and its failed recipients) so the
                            // bounce is tried again later instead of lost.
                            error!(%id, error = %e, "cannot make the bounce");
                            keep_for_notice = true;
                        }
                        None => {}
                    }
                    match delay {
                        Some(Ok(notice)) => {
                            if let Some(n) = &notice {
                                for (about, what) in
                                    notice_events(id, &n.envelope, dsn::Kind::Delay)
                                {
                                    act.trace(about, what);
                                }
                            }
                            notices.extend(notice);
                            entry.warned = true;
                        }
                        Some(Err(e)) => error!(%id, error = %e, "cannot make the delay warning"),
                        None => {}
                    }
                    let keep = open || keep_for_notice;
                    let wait = act.backoff(entry.attempts);
                    if keep {
                        // Rounded up: never retried before the interval has passed.
                        entry.next_attempt = (unix_time() + wait.as_secs_f64()).ceil() as u64;
                    }
                    act.settle(
                        Settlement {
                            entry,
                            remove: !keep,
                            notices,
                            wait,
                        },
                        ctx,
                    );
                }),
        );
    }

    /// Writes the end of a round under this node's lease and acts on it;
    /// keeps the settlement for a retry when the store fails.
    fn settle(&mut self, settlement: Settlement, ctx: &mut Context<Self>) {
        let id = settlement.entry.id;
        let Some(lease) = self.leases.get(&id) else {
            // Never claimed, or the claim went: not ours to write.
            warn!(%id, "no lease on the entry; its outcome is not written");
            return;
        };
        let store = self.store.clone();
        self.leases.settling(id, true);
        let write = async move {
            let s = &settlement;
            let result = store.settle(&lease, &s.entry, s.remove, &s.notices).await;
            (settlement, result)
        };
        ctx.wait(write.into_actor(self).map(|(settlement, result), act, ctx| {
            if let Some((settlement, e)) = act.settled(settlement, result, ctx) {
                let id = settlement.entry.id;
                act.leases.settling(id, false);
                debug!(%id, error = %e, "cannot settle queue entry; kept in memory");
                act.unsettled.insert(id, settlement);
                if act.settle_retry.is_none() {
                    warn!(error = %e, retry_in = %humantime::format_duration(SETTLE_RETRY), "cannot record delivery outcomes; holding them in memory and starting no deliveries until the store writes again");
                    act.settle_retry = Some(SETTLE_RETRY);
                    ctx.run_later(SETTLE_RETRY, |act, ctx| act.retry_settle(ctx));
                }
            }
        }));
    }

    /// Acts on a written settlement; gives it back when the store failed.
    fn settled(
        &mut self,
        settlement: Settlement,
        result: Result<(), StoreError>,
        ctx: &mut Context<Self>,
    ) -> Option<(Settlement, StoreError)> {
        let Settlement {
            entry,
            remove,
            notices,
            wait,
        } = settlement;
        let id = entry.id;
        match result {
            Ok(()) => {
                self.leases.remove(&id);
                for n in &notices {
                    info!(id = %n.envelope.id, orig_id = %id, to = %escape(&n.envelope.recipients[0].address), "notification created");
                }
                self.trace(
                    id,
                    match remove {
                        true => TraceKind::Dequeued,
                        false => TraceKind::Deferred {
                            next_attempt: entry.next_attempt,
                        },
                    },
                );
                let store = self.store.clone();
                let durable = async move { store.durable().await };
                if !remove {
                    actix_rt::spawn(durable);
                    info!(%id, attempts = entry.attempts, next_attempt = %humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(entry.next_attempt)), wait = %humantime::format_duration(wait), "deferred; will retry");
                    self.wake_at(entry.next_attempt as f64, ctx);
                } else {
                    // Logged once flushed: from then on a crash cannot
                    // bring the message back (the kill -9 tests rely on it).
                    let attempts = entry.attempts;
                    ctx.spawn(durable.into_actor(self).map(move |flushed, _, _| match flushed {
                        Ok(()) => info!(%id, attempts, "removed from queue"),
                        Err(e) => warn!(%id, error = %e, "removal from the queue not flushed; a crash now sends the message again"),
                    }));
                }
                self.dispatch(notices.into_iter().map(|n| n.envelope).collect(), ctx);
                None
            }
            Err(StoreError::NotFound { .. }) => {
                debug!(%id, "entry left the queue during its round");
                self.leases.remove(&id);
                None
            }
            Err(StoreError::LeaseLost { .. }) => {
                // Another node claimed it after our lease ran out: its
                // round decides (a recipient may get a second copy).
                warn!(%id, "queue lease lost before the round was written; another node retries it");
                self.leases.remove(&id);
                None
            }
            Err(e) => Some((
                Settlement {
                    entry,
                    remove,
                    notices,
                    wait,
                },
                e,
            )),
        }
    }

    /// Tries to write the unsettled outcomes again: once they are all
    /// written, deliveries resume; else waits longer and says so once.
    fn retry_settle(&mut self, ctx: &mut Context<Self>) {
        let waiting: Vec<(Settlement, Option<Lease>)> = std::mem::take(&mut self.unsettled)
            .into_values()
            .map(|s| {
                let lease = self.leases.get(&s.entry.id);
                (s, lease)
            })
            .collect();
        let store = self.store.clone();
        let write = async move {
            let mut out = Vec::with_capacity(waiting.len());
            let mut failed = false;
            for (s, lease) in waiting {
                // One failure is enough to know: keep the rest for later.
                let result = match (&lease, failed) {
                    (Some(lease), false) => {
                        let r = store.settle(lease, &s.entry, s.remove, &s.notices).await;
                        failed = matches!(&r, Err(e) if !matches!(e, StoreError::NotFound { .. } | StoreError::LeaseLost { .. }));
                        Some(r)
                    }
                    (None, _) => Some(Err(StoreError::LeaseLost { id: s.entry.id })),
                    (Some(_), true) => None,
                };
                out.push((s, result));
            }
            out
        };
        ctx.wait(write.into_actor(self).map(|written, act, ctx| {
            let mut failure = None;
            for (s, result) in written {
                match result {
                    Some(result) => {
                        if let Some((s, e)) = act.settled(s, result, ctx) {
                            act.unsettled.insert(s.entry.id, s);
                            failure = Some(e);
                        }
                    }
                    None => {
                        act.unsettled.insert(s.entry.id, s);
                    }
                }
            }
            match failure {
                Some(e) => {
                    let wait = act
                        .settle_retry
                        .unwrap_or(SETTLE_RETRY)
                        .saturating_mul(2)
                        .min(MAX_SETTLE_RETRY);
                    warn!(error = %e, unsettled = act.unsettled.len(), retry_in = %humantime::format_duration(wait), "still cannot record delivery outcomes");
                    act.settle_retry = Some(wait);
                    ctx.run_later(wait, |act, ctx| act.retry_settle(ctx));
                }
                None => {
                    info!("delivery outcomes recorded again; deliveries resume");
                    act.settle_retry = None;
                    act.poll(ctx);
                }
            }
        }));
    }

    /// Dispatches the spooled messages older than a lease: left by a node
    /// that stopped (or whose own dispatch failed) before handing them on
    /// (see the module docs, "In a cluster").
    fn sweep_spool(&mut self, ctx: &mut Context<Self>) {
        let (store, lease) = (self.store.clone(), self.lease);
        ctx.spawn(async move { store.inbound().await }.into_actor(self).map(
            move |found, act, ctx| match found {
                Ok(spooled) => {
                    let now = now_unix();
                    let stale: Vec<Envelope> = spooled
                        .into_iter()
                        .filter(|e| e.received_at.saturating_add(lease.as_secs()) <= now)
                        .collect();
                    if !stale.is_empty() {
                        info!(
                            count = stale.len(),
                            "dispatching spooled messages left over"
                        );
                        act.dispatch(stale, ctx);
                    }
                }
                Err(e) => warn!(error = %e, "cannot read the spool"),
            },
        ));
    }

    /// Dispatches spooled notifications ([`dispatch`]) and tries at once
    /// those that went to the queue. One that fails to dispatch stays in
    /// the spool and is dispatched later ([`Delivery::sweep_spool`]).
    fn dispatch(&mut self, envelopes: Vec<Envelope>, ctx: &mut Context<Self>) {
        if envelopes.is_empty() {
            return;
        }
        let (store, config, dkim) = (self.store.clone(), self.config.clone(), self.dkim.clone());
        let run = async move {
            let mut queued = Vec::new();
            for envelope in envelopes {
                match dispatch(&config, &dkim, store.as_ref(), &envelope).await {
                    Ok(ids) => queued.extend(ids),
                    Err(e) => {
                        warn!(id = %envelope.id, error = %e, "spooled message dispatch failed; retried later")
                    }
                }
            }
            queued
        };
        ctx.wait(run.into_actor(self).map(|queued, act, ctx| {
            for id in queued {
                act.try_now(id, None, ctx);
            }
        }));
    }

    /// Starts a round for a message just queued, if there is room and no
    /// queue run has tried it yet.
    fn try_now(&mut self, id: MessageId, content: Option<Bytes>, ctx: &mut Context<Self>) {
        if self.in_flight.len() >= MAX_IN_FLIGHT {
            // No room: a poll picks it up once rounds have finished.
            self.refill = true;
            return;
        }
        if self.busy(id) || self.settle_retry.is_some() {
            // Started by a poll that found it due, or the store fails.
            return;
        }
        // A poll may also have found it due and finished a whole round
        // before this arrived: only an untried entry is started here, so
        // nobody gets a second copy.
        let (store, node, lease) = (self.store.clone(), self.node.clone(), self.lease);
        let claim = async move {
            let claimed = match store.claim(id, now_unix(), &node, lease).await {
                Ok(Some(c)) => c,
                Ok(None) => return None,
                Err(e) => {
                    error!(%id, error = %e, "cannot claim queue entry");
                    return None;
                }
            };
            if claimed.entry.attempts > 0 {
                debug!(%id, "already tried by a queue run");
                let _ = store.unclaim(&claimed.lease).await;
                return None;
            }
            let content = match content {
                Some(c) => Ok(Some(c)),
                None => store.queued_content(id).await,
            };
            Some((claimed, content))
        };
        ctx.wait(claim.into_actor(self).map(|claimed, act, ctx| {
            if let Some((claimed, content)) = claimed {
                act.begin(claimed, content, ctx);
            }
        }));
    }

    fn backoff(&self, attempts: u32) -> Duration {
        backoff(&self.config.delivery.retry, attempts)
    }

    /// Claims entries and bounces them (the administrator's `queue bounce`).
    /// `Err(id)`: the first that is being delivered right now, on this node
    /// or another; those before it are bounced.
    pub(super) fn bounce_ids(
        &mut self,
        ids: Vec<MessageId>,
    ) -> ResponseActFuture<Self, Result<(), QueueError>> {
        let (store, node, lease) = (self.store.clone(), self.node.clone(), self.lease);
        let claim = async move {
            let mut claimed = Vec::new();
            for id in ids {
                match store.claim(id, now_unix(), &node, lease).await {
                    Ok(Some(c)) => claimed.push(c),
                    Ok(None) => match store.queue_entry(id).await {
                        Ok(None) => return (claimed, Err(QueueError::NotQueued(id))),
                        Ok(Some(_)) => return (claimed, Err(QueueError::Busy(id))),
                        Err(e) => return (claimed, Err(e.into())),
                    },
                    Err(e) => return (claimed, Err(e.into())),
                }
            }
            (claimed, Ok(()))
        };
        Box::pin(claim.into_actor(self).map(|(claimed, result), act, ctx| {
            for Claimed { entry, lease } in claimed {
                act.leases.insert(entry.id, lease);
                act.bounce(entry, ctx);
            }
            result
        }))
    }

    fn change_queue(
        &mut self,
        change: ChangeQueue,
    ) -> ResponseActFuture<Self, Result<QueueChanged, QueueError>> {
        let store = self.store.clone();
        match change {
            ChangeQueue::Flush => {
                self.revive_destinations();
                let busy: std::collections::HashSet<MessageId> = self
                    .in_flight
                    .keys()
                    .chain(self.unsettled.keys())
                    .copied()
                    .collect();
                let flush = async move {
                    let now = now_unix();
                    let mut due = 0;
                    let mut after = None;
                    loop {
                        let page = store.queue_page(after, 1000).await?;
                        let Some(last) = page.last() else { break };
                        after = Some(last.entry.id);
                        for item in page {
                            let e = item.entry;
                            if busy.contains(&e.id) {
                                due += 1;
                                continue;
                            }
                            if e.next_attempt > now {
                                if let Err(err) = store.reschedule(e.id, now, false).await {
                                    warn!(id = %e.id, error = %err, "flush: queue update failed");
                                    continue;
                                }
                            }
                            due += 1;
                        }
                    }
                    Ok(due)
                };
                Box::pin(
                    flush
                        .into_actor(self)
                        .map(|due: Result<usize, StoreError>, act, ctx| {
                            let due = due?;
                            info!(messages = due, "queue flushed by the administrator");
                            act.poll(ctx);
                            Ok(QueueChanged::Flushed { due })
                        }),
                )
            }
            ChangeQueue::Delete(id) => {
                let delete = async move {
                    if store.queue_entry(id).await?.is_none() {
                        return Err(QueueError::NotQueued(id));
                    }
                    store.remove_queue(id).await?;
                    Ok(())
                };
                Box::pin(delete.into_actor(self).map(move |done, act, _| {
                    done?;
                    act.flush_soon();
                    info!(%id, status = "deleted", "deleted from the queue by the administrator");
                    Ok(QueueChanged::Deleted(id))
                }))
            }
            ChangeQueue::Bounce(id) => Box::pin(
                self.bounce_ids(vec![id])
                    .map(move |done, _, _| done.map(|()| QueueChanged::Bounced(id))),
            ),
        }
    }
}

/// A failure or delay notification about `entry`'s recipients in that
/// state, addressed to its sender (for a failed bounce: to the postmaster
/// per `double_bounce`). `Ok(None)`: nothing to send, or nowhere to.
async fn notice(
    config: &Config,
    dkim: &DkimKeys,
    store: &dyn Storage,
    entry: &QueueEntry,
    kind: dsn::Kind,
) -> Result<Option<Notice>, StoreError> {
    // With delay warnings off, only a recipient that asked for them
    // (NOTIFY=DELAY) is warned, not those without NOTIFY.
    let asked_delay = |address: &str| {
        let p = entry.params.as_deref().and_then(|p| p.recipient(address));
        p.and_then(|p| p.notify).is_some_and(|n| n.delay)
    };
    let only_asked = kind == dsn::Kind::Delay && config.delivery.delay_warning.is_none();
    let recipients: Vec<RecipientStatus> = entry
        .recipients
        .iter()
        .filter(|r| !only_asked || asked_delay(&r.address))
        .filter_map(|r| status_of(r, kind))
        .collect();
    if recipients.is_empty() {
        return Ok(None);
    }
    let to = match (&entry.sender, kind) {
        (Some(s), _) => s.clone(),
        // A delay warning (or a success notice) about a bounce helps
        // nobody.
        (
            None,
            dsn::Kind::Delay | dsn::Kind::Delivered | dsn::Kind::Relayed | dsn::Kind::Expanded,
        ) => return Ok(None),
        // Never bounce a bounce (RFC 5321 §4.5.5): Postfix's double
        // bounce goes to the postmaster instead.
        (None, dsn::Kind::Failure) => match config.delivery.double_bounce {
            DoubleBounce::Postmaster => {
                let postmaster = postmaster(config);
                if recipients
                    .iter()
                    .all(|r| r.address.eq_ignore_ascii_case(&postmaster))
                {
                    // The postmaster's own notice failed: telling the
                    // postmaster again would loop.
                    warn!(id = %entry.id, "undeliverable notice to the postmaster dropped");
                    return Ok(None);
                }
                warn!(id = %entry.id, to = %postmaster, "undeliverable bounce; reported to the postmaster");
                postmaster
            }
            DoubleBounce::Drop => {
                warn!(id = %entry.id, "undeliverable bounce dropped");
                return Ok(None);
            }
        },
    };
    let envelope = Envelope {
        id: entry.id,
        sender: entry.sender.clone(),
        recipients: Vec::new(),
        received_at: entry.received_at,
        client: entry.client.clone(),
        helo: String::new(),
        size: 0,
        params: entry.params.clone(),
    };
    notification(config, dkim, store, &envelope, &recipients, &to, kind).await
}

fn postmaster(config: &Config) -> String {
    let domain = config
        .routing
        .local_domains
        .first()
        .unwrap_or(&config.hostname);
    format!("postmaster@{domain}")
}

/// Wait after `attempts` attempts: the configured list, then its last
/// interval again and again. (The config refuses an empty list; five
/// minutes, Postfix's first backoff, covers one made in code.)
fn backoff(retry: &[Duration], attempts: u32) -> Duration {
    let i = (attempts.saturating_sub(1) as usize).min(retry.len().saturating_sub(1));
    retry.get(i).copied().unwrap_or(Duration::from_secs(300))
}

/// Unix time with fractions.
fn unix_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// How often expired history events are dropped.
const TRACE_SWEEP: Duration = Duration::from_secs(3600);

impl Delivery {
    /// Drops expired history events, off this thread (it walks the tree).
    fn sweep_trace(&self) {
        let (store, keep) = (self.store.clone(), self.config.trace.keep);
        // Off the async threads: a backend may answer it in place (sled
        // walks the tree).
        let sweep = async move { store.sweep_trace(now_unix(), keep).await };
        tokio::task::spawn_blocking(move || match futures::executor::block_on(sweep) {
            Ok(0) => {}
            Ok(n) => debug!(events = n, "expired history dropped"),
            Err(e) => warn!(error = %e, "cannot drop expired history"),
        });
    }
}

fn sender_text(entry: &QueueEntry) -> String {
    format!("<{}>", entry.sender.as_deref().unwrap_or(""))
}

/// The enhanced status code for the log and a report: the diagnostic's,
/// else `default` (the class of what happened).
fn dsn_status(d: &DeliveryDiagnostic, default: &str) -> String {
    d.status.clone().unwrap_or_else(|| default.to_owned())
}

/// The DSN line for a recipient, if it belongs in a report of `kind`: the
/// typed diagnostic's parts, no text taken apart.
fn status_of(r: &QueueRecipient, kind: dsn::Kind) -> Option<RecipientStatus> {
    let (diagnostic, default_status) = match (&r.state, kind) {
        (RecipientState::Delivered { reply }, dsn::Kind::Relayed) => (reply, "2.0.0"),
        (RecipientState::Failed { reply }, dsn::Kind::Failure) => (reply, "5.0.0"),
        (RecipientState::Deferred { last_error }, dsn::Kind::Delay) => (last_error, "4.0.0"),
        _ => return None,
    };
    Some(RecipientStatus {
        address: r.address.clone(),
        status: dsn_status(diagnostic, default_status),
        diagnostic: diagnostic.reply_text(),
        remote_mta: diagnostic.remote_mta().map(str::to_owned),
        original_recipient: None,
        action: None,
    })
}

impl Actor for Delivery {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Intake sends `Queued` with `try_send`: when this is full, the
        // entry waits in the queue for a poll instead of piling up here.
        ctx.set_mailbox_capacity(4096);
        // Message histories outlive their messages by `[trace] keep`.
        self.sweep_trace();
        ctx.run_interval(TRACE_SWEEP, |act, _| act.sweep_trace());
        // Counting walks the schedule index (a second for a million
        // entries): in the background, so that delivery starts at once.
        let store = self.store.clone();
        actix_rt::spawn(async move {
            match store.queue_len().await {
                Ok(n) if n > 0 => info!(queued = n, "resuming the delivery queue"),
                Ok(_) => {}
                Err(e) => warn!(error = %e, "cannot count the queue"),
            }
        });
        // Idle cached connections are closed politely once too old.
        ctx.run_interval(attempt::CONNECTION_CACHE_TIME, |act, _| {
            for conn in act.attempt.expired() {
                actix_rt::spawn(conn.quit());
            }
        });
        self.renew_leases();
        ctx.run_interval(self.renew_every(), |act, ctx| act.sweep_spool(ctx));
        self.watch(ctx);
        self.poll(ctx);
    }
}

impl Handler<Queued> for Delivery {
    type Result = ();

    fn handle(&mut self, msg: Queued, ctx: &mut Self::Context) {
        self.try_now(msg.id, msg.content, ctx);
    }
}

impl Handler<ChangeQueue> for Delivery {
    type Result = ResponseActFuture<Self, Result<QueueChanged, QueueError>>;

    fn handle(&mut self, msg: ChangeQueue, _: &mut Self::Context) -> Self::Result {
        self.change_queue(msg)
    }
}

/// A reload: the next rounds use the new configuration (retries, limits,
/// smarthost, timeouts, resolver); rounds under way finish with theirs.
impl Handler<Reconfigure> for Delivery {
    type Result = ();

    fn handle(&mut self, msg: Reconfigure, _: &mut Context<Self>) {
        self.attempt = Arc::new(attempt::Attempt::new(msg.0.clone()));
        self.config = msg.0;
        // Limits and rates apply at once, also to deliveries waiting now.
        for (name, d) in &self.destinations {
            d.reconfigure(Settings::of(&self.config, name));
        }
    }
}

/// `address`'s `NOTIFY=SUCCESS` has been honoured (passed on, or a notice
/// made): cleared, so that it is honoured once.
fn success_honoured(params: &mut Option<Box<EnvelopeParams>>, address: &str) {
    let Some(p) = params else { return };
    for r in p.recipients.iter_mut().filter(|r| r.address == address) {
        if let Some(n) = &mut r.notify {
            n.success = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A renewal that misses a lease reports it lost only while the lease
    /// is still held here and no settlement of it is being written: that
    /// write ends the lease in the store before the actor forgets it, and
    /// reported a false "lost to another node".
    #[test]
    fn a_renewal_reports_only_leases_really_lost() {
        let lease = |id, token, until| Lease {
            id: MessageId(id),
            node: "n".into(),
            until,
            token,
        };
        let leases = Leases::default();
        for id in 1..=4 {
            leases.insert(MessageId(id), lease(id, id * 10, 100));
        }
        let asked = leases.all();
        leases.settling(MessageId(2), true);
        leases.remove(&MessageId(3));
        // 1 renewed; 2 settled meanwhile; 3 given up; 4 taken by another.
        let mut lost = leases.renewed(&asked, vec![lease(1, 10, 200)]);
        lost.sort();
        assert_eq!(lost, [MessageId(4)]);
        assert_eq!(leases.get(&MessageId(1)).map(|l| l.until), Some(200));
        // A settlement that failed to write holds the lease on: missed
        // again, it is lost.
        leases.settling(MessageId(2), false);
        let lost = leases.renewed(&[lease(2, 20, 100)], Vec::new());
        assert_eq!(lost, [MessageId(2)]);
        // A newer claim of the same entry is not the one asked about.
        leases.insert(MessageId(4), lease(4, 41, 100));
        assert!(leases
            .renewed(&asked, Vec::new())
            .iter()
            .all(|&id| id != MessageId(4)));
    }

    #[test]
    fn retry_schedule_repeats_its_last_interval() {
        let s = Duration::from_secs;
        let retry = [s(300), s(600), s(1200)];
        let cases = [
            (0, 300),
            (1, 300),
            (2, 600),
            (3, 1200),
            (4, 1200),
            (1000, 1200),
        ];
        for (attempts, want) in cases {
            assert_eq!(backoff(&retry, attempts), s(want), "after {attempts}");
        }
        assert_eq!(backoff(&[s(1)], 7), s(1));
        assert_eq!(backoff(&[], 1), s(300));
    }

    fn recipient(state: RecipientState) -> QueueRecipient {
        QueueRecipient {
            address: "a@dest.test".into(),
            state,
        }
    }

    /// Texts of records written before diagnostics were typed (schema 2)
    /// make the report lines they always made: the fields the reports used
    /// to take out of the text, now read once when the record is.
    #[test]
    fn old_state_texts_make_the_same_report_lines() {
        let cases: &[(&str, Option<&str>, &str, &str)] = &[
            (
                "host mx1.dest.test[127.0.0.2]:2525 said: 550 5.1.1 <a@dest.test>: no such user",
                Some("mx1.dest.test"),
                "550 5.1.1 <a@dest.test>: no such user",
                "5.1.1",
            ),
            (
                "556 5.1.10 null.test: domain does not accept mail (null MX)",
                None,
                "556 5.1.10 null.test: domain does not accept mail (null MX)",
                "5.1.10",
            ),
            (
                "4.4.1 connect to mx[127.0.0.2]:25: Connection refused",
                None,
                "4.4.1 connect to mx[127.0.0.2]:25: Connection refused",
                "4.4.1",
            ),
            // An expiry quotes the last error; its "said:" is not ours.
            (
                "4.4.7 message expired after 5s in the queue (3 attempts); last error: host mx[127.0.0.2]:25 said: 451 busy",
                None,
                "4.4.7 message expired after 5s in the queue (3 attempts); last error: host mx[127.0.0.2]:25 said: 451 busy",
                "4.4.7",
            ),
            (
                "host mx[127.0.0.2]:25 said: 554 go away",
                Some("mx"),
                "554 go away",
                "5.0.0",
            ),
        ];
        for (text, mta, diagnostic, status) in cases {
            let failed = recipient(RecipientState::Failed {
                reply: DeliveryDiagnostic::from_legacy(text),
            });
            let line = status_of(&failed, dsn::Kind::Failure).unwrap();
            assert_eq!(line.remote_mta.as_deref(), *mta, "{text}");
            assert_eq!(line.diagnostic, *diagnostic, "{text}");
            assert_eq!(line.status, *status, "{text}");
        }
    }

    #[test]
    fn only_matching_states_make_report_lines() {
        let mx = postino_core::smtp::RemoteHost {
            host: "mx".into(),
            addr: "127.0.0.2:25".parse().unwrap(),
        };
        let reply = |code, status: Option<&str>, text: &str| DeliveryDiagnostic {
            remote: Some(mx.clone()),
            code: Some(code),
            status: status.map(str::to_owned),
            text: text.into(),
        };
        let failed = recipient(RecipientState::Failed {
            reply: reply(554, None, "go\naway"),
        });
        let line = status_of(&failed, dsn::Kind::Failure).unwrap();
        assert_eq!(line.status, "5.0.0", "default for a reply without one");
        assert_eq!(line.remote_mta.as_deref(), Some("mx"));
        assert_eq!(line.diagnostic, "554 go / away");
        assert!(status_of(&failed, dsn::Kind::Delay).is_none());
        let deferred = recipient(RecipientState::Deferred {
            last_error: reply(451, Some("4.3.0"), "later"),
        });
        let line = status_of(&deferred, dsn::Kind::Delay).unwrap();
        assert_eq!(line.status, "4.3.0");
        assert_eq!(line.diagnostic, "451 4.3.0 later");
        assert!(status_of(&deferred, dsn::Kind::Failure).is_none());
        let ours = recipient(RecipientState::Deferred {
            last_error: DeliveryDiagnostic::local("4.4.1", "connect to mx: refused"),
        });
        let line = status_of(&ours, dsn::Kind::Delay).unwrap();
        assert_eq!(line.status, "4.4.1");
        assert_eq!(line.remote_mta, None);
        assert_eq!(line.diagnostic, "4.4.1 connect to mx: refused");
        for state in [
            RecipientState::Pending,
            RecipientState::Delivered {
                reply: reply(250, None, "ok"),
            },
            RecipientState::Bounced {
                reply: reply(550, None, "no"),
            },
        ] {
            let rcpt = recipient(state);
            assert!(status_of(&rcpt, dsn::Kind::Failure).is_none());
            assert!(status_of(&rcpt, dsn::Kind::Delay).is_none());
        }
    }
}
