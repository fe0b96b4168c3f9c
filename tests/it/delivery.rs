//! Remote delivery end to end: the real `postino` binary relays to real
//! receiving MXs (aiosmtpd, or a scripted server where aiosmtpd cannot
//! misbehave on cue) on 127.x.y.z, finds them through a real DNS server
//! (dnsmasq), retries on a short configured schedule, and returns bounces
//! that are read back over POP3. Every wait is bounded and waits for a
//! condition (a log line, a received message), not for time.

use std::net::Ipv4Addr;
use std::time::Duration;

use crate::smtp_local::{pop_all, Popped};
use crate::support::dns::{Dnsmasq, Zone};
use crate::support::mx::{RawServer, Sink, SinkOptions};
use crate::support::server::{config_text, python, Raw, TestServer};
use crate::support::{free_tcp_port, unique_loopback, wait_until};

/// Longest wait for anything in these tests.
const LIMIT: Duration = Duration::from_secs(30);

/// A relay under test: postino and its DNS server.
struct Relay {
    server: TestServer,
    _dns: Dnsmasq,
}

/// Settings shared by every test: the MX port, DNS, short timeouts and
/// `extra` lines for `[delivery]`; `routing` lines for `[routing]`.
pub(crate) fn relay_config(
    dns: Option<&Dnsmasq>,
    port: u16,
    delivery: &str,
    routing: &str,
) -> String {
    let nameservers = dns.map(|d| format!("\"{}\"", d.addr)).unwrap_or_default();
    config_text(
        "",
        "",
        routing,
        &format!(
            r#"[delivery]
mx_port = {port}
connect_timeout = "2s"
command_timeout = "5s"
data_init_timeout = "5s"
data_xfer_timeout = "5s"
data_done_timeout = "5s"
{delivery}
[dns]
nameservers = [{nameservers}]
timeout = "2s"
"#
        ),
    )
}

impl Relay {
    /// postino with `zone` served by dnsmasq, MXs on `port`, and `delivery`
    /// lines (which must set `retry`) for `[delivery]`. `alice@example.test`
    /// (password `pw`) is the local sender that receives bounces.
    fn start(zone: &Zone, port: u16, delivery: &str) -> Relay {
        Relay::start_routing(zone, port, delivery, "")
    }

    fn start_routing(zone: &Zone, port: u16, delivery: &str, routing: &str) -> Relay {
        let dns = Dnsmasq::start(zone);
        let server = TestServer::start_with(&relay_config(Some(&dns), port, delivery, routing));
        server.add_user("alice@example.test", "pw");
        Relay { server, _dns: dns }
    }

    fn send(&self, to: &[&str], subject: &str) -> String {
        send_from(&self.server, "alice@example.test", to, subject)
    }

    /// Waits for a log line that contains every one of `parts`; returns it.
    fn wait_line(&self, parts: &[&str]) -> String {
        wait_line(&self.server, parts)
    }

    /// The notification made about `orig`, once it is in a local mailbox.
    fn wait_notice(&self, orig: &str) -> String {
        let line = self.wait_line(&["notification created", &format!("orig_id={orig}")]);
        let id = field(&line, "id").to_owned();
        self.wait_line(&["delivered to mailbox", &format!("id={id}")]);
        id
    }

    fn alice(&self) -> Vec<Popped> {
        pop_all(&self.server, "alice@example.test", "pw")
    }

    fn queue(&self, args: &[&str]) -> String {
        let mut all = vec!["queue"];
        all.extend_from_slice(args);
        let out = self.server.cli(&all, "");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "postino {all:?} failed: {text}");
        text
    }
}

/// Sends one message over SMTP; returns the queue id from the 250 reply.
pub(crate) fn send_from(server: &TestServer, from: &str, to: &[&str], subject: &str) -> String {
    send_content(
        server,
        from,
        to,
        &format!("From: <{from}>\r\nTo: <{}>\r\nSubject: {subject}\r\n\r\nHello from the relay test.\r\n", to[0]),
    )
}

pub(crate) fn send_content(server: &TestServer, from: &str, to: &[&str], content: &str) -> String {
    let mut c = Raw::connect(server.smtp);
    assert!(c.reply().starts_with("220"));
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    let r = c.cmd(&format!("MAIL FROM:<{from}>"));
    assert!(r.starts_with("250"), "{r}");
    for rcpt in to {
        let r = c.cmd(&format!("RCPT TO:<{rcpt}>"));
        assert!(r.starts_with("250"), "{rcpt}: {r}");
    }
    assert!(c.cmd("DATA").starts_with("354"));
    let r = c.cmd(&format!("{content}."));
    assert!(r.starts_with("250 2.0.0 Ok: queued as "), "{r}");
    c.cmd("QUIT");
    r.rsplit(' ').next().unwrap().to_owned()
}

pub(crate) fn wait_line(server: &TestServer, parts: &[&str]) -> String {
    let mut found = None;
    wait_until(LIMIT, || {
        found = server
            .log()
            .lines()
            .find(|l| parts.iter().all(|p| l.contains(p)))
            .map(str::to_owned);
        found.is_some()
    });
    found.unwrap_or_else(|| panic!("no log line with {parts:?}; log:\n{}", server.log()))
}

/// Seconds between the stamps of two log lines
/// (`2026-12-01T17:00:00.123456Z  INFO …`), the second one later by less
/// than a day.
fn log_gap(earlier: &str, later: &str) -> f64 {
    let gap = time_of_day(later) - time_of_day(earlier);
    if gap < 0.0 {
        gap + 86_400.0
    } else {
        gap
    }
}

fn time_of_day(line: &str) -> f64 {
    let clock = line
        .split_once('T')
        .and_then(|(_, rest)| rest.split_once('Z'))
        .map(|(clock, _)| clock)
        .unwrap_or_else(|| panic!("no timestamp in {line}"));
    clock
        .split(':')
        .map(|p| {
            p.parse::<f64>()
                .unwrap_or_else(|_| panic!("bad timestamp in {line}"))
        })
        .fold(0.0, |acc, part| acc * 60.0 + part)
}

