//! Store tests, on a real sled database in a temporary directory.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use futures_executor::block_on;

use super::*;
use crate::message::{Envelope, RoutedRecipient};
use crate::routing::Route;

fn open() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    (dir, store)
}

pub(super) fn envelope(id: MessageId, rcpts: &[&str], size: usize) -> Envelope {
    Envelope {
        id,
        sender: Some("sender@remote.test".into()),
        recipients: rcpts
            .iter()
            .map(|r| RoutedRecipient {
                address: (*r).into(),
                route: Route::mailbox(*r),
            })
            .collect(),
        received_at: 1_700_000_000,
        client: "127.0.0.1".into(),
        helo: "client.test".into(),
        size: size as u64,
        params: None,
    }
}

/// Spools `content` under a fresh id and waits for it to be durable.
fn spool(store: &Store, rcpts: &[&str], content: &[u8]) -> MessageId {
    let id = store.new_id().unwrap();
    store
        .spool(&envelope(id, rcpts, content.len()), content)
        .unwrap();
    block_on(store.durable()).unwrap();
    id
}

fn local(mailbox: &str, prefix: &str) -> LocalDelivery {
    LocalDelivery {
        mailbox: mailbox.into(),
        prefix: prefix.as_bytes().to_vec(),
    }
}

fn queue_entry(id: MessageId, next_attempt: u64) -> QueueEntry {
    QueueEntry {
        id,
        sender: Some("sender@example.test".into()),
        received_at: 100,
        next_attempt,
        attempts: 0,
        recipients: vec![QueueRecipient {
            address: "bob@remote.test".into(),
            state: RecipientState::Pending,
        }],
        client: "127.0.0.1".into(),
        warned: false,
        params: None,
    }
}

/// Content is gone exactly when nothing references it: no leaks, no
/// dangling references.
fn assert_refs_consistent(store: &Store) {
    let i = &store.inner;
    let mut expected = std::collections::BTreeMap::<MessageId, u64>::new();
    for k in i.inbound.iter().keys() {
        *expected
            .entry(id_from_key(&k.unwrap()).unwrap())
            .or_default() += 1;
    }
    // Inline content is part of its record and holds no reference.
    for kv in i.queue.iter() {
        let (k, v) = kv.unwrap();
        if !queue::queue_is_inline(&v).unwrap() {
            *expected.entry(id_from_key(&k).unwrap()).or_default() += 1;
        }
    }
    for kv in i.mail.iter() {
        let (k, v) = kv.unwrap();
        if !mail::mail_is_inline(&v) {
            let id = id_from_key(&k[k.len() - 8..]).unwrap();
            *expected.entry(id).or_default() += 1;
        }
    }
    let mut actual = std::collections::BTreeMap::new();
    for kv in i.refs.iter() {
        let (k, v) = kv.unwrap();
        let id = id_from_key(&k).unwrap();
        actual.insert(id, u64::from_be_bytes(v[..8].try_into().unwrap()));
    }
    assert_eq!(actual, expected, "reference counts");
    let content: Vec<_> = store.content_ids().unwrap();
    assert_eq!(
        content,
        expected.keys().copied().collect::<Vec<_>>(),
        "stored content"
    );
}

#[test]
fn addresses_are_checked_and_lower_cased() {
    let cases: &[(&str, Option<&str>)] = &[
        ("alice@example.test", Some("alice@example.test")),
        ("Alice@Example.TEST", Some("alice@example.test")),
        ("alice", None),
        ("@example.test", None),
        ("alice@", None),
        ("a@b@c", None),
        ("a b@example.test", None),
        ("a\0b@example.test", None),
        ("a\r\n@example.test", None),
        ("", None),
    ];
    for (input, want) in cases {
        let got = canonical(input).ok();
        assert_eq!(got.as_deref(), *want, "{input:?}");
    }
    let long = format!("{}@example.test", "a".repeat(MAX_LOCAL_PART + 1));
    assert!(canonical(&long).is_err());
}

#[test]
fn users_crud_and_passwords() {
    let (_dir, store) = open();
    store.add_user("Bob@Example.test", "hunter2").unwrap();
    store.add_user("alice@example.test", "secret").unwrap();
    assert!(matches!(
        store.add_user("bob@example.test", "other"),
        Err(StoreError::UserExists(a)) if a == "bob@example.test"
    ));
    assert!(matches!(
        store.add_user("nobody", "x"),
        Err(StoreError::InvalidAddress(_))
    ));
    assert_eq!(
        store.users().unwrap(),
        vec!["alice@example.test", "bob@example.test"]
    );
    assert!(store.is_user("BOB@example.test").unwrap());
    assert!(!store.is_user("carol@example.test").unwrap());
    assert!(!store.is_user("not an address").unwrap());

    assert!(store
        .verify_password("bob@example.test", "hunter2")
        .unwrap());
    assert!(!store
        .verify_password("bob@example.test", "hunter3")
        .unwrap());
    assert!(!store
        .verify_password("carol@example.test", "hunter2")
        .unwrap());

    store
        .set_password("bob@example.test", "correct horse")
        .unwrap();
    assert!(store
        .verify_password("bob@example.test", "correct horse")
        .unwrap());
    assert!(matches!(
        store.set_password("carol@example.test", "x"),
        Err(StoreError::NoSuchUser(_))
    ));
    // The hash is a PHC argon2id string, never the password.
    let raw = store.inner.users.get("bob@example.test").unwrap().unwrap();
    let record: users::UserRecord = decode("user", &raw).unwrap();
    assert!(
        record.password.starts_with("$argon2id$"),
        "{}",
        record.password
    );

    store.delete_user("alice@example.test").unwrap();
    assert!(matches!(
        store.delete_user("alice@example.test"),
        Err(StoreError::NoSuchUser(_))
    ));
    assert_eq!(store.users().unwrap(), vec!["bob@example.test"]);
    assert!(!Directory::is_user(&store, "alice@example.test").unwrap());
    assert!(Directory::is_user(&store, "bob@example.test").unwrap());
}

#[test]
fn remembered_logins_end_with_the_password() {
    let (_dir, store) = open();
    store.add_user("ann@example.test", "first").unwrap();
    // Off until the server turns it on.
    assert!(store.verify_password("ann@example.test", "first").unwrap());
    assert!(store.verify_password("ann@example.test", "first").unwrap());
    assert_eq!(store.remembered_logins(), 0);

    store.remember_logins(std::time::Duration::from_secs(3600), 2);
    assert!(store.verify_password("ann@example.test", "first").unwrap());
    assert_eq!(store.remembered_logins(), 0, "the first login is verified");
    assert!(store.verify_password("ANN@example.test", "first").unwrap());
    assert_eq!(store.remembered_logins(), 1, "the second is remembered");
    // A wrong password is never let in, nor remembered.
    assert!(!store.verify_password("ann@example.test", "First").unwrap());
    assert!(!store.verify_password("ann@example.test", "first ").unwrap());
    assert_eq!(store.remembered_logins(), 1);
    // A new password ends the old one at once.
    store.set_password("ann@example.test", "second").unwrap();
    assert!(!store.verify_password("ann@example.test", "first").unwrap());
    assert!(store.verify_password("ann@example.test", "second").unwrap());
    assert!(store.verify_password("ann@example.test", "second").unwrap());
    assert_eq!(store.remembered_logins(), 2);
    // So does removing the user.
    store.delete_user("ann@example.test").unwrap();
    assert!(!store.verify_password("ann@example.test", "second").unwrap());
    // Capacity: a third user pushes one of two out, never beyond.
    for (user, password) in [("a@x.test", "pa"), ("b@x.test", "pb"), ("c@x.test", "pc")] {
        store.add_user(user, password).unwrap();
        assert!(store.verify_password(user, password).unwrap());
    }
    assert_eq!(store.inner.auth_cache.get().unwrap().len(), 2);
}

