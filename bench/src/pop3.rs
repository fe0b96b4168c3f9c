//! `postino bench pop3`: concurrent POP3 sessions that log in, RETRieve
//! messages (optionally DELEting them) and QUIT; measures RETR rate and latency.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::client::{Client, ClientError};
use super::proto::Pattern;
use super::report::SharedRecorder;
use super::{plot, BenchError, Progress};

/// How many messages each login RETRieves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retrieve {
    All,
    First(u64),
}

impl FromStr for Retrieve {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("all") {
            return Ok(Retrieve::All);
        }
        match s.parse::<u64>() {
            Ok(n) if n > 0 => Ok(Retrieve::First(n)),
            _ => Err(format!("expected `all` or a positive number, got {s:?}")),
        }
    }
}

/// Options of `postino bench pop3`.
#[derive(clap::Args, Debug, Clone)]
pub struct Pop3Args {
    /// POP3 server to load, as host:port. Only loopback addresses are allowed
    /// unless --allow-remote is given.
    #[arg(long, default_value = "127.0.0.1:110")]
    pub server: String,
    /// Allow a --server outside 127.0.0.0/8 and ::1. Only for servers you own.
    #[arg(long)]
    pub allow_remote: bool,
    /// Concurrent POP3 sessions.
    #[arg(long, default_value_t = 21)]
    pub sessions: usize,
    /// Logins in total (each: USER/PASS, STAT, RETRs, QUIT). Default: one per
    /// session.
    #[arg(long)]
    pub logins: Option<u64>,
    /// User names: the placeholder in braces (see the default) becomes a
    /// number: session s (from 0) always logs
    /// in as user 1 + s % --users, so with --users >= --sessions no two
    /// sessions share a mailbox (servers may lock it: RFC 1939 [IN-USE]).
    #[arg(long, default_value = "user{n}@example.test")]
    pub user_pattern: String,
    /// How many distinct users {n} cycles over. Default: --sessions.
    #[arg(long)]
    pub users: Option<u64>,
    /// Password of every user.
    #[arg(long, default_value = "password", env = "POSTINO_BENCH_PASSWORD")]
    pub password: String,
    /// Messages to RETRieve per login: `all` or a number (from message 1 up).
    #[arg(long, default_value = "all")]
    pub retrieve: Retrieve,
    /// DELEte each message after retrieving it (committed by QUIT).
    #[arg(long)]
    pub delete: bool,
    /// Stop after this many RETRs in total (default: no limit besides the
    /// logins and the mailbox contents).
    #[arg(long)]
    pub messages: Option<u64>,
    /// Stop starting new RETRs after this long (e.g. 30s).
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

impl Pop3Args {
    fn validate(&self) -> Result<(), BenchError> {
        let bad = |m: &str| Err(BenchError::Usage(m.to_owned()));
        if self.sessions == 0 || self.sessions > 100_000 {
            return bad("--sessions must be between 1 and 100000");
        }
        if self.logins == Some(0) || self.users == Some(0) || self.messages == Some(0) {
            return bad("--logins, --users and --messages must be at least 1");
        }
        if self.password.contains(['\r', '\n']) {
            return bad("--password must not contain line breaks");
        }
        Ok(())
    }

