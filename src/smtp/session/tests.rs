//! Session scripts: each line of input with the reply code (and enhanced
//! status) it must get, driven through [`Session::ingest`] as the connection
//! actor drives it.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;

use super::*;
use crate::routing::Target;

fn config() -> SessionConfig {
    SessionConfig {
        hostname: "mx.example.test".into(),
        max_message_size: 1000,
        max_recipients: 3,
        hop_limit: 3,
        soft_error_limit: 10,
        hard_error_limit: 5,
        tls_available: false,
        auth_available: true,
        auth_required: false,
        allow_plaintext_auth: true,
        postmaster_domain: "example.test".into(),
        max_line_length: 512,
        bare_lf: BareLf::Normalize,
        error_delay: Duration::from_secs(1),
    }
}

fn session_with(config: SessionConfig, trusted: bool) -> Session {
    let ip: IpAddr = "192.0.2.7".parse().unwrap();
    Session::new(
        Arc::new(config),
        Peer {
            ip,
            trusted,
            tls: false,
        },
    )
}

/// The route a tiny directory gives: alice exists, remote needs relay.
fn route(q: &RouteQuery) -> Route {
    let addr = q.recipient.canonical();
    if addr == "alice@example.test" || addr == "postmaster@example.test" {
        Route::mailbox(addr)
    } else if q.recipient.domain.eq_ignore_ascii_case("example.test") {
        Route::Reject(Reply::new(550, "5.1.1", "user unknown"))
    } else if q.may_relay {
        Route::Deliver(vec![Target::Remote { address: addr }])
    } else {
        Route::Reject(Reply::new(554, "5.7.1", "Relay access denied"))
    }
}

/// What a script saw: the replies in order, the messages accepted, and
/// whether the session closed.
#[derive(Default)]
struct Transcript {
    replies: Vec<Reply>,
    accepted: Vec<Accepted>,
    closed: bool,
}

/// Carries out the session's steps with a toy router, password check and
/// queue, until it wants more input or closes: what the connection actor
/// does with the real ones.
fn drive(session: &mut Session, buf: &mut BytesMut, out: &mut Transcript, next_id: &mut u64) {
    let mut step = session.ingest(buf);
    loop {
        step = match step {
            Step::Read => return,
            Step::Command(_) => session.ingest(buf),
            Step::Reply { reply, .. } => {
                out.replies.push(reply);
                session.ingest(buf)
            }
            Step::StartTls(reply) => {
                // The handshake: what was buffered before it is dropped.
                out.replies.push(reply);
                buf.clear();
                session.tls_started();
                session.ingest(buf)
            }
            Step::Route(q) => session.routed(route(&q)),
            Step::Authenticate { user, password } => {
                let ok = user == "alice@example.test" && password == "secret";
                session.authenticated(ok.then_some(user))
            }
            Step::CheckSender { user, sender } => session.sender_checked(user == sender),
            Step::EndOfData => {
                let id = MessageId(*next_id);
                *next_id += 1;
                session.data_done(id, "Sat, 28 Nov 2026 00:00:00 +0000")
            }
            Step::Message(message) => {
                out.replies.push(session.accepted(message.id));
                out.accepted.push(message);
                session.ingest(buf)
            }
            Step::Close(reply) => {
                out.replies.push(reply);
                out.closed = true;
                return;
            }
        };
    }
}

/// "code status" of a reply, as the scripts write it.
fn show(r: &Reply) -> String {
    format!("{} {}", r.code, r.status.as_deref().unwrap_or(""))
        .trim()
        .to_owned()
}

/// Feeds `input` (raw bytes, possibly many pipelined commands) to the
/// session in one piece; returns the replies as "code status" strings, and
/// the accepted messages.
fn run(session: &mut Session, input: &[u8]) -> (Vec<String>, Vec<Accepted>) {
    let mut out = Transcript::default();
    drive(session, &mut BytesMut::from(input), &mut out, &mut 1);
    (out.replies.iter().map(show).collect(), out.accepted)
}

/// The same, one octet at a time through one session: the receivers keep
/// their state between reads.
fn run_fragmented(session: &mut Session, input: &[u8]) -> (Vec<String>, Vec<Accepted>) {
    let mut out = Transcript::default();
    let mut buf = BytesMut::new();
    let mut next_id = 1;
    for &b in input {
        if out.closed {
            break;
        }
        buf.extend_from_slice(&[b]);
        drive(session, &mut buf, &mut out, &mut next_id);
    }
    (out.replies.iter().map(show).collect(), out.accepted)
}

