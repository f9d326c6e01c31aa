//! Calling one module safely: a bounded share of the blocking pool (or inline for
//! NONBLOCKING modules), a timeout, panic containment and quarantine.
//!
//! The server sees modules only through [`Handler`], so chain and failure tests run with
//! in-process fakes; [`crate::host`] implements it for shared objects.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use valvula_policy::{Reply, Request};
use valvula_store::sync::UnpoisonedRw;

/// Why a module call did not produce an answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    #[error("module returned status {0}")]
    Status(i32),
    #[error("module gave an invalid reply: {0}")]
    InvalidReply(String),
    #[error("module panicked: {0}")]
    Panicked(String),
    #[error("module did not answer within {0:?}")]
    Timeout(Duration),
    /// Every worker thread of the module was busy for the whole timeout: load, not a
    /// fault of this call (the calls that hold the workers are judged on their own).
    #[error("no free worker thread for the module within {0:?}")]
    Busy(Duration),
    #[error("module is quarantined after repeated failures")]
    Quarantined,
    /// Started disabled: it crashed the worker repeatedly (until the next reload).
    #[error("module is disabled: {0}")]
    Disabled(String),
    /// A service the module needs (the database) is unavailable: an outage, not a fault
    /// of the module, so it never counts towards quarantine.
    #[error("{0}")]
    Unavailable(String),
    /// The database refused a value taken from the request (a character its column
    /// cannot hold, a number out of range): the request's problem, not the module's.
    #[error("{0}")]
    RequestData(String),
    #[error("{0}")]
    Other(String),
    /// An asynchronous call asked to be run on a worker thread instead (ABI 0.5
    /// `VLV_BLOCKING`): not an outcome, the dispatcher runs `handle` for it.
    #[error("module asked for a worker thread")]
    Blocking,
}

impl HandlerError {
    /// Whether the failure is the module's own (it panicked, erred, hung, answered
    /// nonsense): only those count towards quarantine. An outage of the database it
    /// needs, or a pool busy with other calls, says nothing about the module.
    pub fn is_module_fault(&self) -> bool {
        !matches!(
            self,
            HandlerError::Unavailable(_)
                | HandlerError::RequestData(_)
                | HandlerError::Busy(_)
                | HandlerError::Quarantined
                | HandlerError::Disabled(_)
        )
    }
}

/// What the host knows about the module call running on a worker thread: whether the
/// module is inside a storage call now, and whether one of its storage calls found the
/// database unavailable.
#[derive(Default, Debug)]
pub struct CallWatch {
    in_storage: AtomicU32,
    outage: AtomicBool,
    request_data: AtomicBool,
}

impl CallWatch {
    /// The call waits on the database from now on (until [`CallWatch::left_storage`]).
    pub(crate) fn entered_storage(&self) {
        self.in_storage.fetch_add(1, Ordering::AcqRel);
    }
    pub(crate) fn left_storage(&self) {
        self.in_storage.fetch_sub(1, Ordering::AcqRel);
    }
    /// What the call's storage calls met.
    pub(crate) fn note(&self, outage: bool, request_data: bool) {
        if outage {
            self.outage.store(true, Ordering::Release);
        }
        if request_data {
            self.request_data.store(true, Ordering::Release);
        }
    }
}

/// A module call that runs on the request's own task (ABI 0.5 `process_poll`).
pub type AsyncCall = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Option<Reply>, HandlerError>> + Send + 'static>,
>;

