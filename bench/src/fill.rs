//! `postino bench fill-queue`: writes remote messages, deferred for a long
//! time, straight into a stopped server's store, to measure a server whose
//! queue is deep (issue 5: "a queue holding 1,000,000 deferred messages
//! still accepts new mail at full speed").
//!
//! Each message goes through the same public store calls, in the same order,
//! as one that came in over SMTP for a remote recipient and failed its first
//! attempt: queued with a pending recipient and its content inline
//! (`Store::accept_remote`, as intake does), then its round settled as
//! deferred (`Store::settle_queue`, as the delivery actor's `finalize` does).
//! So the server sees records it could have written itself.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use postino_core::config::ConfigError;
use postino_core::dsn::rfc5322_date;
use postino_core::message::now_unix;
use postino_core::smtp::RemoteHost;
use postino_core::store::{
    DeliveryDiagnostic, QueueEntry, QueueRecipient, RecipientState, StoreError,
};
use postino_core::{Address, Config, Store};

use super::{BenchError, Progress};

/// Most messages one run writes (a typo guard: 100 million 1 KiB messages
/// are more than 100 GiB).
pub const MAX_COUNT: u64 = 100_000_000;
/// Longest body `--size` accepts (1 MiB: a deep queue is about many entries,
/// not big ones).
pub const MAX_SIZE: usize = 1 << 20;
/// Recipients cycle over `user1..=RECIPIENTS@domain`, so the queue holds
/// many distinct addresses without one per message.
const RECIPIENTS: u64 = 1000;
/// A flush every this many messages, so that a server configured without
/// sled's periodic flush (`store.background_flush = "0s"`) does not keep the
/// whole fill dirty in memory until the end.
const FLUSH_EVERY: u64 = 10_000;

/// Options of `postino bench fill-queue`.
#[derive(clap::Args, Debug, Clone)]
pub struct FillArgs {
    /// The configuration of the server whose store is filled (the global
    /// --config, else ./postino.toml; never the built-in defaults, so that
    /// a fill does not land in ./data by accident). The server must be
    /// stopped: the store allows one opener.
    #[arg(from_global)]
    pub config: Option<PathBuf>,
    /// Messages to write.
    #[arg(long)]
    pub count: u64,
    /// Body size of each message in octets, headers not included (as
    /// `bench smtp --size`).
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// Recipient domain: recipients are user1..user1000@DOMAIN. Must not be
    /// one of the config's local domains (the messages are remote mail).
    #[arg(long)]
    pub domain: String,
    /// Envelope sender and From: header.
    #[arg(long, default_value = "bench@postino.test")]
    pub from: String,
    /// How far in the future the next delivery attempt of every message is.
    #[arg(long, default_value = "24h")]
    pub defer: humantime::Duration,
}

/// Why `fill-queue` failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FillError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The store failed after `written` messages had been written.
    #[error("after {written} messages: {source}")]
    Partial { written: u64, source: StoreError },
    #[error("the fill thread failed: {0}")]
    Join(String),
}

/// The checked options: what every message is made of.
#[derive(Debug)]
struct Plan {
    data_dir: PathBuf,
    count: u64,
    domain: String,
    sender: String,
    defer: Duration,
    hostname: String,
    body: Vec<u8>,
}

impl FillArgs {
    /// Checks the options against the server's configuration.
    fn plan(&self, config: &Config) -> Result<Plan, BenchError> {
        let bad = |m: String| Err(BenchError::Usage(m));
        if self.count == 0 || self.count > MAX_COUNT {
            return bad(format!("--count must be between 1 and {MAX_COUNT}"));
        }
        if self.size > MAX_SIZE {
            return bad(format!("--size must be at most {MAX_SIZE} octets"));
        }
        let domain = self.domain.trim().to_ascii_lowercase();
        // The address parser is lenient about `user@other@domain`; a
        // domain here is a plain host name.
        if domain.is_empty()
            || domain.contains(['@', '[', ']'])
            || Address::parse(&format!("user{RECIPIENTS}@{domain}"), false).is_err()
        {
            return bad(format!("--domain {:?} is not a domain", self.domain));
        }
        if config.is_local_domain(&domain) {
            return bad(format!(
                "--domain {domain} is a local domain of this server; the queue holds remote mail"
            ));
        }
        if Address::parse(&self.from, false).is_err() {
            return bad(format!("--from {:?} is not an address", self.from));
        }
        let defer = Duration::from(self.defer);
        if defer < Duration::from_secs(1) {
            return bad("--defer must be at least 1s (the messages are to stay queued)".into());
        }
        Ok(Plan {
            data_dir: config.data_dir.clone(),
            count: self.count,
            domain,
            sender: self.from.clone(),
            defer,
            hostname: config.hostname.clone(),
            body: body(self.size),
        })
    }
}