/// An alias that would lead back to itself is refused, naming the chain;
/// the aliases stay as they were.
#[test]
fn alias_loops_are_refused() {
    let (_dir, store) = open();
    store.add_alias("loop1@x.test", "loop2@x.test").unwrap();
    store.add_alias("loop2@x.test", "a@x.test").unwrap();
    match store.add_alias("loop2@x.test", "Loop1@x.test") {
        Err(StoreError::AliasLoop(chain)) => {
            assert_eq!(chain, "loop2@x.test -> loop1@x.test -> loop2@x.test")
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        store.add_alias("self@x.test", "self@x.test"),
        Err(StoreError::AliasLoop(c)) if c == "self@x.test -> self@x.test"
    ));
    // Two ways to one target is no loop.
    store.add_alias("both@x.test", "loop1@x.test").unwrap();
    store.add_alias("both@x.test", "loop2@x.test").unwrap();
    assert_eq!(
        store.alias("loop2@x.test").unwrap(),
        Some(vec!["a@x.test".to_string()])
    );
    assert_eq!(store.alias("self@x.test").unwrap(), None);
}

#[test]
fn aliases_crud() {
    let (_dir, store) = open();
    store
        .add_alias("sales@example.test", "alice@example.test")
        .unwrap();
    store
        .add_alias("Sales@example.test", "x@Remote.test")
        .unwrap();
    store
        .add_alias("sales@example.test", "alice@example.test")
        .unwrap();
    store
        .add_alias("abuse@example.test", "postmaster@example.test")
        .unwrap();
    assert!(matches!(
        store.add_alias("sales@example.test", "nope"),
        Err(StoreError::InvalidAddress(_))
    ));
    assert_eq!(
        store.aliases().unwrap(),
        vec![
            (
                "abuse@example.test".to_string(),
                vec!["postmaster@example.test".to_string()]
            ),
            (
                "sales@example.test".to_string(),
                vec![
                    "alice@example.test".to_string(),
                    "x@remote.test".to_string()
                ]
            ),
        ]
    );
    assert_eq!(
        Directory::alias(&store, "sales@example.test").unwrap(),
        Some(vec![
            "alice@example.test".to_string(),
            "x@remote.test".to_string()
        ])
    );
    store.delete_alias("sales@example.test").unwrap();
    assert!(matches!(
        store.delete_alias("sales@example.test"),
        Err(StoreError::NoSuchAlias(_))
    ));
    assert_eq!(
        Directory::alias(&store, "sales@example.test").unwrap(),
        None
    );
    assert_eq!(store.aliases().unwrap().len(), 1);
}

#[test]
fn spool_deliver_read_delete() {
    let (_dir, store) = open();
    let content = b"Subject: hi\r\n\r\nHello.\r\n";
    let id = spool(&store, &["alice@example.test", "bob@example.test"], content);

    let inbound = store.inbound().unwrap();
    assert_eq!(inbound.len(), 1);
    assert_eq!(inbound[0].id, id);
    assert_eq!(inbound[0].recipients.len(), 2);
    assert_eq!(store.content(id).unwrap().as_deref(), Some(&content[..]));

    let alice_prefix = "Return-Path: <sender@remote.test>\r\nDelivered-To: alice@example.test\r\n";
    let bob_prefix = "Delivered-To: bob@example.test\r\n";
    store
        .deliver_local(
            id,
            &[
                local("alice@example.test", alice_prefix),
                local("Bob@example.test", bob_prefix),
            ],
        )
        .unwrap();
    store.finish_inbound(id).unwrap();
    assert!(store.inbound().unwrap().is_empty());
    assert_refs_consistent(&store);

    for (mailbox, prefix) in [
        ("alice@example.test", alice_prefix),
        ("bob@example.test", bob_prefix),
    ] {
        let drop = store.maildrop(mailbox).unwrap();
        assert_eq!(drop.len(), 1, "{mailbox}");
        let entry = &drop[0];
        assert_eq!(entry.id, id);
        assert_eq!(entry.size, (prefix.len() + content.len()) as u64);
        let mut want = prefix.as_bytes().to_vec();
        want.extend_from_slice(content);
        let got = store.read_mail(mailbox, entry.key).unwrap().unwrap();
        assert_eq!(got, want);
        assert_eq!(got.len() as u64, entry.size);
    }
    assert!(store.maildrop("carol@example.test").unwrap().is_empty());

    let alice = store.maildrop("alice@example.test").unwrap();
    assert_eq!(
        store
            .delete_mail("alice@example.test", &[alice[0].key])
            .unwrap(),
        1
    );
    assert_eq!(
        store
            .delete_mail("alice@example.test", &[alice[0].key])
            .unwrap(),
        0
    );
    assert!(store
        .read_mail("alice@example.test", alice[0].key)
        .unwrap()
        .is_none());
    // Bob's copy still holds the content.
    assert!(store.content(id).unwrap().is_some());
    assert_refs_consistent(&store);

    let bob = store.maildrop("bob@example.test").unwrap();
    store
        .delete_mail("bob@example.test", &[bob[0].key])
        .unwrap();
    assert_eq!(store.content(id).unwrap(), None);
    assert!(store.inner.refs.is_empty());
    assert_refs_consistent(&store);
}

#[test]
fn accept_local_stores_content_once_for_every_mailbox() {
    let (_dir, store) = open();
    let id = store.new_id().unwrap();
    let content = b"Subject: hi\r\n\r\nbody\r\n";
    let deliveries = [
        local("a@example.test", "Delivered-To: a@example.test\r\n"),
        local("B@example.test", "Delivered-To: b@example.test\r\n"),
        // A duplicate mailbox is delivered once.
        local("a@example.test", "Delivered-To: a@example.test\r\n"),
    ];
    store.accept_local(id, content, &deliveries).unwrap();
    futures_executor::block_on(store.durable()).unwrap();
    assert!(
        store.inbound().unwrap().is_empty(),
        "nothing left to dispatch"
    );
    let a = store.maildrop("a@example.test").unwrap();
    let b = store.maildrop("b@example.test").unwrap();
    assert_eq!((a.len(), b.len()), (1, 1));
    let read = store
        .read_mail("a@example.test", a[0].key)
        .unwrap()
        .unwrap();
    assert_eq!(
        read,
        b"Delivered-To: a@example.test\r\nSubject: hi\r\n\r\nbody\r\n"
    );
    assert_eq!(a[0].size as usize, read.len());
    // The id cannot be used twice.
    assert!(matches!(
        store.accept_local(id, content, &deliveries),
        Err(StoreError::Duplicate(_))
    ));
    // The content lives until the last mailbox lets go of it.
    store.delete_mail("a@example.test", &[a[0].key]).unwrap();
    assert!(store.content(id).unwrap().is_some());
    store.delete_mail("b@example.test", &[b[0].key]).unwrap();
    assert!(store.content(id).unwrap().is_none());
    assert_refs_consistent(&store);
}

