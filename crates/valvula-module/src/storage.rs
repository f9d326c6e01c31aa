//! Storage services for modules: SQL with `?` parameters and exact counters.
//!
//! All calls block until the database answered; use them from `init`, `process`,
//! `reconf` or `tick` (never from a NONBLOCKING module).

use std::fmt;

use crate::Host;
use crate::abi::{
    self, vlv_charge, vlv_host_api, vlv_stmt, vlv_str, vlv_value, vlv_window, vlv_window_state,
};

/// A parameter or a result cell. `Null` and `Text("")` are different values.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Float(f64),
    Text(String),
    Blob(Vec<u8>),
}

impl Value {
    /// The integer in a cell (text holding a number too); `None` for NULL and others.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Float(f) => Some(*f as i64),
            Value::Text(t) => t.trim().parse().ok(),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Text(t) => Some(t),
            _ => None,
        }
    }
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    None,
    Sqlite,
    Mysql,
}

/// Why a storage call failed. The daemon's log has the details.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageError {
    /// The database is down; the daemon retries it.
    Unavailable,
    /// The call was wrong (bad SQL text, key, window...).
    Invalid,
    /// The statement failed.
    Failed,
    /// The daemon is too old for the call (older than ABI 0.2, or than the minor that
    /// added it).
    NotSupported,
}

impl fmt::Display for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StorageError::Unavailable => "database unavailable",
            StorageError::Invalid => "invalid storage call (see the daemon's log)",
            StorageError::Failed => "SQL statement failed (see the daemon's log)",
            StorageError::NotSupported => {
                "the daemon does not offer this storage service (its ABI is too old)"
            }
        })
    }
}

impl std::error::Error for StorageError {}

