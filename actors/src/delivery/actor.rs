//! The delivery actor: Postfix's queue manager. It keeps remote messages in
//! the sled queue, tries each when it is due, retries on the configured
//! schedule, and bounces what fails for good or outlives the queue lifetime.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use postino_core::dsn::{self, RecipientStatus};
use postino_core::message::now_unix;
use postino_core::store::{QueueEntry, QueueRecipient, RecipientState, StoreError};
use postino_core::{Config, Envelope, MessageId, Store};
use tokio::sync::Semaphore;
use tracing::{info, warn};

use crate::control::{parse_id, Response};
use crate::router::{bounce_to, Dispatch};

use super::attempt::{self, Outcome};

/// Most messages being tried at once (each may hold several connections).
pub const MAX_IN_FLIGHT: usize = 512;

/// Queue these remote recipients of a spooled message.
#[derive(Message, Debug)]
#[rtype(result = "Result<(), StoreError>")]
pub struct Enqueue {
    pub envelope: Envelope,
    pub recipients: Vec<String>,
}

/// Tells the delivery actor where bounces go (the router starts after it).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetRouter(pub Recipient<Dispatch>);

/// `postino queue flush|delete|bounce` from the control socket.
#[derive(Message, Debug)]
#[rtype(result = "Response")]
pub enum QueueCommand {
    Flush,
    Delete(String),
    Bounce(String),
}

/// The queue manager.
pub struct Delivery {
    config: Arc<Config>,
    store: Store,
    router: Option<Recipient<Dispatch>>,
    in_flight: HashSet<MessageId>,
    /// Per destination domain: `concurrency_per_domain` permits.
    domains: HashMap<String, Arc<Semaphore>>,
    wakeup: Option<SpawnHandle>,
    attempt: Arc<attempt::Attempt>,
}

impl Delivery {
    pub fn new(config: Arc<Config>, store: Store) -> Delivery {
        let attempt = Arc::new(attempt::Attempt::new(config.clone()));
        Delivery {
            config,
            store,
            router: None,
            in_flight: HashSet::new(),
            domains: HashMap::new(),
            wakeup: None,
            attempt,
        }
    }

    /// Starts every due entry we have room for, then sleeps until the next.
    fn poll(&mut self, ctx: &mut Context<Self>) {
        if let Some(h) = self.wakeup.take() {
            ctx.cancel_future(h);
        }
        let room = MAX_IN_FLIGHT.saturating_sub(self.in_flight.len());
        if room > 0 {
            match self.store.due(now_unix(), room + self.in_flight.len()) {
                Ok(due) => {
                    for entry in due {
                        if self.in_flight.len() >= MAX_IN_FLIGHT {
                            break;
                        }
                        if !self.in_flight.contains(&entry.id) {
                            self.start(entry, ctx);
                        }
                    }
                }
                Err(e) => warn!(error = %e, "queue scan failed"),
            }
        }
        self.schedule(ctx);
    }

    /// Wakes up at the next due time (at most a minute from now, so that
    /// entries changed behind our back are seen).
    fn schedule(&mut self, ctx: &mut Context<Self>) {
        let now = now_unix();
        let wait = match self.store.next_due_time() {
            Ok(Some(t)) if self.in_flight.len() < MAX_IN_FLIGHT => {
                t.saturating_sub(now).clamp(1, 60)
            }
            _ => 60,
        };
        self.wakeup = Some(ctx.run_later(Duration::from_secs(wait), |act, ctx| {
            act.wakeup = None;
            act.poll(ctx);
        }));
    }

