//! CHUNKING (RFC 3030) both ways with real servers: `BDAT` framing into the
//! real server as raw bytes (no client library here sends BDAT; swaks
//! 20201014 and smtplib do not, nor does Postfix's smtp client), and
//! relaying to servers that offer CHUNKING and log the commands they got:
//! another postino, and Postfix's smtpd.

use std::net::Ipv4Addr;
use std::time::Duration;

use crate::delivery::{relay_config, wait_line, wait_messages};
use crate::smtp_local::pop_all;
use crate::support::mx::{Sink, SinkOptions};
use crate::support::postfix::Postfix;
use crate::support::server::{config_text, Raw, TestServer};
use crate::support::{free_tcp_port, unique_loopback, wait_until};

/// Content that DATA would have to dot-stuff: lines that are only a dot,
/// start with dots, or look like commands. (With `Date:` and `Message-ID:`,
/// which Postfix would otherwise add.)
const TRICKY: &str = "From: <alice@example.test>\r\nTo: <bob@dest.test>\r\nSubject: chunks\r\nDate: Tue, 01 Dec 2026 12:00:00 +0000\r\nMessage-ID: <chunks@example.test>\r\n\r\n.\r\n..\r\n.leading dot\r\nQUIT\r\nBDAT 5 LAST\r\n\r\nend\r\n";

/// The receiving server for relay tests: local domain `dest.test` with
/// user `bob@dest.test` (password `pw`).
fn receiver() -> TestServer {
    let config = config_text("", "", "", "").replace(
        r#"local_domains = ["example.test"]"#,
        r#"local_domains = ["dest.test"]"#,
    );
    let server = TestServer::start_with(&config);
    server.add_user("bob@dest.test", "pw");
    server
}

/// The message as the client sent it: what POP3 gave, less the trace
/// headers the servers prepended (`Return-Path:`, `Delivered-To:`, and a
/// `Received:` per server, folded).
fn as_sent(text: &str) -> &str {
    let mut rest = text;
    while ["Return-Path: ", "Delivered-To: ", "Received: "]
        .iter()
        .any(|h| rest.starts_with(h))
    {
        let mut end = rest.find("\r\n").expect("header line") + 2;
        while rest[end..].starts_with('\t') {
            end += rest[end..].find("\r\n").expect("folded line") + 2;
        }
        rest = &rest[end..];
    }
    rest
}

fn envelope(c: &mut Raw) {
    assert!(c.reply().starts_with("220"));
    let ehlo = c.cmd("EHLO client.test");
    assert!(
        ehlo.lines()
            .any(|l| l == "250-CHUNKING" || l == "250 CHUNKING"),
        "{ehlo}"
    );
    assert!(!ehlo.contains("BINARYMIME"), "{ehlo}");
    assert!(c
        .cmd("MAIL FROM:<carol@client.test>")
        .starts_with("250 2.1.0"));
    assert!(c
        .cmd("RCPT TO:<alice@example.test>")
        .starts_with("250 2.1.5"));
}

/// BDAT into the real server: chunks pipelined with each other and with
/// the next command, a CRLF split between chunks, dots and command-like
/// lines kept as they are; the 250 to LAST comes once the message is
/// stored, and POP3 gives back exactly what was sent.
#[test]
fn bdat_in_is_stored_byte_exact() {
    let server = TestServer::start();
    server.add_user("alice@example.test", "pw");
    let mut c = Raw::connect(server.smtp);
    envelope(&mut c);
    let body = TRICKY.as_bytes();
    // Three chunks: the first ends between the CR and the LF of a line,
    // the last is the final octet.
    let cut = TRICKY.find("QUIT\r\n").unwrap() + 5;
    let (a, rest) = body.split_at(cut);
    let (b, last) = rest.split_at(rest.len() - 1);
    assert!(a.ends_with(b"\r") && b.starts_with(b"\n"));
    let mut wire = format!("BDAT {}\r\n", a.len()).into_bytes();
    wire.extend_from_slice(a);
    wire.extend_from_slice(format!("BDAT {}\r\n", b.len()).as_bytes());
    wire.extend_from_slice(b);
    // The last chunk's command and octets in two writes.
    c.send(&wire);
    c.send(format!("BDAT {} LAST\r\n", last.len()).as_bytes());
    c.send(&[last, b"NOOP\r\n"].concat());
    assert_eq!(
        c.reply(),
        format!("250 2.0.0 Ok: {} octets received", a.len())
    );
    assert_eq!(
        c.reply(),
        format!("250 2.0.0 Ok: {} octets received", a.len() + b.len())
    );
    let queued = c.reply();
    assert!(queued.starts_with("250 2.0.0 Ok: queued as "), "{queued}");
    assert!(
        c.reply().starts_with("250"),
        "NOOP after the chunks: in step"
    );
    c.cmd("QUIT");

    let got = pop_all(&server, "alice@example.test", "pw");
    assert_eq!(got.len(), 1);
    assert_eq!(as_sent(&got[0].text), TRICKY);
    assert_eq!(got[0].size, got[0].text.len());
    let line = wait_line(&server, &["disconnect from", "bdat=3"]);
    assert!(!line.contains("data="), "{line}");
}

