//! Process-wide metrics for the admin listener's Prometheus `/metrics`:
//! one call per event (`metrics::message_accepted()`), so that
//! instrumenting a file is a one-line insertion.
//!
//! The counters are `prometheus-client` metrics in one registry for the
//! process (a second server in the same process adds to the same counters).
//! Names are `postino_*` with their unit in the name (`_total`, `_seconds`,
//! `_bytes`); every label takes a bounded set of values chosen here, never a
//! client-supplied string, so a hostile client cannot grow the registry.
//! Recording is a few atomic adds and no IO.

use std::sync::LazyLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

/// The `Content-Type` of [`render`]'s text (OpenMetrics 1.0, which
/// Prometheus scrapes natively).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A label set with one label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Protocol {
    protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Status {
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Operation {
    operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Login {
    protocol: &'static str,
    result: &'static str,
}

struct Metrics {
    registry: Registry,
    sessions: Family<Protocol, Gauge>,
    sessions_opened: Family<Protocol, Counter>,
    accepted: Counter,
    accepted_bytes: Counter,
    rejected: Family<Reason, Counter>,
    deliveries: Family<Status, Counter>,
    queue_messages: Gauge,
    queue_oldest: Gauge,
    commit_batch: Histogram,
    commit_seconds: Histogram,
    store_errors: Family<Operation, Counter>,
    logins: Family<Login, Counter>,
    rate_limited: Family<Reason, Counter>,
    destination_events: Family<Reason, Counter>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("postino");
        let m = Metrics {
            sessions: Family::default(),
            sessions_opened: Family::default(),
            accepted: Counter::default(),
            accepted_bytes: Counter::default(),
            rejected: Family::default(),
            deliveries: Family::default(),
            queue_messages: Gauge::default(),
            queue_oldest: Gauge::default(),
            // 1, 2, 4 … 512 messages per flush.
            commit_batch: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
            // 100 µs … ~3.3 s per flush.
            commit_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            store_errors: Family::default(),
            logins: Family::default(),
            rate_limited: Family::default(),
            destination_events: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "sessions",
            "Open SMTP and POP3 connections",
            m.sessions.clone(),
        );
        registry.register(
            "sessions_opened",
            "SMTP and POP3 connections accepted since start",
            m.sessions_opened.clone(),
        );
        registry.register(
            "messages_accepted",
            "Messages answered 250 at the end of DATA (on disk)",
            m.accepted.clone(),
        );
        registry.register_with_unit(
            "messages_accepted",
            "Size of the messages answered 250 at the end of DATA",
            Unit::Bytes,
            m.accepted_bytes.clone(),
        );
        registry.register(
            "messages_rejected",
            "SMTP commands refused (HELO, MAIL, RCPT, DATA, end of DATA), by reason",
            m.rejected.clone(),
        );
        registry.register(
            "deliveries",
            "Remote recipients tried: sent, deferred or bounced",
            m.deliveries.clone(),
        );
        registry.register(
            "queue_messages",
            "Messages in the delivery queue (sampled, see README)",
            m.queue_messages.clone(),
        );
        registry.register_with_unit(
            "queue_oldest_age",
            "Age of the oldest message in the delivery queue, 0 when empty (sampled)",
            Unit::Seconds,
            m.queue_oldest.clone(),
        );
        registry.register(
            "commit_batch_messages",
            "Waiters released by one group commit (flush)",
            m.commit_batch.clone(),
        );
        registry.register_with_unit(
            "commit_duration",
            "Time one group commit (flush and sync) took",
            Unit::Seconds,
            m.commit_seconds.clone(),
        );
        registry.register(
            "store_errors",
            "Store operations that failed, by operation",
            m.store_errors.clone(),
        );
        registry.register(
            "logins",
            "POP3 and SMTP AUTH password checks, by protocol and result",
            m.logins.clone(),
        );
        registry.register(
            "submission_rate_limited",
            "MAIL and RCPT commands refused with 452 4.7.0 by a [limits] rate, by limit",
            m.rate_limited.clone(),
        );
        registry.register(
            "destination_events",
            "Traffic shaping per destination: destinations declared dead",
            m.destination_events.clone(),
        );
        Metrics { registry, ..m }
    }
}

/// A connection of `protocol` (`"smtp"`, `"pop3"`) opened; call
/// [`session_closed`] with the same name when it ends.
pub fn session_opened(protocol: &'static str) {
    let label = Protocol { protocol };
    METRICS.sessions.get_or_create(&label).inc();
    METRICS.sessions_opened.get_or_create(&label).inc();
}

/// A connection counted by [`session_opened`] ended.
pub fn session_closed(protocol: &'static str) {
    METRICS.sessions.get_or_create(&Protocol { protocol }).dec();
}

/// A message of `bytes` octets was answered 250 at the end of DATA.
pub fn message_accepted(bytes: usize) {
    METRICS.accepted.inc();
    METRICS.accepted_bytes.inc_by(bytes as u64);
}

/// An SMTP command was refused with `code` and enhanced `status`; the
/// label is [`reject_reason`] of them.
pub fn message_rejected(code: u16, status: Option<&str>) {
    let reason = reject_reason(code, status);
    METRICS.rejected.get_or_create(&Reason { reason }).inc();
}

/// The `reason` label of a refusal: a fixed name per kind of reply.
pub fn reject_reason(code: u16, status: Option<&str>) -> &'static str {
    match status.unwrap_or("") {
        "5.1.1" => "unknown_user",
        "5.7.1" => "relay_denied",
        "5.3.4" => "too_big",
        "5.4.0" => "too_many_hops",
        "4.5.3" => "too_many_recipients",
        "4.3.0" => "store_error",
        "4.3.1" => "disk_full",
        "5.1.3" | "5.1.7" => "bad_address",
        s if s.starts_with("5.7.") || s.starts_with("4.7.") => "auth",
        s if s.starts_with("5.5.") || s.starts_with("5.6.") => "protocol",
        _ if code >= 500 => "other_permanent",
        _ => "other_temporary",
    }
}

