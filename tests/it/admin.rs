//! The admin HTTP listener: `/metrics` read by a real OpenMetrics parser
//! (Debian's `python3-prometheus-client`), `/healthz`, the bearer token,
//! and the JSON API over the queue, users and POP3 sessions (`who`, `kick`),
//! all through curl.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use crate::support::server::{config_text, python, Raw, TestServer};
use crate::support::{free_tcp_port, wait_until};

/// A server with the admin listener on a free loopback port.
fn server(admin: &str, routing: &str) -> TestServer {
    let server = TestServer::start_with(&config_text(
        "",
        "",
        routing,
        &format!("[admin]\nlisten = \"127.0.0.1:0\"\n{admin}\n[delivery]\nretry = [\"1h\"]\n"),
    ));
    assert!(server.admin.is_some(), "admin address in the log");
    server
}

/// `curl -X method url` with extra arguments: (HTTP status, body).
pub(crate) fn curl(method: &str, url: &str, extra: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "20",
            "-X",
            method,
            "-w",
            "\n%{http_code}",
        ])
        .args(extra)
        .arg(url)
        .output()
        .expect("run curl");
    assert!(out.status.success(), "curl failed: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').expect("status line");
    (code.trim().parse().expect("HTTP status"), body.to_owned())
}

fn url(server: &TestServer, path: &str) -> String {
    format!("http://{}{path}", server.admin.expect("admin listener"))
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// Every sample of `/metrics`, as `name{labels}` → value, parsed by
/// prometheus_client's OpenMetrics parser (which refuses anything that is
/// not valid OpenMetrics: a missing `# EOF`, a unit not in the name, …).
pub(crate) fn scrape(server: &TestServer) -> BTreeMap<String, f64> {
    let out = Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "20", "-D", "/dev/stderr"])
        .arg(url(server, "/metrics"))
        .output()
        .expect("run curl");
    assert!(out.status.success(), "{out:?}");
    let headers = String::from_utf8_lossy(&out.stderr).to_ascii_lowercase();
    assert!(
        headers.contains("content-type: application/openmetrics-text"),
        "{headers}"
    );
    let text = String::from_utf8(out.stdout).expect("UTF-8 metrics");
    let script = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = {}
for family in text_string_to_metric_families(sys.argv[1]):
    assert family.name.startswith("postino_"), family.name
    assert family.documentation, family.name
    for s in family.samples:
        labels = ",".join('%s="%s"' % kv for kv in sorted(s.labels.items()))
        out["%s{%s}" % (s.name, labels)] = s.value
print(json.dumps(out))
"#;
    // Debian's module is installed for Debian's Python.
    let out = Command::new("/usr/bin/python3")
        .args(["-c", script, &text])
        .output()
        .expect("run /usr/bin/python3");
    assert!(
        out.status.success(),
        "the OpenMetrics parser refused /metrics: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("parser output")
}

pub(crate) fn sample(samples: &BTreeMap<String, f64>, key: &str) -> f64 {
    *samples
        .get(key)
        .unwrap_or_else(|| panic!("no {key} in {samples:#?}"))
}

/// Sends one message to each of `rcpts` over SMTP; returns the replies to
/// RCPT, one per recipient, and to the end of DATA (or the RCPT failure).
fn send(server: &TestServer, rcpts: &[&str]) -> Vec<String> {
    let mut smtp = Raw::connect(server.smtp);
    let mut replies = Vec::new();
    smtp.reply();
    smtp.cmd("EHLO client.test");
    smtp.cmd("MAIL FROM:<alice@example.test>");
    for r in rcpts {
        replies.push(smtp.cmd(&format!("RCPT TO:<{r}>")));
    }
    if replies.iter().any(|r| r.starts_with("250")) {
        smtp.cmd("DATA");
        smtp.send(b"Subject: admin test\r\n\r\nhello\r\n.\r\n");
        replies.push(smtp.reply());
    }
    smtp.cmd("QUIT");
    replies
}

