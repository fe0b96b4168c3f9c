//! Attacks against the real server, byte for byte: open-relay probes,
//! address tricks, SMTP smuggling (the 2023 disclosures), and every limit
//! that keeps slow, noisy or greedy clients in check.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::mx::{Sink, SinkOptions};
use crate::support::server::TestServer;
use crate::support::{free_tcp_port, unique_loopback, wait_until};
use crate::tls::Client;

/// A server without TLS (plaintext login allowed, as in a test setup);
/// remote delivery goes to a closed loopback port, so nothing leaves the
/// machine and anything relayed would sit in the queue where we can see it.
fn config(smtp: &str, pop3: &str, routing: &str) -> String {
    let smarthost = if routing.contains("smarthost") {
        ""
    } else {
        "smarthost = \"127.0.0.1:9\""
    };
    format!(
        r#"hostname = "mx.example.test"
data_dir = "data"
[smtp]
listen = ["127.0.0.1:0"]
{smtp}
[pop3]
listen = ["127.0.0.1:0"]
{pop3}
[routing]
local_domains = ["example.test"]
{smarthost}
{routing}
[dns]
nameservers = ["127.0.0.1:9"]
"#
    )
}

/// A TCP connection to `addr` from the loopback address `src` (Linux
/// routes all of 127.0.0.0/8 to `lo`), so that one test can play several
/// clients.
fn connect_from(src: &str, addr: SocketAddr) -> TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("runtime");
    let tcp = rt.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(format!("{src}:0").parse().unwrap())
            .expect("bind source address");
        socket.connect(addr).await.expect("connect")
    });
    let tcp = tcp.into_std().expect("std socket");
    tcp.set_nonblocking(false).unwrap();
    tcp
}

fn client_from(src: &str, addr: SocketAddr) -> Client {
    Client::from_tcp(connect_from(src, addr))
}

