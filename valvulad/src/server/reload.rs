//! A new configuration, read and put in force in an order that leaves nothing
//! half-done: everything is read and loaded before anything changes; new listeners are
//! bound next (a failure changes nothing); only then are reused modules given their new
//! sections, and the listeners switched to their new chains.

use std::path::Path;

use valvula_config::Config;

use super::Daemon;
use crate::host::{self, ModuleSet, Services};

/// Why a configuration could not be loaded; the running one stays.
#[derive(Debug, thiserror::Error)]
pub enum LoadFailed {
    #[error(transparent)]
    Config(#[from] valvula_config::ConfigError),
    /// Every module that failed, one per line with its config key.
    #[error("cannot load modules:\n{}", .0.join("\n"))]
    Modules(Vec<String>),
    #[error("{file}: {} error(s)\n  {}", .errors.len(), .errors.join("\n  "))]
    Chains { file: String, errors: Vec<String> },
}

/// Reads the configuration at `path` and loads its modules (reusing those of
/// `previous` from the same files); every problem is reported before giving up.
/// Returns the configuration, the modules, and the names of those reused.
pub fn load(
    path: &Path,
    previous: Option<&ModuleSet>,
    services: &Services,
) -> Result<(Config, ModuleSet, Vec<String>), LoadFailed> {
    load_from(path, None, previous, services)
}

/// [`load`] from `text` (the configuration as it was read earlier) instead of the file
/// at `path` (which still places relative paths), when given.
pub fn load_from(
    path: &Path,
    text: Option<&str>,
    previous: Option<&ModuleSet>,
    services: &Services,
) -> Result<(Config, ModuleSet, Vec<String>), LoadFailed> {
    let loaded = match text {
        Some(t) => valvula_config::load_text(t, path)?,
        None => valvula_config::load_file(path)?,
    };
    for w in &loaded.warnings {
        tracing::warn!("{}: {w}", path.display());
    }
    let (modules, reused) = ModuleSet::load(&loaded.config, previous, services)
        .map_err(|errs| LoadFailed::Modules(errs.iter().map(|e| format!("  {e}")).collect()))?;
    let errors = host::check_chains(&loaded.config, &modules);
    if !errors.is_empty() {
        close_new(&modules, &reused);
        return Err(LoadFailed::Chains {
            file: path.display().to_string(),
            errors,
        });
    }
    Ok((loaded.config, modules, reused))
}

/// Closes the modules of `set` that were loaded for it (not reused from the running
/// set): a reload that does not happen must not leave them running.
fn close_new(set: &ModuleSet, reused: &[String]) {
    for m in set.iter() {
        if !reused.iter().any(|r| r == m.name()) {
            m.close();
        }
    }
}

/// Settings a reload does not change: in force at the next restart.
fn restart_only(new: &Config, old: &Config) -> Vec<&'static str> {
    [
        ("[storage]", new.storage != old.storage),
        (
            "server.admin_socket",
            new.server.admin_socket != old.server.admin_socket,
        ),
        (
            "server.metrics_listen",
            new.server.metrics_listen != old.server.metrics_listen,
        ),
        (
            "server.user/group",
            (&new.server.user, &new.server.group) != (&old.server.user, &old.server.group),
        ),
        ("[log]", new.log != old.log),
    ]
    .into_iter()
    .filter_map(|(what, changed)| changed.then_some(what))
    .collect()
}

impl Daemon {
    /// SIGHUP, or `reload` on the admin socket: re-reads `path`; on any error the
    /// running configuration stays whole. `Ok` holds what takes effect only at the next
    /// restart; `Err` also reports a module that kept its previous settings (the rest of
    /// the new configuration applies).
    pub async fn reload(&self, path: &Path, services: &Services) -> Result<String, String> {
        tracing::info!(config = %path.display(), "SIGHUP: reloading configuration");
        let previous = self.modules();
        let (p, s) = (path.to_owned(), services.clone());
        let loaded = tokio::task::spawn_blocking(move || load(&p, Some(&previous), &s)).await;
        let (config, modules, reused) = match loaded {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                tracing::error!("reload refused, the running configuration stays: {e}");
                return Err(e.to_string());
            }
            Err(e) => {
                tracing::error!("reload failed: {e}");
                return Err(e.to_string());
            }
        };
        let later = restart_only(&config, &self.config());
        if !later.is_empty() {
            tracing::warn!(
                "changed, in effect at the next restart (not by a reload): {}",
                later.join(", ")
            );
        }
        // Bound before any module hears of the new settings: a listener that cannot
        // open leaves every module as it was (it once left them on the new sections).
        let fresh = match self.bind_new(&config).await {
            Ok(f) => f,
            Err(e) => {
                close_new(&modules, &reused);
                tracing::error!("reload refused, the running configuration stays: {e}");
                return Err(e.to_string());
            }
        };
        let empty = toml::Table::new();
        let settings = host::dispatch_settings(&config);
        let mut kept = Vec::new();
        for name in &reused {
            if let Some(d) = modules.get(name) {
                // The new timeout and quarantine settings, now that nothing can fail.
                d.update_settings(settings);
                let section = config.module_sections.get(name).unwrap_or(&empty).clone();
                if let Err(e) = d.reconf(section).await {
                    tracing::error!(module = %name, "reconf failed; the module keeps its previous settings: {e}");
                    kept.push(format!("{name} kept its previous settings ({e})"));
                }
            }
        }
        self.switch(config, modules, fresh);
        // In force: a worker's master learns the sockets now in use (a later worker
        // inherits them) and forgets the crashes it counted.
        if let Some(link) = crate::supervisor::worker::link() {
            self.tell_master_listeners();
            link.reloaded();
        }
        if kept.is_empty() {
            tracing::info!("configuration reloaded");
            Ok(if later.is_empty() {
                String::new()
            } else {
                format!("; at the next restart: {}", later.join(", "))
            })
        } else {
            tracing::warn!("configuration reloaded, but {}", kept.join("; "));
            Err(format!("configuration reloaded, but {}", kept.join("; ")))
        }
    }
}
