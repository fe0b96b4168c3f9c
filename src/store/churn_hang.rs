//! The sled 0.34 IO-pool deadlock (sled #1412) under queue churn: a child
//! process churns queue-like records through sled with flushes, a watchdog
//! in it exits with [`HANG_EXIT`] when no operation completes for a while,
//! and the parent test kills it if even that does not happen. With stock
//! sled 0.34.7 every run hangs (its one pool fills with flushes waiting
//! for log writes queued behind them); with the vendored sled none does
//! (vendor/sled/POSTINO.md, which also has the test that forces the
//! truncation cycle).
//!
//! Why a child: a deadlocked sled cannot be unwound or dropped, so a hang
//! must cost one process, never the test suite.
//!
//! The short default run (3 s of each mode) is in every `cargo test`; the
//! long one is `POSTINO_HANG_RUNS=20 POSTINO_HANG_SECS=10 cargo test -p
//! postino-core --lib store::churn_hang -- --nocapture` (runs × seconds per
//! run; `--release` and `POSTINO_HANG_MODE=store POSTINO_HANG_SECS=60` for
//! the truncation cycle, see `store_churn`).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CHILD_DIR: &str = "POSTINO_HANG_CHILD_DIR";
const CHILD_SECS: &str = "POSTINO_HANG_CHILD_SECS";
const CHILD_MODE: &str = "POSTINO_HANG_CHILD_MODE";
/// The child's exit code when its watchdog saw no progress.
const HANG_EXIT: i32 = 42;
/// No completed operation for this long is a hang: a flush of a few MiB
/// takes milliseconds, even on a busy 2-core machine it takes well under 1 s.
const STALL: Duration = Duration::from_secs(10);

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Child half: churns for `POSTINO_HANG_CHILD_SECS` seconds, then prints
/// `churn ok N` and exits 0; exits [`HANG_EXIT`] when stalled.
#[test]
#[ignore = "run as a child process by queue_churn_never_hangs"]
fn churn_child() {
    let Some(dir) = std::env::var_os(CHILD_DIR) else {
        return;
    };
    let secs = env(CHILD_SECS, 5);
    if std::env::var(CHILD_MODE).as_deref() == Ok("store") {
        return store_churn(Path::new(&dir), secs);
    }
    // Small segments: segments fill, empty and are truncated away at the
    // tip several times a second, which is what #1412's truncation cycle
    // needs (a truncation queued on the IO pool while the segment
    // accountant waits for it). postino's own store uses sled's default.
    let db = sled::Config::new()
        .path(Path::new(&dir))
        .segment_size(64 * 1024)
        .cache_capacity(8 * 1024 * 1024)
        .flush_every_ms(Some(1))
        .open()
        .unwrap();
    let ops = watchdog();
    let stop = Arc::new(AtomicBool::new(false));
    // Twelve writers, each flushing after every entry: two in three with
    // `flush_async` (which waits on sled's threads for the log writes; in
    // stock 0.34.7 those writes queue behind it on the same pool), the
    // others with `flush` on their own thread, as postino's group commit.
    let writers: u64 = 12;
    let threads: Vec<_> = (0..writers)
        .map(|t| {
            let (db, ops, stop) = (db.clone(), ops.clone(), stop.clone());
            std::thread::spawn(move || {
                let tree = db.open_tree(format!("queue{}", t % 2)).unwrap();
                let mut n: u64 = 0;
                while !stop.load(Ordering::Relaxed) {
                    let key = |n: u64| [t.to_be_bytes(), n.to_be_bytes()].concat();
                    // A queue entry of 2–6 KiB, then the one from a few
                    // messages ago leaves (delivered).
                    let len = 2048 + (n as usize * 1031) % 4096;
                    tree.insert(key(n), vec![n as u8; len]).unwrap();
                    if n >= 16 {
                        tree.remove(key(n - 16)).unwrap();
                    }
                    if t % 3 == 0 {
                        db.flush().unwrap();
                    } else {
                        futures_executor::block_on(db.flush_async()).unwrap();
                    }
                    n += 1;
                    ops.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    db.flush().unwrap();
    println!("churn ok {}", ops.load(Ordering::Relaxed));
}

/// Counts completed operations; exits the process with [`HANG_EXIT`] when
/// the count stands still for [`STALL`].
fn watchdog() -> Arc<AtomicU64> {
    let ops = Arc::new(AtomicU64::new(0));
    let counter = ops.clone();
    std::thread::spawn(move || {
        let mut seen = 0;
        let mut since = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(200));
            let now = counter.load(Ordering::Relaxed);
            if now != seen {
                (seen, since) = (now, Instant::now());
            } else if since.elapsed() > STALL {
                println!("churn hang after {now} operations");
                std::process::exit(HANG_EXIT);
            }
        }
    });
    ops
}

/// The relay queue through [`Store`] with sled's default settings, one
/// writer: each 8 KiB message is spooled, queued, deferred once and
/// delivered 5,000 messages later, with a flush every 64. On stock sled
/// 0.34.7 (release build) about half the runs hang within a minute in #1412's
/// truncation cycle itself: the writer waits in `SegmentAccountant::bump_tip`
/// for a truncation while every IO thread waits in `sa_stabilize` for the
/// accountant's mutex (seen with gdb).
fn store_churn(dir: &Path, secs: u64) {
    use crate::message::{Envelope, RoutedRecipient};
    use crate::routing::{Route, Target};
    use crate::store::{QueueEntry, QueueRecipient, RecipientState, Store};

    let store = Store::open(dir).unwrap();
    let ops = watchdog();
    let content = vec![b'x'; 8192];
    let mut live = std::collections::VecDeque::new();
    let started = Instant::now();
    let mut n: u64 = 0;
    while started.elapsed() < Duration::from_secs(secs) {
        n += 1;
        let id = store.new_id().unwrap();
        let route = Route::Deliver(vec![Target::Remote {
            address: "bob@remote.test".into(),
        }]);
        let envelope = Envelope {
            id,
            sender: Some("sender@example.test".into()),
            recipients: vec![RoutedRecipient {
                address: "bob@remote.test".into(),
                route,
            }],
            received_at: 100,
            client: "127.0.0.1".into(),
            helo: "client.test".into(),
            size: content.len() as u64,
            params: None,
        };
        store.spool(&envelope, &content).unwrap();
        let mut entry = QueueEntry {
            id,
            sender: Some("sender@example.test".into()),
            received_at: 100,
            next_attempt: n,
            attempts: 0,
            recipients: vec![QueueRecipient {
                address: "bob@remote.test".into(),
                state: RecipientState::Pending,
            }],
            client: "127.0.0.1".into(),
            warned: false,
            params: None,
        };
        store.enqueue(&entry).unwrap();
        store.finish_inbound(id).unwrap();
        entry.attempts = 1;
        entry.next_attempt = n + 300;
        entry.recipients[0].state = RecipientState::Deferred {
            last_error: crate::store::DeliveryDiagnostic::reply(
                None,
                &crate::smtp::Reply::new(451, "4.3.0", "try again later"),
            ),
        };
        store.update_queue(&entry).unwrap();
        live.push_back(entry);
        if live.len() > 5000 {
            let mut done = live.pop_front().unwrap();
            done.recipients[0].state = RecipientState::Delivered {
                reply: crate::store::DeliveryDiagnostic::reply(
                    None,
                    &crate::smtp::Reply::new(250, "2.0.0", "Ok"),
                ),
            };
            store.settle_queue(&done, true, &[]).unwrap();
        }
        if n % 64 == 0 {
            store.flush_blocking().unwrap();
        }
        ops.fetch_add(1, Ordering::Relaxed);
    }
    store.flush_blocking().unwrap();
    println!("churn ok {}", ops.load(Ordering::Relaxed));
}

/// How one child run ended.
#[derive(Debug, PartialEq)]
enum Outcome {
    Ok(u64),
    Hang,
}

fn run_child(mode: &str, secs: u64) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "store::churn_hang::churn_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR, dir.path())
        .env(CHILD_SECS, secs.to_string())
        .env(CHILD_MODE, mode)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The child's watchdog ends a stalled run; this bound only catches a
    // child whose watchdog could not run either.
    let deadline = Instant::now() + Duration::from_secs(secs) + STALL * 3;
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let lines = reader.join().unwrap();
    match status {
        None => Outcome::Hang,
        Some(s) if s.code() == Some(HANG_EXIT) => Outcome::Hang,
        Some(s) => {
            assert!(s.success(), "churn child failed: {s:?} {lines:?}");
            let ops = lines
                .iter()
                .find_map(|l| Some(l[l.find("churn ok ")? + 9..].trim().parse().unwrap()))
                .expect("the child reports its operations");
            Outcome::Ok(ops)
        }
    }
}

/// Each run churns sled directly (`sled` mode, threads with `flush_async`
/// and `flush`), then the queue through [`crate::Store`] (`store` mode).
/// `POSTINO_HANG_MODE=sled` or `store` runs only one of them.
#[test]
fn queue_churn_never_hangs() {
    let runs = env("POSTINO_HANG_RUNS", 1);
    let secs = env("POSTINO_HANG_SECS", 3);
    let only = std::env::var("POSTINO_HANG_MODE").ok();
    let mut hangs = 0;
    for run in 1..=runs {
        for mode in ["sled", "store"] {
            if only.as_deref().is_some_and(|m| m != mode) {
                continue;
            }
            let outcome = run_child(mode, secs);
            println!("churn run {run}/{runs} ({mode}): {outcome:?}");
            match outcome {
                Outcome::Hang => hangs += 1,
                // A run that did next to nothing proves nothing.
                Outcome::Ok(ops) => assert!(ops > 100, "only {ops} operations"),
            }
        }
    }
    assert_eq!(hangs, 0, "{hangs} churn runs hung");
}
