//! One module: found, its file checked and opened, its definition checked before any
//! of its code runs, initialised, and called as a [`Handler`].

use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

use valvula_abi::{self as abi, vlv_module_ctx, vlv_module_def, vlv_request, vlv_str};
use valvula_policy::{Action, Reply, Request};

use crate::dispatch::{AsyncCall, CallWatch, Handler, HandlerError};
use valvula_store::sync::{Unpoisoned, UnpoisonedRw};

use super::api::*;
use super::table::{HOST_API, HOST_API_LEGACY};
use super::{LoadError, Services, Trust, file};

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
pub(super) fn load_checked(path: &Path, checked: file::Checked) -> Result<Opened, LoadError> {
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
    // A struct_size larger than the symbol itself would have the loader read past it:
    // believe the symbol table where it says.
    let size = match symbol_size(ptr) {
        Some(real) if real < size as usize => real as u32,
        _ => size,
    };
    let (hmaj, hmin) = (abi::VLV_ABI_MAJOR, abi::VLV_ABI_MINOR);
    // 0.x modules up to 0.5 (the layout 1.0 froze) load as they are.
    let legacy = major == 0 && minor <= abi::VLV_ABI_LEGACY_MINOR;
    if major != hmaj && !legacy {
        return Err(LoadError::WrongMajor {
            path: p,
            major,
            minor,
            host_major: hmaj,
            host_minor: hmin,
        });
    }
    if !legacy && minor > hmin {
        return Err(LoadError::NewerMinor {
            path: p,
            major,
            minor,
            host_major: hmaj,
            host_minor: hmin,
        });
    }
    // A minor newer than the host's was refused above.
    let need = abi::module_def_min_size(major, minor).unwrap_or(usize::MAX);
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
    // An older module's definition ends before the hooks later minors added: copy what
    // it has and leave the rest NULL.
    // Fields past its minor's layout are not the module's hooks, whatever its size says.
    let have = (size as usize)
        .min(std::mem::size_of::<vlv_module_def>())
        .min(need);
    let mut def = std::mem::MaybeUninit::<vlv_module_def>::zeroed();
    // SAFETY: struct_size (checked against its minor's layout above) says the module
    // provides `have` bytes at ptr; the destination is our own struct of at least that
    // size, and all-zero bytes are a valid vlv_module_def (NULL hooks, empty strings).
    let def = unsafe {
        std::ptr::copy_nonoverlapping(ptr.cast::<u8>(), def.as_mut_ptr().cast::<u8>(), have);
        def.assume_init()
    };
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
            nonblocking: self.def.flags & abi::VLV_FLAG_NONBLOCKING != 0,
            approved: RwLock::default(),
        }));
        let ctx_ptr = (ctx as *const ModuleCtx)
            .cast_mut()
            .cast::<vlv_module_ctx>();
        let mut state: *mut c_void = std::ptr::null_mut();
        let init = self.def.init.expect("checked in open");
        let api = if self.def.abi_major == 0 {
            &HOST_API_LEGACY
        } else {
            &HOST_API
        };
        // SAFETY: the definition passed every check of open(); HOST_API is static and
        // ctx is leaked, so both outlive the module as the header promises.
        let status = super::crash::running(&ctx.name, "init", || unsafe {
            init(api, ctx_ptr, &mut state)
        });
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
            closed: std::sync::Arc::new(RwLock::new(false)),
            poll_blocked: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)),
            opened: self,
        })
    }
}

/// How long `close` waits for a VLV_FLAG_SERIALIZE module's lock.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The size the ELF symbol table gives the definition at `ptr` (glibc's dladdr1), if it
/// says one.
#[cfg(all(target_os = "linux", target_env = "gnu", target_pointer_width = "64"))]
fn symbol_size(ptr: *const u8) -> Option<usize> {
    const RTLD_DL_SYMENT: libc::c_int = 1;
    // SAFETY: all-zero is a valid Dl_info (null pointers), filled in by dladdr1.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    let mut sym: *mut libc::c_void = std::ptr::null_mut();
    // SAFETY: `ptr` is the address dlsym gave for a loaded library's symbol; dladdr1
    // only looks it up and writes the two out pointers, which are ours.
    let found = unsafe { libc::dladdr1(ptr.cast(), &mut info, &mut sym, RTLD_DL_SYMENT) };
    if found == 0 || sym.is_null() {
        return None;
    }
    // SAFETY: with RTLD_DL_SYMENT, `sym` points at the symbol's ElfW(Sym) entry in the
    // library's symbol table, which stays mapped (libraries are never unloaded).
    let size = unsafe { (*sym.cast::<libc::Elf64_Sym>()).st_size };
    (size > 0).then_some(size as usize)
}