#[test]
fn accept_remote_queues_in_one_step() {
    let (_dir, store) = open();
    let id = store.new_id().unwrap();
    let content = b"Subject: out\r\n\r\nbody\r\n";
    let entry = queue_entry(id, 500);
    store.accept_remote(&entry, content).unwrap();
    block_on(store.durable()).unwrap();
    assert!(
        store.inbound().unwrap().is_empty(),
        "nothing left to dispatch"
    );
    assert_eq!(store.queue_entry(id).unwrap().as_ref(), Some(&entry));
    assert_eq!(store.queue_len().unwrap(), 1);
    assert_eq!(
        store.queued_content(id).unwrap().as_deref(),
        Some(&content[..])
    );
    assert!(
        store.content_ids().unwrap().is_empty(),
        "inline: no shared content"
    );
    assert!(
        store.due(499, 10).unwrap().is_empty(),
        "not due before its time"
    );
    assert_eq!(store.due(500, 10).unwrap(), vec![entry.clone()]);
    assert_refs_consistent(&store);
    assert!(matches!(
        store.accept_remote(&entry, content),
        Err(StoreError::Duplicate(_))
    ));

    // Deferred: the new state is recorded and the content stays with it.
    let mut later = entry.clone();
    later.attempts = 1;
    later.next_attempt = 900;
    store.settle_queue(&later, false, &[]).unwrap();
    store.update_queue(&later).unwrap();
    assert_eq!(store.queue_entry(id).unwrap().as_ref(), Some(&later));
    assert_eq!(
        store.queued_content(id).unwrap().as_deref(),
        Some(&content[..])
    );
    assert!(store.due(899, 10).unwrap().is_empty());
    assert_eq!(store.due(900, 10).unwrap(), vec![later.clone()]);
    assert_refs_consistent(&store);

    // Delivered: entry, schedule key and content go together.
    store.settle_queue(&later, true, &[]).unwrap();
    assert_eq!(store.queued_content(id).unwrap(), None);
    assert_eq!(store.queue_len().unwrap(), 0);
    assert_eq!(store.next_due_time().unwrap(), None);
    assert!(matches!(
        store.settle_queue(&later, true, &[]),
        Err(StoreError::NotFound { .. })
    ));
    assert_refs_consistent(&store);

    // Bounced: a settlement with a notice takes the transaction path.
    let other = queue_entry(store.new_id().unwrap(), 100);
    store.accept_remote(&other, content).unwrap();
    let notice = Notice {
        envelope: envelope(store.new_id().unwrap(), &["sender@example.test"], 3),
        content: b"dsn".to_vec(),
    };
    store
        .settle_queue(&other, true, std::slice::from_ref(&notice))
        .unwrap();
    assert_eq!(store.queue_len().unwrap(), 0);
    assert_eq!(store.inbound().unwrap(), vec![notice.envelope]);
    assert_refs_consistent(&store);
}

#[test]
fn a_schedule_key_without_its_entry_is_removed() {
    let (_dir, store) = open();
    let kept = queue_entry(store.new_id().unwrap(), 10);
    store.accept_remote(&kept, b"x\r\n").unwrap();
    // What a crash between the two writes of accept_remote leaves.
    let lost = store.new_id().unwrap();
    store
        .inner
        .schedule
        .insert(queue::schedule_key(5, lost), &[])
        .unwrap();
    assert_eq!(store.next_due_time().unwrap(), Some(5));
    assert_eq!(store.due(20, 10).unwrap(), vec![kept.clone()]);
    assert_eq!(store.next_due_time().unwrap(), Some(10));
    assert_eq!(store.queue_len().unwrap(), 1);
}

#[test]
fn a_single_mailbox_gets_the_content_inline() {
    let (_dir, store) = open();
    let id = store.new_id().unwrap();
    let content = b"Subject: hi\r\n\r\nbody\r\n";
    let delivery = [local("A@example.test", "Delivered-To: a@example.test\r\n")];
    store.accept_local(id, content, &delivery).unwrap();
    assert!(store.content_ids().unwrap().is_empty(), "no shared content");
    let drop = store.maildrop("a@example.test").unwrap();
    assert_eq!(drop.len(), 1);
    let read = store
        .read_mail("a@example.test", drop[0].key)
        .unwrap()
        .unwrap();
    assert_eq!(
        read,
        b"Delivered-To: a@example.test\r\nSubject: hi\r\n\r\nbody\r\n"
    );
    assert_eq!(drop[0].size as usize, read.len());
    assert!(matches!(
        store.accept_local(id, content, &delivery),
        Err(StoreError::Duplicate(_))
    ));
    assert_refs_consistent(&store);
    assert_eq!(
        store.delete_mail("a@example.test", &[drop[0].key]).unwrap(),
        1
    );
    assert!(store.maildrop("a@example.test").unwrap().is_empty());
    assert_refs_consistent(&store);
}

#[test]
fn a_version_1_database_is_upgraded() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = sled::open(dir.path()).unwrap();
        let meta = db.open_tree("meta").unwrap();
        meta.insert(META_SCHEMA, &1u32.to_be_bytes()).unwrap();
        meta.insert(META_QUEUE_LEN, &7u64.to_be_bytes()).unwrap();
        db.flush().unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.queue_len().unwrap(), 0, "counted, not read from meta");
    drop(store);
    let db = sled::open(dir.path()).unwrap();
    let meta = db.open_tree("meta").unwrap();
    assert_eq!(
        meta.get(META_SCHEMA).unwrap().as_deref(),
        Some(&SCHEMA_VERSION.to_be_bytes()[..])
    );
    assert_eq!(meta.get(META_QUEUE_LEN).unwrap(), None);
}

#[test]
fn maildrop_is_ordered_and_delete_is_atomic_per_call() {
    let (_dir, store) = open();
    let mut ids = Vec::new();
    for n in 0..5 {
        let id = spool(
            &store,
            &["alice@example.test"],
            format!("message {n}\r\n").as_bytes(),
        );
        store
            .deliver_local(id, &[local("alice@example.test", "")])
            .unwrap();
        store.finish_inbound(id).unwrap();
        ids.push(id);
    }
    let drop = store.maildrop("alice@example.test").unwrap();
    assert_eq!(drop.iter().map(|e| e.id).collect::<Vec<_>>(), ids);
    assert!(drop.windows(2).all(|w| w[0].key < w[1].key));
    let keys: Vec<u64> = drop.iter().step_by(2).map(|e| e.key).collect();
    assert_eq!(store.delete_mail("alice@example.test", &keys).unwrap(), 3);
    let left: Vec<MessageId> = store
        .maildrop("alice@example.test")
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(left, vec![ids[1], ids[3]]);
    assert_refs_consistent(&store);
}

