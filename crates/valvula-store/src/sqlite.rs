//! SQLite: one writer thread with group commit, a small pool of reader connections.
//!
//! Every write (module statements, consumptions, resets) goes to the writer. It takes
//! all the jobs waiting, opens one `BEGIN IMMEDIATE` transaction, runs each job inside
//! its own SAVEPOINT (a refused or failed job is rolled back alone), commits once, and
//! only then answers every job: one fsync for many consumptions, and no reply before its
//! charge is durable. `BEGIN IMMEDIATE` also serialises writers of other processes on
//! the same file, so two daemons on one SQLite file stay exact.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags, OptionalExtension, params_from_iter};

use super::consume::{self, Outcome, Tx};
use super::outage::Outage;
use super::window::Zone;
use super::{Dialect, Engine, Exec, Expire, Result, Rows, Stmt, StoreError, Value};
use crate::sync::Unpoisoned;
use crate::sync::{Promise, Queue, Waited, oneshot};

/// Jobs one transaction takes at most.
const MAX_BATCH: usize = 512;
const HOST_SCHEMA: &str = include_str!("../../../sql/sqlite/host.sql");

type Reply<T> = Promise<Result<T>>;

enum Job {
    Exec(Stmt, Reply<Exec>),
    Batch(Vec<Stmt>, Reply<Vec<Exec>>),
    Consume(consume::Request, Reply<Outcome>),
    Once(String, String, i64, Stmt, Reply<Option<Exec>>),
    Reset(String, String, Reply<u64>),
    Expire(Expire, usize, Reply<u64>),
    Ping(Reply<()>),
}

impl Job {
    /// Takes the job up; false when its caller already gave up waiting (the job must
    /// not run: its request was answered).
    fn claim(&self) -> bool {
        match self {
            Job::Exec(_, r) => r.claim(),
            Job::Batch(_, r) => r.claim(),
            Job::Consume(_, r) => r.claim(),
            Job::Once(.., r) => r.claim(),
            Job::Reset(.., r) | Job::Expire(.., r) => r.claim(),
            Job::Ping(r) => r.claim(),
        }
    }
}

pub struct Sqlite {
    jobs: Arc<Queue<Job>>,
    /// The write connection, used by one batch at a time: the writer thread's, or the
    /// batch a task leads.
    writer: Arc<Mutex<Writer>>,
    /// How long the last COMMIT of a batch a task led waited (µs).
    last_batch_us: Arc<std::sync::atomic::AtomicU64>,
    /// A task will wake the writer for the jobs queued by tasks (see submit_deferred).
    wake_scheduled: Arc<std::sync::atomic::AtomicBool>,
    path: PathBuf,
    synchronous_full: bool,
    timeout: Duration,
    readers: Mutex<Vec<Connection>>,
    outage: Arc<Outage>,
}

fn sql_err(e: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode::*;
    match e.sqlite_error_code() {
        // Another process holding the write lock past the storage timeout: contention,
        // not an outage.
        Some(DatabaseBusy | DatabaseLocked) => StoreError::Busy(e.to_string()),
        Some(
            CannotOpen | ReadOnly | DiskFull | SystemIoFailure | NotADatabase | DatabaseCorrupt
            | PermissionDenied,
        ) => StoreError::Unavailable(e.to_string()),
        Some(TooBig) => StoreError::Data(e.to_string()),
        _ => StoreError::Sql(e.to_string()),
    }
}

fn to_sql(v: &Value) -> rusqlite::types::Value {
    use rusqlite::types::Value as V;
    match v {
        Value::Null => V::Null,
        Value::Int(i) => V::Integer(*i),
        Value::Float(f) => V::Real(*f),
        Value::Text(s) => V::Text(s.clone()),
        Value::Blob(b) => V::Blob(b.clone()),
    }
}

fn from_sql(v: rusqlite::types::ValueRef<'_>) -> Value {
    use rusqlite::types::ValueRef as V;
    match v {
        V::Null => Value::Null,
        V::Integer(i) => Value::Int(i),
        V::Real(f) => Value::Float(f),
        V::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
        V::Blob(b) => Value::Blob(b.to_vec()),
    }
}

