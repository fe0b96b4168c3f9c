//! POP3 against the real server: Python's poplib for every command, raw
//! bytes where a client library would hide what is tested (CAPA order,
//! dot-stuffing, pipelining, response codes), and the Debian clients mpop
//! and fetchmail fetching what SMTP delivered.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use base64::Engine as _;

use crate::smtp_local::{pop_all, Popped};
use crate::support::server::{python, Raw, TestServer};

const ALICE: &str = "alice@example.test";
const PW: &str = "wonderland";

/// Dovecot's CAPA before login, in its order (REFERENCE.md).
const CAPA: &[&str] = &[
    "TOP",
    "UIDL",
    "RESP-CODES",
    "PIPELINING",
    "AUTH-RESP-CODE",
    "USER",
    "SASL PLAIN",
];

/// Sends each message (CRLF text, not dot-stuffed: smtplib stuffs) from
/// carol to `to` with Python's smtplib, in one SMTP session.
fn send_mail(server: &TestServer, to: &str, messages: &[&str]) {
    let out = python(
        r#"
import smtplib, sys
host, port, to = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = smtplib.SMTP(host, port, timeout=20)
for body in sys.argv[4:]:
    refused = s.sendmail("carol@elsewhere.test", [to], body.encode())
    assert not refused, refused
s.quit()
print("sent", len(sys.argv) - 4)
"#,
        &[
            &server.smtp.ip().to_string(),
            &server.smtp.port().to_string(),
            to,
        ]
        .into_iter()
        .chain(messages.iter().copied())
        .collect::<Vec<_>>(),
    );
    assert_eq!(out.trim(), format!("sent {}", messages.len()));
}

/// A server with alice and `n` small messages in her maildrop.
fn server_with_messages(n: usize) -> TestServer {
    let server = TestServer::start();
    server.add_user(ALICE, PW);
    let bodies: Vec<String> = (1..=n)
        .map(|i| format!("Subject: message {i}\r\n\r\nbody {i}\r\n"))
        .collect();
    let refs: Vec<&str> = bodies.iter().map(String::as_str).collect();
    send_mail(&server, ALICE, &refs);
    server
}

/// A raw POP3 conversation.
struct Pop(Raw);

impl Pop {
    fn connect(server: &TestServer) -> Pop {
        let mut c = Raw::connect(server.pop3);
        let greeting = c.line();
        assert!(
            greeting.starts_with("+OK mx.example.test"),
            "greeting: {greeting}"
        );
        Pop(c)
    }

    /// Sends a line, returns the status line.
    fn cmd(&mut self, line: &str) -> String {
        self.0.send(format!("{line}\r\n").as_bytes());
        self.0.line()
    }

    /// The lines of a multi-line body up to (not including) the `.`, as
    /// sent: still dot-stuffed.
    fn body(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        // Bounded: a message in these tests has well under this many lines.
        for _ in 0..10_000 {
            let line = self.0.line();
            if line == "." {
                return lines;
            }
            lines.push(line);
        }
        panic!("no end of multi-line reply: {lines:?}");
    }

    /// Sends a multi-line command; returns the status line and the body.
    fn multi(&mut self, line: &str) -> (String, Vec<String>) {
        let status = self.cmd(line);
        assert!(status.starts_with("+OK"), "{line}: {status}");
        (status, self.body())
    }

    /// USER/PASS; returns the reply to PASS.
    fn login(&mut self, user: &str, password: &str) -> String {
        let r = self.cmd(&format!("USER {user}"));
        assert!(r.starts_with("+OK"), "USER: {r}");
        self.cmd(&format!("PASS {password}"))
    }

    fn uidls(&mut self) -> Vec<String> {
        self.multi("UIDL")
            .1
            .into_iter()
            .map(|l| l.split(' ').nth(1).expect("n uid").to_owned())
            .collect()
    }

    fn closed(&mut self) -> bool {
        self.0.closed()
    }
}