#[test]
fn dispatch_is_idempotent() {
    let (_dir, store) = open();
    let id = spool(&store, &["alice@example.test"], b"x\r\n");
    let deliveries = [local(
        "alice@example.test",
        "Delivered-To: alice@example.test\r\n",
    )];
    store.deliver_local(id, &deliveries).unwrap();
    store.deliver_local(id, &deliveries).unwrap();
    // The same mailbox twice in one call is delivered once too.
    store
        .deliver_local(
            id,
            &[local("bob@example.test", ""), local("BOB@example.test", "")],
        )
        .unwrap();
    assert_eq!(store.maildrop("alice@example.test").unwrap().len(), 1);
    assert_eq!(store.maildrop("bob@example.test").unwrap().len(), 1);

    // The user downloads and deletes the message before dispatch finished;
    // a crash and re-dispatch must not deliver it again.
    let key = store.maildrop("alice@example.test").unwrap()[0].key;
    store.delete_mail("alice@example.test", &[key]).unwrap();
    store.deliver_local(id, &deliveries).unwrap();
    assert!(store.maildrop("alice@example.test").unwrap().is_empty());

    store.enqueue(&queue_entry(id, 10)).unwrap();
    store.enqueue(&queue_entry(id, 10)).unwrap();
    assert_eq!(store.queue_len().unwrap(), 1);
    // Delivered and removed before finish: a repeat does not queue it again.
    store.remove_queue(id).unwrap();
    store.enqueue(&queue_entry(id, 10)).unwrap();
    assert_eq!(store.queue_len().unwrap(), 0);
    assert_refs_consistent(&store);

    store.finish_inbound(id).unwrap();
    store.finish_inbound(id).unwrap();
    assert!(store.inner.progress.is_empty());
    assert_refs_consistent(&store);
    // After finish, dispatching again is a caller bug and says so.
    assert!(matches!(
        store.deliver_local(id, &deliveries),
        Err(StoreError::NotFound {
            what: "inbound",
            ..
        })
    ));
    assert!(matches!(
        store.enqueue(&queue_entry(id, 10)),
        Err(StoreError::NotFound {
            what: "inbound",
            ..
        })
    ));
    // Only bob's copy holds the content now.
    let key = store.maildrop("bob@example.test").unwrap()[0].key;
    store.delete_mail("bob@example.test", &[key]).unwrap();
    assert!(store.content_ids().unwrap().is_empty());
}

#[test]
fn a_bounce_is_spooled_once_per_message() {
    let (_dir, store) = open();
    let original = spool(&store, &["nobody@example.test"], b"original\r\n");
    let mut bounce = envelope(store.new_id().unwrap(), &["sender@remote.test"], 8);
    bounce.sender = None;
    assert!(store
        .spool_bounce(original, &bounce, b"bounce\r\n")
        .unwrap());
    // Re-dispatch after a crash makes a new bounce with a new id: refused.
    let mut again = bounce.clone();
    again.id = store.new_id().unwrap();
    assert!(!store.spool_bounce(original, &again, b"bounce\r\n").unwrap());
    let inbound: Vec<MessageId> = store.inbound().unwrap().iter().map(|e| e.id).collect();
    assert_eq!(inbound, vec![original, bounce.id]);
    assert_eq!(store.content(again.id).unwrap(), None);
    store.finish_inbound(original).unwrap();
    assert!(matches!(
        store.spool_bounce(original, &again, b"bounce\r\n"),
        Err(StoreError::NotFound {
            what: "inbound",
            ..
        })
    ));
    assert_eq!(
        store.content(bounce.id).unwrap().as_deref(),
        Some(&b"bounce\r\n"[..])
    );
    store.finish_inbound(bounce.id).unwrap();
    assert_refs_consistent(&store);
    assert!(store.inner.content.is_empty());
}

#[test]
fn spool_refuses_a_used_id() {
    let (_dir, store) = open();
    let id = spool(&store, &["alice@example.test"], b"one\r\n");
    let again = store.spool(&envelope(id, &["alice@example.test"], 5), b"two\r\n");
    assert!(matches!(again, Err(StoreError::Duplicate(d)) if d == id));
    assert_eq!(store.content(id).unwrap().as_deref(), Some(&b"one\r\n"[..]));
    assert!(matches!(
        store.deliver_local(MessageId(u64::MAX), &[local("alice@example.test", "")]),
        Err(StoreError::NotFound {
            what: "inbound",
            ..
        })
    ));
}

#[test]
fn delete_user_empties_the_mailbox() {
    let (_dir, store) = open();
    store.add_user("alice@example.test", "pw").unwrap();
    for _ in 0..3 {
        let id = spool(&store, &["alice@example.test"], b"hello\r\n");
        store
            .deliver_local(
                id,
                &[
                    local("alice@example.test", ""),
                    local("bob@example.test", ""),
                ],
            )
            .unwrap();
        store.finish_inbound(id).unwrap();
    }
    store.delete_user("alice@example.test").unwrap();
    assert!(store.maildrop("alice@example.test").unwrap().is_empty());
    assert_eq!(store.maildrop("bob@example.test").unwrap().len(), 3);
    assert_refs_consistent(&store);
}

/// Dropping the last handle releases the database at once, so it can be
/// reopened right away (a restart in the same process, or the next test).
/// sled's IO threads used to hold the locked file a moment longer:
/// `reopen_keeps_mail_and_uidls` once failed with `Locked` under load.
#[test]
fn reopen_right_after_drop_is_never_locked() {
    let dir = tempfile::tempdir().unwrap();
    let content = vec![b'x'; 16 * 1024];
    for round in 0..100 {
        let store = Store::open(dir.path()).unwrap_or_else(|e| panic!("round {round}: {e:?}"));
        // Writes and flushes, so that sled's IO threads have work at the end.
        for _ in 0..8 {
            spool(&store, &["alice@example.test"], &content);
        }
        drop(store);
    }
}

#[test]
fn reopen_keeps_mail_and_uidls() {
    let dir = tempfile::tempdir().unwrap();
    let (drop_before, pending, epoch) = {
        let store = Store::open(dir.path()).unwrap();
        for n in 0..3 {
            let id = spool(
                &store,
                &["alice@example.test"],
                format!("m{n}\r\n").as_bytes(),
            );
            store
                .deliver_local(id, &[local("alice@example.test", "X-Test: 1\r\n")])
                .unwrap();
            store.finish_inbound(id).unwrap();
        }
        let pending = spool(&store, &["alice@example.test"], b"later\r\n");
        (
            store.maildrop("alice@example.test").unwrap(),
            pending,
            store.inner.uidl_epoch,
        )
    };
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.inner.uidl_epoch, epoch);
    let drop_after = store.maildrop("alice@example.test").unwrap();
    assert_eq!(drop_after, drop_before);
    for e in &drop_after {
        assert!((1..=70).contains(&e.uidl.len()), "{}", e.uidl);
        assert!(
            e.uidl.bytes().all(|b| (0x21..=0x7e).contains(&b)),
            "{}",
            e.uidl
        );
    }
    let uidls: std::collections::HashSet<_> = drop_after.iter().map(|e| &e.uidl).collect();
    assert_eq!(uidls.len(), drop_after.len());
    assert_eq!(
        store
            .inbound()
            .unwrap()
            .iter()
            .map(|e| e.id)
            .collect::<Vec<_>>(),
        vec![pending]
    );
    assert!(store.new_id().unwrap() > pending);
    assert_refs_consistent(&store);

    // A database made anew gets other UIDLs for the same ids.
    let other_dir = tempfile::tempdir().unwrap();
    let other = Store::open(other_dir.path()).unwrap();
    assert_ne!(other.inner.uidl_epoch, epoch);
}

