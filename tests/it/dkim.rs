//! DKIM signing end to end: keys made by `postino dkim generate`, their
//! TXT records served by dnsmasq, mail relayed through the real binary to
//! aiosmtpd, and every signature checked by a verifier nobody here wrote:
//! Debian's dkimpy (`python3-dkim`), looking the key up in that dnsmasq
//! with dnspython.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::delivery::{relay_config, send_content, wait_messages};
use crate::smtp_local::pop_all;
use crate::support::dns::{Dnsmasq, Zone};
use crate::support::mx::{Sink, SinkOptions};
use crate::support::server::{cli_with_config, config_text, TestServer};
use crate::support::{free_tcp_port, unique_loopback};

/// dkimpy's `dkim.verify` on each file named after the port, with a
/// `dnsfunc` that asks the test's dnsmasq (dnspython, real DNS over UDP).
/// Prints one `True`/`False` per file.
const VERIFY_PY: &str = r#"
import sys, dkim, dns.resolver
resolver = dns.resolver.Resolver(configure=False)
resolver.nameservers = ["127.0.0.1"]
resolver.port = int(sys.argv[1])
def txt(name, timeout=5):
    if isinstance(name, bytes):
        name = name.decode()
    answer = resolver.resolve(name, "TXT", lifetime=timeout)
    return b"".join(answer[0].strings)
for path in sys.argv[2:]:
    print(dkim.verify(open(path, "rb").read(), dnsfunc=txt))
"#;

/// Sends as an authenticated user with Python's smtplib (AUTH PLAIN).
const SEND_AUTH_PY: &str = r#"
import sys, smtplib
host, port, user, password, sender, rcpt = sys.argv[1:7]
with smtplib.SMTP(host, int(port)) as s:
    s.ehlo("client.test")
    s.login(user, password)
    s.sendmail(sender, [rcpt], sys.stdin.buffer.read())
"#;

/// A key from `postino dkim generate`: where it went and the TXT record's
/// strings as printed for the zone.
struct Generated {
    path: PathBuf,
    strings: Vec<String>,
    stdout: String,
}

fn generate(config: &Path, dir: &Path, selector: &str, algorithm: &str) -> Generated {
    generate_for(config, dir, "example.test", selector, algorithm)
}

/// [`generate`] for `domain`.
fn generate_for(
    config: &Path,
    dir: &Path,
    domain: &str,
    selector: &str,
    algorithm: &str,
) -> Generated {
    let path = dir.join(format!("{selector}.pem"));
    let out = cli_with_config(
        config,
        &[
            "dkim",
            "generate",
            domain,
            "--selector",
            selector,
            "--algorithm",
            algorithm,
            "--output",
            path.to_str().unwrap(),
        ],
        "",
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let record = stdout
        .lines()
        .find(|l| l.starts_with(&format!("{selector}._domainkey.{domain}. IN TXT (")))
        .unwrap_or_else(|| panic!("no TXT record line: {stdout}"));
    let strings: Vec<String> = record
        .split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect();
    Generated {
        path,
        strings,
        stdout,
    }
}

fn dkim_section(selector: &str, key: &Path) -> String {
    dkim_section_for("example.test", selector, key)
}

fn dkim_section_for(domain: &str, selector: &str, key: &Path) -> String {
    format!(
        "[dkim.\"{domain}\"]\nselector = \"{selector}\"\nkey = \"{}\"\n",
        key.display()
    )
}

/// dkimpy's verdict on each message.
fn verify(dns: &Dnsmasq, messages: &[&[u8]]) -> Vec<bool> {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec![dns.addr.port().to_string()];
    for (n, m) in messages.iter().enumerate() {
        let path = dir.path().join(format!("{n}.eml"));
        std::fs::write(&path, m).unwrap();
        args.push(path.display().to_string());
    }
    let out = std::process::Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(VERIFY_PY)
        .args(&args)
        .output()
        .expect("run /usr/bin/python3 (Debian python3-dkim, python3-dnspython)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "dkimpy failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout.lines().map(|l| l.trim() == "True").collect()
}

fn send_authenticated(server: &TestServer, rcpt: &str, content: &str) {
    let mut child = std::process::Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(SEND_AUTH_PY)
        .args([
            &server.smtp.ip().to_string(),
            &server.smtp.port().to_string(),
            "alice@example.test",
            "pw",
            "alice@example.test",
            rcpt,
        ])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("run /usr/bin/python3");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(content.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "smtplib send failed");
}

fn message(subject: &str, to: &str) -> String {
    // Folded and padded header values and trailing blank lines: relaxed
    // canonicalization must make them verify as they are.
    format!(
        "From: Alice <alice@example.test>\r\nTo: <{to}>\r\nSubject:   {subject}\r\n\
         \tcontinued\r\nDate: Tue, 1 Dec 2026 10:00:00 +0000\r\n\
         Message-ID: <{subject}@example.test>\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\r\n\
         Hello  from {subject}.  \r\n\r\n\r\n"
    )
}

fn find<'a>(got: &'a [crate::support::mx::Received], subject: &str) -> &'a [u8] {
    &got.iter()
        .find(|m| String::from_utf8_lossy(&m.content).contains(&format!("Subject:   {subject}")))
        .unwrap_or_else(|| panic!("{subject} not received"))
        .content
}

