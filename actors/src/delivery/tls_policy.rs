//! MTA-STS and DANE applied to one destination's exchangers: which of them
//! may be used, and the [`TlsRequirement`](super::tls::TlsRequirement) each must meet, before the
//! client connects.
//!
//! - DANE (RFC 7672), at the `dane` level only (as Postfix): for an
//!   exchanger whose MX and address records DNSSEC proved, its TLSA records
//!   (`_port._tcp.host`, validated). Usable ones mean TLS is required and
//!   the certificate is checked against them ([`DaneVerifier`]); only
//!   unusable ones mean `encrypt`; none (or insecure ones) mean `may`. A
//!   failed TLSA lookup makes that exchanger unusable for now (§2.2).
//! - MTA-STS (RFC 8461): with an `enforce` policy, exchangers outside its
//!   `mx:` patterns are skipped and the others need TLS with a certificate
//!   valid for their name (`verify`, at least). `testing` logs what
//!   `enforce` would skip and changes nothing; `none` changes nothing.
//!   Where an exchanger has usable DANE records, DANE decides for it (RFC
//!   8461 §2).
//!
//! When no exchanger is left, the delivery is deferred (`4.7.5`), never
//! bounced at once: the queue's retries and lifetime apply.

use std::borrow::Cow;
use std::sync::Arc;

use postino_core::config::{Config, TlsLevel};
use postino_core::logsafe::escape;
use postino_core::store::DeliveryDiagnostic;
use postino_core::MessageId;
use rustls::crypto::CryptoProvider;
use tracing::{info, warn};

use super::client::Target;
use super::dane::DaneVerifier;
use super::mx::{MxAnswer, MxResolver, TlsaAnswer};
use super::sts::Sts;
use super::tls;

/// MTA-STS policies and DANE checks for outbound delivery; one per
/// configuration, shared by every attempt.
pub struct TlsPolicies {
    sts: Option<Sts>,
    provider: Arc<CryptoProvider>,
}

impl TlsPolicies {
    /// MTA-STS per `config.mta_sts` (its HTTPS roots are the Web PKI's and
    /// `delivery.tls.ca_file`), over `resolver`.
    pub fn new(config: &Config, resolver: Option<&MxResolver>) -> TlsPolicies {
        let sts = match resolver {
            Some(resolver) if config.mta_sts.enabled => match Sts::new(
                &config.mta_sts,
                config.delivery.tls.ca_file.as_deref(),
                resolver.clone(),
            ) {
                Ok(sts) => Some(sts),
                Err(e) => {
                    warn!(error = %escape(&e), "MTA-STS off: delivery.tls.ca_file cannot be used");
                    None
                }
            },
            _ => None,
        };
        TlsPolicies {
            sts,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        }
    }

    /// The exchangers of `answer` that may be used for mail to `domain`,
    /// each with its requirement, best first.
    ///
    /// # Errors
    ///
    /// Why no exchanger may be used: a deferral, with the policy named.
    pub async fn targets(
        &self,
        id: MessageId,
        config: &Config,
        resolver: &MxResolver,
        domain: &str,
        answer: MxAnswer,
    ) -> Result<Vec<Target>, DeliveryDiagnostic> {
        let tls_config = &config.delivery.tls;
        let level = tls_config.level_for(domain);
        let sts = match &self.sts {
            Some(sts) => sts.policy(domain).await,
            None => None,
        };
        let mut targets = Vec::with_capacity(answer.exchangers.len());
        let mut refused = Vec::new();
        for exchanger in answer.exchangers {
            let host = exchanger.host.clone();
            let port = exchanger.addrs.first().map_or(25, |a| a.port());
            let mut req = tls::requirement_for(tls_config, domain, &host);
            let mut dane = false;
            if level == TlsLevel::Dane {
                // Opportunistic DANE: `may` unless secure TLSA records say
                // more.
                req.level = TlsLevel::May;
                req.source = Cow::Borrowed("dane without secure TLSA records");
                if answer.secure.contains(&host) {
                    match resolver.tlsa(&host, port).await {
                        Ok(TlsaAnswer::Secure(records)) => {
                            let source = format!("TLSA _{port}._tcp.{host}");
                            if records.iter().any(|r| r.is_usable()) {
                                let verifier =
                                    DaneVerifier::new(&host, &records, self.provider.clone());
                                req.level = TlsLevel::Dane;
                                req.verifier = Some(Arc::new(verifier));
                                dane = true;
                            } else {
                                // RFC 7672 §2.2: unusable records still
                                // say the server has TLS.
                                req.level = TlsLevel::Encrypt;
                            }
                            req.source = Cow::Owned(source);
                        }
                        Ok(TlsaAnswer::Absent) => {}
                        Err(e) => {
                            warn!(%id, domain = %escape(domain), exchanger = %escape(&host), error = %escape(&e.to_string()), "DANE: TLSA lookup failed, exchanger skipped");
                            refused.push(format!("{host}: {e}"));
                            continue;
                        }
                    }
                }
            }
            if let (Some(policy), false) = (&sts, dane) {
                let allowed = policy.allows(&host);
                match policy.mode() {
                    "enforce" => {
                        if !allowed {
                            warn!(%id, domain = %escape(domain), exchanger = %escape(&host), policy = %escape(&policy.id), "MTA-STS enforce: exchanger not in the policy, skipped");
                            refused.push(format!("{host} is not in the MTA-STS policy"));
                            continue;
                        }
                        req.level = req.level.max(TlsLevel::Verify);
                        if req.names.is_empty() {
                            req.names = vec![host.to_ascii_lowercase()];
                        }
                        req.source =
                            Cow::Owned(format!("MTA-STS policy {} of {domain}", policy.id));
                    }
                    "testing" if !allowed => {
                        info!(%id, domain = %escape(domain), exchanger = %escape(&host), policy = %escape(&policy.id), "MTA-STS testing: exchanger not in the policy (enforce would skip it)");
                    }
                    _ => {}
                }
            }
            targets.push(Target {
                exchanger,
                tls: req,
            });
        }
        if targets.is_empty() {
            let policy = match &sts {
                Some(p) => format!(" (MTA-STS policy {} of {domain}, mode {})", p.id, p.mode()),
                None => String::new(),
            };
            return Err(DeliveryDiagnostic::local(
                "4.7.5",
                format!(
                    "no usable mail exchanger for {domain}{policy}: {}",
                    refused.join("; ")
                ),
            ));
        }
        Ok(targets)
    }
}
