//! The clock counters and modules see.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

/// Seconds since the epoch, as counters, calendar periods and modules see them. The
/// daemon runs on the system clock; a test hands the host a [`Clock::manual`] of its
/// own to cross day and month boundaries without waiting for them (a clock per test,
/// so tests run side by side in one process).
#[derive(Clone, Debug, Default)]
pub struct Clock(Option<Arc<AtomicI64>>);

impl Clock {
    /// The system clock.
    pub fn system() -> Clock {
        Clock(None)
    }

    /// A clock that stands at `at` until [`Clock::set`] moves it.
    pub fn manual(at: i64) -> Clock {
        Clock(Some(Arc::new(AtomicI64::new(at))))
    }

    pub fn now(&self) -> i64 {
        match &self.0 {
            Some(at) => at.load(Ordering::Relaxed),
            None => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
        }
    }

    /// Moves a manual clock (every clone of it); `false` for the system clock, which
    /// nothing moves.
    pub fn set(&self, at: i64) -> bool {
        match &self.0 {
            Some(c) => {
                c.store(at, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_for_every_clone_and_the_system_clock_runs() {
        let c = Clock::manual(100);
        let d = c.clone();
        assert!(c.set(200), "a manual clock refused to move");
        assert_eq!(d.now(), 200, "a clone did not see the move");
        let s = Clock::system();
        assert!(!s.set(5), "the system clock claimed to move");
        assert!(s.now() > 1_700_000_000, "system clock reads {}", s.now());
    }
}
