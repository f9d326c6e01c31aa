//! The admin socket: a unix socket where `valvula-ctl` asks for `status` or a `reload`;
//! beside it, [`metrics`], the Prometheus listener.
//!
//! Only root and the daemon's own user are served (checked with the peer's credentials,
//! on top of the socket file's 0600 mode). One command per connection, one line each
//! way; status is JSON.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};

use crate::server::Daemon;

pub mod metrics;
pub use metrics::spawn_metrics;

/// A reload asked for over the socket; the main loop answers with the outcome.
pub type ReloadRequest = oneshot::Sender<Result<String, String>>;

/// Longest command line read from the admin socket (`status`, `reload`).
const ADMIN_MAX_LINE: usize = 1024;
/// Time a client has to send its command, and to take the answer.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds the socket (replacing a stale one) and serves it until the daemon stops. A path
/// holding anything but a socket is an `AlreadyExists` error and is left as it is.
pub fn spawn(
    path: &Path,
    daemon: Daemon,
    reload: mpsc::Sender<ReloadRequest>,
) -> std::io::Result<()> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)?;
    }
    if let Some(problem) = valvula_config::admin_socket_problem(path) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            problem,
        ));
    }
    if std::fs::symlink_metadata(path).is_ok() {
        // A socket (checked above, without following links) that nobody answers on is
        // left by a daemon that died; one that answers belongs to a running valvulad.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is in use by another valvulad", path.display()),
            ));
        }
        // unlink removes the directory entry itself, never what a link would name.
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let me = nix::unistd::geteuid().as_raw();
    let path: PathBuf = path.to_owned();
    tracing::info!(socket = %path.display(), "admin socket ready");
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of file descriptors: wait instead of spinning on the error.
                    tracing::debug!("admin socket: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let uid = stream.peer_cred().map(|c| c.uid()).unwrap_or(u32::MAX);
            if uid != 0 && uid != me {
                tracing::warn!(
                    uid,
                    "admin socket: refused a client that is neither root nor the daemon's user"
                );
                continue;
            }
            let (daemon, reload) = (daemon.clone(), reload.clone());
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let answer = match read_command(r).await {
                    Ok(line) => answer(&line, &daemon, &reload).await,
                    Err(Some(e)) => e,
                    Err(None) => return,
                };
                let _ = tokio::time::timeout(
                    ADMIN_TIMEOUT,
                    w.write_all(format!("{answer}\n").as_bytes()),
                )
                .await;
            });
        }
    });
    Ok(())
}

/// The command line, read within [`ADMIN_TIMEOUT`] and at most [`ADMIN_MAX_LINE`]
/// bytes. `Err(Some(text))`: answer this error; `Err(None)`: the client went away.
async fn read_command(r: tokio::net::unix::OwnedReadHalf) -> Result<String, Option<String>> {
    let mut line = Vec::new();
    let mut reader = BufReader::new(r.take(ADMIN_MAX_LINE as u64 + 1));
    match tokio::time::timeout(ADMIN_TIMEOUT, reader.read_until(b'\n', &mut line)).await {
        Err(_) => {
            return Err(Some(format!(
                "error no command within {}s",
                ADMIN_TIMEOUT.as_secs()
            )));
        }
        Ok(Err(_)) | Ok(Ok(0)) => return Err(None),
        Ok(Ok(_)) => {}
    }
    if line.len() > ADMIN_MAX_LINE {
        return Err(Some(format!(
            "error command longer than {ADMIN_MAX_LINE} bytes"
        )));
    }
    Ok(String::from_utf8_lossy(&line).trim().to_owned())
}

async fn answer(line: &str, daemon: &Daemon, reload: &mpsc::Sender<ReloadRequest>) -> String {
    match line {
        "status" => status(daemon),
        "reload" => {
            let (tx, rx) = oneshot::channel();
            if reload.send(tx).await.is_err() {
                "error the daemon is stopping".to_owned()
            } else {
                match rx.await {
                    Ok(Ok(note)) => format!("ok configuration reloaded{note}"),
                    Ok(Err(e)) => format!("error {}", e.replace('\n', " ")),
                    Err(_) => "error the reload was abandoned".to_owned(),
                }
            }
        }
        other => format!("error unknown command {other:?} (status, reload)"),
    }
}

/// Listeners, modules with their counters and latency, uptime.
pub fn status(d: &Daemon) -> String {
    let listeners: Vec<serde_json::Value> = d
        .listener_stats()
        .into_iter()
        .map(|l| {
            serde_json::json!({"name": l.name, "address": l.bound, "modules": l.chain, "connections": l.open})
        })
        .collect();
    let modules: Vec<serde_json::Value> = d
        .modules()
        .iter()
        .map(|m| {
            let s = &m.stats;
            let calls = s.calls.load(Ordering::Relaxed);
            let min = s.min_us.load(Ordering::Relaxed);
            serde_json::json!({
                "name": m.name(),
                "version": m.handler().version(),
                "quarantined": m.is_quarantined(),
                "disabled": m.disabled(),
                "calls": calls,
                "answers": s.answers.load(Ordering::Relaxed),
                "failures": s.failures.load(Ordering::Relaxed),
                "timeouts": s.timeouts.load(Ordering::Relaxed),
                "unavailable": s.unavailable.load(Ordering::Relaxed),
                "latency_us": {
                    "min": if min == u64::MAX { 0 } else { min },
                    "avg": s.total_us.load(Ordering::Relaxed).checked_div(calls).unwrap_or(0),
                    "max": s.max_us.load(Ordering::Relaxed),
                },
            })
        })
        .collect();
    serde_json::json!({
        "pid": std::process::id(),
        "master_pid": crate::supervisor::worker::link().map(|_| nix::unistd::getppid().as_raw()),
        "worker_restarts": crate::supervisor::worker::link().map_or(0, |l| l.restarts),
        "uptime_s": d.uptime().as_secs(),
        "listeners": listeners,
        "modules": modules,
    })
    .to_string()
}
