//! `postino bench smtp`: concurrent SMTP sessions sending generated mail, with
//! per-message latency from the final dot to the server's reply.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use super::client::{Client, ClientError};
use super::proto::{Pattern, ReplyExt, SmtpReply};
use super::report::SharedRecorder;
use super::{plot, BenchError, Progress};

/// Longest message body accepted by `--size` (100 MiB).
pub const MAX_SIZE: usize = 100 << 20;

/// On or off (for `--pipelining`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnOff {
    On,
    Off,
}

/// Options of `postino bench smtp`.
#[derive(clap::Args, Debug, Clone)]
pub struct SmtpArgs {
    /// SMTP server to load, as host:port. Only loopback addresses are allowed
    /// unless --allow-remote is given.
    #[arg(long, default_value = "127.0.0.1:25")]
    pub server: String,
    /// Allow a --server outside 127.0.0.0/8 and ::1. Only for servers you own.
    #[arg(long)]
    pub allow_remote: bool,
    /// Concurrent SMTP sessions.
    #[arg(long, default_value_t = 20)]
    pub sessions: usize,
    /// Messages to send in total (the run stops after this many).
    #[arg(long, default_value_t = 1000)]
    pub messages: u64,
    /// Body size of each message in octets, headers not included (as
    /// smtp-source -l). The body is printable ASCII in lines of 78 octets.
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// Recipients per message.
    #[arg(long, default_value_t = 1)]
    pub recipients: usize,
    /// Recipient addresses: the placeholder in braces (see the default)
    /// becomes a number cycling over
    /// 1..=--rcpt-count across all recipients of the run.
    #[arg(long, default_value = "user{n}@example.test")]
    pub rcpt_pattern: String,
    /// How many distinct numbers {n} in --rcpt-pattern cycles over.
    #[arg(long, default_value_t = 1)]
    pub rcpt_count: u64,
    /// Envelope sender (MAIL FROM) and From: header.
    #[arg(long, default_value = "bench@postino.test")]
    pub from: String,
    /// Name sent in EHLO.
    #[arg(long, default_value = "bench.postino.test")]
    pub helo: String,
    /// Send MAIL, RCPTs and DATA in one batch when the server offers
    /// PIPELINING (RFC 2920).
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    pub pipelining: OnOff,
    /// Use STARTTLS. BENCHMARK ONLY: the server certificate is NOT verified
    /// (any certificate is accepted).
    #[arg(long)]
    pub tls: bool,
    /// Messages sent over one connection before QUIT and a new connection
    /// (0: keep each session's connection for the whole run). The default 1
    /// matches smtp-source without -d.
    #[arg(long, default_value_t = 1)]
    pub messages_per_session: u64,
    /// Open-loop target rate in messages per second: message i is started at
    /// i/rate seconds, whatever the replies (for latency at a fixed load).
    /// Without it each session sends as fast as the server answers.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Open every session (greeting, EHLO) and hold it until all --sessions
    /// are open at once, then let each send its first message (for "N
    /// sessions open at once in one process" tests; needs --messages at
    /// least --sessions to give every session a message).
    #[arg(long)]
    pub hold: bool,
    /// Stop starting new messages after this long (e.g. 30s); --messages
    /// still bounds the run.
    #[arg(long)]
    pub duration: Option<humantime::Duration>,
    /// Limit for each connect, read and write.
    #[arg(long, default_value = "60s")]
    pub timeout: humantime::Duration,
    /// Write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Draw throughput and latency over time to this SVG file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

impl SmtpArgs {
    fn validate(&self) -> Result<(), BenchError> {
        let bad = |m: &str| Err(BenchError::Usage(m.to_owned()));
        if self.sessions == 0 || self.sessions > 100_000 {
            return bad("--sessions must be between 1 and 100000");
        }
        if self.messages == 0 {
            return bad("--messages must be at least 1");
        }
        if self.recipients == 0 || self.recipients > 10_000 {
            return bad("--recipients must be between 1 and 10000");
        }
        if self.size > MAX_SIZE {
            return bad("--size must be at most 100 MiB");
        }
        if let Some(rate) = self.rate {
            if !(rate > 0.0 && rate.is_finite()) {
                return bad("--rate must be a positive number");
            }
        }
        if self.from.contains(['<', '>', ' ', '\r', '\n']) {
            return bad("--from must be a bare address (or empty for <>)");
        }
        if self.helo.is_empty() || self.helo.contains([' ', '\r', '\n']) {
            return bad("--helo must be one word");
        }
        Ok(())
    }

