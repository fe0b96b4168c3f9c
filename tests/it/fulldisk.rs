//! A full disk (issue 9 point 2, issue 14) and the offline store tools:
//! below `store.min_free` MAIL gets `452 4.3.1` and service resumes by
//! itself once space is back; a server started on a full disk serves POP3
//! (reads and deletions); `postino store check/export/import` round-trip a
//! store with users, aliases, local and queued mail. The full-disk tests
//! mount a small tmpfs (root only; elsewhere they print why and pass).

use std::path::Path;
use std::process::Output;

use crate::smtp_local::pop_all;
use crate::support::mx::{Sink, SinkOptions};
use crate::support::server::{cli_with_config, config_text, python, smtplib_send, Raw, TestServer};
use crate::support::tmpfs::Tmpfs;
use crate::support::{free_tcp_port, unique_loopback, wait_until};

use std::time::Duration;

/// The test configuration with the data directory at `data`.
fn config_at(data: &Path, smtp: &str, routing: &str, rest: &str) -> String {
    config_text("", smtp, routing, rest).replace(
        "data_dir = \"data\"",
        &format!("data_dir = \"{}\"", data.display()),
    )
}

/// MAIL FROM on a fresh connection: the reply line.
fn mail_reply(server: &TestServer) -> String {
    let mut c = Raw::connect(server.smtp);
    assert!(c.reply().starts_with("220"));
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    c.cmd("MAIL FROM:<s@remote.test>")
}

/// Deletes message `n` with poplib and QUITs (the deletion happens there).
fn pop_delete(server: &TestServer, user: &str, password: &str, n: usize) -> String {
    python(
        r#"
import poplib, sys
p = poplib.POP3(sys.argv[1], int(sys.argv[2]), timeout=20)
p.user(sys.argv[3]); p.pass_(sys.argv[4])
p.dele(int(sys.argv[5]))
print(p.quit().decode())
"#,
        &[
            &server.pop3.ip().to_string(),
            &server.pop3.port().to_string(),
            user,
            password,
            &n.to_string(),
        ],
    )
    .trim()
    .to_owned()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Below the reserve MAIL is refused before any content is sent, as is a
/// MAIL whose SIZE exceeds the room above the reserve; POP3 still works,
/// and once space is free mail is accepted again without a restart.
#[test]
fn below_min_free_mail_gets_452_and_resumes_when_space_is_back() {
    let Some(fs) = Tmpfs::mount(32) else { return };
    let data = fs.path().join("data");
    let mut server =
        TestServer::start_with(&config_at(&data, "max_message_size = 1000000", "", ""));
    server.add_user("alice@example.test", "pw");
    assert_eq!(
        smtplib_send(
            &server,
            "alice@example.test",
            "Subject: one\r\n\r\nfirst\r\n"
        ),
        "OK"
    );
    // The monitor writes its ballast while space is plentiful.
    assert!(wait_until(Duration::from_secs(10), || data
        .join("ballast")
        .exists()));

    // Room above the reserve for less than a declared SIZE (Postfix's
    // smtpd_check_size): that MAIL gets 452, a smaller or undeclared one
    // 250. 2.3 MB free keeps the ballast (given up below 2 MiB): 0.8 MB
    // of room above the 1.5 MB reserve.
    let sized = |size: u64| {
        let mut c = Raw::connect(server.smtp);
        assert!(c.reply().starts_with("220"));
        assert!(c.cmd("EHLO client.test").starts_with("250"));
        c.cmd(&format!("MAIL FROM:<s@remote.test> SIZE={size}"))
    };
    assert!(sized(900_000).starts_with("250"), "plenty of room at first");
    let tight = fs.fill_leaving(2_300_000);
    assert!(
        wait_until(Duration::from_secs(10), || sized(900_000)
            .starts_with("452 4.3.1")),
        "SIZE=900000 accepted with {} bytes free",
        fs.available()
    );
    assert!(sized(100_000).starts_with("250"));
    assert!(mail_reply(&server).starts_with("250"));
    std::fs::remove_file(tight).unwrap();
    assert!(wait_until(Duration::from_secs(10), || sized(900_000)
        .starts_with("250")));

    // Leave less than the 1.5 MB reserve (1.5 × max_message_size).
    let filler = fs.fill_leaving(500_000);
    assert!(
        wait_until(Duration::from_secs(10), || mail_reply(&server)
            .starts_with("452 4.3.1")),
        "MAIL still accepted with {} bytes free",
        fs.available()
    );
    let refused = smtplib_send(&server, "alice@example.test", "Subject: two\r\n\r\nx\r\n");
    assert!(refused.starts_with("ERR 452"), "{refused}");
    assert!(refused.contains("Insufficient system storage"), "{refused}");
    assert!(server.wait_for_log("deleted the ballast"));
    // POP3 users can still read (and so delete) their mail.
    let mail = pop_all(&server, "alice@example.test", "pw");
    assert_eq!(mail.len(), 1);

    std::fs::remove_file(filler).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || mail_reply(&server)
            .starts_with("250")),
        "mail not accepted again after space was freed"
    );
    assert_eq!(
        smtplib_send(
            &server,
            "alice@example.test",
            "Subject: three\r\n\r\nthird\r\n"
        ),
        "OK"
    );
    let mail = pop_all(&server, "alice@example.test", "pw");
    assert_eq!(mail.len(), 2);
    assert!(mail[1].text.contains("third"));
    assert_eq!(server.terminate(), Some(0));
}

