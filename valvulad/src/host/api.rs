//! The host side of the C ABI: what `vlv_module_ctx *` and `vlv_request *` point at,
//! and the request, reply, log and clock services (`table` lists them for modules).
//! Raw pointers live here, in `storage` (the storage services) and in `load` (calls
//! into the module), nowhere else.

use std::collections::HashMap;
use std::ffi::c_char;
use std::sync::{Arc, RwLock};

use valvula_abi::{self as abi, vlv_module_ctx, vlv_request, vlv_str};
use valvula_policy::{Action, Reply, ReplyError, Request};

use valvula_store::sync::UnpoisonedRw;
use valvula_store::{Clock, Store};

/// A module's configuration section, pre-rendered for `config_get`.
#[derive(Default)]
pub(super) struct Section {
    whole: String,
    keys: HashMap<String, String>,
}

impl Section {
    pub(super) fn new(t: &toml::Table) -> Self {
        let json = |v: &toml::Value| serde_json::to_string(v).unwrap_or_default();
        let keys = t
            .iter()
            .map(|(k, v)| {
                let text = match v {
                    toml::Value::String(s) => s.clone(),
                    toml::Value::Table(_) | toml::Value::Array(_) => json(v),
                    other => other.to_string(),
                };
                (k.clone(), text)
            })
            .collect();
        Section {
            whole: serde_json::to_string(t).unwrap_or_else(|_| "{}".into()),
            keys,
        }
    }
}

/// What `vlv_module_ctx *` points at.
pub(crate) struct ModuleCtx {
    pub(crate) name: String,
    pub(super) section: RwLock<Section>,
    pub(crate) store: Option<Arc<Store>>,
    pub(crate) clock: Clock,
    /// Storage errors of this module, logged at most once a second.
    pub(crate) storage_log: valvula_store::RateLog,
    /// VLV_FLAG_NONBLOCKING: blocking storage calls are refused outside init.
    pub(crate) nonblocking: bool,
    /// Statements already found to name only tables the module may.
    pub(crate) approved: RwLock<super::namespace::Approved>,
}

/// A storage call submitted during a `process_poll` (ABI 0.5): it writes its answer
/// into the module's memory when it resolves, and tells what it met.
pub(super) type PendingCall =
    std::pin::Pin<Box<dyn std::future::Future<Output = Noted> + Send + 'static>>;

/// What the storage calls of one module call met: not the module's fault either way.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Noted {
    pub(crate) outage: bool,
    pub(crate) request_data: bool,
}

impl Noted {
    pub(crate) fn merge(&mut self, o: Noted) {
        self.outage |= o.outage;
        self.request_data |= o.request_data;
    }
}

/// What `vlv_request *` points at during one `process` call (or all the polls of one
/// `process_poll` call).
pub(super) struct RequestCall<'a> {
    pub(super) req: &'a Request,
    pub(super) reply: Option<Result<Reply, ReplyError>>,
    /// Storage calls submitted by the running poll; `None` in a `process` call, where
    /// the asynchronous storage calls are refused.
    pub(super) pending: Option<Vec<PendingCall>>,
    pub(super) noted: Noted,
}

impl<'a> RequestCall<'a> {
    pub(super) fn new(req: &'a Request, polled: bool) -> Self {
        RequestCall {
            req,
            reply: None,
            pending: polled.then(Vec::new),
            noted: Noted::default(),
        }
    }
}

pub(crate) fn bytes_of<'a>(s: vlv_str) -> &'a [u8] {
    if s.ptr.is_null() || s.len == 0 {
        return &[];
    }
    // SAFETY: the module passes (ptr, len) of memory it owns for the duration of the
    // call; the header requires it.
    unsafe { std::slice::from_raw_parts(s.ptr.cast::<u8>(), s.len) }
}

pub(super) unsafe extern "C" fn host_log(ctx: *mut vlv_module_ctx, level: u32, msg: vlv_str) {
    let _ = std::panic::catch_unwind(|| {
        // SAFETY: ctx is the pointer the host gave init; it lives until exit.
        let Some(ctx) = (unsafe { ctx.cast::<ModuleCtx>().as_ref() }) else {
            return;
        };
        let text = String::from_utf8_lossy(bytes_of(msg)).replace(['\r', '\n'], " ");
        let m = ctx.name.as_str();
        match level {
            abi::VLV_LOG_ERROR => tracing::error!(module = m, "{text}"),
            abi::VLV_LOG_WARN => tracing::warn!(module = m, "{text}"),
            abi::VLV_LOG_INFO => tracing::info!(module = m, "{text}"),
            abi::VLV_LOG_DEBUG => tracing::debug!(module = m, "{text}"),
            _ => tracing::trace!(module = m, "{text}"),
        }
    });
}

pub(super) unsafe extern "C" fn host_config_get(
    ctx: *mut vlv_module_ctx,
    key: vlv_str,
    buf: *mut c_char,
    cap: usize,
    len: *mut usize,
) -> i32 {
    std::panic::catch_unwind(|| {
        // SAFETY: ctx is the pointer the host gave init; it lives until exit.
        let Some(ctx) = (unsafe { ctx.cast::<ModuleCtx>().as_ref() }) else {
            return abi::VLV_E_INVALID;
        };
        if len.is_null() {
            return abi::VLV_E_INVALID;
        }
        let key = String::from_utf8_lossy(bytes_of(key));
        let section = ctx.section.read_now();
        let value = if key.is_empty() {
            Some(&section.whole)
        } else {
            section.keys.get(key.as_ref())
        };
        let Some(value) = value else {
            return abi::VLV_E_NOT_FOUND;
        };
        // SAFETY: len was checked non-NULL and points at the module's size_t.
        unsafe { *len = value.len() };
        if value.len() > cap {
            return abi::VLV_E_TOO_SMALL;
        }
        if !value.is_empty() {
            if buf.is_null() {
                return abi::VLV_E_INVALID;
            }
            // SAFETY: buf holds cap >= value.len() bytes of the module's memory, and it
            // cannot overlap our String.
            unsafe { std::ptr::copy_nonoverlapping(value.as_ptr(), buf.cast::<u8>(), value.len()) };
        }
        abi::VLV_OK
    })
    .unwrap_or(abi::VLV_E_FAILED)
}

