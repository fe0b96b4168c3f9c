//! Dispatch: hands a durably spooled message on to its local mailboxes, the
//! delivery queue and, for recipients refused at routing, a bounce. Plain
//! functions over the store, used by intake (mail for local and remote
//! recipients together), by the server at startup (messages spooled but not
//! finished before a stop or crash) and by the delivery actor (its
//! notifications). Each step is idempotent (a progress record in the
//! store), so a dispatch cut short is simply done again.
//!
//! [`Plan`] sorts a message's recipients once; intake uses the same plan to
//! choose how to store the message in the first place.

use postino_core::dsn::{Kind, RecipientStatus};
use postino_core::esmtp::{notify_of, Orcpt, RecipientParams};
use postino_core::message::{now_unix, RoutedRecipient as Rcpt};
use postino_core::routing::Target;
use postino_core::storage::Storage;
use postino_core::store::{LocalDelivery, QueueEntry, QueueRecipient, RecipientState, StoreError};
use postino_core::{Config, Envelope, MessageId, Route};
use tracing::warn;

use crate::bounce::bounce_envelope;
use crate::dkim::DkimKeys;
use crate::mailbox;

/// Why a dispatch did not finish. The message stays in the spool and is
/// dispatched again at the next start or by the delivery actor's spool
/// sweep ([`crate::delivery`], "In a cluster").
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DispatchError {
    /// The store failed (read, write or flush).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Dispatches a spooled `envelope` (durable, or at least written before the
/// group commit its caller awaits), and the bounce it makes (signed with
/// `dkim` when it leaves, see [`crate::bounce::notification`]), then finishes
/// it in the spool. Returns the ids it put in the delivery queue: send each
/// to the delivery actor ([`crate::delivery::actor::Queued`]) to try it at
/// once; the queue has them anyway.
///
/// # Errors
///
/// A store error; the message stays in the spool and the steps already
/// done are not done again (see the module docs).
pub async fn dispatch(
    config: &Config,
    dkim: &DkimKeys,
    store: &dyn Storage,
    envelope: &Envelope,
) -> Result<Vec<MessageId>, DispatchError> {
    dispatch_planned(config, dkim, store, envelope, Plan::of(envelope)).await
}

/// [`dispatch`] by a plan already made (intake makes one to choose how to
/// store the message).
///
/// # Errors
///
/// As [`dispatch`].
pub async fn dispatch_planned(
    config: &Config,
    dkim: &DkimKeys,
    store: &dyn Storage,
    envelope: &Envelope,
    plan: Plan,
) -> Result<Vec<MessageId>, DispatchError> {
    let mut queued = Vec::new();
    dispatch_into(config, dkim, store, envelope, plan, &mut queued).await?;
    Ok(queued)
}

async fn dispatch_into(
    config: &Config,
    dkim: &DkimKeys,
    store: &dyn Storage,
    envelope: &Envelope,
    plan: Plan,
    queued: &mut Vec<MessageId>,
) -> Result<(), DispatchError> {
    let id = envelope.id;
    if !plan.local.is_empty() {
        mailbox::deliver_local(store, id, &plan.local).await?;
    }
    if !plan.remote.is_empty() {
        // Written before the spool record is finished: a crash in between
        // dispatches again, and the store queues it only once.
        store
            .enqueue(&new_entry(envelope, plan.remote, &plan.forwarded))
            .await?;
        queued.push(id);
    }
    if !plan.bounced.is_empty() || !plan.delivered.is_empty() {
        // One notice for both: the spool records one per message, so a
        // dispatch done again after a crash sends neither twice.
        let only_expanded = plan
            .delivered
            .iter()
            .all(|r| r.action == Some(Kind::Expanded));
        let kind = match (plan.bounced.is_empty(), only_expanded) {
            (false, _) => Kind::Failure,
            (true, true) => Kind::Expanded,
            (true, false) => Kind::Delivered,
        };
        let mut about = plan.bounced;
        about.extend(plan.delivered);
        if let Some(bounce) = bounce_envelope(config, dkim, store, envelope, &about, kind).await? {
            // Spooled before the original is finished: a crash in between
            // re-dispatches the original, never loses the bounce. A bounce
            // has no sender, so it never makes a bounce itself. A failed
            // dispatch of it is retried at the next start, like any.
            let plan = Plan::of(&bounce);
            // A bounce is from <>: dispatching it spools no bounce of its own, so
            // this recursion is one level deep.
            if let Err(e) =
                Box::pin(dispatch_into(config, dkim, store, &bounce, plan, queued)).await
            {
                warn!(id = %bounce.id, error = %e, "notification dispatch failed; retried later");
            }
        }
    }
    store.finish_inbound(id).await?;
    Ok(())
}

/// A new queue entry for `recipients` of `envelope`, due now. The DSN
/// parameters of those reached through an alias are in `forwarded`
/// ([`Plan::forwarded`]).
pub fn new_entry(
    envelope: &Envelope,
    recipients: Vec<String>,
    forwarded: &[RecipientParams],
) -> QueueEntry {
    let mut params = envelope.params.as_deref().cloned().unwrap_or_default();
    params
        .recipients
        .retain(|r| recipients.contains(&r.address));
    for f in forwarded {
        if recipients.contains(&f.address) && params.recipient(&f.address).is_none() {
            params.recipients.push(f.clone());
        }
    }
    let params = params.boxed();
    QueueEntry {
        id: envelope.id,
        sender: envelope.sender.clone(),
        received_at: envelope.received_at,
        next_attempt: now_unix(),
        attempts: 0,
        recipients: recipients
            .into_iter()
            .map(|address| QueueRecipient {
                address,
                state: RecipientState::Pending,
            })
            .collect(),
        client: envelope.client.clone(),
        warned: false,
        params,
    }
}

/// A message's recipients sorted by where they go.
pub struct Plan {
    /// Local mailboxes, each once, with the headers its copy gets.
    pub local: Vec<LocalDelivery>,
    /// Remote addresses, each once.
    pub remote: Vec<String>,
    /// Recipients that routing bounces.
    pub bounced: Vec<RecipientStatus>,
    /// Recipients delivered to a local mailbox (`delivered`) or forwarded
    /// by an alias (`expanded`) that asked for a success notice
    /// (`NOTIFY=SUCCESS`, RFC 3461): sent with the bounce, if any.
    pub delivered: Vec<RecipientStatus>,
    /// The DSN parameters of remote addresses reached through an alias
    /// (RFC 3461 §6.2.7, as Postfix does it): the alias's `NOTIFY` without
    /// `SUCCESS` (answered by the `expanded` notice), and its `ORCPT`, or
    /// the alias itself when the client gave none, so that their notices
    /// and the next hop name the address the mail was sent to.
    pub forwarded: Vec<RecipientParams>,
}

impl Plan {
    /// Sorts `envelope`'s recipients by their routes.
    pub fn of(envelope: &Envelope) -> Plan {
        let mut plan = Plan {
            local: Vec::new(),
            remote: Vec::new(),
            bounced: Vec::new(),
            delivered: Vec::new(),
            forwarded: Vec::new(),
        };
        let params = envelope.params.as_deref();
        for Rcpt { address, route } in &envelope.recipients {
            match route {
                Route::Deliver(targets) => {
                    // Anything but the recipient's own mailbox: an alias
                    // (or the postmaster standing in for an unknown user).
                    let expanded = !matches!(&targets[..], [Target::Mailbox { mailbox, original: None }]
                        if mailbox.eq_ignore_ascii_case(address));
                    let notify = notify_of(params, address);
                    if notify.success {
                        let (diagnostic, action) = match expanded {
                            false => ("250 2.0.0 delivered to mailbox", Kind::Delivered),
                            true => ("250 2.0.0 alias expanded", Kind::Expanded),
                        };
                        plan.delivered.push(RecipientStatus {
                            address: address.clone(),
                            status: "2.0.0".into(),
                            diagnostic: diagnostic.into(),
                            remote_mta: None,
                            original_recipient: None,
                            action: Some(action),
                        });
                    }
                    if expanded {
                        let given = params.and_then(|p| p.recipient(address));
                        for t in targets {
                            let Target::Remote { address: to } = t else {
                                continue;
                            };
                            if plan.forwarded.iter().any(|f| &f.address == to) {
                                continue;
                            }
                            plan.forwarded.push(RecipientParams {
                                address: to.clone(),
                                notify: given.and_then(|g| g.notify).map(|n| n.forwarded()),
                                orcpt: Some(given.and_then(|g| g.orcpt.clone()).unwrap_or(Orcpt {
                                    addr_type: "rfc822".into(),
                                    address: address.clone(),
                                })),
                            });
                        }
                    }
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
                    original_recipient: None,
                    action: None,
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
