//! Outbound delivery against real servers on loopback: MX lookups answered
//! by dnsmasq, messages taken by aiosmtpd or by scripted servers.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use postino::delivery::{
    deliver, ClientSettings, Diagnostic, Exchanger, LookupError, MxResolver, RcptOutcome,
    SmtpClient, Transaction,
};
use postino_core::config::{DeliveryConfig, DnsConfig, SmarthostAuth};
use tokio::sync::mpsc;

use crate::support::dns::{Dnsmasq, Zone};
use crate::support::mx::{RawConn, RawServer, Sink, SinkOptions};
use crate::support::{free_tcp_port, free_udp_tcp_port, unique_loopback};

/// Short timeouts: a test that goes wrong fails in seconds, not minutes.
fn settings_with(command: Duration, data_done: Duration) -> ClientSettings {
    let config = DeliveryConfig {
        connect_timeout: Duration::from_secs(5),
        command_timeout: command,
        data_init_timeout: command,
        data_xfer_timeout: command,
        data_done_timeout: data_done,
        ..DeliveryConfig::default()
    };
    ClientSettings::new("client.postino.test", &config)
}

fn settings() -> ClientSettings {
    settings_with(Duration::from_secs(5), Duration::from_secs(5))
}

fn resolver(dns: &Dnsmasq) -> MxResolver {
    MxResolver::new(&DnsConfig {
        nameservers: vec![dns.addr],
        timeout: Some(Duration::from_secs(2)),
        ..DnsConfig::default()
    })
    .expect("resolver")
}

fn message(subject: &str) -> Vec<u8> {
    format!(
        "From: <sender@origin.test>\r\nTo: <rcpt@dest.test>\r\nSubject: {subject}\r\n\r\nHello.\r\n"
    )
    .into_bytes()
}

fn rcpts(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn direct(host: &str, addr: SocketAddr) -> Vec<Exchanger> {
    vec![Exchanger {
        host: host.to_string(),
        preference: 0,
        addrs: vec![addr],
    }]
}

fn remote_text(outcome: &RcptOutcome) -> String {
    match outcome {
        RcptOutcome::Delivered(reply) => reply.to_string(),
        RcptOutcome::Deferred(d) | RcptOutcome::Failed(d) => d.to_string(),
    }
}

#[tokio::test]
async fn mx_order_and_fallback_to_the_next_exchanger() {
    let (dead, live) = (unique_loopback(), unique_loopback());
    let port = free_tcp_port(&[dead, live]);
    let sink = Sink::start(live, port, &SinkOptions::default());
    let dns = Dnsmasq::start(
        &Zone::new("test")
            .mx("order.test", "mx2.order.test", 20)
            .mx("order.test", "mx1.order.test", 10)
            .mx("order.test", "ghost.order.test", 30)
            .a("mx1.order.test", dead)
            .a("mx2.order.test", live),
    );

    let exchangers = resolver(&dns).resolve("order.test", port).await.unwrap();
    let summary: Vec<(&str, u16, Vec<SocketAddr>)> = exchangers
        .iter()
        .map(|e| (e.host.as_str(), e.preference, e.addrs.clone()))
        .collect();
    // The exchanger without an address is left out.
    assert_eq!(
        summary,
        [
            ("mx1.order.test", 10, vec![SocketAddr::from((dead, port))]),
            ("mx2.order.test", 20, vec![SocketAddr::from((live, port))]),
        ]
    );

    // Nothing listens on the first: connection refused, the second gets it.
    let content = message("fallback");
    let recipients = rcpts(&["user@order.test"]);
    let tx = Transaction {
        sender: Some("sender@origin.test"),
        recipients: &recipients,
        content: &content,
        params: None,
    };
    let delivery = deliver(&exchangers, &settings(), &tx).await;
    assert!(delivery.outcomes[0].is_delivered(), "{delivery:?}");
    assert_eq!(delivery.remote.unwrap().host, "mx2.order.test");
    let got = sink.messages();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].rcpt_tos, ["user@order.test"]);
    assert_eq!(got[0].mail_from, "sender@origin.test");
    assert_eq!(got[0].helo.as_deref(), Some("client.postino.test"));
    assert!(got[0].esmtp);
}