fn script(trusted: bool, input: &str, want: &[&str]) -> Vec<Accepted> {
    let mut s = session_with(config(), trusted);
    let (got, accepted) = run(&mut s, input.as_bytes());
    assert_eq!(got, want, "input: {input:?}");
    accepted
}

#[test]
fn table() {
    let cases: &[(bool, &str, &[&str])] = &[
        // The ordinary transaction, pipelined in one buffer.
        (false, "EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nhi\r\n.\r\nQUIT\r\n",
            &["250", "250 2.1.0", "250 2.1.5", "354", "250 2.0.0", "221 2.0.0"]),
        // Out of order.
        (false, "MAIL FROM:<a@b.test>\r\n", &["503 5.5.1"]),
        (false, "HELO c\r\nRCPT TO:<alice@example.test>\r\n", &["250", "503 5.5.1"]),
        (false, "HELO c\r\nDATA\r\n", &["250", "503 5.5.1"]),
        (false, "HELO c\r\nMAIL FROM:<>\r\nMAIL FROM:<>\r\n", &["250", "250 2.1.0", "503 5.5.1"]),
        (false, "HELO c\r\nMAIL FROM:<>\r\nDATA\r\n", &["250", "250 2.1.0", "503 5.5.1"]),
        // All recipients refused: DATA gets 554 (RFC 2920).
        (false, "HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n",
            &["250", "250 2.1.0", "550 5.1.1", "554 5.5.1"]),
        // Relay.
        (false, "HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<x@remote.test>\r\n", &["250", "250 2.1.0", "554 5.7.1"]),
        (true, "HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<x@remote.test>\r\n", &["250", "250 2.1.0", "250 2.1.5"]),
        // Bare <postmaster>.
        (false, "HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<Postmaster>\r\n", &["250", "250 2.1.0", "250 2.1.5"]),
        // Size declared too large.
        (false, "EHLO c\r\nMAIL FROM:<a@b.test> SIZE=5000\r\n", &["250", "552 5.3.4"]),
        // Too many recipients: 452 after max_recipients.
        (false, "HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\nRCPT TO:<alice@example.test>\r\nRCPT TO:<alice@example.test>\r\nRCPT TO:<alice@example.test>\r\n",
            &["250", "250 2.1.0", "250 2.1.5", "250 2.1.5", "250 2.1.5", "452 4.5.3"]),
        // Misc commands.
        (false, "NOOP\r\nRSET\r\nVRFY alice\r\nHELP\r\nFOO\r\n", &["250 2.0.0", "250 2.0.0", "252 2.0.0", "214 2.0.0", "502 5.5.2"]),
        (false, "EHLO\r\n", &["501 5.5.2"]),
        (false, "STARTTLS\r\n", &["502 5.5.1"]),
        // Too many errors: closed with 421 at the hard limit.
        (false, "FOO\r\nFOO\r\nFOO\r\nFOO\r\nFOO\r\nNOOP\r\n", &["502 5.5.2", "502 5.5.2", "502 5.5.2", "502 5.5.2", "421 4.7.0"]),
        // Message over the size limit: drained, 552, session goes on.
        (false, &format!("HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n{}\r\n.\r\nNOOP\r\n", "x".repeat(1200)),
            &["250", "250 2.1.0", "250 2.1.5", "354", "552 5.3.4", "250 2.0.0"]),
        // Loop: hop_limit Received: headers.
        (false, "HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nReceived: a\r\nReceived: b\r\nReceived: c\r\n\r\nx\r\n.\r\n",
            &["250", "250 2.1.0", "250 2.1.5", "354", "554 5.4.0"]),
        // AUTH PLAIN (initial response) and LOGIN.
        (false, "EHLO c\r\nAUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABzZWNyZXQ=\r\n", &["250", "235 2.7.0"]),
        (false, "EHLO c\r\nAUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdAB3cm9uZw==\r\n", &["250", "535 5.7.8"]),
        (false, "EHLO c\r\nAUTH LOGIN\r\nYWxpY2VAZXhhbXBsZS50ZXN0\r\nc2VjcmV0\r\n", &["250", "334", "334", "235 2.7.0"]),
        (false, "EHLO c\r\nAUTH PLAIN\r\n*\r\n", &["250", "334", "501 5.7.0"]),
        (false, "EHLO c\r\nAUTH CRAM-MD5\r\n", &["250", "504 5.5.4"]),
        // Authenticated: may relay; sender must be their own.
        (false, "EHLO c\r\nAUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABzZWNyZXQ=\r\nMAIL FROM:<alice@example.test>\r\nRCPT TO:<x@remote.test>\r\n",
            &["250", "235 2.7.0", "250 2.1.0", "250 2.1.5"]),
        (false, "EHLO c\r\nAUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABzZWNyZXQ=\r\nMAIL FROM:<boss@example.test>\r\nRCPT TO:<x@remote.test>\r\n",
            &["250", "235 2.7.0", "553 5.7.1", "503 5.5.1"]),
        // UTF-8 recipients need SMTPUTF8 on this transaction's MAIL (RFC
        // 6531 §3.4): 553 5.6.7 without it, routed with it; a new MAIL
        // without it forgets the earlier declaration.
        (false, "EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<j\u{f6}rg@example.test>\r\nRCPT TO:<alice@example.test>\r\n",
            &["250", "250 2.1.0", "553 5.6.7", "250 2.1.5"]),
        (false, "EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<alice@b\u{fc}ro.example>\r\n",
            &["250", "250 2.1.0", "553 5.6.7"]),
        (false, "EHLO c\r\nMAIL FROM:<a@b.test> SMTPUTF8\r\nRCPT TO:<j\u{f6}rg@example.test>\r\nRSET\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<j\u{f6}rg@example.test>\r\n",
            &["250", "250 2.1.0", "550 5.1.1", "250 2.0.0", "250 2.1.0", "553 5.6.7"]),
        (false, "EHLO c\r\nRCPT TO:<j\u{f6}rg@example.test>\r\n", &["250", "503 5.5.1"]),
    ];
    for (trusted, input, want) in cases {
        script(*trusted, input, want);
    }
}

