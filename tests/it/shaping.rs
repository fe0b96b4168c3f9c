//! Traffic shaping end to end (issue 12 item 5): per-destination
//! concurrency that starts low, grows while deliveries succeed and backs
//! off after `421`s (`delivery/shaping.rs`), message rates per
//! destination, and submission rate limits per user and per client
//! (`submission_limits.rs`). Real peers on loopback: aiosmtpd as the MX
//! (recording how many transactions it has open at each MAIL), dnsmasq for
//! the MX records, Python's smtplib as the submitting client.

use std::time::Duration;

use crate::admin::{sample, scrape};
use crate::delivery::{lines_with, relay_config, send_from, wait_line, wait_messages};
use crate::support::dns::{Dnsmasq, Zone};
use crate::support::mx::{Sink, SinkOptions};
use crate::support::server::{config_text, python, TestServer};
use crate::support::{free_tcp_port, unique_loopback, wait_until};

const LIMIT: Duration = Duration::from_secs(30);

/// postino relaying to `zone`'s MXs on `port`, with `delivery` lines for
/// `[delivery]` (a `[delivery.rate]` table may end them).
fn relay(zone: &Zone, port: u16, delivery: &str) -> (TestServer, Dnsmasq) {
    let dns = Dnsmasq::start(zone);
    let server = TestServer::start_with(&relay_config(Some(&dns), port, delivery, ""));
    (server, dns)
}

fn send(server: &TestServer, to: &str, i: usize) -> String {
    send_from(server, "alice@example.test", &[to], &format!("shaping {i}"))
}

/// Starting at `initial_concurrency = 1`, the relay opens one transaction
/// at a time, then more as deliveries succeed, up to
/// `concurrency_per_domain` and never past it: as the MX saw it.
#[test]
fn concurrency_starts_low_and_grows_while_deliveries_succeed() {
    let ip = unique_loopback();
    let port = free_tcp_port(&[ip]);
    let sink = Sink::start(
        ip,
        port,
        &SinkOptions {
            delay: Some(Duration::from_millis(300)),
            record: true,
            ..SinkOptions::default()
        },
    );
    let zone = Zone::new("test")
        .mx("grow.test", "mx.grow.test", 10)
        .a("mx.grow.test", ip);
    let (server, _dns) = relay(
        &zone,
        port,
        "retry = [\"1s\"]\nconcurrency_per_domain = 4\ninitial_concurrency = 1",
    );
    let n = 16;
    for i in 0..n {
        send(&server, &format!("u{i}@grow.test"), i);
    }
    assert_eq!(wait_messages(&sink, n).len(), n);
    let open: Vec<usize> = sink.transactions().iter().map(|&(_, n)| n).collect();
    assert_eq!(open.len(), n, "{open:?}");
    assert_eq!(open[0], 1, "starts at one: {open:?}");
    assert_eq!(open.iter().max(), Some(&4), "grows to the limit: {open:?}");
    // Growth is gradual: 2 only once the first delivery succeeded, so the
    // first two MAILs cannot both find another transaction open.
    assert!(open[..2].iter().all(|&n| n <= 2), "{open:?}");
    wait_line(
        &server,
        &[
            "concurrency raised",
            "destination=grow.test",
            "concurrency=4",
        ],
    );
    assert!(
        lines_with(&server, &["concurrency raised", "concurrency=5"]).is_empty(),
        "never past concurrency_per_domain"
    );
}