/// Logs in, waiting (bounded) while another session still holds the
/// maildrop: a dropped connection gives its lock up asynchronously.
fn login_when_free(server: &TestServer, user: &str, password: &str) -> Pop {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut c = Pop::connect(server);
        let r = c.login(user, password);
        if r.starts_with("+OK") {
            return c;
        }
        assert!(r.starts_with("-ERR [IN-USE]"), "login: {r}");
        assert!(Instant::now() < deadline, "maildrop never released");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn is_valid_uidl(u: &str) -> bool {
    (1..=70).contains(&u.len()) && u.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

#[test]
fn poplib_speaks_every_command() {
    let server = TestServer::start();
    server.add_user(ALICE, PW);
    send_mail(
        &server,
        ALICE,
        &[
            // Lines that need dot-stuffing, on both hops.
            "Subject: first\r\nFrom: carol@elsewhere.test\r\n\r\nbody 1\r\n.one dot\r\n..two dots\r\n.\r\nlast\r\n",
            "Subject: second\r\n\r\nshort\r\n",
            "Subject: third\r\n\r\nx\r\n",
        ],
    );
    let out = python(
        r#"
import json, poplib, sys
host, port, user, pw = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
d = lambda b: b.decode()
ls = lambda lines: [l.decode() for l in lines]
out = {}
p = poplib.POP3(host, port, timeout=20)
out["welcome"] = d(p.getwelcome())
out["capa_before"] = p.capa()
out["user"] = d(p.user(user))
out["pass"] = d(p.pass_(pw))
out["capa_after"] = p.capa()
out["stat"] = p.stat()
resp, lines, _ = p.list()
out["list"] = [d(resp), ls(lines)]
out["list2"] = d(p.list(2))
out["uidl"] = ls(p.uidl()[1])
out["uidl2"] = d(p.uidl(2))
out["top0"] = ls(p.top(1, 0)[1])
out["top2"] = ls(p.top(1, 2)[1])
out["retr"] = [ls(p.retr(n)[1]) for n in (1, 2, 3)]
out["noop"] = d(p.noop())
out["dele"] = d(p.dele(1))
out["stat_after_dele"] = p.stat()
try:
    p.retr(1)
except poplib.error_proto as e:
    out["retr_deleted"] = d(e.args[0])
out["rset"] = d(p.rset())
out["stat_after_rset"] = p.stat()
out["dele3"] = d(p.dele(3))
out["quit"] = d(p.quit())
p = poplib.POP3(host, port, timeout=20)
p.user(user)
p.pass_(pw)
out["uidl_next_session"] = ls(p.uidl()[1])
p.quit()
print(json.dumps(out))
"#,
        &[
            &server.pop3.ip().to_string(),
            &server.pop3.port().to_string(),
            ALICE,
            PW,
        ],
    );
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("JSON");
    let s = |k: &str| {
        v[k].as_str()
            .unwrap_or_else(|| panic!("{k}: {v}"))
            .to_owned()
    };
    let strings = |x: &serde_json::Value| -> Vec<String> {
        x.as_array()
            .unwrap_or_else(|| panic!("array: {x}"))
            .iter()
            .map(|l| l.as_str().expect("string").to_owned())
            .collect()
    };

    assert!(s("welcome").starts_with("+OK mx.example.test"));
    // poplib parses CAPA into {name: [params]}.
    let capa = v["capa_before"].as_object().expect("capa");
    for cap in [
        "TOP",
        "UIDL",
        "RESP-CODES",
        "PIPELINING",
        "AUTH-RESP-CODE",
        "USER",
    ] {
        assert!(capa.contains_key(cap), "{cap}: {capa:?}");
    }
    assert_eq!(capa["SASL"], serde_json::json!(["PLAIN"]));
    assert_eq!(capa.len(), 7, "{capa:?}");
    // After login the login mechanisms are no longer offered (RFC 2449 §5).
    let after = v["capa_after"].as_object().expect("capa");
    assert!(
        after.contains_key("UIDL") && !after.contains_key("USER") && !after.contains_key("SASL")
    );
    assert!(s("user").starts_with("+OK"));
    assert_eq!(s("pass"), "+OK Logged in.");

    // RETR as poplib un-stuffed it; LIST/STAT are exact for this CRLF form.
    let retr: Vec<Vec<String>> = v["retr"].as_array().unwrap().iter().map(strings).collect();
    let sizes: Vec<usize> = retr
        .iter()
        .map(|lines| lines.iter().map(|l| l.len() + 2).sum())
        .collect();
    let total: usize = sizes.iter().sum();
    assert_eq!(v["stat"], serde_json::json!([3, total]));
    let list = &v["list"];
    assert_eq!(
        list[0].as_str().unwrap(),
        format!("+OK 3 messages ({total} octets)")
    );
    assert_eq!(
        strings(&list[1]),
        sizes
            .iter()
            .enumerate()
            .map(|(i, n)| format!("{} {n}", i + 1))
            .collect::<Vec<_>>()
    );
    assert_eq!(s("list2"), format!("+OK 2 {}", sizes[1]));

    let uidl = strings(&v["uidl"]);
    let uids: Vec<&str> = uidl
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let (n, u) = l.split_once(' ').expect("n uid");
            assert_eq!(n, (i + 1).to_string());
            assert!(is_valid_uidl(u), "{u:?}");
            u
        })
        .collect();
    assert_eq!(uids.len(), 3);
    assert!(uids[0] != uids[1] && uids[1] != uids[2] && uids[0] != uids[2]);
    assert_eq!(s("uidl2"), format!("+OK 2 {}", uids[1]));

    // The first message, delivered with the local delivery headers on top.
    let first = &retr[0];
    assert_eq!(first[0], "Return-Path: <carol@elsewhere.test>");
    assert_eq!(first[1], "Delivered-To: alice@example.test");
    assert!(first[2].starts_with("Received: from "), "{first:?}");
    let blank = first.iter().position(String::is_empty).expect("blank line");
    assert_eq!(
        &first[blank..],
        ["", "body 1", ".one dot", "..two dots", ".", "last"],
        "dots survive SMTP stuffing and POP3 stuffing"
    );
    assert!(first[..blank].contains(&"Subject: first".to_owned()));
    assert!(retr[1].contains(&"Subject: second".to_owned()));
    assert_eq!(retr[2].last().unwrap(), "x");

    // TOP n 0 is the header and the blank line; TOP n 2 adds two body lines.
    assert_eq!(strings(&v["top0"]), first[..=blank]);
    assert_eq!(strings(&v["top2"]), first[..blank + 3]);

    assert_eq!(s("noop"), "+OK");
    assert_eq!(s("dele"), "+OK message 1 deleted");
    assert_eq!(
        v["stat_after_dele"],
        serde_json::json!([2, total - sizes[0]])
    );
    assert_eq!(s("retr_deleted"), "-ERR message 1 already deleted");
    assert_eq!(
        s("rset"),
        format!("+OK maildrop has 3 messages ({total} octets)")
    );
    assert_eq!(v["stat_after_rset"], serde_json::json!([3, total]));
    assert_eq!(s("dele3"), "+OK message 3 deleted");
    assert_eq!(s("quit"), "+OK Logging out.");
    // Only message 3 went, at QUIT; the others keep number and UIDL.
    assert_eq!(
        strings(&v["uidl_next_session"]),
        [format!("1 {}", uids[0]), format!("2 {}", uids[1])]
    );

    // Each session ends with one line of what it did (Dovecot's `Logged
    // out top=…, retr=…, del=…, size=…`): octets as in the store.
    let octets = |lines: &[String]| -> usize { lines.iter().map(|l| l.len() + 2).sum() };
    let top = octets(&first[..=blank]) + octets(&first[..blank + 3]);
    for line in [
        format!(
            "pop3 logout user={ALICE} reason=quit top=2/{top} retr=3/{total} del=1/3 size={total}"
        ),
        format!(
            "pop3 logout user={ALICE} reason=quit top=0/0 retr=0/0 del=0/2 size={}",
            total - sizes[2]
        ),
    ] {
        assert!(server.wait_for_log(&line), "{line}:\n{}", server.log());
    }
    assert!(!server.log().contains(PW), "the password is not logged");
}

