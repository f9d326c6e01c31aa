//! Sockets, framing and the per-listener chain.
//!
//! One task per connection: a slow or silent client costs only its own task and is cut
//! off by the idle or request timeout (valvula's single reader thread froze on one).
//! Requests on a connection are handled one after the other, so replies always leave in
//! the order the requests came.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use valvula_policy::{Action, CHECKSERVER_REPLY, Decoder, Frame, Reply, Request};

use crate::dispatch::Dispatcher;
use crate::host::ModuleSet;
use valvula_config::{Config, LimitsConfig, ListenAddr, ListenerConfig, OnError};
use valvula_store::RateLog;

mod connections;
use connections::{Admission, Connections, Phase, Slot};

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
    fn on_error_reply(&self) -> Option<Reply> {
        let text = self.config.on_error_text.clone();
        match self.config.on_error {
            OnError::Dunno => Some(Reply::dunno()),
            OnError::Defer => Reply::new(Action::Defer, text).ok(),
            OnError::Reject => Reply::new(Action::Reject, text).ok(),
            OnError::Disconnect => None,
        }
    }
}

/// State a listener's connections share across reloads.
struct ListenerShared {
    runtime: ArcSwap<ListenerRuntime>,
    /// Open connections, and which one gives way to a new one at the cap.
    conns: Connections,
    /// Refusals, evictions and accept errors are logged at most once a second each, so a
    /// flood cannot flood the log.
    refusal_log: RateLog,
    network_log: RateLog,
    evict_log: RateLog,
    accept_error_log: RateLog,
    /// Connections closed for malformed requests, logged at most once a second.
    malformed_log: RateLog,
    /// Connections refused at the cap.
    refused: AtomicU64,
    /// Connections refused because the client is outside the allowed networks.
    refused_network: AtomicU64,
    /// Connections closed for a malformed or oversized request.
    malformed: AtomicU64,
    /// Answers by action (`Action::ALL` order), then closes without a reply (on-error
    /// disconnect) in the last slot.
    answers: [AtomicU64; 16],
}

struct RunningListener {
    address: ListenAddr,
    shared: Arc<ListenerShared>,
    stop: CancellationToken,
    bound: String,
    unix_path: Option<PathBuf>,
}

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