#[cfg(not(all(target_os = "linux", target_env = "gnu", target_pointer_width = "64")))]
fn symbol_size(_ptr: *const u8) -> Option<usize> {
    None
}

/// An initialised module.
pub struct LoadedModule {
    opened: Opened,
    ctx: &'static ModuleCtx,
    /// The module's state pointer, kept as an integer: the module, not Rust, decides
    /// which threads may use it (see VLV_FLAG_SERIALIZE).
    state: usize,
    serialize: Option<Mutex<()>>,
    /// Closed: set (under the write lock) before `close` runs. A `process_poll` call
    /// still pending then (a request past the shutdown grace) is neither polled nor
    /// handed to `process_drop` again: no hook runs after `close`.
    closed: std::sync::Arc<RwLock<bool>>,
    /// A `process_poll` call blocked the event loop (see [`POLL_BLOCKED`]): from then
    /// on its requests go to `process` on the module's threads, under the timeout.
    poll_blocked: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// A `process_poll` call that runs this long has blocked an event-loop thread (and the
/// requests of every listener queued behind it); polls are meant to take microseconds.
const POLL_BLOCKED: std::time::Duration = std::time::Duration::from_millis(100);

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

    /// The answer of a finished `process` or `process_poll` call.
    fn answer(
        status: i32,
        reply: Option<Result<Reply, valvula_policy::ReplyError>>,
    ) -> Result<Option<Reply>, HandlerError> {
        if status == abi::VLV_E_UNAVAILABLE {
            return Err(HandlerError::Unavailable(
                "module reports a service it needs as unavailable".into(),
            ));
        }
        if status != abi::VLV_OK {
            // The module's status for a verdict the host refused (VLV_E_INVALID from
            // reply_set, passed on): the daemon's log says what was wrong with it.
            if let Some(Err(e)) = reply {
                return Err(HandlerError::InvalidReply(format!("{e} (status {status})")));
            }
            return Err(HandlerError::Status(status));
        }
        match reply {
            None => Ok(None),
            Some(Err(e)) => Err(HandlerError::InvalidReply(e.to_string())),
            Some(Ok(r)) if r.action() == Action::Dunno => Ok(None),
            Some(Ok(r)) => Ok(Some(r)),
        }
    }
}

/// A `process_poll` call the host may give up on: dropped while the module still holds
/// a call (a timeout, a shutdown), it hands the call back through `process_drop`.
struct Abandon {
    process_drop: Option<unsafe extern "C" fn(*mut c_void, *mut c_void)>,
    /// The module's name, for the crash record (the leaked context's, so 'static).
    name: &'static str,
    state: usize,
    /// The module's call pointer while it is pending; 0 when there is none.
    call: usize,
    closed: std::sync::Arc<RwLock<bool>>,
}

