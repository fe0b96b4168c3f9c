//! Outbound remote delivery: the queue manager, finding a domain's mail
//! exchangers, and talking SMTP to them.
//!
//! - [`mx`]: [`MxResolver`] turns a domain (or the smarthost) into an ordered
//!   list of [`Exchanger`]s, or a [`LookupError`] that says whether to bounce.
//! - [`client`]: [`SmtpClient`] connects to the first exchanger that
//!   answers (a [`RemoteHost`]: one name, one address) and runs mail
//!   transactions on it, one [`RcptOutcome`] per recipient; [`deliver`] is
//!   connect, send and QUIT in one call ([`SessionOutcome`]). Reply
//!   parsing and EHLO keywords are the core's, without IO
//!   (`postino_core::smtp::client`).
//! - [`tls`]: outbound TLS: the [`TlsRequirement`] each exchanger must
//!   meet (Postfix's security levels, decided per exchanger before
//!   connecting, so MTA-STS and DANE can raise it or bring their own
//!   certificate check) and the rustls client configurations
//!   ([`OutboundTls`]); [`SmtpClient::connect_to`] takes [`Target`]s, an
//!   exchanger each with its requirement.
//! - [`attempt`]: one delivery attempt for one destination's recipients:
//!   lookup (or the smarthost), a cached connection or a new one, batches of
//!   `recipients_per_delivery`, and the per-recipient [`attempt::Outcome`]
//!   with a typed diagnostic (`DeliveryDiagnostic`) for the queue record.
//! - [`actor`]: the queue manager ([`actor::Delivery`]): schedule, retries,
//!   per-destination concurrency, expiry, delay warnings and bounces, and the
//!   `postino queue` commands of a running server.
//!
//! `mx`, `client` and `attempt` keep no queue and write no bounces; the
//! actor does, through the store. The integration tests run all of it
//! against real servers on loopback (dnsmasq and aiosmtpd on 127.0.0.0/8):
//! `tests/it/delivery_client.rs` for the client, `tests/it/delivery.rs` for
//! the whole relay.

pub mod actor;
pub mod attempt;
pub mod client;
pub mod dane;
pub mod mx;
pub mod shaping;
pub mod sts;
pub mod tls;
pub mod tls_policy;

pub use client::{
    deliver, ClientSettings, ConnectError, Diagnostic, RcptOutcome, SessionOutcome, SmtpClient,
    Target, Timeouts, Transaction,
};
pub use mx::{Exchanger, LookupError, MxAnswer, MxResolver, ResolverError, TlsaAnswer};
pub use postino_core::smtp::client::Extensions;
pub use postino_core::smtp::RemoteHost;
pub use tls::{OutboundTls, TlsInfo, TlsLevel, TlsRequirement};
