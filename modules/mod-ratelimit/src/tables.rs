//! The module's tables: per-identity overrides (editable live) and accounting
//! (mtpolicyd's per-period totals). Rows exist only where they serve a purpose: an
//! override row is the operator's (valvula-ctl or SQL), never one per identity seen.
//!
//! Identities are stored in their bounded form ([`valvula_module::bounded`]): a sender
//! of any length Postfix can send fits the columns, and stays distinct.

use valvula_module::{Dialect, Error, Host, Request, Value, WindowKind};

use crate::RateLimit;
use crate::config::{self, Policy, Rule, Settings};

/// Bytes of an identity in the module's tables (`VARCHAR(255)` on MySQL).
pub const IDENTITY_BYTES: usize = 255;

/// An identity as the tables hold it.
pub fn stored_identity(ident: &str) -> std::borrow::Cow<'_, str> {
    valvula_module::bounded(ident, IDENTITY_BYTES)
}

/// Creates the tables when missing (our own tables: full DDL, unique keys included).
///
/// On MySQL they are `utf8mb4` with the binary collation, whatever the database's
/// default: identities compare byte for byte, as the host's counters do (`víp@` is not
/// `vip@`, and does not get vip's override), and any sender Postfix passes fits (a
/// `latin1` table made a UTF-8 sender fail every query). Tables of older versions are
/// converted.
pub fn ensure(host: &Host) -> Result<(), Error> {
    let mysql = host.dialect() == Dialect::Mysql;
    let (id, text, options) = if mysql {
        (
            "id INT AUTO_INCREMENT PRIMARY KEY",
            "VARCHAR(255)",
            " CHARACTER SET utf8mb4 COLLATE utf8mb4_bin",
        )
    } else {
        ("id INTEGER PRIMARY KEY", "TEXT", "")
    };
    host.exec(
        &format!(
            "CREATE TABLE IF NOT EXISTS ratelimit_override ({id}, policy VARCHAR(64) NOT NULL, \
             identity {text} NOT NULL, limits {text} NULL, action {text} NULL, text {text} NULL, \
             persist INT NOT NULL DEFAULT 0, period_start BIGINT NULL, created BIGINT NULL, \
             UNIQUE (policy, identity)){options}"
        ),
        &[],
    )?;
    host.exec(
        &format!(
            "CREATE TABLE IF NOT EXISTS ratelimit_accounting ({id}, policy VARCHAR(64) NOT NULL, \
             identity {text} NOT NULL, period BIGINT NOT NULL, messages BIGINT NOT NULL DEFAULT 0, \
             recipients BIGINT NOT NULL DEFAULT 0, bytes BIGINT NOT NULL DEFAULT 0, \
             bytes_rcpt BIGINT NOT NULL DEFAULT 0, UNIQUE (policy, identity, period)){options}"
        ),
        &[],
    )?;
    if mysql {
        let r = host.query(
            "SELECT table_name, table_collation, table_rows FROM information_schema.tables \
             WHERE table_schema = DATABASE() AND table_name IN (?, ?)",
            &["ratelimit_override".into(), "ratelimit_accounting".into()],
        )?;
        for row in &r.rows {
            let (Some(table), collation) = (row[0].as_str(), row[1].as_str()) else {
                continue;
            };
            let rows = row.get(2).and_then(|v| v.as_i64()).unwrap_or(0);
            if collation == Some("utf8mb4_bin")
                || !matches!(table, "ratelimit_override" | "ratelimit_accounting")
            {
                continue;
            }
            // Converting copies the table, and writes to it wait meanwhile: on every
            // daemon, and in the transactions that charge. Accounting is a report, and
            // a large one is left to the operator's quiet hour.
            if table == "ratelimit_accounting" && rows > CONVERT_MAX_ROWS {
                tracing::warn!(
                    "ratelimit_accounting ({rows} rows) is {}: identities that differ only \
                     in accents or case share accounting rows, and ones the character set \
                     cannot hold are not accounted; at a quiet time run: ALTER TABLE \
                     ratelimit_accounting CONVERT TO CHARACTER SET utf8mb4 COLLATE utf8mb4_bin",
                    collation.unwrap_or("")
                );
                continue;
            }
            host.exec(
                &format!(
                    "ALTER TABLE {table} CONVERT TO CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
                ),
                &[],
            )?;
            tracing::info!(
                table,
                from = collation.unwrap_or(""),
                "table converted to utf8mb4_bin"
            );
        }
    }
    Ok(())
}

/// The largest accounting table converted to utf8mb4_bin at start.
const CONVERT_MAX_ROWS: i64 = 100_000;

