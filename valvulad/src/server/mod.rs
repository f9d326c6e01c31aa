//! The policy service: listeners, their connections, the chain each runs, the modules'
//! ticks, and reloads that apply whole or not at all.
//!
//! - `listener`: binding and the accept loop;
//! - `shared`: what a listener runs (swapped on reload) and counts, for its connections;
//! - `connections`: the connection table (who gives way at the cap);
//! - `connection`: one connection's requests, framed, answered in order;
//! - `chain`: the modules of a listener, first answer that is not DUNNO wins;
//! - `ticks`: minute, hour, day and month boundaries delivered to modules;
//! - `reload`: a new configuration read, checked and put in force in a safe order.

mod chain;
mod connection;
mod connections;
mod listener;
mod reload;
mod shared;
mod ticks;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use valvula_config::{Config, ListenerConfig};
use valvula_store::sync::Unpoisoned;

use crate::host::ModuleSet;
pub use listener::bind_held;
use listener::{Bound, RunningListener, accept_loop, bind, runtime_for};
use shared::ListenerShared;

pub use chain::valvula_line;
pub use reload::{load, load_from};
pub use shared::{ListenerRuntime, ListenerStats};
pub use ticks::tick_kinds;

struct State {
    config: Arc<Config>,
    modules: ModuleSet,
    /// By listener name: a listener is kept across a reload when its name and address
    /// stay the same.
    listeners: HashMap<String, RunningListener>,
}

/// A running daemon: its listeners, modules and connections.
#[derive(Clone)]
pub struct Daemon {
    state: Arc<Mutex<State>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    started: Instant,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("listener {name} ({address}): cannot listen: {source}")]
    Bind {
        name: String,
        address: String,
        source: std::io::Error,
    },
    #[error("listener {name}: {path} is in use by a running server")]
    SocketInUse { name: String, path: String },
}

impl Daemon {
    /// Binds every listener and starts serving. Nothing is served if a bind fails.
    pub async fn start(config: Config, modules: ModuleSet) -> Result<Daemon, ServerError> {
        let d = Daemon {
            state: Arc::new(Mutex::new(State {
                config: Arc::new(config.clone()),
                modules: ModuleSet::default(),
                listeners: HashMap::new(),
            })),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            started: Instant::now(),
        };
        d.apply(config, modules).await?;
        ticks::spawn(d.state.clone(), d.shutdown.clone());
        Ok(d)
    }

    /// The listeners' names and the addresses they are bound to (a `:0` port resolved).
    pub fn bound(&self) -> Vec<(String, String)> {
        let st = self.state.locked();
        let mut v: Vec<_> = st
            .listeners
            .values()
            .map(|l| (l.shared.runtime.load().config.name.clone(), l.bound.clone()))
            .collect();
        v.sort();
        v
    }

    /// Each listener's figures, sorted by name: what the status and `/metrics` show.
    pub fn listener_stats(&self) -> Vec<ListenerStats> {
        let st = self.state.locked();
        let mut v: Vec<_> = st
            .listeners
            .values()
            .map(|l| l.shared.stats(&l.bound))
            .collect();
        v.sort();
        v
    }

    /// Delivers the ticks for a clock move from `before` to `after` now, as the minute
    /// loop does; for tests that inject time instead of waiting for it.
    pub async fn tick_between(&self, before: i64, after: i64) {
        ticks::run(&self.state, before, after).await;
    }

    pub fn config(&self) -> Arc<Config> {
        self.state.locked().config.clone()
    }

    pub fn modules(&self) -> ModuleSet {
        self.state.locked().modules.clone()
    }