#[tokio::test]
async fn equal_preference_is_shuffled_and_both_are_reachable() {
    let (a, b) = (unique_loopback(), unique_loopback());
    let port = free_tcp_port(&[a, b]);
    let sink_a = Sink::start(a, port, &SinkOptions::default());
    let sink_b = Sink::start(b, port, &SinkOptions::default());
    let dns = Dnsmasq::start(
        &Zone::new("test")
            .mx("equal.test", "a.equal.test", 10)
            .mx("equal.test", "b.equal.test", 10)
            .a("a.equal.test", a)
            .a("b.equal.test", b),
    );
    let resolver = resolver(&dns);

    let mut first = std::collections::HashSet::new();
    for _ in 0..30 {
        let exchangers = resolver.resolve("equal.test", port).await.unwrap();
        assert_eq!(exchangers.len(), 2);
        assert!(exchangers.iter().all(|e| e.preference == 10));
        first.insert(exchangers[0].host.clone());
    }
    // 30 fair shuffles all alike would happen once in 2^29 runs.
    assert_eq!(first.len(), 2, "both orders appear: {first:?}");

    // Each exchanger takes mail when it comes first.
    let content = message("equal");
    let recipients = rcpts(&["user@equal.test"]);
    let tx = Transaction {
        sender: Some("sender@origin.test"),
        recipients: &recipients,
        content: &content,
        params: None,
    };
    for addr in [a, b] {
        let only = direct("x.equal.test", SocketAddr::from((addr, port)));
        let delivery = deliver(&only, &settings(), &tx).await;
        assert!(delivery.outcomes[0].is_delivered(), "{delivery:?}");
    }
    assert_eq!(sink_a.messages().len(), 1);
    assert_eq!(sink_b.messages().len(), 1);
}

#[tokio::test]
async fn implicit_mx_and_address_literal() {
    let ip = unique_loopback();
    let port = free_tcp_port(&[ip]);
    let sink = Sink::start(ip, port, &SinkOptions::default());
    let dns = Dnsmasq::start(&Zone::new("test").a("implicit.test", ip));
    let resolver = resolver(&dns);

    let exchangers = resolver.resolve("implicit.test", port).await.unwrap();
    assert_eq!(
        exchangers,
        [Exchanger {
            host: "implicit.test".into(),
            preference: 0,
            addrs: vec![SocketAddr::from((ip, port))],
        }]
    );
    let literal = format!("[{ip}]");
    let by_literal = resolver.resolve(&literal, port).await.unwrap();
    assert_eq!(by_literal[0].addrs, [SocketAddr::from((ip, port))]);
    assert_eq!(by_literal[0].host, literal);

    let content = message("implicit");
    let recipients = rcpts(&["user@implicit.test"]);
    let tx = Transaction {
        sender: None,
        recipients: &recipients,
        content: &content,
        params: None,
    };
    let delivery = deliver(&exchangers, &settings(), &tx).await;
    assert!(delivery.outcomes[0].is_delivered(), "{delivery:?}");
    assert_eq!(sink.messages().len(), 1);
}

