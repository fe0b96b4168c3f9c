//! The log a postmaster reads (issue 11, point 1): Postfix-style reject,
//! accepted and disconnect lines, auth lines fail2ban can act on (checked
//! with Debian's `fail2ban-regex` and the shipped filter), and
//! `log.format = "json"`.

use std::path::PathBuf;
use std::process::Command;
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

/// Waits (bounded) until `needle` was logged on at least `n` lines.
fn wait_count(server: &TestServer, needle: &str, n: usize) {
    let count = || server.log().lines().filter(|l| l.contains(needle)).count();
    assert!(
        wait_until(Duration::from_secs(20), || count() >= n),
        "expected {n} × {needle:?} in the log:\n{}",
        server.log()
    );
}

/// The one log line containing all of `needles`.
fn line_with(log: &str, needles: &[&str]) -> String {
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .collect();
    assert_eq!(lines.len(), 1, "{needles:?} in:\n{log}");
    lines[0].to_owned()
}

/// No relaying for 127.0.0.1 without AUTH, so a remote recipient is refused.
fn no_relay_config(rest: &str) -> String {
    config_text("", "", "relay_networks = []", rest)
}

/// An SMTP connection past its greeting.
fn connect(server: &TestServer) -> Raw {
    let mut c = Raw::connect(server.smtp);
    assert!(c.reply().starts_with("220 "));
    c
}

