//! A simple adaptive threadpool that returns a oneshot future.
//!
//! postino: split into one pool per kind of work, see `Pool` and
//! vendor/sled/POSTINO.md.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicBool, Ordering::Relaxed},
        Once,
    },
    thread,
    time::{Duration, Instant},
};

use parking_lot::{const_mutex, Condvar, Mutex};

use crate::{
    debug_delay, warn, Acquire, AtomicUsize, Error, OneShot, Result, SeqCst,
};

// This is lower for CI reasons.
#[cfg(windows)]
const MAX_THREADS: usize = 16;

#[cfg(not(windows))]
const MAX_THREADS: usize = 128;

const DESIRED_WAITING_THREADS: usize = 7;

// postino: 0.34.7 ran every kind of work on one global pool, so work that
// waits could occupy every thread while the work it waits for sat in the
// queue behind it (sled #1412: the segment accountant waits, holding its
// mutex, for a file truncation queued behind log writes that wait for that
// mutex; a `flush_async` waits for log writes queued behind it). As upstream
// did in #1263 and #1269, each kind of work gets threads of its own, and work
// only ever waits for work of a kind that never waits back on it:
//
// - `IO`: log buffer writes (`write_to_log`). They may wait for the segment
//   accountant's mutex, whose holder may wait for a truncation.
// - `TRUNCATE`: one thread for file truncations, which wait for nothing.
// - `BLOCKING`: everything else (`spawn`: `flush_async`, recovery reads),
//   which may wait for log writes.
//
// Each pool keeps 0.34.7's adaptive sizing and its own thread counts.
static IO: Pool = Pool::new("sled-io", DESIRED_WAITING_THREADS, MAX_THREADS);
static BLOCKING: Pool = Pool::new("sled-blocking", 2, MAX_THREADS);
static TRUNCATE: Pool = Pool::new("sled-truncate", 1, 1);

static BROKEN: AtomicBool = AtomicBool::new(false);

type Work = Box<dyn FnOnce() + Send + 'static>;

struct Pool {
    name: &'static str,
    /// Immortal threads started with the pool, and the number of idle
    /// threads below which a deep queue gets another (temporary) one.
    desired_waiting_threads: usize,
    max_threads: usize,
    started: Once,
    waiting_thread_count: AtomicUsize,
    total_thread_count: AtomicUsize,
    spawns: AtomicUsize,
    spawning: AtomicBool,
    queue: Queue,
}

struct Queue {
    cv: Condvar,
    mu: Mutex<VecDeque<Work>>,
}

impl Queue {
    fn recv_timeout(
        &self,
        duration: Duration,
        waiting_thread_count: &AtomicUsize,
    ) -> Option<Work> {
        let mut queue = self.mu.lock();

        let cutoff = Instant::now() + duration;

        while queue.is_empty() {
            waiting_thread_count.fetch_add(1, SeqCst);
            let res = self.cv.wait_until(&mut queue, cutoff);
            waiting_thread_count.fetch_sub(1, SeqCst);
            if res.timed_out() {
                break;
            }
        }

        queue.pop_front()
    }

    fn try_recv(&self) -> Option<Work> {
        let mut queue = self.mu.lock();
        queue.pop_front()
    }

    fn send(&self, work: Work) -> usize {
        let mut queue = self.mu.lock();
        queue.push_back(work);

        let len = queue.len();

        // having held the mutex makes this linearized
        // with the notify below.
        drop(queue);

        self.cv.notify_all();

        len
    }
}

impl Pool {
    const fn new(
        name: &'static str,
        desired_waiting_threads: usize,
        max_threads: usize,
    ) -> Pool {
        Pool {
            name,
            desired_waiting_threads,
            max_threads,
            started: Once::new(),
            waiting_thread_count: AtomicUsize::new(0),
            total_thread_count: AtomicUsize::new(0),
            spawns: AtomicUsize::new(0),
            spawning: AtomicBool::new(false),
            queue: Queue {
                cv: Condvar::new(),
                mu: const_mutex(VecDeque::new()),
            },
        }
    }

    fn start(&'static self) {
        self.started.call_once(|| {
            debug_delay();
            for _ in 0..self.desired_waiting_threads {
                debug_delay();
                if let Err(e) = self.spawn_new_thread(true) {
                    log::error!("failed to initialize threadpool: {:?}", e);
                }
            }
        });
    }

    fn perform_work(&self, is_immortal: bool) {
        let wait_limit = Duration::from_secs(1);

        let mut performed = 0;
        let mut contiguous_overshoots = 0;

        while is_immortal || performed < 5 || contiguous_overshoots < 3 {
            debug_delay();
            let task_res =
                self.queue.recv_timeout(wait_limit, &self.waiting_thread_count);

            if let Some(task) = task_res {
                self.waiting_thread_count.fetch_sub(1, SeqCst);
                (task)();
                self.waiting_thread_count.fetch_add(1, SeqCst);
                performed += 1;
            }

            while let Some(task) = self.queue.try_recv() {
                debug_delay();
                self.waiting_thread_count.fetch_sub(1, SeqCst);
                (task)();
                self.waiting_thread_count.fetch_add(1, SeqCst);
                performed += 1;
            }

            debug_delay();

            let waiting = self.waiting_thread_count.load(Acquire);

            if waiting > self.desired_waiting_threads {
                contiguous_overshoots += 1;
            } else {
                contiguous_overshoots = 0;
            }
        }
    }