#[tokio::test]
async fn lookup_failures_say_whether_to_bounce() {
    let ip = unique_loopback();
    let dns = Dnsmasq::start(
        &Zone::new("test")
            .null_mx("nullmx.test")
            .mx("noaddr.test", "ghost.noaddr.test", 10)
            .a("host.test", ip),
    );
    let resolver = resolver(&dns);

    let cases: &[(&str, LookupError)] = &[
        ("nullmx.test", LookupError::NullMx),
        ("nxdomain.test", LookupError::NoSuchDomain),
        ("noaddr.test", LookupError::NoAddresses),
        ("bad..name.test", LookupError::InvalidDomain(String::new())),
        ("[300.1.1.1]", LookupError::InvalidDomain(String::new())),
    ];
    for (domain, want) in cases {
        let got = resolver.resolve(domain, 25).await.unwrap_err();
        assert_eq!(
            std::mem::discriminant(&got),
            std::mem::discriminant(want),
            "{domain}: {got:?}"
        );
        assert!(got.is_permanent(), "{domain}");
        assert!(got.status().starts_with('5'), "{domain}");
    }
    assert_eq!(LookupError::NullMx.status(), "5.1.10");

    // No upstream for other zones: dnsmasq says REFUSED, which must not
    // bounce mail.
    let refused = resolver.resolve("example.org", 25).await.unwrap_err();
    assert!(matches!(refused, LookupError::Temporary(_)), "{refused:?}");
    assert!(!refused.is_permanent());

    // No DNS server at all (nothing listens on that port): temporary too.
    let nowhere = MxResolver::new(&DnsConfig {
        nameservers: vec![SocketAddr::from((ip, free_udp_tcp_port(ip)))],
        timeout: Some(Duration::from_millis(300)),
        ..DnsConfig::default()
    })
    .unwrap();
    let down = nowhere.resolve("order.test", 25).await.unwrap_err();
    assert!(matches!(down, LookupError::Temporary(_)), "{down:?}");
    assert_eq!(down.status(), "4.4.3");

    // The smarthost is a host, looked up by address, never by MX.
    let smarthost = resolver.resolve_smarthost("host.test:2525").await.unwrap();
    assert_eq!(smarthost[0].addrs, [SocketAddr::new(IpAddr::V4(ip), 2525)]);
    let missing = resolver
        .resolve_smarthost("nxdomain.test:25")
        .await
        .unwrap_err();
    assert!(!missing.is_permanent(), "{missing:?}");
}

#[tokio::test]
async fn rcpt_replies_decide_each_recipient() {
    let ip = unique_loopback();
    let port = free_tcp_port(&[ip]);
    let sink = Sink::start(
        ip,
        port,
        &SinkOptions::answering(&[
            ("busy@dest.test", "450 4.2.1 Mailbox busy"),
            ("nobody@dest.test", "550 5.1.1 User unknown"),
        ]),
    );
    let exchangers = direct("mx.dest.test", SocketAddr::from((ip, port)));
    let content = message("mixed");
    let recipients = rcpts(&["ok@dest.test", "busy@dest.test", "nobody@dest.test"]);
    let tx = Transaction {
        sender: Some("sender@origin.test"),
        recipients: &recipients,
        content: &content,
        params: None,
    };
    let delivery = deliver(&exchangers, &settings(), &tx).await;
    let [ok, busy, nobody] = &delivery.outcomes[..] else {
        panic!("three outcomes: {delivery:?}");
    };
    assert!(ok.is_delivered(), "{ok:?}");
    match busy {
        RcptOutcome::Deferred(Diagnostic::Remote(reply)) => {
            assert_eq!(reply.code, 450);
            assert_eq!(reply.status.as_deref(), Some("4.2.1"));
        }
        other => panic!("busy: {other:?}"),
    }
    match nobody {
        RcptOutcome::Failed(d @ Diagnostic::Remote(reply)) => {
            assert_eq!(reply.code, 550);
            assert_eq!(reply.text, "User unknown");
            assert_eq!(d.status(), "5.1.1");
        }
        other => panic!("nobody: {other:?}"),
    }
    let got = sink.messages();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].rcpt_tos, ["ok@dest.test"]);

    // Only refused recipients: no DATA at all, every outcome from RCPT.
    let recipients = rcpts(&["busy@dest.test", "nobody@dest.test"]);
    let tx = Transaction {
        recipients: &recipients,
        ..tx
    };
    let delivery = deliver(&exchangers, &settings(), &tx).await;
    assert!(delivery.outcomes[0].is_deferred(), "{delivery:?}");
    assert!(delivery.outcomes[1].is_failed(), "{delivery:?}");
    assert_eq!(sink.messages().len(), 1);
}

