//! Password checks for POP3 logins and SMTP AUTH: a few dedicated threads
//! fed by a bounded queue, like Dovecot's auth workers.
//!
//! argon2 costs tens of milliseconds of CPU and ~19 MiB of memory per check
//! on purpose. Run on tokio's blocking pool (up to 512 threads), a login
//! flood ran that many checks at once, each allocating and freeing its
//! memory: 100 logins took the server from 10 MB to 1.4 GB of RSS, never
//! given back (why: [`PasswordScratch`]). Here at most `[auth] workers`
//! checks run at once, each thread reusing one scratch, so memory is
//! bounded by the thread count; further checks wait in the queue, and
//! past its bound their connections wait to enqueue (reading nothing more
//! meanwhile). A flood thus slows logins, not mail: the threads run at a
//! lower CPU priority than the connection workers.

use std::sync::{Arc, Mutex};

use postino_core::storage::SharedStorage;
use postino_core::store::{verify_password_hash, LoginCache, PasswordScratch, StoreError};
use tokio::sync::{mpsc, oneshot};

/// Checks waiting per thread before senders have to wait.
const QUEUE_PER_THREAD: usize = 64;

/// Niceness of the checking threads: under a login flood the CPU goes to
/// SMTP and POP3 sessions first (Linux nice values are per thread).
const NICENESS: i32 = 10;

/// Why a password could not be checked (not: the password is wrong).
#[derive(thiserror::Error, Debug)]
#[non_exhaustive]
pub enum CheckError {
    /// The store could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The checking threads are gone (the server is stopping).
    #[error("password checks are not available")]
    Stopped,
}

struct Job {
    user: String,
    /// The stored hash, `None` for no such user (checked all the same).
    hash: Option<String>,
    password: String,
    answer: oneshot::Sender<bool>,
}

/// Handle to the checking threads; clones share them. The threads end when
/// the last handle is dropped.
#[derive(Clone)]
pub struct PasswordChecks {
    queue: mpsc::Sender<Job>,
    store: SharedStorage,
}

impl PasswordChecks {
    /// Starts `threads` checking threads (at least one).
    ///
    /// # Errors
    /// The operating system refused a thread.
    pub fn start(
        store: SharedStorage,
        threads: usize,
        cache: Option<LoginCache>,
    ) -> std::io::Result<PasswordChecks> {
        let cache = Arc::new(cache);
        let threads = threads.max(1);
        let (queue, jobs) = mpsc::channel(threads * QUEUE_PER_THREAD);
        let jobs = Arc::new(Mutex::new(jobs));
        for n in 0..threads {
            let (cache, jobs) = (cache.clone(), jobs.clone());
            std::thread::Builder::new()
                .name(format!("postino-auth-{n}"))
                .spawn(move || work(cache.as_ref().as_ref(), &jobs))?;
        }
        Ok(PasswordChecks { queue, store })
    }

    /// Whether `password` is `user`'s (false for unknown users, after the
    /// same work). Waits for a free thread; while the queue is full, waits
    /// to get into it.
    pub async fn verify(&self, user: String, password: String) -> Result<bool, CheckError> {
        // The lookup is the storage's (async, any backend); the argon2
        // work is the threads'.
        let hash = self.store.password_hash(&user).await?;
        let (answer, answered) = oneshot::channel();
        let job = Job {
            user,
            hash,
            password,
            answer,
        };
        self.queue
            .send(job)
            .await
            .map_err(|_| CheckError::Stopped)?;
        answered.await.map_err(|_| CheckError::Stopped)
    }
}

/// One checking thread: takes jobs until every handle is gone.
fn work(cache: Option<&LoginCache>, jobs: &Mutex<mpsc::Receiver<Job>>) {
    lower_priority();
    let mut scratch = PasswordScratch::new();
    loop {
        // One thread waits in `blocking_recv` while the others wait for the
        // lock; a job wakes the first, which lets go of the lock at once.
        let job = {
            let mut jobs = jobs
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            jobs.blocking_recv()
        };
        let Some(job) = job else { return };
        if job.answer.is_closed() {
            // The client went away while the check waited in line.
            continue;
        }
        let result = verify_password_hash(
            &job.user,
            job.hash.as_deref(),
            &job.password,
            cache,
            &mut scratch,
        );
        let _ = job.answer.send(result);
    }
}

/// Lowers this thread's CPU priority (Linux: nice is per thread).
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority only reads its integer arguments; `who` 0 is the
    // calling thread on Linux.
    unsafe {
        let _ = libc::setpriority(libc::PRIO_PROCESS, 0, NICENESS);
    }
}
