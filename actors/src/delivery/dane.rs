//! DANE for SMTP (RFC 7672): an exchanger's validated TLSA records and the
//! certificate check they ask for, as a rustls [`ServerCertVerifier`].
//!
//! Only the usages RFC 7672 §3.1 gives SMTP are used: DANE-EE(3), which
//! pins the server's own certificate or key, with no name and no expiry
//! check (§3.1.1), and DANE-TA(2), which names a trust anchor: the chain
//! must lead to a certificate the record matches, and the leaf must name
//! the exchanger (§3.1.2, §3.2.2), with the usual validity checks. PKIX-TA(0)
//! and PKIX-EE(1) are "unusable" (§3.1.3): a host with only those is sent
//! mail with mandatory but unauthenticated TLS. Selectors: full certificate
//! (0) and SubjectPublicKeyInfo (1); matching: exact (0), SHA-256 (1),
//! SHA-512 (2).
//!
//! The TLSA lookup itself (DNSSEC-validated, `_port._tcp.host`) is
//! [`MxResolver::tlsa`](super::mx::MxResolver::tlsa).

use std::fmt;
use std::sync::Arc;

use hickory_resolver::proto::rr::rdata::TLSA;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, RootCertStore, SignatureScheme};

/// DANE-TA(2): the record names a trust anchor.
pub const USAGE_DANE_TA: u8 = 2;
/// DANE-EE(3): the record names the server's own certificate or key.
pub const USAGE_DANE_EE: u8 = 3;

/// One TLSA record (RFC 6698 §2.1), kept as its four fields.
#[derive(Clone, PartialEq, Eq)]
pub struct Tlsa {
    /// Certificate usage: 0 PKIX-TA, 1 PKIX-EE, 2 DANE-TA, 3 DANE-EE.
    pub usage: u8,
    /// 0: the whole certificate; 1: its SubjectPublicKeyInfo.
    pub selector: u8,
    /// 0: the selected data itself; 1: its SHA-256; 2: its SHA-512.
    pub matching: u8,
    /// The certificate association data.
    pub data: Vec<u8>,
}

impl Tlsa {
    /// The record as hickory parsed it.
    pub fn from_rdata(t: &TLSA) -> Tlsa {
        Tlsa {
            usage: t.cert_usage.into(),
            selector: t.selector.into(),
            matching: t.matching.into(),
            data: t.cert_data.clone(),
        }
    }

    /// True for the records RFC 7672 lets SMTP use: DANE-TA or DANE-EE with
    /// a known selector and matching type (§2.2: others are "unusable").
    pub fn is_usable(&self) -> bool {
        matches!(self.usage, USAGE_DANE_TA | USAGE_DANE_EE)
            && self.selector <= 1
            && self.matching <= 2
    }

    /// True when `cert` is what this record names.
    pub fn matches(&self, cert: &CertificateDer<'_>) -> bool {
        let selected = match self.selector {
            0 => cert.as_ref().to_vec(),
            1 => match webpki::EndEntityCert::try_from(cert) {
                Ok(parsed) => parsed.subject_public_key_info().as_ref().to_vec(),
                Err(_) => return false,
            },
            _ => return false,
        };
        let digest = |alg| ring::digest::digest(alg, &selected).as_ref().to_vec();
        let association = match self.matching {
            0 => selected,
            1 => digest(&ring::digest::SHA256),
            2 => digest(&ring::digest::SHA512),
            _ => return false,
        };
        // Public data on both sides: no constant-time comparison needed.
        association == self.data
    }
}

impl fmt::Debug for Tlsa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Tlsa {
    /// Presentation format, as in a zone file: `3 1 1 ABCD…`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {} ", self.usage, self.selector, self.matching)?;
        for b in &self.data {
            write!(f, "{b:02X}")?;
        }
        Ok(())
    }
}

/// Why a certificate failed DANE authentication. Its `Debug` is its text:
/// rustls shows a custom certificate error with `Debug`, and that is what
/// reaches the delivery diagnostic.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum DaneError {
    /// No usable TLSA record matches the certificate or its chain.
    #[error("DANE: no TLSA record of {host} matches the server certificate")]
    NoMatch {
        /// The exchanger.
        host: String,
    },
    /// A DANE-TA record matched a certificate of the chain, but the chain
    /// does not verify up to it (names, dates, signatures).
    #[error("DANE-TA: certificate of {host} does not verify to the TLSA trust anchor: {error}")]
    TrustAnchor {
        /// The exchanger.
        host: String,
        /// What webpki said.
        error: rustls::Error,
    },
}

impl fmt::Debug for DaneError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Verifies a server's certificate against its usable TLSA records.
#[derive(Debug)]
pub struct DaneVerifier {
    records: Vec<Tlsa>,
    host: String,
    provider: Arc<CryptoProvider>,
}

impl DaneVerifier {
    /// A verifier for `host` (the exchanger's name, the TLSA base domain)
    /// with its usable records (others are ignored).
    pub fn new(host: &str, records: &[Tlsa], provider: Arc<CryptoProvider>) -> DaneVerifier {
        DaneVerifier {
            records: records.iter().filter(|r| r.is_usable()).cloned().collect(),
            host: host.to_owned(),
            provider,
        }
    }

    fn fail(&self, e: DaneError) -> rustls::Error {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
    }
}