    fn params(&self) -> serde_json::Value {
        serde_json::json!({
            "sessions": self.sessions,
            "messages": self.messages,
            "size": self.size,
            "recipients": self.recipients,
            "rcpt_pattern": self.rcpt_pattern,
            "rcpt_count": self.rcpt_count,
            "pipelining": self.pipelining == OnOff::On,
            "tls": self.tls,
            "messages_per_session": self.messages_per_session,
            "hold": self.hold,
            "rate": self.rate,
            "duration_s": self.duration.map(|d| Duration::from(d).as_secs_f64()),
        })
    }
}

/// What every session shares.
struct Shared {
    addr: SocketAddr,
    host: String,
    args: SmtpArgs,
    rcpt: Pattern,
    message: MessageTemplate,
    tls: Option<TlsConnector>,
    next: AtomicU64,
    done: Arc<AtomicU64>,
    /// With --hold: where sessions wait until all are open, and how many made it.
    hold: Option<tokio::sync::Barrier>,
    held_open: AtomicU64,
    start: Instant,
    deadline: Option<Instant>,
    recorder: SharedRecorder,
}

impl Shared {
    /// Takes the next message number, or `None` when the run is over.
    fn claim(&self) -> Option<u64> {
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        (i < self.args.messages).then_some(i)
    }

