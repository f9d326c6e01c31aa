//! Day and month rollover, as valvula's core date tracker and mod-ticket do it, made
//! atomic.
//!
//! The shared `time_tracking` row holds the day (1-31) and month (0-11) last seen, and
//! (added here) the zone they are seen in. When the clock's differ, one transaction
//! locks that row, writes a history row for every ticket with usage and zeroes the
//! counters (NULL ones too, as valvula does), months first, then days, and moves the
//! row on; each step runs only while the row still holds the old value, so of several
//! daemons (valvula's C daemon included) exactly one resets, and a reset that fails is
//! retried by the next request or minute until it is done. Requests check the date
//! themselves: the first one after midnight rolls over before it is charged.

use valvula_calendar::Zone;
use valvula_module::{Error, Host, Value};

/// The zone of the rollover: `time_zone` of `[module.mod-ticket]` when set ("local" is
/// the system's zone), else the daemon's (`[storage] time_zone`).
pub fn zone(configured: Option<&str>, host: &Host) -> Result<Zone, Error> {
    let name = match configured {
        Some(z) => z.to_owned(),
        None => host.time_zone().unwrap_or_else(|| "local".to_owned()),
    };
    Zone::parse(&name).map_err(|e| format!("time_zone: {e}").into())
}

/// Whether the database's rollover follows this daemon's calendar.
pub enum ZoneCheck {
    Agree,
    /// Another calendar: why, and what to do.
    Disagree(String),
}

/// Records this daemon's zone in `time_tracking` (when none is) and tells whether the
/// database's rollover follows another calendar: two daemons that disagree on the date
/// would reset each other's day counters once a minute.
pub fn agree_on_zone(host: &Host, zone: Zone, now: i64) -> Result<ZoneCheck, Error> {
    host.exec(
        "UPDATE time_tracking SET time_zone = ? WHERE time_zone IS NULL",
        &[zone.name().into()],
    )?;
    let r = host.query("SELECT time_zone FROM time_tracking", &[])?;
    for row in &r.rows {
        let Some(stored) = row[0].as_str() else {
            continue;
        };
        let same = Zone::parse(stored).is_ok_and(|z| z.same_calendar(&zone, now));
        if !same {
            return Ok(ZoneCheck::Disagree(format!(
                "the database's day and month rollover follows the time zone {stored:?} \
                 (time_tracking.time_zone, recorded by the first daemon), but this daemon's is \
                 {:?}: the daemons would reset each other's counters. Set time_zone = {stored:?} \
                 in [module.mod-ticket] (or [storage]); to move the database to another zone, stop \
                 every daemon using it, then run: UPDATE time_tracking SET time_zone = NULL",
                zone.name()
            )));
        }
    }
    Ok(ZoneCheck::Agree)
}

/// Compares the shared row with the clock and rolls over what changed, in one
/// transaction. `Ok` when the row matches the clock afterwards (this daemon or another
/// rolled over); an error leaves everything as it was, for the next try.
pub fn check(host: &Host, zone: Zone, now: i64) -> Result<(), Error> {
    let (day, month) = zone.day_month(now);
    let r = host.query("SELECT day, month FROM time_tracking LIMIT 1", &[])?;
    let Some(row) = r.rows.first() else {
        host.exec(
            "INSERT INTO time_tracking (day, month, time_zone) VALUES (?, ?, ?)",
            &[day.into(), month.into(), zone.name().into()],
        )?;
        return Ok(());
    };
    let (seen_day, seen_month) = (row[0].as_i64(), row[1].as_i64());
    if seen_day == Some(day) && seen_month == Some(month) {
        return Ok(());
    }
    let stamp = Value::Int(now - 100);
    let mut stmts: Vec<(String, Vec<Value>)> = Vec::new();
    // Where each rollover's last statement (the one that moves the row on) is.
    let mut moves: Vec<(usize, &str)> = Vec::new();
    for (col, seen, value, history, usage, counter) in [
        (
            "month",
            seen_month,
            month,
            "domain_month_ticket_history",
            "month_usage",
            "current_month_usage",
        ),
        (
            "day",
            seen_day,
            day,
            "domain_ticket_history",
            "day_usage",
            "current_day_usage",
        ),
    ] {
        if seen == Some(value) {
            continue;
        }
        let Some(seen) = seen else {
            // A NULL tracking value only starts tracking: there is no change to reset.
            stmts.push((
                format!("UPDATE time_tracking SET {col} = ? WHERE {col} IS NULL"),
                vec![value.into()],
            ));
            continue;
        };
        let still = format!("EXISTS (SELECT 1 FROM time_tracking WHERE {col} = ?)");
        // Lock the row first: another daemon's rollover waits for this one, then finds
        // the row moved on and does nothing.
        stmts.push((
            format!("UPDATE time_tracking SET {col} = {col} WHERE {col} = ?"),
            vec![seen.into()],
        ));
        // Lock every ticket row too: a charge committed between the history's read
        // (a plain read under READ COMMITTED) and the reset would be zeroed without
        // being in the history. Charges now wait for this transaction, then count in
        // the new period.
        stmts.push((
            format!("UPDATE domain_ticket SET {counter} = {counter} WHERE {still}"),
            vec![seen.into()],
        ));
        stmts.push((
            format!(
                "INSERT INTO {history} (domain_ticket_id, stamp, {usage}) \
                 SELECT id, ?, {counter} FROM domain_ticket WHERE {counter} > 0 AND {still}"
            ),
            vec![stamp.clone(), seen.into()],
        ));
        stmts.push((
            format!(
                "UPDATE domain_ticket SET {counter} = 0 \
                 WHERE ({counter} <> 0 OR {counter} IS NULL) AND {still}"
            ),
            vec![seen.into()],
        ));
        moves.push((stmts.len(), col));
        stmts.push((
            format!("UPDATE time_tracking SET {col} = ? WHERE {col} = ?"),
            vec![value.into(), seen.into()],
        ));
    }
    let batch: Vec<(&str, &[Value])> = stmts
        .iter()
        .map(|(sql, p)| (sql.as_str(), p.as_slice()))
        .collect();
    let affected = host.batch(&batch)?;
    // A rollover whose last statement moved the row was this daemon's.
    for (i, what) in moves {
        if affected.get(i).copied().unwrap_or(0) > 0 {
            tracing::info!(
                day,
                month,
                "{what} changed: {what} counters reset, history written"
            );
        }
    }
    Ok(())
}
