//! A private Postfix instance as a receiving MX on loopback: its smtpd
//! offers CHUNKING (Postfix ≥ 3.4) and logs the commands of each session
//! (`disconnect from … bdat=1`); it relays the domains it is given to
//! another server, so what it received can be read back there. Own config,
//! queue and log in a temporary directory; stopped on drop. Postfix needs
//! root (it switches to its own user); elsewhere [`Postfix::start`] says
//! why and returns `None`.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use super::{accepts_tcp, wait_until};

/// Postfix's services, as a stock master.cf has them, with smtpd on `listen`.
const MASTER_CF: &str = "\
@LISTEN@ inet n - n - - smtpd
pickup unix n - n 60 1 pickup
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
smtp unix - - n - - smtp
relay unix - - n - - smtp
showq unix n - n - - showq
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
";

pub struct Postfix {
    dir: tempfile::TempDir,
    pub addr: SocketAddr,
}

impl Postfix {
    /// Postfix on `127.0.0.1:port` relaying each of `domains` to `next_hop`
    /// (no DNS), or `None` (with a message) when it cannot run here. (Postfix
    /// listens only on addresses an interface has, and `lo` has just
    /// 127.0.0.1, not the rest of 127.0.0.0/8.)
    pub fn start(port: u16, domains: &[&str], next_hop: SocketAddr) -> Option<Postfix> {
        let ip = Ipv4Addr::LOCALHOST;
        if !PathBuf::from("/usr/sbin/postfix").exists() {
            eprintln!("SKIPPED: postfix is not installed (apt-get install postfix)");
            return None;
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: Postfix needs root to run");
            return None;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path();
        // Postfix's daemons run as user postfix and must reach in.
        fs::set_permissions(root, fs::Permissions::from_mode(0o755)).unwrap();
        for sub in ["etc", "queue", "data"] {
            fs::create_dir(root.join(sub)).unwrap();
        }
        let chown = Command::new("chown")
            .arg("postfix")
            .arg(root.join("data"))
            .status();
        assert!(chown.is_ok_and(|s| s.success()), "chown postfix data");
        let r = root.display();
        fs::write(
            root.join("etc/main.cf"),
            format!(
                "compatibility_level = 3.6
queue_directory = {r}/queue
data_directory = {r}/data
mail_owner = postfix
setgid_group = postdrop
maillog_file = {r}/maillog
maillog_file_prefixes = {r}
myhostname = mx.postfix.test
mydestination =
alias_maps =
alias_database =
inet_interfaces = {ip}
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
relay_domains = {domains}
transport_maps = texthash:{r}/etc/transport
smtp_dns_support_level = disabled
biff = no
",
                domains = domains.join(", "),
            ),
        )
        .unwrap();
        fs::write(
            root.join("etc/master.cf"),
            MASTER_CF.replace("@LISTEN@", &format!("{ip}:{port}")),
        )
        .unwrap();
        let transport: String = domains
            .iter()
            .map(|d| format!("{d} smtp:[{}]:{}\n", next_hop.ip(), next_hop.port()))
            .collect();
        fs::write(root.join("etc/transport"), transport).unwrap();
        let out = Command::new("postfix")
            .arg("-c")
            .arg(root.join("etc"))
            .arg("start")
            .output()
            .expect("run postfix");
        // Its own fatal errors go to syslog, which may not exist here.
        assert!(
            out.status.success(),
            "postfix start: {}{}; check: {:?}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            Command::new("postfix")
                .arg("-c")
                .arg(root.join("etc"))
                .arg("check")
                .output()
        );
        let pf = Postfix {
            dir,
            addr: SocketAddr::from((ip, port)),
        };
        assert!(
            wait_until(Duration::from_secs(30), || accepts_tcp(pf.addr)),
            "Postfix smtpd not listening; log:\n{}",
            pf.log()
        );
        Some(pf)
    }

    /// Postfix's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("maillog")).unwrap_or_default()
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = Command::new("postfix")
            .arg("-c")
            .arg(self.dir.path().join("etc"))
            .arg("stop")
            .output();
    }
}
