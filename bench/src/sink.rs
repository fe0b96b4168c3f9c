//! `postino bench sink`: an SMTP server that accepts mail, discards it and
//! counts it (like Postfix's smtp-sink), for relay tests. It can answer 4xx/5xx
//! to a fraction of recipients or messages, delay replies and drop connections.
//!
//! It supports PIPELINING (replies are written when the client's input runs
//! dry), SIZE, 8BITMIME, STARTTLS (with `--tls-cert`/`--tls-key`), and
//! thousands of concurrent sessions (one task each).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BytesMut};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use super::proto::DotScanner;
use super::{fraction, BenchError};

/// Longest command line read, CRLF included (Postfix reads 2048).
pub const MAX_COMMAND_LINE: usize = 2048;
/// Idle time allowed between client commands (Postfix's 300 s).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Options of `postino bench sink`.
#[derive(clap::Args, Debug, Clone)]
pub struct SinkArgs {
    /// Address to listen on (port 0 picks a free port; the address in use is
    /// printed first). Only loopback unless --allow-remote is given.
    #[arg(long, default_value = "127.0.0.1:2525")]
    pub listen: String,
    /// Allow listening outside 127.0.0.0/8 and ::1.
    #[arg(long)]
    pub allow_remote: bool,
    /// Name in the greeting and EHLO reply.
    #[arg(long, default_value = "sink.postino.test")]
    pub hostname: String,
    /// Fraction (0 to 1) of RCPTs answered 451 4.3.0.
    #[arg(long, default_value_t = 0.0)]
    pub tempfail_rcpt: f64,
    /// Fraction (0 to 1) of RCPTs answered 550 5.1.1.
    #[arg(long, default_value_t = 0.0)]
    pub reject_rcpt: f64,
    /// Fraction (0 to 1) of messages answered 451 4.3.0 after the final dot.
    #[arg(long, default_value_t = 0.0)]
    pub tempfail_data: f64,
    /// Fraction (0 to 1) of messages answered 554 5.7.1 after the final dot.
    #[arg(long, default_value_t = 0.0)]
    pub reject_data: f64,
    /// Fraction (0 to 1) of messages after whose final dot the connection is
    /// closed without a reply (the sender must retry them).
    #[arg(long, default_value_t = 0.0)]
    pub drop: f64,
    /// Wait this long before every reply (e.g. 10ms).
    #[arg(long)]
    pub delay: Option<humantime::Duration>,
    /// Wait this long before the reply to the final dot only.
    #[arg(long)]
    pub data_delay: Option<humantime::Duration>,
    /// Largest message accepted (advertised as SIZE), in octets.
    #[arg(long, default_value_t = 10_240_000)]
    pub max_size: u64,
    /// Most concurrent sessions; more wait in the listen backlog.
    #[arg(long, default_value_t = 20_000)]
    pub max_connections: usize,
    /// Exit once this many messages have been accepted, printing the time
    /// from the first to the last one.
    #[arg(long)]
    pub expect: Option<u64>,
    /// Exit after this long (e.g. 10m). Without it the sink runs until
    /// SIGINT/SIGTERM or --expect.
    #[arg(long)]
    pub duration: Option<humantime::Duration>,
    /// Write counters as JSON to this file every second and at exit.
    #[arg(long)]
    pub stats: Option<PathBuf>,
    /// Write the number of accepted messages to this file every second and at
    /// exit (for shell scripts).
    #[arg(long)]
    pub count_file: Option<PathBuf>,
    /// PEM certificate chain: offer STARTTLS with it (needs --tls-key), so
    /// that senders' outbound TLS can be measured.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl SinkArgs {
    fn validate(&self) -> Result<(), BenchError> {
        fraction("tempfail-rcpt", self.tempfail_rcpt)?;
        fraction("reject-rcpt", self.reject_rcpt)?;
        fraction("tempfail-data", self.tempfail_data)?;
        fraction("reject-data", self.reject_data)?;
        fraction("drop", self.drop)?;
        if self.tempfail_rcpt + self.reject_rcpt > 1.0 {
            return Err(BenchError::Usage(
                "--tempfail-rcpt + --reject-rcpt must be at most 1".into(),
            ));
        }
        if self.tempfail_data + self.reject_data + self.drop > 1.0 {
            return Err(BenchError::Usage(
                "--tempfail-data + --reject-data + --drop must be at most 1".into(),
            ));
        }
        if self.max_connections == 0 || self.expect == Some(0) {
            return Err(BenchError::Usage(
                "--max-connections and --expect must be at least 1".into(),
            ));
        }
        if self.hostname.is_empty() || self.hostname.contains([' ', '\r', '\n']) {
            return Err(BenchError::Usage("--hostname must be one word".into()));
        }
        Ok(())
    }
}

