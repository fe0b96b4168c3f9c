//! MTA-STS (RFC 8461): a recipient domain's policy of which exchangers may
//! receive its mail and that they must offer TLS with a valid certificate.
//!
//! The `_mta-sts.DOMAIN` TXT record announces a policy and its id; the
//! policy itself comes over HTTPS from
//! `https://mta-sts.DOMAIN/.well-known/mta-sts.txt` (no redirects, at most
//! [`MAX_POLICY_SIZE`] octets, `text/plain`). Policies are kept in memory
//! for their `max_age` (capped at [`MAX_AGE_CAP`], RFC 8461 §3.2) and
//! fetched again when the TXT record's id changes. While a cached policy
//! lives it is used even when the TXT record or the policy server cannot be
//! reached (§5.1): an attacker who blocks them cannot downgrade delivery.
//! The policy records and MX patterns are parsed by `mailrs-mta-sts`.
//!
//! What a policy means for a delivery (skip exchangers, require verified
//! TLS, defer) is [`super::attempt`]'s.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mailrs_mta_sts::{Policy, PolicyMode, StsRecord};
use postino_core::config::MtaStsConfig;
use postino_core::logsafe::escape;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tracing::{debug, info, warn};

use super::mx::MxResolver;

/// Largest policy file read (RFC 8461 §3.3 suggests 64 KiB).
pub const MAX_POLICY_SIZE: usize = 64 * 1024;
/// Longest a policy is kept: RFC 8461 §3.2 caps `max_age` at 31557600 s.
pub const MAX_AGE_CAP: Duration = Duration::from_secs(31_557_600);
/// Policies kept at most; the oldest expiring go first past it.
pub const MAX_CACHED_POLICIES: usize = 10_000;
/// After a failed fetch, the same policy id is not fetched again for this
/// long: a domain whose policy server is down would otherwise cost every
/// delivery attempt a fetch and its timeout.
pub const FAILED_FETCH_PAUSE: Duration = Duration::from_secs(300);

/// The policy in force for a domain, with its id (for the logs).
#[derive(Debug, Clone)]
pub struct ActivePolicy {
    /// The TXT record's id the policy was fetched for.
    pub id: String,
    /// The parsed policy.
    pub policy: Arc<Policy>,
}

impl ActivePolicy {
    /// `enforce`, `testing` or `none`.
    pub fn mode(&self) -> &'static str {
        match self.policy.mode {
            PolicyMode::Enforce => "enforce",
            PolicyMode::Testing => "testing",
            PolicyMode::None => "none",
        }
    }

    /// True when `host` is one of the policy's `mx:` patterns.
    pub fn allows(&self, host: &str) -> bool {
        self.policy
            .mx
            .iter()
            .any(|pattern| mailrs_mta_sts::mx_matches(host, pattern))
    }
}

struct Cached {
    active: ActivePolicy,
    expires: Instant,
}

/// Finds, fetches and caches MTA-STS policies. Shared by every attempt.
pub struct Sts {
    config: MtaStsConfig,
    resolver: MxResolver,
    tls: Arc<rustls::ClientConfig>,
    cache: Mutex<HashMap<String, Cached>>,
    /// Domain → (policy id, when its fetch failed).
    failed: Mutex<HashMap<String, (String, Instant)>>,
}

/// Why a policy could not be fetched.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// The policy host has no address or DNS failed.
    #[error("policy host: {0}")]
    Lookup(String),
    /// Connection, TLS (an invalid certificate included) or HTTP failure.
    #[error("HTTPS: {0}")]
    Http(String),
    /// Not `200 OK`, not `text/plain`, too large, or not a valid policy.
    #[error("policy: {0}")]
    Invalid(String),
}

impl Sts {
    /// An MTA-STS client over `resolver`, trusting the Web PKI roots and
    /// those of `ca_file` for the policy servers.
    ///
    /// # Errors
    ///
    /// An unreadable or empty `ca_file`.
    pub fn new(
        config: &MtaStsConfig,
        ca_file: Option<&std::path::Path>,
        resolver: MxResolver,
    ) -> Result<Sts, String> {
        let mut roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        if let Some(path) = ca_file {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("{}: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!("{}: no certificate", path.display()));
            }
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Sts {
            config: config.clone(),
            resolver,
            tls: Arc::new(tls),
            cache: Mutex::new(HashMap::new()),
            failed: Mutex::new(HashMap::new()),
        })
    }