pub(crate) fn status(rc: i32) -> Result<(), StorageError> {
    match rc {
        abi::VLV_OK => Ok(()),
        abi::VLV_E_UNAVAILABLE => Err(StorageError::Unavailable),
        abi::VLV_E_INVALID => Err(StorageError::Invalid),
        _ => Err(StorageError::Failed),
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Exec {
    pub affected: u64,
    pub last_insert_id: i64,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rows {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Value>>,
}

/// Windows and their limits: valvula's one vocabulary, shared with the daemon's store
/// and valvula-ctl (`hour`, `day`, `week`, `month`, `"90s"`).
pub use valvula_calendar::{Window, WindowKind};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WindowState {
    pub used: i64,
    /// `limit - used`, or -1 without a limit.
    pub remaining: i64,
    pub resets_at: i64,
    pub admitted: bool,
}

/// One key of [`Host::consume_all`].
#[derive(Clone, Copy, Debug)]
pub struct Charge<'a> {
    pub key: &'a str,
    pub amount: i64,
    pub windows: &'a [Window],
}

/// What [`Host::consume_all`] did: admitted only if every key was admitted, and then
/// every key was charged; otherwise nothing was. `charges[i]` tells key `i`'s windows
/// (for a refused call: the counts as they are, and whether that key alone would have
/// been admitted, so the first not admitted is the refusing one).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Consumptions {
    pub admitted: bool,
    /// The token was already charged: nothing was charged again.
    pub repeated: bool,
    pub charges: Vec<Consumption>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Consumption {
    pub admitted: bool,
    pub windows: Vec<WindowState>,
    /// [`Host::consume_once`] found its token already charged: nothing was charged.
    pub repeated: bool,
}

/// The ABI form of a parameter; it borrows the text or bytes of `v`.
pub(crate) fn raw(v: &Value) -> vlv_value {
    let mut r = vlv_value {
        r#type: abi::VLV_VALUE_NULL,
        reserved: 0,
        i: 0,
        f: 0.0,
        s: vlv_str::EMPTY,
    };
    match v {
        Value::Null => {}
        Value::Int(i) => {
            r.r#type = abi::VLV_VALUE_INT;
            r.i = *i;
        }
        Value::Float(f) => {
            r.r#type = abi::VLV_VALUE_FLOAT;
            r.f = *f;
        }
        Value::Text(t) => {
            r.r#type = abi::VLV_VALUE_TEXT;
            r.s = vlv_str::from_str(t);
        }
        Value::Blob(b) => {
            r.r#type = abi::VLV_VALUE_BLOB;
            r.s = vlv_str {
                ptr: b.as_ptr().cast(),
                len: b.len(),
            };
        }
    }
    r
}

pub(crate) fn bytes(s: vlv_str) -> Vec<u8> {
    if s.ptr.is_null() || s.len == 0 {
        return Vec::new();
    }
    // SAFETY: the host lends (ptr, len) until rows_free, which we call after copying.
    unsafe { std::slice::from_raw_parts(s.ptr.cast::<u8>(), s.len) }.to_vec()
}

pub(crate) fn cooked(v: &vlv_value) -> Value {
    match v.r#type {
        abi::VLV_VALUE_INT => Value::Int(v.i),
        abi::VLV_VALUE_FLOAT => Value::Float(v.f),
        abi::VLV_VALUE_TEXT => Value::Text(String::from_utf8_lossy(&bytes(v.s)).into_owned()),
        abi::VLV_VALUE_BLOB => Value::Blob(bytes(v.s)),
        _ => Value::Null,
    }
}

pub(crate) fn raw_window(w: &Window) -> vlv_window {
    let (kind, seconds) = match w.kind {
        WindowKind::Hour => (abi::VLV_WINDOW_HOUR, 0),
        WindowKind::Day => (abi::VLV_WINDOW_DAY, 0),
        WindowKind::Week => (abi::VLV_WINDOW_WEEK, 0),
        WindowKind::Month => (abi::VLV_WINDOW_MONTH, 0),
        WindowKind::Sliding(s) => (abi::VLV_WINDOW_SLIDING, s),
    };
    vlv_window {
        kind,
        reserved: 0,
        seconds,
        limit: w.limit,
    }
}

/// The ABI's charges for `charges`, pointing into `windows` and `states` (one entry
/// per charge each), which must outlive the result's use.
pub(crate) fn raw_charges(
    charges: &[Charge<'_>],
    windows: &[Vec<vlv_window>],
    states: &mut [Vec<vlv_window_state>],
) -> Vec<vlv_charge> {
    charges
        .iter()
        .zip(windows)
        .zip(states.iter_mut())
        .map(|((c, w), st)| vlv_charge {
            key: vlv_str::from_str(c.key),
            amount: c.amount,
            windows: w.as_ptr(),
            n_windows: w.len(),
            states: st.as_mut_ptr(),
            admitted: 0,
            reserved: 0,
        })
        .collect()
}

pub(crate) fn cooked_states(states: &[vlv_window_state]) -> Vec<WindowState> {
    states
        .iter()
        .map(|s| WindowState {
            used: s.used,
            remaining: s.remaining,
            resets_at: s.resets_at,
            admitted: s.admitted != 0,
        })
        .collect()
}

/// The host's table when it reaches the function pointer at `offset` (an older daemon's
/// table is shorter), e.g. `offset_of!(vlv_host_api, reset)`.
pub(crate) fn reaching(api: &vlv_host_api, offset: usize) -> Result<&vlv_host_api, StorageError> {
    if (api.struct_size as usize) < offset + std::mem::size_of::<usize>() {
        return Err(StorageError::NotSupported);
    }
    Ok(api)
}

/// Whether the host's table reaches the storage functions (ABI 0.2).
fn storage_api(api: &vlv_host_api) -> Result<&vlv_host_api, StorageError> {
    reaching(api, std::mem::offset_of!(vlv_host_api, reset))
}

impl Host {
    pub fn dialect(&self) -> Dialect {
        let Ok(api) = storage_api(self.api()) else {
            return Dialect::None;
        };
        match api.sql_dialect {
            // SAFETY: ctx is this module's, valid for the life of the process.
            Some(f) => match unsafe { f(self.ctx()) } {
                abi::VLV_DIALECT_SQLITE => Dialect::Sqlite,
                abi::VLV_DIALECT_MYSQL => Dialect::Mysql,
                _ => Dialect::None,
            },
            None => Dialect::None,
        }
    }

    /// Runs one statement; values bind to its `?` placeholders in order.
    pub fn exec(&self, sql: &str, params: &[Value]) -> Result<Exec, StorageError> {
        let f = storage_api(self.api())?
            .sql_exec
            .ok_or(StorageError::NotSupported)?;
        let raws: Vec<vlv_value> = params.iter().map(raw).collect();
        let mut e = Exec::default();
        // SAFETY: every pointer is to memory we own for the duration of the call.
        status(unsafe {
            f(
                self.ctx(),
                vlv_str::from_str(sql),
                raws.as_ptr(),
                raws.len(),
                &mut e.affected,
                &mut e.last_insert_id,
            )
        })?;
        Ok(e)
    }

    /// [`Host::exec`] of one INSERT, UPDATE, DELETE or REPLACE at most once per `token`
    /// (e.g. Postfix's `instance` with the stage): `None` when a run under `token`
    /// changed rows in the last two days, so nothing ran. The token is kept, in the
    /// statement's own transaction, only when it changed rows. Needs a daemon of ABI 0.3.
    pub fn exec_once(
        &self,
        token: &str,
        sql: &str,
        params: &[Value],
    ) -> Result<Option<Exec>, StorageError> {
        let api = reaching(
            self.api(),
            std::mem::offset_of!(vlv_host_api, sql_exec_once),
        )?;
        let f = api.sql_exec_once.ok_or(StorageError::NotSupported)?;
        let raws: Vec<vlv_value> = params.iter().map(raw).collect();
        let mut e = Exec::default();
        let mut repeated = 0u32;
        // SAFETY: every pointer is to memory we own for the duration of the call; the
        // host table was checked to have the field.
        status(unsafe {
            f(
                self.ctx(),
                vlv_str::from_str(token),
                vlv_str::from_str(sql),
                raws.as_ptr(),
                raws.len(),
                &mut e.affected,
                &mut e.last_insert_id,
                &mut repeated,
            )
        })?;
        Ok((repeated == 0).then_some(e))
    }

    /// Runs every statement in one transaction; returns the rows each changed.
    pub fn batch(&self, stmts: &[(&str, &[Value])]) -> Result<Vec<u64>, StorageError> {
        let f = storage_api(self.api())?
            .sql_batch
            .ok_or(StorageError::NotSupported)?;
        let raws: Vec<Vec<vlv_value>> = stmts
            .iter()
            .map(|(_, p)| p.iter().map(raw).collect())
            .collect();
        let list: Vec<vlv_stmt> = stmts
            .iter()
            .zip(&raws)
            .map(|((sql, _), r)| vlv_stmt {
                sql: vlv_str::from_str(sql),
                params: r.as_ptr(),
                n_params: r.len(),
            })
            .collect();
        let mut affected = vec![0u64; list.len()];
        // SAFETY: the statement array, their parameters and `affected` (n entries) are
        // ours for the call.
        status(unsafe { f(self.ctx(), list.as_ptr(), list.len(), affected.as_mut_ptr()) })?;
        Ok(affected)
    }

    /// Runs a query and copies its result.
    pub fn query(&self, sql: &str, params: &[Value]) -> Result<Rows, StorageError> {
        let api = storage_api(self.api())?;
        let Some(q) = api.sql_query else {
            return Err(StorageError::NotSupported);
        };
        let raws: Vec<vlv_value> = params.iter().map(raw).collect();
        let mut rows = std::ptr::null_mut();
        // SAFETY: parameters are ours for the call; `rows` receives a host handle.
        status(unsafe {
            q(
                self.ctx(),
                vlv_str::from_str(sql),
                raws.as_ptr(),
                raws.len(),
                &mut rows,
            )
        })?;
        // SAFETY: rows is the live handle the host just gave us.
        unsafe { copy_rows(api, rows) }.ok_or(StorageError::NotSupported)
    }
}

/// Copies a result out of a host handle, then frees the handle.
///
/// # Safety
/// `rows` is a live handle from this host's `sql_query` or `sql_query_async`, not used
/// afterwards.
pub(crate) unsafe fn copy_rows(api: &vlv_host_api, rows: *mut abi::vlv_rows) -> Option<Rows> {
    let (Some(count), Some(cols), Some(get), Some(name), Some(free)) = (
        api.rows_count,
        api.rows_columns,
        api.rows_get,
        api.rows_column_name,
        api.rows_free,
    ) else {
        return None;
    };
    {
        // SAFETY: rows is a live handle until the free below; cells are copied first.
        unsafe {
            let (n, m) = (count(rows), cols(rows));
            let mut out = Rows::default();
            for c in 0..m {
                let mut s = vlv_str::EMPTY;
                name(rows, c, &mut s);
                out.columns
                    .push(String::from_utf8_lossy(&bytes(s)).into_owned());
            }
            for r in 0..n {
                let mut row = Vec::with_capacity(m);
                for c in 0..m {
                    let mut v = raw(&Value::Null);
                    get(rows, r, c, &mut v);
                    row.push(cooked(&v));
                }
                out.rows.push(row);
            }
            free(rows);
            Some(out)
        }
    }
}

impl Host {
    fn charge(
        &self,
        key: &str,
        amount: i64,
        windows: &[Window],
        how: How<'_>,
    ) -> Result<Consumption, StorageError> {
        let api = storage_api(self.api())?;
        let ws: Vec<vlv_window> = windows.iter().map(raw_window).collect();
        let mut states = vec![vlv_window_state::default(); ws.len()];
        let mut admitted = 0u32;
        let mut repeated = 0u32;
        let code = match how {
            How::Consume | How::Peek => {
                let f = if matches!(how, How::Peek) {
                    api.peek
                } else {
                    api.consume
                }
                .ok_or(StorageError::NotSupported)?;
                // SAFETY: the windows and the states array (n entries) are ours for the call.
                unsafe {
                    f(
                        self.ctx(),
                        vlv_str::from_str(key),
                        amount,
                        ws.as_ptr(),
                        ws.len(),
                        states.as_mut_ptr(),
                        &mut admitted,
                    )
                }
            }
            How::Once(token) => {
                let api = reaching(api, std::mem::offset_of!(vlv_host_api, consume_once))?;
                let f = api.consume_once.ok_or(StorageError::NotSupported)?;
                // SAFETY: as above; the token is borrowed for the call, the host table
                // was checked to have the field.
                unsafe {
                    f(
                        self.ctx(),
                        vlv_str::from_str(key),
                        vlv_str::from_str(token),
                        amount,
                        ws.as_ptr(),
                        ws.len(),
                        states.as_mut_ptr(),
                        &mut admitted,
                        &mut repeated,
                    )
                }
            }
        };
        status(code)?;
        Ok(Consumption {
            admitted: admitted != 0,
            repeated: repeated != 0,
            windows: cooked_states(&states),
        })
    }

    /// Charges `amount` to `key` in every window if all admit it, else nothing.
    pub fn consume(
        &self,
        key: &str,
        amount: i64,
        windows: &[Window],
    ) -> Result<Consumption, StorageError> {
        self.charge(key, amount, windows, How::Consume)
    }

    /// [`Host::consume`], at most once per `token` (e.g. Postfix's queue id with the
    /// stage): when a consumption under `token` was admitted in the last two days,
    /// nothing is charged and the answer is admitted with `repeated` set. The token is
    /// recorded in the charge's own transaction. Needs a daemon of ABI 0.3.
    pub fn consume_once(
        &self,
        key: &str,
        token: &str,
        amount: i64,
        windows: &[Window],
    ) -> Result<Consumption, StorageError> {
        self.charge(key, amount, windows, How::Once(token))
    }

    /// What [`Host::consume`] would answer, without charging.
    pub fn peek(
        &self,
        key: &str,
        amount: i64,
        windows: &[Window],
    ) -> Result<Consumption, StorageError> {
        self.charge(key, amount, windows, How::Peek)
    }

    /// Charges every key of `charges` if every one admits its amount in all its
    /// windows, else none: the charges of one request across several limits commit
    /// together or not at all, so a refusal by one limit never uses up another's quota.
    /// With a `token`, at most once per token (as [`Host::consume_once`]). Needs a
    /// daemon of ABI 0.4.
    pub fn consume_all(
        &self,
        token: Option<&str>,
        charges: &[Charge<'_>],
    ) -> Result<Consumptions, StorageError> {
        let api = reaching(self.api(), std::mem::offset_of!(vlv_host_api, consume_all))?;
        let f = api.consume_all.ok_or(StorageError::NotSupported)?;
        let windows: Vec<Vec<vlv_window>> = charges
            .iter()
            .map(|c| c.windows.iter().map(raw_window).collect())
            .collect();
        let mut states: Vec<Vec<vlv_window_state>> = charges
            .iter()
            .map(|c| vec![vlv_window_state::default(); c.windows.len()])
            .collect();
        let mut raw = raw_charges(charges, &windows, &mut states);
        let (mut admitted, mut repeated) = (0u32, 0u32);
        // SAFETY: the charges, their windows and state arrays (n_windows entries each)
        // are ours for the call; the host table was checked to have the field.
        status(unsafe {
            f(
                self.ctx(),
                vlv_str::from_str(token.unwrap_or("")),
                raw.as_mut_ptr(),
                raw.len(),
                &mut admitted,
                &mut repeated,
            )
        })?;
        let per: Vec<bool> = raw.iter().map(|c| c.admitted != 0).collect();
        drop(raw);
        Ok(Consumptions {
            admitted: admitted != 0,
            repeated: repeated != 0,
            charges: states
                .iter()
                .zip(per)
                .map(|(st, ok)| Consumption {
                    admitted: ok,
                    repeated: repeated != 0,
                    windows: cooked_states(st),
                })
                .collect(),
        })
    }

    /// The IANA name of the zone the daemon's calendar windows follow (`[storage]
    /// time_zone`, "local" resolved), e.g. `"Europe/Madrid"`; `None` from a daemon
    /// older than ABI 0.4 or without storage.
    pub fn time_zone(&self) -> Option<String> {
        let api = reaching(self.api(), std::mem::offset_of!(vlv_host_api, time_zone)).ok()?;
        let f = api.time_zone?;
        let mut name = vlv_str::EMPTY;
        // SAFETY: ctx is this module's; the host writes a static string.
        if unsafe { f(self.ctx(), &mut name) } != abi::VLV_OK {
            return None;
        }
        String::from_utf8(bytes(name)).ok()
    }

    /// Forgets every window of `key`.
    pub fn reset(&self, key: &str) -> Result<(), StorageError> {
        let f = storage_api(self.api())?
            .reset
            .ok_or(StorageError::NotSupported)?;
        // SAFETY: the key is borrowed for the call.
        status(unsafe { f(self.ctx(), vlv_str::from_str(key)) })
    }
}

#[derive(Clone, Copy)]
enum How<'a> {
    Consume,
    Peek,
    Once(&'a str),
}

/// One column of [`Host::ensure_table`]: its name and SQL type for each dialect.
#[derive(Clone, Copy, Debug)]
pub struct Column<'a> {
    pub name: &'a str,
    pub sqlite: &'a str,
    pub mysql: &'a str,
}

fn identifier(name: &str) -> Result<(), StorageError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit();
    if ok {
        Ok(())
    } else {
        Err(StorageError::Invalid)
    }
}

impl Host {
    /// The columns a table has now (empty if the table does not exist).
    pub fn table_columns(&self, table: &str) -> Result<Vec<String>, StorageError> {
        identifier(table)?;
        let rows = match self.dialect() {
            Dialect::Sqlite => {
                self.query("SELECT name FROM pragma_table_info(?)", &[table.into()])?
            }
            Dialect::Mysql => self.query(
                "SELECT column_name FROM information_schema.columns \
                 WHERE table_schema = DATABASE() AND table_name = ? ORDER BY ordinal_position",
                &[table.into()],
            )?,
            Dialect::None => return Err(StorageError::Unavailable),
        };
        Ok(rows
            .rows
            .into_iter()
            .filter_map(|r| {
                r.into_iter()
                    .next()
                    .and_then(|v| v.as_str().map(str::to_owned))
            })
            .collect())
    }

    /// Creates `table` with its first column when missing, then adds every column that
    /// is missing, as valvula's `valvulad_db_ensure_table` does. Existing columns are
    /// never dropped or retyped, so tables that operators or older versions made keep
    /// their data. Returns the columns added.
    pub fn ensure_table(
        &self,
        table: &str,
        columns: &[Column<'_>],
    ) -> Result<Vec<String>, StorageError> {
        identifier(table)?;
        for c in columns {
            identifier(c.name)?;
        }
        let mysql = self.dialect() == Dialect::Mysql;
        fn ty<'c>(mysql: bool, c: &Column<'c>) -> &'c str {
            if mysql { c.mysql } else { c.sqlite }
        }
        let before = self.table_columns(table)?;
        let first = columns.first().ok_or(StorageError::Invalid)?;
        // Run even when the table exists: the daemon gives a table to the first module
        // that creates it in its run, and this makes it ours again at every start
        // (another module can then neither drop nor squat it).
        let created = self.exec(
            &format!(
                "CREATE TABLE IF NOT EXISTS {table} ({} {})",
                first.name,
                ty(mysql, first)
            ),
            &[],
        );
        // A table that exists serves as it is when the statement is refused (an account
        // without the CREATE privilege, as least-privilege setups grant).
        if before.is_empty() {
            created?;
        } else if let Err(e) = created {
            tracing::debug!(
                table,
                "CREATE TABLE IF NOT EXISTS on an existing table failed: {e}"
            );
        }
        let mut added = Vec::new();
        let mut have = before;
        if have.is_empty() {
            have = self.table_columns(table)?;
            added.push(first.name.to_owned());
        }
        for c in columns {
            if !have.iter().any(|h| h.eq_ignore_ascii_case(c.name)) {
                let r = self.exec(
                    &format!("ALTER TABLE {table} ADD COLUMN {} {}", c.name, ty(mysql, c)),
                    &[],
                );
                if let Err(e) = r {
                    // Another thread or daemon may have added it meanwhile ("duplicate
                    // column"): what counts is that the column is there now.
                    have = self.table_columns(table)?;
                    if !have.iter().any(|h| h.eq_ignore_ascii_case(c.name)) {
                        return Err(e);
                    }
                    continue;
                }
                added.push(c.name.to_owned());
            }
        }
        Ok(added)
    }
}