/// One session with an unknown user, a relay refusal, a good message and
/// QUIT; then an authenticated one. The reject lines carry the code, the
/// enhanced code, the client, the HELO name, the sender and the recipient;
/// the accepted lines the size, the Message-ID and the SASL user; each
/// session ends with Postfix's command counts.
#[test]
fn reject_accepted_and_disconnect_lines() {
    let server = TestServer::start_with(&no_relay_config(""));
    server.add_user(ALICE, "wonderland");

    let mut c = connect(&server);
    let peer = format!("smtp{{peer={}}}", c.local_addr());
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    assert_eq!(c.cmd("MAIL FROM:<bob@remote.test>"), "250 2.1.0 Ok");
    assert!(c
        .cmd("RCPT TO:<nobody@example.test>")
        .starts_with("550 5.1.1"));
    assert!(c
        .cmd("RCPT TO:<carol@elsewhere.test>")
        .starts_with("554 5.7.1"));
    assert_eq!(c.cmd("RCPT TO:<alice@example.test>"), "250 2.1.5 Ok");
    assert!(c.cmd("DATA").starts_with("354"));
    let body = "Message-ID: <first@client.test>\r\nSubject: hi\r\n\r\nhello\r\n.";
    assert!(c.cmd(body).starts_with("250 2.0.0"));
    assert!(c.cmd("QUIT").starts_with("221"));
    assert!(c.closed());

    wait_count(&server, "disconnect from", 1);
    let log = server.log();
    let rejects: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&peer) && l.contains("NOQUEUE: reject: "))
        .collect();
    assert_eq!(rejects.len(), 2, "{log}");
    assert!(
        rejects[0].ends_with(
            "NOQUEUE: reject: RCPT from [127.0.0.1]: 550 5.1.1 <nobody@example.test>: \
             Recipient address rejected: User unknown; from=<bob@remote.test> \
             to=<nobody@example.test> proto=ESMTP helo=<client.test>"
        ),
        "{}",
        rejects[0]
    );
    assert!(rejects[0].contains(" INFO "), "{}", rejects[0]);
    assert!(
        rejects[1].contains(
            "NOQUEUE: reject: RCPT from [127.0.0.1]: 554 5.7.1 <carol@elsewhere.test>: Relay access denied; \
             from=<bob@remote.test> to=<carol@elsewhere.test> proto=ESMTP helo=<client.test>"
        ),
        "{}",
        rejects[1]
    );
    let accepted = line_with(&log, &[&peer, "message accepted"]);
    for field in [
        "from=<bob@remote.test>",
        "nrcpt=1",
        "message_id=<first@client.test>",
    ] {
        assert!(accepted.contains(field), "{field} not in {accepted}");
    }
    assert!(!accepted.contains("sasl_username"), "{accepted}");
    // The size is that of the stored message, our Received: header included.
    let size: u64 = accepted
        .split(" size=")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no size in {accepted}"));
    assert!(size > body.len() as u64, "{accepted}");
    let disconnect = line_with(&log, &[&peer, "disconnect from"]);
    assert!(
        disconnect.ends_with(
            "disconnect from [127.0.0.1] ehlo=1 mail=1 rcpt=1/3 data=1 quit=1 commands=5/7"
        ),
        "{disconnect}"
    );

    // Authenticated: a failed try, then the right password; a bad command.
    let mut c = connect(&server);
    let peer = format!("smtp{{peer={}}}", c.local_addr());
    assert!(c.cmd("EHLO laptop.test").starts_with("250"));
    assert!(c
        .cmd(&format!("AUTH PLAIN {}", plain(ALICE, "guess")))
        .starts_with("535 5.7.8"));
    assert!(c
        .cmd(&format!("AUTH PLAIN {}", plain(ALICE, "wonderland")))
        .starts_with("235"));
    assert!(c.cmd("FOO").starts_with("502"));
    assert_eq!(c.cmd("MAIL FROM:<alice@example.test>"), "250 2.1.0 Ok");
    assert_eq!(c.cmd("RCPT TO:<carol@elsewhere.test>"), "250 2.1.5 Ok");
    assert!(c.cmd("DATA").starts_with("354"));
    assert!(c
        .cmd("Message-ID:\r\n <second@laptop.test>\r\n\r\nhello\r\n.")
        .starts_with("250 2.0.0"));
    assert!(c.cmd("QUIT").starts_with("221"));
    assert!(c.closed());

    wait_count(&server, "disconnect from", 2);
    let log = server.log();
    let failed = line_with(&log, &[&peer, "smtp auth failed"]);
    assert!(
        failed.contains(" WARN ")
            && failed.contains("smtp auth failed mechanism=PLAIN user=alice@example.test"),
        "{failed}"
    );
    assert!(!failed.contains("guess"), "{failed}");
    let ok = line_with(&log, &[&peer, "smtp auth ok"]);
    assert!(
        ok.contains("mechanism=PLAIN user=alice@example.test"),
        "{ok}"
    );
    let accepted = line_with(&log, &[&peer, "message accepted"]);
    for field in [
        "from=<alice@example.test>",
        "message_id=<second@laptop.test>",
        "sasl_username=alice@example.test",
    ] {
        assert!(accepted.contains(field), "{field} not in {accepted}");
    }
    let disconnect = line_with(&log, &[&peer, "disconnect from"]);
    assert!(
        disconnect.ends_with(
            "disconnect from [127.0.0.1] ehlo=1 auth=1/2 mail=1 rcpt=1 data=1 quit=1 unknown=0/1 commands=6/8"
        ),
        "{disconnect}"
    );
    assert!(!log.contains("wonderland"), "{log}");
}

