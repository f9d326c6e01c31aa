//! The consumption algorithm, written once for both backends against [`Tx`]: the
//! statements of one transaction, in the order that keeps it exact.
//!
//! Calendar window: one row per (namespace, key, window) holding the current period and
//! its count; the charge is a conditional UPDATE that also rolls the period over, so a
//! reset can never be undone by a concurrent charge. Sliding window: a head row in the
//! same table serialises charges of that key and window (row lock), the buckets live in
//! `vlv_slide`. Windows are handled in a fixed order so two transactions on one key
//! always lock in the same order (no deadlock between them).

use super::window::{self, Consumption, Window, WindowKind, WindowState, Zone};
use super::{Dialect, Result, Value};

#[derive(Clone, Debug)]
pub struct Request {
    pub ns: String,
    pub key: String,
    pub amount: i64,
    pub windows: Vec<Window>,
    pub now: i64,
    pub peek: bool,
    pub zone: Zone,
}

/// The statements a backend runs inside its transaction.
pub(crate) trait Tx {
    /// Runs a statement, returns the affected rows.
    async fn exec(&mut self, sql: &str, params: Vec<Value>) -> Result<u64>;
    /// Runs a query, returns its rows.
    async fn rows(&mut self, sql: &str, params: Vec<Value>) -> Result<Vec<Vec<Value>>>;
}

fn int(v: &Value) -> i64 {
    match v {
        Value::Int(i) => *i,
        Value::Float(f) => *f as i64,
        Value::Text(s) => s.parse().unwrap_or(0),
        _ => 0,
    }
}

/// Whether the transaction must be rolled back: a refusal or a peek.
pub(crate) fn keeps_nothing(req: &Request, c: &Consumption) -> bool {
    req.peek || !c.admitted
}

