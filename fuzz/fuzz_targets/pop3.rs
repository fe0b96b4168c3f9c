//! The POP3 parser and session, driven as the connection actor drives them:
//! bytes in fragments through the line receiver into the session, with a
//! toy maildrop. Invariants: no panic (debug assertions on: the session's
//! own protocol checks count), every output line ends in CRLF with no bare
//! CR or LF, and a line is never fed while a step is pending.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use postino_core::pop3::{
    AuthResult, LineReceiver, Maildrop, MaildropEntry, Request, Session, SessionConfig, Step,
};

const MESSAGES: &[&[u8]] = &[
    b"Subject: one\r\n\r\nbody\r\n",
    b"Subject: two\r\n\r\n.leading dot\r\n..two dots\r\n.\r\nend\r\n",
    b"",
];

fn maildrop() -> Maildrop {
    Maildrop(
        MESSAGES
            .iter()
            .enumerate()
            .map(|(i, m)| MaildropEntry {
                uidl: if i == 2 {
                    "bad uidl\r\n".into()
                } else {
                    format!("uid{i}")
                },
                size: m.len() as u64,
                key: i as u64,
            })
            .collect(),
    )
}

fn check_output(out: &[u8]) {
    for (i, &b) in out.iter().enumerate() {
        match b {
            b'\r' => assert_eq!(out.get(i + 1), Some(&b'\n'), "bare CR in {out:?}"),
            b'\n' => assert!(i > 0 && out[i - 1] == b'\r', "bare LF in {out:?}"),
            _ => {}
        }
    }
    assert!(out.is_empty() || out.ends_with(b"\r\n"));
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, input)) = data.split_first() else {
        return;
    };
    let mut config = SessionConfig::new("mx.example.test");
    config.tls_available = ctl & 1 != 0;
    config.tls_active = ctl & 2 != 0;
    config.plaintext_auth_allowed = ctl & 4 != 0 || config.tls_active;
    let mut session = Session::new(config);
    let mut out = Vec::new();
    session.greeting(&mut out);
    let chunk = usize::from(ctl >> 3) + 1;
    let mut lines = LineReceiver::new();
    let mut buf = BytesMut::new();
    'feed: for piece in input.chunks(chunk) {
        buf.extend_from_slice(piece);
        for _ in 0..=buf.len() + 2 {
            let mut step = match lines.next_line(&mut buf, session.max_line_len()) {
                None => break,
                Some(Ok(line)) => {
                    let _ = Request::parse(&line);
                    session.line(&line, &mut out)
                }
                Some(Err(_)) => session.line_too_long(&mut out),
            };
            // Carry out the step as the actor does, until it asks for input.
            loop {
                step = match step {
                    Step::Send => break,
                    Step::Authenticate { user, password } => {
                        let result = if user == "alice" && password == "secret" {
                            AuthResult::Ok(maildrop())
                        } else if user == "busy" {
                            AuthResult::InUse
                        } else {
                            AuthResult::BadCredentials
                        };
                        session.authenticated(result, &mut out)
                    }
                    Step::Retrieve { key, .. } => match MESSAGES.get(key as usize) {
                        Some(m) if key != 1 || ctl & 0x80 == 0 => session.retrieved(m, &mut out),
                        _ => session.retrieve_failed(&mut out),
                    },
                    Step::Commit { deleted } => {
                        assert!(!deleted.is_empty());
                        session.committed(ctl & 0x40 == 0, &mut out)
                    }
                    Step::StartTls => {
                        buf.clear();
                        lines.reset();
                        session.tls_started();
                        break;
                    }
                    Step::Close => {
                        check_output(&out);
                        break 'feed;
                    }
                };
            }
            check_output(&out);
        }
    }
    check_output(&out);
});