#[test]
fn metrics_are_valid_openmetrics_and_count_what_happened() {
    let server = server("", "");
    server.add_user("bob@example.test", "secret");
    let replies = send(&server, &["nobody@example.test", "bob@example.test"]);
    assert!(replies[0].starts_with("550"), "{replies:?}");
    assert!(replies[2].starts_with("250"), "{replies:?}");
    python(
        r#"
import poplib, sys
p = poplib.POP3(sys.argv[1], int(sys.argv[2]))
try:
    p.user("bob@example.test"); p.pass_("wrong")
except poplib.error_proto:
    pass
p.quit()
"#,
        &[
            &server.pop3.ip().to_string(),
            &server.pop3.port().to_string(),
        ],
    );

    let m = scrape(&server);
    assert_eq!(sample(&m, "postino_messages_accepted_total{}"), 1.0);
    assert!(sample(&m, "postino_messages_accepted_bytes_total{}") > 20.0);
    assert_eq!(
        sample(
            &m,
            "postino_messages_rejected_total{reason=\"unknown_user\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(
            &m,
            "postino_logins_total{protocol=\"pop3\",result=\"failure\"}"
        ),
        1.0
    );
    assert!(sample(&m, "postino_sessions_opened_total{protocol=\"smtp\"}") >= 1.0);
    assert!(sample(&m, "postino_sessions_opened_total{protocol=\"pop3\"}") >= 1.0);
    // At least the flush before the 250: a histogram with buckets.
    assert!(sample(&m, "postino_commit_batch_messages_count{}") >= 1.0);
    assert!(sample(&m, "postino_commit_duration_seconds_count{}") >= 1.0);
    assert!(sample(&m, "postino_commit_duration_seconds_bucket{le=\"+Inf\"}") >= 1.0);
    assert_eq!(sample(&m, "postino_queue_messages{}"), 0.0);
    assert_eq!(sample(&m, "postino_queue_oldest_age_seconds{}"), 0.0);

    let (status, body) = curl("GET", &url(&server, "/healthz"), &[]);
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, body) = curl("GET", &url(&server, "/api/users"), &[]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["ok"], serde_json::json!(["bob@example.test"]));
    let (status, body) = curl(
        "GET",
        &url(&server, "/api/users/bob@example.test/mailbox"),
        &[],
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body).as_array().map(Vec::len), Some(1), "{body}");
    let (status, _) = curl(
        "GET",
        &url(&server, "/api/users/nobody@example.test/mailbox"),
        &[],
    );
    assert_eq!(status, 404);
}

#[test]
fn a_token_is_required_when_set() {
    let server = server("token = \"s3cret-token\"", "");
    for extra in [
        &[][..],
        &["-H", "Authorization: Bearer wrong-token"][..],
        &["-H", "Authorization: Bearer s3cret-toke"][..],
        &["-H", "Authorization: Basic s3cret-token"][..],
    ] {
        for path in ["/metrics", "/healthz", "/api/queue"] {
            let (status, body) = curl("GET", &url(&server, path), extra);
            assert_eq!(status, 401, "{path} {extra:?}: {body}");
        }
    }
    let (status, body) = curl(
        "GET",
        &url(&server, "/healthz"),
        &["-H", "Authorization: Bearer s3cret-token"],
    );
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    assert!(
        !server.log().contains("s3cret-token"),
        "the token is never logged"
    );
}

#[test]
fn refuses_to_start_on_a_public_address_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("postino.toml");
    std::fs::write(
        &config,
        "data_dir = \"data\"\n[admin]\nlisten = \"0.0.0.0:0\"\n",
    )
    .unwrap();
    let out = Command::new(crate::support::server::binary())
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("postino.toml:3"), "{err}");
    assert!(
        err.contains("admin.listen") && err.contains("admin.token"),
        "{err}"
    );
    assert!(!dir.path().join("data").exists(), "nothing started");
}

