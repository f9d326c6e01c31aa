//! A listener: its socket, what it runs (swapped whole on reload), the state its
//! connections share, and the accept loop that admits them.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use valvula_config::{Config, LimitsConfig, ListenAddr, ListenerConfig, OnError};
use valvula_policy::{Action, Reply};
use valvula_store::RateLog;

use super::ServerError;
use super::connection::serve;
use super::connections::{Admission, Connections, Phase, Slot};
use crate::dispatch::Dispatcher;
use crate::host::ModuleSet;

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

pub(super) struct RunningListener {
    pub(super) address: ListenAddr,
    pub(super) shared: Arc<ListenerShared>,
    pub(super) stop: CancellationToken,
    pub(super) bound: String,
    pub(super) unix_path: Option<PathBuf>,
}

pub(super) fn runtime_for(
    l: &ListenerConfig,
    config: &Config,
    modules: &ModuleSet,
) -> ListenerRuntime {
    ListenerRuntime {
        config: l.clone(),
        chain: l
            .modules
            .iter()
            .filter_map(|m| modules.get(m).cloned())
            .collect(),
        limits: config.limits.clone(),
        valvula_lines: config.log.valvula_lines,
    }
}

pub(super) enum Bound {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

pub(super) async fn bind(l: &ListenerConfig) -> Result<(Bound, String), ServerError> {
    let err = |source| ServerError::Bind {
        name: l.name.clone(),
        address: l.address.to_string(),
        source,
    };
    match &l.address {
        ListenAddr::Tcp(a) => {
            let t = TcpListener::bind(a).await.map_err(err)?;
            let local = t.local_addr().map_err(err)?.to_string();
            Ok((Bound::Tcp(t), local))
        }
        ListenAddr::Unix(path) => {
            if let Ok(meta) = std::fs::symlink_metadata(path) {
                use std::os::unix::fs::FileTypeExt;
                if !meta.file_type().is_socket() {
                    return Err(err(std::io::Error::new(
                        std::io::ErrorKind::AlreadyExists,
                        "the path exists and is not a socket",
                    )));
                }
                // A socket file left by a crashed daemon is stale; one that answers is
                // another daemon's, and stealing it would cut that daemon off.
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(ServerError::SocketInUse {
                        name: l.name.clone(),
                        path: path.display().to_string(),
                    });
                }
                std::fs::remove_file(path).map_err(err)?;
            }
            let u = UnixListener::bind(path).map_err(err)?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(l.socket_mode))
                .map_err(err)?;
            Ok((
                Bound::Unix(u, path.clone()),
                format!("unix:{}", path.display()),
            ))
        }
    }
}

pub(super) async fn accept_loop(
    bound: Bound,
    shared: Arc<ListenerShared>,
    stop: CancellationToken,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            _ = shutdown.cancelled() => return,
            a = accept(&bound) => a,
        };
        let (stream, peer, ip) = match accepted {
            Ok(x) => x,
            Err(e) => {
                accept_failed(&e, &shared).await;
                continue;
            }
        };
        let rt = shared.runtime.load_full();
        if let Some(ip) = ip
            && !rt.config.allows(ip)
        {
            let n = shared.refused_network.fetch_add(1, Ordering::Relaxed) + 1;
            if shared.network_log.allow().is_some() {
                tracing::warn!(listener = %rt.config.name, client = %peer, refused_total = n, "connection refused: client is not in the listener's allowed networks");
            }
            continue;
        }
        let slot = match shared.conns.admit(rt.config.max_connections) {
            Admission::Admitted(slot) => slot,
            Admission::Replaced(slot, victim) => {
                if shared.evict_log.allow().is_some() {
                    let which = match victim.phase {
                        Phase::Partial => "the oldest stalled request",
                        _ => "the connection idle longest",
                    };
                    tracing::warn!(listener = %rt.config.name, client = %peer, max_connections = rt.config.max_connections, waited = ?victim.waited, evicted_total = shared.conns.evicted(), "listener is at its connection cap: closed {which} to admit a new connection");
                }
                slot
            }
            Admission::Refused => {
                let n = shared.refused.fetch_add(1, Ordering::Relaxed) + 1;
                if shared.refusal_log.allow().is_some() {
                    tracing::warn!(listener = %rt.config.name, client = %peer, max_connections = rt.config.max_connections, refused_total = n, "connection refused: listener is at its connection cap and every connection is in a request");
                }
                continue;
            }
        };
        let conn = Admitted {
            shared: shared.clone(),
            slot,
        };
        let shutdown = shutdown.clone();
        match stream {
            Stream::Tcp(s) => {
                let _ = s.set_nodelay(true);
                tracker.spawn(async move {
                    let mut conn = conn;
                    serve(s, &peer, &conn.shared, &shutdown, &mut conn.slot).await;
                });
            }
            Stream::Unix(s) => {
                tracker.spawn(async move {
                    let mut conn = conn;
                    serve(s, &peer, &conn.shared, &shutdown, &mut conn.slot).await;
                });
            }
        }
    }
}

/// An accept that failed. Out of file descriptors, the connection waits in the backlog
/// while idle ones hold every descriptor: close the one idle longest (as at the cap) so
/// it can be accepted, instead of leaving the new client unserved. Other resource
/// errors back off; the warning is logged once a second, not on every retry.
async fn accept_failed(e: &std::io::Error, shared: &ListenerShared) {
    use nix::libc;
    let code = e.raw_os_error().unwrap_or(0);
    // Errors of the one connection being accepted: the next accept is unaffected.
    if matches!(code, libc::ECONNABORTED | libc::ECONNRESET | libc::EPROTO) {
        tracing::debug!("accept failed: {e}");
        return;
    }
    let victim = if matches!(code, libc::EMFILE | libc::ENFILE) {
        shared.conns.evict_one()
    } else {
        None
    };
    if shared.accept_error_log.allow().is_some() {
        let listener = shared.runtime.load().config.name.clone();
        match &victim {
            Some(v) => {
                tracing::warn!(%listener, waited = ?v.waited, evicted_total = shared.conns.evicted(), "accept failed: {e}; closed the connection idle longest to make room")
            }
            None => tracing::warn!(%listener, "accept failed: {e}"),
        }
    }
    match victim {
        // Accept again once its descriptor is closed.
        Some(v) => {
            let _ = tokio::time::timeout(Duration::from_secs(1), v.closed()).await;
        }
        None => tokio::time::sleep(Duration::from_millis(100)).await,
    }
}

/// A connection's place in its listener, given back when its task ends (panics too).
struct Admitted {
    shared: Arc<ListenerShared>,
    slot: Slot,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.shared.conns.release(&self.slot);
    }
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(b: &Bound) -> std::io::Result<(Stream, String, Option<std::net::IpAddr>)> {
    match b {
        Bound::Tcp(t) => {
            let (s, a) = t.accept().await?;
            Ok((Stream::Tcp(s), a.to_string(), Some(a.ip())))
        }
        Bound::Unix(u, path) => {
            let (s, _) = u.accept().await?;
            Ok((Stream::Unix(s), format!("unix:{}", path.display()), None))
        }
    }
}
