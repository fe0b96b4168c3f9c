//! The administrator's queue tools against the real server and its store:
//! mail submitted with Python's smtplib to a domain whose MX (aiosmtpd, on
//! 127.x.y.z, found through dnsmasq) is down, so it waits deferred; then
//! hold and release, flush of one domain, bulk delete by sender, `cat`
//! and `--json` (read back with Python's json).

use std::net::Ipv4Addr;

use crate::delivery::{relay_config, wait_line, wait_messages};
use crate::support::dns::{Dnsmasq, Zone};
use crate::support::mx::{Sink, SinkOptions};
use crate::support::server::{python, TestServer};
use crate::support::{free_tcp_port, unique_loopback};

/// postino relaying `q.test` and `r.test` to an MX on `ip:port` (down
/// until a test starts a sink there), retrying only after an hour, so a
/// message moves only when a tool moves it.
fn relay(ip: Ipv4Addr, port: u16) -> (TestServer, Dnsmasq) {
    let dns = Dnsmasq::start(
        &Zone::new("test")
            .mx("q.test", "mx.q.test", 10)
            .mx("r.test", "mx.q.test", 10)
            .a("mx.q.test", ip),
    );
    let server = TestServer::start_with(&relay_config(Some(&dns), port, r#"retry = ["1h"]"#, ""));
    (server, dns)
}

/// Submits one message with smtplib; returns its queue id (from the 250
/// reply) once its first attempt was deferred.
fn submit(server: &TestServer, from: &str, to: &str, subject: &str) -> String {
    let id = python(
        r#"
import smtplib, sys
host, port, sender, rcpt, subject = sys.argv[1:6]
s = smtplib.SMTP(host, int(port), timeout=20)
s.ehlo("client.test")
s.mail(sender)
s.rcpt(rcpt)
code, reply = s.data(f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: {subject}\r\n\r\nbody of {subject}\r\n".encode())
assert code == 250, (code, reply)
s.quit()
print(reply.decode().rsplit(" ", 1)[1])
"#,
        &[
            &server.smtp.ip().to_string(),
            &server.smtp.port().to_string(),
            from,
            to,
            subject,
        ],
    )
    .trim()
    .to_owned();
    wait_line(server, &[&format!("id={id}"), "status=deferred"]);
    id
}

/// Runs `postino queue ARGS`; returns standard output, asserting success.
fn queue(server: &TestServer, args: &[&str]) -> String {
    let mut all = vec!["queue"];
    all.extend_from_slice(args);
    let out = server.cli(&all, "");
    assert!(
        out.status.success(),
        "postino {all:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `queue list --json` read by Python's json module: (id, state, sender)
/// of each message, one per line.
fn listed(server: &TestServer, args: &[&str]) -> Vec<(String, String, String)> {
    let mut all = vec!["list", "--json"];
    all.extend_from_slice(args);
    let ndjson = queue(server, &all);
    python(
        r#"
import json, sys
for line in sys.argv[1].splitlines():
    m = json.loads(line)
    assert isinstance(m["recipients"], list) and m["size"] > 0, m
    print(m["id"], m["state"], m["sender"] or "<>")
"#,
        &[&ndjson],
    )
    .lines()
    .map(|l| {
        let mut f = l.split(' ').map(str::to_owned);
        (f.next().unwrap(), f.next().unwrap(), f.next().unwrap())
    })
    .collect()
}

#[test]
fn a_held_message_waits_for_its_release_across_a_restart() {
    let ip = unique_loopback();
    let port = free_tcp_port(&[ip]);
    let (mut server, _dns) = relay(ip, port);
    server.add_user("alice@example.test", "pw");
    let held = submit(&server, "alice@example.test", "held@q.test", "held");
    let free = submit(&server, "alice@example.test", "free@q.test", "free");

    assert_eq!(queue(&server, &["hold", &held]).trim(), "1 message(s) held");
    assert_eq!(
        listed(&server, &["--state", "held"]),
        [(held.clone(), "held".into(), "alice@example.test".into())]
    );
    // The hold is in the store, not in the running server's memory.
    server.restart();
    let states = listed(&server, &[]);
    assert!(
        states.contains(&(held.clone(), "held".into(), "alice@example.test".into())),
        "{states:?}"
    );

    // The MX is up and the whole queue is flushed: only the free message goes.
    let sink = Sink::start(ip, port, &SinkOptions::default());
    queue(&server, &["flush"]);
    let got = wait_messages(&sink, 1);
    assert_eq!(got[0].rcpt_tos, ["free@q.test"]);
    wait_line(&server, &["removed from queue", &format!("id={free}")]);
    assert_eq!(
        listed(&server, &[]),
        [(held.clone(), "held".into(), "alice@example.test".into())],
        "the held message is still queued and held"
    );
    assert_eq!(sink.messages().len(), 1, "nothing else was delivered");

    // Released: delivered at once, without a flush.
    assert_eq!(
        queue(&server, &["release", &held]).trim(),
        "1 message(s) released"
    );
    let got = wait_messages(&sink, 2);
    assert_eq!(got.len(), 2);
    assert_eq!(got[1].rcpt_tos, ["held@q.test"]);
    wait_line(&server, &["removed from queue", &format!("id={held}")]);
    assert!(queue(&server, &["list"]).contains("-- 0 message(s) in the queue"));
}

#[test]
fn flush_of_one_domain_bulk_delete_by_sender_and_cat() {
    let ip = unique_loopback();
    let port = free_tcp_port(&[ip]);
    let (server, _dns) = relay(ip, port);
    server.add_user("alice@example.test", "pw");
    let q = submit(&server, "alice@example.test", "one@q.test", "for q");
    let r = submit(&server, "alice@example.test", "two@r.test", "for r");
    let spam: Vec<String> = (0..3)
        .map(|n| {
            submit(
                &server,
                "Bob@example.test",
                "x@q.test",
                &format!("spam {n}"),
            )
        })
        .collect();

    // cat: the message as submitted, or one part of it.
    let all = queue(&server, &["cat", &q]);
    assert!(all.contains("Subject: for q\n"), "{all}");
    assert!(all.contains("\n\nbody of for q\n"), "{all}");
    let headers = queue(&server, &["cat", "--headers", &q]);
    assert!(
        headers.contains("Subject: for q") && !headers.contains("body of"),
        "{headers}"
    );
    let body = queue(&server, &["cat", "--body", &q]);
    assert_eq!(body, "body of for q\n");

    // The table: one aligned line per message (same column starts).
    let table = queue(&server, &["list", "--sender", "bob@example.test"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 5, "header, 3 messages, count: {table}");
    assert!(lines[4].contains("-- 3 message(s) matched"), "{table}");
    let state_at = lines[0].find("STATE").unwrap();
    let sender_at = lines[0].find("SENDER").unwrap();
    for (line, id) in lines[1..4].iter().zip(&spam) {
        assert!(line.starts_with(id.as_str()), "{table}");
        assert_eq!(&line[state_at..state_at + 8], "deferred", "{table}");
        assert!(
            line[sender_at..]
                .to_ascii_lowercase()
                .starts_with("<bob@example.test>"),
            "{table}"
        );
    }

    // Bulk delete needs ids or a filter.
    let out = server.cli(&["queue", "delete"], "");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("name queue ids or a filter"),
        "{out:?}"
    );
    assert_eq!(
        queue(&server, &["delete", "--sender", "bob@example.test"]).trim(),
        "3 message(s) deleted"
    );
    let left = listed(&server, &[]);
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(left
        .iter()
        .all(|(_, state, sender)| state == "deferred" && sender == "alice@example.test"));

    // Flush one domain: r.test stays where it is.
    let sink = Sink::start(ip, port, &SinkOptions::default());
    assert_eq!(
        queue(&server, &["flush", "--domain", "q.test"]).trim(),
        "1 message(s) scheduled for delivery now"
    );
    let got = wait_messages(&sink, 1);
    assert_eq!(got[0].rcpt_tos, ["one@q.test"]);
    wait_line(&server, &["removed from queue", &format!("id={q}")]);
    assert_eq!(
        listed(&server, &[]),
        [(r.clone(), "deferred".into(), "alice@example.test".into())]
    );
    assert_eq!(sink.messages().len(), 1, "nothing else was delivered");
}

/// Without a server the same tools work on the store; unknown ids fail.
#[test]
fn the_tools_work_offline_and_unknown_ids_fail() {
    let ip = unique_loopback();
    let port = free_tcp_port(&[ip]);
    let (mut server, _dns) = relay(ip, port);
    server.add_user("alice@example.test", "pw");
    let a = submit(&server, "alice@example.test", "a@q.test", "a");
    let b = submit(&server, "alice@example.test", "b@r.test", "b");
    assert_eq!(server.terminate(), Some(0), "{}", server.log());

    assert_eq!(
        queue(&server, &["hold", "--domain", "r.test"]).trim(),
        "1 message(s) held"
    );
    assert_eq!(
        queue(&server, &["requeue", "--state", "deferred"]).trim(),
        "1 message(s) requeued"
    );
    let all = listed(&server, &[]);
    assert_eq!(
        all,
        [
            (a.clone(), "incoming".into(), "alice@example.test".into()),
            (b.clone(), "held".into(), "alice@example.test".into()),
        ]
    );
    assert!(queue(&server, &["cat", &b]).contains("Subject: b"));
    for args in [
        &["cat", "00DEADBEEF"][..],
        &["hold", "00DEADBEEF"],
        &["release", "00DEADBEEF"],
        &["list", "--json", "--older-than", "nonsense"],
        &["bounce", "--domain", "q.test"],
    ] {
        let mut all = vec!["queue"];
        all.extend_from_slice(args);
        let out = server.cli(&all, "");
        assert!(!out.status.success(), "{all:?}: {out:?}");
        assert!(!out.stderr.is_empty(), "{all:?}: {out:?}");
    }
    let check = server.cli(&["store", "check"], "");
    assert!(
        check.status.success(),
        "a held entry is not damage: {check:?}"
    );
}