/// A server started with 0 bytes free gives up its ballast, opens the
/// store, refuses new mail and serves POP3, deletions included; the store
/// is intact afterwards.
#[test]
fn start_on_a_full_disk_serves_pop3_and_keeps_the_store_intact() {
    let Some(fs) = Tmpfs::mount(32) else { return };
    let data = fs.path().join("data");
    let mut server =
        TestServer::start_with(&config_at(&data, "max_message_size = 1000000", "", ""));
    server.add_user("alice@example.test", "pw");
    for n in 0..3 {
        let body = format!("Subject: m{n}\r\n\r\nmessage {n}\r\n");
        assert_eq!(smtplib_send(&server, "alice@example.test", &body), "OK");
    }
    let before = pop_all(&server, "alice@example.test", "pw");
    assert!(wait_until(Duration::from_secs(10), || data
        .join("ballast")
        .exists()));
    assert_eq!(server.terminate(), Some(0));

    let filler = fs.fill_leaving(0);
    assert_eq!(fs.available(), 0);
    server.restart();
    assert!(server.wait_for_log("deleted the ballast"));
    assert!(mail_reply(&server).starts_with("452 4.3.1"));
    let mail = pop_all(&server, "alice@example.test", "pw");
    let uidls =
        |m: &[crate::smtp_local::Popped]| m.iter().map(|p| p.uidl.clone()).collect::<Vec<_>>();
    assert_eq!(uidls(&mail), uidls(&before));
    assert!(pop_delete(&server, "alice@example.test", "pw", 1).starts_with("+OK"));
    assert_eq!(pop_all(&server, "alice@example.test", "pw").len(), 2);
    assert_eq!(server.terminate(), Some(0));

    std::fs::remove_file(filler).unwrap();
    let check = cli_with_config(&server.config, &["store", "check"], "");
    assert!(check.status.success(), "{}", text(&check));
    server.restart();
    let after = pop_all(&server, "alice@example.test", "pw");
    assert_eq!(uidls(&after), uidls(&before)[1..].to_vec());
}