/// An MX that answers `421` to the first MAILs: the window shrinks one per
/// failure, at concurrency 1 the destination is dead (its waiting mail is
/// deferred without a connection), and after `dead_destination_wait` it is
/// tried at concurrency 1 again. Everything arrives, once.
#[test]
fn a_421_storm_lowers_concurrency_and_kills_the_destination_for_a_while() {
    let ip = unique_loopback();
    let port = free_tcp_port(&[ip]);
    let sink = Sink::start(
        ip,
        port,
        &SinkOptions {
            tempfail: 6,
            delay: Some(Duration::from_millis(200)),
            record: true,
            ..SinkOptions::default()
        },
    );
    let zone = Zone::new("test")
        .mx("sick.test", "mx.sick.test", 10)
        .a("mx.sick.test", ip);
    let (server, _dns) = relay(
        &zone,
        port,
        "retry = [\"1s\"]\nconcurrency_per_domain = 4\ninitial_concurrency = 4\ndead_destination_wait = \"1s\"",
    );
    let n = 8;
    let ids: Vec<String> = (0..n)
        .map(|i| send(&server, &format!("u{i}@sick.test"), i))
        .collect();
    for id in &ids {
        wait_line(&server, &["removed from queue", &format!("id={id}")]);
    }
    let got = sink.messages();
    let mut rcpts: Vec<String> = got.iter().flat_map(|m| m.rcpt_tos.clone()).collect();
    rcpts.sort();
    rcpts.dedup();
    assert_eq!((got.len(), rcpts.len()), (n, n), "each message once");
    let lowered = lines_with(&server, &["concurrency lowered", "destination=sick.test"]);
    assert!(
        lowered.iter().any(|l| l.contains("concurrency=1")),
        "{lowered:#?}"
    );
    assert!(
        lowered.iter().all(|l| l.contains("421 4.7.0")),
        "{lowered:#?}"
    );
    wait_line(
        &server,
        &[
            "dead destination: deliveries suspended",
            "destination=sick.test",
        ],
    );
    wait_line(&server, &["dead destination tried again at concurrency 1"]);
    // The MX saw the first accepted transaction alone: after the storm the
    // relay starts again from one connection, not from where it was.
    let open = sink.transactions();
    assert_eq!(open.first().map(|&(_, n)| n), Some(1), "{open:?}");
    assert!(open.iter().all(|&(_, n)| n <= 4), "{open:?}");
}

/// Mail waiting for a dead destination is deferred at once with Postfix's
/// "delivery temporarily suspended" and the error that killed it, without
/// a connection; `postino queue destinations` shows it dead.
#[test]
fn mail_for_a_dead_destination_is_deferred_without_a_connection() {
    let ip = unique_loopback();
    let port = free_tcp_port(&[ip]);
    // Nobody listens: every connection is refused.
    let zone = Zone::new("test")
        .mx("down.test", "mx.down.test", 10)
        .a("mx.down.test", ip);
    let (server, _dns) = relay(
        &zone,
        port,
        "retry = [\"1h\"]\ninitial_concurrency = 1\ndead_destination_wait = \"1h\"",
    );
    let first = send(&server, "a@down.test", 0);
    wait_line(
        &server,
        &[
            &format!("id={first}"),
            "status=deferred",
            "Connection refused",
        ],
    );
    wait_line(
        &server,
        &[
            "dead destination: deliveries suspended",
            "destination=down.test",
        ],
    );
    let second = send(&server, "b@down.test", 1);
    let line = wait_line(&server, &[&format!("id={second}"), "status=deferred"]);
    assert!(
        line.contains("delivery temporarily suspended") && line.contains("Connection refused"),
        "{line}"
    );
    assert!(
        line.contains("relay=none"),
        "no connection was tried: {line}"
    );
    let out = server.cli(&["queue", "destinations"], "");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let row = text
        .lines()
        .find(|l| l.starts_with("down.test "))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        row.contains("1/20") && row.contains("dead, retried in"),
        "{text}"
    );
    // `queue flush` tries dead destinations too, as `postqueue -f` does.
    let out = server.cli(&["queue", "flush"], "");
    assert!(out.status.success(), "{out:?}");
    wait_line(
        &server,
        &[
            "dead destination revived by a queue flush",
            "destination=down.test",
        ],
    );
    wait_line(
        &server,
        &[
            &format!("id={second}"),
            "status=deferred",
            "attempt=2 ",
            "Connection refused",
        ],
    );
}

