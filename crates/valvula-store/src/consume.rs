//! The consumption algorithm, written once for both backends against [`Tx`]: many
//! consumptions in one transaction, in a constant number of statements.
//!
//! Calendar window: one row per (namespace, key, window) holding the current period and
//! its count. Sliding window: a head row in the same table, the buckets in `vlv_slide`.
//!
//! A batch first locks every counter row it may charge (on MySQL an upsert that changes
//! nothing but takes the row's exclusive lock, rows in one global order so two batches,
//! of this daemon or another, never deadlock; on SQLite the writer already holds the
//! database's write lock), then reads them, decides every consumption in arrival order
//! here, and writes the changed rows back in one statement. Nobody else can change a
//! locked row between the read and the write, so the decisions are exactly those of
//! running the consumptions one after another, and a batch of 200 costs the database
//! four statements and one commit instead of 200 transactions.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::window::{Consumption, Window, WindowKind, WindowState, Zone};
use super::{Dialect, Exec, Result, Value};

/// One key charged by a [`Request`].
#[derive(Clone, Debug)]
pub struct Part {
    pub key: String,
    pub amount: i64,
    pub windows: Vec<Window>,
}

/// A consumption: every part's windows are charged, or none (for a request that spans
/// several keys, e.g. a user's and its domain's policies).
#[derive(Clone, Debug)]
pub struct Request {
    pub ns: String,
    pub parts: Vec<Part>,
    pub now: i64,
    pub peek: bool,
    pub zone: Zone,
    /// `consume_once`: the token that makes a repeated charge a no-op.
    pub once: Option<String>,
    /// Writes made in the charge's transaction when it is admitted (not when refused,
    /// repeated or a peek): a module's accounting row, committed with its charge. Each
    /// is atomic on its own: a failing one is undone alone and does not undo the charge.
    pub then: Vec<super::Stmt>,
}

impl Request {
    /// Whether it charges anything (a peek or an amount of 0 does not).
    fn charges(&self) -> bool {
        !self.peek && self.parts.iter().any(|p| p.amount != 0)
    }
}

/// What a [`Request`] came to: admitted only if every part was admitted, and then every
/// part was charged. Each part's state says what its windows hold; for a refused request
/// they are the counts as they are (nothing charged), with `admitted` telling whether
/// that part alone would have been admitted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub admitted: bool,
    pub repeated: bool,
    pub parts: Vec<Consumption>,
    /// Rows each of the request's `then` statements changed, or its error; empty when
    /// they did not run.
    pub then: Vec<Result<u64>>,
}

impl Outcome {
    /// The outcome of a one-part request, as a [`Consumption`].
    pub fn single(self) -> Consumption {
        let mut c = self.parts.into_iter().next().unwrap_or(Consumption {
            admitted: false,
            windows: Vec::new(),
            repeated: false,
        });
        c.admitted = self.admitted;
        c.repeated = self.repeated;
        c
    }
}

/// The statements a backend runs inside its transaction.
pub(crate) trait Tx {
    /// Runs a statement: the rows it changed and the id an INSERT generated.
    async fn exec(&mut self, sql: &str, params: Vec<Value>) -> Result<Exec>;
    /// Runs a query, returns its rows.
    async fn rows(&mut self, sql: &str, params: Vec<Value>) -> Result<Vec<Vec<Value>>>;
    /// [`Tx::exec`] for the batch statements, whose text changes with the batch size (a
    /// backend may send them without preparing).
    async fn exec_bulk(&mut self, sql: &str, params: Vec<Value>) -> Result<u64> {
        self.exec(sql, params).await.map(|e| e.affected)
    }
    /// [`Tx::rows`] for the batch statements.
    async fn rows_bulk(&mut self, sql: &str, params: Vec<Value>) -> Result<Vec<Vec<Value>>> {
        self.rows(sql, params).await
    }
    /// Whether a statement that failed with `e` ended the whole transaction (InnoDB
    /// rolls it back on a deadlock; SQLite on a full disk or an OR ROLLBACK conflict):
    /// then nothing done so far in it stands, and the batch must fail or be retried.
    fn ended_by(&self, e: &super::StoreError) -> bool;
}

fn int(v: &Value) -> i64 {
    match v {
        Value::Int(i) => *i,
        Value::Float(f) => *f as i64,
        Value::Text(s) => s.parse().unwrap_or(0),
        _ => 0,
    }
}

