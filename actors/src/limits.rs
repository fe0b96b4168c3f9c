//! Connection limits (Postfix's anvil): open connections per client address
//! and in total, per protocol, and the [`ConnectionGuard`] that a connection
//! holds for its lifetime. Knows nothing of sockets or actors.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio_util::task::{task_tracker::TaskTrackerToken, TaskTracker};

/// Connection counts per client address and in total, per protocol.
///
/// Every open connection also holds a token of one [`TaskTracker`], so
/// that a stopping server can wait for the last one ([`Limits::idle`]).
#[derive(Default)]
pub(crate) struct Limits {
    per_ip: Mutex<HashMap<(IpAddr, &'static str), usize>>,
    total: Mutex<HashMap<&'static str, usize>>,
    open: TaskTracker,
}

impl Limits {
    /// Takes a slot for a connection of protocol `kind` (`"smtp"`, `"pop3"`)
    /// from `ip`; `None` when `ip` already has `per_ip` of them open or
    /// `kind` has `total`.
    pub(crate) fn try_acquire(
        self: &Arc<Self>,
        ip: IpAddr,
        per_ip: usize,
        total: usize,
        kind: &'static str,
    ) -> Option<ConnectionGuard> {
        let mut totals = self.total.lock().unwrap_or_else(|e| e.into_inner());
        let mut ips = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let t = totals.entry(kind).or_default();
        let n = ips.entry((ip, kind)).or_default();
        if *t >= total || *n >= per_ip {
            if *n == 0 {
                ips.remove(&(ip, kind));
            }
            return None;
        }
        *t += 1;
        *n += 1;
        postino_core::metrics::session_opened(kind);
        Some(ConnectionGuard {
            limits: self.clone(),
            ip,
            kind,
            _open: self.open.token(),
        })
    }

    /// Resolves when no connection is open.
    pub(crate) async fn idle(&self) {
        // A tracker's wait resolves only once it is closed. Closing does not
        // stop `token()` from counting later connections, so it may stay
        // closed (and `idle` may be called again).
        self.open.close();
        self.open.wait().await;
    }

    /// Open connections right now.
    #[cfg(test)]
    fn open(&self) -> usize {
        self.open.len()
    }

    /// Open connections of protocol `kind` from `ip`.
    #[cfg(test)]
    fn open_from(&self, ip: IpAddr, kind: &'static str) -> usize {
        let ips = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        ips.get(&(ip, kind)).copied().unwrap_or(0)
    }
}

/// Held by a connection actor; releases its slot when the actor is dropped.
pub struct ConnectionGuard {
    limits: Arc<Limits>,
    ip: IpAddr,
    kind: &'static str,
    /// Dropped after `drop` has given the slot back, so that [`Limits::idle`]
    /// never sees a count that is still about to fall.
    _open: TaskTrackerToken,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let mut totals = self.limits.total.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = totals.get_mut(self.kind) {
            *t = t.saturating_sub(1);
        }
        let mut ips = self.limits.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = ips.get_mut(&(self.ip, self.kind)) {
            *n -= 1;
            if *n == 0 {
                ips.remove(&(self.ip, self.kind));
            }
        }
        postino_core::metrics::session_closed(self.kind);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

    #[test]
    fn per_ip_limit_counts_each_address_and_protocol_apart() {
        let limits = Arc::new(Limits::default());
        let a1 = limits.try_acquire(A, 2, 10, "smtp").expect("first");
        let a2 = limits.try_acquire(A, 2, 10, "smtp").expect("second");
        assert!(
            limits.try_acquire(A, 2, 10, "smtp").is_none(),
            "third from A"
        );
        let b = limits
            .try_acquire(B, 2, 10, "smtp")
            .expect("B has its own count");
        let p = limits
            .try_acquire(A, 2, 10, "pop3")
            .expect("POP3 has its own count");
        assert_eq!(limits.open_from(A, "smtp"), 2);
        assert_eq!(limits.open(), 4);
        drop(a1);
        assert_eq!(limits.open_from(A, "smtp"), 1);
        let a3 = limits
            .try_acquire(A, 2, 10, "smtp")
            .expect("a slot came back");
        drop((a2, a3, b, p));
        assert_eq!(limits.open(), 0);
        assert!(
            limits.per_ip.lock().unwrap().is_empty(),
            "no empty entries kept"
        );
    }

    #[test]
    fn total_limit_is_per_protocol() {
        let limits = Arc::new(Limits::default());
        let a = limits.try_acquire(A, 5, 2, "smtp").expect("first");
        let _b = limits.try_acquire(B, 5, 2, "smtp").expect("second");
        assert!(
            limits.try_acquire(A, 5, 2, "smtp").is_none(),
            "total reached"
        );
        assert_eq!(
            limits.open_from(B, "pop3"),
            0,
            "a refusal leaves no entry behind"
        );
        let _p = limits
            .try_acquire(A, 5, 2, "pop3")
            .expect("POP3 counts apart");
        drop(a);
        assert!(limits.try_acquire(A, 5, 2, "smtp").is_some());
    }

    #[tokio::test]
    async fn idle_waits_for_the_last_guard() {
        let limits = Arc::new(Limits::default());
        limits.idle().await; // nothing open: at once
        let guard = limits.try_acquire(A, 1, 1, "smtp").expect("slot");
        let waiting = {
            let limits = limits.clone();
            tokio::spawn(async move { limits.idle().await })
        };
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "a connection is still open");
        drop(guard);
        waiting.await.expect("idle resolved");
        assert_eq!(limits.open(), 0);
        // Still counting afterwards.
        let _again = limits
            .try_acquire(A, 1, 1, "smtp")
            .expect("slot after idle");
        assert_eq!(limits.open(), 1);
    }
}