#[test]
fn capa_and_retr_are_exact_on_the_wire() {
    let server = TestServer::start();
    server.add_user(ALICE, PW);
    let content = "Subject: dots\r\n\r\n.\r\n.leading\r\nmiddle . dot\r\n..\r\n";
    send_mail(&server, ALICE, &[content]);
    let mut c = Pop::connect(&server);
    let (status, capa) = c.multi("CAPA");
    assert_eq!(status, "+OK Capability list follows");
    assert_eq!(capa, CAPA);
    assert_eq!(c.login(ALICE, PW), "+OK Logged in.");
    let (_, capa) = c.multi("CAPA");
    assert_eq!(
        capa,
        ["TOP", "UIDL", "RESP-CODES", "PIPELINING", "AUTH-RESP-CODE"]
    );
    let size: usize = c.cmd("LIST 1")[6..].parse().expect("size");
    let (status, wire) = c.multi("RETR 1");
    assert_eq!(status, format!("+OK {size} octets"));
    // What went over the wire is stuffed; un-stuffed it is exactly `size`
    // octets in CRLF form, and ends with the message as sent.
    let blank = wire.iter().position(String::is_empty).expect("blank line");
    assert_eq!(
        &wire[blank..],
        ["", "..", "..leading", "middle . dot", "..."]
    );
    let unstuffed: usize = wire
        .iter()
        .map(|l| l.strip_prefix('.').unwrap_or(l).len() + 2)
        .sum();
    assert_eq!(unstuffed, size);
    let (status, top) = c.multi("TOP 1 1");
    assert_eq!(status, "+OK top of message follows");
    assert_eq!(top, wire[..blank + 2]);
    assert_eq!(c.cmd("QUIT"), "+OK Logging out.");
    assert!(c.closed());
}

