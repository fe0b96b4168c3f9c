//! Reloading the configuration of a running server (SIGHUP and `postino
//! reload`, as `postfix reload`): routing and limits take effect for new
//! sessions, a broken file is refused with file:line:key and the running
//! configuration stays, listener changes are named as needing a restart.

use std::process::Command;
use std::time::Duration;

use crate::support::server::{config_text, python, Raw, TestServer};
use crate::support::{accepts_tcp, free_tcp_port, wait_until};

/// Sends SIGHUP to the server.
fn hup(server: &TestServer) {
    let pid = server.pid().expect("running").to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
}

/// Waits until `needle` has been logged at least `n` times.
fn wait_for_nth(server: &TestServer, needle: &str, n: usize) -> bool {
    wait_until(Duration::from_secs(20), || {
        server.log().matches(needle).count() >= n
    })
}

/// One message from outside (not a relay client) with smtplib: "OK …",
/// "REFUSED {…}" or "ERR code text".
fn send(server: &TestServer, to: &str) -> String {
    python(
        r#"
import smtplib, sys
host, port, rcpt = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = smtplib.SMTP(host, port, timeout=20)
s.ehlo("client.test")
try:
    print("OK", s.sendmail("carol@elsewhere.test", [rcpt], b"Subject: hi\r\n\r\nhello\r\n"))
except smtplib.SMTPRecipientsRefused as e:
    print("REFUSED", e.recipients)
except smtplib.SMTPResponseException as e:
    print("ERR", e.smtp_code, e.smtp_error.decode())
s.quit()
"#,
        &[
            &server.smtp.ip().to_string(),
            &server.smtp.port().to_string(),
            to,
        ],
    )
}