fn out_str(s: &str) -> vlv_str {
    vlv_str::from_str(s)
}

pub(super) unsafe extern "C" fn host_request_get(
    req: *const vlv_request,
    name: vlv_str,
    value: *mut vlv_str,
) -> i32 {
    // SAFETY: req is the RequestCall of the running process() call (header: only valid
    // during it).
    let Some(call) = (unsafe { req.cast::<RequestCall<'_>>().as_ref() }) else {
        return abi::VLV_E_INVALID;
    };
    if value.is_null() {
        return abi::VLV_E_INVALID;
    }
    let Ok(name) = std::str::from_utf8(bytes_of(name)) else {
        return abi::VLV_E_NOT_FOUND;
    };
    match call.req.get(name) {
        Some(v) => {
            // SAFETY: value was checked non-NULL; the string borrowed lives in the
            // request, which outlives the call.
            unsafe { *value = out_str(v) };
            abi::VLV_OK
        }
        None => abi::VLV_E_NOT_FOUND,
    }
}

pub(super) unsafe extern "C" fn host_request_attr(
    req: *const vlv_request,
    index: usize,
    name: *mut vlv_str,
    value: *mut vlv_str,
) -> i32 {
    // SAFETY: as in host_request_get.
    let Some(call) = (unsafe { req.cast::<RequestCall<'_>>().as_ref() }) else {
        return abi::VLV_E_INVALID;
    };
    if name.is_null() || value.is_null() {
        return abi::VLV_E_INVALID;
    }
    match call.req.attributes().get(index) {
        Some(a) => {
            // SAFETY: both out pointers were checked non-NULL; the strings live in the
            // request, which outlives the call.
            unsafe {
                *name = out_str(&a.name);
                *value = out_str(&a.value);
            }
            abi::VLV_OK
        }
        None => abi::VLV_E_NOT_FOUND,
    }
}

fn action_of(code: u32) -> Option<Action> {
    Some(match code {
        abi::VLV_ACTION_DUNNO => Action::Dunno,
        abi::VLV_ACTION_OK => Action::Ok,
        abi::VLV_ACTION_REJECT => Action::Reject,
        abi::VLV_ACTION_DEFER => Action::Defer,
        abi::VLV_ACTION_DEFER_IF_PERMIT => Action::DeferIfPermit,
        abi::VLV_ACTION_DEFER_IF_REJECT => Action::DeferIfReject,
        abi::VLV_ACTION_DISCARD => Action::Discard,
        abi::VLV_ACTION_HOLD => Action::Hold,
        abi::VLV_ACTION_PREPEND => Action::Prepend,
        abi::VLV_ACTION_REDIRECT => Action::Redirect,
        abi::VLV_ACTION_BCC => Action::Bcc,
        abi::VLV_ACTION_FILTER => Action::Filter,
        abi::VLV_ACTION_WARN => Action::Warn,
        abi::VLV_ACTION_INFO => Action::Info,
        abi::VLV_ACTION_RAW => Action::Raw,
        _ => return None,
    })
}

pub(super) unsafe extern "C" fn host_reply_set(
    req: *mut vlv_request,
    action: u32,
    text: vlv_str,
) -> i32 {
    // SAFETY: req is the RequestCall of the running process() call, used only on its
    // thread (header: THREADS), so this exclusive borrow is the only one.
    let Some(call) = (unsafe { req.cast::<RequestCall<'_>>().as_mut() }) else {
        return abi::VLV_E_INVALID;
    };
    let result = match (action_of(action), std::str::from_utf8(bytes_of(text))) {
        (None, _) => Err(ReplyError::UnknownAction(format!("code {action}"))),
        (_, Err(_)) => Err(ReplyError::UnknownAction("text is not UTF-8".into())),
        (Some(a), Ok(t)) => Reply::new(a, t),
    };
    let rc = if result.is_ok() {
        abi::VLV_OK
    } else {
        abi::VLV_E_INVALID
    };
    call.reply = Some(result);
    rc
}

pub(super) unsafe extern "C" fn host_log_level(_ctx: *mut vlv_module_ctx) -> u32 {
    use tracing::level_filters::LevelFilter;
    // The subscriber's own hint: the most verbose level any of its directives allows.
    match LevelFilter::current() {
        LevelFilter::OFF => 0,
        LevelFilter::ERROR => abi::VLV_LOG_ERROR,
        LevelFilter::WARN => abi::VLV_LOG_WARN,
        LevelFilter::INFO => abi::VLV_LOG_INFO,
        LevelFilter::DEBUG => abi::VLV_LOG_DEBUG,
        _ => abi::VLV_LOG_TRACE,
    }
}

pub(super) unsafe extern "C" fn host_now(ctx: *mut vlv_module_ctx) -> i64 {
    // SAFETY: ctx is the pointer the host gave init; it lives until exit.
    match unsafe { ctx.cast::<ModuleCtx>().as_ref() } {
        Some(ctx) => ctx.clock.now(),
        // A module without its context (a C module passing NULL) still gets the time.
        None => Clock::system().now(),
    }
}