#[test]
fn auth_plain_with_initial_response_and_continuation() {
    let server = server_with_messages(1);
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let good = b64(&format!("\0{ALICE}\0{PW}"));

    // Initial response on the AUTH line (RFC 5034).
    let mut c = Pop::connect(&server);
    assert_eq!(c.cmd(&format!("AUTH PLAIN {good}")), "+OK Logged in.");
    assert!(c.cmd("STAT").starts_with("+OK 1 "));
    assert_eq!(c.cmd("QUIT"), "+OK Logging out.");

    // Empty challenge, then the response; an authzid equal to the user is fine.
    let mut c = Pop::connect(&server);
    let (status, mechs) = c.multi("AUTH");
    assert!(status.starts_with("+OK"));
    assert_eq!(mechs, ["PLAIN"]);
    assert_eq!(
        c.cmd("AUTH CRAM-MD5"),
        "-ERR Unsupported authentication mechanism."
    );
    assert_eq!(c.cmd("AUTH PLAIN"), "+ ");
    assert_eq!(c.cmd("*"), "-ERR Authentication cancelled.");
    assert_eq!(c.cmd("AUTH PLAIN"), "+ ");
    assert_eq!(c.cmd("not base64!"), "-ERR Invalid base64 data.");
    assert_eq!(
        c.cmd(&format!("AUTH PLAIN {}", b64("no separators"))),
        "-ERR Invalid SASL PLAIN response."
    );
    assert_eq!(
        c.cmd(&format!("AUTH PLAIN {}", b64(&format!("\0{ALICE}\0wrong")))),
        "-ERR [AUTH] Authentication failed."
    );
    assert_eq!(
        c.cmd(&format!(
            "AUTH PLAIN {}",
            b64(&format!("postmaster@example.test\0{ALICE}\0{PW}"))
        )),
        "-ERR [AUTH] Authorization identity not permitted."
    );
    assert_eq!(c.cmd("AUTH PLAIN"), "+ ");
    assert_eq!(
        c.cmd(&b64(&format!("{ALICE}\0{ALICE}\0{PW}"))),
        "+OK Logged in."
    );
    assert_eq!(c.uidls().len(), 1);
    assert_eq!(c.cmd("QUIT"), "+OK Logging out.");

    // poplib has no AUTH helper; its raw command path works all the same.
    let out = python(
        r#"
import base64, poplib, sys
host, port, user, pw = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
p = poplib.POP3(host, port, timeout=20)
token = base64.b64encode(b"\0" + user.encode() + b"\0" + pw.encode()).decode()
print(p._shortcmd("AUTH PLAIN " + token).decode())
print(p.stat()[0])
print(p.quit().decode())
"#,
        &[
            &server.pop3.ip().to_string(),
            &server.pop3.port().to_string(),
            ALICE,
            PW,
        ],
    );
    assert_eq!(out, "+OK Logged in.\n1\n+OK Logging out.\n");
}

#[test]
fn wrong_password_gets_auth_response_code_after_a_delay() {
    let server = server_with_messages(1);
    let out = python(
        r#"
import poplib, sys
host, port, user, pw = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
p = poplib.POP3(host, port, timeout=20)
for who, secret in [(user, "wrong"), ("nobody@example.test", pw), (user, pw)]:
    p.user(who)
    try:
        print(p.pass_(secret).decode())
    except poplib.error_proto as e:
        print(e.args[0].decode())
p.quit()
"#,
        &[
            &server.pop3.ip().to_string(),
            &server.pop3.port().to_string(),
            ALICE,
            PW,
        ],
    );
    // Unknown user and wrong password look the same; the session goes on.
    assert_eq!(
        out,
        "-ERR [AUTH] Authentication failed.\n-ERR [AUTH] Authentication failed.\n+OK Logged in.\n"
    );
    // The test config sets auth_failure_delay = 10ms: the failure is not instant.
    let mut c = Pop::connect(&server);
    c.cmd(&format!("USER {ALICE}"));
    let start = Instant::now();
    assert_eq!(c.cmd("PASS nope"), "-ERR [AUTH] Authentication failed.");
    assert!(start.elapsed() >= Duration::from_millis(10));
}

