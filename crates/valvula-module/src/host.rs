use std::ffi::c_char;

use serde::de::DeserializeOwned;

use crate::Error;
use crate::abi::{self, vlv_host_api, vlv_module_ctx, vlv_str};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Error = 1,
    Warn = 2,
    Info = 3,
    Debug = 4,
    Trace = 5,
}

/// The daemon's services, as given to `init`. Cheap to copy; usable from any thread.
#[derive(Clone, Copy)]
pub struct Host {
    api: &'static vlv_host_api,
    ctx: *mut vlv_module_ctx,
}

// SAFETY: the header promises the host table and the module ctx may be used from any
// thread for the life of the process.
unsafe impl Send for Host {}
// SAFETY: as above; the host serialises what needs serialising on its side.
unsafe impl Sync for Host {}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host").finish_non_exhaustive()
    }
}

impl Host {
    pub(crate) fn new(api: &'static vlv_host_api, ctx: *mut vlv_module_ctx) -> Self {
        Host { api, ctx }
    }

    pub(crate) fn api(&self) -> &'static vlv_host_api {
        self.api
    }

    pub(crate) fn ctx(&self) -> *mut vlv_module_ctx {
        self.ctx
    }

    /// The most verbose level the daemon logs now, as a `VLV_LOG_*` number (0: none);
    /// a daemon older than ABI 0.5 is taken to log everything up to debug.
    pub(crate) fn log_level_now(&self) -> u32 {
        let api = self.api;
        let has = api.struct_size as usize
            >= std::mem::offset_of!(abi::vlv_host_api, log_level) + std::mem::size_of::<usize>();
        match api.log_level {
            // SAFETY: the table reaches the field (checked) and ctx is this module's.
            Some(f) if has => unsafe { f(self.ctx) },
            _ => abi::VLV_LOG_DEBUG,
        }
    }

    /// Writes one line to the daemon's log. Prefer `tracing` macros: they end up here.
    pub fn log(&self, level: LogLevel, msg: &str) {
        if let Some(f) = self.api.log {
            // SAFETY: ctx came from the host's init call and lives until exit; msg is
            // borrowed for the call and the host copies it.
            unsafe { f(self.ctx, level as u32, vlv_str::from_str(msg)) }
        }
    }

    /// The text of one key of this module's `[module.NAME]` section (see the
    /// header for how non-strings are rendered), `None` when absent.
    pub fn config_raw(&self, key: &str) -> Option<String> {
        let f = self.api.config_get?;
        let mut buf: Vec<u8> = vec![0; 256];
        loop {
            let mut len = 0usize;
            // SAFETY: buf is ours and holds cap bytes; key is borrowed for the call.
            let rc = unsafe {
                f(
                    self.ctx,
                    vlv_str::from_str(key),
                    buf.as_mut_ptr().cast::<c_char>(),
                    buf.len(),
                    &mut len,
                )
            };
            match rc {
                abi::VLV_OK => {
                    buf.truncate(len);
                    return Some(String::from_utf8_lossy(&buf).into_owned());
                }
                abi::VLV_E_TOO_SMALL if len > buf.len() => buf.resize(len, 0),
                _ => return None,
            }
        }
    }

    /// This module's whole configuration section, deserialised. A missing section reads
    /// as an empty table, so `#[serde(default)]` structs get their defaults.
    pub fn config<T: DeserializeOwned>(&self) -> Result<T, Error> {
        let text = self.config_raw("").unwrap_or_else(|| "{}".to_owned());
        serde_json::from_str(&text).map_err(|e| format!("module configuration: {e}").into())
    }

    /// The host's clock in seconds since the epoch (tests move it; use it, not the
    /// system clock).
    pub fn now(&self) -> i64 {
        match self.api.now {
            // SAFETY: ctx is valid for the life of the process.
            Some(f) => unsafe { f(self.ctx) },
            None => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0),
        }
    }
}
