//! Traffic shaping per destination, as Postfix's queue manager does it
//! (`qmgr`'s concurrency feedback) with KumoMTA's message rates: how many
//! deliveries to one destination may run at once, and how often one may
//! start.
//!
//! A destination is the domain of the recipients (or the smarthost, when
//! one is set: `smarthost host:port`). Its [`Destination`] holds a
//! *window*, the concurrency in use now:
//!
//! - it starts at `initial_concurrency` (Postfix: 5), at most
//!   `concurrency_per_domain`;
//! - each delivery that reaches a working server ([`Feedback::Success`]:
//!   a recipient accepted or refused for good) counts towards growth: after
//!   a window's worth of them in a row the window grows by one (Postfix's
//!   positive feedback `1/concurrency`), up to the maximum;
//! - a connection failure, a lost connection or a `421` ([`Feedback::Failure`])
//!   shrinks it by one (Postfix's negative feedback `1`), never below one;
//!   a delivery whose recipients were all refused with another `4xx`
//!   ([`Feedback::Refused`]) is a greylisted or full mailbox, not a sick
//!   server: only a storm of them ([`SOFT_STORM`] in a row) counts as
//!   failures;
//! - at window 1, `failed_cohort_limit` failures in a row (Postfix's
//!   `default_destination_concurrency_failed_cohort_limit`, 1) make the
//!   destination *dead* for `dead_destination_wait`: mail for it is
//!   deferred at once with "delivery temporarily suspended" and the last
//!   error, without a connection, as Postfix does. After the wait it is
//!   tried again with window 1, and grows from there.
//!
//! A rate (`[delivery.rate]`, e.g. `100/min`) spaces the starts of
//! deliveries evenly, one per `interval`; mail over it waits its turn in
//! memory (it is neither deferred nor counted as an attempt). A rate
//! limits messages: a message with more recipients than
//! `recipients_per_delivery` for one destination is one start.
//!
//! A destination with nothing running or waiting and nothing to remember
//! (no recent death, no rate wait) is forgotten by the delivery actor; its
//! next mail starts at the initial window again, as Postfix deletes an
//! empty queue. Every change wakes all of a destination's waiters (a
//! [`Notify`] broadcast), which costs little at `MAX_IN_FLIGHT` waiters.
//!
//! Waiting deliveries hold their place in the delivery actor's rounds
//! (`MAX_IN_FLIGHT` messages), so a very slow rate with thousands of
//! messages waiting delays other destinations too: keep rates for the few
//! destinations that need them.
//!
//! Everything here is plain state under a mutex and a [`Notify`]; the
//! time is tokio's, so the tests run it with paused time.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use postino_core::logsafe::escape;
use postino_core::rate::Rate;
use postino_core::store::DeliveryDiagnostic;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::attempt::{Outcome, RcptResult};

/// Deliveries in a row whose recipients were all refused with a `4xx`
/// (not `421`) before they count as failures: one greylisting server must
/// not slow a destination down, a server refusing everything must.
pub const SOFT_STORM: u32 = 5;

/// A destination's settings, from `[delivery]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// `concurrency_per_domain`.
    pub max: usize,
    /// `initial_concurrency` (at most `max`).
    pub initial: usize,
    /// `failed_cohort_limit`.
    pub failed_cohort_limit: u32,
    /// `dead_destination_wait`.
    pub dead_wait: Duration,
    /// The destination's entry in `[delivery.rate]`.
    pub rate: Option<Rate>,
}

impl Settings {
    /// The settings for `destination` (a domain, or `smarthost host:port`).
    pub fn of(config: &postino_core::Config, destination: &str) -> Settings {
        let d = &config.delivery;
        let key = destination
            .strip_prefix("smarthost ")
            .unwrap_or(destination);
        let rate = d
            .rate
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, r)| *r);
        let max = d.concurrency_per_domain.max(1);
        Settings {
            max,
            initial: d.initial_concurrency.clamp(1, max),
            failed_cohort_limit: d.failed_cohort_limit.max(1),
            dead_wait: d.dead_destination_wait,
            rate,
        }
    }
}

/// What one delivery to a destination says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Feedback {
    /// A server took part: some recipient was accepted or refused for good.
    Success,
    /// No usable server: connection refused or timed out, lost connection,
    /// `421`. Carries the diagnostic for the "suspended" deferrals.
    Failure(DeliveryDiagnostic),
    /// Every recipient refused with a `4xx` other than `421`.
    Refused(DeliveryDiagnostic),
    /// Says nothing about the servers (no lookup answer, no outcome).
    Neutral,
}