/// Log lines that contain every one of `parts`.
pub(crate) fn lines_with(server: &TestServer, parts: &[&str]) -> Vec<String> {
    server
        .log()
        .lines()
        .filter(|l| parts.iter().all(|p| l.contains(p)))
        .map(str::to_owned)
        .collect()
}

/// The value of `name=` in a log line (up to the next space).
fn field<'a>(line: &'a str, name: &str) -> &'a str {
    let key = format!(" {name}=");
    let start = line
        .find(&key)
        .unwrap_or_else(|| panic!("no {name}= in {line}"))
        + key.len();
    line[start..].split(' ').next().unwrap()
}

pub(crate) fn wait_messages(sink: &Sink, n: usize) -> Vec<crate::support::mx::Received> {
    wait_until(LIMIT, || sink.messages().len() >= n);
    sink.messages()
}

/// The DSN part of a report (from `message/delivery-status` to the next
/// boundary).
fn delivery_status(report: &str) -> &str {
    let start = report
        .find("Content-Type: message/delivery-status")
        .unwrap_or_else(|| panic!("not a DSN: {report}"));
    let rest = &report[start..];
    let end = rest[1..]
        .find("\r\n--")
        .map(|e| e + 1)
        .unwrap_or(rest.len());
    &rest[..end]
}

fn loopbacks<const N: usize>() -> [Ipv4Addr; N] {
    std::array::from_fn(|_| unique_loopback())
}

#[test]
fn mx_preference_order_and_fallback() {
    let [down, refusing, good, worse] = loopbacks();
    let port = free_tcp_port(&[down, refusing, good, worse]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    // The second-best MX greets with a refusal; postino must say QUIT and
    // go on to the next one.
    let _refuser = rt.block_on(RawServer::start(refusing, port, |mut conn| async move {
        conn.send("554 5.3.2 mx2 is not accepting mail\r\n").await;
        if conn.line().await.is_some() {
            conn.send("221 2.0.0 bye\r\n").await;
        }
    }));
    let sink = Sink::start(good, port, &SinkOptions::default());
    let spare = Sink::start(worse, port, &SinkOptions::default());
    let zone = Zone::new("test")
        .mx("dest.test", "mx4.dest.test", 40)
        .mx("dest.test", "mx3.dest.test", 30)
        .mx("dest.test", "mx1.dest.test", 10)
        .mx("dest.test", "mx2.dest.test", 20)
        .a("mx1.dest.test", down)
        .a("mx2.dest.test", refusing)
        .a("mx3.dest.test", good)
        .a("mx4.dest.test", worse);
    let relay = Relay::start(&zone, port, r#"retry = ["1s"]"#);

    let id = relay.send(&["bob@dest.test"], "fallback");
    let got = wait_messages(&sink, 1);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].rcpt_tos, ["bob@dest.test"]);
    assert_eq!(got[0].mail_from, "alice@example.test");
    assert_eq!(got[0].helo.as_deref(), Some("mx.example.test"));
    let content = String::from_utf8_lossy(&got[0].content);
    assert!(content.contains("Subject: fallback\r\n"), "{content}");
    assert!(
        content.contains(&format!("with ESMTP id {id}")),
        "our Received: header travels with it: {content}"
    );

    // One grep-able line per recipient and attempt, naming the queue id.
    let line = relay.wait_line(&["delivery attempt", &format!("id={id}"), "status=sent"]);
    assert!(line.contains("relay=mx3.dest.test["), "{line}");
    assert!(line.contains("to=bob@dest.test"), "{line}");
    assert!(line.contains("dsn=2.0.0"), "{line}");
    relay.wait_line(&["removed from queue", &format!("id={id}")]);
    assert!(spare.messages().is_empty(), "the worst MX is not needed");
    assert!(lines_with(&relay.server, &[&format!("id={id}"), "status=deferred"]).is_empty());
}

#[test]
fn implicit_mx_is_the_domains_own_address() {
    let [ip] = loopbacks();
    let port = free_tcp_port(&[ip]);
    let sink = Sink::start(ip, port, &SinkOptions::default());
    let relay = Relay::start(
        &Zone::new("test").a("implicit.test", ip),
        port,
        r#"retry = ["1s"]"#,
    );
    let id = relay.send(&["carol@implicit.test"], "implicit");
    let got = wait_messages(&sink, 1);
    assert_eq!(got[0].rcpt_tos, ["carol@implicit.test"]);
    let line = relay.wait_line(&["delivery attempt", &format!("id={id}"), "status=sent"]);
    assert!(line.contains("relay=implicit.test["), "{line}");
}

#[test]
fn null_mx_and_nxdomain_bounce_at_once() {
    let [ip] = loopbacks();
    let port = free_tcp_port(&[ip]);
    let relay = Relay::start(
        &Zone::new("test").null_mx("nullmx.test"),
        port,
        // A long retry: a bounce that came from a retry would time out.
        r#"retry = ["1h"]"#,
    );
    let null = relay.send(&["dan@nullmx.test"], "to a null MX");
    let nx = relay.send(&["erin@nosuch.test"], "to nowhere");
    relay.wait_notice(&null);
    relay.wait_notice(&nx);
    let line = relay.wait_line(&["delivery attempt", &format!("id={null}")]);
    assert!(line.contains("status=bounced"), "{line}");
    assert!(line.contains("dsn=5.1.10"), "{line}");

    let mail = relay.alice();
    assert_eq!(mail.len(), 2, "one bounce each: {mail:?}");
    let null_report = mail
        .iter()
        .find(|m| m.text.contains("Subject: to a null MX"))
        .expect("bounce of the null MX message");
    let dsn = delivery_status(&null_report.text);
    assert!(
        dsn.contains("Final-Recipient: rfc822; dan@nullmx.test\r\n"),
        "{dsn}"
    );
    assert!(dsn.contains("Action: failed\r\n"), "{dsn}");
    assert!(dsn.contains("Status: 5.1.10\r\n"), "{dsn}");
    assert!(
        dsn.contains("Diagnostic-Code: smtp; 556 5.1.10 nullmx.test: "),
        "{dsn}"
    );
    assert!(null_report
        .text
        .contains("From: MAILER-DAEMON@mx.example.test"));
    assert!(null_report
        .text
        .contains("Content-Type: multipart/report; report-type=delivery-status;"));
    // Bounces travel with the null sender.
    assert!(
        null_report.text.starts_with("Return-Path: <>\r\n"),
        "{}",
        null_report.text
    );

    let nx_report = mail
        .iter()
        .find(|m| m.text.contains("Subject: to nowhere"))
        .expect("bounce of the NXDOMAIN message");
    let dsn = delivery_status(&nx_report.text);
    assert!(
        dsn.contains("Final-Recipient: rfc822; erin@nosuch.test\r\n"),
        "{dsn}"
    );
    assert!(dsn.contains("Status: 5.1.2\r\n"), "{dsn}");
    assert!(dsn.contains("domain does not exist"), "{dsn}");
    assert!(relay.queue(&["list"]).contains("0 message(s) in the queue"));
}

