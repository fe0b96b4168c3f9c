//! Disk use of the store under relay churn (sled #1333: space is not
//! reclaimed under insert-then-delete queues): writers accept remote-only
//! messages (`accept_remote`, durable) and settle them as delivered
//! (`settle_queue` with `remove`), as the relay path does, keeping a backlog
//! of undelivered ones; the size of the data directory is printed as it goes,
//! after the queue is empty, after reopening, and after `Store::compact`.
//!
//! Not a criterion benchmark and not a test: a measurement, in release mode.
//!
//! ```sh
//! cargo bench -p postino-core --bench queue_disk            # 1,000,000 cycles of 8 KiB
//! QUEUE_DISK_CYCLES=100000 QUEUE_DISK_SIZE=8192 QUEUE_DISK_WRITERS=8 \
//!     QUEUE_DISK_BACKLOG=64 QUEUE_DISK_COMPACT_EVERY=0 cargo bench -p postino-core --bench queue_disk
//! ```
//!
//! `QUEUE_DISK_COMPACT_EVERY=N` closes the store every N cycles, runs
//! `Store::compact` on it (what `postino store compact` does with the server
//! stopped) and carries on: the bound a postmaster can apply. The database
//! lives under `$TMPDIR`.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use futures_executor::block_on;

use postino_core::message::now_unix;
use postino_core::smtp::Reply;
use postino_core::store::{DeliveryDiagnostic, QueueEntry, QueueRecipient, RecipientState};
use postino_core::Store;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Octets under `dir`, as `du` counts them (allocated blocks).
fn du(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() {
            total += du(&entry.path());
        } else {
            total += meta.blocks() * 512;
        }
    }
    total
}

fn mib(b: u64) -> String {
    format!("{:.1}", b as f64 / (1024.0 * 1024.0))
}

fn entry(store: &Store, writer: u64) -> QueueEntry {
    let id = store.new_id().expect("id");
    let now = now_unix();
    QueueEntry {
        id,
        sender: Some("sender@example.org".into()),
        received_at: now,
        next_attempt: now,
        attempts: 0,
        recipients: vec![QueueRecipient {
            address: format!("user{writer:05}@remote.example"),
            state: RecipientState::Pending,
        }],
        client: "192.0.2.7".into(),
        warned: false,
        params: None,
    }
}

/// Runs `cycles` accept/settle cycles over `writers` threads, each keeping
/// `backlog` messages queued (delivered `backlog` messages later).
fn churn(store: &Store, cycles: u64, writers: u64, backlog: u64, content: &[u8], done: &AtomicU64) {
    std::thread::scope(|s| {
        for w in 0..writers {
            s.spawn(move || {
                let mut queued = std::collections::VecDeque::new();
                let mine = cycles / writers + u64::from(w < cycles % writers);
                for _ in 0..mine {
                    let entry = entry(store, w);
                    store.accept_remote(&entry, content).expect("accept_remote");
                    block_on(store.durable()).expect("durable");
                    queued.push_back(entry);
                    if queued.len() as u64 > backlog {
                        let mut delivered = queued.pop_front().unwrap();
                        delivered.recipients[0].state = RecipientState::Delivered {
                            reply: DeliveryDiagnostic::reply(None, &Reply::new(250, "2.0.0", "Ok")),
                        };
                        store.settle_queue(&delivered, true, &[]).expect("settle");
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
                for mut delivered in queued {
                    delivered.recipients[0].state = RecipientState::Delivered {
                        reply: DeliveryDiagnostic::reply(None, &Reply::new(250, "2.0.0", "Ok")),
                    };
                    store.settle_queue(&delivered, true, &[]).expect("settle");
                }
            });
        }
    });
}

fn main() {
    // `cargo bench` passes `--bench`; nothing to parse.
    let cycles = env("QUEUE_DISK_CYCLES", 1_000_000);
    let size = env("QUEUE_DISK_SIZE", 8192) as usize;
    let writers = env("QUEUE_DISK_WRITERS", 8);
    let backlog = env("QUEUE_DISK_BACKLOG", 64);
    let step = env("QUEUE_DISK_STEP", 100_000).max(1);
    let compact_every = env("QUEUE_DISK_COMPACT_EVERY", 0);
    let content: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("data");
    println!(
        "{cycles} cycles of {size} octets, {writers} writers, backlog {backlog} per writer, \
         compact every {compact_every} cycles (0: never)"
    );
    println!("cycles\tdu_MiB\tsled_size_on_disk_MiB\tqueue_len\telapsed_s");
    let started = Instant::now();
    let done = AtomicU64::new(0);
    let mut store = Store::open(&path).expect("open");
    let mut at = 0;
    while at < cycles {
        let n = step.min(cycles - at);
        churn(&store, n, writers, backlog, &content, &done);
        at += n;
        store.flush_blocking().expect("flush");
        if compact_every > 0 && at % compact_every == 0 {
            drop(store);
            let report = Store::compact(&path).expect("compact");
            println!("# compacted: {report:?}");
            store = Store::open(&path).expect("reopen");
        }
        println!(
            "{at}\t{}\t{}\t{}\t{:.1}",
            mib(du(&path)),
            mib(store.disk_size().expect("size")),
            store.queue_len().expect("len"),
            started.elapsed().as_secs_f64()
        );
    }
    drop(store);
    let store = Store::open(&path).expect("reopen");
    println!(
        "reopened\t{}\t{}\t{}",
        mib(du(&path)),
        mib(store.disk_size().expect("size")),
        store.queue_len().expect("len")
    );
    drop(store);
    let report = Store::compact(&path).expect("compact");
    println!("# compacted: {report:?}");
    println!("compacted\t{}", mib(du(&path)));
}