impl Plan {
    fn recipient(&self, i: u64) -> String {
        format!("user{}@{}", i % RECIPIENTS + 1, self.domain)
    }

    /// Message `i` as the SMTP actor would store it: our `Received:` line,
    /// the client's headers, the body.
    fn content(&self, out: &mut Vec<u8>, id: postino_core::MessageId, to: &str, date: &str) {
        use std::io::Write;
        out.clear();
        let _ = write!(
            out,
            "Received: from bench.postino.test ([127.0.0.1])\r\n\tby {host} (postino) with ESMTP id {id}\r\n\t\
             for <{to}>;\r\n\t{date}\r\nFrom: <{from}>\r\nTo: <{to}>\r\n\
             Subject: postino bench fill-queue message {id}\r\nDate: {date}\r\n\
             Message-ID: <{id}.fill@bench.postino.test>\r\n\r\n",
            host = self.hostname,
            from = self.sender,
        );
        out.extend_from_slice(&self.body);
    }
}

/// Runs `postino bench fill-queue`.
pub async fn run(args: FillArgs) -> Result<(), BenchError> {
    // As `postino` itself: --config, else ./postino.toml. Not the built-in
    // defaults, though: a fill must not land in ./data by accident.
    let path = match args.config.clone() {
        Some(path) => path,
        None if Path::new("postino.toml").exists() => PathBuf::from("postino.toml"),
        None => {
            return Err(BenchError::Usage(
                "fill-queue needs --config (or ./postino.toml): the configuration of the \
                 (stopped) server whose store to fill"
                    .into(),
            ))
        }
    };
    let config = Config::load(&path).map_err(FillError::from)?;
    let plan = args.plan(&config)?;
    let settings = config.store.clone();
    let dir = plan.data_dir.clone();
    // sled's open reads its log: blocking work, off the runtime's threads.
    let store = tokio::task::spawn_blocking(move || Store::open_configured(&dir, &settings))
        .await
        .map_err(|e| FillError::Join(e.to_string()))?
        .map_err(FillError::from)?;
    let before = store.queue_len().map_err(FillError::from)?;
    let done = Arc::new(AtomicU64::new(0));
    let progress = Progress::start(plan.count, "msg", done.clone());
    let start = Instant::now();
    let plan = Arc::new(plan);
    let filled = {
        let (plan, store, done) = (plan.clone(), store.clone(), done.clone());
        tokio::task::spawn_blocking(move || fill(&store, &plan, &done))
            .await
            .map_err(|e| FillError::Join(e.to_string()))?
    };
    let elapsed = start.elapsed();
    progress.finish(done.load(Ordering::Relaxed));
    filled?;
    let after = store.queue_len().map_err(FillError::from)?;
    let disk = store.disk_size().map_err(FillError::from)?;
    let secs = elapsed.as_secs_f64().max(1e-9);
    println!(
        "queued {} messages ({} octets of body) for {} in {}, next attempt in {}, in {:.1} s ({:.0} msg/s)",
        plan.count,
        plan.body.len(),
        plan.domain,
        plan.data_dir.display(),
        humantime::format_duration(plan.defer),
        secs,
        plan.count as f64 / secs,
    );
    println!(
        "queue: {before} entries before, {after} now; store size on disk {:.1} MiB",
        disk as f64 / (1024.0 * 1024.0)
    );
    Ok(())
}

