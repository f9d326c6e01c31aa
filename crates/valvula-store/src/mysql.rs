//! MySQL 8 / MariaDB 10.x through a connection pool (mysql_async, prepared statements
//! cached per connection). Consumptions and module writes go through lanes that group
//! them into one transaction each; InnoDB row locks make counting exact across daemons.
//!
//! A database that goes away must cost as little as possible, and never be mistaken
//! for a module's fault:
//! - every call has the storage timeout (`[storage] timeout`, well under the module
//!   timeout): a stalled server fails the call after it instead of holding the request
//!   for the whole module timeout;
//! - a call that finds a dead pooled connection (the server restarted) is tried once
//!   more on a fresh connection, so a restart of a fraction of a second costs nothing;
//! - while the server is away, calls fail at once, and a probe tries it every
//!   [`PROBE_EVERY`]: service returns within a fraction of a second of the server's;
//! - a transaction whose time ran out before its COMMIT was sent is rolled back (its
//!   connection is dropped); one whose COMMIT went out is waited for, since it may
//!   already be kept, and its callers get its real outcome.

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, OptsBuilder, Params, Pool, PoolConstraints, PoolOpts, TxOpts};
use tokio::time::Instant;

use super::consume::{self, Outcome, Tx};
use super::outage::Outage;
use super::window::Zone;
use super::{Dialect, Engine, Exec, Expire, Result, Rows, Stmt, StoreError, Value};
use crate::sync::Unpoisoned;
use crate::sync::{Answer, Promise, Waited};

const HOST_SCHEMA: &str = include_str!("../../../sql/mysql/host.sql");
/// Deadlocks, lock-wait timeouts and Galera's certification conflicts (error 1213 too:
/// two nodes changed one row at once, the later transaction is rolled back) are retried
/// for this long, and at least [`CONFLICT_TRIES`] times, within the storage timeout. Two
/// Galera nodes charging the same senders conflict often: five fixed tries (124 ms)
/// failed whole batches as busy. A conflict that never clears (a trigger raising 1213, a
/// lock held for good) must not hold every request for the whole storage timeout either.
const CONFLICT_BUDGET: Duration = Duration::from_millis(600);
/// On a loaded machine one try can take a good part of [`CONFLICT_BUDGET`]; a node that
/// lost a few certifications in a row must still get this many chances before its
/// batch is answered as busy (CI saw 63 of 320 requests deferred on 0.6 s alone). Not
/// for a lock wait timeout (1205): each of those tries has already waited its second.
const CONFLICT_TRIES: usize = 8;

/// Whether conflict retry `tries` (from 1) may run after `e`.
fn conflict_retry(started: Instant, tries: usize, e: &StoreError) -> bool {
    let lock_wait = matches!(e, StoreError::Sql(m) if m.ends_with("(1205)"));
    (tries <= CONFLICT_TRIES && !lock_wait) || started.elapsed() < CONFLICT_BUDGET
}

/// The pause before conflict retry `n` (from 1): at once (up to 1 ms), then 4, 8, 16,
/// 32, then 64 ms, each with up to as much again at random, so that two daemons which
/// conflicted once do not keep meeting in step. The first retry does not wait: the node
/// that lost has just seen the winner's commit, and a pause would hand the row to the
/// winner's next batch too (one node starved the other that way).
fn conflict_pause(n: usize) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()));
    if n <= 1 {
        return Duration::from_micros(nanos % 1000);
    }
    let base = 2u64 << n.min(5);
    Duration::from_millis(base + nanos % (base + 1))
}

/// While the database is away: how often the probe tries it, and how long one try may
/// take.
const PROBE_EVERY: Duration = Duration::from_millis(200);
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a call that ran out of time waits to learn whether the database is there.
const ALIVE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the outcome of a COMMIT that went out is waited for before its callers are
/// told it is unknown.
const IN_DOUBT_MAX: Duration = Duration::from_secs(30);
/// How long a module's schema change may take.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(600);
/// How long startup (and `valvulad -t`) waits for the host tables and the zone check.
const PREPARE_WAIT: Duration = Duration::from_secs(30);
/// How long to wait before building an index again after the table was in use.
const INDEX_RETRY: Duration = Duration::from_secs(30);

/// Consumption lanes: a key always goes to the same lane, so this daemon's batches
/// never wait on each other's row locks; several lanes keep the database busy while one
/// waits for its commit.
const LANES: usize = 4;
/// Consumptions one lane decides in one transaction at most.
const MAX_BATCH: usize = 256;
/// How long a lane waits for its batch before it starts the next one.
const LANE_PATIENCE: Duration = Duration::from_millis(250);

pub struct Mysql {
    shared: Arc<Shared>,
    runtime: tokio::runtime::Handle,
    lanes: Vec<tokio::sync::mpsc::UnboundedSender<Work>>,
}

/// The pool in use and its generation: after an outage the pool is replaced (its idle
/// connections are dead), once per generation however many calls notice.
struct Pooled {
    generation: u64,
    pool: Pool,
}

/// What the calling threads, the lane tasks and the probe share.
struct Shared {
    opts: Opts,
    pool: Mutex<Pooled>,
    schema_ready: AtomicBool,
    /// A task is preparing the database, and what its last try met.
    preparing: AtomicBool,
    /// The index housekeeping deletes by exists (until then it waits).
    index_ready: AtomicBool,
    prepare_error: Mutex<Option<StoreError>>,
    /// Record this daemon's zone in a database that has none (not for tools).
    record_zone: bool,
    /// A check: the host's tables are looked at, not created (nor their index).
    check: bool,
    outage: Outage,
    probing: AtomicBool,
    timeout: Duration,
    zone: Zone,
    /// Set for good when the database belongs to differently configured daemons.
    refused: Mutex<Option<StoreError>>,
    runtime: tokio::runtime::Handle,
    /// Conflicts given up on ([`Shared::busy`]).
    conflict_log: crate::RateLog,
}

fn err(e: mysql_async::Error) -> StoreError {
    match e {
        // The server cannot serve now: going away, refusing connections or this account
        // (limits, password, privileges, host), read-only (failover, maintenance), full,
        // a cluster node not ready, a statement killed or past its time. An outage, not
        // a bad call: the module must not be quarantined for it.
        mysql_async::Error::Server(s)
            if matches!(
                s.code,
                1021 | 1040
                    | 1044
                    | 1045
                    | 1047
                    | 1053
                    | 1077
                    | 1114
                    | 1129
                    | 1130
                    | 1142
                    | 1180
                    | 1203
                    | 1226
                    | 1290
                    | 1317
                    | 1836
                    | 1927
                    | 1969
                    | 4031
            ) =>
        {
            StoreError::Unavailable(format!("{} ({})", s.message, s.code))
        }
        // Charset and collation mismatches, values out of a column's range or too long:
        // the data's fault (a sender in a script a latin1 table cannot hold).
        mysql_async::Error::Server(s)
            if matches!(
                s.code,
                1264 | 1265 | 1267 | 1270 | 1271 | 1292 | 1366 | 1406 | 1690
            ) =>
        {
            StoreError::Data(format!("{} ({})", s.message, s.code))
        }
        mysql_async::Error::Server(s) => StoreError::Sql(format!("{} ({})", s.message, s.code)),
        other => StoreError::Unavailable(other.to_string()),
    }
}