/// `[delivery.rate] "rated.test" = "5/s"`: deliveries to that domain start
/// at most five a second, as counted at its MX, each on its first attempt
/// (waiting is not a failure); another domain is not held back by it.
#[test]
fn a_message_rate_spaces_deliveries_to_one_destination() {
    let (rated_ip, free_ip) = (unique_loopback(), unique_loopback());
    let port = free_tcp_port(&[rated_ip, free_ip]);
    let options = SinkOptions {
        record: true,
        ..SinkOptions::default()
    };
    let rated = Sink::start(rated_ip, port, &options);
    let free = Sink::start(free_ip, port, &options);
    let zone = Zone::new("test")
        .mx("rated.test", "mx.rated.test", 10)
        .a("mx.rated.test", rated_ip)
        .mx("free.test", "mx.free.test", 10)
        .a("mx.free.test", free_ip);
    let (server, _dns) = relay(
        &zone,
        port,
        "retry = [\"1s\"]\n[delivery.rate]\n\"rated.test\" = \"5/s\"",
    );
    let n = 12;
    let ids: Vec<String> = (0..n)
        .map(|i| send(&server, &format!("u{i}@rated.test"), i))
        .collect();
    for i in 0..4 {
        send(&server, &format!("f{i}@free.test"), i);
    }
    // While the rated mail waits, the listing shows the rate.
    let mut listing = String::new();
    let seen = wait_until(LIMIT, || {
        let out = server.cli(&["queue", "destinations"], "");
        listing = String::from_utf8_lossy(&out.stdout).into_owned();
        listing
            .lines()
            .any(|l| l.starts_with("rated.test ") && l.contains("5/s") && l.contains("throttled"))
    });
    assert!(seen, "{listing}");
    assert_eq!(wait_messages(&free, 4).len(), 4);
    assert_eq!(wait_messages(&rated, n).len(), n);
    let at: Vec<f64> = rated.transactions().iter().map(|&(t, _)| t).collect();
    assert_eq!(at.len(), n);
    // Five a second, evenly spaced (one per 200 ms): any six starts span a
    // second (less a little for connection set-up that differs).
    for w in at.windows(6) {
        assert!(
            w[5] - w[0] >= 0.9,
            "six deliveries within {:.3}s: {at:?}",
            w[5] - w[0]
        );
    }
    for id in &ids {
        let line = wait_line(&server, &[&format!("id={id}"), "status=sent"]);
        assert!(line.contains("attempt=1 "), "{line}");
    }
    assert!(lines_with(&server, &["status=deferred"]).is_empty());
    wait_line(
        &server,
        &[
            "destination throttled by its rate",
            "destination=rated.test",
            "rate=5/s",
        ],
    );
    assert!(lines_with(&server, &["destination throttled", "destination=free.test"]).is_empty());
}

/// The base configuration with `limits` lines in `[limits]` and the users
/// alice and bob (password `pw`); mail for unknown local users goes to the
/// postmaster (the recipients `r0@`, `r1@` … of [`SUBMIT_PY`]).
fn limited_server(limits: &str) -> TestServer {
    let server = TestServer::start_with(&config_text(
        "",
        "",
        "unknown_user = \"postmaster\"",
        &format!("[limits]\n{limits}\n[admin]\nlisten = \"127.0.0.1:0\"\n"),
    ));
    server.add_user("alice@example.test", "pw");
    server.add_user("bob@example.test", "pw");
    server.add_user("postmaster@example.test", "pw");
    server
}

