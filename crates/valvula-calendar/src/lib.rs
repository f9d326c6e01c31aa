//! valvula's calendar: the time zone calendar windows follow, the periods in it, and
//! the counting windows ([`WindowKind`]) every part of valvula names the same way.
//!
//! Counters of several daemons on one database must agree on when a day starts, so a
//! zone is always a named IANA zone: `"local"` is resolved to the system's zone name
//! when the configuration is read (the `TZ` variable, else `/etc/localtime`), never left
//! as "whatever this machine says". Two names may denote the same calendar
//! (`Etc/UTC` and `UTC`); [`Zone::same_calendar`] tells.

mod window;

pub use window::{SLIDING_BUCKETS, Window, WindowKind};

use chrono::{DateTime, Datelike, Duration, NaiveDate, NaiveDateTime, TimeZone, Timelike, Utc};
use chrono_tz::Tz;

/// A calendar period kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Period {
    Hour,
    Day,
    /// ISO week: Monday to Sunday.
    Week,
    Month,
}

/// The length of a sliding window, in seconds: an integer of seconds, or a duration
/// such as `"90s"`, `"10m"`, `"1h30m"`, `"2hours"`, `"1w"`. One grammar for the
/// daemon's configuration, mod-ratelimit's rules and overrides, and valvula-ctl.
pub fn window_seconds(s: &str) -> Result<i64, String> {
    let secs = match s.trim().parse::<i64>() {
        Ok(n) => n,
        Err(_) => humantime::parse_duration(s.trim())
            .map_err(|_| {
                format!(
                    "{s:?} is not hour, day, week, month or a duration such as \"90s\" or \"1h\""
                )
            })?
            .as_secs()
            .try_into()
            .map_err(|_| format!("{s:?} is too long"))?,
    };
    if secs < 1 {
        return Err(format!("{s:?}: a sliding window needs at least one second"));
    }
    Ok(secs)
}

/// A named time zone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Zone(Tz);

impl Default for Zone {
    fn default() -> Self {
        Zone::UTC
    }
}

