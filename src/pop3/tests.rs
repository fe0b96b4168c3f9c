//! Whole POP3 sessions as scripts: client bytes in (fed through the
//! [`LineReceiver`] in fragments), server bytes and caller actions out.

use bytes::BytesMut;

use super::reply::{is_valid_uidl, text};
use super::*;
use crate::logsafe::Secret;

/// Stands in for the actor: a user table, one maildrop, and a log of commits.
struct Fake {
    config: SessionConfig,
    /// Messages of `alice`: (key, uidl, content).
    messages: Vec<(u64, String, Vec<u8>)>,
    fail_reads: bool,
    commit_ok: bool,
}

impl Fake {
    fn new() -> Fake {
        let msg = |key, uidl: &str, content: &[u8]| (key, uidl.to_owned(), content.to_vec());
        Fake {
            config: SessionConfig::new("test.example"),
            messages: vec![
                // 14 + 2 + 7 = 23 octets.
                msg(101, "0000000001", b"Subject: one\r\n\r\nHello\r\n"),
                // 14 + 2 + 6 + 7 + 4 + 7 = 40 octets; dot lines to stuff.
                msg(
                    102,
                    "0000000002",
                    b"Subject: two\r\n\r\n.dot\r\nline2\r\n..\r\nline4\r\n",
                ),
                // Header only: 6 octets.
                msg(103, "msg3", b"X: y\r\n"),
            ],
            fail_reads: false,
            commit_ok: true,
        }
    }

    fn check(&self, user: &str, password: &str) -> AuthResult {
        match (user, password) {
            ("alice", "secret") => AuthResult::Ok(Maildrop(
                self.messages
                    .iter()
                    .map(|(key, uidl, content)| MaildropEntry {
                        uidl: uidl.clone(),
                        size: content.len() as u64,
                        key: *key,
                    })
                    .collect(),
            )),
            ("bob", "secret") => AuthResult::InUse,
            ("carol", "secret") => AuthResult::TemporaryFailure,
            _ => AuthResult::BadCredentials,
        }
    }
}

/// What a run produced.
#[derive(Debug, Default)]
struct Outcome {
    out: Vec<u8>,
    logins: Vec<(String, String)>,
    commits: Vec<Vec<u64>>,
    tls_handshakes: usize,
    closed: bool,
    activity: Activity,
}

/// Runs `packets` through a receiver and a session as the actor would, each
/// packet fed `chunk` octets at a time.
fn run(fake: &Fake, packets: &[Vec<u8>], chunk: usize) -> Outcome {
    let mut session = Session::new(fake.config.clone());
    let mut receiver = LineReceiver::new();
    let mut buf = BytesMut::new();
    let mut o = Outcome::default();
    session.greeting(&mut o.out);
    for packet in packets {
        for piece in packet.chunks(chunk) {
            buf.extend_from_slice(piece);
            while let Some(line) = receiver.next_line(&mut buf, session.max_line_len()) {
                let mut step = match line {
                    Ok(line) => session.line(&line, &mut o.out),
                    Err(_) => session.line_too_long(&mut o.out),
                };
                // Resolve actions until the session waits for input again.
                loop {
                    step = match step {
                        Step::Send => break,
                        Step::Close => {
                            o.closed = true;
                            o.activity = session.activity();
                            assert_eq!(session.state(), State::Closed);
                            return o;
                        }
                        Step::Authenticate { user, password } => {
                            let result = fake.check(&user, &password);
                            o.logins.push((user, password));
                            session.authenticated(result, &mut o.out)
                        }
                        Step::Retrieve { key, top: _ } => {
                            let content = fake.messages.iter().find(|m| m.0 == key);
                            match content {
                                Some((_, _, content)) if !fake.fail_reads => {
                                    session.retrieved(content, &mut o.out)
                                }
                                _ => session.retrieve_failed(&mut o.out),
                            }
                        }
                        Step::Commit { deleted } => {
                            assert_eq!(session.state(), State::Update);
                            o.commits.push(deleted);
                            session.committed(fake.commit_ok, &mut o.out)
                        }
                        Step::StartTls => {
                            // RFC 2595 / CVE-2011-0411: drop what came before the handshake.
                            buf.clear();
                            receiver.reset();
                            o.tls_handshakes += 1;
                            session.tls_started();
                            break;
                        }
                    }
                }
            }
        }
    }
    o.activity = session.activity();
    o
}

