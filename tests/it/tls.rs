//! TLS against the real server: STARTTLS (RFC 3207), STLS (RFC 2595),
//! implicit TLS (RFC 8314), authenticated submission (RFC 6409) and
//! certificate reload on SIGHUP, driven by swaks, Python's smtplib and
//! poplib, `openssl s_client` and a rustls client. The certificates are made
//! at test time with rcgen: no private key lives in the repository.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};

use crate::support::server::{python, TestServer};

/// A test CA and a server certificate it signed, as PEM files in a
/// temporary directory that the server's `[tls]` section points at.
pub struct TestPki {
    dir: tempfile::TempDir,
    ca_cert: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
    /// DER of the server certificate the files hold now.
    pub leaf_der: Vec<u8>,
}

impl TestPki {
    /// A CA, and a certificate for `mx.example.test`, `localhost` and
    /// 127.0.0.1 (clients that check the name of the address they dialled).
    pub fn new() -> TestPki {
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "postino test CA");
        let ca_cert = params.self_signed(&ca_key).expect("CA certificate");
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("ca.pem"), ca_cert.pem()).expect("write CA");
        let mut pki = TestPki {
            dir,
            ca_cert,
            ca_key,
            leaf_der: Vec::new(),
        };
        pki.issue("mx.example.test");
        pki
    }

    /// Writes a new key and a server certificate with common name `cn`
    /// over the cert and key files (each by rename, as an ACME client
    /// would, so the server never reads half a file).
    pub fn issue(&mut self, cn: &str) {
        let key = rcgen::KeyPair::generate().expect("server key");
        let mut params = rcgen::CertificateParams::new(vec![
            "mx.example.test".to_owned(),
            "localhost".to_owned(),
        ])
        .expect("server params");
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let cert = params
            .signed_by(&key, &self.ca_cert, &self.ca_key)
            .expect("sign server certificate");
        self.replace("cert.pem", cert.pem().as_bytes());
        self.replace("key.pem", key.serialize_pem().as_bytes());
        self.leaf_der = cert.der().to_vec();
    }

    /// Replaces a file's content atomically.
    pub fn replace(&self, name: &str, content: &[u8]) {
        let tmp = self.dir.path().join(format!(".{name}"));
        std::fs::write(&tmp, content).expect("write PEM");
        std::fs::rename(&tmp, self.dir.path().join(name)).expect("rename PEM");
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The server certificate and key files (e.g. for a receiving MX).
    pub fn cert_and_key(&self) -> (PathBuf, PathBuf) {
        (
            self.dir.path().join("cert.pem"),
            self.dir.path().join("key.pem"),
        )
    }

    pub fn ca_str(&self) -> String {
        self.ca_path().display().to_string()
    }

    /// The `[tls]` section for this certificate.
    pub fn section(&self) -> String {
        format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            self.dir.path().join("cert.pem").display(),
            self.dir.path().join("key.pem").display()
        )
    }

    /// A rustls client configuration that trusts only this CA.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(self.ca_cert.der().to_vec()))
            .expect("CA as root");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Arc::new(
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("TLS versions")
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }
}

/// A server with every listener (MTA, submission, submissions, POP3,
/// POP3S) and TLS configured; nobody may relay without AUTH. Remote
/// delivery goes to a closed loopback port, so a relayed message just waits
/// in the queue and nothing leaves the machine.
pub fn tls_config(pki: &TestPki, smtp: &str, pop3: &str) -> String {
    format!(
        r#"hostname = "mx.example.test"
data_dir = "data"
[smtp]
listen = ["127.0.0.1:0"]
submission = ["127.0.0.1:0"]
submissions = ["127.0.0.1:0"]
{smtp}
[pop3]
listen = ["127.0.0.1:0"]
pop3s = ["127.0.0.1:0"]
auth_failure_delay = "10ms"
max_auth_failure_delay = "40ms"
{pop3}
[routing]
local_domains = ["example.test"]
relay_networks = []
smarthost = "127.0.0.1:9"
[dns]
nameservers = ["127.0.0.1:9"]
{tls}"#,
        tls = pki.section()
    )
}

