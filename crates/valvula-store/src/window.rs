//! Counting windows: calendar periods in a time zone, and sliding periods in buckets.
//!
//! A sliding window of `W` seconds is kept in [`SLIDING_BUCKETS`] buckets of
//! `ceil(W / 60)` seconds. A charge at `now` is admitted when the sum of every bucket that
//! overlaps `[now - W, now]` plus the amount stays within the limit. That sum can include
//! up to one bucket of charges older than `W`, never fewer than the real ones, so the
//! approximation only errs towards refusing: in any interval of `W` seconds at most the
//! limit is admitted (proof: take the last admission `t` of the interval; every earlier
//! admission of the interval lies in `[t - W, t]` and was summed at `t`). The cost is
//! that charges stay counted up to `W / 60` seconds (1.7 %) longer than `W`.

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
    /// The name stored with a counter, so one key has one counter per window.
    pub fn id(self) -> String {
        match self {
            WindowKind::Hour => "hour".into(),
            WindowKind::Day => "day".into(),
            WindowKind::Week => "week".into(),
            WindowKind::Month => "month".into(),
            WindowKind::Sliding(s) => format!("sliding:{s}"),
        }
    }

    /// Parses `hour`, `day`, `week`, `month`, or a duration (`"90s"`, `"1h"`, `3600`) for
    /// a sliding window.
    pub fn parse(s: &str) -> Result<WindowKind, String> {
        match s {
            "hour" => Ok(WindowKind::Hour),
            "day" => Ok(WindowKind::Day),
            "week" => Ok(WindowKind::Week),
            "month" => Ok(WindowKind::Month),
            other => valvula_calendar::window_seconds(other).map(WindowKind::Sliding),
        }
    }

    pub fn sliding_bucket(self) -> Option<i64> {
        match self {
            WindowKind::Sliding(w) => Some((w + SLIDING_BUCKETS - 1) / SLIDING_BUCKETS),
            _ => None,
        }
    }
}

/// One (window, limit) pair of a consumption. A negative limit counts without limiting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub kind: WindowKind,
    pub limit: i64,
}

/// The state of one window after a consumption (or a peek).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowState {
    /// Used in the current window, this charge included when it was admitted.
    pub used: i64,
    /// `limit - used`, never below 0; -1 when the window has no limit.
    pub remaining: i64,
    /// When the window's count next goes down (calendar: the next period; sliding: when
    /// the oldest counted bucket leaves the window).
    pub resets_at: i64,
    /// Whether this window alone admits the amount.
    pub admitted: bool,
}

impl WindowState {
    pub fn new(limit: i64, used: i64, resets_at: i64, admitted: bool) -> Self {
        WindowState {
            used,
            remaining: if limit < 0 {
                -1
            } else {
                limit.saturating_sub(used).max(0)
            },
            resets_at,
            admitted,
        }
    }
}

/// Result of a consumption: admitted only if every window admitted, and then every
/// window was charged; otherwise nothing changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Consumption {
    pub admitted: bool,
    pub windows: Vec<WindowState>,
    /// A `consume_once` whose token was already charged: nothing was charged again.
    pub repeated: bool,
}

pub use valvula_calendar::{Period, Zone};

/// `[start, end)` of the calendar period containing `now`, in `zone`.
pub fn calendar_period(kind: WindowKind, zone: Zone, now: i64) -> (i64, i64) {
    let p = match kind {
        WindowKind::Hour => Period::Hour,
        WindowKind::Day => Period::Day,
        WindowKind::Week => Period::Week,
        WindowKind::Month => Period::Month,
        WindowKind::Sliding(_) => unreachable!("sliding windows have no calendar period"),
    };
    zone.period(p, now)
}

/// For a sliding window at `now`: (bucket width, start of the current bucket, start of
/// the oldest bucket still counted).
pub fn sliding_span(kind: WindowKind, now: i64) -> (i64, i64, i64) {
    let WindowKind::Sliding(w) = kind else {
        unreachable!("not a sliding window")
    };
    let width = kind.sliding_bucket().expect("sliding");
    let current = now.div_euclid(width) * width;
    let oldest = (now - w).div_euclid(width) * width;
    (width, current, oldest)
}

/// When a sliding window whose oldest non-empty bucket starts at `bucket` stops counting
/// it.
pub fn sliding_reset(kind: WindowKind, bucket: i64) -> i64 {
    let WindowKind::Sliding(w) = kind else {
        unreachable!("not a sliding window")
    };
    bucket + kind.sliding_bucket().expect("sliding") + w
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sliding_buckets() {
        let k = WindowKind::Sliding(3600);
        assert_eq!(k.sliding_bucket(), Some(60));
        let (w, cur, old) = sliding_span(k, 10_000);
        assert_eq!((w, cur, old), (60, 9960, 6360));
        assert_eq!(sliding_reset(k, 6360), 6360 + 60 + 3600);
        // Short windows still have 1-second buckets.
        assert_eq!(WindowKind::Sliding(10).sliding_bucket(), Some(1));
        assert_eq!(WindowKind::parse("90s").unwrap(), WindowKind::Sliding(90));
        assert_eq!(
            WindowKind::parse("3600").unwrap(),
            WindowKind::Sliding(3600)
        );
        assert!(WindowKind::parse("0").is_err());
    }
}
