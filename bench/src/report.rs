//! Measurement records: a latency histogram, per-second buckets for the plot,
//! errors by kind, and the JSON report and human summary made from them.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use super::BenchError;

/// Latencies are recorded in microseconds from 1 µs to this (values above are
/// clamped to it, so a stuck server shows as "≥ 60 s", not as a lost sample).
pub const MAX_LATENCY_US: u64 = 60_000_000;

/// Everything measured during one run. Shared by all sessions behind a
/// [`SharedRecorder`].
#[derive(Debug)]
pub struct Recorder {
    start: Instant,
    latency: Histogram<u64>,
    seconds: Vec<Second>,
    errors: BTreeMap<String, u64>,
    ok: u64,
    failed: u64,
    bytes: u64,
}

/// One second of the run.
#[derive(Debug)]
struct Second {
    ok: u64,
    failed: u64,
    // u32 counts and 2 significant figures keep a long run's per-second
    // histograms small (about 10 KiB each); the overall histogram has 3.
    latency: Histogram<u32>,
}

impl Second {
    fn new() -> Self {
        Self {
            ok: 0,
            failed: 0,
            latency: Histogram::new_with_bounds(1, MAX_LATENCY_US, 2)
                .expect("static histogram bounds are valid"),
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

impl Recorder {
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            latency: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
                .expect("static histogram bounds are valid"),
            seconds: Vec::new(),
            errors: BTreeMap::new(),
            ok: 0,
            failed: 0,
            bytes: 0,
        }
    }

    fn second(&mut self, at: Instant) -> &mut Second {
        let i = at.saturating_duration_since(self.start).as_secs() as usize;
        if self.seconds.len() <= i {
            self.seconds.resize_with(i + 1, Second::new);
        }
        &mut self.seconds[i]
    }

    /// A completed operation (a message accepted, a message retrieved) that
    /// finished at `at` after `latency`, moving `bytes` octets.
    pub fn ok(&mut self, at: Instant, latency: Duration, bytes: u64) {
        let us = micros(latency);
        self.latency.saturating_record(us);
        let s = self.second(at);
        s.ok += 1;
        s.latency.saturating_record(us);
        self.ok += 1;
        self.bytes += bytes;
    }

    /// A failed operation, counted under `kind` (for example `RCPT 550`,
    /// `connect`, `timeout`).
    pub fn failed(&mut self, at: Instant, kind: &str) {
        self.second(at).failed += 1;
        self.failed += 1;
        self.error(kind);
    }

    /// An error that did not fail an operation by itself (one refused
    /// recipient of several): counted, not charged to the throughput.
    pub fn error(&mut self, kind: &str) {
        *self.errors.entry(kind.to_owned()).or_default() += 1;
    }

    pub fn ok_count(&self) -> u64 {
        self.ok
    }

    /// Builds the report for a run that lasted `elapsed`.
    pub fn report(
        &self,
        kind: &str,
        server: &str,
        elapsed: Duration,
        params: serde_json::Value,
    ) -> Report {
        let secs = elapsed.as_secs_f64();
        let per_second = self
            .seconds
            .iter()
            .enumerate()
            .map(|(t, s)| SecondReport {
                t: t as u64,
                ok: s.ok,
                failed: s.failed,
                p50_us: s.latency.value_at_quantile(0.5),
                p99_us: s.latency.value_at_quantile(0.99),
                max_us: s.latency.max(),
            })
            .collect();
        Report {
            kind: kind.to_owned(),
            server: server.to_owned(),
            params,
            elapsed_s: secs,
            ok: self.ok,
            failed: self.failed,
            bytes: self.bytes,
            throughput_per_s: if secs > 0.0 {
                self.ok as f64 / secs
            } else {
                0.0
            },
            latency_us: Percentiles::of(&self.latency),
            errors: self.errors.clone(),
            per_second,
        }
    }
}

/// The recorder shared by all sessions of a run.
///
/// A std `Mutex` is right here: it is held for a few hundred nanoseconds to
/// bump counters, never across an `.await`, and even 20,000 operations a
/// second make it nowhere near contended. Per-session recorders merged at the
/// end would need per-session per-second histograms: far more memory with
/// thousands of sessions.
#[derive(Debug, Clone)]
pub struct SharedRecorder(std::sync::Arc<Mutex<Recorder>>);

impl SharedRecorder {
    pub fn new(start: Instant) -> Self {
        Self(std::sync::Arc::new(Mutex::new(Recorder::new(start))))
    }