fn start(pki: &TestPki) -> TestServer {
    let server = TestServer::start_with(&tls_config(pki, "", ""));
    server.add_user("alice@example.test", "wonderland");
    server
}

enum Conn {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

/// A byte-exact client that can switch to TLS mid-conversation. It reads one
/// byte at a time, so it never consumes plaintext that follows a reply: a
/// server that answered an injected command before the handshake would make
/// the handshake fail instead of going unnoticed.
pub struct Client {
    conn: Conn,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        Client::from_tcp(TcpStream::connect(addr).expect("connect"))
    }

    /// Wraps a connected socket (e.g. one bound to another source address).
    pub fn from_tcp(tcp: TcpStream) -> Client {
        tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Client {
            conn: Conn::Plain(tcp),
        }
    }

    /// Implicit TLS: the handshake first.
    pub fn connect_tls(addr: SocketAddr, pki: &TestPki) -> Client {
        let mut c = Client::connect(addr);
        c.handshake(pki).expect("TLS handshake");
        c
    }

    /// Upgrades the connection (after the server's `220`/`+OK` to
    /// STARTTLS/STLS).
    pub fn handshake(&mut self, pki: &TestPki) -> Result<(), String> {
        let Conn::Plain(tcp) = &self.conn else {
            return Err("already TLS".into());
        };
        let tcp = tcp.try_clone().map_err(|e| e.to_string())?;
        let name = ServerName::try_from("mx.example.test").unwrap();
        let conn =
            rustls::ClientConnection::new(pki.client_config(), name).map_err(|e| e.to_string())?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        while tls.conn.is_handshaking() {
            tls.conn
                .complete_io(&mut tls.sock)
                .map_err(|e| e.to_string())?;
        }
        self.conn = Conn::Tls(Box::new(tls));
        Ok(())
    }

    /// The certificate the server presented.
    pub fn peer_cert(&self) -> Vec<u8> {
        match &self.conn {
            Conn::Tls(tls) => tls.conn.peer_certificates().expect("peer certificate")[0].to_vec(),
            Conn::Plain(_) => panic!("not TLS"),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        let r = match &mut self.conn {
            Conn::Plain(s) => s.write_all(bytes),
            Conn::Tls(s) => s.write_all(bytes).and_then(|_| s.flush()),
        };
        r.expect("write");
    }

    fn byte(&mut self) -> Option<u8> {
        let mut b = [0u8];
        let n = match &mut self.conn {
            Conn::Plain(s) => s.read(&mut b),
            Conn::Tls(s) => s.read(&mut b),
        };
        match n {
            Ok(1) => Some(b[0]),
            _ => None,
        }
    }

    /// One line without its CRLF; empty at EOF.
    pub fn line(&mut self) -> String {
        let mut line = Vec::new();
        while let Some(b) = self.byte() {
            line.push(b);
            if b == b'\n' {
                break;
            }
        }
        String::from_utf8_lossy(&line)
            .trim_end_matches(['\r', '\n'])
            .to_owned()
    }

    /// One whole SMTP reply, its lines joined with '\n'.
    pub fn reply(&mut self) -> String {
        crate::support::server::smtp_reply(|| self.line())
    }

    /// Sends a command and returns the SMTP reply.
    pub fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes());
        self.reply()
    }

    /// Sends a POP3 command and returns its status line.
    pub fn pop(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes());
        self.line()
    }

    /// The raw bytes of a POP3 multi-line body, up to and without the
    /// terminating `CRLF . CRLF` (the CRLF before the dot is kept).
    pub fn pop_raw(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(b) = self.byte() {
            out.push(b);
            if out.ends_with(b"\r\n.\r\n") {
                out.truncate(out.len() - 3);
                break;
            }
        }
        out
    }

    /// True once the server has closed the connection.
    pub fn closed(&mut self) -> bool {
        self.byte().is_none()
    }
}