#[test]
fn fragments_give_the_same_replies() {
    let input = b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n..dot\r\nline\r\n.\r\nQUIT\r\n";
    let mut whole = session_with(config(), false);
    let (want, _) = run(&mut whole, input);
    let mut s = session_with(config(), false);
    let (got, accepted) = run_fragmented(&mut s, input);
    assert_eq!(got, want);
    assert_eq!(accepted.len(), 1);
    assert!(
        accepted[0].content.ends_with(b"\r\n.dot\r\nline\r\n"),
        "{:?}",
        String::from_utf8_lossy(&accepted[0].content)
    );
}

#[test]
fn received_header_is_prepended() {
    let accepted = script(
        false,
        "EHLO client.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n",
        &["250", "250 2.1.0", "250 2.1.5", "354", "250 2.0.0"],
    );
    let text = String::from_utf8(accepted[0].content.clone()).unwrap();
    assert!(
        text.starts_with("Received: from client.test ([192.0.2.7])\r\n\tby mx.example.test (postino) with ESMTP id 0000000001\r\n\tfor <alice@example.test>;\r\n\tSat, 28 Nov 2026 00:00:00 +0000\r\nSubject: x\r\n\r\nbody\r\n"),
        "{text}"
    );
    assert_eq!(accepted[0].sender.as_deref(), Some("a@b.test"));
}

#[test]
fn ehlo_advertises_extensions() {
    let mut s = session_with(config(), false);
    let Step::Reply { reply: r, .. } = s.command(Request::parse(b"EHLO c").unwrap()) else {
        panic!()
    };
    for ext in [
        "PIPELINING",
        "SIZE 1000",
        "8BITMIME",
        "ENHANCEDSTATUSCODES",
        "AUTH PLAIN LOGIN",
        "DSN",
        "SMTPUTF8",
    ] {
        assert!(
            r.text.lines().any(|l| l == ext),
            "{ext} missing in {}",
            r.text
        );
    }
    assert!(!r.text.contains("STARTTLS"));
    let mut c = config();
    c.tls_available = true;
    c.allow_plaintext_auth = false;
    let mut s = session_with(c, false);
    let Step::Reply { reply: r, .. } = s.command(Request::parse(b"EHLO c").unwrap()) else {
        panic!()
    };
    assert!(r.text.contains("STARTTLS"));
    assert!(!r.text.contains("AUTH"), "no AUTH before TLS: {}", r.text);
}

