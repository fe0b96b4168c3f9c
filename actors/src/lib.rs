//! postino: a mail server built from actix actors around the IO-free
//! [`postino_core`] state machines, storing everything in sled.
//!
//! # Layout
//!
//! - [`server`]: [`Server`] and its builder: opens the store, starts the core
//!   actors, binds listeners, stops gracefully ([`Server::run_until`]).
//!   Beside it, private: `accept` (the accept loop of a listener), `limits`
//!   (connection limits), `submission_limits` (messages and recipients per
//!   user and client, `[limits]`), `login_delay` (failed-login delays), `signals`
//!   ([`Signals`], `postino serve`'s SIGTERM/SIGINT/SIGHUP handling).
//! - [`smtp`]: the SMTP connection actor (one per client).
//! - [`pop3`]: the POP3 connection actor (one per client).
//! - [`router`]: the router actor: per-recipient decisions at RCPT time.
//! - `intake`: stores a message received whole, awaits the group commit
//!   and hands it on; the one place a 250 to DATA comes from.
//! - `dispatch`, `bounce`: plain functions over the store that hand a
//!   spooled message to mailboxes, the queue or a bounce, and build
//!   bounces and other notifications.
//! - [`dkim`]: DKIM signing keys (read at start and reload), the signing
//!   intake does for mail that leaves, and `postino dkim generate`'s keys.
//! - `mailbox`: the local-mailbox actor (deliveries, POP3 locks, deletions).
//! - [`delivery`]: the delivery actor (queue manager), MX lookup and the
//!   outbound SMTP client.
//! - `auth`: password checks on a few dedicated threads (bounded memory).
//! - [`control`]: the Unix control socket that the CLI uses.
//! - `admin`: the HTTP admin listener (Prometheus `/metrics`, `/healthz`,
//!   the JSON API), a thin translation onto [`control::answer`].
//! - `sessions`: the live POP3 sessions, for `who` and `kick`.
//! - `inspect`: `route explain`, `mailbox stats`, `auth test` answers.
//! - [`queue_tools`]: queue listings, filters and bulk actions behind it.
//! - [`reload`]: the swappable configuration in use ([`LiveConfig`]) and
//!   its reload (SIGHUP, `postino reload`, [`Server::reload`]).
//! - `history`: `postino trace ID`, a message's history in words or JSON.
//! - `io`, [`tls`]: sockets, buffers, rustls.
//! - [`policy`]: the embedder's [`Policy`]: a typed decision at connect,
//!   HELO/EHLO, MAIL, RCPT and end of DATA.
//!
//! # Embedding
//!
//! [`ServerBuilder::policy`] adds a [`Policy`] whose async methods, each
//! with a default, decide at every stage of an SMTP session; see
//! `examples/plus_addresses.rs` (RCPT rules) and `examples/content_filter.rs`
//! (end of DATA). [`ServerBuilder::router`] replaces the routing actor
//! instead: a closure receives the default router as a
//! `Recipient<RouteRecipient>` and returns the one to use; see
//! `examples/custom_router.rs`.

#![warn(missing_docs)]

mod accept;
mod admin;
mod auth;
mod bounce;
#[allow(missing_docs)] // Still to document: request/response items (being narrowed to pub(crate)).
pub mod control;
#[allow(missing_docs)] // Still to document: the queue's messages and the SMTP client's items.
pub mod delivery;
mod dispatch;
pub mod dkim;
mod history;
mod inspect;
mod intake;
mod io;
mod limits;
mod login_delay;
mod mailbox;
pub mod policy;
pub mod pop3;
pub mod queue_tools;
pub mod reload;
pub mod router;
pub mod server;
mod sessions;
mod signals;
pub mod smtp;
mod submission_limits;
pub mod tls;
pub mod wire;

pub use intake::{Intake, IntakeError};
pub use policy::Policy;
pub use reload::{LiveConfig, Reloader};
pub use router::{RouteRecipient, Router};
pub use server::{Server, ServerBuilder, ServerError, TlsReloader};
pub use signals::Signals;

/// Sets the store failpoints named in `FAILPOINTS` from the start (see
/// [`postino_core::failpoints`]); keep the value for the life of the
/// process. Only builds with the `failpoints` feature (the tests' builds)
/// have failpoints; in any other this does nothing.
#[must_use]
pub fn failpoints_from_env() -> Option<Box<dyn std::any::Any>> {
    #[cfg(feature = "failpoints")]
    return Some(Box::new(postino_core::failpoints::from_env()));
    #[cfg(not(feature = "failpoints"))]
    None
}

/// Logs to standard error, as text lines or JSON objects (`log.format`);
/// `RUST_LOG` filters (default `info`). sled's trace records never appear
/// (see [`sled_trace`]), and its debug records only when `RUST_LOG` names
/// sled (`RUST_LOG=info,sled=debug`): a plain `RUST_LOG=debug` is for
/// postino's own story, not sled's page bookkeeping.
pub fn init_logging(format: postino_core::config::LogFormat) {
    use tracing_subscriber::filter::{filter_fn, EnvFilter};
    use tracing_subscriber::prelude::*;
    let directives = std::env::var("RUST_LOG").unwrap_or_default();
    let filter = EnvFilter::try_new(&directives)
        .ok()
        .filter(|_| !directives.trim().is_empty())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let sled_asked = names_sled(&directives);
    let keep = filter_fn(move |meta| !sled_trace(meta) && (sled_asked || !sled_debug(meta)));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // Both layers are built and one is disabled: the subscriber's type
    // stays the same either way.
    let json = (format == postino_core::config::LogFormat::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .with_writer(std::io::stderr)
    });
    let text = (format != postino_core::config::LogFormat::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
    });
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(keep)
        .with(json)
        .with(text)
        .try_init();
}

/// Whether a `RUST_LOG` value has a directive for sled itself.
fn names_sled(directives: &str) -> bool {
    directives.split(',').any(|d| d.trim().starts_with("sled"))
}

/// Whether a record is one of sled's trace records. sled logs every record
/// it writes at trace level, value included (`linking pid 8 with Set(key,
/// value)`): password hashes and mail content. No password hash may reach
/// the log at any level, so these are dropped whatever `RUST_LOG` asks for.
pub fn sled_trace(meta: &tracing::Metadata<'_>) -> bool {
    *meta.level() == tracing::Level::TRACE && is_sled(meta)
}

/// Whether a record is one of sled's debug records (trees and file
/// offsets): kept only when `RUST_LOG` names sled.
fn sled_debug(meta: &tracing::Metadata<'_>) -> bool {
    *meta.level() == tracing::Level::DEBUG && is_sled(meta)
}

fn is_sled(meta: &tracing::Metadata<'_>) -> bool {
    meta.target() == "sled" || meta.target().starts_with("sled::")
}
