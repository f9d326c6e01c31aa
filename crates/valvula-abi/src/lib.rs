//! `#[repr(C)]` mirror of `include/valvula/module.h`. No logic: the header is the
//! contract, this crate only spells it in Rust, and the `const` assertions at the bottom
//! fail the build if a field moves.
//!
//! Read the header for what each item means, who owns what and on which threads it may
//! be used; the comments here do not repeat it.

#![no_std]

use core::ffi::{c_char, c_void};
use core::mem::{offset_of, size_of};

pub const VLV_ABI_MAJOR: u16 = 1;
pub const VLV_ABI_MINOR: u16 = 0;
/// The last minor of ABI 0.x, whose layout 1.0 froze: modules built for 0.0 to this
/// load on a 1.x host, and are shown a host table that says 0.5.
pub const VLV_ABI_LEGACY_MINOR: u16 = 5;
pub const VLV_ONCE_KEEP_SECONDS: i64 = 3_600;
pub const VLV_MODULE_MAGIC: u32 = 0x4D56_4C56;
/// `VLV_MODULE_SYMBOL`, NUL-terminated for dlsym.
pub const VLV_MODULE_SYMBOL: &[u8] = b"vlv_module_v1\0";

pub const VLV_OK: i32 = 0;
pub const VLV_E_NOT_FOUND: i32 = -1;
pub const VLV_E_INVALID: i32 = -2;
pub const VLV_E_TOO_SMALL: i32 = -3;
pub const VLV_E_FAILED: i32 = -4;
pub const VLV_E_UNAVAILABLE: i32 = -5;
/// ABI 0.5: an asynchronous call was submitted; its answer comes before the next poll.
pub const VLV_PENDING: i32 = 1;
/// ABI 0.5: `process_poll` asks for this request to be decided by `process` on a
/// worker thread instead (it must block: a rare, slow path).
pub const VLV_BLOCKING: i32 = 2;

/// ABI 0.5: `consume_async` answers what it would charge, charging nothing.
pub const VLV_CONSUME_PEEK: u32 = 0x1;

pub const VLV_ACTION_DUNNO: u32 = 0;
pub const VLV_ACTION_OK: u32 = 1;
pub const VLV_ACTION_REJECT: u32 = 2;
pub const VLV_ACTION_DEFER: u32 = 3;
pub const VLV_ACTION_DEFER_IF_PERMIT: u32 = 4;
pub const VLV_ACTION_DEFER_IF_REJECT: u32 = 5;
pub const VLV_ACTION_DISCARD: u32 = 6;
pub const VLV_ACTION_HOLD: u32 = 7;
pub const VLV_ACTION_PREPEND: u32 = 8;
pub const VLV_ACTION_REDIRECT: u32 = 9;
pub const VLV_ACTION_BCC: u32 = 10;
pub const VLV_ACTION_FILTER: u32 = 11;
pub const VLV_ACTION_WARN: u32 = 12;
pub const VLV_ACTION_INFO: u32 = 13;
pub const VLV_ACTION_RAW: u32 = 14;
pub const VLV_REPLY_TEXT_MAX: u32 = 2000;

pub const VLV_LOG_ERROR: u32 = 1;
pub const VLV_LOG_WARN: u32 = 2;
pub const VLV_LOG_INFO: u32 = 3;
pub const VLV_LOG_DEBUG: u32 = 4;
pub const VLV_LOG_TRACE: u32 = 5;

pub const VLV_TICK_MINUTE: u32 = 0x1;
pub const VLV_TICK_HOUR: u32 = 0x2;
pub const VLV_TICK_DAY: u32 = 0x4;
pub const VLV_TICK_MONTH: u32 = 0x8;

pub const VLV_FLAG_NONBLOCKING: u32 = 0x1;
pub const VLV_FLAG_SERIALIZE: u32 = 0x2;
/// Every flag this ABI version knows; a module setting any other bit is refused.
pub const VLV_FLAGS_KNOWN: u32 = VLV_FLAG_NONBLOCKING | VLV_FLAG_SERIALIZE;

