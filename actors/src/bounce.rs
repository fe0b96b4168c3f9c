//! Bounces and other delivery status notifications: built from the store
//! and spooled, then dispatched like any accepted message
//! ([`crate::dispatch::dispatch`]). Plain functions over the store, used by
//! dispatch (recipients refused at routing) and by the delivery actor
//! (failures and delay warnings after delivery rounds).

use postino_core::dsn::{self, RecipientStatus};
use postino_core::esmtp::{notify_of, EnvelopeParams, Ret};
use postino_core::logsafe::escape;
use postino_core::message::{now_unix, RoutedRecipient as Rcpt};
use postino_core::routing::{self, DirectoryError};
use postino_core::storage::Storage;
use postino_core::store::{Notice, StoreError, TraceKind};
use postino_core::{Address, Config, Envelope, MessageId};
use tracing::{info, warn};

use crate::dkim::DkimKeys;

/// Spools a notice of `kind` (a bounce, or a success notice for local
/// deliveries) about `recipients` of a spooled `envelope` and returns its
/// envelope, or `None` when none may be sent (null sender) or none was
/// asked for.
pub async fn bounce_envelope(
    config: &Config,
    dkim: &DkimKeys,
    store: &dyn Storage,
    envelope: &Envelope,
    failed: &[RecipientStatus],
    kind: dsn::Kind,
) -> Result<Option<Envelope>, StoreError> {
    let Some(sender) = envelope.sender.as_deref() else {
        // Never bounce a bounce (RFC 5321 §4.5.5).
        warn!(id = %envelope.id, "not bouncing a message from <>; dropped");
        return Ok(None);
    };
    bounce_to(config, dkim, store, envelope, failed, sender, kind, true).await
}

/// Spools a delivery status notification of `kind` addressed to `to`.
/// `inbound`: the original is still in the intake spool (a bounce made at
/// dispatch), so the store marks it and a re-dispatch after a crash does not
/// bounce twice.
#[allow(clippy::too_many_arguments)]
pub async fn bounce_to(
    config: &Config,
    dkim: &DkimKeys,
    store: &dyn Storage,
    envelope: &Envelope,
    recipients: &[RecipientStatus],
    to: &str,
    kind: dsn::Kind,
    inbound: bool,
) -> Result<Option<Envelope>, StoreError> {
    let Some(Notice {
        envelope: bounce,
        content,
    }) = notification(config, dkim, store, envelope, recipients, to, kind).await?
    else {
        return Ok(None);
    };
    if inbound {
        if !store.spool_bounce(envelope.id, &bounce, &content).await? {
            // Spooled by a dispatch before a crash; it is dispatched from
            // the spool on its own.
            return Ok(None);
        }
    } else {
        store.spool(&bounce, &content).await?;
    }
    info!(id = %bounce.id, orig_id = %envelope.id, to = %escape(to), kind = ?kind, "notification created");
    trace_notice(store, envelope.id, &bounce, kind).await;
    Ok(Some(bounce))
}

/// Links a notification and the message it is about in both histories
/// (`postino trace`), and records where the notification goes.
pub async fn trace_notice(
    store: &dyn Storage,
    original: MessageId,
    notice: &Envelope,
    kind: dsn::Kind,
) {
    let now = now_unix();
    for (id, what) in notice_events(original, notice, kind) {
        store.trace(id, now, what).await;
    }
}

/// The events [`trace_notice`] records, in order, for a caller that writes
/// them itself.
pub fn notice_events(
    original: MessageId,
    notice: &Envelope,
    kind: dsn::Kind,
) -> Vec<(MessageId, TraceKind)> {
    let to = notice.recipients.first().map(|r| r.address.clone());
    let mut events = vec![
        (
            original,
            TraceKind::Notified {
                notification: notice.id,
                kind: format!("{kind:?}").to_ascii_lowercase(),
                to: to.unwrap_or_default(),
            },
        ),
        (notice.id, TraceKind::About { original }),
    ];
    events.extend(crate::history::route_events(notice));
    events
}

/// The store error behind a failed lookup in the store (the store's
/// [`postino_core::Directory`] errors always wrap one).
fn store_error(e: DirectoryError) -> StoreError {
    match e.0.downcast::<StoreError>() {
        Ok(e) => *e,
        Err(other) => StoreError::Codec(other.to_string()),
    }
}