/// What `postino queue list` says, and what alice's mailbox holds.
fn queue_list(server: &TestServer) -> String {
    let out = server.cli(&["queue", "list"], "");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every message of a mailbox, byte for byte as RETR sends it (still
/// dot-stuffed), over a plain POP3 connection.
fn retr_all(server: &TestServer, user: &str, password: &str) -> Vec<Vec<u8>> {
    let mut c = Client::connect(server.pop3);
    assert!(c.line().starts_with("+OK"));
    assert!(c.pop(&format!("USER {user}")).starts_with("+OK"));
    assert_eq!(c.pop(&format!("PASS {password}")), "+OK Logged in.");
    let stat = c.pop("STAT");
    let count: usize = stat.split(' ').nth(1).unwrap().parse().unwrap();
    let mut out = Vec::new();
    for n in 1..=count {
        assert!(c.pop(&format!("RETR {n}")).starts_with("+OK"));
        out.push(c.pop_raw());
    }
    assert!(c.pop("QUIT").starts_with("+OK"));
    out
}

/// True when every CR is followed by LF and every LF preceded by CR.
fn only_crlf(bytes: &[u8]) -> bool {
    bytes.iter().enumerate().all(|(i, &b)| match b {
        b'\r' => bytes.get(i + 1) == Some(&b'\n'),
        b'\n' => i > 0 && bytes[i - 1] == b'\r',
        _ => true,
    })
}

/// Recipient forms that ask this server to pass mail on to another host.
const RELAY_FORMS: &[&str] = &[
    "bob@remote.test",
    "bob%remote.test@example.test",
    "alice%remote.test@example.test",
    "BOB%REMOTE.TEST@EXAMPLE.TEST",
    "\"bob@remote.test\"@example.test",
    "\"bob%remote.test\"@example.test",
    "\"remote.test!bob\"@example.test",
    "@example.test:bob@remote.test",
    "@example.test,@relay.test:bob@remote.test",
    "@remote.test:alice@example.test",
    "remote.test!bob@example.test",
    "remote.test!alice@example.test",
    "bob@remote.test@example.test",
    "alice@remote.test@example.test",
    "bob@[192.0.2.1]",
    "bob@[IPv6:2001:db8::1]",
];

#[test]
fn no_open_relay_through_any_address_form() {
    // 127.0.0.2 is a trusted network, 127.0.0.1 is not.
    let server = TestServer::start_with(&config(
        "soft_error_limit = 100\nhard_error_limit = 200",
        "",
        "relay_networks = [\"127.0.0.2/32\"]",
    ));
    server.add_user("alice@example.test", "wonderland");

    let mut c = client_from("127.0.0.1", server.smtp);
    assert!(c.reply().starts_with("220 "));
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    assert_eq!(c.cmd("MAIL FROM:<carol@elsewhere.test>"), "250 2.1.0 Ok");
    for form in RELAY_FORMS {
        let reply = c.cmd(&format!("RCPT TO:<{form}>"));
        assert!(
            reply.starts_with("554 5.7.1 ") && reply.ends_with("Relay access denied"),
            "untrusted client, <{form}>: {reply}"
        );
    }
    assert!(c.cmd("DATA").starts_with("554 5.5.1"));
    assert_eq!(c.cmd("QUIT"), "221 2.0.0 Bye");

    // A trusted client may relay to plain remote addresses, but no form
    // that hides another host is relayed for anyone.
    let mut c = client_from("127.0.0.2", server.smtp);
    assert!(c.reply().starts_with("220 "));
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    assert_eq!(c.cmd("MAIL FROM:<carol@elsewhere.test>"), "250 2.1.0 Ok");
    for form in &RELAY_FORMS[1..RELAY_FORMS.len() - 2] {
        let reply = c.cmd(&format!("RCPT TO:<{form}>"));
        assert!(
            reply.starts_with("554 5.7.1 "),
            "trusted client, <{form}>: {reply}"
        );
    }
    assert_eq!(c.cmd("RSET"), "250 2.0.0 Ok");

    // A real client gets the same answer.
    let out = Command::new("swaks")
        .args(["--server", &format!("127.0.0.1:{}", server.smtp.port())])
        .args(["--from", "carol@elsewhere.test"])
        .args(["--to", "bob%remote.test@example.test"])
        .args(["--timeout", "20"])
        .output()
        .expect("swaks");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("554 5.7.1"), "{text}");

    // Nothing was queued or delivered.
    let queue = queue_list(&server);
    assert!(queue.contains("-- 0 message(s) in the queue"), "{queue}");
    assert!(
        !server.log().contains("message accepted"),
        "{}",
        server.log()
    );
    assert!(retr_all(&server, "alice@example.test", "wonderland").is_empty());
}

#[test]
fn addresses_are_parsed_strictly() {
    let server = TestServer::start_with(&config("", "", "relay_networks = []"));
    let mut c = Client::connect(server.smtp);
    assert!(c.reply().starts_with("220 "));
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    let domain_256 = format!("{}.test", vec!["a".repeat(62); 4].join("."));
    assert_eq!(domain_256.len(), 256);
    assert_eq!(
        c.cmd(&format!("MAIL FROM:<carol@{domain_256}>")),
        "501 5.1.7 Bad sender address syntax: domain longer than 255 octets"
    );
    assert_eq!(
        c.cmd("MAIL FROM:<j\u{f6}rg@elsewhere.test>"),
        "553 5.6.7 Must declare SMTPUTF8 to send Unicode address"
    );
    assert_eq!(c.cmd("MAIL FROM:<carol@elsewhere.test>"), "250 2.1.0 Ok");
    let cases = [
        (format!("{}@example.test", "a".repeat(64)), "550 5.1.1 "),
        (
            format!("{}@example.test", "a".repeat(65)),
            "501 5.1.3 Bad recipient address syntax: local part longer than 64 octets",
        ),
        (
            format!("b@{domain_256}"),
            "501 5.1.3 Bad recipient address syntax: domain longer than 255 octets",
        ),
        (
            // 64 + 1 + 201 octets, each part within its own limit.
            format!(
                "{}@{}.{}.{}.example.test",
                "a".repeat(64),
                "b".repeat(63),
                "c".repeat(63),
                "d".repeat(60)
            ),
            "501 5.1.3 Bad recipient address syntax: path longer than 256 octets",
        ),
        ("j\u{f6}rg@example.test".to_owned(), "553 5.6.7 "),
        ("alice@ex\u{e4}mple.test".to_owned(), "553 5.6.7 "),
        ("a..b@example.test".to_owned(), "501 5.1.3 "),
        ("alice@example..test".to_owned(), "501 5.1.3 "),
        ("alice@-example.test".to_owned(), "501 5.1.3 "),
        // The open quote swallows the closing bracket: a syntax error.
        ("\"unterminated@example.test".to_owned(), "501 5.5.2 "),
        ("alice@[300.1.1.1]".to_owned(), "501 5.1.3 "),
        ("alice@[tag:general]".to_owned(), "501 5.1.3 "),
        ("alice".to_owned(), "501 5.1.3 "),
    ];
    for (addr, want) in &cases {
        let reply = c.cmd(&format!("RCPT TO:<{addr}>"));
        assert!(reply.starts_with(want), "<{addr}>: {reply}");
    }
    // With SMTPUTF8 declared, a UTF-8 recipient is routed like any other.
    assert_eq!(c.cmd("RSET"), "250 2.0.0 Ok");
    assert_eq!(
        c.cmd("MAIL FROM:<j\u{f6}rg@elsewhere.test> SMTPUTF8"),
        "250 2.1.0 Ok"
    );
    let reply = c.cmd("RCPT TO:<j\u{f6}rg@example.test>");
    assert!(reply.starts_with("550 5.1.1 "), "{reply}");
}

/// End-of-data lookalikes from the 2023 SMTP smuggling research.
const FAKE_ENDS: &[&[u8]] = &[
    b"\n.\n",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r.\r",
    b"\r\n.\r",
    b"\r.\r\n",
    b"\n.\r",
    b"\r\n.\r\r\n",
    b"\r\n\x00.\r\n",
];

/// One transaction whose content hides a second one behind `fake_end`.
fn smuggling_attempt(n: usize, fake_end: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(
        b"MAIL FROM:<carol@elsewhere.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n",
    );
    m.extend_from_slice(format!("Subject: outer {n}\r\n\r\nbefore").as_bytes());
    m.extend_from_slice(fake_end);
    m.extend_from_slice(
        format!(
            "MAIL FROM:<mallory@elsewhere.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nSubject: smuggled {n}\r\n\r\nevil\r\n.\r\nQUIT\r\n"
        )
        .as_bytes(),
    );
    m
}

#[test]
fn smuggling_never_makes_two_messages() {
    let server = TestServer::start_with(&config("", "", "relay_networks = []"));
    server.add_user("alice@example.test", "wonderland");
    for (n, fake) in FAKE_ENDS.iter().enumerate() {
        let mut c = Client::connect(server.smtp);
        assert!(c.reply().starts_with("220 "));
        assert!(c.cmd("EHLO client.test").starts_with("250"));
        // All in one write, as an attacker's relay would pass it on.
        c.send(&smuggling_attempt(n, fake));
        let replies: Vec<String> = (0..5).map(|_| c.reply()).collect();
        let codes: Vec<&str> = replies.iter().map(|r| &r[..3.min(r.len())]).collect();
        assert_eq!(
            codes,
            ["250", "250", "354", "250", "221"],
            "{fake:?}: {replies:?}"
        );
        assert!(replies[3].contains("queued as"), "{replies:?}");
        assert!(c.closed(), "{fake:?}");
    }
    let msgs = retr_all(&server, "alice@example.test", "wonderland");
    assert_eq!(msgs.len(), FAKE_ENDS.len(), "one message per attempt");
    for (n, m) in msgs.iter().enumerate() {
        let text = String::from_utf8_lossy(m);
        // The would-be second message is just text inside the first.
        assert!(text.contains("Subject: outer"), "{text}");
        assert!(text.contains("Subject: smuggled"), "{text}");
        assert!(only_crlf(m), "message {n} has a bare CR or LF: {text:?}");
    }
    assert!(!server.log().contains("from=<mallory"), "{}", server.log());
}

#[test]
fn bare_line_endings_close_the_session_under_reject() {
    let server = TestServer::start_with(&config("bare_lf = \"reject\"", "", "relay_networks = []"));
    server.add_user("alice@example.test", "wonderland");
    for (n, fake) in FAKE_ENDS[..8].iter().enumerate() {
        let mut c = Client::connect(server.smtp);
        assert!(c.reply().starts_with("220 "));
        assert!(c.cmd("EHLO client.test").starts_with("250"));
        c.send(&smuggling_attempt(n, fake));
        let replies: Vec<String> = (0..4).map(|_| c.reply()).collect();
        let codes: Vec<&str> = replies.iter().map(|r| &r[..3.min(r.len())]).collect();
        assert_eq!(codes, ["250", "250", "354", "550"], "{fake:?}: {replies:?}");
        assert!(replies[3].starts_with("550 5.5.2 "), "{replies:?}");
        assert!(c.closed(), "{fake:?}: the session must end");
    }
    // In a command line too.
    let mut c = Client::connect(server.smtp);
    assert!(c.reply().starts_with("220 "));
    c.send(b"EHLO client.test\nNOOP\r\n");
    assert!(c.reply().starts_with("550 5.5.2 "));
    assert!(c.closed());
    assert!(retr_all(&server, "alice@example.test", "wonderland").is_empty());
}

#[test]
fn recipient_and_size_limits() {
    let server = TestServer::start_with(&config(
        "max_recipients = 100\nmax_message_size = 2000",
        "",
        "relay_networks = []",
    ));
    server.add_user("alice@example.test", "wonderland");
    let mut c = Client::connect(server.smtp);
    assert!(c.reply().starts_with("220 "));
    assert!(c.cmd("EHLO client.test").contains("SIZE 2000"));

    // 101 recipients, pipelined: the last one gets 452 4.5.3.
    let mut batch = b"MAIL FROM:<carol@elsewhere.test>\r\n".to_vec();
    for _ in 0..101 {
        batch.extend_from_slice(b"RCPT TO:<alice@example.test>\r\n");
    }
    c.send(&batch);
    assert_eq!(c.reply(), "250 2.1.0 Ok");
    for i in 0..100 {
        assert_eq!(c.reply(), "250 2.1.5 Ok", "recipient {i}");
    }
    assert_eq!(c.reply(), "452 4.5.3 Error: too many recipients");
    assert_eq!(c.cmd("RSET"), "250 2.0.0 Ok");

    // An overlong command line is dropped whole (500 5.5.0), and the
    // session goes on with the next line.
    c.send(format!("NOOP {}\r\nNOOP\r\n", "x".repeat(3000)).as_bytes());
    assert_eq!(c.reply(), "500 5.5.0 Error: line too long");
    assert_eq!(c.reply(), "250 2.0.0 Ok");

    // SIZE over the limit is refused at MAIL.
    assert!(c
        .cmd("MAIL FROM:<carol@elsewhere.test> SIZE=5000")
        .starts_with("552 5.3.4 "));
    // Too big in DATA: drained to the dot (the command-like lines in it are
    // not run), then 552, and the session goes on.
    assert_eq!(c.cmd("MAIL FROM:<carol@elsewhere.test>"), "250 2.1.0 Ok");
    assert_eq!(c.cmd("RCPT TO:<alice@example.test>"), "250 2.1.5 Ok");
    assert!(c.cmd("DATA").starts_with("354 "));
    let mut body = Vec::new();
    for _ in 0..20 {
        body.extend_from_slice(&[b'x'; 500]);
        body.extend_from_slice(b"\r\nRSET\r\nQUIT\r\n");
    }
    body.extend_from_slice(b".\r\n");
    c.send(&body);
    assert_eq!(c.reply(), "552 5.3.4 Error: message file too big");
    assert_eq!(c.cmd("NOOP"), "250 2.0.0 Ok");
    assert!(retr_all(&server, "alice@example.test", "wonderland").is_empty());
}

#[test]
fn error_limits_delay_then_close() {
    let server = TestServer::start_with(&config(
        "soft_error_limit = 3\nhard_error_limit = 6\nerror_delay = \"300ms\"",
        "",
        "",
    ));
    let mut c = Client::connect(server.smtp);
    assert!(c.reply().starts_with("220 "));
    let mut took = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        assert_eq!(c.cmd("FOO"), "502 5.5.2 Error: command not recognized");
        took.push(t.elapsed());
    }
    // Past the soft limit each error reply is held back (Postfix's
    // smtpd_error_sleep_time); lower bounds only, the machine may be slow.
    assert!(took[3] >= Duration::from_millis(300), "{took:?}");
    assert!(took[4] >= Duration::from_millis(300), "{took:?}");
    assert_eq!(
        c.cmd("FOO"),
        "421 4.7.0 mx.example.test Error: too many errors"
    );
    assert!(c.closed());

    // Refused recipients count too: a client probing for addresses (a
    // directory harvest) is slowed down, then cut off.
    let mut c = Client::connect(server.smtp);
    assert!(c.reply().starts_with("220 "));
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    assert_eq!(c.cmd("MAIL FROM:<carol@elsewhere.test>"), "250 2.1.0 Ok");
    let mut took = Vec::new();
    for n in 1..=5 {
        let t = Instant::now();
        let reply = c.cmd(&format!("RCPT TO:<guess{n}@example.test>"));
        took.push(t.elapsed());
        assert!(reply.starts_with("550 5.1.1 "), "{reply}");
    }
    assert!(took[3] >= Duration::from_millis(300), "{took:?}");
    assert!(c
        .cmd("RCPT TO:<guess6@example.test>")
        .starts_with("550 5.1.1 "));
    assert_eq!(
        c.reply(),
        "421 4.7.0 mx.example.test Error: too many errors"
    );
    assert!(c.closed());
}

