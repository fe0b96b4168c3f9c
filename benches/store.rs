//! Criterion benchmarks of the store on a real disk: messages per second made
//! durable by group commit, with 1, 8 and 32 writer threads at once.
//!
//! Each writer does what an SMTP connection does at the end of DATA: take a
//! new id, write the message (`accept_local` for mail that only goes to a
//! local mailbox, `accept_remote` for mail that only goes to remote
//! recipients, `spool` for everything else), and wait for
//! [`Store::durable`] before it would send the 250. The rate counts messages
//! whose flush has completed, so it is the rate at which 250s can go out.
//!
//! Run with `cargo bench -p postino-core --bench store`. The database lives
//! in a temporary directory (under `$TMPDIR`): point that at the disk you
//! mean to measure.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use futures_executor::block_on;

use postino_core::config::StoreConfig;
use postino_core::message::{now_unix, Envelope, RoutedRecipient};
use postino_core::routing::Route;
use postino_core::storage::{SledStorage, Storage};
use postino_core::store::{LocalDelivery, QueueEntry, QueueRecipient, RecipientState};
use postino_core::Store;

/// Writer threads at once: one session alone, a few, and more sessions than
/// the 20 of the smtp-source load.
const WRITERS: [usize; 3] = [1, 8, 32];

const SIZE: usize = 1024;

/// A 1 KiB message as the session hands it over (with its `Received:`).
fn content() -> Vec<u8> {
    let mut m = b"Received: from client.example.org ([192.0.2.7])\r\n\
        \tby mx.example.test (postino) with ESMTP id 0000000001;\r\n\
        \tSat, 28 Nov 2026 00:00:00 +0000\r\n\
        From: <sender@example.org>\r\n\
        Subject: criterion benchmark message\r\n\
        \r\n"
        .to_vec();
    while m.len() + 80 <= SIZE {
        m.extend((0..78).map(|i| b'a' + (i % 26) as u8));
        m.extend_from_slice(b"\r\n");
    }
    m.extend(std::iter::repeat_n(b'z', SIZE - 2 - m.len()));
    m.extend_from_slice(b"\r\n");
    m
}

fn mailbox(writer: usize) -> String {
    format!("user{writer:05}@example.test")
}

/// One write path: what a writer does for one message, given its number.
type Write = dyn Fn(&Store, usize, &[u8]) + Sync;

fn accept_local(store: &Store, writer: usize, content: &[u8]) {
    accept_local_no_flush(store, writer, content);
    block_on(store.durable()).expect("durable");
}

/// `accept_local` without waiting for a flush: the CPU and lock cost of the
/// write alone, to tell it apart from the flush in the numbers above. Not
/// what a server may do before a 250.
fn accept_local_no_flush(store: &Store, writer: usize, content: &[u8]) {
    let id = store.new_id().expect("id");
    let mailbox = mailbox(writer);
    let delivery = LocalDelivery {
        prefix: format!("Return-Path: <sender@example.org>\r\nDelivered-To: {mailbox}\r\n")
            .into_bytes(),
        mailbox,
    };
    store
        .accept_local(id, content, std::slice::from_ref(&delivery))
        .expect("accept_local");
}

fn accept_remote(store: &Store, writer: usize, content: &[u8]) {
    let id = store.new_id().expect("id");
    let now = now_unix();
    let entry = QueueEntry {
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
    };
    store.accept_remote(&entry, content).expect("accept_remote");
    block_on(store.durable()).expect("durable");
}

fn spool(store: &Store, writer: usize, content: &[u8]) {
    let id = store.new_id().expect("id");
    let mailbox = mailbox(writer);
    let envelope = Envelope {
        id,
        sender: Some("sender@example.org".into()),
        recipients: vec![RoutedRecipient {
            address: mailbox.clone(),
            route: Route::mailbox(mailbox),
        }],
        received_at: now_unix(),
        client: "192.0.2.7".into(),
        helo: "client.example.org".into(),
        size: content.len() as u64,
        params: None,
    };
    store.spool(&envelope, content).expect("spool");
    block_on(store.durable()).expect("durable");
}

/// Runs `iters` messages split over `writers` threads; returns the wall time
/// from the moment they all start to the last one's durable flush.
fn run(store: &Store, writers: usize, iters: u64, write: &Write, content: &[u8]) -> Duration {
    let start = Barrier::new(writers + 1);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..writers)
            .map(|w| {
                let share = iters / writers as u64 + u64::from((w as u64) < iters % writers as u64);
                let start = &start;
                s.spawn(move || {
                    start.wait();
                    for _ in 0..share {
                        write(store, w, content);
                    }
                })
            })
            .collect();
        // Threads are started outside the timed span; only the writes count.
        start.wait();
        let began = Instant::now();
        for h in handles {
            h.join().expect("writer panicked");
        }
        began.elapsed()
    })
}

