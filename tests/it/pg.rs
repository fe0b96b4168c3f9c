//! The PostgreSQL store through the real `postino` binary: a store moved
//! from sled into PostgreSQL and back with `postino store export|import`
//! keeps everything, UIDLs included (a throwaway PostgreSQL from
//! `postino_pg::testing`).

use std::path::Path;

use postino_pg::testing::TestCluster;

use crate::support::server::{cli_with_config, config_text, smtplib_send, Raw, TestServer};

fn ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "postino failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A configuration file for the PostgreSQL store at `url`.
fn pg_config(dir: &Path, url: &str, node: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{node}.toml"));
    let text = config_text(
        "",
        "",
        "",
        &format!("backend = \"postgres\"\nurl = \"{url}\"\nnode = \"{node}\"\n"),
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// The export's lines after the header, and the header's UIDL epoch.
fn records(export: &str) -> (u64, Vec<serde_json::Value>) {
    let mut lines = export.lines().map(|l| serde_json::from_str(l).unwrap());
    let header: serde_json::Value = lines.next().unwrap();
    assert_eq!(header["format"], "postino-store");
    (header["uidl_epoch"].as_u64().unwrap(), lines.collect())
}

#[test]
fn store_moves_from_sled_to_postgres_and_back() {
    let cluster = TestCluster::start().expect("start a throwaway PostgreSQL");
    let url = cluster.create_database("moved").unwrap();
    // Mail in a sled store, through the real server.
    let mut server = TestServer::start();
    server.add_user("alice@example.test", "pw");
    ok(server.cli(
        &["alias", "add", "team@example.test", "alice@example.test"],
        "",
    ));
    let mut c = Raw::connect(server.smtp);
    c.reply();
    c.cmd("EHLO client.test");
    for i in 0..3 {
        assert!(c.cmd("MAIL FROM:<a@b.test>").starts_with("250"));
        assert!(c.cmd("RCPT TO:<team@example.test>").starts_with("250"));
        assert!(c.cmd("DATA").starts_with("354"));
        let reply = c.cmd(&format!("Subject: m{i}\r\n\r\nhello {i}\r\n."));
        assert!(reply.starts_with("250 2.0.0"), "{reply}");
    }
    c.cmd("QUIT");
    server.terminate();
    let work = tempfile::tempdir().unwrap();
    let from_sled = work.path().join("sled.jsonl");
    ok(server.cli(&["store", "export", "-o", from_sled.to_str().unwrap()], ""));

    // Into PostgreSQL.
    let pg = pg_config(work.path(), &url, "mx1");
    let out = ok(cli_with_config(
        &pg,
        &["store", "import", from_sled.to_str().unwrap()],
        "",
    ));
    assert!(
        out.contains("imported 1 users, 1 aliases, 3 mailbox entries"),
        "{out}"
    );
    // A second import is refused: the database is not empty.
    assert!(
        !cli_with_config(&pg, &["store", "import", from_sled.to_str().unwrap()], "")
            .status
            .success()
    );
    let from_pg = work.path().join("pg.jsonl");
    ok(cli_with_config(
        &pg,
        &["store", "export", "-o", from_pg.to_str().unwrap()],
        "",
    ));
    let sled_text = std::fs::read_to_string(&from_sled).unwrap();
    let pg_text = std::fs::read_to_string(&from_pg).unwrap();
    assert_eq!(
        records(&pg_text),
        records(&sled_text),
        "PostgreSQL keeps every record, UIDLs included"
    );

    // And back into a new sled store.
    let back = TestServer::configured(&config_text("", "", "", ""));
    ok(back.cli(&["store", "import", from_pg.to_str().unwrap()], ""));
    let again = work.path().join("again.jsonl");
    ok(back.cli(&["store", "export", "-o", again.to_str().unwrap()], ""));
    let again_text = std::fs::read_to_string(&again).unwrap();
    assert_eq!(records(&again_text), records(&sled_text));
}

/// Logs in over POP3 and answers the reply to PASS.
fn pop_login(addr: std::net::SocketAddr, user: &str, password: &str) -> (Raw, String) {
    let mut c = Raw::connect(addr);
    assert!(c.line().starts_with("+OK"));
    assert!(c.cmd(&format!("USER {user}")).starts_with("+OK"));
    let reply = c.cmd(&format!("PASS {password}"));
    (c, reply)
}

/// The UIDL listing (`+OK` line and the dot left out).
fn uidl(c: &mut Raw) -> Vec<String> {
    assert!(c.cmd("UIDL").starts_with("+OK"));
    let mut out = Vec::new();
    loop {
        let line = c.line();
        if line == "." {
            return out;
        }
        out.push(line);
    }
}

#[test]
fn two_nodes_share_mailboxes_and_the_maildrop_lock() {
    let cluster = TestCluster::start().expect("start a throwaway PostgreSQL");
    let url = cluster.create_database("shared").unwrap();
    {
        // A user added through any node's store is every node's.
        let store =
            postino_pg::PgStore::open(&postino_pg::PgOptions::new(url.as_str(), "admin")).unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(store.add_user("alice@example.test", "pw"))
            .unwrap();
    }
    let node = |name: &str| {
        TestServer::start_with(&config_text(
            "",
            "",
            "",
            &format!("backend = \"postgres\"\nurl = \"{url}\"\nnode = \"{name}\"\n"),
        ))
    };
    let (a, b) = (node("a"), node("b"));
    // Accepted on a...
    let mut c = Raw::connect(a.smtp);
    c.reply();
    c.cmd("EHLO client.test");
    assert!(c.cmd("MAIL FROM:<s@b.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<alice@example.test>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    let reply = c.cmd("Subject: shared\r\n\r\nfrom node a\r\n.");
    assert!(reply.starts_with("250 2.0.0"), "{reply}");
    c.cmd("QUIT");
    // ...read on b, while a POP3 session on b locks a out.
    let (mut on_b, reply) = pop_login(b.pop3, "alice@example.test", "pw");
    assert!(reply.starts_with("+OK"), "{reply}");
    assert!(on_b.cmd("STAT").starts_with("+OK 1 "));
    let uidls_b = uidl(&mut on_b);
    assert!(on_b.cmd("RETR 1").starts_with("+OK"));
    let mut text = String::new();
    loop {
        let line = on_b.line();
        if line == "." {
            break;
        }
        text.push_str(&line);
        text.push('\n');
    }
    assert!(text.contains("from node a"), "{text}");
    let (_, locked) = pop_login(a.pop3, "alice@example.test", "pw");
    assert!(
        locked.starts_with("-ERR") && locked.contains("IN-USE"),
        "{locked}"
    );
    assert!(on_b.cmd("QUIT").starts_with("+OK"));
    // Once b's session ended, a serves the same mailbox, the same UIDLs.
    let mut unlocked = None;
    for _ in 0..200 {
        let (c, reply) = pop_login(a.pop3, "alice@example.test", "pw");
        if reply.starts_with("+OK") {
            unlocked = Some(c);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut on_a = unlocked.expect("b's lock was released");
    assert_eq!(uidl(&mut on_a), uidls_b);
    on_a.cmd("QUIT");
}

/// Three nodes relay through one smarthost (aiosmtpd, recording what it
/// gets): mail accepted on every node, each message delivered exactly once,
/// and the deliveries spread over the nodes.
#[test]
fn three_nodes_share_the_queue_and_deliver_each_message_once() {
    use crate::support::mx::{Sink, SinkOptions};
    use crate::support::{free_tcp_port, unique_loopback, wait_until};
    let cluster = TestCluster::start().expect("start a throwaway PostgreSQL");
    let url = cluster.create_database("relay").unwrap();
    let ip = unique_loopback();
    let port = free_tcp_port(&[ip]);
    let sink = Sink::start(ip, port, &SinkOptions::default());
    let node = |name: &str| {
        TestServer::start_with(&config_text(
            "",
            "",
            &format!("smarthost = \"{ip}:{port}\""),
            &format!(
                "backend = \"postgres\"\nurl = \"{url}\"\nnode = \"{name}\"\n\
                 [delivery]\nretry = [\"1s\"]\nconnect_timeout = \"2s\"\n\
                 [dns]\nnameservers = []\ntimeout = \"2s\"\n"
            ),
        ))
    };
    let nodes = [node("n1"), node("n2"), node("n3")];
    let per_node = 10;
    let mut sent = Vec::new();
    for (n, server) in nodes.iter().enumerate() {
        let mut c = Raw::connect(server.smtp);
        assert!(c.reply().starts_with("220"));
        c.cmd("EHLO client.test");
        for i in 0..per_node {
            let subject = format!("n{n}-m{i}");
            assert!(c.cmd("MAIL FROM:<s@example.test>").starts_with("250"));
            let r = c.cmd(&format!("RCPT TO:<r{i}@remote.test>"));
            assert!(r.starts_with("250"), "{r}");
            assert!(c.cmd("DATA").starts_with("354"));
            let r = c.cmd(&format!("Subject: {subject}\r\n\r\nrelayed\r\n."));
            assert!(r.starts_with("250 2.0.0"), "{r}\n{}", server.log());
            sent.push(subject);
        }
        c.cmd("QUIT");
    }
    let total = sent.len();
    assert!(
        wait_until(std::time::Duration::from_secs(60), || sink.count() >= total),
        "{} of {total} delivered",
        sink.count()
    );
    let mut got: Vec<String> = sink
        .messages()
        .iter()
        .map(|m| {
            let text = String::from_utf8_lossy(&m.content).into_owned();
            let subject = text
                .lines()
                .find_map(|l| l.strip_prefix("Subject: "))
                .unwrap_or_default()
                .to_owned();
            subject
        })
        .collect();
    got.sort();
    sent.sort();
    assert_eq!(got, sent, "each message delivered exactly once");
    // Who delivered: every delivery is logged by the node that made it.
    let delivering = nodes
        .iter()
        .filter(|n| n.log().contains("status=sent"))
        .count();
    eprintln!("{delivering} of 3 nodes delivered");
    assert!(delivering >= 1);
}

/// Logs in with Python's poplib: the subjects in the mailbox, or
/// "ERR text" when the login is refused.
fn poplib_subjects(server: &TestServer, user: &str, password: &str) -> String {
    crate::support::server::python(
        r#"
import poplib, sys
p = poplib.POP3(sys.argv[1], int(sys.argv[2]), timeout=30)
try:
    p.user(sys.argv[3]); p.pass_(sys.argv[4])
except poplib.error_proto as e:
    print("ERR", e.args[0].decode()); sys.exit(0)
count, _ = p.stat()
for n in range(1, count + 1):
    lines = p.retr(n)[1]
    print(next(l.decode()[9:] for l in lines if l.startswith(b"Subject: ")))
p.quit()
"#,
        &[
            &server.pop3.ip().to_string(),
            &server.pop3.port().to_string(),
            user,
            password,
        ],
    )
    .trim()
    .to_owned()
}

/// While PostgreSQL is down, a node answers 4xx (mail stays with the
/// client; POP3 says the trouble is temporary) and keeps running; once the
/// database is back, the same node accepts and serves mail again without a
/// restart, and nothing acknowledged before the outage is lost.
#[test]
fn a_database_outage_is_a_4xx_and_the_node_recovers_without_a_restart() {
    use crate::support::wait_until;
    let mut cluster = TestCluster::start().expect("start a throwaway PostgreSQL");
    let url = cluster.create_database("outage").unwrap();
    {
        let store =
            postino_pg::PgStore::open(&postino_pg::PgOptions::new(url.as_str(), "admin")).unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(store.add_user("alice@example.test", "pw"))
            .unwrap();
    }
    // Relayed mail goes to a loopback port where nothing listens: it
    // stays queued.
    let dead = crate::support::free_tcp_port(&[std::net::Ipv4Addr::LOCALHOST]);
    let mut node = TestServer::start_with(&config_text(
        "",
        "",
        &format!("smarthost = \"127.0.0.1:{dead}\""),
        &format!("backend = \"postgres\"\nurl = \"{url}\"\nnode = \"a\"\n"),
    ));
    assert_eq!(
        smtplib_send(
            &node,
            "alice@example.test",
            "Subject: before\r\n\r\nbody\r\n"
        ),
        "OK"
    );

    cluster.stop().expect("stop PostgreSQL");
    let refused = smtplib_send(
        &node,
        "alice@example.test",
        "Subject: during\r\n\r\nbody\r\n",
    );
    eprintln!("during the outage: {refused}");
    assert!(refused.starts_with("ERR 4"), "{refused}\n{}", node.log());
    // Relayed mail needs no lookup before DATA: there the commit fails.
    let relayed = smtplib_send(
        &node,
        "r@remote.test",
        "Subject: during, relayed\r\n\r\nbody\r\n",
    );
    eprintln!("relayed during the outage: {relayed}");
    assert!(relayed.starts_with("ERR 451"), "{relayed}\n{}", node.log());
    let pop = poplib_subjects(&node, "alice@example.test", "pw");
    eprintln!("POP3 during the outage: {pop}");
    assert!(
        pop.starts_with("ERR") && pop.contains("[SYS/TEMP]"),
        "{pop}"
    );
    assert!(node.is_running(), "the node outlives the outage");

    cluster.restart().expect("start PostgreSQL again");
    assert!(
        wait_until(std::time::Duration::from_secs(30), || smtplib_send(
            &node,
            "alice@example.test",
            "Subject: after\r\n\r\nbody\r\n"
        ) == "OK"),
        "mail accepted again once the database is back\n{}",
        node.log()
    );
    let subjects = poplib_subjects(&node, "alice@example.test", "pw");
    let subjects: Vec<&str> = subjects.lines().collect();
    assert_eq!(subjects.first(), Some(&"before"), "{subjects:?}");
    assert!(subjects.contains(&"after"), "{subjects:?}");
    assert!(!subjects.contains(&"during"), "{subjects:?}");
    node.terminate();
}

/// A node on the PostgreSQL database at `url`; `routing` and `rest` as
/// [`config_text`] takes them.
fn pg_node(url: &str, name: &str, routing: &str, rest: &str) -> TestServer {
    TestServer::start_with(&config_text(
        "",
        "",
        routing,
        &format!("backend = \"postgres\"\nurl = \"{url}\"\nnode = \"{name}\"\n{rest}"),
    ))
}

/// The reply to `RCPT TO:<rcpt>` on a fresh SMTP session with `server`.
fn rcpt_reply(server: &TestServer, rcpt: &str) -> String {
    let mut c = Raw::connect(server.smtp);
    assert!(c.reply().starts_with("220"));
    c.cmd("EHLO client.test");
    assert!(c.cmd("MAIL FROM:<s@remote.test>").starts_with("250"));
    let reply = c.cmd(&format!("RCPT TO:<{rcpt}>"));
    c.cmd("QUIT");
    reply
}

/// Sends one message through `server`; its queue id, from the 250 reply.
fn send_one(server: &TestServer, rcpt: &str, subject: &str) -> String {
    let mut c = Raw::connect(server.smtp);
    assert!(c.reply().starts_with("220"));
    c.cmd("EHLO client.test");
    assert!(c.cmd("MAIL FROM:<s@example.test>").starts_with("250"));
    let r = c.cmd(&format!("RCPT TO:<{rcpt}>"));
    assert!(r.starts_with("250"), "{r}");
    assert!(c.cmd("DATA").starts_with("354"));
    let r = c.cmd(&format!("Subject: {subject}\r\n\r\nbody of {subject}\r\n."));
    assert!(r.starts_with("250 2.0.0"), "{r}\n{}", server.log());
    c.cmd("QUIT");
    r.rsplit(' ').next().unwrap().trim().to_owned()
}

/// `postino user add` through node a (over its control socket, and with
/// the configuration of a node that is not running, straight on the
/// database) and `alias add` through node b: every node routes and serves
/// them at once.
#[test]
fn users_and_aliases_added_through_any_node_are_every_nodes() {
    let cluster = TestCluster::start().expect("start a throwaway PostgreSQL");
    let url = cluster.create_database("directory").unwrap();
    let (a, b) = (pg_node(&url, "a", "", ""), pg_node(&url, "b", "", ""));
    // Before: b refuses the unknown user.
    assert!(rcpt_reply(&b, "bob@example.test").starts_with("550"));

    // Through a running node's control socket.
    a.add_user("bob@example.test", "bob-pw");
    let r = rcpt_reply(&b, "bob@example.test");
    assert!(r.starts_with("250"), "b after a's user add: {r}");
    let (mut on_b, reply) = pop_login(b.pop3, "bob@example.test", "bob-pw");
    assert!(reply.starts_with("+OK"), "{reply}");
    assert!(on_b.cmd("STAT").starts_with("+OK 0 "));
    assert!(on_b.cmd("QUIT").starts_with("+OK"));

    // With no server for that configuration: the CLI uses the database.
    let work = tempfile::tempdir().unwrap();
    let offline = pg_config(work.path(), &url, "c");
    let out = ok(cli_with_config(
        &offline,
        &["user", "add", "carol@example.test"],
        "carol-pw\n",
    ));
    assert!(out.contains("added carol@example.test"), "{out}");
    let r = rcpt_reply(&b, "carol@example.test");
    assert!(r.starts_with("250"), "b after the offline user add: {r}");
    let (mut on_b, reply) = pop_login(b.pop3, "carol@example.test", "carol-pw");
    assert!(reply.starts_with("+OK"), "{reply}");
    on_b.cmd("QUIT");
    let users = ok(cli_with_config(&offline, &["user", "list"], ""));
    assert!(
        users.contains("bob@example.test") && users.contains("carol@example.test"),
        "{users}"
    );

    // An alias added through b is used by a.
    assert!(rcpt_reply(&a, "team@example.test").starts_with("550"));
    let out = ok(b.cli(
        &["alias", "add", "team@example.test", "bob@example.test"],
        "",
    ));
    assert!(
        out.contains("team@example.test -> bob@example.test"),
        "{out}"
    );
    send_one(&a, "team@example.test", "to the team");
    let (mut on_a, reply) = pop_login(a.pop3, "bob@example.test", "bob-pw");
    assert!(reply.starts_with("+OK"), "{reply}");
    assert!(on_a.cmd("STAT").starts_with("+OK 1 "));
    on_a.cmd("QUIT");
    assert!(ok(a.cli(&["alias", "list"], "")).contains("team@example.test -> bob@example.test"));

    // The inspection tools read the shared directory too, through b and
    // with no server.
    let stats = ok(b.cli(&["mailbox", "stats", "bob@example.test"], ""));
    let row = stats
        .lines()
        .find(|l| l.starts_with("bob@example.test"))
        .unwrap_or_else(|| panic!("{stats}"));
    assert_eq!(row.split_whitespace().nth(1), Some("1"), "{stats}");
    for config in [&b.config, &offline] {
        let out = ok(cli_with_config(
            config,
            &["auth", "test", "carol@example.test"],
            "carol-pw\n",
        ));
        assert!(out.contains("auth succeeded"), "{out}");
        let wrong = cli_with_config(config, &["auth", "test", "carol@example.test"], "x-pw\n");
        assert!(!wrong.status.success());
        let out = ok(cli_with_config(
            config,
            &["route", "explain", "team@example.test"],
            "",
        ));
        assert!(out.contains("local mailbox bob@example.test"), "{out}");
    }

    // Node a's own configuration once a is stopped: straight to the
    // database, and b has the user at once.
    let mut a = a;
    a.terminate();
    a.add_user("dave@example.test", "dave-pw");
    let r = rcpt_reply(&b, "dave@example.test");
    assert!(
        r.starts_with("250"),
        "b after the user add with a stopped: {r}"
    );
}

/// Mail queued through node a (its smarthost a dead loopback port, so it
/// stays queued) is listed, held, released and deleted with `postino
/// queue` through node b, and shown by b's admin API.
#[test]
fn the_queue_tools_and_admin_api_of_any_node_see_the_shared_queue() {
    use crate::admin::curl;
    use crate::delivery::wait_line;
    use crate::support::{free_tcp_port, unique_loopback};
    let cluster = TestCluster::start().expect("start a throwaway PostgreSQL");
    let url = cluster.create_database("queue").unwrap();
    let ip = unique_loopback();
    let dead = free_tcp_port(&[ip]);
    let routing = format!("smarthost = \"{ip}:{dead}\"");
    let delivery = "[delivery]\nretry = [\"1h\"]\nconnect_timeout = \"2s\"\n\
                    [dns]\nnameservers = []\ntimeout = \"2s\"\n";
    let a = pg_node(&url, "a", &routing, delivery);
    let b = pg_node(
        &url,
        "b",
        &routing,
        &format!("{delivery}[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"s3cret\"\n"),
    );
    let kept = send_one(&a, "r1@remote.test", "kept");
    let dropped = send_one(&a, "r2@remote.test", "dropped");
    // a tries one at once and fails (the other may wait for the dead
    // smarthost's next try).
    wait_line(&a, &["status=deferred"]);
    let queue = |node: &TestServer, args: &[&str]| {
        let mut all = vec!["queue"];
        all.extend_from_slice(args);
        ok(node.cli(&all, ""))
    };
    // (id, state) of each message `queue list --json` shows on `node`.
    let listed = |node: &TestServer| -> Vec<(String, String)> {
        queue(node, &["list", "--json"])
            .lines()
            .map(|l| {
                let m: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    m["id"].as_str().unwrap().to_owned(),
                    m["state"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let table = queue(&b, &["list"]);
    assert!(
        table.contains(&kept) && table.contains(&dropped),
        "b lists a's mail:\n{table}"
    );
    assert!(table.contains("-- 2 message(s) in the queue"), "{table}");
    // Deferred once a has written its attempt.
    let mut on_b = Vec::new();
    let settled = crate::support::wait_until(std::time::Duration::from_secs(20), || {
        on_b = listed(&b);
        on_b.iter().any(|(_, state)| state == "deferred")
    });
    assert!(settled, "b lists {on_b:?}");
    assert_eq!(on_b.len(), 2, "{on_b:?}");
    assert!(on_b.iter().any(|(id, _)| *id == dropped), "{on_b:?}");

    // Held through b: a sees it held.
    assert!(queue(&b, &["hold", &kept]).contains("1 message(s) held"));
    assert!(listed(&a).contains(&(kept.clone(), "held".to_owned())));
    assert!(queue(&b, &["release", &kept]).contains("1 message(s) released"));
    let state = listed(&a)
        .into_iter()
        .find(|(id, _)| *id == kept)
        .map(|(_, s)| s);
    assert!(state.is_some_and(|s| s != "held"), "released");
    // Deleted through b: gone for a.
    let out = queue(&b, &["delete", &dropped]);
    assert_eq!(out.trim(), format!("deleted {dropped}"));
    let on_a = listed(&a);
    assert!(on_a.iter().all(|(id, _)| *id != dropped), "{on_a:?}");
    assert!(on_a.iter().any(|(id, _)| *id == kept), "{on_a:?}");

    // b's admin API answers from the shared queue.
    let base = format!("http://{}", b.admin.expect("b's admin listener"));
    let auth = ["-H", "Authorization: Bearer s3cret"];
    let (status, _) = curl("GET", &format!("{base}/api/queue"), &[]);
    assert_eq!(status, 401, "the token is needed");
    let (status, body) = curl("GET", &format!("{base}/api/queue"), &auth);
    assert_eq!(status, 200, "{body}");
    let page: serde_json::Value = serde_json::from_str(&body).unwrap();
    let ids: Vec<&str> = page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [kept.as_str()], "{body}");
    let (status, body) = curl("GET", &format!("{base}/api/queue/{kept}"), &auth);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("r1@remote.test"), "{body}");
    let (status, metrics) = curl("GET", &format!("{base}/metrics"), &auth);
    assert_eq!(status, 200, "{metrics}");
    let depth = metrics
        .lines()
        .find_map(|l| l.strip_prefix("postino_queue_messages "))
        .unwrap_or_else(|| panic!("no queue depth in\n{metrics}"));
    assert_eq!(depth.trim().parse::<f64>().unwrap(), 1.0, "{metrics}");

    // The same listing with no server for the configuration used.
    let work = tempfile::tempdir().unwrap();
    let offline = pg_config(work.path(), &url, "c");
    let out = ok(cli_with_config(&offline, &["queue", "list"], ""));
    assert!(out.contains(&kept) && !out.contains(&dropped), "{out}");
}