/// Runs `stmt` at most once per `token` (in namespace `ns`), inside an open
/// transaction: the token is inserted first (on MySQL a concurrent transaction holding
/// the same token makes this one wait for its outcome), the statement runs only when the
/// token is new, and the token is taken back when the statement changed nothing (a
/// refused conditional update may be tried again). `None`: done before under `token`.
pub(crate) async fn exec_once<T: Tx>(
    tx: &mut T,
    dialect: Dialect,
    ns: &str,
    token: &str,
    now: i64,
    stmt: &super::Stmt,
) -> Result<Option<Exec>> {
    let ignore = match dialect {
        Dialect::Sqlite => "INSERT OR IGNORE",
        Dialect::Mysql => "INSERT IGNORE",
    };
    let fresh = tx
        .exec(
            &format!("{ignore} INTO vlv_once (ns, token, at) VALUES (?, ?, ?)"),
            vec![text(ns), text(token), Value::Int(now)],
        )
        .await?
        .affected
        == 1;
    if !fresh {
        return Ok(None);
    }
    let e = match tx.exec(&stmt.sql, stmt.params.clone()).await {
        Ok(e) => e,
        Err(err) => {
            // MySQL undid the failed statement only: take the token back too.
            let _ = tx
                .exec(
                    "DELETE FROM vlv_once WHERE ns = ? AND token = ?",
                    vec![text(ns), text(token)],
                )
                .await;
            return Err(err);
        }
    };
    if e.affected == 0 {
        tx.exec(
            "DELETE FROM vlv_once WHERE ns = ? AND token = ?",
            vec![text(ns), text(token)],
        )
        .await?;
    }
    Ok(Some(e))
}

/// Rows per statement: keeps every statement well under both backends' limits on
/// placeholders (SQLite 32766) and packet size.
const CHUNK: usize = 500;

type RowKey = (String, String, String);

/// `(?, ?, ?, ...)` repeated `n` times, each with `width` placeholders and `tail` after.
fn tuples(n: usize, width: usize, tail: &str) -> String {
    let one = format!("({}{tail})", vec!["?"; width].join(", "));
    vec![one; n].join(", ")
}

fn text(v: &str) -> Value {
    Value::Text(v.to_owned())
}