fn open_conn(path: &PathBuf, synchronous_full: bool, timeout: Duration) -> Result<Connection> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::Unavailable(format!("cannot create {}: {e}", dir.display()))
        })?;
    }
    let c = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| StoreError::Unavailable(format!("{}: {e}", path.display())))?;
    // Another process holding the write lock makes a call wait at most the storage
    // timeout, not the module timeout.
    c.busy_timeout(timeout).map_err(sql_err)?;
    c.pragma_update(None, "journal_mode", "WAL")
        .map_err(sql_err)?;
    // Savepoint sub-journals and sort scratch in memory, not in temporary files.
    c.pragma_update(None, "temp_store", "MEMORY")
        .map_err(sql_err)?;
    c.pragma_update(
        None,
        "synchronous",
        if synchronous_full { "FULL" } else { "NORMAL" },
    )
    .map_err(sql_err)?;
    c.set_prepared_statement_cache_capacity(64);
    Ok(c)
}

/// A statement without parameters or rows (transaction control), prepared once.
fn step(c: &Connection, sql: &str) -> Result<()> {
    c.prepare_cached(sql)
        .and_then(|mut st| st.execute([]))
        .map(|_| ())
        .map_err(sql_err)
}

fn exec_one(c: &Connection, s: &Stmt) -> Result<Exec> {
    let mut st = c.prepare_cached(&s.sql).map_err(sql_err)?;
    if st.readonly() && st.column_count() > 0 {
        // A query sent through exec: run it, report nothing changed.
        let mut rows = st
            .query(params_from_iter(s.params.iter().map(to_sql)))
            .map_err(sql_err)?;
        while rows.next().map_err(sql_err)?.is_some() {}
        return Ok(Exec::default());
    }
    let n = st
        .execute(params_from_iter(s.params.iter().map(to_sql)))
        .map_err(sql_err)?;
    Ok(Exec {
        affected: n as u64,
        last_insert_id: c.last_insert_rowid(),
    })
}

fn query_one(c: &Connection, s: &Stmt) -> Result<Rows> {
    let mut st = c.prepare_cached(&s.sql).map_err(sql_err)?;
    let columns: Vec<String> = st.column_names().iter().map(|n| n.to_string()).collect();
    let n = columns.len();
    let mut rows = st
        .query(params_from_iter(s.params.iter().map(to_sql)))
        .map_err(sql_err)?;
    let mut out = Vec::new();
    while let Some(r) = rows.next().map_err(sql_err)? {
        let mut row = Vec::with_capacity(n);
        for i in 0..n {
            row.push(from_sql(r.get_ref(i).map_err(sql_err)?));
        }
        out.push(row);
    }
    Ok(Rows { columns, rows: out })
}

struct ConnTx<'a>(&'a Connection);

impl Tx for ConnTx<'_> {
    async fn exec(&mut self, sql: &str, params: Vec<Value>) -> Result<Exec> {
        exec_one(self.0, &Stmt::new(sql, params))
    }
    async fn rows(&mut self, sql: &str, params: Vec<Value>) -> Result<Vec<Vec<Value>>> {
        query_one(self.0, &Stmt::new(sql, params)).map(|r| r.rows)
    }
    fn ended_by(&self, _e: &StoreError) -> bool {
        self.0.is_autocommit()
    }
}

/// Drives a future that never waits (SQLite calls are synchronous) to completion.
fn ready<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => unreachable!("SQLite transaction steps never wait"),
    }
}

/// The writer's connection, reopened after failures (at most a second later).
struct Writer {
    path: PathBuf,
    synchronous_full: bool,
    timeout: Duration,
    zone: Zone,
    conn: Option<Connection>,
    retry_at: Instant,
    backoff: Duration,
    /// Set for good when the database belongs to differently configured daemons.
    refused: Option<StoreError>,
    /// Record the zone in a database that has none (a daemon, not a tool).
    record_zone: bool,
    /// Failed commits, logged at most once a second.
    commit_log: crate::RateLog,
    /// How long the last COMMIT took (µs): the disk's flush.
    commit_us: u64,
}

