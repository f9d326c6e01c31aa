//! What a consumption answers for each window. The windows themselves (their grammar,
//! periods, sliding buckets) are `valvula_calendar`'s, re-exported here.

pub use valvula_calendar::{Period, SLIDING_BUCKETS, Window, WindowKind, Zone};

/// The state of one window after a consumption (or a peek).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowState {
    /// Used in the current window, this charge included when it was admitted.
    pub used: i64,
    /// `limit - used`, never below 0; -1 when the window has no limit.
    pub remaining: i64,
    /// When the window's count next goes down (calendar: the next period; sliding: when
    /// the oldest counted bucket leaves the window).
    pub resets_at: i64,
    /// Whether this window alone admits the amount.
    pub admitted: bool,
}

impl WindowState {
    pub fn new(limit: i64, used: i64, resets_at: i64, admitted: bool) -> Self {
        WindowState {
            used,
            remaining: if limit < 0 {
                -1
            } else {
                limit.saturating_sub(used).max(0)
            },
            resets_at,
            admitted,
        }
    }
}

/// Result of a consumption: admitted only if every window admitted, and then every
/// window was charged; otherwise nothing changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Consumption {
    pub admitted: bool,
    pub windows: Vec<WindowState>,
    /// A `consume_once` whose token was already charged: nothing was charged again.
    pub repeated: bool,
}
