//! Storage: SQL for modules and exact counters, over SQLite (embedded default) or
//! MySQL/MariaDB (shared by several daemons).
//!
//! Exactness comes from the database, not from locks in this process: a consumption is
//! one short transaction of conditional statements (`UPDATE ... WHERE used + n <= limit`,
//! affected rows say yes or no), so two daemons on one MariaDB database admit exactly the
//! limit between them. A consumption is answered only after its transaction committed.
//!
//! Modules call in either synchronously from their worker threads, or (ABI 0.5) with
//! the `_async` forms from the request's own task, which waits for the commit without
//! holding a thread. The backends group the calls of many requests into one
//! transaction either way (a group-commit writer thread for SQLite, lanes on the async
//! pool for MySQL).

mod clock;
mod consume;
mod mysql;
mod outage;
pub mod ratelog;
mod sqlite;
pub mod sync;
pub mod window;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The target of this crate's log events: the daemon's, so an operator's filter
/// (`valvulad=debug`) covers the storage as it did when it was part of the daemon.
pub const LOG_TARGET: &str = "valvulad::store";

pub use clock::Clock;
pub use consume::Outcome;
pub use ratelog::RateLog;
pub use window::{Consumption, Window, WindowKind, WindowState, Zone};

/// A value bound to a `?` placeholder or read from a result cell.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Float(f64),
    Text(String),
    Blob(Vec<u8>),
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_owned())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// One statement and its parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct Stmt {
    pub sql: String,
    pub params: Vec<Value>,
}

impl Stmt {
    pub fn new(sql: impl Into<String>, params: Vec<Value>) -> Self {
        Stmt {
            sql: sql.into(),
            params,
        }
    }
}

/// What a statement changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Exec {
    pub affected: u64,
    pub last_insert_id: i64,
}

/// A query result: column names and rows of cells.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rows {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Value>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Mysql,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached (or is failing); retried with backoff.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The statement failed (syntax, constraint, type).
    #[error("SQL error: {0}")]
    Sql(String),
    /// The call itself was wrong (bad key, window, literal in SQL text).
    #[error("{0}")]
    Invalid(String),
    /// Another transaction took what this one counted on (a `consume_once` token);
    /// retried, like a deadlock.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The database belongs to daemons configured differently (another time zone for
    /// its calendar windows): this daemon must not count in it.
    #[error("{0}")]
    Refused(String),
    /// The database stopped answering while a commit was under way: the changes may or
    /// may not have been kept.
    #[error("commit outcome unknown: {0}")]
    InDoubt(String),
    /// The database is up but could not do this in time: a lock held by another
    /// transaction (another daemon's, an operator's), deadlocks that retries did not
    /// resolve. Only the calls that met it fail; it is no outage.
    #[error("database busy: {0}")]
    Busy(String),
    /// A value the database cannot store or compare (a character outside a column's
    /// charset, a number out of a column's range, a text too long): a problem of the
    /// request's data, not of the module or the database.
    #[error("value refused by the database: {0}")]
    Data(String),
}

impl StoreError {
    /// Whether the error is the database's state (away, stalled, refusing this daemon)
    /// rather than something wrong with the call: a caller is not at fault for it.
    pub fn is_outage(&self) -> bool {
        matches!(
            self,
            StoreError::Unavailable(_)
                | StoreError::Busy(_)
                | StoreError::Refused(_)
                | StoreError::InDoubt(_)
        )
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// The `[storage]` section.
#[derive(Clone, Debug, PartialEq)]
pub enum Backend {
    Sqlite {
        path: PathBuf,
        /// `PRAGMA synchronous`: FULL (every commit reaches the disk) or NORMAL (a power
        /// loss may lose the last commits; a crash of the daemon never does).
        synchronous_full: bool,
    },
    Mysql {
        /// `mysql://user@host:port/db`
        url: String,
        password: Option<String>,
        pool_size: usize,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct StorageConfig {
    pub backend: Backend,
    /// The zone of calendar windows; stored in the database by the first daemon, and
    /// every other daemon on it must agree.
    pub zone: Zone,
    /// How long one storage call may take (waiting for a connection, a lock, the
    /// statements) before it fails as unavailable. Well under the module timeout, so a
    /// stalled database gives Postfix the on-error answer quickly instead of holding
    /// every request for the whole module timeout.
    pub timeout: Duration,
    /// Record `zone` in a database that has none yet: a daemon does; a tool
    /// (valvula-ctl, `valvulad -t`) only checks, so an administrator's shell zone never
    /// becomes the database's.
    pub record_zone: bool,
}

/// The default of `[storage] timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

impl StorageConfig {
    /// A one-line description without secrets, for logs.
    pub fn describe(&self) -> String {
        match &self.backend {
            Backend::Sqlite { path, .. } => format!("sqlite {}", path.display()),
            Backend::Mysql { url, .. } => format!("mysql {}", redact_url(url)),
        }
    }
}

/// A MySQL URL with any password replaced, for messages and logs.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}")
        }
        _ => url.to_owned(),
    }
}

/// A batch of rows [`Store::maintain`] deletes in one short transaction.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Expire {
    /// Calendar counter rows of window `win` whose period started before `before`: they
    /// count as 0 anyway (a row of an older period reads as unused).
    Counters { win: String, before: i64 },
    /// Head rows of sliding windows (MySQL's lock anchors) whose last bucket expired
    /// before `before`.
    SlidingHeads { before: i64 },
    /// Sliding-window buckets no window counts any more.
    Buckets { before: i64 },
    /// `consume_once` tokens recorded before `before`.
    Tokens { before: i64 },
}

