//! The storage services of the host table (ABI 0.2): SQL with parameters, result sets,
//! and the counters' consume/peek/reset, each a thin conversion between the C ABI and
//! [`valvula_store::Store`].

use valvula_abi::{
    self as abi, vlv_charge, vlv_module_ctx, vlv_request, vlv_rows, vlv_stmt, vlv_str, vlv_value,
    vlv_window, vlv_window_state,
};

use super::api::{ModuleCtx, Noted, RequestCall, bytes_of};
use valvula_store::{self as store, Stmt, Store, StoreError, Value, Window, WindowKind};

/// The module's context, if the pointer is one the host handed out.
fn module_ctx<'a>(ctx: *mut vlv_module_ctx) -> Option<&'a ModuleCtx> {
    // SAFETY: ctx is the pointer the host gave init; ModuleCtx values are leaked, so it
    // lives until exit.
    unsafe { ctx.cast::<ModuleCtx>().as_ref() }
}

/// Maps a storage error to a status, logging what the module cannot see. An outage
/// (database away, stalled, refusing this daemon, a commit in doubt) is noted for the
/// running call: the module's failure that follows is the database's, not its own.
fn store_status(ctx: &ModuleCtx, e: &StoreError) -> i32 {
    let (code, noted) = classify(ctx, e);
    if noted.outage {
        crate::dispatch::note_storage_outage();
    }
    if noted.request_data {
        crate::dispatch::note_request_data_problem();
    }
    code
}

/// The status of a storage error, and whether it is an outage or the request's data
/// (neither is the module's fault); logs what the module cannot see.
fn classify(ctx: &ModuleCtx, e: &StoreError) -> (i32, Noted) {
    if e.is_outage() {
        // The store logs outages itself, once a second.
        tracing::debug!(module = %ctx.name, "storage unavailable: {e}");
        let noted = Noted {
            outage: true,
            request_data: false,
        };
        return (abi::VLV_E_UNAVAILABLE, noted);
    }
    let mut noted = Noted::default();
    let (code, what) = match e {
        StoreError::Invalid(_) => (abi::VLV_E_INVALID, "invalid storage call"),
        StoreError::Data(_) => {
            // The request's data, not the module: noted so its failure is not a fault.
            noted.request_data = true;
            (abi::VLV_E_INVALID, "request data refused by the database")
        }
        _ => (abi::VLV_E_FAILED, "SQL failed"),
    };
    if let Some(more) = ctx.storage_log.allow() {
        if more > 0 {
            tracing::warn!(module = %ctx.name, suppressed = more, "{what}: {e}");
        } else {
            tracing::warn!(module = %ctx.name, "{what}: {e}");
        }
    }
    (code, noted)
}

/// Runs a storage call for a module: finds its store, catches panics, maps errors.
fn with_store(
    ctx: *mut vlv_module_ctx,
    f: impl FnOnce(&ModuleCtx, &Store) -> Result<(), StoreError>,
) -> i32 {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let Some(ctx) = module_ctx(ctx) else {
            return abi::VLV_E_INVALID;
        };
        // The module promised never to block (VLV_FLAG_NONBLOCKING); a storage call
        // waits for the database. Its init may: no request waits on it.
        if ctx.nonblocking && super::crash::current_hook() != "init" {
            if ctx.storage_log.allow().is_some() {
                tracing::warn!(
                    module = %ctx.name,
                    hook = super::crash::current_hook(),
                    "storage call refused (VLV_E_INVALID): the module is VLV_FLAG_NONBLOCKING, and storage calls block; only its init may make them"
                );
            }
            return abi::VLV_E_INVALID;
        }
        let Some(store) = ctx.store.as_deref() else {
            if ctx.storage_log.allow().is_some() {
                tracing::warn!(module = %ctx.name, "storage call, but no storage is configured");
            }
            return abi::VLV_E_UNAVAILABLE;
        };
        match crate::dispatch::in_storage(|| f(ctx, store)) {
            Ok(()) => abi::VLV_OK,
            Err(e) => store_status(ctx, &e),
        }
    }))
    .unwrap_or(abi::VLV_E_FAILED)
}

