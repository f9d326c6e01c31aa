//! Write a valvulad module in safe Rust.
//!
//! ```ignore
//! use valvula_module::{export_module, Host, Module, Request, Verdict, Error};
//!
//! struct Hello { host: Host }
//!
//! impl Module for Hello {
//!     fn init(host: Host) -> Result<Self, Error> { Ok(Hello { host }) }
//!     fn process(&self, req: &Request<'_>) -> Result<Verdict, Error> {
//!         match req.sasl_username() {
//!             Some("blocked@example.com") => Ok(Verdict::reject("you are blocked")),
//!             _ => Ok(Verdict::dunno()),
//!         }
//!     }
//! }
//!
//! export_module!(Hello, name = "mod-hello", description = "says no to one user");
//! ```
//!
//! Build the crate as a `cdylib`. The module crate itself needs no `unsafe`: the
//! trampolines here convert between the C ABI and the [`Module`] trait, catch every
//! panic (a panic becomes an error status, which the daemon answers with the listener's
//! on-error action) and route `tracing` events to the daemon's log. Keep Cargo's
//! default `panic = "unwind"`: a module built with `panic = "abort"` refuses to
//! initialise (a panic there would end the daemon), and the daemon's log says why.

mod asynchronous;
mod bounded;
mod host;
mod log_bridge;
mod request;
mod storage;
#[doc(hidden)]
pub mod trampolines;

pub use bounded::bounded;
pub use host::{Host, LogLevel};
pub use request::Request;
pub use storage::{
    Charge, Column, Consumption, Consumptions, Dialect, Exec, Rows, StorageError, Value, Window,
    WindowKind, WindowState,
};
pub use valvula_abi as abi;
pub use valvula_policy::Action;

/// Errors a module reports; the daemon logs them and applies the on-error action.
pub type Error = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Returned by `process_async` before its first storage call when this request must
/// block (a schema change, a rollover): the daemon then decides it with `process` on a
/// worker thread (ABI 0.5 `VLV_BLOCKING`), where [`Request::polled`] is false.
#[derive(Debug, Clone, Copy)]
pub struct RunBlocking;

impl std::fmt::Display for RunBlocking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("this request needs a worker thread")
    }
}

impl std::error::Error for RunBlocking {}

/// Which clock boundaries a tick crossed (`VLV_TICK_*` bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticks(pub u32);

impl Ticks {
    pub fn minute(self) -> bool {
        self.0 & abi::VLV_TICK_MINUTE != 0
    }
    pub fn hour(self) -> bool {
        self.0 & abi::VLV_TICK_HOUR != 0
    }
    pub fn day(self) -> bool {
        self.0 & abi::VLV_TICK_DAY != 0
    }
    pub fn month(self) -> bool {
        self.0 & abi::VLV_TICK_MONTH != 0
    }
}

/// A module's answer to one request. The host validates the text (no CR/LF/NUL, length,
/// required for prepend/redirect/bcc/filter/raw); an invalid verdict counts as an error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub action: Action,
    pub text: String,
}

impl Verdict {
    pub fn new(action: Action, text: impl Into<String>) -> Self {
        Verdict {
            action,
            text: text.into(),
        }
    }
    /// No opinion: the next module in the chain decides.
    pub fn dunno() -> Self {
        Self::new(Action::Dunno, "")
    }
    pub fn ok() -> Self {
        Self::new(Action::Ok, "")
    }
    /// OK with a text (Postfix logs it).
    pub fn ok_with(text: impl Into<String>) -> Self {
        Self::new(Action::Ok, text)
    }
    pub fn reject(text: impl Into<String>) -> Self {
        Self::new(Action::Reject, text)
    }
    pub fn defer(text: impl Into<String>) -> Self {
        Self::new(Action::Defer, text)
    }
    pub fn defer_if_permit(text: impl Into<String>) -> Self {
        Self::new(Action::DeferIfPermit, text)
    }
    /// Route the message through `transport` (e.g. `smtp:[relay]`, or valvula's
    /// `transport11:` form).
    pub fn filter(transport: impl Into<String>) -> Self {
        Self::new(Action::Filter, transport)
    }
}

/// What a module implements. One value is created by `init` and shared by every thread
/// that calls `process` (so it is `Sync`: use atomics or locks for mutable state, or set
/// the SERIALIZE flag in [`export_module!`]).
///
/// Implement `process`, or set [`Module::ASYNC`] and implement `process_async` (each
/// one's default calls the other): then a daemon of ABI 0.5 runs the request on its
/// own task, and the `_async` storage calls ([`Host::consume_all_async`],
/// [`Host::query_async`], ...) wait for the database without holding a thread, their
/// commits shared with the other requests of the moment. An older daemon calls
/// `process`, which then runs the same future with the calls done synchronously.
pub trait Module: Sized + Send + Sync + 'static {
    /// Export `process_async` as the module's `process_poll` (ABI 0.5).
    const ASYNC: bool = false;
    /// Called once at load. Keep `host` for logging and configuration.
    fn init(host: Host) -> Result<Self, Error>;
    /// Decides one request.
    fn process(&self, req: &Request<'_>) -> Result<Verdict, Error> {
        trampolines::ready_now(self.process_async(req))
    }
    /// Decides one request on the daemon's event loop (with [`Module::ASYNC`]). It must
    /// not block: wait for the database only through the `_async` storage calls.
    fn process_async<'a>(
        &'a self,
        req: &'a Request<'a>,
    ) -> impl std::future::Future<Output = Result<Verdict, Error>> + Send + 'a {
        async move { self.process(req) }
    }
    /// The daemon reloaded its configuration; re-read it with [`Host::config`].
    fn reconf(&self) -> Result<(), Error> {
        Ok(())
    }
    /// Called once a minute (see [`Ticks`]); `now` is the host's clock.
    fn tick(&self, _ticks: Ticks, _now: i64) {}
    /// The daemon is done with the module: it is stopping, or a reload that loaded it
    /// was refused.
    fn close(self) {}
}

/// Exports a [`Module`] implementation as the `vlv_module_v1` symbol.
///
/// `export_module!(Type, name = "mod-x", description = "...")`, optionally followed by
/// `flags = valvula_module::abi::VLV_FLAG_NONBLOCKING` (or `VLV_FLAG_SERIALIZE`). The
/// version is the crate's `CARGO_PKG_VERSION`.
#[macro_export]
macro_rules! export_module {
    ($ty:ty, name = $name:expr, description = $desc:expr $(,)?) => {
        $crate::export_module!($ty, name = $name, description = $desc, flags = 0);
    };
    ($ty:ty, name = $name:expr, description = $desc:expr, flags = $flags:expr $(,)?) => {
        #[doc(hidden)]
        #[unsafe(no_mangle)]
        pub static vlv_module_v1: $crate::abi::vlv_module_def =
            $crate::trampolines::definition::<$ty>($name, env!("CARGO_PKG_VERSION"), $desc, $flags);
    };
}