pub const VLV_VALUE_NULL: u32 = 0;
pub const VLV_VALUE_INT: u32 = 1;
pub const VLV_VALUE_FLOAT: u32 = 2;
pub const VLV_VALUE_TEXT: u32 = 3;
pub const VLV_VALUE_BLOB: u32 = 4;

pub const VLV_DIALECT_NONE: u32 = 0;
pub const VLV_DIALECT_SQLITE: u32 = 1;
pub const VLV_DIALECT_MYSQL: u32 = 2;

pub const VLV_WINDOW_HOUR: u32 = 1;
pub const VLV_WINDOW_DAY: u32 = 2;
pub const VLV_WINDOW_WEEK: u32 = 3;
pub const VLV_WINDOW_MONTH: u32 = 4;
pub const VLV_WINDOW_SLIDING: u32 = 5;

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct vlv_str {
    pub ptr: *const c_char,
    pub len: usize,
}

impl vlv_str {
    pub const EMPTY: vlv_str = vlv_str {
        ptr: core::ptr::null(),
        len: 0,
    };

    /// Borrows a Rust string: valid as long as `s` is.
    pub const fn from_str(s: &str) -> vlv_str {
        vlv_str {
            ptr: s.as_ptr().cast(),
            len: s.len(),
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct vlv_value {
    pub r#type: u32,
    pub reserved: u32,
    pub i: i64,
    pub f: f64,
    pub s: vlv_str,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct vlv_stmt {
    pub sql: vlv_str,
    pub params: *const vlv_value,
    pub n_params: usize,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vlv_window {
    pub kind: u32,
    pub reserved: u32,
    pub seconds: i64,
    pub limit: i64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vlv_window_state {
    pub used: i64,
    pub remaining: i64,
    pub resets_at: i64,
    pub admitted: u32,
    pub reserved: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct vlv_charge {
    pub key: vlv_str,
    pub amount: i64,
    pub windows: *const vlv_window,
    pub n_windows: usize,
    pub states: *mut vlv_window_state,
    pub admitted: u32,
    pub reserved: u32,
}

/// Opaque: a query result owned by the host.
#[repr(C)]
pub struct vlv_rows {
    _private: [u8; 0],
}

/// Opaque: the host's handle for one module.
#[repr(C)]
pub struct vlv_module_ctx {
    _private: [u8; 0],
}

/// Opaque: one request during one `process` call.
#[repr(C)]
pub struct vlv_request {
    _private: [u8; 0],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct vlv_host_api {
    pub struct_size: u32,
    pub abi_major: u16,
    pub abi_minor: u16,
    pub log: Option<unsafe extern "C" fn(ctx: *mut vlv_module_ctx, level: u32, msg: vlv_str)>,
    pub config_get: Option<
        unsafe extern "C" fn(
            ctx: *mut vlv_module_ctx,
            key: vlv_str,
            buf: *mut c_char,
            cap: usize,
            len: *mut usize,
        ) -> i32,
    >,
    pub request_get: Option<
        unsafe extern "C" fn(req: *const vlv_request, name: vlv_str, value: *mut vlv_str) -> i32,
    >,
    pub request_attr: Option<
        unsafe extern "C" fn(
            req: *const vlv_request,
            index: usize,
            name: *mut vlv_str,
            value: *mut vlv_str,
        ) -> i32,
    >,
    pub reply_set:
        Option<unsafe extern "C" fn(req: *mut vlv_request, action: u32, text: vlv_str) -> i32>,
    pub now: Option<unsafe extern "C" fn(ctx: *mut vlv_module_ctx) -> i64>,
    // ABI 0.2: storage.
    pub sql_dialect: Option<unsafe extern "C" fn(ctx: *mut vlv_module_ctx) -> u32>,
    pub sql_exec: Option<
        unsafe extern "C" fn(
            ctx: *mut vlv_module_ctx,
            sql: vlv_str,
            params: *const vlv_value,
            n_params: usize,
            affected: *mut u64,
            last_insert_id: *mut i64,
        ) -> i32,
    >,
    pub sql_batch: Option<
        unsafe extern "C" fn(
            ctx: *mut vlv_module_ctx,
            stmts: *const vlv_stmt,
            n: usize,
            affected: *mut u64,
        ) -> i32,
    >,
    pub sql_query: Option<
        unsafe extern "C" fn(
            ctx: *mut vlv_module_ctx,
            sql: vlv_str,
            params: *const vlv_value,
            n_params: usize,
            rows: *mut *mut vlv_rows,
        ) -> i32,
    >,
    pub rows_count: Option<unsafe extern "C" fn(rows: *const vlv_rows) -> usize>,
    pub rows_columns: Option<unsafe extern "C" fn(rows: *const vlv_rows) -> usize>,
    pub rows_get: Option<
        unsafe extern "C" fn(
            rows: *const vlv_rows,
            row: usize,
            col: usize,
            out: *mut vlv_value,
        ) -> i32,
    >,
    pub rows_column_name:
        Option<unsafe extern "C" fn(rows: *const vlv_rows, col: usize, out: *mut vlv_str) -> i32>,
    pub rows_free: Option<unsafe extern "C" fn(rows: *mut vlv_rows)>,
    pub consume: Option<ConsumeFn>,
    pub peek: Option<ConsumeFn>,
    pub reset: Option<unsafe extern "C" fn(ctx: *mut vlv_module_ctx, key: vlv_str) -> i32>,
    // ABI 0.3.
    pub consume_once: Option<ConsumeOnceFn>,
    pub sql_exec_once: Option<
        unsafe extern "C" fn(
            ctx: *mut vlv_module_ctx,
            token: vlv_str,
            sql: vlv_str,
            params: *const vlv_value,
            n_params: usize,
            affected: *mut u64,
            last_insert_id: *mut i64,
            repeated: *mut u32,
        ) -> i32,
    >,
    // ABI 0.4.
    pub consume_all: Option<
        unsafe extern "C" fn(
            ctx: *mut vlv_module_ctx,
            token: vlv_str,
            charges: *mut vlv_charge,
            n: usize,
            admitted: *mut u32,
            repeated: *mut u32,
        ) -> i32,
    >,
    pub time_zone:
        Option<unsafe extern "C" fn(ctx: *mut vlv_module_ctx, name: *mut vlv_str) -> i32>,
    // ABI 0.5: completion-based storage, from `process_poll` only.
    pub consume_async: Option<ConsumeAsyncFn>,
    pub sql_query_async: Option<
        unsafe extern "C" fn(
            ctx: *mut vlv_module_ctx,
            req: *mut vlv_request,
            sql: vlv_str,
            params: *const vlv_value,
            n_params: usize,
            rows: *mut *mut vlv_rows,
            status: *mut i32,
        ) -> i32,
    >,
    pub sql_exec_async: Option<
        unsafe extern "C" fn(
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
        ) -> i32,
    >,
    pub log_level: Option<unsafe extern "C" fn(ctx: *mut vlv_module_ctx) -> u32>,
}

pub type ConsumeOnceFn = unsafe extern "C" fn(
    ctx: *mut vlv_module_ctx,
    key: vlv_str,
    token: vlv_str,
    amount: i64,
    windows: *const vlv_window,
    n: usize,
    states: *mut vlv_window_state,
    admitted: *mut u32,
    repeated: *mut u32,
) -> i32;

pub type ConsumeAsyncFn = unsafe extern "C" fn(
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
) -> i32;

/// Signature shared by `consume` and `peek`.
pub type ConsumeFn = unsafe extern "C" fn(
    ctx: *mut vlv_module_ctx,
    key: vlv_str,
    amount: i64,
    windows: *const vlv_window,
    n: usize,
    states: *mut vlv_window_state,
    admitted: *mut u32,
) -> i32;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct vlv_module_def {
    pub magic: u32,
    pub abi_major: u16,
    pub abi_minor: u16,
    pub struct_size: u32,
    pub flags: u32,
    pub name: vlv_str,
    pub version: vlv_str,
    pub description: vlv_str,
    pub init: Option<
        unsafe extern "C" fn(
            host: *const vlv_host_api,
            ctx: *mut vlv_module_ctx,
            state: *mut *mut c_void,
        ) -> i32,
    >,
    pub process: Option<unsafe extern "C" fn(state: *mut c_void, req: *mut vlv_request) -> i32>,
    pub reconf: Option<unsafe extern "C" fn(state: *mut c_void) -> i32>,
    pub close: Option<unsafe extern "C" fn(state: *mut c_void)>,
    pub tick: Option<unsafe extern "C" fn(state: *mut c_void, kinds: u32, now: i64)>,
    // ABI 0.5: completion-based processing.
    pub process_poll: Option<
        unsafe extern "C" fn(
            state: *mut c_void,
            req: *mut vlv_request,
            call: *mut *mut c_void,
        ) -> i32,
    >,
    pub process_drop: Option<unsafe extern "C" fn(state: *mut c_void, call: *mut c_void)>,
}

// SAFETY: the definition is immutable static data of the module; its pointers refer to
// static strings and functions, so sharing it between threads is sound.
unsafe impl Sync for vlv_module_def {}
// SAFETY: as above: a copy of the definition only points at the module's static data
// and code, which stay mapped (modules are never unloaded).
unsafe impl Send for vlv_module_def {}
// SAFETY: the host table holds only function pointers and integers.
unsafe impl Sync for vlv_host_api {}
// SAFETY: see above; the table is plain data.
unsafe impl Send for vlv_host_api {}

/// Bytes of `vlv_module_def` a module built for ABI `major`.`minor` must provide: the
/// end of the last field that version defines; `None` for a version this header does
/// not know (a newer minor, another major), whose layout it cannot know.
pub const fn module_def_min_size(major: u16, minor: u16) -> Option<usize> {
    match (major, minor) {
        // 0.0 and 0.1 defined every field up to `tick`; 0.2 to 0.4 only added host
        // services, so the module definition kept that layout. A minor that adds a
        // hook adds an arm here ending at its last field.
        (0, 0..=4) => Some(offset_of!(vlv_module_def, tick) + size_of::<usize>()),
        // 1.0 is 0.5's layout, frozen.
        (0, 5) | (1, 0) => Some(offset_of!(vlv_module_def, process_drop) + size_of::<usize>()),
        _ => None,
    }
}

// The layout C compilers give the header on the platforms we build for (LP64: Linux and
// the BSDs on 64-bit targets). A change here is an ABI break.
#[cfg(target_pointer_width = "64")]
const _: () = {
    assert!(size_of::<vlv_str>() == 16);
    assert!(offset_of!(vlv_host_api, struct_size) == 0);
    assert!(offset_of!(vlv_host_api, abi_major) == 4);
    assert!(offset_of!(vlv_host_api, abi_minor) == 6);
    assert!(offset_of!(vlv_host_api, log) == 8);
    assert!(offset_of!(vlv_host_api, config_get) == 16);
    assert!(offset_of!(vlv_host_api, request_get) == 24);
    assert!(offset_of!(vlv_host_api, request_attr) == 32);
    assert!(offset_of!(vlv_host_api, reply_set) == 40);
    assert!(offset_of!(vlv_host_api, now) == 48);
    assert!(offset_of!(vlv_host_api, sql_dialect) == 56);
    assert!(offset_of!(vlv_host_api, sql_exec) == 64);
    assert!(offset_of!(vlv_host_api, sql_batch) == 72);
    assert!(offset_of!(vlv_host_api, sql_query) == 80);
    assert!(offset_of!(vlv_host_api, rows_count) == 88);
    assert!(offset_of!(vlv_host_api, rows_columns) == 96);
    assert!(offset_of!(vlv_host_api, rows_get) == 104);
    assert!(offset_of!(vlv_host_api, rows_column_name) == 112);
    assert!(offset_of!(vlv_host_api, rows_free) == 120);
    assert!(offset_of!(vlv_host_api, consume) == 128);
    assert!(offset_of!(vlv_host_api, peek) == 136);
    assert!(offset_of!(vlv_host_api, reset) == 144);
    assert!(offset_of!(vlv_host_api, consume_once) == 152);
    assert!(offset_of!(vlv_host_api, sql_exec_once) == 160);
    assert!(offset_of!(vlv_host_api, consume_all) == 168);
    assert!(offset_of!(vlv_host_api, time_zone) == 176);
    assert!(offset_of!(vlv_host_api, consume_async) == 184);
    assert!(offset_of!(vlv_host_api, sql_query_async) == 192);
    assert!(offset_of!(vlv_host_api, sql_exec_async) == 200);
    assert!(offset_of!(vlv_host_api, log_level) == 208);
    assert!(size_of::<vlv_host_api>() == 216);
    assert!(size_of::<vlv_charge>() == 56);
    assert!(offset_of!(vlv_charge, amount) == 16);
    assert!(offset_of!(vlv_charge, windows) == 24);
    assert!(offset_of!(vlv_charge, n_windows) == 32);
    assert!(offset_of!(vlv_charge, states) == 40);
    assert!(offset_of!(vlv_charge, admitted) == 48);

    assert!(size_of::<vlv_value>() == 40);
    assert!(offset_of!(vlv_value, i) == 8);
    assert!(offset_of!(vlv_value, f) == 16);
    assert!(offset_of!(vlv_value, s) == 24);
    assert!(size_of::<vlv_stmt>() == 32);
    assert!(size_of::<vlv_window>() == 24);
    assert!(offset_of!(vlv_window, seconds) == 8);
    assert!(offset_of!(vlv_window, limit) == 16);
    assert!(size_of::<vlv_window_state>() == 32);
    assert!(offset_of!(vlv_window_state, admitted) == 24);

    assert!(offset_of!(vlv_module_def, magic) == 0);
    assert!(offset_of!(vlv_module_def, abi_major) == 4);
    assert!(offset_of!(vlv_module_def, abi_minor) == 6);
    assert!(offset_of!(vlv_module_def, struct_size) == 8);
    assert!(offset_of!(vlv_module_def, flags) == 12);
    assert!(offset_of!(vlv_module_def, name) == 16);
    assert!(offset_of!(vlv_module_def, version) == 32);
    assert!(offset_of!(vlv_module_def, description) == 48);
    assert!(offset_of!(vlv_module_def, init) == 64);
    assert!(offset_of!(vlv_module_def, process) == 72);
    assert!(offset_of!(vlv_module_def, reconf) == 80);
    assert!(offset_of!(vlv_module_def, close) == 88);
    assert!(offset_of!(vlv_module_def, tick) == 96);
    assert!(offset_of!(vlv_module_def, process_poll) == 104);
    assert!(offset_of!(vlv_module_def, process_drop) == 112);
    assert!(size_of::<vlv_module_def>() == 120);
    assert!(matches!(module_def_min_size(0, 1), Some(104)));
    assert!(matches!(module_def_min_size(0, 4), Some(104)));
    assert!(matches!(module_def_min_size(0, 5), Some(120)));
    assert!(matches!(
        module_def_min_size(VLV_ABI_MAJOR, VLV_ABI_MINOR),
        Some(120)
    ));
    assert!(module_def_min_size(VLV_ABI_MAJOR, VLV_ABI_MINOR + 1).is_none());
    assert!(module_def_min_size(0, 6).is_none());
};