    fn failed(&self, kind: &str) {
        self.recorder.lock().failed(Instant::now(), kind);
        self.done.fetch_add(1, Ordering::Relaxed);
    }
}

/// Runs `postino bench smtp`.
pub async fn run(args: SmtpArgs) -> Result<(), BenchError> {
    args.validate()?;
    let addr = super::resolve(&args.server, args.allow_remote).await?;
    let rcpt = Pattern::new(&args.rcpt_pattern, args.rcpt_count)
        .map_err(|e| BenchError::Usage(e.to_string()))?;
    let tls = if args.tls {
        Some(super::tls::insecure_connector()?)
    } else {
        None
    };
    let host = args
        .server
        .rsplit_once(':')
        .map_or(args.server.as_str(), |(h, _)| h)
        .to_owned();
    let start = Instant::now();
    let done = Arc::new(AtomicU64::new(0));
    let shared = Arc::new(Shared {
        addr,
        host,
        rcpt,
        message: MessageTemplate::new(&args.from, args.size),
        tls,
        next: AtomicU64::new(0),
        done: done.clone(),
        hold: args
            .hold
            .then(|| tokio::sync::Barrier::new(args.sessions.min(args.messages as usize))),
        held_open: AtomicU64::new(0),
        start,
        deadline: args.duration.map(|d| start + Duration::from(d)),
        recorder: SharedRecorder::new(start),
        args,
    });
    let progress = Progress::start(shared.args.messages, "msg", done.clone());
    let workers = (shared.args.sessions as u64).min(shared.args.messages);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..workers {
        set.spawn(session(shared.clone()));
    }
    while set.join_next().await.is_some() {}
    let elapsed = start.elapsed();
    progress.finish(done.load(Ordering::Relaxed));

    let args = &shared.args;
    let report = shared
        .recorder
        .lock()
        .report("smtp", &args.server, elapsed, args.params());
    print!("{}", report.summary("messages", "final dot to reply"));
    if args.hold {
        println!(
            "held {} of {workers} sessions open at once before sending",
            shared.held_open.load(Ordering::Relaxed)
        );
    }
    if let Some(path) = &args.json {
        report.write_json(path)?;
    }
    if let Some(path) = &args.plot {
        plot::draw(&report, "msg", path)?;
    }
    if report.ok == 0 {
        return Err(BenchError::NothingSucceeded {
            failed: report.failed,
        });
    }
    Ok(())
}

/// One open connection and what its EHLO said.
struct Conn {
    client: Client,
    pipelining: bool,
    size: bool,
    sent: u64,
}

/// One session: claims messages until the run is over, (re)connecting as
/// needed. Every claimed message ends as exactly one success or failure.
async fn session(shared: Arc<Shared>) {
    let args = &shared.args;
    let mut conn: Option<Conn> = None;
    let mut buf = Vec::with_capacity(args.size + 1024);
    // With --hold the first message is claimed before the barrier, so every
    // held connection has one to send (a fast session cannot take them all).
    let mut first = None;
    if let Some(barrier) = &shared.hold {
        first = shared.claim();
        if first.is_some() {
            match open(&shared).await {
                Ok(c) => {
                    shared.held_open.fetch_add(1, Ordering::Relaxed);
                    conn = Some(c);
                }
                Err(kind) => {
                    shared.failed(&kind);
                    first = None;
                }
            }
        }
        // Every session reaches this exactly once (opens are bounded by
        // --timeout), so the barrier cannot wait forever.
        barrier.wait().await;
    }
    while let Some(i) = first.take().or_else(|| shared.claim()) {
        if let Some(rate) = args.rate {
            let due = shared.start + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        let mut c = match conn.take() {
            Some(c) => c,
            None => match open(&shared).await {
                Ok(c) => c,
                Err(kind) => {
                    shared.failed(&kind);
                    continue;
                }
            },
        };
        match transaction(&shared, &mut c, i, &mut buf).await {
            Ok(Step::Accepted { at, latency, bytes }) => {
                shared.recorder.lock().ok(at, latency, bytes);
                shared.done.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Step::Refused { kind, close }) => {
                shared.failed(&kind);
                if close {
                    continue;
                }
                // RSET so the next MAIL starts clean (RFC 5321 §4.1.1.5).
                let reset = async {
                    c.client.send(b"RSET\r\n").await?;
                    c.client.smtp_reply().await
                };
                match reset.await {
                    Ok(r) if r.is_ok() => {}
                    _ => continue,
                }
            }
            Err(e) => {
                shared.failed(e.kind());
                continue;
            }
        }
        c.sent += 1;
        if args.messages_per_session != 0 && c.sent >= args.messages_per_session {
            c.client.close(b"QUIT\r\n").await;
        } else {
            conn = Some(c);
        }
    }
    if let Some(c) = conn {
        c.client.close(b"QUIT\r\n").await;
    }
}

/// Connects, reads the greeting, says EHLO (and STARTTLS). The error is the
/// report's error kind.
async fn open(shared: &Shared) -> Result<Conn, String> {
    let args = &shared.args;
    let timeout = Duration::from(args.timeout);
    let step = |what: &str, r: Result<SmtpReply, ClientError>, want: u16| match r {
        Ok(r) if r.code == want => Ok(r),
        Ok(r) => Err(format!("{what} {}", r.code)),
        Err(e) => Err(e.kind().to_owned()),
    };
    let mut client = Client::connect(shared.addr, timeout)
        .await
        .map_err(|e| e.kind().to_owned())?;
    step("greeting", client.smtp_reply().await, 220)?;
    let ehlo = format!("EHLO {}\r\n", args.helo);
    let mut caps = step("EHLO", command(&mut client, ehlo.as_bytes()).await, 250)?;
    if let Some(connector) = &shared.tls {
        if !caps.has_extension("STARTTLS") {
            return Err("no STARTTLS offered".into());
        }
        step("STARTTLS", command(&mut client, b"STARTTLS\r\n").await, 220)?;
        let name: ServerName<'static> = super::tls::server_name(&shared.host);
        client
            .start_tls(connector, name)
            .await
            .map_err(|e| e.kind().to_owned())?;
        // RFC 3207 §4.2: the client must forget what it knew and EHLO again.
        caps = step("EHLO", command(&mut client, ehlo.as_bytes()).await, 250)?;
    }
    Ok(Conn {
        pipelining: args.pipelining == OnOff::On && caps.has_extension("PIPELINING"),
        size: caps.has_extension("SIZE"),
        client,
        sent: 0,
    })
}

async fn command(client: &mut Client, line: &[u8]) -> Result<SmtpReply, ClientError> {
    client.send(line).await?;
    client.smtp_reply().await
}

/// How one message's transaction ended (IO errors aside).
enum Step {
    Accepted {
        at: Instant,
        latency: Duration,
        bytes: u64,
    },
    /// Refused at some stage: `kind` such as `MAIL 452`; `close` when the
    /// server ends the session (421) or the connection is no longer usable.
    Refused { kind: String, close: bool },
}

fn refused(stage: &str, r: &SmtpReply) -> Step {
    Step::Refused {
        kind: format!("{stage} {}", r.code),
        close: r.code == 421,
    }
}

/// Sends message `i`: MAIL, RCPTs, DATA (batched with PIPELINING), content.
async fn transaction(
    shared: &Shared,
    c: &mut Conn,
    i: u64,
    buf: &mut Vec<u8>,
) -> Result<Step, ClientError> {
    let args = &shared.args;
    let recipients: Vec<String> = (0..args.recipients as u64)
        .map(|k| shared.rcpt.expand(i * args.recipients as u64 + k))
        .collect();
    buf.clear();
    shared.message.write(buf, i, &recipients[0]);
    let size = buf.len();
    buf.extend_from_slice(b".\r\n");

    let mail = if c.size {
        format!("MAIL FROM:<{}> SIZE={size}\r\n", args.from)
    } else {
        format!("MAIL FROM:<{}>\r\n", args.from)
    };
    let rcpts: Vec<String> = recipients
        .iter()
        .map(|r| format!("RCPT TO:<{r}>\r\n"))
        .collect();

    let data_reply = if c.pipelining {
        // RFC 2920: MAIL, RCPTs and DATA in one group, then their replies in order.
        let mut batch = mail.into_bytes();
        for r in &rcpts {
            batch.extend_from_slice(r.as_bytes());
        }
        batch.extend_from_slice(b"DATA\r\n");
        c.client.send(&batch).await?;
        let mail_reply = c.client.smtp_reply().await?;
        let mut accepted = 0;
        for _ in &rcpts {
            let r = c.client.smtp_reply().await?;
            if r.is_ok() {
                accepted += 1;
            } else {
                shared.recorder.lock().error(&format!("RCPT {}", r.code));
            }
        }
        let data = c.client.smtp_reply().await?;
        if data.code != 354 {
            if !mail_reply.is_ok() {
                return Ok(refused("MAIL", &mail_reply));
            }
            if accepted == 0 {
                return Ok(Step::Refused {
                    kind: "no recipient accepted".into(),
                    close: data.code == 421,
                });
            }
            return Ok(refused("DATA", &data));
        }
        // A 354 obliges us to send content even if MAIL failed: the server
        // decides; its reply to the dot says what happened.
        data
    } else {
        let r = command(&mut c.client, mail.as_bytes()).await?;
        if !r.is_ok() {
            return Ok(refused("MAIL", &r));
        }
        let mut accepted = 0;
        for line in &rcpts {
            let r = command(&mut c.client, line.as_bytes()).await?;
            if r.is_ok() {
                accepted += 1;
            } else if r.code == 421 {
                return Ok(refused("RCPT", &r));
            } else {
                shared.recorder.lock().error(&format!("RCPT {}", r.code));
            }
        }
        if accepted == 0 {
            return Ok(Step::Refused {
                kind: "no recipient accepted".into(),
                close: false,
            });
        }
        let r = command(&mut c.client, b"DATA\r\n").await?;
        if r.code != 354 {
            return Ok(refused("DATA", &r));
        }
        r
    };
    debug_assert_eq!(data_reply.code, 354);
    c.client.send(buf).await?;
    let sent = Instant::now();
    let r = c.client.smtp_reply().await?;
    let at = Instant::now();
    if r.is_ok() {
        Ok(Step::Accepted {
            at,
            latency: at - sent,
            bytes: size as u64,
        })
    } else {
        Ok(refused("DOT", &r))
    }
}

/// The generated message: headers made per message (unique Message-ID), a
/// body made once.
struct MessageTemplate {
    from: String,
    date: String,
    run_id: String,
    body: Vec<u8>,
}

impl MessageTemplate {
    fn new(from: &str, size: usize) -> Self {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Self {
            from: if from.is_empty() {
                "MAILER-DAEMON@bench.postino.test".into()
            } else {
                from.to_owned()
            },
            date: rfc5322_date(now.as_secs()),
            run_id: format!("{:x}.{:x}", now.as_secs(), std::process::id()),
            body: body(size),
        }
    }

    /// Appends message `i` (headers and body, without the final dot) to `out`.
    fn write(&self, out: &mut Vec<u8>, i: u64, to: &str) {
        use std::io::Write;
        let _ = write!(
            out,
            "From: <{from}>\r\nTo: <{to}>\r\nSubject: postino bench message {i}\r\n\
             Date: {date}\r\nMessage-ID: <{run}.{i}@bench.postino.test>\r\n\
             MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n",
            from = self.from,
            date = self.date,
            run = self.run_id,
        );
        out.extend_from_slice(&self.body);
    }
}

/// `size` octets of printable text in CRLF lines of at most 78 octets (76 +
/// CRLF). No line starts with a dot, so no dot-stuffing is needed.
fn body(size: usize) -> Vec<u8> {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ";
    let mut out = Vec::with_capacity(size);
    let mut k = 0usize;
    while out.len() < size {
        let room = size - out.len();
        if room <= 2 {
            // Too short for text and a line end: pad the last line instead.
            out.extend(std::iter::repeat_n(b'x', room));
            break;
        }
        let text = room.min(78) - 2;
        for _ in 0..text {
            out.push(ALPHABET[k % ALPHABET.len()]);
            k += 1;
        }
        out.extend_from_slice(b"\r\n");
    }
    if !out.is_empty() && !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// `Thu, 01 Jan 1970 00:00:00 +0000` for a Unix time (RFC 5322 §3.3).
fn rfc5322_date(unix: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = unix / 86_400;
    let secs = unix % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} +0000",
        DAYS[(days % 7) as usize],
        day,
        MONTHS[(month - 1) as usize],
        year,
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_have_the_size_and_no_leading_dots() {
        for size in [0, 1, 2, 3, 77, 78, 79, 80, 1024, 2048, 10_000] {
            let b = body(size);
            // A body that does not end in CRLF gets one, so at most 2 over.
            assert!(
                b.len() >= size && b.len() <= size + 2,
                "size {size}: {}",
                b.len()
            );
            if size > 0 {
                assert!(b.ends_with(b"\r\n"), "size {size}");
            }
            for line in b.split(|&c| c == b'\n') {
                assert!(line.len() <= 78, "size {size}");
                assert!(!line.starts_with(b"."));
                assert!(line
                    .iter()
                    .all(|&c| c == b'\r' || (0x20..0x7f).contains(&c)));
            }
        }
    }

    #[test]
    fn messages_have_unique_ids() {
        let t = MessageTemplate::new("a@b.test", 100);
        let mut one = Vec::new();
        let mut two = Vec::new();
        t.write(&mut one, 1, "u1@example.test");
        t.write(&mut two, 2, "u1@example.test");
        let id = |m: &[u8]| {
            String::from_utf8_lossy(m)
                .lines()
                .find(|l| l.starts_with("Message-ID:"))
                .unwrap()
                .to_owned()
        };
        assert_ne!(id(&one), id(&two));
        let text = String::from_utf8(one).unwrap();
        assert!(text.contains("\r\n\r\n"), "headers end");
        assert!(text.contains("To: <u1@example.test>\r\n"));
    }

    #[test]
    fn dates() {
        assert_eq!(rfc5322_date(0), "Thu, 01 Jan 1970 00:00:00 +0000");
        assert_eq!(rfc5322_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 +0000");
        assert_eq!(
            rfc5322_date(1_700_000_000),
            "Tue, 14 Nov 2023 22:13:20 +0000"
        );
    }

    #[test]
    fn argument_checks() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: SmtpArgs,
        }
        let parse = |extra: &[&str]| {
            let mut argv = vec!["bench"];
            argv.extend_from_slice(extra);
            Cli::try_parse_from(argv).map(|c| c.args)
        };
        let ok = parse(&["--server", "127.0.0.1:2525", "--duration", "5s"]).unwrap();
        assert!(ok.validate().is_ok());
        assert_eq!(Duration::from(ok.duration.unwrap()), Duration::from_secs(5));
        assert_eq!(ok.pipelining, OnOff::On);
        assert_eq!(
            parse(&["--pipelining", "off"]).unwrap().pipelining,
            OnOff::Off
        );
        for bad in [
            &["--sessions", "0"][..],
            &["--messages", "0"],
            &["--recipients", "0"],
            &["--rate", "0"],
            &["--from", "<a@b>"],
        ] {
            assert!(parse(bad).unwrap().validate().is_err(), "{bad:?}");
        }
        assert!(parse(&["--pipelining", "maybe"]).is_err());
    }
}
