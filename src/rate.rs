//! Rates as the configuration writes them (`"100/min"`): a count per time
//! unit, for the outbound message rates per destination (`[delivery.rate]`)
//! and the submission limits (`[limits]`). Parsing only; the actors keep
//! the counts.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// `count` events per `per`: written `N/s`, `N/min` or `N/h` (also
/// `sec`, `second`, `m`, `minute`, `hour`), with `N` at least 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Events allowed in one period.
    pub count: u32,
    /// The period.
    pub per: Duration,
}

impl Rate {
    /// The even spacing of `count` events over `per`: one every
    /// `per / count`.
    pub fn interval(&self) -> Duration {
        self.per / self.count.max(1)
    }
}

impl FromStr for Rate {
    type Err = String;

    fn from_str(text: &str) -> Result<Rate, String> {
        let bad = || format!("{text:?} is not a rate (e.g. \"100/min\", \"10/s\", \"2000/h\")");
        let (n, unit) = text.split_once('/').ok_or_else(bad)?;
        let count: u32 = n.trim().parse().map_err(|_| bad())?;
        if count == 0 {
            return Err(format!("{text:?}: the count must be at least 1"));
        }
        let per = match unit.trim().to_ascii_lowercase().as_str() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            _ => return Err(bad()),
        };
        Ok(Rate { count, per })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per.as_secs() {
            1 => "s",
            60 => "min",
            3600 => "h",
            // Only made in code: say it in seconds.
            n => return write!(f, "{}/{n}s", self.count),
        };
        write!(f, "{}/{unit}", self.count)
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Rate, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_and_print() {
        let s = Duration::from_secs;
        let cases = [
            ("100/min", 100, s(60), "100/min"),
            ("10/s", 10, s(1), "10/s"),
            (" 2000 / h ", 2000, s(3600), "2000/h"),
            ("5/second", 5, s(1), "5/s"),
            ("7/M", 7, s(60), "7/min"),
            ("1/hour", 1, s(3600), "1/h"),
        ];
        for (text, count, per, shown) in cases {
            let r: Rate = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!((r.count, r.per), (count, per), "{text}");
            assert_eq!(r.to_string(), shown);
        }
        assert_eq!(
            "100/min".parse::<Rate>().unwrap().interval(),
            Duration::from_millis(600)
        );
    }

    #[test]
    fn bad_rates_are_refused_with_the_text() {
        for text in ["", "100", "/min", "x/min", "-1/s", "10/day", "10/", "0/s"] {
            let e = text.parse::<Rate>().unwrap_err();
            assert!(e.contains(&format!("{text:?}")), "{text}: {e}");
        }
    }
}