/// The answer of a storage call made from a task: submitted when the call was made
/// (so it joins the next batch whether or not it is awaited at once), resolved after
/// its transaction committed.
pub type StoreFuture<T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T>> + Send + 'static>>;

fn ready<T: Send + 'static>(r: Result<T>) -> StoreFuture<T> {
    Box::pin(std::future::ready(r))
}

/// What a backend does; [`Store`] validates before calling it.
pub(crate) trait Engine: Send + Sync {
    /// A write (INSERT, UPDATE, DELETE, REPLACE) from a task.
    fn exec_async(&self, stmt: Stmt) -> StoreFuture<Exec>;
    fn exec_once_async(
        &self,
        ns: &str,
        token: &str,
        stmt: Stmt,
        now: i64,
    ) -> StoreFuture<Option<Exec>>;
    fn query_async(&self, stmt: Stmt) -> StoreFuture<Rows>;
    fn consume_async(&self, req: consume::Request) -> StoreFuture<Outcome>;
    fn exec(&self, stmt: Stmt) -> Result<Exec>;
    fn batch(&self, stmts: Vec<Stmt>) -> Result<Vec<Exec>>;
    fn query(&self, stmt: Stmt) -> Result<Rows>;
    fn consume(&self, req: consume::Request) -> Result<Outcome>;
    /// `exec` at most once per token; `None` when done before under it.
    fn exec_once(&self, ns: &str, token: &str, stmt: Stmt, now: i64) -> Result<Option<Exec>>;
    fn reset(&self, ns: &str, key: &str) -> Result<u64>;
    /// Deletes at most `limit` rows of one kind, in one transaction; the rows deleted.
    fn expire(&self, what: &Expire, limit: usize) -> Result<u64>;
    fn ping(&self) -> Result<()>;
}

/// The storage service.
pub struct Store {
    engine: Box<dyn Engine>,
    dialect: Dialect,
    zone: Zone,
    describe: String,
    /// A check ([`Store::open_check`]): writes to a MySQL database are not run.
    check: bool,
    /// A check on SQLite: the private directory of the snapshot it runs on.
    _scratch: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.describe)
            .finish()
    }
}

/// Bytes of a stored key or token (the columns' size). Longer ones are stored as a
/// readable prefix and a SHA-256 digest of the whole ([`valvula_module::bounded`]), so
/// an identity of any length Postfix can send is counted like any other.
pub const MAX_KEY_BYTES: usize = 512;
pub const MAX_NAMESPACE_BYTES: usize = 64;
pub const MAX_WINDOWS: usize = 16;
/// Keys charged together by one [`Store::consume_all`] at most.
pub const MAX_PARTS: usize = 16;
/// Statements made with one admitted charge at most.
pub const MAX_THEN: usize = 16;
/// Rows one maintenance transaction deletes at most: a few milliseconds of work, so no
/// request waits behind the housekeeping for longer.
pub const EXPIRE_BATCH: usize = 500;