#[test]
fn deletions_happen_only_at_quit() {
    let server = server_with_messages(3);
    let mut c = login_when_free(&server, ALICE, PW);
    let uids = c.uidls();
    assert_eq!(uids.len(), 3);

    // A dropped connection deletes nothing.
    assert_eq!(c.cmd("DELE 1"), "+OK message 1 deleted");
    assert_eq!(c.cmd("DELE 2"), "+OK message 2 deleted");
    drop(c);
    let mut c = login_when_free(&server, ALICE, PW);
    assert_eq!(c.uidls(), uids, "dropped connection deleted something");
    let dropped = format!("pop3 logout user={ALICE} reason=disconnected top=0/0 retr=0/0 del=0/3");
    assert!(
        server.wait_for_log(&dropped),
        "{dropped}:\n{}",
        server.log()
    );

    // DELE, RSET, QUIT deletes nothing.
    assert_eq!(c.cmd("DELE 1"), "+OK message 1 deleted");
    assert_eq!(c.cmd("DELE 3"), "+OK message 3 deleted");
    assert!(c.cmd("RSET").starts_with("+OK maildrop has 3 messages"));
    assert_eq!(c.cmd("QUIT"), "+OK Logging out.");
    let mut c = login_when_free(&server, ALICE, PW);
    assert_eq!(c.uidls(), uids, "RSET undid the deletions");

    // DELE then QUIT deletes; the rest keep their UIDLs.
    assert_eq!(c.cmd("DELE 2"), "+OK message 2 deleted");
    assert_eq!(c.uidls(), [uids[0].clone(), uids[2].clone()]);
    assert_eq!(c.cmd("QUIT"), "+OK Logging out.");
    let mut c = login_when_free(&server, ALICE, PW);
    assert_eq!(c.uidls(), [uids[0].clone(), uids[2].clone()]);
    let (_, list) = c.multi("LIST");
    assert_eq!(list.len(), 2);
    assert!(list[0].starts_with("1 ") && list[1].starts_with("2 "));
    assert!(c.cmd("QUIT").starts_with("+OK"));
    assert!(server.wait_for_log("pop3 expunge mailbox=alice@example.test deleted=1"));
}

#[test]
fn uidls_are_stable_across_sessions_and_restarts() {
    let mut server = server_with_messages(3);
    let mut c = login_when_free(&server, ALICE, PW);
    let uids = c.uidls();
    assert!(uids.iter().all(|u| is_valid_uidl(u)), "{uids:?}");
    assert_eq!(c.cmd("QUIT"), "+OK Logging out.");
    let mut c = login_when_free(&server, ALICE, PW);
    assert_eq!(c.uidls(), uids, "same UIDLs in the next session");
    assert_eq!(c.cmd("DELE 2"), "+OK message 2 deleted");
    assert_eq!(c.cmd("QUIT"), "+OK Logging out.");
    let kept = vec![uids[0].clone(), uids[2].clone()];

    // kill -9 while a session holds the maildrop with a deletion pending:
    // after the restart the lock is gone and nothing was deleted.
    let mut c = login_when_free(&server, ALICE, PW);
    assert_eq!(c.cmd("DELE 1"), "+OK message 1 deleted");
    server.kill9();
    assert!(c.closed());
    server.restart();
    let mut c = login_when_free(&server, ALICE, PW);
    assert_eq!(c.uidls(), kept, "same UIDLs after kill -9 and restart");
    assert_eq!(c.cmd("QUIT"), "+OK Logging out.");

    // A new message gets a UIDL never used before, not the deleted one's.
    send_mail(&server, ALICE, &["Subject: after restart\r\n\r\nnew\r\n"]);
    let mut c = login_when_free(&server, ALICE, PW);
    let now = c.uidls();
    assert_eq!(now[..2], kept[..]);
    assert!(!uids.contains(&now[2]), "{now:?} vs {uids:?}");
    assert!(is_valid_uidl(&now[2]));
}

#[test]
fn second_session_gets_in_use_until_the_first_quits_or_drops() {
    let server = server_with_messages(2);
    let mut a = login_when_free(&server, ALICE, PW);
    let a_uids = a.uidls();
    assert_eq!(a.cmd("STAT").split(' ').nth(1), Some("2"));

    let mut b = Pop::connect(&server);
    assert_eq!(
        b.login(ALICE, PW),
        "-ERR [IN-USE] Mailbox is locked by another session."
    );

    // New mail while A holds the maildrop does not renumber A's messages.
    send_mail(&server, ALICE, &["Subject: arrived later\r\n\r\nlate\r\n"]);
    assert_eq!(a.uidls(), a_uids);
    assert_eq!(a.cmd("STAT").split(' ').nth(1), Some("2"));
    assert_eq!(a.cmd("RETR 3"), "-ERR There's no message 3.");
    assert_eq!(a.cmd("DELE 1"), "+OK message 1 deleted");
    assert_eq!(a.cmd("QUIT"), "+OK Logging out.");

    // A's QUIT released the lock before its reply: B gets in at once, and
    // sees A's message 2 as its message 1, then the new one.
    assert_eq!(b.login(ALICE, PW), "+OK Logged in.");
    let b_uids = b.uidls();
    assert_eq!(b_uids.len(), 2);
    assert_eq!(b_uids[0], a_uids[1]);
    assert!(!a_uids.contains(&b_uids[1]));
    let (_, retr) = b.multi("RETR 2");
    assert!(retr.contains(&"Subject: arrived later".to_owned()));

    // C is refused while B holds it, and gets in after B drops.
    let mut c = Pop::connect(&server);
    assert!(c.login(ALICE, PW).starts_with("-ERR [IN-USE]"));
    assert!(
        c.cmd("STAT").starts_with("-ERR"),
        "still in AUTHORIZATION after IN-USE"
    );
    drop(b);
    let mut c = login_when_free(&server, ALICE, PW);
    assert_eq!(
        c.uidls(),
        b_uids,
        "B dropped: nothing deleted, same numbers"
    );
    assert_eq!(c.cmd("QUIT"), "+OK Logging out.");

    // QUIT gives the lock up before its +OK: logging in again at once works.
    for _ in 0..5 {
        let mut again = Pop::connect(&server);
        assert_eq!(again.login(ALICE, PW), "+OK Logged in.");
        assert_eq!(again.cmd("QUIT"), "+OK Logging out.");
    }

    // Other mailboxes are not affected by alice's lock.
    server.add_user("bob@example.test", "pw2");
    let mut a = Pop::connect(&server);
    assert_eq!(a.login(ALICE, PW), "+OK Logged in.");
    let mut bob = Pop::connect(&server);
    assert_eq!(bob.login("bob@example.test", "pw2"), "+OK Logged in.");
    assert_eq!(a.cmd("QUIT"), "+OK Logging out.");
    assert_eq!(bob.cmd("QUIT"), "+OK Logging out.");
}

