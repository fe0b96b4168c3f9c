//! Hostile clients, byte for byte, and what reaches the log: an overlong
//! SASL response must end the AUTH exchange (issue 15), a name the client
//! chose must not forge log lines (issue 15), and no password, AUTH payload
//! or hash is logged at any level (issue 9, point 10).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;

use crate::support::server::{config_text, Raw, TestServer};
use crate::support::wait_until;

const ALICE: &str = "alice@example.test";

fn b64(bytes: impl AsRef<[u8]>) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The RFC 4616 PLAIN token for `user` and `password`, base64-encoded.
fn plain(user: &str, password: &str) -> String {
    b64(format!("\0{user}\0{password}"))
}

/// Sends one POP3 line and returns the one-line reply.
fn pop(c: &mut Raw, line: &[u8]) -> String {
    c.send(line);
    c.send(b"\r\n");
    c.line()
}

/// A POP3 connection past its greeting.
fn pop3(server: &TestServer) -> Raw {
    let mut c = Raw::connect(server.pop3);
    assert!(c.line().starts_with("+OK"));
    c
}

/// An SMTP connection past EHLO.
fn smtp(server: &TestServer) -> Raw {
    let mut c = Raw::connect(server.smtp);
    assert!(c.reply().starts_with("220 "));
    assert!(c.cmd("EHLO client.test").contains("AUTH PLAIN LOGIN"));
    c
}

/// How many log lines contain `needle`.
fn count(server: &TestServer, needle: &str) -> usize {
    server.log().lines().filter(|l| l.contains(needle)).count()
}

/// Waits (bounded) until `needle` was logged at least `n` times.
fn wait_count(server: &TestServer, needle: &str, n: usize) {
    assert!(
        wait_until(Duration::from_secs(20), || count(server, needle) >= n),
        "expected {n} × {needle:?} in the log:\n{}",
        server.log()
    );
}

/// Issue 15, point 1: `AUTH LOGIN` (or `AUTH PLAIN` with an empty initial
/// response), then a response line over `smtp.max_line_length`. Before the
/// fix postino answered `500 5.5.0` but stayed in the exchange, so the
/// client's next `NOOP` became the user name and the one after it a failed
/// login. Now the exchange ends with `500 5.5.6` and commands are commands
/// again; no login attempt is counted. POP3's `AUTH PLAIN` does the same.
#[test]
fn overlong_sasl_response_ends_the_auth_exchange() {
    let server = TestServer::start();
    server.add_user(ALICE, "wonderland");
    // Over the default 2048-octet line limit, and base64 all the same.
    let long = "QUFB".repeat(1000);

    let mut c = smtp(&server);
    let login_with_user = format!("AUTH LOGIN {}", b64(ALICE));
    let openings: [&[&str]; 4] = [
        &["AUTH LOGIN"],
        &["AUTH PLAIN"],
        // The password is the overlong line.
        &["AUTH LOGIN", &b64(ALICE)],
        &[&login_with_user],
    ];
    for opening in openings {
        for line in opening {
            let reply = c.cmd(line);
            assert!(reply.starts_with("334 "), "{opening:?}: {reply}");
        }
        assert_eq!(
            c.cmd(&long),
            "500 5.5.6 SASL response limit exceeded",
            "{opening:?}"
        );
        assert_eq!(c.cmd("NOOP"), "250 2.0.0 Ok", "{opening:?}");
        assert_eq!(c.cmd("NOOP"), "250 2.0.0 Ok", "{opening:?}");
    }
    // Nothing was left half-done: a good login goes through at once.
    assert_eq!(
        c.cmd(&format!("AUTH PLAIN {}", plain(ALICE, "wonderland"))),
        "235 2.7.0 Authentication successful"
    );

    // POP3: over the 8192-octet SASL line limit.
    let mut p = pop3(&server);
    assert_eq!(pop(&mut p, b"AUTH PLAIN"), "+ ");
    let reply = pop(&mut p, "QUFB".repeat(3000).as_bytes());
    assert!(
        reply.starts_with("-ERR") && reply.contains("too long"),
        "{reply}"
    );
    assert_eq!(pop(&mut p, b"USER alice@example.test"), "+OK");
    assert_eq!(pop(&mut p, b"PASS wonderland"), "+OK Logged in.");

    wait_count(&server, "smtp auth ok", 1);
    wait_count(&server, "pop3 login", 1);
    let log = server.log();
    assert!(!log.contains("smtp auth failed"), "{log}");
    assert!(!log.contains("pop3 login failed"), "{log}");
}

/// A whole log line, forged: what a client would like a log reader to see.
const FORGED: &str = "2026-12-01T00:00:00.000000Z  INFO pop3{peer=10.9.8.7:1}: postino::pop3: pop3 login failed user=root result=BadCredentials delay_ms=0";