    fn semaphore(&mut self, domain: &str) -> Arc<Semaphore> {
        let limit = self.config.delivery.concurrency_per_domain;
        self.domains
            .entry(domain.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(limit)))
            .clone()
    }

    /// Tries every open recipient of `entry`, one task per destination.
    fn start(&mut self, entry: QueueEntry, ctx: &mut Context<Self>) {
        let content = match self.store.content(entry.id) {
            Ok(Some(c)) => c,
            other => {
                warn!(id = %entry.id, ?other, "queued message has no content; removed");
                let _ = self.store.remove_queue(entry.id);
                return;
            }
        };
        let mut by_domain: HashMap<String, Vec<String>> = HashMap::new();
        for r in entry.recipients.iter().filter(|r| r.state.is_open()) {
            let domain = r
                .address
                .rsplit_once('@')
                .map(|(_, d)| d)
                .unwrap_or("")
                .to_ascii_lowercase();
            by_domain.entry(domain).or_default().push(r.address.clone());
        }
        if by_domain.is_empty() {
            self.finish(entry, ctx);
            return;
        }
        self.in_flight.insert(entry.id);
        let mut tasks = Vec::new();
        for (domain, rcpts) in by_domain {
            let permits = self.semaphore(&domain);
            let attempt = self.attempt.clone();
            let sender = entry.sender.clone();
            let content = content.clone();
            let id = entry.id;
            tasks.push(async move {
                let _permit = permits.acquire_owned().await;
                attempt
                    .deliver(id, &domain, sender.as_deref(), &rcpts, &content)
                    .await
            });
        }
        let fut = futures::future::join_all(tasks);
        ctx.spawn(fut.into_actor(self).map(move |results, act, ctx| {
            act.in_flight.remove(&entry.id);
            // The entry may have been deleted or bounced meanwhile.
            let current = match act.store.queue_entry(entry.id) {
                Ok(Some(e)) => e,
                _ => return,
            };
            act.apply(current, results.into_iter().flatten().collect(), ctx);
            if act.in_flight.len() + 1 >= MAX_IN_FLIGHT {
                act.poll(ctx);
            }
        }));
    }

    /// Records what an attempt did, then bounces, reschedules or removes.
    fn apply(&mut self, mut entry: QueueEntry, outcomes: Vec<Outcome>, ctx: &mut Context<Self>) {
        entry.attempts += 1;
        for o in outcomes {
            let Some(r) = entry
                .recipients
                .iter_mut()
                .find(|r| r.address == o.recipient)
            else {
                continue;
            };
            let (state, status) = match o.result {
                attempt::RcptResult::Delivered(reply) => {
                    (RecipientState::Delivered { reply }, "sent")
                }
                attempt::RcptResult::Deferred(error) => {
                    (RecipientState::Deferred { last_error: error }, "deferred")
                }
                attempt::RcptResult::Failed(reply) => (RecipientState::Failed { reply }, "bounced"),
            };
            info!(id = %entry.id, to = %o.recipient, relay = %o.relay, status, detail = %state_text(&state), "delivery attempt");
            r.state = state;
        }
        let now = now_unix();
        let age = now.saturating_sub(entry.received_at);
        let open = entry.recipients.iter().any(|r| r.state.is_open());
        if open && age >= self.config.delivery.max_queue_lifetime.as_secs() {
            for r in entry.recipients.iter_mut().filter(|r| r.state.is_open()) {
                let last = match &r.state {
                    RecipientState::Deferred { last_error } => last_error.clone(),
                    _ => String::new(),
                };
                r.state = RecipientState::Failed {
                    reply: format!(
                        "4.4.7 message expired after {} attempts; last error: {last}",
                        entry.attempts
                    ),
                };
            }
            info!(id = %entry.id, "queue lifetime exceeded; bouncing");
        }
        if entry.recipients.iter().any(|r| r.state.is_open()) {
            if let Some(warn_after) = self.config.delivery.delay_warning {
                if !entry.warned && age >= warn_after.as_secs() {
                    self.notify(&entry, dsn::Kind::Delay);
                    entry.warned = true;
                }
            }
            entry.next_attempt = now + self.backoff(entry.attempts).as_secs().max(1);
            if let Err(e) = self.store.update_queue(&entry) {
                warn!(id = %entry.id, error = %e, "queue update failed");
            }
            return;
        }
        self.finish(entry, ctx);
    }

    /// Every recipient is done: bounce the failed ones, drop the entry.
    fn finish(&mut self, entry: QueueEntry, _ctx: &mut Context<Self>) {
        self.notify(&entry, dsn::Kind::Failure);
        if let Err(e) = self.store.remove_queue(entry.id) {
            warn!(id = %entry.id, error = %e, "queue removal failed");
        }
        info!(id = %entry.id, "removed from queue");
    }

    /// Sends a failure or delay notification about `entry` to its sender (or,
    /// for a failed bounce, to the postmaster per `double_bounce`).
    fn notify(&mut self, entry: &QueueEntry, kind: dsn::Kind) {
        let recipients: Vec<RecipientStatus> = entry
            .recipients
            .iter()
            .filter_map(|r| status_of(r, kind))
            .collect();
        if recipients.is_empty() {
            return;
        }
        let to = match (&entry.sender, kind) {
            (Some(s), _) => s.clone(),
            (None, dsn::Kind::Delay) => return,
            (None, dsn::Kind::Failure) => match self.config.delivery.double_bounce {
                postino_core::config::DoubleBounce::Postmaster => {
                    let domain = self
                        .config
                        .routing
                        .local_domains
                        .first()
                        .cloned()
                        .unwrap_or_else(|| self.config.hostname.clone());
                    warn!(id = %entry.id, "undeliverable bounce; sent to the postmaster");
                    format!("postmaster@{domain}")
                }
                postino_core::config::DoubleBounce::Drop => {
                    warn!(id = %entry.id, "undeliverable bounce dropped");
                    return;
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
        };
        match bounce_to(
            &self.config,
            &self.store,
            &envelope,
            &recipients,
            &to,
            kind,
            false,
        ) {
            Ok(Some(bounce)) => {
                if let Some(router) = &self.router {
                    router.do_send(Dispatch(bounce));
                }
            }
            Ok(None) => {}
            Err(e) => warn!(id = %entry.id, error = %e, "cannot create notification"),
        }
    }

    /// Wait before attempt `attempts + 1`: the configured list, then its
    /// last interval again and again.
    fn backoff(&self, attempts: u32) -> Duration {
        let retry = &self.config.delivery.retry;
        let i = (attempts.saturating_sub(1) as usize).min(retry.len() - 1);
        retry[i]
    }

    fn command(&mut self, cmd: QueueCommand, ctx: &mut Context<Self>) -> Response {
        match cmd {
            QueueCommand::Flush => {
                let mut n = 0;
                if let Ok(all) = self.store.queue() {
                    let now = now_unix();
                    for mut e in all {
                        e.next_attempt = now;
                        if self.store.update_queue(&e).is_ok() {
                            n += 1;
                        }
                    }
                }
                self.poll(ctx);
                Response::Ok(vec![format!("{n} message(s) scheduled for delivery now")])
            }
            QueueCommand::Delete(id) => match parse_id(&id) {
                Ok(id) => match self.store.remove_queue(id) {
                    Ok(()) => {
                        info!(%id, "deleted from queue by the administrator");
                        Response::Ok(vec![format!("deleted {id}")])
                    }
                    Err(e) => Response::Error(e.to_string()),
                },
                Err(e) => Response::Error(e),
            },
            QueueCommand::Bounce(id) => match parse_id(&id) {
                Ok(id) => match self.store.queue_entry(id) {
                    Ok(Some(mut entry)) => {
                        for r in entry.recipients.iter_mut().filter(|r| r.state.is_open()) {
                            r.state = RecipientState::Failed {
                                reply: "5.0.0 message bounced by the administrator".into(),
                            };
                        }
                        self.finish(entry, ctx);
                        Response::Ok(vec![format!("bounced {id}")])
                    }
                    Ok(None) => Response::Error(format!("no queued message {id}")),
                    Err(e) => Response::Error(e.to_string()),
                },
                Err(e) => Response::Error(e),
            },
        }
    }
}

fn state_text(s: &RecipientState) -> &str {
    match s {
        RecipientState::Pending => "",
        RecipientState::Deferred { last_error } => last_error,
        RecipientState::Delivered { reply } | RecipientState::Failed { reply } => reply,
    }
}

/// The DSN line for a recipient, if it belongs in a report of `kind`.
fn status_of(r: &QueueRecipient, kind: dsn::Kind) -> Option<RecipientStatus> {
    let (text, default_status) = match (&r.state, kind) {
        (RecipientState::Failed { reply }, dsn::Kind::Failure) => (reply, "5.0.0"),
        (RecipientState::Deferred { last_error }, dsn::Kind::Delay) => (last_error, "4.0.0"),
        _ => return None,
    };
    let (mta, diagnostic) = match text.split_once(" said: ") {
        Some((host, reply)) => {
            let host = host.trim_start_matches("host ");
            let name = host.split('[').next().unwrap_or(host);
            (Some(name.to_owned()), reply.to_owned())
        }
        None => (None, text.clone()),
    };
    Some(RecipientStatus {
        address: r.address.clone(),
        status: enhanced_status(&diagnostic)
            .unwrap_or(default_status)
            .to_owned(),
        diagnostic,
        remote_mta: mta,
    })
}

/// The enhanced status code in a reply text such as `550 5.1.1 …` or `5.1.10 …`.
fn enhanced_status(text: &str) -> Option<&str> {
    text.split_whitespace().take(2).find(|w| {
        let parts: Vec<&str> = w.split('.').collect();
        parts.len() == 3
            && matches!(parts[0], "2" | "4" | "5")
            && parts[1..]
                .iter()
                .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
    })
}

impl Actor for Delivery {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(4096);
        match self.store.queue_len() {
            Ok(n) if n > 0 => info!(queued = n, "resuming the delivery queue"),
            _ => {}
        }
        self.poll(ctx);
    }
}

