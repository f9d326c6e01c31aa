//! What a listener's connections share across reloads: what the listener runs
//! (swapped whole on reload), the connection table, and what it counts.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use valvula_config::{LimitsConfig, ListenerConfig, OnError};
use valvula_policy::{Action, Reply};
use valvula_store::RateLog;

use super::connections::Connections;
use crate::dispatch::Dispatcher;

/// What one listener runs; replaced as a whole on reload.
#[derive(Debug)]
pub struct ListenerRuntime {
    pub config: ListenerConfig,
    pub chain: Vec<Arc<Dispatcher>>,
    pub limits: LimitsConfig,
    /// Decision lines in valvula's format.
    pub valvula_lines: bool,
}

impl ListenerRuntime {
    pub(super) fn on_error_reply(&self) -> Option<Reply> {
        let text = self.config.on_error_text.clone();
        match self.config.on_error {
            OnError::Dunno => Some(Reply::dunno()),
            OnError::Defer => Reply::new(Action::Defer, text).ok(),
            OnError::Reject => Reply::new(Action::Reject, text).ok(),
            OnError::Disconnect => None,
        }
    }
}

/// Answers of a listener: by action, and connections closed without a reply (the
/// on-error action `disconnect`).
#[derive(Default)]
pub(super) struct Answers {
    by_action: [AtomicU64; Action::ALL.len()],
    closed: AtomicU64,
}

impl Answers {
    pub(super) fn count(&self, reply: Option<&Reply>) {
        let slot = reply.and_then(|r| Action::ALL.iter().position(|a| *a == r.action()));
        match slot {
            Some(i) => &self.by_action[i],
            None => &self.closed,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    /// Each action's verb (`disconnect` for the closes) and its count.
    pub(super) fn snapshot(&self) -> Vec<(&'static str, u64)> {
        Action::ALL
            .iter()
            .zip(&self.by_action)
            .map(|(a, c)| (a.verb(), c.load(Ordering::Relaxed)))
            .chain([("disconnect", self.closed.load(Ordering::Relaxed))])
            .collect()
    }
}

/// State a listener's connections share across reloads.
pub(super) struct ListenerShared {
    pub(super) runtime: ArcSwap<ListenerRuntime>,
    /// Open connections, and which one gives way to a new one at the cap.
    pub(super) conns: Connections,
    /// Refusals, evictions and accept errors are logged at most once a second each, so a
    /// flood cannot flood the log.
    pub(super) refusal_log: RateLog,
    pub(super) network_log: RateLog,
    pub(super) evict_log: RateLog,
    pub(super) accept_error_log: RateLog,
    /// Connections closed for malformed requests, logged at most once a second.
    pub(super) malformed_log: RateLog,
    /// Connections refused at the cap.
    pub(super) refused: AtomicU64,
    /// Connections refused because the client is outside the allowed networks.
    pub(super) refused_network: AtomicU64,
    /// Connections closed for a malformed or oversized request.
    pub(super) malformed: AtomicU64,
    pub(super) answers: Answers,
}

impl ListenerShared {
    pub(super) fn new(runtime: ListenerRuntime) -> ListenerShared {
        ListenerShared {
            runtime: ArcSwap::from_pointee(runtime),
            conns: Connections::default(),
            refusal_log: RateLog::default(),
            network_log: RateLog::default(),
            evict_log: RateLog::default(),
            accept_error_log: RateLog::default(),
            malformed_log: RateLog::default(),
            refused: AtomicU64::new(0),
            refused_network: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            answers: Answers::default(),
        }
    }

    /// What the status and metrics show of this listener.
    pub(super) fn stats(&self, bound: &str) -> ListenerStats {
        let rt = self.runtime.load();
        ListenerStats {
            name: rt.config.name.clone(),
            bound: bound.to_owned(),
            chain: rt.config.modules.clone(),
            open: self.conns.open(),
            idle: self.conns.idle(),
            evicted: self.conns.evicted(),
            refused_cap: self.refused.load(Ordering::Relaxed),
            refused_network: self.refused_network.load(Ordering::Relaxed),
            malformed: self.malformed.load(Ordering::Relaxed),
            answers: self.answers.snapshot(),
        }
    }
}

/// A listener's figures at one moment, for the admin socket's status and `/metrics`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ListenerStats {
    pub name: String,
    /// The address it is bound to (`127.0.0.1:3579`, `unix:/run/...`).
    pub bound: String,
    pub chain: Vec<String>,
    /// Open connections, and those of them waiting between requests.
    pub open: usize,
    pub idle: usize,
    /// Connections closed to make room for a new one.
    pub evicted: u64,
    /// Connections refused at the cap, and for a client outside `allow`.
    pub refused_cap: u64,
    pub refused_network: u64,
    /// Connections closed for a malformed or oversized request.
    pub malformed: u64,
    /// Answers by action verb; `disconnect` counts closes without a reply.
    pub answers: Vec<(&'static str, u64)>,
}
