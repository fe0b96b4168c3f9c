//! One delivery attempt for the recipients of one destination: find the
//! exchangers (or the smarthost), take a cached connection or open one, send
//! in batches of `recipients_per_delivery`, and keep the connection for the
//! next message to the same place.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use postino_core::logsafe::escape;
use postino_core::smtp::RemoteHost;
use postino_core::store::DeliveryDiagnostic;
use postino_core::{Config, MessageId};
use tracing::{debug, warn};

use super::client::{ClientSettings, Diagnostic, RcptOutcome, SmtpClient, Target, Transaction};
use super::mx::{Exchanger, LookupError, MxResolver};
use super::tls::{self, OutboundTls, TlsInfo, TlsRequirement};

/// How long an idle connection is kept for reuse (Postfix's
/// `smtp_connection_cache_time_limit`).
pub const CONNECTION_CACHE_TIME: Duration = Duration::from_secs(2);
/// Idle connections kept per destination.
pub const MAX_CACHED_PER_DESTINATION: usize = 8;

/// What happened to one recipient, as the queue record and a bounce keep
/// it.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub recipient: String,
    /// The server talked to last, if any (`relay=` in the log).
    pub relay: Option<RemoteHost>,
    /// Protocol and cipher when the transaction went over TLS.
    pub tls: Option<TlsInfo>,
    pub result: RcptResult,
}

impl Outcome {
    /// `host[addr]:port` of the server, or `none`, for the log.
    pub fn relay_text(&self) -> String {
        self.relay
            .as_ref()
            .map_or_else(|| "none".to_owned(), RemoteHost::to_string)
    }

    /// The TLS protocol and cipher, or `none`, for the log.
    pub fn tls_text(&self) -> String {
        self.tls
            .as_ref()
            .map_or_else(|| "none".to_owned(), TlsInfo::to_string)
    }
}

/// The remote server's reply (with the server), or our own reason; a
/// failed lookup is given a reply code (`556 5.1.10`, `550 5.1.2`, `451
/// 4.4.3`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptResult {
    Delivered(DeliveryDiagnostic),
    Deferred(DeliveryDiagnostic),
    Failed(DeliveryDiagnostic),
}

/// Shared by every attempt: the resolver, client settings and the cache
/// of idle connections.
pub struct Attempt {
    config: Arc<Config>,
    resolver: Result<MxResolver, String>,
    settings: ClientSettings,
    idle: Mutex<HashMap<String, Vec<(Instant, SmtpClient)>>>,
}

