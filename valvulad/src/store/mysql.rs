//! MySQL 8 / MariaDB 10.x through a connection pool (mysql_async, prepared statements
//! cached per connection). One short transaction per consumption; InnoDB row locks make
//! it exact across daemons, and the server's group commit amortises the fsyncs.
//!
//! While the database is down, calls fail at once for a backoff period (0.25 s doubling
//! to 10 s) instead of each waiting for a connect timeout, so Postfix gets the
//! listener's on-error answer quickly; the first call after the backoff tries again.

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, OptsBuilder, Params, Pool, PoolConstraints, PoolOpts, TxOpts};

use super::consume::{self, Tx};
use super::window::Consumption;
use super::{Dialect, Engine, Exec, Result, Rows, Stmt, StoreError, Value};
use crate::sync::{Answer, Promise};

const HOST_SCHEMA: &str = include_str!("../../../sql/mysql/host.sql");
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Deadlocks and lock-wait timeouts are retried this often before giving up.
const RETRIES: usize = 5;

/// Consumption lanes: a key always goes to the same lane, so this daemon's batches
/// never wait on each other's row locks; several lanes keep the database busy while one
/// waits for its commit.
const LANES: usize = 4;
/// Consumptions one lane decides in one transaction at most.
const MAX_BATCH: usize = 256;

pub struct Mysql {
    shared: Arc<Shared>,
    runtime: tokio::runtime::Handle,
    lanes: Vec<tokio::sync::mpsc::UnboundedSender<Work>>,
}

/// What the calling threads and the lane tasks share.
struct Shared {
    pool: Pool,
    schema_ready: AtomicBool,
    health: Mutex<Health>,
}

struct Health {
    retry_at: Option<Instant>,
    backoff: Duration,
}

fn err(e: mysql_async::Error) -> StoreError {
    match e {
        mysql_async::Error::Server(s) => StoreError::Sql(format!("{} ({})", s.message, s.code)),
        other => StoreError::Unavailable(other.to_string()),
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

fn hash_of(h: impl Hash) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    h.hash(&mut hasher);
    hasher.finish()
}

fn wait<T>(rx: Answer<Result<T>>) -> Result<T> {
    let wait = || {
        rx.wait()
            .unwrap_or_else(|| Err(StoreError::Unavailable("the runtime stopped".into())))
    };
    // On a runtime thread (a NONBLOCKING module, or startup code in an async context)
    // hand the thread's other work away while waiting.
    if tokio::runtime::Handle::try_current().is_ok() {
        tokio::task::block_in_place(wait)
    } else {
        wait()
    }
}

impl Shared {
    /// While the database is down, fails at once until the next attempt is due.
    fn fail_fast(&self) -> Result<()> {
        let h = self.health.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(at) = h.retry_at
            && Instant::now() < at
        {
            return Err(StoreError::Unavailable(format!(
                "database down; next attempt in {:?}",
                at - Instant::now()
            )));
        }
        Ok(())
    }

    /// Runs `f` on a pooled connection (creating the host tables first, once) and
    /// records whether the database answered.
    async fn attempt<T, F>(&self, f: F) -> Result<T>
    where
        F: for<'c> FnOnce(
            &'c mut Conn,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<T>> + Send + 'c>,
        >,
    {
        let schema_needed = !self.schema_ready.load(Ordering::Acquire);
        let r = async {
            let mut conn = tokio::time::timeout(CONNECT_TIMEOUT, self.pool.get_conn())
                .await
                .map_err(|_| {
                    StoreError::Unavailable(format!("no connection within {CONNECT_TIMEOUT:?}"))
                })?
                .map_err(err)?;
            if schema_needed {
                for stmt in schema_statements(HOST_SCHEMA) {
                    conn.query_drop(stmt).await.map_err(err)?;
                }
            }
            f(&mut conn).await
        }
        .await;
        let mut h = self.health.lock().unwrap_or_else(|e| e.into_inner());
        match &r {
            Err(StoreError::Unavailable(e)) => {
                if h.retry_at.is_none() {
                    tracing::error!(
                        "database unavailable: {e}; requests that need it get the on-error action"
                    );
                }
                h.retry_at = Some(Instant::now() + h.backoff);
                h.backoff = (h.backoff * 2).min(Duration::from_secs(10));
            }
            _ => {
                if h.retry_at.take().is_some() {
                    tracing::info!("database reachable again");
                }
                h.backoff = Duration::from_millis(250);
                if schema_needed && r.is_ok() {
                    self.schema_ready.store(true, Ordering::Release);
                }
            }
        }
        r
    }

    /// Runs a batch of writes and consumptions in one transaction, retrying the whole
    /// batch on deadlock (InnoDB rolled all of it back). A write's own failure (a
    /// constraint, say) undoes only that statement, as MySQL does, and is its answer.
    async fn run_lane_batch(&self, batch: Arc<LaneBatch>) -> Result<LaneResults> {
        let mut attempt = 0;
        loop {
            self.fail_fast()?;
            let batch = batch.clone();
            let r = self
                .attempt(|c| {
                    Box::pin(async move {
                        let mut tx = c.start_transaction(TxOpts::default()).await.map_err(err)?;
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
                                Err(e)
                                    if retryable(&e) || matches!(e, StoreError::Unavailable(_)) =>
                                {
                                    return Err(e);
                                }
                                r => writes.push(r),
                            }
                        }
                        let consumed = if batch.consumes.is_empty() {
                            Vec::new()
                        } else {
                            consume::run_batch(&mut MyTx(&mut tx), Dialect::Mysql, &batch.consumes)
                                .await?
                        };
                        tx.commit().await.map_err(err)?;
                        Ok(LaneResults { writes, consumed })
                    })
                })
                .await;
            match r {
                Err(e) if retryable(&e) && attempt < RETRIES => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(2 << attempt)).await;
                }
                r => return r,
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

/// Work sent to a lane, with where its answer goes.
enum Work {
    Consume(consume::Request, Promise<Result<Consumption>>),
    Write(Write, Promise<Result<Option<Exec>>>),
}

/// What one lane transaction runs: writes first (in arrival order), then the
/// consumptions as one batch.
struct LaneBatch {
    writes: Vec<Write>,
    consumes: Vec<consume::Request>,
}

struct LaneResults {
    writes: Vec<Result<Option<Exec>>>,
    consumed: Vec<Consumption>,
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
        for w in batch.drain(..) {
            match w {
                Work::Write(w, tx) => {
                    writes.push(w);
                    write_tx.push(tx);
                }
                Work::Consume(r, tx) => {
                    consumes.push(r);
                    consume_tx.push(tx);
                }
            }
        }
        match shared
            .run_lane_batch(Arc::new(LaneBatch { writes, consumes }))
            .await
        {
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
    }
}

impl Mysql {
    pub fn open(
        url: &str,
        password: Option<String>,
        pool_size: usize,
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
            .setup(vec![
                "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
            ]);
        if password.is_some() {
            b = b.pass(password);
        }
        let _guard = runtime.enter();
        let shared = Arc::new(Shared {
            pool: Pool::new(b),
            schema_ready: AtomicBool::new(false),
            health: Mutex::new(Health {
                retry_at: None,
                backoff: Duration::from_millis(250),
            }),
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
    /// (non-runtime) thread.
    fn run<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(
                &'c mut Conn,
            ) -> std::pin::Pin<
                Box<dyn std::future::Future<Output = Result<T>> + Send + 'c>,
            > + Send
            + 'static,
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
            tx.send(shared.attempt(f).await);
        });
        wait(rx)
    }

    fn with_retries<T>(&self, mut f: impl FnMut() -> Result<T>) -> Result<T> {
        let mut attempt = 0;
        loop {
            match f() {
                Err(e) if retryable(&e) && attempt < RETRIES => {
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(2 << attempt));
                }
                r => return r,
            }
        }
    }
}