/// Copies module parameters into host values.
fn values_of(params: *const vlv_value, n: usize) -> Result<Vec<Value>, StoreError> {
    if n == 0 {
        return Ok(Vec::new());
    }
    if params.is_null() {
        return Err(StoreError::Invalid("params is NULL".into()));
    }
    // SAFETY: the module passes an array of n values it owns for the call.
    let ps = unsafe { std::slice::from_raw_parts(params, n) };
    ps.iter()
        .enumerate()
        .map(|(i, p)| match p.r#type {
            abi::VLV_VALUE_NULL => Ok(Value::Null),
            abi::VLV_VALUE_INT => Ok(Value::Int(p.i)),
            abi::VLV_VALUE_FLOAT => Ok(Value::Float(p.f)),
            abi::VLV_VALUE_TEXT => std::str::from_utf8(bytes_of(p.s))
                .map(|t| Value::Text(t.to_owned()))
                .map_err(|_| {
                    StoreError::Invalid(format!("parameter {i}: text is not UTF-8 (use a blob)"))
                }),
            abi::VLV_VALUE_BLOB => Ok(Value::Blob(bytes_of(p.s).to_vec())),
            t => Err(StoreError::Invalid(format!(
                "parameter {i}: unknown value type {t}"
            ))),
        })
        .collect()
}

/// A module's SQL text: UTF-8, and naming only tables the module may (see
/// [`super::namespace`]).
fn sql_text(m: &ModuleCtx, sql: vlv_str) -> Result<String, StoreError> {
    let text = std::str::from_utf8(bytes_of(sql))
        .map_err(|_| StoreError::Invalid("SQL text is not UTF-8".into()))?;
    super::namespace::check(&m.name, &m.approved, text)?;
    Ok(text.to_owned())
}

pub(super) unsafe extern "C" fn host_sql_dialect(ctx: *mut vlv_module_ctx) -> u32 {
    match module_ctx(ctx)
        .and_then(|c| c.store.as_deref())
        .map(Store::dialect)
    {
        Some(store::Dialect::Sqlite) => abi::VLV_DIALECT_SQLITE,
        Some(store::Dialect::Mysql) => abi::VLV_DIALECT_MYSQL,
        None => abi::VLV_DIALECT_NONE,
    }
}

pub(super) unsafe extern "C" fn host_sql_exec(
    ctx: *mut vlv_module_ctx,
    sql: vlv_str,
    params: *const vlv_value,
    n_params: usize,
    affected: *mut u64,
    last_insert_id: *mut i64,
) -> i32 {
    with_store(ctx, |m, store| {
        let r = store.exec(Stmt::new(sql_text(m, sql)?, values_of(params, n_params)?))?;
        // SAFETY: optional out pointers of the module, checked for NULL.
        unsafe {
            if let Some(a) = affected.as_mut() {
                *a = r.affected;
            }
            if let Some(l) = last_insert_id.as_mut() {
                *l = r.last_insert_id;
            }
        }
        Ok(())
    })
}

#[allow(clippy::too_many_arguments)]
pub(super) unsafe extern "C" fn host_sql_exec_once(
    ctx: *mut vlv_module_ctx,
    token: vlv_str,
    sql: vlv_str,
    params: *const vlv_value,
    n_params: usize,
    affected: *mut u64,
    last_insert_id: *mut i64,
    repeated: *mut u32,
) -> i32 {
    with_store(ctx, |m, store| {
        let token = std::str::from_utf8(bytes_of(token))
            .map_err(|_| StoreError::Invalid("token is not UTF-8".into()))?;
        let stmt = Stmt::new(sql_text(m, sql)?, values_of(params, n_params)?);
        let r = store.exec_once(&m.name, token, stmt, m.clock.now())?;
        // SAFETY: optional out pointers of the module, checked for NULL.
        unsafe {
            if let Some(a) = affected.as_mut() {
                *a = r.map_or(0, |e| e.affected);
            }
            if let Some(l) = last_insert_id.as_mut() {
                *l = r.map_or(0, |e| e.last_insert_id);
            }
            if let Some(x) = repeated.as_mut() {
                *x = u32::from(r.is_none());
            }
        }
        Ok(())
    })
}

