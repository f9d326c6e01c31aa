//! valvulad: a Postfix policy daemon whose decisions come from loadable modules.
//!
//! - [`config`]: `valvulad.toml`, every error with its key path;
//! - [`server`]: listeners, framing, timeouts, the chain, reload and shutdown;
//! - [`dispatch`]: calling one module safely (pool, timeout, panics, quarantine);
//! - [`host`]: loading module shared objects and the host side of the C ABI;
//! - [`logging`]: stderr or syslog.
//!
//! `ARCHITECTURE.md` at the repository root shows how a request flows through them.

pub mod admin;
pub mod dispatch;
pub mod host;
pub mod logging;
pub mod privileges;
pub mod process;
pub mod server;
pub mod supervisor;
