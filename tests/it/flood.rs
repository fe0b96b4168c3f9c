//! Floods and slow clients (issue 9): a login flood must not exhaust the
//! server's memory nor stop mail, and a client that drips bytes must not
//! keep a session open past the timeout.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::support::server::{config_text, python, TestServer};

/// POP3 login flood: good and bad passwords mixed, 64 at a time, with the
/// login cache off so that every login costs an argon2 check.
const FLOOD: &str = r#"
import poplib, sys, threading, time
host, port, total, conc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
lock = threading.Lock()
state = {"left": total, "ok": 0, "bad": 0, "err": []}
def worker():
    while True:
        with lock:
            if state["left"] == 0:
                return
            state["left"] -= 1
            n = state["left"]
        user, good = "u%d@example.test" % (n % 4), n % 2 == 0
        try:
            p = poplib.POP3(host, port, timeout=120)
            p.user(user)
            try:
                p.pass_("pw-%d" % (n % 4) if good else "wrong")
                p.quit()
                key = "ok" if good else "bad-accepted"
            except poplib.error_proto as e:
                p.close()
                # [IN-USE]: the password was right, another session of the
                # flood holds the maildrop.
                in_use = b"[IN-USE]" in e.args[0]
                key = "bad" if not good else "ok" if in_use else "ok-refused: %r" % e.args[0]
            with lock:
                if key in ("ok", "bad"):
                    state[key] += 1
                else:
                    state["err"].append(key)
        except Exception as e:
            with lock:
                state["err"].append(repr(e))
start = time.time()
threads = [threading.Thread(target=worker) for _ in range(conc)]
for t in threads: t.start()
for t in threads: t.join()
print(state["ok"], state["bad"], len(state["err"]), "%.1f" % (time.time() - start), state["err"][:3])
"#;

/// One SMTP transaction with smtplib: EHLO, MAIL, RCPT, DATA.
const SEND: &str = r#"
import smtplib, sys
s = smtplib.SMTP(sys.argv[1], int(sys.argv[2]), timeout=300)
code, reply = s.ehlo("client.test")
assert code == 250, (code, reply)
refused = s.sendmail("carol@elsewhere.test", ["u0@example.test"], b"Subject: during the flood\r\n\r\nhello\r\n")
assert not refused, refused
s.quit()
print("sent")
"#;

/// A value from `/proc/PID/status` in KiB (`VmHWM`: peak RSS).
fn status_kib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {status}"))
}

/// A login flood is bounded in memory (argon2 checks run on a few threads
/// with their memory reused: before, 100 logins 16 at a time took 1.4 GB),
/// and mail still flows while it lasts. `POSTINO_FLOOD_LOGINS=10000` makes
/// it the long measurement (peak RSS and logins/s on stderr).
#[test]
fn login_flood_keeps_memory_bounded_and_mail_flowing() {
    let logins: usize = std::env::var("POSTINO_FLOOD_LOGINS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let server = TestServer::start_with(
        r#"hostname = "mx.example.test"
data_dir = "data"
[smtp]
listen = ["127.0.0.1:0"]
[pop3]
listen = ["127.0.0.1:0"]
auth_failure_delay = "10ms"
max_auth_failure_delay = "40ms"
# The flood comes from one address, 64 at a time.
max_connections_per_ip = 100
[routing]
local_domains = ["example.test"]
[auth]
cache_ttl = "0s"
"#,
    );
    for n in 0..4 {
        server.add_user(&format!("u{n}@example.test"), &format!("pw-{n}"));
    }
    let pid = server.pid().expect("server running");
    let pop3 = server.pop3;
    let started = Instant::now();
    let flood = std::thread::spawn(move || {
        python(
            FLOOD,
            &[
                &pop3.ip().to_string(),
                &pop3.port().to_string(),
                &logins.to_string(),
                "64",
            ],
        )
    });

    // Mail while the flood is on: once logins are being answered.
    assert!(
        server.wait_for_log("pop3 login"),
        "the flood never got an answer:\n{}",
        server.log()
    );
    let sent = python(
        SEND,
        &[
            &server.smtp.ip().to_string(),
            &server.smtp.port().to_string(),
        ],
    );
    assert_eq!(sent.trim(), "sent");

    let out = flood.join().expect("flood thread");
    let elapsed = started.elapsed();
    let fields: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(
        fields[..3],
        [
            (logins / 2).to_string().as_str(),
            (logins / 2).to_string().as_str(),
            "0"
        ],
        "good logins, refused bad ones, errors: {out}"
    );
    let peak = status_kib(pid, "VmHWM");
    eprintln!(
        "{logins} logins in {:.1} s ({:.0}/s), peak RSS {} MiB, RSS now {} MiB",
        elapsed.as_secs_f64(),
        logins as f64 / elapsed.as_secs_f64(),
        peak / 1024,
        status_kib(pid, "VmRSS") / 1024
    );
    assert!(
        peak < 256 * 1024,
        "peak RSS {} MiB after {logins} logins",
        peak / 1024
    );
}