impl Writer {
    fn conn(&mut self) -> Result<&Connection> {
        if let Some(e) = &self.refused {
            return Err(e.clone());
        }
        if self.conn.is_none() {
            if Instant::now() < self.retry_at {
                return Err(StoreError::Unavailable(format!(
                    "{}: not reachable; retrying in {:?}",
                    self.path.display(),
                    self.retry_at - Instant::now()
                )));
            }
            let (zone, record) = (self.zone, self.record_zone);
            match open_conn(&self.path, self.synchronous_full, self.timeout).and_then(|c| {
                c.execute_batch(HOST_SCHEMA).map_err(sql_err)?;
                if record {
                    c.execute(
                        "INSERT OR IGNORE INTO vlv_meta (name, value) VALUES ('time_zone', ?1)",
                        [zone.name()],
                    )
                    .map_err(sql_err)?;
                }
                let stored: Option<String> = c
                    .query_row(
                        "SELECT value FROM vlv_meta WHERE name = 'time_zone'",
                        [],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(sql_err)?;
                super::agree_on_zone(stored.as_deref(), zone)?;
                Ok(c)
            }) {
                Ok(c) => {
                    self.conn = Some(c);
                    self.backoff = Duration::from_millis(100);
                }
                Err(e @ StoreError::Refused(_)) => {
                    tracing::error!(target: crate::LOG_TARGET, "{e}");
                    self.refused = Some(e.clone());
                    return Err(e);
                }
                Err(e) => {
                    self.retry_at = Instant::now() + self.backoff;
                    // Back within a second of the database's return.
                    self.backoff = (self.backoff * 2).min(Duration::from_secs(1));
                    return Err(e);
                }
            }
        }
        Ok(self.conn.as_ref().expect("just opened"))
    }

    fn failed(&mut self, e: &StoreError) {
        if matches!(e, StoreError::Unavailable(_)) {
            self.conn = None;
        }
    }

    /// Runs a batch of jobs in one transaction and answers them after the commit.
    /// `inline`: a task leads the batch on the event loop, which must not sleep in
    /// SQLite's busy handler while another connection (another daemon, valvula-ctl)
    /// holds the write lock: then the jobs come back, for the writer thread.
    fn run(&mut self, mut jobs: Vec<Job>, inline: bool) -> Option<Vec<Job>> {
        // A job whose caller gave up must not run: its request was answered already.
        jobs.retain(Job::claim);
        if jobs.is_empty() {
            return None;
        }
        let timeout = self.timeout;
        let conn = match self.conn() {
            Ok(c) => c,
            Err(e) => {
                answer_all(jobs, &e);
                return None;
            }
        };
        if inline {
            let _ = conn.busy_timeout(Duration::ZERO);
            let begun = step(conn, "BEGIN IMMEDIATE");
            let _ = conn.busy_timeout(timeout);
            match begun {
                Ok(()) => {}
                Err(StoreError::Busy(_)) => return Some(jobs),
                Err(e) => {
                    self.failed(&e);
                    answer_all(jobs, &e);
                    return None;
                }
            }
        } else if let Err(e) = step(conn, "BEGIN IMMEDIATE") {
            self.failed(&e);
            answer_all(jobs, &e);
            return None;
        }
        let mut done: Vec<(Job, Done)> = Vec::with_capacity(jobs.len());
        // Consumptions are decided together (one read, one write for all of them); the
        // other jobs run first, each in its own savepoint. Jobs of one batch come from
        // different callers (each waits for its answer), so their order is free.
        let (consumes, others): (Vec<Job>, Vec<Job>) = jobs
            .into_iter()
            .partition(|j| matches!(j, Job::Consume(..)));
        // Some errors (a full disk, an I/O error) make SQLite roll back the whole
        // transaction; what ran after that would autocommit on its own while the batch
        // is answered as failed. Stop at that point: the COMMIT then fails and every
        // job of the batch gets the error.
        let lost =
            || StoreError::Unavailable("SQLite rolled the transaction back after an error".into());
        for job in others {
            if conn.is_autocommit() {
                done.push((job, Done::Failed(lost())));
                continue;
            }
            // One statement is atomic by itself in SQLite (a failing one is undone
            // alone, the transaction goes on), and exec_once takes its token back when
            // its statement fails: only multi-statement jobs need a savepoint.
            if !matches!(job, Job::Batch(..) | Job::Reset(..)) {
                let (result, _) = run_job(conn, &job);
                done.push((job, result));
                continue;
            }
            if let Err(e) = step(conn, "SAVEPOINT job") {
                done.push((job, Done::Failed(e)));
                continue;
            }
            let (result, keep) = run_job(conn, &job);
            let end = if keep {
                step(conn, "RELEASE job")
            } else {
                step(conn, "ROLLBACK TO job").and_then(|()| step(conn, "RELEASE job"))
            };
            if let Err(e) = end {
                done.push((job, Done::Failed(e)));
                continue;
            }
            done.push((job, result));
        }
        // Alone in the transaction, the group needs no savepoint (and its sub-journal):
        // if it fails, the whole transaction is rolled back.
        let alone = done.is_empty();
        if !consumes.is_empty() && conn.is_autocommit() {
            for job in consumes {
                answer_err(job, &lost());
            }
            let _ = step(conn, "ROLLBACK");
            for (job, _) in done {
                answer_err(job, &lost());
            }
            self.failed(&lost());
            return None;
        }
        if !consumes.is_empty() {
            let reqs: Vec<consume::Request> = consumes
                .iter()
                .filter_map(|j| match j {
                    Job::Consume(r, _) => Some(r.clone()),
                    _ => None,
                })
                .collect();
            let r = (if alone {
                Ok(())
            } else {
                step(conn, "SAVEPOINT consume")
            })
            .and_then(|()| {
                ready(consume::run_batch(
                    &mut ConnTx(conn),
                    Dialect::Sqlite,
                    &reqs,
                ))
            });
            let end = match (&r, alone) {
                (Ok(_), true) => Ok(()),
                (Err(e), true) => {
                    let _ = step(conn, "ROLLBACK");
                    self.failed(e);
                    answer_all(consumes, e);
                    return None;
                }
                (Ok(_), false) => step(conn, "RELEASE consume"),
                (Err(_), false) => {
                    step(conn, "ROLLBACK TO consume").and_then(|()| step(conn, "RELEASE consume"))
                }
            };
            match end.and(r) {
                Ok(results) => {
                    for (job, c) in consumes.into_iter().zip(results) {
                        done.push((job, Done::Consumption(c)));
                    }
                }
                Err(e) => {
                    for job in consumes {
                        done.push((job, Done::Failed(e.clone())));
                    }
                }
            }
        }
        let committing = Instant::now();
        let committed = step(conn, "COMMIT");
        let commit_us = committing.elapsed().as_micros() as u64;
        if let Err(e) = committed {
            let _ = step(conn, "ROLLBACK");
            self.commit_us = commit_us;
            if let Some(more) = self.commit_log.allow() {
                tracing::error!(target: crate::LOG_TARGET,
                    failed_commits_since_last_line = more,
                    "commit failed, {} job(s) answered with an error: {e}",
                    done.len()
                );
            }
            self.failed(&e);
            for (job, _) in done {
                answer(job, Done::Failed(e.clone()));
            }
            return None;
        }
        self.commit_us = commit_us;
        for (job, result) in done {
            answer(job, result);
        }
        None
    }
}

/// A job's result, held until the commit.
enum Done {
    Exec(Exec),
    Batch(Vec<Exec>),
    Consumption(Outcome),
    Once(Option<Exec>),
    Count(u64),
    Unit,
    Failed(StoreError),
}

/// Deletes at most `limit` rows of one kind (tables without rowid: by primary key).
fn expire(c: &Connection, what: &Expire, limit: usize) -> Result<u64> {
    let limit = limit as i64;
    let n = match what {
        Expire::Counters { win, before } => c.execute(
            "DELETE FROM vlv_counter WHERE (ns, ckey, win) IN \
             (SELECT ns, ckey, win FROM vlv_counter WHERE win = ?1 AND period < ?2 LIMIT ?3)",
            rusqlite::params![win, before, limit],
        ),
        Expire::SlidingHeads { before } => c.execute(
            "DELETE FROM vlv_counter WHERE (ns, ckey, win) IN \
             (SELECT ns, ckey, win FROM vlv_counter WHERE win >= 'sliding:' AND win < 'sliding;' \
              AND period < ?1 LIMIT ?2)",
            rusqlite::params![before, limit],
        ),
        Expire::Buckets { before } => c.execute(
            "DELETE FROM vlv_slide WHERE (ns, ckey, win, bucket) IN \
             (SELECT ns, ckey, win, bucket FROM vlv_slide WHERE expires < ?1 LIMIT ?2)",
            rusqlite::params![before, limit],
        ),
        Expire::Tokens { before } => c.execute(
            "DELETE FROM vlv_once WHERE (ns, token) IN \
             (SELECT ns, token FROM vlv_once WHERE at < ?1 LIMIT ?2)",
            rusqlite::params![before, limit],
        ),
    }
    .map_err(sql_err)?;
    Ok(n as u64)
}

/// Runs one job; the bool says whether its changes are kept.
fn run_job(c: &Connection, job: &Job) -> (Done, bool) {
    let r = match job {
        Job::Exec(s, _) => exec_one(c, s).map(Done::Exec),
        Job::Batch(stmts, _) => stmts
            .iter()
            .map(|s| exec_one(c, s))
            .collect::<Result<Vec<_>>>()
            .map(Done::Batch),
        Job::Consume(..) => Err(StoreError::Sql(
            "internal: consumptions run as one group".into(),
        )),
        Job::Once(ns, token, now, stmt, _) => ready(consume::exec_once(
            &mut ConnTx(c),
            Dialect::Sqlite,
            ns,
            token,
            *now,
            stmt,
        ))
        .map(Done::Once),
        Job::Reset(ns, key, _) => (|| {
            let a = c
                .execute(
                    "DELETE FROM vlv_counter WHERE ns = ?1 AND ckey = ?2",
                    [ns, key],
                )
                .map_err(sql_err)?;
            let b = c
                .execute(
                    "DELETE FROM vlv_slide WHERE ns = ?1 AND ckey = ?2",
                    [ns, key],
                )
                .map_err(sql_err)?;
            Ok(Done::Count((a + b) as u64))
        })(),
        Job::Expire(what, limit, _) => expire(c, what, *limit).map(Done::Count),
        Job::Ping(_) => c
            .query_row("SELECT 1", [], |_| Ok(()))
            .map(|()| Done::Unit)
            .map_err(sql_err),
    };
    match r {
        Ok(d) => (d, true),
        Err(e) => (Done::Failed(e), false),
    }
}

fn answer(job: Job, d: Done) {
    fn send<T>(tx: Reply<T>, r: Result<T>) {
        tx.send(r);
    }
    let wrong = || StoreError::Sql("internal: result does not match the job".into());
    match (job, d) {
        (j, Done::Failed(e)) => answer_err(j, &e),
        (Job::Exec(_, tx), Done::Exec(x)) => send(tx, Ok(x)),
        (Job::Batch(_, tx), Done::Batch(x)) => send(tx, Ok(x)),
        (Job::Consume(_, tx), Done::Consumption(x)) => send(tx, Ok(x)),
        (Job::Once(.., tx), Done::Once(x)) => send(tx, Ok(x)),
        (Job::Reset(.., tx), Done::Count(x)) | (Job::Expire(.., tx), Done::Count(x)) => {
            send(tx, Ok(x))
        }
        (Job::Ping(tx), Done::Unit) => send(tx, Ok(())),
        (j, _) => answer_err(j, &wrong()),
    }
}

fn answer_err(job: Job, e: &StoreError) {
    let e = e.clone();
    match job {
        Job::Exec(_, tx) => tx.send(Err(e)),
        Job::Batch(_, tx) => tx.send(Err(e)),
        Job::Consume(_, tx) => tx.send(Err(e)),
        Job::Once(.., tx) => tx.send(Err(e)),
        Job::Reset(.., tx) | Job::Expire(.., tx) => tx.send(Err(e)),
        Job::Ping(tx) => tx.send(Err(e)),
    }
}

fn answer_all(jobs: Vec<Job>, e: &StoreError) {
    for j in jobs {
        answer_err(j, e);
    }
}

fn writer_loop(w: Arc<Mutex<Writer>>, rx: Arc<Queue<Job>>) {
    while let Some(jobs) = rx.pop_many(MAX_BATCH) {
        run_batch(&mut w.locked(), jobs, false);
    }
}

/// Runs one batch on the writer's connection, from the writer thread or (`inline`) from
/// the task that leads a batch; the jobs an inline batch could not start (the database
/// locked by another connection) come back.
fn run_batch(w: &mut Writer, jobs: Vec<Job>, inline: bool) -> Option<Vec<Job>> {
    // A bug in one batch must not end the writer: every later write would fail for
    // good. Its jobs are answered as failed (their promises dropped), and the
    // connection, perhaps inside a transaction, is opened afresh.
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w.run(jobs, inline))) {
        Ok(back) => back,
        Err(p) => {
            tracing::error!(target: crate::LOG_TARGET,
                "SQLite writer: a batch failed with a panic ({}); its requests got the on-error answer, the writer goes on",
                crate::sync::panic_text(&*p)
            );
            w.conn = None;
            None
        }
    }
}

