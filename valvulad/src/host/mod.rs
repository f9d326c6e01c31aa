//! Loading modules from shared objects and serving them the host API.
//!
//! Every check of the definition happens before any module function runs (file owner
//! and mode as Postfix's dynamicmaps checks them, magic, ABI version, struct size, flags,
//! name, duplicates); libraries are opened `RTLD_NOW | RTLD_LOCAL` and never closed, so a
//! pointer a module handed out can never dangle.

use std::collections::HashMap;
use std::ffi::{c_char, c_void};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use valvula_abi::{
    self as abi, vlv_host_api, vlv_module_ctx, vlv_module_def, vlv_request, vlv_str,
};
use valvula_policy::{Action, Reply, ReplyError, Request};

use crate::dispatch::{DispatchSettings, Dispatcher, Handler, HandlerError};
use valvula_config::Config;
use valvula_store::{Clock, Store};

mod file;
mod storage;
pub use file::Trust;
use storage::*;
use valvula_store::sync::{Unpoisoned, UnpoisonedRw};

/// What the host lends the modules it loads, besides the ABI: the storage (none for a
/// chain without storage, as in the ABI tests) and the clock the modules and their
/// counters read (a test's own manual clock, else the system's).
#[derive(Clone, Debug, Default)]
pub struct Services {
    pub store: Option<Arc<Store>>,
    pub clock: Clock,
}

impl Services {
    pub fn new(store: Arc<Store>, clock: Clock) -> Services {
        Services {
            store: Some(store),
            clock,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A load error of the entry at `key` (`server.modules[0]`, `listener[1].modules[0]`).
    #[error("{key}: {source}")]
    At {
        key: String,
        #[source]
        source: Box<LoadError>,
    },
    #[error(
        "module {name:?}: no {candidates} in {dirs} (install it there, or add its directory to server.module_dirs)"
    )]
    NotFound {
        name: String,
        candidates: String,
        dirs: String,
    },
    #[error("{path}: cannot open {at}: {source}")]
    Walk {
        path: PathBuf,
        /// The component that failed, symbolic links resolved.
        at: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: refused: {file} is a {kind}, not a regular file")]
    NotAFile {
        path: PathBuf,
        file: PathBuf,
        kind: &'static str,
    },
    #[error(
        "{path}: refused: the file {file} (owner {}, mode {mode:04o}) is group- or world-writable; a module runs inside the daemon, so only its owner may change it: chmod go-w {file}",
        file::owner(*.uid)
    )]
    Writable {
        path: PathBuf,
        /// The file, symbolic links resolved.
        file: PathBuf,
        uid: u32,
        mode: u32,
    },
    #[error(
        "{path}: refused: the file {file} is owned by {} (mode {mode:04o}), not by {trusted}, who alone may change the daemon's code: chown root {file}",
        file::owner(*.uid)
    )]
    Owner {
        path: PathBuf,
        file: PathBuf,
        uid: u32,
        mode: u32,
        /// Who may own it, as words.
        trusted: String,
    },
    #[error(
        "{path}: refused: the directory {dir} (owner {}, mode {mode:04o}) is group- or world-writable{}, so others can put their own code in the module's place: chmod go-w {dir}, or install the module in a directory only root can write, such as {}",
        file::owner(*.uid),
        if *.mode & 0o1000 != 0 { " (the sticky bit does not stop others adding files)" } else { "" },
        valvula_config::DEFAULT_MODULE_DIR
    )]
    DirWritable {
        path: PathBuf,
        /// The directory, symbolic links resolved.
        dir: PathBuf,
        uid: u32,
        mode: u32,
    },
    #[error(
        "{path}: refused: the directory {dir} is owned by {} (mode {mode:04o}), not by {trusted}, and its owner can put other code in the module's place: chown root {dir}, or install the module elsewhere, such as {}",
        file::owner(*.uid),
        valvula_config::DEFAULT_MODULE_DIR
    )]
    DirOwner {
        path: PathBuf,
        dir: PathBuf,
        uid: u32,
        mode: u32,
        trusted: String,
    },
    #[error("{path}: cannot be loaded: {error}")]
    Open { path: PathBuf, error: String },
    #[error("{path}: not a valvulad module: no symbol vlv_module_v1")]
    MissingSymbol { path: PathBuf },
    #[error("{path}: not a valvulad module: bad magic {found:#010x} (expected {expected:#010x})")]
    BadMagic {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error(
        "{path}: built for module ABI {major}.{minor}, but this valvulad speaks ABI {host_major}.{host_minor} (major versions must match)"
    )]
    WrongMajor {
        path: PathBuf,
        major: u16,
        minor: u16,
        host_major: u16,
        host_minor: u16,
    },
    #[error(
        "{path}: built for module ABI {major}.{minor}, newer than this valvulad's ABI {host_major}.{host_minor}; upgrade valvulad"
    )]
    NewerMinor {
        path: PathBuf,
        major: u16,
        minor: u16,
        host_major: u16,
        host_minor: u16,
    },
    #[error(
        "{path}: module definition is {size} bytes, but ABI {major}.{minor} needs at least {need} (built against a broken header?)"
    )]
    ShortStruct {
        path: PathBuf,
        size: u32,
        need: usize,
        major: u16,
        minor: u16,
    },
    #[error(
        "{path}: unknown flags {flags:#x} in the module definition (ABI {host_major}.{host_minor} knows {known:#x})"
    )]
    UnknownFlags {
        path: PathBuf,
        flags: u32,
        known: u32,
        host_major: u16,
        host_minor: u16,
    },
    #[error("{path}: invalid module name {name:?} (1-64 bytes of A-Z a-z 0-9 _ . -)")]
    BadName { path: PathBuf, name: String },
    #[error("{path}: the module definition has no {hook} function")]
    MissingHook { path: PathBuf, hook: &'static str },
    #[error("{second}: module name {name:?} is already taken by {first}")]
    Duplicate {
        name: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("{path}: module {name:?} failed to initialise (init returned {status})")]
    InitFailed {
        path: PathBuf,
        name: String,
        status: i32,
    },
}