struct Script {
    name: &'static str,
    fake: Fake,
    packets: Vec<Vec<u8>>,
    /// Expected server lines, CRLF added.
    output: Vec<String>,
    commits: Vec<Vec<u64>>,
    closed: bool,
}

/// A script whose client packets are given as strings with explicit CRLFs.
fn script(name: &'static str, packets: &[&str], output: &[&str]) -> Script {
    Script {
        name,
        fake: Fake::new(),
        packets: packets.iter().map(|p| p.as_bytes().to_vec()).collect(),
        output: output.iter().map(|s| s.to_string()).collect(),
        commits: vec![],
        closed: false,
    }
}

impl Script {
    fn with(mut self, f: impl FnOnce(&mut Fake)) -> Script {
        f(&mut self.fake);
        self
    }
    fn commits(mut self, commits: &[&[u64]]) -> Script {
        self.commits = commits.iter().map(|c| c.to_vec()).collect();
        self
    }
    fn closed(mut self) -> Script {
        self.closed = true;
        self
    }
}

const GREETING: &str = "+OK test.example POP3 ready.";
const LOGIN: &str = "USER alice\r\nPASS secret\r\n";
const LOGGED_IN: [&str; 2] = ["+OK", "+OK Logged in."];
const CAPA_AUTH: &[&str] = &[
    "+OK Capability list follows",
    "TOP",
    "UIDL",
    "RESP-CODES",
    "PIPELINING",
    "AUTH-RESP-CODE",
    "USER",
    "SASL PLAIN",
    ".",
];

fn err(text: &str) -> String {
    format!("-ERR {text}")
}

/// Concatenates lists of expected lines.
fn lines<'a>(parts: &[&[&'a str]]) -> Vec<&'a str> {
    parts.iter().flat_map(|p| p.iter().copied()).collect()
}