/// The refusals a client can meet, each leaving the session in step: a
/// chunk without MAIL is read and not executed, a message over
/// `max_message_size` across chunks is refused at the chunk that crosses
/// it (and at those pipelined behind it), DATA cannot join a BDAT
/// transaction, RSET forgets chunks, `BDAT 0 LAST` is an empty message.
#[test]
fn bdat_refusals_keep_the_session_in_step() {
    let server = TestServer::start_with(&config_text("", "max_message_size = 100", "", ""));
    server.add_user("alice@example.test", "pw");
    let mut c = Raw::connect(server.smtp);
    assert!(c.reply().starts_with("220"));
    assert!(c.cmd("EHLO client.test").contains("CHUNKING"));
    // Without MAIL: refused, and the chunk that reads "QUIT" is not a QUIT.
    c.send(b"BDAT 6\r\nQUIT\r\nNOOP\r\n");
    assert!(c.reply().starts_with("503 5.5.1"));
    assert!(c.reply().starts_with("250 2.0.0"));

    assert!(c.cmd("MAIL FROM:<carol@client.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<alice@example.test>").starts_with("250"));
    let sixty = "x".repeat(58) + "\r\n";
    c.send(
        format!("BDAT 60\r\n{sixty}BDAT 60\r\n{sixty}BDAT 60 LAST\r\n{sixty}NOOP\r\n").as_bytes(),
    );
    assert!(c.reply().starts_with("250 2.0.0 Ok: 60 octets"));
    assert!(c.reply().starts_with("552 5.3.4"));
    assert!(c.reply().starts_with("552 5.3.4"));
    assert!(c.reply().starts_with("250 2.0.0"), "NOOP in step");

    // DATA after BDAT: refused; RSET then forgets the first chunk.
    assert!(c.cmd("MAIL FROM:<carol@client.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<alice@example.test>").starts_with("250"));
    c.send(b"BDAT 9\r\nforgotten");
    assert!(c.reply().starts_with("250 2.0.0"));
    assert!(c.cmd("DATA").starts_with("503 5.5.1"));
    assert!(c.cmd("RSET").starts_with("250"));
    assert!(c.cmd("MAIL FROM:<carol@client.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<alice@example.test>").starts_with("250"));
    c.send(b"BDAT 6\r\nkept\r\nBDAT 0 LAST\r\n");
    assert!(c.reply().starts_with("250 2.0.0"));
    assert!(c.reply().starts_with("250 2.0.0 Ok: queued as "));

    // An empty message.
    assert!(c.cmd("MAIL FROM:<carol@client.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<alice@example.test>").starts_with("250"));
    assert!(c.cmd("BDAT 0 LAST").starts_with("250 2.0.0 Ok: queued as "));
    c.cmd("QUIT");

    let got = pop_all(&server, "alice@example.test", "pw");
    assert_eq!(got.len(), 2, "the two messages that were accepted");
    assert_eq!(as_sent(&got[0].text), "kept\r\n");
    assert_eq!(as_sent(&got[1].text), "");
    wait_line(&server, &["NOQUEUE: reject: BDAT", "552 5.3.4"]);
}