/// Writes the messages, flushing every [`FLUSH_EVERY`] and at the end.
fn fill(store: &Store, plan: &Plan, done: &AtomicU64) -> Result<(), FillError> {
    let partial = |written, source| FillError::Partial { written, source };
    let mut content = Vec::with_capacity(plan.body.len() + 512);
    for i in 0..plan.count {
        // Per message: a fill of a million takes minutes, and a long defer
        // should count from when each message was written.
        let now = now_unix();
        write_one(store, plan, i, now, &mut content).map_err(|e| partial(i, e))?;
        done.store(i + 1, Ordering::Relaxed);
        if (i + 1) % FLUSH_EVERY == 0 {
            store.flush_blocking().map_err(|e| partial(i + 1, e))?;
        }
    }
    store.flush_blocking().map_err(|e| partial(plan.count, e))?;
    Ok(())
}

/// One message through accept and a deferred settlement.
fn write_one(
    store: &Store,
    plan: &Plan,
    i: u64,
    now: u64,
    content: &mut Vec<u8>,
) -> Result<(), StoreError> {
    let id = store.new_id()?;
    let to = plan.recipient(i);
    plan.content(content, id, &to, &rfc5322_date(now));
    let mut entry = QueueEntry {
        id,
        sender: Some(plan.sender.clone()),
        received_at: now,
        next_attempt: now,
        attempts: 0,
        recipients: vec![QueueRecipient {
            address: to,
            state: RecipientState::Pending,
        }],
        client: "127.0.0.1".into(),
        warned: false,
        params: None,
    };
    store.accept_remote(&entry, content)?;
    // The first attempt's outcome, as the delivery actor records a 4xx.
    entry.attempts = 1;
    entry.next_attempt = now + plan.defer.as_secs();
    entry.recipients[0].state = RecipientState::Deferred {
        last_error: DeliveryDiagnostic {
            remote: Some(RemoteHost {
                host: format!("mx.{}", plan.domain),
                addr: SocketAddr::from(([127, 0, 0, 2], 25)),
            }),
            code: Some(451),
            status: Some("4.3.0".into()),
            text: "try again later (postino bench fill-queue)".into(),
        },
    };
    store.settle_queue(&entry, false, &[])
}