#[test]
fn sighup_applies_new_local_domains_and_message_size() {
    // Loopback is not a relay client here: mail to other domains is refused.
    let base = config_text("", "", "relay_networks = []", "");
    let mut server = TestServer::start_with(&base);
    server.add_user("alice@example.test", "wonderland");
    let refused = send(&server, "bob@b.test");
    assert!(refused.starts_with("REFUSED"), "{refused}");
    assert!(refused.contains("554"), "{refused}");

    // A second local domain and a smaller size limit.
    server.set_config(&config_text("", "max_message_size = 2000", "", "").replace(
        r#"local_domains = ["example.test"]"#,
        r#"local_domains = ["example.test", "b.test"]"#,
    ));
    hup(&server);
    assert!(
        wait_for_nth(&server, "configuration reloaded", 1),
        "{}",
        server.log()
    );
    let log = server.log();
    assert!(log.contains("local_domains"), "{log}");
    assert!(log.contains("max_message_size"), "{log}");
    assert!(!log.contains("need a restart"), "{log}");

    // A user in the new domain can be added (the control socket checks the
    // local domains in use) and receives mail.
    server.add_user("bob@b.test", "builder");
    let sent = send(&server, "bob@b.test");
    assert!(sent.starts_with("OK {}"), "{sent}");

    // The new size limit: announced in EHLO, enforced at the end of DATA.
    let mut c = Raw::connect(server.smtp);
    assert!(c.reply().starts_with("220 "));
    let ehlo = c.cmd("EHLO client.test");
    assert!(ehlo.contains("250-SIZE 2000"), "{ehlo}");
    assert!(c.cmd("MAIL FROM:<carol@elsewhere.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<alice@example.test>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    let body = format!("Subject: big\r\n\r\n{}\r\n.\r\n", "x".repeat(3000));
    c.send(body.as_bytes());
    let reply = c.reply();
    assert!(reply.starts_with("552"), "{reply}");
}

#[test]
fn broken_config_on_sighup_keeps_the_running_one() {
    let mut server = TestServer::start_with(&config_text("", "", "", ""));
    server.add_user("alice@example.test", "wonderland");
    // Line 6 is the first line after `listen` in [smtp].
    let broken = config_text("", "max_message_size = \"lots\"", "", "");
    assert_eq!(broken.lines().nth(5), Some("max_message_size = \"lots\""));
    server.set_config(&broken);
    hup(&server);
    assert!(
        server.wait_for_log("configuration reload failed"),
        "{}",
        server.log()
    );
    let log = server.log();
    let line = log
        .lines()
        .find(|l| l.contains("configuration reload failed"))
        .unwrap();
    assert!(line.contains("postino.toml:6"), "{line}");
    assert!(line.contains("smtp.max_message_size"), "{line}");
    assert!(!log.contains("configuration reloaded"), "{log}");
    // Still serving, with the old configuration.
    let sent = send(&server, "alice@example.test");
    assert!(sent.starts_with("OK {}"), "{sent}");
    let mut c = Raw::connect(server.smtp);
    assert!(c.reply().starts_with("220 "));
    assert!(!c.cmd("EHLO client.test").contains("SIZE 2000"));
}

#[test]
fn postino_reload_names_listener_changes_and_keeps_the_old_listener() {
    let mut server = TestServer::start_with(&config_text("", "", "", ""));
    let port = free_tcp_port(&["127.0.0.1".parse().unwrap()]);
    let moved = config_text("", "max_recipients = 100", "", "").replacen(
        r#"listen = ["127.0.0.1:0"]"#,
        &format!(r#"listen = ["127.0.0.1:{port}"]"#),
        1,
    );
    server.set_config(&moved);
    let out = server.cli(&["reload"], "");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("smtp.max_recipients"), "{stdout}");
    assert!(stdout.contains("needs a restart"), "{stdout}");
    assert!(stdout.contains("smtp.listen"), "{stdout}");
    assert!(server.wait_for_log("need a restart"), "{}", server.log());
    let warning = server.log();
    let warning = warning
        .lines()
        .find(|l| l.contains("need a restart"))
        .unwrap();
    assert!(warning.contains("smtp.listen"), "{warning}");
    assert!(warning.contains("WARN"), "{warning}");

    // The old listener serves, with the new recipient limit; the new
    // address is not bound.
    let mut c = Raw::connect(server.smtp);
    assert!(c.reply().starts_with("220 "));
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    assert!(c.cmd("MAIL FROM:<carol@elsewhere.test>").starts_with("250"));
    server.add_user("alice@example.test", "wonderland");
    for _ in 0..100 {
        assert!(c.cmd("RCPT TO:<alice@example.test>").starts_with("250"));
    }
    let over = c.cmd("RCPT TO:<alice@example.test>");
    assert!(over.starts_with("452"), "{over}");
    assert!(!accepts_tcp(format!("127.0.0.1:{port}").parse().unwrap()));
}

#[test]
fn server_reload_for_embedders() {
    let dir = tempfile::tempdir().unwrap();
    let config_file = dir.path().join("postino.toml");
    std::fs::write(&config_file, config_text("", "", "", "")).unwrap();
    let config = postino_core::Config::load(&config_file).unwrap();
    let mut next = config.clone();
    next.smtp.max_message_size = 2000;
    next.data_dir = dir.path().join("elsewhere");

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (events, event) = std::sync::mpsc::channel();
    let server_thread = std::thread::spawn(move || {
        actix::System::new().block_on(async move {
            let server = postino::Server::builder(config).start().await.unwrap();
            let done = server.reload(next).unwrap();
            events
                .send((server.smtp_addrs()[0], done, server.config()))
                .unwrap();
            server
                .run_until(async {
                    let _ = stopped.await;
                })
                .await;
        });
    });
    let (smtp, done, in_use) = event
        .recv_timeout(Duration::from_secs(120))
        .expect("the server started");
    assert_eq!(done.applied, ["smtp.max_message_size"]);
    assert_eq!(done.need_restart, ["data_dir"]);
    assert_eq!(in_use.smtp.max_message_size, 2000);
    assert_eq!(in_use.data_dir, dir.path().join("data"));
    let mut c = Raw::connect(smtp);
    assert!(c.reply().starts_with("220 "));
    assert!(c.cmd("EHLO client.test").contains("250-SIZE 2000"));
    let _ = stop.send(());
    server_thread.join().unwrap();
}