/// After a COMMIT that waited longer than this for the disk, batches go to the writer
/// thread: a disk that flushes slowly must not hold the event loop (other listeners'
/// requests) that long. (On the benchmark machine a COMMIT of 40 charges takes 0.5 to
/// 5 ms.)
const LEAD_INLINE_UNDER: Duration = Duration::from_millis(10);

/// Opens the database at `path` to read only, creating nothing: a database closed
/// cleanly (no `-wal` file) is opened immutable, so SQLite makes no `-wal` or `-shm`
/// file beside it; one a daemon has open is read through its shared index, as any
/// reader does.
pub fn open_read_only(path: &Path) -> Result<Connection> {
    let wal = {
        let mut p = path.as_os_str().to_owned();
        p.push("-wal");
        PathBuf::from(p)
    };
    let mut uri = String::from("file:");
    for c in path.display().to_string().chars() {
        match c {
            '%' | '?' | '#' => uri.push_str(&format!("%{:02X}", c as u32)),
            c => uri.push(c),
        }
    }
    uri.push_str("?mode=ro");
    if !wal.exists() {
        uri.push_str("&immutable=1");
    }
    let c = Connection::open_with_flags(
        &uri,
        OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| StoreError::Unavailable(format!("{}: {e}", path.display())))?;
    c.busy_timeout(Duration::from_secs(5)).map_err(sql_err)?;
    // Opening is lazy: read the schema now, so an unreadable file fails here.
    c.query_row("SELECT COUNT(*) FROM sqlite_master", [], |_| Ok(()))
        .map_err(|e| StoreError::Unavailable(format!("{}: {e}", path.display())))?;
    Ok(c)
}