/// Runs one consumption (or peek) inside an open transaction. The caller commits when
/// the result is admitted and not a peek, and rolls back otherwise.
pub(crate) async fn run<T: Tx>(tx: &mut T, dialect: Dialect, req: &Request) -> Result<Consumption> {
    let ns = || Value::Text(req.ns.clone());
    let key = || Value::Text(req.key.clone());
    let mut order: Vec<usize> = (0..req.windows.len()).collect();
    order.sort_by_key(|&i| req.windows[i].kind);
    let mut states: Vec<Option<WindowState>> = vec![None; req.windows.len()];
    let mut charged = vec![false; req.windows.len()];
    // A zero amount changes nothing: answer it as a peek (MySQL would report no affected
    // row for an UPDATE that changes nothing).
    let peek = req.peek || req.amount == 0;
    let insert_ignore = match dialect {
        Dialect::Sqlite => "INSERT OR IGNORE",
        Dialect::Mysql => "INSERT IGNORE",
    };
    let mut admitted = true;

    for &i in &order {
        let w = req.windows[i];
        let win = Value::Text(w.kind.id());
        // The amount alone is more than the limit: no need to ask the database.
        let too_big = w.limit >= 0 && req.amount > w.limit;
        match w.kind {
            WindowKind::Sliding(_) => {
                let (_, current, oldest) = window::sliding_span(w.kind, req.now);
                if !peek {
                    // Head row: its lock serialises charges of this key and window.
                    tx.exec(
                        &format!("{insert_ignore} INTO vlv_counter (ns, ckey, win, period, used) VALUES (?, ?, ?, 0, 0)"),
                        vec![ns(), key(), win.clone()],
                    )
                    .await?;
                    if dialect == Dialect::Mysql {
                        tx.rows(
                            "SELECT used FROM vlv_counter WHERE ns = ? AND ckey = ? AND win = ? FOR UPDATE",
                            vec![ns(), key(), win.clone()],
                        )
                        .await?;
                    }
                }
                let r = tx
                    .rows(
                        "SELECT COALESCE(SUM(used), 0), MIN(bucket) FROM vlv_slide \
                         WHERE ns = ? AND ckey = ? AND win = ? AND bucket >= ? AND used > 0",
                        vec![ns(), key(), win.clone(), Value::Int(oldest)],
                    )
                    .await?;
                let sum = r.first().map_or(0, |row| int(&row[0]));
                let first = r.first().and_then(|row| match row[1] {
                    Value::Null => None,
                    ref v => Some(int(v)),
                });
                let ok = !too_big && (w.limit < 0 || sum + req.amount <= w.limit);
                let mut used = sum;
                if ok && !peek && admitted {
                    let expires = window::sliding_reset(w.kind, current);
                    tx.exec(
                        &format!(
                            "{insert_ignore} INTO vlv_slide (ns, ckey, win, bucket, used, expires) VALUES (?, ?, ?, ?, 0, ?)"
                        ),
                        vec![ns(), key(), win.clone(), Value::Int(current), Value::Int(expires)],
                    )
                    .await?;
                    tx.exec(
                        "UPDATE vlv_slide SET used = used + ? WHERE ns = ? AND ckey = ? AND win = ? AND bucket = ?",
                        vec![Value::Int(req.amount), ns(), key(), win.clone(), Value::Int(current)],
                    )
                    .await?;
                    used += req.amount;
                    charged[i] = true;
                }
                let oldest_counted = first.unwrap_or(current).min(current);
                let resets = if used > 0 {
                    window::sliding_reset(w.kind, oldest_counted)
                } else {
                    req.now
                };
                admitted &= ok;
                states[i] = Some(WindowState::new(w.limit, used, resets, ok));
            }
            kind => {
                let (start, end) = window::calendar_period(kind, req.zone, req.now);
                let mut ok = !too_big;
                if ok && !peek && admitted {
                    // The charge: rolls the period over and adds, only if within the limit.
                    let update = "UPDATE vlv_counter SET used = (CASE WHEN period = ? THEN used ELSE 0 END) + ?, period = ? \
                                  WHERE ns = ? AND ckey = ? AND win = ? \
                                  AND ((CASE WHEN period = ? THEN used ELSE 0 END) + ? <= ? OR ? < 0)";
                    let params = || {
                        vec![
                            Value::Int(start),
                            Value::Int(req.amount),
                            Value::Int(start),
                            ns(),
                            key(),
                            win.clone(),
                            Value::Int(start),
                            Value::Int(req.amount),
                            Value::Int(w.limit),
                            Value::Int(w.limit),
                        ]
                    };
                    let mut n = tx.exec(update, params()).await?;
                    if n == 0 {
                        // No row yet (or over the limit): create it empty and try once more.
                        tx.exec(
                            &format!("{insert_ignore} INTO vlv_counter (ns, ckey, win, period, used) VALUES (?, ?, ?, ?, 0)"),
                            vec![ns(), key(), win.clone(), Value::Int(start)],
                        )
                        .await?;
                        n = tx.exec(update, params()).await?;
                    }
                    ok = n == 1;
                    charged[i] = ok;
                }
                let r = tx
                    .rows(
                        "SELECT used, period FROM vlv_counter WHERE ns = ? AND ckey = ? AND win = ?",
                        vec![ns(), key(), win.clone()],
                    )
                    .await?;
                let used = r.first().map_or(0, |row| {
                    if int(&row[1]) == start {
                        int(&row[0])
                    } else {
                        0
                    }
                });
                if peek || !admitted {
                    ok = ok && (w.limit < 0 || used + req.amount <= w.limit);
                }
                admitted &= ok;
                states[i] = Some(WindowState::new(w.limit, used, end, ok));
            }
        }
    }
    let mut windows: Vec<WindowState> = states
        .into_iter()
        .map(|s| s.expect("every window visited"))
        .collect();
    if !admitted {
        // The transaction is rolled back: report charged windows as they were before.
        for ((s, w), c) in windows.iter_mut().zip(&req.windows).zip(&charged) {
            if *c {
                *s = WindowState::new(w.limit, s.used - req.amount, s.resets_at, true);
            }
        }
    }
    Ok(Consumption { admitted, windows })
}