/// Nothing listens, then the MX answers 451, then it takes the message:
/// each retry comes when due (not earlier, not a minute later), and the
/// message arrives exactly once.
#[test]
fn temporary_failures_are_retried_until_delivered_once() {
    let [ip] = loopbacks();
    let port = free_tcp_port(&[ip]);
    let relay = Relay::start(
        &Zone::new("test")
            .mx("later.test", "mx.later.test", 10)
            .a("mx.later.test", ip),
        port,
        r#"retry = ["2s"]"#,
    );
    let id = relay.send(&["frank@later.test"], "patience");
    let first = relay.wait_line(&[&format!("id={id}"), "status=deferred", "attempt=1 "]);
    assert!(first.contains("Connection refused"), "{first}");

    // The second attempt meets a server that says "later".
    let busy = Sink::start(
        ip,
        port,
        &SinkOptions::answering(&[("frank@later.test", "451 4.3.0 mailbox busy, try again")]),
    );
    let second = relay.wait_line(&[&format!("id={id}"), "status=deferred", "attempt=2 "]);
    // Measured between the server's own log stamps, so a slow log reader
    // or a loaded machine cannot move it.
    let gap = log_gap(&first, &second);
    assert!(
        second.contains("said: 451 4.3.0 mailbox busy, try again"),
        "{second}"
    );
    // retry = 2s: not before; and the actor wakes for it instead of
    // sleeping its maximum (MAX_SLEEP, 60 s): a schedule check, not a
    // speed check, so the upper bound is far from anything load can reach.
    assert!(gap >= 2.0, "retried after {gap} s");
    assert!(
        gap < 30.0,
        "retried after {gap} s: the actor slept past the retry"
    );
    let shown = relay.queue(&["show", &id]);
    assert!(shown.contains("attempts: 2"), "{shown}");
    assert!(shown.contains("451 4.3.0"), "{shown}");
    drop(busy);

    let sink = Sink::start(ip, port, &SinkOptions::default());
    relay.wait_line(&["removed from queue", &format!("id={id}")]);
    let sent = relay.wait_line(&[&format!("id={id}"), "status=sent"]);
    assert!(sent.contains("attempt=3 "), "{sent}");
    // One more retry interval: nothing else arrives.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(sink.messages().len(), 1);
    assert!(relay.alice().is_empty(), "no bounce, no warning");
}

/// A 5xx for some recipients of a transaction: the others are delivered in
/// that one transaction, and the sender gets one report naming every
/// failed recipient with its code and the remote's words.
#[test]
fn permanent_failures_make_one_report_for_all_failed_recipients() {
    let [ip] = loopbacks();
    let port = free_tcp_port(&[ip]);
    let sink = Sink::start(
        ip,
        port,
        &SinkOptions::answering(&[
            (
                "nobody@perm.test",
                "550 5.1.1 <nobody@perm.test>: Recipient address rejected: User unknown",
            ),
            (
                "closed@perm.test",
                "553 5.7.1 <closed@perm.test>: mailbox closed for good",
            ),
        ]),
    );
    let relay = Relay::start(
        &Zone::new("test")
            .mx("perm.test", "mx.perm.test", 10)
            .a("mx.perm.test", ip),
        port,
        r#"retry = ["1h"]"#,
    );
    let id = relay.send(
        &[
            "gina@perm.test",
            "nobody@perm.test",
            "hank@perm.test",
            "closed@perm.test",
        ],
        "some of you",
    );
    relay.wait_notice(&id);
    let got = sink.messages();
    assert_eq!(got.len(), 1, "one transaction for the domain: {got:?}");
    assert_eq!(got[0].rcpt_tos, ["gina@perm.test", "hank@perm.test"]);

    let mail = relay.alice();
    assert_eq!(mail.len(), 1, "{mail:?}");
    let report = &mail[0].text;
    assert!(
        report.contains("Subject: Undelivered Mail Returned to Sender"),
        "{report}"
    );
    assert!(report.contains("<nobody@perm.test>: 550 5.1.1"), "{report}");
    let dsn = delivery_status(report);
    for (rcpt, status, reply) in [
        (
            "nobody@perm.test",
            "5.1.1",
            "550 5.1.1 <nobody@perm.test>: Recipient address rejected: User unknown",
        ),
        (
            "closed@perm.test",
            "5.7.1",
            "553 5.7.1 <closed@perm.test>: mailbox closed for good",
        ),
    ] {
        let block = format!(
            "Final-Recipient: rfc822; {rcpt}\r\nAction: failed\r\nStatus: {status}\r\nRemote-MTA: dns; mx.perm.test\r\nDiagnostic-Code: smtp; {reply}\r\n"
        );
        assert!(dsn.contains(&block), "missing {block:?} in\n{dsn}");
    }
    assert!(
        !dsn.contains("gina@perm.test") && !dsn.contains("hank@perm.test"),
        "{dsn}"
    );
    // The original comes back with the report.
    assert!(report.contains("Content-Type: message/rfc822"), "{report}");
    assert!(report.contains("Subject: some of you"), "{report}");
    relay.wait_line(&["removed from queue", &format!("id={id}")]);
    assert_eq!(
        lines_with(&relay.server, &[&format!("id={id}"), "status=bounced"]).len(),
        2
    );
}