fn scripts() -> Vec<Script> {
    let not_logged_in = err(text::NOT_LOGGED_IN);
    let already = err(text::ALREADY_LOGGED_IN);
    let plaintext = err(text::PLAINTEXT_DISALLOWED);
    let auth_failed = err(text::AUTH_FAILED);
    let too_many = err(text::TOO_MANY_BAD_COMMANDS);
    let long_line = format!("NOOP {}\r\nNOOP\r\n", "x".repeat(300));
    let max_line = format!("NOOP{}\r\nQUIT\r\n", " ".repeat(MAX_COMMAND_LINE - 6));
    vec![
        script("quit before login", &["QUIT\r\n"], &[GREETING, "+OK Logging out."]).closed(),
        script(
            "full state diagram",
            &[LOGIN, "STAT\r\n", "LIST\r\n", "UIDL\r\n", "RETR 1\r\n", "DELE 1\r\n", "STAT\r\n", "QUIT\r\n"],
            &lines(&[
                &[GREETING],
                &LOGGED_IN,
                &["+OK 3 69"],
                &["+OK 3 messages (69 octets)", "1 23", "2 40", "3 6", "."],
                &["+OK", "1 0000000001", "2 0000000002", "3 msg3", "."],
                &["+OK 23 octets", "Subject: one", "", "Hello", "."],
                &["+OK message 1 deleted", "+OK 2 46", "+OK Logging out."],
            ]),
        )
        .commits(&[&[101]])
        .closed(),
        script(
            "quit with nothing deleted asks for no commit",
            &[LOGIN, "QUIT\r\n"],
            &lines(&[&[GREETING], &LOGGED_IN, &["+OK Logging out."]]),
        )
        .closed(),
        script(
            "commands in the wrong state",
            &[
                "STAT\r\nLIST\r\nLIST 1\r\nRETR 1\r\nDELE 1\r\nNOOP\r\nRSET\r\nTOP 1 1\r\nUIDL\r\n",
                "CAPA\r\n",
                LOGIN,
                "USER alice\r\nPASS secret\r\nAUTH PLAIN\r\nSTLS\r\n",
                "CAPA\r\n",
            ],
            &lines(&[
                &[GREETING],
                &[not_logged_in.as_str(); 9],
                CAPA_AUTH,
                &LOGGED_IN,
                &[already.as_str(); 4],
                &[
                    "+OK Capability list follows",
                    "TOP",
                    "UIDL",
                    "RESP-CODES",
                    "PIPELINING",
                    "AUTH-RESP-CODE",
                    ".",
                ],
            ]),
        ),
        script(
            "DELE then RSET undeletes",
            &[
                LOGIN,
                "DELE 1\r\nDELE 1\r\nRETR 1\r\nTOP 1 0\r\nLIST 1\r\nUIDL 1\r\nSTAT\r\nLIST\r\nUIDL\r\n",
                "RSET\r\nLIST 1\r\nSTAT\r\nQUIT\r\n",
            ],
            &lines(&[
                &[GREETING],
                &LOGGED_IN,
                &["+OK message 1 deleted"],
                &["-ERR message 1 already deleted"; 5],
                &["+OK 2 46"],
                &["+OK 2 messages (46 octets)", "2 40", "3 6", "."],
                &["+OK", "2 0000000002", "3 msg3", "."],
                &["+OK maildrop has 3 messages (69 octets)", "+OK 1 23", "+OK 3 69"],
                &["+OK Logging out."],
            ]),
        )
        .closed(),
        script(
            "DELE then dropped connection deletes nothing",
            &[LOGIN, "DELE 1\r\nDELE 2\r\n"],
            &lines(&[
                &[GREETING],
                &LOGGED_IN,
                &["+OK message 1 deleted", "+OK message 2 deleted"],
            ]),
        ),
        script(
            "DELE then QUIT commits exactly the deleted keys",
            &[LOGIN, "DELE 3\r\nDELE 1\r\nQUIT\r\n"],
            &lines(&[
                &[GREETING],
                &LOGGED_IN,
                &["+OK message 3 deleted", "+OK message 1 deleted", "+OK Logging out."],
            ]),
        )
        .commits(&[&[101, 103]])
        .closed(),
        script(
            "failed commit still closes",
            &[LOGIN, "DELE 2\r\nQUIT\r\n"],
            &lines(&[&[GREETING], &LOGGED_IN, &["+OK message 2 deleted", &err(text::COMMIT_FAILED)]]),
        )
        .with(|f| f.commit_ok = false)
        .commits(&[&[102]])
        .closed(),
        script(
            "message numbers out of range, zero, garbage",
            &[
                LOGIN,
                "RETR 0\r\nRETR 4\r\nRETR 99999999999999\r\nLIST 0\r\nDELE 4\r\nUIDL 7\r\nTOP 4 0\r\n",
                "RETR abc\r\nRETR -1\r\nRETR +1\r\nRETR\r\nRETR 1 2\r\nLIST x\r\nTOP 1\r\nTOP 1 x\r\nTOP 1 -1\r\nSTAT 1\r\n",
                "STAT\r\n",
            ],
            &lines(&[
                &[GREETING],
                &LOGGED_IN,
                &[
                    "-ERR There's no message 0.",
                    "-ERR There's no message 4.",
                    "-ERR There's no message 4294967295.",
                    "-ERR There's no message 0.",
                    "-ERR There's no message 4.",
                    "-ERR There's no message 7.",
                    "-ERR There's no message 4.",
                ],
                &["-ERR Syntax error, expected: RETR msg"; 5],
                &["-ERR Syntax error, expected: LIST [msg]"],
                &["-ERR Syntax error, expected: TOP msg n"; 3],
                &["-ERR Syntax error, expected: STAT"],
                &["+OK 3 69"],
            ]),
        ),
        script(
            "TOP with 0 lines, some lines, more lines than the body",
            &[LOGIN, "TOP 1 0\r\nTOP 2 1\r\nTOP 2 100\r\nTOP 3 5\r\ntop 1 1\r\n"],
            &lines(&[
                &[GREETING],
                &LOGGED_IN,
                &["+OK top of message follows", "Subject: one", "", "."],
                &["+OK top of message follows", "Subject: two", "", "..dot", "."],
                &[
                    "+OK top of message follows",
                    "Subject: two",
                    "",
                    "..dot",
                    "line2",
                    "...",
                    "line4",
                    ".",
                ],
                &["+OK top of message follows", "X: y", "."],
                &["+OK top of message follows", "Subject: one", "", "Hello", "."],
            ]),
        ),
        script(
            "RETR dot-stuffs lines starting with a dot",
            &[LOGIN, "RETR 2\r\nRETR 3\r\n"],
            &lines(&[
                &[GREETING],
                &LOGGED_IN,
                &["+OK 40 octets", "Subject: two", "", "..dot", "line2", "...", "line4", "."],
                &["+OK 6 octets", "X: y", "."],
            ]),
        ),
        script(
            "unreadable message",
            &[LOGIN, "RETR 1\r\nTOP 1 1\r\nNOOP\r\n"],
            &lines(&[
                &[GREETING],
                &LOGGED_IN,
                &[&err(text::READ_FAILED), &err(text::READ_FAILED), "+OK"],
            ]),
        )
        .with(|f| f.fail_reads = true),
        script(
            "AUTH PLAIN with initial response",
            &["AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n", "STAT\r\n"],
            &[GREETING, "+OK Logged in.", "+OK 3 69"],
        ),
        script(
            "AUTH PLAIN with authzid equal to authcid, lower-case mechanism",
            &["auth plain YWxpY2UAYWxpY2UAc2VjcmV0\r\n"],
            &[GREETING, "+OK Logged in."],
        ),
        script(
            "AUTH PLAIN continuation",
            &["AUTH PLAIN\r\n", "AGFsaWNlAHNlY3JldA==\r\n", "STAT\r\n"],
            &[GREETING, "+ ", "+OK Logged in.", "+OK 3 69"],
        ),
        script(
            "AUTH PLAIN continuation pipelined with the command",
            &["AUTH PLAIN\r\nAGFsaWNlAHNlY3JldA==\r\nSTAT\r\n"],
            &[GREETING, "+ ", "+OK Logged in.", "+OK 3 69"],
        ),
        script(
            "AUTH PLAIN cancelled, then USER/PASS",
            &["AUTH PLAIN\r\n", "*\r\n", LOGIN],
            &lines(&[&[GREETING, "+ ", &err(text::AUTH_CANCELLED)], &LOGGED_IN]),
        ),
        script(
            "AUTH PLAIN bad base64, bad PLAIN messages",
            &[
                "AUTH PLAIN !!!!\r\nAUTH PLAIN\r\nnot base64\r\n",
                "AUTH PLAIN =\r\nAUTH PLAIN AGFsaWNl\r\nAUTH PLAIN AABzZWNyZXQ=\r\n",
                "NOOP\r\n",
            ],
            &[
                GREETING,
                &err(text::BAD_BASE64),
                "+ ",
                &err(text::BAD_BASE64),
                &err(text::BAD_PLAIN),
                &err(text::BAD_PLAIN),
                &err(text::BAD_PLAIN),
                &not_logged_in,
            ],
        ),
        script(
            "AUTH PLAIN authzid other than authcid is refused",
            &["AUTH PLAIN Ym9iAGFsaWNlAHNlY3JldA==\r\n"],
            &[GREETING, &err(text::AUTHZID_REFUSED)],
        ),
        script(
            "AUTH listing and unknown mechanism",
            &["AUTH\r\nAUTH LOGIN\r\nAUTH CRAM-MD5 abc\r\n"],
            &[
                GREETING,
                "+OK",
                "PLAIN",
                ".",
                &err(text::UNSUPPORTED_MECHANISM),
                &err(text::UNSUPPORTED_MECHANISM),
            ],
        ),
        script(
            "wrong password, locked maildrop, temporary failure",
            &[
                "USER alice\r\nPASS wrong\r\n",
                "AUTH PLAIN AGFsaWNlAHdyb25n\r\n",
                "USER bob\r\nPASS secret\r\n",
                "AUTH PLAIN AGJvYgBzZWNyZXQ=\r\n",
                "USER carol\r\nPASS secret\r\n",
                "PASS secret\r\n",
                LOGIN,
            ],
            &lines(&[
                &[GREETING, "+OK", &auth_failed, &auth_failed],
                &["+OK", &err(text::IN_USE), &err(text::IN_USE)],
                &["+OK", &err(text::TEMPORARY_FAILURE)],
                &[&err(text::NO_USERNAME)],
                &LOGGED_IN,
            ]),
        ),
        script(
            "PASS keeps spaces in the password",
            &["USER alice\r\nPASS  sec ret \r\n"],
            &[GREETING, "+OK", &auth_failed],
        ),
        script(
            "plaintext disallowed until STLS",
            &[
                "CAPA\r\nUSER alice\r\nPASS secret\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\nAUTH PLAIN\r\nAUTH\r\n",
                "STLS\r\n",
                "CAPA\r\nSTLS\r\n",
                LOGIN,
            ],
            &lines(&[
                &[GREETING],
                &[
                    "+OK Capability list follows",
                    "TOP",
                    "UIDL",
                    "RESP-CODES",
                    "PIPELINING",
                    "AUTH-RESP-CODE",
                    "STLS",
                    ".",
                ],
                &[plaintext.as_str(); 4],
                &["+OK", "."],
                &["+OK Begin TLS negotiation."],
                CAPA_AUTH,
                &[&err(text::TLS_ACTIVE)],
                &LOGGED_IN,
            ]),
        )
        .with(|f| {
            f.config.tls_available = true;
            f.config.plaintext_auth_allowed = false;
        }),
        script(
            "STLS forgets USER given before it",
            &["USER alice\r\nSTLS\r\n", "PASS secret\r\n"],
            &[GREETING, "+OK", "+OK Begin TLS negotiation.", &err(text::NO_USERNAME)],
        )
        .with(|f| f.config.tls_available = true),
        script(
            "implicit TLS: no STLS offered or accepted",
            &["CAPA\r\nSTLS\r\n"],
            &lines(&[&[GREETING], CAPA_AUTH, &[&err(text::TLS_ACTIVE)]]),
        )
        .with(|f| {
            f.config.tls_available = true;
            f.config.tls_active = true;
        }),
        script(
            "STLS without TLS configured",
            &["STLS\r\n"],
            &[GREETING, &err(text::TLS_UNAVAILABLE)],
        ),
        script(
            "pipelined commands in one packet",
            &["USER alice\r\nPASS secret\r\nSTAT\r\nLIST 2\r\nUIDL 3\r\nNOOP\r\nDELE 2\r\nQUIT\r\n"],
            &lines(&[
                &[GREETING],
                &LOGGED_IN,
                &["+OK 3 69", "+OK 2 40", "+OK 3 msg3", "+OK", "+OK message 2 deleted", "+OK Logging out."],
            ]),
        )
        .commits(&[&[102]])
        .closed(),
        script(
            "bad-command limit closes, later input ignored",
            &["FOO\r\n\r\nAPOP a b\r\nSTAT\r\nQUIT\r\n"],
            &[
                GREETING,
                "-ERR Unknown command",
                "-ERR Unknown command",
                "-ERR Unknown command",
                &not_logged_in,
                &too_many,
            ],
        )
        .with(|f| f.config.max_bad_commands = 3)
        .closed(),
        script(
            "failed logins count toward the bad-command limit",
            &["USER alice\r\nPASS a\r\nUSER alice\r\nPASS b\r\nUSER alice\r\nPASS secret\r\n"],
            &[GREETING, "+OK", &auth_failed, "+OK", &auth_failed, &too_many],
        )
        .with(|f| f.config.max_bad_commands = 1)
        .closed(),
        script(
            "line too long, then resync",
            &[&long_line],
            &[GREETING, &err(text::LINE_TOO_LONG), "-ERR Not logged in."],
        ),
        script(
            "a 255-octet command line is accepted",
            &[&max_line],
            &[GREETING, &not_logged_in, "+OK Logging out."],
        )
        .closed(),
        script(
            "overlong SASL continuation ends the exchange",
            &["AUTH PLAIN\r\n", &format!("{}\r\n", "A".repeat(100)), LOGIN],
            &lines(&[&[GREETING, "+ ", &err(text::LINE_TOO_LONG)], &LOGGED_IN]),
        )
        .with(|f| f.config.max_auth_line = 64),
        script(
            "SASL continuation may exceed the command limit",
            &[
                "AUTH PLAIN\r\n",
                // Valid base64 of 600 zero bytes: too long for a command, bad PLAIN.
                &format!("{}\r\n", "A".repeat(800)),
            ],
            &[GREETING, "+ ", &err(text::BAD_PLAIN)],
        ),
        script(
            "keywords are case-insensitive, lenient spacing",
            &["user alice\r\nPaSs secret\r\nlist  1\r\nNOOP \r\nRETR 1 \r\n"],
            &lines(&[
                &[GREETING],
                &LOGGED_IN,
                &["+OK 1 23", "+OK", "+OK 23 octets", "Subject: one", "", "Hello", "."],
            ]),
        ),
        script(
            "bare LF line ends are accepted",
            &["USER alice\nPASS secret\nSTAT\n"],
            &lines(&[&[GREETING], &LOGGED_IN, &["+OK 3 69"]]),
        ),
    ]
}

