//! One delivery attempt for the recipients of one destination: find the
//! exchangers (or the smarthost), take a cached connection or open one, send
//! in batches of `recipients_per_delivery`, and keep the connection for the
//! next message to the same place.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use postino_core::logsafe::escape;
use postino_core::{Config, MessageId};
use tracing::{debug, warn};

use super::client::{ClientSettings, RcptOutcome, SmtpConnection, Transaction};
use super::mx::{Exchanger, LookupError, MxResolver};

/// How long an idle connection is kept for reuse (Postfix's
/// `smtp_connection_cache_time_limit`).
pub const CONNECTION_CACHE_TIME: Duration = Duration::from_secs(2);
/// Idle connections kept per destination.
pub const MAX_CACHED_PER_DESTINATION: usize = 8;

/// What happened to one recipient, in the words that go into the queue
/// record and a bounce.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub recipient: String,
    /// `host[addr]:port` of the server, or `none`.
    pub relay: String,
    pub result: RcptResult,
}

/// Texts are `host H[addr]:port said: <reply>` for a remote server's reply,
/// else `<reply code> <status> <reason>` or `<status> <reason>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptResult {
    Delivered(String),
    Deferred(String),
    Failed(String),
}

/// Shared by every attempt: the resolver, client settings and the cache
/// of idle connections.
pub struct Attempt {
    config: Arc<Config>,
    resolver: Result<MxResolver, String>,
    settings: ClientSettings,
    idle: Mutex<HashMap<String, Vec<(Instant, SmtpConnection)>>>,
}

impl Attempt {
    pub fn new(config: Arc<Config>) -> Attempt {
        let resolver = MxResolver::new(&config.dns).map_err(|e| e.to_string());
        if let Err(e) = &resolver {
            warn!(error = %e, "no DNS resolver: remote deliveries will be deferred");
        }
        let mut settings = ClientSettings::new(config.hostname.clone(), &config.delivery);
        // The credentials are for the smarthost only: offered to every MX,
        // they would leak, and MXs without AUTH would all be skipped.
        match (&config.routing.smarthost, &config.routing.smarthost_auth) {
            (Some(_), auth) => settings.auth = auth.clone(),
            (None, Some(_)) => {
                warn!("routing.smarthost_auth is set without routing.smarthost; ignored")
            }
            (None, None) => {}
        }
        Attempt {
            config,
            resolver,
            settings,
            idle: Mutex::new(HashMap::new()),
        }
    }

    /// The destination `domain`'s mail goes to: the smarthost when one is
    /// set, else the domain. Connections are cached and concurrency is
    /// limited per destination.
    pub fn destination(&self, domain: &str) -> String {
        match &self.config.routing.smarthost {
            Some(host) => format!("smarthost {host}"),
            None => domain.to_ascii_lowercase(),
        }
    }

    /// Delivers `content` to `recipients`, all in `domain`: one outcome per
    /// recipient, in order.
    pub async fn deliver(
        &self,
        id: MessageId,
        domain: &str,
        sender: Option<&str>,
        recipients: &[String],
        content: &[u8],
    ) -> Vec<Outcome> {
        let exchangers = match self.exchangers(domain).await {
            Ok(found) => found,
            Err(e) => {
                let text = lookup_text(domain, &e);
                debug!(%id, domain = %escape(domain), error = %escape(&text), "no exchanger");
                let result = if e.is_permanent() {
                    RcptResult::Failed(text)
                } else {
                    RcptResult::Deferred(text)
                };
                return every(recipients, "none", &result);
            }
        };
        let key = self.destination(domain);
        let mut outcomes = Vec::with_capacity(recipients.len());
        let batch = self.config.delivery.recipients_per_delivery.max(1);
        for chunk in recipients.chunks(batch) {
            let tx = Transaction {
                sender,
                recipients: chunk,
                content,
            };
            let mut cached = self.take(&key);
            if let Some(conn) = &mut cached {
                // RSET proves a cached connection is still alive: one the
                // server closed while idle would otherwise defer the batch.
                if !conn.reset().await {
                    cached = None;
                }
            }
            let mut conn = match cached {
                Some(conn) => conn,
                None => match SmtpConnection::connect(&exchangers, &self.settings).await {
                    Ok(conn) => conn,
                    Err(e) => {
                        // No exchanger takes a connection now: the next
                        // batches would only wait for the same timeouts.
                        let relay = e
                            .server
                            .as_ref()
                            .map(|s| s.to_string())
                            .unwrap_or_else(|| "none".into());
                        let result = convert(&relay, &e.outcome());
                        let rest = &recipients[outcomes.len()..];
                        outcomes.extend(every(rest, &relay, &result));
                        break;
                    }
                },
            };
            let relay = conn.server().to_string();
            let results = conn.send(&tx).await;
            for (r, o) in chunk.iter().zip(results.iter()) {
                outcomes.push(Outcome {
                    recipient: r.clone(),
                    relay: relay.clone(),
                    result: convert(&relay, o),
                });
            }
            let spare = if conn.is_reusable() {
                self.put(&key, conn)
            } else {
                Some(conn)
            };
            if let Some(conn) = spare {
                conn.quit().await;
            }
        }
        outcomes
    }