/// Copies a module's array of `n` statements.
///
/// # Safety
/// `stmts` is NULL or the module's array of `n` statements, valid during the call.
unsafe fn stmts_of(
    m: &ModuleCtx,
    stmts: *const vlv_stmt,
    n: usize,
    what: &str,
) -> Result<Vec<Stmt>, StoreError> {
    if n == 0 {
        return Ok(Vec::new());
    }
    if stmts.is_null() {
        return Err(StoreError::Invalid(format!("{what} is NULL")));
    }
    // SAFETY: per the contract above.
    let list = unsafe { std::slice::from_raw_parts(stmts, n) };
    list.iter()
        .map(|s| {
            Ok(Stmt::new(
                sql_text(m, s.sql)?,
                values_of(s.params, s.n_params)?,
            ))
        })
        .collect()
}

pub(super) unsafe extern "C" fn host_sql_batch(
    ctx: *mut vlv_module_ctx,
    stmts: *const vlv_stmt,
    n: usize,
    affected: *mut u64,
) -> i32 {
    with_store(ctx, |m, store| {
        // SAFETY: the module passes an array of n statements it owns for the call.
        let stmts = unsafe { stmts_of(m, stmts, n, "stmts") }?;
        let r = store.batch(stmts)?;
        if !affected.is_null() {
            for (i, e) in r.iter().enumerate() {
                // SAFETY: the header makes `affected` an array of n entries.
                unsafe { *affected.add(i) = e.affected };
            }
        }
        Ok(())
    })
}

/// What `vlv_rows *` points at: the result and its cells rendered for the ABI.
struct RowsHandle {
    rows: store::Rows,
}

pub(super) unsafe extern "C" fn host_sql_query(
    ctx: *mut vlv_module_ctx,
    sql: vlv_str,
    params: *const vlv_value,
    n_params: usize,
    rows: *mut *mut vlv_rows,
) -> i32 {
    with_store(ctx, |m, store| {
        if rows.is_null() {
            return Err(StoreError::Invalid("rows is NULL".into()));
        }
        let r = store.query(Stmt::new(sql_text(m, sql)?, values_of(params, n_params)?))?;
        let h = Box::into_raw(Box::new(RowsHandle { rows: r }));
        // SAFETY: rows was checked non-NULL; the module frees the handle with rows_free.
        unsafe { *rows = h.cast() };
        Ok(())
    })
}

fn rows_ref<'a>(rows: *const vlv_rows) -> Option<&'a RowsHandle> {
    // SAFETY: a pointer from host_sql_query, not yet freed (header: LIFETIME).
    unsafe { rows.cast::<RowsHandle>().as_ref() }
}

pub(super) unsafe extern "C" fn host_rows_count(rows: *const vlv_rows) -> usize {
    rows_ref(rows).map_or(0, |r| r.rows.rows.len())
}

pub(super) unsafe extern "C" fn host_rows_columns(rows: *const vlv_rows) -> usize {
    rows_ref(rows).map_or(0, |r| r.rows.columns.len())
}

