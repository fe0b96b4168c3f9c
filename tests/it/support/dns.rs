//! A real DNS server for tests: dnsmasq (Debian `dnsmasq-base`) on
//! 127.0.0.1 and a free port, answering only from the records it is given.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{free_udp_tcp_port, wait_until};

/// Records to serve. Every name under the zones given to [`Zone::new`] that
/// has no record is NXDOMAIN; names outside them are REFUSED (there is no
/// upstream), which a resolver sees as a temporary failure.
#[derive(Debug, Clone, Default)]
pub struct Zone {
    args: Vec<String>,
}

impl Zone {
    /// Serves `domain` (e.g. `"test"`) authoritatively from local records.
    pub fn new(domain: &str) -> Zone {
        Zone {
            args: vec![format!("--local=/{domain}/")],
        }
    }

    /// `domain MX pref exchange`.
    pub fn mx(mut self, domain: &str, exchange: &str, pref: u16) -> Zone {
        self.args
            .push(format!("--mx-host={domain},{exchange},{pref}"));
        self
    }

    /// `name A ip` (and the matching PTR).
    pub fn a(mut self, name: &str, ip: Ipv4Addr) -> Zone {
        self.args.push(format!("--host-record={name},{ip}"));
        self
    }

    /// `name TXT "s1" "s2" ...`: each string at most 255 octets and
    /// without commas (dnsmasq separates the strings at commas).
    pub fn txt(mut self, name: &str, strings: &[&str]) -> Zone {
        assert!(strings.iter().all(|s| s.len() <= 255 && !s.contains(',')));
        self.args
            .push(format!("--txt-record={name},{}", strings.join(",")));
        self
    }

    /// `domain MX 0 .` (RFC 7505). dnsmasq's `--mx-host` cannot name the
    /// root, so the record goes in raw: preference 0 (`0000`) and the root
    /// name (`00`).
    pub fn null_mx(mut self, domain: &str) -> Zone {
        self.args.push(format!("--dns-rr={domain},15,000000"));
        self
    }
}

/// A running dnsmasq; killed on drop.
pub struct Dnsmasq {
    child: Child,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

fn dnsmasq_binary() -> &'static str {
    if Path::new("/usr/sbin/dnsmasq").exists() {
        "/usr/sbin/dnsmasq"
    } else {
        "dnsmasq"
    }
}

impl Dnsmasq {
    /// Starts dnsmasq with `zone` and waits until it answers a query.
    ///
    /// # Panics
    ///
    /// When dnsmasq is missing or does not come up after a few ports.
    pub fn start(zone: &Zone) -> Dnsmasq {
        let dir = tempfile::tempdir().expect("temp dir");
        let ip = Ipv4Addr::LOCALHOST;
        let mut last_log = String::new();
        for attempt in 0..5 {
            let port = free_udp_tcp_port(ip);
            let log_path = dir.path().join(format!("dnsmasq-{attempt}.log"));
            let log = File::create(&log_path).expect("log file");
            let mut child = Command::new(dnsmasq_binary())
                .args([
                    "--no-daemon",
                    "--conf-file=/dev/null",
                    "--pid-file=",
                    "--no-resolv",
                    "--no-hosts",
                    "--no-poll",
                    "--bind-interfaces",
                    "--leasefile-ro",
                    "--log-facility=-",
                ])
                .arg(format!("--listen-address={ip}"))
                .arg(format!("--port={port}"))
                .args(&zone.args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("start dnsmasq (Debian package dnsmasq-base)");
            let addr = SocketAddr::from((ip, port));
            let ready = wait_until(Duration::from_secs(10), || {
                answers(addr) || matches!(child.try_wait(), Ok(Some(_)))
            });
            if ready && matches!(child.try_wait(), Ok(None)) {
                return Dnsmasq {
                    child,
                    addr,
                    _dir: dir,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
            last_log = std::fs::read_to_string(&log_path).unwrap_or_default();
            // Another process took the port between our probe and
            // dnsmasq's bind: try another one. Anything else is fatal.
            if !last_log.contains("in use") {
                break;
            }
        }
        panic!("dnsmasq did not start:\n{last_log}");
    }
}

/// True when a DNS server on `addr` answers a query (any answer will do).
fn answers(addr: SocketAddr) -> bool {
    let Ok(sock) = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)) else {
        return false;
    };
    let _ = sock.set_read_timeout(Some(Duration::from_millis(100)));
    // id 0x7e57, RD, one question: `ready.invalid. A IN`.
    let mut query = vec![0x7e, 0x57, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in ["ready", "invalid"] {
        query.push(label.len() as u8);
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]);
    if sock.send_to(&query, addr).is_err() {
        return false;
    }
    let mut buf = [0u8; 512];
    matches!(sock.recv(&mut buf), Ok(n) if n >= 12 && buf[..2] == [0x7e, 0x57])
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
