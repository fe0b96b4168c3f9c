//! The router actor: decides where each recipient goes (at RCPT time), and
//! hands each accepted message to the local-mailbox actor, the delivery
//! actor, or back to its sender as a bounce.
//!
//! The decision is [`postino_core::routing::decide`]; this actor gives it the
//! store as its directory. Library users replace the decision by passing
//! their own `Recipient<RouteRecipient>` to the server builder (see
//! `examples/custom_router.rs`); dispatching stays here.

use std::sync::Arc;

use actix::prelude::*;
use postino_core::dsn::{self, RecipientStatus};
use postino_core::logsafe::escape;
use postino_core::message::{now_unix, Recipient as Rcpt};
use postino_core::routing::{self, DirectoryError, Target};
use postino_core::smtp::session::RouteQuery;
use postino_core::store::{LocalDelivery, Notice, StoreError};
use postino_core::{Address, Config, Envelope, Route, Store};
use tracing::{info, warn};

use crate::delivery::actor::{new_entry, Enqueue, Queued};
use crate::mailbox::{Deliver, Mailbox, StoreLocal};

/// Where does this recipient go? Asked once per `RCPT TO`. An error (the
/// directory could not be read) refuses the recipient temporarily
/// (`451 4.3.0`), never for good.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<Route, DirectoryError>")]
pub struct RouteRecipient(pub RouteQuery);

/// A message is durably spooled: deliver it. Answered once every recipient
/// has been handed on (stored locally, queued, or bounced).
#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<(), DispatchError>")]
pub struct Dispatch(pub Envelope);

/// A message has been received whole: store it. Local-only mail is written
/// to its mailboxes at once, in one transaction (answer
/// [`Submitted::Delivered`]); remote-only mail is written to the delivery
/// queue at once, in one transaction (answer [`Submitted::Queued`], to be
/// sent to the delivery actor once durable); anything else is spooled and
/// must be sent a [`Dispatch`] once durable ([`Submitted::Spooled`]).
/// Either way it is durable only after the caller's `Store::durable()`.
#[derive(Message, Debug)]
#[rtype(result = "Result<Submitted, DispatchError>")]
pub struct Submit {
    pub envelope: Envelope,
    pub content: Vec<u8>,
}

/// What [`Submit`] did.
#[derive(Debug)]
pub enum Submitted {
    Delivered,
    /// In the delivery queue: send this to the delivery actor once durable.
    Queued(Queued),
    Spooled,
}

/// Why a dispatch did not finish. The message stays in the spool and is
/// dispatched again at the next start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DispatchError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("actor unavailable: {0}")]
    Unavailable(#[from] MailboxError),
}

/// The default router.
pub struct Router {
    config: Arc<Config>,
    store: Store,
    mailbox: Addr<Mailbox>,
    delivery: Recipient<Enqueue>,
}

impl Router {
    pub fn new(
        config: Arc<Config>,
        store: Store,
        mailbox: Addr<Mailbox>,
        delivery: Recipient<Enqueue>,
    ) -> Router {
        Router {
            config,
            store,
            mailbox,
            delivery,
        }
    }
}

impl Actor for Router {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Every SMTP session sends here and awaits the answer (`send`, never
        // `do_send`), so this bound is back-pressure, not loss.
        ctx.set_mailbox_capacity(4096);
    }
}

impl Handler<RouteRecipient> for Router {
    type Result = MessageResult<RouteRecipient>;

    fn handle(&mut self, msg: RouteRecipient, _: &mut Self::Context) -> Self::Result {
        let q = msg.0;
        MessageResult(routing::decide(
            &self.config.routing,
            &self.store,
            &q.recipient,
            q.may_relay,
        ))
    }
}

impl Handler<Submit> for Router {
    type Result = ResponseFuture<Result<Submitted, DispatchError>>;

