//! The admin socket: a unix socket where `valvula-ctl` asks for `status` or a `reload`.
//!
//! Only root and the daemon's own user are served (checked with the peer's credentials,
//! on top of the socket file's 0600 mode). One command per connection, one line each
//! way; status is JSON.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONNECTION, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::server::Daemon;

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
        "uptime_s": d.uptime().as_secs(),
        "listeners": listeners,
        "modules": modules,
    })
    .to_string()
}

/// Bounds of the `/metrics` listener. A scraper sends one small GET every few seconds;
/// whatever needs more than this is not a scraper, and must not cost the daemon memory
/// or tasks (a hand-written reader once buffered an endless request line: 2.7 GB in 5 s).
mod metrics_limits {
    use std::time::Duration;
    /// Connections served at once; more are closed as soon as they are accepted.
    pub const CONNECTIONS: usize = 64;
    /// Time to send a request's head (request line and headers). hyper starts it when it
    /// waits for a head, so it also closes a keep-alive connection idle this long.
    pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
    /// Request line plus headers, in bytes; over it the answer is 431.
    pub const HEADER_BYTES: usize = 8 * 1024;
    pub const HEADERS: usize = 32;
    /// hyper's read buffer (its minimum, 8 KiB, would do for the head alone).
    pub const BUFFER_BYTES: usize = 16 * 1024;
    /// After this a connection is asked to close once its current answer is out ...
    pub const LIFETIME: Duration = Duration::from_secs(30);
    /// ... and is cut this much later if its client does not take the answer.
    pub const CLOSE_GRACE: Duration = Duration::from_secs(5);
    /// Requests on one keep-alive connection; the last answer says `Connection: close`.
    pub const REQUESTS: u32 = 100;
}

/// Serves `GET /metrics` (and `HEAD`) in the Prometheus text format on `addr`, through
/// hyper with the bounds of [`metrics_limits`]; other paths are 404, other methods 405.
pub async fn spawn_metrics(addr: std::net::SocketAddr, daemon: Daemon) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(address = %listener.local_addr()?, "metrics listener ready");
    let slots = Arc::new(Semaphore::new(metrics_limits::CONNECTIONS));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(metrics_limits::HEADER_TIMEOUT)
        .max_header_size(metrics_limits::HEADER_BYTES)
        .max_headers(metrics_limits::HEADERS)
        .max_buf_size(metrics_limits::BUFFER_BYTES)
        .keep_alive(true);
    tokio::spawn(async move {
        let mut last_refusal_log: Option<Instant> = None;
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors: wait instead of spinning on the error.
                    tracing::debug!("metrics listener: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                if last_refusal_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    last_refusal_log = Some(Instant::now());
                    tracing::warn!(client = %peer, limit = metrics_limits::CONNECTIONS, "metrics listener: connection refused, too many open");
                }
                continue;
            };
            let (http, daemon) = (http.clone(), daemon.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let served = Arc::new(AtomicU32::new(0));
                let svc = hyper::service::service_fn(move |req| {
                    let n = served.fetch_add(1, Ordering::Relaxed) + 1;
                    let resp = metrics_response(&req, &daemon, n >= metrics_limits::REQUESTS);
                    async move { Ok::<_, Infallible>(resp) }
                });
                let conn = http.serve_connection(TokioIo::new(stream), svc);
                tokio::pin!(conn);
                let done = tokio::select! {
                    r = conn.as_mut() => Some(r),
                    _ = tokio::time::sleep(metrics_limits::LIFETIME) => None,
                };
                let result = match done {
                    Some(r) => r,
                    None => {
                        conn.as_mut().graceful_shutdown();
                        match tokio::time::timeout(metrics_limits::CLOSE_GRACE, conn).await {
                            Ok(r) => r,
                            Err(_) => {
                                tracing::debug!(client = %peer, "metrics listener: connection cut at its lifetime");
                                return;
                            }
                        }
                    }
                };
                if let Err(e) = result {
                    tracing::debug!(client = %peer, "metrics listener: {e}");
                }
            });
        }
    });
    Ok(())
}

fn metrics_response(req: &Request<Incoming>, daemon: &Daemon, last: bool) -> Response<Full<Bytes>> {
    let (status, body) = match (req.uri().path(), req.method()) {
        ("/metrics", &Method::GET | &Method::HEAD) => (StatusCode::OK, daemon.metrics()),
        ("/metrics", _) => (
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET and HEAD are served here\n".to_owned(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "only /metrics is served here\n".to_owned(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    if status == StatusCode::METHOD_NOT_ALLOWED {
        h.insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
    }
    if last {
        h.insert(CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}
