//! Loading modules from shared objects and serving them the host API.
//!
//! Every check of the definition happens before any module function runs (file owner
//! and mode as Postfix's dynamicmaps checks them, magic, ABI version, struct size, flags,
//! name, duplicates); libraries are opened `RTLD_NOW | RTLD_LOCAL` and never closed, so a
//! pointer a module handed out can never dangle.

mod api;
pub mod crash;
mod error;
mod file;
mod load;
mod namespace;
mod set;
mod storage;
mod table;

use std::sync::Arc;

use valvula_store::{Clock, Store};

pub use error::LoadError;
pub use file::Trust;
pub use load::{LoadedModule, Opened, open, open_with, resolve};
pub use set::{ModuleSet, check_chains, dispatch_settings};

/// What the host lends the modules it loads, besides the ABI: the storage (none for a
/// chain without storage, as in the ABI tests) and the clock the modules and their
/// counters read (a test's own manual clock, else the system's).
#[derive(Clone, Debug, Default)]
pub struct Services {
    pub store: Option<Arc<Store>>,
    pub clock: Clock,
    /// Modules the master asked this worker to start disabled (they crashed it
    /// repeatedly), with why. Applies to the first load only: a reload enables them.
    pub disabled: Arc<std::collections::HashMap<String, String>>,
}

impl Services {
    pub fn new(store: Arc<Store>, clock: Clock) -> Services {
        Services {
            store: Some(store),
            clock,
            disabled: Arc::default(),
        }
    }
}