#[test]
fn a_second_open_reports_the_lock() {
    let (dir, _store) = open();
    let err = Store::open(dir.path()).unwrap_err();
    assert!(matches!(err, StoreError::Locked { .. }), "{err:?}");
    assert!(
        err.to_string().contains("locked by another process"),
        "{err}"
    );
}

#[test]
fn queue_schedule() {
    let (_dir, store) = open();
    // (next_attempt, id) for five queued messages, out of time order.
    let mut queued = Vec::new();
    for at in [50u64, 10, 30, 10, 70] {
        let id = spool(
            &store,
            &["bob@remote.test"],
            format!("to bob at {at}\r\n").as_bytes(),
        );
        store.enqueue(&queue_entry(id, at)).unwrap();
        store.finish_inbound(id).unwrap();
        queued.push((at, id));
    }
    assert_eq!(store.queue_len().unwrap(), 5);
    assert_eq!(store.queue().unwrap().len(), 5);
    assert_eq!(store.next_due_time().unwrap(), Some(10));
    let due = |now, limit| -> Vec<(u64, MessageId)> {
        store
            .due(now, limit)
            .unwrap()
            .iter()
            .map(|e| (e.next_attempt, e.id))
            .collect()
    };
    let mut sorted = queued.clone();
    sorted.sort();
    assert_eq!(due(5, 10), vec![]);
    assert_eq!(due(10, 10), sorted[..2].to_vec());
    assert_eq!(due(30, 10), sorted[..3].to_vec());
    assert_eq!(due(30, 1), sorted[..1].to_vec());
    assert_eq!(due(u64::MAX, 100), sorted);

    // A failed attempt moves the entry to later.
    let (_, first) = sorted[0];
    let mut entry = store.queue_entry(first).unwrap().unwrap();
    entry.attempts += 1;
    entry.next_attempt = 60;
    entry.recipients[0].state = RecipientState::Deferred {
        last_error: crate::store::DeliveryDiagnostic::reply(
            None,
            &crate::smtp::Reply::new(451, "4.3.0", "try later"),
        ),
    };
    store.update_queue(&entry).unwrap();
    assert_eq!(store.queue_entry(first).unwrap(), Some(entry.clone()));
    assert_eq!(due(30, 10), sorted[1..3].to_vec());
    assert_eq!(due(60, 10).last(), Some(&(60, first)));
    assert_eq!(store.inner.schedule.len(), 5);

    // Delivered: removed, content released (the inbound record is finished).
    store.remove_queue(first).unwrap();
    store.remove_queue(first).unwrap();
    assert_eq!(store.queue_entry(first).unwrap(), None);
    assert_eq!(store.content(first).unwrap(), None);
    assert_eq!(store.queue_len().unwrap(), 4);
    assert!(matches!(
        store.update_queue(&entry),
        Err(StoreError::NotFound { what: "queue", .. })
    ));
    assert_eq!(due(u64::MAX, 100).len(), 4);
    assert_refs_consistent(&store);
    for (_, id) in &queued {
        store.remove_queue(*id).unwrap();
    }
    assert_eq!(store.next_due_time().unwrap(), None);
    assert_eq!(store.queue_len().unwrap(), 0);
    assert!(store.inner.content.is_empty());
}

#[test]
fn queue_len_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        for at in [1, 2] {
            let id = spool(&store, &["bob@remote.test"], b"x\r\n");
            store.enqueue(&queue_entry(id, at)).unwrap();
        }
    }
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.queue_len().unwrap(), 2);
}

/// Opens a store with a commit delay, without load yet.
fn delayed(delay: std::time::Duration) -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let settings = crate::config::StoreConfig {
        commit_delay: delay,
        background_flush: std::time::Duration::ZERO,
        ..Default::default()
    };
    let store = Store::open_configured(dir.path(), &settings).unwrap();
    (dir, store)
}

/// `callers` threads write a message each, then all ask for a flush at once.
fn flush_together(store: &Store, callers: usize) {
    let barrier = std::sync::Barrier::new(callers);
    std::thread::scope(|s| {
        for n in 0..callers {
            let (store, barrier) = (store.clone(), &barrier);
            s.spawn(move || {
                let id = store.new_id().unwrap();
                let content = format!("message {n}\r\n");
                store
                    .spool(
                        &envelope(id, &["a@example.test"], content.len()),
                        content.as_bytes(),
                    )
                    .unwrap();
                barrier.wait();
                block_on(store.durable()).unwrap();
            });
        }
    });
}

/// With a commit delay, callers that ask while the delay runs share one
/// flush, which starts no sooner than the delay after the last one...
#[test]
fn commit_delay_spaces_flushes_and_batches_callers() {
    // Long enough that every caller has asked before it is over, even on a
    // machine busy with the other tests' argon2 hashing.
    let delay = std::time::Duration::from_secs(2);
    let (_dir, store) = delayed(delay);
    let flushed_at = std::time::Instant::now();
    store.pretend_under_load();
    let first = store.flush_count();
    flush_together(&store, commit::FULL_BATCH as usize - 3);
    assert!(
        flushed_at.elapsed() >= delay,
        "the next flush waited for the delay"
    );
    assert_eq!(store.flush_count(), first + 1, "one flush for all");
}

/// A lone writer, each flush serving only itself, never waits.
#[test]
fn a_lone_writer_does_not_wait_for_the_commit_delay() {
    let (_dir, store) = delayed(std::time::Duration::from_secs(30));
    let started = std::time::Instant::now();
    for n in 0..5 {
        spool(
            &store,
            &["a@example.test"],
            format!("message {n}\r\n").as_bytes(),
        );
    }
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "a lone writer waited out the 30 s delay"
    );
    assert_eq!(store.flush_count(), 5);
}

/// ...unless a full batch is waiting: then it starts at once.
#[test]
fn a_full_batch_does_not_wait_for_the_commit_delay() {
    let (_dir, store) = delayed(std::time::Duration::from_secs(30));
    store.pretend_under_load();
    let first = store.flush_count();
    let flushed_at = std::time::Instant::now();
    flush_together(&store, commit::FULL_BATCH as usize);
    assert!(
        flushed_at.elapsed() < std::time::Duration::from_secs(20),
        "a full batch waited out the 30 s delay"
    );
    assert_eq!(store.flush_count(), first + 1, "one flush for all");
}