/// Creates index `name` on `table (column)` when missing (MySQL 8 has no CREATE INDEX
/// IF NOT EXISTS): housekeeping deletes by it.
fn ensure_index(host: &Host, table: &str, name: &str, column: &str) -> Result<(), Error> {
    // (Not at init: on a large table of an older version this takes minutes.)
    let exists = || -> Result<bool, Error> {
        let r = match host.dialect() {
            Dialect::Mysql => host.query(
                "SELECT COUNT(*) FROM information_schema.statistics \
                 WHERE table_schema = DATABASE() AND table_name = ? AND index_name = ?",
                &[table.into(), name.into()],
            )?,
            _ => host.query(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = ? AND name = ?",
                &["index".into(), name.into()],
            )?,
        };
        Ok(r.rows.first().and_then(|row| row[0].as_i64()).unwrap_or(0) > 0)
    };
    if exists()? {
        return Ok(());
    }
    if let Err(e) = host.exec(&format!("CREATE INDEX {name} ON {table} ({column})"), &[]) {
        // Another daemon may have made it meanwhile.
        if !exists()? {
            return Err(e.into());
        }
    }
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

/// Start of the period of `kind` that contains `now`, in the daemon's zone (the
/// counters' calendar): the window an override lives in, an accounting period.
fn period_start(zone: valvula_calendar::Zone, kind: WindowKind, now: i64) -> i64 {
    kind.span(zone, now).0
}

/// The rule in force for an identity: its override row when it has one in force, else
/// the configured rule. A non-persistent override lasts until its first window ends;
/// then its row is deleted and the configured rule applies again.
///
/// An override row that cannot be used (limits or action an operator mistyped) is
/// logged and skipped: the configured rule applies. Operator data must never turn every
/// request of an identity into a module failure.
pub async fn effective_rule(
    m: &RateLimit,
    req: &Request<'_>,
    p: &Policy,
    ident: &str,
    base: &Rule,
    now: i64,
) -> Result<Rule, Error> {
    let host = &m.host;
    let ident = stored_identity(ident);
    let r = host
        .query_async(
            req,
        "SELECT id, limits, action, text, persist, period_start FROM ratelimit_override WHERE policy = ? AND identity = ?",
        &[p.name.as_str().into(), ident.as_ref().into()],
    ).await?;
    let Some(row) = r.rows.first() else {
        return Ok(base.clone());
    };
    let reference = base.limits.first().map_or(WindowKind::Day, |l| l.0);
    let current = period_start(m.zone, reference, now);
    let id = row[0].as_i64().unwrap_or(0);
    let persist = row[4].as_i64().unwrap_or(0) != 0;
    let seen = row[5].as_i64();
    let has_override = !(row[1].is_null() && row[2].is_null() && row[3].is_null());
    match seen {
        // Edited with period_start cleared (valvula-ctl does): the override starts now.
        None => {
            host
                .exec_async(
                req,
                "UPDATE ratelimit_override SET period_start = ? WHERE id = ? AND period_start IS NULL",
                &[current.into(), id.into()],
            ).await?;
        }
        // A row started by a version that reckoned periods in UTC: the same window,
        // in this daemon's zone (else an upgrade ended every temporary override early).
        Some(s)
            if s != current && s == period_start(valvula_calendar::Zone::UTC, reference, now) =>
        {
            host.exec_async(
                req,
                "UPDATE ratelimit_override SET period_start = ? WHERE id = ? AND period_start = ?",
                &[current.into(), id.into(), s.into()],
            )
            .await?;
        }
        Some(s) if s != current => {
            if !persist {
                // A new window: the temporary override ends (once, whoever sees it first).
                host
                    .exec_async(
                    req,
                    "DELETE FROM ratelimit_override WHERE id = ? AND period_start = ? AND persist = 0",
                    &[id.into(), s.into()],
                ).await?;
                if has_override {
                    tracing::info!(policy = %p.name, identity = %ident, "temporary override ended with its window");
                }
                return Ok(base.clone());
            }
            host.exec_async(
                req,
                "UPDATE ratelimit_override SET period_start = ? WHERE id = ? AND period_start = ?",
                &[current.into(), id.into(), s.into()],
            )
            .await?;
        }
        _ => {}
    }
    if !has_override {
        return Ok(base.clone());
    }
    match apply(base, &row[1..4]) {
        Ok(rule) => Ok(rule),
        Err(e) => {
            m.warn_bad_override(&p.name, &ident, &e.to_string(), now);
            Ok(base.clone())
        }
    }
}

/// The configured rule with an override row's `limits`, `action` and `text`.
fn apply(base: &Rule, cells: &[Value]) -> Result<Rule, Error> {
    let mut rule = base.clone();
    if let Some(l) = cells[0].as_str() {
        rule.limits = parse_limits(l)?;
        if rule.limits.is_empty() {
            return Err(format!("limits {l:?} names no window").into());
        }
    }
    if let Some(a) = cells[1].as_str() {
        if a.starts_with(['4', '5']) {
            rule.action = valvula_module::Action::Raw;
            rule.code = a.to_owned();
        } else {
            rule.action = a.parse()?;
        }
    }
    if let Some(t) = cells[2].as_str() {
        rule.text = t.to_owned();
    }
    Ok(rule)
}

/// The write that adds one admitted request to the identity's accounting row of the
/// period: one upsert, made in the charge's own transaction (see
/// `Host::consume_all_then_async`). Sums saturate: a total never wraps, and never
/// overflows into an SQL error.
pub fn account(
    dialect: Dialect,
    zone: valvula_calendar::Zone,
    s: &Settings,
    policy: &str,
    ident: &str,
    req: &Request<'_>,
    now: i64,
) -> (String, Vec<Value>) {
    let ident = stored_identity(ident);
    let period = period_start(zone, s.accounting_period, now);
    let rcpts = req.recipient_count().max(1) as i64;
    let size = req.size() as i64;
    let params = vec![
        policy.into(),
        ident.as_ref().into(),
        period.into(),
        1i64.into(),
        rcpts.into(),
        size.into(),
        size.saturating_mul(rcpts).into(),
    ];
    let cols = ["messages", "recipients", "bytes", "bytes_rcpt"];
    let update = if dialect == Dialect::Mysql {
        let add: Vec<String> = cols
            .iter()
            .map(|c| format!("{c} = {c} + LEAST(VALUES({c}), 9223372036854775807 - {c})"))
            .collect();
        format!("ON DUPLICATE KEY UPDATE {}", add.join(", "))
    } else {
        let add: Vec<String> = cols
            .iter()
            .map(|c| format!("{c} = {c} + MIN(excluded.{c}, 9223372036854775807 - {c})"))
            .collect();
        format!(
            "ON CONFLICT (policy, identity, period) DO UPDATE SET {}",
            add.join(", ")
        )
    };
    (
        format!(
            "INSERT INTO ratelimit_accounting (policy, identity, period, {}) VALUES (?, ?, ?, ?, ?, ?, ?) {update}",
            cols.join(", ")
        ),
        params,
    )
}

/// Rows one housekeeping statement deletes at most, and statements per tick: a few
/// milliseconds each, so no request waits behind them (one DELETE of a million rows
/// held the request lanes past the storage timeout), and a backlog left by an older
/// version goes in a few hours.
const BATCH: u64 = 500;
const BATCHES_PER_TICK: usize = 40;

/// Deletes the rows of `table` that match `cond`, [`BATCH`] at a time; the rows deleted.
fn delete_batched(host: &Host, table: &str, cond: &str, params: &[Value]) -> Result<u64, Error> {
    let sql = if host.dialect() == Dialect::Mysql {
        format!("DELETE FROM {table} WHERE {cond} LIMIT {BATCH}")
    } else {
        format!(
            "DELETE FROM {table} WHERE id IN (SELECT id FROM {table} WHERE {cond} LIMIT {BATCH})"
        )
    };
    let mut total = 0;
    for _ in 0..BATCHES_PER_TICK {
        let n = host.exec(&sql, params)?.affected;
        total += n;
        if n < BATCH {
            break;
        }
        // Let the requests' writes through between two batches.
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    Ok(total)
}

/// The index housekeeping deletes accounting rows by.
pub fn ensure_indexes(host: &Host) -> Result<(), Error> {
    ensure_index(
        host,
        "ratelimit_accounting",
        "ratelimit_accounting_period",
        "period",
    )
}

/// Housekeeping, each minute, in small batches: accounting rows past retention, and
/// override rows that override nothing (left by an operator or by a version that made
/// one per identity seen).
pub fn expire(host: &Host, s: &Settings, now: i64) -> Result<u64, Error> {
    let mut n = 0;
    if s.accounting_retention_days > 0 {
        n += delete_batched(
            host,
            "ratelimit_accounting",
            "period < ?",
            &[(now - s.accounting_retention_days * 86_400).into()],
        )?;
    }
    n += delete_batched(
        host,
        "ratelimit_override",
        "limits IS NULL AND action IS NULL AND text IS NULL AND persist = 0",
        &[],
    )?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    #[test]
    fn periods_follow_the_zone() {
        let utc = valvula_calendar::Zone::UTC;
        let tokyo = valvula_calendar::Zone::parse("Asia/Tokyo").unwrap();
        let t = 1_795_348_800; // 2026-11-22 12:00 UTC
        assert_eq!(
            super::period_start(utc, super::WindowKind::Day, t),
            1_795_305_600
        );
        // Tokyo's day began at 15:00 UTC the day before.
        assert_eq!(
            super::period_start(tokyo, super::WindowKind::Day, t),
            1_795_305_600 - 9 * 3600
        );
        assert_eq!(
            super::period_start(utc, super::WindowKind::Month, t),
            1_793_491_200 // 2026-11-01
        );
    }

    #[test]
    fn limits_text() {
        let l = super::parse_limits("hour=100, day=1000,90s=5").unwrap();
        assert_eq!(l.len(), 3);
        assert_eq!(l[2].0, valvula_module::WindowKind::Sliding(90));
        assert!(super::parse_limits("hour").is_err());
    }
}