impl Handler<Enqueue> for Delivery {
    type Result = Result<(), StoreError>;

    fn handle(&mut self, msg: Enqueue, ctx: &mut Self::Context) -> Self::Result {
        let e = &msg.envelope;
        let entry = QueueEntry {
            id: e.id,
            sender: e.sender.clone(),
            received_at: e.received_at,
            next_attempt: now_unix(),
            attempts: 0,
            recipients: msg
                .recipients
                .into_iter()
                .map(|address| QueueRecipient {
                    address,
                    state: RecipientState::Pending,
                })
                .collect(),
            client: e.client.clone(),
            warned: false,
        };
        self.store.enqueue(&entry)?;
        if self.in_flight.len() < MAX_IN_FLIGHT && !self.in_flight.contains(&entry.id) {
            // The fast path: try at once, without waiting for the next poll.
            // A crash before the queue record is flushed is covered by the
            // spool record, which is only finished after this returns.
            let entry = self.store.queue_entry(entry.id)?.unwrap_or(entry);
            self.start(entry, ctx);
        }
        Ok(())
    }
}

impl Handler<SetRouter> for Delivery {
    type Result = ();

    fn handle(&mut self, msg: SetRouter, _: &mut Self::Context) {
        self.router = Some(msg.0);
    }
}

impl Handler<QueueCommand> for Delivery {
    type Result = MessageResult<QueueCommand>;

    fn handle(&mut self, msg: QueueCommand, ctx: &mut Self::Context) -> Self::Result {
        MessageResult(self.command(msg, ctx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enhanced_status_is_found() {
        assert_eq!(enhanced_status("550 5.1.1 <a@b>: no"), Some("5.1.1"));
        assert_eq!(enhanced_status("5.1.10 null MX"), Some("5.1.10"));
        assert_eq!(enhanced_status("550 no such user"), None);
    }
}
