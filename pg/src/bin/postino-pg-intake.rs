//! A node that only accepts mail, for the kill -9 test (`tests/pg.rs`):
//! `postino-pg-intake URL NODE SESSIONS` accepts messages for
//! `bob@example.test` from SESSIONS concurrent tasks until killed, and
//! prints each message's id once its write was acknowledged (committed),
//! as the SMTP server's 250 would be.

use std::io::Write;

use postino_core::store::LocalDelivery;
use postino_pg::{PgOptions, PgStore};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, node, sessions] = args.as_slice() else {
        eprintln!("usage: postino-pg-intake URL NODE SESSIONS");
        std::process::exit(2);
    };
    let sessions: usize = sessions.parse().expect("SESSIONS is a number");
    let store =
        PgStore::open(&PgOptions::new(url.as_str(), node.as_str())).expect("open the store");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..sessions {
            let (store, tx) = (store.clone(), tx.clone());
            tokio::spawn(async move {
                let to = [LocalDelivery {
                    mailbox: "bob@example.test".into(),
                    prefix: Vec::new(),
                }];
                loop {
                    let id = store.new_id().await.expect("id");
                    let body = format!("Subject: {id}\r\n\r\nacknowledged\r\n");
                    store
                        .accept_local(id, body.as_bytes(), &to)
                        .await
                        .expect("accept");
                    if tx.send(id.0).is_err() {
                        return;
                    }
                }
            });
        }
        let mut out = std::io::stdout().lock();
        while let Some(id) = rx.recv().await {
            writeln!(out, "{id}").expect("stdout");
            out.flush().expect("stdout");
        }
    });
}
