//! DANE (RFC 7672) against a real DNSSEC-signed zone: BIND's `named` serves
//! `test.`, signed at test time, and `plain.test.`, delegated without a DS
//! record; postino's resolver validates with the zone's key as its trust
//! anchor. Certificates come from rcgen, and the TLSA records are computed
//! from them.

use std::net::Ipv4Addr;
use std::time::Duration;

use postino::delivery::{LookupError, MxResolver, TlsaAnswer};
use postino_core::config::DnsConfig;

use crate::support::bind::{Named, ZoneData};

fn validating(named: &Named, anchor: &std::path::Path) -> MxResolver {
    MxResolver::new(&DnsConfig {
        nameservers: vec![named.addr],
        timeout: Some(Duration::from_secs(2)),
        dnssec: true,
        trust_anchor: Some(anchor.to_owned()),
    })
    .expect("resolver")
}

/// Secure MX and TLSA answers count; those of the unsigned child zone are
/// insecure, so DANE does not apply there; a wrong trust anchor makes the
/// signed answers bogus, which is a temporary failure, never "no DANE".
#[tokio::test]
async fn validation_tells_secure_insecure_and_bogus() {
    let mx = Ipv4Addr::new(127, 0, 0, 1);
    let signed = ZoneData::new("test")
        .mx("dest.test", "mx.dest.test", 10)
        .a("mx.dest.test", mx)
        .tlsa("mx.dest.test", 25, 3, 1, 1, &[0xab; 32]);
    let plain = ZoneData::new("plain.test")
        .mx("plain.test", "mx.plain.test", 10)
        .a("mx.plain.test", mx)
        .tlsa("mx.plain.test", 25, 3, 1, 1, &[0xab; 32]);
    let named = Named::start(&signed, &[plain]);
    let resolver = validating(&named, &named.trust_anchor);

    let answer = resolver.resolve_mx("dest.test", 25).await.expect("MX");
    assert_eq!(answer.exchangers[0].host, "mx.dest.test");
    assert_eq!(answer.secure, vec!["mx.dest.test".to_string()]);
    match resolver.tlsa("mx.dest.test", 25).await.expect("TLSA") {
        TlsaAnswer::Secure(records) => {
            assert_eq!(records.len(), 1);
            assert_eq!(records[0].to_string(), format!("3 1 1 {}", "AB".repeat(32)));
        }
        other => panic!("{other:?}"),
    }
    // No TLSA record at that port: proven absent.
    assert_eq!(
        resolver.tlsa("mx.dest.test", 26).await.expect("TLSA"),
        TlsaAnswer::Absent
    );

    let answer = resolver.resolve_mx("plain.test", 25).await.expect("MX");
    assert_eq!(answer.exchangers[0].host, "mx.plain.test");
    assert!(answer.secure.is_empty(), "{answer:?}");
    assert_eq!(
        resolver.tlsa("mx.plain.test", 25).await.expect("TLSA"),
        TlsaAnswer::Absent
    );

    // Another key as the anchor: the signatures chain to nothing trusted.
    let other = ZoneData::new("test");
    let stranger = Named::start(&other, &[]);
    let bogus = validating(&named, &stranger.trust_anchor);
    let e = bogus.resolve_mx("dest.test", 25).await.unwrap_err();
    assert!(matches!(e, LookupError::Temporary(_)), "{e:?}");
    let e = bogus.tlsa("mx.dest.test", 25).await.unwrap_err();
    assert!(matches!(e, LookupError::Temporary(_)), "{e:?}");
}