/// Refuses SQL text with quoted literals: values go in as parameters, always. (Quoted
/// identifiers use backticks, which stay allowed.)
/// CREATE or ALTER: a schema statement.
fn is_ddl(sql: &str) -> bool {
    let head: String = sql
        .trim_start()
        .chars()
        .take(6)
        .collect::<String>()
        .to_ascii_uppercase();
    head == "CREATE" || head == "ALTER "
}

fn check_sql(sql: &str) -> Result<()> {
    // Schema statements may quote (a column's DEFAULT '', a COMMENT): they carry no
    // request value, and a table definition cannot take `?` parameters.
    if (sql.contains('\'') || sql.contains('"')) && !is_ddl(sql) {
        return Err(StoreError::Invalid(
            "SQL text contains a quoted literal; pass values as ? parameters".into(),
        ));
    }
    if sql.trim().is_empty() {
        return Err(StoreError::Invalid("empty SQL statement".into()));
    }
    Ok(())
}

/// A namespace: 1 to `max` bytes (the host chooses them, from module names).
fn sized(what: &str, v: &str, max: usize) -> Result<()> {
    if v.is_empty() || v.len() > max {
        return Err(StoreError::Invalid(format!(
            "{what} must be 1 to {max} bytes, got {}",
            v.len()
        )));
    }
    Ok(())
}

/// A key or token as stored: any non-empty text; one longer than [`MAX_KEY_BYTES`] is
/// stored in its bounded form. Keys come from request data (a sender of 2,000 bytes is
/// valid mail), so their length must never fail a call.
pub fn stored_key(what: &str, v: &str) -> Result<String> {
    if v.is_empty() {
        return Err(StoreError::Invalid(format!("{what} is empty")));
    }
    Ok(valvula_module::bounded(v, MAX_KEY_BYTES).into_owned())
}

/// Whether a statement is plain DML (INSERT, UPDATE, DELETE, REPLACE): the writes
/// `exec_once` takes, and the only ones MySQL lanes may group (DDL commits implicitly).
pub(crate) fn is_dml(sql: &str) -> bool {
    let head: String = sql.trim_start().chars().take(7).collect();
    ["INSERT", "UPDATE", "DELETE", "REPLACE"]
        .iter()
        .any(|k| head.to_ascii_uppercase().starts_with(k))
}

/// Checks that the calendar zone recorded in the database (`None`: none yet) gives the
/// same calendar as this daemon's. Daemons that disagree on when a day starts would
/// reset each other's counters, so a daemon configured otherwise must not count there.
pub(crate) fn agree_on_zone(stored: Option<&str>, ours: Zone) -> Result<()> {
    let Some(stored) = stored else {
        return Ok(());
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let theirs = Zone::parse(stored).ok();
    if theirs.is_some_and(|t| t.same_calendar(&ours, now)) {
        return Ok(());
    }
    Err(StoreError::Refused(format!(
        "the database's calendar windows follow the time zone {stored:?} (recorded by the \
         first daemon that used it), but this daemon's [storage] time_zone is {:?}: days and \
         months would start at other times and the daemons would reset each other's \
         counters. Set time_zone = {stored:?} in [storage]; to move the database to another \
         zone, stop every daemon using it, then delete the row: DELETE FROM vlv_meta WHERE \
         name = 'time_zone'",
        ours.name()
    )))
}

/// One key of a [`Store::consume_all`].
#[derive(Clone, Copy, Debug)]
pub struct Charge<'a> {
    pub key: &'a str,
    pub amount: i64,
    pub windows: &'a [Window],
}

