//! The examples, the library seams in use: each is started as its own
//! process with a config on port 0, a user is added with `postino user add`
//! over the example's control socket, and real clients check what it does.
//! `custom_router` (a routing actor) and `plus_addresses` (the same rules as
//! a policy) must behave alike: plus-addresses rewritten, the blocked domain
//! refused with their own 5xx, the rest left to the default router.
//! `content_filter` refuses flagged messages at the end of DATA and marks
//! the rest.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::support::server::{binary, cli_with_config, config_text, python};

/// An example's binary, next to the `postino` binary's directory.
///
/// `cargo test --test it` builds only that test (a plain `cargo test` builds
/// the examples too), so the example is built here, once per test run;
/// cargo makes that a no-op when it is fresh.
fn example_binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let mut built = BUILT.get_or_init(Default::default).lock().unwrap();
    if let Some(exe) = built.get(name) {
        return exe.clone();
    }
    let exe = {
        let profile_dir = Path::new(binary()).parent().expect("target/<profile>");
        let exe = profile_dir.join("examples").join(name);
        let target_dir = profile_dir.parent().expect("target dir");
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") => "dev",
            Some(other) => other,
            None => "dev",
        };
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new("timeout")
            .arg("1200")
            .arg(cargo)
            .args(["build", "--offline", "--quiet", "-p", "postino-cli"])
            .args(["--example", name, "--profile", profile])
            .arg("--manifest-path")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
            .arg("--target-dir")
            .arg(target_dir)
            .status();
        match status {
            Ok(s) if s.success() => {}
            // Without cargo (a copied test binary), use what was built.
            other => assert!(
                exe.exists(),
                "building the {name} example failed ({other:?}) and {} is missing",
                exe.display()
            ),
        }
        exe
    };
    built.insert(name.to_owned(), exe.clone());
    exe
}

/// The running example; killed on drop.
struct Example {
    child: Child,
    log: Arc<Mutex<String>>,
    smtp: SocketAddr,
    pop3: SocketAddr,
}

impl Example {
    fn start(name: &str, config: &Path) -> Example {
        let mut child = Command::new(example_binary(name))
            .arg(config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start the {name} example: {e}"));
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr");
        std::thread::spawn({
            let log = log.clone();
            move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let mut log = log.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
            }
        });
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                panic!("the example printed nothing; log:\n{}", log.lock().unwrap());
            }
        };
        let field = |name: &str| -> SocketAddr {
            line.split(' ')
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
                .and_then(|v| v.split(',').next())
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("no {name}= in {line:?}"))
        };
        assert!(line.starts_with("listening "), "{line}");
        Example {
            smtp: field("smtp"),
            pop3: field("pop3"),
            child,
            log,
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// SIGTERM (every example stops on it, as `postino serve` does), then
    /// the exit code (bounded wait).
    fn terminate(&mut self) -> Option<i32> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        for _ in 0..1500 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Example {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn custom_router_rewrites_plus_addresses_and_refuses_a_domain() {
    rewrites_plus_addresses_and_refuses_a_domain("custom_router");
}

#[test]
fn plus_addresses_policy_does_what_the_custom_router_does() {
    rewrites_plus_addresses_and_refuses_a_domain("plus_addresses");
}

/// The plus-address rules of `custom_router` and `plus_addresses`.
fn rewrites_plus_addresses_and_refuses_a_domain(name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("postino.toml");
    std::fs::write(&config, config_text("", "", "", "")).unwrap();
    let mut example = Example::start(name, &config);

    // `postino user add` reaches the example's control socket (the example
    // holds the store, so the CLI could not have opened it).
    let out = cli_with_config(&config, &["user", "add", "alice@example.test"], "pw\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = python(
        r#"
import smtplib, sys
host, port = sys.argv[1], int(sys.argv[2])
s = smtplib.SMTP(host, port, timeout=20)
s.ehlo("client.test")
body = b"Subject: newsletter\r\n\r\nplus-addressed\r\n"
rcpts = ["alice+news@example.test", "x@blocked.test", "nobody+tag@example.test"]
refused = s.sendmail("carol@elsewhere.test", rcpts, body)
for rcpt, (code, text) in sorted(refused.items()):
    print(rcpt, code, text.decode())
s.mail("carol@elsewhere.test")
code, text = s.rcpt("someone@BLOCKED.test")
print("someone@BLOCKED.test", code, text.decode())
s.quit()
"#,
        &[
            &example.smtp.ip().to_string(),
            &example.smtp.port().to_string(),
        ],
    );
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            // The default router, asked with the rewritten address.
            "nobody+tag@example.test 550 5.1.1 <nobody@example.test>: Recipient address rejected: User unknown",
            // The custom router's own 5xx, for any case of the domain.
            "x@blocked.test 550 5.7.1 <x@blocked.test>: this server does not accept mail for blocked.test",
            "someone@BLOCKED.test 550 5.7.1 <someone@BLOCKED.test>: this server does not accept mail for blocked.test",
        ],
        "{out}"
    );

    // The plus-address went to alice, with the address as given recorded.
    let msgs = pop_texts(example.pop3, "alice@example.test", "pw");
    assert_eq!(msgs.len(), 1, "{}", example.log());
    let text = &msgs[0];
    assert!(
        text.contains("Delivered-To: alice@example.test\r\n"),
        "{text}"
    );
    assert!(
        text.contains("X-Original-To: alice+news@example.test\r\n"),
        "{text}"
    );
    assert!(text.ends_with("\r\n\r\nplus-addressed\r\n"), "{text}");
    // Refusals are logged as the server's own are.
    let log = example.log();
    assert!(
        log.contains("NOQUEUE: reject: RCPT from [127.0.0.1]: 550 5.7.1 <x@blocked.test>: this server does not accept mail for blocked.test;"),
        "{log}"
    );

    assert_eq!(example.terminate(), Some(0), "{}", example.log());
    assert!(example.log().contains("stopped"), "{}", example.log());
    // A clean stop removes the control socket.
    assert!(!dir.path().join("data").join("control.sock").exists());
}

