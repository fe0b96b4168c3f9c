//! Criterion benchmarks of the in-memory hot paths of `postino-core`: SMTP
//! and POP3 parsing, framing and sessions, the routing decision and the DSN
//! builder. The disk-bound store has its own bench target (`benches/store.rs`).
//!
//! Every benchmark reports throughput (commands, lines, octets, messages or
//! sessions per second), so that a regression reads as a rate. Run with
//! `cargo bench -p postino-core --bench core` (add `-- --quick` for a short
//! run, or a filter such as `-- smtp/data`). These are measurements, not
//! tests: nothing here fails on a slow machine, only on a wrong answer.

use std::collections::HashMap;
use std::hint::black_box;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

use postino_core::config::{BareLf, RoutingConfig, UnknownUser};
use postino_core::dsn::{Kind, RecipientStatus, Report};
use postino_core::message::MessageId;
use postino_core::routing::{self, Directory, DirectoryError, Route, Target};
use postino_core::smtp::session::{Peer, SessionConfig, Step};
use postino_core::smtp::{self, DataReceiver, LineReceiver, Reply};
use postino_core::{pop3, Address};

/// TCP's usual segment payload on Ethernet: how content arrives from a
/// client that sends a large message in one write.
const SEGMENT: usize = 1460;

/// Postfix's default `message_size_limit`, so no benchmark message is refused.
const MAX_MESSAGE: u64 = 10_240_000;

/// RFC 5321's command line limit, CRLF included.
const MAX_LINE: usize = 512;

const DATE: &str = "Sat, 28 Nov 2026 00:00:00 +0000";

// ---------------------------------------------------------------------------
// Inputs
// ---------------------------------------------------------------------------

/// The SMTP commands a server sees, one of each kind a busy MX gets,
/// including a verb it does not know.
const SMTP_COMMANDS: &[(&str, &str)] = &[
    ("ehlo", "EHLO client.example.org"),
    (
        "mail",
        "MAIL FROM:<sender@example.org> SIZE=1024 BODY=8BITMIME",
    ),
    ("rcpt", "RCPT TO:<user00042@example.test>"),
    ("data", "DATA"),
    ("rset", "RSET"),
    ("quit", "QUIT"),
    ("noop", "NOOP"),
    ("unknown", "XFORWARD NAME=spike.example.org"),
];

/// A message as it travels inside DATA: headers, a body of 78-column lines
/// of which every eighth starts with a dot (so is dot-stuffed on the wire),
/// and the final `.` CRLF. Exactly `wire_len` octets, final dot included.
fn dot_stuffed_message(wire_len: usize) -> Vec<u8> {
    let mut m = Vec::with_capacity(wire_len);
    m.extend_from_slice(
        b"From: Sender <sender@example.org>\r\n\
          To: <user00042@example.test>\r\n\
          Subject: criterion benchmark message\r\n\
          Message-ID: <bench.1@example.org>\r\n\
          Date: Sat, 28 Nov 2026 00:00:00 +0000\r\n\
          MIME-Version: 1.0\r\n\
          Content-Type: text/plain; charset=us-ascii\r\n\
          \r\n",
    );
    const LINE: usize = 80; // 78 octets of text and CRLF
    let mut n = 0;
    // Leave room for the last, shorter line (at least its CRLF) and the dot.
    while m.len() + LINE + 2 + 3 <= wire_len {
        if n % 8 == 0 {
            // A line whose text starts with a dot, stuffed to two dots.
            m.extend_from_slice(b"..");
            m.extend(std::iter::repeat_n(b'd', LINE - 4));
        } else {
            m.extend((0..LINE - 2).map(|i| b'a' + ((i + n) % 26) as u8));
        }
        m.extend_from_slice(b"\r\n");
        n += 1;
    }
    let pad = wire_len - 3 - m.len();
    m.extend(std::iter::repeat_n(b'z', pad - 2));
    m.extend_from_slice(b"\r\n.\r\n");
    assert_eq!(m.len(), wire_len);
    m
}

