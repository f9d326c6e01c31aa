//! Day and month rollover, as valvula's core date tracker and mod-ticket do it.
//!
//! The shared `time_tracking` row holds the day (1-31) and month (0-11) last seen. When
//! the clock's differ, the daemon that wins the conditional update of that row (so only
//! one of several daemons, valvula's C daemon included) writes a history row for every
//! ticket with usage, then zeroes the counters: months first, then days. History and
//! reset run in one transaction. A change that happened while the daemon was down is
//! caught at start (init calls [`check`]).

use chrono::{DateTime, Datelike, TimeZone, Utc};
use valvula_module::{Error, Host, Value};

#[derive(Clone, Copy, Debug)]
pub enum Zone {
    Local,
    Named(chrono_tz::Tz),
}

impl Zone {
    pub fn parse(s: &str) -> Result<Zone, Error> {
        match s {
            "local" => Ok(Zone::Local),
            name => name.parse::<chrono_tz::Tz>().map(Zone::Named).map_err(|_| {
                format!(
                    "time_zone: {name:?} is not \"local\" or a zone name such as \"Europe/Madrid\""
                )
                .into()
            }),
        }
    }

    /// (day of month 1-31, month 0-11) at `now`.
    pub fn day_month(self, now: i64) -> (i64, i64) {
        let utc = DateTime::<Utc>::from_timestamp(now, 0).unwrap_or_default();
        let (d, m) = match self {
            Zone::Local => {
                let l = chrono::Local.from_utc_datetime(&utc.naive_utc());
                (l.day(), l.month0())
            }
            Zone::Named(tz) => {
                let l = tz.from_utc_datetime(&utc.naive_utc());
                (l.day(), l.month0())
            }
        };
        (d as i64, m as i64)
    }
}

/// Compares the shared row with the clock and resets what changed; errors are logged
/// (the next tick tries again).
pub fn check(host: &Host, zone: Zone, now: i64) {
    if let Err(e) = try_check(host, zone, now) {
        tracing::warn!("day/month rollover check failed, retried next minute: {e}");
    }
}

fn try_check(host: &Host, zone: Zone, now: i64) -> Result<(), Error> {
    let (day, month) = zone.day_month(now);
    let r = host.query("SELECT day, month FROM time_tracking LIMIT 1", &[])?;
    let Some(row) = r.rows.first() else {
        host.exec(
            "INSERT INTO time_tracking (day, month) VALUES (?, ?)",
            &[day.into(), month.into()],
        )?;
        return Ok(());
    };
    let (seen_day, seen_month) = (row[0].as_i64(), row[1].as_i64());
    if seen_month != Some(month) && claim(host, "month", seen_month, month)? {
        reset(
            host,
            "domain_month_ticket_history",
            "month_usage",
            "current_month_usage",
            now,
        )?;
        tracing::info!(
            month,
            "month changed: month counters reset, history written"
        );
    }
    if seen_day != Some(day) && claim(host, "day", seen_day, day)? {
        reset(
            host,
            "domain_ticket_history",
            "day_usage",
            "current_day_usage",
            now,
        )?;
        tracing::info!(day, "day changed: day counters reset, history written");
    }
    Ok(())
}

/// Moves `time_tracking.col` from `seen` to `now`; true for the one daemon whose update
/// found the old value.
fn claim(host: &Host, col: &str, seen: Option<i64>, now: i64) -> Result<bool, Error> {
    let e = match seen {
        Some(s) => host.exec(
            &format!("UPDATE time_tracking SET {col} = ? WHERE {col} = ?"),
            &[now.into(), s.into()],
        )?,
        None => host.exec(
            &format!("UPDATE time_tracking SET {col} = ? WHERE {col} IS NULL"),
            &[now.into()],
        )?,
    };
    // A NULL tracking value only starts tracking: there is no change to reset.
    Ok(e.affected > 0 && seen.is_some())
}

/// History rows for usage > 0 (`stamp = now - 100`: in the period that ended, as valvula
/// writes it), then the counters zeroed, in one transaction.
fn reset(host: &Host, history: &str, usage: &str, counter: &str, now: i64) -> Result<(), Error> {
    let stamp = Value::Int(now - 100);
    host.batch(&[
        (
            &format!(
                "INSERT INTO {history} (domain_ticket_id, stamp, {usage}) \
                 SELECT id, ?, {counter} FROM domain_ticket WHERE {counter} > 0"
            ),
            &[stamp],
        ),
        (
            &format!("UPDATE domain_ticket SET {counter} = 0 WHERE {counter} <> 0"),
            &[],
        ),
    ])?;
    Ok(())
}