/// Builds (without spooling) a delivery status notification of `kind`
/// about `envelope`'s `recipients`, addressed to `to` and routed like any
/// message to it. `None` when `to` cannot be routed, or when no recipient
/// asked for this kind of notice (RFC 3461 `NOTIFY`: `NEVER`, or a list
/// without it; see [`wants`]). `RET=HDRS` returns the headers only,
/// `ENVID` and `ORCPT` are given back. The delivery actor spools it
/// together with its queue change ([`postino_core::storage::Queue::settle`]).
///
/// Every notice is made here, so it is signed here: one to a remote
/// recipient gets a DKIM signature from `dkim` when its `From:` domain
/// has a key ([`crate::dkim`]), before anything of it is written, so that
/// every retry carries the same one.
pub async fn notification(
    config: &Config,
    dkim: &DkimKeys,
    store: &dyn Storage,
    envelope: &Envelope,
    recipients: &[RecipientStatus],
    to: &str,
    kind: dsn::Kind,
) -> Result<Option<Notice>, StoreError> {
    let params = envelope.params.as_deref();
    let recipients: Vec<RecipientStatus> = recipients
        .iter()
        .filter(|r| wants(params, &r.address, r.action.unwrap_or(kind)))
        .map(|r| {
            let mut r = r.clone();
            if let Some(o) = params
                .and_then(|p| p.recipient(&r.address))
                .and_then(|p| p.orcpt.as_ref())
            {
                r.original_recipient = Some(format!("{};{}", o.addr_type, o.address));
            }
            r
        })
        .collect();
    if recipients.is_empty() {
        info!(id = %envelope.id, kind = ?kind, "no notification: not asked for (NOTIFY)");
        return Ok(None);
    }
    let recipients = &recipients[..];
    // Queued mail may hold its content inline; spooled mail shares it.
    let original = match store.queued_content(envelope.id).await? {
        Some(c) => c,
        None => store.content(envelope.id).await?.unwrap_or_default(),
    };
    let id = store.new_id().await?;
    let now = now_unix();
    let content = dsn::Report {
        kind,
        hostname: &config.hostname,
        id: envelope.id,
        sender: to,
        arrival_date: &dsn::rfc5322_date(envelope.received_at),
        date: &dsn::rfc5322_date(now),
        recipients,
        original: &original,
        envid: params.and_then(|p| p.envid.as_deref()),
        headers_only: params.is_some_and(|p| p.ret == Some(Ret::Hdrs)),
    }
    .build();
    let Ok(rcpt) = Address::parse(to, true) else {
        warn!(id = %envelope.id, sender = %escape(to), "unparseable sender; bounce dropped");
        return Ok(None);
    };
    // The bounce goes wherever the sender's address leads, local or remote.
    let route = routing::decide_async(&config.routing, store, &rcpt, true)
        .await
        .map_err(store_error)?;
    if !route.is_accepted() {
        warn!(id = %envelope.id, sender = %escape(to), "bounce recipient not routable; dropped");
        return Ok(None);
    }
    let mut bounce = Envelope {
        id,
        sender: None,
        recipients: vec![Rcpt {
            address: to.to_owned(),
            route,
        }],
        received_at: now,
        client: "local".into(),
        helo: config.hostname.clone(),
        size: content.len() as u64,
        params: None,
    };
    let wanted = crate::dkim::leaves(&bounce);
    let content = dkim
        .sign_with(&mut bounce, content, wanted, |keys, notice, content| {
            keys.sign_notice(notice, content)
        })
        .await;
    Ok(Some(Notice {
        envelope: bounce,
        content,
    }))
}

/// Whether `address`'s `NOTIFY` asks for a notice of `kind`: failures and
/// delays unless it says otherwise (`NEVER`, or a list without them),
/// success only when asked.
pub fn wants(params: Option<&EnvelopeParams>, address: &str, kind: dsn::Kind) -> bool {
    let notify = notify_of(params, address);
    match kind {
        dsn::Kind::Failure => notify.failure,
        dsn::Kind::Delay => notify.delay,
        dsn::Kind::Delivered | dsn::Kind::Relayed | dsn::Kind::Expanded => notify.success,
    }
}