/// Copies the database at `from` into a new file `to`: `VACUUM INTO`, one read
/// transaction, so a daemon writing meanwhile neither waits for it nor restarts it (an
/// online backup restarted at every commit of a busy daemon, for ever).
pub fn snapshot(from: &Path, to: &Path) -> Result<()> {
    let src = open_read_only(from)?;
    src.execute("VACUUM INTO ?1", [to.display().to_string()])
        .map(|_| ())
        .map_err(|e| StoreError::Unavailable(format!("a snapshot of {}: {e}", from.display())))
}

impl Sqlite {
    pub fn open(
        path: PathBuf,
        synchronous_full: bool,
        zone: Zone,
        timeout: Duration,
        record_zone: bool,
    ) -> Sqlite {
        let jobs = Queue::new();
        let rx = jobs.clone();
        let writer = Writer {
            path: path.clone(),
            synchronous_full,
            timeout,
            zone,
            conn: None,
            retry_at: Instant::now(),
            backoff: Duration::from_millis(100),
            refused: None,
            record_zone,
            commit_log: crate::RateLog::default(),
            commit_us: 0,
        };
        let writer = Arc::new(Mutex::new(writer));
        let w = writer.clone();
        std::thread::Builder::new()
            .name("vlv-sqlite-writer".into())
            .spawn(move || writer_loop(w, rx))
            .expect("cannot start the SQLite writer thread");
        Sqlite {
            jobs,
            writer,
            last_batch_us: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            wake_scheduled: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            outage: Arc::new(Outage::new(&format!("sqlite {}", path.display()))),
            path,
            synchronous_full,
            timeout,
            readers: Mutex::new(Vec::new()),
        }
    }

