//! The real `postino` binary, started for a test on port 0 with a
//! temporary data directory; ports are read from its log, as a postmaster
//! would read them.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tempfile::TempDir;

use super::wait_until;

/// The `postino` binary under test.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_postino")
}

/// A running server and everything needed to stop, restart and inspect it.
pub struct TestServer {
    pub dir: TempDir,
    pub config: PathBuf,
    child: Option<Child>,
    /// Reads the running server's log until it exits.
    reader: Option<std::thread::JoinHandle<()>>,
    /// Everything the server logged, across restarts.
    log: Arc<Mutex<String>>,
    /// The server's `RUST_LOG`.
    rust_log: String,
    pub smtp: SocketAddr,
    pub submission: Option<SocketAddr>,
    pub submissions: Option<SocketAddr>,
    pub pop3: SocketAddr,
    pub pop3s: Option<SocketAddr>,
    /// The admin HTTP listener, with `[admin] listen`.
    pub admin: Option<SocketAddr>,
}

/// The base configuration: every listener on port 0, local domain
/// `example.test`. `extra` is appended (it may add keys to the sections by
/// repeating nothing: use [`TestServer::start_with`] for whole files).
pub fn config_text(extra_top: &str, smtp: &str, routing: &str, rest: &str) -> String {
    format!(
        r#"hostname = "mx.example.test"
data_dir = "data"
{extra_top}
[smtp]
listen = ["127.0.0.1:0"]
{smtp}
[pop3]
listen = ["127.0.0.1:0"]
auth_failure_delay = "10ms"
max_auth_failure_delay = "40ms"
[routing]
local_domains = ["example.test"]
{routing}
[store]
# Only postino's own flushes make data durable here, so a 250 sent before
# its flush would show up as a lost message in the kill -9 tests.
background_flush = "0s"
{rest}
"#
    )
}

impl TestServer {
    /// A server with the default test configuration.
    pub fn start() -> TestServer {
        TestServer::start_with(&config_text("", "", "", ""))
    }

    /// A server with this whole configuration file.
    pub fn start_with(config: &str) -> TestServer {
        TestServer::start_logging(config, "info,postino=debug")
    }

    /// A server with this configuration file and this `RUST_LOG` filter
    /// (e.g. `"trace"` to see everything any crate logs).
    pub fn start_logging(config: &str, rust_log: &str) -> TestServer {
        let mut server = TestServer::configured(config);
        server.rust_log = rust_log.to_owned();
        server.spawn();
        server
    }

