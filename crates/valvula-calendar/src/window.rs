//! Counting windows, the one vocabulary: what the configuration, mod-ratelimit's rules
//! and overrides, the store's counters, the module SDK and valvula-ctl all mean by
//! `hour`, `day`, `week`, `month` or `"90s"`, and where such a window starts and ends.
//!
//! A sliding window of `W` seconds is counted in [`SLIDING_BUCKETS`] buckets of
//! `ceil(W / 60)` seconds. A charge at `now` is admitted when the sum of every bucket that
//! overlaps `[now - W, now]` plus the amount stays within the limit. That sum can include
//! up to one bucket of charges older than `W`, never fewer than the real ones, so the
//! approximation only errs towards refusing: in any interval of `W` seconds at most the
//! limit is admitted (proof: take the last admission `t` of the interval; every earlier
//! admission of the interval lies in `[t - W, t]` and was summed at `t`). The cost is
//! that charges stay counted up to `W / 60` seconds (1.7 %) longer than `W`.

use std::fmt;

use crate::{Period, Zone, window_seconds};

/// Buckets per sliding window.
pub const SLIDING_BUCKETS: i64 = 60;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WindowKind {
    Hour,
    Day,
    /// ISO week: Monday to Sunday.
    Week,
    Month,
    /// The last N seconds.
    Sliding(i64),
}

impl WindowKind {
    /// Parses `hour`, `day`, `week`, `month`, or a duration (`"90s"`, `"1h"`, `3600`) for
    /// a sliding window: the grammar of every file and command that names a window.
    pub fn parse(s: &str) -> Result<WindowKind, String> {
        match s.trim() {
            "hour" => Ok(WindowKind::Hour),
            "day" => Ok(WindowKind::Day),
            "week" => Ok(WindowKind::Week),
            "month" => Ok(WindowKind::Month),
            other => window_seconds(other).map(WindowKind::Sliding),
        }
    }

    /// The name stored with a counter (`hour`, `sliding:90`), so one key has one counter
    /// per window.
    pub fn id(self) -> String {
        match self.period() {
            Some(_) => self.to_string(),
            None => format!("sliding:{}", self.sliding_seconds().unwrap_or(0)),
        }
    }

    /// The window a stored [`WindowKind::id`] names.
    pub fn from_id(id: &str) -> Option<WindowKind> {
        match id.strip_prefix("sliding:") {
            Some(s) => s.parse().ok().filter(|s| *s > 0).map(WindowKind::Sliding),
            None => WindowKind::parse(id).ok().filter(|k| k.period().is_some()),
        }
    }

    /// The calendar period of a calendar window; `None` for a sliding one.
    pub fn period(self) -> Option<Period> {
        match self {
            WindowKind::Hour => Some(Period::Hour),
            WindowKind::Day => Some(Period::Day),
            WindowKind::Week => Some(Period::Week),
            WindowKind::Month => Some(Period::Month),
            WindowKind::Sliding(_) => None,
        }
    }

    pub fn sliding_seconds(self) -> Option<i64> {
        match self {
            WindowKind::Sliding(s) => Some(s),
            _ => None,
        }
    }

    /// The width of a sliding window's buckets.
    pub fn sliding_bucket(self) -> Option<i64> {
        self.sliding_seconds()
            .map(|w| (w + SLIDING_BUCKETS - 1) / SLIDING_BUCKETS)
    }

    /// `[start, end)` of the window that holds `now`: a calendar period in `zone`, or for
    /// a sliding window of `W` seconds the block of `W` seconds since the epoch that holds
    /// it (where an override of that window lives, or an accounting period).
    pub fn span(self, zone: Zone, now: i64) -> (i64, i64) {
        match (self.period(), self.sliding_seconds()) {
            (Some(p), _) => zone.period(p, now),
            (None, Some(w)) => {
                let start = now.div_euclid(w) * w;
                (start, start + w)
            }
            (None, None) => unreachable!("a window is a calendar period or sliding"),
        }
    }

