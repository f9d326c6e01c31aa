//! SQLite: one writer thread with group commit, a small pool of reader connections.
//!
//! Every write (module statements, consumptions, resets) goes to the writer. It takes
//! all the jobs waiting, opens one `BEGIN IMMEDIATE` transaction, runs each job inside
//! its own SAVEPOINT (a refused or failed job is rolled back alone), commits once, and
//! only then answers every job: one fsync for many consumptions, and no reply before its
//! charge is durable. `BEGIN IMMEDIATE` also serialises writers of other processes on
//! the same file, so two daemons on one SQLite file stay exact.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use rusqlite::{Connection, OpenFlags, params_from_iter};

use super::consume::{self, Tx};
use super::window::Consumption;
use super::{Dialect, Engine, Exec, Result, Rows, Stmt, StoreError, Value};

/// Jobs one transaction takes at most.
const MAX_BATCH: usize = 512;
const HOST_SCHEMA: &str = include_str!("../../../sql/sqlite/host.sql");

type Reply<T> = Sender<Result<T>>;

enum Job {
    Exec(Stmt, Reply<Exec>),
    Batch(Vec<Stmt>, Reply<Vec<Exec>>),
    Consume(consume::Request, Reply<Consumption>),
    Reset(String, String, Reply<u64>),
    Maintain(i64, Reply<u64>),
    Ping(Reply<()>),
}

pub struct Sqlite {
    jobs: Sender<Job>,
    path: PathBuf,
    synchronous_full: bool,
    readers: Mutex<Vec<Connection>>,
}