/// Export a store with users, aliases, local mail and queued mail; import
/// it into a new data directory; the server started there serves the same
/// mail with the same UIDLs and delivers the queued mail.
#[test]
fn store_export_and_import_round_trip() {
    let ip = unique_loopback();
    let port = free_tcp_port(&[ip]);
    // Nothing listens yet: relay mail waits in the queue.
    let routing = format!("smarthost = \"{ip}:{port}\"");
    let delivery = "[delivery]\nretry = [\"1h\"]\nconnect_timeout = \"1s\"\n";
    let mut server = TestServer::start_with(&config_text("", "", &routing, delivery));
    server.add_user("alice@example.test", "pw");
    server.add_user("bob@example.test", "pw2");
    let out = server.cli(
        &["alias", "add", "info@example.test", "alice@example.test"],
        "",
    );
    assert!(out.status.success(), "{}", text(&out));
    for (to, n) in [
        ("alice@example.test", 0),
        ("info@example.test", 1),
        ("bob@example.test", 2),
    ] {
        let body = format!("Subject: local {n}\r\n\r\nlocal message {n}\r\n");
        assert_eq!(smtplib_send(&server, to, &body), "OK");
    }
    assert_eq!(
        smtplib_send(
            &server,
            "carol@remote.test",
            "Subject: queued\r\n\r\nfor the smarthost\r\n"
        ),
        "OK"
    );
    assert!(server.wait_for_log("status=deferred"));
    let alice = pop_all(&server, "alice@example.test", "pw");
    let bob = pop_all(&server, "bob@example.test", "pw2");
    assert_eq!(alice.len(), 2);

    // Offline only: a running server holds the store.
    let export = server.dir.path().join("export.jsonl");
    let export_arg = export.to_str().unwrap();
    let busy = server.cli(&["store", "export", "--output", export_arg], "");
    assert!(!busy.status.success());
    assert!(
        text(&busy).contains(&server.data_dir().display().to_string()),
        "{}",
        text(&busy)
    );
    assert_eq!(server.terminate(), Some(0));
    let check = server.cli(&["store", "check"], "");
    assert!(check.status.success(), "{}", text(&check));
    let out = server.cli(&["store", "export", "--output", export_arg], "");
    assert!(out.status.success(), "{}", text(&out));
    let first = std::fs::read_to_string(&export).unwrap();
    assert!(first.starts_with("{\"type\":\"header\",\"format\":\"postino-store\",\"version\":1"));
    assert!(first.trim_end().ends_with('}') && first.contains("\"type\":\"end\""));

    // A new data directory, and a smarthost that now answers.
    let sink = Sink::start(ip, port, &SinkOptions::default());
    let target = tempfile::tempdir().unwrap();
    let data = target.path().join("data");
    let config = config_at(&data, "", &routing, delivery);
    let mut imported = TestServer::configured(&config);
    let out = cli_with_config(&imported.config, &["store", "import", export_arg], "");
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("imported 2 users, 1 aliases, 3 mailbox entries, 1 queued"),
        "{}",
        text(&out)
    );
    // Only into an empty data directory.
    let again = cli_with_config(&imported.config, &["store", "import", export_arg], "");
    assert!(!again.status.success());
    assert!(text(&again).contains("not empty"), "{}", text(&again));

    imported.restart();
    let out = imported.cli(&["queue", "flush"], "");
    assert!(out.status.success(), "{}", text(&out));
    assert!(wait_until(Duration::from_secs(20), || !sink
        .messages()
        .is_empty()));
    let got = sink.messages();
    assert_eq!(got[0].rcpt_tos, ["carol@remote.test"]);
    assert!(String::from_utf8_lossy(&got[0].content).contains("for the smarthost"));
    let same = |a: &[crate::smtp_local::Popped], b: &[crate::smtp_local::Popped]| {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| x.uidl == y.uidl && x.text == y.text)
    };
    assert!(same(
        &pop_all(&imported, "alice@example.test", "pw"),
        &alice
    ));
    assert!(same(&pop_all(&imported, "bob@example.test", "pw2"), &bob));
    // New mail gets new ids, not ones the imported mail already has.
    assert_eq!(
        smtplib_send(
            &imported,
            "alice@example.test",
            "Subject: new\r\n\r\nafter import\r\n"
        ),
        "OK"
    );
    let now = pop_all(&imported, "alice@example.test", "pw");
    assert_eq!(now.len(), 3);
    assert!(!alice.iter().any(|m| m.uidl == now[2].uidl));
    // The alias came along.
    assert_eq!(
        smtplib_send(
            &imported,
            "info@example.test",
            "Subject: alias\r\n\r\nvia alias\r\n"
        ),
        "OK"
    );
    assert_eq!(pop_all(&imported, "alice@example.test", "pw").len(), 4);
}