fn runtime_for(l: &ListenerConfig, config: &Config, modules: &ModuleSet) -> ListenerRuntime {
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

enum Bound {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

async fn bind(l: &ListenerConfig) -> Result<(Bound, String), ServerError> {
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
        d.spawn_ticks();
        Ok(d)
    }

    /// The listeners' names and the addresses they are bound to (a `:0` port resolved).
    pub fn bound(&self) -> Vec<(String, String)> {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = st
            .listeners
            .values()
            .map(|l| (l.shared.runtime.load().config.name.clone(), l.bound.clone()))
            .collect();
        v.sort();
        v
    }

    /// Each listener: name, bound address, chain, open connections.
    pub fn listeners(&self) -> Vec<(String, String, Vec<String>, usize)> {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = st
            .listeners
            .values()
            .map(|l| {
                let rt = l.shared.runtime.load();
                (
                    rt.config.name.clone(),
                    l.bound.clone(),
                    rt.config.modules.clone(),
                    l.shared.conns.open(),
                )
            })
            .collect();
        v.sort();
        v
    }

    /// Prometheus text exposition of the listeners' and modules' counters.
    pub fn metrics(&self) -> String {
        let mut o = String::new();
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut listeners: Vec<_> = st.listeners.values().collect();
        listeners.sort_by_key(|l| l.bound.clone());
        let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
        o.push_str("# HELP valvulad_requests_total Policy requests answered, by listener and action (disconnect: closed without a reply).\n# TYPE valvulad_requests_total counter\n");
        for l in &listeners {
            let name = esc(&l.shared.runtime.load().config.name);
            for (i, c) in l.shared.answers.iter().enumerate() {
                let action = Action::ALL.get(i).map_or("disconnect", |a| a.verb());
                let _ = writeln!(
                    o,
                    "valvulad_requests_total{{listener=\"{name}\",action=\"{action}\"}} {}",
                    c.load(Ordering::Relaxed)
                );
            }
        }
        // (metric, help, type, extra label, value) for the per-listener series.
        type Series = (
            &'static str,
            &'static str,
            &'static str,
            &'static str,
            fn(&ListenerShared) -> u64,
        );
        let series: [Series; 6] = [
            (
                "valvulad_connections_refused_total",
                "Connections refused, by listener and reason.",
                "counter",
                ",reason=\"cap\"",
                |l| l.refused.load(Ordering::Relaxed),
            ),
            (
                "valvulad_connections_refused_total",
                "",
                "",
                ",reason=\"network\"",
                |l| l.refused_network.load(Ordering::Relaxed),
            ),
            (
                "valvulad_connections_evicted_total",
                "Connections closed to make room for a new one at the connection cap or when out of file descriptors (the longest idle, else the oldest stalled request).",
                "counter",
                "",
                |l| l.conns.evicted(),
            ),
            (
                "valvulad_malformed_requests_total",
                "Connections closed for a malformed or oversized request.",
                "counter",
                "",
                |l| l.malformed.load(Ordering::Relaxed),
            ),
            (
                "valvulad_connections",
                "Open connections, by listener.",
                "gauge",
                "",
                |l| l.conns.open() as u64,
            ),
            (
                "valvulad_connections_idle",
                "Open connections waiting between requests, by listener (the first to give way at the connection cap).",
                "gauge",
                "",
                |l| l.conns.idle() as u64,
            ),
        ];
        for (metric, help, kind, label, value) in series {
            if !help.is_empty() {
                let _ = writeln!(o, "# HELP {metric} {help}\n# TYPE {metric} {kind}");
            }
            for l in &listeners {
                let name = esc(&l.shared.runtime.load().config.name);
                let _ = writeln!(
                    o,
                    "{metric}{{listener=\"{name}\"{label}}} {}",
                    value(&l.shared)
                );
            }
        }
        let modules: Vec<_> = st.modules.iter().cloned().collect();
        drop(st);
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
            "# HELP valvulad_uptime_seconds Seconds since the daemon started.\n# TYPE valvulad_uptime_seconds gauge\nvalvulad_uptime_seconds {}",
            self.started.elapsed().as_secs()
        );
        o
    }

    pub fn config(&self) -> Arc<Config> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .config
            .clone()
    }

    pub fn modules(&self) -> ModuleSet {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .modules
            .clone()
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Switches to a new configuration: new listeners are bound first (if one fails,
    /// nothing changes), kept listeners get the new chain for their next request,
    /// removed ones stop accepting while their open connections finish.
    pub async fn apply(&self, config: Config, modules: ModuleSet) -> Result<(), ServerError> {
        let kept = |st: &State, l: &ListenerConfig| {
            st.listeners
                .get(&l.name)
                .is_some_and(|r| r.address == l.address)
        };
        let to_bind: Vec<ListenerConfig> = {
            let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            config
                .listeners
                .iter()
                .filter(|l| !kept(&st, l))
                .cloned()
                .collect()
        };
        let mut fresh = Vec::new();
        for l in to_bind {
            let b = bind(&l).await?;
            fresh.push((l, b));
        }
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
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
            let shared = Arc::new(ListenerShared {
                runtime: ArcSwap::from_pointee(runtime_for(&l, &config, &modules)),
                conns: Connections::default(),
                refusal_log: RateLog::default(),
                network_log: RateLog::default(),
                evict_log: RateLog::default(),
                accept_error_log: RateLog::default(),
                malformed_log: RateLog::default(),
                refused: AtomicU64::new(0),
                refused_network: AtomicU64::new(0),
                malformed: AtomicU64::new(0),
                answers: Default::default(),
            });
            let stop = CancellationToken::new();
            tracing::info!(listener = %l.name, address = %addr, chain = ?l.modules, "listening");
            let unix_path = match &bound {
                Bound::Unix(_, p) => Some(p.clone()),
                Bound::Tcp(_) => None,
            };
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
                },
            );
        }
        st.config = Arc::new(config);
        st.modules = modules;
        Ok(())
    }

    /// Stops accepting, lets in-flight requests finish (at most `grace`), closes modules.
    pub async fn shutdown(self, grace: Duration) {
        tracing::info!("shutting down: no new connections; finishing requests in flight");
        self.shutdown.cancel();
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(grace = ?grace, "requests still running after the grace period; stopping anyway");
        }
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        for l in st.listeners.values() {
            if let Some(p) = &l.unix_path {
                let _ = std::fs::remove_file(p);
            }
        }
        for m in st.modules.iter() {
            m.close();
        }
    }

    /// Calls every module's tick hook at each minute boundary of the host clock.
    fn spawn_ticks(&self) {
        let state = self.state.clone();
        let stop = self.shutdown.clone();
        let clock = state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .modules
            .clock
            .clone();
        tokio::spawn(async move {
            let mut last = clock.now();
            loop {
                let now = clock.now();
                let wait = 60 - now.rem_euclid(60);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(wait as u64)) => {}
                }
                let now = clock.now();
                run_ticks(&state, last, now).await;
                last = now;
            }
        });
    }

    /// Delivers the ticks for a clock move from `before` to `after` now, as the minute
    /// loop does; for tests that inject time instead of waiting for it.
    pub async fn tick_between(&self, before: i64, after: i64) {
        run_ticks(&self.state, before, after).await;
    }
}