    fn handle(&mut self, msg: Submit, _: &mut Self::Context) -> Self::Result {
        let Submit { envelope, content } = msg;
        let plan = Plan::of(&envelope);
        if plan.remote.is_empty() && plan.bounced.is_empty() && !plan.local.is_empty() {
            let deliver = self.mailbox.send(StoreLocal {
                id: envelope.id,
                content,
                deliveries: plan.local,
            });
            return Box::pin(async move {
                deliver.await??;
                Ok(Submitted::Delivered)
            });
        }
        if plan.local.is_empty() && plan.bounced.is_empty() && !plan.remote.is_empty() {
            let entry = new_entry(&envelope, plan.remote);
            let queued = self.store.accept_remote(&entry, &content).map(|()| {
                Submitted::Queued(Queued {
                    id: envelope.id,
                    content: content.into(),
                })
            });
            return Box::pin(async move { Ok(queued?) });
        }
        let spooled = self.store.spool(&envelope, &content);
        Box::pin(async move {
            spooled?;
            Ok(Submitted::Spooled)
        })
    }
}

impl Handler<Dispatch> for Router {
    type Result = ResponseFuture<Result<(), DispatchError>>;

    fn handle(&mut self, msg: Dispatch, ctx: &mut Self::Context) -> Self::Result {
        let envelope = msg.0;
        let plan = Plan::of(&envelope);
        let mailbox = self.mailbox.clone();
        let delivery = self.delivery.clone();
        let store = self.store.clone();
        let config = self.config.clone();
        let me = ctx.address();
        Box::pin(async move {
            let id = envelope.id;
            if !plan.local.is_empty() {
                mailbox
                    .send(Deliver {
                        id,
                        deliveries: plan.local,
                    })
                    .await??;
            }
            if !plan.remote.is_empty() {
                delivery
                    .send(Enqueue {
                        envelope: envelope.clone(),
                        recipients: plan.remote,
                    })
                    .await??;
            }
            if !plan.bounced.is_empty() {
                if let Some(bounce) = bounce_envelope(&config, &store, &envelope, &plan.bounced)? {
                    // Spooled before the original is finished: a crash in
                    // between re-dispatches the original, never loses the bounce.
                    let _ = me.send(Dispatch(bounce)).await;
                }
            }
            store.finish_inbound(id)?;
            Ok(())
        })
    }
}

/// A message's recipients sorted by where they go.
struct Plan {
    local: Vec<LocalDelivery>,
    remote: Vec<String>,
    bounced: Vec<RecipientStatus>,
}

impl Plan {
    fn of(envelope: &Envelope) -> Plan {
        let mut plan = Plan {
            local: Vec::new(),
            remote: Vec::new(),
            bounced: Vec::new(),
        };
        for Rcpt { address, route } in &envelope.recipients {
            match route {
                Route::Deliver(targets) => {
                    for t in targets {
                        match t {
                            Target::Mailbox { mailbox, original } => {
                                if plan.local.iter().any(|d| &d.mailbox == mailbox) {
                                    continue;
                                }
                                plan.local.push(LocalDelivery {
                                    mailbox: mailbox.clone(),
                                    prefix: delivery_headers(
                                        envelope,
                                        mailbox,
                                        original.as_deref(),
                                    ),
                                });
                            }
                            Target::Remote { address } => {
                                if !plan.remote.contains(address) {
                                    plan.remote.push(address.clone());
                                }
                            }
                        }
                    }
                }
                Route::Bounce { status, reason } => plan.bounced.push(RecipientStatus {
                    address: address.clone(),
                    status: status.clone(),
                    diagnostic: format!("550 {status} {reason}"),
                    remote_mta: None,
                }),
                Route::Reject(_) => {}
            }
        }
        plan
    }
}

/// Headers a local delivery adds, as Postfix's local(8) does.
fn delivery_headers(envelope: &Envelope, mailbox: &str, original: Option<&str>) -> Vec<u8> {
    let mut h = format!(
        "Return-Path: {}\r\nDelivered-To: {mailbox}\r\n",
        envelope.sender_display()
    );
    if let Some(original) = original {
        h.push_str(&format!("X-Original-To: {original}\r\n"));
    }
    h.into_bytes()
}

