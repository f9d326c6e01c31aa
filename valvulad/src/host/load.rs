//! One module: found, its file checked and opened, its definition checked before any
//! of its code runs, initialised, and called as a [`Handler`].

use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

use valvula_abi::{self as abi, vlv_module_ctx, vlv_module_def, vlv_request, vlv_str};
use valvula_policy::{Action, Reply, Request};

use crate::dispatch::{Handler, HandlerError};
use valvula_store::sync::{Unpoisoned, UnpoisonedRw};

use super::api::*;
use super::table::HOST_API;
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
