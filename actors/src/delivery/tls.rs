//! Outbound TLS: what each exchanger must offer ([`TlsRequirement`],
//! decided before connecting) and the rustls client configurations that
//! check it ([`OutboundTls`]).
//!
//! The levels are Postfix's `smtp_tls_security_level` ([`TlsLevel`]):
//! `none`, `may` (STARTTLS when offered, no certificate check, clear on a
//! failed handshake), `encrypt` (TLS or defer), `verify` (TLS with a
//! certificate valid for the exchanger's name) and `secure` (valid for the
//! next-hop domain). Roots are the `webpki-roots` set plus the optional
//! `delivery.tls.ca_file`.
//!
//! Policies that are found at delivery time (MTA-STS, DANE) plug in by
//! changing the requirement of an exchanger before the client connects: a
//! stronger `level`, other `names`, or their own `verifier` (a TLSA check),
//! which then replaces the WebPKI check.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use postino_core::config::DeliveryTlsConfig;
pub use postino_core::config::TlsLevel;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// What TLS one connection must have, decided per exchanger before
/// connecting.
#[derive(Clone)]
pub struct TlsRequirement {
    /// The security level.
    pub level: TlsLevel,
    /// Names the certificate may be valid for (any one will do) when the
    /// level verifies; empty: the exchanger's host name.
    pub names: Vec<String>,
    /// A certificate check that replaces the WebPKI one (a DANE TLSA
    /// check, for example). When set, the certificate is always checked
    /// with it, whatever the level.
    pub verifier: Option<Arc<dyn ServerCertVerifier>>,
    /// TLS from the first byte (RFC 8314, "wrapper mode"), no STARTTLS.
    pub implicit: bool,
    /// Where the level comes from (`delivery.tls.level`, a policy entry,
    /// `MTA-STS` …), for diagnostics.
    pub source: Cow<'static, str>,
}

impl fmt::Debug for TlsRequirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsRequirement")
            .field("level", &self.level)
            .field("names", &self.names)
            .field("verifier", &self.verifier.is_some())
            .field("implicit", &self.implicit)
            .field("source", &self.source)
            .finish()
    }
}

impl TlsRequirement {
    /// A requirement of `level` from `source`, no names, STARTTLS.
    pub fn new(level: TlsLevel, source: impl Into<Cow<'static, str>>) -> TlsRequirement {
        TlsRequirement {
            level,
            names: Vec::new(),
            verifier: None,
            implicit: false,
            source: source.into(),
        }
    }

    /// No TLS at all.
    pub fn none() -> TlsRequirement {
        TlsRequirement::new(TlsLevel::None, "fallback")
    }

    /// Whether STARTTLS is tried (or TLS used from the start).
    pub fn attempts_tls(&self) -> bool {
        self.implicit || self.level != TlsLevel::None || self.verifier.is_some()
    }

    /// Whether a connection without TLS must not carry mail.
    pub fn requires_tls(&self) -> bool {
        self.implicit || self.level.requires_tls() || self.verifier.is_some()
    }

    /// Whether the certificate is checked.
    pub fn verifies(&self) -> bool {
        self.level.verifies() || self.verifier.is_some()
    }
}

/// The TLS protocol and cipher of a delivery connection, for the log and
/// the message's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsInfo {
    /// `TLSv1.3`, as Postfix writes it.
    pub protocol: String,
    /// The cipher suite, as rustls names it.
    pub cipher: String,
    /// Whether the certificate was checked (`Trusted` in Postfix's words)
    /// or not (`Anonymous`/`Untrusted`).
    pub verified: bool,
}

impl fmt::Display for TlsInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let trust = if self.verified {
            "verified"
        } else {
            "unverified"
        };
        write!(f, "{} with cipher {}, {trust}", self.protocol, self.cipher)
    }
}

impl TlsInfo {
    /// Protocol and cipher of an established client connection.
    pub fn of(conn: &rustls::ClientConnection, verified: bool) -> TlsInfo {
        let protocol = conn
            .protocol_version()
            .map_or_else(|| "TLS".to_owned(), |v| format!("{v:?}").replace('_', "."));
        let cipher = conn
            .negotiated_cipher_suite()
            .map_or_else(|| "unknown".to_owned(), |s| format!("{:?}", s.suite()));
        TlsInfo {
            protocol,
            cipher,
            verified,
        }
    }
}

/// The client side's trust and configurations, built once per
/// configuration and shared by every delivery.
pub struct OutboundTls {
    provider: Arc<CryptoProvider>,
    /// The WebPKI check over the built-in roots and `ca_file`; the reason
    /// when it could not be built (a bad `ca_file`): verifying levels
    /// then defer with it.
    webpki: Result<Arc<WebPkiServerVerifier>, String>,
    /// Configuration without a certificate check (`may`, `encrypt`).
    unverified: Arc<ClientConfig>,
    /// Configurations that check for a set of names, kept so that TLS
    /// sessions can be resumed.
    verified: Mutex<HashMap<Vec<String>, Arc<ClientConfig>>>,
}

impl fmt::Debug for OutboundTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutboundTls")
            .field("webpki", &self.webpki.as_ref().map(|_| ()))
            .finish()
    }
}

