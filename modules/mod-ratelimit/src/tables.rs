//! The module's tables: per-identity overrides (editable live), per-message charge
//! records (no double charge), and accounting (mtpolicyd's per-period totals).

use valvula_module::{Dialect, Error, Host, Request, Value, WindowKind};

use crate::config::{self, Policy, Rule, Settings};

fn ignore(host: &Host) -> &'static str {
    if host.dialect() == Dialect::Mysql {
        "INSERT IGNORE"
    } else {
        "INSERT OR IGNORE"
    }
}

/// Creates the tables when missing (our own tables: full DDL, unique keys included).
pub fn ensure(host: &Host) -> Result<(), Error> {
    let mysql = host.dialect() == Dialect::Mysql;
    let (id, text) = if mysql {
        ("id INT AUTO_INCREMENT PRIMARY KEY", "VARCHAR(255)")
    } else {
        ("id INTEGER PRIMARY KEY", "TEXT")
    };
    host.exec(
        &format!(
            "CREATE TABLE IF NOT EXISTS ratelimit_override ({id}, policy VARCHAR(64) NOT NULL, \
             identity {text} NOT NULL, limits {text} NULL, action {text} NULL, text {text} NULL, \
             persist INT NOT NULL DEFAULT 0, period_start BIGINT NULL, created BIGINT NULL, \
             UNIQUE (policy, identity))"
        ),
        &[],
    )?;
    host.exec(
        &format!(
            "CREATE TABLE IF NOT EXISTS ratelimit_accounting ({id}, policy VARCHAR(64) NOT NULL, \
             identity {text} NOT NULL, period BIGINT NOT NULL, messages BIGINT NOT NULL DEFAULT 0, \
             recipients BIGINT NOT NULL DEFAULT 0, bytes BIGINT NOT NULL DEFAULT 0, \
             bytes_rcpt BIGINT NOT NULL DEFAULT 0, UNIQUE (policy, identity, period))"
        ),
        &[],
    )?;
    Ok(())
}

/// `hour=100,day=1000,3600s=50`.
pub fn parse_limits(s: &str) -> Result<Vec<(WindowKind, i64, String)>, Error> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(|item| {
            let (w, l) = item
                .split_once('=')
                .ok_or_else(|| format!("limits {s:?}: write window=limit, e.g. hour=100"))?;
            let l: i64 = l
                .trim()
                .parse()
                .map_err(|_| format!("limits {s:?}: {l:?} is not a number"))?;
            Ok((config::window(w.trim())?, l, w.trim().to_owned()))
        })
        .collect()
}

/// Start (UTC) of the window an override lives in: its first window's current period.
fn period_start(kind: WindowKind, now: i64) -> i64 {
    let day = now.div_euclid(86_400) * 86_400;
    match kind {
        WindowKind::Hour => now.div_euclid(3600) * 3600,
        WindowKind::Day => day,
        // ISO weeks start on Monday; the epoch was a Thursday.
        WindowKind::Week => (now + 3 * 86_400).div_euclid(7 * 86_400) * 7 * 86_400 - 3 * 86_400,
        WindowKind::Month => day - (day_of_month(now) - 1) * 86_400,
        WindowKind::Sliding(s) => now.div_euclid(s) * s,
    }
}

