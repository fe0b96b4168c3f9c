//! MTA-STS (RFC 8461) end to end: the real `postino` relays to aiosmtpd MXs
//! that offer STARTTLS, finds them and the `_mta-sts` TXT record through
//! BIND's `named`, and fetches the policy over HTTPS from Python's
//! `http.server` on loopback; every certificate comes from the test CA
//! (rcgen, `delivery.tls.ca_file`). The policy port is the only thing
//! changed for the tests (`[mta_sts] port`).

use std::net::Ipv4Addr;
use std::path::Path;

use crate::delivery::{send_from, wait_line, wait_messages};
use crate::support::bind::{Named, ZoneData};
use crate::support::https::PolicyServer;
use crate::support::mx::{Sink, SinkOptions};
use crate::support::server::{config_text, TestServer};
use crate::support::{free_tcp_port, unique_loopback};
use crate::tls::{Issued, TestPki};

/// A relay that resolves through `named`, delivers to MXs on `mx_port`,
/// trusts the test CA and fetches policies on `sts_port`; `dns` and `tls`
/// are extra lines for `[dns]` and `[delivery.tls]`.
pub(crate) fn relay(
    named: &Named,
    mx_port: u16,
    sts_port: u16,
    ca: &Path,
    tls: &str,
    dns: &str,
) -> TestServer {
    let server = TestServer::start_with(&config_text(
        "",
        "",
        "",
        &format!(
            r#"[delivery]
mx_port = {mx_port}
connect_timeout = "2s"
command_timeout = "5s"
data_init_timeout = "5s"
data_xfer_timeout = "5s"
data_done_timeout = "5s"
retry = ["1h"]
[delivery.tls]
ca_file = "{ca}"
{tls}
[dns]
nameservers = ["{ns}"]
timeout = "2s"
{dns}
[mta_sts]
port = {sts_port}
"#,
            ca = ca.display(),
            ns = named.addr,
        ),
    ));
    server.add_user("alice@example.test", "pw");
    server
}

/// An aiosmtpd MX offering STARTTLS with `cert`.
pub(crate) fn tls_sink(ip: Ipv4Addr, port: u16, cert: &Issued) -> Sink {
    Sink::start(
        ip,
        port,
        &SinkOptions {
            tls: Some((cert.cert.clone(), cert.key.clone())),
            ..SinkOptions::default()
        },
    )
}

fn policy(mode: &str, mx: &[&str]) -> String {
    let mut text = format!("version: STSv1\nmode: {mode}\n");
    for m in mx {
        text.push_str(&format!("mx: {m}\n"));
    }
    text.push_str("max_age: 86400\n");
    text
}

/// `dest.test`: `mx1` (preference 10) and `mx2` (20), the policy host and
/// the `_mta-sts` record, with the MXs' certificates as given.
struct Destination {
    pki: TestPki,
    mx1: Sink,
    mx2: Sink,
    web: PolicyServer,
    named: Named,
    mx_port: u16,
    ips: (Ipv4Addr, Ipv4Addr, Ipv4Addr),
}

/// The records of `dest.test`, with policy id `id` (TTL 0: a changed id is
/// seen at the next delivery).
fn zone(mx1: Ipv4Addr, mx2: Ipv4Addr, web: Ipv4Addr, id: &str) -> ZoneData {
    ZoneData::new("test")
        .mx("dest.test", "mx1.dest.test", 10)
        .mx("dest.test", "mx2.dest.test", 20)
        .a("mx1.dest.test", mx1)
        .a("mx2.dest.test", mx2)
        .a("mta-sts.dest.test", web)
        .record(format!("_mta-sts.dest.test. 0 TXT \"v=STSv1; id={id};\""))
}

impl Destination {
    fn start(policy_text: &str, mx1_cert: &[&str], mx1_valid: bool) -> Destination {
        let pki = TestPki::new();
        let (ip1, ip2, ip_web) = (unique_loopback(), unique_loopback(), unique_loopback());
        let mx_port = free_tcp_port(&[ip1, ip2]);
        let web_port = free_tcp_port(&[ip_web]);
        let c1 = pki.issue_for("mx1", mx1_cert, mx1_valid);
        let c2 = pki.issue_for("mx2", &["mx2.dest.test"], true);
        let w = pki.issue_for("web", &["mta-sts.dest.test"], true);
        let mx1 = tls_sink(ip1, mx_port, &c1);
        let mx2 = tls_sink(ip2, mx_port, &c2);
        let web = PolicyServer::start(ip_web, web_port, &w.cert, &w.key, policy_text);
        let zone = zone(ip1, ip2, ip_web, "20261201T000000");
        let named = Named::start(&zone, &[]);
        Destination {
            pki,
            mx1,
            mx2,
            web,
            named,
            mx_port,
            ips: (ip1, ip2, ip_web),
        }
    }

    fn relay(&self) -> TestServer {
        relay(
            &self.named,
            self.mx_port,
            self.web.addr.port(),
            &self.pki.ca_path(),
            "",
            "",
        )
    }
}