#[test]
fn expired_messages_are_returned() {
    let [ip] = loopbacks();
    let port = free_tcp_port(&[ip]);
    let relay = Relay::start(
        &Zone::new("test")
            .mx("gone.test", "mx.gone.test", 10)
            .a("mx.gone.test", ip),
        port,
        "retry = [\"1s\"]\nmax_queue_lifetime = \"3s\"",
    );
    let id = relay.send(&["ivan@gone.test"], "too late");
    relay.wait_notice(&id);
    relay.wait_line(&["message expired", &format!("id={id}")]);
    let attempts = lines_with(&relay.server, &[&format!("id={id}"), "status=deferred"]).len();
    assert!(attempts >= 2, "retried before giving up: {attempts}");
    let mail = relay.alice();
    assert_eq!(mail.len(), 1);
    let dsn = delivery_status(&mail[0].text);
    assert!(
        dsn.contains(
            "Final-Recipient: rfc822; ivan@gone.test\r\nAction: failed\r\nStatus: 4.4.7\r\n"
        ),
        "{dsn}"
    );
    assert!(dsn.contains("message expired after"), "{dsn}");
    assert!(
        dsn.contains("Connection refused"),
        "the last error is quoted: {dsn}"
    );
    assert!(relay.queue(&["list"]).contains("0 message(s) in the queue"));
}

#[test]
fn a_late_message_gets_one_delay_warning() {
    let [ip] = loopbacks();
    let port = free_tcp_port(&[ip]);
    let relay = Relay::start(
        &Zone::new("test")
            .mx("slow.test", "mx.slow.test", 10)
            .a("mx.slow.test", ip),
        port,
        "retry = [\"1s\"]\ndelay_warning = \"2s\"",
    );
    let id = relay.send(&["judy@slow.test"], "are we there yet");
    relay.wait_notice(&id);
    // A few more attempts: still one warning.
    relay.wait_line(&[&format!("id={id}"), "status=deferred", "attempt=5 "]);
    let mail = relay.alice();
    assert_eq!(mail.len(), 1, "{mail:?}");
    let report = &mail[0].text;
    assert!(
        report.contains("Subject: Delayed Mail (still being retried)"),
        "{report}"
    );
    let dsn = delivery_status(report);
    assert!(
        dsn.contains(
            "Final-Recipient: rfc822; judy@slow.test\r\nAction: delayed\r\nStatus: 4.4.1\r\n"
        ),
        "{dsn}"
    );
    let shown = relay.queue(&["show", &id]);
    assert!(shown.contains("Deferred"), "still queued: {shown}");
    relay.queue(&["delete", &id]);
}