#[test]
fn idle_sessions_time_out() {
    let server = TestServer::start_with(&config("timeout = \"1s\"", "timeout = \"1s\"", ""));
    let t = Instant::now();
    let mut c = Client::connect(server.smtp);
    assert!(c.reply().starts_with("220 "));
    assert_eq!(
        c.reply(),
        "421 4.4.2 mx.example.test Error: timeout exceeded"
    );
    assert!(c.closed());
    assert!(t.elapsed() >= Duration::from_secs(1));

    // Inside a transaction too.
    let mut c = Client::connect(server.smtp);
    assert!(c.reply().starts_with("220 "));
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    assert_eq!(c.cmd("MAIL FROM:<carol@elsewhere.test>"), "250 2.1.0 Ok");
    assert_eq!(
        c.reply(),
        "421 4.4.2 mx.example.test Error: timeout exceeded"
    );
    assert!(c.closed());

    let mut p = Client::connect(server.pop3);
    assert!(p.line().starts_with("+OK"));
    assert_eq!(p.line(), "-ERR Disconnected for inactivity.");
    assert!(p.closed());
}

#[test]
fn slow_data_is_cut_off_by_the_minimum_rate() {
    // 2 s to start with, plus 1 s per 1000 octets received; the client
    // sends one octet every 100 ms, far inside the idle timeout each time.
    let server = TestServer::start_with(&config("timeout = \"2s\"\nmin_data_rate = 1000", "", ""));
    // A socket of our own, to poll for the reply with a short timeout.
    let mut tcp = TcpStream::connect(server.smtp).unwrap();
    let mut reader = tcp.try_clone().unwrap();
    reader
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut got = Vec::new();
    let mut read_some = |got: &mut Vec<u8>| -> bool {
        let mut buf = [0u8; 512];
        match reader.read(&mut buf) {
            Ok(0) => false,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                true
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => true,
            Err(_) => false,
        }
    };
    // Taken before DATA is sent, so before the server can start the
    // transfer's clock: the cut-off comes at least 2 s after it. (Taken
    // once the 354 was read, it could be later than the server's start.)
    let before_data = Instant::now();
    tcp.write_all(b"EHLO client.test\r\nMAIL FROM:<carol@elsewhere.test>\r\nRCPT TO:<postmaster@example.test>\r\nDATA\r\n")
        .unwrap();
    let start = Instant::now();
    while !String::from_utf8_lossy(&got).contains("354 ")
        && start.elapsed() < Duration::from_secs(20)
    {
        read_some(&mut got);
    }
    got.clear();
    let mut sent = 0;
    while sent < 200 && !String::from_utf8_lossy(&got).contains("421 ") {
        if tcp.write_all(b"x").is_err() {
            break;
        }
        sent += 1;
        if !read_some(&mut got) {
            break;
        }
    }
    let text = String::from_utf8_lossy(&got).into_owned();
    assert!(
        text.contains("421 4.4.2 mx.example.test Error: timeout exceeded"),
        "after {sent} octets: {text:?}"
    );
    assert!(sent < 200, "the trickle was never cut off");
    assert!(before_data.elapsed() >= Duration::from_secs(2));

    // A burst earns time for the transfer, but never a stall longer than
    // the idle timeout: 20 kB at 1000 B/s would allow 20 s.
    let mut c = Client::connect(server.smtp);
    assert!(c.reply().starts_with("220 "));
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    assert_eq!(c.cmd("MAIL FROM:<carol@elsewhere.test>"), "250 2.1.0 Ok");
    assert_eq!(c.cmd("RCPT TO:<postmaster@example.test>"), "250 2.1.5 Ok");
    assert!(c.cmd("DATA").starts_with("354 "));
    c.send(&b"0123456789abcdefghijklmnopqrstuvwxyz012345678901234567890123456789\r\n".repeat(300));
    let t = Instant::now();
    assert_eq!(
        c.reply(),
        "421 4.4.2 mx.example.test Error: timeout exceeded"
    );
    // Generous: the point is that it is not the 20 s the burst would buy.
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
}