#[test]
fn scripted_sessions() {
    for s in scripts() {
        let want: Vec<u8> = s
            .output
            .iter()
            .flat_map(|l| [l.as_bytes(), b"\r\n"].concat())
            .collect();
        for chunk in [1, 2, 5, usize::MAX] {
            let got = run(&s.fake, &s.packets, chunk);
            assert_eq!(
                String::from_utf8_lossy(&got.out),
                String::from_utf8_lossy(&want),
                "script {:?}, chunk {chunk}",
                s.name
            );
            assert_eq!(got.commits, s.commits, "commits of {:?}", s.name);
            assert_eq!(got.closed, s.closed, "closed after {:?}", s.name);
        }
    }
}

#[test]
fn logins_carry_the_exact_credentials() {
    let packets =
        [b"USER alice\r\nPASS  sec ret \r\nAUTH PLAIN YWxpY2UAYWxpY2UAc2VjcmV0\r\n".to_vec()];
    let got = run(&Fake::new(), &packets, usize::MAX);
    assert_eq!(
        got.logins,
        [
            ("alice".to_owned(), " sec ret ".to_owned()),
            ("alice".to_owned(), "secret".to_owned())
        ]
    );
}

#[test]
fn input_pipelined_behind_stls_is_discarded() {
    let mut fake = Fake::new();
    fake.config.tls_available = true;
    // CVE-2011-0411: the USER/PASS sent in the same packet as STLS must not
    // be taken as if they came over TLS.
    let got = run(
        &fake,
        &[format!("STLS\r\n{LOGIN}").into_bytes()],
        usize::MAX,
    );
    assert_eq!(
        got.out,
        format!("{GREETING}\r\n+OK Begin TLS negotiation.\r\n").as_bytes()
    );
    assert_eq!(got.tls_handshakes, 1);
    assert!(got.logins.is_empty());
}