/// kill -9 with a deferred message and one that was just accepted, start
/// again with the MX up: both arrive.
#[test]
fn the_queue_survives_kill_9() {
    let [ip] = loopbacks();
    let port = free_tcp_port(&[ip]);
    let mut relay = Relay::start(
        &Zone::new("test")
            .mx("crash.test", "mx.crash.test", 10)
            .a("mx.crash.test", ip),
        port,
        r#"retry = ["1s"]"#,
    );
    let deferred = relay.send(&["kim@crash.test"], "deferred before the crash");
    relay.wait_line(&[&format!("id={deferred}"), "status=deferred"]);
    let fresh = relay.send(&["lee@crash.test"], "accepted just before the crash");
    relay.server.kill9();

    let sink = Sink::start(ip, port, &SinkOptions::default());
    relay.server.restart();
    let got = wait_messages(&sink, 2);
    let mut subjects: Vec<String> = got
        .iter()
        .map(|m| {
            let text = String::from_utf8_lossy(&m.content).into_owned();
            text.lines()
                .find(|l| l.starts_with("Subject: "))
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    subjects.sort();
    subjects.dedup();
    assert_eq!(
        subjects,
        [
            "Subject: accepted just before the crash",
            "Subject: deferred before the crash"
        ]
    );
    relay.wait_line(&["removed from queue", &format!("id={deferred}")]);
    relay.wait_line(&["removed from queue", &format!("id={fresh}")]);
    assert!(relay.queue(&["list"]).contains("0 message(s) in the queue"));
}

/// `postino store compact` with the server stopped: afterwards the server
/// logs the same user in, serves the same mailbox over POP3 (same UIDLs,
/// same octets) and delivers the message that was waiting in the queue.
#[test]
fn store_compact_keeps_users_mail_and_queue() {
    let [ip] = loopbacks();
    let port = free_tcp_port(&[ip]);
    let mut relay = Relay::start(
        &Zone::new("test")
            .mx("compact.test", "mx.compact.test", 10)
            .a("mx.compact.test", ip),
        port,
        r#"retry = ["1s"]"#,
    );
    for n in 0..3 {
        send_from(
            &relay.server,
            "bob@remote.test",
            &["alice@example.test"],
            &format!("kept {n}"),
        );
    }
    let before = relay.alice();
    assert_eq!(before.len(), 3);
    let queued = relay.send(&["kim@compact.test"], "queued across the compaction");
    relay.wait_line(&[&format!("id={queued}"), "status=deferred"]);
    assert_eq!(relay.server.terminate(), Some(0), "{}", relay.server.log());

    let out = relay.server.cli(&["store", "compact"], "");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("compacted"),
        "store compact failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let sink = Sink::start(ip, port, &SinkOptions::default());
    relay.server.restart();
    let after = relay.alice();
    assert_eq!(
        after.iter().map(|m| (&m.uidl, &m.text)).collect::<Vec<_>>(),
        before
            .iter()
            .map(|m| (&m.uidl, &m.text))
            .collect::<Vec<_>>(),
    );
    let got = wait_messages(&sink, 1);
    assert!(String::from_utf8_lossy(&got[0].content)
        .contains("Subject: queued across the compaction\r\n"));
    relay.wait_line(&["removed from queue", &format!("id={queued}")]);
    // New mail gets a new id and UIDL, never one from before.
    send_from(
        &relay.server,
        "bob@remote.test",
        &["alice@example.test"],
        "after",
    );
    let mut uidls: Vec<String> = relay.alice().into_iter().map(|m| m.uidl).collect();
    uidls.sort();
    uidls.dedup();
    assert_eq!(uidls.len(), 4, "{uidls:?}");
}

/// Mail from `<>` that fails is never bounced; the postmaster hears of it
/// (`double_bounce = "postmaster"`, the default).
#[test]
fn a_failed_bounce_goes_to_the_postmaster_not_back() {
    let [ip] = loopbacks();
    let port = free_tcp_port(&[ip]);
    let _sink = Sink::start(
        ip,
        port,
        &SinkOptions::answering(&[("gone@far.test", "550 5.1.1 no such user")]),
    );
    let relay = Relay::start(
        &Zone::new("test")
            .mx("far.test", "mx.far.test", 10)
            .a("mx.far.test", ip),
        port,
        r#"retry = ["1h"]"#,
    );
    relay.server.add_user("postmaster@example.test", "pm");
    let id = send_from(&relay.server, "", &["gone@far.test"], "a bounce itself");
    relay.wait_notice(&id);
    relay.wait_line(&[
        "undeliverable bounce; reported to the postmaster",
        &format!("id={id}"),
    ]);
    let pm = pop_all(&relay.server, "postmaster@example.test", "pm");
    assert_eq!(pm.len(), 1);
    let dsn = delivery_status(&pm[0].text);
    assert!(
        dsn.contains("Final-Recipient: rfc822; gone@far.test"),
        "{dsn}"
    );
    assert!(
        pm[0].text.contains("To: <postmaster@example.test>"),
        "{}",
        pm[0].text
    );
    assert!(relay.alice().is_empty());
}

#[test]
fn a_failed_bounce_is_dropped_when_configured() {
    let [ip] = loopbacks();
    let port = free_tcp_port(&[ip]);
    let relay = Relay::start(
        &Zone::new("test"),
        port,
        "retry = [\"1h\"]\ndouble_bounce = \"drop\"",
    );
    relay.server.add_user("postmaster@example.test", "pm");
    let id = send_from(&relay.server, "", &["gone@nosuch.test"], "a bounce itself");
    relay.wait_line(&["undeliverable bounce dropped", &format!("id={id}")]);
    relay.wait_line(&["removed from queue", &format!("id={id}")]);
    assert!(lines_with(&relay.server, &["notification created"]).is_empty());
    assert!(pop_all(&relay.server, "postmaster@example.test", "pm").is_empty());
}

/// Mail that has passed `hop_limit` hosts is refused at the end of DATA;
/// one hop fewer is relayed.
#[test]
fn looping_mail_is_refused() {
    let [ip] = loopbacks();
    let port = free_tcp_port(&[ip]);
    let sink = Sink::start(ip, port, &SinkOptions::default());
    let relay = Relay::start(
        &Zone::new("test")
            .mx("loop.test", "mx.loop.test", 10)
            .a("mx.loop.test", ip),
        port,
        r#"retry = ["1s"]"#,
    );
    let with_hops = |n: usize| {
        let mut m = String::new();
        for i in 0..n {
            m.push_str(&format!(
                "Received: from hop{i}.test by hop{}.test; Thu, 1 Jan 2026 00:00:00 +0000\r\n",
                i + 1
            ));
        }
        m.push_str("Subject: round and round\r\n\r\nbody\r\n");
        m
    };
    let mut c = Raw::connect(relay.server.smtp);
    c.reply();
    c.cmd("EHLO client.test");
    c.cmd("MAIL FROM:<alice@example.test>");
    c.cmd("RCPT TO:<max@loop.test>");
    c.cmd("DATA");
    let r = c.cmd(&format!("{}.", with_hops(50)));
    assert!(r.starts_with("554 5.4.0"), "{r}");
    c.cmd("QUIT");

    send_content(
        &relay.server,
        "alice@example.test",
        &["max@loop.test"],
        &with_hops(49),
    );
    let got = wait_messages(&sink, 1);
    assert_eq!(got.len(), 1);
    let text = String::from_utf8_lossy(&got[0].content);
    assert_eq!(
        text.matches("Received: ").count(),
        50,
        "ours on top: {text}"
    );
}

/// `routing.smarthost`: every remote message goes there, whatever DNS says
/// (here DNS knows nothing at all), with AUTH PLAIN when configured.
#[test]
fn smarthost_takes_all_remote_mail() {
    let [plain_ip, auth_ip] = loopbacks();
    let port = free_tcp_port(&[plain_ip, auth_ip]);
    let plain = Sink::start(plain_ip, port, &SinkOptions::default());
    let relay = Relay::start_routing(
        &Zone::new("test"),
        1,
        r#"retry = ["1s"]"#,
        &format!("smarthost = \"{plain_ip}:{port}\""),
    );
    let id = relay.send(&["nick@a.test", "olga@b.test"], "via the smarthost");
    let got = wait_messages(&plain, 2);
    let mut rcpts: Vec<&str> = got
        .iter()
        .flat_map(|m| m.rcpt_tos.iter().map(String::as_str))
        .collect();
    rcpts.sort();
    assert_eq!(rcpts, ["nick@a.test", "olga@b.test"]);
    assert!(got.iter().all(|m| m.auth.is_none()));
    let line = relay.wait_line(&[&format!("id={id}"), "status=sent", "to=nick@a.test"]);
    assert!(
        line.contains(&format!("relay={plain_ip}[{plain_ip}]:{port}")),
        "{line}"
    );

    let authed = Sink::start(
        auth_ip,
        port,
        &SinkOptions {
            auth: Some(("relayuser".into(), "s3cret".into())),
            ..SinkOptions::default()
        },
    );
    let relay = Relay::start_routing(
        &Zone::new("test"),
        1,
        r#"retry = ["1s"]"#,
        &format!(
            "smarthost = \"{auth_ip}:{port}\"\n[routing.smarthost_auth]\nusername = \"relayuser\"\npassword = \"s3cret\"\n# aiosmtpd here has no TLS\nallow_plaintext = true"
        ),
    );
    let id = relay.send(&["pat@c.test"], "authenticated");
    let got = wait_messages(&authed, 1);
    assert_eq!(got[0].auth.as_deref(), Some("relayuser"));
    assert_eq!(got[0].rcpt_tos, ["pat@c.test"]);
    relay.wait_line(&["removed from queue", &format!("id={id}")]);
}

#[test]
fn smarthost_refusing_our_credentials_defers() {
    let [ip] = loopbacks();
    let port = free_tcp_port(&[ip]);
    let _authed = Sink::start(
        ip,
        port,
        &SinkOptions {
            auth: Some(("relayuser".into(), "s3cret".into())),
            ..SinkOptions::default()
        },
    );
    let relay = Relay::start_routing(
        &Zone::new("test"),
        1,
        r#"retry = ["1h"]"#,
        &format!(
            "smarthost = \"{ip}:{port}\"\n[routing.smarthost_auth]\nusername = \"relayuser\"\npassword = \"wrong\"\nallow_plaintext = true"
        ),
    );
    let id = relay.send(&["quinn@d.test"], "wrong password");
    let line = relay.wait_line(&[&format!("id={id}"), "status=deferred"]);
    assert!(line.contains("authentication failed"), "{line}");
    assert!(
        relay.alice().is_empty(),
        "a login problem is not the sender's"
    );
}

/// `postino queue list|show|flush|delete|bounce` against the running
/// server, with the MX down and a retry far away.
#[test]
fn queue_tools_work_on_the_running_server() {
    let [ip] = loopbacks();
    let port = free_tcp_port(&[ip]);
    let relay = Relay::start(
        &Zone::new("test")
            .mx("q.test", "mx.q.test", 10)
            .a("mx.q.test", ip),
        port,
        r#"retry = ["1h"]"#,
    );
    let ids: Vec<String> = ["one", "two", "three"]
        .iter()
        .map(|s| {
            let id = relay.send(&[&format!("{s}@q.test")], s);
            relay.wait_line(&[&format!("id={id}"), "status=deferred"]);
            id
        })
        .collect();

    let list = relay.queue(&["list"]);
    assert!(list.contains("3 message(s) in the queue"), "{list}");
    for (id, who) in ids.iter().zip(["one", "two", "three"]) {
        let line = list
            .lines()
            .find(|l| l.starts_with(id.as_str()))
            .unwrap_or_else(|| panic!("{id} not listed: {list}"));
        assert!(line.contains("<alice@example.test>"), "{line}");
        assert!(line.contains(&format!("{who}@q.test")), "{line}");
        assert!(line.contains(" 1 "), "one attempt: {line}");
        assert!(line.contains("Connection refused"), "last error: {line}");
    }
    let shown = relay.queue(&["show", &ids[0]]);
    assert!(shown.contains(&format!("id: {}", ids[0])), "{shown}");
    assert!(shown.contains("sender: <alice@example.test>"), "{shown}");
    assert!(shown.contains("recipient: one@q.test Deferred"), "{shown}");

    // delete: gone, no bounce.
    relay.queue(&["delete", &ids[1]]);
    let list = relay.queue(&["list"]);
    assert!(list.contains("2 message(s) in the queue"), "{list}");
    assert!(!list.contains(&ids[1]), "{list}");

    // bounce: gone, and the sender is told.
    relay.queue(&["bounce", &ids[2]]);
    relay.wait_notice(&ids[2]);
    let mail = relay.alice();
    assert_eq!(mail.len(), 1);
    let dsn = delivery_status(&mail[0].text);
    assert!(
        dsn.contains("Final-Recipient: rfc822; three@q.test"),
        "{dsn}"
    );
    assert!(
        dsn.contains("Connection refused"),
        "the last error is quoted: {dsn}"
    );

    // flush: the MX is up now, and the retry an hour away happens now.
    let sink = Sink::start(ip, port, &SinkOptions::default());
    relay.queue(&["flush"]);
    let got = wait_messages(&sink, 1);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].rcpt_tos, ["one@q.test"]);
    relay.wait_line(&["removed from queue", &format!("id={}", ids[0])]);
    let list = relay.queue(&["list"]);
    assert!(list.contains("0 message(s) in the queue"), "{list}");

    // Unknown ids are errors, not silence.
    let out = relay.server.cli(&["queue", "delete", &ids[1]], "");
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no queued message"),
        "{out:?}"
    );
}