#[test]
fn connection_limits_per_client_and_in_total() {
    let server = TestServer::start_with(&config(
        "max_connections_per_ip = 2\nmax_connections = 3",
        "max_connections_per_ip = 1",
        "",
    ));
    let greet = |c: &mut Client| c.reply();
    let mut a1 = client_from("127.0.0.1", server.smtp);
    assert!(greet(&mut a1).starts_with("220 "));
    let mut a2 = client_from("127.0.0.1", server.smtp);
    assert!(greet(&mut a2).starts_with("220 "));
    // A third from the same address is turned away...
    let mut a3 = client_from("127.0.0.1", server.smtp);
    assert_eq!(
        greet(&mut a3),
        "421 4.7.0 mx.example.test Error: too many connections"
    );
    assert!(a3.closed());
    // ...while another client still gets in, and the first two go on.
    let mut b1 = client_from("127.0.0.2", server.smtp);
    assert!(greet(&mut b1).starts_with("220 "));
    assert_eq!(a1.cmd("NOOP"), "250 2.0.0 Ok");
    // Three in total: a fourth client is refused.
    let mut c1 = client_from("127.0.0.3", server.smtp);
    assert_eq!(
        greet(&mut c1),
        "421 4.7.0 mx.example.test Error: too many connections"
    );
    // Once one leaves, there is room again.
    assert_eq!(a1.cmd("QUIT"), "221 2.0.0 Bye");
    assert!(a1.closed());
    let admitted = wait_until(Duration::from_secs(10), || {
        let mut c = client_from("127.0.0.3", server.smtp);
        greet(&mut c).starts_with("220 ")
    });
    assert!(admitted, "a slot should free up after QUIT");
    assert_eq!(a2.cmd("NOOP"), "250 2.0.0 Ok");
    assert_eq!(b1.cmd("NOOP"), "250 2.0.0 Ok");

    // POP3 has its own limits.
    let mut p1 = client_from("127.0.0.1", server.pop3);
    assert!(p1.line().starts_with("+OK"));
    let mut p2 = client_from("127.0.0.1", server.pop3);
    assert_eq!(p2.line(), "-ERR [SYS/TEMP] Too many connections");
    assert!(p2.closed());
    let mut p3 = client_from("127.0.0.2", server.pop3);
    assert!(p3.line().starts_with("+OK"));
    assert!(p1.pop("QUIT").starts_with("+OK"));
}