    fn params(&self) -> serde_json::Value {
        serde_json::json!({
            "sessions": self.sessions,
            "logins": self.logins.unwrap_or(self.sessions as u64),
            "user_pattern": self.user_pattern,
            "users": self.users.unwrap_or(self.sessions as u64),
            "retrieve": match self.retrieve { Retrieve::All => "all".to_string(), Retrieve::First(n) => n.to_string() },
            "delete": self.delete,
            "messages": self.messages,
            "duration_s": self.duration.map(|d| Duration::from(d).as_secs_f64()),
        })
    }
}

struct Shared {
    addr: SocketAddr,
    args: Pop3Args,
    users: Pattern,
    logins: u64,
    next_login: AtomicU64,
    retrs: AtomicU64,
    done: Arc<AtomicU64>,
    deadline: Option<Instant>,
    recorder: SharedRecorder,
}

impl Shared {
    fn expired(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    fn claim_login(&self) -> bool {
        !self.expired() && self.next_login.fetch_add(1, Ordering::Relaxed) < self.logins
    }

    /// Takes one RETR from the --messages budget.
    fn claim_retr(&self) -> bool {
        if self.expired() {
            return false;
        }
        match self.args.messages {
            None => true,
            Some(max) => self.retrs.fetch_add(1, Ordering::Relaxed) < max,
        }
    }

    fn failed(&self, kind: &str) {
        self.recorder.lock().failed(Instant::now(), kind);
        self.done.fetch_add(1, Ordering::Relaxed);
    }
}

/// Runs `postino bench pop3`.
pub async fn run(args: Pop3Args) -> Result<(), BenchError> {
    args.validate()?;
    let addr = super::resolve(&args.server, args.allow_remote).await?;
    let users = Pattern::new(
        &args.user_pattern,
        args.users.unwrap_or(args.sessions as u64),
    )
    .map_err(|e| BenchError::Usage(e.to_string()))?;
    let start = Instant::now();
    let done = Arc::new(AtomicU64::new(0));
    let logins = args.logins.unwrap_or(args.sessions as u64);
    let shared = Arc::new(Shared {
        addr,
        users,
        logins,
        next_login: AtomicU64::new(0),
        retrs: AtomicU64::new(0),
        done: done.clone(),
        deadline: args.duration.map(|d| start + Duration::from(d)),
        recorder: SharedRecorder::new(start),
        args,
    });
    // The total is not known before STAT: show the --messages bound if any.
    let progress = Progress::start(shared.args.messages.unwrap_or(0), "RETR", done.clone());
    let mut set = tokio::task::JoinSet::new();
    for s in 0..(shared.args.sessions as u64).min(logins) {
        set.spawn(session(shared.clone(), s));
    }
    while set.join_next().await.is_some() {}
    let elapsed = start.elapsed();
    progress.finish(done.load(Ordering::Relaxed));

    let args = &shared.args;
    let report = shared
        .recorder
        .lock()
        .report("pop3", &args.server, elapsed, args.params());
    print!("{}", report.summary("RETRs", "RETR sent to last octet"));
    if let Some(path) = &args.json {
        report.write_json(path)?;
    }
    if let Some(path) = &args.plot {
        plot::draw(&report, "RETR", path)?;
    }
    if report.ok == 0 {
        return Err(BenchError::NothingSucceeded {
            failed: report.failed,
        });
    }
    Ok(())
}

async fn session(shared: Arc<Shared>, s: u64) {
    let user = shared.users.expand(s);
    while shared.claim_login() {
        if let Err(kind) = login(&shared, &user).await {
            shared.failed(&kind);
        }
    }
}

fn kind(e: ClientError) -> String {
    e.kind().to_owned()
}

/// One login: returns the error kind of a failure that ended it early.
async fn login(shared: &Shared, user: &str) -> Result<(), String> {
    let args = &shared.args;
    let mut c = Client::connect(shared.addr, Duration::from(args.timeout))
        .await
        .map_err(kind)?;
    let expect_ok = |what: &str, s: Result<super::proto::Pop3Status, ClientError>| match s {
        Ok(s) if s.ok => Ok(s),
        Ok(_) => Err(format!("{what} -ERR")),
        Err(e) => Err(kind(e)),
    };
    expect_ok("greeting", c.pop3_status().await)?;
    c.send(format!("USER {user}\r\n").as_bytes())
        .await
        .map_err(kind)?;
    expect_ok("USER", c.pop3_status().await)?;
    c.send(format!("PASS {}\r\n", args.password).as_bytes())
        .await
        .map_err(kind)?;
    expect_ok("PASS", c.pop3_status().await)?;
    c.send(b"STAT\r\n").await.map_err(kind)?;
    let stat = expect_ok("STAT", c.pop3_status().await)?;
    let count: u64 = stat
        .text
        .split_ascii_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| "STAT unparsable".to_owned())?;
    let wanted = match args.retrieve {
        Retrieve::All => count,
        Retrieve::First(n) => n.min(count),
    };
    for k in 1..=wanted {
        if !shared.claim_retr() {
            break;
        }
        let line = format!("RETR {k}\r\n");
        c.send(line.as_bytes()).await.map_err(kind)?;
        let sent = Instant::now();
        let (status, octets) = c.pop3_multiline().await.map_err(kind)?;
        let at = Instant::now();
        if status.ok {
            shared.recorder.lock().ok(at, at - sent, octets as u64);
            shared.done.fetch_add(1, Ordering::Relaxed);
        } else {
            shared.failed("RETR -ERR");
        }
        if args.delete {
            c.send(format!("DELE {k}\r\n").as_bytes())
                .await
                .map_err(kind)?;
            if !c.pop3_status().await.map_err(kind)?.ok {
                shared.recorder.lock().error("DELE -ERR");
            }
        }
    }
    // QUIT commits deletions (RFC 1939 UPDATE state): wait for its +OK.
    c.send(b"QUIT\r\n").await.map_err(kind)?;
    expect_ok("QUIT", c.pop3_status().await)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use clap::Parser;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: Pop3Args,
    }

    /// What the fake server saw.
    #[derive(Default)]
    struct Seen {
        /// Commands by verb.
        commands: HashMap<String, u64>,
        /// Users logged in right now, and whether two ever overlapped.
        active: Vec<String>,
        overlap: bool,
    }