/// Runs a schema change. While it waits for the table's metadata lock (held by a
/// transaction open elsewhere: an operator's, another daemon's), every statement on the
/// table queues behind it, on every daemon: so it waits a second at most, then leaves
/// the table to the others for a few seconds before it tries again.
async fn schema_change(c: &mut Conn, s: Stmt) -> Result<()> {
    loop {
        c.query_drop("SET SESSION lock_wait_timeout = 1")
            .await
            .map_err(err)?;
        let r = c.exec_drop(s.sql.as_str(), params(s.params.clone())).await;
        c.query_drop("SET SESSION lock_wait_timeout = DEFAULT")
            .await
            .map_err(err)?;
        match r {
            Err(mysql_async::Error::Server(e)) if e.code == 1205 => {
                tracing::warn!(target: crate::LOG_TARGET,
                    "schema change waiting for a table in use by another transaction (tried again in 4 s): {}",
                    s.sql
                );
                tokio::time::sleep(Duration::from_secs(4)).await;
            }
            r => return r.map_err(err),
        }
    }
}

fn retryable(e: &StoreError) -> bool {
    matches!(e, StoreError::Conflict(_))
        || matches!(e, StoreError::Sql(m) if m.ends_with("(1213)") || m.ends_with("(1205)"))
}

fn to_my(v: Value) -> mysql_async::Value {
    use mysql_async::Value as V;
    match v {
        Value::Null => V::NULL,
        Value::Int(i) => V::Int(i),
        Value::Float(f) => V::Double(f),
        Value::Text(s) => V::Bytes(s.into_bytes()),
        Value::Blob(b) => V::Bytes(b),
    }
}

fn from_my(v: mysql_async::Value) -> Value {
    use mysql_async::Value as V;
    match v {
        V::NULL => Value::Null,
        V::Int(i) => Value::Int(i),
        V::UInt(u) => Value::Int(u as i64),
        V::Float(f) => Value::Float(f as f64),
        V::Double(f) => Value::Float(f),
        V::Bytes(b) => match String::from_utf8(b) {
            Ok(s) => Value::Text(s),
            Err(e) => Value::Blob(e.into_bytes()),
        },
        V::Date(y, mo, d, h, mi, s, us) => Value::Text(if us == 0 {
            format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}")
        } else {
            format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}.{us:06}")
        }),
        V::Time(neg, d, h, mi, s, _) => {
            let h = d * 24 + h as u32;
            Value::Text(format!(
                "{}{h:02}:{mi:02}:{s:02}",
                if neg { "-" } else { "" }
            ))
        }
    }
}

/// The statements of a schema file: comment lines dropped, split at `;`.
fn schema_statements(text: &str) -> Vec<String> {
    let code: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    code.split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

fn params(p: Vec<Value>) -> Params {
    if p.is_empty() {
        Params::Empty
    } else {
        Params::Positional(p.into_iter().map(to_my).collect())
    }
}

async fn query_rows<Q: Queryable>(q: &mut Q, sql: &str, p: Vec<Value>) -> Result<Rows> {
    let mut result = q.exec_iter(sql, params(p)).await.map_err(err)?;
    let columns: Vec<String> = result
        .columns_ref()
        .iter()
        .map(|c| c.name_str().into_owned())
        .collect();
    let rows: Vec<mysql_async::Row> = result.collect().await.map_err(err)?;
    Ok(Rows {
        columns,
        rows: rows
            .into_iter()
            .map(|r| r.unwrap().into_iter().map(from_my).collect())
            .collect(),
    })
}

struct MyTx<'a, 'c>(&'a mut mysql_async::Transaction<'c>);

impl Tx for MyTx<'_, '_> {
    fn ended_by(&self, e: &StoreError) -> bool {
        // A deadlock rolls the whole transaction back; a lock wait timeout only the
        // statement, but the batch is retried for it all the same.
        retryable(e)
    }
    async fn exec(&mut self, sql: &str, p: Vec<Value>) -> Result<Exec> {
        self.0.exec_drop(sql, params(p)).await.map_err(err)?;
        Ok(Exec {
            affected: self.0.affected_rows(),
            last_insert_id: self.0.last_insert_id().unwrap_or(0) as i64,
        })
    }
    async fn rows(&mut self, sql: &str, p: Vec<Value>) -> Result<Vec<Vec<Value>>> {
        query_rows(self.0, sql, p).await.map(|r| r.rows)
    }
    /// Sent as text with the values written in: a statement whose text changes with the
    /// batch size would be prepared anew (one more round trip) nearly every time.
    async fn exec_bulk(&mut self, sql: &str, p: Vec<Value>) -> Result<u64> {
        self.0.query_drop(inline(sql, p)?).await.map_err(err)?;
        Ok(self.0.affected_rows())
    }
    async fn rows_bulk(&mut self, sql: &str, p: Vec<Value>) -> Result<Vec<Vec<Value>>> {
        let rows: Vec<mysql_async::Row> = self.0.query(inline(sql, p)?).await.map_err(err)?;
        Ok(rows
            .into_iter()
            .map(|r| r.unwrap().into_iter().map(from_my).collect())
            .collect())
    }
}

/// Writes the values into the host's own batch statements. Injection-proof by
/// construction: integers as digits, every string as a hex literal (`X'...'`, only hex
/// digits between the quotes), and the statement text itself is the host's, with no
/// `?` inside a literal.
fn inline(sql: &str, p: Vec<Value>) -> Result<String> {
    use std::fmt::Write;
    let mut out = String::with_capacity(sql.len() + p.len() * 24);
    let mut values = p.into_iter();
    for (i, part) in sql.split('?').enumerate() {
        if i > 0 {
            match values.next() {
                Some(Value::Int(n)) => write!(out, "{n}").expect("write to String"),
                Some(Value::Null) => out.push_str("NULL"),
                Some(Value::Text(t)) => hex(&mut out, t.as_bytes()),
                Some(Value::Blob(b)) => hex(&mut out, &b),
                Some(Value::Float(_)) | None => {
                    return Err(StoreError::Invalid(
                        "internal: a batch statement's values do not match its placeholders".into(),
                    ));
                }
            }
        }
        out.push_str(part);
    }
    Ok(out)
}

fn hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
    out.push_str("X'");
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 15) as usize] as char);
    }
    out.push('\'');
}