/// The `delay_ms` of each failed POP3 login the server logged for a client
/// address, in order.
fn logged_delays(server: &TestServer, ip: &str) -> Vec<u64> {
    server
        .log()
        .lines()
        .filter(|l| l.contains("pop3 login failed") && l.contains(&format!("peer={ip}:")))
        .filter_map(|l| {
            let v = l.split("delay_ms=").nth(1)?;
            v.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
        })
        .collect()
}

fn failed_login(c: &mut Client) -> Duration {
    assert!(c.pop("USER alice@example.test").starts_with("+OK"));
    let t = Instant::now();
    assert_eq!(c.pop("PASS guess"), "-ERR [AUTH] Authentication failed.");
    t.elapsed()
}

#[test]
fn pop3_failed_logins_slow_down_per_client() {
    let server = TestServer::start_with(&config(
        "",
        "auth_failure_delay = \"200ms\"\nmax_auth_failure_delay = \"800ms\"",
        "",
    ));
    server.add_user("alice@example.test", "wonderland");
    let mut a = client_from("127.0.0.1", server.pop3);
    assert!(a.line().starts_with("+OK"));
    let took: Vec<Duration> = (0..4).map(|_| failed_login(&mut a)).collect();
    // Doubling from the configured minimum, up to the maximum (Dovecot);
    // measured lower bounds only.
    for (t, min) in took.iter().zip([200, 400, 800, 800]) {
        assert!(*t >= Duration::from_millis(min), "{took:?}");
    }
    let want = [200, 400, 800, 800];
    assert!(
        wait_until(Duration::from_secs(10), || logged_delays(
            &server,
            "127.0.0.1"
        ) == want),
        "{:?}\n{}",
        logged_delays(&server, "127.0.0.1"),
        server.log()
    );
    // Another client starts from the minimum: the delay is per address.
    let mut b = client_from("127.0.0.2", server.pop3);
    assert!(b.line().starts_with("+OK"));
    assert!(failed_login(&mut b) >= Duration::from_millis(200));
    assert!(wait_until(Duration::from_secs(10), || logged_delays(
        &server,
        "127.0.0.2"
    ) == [200]));
    // A new connection from the first address is still slowed down...
    let mut a2 = client_from("127.0.0.1", server.pop3);
    assert!(a2.line().starts_with("+OK"));
    assert!(failed_login(&mut a2) >= Duration::from_millis(800));
    // ...until it logs in, which forgets its failures.
    assert!(a2.pop("USER alice@example.test").starts_with("+OK"));
    assert_eq!(a2.pop("PASS wonderland"), "+OK Logged in.");
    assert!(a2.pop("QUIT").starts_with("+OK"));
    let mut a3 = client_from("127.0.0.1", server.pop3);
    assert!(a3.line().starts_with("+OK"));
    failed_login(&mut a3);
    assert!(wait_until(Duration::from_secs(10), || logged_delays(
        &server,
        "127.0.0.1"
    ) == [
        200, 400, 800, 800, 800, 200
    ]));
}

