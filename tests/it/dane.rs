//! DANE (RFC 7672) against a real DNSSEC-signed zone: BIND's `named` serves
//! `test.`, signed at test time, and `plain.test.`, delegated without a DS
//! record; postino's resolver validates with the zone's key as its trust
//! anchor. Certificates come from rcgen, and the TLSA records are computed
//! from them.

use std::net::Ipv4Addr;
use std::time::Duration;

use postino::delivery::{LookupError, MxResolver, TlsaAnswer};
use postino_core::config::DnsConfig;

use crate::delivery::{send_from, wait_line, wait_messages};
use crate::mta_sts::{self, tls_sink};
use crate::support::bind::{Named, ZoneData};
use crate::support::mx::Sink;
use crate::support::server::TestServer;
use crate::support::{free_tcp_port, unique_loopback};
use crate::tls::TestPki;

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

fn sha256(data: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .to_vec()
}

/// Four destinations in one signed zone (and its unsigned child), each
/// with an aiosmtpd MX offering STARTTLS:
/// - `ee.test`: `3 1 1` of its MX's key; the certificate names another
///   host and expired long ago (DANE-EE checks neither);
/// - `bad.test`: `3 1 1` of a key the MX does not have;
/// - `ta.test`: `2 0 1` of the test CA, which the MX sends in its chain;
/// - `plain.test` (insecure): a `3 1 1` record that matches nothing, and
///   that must not count.
struct DaneWorld {
    _pki: TestPki,
    ee: Sink,
    bad: Sink,
    ta: Sink,
    plain: Sink,
    _named: Named,
    server: TestServer,
}

impl DaneWorld {
    fn start() -> DaneWorld {
        let pki = TestPki::new();
        let ips: Vec<Ipv4Addr> = (0..4).map(|_| unique_loopback()).collect();
        let port = free_tcp_port(&ips);
        let ee_cert = pki.issue_for("ee", &["somebody.else.test"], false);
        let bad_cert = pki.issue_for("bad", &["mx.bad.test"], true);
        let ta_cert = pki.issue_for("ta", &["mx.ta.test"], true);
        let plain_cert = pki.issue_for("plain", &["mx.plain.test"], true);
        let unrelated = pki.issue_for("unrelated", &["mx.bad.test"], true);
        let signed = ZoneData::new("test")
            .mx("ee.test", "mx.ee.test", 10)
            .a("mx.ee.test", ips[0])
            .tlsa("mx.ee.test", port, 3, 1, 1, &sha256(&ee_cert.spki_der))
            .mx("bad.test", "mx.bad.test", 10)
            .a("mx.bad.test", ips[1])
            .tlsa("mx.bad.test", port, 3, 1, 1, &sha256(&unrelated.spki_der))
            .mx("ta.test", "mx.ta.test", 10)
            .a("mx.ta.test", ips[2])
            .tlsa("mx.ta.test", port, 2, 0, 1, &sha256(&ta_cert.ca_der));
        let plain = ZoneData::new("plain.test")
            .mx("plain.test", "mx.plain.test", 10)
            .a("mx.plain.test", ips[3])
            .tlsa("mx.plain.test", port, 3, 1, 1, &sha256(&unrelated.spki_der));
        let named = Named::start(&signed, &[plain]);
        let sinks: Vec<Sink> = [&ee_cert, &bad_cert, &ta_cert, &plain_cert]
            .iter()
            .zip(&ips)
            .map(|(cert, ip)| tls_sink(*ip, port, cert))
            .collect();
        let anchor = format!("trust_anchor = \"{}\"", named.trust_anchor.display());
        // The policy port leads nowhere: no MTA-STS here.
        let server = mta_sts::relay(&named, port, 9, &pki.ca_path(), "level = \"dane\"", &anchor);
        let mut sinks = sinks.into_iter();
        DaneWorld {
            _pki: pki,
            ee: sinks.next().unwrap(),
            bad: sinks.next().unwrap(),
            ta: sinks.next().unwrap(),
            plain: sinks.next().unwrap(),
            _named: named,
            server,
        }
    }

    fn send(&self, to: &str) -> String {
        send_from(&self.server, "alice@example.test", &[to], "dane")
    }
}

/// DANE-EE: a matching key delivers over TLS whatever the certificate's
/// name and dates; a record that matches nothing defers, naming the TLSA
/// records, and nothing reaches that MX.
#[test]
fn dane_ee_match_delivers_and_mismatch_defers() {
    let world = DaneWorld::start();
    let ok = world.send("bob@ee.test");
    let bad = world.send("bob@bad.test");
    let sent = wait_line(&world.server, &[&format!("id={ok}"), "status=sent"]);
    assert!(sent.contains("relay=mx.ee.test["), "{sent}");
    assert!(sent.contains(", verified"), "{sent}");
    assert!(wait_messages(&world.ee, 1)[0].tls);
    let deferred = wait_line(&world.server, &[&format!("id={bad}"), "status=deferred"]);
    assert!(deferred.contains("TLSA _"), "{deferred}");
    assert!(
        deferred.contains("no TLSA record of mx.bad.test matches"),
        "{deferred}"
    );
    assert_eq!(world.bad.count(), 0);
}

/// DANE-TA: the chain leads to the CA the record names and the leaf names
/// the MX; an unsigned (provably insecure) zone's TLSA records do not
/// count, and its mail goes as at `may`: STARTTLS, certificate unchecked.
#[test]
fn dane_ta_delivers_and_an_insecure_zone_falls_back_to_may() {
    let world = DaneWorld::start();
    let ta = world.send("bob@ta.test");
    let plain = world.send("bob@plain.test");
    let sent = wait_line(&world.server, &[&format!("id={ta}"), "status=sent"]);
    assert!(sent.contains("relay=mx.ta.test["), "{sent}");
    assert!(sent.contains(", verified"), "{sent}");
    assert!(wait_messages(&world.ta, 1)[0].tls);
    let sent = wait_line(&world.server, &[&format!("id={plain}"), "status=sent"]);
    assert!(sent.contains("relay=mx.plain.test["), "{sent}");
    assert!(sent.contains(", unverified"), "{sent}");
    assert!(wait_messages(&world.plain, 1)[0].tls);
}