#[test]
fn group_commit_serves_every_caller_with_a_later_flush() {
    const THREADS: usize = 8;
    const CALLS: usize = 50;
    let (_dir, store) = open();
    let served: Vec<(u64, u64)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let store = store.clone();
                s.spawn(move || {
                    let mut served = Vec::new();
                    for n in 0..CALLS {
                        let id = store.new_id().unwrap();
                        let content = format!("thread {t} message {n}\r\n");
                        store
                            .spool(
                                &envelope(id, &["a@example.test"], content.len()),
                                content.as_bytes(),
                            )
                            .unwrap();
                        let before = store.flush_count();
                        let durable = store.durable();
                        served.push((durable.ticket(), durable.started_before));
                        block_on(durable).unwrap();
                        assert!(store.flush_count() > before);
                    }
                    served
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert_eq!(served.len(), THREADS * CALLS);
    assert_eq!(store.inbound().unwrap().len(), THREADS * CALLS);
    let log = store.flush_log();
    for (ticket, started_before) in served {
        // The flush that covered this ticket began after the ticket was
        // issued, hence after the caller's writes.
        assert!(
            log.iter()
                .any(|&(start, covered)| start > started_before && covered >= ticket),
            "ticket {ticket} (issued after {started_before} flush starts) not covered: {log:?}"
        );
    }
    // Batching happened: fewer flushes than callers (each caller waits for
    // its own flush otherwise).
    eprintln!("{} callers, {} flushes", THREADS * CALLS, log.len());
    assert!(log.len() <= THREADS * CALLS);
}

#[test]
fn durable_works_across_executors_and_after_drop() {
    let (_dir, store) = open();
    // No writes: still resolves (an empty flush).
    block_on(store.durable()).unwrap();
    // A future outliving every Store clone is still served.
    let id = store.new_id().unwrap();
    store
        .spool(&envelope(id, &["a@example.test"], 1), b"x")
        .unwrap();
    let pending = store.durable();
    drop(store);
    block_on(pending).unwrap();
    // Many futures polled together on one executor.
    let (_dir2, store) = open();
    let futures: Vec<Durable> = (0..100).map(|_| store.durable()).collect();
    block_on(async {
        for f in futures {
            f.await.unwrap();
        }
    });
    assert!(store.flush_count() >= 1);
}

const CRASH_DIR: &str = "POSTINO_STORE_CRASH_DIR";

/// Child half of `acknowledged_mail_survives_abort`: spools, prints the id
/// of each message once durable() resolved, then dies without any cleanup.
#[test]
#[ignore = "run by acknowledged_mail_survives_abort in a child process"]
fn crash_child() {
    let Some(dir) = std::env::var_os(CRASH_DIR) else {
        return;
    };
    // sled's own periodic flush is off: only durable() makes data durable.
    let store =
        Store::open_with(Path::new(&dir), sled::Config::new().flush_every_ms(None)).unwrap();
    let mut out = std::io::stdout().lock();
    for n in 0..40 {
        let id = store.new_id().unwrap();
        let content = format!("message {n}\r\n").repeat(n * 10 + 1);
        store
            .spool(
                &envelope(id, &["a@example.test"], content.len()),
                content.as_bytes(),
            )
            .unwrap();
        block_on(store.durable()).unwrap();
        use std::io::Write;
        writeln!(out, "acked {}", id.0).unwrap();
        out.flush().unwrap();
    }
    // Written but never acknowledged: may or may not survive.
    let id = store.new_id().unwrap();
    store
        .spool(&envelope(id, &["a@example.test"], 1), b"x")
        .unwrap();
    std::process::abort();
}

#[test]
fn acknowledged_mail_survives_abort() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "store::tests::crash_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CRASH_DIR, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let acked: Vec<MessageId> = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok)
        // libtest may print "test ... " on the same line as the first one.
        .filter_map(|l| {
            let at = l.find("acked ")?;
            Some(MessageId(l[at + 6..].trim().parse().unwrap()))
        })
        .collect();
    let status = child.wait().unwrap();
    assert!(!status.success(), "the child must die by abort");
    assert_eq!(acked.len(), 40, "the child did not get through its work");
    let store = Store::open(dir.path()).unwrap();
    let inbound: Vec<MessageId> = store.inbound().unwrap().iter().map(|e| e.id).collect();
    for (n, id) in acked.iter().enumerate() {
        assert!(inbound.contains(id), "acknowledged message {id} lost");
        let content = store.content(*id).unwrap().expect("content");
        assert_eq!(
            content.len(),
            format!("message {n}\r\n").len() * (n * 10 + 1)
        );
    }
    assert_refs_consistent(&store);
}

/// Measures disk use under a churn of spool → deliver → finish → delete
/// of 1 KiB messages (sled #1333: space is not reclaimed under
/// insert-then-delete), once with each message deleted at once and once with
/// a backlog of undownloaded messages (the oldest deleted as each new one
/// arrives). Run with
/// `cargo test -p postino-core --lib store::tests::churn -- --ignored --nocapture`;
/// `POSTINO_CHURN_CYCLES` (default 20,000) and `POSTINO_CHURN_BACKLOG`
/// (default 1,000) change the shape.
#[test]
#[ignore = "measurement, prints numbers"]
fn churn_disk_growth() {
    let env = |name: &str, default: usize| -> usize {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let cycles = env("POSTINO_CHURN_CYCLES", 20_000);
    for backlog in [0, env("POSTINO_CHURN_BACKLOG", 1_000)] {
        churn(cycles, backlog);
    }
}

fn churn(cycles: usize, backlog: usize) {
    let dir = tempfile::tempdir().unwrap();
    let content = vec![b'x'; 1024];
    let mb = |b: u64| b as f64 / (1024.0 * 1024.0);
    let started = std::time::Instant::now();
    println!("{cycles} cycles of 1 KiB, backlog {backlog}");
    println!("cycles  size_on_disk_MiB  files_MiB");
    {
        let store = Store::open(dir.path()).unwrap();
        let mut live = std::collections::VecDeque::new();
        for n in 1..=cycles {
            let id = spool(&store, &["alice@example.test"], &content);
            store
                .deliver_local(
                    id,
                    &[local(
                        "alice@example.test",
                        "Delivered-To: alice@example.test\r\n",
                    )],
                )
                .unwrap();
            store.finish_inbound(id).unwrap();
            live.push_back(id);
            if live.len() > backlog {
                let old = live.pop_front().unwrap();
                store.delete_mail("alice@example.test", &[old.0]).unwrap();
            }
            if n % (cycles / 10).max(1) == 0 {
                println!(
                    "{n:>6}  {:>16.2}  {:>9.2}",
                    mb(store.disk_size().unwrap()),
                    mb(dir_size(dir.path()))
                );
            }
        }
        let keys: Vec<u64> = live.iter().map(|id| id.0).collect();
        store.delete_mail("alice@example.test", &keys).unwrap();
        store.flush_blocking().unwrap();
        assert!(store.inner.content.is_empty());
        println!(
            "emptied: size_on_disk {:.2} MiB; elapsed {:.1?}",
            mb(store.disk_size().unwrap()),
            started.elapsed()
        );
    }
    let store = Store::open(dir.path()).unwrap();
    println!(
        "after reopen: size_on_disk {:.2} MiB, files {:.2} MiB",
        mb(store.disk_size().unwrap()),
        mb(dir_size(dir.path()))
    );
}

fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        total += if meta.is_dir() {
            dir_size(&entry.path())
        } else {
            meta.len()
        };
    }
    total
}

