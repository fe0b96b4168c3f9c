//! The PostgreSQL store against a real, throwaway PostgreSQL
//! (`postino_pg::testing`): what only a shared database has to get right —
//! leases between nodes, the cluster-wide maildrop lock, wake-ups, group
//! commit — and export/import with the sled store.

use std::collections::HashSet;
use std::time::Duration;

use postino_core::message::{Envelope, MessageId, RoutedRecipient};
use postino_core::routing::{Route, Target};
use postino_core::store::{LocalDelivery, QueueEntry, QueueRecipient, RecipientState, StoreError};
use postino_pg::testing::TestCluster;
use postino_pg::{PgOptions, PgStore};

/// A cluster with one database, and a node on it.
fn cluster(db: &str) -> (TestCluster, String) {
    let cluster = TestCluster::start().expect("start a throwaway PostgreSQL");
    let url = cluster.create_database(db).expect("createdb");
    (cluster, url)
}

fn node(url: &str, name: &str) -> PgStore {
    PgStore::open(&PgOptions::new(url, name)).expect("open the PostgreSQL store")
}

fn entry(id: MessageId, next_attempt: u64) -> QueueEntry {
    QueueEntry {
        id,
        sender: Some("sender@example.test".into()),
        received_at: 1_700_000_000,
        next_attempt,
        attempts: 0,
        recipients: vec![QueueRecipient {
            address: "rcpt@remote.test".into(),
            state: RecipientState::Pending,
        }],
        client: "127.0.0.1".into(),
        warned: false,
        params: None,
    }
}

/// A 6-octet message `id` from `s@example.test` to the local mailbox
/// `bob@example.test`, as intake spools it.
fn for_bob(id: MessageId) -> Envelope {
    Envelope {
        id,
        sender: Some("s@example.test".into()),
        recipients: vec![RoutedRecipient {
            address: "bob@example.test".into(),
            route: Route::Deliver(vec![Target::Mailbox {
                mailbox: "bob@example.test".into(),
                original: None,
            }]),
        }],
        received_at: 1_700_000_000,
        client: "127.0.0.1".into(),
        helo: "h".into(),
        size: 6,
        params: None,
    }
}

