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

/// Many sessions at once share group commits; kill -9 while they are
/// sending. Every message whose 250 reached its client must be there after
/// the restart. (sled's own periodic flush is off in these tests; the
/// store's unit tests prove the flush ordering itself with a crashing child.)
#[test]
fn kill9_under_concurrent_load_loses_no_acknowledged_message() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    let mut server = TestServer::start();
    server.add_user("alice@example.test", "pw");
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let addr = server.smtp;
    let clients: Vec<_> = (0..8)
        .map(|c| {
            let (acked, stop) = (acked.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut conn = Raw::connect(addr);
                conn.reply();
                conn.cmd("EHLO load");
                // Bounded: at most 200 messages per client.
                for n in 0..200 {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let subject = format!("load {c}-{n}");
                    // Pipelined, as a busy relay would send.
                    conn.send(
                        format!("MAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nSubject: {subject}\r\n\r\nx\r\n.\r\n")
                            .as_bytes(),
                    );
                    let replies: Vec<String> = (0..4).map(|_| conn.reply()).collect();
                    if replies[3].starts_with("250") {
                        acked.lock().unwrap().push(subject);
                    } else {
                        return; // the server died mid-transaction
                    }
                }
            })
        })
        .collect();
    // Let some messages through, then kill while the rest are in flight.
    assert!(crate::support::wait_until(
        std::time::Duration::from_secs(30),
        || acked.lock().unwrap().len() >= 100
    ));
    server.kill9();
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        let _ = c.join();
    }
    let acked = acked.lock().unwrap().clone();
    server.restart();
    let msgs = pop_all(&server, "alice@example.test", "pw");
    let missing: Vec<&String> = acked
        .iter()
        .filter(|s| {
            !msgs
                .iter()
                .any(|m| m.text.contains(&format!("Subject: {s}\r\n")))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged messages lost: {missing:?}",
        missing.len(),
        acked.len()
    );
}
