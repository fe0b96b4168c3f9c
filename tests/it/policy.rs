//! The policy seam (`postino::policy`) at every stage, with the library
//! server started in this process (a policy is Rust code, so it cannot come
//! from a config file) on 127.0.0.1:0 and Python's smtplib/poplib as the
//! clients: refusals at connect, EHLO, MAIL, RCPT and end of DATA with the
//! policy's replies, rewrites and reroutes delivered, malformed replies,
//! panics and slow answers turned into `451 4.3.0` while the server goes on,
//! and policies asked in order.

use std::net::SocketAddr;
use std::time::Duration;

use postino::policy::{Client, DataDecision, Decision, Message, Policy, RcptDecision};
use postino::{Server, ServerBuilder};
use postino_core::smtp::Reply;
use postino_core::{Address, Config};

use crate::support::server::python;

/// A library server running on its own actix system thread; stopped on
/// drop.
struct InProcess {
    smtp: SocketAddr,
    pop3: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl InProcess {
    /// Starts a server with the policies that `build` adds, and the
    /// mailboxes alice@ and bob@example.test (password `pw`).
    fn start(build: impl FnOnce(ServerBuilder) -> ServerBuilder + Send + 'static) -> InProcess {
        InProcess::start_with(|_| {}, build)
    }

    /// The same, with `tune` changing the configuration first.
    fn start_with(
        tune: impl FnOnce(&mut Config),
        build: impl FnOnce(ServerBuilder) -> ServerBuilder + Send + 'static,
    ) -> InProcess {
        let dir = tempfile::tempdir().unwrap();
        let any_port: SocketAddr = ([127, 0, 0, 1], 0).into();
        let mut config = Config {
            hostname: "mx.example.test".into(),
            data_dir: dir.path().join("data"),
            ..Config::default()
        };
        config.smtp.listen = vec![any_port];
        config.pop3.listen = vec![any_port];
        config.routing.local_domains = vec!["example.test".into()];
        // The bound on a policy's answer; the clients here answer at once.
        config.smtp.timeout = Duration::from_secs(3);
        // Several refusals per session: no tarpit, no disconnect.
        config.smtp.soft_error_limit = 100;
        config.smtp.hard_error_limit = 200;
        tune(&mut config);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            actix::System::new().block_on(async move {
                let server: Server = build(Server::builder(config)).start().await.unwrap();
                for user in ["alice@example.test", "bob@example.test"] {
                    server.storage().add_user(user, "pw").await.unwrap();
                }
                ready_tx
                    .send((server.smtp_addrs()[0], server.pop3_addrs()[0]))
                    .unwrap();
                let _ = stopped.await;
                server.stop().await;
            })
        });
        let (smtp, pop3) = ready_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the server started");
        InProcess {
            smtp,
            pop3,
            stop: Some(stop),
            thread: Some(thread),
            _dir: dir,
        }
    }

    /// Runs a smtplib script with `s`, an `SMTP` connected to the server,
    /// and `say(*words)` to print one answer line; returns its output.
    fn smtp(&self, body: &str) -> String {
        let script = format!(
            "import smtplib, sys\n\
             def say(*words): print(*[w.decode() if isinstance(w, bytes) else w for w in words])\n\
             s = smtplib.SMTP(sys.argv[1], int(sys.argv[2]), timeout=20)\n\
             {body}\n"
        );
        python(
            &script,
            &[&self.smtp.ip().to_string(), &self.smtp.port().to_string()],
        )
    }

    /// Every message in `user`'s mailbox.
    fn mailbox(&self, user: &str) -> Vec<String> {
        let out = python(
            r#"
import json, poplib, sys
p = poplib.POP3(sys.argv[1], int(sys.argv[2]), timeout=20)
p.user(sys.argv[3]); p.pass_("pw")
count, _ = p.stat()
print(json.dumps([b"".join(l + b"\r\n" for l in p.retr(n)[1]).decode() for n in range(1, count + 1)]))
p.quit()
"#,
            &[
                &self.pop3.ip().to_string(),
                &self.pop3.port().to_string(),
                user,
            ],
        );
        serde_json::from_str(out.trim()).expect("poplib JSON")
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One rule per stage, keyed on what the client sends.
struct Stages;

impl Policy for Stages {
    async fn hello(&self, _: &Client, name: &str) -> Decision {
        match name {
            "bad.test" => Decision::Reject(Reply::new(550, "5.7.1", "go away")),
            "later.test" => Decision::TempFail(Reply::new(450, "4.7.1", "not now")),
            _ => Decision::Continue,
        }
    }

    async fn mail(&self, client: &Client, from: Option<&Address>) -> Decision {
        match from.map(|a| a.local_part.as_str()) {
            Some("spammer") => Decision::Reject(Reply::new(553, "5.7.1", "no spammers")),
            // The session's view: the name given at EHLO.
            Some("who") if client.helo.as_deref() != Some("client.test") => {
                Decision::Reject(Reply::new(550, "5.7.1", "wrong helo"))
            }
            Some("panic") => panic!("a policy bug"),
            _ => Decision::Continue,
        }
    }

    async fn rcpt(&self, _: &Client, _: Option<&Address>, to: &Address) -> RcptDecision {
        match to.local_part.as_str() {
            "greylisted" => RcptDecision::TempFail(Reply::new(450, "4.2.0", "greylisted")),
            // A rejection must be 5xx: this one is a bug.
            "wrongclass" => RcptDecision::Reject(Reply::new(250, "2.0.0", "ok?")),
            "support" => RcptDecision::Rewrite(Address::parse("bob@example.test", false).unwrap()),
            _ => RcptDecision::Default,
        }
    }

    async fn data(&self, _: &Client, message: &Message<'_>) -> DataDecision {
        match message.header("Subject").as_deref() {
            Some("to bob") => {
                DataDecision::Reroute(vec![Address::parse("bob@example.test", false).unwrap()])
            }
            Some("to nobody") => {
                DataDecision::Reroute(vec![Address::parse("nobody@example.test", false).unwrap()])
            }
            Some("later") => DataDecision::TempFail(Reply::new(451, "4.7.1", "try later")),
            // Never answers: the server gives up after `smtp.timeout`.
            Some("slow") => std::future::pending().await,
            _ => DataDecision::Continue,
        }
    }
}

#[test]
fn every_stage_decides_with_its_own_replies() {
    let server = InProcess::start(|b| b.policy(Stages));
    let out = server.smtp(
        r#"
say(*s.ehlo("bad.test"))
say(*s.ehlo("later.test"))
# A refused greeting leaves the session without one.
say(*s.mail("a@elsewhere.test"))
say(*s.helo("client.test"))
say(*s.mail("spammer@elsewhere.test"))
say(*s.mail("who@elsewhere.test"))
say(*s.rcpt("greylisted@example.test"))
say(*s.rcpt("wrongclass@example.test"))
say(*s.rcpt("nobody@example.test"))
say(*s.rcpt("support@example.test"))
say(*s.rset())
say(*s.mail("panic@elsewhere.test"))
# The panic ended only that MAIL: the session goes on.
say(*s.mail("carol@elsewhere.test"))
say(*s.rcpt("alice@example.test"))
say(*s.data(b"Subject: later\r\n\r\nx\r\n"))
s.quit()
"#,
    );
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "550 5.7.1 go away",
            "450 4.7.1 not now",
            "503 5.5.1 Error: send HELO/EHLO first",
            "250 mx.example.test",
            "553 5.7.1 no spammers",
            "250 2.1.0 Ok",
            "450 4.2.0 greylisted",
            "451 4.3.0 Error: temporary policy failure, try again later",
            // Left to the default router.
            "550 5.1.1 <nobody@example.test>: Recipient address rejected: User unknown",
            "250 2.1.5 Ok",
            "250 2.0.0 Ok",
            "451 4.3.0 Error: temporary policy failure, try again later",
            "250 2.1.0 Ok",
            "250 2.1.5 Ok",
            "451 4.7.1 try later",
        ],
        "{out}"
    );
    assert!(server.mailbox("alice@example.test").is_empty());
}