#[tokio::test]
async fn hanging_servers_time_out_and_defer() {
    let short = Duration::from_millis(500);

    // Hangs after the final dot: the message may have arrived, but without
    // the reply it is deferred (and may be sent twice, as RFC 5321 allows).
    let ip = unique_loopback();
    let port = free_tcp_port(&[ip]);
    let _sink = Sink::start(
        ip,
        port,
        &SinkOptions {
            hang: Some("data"),
            ..SinkOptions::default()
        },
    );
    let content = message("hang");
    let recipients = rcpts(&["a@dest.test", "b@dest.test"]);
    let tx = Transaction {
        sender: Some("sender@origin.test"),
        recipients: &recipients,
        content: &content,
        params: None,
    };
    let settings = settings_with(Duration::from_secs(5), short);
    let mut conn = SmtpClient::connect(
        &direct("mx.dest.test", SocketAddr::from((ip, port))),
        &settings,
    )
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let outcomes = conn.send(&tx).await;
    assert!(started.elapsed() < Duration::from_secs(4));
    for o in &outcomes {
        assert!(o.is_deferred(), "{o:?}");
        let text = remote_text(o);
        assert!(
            text.contains("timed out while sending end of data"),
            "{text}"
        );
    }
    assert!(!conn.is_reusable());

    // Never greets: the next exchanger gets the message.
    let (silent, good) = (unique_loopback(), unique_loopback());
    let port = free_tcp_port(&[silent, good]);
    let _mute = RawServer::start(silent, port, |conn: RawConn| async move {
        // Hold the connection open without a word.
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(conn);
    })
    .await;
    let sink = Sink::start(good, port, &SinkOptions::default());
    let exchangers = vec![
        Exchanger {
            host: "mute.dest.test".into(),
            preference: 10,
            addrs: vec![SocketAddr::from((silent, port))],
        },
        Exchanger {
            host: "good.dest.test".into(),
            preference: 20,
            addrs: vec![SocketAddr::from((good, port))],
        },
    ];
    let settings = settings_with(short, short);
    let delivery = deliver(&exchangers, &settings, &tx).await;
    assert!(
        delivery.outcomes.iter().all(RcptOutcome::is_delivered),
        "{delivery:?}"
    );
    assert_eq!(sink.messages().len(), 1);

    // Only the silent one: deferred, naming the stage.
    let delivery = deliver(&exchangers[..1], &settings, &tx).await;
    let text = remote_text(&delivery.outcomes[0]);
    assert!(delivery.outcomes[0].is_deferred(), "{delivery:?}");
    assert!(
        text.contains("timed out while receiving the initial server greeting"),
        "{text}"
    );
}

#[tokio::test]
async fn pipelining_sends_the_envelope_in_one_go() {
    let ip = unique_loopback();
    let (tx_lines, mut rx_lines) = mpsc::unbounded_channel();
    let server = RawServer::start(ip, 0, move |mut conn: RawConn| {
        let report = tx_lines.clone();
        async move {
            conn.send("220 raw.test ESMTP\r\n").await;
            let _ehlo = conn.line().await;
            conn.send("250-raw.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE\r\n")
                .await;
            // Not a word until DATA: a client that waits for the MAIL reply
            // would leave this loop empty-handed.
            let mut envelope = Vec::new();
            while let Some(line) = conn.line().await {
                let done = line == "DATA";
                envelope.push(line);
                if done {
                    break;
                }
            }
            conn.send("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 No such user\r\n354 Go\r\n")
                .await;
            let data = conn.data().await;
            conn.send("250 2.0.0 Queued\r\n").await;
            let quit = conn.line().await;
            conn.send("221 2.0.0 Bye\r\n").await;
            let _ = report.send((envelope, data, quit));
        }
    })
    .await;

    let content = "Subject: caf\u{e9}\r\n\r\nna\u{ef}ve\r\n"
        .as_bytes()
        .to_vec();
    let recipients = rcpts(&["a@dest.test", "b@dest.test"]);
    let tx = Transaction {
        sender: Some("sender@origin.test"),
        recipients: &recipients,
        content: &content,
        params: None,
    };
    let delivery = deliver(&direct("raw.test", server.addr), &settings(), &tx).await;
    assert!(delivery.outcomes[0].is_delivered(), "{delivery:?}");
    assert!(delivery.outcomes[1].is_failed(), "{delivery:?}");

    let (envelope, data, quit) = rx_lines.recv().await.expect("server report");
    assert_eq!(
        envelope,
        [
            format!(
                "MAIL FROM:<sender@origin.test> SIZE={} BODY=8BITMIME",
                content.len()
            ),
            "RCPT TO:<a@dest.test>".to_string(),
            "RCPT TO:<b@dest.test>".to_string(),
            "DATA".to_string(),
        ]
    );
    assert_eq!(data.as_deref(), Some(&content[..]));
    assert_eq!(quit.as_deref(), Some("QUIT"));
}