/// Issue 15, point 2: names from the client (POP3 `USER`, SASL user names
/// over POP3 and SMTP, HELO, MAIL FROM) are logged escaped, so each log
/// record stays one line and names the peer that really sent it.
#[test]
fn client_chosen_names_cannot_forge_log_lines() {
    // The default test log level (postino at debug) logs SMTP commands,
    // logins, failed logins and accepted mail.
    let server = TestServer::start();
    server.add_user(ALICE, "wonderland");
    let mut peers = HashSet::new();

    let mut p = pop3(&server);
    peers.insert(p.local_addr());
    // A POP3 line cannot hold a LF, but a CR and a NUL pass.
    assert_eq!(
        pop(&mut p, format!("USER mallory\r{FORGED}\0").as_bytes()),
        "+OK"
    );
    assert!(pop(&mut p, b"PASS guess").starts_with("-ERR"));
    // In SASL the user name is base64: any octet goes.
    let token = b64(format!("\0mallory\n{FORGED}\0guess"));
    assert!(pop(&mut p, format!("AUTH PLAIN {token}").as_bytes()).starts_with("-ERR"));
    assert_eq!(pop(&mut p, b"AUTH PLAIN"), "+ ");
    assert!(pop(&mut p, token.as_bytes()).starts_with("-ERR"));

    let mut c = smtp(&server);
    peers.insert(c.local_addr());
    assert!(c.cmd(&format!("AUTH PLAIN {token}")).starts_with("535 "));
    assert!(c.cmd("AUTH LOGIN").starts_with("334 "));
    assert!(c
        .cmd(&b64(format!("mallory\n{FORGED}\r\0")))
        .starts_with("334 "));
    assert!(c.cmd(&b64("guess")).starts_with("535 "));
    // Commands cannot hold ASCII controls (refused, not logged), but UTF-8
    // line separators and C1 controls pass the parser.
    assert!(c.cmd("HELO mallory\0").starts_with("500 "));
    assert!(c
        .cmd(&format!("EHLO mallory\u{2028}{FORGED}\u{85}"))
        .starts_with("250"));
    assert_eq!(
        c.cmd("MAIL FROM:<mallory\u{2028}x@example.test> SMTPUTF8"),
        "250 2.1.0 Ok"
    );
    assert_eq!(c.cmd("RCPT TO:<alice@example.test>"), "250 2.1.5 Ok");
    assert!(c.cmd("DATA").starts_with("354"));
    assert!(c
        .cmd("Subject: hi\r\n\r\nhello\r\n.")
        .starts_with("250 2.0.0"));

    wait_count(&server, "pop3 login failed", 3);
    wait_count(&server, "smtp auth failed", 2);
    wait_count(&server, "message accepted", 1);
    let log = server.log();
    for line in log.split('\n') {
        assert!(
            !line
                .chars()
                .any(|c| c.is_control() || c == '\u{2028}' || c == '\u{2029}'),
            "a control character or line separator in the log line {line:?}\n{log}"
        );
        // The connection span names the peer; a line naming another one
        // was forged. Logins name theirs.
        let login = ["pop3 login", "smtp auth", "command=", "message accepted"]
            .iter()
            .any(|what| line.contains(what));
        assert!(
            !login || line.contains("{peer="),
            "no peer in {line:?}\n{log}"
        );
        if let Some(at) = line.find("peer=") {
            let rest = &line[at + "peer=".len()..];
            let end = rest.find(['}', ' ', ',']).unwrap_or(rest.len());
            let peer: SocketAddr = rest[..end].parse().expect("peer address");
            assert!(
                peers.contains(&peer),
                "a log line names a peer that never connected: {line:?}\n{log}"
            );
        }
    }
    // And the names are there, escaped, for the postmaster to read (login
    // names lower-cased, as they are looked up).
    for escaped in [
        "user=mallory\\x0d2026-12-01t00:00:00.000000z  info pop3{peer=10.9.8.7:1}",
        "pop3 login failed result=BadCredentials user=mallory\\x0d2026",
        "user=mallory\\x0a2026-12-01t00:00:00.000000z",
        "smtp auth failed mechanism=PLAIN user=mallory\\x0a2026-12-01t00:00:00.000000z",
        "smtp auth failed mechanism=LOGIN user=mallory\\x0a2026-12-01t00:00:00.000000z  info pop3{peer=10.9.8.7:1}: postino::pop3: pop3 login failed user=root result=badcredentials delay_ms=0\\x0d\\x00 delay_ms=",
        "command=EHLO mallory\\u{2028}2026-12-01T00:00:00",
        "from=<mallory\\u{2028}x@example.test>",
    ] {
        assert!(log.contains(escaped), "{escaped:?} not in the log:\n{log}");
    }
}