/// The DSN parameters of accepted recipients reach the message, refused
/// ones do not; a message without any has none to store.
#[test]
fn dsn_parameters_ride_with_the_message() {
    use crate::esmtp::{Notify, Ret};
    let mut s = session_with(config(), false);
    let (got, accepted) = run(
        &mut s,
        b"EHLO c\r\nMAIL FROM:<a@b.test> RET=HDRS ENVID=x+2By\r\n\
          RCPT TO:<alice@example.test> NOTIFY=SUCCESS ORCPT=rfc822;alice+40example.test\r\n\
          RCPT TO:<bob@example.test> NOTIFY=NEVER\r\n\
          RCPT TO:<postmaster@example.test>\r\nDATA\r\nhi\r\n.\r\n\
          MAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nhi\r\n.\r\n",
    );
    assert_eq!(
        got,
        [
            "250",
            "250 2.1.0",
            "250 2.1.5",
            "550 5.1.1",
            "250 2.1.5",
            "354",
            "250 2.0.0",
            "250 2.1.0",
            "250 2.1.5",
            "354",
            "250 2.0.0"
        ]
    );
    let params = accepted[0].params.as_deref().expect("params");
    assert_eq!(params.ret, Some(Ret::Hdrs));
    assert_eq!(params.envid.as_deref(), Some("x+y"));
    assert!(!params.smtputf8);
    assert_eq!(params.recipients.len(), 1, "{params:?}");
    let alice = params.recipient("alice@example.test").expect("alice");
    assert_eq!(
        alice.notify,
        Some(Notify {
            success: true,
            failure: false,
            delay: false
        })
    );
    assert_eq!(
        alice.orcpt.as_ref().map(|o| o.address.as_str()),
        Some("alice@example.test")
    );
    assert_eq!(accepted[1].params, None);
}

/// `AUTH=` is a parameter of AUTH (RFC 4954 §5): refused `555 5.5.4` like
/// any parameter not advertised when the session offers no AUTH.
#[test]
fn auth_parameter_needs_auth_offered() {
    let mut s = session_with(config(), false);
    let (got, _) = run(&mut s, b"EHLO c\r\nMAIL FROM:<a@b.test> AUTH=<>\r\n");
    assert_eq!(got, ["250", "250 2.1.0"]);
    let mut c = config();
    c.auth_available = false;
    let mut s = session_with(c, false);
    let (got, _) = run(&mut s, b"EHLO c\r\nMAIL FROM:<a@b.test> AUTH=<>\r\nMAIL FROM:<a@b.test> SIZE=10 BODY=8BITMIME SMTPUTF8\r\n");
    assert_eq!(got, ["250", "555 5.5.4", "250 2.1.0"]);
}

#[test]
fn starttls_resets_the_session() {
    let mut c = config();
    c.tls_available = true;
    let mut s = session_with(c, false);
    let (got, _) = run(&mut s, b"EHLO c\r\nSTARTTLS\r\n");
    assert_eq!(got, ["250", "220 2.0.0"]);
    assert!(s.is_tls());
    // EHLO is forgotten: MAIL needs a new one.
    let (got, _) = run(&mut s, b"MAIL FROM:<>\r\nEHLO c\r\nSTARTTLS\r\n");
    assert_eq!(got, ["503 5.5.1", "250", "554 5.5.1"]);
}

#[test]
fn submission_requires_auth() {
    let mut c = config();
    c.auth_required = true;
    let mut s = session_with(c, false);
    let (got, _) = run(&mut s, b"EHLO c\r\nMAIL FROM:<alice@example.test>\r\n");
    assert_eq!(got, ["250", "530 5.7.0"]);
}

#[test]
fn count_received_stops_at_body() {
    assert_eq!(
        count_received(b"Received: a\r\nreceived: b\r\nX: y\r\n\r\nReceived: body\r\n"),
        2
    );
}

