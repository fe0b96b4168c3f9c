//! Trust under faults: store errors injected with failpoints (the test
//! build of the binary has the `failpoints` feature) give temporary
//! refusals, never permanent ones, and lose or half-store nothing.

use std::time::Duration;

use crate::smtp_local::pop_all;
use crate::support::mx::{Sink, SinkOptions};
use crate::support::server::{config_text, Raw, TestServer};
use crate::support::{free_tcp_port, unique_loopback, wait_until};

/// Longest wait for anything in these tests.
const LIMIT: Duration = Duration::from_secs(30);

/// base64("\0alice@example.test\0pw")
const ALICE_PLAIN: &str = "AGFsaWNlQGV4YW1wbGUudGVzdABwdw==";

fn alias(server: &TestServer, alias: &str, target: &str) {
    let out = server.cli(&["alias", "add", alias, target], "");
    assert!(out.status.success(), "{out:?}");
}

/// A POP3 USER/PASS login; returns the answer to PASS.
fn pop3_login(server: &TestServer, user: &str, password: &str) -> String {
    let mut c = Raw::connect(server.pop3);
    assert!(c.line().starts_with("+OK"));
    assert!(c.cmd(&format!("USER {user}")).starts_with("+OK"));
    let answer = c.cmd(&format!("PASS {password}"));
    c.cmd("QUIT");
    answer
}

/// With user and alias lookups failing, RCPT to a user, an alias or an
/// unknown address, SMTP AUTH, the sender check of an authenticated
/// client, and a POP3 login are all refused for now (4xx, `[SYS/TEMP]`),
/// never for good; once the store reads again, the same commands work.
#[test]
fn lookups_that_fail_refuse_for_now_not_for_good() {
    let server = TestServer::start();
    server.add_user("alice@example.test", "pw");
    alias(&server, "sales@example.test", "alice@example.test");

    // Authenticated before the fault, to reach the sender check with it.
    let mut authed = Raw::connect(server.smtp);
    authed.reply();
    assert!(authed.cmd("EHLO c").contains("AUTH PLAIN"));
    assert!(authed
        .cmd(&format!("AUTH PLAIN {ALICE_PLAIN}"))
        .starts_with("235"));

    server.failpoint("store::directory", "return");
    let mut c = Raw::connect(server.smtp);
    c.reply();
    c.cmd("EHLO c");
    assert!(c.cmd("MAIL FROM:<a@b.test>").starts_with("250"));
    for rcpt in [
        "alice@example.test",
        "sales@example.test",
        "nobody@example.test",
    ] {
        let r = c.cmd(&format!("RCPT TO:<{rcpt}>"));
        assert!(r.starts_with("451 4.3.0"), "RCPT {rcpt}: {r}");
    }
    assert!(c.cmd("RSET").starts_with("250"));

    let mut a = Raw::connect(server.smtp);
    a.reply();
    a.cmd("EHLO c");
    assert_eq!(
        a.cmd(&format!("AUTH PLAIN {ALICE_PLAIN}")),
        "454 4.7.0 Temporary authentication failure"
    );
    // A sender other than the user's own address needs an alias lookup.
    let r = authed.cmd("MAIL FROM:<sales@example.test>");
    assert!(r.starts_with("451 4.3.0"), "{r}");

    let r = pop3_login(&server, "alice@example.test", "pw");
    assert!(r.starts_with("-ERR [SYS/TEMP]"), "{r}");

    server.failpoint("store::directory", "off");
    assert!(c.cmd("MAIL FROM:<a@b.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<alice@example.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<sales@example.test>").starts_with("250"));
    assert!(c
        .cmd("RCPT TO:<nobody@example.test>")
        .starts_with("550 5.1.1"));
    assert!(a
        .cmd(&format!("AUTH PLAIN {ALICE_PLAIN}"))
        .starts_with("235"));
    assert!(authed
        .cmd("MAIL FROM:<sales@example.test>")
        .starts_with("250"));
    assert!(pop3_login(&server, "alice@example.test", "pw").starts_with("+OK"));
}