/// One start of `postino serve` on the current data directory: `Ok` once
/// it logs that it started (it is then killed), `Err(log)` if it exits.
fn try_start(config: &Path) -> Result<(), String> {
    use std::io::BufRead;
    let mut child = std::process::Command::new(crate::support::server::binary())
        .args(["serve", "--config"])
        .arg(config)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start postino");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut log = String::new();
    let result = loop {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) if line.contains("postino started") => break Ok(()),
            Ok(line) => {
                log.push_str(&line);
                log.push('\n');
            }
            // Closed: the process exited.
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break Err(log),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                break Err(format!("neither started nor exited in 30 s:\n{log}"))
            }
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// What the filling client had acknowledged: (recipient, subject, queue id).
type Acked = Vec<(String, String, String)>;

/// Sends mail in one session until the server stops answering 250 (full
/// disk: 451, or the stall watchdog aborting a hung flush).
fn fill_over_smtp(server: &TestServer, round: usize) -> Acked {
    let mut acked = Acked::new();
    let mut c = Raw::connect(server.smtp);
    assert!(c.reply().starts_with("220"));
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    let to = ["alice@example.test", "ok@remote.test", "defer@remote.test"];
    for n in 0.. {
        let rcpt = to[n % 3];
        let subject = format!("r{round} m{n}");
        if !c.cmd("MAIL FROM:<s@example.test>").starts_with("250")
            || !c.cmd(&format!("RCPT TO:<{rcpt}>")).starts_with("250")
            || !c.cmd("DATA").starts_with("354")
        {
            break;
        }
        let body = format!("{subject} line\r\n").repeat(200 + (n * 37) % 1500);
        let r = c.cmd(&format!("Subject: {subject}\r\n\r\n{body}."));
        if !r.starts_with("250") {
            break;
        }
        let id = r.rsplit(' ').next().unwrap().to_owned();
        acked.push((rcpt.to_owned(), subject, id));
    }
    acked
}

