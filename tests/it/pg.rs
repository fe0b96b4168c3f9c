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
    // Either node may take the new mail from the shared queue (a at once,
    // or b woken by the notification) and try it against the dead
    // smarthost: wait until b lists both, one of them deferred.
    let mut on_b = Vec::new();
    let settled = crate::support::wait_until(std::time::Duration::from_secs(30), || {
        on_b = listed(&b);
        on_b.len() == 2 && on_b.iter().any(|(_, state)| state == "deferred")
    });
    assert!(settled, "b lists {on_b:?}");
    assert!(on_b.iter().any(|(id, _)| *id == dropped), "{on_b:?}");
    assert!(on_b.iter().any(|(id, _)| *id == kept), "{on_b:?}");
    let tried = [&a, &b].iter().any(|n| n.log().contains("status=deferred"));
    assert!(tried, "one of the nodes logged its failed attempt");
    let table = queue(&b, &["list"]);
    assert!(
        table.contains(&kept) && table.contains(&dropped),
        "b lists a's mail:\n{table}"
    );
    assert!(table.contains("-- 2 message(s) in the queue"), "{table}");

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

/// Runs one SQL statement on database `db` of `cluster` with `psql` (Debian
/// `postgresql-client`, which `postgresql` pulls in) and returns its
/// unaligned output, one row a line.
fn psql(cluster: &TestCluster, db: &str, sql: &str) -> String {
    let out = std::process::Command::new("psql")
        .args(["-h", "127.0.0.1", "-p", &cluster.port().to_string()])
        .args([
            "-U",
            "postgres",
            "-d",
            db,
            "-v",
            "ON_ERROR_STOP=1",
            "-Atc",
            sql,
        ])
        .output()
        .expect("run psql");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A node of a relay cluster on database `url`, named `name`, relaying
/// through the smarthost (retries after 1 s), with `rest` added to
/// `[store]` ([`pg_node`]).
fn relay_node(url: &str, name: &str, smarthost: std::net::SocketAddr, rest: &str) -> TestServer {
    pg_node(
        url,
        name,
        &format!("smarthost = \"{smarthost}\""),
        &format!(
            "{rest}\n[delivery]\nretry = [\"1s\"]\nconnect_timeout = \"2s\"\n\
             [dns]\nnameservers = []\ntimeout = \"2s\"\n"
        ),
    )
}

/// The queue ids (as logs print them) that `log` says were delivered.
fn sent_ids(log: &str) -> std::collections::HashSet<String> {
    log.lines()
        .filter(|l| l.contains("status=sent"))
        .filter_map(|l| {
            let at = l.find(" id=")? + 4;
            Some(l[at..].split_whitespace().next()?.to_owned())
        })
        .collect()
}

/// Relay load from Python's smtplib: `threads` threads per port, each
/// sending one message after another (a unique Subject and Message-ID
/// each) over one connection to its port until the file `stop` exists.
/// When a node fails (refused, dropped, 4xx), the thread moves on to the
/// next port. Prints `OK <subject>` for each 250 to DATA and `FAIL
/// <subject> <error>` otherwise, as they happen.
const RELAY_LOAD_PY: &str = r#"
import os, smtplib, sys, threading
ports = [int(p) for p in sys.argv[1].split(",")]
threads = int(sys.argv[2])
stop = sys.argv[3]
lock = threading.Lock()
def say(line):
    with lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
def worker(t, k):
    conn, n = None, 0
    while not os.path.exists(stop):
        subject = "t%d-m%d" % (t, n)
        n += 1
        try:
            if conn is None:
                conn = smtplib.SMTP("127.0.0.1", ports[k % len(ports)], timeout=20)
                conn.ehlo("load.test")
            msg = "Subject: %s\r\nMessage-ID: <%s@load.test>\r\n\r\nrelay load\r\n" % (subject, subject)
            conn.sendmail("s@example.test", ["r%d@remote.test" % t], msg)
            say("OK " + subject)
        except Exception as e:
            say("FAIL %s %s" % (subject, type(e).__name__))
            try:
                conn.close()
            except Exception:
                pass
            conn, k = None, k + 1
    if conn is not None:
        try:
            conn.quit()
        except Exception:
            pass
ts = [threading.Thread(target=worker, args=(i, i % len(ports))) for i in range(threads * len(ports))]
for t in ts:
    t.start()
for t in ts:
    t.join()
"#;

/// The Subject of a message the sink received.
fn subject_of(m: &crate::support::mx::Received) -> String {
    let text = String::from_utf8_lossy(&m.content);
    text.lines()
        .find_map(|l| l.strip_prefix("Subject: "))
        .unwrap_or_default()
        .to_owned()
}

/// Issue 13's last check, with real nodes: three `postino serve` processes
/// on one PostgreSQL relay Python smtplib's load to a slow sink; one of
/// them is killed with SIGKILL while it holds leased deliveries and mail
/// keeps arriving at the other two. The others take its leases over once
/// they expire (`[store] lease = "3s"`) and drain its work: every message
/// that got a 250 reaches the sink, and the duplicates are at most the
/// killed node's in-flight window. The killed node then restarts on the
/// same config and rejoins.
#[test]
fn killed_node_loses_nothing_and_the_others_drain_its_work() {
    use std::collections::{HashMap, HashSet};
    use std::io::BufRead;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use crate::support::mx::{Sink, SinkOptions};
    use crate::support::{free_tcp_port, unique_loopback, wait_until};

    let cluster = TestCluster::start().expect("start a throwaway PostgreSQL");
    let url = cluster.create_database("killed").unwrap();
    let ip = unique_loopback();
    let port = free_tcp_port(&[ip]);
    // Each final dot waits 300 ms: deliveries are on the wire when the kill
    // comes, and the queue grows, so the victim holds claimed entries.
    let sink = Sink::start(
        ip,
        port,
        &SinkOptions {
            delay: Some(Duration::from_millis(300)),
            ..SinkOptions::default()
        },
    );
    let smarthost = std::net::SocketAddr::from((ip, port));
    let lease = "lease = \"3s\"";
    let mut nodes = [
        relay_node(&url, "n1", smarthost, lease),
        relay_node(&url, "n2", smarthost, lease),
        relay_node(&url, "n3", smarthost, lease),
    ];
    let ports: Vec<String> = nodes.iter().map(|n| n.smtp.port().to_string()).collect();

    let work = tempfile::tempdir().unwrap();
    let stop = work.path().join("stop");
    let mut load = std::process::Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(RELAY_LOAD_PY)
        .args([&ports.join(","), "3", stop.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run /usr/bin/python3");
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let reader = {
        let (out, lines) = (load.stdout.take().unwrap(), lines.clone());
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                lines.lock().unwrap().push(line);
            }
        })
    };
    let acked = |lines: &Arc<Mutex<Vec<String>>>| {
        lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with("OK "))
            .count()
    };

    // Kill n1 once it has delivered and holds leases on entries it is
    // delivering or about to.
    let held_by_n1 = || {
        psql(
            &cluster,
            "killed",
            "SELECT count(*) FROM queue WHERE lease_owner = 'n1'",
        )
        .parse::<usize>()
        .unwrap()
    };
    assert!(
        wait_until(Duration::from_secs(60), || {
            nodes[0].log().contains("status=sent") && held_by_n1() >= 5
        }),
        "n1 never held leases under load; acknowledged so far: {}",
        acked(&lines)
    );
    nodes[0].kill9();
    let killed_at = Instant::now();
    // What n1 had claimed when it died: nobody renews these leases now,
    // and nobody else can claim them before they expire, so the rows still
    // name n1. Only these entries can be delivered twice (n1 may have had
    // them on the wire, or delivered without recording it); the number is
    // bounded by n1's claim batch (MAX_IN_FLIGHT, 512) and, for what was
    // really on the wire, by its concurrency window to the sink (20).
    let window: Vec<String> = psql(
        &cluster,
        "killed",
        "SELECT lpad(upper(to_hex(id)), 10, '0') FROM queue WHERE lease_owner = 'n1'",
    )
    .lines()
    .map(str::to_owned)
    .collect();
    let acked_at_kill = acked(&lines);
    // Mail keeps arriving at n2 and n3 after the kill.
    assert!(
        wait_until(Duration::from_secs(60), || acked(&lines)
            >= acked_at_kill + 30),
        "the other nodes stopped accepting after the kill"
    );
    // The takeover: no entry is claimed by n1 any more.
    assert!(
        wait_until(Duration::from_secs(60), || held_by_n1() == 0),
        "n1's leases were never taken over"
    );
    let takeover = killed_at.elapsed();
    std::fs::write(&stop, b"").unwrap();
    assert!(load.wait().unwrap().success());
    reader.join().unwrap();
    let lines = lines.lock().unwrap().clone();
    let ok: HashSet<String> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("OK "))
        .map(str::to_owned)
        .collect();
    let failed = lines.iter().filter(|l| l.starts_with("FAIL ")).count();

    // Drained: every acknowledged message reached the sink, and the queue
    // is empty (messages accepted but not acknowledged go out too).
    let received = || -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for m in sink.messages() {
            *counts.entry(subject_of(&m)).or_insert(0) += 1;
        }
        counts
    };
    let drained = wait_until(Duration::from_secs(120), || {
        let got = received();
        ok.iter().all(|s| got.contains_key(s))
            && psql(&cluster, "killed", "SELECT count(*) FROM queue") == "0"
    });
    let drain = killed_at.elapsed();
    let got = received();
    let lost: Vec<&String> = ok.iter().filter(|s| !got.contains_key(*s)).collect();
    let duplicates: usize = got.values().map(|n| n - 1).sum();
    let unacknowledged_delivered = got.keys().filter(|s| !ok.contains(*s)).count();
    let taken_over: usize = {
        let others: HashSet<String> = sent_ids(&nodes[1].log())
            .union(&sent_ids(&nodes[2].log()))
            .cloned()
            .collect();
        window.iter().filter(|id| others.contains(*id)).count()
    };
    eprintln!(
        "kill -9 under load: {} messages sent, {} acknowledged ({} at the kill), {} failed \
         (not acknowledged), {} lost, {} duplicates, {} in n1's window at the kill, {} of them \
         delivered by n2/n3, {} delivered without a 250 (cut off mid-reply), takeover {:.1} s, \
         drained {:.1} s after the kill",
        ok.len() + failed,
        ok.len(),
        acked_at_kill,
        failed,
        lost.len(),
        duplicates,
        window.len(),
        taken_over,
        unacknowledged_delivered,
        takeover.as_secs_f64(),
        drain.as_secs_f64(),
    );
    let lost_leases: Vec<usize> = nodes
        .iter()
        .map(|n| n.log().matches("queue lease lost").count())
        .collect();
    eprintln!("leases lost while still in use, per node: {lost_leases:?}");
    assert!(
        drained && lost.is_empty(),
        "lost {} acknowledged messages: {lost:?}\nqueue: {}",
        lost.len(),
        psql(
            &cluster,
            "killed",
            "SELECT id, lease_owner, next_attempt FROM queue"
        )
    );
    assert!(
        duplicates <= window.len(),
        "{duplicates} duplicates, more than the {} entries n1 held",
        window.len()
    );
    assert!(
        taken_over > 0,
        "none of n1's {} claimed entries was delivered by n2 or n3",
        window.len()
    );

    // n1 comes back on the same config: it starts, finds nothing held in
    // its name, and delivers again.
    let before = nodes[0].log().len();
    nodes[0].restart();
    assert_eq!(held_by_n1(), 0);
    let mut c = Raw::connect(nodes[0].smtp);
    assert!(c.reply().starts_with("220"));
    c.cmd("EHLO client.test");
    assert!(c.cmd("MAIL FROM:<s@example.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<back@remote.test>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    let r = c.cmd("Subject: n1-is-back\r\n\r\nrejoined\r\n.");
    assert!(r.starts_with("250 2.0.0"), "{r}");
    c.cmd("QUIT");
    assert!(
        wait_until(Duration::from_secs(30), || received()
            .contains_key("n1-is-back")),
        "nothing delivered after n1's restart"
    );
    let delivered_by_n1 = nodes[0].log()[before..].contains("status=sent");
    eprintln!("n1 restarted; it delivered the next message itself: {delivered_by_n1}");
}

/// A message a node spooled and acknowledged but could not hand on (its
/// dispatch failed after the commit) is not left for that node's restart
/// when it dies: another node finds it in the spool once it is older than
/// a lease, and delivers it, the local copy once and the remote one to the
/// sink. The failing dispatch is real: node x connects as a PostgreSQL
/// role that may not insert into the queue table.
#[test]
fn a_dead_nodes_spooled_message_is_dispatched_by_another() {
    use std::time::Duration;

    use crate::support::mx::{Sink, SinkOptions};
    use crate::support::{free_tcp_port, unique_loopback, wait_until};

    let cluster = TestCluster::start().expect("start a throwaway PostgreSQL");
    let url = cluster.create_database("spool").unwrap();
    let ip = unique_loopback();
    let port = free_tcp_port(&[ip]);
    let sink = Sink::start(ip, port, &SinkOptions::default());
    let smarthost = std::net::SocketAddr::from((ip, port));
    let lease = "lease = \"3s\"";
    // a migrates the schema; then the role for x, without INSERT on queue.
    let a = relay_node(&url, "a", smarthost, lease);
    psql(
        &cluster,
        "spool",
        "CREATE ROLE x LOGIN; GRANT ALL ON SCHEMA public TO x; \
         GRANT ALL ON ALL TABLES IN SCHEMA public TO x; \
         GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO x; \
         REVOKE INSERT ON queue FROM x",
    );
    let x_url = format!("postgresql://x@127.0.0.1:{}/spool", cluster.port());
    let mut x = relay_node(&x_url, "x", smarthost, lease);
    {
        let store =
            postino_pg::PgStore::open(&postino_pg::PgOptions::new(url.as_str(), "admin")).unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(store.add_user("alice@example.test", "pw"))
            .unwrap();
    }

    // One local and one remote recipient: spooled, then dispatched.
    let mut c = Raw::connect(x.smtp);
    assert!(c.reply().starts_with("220"));
    c.cmd("EHLO client.test");
    assert!(c.cmd("MAIL FROM:<s@example.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<alice@example.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<far@remote.test>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    let r = c.cmd("Subject: stranded\r\n\r\nspooled on x\r\n.");
    assert!(r.starts_with("250 2.0.0"), "{r}\n{}", x.log());
    c.cmd("QUIT");
    assert!(
        x.wait_for_log("dispatch failed"),
        "x's dispatch did not fail:\n{}",
        x.log()
    );
    x.kill9();
    assert_eq!(
        psql(&cluster, "spool", "SELECT count(*) FROM inbound"),
        "1",
        "x left the message in the spool"
    );

    // a takes it over: the remote copy reaches the sink...
    assert!(
        wait_until(Duration::from_secs(30), || sink
            .messages()
            .iter()
            .any(|m| subject_of(m) == "stranded")),
        "the spooled message never left:\n{}",
        a.log()
    );
    assert!(a.log().contains("dispatching spooled messages left over"));
    assert!(wait_until(Duration::from_secs(10), || psql(
        &cluster,
        "spool",
        "SELECT count(*) FROM inbound"
    ) == "0"));
    assert_eq!(sink.count(), 1, "delivered once");
    // ...and alice has the local copy once (x had delivered it before its
    // dispatch failed; a's dispatch does not deliver it again).
    let (mut pop, reply) = pop_login(a.pop3, "alice@example.test", "pw");
    assert!(reply.starts_with("+OK"), "{reply}");
    let stat = pop.cmd("STAT");
    assert!(stat.starts_with("+OK 1 "), "{stat}");
    pop.cmd("QUIT");
}

/// A message one node is delivering right now is `active` in every node's
/// `queue list`, which names the node (its lease in the shared queue);
/// before, only the node holding it knew, and the others said `incoming`.
#[test]
fn every_node_lists_a_message_in_delivery_as_active_and_where() {
    use crate::support::{free_tcp_port, unique_loopback, wait_until};
    use std::time::Duration;
    let cluster = TestCluster::start().expect("start a throwaway PostgreSQL");
    let url = cluster.create_database("active").unwrap();
    // A smarthost that takes the connection and never greets: the round
    // waits (command_timeout) while the test looks.
    let ip = unique_loopback();
    let silent = std::net::TcpListener::bind((ip, free_tcp_port(&[ip]))).unwrap();
    let routing = format!("smarthost = \"{}\"", silent.local_addr().unwrap());
    let delivery = "[delivery]\nretry = [\"1h\"]\ncommand_timeout = \"5m\"\n\
                    [dns]\nnameservers = []\ntimeout = \"2s\"\n";
    let nodes = [
        pg_node(&url, "a", &routing, delivery),
        pg_node(&url, "b", &routing, delivery),
    ];
    let id = send_one(&nodes[0], "far@remote.test", "in flight");
    // (state, node) as `queue list --json` on `n` shows the message.
    let listed = |n: &TestServer| -> (String, Option<String>) {
        let out = ok(n.cli(&["queue", "list", "--json"], ""));
        let line = out.lines().next().unwrap_or_else(|| panic!("empty queue"));
        let m: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(m["id"], id.as_str());
        (
            m["state"].as_str().unwrap().to_owned(),
            m["node"].as_str().map(str::to_owned),
        )
    };
    let mut seen = Vec::new();
    assert!(
        wait_until(Duration::from_secs(30), || {
            seen = nodes.iter().map(listed).collect();
            seen.iter()
                .all(|(state, node)| state == "active" && node.is_some())
        }),
        "{seen:?}"
    );
    // Both name the same node, one of the two.
    let holder = seen[0].1.clone().unwrap();
    assert_eq!(seen[1].1.as_deref(), Some(holder.as_str()), "{seen:?}");
    assert!(holder == "a" || holder == "b", "{holder}");
    let table = ok(nodes[1].cli(&["queue", "list"], ""));
    assert!(table.contains(&format!("now, on node {holder}")), "{table}");
    assert_eq!(
        psql(
            &cluster,
            "active",
            &format!(
                "SELECT lease_owner FROM queue WHERE id = {}",
                u64::from_str_radix(&id, 16).unwrap()
            )
        ),
        holder
    );
}