impl std::fmt::Display for Zone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A zone name from a `TZ` value (`Europe/Madrid`, `:Europe/Madrid`,
/// `/usr/share/zoneinfo/Europe/Madrid`); `None` for POSIX rule strings such as
/// `CET-1CEST`, which name no zone.
fn tz_variable(v: &str) -> Option<Tz> {
    let v = v.trim().trim_start_matches(':');
    let name = v.rsplit_once("zoneinfo/").map_or(v, |(_, n)| n);
    name.parse().ok()
}

impl Zone {
    pub const UTC: Zone = Zone(chrono_tz::UTC);

    /// `"local"` (the system's zone, see [`Zone::local`]), `"UTC"`, or an IANA name.
    pub fn parse(s: &str) -> Result<Zone, String> {
        match s {
            "local" => Zone::local(),
            "UTC" | "utc" => Ok(Zone::UTC),
            name => name.parse::<Tz>().map(Zone).map_err(|_| {
                format!(
                    "{name:?} is not a time zone name such as \"Europe/Madrid\", \"UTC\" or \"local\""
                )
            }),
        }
    }

    /// The system's zone, by name: `TZ` when set, else `/etc/localtime` (or
    /// `/etc/timezone`); UTC when neither exists, as the C library does.
    pub fn local() -> Result<Zone, String> {
        if let Some(v) = std::env::var_os("TZ").filter(|v| !v.is_empty()) {
            let v = v.to_string_lossy();
            let file = v.trim_start_matches(':');
            // A file (`:/etc/localtime`, a common setting): the zone it links to; the
            // system's own file is the system's zone, looked up below.
            let linked = file
                .starts_with('/')
                .then(|| std::fs::canonicalize(file).ok())
                .flatten()
                .and_then(|p| p.to_str().and_then(tz_variable));
            match (linked, tz_variable(&v)) {
                (Some(tz), _) | (None, Some(tz)) => return Ok(Zone(tz)),
                _ if file == "/etc/localtime" => {}
                _ => {
                    return Err(format!(
                        "\"local\": TZ={v:?} names no time zone; set time_zone to a name such as \"Europe/Madrid\""
                    ));
                }
            }
        }
        let have_localtime = std::path::Path::new("/etc/localtime").exists()
            || std::path::Path::new("/etc/timezone").exists();
        if !have_localtime {
            return Ok(Zone::UTC);
        }
        let name = iana_time_zone::get_timezone().map_err(|e| {
            format!("\"local\": cannot tell the system's time zone ({e}); set time_zone to a name such as \"Europe/Madrid\"")
        })?;
        name.parse::<Tz>().map(Zone).map_err(|_| {
            format!("\"local\": the system's time zone {name:?} is unknown; set time_zone to a name such as \"Europe/Madrid\"")
        })
    }

    pub fn name(&self) -> &'static str {
        self.0.name()
    }

    pub fn tz(&self) -> Tz {
        self.0
    }

    /// Whether two zones have the same UTC offset at every moment from a year before
    /// `around` to two years after it (sampled every 15 minutes), so that they put
    /// every calendar boundary of that span at the same instant.
    pub fn same_calendar(&self, other: &Zone, around: i64) -> bool {
        if self == other {
            return true;
        }
        use chrono::Offset;
        let offset = |z: &Zone, t: i64| {
            let utc = DateTime::<Utc>::from_timestamp(t, 0).unwrap_or_default();
            z.0.offset_from_utc_datetime(&utc.naive_utc())
                .fix()
                .local_minus_utc()
        };
        let (from, to) = (around - 366 * 86_400, around + 2 * 366 * 86_400);
        (from..to)
            .step_by(900)
            .all(|t| offset(self, t) == offset(other, t))
    }

    /// Local time at `t`.
    pub fn naive(&self, t: i64) -> NaiveDateTime {
        let utc = DateTime::<Utc>::from_timestamp(t, 0).unwrap_or_default();
        utc.with_timezone(&self.0).naive_local()
    }

    /// The first instant at or after local time `n` (a DST gap moves it forward).
    fn instant(&self, n: NaiveDateTime) -> i64 {
        for step in 0..4 {
            let n = n + Duration::minutes(30 * step);
            if let Some(d) = self.0.from_local_datetime(&n).earliest() {
                return d.timestamp();
            }
        }
        n.and_utc().timestamp()
    }

    /// `[start, end)` of the period of `kind` that contains `now`.
    pub fn period(&self, kind: Period, now: i64) -> (i64, i64) {
        let local = self.naive(now);
        let d = local.date();
        let midnight = |d: NaiveDate| d.and_hms_opt(0, 0, 0).expect("midnight exists");
        let (start, end) = match kind {
            Period::Hour => {
                let s = d.and_hms_opt(local.hour(), 0, 0).expect("valid hour");
                (s, s + Duration::hours(1))
            }
            Period::Day => (midnight(d), midnight(d + Duration::days(1))),
            Period::Week => {
                let monday = d - Duration::days(d.weekday().num_days_from_monday() as i64);
                (midnight(monday), midnight(monday + Duration::days(7)))
            }
            Period::Month => {
                let first = d.with_day(1).expect("day 1");
                let next = if first.month() == 12 {
                    NaiveDate::from_ymd_opt(first.year() + 1, 1, 1)
                } else {
                    NaiveDate::from_ymd_opt(first.year(), first.month() + 1, 1)
                }
                .expect("next month");
                (midnight(first), midnight(next))
            }
        };
        (self.instant(start), self.instant(end))
    }

    /// (day of month 1-31, month 0-11) at `now`: valvula's `time_tracking` values.
    pub fn day_month(&self, now: i64) -> (i64, i64) {
        let l = self.naive(now);
        (l.day() as i64, l.month0() as i64)
    }
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
    fn periods_in_utc() {
        let z = Zone::UTC;
        let t = utc("2026-11-22 13:45:10"); // a Sunday
        assert_eq!(
            z.period(Period::Hour, t),
            (utc("2026-11-22 13:00:00"), utc("2026-11-22 14:00:00"))
        );
        assert_eq!(
            z.period(Period::Day, t),
            (utc("2026-11-22 00:00:00"), utc("2026-11-23 00:00:00"))
        );
        assert_eq!(
            z.period(Period::Week, t),
            (utc("2026-11-16 00:00:00"), utc("2026-11-23 00:00:00"))
        );
        assert_eq!(
            z.period(Period::Month, t),
            (utc("2026-11-01 00:00:00"), utc("2026-12-01 00:00:00"))
        );
        assert_eq!(
            z.period(Period::Month, utc("2026-12-31 23:59:59")),
            (utc("2026-12-01 00:00:00"), utc("2027-01-01 00:00:00"))
        );
        // ISO week across a year end: 2027-01-01 is a Friday, its week starts 2026-12-28.
        assert_eq!(
            z.period(Period::Week, utc("2027-01-01 10:00:00")).0,
            utc("2026-12-28 00:00:00")
        );
    }

    #[test]
    fn periods_follow_the_zone_and_dst() {
        let z = Zone::parse("Europe/Madrid").unwrap();
        // 2026-03-29: clocks jump from 02:00 to 03:00 local (01:00 UTC); the day is 23 h.
        let (s, e) = z.period(Period::Day, utc("2026-03-29 12:00:00"));
        assert_eq!(s, utc("2026-03-28 23:00:00"));
        assert_eq!(e - s, 23 * 3600);
        // Local midnight, not UTC midnight: 23:30 UTC on the 22nd is the 23rd in Madrid.
        let (s, _) = z.period(Period::Day, utc("2026-11-22 23:30:00"));
        assert_eq!(s, utc("2026-11-22 23:00:00"));
        assert!(Zone::parse("Mars/Olympus").is_err());
        assert_eq!(z.day_month(utc("2026-11-30 23:30:00")), (1, 11));
    }

    #[test]
    fn same_calendar_compares_offsets_not_names() {
        let now = utc("2026-11-30 00:00:00");
        let utc_zone = Zone::parse("UTC").unwrap();
        let etc = Zone::parse("Etc/UTC").unwrap();
        assert_ne!(utc_zone, etc);
        assert!(utc_zone.same_calendar(&etc, now));
        let tokyo = Zone::parse("Asia/Tokyo").unwrap();
        assert!(!utc_zone.same_calendar(&tokyo, now));
        // Same offset in winter, not in summer.
        let london = Zone::parse("Europe/London").unwrap();
        assert!(!utc_zone.same_calendar(&london, now));
    }

    #[test]
    fn tz_naming_the_system_file_is_the_system_zone() {
        // In a child process: tests run in threads, and TZ is process-wide.
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new(exe)
            .args([
                "--exact",
                "tests::print_local_zone",
                "--nocapture",
                "--ignored",
            ])
            .env("TZ", ":/etc/localtime")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("local zone: Ok("),
            "TZ=:/etc/localtime gave: {text}"
        );
    }

    #[test]
    #[ignore = "run by tz_naming_the_system_file_is_the_system_zone in a child process"]
    fn print_local_zone() {
        println!("local zone: {:?}", Zone::local());
    }

    #[test]
    fn tz_variable_forms() {
        assert_eq!(
            tz_variable(":Asia/Tokyo").map(|t| t.name()),
            Some("Asia/Tokyo")
        );
        assert_eq!(
            tz_variable("/usr/share/zoneinfo/Pacific/Honolulu").map(|t| t.name()),
            Some("Pacific/Honolulu")
        );
        assert!(tz_variable("CET-1CEST").is_none());
    }
}
