//! The admin's questions and guard rails: `route explain` (against a real
//! dnsmasq for the exchangers), `mailbox stats`, `auth test`, alias loops
//! (refused at `alias add`, bounced with 5.4.6 when imported anyway),
//! `user del` that needs `--force`, and `check-config` reading the TLS
//! files. Online (control socket) and offline (the CLI opens the store).

use std::net::Ipv4Addr;
use std::process::Output;

use crate::cli::{ok, stderr, stdout};
use crate::smtp_local::pop_all;
use crate::support::dns::{Dnsmasq, Zone};
use crate::support::server::{config_text, python, TestServer};
use crate::support::wait_until;

/// Asserts exit status 1 and returns standard error.
fn fails(out: Output) -> String {
    assert_eq!(
        out.status.code(),
        Some(1),
        "stdout: {}\nstderr: {}",
        stdout(&out),
        stderr(&out)
    );
    stderr(&out)
}

/// Sends one message with smtplib; "OK {refused}", "REFUSED {...}" or
/// "ERR code text".
pub fn smtplib_send(server: &TestServer, from: &str, to: &[&str], body: &str) -> String {
    let mut args = vec![
        server.smtp.ip().to_string(),
        server.smtp.port().to_string(),
        from.to_owned(),
        body.to_owned(),
    ];
    args.extend(to.iter().map(|s| s.to_string()));
    python(
        r#"
import smtplib, sys
host, port, sender, body = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
s = smtplib.SMTP(host, port, timeout=20)
s.ehlo("client.test")
try:
    print("OK", s.sendmail(sender, sys.argv[5:], body.encode()))
except smtplib.SMTPRecipientsRefused as e:
    print("REFUSED", {k: (c, m.decode()) for k, (c, m) in e.recipients.items()})
except smtplib.SMTPResponseException as e:
    print("ERR", e.smtp_code, e.smtp_error.decode())
s.quit()
"#,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    )
}

/// `route explain` prints the steps of the router's own decision and the
/// exchangers the delivery's resolver finds now (dnsmasq), the same with
/// the server running and stopped; a refused recipient exits 1.
#[test]
fn route_explain_shows_the_decision_and_the_exchangers() {
    let zone = Zone::new("remote.test")
        .mx("remote.test", "mx1.remote.test", 10)
        .mx("remote.test", "mx2.remote.test", 20)
        .a("mx1.remote.test", Ipv4Addr::new(127, 0, 0, 1))
        .a("mx2.remote.test", Ipv4Addr::new(127, 0, 0, 2))
        .a("relay.remote.test", Ipv4Addr::new(127, 0, 0, 3));
    let dns = Dnsmasq::start(&zone);
    let config = |routing: &str| {
        config_text(
            "",
            "",
            routing,
            &format!(
                "[delivery]\nmx_port = 2526\n[dns]\nnameservers = [\"{}\"]\ntimeout = \"2s\"\n",
                dns.addr
            ),
        )
    };
    let mut server = TestServer::start_with(&config(""));
    server.add_user("alice@example.test", "pw");
    ok(server.cli(
        &["alias", "add", "sales@example.test", "alice@example.test"],
        "",
    ));
    ok(server.cli(
        &["alias", "add", "sales@example.test", "bob@remote.test"],
        "",
    ));
    for running in [true, false] {
        let out = ok(server.cli(
            &[
                "route",
                "explain",
                "Sales@example.test",
                "--from",
                "x@y.test",
            ],
            "",
        ));
        for want in [
            "recipient: <Sales@example.test>",
            "sender: <x@y.test>",
            "domain example.test is in routing.local_domains",
            "sales@example.test: alias -> alice@example.test, bob@remote.test",
            "alice@example.test: local user: mailbox",
            "decision: accepted; delivered to",
            "local mailbox alice@example.test",
            "remote bob@remote.test",
            "exchangers of remote.test now, in the order tried:",
        ] {
            assert!(out.contains(want), "running={running}: {want}\n{out}");
        }
        let mx1 = out.find("mx1.remote.test [127.0.0.1:2526]");
        let mx2 = out.find("mx2.remote.test [127.0.0.2:2526]");
        assert!(
            mx1.is_some() && mx2.is_some() && mx1 < mx2,
            "preference order: {out}"
        );

        // An unknown user: the policy, and exit 1 with the reply.
        let err = fails(server.cli(&["route", "explain", "bob@example.test"], ""));
        assert!(
            err.contains("routing.unknown_user = reject")
                && err.contains("refused at RCPT: 550 5.1.1"),
            "{err}"
        );
        // Relay: by network, by authentication, or not at all.
        let out = ok(server.cli(
            &["route", "explain", "c@remote.test", "--client", "127.0.0.1"],
            "",
        ));
        assert!(
            out.contains(
                "relay permitted: client 127.0.0.1 is in routing.relay_networks (127.0.0.0/8)"
            ),
            "{out}"
        );
        let out = ok(server.cli(
            &[
                "route",
                "explain",
                "c@nowhere.remote.test",
                "--client",
                "192.0.2.1",
                "--auth",
                "alice@example.test",
            ],
            "",
        ));
        assert!(
            out.contains("relay permitted: authenticated as alice@example.test")
                && out.contains("none: domain does not exist (would bounce with 5.1.2)"),
            "{out}"
        );
        let err = fails(server.cli(
            &["route", "explain", "c@remote.test", "--client", "192.0.2.1"],
            "",
        ));
        assert!(
            err.contains("relay denied") && err.contains("554 5.7.1"),
            "{err}"
        );
        server.terminate();
    }
    // With a smarthost, remote mail goes there, whatever the domain's MX.
    server.set_config(&config("smarthost = \"relay.remote.test:2527\""));
    let out = ok(server.cli(&["route", "explain", "sales@example.test"], ""));
    assert!(
        out.contains("via routing.smarthost relay.remote.test:2527")
            && out.contains("relay.remote.test [127.0.0.3:2527]")
            && !out.contains("mx1.remote.test"),
        "{out}"
    );
}

/// `alias add` refuses a loop naming the chain; a loop that arrives
/// anyway (an edited export imported offline) bounces the mail with 5.4.6
/// and is logged, instead of going round.
#[test]
fn alias_loops_are_refused_and_bounced() {
    let mut server = TestServer::start();
    server.add_user("alice@example.test", "pw");
    ok(server.cli(
        &["alias", "add", "loop1@example.test", "loop2@example.test"],
        "",
    ));
    ok(server.cli(
        &["alias", "add", "loop2@example.test", "alice@example.test"],
        "",
    ));
    let err = fails(server.cli(
        &["alias", "add", "loop2@example.test", "loop1@example.test"],
        "",
    ));
    assert!(
        err.contains("alias loop: loop2@example.test -> loop1@example.test -> loop2@example.test"),
        "{err}"
    );

    // Make the loop behind the store's back: export, edit, import.
    server.terminate();
    let export = server.dir.path().join("export.jsonl");
    ok(server.cli(&["store", "export", "-o", export.to_str().unwrap()], ""));
    let text = std::fs::read_to_string(&export).unwrap();
    let edited = text.replace(
        r#""alias":"loop2@example.test","targets":["alice@example.test"]"#,
        r#""alias":"loop2@example.test","targets":["loop1@example.test"]"#,
    );
    assert_ne!(text, edited, "the export holds the alias: {text}");
    std::fs::write(&export, edited).unwrap();
    std::fs::rename(server.data_dir(), server.dir.path().join("old-data")).unwrap();
    ok(server.cli(&["store", "import", export.to_str().unwrap()], ""));
    server.restart();

    let sent = smtplib_send(
        &server,
        "alice@example.test",
        &["loop1@example.test"],
        "Subject: round\r\n\r\nand round\r\n",
    );
    assert!(sent.starts_with("OK {}"), "{sent}");
    let mut bounces = Vec::new();
    assert!(wait_until(std::time::Duration::from_secs(20), || {
        bounces = pop_all(&server, "alice@example.test", "pw");
        !bounces.is_empty()
    }));
    let bounce = &bounces[0].text;
    assert!(
        bounce.contains("Status: 5.4.6")
            && bounce.contains(
                "mail forwarding loop (loop1@example.test -> loop2@example.test -> loop1@example.test)"
            ),
        "{bounce}"
    );
    assert!(server.log().contains("alias loop"), "{}", server.log());
}

/// `user del` of a user with mail, or with aliases pointing at it, says
/// what would go and needs `--force`; a user with neither goes at once.
#[test]
fn user_del_needs_force_when_something_would_go() {
    let mut server = TestServer::start();
    server.add_user("alice@example.test", "pw");
    server.add_user("bob@example.test", "pw");
    server.add_user("carol@example.test", "pw");
    ok(server.cli(
        &["alias", "add", "team@example.test", "bob@example.test"],
        "",
    ));
    let sent = smtplib_send(
        &server,
        "x@remote.test",
        &["alice@example.test"],
        "Subject: hi\r\n\r\nhello\r\n",
    );
    assert!(sent.starts_with("OK {}"), "{sent}");
    for running in [true, false] {
        let err = fails(server.cli(&["user", "del", "alice@example.test"], ""));
        assert!(
            err.contains("its 1 message(s)") && err.contains("--force"),
            "{err}"
        );
        let err = fails(server.cli(&["user", "del", "bob@example.test"], ""));
        assert!(
            err.contains("aliases pointing at it (team@example.test)")
                && err.contains("postmaster"),
            "{err}"
        );
        let users = ok(server.cli(&["user", "list"], ""));
        assert!(
            users.contains("alice@") && users.contains("bob@"),
            "{users}"
        );
        if running {
            server.terminate();
        }
    }
    ok(server.cli(&["user", "del", "carol@example.test"], ""));
    ok(server.cli(&["user", "del", "--force", "alice@example.test"], ""));
    server.restart();
    ok(server.cli(&["user", "del", "--force", "bob@example.test"], ""));
    assert_eq!(ok(server.cli(&["user", "list"], "")), "");
}

/// `auth test` answers like a login would, exit status and all, and the
/// password is in no log line.
#[test]
fn auth_test_checks_a_password() {
    let mut server = TestServer::start();
    server.add_user("alice@example.test", "s3cret-pw");
    for running in [true, false] {
        let out = ok(server.cli(&["auth", "test", "alice@example.test"], "s3cret-pw\n"));
        assert!(out.contains("auth succeeded"), "{out}");
        let err = fails(server.cli(&["auth", "test", "alice@example.test"], "wrong-pw\n"));
        assert!(err.contains("auth failed"), "{err}");
        let err = fails(server.cli(&["auth", "test", "nobody@example.test"], "x-pw\n"));
        assert!(err.contains("auth failed"), "{err}");
        if running {
            assert!(server.wait_for_log("auth test"));
            server.terminate();
        }
    }
    let log = server.log();
    assert!(
        !log.contains("s3cret-pw") && !log.contains("wrong-pw"),
        "{log}"
    );
}

/// `mailbox stats` counts messages and octets; a POP3 DELE + QUIT takes
/// them off.
#[test]
fn mailbox_stats_follow_deliveries_and_deletions() {
    let mut server = TestServer::start();
    server.add_user("alice@example.test", "pw");
    server.add_user("bob@example.test", "pw");
    for _ in 0..2 {
        let sent = smtplib_send(
            &server,
            "x@remote.test",
            &["alice@example.test"],
            "Subject: hi\r\n\r\nhello\r\n",
        );
        assert!(sent.starts_with("OK {}"), "{sent}");
    }
    let popped = pop_all(&server, "alice@example.test", "pw");
    let octets: usize = popped.iter().map(|p| p.size).sum();
    let line = |out: &str, user: &str| -> Vec<String> {
        out.lines()
            .find(|l| l.starts_with(user))
            .unwrap_or_else(|| panic!("{user} in {out}"))
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    let out = ok(server.cli(&["mailbox", "stats"], ""));
    assert_eq!(
        line(&out, "alice@")[1..3],
        ["2".to_string(), octets.to_string()]
    );
    assert_eq!(line(&out, "bob@")[1..3], ["0", "0"]);
    // DELE one message and QUIT with poplib.
    python(
        r#"
import poplib, sys
p = poplib.POP3(sys.argv[1], int(sys.argv[2]), timeout=20)
p.user("alice@example.test"); p.pass_("pw")
p.dele(1)
p.quit()
"#,
        &[
            &server.pop3.ip().to_string(),
            &server.pop3.port().to_string(),
        ],
    );
    let one = popped[1].size.to_string();
    let out = ok(server.cli(&["mailbox", "stats", "alice@example.test"], ""));
    assert_eq!(line(&out, "alice@")[1..3], ["1".to_string(), one.clone()]);
    server.terminate();
    let out = ok(server.cli(&["mailbox", "stats", "alice@example.test"], ""));
    assert_eq!(line(&out, "alice@")[1..3], ["1".to_string(), one]);
    let err = fails(server.cli(&["mailbox", "stats", "nobody@example.test"], ""));
    assert!(err.contains("no such user"), "{err}");
}

/// `check-config` opens the TLS files it names and says which key is
/// wrong.
#[test]
fn check_config_reads_the_tls_files() {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["mx.example.test".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let config = dir.path().join("postino.toml");
    let check = |cert: &std::path::Path, key: &std::path::Path| {
        std::fs::write(
            &config,
            config_text(
                &format!(
                    "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
                    cert.display(),
                    key.display()
                ),
                "",
                "",
                "",
            ),
        )
        .unwrap();
        crate::support::server::cli_with_config(&config, &["check-config"], "")
    };
    ok(check(&cert_path, &key_path));
    let missing = dir.path().join("missing.pem");
    let out = check(&missing, &key_path);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("tls.cert = "), "{}", stderr(&out));
    let out = check(&cert_path, &missing);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("tls.key = "), "{}", stderr(&out));
    // A key file that is no key (here: the certificate).
    let out = check(&cert_path, &cert_path);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains(&format!("tls.key = {}", cert_path.display())),
        "{}",
        stderr(&out)
    );
}