fn header(content: &[u8]) -> String {
    let text = String::from_utf8_lossy(content);
    assert!(
        text.starts_with("DKIM-Signature:"),
        "not signed on top: {text}"
    );
    let end = text.find("\r\nReceived:").expect("our Received: follows");
    text[..end].replace("\r\n", "")
}

#[test]
fn mail_that_leaves_is_signed_and_dkimpy_verifies_rsa_and_ed25519() {
    let ip = unique_loopback();
    let port = free_tcp_port(&[ip]);
    let sink = Sink::start(ip, port, &SinkOptions::default());

    // Keys from the CLI (which needs only a configuration), then their
    // records, exactly as printed, in DNS.
    let keys = tempfile::tempdir().unwrap();
    let plain = keys.path().join("plain.toml");
    std::fs::write(&plain, config_text("", "", "", "")).unwrap();
    let rsa = generate(&plain, keys.path(), "s1", "rsa");
    let ed = generate(&plain, keys.path(), "ed", "ed25519");
    assert!(
        rsa.strings.len() >= 2,
        "RSA-2048 needs two strings: {:?}",
        rsa.strings
    );
    assert!(rsa.strings.iter().all(|s| s.len() <= 255));
    assert!(rsa.strings[0].starts_with("v=DKIM1; k=rsa; p="));
    assert_eq!(ed.strings.len(), 1);
    assert!(ed.strings[0].starts_with("v=DKIM1; k=ed25519; p="));
    for g in [&rsa, &ed] {
        let mode = std::fs::metadata(&g.path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", g.path.display());
        assert!(g.stdout.contains("[dkim.\"example.test\"]"), "{}", g.stdout);
    }
    fn strs(g: &Generated) -> Vec<&str> {
        g.strings.iter().map(String::as_str).collect()
    }
    let zone = Zone::new("test")
        .mx("dest.test", "mx.dest.test", 10)
        .a("mx.dest.test", ip)
        .txt("s1._domainkey.example.test", &strs(&rsa))
        .txt("ed._domainkey.example.test", &strs(&ed));
    let dns = Dnsmasq::start(&zone);

    let base = relay_config(Some(&dns), port, r#"retry = ["1s"]"#, "");
    let mut server = TestServer::start_with(&format!("{base}{}", dkim_section("s1", &rsa.path)));
    server.add_user("alice@example.test", "pw");

    // From a local domain through a client allowed to relay, and from a
    // logged-in user: signed. From a foreign sender (relayed, not logged
    // in) that claims our domain in From:: not ours to sign.
    send_content(
        &server,
        "alice@example.test",
        &["bob@dest.test"],
        &message("relayed", "bob@dest.test"),
    );
    send_authenticated(
        &server,
        "carol@dest.test",
        &message("submitted", "carol@dest.test"),
    );
    let foreign = send_content(
        &server,
        "mallory@elsewhere.test",
        &["dave@dest.test"],
        &message("foreign", "dave@dest.test"),
    );
    // Local-only mail never leaves: not signed.
    send_content(
        &server,
        "alice@example.test",
        &["alice@example.test"],
        &message("local", "alice@example.test"),
    );

    let got = wait_messages(&sink, 3);
    assert_eq!(got.len(), 3);
    let (relayed, submitted, unsigned) = (
        find(&got, "relayed"),
        find(&got, "submitted"),
        find(&got, "foreign"),
    );
    for signed in [relayed, submitted] {
        let h = header(signed);
        for tag in [
            "d=example.test",
            "s=s1",
            "a=rsa-sha256",
            "c=relaxed/relaxed",
        ] {
            assert!(h.contains(tag), "{tag} in {h}");
        }
        let tag = h
            .split(';')
            .map(str::trim)
            .find(|t| t.starts_with("h="))
            .unwrap();
        let signed: Vec<&str> = tag["h=".len()..].split(':').collect();
        for name in [
            "From",
            "To",
            "Subject",
            "Date",
            "Message-ID",
            "MIME-Version",
            "Content-Type",
        ] {
            assert!(signed.contains(&name), "{name} signed: {h}");
        }
        assert!(!signed.contains(&"Received"), "{h}");
    }
    assert!(!String::from_utf8_lossy(unsigned).contains("DKIM-Signature"));
    assert!(!server
        .log()
        .lines()
        .any(|l| l.contains("dkim signed") && l.contains(&foreign)));
    let local = pop_all(&server, "alice@example.test", "pw");
    assert_eq!(local.len(), 1);
    assert!(
        !format!("{local:?}").contains("DKIM-Signature"),
        "{local:?}"
    );

    // A changed Subject must fail: the verifier really checks.
    let relayed_text = String::from_utf8_lossy(relayed);
    let tampered = relayed_text.replace("Subject:   relayed", "Subject:   altered");
    assert_eq!(
        verify(&dns, &[relayed, submitted, tampered.as_bytes()]),
        [true, true, false]
    );

    // Ed25519 (RFC 8463) after a reload.
    server.set_config(&format!("{base}{}", dkim_section("ed", &ed.path)));
    let out = server.cli(&["reload"], "");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    send_content(
        &server,
        "alice@example.test",
        &["erin@dest.test"],
        &message("edwards", "erin@dest.test"),
    );
    let got = wait_messages(&sink, 4);
    let ed_signed = find(&got, "edwards");
    let h = header(ed_signed);
    assert!(h.contains("a=ed25519-sha256") && h.contains("s=ed"), "{h}");
    assert_eq!(verify(&dns, &[ed_signed]), [true]);
}

#[test]
fn a_bad_key_is_a_config_error_and_keys_are_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.pem");
    std::fs::write(
        &bad,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let config = dir.path().join("postino.toml");
    let text = format!(
        "{}{}",
        config_text("", "", "", ""),
        dkim_section("s1", &bad)
    );
    std::fs::write(&config, &text).unwrap();
    let line = text.lines().position(|l| l.starts_with("key = ")).unwrap() + 1;

    let out = cli_with_config(&config, &["check-config"], "");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("postino.toml:{line}:")),
        "{stderr}"
    );
    assert!(stderr.contains("dkim.\"example.test\".key"), "{stderr}");
    assert!(stderr.contains("bad.pem"), "{stderr}");

    // The server refuses to start with it, naming the same place.
    let start = std::process::Command::new(crate::support::server::binary())
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&start.stderr);
    assert!(!start.status.success());
    assert!(
        stderr.contains(&format!("postino.toml:{line}:")),
        "{stderr}"
    );

    // `generate` into a file that exists fails and leaves it as it was.
    let out = cli_with_config(
        &config,
        &[
            "dkim",
            "generate",
            "example.test",
            "--output",
            bad.to_str().unwrap(),
        ],
        "",
    );
    assert!(!out.status.success());
    assert!(std::fs::read_to_string(&bad).unwrap().contains("AAAA"));
}

