//! Receiving SMTP servers for tests, on loopback addresses other than
//! 127.0.0.1 so that several can share one port (MX hosts all listen on the
//! delivery port).
//!
//! - [`Sink`]: a real SMTP server, Python's aiosmtpd (Debian
//!   `python3-aiosmtpd`, run with `/usr/bin/python3`), with a small handler
//!   that stores each message in a directory and can refuse recipients or
//!   hang on command.
//! - [`RawServer`]: a scripted server written in the test, for conversations
//!   aiosmtpd will not hold (odd greetings, pipelining checks, garbage).

use std::fs::File;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

use super::{accepts_tcp, wait_until};

/// The aiosmtpd handler. It writes `<n>.json` (envelope and session facts)
/// and `<n>.eml` (the content exactly as received, after dot-unstuffing) for
/// every message, content first and each by rename, so a reader never sees
/// half a message.
const SINK_PY: &str = r#"
import argparse, asyncio, itertools, json, logging, os, ssl, sys, time
from aiosmtpd.smtp import SMTP, AuthResult

p = argparse.ArgumentParser()
p.add_argument("--host", required=True)
p.add_argument("--port", type=int, required=True)
p.add_argument("--dir", required=True)
p.add_argument("--rcpt", action="append", default=[])  # ADDRESS=REPLY
p.add_argument("--hang", choices=["mail", "rcpt", "data"])
p.add_argument("--size", type=int, default=0)
p.add_argument("--auth")  # USER:PASSWORD
p.add_argument("--smtputf8", action="store_true")
p.add_argument("--tls-cert")  # offer STARTTLS with this PEM chain ...
p.add_argument("--tls-key")   # ... and key
p.add_argument("--tls-implicit", action="store_true")  # TLS from the first byte
p.add_argument("--tls-broken", action="store_true")  # offer STARTTLS, fail every handshake
p.add_argument("--dsn", action="store_true")  # offer DSN, take its parameters
p.add_argument("--tempfail", type=int, default=0)  # first N MAILs get 421
p.add_argument("--delay", type=float, default=0)  # seconds before the final 250
p.add_argument("--record")  # file: "<monotonic time> <transactions open>" per MAIL
args = p.parse_args()
tempfails = itertools.count()
open_transactions = 0
rcpt_replies = dict(r.split("=", 1) for r in args.rcpt)
counter = itertools.count()
logging.basicConfig(level=logging.WARNING)

def write(name, data):
    tmp = os.path.join(args.dir, "." + name)
    with open(tmp, "wb") as f:
        f.write(data)
    os.rename(tmp, os.path.join(args.dir, name))

class Handler:
    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if args.dsn:
            responses.insert(len(responses) - 1, "250-DSN")
        return responses

    async def handle_MAIL(self, server, session, envelope, address, options):
        global open_transactions
        if args.hang == "mail":
            await asyncio.sleep(3600)
        if next(tempfails) < args.tempfail:
            return "421 4.7.0 mx.test busy, try again later"
        if args.record:
            open_transactions += 1
            with open(args.record, "a") as f:
                f.write("%f %d\n" % (time.monotonic(), open_transactions))
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server, session, envelope, address, options):
        if args.hang == "rcpt":
            await asyncio.sleep(3600)
        reply = rcpt_replies.get(address)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server, session, envelope):
        global open_transactions
        if args.hang == "data":
            await asyncio.sleep(3600)
        if args.delay:
            await asyncio.sleep(args.delay)
        if args.record:
            open_transactions -= 1
        n = "%06d" % next(counter)
        write(n + ".eml", envelope.original_content)
        meta = {
            "mail_from": envelope.mail_from,
            "mail_options": envelope.mail_options,
            "rcpt_tos": envelope.rcpt_tos,
            "rcpt_options": envelope.rcpt_options,
            "helo": session.host_name,
            "esmtp": session.extended_smtp,
            "peer": list(session.peer[:2]),
            "auth": session.auth_data.login.decode() if session.auth_data else None,
            "tls": server.tls_active(),
        }
        write(n + ".json", json.dumps(meta).encode())
        return "250 2.0.0 Ok: queued as " + n

def authenticator(server, session, envelope, mechanism, auth_data):
    user, password = args.auth.split(":", 1)
    ok = auth_data.login.decode() == user and auth_data.password.decode() == password
    # handled=False: aiosmtpd itself answers a failure with 535 (by default
    # it leaves the client waiting for a reply that never comes).
    return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