#[tokio::test]
async fn dot_stuffing_round_trip() {
    let ip = unique_loopback();
    let port = free_tcp_port(&[ip]);
    let sink = Sink::start(ip, port, &SinkOptions::default());
    // Lines that start with dots, a lone dot, a bare LF and a bare CR, and
    // no line end at the very end.
    let content =
        b"Subject: dots\r\n\r\n.hidden\r\n..two\r\n.\r\nbare\nlf\rcr\r\n. \r\nend".to_vec();
    let want = b"Subject: dots\r\n\r\n.hidden\r\n..two\r\n.\r\nbare\r\nlf\r\ncr\r\n. \r\nend\r\n";
    let recipients = rcpts(&["user@dest.test"]);
    let tx = Transaction {
        sender: Some("sender@origin.test"),
        recipients: &recipients,
        content: &content,
        params: None,
    };
    let delivery = deliver(
        &direct("mx.dest.test", SocketAddr::from((ip, port))),
        &settings(),
        &tx,
    )
    .await;
    assert!(delivery.outcomes[0].is_delivered(), "{delivery:?}");
    let got = sink.messages();
    assert_eq!(
        String::from_utf8_lossy(&got[0].content),
        String::from_utf8_lossy(want)
    );
    assert_eq!(got[0].mail_options, [format!("SIZE={}", content.len())]);
}

#[tokio::test]
async fn one_connection_carries_several_transactions() {
    let ip = unique_loopback();
    let port = free_tcp_port(&[ip]);
    let sink = Sink::start(
        ip,
        port,
        &SinkOptions::answering(&[("nobody@dest.test", "550 5.1.1 User unknown")]),
    );
    let settings = settings();
    let mut conn = SmtpClient::connect(
        &direct("mx.dest.test", SocketAddr::from((ip, port))),
        &settings,
    )
    .await
    .unwrap();
    assert!(conn.extensions().eight_bit_mime);

    let plan: &[(&str, &[&str], bool)] = &[
        ("first", &["a@dest.test"], true),
        // Refused at RCPT: the server keeps the MAIL, so an RSET must come
        // before the next transaction.
        ("refused", &["nobody@dest.test"], false),
        ("third", &["b@dest.test", "c@dest.test"], true),
    ];
    for (subject, list, delivered) in plan {
        assert!(conn.reset().await, "connection alive before {subject}");
        let content = message(subject);
        let recipients = rcpts(list);
        let tx = Transaction {
            sender: Some("sender@origin.test"),
            recipients: &recipients,
            content: &content,
            params: None,
        };
        let outcomes = conn.send(&tx).await;
        assert!(
            outcomes.iter().all(|o| o.is_delivered() == *delivered),
            "{subject}: {outcomes:?}"
        );
        assert!(conn.is_reusable());
    }
    // Straight after a refused transaction, without reset(): send() itself
    // sends the RSET.
    let recipients = rcpts(&["nobody@dest.test"]);
    let content = message("refused again");
    let tx = Transaction {
        sender: Some("sender@origin.test"),
        recipients: &recipients,
        content: &content,
        params: None,
    };
    assert!(conn.send(&tx).await[0].is_failed());
    let recipients = rcpts(&["d@dest.test"]);
    let tx = Transaction {
        recipients: &recipients,
        ..tx
    };
    assert!(conn.send(&tx).await[0].is_delivered());
    assert_eq!(conn.transactions(), 5);
    conn.quit().await;

    let got = sink.messages();
    assert_eq!(got.len(), 3);
    assert!(got.iter().all(|m| m.peer == got[0].peer), "one connection");
    assert_eq!(got[1].rcpt_tos, ["b@dest.test", "c@dest.test"]);
}

