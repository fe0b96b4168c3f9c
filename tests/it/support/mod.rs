//! Real helper servers for the integration tests, on loopback only: a DNS
//! server (dnsmasq) and receiving SMTP servers (aiosmtpd, and small scripted
//! ones written in Rust). Every helper stops its process or task on drop.

#![allow(dead_code)] // Each test module uses a different part of the support.

pub mod bind;
pub mod dns;
pub mod https;
pub mod mx;
pub mod postfix;
pub mod server;
pub mod tmpfs;

use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A loopback address no other test in this process uses (Linux routes all
/// of 127.0.0.0/8 to `lo`). Tests run in parallel; giving each server its own
/// address keeps one test's servers out of another's way. The second octet
/// comes from the process id so that two test processes rarely meet.
pub fn unique_loopback() -> Ipv4Addr {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let second = 10 + (std::process::id() % 200) as u8;
    // 250 × 250 addresses per process, skipping .0 and .255.
    let third = (n / 250 % 250) as u8 + 1;
    let fourth = (n % 250) as u8 + 1;
    Ipv4Addr::new(127, second, third, fourth)
}

/// A TCP port that is free on every address in `ips` right now, learned by
/// binding port 0 on the first one. The caller's server binds it a moment
/// later; servers that fail to bind are retried by their starters.
pub fn free_tcp_port(ips: &[Ipv4Addr]) -> u16 {
    for _ in 0..20 {
        let first = TcpListener::bind((ips[0], 0)).expect("bind a loopback address");
        let port = first.local_addr().expect("local addr").port();
        let others: Result<Vec<_>, _> = ips[1..]
            .iter()
            .map(|ip| TcpListener::bind((*ip, port)))
            .collect();
        if others.is_ok() {
            return port;
        }
    }
    panic!("no TCP port free on all of {ips:?}");
}

/// A port free for both UDP and TCP on `ip` (for DNS).
pub fn free_udp_tcp_port(ip: Ipv4Addr) -> u16 {
    for _ in 0..20 {
        let udp = UdpSocket::bind((ip, 0)).expect("bind UDP on loopback");
        let port = udp.local_addr().expect("local addr").port();
        if TcpListener::bind((ip, port)).is_ok() {
            return port;
        }
    }
    panic!("no port free for UDP and TCP on {ip}");
}

/// Polls `ready` every 20 ms until it is true or `limit` passes.
pub fn wait_until(limit: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if ready() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// True once something accepts TCP connections on `addr`.
pub fn accepts_tcp(addr: SocketAddr) -> bool {
    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}