    /// For a sliding window at `now`: (bucket width, start of the current bucket, start
    /// of the oldest bucket still counted).
    pub fn sliding_span(self, now: i64) -> Option<(i64, i64, i64)> {
        let w = self.sliding_seconds()?;
        let width = self.sliding_bucket()?;
        let current = now.div_euclid(width) * width;
        let oldest = (now - w).div_euclid(width) * width;
        Some((width, current, oldest))
    }

    /// When a sliding window whose oldest non-empty bucket starts at `bucket` stops
    /// counting it.
    pub fn sliding_reset(self, bucket: i64) -> Option<i64> {
        Some(bucket + self.sliding_bucket()? + self.sliding_seconds()?)
    }
}

/// `hour`, `day`, `week`, `month`, or a sliding window's length as `90s`: what
/// [`WindowKind::parse`] reads back.
impl fmt::Display for WindowKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WindowKind::Hour => f.write_str("hour"),
            WindowKind::Day => f.write_str("day"),
            WindowKind::Week => f.write_str("week"),
            WindowKind::Month => f.write_str("month"),
            WindowKind::Sliding(s) => write!(f, "{s}s"),
        }
    }
}

/// A window and its limit. A negative limit counts without limiting (valvula's `-1`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub kind: WindowKind,
    pub limit: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sliding_buckets() {
        let k = WindowKind::Sliding(3600);
        assert_eq!(k.sliding_bucket(), Some(60));
        assert_eq!(k.sliding_span(10_000), Some((60, 9960, 6360)));
        assert_eq!(k.sliding_reset(6360), Some(6360 + 60 + 3600));
        // Short windows still have 1-second buckets.
        assert_eq!(WindowKind::Sliding(10).sliding_bucket(), Some(1));
        assert_eq!(WindowKind::Day.sliding_span(5), None);
    }

    #[test]
    fn one_grammar_read_back_and_stored() {
        for (text, kind) in [
            ("hour", WindowKind::Hour),
            ("day", WindowKind::Day),
            ("week", WindowKind::Week),
            ("month", WindowKind::Month),
            ("90s", WindowKind::Sliding(90)),
            ("3600", WindowKind::Sliding(3600)),
            ("1h30m", WindowKind::Sliding(5400)),
        ] {
            let k = WindowKind::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(k, kind, "{text}");
            assert_eq!(
                WindowKind::parse(&k.to_string()),
                Ok(k),
                "display of {text}"
            );
            assert_eq!(
                WindowKind::from_id(&k.id()),
                Some(k),
                "id of {text}: {}",
                k.id()
            );
        }
        assert_eq!(WindowKind::Sliding(90).id(), "sliding:90");
        assert_eq!(WindowKind::Day.id(), "day");
        for bad in ["0", "-5", "fortnight", ""] {
            assert!(WindowKind::parse(bad).is_err(), "{bad:?} parsed");
        }
        for bad in ["sliding:0", "sliding:x", "90s", "fortnight"] {
            assert_eq!(WindowKind::from_id(bad), None, "{bad:?} read as an id");
        }
    }

    #[test]
    fn spans_follow_the_zone_and_sliding_blocks() {
        let tokyo = Zone::parse("Asia/Tokyo").unwrap();
        // 2026-11-30 00:30 in Tokyo is 2026-11-29 15:30 UTC.
        let now = 1_796_052_600;
        let (start, end) = WindowKind::Day.span(tokyo, now);
        assert_eq!(
            (start, end),
            (now - 1_800, now - 1_800 + 86_400),
            "Tokyo's day"
        );
        let (start, end) = WindowKind::Day.span(Zone::UTC, now);
        assert_eq!(end - start, 86_400);
        assert!(
            start <= now && now < end && start % 86_400 == 0,
            "UTC day {start}"
        );
        assert_eq!(WindowKind::Sliding(600).span(tokyo, 1_234), (1_200, 1_800));
    }
}
