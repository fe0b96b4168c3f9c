//! The one test suite every storage backend runs against itself (feature
//! `conformance`). Each check is a `pub async fn` taking a fresh, empty
//! storage and panicking on a broken promise; [`run_all`] runs every check,
//! each on a fresh storage from the caller's factory. The sled store runs
//! it in `src/storage/tests.rs`; another backend calls [`run_all`] from its
//! own tests with a factory that makes a fresh database.
//!
//! The checks use Unix times near the present and two node names, `node-a`
//! and `node-b`, on the one storage (as two nodes share one database).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use super::{Storage, StoreError};
use crate::message::{now_unix, Envelope, MessageId};
use crate::store::{
    verify_password_hash, LocalDelivery, Notice, PasswordScratch, QueueEntry, QueueRecipient,
    QuotaSetting, RecipientState, TraceKind,
};

/// Makes a fresh, empty storage for one check.
pub type Factory<'a> =
    &'a (dyn Fn() -> Pin<Box<dyn Future<Output = Arc<dyn Storage>> + Send>> + Sync);

/// Every check, by name.
pub const CHECKS: &[&str] = &[
    "directory_users_and_passwords",
    "directory_aliases",
    "directory_quotas",
    "intake_local_then_durable",
    "intake_spool_and_dispatch",
    "mailbox_expunge_keeps_uidls",
    "maildrop_lock_is_exclusive",
    "queue_claim_is_exclusive",
    "queue_expired_lease_is_claimable",
    "queue_settle_defers_and_spools_notices",
    "queue_hold_and_release",
    "queue_claim_one",
    "queue_listing_pages",
    "ids_are_unique",
    "history_in_order",
];

/// Runs every check in [`CHECKS`], each on a fresh storage from `fresh`.
pub async fn run_all(fresh: Factory<'_>) {
    for name in CHECKS {
        let s = fresh().await;
        run(name, s.as_ref()).await;
    }
}

/// Runs one check by name.
///
/// # Panics
/// If the check fails, or `name` is not in [`CHECKS`].
pub async fn run(name: &str, s: &dyn Storage) {
    match name {
        "directory_users_and_passwords" => directory_users_and_passwords(s).await,
        "directory_aliases" => directory_aliases(s).await,
        "directory_quotas" => directory_quotas(s).await,
        "intake_local_then_durable" => intake_local_then_durable(s).await,
        "intake_spool_and_dispatch" => intake_spool_and_dispatch(s).await,
        "mailbox_expunge_keeps_uidls" => mailbox_expunge_keeps_uidls(s).await,
        "maildrop_lock_is_exclusive" => maildrop_lock_is_exclusive(s).await,
        "queue_claim_is_exclusive" => queue_claim_is_exclusive(s).await,
        "queue_expired_lease_is_claimable" => queue_expired_lease_is_claimable(s).await,
        "queue_settle_defers_and_spools_notices" => queue_settle_defers_and_spools_notices(s).await,
        "queue_hold_and_release" => queue_hold_and_release(s).await,
        "queue_claim_one" => queue_claim_one(s).await,
        "queue_listing_pages" => queue_listing_pages(s).await,
        "ids_are_unique" => ids_are_unique(s).await,
        "history_in_order" => history_in_order(s).await,
        other => panic!("no conformance check {other}"),
    }
}

fn deliveries(mailboxes: &[&str]) -> Vec<LocalDelivery> {
    mailboxes
        .iter()
        .map(|m| LocalDelivery {
            mailbox: (*m).to_owned(),
            prefix: format!("Delivered-To: {m}\r\n").into_bytes(),
        })
        .collect()
}

fn entry(id: MessageId, due: u64, to: &[&str]) -> QueueEntry {
    QueueEntry {
        id,
        sender: Some("sender@example.test".into()),
        received_at: due,
        next_attempt: due,
        attempts: 0,
        recipients: to
            .iter()
            .map(|a| QueueRecipient {
                address: (*a).to_owned(),
                state: RecipientState::Pending,
            })
            .collect(),
        client: "127.0.0.1".into(),
        warned: false,
        params: None,
    }
}