/// Many messages to a few destinations at once: all arrive, connections
/// are reused across messages, and per-destination concurrency holds.
#[test]
fn a_burst_to_one_domain_reuses_connections() {
    let [ip] = loopbacks();
    let port = free_tcp_port(&[ip]);
    let sink = Sink::start(ip, port, &SinkOptions::default());
    let relay = Relay::start(
        &Zone::new("test")
            .mx("busy.test", "mx.busy.test", 10)
            .a("mx.busy.test", ip),
        port,
        "retry = [\"1s\"]\nconcurrency_per_domain = 2",
    );
    let n = 20;
    let ids: Vec<String> = (0..n)
        .map(|i| relay.send(&[&format!("u{i}@busy.test")], &format!("burst {i}")))
        .collect();
    let got = wait_messages(&sink, n);
    assert_eq!(got.len(), n);
    for id in &ids {
        relay.wait_line(&["removed from queue", &format!("id={id}")]);
    }
    let connections: std::collections::HashSet<_> = got.iter().map(|m| m.peer.clone()).collect();
    assert!(
        connections.len() < n,
        "{} connections for {n} messages",
        connections.len()
    );
}

/// `concurrency_per_domain` bounds the transactions in progress to one
/// destination, however many messages are waiting for it.
#[test]
fn concurrency_per_destination_is_bounded() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    let [ip] = loopbacks();
    let port = free_tcp_port(&[ip]);
    let active = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let delivered = Arc::new(AtomicUsize::new(0));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _mx = {
        let (active, most, delivered) = (active.clone(), most.clone(), delivered.clone());
        rt.block_on(RawServer::start(ip, port, move |mut conn| {
            let (active, most, delivered) = (active.clone(), most.clone(), delivered.clone());
            async move {
                // A slow but correct server without PIPELINING: each
                // transaction takes 300 ms at the final dot.
                conn.send("220 slow.test ESMTP\r\n").await;
                while let Some(line) = conn.line().await {
                    let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
                    match verb.as_str() {
                        "EHLO" | "HELO" => conn.send("250 slow.test\r\n").await,
                        "MAIL" => {
                            let now = active.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(now, Ordering::SeqCst);
                            conn.send("250 2.1.0 Ok\r\n").await;
                        }
                        "RCPT" | "RSET" | "NOOP" => conn.send("250 2.0.0 Ok\r\n").await,
                        "DATA" => {
                            conn.send("354 go ahead\r\n").await;
                            if conn.data().await.is_none() {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(300)).await;
                            active.fetch_sub(1, Ordering::SeqCst);
                            delivered.fetch_add(1, Ordering::SeqCst);
                            conn.send("250 2.0.0 Ok: queued\r\n").await;
                        }
                        "QUIT" => {
                            conn.send("221 2.0.0 Bye\r\n").await;
                            break;
                        }
                        _ => conn.send("502 5.5.2 what?\r\n").await,
                    }
                }
            }
        }))
    };
    let relay = Relay::start(
        &Zone::new("test")
            .mx("slow.test", "mx.slow.test", 10)
            .a("mx.slow.test", ip),
        port,
        "retry = [\"1s\"]\nconcurrency_per_domain = 2",
    );
    let n = 8;
    let ids: Vec<String> = (0..n)
        .map(|i| relay.send(&[&format!("s{i}@slow.test")], &format!("slow {i}")))
        .collect();
    for id in &ids {
        relay.wait_line(&["removed from queue", &format!("id={id}")]);
    }
    assert_eq!(delivered.load(Ordering::SeqCst), n);
    let most = most.load(Ordering::SeqCst);
    assert!(most <= 2, "{most} transactions at once");
    assert_eq!(most, 2, "the limit is used, not just respected");
}