pub(super) unsafe extern "C" fn host_rows_get(
    rows: *const vlv_rows,
    row: usize,
    col: usize,
    out: *mut vlv_value,
) -> i32 {
    let (Some(r), false) = (rows_ref(rows), out.is_null()) else {
        return abi::VLV_E_INVALID;
    };
    let Some(cell) = r.rows.rows.get(row).and_then(|c| c.get(col)) else {
        return abi::VLV_E_NOT_FOUND;
    };
    let mut v = vlv_value {
        r#type: abi::VLV_VALUE_NULL,
        reserved: 0,
        i: 0,
        f: 0.0,
        s: vlv_str::EMPTY,
    };
    match cell {
        Value::Null => {}
        Value::Int(i) => {
            v.r#type = abi::VLV_VALUE_INT;
            v.i = *i;
        }
        Value::Float(f) => {
            v.r#type = abi::VLV_VALUE_FLOAT;
            v.f = *f;
        }
        Value::Text(t) => {
            v.r#type = abi::VLV_VALUE_TEXT;
            v.s = vlv_str::from_str(t);
        }
        Value::Blob(b) => {
            v.r#type = abi::VLV_VALUE_BLOB;
            v.s = vlv_str {
                ptr: b.as_ptr().cast(),
                len: b.len(),
            };
        }
    }
    // SAFETY: out was checked non-NULL; the borrowed bytes live in the handle until
    // rows_free.
    unsafe { *out = v };
    abi::VLV_OK
}

pub(super) unsafe extern "C" fn host_rows_column_name(
    rows: *const vlv_rows,
    col: usize,
    out: *mut vlv_str,
) -> i32 {
    let (Some(r), false) = (rows_ref(rows), out.is_null()) else {
        return abi::VLV_E_INVALID;
    };
    match r.rows.columns.get(col) {
        Some(n) => {
            // SAFETY: out was checked non-NULL; the name lives in the handle.
            unsafe { *out = vlv_str::from_str(n) };
            abi::VLV_OK
        }
        None => abi::VLV_E_NOT_FOUND,
    }
}

pub(super) unsafe extern "C" fn host_rows_free(rows: *mut vlv_rows) {
    if !rows.is_null() {
        // SAFETY: the module gives back a pointer from host_sql_query, once.
        drop(unsafe { Box::from_raw(rows.cast::<RowsHandle>()) });
    }
}

fn windows_of(windows: *const vlv_window, n: usize) -> Result<Vec<Window>, StoreError> {
    if n == 0 || windows.is_null() {
        return Err(StoreError::Invalid("no windows given".into()));
    }
    // SAFETY: the module passes an array of n windows it owns for the call.
    let ws = unsafe { std::slice::from_raw_parts(windows, n) };
    ws.iter()
        .enumerate()
        .map(|(i, w)| {
            let kind = match w.kind {
                abi::VLV_WINDOW_HOUR => WindowKind::Hour,
                abi::VLV_WINDOW_DAY => WindowKind::Day,
                abi::VLV_WINDOW_WEEK => WindowKind::Week,
                abi::VLV_WINDOW_MONTH => WindowKind::Month,
                abi::VLV_WINDOW_SLIDING => WindowKind::Sliding(w.seconds),
                k => return Err(StoreError::Invalid(format!("window {i}: unknown kind {k}"))),
            };
            Ok(Window {
                kind,
                limit: w.limit,
            })
        })
        .collect()
}

/// Fills the module's array of `n` window states (NULL: not wanted).
///
/// # Safety
/// `states` is NULL or points at `n` writable `vlv_window_state`s of the module.
unsafe fn write_states(states: *mut vlv_window_state, n: usize, from: &[store::WindowState]) {
    if states.is_null() {
        return;
    }
    for (i, s) in from.iter().enumerate().take(n) {
        // SAFETY: i < n, and the caller vouches for n entries.
        unsafe {
            *states.add(i) = vlv_window_state {
                used: s.used,
                remaining: s.remaining,
                resets_at: s.resets_at,
                admitted: u32::from(s.admitted),
                reserved: 0,
            }
        };
    }
}

/// What the module asked: a charge, a charge under a token, or a peek.
#[derive(Clone, Copy)]
enum Charge {
    Consume,
    Once(vlv_str),
    Peek,
}

