//! `postino bench`: the load harness users run against postino or any other
//! SMTP/POP3 server, and a receiving SMTP sink for relay tests.
//!
//! # Layout
//! - `smtp`: `postino bench smtp`, concurrent SMTP sessions sending generated
//!   mail, latency from the final dot to its reply.
//! - `pop3`: `postino bench pop3`, concurrent POP3 sessions RETRieving mail.
//! - `fill`: `postino bench fill-queue`, writes deferred remote messages into
//!   a stopped server's store (a deep queue to measure against).
//! - `sink`: `postino bench sink`, a fast SMTP server that accepts and
//!   discards mail (or answers 4xx/5xx, delays, drops) and counts it.
//! - `report`: measurements, the JSON report and the summary; `plot`: SVG.
//! - `proto`: IO-free parsing (replies, end of data, patterns); `client`: one
//!   connection; `tls`: the accept-any-certificate STARTTLS client.
//!
//! Architecture invariant: the harness only talks to loopback addresses unless
//! the user passes `--allow-remote`; every load is bounded by a message count
//! and optionally a duration.

pub mod fill;
pub mod plot;
pub mod pop3;
pub mod proto;
pub mod report;
pub mod sink;
pub mod smtp;

mod client;
mod tls;

use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

pub use fill::FillArgs;
pub use pop3::Pop3Args;
pub use sink::SinkArgs;
pub use smtp::SmtpArgs;

/// `postino bench <command>`.
#[derive(clap::Subcommand, Debug)]
pub enum BenchCommand {
    /// Send generated mail over concurrent SMTP sessions and measure
    /// throughput and the latency from the final dot to its reply.
    Smtp(SmtpArgs),
    /// RETRieve mail over concurrent POP3 sessions and measure the rate.
    Pop3(Pop3Args),
    /// Run an SMTP server that accepts and discards mail and counts it
    /// (the receiving MX for relay tests).
    Sink(SinkArgs),
    /// Write deferred remote messages into a stopped server's store (needs
    /// --config), to measure the server with a deep queue.
    FillQueue(FillArgs),
}

/// Why a bench command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BenchError {
    #[error("invalid arguments: {0}")]
    Usage(String),
    #[error(
        "refusing {addr}: it resolves to {ip}, which is not a loopback address; \
         pass --allow-remote only for a server you own"
    )]
    NotLoopback { addr: String, ip: IpAddr },
    #[error("cannot resolve {addr}: {source}")]
    Resolve {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot draw {path}: {message}")]
    Plot { path: PathBuf, message: String },
    #[error("tls setup: {0}")]
    Tls(String),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("nothing succeeded: all {failed} operations failed (see the errors above)")]
    NothingSucceeded { failed: u64 },
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Fill(#[from] fill::FillError),
}

/// Runs one bench command to completion on its own multi-threaded tokio
/// runtime.
///
/// # Errors
/// Invalid arguments, a non-loopback address without `--allow-remote`,
/// output files that cannot be written, or a run in which nothing succeeded.
///
/// # Panics
/// When called from inside an async runtime (tokio forbids nesting
/// `block_on`): call it from plain `main`, before any runtime starts.
pub fn run(cmd: BenchCommand) -> Result<(), BenchError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(BenchError::Runtime)?;
    rt.block_on(async move {
        match cmd {
            BenchCommand::Smtp(args) => smtp::run(args).await,
            BenchCommand::Pop3(args) => pop3::run(args).await,
            BenchCommand::Sink(args) => sink::run(args).await,
            BenchCommand::FillQueue(args) => fill::run(args).await,
        }
    })
}

/// Loopback: 127.0.0.0/8, ::1, and IPv4-mapped 127.x.
pub fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Resolves `addr` (`host:port`) and refuses it unless every address it
/// resolves to is loopback or `allow_remote` is set. Returns the first address.
pub async fn resolve(addr: &str, allow_remote: bool) -> Result<SocketAddr, BenchError> {
    let resolve_err = |source| BenchError::Resolve {
        addr: addr.to_owned(),
        source,
    };
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(addr)
        .await
        .map_err(resolve_err)?
        .collect();
    check_addresses(addr, &addrs, allow_remote)?;
    addrs
        .first()
        .copied()
        .ok_or_else(|| resolve_err(std::io::Error::other("no address")))
}

