//! Outbound TLS against real receiving servers on loopback: aiosmtpd with
//! STARTTLS (or implicit TLS, or a handshake that always fails), a second
//! postino with STARTTLS, dnsmasq for the MX records, and a test CA made
//! at test time with rcgen (tls.rs's [`TestPki`]).
//!
//! The client's levels are exercised directly through
//! [`SmtpClient::connect_to`]; the smarthost rules (TLS before AUTH,
//! implicit TLS on 465), the queue's diagnostics and the receiving side's
//! `Received:` through the real `postino` binary.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use postino::delivery::{
    ClientSettings, Exchanger, OutboundTls, RcptOutcome, SmtpClient, Target, TlsLevel,
    TlsRequirement, Transaction,
};
use postino_core::config::{DeliveryConfig, DeliveryTlsConfig};

use crate::delivery::{relay_config, wait_line, wait_messages};
use crate::support::dns::{Dnsmasq, Zone};
use crate::support::mx::{Sink, SinkOptions};
use crate::support::server::{config_text, Raw, TestServer};
use crate::support::{free_tcp_port, unique_loopback, wait_until};
use crate::tls::{pop_over_stls, TestPki};

const LIMIT: Duration = Duration::from_secs(30);

fn settings(ca_file: Option<&TestPki>) -> ClientSettings {
    let config = DeliveryConfig {
        connect_timeout: Duration::from_secs(5),
        command_timeout: Duration::from_secs(5),
        data_init_timeout: Duration::from_secs(5),
        data_xfer_timeout: Duration::from_secs(5),
        data_done_timeout: Duration::from_secs(5),
        ..DeliveryConfig::default()
    };
    let mut settings = ClientSettings::new("client.postino.test", &config);
    let tls = DeliveryTlsConfig {
        ca_file: ca_file.map(TestPki::ca_path),
        ..DeliveryTlsConfig::default()
    };
    settings.tls = Some(Arc::new(OutboundTls::new(&tls)));
    settings
}

/// One exchanger `host` at `addr` with `level`, its names as the level
/// wants them for next-hop `domain`.
fn target(domain: &str, host: &str, addr: SocketAddr, level: TlsLevel) -> Vec<Target> {
    let mut tls = TlsRequirement::new(level, "test");
    tls.names = postino::delivery::tls::names_for(level, domain, host);
    vec![Target {
        exchanger: Exchanger {
            host: host.to_owned(),
            preference: 0,
            addrs: vec![addr],
        },
        tls,
    }]
}

fn sink(pki: Option<&TestPki>, options: SinkOptions) -> Sink {
    let ip = unique_loopback();
    let port = free_tcp_port(&[ip]);
    let options = SinkOptions {
        tls: pki.map(TestPki::cert_and_key),
        ..options
    };
    Sink::start(ip, port, &options)
}

const CONTENT: &[u8] = b"From: <s@origin.test>\r\nSubject: tls\r\n\r\nHello.\r\n";

/// Connects with `targets` and sends one message: the outcome, and the
/// TLS description of the connection when it got one.
async fn send_one(targets: &[Target], settings: &ClientSettings) -> (RcptOutcome, Option<String>) {
    let recipients = vec!["r@dest.test".to_owned()];
    let tx = Transaction {
        sender: Some("s@origin.test"),
        recipients: &recipients,
        content: CONTENT,
    };
    match SmtpClient::connect_to(targets, settings).await {
        Err(e) => (e.outcome(), None),
        Ok(mut conn) => {
            let tls = conn.tls().map(ToString::to_string);
            let out = conn.send(&tx).await.remove(0);
            conn.quit().await;
            (out, tls)
        }
    }
}

fn text(outcome: &RcptOutcome) -> String {
    match outcome {
        RcptOutcome::Delivered(r) => r.to_string(),
        RcptOutcome::Deferred(d) | RcptOutcome::Failed(d) => d.to_string(),
    }
}