/// A policy's refusals are errors like the server's own: at the hard
/// error limit the refusal is sent, then `421` ends the session (a client
/// retrying a refused greeting or sender is cut off), and a refused MAIL
/// leaves no transaction behind.
#[test]
fn policy_refusals_count_towards_the_error_limits() {
    let server = InProcess::start_with(|c| c.smtp.hard_error_limit = 4, |b| b.policy(Stages));
    let out = server.smtp(
        r#"
say(*s.ehlo("bad.test"))
say(*s.helo("client.test"))
say(*s.mail("spammer@elsewhere.test"))
say(*s.rcpt("alice@example.test"))
say(*s.ehlo("bad.test"))
say(*s.noop())
"#,
    );
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "550 5.7.1 go away",
            "250 mx.example.test",
            "553 5.7.1 no spammers",
            "503 5.5.1 Error: need MAIL command",
            "550 5.7.1 go away",
            "421 4.7.0 mx.example.test Error: too many errors",
        ],
        "{out}"
    );
}

#[test]
fn rewritten_and_rerouted_mail_reaches_the_new_mailbox() {
    let server = InProcess::start(|b| b.policy(Stages));
    let out = server.smtp(
        r#"
s.ehlo("client.test")
s.sendmail("carol@elsewhere.test", ["support@example.test"], b"Subject: help\r\n\r\nrewritten\r\n")
s.sendmail("carol@elsewhere.test", ["alice@example.test"], b"Subject: to bob\r\n\r\nrerouted\r\n")
for subject in [b"to nobody", b"slow"]:
    try:
        s.sendmail("carol@elsewhere.test", ["alice@example.test"], b"Subject: " + subject + b"\r\n\r\nx\r\n")
        say("accepted")
    except smtplib.SMTPDataError as e:
        say(e.smtp_code, e.smtp_error)
s.quit()
"#,
    );
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            // A reroute to an address the router refuses refuses the message.
            "550 5.1.1 <nobody@example.test>: Recipient address rejected: User unknown",
            "451 4.3.0 Error: temporary policy failure, try again later",
        ],
        "{out}"
    );
    assert!(server.mailbox("alice@example.test").is_empty());
    let bob = server.mailbox("bob@example.test");
    assert_eq!(bob.len(), 2, "{bob:?}");
    // The address as given is recorded for the rewrite.
    assert!(
        bob[0].contains("X-Original-To: support@example.test\r\n"),
        "{}",
        bob[0]
    );
    assert!(bob[0].ends_with("\r\n\r\nrewritten\r\n"), "{}", bob[0]);
    assert!(bob[1].ends_with("\r\n\r\nrerouted\r\n"), "{}", bob[1]);
}