fn envelope(id: MessageId, size: usize) -> Envelope {
    Envelope {
        id,
        sender: Some("sender@example.test".into()),
        recipients: Vec::new(),
        received_at: now_unix(),
        client: "127.0.0.1".into(),
        helo: "client.test".into(),
        size: size as u64,
        params: None,
    }
}

async fn queued(s: &dyn Storage, due: u64) -> MessageId {
    let id = s.new_id().await.unwrap();
    s.accept_remote(
        &entry(id, due, &["rcpt@remote.test"]),
        b"Subject: q\r\n\r\nq\r\n",
    )
    .await
    .unwrap();
    s.durable().await.unwrap();
    id
}

/// Users: add, look up in any case, passwords through their hash, change,
/// remove.
pub async fn directory_users_and_passwords(s: &dyn Storage) {
    s.add_user("Alice@Example.Test", "secret one")
        .await
        .unwrap();
    assert!(s.is_user("alice@example.test").await.unwrap());
    assert!(s.is_user("ALICE@example.test").await.unwrap());
    assert!(!s.is_user("bob@example.test").await.unwrap());
    assert!(matches!(
        s.add_user("alice@example.test", "x").await,
        Err(StoreError::UserExists(_))
    ));
    let mut scratch = PasswordScratch::new();
    let hash = s.password_hash("alice@example.test").await.unwrap();
    assert!(hash.is_some());
    let check = |hash: Option<&str>, password: &str, scratch: &mut PasswordScratch| {
        verify_password_hash("alice@example.test", hash, password, None, scratch)
    };
    assert!(check(hash.as_deref(), "secret one", &mut scratch));
    assert!(!check(hash.as_deref(), "secret two", &mut scratch));
    s.set_password("alice@example.test", "secret two")
        .await
        .unwrap();
    let hash = s.password_hash("alice@example.test").await.unwrap();
    assert!(check(hash.as_deref(), "secret two", &mut scratch));
    assert!(!check(hash.as_deref(), "secret one", &mut scratch));
    assert_eq!(s.password_hash("bob@example.test").await.unwrap(), None);
    s.add_user("bob@example.test", "b").await.unwrap();
    assert_eq!(
        s.users().await.unwrap(),
        vec!["alice@example.test", "bob@example.test"]
    );
    s.delete_user("alice@example.test").await.unwrap();
    assert!(!s.is_user("alice@example.test").await.unwrap());
    assert!(matches!(
        s.delete_user("alice@example.test").await,
        Err(StoreError::NoSuchUser(_))
    ));
    assert!(matches!(
        s.set_password("alice@example.test", "x").await,
        Err(StoreError::NoSuchUser(_))
    ));
}

/// Aliases: targets accumulate, loops are refused, removal.
pub async fn directory_aliases(s: &dyn Storage) {
    s.add_alias("team@example.test", "a@example.test")
        .await
        .unwrap();
    s.add_alias("team@example.test", "b@remote.test")
        .await
        .unwrap();
    s.add_alias("team@example.test", "a@example.test")
        .await
        .unwrap();
    assert_eq!(
        s.alias("TEAM@example.test").await.unwrap(),
        Some(vec![
            "a@example.test".to_owned(),
            "b@remote.test".to_owned()
        ])
    );
    assert_eq!(s.alias("nobody@example.test").await.unwrap(), None);
    s.add_alias("a@example.test", "c@example.test")
        .await
        .unwrap();
    assert!(matches!(
        s.add_alias("c@example.test", "team@example.test").await,
        Err(StoreError::AliasLoop(_))
    ));
    let all = s.aliases().await.unwrap();
    assert_eq!(
        all.iter().map(|(a, _)| a.as_str()).collect::<Vec<_>>(),
        vec!["a@example.test", "team@example.test"]
    );
    s.delete_alias("team@example.test").await.unwrap();
    assert_eq!(s.alias("team@example.test").await.unwrap(), None);
    assert!(matches!(
        s.delete_alias("team@example.test").await,
        Err(StoreError::NoSuchAlias(_))
    ));
}