#[tokio::test]
async fn may_uses_starttls_when_offered_and_clear_when_not() {
    let pki = TestPki::new();
    let with = sink(Some(&pki), SinkOptions::default());
    let without = sink(None, SinkOptions::default());
    let s = settings(None);

    let (out, tls) = send_one(&target("a.test", "mx.a.test", with.addr, TlsLevel::May), &s).await;
    assert!(out.is_delivered(), "{out:?}");
    let tls = tls.expect("TLS was offered and used");
    assert!(tls.starts_with("TLSv1.3 with cipher "), "{tls}");
    assert!(tls.ends_with("unverified"), "{tls}");
    let got = with.messages();
    assert!(got[0].tls, "the message crossed over TLS");
    let verbs: Vec<(String, bool)> = with
        .commands()
        .into_iter()
        .map(|c| (c.verb, c.tls))
        .collect();
    assert_eq!(
        verbs,
        [
            ("EHLO".into(), false),
            ("STARTTLS".into(), false),
            ("EHLO".into(), true),
            ("MAIL".into(), true)
        ]
    );

    let (out, tls) = send_one(
        &target("b.test", "mx.b.test", without.addr, TlsLevel::May),
        &s,
    )
    .await;
    assert!(out.is_delivered(), "{out:?}");
    assert_eq!(tls, None);
    assert!(!without.messages()[0].tls);

    // `none` never tries, even when offered.
    let (out, tls) = send_one(
        &target("a.test", "mx.a.test", with.addr, TlsLevel::None),
        &s,
    )
    .await;
    assert!(out.is_delivered(), "{out:?}");
    assert_eq!(tls, None);
    assert!(!with.messages()[1].tls);
}

#[tokio::test]
async fn may_falls_back_to_clear_after_a_failed_handshake() {
    let pki = TestPki::new();
    let broken = sink(
        Some(&pki),
        SinkOptions {
            tls_broken: true,
            ..SinkOptions::default()
        },
    );
    let s = settings(None);
    let (out, tls) = send_one(
        &target("a.test", "mx.a.test", broken.addr, TlsLevel::May),
        &s,
    )
    .await;
    assert!(out.is_delivered(), "{}", text(&out));
    assert_eq!(tls, None);
    assert!(!broken.messages()[0].tls);
    // First connection: STARTTLS, then nothing more; the second one in
    // clear without STARTTLS.
    let cmds = broken.commands();
    let verbs: Vec<&str> = cmds.iter().map(|c| c.verb.as_str()).collect();
    assert_eq!(verbs, ["EHLO", "STARTTLS", "EHLO", "MAIL"], "{cmds:?}");
    assert_ne!(
        cmds[0].peer, cmds[2].peer,
        "a new connection for the clear try"
    );

    // `encrypt` does not fall back: deferred, and why.
    let (out, _) = send_one(
        &target("a.test", "mx.a.test", broken.addr, TlsLevel::Encrypt),
        &s,
    )
    .await;
    assert!(out.is_deferred(), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.starts_with("4.7.5 TLS is required (test encrypt): TLS handshake with mx.a.test"),
        "{t}"
    );
    assert_eq!(broken.count(), 1);
}

#[tokio::test]
async fn encrypt_defers_when_starttls_is_not_offered() {
    let plain = sink(None, SinkOptions::default());
    let s = settings(None);
    let (out, _) = send_one(
        &target("a.test", "mx.a.test", plain.addr, TlsLevel::Encrypt),
        &s,
    )
    .await;
    assert!(out.is_deferred(), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.starts_with(&format!(
            "4.7.4 TLS is required (test encrypt) but mx.a.test[{}]:{} did not offer STARTTLS",
            plain.addr.ip(),
            plain.addr.port()
        )),
        "{t}"
    );
    assert_eq!(plain.count(), 0);
    let cmds: Vec<String> = plain.commands().into_iter().map(|c| c.verb).collect();
    assert_eq!(cmds, ["EHLO"], "no mail over the clear connection");
}

