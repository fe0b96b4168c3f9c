//! postino-core: the IO-free heart of the postino mail server.
//!
//! # Layout
//!
//! - [`config`]: the TOML configuration, its defaults and its errors.
//! - [`address`]: strict RFC 5321 mailbox parsing, and the relay-hack checks.
//! - [`smtp`]: SMTP commands, replies, line and DATA receivers, and the
//!   server session state machine. No IO: bytes in, replies and actions out.
//! - [`pop3`]: the POP3 command parser and session state machine.
//! - [`message`]: message ids and envelopes.
//! - [`routing`]: where a recipient goes (local mailbox, remote, bounce,
//!   reject), as a pure function over a [`routing::Directory`].
//! - [`rate`]: rates as the configuration writes them (`"100/min"`).
//! - [`dsn`]: RFC 3464 delivery status notifications (bounces).
//! - [`esmtp`]: the DSN and SMTPUTF8 parameters a message carries from
//!   `MAIL`/`RCPT` to its delivery and notifications.
//! - [`failpoints`]: fault injection in the store, for tests (compiled in
//!   only with the `failpoints` feature).
//! - [`logsafe`]: escaping of client-supplied values for log lines, and
//!   [`logsafe::Secret`] for what must never be logged.
//! - [`metrics`]: the process's counters and histograms for Prometheus,
//!   one call per event.
//! - [`store`]: the only module that touches sled; a typed API over users,
//!   aliases, mailboxes, the intake spool and the delivery queue, with group
//!   commit.
//!
//! The actix actors and the `postino` binary live in the `postino` crate
//! (`actors/`), which depends on this one and never the other way round.

#![warn(missing_docs)]

pub mod address;
pub mod config;
pub mod dsn;
pub mod esmtp;
pub mod failpoints;
pub mod logsafe;
pub mod message;
pub mod metrics;
pub mod pop3;
pub mod rate;
pub mod routing;
pub mod smtp;
pub mod storage;
#[allow(missing_docs)] // Still to document: the store's record types and errors.
pub mod store;

pub use address::Address;
pub use config::Config;
pub use message::{Envelope, MessageId};
pub use routing::{Directory, DirectoryError, Route, Target};
pub use store::Store;