/// Measures spool + durable throughput of 1 KiB messages with several
/// concurrent writers (each waits for durable() before its next message,
/// as an SMTP connection does). Run with `--ignored --nocapture`.
#[test]
#[ignore = "measurement, prints numbers"]
fn group_commit_throughput() {
    for writers in [1usize, 8, 32] {
        let (_dir, store) = open();
        let per_writer = 4000 / writers;
        let content = vec![b'x'; 1024];
        let started = std::time::Instant::now();
        std::thread::scope(|s| {
            for _ in 0..writers {
                let (store, content) = (store.clone(), &content);
                s.spawn(move || {
                    for _ in 0..per_writer {
                        spool(&store, &["a@example.test"], content);
                    }
                });
            }
        });
        let elapsed = started.elapsed();
        let total = per_writer * writers;
        println!(
            "{writers:>2} writers: {total} messages in {elapsed:.2?} = {:.0}/s, {} flushes ({:.1} messages per flush)",
            total as f64 / elapsed.as_secs_f64(),
            store.flush_count(),
            total as f64 / store.flush_count() as f64
        );
    }
    // The same writes without waiting for durability: the cost of the
    // transactions alone.
    for writers in [1usize, 8] {
        let (_dir, store) = open();
        let per_writer = 8000 / writers;
        let content = vec![b'x'; 1024];
        let started = std::time::Instant::now();
        std::thread::scope(|s| {
            for _ in 0..writers {
                let (store, content) = (store.clone(), &content);
                s.spawn(move || {
                    for _ in 0..per_writer {
                        let id = store.new_id().unwrap();
                        let e = envelope(id, &["a@example.test"], content.len());
                        store.spool(&e, content).unwrap();
                    }
                });
            }
        });
        store.flush_blocking().unwrap();
        let elapsed = started.elapsed();
        let total = per_writer * writers;
        println!(
            "{writers:>2} writers, no durable(): {total} messages in {elapsed:.2?} = {:.0}/s",
            total as f64 / elapsed.as_secs_f64()
        );
    }
}

const STALL_DIR: &str = "POSTINO_STALL_CHILD_DIR";

/// Run by `a_stuck_flush_aborts_the_process` in a child process.
#[test]
#[ignore = "run as a child process by a_stuck_flush_aborts_the_process"]
fn stall_child() {
    let Some(dir) = std::env::var_os(STALL_DIR) else {
        return;
    };
    let settings = crate::config::StoreConfig {
        stall_abort: std::time::Duration::from_millis(100),
        ..Default::default()
    };
    let store = Store::open_configured(Path::new(&dir), &settings).unwrap();
    store.pretend_flush_is_stuck();
    // The watchdog must end the process well before this.
    std::thread::sleep(std::time::Duration::from_secs(30));
    println!("still alive");
}

#[test]
fn a_stuck_flush_aborts_the_process() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "store::tests::stall_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(STALL_DIR, dir.path())
        .stderr(Stdio::null())
        .output()
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(6), "SIGABRT expected: {out:?}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("still alive"));
}

/// A store with a user, an alias, mail for one and for two mailboxes, a
/// queued message and a spooled one.
fn populated() -> (tempfile::TempDir, Store, MessageId) {
    let (dir, store) = open();
    store.add_user("a@x.test", "pw").unwrap();
    store.add_alias("info@x.test", "a@x.test").unwrap();
    let one = store.new_id().unwrap();
    store
        .accept_local(one, b"one\r\n", &[local("a@x.test", "P: a\r\n")])
        .unwrap();
    let two = store.new_id().unwrap();
    store
        .accept_local(
            two,
            b"two\r\n",
            &[local("a@x.test", "P: a\r\n"), local("b@x.test", "P: b\r\n")],
        )
        .unwrap();
    let q = store.new_id().unwrap();
    store
        .accept_remote(&queue_entry(q, 5), b"queued\r\n")
        .unwrap();
    spool(&store, &["c@x.test"], b"spooled\r\n");
    block_on(store.durable()).unwrap();
    (dir, store, q)
}

#[test]
fn check_finds_a_sound_store_sound_and_reports_damage() {
    let (_dir, store, _) = populated();
    let report = store.check().unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.counts.mail, 3);
    assert_eq!(report.counts.queue, 1);
    assert_eq!(report.counts.inbound, 1);
    // An undecodable mailbox entry and a reference count that lies.
    store
        .inner
        .mail
        .insert(
            super::mail::mail_key("a@x.test", 999),
            &[0xff, 0xff, 0xff][..],
        )
        .unwrap();
    let (k, v) = store.inner.refs.first().unwrap().unwrap();
    let mut bad = v.to_vec();
    bad[7] += 5;
    store.inner.refs.insert(k, bad).unwrap();
    let report = store.check().unwrap();
    assert_eq!(report.problems.len(), 2, "{:?}", report.problems);
    assert!(report.problems.iter().any(|p| p.starts_with("mail:")));
    assert!(report.problems.iter().any(|p| p.contains("references")));
}

#[test]
fn export_skips_what_cannot_be_read_and_import_rebuilds_the_rest() {
    let (_dir, store, q) = populated();
    let before_a = store.maildrop("a@x.test").unwrap();
    store
        .inner
        .mail
        .insert(
            super::mail::mail_key("a@x.test", 999),
            &[0xff, 0xff, 0xff][..],
        )
        .unwrap();
    let mut out = Vec::new();
    let counts = store.export(&mut out).unwrap();
    assert_eq!(counts.skipped, 1);
    assert_eq!((counts.users, counts.aliases, counts.mail), (1, 1, 3));

    let target = tempfile::tempdir().unwrap();
    let dir = target.path().join("new");
    let counts = Store::import(&dir, &mut out.as_slice()).unwrap();
    assert_eq!(counts.skipped, 1);
    let new = Store::open(&dir).unwrap();
    let after_a = new.maildrop("a@x.test").unwrap();
    let uidls = |m: &[MailEntry]| m.iter().map(|e| e.uidl.clone()).collect::<Vec<_>>();
    assert_eq!(uidls(&after_a[..]), uidls(&before_a[..]));
    for e in &after_a {
        assert_eq!(
            new.read_mail("a@x.test", e.key).unwrap(),
            store.read_mail("a@x.test", e.key).unwrap()
        );
    }
    assert!(new.verify_password("a@x.test", "pw").unwrap());
    assert_eq!(
        new.alias("info@x.test").unwrap(),
        Some(vec!["a@x.test".into()])
    );
    assert_eq!(
        new.queued_content(q).unwrap().as_deref(),
        Some(&b"queued\r\n"[..])
    );
    assert_eq!(new.due(5, 10).unwrap().len(), 1);
    assert_eq!(new.inbound().unwrap().len(), 1);
    assert!(new.check().unwrap().problems.is_empty());
    // New ids are past every imported one.
    assert!(new.new_id().unwrap() > q);

    // Never into a non-empty directory; never from a cut-short file.
    assert!(matches!(
        Store::import(&dir, &mut out.as_slice()),
        Err(BackupError::NotEmpty(_))
    ));
    let cut = &out[..out.len() - 10];
    let other = target.path().join("other");
    let err = Store::import(&other, &mut &cut[..])
        .unwrap_err()
        .to_string();
    assert!(err.contains("line"), "{err}");
}

/// Usage the store keeps matches what the mailboxes hold.
fn assert_usage_matches(store: &Store, mailbox: &str) {
    let entries = store.maildrop(mailbox).unwrap();
    let want = super::Usage {
        messages: entries.len() as u64,
        octets: entries.iter().map(|e| e.size).sum(),
    };
    assert_eq!(store.usage(mailbox).unwrap(), want, "{mailbox}");
}