#[test]
fn uidls_are_valid_even_when_the_store_gives_bad_ones() {
    let mut fake = Fake::new();
    fake.messages[0].1 = "has space".into();
    fake.messages[1].1 = "x".repeat(71);
    fake.messages[2].1 = String::new();
    let got = run(
        &fake,
        &[format!("{LOGIN}UIDL\r\n").into_bytes()],
        usize::MAX,
    );
    let out = String::from_utf8(got.out).unwrap();
    let listing: Vec<&str> = out
        .split("\r\n")
        .skip(4)
        .take_while(|l| *l != ".")
        .collect();
    assert_eq!(listing.len(), 3, "{out}");
    let mut seen = Vec::new();
    for (i, line) in listing.iter().enumerate() {
        let (n, uidl) = line.split_once(' ').unwrap();
        assert_eq!(n, (i + 1).to_string());
        assert!(is_valid_uidl(uidl), "{uidl:?}");
        assert!(!seen.contains(&uidl), "duplicate {uidl}");
        seen.push(uidl);
    }
    // Stable across sessions.
    let again = run(
        &fake,
        &[format!("{LOGIN}UIDL\r\n").into_bytes()],
        usize::MAX,
    );
    assert_eq!(String::from_utf8(again.out).unwrap(), out);
}

/// What a session did, for its log line at the end: counted as sent, and
/// deletions only once committed.
#[test]
fn activity_counts_what_was_sent_and_committed() {
    let login = "USER alice\r\nPASS secret\r\n";
    let session = format!("{login}RETR 1\r\nTOP 2 1\r\nRETR 3\r\nDELE 1\r\nDELE 3\r\n");
    let quit = run(
        &Fake::new(),
        &[format!("{session}QUIT\r\n").into_bytes()],
        7,
    );
    assert_eq!(
        quit.activity,
        Activity {
            // Message two's header, blank line and first line: 14 + 2 + 6.
            top: (1, 22),
            retr: (2, 23 + 6),
            deleted: 2,
            messages: 3,
            size: 23 + 40 + 6,
            quit: true,
        }
    );
    // Dropped before QUIT: nothing deleted, no QUIT.
    let dropped = run(&Fake::new(), &[session.clone().into_bytes()], usize::MAX);
    assert_eq!(
        (dropped.activity.deleted, dropped.activity.quit),
        (0, false)
    );
    assert_eq!(dropped.activity.retr, (2, 29));
    // The deletion failed: the client got -ERR, nothing counts as deleted.
    let mut failing = Fake::new();
    failing.commit_ok = false;
    let failed = run(
        &failing,
        &[format!("{session}QUIT\r\n").into_bytes()],
        usize::MAX,
    );
    assert_eq!((failed.activity.deleted, failed.activity.quit), (0, false));
    // QUIT before login.
    let early = run(&Fake::new(), &[b"QUIT\r\n".to_vec()], usize::MAX);
    assert_eq!(
        early.activity,
        Activity {
            quit: true,
            ..Activity::default()
        }
    );
    // A failed read is not a retrieval.
    let mut unreadable = Fake::new();
    unreadable.fail_reads = true;
    let none = run(
        &unreadable,
        &[format!("{login}RETR 1\r\n").into_bytes()],
        usize::MAX,
    );
    assert_eq!(none.activity.retr, (0, 0));
}

