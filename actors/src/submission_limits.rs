//! Submission rate limits (`[limits]`, Postfix's anvil rates): messages and
//! recipients per time window for each SASL user and each client address.
//! One [`SubmissionLimits`] serves every listener and worker arbiter, so a
//! user who spreads connections over the workers still gets the limit once,
//! not once per worker. A leaf: it imports no other module of the crate.
//!
//! Windows are fixed, as anvil's `anvil_rate_time_unit`: the first counted
//! event of a key opens a window of the rate's period; past the count,
//! events are refused until the window ends, and the first refusal of a
//! window is logged (later ones only counted).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use postino_core::config::LimitsConfig;
use postino_core::logsafe::escape;
use postino_core::rate::Rate;
use postino_core::smtp::Reply;
use tokio::time::Instant;
use tracing::warn;

/// Keys kept before expired windows are swept (a sweep walks them all).
const SWEEP_AT: usize = 10_000;

/// What is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Event {
    /// A `MAIL` command the session accepted.
    Message,
    /// A `RCPT` command.
    Recipient,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Who {
    User(String),
    Client(IpAddr),
}

struct Window {
    start: Instant,
    count: u32,
    /// The refusal of this window is logged.
    logged: bool,
}

/// The counts, shared by all SMTP connections of a server.
#[derive(Default)]
pub(crate) struct SubmissionLimits {
    windows: Mutex<HashMap<(Who, Event), Window>>,
}

impl SubmissionLimits {
    /// Counts one `event` by `user` (when authenticated) from `client`,
    /// under the limits of `config`; refuses it with `452 4.7.0` when one
    /// of them is reached, and then counts nothing.
    pub(crate) fn admit(
        &self,
        config: &LimitsConfig,
        event: Event,
        user: Option<&str>,
        client: IpAddr,
    ) -> Result<(), Reply> {
        let (per_user, per_client, user_key, client_key) = match event {
            Event::Message => (
                config.messages_per_user,
                config.messages_per_client,
                "messages_per_user",
                "messages_per_client",
            ),
            Event::Recipient => (
                config.recipients_per_user,
                config.recipients_per_client,
                "recipients_per_user",
                "recipients_per_client",
            ),
        };
        let mut checks: Vec<(Who, Rate, &'static str)> = Vec::with_capacity(2);
        if let (Some(rate), Some(user)) = (per_user, user) {
            checks.push((Who::User(user.to_ascii_lowercase()), rate, user_key));
        }
        if let Some(rate) = per_client {
            checks.push((Who::Client(client), rate, client_key));
        }
        if checks.is_empty() {
            return Ok(());
        }
        let now = Instant::now();
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        if windows.len() >= SWEEP_AT {
            // Windows of a minute or an hour: the map holds the keys seen
            // in the last one, however many connections came and went.
            windows.retain(|_, w| now.duration_since(w.start) < MAX_PERIOD);
        }
        // Checked all before counting any: a refused event counts nowhere.
        for (who, rate, key) in &checks {
            let w = windows.entry((who.clone(), event)).or_insert(Window {
                start: now,
                count: 0,
                logged: false,
            });
            if now.duration_since(w.start) >= rate.per {
                *w = Window {
                    start: now,
                    count: 0,
                    logged: false,
                };
            }
            if w.count >= rate.count {
                let until = rate.per.saturating_sub(now.duration_since(w.start));
                if !w.logged {
                    w.logged = true;
                    let who = match who {
                        Who::User(u) => format!("user {}", escape(u)),
                        Who::Client(ip) => format!("client {ip}"),
                    };
                    warn!(limit = key, %rate, who = %who, reset_in = %humantime::format_duration(round_up(until)), "submission rate limit reached; refusing until the window ends");
                }
                postino_core::metrics::rate_limited(key);
                let what = match event {
                    Event::Message => "messages",
                    Event::Recipient => "recipients",
                };
                let from = match who {
                    Who::User(_) => "this user",
                    Who::Client(_) => "this client",
                };
                return Err(Reply::new(
                    452,
                    "4.7.0",
                    format!("Error: too many {what} from {from} ({rate}); try again later"),
                ));
            }
        }
        for (who, _, _) in checks {
            if let Some(w) = windows.get_mut(&(who, event)) {
                w.count += 1;
            }
        }
        Ok(())
    }
}

/// The longest period a [`Rate`] has.
const MAX_PERIOD: std::time::Duration = std::time::Duration::from_secs(3600);

/// Whole seconds, for the log.
fn round_up(d: std::time::Duration) -> std::time::Duration {
    std::time::Duration::from_secs(d.as_secs() + u64::from(d.subsec_nanos() > 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

    fn rate(text: &str) -> Option<Rate> {
        Some(text.parse().unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn a_user_gets_n_messages_per_window_wherever_they_connect_from() {
        let l = SubmissionLimits::default();
        let c = LimitsConfig {
            messages_per_user: rate("3/min"),
            ..Default::default()
        };
        for ip in [A, B, A] {
            assert!(l.admit(&c, Event::Message, Some("u@x.test"), ip).is_ok());
        }
        let refused = l
            .admit(&c, Event::Message, Some("U@X.test"), B)
            .unwrap_err();
        assert_eq!(
            (refused.code, refused.status.as_deref()),
            (452, Some("4.7.0"))
        );
        assert!(refused.text.contains("3/min"), "{}", refused.text);
        assert!(
            l.admit(&c, Event::Message, Some("v@x.test"), A).is_ok(),
            "another user"
        );
        assert!(
            l.admit(&c, Event::Recipient, Some("u@x.test"), A).is_ok(),
            "recipients are not limited"
        );
        assert!(
            l.admit(&c, Event::Message, None, A).is_ok(),
            "no user: no user limit"
        );
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(l.admit(&c, Event::Message, Some("u@x.test"), A).is_err());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(
            l.admit(&c, Event::Message, Some("u@x.test"), A).is_ok(),
            "a new window"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_event_counts_nowhere() {
        let l = SubmissionLimits::default();
        let c = LimitsConfig {
            recipients_per_user: rate("2/h"),
            recipients_per_client: rate("3/h"),
            ..Default::default()
        };
        assert!(l.admit(&c, Event::Recipient, Some("u"), A).is_ok());
        assert!(l.admit(&c, Event::Recipient, Some("u"), A).is_ok());
        assert!(
            l.admit(&c, Event::Recipient, Some("u"), A).is_err(),
            "user at 2"
        );
        // The client's count is 2, not 3: the refusal did not count.
        assert!(l.admit(&c, Event::Recipient, Some("v"), A).is_ok());
        let e = l.admit(&c, Event::Recipient, Some("w"), A).unwrap_err();
        assert!(e.text.contains("this client"), "{}", e.text);
        assert!(
            l.admit(&c, Event::Recipient, None, B).is_ok(),
            "another client"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn no_limits_keep_no_state() {
        let l = SubmissionLimits::default();
        let c = LimitsConfig::default();
        for _ in 0..100 {
            assert!(l.admit(&c, Event::Message, Some("u"), A).is_ok());
        }
        assert!(l.windows.lock().unwrap().is_empty());
    }
}