    /// Tells the master (when this process is a worker) which listening sockets are
    /// in use now, so the next worker inherits exactly these.
    pub fn tell_master_listeners(&self) {
        let Some(link) = crate::supervisor::worker::link() else {
            return;
        };
        let st = self.state.locked();
        let socks: Vec<(String, std::os::fd::BorrowedFd<'_>)> = st
            .listeners
            .iter()
            .filter_map(|(name, l)| {
                use std::os::fd::AsFd;
                Some((
                    crate::supervisor::listen_key(name, &l.address),
                    l.held.as_ref()?.as_fd(),
                ))
            })
            .collect();
        link.listeners(&socks);
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Switches to a new configuration: new listeners are bound first (if one fails,
    /// nothing changes), kept listeners get the new chain for their next request,
    /// removed ones stop accepting while their open connections finish.
    pub async fn apply(&self, config: Config, modules: ModuleSet) -> Result<(), ServerError> {
        let fresh = self.bind_new(&config).await?;
        self.switch(config, modules, fresh);
        Ok(())
    }

    /// Binds the listeners of `config` that do not run yet (a new name or address).
    /// Nothing running changes; dropping the result closes them again.
    async fn bind_new(
        &self,
        config: &Config,
    ) -> Result<Vec<(ListenerConfig, (Bound, String))>, ServerError> {
        let to_bind: Vec<ListenerConfig> = {
            let st = self.state.locked();
            config
                .listeners
                .iter()
                .filter(|l| {
                    st.listeners
                        .get(&l.name)
                        .is_none_or(|r| r.address != l.address)
                })
                .cloned()
                .collect()
        };
        let mut fresh = Vec::new();
        for l in to_bind {
            let b = bind(&l).await?;
            fresh.push((l, b));
        }
        Ok(fresh)
    }

    /// Puts `config` in force with listeners already bound: cannot fail, so a reload
    /// is never left half-applied.
    fn switch(
        &self,
        config: Config,
        modules: ModuleSet,
        fresh: Vec<(ListenerConfig, (Bound, String))>,
    ) {
        let mut st = self.state.locked();
        let removed: Vec<String> = st
            .listeners
            .iter()
            .filter(|(name, r)| {
                !config
                    .listeners
                    .iter()
                    .any(|l| &l.name == *name && l.address == r.address)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in removed {
            if let Some(l) = st.listeners.remove(&name) {
                tracing::info!(listener = %name, address = %l.bound, "listener removed; its open connections finish");
                l.stop.cancel();
                if let Some(p) = l.unix_path {
                    let _ = std::fs::remove_file(p);
                }
            }
        }
        for l in &config.listeners {
            if let Some(r) = st.listeners.get(&l.name) {
                r.shared
                    .runtime
                    .store(Arc::new(runtime_for(l, &config, &modules)));
            }
        }
        for (l, (bound, addr)) in fresh {
            let shared = Arc::new(ListenerShared::new(runtime_for(&l, &config, &modules)));
            let stop = CancellationToken::new();
            tracing::info!(listener = %l.name, address = %addr, chain = ?l.modules, "listening");
            let unix_path = match &bound {
                Bound::Unix(_, p) => Some(p.clone()),
                Bound::Tcp(_) => None,
            };
            let held = bound.held();
            self.tracker.spawn(accept_loop(
                bound,
                shared.clone(),
                stop.clone(),
                self.shutdown.clone(),
                self.tracker.clone(),
            ));
            st.listeners.insert(
                l.name.clone(),
                RunningListener {
                    address: l.address.clone(),
                    shared,
                    stop,
                    bound: addr,
                    unix_path,
                    held,
                },
            );
        }
        st.config = Arc::new(config);
        st.modules = modules;
    }

    /// Stops accepting, lets in-flight requests finish (at most `grace`), closes modules.
    pub async fn shutdown(self, grace: Duration) {
        tracing::info!("shutting down: no new connections; finishing requests in flight");
        // The copies kept for the master go now: with them the sockets would stay open
        // and new clients would wait out the grace period instead of being refused.
        for l in self.state.locked().listeners.values_mut() {
            l.held = None;
        }
        self.shutdown.cancel();
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(grace = ?grace, "requests still running after the grace period; stopping anyway");
        }
        let st = self.state.locked();
        for l in st.listeners.values() {
            if let Some(p) = &l.unix_path {
                let _ = std::fs::remove_file(p);
            }
        }
        for m in st.modules.iter() {
            m.close();
        }
    }
}