/// Whether valvulad could create an SQLite database at `path` (it does not exist
/// yet): the daemon makes missing directories, so the nearest one that exists must be a
/// directory this process may write in.
fn sqlite_creatable(path: &std::path::Path) -> Result<()> {
    let mut dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    let problem = loop {
        match std::fs::metadata(dir) {
            Ok(m) if !m.is_dir() => break Some(format!("{} is not a directory", dir.display())),
            Ok(_) => {
                break rustix::fs::access(dir, rustix::fs::Access::WRITE_OK)
                    .err()
                    .map(|e| format!("{} is not writable: {e}", dir.display()));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match dir.parent() {
                Some(up) if !up.as_os_str().is_empty() => dir = up,
                _ => break None,
            },
            Err(e) => break Some(format!("{}: {e}", dir.display())),
        }
    };
    match problem {
        Some(p) => Err(StoreError::Unavailable(format!(
            "{}: the database cannot be created: {p}",
            path.display()
        ))),
        None => Ok(()),
    }
}

impl Store {
    /// Opens the configured backend. Never fails because the database is down: the
    /// backends connect lazily and retry; see [`Store::ping`].
    pub fn open(config: &StorageConfig, runtime: tokio::runtime::Handle) -> Result<Arc<Store>> {
        let (engine, dialect): (Box<dyn Engine>, Dialect) = match &config.backend {
            Backend::Sqlite {
                path,
                synchronous_full,
            } => (
                Box::new(sqlite::Sqlite::open(
                    path.clone(),
                    *synchronous_full,
                    config.zone,
                    config.timeout,
                    config.record_zone,
                )),
                Dialect::Sqlite,
            ),
            Backend::Mysql {
                url,
                password,
                pool_size,
            } => (
                Box::new(mysql::Mysql::open(
                    url,
                    password.clone(),
                    *pool_size,
                    config.zone,
                    config.timeout,
                    config.record_zone,
                    false,
                    runtime,
                )?),
                Dialect::Mysql,
            ),
        };
        Ok(Arc::new(Store {
            engine,
            dialect,
            zone: config.zone,
            describe: config.describe(),
            check: false,
            _scratch: None,
        }))
    }

    /// Opens the configured backend for a check (`valvulad -t`, `-b`) that must write
    /// nothing: SQLite runs on a private snapshot of the database file (an empty one
    /// when there is no file yet), so modules' schema statements are really tried; on
    /// MySQL the host's tables are looked at, not created, and statements other than
    /// queries are logged and not run.
    pub fn open_check(
        config: &StorageConfig,
        runtime: tokio::runtime::Handle,
    ) -> Result<Arc<Store>> {
        let config = StorageConfig {
            record_zone: false,
            ..config.clone()
        };
        match &config.backend {
            Backend::Sqlite {
                path,
                synchronous_full,
            } => {
                let scratch = tempfile::Builder::new()
                    .prefix("valvulad-check")
                    .tempdir()
                    .map_err(|e| StoreError::Unavailable(format!("a scratch directory: {e}")))?;
                let copy = scratch.path().join("check.db");
                if path.exists() {
                    sqlite::snapshot(path, &copy)?;
                } else {
                    sqlite_creatable(path)?;
                    tracing::info!(target: LOG_TARGET,
                        "{} does not exist yet: checked against an empty database (valvulad creates it at its first start)",
                        path.display()
                    );
                }
                let engine = sqlite::Sqlite::open(
                    copy,
                    *synchronous_full,
                    config.zone,
                    config.timeout,
                    false,
                );
                Ok(Arc::new(Store {
                    engine: Box::new(engine),
                    dialect: Dialect::Sqlite,
                    zone: config.zone,
                    describe: config.describe(),
                    check: true,
                    _scratch: Some(scratch),
                }))
            }
            Backend::Mysql {
                url,
                password,
                pool_size,
            } => Ok(Arc::new(Store {
                engine: Box::new(mysql::Mysql::open(
                    url,
                    password.clone(),
                    *pool_size,
                    config.zone,
                    config.timeout,
                    false,
                    true,
                    runtime,
                )?),
                dialect: Dialect::Mysql,
                zone: config.zone,
                describe: config.describe(),
                check: true,
                _scratch: None,
            })),
        }
    }

    /// Whether the configured database answers, writing nothing and copying nothing
    /// (`valvulad -b`): SQLite's file is opened to read (or, when there is none yet,
    /// its directory must let the daemon create it); MySQL is asked as by a check.
    pub fn check_reachable(config: &StorageConfig, runtime: tokio::runtime::Handle) -> Result<()> {
        match &config.backend {
            Backend::Sqlite { path, .. } if path.exists() => {
                let c = sqlite::open_read_only(path)?;
                let stored: Option<String> = c
                    .query_row(
                        "SELECT value FROM vlv_meta WHERE name = ?1",
                        ["time_zone"],
                        |r| r.get(0),
                    )
                    .ok();
                agree_on_zone(stored.as_deref(), config.zone)
            }
            Backend::Sqlite { path, .. } => sqlite_creatable(path),
            Backend::Mysql { .. } => Store::open_check(config, runtime)?.ping(),
        }
    }

    /// Removes a check's private copy of the database now (the store itself may live
    /// on in modules that keep it until the process exits).
    pub fn discard_check_copy(&self) {
        if let Some(dir) = &self._scratch {
            let _ = std::fs::remove_dir_all(dir.path());
        }
    }

    /// In a check on MySQL: counters are neither charged nor reset (the database is
    /// the daemons' own; SQLite checks run on a copy).
    fn no_writes_in_check(&self) -> Result<()> {
        if self.check && self.dialect == Dialect::Mysql {
            return Err(StoreError::Unavailable(
                "a check (valvulad -t) writes nothing".into(),
            ));
        }
        Ok(())
    }

    /// In a check on MySQL, whether `sql` is left unrun (anything but a query).
    fn skipped_in_check(&self, sql: &str) -> bool {
        if !self.check || self.dialect != Dialect::Mysql {
            return false;
        }
        let head = sql.trim_start().get(..6).unwrap_or("").to_ascii_uppercase();
        if head == "SELECT" || head.starts_with("SHOW") || head.starts_with("WITH") {
            return false;
        }
        tracing::info!(target: LOG_TARGET, sql, "check: not run (a check writes nothing)");
        true
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    pub fn describe(&self) -> &str {
        &self.describe
    }

    /// The zone of calendar windows.
    pub fn zone(&self) -> Zone {
        self.zone
    }

    /// Whether the database answers (and accepts this daemon: same calendar zone).
    pub fn ping(&self) -> Result<()> {
        self.engine.ping()
    }

    pub fn exec(&self, stmt: Stmt) -> Result<Exec> {
        check_sql(&stmt.sql)?;
        tracing::debug!(target: "valvulad::sql", sql = %stmt.sql, params = stmt.params.len(), "exec");
        if self.skipped_in_check(&stmt.sql) {
            return Ok(Exec::default());
        }
        self.engine.exec(stmt)
    }

    /// Runs every statement in one transaction: all take effect or none.
    pub fn batch(&self, stmts: Vec<Stmt>) -> Result<Vec<Exec>> {
        for s in &stmts {
            check_sql(&s.sql)?;
        }
        if stmts.is_empty() {
            return Ok(Vec::new());
        }
        if stmts.iter().any(|s| self.skipped_in_check(&s.sql)) {
            return Ok(vec![Exec::default(); stmts.len()]);
        }
        self.engine.batch(stmts)
    }

    /// Runs a write (INSERT, UPDATE, DELETE or REPLACE) at most once per `token` in
    /// namespace `ns`: `None` when a run under `token` changed rows in the last
    /// [`valvula_abi::VLV_ONCE_KEEP_SECONDS`]. The token is kept, in the statement's
    /// transaction, only when the statement changed rows, so a refused conditional
    /// update can be tried again. For requests Postfix re-sends after its policy timeout.
    pub fn exec_once(&self, ns: &str, token: &str, stmt: Stmt, now: i64) -> Result<Option<Exec>> {
        check_sql(&stmt.sql)?;
        sized("namespace", ns, MAX_NAMESPACE_BYTES)?;
        let token = stored_key("token", token)?;
        if !is_dml(&stmt.sql) {
            return Err(StoreError::Invalid(
                "exec_once takes an INSERT, UPDATE, DELETE or REPLACE statement".into(),
            ));
        }
        if self.skipped_in_check(&stmt.sql) {
            return Ok(Some(Exec::default()));
        }
        self.engine.exec_once(ns, &token, stmt, now)
    }

    pub fn query(&self, stmt: Stmt) -> Result<Rows> {
        check_sql(&stmt.sql)?;
        tracing::debug!(target: "valvulad::sql", sql = %stmt.sql, params = stmt.params.len(), "query");
        if self.skipped_in_check(&stmt.sql) {
            return Err(StoreError::Unavailable(
                "a check (valvulad -t) writes nothing".into(),
            ));
        }
        self.engine.query(stmt)
    }

    fn part(c: &Charge<'_>) -> Result<consume::Part> {
        let key = stored_key("key", c.key)?;
        if c.amount < 0 {
            return Err(StoreError::Invalid(format!(
                "amount {} is negative; counters are never credited",
                c.amount
            )));
        }
        let windows = c.windows;
        if windows.is_empty() || windows.len() > MAX_WINDOWS {
            return Err(StoreError::Invalid(format!(
                "1 to {MAX_WINDOWS} windows are needed, got {}",
                windows.len()
            )));
        }
        for (i, w) in windows.iter().enumerate() {
            if let WindowKind::Sliding(s) = w.kind
                && s < 1
            {
                return Err(StoreError::Invalid(format!(
                    "window {i}: a sliding window needs at least one second"
                )));
            }
            if windows[..i].iter().any(|o| o.kind == w.kind) {
                return Err(StoreError::Invalid(format!(
                    "window {i}: {} is given twice",
                    w.kind.id()
                )));
            }
        }
        Ok(consume::Part {
            key,
            amount: c.amount,
            windows: windows.to_vec(),
        })
    }

    fn request(
        &self,
        ns: &str,
        charges: &[Charge<'_>],
        peek: bool,
        once: Option<&str>,
        now: i64,
    ) -> Result<consume::Request> {
        if !peek {
            self.no_writes_in_check()?;
        }
        sized("namespace", ns, MAX_NAMESPACE_BYTES)?;
        if charges.is_empty() || charges.len() > MAX_PARTS {
            return Err(StoreError::Invalid(format!(
                "1 to {MAX_PARTS} keys are charged together, got {}",
                charges.len()
            )));
        }
        let parts = charges
            .iter()
            .enumerate()
            .map(|(i, c)| {
                Self::part(c).map_err(|e| match e {
                    StoreError::Invalid(m) if charges.len() > 1 => {
                        StoreError::Invalid(format!("charge {i}: {m}"))
                    }
                    e => e,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        for (i, p) in parts.iter().enumerate() {
            if parts[..i].iter().any(|o| o.key == p.key) {
                return Err(StoreError::Invalid(format!(
                    "charge {i}: key {:?} is charged twice",
                    p.key
                )));
            }
        }
        Ok(consume::Request {
            ns: ns.to_owned(),
            parts,
            now,
            peek,
            zone: self.zone,
            once: once.map(|t| stored_key("token", t)).transpose()?,
            then: Vec::new(),
        })
    }

    /// Charges `amount` to `key` in every window if each admits it; otherwise changes
    /// nothing. `now` is the host clock.
    pub fn consume(
        &self,
        ns: &str,
        key: &str,
        amount: i64,
        windows: &[Window],
        now: i64,
    ) -> Result<Consumption> {
        let c = [Charge {
            key,
            amount,
            windows,
        }];
        let req = self.request(ns, &c, false, None, now)?;
        self.engine.consume(req).map(Outcome::single)
    }

    /// [`Store::consume`], at most once per `token`: when a consumption was admitted
    /// under `token` (in this namespace) in the last
    /// [`valvula_abi::VLV_ONCE_KEEP_SECONDS`], nothing is charged and the answer is
    /// admitted and `repeated`.
    pub fn consume_once(
        &self,
        ns: &str,
        key: &str,
        token: &str,
        amount: i64,
        windows: &[Window],
        now: i64,
    ) -> Result<Consumption> {
        let c = [Charge {
            key,
            amount,
            windows,
        }];
        let req = self.request(ns, &c, false, Some(token), now)?;
        self.engine.consume(req).map(Outcome::single)
    }

    /// Charges every key of `charges` if every one admits its amount, else none: the
    /// charges of one request across several policies commit together or not at all.
    /// With a token, at most once per token, as [`Store::consume_once`].
    pub fn consume_all(
        &self,
        ns: &str,
        token: Option<&str>,
        charges: &[Charge<'_>],
        now: i64,
    ) -> Result<Outcome> {
        let req = self.request(ns, charges, false, token, now)?;
        self.engine.consume(req)
    }

    /// What [`Store::consume`] would answer, without charging.
    pub fn peek(
        &self,
        ns: &str,
        key: &str,
        amount: i64,
        windows: &[Window],
        now: i64,
    ) -> Result<Consumption> {
        let c = [Charge {
            key,
            amount,
            windows,
        }];
        let req = self.request(ns, &c, true, None, now)?;
        self.engine.consume(req).map(Outcome::single)
    }

    /// [`Store::consume_all`] (or, with `peek`, what it would answer) from a task.
    /// `then`: writes made in the charge's own transaction once it is admitted (see
    /// [`consume::Request::then`]), answered in [`Outcome::then`].
    pub fn consume_all_async(
        &self,
        ns: &str,
        token: Option<&str>,
        charges: &[Charge<'_>],
        peek: bool,
        now: i64,
        then: Vec<Stmt>,
    ) -> StoreFuture<Outcome> {
        for s in &then {
            if let Err(e) = check_sql(&s.sql) {
                return ready(Err(e));
            }
            if !is_dml(&s.sql) {
                return ready(Err(StoreError::Invalid(
                    "statements after a charge are INSERT, UPDATE, DELETE or REPLACE".into(),
                )));
            }
        }
        if then.len() > MAX_THEN {
            return ready(Err(StoreError::Invalid(format!(
                "{} statements after a charge; at most {MAX_THEN}",
                then.len()
            ))));
        }
        match self.request(ns, charges, peek, if peek { None } else { token }, now) {
            Ok(mut req) => {
                req.then = then;
                self.engine.consume_async(req)
            }
            Err(e) => ready(Err(e)),
        }
    }

    /// [`Store::query`] from a task.
    pub fn query_async(&self, stmt: Stmt) -> StoreFuture<Rows> {
        if let Err(e) = check_sql(&stmt.sql) {
            return ready(Err(e));
        }
        if self.skipped_in_check(&stmt.sql) {
            return ready(Err(StoreError::Unavailable(
                "a check (valvulad -t) writes nothing".into(),
            )));
        }
        tracing::debug!(target: "valvulad::sql", sql = %stmt.sql, params = stmt.params.len(), "query");
        self.engine.query_async(stmt)
    }

    /// A write from a task; with `once = Some((ns, token))`, at most once per token
    /// ([`Store::exec_once`]: `None` when done before). Schema changes are not taken:
    /// they belong in `init` or `tick`, where a long one holds no request.
    pub fn exec_async(
        &self,
        stmt: Stmt,
        once: Option<(&str, &str)>,
        now: i64,
    ) -> StoreFuture<Option<Exec>> {
        if let Err(e) = check_sql(&stmt.sql) {
            return ready(Err(e));
        }
        if let Err(e) = self.no_writes_in_check() {
            return ready(Err(e));
        }
        if !is_dml(&stmt.sql) {
            return ready(Err(StoreError::Invalid(
                "the asynchronous exec takes an INSERT, UPDATE, DELETE or REPLACE statement; \
                 run schema changes with sql_exec from init or tick"
                    .into(),
            )));
        }
        tracing::debug!(target: "valvulad::sql", sql = %stmt.sql, params = stmt.params.len(), "exec");
        match once {
            None => {
                let f = self.engine.exec_async(stmt);
                Box::pin(async move { f.await.map(Some) })
            }
            Some((ns, token)) => {
                if let Err(e) = sized("namespace", ns, MAX_NAMESPACE_BYTES) {
                    return ready(Err(e));
                }
                match stored_key("token", token) {
                    Ok(t) => self.engine.exec_once_async(ns, &t, stmt, now),
                    Err(e) => ready(Err(e)),
                }
            }
        }
    }

    /// Forgets every counter of `key` (all windows). Returns the rows removed.
    pub fn reset(&self, ns: &str, key: &str) -> Result<u64> {
        self.no_writes_in_check()?;
        sized("namespace", ns, MAX_NAMESPACE_BYTES)?;
        let key = stored_key("key", key)?;
        self.engine.reset(ns, &key)
    }

    /// Deletes what no longer serves a purpose, in transactions of at most
    /// [`EXPIRE_BATCH`] rows each (a request waits behind one of them at most): calendar
    /// counters of past periods, sliding-window buckets and heads no window counts any
    /// more, and `consume_once` tokens older than
    /// [`valvula_abi::VLV_ONCE_KEEP_SECONDS`]. Returns the rows deleted.
    pub fn maintain(&self, now: i64) -> Result<u64> {
        let mut work = Vec::new();
        for kind in [
            WindowKind::Hour,
            WindowKind::Day,
            WindowKind::Week,
            WindowKind::Month,
        ] {
            work.push(Expire::Counters {
                win: kind.id(),
                before: kind.span(self.zone, now).0,
            });
        }
        work.push(Expire::SlidingHeads { before: now });
        work.push(Expire::Buckets { before: now });
        work.push(Expire::Tokens {
            before: now - valvula_abi::VLV_ONCE_KEEP_SECONDS,
        });
        let mut total = 0;
        for what in &work {
            loop {
                let n = self.engine.expire(what, EXPIRE_BATCH)?;
                total += n;
                if n < EXPIRE_BATCH as u64 {
                    break;
                }
                // More to do (a backlog an older version left): the requests' writes
                // go first between two batches.
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        Ok(total)
    }
}