/// Quotas: a user's own, usage counted at intake, full when reached.
pub async fn directory_quotas(s: &dyn Storage) {
    s.add_user("q@example.test", "pw").await.unwrap();
    assert_eq!(
        s.quota_setting("q@example.test").await.unwrap(),
        QuotaSetting::Default
    );
    s.set_quota("q@example.test", QuotaSetting::Octets(100))
        .await
        .unwrap();
    assert_eq!(s.quota("q@example.test").await.unwrap(), Some(100));
    assert!(!s.is_full("q@example.test").await.unwrap());
    let id = s.new_id().await.unwrap();
    s.accept_local(id, &[b'x'; 120], &deliveries(&["q@example.test"]))
        .await
        .unwrap();
    s.durable().await.unwrap();
    let usage = s.usage("q@example.test").await.unwrap();
    assert_eq!(usage.messages, 1);
    assert!(usage.octets >= 120);
    assert!(s.is_full("q@example.test").await.unwrap());
    s.set_quota("q@example.test", QuotaSetting::Unlimited)
        .await
        .unwrap();
    assert!(!s.is_full("q@example.test").await.unwrap());
    assert!(matches!(
        s.set_quota("none@example.test", QuotaSetting::Unlimited)
            .await,
        Err(StoreError::NoSuchUser(_))
    ));
}

/// Local intake: one message into two mailboxes, readable after durable;
/// an id is not taken twice.
pub async fn intake_local_then_durable(s: &dyn Storage) {
    let id = s.new_id().await.unwrap();
    let content = b"Subject: hi\r\n\r\nhello\r\n";
    let to = deliveries(&["a@example.test", "b@example.test"]);
    s.accept_local(id, content, &to).await.unwrap();
    s.durable().await.unwrap();
    for d in &to {
        let list = s.maildrop(&d.mailbox).await.unwrap();
        assert_eq!(list.len(), 1, "{}", d.mailbox);
        assert_eq!(list[0].id, id);
        let mut want = d.prefix.clone();
        want.extend_from_slice(content);
        assert_eq!(list[0].size, want.len() as u64);
        assert_eq!(
            s.read_mail(&d.mailbox, list[0].key).await.unwrap(),
            Some(want)
        );
    }
    assert!(s.maildrop("c@example.test").await.unwrap().is_empty());
    assert!(matches!(
        s.accept_local(id, content, &deliveries(&["a@example.test"]))
            .await,
        Err(StoreError::Duplicate(_))
    ));
    let id = s.new_id().await.unwrap();
    assert!(matches!(
        s.accept_local(id, content, &deliveries(&["not an address"]))
            .await,
        Err(StoreError::InvalidAddress(_))
    ));
}

/// The spool: spooled messages are inbound until finished; dispatch steps
/// (local delivery, queueing) repeat harmlessly.
pub async fn intake_spool_and_dispatch(s: &dyn Storage) {
    let id = s.new_id().await.unwrap();
    let content = b"Subject: mixed\r\n\r\nboth\r\n";
    s.spool(&envelope(id, content.len()), content)
        .await
        .unwrap();
    s.durable().await.unwrap();
    assert!(matches!(
        s.spool(&envelope(id, content.len()), content).await,
        Err(StoreError::Duplicate(_))
    ));
    let inbound = s.inbound().await.unwrap();
    assert_eq!(inbound.iter().map(|e| e.id).collect::<Vec<_>>(), vec![id]);
    assert_eq!(s.content(id).await.unwrap().as_deref(), Some(&content[..]));
    let to = deliveries(&["a@example.test"]);
    s.deliver_local(id, &to).await.unwrap();
    s.deliver_local(id, &to).await.unwrap();
    assert_eq!(s.maildrop("a@example.test").await.unwrap().len(), 1);
    let queued = entry(id, now_unix(), &["r@remote.test"]);
    s.enqueue(&queued).await.unwrap();
    s.enqueue(&queued).await.unwrap();
    assert_eq!(s.queue_len().await.unwrap(), 1);
    assert_eq!(
        s.queued_content(id).await.unwrap().as_deref(),
        Some(&content[..])
    );
    s.finish_inbound(id).await.unwrap();
    s.finish_inbound(id).await.unwrap();
    s.durable().await.unwrap();
    assert!(s.inbound().await.unwrap().is_empty());
    // Still readable from where it went.
    let list = s.maildrop("a@example.test").await.unwrap();
    assert!(s
        .read_mail("a@example.test", list[0].key)
        .await
        .unwrap()
        .unwrap()
        .ends_with(content));
    assert!(matches!(
        s.deliver_local(id, &to).await,
        Err(StoreError::NotFound { .. })
    ));
}

