//! Storage: SQL for modules and exact counters, over SQLite (embedded default) or
//! MySQL/MariaDB (shared by several daemons).
//!
//! Exactness comes from the database, not from locks in this process: a consumption is
//! one short transaction of conditional statements (`UPDATE ... WHERE used + n <= limit`,
//! affected rows say yes or no), so two daemons on one MariaDB database admit exactly the
//! limit between them. A consumption is answered only after its transaction committed.
//!
//! Modules call in from their worker threads, synchronously; the backends do their own
//! threading (a group-commit writer thread for SQLite, the async pool for MySQL).

mod consume;
mod mysql;
mod sqlite;
pub mod window;

use std::path::PathBuf;
use std::sync::Arc;

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
    pub zone: Zone,
}

impl StorageConfig {
    /// A one-line description without secrets, for logs.
    pub fn describe(&self) -> String {
        match &self.backend {
            Backend::Sqlite { path, .. } => format!("sqlite {}", path.display()),
            Backend::Mysql { url, .. } => format!("mysql {}", crate::config::redact_url(url)),
        }
    }
}

/// What a backend does; [`Store`] validates before calling it.
pub(crate) trait Engine: Send + Sync {
    fn exec(&self, stmt: Stmt) -> Result<Exec>;
    fn batch(&self, stmts: Vec<Stmt>) -> Result<Vec<Exec>>;
    fn query(&self, stmt: Stmt) -> Result<Rows>;
    fn consume(&self, req: consume::Request) -> Result<Consumption>;
    /// `exec` at most once per token; `None` when done before under it.
    fn exec_once(&self, ns: &str, token: &str, stmt: Stmt, now: i64) -> Result<Option<Exec>>;
    fn reset(&self, ns: &str, key: &str) -> Result<u64>;
    /// Deletes sliding-window buckets that no window counts any more, and
    /// `consume_once` tokens older than two days.
    fn maintain(&self, now: i64) -> Result<u64>;
    fn ping(&self) -> Result<()>;
}

/// The storage service.
pub struct Store {
    engine: Box<dyn Engine>,
    dialect: Dialect,
    zone: Zone,
    describe: String,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.describe)
            .finish()
    }
}

pub const MAX_KEY_BYTES: usize = 512;
pub const MAX_NAMESPACE_BYTES: usize = 64;
pub const MAX_WINDOWS: usize = 16;

/// Refuses SQL text with quoted literals: values go in as parameters, always. (Quoted
/// identifiers use backticks, which stay allowed.)
fn check_sql(sql: &str) -> Result<()> {
    if sql.contains('\'') || sql.contains('"') {
        return Err(StoreError::Invalid(
            "SQL text contains a quoted literal; pass values as ? parameters".into(),
        ));
    }
    if sql.trim().is_empty() {
        return Err(StoreError::Invalid("empty SQL statement".into()));
    }
    Ok(())
}

/// A namespace, key or token: 1 to `max` bytes.
fn sized(what: &str, v: &str, max: usize) -> Result<()> {
    if v.is_empty() || v.len() > max {
        return Err(StoreError::Invalid(format!(
            "{what} must be 1 to {max} bytes, got {}",
            v.len()
        )));
    }
    Ok(())
}

/// Whether a statement is plain DML (INSERT, UPDATE, DELETE, REPLACE): the writes
/// `exec_once` takes, and the only ones MySQL lanes may group (DDL commits implicitly).
pub(crate) fn is_dml(sql: &str) -> bool {
    let head: String = sql.trim_start().chars().take(7).collect();
    ["INSERT", "UPDATE", "DELETE", "REPLACE"]
        .iter()
        .any(|k| head.to_ascii_uppercase().starts_with(k))
}