#[test]
fn refused_recipients_count_towards_the_error_limit() {
    // hard_error_limit is 5: four refused RCPTs leave the session open, the
    // fifth gets its 550 and then the 421 that closes the session (a
    // directory harvest is cut off).
    let mut c = config();
    c.max_recipients = 100;
    let mut s = session_with(c, false);
    let (got, _) = run(&mut s, b"HELO c\r\nMAIL FROM:<>\r\n");
    assert_eq!(got, ["250", "250 2.1.0"]);
    for n in 1..=5 {
        let mut out = Transcript::default();
        let mut buf = BytesMut::from(format!("RCPT TO:<nobody{n}@example.test>\r\n").as_bytes());
        drive(&mut s, &mut buf, &mut out, &mut 1);
        let got: Vec<String> = out
            .replies
            .iter()
            .map(|r| format!("{} {}", r.code, r.text))
            .collect();
        if n < 5 {
            assert_eq!(got, ["550 user unknown"], "after {n}");
            assert!(!out.closed);
        } else {
            assert_eq!(
                got,
                [
                    "550 user unknown",
                    "421 mx.example.test Error: too many errors"
                ]
            );
            assert!(out.closed);
        }
    }
}

/// Past the soft error limit, error replies come with the tarpit delay;
/// good replies never do.
#[test]
fn error_replies_are_delayed_past_the_soft_limit() {
    let mut c = config();
    c.soft_error_limit = 1;
    let delay = c.error_delay;
    let mut s = session_with(c, false);
    let mut buf = BytesMut::from(&b"FOO\r\nFOO\r\nNOOP\r\nFOO\r\n"[..]);
    let mut delays = Vec::new();
    loop {
        match s.ingest(&mut buf) {
            Step::Command(_) => {}
            Step::Reply { reply, delay } => delays.push((reply.code, delay)),
            Step::Read => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        delays,
        [
            (502, None),
            (502, Some(delay)),
            (250, None),
            (502, Some(delay))
        ]
    );
}

/// Issue 15: a SASL response longer than the line limit ends the AUTH
/// exchange. Before, the session stayed in it and took the client's next
/// commands as credentials (`NOOP` as the user name, then a `535` counted as
/// a failed login).
#[test]
fn overlong_sasl_response_ends_the_exchange() {
    let long = "QUFB".repeat(200); // 800 octets of valid base64, over 512.
    let cases: &[(&str, &[&str])] = &[
        // AUTH LOGIN: the user name is too long.
        (
            "EHLO c\r\nAUTH LOGIN\r\n{long}\r\nNOOP\r\nNOOP\r\n",
            &["250", "334", "500 5.5.6", "250 2.0.0", "250 2.0.0"],
        ),
        // AUTH LOGIN: the password is too long.
        (
            "EHLO c\r\nAUTH LOGIN\r\nYWxpY2VAZXhhbXBsZS50ZXN0\r\n{long}\r\nNOOP\r\n",
            &["250", "334", "334", "500 5.5.6", "250 2.0.0"],
        ),
        // AUTH LOGIN with the user name as initial response.
        (
            "EHLO c\r\nAUTH LOGIN YWxpY2VAZXhhbXBsZS50ZXN0\r\n{long}\r\nNOOP\r\n",
            &["250", "334", "500 5.5.6", "250 2.0.0"],
        ),
        // AUTH PLAIN with an empty initial response.
        (
            "EHLO c\r\nAUTH PLAIN\r\n{long}\r\nNOOP\r\n",
            &["250", "334", "500 5.5.6", "250 2.0.0"],
        ),
        // Then a good AUTH works: nothing was left half-done.
        (
            "EHLO c\r\nAUTH LOGIN\r\n{long}\r\nAUTH LOGIN\r\nYWxpY2VAZXhhbXBsZS50ZXN0\r\nc2VjcmV0\r\n",
            &["250", "334", "500 5.5.6", "334", "334", "235 2.7.0"],
        ),
        // Outside AUTH an overlong line is the ordinary 500 5.5.0.
        ("EHLO c\r\n{long}\r\nNOOP\r\n", &["250", "500 5.5.0", "250 2.0.0"]),
    ];
    for (input, want) in cases {
        let input = input.replace("{long}", &long);
        script(false, &input, want);
        // In one-octet fragments: the limit applies to the line, not the read.
        let mut s = session_with(config(), false);
        let (got, _) = run_fragmented(&mut s, input.as_bytes());
        assert_eq!(&got, want, "fragmented: {input:?}");
    }
}

/// Issue 9, point 10: a `Debug` of the step that carries the password (or
/// of the request with the AUTH payload) does not show it.
#[test]
fn debug_output_hides_credentials() {
    let mut s = session_with(config(), false);
    let (got, _) = run(&mut s, b"EHLO c\r\n");
    assert_eq!(got, ["250"]);
    let request = Request::parse(b"AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABzZWNyZXQ=").unwrap();
    let shown = format!("{request:?}");
    assert!(!shown.contains("AGFsaWNl"), "{shown}");
    let step = s.command(request);
    let shown = format!("{step:?}");
    assert!(matches!(step, Step::Authenticate { .. }), "{shown}");
    assert!(shown.contains("alice@example.test"), "{shown}");
    assert!(!shown.contains("secret"), "{shown}");
}

/// Below the free-space reserve MAIL gets 452 4.3.1 (Postfix
/// queue_minfree) before any content is sent, without counting as a client
/// error, and so does a SIZE larger than the room left (Postfix
/// smtpd_check_size); once there is room, the next MAIL is accepted.
#[test]
fn mail_is_refused_while_storage_is_low() {
    let mut s = session_with(config(), false);
    let (got, _) = run(&mut s, b"EHLO c\r\n");
    assert_eq!(got, ["250"]);
    s.set_storage_room(Some(100));
    let (got, _) = run(
        &mut s,
        b"MAIL FROM:<a@b.test> SIZE=101\r\nMAIL FROM:<a@b.test> SIZE=100\r\nRSET\r\n",
    );
    assert_eq!(got, ["452 4.3.1", "250 2.1.0", "250 2.0.0"]);
    s.set_storage_room(Some(0));
    let (got, _) = run(
        &mut s,
        b"MAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.test>\r\n",
    );
    assert_eq!(got, ["452 4.3.1", "503 5.5.1"]);
    // Ordering errors still come first.
    let mut fresh = session_with(config(), false);
    fresh.set_storage_room(Some(0));
    let (got, _) = run(&mut fresh, b"MAIL FROM:<a@b.test>\r\n");
    assert_eq!(got, ["503 5.5.1"]);
    s.set_storage_room(None);
    let (got, accepted) = run(
        &mut s,
        b"MAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nhi\r\n.\r\n",
    );
    assert_eq!(got, ["250 2.1.0", "250 2.1.5", "354", "250 2.0.0"]);
    assert_eq!(accepted.len(), 1);
}

/// Feeds `input` until the session announces a command; returns its name.
fn next_command(session: &mut Session, buf: &mut BytesMut) -> &'static str {
    loop {
        match session.ingest(buf) {
            Step::Command(c) => return c.name,
            Step::Reply { .. } => {}
            other => panic!("{other:?}"),
        }
    }
}