/// Relaying to a server that offers CHUNKING: the message goes with BDAT
/// (the receiver counts `bdat=1` and no DATA), arrives byte-exact, and a
/// recipient the receiver refuses bounces alone with its own reply. With
/// `delivery.chunking = false` the same message goes with DATA.
#[test]
fn relay_sends_with_bdat_when_offered_and_data_when_off() {
    for chunking in [true, false] {
        let dest = receiver();
        let relay = TestServer::start_with(&relay_config(
            None,
            1,
            &format!("retry = [\"1s\"]\nchunking = {chunking}"),
            &format!("smarthost = \"{}\"", dest.smtp),
        ));
        relay.add_user("alice@example.test", "pw");
        let mut c = Raw::connect(relay.smtp);
        assert!(c.reply().starts_with("220"));
        assert!(c.cmd("EHLO client.test").starts_with("250"));
        assert!(c.cmd("MAIL FROM:<alice@example.test>").starts_with("250"));
        assert!(c.cmd("RCPT TO:<bob@dest.test>").starts_with("250"));
        assert!(c.cmd("RCPT TO:<nobody@dest.test>").starts_with("250"));
        assert!(c.cmd("DATA").starts_with("354"));
        // DATA stuffs the dots; the relay stores them unstuffed.
        let stuffed = TRICKY.replace("\r\n.", "\r\n..");
        let r = c.cmd(&format!("{stuffed}."));
        assert!(r.starts_with("250 2.0.0 Ok: queued as "), "{r}");
        c.cmd("QUIT");
        let id = r.rsplit(' ').next().unwrap().to_owned();

        let sent = wait_line(
            &relay,
            &[&format!("id={id}"), "status=sent", "to=bob@dest.test"],
        );
        assert!(sent.contains("250 2.0.0 Ok: queued as"), "{sent}");
        let bounced = wait_line(
            &relay,
            &[&format!("id={id}"), "status=bounced", "to=nobody@dest.test"],
        );
        assert!(bounced.contains("550 5.1.1"), "{bounced}");

        let got = pop_all(&dest, "bob@dest.test", "pw");
        assert_eq!(got.len(), 1, "chunking = {chunking}");
        assert_eq!(as_sent(&got[0].text), TRICKY, "chunking = {chunking}");
        let summary = wait_line(&dest, &["disconnect from", "mail=1", "rcpt=1/2"]);
        if chunking {
            assert!(
                summary.contains("bdat=1") && !summary.contains("data="),
                "{summary}"
            );
        } else {
            assert!(
                summary.contains("data=1") && !summary.contains("bdat="),
                "{summary}"
            );
        }
    }
}

/// The same relay to Postfix's smtpd, a CHUNKING server nobody here
/// wrote: it logs `bdat=1` for postino's session and passes the message
/// on (with DATA, Postfix's client has no BDAT) to aiosmtpd, where it
/// arrives byte-exact.
#[test]
fn relay_to_postfix_uses_bdat() {
    let sink_ip = unique_loopback();
    let sink_port = free_tcp_port(&[sink_ip]);
    let sink = Sink::start(sink_ip, sink_port, &SinkOptions::default());
    let pf_port = free_tcp_port(&[Ipv4Addr::LOCALHOST]);
    let Some(postfix) = Postfix::start(pf_port, &["dest.test"], sink.addr) else {
        return;
    };
    let relay = TestServer::start_with(&relay_config(
        None,
        1,
        "retry = [\"1s\"]",
        &format!("smarthost = \"{}\"", postfix.addr),
    ));
    let mut c = Raw::connect(relay.smtp);
    assert!(c.reply().starts_with("220"));
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    assert!(c.cmd("MAIL FROM:<alice@example.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<bob@dest.test>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    let r = c.cmd(&format!("{}.", TRICKY.replace("\r\n.", "\r\n..")));
    assert!(r.starts_with("250 2.0.0 Ok: queued as "), "{r}");
    c.cmd("QUIT");
    let id = r.rsplit(' ').next().unwrap().to_owned();
    let sent = wait_line(
        &relay,
        &[&format!("id={id}"), "status=sent", "to=bob@dest.test"],
    );
    assert!(
        sent.contains("250 2.0.0 Ok: "),
        "Postfix's reply to BDAT LAST: {sent}"
    );

    let got = wait_messages(&sink, 1);
    let text = String::from_utf8(got[0].content.clone()).unwrap();
    assert_eq!(as_sent(&text), TRICKY);
    assert!(
        wait_until(Duration::from_secs(30), || postfix
            .log()
            .lines()
            .any(|l| l.contains("smtpd")
                && l.contains("disconnect from")
                && l.contains("bdat=1"))),
        "Postfix saw no BDAT:\n{}",
        postfix.log()
    );
}