fn sql_err(e: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode::*;
    match e.sqlite_error_code() {
        Some(
            CannotOpen | DatabaseBusy | DatabaseLocked | ReadOnly | DiskFull | SystemIoFailure
            | NotADatabase | DatabaseCorrupt | PermissionDenied,
        ) => StoreError::Unavailable(e.to_string()),
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

fn open_conn(path: &PathBuf, synchronous_full: bool) -> Result<Connection> {
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
    c.busy_timeout(Duration::from_secs(5)).map_err(sql_err)?;
    c.pragma_update(None, "journal_mode", "WAL")
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
    async fn exec(&mut self, sql: &str, params: Vec<Value>) -> Result<u64> {
        exec_one(self.0, &Stmt::new(sql, params)).map(|e| e.affected)
    }
    async fn rows(&mut self, sql: &str, params: Vec<Value>) -> Result<Vec<Vec<Value>>> {
        query_one(self.0, &Stmt::new(sql, params)).map(|r| r.rows)
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

/// The writer's connection, reopened with backoff after failures.
struct Writer {
    path: PathBuf,
    synchronous_full: bool,
    conn: Option<Connection>,
    retry_at: Instant,
    backoff: Duration,
}

impl Writer {
    fn conn(&mut self) -> Result<&Connection> {
        if self.conn.is_none() {
            if Instant::now() < self.retry_at {
                return Err(StoreError::Unavailable(format!(
                    "{}: not reachable; retrying in {:?}",
                    self.path.display(),
                    self.retry_at - Instant::now()
                )));
            }
            match open_conn(&self.path, self.synchronous_full).and_then(|c| {
                c.execute_batch(HOST_SCHEMA).map_err(sql_err)?;
                Ok(c)
            }) {
                Ok(c) => {
                    if self.backoff > Duration::from_millis(250) {
                        tracing::info!(database = %self.path.display(), "database is reachable again");
                    }
                    self.conn = Some(c);
                    self.backoff = Duration::from_millis(250);
                }
                Err(e) => {
                    self.retry_at = Instant::now() + self.backoff;
                    self.backoff = (self.backoff * 2).min(Duration::from_secs(10));
                    tracing::error!(database = %self.path.display(), "cannot open the database: {e}");
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
    fn run(&mut self, jobs: Vec<Job>) {
        let conn = match self.conn() {
            Ok(c) => c,
            Err(e) => return answer_all(jobs, &e),
        };
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE").map_err(sql_err) {
            self.failed(&e);
            return answer_all(jobs, &e);
        }
        let mut done: Vec<(Job, Done)> = Vec::with_capacity(jobs.len());
        for job in jobs {
            if let Err(e) = conn.execute_batch("SAVEPOINT job").map_err(sql_err) {
                done.push((job, Done::Failed(e)));
                continue;
            }
            let (result, keep) = run_job(conn, &job);
            let end = if keep {
                "RELEASE job"
            } else {
                "ROLLBACK TO job; RELEASE job"
            };
            if let Err(e) = conn.execute_batch(end).map_err(sql_err) {
                done.push((job, Done::Failed(e)));
                continue;
            }
            done.push((job, result));
        }
        if let Err(e) = conn.execute_batch("COMMIT").map_err(sql_err) {
            let _ = conn.execute_batch("ROLLBACK");
            tracing::error!(
                "commit failed, {} job(s) answered with an error: {e}",
                done.len()
            );
            self.failed(&e);
            for (job, _) in done {
                answer(job, Done::Failed(e.clone()));
            }
            return;
        }
        for (job, result) in done {
            answer(job, result);
        }
    }
}

/// A job's result, held until the commit.
enum Done {
    Exec(Exec),
    Batch(Vec<Exec>),
    Consumption(Consumption),
    Count(u64),
    Unit,
    Failed(StoreError),
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
        Job::Consume(req, _) => {
            let r = ready(consume::run(&mut ConnTx(c), Dialect::Sqlite, req));
            return match r {
                Ok(cons) => {
                    let keep = !consume::keeps_nothing(req, &cons);
                    (Done::Consumption(cons), keep)
                }
                Err(e) => (Done::Failed(e), false),
            };
        }
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
        Job::Maintain(now, _) => c
            .execute("DELETE FROM vlv_slide WHERE expires < ?1", [now])
            .map(|n| Done::Count(n as u64))
            .map_err(sql_err),
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
        let _ = tx.send(r);
    }
    let wrong = || StoreError::Sql("internal: result does not match the job".into());
    match (job, d) {
        (j, Done::Failed(e)) => answer_err(j, &e),
        (Job::Exec(_, tx), Done::Exec(x)) => send(tx, Ok(x)),
        (Job::Batch(_, tx), Done::Batch(x)) => send(tx, Ok(x)),
        (Job::Consume(_, tx), Done::Consumption(x)) => send(tx, Ok(x)),
        (Job::Reset(.., tx), Done::Count(x)) | (Job::Maintain(_, tx), Done::Count(x)) => {
            send(tx, Ok(x))
        }
        (Job::Ping(tx), Done::Unit) => send(tx, Ok(())),
        (j, _) => answer_err(j, &wrong()),
    }
}

fn answer_err(job: Job, e: &StoreError) {
    let e = e.clone();
    let _ = match job {
        Job::Exec(_, tx) => tx.send(Err(e)).is_ok(),
        Job::Batch(_, tx) => tx.send(Err(e)).is_ok(),
        Job::Consume(_, tx) => tx.send(Err(e)).is_ok(),
        Job::Reset(.., tx) | Job::Maintain(_, tx) => tx.send(Err(e)).is_ok(),
        Job::Ping(tx) => tx.send(Err(e)).is_ok(),
    };
}

fn answer_all(jobs: Vec<Job>, e: &StoreError) {
    for j in jobs {
        answer_err(j, e);
    }
}

fn writer_loop(mut w: Writer, rx: Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        w.run(jobs);
    }
}

impl Sqlite {
    pub fn open(path: PathBuf, synchronous_full: bool) -> Sqlite {
        let (tx, rx) = crossbeam_channel::unbounded();
        let writer = Writer {
            path: path.clone(),
            synchronous_full,
            conn: None,
            retry_at: Instant::now(),
            backoff: Duration::from_millis(250),
        };
        std::thread::Builder::new()
            .name("vlv-sqlite-writer".into())
            .spawn(move || writer_loop(writer, rx))
            .expect("cannot start the SQLite writer thread");
        Sqlite {
            jobs: tx,
            path,
            synchronous_full,
            readers: Mutex::new(Vec::new()),
        }
    }

    fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Job) -> Result<T> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.jobs
            .send(make(tx))
            .map_err(|_| StoreError::Unavailable("the SQLite writer has stopped".into()))?;
        rx.recv()
            .map_err(|_| StoreError::Unavailable("the SQLite writer has stopped".into()))?
    }

    fn reader(&self) -> Result<Connection> {
        if let Some(c) = self.readers.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Ok(c);
        }
        open_conn(&self.path, self.synchronous_full)
    }
}

impl Engine for Sqlite {
    fn exec(&self, stmt: Stmt) -> Result<Exec> {
        self.call(|tx| Job::Exec(stmt, tx))
    }
    fn batch(&self, stmts: Vec<Stmt>) -> Result<Vec<Exec>> {
        self.call(|tx| Job::Batch(stmts, tx))
    }
    fn query(&self, stmt: Stmt) -> Result<Rows> {
        let c = self.reader()?;
        let r = query_one(&c, &stmt);
        if !matches!(r, Err(StoreError::Unavailable(_))) {
            let mut pool = self.readers.lock().unwrap_or_else(|e| e.into_inner());
            if pool.len() < 8 {
                pool.push(c);
            }
        }
        r
    }
    fn consume(&self, req: consume::Request) -> Result<Consumption> {
        self.call(|tx| Job::Consume(req, tx))
    }
    fn reset(&self, ns: &str, key: &str) -> Result<u64> {
        self.call(|tx| Job::Reset(ns.to_owned(), key.to_owned(), tx))
    }
    fn maintain(&self, now: i64) -> Result<u64> {
        self.call(|tx| Job::Maintain(now, tx))
    }
    fn ping(&self) -> Result<()> {
        self.call(Job::Ping)
    }
}
