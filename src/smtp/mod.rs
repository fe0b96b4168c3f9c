//! SMTP server protocol (RFC 5321 and extensions), without IO.
//!
//! [`LineReceiver`] and [`DataReceiver`] frame bytes into command lines and
//! message content; [`Request::parse`] turns a line into a command;
//! [`Session`] decides what each command means in the current state and
//! answers with a [`Reply`] or asks its caller for something (a routing
//! decision, storing the message, a TLS handshake).

pub mod receiver;
pub mod reply;
#[allow(missing_docs)] // Still to document: the request variants' fields.
pub mod request;
#[allow(missing_docs)] // Still to document: being rewritten (the session's steps).
pub mod session;

pub use receiver::{DataReceiver, LineReceiver};
pub use reply::Reply;
pub use request::Request;
pub use session::Session;