/// Every way mail enters or leaves a mailbox updates its usage in the same
/// transaction: accept_local for one and for several mailboxes,
/// deliver_local (and its repeat), delete_mail, delete_user.
#[test]
fn usage_follows_deliveries_and_deletions() {
    let (_dir, store) = open();
    store.add_user("a@example.test", "pw").unwrap();
    let one = store.new_id().unwrap();
    store
        .accept_local(
            one,
            b"Subject: 1\r\n\r\n1\r\n",
            &[local("a@example.test", "P: 1\r\n")],
        )
        .unwrap();
    let two = store.new_id().unwrap();
    store
        .accept_local(
            two,
            b"Subject: 2\r\n\r\n22\r\n",
            &[
                local("a@example.test", ""),
                local("b@example.test", "X: y\r\n"),
            ],
        )
        .unwrap();
    let content = b"Subject: 3\r\n\r\n333\r\n";
    let three = spool(&store, &["a@example.test"], content);
    for _ in 0..2 {
        store
            .deliver_local(three, &[local("A@example.test", "")])
            .unwrap();
    }
    store.finish_inbound(three).unwrap();
    for m in ["a@example.test", "b@example.test"] {
        assert_usage_matches(&store, m);
    }
    assert_eq!(store.usage("a@example.test").unwrap().messages, 3);
    assert_eq!(
        store
            .delete_mail("a@example.test", &[one.0, 12345])
            .unwrap(),
        1
    );
    assert_usage_matches(&store, "a@example.test");
    assert_eq!(store.usage("a@example.test").unwrap().messages, 2);
    store.delete_user("a@example.test").unwrap();
    assert_eq!(
        store.usage("a@example.test").unwrap(),
        super::Usage::default()
    );
    assert_usage_matches(&store, "b@example.test");
    assert!(store.check().unwrap().problems.is_empty());
    // `store check` finds usage that does not add up.
    store
        .inner
        .usage
        .insert("b@example.test", &[0u8; 16][..])
        .unwrap();
    let problems = store.check().unwrap().problems;
    assert!(
        problems.len() == 1 && problems[0].starts_with("usage of b@example.test: kept 0 messages"),
        "{problems:?}"
    );
}

/// Quotas: the default, a user's own, unlimited; full at or over it.
#[test]
fn quotas_and_over_quota() {
    let (_dir, store) = open();
    store.add_user("a@example.test", "pw").unwrap();
    assert_eq!(store.quota("a@example.test").unwrap(), None);
    store.set_quota_policy(Some(10), 90);
    assert_eq!(store.quota("a@example.test").unwrap(), Some(10));
    assert_eq!(store.over_quota("a@example.test").unwrap(), None);
    let id = store.new_id().unwrap();
    store
        .accept_local(id, b"0123456789", &[local("a@example.test", "")])
        .unwrap();
    assert!(store.over_quota("a@example.test").unwrap().is_some());
    assert!(Directory::is_full(&store, "a@example.test").unwrap());
    store
        .set_quota("a@example.test", super::QuotaSetting::Octets(11))
        .unwrap();
    assert_eq!(store.over_quota("a@example.test").unwrap(), None);
    store
        .set_quota("a@example.test", super::QuotaSetting::Unlimited)
        .unwrap();
    assert_eq!(store.quota("a@example.test").unwrap(), None);
    store
        .set_quota("a@example.test", super::QuotaSetting::Default)
        .unwrap();
    assert_eq!(store.quota("a@example.test").unwrap(), Some(10));
    assert!(matches!(
        store.set_quota("nobody@example.test", super::QuotaSetting::Unlimited),
        Err(StoreError::NoSuchUser(_))
    ));
}

/// A store from before usage was kept (schema 2) opens: its usage is
/// computed once, and the schema number raised after that.
#[test]
fn schema_2_store_gets_its_usage_computed_on_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        for n in 0..3 {
            let id = store.new_id().unwrap();
            store
                .accept_local(id, &vec![b'x'; 10 + n], &[local("a@example.test", "")])
                .unwrap();
        }
        // What a version 2 postino left: no usage, schema 2.
        store.inner.usage.clear().unwrap();
        store
            .meta()
            .unwrap()
            .insert(super::META_SCHEMA, &2u32.to_be_bytes()[..])
            .unwrap();
        store.flush_blocking().unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(
        store.usage("a@example.test").unwrap(),
        super::Usage {
            messages: 3,
            octets: 33
        }
    );
    assert_eq!(
        store
            .meta()
            .unwrap()
            .get(super::META_SCHEMA)
            .unwrap()
            .as_deref(),
        Some(&super::SCHEMA_VERSION.to_be_bytes()[..])
    );
}

/// A single-mailbox delivery updates usage after its insert, outside a
/// transaction: after a crash, the next open counts usage again; after a
/// clean close it does not need to.
#[test]
fn usage_is_counted_again_after_an_unclean_stop() {
    let dir = tempfile::tempdir().unwrap();
    let wrong = super::Usage {
        messages: 7,
        octets: 7,
    };
    let break_usage = |store: &Store| {
        let id = store.new_id().unwrap();
        store
            .accept_local(id, &[b'x'; 10], &[local("a@example.test", "")])
            .unwrap();
        // As if the process died between the insert and the usage update
        // (and more): the usage record no longer matches the mailbox.
        store
            .inner
            .usage
            .insert("a@example.test", &wrong.to_bytes())
            .unwrap();
        store.flush_blocking().unwrap();
    };
    {
        let store = Store::open(dir.path()).unwrap();
        break_usage(&store);
        store
            .inner
            .crashed
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(
        store.usage("a@example.test").unwrap(),
        super::Usage {
            messages: 1,
            octets: 10
        }
    );
    // A clean close: the next open trusts the records as they are.
    break_usage(&store);
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.usage("a@example.test").unwrap(), wrong);
}

/// An export carries each user's own quota, and an import brings it back
/// and computes usage from the imported mail.
#[test]
fn export_and_import_keep_quotas_and_usage() {
    let (_dir, store) = open();
    for u in ["a@x.test", "b@x.test", "c@x.test"] {
        store.add_user(u, "pw").unwrap();
    }
    store
        .set_quota("a@x.test", super::QuotaSetting::Octets(5000))
        .unwrap();
    store
        .set_quota("b@x.test", super::QuotaSetting::Unlimited)
        .unwrap();
    let id = store.new_id().unwrap();
    store
        .accept_local(id, b"Subject: q\r\n\r\nq\r\n", &[local("a@x.test", "")])
        .unwrap();
    let mut out = Vec::new();
    store.export(&mut out).unwrap();
    let to = tempfile::tempdir().unwrap();
    let dir = to.path().join("new");
    Store::import(&dir, &mut &out[..]).unwrap();
    let new = Store::open(&dir).unwrap();
    new.set_quota_policy(Some(7), 0);
    assert_eq!(new.quota("a@x.test").unwrap(), Some(5000));
    assert_eq!(new.quota("b@x.test").unwrap(), None);
    assert_eq!(new.quota("c@x.test").unwrap(), Some(7));
    assert_eq!(
        new.usage("a@x.test").unwrap(),
        store.usage("a@x.test").unwrap()
    );
    assert_eq!(new.usage("a@x.test").unwrap().messages, 1);
}