/// Runs `swaks` with these arguments; returns (success, transcript).
fn swaks(args: &[&str]) -> (bool, String) {
    let out = Command::new("swaks")
        .args(args)
        .args(["--timeout", "20"])
        .output()
        .expect("run swaks");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn host_port(addr: SocketAddr) -> String {
    format!("{}:{}", addr.ip(), addr.port())
}

/// Every message of `user` over POP3 with STLS (poplib), as text.
pub(crate) fn pop_over_stls(
    server: &TestServer,
    pki: &TestPki,
    user: &str,
    password: &str,
) -> Vec<String> {
    let out = python(
        r#"
import json, poplib, ssl, sys
host, port, ca, user, password = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
ctx = ssl.create_default_context(cafile=ca)
p = poplib.POP3(host, port, timeout=20)
p.stls(context=ctx)
p.user(user); p.pass_(password)
count, _ = p.stat()
msgs = [b"\r\n".join(p.retr(n)[1]).decode("utf-8", "replace") for n in range(1, count + 1)]
p.quit()
print(json.dumps(msgs))
"#,
        &[
            &server.pop3.ip().to_string(),
            &server.pop3.port().to_string(),
            &pki.ca_str(),
            user,
            password,
        ],
    );
    serde_json::from_str(out.trim()).expect("poplib JSON")
}

#[test]
fn swaks_starttls_and_implicit_tls_deliver_over_tls() {
    let pki = TestPki::new();
    let server = start(&pki);
    // STARTTLS on the MTA port, certificate verified against our CA.
    let (ok, text) = swaks(&[
        "--server",
        &host_port(server.smtp),
        "--tls",
        "--tls-verify",
        "--tls-ca-path",
        &pki.ca_str(),
        "--ehlo",
        "client.test",
        "--from",
        "carol@elsewhere.test",
        "--to",
        "alice@example.test",
        "--header",
        "Subject: over starttls",
    ]);
    assert!(ok, "{text}");
    assert!(text.contains("220 2.0.0 Ready to start TLS"), "{text}");
    assert!(text.contains("TLS started"), "{text}");
    // Implicit TLS on the submissions port, with AUTH PLAIN.
    let (ok, text) = swaks(&[
        "--server",
        &host_port(server.submissions.expect("submissions listener")),
        "--tlsc",
        "--tls-verify",
        "--tls-ca-path",
        &pki.ca_str(),
        "--auth",
        "PLAIN",
        "--auth-user",
        "alice@example.test",
        "--auth-password",
        "wonderland",
        "--from",
        "alice@example.test",
        "--to",
        "alice@example.test",
        "--header",
        "Subject: over implicit tls",
    ]);
    assert!(ok, "{text}");
    assert!(text.contains("235 2.7.0"), "{text}");

    let msgs = pop_over_stls(&server, &pki, "alice@example.test", "wonderland");
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    let starttls = msgs.iter().find(|m| m.contains("over starttls")).unwrap();
    assert!(starttls.contains("with ESMTPS id"), "{starttls}");
    let implicit = msgs
        .iter()
        .find(|m| m.contains("over implicit tls"))
        .unwrap();
    assert!(implicit.contains("with ESMTPSA id"), "{implicit}");

    // The accepted lines say how each message came: TLS protocol and
    // cipher, its Message-ID, and the SASL user where there was one.
    let log = server.log();
    let accepted: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("message accepted"))
        .collect();
    assert_eq!(accepted.len(), 2, "{log}");
    for line in &accepted {
        assert!(
            line.contains("tls_protocol=TLSv1.3 tls_cipher=TLS13_"),
            "{line}"
        );
        assert!(line.contains("message_id=<"), "{line}");
    }
    let sasl: Vec<&&str> = accepted
        .iter()
        .filter(|l| l.contains("sasl_username=alice@example.test"))
        .collect();
    assert_eq!(sasl.len(), 1, "{log}");
    assert!(sasl[0].contains("from=<alice@example.test>"), "{log}");
}