    /// A POP3 server with `count` messages in every mailbox; message k's body
    /// has a line that needs dot-stuffing and is k lines long. Password "pw".
    async fn fake_pop3(count: u64) -> (SocketAddr, Arc<Mutex<Seen>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let s = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let seen = s.clone();
                tokio::spawn(async move {
                    let (r, mut w) = stream.into_split();
                    let mut lines = BufReader::new(r).lines();
                    w.write_all(b"+OK fake ready\r\n").await.unwrap();
                    let mut user = String::new();
                    while let Ok(Some(line)) = lines.next_line().await {
                        let (verb, arg) = line.split_once(' ').unwrap_or((&line, ""));
                        *seen
                            .lock()
                            .unwrap()
                            .commands
                            .entry(verb.to_owned())
                            .or_default() += 1;
                        let reply = match verb {
                            "USER" => {
                                user = arg.to_owned();
                                "+OK\r\n".to_owned()
                            }
                            "PASS" if arg == "pw" => {
                                let mut s = seen.lock().unwrap();
                                s.overlap |= s.active.contains(&user);
                                s.active.push(user.clone());
                                "+OK logged in\r\n".to_owned()
                            }
                            "PASS" => "-ERR [AUTH] no\r\n".to_owned(),
                            "STAT" => format!("+OK {count} 1000\r\n"),
                            "RETR" => {
                                let k: usize = arg.parse().unwrap();
                                format!(
                                    "+OK\r\nSubject: {k}\r\n\r\n..stuffed\r\n{}.\r\n",
                                    "x\r\n".repeat(k)
                                )
                            }
                            "DELE" => "+OK\r\n".to_owned(),
                            "QUIT" => {
                                seen.lock().unwrap().active.retain(|u| *u != user);
                                w.write_all(b"+OK bye\r\n").await.unwrap();
                                return;
                            }
                            _ => "-ERR unknown\r\n".to_owned(),
                        };
                        w.write_all(reply.as_bytes()).await.unwrap();
                    }
                });
            }
        });
        (addr, seen)
    }

    fn args(addr: SocketAddr, extra: &[&str]) -> Pop3Args {
        let server = addr.to_string();
        let mut argv = vec![
            "pop3",
            "--server",
            &server,
            "--password",
            "pw",
            "--timeout",
            "10s",
        ];
        argv.extend_from_slice(extra);
        Cli::parse_from(argv).args
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn retrieves_every_message_of_every_login() {
        let (addr, seen) = fake_pop3(25).await;
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("p.json");
        let a = args(
            addr,
            &[
                "--sessions",
                "4",
                "--logins",
                "12",
                "--json",
                json.to_str().unwrap(),
            ],
        );
        run(a).await.unwrap();
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert_eq!(report["ok"], 12 * 25);
        assert_eq!(report["failed"], 0);
        let s = seen.lock().unwrap();
        assert_eq!(s.commands["RETR"], 12 * 25);
        assert_eq!(s.commands["QUIT"], 12);
        assert!(!s.commands.contains_key("DELE"));
        // Each session keeps its own mailbox: no two logins to one user at once.
        assert!(!s.overlap);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn first_n_with_delete_and_budget() {
        let (addr, seen) = fake_pop3(25).await;
        run(args(
            addr,
            &["--sessions", "3", "--retrieve", "5", "--delete"],
        ))
        .await
        .unwrap();
        {
            let s = seen.lock().unwrap();
            assert_eq!((s.commands["RETR"], s.commands["DELE"]), (15, 15));
        }
        // --messages caps the RETRs of the whole run.
        let (addr, seen) = fake_pop3(25).await;
        run(args(addr, &["--sessions", "3", "--messages", "7"]))
            .await
            .unwrap();
        assert_eq!(seen.lock().unwrap().commands["RETR"], 7);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wrong_password_fails_the_run() {
        let (addr, _) = fake_pop3(1).await;
        let mut a = args(addr, &["--sessions", "2"]);
        a.password = "wrong".into();
        let err = run(a).await.unwrap_err();
        assert!(
            matches!(err, BenchError::NothingSucceeded { failed: 2 }),
            "{err}"
        );
    }

    #[test]
    fn retrieve_values() {
        assert_eq!("all".parse::<Retrieve>(), Ok(Retrieve::All));
        assert_eq!("ALL".parse::<Retrieve>(), Ok(Retrieve::All));
        assert_eq!("12".parse::<Retrieve>(), Ok(Retrieve::First(12)));
        assert!("0".parse::<Retrieve>().is_err());
        assert!("some".parse::<Retrieve>().is_err());
    }
}