#[test]
fn pipelined_commands_get_replies_in_order() {
    let server = server_with_messages(2);
    let mut c = Pop::connect(&server);
    // Everything in one write, the login included: the server holds the
    // lines after PASS until the password is checked.
    c.0.send(
        format!(
            "CAPA\r\nUSER {ALICE}\r\nPASS {PW}\r\nSTAT\r\nLIST\r\nUIDL 2\r\nRETR 1\r\nTOP 2 0\r\n\
             NOOP\r\nBOGUS\r\nDELE 1\r\nLIST 1\r\nRSET\r\nDELE 2\r\nQUIT\r\n"
        )
        .as_bytes(),
    );
    let line = |c: &mut Pop| c.0.line();
    assert_eq!(line(&mut c), "+OK Capability list follows");
    assert_eq!(c.body(), CAPA);
    assert!(line(&mut c).starts_with("+OK")); // USER
    assert_eq!(line(&mut c), "+OK Logged in.");
    let stat = line(&mut c);
    assert!(stat.starts_with("+OK 2 "), "{stat}");
    assert!(line(&mut c).starts_with("+OK 2 messages"));
    let list = c.body();
    assert_eq!(list.len(), 2);
    let uidl2 = line(&mut c);
    assert!(uidl2.starts_with("+OK 2 "), "{uidl2}");
    let retr = line(&mut c);
    let size1 = list[0].split(' ').nth(1).unwrap();
    assert_eq!(retr, format!("+OK {size1} octets"));
    let body = c.body();
    assert_eq!(body.last().unwrap(), "body 1");
    assert_eq!(line(&mut c), "+OK top of message follows");
    let top = c.body();
    assert!(top.contains(&"Subject: message 2".to_owned()));
    assert_eq!(top.last().unwrap(), "");
    assert_eq!(line(&mut c), "+OK"); // NOOP
    assert_eq!(line(&mut c), "-ERR Unknown command");
    assert_eq!(line(&mut c), "+OK message 1 deleted");
    assert_eq!(line(&mut c), "-ERR message 1 already deleted");
    assert!(line(&mut c).starts_with("+OK maildrop has 2 messages"));
    assert_eq!(line(&mut c), "+OK message 2 deleted");
    assert_eq!(line(&mut c), "+OK Logging out.");
    assert!(c.closed());

    // Only message 2 was deleted (RSET came before its DELE).
    let left = pop_all(&server, ALICE, PW);
    assert_eq!(left.len(), 1);
    assert!(left[0].text.contains("Subject: message 1\r\n"));
}