/// Octets this process has caused to be written to storage (Linux
/// `/proc/self/io`), if the kernel tells.
fn disk_writes() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes: "))
        .and_then(|v| v.trim().parse().ok())
}

fn bench_writes(c: &mut Criterion, name: &str, writer_counts: &[usize], write: &Write) {
    let content = content();
    assert_eq!(content.len(), SIZE);
    let mut group = c.benchmark_group(format!("store/{name}"));
    group.throughput(Throughput::Elements(1));
    // Every iteration is a disk flush or a share of one: flat sampling keeps
    // the sample count low and equal, as criterion advises for slow benches.
    group.sampling_mode(SamplingMode::Flat);
    for &writers in writer_counts {
        // A fresh database each, so one size's leftovers do not slow the next.
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open_configured(dir.path(), &StoreConfig::default()).expect("open");
        let messages = AtomicU64::new(0);
        let flushes_before = store.flush_count();
        let written_before = disk_writes();
        group.bench_function(format!("{writers}_writers"), |b| {
            b.iter_custom(|iters| {
                messages.fetch_add(iters, Ordering::Relaxed);
                run(&store, writers, black_box(iters), write, &content)
            })
        });
        let messages = messages.into_inner();
        let flushes = store.flush_count() - flushes_before;
        if messages > 0 {
            // How well group commit worked (messages made durable per
            // flush), and what sled writes for a 1 KiB message.
            let written = match (written_before, disk_writes()) {
                (Some(before), Some(after)) => format!(
                    ", {:.1} KiB written to disk per message",
                    after.saturating_sub(before) as f64 / 1024.0 / messages as f64
                ),
                _ => String::new(),
            };
            let per_flush = match flushes {
                0 => String::new(),
                n => format!(", {:.1} messages per flush", messages as f64 / n as f64),
            };
            println!(
                "store/{name}/{writers}_writers: {messages} messages, \
                 {flushes} flushes{per_flush}{written}"
            );
        }
        // The store (and its commit thread) goes before its directory.
        drop(store);
        drop(dir);
    }
    group.finish();
}

fn store_accept_local(c: &mut Criterion) {
    bench_writes(c, "accept_local_durable", &WRITERS, &accept_local);
}

fn store_accept_remote(c: &mut Criterion) {
    bench_writes(c, "accept_remote_durable", &WRITERS, &accept_remote);
}

fn store_spool(c: &mut Criterion) {
    bench_writes(c, "spool_durable", &WRITERS, &spool);
}

thread_local! {
    /// The store behind the storage seam, one per store the bench opens.
    static SEAM: std::cell::RefCell<Option<(std::path::PathBuf, SledStorage)>> =
        const { std::cell::RefCell::new(None) };
}

/// `f` over `store` behind the storage seam (`dyn Storage`), as the actors
/// reach it.
fn seam<T>(store: &Store, f: impl FnOnce(&dyn Storage) -> T) -> T {
    SEAM.with(|s| {
        let mut s = s.borrow_mut();
        if s.as_ref().is_none_or(|(p, _)| p != store.path()) {
            *s = Some((store.path().to_owned(), SledStorage::new(store.clone())));
        }
        f(&s.as_ref().expect("set above").1)
    })
}

/// [`accept_local_no_flush`] through the seam: new id and write as
/// `Storage` calls.
fn seam_accept_local_no_flush(store: &Store, writer: usize, content: &[u8]) {
    seam(store, |s| {
        let id = block_on(s.new_id()).expect("id");
        let mailbox = mailbox(writer);
        let delivery = LocalDelivery {
            prefix: format!("Return-Path: <sender@example.org>\r\nDelivered-To: {mailbox}\r\n")
                .into_bytes(),
            mailbox,
        };
        block_on(s.accept_local(id, content, std::slice::from_ref(&delivery)))
            .expect("accept_local");
    })
}

/// [`accept_local`] through the seam, durable included.
fn seam_accept_local(store: &Store, writer: usize, content: &[u8]) {
    seam_accept_local_no_flush(store, writer, content);
    seam(store, |s| block_on(s.durable())).expect("durable");
}

fn seam_accept_local_both(c: &mut Criterion) {
    bench_writes(c, "seam_accept_local_durable", &WRITERS, &seam_accept_local);
    bench_writes(
        c,
        "seam_accept_local_no_flush",
        &[1, 8],
        &seam_accept_local_no_flush,
    );
}

fn store_accept_local_no_flush(c: &mut Criterion) {
    bench_writes(c, "accept_local_no_flush", &[1, 8], &accept_local_no_flush);
}

fn config() -> Criterion {
    // Each message costs a flush or a share of one (~0.1 ms and up): ten
    // samples over a few seconds each keep the whole target at about a
    // minute and a half on a 2-core machine. Command-line flags still win.
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
}

criterion_group! {
    name = benches;
    config = config();
    targets = store_accept_local, store_accept_remote, store_spool, store_accept_local_no_flush,
        seam_accept_local_both
}
criterion_main!(benches);