/// POP3's view: UIDLs are unique and stay the same across listings and
/// after other messages are expunged; expunging twice deletes once.
pub async fn mailbox_expunge_keeps_uidls(s: &dyn Storage) {
    let mut ids = Vec::new();
    for n in 0..3 {
        let id = s.new_id().await.unwrap();
        let body = format!("Subject: {n}\r\n\r\n{n}\r\n");
        s.accept_local(id, body.as_bytes(), &deliveries(&["u@example.test"]))
            .await
            .unwrap();
        ids.push(id);
    }
    s.durable().await.unwrap();
    let first = s.maildrop("u@example.test").await.unwrap();
    assert_eq!(first.iter().map(|m| m.id).collect::<Vec<_>>(), ids);
    let mut uidls: Vec<_> = first.iter().map(|m| m.uidl.clone()).collect();
    uidls.dedup();
    assert_eq!(uidls.len(), 3, "UIDLs are unique");
    for u in &uidls {
        assert!((1..=70).contains(&u.len()) && u.bytes().all(|b| (0x21..=0x7e).contains(&b)));
    }
    assert_eq!(s.maildrop("u@example.test").await.unwrap(), first);
    let gone = [first[0].key, first[2].key];
    assert_eq!(s.delete_mail("u@example.test", &gone).await.unwrap(), 2);
    assert_eq!(s.delete_mail("u@example.test", &gone).await.unwrap(), 0);
    s.durable().await.unwrap();
    let after = s.maildrop("u@example.test").await.unwrap();
    assert_eq!(after, vec![first[1].clone()], "the rest keeps its UIDL");
    assert_eq!(
        s.read_mail("u@example.test", first[0].key).await.unwrap(),
        None
    );
    assert_eq!(s.usage("u@example.test").await.unwrap().messages, 1);
}

/// RFC 1939's exclusive maildrop lock, whichever node asks.
pub async fn maildrop_lock_is_exclusive(s: &dyn Storage) {
    let held = s
        .lock_maildrop("u@example.test", "node-a")
        .await
        .unwrap()
        .expect("a free maildrop locks");
    assert_eq!(held.mailbox(), "u@example.test");
    assert!(s
        .lock_maildrop("U@Example.Test", "node-b")
        .await
        .unwrap()
        .is_none());
    assert!(s
        .lock_maildrop("u@example.test", "node-a")
        .await
        .unwrap()
        .is_none());
    let other = s
        .lock_maildrop("v@example.test", "node-b")
        .await
        .unwrap()
        .expect("another maildrop is free");
    s.unlock_maildrop(held).await;
    let again = s
        .lock_maildrop("u@example.test", "node-b")
        .await
        .unwrap()
        .expect("free again once unlocked");
    s.unlock_maildrop(again).await;
    s.unlock_maildrop(other).await;
}

