//! Outbound remote delivery: finding a domain's mail exchangers and talking
//! SMTP to them.
//!
//! - [`mx`]: [`MxResolver`] turns a domain (or the smarthost) into an ordered
//!   list of [`Exchanger`]s, or a [`LookupError`] that says whether to bounce.
//! - [`client`]: [`SmtpConnection`] connects to the first exchanger that
//!   answers and runs mail transactions on it, one [`RcptOutcome`] per
//!   recipient; [`deliver`] is connect, send and QUIT in one call.
//!
//! Neither keeps a queue, retries or writes bounces: the delivery actor does,
//! on top of this API. Only loopback is used by the tests (dnsmasq and
//! aiosmtpd on 127.0.0.0/8).

pub mod actor;
pub mod attempt;
pub mod client;
pub mod mx;

pub use client::{
    deliver, ClientSettings, ConnectError, Delivery, Diagnostic, Extensions, RcptOutcome, Server,
    SmtpConnection, Timeouts, Transaction,
};
pub use mx::{Exchanger, LookupError, MxResolver, ResolverError};