#[tokio::test]
async fn verify_checks_the_name_and_the_ca() {
    // The certificate is for mx.example.test (and localhost, 127.0.0.1).
    let pki = TestPki::new();
    let mx = sink(Some(&pki), SinkOptions::default());
    let trusted = settings(Some(&pki));

    let (out, tls) = send_one(
        &target("example.test", "mx.example.test", mx.addr, TlsLevel::Verify),
        &trusted,
    )
    .await;
    assert!(out.is_delivered(), "{}", text(&out));
    assert!(tls.unwrap().ends_with(", verified"));

    // `secure`: the next-hop domain or the MX name under it.
    let (out, _) = send_one(
        &target("example.test", "mx.example.test", mx.addr, TlsLevel::Secure),
        &trusted,
    )
    .await;
    assert!(out.is_delivered(), "{}", text(&out));

    // The MX name the certificate does not carry.
    let (out, _) = send_one(
        &target("other.test", "mx.other.test", mx.addr, TlsLevel::Verify),
        &trusted,
    )
    .await;
    assert!(out.is_deferred(), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.starts_with("4.7.5 TLS is required (test verify): TLS handshake with mx.other.test"),
        "{t}"
    );
    assert!(
        t.contains("certificate not valid for name \"mx.other.test\""),
        "{t}"
    );

    // `secure` for a next hop the MX is not under, even though the MX
    // name itself would match.
    let (out, _) = send_one(
        &target("bank.test", "mx.example.test", mx.addr, TlsLevel::Secure),
        &trusted,
    )
    .await;
    assert!(out.is_deferred(), "{}", text(&out));

    // A CA that nobody configured.
    let (out, _) = send_one(
        &target("example.test", "mx.example.test", mx.addr, TlsLevel::Verify),
        &settings(None),
    )
    .await;
    assert!(out.is_deferred(), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("UnknownIssuer"), "{t}");
    assert_eq!(mx.count(), 2, "only the verified deliveries");
}

#[tokio::test]
async fn a_cached_connection_carries_two_messages_over_one_tls_session() {
    let pki = TestPki::new();
    let mx = sink(Some(&pki), SinkOptions::default());
    let s = settings(Some(&pki));
    let targets = target("example.test", "mx.example.test", mx.addr, TlsLevel::Verify);
    let recipients = vec!["r@dest.test".to_owned()];
    let tx = Transaction {
        sender: Some("s@origin.test"),
        recipients: &recipients,
        content: CONTENT,
    };
    let mut conn = SmtpClient::connect_to(&targets, &s).await.unwrap();
    assert!(conn.send(&tx).await[0].is_delivered());
    assert!(conn.reset().await);
    assert!(conn.send(&tx).await[0].is_delivered());
    conn.quit().await;
    let got = mx.messages();
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|m| m.tls && m.peer == got[0].peer));
    let starttls = mx
        .commands()
        .iter()
        .filter(|c| c.verb == "STARTTLS")
        .count();
    assert_eq!(starttls, 1, "one TLS session");
}

/// A relay whose smarthost is `relay.test:PORT` (resolved by dnsmasq),
/// with `routing` lines after `smarthost`.
fn smarthost_relay(sink: &Sink, routing: &str, delivery: &str) -> (TestServer, Dnsmasq) {
    let dns = Dnsmasq::start(&Zone::new("test").a(
        "relay.test",
        match sink.addr.ip() {
            std::net::IpAddr::V4(v4) => v4,
            other => panic!("{other}"),
        },
    ));
    let config = relay_config(
        Some(&dns),
        1,
        &format!("retry = [\"1h\"]\n{delivery}"),
        &format!("smarthost = \"relay.test:{}\"\n{routing}", sink.addr.port()),
    );
    let server = TestServer::start_with(&config);
    (server, dns)
}