#[allow(clippy::too_many_arguments)]
fn consume_or_peek(
    ctx: *mut vlv_module_ctx,
    key: vlv_str,
    amount: i64,
    windows: *const vlv_window,
    n: usize,
    states: *mut vlv_window_state,
    admitted: *mut u32,
    repeated: *mut u32,
    charge: Charge,
) -> i32 {
    with_store(ctx, |m, store| {
        let key = std::str::from_utf8(bytes_of(key))
            .map_err(|_| StoreError::Invalid("key is not UTF-8".into()))?;
        let ws = windows_of(windows, n)?;
        let t = m.clock.now();
        let c = match charge {
            Charge::Peek => store.peek(&m.name, key, amount, &ws, t)?,
            Charge::Consume => store.consume(&m.name, key, amount, &ws, t)?,
            Charge::Once(token) => {
                let token = std::str::from_utf8(bytes_of(token))
                    .map_err(|_| StoreError::Invalid("token is not UTF-8".into()))?;
                store.consume_once(&m.name, key, token, amount, &ws, t)?
            }
        };
        // SAFETY: optional out pointers of the module; `states` is an array of n.
        unsafe {
            if let Some(a) = admitted.as_mut() {
                *a = u32::from(c.admitted);
            }
            if let Some(r) = repeated.as_mut() {
                *r = u32::from(c.repeated);
            }
            write_states(states, n, &c.windows);
        }
        Ok(())
    })
}

pub(super) unsafe extern "C" fn host_consume(
    ctx: *mut vlv_module_ctx,
    key: vlv_str,
    amount: i64,
    windows: *const vlv_window,
    n: usize,
    states: *mut vlv_window_state,
    admitted: *mut u32,
) -> i32 {
    consume_or_peek(
        ctx,
        key,
        amount,
        windows,
        n,
        states,
        admitted,
        std::ptr::null_mut(),
        Charge::Consume,
    )
}

#[allow(clippy::too_many_arguments)]
pub(super) unsafe extern "C" fn host_consume_once(
    ctx: *mut vlv_module_ctx,
    key: vlv_str,
    token: vlv_str,
    amount: i64,
    windows: *const vlv_window,
    n: usize,
    states: *mut vlv_window_state,
    admitted: *mut u32,
    repeated: *mut u32,
) -> i32 {
    consume_or_peek(
        ctx,
        key,
        amount,
        windows,
        n,
        states,
        admitted,
        repeated,
        Charge::Once(token),
    )
}

pub(super) unsafe extern "C" fn host_peek(
    ctx: *mut vlv_module_ctx,
    key: vlv_str,
    amount: i64,
    windows: *const vlv_window,
    n: usize,
    states: *mut vlv_window_state,
    admitted: *mut u32,
) -> i32 {
    consume_or_peek(
        ctx,
        key,
        amount,
        windows,
        n,
        states,
        admitted,
        std::ptr::null_mut(),
        Charge::Peek,
    )
}

pub(super) unsafe extern "C" fn host_reset(ctx: *mut vlv_module_ctx, key: vlv_str) -> i32 {
    with_store(ctx, |m, store| {
        let key = std::str::from_utf8(bytes_of(key))
            .map_err(|_| StoreError::Invalid("key is not UTF-8".into()))?;
        store.reset(&m.name, key).map(|_| ())
    })
}

/// One charge as read from the module: key, amount, windows.
type Parsed<'a> = (&'a str, i64, Vec<Window>);

