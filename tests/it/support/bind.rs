//! A real authoritative DNS server with DNSSEC for tests: BIND's `named`
//! (Debian `bind9`) on 127.0.0.1 and a free port, serving one zone signed
//! at test time with `dnssec-keygen` and `dnssec-signzone` (Debian
//! `bind9-dnsutils`) and, optionally, unsigned child zones delegated from
//! it without a DS record (provably insecure, RFC 4035 §5.2). The zone's
//! key-signing key is written out as the trust anchor a validating
//! resolver needs (`[dns] trust_anchor`).

use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use super::{free_udp_tcp_port, wait_until};

/// Records of one zone, in zone-file syntax relative to nothing: every
/// owner name is written fully qualified (`mx.dest.test.`).
#[derive(Debug, Clone)]
pub struct ZoneData {
    origin: String,
    records: Vec<String>,
}

impl ZoneData {
    /// An empty zone for `origin` (e.g. `"test"`).
    pub fn new(origin: &str) -> ZoneData {
        ZoneData {
            origin: origin.trim_end_matches('.').to_owned(),
            records: Vec::new(),
        }
    }

    /// One record line, e.g. `"dest.test. MX 10 mx.dest.test."`.
    pub fn record(mut self, line: impl Into<String>) -> ZoneData {
        self.records.push(line.into());
        self
    }

    /// `name MX pref exchange`.
    pub fn mx(self, name: &str, exchange: &str, pref: u16) -> ZoneData {
        self.record(format!("{name}. MX {pref} {exchange}."))
    }

    /// `name A ip`.
    pub fn a(self, name: &str, ip: Ipv4Addr) -> ZoneData {
        self.record(format!("{name}. A {ip}"))
    }

    /// `name TXT "text"`.
    pub fn txt(self, name: &str, text: &str) -> ZoneData {
        self.record(format!("{name}. TXT \"{text}\""))
    }

    /// `_port._tcp.host TLSA usage selector matching data`.
    pub fn tlsa(
        self,
        host: &str,
        port: u16,
        usage: u8,
        selector: u8,
        matching: u8,
        data: &[u8],
    ) -> ZoneData {
        let hex: String = data.iter().map(|b| format!("{b:02X}")).collect();
        self.record(format!(
            "_{port}._tcp.{host}. TLSA {usage} {selector} {matching} {hex}"
        ))
    }

    fn file_text(&self) -> String {
        let o = &self.origin;
        let mut text = format!(
            "$TTL 300\n\
             {o}. SOA ns.{o}. hostmaster.{o}. 1 3600 600 86400 60\n\
             {o}. NS ns.{o}.\n\
             ns.{o}. A 127.0.0.1\n"
        );
        for r in &self.records {
            text.push_str(r);
            text.push('\n');
        }
        text
    }
}

/// A running `named`; killed on drop.
pub struct Named {
    child: Child,
    /// Where it answers (UDP and TCP).
    pub addr: SocketAddr,
    /// The signed zone's key-signing key as a DNSKEY record: the trust
    /// anchor for `[dns] trust_anchor`.
    pub trust_anchor: PathBuf,
    signed_origin: String,
    children: Vec<String>,
    dir: tempfile::TempDir,
}