impl Drop for Abandon {
    fn drop(&mut self) {
        let closed = self.closed.read_now();
        if self.call != 0
            && !*closed
            && let Some(f) = self.process_drop
        {
            // SAFETY: state is what init returned and call the pointer the module set in
            // its last poll, which returned VLV_PENDING; it is never polled again. The
            // pending storage calls were dropped first (they live in the future this
            // guard belongs to, declared after it), so nothing writes the module's
            // memory afterwards.
            super::crash::running(self.name, "process_drop", || unsafe {
                f(self.state as *mut c_void, self.call as *mut c_void)
            })
        }
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

    fn handle_async(
        &self,
        req: &std::sync::Arc<Request>,
        watch: &std::sync::Arc<CallWatch>,
    ) -> Option<AsyncCall> {
        let poll = self.opened.def.process_poll?;
        if self.serialize.is_some() {
            // One call at a time: the worker threads and their lock, as before.
            return None;
        }
        if self.poll_blocked.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        let blocked = self.poll_blocked.clone();
        let abandon = Abandon {
            process_drop: self.opened.def.process_drop,
            name: &self.ctx.name,
            state: self.state,
            call: 0,
            closed: self.closed.clone(),
        };
        let (req, watch) = (req.clone(), watch.clone());
        let state = self.state;
        let name: &'static str = &self.ctx.name;
        Some(Box::pin(async move {
            let mut abandon = abandon;
            let mut call = RequestCall::new(&req, true);
            let mut polled_before = false;
            let status = loop {
                let status = {
                    let closed = abandon.closed.read_now();
                    if *closed {
                        return Err(HandlerError::Other("module is closed".into()));
                    }
                    let mut cp = abandon.call as *mut c_void;
                    // SAFETY: state is what init returned; `call` lives across every poll
                    // of this request and is reached only through the host functions, on
                    // the thread running the poll; cp is the module's own call pointer.
                    let (status, took) = super::crash::polling(name, || unsafe {
                        poll(
                            state as *mut c_void,
                            (&mut call as *mut RequestCall<'_>).cast::<vlv_request>(),
                            &mut cp,
                        )
                    });
                    if took > POLL_BLOCKED
                        && !blocked.swap(true, std::sync::atomic::Ordering::Relaxed)
                    {
                        tracing::error!(
                            module = name,
                            ms = took.as_millis() as u64,
                            "process_poll blocked the event loop for {} ms (it must never block); \
                             until the next restart this module's requests go to process() on its \
                             own threads, under the module timeout",
                            took.as_millis()
                        );
                    }
                    abandon.call = cp as usize;
                    status
                };
                if status == abi::VLV_BLOCKING {
                    let submitted = call.pending.as_ref().is_some_and(|p| !p.is_empty());
                    if polled_before || submitted {
                        // process() would run what the submitted calls may already have
                        // done: refused, the module's fault. Its call (if it kept one)
                        // is handed back through process_drop.
                        return Err(HandlerError::Other(
                            "module answered VLV_BLOCKING after submitting a storage call".into(),
                        ));
                    }
                    return Err(HandlerError::Blocking);
                }
                polled_before = true;
                if status != abi::VLV_PENDING {
                    // Finished: the module freed its call itself.
                    abandon.call = 0;
                    break status;
                }
                let pending = call
                    .pending
                    .as_mut()
                    .map(std::mem::take)
                    .unwrap_or_default();
                if pending.is_empty() {
                    return Err(HandlerError::Other(
                        "module answered VLV_PENDING without a storage call pending".into(),
                    ));
                }
                watch.entered_storage();
                for p in pending {
                    let noted = p.await;
                    call.noted.merge(noted);
                }
                watch.left_storage();
            };
            watch.note(call.noted.outage, call.noted.request_data);
            Self::answer(status, call.reply)
        }))
    }

    fn handle(&self, req: &Request) -> Result<Option<Reply>, HandlerError> {
        let mut call = RequestCall::new(req, false);
        let process = self.opened.def.process.expect("checked in open");
        let _g = self.lock();
        // SAFETY: state is what init returned; call lives across the call and is only
        // reached through the host functions, on this thread.
        let status = super::crash::running(&self.ctx.name, "process", || unsafe {
            process(
                self.state as *mut c_void,
                (&mut call as *mut RequestCall<'_>).cast::<vlv_request>(),
            )
        });
        Self::answer(status, call.reply)
    }

    fn reconf(&self, section: &toml::Table) -> Result<(), HandlerError> {
        *self.ctx.section.write_now() = Section::new(section);
        let Some(reconf) = self.opened.def.reconf else {
            return Ok(());
        };
        let _g = self.lock();
        // SAFETY: state is what init returned; reconf may overlap process per the header.
        let status = super::crash::running(&self.ctx.name, "reconf", || unsafe {
            reconf(self.state as *mut c_void)
        });
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
            super::crash::running(&self.ctx.name, "tick", || unsafe {
                tick(self.state as *mut c_void, kinds, now)
            })
        }
    }

    fn close(&self) {
        // Waits for a poll under way (they never block), and keeps any later one out.
        *self.closed.write_now() = true;
        if let Some(close) = self.opened.def.close {
            // SERIALIZE: a call that hung past its timeout holds the lock for good, and
            // waiting for it would hang the shutdown. Waited for a while, then close is
            // skipped (the module's memory goes with the process).
            let _g = match &self.serialize {
                None => None,
                Some(m) => {
                    let end = std::time::Instant::now() + CLOSE_WAIT;
                    loop {
                        match m.try_lock() {
                            Ok(g) => break Some(g),
                            Err(std::sync::TryLockError::Poisoned(p)) => {
                                break Some(p.into_inner());
                            }
                            Err(std::sync::TryLockError::WouldBlock)
                                if std::time::Instant::now() < end =>
                            {
                                std::thread::sleep(std::time::Duration::from_millis(10));
                            }
                            Err(std::sync::TryLockError::WouldBlock) => {
                                tracing::warn!(
                                    module = %self.ctx.name,
                                    "close skipped: a call still running (past its timeout) holds the module's VLV_FLAG_SERIALIZE lock"
                                );
                                return;
                            }
                        }
                    }
                }
            };
            // SAFETY: called once (the dispatcher guards it), after which no hook runs.
            super::crash::running(&self.ctx.name, "close", || unsafe {
                close(self.state as *mut c_void)
            })
        }
    }
}