/// The keys and windows of a module's array of `n` charges, checked (what the store's
/// `Charge` borrows), and its optional token.
///
/// # Safety
/// `charges` is NULL or the module's array of `n` charges, read during the call.
unsafe fn charges_of<'a>(
    charges: *const vlv_charge,
    n: usize,
    token: vlv_str,
) -> Result<(Vec<Parsed<'a>>, Option<&'a str>), StoreError> {
    if n == 0 || charges.is_null() {
        return Err(StoreError::Invalid("no charges given".into()));
    }
    if n > store::MAX_PARTS {
        return Err(StoreError::Invalid(format!(
            "{n} charges; at most {} keys are charged together",
            store::MAX_PARTS
        )));
    }
    // SAFETY: per the contract above, an array of n charges of the module's.
    let list = unsafe { std::slice::from_raw_parts(charges, n) };
    let mut out = Vec::with_capacity(n);
    for (i, c) in list.iter().enumerate() {
        let key = std::str::from_utf8(bytes_of(c.key))
            .map_err(|_| StoreError::Invalid(format!("charge {i}: key is not UTF-8")))?;
        let windows = windows_of(c.windows, c.n_windows)
            .map_err(|e| StoreError::Invalid(format!("charge {i}: {e}")))?;
        out.push((key, c.amount, windows));
    }
    let token = std::str::from_utf8(bytes_of(token))
        .map_err(|_| StoreError::Invalid("token is not UTF-8".into()))?;
    Ok((out, (!token.is_empty()).then_some(token)))
}

fn specs<'a>(parsed: &'a [Parsed<'a>]) -> Vec<store::Charge<'a>> {
    parsed
        .iter()
        .map(|(key, amount, w)| store::Charge {
            key,
            amount: *amount,
            windows: w,
        })
        .collect()
}

pub(super) unsafe extern "C" fn host_consume_all(
    ctx: *mut vlv_module_ctx,
    token: vlv_str,
    charges: *mut vlv_charge,
    n: usize,
    admitted: *mut u32,
    repeated: *mut u32,
) -> i32 {
    with_store(ctx, |m, store| {
        // SAFETY: the module's array of n charges, read here; its out fields are
        // written below, after the store call.
        let (parsed, token) = unsafe { charges_of(charges, n, token) }?;
        let specs = specs(&parsed);
        let o = store.consume_all(&m.name, token, &specs, m.clock.now())?;
        // SAFETY: the module passes an array of n charges it owns for the call; nothing
        // else touches them meanwhile.
        let list = unsafe { std::slice::from_raw_parts_mut(charges, n) };
        // SAFETY: optional out pointers of the module; each charge's `states` holds
        // n_windows entries (header), and the charges array is the module's for the call.
        unsafe {
            if let Some(a) = admitted.as_mut() {
                *a = u32::from(o.admitted);
            }
            if let Some(r) = repeated.as_mut() {
                *r = u32::from(o.repeated);
            }
            for (c, part) in list.iter_mut().zip(&o.parts) {
                c.admitted = u32::from(part.admitted);
                write_states(c.states, c.n_windows, &part.windows);
            }
        }
        Ok(())
    })
}

pub(super) unsafe extern "C" fn host_time_zone(
    ctx: *mut vlv_module_ctx,
    name: *mut vlv_str,
) -> i32 {
    std::panic::catch_unwind(|| {
        let Some(ctx) = module_ctx(ctx) else {
            return abi::VLV_E_INVALID;
        };
        let Some(store) = ctx.store.as_deref() else {
            return abi::VLV_E_UNAVAILABLE;
        };
        if name.is_null() {
            return abi::VLV_E_INVALID;
        }
        // SAFETY: name was checked non-NULL; zone names are static strings.
        unsafe { *name = vlv_str::from_str(store.zone().name()) };
        abi::VLV_OK
    })
    .unwrap_or(abi::VLV_E_FAILED)
}

/// A pointer into the module's memory that an asynchronous call writes its answer to.
struct Out<T>(*mut T);

// SAFETY: the pointer is only written by the pending call's future, which the host
// polls between two polls of the module's call (never while the module runs) and drops
// before process_drop; the module keeps the memory valid until then (header, ABI 0.5).
unsafe impl<T> Send for Out<T> {}

impl<T> Out<T> {
    /// Writes `v` if the module asked for it (non-NULL).
    ///
    /// # Safety
    /// Only from a pending call's future (see the `Send` impl).
    unsafe fn set(&self, v: T) {
        // SAFETY: per the contract above the pointer is NULL or the module's, valid.
        if let Some(p) = unsafe { self.0.as_mut() } {
            *p = v;
        }
    }
}

type Started = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), StoreError>> + Send>>;