    pub fn lock(&self) -> MutexGuard<'_, Recorder> {
        // A panic while holding the lock cannot leave counters half-updated in
        // a way that matters for a report, so a poisoned lock is still used.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Latency percentiles, in microseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub min: u64,
    pub mean: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Self {
        Self {
            count: h.len(),
            min: h.min(),
            mean: h.mean(),
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// One second of the run in the report (`t` seconds after the start).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecondReport {
    pub t: u64,
    pub ok: u64,
    pub failed: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

/// What `--json` writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// `smtp` or `pop3`.
    pub kind: String,
    pub server: String,
    /// The options the run used.
    pub params: serde_json::Value,
    pub elapsed_s: f64,
    /// Operations that succeeded (messages accepted with 250 / retrieved).
    pub ok: u64,
    pub failed: u64,
    /// Octets of message content moved by the successful operations.
    pub bytes: u64,
    /// `ok / elapsed_s`.
    pub throughput_per_s: f64,
    pub latency_us: Percentiles,
    /// Failures and refused recipients by kind, such as `RCPT 550` or `connect`.
    pub errors: BTreeMap<String, u64>,
    pub per_second: Vec<SecondReport>,
}

fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

impl Report {
    /// A few lines for a person.
    pub fn summary(&self, what: &str, latency_what: &str) -> String {
        let l = &self.latency_us;
        let mut s = format!(
            "{} {}: {} {what} ok, {} failed in {:.2} s = {:.0}/s ({:.2} MB/s)\n",
            self.kind,
            self.server,
            self.ok,
            self.failed,
            self.elapsed_s,
            self.throughput_per_s,
            if self.elapsed_s > 0.0 {
                self.bytes as f64 / self.elapsed_s / 1e6
            } else {
                0.0
            },
        );
        if l.count > 0 {
            s += &format!(
                "latency ({latency_what}): p50 {}  p90 {}  p99 {}  p99.9 {}  max {}\n",
                ms(l.p50),
                ms(l.p90),
                ms(l.p99),
                ms(l.p999),
                ms(l.max)
            );
        }
        if !self.errors.is_empty() {
            let errs: Vec<String> = self
                .errors
                .iter()
                .map(|(k, v)| format!("{k} ×{v}"))
                .collect();
            s += &format!("errors: {}\n", errs.join(", "));
        }
        s
    }

    /// Writes the report as pretty JSON.
    ///
    /// # Errors
    /// The file cannot be written.
    pub fn write_json(&self, path: &Path) -> Result<(), BenchError> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text + "\n").map_err(|source| BenchError::Write {
            path: path.to_owned(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_into_seconds_and_percentiles() {
        let start = Instant::now();
        let mut r = Recorder::new(start);
        for i in 1..=100u64 {
            // 100 operations: 1..=100 ms, the first 50 in second 0, the rest in second 2.
            let at = start + Duration::from_millis(if i <= 50 { 10 } else { 2500 });
            r.ok(at, Duration::from_millis(i), 1000);
        }
        r.failed(start + Duration::from_millis(1500), "RCPT 451");
        r.failed(start + Duration::from_millis(1600), "RCPT 451");
        r.error("RCPT 550");
        let rep = r.report(
            "smtp",
            "127.0.0.1:25",
            Duration::from_secs(4),
            serde_json::json!({"sessions": 2}),
        );
        assert_eq!(rep.ok, 100);
        assert_eq!(rep.failed, 2);
        assert_eq!(rep.bytes, 100_000);
        assert!((rep.throughput_per_s - 25.0).abs() < 1e-9);
        assert_eq!(rep.latency_us.count, 100);
        // hdrhistogram with 3 significant figures: within 0.1 %.
        let near = |got: u64, want: u64| (got as f64 - want as f64).abs() <= want as f64 * 1e-3;
        assert!(near(rep.latency_us.p50, 50_000), "{}", rep.latency_us.p50);
        assert!(near(rep.latency_us.p99, 99_000), "{}", rep.latency_us.p99);
        assert!(near(rep.latency_us.max, 100_000), "{}", rep.latency_us.max);
        let per: Vec<(u64, u64, u64)> = rep
            .per_second
            .iter()
            .map(|s| (s.t, s.ok, s.failed))
            .collect();
        assert_eq!(per, [(0, 50, 0), (1, 0, 2), (2, 50, 0)]);
        assert_eq!(rep.errors.get("RCPT 451"), Some(&2));
        assert_eq!(rep.errors.get("RCPT 550"), Some(&1));

        // The JSON round-trips and has the field names scripts read.
        let json = serde_json::to_value(&rep).unwrap();
        for key in [
            "throughput_per_s",
            "latency_us",
            "per_second",
            "errors",
            "elapsed_s",
        ] {
            assert!(json.get(key).is_some(), "{key}");
        }
        assert!(json["latency_us"]["p999"].is_u64());
        let back: Report = serde_json::from_value(json).unwrap();
        assert_eq!(back, rep);

        let text = rep.summary("messages", "final dot to reply");
        assert!(text.contains("100 messages ok, 2 failed"), "{text}");
        assert!(text.contains("RCPT 451 ×2"), "{text}");
    }

    #[test]
    fn clamps_huge_latencies() {
        let start = Instant::now();
        let mut r = Recorder::new(start);
        r.ok(start, Duration::from_secs(3600), 0);
        r.ok(start, Duration::ZERO, 0);
        let rep = r.report("smtp", "x", Duration::from_secs(1), serde_json::Value::Null);
        assert!(rep.latency_us.max >= MAX_LATENCY_US);
        assert_eq!(rep.latency_us.min, 1);
    }

    #[test]
    fn empty_run_reports_zeroes() {
        let r = Recorder::new(Instant::now());
        let rep = r.report("pop3", "x", Duration::ZERO, serde_json::Value::Null);
        assert_eq!(rep.throughput_per_s, 0.0);
        assert_eq!(rep.latency_us.count, 0);
        assert!(rep.per_second.is_empty());
        assert!(!rep.summary("messages", "x").contains("latency"));
    }
}