/// The counters, shared by every session.
#[derive(Debug, Default)]
struct Counters {
    connections: AtomicU64,
    open_now: AtomicU64,
    peak_connections: AtomicU64,
    messages: AtomicU64,
    recipients: AtomicU64,
    bytes: AtomicU64,
    tempfail_rcpt: AtomicU64,
    reject_rcpt: AtomicU64,
    tempfail_data: AtomicU64,
    reject_data: AtomicU64,
    too_big: AtomicU64,
    dropped: AtomicU64,
    tls_sessions: AtomicU64,
    /// Nanoseconds after the start, plus one (0: no message yet).
    first_ns: AtomicU64,
    last_ns: AtomicU64,
}

/// What `--stats` writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SinkStats {
    pub listen: String,
    /// Still running (the file is rewritten every second) or the final count.
    pub running: bool,
    pub uptime_s: f64,
    pub connections: u64,
    /// Most sessions open at the same time.
    pub peak_connections: u64,
    /// Messages answered 250 after the final dot.
    pub messages: u64,
    /// Recipients of those messages.
    pub recipients: u64,
    /// Octets of DATA received for those messages.
    pub bytes: u64,
    pub tempfail_rcpt: u64,
    pub reject_rcpt: u64,
    pub tempfail_data: u64,
    pub reject_data: u64,
    pub too_big: u64,
    pub dropped: u64,
    /// Sessions that switched to TLS with STARTTLS.
    #[serde(default)]
    pub tls_sessions: u64,
    /// Unix times of the first and last accepted message.
    pub first_message_unix: Option<f64>,
    pub last_message_unix: Option<f64>,
    /// From the first to the last accepted message.
    pub first_to_last_s: f64,
    /// `(messages - 1) / first_to_last_s`: the rate between first and last.
    pub messages_per_s: f64,
}

struct Shared {
    args: SinkArgs,
    listen: SocketAddr,
    start: Instant,
    start_unix: f64,
    counters: Counters,
    expect_reached: Notify,
    tls: Option<TlsAcceptor>,
}

impl Shared {
    fn stamp(&self) {
        let ns = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX - 1) + 1;
        let _ =
            self.counters
                .first_ns
                .compare_exchange(0, ns, Ordering::Relaxed, Ordering::Relaxed);
        self.counters.last_ns.fetch_max(ns, Ordering::Relaxed);
    }

    fn stats(&self, running: bool) -> SinkStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let messages = get(&c.messages);
        let (first, last) = (get(&c.first_ns), get(&c.last_ns));
        let unix = |ns: u64| (ns != 0).then(|| self.start_unix + (ns - 1) as f64 / 1e9);
        let span = if first != 0 {
            (last - first) as f64 / 1e9
        } else {
            0.0
        };
        SinkStats {
            listen: self.listen.to_string(),
            running,
            uptime_s: self.start.elapsed().as_secs_f64(),
            connections: get(&c.connections),
            peak_connections: get(&c.peak_connections),
            messages,
            recipients: get(&c.recipients),
            bytes: get(&c.bytes),
            tempfail_rcpt: get(&c.tempfail_rcpt),
            reject_rcpt: get(&c.reject_rcpt),
            tempfail_data: get(&c.tempfail_data),
            reject_data: get(&c.reject_data),
            too_big: get(&c.too_big),
            dropped: get(&c.dropped),
            tls_sessions: get(&c.tls_sessions),
            first_message_unix: unix(first),
            last_message_unix: unix(last),
            first_to_last_s: span,
            messages_per_s: if span > 0.0 {
                (messages.saturating_sub(1)) as f64 / span
            } else {
                0.0
            },
        }
    }

    /// Writes `--stats` and `--count-file`, each atomically (write, rename),
    /// so a script polling them never reads half a file.
    fn write_files(&self, running: bool) -> Result<(), BenchError> {
        let stats = self.stats(running);
        if let Some(path) = &self.args.stats {
            write_atomic(path, serde_json::to_string_pretty(&stats)? + "\n")?;
        }
        if let Some(path) = &self.args.count_file {
            write_atomic(path, format!("{}\n", stats.messages))?;
        }
        Ok(())
    }
}