/// What identifies the row a write touches, as far as its text tells: the first value
/// its WHERE clause compares (`... WHERE id = ?`, `WHERE policy = ? AND identity = ?`),
/// else the first value it inserts (`INSERT ... VALUES (?, ...)`): the leading column of
/// the row's key in the statements modules write. The values a statement adds
/// (sizes, counts) are left out: they change with every request.
fn row_key(s: &Stmt) -> String {
    let upper = s.sql.to_ascii_uppercase();
    let at = upper
        .match_indices("WHERE")
        .map(|(i, _)| i)
        .find(|&i| {
            let before = upper[..i].chars().next_back();
            let after = upper[i + 5..].chars().next();
            !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
                && !after.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        })
        .unwrap_or(0);
    let skip = s.sql[..at].matches('?').count();
    let first = s.params.get(skip).or(s.params.first());
    let table = upper
        .split_whitespace()
        .skip_while(|w| !matches!(*w, "INTO" | "UPDATE" | "FROM"))
        .nth(1)
        .unwrap_or("");
    format!("{table}{first:?}")
}

fn hash_of(h: impl Hash) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    h.hash(&mut hasher);
    hasher.finish()
}

/// Blocks the calling (module) thread until `rx` is answered.
fn block<T>(f: impl FnOnce() -> T) -> T {
    // On a runtime thread (a NONBLOCKING module, or startup code in an async context)
    // hand the thread's other work away while waiting.
    if tokio::runtime::Handle::try_current().is_ok() {
        tokio::task::block_in_place(f)
    } else {
        f()
    }
}

type BoxFut<'c, T> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<T>> + Send + 'c>>;

impl Shared {
    /// A conflict still there after [`CONFLICT_BUDGET`]: the database is busy (not a
    /// fault of the call, and no outage either), logged at most once a second with the
    /// database's own error, since the requests' answers only say "unavailable".
    fn busy(&self, e: StoreError) -> StoreError {
        if !retryable(&e) {
            return e;
        }
        if let Some(more) = self.conflict_log.allow() {
            tracing::warn!(
                target: crate::LOG_TARGET,
                "a transaction still conflicted after {CONFLICT_TRIES} tries and {} ms, answered \
                 as busy: {e} ({more} more since the last line)",
                CONFLICT_BUDGET.as_millis()
            );
        }
        StoreError::Busy(e.to_string())
    }

    fn pool(&self) -> (u64, Pool) {
        let p = self.pool.locked();
        (p.generation, p.pool.clone())
    }