/// An embedder's policy refuses a greeting before the session takes it:
/// no HELO name is set (MAIL still wants one), and the refusal counts
/// towards the error limits like the session's own errors.
#[test]
fn a_refused_hello_leaves_no_state_and_counts_as_an_error() {
    let mut s = session_with(config(), false);
    let mut buf = BytesMut::from(&b"EHLO bad.example\r\n"[..]);
    assert_eq!(next_command(&mut s, &mut buf), "ehlo");
    assert_eq!(s.pending_hello(), Some("bad.example"));
    let Step::Reply { reply, delay: None } = s.refuse(Reply::new(550, "5.7.1", "go away")) else {
        panic!("want the refusal");
    };
    assert_eq!(show(&reply), "550 5.7.1");
    assert_eq!(s.helo(), None);
    assert_eq!(s.pending_hello(), None);
    let (got, _) = run(&mut s, b"MAIL FROM:<>\r\nHELO \r\n");
    assert_eq!(got, ["503 5.5.1", "501 5.5.2"]);
    // Errors so far: the refusal, 503, 501. Two more reach the hard limit
    // (5): the second refusal is sent, then 421 closes.
    let (got, _) = run(&mut s, b"FOO\r\n");
    assert_eq!(got, ["502 5.5.2"]);
    let mut buf = BytesMut::from(&b"HELO bad.example\r\n"[..]);
    assert_eq!(next_command(&mut s, &mut buf), "helo");
    let Step::Reply { reply, .. } = s.refuse(Reply::new(550, "5.7.1", "go away")) else {
        panic!("want the refusal");
    };
    assert_eq!(reply.code, 550);
    assert!(matches!(s.ingest(&mut buf), Step::Close(r) if r.code == 421));
}