#[tokio::test]
async fn size_limit_of_the_server_fails_the_message() {
    let ip = unique_loopback();
    let port = free_tcp_port(&[ip]);
    let sink = Sink::start(
        ip,
        port,
        &SinkOptions {
            size: Some(2000),
            ..SinkOptions::default()
        },
    );
    let exchangers = direct("mx.dest.test", SocketAddr::from((ip, port)));
    let recipients = rcpts(&["user@dest.test"]);
    let big = [message("big"), vec![b'x'; 3000], b"\r\n".to_vec()].concat();
    let tx = Transaction {
        sender: Some("sender@origin.test"),
        recipients: &recipients,
        content: &big,
        params: None,
    };
    let mut conn = SmtpClient::connect(&exchangers, &settings()).await.unwrap();
    assert_eq!(conn.extensions().size_limit, Some(2000));
    let outcomes = conn.send(&tx).await;
    match &outcomes[0] {
        RcptOutcome::Failed(d @ Diagnostic::Local { text, .. }) => {
            assert_eq!(d.status(), "5.3.4");
            assert!(text.contains("exceeds size limit 2000"), "{text}");
        }
        other => panic!("{other:?}"),
    }
    // Nothing was sent, so the connection is still good.
    assert!(conn.is_reusable());
    let small = message("small");
    let tx = Transaction {
        content: &small,
        ..tx
    };
    assert!(conn.send(&tx).await[0].is_delivered());
    conn.quit().await;
    assert_eq!(sink.messages().len(), 1);
}

#[tokio::test]
async fn odd_servers_greetings_helo_and_drops() {
    let recipients = rcpts(&["user@dest.test"]);
    let content = message("odd");
    let tx = Transaction {
        sender: Some("sender@origin.test"),
        recipients: &recipients,
        content: &content,
        params: None,
    };

    // 554 greeting from the only server: it refused for good.
    let refusing = RawServer::start(unique_loopback(), 0, |mut conn: RawConn| async move {
        conn.send("554 5.7.1 No service for you\r\n").await;
        let _ = conn.line().await;
        conn.send("221 Bye\r\n").await;
    })
    .await;
    let delivery = deliver(&direct("refusing.test", refusing.addr), &settings(), &tx).await;
    assert!(delivery.outcomes[0].is_failed(), "{delivery:?}");

    // Garbage instead of a greeting: a protocol error, try again later.
    let garbage = RawServer::start(unique_loopback(), 0, |mut conn: RawConn| async move {
        conn.send("hello, I am no mail server\r\n").await;
        let _ = conn.line().await;
    })
    .await;
    let delivery = deliver(&direct("garbage.test", garbage.addr), &settings(), &tx).await;
    match &delivery.outcomes[0] {
        RcptOutcome::Deferred(d) => {
            assert_eq!(d.status(), "4.5.0");
            assert!(d.to_string().contains("malformed reply"), "{d}");
        }
        other => panic!("{other:?}"),
    }

    // EHLO refused: HELO, and no extensions in MAIL.
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let old = RawServer::start(unique_loopback(), 0, move |mut conn: RawConn| {
        let seen = seen_tx.clone();
        async move {
            conn.send("220 old.test SMTP\r\n").await;
            let ehlo = conn.line().await;
            conn.send("502 5.5.2 Command not recognized\r\n").await;
            let helo = conn.line().await;
            conn.send("250 old.test\r\n").await;
            let mail = conn.line().await;
            conn.send("250 Ok\r\n").await;
            let _rcpt = conn.line().await;
            conn.send("250 Ok\r\n").await;
            let _data = conn.line().await;
            conn.send("354 Go\r\n").await;
            let _ = conn.data().await;
            conn.send("250 Ok\r\n").await;
            let _ = seen.send((ehlo, helo, mail));
        }
    })
    .await;
    let delivery = deliver(&direct("old.test", old.addr), &settings(), &tx).await;
    assert!(delivery.outcomes[0].is_delivered(), "{delivery:?}");
    let (ehlo, helo, mail) = seen.recv().await.unwrap();
    assert_eq!(ehlo.as_deref(), Some("EHLO client.postino.test"));
    assert_eq!(helo.as_deref(), Some("HELO client.postino.test"));
    assert_eq!(mail.as_deref(), Some("MAIL FROM:<sender@origin.test>"));

    // The connection drops after DATA: every recipient is deferred.
    let dropping = RawServer::start(unique_loopback(), 0, |mut conn: RawConn| async move {
        conn.send("220 drop.test ESMTP\r\n").await;
        let _ = conn.line().await;
        conn.send("250 drop.test\r\n").await;
        let _ = conn.line().await;
        conn.send("250 Ok\r\n").await;
        let _ = conn.line().await;
        conn.send("250 Ok\r\n").await;
        let _ = conn.line().await;
        // Dropping `conn` closes the socket.
    })
    .await;
    let delivery = deliver(&direct("drop.test", dropping.addr), &settings(), &tx).await;
    let text = remote_text(&delivery.outcomes[0]);
    assert!(delivery.outcomes[0].is_deferred(), "{delivery:?}");
    assert!(text.contains("lost connection with drop.test"), "{text}");
    assert!(text.contains("while sending DATA command"), "{text}");
}