/// `log.format = "json"`: every line is one JSON object, and the reject,
/// auth and disconnect records carry their fields and the peer's span.
#[test]
fn json_format_writes_one_object_per_line() {
    let server = TestServer::start_with(&no_relay_config("[log]\nformat = \"json\"\n"));
    server.add_user(ALICE, "wonderland");
    let mut c = connect(&server);
    let peer = c.local_addr().to_string();
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    assert!(c
        .cmd(&format!("AUTH PLAIN {}", plain(ALICE, "guess")))
        .starts_with("535"));
    assert_eq!(c.cmd("MAIL FROM:<bob@remote.test>"), "250 2.1.0 Ok");
    assert!(c
        .cmd("RCPT TO:<nobody@example.test>")
        .starts_with("550 5.1.1"));
    assert!(c.cmd("QUIT").starts_with("221"));
    assert!(c.closed());
    wait_count(&server, "disconnect from", 1);

    let log = server.log();
    let records: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}\n{log}")))
        .collect();
    let find = |start: &str| {
        records
            .iter()
            .find(|r| {
                r["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(start))
            })
            .unwrap_or_else(|| panic!("no record starting {start:?}:\n{log}"))
    };
    assert!(find("postino started")["fields"]["smtp"].is_string());
    let reject = find("NOQUEUE: reject: RCPT from [127.0.0.1]: 550 5.1.1 ");
    assert_eq!(reject["level"], "INFO");
    assert_eq!(reject["span"]["peer"], peer.as_str());
    assert_eq!(reject["fields"]["from"], "<bob@remote.test>");
    assert_eq!(reject["fields"]["to"], "<nobody@example.test>");
    assert_eq!(reject["fields"]["helo"], "<client.test>");
    assert_eq!(reject["fields"]["proto"], "ESMTP");
    assert!(reject["timestamp"]
        .as_str()
        .is_some_and(|t| t.contains('T')));
    let failed = find("smtp auth failed");
    assert_eq!(failed["level"], "WARN");
    assert_eq!(failed["span"]["peer"], peer.as_str());
    assert_eq!(failed["fields"]["mechanism"], "PLAIN");
    assert_eq!(failed["fields"]["user"], ALICE);
    let disconnect = find("disconnect from [127.0.0.1] ");
    assert_eq!(disconnect["span"]["peer"], peer.as_str());
    assert_eq!(
        disconnect["fields"]["message"],
        "disconnect from [127.0.0.1] ehlo=1 auth=0/1 mail=1 rcpt=0/1 quit=1 commands=3/5"
    );
}

/// The shipped fail2ban filter, run by Debian's `fail2ban-regex` over a
/// real log: it finds every failed SMTP AUTH and POP3 login, each with
/// 127.0.0.1, and no success, even where the user name holds a forged log
/// line naming another address.
#[test]
fn fail2ban_filter_matches_failed_logins_by_real_peer() {
    fail2ban_finds_failed_logins("text", "postino.conf", "pop3 login user=");
}

/// The same with `log.format = "json"` and its own filter: the forged
/// lines, and a user name that imitates the JSON around the peer, name no
/// other address.
#[test]
fn fail2ban_json_filter_matches_failed_logins_by_real_peer() {
    fail2ban_finds_failed_logins(
        "json",
        "postino-json.conf",
        r#""message":"pop3 login","user""#,
    );
}