impl Attempt {
    pub fn new(config: Arc<Config>) -> Attempt {
        let resolver = MxResolver::new(&config.dns).map_err(|e| e.to_string());
        if let Err(e) = &resolver {
            warn!(error = %e, "no DNS resolver: remote deliveries will be deferred");
        }
        let mut settings = ClientSettings::new(config.hostname.clone(), &config.delivery);
        let tls = OutboundTls::new(&config.delivery.tls);
        if let Some(problem) = tls.problem() {
            warn!(error = %escape(problem), "outbound TLS cannot check certificates: verify and secure deliveries will be deferred");
        }
        settings.tls = Some(Arc::new(tls));
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
                let diagnostic = lookup_diagnostic(domain, &e);
                debug!(%id, domain = %escape(domain), error = %escape(&diagnostic.to_string()), "no exchanger");
                let result = if e.is_permanent() {
                    RcptResult::Failed(diagnostic)
                } else {
                    RcptResult::Deferred(diagnostic)
                };
                return every(recipients, None, &result);
            }
        };
        let targets = self.targets(domain, exchangers).await;
        let key = self.destination(domain);
        let mut outcomes = Vec::with_capacity(recipients.len());
        let batch = self.config.delivery.recipients_per_delivery.max(1);
        for chunk in recipients.chunks(batch) {
            let tx = Transaction {
                sender,
                recipients: chunk,
                content,
            };
            let mut cached = if self.config.delivery.connection_reuse {
                self.take(&key)
            } else {
                None
            };
            if let Some(conn) = &mut cached {
                // RSET proves a cached connection is still alive: one the
                // server closed while idle would otherwise defer the batch.
                if !conn.reset().await {
                    cached = None;
                }
            }
            let mut conn = match cached {
                Some(conn) => conn,
                None => match SmtpClient::connect_to(&targets, &self.settings).await {
                    Ok(conn) => conn,
                    Err(e) => {
                        // No exchanger takes a connection now: the next
                        // batches would only wait for the same timeouts.
                        let result = convert(e.remote.as_ref(), &e.outcome());
                        let rest = &recipients[outcomes.len()..];
                        outcomes.extend(every(rest, e.remote.as_ref(), &result));
                        break;
                    }
                },
            };
            let relay = conn.remote().clone();
            let results = conn.send(&tx).await;
            for (r, o) in chunk.iter().zip(results.iter()) {
                outcomes.push(Outcome {
                    recipient: r.clone(),
                    relay: Some(relay.clone()),
                    tls: conn.tls().cloned(),
                    result: convert(Some(&relay), o),
                });
            }
            let spare = if conn.is_reusable() && self.config.delivery.connection_reuse {
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
    pub fn expired(&self) -> Vec<SmtpClient> {
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

    /// The TLS each exchanger must offer, decided before connecting: the
    /// smarthost's level (`routing.smarthost_tls`, at least `encrypt` with
    /// credentials, implicit TLS on port 465), else the domain's
    /// `delivery.tls` policy with the names to check at `verify`/`secure`.
    /// Policies found at delivery time (MTA-STS, DANE) raise the
    /// requirements here.
    async fn targets(&self, domain: &str, exchangers: Vec<Exchanger>) -> Vec<Target> {
        let tls = &self.config.delivery.tls;
        let routing = &self.config.routing;
        exchangers
            .into_iter()
            .map(|exchanger| {
                let req = match &routing.smarthost {
                    Some(_) => {
                        let level = routing.smarthost_level(tls.level);
                        let mut req = TlsRequirement::new(level, "smarthost");
                        // The next hop is the smarthost itself: its name
                        // is what the certificate must carry.
                        req.names = vec![exchanger.host.trim_end_matches('.').to_ascii_lowercase()];
                        req.implicit = routing.smarthost_implicit();
                        req
                    }
                    None => tls::requirement_for(tls, domain, &exchanger.host),
                };
                Target {
                    exchanger,
                    tls: req,
                }
            })
            .collect()
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
    fn take(&self, key: &str) -> Option<SmtpClient> {
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
    fn put(&self, key: &str, conn: SmtpClient) -> Option<SmtpClient> {
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
fn every(recipients: &[String], relay: Option<&RemoteHost>, result: &RcptResult) -> Vec<Outcome> {
    recipients
        .iter()
        .map(|r| Outcome {
            recipient: r.clone(),
            relay: relay.cloned(),
            tls: None,
            result: result.clone(),
        })
        .collect()
}

/// A failed lookup in the form of an SMTP reply, as the queue record, the
/// log and a bounce's `Diagnostic-Code: smtp;` show it: `556 5.1.10` for a
/// null MX (RFC 7505 §4.2), `550 5.1.2`/`5.4.4` for a domain that does not
/// exist or has no address, `451 4.4.3` for DNS trouble.
fn lookup_diagnostic(domain: &str, e: &LookupError) -> DeliveryDiagnostic {
    let code = match e {
        LookupError::NullMx => 556,
        e if e.is_permanent() => 550,
        _ => 451,
    };
    DeliveryDiagnostic {
        remote: None,
        code: Some(code),
        status: Some(e.status().to_owned()),
        text: format!("{domain}: {e}"),
    }
}

/// The client's outcome as the queue keeps it: a remote reply names the
/// server (`relay`) that gave it.
fn convert(relay: Option<&RemoteHost>, outcome: &RcptOutcome) -> RcptResult {
    let typed = |d: &Diagnostic| match d {
        Diagnostic::Remote(reply) => DeliveryDiagnostic::reply(relay.cloned(), reply),
        Diagnostic::Local { status, text } => DeliveryDiagnostic::local(status.as_ref(), text),
    };
    match outcome {
        RcptOutcome::Delivered(reply) => {
            RcptResult::Delivered(DeliveryDiagnostic::reply(relay.cloned(), reply))
        }
        RcptOutcome::Deferred(d) => RcptResult::Deferred(typed(d)),
        RcptOutcome::Failed(d) => RcptResult::Failed(typed(d)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postino_core::smtp::Reply;
    use std::borrow::Cow;

    /// The queue's diagnostics show as the texts the queue kept before
    /// they were typed: the same log lines, `queue list` and bounces.
    #[test]
    fn outcomes_show_as_before() {
        let mx = RemoteHost {
            host: "mx.dest.test".into(),
            addr: "127.0.0.2:25".parse().unwrap(),
        };
        let reply = Reply::new(550, "5.1.1", "<a@dest.test>: no such user");
        let cases = [
            (
                convert(
                    Some(&mx),
                    &RcptOutcome::Failed(Diagnostic::Remote(reply.clone())),
                ),
                "host mx.dest.test[127.0.0.2]:25 said: 550 5.1.1 <a@dest.test>: no such user",
            ),
            (
                convert(
                    Some(&mx),
                    &RcptOutcome::Deferred(Diagnostic::Remote(Reply::plain(451, "busy\nlater"))),
                ),
                "host mx.dest.test[127.0.0.2]:25 said: 451 busy / later",
            ),
            (
                convert(
                    Some(&mx),
                    &RcptOutcome::Deferred(Diagnostic::Local {
                        status: Cow::Borrowed("4.4.2"),
                        text:
                            "lost connection with mx.dest.test[127.0.0.2]:25 while sending RCPT TO"
                                .into(),
                    }),
                ),
                "4.4.2 lost connection with mx.dest.test[127.0.0.2]:25 while sending RCPT TO",
            ),
            (
                RcptResult::Failed(lookup_diagnostic("null.test", &LookupError::NullMx)),
                "556 5.1.10 null.test: domain does not accept mail (null MX)",
            ),
            (
                RcptResult::Deferred(lookup_diagnostic(
                    "t.test",
                    &LookupError::Temporary("SERVFAIL".into()),
                )),
                "451 4.4.3 t.test: temporary DNS failure: SERVFAIL",
            ),
        ];
        for (result, want) in cases {
            let d = match result {
                RcptResult::Deferred(d) | RcptResult::Failed(d) => d,
                RcptResult::Delivered(d) => panic!("{d}"),
            };
            assert_eq!(d.to_string(), want);
        }
        let RcptResult::Delivered(done) = convert(
            Some(&mx),
            &RcptOutcome::Delivered(Reply::new(250, "2.0.0", "Ok: queued as 1")),
        ) else {
            panic!("not delivered");
        };
        assert_eq!(done.remote_mta(), Some("mx.dest.test"));
        assert_eq!(done.reply_text(), "250 2.0.0 Ok: queued as 1");
    }
}