    // Create up to max_threads dynamic blocking task worker threads.
    // Dynamic threads will terminate themselves if they don't
    // receive any work after one second.
    fn maybe_spawn_new_thread(&'static self) -> Result<()> {
        debug_delay();
        let total_workers = self.total_thread_count.load(Acquire);
        debug_delay();
        let waiting_threads = self.waiting_thread_count.load(Acquire);

        if waiting_threads >= self.desired_waiting_threads
            || total_workers >= self.max_threads
        {
            return Ok(());
        }

        if !self.spawning.compare_and_swap(false, true, SeqCst) {
            self.spawn_new_thread(false)?;
        }

        Ok(())
    }

    fn spawn_new_thread(&'static self, is_immortal: bool) -> Result<()> {
        if BROKEN.load(Relaxed) {
            return Err(Error::ReportableBug(
                "IO thread unexpectedly panicked. please report \
                this bug on the sled github repo."
                    .to_string(),
            ));
        }

        let spawn_id = self.spawns.fetch_add(1, SeqCst);

        self.total_thread_count.fetch_add(1, SeqCst);
        let spawn_res = thread::Builder::new()
            .name(format!("{}-{}", self.name, spawn_id))
            .spawn(move || {
                self.spawning.store(false, SeqCst);
                debug_delay();
                // as in 0.34.7, where the pool was a static: a panic
                // marks the whole system broken, nothing reuses its state.
                let res = std::panic::catch_unwind(
                    std::panic::AssertUnwindSafe(|| {
                        self.perform_work(is_immortal)
                    }),
                );
                self.total_thread_count.fetch_sub(1, SeqCst);
                if is_immortal || res.is_err() {
                    // IO thread panicked, shut down the system
                    log::error!(
                        "IO thread unexpectedly terminated.
                        please report this error at the sled github repo. {:?}",
                        res
                    );
                    BROKEN.store(true, SeqCst);
                }
            });

        if let Err(e) = spawn_res {
            static E: AtomicBool = AtomicBool::new(false);

            self.spawning.store(false, SeqCst);

            if !E.compare_and_swap(false, true, Relaxed) {
                // only execute this once
                warn!(
                    "Failed to dynamically increase the threadpool size: {:?}.",
                    e,
                )
            }
        }

        Ok(())
    }

    fn spawn<F, R>(&'static self, work: F) -> Result<OneShot<R>>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static + Sized,
    {
        self.start();

        let (promise_filler, promise) = OneShot::pair();
        let task = move || {
            let result = (work)();
            promise_filler.fill(result);
        };

        let depth = self.queue.send(Box::new(task));

        if depth > self.desired_waiting_threads {
            self.maybe_spawn_new_thread()?;
        }

        Ok(promise)
    }
}

/// Spawn a function on the threadpool for work that may block on log
/// writes (never a log write itself: see `write_to_log`).
pub fn spawn<F, R>(work: F) -> Result<OneShot<R>>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static + Sized,
{
    BLOCKING.spawn(work)
}

/// Spawn a log buffer write on the IO threads.
pub fn write_to_log<F, R>(work: F) -> Result<OneShot<R>>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static + Sized,
{
    IO.spawn(work)
}

/// Spawn a file truncation on its own thread: the segment accountant waits
/// for it while holding its mutex, so nothing ahead of it may wait for that.
pub fn truncate<F, R>(work: F) -> Result<OneShot<R>>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static + Sized,
{
    TRUNCATE.spawn(work)
}

// postino: the interleaving of sled #1412 forced by hand. A mutex stands for
// the segment accountant's: this thread holds it, as `SegmentAccountant::
// next` does, while more log writes than the IO pool will ever have threads
// wait for it, and then waits for a truncation. With one shared pool (stock
// 0.34.7) the truncation queues behind the blocked writes and this never
// returns; with a truncation thread of its own it completes.
#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn truncation_runs_while_every_io_thread_waits() {
        let accountant = Arc::new(const_mutex(()));
        let held = accountant.lock();
        let writes: Vec<_> = (0..MAX_THREADS + 8)
            .map(|_| {
                let accountant = accountant.clone();
                write_to_log(move || drop(accountant.lock())).unwrap()
            })
            .collect();
        // Give the pool time to take up every write it will take up.
        thread::sleep(Duration::from_millis(200));
        let (tx, rx) = std::sync::mpsc::channel();
        let truncation = truncate(move || tx.send(()).unwrap()).unwrap();
        let done = rx.recv_timeout(Duration::from_secs(10));
        drop(held);
        assert!(done.is_ok(), "the truncation waited for the log writes");
        truncation.wait().unwrap();
        for write in writes {
            write.wait().unwrap();
        }
    }
}