    /// Records how a call went, for the outage log.
    /// Records how a call went, for the outage log. Only a write that succeeds ends an
    /// outage: reads go on working on a full or read-only disk, and letting them end it
    /// made every failed write start a new one (thousands of lines a second).
    fn record<T>(&self, r: &Result<T>, write: bool) {
        record_on(&self.outage, r, write);
    }

    /// [`Sqlite::call`] for a task: the job is queued now, the future waits for the
    /// writer's answer without holding a thread.
    fn call_async<T: Send + 'static>(
        &self,
        make: impl FnOnce(Reply<T>) -> Job,
    ) -> super::StoreFuture<T> {
        let (tx, rx) = oneshot();
        let stopped =
            || StoreError::Unavailable("the SQLite writer dropped the job (see the log)".into());
        if self.submit_deferred(make(tx)).is_err() {
            return Box::pin(std::future::ready(Err(stopped())));
        }
        let (outage, path, timeout) = (self.outage.clone(), self.path.clone(), self.timeout);
        let deadline = Instant::now() + timeout;
        Box::pin(async move {
            let r = match rx.wait_until_async(deadline).await {
                Waited::Value(r) => r,
                Waited::Dropped => Err(stopped()),
                Waited::GaveUp => Err(StoreError::Unavailable(format!(
                    "{}: no transaction within {timeout:?} (storage timeout): the database is busy or stalled",
                    path.display(),
                ))),
            };
            record_on(&outage, &r, true);
            r
        })
    }

    /// Hands a job to the writer and waits for its answer. A job the writer has not
    /// started within the storage timeout is dropped and fails; one it started is
    /// waited for, since its outcome is what counts.
    fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Job) -> Result<T> {
        let (tx, rx) = oneshot();
        let stopped =
            || StoreError::Unavailable("the SQLite writer dropped the job (see the log)".into());
        self.jobs.push(make(tx)).map_err(|_| stopped())?;
        let r = match rx.wait_until(Instant::now() + self.timeout) {
            Waited::Value(r) => r,
            Waited::Dropped => Err(stopped()),
            Waited::GaveUp => Err(StoreError::Unavailable(format!(
                "{}: no transaction within {:?} (storage timeout): the database is busy or stalled",
                self.path.display(),
                self.timeout
            ))),
        };
        self.record(&r, true);
        r
    }

    /// Queues a job from a task. The first job of a batch spawns the task that leads
    /// it: it lets the tasks that are ready now run first (and queue their jobs), then
    /// runs every queued job in one transaction on its own thread, answering them
    /// after the commit. No thread hand-off per request, and none per batch. (Woken at
    /// once, a writer thread took the core from the event loop and committed batches
    /// of one or two: 2.3 context switches per charged request, measured.) A batch
    /// runs on the writer thread instead when the writer is busy, or when the last
    /// one took longer than [`LEAD_INLINE_UNDER`] (a slow disk must not stall the
    /// event loop).
    fn submit_deferred(&self, job: Job) -> std::result::Result<(), Job> {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return self.jobs.push(job);
        };
        self.jobs.push_quiet(job)?;
        if !self.wake_scheduled.swap(true, Ordering::AcqRel) {
            let (jobs, scheduled) = (self.jobs.clone(), self.wake_scheduled.clone());
            let (writer, last) = (self.writer.clone(), self.last_batch_us.clone());
            rt.spawn(async move {
                tokio::task::yield_now().await;
                scheduled.store(false, Ordering::Release);
                let slow = last.load(Ordering::Relaxed) > LEAD_INLINE_UNDER.as_micros() as u64;
                let mut w = match writer.try_lock() {
                    Ok(w) => w,
                    // Taken as it is after a panic elsewhere (see Unpoisoned).
                    Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                    // The writer thread is on a batch: it takes these jobs next.
                    Err(std::sync::TryLockError::WouldBlock) => return jobs.wake(),
                };
                if slow {
                    // Measure again now and then: the disk may have recovered.
                    last.fetch_sub(last.load(Ordering::Relaxed) / 8, Ordering::Relaxed);
                    drop(w);
                    return jobs.wake();
                }
                let batch = jobs.take_now(MAX_BATCH);
                if batch.is_empty() {
                    return;
                }
                if let Some(back) = run_batch(&mut w, batch, true) {
                    // Another connection holds the write lock: the writer thread waits
                    // for it, not the event loop.
                    drop(w);
                    for job in back {
                        if let Err(job) = jobs.push(job) {
                            answer_err(
                                job,
                                &StoreError::Unavailable("the SQLite writer stopped".into()),
                            );
                        }
                    }
                    return;
                }
                last.store(w.commit_us, Ordering::Relaxed);
                drop(w);
                if !jobs.is_empty() {
                    // Jobs beyond MAX_BATCH, or queued by threads meanwhile.
                    jobs.wake();
                }
            });
        }
        Ok(())
    }

    fn reader(&self) -> Result<Connection> {
        if let Some(c) = self.readers.locked().pop() {
            return Ok(c);
        }
        open_conn(&self.path, self.synchronous_full, self.timeout)
    }
}

