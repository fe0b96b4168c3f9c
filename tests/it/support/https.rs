//! An HTTPS server for MTA-STS policies (RFC 8461 §3.3): Python's
//! `http.server` with `ssl` (run with `/usr/bin/python3`), serving
//! `/.well-known/mta-sts.txt` as `text/plain` from a file the test can
//! rewrite, and counting the fetches.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{accepts_tcp, wait_until};

const POLICY_PY: &str = r#"
import http.server, os, ssl, sys
host, port, cert, key, body, log = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6]

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        with open(log, "a") as f:
            f.write("%s %s\n" % (self.headers.get("Host"), self.path))
        if self.path != "/.well-known/mta-sts.txt":
            self.send_error(404)
            return
        with open(body, "rb") as f:
            data = f.read()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer((host, port), Handler)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
server.socket = ctx.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"#;

/// A running policy server; killed on drop.
pub struct PolicyServer {
    child: Child,
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl PolicyServer {
    /// Serves `policy` on `ip:port` over HTTPS with `cert` and `key` and
    /// waits until it accepts connections.
    ///
    /// # Panics
    ///
    /// When `/usr/bin/python3` is missing or the server does not come up.
    pub fn start(ip: Ipv4Addr, port: u16, cert: &Path, key: &Path, policy: &str) -> PolicyServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let body = dir.path().join("mta-sts.txt");
        fs::write(&body, policy).unwrap();
        let log = dir.path().join("requests.log");
        fs::write(&log, "").unwrap();
        let child = Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(POLICY_PY)
            .arg(ip.to_string())
            .arg(port.to_string())
            .arg(cert)
            .arg(key)
            .arg(&body)
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.path().join("stderr.log")).unwrap())
            .spawn()
            .expect("start /usr/bin/python3");
        let addr = SocketAddr::from((ip, port));
        let mut server = PolicyServer { child, addr, dir };
        let up = wait_until(Duration::from_secs(15), || {
            accepts_tcp(addr) || matches!(server.child.try_wait(), Ok(Some(_)))
        });
        if !up || !matches!(server.child.try_wait(), Ok(None)) {
            let err = fs::read_to_string(server.dir.path().join("stderr.log")).unwrap_or_default();
            let _ = server.child.kill();
            panic!("policy server did not start: {err}");
        }
        server
    }

    /// Replaces the policy served from now on.
    pub fn set_policy(&self, policy: &str) {
        let tmp = self.dir.path().join(".mta-sts.txt");
        fs::write(&tmp, policy).unwrap();
        fs::rename(&tmp, self.dir.path().join("mta-sts.txt")).unwrap();
    }

    /// How many times the policy was asked for.
    pub fn fetches(&self) -> usize {
        fs::read_to_string(self.dir.path().join("requests.log"))
            .unwrap_or_default()
            .lines()
            .count()
    }
}

impl Drop for PolicyServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