/// Quotas as Dovecot's quota plugin with `quota_full_tempfail = no`: the
/// default from `[mailbox] quota`, a per-user override, a warning logged
/// when a delivery crosses `quota_warning`, `552 5.2.2` at RCPT once the
/// mailbox is full (smtplib), and room again after POP3 DELE + QUIT.
#[test]
fn quota_refuses_at_rcpt_when_the_mailbox_is_full() {
    let server = TestServer::start_with(&config_text(
        "",
        "",
        "",
        "[mailbox]\nquota = \"1K\"\nquota_warning = 50\n",
    ));
    server.add_user("alice@example.test", "pw");
    ok(server.cli(
        &["user", "add", "--quota", "unlimited", "bob@example.test"],
        "pw\n",
    ));
    let body = format!("Subject: big\r\n\r\n{}\r\n", "x".repeat(600));
    let send = |to: &str| smtplib_send(&server, "x@remote.test", &[to], &body);
    assert!(send("alice@example.test").starts_with("OK {}"));
    assert!(server.wait_for_log("mailbox crossed its quota warning threshold"));
    // 600 + headers < 1024 < twice that: full after the second.
    assert!(send("alice@example.test").starts_with("OK {}"));
    assert!(server.wait_for_log("mailbox is full"));
    let refused = send("alice@example.test");
    assert!(
        refused.starts_with("REFUSED") && refused.contains("552") && refused.contains("5.2.2"),
        "{refused}"
    );
    // An alias to a full mailbox is refused too; others are not.
    ok(server.cli(
        &["alias", "add", "info@example.test", "alice@example.test"],
        "",
    ));
    assert!(send("info@example.test").contains("552"));
    for _ in 0..3 {
        assert!(send("bob@example.test").starts_with("OK {}"));
    }
    let out = ok(server.cli(&["mailbox", "stats", "alice@example.test"], ""));
    assert!(out.contains(" 1024 ") && out.contains('%'), "{out}");
    let err = fails(server.cli(&["route", "explain", "alice@example.test"], ""));
    assert!(
        err.contains("mailbox is at or over its quota") && err.contains("552 5.2.2"),
        "{err}"
    );

    // A larger quota for alice lets mail in at once.
    ok(server.cli(&["user", "set", "alice@example.test", "--quota", "1M"], ""));
    assert!(send("alice@example.test").starts_with("OK {}"));
    ok(server.cli(
        &["user", "set", "alice@example.test", "--quota", "default"],
        "",
    ));
    assert!(send("alice@example.test").contains("552"));
    // Deleting mail over POP3 makes room.
    python(
        r#"
import poplib, sys
p = poplib.POP3(sys.argv[1], int(sys.argv[2]), timeout=20)
p.user("alice@example.test"); p.pass_("pw")
count, _ = p.stat()
for n in range(1, count + 1):
    p.dele(n)
p.quit()
"#,
        &[
            &server.pop3.ip().to_string(),
            &server.pop3.port().to_string(),
        ],
    );
    assert!(send("alice@example.test").starts_with("OK {}"));
    let err = fails(server.cli(
        &["user", "set", "alice@example.test", "--quota", "lots"],
        "",
    ));
    assert!(err.contains("not a size"), "{err}");
    let err = fails(server.cli(&["user", "set", "nobody@example.test", "--quota", "1M"], ""));
    assert!(err.contains("no such user"), "{err}");
}