    /// Replaces the pool of `generation` (its connections are dead); a no-op when
    /// another caller already did.
    fn renew_pool(&self, generation: u64) {
        let mut p = self.pool.locked();
        if p.generation != generation {
            return;
        }
        let _guard = self.runtime.enter();
        let old = std::mem::replace(&mut p.pool, Pool::new(self.opts.clone()));
        p.generation += 1;
        self.runtime.spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), old.disconnect()).await;
        });
    }

    /// Why the database refuses this daemon for good (another calendar zone), if it does.
    fn refusal(&self) -> Option<StoreError> {
        self.refused.locked().clone()
    }

    /// While the database is away (or refuses this daemon), fails at once.
    fn fail_fast(&self) -> Result<()> {
        if let Some(e) = self.refusal() {
            return Err(e);
        }
        if self.outage.is_down()
            && let Some(d) = self.outage.refused("still away (a probe retries it)")
        {
            return Err(StoreError::Unavailable(format!(
                "database away for {:.1} s",
                d.as_secs_f64()
            )));
        }
        Ok(())
    }

    /// Records how a call went: an outage starts the probe. Only a write that succeeds
    /// (or the probe's) ends an outage: reads may work while writes do not (a
    /// read-only server).
    fn record<T>(self: &Arc<Self>, r: &Result<T>, write: bool) {
        match r {
            Err(StoreError::Unavailable(m)) | Err(StoreError::InDoubt(m))
                if self.outage.failed(m) =>
            {
                let (generation, _) = self.pool();
                self.renew_pool(generation);
                self.start_probe();
            }
            Err(StoreError::Refused(m)) => {
                self.outage.failed(m);
            }
            Ok(_) if write => self.outage.ok(),
            _ => {}
        }
    }

    /// What a call that ran out of time met: if a connection of its own answers at once,
    /// the database is up and the call waited on a lock (another daemon's or an
    /// operator's transaction) or a slow statement, which is no outage; else the
    /// database is away.
    async fn timed_out(&self, what: &str) -> StoreError {
        // A pooled connection answers at once when the server is merely busy; a fresh
        // one tells a server that restarted (its pooled connections dead) from one that
        // is away. Either answering means it is there: a loaded server must not be taken
        // for an outage, which fails every key for a moment.
        let opts = self.opts.clone();
        let (_, pool) = self.pool();
        let pooled = async move {
            let mut c = pool.get_conn().await?;
            c.query_drop("SELECT 1").await
        };
        let fresh = async move {
            let mut c = Conn::new(opts).await?;
            c.query_drop("SELECT 1").await?;
            c.disconnect().await
        };
        let either = async {
            tokio::pin!(pooled, fresh);
            let (mut pooled_failed, mut fresh_failed) = (false, false);
            loop {
                tokio::select! {
                    r = &mut pooled, if !pooled_failed => match r {
                        Ok(()) => return true,
                        Err(_) => pooled_failed = true,
                    },
                    r = &mut fresh, if !fresh_failed => match r {
                        Ok(()) => return true,
                        Err(_) => fresh_failed = true,
                    },
                    else => return false,
                }
            }
        };
        let alive = tokio::time::timeout(ALIVE_TIMEOUT.min(self.timeout), either)
            .await
            .unwrap_or(false);
        match alive {
            true => StoreError::Busy(format!(
                "{what} within {:?} (storage timeout), the database answering: a lock held by another transaction, or a slow statement",
                self.timeout
            )),
            false => StoreError::Unavailable(format!(
                "{what} within {:?} (storage timeout)",
                self.timeout
            )),
        }
    }

    /// Tries the database every [`PROBE_EVERY`] until it answers; then calls go
    /// through again.
    fn start_probe(self: &Arc<Self>) {
        if self.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        self.runtime.spawn(async move {
            loop {
                tokio::time::sleep(PROBE_EVERY).await;
                if !me.outage.is_down() {
                    me.probing.store(false, Ordering::Release);
                    // A new outage that began while this probe was ending found it
                    // still running and started none: go on probing for it.
                    if me.outage.is_down() && !me.probing.swap(true, Ordering::AcqRel) {
                        continue;
                    }
                    return;
                }
                let (_, pool) = me.pool();
                let write = me.schema_ready.load(Ordering::Acquire);
                let ok = tokio::time::timeout(PROBE_TIMEOUT.min(me.timeout), async {
                    let mut c = pool.get_conn().await?;
                    c.query_drop("SELECT 1").await?;
                    // A write that changes nothing: a read-only server is still away.
                    if write {
                        c.exec_drop(
                            "UPDATE vlv_meta SET value = value WHERE name = ?",
                            ("time_zone",),
                        )
                        .await?;
                    }
                    Ok::<(), mysql_async::Error>(())
                })
                .await;
                if let Ok(Ok(())) = ok {
                    me.outage.ok();
                }
            }
        });
    }

    /// Whether calls may go ahead: the host tables exist and the database's calendar
    /// zone agrees. The first call starts the preparation on a task of its own, without
    /// the storage timeout (an index on the large table of an older version takes
    /// minutes), and calls fail as busy meanwhile rather than wait for it.
    fn ready(self: &Arc<Self>) -> Result<()> {
        if self.schema_ready.load(Ordering::Acquire) {
            if !self.index_ready.load(Ordering::Acquire)
                && !self.preparing.swap(true, Ordering::AcqRel)
            {
                let me = self.clone();
                self.runtime.spawn(async move { me.prepare().await });
            }
            return Ok(());
        }
        if let Some(e) = self.refusal() {
            return Err(e);
        }
        if !self.preparing.swap(true, Ordering::AcqRel) {
            let me = self.clone();
            self.runtime.spawn(async move { me.prepare().await });
        }
        match self.prepare_error.locked().clone() {
            // The last try could not reach the database: it is away, not busy.
            Some(e @ StoreError::Unavailable(_)) => Err(e),
            _ => Err(StoreError::Busy(
                "the database is being prepared (host tables and indexes)".into(),
            )),
        }
    }

    /// [`Shared::ready`], waiting up to `wait` for a preparation under way (startup,
    /// `valvulad -t`).
    async fn wait_ready(self: &Arc<Self>, wait: Duration) -> Result<()> {
        self.wait_ready_until(Instant::now() + wait).await
    }

    /// [`Shared::ready`], waiting until `end` for a preparation under way: the tables
    /// and the zone check take milliseconds, so a call made at start waits for them.
    async fn wait_ready_until(self: &Arc<Self>, end: Instant) -> Result<()> {
        loop {
            match self.ready() {
                Err(StoreError::Busy(m)) if Instant::now() >= end => {
                    return Err(StoreError::Busy(m));
                }
                Err(StoreError::Busy(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
                r => return r,
            }
        }
    }

    /// Creates the host tables, checks (and, for a daemon, records) the database's
    /// calendar zone, then builds the indexes housekeeping needs; retried until done or
    /// refused. Calls go ahead as soon as the tables and the zone are settled: an index
    /// on the large table of an older version takes minutes, and counting needs none.
    async fn prepare(self: Arc<Self>) {
        let log = crate::RateLog::default();
        loop {
            let r = self.prepare_once().await;
            *self.prepare_error.locked() = r.as_ref().err().cloned();
            match r {
                Ok(()) => break,
                Err(e @ StoreError::Refused(_)) => {
                    tracing::error!(target: crate::LOG_TARGET, "{e}");
                    *self.refused.locked() = Some(e);
                    break;
                }
                Err(e) if self.schema_ready.load(Ordering::Acquire) => {
                    // Only the index is left; counting goes on without it. Each try may
                    // hold the table for a second.
                    tracing::warn!(target: crate::LOG_TARGET,
                        "cannot build index vlv_counter_expiry yet (tried again in 30 s): {e}"
                    );
                    tokio::time::sleep(INDEX_RETRY).await;
                }
                Err(e) => {
                    if log.allow().is_some() {
                        tracing::warn!(target: crate::LOG_TARGET,
                            "cannot prepare the database yet (tried again each second): {e}"
                        );
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        self.preparing.store(false, Ordering::Release);
    }

    async fn prepare_once(&self) -> Result<()> {
        let (_, pool) = self.pool();
        let mut conn = tokio::time::timeout(self.timeout, pool.get_conn())
            .await
            .map_err(|_| {
                StoreError::Unavailable(format!(
                    "no connection within {:?} (storage timeout)",
                    self.timeout
                ))
            })?
            .map_err(err)?;
        if self.check {
            // The zone stored by a daemon, if any daemon created the tables yet.
            let stored: Option<String> = conn
                .exec_first("SELECT value FROM vlv_meta WHERE name = ?", ("time_zone",))
                .await
                .unwrap_or_default();
            if stored.is_none() {
                tracing::info!(target: crate::LOG_TARGET,
                    "no valvula tables in this database yet: valvulad creates them at its first start"
                );
            }
            super::agree_on_zone(stored.as_deref(), self.zone)?;
            self.schema_ready.store(true, Ordering::Release);
            self.index_ready.store(true, Ordering::Release);
            return Ok(());
        }
        if !self.schema_ready.load(Ordering::Acquire) {
            for stmt in schema_statements(HOST_SCHEMA) {
                conn.query_drop(stmt).await.map_err(err)?;
            }
            if self.record_zone {
                conn.exec_drop(
                    "INSERT IGNORE INTO vlv_meta (name, value) VALUES (?, ?)",
                    ("time_zone", self.zone.name()),
                )
                .await
                .map_err(err)?;
            }
            let stored: Option<String> = conn
                .exec_first("SELECT value FROM vlv_meta WHERE name = ?", ("time_zone",))
                .await
                .map_err(err)?;
            super::agree_on_zone(stored.as_deref(), self.zone)?;
            self.schema_ready.store(true, Ordering::Release);
        }
        // MySQL 8 has no CREATE INDEX IF NOT EXISTS: look first. (Tables made by
        // versions before the index.)
        let have: Option<i64> = conn
            .exec_first(
                "SELECT COUNT(*) FROM information_schema.statistics WHERE table_schema = DATABASE() \
                 AND table_name = ? AND index_name = ?",
                ("vlv_counter", "vlv_counter_expiry"),
            )
            .await
            .map_err(err)?;
        if have.unwrap_or(0) == 0 {
            tracing::info!(target: crate::LOG_TARGET,
                "creating index vlv_counter_expiry (on a large table this takes a while; counting goes on meanwhile)"
            );
            // While the index waits for the table's metadata lock (a transaction open
            // elsewhere holds it), every statement on the table queues behind it: give
            // up after a second and try again later rather than stall the counting.
            conn.query_drop("SET SESSION lock_wait_timeout = 1")
                .await
                .map_err(err)?;
            let r = conn
                .query_drop("CREATE INDEX vlv_counter_expiry ON vlv_counter (win, period)")
                .await;
            conn.query_drop("SET SESSION lock_wait_timeout = DEFAULT")
                .await
                .map_err(err)?;
            r.map_err(|e| self.busy(err(e)))?;
            tracing::info!(target: crate::LOG_TARGET, "index vlv_counter_expiry created");
        }
        self.index_ready.store(true, Ordering::Release);
        Ok(())
    }

    /// Runs `f` on a pooled connection within the storage timeout, once more on a fresh
    /// connection when the first one turned out dead, deadlocks retried while time is
    /// left. `write`: whether its success shows the database takes writes again.
    async fn attempt<T>(
        self: &Arc<Self>,
        write: bool,
        timeout: Duration,
        f: impl Fn(&mut Conn) -> BoxFut<'_, T>,
    ) -> Result<T> {
        self.fail_fast()?;
        let started = Instant::now();
        let deadline = started + timeout;
        let mut fresh = false;
        let mut conflicts = 0;
        let r = loop {
            let (generation, pool) = self.pool();
            let r = match tokio::time::timeout_at(deadline, async {
                self.wait_ready_until(deadline).await?;
                let mut conn = pool.get_conn().await.map_err(err)?;
                f(&mut conn).await
            })
            .await
            {
                Ok(r) => r,
                Err(_) => Err(self.timed_out("no answer").await),
            };
            let time_left = Instant::now() < deadline;
            match r {
                Err(StoreError::Unavailable(_)) if !fresh && time_left => {
                    // Perhaps a connection the server closed when it restarted.
                    fresh = true;
                    self.renew_pool(generation);
                }
                Err(e)
                    if retryable(&e) && conflict_retry(started, conflicts + 1, &e) && time_left =>
                {
                    conflicts += 1;
                    tokio::time::sleep(conflict_pause(conflicts)).await;
                }
                r => break r.map_err(|e| self.busy(e)),
            }
        };
        self.record(&r, write);
        r
    }

    /// One try of a lane's transaction: the statements within the storage timeout (or
    /// they are rolled back), then the COMMIT, whose outcome is waited for.
    async fn lane_once(
        self: &Arc<Self>,
        batch: &LaneBatch,
        deadline: Instant,
    ) -> Result<LaneResults> {
        let (generation, pool) = self.pool();
        let committing = AtomicBool::new(false);
        let work = async {
            self.wait_ready_until(deadline).await?;
            let mut conn = pool.get_conn().await.map_err(err)?;
            let mut tx = conn
                .start_transaction(TxOpts::default())
                .await
                .map_err(err)?;
            let mut writes = Vec::with_capacity(batch.writes.len());
            for w in &batch.writes {
                let r = match w {
                    Write::Exec(stmt) => MyTx(&mut tx)
                        .exec(&stmt.sql, stmt.params.clone())
                        .await
                        .map(Some),
                    Write::Once {
                        ns,
                        token,
                        now,
                        stmt,
                    } => {
                        consume::exec_once(
                            &mut MyTx(&mut tx),
                            Dialect::Mysql,
                            ns,
                            token,
                            *now,
                            stmt,
                        )
                        .await
                    }
                };
                match r {
                    Err(e) if retryable(&e) || e.is_outage() => return Err(e),
                    r => writes.push(r),
                }
            }
            let consumed = if batch.consumes.is_empty() {
                Vec::new()
            } else {
                consume::run_batch(&mut MyTx(&mut tx), Dialect::Mysql, &batch.consumes).await?
            };
            committing.store(true, Ordering::Release);
            tx.commit().await.map_err(|e| match err(e) {
                // The server said no: nothing was kept.
                e @ (StoreError::Sql(_) | StoreError::Data(_)) => e,
                // The connection broke after COMMIT went out: kept or not, nobody knows.
                other => StoreError::InDoubt(other.to_string()),
            })?;
            Ok(LaneResults { writes, consumed })
        };
        // `None`: the time ran out before the COMMIT; the transaction (with the future
        // that holds it) is dropped at the end of this block, which rolls it back
        // before anything else happens.
        let ended = {
            let mut work = std::pin::pin!(work);
            tokio::select! {
                r = &mut work => Some(r),
                () = tokio::time::sleep_until(deadline) => {
                    if committing.load(Ordering::Acquire) {
                        // A COMMIT still unanswered at the batch's deadline: away, or only
                        // slow (a loaded server; the COMMIT may have gone out just before
                        // the deadline). Asked as for any call that ran out of time, so a
                        // slow COMMIT never fails every other key as an outage would.
                        let what = format!(
                            "no answer to a COMMIT within {:?} (storage timeout)",
                            self.timeout
                        );
                        if let e @ StoreError::Unavailable(_) = self.timed_out(&what).await {
                            tracing::warn!(target: crate::LOG_TARGET,
                                jobs = batch.writes.len() + batch.consumes.len(),
                                "the database stopped answering after a COMMIT went out; waiting for its outcome"
                            );
                            // Other calls fail at once and the probe watches for it.
                            self.record::<()>(&Err(e), true);
                        }
                        let r = tokio::time::timeout(IN_DOUBT_MAX, work).await.unwrap_or_else(|_| {
                            Err(StoreError::InDoubt(format!(
                                "no answer to a COMMIT within {IN_DOUBT_MAX:?}"
                            )))
                        });
                        if r.is_err() {
                            self.renew_pool(generation);
                        }
                        Some(r)
                    } else {
                        None
                    }
                }
            }
        };
        let r = match ended {
            Some(r) => r,
            None => Err(self.timed_out("transaction rolled back: no answer").await),
        };
        if let Err(e @ StoreError::InDoubt(_)) = &r {
            tracing::error!(target: crate::LOG_TARGET,
                jobs = batch.writes.len() + batch.consumes.len(),
                "{e}: the requests were answered with the on-error action, their charges may have been kept"
            );
        }
        r
    }

    /// Runs a batch of writes and consumptions in one transaction, retrying the whole
    /// batch on deadlock (InnoDB rolled all of it back) and once on a dead connection. A
    /// write's own failure (a constraint, say) undoes only that statement, as MySQL
    /// does, and is its answer.
    async fn run_lane_batch(
        self: &Arc<Self>,
        batch: &LaneBatch,
        deadline: Instant,
    ) -> Result<LaneResults> {
        let started = Instant::now();
        let mut attempt = 0;
        let mut fresh = false;
        loop {
            self.fail_fast()?;
            let (generation, _) = self.pool();
            let r = self.lane_once(batch, deadline).await;
            let time_left = Instant::now() < deadline;
            match r {
                Err(e)
                    if retryable(&e) && conflict_retry(started, attempt + 1, &e) && time_left =>
                {
                    attempt += 1;
                    tokio::time::sleep(conflict_pause(attempt)).await;
                }
                Err(StoreError::Unavailable(_)) if !fresh && time_left => {
                    fresh = true;
                    self.renew_pool(generation);
                }
                r => {
                    let r = r.map_err(|e| self.busy(e));
                    self.record(&r, true);
                    return r;
                }
            }
        }
    }
}

/// A module write that a lane may group with others into one transaction.
#[derive(Clone, Debug)]
enum Write {
    Exec(Stmt),
    Once {
        ns: String,
        token: String,
        now: i64,
        stmt: Stmt,
    },
}

/// Work sent to a lane, with where its answer goes and when its caller stops waiting
/// for it to start.
enum Work {
    Consume(consume::Request, Promise<Result<Outcome>>, Instant),
    Write(Write, Promise<Result<Option<Exec>>>, Instant),
}

impl Work {
    /// Takes the job up; false when its caller already gave up waiting.
    fn claim(&self) -> bool {
        match self {
            Work::Consume(_, p, _) => p.claim(),
            Work::Write(_, p, _) => p.claim(),
        }
    }

    fn deadline(&self) -> Instant {
        match self {
            Work::Consume(.., d) | Work::Write(.., d) => *d,
        }
    }
}

/// What one lane transaction runs: writes first (in arrival order), then the
/// consumptions as one batch.
struct LaneBatch {
    writes: Vec<Write>,
    consumes: Vec<consume::Request>,
}

struct LaneResults {
    writes: Vec<Result<Option<Exec>>>,
    consumed: Vec<Outcome>,
}

/// One lane: takes everything waiting (up to [`MAX_BATCH`]) into one transaction, then
/// answers each after the commit. Jobs of one batch come from different callers (each
/// waits for its own answer), so running writes before consumptions reorders nothing
/// that anyone could observe.
async fn lane(shared: Arc<Shared>, mut rx: tokio::sync::mpsc::UnboundedReceiver<Work>) {
    let mut batch: Vec<Work> = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let mut writes = Vec::new();
        let mut write_tx = Vec::new();
        let mut consumes = Vec::new();
        let mut consume_tx = Vec::new();
        // The batch must end before the first of its callers stops waiting: within the
        // storage timeout of the request that came first.
        let mut deadline = Instant::now() + shared.timeout;
        for w in batch.drain(..) {
            // A job whose caller gave up must not run: its request was answered.
            if !w.claim() {
                continue;
            }
            deadline = deadline.min(w.deadline());
            match w {
                Work::Write(w, tx, _) => {
                    writes.push(w);
                    write_tx.push(tx);
                }
                Work::Consume(r, tx, _) => {
                    consumes.push(r);
                    consume_tx.push(tx);
                }
            }
        }
        if writes.is_empty() && consumes.is_empty() {
            continue;
        }
        let me = shared.clone();
        let run = tokio::spawn(async move {
            let batch = LaneBatch { writes, consumes };
            match me.run_lane_batch(&batch, deadline).await {
                Ok(r) => {
                    for (tx, w) in write_tx.into_iter().zip(r.writes) {
                        tx.send(w);
                    }
                    for (tx, c) in consume_tx.into_iter().zip(r.consumed) {
                        tx.send(Ok(c));
                    }
                }
                Err(e) => {
                    for tx in write_tx {
                        tx.send(Err(e.clone()));
                    }
                    for tx in consume_tx {
                        tx.send(Err(e.clone()));
                    }
                }
            }
        });
        // Usually the batch is done in milliseconds. One that waits (on a lock another
        // daemon holds, on a COMMIT left in doubt) finishes on its own and answers its
        // callers, while the lane goes on with the next one: the other keys of the lane
        // do not wait behind it. (Concurrent batches lock their rows in one order, so
        // they never deadlock on counters.)
        let _ = tokio::time::timeout(LANE_PATIENCE.min(shared.timeout / 2), run).await;
    }
}

impl Mysql {
    /// `check`: for a check, whose host tables are looked at, never created.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        url: &str,
        password: Option<String>,
        pool_size: usize,
        zone: Zone,
        timeout: Duration,
        record_zone: bool,
        check: bool,
        runtime: tokio::runtime::Handle,
    ) -> Result<Mysql> {
        let opts =
            Opts::from_url(url).map_err(|e| StoreError::Invalid(format!("storage.url: {e}")))?;
        let constraints = PoolConstraints::new(0, pool_size.max(1))
            .ok_or_else(|| StoreError::Invalid("storage.pool_size must be at least 1".into()))?;
        let mut b = OptsBuilder::from_opts(opts)
            .pool_opts(
                PoolOpts::default()
                    .with_constraints(constraints)
                    .with_reset_connection(false)
                    // Keep up to pool_size idle connections (closed after 5 idle minutes).
                    // With the default TTL of 0 the pool keeps only `min` (here 0) idle,
                    // and every query would open a new connection, as valvula did.
                    .with_inactive_connection_ttl(Duration::from_secs(300)),
            )
            .stmt_cache_size(128)
            // Counting needs "rows changed", not "rows matched".
            .client_found_rows(false)
            // Read committed: no gap locks between concurrent first charges of new keys.
            // A lock held by another transaction (a stalled daemon's) fails a statement
            // after a second instead of the server's 50 s; MariaDB also rolls back a
            // transaction of ours left idle (this daemon frozen mid-transaction), so its
            // locks never hold the other daemons' requests for longer.
            .setup(vec![
                "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED".to_owned(),
                format!(
                    "SET SESSION innodb_lock_wait_timeout = {} /*M!100300 , idle_transaction_timeout = {} */",
                    (timeout.as_secs() / 2).max(1),
                    timeout.as_secs().max(1) * 5
                ),
            ]);
        if password.is_some() {
            b = b.pass(password);
        }
        let opts: Opts = b.into();
        let _guard = runtime.enter();
        let describe = format!(
            "mysql {}:{}/{}",
            opts.ip_or_hostname(),
            opts.tcp_port(),
            opts.db_name().unwrap_or_default()
        );
        let shared = Arc::new(Shared {
            pool: Mutex::new(Pooled {
                generation: 0,
                pool: Pool::new(opts.clone()),
            }),
            opts,
            schema_ready: AtomicBool::new(false),
            preparing: AtomicBool::new(false),
            index_ready: AtomicBool::new(false),
            prepare_error: Mutex::new(None),
            record_zone,
            check,
            outage: Outage::new(&describe),
            probing: AtomicBool::new(false),
            timeout,
            zone,
            refused: Mutex::new(None),
            runtime: runtime.clone(),
            conflict_log: crate::RateLog::default(),
        });
        let lanes = (0..LANES)
            .map(|_| {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                runtime.spawn(lane(shared.clone(), rx));
                tx
            })
            .collect();
        Ok(Mysql {
            shared,
            runtime: runtime.clone(),
            lanes,
        })
    }

    /// Runs `f` with a pooled connection on the runtime and waits for it from this
    /// (non-runtime) thread; `f` may run twice (a retry on a fresh connection).
    fn run<T, F>(&self, write: bool, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: for<'c> Fn(&'c mut Conn) -> BoxFut<'c, T> + Send + Sync + 'static,
    {
        self.run_for(write, self.shared.timeout, f)
    }

    /// [`Mysql::run`] with a timeout of its own.
    fn run_for<T, F>(&self, write: bool, timeout: Duration, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: for<'c> Fn(&'c mut Conn) -> BoxFut<'c, T> + Send + Sync + 'static,
    {
        let on_current_thread_runtime = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread);
        if on_current_thread_runtime {
            // Blocking here would stop the only thread that can run the query.
            return Err(StoreError::Invalid(
                "storage called from a single-threaded async runtime; call it from a worker thread"
                    .into(),
            ));
        }
        self.shared.fail_fast()?;
        let shared = self.shared.clone();
        let (tx, rx) = crate::sync::oneshot();
        self.runtime.spawn(async move {
            tx.send(shared.attempt(write, timeout, f).await);
        });
        // The task ends within the timeout.
        block(|| rx.wait())
            .unwrap_or_else(|| Err(StoreError::Unavailable("the runtime stopped".into())))
    }

    /// Hands work to the lane the hash `h` of its key picks (one key always to one
    /// lane, so this daemon's transactions on one row never wait on each other's locks)
    /// and waits for the answer, sent after the lane's commit. A job still queued when
    /// the storage timeout passes is dropped and fails; one already in a transaction is
    /// waited for, since its outcome is what counts.
    fn submit<T>(
        &self,
        h: u64,
        work: impl FnOnce(Promise<Result<T>>, Instant) -> Work,
    ) -> Result<T> {
        self.shared.fail_fast()?;
        let lane = &self.lanes[h as usize % self.lanes.len()];
        let (tx, rx): (Promise<Result<T>>, Answer<Result<T>>) = crate::sync::oneshot();
        let deadline = std::time::Instant::now() + self.shared.timeout;
        if lane.send(work(tx, deadline.into())).is_err() {
            return Err(StoreError::Unavailable("the runtime stopped".into()));
        }
        match block(|| rx.wait_until(deadline)) {
            Waited::Value(r) => r,
            Waited::Dropped => Err(StoreError::Unavailable("the runtime stopped".into())),
            Waited::GaveUp => Err(StoreError::Unavailable(format!(
                "no transaction within {:?} (storage timeout): the database is busy or stalled",
                self.shared.timeout
            ))),
        }
    }

    /// [`Mysql::submit`] for a task: queued now, awaited without holding a thread.
    fn submit_async<T: Send + 'static>(
        &self,
        h: u64,
        work: impl FnOnce(Promise<Result<T>>, Instant) -> Work,
    ) -> super::StoreFuture<T> {
        if let Err(e) = self.shared.fail_fast() {
            return Box::pin(std::future::ready(Err(e)));
        }
        let lane = &self.lanes[h as usize % self.lanes.len()];
        let (tx, rx): (Promise<Result<T>>, Answer<Result<T>>) = crate::sync::oneshot();
        let timeout = self.shared.timeout;
        let deadline = std::time::Instant::now() + timeout;
        if lane.send(work(tx, deadline.into())).is_err() {
            return Box::pin(std::future::ready(Err(StoreError::Unavailable(
                "the runtime stopped".into(),
            ))));
        }
        Box::pin(async move {
            match rx.wait_until_async(deadline).await {
                Waited::Value(r) => r,
                Waited::Dropped => Err(StoreError::Unavailable("the runtime stopped".into())),
                Waited::GaveUp => Err(StoreError::Unavailable(format!(
                    "no transaction within {timeout:?} (storage timeout): the database is busy or stalled"
                ))),
            }
        })
    }

    fn write_async(&self, w: Write) -> super::StoreFuture<Option<Exec>> {
        let s = match &w {
            Write::Exec(s) | Write::Once { stmt: s, .. } => s,
        };
        self.submit_async(hash_of(row_key(s)), |tx, d| Work::Write(w, tx, d))
    }

    /// A write goes to the lane of the row it most likely touches, so that two writes
    /// of one row never wait on each other's locks from two lanes (two lane
    /// transactions taking such rows in opposite orders deadlock: seen with
    /// accounting rows, whose statements carry per-request sizes).
    fn write(&self, w: Write) -> Result<Option<Exec>> {
        let s = match &w {
            Write::Exec(s) | Write::Once { stmt: s, .. } => s,
        };
        self.submit(hash_of(row_key(s)), |tx, d| Work::Write(w, tx, d))
    }
}

impl Engine for Mysql {
    fn exec_async(&self, stmt: Stmt) -> super::StoreFuture<Exec> {
        let f = self.write_async(Write::Exec(stmt));
        Box::pin(async move { f.await.map(|e| e.unwrap_or_default()) })
    }

    fn exec_once_async(
        &self,
        ns: &str,
        token: &str,
        stmt: Stmt,
        now: i64,
    ) -> super::StoreFuture<Option<Exec>> {
        self.write_async(Write::Once {
            ns: ns.to_owned(),
            token: token.to_owned(),
            now,
            stmt,
        })
    }

    fn query_async(&self, stmt: Stmt) -> super::StoreFuture<Rows> {
        let shared = self.shared.clone();
        Box::pin(async move {
            let timeout = shared.timeout;
            shared
                .attempt(false, timeout, move |c| {
                    let s = stmt.clone();
                    Box::pin(async move { query_rows(c, &s.sql, s.params).await })
                })
                .await
        })
    }

    fn consume_async(&self, req: consume::Request) -> super::StoreFuture<Outcome> {
        let first = req.parts.first().map(|p| p.key.clone()).unwrap_or_default();
        self.submit_async(hash_of((&req.ns, &first)), |tx, d| {
            Work::Consume(req, tx, d)
        })
    }

    fn exec(&self, stmt: Stmt) -> Result<Exec> {
        if super::is_dml(&stmt.sql) {
            return self.write(Write::Exec(stmt)).map(|e| e.unwrap_or_default());
        }
        // A schema change (a module's migration) on a large table takes its time, and
        // runs at start or from a tick, not for a request.
        self.run_for(true, MIGRATION_TIMEOUT, move |c| {
            let s = stmt.clone();
            Box::pin(async move {
                schema_change(c, s).await?;
                Ok(Exec {
                    affected: c.affected_rows(),
                    last_insert_id: c.last_insert_id().unwrap_or(0) as i64,
                })
            })
        })
    }

    fn exec_once(&self, ns: &str, token: &str, stmt: Stmt, now: i64) -> Result<Option<Exec>> {
        self.write(Write::Once {
            ns: ns.to_owned(),
            token: token.to_owned(),
            now,
            stmt,
        })
    }

    fn batch(&self, stmts: Vec<Stmt>) -> Result<Vec<Exec>> {
        self.run(true, move |c| {
            let stmts = stmts.clone();
            Box::pin(async move {
                let mut tx = c.start_transaction(TxOpts::default()).await.map_err(err)?;
                let mut out = Vec::with_capacity(stmts.len());
                for s in stmts {
                    tx.exec_drop(s.sql, params(s.params)).await.map_err(err)?;
                    out.push(Exec {
                        affected: tx.affected_rows(),
                        last_insert_id: tx.last_insert_id().unwrap_or(0) as i64,
                    });
                }
                tx.commit().await.map_err(err)?;
                Ok(out)
            })
        })
    }

    fn query(&self, stmt: Stmt) -> Result<Rows> {
        self.run(false, move |c| {
            let s = stmt.clone();
            Box::pin(async move { query_rows(c, &s.sql, s.params).await })
        })
    }

    fn consume(&self, req: consume::Request) -> Result<Outcome> {
        let first = req.parts.first().map(|p| p.key.clone()).unwrap_or_default();
        self.submit(hash_of((&req.ns, &first)), |tx, d| {
            Work::Consume(req, tx, d)
        })
    }

    fn reset(&self, ns: &str, key: &str) -> Result<u64> {
        let (ns, key) = (ns.to_owned(), key.to_owned());
        self.run(true, move |c| {
            let (ns, key) = (ns.clone(), key.clone());
            Box::pin(async move {
                let mut tx = c.start_transaction(TxOpts::default()).await.map_err(err)?;
                tx.exec_drop(
                    "DELETE FROM vlv_counter WHERE ns = ? AND ckey = ?",
                    (ns.clone(), key.clone()),
                )
                .await
                .map_err(err)?;
                let a = tx.affected_rows();
                tx.exec_drop("DELETE FROM vlv_slide WHERE ns = ? AND ckey = ?", (ns, key))
                    .await
                    .map_err(err)?;
                let b = tx.affected_rows();
                tx.commit().await.map_err(err)?;
                Ok(a + b)
            })
        })
    }

    fn expire(&self, what: &Expire, limit: usize) -> Result<u64> {
        // Without its index a delete of past periods scans the whole table.
        if matches!(what, Expire::Counters { .. } | Expire::SlidingHeads { .. })
            && !self.shared.index_ready.load(Ordering::Acquire)
        {
            return Ok(0);
        }
        let limit = limit as i64;
        let (sql, p): (&str, Vec<Value>) = match what {
            Expire::Counters { win, before } => (
                "DELETE FROM vlv_counter WHERE win = ? AND period < ? LIMIT ?",
                vec![win.as_str().into(), (*before).into(), limit.into()],
            ),
            Expire::SlidingHeads { before } => (
                "DELETE FROM vlv_counter WHERE win >= ? AND win < ? AND period < ? LIMIT ?",
                vec![
                    "sliding:".into(),
                    "sliding;".into(),
                    (*before).into(),
                    limit.into(),
                ],
            ),
            Expire::Buckets { before } => (
                "DELETE FROM vlv_slide WHERE expires < ? LIMIT ?",
                vec![(*before).into(), limit.into()],
            ),
            Expire::Tokens { before } => (
                "DELETE FROM vlv_once WHERE at < ? LIMIT ?",
                vec![(*before).into(), limit.into()],
            ),
        };
        self.run(true, move |c| {
            let p = p.clone();
            Box::pin(async move {
                c.exec_drop(sql, params(p)).await.map_err(err)?;
                Ok(c.affected_rows())
            })
        })
    }

    fn ping(&self) -> Result<()> {
        // At startup: wait for the tables and the zone check (not for indexes).
        let shared = self.shared.clone();
        let (tx, rx) = crate::sync::oneshot();
        self.runtime.spawn(async move {
            tx.send(shared.wait_ready(PREPARE_WAIT).await);
        });
        block(|| rx.wait())
            .unwrap_or_else(|| Err(StoreError::Unavailable("the runtime stopped".into())))?;
        self.run(false, |c| {
            Box::pin(async move { c.query_drop("SELECT 1").await.map_err(err) })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_of_one_row_share_a_lane_whatever_they_add() {
        let upd = |size: i64| {
            Stmt::new(
                "UPDATE ratelimit_accounting SET messages = messages + ?, bytes = bytes + ? \
                 WHERE policy = ? AND identity = ? AND period = ?",
                vec![1.into(), size.into(), "p".into(), "alice".into(), 7.into()],
            )
        };
        let ins = Stmt::new(
            "INSERT IGNORE INTO ratelimit_accounting (policy, identity, period) VALUES (?, ?, ?)",
            vec!["p".into(), "alice".into(), 7.into()],
        );
        assert_eq!(row_key(&upd(10)), row_key(&upd(99_999)));
        assert_eq!(row_key(&upd(10)), row_key(&ins));
        let ticket = |id: i64, n: i64| {
            Stmt::new(
                "UPDATE domain_ticket SET total_used = total_used + ? WHERE id = ? AND total_used + ? <= ?",
                vec![n.into(), id.into(), n.into(), 10.into()],
            )
        };
        assert_eq!(row_key(&ticket(3, 1)), row_key(&ticket(3, 5)));
        assert_ne!(row_key(&ticket(3, 1)), row_key(&ticket(4, 1)));
        // "WHERE" inside a name is no clause.
        let odd = Stmt::new(
            "UPDATE somewhere_t SET x = ? WHERE id = ?",
            vec![5.into(), 1.into()],
        );
        assert_eq!(
            row_key(&odd),
            "SOMEWHERE_T".to_owned() + &format!("{:?}", Some(&Value::Int(1)))
        );
    }
}
