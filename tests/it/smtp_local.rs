//! SMTP in, local mailboxes out: the real server, real clients (lettre,
//! Python's smtplib and poplib, swaks), and raw bytes where a client library
//! would hide what is being tested.

use std::process::Command;
use std::time::Duration;

use lettre::message::Mailbox as LettreMailbox;
use lettre::{Message, SmtpTransport, Transport};

use crate::support::server::{config_text, python, Raw, TestServer};
use crate::support::wait_until;

/// Retrieves every message of a mailbox with poplib, as JSON: a list of
/// {"uidl", "size", "text"} (text is the message with CRLF line ends, as
/// RETR gave it after un-stuffing).
const POP_ALL: &str = r#"
import json, poplib, sys
host, port, user, password = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
p = poplib.POP3(host, port, timeout=20)
p.user(user); p.pass_(password)
out = []
count, _ = p.stat()
for n in range(1, count + 1):
    size = int(p.list(n).split()[2])
    uidl = p.uidl(n).split()[2].decode()
    lines = p.retr(n)[1]
    out.append({"uidl": uidl, "size": size, "text": "\r\n".join(l.decode("utf-8", "replace") for l in lines) + "\r\n"})
p.quit()
print(json.dumps(out))
"#;

#[derive(serde::Deserialize, Debug)]
pub struct Popped {
    pub uidl: String,
    pub size: usize,
    pub text: String,
}

/// All messages of `user` via Python's poplib.
pub fn pop_all(server: &TestServer, user: &str, password: &str) -> Vec<Popped> {
    let out = python(
        POP_ALL,
        &[
            &server.pop3.ip().to_string(),
            &server.pop3.port().to_string(),
            user,
            password,
        ],
    );
    serde_json::from_str(out.trim()).expect("poplib JSON")
}

/// Sends one message with Python's smtplib; returns the 250 text or the error.
fn smtplib_send(server: &TestServer, from: &str, to: &[&str], body: &str) -> String {
    python(
        r#"
import smtplib, sys
host, port, sender, body = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
rcpts = sys.argv[5:]
s = smtplib.SMTP(host, port, timeout=20)
s.ehlo("client.test")
try:
    refused = s.sendmail(sender, rcpts, body.encode())
    print("OK", refused)
except smtplib.SMTPRecipientsRefused as e:
    print("REFUSED", e.recipients)
except smtplib.SMTPResponseException as e:
    print("ERR", e.smtp_code, e.smtp_error.decode())
s.quit()
"#,
        &[
            &server.smtp.ip().to_string(),
            &server.smtp.port().to_string(),
            from,
            body,
        ]
        .into_iter()
        .chain(to.iter().copied())
        .collect::<Vec<_>>(),
    )
}

#[test]
fn lettre_sends_and_poplib_reads_exact_sizes() {
    let server = TestServer::start();
    server.add_user("alice@example.test", "wonderland");
    let email = Message::builder()
        .from(
            "Carol <carol@elsewhere.test>"
                .parse::<LettreMailbox>()
                .unwrap(),
        )
        .to("Alice <alice@example.test>"
            .parse::<LettreMailbox>()
            .unwrap())
        .subject("tea party")
        .body(String::from("Line one\r\n.leading dot\r\nlast line\r\n"))
        .unwrap();
    let mailer = SmtpTransport::builder_dangerous(server.smtp.ip().to_string())
        .port(server.smtp.port())
        .build();
    let response = mailer.send(&email).expect("lettre send");
    assert_eq!(response.code().to_string(), "250");
    let text = response.message().collect::<Vec<_>>().join(" ");
    let id = text.rsplit(' ').next().unwrap().to_owned();
    assert!(text.contains("queued as"), "{text}");

    let msgs = pop_all(&server, "alice@example.test", "wonderland");
    assert_eq!(msgs.len(), 1);
    let m = &msgs[0];
    // LIST's size is exactly what RETR sends, in CRLF form.
    assert_eq!(m.size, m.text.len(), "{m:?}");
    assert!(m.text.starts_with("Return-Path: <carol@elsewhere.test>\r\nDelivered-To: alice@example.test\r\nReceived: from "));
    assert!(
        m.text.contains(&format!("with ESMTP id {id}")),
        "{}",
        m.text
    );
    assert!(m.text.contains("Subject: tea party\r\n"));
    assert!(
        m.text.contains("\r\n.leading dot\r\n"),
        "dot-unstuffed once: {}",
        m.text
    );
    assert!(
        m.uidl.bytes().all(|b| (0x21..=0x7e).contains(&b))
            && !m.uidl.is_empty()
            && m.uidl.len() <= 70
    );
    // The postmaster can follow the message by its id.
    assert!(
        server.wait_for_log(&format!("message accepted id={id}")),
        "{}",
        server.log()
    );
    assert!(server.wait_for_log(&format!("delivered to mailbox id={id}")));
}