class DsnSMTP(SMTP):
    """aiosmtpd knows no DSN: with --dsn its parameters pass its checks
    (they stay in the options the handler records)."""
    def _getparams(self, params):
        result = super()._getparams(params)
        if args.dsn and result is not None:
            for key in ("RET", "ENVID", "NOTIFY", "ORCPT"):
                result.pop(key, None)
        return result

def tls_context():
    if not args.tls_cert:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.tls_cert, args.tls_key)
    if args.tls_broken:
        # No cipher the client can agree to: the handshake always fails.
        ctx.maximum_version = ssl.TLSVersion.TLSv1
        ctx.set_ciphers("NULL")
    return ctx

class Recording(DsnSMTP):
    """Appends "COMMAND tls=0|1 peer=PORT" to commands.log for the commands
    that matter to TLS: what crossed the network in clear."""
    def tls_active(self):
        return bool(self._tls_protocol is not None
                    or self.transport.get_extra_info("ssl_object") is not None)
    def note(self, cmd):
        with open(os.path.join(args.dir, "..", "commands.log"), "a") as f:
            f.write("%s tls=%d peer=%d\n" % (cmd, self.tls_active(), self.session.peer[1]))
    async def smtp_EHLO(self, arg):
        self.note("EHLO")
        return await super().smtp_EHLO(arg)
    async def smtp_STARTTLS(self, arg):
        self.note("STARTTLS")
        return await super().smtp_STARTTLS(arg)
    async def smtp_AUTH(self, arg):
        self.note("AUTH")
        return await super().smtp_AUTH(arg)
    async def smtp_MAIL(self, arg):
        self.note("MAIL")
        return await super().smtp_MAIL(arg)

async def main():
    loop = asyncio.get_running_loop()
    ctx = tls_context()
    def factory():
        kw = {}
        if args.auth:
            kw = dict(authenticator=authenticator, auth_require_tls=False,
                      auth_exclude_mechanism=["LOGIN"])
        if args.size:
            kw["data_size_limit"] = args.size
        if ctx is not None and not args.tls_implicit:
            kw["tls_context"] = ctx
        return Recording(Handler(), hostname="mx.test", enable_SMTPUTF8=args.smtputf8, **kw)
    implicit = ctx if args.tls_implicit else None
    server = await loop.create_server(factory, args.host, args.port, ssl=implicit)
    async with server:
        await server.serve_forever()

asyncio.run(main())
"#;

/// What a [`Sink`] should do besides accepting everything.
#[derive(Debug, Clone, Default)]
pub struct SinkOptions {
    /// `(address, reply line)`: answer RCPT TO for that address with the
    /// reply (e.g. `"550 5.1.1 User unknown"`).
    pub rcpt: Vec<(String, String)>,
    /// Never answer this command: `"mail"`, `"rcpt"` or `"data"` (the final
    /// dot).
    pub hang: Option<&'static str>,
    /// Announce and enforce `SIZE n`.
    pub size: Option<u64>,
    /// Offer AUTH PLAIN and accept only this user and password.
    pub auth: Option<(String, String)>,
    pub smtputf8: bool,
    /// `(cert, key)` PEM files: offer STARTTLS with them.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// With `tls`: TLS from the first byte (port 465 style), no STARTTLS.
    pub tls_implicit: bool,
    /// With `tls`: offer STARTTLS but fail every handshake.
    pub tls_broken: bool,
    /// Offer DSN and take its parameters (recorded, not acted on).
    pub dsn: bool,
    /// Answer the first `tempfail` MAIL commands with `421 4.7.0`.
    pub tempfail: usize,
    /// Wait this long before answering the final dot (so that
    /// transactions overlap).
    pub delay: Option<Duration>,
    /// Record the transactions open at each accepted MAIL
    /// ([`Sink::transactions`]).
    pub record: bool,
}

impl SinkOptions {
    /// A sink that answers RCPT TO for each address with its reply line
    /// (e.g. `"550 5.1.1 User unknown"`), and takes the rest.
    pub fn answering(rcpt: &[(&str, &str)]) -> SinkOptions {
        SinkOptions {
            rcpt: rcpt
                .iter()
                .map(|(address, reply)| (address.to_string(), reply.to_string()))
                .collect(),
            ..SinkOptions::default()
        }
    }
}