/// A remote recipient was delivered (`"sent"`), deferred (`"deferred"`)
/// or failed for good (`"bounced"`); other words count as `"other"`.
pub fn delivery(status: &str) {
    let status = match status {
        "sent" => "sent",
        "deferred" => "deferred",
        "bounced" => "bounced",
        _ => "other",
    };
    METRICS.deliveries.get_or_create(&Status { status }).inc();
}

/// A `[limits]` rate refused a command; `limit` is the key's name
/// (`"messages_per_user"`, …; others count as `"other"`).
pub fn rate_limited(limit: &str) {
    let reason = match limit {
        "messages_per_user" => "messages_per_user",
        "recipients_per_user" => "recipients_per_user",
        "messages_per_client" => "messages_per_client",
        "recipients_per_client" => "recipients_per_client",
        _ => "other",
    };
    METRICS.rate_limited.get_or_create(&Reason { reason }).inc();
}

/// Something happened to a delivery destination (`"dead"`; others count
/// as `"other"`).
pub fn destination_event(event: &str) {
    let reason = match event {
        "dead" => "dead",
        _ => "other",
    };
    METRICS
        .destination_events
        .get_or_create(&Reason { reason })
        .inc();
}

/// The delivery queue's size and the age in seconds of its oldest message,
/// as last sampled.
pub fn set_queue(messages: usize, oldest_age_seconds: u64) {
    METRICS
        .queue_messages
        .set(i64::try_from(messages).unwrap_or(i64::MAX));
    METRICS
        .queue_oldest
        .set(i64::try_from(oldest_age_seconds).unwrap_or(i64::MAX));
}

/// One group commit released `waiters` and took `seconds`.
pub fn commit(waiters: usize, seconds: f64) {
    METRICS.commit_batch.observe(waiters as f64);
    METRICS.commit_seconds.observe(seconds);
}

/// A store `operation` (a fixed name such as `"flush"`) failed.
pub fn store_error(operation: &'static str) {
    METRICS
        .store_errors
        .get_or_create(&Operation { operation })
        .inc();
}

/// A password check for `protocol` (`"pop3"`, `"smtp"`) ended.
pub fn login(protocol: &'static str, ok: bool) {
    let result = if ok { "success" } else { "failure" };
    METRICS
        .logins
        .get_or_create(&Login { protocol, result })
        .inc();
}

/// Every metric in the OpenMetrics text format ([`CONTENT_TYPE`]).
pub fn render() -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &METRICS.registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_prefix_units_and_help() {
        message_accepted(100);
        message_rejected(550, Some("5.1.1"));
        delivery("sent");
        commit(3, 0.002);
        login("pop3", false);
        session_opened("smtp");
        session_closed("smtp");
        let text = render();
        for line in [
            "# HELP postino_messages_accepted Messages",
            "# TYPE postino_messages_accepted counter",
            "postino_messages_accepted_bytes_total ",
            "postino_messages_rejected_total{reason=\"unknown_user\"} ",
            "postino_deliveries_total{status=\"sent\"} ",
            "postino_commit_duration_seconds_bucket{le=",
            "postino_commit_batch_messages_count ",
            "postino_logins_total{protocol=\"pop3\",result=\"failure\"} ",
            "postino_sessions{protocol=\"smtp\"} 0",
            "postino_queue_oldest_age_seconds ",
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn reasons_are_a_fixed_set() {
        assert_eq!(reject_reason(550, Some("5.1.1")), "unknown_user");
        assert_eq!(reject_reason(554, Some("5.7.1")), "relay_denied");
        assert_eq!(reject_reason(451, Some("4.3.0")), "store_error");
        assert_eq!(reject_reason(503, Some("5.5.1")), "protocol");
        assert_eq!(reject_reason(550, None), "other_permanent");
        assert_eq!(reject_reason(450, Some("4.9.9")), "other_temporary");
    }
}