async fn run_ticks(state: &Mutex<State>, before: i64, after: i64) {
    let zone = state
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .config
        .storage
        .zone;
    let kinds = tick_kinds(zone, before, after);
    if kinds == 0 {
        return;
    }
    let mods: Vec<_> = {
        let st = state.lock().unwrap_or_else(|e| e.into_inner());
        st.modules.iter().cloned().collect()
    };
    for m in mods {
        m.tick(kinds, after).await;
    }
}

/// The `VLV_TICK_*` boundaries crossed between two host times, in the zone of calendar
/// windows (`[storage] time_zone`), so modules see a day end when the counters do.
pub fn tick_kinds(zone: valvula_store::Zone, before: i64, after: i64) -> u32 {
    use valvula_store::window::Period;
    let mut k = 0;
    if before.div_euclid(60) != after.div_euclid(60) {
        k |= valvula_abi::VLV_TICK_MINUTE;
    }
    for (period, bit) in [
        (Period::Hour, valvula_abi::VLV_TICK_HOUR),
        (Period::Day, valvula_abi::VLV_TICK_DAY),
        (Period::Month, valvula_abi::VLV_TICK_MONTH),
    ] {
        if zone.period(period, before).0 != zone.period(period, after).0 {
            k |= bit;
        }
    }
    k
}

async fn accept_loop(
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

/// Serves one connection until the client closes, a limit or timeout is hit, or the
/// daemon stops (between requests).
async fn serve<S>(
    mut stream: S,
    peer: &str,
    shared: &ListenerShared,
    shutdown: &CancellationToken,
    slot: &mut Slot,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let limits = shared.runtime.load().limits.clone();
    let mut decoder = Decoder::new(limits.codec);
    let mut buf = BytesMut::with_capacity(4096);
    let mut out = Vec::with_capacity(256);
    let mut request_deadline: Option<tokio::time::Instant> = None;
    loop {
        let decoded = decoder.decode(&mut buf);
        if matches!(decoded, Ok(Some(_))) {
            // The next request gets its own request_timeout.
            request_deadline = None;
        }
        match decoded {
            Err(e) => {
                let rt = shared.runtime.load();
                shared.malformed.fetch_add(1, Ordering::Relaxed);
                if let Some(more) = shared.malformed_log.allow() {
                    tracing::warn!(listener = %rt.config.name, client = %peer, closed_since_last_line = more, "closing connection without a reply: {e}");
                }
                return;
            }
            Ok(Some(Frame::CheckServer)) => {
                if !shared.conns.enter(slot, Phase::Busy) {
                    return;
                }
                let _ = stream.write_all(CHECKSERVER_REPLY).await;
                let _ = stream.shutdown().await;
                return;
            }
            Ok(Some(Frame::Request(req))) => {
                // From here on the connection is never evicted; if it already was (it
                // was idle or stalled when a new connection took its place), the request
                // is dropped unanswered and Postfix sends it again on a new connection.
                if !shared.conns.enter(slot, Phase::Busy) {
                    tracing::debug!(client = %peer, "connection evicted before its request was processed");
                    return;
                }
                let rt = shared.runtime.load_full();
                let Some(reply) = run_chain(&rt, req).await else {
                    shared.answers[15].fetch_add(1, Ordering::Relaxed);
                    return;
                };
                let kind = Action::ALL
                    .iter()
                    .position(|a| *a == reply.action())
                    .unwrap_or(15);
                shared.answers[kind].fetch_add(1, Ordering::Relaxed);
                out.clear();
                reply.encode(&mut out);
                match tokio::time::timeout(limits.request_timeout, stream.write_all(&out)).await {
                    Ok(Ok(())) => continue,
                    Ok(Err(e)) => {
                        tracing::info!(listener = %rt.config.name, client = %peer, "client went away before the reply: {e}");
                        return;
                    }
                    Err(_) => {
                        tracing::warn!(listener = %rt.config.name, client = %peer, "client does not read its replies; closing");
                        return;
                    }
                }
            }
            Ok(None) => {}
        }
        let partial = decoder.in_progress(&buf);
        if !shared
            .conns
            .enter(slot, if partial { Phase::Partial } else { Phase::Idle })
        {
            return;
        }
        // A request must be complete within request_timeout of its first byte, however
        // it trickles in: a timeout per read would let one byte every few seconds hold
        // the connection for ever (slowloris).
        let deadline = if partial {
            *request_deadline
                .get_or_insert_with(|| tokio::time::Instant::now() + limits.request_timeout)
        } else {
            request_deadline = None;
            tokio::time::Instant::now() + limits.idle_timeout
        };
        let wait = if partial {
            limits.request_timeout
        } else {
            limits.idle_timeout
        };
        let read = tokio::select! {
            biased;
            _ = shutdown.cancelled(), if !partial => return,
            _ = slot.evicted().cancelled() => {
                tracing::debug!(client = %peer, partial, "connection closed to make room for a new one");
                return;
            }
            r = tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)) => r,
        };
        match read {
            Ok(Ok(0)) => {
                if partial {
                    let rt = shared.runtime.load();
                    tracing::warn!(listener = %rt.config.name, client = %peer, "connection closed in the middle of a request; request dropped");
                }
                return;
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::debug!(client = %peer, "read failed: {e}");
                return;
            }
            Err(_) => {
                let rt = shared.runtime.load();
                if partial {
                    tracing::warn!(listener = %rt.config.name, client = %peer, timeout = ?wait, "request not completed in time; closing without a reply");
                } else {
                    tracing::debug!(listener = %rt.config.name, client = %peer, "idle connection closed");
                }
                return;
            }
        }
    }
}