fn send(server: &TestServer, to: &str, subject: &str) -> String {
    let mut c = Raw::connect(server.smtp);
    assert!(c.reply().starts_with("220"));
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    assert!(c.cmd("MAIL FROM:<alice@example.test>").starts_with("250"));
    assert!(c.cmd(&format!("RCPT TO:<{to}>")).starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    let r = c.cmd(&format!(
        "From: <alice@example.test>\r\nTo: <{to}>\r\nSubject: {subject}\r\n\r\nHi.\r\n."
    ));
    assert!(r.starts_with("250 2.0.0 Ok: queued as "), "{r}");
    c.cmd("QUIT");
    r.rsplit(' ').next().unwrap().to_owned()
}

const AUTH: &str = "[routing.smarthost_auth]\nusername = \"relayuser\"\npassword = \"s3cret\"\n";

#[test]
fn smarthost_credentials_go_only_over_tls() {
    let pki = TestPki::new();
    let tls_sink = sink(
        Some(&pki),
        SinkOptions {
            auth: Some(("relayuser".into(), "s3cret".into())),
            ..SinkOptions::default()
        },
    );
    let (relay, _dns) = smarthost_relay(&tls_sink, AUTH, "");
    let id = send(&relay, "pat@far.test", "over tls");
    let got = wait_messages(&tls_sink, 1);
    assert_eq!(got[0].auth.as_deref(), Some("relayuser"));
    assert!(got[0].tls);
    let cmds: Vec<(String, bool)> = tls_sink
        .commands()
        .into_iter()
        .map(|c| (c.verb, c.tls))
        .collect();
    assert_eq!(
        cmds,
        [
            ("EHLO".into(), false),
            ("STARTTLS".into(), false),
            ("EHLO".into(), true),
            ("AUTH".into(), true),
            ("MAIL".into(), true)
        ]
    );
    // The log and the history name the protocol and cipher.
    let line = wait_line(
        &relay,
        &["delivery attempt", &format!("id={id}"), "status=sent"],
    );
    assert!(line.contains("tls=TLSv1.3 with cipher TLS13_"), "{line}");
    let trace = relay.cli(&["trace", &id], "");
    let trace = String::from_utf8_lossy(&trace.stdout);
    assert!(trace.contains("(TLSv1.3 with cipher TLS13_"), "{trace}");

    // A smarthost without STARTTLS never sees the password: deferred with
    // the reason in the queue.
    let plain = sink(
        None,
        SinkOptions {
            auth: Some(("relayuser".into(), "s3cret".into())),
            ..SinkOptions::default()
        },
    );
    let (relay, _dns) = smarthost_relay(&plain, AUTH, "");
    let id = send(&relay, "pat@far.test", "no tls");
    wait_line(
        &relay,
        &["delivery attempt", &format!("id={id}"), "status=deferred"],
    );
    let queue = relay.cli(&["queue", "show", &id], "");
    let queue = String::from_utf8_lossy(&queue.stdout).into_owned();
    assert!(
        queue.contains("TLS is required (smarthost encrypt) but relay.test[")
            && queue.contains("did not offer STARTTLS"),
        "{queue}"
    );
    let verbs: Vec<String> = plain.commands().into_iter().map(|c| c.verb).collect();
    assert!(!verbs.iter().any(|v| v == "AUTH"), "{verbs:?}");
    assert_eq!(plain.count(), 0);
}

#[test]
fn implicit_tls_to_a_smarthost_on_465() {
    let pki = TestPki::new();
    let ip = unique_loopback();
    // Port 465 selects implicit TLS without a key (tests run as root).
    let wrapper = Sink::start(
        ip,
        465,
        &SinkOptions {
            auth: Some(("relayuser".into(), "s3cret".into())),
            tls: Some(pki.cert_and_key()),
            tls_implicit: true,
            ..SinkOptions::default()
        },
    );
    let (relay, _dns) = smarthost_relay(
        &wrapper,
        AUTH,
        &format!("[delivery.tls]\nca_file = \"{}\"", pki.ca_str()),
    );
    send(&relay, "pat@far.test", "wrapper mode");
    let got = wait_messages(&wrapper, 1);
    assert!(got[0].tls);
    assert_eq!(got[0].auth.as_deref(), Some("relayuser"));
    let cmds = wrapper.commands();
    assert!(
        cmds.iter().all(|c| c.tls && c.verb != "STARTTLS"),
        "{cmds:?}"
    );
}

#[test]
fn the_receiving_postino_says_esmtps() {
    let pki = TestPki::new();
    // The receiver: postino with STARTTLS for b.test, on 127.0.0.1.
    let receiver = TestServer::start_with(&format!(
        "hostname = \"mx.example.test\"\ndata_dir = \"data\"\n[smtp]\nlisten = [\"127.0.0.1:0\"]\n\
         [pop3]\nlisten = [\"127.0.0.1:0\"]\n[routing]\nlocal_domains = [\"b.test\"]\n{}",
        pki.section()
    ));
    receiver.add_user("bob@b.test", "pw");
    let dns = Dnsmasq::start(
        &Zone::new("test")
            .mx("b.test", "mx.example.test", 10)
            .a("mx.example.test", std::net::Ipv4Addr::LOCALHOST),
    );
    let sender = TestServer::start_with(&config_text(
        "",
        "",
        "",
        &format!(
            "[delivery]\nmx_port = {}\nretry = [\"1h\"]\n[delivery.tls]\nca_file = \"{}\"\n\
             [delivery.tls.policy]\n\"b.test\" = \"verify\"\n[dns]\nnameservers = [\"{}\"]\n",
            receiver.smtp.port(),
            pki.ca_str(),
            dns.addr
        ),
    ));
    let id = send(&sender, "bob@b.test", "to the other postino");
    wait_line(&sender, &["removed from queue", &format!("id={id}")]);
    let mut got = Vec::new();
    assert!(wait_until(LIMIT, || {
        got = pop_over_stls(&receiver, &pki, "bob@b.test", "pw");
        !got.is_empty()
    }));
    // The receiver's own Received: comes first, then the sender's (its
    // client spoke plain ESMTP to it).
    let text = &got[0];
    let withs: Vec<&str> = text
        .match_indices("with ESMTP")
        .map(|(i, _)| text[i + 5..].split_whitespace().next().unwrap_or(""))
        .collect();
    assert_eq!(withs, ["ESMTPS", "ESMTP"], "{text}");
}

/// The relay's connection cache works over TLS (a connection carries
/// several messages, each connection one TLS session), and
/// `delivery.connection_reuse = false` gives every message its own.
#[test]
fn the_relay_reuses_tls_connections_unless_turned_off() {
    let pki = TestPki::new();
    for reuse in [true, false] {
        let mx = sink(Some(&pki), SinkOptions::default());
        let ip = match mx.addr.ip() {
            std::net::IpAddr::V4(v4) => v4,
            other => panic!("{other}"),
        };
        let dns = Dnsmasq::start(
            &Zone::new("test")
                .mx("busy.test", "mx.example.test", 10)
                .a("mx.example.test", ip),
        );
        let relay = TestServer::start_with(&relay_config(
            Some(&dns),
            mx.addr.port(),
            &format!(
                "retry = [\"1s\"]\nconcurrency_per_domain = 2\nconnection_reuse = {reuse}\n\
                 [delivery.tls]\nca_file = \"{}\"\n[delivery.tls.policy]\n\"busy.test\" = \"verify\"",
                pki.ca_str()
            ),
            "",
        ));
        let n = 12;
        let ids: Vec<String> = (0..n)
            .map(|i| send(&relay, &format!("u{i}@busy.test"), &format!("burst {i}")))
            .collect();
        let got = wait_messages(&mx, n);
        for id in &ids {
            wait_line(&relay, &["removed from queue", &format!("id={id}")]);
        }
        assert!(got.iter().all(|m| m.tls), "every message over TLS");
        let connections: std::collections::HashSet<_> =
            got.iter().map(|m| m.peer.clone()).collect();
        let starttls = mx
            .commands()
            .iter()
            .filter(|c| c.verb == "STARTTLS")
            .count();
        assert_eq!(
            starttls,
            connections.len(),
            "one TLS session per connection"
        );
        if reuse {
            assert!(
                connections.len() < n,
                "{} connections for {n} messages",
                connections.len()
            );
        } else {
            assert_eq!(connections.len(), n, "reuse is off");
        }
    }
}

/// `check-config` reads `delivery.tls.ca_file`: a file without a
/// certificate is named with its key before the server runs.
#[test]
fn check_config_reads_the_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("postino.toml");
    std::fs::write(dir.path().join("ca.pem"), "not a certificate\n").unwrap();
    std::fs::write(&config, "[delivery.tls]\nca_file = \"ca.pem\"\n").unwrap();
    let out = crate::support::server::cli_with_config(&config, &["check-config"], "");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("delivery.tls.ca_file = "), "{err}");
    assert!(err.contains("no certificate found"), "{err}");
    let pki = TestPki::new();
    std::fs::copy(pki.ca_path(), dir.path().join("ca.pem")).unwrap();
    let out = crate::support::server::cli_with_config(&config, &["check-config"], "");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
