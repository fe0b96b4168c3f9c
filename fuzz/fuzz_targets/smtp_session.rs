//! The SMTP session driven as the connection actor drives it: a byte stream
//! in fragments into [`Session::ingest`] (which frames lines, SASL responses,
//! DATA and BDAT chunks itself), with a toy router and password check, under
//! configurations picked by the input. Seeds in `seeds/smtp_session/` start
//! it off with whole DATA and BDAT transactions.
//! Invariants: no panic; every reply is well formed; accepted content starts
//! with our `Received:` header, ends with CRLF (whether it came by DATA or
//! BDAT) and, under `Normalize`, has no bare CR or LF.

#![no_main]

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use postino_core::config::BareLf;
use postino_core::message::MessageId;
use postino_core::routing::{Route, Target};
use postino_core::smtp::session::{Peer, RouteQuery, SessionConfig, Step};
use postino_core::smtp::{Reply, Session};

fn route(q: &RouteQuery) -> Route {
    let addr = q.recipient.canonical();
    if q.recipient.names_another_host() {
        Route::Reject(Reply::new(554, "5.7.1", "Relay access denied"))
    } else if addr == "alice@example.test" || addr.starts_with("postmaster@") {
        Route::mailbox(addr)
    } else if q.recipient.domain.eq_ignore_ascii_case("example.test") {
        Route::Reject(Reply::new(550, "5.1.1", "user unknown"))
    } else if q.may_relay {
        Route::Deliver(vec![Target::Remote { address: addr }])
    } else {
        Route::Reject(Reply::new(554, "5.7.1", "Relay access denied"))
    }
}

fn check_reply(reply: &Reply) {
    let bytes = reply.to_bytes();
    for line in bytes.split_inclusive(|&b| b == b'\n') {
        assert!(line.ends_with(b"\r\n"), "{bytes:?}");
        let body = &line[..line.len() - 2];
        assert!(
            !body.contains(&b'\r') && !body.contains(&b'\n'),
            "{bytes:?}"
        );
        assert!(body.len() >= 3 && body[..3].iter().all(u8::is_ascii_digit));
    }
}

fn only_crlf(bytes: &[u8]) -> bool {
    bytes.iter().enumerate().all(|(i, &b)| match b {
        b'\r' => bytes.get(i + 1) == Some(&b'\n'),
        b'\n' => i > 0 && bytes[i - 1] == b'\r',
        _ => true,
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, input)) = data.split_first() else {
        return;
    };
    let bare_lf = if ctl & 1 == 0 {
        BareLf::Normalize
    } else {
        BareLf::Reject
    };
    let config = Arc::new(SessionConfig {
        hostname: "mx.example.test".into(),
        max_message_size: if ctl & 2 == 0 { 200 } else { 1 << 16 },
        max_recipients: 3,
        hop_limit: 3,
        soft_error_limit: 10,
        hard_error_limit: 20,
        tls_available: ctl & 4 != 0,
        auth_available: true,
        auth_required: ctl & 8 != 0,
        allow_plaintext_auth: ctl & 16 != 0,
        postmaster_domain: "example.test".into(),
        max_line_length: 512,
        bare_lf,
        error_delay: Duration::from_secs(1),
    });
    let ip: IpAddr = "192.0.2.7".parse().unwrap();
    let mut session = Session::new(
        config.clone(),
        Peer {
            ip,
            trusted: ctl & 32 != 0,
            tls: ctl & 64 != 0,
        },
    );
    check_reply(&session.greeting());
    let chunk = usize::from(ctl >> 4) + 1;
    let mut buf = BytesMut::new();
    let mut next_id = 1;
    'feed: for piece in input.chunks(chunk) {
        buf.extend_from_slice(piece);
        // Bounded: every step consumes input, answers a pending command or
        // an outstanding request, or ends the round.
        let mut step = session.ingest(&mut buf);
        for _ in 0..=4 * buf.len() + 8 {
            step = match step {
                Step::Read => continue 'feed,
                Step::Command(_) => session.ingest(&mut buf),
                Step::Reply { reply, .. } => {
                    check_reply(&reply);
                    session.ingest(&mut buf)
                }
                Step::Route(q) => session.routed(route(&q)),
                Step::Authenticate { user, password } => {
                    let ok = user == "alice@example.test" && password == "secret";
                    session.authenticated(ok.then_some(user))
                }
                Step::CheckSender { user, sender } => session.sender_checked(user == sender),
                Step::StartTls(reply) => {
                    check_reply(&reply);
                    // Input sent before the handshake is discarded.
                    buf.clear();
                    session.tls_started();
                    session.ingest(&mut buf)
                }
                Step::EndOfData => {
                    let id = MessageId(next_id);
                    next_id += 1;
                    session.data_done(id, "date")
                }
                Step::Message(a) => {
                    assert!(a.content.starts_with(b"Received: from "));
                    assert!(a.content.ends_with(b"\r\n"), "{:?}", a.content);
                    if bare_lf == BareLf::Normalize {
                        assert!(only_crlf(&a.content), "{:?}", a.content);
                    }
                    assert!(!a.recipients.is_empty());
                    check_reply(&session.accepted(a.id));
                    session.ingest(&mut buf)
                }
                Step::Close(reply) => {
                    check_reply(&reply);
                    break 'feed;
                }
            };
        }
        panic!("the session did not ask for input: {step:?}");
    }
});