/// What a [`DataReceiver`] must make of [`dot_stuffed_message`]'s output:
/// each stuffing dot and the final `.` CRLF removed.
fn unstuffed_len(wire: &[u8]) -> usize {
    let stuffed = wire.windows(4).filter(|w| w == b"\r\n..").count();
    wire.len() - 3 - stuffed
}

/// A client that pipelines whole transactions (RFC 2920): MAIL, two RCPTs
/// and DATA in one write, 50 times over, then RSET, NOOP and QUIT. Returns
/// the buffer and its number of lines.
fn pipelined_commands() -> (Vec<u8>, u64) {
    let mut buf = Vec::new();
    let mut lines = 0;
    for i in 0..50 {
        buf.extend_from_slice(
            format!(
                "MAIL FROM:<sender{i}@example.org> SIZE=1024 BODY=8BITMIME\r\n\
                 RCPT TO:<user{i:05}@example.test>\r\n\
                 RCPT TO:<user{:05}@example.test>\r\n\
                 DATA\r\n",
                i + 1
            )
            .as_bytes(),
        );
        lines += 4;
    }
    buf.extend_from_slice(b"RSET\r\nNOOP\r\nQUIT\r\n");
    (buf, lines + 3)
}

// ---------------------------------------------------------------------------
// SMTP
// ---------------------------------------------------------------------------

fn smtp_parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("smtp/parse");
    group.throughput(Throughput::Elements(SMTP_COMMANDS.len() as u64));
    group.bench_function("mix", |b| {
        b.iter(|| {
            for (_, line) in SMTP_COMMANDS {
                let _ = black_box(smtp::Request::parse(black_box(line.as_bytes())));
            }
        })
    });
    // One command at a time, so a regression in the mix can be traced.
    group.throughput(Throughput::Elements(1));
    for (name, line) in SMTP_COMMANDS {
        assert!(smtp::Request::parse(line.as_bytes()).is_ok(), "{line}");
        group.bench_function(*name, |b| {
            b.iter(|| smtp::Request::parse(black_box(line.as_bytes())))
        });
    }
    group.finish();
}

/// Takes every line out of `buf`; returns how many.
fn drain_lines(receiver: &mut LineReceiver, buf: &mut BytesMut) -> u64 {
    let mut n = 0;
    while let Some(line) = receiver.next_line(buf).expect("well-formed input") {
        black_box(&line);
        n += 1;
    }
    n
}

fn smtp_line_receiver(c: &mut Criterion) {
    let (input, lines) = pipelined_commands();
    {
        let mut r = LineReceiver::new(MAX_LINE, BareLf::Normalize);
        assert_eq!(drain_lines(&mut r, &mut BytesMut::from(&input[..])), lines);
    }
    let mut group = c.benchmark_group("smtp/line_receiver");
    group.throughput(Throughput::Elements(lines));
    group.bench_function("pipelined/whole", |b| {
        b.iter_batched(
            || BytesMut::from(&input[..]),
            |mut buf| {
                let mut r = LineReceiver::new(MAX_LINE, BareLf::Normalize);
                drain_lines(&mut r, &mut buf)
            },
            BatchSize::SmallInput,
        )
    });
    group.bench_function("pipelined/segments", |b| {
        // The connection's read buffer lives as long as the connection.
        let mut buf = BytesMut::with_capacity(8192);
        b.iter(|| {
            let mut r = LineReceiver::new(MAX_LINE, BareLf::Normalize);
            let mut n = 0;
            for segment in input.chunks(SEGMENT) {
                buf.extend_from_slice(segment);
                n += drain_lines(&mut r, &mut buf);
            }
            n
        })
    });
    group.finish();
}