impl ServerCertVerifier for DaneVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // DANE-EE: the key or certificate is pinned; names and dates do
        // not matter (RFC 7672 §3.1.1).
        if self
            .records
            .iter()
            .filter(|r| r.usage == USAGE_DANE_EE)
            .any(|r| r.matches(end_entity))
        {
            return Ok(ServerCertVerified::assertion());
        }
        // DANE-TA: certificates of the chain the server sent that a record
        // names become the only roots (RFC 7672 §3.1.2: the server must
        // send its trust anchor).
        let mut roots = RootCertStore::empty();
        for cert in intermediates {
            let named = self
                .records
                .iter()
                .filter(|r| r.usage == USAGE_DANE_TA)
                .any(|r| r.matches(cert));
            if named {
                // A certificate webpki cannot use as an anchor cannot
                // verify the chain either.
                let _ = roots.add(cert.clone());
            }
        }
        if roots.is_empty() {
            return Err(self.fail(DaneError::NoMatch {
                host: self.host.clone(),
            }));
        }
        let pkix =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        pkix.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .map_err(|error| {
                self.fail(DaneError::TrustAnchor {
                    host: self.host.clone(),
                    error,
                })
            })
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
            &self.provider.signature_verification_algorithms,
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
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};

    struct Pki {
        ca: CertificateDer<'static>,
        leaf: CertificateDer<'static>,
    }

    /// A CA and a leaf for `name` that it signed; `expired` leaves end in 2001.
    fn pki(name: &str, expired: bool) -> Pki {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let mut leaf_params = CertificateParams::new(vec![name.to_owned()]).unwrap();
        if expired {
            leaf_params.not_before = rcgen::date_time_ymd(2000, 1, 1);
            leaf_params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        }
        let leaf = leaf_params.signed_by(&leaf_key, &ca, &ca_key).unwrap();
        Pki {
            ca: ca.der().clone(),
            leaf: leaf.der().clone(),
        }
    }

    fn record(usage: u8, selector: u8, matching: u8, cert: &CertificateDer<'_>) -> Tlsa {
        let selected = match selector {
            0 => cert.as_ref().to_vec(),
            _ => webpki::EndEntityCert::try_from(cert)
                .unwrap()
                .subject_public_key_info()
                .as_ref()
                .to_vec(),
        };
        let data = match matching {
            0 => selected,
            1 => ring::digest::digest(&ring::digest::SHA256, &selected)
                .as_ref()
                .to_vec(),
            _ => ring::digest::digest(&ring::digest::SHA512, &selected)
                .as_ref()
                .to_vec(),
        };
        Tlsa {
            usage,
            selector,
            matching,
            data,
        }
    }

    fn verify(host: &str, records: &[Tlsa], pki: &Pki, chain_has_ca: bool) -> Result<(), String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = DaneVerifier::new(host, records, provider);
        let intermediates = if chain_has_ca {
            vec![pki.ca.clone()]
        } else {
            Vec::new()
        };
        let name = ServerName::try_from(host.to_owned()).unwrap();
        verifier
            .verify_server_cert(&pki.leaf, &intermediates, &name, &[], UnixTime::now())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// DANE-EE pins the leaf for every selector and matching type, with
    /// no name and no expiry check; anything else about the leaf fails.
    #[test]
    fn dane_ee() {
        let good = pki("other.name.test", true);
        let wrong = pki("mx.dest.test", false);
        for selector in 0..=1 {
            for matching in 0..=2 {
                let r = record(3, selector, matching, &good.leaf);
                assert_eq!(
                    verify("mx.dest.test", std::slice::from_ref(&r), &good, false),
                    Ok(()),
                    "{r}"
                );
                let e = verify("mx.dest.test", std::slice::from_ref(&r), &wrong, true).unwrap_err();
                assert!(e.contains("no TLSA record of mx.dest.test matches"), "{e}");
            }
        }
    }

    /// DANE-TA: the chain must reach the named anchor, which the server
    /// sends, and the leaf must name the exchanger and be in date.
    #[test]
    fn dane_ta() {
        let ok = pki("mx.dest.test", false);
        for (selector, matching) in [(0, 1), (1, 1), (1, 2), (0, 0)] {
            let r = record(2, selector, matching, &ok.ca);
            assert_eq!(
                verify("mx.dest.test", std::slice::from_ref(&r), &ok, true),
                Ok(()),
                "{r}"
            );
            // The anchor not in the chain: nothing to match.
            let e = verify("mx.dest.test", std::slice::from_ref(&r), &ok, false).unwrap_err();
            assert!(e.contains("no TLSA record"), "{e}");
            // Another name than the exchanger's.
            let e = verify("mx2.dest.test", &[r], &ok, true).unwrap_err();
            assert!(e.contains("DANE-TA"), "{e}");
        }
        let expired = pki("mx.dest.test", true);
        let e = verify(
            "mx.dest.test",
            &[record(2, 1, 1, &expired.ca)],
            &expired,
            true,
        )
        .unwrap_err();
        assert!(e.contains("DANE-TA"), "{e}");
        // A DANE-TA record naming the leaf itself is no anchor for it.
        let e = verify("mx.dest.test", &[record(2, 1, 1, &ok.leaf)], &ok, true).unwrap_err();
        assert!(e.contains("no TLSA record"), "{e}");
    }

    /// PKIX usages and unknown selectors or matching types are unusable
    /// for SMTP (RFC 7672 §3.1.3) and never match.
    #[test]
    fn unusable_records_are_ignored() {
        let ok = pki("mx.dest.test", false);
        for r in [record(1, 1, 1, &ok.leaf), record(0, 1, 1, &ok.ca)] {
            assert!(!r.is_usable());
            assert!(verify("mx.dest.test", &[r], &ok, true).is_err());
        }
        let mut odd = record(3, 1, 1, &ok.leaf);
        odd.matching = 3;
        assert!(!odd.is_usable());
        assert!(verify("mx.dest.test", &[odd], &ok, true).is_err());
        assert!(record(3, 0, 2, &ok.leaf).is_usable());
    }
}