/// Runs the chain: the first answer that is not DUNNO wins. `None`: close the
/// connection without a reply (on-error = disconnect).
async fn run_chain(rt: &ListenerRuntime, req: Request) -> Option<Reply> {
    let started = Instant::now();
    let req = Arc::new(req);
    let mut decided: (Option<Reply>, &str) = (Some(Reply::dunno()), "");
    for m in &rt.chain {
        match m.call(&req).await {
            Ok(None) => continue,
            Ok(Some(r)) => {
                decided = (Some(r), m.name());
                break;
            }
            Err(e) => {
                // Once a second per module at most: an outage fails every request.
                if let Some(more) = m.failure_log.allow() {
                    tracing::error!(
                        listener = %rt.config.name,
                        module = m.name(),
                        queue_id = req.get("queue_id").unwrap_or(""),
                        failed_since_last_line = more,
                        "module failed, answering the listener's on-error action: {e}"
                    );
                }
                decided = (rt.on_error_reply(), m.name());
                break;
            }
        }
    }
    let (reply, module) = decided;
    if rt.valvula_lines {
        let port = match &rt.config.address {
            ListenAddr::Tcp(a) => a.port(),
            ListenAddr::Unix(_) => 0,
        };
        tracing::info!("{}", valvula_line(&req, reply.as_ref(), port));
        return reply;
    }
    tracing::info!(
        listener = %rt.config.name,
        module,
        queue_id = req.get("queue_id").unwrap_or(""),
        sasl_username = req.get("sasl_username").unwrap_or(""),
        sender = req.get("sender").unwrap_or(""),
        client = req.get("client_address").unwrap_or(""),
        action = reply.as_ref().map_or("disconnect", |r| r.action().verb()),
        text = reply.as_ref().map_or("", |r| r.text()),
        us = started.elapsed().as_micros() as u64,
        "decision"
    );
    reply
}