/// Sends one message; returns the reply to the final dot.
fn send(server: &TestServer, rcpts: &[&str], subject: &str) -> String {
    let mut c = Raw::connect(server.smtp);
    c.reply();
    c.cmd("EHLO c");
    assert!(c.cmd("MAIL FROM:<a@b.test>").starts_with("250"));
    for rcpt in rcpts {
        let r = c.cmd(&format!("RCPT TO:<{rcpt}>"));
        assert!(r.starts_with("250"), "{rcpt}: {r}");
    }
    assert!(c.cmd("DATA").starts_with("354"));
    let r = c.cmd(&format!("Subject: {subject}\r\n\r\nbody\r\n."));
    c.cmd("QUIT");
    r
}

fn queue_list(server: &TestServer) -> String {
    let out = server.cli(&["queue", "list"], "");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A write that fails at the end of DATA (each of the three ways a message
/// is stored, and the flush after it) is a `451 4.3.0`; the message is
/// either not stored at all or stored whole, never half, and nothing of it
/// comes back after a restart. Without the fault the same messages go
/// through.
#[test]
fn writes_that_fail_at_end_of_data_are_temporary_and_leave_nothing_half_stored() {
    // Remote mail is only queued here: nothing answers at the smarthost.
    let mut server =
        TestServer::start_with(&config_text("", "", "smarthost = \"127.0.0.1:9\"", ""));
    server.add_user("alice@example.test", "pw");
    server.add_user("bob@example.test", "pw");
    let cases: &[(&str, &[&str])] = &[
        ("store::accept_local", &["alice@example.test"]),
        (
            "store::accept_local",
            &["alice@example.test", "bob@example.test"],
        ),
        ("store::accept_remote", &["x@remote.test"]),
        ("store::spool", &["alice@example.test", "x@remote.test"]),
        ("store::durable", &["alice@example.test"]),
    ];
    for (n, (failpoint, rcpts)) in cases.iter().enumerate() {
        server.failpoint(failpoint, "return");
        let r = send(&server, rcpts, &format!("refused {n}"));
        server.failpoint(failpoint, "off");
        assert!(r.starts_with("451 4.3.0"), "{failpoint} {rcpts:?}: {r}");
    }
    assert!(
        queue_list(&server).contains("-- 0 message(s) in the queue"),
        "nothing queued from a refused message"
    );
    for (n, (failpoint, rcpts)) in cases.iter().enumerate() {
        let r = send(&server, rcpts, &format!("accepted {n}"));
        assert!(r.starts_with("250 2.0.0"), "{failpoint} {rcpts:?}: {r}");
    }
    // A restart re-dispatches whatever the spool holds: nothing refused
    // may come back from it.
    server.restart();
    let subjects = |user: &str| -> Vec<String> {
        let mut s: Vec<String> = pop_all(&server, user, "pw")
            .iter()
            .filter_map(|m| {
                m.text
                    .lines()
                    .find_map(|l| l.strip_prefix("Subject: "))
                    .map(str::to_owned)
            })
            .collect();
        s.sort();
        s
    };
    let alice = subjects("alice@example.test");
    // The message whose flush failed was written whole before the flush:
    // it may be there (the client, told 451, sends it again: a duplicate,
    // never a loss) or not; but only once.
    let refused: Vec<&String> = alice
        .iter()
        .filter(|s| s.starts_with("refused") && *s != "refused 4")
        .collect();
    assert!(refused.is_empty(), "refused messages stored: {alice:?}");
    assert!(alice.iter().filter(|s| *s == "refused 4").count() <= 1);
    for want in ["accepted 0", "accepted 1", "accepted 3", "accepted 4"] {
        assert!(alice.iter().any(|s| s == want), "{want} in {alice:?}");
    }
    assert_eq!(subjects("bob@example.test"), ["accepted 1"]);
    let queue = queue_list(&server);
    assert!(
        queue.contains("-- 2 message(s) in the queue"),
        "only the accepted remote messages are queued: {queue}"
    );
}

/// How many times the sink received each of `subjects`.
fn deliveries(sink: &Sink, subjects: &[String]) -> Vec<usize> {
    let received = sink.messages();
    subjects
        .iter()
        .map(|s| {
            let header = format!("Subject: {s}\r\n");
            received
                .iter()
                .filter(|m| String::from_utf8_lossy(&m.content).contains(&header))
                .count()
        })
        .collect()
}

/// A relay on a full disk: the smarthost is down until the disk is full,
/// then up; it accepts each message but the queue cannot record that
/// (ENOSPC on the settle write). Each message goes out at most once more
/// than it should (here: once), the actor says so once per retry rather
/// than once per message, and once the disk has room the queue drains.
#[test]
fn a_full_disk_after_delivery_does_not_send_the_mail_again_and_again() {
    let ip = unique_loopback();
    let port = free_tcp_port(&[ip]);
    let server = TestServer::start_with(&config_text(
        "",
        "",
        &format!("smarthost = \"{ip}:{port}\""),
        // No retry comes by itself: `queue flush` starts them all at once.
        "[delivery]\nretry = [\"1h\"]\n[dns]\nnameservers = [\"127.0.0.1:9\"]",
    ));
    const N: usize = 10;
    let subjects: Vec<String> = (0..N).map(|n| format!("full disk {n}")).collect();
    for (n, subject) in subjects.iter().enumerate() {
        let r = send(&server, &[&format!("r{n}@remote.test")], subject);
        assert!(r.starts_with("250 2.0.0"), "{r}");
    }
    // Nobody listens yet: every message is deferred once.
    assert!(wait_until(LIMIT, || server
        .log()
        .matches("deferred; will retry")
        .count()
        >= N));
    server.failpoint("store::settle_queue", "return(enospc)");
    let sink = Sink::start(ip, port, &SinkOptions::default());
    let out = server.cli(&["queue", "flush"], "");
    assert!(out.status.success(), "{out:?}");
    assert!(wait_until(LIMIT, || sink.messages().len() >= N));
    // An impatient postmaster (or any queue run) asks again meanwhile.
    let out = server.cli(&["queue", "flush"], "");
    assert!(out.status.success(), "{out:?}");
    // Let the fault last: two failed retries (1 s, then 2 s) later…
    wait_until(LIMIT, || {
        server
            .log()
            .matches("still cannot record delivery outcomes")
            .count()
            >= 2
    });
    let during = deliveries(&sink, &subjects);
    assert!(
        during.iter().all(|&n| n <= 1),
        "no message went out twice while the queue could not record it: {during:?}"
    );

    server.failpoint("store::settle_queue", "off");
    assert!(
        wait_until(LIMIT, || queue_list(&server)
            .contains("-- 0 message(s) in the queue")),
        "the queue drains once the store writes again; log:\n{}",
        server.log()
    );
    assert!(
        server
            .log()
            .contains("delivery outcomes recorded again; deliveries resume"),
        "{}",
        server.log()
    );
    let after = deliveries(&sink, &subjects);
    assert!(
        after.iter().all(|&n| (1..=2).contains(&n)),
        "every message delivered, at most one extra copy: {after:?}"
    );
    // Warnings about it come once per retry interval, not per message.
    let warnings = server
        .log()
        .lines()
        .filter(|l| {
            (l.contains(" WARN ") || l.contains(" ERROR ")) && l.contains("settle")
                || l.contains("record delivery outcomes")
        })
        .count();
    assert!(
        (1..N).contains(&warnings),
        "{warnings} warnings for {N} messages; log:\n{}",
        server.log()
    );
}
