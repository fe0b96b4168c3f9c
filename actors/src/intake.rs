//! Intake: takes a message whose DATA has been received whole, stores it
//! and answers only once it is on disk. This is where "a 250 means
//! flushed" is kept, in one place.
//!
//! [`Intake::accept`] sorts the recipients once ([`Plan`]) and writes the
//! message the cheapest way that plan allows:
//!
//! - only local mailboxes (the common case): straight into them
//!   ([`Store::accept_local`]);
//! - only remote recipients: straight into the delivery queue
//!   ([`Store::accept_remote`]);
//! - anything else (local and remote together, recipients that bounce):
//!   into the intake spool ([`Store::spool`]).
//!
//! It then awaits the group commit ([`Store::durable`]) and hands the
//! message on: queued mail to the delivery actor ([`Queued`], not awaited:
//! the queue has it anyway), spooled mail to [`dispatch`](crate::dispatch::dispatch) (its mailboxes,
//! the queue, a bounce), before the caller answers, so that a client that
//! reads its mailbox right after the 250 finds the message.
//!
//! Every worker thread has its own `Intake` beside its connections: writes
//! from different connections never wait for each other here, and each
//! awaits its own group commit, so many messages share one flush.

use actix::prelude::*;
use bytes::Bytes;
use postino_core::message::now_unix;
use postino_core::storage::SharedStorage;
use postino_core::store::{StoreError, TraceKind};
use postino_core::{Envelope, MessageId};
use tracing::{debug, warn};

use crate::delivery::actor::Queued;
use crate::dispatch::{dispatch_planned, new_entry, Plan};
use crate::dkim::DkimKeys;
use crate::mailbox;

/// Why a message was not taken in. Whatever of it reached the disk is never
/// delivered ([`postino_core::storage::Intake::reject`]); the client is told to try again later
/// (4xx) and sends it again.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IntakeError {
    /// The store failed: the message is not stored.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Stores accepted messages and hands them on (see the module docs).
#[derive(Clone)]
pub struct Intake {
    /// The configuration in use, taken per message ([`crate::reload`]).
    config: crate::reload::LiveConfig,
    store: SharedStorage,
    delivery: Recipient<Queued>,
    /// DKIM keys for [`Intake::sign`] (none unless [`Intake::with_dkim`]).
    dkim: DkimKeys,
}

/// How [`Intake::accept`] wrote a message, and so what is left to do.
enum Written {
    /// In its mailboxes: nothing.
    Delivered,
    /// In the delivery queue: tell the delivery actor.
    Queued,
    /// In the spool: dispatch it, by this plan.
    Spooled(Plan),
}

/// How a message came in, as its history records it
/// ([`Intake::received`]).
#[derive(Debug, Clone, Default)]
pub struct ReceivedVia {
    /// The TLS protocol of the session, if it used TLS.
    pub tls_protocol: Option<String>,
    /// The TLS cipher.
    pub tls_cipher: Option<String>,
    /// The SASL user, if the client logged in.
    pub auth: Option<String>,
    /// The `Message-ID:` header, if any.
    pub message_id: Option<String>,
}

impl Intake {
    /// An intake writing to `store`; remote mail is announced to `delivery`.
    pub fn new(
        config: impl Into<crate::reload::LiveConfig>,
        store: SharedStorage,
        delivery: Recipient<Queued>,
    ) -> Intake {
        Intake {
            config: config.into(),
            store,
            delivery,
            dkim: DkimKeys::default(),
        }
    }

    /// This intake signs with `keys` ([`Intake::sign`]).
    pub fn with_dkim(mut self, keys: DkimKeys) -> Intake {
        self.dkim = keys;
        self
    }

    /// Signs `content` with DKIM if it leaves the machine and its sender is
    /// ours (the rules are in [`crate::dkim`]), before anything of it is
    /// written, so every copy and retry carries the same signature; the
    /// `DKIM-Signature:` field goes on top and `envelope.size` follows.
    /// Signing runs on a blocking thread (an RSA signature and the body
    /// hash are milliseconds). A failure is logged and the message goes on
    /// unsigned: signing never loses mail.
    pub async fn sign(
        &self,
        envelope: &mut Envelope,
        content: Vec<u8>,
        authenticated: bool,
    ) -> Vec<u8> {
        let config = self.config.current();
        // Decided here, so that mail that is not signed (local mail, the
        // common case) costs no copy and no hop to a blocking thread.
        let wanted = crate::dkim::wants_signature(&config, envelope, authenticated);
        self.dkim
            .sign_with(envelope, content, wanted, move |keys, envelope, content| {
                keys.sign(&config, envelope, authenticated, content)
            })
            .await
    }

