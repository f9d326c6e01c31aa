//! A listener: its socket, and the accept loop that admits connections to it.

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use valvula_config::{Config, ListenAddr, ListenerConfig};

use super::ServerError;
use super::connection::serve;
use super::connections::{Admission, Phase, Slot};
use super::shared::{ListenerRuntime, ListenerShared};
use crate::host::ModuleSet;

pub(super) struct RunningListener {
    pub(super) address: ListenAddr,
    pub(super) shared: Arc<ListenerShared>,
    pub(super) stop: CancellationToken,
    pub(super) bound: String,
    pub(super) unix_path: Option<PathBuf>,
    /// A second descriptor of the listening socket, sent to the master so that the
    /// next worker inherits it.
    pub(super) held: Option<OwnedFd>,
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

impl Bound {
    /// Another descriptor of the same listening socket.
    pub(super) fn held(&self) -> Option<OwnedFd> {
        match self {
            Bound::Tcp(t) => t.as_fd().try_clone_to_owned().ok(),
            Bound::Unix(u, _) => u.as_fd().try_clone_to_owned().ok(),
        }
    }
}

/// The listening socket the master kept for `l`, when this process is its worker.
fn inherited(l: &ListenerConfig) -> Option<std::io::Result<(Bound, String)>> {
    let link = crate::supervisor::worker::link()?;
    let fd = link.take_listener(&crate::supervisor::listen_key(&l.name, &l.address))?;
    Some((|| match &l.address {
        ListenAddr::Tcp(_) => {
            let std = std::net::TcpListener::from(fd);
            std.set_nonblocking(true)?;
            let t = TcpListener::from_std(std)?;
            let local = t.local_addr()?.to_string();
            Ok((Bound::Tcp(t), local))
        }
        ListenAddr::Unix(path) => {
            let std = std::os::unix::net::UnixListener::from(fd);
            std.set_nonblocking(true)?;
            let u = UnixListener::from_std(std)?;
            Ok((
                Bound::Unix(u, path.clone()),
                format!("unix:{}", path.display()),
            ))
        }
    })())
}

/// Binds `l` for the master, which keeps the socket and passes it to each worker.
pub async fn bind_held(l: &ListenerConfig) -> Result<OwnedFd, ServerError> {
    let (b, _) = bind(l).await?;
    let err = |source| ServerError::Bind {
        name: l.name.clone(),
        address: l.address.to_string(),
        source,
    };
    match b {
        Bound::Tcp(t) => Ok(t.into_std().map_err(err)?.into()),
        Bound::Unix(u, _) => Ok(u.into_std().map_err(err)?.into()),
    }
}

pub(super) async fn bind(l: &ListenerConfig) -> Result<(Bound, String), ServerError> {
    let err = |source| ServerError::Bind {
        name: l.name.clone(),
        address: l.address.to_string(),
        source,
    };
    if let Some(r) = inherited(l) {
        return r.map_err(err);
    }
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
