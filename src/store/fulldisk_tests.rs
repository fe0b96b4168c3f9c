//! Full-disk tests on a small tmpfs (issue 14): a child process fills the
//! store with local mail, multi-mailbox mail, spooled mail and a churning
//! queue until the disk is full, and is killed with SIGKILL; start attempts
//! follow with 0 bytes free (ours, and sled's own open as postino did it
//! before), then the tmpfs is enlarged and every acknowledged message must
//! read back intact. Mounting needs root: without it the tests print why
//! and pass.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use futures_executor::block_on;

use super::tests::envelope;
use super::*;

/// A tmpfs mounted on a temporary directory, unmounted on drop.
pub(crate) struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `mib` MiB, or says why not and returns `None`.
    pub(crate) fn mount(mib: u64) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("SKIPPED: cannot mount a tmpfs (not root, or no mount permission)");
            return None;
        }
        Some(Tmpfs { dir })
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    pub(crate) fn resize(&self, mib: u64) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={mib}m")])
            .arg(self.dir.path())
            .status()
            .unwrap()
            .success();
        assert!(ok, "remount failed");
    }

    /// Writes a filler file until the file system is full.
    pub(crate) fn fill(&self) -> PathBuf {
        let path = self.path().join("filler");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        let chunk = vec![0u8; 4096];
        while f.write_all(&chunk).is_ok() {}
        // Whatever is left is less than a page: write it byte by byte.
        while f.write_all(&[0]).is_ok() {}
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

const CHILD_DIR: &str = "POSTINO_FULLDISK_CHILD_DIR";

/// Size of message `id`: mostly small, some over sled's blob threshold.
fn size_of(id: u64) -> usize {
    if id % 13 == 0 {
        100_000
    } else {
        300 + (id as usize * 7919) % 20_000
    }
}

fn content_of(id: u64) -> Vec<u8> {
    let line = format!("message {id} line\r\n");
    line.as_bytes()
        .iter()
        .copied()
        .cycle()
        .take(size_of(id))
        .collect()
}

fn entry(id: MessageId, next_attempt: u64) -> QueueEntry {
    QueueEntry {
        id,
        sender: Some("s@local.test".into()),
        received_at: 1,
        next_attempt,
        attempts: 0,
        recipients: vec![QueueRecipient {
            address: "r@remote.test".into(),
            state: RecipientState::Pending,
        }],
        client: "127.0.0.1".into(),
        warned: false,
        params: None,
    }
}

/// Child: writes until the disk is full, printing `<kind> <id>` for each
/// message once durable. The queue churns: every third queued message is
/// "delivered" (removed) and the others are rewritten ("deferred") again
/// and again, as relay mail to a smarthost that defers some.
#[test]
#[ignore = "run by acknowledged_mail_survives_full_disk in a child process"]
fn fulldisk_child() {
    let Some(dir) = std::env::var_os(CHILD_DIR) else {
        return;
    };
    let store = Store::open(Path::new(&dir)).unwrap();
    let mut out = std::io::stdout().lock();
    let mut queued: Vec<MessageId> = Vec::new();
    let mut current = None;
    let result = (|| -> Result<(), StoreError> {
        for n in 0u64.. {
            let id = store.new_id()?;
            current = Some(id);
            let content = content_of(id.0);
            let kind = match n % 5 {
                0 | 1 => {
                    store.accept_local(id, &content, &[mailbox("a@x.test")])?;
                    "local"
                }
                2 => {
                    let to = [mailbox("b@x.test"), mailbox("c@x.test")];
                    store.accept_local(id, &content, &to)?;
                    "multi"
                }
                3 => {
                    store.accept_remote(&entry(id, n), &content)?;
                    queued.push(id);
                    "queue"
                }
                _ => {
                    store.spool(&envelope(id, &["d@x.test"], content.len()), &content)?;
                    "inbound"
                }
            };
            if kind == "queue" && queued.len() % 3 == 0 {
                // Delivered at once: never reported, may be gone.
                let id = queued.pop().expect("just pushed");
                store.remove_queue(id)?;
                block_on(store.durable())?;
                continue;
            }
            for (k, old) in queued.iter().enumerate().rev().take(3) {
                let mut e = entry(*old, n * 10 + k as u64);
                e.attempts = n as u32;
                e.recipients[0].state = RecipientState::Deferred {
                    last_error: crate::store::DeliveryDiagnostic::local(
                        "4.3.0",
                        "try again".repeat(1 + n as usize % 7),
                    ),
                };
                store.update_queue(&e)?;
            }
            block_on(store.durable())?;
            writeln!(out, "acked {kind} {}", id.0).unwrap();
            out.flush().unwrap();
        }
        Ok(())
    })();
    if let Some(id) = current {
        // As the SMTP server does when it answers 451.
        store.reject(id);
        writeln!(out, "rejected {}", id.0).unwrap();
    }
    writeln!(out, "error {result:?}").unwrap();
    out.flush().unwrap();
    // Wait for SIGKILL: dropping the store could hang in sled (see the
    // module docs of `space`).
    loop {
        std::thread::park();
    }
}

fn mailbox(m: &str) -> LocalDelivery {
    LocalDelivery {
        mailbox: m.into(),
        prefix: format!("Delivered-To: {m}\r\n").into_bytes(),
    }
}

/// Runs the child on `dir` until the disk is full; kills it with SIGKILL
/// once it reports an error or makes no progress for a while (sled 0.34
/// can hang on ENOSPC). Returns the acknowledged (kind, id) pairs.
fn fill_with_child(dir: &Path) -> (Vec<(String, u64)>, Option<u64>) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "store::fulldisk_tests::fulldisk_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut acked = Vec::new();
    let mut rejected = None;
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(3)) {
        if let Some(at) = line.find("rejected ") {
            rejected = Some(line[at + 9..].trim().parse().unwrap());
        }
        if line.contains("error ") {
            break;
        }
        if let Some(at) = line.find("acked ") {
            let mut parts = line[at + 6..].split_whitespace();
            let kind = parts.next().unwrap().to_owned();
            acked.push((kind, parts.next().unwrap().parse().unwrap()));
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // Lines written before the kill.
    while let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
        if let Some(at) = line.find("acked ") {
            let mut parts = line[at + 6..].split_whitespace();
            let kind = parts.next().unwrap().to_owned();
            acked.push((kind, parts.next().unwrap().parse().unwrap()));
        }
    }
    (acked, rejected)
}