/// Sends `bytes` one at a time, waiting up to `pause` for an answer after
/// each (the pause is that wait). Returns what the server sent, once it sent
/// a whole line, and whether it then closed the connection; `None` if it
/// sent nothing while all of `bytes` went out.
fn drip(stream: &mut TcpStream, bytes: &[u8], pause: Duration) -> Option<(String, bool)> {
    stream.set_read_timeout(Some(pause)).unwrap();
    let mut got = Vec::new();
    for byte in bytes {
        // Stop writing once the server has answered: writing to a closed
        // socket could reset it and lose the answer still unread.
        if stream.write_all(&[*byte]).is_err() {
            break;
        }
        let mut buf = [0u8; 512];
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            // Interrupted: a signal to the test process, not an answer.
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(e) => panic!("read: {e}"),
        }
        if got.ends_with(b"\r\n") {
            break;
        }
    }
    if got.is_empty() {
        return None;
    }
    // Then the connection must end (bounded: 20 s).
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut rest = Vec::new();
    let closed = stream.read_to_end(&mut rest).is_ok();
    got.extend_from_slice(&rest);
    Some((String::from_utf8_lossy(&got).into_owned(), closed))
}

/// Reads one CRLF line.
fn line(stream: &mut TcpStream) -> String {
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => got.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&got).trim_end().to_owned()
}

/// Reads one whole SMTP reply (its last line starts `NNN `).
fn smtp_reply(stream: &mut TcpStream) -> String {
    crate::support::server::smtp_reply(|| line(stream))
}

/// A short timeout, so that dripping outlasts it quickly.
fn slow_client_server() -> TestServer {
    TestServer::start_with(
        &config_text("", "timeout = \"2s\"", "", "")
            .replace("[pop3]\n", "[pop3]\ntimeout = \"2s\"\n"),
    )
}

/// SMTP: the timeout is per command line, not per read: a client that
/// sends one byte every 250 ms (each well within the 2 s timeout) is cut
/// off with `421 4.4.2` once the line has taken 2 s. Before, every byte
/// restarted the timer and 2,000 such sessions outlived a 30 s timeout.
#[test]
fn smtp_client_dripping_a_command_is_cut_off() {
    let server = slow_client_server();
    let mut c = TcpStream::connect(server.smtp).unwrap();
    assert!(smtp_reply(&mut c).starts_with("220 "));
    c.write_all(b"EHLO client.test\r\n").unwrap();
    assert!(smtp_reply(&mut c).starts_with("250"));
    let command = b"MAIL FROM:<carol@elsewhere.test> SIZE=100 BODY=8BITMIME".repeat(2);
    let (reply, closed) = drip(&mut c, &command, Duration::from_millis(250))
        .expect("no reply while dripping a command for 27 s");
    assert!(reply.starts_with("421 4.4.2 "), "{reply}");
    assert!(reply.contains("timeout exceeded"), "{reply}");
    assert!(closed, "connection left open after {reply}");
}

/// A command that is slow but complete within the timeout still works, and
/// the next command gets its own deadline.
#[test]
fn smtp_slow_but_complete_command_works() {
    let server = slow_client_server();
    let mut c = TcpStream::connect(server.smtp).unwrap();
    assert!(smtp_reply(&mut c).starts_with("220 "));
    // Four commands of 600 ms each: 2.4 s in all, more than the timeout.
    for _ in 0..4 {
        // Three parts, 300 ms apart: nothing is answered before the CRLF.
        for part in [&b"NO"[..], b"O", b"P\r\n"] {
            c.write_all(part).unwrap();
            if part.ends_with(b"\n") {
                break;
            }
            c.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            let mut buf = [0u8; 64];
            // A signal to the test process (other tests start and reap
            // children) may interrupt the wait: that is no answer either.
            let early = loop {
                match c.read(&mut buf) {
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    other => break other,
                }
            };
            assert!(
                matches!(&early, Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)),
                "answered a partial line: {early:?}"
            );
        }
        let reply = smtp_reply(&mut c);
        assert!(reply.starts_with("250 "), "{reply}");
    }
    c.write_all(b"QUIT\r\n").unwrap();
    assert!(smtp_reply(&mut c).starts_with("221 "));
}

/// POP3: the same per-line deadline; the client is told and disconnected as
/// an idle one is.
#[test]
fn pop3_client_dripping_a_command_is_cut_off() {
    let server = slow_client_server();
    let mut c = TcpStream::connect(server.pop3).unwrap();
    assert!(line(&mut c).starts_with("+OK"));
    let command = b"USER a-rather-long-user-name@example.test".repeat(2);
    let (reply, closed) = drip(&mut c, &command, Duration::from_millis(250))
        .expect("no reply while dripping a command for 20 s");
    assert!(reply.starts_with("-ERR "), "{reply}");
    assert!(reply.contains("inactivity"), "{reply}");
    assert!(closed, "connection left open after {reply}");

    // Slow but complete within the timeout: answered.
    let mut c = TcpStream::connect(server.pop3).unwrap();
    assert!(line(&mut c).starts_with("+OK"));
    for part in [&b"CA"[..], b"PA\r\n"] {
        c.write_all(part).unwrap();
        if !part.ends_with(b"\n") {
            c.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            let mut buf = [0u8; 64];
            assert!(c.read(&mut buf).is_err(), "answered a partial line");
        }
    }
    assert!(line(&mut c).starts_with("+OK"));
}