/// `enforce`: the preferred MX is not in the policy and gets nothing; the
/// one that is gets the mail over TLS with its certificate verified.
#[test]
fn enforce_skips_an_exchanger_outside_the_policy_and_delivers_to_the_one_inside() {
    let dest = Destination::start(
        &policy("enforce", &["mx2.dest.test"]),
        &["mx1.dest.test"],
        true,
    );
    let server = dest.relay();
    let id = send_from(
        &server,
        "alice@example.test",
        &["bob@dest.test"],
        "enforced",
    );
    let sent = wait_line(&server, &[&format!("id={id}"), "status=sent"]);
    assert!(sent.contains("relay=mx2.dest.test["), "{sent}");
    assert!(sent.contains(", verified"), "{sent}");
    let got = wait_messages(&dest.mx2, 1);
    assert!(got[0].tls, "{got:?}");
    assert_eq!(dest.mx1.count(), 0);
    let skipped = wait_line(&server, &["MTA-STS enforce: exchanger not in the policy"]);
    assert!(skipped.contains("mx1.dest.test"), "{skipped}");
    wait_line(
        &server,
        &[
            "MTA-STS policy fetched",
            "mode=enforce",
            "id=20261201T000000",
        ],
    );

    // The policy is cached: a second message does not fetch it again.
    let second = send_from(
        &server,
        "alice@example.test",
        &["carol@dest.test"],
        "cached",
    );
    wait_line(&server, &[&format!("id={second}"), "status=sent"]);
    assert_eq!(dest.web.fetches(), 1);
}

/// `enforce` with a certificate that does not verify (another name): the
/// mail is deferred with the policy named, not bounced, and nothing is
/// sent to a host that failed.
#[test]
fn enforce_defers_when_the_certificate_does_not_verify() {
    let dest = Destination::start(
        &policy("enforce", &["mx1.dest.test"]),
        &["other.test"],
        true,
    );
    let server = dest.relay();
    let id = send_from(
        &server,
        "alice@example.test",
        &["bob@dest.test"],
        "bad cert",
    );
    let deferred = wait_line(&server, &[&format!("id={id}"), "status=deferred"]);
    assert!(
        deferred.contains("MTA-STS policy 20261201T000000 of dest.test"),
        "{deferred}"
    );
    assert!(deferred.contains("4.7."), "{deferred}");
    assert_eq!(dest.mx1.count() + dest.mx2.count(), 0);
    let queue = server.cli(&["queue", "list"], "");
    let listing = String::from_utf8_lossy(&queue.stdout);
    assert!(listing.contains("MTA-STS"), "{listing}");
}

/// `testing`: nothing changes for delivery (the preferred MX, outside the
/// policy and with a certificate for another name, gets the mail), and
/// what `enforce` would have done is logged.
#[test]
fn testing_mode_delivers_and_logs() {
    let dest = Destination::start(
        &policy("testing", &["mx2.dest.test"]),
        &["other.test"],
        false,
    );
    let server = dest.relay();
    let id = send_from(&server, "alice@example.test", &["bob@dest.test"], "testing");
    let sent = wait_line(&server, &[&format!("id={id}"), "status=sent"]);
    assert!(sent.contains("relay=mx1.dest.test["), "{sent}");
    assert_eq!(wait_messages(&dest.mx1, 1).len(), 1);
    let note = wait_line(&server, &["MTA-STS testing: exchanger not in the policy"]);
    assert!(note.contains("mx1.dest.test"), "{note}");
}

/// A new id in the TXT record fetches the policy again, and the new policy
/// applies; the same id keeps the cached one.
#[test]
fn a_new_policy_id_fetches_the_policy_again() {
    let dest = Destination::start(
        &policy("enforce", &["mx2.dest.test"]),
        &["mx1.dest.test"],
        true,
    );
    let server = dest.relay();
    let first = send_from(
        &server,
        "alice@example.test",
        &["bob@dest.test"],
        "first policy",
    );
    let sent = wait_line(&server, &[&format!("id={first}"), "status=sent"]);
    assert!(sent.contains("relay=mx2.dest.test["), "{sent}");
    assert_eq!(dest.web.fetches(), 1);

    dest.web.set_policy(&policy("enforce", &["mx1.dest.test"]));
    let (ip1, ip2, ip_web) = dest.ips;
    dest.named.update(
        &zone(ip1, ip2, ip_web, "20261202T000000"),
        "_mta-sts.dest.test",
        "20261202T000000",
    );
    let second = send_from(
        &server,
        "alice@example.test",
        &["bob@dest.test"],
        "second policy",
    );
    let sent = wait_line(&server, &[&format!("id={second}"), "status=sent"]);
    assert!(sent.contains("relay=mx1.dest.test["), "{sent}");
    wait_line(&server, &["MTA-STS policy fetched", "id=20261202T000000"]);
    assert_eq!(dest.web.fetches(), 2);
    assert_eq!(wait_messages(&dest.mx1, 1).len(), 1);
}

/// A policy that cannot be used (here: not a policy at all) is no policy:
/// mail goes as without one (to the preferred MX), and the failed fetch is
/// not repeated at every delivery.
#[test]
fn an_unusable_policy_is_no_policy_and_not_fetched_at_every_delivery() {
    let dest = Destination::start("this is not a policy\n", &["mx1.dest.test"], true);
    let server = dest.relay();
    let first = send_from(
        &server,
        "alice@example.test",
        &["bob@dest.test"],
        "no policy",
    );
    let sent = wait_line(&server, &[&format!("id={first}"), "status=sent"]);
    assert!(sent.contains("relay=mx1.dest.test["), "{sent}");
    let failed = wait_line(&server, &["MTA-STS policy fetch failed"]);
    assert!(failed.contains("domain=dest.test"), "{failed}");
    let second = send_from(
        &server,
        "alice@example.test",
        &["carol@dest.test"],
        "still none",
    );
    wait_line(&server, &[&format!("id={second}"), "status=sent"]);
    assert_eq!(dest.web.fetches(), 1);
}