impl Mysql {
    /// Hands work to the lane the hash `h` of its key picks (one key always to one
    /// lane, so this daemon's transactions on one row never wait on each other's locks)
    /// and waits for the answer, sent after the lane's commit.
    fn submit<T>(&self, h: u64, work: impl FnOnce(Promise<Result<T>>) -> Work) -> Result<T> {
        self.shared.fail_fast()?;
        let lane = &self.lanes[h as usize % self.lanes.len()];
        let (tx, rx) = crate::sync::oneshot();
        if lane.send(work(tx)).is_err() {
            return Err(StoreError::Unavailable("the runtime stopped".into()));
        }
        wait(rx)
    }

    /// A write goes to the lane of its statement and values.
    fn write(&self, w: Write) -> Result<Option<Exec>> {
        let key = match &w {
            Write::Exec(s) | Write::Once { stmt: s, .. } => format!("{}{:?}", s.sql, s.params),
        };
        self.submit(hash_of(key), |tx| Work::Write(w, tx))
    }
}

impl Engine for Mysql {
    fn exec(&self, stmt: Stmt) -> Result<Exec> {
        if super::is_dml(&stmt.sql) {
            return self.write(Write::Exec(stmt)).map(|e| e.unwrap_or_default());
        }
        self.with_retries(|| {
            let s = stmt.clone();
            self.run(move |c| {
                Box::pin(async move {
                    c.exec_drop(s.sql, params(s.params)).await.map_err(err)?;
                    Ok(Exec {
                        affected: c.affected_rows(),
                        last_insert_id: c.last_insert_id().unwrap_or(0) as i64,
                    })
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
        self.with_retries(|| {
            let stmts = stmts.clone();
            self.run(move |c| {
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
        })
    }

    fn query(&self, stmt: Stmt) -> Result<Rows> {
        self.with_retries(|| {
            let s = stmt.clone();
            self.run(move |c| Box::pin(async move { query_rows(c, &s.sql, s.params).await }))
        })
    }

    fn consume(&self, req: consume::Request) -> Result<Consumption> {
        self.submit(hash_of((&req.ns, &req.key)), |tx| Work::Consume(req, tx))
    }

    fn reset(&self, ns: &str, key: &str) -> Result<u64> {
        let (ns, key) = (ns.to_owned(), key.to_owned());
        self.with_retries(|| {
            let (ns, key) = (ns.clone(), key.clone());
            self.run(move |c| {
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
        })
    }

    fn maintain(&self, now: i64) -> Result<u64> {
        self.run(move |c| {
            Box::pin(async move {
                c.exec_drop("DELETE FROM vlv_slide WHERE expires < ?", (now,))
                    .await
                    .map_err(err)?;
                let a = c.affected_rows();
                c.exec_drop(
                    "DELETE FROM vlv_once WHERE at < ?",
                    (now - valvula_abi::VLV_ONCE_KEEP_SECONDS,),
                )
                .await
                .map_err(err)?;
                Ok(a + c.affected_rows())
            })
        })
    }

    fn ping(&self) -> Result<()> {
        self.run(|c| Box::pin(async move { c.query_drop("SELECT 1").await.map_err(err) }))
    }
}