#[test]
fn queue_api_pages_shows_deletes_and_bounces() {
    // A smarthost that refuses connections: every message is deferred and
    // waits an hour.
    let port = free_tcp_port(&[Ipv4Addr::LOCALHOST]);
    let server = server("", &format!("smarthost = \"127.0.0.1:{port}\""));
    server.add_user("alice@example.test", "secret");
    let mut ids = Vec::new();
    for who in ["one", "two", "three"] {
        let replies = send(&server, &[&format!("{who}@remote.test")]);
        let done = replies.last().unwrap();
        assert!(done.starts_with("250"), "{done}");
        ids.push(done.rsplit(' ').next().unwrap().to_owned());
        assert!(server.wait_for_log(&format!("id={} ", ids.last().unwrap())));
    }
    for id in &ids {
        assert!(
            wait_until(Duration::from_secs(20), || {
                let (_, body) = curl("GET", &url(&server, &format!("/api/queue/{id}")), &[]);
                body.contains("\"deferred\"")
            }),
            "{id} deferred"
        );
    }

    // Paging: two, then the last one.
    let (status, body) = curl("GET", &url(&server, "/api/queue?limit=2"), &[]);
    assert_eq!(status, 200, "{body}");
    let page = json(&body);
    let listed: Vec<&str> = page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [ids[0].as_str(), ids[1].as_str()]);
    assert_eq!(page["next"], ids[1].as_str());
    let (_, body) = curl(
        "GET",
        &url(&server, &format!("/api/queue?limit=2&after={}", ids[1])),
        &[],
    );
    let page = json(&body);
    assert_eq!(page["entries"][0]["id"], ids[2].as_str());
    assert_eq!(page["entries"].as_array().unwrap().len(), 1);
    assert!(page.get("next").is_none(), "{body}");

    let (status, body) = curl("GET", &url(&server, &format!("/api/queue/{}", ids[0])), &[]);
    assert_eq!(status, 200);
    let entry = json(&body);
    assert_eq!(entry["sender"], "alice@example.test");
    assert_eq!(entry["attempts"], 1);
    assert_eq!(entry["recipients"][0]["address"], "one@remote.test");
    assert_eq!(entry["recipients"][0]["state"], "deferred");

    let m = scrape(&server);
    assert_eq!(sample(&m, "postino_queue_messages{}"), 3.0);
    assert!(sample(&m, "postino_deliveries_total{status=\"deferred\"}") >= 3.0);

    // Delete: gone; a second delete and a bad id are errors.
    let del = url(&server, &format!("/api/queue/{}", ids[1]));
    let (status, body) = curl("DELETE", &del, &[]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(curl("DELETE", &del, &[]).0, 404);
    assert_eq!(curl("GET", &del, &[]).0, 404);
    assert_eq!(
        curl("GET", &url(&server, "/api/queue/not-an-id"), &[]).0,
        400
    );

    // Bounce: gone from the queue, and the sender gets the report.
    let (status, body) = curl(
        "POST",
        &url(&server, &format!("/api/queue/{}/bounce", ids[2])),
        &[],
    );
    assert_eq!(status, 200, "{body}");
    assert!(
        wait_until(Duration::from_secs(20), || {
            let (_, body) = curl(
                "GET",
                &url(&server, "/api/users/alice@example.test/mailbox"),
                &[],
            );
            json(&body).as_array().is_some_and(|m| m.len() == 1)
        }),
        "a bounce in alice's mailbox"
    );

    let (status, body) = curl("POST", &url(&server, "/api/queue/flush"), &[]);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("scheduled for delivery now"), "{body}");
    let (_, body) = curl("GET", &url(&server, "/api/queue"), &[]);
    let left: Vec<String> = json(&body)["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(left, [ids[0].clone()], "deleted and bounced are gone");
}

/// A POP3 client logged in and idle, as a raw connection.
fn pop3_login(addr: SocketAddr, user: &str) -> Raw {
    let mut pop = Raw::connect(addr);
    assert!(pop.line().starts_with("+OK"));
    pop.send(format!("USER {user}\r\n").as_bytes());
    assert!(pop.line().starts_with("+OK"));
    pop.send(b"PASS secret\r\n");
    let ok = pop.line();
    assert!(ok.starts_with("+OK"), "{ok}");
    pop
}

#[test]
fn who_lists_pop3_sessions_and_kick_ends_them() {
    let server = server("", "");
    server.add_user("bob@example.test", "secret");
    server.add_user("carol@example.test", "secret");
    let mut bob = pop3_login(server.pop3, "bob@example.test");
    let mut carol = pop3_login(server.pop3, "carol@example.test");

    let out = server.cli(&["who"], "");
    assert!(out.status.success(), "{out:?}");
    let who = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(who.contains("bob@example.test"), "{who}");
    assert!(who.contains(&bob.local_addr().to_string()), "{who}");
    assert!(who.contains("2 POP3 session(s)"), "{who}");

    // The API shows the same sessions, with ids.
    let (status, body) = curl("GET", &url(&server, "/api/pop3/sessions"), &[]);
    assert_eq!(status, 200, "{body}");
    let sessions = json(&body);
    let carol_id = sessions
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["user"] == "carol@example.test")
        .map(|s| s["id"].as_u64().unwrap())
        .unwrap_or_else(|| panic!("{body}"));

    // kick by user (CLI), then by id (API): each connection is closed.
    let out = server.cli(&["kick", "bob@example.test"], "");
    assert!(out.status.success(), "{out:?}");
    assert!(bob.closed(), "bob's connection closed");
    let (status, body) = curl(
        "DELETE",
        &url(&server, &format!("/api/pop3/sessions/{carol_id}")),
        &[],
    );
    assert_eq!(status, 200, "{body}");
    assert!(carol.closed(), "carol's connection closed");
    assert!(
        wait_until(Duration::from_secs(20), || {
            let (_, body) = curl("GET", &url(&server, "/api/pop3/sessions"), &[]);
            json(&body).as_array().is_some_and(Vec::is_empty)
        }),
        "no session left"
    );
    let out = server.cli(&["kick", "bob@example.test"], "");
    assert!(!out.status.success(), "nobody left to kick: {out:?}");
    // The maildrop lock went with the session: bob logs in again.
    let mut bob = pop3_login(server.pop3, "bob@example.test");
    bob.send(b"QUIT\r\n");
    assert!(bob.line().starts_with("+OK"));
}