/// `size` octets of printable text in CRLF lines of at most 78 octets; no
/// line starts with a dot.
fn body(size: usize) -> Vec<u8> {
    const LINE: &[u8] =
        b"The quick brown fox jumps over the lazy dog; postino bench fill-queue body.";
    let mut out = Vec::with_capacity(size);
    while out.len() < size {
        let room = size - out.len();
        if room <= 2 {
            out.extend(std::iter::repeat_n(b'x', room));
            break;
        }
        let text = (room - 2).min(LINE.len());
        out.extend_from_slice(&LINE[..text]);
        out.extend_from_slice(b"\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// The shape of `postino`'s own command line: a global --config.
    #[derive(Parser, Debug)]
    struct Cli {
        #[arg(long, global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: super::super::BenchCommand,
    }

    fn args(line: &[&str]) -> Result<FillArgs, clap::Error> {
        let cli = Cli::try_parse_from(std::iter::once("postino").chain(line.iter().copied()))?;
        match cli.command {
            super::super::BenchCommand::FillQueue(a) => Ok(a),
            other => panic!("parsed as {other:?}"),
        }
    }

    fn config() -> Config {
        let mut c = Config::default();
        c.routing.local_domains = vec!["example.test".into()];
        c
    }

    #[test]
    fn config_is_the_global_option_wherever_it_is_given() {
        let before = args(&[
            "--config",
            "/x/p.toml",
            "fill-queue",
            "--count",
            "5",
            "--domain",
            "r.test",
        ])
        .unwrap();
        let after = args(&[
            "fill-queue",
            "--count",
            "5",
            "--domain",
            "r.test",
            "--config",
            "/y/p.toml",
        ])
        .unwrap();
        assert_eq!(before.config.as_deref(), Some(Path::new("/x/p.toml")));
        assert_eq!(after.config.as_deref(), Some(Path::new("/y/p.toml")));
        assert_eq!(before.size, 1024);
        assert_eq!(Duration::from(before.defer), Duration::from_secs(86_400));
        assert!(
            args(&["fill-queue", "--domain", "r.test"]).is_err(),
            "--count"
        );
        assert!(args(&["fill-queue", "--count", "5"]).is_err(), "--domain");
    }

    #[test]
    fn options_are_checked_against_the_config() {
        let cases: &[(&[&str], Option<&str>)] = &[
            (&["--count", "10", "--domain", "Remote.Test"], None),
            (&["--count", "0", "--domain", "r.test"], Some("--count")),
            (
                &["--count", "100000001", "--domain", "r.test"],
                Some("--count"),
            ),
            (
                &["--count", "1", "--domain", "r.test", "--size", "1048577"],
                Some("--size"),
            ),
            (
                &["--count", "1", "--domain", "example.test"],
                Some("local domain"),
            ),
            (
                &["--count", "1", "--domain", "EXAMPLE.test"],
                Some("local domain"),
            ),
            (&["--count", "1", "--domain", "a b"], Some("not a domain")),
            (
                &["--count", "1", "--domain", "u@r.test"],
                Some("not a domain"),
            ),
            (&["--count", "1", "--domain", ""], Some("not a domain")),
            (
                &["--count", "1", "--domain", "r.test", "--from", "x"],
                Some("--from"),
            ),
            (
                &["--count", "1", "--domain", "r.test", "--defer", "0s"],
                Some("--defer"),
            ),
        ];
        for (line, want) in cases {
            let mut full = vec!["fill-queue"];
            full.extend_from_slice(line);
            let a = args(&full).unwrap();
            match (a.plan(&config()), want) {
                (Ok(plan), None) => assert_eq!(plan.domain, "remote.test"),
                (Err(e), Some(w)) => assert!(e.to_string().contains(w), "{line:?}: {e}"),
                (got, want) => panic!("{line:?}: got {:?}, want {want:?}", got.map(|p| p.domain)),
            }
        }
    }

    #[test]
    fn bodies_have_the_size_asked_for_and_short_lines() {
        for size in [0, 1, 2, 3, 77, 78, 79, 1024, 5000] {
            let b = body(size);
            assert_eq!(b.len(), size);
            for line in b.split(|&c| c == b'\n') {
                assert!(line.len() <= 78, "{size}");
                assert!(!line.starts_with(b"."), "{size}");
            }
        }
    }

    /// A few messages, so the records are checked: queued, deferred, not
    /// due, nothing left in the intake spool. (The real fills are run by
    /// hand; see BENCHMARKS.md.)
    #[test]
    fn fills_deferred_entries_that_are_not_due() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config();
        c.data_dir = dir.path().to_owned();
        let a = args(&[
            "fill-queue",
            "--count",
            "3",
            "--domain",
            "r.test",
            "--size",
            "100",
        ])
        .unwrap();
        let plan = a.plan(&c).unwrap();
        let store = Store::open(dir.path()).unwrap();
        let done = AtomicU64::new(0);
        let now = now_unix();
        fill(&store, &plan, &done).unwrap();
        assert_eq!(done.load(Ordering::Relaxed), 3);
        assert_eq!(store.queue_len().unwrap(), 3);
        assert!(store.inbound().unwrap().is_empty());
        assert!(store.due(now + 3600, 10).unwrap().is_empty());
        let next = store.next_due_time().unwrap().unwrap();
        assert!((now + 86_400..now + 86_400 + 60).contains(&next), "{next}");
        let entries = store.queue().unwrap();
        let rcpts: Vec<&str> = entries
            .iter()
            .map(|e| e.recipients[0].address.as_str())
            .collect();
        assert_eq!(rcpts, ["user1@r.test", "user2@r.test", "user3@r.test"]);
        for e in &entries {
            assert_eq!(e.attempts, 1);
            assert!(matches!(
                e.recipients[0].state,
                RecipientState::Deferred { .. }
            ));
            let content = store.queued_content(e.id).unwrap().unwrap();
            assert!(content.starts_with(b"Received: from bench.postino.test"));
            assert!(content.ends_with(&body(100)));
        }
    }
}
