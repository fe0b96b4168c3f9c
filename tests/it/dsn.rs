//! DSN (RFC 3461) and SMTPUTF8 (RFC 6531) end to end: Python's smtplib
//! sends with `mail_options`/`rcpt_options` to the real `postino`, which
//! relays to aiosmtpd MXs with and without DSN and SMTPUTF8 (found through
//! dnsmasq); the notices postino sends back are read with poplib and taken
//! apart with Python's `email` package.

use std::net::Ipv4Addr;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::delivery::{relay_config, wait_line, wait_messages};
use crate::support::dns::{Dnsmasq, Zone};
use crate::support::mx::{Sink, SinkOptions};
use crate::support::server::{python, TestServer};
use crate::support::{free_tcp_port, unique_loopback, wait_until};

/// Longest wait for anything in these tests.
const LIMIT: Duration = Duration::from_secs(30);

/// Sends one transaction with smtplib. `spec`: `from`, `mail_options`,
/// `rcpts` (`[address, [options]]`), `content`. Prints the EHLO keywords
/// of note and every reply as `[code, text]`.
const SEND: &str = r#"
import json, smtplib, sys
host, port, spec = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
s = smtplib.SMTP(host, port, timeout=20)
s.ehlo("client.test")
out = {"dsn": s.has_extn("dsn"), "smtputf8": s.has_extn("smtputf8")}
def reply(r):
    return [r[0], r[1].decode("utf-8", "replace")]
out["mail"] = reply(s.mail(spec["from"], spec["mail_options"]))
out["rcpt"] = [reply(s.rcpt(a, o)) for a, o in spec["rcpts"]]
if spec.get("content") is not None and any(r[0] == 250 for r in out["rcpt"]):
    out["data"] = reply(s.data(spec["content"].encode("utf-8")))
else:
    s.rset()
s.quit()
print(json.dumps(out))
"#;

/// A user's messages over POP3, each taken apart by the `email` package:
/// the subject, and for a delivery status report its per-message and
/// per-recipient fields and what it returns of the original.
const READ_NOTICES: &str = r#"
import email, json, poplib, sys
host, port, user, password = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
p = poplib.POP3(host, port, timeout=20)
p.user(user); p.pass_(password)
out = []
for n in range(1, p.stat()[0] + 1):
    raw = (b"\r\n".join(p.retr(n)[1]) + b"\r\n").decode("utf-8", "replace")
    msg = email.message_from_string(raw)
    m = {"subject": msg["Subject"], "type": msg.get_content_type(),
         "report_type": msg.get_param("report-type"), "return_path": msg["Return-Path"],
         "fields": {}, "recipients": [], "returned": None, "returned_text": ""}
    if msg.is_multipart():
        parts = msg.get_payload()
        status = [q for q in parts if q.get_content_type() == "message/delivery-status"][0]
        blocks = status.get_payload()
        m["fields"] = dict(blocks[0].items())
        m["recipients"] = [dict(b.items()) for b in blocks[1:]]
        if len(parts) > 2:
            m["returned"] = parts[2].get_content_type()
            m["returned_text"] = parts[2].as_string()
    out.append(m)
p.quit()
print(json.dumps(out))
"#;

#[derive(Debug, Deserialize)]
struct Sent {
    dsn: bool,
    smtputf8: bool,
    mail: (u16, String),
    rcpt: Vec<(u16, String)>,
    data: Option<(u16, String)>,
}

#[derive(Debug, Deserialize)]
struct Notice {
    subject: Option<String>,
    #[serde(rename = "type")]
    content_type: String,
    report_type: Option<String>,
    return_path: Option<String>,
    fields: std::collections::HashMap<String, String>,
    recipients: Vec<std::collections::HashMap<String, String>>,
    returned: Option<String>,
    returned_text: String,
}

impl Notice {
    /// The per-recipient block for `address` (by `Final-Recipient`).
    fn recipient(&self, address: &str) -> Option<&std::collections::HashMap<String, String>> {
        let want = format!("rfc822; {address}");
        self.recipients
            .iter()
            .find(|r| r.get("Final-Recipient").map(String::as_str) == Some(&want))
    }
}

/// The notice in `got` with this subject.
fn the_notice<'a>(got: &'a [Notice], subject: &str) -> &'a Notice {
    got.iter()
        .find(|n| n.subject.as_deref() == Some(subject))
        .unwrap_or_else(|| panic!("no notice {subject:?}: {got:?}"))
}

