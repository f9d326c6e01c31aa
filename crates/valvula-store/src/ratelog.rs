//! Rate-limited logging shared by the daemon and the store.

/// At most one log line a second for one kind of event, with the number of events the
/// silent second held: a failure that repeats for every request (a database away, a
/// module erring on each call) must not write a line per request.
#[derive(Debug)]
pub struct RateLog {
    epoch: std::time::Instant,
    /// Milliseconds since `epoch` of the last line, plus one (0: none yet).
    last_ms: std::sync::atomic::AtomicU64,
    suppressed: std::sync::atomic::AtomicU64,
}

impl Default for RateLog {
    fn default() -> Self {
        RateLog {
            epoch: std::time::Instant::now(),
            last_ms: std::sync::atomic::AtomicU64::new(0),
            suppressed: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl RateLog {
    /// `Some(n)` when a line may be written now, `n` being the events not logged since
    /// the last line; `None` (the event is counted) otherwise.
    pub fn allow(&self) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        let now = self.epoch.elapsed().as_millis() as u64 + 1;
        let last = self.last_ms.load(Relaxed);
        if last != 0 && now.saturating_sub(last) < 1000 {
            self.suppressed.fetch_add(1, Relaxed);
            return None;
        }
        if self
            .last_ms
            .compare_exchange(last, now, Relaxed, Relaxed)
            .is_err()
        {
            self.suppressed.fetch_add(1, Relaxed);
            return None;
        }
        Some(self.suppressed.swap(0, Relaxed))
    }
}