fn smtp_data_receiver(c: &mut Criterion) {
    let mut group = c.benchmark_group("smtp/data_receiver");
    for (name, size) in [("1KiB", 1024), ("64KiB", 64 * 1024), ("1MiB", 1024 * 1024)] {
        let wire = dot_stuffed_message(size);
        let want = unstuffed_len(&wire);
        {
            let mut r = DataReceiver::new(MAX_MESSAGE, BareLf::Normalize);
            let mut buf = BytesMut::from(&wire[..]);
            assert!(r.ingest(&mut buf) && buf.is_empty());
            assert_eq!(r.finish().expect("accepted").len(), want);
        }
        group.throughput(Throughput::Bytes(size as u64));
        // Large copies would not fit many to a batch; small ones must share
        // a batch or the timer's own cost shows.
        let batch = if size > 4096 {
            BatchSize::LargeInput
        } else {
            BatchSize::SmallInput
        };
        group.bench_function(format!("{name}/whole"), |b| {
            b.iter_batched(
                || BytesMut::from(&wire[..]),
                |mut buf| {
                    let mut r = DataReceiver::new(MAX_MESSAGE, BareLf::Normalize);
                    assert!(r.ingest(&mut buf));
                    r.finish()
                },
                batch,
            )
        });
        group.bench_function(format!("{name}/segments"), |b| {
            let mut buf = BytesMut::with_capacity(8192);
            b.iter(|| {
                let mut r = DataReceiver::new(MAX_MESSAGE, BareLf::Normalize);
                let mut done = false;
                for segment in wire.chunks(SEGMENT) {
                    buf.extend_from_slice(segment);
                    done = r.ingest(&mut buf);
                }
                assert!(done);
                r.finish()
            })
        });
    }
    group.finish();
}

fn smtp_session_config() -> Arc<SessionConfig> {
    Arc::new(SessionConfig {
        hostname: "mx.example.test".into(),
        max_message_size: MAX_MESSAGE,
        max_recipients: 1000,
        hop_limit: 50,
        soft_error_limit: 10,
        hard_error_limit: 20,
        tls_available: false,
        auth_available: false,
        auth_required: false,
        allow_plaintext_auth: false,
        postmaster_domain: "example.test".into(),
        max_line_length: MAX_LINE,
        bare_lf: BareLf::Normalize,
        error_delay: Duration::from_secs(1),
    })
}

/// One connection's worth of work, driven as the connection actor drives
/// it: bytes through [`smtp::Session::ingest`] (its receivers, the request
/// parser and the state machine), and every reply written to `out`.
/// Returns the number of messages accepted.
fn smtp_connection(
    config: &Arc<SessionConfig>,
    input: &mut BytesMut,
    out: &mut Vec<u8>,
    id: MessageId,
) -> usize {
    let ip: IpAddr = [192, 0, 2, 7].into();
    let mut session = smtp::Session::new(
        config.clone(),
        Peer {
            ip,
            trusted: false,
            tls: false,
        },
    );
    session.greeting().write_to(out);
    let mut accepted = 0;
    let mut step = session.ingest(input);
    loop {
        step = match step {
            Step::Read => return accepted,
            Step::Command(_) => session.ingest(input),
            Step::Reply { reply, .. } => {
                reply.write_to(out);
                session.ingest(input)
            }
            Step::Route(query) => {
                // The router's answer for a local user; the routing bench
                // measures the decision itself.
                session.routed(Route::mailbox(query.recipient.canonical()))
            }
            Step::EndOfData => session.data_done(id, DATE),
            Step::Message(message) => {
                black_box(&message);
                // Here the actor stores the message and waits for the
                // group commit; the store bench measures that part.
                session.accepted(message.id).write_to(out);
                accepted += 1;
                session.ingest(input)
            }
            Step::Close(r) => {
                r.write_to(out);
                return accepted;
            }
            other => panic!("unexpected step {other:?}"),
        }
    }
}

