//! The library's stop seam, in process: [`postino::Server::run_until`]
//! returns when the given future completes, after the sessions in progress
//! were served to the end of their command (a message whose DATA was in
//! flight gets its 250 and is in the mailbox) and idle ones were told 421.
//! The signal side (`postino serve`, SIGTERM/SIGINT) is `cli.rs` and
//! `durability.rs`'s; both use the same `Server::run_until`.

use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::support::server::{config_text, Raw};
use crate::support::{accepts_tcp, wait_until};

/// A gate that a store failpoint callback waits at.
#[derive(Default)]
struct Gate {
    open: Mutex<bool>,
    opened: Condvar,
}

impl Gate {
    fn wait(&self) {
        let mut open = self.open.lock().unwrap();
        while !*open {
            // Bounded: a test that forgot to open it must not hang the run.
            let (guard, timeout) = self
                .opened
                .wait_timeout(open, Duration::from_secs(60))
                .unwrap();
            open = guard;
            if timeout.timed_out() {
                return;
            }
        }
    }

    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }
}

/// What the server's thread reports.
enum Event {
    Started(std::net::SocketAddr),
    Stopped { mailbox: usize },
}

#[test]
fn run_until_returns_after_the_session_in_flight_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let config_file = dir.path().join("postino.toml");
    std::fs::write(&config_file, config_text("", "", "", "")).unwrap();
    let config = postino_core::Config::load(&config_file).unwrap();

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (events, event) = mpsc::channel();
    let server_thread = std::thread::spawn(move || {
        let system = actix::System::new();
        system.block_on(async move {
            let server = postino::Server::builder(config).start().await.unwrap();
            // Through the storage seam, as an embedder with any backend would.
            let store = server.storage().clone();
            store.add_user("alice@example.test", "pw").await.unwrap();
            events.send(Event::Started(server.smtp_addrs()[0])).unwrap();
            server
                .run_until(async {
                    let _ = stopped.await;
                })
                .await;
            let mailbox = store.maildrop("alice@example.test").await.unwrap().len();
            events.send(Event::Stopped { mailbox }).unwrap();
        });
    });
    let Ok(Event::Started(smtp)) = event.recv_timeout(Duration::from_secs(120)) else {
        panic!("the server did not start");
    };

    // The message's store write waits at this gate; the test learns that
    // the write has begun (the DATA is in flight) from `reached`.
    let gate = Arc::new(Gate::default());
    let (reached, in_flight) = mpsc::sync_channel::<()>(1);
    {
        let (gate, reached) = (gate.clone(), Mutex::new(reached));
        fail::cfg_callback("store::accept_local", move || {
            let _ = reached.lock().unwrap().try_send(());
            gate.wait();
        })
        .unwrap();
    }

    let mut idle = Raw::connect(smtp);
    assert!(idle.reply().starts_with("220"));
    assert!(idle.cmd("EHLO idle.example").starts_with("250"));

    let mut busy = Raw::connect(smtp);
    assert!(busy.reply().starts_with("220"));
    assert!(busy.cmd("EHLO busy.example").starts_with("250"));
    assert!(busy
        .cmd("MAIL FROM:<bob@sender.example>")
        .starts_with("250"));
    assert!(busy.cmd("RCPT TO:<alice@example.test>").starts_with("250"));
    assert!(busy.cmd("DATA").starts_with("354"));
    busy.send(b"Subject: in flight\r\n\r\nserved to the end\r\n.\r\n");
    let waited = in_flight.recv_timeout(Duration::from_secs(60));
    let _ = fail::cfg("store::accept_local", "off");
    if waited.is_err() {
        gate.open();
        panic!("the message never reached the store");
    }

    // Stop while the message is being stored: the listener closes first…
    stop.send(()).unwrap();
    let closed = wait_until(Duration::from_secs(30), || !accepts_tcp(smtp));
    // …but run_until waits for the session in flight. That is an absence,
    // so it is watched for a bounded while: a stop that did not wait would
    // return within it (it only flushes the store), and the test would fail.
    let early = event.recv_timeout(Duration::from_secs(2));
    gate.open();
    assert!(closed, "the listener was still open after the stop began");
    assert!(
        matches!(early, Err(mpsc::RecvTimeoutError::Timeout)),
        "run_until returned while a message was being stored"
    );

    let reply = busy.reply();
    assert!(reply.starts_with("250"), "the message in flight: {reply}");
    let next = busy.reply();
    assert!(next.starts_with("421 4.3.2"), "then the stop: {next}");
    let told = idle.reply();
    assert!(told.starts_with("421 4.3.2"), "idle session: {told}");

    match event.recv_timeout(Duration::from_secs(60)) {
        Ok(Event::Stopped { mailbox }) => {
            assert_eq!(mailbox, 1, "the 250'd message is in the mailbox")
        }
        _ => panic!("run_until did not return"),
    }
    server_thread.join().unwrap();
}