#[test]
fn content_filter_refuses_flagged_mail_and_marks_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("postino.toml");
    std::fs::write(&config, config_text("", "", "", "")).unwrap();
    let mut example = Example::start("content_filter", &config);
    let out = cli_with_config(&config, &["user", "add", "alice@example.test"], "pw\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = python(
        r#"
import smtplib, sys
s = smtplib.SMTP(sys.argv[1], int(sys.argv[2]), timeout=20)
s.ehlo("client.test")
spam = b"Subject: win\r\nX-Spam-Flag:\r\n  yes\r\n\r\nX-Spam-Flag: NO in the body\r\n"
try:
    s.sendmail("carol@elsewhere.test", ["alice@example.test"], spam)
    print("spam accepted")
except smtplib.SMTPDataError as e:
    print("spam", e.smtp_code, e.smtp_error.decode())
ham = b"Subject: hello\r\nX-Spam-Flag: NO\r\n\r\nX-Spam-Flag: YES in the body\r\n"
s.sendmail("carol@elsewhere.test", ["alice@example.test"], ham)
print("ham accepted")
s.quit()
"#,
        &[
            &example.smtp.ip().to_string(),
            &example.smtp.port().to_string(),
        ],
    );
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["spam 550 5.7.1 Message flagged as spam", "ham accepted"],
        "{out}"
    );

    // Only the clean message was stored, with the filter's header at the
    // end of its header section (the body's look-alike line is not a header).
    let msgs = pop_texts(example.pop3, "alice@example.test", "pw");
    assert_eq!(msgs.len(), 1, "{}", example.log());
    assert!(
        msgs[0].ends_with(
            "Subject: hello\r\nX-Spam-Flag: NO\r\nX-Content-Filter: passed\r\n\r\nX-Spam-Flag: YES in the body\r\n"
        ),
        "{}",
        msgs[0]
    );
    let log = example.log();
    assert!(
        log.contains(
            "NOQUEUE: reject: END-OF-MESSAGE from [127.0.0.1]: 550 5.7.1 Message flagged as spam;"
        ),
        "{log}"
    );
    assert_eq!(example.terminate(), Some(0), "{log}");
}

/// Every message of a mailbox, via Python's poplib, in CRLF form.
fn pop_texts(addr: SocketAddr, user: &str, password: &str) -> Vec<String> {
    let out = python(
        r#"
import json, poplib, sys
p = poplib.POP3(sys.argv[1], int(sys.argv[2]), timeout=20)
p.user(sys.argv[3]); p.pass_(sys.argv[4])
count, _ = p.stat()
texts = [b"".join(l + b"\r\n" for l in p.retr(n)[1]).decode() for n in range(1, count + 1)]
p.quit()
print(json.dumps(texts))
"#,
        &[
            &addr.ip().to_string(),
            &addr.port().to_string(),
            user,
            password,
        ],
    );
    serde_json::from_str(out.trim()).expect("poplib JSON")
}