impl Store {
    /// Opens the configured backend. Never fails because the database is down: the
    /// backends connect lazily and retry with backoff; see [`Store::ping`].
    pub fn open(config: &StorageConfig, runtime: tokio::runtime::Handle) -> Result<Arc<Store>> {
        let (engine, dialect): (Box<dyn Engine>, Dialect) = match &config.backend {
            Backend::Sqlite {
                path,
                synchronous_full,
            } => (
                Box::new(sqlite::Sqlite::open(path.clone(), *synchronous_full)),
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
        }))
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    pub fn describe(&self) -> &str {
        &self.describe
    }

    pub fn ping(&self) -> Result<()> {
        self.engine.ping()
    }

    pub fn exec(&self, stmt: Stmt) -> Result<Exec> {
        check_sql(&stmt.sql)?;
        tracing::debug!(target: "valvulad::sql", sql = %stmt.sql, params = stmt.params.len(), "exec");
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
        self.engine.batch(stmts)
    }

    /// Runs a write (INSERT, UPDATE, DELETE or REPLACE) at most once per `token` in
    /// namespace `ns`: `None` when a run under `token` changed rows in the last two
    /// days. The token is kept, in the statement's transaction, only when the statement
    /// changed rows, so a refused conditional update can be tried again. For requests
    /// Postfix re-sends after its policy timeout.
    pub fn exec_once(&self, ns: &str, token: &str, stmt: Stmt, now: i64) -> Result<Option<Exec>> {
        check_sql(&stmt.sql)?;
        sized("namespace", ns, MAX_NAMESPACE_BYTES)?;
        sized("token", token, MAX_KEY_BYTES)?;
        if !is_dml(&stmt.sql) {
            return Err(StoreError::Invalid(
                "exec_once takes an INSERT, UPDATE, DELETE or REPLACE statement".into(),
            ));
        }
        self.engine.exec_once(ns, token, stmt, now)
    }

    pub fn query(&self, stmt: Stmt) -> Result<Rows> {
        check_sql(&stmt.sql)?;
        tracing::debug!(target: "valvulad::sql", sql = %stmt.sql, params = stmt.params.len(), "query");
        self.engine.query(stmt)
    }

    fn request(
        &self,
        ns: &str,
        key: &str,
        amount: i64,
        windows: &[Window],
        peek: bool,
        now: i64,
    ) -> Result<consume::Request> {
        sized("namespace", ns, MAX_NAMESPACE_BYTES)?;
        sized("key", key, MAX_KEY_BYTES)?;
        if amount < 0 {
            return Err(StoreError::Invalid(format!(
                "amount {amount} is negative; counters are never credited"
            )));
        }
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
        Ok(consume::Request {
            ns: ns.to_owned(),
            key: key.to_owned(),
            amount,
            windows: windows.to_vec(),
            now,
            peek,
            zone: self.zone,
            once: None,
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
        let req = self.request(ns, key, amount, windows, false, now)?;
        self.engine.consume(req)
    }

    /// [`Store::consume`], at most once per `token`: when a consumption was admitted
    /// under `token` (in this namespace) in the last two days, nothing is charged and
    /// the answer is admitted and `repeated`.
    pub fn consume_once(
        &self,
        ns: &str,
        key: &str,
        token: &str,
        amount: i64,
        windows: &[Window],
        now: i64,
    ) -> Result<Consumption> {
        sized("token", token, MAX_KEY_BYTES)?;
        let mut req = self.request(ns, key, amount, windows, false, now)?;
        req.once = Some(token.to_owned());
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
        let req = self.request(ns, key, amount, windows, true, now)?;
        self.engine.consume(req)
    }

    /// Forgets every counter of `key` (all windows). Returns the rows removed.
    pub fn reset(&self, ns: &str, key: &str) -> Result<u64> {
        self.request(
            ns,
            key,
            0,
            &[Window {
                kind: WindowKind::Day,
                limit: -1,
            }],
            true,
            0,
        )?;
        self.engine.reset(ns, key)
    }

    pub fn maintain(&self, now: i64) -> Result<u64> {
        self.engine.maintain(now)
    }
}