thread_local! {
    static WATCH: std::cell::RefCell<Option<Arc<CallWatch>>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` (a module call) with `w` watching it on this thread.
fn watched<R>(w: &Arc<CallWatch>, f: impl FnOnce() -> R) -> R {
    let before = WATCH.with(|c| c.replace(Some(w.clone())));
    let r = f();
    WATCH.with(|c| *c.borrow_mut() = before);
    r
}

/// Runs `f` (a storage call made by the module call running on this thread) marked as
/// waiting on the database.
pub(crate) fn in_storage<R>(f: impl FnOnce() -> R) -> R {
    let w = WATCH.with(|c| c.borrow().clone());
    if let Some(w) = &w {
        w.in_storage.fetch_add(1, Ordering::AcqRel);
    }
    let r = f();
    if let Some(w) = &w {
        w.in_storage.fetch_sub(1, Ordering::AcqRel);
    }
    r
}

/// A storage call of the module call running on this thread found the database
/// unavailable.
pub(crate) fn note_storage_outage() {
    WATCH.with(|c| {
        if let Some(w) = &*c.borrow() {
            w.outage.store(true, Ordering::Release);
        }
    });
}

/// A storage call of the module call running on this thread had a value from the
/// request refused by the database.
pub(crate) fn note_request_data_problem() {
    WATCH.with(|c| {
        if let Some(w) = &*c.borrow() {
            w.request_data.store(true, Ordering::Release);
        }
    });
}

/// A policy module as the server sees it.
pub trait Handler: Send + Sync + 'static {
    fn name(&self) -> &str;
    /// The module's version, for status.
    fn version(&self) -> &str {
        ""
    }
    /// The module declared `VLV_FLAG_NONBLOCKING`: it promises its calls never block
    /// (they run on its threads under the timeout all the same, see `call`).
    fn nonblocking(&self) -> bool {
        false
    }
    /// Decides one request: `Ok(None)` is DUNNO.
    fn handle(&self, req: &Request) -> Result<Option<Reply>, HandlerError>;
    /// Decides one request on the request's own task, waiting for the database without
    /// holding a thread; `None` when the module has no such entry (then `handle` runs
    /// on the module's worker threads). `watch` learns when the call waits on storage
    /// and what its storage calls met.
    fn handle_async(&self, _req: &Arc<Request>, _watch: &Arc<CallWatch>) -> Option<AsyncCall> {
        None
    }
    /// The configuration was reloaded; `section` is the module's new `[module.NAME]`.
    fn reconf(&self, _section: &toml::Table) -> Result<(), HandlerError> {
        Ok(())
    }
    /// Clock boundaries (`VLV_TICK_*` bits).
    fn tick(&self, _kinds: u32, _now: i64) {}
    /// The daemon is stopping.
    fn close(&self) {}
    /// Why the module is disabled, if it is (see [`Disabled`]).
    fn disabled(&self) -> Option<&str> {
        None
    }
}

/// A module the master started disabled because it crashed the worker repeatedly: it
/// is never called (not even `init`), and every request given to it gets the
/// listener's on-error action, until a reload loads it again.
#[derive(Debug)]
pub struct Disabled {
    pub name: String,
    pub version: String,
    pub why: String,
}

impl Handler for Disabled {
    fn name(&self) -> &str {
        &self.name
    }
    fn version(&self) -> &str {
        &self.version
    }
    fn handle(&self, _req: &Request) -> Result<Option<Reply>, HandlerError> {
        Err(HandlerError::Disabled(self.why.clone()))
    }
    fn disabled(&self) -> Option<&str> {
        Some(&self.why)
    }
}

/// Tuning of a [`Dispatcher`], from `[server]`.
#[derive(Clone, Copy, Debug)]
pub struct DispatchSettings {
    pub timeout: Duration,
    pub threads: usize,
    pub quarantine_after: u32,
    pub quarantine_for: Duration,
}

/// Upper bounds (µs) of the latency histogram's buckets.
pub const LATENCY_BUCKETS_US: [u64; 10] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 50_000, 250_000, 1_000_000,
];

/// Per-module counters, for logs, status and metrics.
#[derive(Debug)]
pub struct ModuleStats {
    pub calls: AtomicU64,
    pub answers: AtomicU64,
    pub failures: AtomicU64,
    pub timeouts: AtomicU64,
    /// Calls that failed because the database was unavailable (never quarantined).
    pub unavailable: AtomicU64,
    pub total_us: AtomicU64,
    pub max_us: AtomicU64,
    /// `u64::MAX` until the first call.
    pub min_us: AtomicU64,
    /// Calls per latency bucket (not cumulative; the last bound's overflow is implied).
    pub buckets: [AtomicU64; LATENCY_BUCKETS_US.len()],
}

type Job = Box<dyn FnOnce() + Send>;

/// The module's own worker threads. Not tokio's blocking pool: a call that never returns
/// pins one of these threads for good, and must neither starve other modules nor keep
/// the runtime from shutting down.
struct Pool {
    jobs: Arc<valvula_store::sync::Queue<Job>>,
}

impl Pool {
    fn new(module: &str, threads: usize) -> Pool {
        let jobs = valvula_store::sync::Queue::<Job>::new();
        for i in 0..threads {
            let rx = jobs.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("vlv-{module}-{i}"))
                .spawn(move || {
                    while let Some(job) = rx.pop() {
                        job();
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(module, "cannot start a worker thread: {e}");
            }
        }
        Pool { jobs }
    }
}

impl Drop for Pool {
    /// Idle workers end once the queue is drained; a hung one ends with the process.
    fn drop(&mut self) {
        self.jobs.close();
    }
}

impl Default for ModuleStats {
    fn default() -> Self {
        ModuleStats {
            calls: AtomicU64::new(0),
            answers: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            unavailable: AtomicU64::new(0),
            total_us: AtomicU64::new(0),
            max_us: AtomicU64::new(0),
            min_us: AtomicU64::new(u64::MAX),
            buckets: Default::default(),
        }
    }
}

/// Wraps one [`Handler`] with its limits and failure accounting.
pub struct Dispatcher {
    handler: Arc<dyn Handler>,
    pool: Pool,
    /// One permit per worker thread: a call waits for a free worker (bounded by its
    /// timeout) instead of queueing without limit behind hung calls.
    permits: Arc<Semaphore>,
    settings: std::sync::RwLock<DispatchSettings>,
    consecutive_failures: AtomicU32,
    /// Milliseconds since `epoch` until which the module is quarantined (0: not).
    quarantined_until_ms: AtomicI64,
    epoch: Instant,
    closed: AtomicBool,
    pub stats: ModuleStats,
    /// Failure lines of this module's calls, at most one a second.
    pub failure_log: valvula_store::RateLog,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("module", &self.handler.name())
            .finish()
    }
}

impl Dispatcher {
    pub fn new(handler: Arc<dyn Handler>, settings: DispatchSettings) -> Arc<Self> {
        // A disabled module is never called: no threads for it.
        let threads = if handler.disabled().is_some() {
            0
        } else {
            settings.threads
        };
        let pool = Pool::new(handler.name(), threads);
        Arc::new(Dispatcher {
            handler,
            pool,
            permits: Arc::new(Semaphore::new(settings.threads)),
            settings: std::sync::RwLock::new(settings),
            consecutive_failures: AtomicU32::new(0),
            quarantined_until_ms: AtomicI64::new(0),
            epoch: Instant::now(),
            closed: AtomicBool::new(false),
            stats: ModuleStats::default(),
            failure_log: valvula_store::RateLog::default(),
        })
    }

    pub fn name(&self) -> &str {
        self.handler.name()
    }

    pub fn handler(&self) -> &Arc<dyn Handler> {
        &self.handler
    }

    fn settings(&self) -> DispatchSettings {
        *self.settings.read_now()
    }

    /// New timeout and quarantine settings after a reload. The thread bound is fixed at
    /// start: permits held by hung calls cannot be taken back.
    pub fn update_settings(&self, s: DispatchSettings) {
        let mut cur = self.settings.write_now();
        *cur = DispatchSettings {
            threads: cur.threads,
            ..s
        };
    }

    fn now_ms(&self) -> i64 {
        self.epoch.elapsed().as_millis() as i64
    }

    /// Why the module is disabled, if it is.
    pub fn disabled(&self) -> Option<&str> {
        self.handler.disabled()
    }

    pub fn is_quarantined(&self) -> bool {
        self.quarantined_until_ms.load(Ordering::Relaxed) > self.now_ms()
    }

    /// Calls the module for one request.
    pub async fn call(&self, req: &Arc<Request>) -> Result<Option<Reply>, HandlerError> {
        if let Some(why) = self.handler.disabled() {
            self.stats.calls.fetch_add(1, Ordering::Relaxed);
            self.stats.failures.fetch_add(1, Ordering::Relaxed);
            return Err(HandlerError::Disabled(why.to_owned()));
        }
        if self.is_quarantined() {
            return Err(HandlerError::Quarantined);
        }
        let settings = self.settings();
        let started = Instant::now();
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        let watch = Arc::new(CallWatch::default());
        let result = if let Some(call) = self.handler.handle_async(req, &watch) {
            let r = match tokio::time::timeout(
                settings.timeout,
                futures_util::FutureExt::catch_unwind(AssertUnwindSafe(call)),
            )
            .await
            {
                Err(_) if watch.in_storage.load(Ordering::Acquire) > 0 => {
                    Err(HandlerError::Unavailable(format!(
                        "module still waiting on the database after {:?}",
                        settings.timeout
                    )))
                }
                Err(_) => Err(HandlerError::Timeout(settings.timeout)),
                Ok(Err(p)) => Err(HandlerError::Panicked(valvula_store::sync::panic_text(&*p))),
                Ok(Ok(r)) => r,
            };
            match r {
                Err(HandlerError::Blocking) => self.call_blocking(req, settings.timeout).await,
                r => Self::judged(r, &watch),
            }
        } else {
            // NONBLOCKING modules too: a module that broke that promise (it slept, it
            // hung) once held a runtime thread past its timeout and stalled every
            // listener. On the module's own threads the timeout bounds the call and
            // only the module's requests wait.
            self.call_blocking(req, settings.timeout).await
        };
        let us = started.elapsed().as_micros() as u64;
        self.stats.total_us.fetch_add(us, Ordering::Relaxed);
        self.stats.max_us.fetch_max(us, Ordering::Relaxed);
        self.stats.min_us.fetch_min(us, Ordering::Relaxed);
        if let Some(i) = LATENCY_BUCKETS_US.iter().position(|b| us <= *b) {
            self.stats.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.account(&result, settings);
        result
    }

    /// Runs `f` on the module's pool under `timeout` (waiting for a free worker counts),
    /// with panics caught and the call watched (see [`CallWatch`]).
    async fn on_pool<T: Send + 'static>(
        &self,
        timeout: Duration,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> (Result<T, HandlerError>, Arc<CallWatch>) {
        let watch = Arc::new(CallWatch::default());
        let deadline = tokio::time::Instant::now() + timeout;
        let permit =
            match tokio::time::timeout_at(deadline, self.permits.clone().acquire_owned()).await {
                Ok(Ok(p)) => p,
                Ok(Err(_)) => return (Err(HandlerError::Other("module is closed".into())), watch),
                Err(_) => return (Err(HandlerError::Busy(timeout)), watch),
            };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let w = watch.clone();
        let job: Job = Box::new(move || {
            let _permit = permit;
            let _ = tx.send(catch_unwind(AssertUnwindSafe(|| watched(&w, f))));
        });
        if self.pool.jobs.push(job).is_err() {
            return (
                Err(HandlerError::Other("module worker threads are gone".into())),
                watch,
            );
        }
        let r = match tokio::time::timeout_at(deadline, rx).await {
            Err(_) if watch.in_storage.load(Ordering::Acquire) > 0 => {
                // Stuck waiting on the database (a commit whose outcome is awaited),
                // not in the module's own code.
                Err(HandlerError::Unavailable(format!(
                    "module still waiting on the database after {timeout:?}"
                )))
            }
            Err(_) => Err(HandlerError::Timeout(timeout)),
            Ok(Err(_)) => Err(HandlerError::Other("module worker thread died".into())),
            Ok(Ok(Err(p))) => Err(HandlerError::Panicked(valvula_store::sync::panic_text(&*p))),
            Ok(Ok(Ok(r))) => Ok(r),
        };
        (r, watch)
    }

    /// [`Dispatcher::on_pool`] for hooks whose watch is not needed.
    async fn on_pool_plain<T: Send + 'static>(
        &self,
        timeout: Duration,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, HandlerError> {
        self.on_pool(timeout, f).await.0
    }

    async fn call_blocking(
        &self,
        req: &Arc<Request>,
        timeout: Duration,
    ) -> Result<Option<Reply>, HandlerError> {
        let handler = self.handler.clone();
        let req = req.clone();
        let (r, watch) = self.on_pool(timeout, move || handler.handle(&req)).await;
        Self::judged(r.and_then(|r| r), &watch)
    }

    /// A call's result in the light of what its storage calls met: a failure after an
    /// outage or a refused request value is not the module's fault.
    fn judged(
        r: Result<Option<Reply>, HandlerError>,
        watch: &CallWatch,
    ) -> Result<Option<Reply>, HandlerError> {
        if watch.outage.load(Ordering::Acquire) {
            // Whatever the module made of it, the database was away during the call.
            return r.map_err(|e| match e {
                HandlerError::Status(_) | HandlerError::Timeout(_) | HandlerError::Other(_) => {
                    HandlerError::Unavailable(format!("{e} (the database was unavailable)"))
                }
                e => e,
            });
        }
        if watch.request_data.load(Ordering::Acquire) {
            return r.map_err(|e| match e {
                HandlerError::Status(_) | HandlerError::Other(_) => HandlerError::RequestData(
                    format!("{e} (the database refused a value from the request)"),
                ),
                e => e,
            });
        }
        r
    }

    fn account(&self, result: &Result<Option<Reply>, HandlerError>, s: DispatchSettings) {
        match result {
            Ok(r) => {
                if r.is_some() {
                    self.stats.answers.fetch_add(1, Ordering::Relaxed);
                }
                self.consecutive_failures.store(0, Ordering::Relaxed);
            }
            Err(e) => {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                if matches!(e, HandlerError::Timeout(_) | HandlerError::Busy(_)) {
                    self.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                }
                if matches!(e, HandlerError::Unavailable(_)) {
                    self.stats.unavailable.fetch_add(1, Ordering::Relaxed);
                }
                if !e.is_module_fault() {
                    return;
                }
                let n = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
                if n >= s.quarantine_after {
                    let until = self.now_ms() + s.quarantine_for.as_millis() as i64;
                    let was = self.quarantined_until_ms.swap(until, Ordering::Relaxed);
                    if was <= self.now_ms() {
                        tracing::error!(
                            module = self.name(),
                            failures = n,
                            seconds = s.quarantine_for.as_secs_f64(),
                            "module quarantined: its requests get the listener's on-error action until it recovers"
                        );
                    }
                }
            }
        }
    }

    /// Runs `reconf` on the module's pool under the module timeout.
    pub async fn reconf(&self, section: toml::Table) -> Result<(), HandlerError> {
        if self.disabled().is_some() {
            return Ok(());
        }
        let h = self.handler.clone();
        self.on_pool_plain(self.settings().timeout, move || h.reconf(&section))
            .await?
    }

    /// Runs `tick` on the module's pool under the module timeout; failures are logged.
    pub async fn tick(&self, kinds: u32, now: i64) {
        // A disabled module has no threads, and is called for nothing.
        if self.disabled().is_some() {
            return;
        }
        let h = self.handler.clone();
        let timeout = self.settings().timeout;
        if let Err(e) = self
            .on_pool_plain(timeout, move || h.tick(kinds, now))
            .await
        {
            tracing::error!(module = self.name(), "tick failed: {e}");
        }
    }

    /// Calls `close` once. Modules whose calls hang are not waited for.
    pub fn close(&self) {
        if !self.closed.swap(true, Ordering::SeqCst) {
            let _ = catch_unwind(AssertUnwindSafe(|| self.handler.close()));
        }
    }
}