/// Writes `signed` (with the delegations to `children`) and signs it with
/// the key in `d`; `newer` gives it a serial above the last one.
fn sign(d: &Path, signed: &ZoneData, children: &[String], newer: bool) {
    let origin = &signed.origin;
    let mut parent = signed.clone();
    for child in children {
        // A delegation without DS: NSEC proves there is none.
        parent = parent.record(format!("{child}. NS ns.{origin}."));
    }
    let zone_file = d.join(format!("{origin}.zone"));
    fs::write(&zone_file, parent.file_text()).unwrap();
    let mut cmd = Command::new("dnssec-signzone");
    cmd.current_dir(d).args(["-q", "-z", "-S", "-K", "."]);
    if newer {
        cmd.args(["-N", "unixtime"]);
    }
    run(cmd
        .arg("-o")
        .arg(format!("{origin}."))
        .arg("-f")
        .arg(format!("{origin}.zone.signed"))
        .arg(&zone_file));
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (Debian packages bind9, bind9-dnsutils)"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

impl Named {
    /// Signs `signed` (its children in `insecure` are delegated to
    /// unsigned zones served by the same server), starts `named` and waits
    /// until it answers for the signed zone.
    ///
    /// # Panics
    ///
    /// When the BIND tools are missing or `named` does not come up.
    pub fn start(signed: &ZoneData, insecure: &[ZoneData]) -> Named {
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path();
        let origin = &signed.origin;
        for child in insecure {
            fs::write(d.join(format!("{}.zone", child.origin)), child.file_text()).unwrap();
        }
        let children: Vec<String> = insecure.iter().map(|c| c.origin.clone()).collect();
        // One combined signing key (a CSK, `-z`), as many real zones have:
        // hickory 0.26 asks for the DS of a non-root anchor's zone as soon
        // as one of the zone's DNSKEYs is not itself an anchor, and that DS
        // lives above the anchor, where this server has nothing to say; so
        // the whole DNSKEY set must be the anchor.
        let out = run(Command::new("dnssec-keygen")
            .current_dir(d)
            .args(["-q", "-a", "ECDSAP256SHA256", "-n", "ZONE", "-f", "KSK"])
            .arg(format!("{origin}.")));
        let ksk = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        sign(d, signed, &children, false);
        // The anchor: the key's DNSKEY line, without the comments.
        let key = fs::read_to_string(d.join(format!("{ksk}.key"))).unwrap();
        let anchor: String = key
            .lines()
            .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
            .map(|l| format!("{l}\n"))
            .collect();
        let trust_anchor = d.join("anchor.key");
        fs::write(&trust_anchor, anchor).unwrap();

        let ip = Ipv4Addr::LOCALHOST;
        let mut last_log = String::new();
        for attempt in 0..5 {
            let port = free_udp_tcp_port(ip);
            let mut zones = format!(
                "zone \"{origin}\" {{ type primary; file \"{}\"; }};\n",
                d.join(format!("{origin}.zone.signed")).display()
            );
            for child in insecure {
                zones.push_str(&format!(
                    "zone \"{0}\" {{ type primary; file \"{1}\"; }};\n",
                    child.origin,
                    d.join(format!("{}.zone", child.origin)).display()
                ));
            }
            let conf = d.join("named.conf");
            fs::write(
                &conf,
                format!(
                    "options {{\n\
                     directory \"{dir}\";\n\
                     pid-file none;\n\
                     listen-on port {port} {{ {ip}; }};\n\
                     listen-on-v6 {{ none; }};\n\
                     recursion no;\n\
                     dnssec-validation no;\n\
                     notify no;\n\
                     }};\n{zones}",
                    dir = d.display()
                ),
            )
            .unwrap();
            let log_path = d.join(format!("named-{attempt}.log"));
            let log = fs::File::create(&log_path).unwrap();
            let mut child = Command::new(named_binary())
                .args(["-g", "-n", "1", "-c"])
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("start named (Debian package bind9)");
            let addr = SocketAddr::from((ip, port));
            let ready = wait_until(Duration::from_secs(20), || {
                answers(addr, origin) || matches!(child.try_wait(), Ok(Some(_)))
            });
            if ready && matches!(child.try_wait(), Ok(None)) {
                return Named {
                    child,
                    addr,
                    trust_anchor,
                    signed_origin: origin.clone(),
                    children,
                    dir,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
            last_log = fs::read_to_string(&log_path).unwrap_or_default();
            if !last_log.contains("address in use") {
                break;
            }
        }
        panic!("named did not start:\n{last_log}");
    }

    /// Replaces the signed zone's records with `signed` (same origin, same
    /// key), has `named` load it (SIGHUP) and waits until it answers
    /// `name TXT` with `text` in it.
    pub fn update(&self, signed: &ZoneData, name: &str, text: &str) {
        assert_eq!(signed.origin, self.signed_origin);
        sign(self.dir.path(), signed, &self.children, true);
        run(Command::new("kill")
            .arg("-HUP")
            .arg(self.child.id().to_string()));
        let served = wait_until(Duration::from_secs(20), || {
            Command::new("dig")
                .args(["+short", "+time=1", "+tries=1", "-p"])
                .arg(self.addr.port().to_string())
                .arg(format!("@{}", self.addr.ip()))
                .arg(format!("{name}."))
                .arg("TXT")
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(text))
        });
        assert!(served, "named does not serve the new {name} TXT record");
    }

    /// The server's working directory (zone files, keys, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

fn named_binary() -> &'static str {
    if Path::new("/usr/sbin/named").exists() {
        "/usr/sbin/named"
    } else {
        "named"
    }
}

/// True when `dig` gets an authoritative SOA for `origin` from `addr`.
fn answers(addr: SocketAddr, origin: &str) -> bool {
    Command::new("dig")
        .args(["+short", "+time=1", "+tries=1", "-p"])
        .arg(addr.port().to_string())
        .arg(format!("@{}", addr.ip()))
        .arg(format!("{origin}."))
        .arg("SOA")
        .output()
        .is_ok_and(|o| o.status.success() && !o.stdout.is_empty())
}

impl Drop for Named {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