#[tokio::test]
async fn mail_from_refusal_applies_to_every_recipient() {
    type Check = fn(&RcptOutcome) -> bool;
    let cases: &[(&str, Check)] = &[
        ("451 4.3.0 Try later", RcptOutcome::is_deferred),
        ("553 5.7.1 Sender rejected", RcptOutcome::is_failed),
    ];
    for (reply, want) in cases {
        let line = format!("{reply}\r\n");
        let server = RawServer::start(unique_loopback(), 0, move |mut conn: RawConn| {
            let line = line.clone();
            async move {
                conn.send("220 strict.test ESMTP\r\n").await;
                let _ = conn.line().await;
                conn.send("250 strict.test\r\n").await;
                let _ = conn.line().await;
                conn.send(&line).await;
                while let Some(cmd) = conn.line().await {
                    conn.send(if cmd == "QUIT" {
                        "221 Bye\r\n"
                    } else {
                        "250 Ok\r\n"
                    })
                    .await;
                }
            }
        })
        .await;
        let recipients = rcpts(&["a@dest.test", "b@dest.test"]);
        let content = message("refused sender");
        let tx = Transaction {
            sender: Some("sender@origin.test"),
            recipients: &recipients,
            content: &content,
            params: None,
        };
        let delivery = deliver(&direct("strict.test", server.addr), &settings(), &tx).await;
        assert!(delivery.outcomes.iter().all(want), "{reply}: {delivery:?}");
        assert!(
            remote_text(&delivery.outcomes[1]).contains(&reply[4..]),
            "{delivery:?}"
        );
    }
}

#[tokio::test]
async fn smarthost_with_auth_plain() {
    let ip = unique_loopback();
    let port = free_tcp_port(&[ip]);
    let sink = Sink::start(
        ip,
        port,
        &SinkOptions {
            auth: Some(("relay-user".into(), "s3cret".into())),
            ..SinkOptions::default()
        },
    );
    let dns = Dnsmasq::start(&Zone::new("test").a("relay.test", ip));
    let exchangers = resolver(&dns)
        .resolve_smarthost(&format!("relay.test:{port}"))
        .await
        .unwrap();
    assert_eq!(exchangers[0].addrs, [SocketAddr::from((ip, port))]);

    let recipients = rcpts(&["someone@far.example"]);
    let content = message("relayed");
    let tx = Transaction {
        sender: Some("sender@origin.test"),
        recipients: &recipients,
        content: &content,
        params: None,
    };
    let mut settings = settings();
    settings.auth = Some(SmarthostAuth {
        username: "relay-user".into(),
        password: "s3cret".into(),
        // This aiosmtpd has no TLS: AUTH in clear must be allowed.
        allow_plaintext: true,
    });
    let delivery = deliver(&exchangers, &settings, &tx).await;
    assert!(delivery.outcomes[0].is_delivered(), "{delivery:?}");
    let got = sink.messages();
    assert_eq!(got[0].auth.as_deref(), Some("relay-user"));

    // A wrong password defers (the postmaster fixes the setting) instead of
    // bouncing everything.
    settings.auth = Some(SmarthostAuth {
        username: "relay-user".into(),
        password: "wrong".into(),
        // This aiosmtpd has no TLS: AUTH in clear must be allowed.
        allow_plaintext: true,
    });
    let delivery = deliver(&exchangers, &settings, &tx).await;
    match &delivery.outcomes[0] {
        // The server's 535, not a timeout.
        RcptOutcome::Deferred(d) => {
            assert_eq!(d.status(), "4.7.0", "{d}");
            assert!(d.to_string().contains("authentication failed: "), "{d}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(sink.messages().len(), 1);
}
