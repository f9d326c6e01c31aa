//! The modules a configuration wants, loaded together (a reload reuses what is
//! loaded), and the chains checked against them.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::dispatch::{DispatchSettings, Dispatcher, Handler};
use valvula_config::Config;
use valvula_store::Clock;

use super::load::*;
use super::{LoadError, Services, Trust, file};

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
                // Its new dispatch settings (timeout, quarantine) take effect when the
                // configuration is switched to, not before: a reload may still fail.
                let d = prev.by_name[&name].clone();
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
                    taken(p).or_else(|| {
                        p.by_name
                            .get(&opened.name)
                            .filter(|d| d.disabled().is_none())
                            .map(|d| d.name().into())
                    })
                })
            }) {
                errors.push(at(LoadError::Duplicate {
                    name: opened.name,
                    first,
                    second: path,
                }));
                continue;
            }
            if previous.is_none()
                && let Some(why) = services.disabled.get(&opened.name)
            {
                tracing::error!(
                    module = %opened.name,
                    "module {} started DISABLED: it {why}; its requests get the listener's on-error action until the next reload",
                    opened.name
                );
                let d = crate::dispatch::Disabled {
                    name: opened.name.clone(),
                    version: opened.version.clone(),
                    why: why.clone(),
                };
                set.order.push(d.name.clone());
                if entry.contains('/') {
                    set.entries.insert(entry.clone(), d.name.clone());
                }
                set.by_name
                    .insert(d.name.clone(), Dispatcher::new(Arc::new(d), settings));
                continue;
            }
            // Before init: a thread its init starts may crash at once.
            super::crash::register_module(&opened.name, id.0, id.1);
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
            // The modules initialised for this set must not run on unseen.
            for (name, d) in &set.by_name {
                if !reused.contains(name) {
                    d.close();
                }
            }
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
