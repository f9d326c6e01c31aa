//! What the log says while the database is away: one line when it goes, one line a
//! second with the number of calls that failed meanwhile, one line when it is back.
//! (Before, every failed call logged a line: 461,000 lines in 45 s of outage.)

use crate::sync::Unpoisoned;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Lines logged while down: at most one per this interval.
const EVERY: Duration = Duration::from_secs(1);

#[derive(Default)]
struct State {
    /// Set while the database is unavailable.
    since: Option<Instant>,
    /// Calls failed since the last line, and in the whole outage.
    pending: u64,
    total: u64,
    last_line: Option<Instant>,
}

/// The availability of one database, as its callers saw it.
#[derive(Default)]
pub struct Outage {
    database: String,
    /// Mirrors `state.since.is_some()`, so the call path of a healthy database takes no
    /// lock.
    down: AtomicBool,
    state: Mutex<State>,
}

impl Outage {
    pub fn new(database: &str) -> Outage {
        Outage {
            database: database.to_owned(),
            down: AtomicBool::new(false),
            state: Mutex::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.locked()
    }

    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Acquire)
    }

    /// The database failed a call (`cause`) or a call was refused because it is away.
    /// Returns true when this call starts the outage.
    pub fn failed(&self, cause: &str) -> bool {
        let mut st = self.state();
        let now = Instant::now();
        st.total += 1;
        let Some(since) = st.since else {
            st.since = Some(now);
            self.down.store(true, Ordering::Release);
            st.last_line = Some(now);
            st.pending = 0;
            st.total = 1;
            tracing::error!(target: crate::LOG_TARGET,
                database = %self.database,
                "database unavailable: {cause}; requests that need it get the listener's on-error action until it is back"
            );
            return true;
        };
        self.count(&mut st, since, now, cause);
        false
    }

    /// A call refused because the database is away: counted (and logged once a second)
    /// while the outage lasts. `None` when the outage ended meanwhile: the call goes
    /// ahead (a refusal must never start an outage, or nothing would end it).
    pub fn refused(&self, why: &str) -> Option<Duration> {
        let mut st = self.state();
        let since = st.since?;
        let now = Instant::now();
        st.total += 1;
        self.count(&mut st, since, now, why);
        Some(now.duration_since(since))
    }

    /// One more failed call in the outage; a line when the last is a second old.
    fn count(&self, st: &mut State, since: Instant, now: Instant, why: &str) {
        st.pending += 1;
        if st.last_line.is_none_or(|l| now.duration_since(l) >= EVERY) {
            tracing::warn!(target: crate::LOG_TARGET,
                database = %self.database,
                down_s = format!("{:.1}", now.duration_since(since).as_secs_f64()),
                failed = st.pending,
                failed_total = st.total,
                "database still unavailable: {why}"
            );
            st.last_line = Some(now);
            st.pending = 0;
        }
    }

    /// A call succeeded: ends an outage, if there was one.
    pub fn ok(&self) {
        if !self.is_down() {
            return;
        }
        let mut st = self.state();
        self.down.store(false, Ordering::Release);
        if let Some(since) = st.since.take() {
            tracing::info!(target: crate::LOG_TARGET,
                database = %self.database,
                down_s = format!("{:.1}", since.elapsed().as_secs_f64()),
                failed_total = st.total,
                "database reachable again"
            );
            st.pending = 0;
            st.total = 0;
        }
    }
}