#[test]
fn timeout_and_shutdown_close_without_deleting() {
    let mut session = Session::new(SessionConfig::new("h"));
    let mut out = Vec::new();
    assert_eq!(session.line(b"USER alice", &mut out), Step::Send);
    let step = session.line(b"PASS secret", &mut out);
    assert!(matches!(step, Step::Authenticate { .. }));
    let maildrop = Maildrop(vec![MaildropEntry {
        uidl: "u".into(),
        size: 3,
        key: 9,
    }]);
    assert_eq!(
        session.authenticated(AuthResult::Ok(maildrop), &mut out),
        Step::Send
    );
    assert_eq!(session.line(b"DELE 1", &mut out), Step::Send);
    out.clear();
    session.timed_out(&mut out);
    assert_eq!(out, b"-ERR Disconnected for inactivity.\r\n");
    assert_eq!(session.state(), State::Closed);
    // Once closed, nothing more is said or done.
    out.clear();
    session.shutting_down(&mut out);
    assert_eq!(session.line(b"QUIT", &mut out), Step::Close);
    assert!(out.is_empty());

    let mut session = Session::new(SessionConfig::new("h"));
    session.shutting_down(&mut out);
    assert_eq!(out, b"-ERR [SYS/TEMP] Server shutting down.\r\n");
}