/// Issue 14 end to end: fill a small tmpfs with local and relay mail while
/// the queue churns (the smarthost accepts one recipient and defers the
/// other, retried every second), kill -9, start twice with 0 bytes free,
/// enlarge, start: every acknowledged message is readable over POP3,
/// delivered, or still queued. `POSTINO_FULLDISK_SERVER_ROUNDS` rounds
/// (default 1).
#[test]
fn full_disk_start_attempts_never_damage_the_store() {
    let rounds: usize = std::env::var("POSTINO_FULLDISK_SERVER_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let ip = unique_loopback();
    let port = free_tcp_port(&[ip]);
    let sink = Sink::start(
        ip,
        port,
        &SinkOptions::answering(&[("defer@remote.test", "451 4.3.0 try later")]),
    );
    let mut refused_starts = 0;
    for round in 0..rounds {
        let Some(fs) = Tmpfs::mount(16) else { return };
        let data = fs.path().join("data");
        // No reserve: the disk really fills, as in the issue.
        let config = config_at(
            &data,
            "max_message_size = 1000000",
            &format!("smarthost = \"{ip}:{port}\""),
            "min_free = 0\nstall_abort = \"2s\"\n[delivery]\nretry = [\"1s\"]\n",
        );
        let mut server = TestServer::start_with(&config);
        server.add_user("alice@example.test", "pw");
        let acked = fill_over_smtp(&server, round);
        assert!(
            acked.len() > 30,
            "round {round}: only {} messages",
            acked.len()
        );
        server.kill9();

        let filler = fs.fill_leaving(0);
        for _ in 0..2 {
            match try_start(&server.config) {
                Ok(()) => {}
                Err(log) => {
                    assert!(
                        log.contains("not enough free space"),
                        "round {round}: {log}"
                    );
                    refused_starts += 1;
                }
            }
        }
        fs.resize_to(64);
        std::fs::remove_file(filler).unwrap();
        let check = cli_with_config(&server.config, &["store", "check"], "");
        assert!(check.status.success(), "round {round}: {}", text(&check));
        server.restart();

        let popped = pop_all(&server, "alice@example.test", "pw");
        let mut missing = Vec::new();
        let queue = text(&server.cli(&["queue", "list"], ""));
        let delivered: Vec<String> = sink
            .messages()
            .iter()
            .map(|m| String::from_utf8_lossy(&m.content).into_owned())
            .collect();
        for (rcpt, subject, id) in &acked {
            let subject_line = format!("Subject: {subject}\r\n");
            let found = if rcpt.starts_with("alice") {
                popped.iter().any(|p| p.text.contains(&subject_line))
            } else {
                queue.contains(id.as_str()) || delivered.iter().any(|d| d.contains(&subject_line))
            };
            if !found {
                missing.push(format!("{rcpt} {subject} {id}"));
            }
        }
        assert!(missing.is_empty(), "round {round}: lost {missing:?}");
        eprintln!(
            "round {round}: {} acknowledged messages all readable, delivered or queued",
            acked.len()
        );
        server.kill9();
    }
    eprintln!("{refused_starts} start attempts on a full disk refused cleanly");
}

/// A store sled refuses (`Read corrupted data`: here a damaged snapshot
/// file): `store check` says so and fails; `store export` salvages every
/// message from the log, and a new data directory built from it serves
/// the mail with the same UIDLs.
#[test]
fn export_salvages_a_store_sled_reports_as_corrupt() {
    let mut server = TestServer::start();
    server.add_user("alice@example.test", "pw");
    for n in 0..5 {
        let body = format!("Subject: s{n}\r\n\r\nsalvage {n}\r\n");
        assert_eq!(smtplib_send(&server, "alice@example.test", &body), "OK");
    }
    let before = pop_all(&server, "alice@example.test", "pw");
    // kill -9: sled writes a snapshot at the next open, recovering the log.
    server.kill9();
    assert!(try_start(&server.config).is_ok());
    let snapshot = std::fs::read_dir(server.data_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("snap.")
        })
        .expect("sled wrote a snapshot");
    let mut bytes = std::fs::read(&snapshot).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&snapshot, bytes).unwrap();

    let check = server.cli(&["store", "check"], "");
    assert!(!check.status.success());
    assert!(text(&check).contains("corrupted"), "{}", text(&check));
    let export = server.dir.path().join("salvage.jsonl");
    let out = server.cli(
        &["store", "export", "--output", export.to_str().unwrap()],
        "",
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("without sled's snapshot"),
        "{}",
        text(&out)
    );

    let target = tempfile::tempdir().unwrap();
    let mut rebuilt = TestServer::configured(&config_at(&target.path().join("data"), "", "", ""));
    let out = cli_with_config(
        &rebuilt.config,
        &["store", "import", export.to_str().unwrap()],
        "",
    );
    assert!(out.status.success(), "{}", text(&out));
    rebuilt.restart();
    let after = pop_all(&rebuilt, "alice@example.test", "pw");
    assert_eq!(after.len(), 5);
    assert!(before
        .iter()
        .zip(&after)
        .all(|(b, a)| b.uidl == a.uidl && b.text == a.text));
}
