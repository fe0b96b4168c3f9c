//! The login-delay table: failed logins per client address, POP3 and SMTP
//! AUTH alike, and how long to wait before answering the next failure.
//! Knows nothing of sockets or actors.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long an address stays in the table after its last failure.
const FORGET_AFTER: Duration = Duration::from_secs(300);

/// Failed logins per client address, for Dovecot's growing delay:
/// `pop3.auth_failure_delay` after the first failure, doubling per further
/// recent failure from the same address, up to `pop3.max_auth_failure_delay`
/// (Dovecot's `auth_failure_delay` covers the SMTP AUTH that Postfix hands
/// it too). A successful login forgets them.
pub struct AuthFailures {
    table: Mutex<HashMap<IpAddr, (u32, Instant)>>,
    base: Duration,
    max: Duration,
}

impl AuthFailures {
    /// A table whose first delay is `base`, doubling up to `max`.
    pub fn new(base: Duration, max: Duration) -> AuthFailures {
        AuthFailures {
            table: Mutex::new(HashMap::new()),
            base,
            max,
        }
    }

    /// Records a failed login from `ip`; returns how long to wait before
    /// answering it.
    pub fn failed(&self, ip: IpAddr) -> Duration {
        self.failed_at(ip, Instant::now())
    }

    fn failed_at(&self, ip: IpAddr, now: Instant) -> Duration {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        // Forget addresses quiet for a while, so the table stays small.
        table.retain(|_, (_, last)| now.saturating_duration_since(*last) < FORGET_AFTER);
        let entry = table.entry(ip).or_insert((0, now));
        entry.0 = entry.0.saturating_add(1);
        entry.1 = now;
        let factor = 1u32 << (entry.0 - 1).min(16);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// A successful login from `ip`: its failures are forgotten.
    pub fn succeeded(&self, ip: IpAddr) {
        self.table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn delay_doubles_per_failure_up_to_the_cap() {
        let table = AuthFailures::new(ms(100), ms(700));
        let delays: Vec<Duration> = (0..6).map(|_| table.failed(A)).collect();
        assert_eq!(
            delays,
            [ms(100), ms(200), ms(400), ms(700), ms(700), ms(700)]
        );
    }

    #[test]
    fn many_failures_do_not_overflow() {
        let table = AuthFailures::new(Duration::from_secs(1), Duration::from_secs(15));
        for _ in 0..100 {
            assert!(table.failed(A) <= Duration::from_secs(15));
        }
        assert_eq!(table.failed(A), Duration::from_secs(15));
    }

    #[test]
    fn addresses_count_apart_and_success_forgets() {
        let table = AuthFailures::new(ms(10), ms(1000));
        table.failed(A);
        table.failed(A);
        assert_eq!(table.failed(B), ms(10), "B's first failure");
        assert_eq!(table.failed(A), ms(40), "A's third failure");
        table.succeeded(A);
        assert_eq!(table.failed(A), ms(10), "counting starts again");
        assert_eq!(table.failed(B), ms(20), "B is not forgotten");
    }

    #[test]
    fn quiet_addresses_are_forgotten() {
        let table = AuthFailures::new(ms(10), ms(1000));
        let start = Instant::now();
        table.failed_at(A, start);
        table.failed_at(A, start);
        table.failed_at(B, start + FORGET_AFTER / 2);
        let later = start + FORGET_AFTER + ms(1);
        assert_eq!(table.failed_at(A, later), ms(10), "A was forgotten");
        assert_eq!(table.failed_at(B, later), ms(20), "B failed recently");
        assert_eq!(table.table.lock().unwrap().len(), 2);
    }
}