#[test]
fn max_line_len_follows_the_sasl_exchange() {
    let mut session = Session::new(SessionConfig::new("h"));
    let mut out = Vec::new();
    assert_eq!(session.max_line_len(), MAX_COMMAND_LINE);
    assert_eq!(session.line(b"AUTH PLAIN", &mut out), Step::Send);
    assert_eq!(session.max_line_len(), DEFAULT_MAX_AUTH_LINE);
    assert_eq!(session.line(b"*", &mut out), Step::Send);
    assert_eq!(session.max_line_len(), MAX_COMMAND_LINE);
}

#[test]
fn request_parsing() {
    use Request as R;
    let cases: &[(&[u8], Result<Request<'_>, ParseError>)] = &[
        (b"STAT", Ok(R::Stat)),
        (b"stat", Ok(R::Stat)),
        (b"LIST", Ok(R::List(None))),
        (b"LIST 12", Ok(R::List(Some(12)))),
        (b"UIDL 1", Ok(R::Uidl(Some(1)))),
        (b"RETR 007", Ok(R::Retr(7))),
        (b"TOP 2 0", Ok(R::Top { msg: 2, lines: 0 })),
        (b"DELE 4294967296", Ok(R::Dele(u32::MAX))),
        (b"USER a@b.example", Ok(R::User("a@b.example"))),
        (b"PASS a b ", Ok(R::Pass(Secret::new("a b ")))),
        (
            b"AUTH",
            Ok(R::Auth {
                mechanism: None,
                initial_response: None,
            }),
        ),
        (
            b"AUTH PLAIN =",
            Ok(R::Auth {
                mechanism: Some("PLAIN"),
                initial_response: Some(Secret::new("=")),
            }),
        ),
        (b"", Err(ParseError::Unknown)),
        (b" STAT", Err(ParseError::Unknown)),
        (b"STATS", Err(ParseError::Unknown)),
        (b"TO 1", Err(ParseError::Unknown)),
        (b"APOP a b", Err(ParseError::Unknown)),
        (b"\xff\xfe", Err(ParseError::Unknown)),
        (b"USER", Err(ParseError::Syntax { usage: "USER name" })),
        (b"USER ", Err(ParseError::Syntax { usage: "USER name" })),
        (b"PASS \xff", Err(ParseError::NotUtf8)),
        (
            b"AUTH PLAIN a b",
            Err(ParseError::Syntax {
                usage: "AUTH [mechanism [initial-response]]",
            }),
        ),
        (b"DELE", Err(ParseError::Syntax { usage: "DELE msg" })),
        (b"NOOP x", Err(ParseError::Syntax { usage: "NOOP" })),
        (b"TOP 1 2 3", Err(ParseError::Syntax { usage: "TOP msg n" })),
    ];
    for (line, want) in cases {
        assert_eq!(
            &Request::parse(line),
            want,
            "{:?}",
            String::from_utf8_lossy(line)
        );
    }
}

/// Issue 9, point 10: `Debug` of a request or step never shows a password.
#[test]
fn debug_output_hides_credentials() {
    let shown = format!("{:?}", Request::parse(b"PASS hunter2").unwrap());
    assert!(!shown.contains("hunter2"), "{shown}");
    // base64("\0alice\0hunter2")
    let token = b"AUTH PLAIN AGFsaWNlAGh1bnRlcjI=";
    let shown = format!("{:?}", Request::parse(token).unwrap());
    assert!(!shown.contains("AGFsaWNl"), "{shown}");
    let mut session = Session::new(SessionConfig::new("h"));
    let mut out = Vec::new();
    for line in [&b"USER alice"[..], b"PASS hunter2", token] {
        let step = session.line(line, &mut out);
        let shown = format!("{step:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        if let Step::Authenticate { .. } = step {
            assert!(shown.contains("alice"), "{shown}");
            // Answer it, so the next line may be fed.
            let _ = session.authenticated(AuthResult::BadCredentials, &mut out);
        }
    }
}