#[test]
fn commands_in_the_wrong_state_and_bad_message_numbers() {
    let server = server_with_messages(2);

    // AUTHORIZATION state: transaction commands are refused.
    let mut c = Pop::connect(&server);
    for cmd in [
        "STAT", "LIST", "LIST 1", "RETR 1", "DELE 1", "UIDL", "TOP 1 0", "NOOP", "RSET",
    ] {
        assert_eq!(c.cmd(cmd), "-ERR Not logged in.", "{cmd}");
    }
    assert_eq!(c.cmd("PASS secret"), "-ERR No username given.");
    assert_eq!(c.cmd("STLS"), "-ERR TLS support isn't enabled.");
    assert_eq!(c.cmd("USER"), "-ERR Syntax error, expected: USER name");
    assert_eq!(c.cmd("QUIT"), "+OK Logging out.");
    assert!(c.closed());

    // TRANSACTION state: login commands are refused, bad numbers answered.
    // (A new session: each refusal above counted as a bad command.)
    let mut c = login_when_free(&server, ALICE, PW);
    assert_eq!(c.cmd("USER bob"), "-ERR Already logged in.");
    assert_eq!(c.cmd("PASS x"), "-ERR Already logged in.");
    assert_eq!(c.cmd("AUTH PLAIN AGFAAGI="), "-ERR Already logged in.");
    for (cmd, want) in [
        ("RETR 0", "-ERR There's no message 0."),
        ("RETR 3", "-ERR There's no message 3."),
        ("LIST 99", "-ERR There's no message 99."),
        ("UIDL 4294967296", "-ERR There's no message 4294967295."),
        ("TOP 7 0", "-ERR There's no message 7."),
        ("DELE 3", "-ERR There's no message 3."),
        ("RETR abc", "-ERR Syntax error, expected: RETR msg"),
        ("RETR", "-ERR Syntax error, expected: RETR msg"),
        ("RETR -1", "-ERR Syntax error, expected: RETR msg"),
        ("TOP 1", "-ERR Syntax error, expected: TOP msg n"),
        ("LIST 1 2", "-ERR Syntax error, expected: LIST [msg]"),
        ("STAT now", "-ERR Syntax error, expected: STAT"),
        ("", "-ERR Unknown command"),
        ("XYZZY", "-ERR Unknown command"),
    ] {
        assert_eq!(c.cmd(cmd), want, "{cmd:?}");
    }
    // Garbage bytes and an overlong line get an -ERR; the session goes on.
    c.0.send(b"\xff\xfe\x00garbage\r\n");
    assert!(c.0.line().starts_with("-ERR"));
    assert_eq!(
        c.cmd(&format!("NOOP {}", "x".repeat(5000))),
        "-ERR line too long"
    );
    assert_eq!(c.cmd("DELE 1"), "+OK message 1 deleted");
    assert_eq!(c.cmd("DELE 1"), "-ERR message 1 already deleted");
    assert_eq!(c.cmd("RETR 1"), "-ERR message 1 already deleted");
    assert_eq!(c.cmd("TOP 1 0"), "-ERR message 1 already deleted");
    assert_eq!(c.cmd("UIDL 1"), "-ERR message 1 already deleted");
    assert_eq!(c.cmd("LIST 1"), "-ERR message 1 already deleted");
    let (_, list) = c.multi("LIST");
    assert_eq!(list.len(), 1);
    assert!(list[0].starts_with("2 "), "{list:?}");
    assert!(c.cmd("NOOP").starts_with("+OK"));
    assert_eq!(c.cmd("QUIT"), "+OK Logging out.");
    assert!(c.closed());
    assert_eq!(pop_all(&server, ALICE, PW).len(), 1);

    // Too many bad commands close the session, as Dovecot does.
    let mut c = Pop::connect(&server);
    for _ in 0..20 {
        assert_eq!(c.cmd("BOGUS"), "-ERR Unknown command");
    }
    assert_eq!(c.cmd("BOGUS"), "-ERR Unknown command");
    assert_eq!(c.0.line(), "-ERR Too many bad commands.");
    assert!(c.closed());
    // And the server goes on serving.
    let mut c = login_when_free(&server, ALICE, PW);
    assert_eq!(c.uidls().len(), 1);
}

/// Runs a command with a bound on its time (coreutils `timeout`).
fn run_bounded(program: &str, args: &[&str], home: &Path) -> Output {
    Command::new("timeout")
        .arg("60")
        .arg(program)
        .args(args)
        .env("HOME", home)
        .output()
        .unwrap_or_else(|e| panic!("{program} is installed (.ci/run installs it): {e}"))
}

/// Messages with what mbox and line-based clients find hard: dots, `From `
/// lines, an mboxrd-quoted line, a long line.
fn tricky_messages() -> Vec<String> {
    vec![
        "Subject: one\r\nFrom: carol@elsewhere.test\r\n\r\nline 1\r\n.dot line\r\n.\r\nFrom here on\r\n>From quoted\r\nend\r\n".to_owned(),
        format!("Subject: two\r\n\r\n{}\r\n\r\nlast\r\n", "long ".repeat(150)),
    ]
}

/// The messages as a client that stores Unix line ends should have them.
fn lf_texts(msgs: &[Popped]) -> Vec<String> {
    msgs.iter().map(|m| m.text.replace("\r\n", "\n")).collect()
}