#[test]
fn smtplib_submission_needs_tls_for_auth_and_checks_the_sender() {
    let pki = TestPki::new();
    let server = start(&pki);
    let out = server.cli(
        &["alias", "add", "sales@example.test", "alice@example.test"],
        "",
    );
    assert!(out.status.success(), "{out:?}");
    let out = python(
        r#"
import smtplib, ssl, sys
host, port, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ctx = ssl.create_default_context(cafile=ca)
s = smtplib.SMTP(host, port, timeout=20)
s.ehlo("client.test")
print("plain features", sorted(s.esmtp_features))
try:
    s.login("alice@example.test", "wonderland")
    print("LOGIN BEFORE TLS WORKED")
except smtplib.SMTPNotSupportedError:
    print("no auth before tls")
code, msg = s.mail("alice@example.test")
print("mail before auth", code, msg.decode())
s.rset()
s.starttls(context=ctx)
s.ehlo("client.test")
print("tls features", sorted(s.esmtp_features))
s.login("alice@example.test", "wonderland")
refused = s.sendmail("alice@example.test", ["bob@remote.test", "alice@example.test"], b"Subject: relayed\r\n\r\nhi\r\n")
print("relay", refused)
refused = s.sendmail("sales@example.test", ["alice@example.test"], b"Subject: from alias\r\n\r\nhi\r\n")
print("alias", refused)
try:
    s.sendmail("mallory@elsewhere.test", ["alice@example.test"], b"Subject: forged\r\n\r\nhi\r\n")
    print("FORGED SENDER ACCEPTED")
except smtplib.SMTPSenderRefused as e:
    print("forged", e.smtp_code, e.smtp_error.decode())
s.quit()
"#,
        &[
            &server.submission.unwrap().ip().to_string(),
            &server.submission.unwrap().port().to_string(),
            &pki.ca_str(),
        ],
    );
    assert!(out.contains("no auth before tls"), "{out}");
    let plain = out
        .lines()
        .find(|l| l.starts_with("plain features"))
        .unwrap();
    assert!(
        plain.contains("'starttls'") && !plain.contains("'auth'"),
        "{out}"
    );
    assert!(
        out.contains("mail before auth 530 5.7.0 Authentication required"),
        "{out}"
    );
    let tls = out.lines().find(|l| l.starts_with("tls features")).unwrap();
    assert!(
        tls.contains("'auth'") && !tls.contains("'starttls'"),
        "{out}"
    );
    assert!(out.contains("relay {}"), "authenticated relay: {out}");
    assert!(out.contains("alias {}"), "alias of the user: {out}");
    assert!(
        out.contains("forged 553 5.7.1 <mallory@elsewhere.test>: Sender address rejected"),
        "{out}"
    );
    // The relayed copy waits in the remote queue (its smarthost is closed).
    let queue = server.cli(&["queue", "list"], "");
    let queue = String::from_utf8_lossy(&queue.stdout);
    assert!(queue.contains("bob@remote.test"), "{queue}");
    assert!(!queue.contains("mallory"), "{queue}");
}

#[test]
fn smtp_ssl_and_pop3_ssl_on_the_implicit_tls_ports() {
    let pki = TestPki::new();
    let server = start(&pki);
    let out = python(
        r#"
import poplib, smtplib, ssl, sys
host, sport, pport, ca = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
ctx = ssl.create_default_context(cafile=ca)
s = smtplib.SMTP_SSL(host, sport, timeout=20, context=ctx)
s.ehlo("client.test")
print("features", sorted(s.esmtp_features))
s.login("alice@example.test", "wonderland")
s.sendmail("alice@example.test", ["alice@example.test"], b"Subject: smtps\r\n\r\nsecret stuff\r\n")
s.quit()
p = poplib.POP3_SSL(host, pport, timeout=20, context=ctx)
print("capa", sorted(p.capa()))
p.user("alice@example.test"); p.pass_("wonderland")
print("stat", p.stat()[0])
print("body", b"\n".join(p.retr(1)[1]).decode())
p.quit()
"#,
        &[
            "127.0.0.1",
            &server.submissions.unwrap().port().to_string(),
            &server.pop3s.expect("pop3s listener").port().to_string(),
            &pki.ca_str(),
        ],
    );
    let features = out.lines().find(|l| l.starts_with("features")).unwrap();
    assert!(
        features.contains("'auth'") && !features.contains("'starttls'"),
        "{out}"
    );
    let capa = out.lines().find(|l| l.starts_with("capa")).unwrap();
    assert!(capa.contains("'USER'") && !capa.contains("'STLS'"), "{out}");
    assert!(out.contains("stat 1"), "{out}");
    assert!(out.contains("secret stuff"), "{out}");
    assert!(out.contains("with ESMTPSA id"), "{out}");
}