/// Spools a bounce for `failed` recipients of `envelope` and returns its
/// envelope, or `None` when no bounce may be sent (null sender).
pub fn bounce_envelope(
    config: &Config,
    store: &Store,
    envelope: &Envelope,
    failed: &[RecipientStatus],
) -> Result<Option<Envelope>, StoreError> {
    let Some(sender) = envelope.sender.as_deref() else {
        // Never bounce a bounce (RFC 5321 §4.5.5).
        warn!(id = %envelope.id, "not bouncing a message from <>; dropped");
        return Ok(None);
    };
    bounce_to(
        config,
        store,
        envelope,
        failed,
        sender,
        dsn::Kind::Failure,
        true,
    )
}

/// Spools a delivery status notification of `kind` addressed to `to`.
/// `inbound`: the original is still in the intake spool (a bounce made at
/// dispatch), so the store marks it and a re-dispatch after a crash does not
/// bounce twice.
pub fn bounce_to(
    config: &Config,
    store: &Store,
    envelope: &Envelope,
    recipients: &[RecipientStatus],
    to: &str,
    kind: dsn::Kind,
    inbound: bool,
) -> Result<Option<Envelope>, StoreError> {
    let Some(Notice {
        envelope: bounce,
        content,
    }) = notification(config, store, envelope, recipients, to, kind)?
    else {
        return Ok(None);
    };
    if inbound {
        if !store.spool_bounce(envelope.id, &bounce, &content)? {
            // Spooled by a dispatch before a crash; it is dispatched from
            // the spool on its own.
            return Ok(None);
        }
    } else {
        store.spool(&bounce, &content)?;
    }
    info!(id = %bounce.id, orig_id = %envelope.id, to = %escape(to), kind = ?kind, "notification created");
    Ok(Some(bounce))
}

/// The store error behind a failed lookup in the store (the store's
/// [`postino_core::Directory`] errors always wrap one).
fn store_error(e: DirectoryError) -> StoreError {
    match e.0.downcast::<StoreError>() {
        Ok(e) => *e,
        Err(other) => StoreError::Codec(other.to_string()),
    }
}

/// Builds (without spooling) a delivery status notification of `kind`
/// about `envelope`'s `recipients`, addressed to `to` and routed like any
/// message to it. `None` when `to` cannot be routed. The delivery actor
/// spools it together with its queue change ([`Store::settle_queue`]).
pub fn notification(
    config: &Config,
    store: &Store,
    envelope: &Envelope,
    recipients: &[RecipientStatus],
    to: &str,
    kind: dsn::Kind,
) -> Result<Option<Notice>, StoreError> {
    // Queued mail may hold its content inline; spooled mail shares it.
    let original = match store.queued_content(envelope.id)? {
        Some(c) => c,
        None => store.content(envelope.id)?.unwrap_or_default(),
    };
    let id = store.new_id()?;
    let now = now_unix();
    let content = dsn::Report {
        kind,
        hostname: &config.hostname,
        id: envelope.id,
        sender: to,
        arrival_date: &dsn::rfc5322_date(envelope.received_at),
        date: &dsn::rfc5322_date(now),
        recipients,
        original: &original,
    }
    .build();
    let Ok(rcpt) = Address::parse(to, true) else {
        warn!(id = %envelope.id, sender = %escape(to), "unparseable sender; bounce dropped");
        return Ok(None);
    };
    // The bounce goes wherever the sender's address leads, local or remote.
    let route = routing::decide(&config.routing, store, &rcpt, true).map_err(store_error)?;
    if !route.is_accepted() {
        warn!(id = %envelope.id, sender = %escape(to), "bounce recipient not routable; dropped");
        return Ok(None);
    }
    let bounce = Envelope {
        id,
        sender: None,
        recipients: vec![Rcpt {
            address: to.to_owned(),
            route,
        }],
        received_at: now,
        client: "local".into(),
        helo: config.hostname.clone(),
        size: content.len() as u64,
    };
    Ok(Some(Notice {
        envelope: bounce,
        content,
    }))
}