/// A claimed entry is one node's: the other claims nothing, and settling
/// ends it.
pub async fn queue_claim_is_exclusive(s: &dyn Storage) {
    let now = now_unix();
    let id = queued(s, now).await;
    let later = queued(s, now + 3600).await;
    let lease = Duration::from_secs(300);
    let a = s.claim_due(now, "node-a", lease, 10).await.unwrap();
    assert_eq!(a.len(), 1, "only the due entry");
    assert_eq!(a[0].entry.id, id);
    assert_eq!(a[0].lease.node, "node-a");
    assert!(a[0].lease.until >= now + 300);
    assert!(s
        .claim_due(now, "node-b", lease, 10)
        .await
        .unwrap()
        .is_empty());
    assert!(s
        .claim_due(now + 10, "node-a", lease, 10)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(s.next_due_time(now).await.unwrap(), Some(now + 3600));
    let mut done = a[0].entry.clone();
    done.recipients[0].state = RecipientState::Delivered {
        reply: crate::store::DeliveryDiagnostic::local("2.0.0", "ok"),
    };
    s.settle(&a[0].lease, &done, true, &[]).await.unwrap();
    s.durable().await.unwrap();
    assert_eq!(s.queue_entry(id).await.unwrap(), None);
    assert_eq!(s.queue_len().await.unwrap(), 1);
    assert!(matches!(
        s.settle(&a[0].lease, &done, true, &[]).await,
        Err(StoreError::LeaseLost { .. } | StoreError::NotFound { .. })
    ));
    assert!(s.queue_entry(later).await.unwrap().is_some());
}

/// A lease that ran out: another node claims the entry, and the first
/// node's settle, renew and unclaim change nothing.
pub async fn queue_expired_lease_is_claimable(s: &dyn Storage) {
    let now = now_unix();
    let id = queued(s, now).await;
    let lease = Duration::from_secs(60);
    let a = s.claim_due(now, "node-a", lease, 10).await.unwrap();
    assert_eq!(a.len(), 1);
    let renewed = s.renew(&a[0].lease, now + 30, lease).await.unwrap();
    assert!(renewed.until >= now + 90);
    assert!(
        s.claim_due(now + 61, "node-b", lease, 10)
            .await
            .unwrap()
            .is_empty(),
        "a renewed lease holds"
    );
    let b = s.claim_due(now + 91, "node-b", lease, 10).await.unwrap();
    assert_eq!(b.len(), 1, "an expired lease is claimable");
    assert_eq!(b[0].entry.id, id);
    assert_ne!(b[0].lease.token, a[0].lease.token);
    // Renewing several at once keeps only the leases still held.
    let kept = s
        .renew_all(&[renewed.clone(), b[0].lease.clone()], now + 91, lease)
        .await
        .unwrap();
    assert_eq!(
        kept.iter().map(|l| l.token).collect::<Vec<_>>(),
        vec![b[0].lease.token]
    );
    assert!(kept[0].until >= now + 151);
    let mut deferred = a[0].entry.clone();
    deferred.next_attempt = now + 7200;
    assert!(matches!(
        s.settle(&renewed, &deferred, false, &[]).await,
        Err(StoreError::LeaseLost { .. })
    ));
    assert!(matches!(
        s.renew(&renewed, now + 92, lease).await,
        Err(StoreError::LeaseLost { .. })
    ));
    s.unclaim(&renewed).await.unwrap();
    assert_eq!(s.queue_entry(id).await.unwrap().unwrap().next_attempt, now);
    // The new holder gives it back: due again, for anyone.
    s.unclaim(&b[0].lease).await.unwrap();
    let c = s.claim_due(now + 92, "node-a", lease, 10).await.unwrap();
    assert_eq!(c.len(), 1);
    s.settle(&c[0].lease, &c[0].entry, true, &[]).await.unwrap();
    assert_eq!(s.queue_len().await.unwrap(), 0);
}

/// A deferring settle moves the entry in time and spools its notices.
pub async fn queue_settle_defers_and_spools_notices(s: &dyn Storage) {
    let now = now_unix();
    let id = queued(s, now).await;
    let a = s
        .claim_due(now, "node-a", Duration::from_secs(300), 10)
        .await
        .unwrap();
    let mut deferred = a[0].entry.clone();
    deferred.attempts = 1;
    deferred.next_attempt = now + 600;
    deferred.warned = true;
    let notice_id = s.new_id().await.unwrap();
    let notice = Notice {
        envelope: Envelope {
            sender: None,
            ..envelope(notice_id, 9)
        },
        content: b"warning\r\n".to_vec(),
    };
    s.settle(&a[0].lease, &deferred, false, std::slice::from_ref(&notice))
        .await
        .unwrap();
    s.durable().await.unwrap();
    assert_eq!(s.queue_entry(id).await.unwrap(), Some(deferred.clone()));
    assert!(s
        .claim_due(now + 1, "node-b", Duration::from_secs(300), 10)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(s.next_due_time(now).await.unwrap(), Some(now + 600));
    let b = s
        .claim_due(now + 600, "node-b", Duration::from_secs(300), 10)
        .await
        .unwrap();
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].entry, deferred);
    let inbound = s.inbound().await.unwrap();
    assert_eq!(inbound.len(), 1);
    assert_eq!(inbound[0].id, notice_id);
    assert_eq!(inbound[0].sender, None);
    assert_eq!(
        s.content(notice_id).await.unwrap().as_deref(),
        Some(&b"warning\r\n"[..])
    );
}