#[test]
fn poplib_stls_and_plaintext_login_refused_before_it() {
    let pki = TestPki::new();
    let server = start(&pki);
    let out = python(
        r#"
import poplib, ssl, sys
host, port, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ctx = ssl.create_default_context(cafile=ca)
p = poplib.POP3(host, port, timeout=20)
print("capa", sorted(p.capa()))
try:
    p.user("alice@example.test")
    print("USER ACCEPTED IN PLAINTEXT")
except poplib.error_proto as e:
    print("refused", e.args[0].decode())
p.stls(context=ctx)
print("capa after", sorted(p.capa()))
p.user("alice@example.test"); p.pass_("wonderland")
print("stat", p.stat())
p.quit()
"#,
        &[
            &server.pop3.ip().to_string(),
            &server.pop3.port().to_string(),
            &pki.ca_str(),
        ],
    );
    let capa = out.lines().find(|l| l.starts_with("capa ")).unwrap();
    assert!(capa.contains("'STLS'") && !capa.contains("'USER'"), "{out}");
    assert!(
        out.contains(
            "refused -ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections."
        ),
        "{out}"
    );
    let after = out.lines().find(|l| l.starts_with("capa after")).unwrap();
    assert!(
        after.contains("'USER'") && !after.contains("'STLS'"),
        "{out}"
    );
    assert!(out.contains("stat (0, 0)"), "{out}");

    // The same refusals byte for byte, for PASS and SASL PLAIN too.
    let mut c = Client::connect(server.pop3);
    assert!(c.line().starts_with("+OK"));
    let refused =
        "-ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections.";
    assert_eq!(c.pop("USER alice@example.test"), refused);
    assert_eq!(c.pop("PASS wonderland"), refused);
    // base64("\0alice@example.test\0wonderland")
    assert_eq!(
        c.pop("AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdAB3b25kZXJsYW5k"),
        refused
    );
}

#[test]
fn plaintext_login_allowed_with_allow_plaintext_auth_or_without_tls() {
    let pki = TestPki::new();
    let server = TestServer::start_with(&tls_config(&pki, "allow_plaintext_auth = true", ""));
    server.add_user("alice@example.test", "wonderland");
    let mut c = Client::connect(server.pop3);
    assert!(c.line().starts_with("+OK"));
    assert!(c.pop("USER alice@example.test").starts_with("+OK"));
    assert_eq!(c.pop("PASS wonderland"), "+OK Logged in.");
    // SMTP offers AUTH before TLS too, and STARTTLS then forgets the login.
    let mut s = Client::connect(server.submission.unwrap());
    assert!(s.reply().starts_with("220"));
    let ehlo = s.cmd("EHLO client.test");
    assert!(ehlo.contains("AUTH PLAIN LOGIN"), "{ehlo}");
    assert_eq!(
        s.cmd("AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdAB3b25kZXJsYW5k"),
        "235 2.7.0 Authentication successful"
    );
    assert!(s.cmd("STARTTLS").starts_with("220 2.0.0"));
    s.handshake(&pki).unwrap();
    assert!(s.cmd("EHLO client.test").starts_with("250-mx.example.test"));
    assert!(
        s.cmd("MAIL FROM:<alice@example.test>")
            .starts_with("530 5.7.0"),
        "AUTH is forgotten after STARTTLS"
    );
    drop(server);

    // No [tls] at all (a test setup): plaintext login keeps working.
    let server = TestServer::start();
    server.add_user("alice@example.test", "wonderland");
    let mut c = Client::connect(server.pop3);
    assert!(c.line().starts_with("+OK"));
    assert!(c.pop("USER alice@example.test").starts_with("+OK"));
    assert_eq!(c.pop("PASS wonderland"), "+OK Logged in.");
}