/// Issue 9, point 10: with everything logged (`RUST_LOG=trace`), no
/// password, no AUTH payload and no password hash appears in the log, for
/// SMTP AUTH PLAIN and LOGIN, POP3 USER/PASS and AUTH PLAIN, and
/// `postino user add` / `user passwd` against the running server (through
/// its control socket).
#[test]
fn no_password_or_auth_payload_reaches_the_log() {
    const FIRST: &str = "Tr0ub4dor&3-first";
    const SECOND: &str = "c0rrect-h0rse-second";
    const WRONG: &str = "wr0ng-guess-third";
    let server = TestServer::start_logging(&config_text("", "", "", ""), "trace");
    let mut outputs = Vec::new();
    for (args, password) in [
        (["user", "add", ALICE], FIRST),
        (["user", "passwd", ALICE], SECOND),
    ] {
        let out = server.cli(&args, &format!("{password}\n"));
        assert!(out.status.success(), "{args:?}: {out:?}");
        outputs.push(out);
    }

    // SMTP AUTH PLAIN with an initial response, wrong and right.
    let mut c = smtp(&server);
    assert!(c
        .cmd(&format!("AUTH PLAIN {}", plain(ALICE, WRONG)))
        .starts_with("535 "));
    assert!(c
        .cmd(&format!("AUTH PLAIN {}", plain(ALICE, SECOND)))
        .starts_with("235 "));
    // AUTH PLAIN as a continuation.
    let mut c = smtp(&server);
    assert!(c.cmd("AUTH PLAIN").starts_with("334 "));
    assert!(c.cmd(&plain(ALICE, SECOND)).starts_with("235 "));
    // AUTH LOGIN, with the user name as initial response and without.
    let mut c = smtp(&server);
    assert!(c
        .cmd(&format!("AUTH LOGIN {}", b64(ALICE)))
        .starts_with("334 "));
    assert!(c.cmd(&b64(WRONG)).starts_with("535 "));
    assert!(c.cmd("AUTH LOGIN").starts_with("334 "));
    assert!(c.cmd(&b64(ALICE)).starts_with("334 "));
    assert!(c.cmd(&b64(SECOND)).starts_with("235 "));
    // A client that goes on after the server ended the exchange (here: an
    // overlong user name) sends its password as a command line.
    let mut c = smtp(&server);
    assert!(c.cmd("AUTH LOGIN").starts_with("334 "));
    assert!(c.cmd(&"QUFB".repeat(1000)).starts_with("500 5.5.6"));
    assert!(c.cmd(&b64(WRONG)).starts_with("502 "));

    // POP3 USER/PASS, wrong and right, then AUTH PLAIN both ways.
    let mut p = pop3(&server);
    assert_eq!(pop(&mut p, format!("USER {ALICE}").as_bytes()), "+OK");
    assert!(pop(&mut p, format!("PASS {WRONG}").as_bytes()).starts_with("-ERR"));
    assert_eq!(pop(&mut p, format!("USER {ALICE}").as_bytes()), "+OK");
    assert_eq!(
        pop(&mut p, format!("PASS {SECOND}").as_bytes()),
        "+OK Logged in."
    );
    assert!(pop(&mut p, b"QUIT").starts_with("+OK"));
    let mut p = pop3(&server);
    assert_eq!(
        pop(
            &mut p,
            format!("AUTH PLAIN {}", plain(ALICE, SECOND)).as_bytes()
        ),
        "+OK Logged in."
    );
    assert!(pop(&mut p, b"QUIT").starts_with("+OK"));
    let mut p = pop3(&server);
    assert_eq!(pop(&mut p, b"AUTH PLAIN"), "+ ");
    assert_eq!(
        pop(&mut p, plain(ALICE, SECOND).as_bytes()),
        "+OK Logged in."
    );
    assert!(pop(&mut p, b"QUIT").starts_with("+OK"));

    wait_count(&server, "smtp auth ok", 3);
    wait_count(&server, "smtp auth failed", 2);
    wait_count(&server, "pop3 login user=", 3);
    wait_count(&server, "pop3 login failed", 1);
    let log = server.log();
    // Debug records are there, or this test proves nothing (at trace level
    // only sled writes more, and its trace records, which dump stored
    // values, are dropped: `postino::sled_trace`).
    assert!(log.contains(" DEBUG "), "no debug records:\n{log}");
    assert!(log.contains("control request"), "{log}");
    assert!(log.contains("command=AUTH PLAIN"), "{log}");
    // sled's trace records show stored values as Debug byte lists.
    let bytes = |s: &str| {
        s.bytes()
            .map(|b| b.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut secrets = vec!["$argon2".to_owned(), bytes("$argon2")];
    for password in [FIRST, SECOND, WRONG] {
        secrets.push(password.to_owned());
        secrets.push(bytes(password));
        secrets.push(b64(password));
        secrets.push(plain(ALICE, password));
        secrets.push(b64(format!("{ALICE}\0{password}")));
    }
    secrets.push(b64(ALICE));
    for secret in &secrets {
        assert!(
            !log.contains(secret.as_str()),
            "{secret:?} is in the log:\n{}",
            log.lines()
                .filter(|l| l.contains(secret.as_str()))
                .collect::<Vec<_>>()
                .join("\n")
        );
        for out in &outputs {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(!text.contains(secret.as_str()), "{secret:?} in CLI output");
        }
    }
}
