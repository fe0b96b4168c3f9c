//! `postino trace ID`: a message's history, in words or as JSON, from the
//! store's `trace` tree ([`postino_core::storage::History::history`]). Answered over the control
//! socket, by the offline CLI and by `GET /api/trace/ID` alike.

use std::time::{Duration, UNIX_EPOCH};

use postino_core::routing::{Route, Target};
use postino_core::storage::Storage;
use postino_core::store::{TraceEvent, TraceKind};
use postino_core::{Envelope, MessageId};

use crate::wire::Response;

/// The history of message `id`: a line per event, oldest first, or (with
/// `json`) one line holding the events as a JSON array. Nothing kept is an
/// error: the id is unknown, or its history has expired.
pub async fn answer(store: &dyn Storage, id: &str, json: bool) -> Response {
    let id = match MessageId::parse_queue_id(id) {
        Ok(id) => id,
        Err(e) => return Response::Error(e),
    };
    match store.history(id).await {
        Ok(events) if events.is_empty() => Response::Error(not_found(id)),
        Ok(events) if json => match serde_json::to_string(&events) {
            Ok(line) => Response::Ok(vec![line]),
            Err(e) => Response::Error(e.to_string()),
        },
        Ok(events) => Response::Ok(events.iter().map(line).collect()),
        Err(e) => Response::Error(e.to_string()),
    }
}

/// The error for an id without history (the admin API answers it 404).
pub fn not_found(id: MessageId) -> String {
    format!("no history of message {id} (unknown, or older than [trace] keep)")
}

fn time(at: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(at)).to_string()
}

/// One event in words, after its time.
pub fn line(event: &TraceEvent) -> String {
    let what = match &event.what {
        TraceKind::Received {
            client,
            helo,
            sender,
            size,
            tls,
            auth,
            message_id,
        } => {
            let mut s = format!(
                "received from {client} (HELO {helo}) <{}> size={size}",
                sender.as_deref().unwrap_or("")
            );
            if let Some(tls) = tls {
                s += &format!(" tls={tls}");
            }
            if let Some(auth) = auth {
                s += &format!(" auth={auth}");
            }
            if let Some(m) = message_id {
                s += &format!(" message-id={m}");
            }
            s
        }
        TraceKind::Routed { recipient, route } => format!("route <{recipient}>: {route}"),
        TraceKind::Attempt {
            recipient,
            relay,
            status,
            reply,
        } => format!("attempt <{recipient}> relay={relay} status={status}: {reply}"),
        TraceKind::Deferred { next_attempt } => {
            format!("deferred; next attempt {}", time(*next_attempt))
        }
        TraceKind::Notified {
            notification,
            kind,
            to,
        } => format!("{kind} notification {notification} to <{to}>"),
        TraceKind::About { original } => format!("notification about message {original}"),
        TraceKind::Dequeued => "removed from the queue".to_owned(),
        TraceKind::Truncated => "later events dropped ([trace] max_events_per_message)".to_owned(),
        TraceKind::Retrieved { mailbox } => format!("retrieved over POP3 from {mailbox}"),
        TraceKind::Deleted { mailbox } => format!("deleted over POP3 from {mailbox}"),
    };
    format!("{}  {what}", time(event.at))
}

/// Where each recipient of `envelope` goes and why, as history events
/// (each with the message it belongs to).
pub fn route_events(envelope: &Envelope) -> Vec<(MessageId, TraceKind)> {
    envelope
        .recipients
        .iter()
        .map(|r| {
            (
                envelope.id,
                TraceKind::Routed {
                    recipient: r.address.clone(),
                    route: route_text(&r.address, &r.route),
                },
            )
        })
        .collect()
}

/// A route in words: `local mailbox a@x`, `alias of b@x` when a mailbox
/// differs from the recipient, `relay to remote a@y`, `bounce: 5.1.1 …`.
fn route_text(recipient: &str, route: &Route) -> String {
    match route {
        Route::Deliver(targets) => targets
            .iter()
            .map(|t| match t {
                Target::Mailbox {
                    mailbox,
                    original: Some(original),
                } => format!("local mailbox {mailbox} (redirected from {original})"),
                Target::Mailbox { mailbox, .. } if !mailbox.eq_ignore_ascii_case(recipient) => {
                    format!("local mailbox {mailbox} (alias {recipient})")
                }
                Target::Mailbox { mailbox, .. } => format!("local mailbox {mailbox}"),
                Target::Remote { address } => format!("queued for relay to {address}"),
            })
            .collect::<Vec<_>>()
            .join(", "),
        Route::Bounce { status, reason } => format!("bounce: {status} {reason}"),
        Route::Reject(reply) => format!("rejected: {reply}"),
    }
}
