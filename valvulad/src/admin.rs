//! The admin socket: a unix socket where `valvula-ctl` asks for `status` or a `reload`.
//!
//! Only root and the daemon's own user are served (checked with the peer's credentials,
//! on top of the socket file's 0600 mode). One command per connection, one line each
//! way; status is JSON.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};

use crate::server::Daemon;

/// A reload asked for over the socket; the main loop answers with the outcome.
pub type ReloadRequest = oneshot::Sender<Result<(), String>>;

/// Binds the socket (replacing a stale one) and serves it until the daemon stops.
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
    if std::fs::symlink_metadata(path).is_ok() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is in use by another valvulad", path.display()),
            ));
        }
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
            let Ok((stream, _)) = listener.accept().await else {
                continue;
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
                let mut line = String::new();
                if BufReader::new(r).read_line(&mut line).await.is_err() {
                    return;
                }
                let answer = match line.trim() {
                    "status" => status(&daemon),
                    "reload" => {
                        let (tx, rx) = oneshot::channel();
                        if reload.send(tx).await.is_err() {
                            "error the daemon is stopping".to_owned()
                        } else {
                            match rx.await {
                                Ok(Ok(())) => "ok configuration reloaded".to_owned(),
                                Ok(Err(e)) => format!("error {}", e.replace('\n', " ")),
                                Err(_) => "error the reload was abandoned".to_owned(),
                            }
                        }
                    }
                    other => format!("error unknown command {other:?} (status, reload)"),
                };
                let _ = w.write_all(format!("{answer}\n").as_bytes()).await;
            });
        }
    });
    Ok(())
}

/// Listeners, modules with their counters and latency, uptime.
pub fn status(d: &Daemon) -> String {
    let listeners: Vec<serde_json::Value> = d
        .listeners()
        .into_iter()
        .map(|(name, address, chain, connections)| {
            serde_json::json!({"name": name, "address": address, "modules": chain, "connections": connections})
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
                "calls": calls,
                "answers": s.answers.load(Ordering::Relaxed),
                "failures": s.failures.load(Ordering::Relaxed),
                "timeouts": s.timeouts.load(Ordering::Relaxed),
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
        "uptime_s": d.uptime().as_secs(),
        "listeners": listeners,
        "modules": modules,
    })
    .to_string()
}

/// Serves `GET /metrics` (Prometheus text format) on `addr`; anything else is a 404.
pub async fn spawn_metrics(addr: std::net::SocketAddr, daemon: Daemon) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(address = %listener.local_addr()?, "metrics listener ready");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let daemon = daemon.clone();
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut line = String::new();
                let mut reader = BufReader::new(r);
                if tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    reader.read_line(&mut line),
                )
                .await
                .is_err()
                {
                    return;
                }
                // Drain the headers so the client sees a clean response.
                let mut h = String::new();
                while let Ok(Ok(n)) = tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    reader.read_line(&mut h),
                )
                .await
                {
                    if n == 0 || h == "\r\n" || h == "\n" {
                        break;
                    }
                    h.clear();
                }
                let (status, body) =
                    if line.starts_with("GET /metrics ") || line.starts_with("GET /metrics?") {
                        ("200 OK", daemon.metrics())
                    } else {
                        ("404 Not Found", "only /metrics is served here\n".to_owned())
                    };
                let resp = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = w.write_all(resp.as_bytes()).await;
            });
        }
    });
    Ok(())
}