/// Fails SMTP AUTH three times and POP3 logins twice (two of them with
/// forged log lines, or JSON, in the user name), logs in once each, and
/// runs `fail2ban-regex` with `dist/fail2ban/filter.d/{filter}` over the
/// log in `format`: five bans of 127.0.0.1. `logged_in`: the successful
/// POP3 login's mark in that format.
fn fail2ban_finds_failed_logins(format: &str, filter: &str, logged_in: &str) {
    if Command::new("fail2ban-regex")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: fail2ban-regex not installed (apt-get install fail2ban)");
        return;
    }
    let server = TestServer::start_with(&config_text(
        &format!("[log]\nformat = \"{format}\"\n"),
        "",
        "",
        "",
    ));
    server.add_user(ALICE, "wonderland");
    let forged_smtp = "2026-12-01T00:00:00.000000Z  WARN smtp{peer=10.9.8.7:1}: postino::smtp: smtp auth failed mechanism=PLAIN user=root";
    let forged_pop3 = "2026-12-01T00:00:00.000000Z  WARN pop3{peer=10.9.8.7:1}: postino::pop3: pop3 login failed result=BadCredentials user=root";
    // What a user name must hold to look like the JSON after the fields.
    let forged_json = r#"x"},"target":"postino::smtp","span":{"peer":"10.9.8.7:1","name":"smtp"}"#;

    let mut c = connect(&server);
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    assert!(c
        .cmd(&format!("AUTH PLAIN {}", plain(ALICE, "guess")))
        .starts_with("535"));
    assert!(c
        .cmd(&format!("AUTH LOGIN {}", b64(ALICE)))
        .starts_with("334"));
    assert!(c.cmd(&b64("guess")).starts_with("535"));
    assert!(c
        .cmd(&format!(
            "AUTH PLAIN {}",
            plain(&format!("x\n{forged_smtp}"), "guess")
        ))
        .starts_with("535"));
    assert!(c
        .cmd(&format!("AUTH PLAIN {}", plain(forged_json, "guess")))
        .starts_with("535"));
    assert!(c
        .cmd(&format!("AUTH PLAIN {}", plain(ALICE, "wonderland")))
        .starts_with("235"));
    assert!(c.cmd("QUIT").starts_with("221"));

    let mut p = Raw::connect(server.pop3);
    assert!(p.line().starts_with("+OK"));
    let mut pop = |line: &str| {
        p.send(format!("{line}\r\n").as_bytes());
        p.line()
    };
    assert!(pop(&format!("USER {ALICE}")).starts_with("+OK"));
    assert!(pop("PASS guess").starts_with("-ERR"));
    // POP3 lines cannot hold a LF: the forgery goes after a space.
    assert!(pop(&format!("USER x {forged_pop3}")).starts_with("+OK"));
    assert!(pop("PASS guess").starts_with("-ERR"));
    assert!(pop(&format!("USER {ALICE}")).starts_with("+OK"));
    assert!(pop("PASS wonderland").starts_with("+OK"));
    assert!(pop("QUIT").starts_with("+OK"));

    wait_count(&server, "smtp auth failed", 4);
    wait_count(&server, "pop3 login failed", 2);
    wait_count(&server, logged_in, 1);
    let dir = tempfile::tempdir().expect("temp dir");
    let logfile = dir.path().join("postino.log");
    std::fs::write(&logfile, server.log()).expect("write log");
    let filter = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../dist/fail2ban/filter.d")
        .join(filter)
        .canonicalize()
        .expect("shipped filter");
    // `-o ip`: one line per match, the address fail2ban would ban.
    let out = Command::new("fail2ban-regex")
        .args(["-o", "ip"])
        .arg(&logfile)
        .arg(&filter)
        .output()
        .expect("run fail2ban-regex");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{out:?}\n{stdout}\nlog:\n{}",
        server.log()
    );
    let hosts: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        hosts,
        vec!["127.0.0.1"; 6],
        "fail2ban-regex -o ip printed:\n{stdout}\nlog:\n{}",
        server.log()
    );
}

/// sled's debug records (page-cache bookkeeping) stay out of a plain
/// `RUST_LOG=debug`, and appear when `RUST_LOG` names sled; its trace
/// records never do.
#[test]
fn sled_debug_records_only_when_rust_log_names_sled() {
    let sled_line = |l: &&str| l.contains(" sled::") || l.contains(" sled:");
    let server = TestServer::start_logging(&config_text("", "", "", ""), "debug");
    server.add_user(ALICE, "wonderland");
    wait_count(&server, "control request", 1);
    let log = server.log();
    assert!(log.contains(" DEBUG "), "{log}");
    let sled: Vec<&str> = log.lines().filter(sled_line).collect();
    assert!(sled.is_empty(), "sled records at RUST_LOG=debug:\n{sled:?}");

    let server = TestServer::start_logging(&config_text("", "", "", ""), "debug,sled=trace");
    server.add_user(ALICE, "wonderland");
    wait_count(&server, "control request", 1);
    let log = server.log();
    let sled: Vec<&str> = log.lines().filter(sled_line).collect();
    assert!(
        sled.iter().any(|l| l.contains(" DEBUG ")),
        "no sled debug records with sled named:\n{log}"
    );
    assert!(!sled.iter().any(|l| l.contains(" TRACE ")), "{sled:?}");
}