/// Refuses clients from 127.0.0.2 at connect.
struct NotFrom2;

impl Policy for NotFrom2 {
    async fn connect(&self, client: &Client) -> Decision {
        if client.peer.ip() == std::net::Ipv4Addr::new(127, 0, 0, 2) {
            return Decision::Reject(Reply::new(554, "5.7.1", "not from you"));
        }
        Decision::Continue
    }
}

#[test]
fn a_client_refused_at_connect_gets_the_reply_instead_of_the_greeting() {
    let server = InProcess::start(|b| b.policy(NotFrom2));
    let out = python(
        r#"
import smtplib, sys
for source in ["127.0.0.2", "127.0.0.1"]:
    try:
        s = smtplib.SMTP(sys.argv[1], int(sys.argv[2]), timeout=20, source_address=(source, 0))
        print(source, *s.noop())
        s.quit()
    except smtplib.SMTPConnectError as e:
        print(source, e.smtp_code, e.smtp_error.decode())
"#,
        &[
            &server.smtp.ip().to_string(),
            &server.smtp.port().to_string(),
        ],
    );
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "127.0.0.2 554 5.7.1 not from you",
            "127.0.0.1 250 b'2.0.0 Ok'",
        ],
        "{out}"
    );
}

/// Adds a header naming itself, and accepts or rejects what it is told to.
struct Mark(&'static str, Option<DataDecision>);

impl Policy for Mark {
    async fn data(&self, _: &Client, _: &Message<'_>) -> DataDecision {
        self.1
            .clone()
            .unwrap_or_else(|| DataDecision::AddHeader("X-Mark".into(), self.0.into()))
    }
}

#[test]
fn policies_are_asked_in_order_until_one_decides() {
    let server = InProcess::start(|b| {
        b.policy(Mark("first", None))
            .policy(Mark("second", None))
            .policy(Mark("accept", Some(DataDecision::Accept)))
            .policy(Mark(
                "never asked",
                Some(DataDecision::Reject(Reply::new(550, "5.7.1", "no"))),
            ))
    });
    server.smtp(
        r#"
s.sendmail("carol@elsewhere.test", ["alice@example.test"], b"Subject: x\r\n\r\nbody\r\n")
s.quit()
"#,
    );
    let alice = server.mailbox("alice@example.test");
    assert_eq!(alice.len(), 1);
    assert!(
        alice[0].ends_with("Subject: x\r\nX-Mark: first\r\nX-Mark: second\r\n\r\nbody\r\n"),
        "{}",
        alice[0]
    );
}