/// The notice the sink got for `rcpt`.
fn notice_to<'a>(got: &'a [crate::support::mx::Received], rcpt: &str) -> &'a [u8] {
    let m = got
        .iter()
        .find(|m| m.rcpt_tos.iter().any(|r| r == rcpt))
        .unwrap_or_else(|| panic!("no notice to {rcpt}"));
    assert_eq!(m.mail_from, "<>", "a notice is from <>");
    &m.content
}

/// The `DKIM-Signature:` field on top of a notice, unfolded; the notice
/// has exactly one.
fn notice_signature(content: &[u8]) -> String {
    let text = String::from_utf8_lossy(content);
    assert!(
        text.starts_with("DKIM-Signature:"),
        "not signed on top: {text}"
    );
    assert_eq!(text.matches("DKIM-Signature:").count(), 1, "{text}");
    let end = text
        .find("\r\nFrom: MAILER-DAEMON@")
        .expect("our From: follows");
    text[..end].replace("\r\n", "")
}

/// postino's own notices (bounces made by the delivery actor and at
/// dispatch, delay warnings) that go to a remote sender are signed with
/// the key of their `From:` domain, the hostname, and dkimpy verifies
/// them; a notice to a local mailbox is not signed; with no key for the
/// hostname (taken away by a reload, which the delivery actor sees), a
/// notice goes out unsigned.
#[test]
fn notices_that_leave_are_signed_with_the_hostname_key() {
    notices_signed("");
}

/// The same with the store in PostgreSQL, where the delivery actor's
/// notices are written with its settlement in one transaction.
#[test]
fn notices_are_signed_on_the_postgres_store_too() {
    let cluster = postino_pg::testing::TestCluster::start().expect("start a throwaway PostgreSQL");
    let url = cluster.create_database("notices").unwrap();
    notices_signed(&format!(
        "backend = \"postgres\"\nurl = \"{url}\"\nnode = \"n1\"\n"
    ));
}

