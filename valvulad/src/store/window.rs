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

use chrono::{DateTime, Datelike, Duration, NaiveDate, NaiveDateTime, TimeZone, Timelike, Utc};

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
            other => {
                let secs = match other.parse::<i64>() {
                    Ok(n) => n,
                    Err(_) => humantime::parse_duration(other)
                        .map_err(|_| {
                            format!("{other:?} is not hour, day, week, month or a duration")
                        })?
                        .as_secs() as i64,
                };
                if secs < 1 {
                    return Err(format!(
                        "{other:?}: a sliding window needs at least one second"
                    ));
                }
                Ok(WindowKind::Sliding(secs))
            }
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
            remaining: if limit < 0 { -1 } else { (limit - used).max(0) },
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

/// The time zone calendar windows follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Zone {
    Local,
    Named(chrono_tz::Tz),
}

impl Zone {
    pub fn parse(s: &str) -> Result<Zone, String> {
        match s {
            "local" => Ok(Zone::Local),
            "UTC" | "utc" => Ok(Zone::Named(chrono_tz::UTC)),
            name => name
                .parse::<chrono_tz::Tz>()
                .map(Zone::Named)
                .map_err(|_| format!("{name:?} is not a time zone name such as \"Europe/Madrid\", \"UTC\" or \"local\"")),
        }
    }

    fn naive(self, t: i64) -> NaiveDateTime {
        let utc = DateTime::<Utc>::from_timestamp(t, 0).unwrap_or_default();
        match self {
            Zone::Local => utc.with_timezone(&chrono::Local).naive_local(),
            Zone::Named(tz) => utc.with_timezone(&tz).naive_local(),
        }
    }

    /// The first instant at or after local time `n` (a DST gap moves it forward).
    fn instant(self, n: NaiveDateTime) -> i64 {
        for step in 0..4 {
            let n = n + Duration::minutes(30 * step);
            let r = match self {
                Zone::Local => chrono::Local
                    .from_local_datetime(&n)
                    .earliest()
                    .map(|d| d.timestamp()),
                Zone::Named(tz) => tz.from_local_datetime(&n).earliest().map(|d| d.timestamp()),
            };
            if let Some(t) = r {
                return t;
            }
        }
        n.and_utc().timestamp()
    }
}

fn midnight(d: NaiveDate) -> NaiveDateTime {
    d.and_hms_opt(0, 0, 0).expect("midnight exists")
}

/// `[start, end)` of the calendar period containing `now`, in `zone`.
pub fn calendar_period(kind: WindowKind, zone: Zone, now: i64) -> (i64, i64) {
    let local = zone.naive(now);
    let d = local.date();
    let (start, end) = match kind {
        WindowKind::Hour => {
            let s = d.and_hms_opt(local.hour(), 0, 0).expect("valid hour");
            (s, s + Duration::hours(1))
        }
        WindowKind::Day => (midnight(d), midnight(d + Duration::days(1))),
        WindowKind::Week => {
            let monday = d - Duration::days(d.weekday().num_days_from_monday() as i64);
            (midnight(monday), midnight(monday + Duration::days(7)))
        }
        WindowKind::Month => {
            let first = d.with_day(1).expect("day 1");
            let next = if first.month() == 12 {
                NaiveDate::from_ymd_opt(first.year() + 1, 1, 1)
            } else {
                NaiveDate::from_ymd_opt(first.year(), first.month() + 1, 1)
            }
            .expect("next month");
            (midnight(first), midnight(next))
        }
        WindowKind::Sliding(_) => unreachable!("sliding windows have no calendar period"),
    };
    (zone.instant(start), zone.instant(end))
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

    fn utc(s: &str) -> i64 {
        NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S")
            .unwrap()
            .and_utc()
            .timestamp()
    }

    #[test]
    fn calendar_periods_in_utc() {
        let z = Zone::parse("UTC").unwrap();
        let t = utc("2026-11-22 13:45:10"); // a Sunday
        assert_eq!(
            calendar_period(WindowKind::Hour, z, t),
            (utc("2026-11-22 13:00:00"), utc("2026-11-22 14:00:00"))
        );
        assert_eq!(
            calendar_period(WindowKind::Day, z, t),
            (utc("2026-11-22 00:00:00"), utc("2026-11-23 00:00:00"))
        );
        assert_eq!(
            calendar_period(WindowKind::Week, z, t),
            (utc("2026-11-16 00:00:00"), utc("2026-11-23 00:00:00"))
        );
        assert_eq!(
            calendar_period(WindowKind::Month, z, t),
            (utc("2026-11-01 00:00:00"), utc("2026-12-01 00:00:00"))
        );
        let dec = utc("2026-12-31 23:59:59");
        assert_eq!(
            calendar_period(WindowKind::Month, z, dec),
            (utc("2026-12-01 00:00:00"), utc("2027-01-01 00:00:00"))
        );
        // ISO week across a year end: 2027-01-01 is a Friday, its week starts 2026-12-28.
        assert_eq!(
            calendar_period(WindowKind::Week, z, utc("2027-01-01 10:00:00")).0,
            utc("2026-12-28 00:00:00")
        );
    }

    #[test]
    fn calendar_periods_follow_the_zone_and_dst() {
        let z = Zone::parse("Europe/Madrid").unwrap();
        // 2026-03-29: clocks jump from 02:00 to 03:00 local (01:00 UTC); the day is 23 h.
        let t = utc("2026-03-29 12:00:00");
        let (s, e) = calendar_period(WindowKind::Day, z, t);
        assert_eq!(s, utc("2026-03-28 23:00:00"));
        assert_eq!(e - s, 23 * 3600);
        // Local midnight, not UTC midnight: 23:30 UTC on the 22nd is the 23rd in Madrid.
        let (s, _) = calendar_period(WindowKind::Day, z, utc("2026-11-22 23:30:00"));
        assert_eq!(s, utc("2026-11-22 23:00:00"));
        assert!(Zone::parse("Mars/Olympus").is_err());
    }

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