    /// Takes in a message received whole: writes it, awaits the group
    /// commit, calls `durable` (where the caller logs the acceptance, before
    /// the message moves on), hands it on, and returns its id for the `250
    /// … queued as ID` reply. Nothing else may answer a message 250.
    ///
    /// # Errors
    ///
    /// [`IntakeError`] when the write or the flush failed; the message is
    /// then marked rejected, so that nothing of it is ever delivered. A
    /// dispatch that fails after the flush is not an error: the message is
    /// safe in the spool and dispatched again at the next start, or by the
    /// delivery actor's spool sweep once older than a lease.
    pub async fn accept(
        &self,
        envelope: Envelope,
        content: Vec<u8>,
        via: &ReceivedVia,
        durable: impl FnOnce(&Envelope),
    ) -> Result<MessageId, IntakeError> {
        let id = envelope.id;
        let result = self.store_durably(&envelope, content, via, durable).await;
        if result.is_err() {
            // Whatever of it reached the disk must never be delivered: the
            // client will send it again.
            self.store.reject(id).await;
        }
        result.map(|()| id)
    }

    async fn store_durably(
        &self,
        envelope: &Envelope,
        content: Vec<u8>,
        via: &ReceivedVia,
        durable: impl FnOnce(&Envelope),
    ) -> Result<(), IntakeError> {
        let id = envelope.id;
        let plan = Plan::of(envelope);
        // A success notice for a local delivery is made by dispatch, from
        // the spool (idempotent), like a bounce.
        let written = if plan.remote.is_empty()
            && plan.bounced.is_empty()
            && plan.delivered.is_empty()
            && !plan.local.is_empty()
        {
            mailbox::accept_local(self.store.as_ref(), id, &content, &plan.local).await?;
            Written::Delivered
        } else if plan.local.is_empty() && plan.bounced.is_empty() && !plan.remote.is_empty() {
            self.store
                .accept_remote(&new_entry(envelope, plan.remote, &plan.forwarded), &content)
                .await?;
            Written::Queued
        } else {
            self.store.spool(envelope, &content).await?;
            Written::Spooled(plan)
        };
        // The 250 is written only once a group commit that started after
        // the write has flushed (REFERENCE.md: Postfix fsyncs first too).
        self.store.durable().await?;
        self.received(
            envelope,
            (&via.tls_protocol, &via.tls_cipher),
            &via.auth,
            &via.message_id,
        )
        .await;
        durable(envelope);
        match written {
            Written::Delivered => {}
            Written::Queued => self.try_now(id, Some(content.into())),
            Written::Spooled(plan) => {
                let config = self.config.current();
                match dispatch_planned(&config, &self.dkim, self.store.as_ref(), envelope, plan)
                    .await
                {
                    Ok(queued) => {
                        // The original's content is in hand; a bounce's the
                        // delivery actor reads.
                        let mut content = Some(content);
                        for q in queued {
                            let content = if q == id { content.take() } else { None };
                            self.try_now(q, content.map(Bytes::from));
                        }
                    }
                    // The message is safe in the spool either way.
                    Err(e) => warn!(%id, error = %e, "dispatch failed; retried later"),
                }
            }
        }
        Ok(())
    }

    /// Records that `envelope` was received (the client, its HELO, TLS,
    /// login and `Message-ID:` as the SMTP session knows them) and where
    /// each recipient goes, in the message's history (`postino trace`).
    /// Called by [`Intake::accept`] once the message is durable; plain
    /// inserts that ride the next group commit.
    pub async fn received(
        &self,
        envelope: &Envelope,
        tls: (&Option<String>, &Option<String>),
        auth: &Option<String>,
        message_id: &Option<String>,
    ) {
        let tls = match tls {
            (Some(protocol), Some(cipher)) => Some(format!("{protocol} {cipher}")),
            (protocol, cipher) => protocol.clone().or_else(|| cipher.clone()),
        };
        let mut events = Vec::with_capacity(1 + envelope.recipients.len());
        events.push(TraceKind::Received {
            client: envelope.client.clone(),
            helo: envelope.helo.clone(),
            sender: envelope.sender.clone(),
            size: envelope.size,
            tls,
            auth: auth.clone(),
            message_id: message_id.clone(),
        });
        events.extend(
            crate::history::route_events(envelope)
                .into_iter()
                .map(|(_, what)| what),
        );
        self.store.trace_new(envelope.id, now_unix(), events).await;
    }