/// A held entry is never claimed; released, it is due again.
pub async fn queue_hold_and_release(s: &dyn Storage) {
    let now = now_unix();
    let id = queued(s, now).await;
    assert!(s.hold(id, now).await.unwrap());
    assert!(!s.hold(id, now).await.unwrap());
    assert!(s.queue_item(id).await.unwrap().unwrap().held);
    assert!(s
        .claim_due(now + 1, "node-a", Duration::from_secs(60), 10)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(s.queue_len().await.unwrap(), 1);
    assert!(s.release(id, now).await.unwrap());
    assert!(!s.release(id, now).await.unwrap());
    let a = s
        .claim_due(now + 1, "node-a", Duration::from_secs(60), 10)
        .await
        .unwrap();
    assert_eq!(a.len(), 1);
    assert!(matches!(
        s.hold(MessageId(u64::MAX - 1), now).await,
        Err(StoreError::NotFound { .. })
    ));
}

/// One entry claimed by id, due or not; never while leased or held.
pub async fn queue_claim_one(s: &dyn Storage) {
    let now = now_unix();
    let id = queued(s, now + 3600).await;
    let lease = Duration::from_secs(7200);
    let a = s
        .claim(id, now, "node-a", lease)
        .await
        .unwrap()
        .expect("claimable");
    assert_eq!(a.entry.id, id);
    assert!(s.claim(id, now, "node-b", lease).await.unwrap().is_none());
    assert!(s
        .claim_due(now + 3600, "node-b", lease, 10)
        .await
        .unwrap()
        .is_empty());
    s.unclaim(&a.lease).await.unwrap();
    assert!(s.hold(id, now).await.unwrap());
    assert!(s.claim(id, now, "node-b", lease).await.unwrap().is_none());
    assert!(s
        .claim(MessageId(u64::MAX - 3), now, "node-b", lease)
        .await
        .unwrap()
        .is_none());
}

/// `postino queue list` pages through the queue in id order.
pub async fn queue_listing_pages(s: &dyn Storage) {
    let now = now_unix();
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(queued(s, now + 60).await);
    }
    let first = s.queue_page(None, 2).await.unwrap();
    let second = s.queue_page(Some(first[1].entry.id), 10).await.unwrap();
    let all: Vec<_> = first.iter().chain(&second).map(|i| i.entry.id).collect();
    assert_eq!(all, ids);
    assert!(first.iter().all(|i| !i.held && i.size > 0));
    assert_eq!(s.oldest_queued().await.unwrap(), Some(now + 60));
    s.remove_queue(ids[0]).await.unwrap();
    assert_eq!(s.queue_len().await.unwrap(), 4);
    let mut changed = s.queue_entry(ids[1]).await.unwrap().unwrap();
    changed.warned = true;
    s.update_queue(&changed).await.unwrap();
    assert!(s.queue_entry(ids[1]).await.unwrap().unwrap().warned);
}

/// Queue ids never repeat.
pub async fn ids_are_unique(s: &dyn Storage) {
    let mut seen = std::collections::HashSet::new();
    for _ in 0..1000 {
        assert!(seen.insert(s.new_id().await.unwrap()));
    }
}

/// A message's history comes back in the order it was recorded.
pub async fn history_in_order(s: &dyn Storage) {
    let id = s.new_id().await.unwrap();
    let now = now_unix();
    s.trace(
        id,
        now,
        TraceKind::Deferred {
            next_attempt: now + 1,
        },
    )
    .await;
    s.trace(id, now + 1, TraceKind::Dequeued).await;
    s.durable().await.unwrap();
    let h = s.history(id).await.unwrap();
    assert_eq!(
        h.iter().map(|e| (e.at, e.what.clone())).collect::<Vec<_>>(),
        vec![
            (
                now,
                TraceKind::Deferred {
                    next_attempt: now + 1
                }
            ),
            (now + 1, TraceKind::Dequeued)
        ]
    );
    assert!(s.history(MessageId(u64::MAX - 2)).await.unwrap().is_empty());
}