fn send(server: &TestServer, spec: Value) -> Sent {
    let out = python(
        SEND,
        &[
            &server.smtp.ip().to_string(),
            &server.smtp.port().to_string(),
            &spec.to_string(),
        ],
    );
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn notices(server: &TestServer, user: &str) -> Vec<Notice> {
    let out = python(
        READ_NOTICES,
        &[
            &server.pop3.ip().to_string(),
            &server.pop3.port().to_string(),
            user,
            "pw",
        ],
    );
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// Waits until `user` has `n` messages; returns them.
fn wait_notices(server: &TestServer, user: &str, n: usize) -> Vec<Notice> {
    wait_until(LIMIT, || notices(server, user).len() >= n);
    notices(server, user)
}

/// postino relaying to MXs found through dnsmasq; `alice@example.test` and
/// `bob@example.test` (password `pw`) are local.
fn relay(zone: &Zone, port: u16) -> (TestServer, Dnsmasq) {
    let dns = Dnsmasq::start(zone);
    let server = TestServer::start_with(&relay_config(Some(&dns), port, r#"retry = ["1h"]"#, ""));
    server.add_user("alice@example.test", "pw");
    server.add_user("bob@example.test", "pw");
    (server, dns)
}

/// A receiving MX that offers DSN and records the parameters it gets.
fn dsn_sink(ip: Ipv4Addr, port: u16) -> Sink {
    let options = SinkOptions {
        dsn: true,
        ..SinkOptions::default()
    };
    Sink::start(ip, port, &options)
}

fn message(subject: &str) -> String {
    format!("From: <alice@example.test>\r\nSubject: {subject}\r\n\r\nThe body stays home.\r\n")
}

/// DSN is advertised; its parameters are taken when well-formed, refused
/// `501 5.5.4` when not, and an unknown parameter is `555 5.5.4`.
#[test]
fn dsn_is_advertised_and_its_parameters_checked() {
    let server = TestServer::start();
    server.add_user("alice@example.test", "pw");
    let sent = send(
        &server,
        json!({
            "from": "sender@example.org",
            "mail_options": ["RET=HDRS", "ENVID=QQ+2B314159"],
            "rcpts": [
                ["alice@example.test", ["NOTIFY=NEVER"]],
                ["alice@example.test", ["NOTIFY=SUCCESS,DELAY", "ORCPT=rfc822;alice+40example.test"]],
                ["alice@example.test", ["NOTIFY=NEVER,SUCCESS"]],
                ["alice@example.test", ["NOTIFY=SOMETIMES"]],
                ["alice@example.test", ["ORCPT=alice@example.test"]],
                ["alice@example.test", ["X-FOO=1"]],
                ["alice@example.test", ["RET=FULL"]],
            ],
            "content": null,
        }),
    );
    assert!(sent.dsn && sent.smtputf8, "{sent:?}");
    assert_eq!(sent.mail.0, 250, "{sent:?}");
    let codes: Vec<String> = sent
        .rcpt
        .iter()
        .map(|(c, t)| format!("{c} {}", t.split(' ').next().unwrap_or("")))
        .collect();
    assert_eq!(
        codes,
        [
            "250 2.1.5",
            "250 2.1.5",
            "501 5.5.4",
            "501 5.5.4",
            "501 5.5.4",
            "555 5.5.4",
            "555 5.5.4"
        ],
        "{sent:?}"
    );
    for (mail_options, want) in [
        (vec!["RET=ALL"], "501 5.5.4"),
        (vec!["ENVID=a+0Ab"], "501 5.5.4"),
        (vec!["NOTIFY=NEVER"], "555 5.5.4"),
        (vec!["SIZE=100", "BODY=8BITMIME", "RET=FULL"], "250 2.1.0"),
    ] {
        let sent = send(
            &server,
            json!({"from": "sender@example.org", "mail_options": mail_options, "rcpts": [], "content": null}),
        );
        let got = format!("{} {}", sent.mail.0, sent.mail.1);
        assert!(got.starts_with(want), "{mail_options:?}: {got}");
    }
}

/// NOTIFY decides who is reported: NEVER nobody, FAILURE the failed
/// recipient (with its ORCPT and the ENVID, and only the headers under
/// RET=HDRS), SUCCESS a local delivery (`delivered`).
#[test]
fn notify_decides_the_notices_and_ret_hdrs_returns_headers() {
    let ip = unique_loopback();
    let port = free_tcp_port(&[ip]);
    let _sink = Sink::start(
        ip,
        port,
        &SinkOptions::answering(&[
            ("quiet@perm.test", "550 5.1.1 <quiet@perm.test>: unknown"),
            ("loud@perm.test", "550 5.1.1 <loud@perm.test>: unknown"),
        ]),
    );
    let (server, _dns) = relay(
        &Zone::new("test")
            .mx("perm.test", "mx.perm.test", 10)
            .a("mx.perm.test", ip),
        port,
    );
    let sent = send(
        &server,
        json!({
            "from": "alice@example.test",
            "mail_options": ["RET=HDRS", "ENVID=batch+2B7"],
            "rcpts": [
                ["quiet@perm.test", ["NOTIFY=NEVER"]],
                ["loud@perm.test", ["NOTIFY=FAILURE", "ORCPT=rfc822;Loud+40perm.test"]],
                ["bob@example.test", ["NOTIFY=SUCCESS"]],
            ],
            "content": message("tell me"),
        }),
    );
    assert_eq!(sent.data.as_ref().map(|d| d.0), Some(250), "{sent:?}");
    let id = sent.data.unwrap().1.rsplit(' ').next().unwrap().to_owned();
    wait_line(&server, &["removed from queue", &format!("id={id}")]);
    let got = wait_notices(&server, "alice@example.test", 2);
    assert_eq!(got.len(), 2, "{got:?}");
    for n in &got {
        assert_eq!(n.content_type, "multipart/report", "{n:?}");
        assert_eq!(n.report_type.as_deref(), Some("delivery-status"));
        assert_eq!(n.return_path.as_deref(), Some("<>"), "{n:?}");
        assert_eq!(
            n.fields.get("Original-Envelope-Id").map(String::as_str),
            Some("batch+7")
        );
        assert_eq!(n.returned.as_deref(), Some("text/rfc822-headers"), "{n:?}");
        assert!(n.returned_text.contains("Subject: tell me"), "{n:?}");
        assert!(!n.returned_text.contains("The body stays home"), "{n:?}");
        assert!(
            n.recipient("quiet@perm.test").is_none(),
            "NOTIFY=NEVER: {n:?}"
        );
    }
    let delivered = the_notice(&got, "Successful Mail Delivery Report");
    assert_eq!(delivered.recipients.len(), 1, "{delivered:?}");
    let bob = delivered.recipient("bob@example.test").expect("bob");
    assert_eq!(bob["Action"], "delivered");
    assert_eq!(bob["Status"], "2.0.0");
    let bounce = the_notice(&got, "Undelivered Mail Returned to Sender");
    assert_eq!(bounce.recipients.len(), 1, "{bounce:?}");
    let loud = bounce.recipient("loud@perm.test").expect("loud");
    assert_eq!(loud["Action"], "failed");
    assert_eq!(loud["Status"], "5.1.1");
    assert_eq!(loud["Original-Recipient"], "rfc822;Loud@perm.test");
    // The quiet recipient failed too, and the log says so.
    wait_line(
        &server,
        &[&format!("id={id}"), "to=quiet@perm.test", "status=bounced"],
    );
}

/// NOTIFY=SUCCESS to a next hop with DSN is passed on (with RET, ENVID and
/// ORCPT) and not answered here; to one without DSN postino says
/// `relayed`.
#[test]
fn success_is_passed_on_or_reported_as_relayed() {
    let [with, without]: [Ipv4Addr; 2] = std::array::from_fn(|_| unique_loopback());
    let port = free_tcp_port(&[with, without]);
    let dsn_mx = dsn_sink(with, port);
    let plain_mx = Sink::start(without, port, &SinkOptions::default());
    let (server, _dns) = relay(
        &Zone::new("test")
            .mx("dsn.test", "mx.dsn.test", 10)
            .a("mx.dsn.test", with)
            .mx("plain.test", "mx.plain.test", 10)
            .a("mx.plain.test", without),
        port,
    );
    let sent = send(
        &server,
        json!({
            "from": "alice@example.test",
            "mail_options": ["RET=HDRS", "ENVID=QQ314159"],
            "rcpts": [
                ["carol@dsn.test", ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;carol+2Bx@dsn.test"]],
                ["dave@plain.test", ["NOTIFY=SUCCESS"]],
                ["erin@plain.test", []],
            ],
            "content": message("pass it on"),
        }),
    );
    assert_eq!(sent.data.as_ref().map(|d| d.0), Some(250), "{sent:?}");
    let id = sent.data.unwrap().1.rsplit(' ').next().unwrap().to_owned();
    let with_dsn = wait_messages(&dsn_mx, 1);
    assert_eq!(with_dsn[0].rcpt_tos, ["carol@dsn.test"]);
    for option in ["RET=HDRS", "ENVID=QQ314159"] {
        assert!(
            with_dsn[0].mail_options.iter().any(|o| o == option),
            "{with_dsn:?}"
        );
    }
    assert_eq!(
        with_dsn[0].rcpt_options,
        ["NOTIFY=SUCCESS,FAILURE", "ORCPT=RFC822;CAROL+2BX@DSN.TEST"],
        "aiosmtpd upper-cases them"
    );
    let without_dsn = wait_messages(&plain_mx, 1);
    assert_eq!(
        without_dsn[0].rcpt_tos,
        ["dave@plain.test", "erin@plain.test"]
    );
    assert!(
        !without_dsn[0]
            .mail_options
            .iter()
            .any(|o| o.starts_with("RET") || o.starts_with("ENVID")),
        "no DSN parameters to a host without DSN: {without_dsn:?}"
    );
    wait_line(&server, &["removed from queue", &format!("id={id}")]);
    let got = wait_notices(&server, "alice@example.test", 1);
    assert_eq!(got.len(), 1, "only dave's: {got:?}");
    let n = &got[0];
    assert_eq!(
        n.subject.as_deref(),
        Some("Successful Mail Delivery Report")
    );
    assert_eq!(n.recipients.len(), 1, "{n:?}");
    let dave = n.recipient("dave@plain.test").expect("dave");
    assert_eq!(dave["Action"], "relayed");
    assert_eq!(dave["Status"], "2.0.0");
    assert_eq!(dave["Remote-MTA"], "dns; mx.plain.test");
    assert_eq!(
        n.fields.get("Original-Envelope-Id").map(String::as_str),
        Some("QQ314159")
    );
}

/// An alias forwards the DSN parameters of the address it was sent to, as
/// Postfix does (RFC 3461 §6.2.7): `SUCCESS` is answered by an `expanded`
/// notice at once and not passed on, the rest of `NOTIFY` and the `ORCPT`
/// (the alias itself when none was given) go with each address it expands
/// to, to the next hop and into their notices. `NEVER` on an alias means
/// no bounce for any of its addresses.
#[test]
fn an_alias_answers_success_as_expanded_and_forwards_the_rest() {
    let [with, perm]: [Ipv4Addr; 2] = std::array::from_fn(|_| unique_loopback());
    let port = free_tcp_port(&[with, perm]);
    let dsn_mx = dsn_sink(with, port);
    let _perm_mx = Sink::start(
        perm,
        port,
        &SinkOptions::answering(&[
            ("q@perm.test", "550 5.1.1 <q@perm.test>: unknown"),
            ("l@perm.test", "550 5.1.1 <l@perm.test>: unknown"),
        ]),
    );
    let (server, _dns) = relay(
        &Zone::new("test")
            .mx("dsn.test", "mx.dsn.test", 10)
            .a("mx.dsn.test", with)
            .mx("perm.test", "mx.perm.test", 10)
            .a("mx.perm.test", perm),
        port,
    );
    for (alias, target) in [
        ("team@example.test", "carol@dsn.test"),
        ("team@example.test", "bob@example.test"),
        ("quiet@example.test", "q@perm.test"),
        ("lost@example.test", "l@perm.test"),
    ] {
        let out = server.cli(&["alias", "add", alias, target], "");
        assert!(out.status.success(), "{out:?}");
    }
    let sent = send(
        &server,
        json!({
            "from": "alice@example.test",
            "mail_options": [],
            "rcpts": [
                ["team@example.test", ["NOTIFY=SUCCESS,FAILURE"]],
                ["quiet@example.test", ["NOTIFY=NEVER"]],
                ["lost@example.test", ["NOTIFY=FAILURE", "ORCPT=rfc822;Lost+40example.test"]],
            ],
            "content": message("through aliases"),
        }),
    );
    assert_eq!(sent.data.as_ref().map(|d| d.0), Some(250), "{sent:?}");
    let id = sent.data.unwrap().1.rsplit(' ').next().unwrap().to_owned();

    // The next hop gets the alias's NOTIFY without SUCCESS, and the alias
    // as the original recipient.
    let with_dsn = wait_messages(&dsn_mx, 1);
    assert_eq!(with_dsn[0].rcpt_tos, ["carol@dsn.test"]);
    assert_eq!(
        with_dsn[0].rcpt_options,
        ["NOTIFY=FAILURE", "ORCPT=RFC822;TEAM@EXAMPLE.TEST"],
        "aiosmtpd upper-cases them"
    );
    wait_line(&server, &["removed from queue", &format!("id={id}")]);
    wait_line(
        &server,
        &[&format!("id={id}"), "to=q@perm.test", "status=bounced"],
    );
    // Two notices: team's expansion, and lost's target's bounce; none for
    // quiet's target.
    let got = wait_notices(&server, "alice@example.test", 2);
    assert_eq!(got.len(), 2, "{got:?}");
    let expanded = the_notice(&got, "Successful Mail Delivery Report");
    assert_eq!(expanded.recipients.len(), 1, "{expanded:?}");
    let team = expanded.recipient("team@example.test").expect("team");
    assert_eq!(team["Action"], "expanded");
    assert_eq!(team["Status"], "2.0.0");
    let bounce = the_notice(&got, "Undelivered Mail Returned to Sender");
    assert_eq!(bounce.recipients.len(), 1, "not q@perm.test: {bounce:?}");
    let lost = bounce.recipient("l@perm.test").expect("l");
    assert_eq!(lost["Action"], "failed");
    assert_eq!(lost["Original-Recipient"], "rfc822;Lost@example.test");
    // bob, reached through the alias too, has his copy.
    assert!(wait_until(LIMIT, || notices(&server, "bob@example.test")
        .len()
        == 1));
}

/// A message received with SMTPUTF8 and UTF-8 in its header goes to a next
/// hop with SMTPUTF8 (saying so) and is bounced `5.6.7` for one without;
/// a UTF-8 sender reaches a local mailbox intact over POP3.
#[test]
fn smtputf8_mail_needs_a_next_hop_with_smtputf8() {
    let [utf, plain]: [Ipv4Addr; 2] = std::array::from_fn(|_| unique_loopback());
    let port = free_tcp_port(&[utf, plain]);
    let utf_mx = Sink::start(
        utf,
        port,
        &SinkOptions {
            smtputf8: true,
            ..SinkOptions::default()
        },
    );
    let plain_mx = Sink::start(plain, port, &SinkOptions::default());
    let (server, _dns) = relay(
        &Zone::new("test")
            .mx("utf.test", "mx.utf.test", 10)
            .a("mx.utf.test", utf)
            .mx("plain.test", "mx.plain.test", 10)
            .a("mx.plain.test", plain),
        port,
    );
    let sent = send(
        &server,
        json!({
            "from": "alice@example.test",
            "mail_options": ["SMTPUTF8"],
            "rcpts": [["frank@utf.test", []], ["gus@plain.test", []]],
            "content": "From: <alice@example.test>\r\nSubject: Grüße aus Köln\r\n\r\nHallo.\r\n",
        }),
    );
    assert_eq!(sent.data.as_ref().map(|d| d.0), Some(250), "{sent:?}");
    let id = sent.data.unwrap().1.rsplit(' ').next().unwrap().to_owned();
    let got = wait_messages(&utf_mx, 1);
    assert!(
        got[0].mail_options.iter().any(|o| o == "SMTPUTF8"),
        "{got:?}"
    );
    assert!(String::from_utf8_lossy(&got[0].content).contains("Subject: Grüße aus Köln"));
    wait_line(&server, &["removed from queue", &format!("id={id}")]);
    assert_eq!(plain_mx.count(), 0, "never sent as is");
    let bounces = wait_notices(&server, "alice@example.test", 1);
    let gus = bounces[0].recipient("gus@plain.test").expect("gus");
    assert_eq!(gus["Action"], "failed");
    assert_eq!(gus["Status"], "5.6.7");

    // Inbound: a UTF-8 sender, stored and retrieved as sent.
    let sent = send(
        &server,
        json!({
            "from": "jörg@example.org",
            "mail_options": ["SMTPUTF8"],
            "rcpts": [["bob@example.test", []]],
            "content": "From: Jörg <jörg@example.org>\r\nSubject: Straße\r\n\r\nHallo.\r\n",
        }),
    );
    assert_eq!(sent.data.as_ref().map(|d| d.0), Some(250), "{sent:?}");
    let mail = wait_notices(&server, "bob@example.test", 1);
    assert_eq!(
        mail[0].return_path.as_deref(),
        Some("<jörg@example.org>"),
        "{mail:?}"
    );
    assert_eq!(mail[0].subject.as_deref(), Some("Straße"));
}
