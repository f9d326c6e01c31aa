//! `/metrics`: the listeners' and modules' counters in the Prometheus text format,
//! served by hyper with bounds a scraper never meets and an attacker cannot get past.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONNECTION, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::Semaphore;

use crate::server::{Daemon, ListenerStats};

/// The Prometheus text exposition of the listeners' and modules' counters.
pub fn render(d: &Daemon) -> String {
    let mut o = String::new();
    let mut listeners = d.listener_stats();
    listeners.sort_by(|a, b| a.bound.cmp(&b.bound));
    let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    o.push_str("# HELP valvulad_requests_total Policy requests answered, by listener and action (disconnect: closed without a reply).\n# TYPE valvulad_requests_total counter\n");
    for l in &listeners {
        let name = esc(&l.name);
        for (action, n) in &l.answers {
            let _ = writeln!(
                o,
                "valvulad_requests_total{{listener=\"{name}\",action=\"{action}\"}} {n}"
            );
        }
    }
    // (metric, help, type, extra label, value) for the per-listener series.
    type Series = (
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        fn(&ListenerStats) -> u64,
    );
    let series: [Series; 6] = [
        (
            "valvulad_connections_refused_total",
            "Connections refused, by listener and reason.",
            "counter",
            ",reason=\"cap\"",
            |l| l.refused_cap,
        ),
        (
            "valvulad_connections_refused_total",
            "",
            "",
            ",reason=\"network\"",
            |l| l.refused_network,
        ),
        (
            "valvulad_connections_evicted_total",
            "Connections closed to make room for a new one at the connection cap or when out of file descriptors (the longest idle, else the oldest stalled request).",
            "counter",
            "",
            |l| l.evicted,
        ),
        (
            "valvulad_malformed_requests_total",
            "Connections closed for a malformed or oversized request.",
            "counter",
            "",
            |l| l.malformed,
        ),
        (
            "valvulad_connections",
            "Open connections, by listener.",
            "gauge",
            "",
            |l| l.open as u64,
        ),
        (
            "valvulad_connections_idle",
            "Open connections waiting between requests, by listener (the first to give way at the connection cap).",
            "gauge",
            "",
            |l| l.idle as u64,
        ),
    ];
    for (metric, help, kind, label, value) in series {
        if !help.is_empty() {
            let _ = writeln!(o, "# HELP {metric} {help}\n# TYPE {metric} {kind}");
        }
        for l in &listeners {
            let name = esc(&l.name);
            let _ = writeln!(o, "{metric}{{listener=\"{name}\"{label}}} {}", value(l));
        }
    }
    let modules: Vec<_> = d.modules().iter().cloned().collect();
    for (metric, help, get) in [
        (
            "valvulad_module_calls_total",
            "Requests given to a module.",
            0usize,
        ),
        (
            "valvulad_module_answers_total",
            "Requests a module answered (not DUNNO).",
            1,
        ),
        (
            "valvulad_module_failures_total",
            "Module errors, panics, invalid replies and timeouts.",
            2,
        ),
        (
            "valvulad_module_timeouts_total",
            "Module calls that ran past the module timeout.",
            3,
        ),
        (
            "valvulad_module_unavailable_total",
            "Module calls that failed because the database was unavailable (never quarantined).",
            4,
        ),
    ] {
        let _ = writeln!(o, "# HELP {metric} {help}\n# TYPE {metric} counter");
        for m in &modules {
            let s = &m.stats;
            let v = [
                &s.calls,
                &s.answers,
                &s.failures,
                &s.timeouts,
                &s.unavailable,
            ][get]
                .load(Ordering::Relaxed);
            let _ = writeln!(o, "{metric}{{module=\"{}\"}} {v}", esc(m.name()));
        }
    }
    o.push_str("# HELP valvulad_module_quarantined 1 while a module is quarantined.\n# TYPE valvulad_module_quarantined gauge\n");
    for m in &modules {
        let _ = writeln!(
            o,
            "valvulad_module_quarantined{{module=\"{}\"}} {}",
            esc(m.name()),
            u8::from(m.is_quarantined())
        );
    }
    o.push_str("# HELP valvulad_module_disabled 1 while a module is disabled for crashing the worker (until the next reload).\n# TYPE valvulad_module_disabled gauge\n");
    for m in &modules {
        let _ = writeln!(
            o,
            "valvulad_module_disabled{{module=\"{}\"}} {}",
            esc(m.name()),
            u8::from(m.disabled().is_some())
        );
    }
    let restarts = crate::supervisor::worker::link().map_or(0, |l| l.restarts);
    let _ = writeln!(
        o,
        "# HELP valvulad_worker_restarts_total Workers the master started after one died.\n# TYPE valvulad_worker_restarts_total counter\nvalvulad_worker_restarts_total {restarts}"
    );
    o.push_str("# HELP valvulad_module_latency_seconds Time a module took per request.\n# TYPE valvulad_module_latency_seconds histogram\n");
    for m in &modules {
        let s = &m.stats;
        let name = esc(m.name());
        let mut cumulative = 0;
        for (i, bound) in crate::dispatch::LATENCY_BUCKETS_US.iter().enumerate() {
            cumulative += s.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(
                o,
                "valvulad_module_latency_seconds_bucket{{module=\"{name}\",le=\"{}\"}} {cumulative}",
                *bound as f64 / 1e6
            );
        }
        let calls = s.calls.load(Ordering::Relaxed);
        let _ = writeln!(
            o,
            "valvulad_module_latency_seconds_bucket{{module=\"{name}\",le=\"+Inf\"}} {calls}"
        );
        let _ = writeln!(
            o,
            "valvulad_module_latency_seconds_sum{{module=\"{name}\"}} {}",
            s.total_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(
            o,
            "valvulad_module_latency_seconds_count{{module=\"{name}\"}} {calls}"
        );
    }
    let _ = writeln!(
        o,
        "# HELP valvulad_uptime_seconds Seconds since the worker started (a new one after a crash).\n# TYPE valvulad_uptime_seconds gauge\nvalvulad_uptime_seconds {}",
        d.uptime().as_secs()
    );
    o
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
        ("/metrics", &Method::GET | &Method::HEAD) => (StatusCode::OK, render(daemon)),
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