/// Decides and applies a batch of consumptions (and peeks) inside an open transaction,
/// as if they had run one after another in the given order. The caller commits.
pub(crate) async fn run_batch<T: Tx>(
    tx: &mut T,
    dialect: Dialect,
    reqs: &[Request],
) -> Result<Vec<Outcome>> {
    // Every counter row the batch reads, and those it may change (to lock first).
    let mut rows: BTreeSet<RowKey> = BTreeSet::new();
    let mut lock: BTreeSet<RowKey> = BTreeSet::new();
    let mut sliding = false;
    for r in reqs {
        let charges = r.charges();
        for p in &r.parts {
            for w in &p.windows {
                let k = (r.ns.clone(), p.key.clone(), w.kind.id());
                if charges {
                    lock.insert(k.clone());
                }
                rows.insert(k);
                sliding |= matches!(w.kind, WindowKind::Sliding(_));
            }
        }
    }
    if dialect == Dialect::Mysql && !lock.is_empty() {
        // Creates missing rows and takes the exclusive lock of existing ones, in primary
        // key order; `used = used` changes nothing.
        let lock: Vec<&RowKey> = lock.iter().collect();
        for part in lock.chunks(CHUNK) {
            let params = part
                .iter()
                .flat_map(|(n, k, w)| [text(n), text(k), text(w)])
                .collect();
            tx.exec_bulk(
                &format!(
                    "INSERT INTO vlv_counter (ns, ckey, win, period, used) VALUES {} \
                     ON DUPLICATE KEY UPDATE used = used",
                    tuples(part.len(), 3, ", 0, 0")
                ),
                params,
            )
            .await?;
        }
    }

    // (ns, key) pairs grouped by namespace, for `ns = ? AND ckey IN (...)` lookups.
    let mut keys: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (n, k, _) in &rows {
        keys.entry(n).or_default().insert(k);
    }
    let mut st = State::default();
    for (ns, ks) in &keys {
        let ks: Vec<&str> = ks.iter().copied().collect();
        for part in ks.chunks(CHUNK) {
            let mut params = vec![text(ns)];
            params.extend(part.iter().map(|k| text(k)));
            let marks = vec!["?"; part.len()].join(", ");
            for row in tx
                .rows_bulk(
                    &format!(
                        "SELECT ckey, win, period, used FROM vlv_counter WHERE ns = ? AND ckey IN ({marks})"
                    ),
                    params.clone(),
                )
                .await?
            {
                let k = (ns.to_string(), string(&row[0]), string(&row[1]));
                st.counters.insert(k, (int(&row[2]), int(&row[3])));
            }
            if sliding {
                for row in tx
                    .rows_bulk(
                        &format!(
                            "SELECT ckey, win, bucket, used FROM vlv_slide WHERE ns = ? AND ckey IN ({marks}) AND used > 0"
                        ),
                        params,
                    )
                    .await?
                {
                    let k = (ns.to_string(), string(&row[0]), string(&row[1]));
                    st.slides
                        .entry(k)
                        .or_default()
                        .insert(int(&row[2]), int(&row[3]));
                }
            }
        }
    }

    // consume_once tokens already charged (per namespace).
    let mut tokens: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for r in reqs {
        if let Some(t) = &r.once
            && r.charges()
        {
            tokens.entry(&r.ns).or_default().insert(t);
        }
    }
    let mut seen: BTreeSet<(String, String)> = BTreeSet::new();
    for (ns, ts) in &tokens {
        let ts: Vec<&str> = ts.iter().copied().collect();
        for part in ts.chunks(CHUNK) {
            let mut params = vec![text(ns)];
            params.extend(part.iter().map(|t| text(t)));
            let marks = vec!["?"; part.len()].join(", ");
            for row in tx
                .rows_bulk(
                    &format!("SELECT token FROM vlv_once WHERE ns = ? AND token IN ({marks})"),
                    params,
                )
                .await?
            {
                seen.insert((ns.to_string(), string(&row[0])));
            }
        }
    }

    let mut out = Vec::with_capacity(reqs.len());
    let mut new_tokens: Vec<(String, String, i64)> = Vec::new();
    for r in reqs {
        let once = r.once.as_ref().filter(|_| r.charges());
        let o = match once {
            Some(t) if seen.contains(&(r.ns.clone(), t.clone())) => {
                // Charged before: report the counts as they are, charge nothing.
                Outcome {
                    admitted: true,
                    repeated: true,
                    parts: look(r, &mut st, true),
                    then: Vec::new(),
                }
            }
            _ => {
                let o = decide_all(r, &mut st);
                if let Some(t) = once
                    && o.admitted
                {
                    seen.insert((r.ns.clone(), t.clone()));
                    new_tokens.push((r.ns.clone(), t.clone(), r.now));
                }
                o
            }
        };
        out.push(o);
    }
    for part in new_tokens.chunks(CHUNK) {
        let params = part
            .iter()
            .flat_map(|(n, t, at)| [text(n), text(t), Value::Int(*at)])
            .collect();
        let ignore = match dialect {
            Dialect::Sqlite => "INSERT OR IGNORE",
            Dialect::Mysql => "INSERT IGNORE",
        };
        let n = tx
            .exec_bulk(
                &format!(
                    "{ignore} INTO vlv_once (ns, token, at) VALUES {}",
                    tuples(part.len(), 3, "")
                ),
                params,
            )
            .await?;
        if n != part.len() as u64 {
            // Another daemon charged one of these tokens since the read above: decide
            // the batch again, now seeing it.
            return Err(super::StoreError::Conflict(
                "a consume_once token was charged concurrently".into(),
            ));
        }
    }

    if dialect == Dialect::Mysql {
        // A sliding window's head row (the row its batches lock) keeps, as its period,
        // when its last bucket expires: maintenance deletes heads past that.
        let heads: Vec<(RowKey, i64)> = st
            .dirty_buckets
            .iter()
            .map(|((k, _), expires)| (k.clone(), *expires))
            .collect();
        for (k, expires) in heads {
            let period = st.counters.get(&k).map_or(0, |c| c.0).max(expires);
            st.counters.insert(k.clone(), (period, 0));
            st.dirty.insert(k);
        }
    }

    // Write back what changed.
    let dirty: Vec<RowKey> = std::mem::take(&mut st.dirty).into_iter().collect();
    let upsert = match dialect {
        Dialect::Mysql => "ON DUPLICATE KEY UPDATE period = VALUES(period), used = VALUES(used)",
        Dialect::Sqlite => {
            "ON CONFLICT (ns, ckey, win) DO UPDATE SET period = excluded.period, used = excluded.used"
        }
    };
    for part in dirty.chunks(CHUNK) {
        let mut params = Vec::with_capacity(part.len() * 5);
        for k in part {
            let (period, used) = st.counters.get(k).copied().unwrap_or((0, 0));
            params.extend([
                text(&k.0),
                text(&k.1),
                text(&k.2),
                Value::Int(period),
                Value::Int(used),
            ]);
        }
        tx.exec_bulk(
            &format!(
                "INSERT INTO vlv_counter (ns, ckey, win, period, used) VALUES {} {upsert}",
                tuples(part.len(), 5, "")
            ),
            params,
        )
        .await?;
    }
    let buckets: Vec<((RowKey, i64), i64)> =
        std::mem::take(&mut st.dirty_buckets).into_iter().collect();
    let upsert = match dialect {
        Dialect::Mysql => "ON DUPLICATE KEY UPDATE used = VALUES(used), expires = VALUES(expires)",
        Dialect::Sqlite => {
            "ON CONFLICT (ns, ckey, win, bucket) DO UPDATE SET used = excluded.used, expires = excluded.expires"
        }
    };
    for part in buckets.chunks(CHUNK) {
        let mut params = Vec::with_capacity(part.len() * 6);
        for ((k, b), expires) in part {
            let used = st
                .slides
                .get(k)
                .and_then(|m| m.get(b))
                .copied()
                .unwrap_or(0);
            params.extend([
                text(&k.0),
                text(&k.1),
                text(&k.2),
                Value::Int(*b),
                Value::Int(used),
                Value::Int(*expires),
            ]);
        }
        tx.exec_bulk(
            &format!(
                "INSERT INTO vlv_slide (ns, ckey, win, bucket, used, expires) VALUES {} {upsert}",
                tuples(part.len(), 6, "")
            ),
            params,
        )
        .await?;
    }
    // The admitted charges' own writes, in the same transaction.
    for (r, o) in reqs.iter().zip(out.iter_mut()) {
        if r.then.is_empty() || !o.admitted || o.repeated || !r.charges() {
            continue;
        }
        for stmt in &r.then {
            match tx.exec(&stmt.sql, stmt.params.clone()).await {
                Ok(e) => o.then.push(Ok(e.affected)),
                // The whole transaction is in question or gone: the batch fails (or is
                // retried), never answered as charged.
                Err(e)
                    if e.is_outage()
                        || matches!(e, super::StoreError::Conflict(_))
                        || tx.ended_by(&e) =>
                {
                    return Err(e);
                }
                Err(e) => o.then.push(Err(e)),
            }
        }
    }
    Ok(out)
}