fn check_addresses(addr: &str, addrs: &[SocketAddr], allow_remote: bool) -> Result<(), BenchError> {
    if allow_remote {
        return Ok(());
    }
    match addrs.iter().find(|a| !is_loopback(a.ip())) {
        Some(bad) => Err(BenchError::NotLoopback {
            addr: addr.to_owned(),
            ip: bad.ip(),
        }),
        None => Ok(()),
    }
}

/// A progress bar on stderr when it is a terminal, hidden otherwise. It is
/// driven by a ticker reading `done`, so sessions only bump an atomic.
pub(crate) struct Progress {
    bar: ProgressBar,
    ticker: tokio::task::JoinHandle<()>,
}

impl Progress {
    /// `total` 0: not known in advance.
    pub(crate) fn start(total: u64, unit: &str, done: Arc<AtomicU64>) -> Self {
        let bar = if std::io::stderr().is_terminal() {
            // An unknown total (0) gets a counter without a bar.
            let bar = ProgressBar::new(total);
            let template = if total == 0 {
                format!("{{elapsed_precise}} {{pos}} {unit} {{rate}}")
            } else {
                format!(
                    "{{elapsed_precise}} [{{bar:40}}] {{pos}}/{{len}} {unit} {{rate}} (eta {{eta}})"
                )
            };
            if let Ok(style) = ProgressStyle::with_template(&template) {
                // indicatif's {per_sec} prints four decimals: whole numbers read better.
                let style = style.with_key(
                    "rate",
                    |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                        let _ = write!(w, "{:.0}/s", state.per_sec());
                    },
                );
                bar.set_style(style.progress_chars("=> "));
            }
            bar
        } else {
            ProgressBar::hidden()
        };
        let b = bar.clone();
        let ticker = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                b.set_position(done.load(Ordering::Relaxed));
            }
        });
        Self { bar, ticker }
    }

    pub(crate) fn finish(self, done: u64) {
        self.ticker.abort();
        self.bar.set_position(done);
        self.bar.finish_and_clear();
    }
}

/// Checks a fraction option (0.0 to 1.0).
pub(crate) fn fraction(name: &str, v: f64) -> Result<f64, BenchError> {
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(BenchError::Usage(format!(
            "--{name} must be between 0 and 1, got {v}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_only() {
        let cases = [
            ("127.0.0.1:25", true),
            ("127.1.2.3:25", true),
            ("[::1]:25", true),
            ("[::ffff:127.0.0.1]:25", true),
            ("10.0.0.1:25", false),
            ("192.168.1.1:25", false),
            ("0.0.0.0:25", false),
            ("[::]:25", false),
            ("[::ffff:10.0.0.1]:25", false),
            ("8.8.8.8:25", false),
        ];
        for (addr, ok) in cases {
            let sa: SocketAddr = addr.parse().unwrap();
            assert_eq!(is_loopback(sa.ip()), ok, "{addr}");
            assert_eq!(check_addresses(addr, &[sa], false).is_ok(), ok, "{addr}");
            assert!(check_addresses(addr, &[sa], true).is_ok());
        }
        // One remote address among loopback ones is enough to refuse.
        let mixed: Vec<SocketAddr> = vec![
            "127.0.0.1:25".parse().unwrap(),
            "10.1.1.1:25".parse().unwrap(),
        ];
        let err = check_addresses("mixed", &mixed, false).unwrap_err();
        assert!(err.to_string().contains("--allow-remote"), "{err}");
    }

    #[tokio::test]
    async fn resolves_localhost_and_refuses_others() {
        let a = resolve("127.0.0.1:2525", false).await.unwrap();
        assert_eq!(a.port(), 2525);
        assert!(matches!(
            resolve("192.0.2.1:25", false).await,
            Err(BenchError::NotLoopback { .. })
        ));
    }

    #[test]
    fn fractions() {
        assert!(fraction("x", 0.0).is_ok());
        assert!(fraction("x", 1.0).is_ok());
        assert!(fraction("x", 1.5).is_err());
        assert!(fraction("x", -0.1).is_err());
        assert!(fraction("x", f64::NAN).is_err());
    }
}
