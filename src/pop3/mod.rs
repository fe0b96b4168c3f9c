//! POP3 server protocol (RFC 1939, RFC 2449 CAPA and response codes, RFC 5034
//! SASL AUTH PLAIN, RFC 2595 STLS), without IO.
//!
//! [`LineReceiver`] frames command lines out of received bytes;
//! [`Request::parse`] turns a line into a command; [`Session`] runs the
//! AUTHORIZATION → TRANSACTION → UPDATE state machine, appends its replies to
//! the caller's buffer and asks the caller, through a [`Step`], for what needs
//! IO: checking a password and locking the maildrop, reading a message,
//! deleting messages at QUIT, the TLS handshake.
//!
//! A caller's loop, in outline:
//!
//! ```text
//! session.greeting(&mut out);
//! loop {
//!     read into buf;
//!     while let Some(line) = receiver.next_line(&mut buf, session.max_line_len()) {
//!         let step = match line {
//!             Ok(line) => session.line(&line, &mut out),
//!             Err(_) => session.line_too_long(&mut out),
//!         };
//!         match step {
//!             Step::Send => {}
//!             Step::Authenticate { .. } => { check; session.authenticated(result, &mut out) }
//!             Step::Retrieve { key, .. } => { read; session.retrieved(&content, &mut out) }
//!             Step::Commit { deleted } => { delete; session.committed(ok, &mut out) }  // then close
//!             Step::StartTls => { write out; buf.clear(); receiver.reset(); handshake; session.tls_started() }
//!             Step::Close => { write out; close }
//!         }
//!     }
//!     write out;
//! }
//! ```
//!
//! The callbacks return a [`Step`] too (`Send` or `Close`).

pub mod receiver;
pub mod reply;
pub mod request;
pub mod session;

pub use receiver::{LineReceiver, LineTooLong, DEFAULT_MAX_AUTH_LINE, MAX_COMMAND_LINE};
pub use request::{ParseError, Request};
pub use session::{
    Activity, AuthResult, Maildrop, MaildropEntry, Session, SessionConfig, State, Step,
    DEFAULT_MAX_BAD_COMMANDS,
};

#[cfg(test)]
mod tests;