fn string(v: &Value) -> String {
    match v {
        Value::Text(s) => s.clone(),
        Value::Blob(b) => String::from_utf8_lossy(b).into_owned(),
        Value::Int(i) => i.to_string(),
        _ => String::new(),
    }
}

/// The counter rows of a batch as its earlier consumptions left them.
#[derive(Default)]
struct State {
    counters: HashMap<RowKey, (i64, i64)>,
    slides: HashMap<RowKey, BTreeMap<i64, i64>>,
    dirty: BTreeSet<RowKey>,
    /// Changed buckets, with their expiry.
    dirty_buckets: BTreeMap<(RowKey, i64), i64>,
}

/// What one admitted part changed, so a later refused part of the same request can take
/// it back. (A row left marked dirty is written back with its restored, unchanged value.)
#[derive(Default)]
struct Undo {
    counters: Vec<(RowKey, Option<(i64, i64)>)>,
    buckets: Vec<(RowKey, i64, Option<i64>)>,
}

impl Undo {
    fn apply(self, st: &mut State) {
        for (k, before) in self.counters.into_iter().rev() {
            match before {
                Some(v) => st.counters.insert(k, v),
                None => st.counters.remove(&k),
            };
        }
        for (k, b, before) in self.buckets.into_iter().rev() {
            let m = st.slides.entry(k).or_default();
            match before {
                Some(v) => m.insert(b, v),
                None => m.remove(&b),
            };
        }
    }
}

/// Every part as a peek (nothing charged): with `zero`, of amount 0 (the counts as they
/// are), else of its own amount (whether it alone would be admitted).
fn look(r: &Request, st: &mut State, zero: bool) -> Vec<Consumption> {
    r.parts
        .iter()
        .map(|p| {
            let p = Part {
                amount: if zero { 0 } else { p.amount },
                ..p.clone()
            };
            decide(&r.ns, &p, r.now, r.zone, true, st).0
        })
        .collect()
}

/// All parts of a request or none: a refused part takes back what the earlier parts
/// charged.
fn decide_all(r: &Request, st: &mut State) -> Outcome {
    let peek = !r.charges();
    let mut undo = Vec::with_capacity(r.parts.len());
    let mut parts = Vec::with_capacity(r.parts.len());
    for p in &r.parts {
        let (c, u) = decide(&r.ns, p, r.now, r.zone, peek, st);
        let refused = !c.admitted;
        parts.push(c);
        undo.push(u);
        if refused && !peek {
            for u in undo.into_iter().rev() {
                u.apply(st);
            }
            return Outcome {
                admitted: false,
                repeated: false,
                parts: look(r, st, false),
                then: Vec::new(),
            };
        }
    }
    Outcome {
        admitted: parts.iter().all(|c| c.admitted),
        repeated: false,
        parts,
        then: Vec::new(),
    }
}