/// Submits an asynchronous storage call for the request being polled: `start` checks
/// and copies the module's inputs and submits the call (so it joins the next batch);
/// its future writes the outputs once the call is answered. Returns VLV_PENDING, or the
/// final status at once.
fn submit_async(
    ctx: *mut vlv_module_ctx,
    req: *mut vlv_request,
    status: *mut i32,
    start: impl FnOnce(&'static ModuleCtx, &Store) -> Result<Started, StoreError>,
) -> i32 {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: ctx is the pointer the host gave init; ModuleCtx values are leaked.
        let Some(m) = (unsafe { ctx.cast::<ModuleCtx>().as_ref() }) else {
            return abi::VLV_E_INVALID;
        };
        // SAFETY: req is the RequestCall of the running process_poll (header: only
        // there), used on its thread only.
        let Some(call) = (unsafe { req.cast::<RequestCall<'_>>().as_mut() }) else {
            return abi::VLV_E_INVALID;
        };
        if status.is_null() || call.pending.is_none() {
            return abi::VLV_E_INVALID;
        }
        let out = Out(status);
        let finish = |call: &mut RequestCall<'_>, code: i32, noted: Noted| {
            call.noted.merge(noted);
            // SAFETY: status was checked non-NULL; the module is running (this is its
            // call), so writing its memory now is what it expects.
            unsafe { out.set(code) };
            code
        };
        let Some(store) = m.store.clone() else {
            if m.storage_log.allow().is_some() {
                tracing::warn!(module = %m.name, "storage call, but no storage is configured");
            }
            return finish(call, abi::VLV_E_UNAVAILABLE, Noted::default());
        };
        match start(m, &store) {
            Err(e) => {
                let (code, noted) = classify(m, &e);
                finish(call, code, noted)
            }
            Ok(fut) => {
                let status = Out(status);
                call.pending
                    .as_mut()
                    .expect("checked above")
                    .push(Box::pin(async move {
                        let (code, noted) = match fut.await {
                            Ok(()) => (abi::VLV_OK, Noted::default()),
                            Err(e) => classify(m, &e),
                        };
                        // SAFETY: a pending call's future (see Out).
                        unsafe { status.set(code) };
                        noted
                    }));
                abi::VLV_PENDING
            }
        }
    }))
    .unwrap_or(abi::VLV_E_FAILED)
}

