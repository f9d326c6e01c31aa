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

    /// This module's whole configuration section, deserialised. An error names the key
    /// in the section (`policy[0].limits`), as the operator wrote it in TOML; the JSON
    /// the section travels as is never mentioned. A missing section reads
    /// as an empty table, so `#[serde(default)]` structs get their defaults.
    pub fn config<T: DeserializeOwned>(&self) -> Result<T, Error> {
        let text = self.config_raw("").unwrap_or_else(|| "{}".to_owned());
        let mut de = serde_json::Deserializer::from_str(&text);
        serde_path_to_error::deserialize(&mut de).map_err(|e| config_error(&e).into())
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

/// A configuration error as the operator needs it: the key path in the module's TOML
/// section and what is wrong, without serde_json's position in the JSON rendering.
fn config_error(e: &serde_path_to_error::Error<serde_json::Error>) -> String {
    let inner = e.inner().to_string();
    // serde_json appends " at line L column C" (of the JSON text): meaningless here.
    let what = match inner.rfind(" at line ") {
        Some(i) if inner[i..].contains(" column ") => &inner[..i],
        _ => &inner,
    };
    let path = e.path().to_string();
    if path == "." || path.is_empty() {
        format!("module configuration: {what}")
    } else {
        format!("module configuration, key {path}: {what}")
    }
}

#[cfg(test)]
mod config_tests {
    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Limit {
        window: String,
        count: u64,
    }
    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Cfg {
        #[serde(default)]
        fail: bool,
        #[serde(default)]
        limits: Vec<Limit>,
    }

    fn err(json: &str) -> String {
        let mut de = serde_json::Deserializer::from_str(json);
        let e = serde_path_to_error::deserialize::<_, Cfg>(&mut de).unwrap_err();
        super::config_error(&e)
    }

    #[test]
    fn errors_name_the_toml_key_not_a_json_position() {
        let e = err(r#"{"fail":"yes"}"#);
        assert!(
            e.starts_with("module configuration, key fail: invalid type"),
            "{e}"
        );
        assert!(!e.contains("line") && !e.contains("column"), "{e}");
        let e = err(r#"{"limits":[{"window":"hour","count":1},{"window":"day","count":-1}]}"#);
        assert!(e.contains("key limits[1].count:"), "{e}");
        let e = err(r#"{"typo":1}"#);
        assert!(e.contains("unknown field `typo`"), "{e}");
    }
}