/// One part against the rows as the earlier ones of the batch left them. A refused part
/// changes nothing; the window states it reports are those a transaction of its own
/// would have reported.
fn decide(
    ns: &str,
    part: &Part,
    now: i64,
    zone: Zone,
    peek: bool,
    st: &mut State,
) -> (Consumption, Undo) {
    let mut order: Vec<usize> = (0..part.windows.len()).collect();
    order.sort_by_key(|&i| part.windows[i].kind);
    let mut states: Vec<Option<WindowState>> = vec![None; part.windows.len()];
    let mut charged = vec![false; part.windows.len()];
    // A zero amount changes nothing: answer it as a peek.
    let peek = peek || part.amount == 0;
    let mut admitted = true;
    // Changes of this part, undone when a later window refuses it.
    let mut undo = Undo::default();

    for &i in &order {
        let w = part.windows[i];
        let k: RowKey = (ns.to_owned(), part.key.clone(), w.kind.id());
        // The amount alone is more than the limit.
        let too_big = w.limit >= 0 && part.amount > w.limit;
        match w.kind {
            WindowKind::Sliding(_) => {
                let (_, current, oldest) = w.kind.sliding_span(now).expect("sliding");
                let buckets = st.slides.get(&k);
                let counted = || {
                    buckets
                        .into_iter()
                        .flat_map(|m| m.range(oldest..))
                        .filter(|(_, u)| **u > 0)
                };
                // Saturating everywhere: a hostile amount of i64::MAX (a count of 2^64-1)
                // must refuse or fill a counter, never wrap it negative (unlimited).
                let sum: i64 = counted().fold(0i64, |a, (_, u)| a.saturating_add(*u));
                let first = counted().map(|(b, _)| *b).next();
                let ok = !too_big && (w.limit < 0 || sum.saturating_add(part.amount) <= w.limit);
                let mut used = sum;
                if ok && !peek && admitted {
                    let m = st.slides.entry(k.clone()).or_default();
                    let before = m.get(&current).copied();
                    undo.buckets.push((k.clone(), current, before));
                    let b = m.entry(current).or_insert(0);
                    *b = b.saturating_add(part.amount);
                    st.dirty_buckets.insert(
                        (k.clone(), current),
                        w.kind.sliding_reset(current).expect("sliding"),
                    );
                    used = used.saturating_add(part.amount);
                    charged[i] = true;
                }
                let oldest_counted = first.unwrap_or(current).min(current);
                let resets = if used > 0 {
                    w.kind.sliding_reset(oldest_counted).expect("sliding")
                } else {
                    now
                };
                admitted &= ok;
                states[i] = Some(WindowState::new(w.limit, used, resets, ok));
            }
            kind => {
                let (start, end) = kind.span(zone, now);
                let row = st.counters.get(&k).copied();
                let current = |row: Option<(i64, i64)>| match row {
                    Some((period, used)) if period == start => used,
                    _ => 0,
                };
                let mut ok = !too_big;
                if ok && !peek && admitted {
                    let now_used = current(row);
                    ok = w.limit < 0 || now_used.saturating_add(part.amount) <= w.limit;
                    if ok {
                        undo.counters.push((k.clone(), row));
                        st.counters
                            .insert(k.clone(), (start, now_used.saturating_add(part.amount)));
                        st.dirty.insert(k.clone());
                    }
                    charged[i] = ok;
                }
                let used = current(st.counters.get(&k).copied());
                if peek || !admitted {
                    ok = ok && (w.limit < 0 || used.saturating_add(part.amount) <= w.limit);
                }
                admitted &= ok;
                states[i] = Some(WindowState::new(w.limit, used, end, ok));
            }
        }
    }
    if !admitted {
        // Nothing of a refused part stays.
        std::mem::take(&mut undo).apply(st);
    }
    let mut windows: Vec<WindowState> = states
        .into_iter()
        .map(|s| s.expect("every window visited"))
        .collect();
    if !admitted {
        // Report charged windows as they were before.
        for ((s, w), c) in windows.iter_mut().zip(&part.windows).zip(&charged) {
            if *c {
                *s = WindowState::new(
                    w.limit,
                    s.used.saturating_sub(part.amount),
                    s.resets_at,
                    true,
                );
            }
        }
    }
    (
        Consumption {
            admitted,
            windows,
            repeated: false,
        },
        undo,
    )
}