/// A policy refuses a MAIL the session accepted, or a message at the end
/// of DATA: the transaction ends (RCPT wants a new MAIL), nothing is
/// stored, and the session goes on.
#[test]
fn a_refused_transaction_ends() {
    let mut s = session_with(config(), false);
    let (got, _) = run(&mut s, b"HELO c\r\nMAIL FROM:<a@b.test>\r\n");
    assert_eq!(got, ["250", "250 2.1.0"]);
    assert!(s.in_transaction());
    let Step::Reply { reply, .. } = s.refuse(Reply::new(451, "4.7.1", "later")) else {
        panic!("want the refusal");
    };
    assert_eq!(show(&reply), "451 4.7.1");
    assert!(!s.in_transaction());
    let (got, _) = run(&mut s, b"RCPT TO:<alice@example.test>\r\n");
    assert_eq!(got, ["503 5.5.1"]);
    // At the end of DATA: the message is refused instead of stored.
    let mut buf = BytesMut::from(
        &b"MAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nhi\r\n.\r\n"[..],
    );
    let message = loop {
        match s.ingest(&mut buf) {
            Step::Command(_) | Step::Reply { .. } => {}
            Step::Route(q) => assert!(matches!(s.routed(route(&q)), Step::Reply { .. })),
            Step::EndOfData => match s.data_done(MessageId(9), "date") {
                Step::Message(m) => break m,
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(message.id, MessageId(9));
    let Step::Reply { reply, .. } = s.refuse(Reply::new(550, "5.7.1", "spam")) else {
        panic!("want the refusal");
    };
    assert_eq!(show(&reply), "550 5.7.1");
    assert!(!s.in_transaction());
    let (got, accepted) = run(&mut s, b"MAIL FROM:<>\r\nQUIT\r\n");
    assert_eq!(got, ["250 2.1.0", "221 2.0.0"]);
    assert!(accepted.is_empty());
}

/// `EHLO`, `MAIL`, one good `RCPT`: the start of every BDAT script.
const ENVELOPE: &str = "EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.test>\r\n";

/// Input, the replies it gets, and the content accepted (after our
/// `Received:`), if any.
type BdatCase<'a> = (String, Vec<&'a str>, Option<&'a [u8]>);

#[test]
fn bdat_table() {
    let big = "x".repeat(600);
    let cases: Vec<BdatCase> = vec![
        // Two chunks, pipelined with what follows; no dot-unstuffing and
        // no end marker inside a chunk.
        (format!("{ENVELOPE}BDAT 4\r\nab\r\nBDAT 7 LAST\r\n.\r\n.x\r\nQUIT\r\n"),
            vec!["250", "250 2.1.0", "250 2.1.5", "250 2.0.0", "250 2.0.0", "221 2.0.0"],
            Some(b"ab\r\n.\r\n.x\r\n")),
        // The command word and LAST in any case; an empty message.
        (format!("{ENVELOPE}bdat 0 last\r\nNOOP\r\n"),
            vec!["250", "250 2.1.0", "250 2.1.5", "250 2.0.0", "250 2.0.0"], Some(b"")),
        // Chunks of nothing but their LAST.
        (format!("{ENVELOPE}BDAT 3\r\nabcBDAT 0 LAST\r\n"),
            vec!["250", "250 2.1.0", "250 2.1.5", "250 2.0.0", "250 2.0.0"], Some(b"abc\r\n")),
        // Without MAIL or RCPT: refused, and the chunk (which looks like
        // commands) is consumed, not executed.
        ("EHLO c\r\nBDAT 6\r\nQUIT\r\nNOOP\r\n".into(), vec!["250", "503 5.5.1", "250 2.0.0"], None),
        ("EHLO c\r\nMAIL FROM:<>\r\nBDAT 6 LAST\r\nRSET\r\nNOOP\r\n".into(),
            vec!["250", "250 2.1.0", "503 5.5.1", "250 2.0.0"], None),
        ("EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<bob@example.test>\r\nBDAT 6 LAST\r\nQUIT\r\nNOOP\r\n".into(),
            vec!["250", "250 2.1.0", "550 5.1.1", "554 5.5.1", "250 2.0.0"], None),
        // Over the size limit (1000) across chunks: 552 at the chunk that
        // crosses it, the same for chunks already pipelined, the
        // transaction over at LAST; in step all along.
        (format!("{ENVELOPE}BDAT 600\r\n{big}BDAT 600\r\n{big}BDAT 600 LAST\r\n{big}NOOP\r\nMAIL FROM:<>\r\n"),
            vec!["250", "250 2.1.0", "250 2.1.5", "250 2.0.0", "552 5.3.4", "552 5.3.4", "250 2.0.0", "250 2.1.0"], None),
        // Or over at once; RSET ends the failed transaction.
        (format!("{ENVELOPE}BDAT 1200\r\n{big}{big}RSET\r\nMAIL FROM:<>\r\n"),
            vec!["250", "250 2.1.0", "250 2.1.5", "552 5.3.4", "250 2.0.0", "250 2.1.0"], None),
        // DATA after BDAT is refused, the BDAT transaction goes on.
        (format!("{ENVELOPE}BDAT 3\r\nabcDATA\r\nBDAT 2 LAST\r\nd\n"),
            vec!["250", "250 2.1.0", "250 2.1.5", "250 2.0.0", "503 5.5.1", "250 2.0.0"], Some(b"abcd\r\n")),
        // So is RCPT: the recipients are settled.
        (format!("{ENVELOPE}BDAT 3\r\nabcRCPT TO:<postmaster>\r\nBDAT 0 LAST\r\n"),
            vec!["250", "250 2.1.0", "250 2.1.5", "250 2.0.0", "503 5.5.1", "250 2.0.0"], Some(b"abc\r\n")),
        // RSET discards the chunks taken so far.
        (format!("{ENVELOPE}BDAT 3\r\nabcRSET\r\n{ENVELOPE}BDAT 3 LAST\r\nxyz"),
            vec!["250", "250 2.1.0", "250 2.1.5", "250 2.0.0", "250 2.0.0",
                 "250", "250 2.1.0", "250 2.1.5", "250 2.0.0"], Some(b"xyz\r\n")),
        // A malformed BDAT: its size is unknown, so nothing is consumed.
        (format!("{ENVELOPE}BDAT x\r\nNOOP\r\n"),
            vec!["250", "250 2.1.0", "250 2.1.5", "501 5.5.2", "250 2.0.0"], None),
        // The end of the message is the end of DATA's: the hop limit.
        (format!("{ENVELOPE}BDAT 39 LAST\r\nReceived: a\r\nReceived: b\r\nReceived: c\r\n"),
            vec!["250", "250 2.1.0", "250 2.1.5", "554 5.4.0"], None),
    ];
    for (input, want, content) in &cases {
        for fragmented in [false, true] {
            let mut s = session_with(config(), false);
            let (got, accepted) = if fragmented {
                run_fragmented(&mut s, input.as_bytes())
            } else {
                run(&mut s, input.as_bytes())
            };
            assert_eq!(&got, want, "input: {input:?}, fragmented: {fragmented}");
            match content {
                Some(content) => {
                    assert_eq!(accepted.len(), 1, "{input:?}");
                    let text = &accepted[0].content;
                    let body = &text[text.len() - content.len()..];
                    assert_eq!(body, *content, "{input:?}");
                    assert!(text.starts_with(b"Received: "));
                }
                None => assert!(accepted.is_empty(), "{input:?}"),
            }
        }
    }
}

#[test]
fn bdat_bare_line_ending_under_reject_closes() {
    let mut c = config();
    c.bare_lf = BareLf::Reject;
    let mut s = session_with(c, false);
    let input = format!("{ENVELOPE}BDAT 3\r\na\nbNOOP\r\n");
    let (got, accepted) = run(&mut s, input.as_bytes());
    assert_eq!(got, ["250", "250 2.1.0", "250 2.1.5", "550 5.5.2"]);
    assert!(accepted.is_empty());
}

#[test]
fn bdat_counts_chunk_octets_for_the_data_rate() {
    let mut s = session_with(config(), false);
    let mut out = Transcript::default();
    let mut buf = BytesMut::from(format!("{ENVELOPE}BDAT 10\r\nabc").as_bytes());
    drive(&mut s, &mut buf, &mut out, &mut 1);
    assert_eq!(s.data_received(), Some(3));
    buf.extend_from_slice(b"defghij");
    drive(&mut s, &mut buf, &mut out, &mut 1);
    assert_eq!(s.data_received(), None, "between chunks, lines again");
    assert!(s.in_transaction());
}

#[test]
fn ehlo_advertises_chunking_without_binarymime() {
    let mut s = session_with(config(), false);
    let Step::Reply { reply: r, .. } = s.command(Request::parse(b"EHLO c").unwrap()) else {
        panic!()
    };
    assert!(r.text.lines().any(|l| l == "CHUNKING"), "{}", r.text);
    assert!(!r.text.contains("BINARYMIME"), "{}", r.text);
}