#[allow(clippy::too_many_arguments)]
pub(super) unsafe extern "C" fn host_consume_async(
    ctx: *mut vlv_module_ctx,
    req: *mut vlv_request,
    token: vlv_str,
    flags: u32,
    charges: *mut vlv_charge,
    n: usize,
    then: *const vlv_stmt,
    n_then: usize,
    then_status: *mut i32,
    admitted: *mut u32,
    repeated: *mut u32,
    status: *mut i32,
) -> i32 {
    submit_async(ctx, req, status, |m, store| {
        // SAFETY: the module passes an array of n_then statements it owns, read (copied)
        // here, during the call.
        let then_stmts = unsafe { stmts_of(m, then, n_then, "then") }?;
        if flags & !abi::VLV_CONSUME_PEEK != 0 {
            return Err(StoreError::Invalid(format!("unknown flags {flags:#x}")));
        }
        // SAFETY: the module's array of n charges, read (copied) here, during the call.
        let (parsed, token) = unsafe { charges_of(charges, n, token) }?;
        let specs = specs(&parsed);
        // SAFETY: as above; `states` and `admitted` are only pointed at, for the answer.
        let list = unsafe { std::slice::from_raw_parts(charges, n) };
        let peek = flags & abi::VLV_CONSUME_PEEK != 0;
        let f = store.consume_all_async(&m.name, token, &specs, peek, m.clock.now(), then_stmts);
        let (admitted, repeated) = (Out(admitted), Out(repeated));
        let then_status: Vec<Out<i32>> = (0..n_then)
            .map(|i| {
                if then_status.is_null() {
                    Out(std::ptr::null_mut())
                } else {
                    // SAFETY: the header makes then_status an array of n_then entries.
                    Out(unsafe { then_status.add(i) })
                }
            })
            .collect();
        let parts: Vec<(Out<u32>, Out<vlv_window_state>, usize)> = list
            .iter()
            .enumerate()
            .map(|(i, c)| {
                // SAFETY: i < n: a field of the module's charges array.
                let admitted = unsafe { &raw mut (*charges.add(i)).admitted };
                (Out(admitted), Out(c.states), c.n_windows)
            })
            .collect();
        Ok(Box::pin(async move {
            let o = f.await?;
            // SAFETY: a pending call's future (see Out); each `states` holds n_windows
            // entries (header).
            unsafe {
                admitted.set(u32::from(o.admitted));
                repeated.set(u32::from(o.repeated));
                for ((a, st, n), part) in parts.iter().zip(&o.parts) {
                    a.set(u32::from(part.admitted));
                    write_states(st.0, *n, &part.windows);
                }
                for (i, out) in then_status.iter().enumerate() {
                    out.set(match o.then.get(i) {
                        None => abi::VLV_E_NOT_FOUND,
                        Some(Ok(_)) => abi::VLV_OK,
                        Some(Err(StoreError::Invalid(_) | StoreError::Data(_))) => {
                            abi::VLV_E_INVALID
                        }
                        Some(Err(_)) => abi::VLV_E_FAILED,
                    });
                }
            }
            if let Some(Err(e)) = o.then.iter().find(|r| r.is_err())
                && m.storage_log.allow().is_some()
            {
                tracing::warn!(module = %m.name, "a write after a charge failed (the charge stands): {e}");
            }
            Ok(())
        }))
    })
}

pub(super) unsafe extern "C" fn host_sql_query_async(
    ctx: *mut vlv_module_ctx,
    req: *mut vlv_request,
    sql: vlv_str,
    params: *const vlv_value,
    n_params: usize,
    rows: *mut *mut vlv_rows,
    status: *mut i32,
) -> i32 {
    submit_async(ctx, req, status, |m, store| {
        if rows.is_null() {
            return Err(StoreError::Invalid("rows is NULL".into()));
        }
        let f = store.query_async(Stmt::new(sql_text(m, sql)?, values_of(params, n_params)?));
        let rows = Out(rows);
        Ok(Box::pin(async move {
            let r = f.await?;
            let h = Box::into_raw(Box::new(RowsHandle { rows: r }));
            // SAFETY: a pending call's future (see Out); the module frees the handle
            // with rows_free.
            unsafe { rows.set(h.cast()) };
            Ok(())
        }))
    })
}

#[allow(clippy::too_many_arguments)]
pub(super) unsafe extern "C" fn host_sql_exec_async(
    ctx: *mut vlv_module_ctx,
    req: *mut vlv_request,
    token: vlv_str,
    sql: vlv_str,
    params: *const vlv_value,
    n_params: usize,
    affected: *mut u64,
    last_insert_id: *mut i64,
    repeated: *mut u32,
    status: *mut i32,
) -> i32 {
    submit_async(ctx, req, status, |m, store| {
        let token = std::str::from_utf8(bytes_of(token))
            .map_err(|_| StoreError::Invalid("token is not UTF-8".into()))?;
        let stmt = Stmt::new(sql_text(m, sql)?, values_of(params, n_params)?);
        let once = (!token.is_empty()).then_some((m.name.as_str(), token));
        let f = store.exec_async(stmt, once, m.clock.now());
        let (affected, last, repeated) = (Out(affected), Out(last_insert_id), Out(repeated));
        Ok(Box::pin(async move {
            let r = f.await?;
            // SAFETY: a pending call's future (see Out).
            unsafe {
                affected.set(r.map_or(0, |e| e.affected));
                last.set(r.map_or(0, |e| e.last_insert_id));
                repeated.set(u32::from(r.is_none()));
            }
            Ok(())
        }))
    })
}