/// One message as the sink received it.
#[derive(Debug, Clone, Deserialize)]
pub struct Received {
    pub mail_from: String,
    pub mail_options: Vec<String>,
    pub rcpt_tos: Vec<String>,
    /// RCPT parameters of all recipients, upper-cased by aiosmtpd.
    #[serde(default)]
    pub rcpt_options: Vec<String>,
    /// The EHLO/HELO name.
    pub helo: Option<String>,
    pub esmtp: bool,
    /// Client address and port: equal for messages of one connection.
    pub peer: (String, u16),
    pub auth: Option<String>,
    /// The message came over TLS.
    #[serde(default)]
    pub tls: bool,
    #[serde(skip)]
    pub content: Vec<u8>,
}

/// One command as a [`Sink`] recorded it ([`Sink::commands`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpCommand {
    /// `EHLO`, `STARTTLS`, `AUTH` or `MAIL`.
    pub verb: String,
    /// Whether it came over TLS.
    pub tls: bool,
    /// The client's port: equal for the commands of one connection.
    pub peer: u16,
}

/// A running aiosmtpd; killed on drop.
pub struct Sink {
    child: Child,
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Sink {
    /// Starts aiosmtpd on `ip:port` and waits until it accepts connections.
    ///
    /// # Panics
    ///
    /// When `/usr/bin/python3` with aiosmtpd is missing or the server does
    /// not come up within 15 s.
    pub fn start(ip: Ipv4Addr, port: u16, options: &SinkOptions) -> Sink {
        let dir = tempfile::tempdir().expect("temp dir");
        let script = dir.path().join("sink.py");
        std::fs::write(&script, SINK_PY).expect("write sink.py");
        let spool = dir.path().join("mail");
        std::fs::create_dir(&spool).expect("spool dir");
        let log_path = dir.path().join("sink.log");
        let log = File::create(&log_path).expect("log file");

        let mut cmd = Command::new("/usr/bin/python3");
        cmd.arg(&script)
            .arg(format!("--host={ip}"))
            .arg(format!("--port={port}"))
            .arg(format!("--dir={}", spool.display()));
        for (address, reply) in &options.rcpt {
            cmd.arg(format!("--rcpt={address}={reply}"));
        }
        if let Some(hang) = options.hang {
            cmd.arg(format!("--hang={hang}"));
        }
        if let Some(size) = options.size {
            cmd.arg(format!("--size={size}"));
        }
        if let Some((user, password)) = &options.auth {
            cmd.arg(format!("--auth={user}:{password}"));
        }
        if options.smtputf8 {
            cmd.arg("--smtputf8");
        }
        if let Some((cert, key)) = &options.tls {
            cmd.arg(format!("--tls-cert={}", cert.display()))
                .arg(format!("--tls-key={}", key.display()));
            if options.tls_implicit {
                cmd.arg("--tls-implicit");
            }
            if options.tls_broken {
                cmd.arg("--tls-broken");
            }
        }
        if options.dsn {
            cmd.arg("--dsn");
        }
        if options.tempfail > 0 {
            cmd.arg(format!("--tempfail={}", options.tempfail));
        }
        if let Some(delay) = options.delay {
            cmd.arg(format!("--delay={}", delay.as_secs_f64()));
        }
        if options.record {
            cmd.arg(format!("--record={}", dir.path().join("record").display()));
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start /usr/bin/python3 (Debian python3-aiosmtpd)");
        let addr = SocketAddr::from((ip, port));
        let up = wait_until(Duration::from_secs(15), || {
            accepts_tcp(addr) || matches!(child.try_wait(), Ok(Some(_)))
        });
        if !up || !matches!(child.try_wait(), Ok(None)) {
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            panic!("aiosmtpd on {addr} did not start:\n{log}");
        }
        Sink { child, addr, dir }
    }

    /// The EHLO, STARTTLS, AUTH and MAIL commands received so far, in
    /// order, each recorded before it is answered.
    pub fn commands(&self) -> Vec<SmtpCommand> {
        let text =
            std::fs::read_to_string(self.dir.path().join("commands.log")).unwrap_or_default();
        text.lines()
            .map(|line| {
                let mut parts = line.split(' ');
                let verb = parts.next().unwrap_or_default().to_owned();
                let tls = parts.next() == Some("tls=1");
                let peer = parts
                    .next()
                    .and_then(|p| p.strip_prefix("peer="))
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(0);
                SmtpCommand { verb, tls, peer }
            })
            .collect()
    }

    fn spool(&self) -> PathBuf {
        self.dir.path().join("mail")
    }

    /// With [`SinkOptions::record`]: for each accepted MAIL, in order, the
    /// server's clock (seconds) and how many transactions were open with
    /// it (MAIL accepted, final dot not yet answered).
    pub fn transactions(&self) -> Vec<(f64, usize)> {
        std::fs::read_to_string(self.dir.path().join("record"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (t, n) = l.split_once(' ')?;
                Some((t.parse().ok()?, n.parse().ok()?))
            })
            .collect()
    }

    /// How many messages were received so far (cheap: no file is read).
    pub fn count(&self) -> usize {
        std::fs::read_dir(self.spool())
            .expect("read spool")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.ends_with(".json") && !n.starts_with('.'))
            .count()
    }

    /// Every message received so far, oldest first. A message is stored
    /// before the server answers the final dot, so after the client has its
    /// reply there is nothing to wait for.
    pub fn messages(&self) -> Vec<Received> {
        let mut names: Vec<String> = std::fs::read_dir(self.spool())
            .expect("read spool")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.ends_with(".json") && !n.starts_with('.'))
            .collect();
        names.sort();
        names
            .iter()
            .map(|name| {
                let meta = std::fs::read(self.spool().join(name)).expect("read meta");
                let mut received: Received = serde_json::from_slice(&meta).expect("meta json");
                let eml = name.replace(".json", ".eml");
                received.content = std::fs::read(self.spool().join(eml)).expect("read content");
                received
            })
            .collect()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One accepted connection of a [`RawServer`], line by line.
pub struct RawConn {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl RawConn {
    /// Writes `text` as is (include the CRLFs).
    pub async fn send(&mut self, text: &str) {
        let _ = self.writer.write_all(text.as_bytes()).await;
    }

    /// The next line without its CRLF; `None` at end of input or after 10 s.
    pub async fn line(&mut self) -> Option<String> {
        let mut line = String::new();
        match tokio::time::timeout(Duration::from_secs(10), self.reader.read_line(&mut line)).await
        {
            Ok(Ok(n)) if n > 0 => Some(line.trim_end_matches(['\r', '\n']).to_string()),
            _ => None,
        }
    }

    /// Reads message content up to the lone dot; returns it still stuffed.
    pub async fn data(&mut self) -> Option<Vec<u8>> {
        let mut content = Vec::new();
        loop {
            let mut line = Vec::new();
            let read = tokio::time::timeout(
                Duration::from_secs(10),
                self.reader.read_until(b'\n', &mut line),
            )
            .await;
            match read {
                Ok(Ok(n)) if n > 0 => {}
                _ => return None,
            }
            if line == b".\r\n" {
                return Some(content);
            }
            content.extend_from_slice(&line);
        }
    }

    /// True when nothing more than `gap` arrives: used to prove that the
    /// client waits for a reply instead of sending more.
    pub async fn silent_for(&mut self, gap: Duration) -> bool {
        let mut probe = String::new();
        tokio::time::timeout(gap, self.reader.read_line(&mut probe))
            .await
            .is_err()
    }
}

/// A scripted SMTP server: each accepted connection runs `script` in a task
/// (scripts report what they saw over a channel of the test's). Stops
/// accepting on drop; running scripts end with the test's runtime.
pub struct RawServer {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl RawServer {
    /// Listens on `ip:port` (must run inside a tokio runtime).
    pub async fn start<F, Fut>(ip: Ipv4Addr, port: u16, script: F) -> RawServer
    where
        F: Fn(RawConn) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind((ip, port))
            .await
            .expect("bind scripted server");
        let addr = listener.local_addr().expect("local addr");
        let script = std::sync::Arc::new(script);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let script = script.clone();
                tokio::spawn(async move { script(split(stream)).await });
            }
        });
        RawServer { addr, task }
    }
}

fn split(stream: TcpStream) -> RawConn {
    let (r, w) = stream.into_split();
    RawConn {
        reader: BufReader::new(r),
        writer: w,
    }
}

impl Drop for RawServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