/// Many messages to many domains (all served by one MX host) in one burst:
/// every one arrives once and the queue ends empty.
#[test]
fn a_burst_to_many_domains_drains_the_queue() {
    let [ip] = loopbacks();
    let port = free_tcp_port(&[ip]);
    let sink = Sink::start(ip, port, &SinkOptions::default());
    let domains = 12;
    let mut zone = Zone::new("test").a("mx.hub.test", ip);
    for d in 0..domains {
        zone = zone.mx(&format!("d{d}.test"), "mx.hub.test", 10);
    }
    let relay = Relay::start(&zone, port, r#"retry = ["1s"]"#);
    let per_domain = 10;
    let mut expected = Vec::new();
    for i in 0..per_domain {
        for d in 0..domains {
            // Two recipients in different domains per message.
            let to = [
                format!("u{i}@d{d}.test"),
                format!("v{i}@d{}.test", (d + 1) % domains),
            ];
            relay.send(&[&to[0], &to[1]], &format!("burst {i}/{d}"));
            expected.extend(to);
        }
    }
    let got = {
        wait_until(Duration::from_secs(60), || {
            sink.messages()
                .iter()
                .map(|m| m.rcpt_tos.len())
                .sum::<usize>()
                >= expected.len()
        });
        sink.messages()
    };
    let mut rcpts: Vec<String> = got.iter().flat_map(|m| m.rcpt_tos.clone()).collect();
    rcpts.sort();
    expected.sort();
    assert_eq!(rcpts, expected, "every recipient once");
    assert!(wait_until(LIMIT, || relay
        .queue(&["list"])
        .contains("0 message(s) in the queue")));
}

/// A DNS server that will not answer (dnsmasq refuses names outside its
/// zone) is trouble to wait out, not a reason to bounce.
#[test]
fn dns_trouble_defers() {
    let [ip] = loopbacks();
    let port = free_tcp_port(&[ip]);
    let relay = Relay::start(&Zone::new("test"), port, r#"retry = ["1h"]"#);
    let id = relay.send(&["rita@elsewhere.example"], "no answer");
    let line = relay.wait_line(&[&format!("id={id}"), "delivery attempt"]);
    assert!(line.contains("status=deferred"), "{line}");
    assert!(line.contains("dsn=4.4.3"), "{line}");
    assert!(
        line.contains("detail=451 4.4.3 elsewhere.example: temporary DNS failure"),
        "{line}"
    );
    let list = relay.queue(&["list"]);
    assert!(list.contains("1 message(s) in the queue"), "{list}");
    assert!(relay.alice().is_empty());
}

/// Smarthost credentials without a smarthost are not offered to MX hosts
/// (they would leak, and every MX without AUTH would be skipped).
#[test]
fn smarthost_credentials_stay_away_from_mx_hosts() {
    let [ip] = loopbacks();
    let port = free_tcp_port(&[ip]);
    let sink = Sink::start(ip, port, &SinkOptions::default());
    let relay = Relay::start_routing(
        &Zone::new("test")
            .mx("mx.test", "in.mx.test", 10)
            .a("in.mx.test", ip),
        port,
        r#"retry = ["1h"]"#,
        "[routing.smarthost_auth]\nusername = \"relayuser\"\npassword = \"s3cret\"",
    );
    let id = relay.send(&["sam@mx.test"], "no credentials here");
    let got = wait_messages(&sink, 1);
    assert_eq!(got[0].auth, None);
    relay.wait_line(&["removed from queue", &format!("id={id}")]);
    relay.wait_line(&["smarthost_auth is set without routing.smarthost"]);
}

/// `postino trace ID`, run against the live server (or, with `offline`,
/// after it stopped): (exit success, stdout, stderr).
fn trace(server: &TestServer, args: &[&str]) -> (bool, String, String) {
    let mut all = vec!["trace"];
    all.extend_from_slice(args);
    let out = server.cli(&all, "");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The index of the first line at or after `from` holding every part.
fn line_index(lines: &[&str], from: usize, parts: &[&str], all: &str) -> usize {
    lines
        .iter()
        .enumerate()
        .skip(from)
        .find(|(_, l)| parts.iter().all(|p| l.contains(p)))
        .map(|(i, _)| i)
        .unwrap_or_else(|| panic!("no line with {parts:?} after line {from} in\n{all}"))
}

/// A message to a local and a remote recipient, the remote deferred once
/// and then delivered: its history shows, in order, how it came in, both
/// routes, both attempts with the exchanger and its reply, and its leaving
/// the queue; the same as JSON from the CLI and from the admin API; and
/// offline once the server stopped.
#[test]
fn trace_shows_a_messages_history_in_order() {
    let [ip] = loopbacks();
    let port = free_tcp_port(&[ip]);
    let busy = Sink::start(
        ip,
        port,
        &SinkOptions::answering(&[("frank@later.test", "451 4.3.0 mailbox busy, try again")]),
    );
    // The admin listener rides in after the [delivery] lines.
    let mut relay = Relay::start(
        &Zone::new("test")
            .mx("later.test", "mx.later.test", 10)
            .a("mx.later.test", ip),
        port,
        "retry = [\"1s\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n",
    );
    let id = relay.send(&["alice@example.test", "frank@later.test"], "history");
    relay.wait_line(&[&format!("id={id}"), "status=deferred", "attempt=1 "]);
    drop(busy);
    let sink = Sink::start(ip, port, &SinkOptions::default());
    relay.wait_line(&["removed from queue", &format!("id={id}")]);
    assert_eq!(wait_messages(&sink, 1).len(), 1);
    // Alice reads and deletes her copy.
    let popped = python(
        r#"
import poplib, sys
p = poplib.POP3(sys.argv[1], int(sys.argv[2]), timeout=20)
p.user(sys.argv[3])
p.pass_(sys.argv[4])
n = len(p.list()[1])
for i in range(1, n + 1):
    p.retr(i)
    p.dele(i)
p.quit()
print(n)
"#,
        &[
            &relay.server.pop3.ip().to_string(),
            &relay.server.pop3.port().to_string(),
            "alice@example.test",
            "pw",
        ],
    );
    assert_eq!(popped.trim(), "1");

    let (ok, out, err) = trace(&relay.server, &[&id]);
    assert!(ok, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    let relay_host = format!("relay=mx.later.test[{ip}]:{port}");
    let received = line_index(
        &lines,
        0,
        &["received from 127.0.0.1 (HELO client.test) <alice@example.test>"],
        &out,
    );
    assert_eq!(received, 0, "{out}");
    let local = line_index(
        &lines,
        received,
        &["route <alice@example.test>: local mailbox alice@example.test"],
        &out,
    );
    let remote = line_index(
        &lines,
        local,
        &["route <frank@later.test>: queued for relay to frank@later.test"],
        &out,
    );
    let first = line_index(
        &lines,
        remote,
        &[
            "attempt <frank@later.test>",
            &relay_host,
            "status=deferred",
            "451 4.3.0 mailbox busy, try again",
        ],
        &out,
    );
    let deferred = line_index(&lines, first, &["deferred; next attempt 20"], &out);
    let second = line_index(
        &lines,
        deferred,
        &[
            "attempt <frank@later.test>",
            &relay_host,
            "status=sent",
            "250",
        ],
        &out,
    );
    let dequeued = line_index(&lines, second, &["removed from the queue"], &out);
    // Reading is not recorded (it would make every RETR a write), the
    // deletion at QUIT is.
    assert!(!out.contains("retrieved over POP3"), "{out}");
    line_index(
        &lines,
        dequeued,
        &["deleted over POP3 from alice@example.test"],
        &out,
    );
    // Human times: RFC 3339, not Unix seconds.
    assert!(
        lines[0].starts_with("20") && lines[0].contains('T'),
        "{out}"
    );

    let (ok, out, err) = trace(&relay.server, &[&id, "--json"]);
    assert!(ok, "{out}{err}");
    let events: serde_json::Value = serde_json::from_str(out.trim()).expect("JSON");
    let events = events.as_array().expect("an array");
    assert_eq!(events.len(), lines.len(), "{out}");
    assert_eq!(events[0]["what"]["Received"]["helo"], "client.test");
    assert_eq!(events[0]["what"]["Received"]["client"], "127.0.0.1");

    let admin = relay.server.admin.expect("admin listener");
    let got = std::process::Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "20"])
        .arg(format!("http://{admin}/api/trace/{id}"))
        .output()
        .expect("run curl");
    assert!(got.status.success(), "{got:?}");
    let body: serde_json::Value = serde_json::from_slice(&got.stdout).expect("JSON");
    assert_eq!(body["id"], id.as_str());
    assert_eq!(body["events"].as_array().map(Vec::len), Some(lines.len()));
    let missing = std::process::Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "20",
        ])
        .arg(format!("http://{admin}/api/trace/999999999"))
        .output()
        .expect("run curl");
    assert_eq!(String::from_utf8_lossy(&missing.stdout), "404");

    // Unknown ids fail, online and offline; the history is read offline too.
    let (ok, _, err) = trace(&relay.server, &["999999999"]);
    assert!(
        !ok && err.contains("no history of message 0999999999"),
        "{err}"
    );
    assert_eq!(relay.server.terminate(), Some(0));
    let (ok, offline, err) = trace(&relay.server, &[&id]);
    assert!(ok, "{offline}{err}");
    assert_eq!(offline.lines().count(), lines.len(), "{offline}");
    let (ok, _, _) = trace(&relay.server, &["999999999"]);
    assert!(!ok);
}