#[test]
fn swaks_sends_to_alias_and_postmaster() {
    let server = TestServer::start();
    server.add_user("alice@example.test", "pw");
    server.add_user("postmaster@example.test", "pm");
    let out = server.cli(
        &["alias", "add", "sales@example.test", "alice@example.test"],
        "",
    );
    assert!(out.status.success(), "{out:?}");
    for to in ["sales@example.test", "postmaster@example.test"] {
        let out = Command::new("swaks")
            .args([
                "--server",
                &server.smtp.to_string(),
                "--from",
                "x@y.test",
                "--to",
                to,
            ])
            .args(["--body", "via swaks", "--silent", "2"])
            .output()
            .expect("swaks is installed (.ci/run installs it)");
        assert!(
            out.status.success(),
            "swaks to {to}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let alice = pop_all(&server, "alice@example.test", "pw");
    assert_eq!(alice.len(), 1);
    assert!(alice[0].text.contains("via swaks"));
    assert_eq!(pop_all(&server, "postmaster@example.test", "pm").len(), 1);
}

#[test]
fn unknown_user_is_rejected_at_rcpt() {
    let server = TestServer::start();
    server.add_user("alice@example.test", "pw");
    let out = smtplib_send(
        &server,
        "x@y.test",
        &["nobody@example.test"],
        "Subject: x\r\n\r\nhi\r\n",
    );
    assert!(out.starts_with("REFUSED"), "{out}");
    assert!(out.contains("550") && out.contains("5.1.1"), "{out}");
    // Mixed: the good recipient still gets it.
    let out = smtplib_send(
        &server,
        "x@y.test",
        &["nobody@example.test", "alice@example.test"],
        "Subject: x\r\n\r\nhi\r\n",
    );
    assert!(
        out.starts_with("OK") && out.contains("nobody@example.test"),
        "{out}"
    );
    assert_eq!(pop_all(&server, "alice@example.test", "pw").len(), 1);
}

#[test]
fn unknown_user_bounce_sends_a_dsn_to_the_sender() {
    let server = TestServer::start_with(&config_text("", "", "unknown_user = \"bounce\"", ""));
    server.add_user("bob@example.test", "pw");
    let out = smtplib_send(
        &server,
        "bob@example.test",
        &["nobody@example.test"],
        "Subject: lost\r\n\r\nhello\r\n",
    );
    assert!(out.starts_with("OK {}"), "accepted at RCPT: {out}");
    let mut msgs = Vec::new();
    assert!(wait_until(Duration::from_secs(20), || {
        msgs = pop_all(&server, "bob@example.test", "pw");
        !msgs.is_empty()
    }));
    let dsn = &msgs[0].text;
    assert!(
        dsn.starts_with("Return-Path: <>\r\n"),
        "envelope sender <>: {dsn}"
    );
    assert!(dsn.contains("From: MAILER-DAEMON@mx.example.test"), "{dsn}");
    assert!(
        dsn.contains("multipart/report; report-type=delivery-status"),
        "{dsn}"
    );
    assert!(
        dsn.contains(
            "Final-Recipient: rfc822; nobody@example.test\r\nAction: failed\r\nStatus: 5.1.1"
        ),
        "{dsn}"
    );
    assert!(dsn.contains("user unknown"), "{dsn}");
    assert!(dsn.contains("Subject: lost"), "original attached: {dsn}");

    // A message from <> is never bounced.
    let out = smtplib_send(
        &server,
        "",
        &["nobody@example.test"],
        "Subject: from null\r\n\r\nx\r\n",
    );
    assert!(out.starts_with("OK"), "{out}");
    assert!(
        server.wait_for_log("not bouncing a message from <>"),
        "{}",
        server.log()
    );
    assert_eq!(pop_all(&server, "bob@example.test", "pw").len(), 1);
}

#[test]
fn unknown_user_postmaster_redirects_with_original_recipient() {
    let server = TestServer::start_with(&config_text("", "", "unknown_user = \"postmaster\"", ""));
    server.add_user("postmaster@example.test", "pm");
    let out = smtplib_send(
        &server,
        "x@y.test",
        &["Nobody@Example.test"],
        "Subject: stray\r\n\r\nhi\r\n",
    );
    assert!(out.starts_with("OK {}"), "{out}");
    let msgs = pop_all(&server, "postmaster@example.test", "pm");
    assert_eq!(msgs.len(), 1);
    assert!(
        msgs[0]
            .text
            .contains("X-Original-To: nobody@example.test\r\n"),
        "{}",
        msgs[0].text
    );
    assert!(msgs[0].text.contains("Subject: stray"));
}

#[test]
fn relay_is_refused_outside_relay_networks() {
    let server = TestServer::start_with(&config_text("", "", "relay_networks = []", ""));
    let mut c = Raw::connect(server.smtp);
    assert!(c.reply().starts_with("220 "));
    c.cmd("EHLO client.test");
    assert!(c.cmd("MAIL FROM:<a@b.test>").starts_with("250"));
    let r = c.cmd("RCPT TO:<victim@elsewhere.test>");
    assert!(
        r.starts_with("554 5.7.1 <victim@elsewhere.test>: Relay access denied"),
        "{r}"
    );
    // A local recipient is still fine.
    assert!(c
        .cmd("RCPT TO:<postmaster@example.test>")
        .starts_with("250 2.1.5"));
    assert!(c.cmd("QUIT").starts_with("221"));
}

#[test]
fn pipelined_commands_get_replies_in_order() {
    let server = TestServer::start();
    server.add_user("alice@example.test", "pw");
    let mut c = Raw::connect(server.smtp);
    c.reply();
    let ehlo = c.cmd("EHLO client.test");
    for ext in [
        "PIPELINING",
        "SIZE 10240000",
        "8BITMIME",
        "ENHANCEDSTATUSCODES",
    ] {
        assert!(
            ehlo.contains(&format!("250-{ext}")) || ehlo.contains(&format!("250 {ext}")),
            "{ext}: {ehlo}"
        );
    }
    // Two whole transactions in one write.
    c.send(
        b"MAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.test>\r\nRCPT TO:<nobody@example.test>\r\nDATA\r\nSubject: one\r\n\r\n1\r\n.\r\n\
          MAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nSubject: two\r\n\r\n2\r\n.\r\nQUIT\r\n",
    );
    let replies: Vec<String> = (0..10).map(|_| c.reply()).collect();
    let codes: Vec<&str> = replies.iter().map(|r| &r[..3]).collect();
    assert_eq!(
        codes,
        ["250", "250", "550", "354", "250", "250", "250", "354", "250", "221"],
        "{replies:?}"
    );
    let msgs = pop_all(&server, "alice@example.test", "pw");
    assert_eq!(msgs.len(), 2);
    assert!(msgs[0].text.contains("Subject: one") && msgs[1].text.contains("Subject: two"));
}

#[test]
fn size_limits_at_mail_and_in_data() {
    let server = TestServer::start_with(&config_text("", "max_message_size = 2000", "", ""));
    server.add_user("alice@example.test", "pw");
    let mut c = Raw::connect(server.smtp);
    c.reply();
    assert!(c.cmd("EHLO c").contains("SIZE 2000"));
    assert!(c
        .cmd("MAIL FROM:<a@b.test> SIZE=5000")
        .starts_with("552 5.3.4"));
    assert!(c.cmd("MAIL FROM:<a@b.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<alice@example.test>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    let big = "x".repeat(100);
    for _ in 0..50 {
        c.send(format!("{big}\r\n").as_bytes());
    }
    let r = c.cmd(".");
    assert!(r.starts_with("552 5.3.4"), "drained, then refused: {r}");
    // The session goes on.
    assert!(c.cmd("NOOP").starts_with("250"));
    assert!(pop_all(&server, "alice@example.test", "pw").is_empty());
}

#[test]
fn only_crlf_dot_crlf_ends_data_and_dots_are_unstuffed() {
    let server = TestServer::start();
    server.add_user("alice@example.test", "pw");
    let mut c = Raw::connect(server.smtp);
    c.reply();
    c.cmd("HELO c");
    c.cmd("MAIL FROM:<a@b.test>");
    c.cmd("RCPT TO:<alice@example.test>");
    assert!(c.cmd("DATA").starts_with("354"));
    // LF.LF and a bare LF are content (normalised), not the end.
    c.send(b"Subject: smuggle\r\n\r\nfirst\n.\nMAIL FROM:<evil@x.test>\r\n..stuffed\r\n.\r\n");
    let r = c.reply();
    assert!(r.starts_with("250 2.0.0"), "{r}");
    assert!(c.cmd("QUIT").starts_with("221"));
    let msgs = pop_all(&server, "alice@example.test", "pw");
    assert_eq!(msgs.len(), 1, "one DATA, one message");
    let text = &msgs[0].text;
    // The bare LFs became CRLF (so the lone dot became an ordinary, unstuffed
    // line), and the "MAIL FROM" stayed content.
    assert!(
        text.ends_with("\r\n\r\nfirst\r\n\r\nMAIL FROM:<evil@x.test>\r\n.stuffed\r\n"),
        "{text:?}"
    );
}

#[test]
fn bad_input_gets_replies_and_other_sessions_go_on() {
    let server = TestServer::start();
    server.add_user("alice@example.test", "pw");
    let mut bystander = Raw::connect(server.smtp);
    bystander.reply();
    bystander.cmd("EHLO bystander");

    let mut c = Raw::connect(server.smtp);
    c.reply();
    assert!(c.cmd("FOO bar").starts_with("502 5.5.2"));
    assert!(c
        .cmd("RCPT TO:<alice@example.test>")
        .starts_with("503 5.5.1"));
    assert!(
        c.cmd("MAIL FROM:<a@b.test>").starts_with("503 5.5.1"),
        "HELO first"
    );
    assert!(c.cmd("HELO c").starts_with("250"));
    assert!(c.cmd("MAIL FROM:<not an address>").starts_with("501 5.1.7"));
    assert!(c.cmd("MAIL FROM:<a@b.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<@@>").starts_with("501 5.1.3"));
    assert!(c.cmd("DATA").starts_with("503 5.5.1"), "no valid RCPT yet");
    assert!(
        c.cmd(&format!("NOOP {}", "x".repeat(5000)))
            .starts_with("500 5.5.0"),
        "overlong line"
    );
    assert!(c.cmd("VRFY alice").starts_with("252"));
    assert!(c.cmd("HELP").starts_with("214"));
    c.send(b"\x00\xff\xfe garbage\r\n");
    assert!(c.reply().starts_with("500"));
    assert!(c.cmd("RSET").starts_with("250"));
    assert!(c.cmd("QUIT").starts_with("221"));

    // Early disconnects: in the middle of a command, and in DATA.
    let mut d = Raw::connect(server.smtp);
    d.reply();
    d.send(b"EHLO half-a-comm");
    drop(d);
    let mut e = Raw::connect(server.smtp);
    e.reply();
    e.cmd("HELO c");
    e.cmd("MAIL FROM:<a@b.test>");
    e.cmd("RCPT TO:<alice@example.test>");
    e.cmd("DATA");
    e.send(b"Subject: never finished\r\n\r\npartial");
    drop(e);

    // The bystander's session was never disturbed.
    assert!(bystander.cmd("MAIL FROM:<a@b.test>").starts_with("250"));
    assert!(bystander
        .cmd("RCPT TO:<alice@example.test>")
        .starts_with("250"));
    assert!(bystander.cmd("DATA").starts_with("354"));
    assert!(bystander
        .cmd("Subject: fine\r\n\r\nok\r\n.")
        .starts_with("250"));
    let msgs = pop_all(&server, "alice@example.test", "pw");
    assert_eq!(msgs.len(), 1, "the half-sent message was not delivered");
    assert!(msgs[0].text.contains("Subject: fine"));
}

#[test]
fn too_many_errors_close_the_session() {
    let server = TestServer::start_with(&config_text(
        "",
        "soft_error_limit = 2\nhard_error_limit = 4\nerror_delay = \"10ms\"",
        "",
        "",
    ));
    let mut c = Raw::connect(server.smtp);
    c.reply();
    for _ in 0..3 {
        assert!(c.cmd("BOGUS").starts_with("502"));
    }
    let last = c.cmd("BOGUS");
    assert!(last.starts_with("421 4.7.0"), "{last}");
    assert!(c.closed());
}

#[test]
fn postmaster_is_always_accepted() {
    let server = TestServer::start();
    let mut c = Raw::connect(server.smtp);
    c.reply();
    c.cmd("HELO c");
    c.cmd("MAIL FROM:<a@b.test>");
    assert!(c
        .cmd("RCPT TO:<postmaster@example.test>")
        .starts_with("250"));
    assert!(
        c.cmd("RCPT TO:<Postmaster>").starts_with("250"),
        "RFC 5321 4.1.1.3"
    );
}
