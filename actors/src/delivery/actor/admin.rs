//! The delivery actor's side of the queue tools (`queue_tools.rs`): which
//! entries are being tried, and the bulk actions, carried out here so that
//! the actor's rounds and schedule agree with the store.

use std::collections::HashSet;

use actix::prelude::*;
use postino_core::message::now_unix;
use postino_core::store::DeliveryDiagnostic;
use postino_core::store::{QueueEntry, RecipientState, Rescheduled};
use postino_core::MessageId;
use tracing::{info, warn};

use super::Delivery;
use crate::queue_tools::{self, Action, Filter};

/// The ids of the entries being tried or waiting for their outcome to be
/// written: the `active` state of the listings.
#[derive(Message, Debug)]
#[rtype(result = "HashSet<MessageId>")]
pub struct ActiveIds;

impl Handler<ActiveIds> for Delivery {
    type Result = MessageResult<ActiveIds>;

    fn handle(&mut self, _: ActiveIds, _: &mut Self::Context) -> Self::Result {
        MessageResult(
            self.in_flight
                .keys()
                .chain(self.unsettled.keys())
                .copied()
                .collect(),
        )
    }
}

/// The destinations the queue manager knows now (those with deliveries
/// running or waiting, or with a death or rate to remember), by name:
/// `postino queue destinations`.
#[derive(Message, Debug)]
#[rtype(result = "Vec<crate::delivery::shaping::View>")]
pub struct Destinations;

impl Handler<Destinations> for Delivery {
    type Result = MessageResult<Destinations>;

    fn handle(&mut self, _: Destinations, _: &mut Self::Context) -> Self::Result {
        let mut views: Vec<_> = self.destinations.values().map(|d| d.view()).collect();
        views.sort_by(|a, b| a.name.cmp(&b.name));
        MessageResult(views)
    }
}

/// `postino queue hold|release|requeue|flush|delete|bounce` with ids or
/// filters, on the running server. Answers the count line, or an error.
#[derive(Message, Debug)]
#[rtype(result = "Result<String, String>")]
pub struct QueueAdmin {
    pub action: Action,
    pub filter: Filter,
}

impl Handler<QueueAdmin> for Delivery {
    type Result = ResponseActFuture<Self, Result<String, String>>;

    fn handle(&mut self, msg: QueueAdmin, _: &mut Self::Context) -> Self::Result {
        let QueueAdmin { action, filter } = msg;
        if let Err(e) = queue_tools::check_selection(action, &filter) {
            return Box::pin(actix::fut::ready(Err(e)));
        }
        if matches!(action, Action::Flush | Action::Requeue | Action::Release) {
            self.revive_destinations();
        }
        // The entries in a round now: on the storage seam the walk is
        // async, so it works from this snapshot, as the plain flush does.
        let active: HashSet<MessageId> = self
            .in_flight
            .keys()
            .chain(self.unsettled.keys())
            .copied()
            .collect();
        let store = self.store.clone();
        let walk = async move {
            let now = now_unix();
            let mut n = 0u64;
            // Bounces are made after the walk: each is a store transaction
            // that the walk need not see.
            let mut to_bounce = Vec::new();
            let mut selection = queue_tools::Selection::new(&filter, &active)?;
            while let Some(page) = selection.next_page(store.as_ref()).await? {
                for item in page {
                    let id = item.entry.id;
                    let done = match action {
                        Action::Hold => store.hold(id, now).await,
                        Action::Release => store.release(id, now).await,
                        // An entry in a round is retried when its round
                        // ends, as the plain flush does.
                        Action::Requeue | Action::Flush if active.contains(&id) => Ok(true),
                        Action::Requeue => store
                            .reschedule(id, now, true)
                            .await
                            .map(|r| r == Rescheduled::Done),
                        Action::Flush => store
                            .reschedule(id, now, false)
                            .await
                            .map(|r| r == Rescheduled::Done),
                        Action::Delete => store.remove_queue(id).await.map(|()| true),
                        Action::Bounce => {
                            to_bounce.push(item.entry);
                            Ok(true)
                        }
                    };
                    match done {
                        Ok(true) => {
                            n += 1;
                            if matches!(action, Action::Hold | Action::Release | Action::Delete) {
                                info!(%id, status = action.done(), "queue: {} by the administrator", action.done());
                            }
                        }
                        Ok(false) => {}
                        Err(e) => {
                            warn!(%id, error = %e, "queue {}: store write failed", action.done());
                            return Err(e.to_string());
                        }
                    }
                }
            }
            Ok((n, selection.missing().to_vec(), to_bounce))
        };
        Box::pin(walk.into_actor(self).map(move |walked, act, ctx| {
            let (n, missing, to_bounce) = walked?;
            if !to_bounce.is_empty() {
                let ids = to_bounce.iter().map(|e: &QueueEntry| e.id).collect();
                ctx.spawn(act.bounce_ids(ids).map(|done, _, _| {
                    if let Err(e) = done {
                        warn!(error = %e, "queue bounce");
                    }
                }));
            }
            // Bounces are flushed by their settlement; the rest now.
            if action != Action::Bounce {
                act.flush_soon();
            }
            if matches!(action, Action::Release | Action::Requeue | Action::Flush) {
                info!(
                    messages = n,
                    "queue: {} by the administrator",
                    action.done()
                );
                act.poll(ctx);
            }
            queue_tools::finish(action, n, &missing)
        }))
    }
}

impl Delivery {
    /// Fails every open recipient of `entry` with the administrator's
    /// reason and settles it: the sender gets a bounce.
    pub(super) fn bounce(&mut self, mut entry: QueueEntry, ctx: &mut Context<Self>) {
        for r in entry.recipients.iter_mut().filter(|r| r.state.is_open()) {
            let last = match &r.state {
                RecipientState::Deferred { last_error } => format!("; last error: {last_error}"),
                _ => String::new(),
            };
            r.state = RecipientState::Failed {
                reply: DeliveryDiagnostic::local(
                    "5.0.0",
                    format!(
                        "message returned by the postmaster of {}{last}",
                        self.config.hostname
                    ),
                ),
            };
        }
        info!(id = %entry.id, status = "bounced", "bounced by the administrator");
        self.finalize(entry, false, ctx);
    }
}