impl OutboundTls {
    /// Builds the roots (`webpki-roots` and `config.ca_file`) and the
    /// configuration for the unverified levels. A `ca_file` that cannot be
    /// used is not fatal here (the configuration check reports it): the
    /// verifying levels defer with the reason.
    pub fn new(config: &DeliveryTlsConfig) -> OutboundTls {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let webpki = roots(config.ca_file.as_deref()).and_then(|roots| {
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| format!("delivery.tls.ca_file: {e}"))
        });
        let any = Arc::new(AnyCertificate(provider.clone()));
        let unverified = Arc::new(client_config(&provider, any));
        OutboundTls {
            provider,
            webpki,
            unverified,
            verified: Mutex::new(HashMap::new()),
        }
    }

    /// Why verified TLS cannot work, when `delivery.tls.ca_file` is bad.
    pub fn problem(&self) -> Option<&str> {
        self.webpki.as_ref().err().map(String::as_str)
    }

    /// The client configuration for `req` to `host`.
    ///
    /// # Errors
    /// The certificate must be checked but the roots could not be loaded.
    pub fn client_config(
        &self,
        req: &TlsRequirement,
        host: &str,
    ) -> Result<Arc<ClientConfig>, String> {
        if let Some(verifier) = &req.verifier {
            return Ok(Arc::new(client_config(&self.provider, verifier.clone())));
        }
        if !req.level.verifies() {
            return Ok(self.unverified.clone());
        }
        let webpki = self.webpki.as_ref().map_err(Clone::clone)?;
        let names = if req.names.is_empty() {
            vec![host.to_ascii_lowercase()]
        } else {
            req.names.clone()
        };
        let mut cache = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() > 1024 {
            cache.clear();
        }
        let config = cache.entry(names.clone()).or_insert_with(|| {
            let verifier = Arc::new(AnyName {
                inner: webpki.clone(),
                names,
            });
            Arc::new(client_config(&self.provider, verifier))
        });
        Ok(config.clone())
    }
}

fn client_config(
    provider: &Arc<CryptoProvider>,
    verifier: Arc<dyn ServerCertVerifier>,
) -> ClientConfig {
    ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth()
}

/// The built-in web roots and the certificates of `ca_file`.
fn roots(ca_file: Option<&Path>) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = ca_file {
        let err = |e: String| format!("delivery.tls.ca_file = {}: {e}", path.display());
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| err(e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| err(e.to_string()))?;
        if certs.is_empty() {
            return Err(err("no certificate found".into()));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| err(e.to_string()))?;
        }
    }
    Ok(roots)
}

/// The server name sent in SNI and given to the verifier: the host name,
/// or the address when the name is not a DNS name.
pub fn server_name(host: &str, addr: std::net::IpAddr) -> ServerName<'static> {
    ServerName::try_from(host.trim_end_matches('.').to_owned())
        .unwrap_or_else(|_| ServerName::IpAddress(addr.into()))
}

/// A WebPKI check that accepts a certificate valid for any one of
/// `names` (the MX name, or the next-hop domain and the MX names under
/// it for `secure`).
#[derive(Debug)]
struct AnyName {
    inner: Arc<WebPkiServerVerifier>,
    names: Vec<String>,
}

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut first = None;
        for name in &self.names {
            let Ok(name) = ServerName::try_from(name.as_str()) else {
                continue;
            };
            match self
                .inner
                .verify_server_cert(end_entity, intermediates, &name, ocsp, now)
            {
                Ok(ok) => return Ok(ok),
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        match first {
            Some(e) => Err(e),
            None => {
                self.inner
                    .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Opportunistic TLS (`may`, `encrypt`): any certificate is taken, as
/// Postfix does below `verify` (RFC 7435); the handshake's signatures are
/// still checked, so the session is bound to the certificate shown.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The requirement for an exchanger `host` of next-hop `domain` under
/// `level` (from `source`): the names a verifying level checks, as
/// Postfix's `smtp_tls_verify_cert_match` (`hostname` for `verify`,
/// `nexthop, dot-nexthop` for `secure`; here the next-hop domain, or the
/// exchanger's name when it lies under it).
pub fn requirement_for(config: &DeliveryTlsConfig, domain: &str, host: &str) -> TlsRequirement {
    let level = config.level_for(domain);
    let source = if level == config.level {
        Cow::Borrowed("delivery.tls.level")
    } else {
        Cow::Owned(format!("delivery.tls.policy for {domain}"))
    };
    let mut req = TlsRequirement::new(level, source);
    req.names = names_for(level, domain, host);
    req
}

/// The names a certificate must match at `level` for exchanger `host` of
/// next-hop `domain`.
pub fn names_for(level: TlsLevel, domain: &str, host: &str) -> Vec<String> {
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    match level {
        TlsLevel::Secure => {
            let mut names = vec![domain.clone()];
            if host != domain && host.ends_with(&format!(".{domain}")) {
                names.push(host);
            }
            names
        }
        _ => vec![host],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_per_level() {
        assert_eq!(
            names_for(TlsLevel::Verify, "a.test", "MX.b.test."),
            ["mx.b.test"]
        );
        assert_eq!(
            names_for(TlsLevel::Secure, "a.test", "mx.b.test"),
            ["a.test"]
        );
        assert_eq!(
            names_for(TlsLevel::Secure, "a.test", "mx.a.test"),
            ["a.test", "mx.a.test"]
        );
    }

    #[test]
    fn policy_levels() {
        let mut config = DeliveryTlsConfig::default();
        for (k, v) in [
            ("bank.test", TlsLevel::Secure),
            (".corp.test", TlsLevel::Encrypt),
            ("x.corp.test", TlsLevel::None),
        ] {
            config.policy.insert(k.into(), v);
        }
        assert_eq!(config.level_for("BANK.test"), TlsLevel::Secure);
        assert_eq!(config.level_for("a.b.corp.test"), TlsLevel::Encrypt);
        assert_eq!(config.level_for("x.corp.test"), TlsLevel::None);
        assert_eq!(config.level_for("corp.test"), TlsLevel::May);
        let req = requirement_for(&config, "bank.test", "mx.bank.test");
        assert!(req.requires_tls() && req.verifies());
        assert_eq!(req.names, ["bank.test", "mx.bank.test"]);
    }
}
