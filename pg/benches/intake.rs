//! Intake on PostgreSQL: the group committer (many sessions' messages in
//! one pipelined transaction) against one transaction per message, on a
//! throwaway PostgreSQL (`postino_pg::testing`, default settings: fsync
//! and synchronous_commit on). Prints messages per second, transactions
//! committed per message and round trips per message, counted on the
//! client side (exact: `pg_stat_database.xact_commit` lags by up to the
//! statistics interval, longer than a run).
//!
//! `cargo bench -p postino-pg --bench intake [-- MESSAGES]`

use std::sync::Arc;
use std::time::Instant;

use postino_core::store::LocalDelivery;
use postino_pg::testing::TestCluster;
use postino_pg::{PgOptions, PgStore};
use tokio_postgres::NoTls;

const BODY: &[u8] =
    b"Subject: bench\r\n\r\nA message of about a hundred octets, as a small one is.\r\n";

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

/// The group committer: `sessions` tasks accept `messages` in all.
async fn group(url: &str, sessions: usize, messages: usize) {
    let store = PgStore::open(&PgOptions::new(url, "bench")).unwrap();
    let (commits0, _) = store.group_commits();
    let start = Instant::now();
    let per = messages / sessions;
    let mut tasks = Vec::new();
    for _ in 0..sessions {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let to = vec![LocalDelivery {
                mailbox: "bob@example.test".into(),
                prefix: b"Delivered-To: bob@example.test\r\n".to_vec(),
            }];
            for _ in 0..per {
                let id = store.new_id().await.unwrap();
                store.accept_local(id, BODY, &to).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let took = start.elapsed();
    let n = (per * sessions) as f64;
    let (commits1, _) = store.group_commits();
    // Each batch is one transaction sent as one pipeline (one round trip);
    // ids cost one autocommit `nextval` per 64.
    let id_blocks = (n / 64.0).ceil();
    let db_commits = (commits1 - commits0) as f64 + id_blocks;
    let round_trips = (commits1 - commits0) as f64 + id_blocks;
    println!(
        "group commit   sessions={sessions:3}  {:8.0} msg/s  {:.3} commits/msg  {:.3} round trips/msg  ({} batches)",
        n / took.as_secs_f64(),
        db_commits / n,
        round_trips / n,
        commits1 - commits0
    );
}

/// One transaction per message, `sessions` connections.
async fn per_message(url: &str, sessions: usize, messages: usize) {
    let start = Instant::now();
    let per = messages / sessions;
    let mut tasks = Vec::new();
    for s in 0..sessions {
        let url = url.to_owned();
        tasks.push(tokio::spawn(async move {
            let client = connect(&url).await;
            let insert = client
                .prepare(
                    "INSERT INTO mail (mailbox, id, prefix, size, content) VALUES ($1, $2, $3, $4, $5)",
                )
                .await
                .unwrap();
            for i in 0..per {
                let id = (1_000_000_000 + s * 1_000_000 + i) as i64;
                let prefix: &[u8] = b"Delivered-To: bob@example.test\r\n";
                client.batch_execute("BEGIN").await.unwrap();
                client
                    .execute(
                        &insert,
                        &[&"bob@example.test", &id, &prefix, &((prefix.len() + BODY.len()) as i64), &BODY],
                    )
                    .await
                    .unwrap();
                client.batch_execute("COMMIT").await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let took = start.elapsed();
    let n = (per * sessions) as f64;
    let db_commits = n;
    println!(
        "per message    sessions={sessions:3}  {:8.0} msg/s  {:.3} commits/msg  {:.3} round trips/msg",
        n / took.as_secs_f64(),
        db_commits / n,
        3.0
    );
}

fn main() {
    let messages: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(4000);
    let cluster = Arc::new(TestCluster::start().expect("start a throwaway PostgreSQL"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for sessions in [1, 8, 64] {
        let url = cluster
            .create_database(&format!("group{sessions}"))
            .unwrap();
        rt.block_on(group(&url, sessions, messages));
        let url = cluster
            .create_database(&format!("plain{sessions}"))
            .unwrap();
        // The schema, by opening a store once.
        drop(PgStore::open(&PgOptions::new(&url, "schema")).unwrap());
        rt.block_on(per_message(&url, sessions, messages));
    }
    rt.shutdown_background();
}