fn local(mailbox: &str) -> Vec<LocalDelivery> {
    vec![LocalDelivery {
        mailbox: mailbox.into(),
        prefix: format!("Delivered-To: {mailbox}\r\n").into_bytes(),
    }]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_never_claim_the_same_entry() {
    let (_cluster, url) = cluster("claims");
    let (a, b) = (node(&url, "a"), node(&url, "b"));
    let mut ids = Vec::new();
    for _ in 0..200 {
        let id = a.new_id().await.unwrap();
        a.accept_remote(&entry(id, 100), b"Subject: x\r\n\r\nbody\r\n")
            .await
            .unwrap();
        ids.push(id);
    }
    // Both nodes claim small batches at once until nothing is left.
    let claim = |store: PgStore, name: &'static str| async move {
        let mut got = Vec::new();
        loop {
            let batch = store
                .claim_due(1_000, name, Duration::from_secs(300), 7)
                .await
                .unwrap();
            if batch.is_empty() {
                return got;
            }
            got.extend(batch.into_iter().map(|(e, c)| {
                assert_eq!(c.node, name);
                e.id
            }));
        }
    };
    let (got_a, got_b) = tokio::join!(
        tokio::spawn(claim(a.clone(), "a")),
        tokio::spawn(claim(b.clone(), "b"))
    );
    let (got_a, got_b) = (got_a.unwrap(), got_b.unwrap());
    let all: HashSet<MessageId> = got_a.iter().chain(&got_b).copied().collect();
    assert_eq!(
        got_a.len() + got_b.len(),
        all.len(),
        "an entry was claimed twice"
    );
    assert_eq!(all, ids.into_iter().collect::<HashSet<_>>());
    assert!(!got_a.is_empty() && !got_b.is_empty(), "both nodes worked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_is_claimed_by_another_node() {
    let (_cluster, url) = cluster("leases");
    let (a, b) = (node(&url, "a"), node(&url, "b"));
    let id = a.new_id().await.unwrap();
    a.accept_remote(&entry(id, 100), b"x\r\n").await.unwrap();
    let lease = Duration::from_secs(60);
    let claimed = a.claim_due(1_000, "a", lease, 10).await.unwrap();
    assert_eq!(claimed.len(), 1);
    let (first, claim_a) = claimed.into_iter().next().unwrap();
    // While a's lease runs, b gets nothing; the queue says when it ends.
    assert!(b.claim_due(1_059, "b", lease, 10).await.unwrap().is_empty());
    assert_eq!(b.next_due_time(1_000).await.unwrap(), None);
    // Once it ran out (a died mid-delivery), b claims the entry.
    let claimed = b.claim_due(1_060, "b", lease, 10).await.unwrap();
    assert_eq!(claimed.len(), 1);
    let (_, claim_b) = &claimed[0];
    assert_ne!(claim_a.token, claim_b.token);
    // a comes back: its lease is lost, and it writes nothing.
    let err = a.settle(&claim_a, &first, true, &[]).await.unwrap_err();
    assert!(matches!(err, StoreError::LeaseLost { .. }), "{err:?}");
    assert!(matches!(
        a.renew(&claim_a, 1_061, lease).await.unwrap_err(),
        StoreError::LeaseLost { .. }
    ));
    assert!(a.queue_entry(id).await.unwrap().is_some());
    // b settles: delivered, gone.
    b.settle(claim_b, &first, true, &[]).await.unwrap();
    assert!(a.queue_entry(id).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_maildrop_lock_is_cluster_wide_and_dies_with_its_connection() {
    let (_cluster, url) = cluster("locks");
    let (a, b) = (node(&url, "a"), node(&url, "b"));
    let held = a.lock_maildrop("Bob@Example.test").await.unwrap();
    let held = held.expect("a takes the lock");
    assert_eq!(held.mailbox(), "bob@example.test");
    assert!(b.lock_maildrop("bob@example.test").await.unwrap().is_none());
    assert!(a.lock_maildrop("bob@example.test").await.unwrap().is_none());
    // Another mailbox is not locked.
    assert!(b
        .lock_maildrop("alice@example.test")
        .await
        .unwrap()
        .is_some());
    // Released by dropping: b may take it (the unlock runs in the
    // background, so wait for it, bounded).
    drop(held);
    let mut relocked = None;
    for _ in 0..200 {
        if let Some(l) = b.lock_maildrop("bob@example.test").await.unwrap() {
            relocked = Some(l);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let relocked = relocked.expect("the lock was released");
    // The node holding it dies: its connection ends, the server releases it.
    let admin = tokio_postgres_admin(&url).await;
    let killed = admin
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_locks \
             WHERE locktype = 'advisory' AND granted AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(killed.len(), 1, "one advisory lock was held");
    let mut taken = false;
    for _ in 0..200 {
        if a.lock_maildrop("bob@example.test").await.unwrap().is_some() {
            taken = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(taken, "a lock whose connection died was not released");
    drop(relocked);
}

/// A plain connection for looking at the server from outside the store.
async fn tokio_postgres_admin(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_wakes_an_idle_node() {
    let (_cluster, url) = cluster("wake");
    let (a, b) = (node(&url, "a"), node(&url, "b"));
    // b may hold a stored wake-up from its listener starting: take it.
    let _ = tokio::time::timeout(Duration::from_millis(200), b.wait_for_work()).await;
    let waiter = tokio::spawn({
        let b = b.clone();
        async move { b.wait_for_work().await }
    });
    let id = a.new_id().await.unwrap();
    a.accept_remote(&entry(id, 100), b"x\r\n").await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("b was woken by a's NOTIFY")
        .unwrap();
    // Users too.
    let users = tokio::spawn({
        let b = b.clone();
        async move { b.wait_for_users().await }
    });
    let _ = tokio::time::timeout(Duration::from_millis(200), b.wait_for_users()).await;
    a.add_user("carol@example.test", "secret").await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), users)
        .await
        .expect("b was told about the new user")
        .unwrap();
    assert!(b.is_user("CAROL@example.test").await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_shares_commits_between_messages() {
    let (_cluster, url) = cluster("group");
    let a = node(&url, "a");
    a.add_user("bob@example.test", "pw").await.unwrap();
    let before = a.commits().await.unwrap();
    let messages = 400;
    let mut tasks = Vec::new();
    for i in 0..messages {
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            let id = a.new_id().await.unwrap();
            let body = format!("Subject: {i}\r\n\r\nbody\r\n");
            a.accept_local(id, body.as_bytes(), &local("bob@example.test"))
                .await
                .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let after = a.commits().await.unwrap();
    let (group_commits, writes) = a.group_commits();
    assert_eq!(writes, messages);
    // Every commit of the database in between, whatever made it (the
    // committer's batches, id blocks, the statistics reads themselves).
    let commits = after - before;
    eprintln!(
        "{messages} messages: {group_commits} group commits, {commits} database commits in all"
    );
    assert!(
        group_commits < messages / 2,
        "{group_commits} commits for {messages} messages: no batching"
    );
    assert_eq!(
        a.maildrop("bob@example.test").await.unwrap().len() as u64,
        messages
    );
}

/// `Intake::durable` sends a barrier, which has no statement: the writes
/// sharing its batch still get their own answers. (Matched by position, a
/// write after a barrier got COMMIT's answer, 0 rows, and its committed
/// message was refused as a duplicate id: a 451 in the three-node test;
/// with several barriers the last writers got no answer at all.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn barriers_in_a_batch_leave_every_write_its_own_answer() {
    use postino_core::storage::Intake;
    let (_cluster, url) = cluster("barrier");
    let a = node(&url, "a");
    let messages = 200;
    let mut tasks = Vec::new();
    for _ in 0..messages {
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            let entry = entry(a.new_id().await.unwrap(), 100);
            // History events share the batches too, in a statement of
            // their own that answers no write.
            a.trace(entry.id, 1, postino_core::store::TraceKind::Dequeued);
            let (barrier, write) = tokio::join!(
                Intake::durable(&a),
                a.accept_remote(&entry, b"Subject: x\r\n\r\nbody\r\n")
            );
            barrier.unwrap();
            write
        }));
    }
    let mut refused = 0;
    for t in tasks {
        if let Err(e) = t.await.unwrap() {
            eprintln!("refused: {e}");
            refused += 1;
        }
    }
    assert_eq!(refused, 0, "writes refused though committed");
    assert_eq!(a.queue_len().await.unwrap(), messages);
    let traced: i64 = tokio_postgres_admin(&url)
        .await
        .query_one("SELECT count(DISTINCT id) FROM trace", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(traced as usize, messages);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_accepted_on_one_node_reads_the_same_on_another() {
    let (_cluster, url) = cluster("mailbox");
    let (a, b) = (node(&url, "a"), node(&url, "b"));
    let id = a.new_id().await.unwrap();
    a.accept_local(
        id,
        b"Subject: hi\r\n\r\nhello\r\n",
        &local("bob@example.test"),
    )
    .await
    .unwrap();
    let (on_a, on_b) = (
        a.maildrop("bob@example.test").await.unwrap(),
        b.maildrop("bob@example.test").await.unwrap(),
    );
    assert_eq!(on_a, on_b);
    assert_eq!(on_b.len(), 1);
    let text = b
        .read_mail("bob@example.test", on_b[0].key)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        text,
        b"Delivered-To: bob@example.test\r\nSubject: hi\r\n\r\nhello\r\n"
    );
    assert_eq!(on_b[0].size, text.len() as u64);
    // Ids from two nodes never collide.
    let mut seen = HashSet::new();
    for _ in 0..100 {
        assert!(seen.insert(a.new_id().await.unwrap()));
        assert!(seen.insert(b.new_id().await.unwrap()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spooled_mail_dispatches_once_whatever_node_repeats_it() {
    let (_cluster, url) = cluster("spool");
    let (a, b) = (node(&url, "a"), node(&url, "b"));
    let id = a.new_id().await.unwrap();
    let envelope = for_bob(id);
    a.spool(&envelope, b"hello\n").await.unwrap();
    assert_eq!(b.inbound().await.unwrap(), vec![envelope.clone()]);
    // Both nodes dispatch it (b recovering while a is at it).
    let deliveries = local("bob@example.test");
    let (ra, rb) = tokio::join!(
        a.deliver_local(id, &deliveries),
        b.deliver_local(id, &deliveries)
    );
    ra.unwrap();
    rb.unwrap();
    let queued = entry(id, 5);
    let (ra, rb) = tokio::join!(a.enqueue(&queued), b.enqueue(&queued));
    ra.unwrap();
    rb.unwrap();
    a.finish_inbound(id).await.unwrap();
    b.finish_inbound(id).await.unwrap();
    assert_eq!(a.maildrop("bob@example.test").await.unwrap().len(), 1);
    assert_eq!(a.queue_len().await.unwrap(), 1);
    assert!(a.inbound().await.unwrap().is_empty());
    // The content outlives the spool record while the mailbox and the
    // queue hold it, and goes with the last of them.
    assert_eq!(
        a.queued_content(id).await.unwrap().as_deref(),
        Some(&b"hello\n"[..])
    );
    a.delete_mail("bob@example.test", &[id.0]).await.unwrap();
    assert!(a.content(id).await.unwrap().is_some());
    a.remove_queue(id).await.unwrap();
    assert!(a.content(id).await.unwrap().is_none());
}

#[test]
fn export_from_sled_import_into_postgres_and_back() {
    let (_cluster, url) = cluster("backup");
    // A sled store with a user, an alias, mail and a queued message.
    let dir = tempfile::tempdir().unwrap();
    let sled = postino_core::Store::open(&dir.path().join("a")).unwrap();
    sled.add_user("bob@example.test", "pw").unwrap();
    sled.add_alias("info@example.test", "bob@example.test")
        .unwrap();
    for i in 0..3 {
        let id = sled.new_id().unwrap();
        sled.accept_local(
            id,
            format!("m{i}\r\n").as_bytes(),
            &local("bob@example.test"),
        )
        .unwrap();
    }
    let queued = sled.new_id().unwrap();
    sled.accept_remote(&entry(queued, 7), b"remote\r\n")
        .unwrap();
    sled.flush_blocking().unwrap();
    let uidls = sled.maildrop("bob@example.test").unwrap();
    let mut export = Vec::new();
    let counts = sled.export(&mut export).unwrap();
    drop(sled);

    let pg = node(&url, "a");
    assert_eq!(pg.import(&mut &export[..]).unwrap(), counts);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        assert_eq!(pg.maildrop("bob@example.test").await.unwrap(), uidls);
        assert!(pg.is_user("bob@example.test").await.unwrap());
        assert_eq!(
            pg.alias("info@example.test").await.unwrap(),
            Some(vec!["bob@example.test".to_string()])
        );
        let e = pg.queue_entry(queued).await.unwrap().unwrap();
        assert_eq!(e.next_attempt, 7);
        assert_eq!(
            pg.queued_content(queued).await.unwrap().as_deref(),
            Some(&b"remote\r\n"[..])
        );
        // New ids start above the imported ones.
        assert!(pg.new_id().await.unwrap() > queued);
    });
    // A second import is refused: the database is not empty.
    assert!(pg.import(&mut &export[..]).is_err());

    // And back into a new sled store, the same again.
    let mut again = Vec::new();
    assert_eq!(pg.export(&mut again).unwrap(), counts);
    let back = dir.path().join("b");
    postino_core::Store::import(&back, &mut &again[..]).unwrap();
    let sled = postino_core::Store::open(&back).unwrap();
    assert_eq!(sled.maildrop("bob@example.test").unwrap(), uidls);
    assert!(sled.verify_password("bob@example.test", "pw").unwrap());
    assert!(sled.queue_entry(queued).unwrap().is_some());
}

#[test]
fn kill_9_of_a_node_loses_nothing_acknowledged() {
    use std::io::BufRead;
    let (_cluster, url) = cluster("killed");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_postino-pg-intake"))
        .args([url.as_str(), "doomed", "16"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    // Let it acknowledge a good number under load, then kill -9 it.
    let mut acked: Vec<u64> = Vec::new();
    while acked.len() < 500 {
        let line = lines.next().expect("the node runs").unwrap();
        acked.push(line.parse().unwrap());
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // What it printed before dying was acknowledged too.
    acked.extend(
        lines
            .map_while(Result::ok)
            .map(|l| l.parse::<u64>().unwrap()),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let other = node(&url, "survivor");
    let stored: HashSet<u64> = rt
        .block_on(other.maildrop("bob@example.test"))
        .unwrap()
        .iter()
        .map(|e| e.key)
        .collect();
    let lost: Vec<_> = acked.iter().filter(|id| !stored.contains(id)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged messages lost: {lost:?}",
        lost.len(),
        acked.len()
    );
    eprintln!("{} acknowledged, {} stored (writes in flight at the kill may have committed unacknowledged)", acked.len(), stored.len());
}

/// The settle of a delivered message: one round trip when the entry holds
/// its own content (a second settle finds it gone), the full transaction
/// when the content is shared (spooled mail, also in a mailbox), which
/// releases it with the last holder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivered_settle_removes_the_entry_with_inline_or_shared_content() {
    let (_cluster, url) = cluster("settle");
    let a = node(&url, "a");
    let lease = Duration::from_secs(60);
    // Inline content: the one-statement path.
    let inline = a.new_id().await.unwrap();
    a.accept_remote(&entry(inline, 100), b"Subject: inline\r\n\r\nx\r\n")
        .await
        .unwrap();
    let (first, claim) = a
        .claim(inline, 1_000, "a", lease)
        .await
        .unwrap()
        .expect("claimed");
    a.settle(&claim, &first, true, &[]).await.unwrap();
    assert!(a.queue_entry(inline).await.unwrap().is_none());
    assert!(matches!(
        a.settle(&claim, &first, true, &[]).await.unwrap_err(),
        StoreError::NotFound { .. } | StoreError::LeaseLost { .. }
    ));
    // Shared content: spooled, delivered locally and queued.
    let id = a.new_id().await.unwrap();
    let envelope = for_bob(id);
    a.spool(&envelope, b"hello\n").await.unwrap();
    a.deliver_local(id, &local("bob@example.test"))
        .await
        .unwrap();
    a.enqueue(&entry(id, 100)).await.unwrap();
    a.finish_inbound(id).await.unwrap();
    let (queued, claim) = a
        .claim(id, 1_000, "a", lease)
        .await
        .unwrap()
        .expect("claimed");
    a.settle(&claim, &queued, true, &[]).await.unwrap();
    assert!(a.queue_entry(id).await.unwrap().is_none());
    // The mailbox still holds the content; it goes with the mailbox entry.
    assert!(a.content(id).await.unwrap().is_some());
    a.delete_mail("bob@example.test", &[id.0]).await.unwrap();
    assert!(a.content(id).await.unwrap().is_none());
}

/// The history events of one group-commit batch go in one statement: each
/// message keeps its events in order, at most `max_events_per_message` of
/// them, the last kept becoming `Truncated` — within one batch, across
/// batches, with several messages interleaved and the cap changed in the
/// middle of a batch. The sled store, given the same events one by one,
/// is the reference, and the plainest case is spelled out as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_events_keep_order_and_cap_within_and_across_batches() {
    use postino_core::storage::Intake;
    use postino_core::store::{TraceKind, TraceLimits, DEFAULT_TRACE_KEEP};
    let (_cluster, url) = cluster("trace");
    let a = node(&url, "a");
    let dir = tempfile::tempdir().unwrap();
    let sled = postino_core::Store::open(dir.path()).unwrap();
    let max = |n: u64| TraceLimits {
        keep: DEFAULT_TRACE_KEEP,
        max_events_per_message: n,
    };
    let routed = |n: usize| TraceKind::Routed {
        recipient: format!("r{n}@example.test"),
        route: "deliver".into(),
    };
    let mut ids = Vec::new();
    for _ in 0..8 {
        ids.push(a.new_id().await.unwrap());
    }
    let [held, one, pre, mixed, exact, capped, singles, chunks] = ids[..] else {
        unreachable!()
    };
    // Every event, to both stores; `at` tells them apart too.
    let mut at = 1_700_000_000;
    let mut trace = |id: MessageId, what: TraceKind| {
        at += 1;
        a.trace(id, at, what.clone());
        sled.trace_at(id, at, what);
    };
    let limit = |n: u64| {
        a.set_trace_limits(n);
        sled.set_trace_limits(max(n));
    };
    limit(5);
    // Two events of `pre` before, in their own batch.
    trace(pre, routed(0));
    trace(pre, routed(1));
    Intake::durable(&a).await.unwrap();

    // One batch: hold the committer on a lock of the trace table with one
    // event, queue the rest behind it, then let go.
    let admin = tokio_postgres_admin(&url).await;
    admin
        .batch_execute("BEGIN; LOCK TABLE trace IN SHARE MODE")
        .await
        .unwrap();
    trace(held, routed(0));
    let mut waited = 0;
    loop {
        let blocked: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE wait_event_type = 'Lock' AND query LIKE 'INSERT INTO trace%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if blocked > 0 {
            break;
        }
        waited += 1;
        assert!(waited < 1000, "the committer never reached the lock");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (commits_before, _) = a.group_commits();
    // 8 events of `one`, 2 more of `pre`, 3 of `mixed` interleaved, exactly
    // 5 of `exact`; then the cap drops to 3 for 2 more of `capped`, which
    // had 2 under the old cap.
    for n in 0..8 {
        trace(one, routed(n));
        if n % 3 == 0 {
            trace(mixed, routed(n));
        }
        if n < 2 {
            trace(pre, routed(n + 2));
        }
        if n < 5 {
            trace(exact, routed(n));
        }
    }
    trace(capped, routed(0));
    trace(capped, routed(1));
    limit(3);
    trace(capped, routed(2));
    trace(capped, routed(3));
    trace(pre, routed(4));
    admin.batch_execute("COMMIT").await.unwrap();
    Intake::durable(&a).await.unwrap();
    let (commits_after, _) = a.group_commits();
    // The held event's batch, then every event queued behind it.
    assert_eq!(
        commits_after - commits_before,
        2,
        "the queued events were not one batch"
    );

    // Several batches: one event each, then three at a time.
    limit(4);
    for n in 0..6 {
        trace(singles, routed(n));
        Intake::durable(&a).await.unwrap();
    }
    for n in 0..9 {
        trace(chunks, routed(n));
        if n % 3 == 2 {
            Intake::durable(&a).await.unwrap();
        }
    }

    let what = |events: Vec<postino_core::store::TraceEvent>| -> Vec<TraceKind> {
        events.into_iter().map(|e| e.what).collect()
    };
    assert_eq!(
        what(a.history(one).await.unwrap()),
        vec![
            routed(0),
            routed(1),
            routed(2),
            routed(3),
            TraceKind::Truncated
        ],
        "8 events in one batch, cap 5"
    );
    assert_eq!(
        what(a.history(capped).await.unwrap()),
        vec![routed(0), routed(1), TraceKind::Truncated],
        "cap 3 from the middle of the batch"
    );
    for (name, id) in [
        ("held", held),
        ("one", one),
        ("pre", pre),
        ("mixed", mixed),
        ("exact", exact),
        ("capped", capped),
        ("singles", singles),
        ("chunks", chunks),
    ] {
        let want = sled.history(id).unwrap();
        assert!(!want.is_empty());
        assert_eq!(a.history(id).await.unwrap(), want, "history of {name}");
    }
}
