//! The router actor: decides where each recipient goes, at RCPT time.
//!
//! The decision is [`postino_core::routing::decide`]; this actor gives it the
//! store as its directory. Library users replace the decision by passing
//! their own `Recipient<RouteRecipient>` to the server builder (see
//! `examples/custom_router.rs`). What happens to an accepted message is
//! intake's job ([`crate::Intake`]), not the router's.

use actix::prelude::*;
use postino_core::routing::{self, DirectoryError};
use postino_core::smtp::session::RouteQuery;
use postino_core::storage::SharedStorage;
use postino_core::Route;

use crate::reload::LiveConfig;

/// Where does this recipient go? Asked once per `RCPT TO`. An error (the
/// directory could not be read) refuses the recipient temporarily
/// (`451 4.3.0`), never for good.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<Route, DirectoryError>")]
pub struct RouteRecipient(pub RouteQuery);

/// The default router.
pub struct Router {
    config: LiveConfig,
    store: SharedStorage,
}

impl Router {
    /// A router that decides with `config`'s routing rules over `store`'s
    /// users and aliases (a [`LiveConfig`]: the rules in use at each
    /// decision, so a reload applies to the next `RCPT TO`).
    pub fn new(config: impl Into<LiveConfig>, store: SharedStorage) -> Router {
        Router {
            config: config.into(),
            store,
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
    type Result = ResponseFuture<Result<Route, DirectoryError>>;

    /// Fetches what the decision needs from the storage (for this one
    /// recipient, so nothing is older than the `RCPT TO`), then decides.
    fn handle(&mut self, msg: RouteRecipient, _: &mut Self::Context) -> Self::Result {
        let q = msg.0;
        let config = self.config.current();
        let store = self.store.clone();
        Box::pin(async move {
            routing::decide_async(&config.routing, store.as_ref(), &q.recipient, q.may_relay).await
        })
    }
}