fn write_atomic(path: &Path, text: String) -> Result<(), BenchError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|source| BenchError::Write {
            path: path.to_owned(),
            source,
        })
}

/// Listen backlog asked for (the kernel caps it at net.core.somaxconn).
pub const LISTEN_BACKLOG: u32 = 8192;

/// Binds with a deep backlog: when thousands of clients connect at once, a
/// full accept queue makes Linux drop the handshake's last ACK, and those
/// clients then wait for a greeting that never comes (tokio's default
/// backlog is 1024).
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// A sink that is listening and accepting.
struct Running {
    shared: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
}

async fn start(args: SinkArgs) -> Result<Running, BenchError> {
    args.validate()?;
    let addr = super::resolve(&args.listen, args.allow_remote).await?;
    let listener = listen(addr).map_err(|source| BenchError::Bind { addr, source })?;
    let listen = listener
        .local_addr()
        .map_err(|source| BenchError::Bind { addr, source })?;
    let shared = Arc::new(Shared {
        listen,
        start: Instant::now(),
        start_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64(),
        counters: Counters::default(),
        expect_reached: Notify::new(),
        tls: match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => Some(super::tls::acceptor(cert, key)?),
            _ => None,
        },
        args,
    });
    let accept = tokio::spawn(accept_loop(listener, shared.clone()));
    Ok(Running { shared, accept })
}

/// Runs `postino bench sink` until SIGINT/SIGTERM, --expect or --duration.
pub async fn run(args: SinkArgs) -> Result<(), BenchError> {
    let Running { shared, accept } = start(args).await?;
    // Scripts that pass port 0 read the address from this first line.
    println!("bench sink listening on {}", shared.listen);
    shared.write_files(true)?;
    let writer = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                if let Err(e) = shared.write_files(true) {
                    warn!(error = %e, "cannot write sink stats");
                }
            }
        })
    };
    let duration = shared.args.duration.map(Duration::from);
    let why = tokio::select! {
        () = shutdown_signal() => "signal",
        () = shared.expect_reached.notified() => "expected messages received",
        () = async {
            match duration {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        } => "duration elapsed",
    };
    accept.abort();
    writer.abort();
    shared.write_files(false)?;
    let s = shared.stats(false);
    info!(reason = why, "bench sink stopping");
    println!(
        "bench sink: {} messages ({} recipients, {} octets) over {} connections (peak {} open); \
         first to last {:.3} s = {:.0} msg/s; refused rcpt {}+{}, data {}+{}, dropped {} ({why})",
        s.messages,
        s.recipients,
        s.bytes,
        s.connections,
        s.peak_connections,
        s.first_to_last_s,
        s.messages_per_s,
        s.tempfail_rcpt,
        s.reject_rcpt,
        s.tempfail_data,
        s.reject_data,
        s.dropped,
    );
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let slots = Arc::new(Semaphore::new(shared.args.max_connections));
    let mut backoff = Duration::from_millis(1);
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(1);
                let c = &shared.counters;
                c.connections.fetch_add(1, Ordering::Relaxed);
                let now = c.open_now.fetch_add(1, Ordering::Relaxed) + 1;
                c.peak_connections.fetch_max(now, Ordering::Relaxed);
                let shared = shared.clone();
                tokio::spawn(async move {
                    if let Err(e) = Session::new(stream, &shared).run().await {
                        debug!(%peer, error = %e, "sink session ended");
                    }
                    shared.counters.open_now.fetch_sub(1, Ordering::Relaxed);
                    drop(permit);
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: back off, do not end
                // the loop (the condition usually passes as sessions close).
                warn!(error = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// The session's connection: plain until STARTTLS. An enum keeps the plain
/// path free of dynamic dispatch.
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// Only while STARTTLS swaps one for the other.
    Swapping,
}

impl Stream {
    async fn read_buf(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read_buf(buf).await,
            Stream::Tls(s) => s.read_buf(buf).await,
            Stream::Swapping => Err(std::io::ErrorKind::NotConnected.into()),
        }
    }

    async fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.write_all(data).await,
            Stream::Tls(s) => {
                s.write_all(data).await?;
                s.flush().await
            }
            Stream::Swapping => Err(std::io::ErrorKind::NotConnected.into()),
        }
    }
}