/// The rule in force for an identity: its override row when it has one in force, else
/// the configured rule. Unknown identities get a row (with no override) so operators
/// see them and can edit them. A non-persistent override lasts until its first window
/// ends; then the row reverts to the configured rule.
pub fn effective_rule(
    host: &Host,
    p: &Policy,
    ident: &str,
    base: &Rule,
    now: i64,
) -> Result<Rule, Error> {
    let r = host.query(
        "SELECT id, limits, action, text, persist, period_start FROM ratelimit_override WHERE policy = ? AND identity = ?",
        &[p.name.as_str().into(), ident.into()],
    )?;
    let reference = base.limits.first().map_or(WindowKind::Day, |l| l.0);
    let current = period_start(reference, now);
    let Some(row) = r.rows.first() else {
        host.exec(
            &format!(
                "{} INTO ratelimit_override (policy, identity, persist, period_start, created) VALUES (?, ?, 0, ?, ?)",
                ignore(host)
            ),
            &[p.name.as_str().into(), ident.into(), current.into(), now.into()],
        )?;
        return Ok(base.clone());
    };
    let id = row[0].as_i64().unwrap_or(0);
    let persist = row[4].as_i64().unwrap_or(0) != 0;
    let seen = row[5].as_i64();
    let has_override = !(row[1].is_null() && row[2].is_null() && row[3].is_null());
    match seen {
        // Edited with period_start cleared (valvula-ctl does): the override starts now.
        None => {
            host.exec(
                "UPDATE ratelimit_override SET period_start = ? WHERE id = ? AND period_start IS NULL",
                &[current.into(), id.into()],
            )?;
        }
        Some(s) if s != current => {
            if has_override && !persist {
                // A new window: the temporary override ends (once, whoever sees it first).
                host.exec(
                    "UPDATE ratelimit_override SET limits = NULL, action = NULL, text = NULL, period_start = ? \
                     WHERE id = ? AND period_start = ?",
                    &[current.into(), id.into(), s.into()],
                )?;
                tracing::info!(policy = %p.name, identity = ident, "temporary override ended with its window");
                return Ok(base.clone());
            }
            host.exec(
                "UPDATE ratelimit_override SET period_start = ? WHERE id = ? AND period_start = ?",
                &[current.into(), id.into(), s.into()],
            )?;
        }
        _ => {}
    }
    if !has_override {
        return Ok(base.clone());
    }
    let mut rule = base.clone();
    if let Some(l) = row[1].as_str() {
        rule.limits = parse_limits(l)?;
    }
    if let Some(a) = row[2].as_str() {
        if a.starts_with(['4', '5']) {
            rule.action = valvula_module::Action::Raw;
            rule.code = a.to_owned();
        } else {
            rule.action = a.parse()?;
        }
    }
    if let Some(t) = row[3].as_str() {
        rule.text = t.to_owned();
    }
    Ok(rule)
}

/// Adds one admitted request to the identity's accounting row of the period.
pub fn account(
    host: &Host,
    s: &Settings,
    policy: &str,
    ident: &str,
    req: &Request<'_>,
    now: i64,
) -> Result<(), Error> {
    let period = period_start(s.accounting_period, now);
    let rcpts = req.recipient_count().max(1) as i64;
    let size = req.size() as i64;
    let params = || -> Vec<Value> {
        vec![
            1i64.into(),
            rcpts.into(),
            size.into(),
            size.saturating_mul(rcpts).into(),
            policy.into(),
            ident.into(),
            period.into(),
        ]
    };
    let update = "UPDATE ratelimit_accounting SET messages = messages + ?, recipients = recipients + ?, \
                  bytes = bytes + ?, bytes_rcpt = bytes_rcpt + ? WHERE policy = ? AND identity = ? AND period = ?";
    if host.exec(update, &params())?.affected == 0 {
        host.exec(
            &format!(
                "{} INTO ratelimit_accounting (policy, identity, period) VALUES (?, ?, ?)",
                ignore(host)
            ),
            &[policy.into(), ident.into(), period.into()],
        )?;
        host.exec(update, &params())?;
    }
    Ok(())
}

/// Day of the month (UTC) of a time, for month accounting periods.
fn day_of_month(t: i64) -> i64 {
    // Civil-from-days (Howard Hinnant's algorithm), to avoid a date library here.
    let z = t.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    doy - (153 * mp + 2) / 5 + 1
}

/// Hourly housekeeping: charge records older than a day, accounting past retention.
pub fn expire(host: &Host, s: &Settings, now: i64) -> Result<(), Error> {
    if s.accounting_retention_days > 0 {
        host.exec(
            "DELETE FROM ratelimit_accounting WHERE period < ?",
            &[(now - s.accounting_retention_days * 86_400).into()],
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn day_of_month() {
        assert_eq!(super::day_of_month(1_795_348_800), 22); // 2026-11-22
        assert_eq!(super::day_of_month(1_796_083_200), 1); // 2026-12-01
    }

    #[test]
    fn limits_text() {
        let l = super::parse_limits("hour=100, day=1000,90s=5").unwrap();
        assert_eq!(l.len(), 3);
        assert_eq!(l[2].0, valvula_module::WindowKind::Sliding(90));
        assert!(super::parse_limits("hour").is_err());
    }
}