    /// Takes the idle connections that outlived [`CONNECTION_CACHE_TIME`]
    /// out of the cache, for the caller to close with QUIT. Without this
    /// sweep, a connection to a destination that gets no more mail would
    /// hold its socket until the process ends.
    pub fn expired(&self) -> Vec<SmtpConnection> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        idle.retain(|_, conns| {
            let (old, fresh): (Vec<_>, Vec<_>) = conns
                .drain(..)
                .partition(|(since, _)| since.elapsed() >= CONNECTION_CACHE_TIME);
            out.extend(old.into_iter().map(|(_, c)| c));
            *conns = fresh;
            !conns.is_empty()
        });
        out
    }

    /// The servers to try: the smarthost for everything when one is set,
    /// else the domain's exchangers.
    async fn exchangers(&self, domain: &str) -> Result<Vec<Exchanger>, LookupError> {
        let resolver = self
            .resolver
            .as_ref()
            .map_err(|e| LookupError::Temporary(e.clone()))?;
        match &self.config.routing.smarthost {
            Some(host) => resolver.resolve_smarthost(host).await,
            None => resolver.resolve(domain, self.config.delivery.mx_port).await,
        }
    }

    /// An idle connection to `key` young enough to be trusted, if any.
    fn take(&self, key: &str) -> Option<SmtpConnection> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let conns = idle.get_mut(key)?;
        while let Some((since, conn)) = conns.pop() {
            if since.elapsed() < CONNECTION_CACHE_TIME {
                return Some(conn);
            }
            // Too old: the server may have given up on it. Dropping closes it.
        }
        None
    }

    /// Keeps `conn` for the next message to `key`, or gives it back (for
    /// QUIT) when the destination already has [`MAX_CACHED_PER_DESTINATION`]
    /// idle ones.
    fn put(&self, key: &str, conn: SmtpConnection) -> Option<SmtpConnection> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let conns = idle.entry(key.to_owned()).or_default();
        if conns.len() < MAX_CACHED_PER_DESTINATION {
            conns.push((Instant::now(), conn));
            None
        } else {
            Some(conn)
        }
    }
}

/// The same result for every recipient.
fn every(recipients: &[String], relay: &str, result: &RcptResult) -> Vec<Outcome> {
    recipients
        .iter()
        .map(|r| Outcome {
            recipient: r.clone(),
            relay: relay.to_owned(),
            result: result.clone(),
        })
        .collect()
}

/// A failed lookup in the form of an SMTP reply, as the queue record, the
/// log and a bounce's `Diagnostic-Code: smtp;` show it: `556 5.1.10` for a
/// null MX (RFC 7505 §4.2), `550 5.1.2`/`5.4.4` for a domain that does not
/// exist or has no address, `451 4.4.3` for DNS trouble.
fn lookup_text(domain: &str, e: &LookupError) -> String {
    let code = match e {
        LookupError::NullMx => 556,
        e if e.is_permanent() => 550,
        _ => 451,
    };
    format!("{code} {} {domain}: {e}", e.status())
}

fn convert(relay: &str, outcome: &RcptOutcome) -> RcptResult {
    use super::client::Diagnostic;
    let text = |d: &Diagnostic| match d {
        Diagnostic::Remote(reply) => format!("host {relay} said: {reply}"),
        Diagnostic::Local { .. } => d.to_string(),
    };
    match outcome {
        RcptOutcome::Delivered(reply) => RcptResult::Delivered(reply.to_string()),
        RcptOutcome::Deferred(d) => RcptResult::Deferred(text(d)),
        RcptOutcome::Failed(d) => RcptResult::Failed(text(d)),
    }
}