impl Feedback {
    /// Classifies a delivery's outcomes (one destination's recipients).
    pub fn of(outcomes: &[Outcome]) -> Feedback {
        let mut deferred = None;
        for o in outcomes {
            match &o.result {
                RcptResult::Delivered(_) => return Feedback::Success,
                RcptResult::Failed(d) if d.remote.is_some() => return Feedback::Success,
                RcptResult::Failed(_) => {}
                RcptResult::Deferred(d) => {
                    deferred.get_or_insert(d);
                }
            }
        }
        let Some(d) = deferred else {
            return Feedback::Neutral;
        };
        match (d.code, &d.remote) {
            (Some(421), _) => Feedback::Failure(d.clone()),
            (Some(_), Some(_)) => Feedback::Refused(d.clone()),
            // A lookup failure carries a code but no server: DNS trouble,
            // not the destination's servers.
            (Some(_), None) => Feedback::Neutral,
            // Our own words: connect failure, timeout, lost connection.
            (None, _) => Feedback::Failure(d.clone()),
        }
    }
}

/// Why a delivery may not start: the destination is dead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suspended {
    /// The failure that made it dead.
    pub last_error: DeliveryDiagnostic,
    /// Until when (for the log).
    pub until: Instant,
}

impl Suspended {
    /// The deferral for each waiting recipient: the last error's status,
    /// in Postfix's words.
    pub fn diagnostic(&self) -> DeliveryDiagnostic {
        let status = self.last_error.status.as_deref().unwrap_or("4.4.1");
        DeliveryDiagnostic::local(
            status,
            format!("delivery temporarily suspended: {}", self.last_error),
        )
    }
}

/// A destination's state now, for `postino queue destinations`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct View {
    /// The destination (domain, or `smarthost host:port`).
    pub name: String,
    /// Deliveries running now.
    pub active: usize,
    /// Deliveries waiting for a slot or for the rate.
    pub waiting: usize,
    /// The concurrency window now.
    pub window: usize,
    /// `concurrency_per_domain`.
    pub max: usize,
    /// The configured rate, as written (`100/min`).
    pub rate: Option<String>,
    /// Seconds until a dead destination is tried again.
    pub dead_for: Option<u64>,
    /// Seconds until the rate lets the next delivery start.
    pub throttled_for: Option<f64>,
}

/// One destination: its window, its users, its rate.
pub struct Destination {
    name: String,
    state: Mutex<State>,
    /// Woken whenever a slot frees, the window grows or the destination
    /// dies: every waiter looks again.
    changed: Notify,
}

struct State {
    settings: Settings,
    window: usize,
    active: usize,
    waiting: usize,
    /// Successes in a row since the window last changed.
    successes: usize,
    /// Failures in a row at window 1 (failed cohorts).
    failed_cohorts: u32,
    /// `4xx` refusals in a row.
    refusals: u32,
    dead: Option<Suspended>,
    /// The earliest start the rate allows.
    next_start: Option<Instant>,
    /// When "throttled" was last logged (at most once per rate period).
    throttle_logged: Option<Instant>,
}

/// A running delivery's slot: given back on drop.
pub struct Permit {
    destination: Arc<Destination>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut s = self.destination.lock();
        s.active = s.active.saturating_sub(1);
        drop(s);
        self.destination.changed.notify_waiters();
    }
}