fn smtp_session(c: &mut Criterion) {
    let config = smtp_session_config();
    // What smtp-source sends for one 1 KiB message: EHLO, then MAIL, RCPT
    // and DATA pipelined, the content, QUIT.
    let mut input = b"EHLO client.example.org\r\n\
        MAIL FROM:<sender@example.org> SIZE=1024 BODY=8BITMIME\r\n\
        RCPT TO:<user00042@example.test>\r\n\
        DATA\r\n"
        .to_vec();
    input.extend_from_slice(&dot_stuffed_message(1024));
    input.extend_from_slice(b"QUIT\r\n");
    {
        let mut out = Vec::new();
        let n = smtp_connection(
            &config,
            &mut BytesMut::from(&input[..]),
            &mut out,
            MessageId(1),
        );
        let out = String::from_utf8(out).expect("ASCII replies");
        assert_eq!(n, 1, "{out}");
        assert!(out.contains("250 2.0.0 Ok: queued as"), "{out}");
        assert!(out.ends_with("221 2.0.0 Bye\r\n"), "{out}");
    }
    // The same message as a CHUNKING client sends it: one `BDAT n LAST`
    // chunk, the content as is (no dot-stuffing, no end marker to find).
    let content = {
        let mut r = DataReceiver::new(MAX_MESSAGE, BareLf::Normalize);
        let mut buf = BytesMut::from(&dot_stuffed_message(1024)[..]);
        assert!(r.ingest(&mut buf));
        r.finish().expect("accepted")
    };
    let mut bdat_input = format!(
        "EHLO client.example.org\r\n\
        MAIL FROM:<sender@example.org> SIZE={n} BODY=8BITMIME\r\n\
        RCPT TO:<user00042@example.test>\r\n\
        BDAT {n} LAST\r\n",
        n = content.len()
    )
    .into_bytes();
    bdat_input.extend_from_slice(&content);
    bdat_input.extend_from_slice(b"QUIT\r\n");
    {
        let mut out = Vec::new();
        let n = smtp_connection(
            &config,
            &mut BytesMut::from(&bdat_input[..]),
            &mut out,
            MessageId(1),
        );
        let out = String::from_utf8(out).expect("ASCII replies");
        assert_eq!(n, 1, "{out}");
        assert!(out.ends_with("221 2.0.0 Bye\r\n"), "{out}");
    }
    let mut group = c.benchmark_group("smtp/session");
    group.throughput(Throughput::Elements(1));
    for (name, input) in [
        ("transaction_1KiB", &input),
        ("transaction_1KiB_bdat", &bdat_input),
    ] {
        group.bench_function(name, |b| {
            let mut out = Vec::with_capacity(4096);
            let mut id = 0;
            b.iter_batched(
                || BytesMut::from(&input[..]),
                |mut buf| {
                    out.clear();
                    id += 1;
                    smtp_connection(&config, &mut buf, &mut out, MessageId(id))
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

// ---------------------------------------------------------------------------
// POP3
// ---------------------------------------------------------------------------

const POP3_COMMANDS: &[&str] = &[
    "CAPA",
    "USER user00042@example.test",
    "PASS correct horse battery staple",
    "STAT",
    "LIST",
    "LIST 7",
    "UIDL",
    "UIDL 7",
    "RETR 7",
    "TOP 7 10",
    "DELE 7",
    "NOOP",
    "RSET",
    "QUIT",
    "XTND XMIT",
];

fn pop3_parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("pop3/parse");
    group.throughput(Throughput::Elements(POP3_COMMANDS.len() as u64));
    group.bench_function("mix", |b| {
        b.iter(|| {
            for line in POP3_COMMANDS {
                let _ = black_box(pop3::Request::parse(black_box(line.as_bytes())));
            }
        })
    });
    group.finish();
}

/// A 2 KiB message in CRLF form as stored (not stuffed: RETR stuffs it),
/// with a few lines that start with a dot.
fn pop3_message() -> Vec<u8> {
    let mut m = b"Return-Path: <sender@example.org>\r\n\
        Delivered-To: user00042@example.test\r\n\
        Subject: criterion benchmark message\r\n\
        \r\n"
        .to_vec();
    let mut n = 0;
    while m.len() + 80 <= 2048 {
        if n % 8 == 0 {
            m.push(b'.');
            m.extend(std::iter::repeat_n(b'd', 77));
        } else {
            m.extend((0..78).map(|i| b'a' + ((i + n) % 26) as u8));
        }
        m.extend_from_slice(b"\r\n");
        n += 1;
    }
    m.extend(std::iter::repeat_n(b'z', 2048 - 2 - m.len()));
    m.extend_from_slice(b"\r\n");
    m
}

/// A session as the POP3 actor drives it: login (the maildrop handed over
/// as the store loaded it), LIST, UIDL, RETR 1, QUIT, all pipelined. The
/// session's output is appended to `out`.
fn pop3_connection(
    input: &mut BytesMut,
    maildrop: pop3::Maildrop,
    message: &[u8],
    out: &mut Vec<u8>,
) {
    let mut session = pop3::Session::new(pop3::SessionConfig::new("mx.example.test"));
    let mut receiver = pop3::LineReceiver::new();
    let mut maildrop = Some(maildrop);
    session.greeting(out);
    while let Some(line) = receiver.next_line(input, session.max_line_len()) {
        let mut step = session.line(&line.expect("short lines"), out);
        loop {
            step = match step {
                pop3::Step::Send => break,
                pop3::Step::Close => return,
                pop3::Step::Authenticate { .. } => {
                    let maildrop = maildrop.take().expect("one login");
                    session.authenticated(pop3::AuthResult::Ok(maildrop), out)
                }
                pop3::Step::Retrieve { key, .. } => {
                    assert_eq!(key, 1);
                    session.retrieved(message, out)
                }
                other => panic!("unexpected step {other:?}"),
            }
        }
    }
    panic!("no QUIT");
}

fn pop3_session(c: &mut Criterion) {
    let message = pop3_message();
    assert_eq!(message.len(), 2048);
    let maildrop = pop3::Maildrop(
        (1..=100u64)
            .map(|key| pop3::MaildropEntry {
                // The store's UIDL form: epoch and key in hex.
                uidl: format!("{:08x}.{key:x}", 0x5eed_cafe_u32),
                size: message.len() as u64,
                key,
            })
            .collect(),
    );
    let input = b"USER user00042@example.test\r\nPASS secret\r\nLIST\r\nUIDL\r\nRETR 1\r\nQUIT\r\n";
    {
        let mut out = Vec::new();
        pop3_connection(
            &mut BytesMut::from(&input[..]),
            maildrop.clone(),
            &message,
            &mut out,
        );
        let out = String::from_utf8(out).expect("ASCII output");
        assert!(out.contains("+OK 2048 octets\r\n"), "{out}");
        assert!(out.contains("\r\n..dddd"), "RETR dot-stuffs: {out}");
        assert!(out.ends_with("+OK Logging out.\r\n"), "{out}");
    }
    let mut group = c.benchmark_group("pop3/session");
    group.throughput(Throughput::Elements(1));
    group.bench_function("login_list_uidl_retr_2KiB", |b| {
        let mut out = Vec::with_capacity(16384);
        b.iter_batched(
            || (BytesMut::from(&input[..]), maildrop.clone()),
            |(mut buf, maildrop)| {
                out.clear();
                pop3_connection(&mut buf, maildrop, &message, &mut out);
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

// ---------------------------------------------------------------------------
// Routing
// ---------------------------------------------------------------------------

enum Entry {
    User,
    Alias(Vec<String>),
}

/// Users and aliases in a hash map, standing in for the store (whose lookups
/// cost a sled read on top of this).
struct MapDirectory(HashMap<String, Entry>);

impl Directory for MapDirectory {
    fn is_user(&self, address: &str) -> Result<bool, DirectoryError> {
        Ok(matches!(self.0.get(address), Some(Entry::User)))
    }

    fn alias(&self, address: &str) -> Result<Option<Vec<String>>, DirectoryError> {
        Ok(match self.0.get(address) {
            Some(Entry::Alias(targets)) => Some(targets.clone()),
            _ => None,
        })
    }
}

/// 10,000 users `user00000@example.test` …, and 100 aliases `team{n}` to two
/// of them and one remote address.
fn directory() -> MapDirectory {
    let mut map: HashMap<String, Entry> = (0..10_000)
        .map(|n| (format!("user{n:05}@example.test"), Entry::User))
        .collect();
    for n in 0..100 {
        map.insert(
            format!("team{n}@example.test"),
            Entry::Alias(vec![
                format!("user{:05}@example.test", n * 7),
                format!("user{:05}@example.test", n * 7 + 1),
                format!("team{n}@partner.example.org"),
            ]),
        );
    }
    MapDirectory(map)
}

/// A routing case: name, recipient, whether the client may relay, and what
/// the decision must be (checked once, before timing).
type RouteCase = (&'static str, &'static str, bool, fn(&Route) -> bool);

fn routing_decide(c: &mut Criterion) {
    let dir = directory();
    let config = RoutingConfig {
        local_domains: vec!["example.test".into(), "example.net".into()],
        unknown_user: UnknownUser::Reject,
        ..RoutingConfig::default()
    };
    let cases: [RouteCase; 4] = [
        (
            "local",
            "user04711@example.test",
            false,
            |r| matches!(r, Route::Deliver(t) if matches!(t[..], [Target::Mailbox { .. }])),
        ),
        (
            "alias",
            "team42@example.test",
            false,
            |r| matches!(r, Route::Deliver(t) if t.len() == 3),
        ),
        ("unknown", "nobody@example.test", false, |r| {
            matches!(r, Route::Reject(Reply { code: 550, .. }))
        }),
        (
            "remote",
            "someone@remote.example.org",
            true,
            |r| matches!(r, Route::Deliver(t) if matches!(t[..], [Target::Remote { .. }])),
        ),
    ];
    let mut group = c.benchmark_group("routing/decide");
    group.throughput(Throughput::Elements(1));
    for (name, rcpt, may_relay, expected) in cases {
        let rcpt = Address::parse(rcpt, false).expect("valid address");
        let route = routing::decide(&config, &dir, &rcpt, may_relay).expect("no lookup fails");
        assert!(expected(&route), "{name}: {route:?}");
        group.bench_function(name, |b| {
            b.iter(|| routing::decide(&config, &dir, black_box(&rcpt), may_relay))
        });
    }
    group.finish();
}

// ---------------------------------------------------------------------------
// DSN
// ---------------------------------------------------------------------------

fn dsn_build(c: &mut Criterion) {
    let original = pop3_message();
    let recipients: Vec<RecipientStatus> = [
        (
            "alice@remote.example.org",
            "5.1.1",
            "550 5.1.1 <alice@remote.example.org>: Recipient address rejected: User unknown",
            Some("mx1.remote.example.org"),
        ),
        (
            "bob@remote.example.org",
            "5.2.2",
            "552 5.2.2 <bob@remote.example.org>: Mailbox full",
            Some("mx1.remote.example.org"),
        ),
        (
            "carol@example.test",
            "5.1.1",
            "550 5.1.1 <carol@example.test>: user unknown",
            None,
        ),
    ]
    .into_iter()
    .map(|(address, status, diagnostic, mta)| RecipientStatus {
        address: address.into(),
        status: status.into(),
        diagnostic: diagnostic.into(),
        remote_mta: mta.map(Into::into),
        original_recipient: None,
        action: None,
    })
    .collect();
    let report = Report {
        kind: Kind::Failure,
        hostname: "mx.example.test",
        id: MessageId(0x1234_5678),
        sender: "sender@example.org",
        arrival_date: DATE,
        date: DATE,
        recipients: &recipients,
        envid: None,
        headers_only: false,
        original: &original,
    };
    let built = report.build();
    assert!(built.len() > original.len());
    let mut group = c.benchmark_group("dsn/build");
    group.throughput(Throughput::Elements(1));
    group.bench_function("failure_3_recipients_2KiB", |b| {
        b.iter(|| black_box(&report).build())
    });
    group.finish();
}

fn config() -> Criterion {
    // About 25 benchmarks: criterion's default 3 s warm-up and 5 s of
    // measurement each would keep a 2-core machine busy for minutes more
    // without making the numbers steadier. Command-line flags still win.
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = smtp_parse, smtp_line_receiver, smtp_data_receiver, smtp_session,
        pop3_parse, pop3_session, routing_decide, dsn_build
}
criterion_main!(benches);