/// A decision as valvula logs it: `REJECT: s -> r (sasl_user=u), port P, queue-id Q,
/// from IP: text` for refusals (valvulad_reject's line), and the final-state line for
/// the rest (without valvula's local-delivery lookup, which needed a database query
/// per request).
pub fn valvula_line(req: &Request, reply: Option<&Reply>, port: u16) -> String {
    let g = |k: &str| req.get(k).unwrap_or("");
    let state = reply.map_or("DISCONNECT".to_owned(), |r| match r.action() {
        Action::Raw => r.text().split(' ').next().unwrap_or("").to_owned(),
        a => a.verb().to_ascii_uppercase(),
    });
    let sasl = match (req.get("sasl_method"), req.get("sasl_username")) {
        (Some(_), Some(u)) => format!(" (sasl_user={u})"),
        _ => String::new(),
    };
    let mut line = format!(
        "{state}: {} -> {}{sasl}, port {port}",
        g("sender"),
        g("recipient")
    );
    let text = reply.map_or("", |r| {
        if r.action() == Action::Raw {
            ""
        } else {
            r.text()
        }
    });
    let queue = req.get_nonempty("queue_id");
    let refusal = matches!(
        reply.map(|r| r.action()),
        Some(
            Action::Reject
                | Action::Defer
                | Action::DeferIfPermit
                | Action::DeferIfReject
                | Action::Discard
                | Action::Hold
                | Action::Raw
        )
    );
    if refusal {
        let _ = write!(
            line,
            ", queue-id {}, from {}: {}",
            queue.unwrap_or("<undef>"),
            g("client_address"),
            reply.map_or("", |r| r.text())
        );
        return line;
    }
    let _ = write!(
        line,
        ", rcpt count={}, ",
        req.get("recipient_count").unwrap_or("0")
    );
    match queue {
        Some(q) => {
            let _ = write!(line, "queue-id {q}");
        }
        None => line.push_str("still-msg-not-queued "),
    }
    if let Some(ip) = req.get("client_address") {
        let _ = write!(line, ", from {ip}");
    }
    match req.get_nonempty("encryption_protocol") {
        Some(p) => {
            let _ = write!(line, ", tls={p}");
        }
        None => line.push_str(", no-tls"),
    }
    if let Some(c) = req.get_nonempty("encryption_cipher") {
        let _ = write!(line, ", cipher={c}");
    }
    if let Some(k) = req.get("encryption_keysize").filter(|k| k.len() > 1) {
        let _ = write!(line, ", keysize={k}");
    }
    if queue.is_some() {
        match reply.map(|r| r.action()) {
            Some(Action::Filter) => {
                let _ = write!(line, ", transport-changed-to={text}");
            }
            _ => line.push_str(", transport=default"),
        }
    }
    if !text.is_empty() {
        let _ = write!(line, ": {text}");
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valvula_log_lines() {
        let req = Request::from_pairs([
            ("sender", "francis@aspl.es"),
            ("recipient", "francis@aspl.es"),
            ("sasl_method", "PLAIN"),
            ("sasl_username", ""),
            ("recipient_count", "1"),
            ("queue_id", "ABC123"),
            ("client_address", "127.0.0.9"),
            ("encryption_keysize", "0"),
        ]);
        // The example valvula's documentation shows [run].
        assert_eq!(
            valvula_line(&req, Some(&Reply::dunno()), 14581),
            "DUNNO: francis@aspl.es -> francis@aspl.es (sasl_user=), port 14581, rcpt count=1, queue-id ABC123, from 127.0.0.9, no-tls, transport=default"
        );
        let rej = Reply::new(
            Action::Reject,
            "Rejecting operation because day limit reached (4)",
        )
        .unwrap();
        assert_eq!(
            valvula_line(&req, Some(&rej), 3579),
            "REJECT: francis@aspl.es -> francis@aspl.es (sasl_user=), port 3579, queue-id ABC123, from 127.0.0.9: Rejecting operation because day limit reached (4)"
        );
        let f = Reply::new(Action::Filter, "transport11:").unwrap();
        assert!(
            valvula_line(&req, Some(&f), 1)
                .ends_with(", transport-changed-to=transport11:: transport11:")
        );
    }

    #[test]
    fn tick_boundaries() {
        let t = 1_700_000_000 - 1_700_000_000 % 86_400; // a UTC midnight
        // In any time zone, one second across a minute boundary is a minute tick.
        let utc = valvula_store::Zone::UTC;
        assert_ne!(
            tick_kinds(utc, t + 59, t + 60) & valvula_abi::VLV_TICK_MINUTE,
            0
        );
        assert_eq!(tick_kinds(utc, t + 10, t + 20), 0);
        // 40 days apart: a new month whatever the zone.
        let k = tick_kinds(utc, t, t + 40 * 86_400);
        assert_eq!(k, 0xF);
        // A UTC midnight is no day boundary in Tokyo (09:00 there).
        let tokyo = valvula_store::Zone::parse("Asia/Tokyo").unwrap();
        assert_eq!(tick_kinds(tokyo, t - 1, t) & valvula_abi::VLV_TICK_DAY, 0);
        assert_ne!(tick_kinds(utc, t - 1, t) & valvula_abi::VLV_TICK_DAY, 0);
    }
}