#[test]
fn mpop_retrieves_what_smtp_delivered() {
    let server = TestServer::start();
    server.add_user(ALICE, PW);
    let msgs = tricky_messages();
    send_mail(
        &server,
        ALICE,
        &msgs.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    // What RETR gives (poplib reads without deleting).
    let expected = lf_texts(&pop_all(&server, ALICE, PW));
    assert_eq!(expected.len(), 2);

    let work = tempfile::tempdir().unwrap();
    let maildir = work.path().join("Maildir");
    for sub in ["cur", "new", "tmp"] {
        std::fs::create_dir_all(maildir.join(sub)).unwrap();
    }
    let port = server.pop3.port().to_string();
    let mpop = |extra: &[&str]| {
        let mut args = vec![
            "--host=127.0.0.1".to_owned(),
            format!("--port={port}"),
            format!("--user={ALICE}"),
            format!("--passwordeval=echo {PW}"),
            "--tls=off".to_owned(),
            "--received-header=off".to_owned(),
            format!("--uidls-file={}", work.path().join("uidls").display()),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run_bounded("mpop", &args, work.path());
        assert!(
            out.status.success(),
            "mpop {args:?}:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };

    // 1. Keep on the server, deliver to a maildir (one file per message):
    //    byte for byte what RETR sent, with Unix line ends.
    mpop(&[
        "--auth=user",
        "--keep=on",
        &format!("--delivery=maildir,{}", maildir.display()),
    ]);
    let mut got: Vec<String> = std::fs::read_dir(maildir.join("new"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    got.sort();
    let mut want = expected.clone();
    want.sort();
    assert_eq!(got, want);
    assert_eq!(pop_all(&server, ALICE, PW).len(), 2, "--keep=on kept them");

    // 2. SASL PLAIN, all messages again, to an mbox, deleting them.
    let mbox = work.path().join("inbox.mbox");
    mpop(&[
        "--auth=plain",
        "--keep=off",
        "--only-new=off",
        &format!("--delivery=mbox,{}", mbox.display()),
    ]);
    let text = std::fs::read_to_string(&mbox).unwrap();
    assert_eq!(parse_mboxrd(&text), expected, "{text}");
    assert!(
        pop_all(&server, ALICE, PW).is_empty(),
        "--keep=off deleted them"
    );
    assert!(server.wait_for_log("pop3 expunge mailbox=alice@example.test deleted=2"));
}

/// Splits an MBOXRD file into messages and undoes its `>From ` quoting.
fn parse_mboxrd(text: &str) -> Vec<String> {
    let mut messages: Vec<String> = Vec::new();
    for line in text.split_inclusive('\n') {
        if line.starts_with("From ") {
            messages.push(String::new());
            continue;
        }
        let current = messages.last_mut().expect("mbox starts with a From line");
        let unquoted = if line.trim_start_matches('>').starts_with("From ") {
            &line[1..]
        } else {
            line
        };
        current.push_str(unquoted);
    }
    // Each message is followed by one empty line before the next From line.
    for m in &mut messages {
        assert!(m.ends_with("\n\n"), "{m:?}");
        m.pop();
    }
    messages
}

#[test]
fn fetchmail_retrieves_what_smtp_delivered() {
    let server = TestServer::start();
    server.add_user(ALICE, PW);
    let msgs = tricky_messages();
    send_mail(
        &server,
        ALICE,
        &msgs.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let expected = lf_texts(&pop_all(&server, ALICE, PW));

    let work = tempfile::tempdir().unwrap();
    let out_file = work.path().join("delivered");
    let fetch = |keep: &str| {
        // fetchmail insists on a private run-control file.
        let rc = work.path().join("fetchmailrc");
        std::fs::write(
            &rc,
            format!(
                "set no syslog\n\
                 poll 127.0.0.1 protocol POP3 port {port} auth password timeout 30\n  \
                 user \"{ALICE}\" there with password \"{PW}\" is \"{local}\" here\n  \
                 sslproto '' no sslcertck {keep} fetchall no rewrite\n",
                port = server.pop3.port(),
                local = whoami(),
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&rc, std::fs::Permissions::from_mode(0o600)).unwrap();
        let _ = std::fs::remove_file(&out_file);
        let args = [
            "-f".to_owned(),
            rc.display().to_string(),
            "--pidfile".to_owned(),
            work.path().join("pid").display().to_string(),
            "-i".to_owned(),
            work.path().join("fetchids").display().to_string(),
            "--nosyslog".to_owned(),
            // No Received: header of its own, so the content can be compared.
            "--invisible".to_owned(),
            "--mda".to_owned(),
            format!("cat >> {}", out_file.display()),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run_bounded("fetchmail", &args, work.path());
        assert!(
            out.status.success(),
            "fetchmail (exit 0 = mail retrieved):\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::read_to_string(&out_file).unwrap()
    };

    // Keep on the server first: both arrive, byte for byte, in order.
    assert_eq!(fetch("keep"), expected.concat());
    assert_eq!(pop_all(&server, ALICE, PW).len(), 2);
    // Then fetch and delete.
    assert_eq!(fetch("nokeep"), expected.concat());
    assert!(pop_all(&server, ALICE, PW).is_empty());
}

/// The local user fetchmail delivers for (it only names it in headers here,
/// since the MDA is `cat`).
fn whoami() -> String {
    std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "root".into())
}