    /// Writes the configuration but starts nothing yet ([`TestServer::restart`]
    /// starts it), e.g. to prepare the data directory with the CLI first.
    pub fn configured(config: &str) -> TestServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("postino.toml");
        fs::write(&path, config).expect("write config");
        TestServer {
            dir,
            config: path,
            child: None,
            reader: None,
            log: Arc::new(Mutex::new(String::new())),
            rust_log: "info,postino=debug".to_owned(),
            smtp: "0.0.0.0:0".parse().unwrap(),
            submission: None,
            submissions: None,
            pop3: "0.0.0.0:0".parse().unwrap(),
            pop3s: None,
            admin: None,
        }
    }

    /// Starts the binary and waits for its "postino started" log line.
    fn spawn(&mut self) {
        let mut child = Command::new(binary())
            .args(["serve", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", &self.rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start postino");
        let stderr = child.stderr.take().expect("stderr piped");
        let log = self.log.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut tx = Some(tx);
            // Split on LF only and keep bytes that are not UTF-8 (as U+FFFD):
            // the log under test may hold anything a client sent.
            for line in BufReader::new(stderr).split(b'\n') {
                let Ok(line) = line else { break };
                let line = String::from_utf8_lossy(&line).into_owned();
                if line.contains("postino started") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(line.clone());
                    }
                }
                let mut log = log.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        self.child = Some(child);
        self.reader = Some(reader);
        let started = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => line,
            Err(_) => panic!("postino did not start; log:\n{}", self.log()),
        };
        self.smtp = first_addr(&started, "smtp").expect("smtp address in log");
        self.pop3 = first_addr(&started, "pop3").expect("pop3 address in log");
        self.submission = first_addr(&started, "submission");
        self.submissions = first_addr(&started, "submissions");
        self.pop3s = first_addr(&started, "pop3s");
        self.admin = first_addr(&started, "admin");
    }

    /// Everything logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the log contains `needle` (bounded).
    pub fn wait_for_log(&self, needle: &str) -> bool {
        wait_until(Duration::from_secs(20), || self.log().contains(needle))
    }

    /// SIGKILL: no chance to flush or clean up. Returns once everything
    /// the process logged is in [`TestServer::log`].
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }

    /// Whether the server process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().is_ok_and(|status| status.is_none()))
    }

    /// SIGTERM, then waits for a clean exit; returns its status code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        unsafe_kill(child.id(), "TERM");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the binary again on the same data directory (new ports).
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// Rewrites the config (for the next restart).
    pub fn set_config(&mut self, text: &str) {
        fs::write(&self.config, text).expect("write config");
    }

    /// Runs `postino ARGS --config <ours>` with `stdin`, as an administrator would.
    pub fn cli(&self, args: &[&str], stdin: &str) -> Output {
        cli_with_config(&self.config, args, stdin)
    }

    /// `postino user add` with a password.
    pub fn add_user(&self, address: &str, password: &str) {
        let out = self.cli(&["user", "add", address], &format!("{password}\n"));
        assert!(
            out.status.success(),
            "user add failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Sets a store failpoint in the running server (the test build has the
    /// `failpoints` feature; see `postino_core::failpoints` for the names):
    /// `actions` as the `fail` crate reads them, e.g. `"return"`,
    /// `"return(enospc)"`, `"off"`.
    pub fn failpoint(&self, name: &str, actions: &str) {
        use postino::control::{call, Request, Response};
        let request = Request::Failpoint {
            name: name.to_owned(),
            actions: actions.to_owned(),
        };
        match call(&self.data_dir().join("control.sock"), &request) {
            Ok(Some(Response::Ok(_))) => {}
            other => panic!("failpoint {name}={actions}: {other:?}"),
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs the CLI with a config file and standard input.
pub fn cli_with_config(config: &Path, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(binary())
        .args(args)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run postino");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("postino output")
}

fn unsafe_kill(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status();
}

/// Parses `name=[127.0.0.1:1234, ...]` out of the start line.
fn first_addr(line: &str, name: &str) -> Option<SocketAddr> {
    // The text format writes ` smtp=[…]`, the JSON one `"smtp":"[…]"`.
    let (text, json) = (format!(" {name}=["), format!("\"{name}\":\"["));
    let start = match line.find(&text) {
        Some(at) => at + text.len(),
        None => line.find(&json)? + json.len(),
    };
    let rest = &line[start..];
    let end = rest.find([']', ','])?;
    rest[..end].trim().parse().ok()
}

/// Runs a Python script with the given arguments; panics with its output on
/// failure. Returns standard output. (`python3` from PATH: the standard
/// library's smtplib and poplib are what we need.)
pub fn python(script: &str, args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "python failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Sends `body` from `s@remote.test` to `to` with Python's smtplib: "OK",
/// or "ERR code text" for a refusal at any step (MAIL, RCPT or DATA).
pub fn smtplib_send(server: &TestServer, to: &str, body: &str) -> String {
    python(
        r#"
import smtplib, sys
host, port, to, body = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
s = smtplib.SMTP(host, port, timeout=30)
try:
    s.sendmail("s@remote.test", [to], body.encode())
    print("OK")
except smtplib.SMTPRecipientsRefused as e:
    code, text = e.recipients[to]
    print("ERR", code, text.decode())
except smtplib.SMTPResponseException as e:
    print("ERR", e.smtp_code, e.smtp_error.decode())
s.quit()
"#,
        &[
            &server.smtp.ip().to_string(),
            &server.smtp.port().to_string(),
            to,
            body,
        ],
    )
    .trim()
    .to_owned()
}

/// Reads lines with `next_line` until the last line of one SMTP reply
/// (`NNN ` rather than `NNN-`, or EOF); returns them joined with '\n'.
pub fn smtp_reply(mut next_line: impl FnMut() -> String) -> String {
    let mut lines = Vec::new();
    loop {
        let line = next_line();
        let last = line.len() < 4 || line.as_bytes()[3] == b' ';
        lines.push(line);
        if last {
            return lines.join("\n");
        }
    }
}

/// A raw TCP client for byte-exact conversations.
pub struct Raw {
    stream: std::net::TcpStream,
    reader: BufReader<std::net::TcpStream>,
}

impl Raw {
    pub fn connect(addr: SocketAddr) -> Raw {
        let stream = std::net::TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Raw { stream, reader }
    }

    /// The client's own address: what the server's log names as `peer`.
    pub fn local_addr(&self) -> SocketAddr {
        self.stream.local_addr().expect("local address")
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    /// One line, without CRLF; empty string at EOF.
    pub fn line(&mut self) -> String {
        let mut line = String::new();
        let _ = self.reader.read_line(&mut line);
        line.trim_end_matches(['\r', '\n']).to_owned()
    }

    /// One whole SMTP reply (all its lines), joined with '\n'.
    pub fn reply(&mut self) -> String {
        smtp_reply(|| self.line())
    }

    /// Sends a command line and returns the reply.
    pub fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes());
        self.reply()
    }

    /// True when the server closed the connection.
    pub fn closed(&mut self) -> bool {
        let mut buf = String::new();
        matches!(self.reader.read_line(&mut buf), Ok(0))
    }
}