/// One SMTP session of the sink.
struct Session<'a> {
    stream: Stream,
    shared: &'a Shared,
    rbuf: BytesMut,
    out: Vec<u8>,
    mail: bool,
    rcpts: u64,
    data: Option<(DotScanner, u64)>,
    close: bool,
    /// STARTTLS was answered 220: the handshake follows once it is sent.
    start_tls: bool,
}

impl<'a> Session<'a> {
    fn new(stream: TcpStream, shared: &'a Shared) -> Self {
        let _ = stream.set_nodelay(true);
        Self {
            stream: Stream::Plain(stream),
            shared,
            rbuf: BytesMut::with_capacity(16 * 1024),
            out: Vec::with_capacity(1024),
            mail: false,
            rcpts: 0,
            data: None,
            close: false,
            start_tls: false,
        }
    }

    async fn reply(&mut self, text: &str) {
        if let Some(d) = self.shared.args.delay {
            // Send what is pending first so the delay applies to this reply only.
            let _ = self.flush().await;
            tokio::time::sleep(d.into()).await;
        }
        self.out.extend_from_slice(text.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.out.is_empty() {
            self.stream.write_all(&self.out).await?;
            self.out.clear();
        }
        Ok(())
    }

    async fn run(mut self) -> std::io::Result<()> {
        let greeting = format!("220 {} ESMTP postino bench sink", self.shared.args.hostname);
        self.reply(&greeting).await;
        loop {
            self.process().await?;
            // Replies go out when the input runs dry: a pipelined batch gets
            // its replies in one write (RFC 2920 §3.1).
            self.flush().await?;
            if self.close {
                return Ok(());
            }
            if self.start_tls {
                self.handshake().await?;
            }
            if self.rbuf.capacity() - self.rbuf.len() < 4096 {
                self.rbuf.reserve(16 * 1024);
            }
            let n = tokio::time::timeout(IDLE_TIMEOUT, self.stream.read_buf(&mut self.rbuf))
                .await
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
            if n == 0 {
                return Ok(());
            }
        }
    }

    /// Runs the server side of the TLS handshake after `220` to STARTTLS.
    async fn handshake(&mut self) -> std::io::Result<()> {
        self.start_tls = false;
        let (Some(acceptor), Stream::Plain(_)) = (&self.shared.tls, &self.stream) else {
            return Err(std::io::ErrorKind::InvalidInput.into());
        };
        let Stream::Plain(tcp) = std::mem::replace(&mut self.stream, Stream::Swapping) else {
            unreachable!("checked above");
        };
        let tls = tokio::time::timeout(IDLE_TIMEOUT, acceptor.accept(tcp))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        self.stream = Stream::Tls(Box::new(tls));
        self.shared
            .counters
            .tls_sessions
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Handles everything complete in the read buffer.
    async fn process(&mut self) -> std::io::Result<()> {
        while !self.close {
            if let Some((scanner, bytes)) = &mut self.data {
                match scanner.feed(&self.rbuf) {
                    Some(n) => {
                        *bytes += n as u64;
                        let total = *bytes;
                        self.rbuf.advance(n);
                        self.data = None;
                        self.end_of_data(total).await?;
                        continue;
                    }
                    None => {
                        // Content is discarded as it arrives: nothing buffered.
                        *bytes += self.rbuf.len() as u64;
                        self.rbuf.clear();
                        return Ok(());
                    }
                }
            }
            let Some(i) = memchr::memchr(b'\n', &self.rbuf) else {
                if self.rbuf.len() >= MAX_COMMAND_LINE {
                    self.reply("500 5.5.0 Error: line too long").await;
                    self.close = true;
                }
                return Ok(());
            };
            let line = self.rbuf.split_to(i + 1);
            let line = String::from_utf8_lossy(&line);
            self.command(line.trim_end_matches(['\r', '\n'])).await;
            if self.start_tls {
                // Nothing the client sent before the handshake may count
                // after it (RFC 3207 §4.2; CVE-2011-0411).
                self.rbuf.clear();
                return Ok(());
            }
        }
        Ok(())
    }

    async fn command(&mut self, line: &str) {
        let (verb, rest) = line.split_once(' ').unwrap_or((line, ""));
        let args = &self.shared.args;
        match verb.to_ascii_uppercase().as_str() {
            "EHLO" => {
                self.mail = false;
                self.rcpts = 0;
                let starttls =
                    if self.shared.tls.is_some() && matches!(self.stream, Stream::Plain(_)) {
                        "250-STARTTLS\r\n"
                    } else {
                        ""
                    };
                let text = format!(
                    "250-{}\r\n250-PIPELINING\r\n250-SIZE {}\r\n250-8BITMIME\r\n\
                     {starttls}250-ENHANCEDSTATUSCODES\r\n250 SMTPUTF8",
                    args.hostname, args.max_size
                );
                self.reply(&text).await;
            }
            "HELO" => {
                self.mail = false;
                self.rcpts = 0;
                let text = format!("250 {}", args.hostname);
                self.reply(&text).await;
            }
            "MAIL" if self.mail => self.reply("503 5.5.1 Error: nested MAIL command").await,
            "MAIL" => {
                let size = rest
                    .split_ascii_whitespace()
                    .filter_map(|p| {
                        p.get(..5)
                            .filter(|k| k.eq_ignore_ascii_case("SIZE="))
                            .map(|_| &p[5..])
                    })
                    .find_map(|v| v.parse::<u64>().ok());
                if size.is_some_and(|s| s > args.max_size) {
                    self.shared.counters.too_big.fetch_add(1, Ordering::Relaxed);
                    self.reply("552 5.3.4 Message size exceeds fixed limit")
                        .await;
                } else {
                    self.mail = true;
                    self.reply("250 2.1.0 Ok").await;
                }
            }
            "RCPT" if !self.mail => self.reply("503 5.5.1 Error: need MAIL command").await,
            "RCPT" => {
                let r: f64 = rand::random();
                let c = &self.shared.counters;
                if r < args.tempfail_rcpt {
                    c.tempfail_rcpt.fetch_add(1, Ordering::Relaxed);
                    self.reply("451 4.3.0 Error: bench sink tempfail").await;
                } else if r < args.tempfail_rcpt + args.reject_rcpt {
                    c.reject_rcpt.fetch_add(1, Ordering::Relaxed);
                    self.reply("550 5.1.1 Error: bench sink reject").await;
                } else {
                    self.rcpts += 1;
                    self.reply("250 2.1.5 Ok").await;
                }
            }
            "DATA" if !self.mail => self.reply("503 5.5.1 Error: need RCPT command").await,
            "DATA" if self.rcpts == 0 => self.reply("554 5.5.1 Error: no valid recipients").await,
            "DATA" => {
                self.data = Some((DotScanner::default(), 0));
                self.reply("354 End data with <CR><LF>.<CR><LF>").await;
            }
            "RSET" => {
                self.mail = false;
                self.rcpts = 0;
                self.reply("250 2.0.0 Ok").await;
            }
            "STARTTLS" if self.shared.tls.is_none() => {
                self.reply("502 5.5.1 Error: command not implemented").await
            }
            "STARTTLS" if !matches!(self.stream, Stream::Plain(_)) => {
                self.reply("554 5.5.1 Error: TLS already active").await
            }
            "STARTTLS" => {
                // A new EHLO must follow; the transaction starts over.
                self.mail = false;
                self.rcpts = 0;
                self.reply("220 2.0.0 Ready to start TLS").await;
                self.start_tls = true;
            }
            "NOOP" => self.reply("250 2.0.0 Ok").await,
            "VRFY" => {
                self.reply("252 2.0.0 Send some mail, I'll try my best")
                    .await
            }
            "QUIT" => {
                self.reply("221 2.0.0 Bye").await;
                self.close = true;
            }
            "" => self.reply("500 5.5.2 Error: bad syntax").await,
            _ => self.reply("502 5.5.2 Error: command not recognized").await,
        }
    }

    async fn end_of_data(&mut self, bytes: u64) -> std::io::Result<()> {
        let args = &self.shared.args;
        let c = &self.shared.counters;
        let rcpts = std::mem::take(&mut self.rcpts);
        self.mail = false;
        if let Some(d) = args.data_delay {
            self.flush().await?;
            tokio::time::sleep(d.into()).await;
        }
        let r: f64 = rand::random();
        // The final `.CRLF` is protocol, not content (the CRLF before it is).
        let content = bytes.saturating_sub(3);
        if content > args.max_size {
            c.too_big.fetch_add(1, Ordering::Relaxed);
            self.reply("552 5.3.4 Message size exceeds fixed limit")
                .await;
        } else if r < args.drop {
            // Earlier replies still pending go out; this message gets none.
            c.dropped.fetch_add(1, Ordering::Relaxed);
            self.close = true;
        } else if r < args.drop + args.tempfail_data {
            c.tempfail_data.fetch_add(1, Ordering::Relaxed);
            self.reply("451 4.3.0 Error: bench sink tempfail").await;
        } else if r < args.drop + args.tempfail_data + args.reject_data {
            c.reject_data.fetch_add(1, Ordering::Relaxed);
            self.reply("554 5.7.1 Error: bench sink reject").await;
        } else {
            c.recipients.fetch_add(rcpts, Ordering::Relaxed);
            c.bytes.fetch_add(content, Ordering::Relaxed);
            self.shared.stamp();
            let n = c.messages.fetch_add(1, Ordering::Relaxed) + 1;
            self.reply("250 2.0.0 Ok: queued").await;
            if self.shared.args.expect.is_some_and(|e| n >= e) {
                // Flush first so the last sender sees its 250 before we exit.
                self.flush().await?;
                self.shared.expect_reached.notify_one();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::super::client::Client;
    use super::super::proto::ReplyExt;
    use super::super::smtp::{self, OnOff, SmtpArgs};
    use super::*;

    #[derive(clap::Parser)]
    struct SinkCli {
        #[command(flatten)]
        args: SinkArgs,
    }

    #[derive(clap::Parser)]
    struct SmtpCli {
        #[command(flatten)]
        args: SmtpArgs,
    }

    async fn sink(extra: &[&str]) -> Running {
        let mut argv = vec!["sink", "--listen", "127.0.0.1:0"];
        argv.extend_from_slice(extra);
        start(SinkCli::parse_from(argv).args).await.unwrap()
    }

    fn smtp_args(addr: SocketAddr, extra: &[&str]) -> SmtpArgs {
        let server = addr.to_string();
        let mut argv = vec!["smtp", "--server", server.as_str(), "--timeout", "10s"];
        argv.extend_from_slice(extra);
        SmtpCli::parse_from(argv).args
    }

    async fn connect(addr: SocketAddr) -> Client {
        let mut c = Client::connect(addr, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(c.smtp_reply().await.unwrap().code, 220);
        c
    }

    /// Sends `input` in pieces of `chunk` octets and collects the reply codes
    /// until the server closes the connection.
    async fn converse(addr: SocketAddr, input: &[u8], chunk: usize) -> Vec<u16> {
        let mut c = connect(addr).await;
        for piece in input.chunks(chunk) {
            c.send(piece).await.unwrap();
        }
        let mut codes = Vec::new();
        while let Ok(r) = c.smtp_reply().await {
            codes.push(r.code);
        }
        codes
    }

    #[tokio::test]
    async fn pipelined_transaction_in_fragments() {
        let s = sink(&[]).await;
        let input: &[u8] = b"EHLO a.test\r\nMAIL FROM:<a@b.test> SIZE=20\r\nRCPT TO:<c@d.test>\r\n\
            RCPT TO:<e@d.test>\r\nDATA\r\nhello\r\n..dot\r\n\r\n.\r\nNOOP\r\nQUIT\r\n";
        for chunk in [input.len(), 7, 1] {
            let codes = converse(s.shared.listen, input, chunk).await;
            assert_eq!(
                codes,
                [250, 250, 250, 250, 354, 250, 250, 221],
                "chunk {chunk}"
            );
        }
        let st = s.shared.stats(true);
        assert_eq!((st.messages, st.recipients), (3, 6));
        // "hello\r\n..dot\r\n\r\n" as sent on the wire.
        assert_eq!(st.bytes, 3 * 16);
        assert_eq!(st.connections, 3);
        assert!(st.first_message_unix.is_some());
    }

    #[tokio::test]
    async fn sequence_and_size_errors() {
        let s = sink(&["--max-size", "100"]).await;
        let input = b"RCPT TO:<a@b>\r\nDATA\r\nMAIL FROM:<a@b> SIZE=101\r\nMAIL FROM:<a@b>\r\n\
            MAIL FROM:<a@b>\r\nDATA\r\nBOGUS\r\n\r\nRSET\r\nQUIT\r\n";
        let codes = converse(s.shared.listen, input, 5).await;
        assert_eq!(codes, [503, 503, 552, 250, 503, 554, 502, 500, 250, 221]);
        // Content over the limit is drained to the dot, then refused.
        let big = format!(
            "MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n{}\r\n.\r\nQUIT\r\n",
            "x".repeat(200)
        );
        let codes = converse(s.shared.listen, big.as_bytes(), 64).await;
        assert_eq!(codes, [250, 250, 354, 552, 221]);
        assert_eq!(s.shared.stats(true).messages, 0);
        assert_eq!(s.shared.stats(true).too_big, 2);
    }

    #[tokio::test]
    async fn long_lines_end_the_session() {
        let s = sink(&[]).await;
        let codes = converse(s.shared.listen, &[b'A'; MAX_COMMAND_LINE + 10], 512).await;
        assert_eq!(codes, [500]);
    }

    #[tokio::test]
    async fn refusals_and_drops() {
        let s = sink(&["--reject-rcpt", "1"]).await;
        let codes = converse(
            s.shared.listen,
            b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nQUIT\r\n",
            100,
        )
        .await;
        assert_eq!(codes, [250, 550, 554, 221]);

        let s = sink(&["--tempfail-data", "1"]).await;
        let codes = converse(
            s.shared.listen,
            b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nx\r\n.\r\nQUIT\r\n",
            100,
        )
        .await;
        assert_eq!(codes, [250, 250, 354, 451, 221]);

        // A dropped message gets no reply at all: the connection just closes.
        let s = sink(&["--drop", "1"]).await;
        let codes = converse(
            s.shared.listen,
            b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nx\r\n.\r\nQUIT\r\n",
            100,
        )
        .await;
        assert_eq!(codes, [250, 250, 354]);
        assert_eq!(s.shared.stats(true).dropped, 1);
    }

    #[test]
    fn rejects_bad_fractions() {
        for bad in [
            &["--drop", "2"][..],
            &["--tempfail-rcpt", "0.6", "--reject-rcpt", "0.6"],
            &["--expect", "0"],
        ] {
            let mut argv = vec!["sink"];
            argv.extend_from_slice(bad);
            assert!(
                SinkCli::parse_from(argv).args.validate().is_err(),
                "{bad:?}"
            );
        }
    }

    /// The load generator against the sink: every message sent is counted
    /// once, with and without pipelining and connection reuse.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bench_smtp_against_the_sink() {
        let cases: &[&[&str]] = &[
            &["--pipelining", "on", "--messages-per-session", "0"],
            &["--pipelining", "off", "--messages-per-session", "1"],
            &[
                "--messages-per-session",
                "7",
                "--size",
                "5000",
                "--rate",
                "2000",
            ],
        ];
        for extra in cases {
            let s = sink(&["--expect", "120"]).await;
            let dir = tempfile::tempdir().unwrap();
            let json = dir.path().join("r.json");
            let json_arg = json.to_str().unwrap();
            let mut argv = vec![
                "--messages",
                "120",
                "--sessions",
                "8",
                "--recipients",
                "3",
                "--rcpt-count",
                "5",
                "--json",
                json_arg,
            ];
            argv.extend_from_slice(extra);
            smtp::run(smtp_args(s.shared.listen, &argv)).await.unwrap();
            let st = s.shared.stats(true);
            assert_eq!((st.messages, st.recipients), (120, 360), "{extra:?}");
            let report: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
            assert_eq!(report["ok"], 120, "{extra:?}");
            assert_eq!(report["failed"], 0, "{extra:?}");
            if let Some(per_session) = extra.iter().position(|a| *a == "--messages-per-session") {
                // Reuse shows in the connection count: 120 messages over at
                // least 120/n connections.
                let n: u64 = extra[per_session + 1].parse().unwrap();
                if n == 1 {
                    assert_eq!(st.connections, 120);
                } else if n == 0 {
                    assert_eq!(st.connections, 8);
                }
            }
            s.accept.abort();
        }
        let a = smtp_args("127.0.0.1:1".parse().unwrap(), &[]);
        assert_eq!(a.pipelining, OnOff::On);
    }

    /// With --tls-cert/--tls-key the sink offers STARTTLS once per session,
    /// and the load generator's `--tls` sessions all switch to it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn starttls_sessions_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["sink.postino.test".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (cert_path, key_path) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        let s = sink(&[
            "--tls-cert",
            cert_path.to_str().unwrap(),
            "--tls-key",
            key_path.to_str().unwrap(),
        ])
        .await;
        // Twice STARTTLS: the second is refused inside TLS, and a command
        // pipelined behind STARTTLS is discarded, not answered.
        let mut c = connect(s.shared.listen).await;
        c.send(b"EHLO a.test\r\n").await.unwrap();
        let ehlo = c.smtp_reply().await.unwrap();
        assert!(ehlo.has_extension("STARTTLS"), "{ehlo:?}");
        c.send(b"STARTTLS\r\nNOOP\r\n").await.unwrap();
        assert_eq!(c.smtp_reply().await.unwrap().code, 220);
        c.start_tls(
            &crate::tls::insecure_connector().unwrap(),
            crate::tls::server_name("localhost"),
        )
        .await
        .unwrap();
        c.send(b"EHLO a.test\r\nSTARTTLS\r\nQUIT\r\n")
            .await
            .unwrap();
        let ehlo = c.smtp_reply().await.unwrap();
        assert!(!ehlo.has_extension("STARTTLS"), "{ehlo:?}");
        assert_eq!(c.smtp_reply().await.unwrap().code, 554);
        assert_eq!(c.smtp_reply().await.unwrap().code, 221);

        let args = smtp_args(
            s.shared.listen,
            &[
                "--tls",
                "--sessions",
                "4",
                "--messages",
                "40",
                "--messages-per-session",
                "0",
            ],
        );
        smtp::run(args).await.unwrap();
        let st = s.shared.stats(true);
        assert_eq!((st.messages, st.tls_sessions), (40, 5));
    }

    /// --hold opens every session before any sends: the sink sees them all
    /// open at once, and each completes one transaction.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hold_opens_all_sessions_at_once() {
        let s = sink(&[]).await;
        let args = smtp_args(
            s.shared.listen,
            &["--hold", "--sessions", "200", "--messages", "200"],
        );
        smtp::run(args).await.unwrap();
        let st = s.shared.stats(true);
        assert_eq!((st.messages, st.connections), (200, 200));
        assert_eq!(st.peak_connections, 200);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bench_smtp_reports_refusals() {
        let s = sink(&["--tempfail-data", "1"]).await;
        let err = smtp::run(smtp_args(
            s.shared.listen,
            &["--messages", "10", "--sessions", "2"],
        ))
        .await
        .unwrap_err();
        assert!(
            matches!(err, BenchError::NothingSucceeded { failed: 10 }),
            "{err}"
        );

        // Half the recipients refused: messages still go through, errors counted.
        let s = sink(&["--reject-rcpt", "0.5"]).await;
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("r.json");
        smtp::run(smtp_args(
            s.shared.listen,
            &[
                "--messages",
                "50",
                "--recipients",
                "10",
                "--json",
                json.to_str().unwrap(),
            ],
        ))
        .await
        .unwrap();
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        let refused = report["errors"]["RCPT 550"].as_u64().unwrap();
        assert_eq!(refused, s.shared.stats(true).reject_rcpt);
        assert!(refused > 0);
    }
}