impl Destination {
    /// A destination with nothing running, at its initial window.
    pub fn new(name: impl Into<String>, settings: Settings) -> Arc<Destination> {
        Arc::new(Destination {
            name: name.into(),
            state: Mutex::new(State {
                window: settings.initial,
                settings,
                active: 0,
                waiting: 0,
                successes: 0,
                failed_cohorts: 0,
                refusals: 0,
                dead: None,
                next_start: None,
                throttle_logged: None,
            }),
            changed: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing here can panic while holding it; a poisoned lock still
        // holds consistent counts.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// New settings (a reload): the window is clamped to the new maximum.
    pub fn reconfigure(&self, settings: Settings) {
        let mut s = self.lock();
        if s.settings == settings {
            return;
        }
        s.window = s.window.clamp(1, settings.max);
        if s.settings.rate != settings.rate {
            s.next_start = None;
        }
        s.settings = settings;
        drop(s);
        self.changed.notify_waiters();
    }

    /// Whether the entry must be kept although no delivery holds it: it
    /// remembers a death or a rate that an empty entry would forget. A
    /// death is remembered for another wait after it ends, so that the
    /// deferred mail coming back finds the destination at concurrency 1
    /// rather than a fresh entry at the initial concurrency.
    pub fn remembers(&self) -> bool {
        let s = self.lock();
        let now = Instant::now();
        s.dead
            .as_ref()
            .is_some_and(|d| d.until + s.settings.dead_wait > now)
            || s.next_start.is_some_and(|t| t > now)
    }

    /// Waits for a slot: the window has room and the rate allows a start.
    ///
    /// # Errors
    ///
    /// [`Suspended`] at once, or as soon as it happens while waiting, when
    /// the destination is dead.
    pub async fn acquire(self: &Arc<Self>) -> Result<Permit, Suspended> {
        let mut counted = false;
        let result = loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            // Registered before the state is read: a change after the read
            // wakes this waiter.
            notified.as_mut().enable();
            let wait_until = {
                let mut s = self.lock();
                let now = Instant::now();
                if let Some(dead) = &s.dead {
                    if dead.until > now {
                        break Err(dead.clone());
                    }
                    info!(destination = %escape(&self.name), "dead destination tried again at concurrency 1");
                    s.dead = None;
                    s.window = 1;
                    s.successes = 0;
                }
                if s.active < s.window {
                    match (s.settings.rate, s.next_start) {
                        (Some(rate), Some(t)) if t > now => {
                            if s.throttle_logged.is_none_or(|at| now >= at + rate.per) {
                                s.throttle_logged = Some(now);
                                info!(destination = %escape(&self.name), %rate, waiting = s.waiting + 1, "destination throttled by its rate; mail waits");
                            }
                            Some(t)
                        }
                        (rate, next) => {
                            if let Some(rate) = rate {
                                // Evenly spaced; an idle spell earns no burst.
                                let from = next.map_or(now, |t| t.max(now));
                                s.next_start = Some(from + rate.interval());
                            }
                            s.active += 1;
                            break Ok(Permit {
                                destination: self.clone(),
                            });
                        }
                    }
                } else {
                    None
                }
            };
            if !counted {
                counted = true;
                self.lock().waiting += 1;
            }
            match wait_until {
                Some(t) => {
                    tokio::select! {
                        _ = notified => {}
                        _ = tokio::time::sleep_until(t) => {}
                    }
                }
                None => notified.await,
            }
        };
        if counted {
            let mut s = self.lock();
            s.waiting = s.waiting.saturating_sub(1);
        }
        result
    }

    /// Adjusts the window after a delivery (call before dropping its
    /// [`Permit`]).
    pub fn feedback(&self, feedback: Feedback) {
        let mut s = self.lock();
        let failure = match feedback {
            Feedback::Neutral => return,
            Feedback::Success => {
                s.failed_cohorts = 0;
                s.refusals = 0;
                s.successes += 1;
                if s.successes >= s.window && s.window < s.settings.max {
                    s.window += 1;
                    s.successes = 0;
                    debug!(destination = %escape(&self.name), concurrency = s.window, max = s.settings.max, "concurrency raised");
                    drop(s);
                    self.changed.notify_waiters();
                }
                return;
            }
            Feedback::Refused(d) => {
                s.refusals += 1;
                if s.refusals < SOFT_STORM {
                    return;
                }
                d
            }
            Feedback::Failure(d) => d,
        };
        s.successes = 0;
        if s.window > 1 {
            s.window -= 1;
            info!(destination = %escape(&self.name), concurrency = s.window, max = s.settings.max, error = %escape(&failure.to_string()), "concurrency lowered");
            return;
        }
        if s.dead.is_some() {
            return;
        }
        s.failed_cohorts += 1;
        if s.failed_cohorts >= s.settings.failed_cohort_limit {
            let wait = s.settings.dead_wait;
            s.failed_cohorts = 0;
            s.refusals = 0;
            warn!(destination = %escape(&self.name), retry_in = %humantime::format_duration(wait), waiting = s.waiting, error = %escape(&failure.to_string()), "dead destination: deliveries suspended");
            postino_core::metrics::destination_event("dead");
            s.dead = Some(Suspended {
                last_error: failure,
                until: Instant::now() + wait,
            });
            drop(s);
            // The waiters learn it at once and defer.
            self.changed.notify_waiters();
        }
    }

    /// Forgets a death (an administrator's `queue flush`, as Postfix's
    /// `postqueue -f` revives dead destinations): back at the initial
    /// window.
    pub fn revive(&self) {
        let mut s = self.lock();
        if s.dead.take().is_some() {
            s.window = s.settings.initial;
            s.successes = 0;
            s.failed_cohorts = 0;
            s.refusals = 0;
            info!(destination = %escape(&self.name), "dead destination revived by a queue flush");
        }
    }

    /// The state for the listing.
    pub fn view(&self) -> View {
        let s = self.lock();
        let now = Instant::now();
        View {
            name: self.name.clone(),
            active: s.active,
            waiting: s.waiting,
            window: s.window,
            max: s.settings.max,
            rate: s.settings.rate.map(|r| r.to_string()),
            dead_for: s
                .dead
                .as_ref()
                .filter(|d| d.until > now)
                .map(|d| (d.until - now).as_secs_f64().ceil() as u64),
            throttled_for: s
                .next_start
                .filter(|t| *t > now)
                .map(|t| (t - now).as_secs_f64()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postino_core::smtp::{RemoteHost, Reply};

    fn settings(initial: usize, max: usize) -> Settings {
        Settings {
            max,
            initial,
            failed_cohort_limit: 1,
            dead_wait: Duration::from_secs(300),
            rate: None,
        }
    }

    fn refused(code: u16) -> DeliveryDiagnostic {
        let mx = RemoteHost {
            host: "mx.test".into(),
            addr: "127.0.0.2:25".parse().unwrap(),
        };
        DeliveryDiagnostic::reply(Some(mx), &Reply::new(code, "4.7.0", "try later"))
    }

    fn lost() -> Feedback {
        Feedback::Failure(DeliveryDiagnostic::local(
            "4.4.1",
            "connect to mx.test[127.0.0.2]:25: Connection refused",
        ))
    }

    /// Takes every slot that is free now (without waiting).
    async fn take_free(d: &Arc<Destination>) -> Vec<Permit> {
        let mut held = Vec::new();
        loop {
            match tokio::time::timeout(Duration::ZERO, d.acquire()).await {
                Ok(Ok(p)) => held.push(p),
                _ => return held,
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_grows_with_successes_up_to_the_maximum() {
        let d = Destination::new("grow.test", settings(2, 4));
        assert_eq!(take_free(&d).await.len(), 2, "starts at the initial window");
        let mut windows = Vec::new();
        for _ in 0..20 {
            let p = d.acquire().await.unwrap();
            d.feedback(Feedback::Success);
            drop(p);
            windows.push(d.view().window);
        }
        // +1 after a window's worth of successes: 2 → 3 after 2, → 4 after 3 more.
        assert_eq!(windows[..6], [2, 3, 3, 3, 4, 4]);
        assert_eq!(*windows.last().unwrap(), 4, "never past the maximum");
        assert_eq!(take_free(&d).await.len(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_shrink_the_window_then_kill_the_destination() {
        let d = Destination::new("sick.test", settings(3, 5));
        d.feedback(lost());
        assert_eq!(d.view().window, 2);
        d.feedback(Feedback::Failure(refused(421)));
        assert_eq!(d.view().window, 1, "a 421 counts as a failure");
        // A waiter behind the one running delivery.
        let running = d.acquire().await.unwrap();
        let waiter = {
            let d = d.clone();
            tokio::spawn(async move { d.acquire().await.map(drop) })
        };
        tokio::task::yield_now().await;
        assert_eq!(d.view().waiting, 1);
        d.feedback(lost());
        drop(running);
        let suspended = waiter.await.unwrap().unwrap_err();
        assert!(suspended
            .diagnostic()
            .to_string()
            .starts_with("4.4.1 delivery temporarily suspended: 4.4.1 connect to"));
        assert_eq!(d.view().dead_for, Some(300));
        assert!(d.remembers(), "a dead destination is not forgotten");
        // Still dead just before the wait is over, tried again after it.
        tokio::time::advance(Duration::from_secs(299)).await;
        assert!(d.acquire().await.is_err());
        tokio::time::advance(Duration::from_secs(2)).await;
        let p = d.acquire().await.expect("tried again");
        assert_eq!(d.view().window, 1, "and it starts at 1");
        d.feedback(Feedback::Success);
        drop(p);
        assert_eq!(d.view().window, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_few_4xx_refusals_are_not_a_failure_but_a_storm_is() {
        let d = Destination::new("grey.test", settings(3, 5));
        for _ in 0..SOFT_STORM - 1 {
            d.feedback(Feedback::Refused(refused(450)));
        }
        assert_eq!(d.view().window, 3, "greylisting is not a sick server");
        d.feedback(Feedback::Refused(refused(450)));
        assert_eq!(d.view().window, 2);
        d.feedback(Feedback::Refused(refused(450)));
        assert_eq!(d.view().window, 1, "each further one in the storm counts");
        d.feedback(Feedback::Success);
        assert_eq!(d.view().window, 2, "a window's worth of successes");
        d.feedback(Feedback::Refused(refused(450)));
        assert_eq!(d.view().window, 2, "a success ends the storm");
        assert!(d.view().dead_for.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn several_failed_cohorts_may_be_allowed() {
        let mut s = settings(1, 5);
        s.failed_cohort_limit = 3;
        let d = Destination::new("flaky.test", s);
        d.feedback(lost());
        d.feedback(lost());
        assert!(d.acquire().await.is_ok(), "alive after 2");
        d.feedback(lost());
        assert!(d.acquire().await.is_err(), "dead after 3");
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_spaces_the_starts_evenly() {
        let mut s = settings(5, 5);
        s.rate = Some("4/s".parse().unwrap());
        let d = Destination::new("rated.test", s);
        let start = Instant::now();
        let mut at = Vec::new();
        for _ in 0..6 {
            let p = d.acquire().await.unwrap();
            at.push((Instant::now() - start).as_millis());
            drop(p);
        }
        assert_eq!(at, [0, 250, 500, 750, 1000, 1250]);
        assert!(d.view().throttled_for.is_some());
        // An idle spell earns no burst.
        tokio::time::advance(Duration::from_secs(10)).await;
        let t = Instant::now();
        drop(d.acquire().await.unwrap());
        drop(d.acquire().await.unwrap());
        assert_eq!((Instant::now() - t).as_millis(), 250);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_clamps_the_window_and_changes_the_rate() {
        let d = Destination::new("reload.test", settings(4, 4));
        let mut s = settings(4, 2);
        s.rate = Some("1/s".parse().unwrap());
        d.reconfigure(s);
        assert_eq!(d.view().window, 2);
        assert_eq!(d.view().rate.as_deref(), Some("1/s"));
        let held = take_free(&d).await;
        assert_eq!(held.len(), 1, "the rate allows one start now");
    }

    #[test]
    fn outcomes_classify_as_the_feedback_says() {
        let mx = RemoteHost {
            host: "mx.test".into(),
            addr: "127.0.0.2:25".parse().unwrap(),
        };
        let o = |result| Outcome {
            recipient: "a@b.test".into(),
            relay: Some(mx.clone()),
            tls: None,
            result,
            dsn_passed_on: false,
        };
        let remote = |code, status| {
            DeliveryDiagnostic::reply(Some(mx.clone()), &Reply::new(code, status, "text"))
        };
        let local = DeliveryDiagnostic::local("4.4.1", "connect to mx: refused");
        let lookup = DeliveryDiagnostic {
            remote: None,
            code: Some(451),
            status: Some("4.4.3".into()),
            text: "b.test: temporary DNS failure".into(),
        };
        use RcptResult::*;
        let cases: Vec<(Vec<RcptResult>, &str)> = vec![
            (
                vec![
                    Deferred(remote(450, "4.2.0")),
                    Delivered(remote(250, "2.0.0")),
                ],
                "success",
            ),
            (vec![Failed(remote(550, "5.1.1"))], "success"),
            (vec![Deferred(remote(421, "4.7.0"))], "failure"),
            (vec![Deferred(local.clone())], "failure"),
            (
                vec![
                    Deferred(remote(451, "4.3.0")),
                    Deferred(remote(452, "4.2.2")),
                ],
                "refused",
            ),
            (vec![Deferred(lookup)], "neutral"),
            (
                vec![Failed(DeliveryDiagnostic::local("5.1.10", "null MX"))],
                "neutral",
            ),
            (vec![], "neutral"),
        ];
        for (results, want) in cases {
            let outcomes: Vec<Outcome> = results.into_iter().map(o).collect();
            let got = match Feedback::of(&outcomes) {
                Feedback::Success => "success",
                Feedback::Failure(_) => "failure",
                Feedback::Refused(_) => "refused",
                Feedback::Neutral => "neutral",
            };
            assert_eq!(got, want, "{outcomes:?}");
        }
    }
}
