//! A 250 to DATA is a promise: kill -9 the server right after it, start it
//! again, and the message is there. A message cut off mid-DATA is never
//! delivered. SIGTERM stops cleanly.

use crate::smtp_local::pop_all;
use crate::support::server::{Raw, TestServer};

fn send_raw(server: &TestServer, subject: &str) -> String {
    let mut c = Raw::connect(server.smtp);
    c.reply();
    c.cmd("EHLO c");
    assert!(c.cmd("MAIL FROM:<a@b.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<alice@example.test>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    let r = c.cmd(&format!("Subject: {subject}\r\n\r\nbody\r\n."));
    assert!(r.starts_with("250 2.0.0 Ok: queued as "), "{r}");
    r
}

#[test]
fn kill9_right_after_250_loses_nothing() {
    let mut server = TestServer::start();
    server.add_user("alice@example.test", "pw");
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(send_raw(&server, &format!("promise {n}")));
    }
    // No QUIT, no grace: the process dies right after the last 250.
    server.kill9();
    server.restart();
    let msgs = pop_all(&server, "alice@example.test", "pw");
    assert_eq!(
        msgs.len(),
        5,
        "every message that got 250 survives: {ids:?}"
    );
    for n in 0..5 {
        assert!(msgs
            .iter()
            .any(|m| m.text.contains(&format!("Subject: promise {n}\r\n"))));
    }
}

#[test]
fn kill9_mid_data_delivers_nothing_and_uidls_survive_restart() {
    let mut server = TestServer::start();
    server.add_user("alice@example.test", "pw");
    send_raw(&server, "complete");
    let before = pop_all(&server, "alice@example.test", "pw");

    let mut c = Raw::connect(server.smtp);
    c.reply();
    c.cmd("HELO c");
    c.cmd("MAIL FROM:<a@b.test>");
    c.cmd("RCPT TO:<alice@example.test>");
    c.cmd("DATA");
    c.send(b"Subject: half\r\n\r\nthis message never ends");
    server.kill9();
    server.restart();
    let after = pop_all(&server, "alice@example.test", "pw");
    assert_eq!(after.len(), 1, "the half-received message is not delivered");
    assert_eq!(after[0].uidl, before[0].uidl, "UIDL stable across restarts");
    assert_eq!(after[0].text, before[0].text);
}

#[test]
fn sigterm_stops_gracefully() {
    let mut server = TestServer::start();
    server.add_user("alice@example.test", "pw");
    let mut idle = Raw::connect(server.smtp);
    idle.reply();
    idle.cmd("EHLO idle");
    let code = server.terminate();
    assert_eq!(code, Some(0), "clean exit; log:\n{}", server.log());
    let last = idle.reply();
    assert!(
        last.starts_with("421 4.3.2"),
        "idle sessions are told: {last}"
    );
    assert!(server.log().contains("stopped"));
}