/// Relayed output never carries a bare CR or LF, so a smuggling attempt
/// that reaches us cannot turn into two messages at the next hop either.
#[test]
fn relayed_copies_have_only_crlf_line_ends() {
    let ip = unique_loopback();
    let port = free_tcp_port(&[ip]);
    let sink = Sink::start(ip, port, &SinkOptions::default());
    let server = TestServer::start_with(&config(
        "",
        "",
        &format!("relay_networks = [\"127.0.0.0/8\"]\nsmarthost = \"{ip}:{port}\""),
    ));
    let mut c = Client::connect(server.smtp);
    assert!(c.reply().starts_with("220 "));
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    let mut attempt = String::from_utf8(smuggling_attempt(0, b"\n.\n"))
        .unwrap()
        .replace("alice@example.test", "bob@remote.test")
        .into_bytes();
    attempt.truncate(attempt.len() - b"QUIT\r\n".len());
    attempt.extend_from_slice(b"MAIL FROM:<carol@elsewhere.test>\r\nRCPT TO:<bob@remote.test>\r\nDATA\r\nbare\rCR and\nLF\r\n.\r\n");
    c.send(&attempt);
    let replies: Vec<String> = (0..8).map(|_| c.reply()).collect();
    let codes: Vec<&str> = replies.iter().map(|r| &r[..3]).collect();
    assert_eq!(
        codes,
        ["250", "250", "354", "250", "250", "250", "354", "250"],
        "{replies:?}"
    );
    assert!(
        wait_until(Duration::from_secs(30), || sink.messages().len() >= 2),
        "{}",
        server.log()
    );
    let got = sink.messages();
    assert_eq!(got.len(), 2, "two messages sent, two relayed");
    for m in &got {
        assert!(
            only_crlf(&m.content),
            "{:?}",
            String::from_utf8_lossy(&m.content)
        );
        assert_eq!(m.rcpt_tos, ["bob@remote.test"]);
        assert_eq!(m.mail_from, "carol@elsewhere.test");
    }
}