/// Records how a call went, for the outage log (see [`Sqlite::record`]).
fn record_on<T>(outage: &Outage, r: &Result<T>, write: bool) {
    match r {
        Err(StoreError::Unavailable(m)) => {
            outage.failed(m);
        }
        Err(StoreError::Busy(_)) => {}
        Ok(_) if write => outage.ok(),
        _ => {}
    }
}

impl Drop for Sqlite {
    /// The writer finishes the queued jobs, then ends (closing its connection).
    fn drop(&mut self) {
        self.jobs.close();
    }
}

impl Engine for Sqlite {
    fn exec_async(&self, stmt: Stmt) -> super::StoreFuture<Exec> {
        self.call_async(|tx| Job::Exec(stmt, tx))
    }
    fn exec_once_async(
        &self,
        ns: &str,
        token: &str,
        stmt: Stmt,
        now: i64,
    ) -> super::StoreFuture<Option<Exec>> {
        self.call_async(|tx| Job::Once(ns.to_owned(), token.to_owned(), now, stmt, tx))
    }
    fn query_async(&self, stmt: Stmt) -> super::StoreFuture<Rows> {
        // A read of a local file takes microseconds and never waits for the writer
        // (WAL): done at once on the caller's thread.
        Box::pin(std::future::ready(self.query(stmt)))
    }
    fn consume_async(&self, req: consume::Request) -> super::StoreFuture<Outcome> {
        self.call_async(|tx| Job::Consume(req, tx))
    }
    fn exec(&self, stmt: Stmt) -> Result<Exec> {
        self.call(|tx| Job::Exec(stmt, tx))
    }
    fn batch(&self, stmts: Vec<Stmt>) -> Result<Vec<Exec>> {
        self.call(|tx| Job::Batch(stmts, tx))
    }
    fn query(&self, stmt: Stmt) -> Result<Rows> {
        let r = self.reader().and_then(|c| {
            let r = query_one(&c, &stmt);
            if !matches!(r, Err(StoreError::Unavailable(_))) {
                let mut pool = self.readers.locked();
                if pool.len() < 8 {
                    pool.push(c);
                }
            }
            r
        });
        self.record(&r, false);
        r
    }
    fn consume(&self, req: consume::Request) -> Result<Outcome> {
        self.call(|tx| Job::Consume(req, tx))
    }
    fn exec_once(&self, ns: &str, token: &str, stmt: Stmt, now: i64) -> Result<Option<Exec>> {
        self.call(|tx| Job::Once(ns.to_owned(), token.to_owned(), now, stmt, tx))
    }
    fn reset(&self, ns: &str, key: &str) -> Result<u64> {
        self.call(|tx| Job::Reset(ns.to_owned(), key.to_owned(), tx))
    }
    fn expire(&self, what: &Expire, limit: usize) -> Result<u64> {
        self.call(|tx| Job::Expire(what.clone(), limit, tx))
    }
    fn ping(&self) -> Result<()> {
        self.call(Job::Ping)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::window::{Window, WindowKind, Zone};
    use consume::Part;

    fn db() -> Connection {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch(HOST_SCHEMA).unwrap();
        c
    }

    fn batch(c: &Connection, reqs: &[consume::Request]) -> Vec<Outcome> {
        c.execute_batch("BEGIN IMMEDIATE").unwrap();
        let r = ready(consume::run_batch(&mut ConnTx(c), Dialect::Sqlite, reqs)).unwrap();
        c.execute_batch("COMMIT").unwrap();
        r
    }

    fn dump(c: &Connection) -> Vec<String> {
        let mut out = Vec::new();
        for sql in [
            "SELECT ns, ckey, win, period, used FROM vlv_counter WHERE used > 0 ORDER BY 1, 2, 3",
            "SELECT ns, ckey, win, bucket, used FROM vlv_slide WHERE used > 0 ORDER BY 1, 2, 3, 4",
            "SELECT ns, token, at FROM vlv_once ORDER BY 1, 2",
        ] {
            let r = query_one(c, &Stmt::new(sql, vec![])).unwrap();
            out.extend(r.rows.iter().map(|row| format!("{row:?}")));
        }
        out
    }

    /// The batch algorithm reads every row once and writes back at the end; one request
    /// per batch is the plain sequential case. Random mixes of keys, windows (calendar
    /// and sliding), limits, amounts, peeks, tokens and requests charging several keys
    /// together must decide identically and leave identical tables.
    #[test]
    fn a_batch_decides_exactly_as_its_requests_one_by_one() {
        let (a, b) = (db(), db());
        let mut seed: u64 = 0x5eed_1234_abcd_0001;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let kinds = [
            WindowKind::Hour,
            WindowKind::Day,
            WindowKind::Month,
            WindowKind::Sliding(120),
            WindowKind::Sliding(3600),
        ];
        let mut now = 1_795_355_110;
        for _round in 0..60 {
            let mut reqs = Vec::new();
            for _ in 0..1 + next(40) {
                now += next(30) as i64;
                let mut parts: Vec<Part> = Vec::new();
                for _ in 0..1 + next(3) {
                    let key = format!("k{}", next(4));
                    if parts.iter().any(|p| p.key == key) {
                        continue;
                    }
                    let mut windows: Vec<Window> = Vec::new();
                    for _ in 0..1 + next(3) {
                        let kind = kinds[next(kinds.len() as u64) as usize];
                        if windows.iter().all(|w| w.kind != kind) {
                            let limit = next(12) as i64 - 1;
                            windows.push(Window { kind, limit });
                        }
                    }
                    parts.push(Part {
                        key,
                        amount: next(4) as i64,
                        windows,
                    });
                }
                reqs.push(consume::Request {
                    then: Vec::new(),
                    ns: ["m", "n"][next(2) as usize].into(),
                    parts,
                    now,
                    peek: next(5) == 0,
                    zone: Zone::UTC,
                    once: (next(3) == 0).then(|| format!("t{}", next(6))),
                });
            }
            let together = batch(&a, &reqs);
            let alone: Vec<Outcome> = reqs
                .iter()
                .flat_map(|r| batch(&b, std::slice::from_ref(r)))
                .collect();
            assert_eq!(together, alone, "requests: {reqs:#?}");
            assert_eq!(dump(&a), dump(&b));
        }
        let admitted = dump(&a).len();
        assert!(
            admitted > 20,
            "the random mix charged too little to mean anything: {admitted}"
        );
    }
}