/// Sends one message per line of `plan` (`user recipient-count`), each on
/// a new connection from `source` (so they spread over the worker
/// arbiters); prints one line per message: the MAIL reply code, the RCPT
/// reply codes, and the DATA reply code (or `-`).
const SUBMIT_PY: &str = r#"
import smtplib, sys
host, port, source = sys.argv[1], int(sys.argv[2]), sys.argv[3]
for item in sys.argv[4:]:
    user, n = item.split(":")
    s = smtplib.SMTP(host, port, timeout=20, source_address=(source, 0))
    s.ehlo("client.test")
    if user != "-":
        s.login(user, "pw")
    sender = user if user != "-" else "someone@example.test"
    code, msg = s.mail(sender)
    out = [str(code)]
    ok = 0
    if code == 250:
        for i in range(int(n)):
            c, m = s.rcpt("r%d@example.test" % i)
            out.append(str(c))
            if c == 452:
                out.append(m.decode().split()[0])
            ok += c == 250
    else:
        out.append(msg.decode().split()[0])
    if ok:
        c, m = s.data(b"Subject: limits\r\n\r\nhello\r\n")
        out.append(str(c))
    else:
        out.append("-")
    s.quit()
    print(" ".join(out))
"#;

fn submit(server: &TestServer, source: &str, plan: &[&str]) -> Vec<String> {
    let mut args = vec![
        server.smtp.ip().to_string(),
        server.smtp.port().to_string(),
        source.to_owned(),
    ];
    args.extend(plan.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    python(SUBMIT_PY, &args)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// `messages_per_user = "3/h"`: the fourth message of a user in the hour is
/// refused at MAIL with `452 4.7.0`, although each came on its own
/// connection (alternating between the worker arbiters); another user is
/// not affected; the refusal is logged once per window and counted.
#[test]
fn the_message_limit_per_user_holds_across_connections_and_workers() {
    let server = limited_server("messages_per_user = \"3/h\"");
    let a = "alice@example.test:1";
    let got = submit(&server, "127.0.0.1", &[a, a, a, a, a, "bob@example.test:1"]);
    assert_eq!(
        got,
        [
            "250 250 250",
            "250 250 250",
            "250 250 250",
            "452 4.7.0 -",
            "452 4.7.0 -",
            "250 250 250",
        ],
        "{}",
        server.log()
    );
    let logged = lines_with(
        &server,
        &["submission rate limit reached", "messages_per_user"],
    );
    assert_eq!(logged.len(), 1, "logged once per window: {logged:#?}");
    assert!(logged[0].contains("alice@example.test") && logged[0].contains("3/h"));
    wait_line(&server, &["NOQUEUE: reject: MAIL", "452 4.7.0"]);
    let samples = scrape(&server);
    assert_eq!(
        sample(
            &samples,
            "postino_submission_rate_limited_total{reason=\"messages_per_user\"}"
        ),
        2.0,
        "each refusal counted"
    );
}

/// `recipients_per_user`: RCPTs past the count get `452 4.7.0` (the
/// message goes on with those accepted); `messages_per_client`: a second
/// client address is counted apart, and authenticated or not a client is
/// limited. A reload raises the limit for the next MAIL.
#[test]
fn recipient_and_client_limits_and_their_reload() {
    let mut server = limited_server("recipients_per_user = \"5/h\"\nmessages_per_client = \"2/h\"");
    let got = submit(
        &server,
        "127.0.0.1",
        &["alice@example.test:4", "alice@example.test:3", "-:1"],
    );
    assert_eq!(
        got,
        [
            "250 250 250 250 250 250",
            "250 250 452 4.7.0 452 4.7.0 250",
            "452 4.7.0 -"
        ],
        "{}",
        server.log()
    );
    let other = submit(&server, "127.0.0.2", &["-:1"]);
    assert_eq!(other, ["250 250 250"], "another client has its own count");
    // A reload puts the new limits in place, for connections to come.
    let text = std::fs::read_to_string(&server.config).unwrap();
    server.set_config(&text.replace(
        "messages_per_client = \"2/h\"",
        "messages_per_client = \"4/h\"",
    ));
    let out = server.cli(&["reload"], "");
    assert!(out.status.success(), "{out:?}");
    let got = submit(&server, "127.0.0.1", &["-:1", "-:1", "-:1"]);
    assert_eq!(got, ["250 250 250", "250 250 250", "452 4.7.0 -"]);
}