/// A remote user refused for good: the message's history names the
/// bounce's id, and the bounce's history links back to the message.
#[test]
fn trace_links_a_bounce_and_its_message_both_ways() {
    let [ip] = loopbacks();
    let port = free_tcp_port(&[ip]);
    let _sink = Sink::start(
        ip,
        port,
        &SinkOptions::answering(&[(
            "nobody@perm.test",
            "550 5.1.1 <nobody@perm.test>: User unknown",
        )]),
    );
    let relay = Relay::start(
        &Zone::new("test")
            .mx("perm.test", "mx.perm.test", 10)
            .a("mx.perm.test", ip),
        port,
        r#"retry = ["1h"]"#,
    );
    let id = relay.send(&["nobody@perm.test"], "to nobody");
    let bounce = relay.wait_notice(&id);
    relay.wait_line(&["removed from queue", &format!("id={id}")]);

    let (ok, out, err) = trace(&relay.server, &[&id]);
    assert!(ok, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    let attempt = line_index(
        &lines,
        0,
        &["attempt <nobody@perm.test>", "status=bounced", "550 5.1.1"],
        &out,
    );
    line_index(
        &lines,
        attempt,
        &[&format!(
            "failure notification {bounce} to <alice@example.test>"
        )],
        &out,
    );

    let (ok, out, err) = trace(&relay.server, &[&bounce]);
    assert!(ok, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    let about = line_index(
        &lines,
        0,
        &[&format!("notification about message {id}")],
        &out,
    );
    line_index(
        &lines,
        about,
        &["route <alice@example.test>: local mailbox alice@example.test"],
        &out,
    );
}