/// [`notices_that_leave_are_signed_with_the_hostname_key`] with `store`
/// added to the `[store]` section.
fn notices_signed(store: &str) {
    let ip = unique_loopback();
    let port = free_tcp_port(&[ip]);
    let sink = Sink::start(
        ip,
        port,
        &SinkOptions::answering(&[
            ("nobody@fail.test", "550 5.1.1 User unknown"),
            ("late@fail.test", "451 4.2.0 Try again later"),
        ]),
    );
    let keys = tempfile::tempdir().unwrap();
    let plain = keys.path().join("plain.toml");
    std::fs::write(&plain, config_text("", "", "", "")).unwrap();
    let host = "mx.example.test";
    let key = generate_for(&plain, keys.path(), host, "n1", "rsa");
    let strings: Vec<&str> = key.strings.iter().map(String::as_str).collect();
    let zone = Zone::new("test")
        .mx("dest.test", "mx.dest.test", 10)
        .mx("fail.test", "mx.dest.test", 10)
        .a("mx.dest.test", ip)
        .txt(&format!("n1._domainkey.{host}"), &strings);
    let dns = Dnsmasq::start(&zone);

    let base = relay_config(
        Some(&dns),
        port,
        "retry = [\"1s\"]\ndelay_warning = \"2s\"",
        "unknown_user = \"bounce\"",
    )
    .replacen("[store]\n", &format!("[store]\n{store}"), 1);
    assert!(base.contains(&format!("[store]\n{store}")), "{base}");
    let mut server = TestServer::start_with(&format!(
        "{base}{}",
        dkim_section_for(host, "n1", &key.path)
    ));
    server.add_user("alice@example.test", "pw");

    // Refused by the next hop: the delivery actor's bounce. Deferred: its
    // delay warning. Unknown here: the bounce made at dispatch. All three
    // go back to senders at dest.test.
    send_content(
        &server,
        "carol@dest.test",
        &["nobody@fail.test"],
        &message("refused", "nobody@fail.test"),
    );
    let late = send_content(
        &server,
        "dan@dest.test",
        &["late@fail.test"],
        &message("late", "late@fail.test"),
    );
    send_content(
        &server,
        "erin@dest.test",
        &["nobody@example.test"],
        &message("unknown", "nobody@example.test"),
    );
    // A local sender's bounce stays here: not signed.
    send_content(
        &server,
        "alice@example.test",
        &["nobody@fail.test"],
        &message("local", "nobody@fail.test"),
    );

    let got = wait_messages(&sink, 3);
    let bounce = notice_to(&got, "carol@dest.test");
    let delay = notice_to(&got, "dan@dest.test");
    let dispatched = notice_to(&got, "erin@dest.test");
    for (notice, subject) in [
        (bounce, "Undelivered Mail Returned to Sender"),
        (delay, "Delayed Mail (still being retried)"),
        (dispatched, "Undelivered Mail Returned to Sender"),
    ] {
        assert!(
            String::from_utf8_lossy(notice).contains(&format!("Subject: {subject}\r\n")),
            "{}",
            String::from_utf8_lossy(notice)
        );
        let h = notice_signature(notice);
        for tag in [&format!("d={host}") as &str, "s=n1", "a=rsa-sha256"] {
            assert!(h.contains(tag), "{tag} in {h}");
        }
    }
    // A changed Subject must fail: the verifier really checks.
    let tampered = String::from_utf8_lossy(bounce)
        .replace("Subject: Undelivered Mail", "Subject: Delivered Mail");
    assert_eq!(
        verify(&dns, &[bounce, delay, dispatched, tampered.as_bytes()]),
        [true, true, true, false]
    );

    let mut local = Vec::new();
    assert!(crate::support::wait_until(
        std::time::Duration::from_secs(20),
        || {
            local = pop_all(&server, "alice@example.test", "pw");
            !local.is_empty()
        }
    ));
    assert!(
        local[0]
            .text
            .contains("Undelivered Mail Returned to Sender"),
        "{}",
        local[0].text
    );
    assert!(
        !local[0].text.contains("DKIM-Signature"),
        "{}",
        local[0].text
    );

    // The key taken away by a reload: the next bounce goes out unsigned,
    // and still goes out.
    let deleted = server.cli(&["queue", "delete", &late], "");
    assert!(deleted.status.success(), "{deleted:?}");
    server.set_config(&base);
    let out = server.cli(&["reload"], "");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    send_content(
        &server,
        "frank@dest.test",
        &["nobody@fail.test"],
        &message("nokey", "nobody@fail.test"),
    );
    let got = wait_messages(&sink, 4);
    let unsigned = String::from_utf8_lossy(notice_to(&got, "frank@dest.test")).into_owned();
    assert!(
        unsigned.starts_with("From: MAILER-DAEMON@mx.example.test"),
        "{unsigned}"
    );
    assert!(!unsigned.contains("DKIM-Signature"), "{unsigned}");
}