    /// Asks the delivery actor to try a queued message now. Not awaited:
    /// the queue has it, and a queue run tries it if this is dropped. A full
    /// mailbox drops it rather than growing without bound (network input).
    fn try_now(&self, id: MessageId, content: Option<Bytes>) {
        match self.delivery.try_send(Queued { id, content }) {
            Ok(()) => {}
            Err(SendError::Full(_)) => {
                debug!(%id, "delivery actor busy; left to the next queue run")
            }
            // Stopping: the queue has it for the next start.
            Err(SendError::Closed(_)) => debug!(%id, "delivery actor stopped"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use postino_core::message::RoutedRecipient as Rcpt;
    use postino_core::routing::Target;
    use postino_core::storage::SledStorage;
    use postino_core::{Config, Route, Store};

    use super::*;

    /// Stands in for the delivery actor: keeps every `Queued` it is sent.
    struct Recorder(Arc<Mutex<Vec<Queued>>>);

    impl Actor for Recorder {
        type Context = Context<Self>;
    }

    impl Handler<Queued> for Recorder {
        type Result = ();

        fn handle(&mut self, msg: Queued, _: &mut Self::Context) {
            self.0.lock().unwrap().push(msg);
        }
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        store: Store,
        intake: Intake,
        sent: Arc<Mutex<Vec<Queued>>>,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let sent = Arc::new(Mutex::new(Vec::new()));
        let recorder = Recorder(sent.clone()).start();
        let intake = Intake::new(
            Arc::new(Config::default()),
            Arc::new(SledStorage::new(store.clone())),
            recorder.recipient(),
        );
        Fixture {
            _dir: dir,
            store,
            intake,
            sent,
        }
    }

    fn mailbox(m: &str) -> Target {
        Target::Mailbox {
            mailbox: m.into(),
            original: None,
        }
    }

    fn remote(a: &str) -> Target {
        Target::Remote { address: a.into() }
    }

    fn envelope(store: &Store, recipients: Vec<(&str, Route)>) -> Envelope {
        Envelope {
            id: store.new_id().unwrap(),
            sender: Some("bob@remote.test".into()),
            recipients: recipients
                .into_iter()
                .map(|(address, route)| Rcpt {
                    address: address.into(),
                    route,
                })
                .collect(),
            received_at: postino_core::message::now_unix(),
            client: "127.0.0.1".into(),
            helo: "client.test".into(),
            size: 7,
            params: None,
        }
    }

    /// Accepts `envelope`; returns how often the durable hook ran.
    async fn accept(f: &Fixture, envelope: Envelope) -> usize {
        let id = envelope.id;
        let mut hooked = 0;
        let got = f
            .intake
            .accept(
                envelope,
                b"hello\r\n".to_vec(),
                &ReceivedVia::default(),
                |e| {
                    assert_eq!(e.id, id);
                    hooked += 1;
                },
            )
            .await
            .unwrap();
        assert_eq!(got, id);
        hooked
    }

    /// What the recorder has been sent, once it has `want` (bounded: the
    /// messages are in its mailbox already; it only needs turns to run).
    async fn sent(f: &Fixture, want: usize) -> Vec<Queued> {
        for _ in 0..100 {
            if f.sent.lock().unwrap().len() >= want {
                break;
            }
            tokio::task::yield_now().await;
        }
        std::mem::take(&mut *f.sent.lock().unwrap())
    }

    fn in_mailbox(store: &Store, mailbox: &str, id: MessageId) -> bool {
        store.maildrop(mailbox).unwrap().iter().any(|m| m.id == id)
    }

    #[actix_rt::test]
    async fn local_only_mail_goes_straight_to_its_mailboxes() {
        let f = fixture();
        let e = envelope(
            &f.store,
            vec![
                (
                    "alice@localhost",
                    Route::Deliver(vec![mailbox("alice@localhost")]),
                ),
                // An alias to the same mailbox: one copy.
                (
                    "al@localhost",
                    Route::Deliver(vec![mailbox("alice@localhost")]),
                ),
            ],
        );
        let id = e.id;
        assert_eq!(accept(&f, e).await, 1);
        assert_eq!(f.store.maildrop("alice@localhost").unwrap().len(), 1);
        assert!(in_mailbox(&f.store, "alice@localhost", id));
        assert!(f.store.inbound().unwrap().is_empty(), "never spooled");
        assert!(f.store.queue_entry(id).unwrap().is_none());
        assert!(sent(&f, 1).await.is_empty(), "nothing for delivery");
    }

    #[actix_rt::test]
    async fn received_records_the_client_then_each_route_with_its_reason() {
        let f = fixture();
        let e = envelope(
            &f.store,
            vec![
                (
                    "al@localhost",
                    Route::Deliver(vec![mailbox("alice@localhost")]),
                ),
                (
                    "gone@localhost",
                    Route::Bounce {
                        status: "5.1.1".into(),
                        reason: "no such user".into(),
                    },
                ),
            ],
        );
        let tls = (Some("TLSv1_3".to_owned()), Some("AES_256".to_owned()));
        f.intake
            .received(&e, (&tls.0, &tls.1), &Some("bob".into()), &None)
            .await;
        let got: Vec<TraceKind> = f
            .store
            .history(e.id)
            .unwrap()
            .into_iter()
            .map(|e| e.what)
            .collect();
        assert_eq!(
            got,
            vec![
                TraceKind::Received {
                    client: "127.0.0.1".into(),
                    helo: "client.test".into(),
                    sender: Some("bob@remote.test".into()),
                    size: 7,
                    tls: Some("TLSv1_3 AES_256".into()),
                    auth: Some("bob".into()),
                    message_id: None,
                },
                TraceKind::Routed {
                    recipient: "al@localhost".into(),
                    route: "local mailbox alice@localhost (alias al@localhost)".into(),
                },
                TraceKind::Routed {
                    recipient: "gone@localhost".into(),
                    route: "bounce: 5.1.1 no such user".into(),
                },
            ]
        );
    }

    #[actix_rt::test]
    async fn remote_only_mail_is_queued_and_announced_once_with_its_content() {
        let f = fixture();
        let e = envelope(
            &f.store,
            vec![(
                "carol@far.test",
                Route::Deliver(vec![remote("carol@far.test")]),
            )],
        );
        let id = e.id;
        assert_eq!(accept(&f, e).await, 1);
        let entry = f.store.queue_entry(id).unwrap().expect("queued");
        assert_eq!(entry.recipients.len(), 1);
        assert!(f.store.inbound().unwrap().is_empty(), "never spooled");
        let sent = sent(&f, 1).await;
        assert_eq!(sent.len(), 1, "{sent:?}");
        assert_eq!(sent[0].id, id);
        assert_eq!(sent[0].content.as_deref(), Some(&b"hello\r\n"[..]));
    }

    #[actix_rt::test]
    async fn mixed_mail_is_spooled_dispatched_and_bounced_in_one_pass() {
        let f = fixture();
        let e = envelope(
            &f.store,
            vec![
                (
                    "alice@localhost",
                    Route::Deliver(vec![mailbox("alice@localhost")]),
                ),
                (
                    "carol@far.test",
                    Route::Deliver(vec![remote("carol@far.test")]),
                ),
                (
                    "gone@localhost",
                    Route::Bounce {
                        status: "5.1.1".into(),
                        reason: "no such user".into(),
                    },
                ),
            ],
        );
        let id = e.id;
        assert_eq!(accept(&f, e).await, 1);
        assert!(in_mailbox(&f.store, "alice@localhost", id));
        assert!(f.store.queue_entry(id).unwrap().is_some());
        // Dispatch finished both the message and its bounce.
        assert!(f.store.inbound().unwrap().is_empty());
        let sent = sent(&f, 2).await;
        assert_eq!(sent.len(), 2, "the message and its bounce: {sent:?}");
        assert_eq!(sent[0].id, id);
        assert_eq!(sent[0].content.as_deref(), Some(&b"hello\r\n"[..]));
        // The bounce goes back to bob@remote.test; its content is read
        // from the queue by the delivery actor.
        let bounce = f.store.queue_entry(sent[1].id).unwrap().expect("queued");
        assert_eq!(bounce.sender, None);
        assert_eq!(bounce.recipients[0].address, "bob@remote.test");
        assert!(sent[1].content.is_none());
    }
}