impl LoadError {
    /// The error itself, without the config key it was reported at.
    pub fn cause(&self) -> &LoadError {
        match self {
            LoadError::At { source, .. } => source.cause(),
            other => other,
        }
    }
}

/// The file a module entry (`mod-ticket` or a path) refers to. Only finds it: every check
/// is made by [`open`], on the file it opens.
pub fn resolve(entry: &str, dirs: &[PathBuf]) -> Result<PathBuf, LoadError> {
    if entry.contains('/') {
        return Ok(PathBuf::from(entry));
    }
    let names = [
        format!("{entry}.so"),
        format!("lib{entry}.so"),
        format!("lib{}.so", entry.replace('-', "_")),
    ];
    for d in dirs {
        for n in &names {
            let p = d.join(n);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    Err(LoadError::NotFound {
        name: entry.to_owned(),
        candidates: names.join(" or "),
        dirs: dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// A module's configuration section, pre-rendered for `config_get`.
#[derive(Default)]
struct Section {
    whole: String,
    keys: HashMap<String, String>,
}

impl Section {
    fn new(t: &toml::Table) -> Self {
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
    section: RwLock<Section>,
    pub(crate) store: Option<Arc<Store>>,
    pub(crate) clock: Clock,
    /// Storage errors of this module, logged at most once a second.
    pub(crate) storage_log: valvula_store::RateLog,
}

/// What `vlv_request *` points at during one `process` call.
struct RequestCall<'a> {
    req: &'a Request,
    reply: Option<Result<Reply, ReplyError>>,
}

pub(crate) fn bytes_of<'a>(s: vlv_str) -> &'a [u8] {
    if s.ptr.is_null() || s.len == 0 {
        return &[];
    }
    // SAFETY: the module passes (ptr, len) of memory it owns for the duration of the
    // call; the header requires it.
    unsafe { std::slice::from_raw_parts(s.ptr.cast::<u8>(), s.len) }
}

unsafe extern "C" fn host_log(ctx: *mut vlv_module_ctx, level: u32, msg: vlv_str) {
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

unsafe extern "C" fn host_config_get(
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

unsafe extern "C" fn host_request_get(
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

unsafe extern "C" fn host_request_attr(
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

unsafe extern "C" fn host_reply_set(req: *mut vlv_request, action: u32, text: vlv_str) -> i32 {
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

unsafe extern "C" fn host_now(ctx: *mut vlv_module_ctx) -> i64 {
    // SAFETY: ctx is the pointer the host gave init; it lives until exit.
    match unsafe { ctx.cast::<ModuleCtx>().as_ref() } {
        Some(ctx) => ctx.clock.now(),
        // A module without its context (a C module passing NULL) still gets the time.
        None => Clock::system().now(),
    }
}

/// The table every module gets. Static: it outlives every module.
static HOST_API: vlv_host_api = vlv_host_api {
    struct_size: std::mem::size_of::<vlv_host_api>() as u32,
    abi_major: abi::VLV_ABI_MAJOR,
    abi_minor: abi::VLV_ABI_MINOR,
    log: Some(host_log),
    config_get: Some(host_config_get),
    request_get: Some(host_request_get),
    request_attr: Some(host_request_attr),
    reply_set: Some(host_reply_set),
    now: Some(host_now),
    sql_dialect: Some(host_sql_dialect),
    sql_exec: Some(host_sql_exec),
    sql_batch: Some(host_sql_batch),
    sql_query: Some(host_sql_query),
    rows_count: Some(host_rows_count),
    rows_columns: Some(host_rows_columns),
    rows_get: Some(host_rows_get),
    rows_column_name: Some(host_rows_column_name),
    rows_free: Some(host_rows_free),
    consume: Some(host_consume),
    peek: Some(host_peek),
    reset: Some(host_reset),
    consume_once: Some(host_consume_once),
    sql_exec_once: Some(host_sql_exec_once),
    consume_all: Some(host_consume_all),
    time_zone: Some(host_time_zone),
};

/// A checked module definition, not yet initialised.
pub struct Opened {
    pub path: PathBuf,
    pub name: String,
    pub version: String,
    pub description: String,
    def: vlv_module_def,
}

fn str_of(s: vlv_str) -> String {
    String::from_utf8_lossy(bytes_of(s)).into_owned()
}

fn valid_name(n: &str) -> bool {
    (1..=64).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Checks the file, loads it and checks its definition. Runs no module function (other
/// than the library's own constructors, which dlopen runs). Trusts root and the user the
/// daemon runs as (see [`open_with`]).
pub fn open(path: &Path) -> Result<Opened, LoadError> {
    open_with(path, &Trust::new(None))
}

/// [`open`], trusting `trust` to own the file and every directory above it.
pub fn open_with(path: &Path, trust: &Trust) -> Result<Opened, LoadError> {
    let checked = file::open_checked(path, trust)?;
    load_checked(path, checked)
}

/// Loads the file `checked` holds open (never a path that could have changed since the
/// checks) and checks its definition.
fn load_checked(path: &Path, checked: file::Checked) -> Result<Opened, LoadError> {
    let flags = libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_LOCAL;
    let lib = file::load_checked(checked, |name| {
        // SAFETY: loading runs the library's constructors. That is the trust an operator
        // grants by installing a module file that root or the daemon's user owns, in
        // directories only they can write: `name` is the descriptor open_checked checked.
        unsafe { libloading::os::unix::Library::open(Some(name), flags) }.map_err(|e| {
            let mut error = e.to_string().replace(name, &path.display().to_string());
            if !Path::new("/proc/self/fd").is_dir() {
                error.push_str(" (valvulad loads modules through /proc/self/fd: mount /proc)");
            }
            LoadError::Open {
                path: path.to_owned(),
                error,
            }
        })
    })?;
    // SAFETY: we only take the symbol's address; nothing is read through it yet.
    let sym = unsafe { lib.get::<*const vlv_module_def>(abi::VLV_MODULE_SYMBOL) };
    let ptr: *const u8 = match sym {
        // For a data symbol, dlsym's result is the address of the data.
        Ok(s) => s.into_raw().cast(),
        Err(_) => {
            return Err(LoadError::MissingSymbol {
                path: path.to_owned(),
            });
        }
    };
    // Never close the library: code and data of a module must outlive every call.
    let _handle = lib.into_raw();
    let p = path.to_owned();

    // Read the fixed header field by field: until the magic and size are known, nothing
    // says the symbol is as large as our struct.
    // SAFETY: the symbol is at least 4 bytes of readable data if it is a module at all;
    // read_unaligned because a foreign library may not align it.
    let magic = unsafe { ptr.cast::<u32>().read_unaligned() };
    if magic != abi::VLV_MODULE_MAGIC {
        return Err(LoadError::BadMagic {
            path: p,
            found: magic,
            expected: abi::VLV_MODULE_MAGIC,
        });
    }
    // SAFETY: the magic matched, so this is the 16-byte header every ABI version has.
    let (major, minor, size, mflags) = unsafe {
        (
            ptr.add(4).cast::<u16>().read_unaligned(),
            ptr.add(6).cast::<u16>().read_unaligned(),
            ptr.add(8).cast::<u32>().read_unaligned(),
            ptr.add(12).cast::<u32>().read_unaligned(),
        )
    };
    let (hmaj, hmin) = (abi::VLV_ABI_MAJOR, abi::VLV_ABI_MINOR);
    if major != hmaj {
        return Err(LoadError::WrongMajor {
            path: p,
            major,
            minor,
            host_major: hmaj,
            host_minor: hmin,
        });
    }
    if minor > hmin {
        return Err(LoadError::NewerMinor {
            path: p,
            major,
            minor,
            host_major: hmaj,
            host_minor: hmin,
        });
    }
    // A minor newer than the host's was refused above.
    let need = abi::module_def_min_size(minor).unwrap_or(usize::MAX);
    if (size as usize) < need {
        return Err(LoadError::ShortStruct {
            path: p,
            size,
            need,
            major,
            minor,
        });
    }
    if mflags & !abi::VLV_FLAGS_KNOWN != 0 {
        return Err(LoadError::UnknownFlags {
            path: p,
            flags: mflags,
            known: abi::VLV_FLAGS_KNOWN,
            host_major: hmaj,
            host_minor: hmin,
        });
    }
    // SAFETY: struct_size says the module provides at least every field of our struct
    // (need == size_of for the current minor).
    let def = unsafe { ptr.cast::<vlv_module_def>().read_unaligned() };
    let name = str_of(def.name);
    if !valid_name(&name) {
        return Err(LoadError::BadName { path: p, name });
    }
    if def.init.is_none() {
        return Err(LoadError::MissingHook {
            path: p,
            hook: "init",
        });
    }
    if def.process.is_none() {
        return Err(LoadError::MissingHook {
            path: p,
            hook: "process",
        });
    }
    Ok(Opened {
        path: p,
        version: str_of(def.version),
        description: str_of(def.description),
        name,
        def,
    })
}

impl Opened {
    /// Runs the module's init with its configuration section.
    pub fn init(
        self,
        section: &toml::Table,
        services: &Services,
    ) -> Result<LoadedModule, LoadError> {
        // Leaked on purpose: the module may keep its ctx pointer until the process exits.
        let ctx: &'static ModuleCtx = Box::leak(Box::new(ModuleCtx {
            name: self.name.clone(),
            section: RwLock::new(Section::new(section)),
            store: services.store.clone(),
            clock: services.clock.clone(),
            storage_log: valvula_store::RateLog::default(),
        }));
        let ctx_ptr = (ctx as *const ModuleCtx)
            .cast_mut()
            .cast::<vlv_module_ctx>();
        let mut state: *mut c_void = std::ptr::null_mut();
        let init = self.def.init.expect("checked in open");
        // SAFETY: the definition passed every check of open(); HOST_API is static and
        // ctx is leaked, so both outlive the module as the header promises.
        let status = unsafe { init(&HOST_API, ctx_ptr, &mut state) };
        if status != abi::VLV_OK {
            return Err(LoadError::InitFailed {
                path: self.path,
                name: self.name,
                status,
            });
        }
        let serialize = (self.def.flags & abi::VLV_FLAG_SERIALIZE != 0).then(|| Mutex::new(()));
        Ok(LoadedModule {
            ctx,
            state: state as usize,
            serialize,
            opened: self,
        })
    }
}

/// An initialised module.
pub struct LoadedModule {
    opened: Opened,
    ctx: &'static ModuleCtx,
    /// The module's state pointer, kept as an integer: the module, not Rust, decides
    /// which threads may use it (see VLV_FLAG_SERIALIZE).
    state: usize,
    serialize: Option<Mutex<()>>,
}

impl LoadedModule {
    pub fn path(&self) -> &Path {
        &self.opened.path
    }
    pub fn version(&self) -> &str {
        &self.opened.version
    }
    pub fn description(&self) -> &str {
        &self.opened.description
    }
    fn lock(&self) -> Option<std::sync::MutexGuard<'_, ()>> {
        self.serialize.as_ref().map(|m| m.locked())
    }
}

impl Handler for LoadedModule {
    fn name(&self) -> &str {
        &self.opened.name
    }

    fn version(&self) -> &str {
        &self.opened.version
    }

    fn nonblocking(&self) -> bool {
        self.opened.def.flags & abi::VLV_FLAG_NONBLOCKING != 0
    }

    fn handle(&self, req: &Request) -> Result<Option<Reply>, HandlerError> {
        let mut call = RequestCall { req, reply: None };
        let process = self.opened.def.process.expect("checked in open");
        let _g = self.lock();
        // SAFETY: state is what init returned; call lives across the call and is only
        // reached through the host functions, on this thread.
        let status = unsafe {
            process(
                self.state as *mut c_void,
                (&mut call as *mut RequestCall<'_>).cast::<vlv_request>(),
            )
        };
        if status == abi::VLV_E_UNAVAILABLE {
            return Err(HandlerError::Unavailable(
                "module reports a service it needs as unavailable".into(),
            ));
        }
        if status != abi::VLV_OK {
            return Err(HandlerError::Status(status));
        }
        match call.reply {
            None => Ok(None),
            Some(Err(e)) => Err(HandlerError::InvalidReply(e.to_string())),
            Some(Ok(r)) if r.action() == Action::Dunno => Ok(None),
            Some(Ok(r)) => Ok(Some(r)),
        }
    }

    fn reconf(&self, section: &toml::Table) -> Result<(), HandlerError> {
        *self.ctx.section.write_now() = Section::new(section);
        let Some(reconf) = self.opened.def.reconf else {
            return Ok(());
        };
        let _g = self.lock();
        // SAFETY: state is what init returned; reconf may overlap process per the header.
        let status = unsafe { reconf(self.state as *mut c_void) };
        if status == abi::VLV_OK {
            Ok(())
        } else {
            Err(HandlerError::Status(status))
        }
    }

    fn tick(&self, kinds: u32, now: i64) {
        if let Some(tick) = self.opened.def.tick {
            let _g = self.lock();
            // SAFETY: state is what init returned.
            unsafe { tick(self.state as *mut c_void, kinds, now) }
        }
    }

    fn close(&self) {
        if let Some(close) = self.opened.def.close {
            let _g = self.lock();
            // SAFETY: called once (the dispatcher guards it), after which no hook runs.
            unsafe { close(self.state as *mut c_void) }
        }
    }
}

/// The modules of one configuration, by name.
#[derive(Default, Clone)]
pub struct ModuleSet {
    pub by_name: HashMap<String, Arc<Dispatcher>>,
    /// Each loaded file, by identity (device, inode): its path with symbolic links
    /// resolved, and the module it holds. A reload reuses what is loaded.
    files: HashMap<file::FileId, (PathBuf, String)>,
    /// Entries that name a file (they contain a `/`): the module each one loaded, so a
    /// chain may name a module by its file.
    entries: HashMap<String, String>,
    pub order: Vec<String>,
    /// The clock the modules read; their ticks follow it too.
    pub clock: Clock,
}

impl std::fmt::Debug for ModuleSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModuleSet")
            .field("order", &self.order)
            .finish()
    }
}

pub fn dispatch_settings(c: &Config) -> DispatchSettings {
    DispatchSettings {
        timeout: c.server.module_timeout,
        threads: c.server.module_threads,
        quarantine_after: c.server.quarantine_after,
        quarantine_for: c.server.quarantine_for,
    }
}

impl ModuleSet {
    /// A set of in-process handlers (tests, built-ins).
    pub fn from_handlers(handlers: Vec<Arc<dyn Handler>>, settings: DispatchSettings) -> Self {
        let mut s = ModuleSet::default();
        for h in handlers {
            let name = h.name().to_owned();
            s.order.push(name.clone());
            s.by_name.insert(name, Dispatcher::new(h, settings));
        }
        s
    }

    /// Loads what `config` asks for. Modules already in `previous` (same file) are
    /// reused; the caller runs their `reconf`. Every file and directory is checked again
    /// either way: a reload reports what a restart would refuse. Returns every error, not
    /// just the first, each with the config key of its entry.
    pub fn load(
        config: &Config,
        previous: Option<&ModuleSet>,
        services: &Services,
    ) -> Result<(ModuleSet, Vec<String>), Vec<LoadError>> {
        let settings = dispatch_settings(config);
        let trust = Trust::new(config.server.user.as_deref());
        let mut set = ModuleSet {
            clock: services.clock.clone(),
            ..ModuleSet::default()
        };
        let mut reused = Vec::new();
        let mut errors = Vec::new();
        let empty = toml::Table::new();
        for (key, entry) in config.module_entries() {
            let at = |e: LoadError| LoadError::At {
                key: key.clone(),
                source: Box::new(e),
            };
            let path = match resolve(&entry, &config.server.module_dirs) {
                Ok(p) => p,
                Err(e) => {
                    errors.push(at(e));
                    continue;
                }
            };
            let checked = match file::open_checked(&path, &trust) {
                Ok(c) => c,
                Err(e) => {
                    errors.push(at(e));
                    continue;
                }
            };
            // The same file through another entry (a name and a path, a symlink): one
            // module, given twice.
            if let Some((first, name)) = set.files.get(&checked.id) {
                errors.push(at(LoadError::Duplicate {
                    name: name.clone(),
                    first: first.clone(),
                    second: path,
                }));
                continue;
            }
            if let Some(prev) = previous
                && let Some((id, name)) = prev.loaded_as(&checked)
            {
                let d = prev.by_name[&name].clone();
                d.update_settings(settings);
                set.files.insert(id, (checked.real.clone(), name.clone()));
                if entry.contains('/') {
                    set.entries.insert(entry.clone(), name.clone());
                }
                set.order.push(name.clone());
                set.by_name.insert(name.clone(), d);
                reused.push(name);
                continue;
            }
            let (id, real) = (checked.id, checked.real.clone());
            let opened = match load_checked(&path, checked) {
                Ok(o) => o,
                Err(e) => {
                    errors.push(at(e));
                    continue;
                }
            };
            let taken = |s: &ModuleSet| {
                s.files
                    .values()
                    .find(|(_, n)| *n == opened.name)
                    .map(|(p, _)| p.clone())
            };
            if let Some(first) = taken(&set).or_else(|| {
                previous.and_then(|p| {
                    taken(p).or_else(|| p.by_name.get(&opened.name).map(|d| d.name().into()))
                })
            }) {
                errors.push(at(LoadError::Duplicate {
                    name: opened.name,
                    first,
                    second: path,
                }));
                continue;
            }
            let section = config.module_sections.get(&opened.name).unwrap_or(&empty);
            match opened.init(section, services) {
                Ok(m) => {
                    let name = Handler::name(&m).to_owned();
                    tracing::info!(
                        module = %name,
                        version = m.version(),
                        path = %m.path().display(),
                        file = %real.display(),
                        "module loaded"
                    );
                    set.files.insert(id, (real, name.clone()));
                    if entry.contains('/') {
                        set.entries.insert(entry.clone(), name.clone());
                    }
                    set.order.push(name.clone());
                    set.by_name
                        .insert(name, Dispatcher::new(Arc::new(m), settings));
                }
                Err(e) => errors.push(at(e)),
            }
        }
        if errors.is_empty() {
            Ok((set, reused))
        } else {
            Err(errors)
        }
    }

    /// The loaded module `checked` is, and the identity to remember it by: the same file,
    /// or a file that replaced the loaded one at the same place since. A module cannot be
    /// unloaded, so the replacement runs only after a restart (said loudly here); loading
    /// it now would run its constructors for nothing, its name being taken.
    fn loaded_as(&self, checked: &file::Checked) -> Option<(file::FileId, String)> {
        if let Some((_, name)) = self.files.get(&checked.id) {
            return Some((checked.id, name.clone()));
        }
        let (id, (_, name)) = self
            .files
            .iter()
            .find(|(_, (real, _))| *real == checked.real)?;
        tracing::warn!(
            module = %name,
            file = %checked.real.display(),
            "the module file was replaced since it was loaded; the loaded version keeps running until valvulad restarts"
        );
        Some((*id, name.clone()))
    }

    /// A module by name, or by the file entry (with a `/`) that loaded it.
    pub fn get(&self, name: &str) -> Option<&Arc<Dispatcher>> {
        self.by_name
            .get(name)
            .or_else(|| self.entries.get(name).and_then(|n| self.by_name.get(n)))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Dispatcher>> {
        self.order.iter().filter_map(|n| self.by_name.get(n))
    }
}

/// Chain entries that name no loaded module, as config errors with their key paths.
pub fn check_chains(config: &Config, set: &ModuleSet) -> Vec<String> {
    let mut errors = Vec::new();
    for (i, l) in config.listeners.iter().enumerate() {
        for (j, m) in l.modules.iter().enumerate() {
            if set.get(m).is_none() {
                errors.push(format!(
                    "listener[{i}].modules[{j}]: no module named {m:?} is loaded (loaded: {})",
                    if set.order.is_empty() {
                        "none".to_owned()
                    } else {
                        set.order.join(", ")
                    }
                ));
            }
        }
    }
    for name in config.module_sections.keys() {
        if set.get(name).is_none() {
            tracing::warn!("module.{name}: configuration for a module that is not loaded, ignored");
        }
    }
    errors
}