/// SMTP AUTH failures get the same growing per-address delay as POP3
/// logins, and share its count (as Dovecot's delay covers both).
#[test]
fn smtp_auth_failures_slow_down_too() {
    let server = TestServer::start_with(&config(
        "",
        "auth_failure_delay = \"200ms\"\nmax_auth_failure_delay = \"800ms\"",
        "",
    ));
    server.add_user("alice@example.test", "wonderland");
    let mut c = Client::connect(server.smtp);
    assert!(c.reply().starts_with("220 "));
    assert!(c.cmd("EHLO client.test").contains("AUTH PLAIN LOGIN"));
    let mut took = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        // base64("\0alice@example.test\0guess")
        assert_eq!(
            c.cmd("AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABndWVzcw=="),
            "535 5.7.8 Error: authentication failed"
        );
        took.push(t.elapsed());
    }
    for (t, min) in took.iter().zip([200, 400, 800]) {
        assert!(*t >= Duration::from_millis(min), "{took:?}");
    }
    let logged = |needle: &str| -> Vec<u64> {
        server
            .log()
            .lines()
            .filter(|l| l.contains(needle))
            .filter_map(|l| {
                let v = l.split("delay_ms=").nth(1)?;
                v.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
            })
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(10), || logged("smtp auth failed")
            == [200, 400, 800]),
        "{}",
        server.log()
    );
    // The count is per address across protocols: POP3 goes on from there.
    let mut p = Client::connect(server.pop3);
    assert!(p.line().starts_with("+OK"));
    assert!(failed_login(&mut p) >= Duration::from_millis(800));
    // A good login forgets the failures.
    assert_eq!(
        c.cmd("AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdAB3b25kZXJsYW5k"),
        "235 2.7.0 Authentication successful"
    );
    let mut p = Client::connect(server.pop3);
    assert!(p.line().starts_with("+OK"));
    failed_login(&mut p);
    assert!(
        wait_until(Duration::from_secs(10), || logged("pop3 login failed")
            == [800, 200]),
        "{}",
        server.log()
    );
}