/// Runs `openssl s_client` with `-starttls proto`, feeding `input` (LF line
/// ends; `-crlf` turns them into CRLF); returns its output.
fn s_client(addr: SocketAddr, proto: &str, pki: &TestPki, input: &str) -> String {
    let mut child = Command::new("openssl")
        .args(["s_client", "-connect", &host_port(addr), "-starttls", proto])
        .args(["-CAfile", &pki.ca_str(), "-verify_return_error"])
        .args(["-verify_hostname", "mx.example.test"])
        .args(["-servername", "mx.example.test", "-crlf", "-ign_eof"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run openssl");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().expect("openssl output");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn openssl_s_client_starttls_smtp_and_pop3() {
    let pki = TestPki::new();
    let server = start(&pki);
    let out = s_client(server.smtp, "smtp", &pki, "EHLO client.test\nQUIT\n");
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
    assert!(
        out.contains("CN=mx.example.test") || out.contains("CN = mx.example.test"),
        "{out}"
    );
    // After the handshake: a fresh EHLO, AUTH offered, STARTTLS not.
    let after = &out[out.find("Verify return code").unwrap()..];
    assert!(after.contains("250-AUTH PLAIN LOGIN"), "{out}");
    assert!(!after.contains("STARTTLS"), "{out}");
    assert!(after.contains("221 2.0.0 Bye"), "{out}");

    let out = s_client(
        server.pop3,
        "pop3",
        &pki,
        "USER alice@example.test\nPASS wonderland\nSTAT\nQUIT\n",
    );
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
    assert!(out.contains("+OK Logged in."), "{out}");
    assert!(out.contains("+OK 0 0"), "{out}");
}

/// CVE-2011-0411: commands pipelined after STARTTLS in the same packet must
/// not be run inside the TLS session (a man in the middle could inject them).
#[test]
fn starttls_discards_commands_sent_before_the_handshake() {
    let pki = TestPki::new();
    let server = start(&pki);
    let mut c = Client::connect(server.smtp);
    assert!(c.reply().starts_with("220 "));
    assert!(c.cmd("EHLO client.test").contains("STARTTLS"));
    c.send(b"STARTTLS\r\nRSET\r\nMAIL FROM:<evil@elsewhere.test>\r\n");
    assert_eq!(c.reply(), "220 2.0.0 Ready to start TLS");
    // Any plaintext answer to RSET would break this handshake.
    c.handshake(&pki).expect("handshake right after the 220");
    // The first reply inside TLS is the one to our own first command.
    assert_eq!(
        c.cmd("RCPT TO:<alice@example.test>"),
        "503 5.5.1 Error: need MAIL command"
    );
    assert!(c.cmd("EHLO client.test").starts_with("250-mx.example.test"));
    assert_eq!(c.cmd("QUIT"), "221 2.0.0 Bye");
    assert!(!server.log().contains("command=RSET"), "{}", server.log());
    assert!(!server.log().contains("evil@"), "{}", server.log());

    // POP3 STLS: the pipelined USER is discarded, so PASS has no user.
    let mut p = Client::connect(server.pop3);
    assert!(p.line().starts_with("+OK"));
    p.send(b"STLS\r\nUSER alice@example.test\r\n");
    assert_eq!(p.line(), "+OK Begin TLS negotiation.");
    p.handshake(&pki).expect("handshake right after +OK");
    assert_eq!(p.pop("PASS wonderland"), "-ERR No username given.");
    assert!(p.pop("USER alice@example.test").starts_with("+OK"));
    assert_eq!(p.pop("PASS wonderland"), "+OK Logged in.");
}

#[test]
fn starttls_resets_the_session_and_a_second_one_is_refused() {
    let pki = TestPki::new();
    let server = start(&pki);
    let mut c = Client::connect(server.submission.unwrap());
    assert!(c.reply().starts_with("220 "));
    let ehlo = c.cmd("EHLO client.test");
    assert!(
        ehlo.contains("STARTTLS") && !ehlo.contains("AUTH"),
        "{ehlo}"
    );
    assert_eq!(
        c.cmd("AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdAB3b25kZXJsYW5k"),
        "538 5.7.11 Encryption required for requested authentication mechanism"
    );
    assert_eq!(c.cmd("STARTTLS"), "220 2.0.0 Ready to start TLS");
    c.handshake(&pki).unwrap();
    assert_eq!(c.peer_cert(), pki.leaf_der);
    // EHLO is forgotten.
    assert_eq!(
        c.cmd("MAIL FROM:<alice@example.test>"),
        "503 5.5.1 Error: send HELO/EHLO first"
    );
    let ehlo = c.cmd("EHLO client.test");
    assert!(
        ehlo.contains("AUTH PLAIN LOGIN") && !ehlo.contains("STARTTLS"),
        "{ehlo}"
    );
    assert_eq!(c.cmd("STARTTLS"), "554 5.5.1 Error: TLS already active");
    assert_eq!(
        c.cmd("MAIL FROM:<alice@example.test>"),
        "530 5.7.0 Authentication required"
    );
    assert_eq!(
        c.cmd("AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdAB3b25kZXJsYW5k"),
        "235 2.7.0 Authentication successful"
    );
    assert_eq!(c.cmd("MAIL FROM:<alice@example.test>"), "250 2.1.0 Ok");

    // Implicit TLS: STARTTLS is not offered and refused.
    let mut c = Client::connect_tls(server.submissions.unwrap(), &pki);
    assert!(c.reply().starts_with("220 "));
    assert!(!c.cmd("EHLO client.test").contains("STARTTLS"));
    assert_eq!(c.cmd("STARTTLS"), "554 5.5.1 Error: TLS already active");

    // POP3: a second STLS is refused.
    let mut p = Client::connect(server.pop3);
    assert!(p.line().starts_with("+OK"));
    assert!(p.pop("STLS").starts_with("+OK"));
    p.handshake(&pki).unwrap();
    assert_eq!(p.pop("STLS"), "-ERR TLS is already active.");
    let mut p = Client::connect_tls(server.pop3s.unwrap(), &pki);
    assert!(p.line().starts_with("+OK"));
    assert_eq!(p.pop("STLS"), "-ERR TLS is already active.");
    // SASL PLAIN (RFC 5034) over TLS, with the response on its own line.
    assert_eq!(p.pop("AUTH PLAIN"), "+ ");
    assert_eq!(
        p.pop("AGFsaWNlQGV4YW1wbGUudGVzdAB3b25kZXJsYW5k"),
        "+OK Logged in."
    );
}

#[test]
fn sighup_reloads_the_certificate() {
    let mut pki = TestPki::new();
    let server = start(&pki);
    let first = pki.leaf_der.clone();
    let mut old = Client::connect_tls(server.submissions.unwrap(), &pki);
    assert!(old.reply().starts_with("220 "));
    assert_eq!(old.peer_cert(), first);

    pki.issue("mx2.example.test");
    assert_ne!(pki.leaf_der, first);
    let pid = server.pid().unwrap().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    assert!(
        server.wait_for_log("tls certificate reloaded"),
        "{}",
        server.log()
    );
    // New handshakes, implicit and STARTTLS, SMTP and POP3, see the new one.
    let mut c = Client::connect_tls(server.submissions.unwrap(), &pki);
    assert!(c.reply().starts_with("220 "));
    assert_eq!(c.peer_cert(), pki.leaf_der);
    let mut c = Client::connect(server.smtp);
    assert!(c.reply().starts_with("220 "));
    assert!(c.cmd("EHLO client.test").contains("STARTTLS"));
    assert!(c.cmd("STARTTLS").starts_with("220"));
    c.handshake(&pki).unwrap();
    assert_eq!(c.peer_cert(), pki.leaf_der);
    let mut p = Client::connect_tls(server.pop3s.unwrap(), &pki);
    assert!(p.line().starts_with("+OK"));
    assert_eq!(p.peer_cert(), pki.leaf_der);
    // The established session goes on with the old one.
    assert_eq!(old.cmd("NOOP"), "250 2.0.0 Ok");

    // A broken key: the reload fails loudly and the last good certificate
    // stays in use.
    let current = pki.leaf_der.clone();
    pki.replace("key.pem", b"not a key\n");
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    assert!(server.wait_for_log("tls reload failed"), "{}", server.log());
    let mut c = Client::connect_tls(server.submissions.unwrap(), &pki);
    assert!(c.reply().starts_with("220 "));
    assert_eq!(c.peer_cert(), current);
}