/// Every acknowledged message reads back with its exact content.
fn assert_all_readable(store: &Store, acked: &[(String, u64)]) {
    for (kind, id) in acked {
        let want = content_of(*id);
        let got: Vec<Vec<u8>> = match kind.as_str() {
            "local" => vec![strip(store.read_mail("a@x.test", *id).unwrap(), "a@x.test")],
            "multi" => ["b@x.test", "c@x.test"]
                .iter()
                .map(|m| strip(store.read_mail(m, *id).unwrap(), m))
                .collect(),
            "queue" => vec![store
                .queued_content(MessageId(*id))
                .unwrap()
                .map(|b| b.to_vec())
                .unwrap_or_else(|| panic!("queued message {id} lost"))],
            "inbound" => vec![store
                .content(MessageId(*id))
                .unwrap()
                .map(|b| b.to_vec())
                .unwrap_or_else(|| panic!("spooled message {id} lost"))],
            other => panic!("unknown kind {other}"),
        };
        for g in got {
            assert!(g == want, "{kind} message {id} reads back changed");
        }
    }
}

fn strip(mail: Option<Vec<u8>>, m: &str) -> Vec<u8> {
    let mail = mail.unwrap_or_else(|| panic!("message lost from {m}"));
    let prefix = format!("Delivered-To: {m}\r\n");
    assert!(mail.starts_with(prefix.as_bytes()));
    mail[prefix.len()..].to_vec()
}

/// Issue 14. Rounds: `POSTINO_FULLDISK_ROUNDS` (default 2; 20 for the
/// long run).
#[test]
fn acknowledged_mail_survives_full_disk() {
    let rounds: usize = std::env::var("POSTINO_FULLDISK_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let mut stale_snapshots = 0;
    let mut rejections = 0;
    for round in 0..rounds {
        let Some(fs) = Tmpfs::mount(12) else { return };
        let dir = fs.path().join("data");
        // A ballast, as the server keeps one: room to record a rejection.
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(space::BALLAST), vec![0u8; 512 * 1024]).unwrap();
        let (acked, rejected) = fill_with_child(&dir);
        assert!(
            acked.len() > 20,
            "round {round}: the child stored too little"
        );
        let filler = fs.fill();
        assert_eq!(space::available(fs.path()).unwrap(), 0);
        for attempt in 0..3 {
            match Store::open(&dir) {
                Err(StoreError::NoSpace { .. }) => {}
                Err(e) => panic!("round {round}: start {attempt} on a full disk: {e}"),
                Ok(_) => panic!("round {round}: opened with 0 bytes free"),
            }
        }
        // sled's own open, as postino opened before this fix: it writes on
        // a full disk, and may fail halfway through.
        let raw = sled::Config::new().path(&dir).open();
        let raw_failed = raw.is_err();
        drop(raw);
        fs.resize(64);
        let stale = std::fs::read_dir(&dir).unwrap().any(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".generating")
        });
        if stale {
            // The cause of issue 14: sled reads the half-written snapshot
            // as the newest one (it reads nothing else before failing).
            let raw = sled::Config::new().path(&dir).open();
            assert!(
                matches!(raw, Err(sled::Error::Corruption { .. })),
                "sled opened a store with a half-written snapshot"
            );
            stale_snapshots += 1;
        }
        let store = Store::open(&dir)
            .unwrap_or_else(|e| panic!("round {round}: start after enlarging: {e}"));
        assert_all_readable(&store, &acked);
        if let Some(id) = rejected {
            assert!(!dir.join("rejected").exists());
            for m in ["a@x.test", "b@x.test", "c@x.test"] {
                assert_eq!(
                    store.read_mail(m, id).unwrap(),
                    None,
                    "rejected {id} in {m}"
                );
            }
            assert_eq!(store.queue_entry(MessageId(id)).unwrap(), None);
            assert!(store.inbound().unwrap().iter().all(|e| e.id.0 != id));
            rejections += 1;
        }
        let report = store.check().unwrap();
        assert!(
            report.problems.is_empty(),
            "round {round}: {:?}",
            report.problems
        );
        eprintln!(
            "round {round}: {} acknowledged messages intact; sled's own open on the full disk {}",
            acked.len(),
            if raw_failed { "failed" } else { "succeeded" }
        );
        drop(store);
        std::fs::remove_file(filler).unwrap();
    }
    eprintln!(
        "{stale_snapshots} of {rounds} rounds left a half-written sled snapshot, Store::open recovered every one; \
         {rejections} rounds ended in a failed write (the others in a hang) whose message was rejected and removed"
    );
}