    /// The policy that applies to mail for `domain`, if any: the cached one
    /// while its id is current, else a fresh fetch. `None` when MTA-STS is
    /// off, the domain publishes no policy, or none could be fetched and
    /// none is cached (RFC 8461 §5: deliver as without a policy).
    pub async fn policy(&self, domain: &str) -> Option<ActivePolicy> {
        if !self.config.enabled {
            return None;
        }
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let cached = self.cached(&domain);
        let id = match self.resolver.txt(&format!("_mta-sts.{domain}")).await {
            Ok(texts) => {
                let records: Vec<StsRecord> = texts
                    .iter()
                    .filter(|t| t.trim_start().starts_with("v=STSv1"))
                    .filter_map(|t| StsRecord::parse(t).ok())
                    .collect();
                // §3.1: more than one record, or none valid, is no record.
                match records.as_slice() {
                    [one] => Some(one.id.to_string()),
                    _ => None,
                }
            }
            Err(e) => {
                debug!(domain = %escape(&domain), error = %escape(&e.to_string()), "MTA-STS TXT lookup failed");
                None
            }
        };
        match (id, cached) {
            // No record now (or no DNS): a live cached policy still holds.
            (None, cached) => cached,
            (Some(id), Some(cached)) if cached.id == id => Some(cached),
            (Some(id), cached) if self.failed_recently(&domain, &id) => cached,
            (Some(id), cached) => match self.fetch(&domain).await {
                Ok(policy) => {
                    let max_age = Duration::from_secs(policy.max_age).min(MAX_AGE_CAP);
                    let active = ActivePolicy {
                        id,
                        policy: Arc::new(policy),
                    };
                    info!(domain = %escape(&domain), id = %escape(&active.id), mode = %active.mode(), max_age = max_age.as_secs(), "MTA-STS policy fetched");
                    self.store(&domain, &active, max_age);
                    self.failed
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&domain);
                    Some(active)
                }
                Err(e) => {
                    warn!(domain = %escape(&domain), id = %escape(&id), error = %escape(&e.to_string()), cached = cached.is_some(), "MTA-STS policy fetch failed");
                    let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
                    if failed.len() >= MAX_CACHED_POLICIES {
                        failed.retain(|_, (_, at)| at.elapsed() < FAILED_FETCH_PAUSE);
                    }
                    if failed.len() < MAX_CACHED_POLICIES {
                        failed.insert(domain.clone(), (id, Instant::now()));
                    }
                    cached
                }
            },
        }
    }

    /// True when the fetch of policy `id` of `domain` failed less than
    /// [`FAILED_FETCH_PAUSE`] ago.
    fn failed_recently(&self, domain: &str, id: &str) -> bool {
        let failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        failed
            .get(domain)
            .is_some_and(|(failed_id, at)| failed_id == id && at.elapsed() < FAILED_FETCH_PAUSE)
    }

    fn cached(&self, domain: &str) -> Option<ActivePolicy> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        match cache.get(domain) {
            Some(c) if c.expires > Instant::now() => Some(c.active.clone()),
            Some(_) => {
                cache.remove(domain);
                None
            }
            None => None,
        }
    }

    fn store(&self, domain: &str, active: &ActivePolicy, max_age: Duration) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= MAX_CACHED_POLICIES && !cache.contains_key(domain) {
            let now = Instant::now();
            cache.retain(|_, c| c.expires > now);
            if cache.len() >= MAX_CACHED_POLICIES {
                if let Some(first) = cache
                    .iter()
                    .min_by_key(|(_, c)| c.expires)
                    .map(|(d, _)| d.clone())
                {
                    cache.remove(&first);
                }
            }
        }
        cache.insert(
            domain.to_owned(),
            Cached {
                active: active.clone(),
                expires: Instant::now() + max_age,
            },
        );
    }

    /// GETs and parses `https://mta-sts.DOMAIN/.well-known/mta-sts.txt`.
    async fn fetch(&self, domain: &str) -> Result<Policy, FetchError> {
        let host = format!("mta-sts.{domain}");
        let port = self.config.port;
        let addrs = self
            .resolver
            .host_addrs(&host, port)
            .await
            .map_err(|e| FetchError::Lookup(e.to_string()))?;
        // The policy host is resolved like every other name of a delivery
        // (the configured resolver, never /etc/hosts), then handed to the
        // HTTP client: one client per fetch, fetches are rare.
        let client = reqwest::Client::builder()
            .use_preconfigured_tls((*self.tls).clone())
            .redirect(reqwest::redirect::Policy::none())
            .timeout(self.config.timeout)
            .resolve_to_addrs(&host, &addrs)
            .no_proxy()
            .build()
            .map_err(|e| FetchError::Http(e.to_string()))?;
        let url = if port == 443 {
            format!("https://{host}/.well-known/mta-sts.txt")
        } else {
            format!("https://{host}:{port}/.well-known/mta-sts.txt")
        };
        let mut response = client
            .get(&url)
            .send()
            .await
            .map_err(|e| FetchError::Http(error_chain(&e)))?;
        if response.status() != reqwest::StatusCode::OK {
            return Err(FetchError::Invalid(format!(
                "{url} answered {}",
                response.status()
            )));
        }
        let media = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !media
            .split(';')
            .next()
            .is_some_and(|m| m.trim().eq_ignore_ascii_case("text/plain"))
        {
            return Err(FetchError::Invalid(format!(
                "{url}: media type {media:?}, not text/plain"
            )));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| FetchError::Http(error_chain(&e)))?
        {
            if body.len() + chunk.len() > MAX_POLICY_SIZE {
                return Err(FetchError::Invalid(format!(
                    "{url}: larger than {MAX_POLICY_SIZE} octets"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        let text = String::from_utf8(body)
            .map_err(|_| FetchError::Invalid(format!("{url}: not UTF-8")))?;
        Policy::parse(&text).map_err(|e| FetchError::Invalid(format!("{url}: {e}")))
    }
}

/// An error with its causes, as reqwest's top-level text alone ("error
/// sending request") hides the TLS or connection reason.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
