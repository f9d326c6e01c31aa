//! A listener's open connections, and which of them gives way to a new one at the cap.
//!
//! Postfix keeps one policy connection per smtpd process open between requests and
//! reconnects silently when the daemon has closed it: its next request goes out on a new
//! connection within its retry budget, and the mail goes on. So at `max_connections` a
//! connection waiting between requests can be closed to admit a new one at no cost to
//! mail, the one idle longest first. Without that, anyone allowed to connect could hold
//! every slot by connecting and saying nothing, and lock Postfix out.
//!
//! A request in progress is never cut, with one exception: a request still incomplete
//! [`STALLED_AFTER`] after its first byte was read. Postfix writes a whole request with
//! one write, so its bytes arrive together; only a client trickling bytes (slowloris) is
//! ever in that state, and its request would otherwise hold the slot until
//! `request_timeout`. Such a stalled request gives way only when no connection is idle,
//! the oldest first. A complete request (its modules running, its reply being written)
//! is never cut.
//!
//! Every change of phase and every eviction happens under one lock per listener, so a
//! connection is either evicted while it waits (and then closes without reading further)
//! or has left the evictable sets before it processes anything.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use valvula_store::sync::Unpoisoned;

/// A request still incomplete this long after its first byte is a trickle, not Postfix.
pub const STALLED_AFTER: Duration = Duration::from_secs(1);

/// Where a connection is, as far as eviction cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Between requests (or connected and silent so far): may give way, longest first.
    Idle,
    /// Part of a request read: may give way only once stalled, and after every idle one.
    Partial,
    /// A complete request being processed or answered: never cut.
    Busy,
}

/// One admitted connection's registration; its task owns it.
#[derive(Debug)]
pub struct Slot {
    id: u64,
    phase: Phase,
    since: Instant,
    evict: CancellationToken,
    gone: CancellationToken,
}

impl Slot {
    /// Cancelled when the connection must close to make room for another.
    pub fn evicted(&self) -> &CancellationToken {
        &self.evict
    }
}

#[derive(Debug)]
struct Entry {
    evict: CancellationToken,
    gone: CancellationToken,
}

#[derive(Debug, Default)]
struct Sets {
    next_id: u64,
    /// Keyed by when the connection became idle, then by id.
    idle: BTreeMap<(Instant, u64), Entry>,
    /// Keyed by when the request's first byte was read, then by id.
    partial: BTreeMap<(Instant, u64), Entry>,
}

/// A connection closed to make room.
#[derive(Debug)]
pub struct Victim {
    pub phase: Phase,
    /// How long it had been idle, or its request in progress.
    pub waited: Duration,
    gone: CancellationToken,
}

impl Victim {
    /// Resolves once the victim's socket is closed.
    pub async fn closed(&self) {
        self.gone.cancelled().await
    }
}

#[derive(Debug)]
pub enum Admission {
    /// Under the cap.
    Admitted(Slot),
    /// At the cap: `Victim` was closed to make room.
    Replaced(Slot, Victim),
    /// At the cap with every connection busy or in a request that is not stalled.
    Refused,
}

/// The open connections of one listener.
#[derive(Debug, Default)]
pub struct Connections {
    sets: Mutex<Sets>,
    /// Admitted and not evicted: what the cap counts. Changed under the lock only; read
    /// without it for status and metrics.
    open: AtomicUsize,
    /// Connections closed to make room (at the cap, or out of file descriptors).
    evicted: AtomicU64,
}

impl Connections {
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    /// Connections waiting between requests: the first to give way at the cap.
    pub fn idle(&self) -> usize {
        self.lock().idle.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Sets> {
        self.sets.locked()
    }

    /// Admits a new connection under `cap`, making room if needed.
    pub fn admit(&self, cap: usize) -> Admission {
        self.admit_at(cap, Instant::now())
    }

    fn admit_at(&self, cap: usize, now: Instant) -> Admission {
        let mut sets = self.lock();
        if self.open.load(Ordering::Relaxed) < cap {
            self.open.fetch_add(1, Ordering::Relaxed);
            return Admission::Admitted(register(&mut sets, now));
        }
        match self.take_victim(&mut sets, now) {
            // The victim's place goes to the new connection: `open` stays.
            Some(v) => Admission::Replaced(register(&mut sets, now), v),
            None => Admission::Refused,
        }
    }

    /// Closes one connection without admitting another (the process is out of file
    /// descriptors and a connection is waiting to be accepted).
    pub fn evict_one(&self) -> Option<Victim> {
        self.evict_one_at(Instant::now())
    }

    fn evict_one_at(&self, now: Instant) -> Option<Victim> {
        let mut sets = self.lock();
        let v = self.take_victim(&mut sets, now)?;
        self.open.fetch_sub(1, Ordering::Relaxed);
        Some(v)
    }

    fn take_victim(&self, sets: &mut Sets, now: Instant) -> Option<Victim> {
        let (key, entry, phase) = if let Some((k, e)) = sets.idle.pop_first() {
            (k, e, Phase::Idle)
        } else {
            let (&k, _) = sets.partial.first_key_value()?;
            if now.saturating_duration_since(k.0) < STALLED_AFTER {
                return None;
            }
            let e = sets.partial.remove(&k)?;
            (k, e, Phase::Partial)
        };
        entry.evict.cancel();
        self.evicted.fetch_add(1, Ordering::Relaxed);
        Some(Victim {
            phase,
            waited: now.saturating_duration_since(key.0),
            gone: entry.gone,
        })
    }

    /// Moves `slot` to `phase`. `false`: the connection was evicted and must close
    /// without reading or answering anything more.
    pub fn enter(&self, slot: &mut Slot, phase: Phase) -> bool {
        self.enter_at(slot, phase, Instant::now())
    }

    fn enter_at(&self, slot: &mut Slot, phase: Phase, now: Instant) -> bool {
        if slot.phase == phase {
            return !slot.evict.is_cancelled();
        }
        let mut sets = self.lock();
        // Evictions cancel under this lock, so this cannot race with one.
        if slot.evict.is_cancelled() {
            return false;
        }
        let entry = match slot.phase {
            Phase::Idle => sets.idle.remove(&(slot.since, slot.id)),
            Phase::Partial => sets.partial.remove(&(slot.since, slot.id)),
            Phase::Busy => None,
        }
        .unwrap_or_else(|| Entry {
            evict: slot.evict.clone(),
            gone: slot.gone.clone(),
        });
        slot.phase = phase;
        slot.since = now;
        match phase {
            Phase::Idle => {
                sets.idle.insert((now, slot.id), entry);
            }
            Phase::Partial => {
                sets.partial.insert((now, slot.id), entry);
            }
            Phase::Busy => {}
        }
        true
    }

    /// The connection has closed (its socket dropped). Frees its place unless an
    /// eviction already took it.
    pub fn release(&self, slot: &Slot) {
        {
            let mut sets = self.lock();
            if !slot.evict.is_cancelled() {
                match slot.phase {
                    Phase::Idle => sets.idle.remove(&(slot.since, slot.id)),
                    Phase::Partial => sets.partial.remove(&(slot.since, slot.id)),
                    Phase::Busy => None,
                };
                self.open.fetch_sub(1, Ordering::Relaxed);
            }
        }
        slot.gone.cancel();
    }
}

fn register(sets: &mut Sets, now: Instant) -> Slot {
    sets.next_id += 1;
    let slot = Slot {
        id: sets.next_id,
        phase: Phase::Idle,
        since: now,
        evict: CancellationToken::new(),
        gone: CancellationToken::new(),
    };
    sets.idle.insert(
        (now, slot.id),
        Entry {
            evict: slot.evict.clone(),
            gone: slot.gone.clone(),
        },
    );
    slot
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admitted(a: Admission) -> Slot {
        match a {
            Admission::Admitted(s) => s,
            other => panic!("expected an admission under the cap, got {other:?}"),
        }
    }

    fn replaced(a: Admission) -> (Slot, Victim) {
        match a {
            Admission::Replaced(s, v) => (s, v),
            other => panic!("expected a replacement at the cap, got {other:?}"),
        }
    }

    #[test]
    fn the_longest_idle_gives_way_first() {
        let c = Connections::default();
        let t0 = Instant::now();
        let s = |i: u64| t0 + Duration::from_millis(i);
        let mut a = admitted(c.admit_at(3, s(0)));
        let b = admitted(c.admit_at(3, s(1)));
        let mut d = admitted(c.admit_at(3, s(2)));
        // `a` asks and answers a request: idle again, now the most recent.
        assert!(c.enter_at(&mut a, Phase::Busy, s(3)));
        assert!(c.enter_at(&mut a, Phase::Idle, s(4)));
        // `d` is busy: never a victim.
        assert!(c.enter_at(&mut d, Phase::Busy, s(5)));
        let (e, v) = replaced(c.admit_at(3, s(6)));
        assert!(b.evicted().is_cancelled(), "b, idle longest, was kept");
        assert!(!a.evicted().is_cancelled(), "a was evicted before b");
        assert_eq!((v.phase, v.waited), (Phase::Idle, Duration::from_millis(5)));
        assert_eq!(c.open(), 3, "a replacement changed the count");
        let (_f, _) = replaced(c.admit_at(3, s(7)));
        assert!(a.evicted().is_cancelled(), "a, idle next longest, was kept");
        let (_g, _) = replaced(c.admit_at(3, s(8)));
        assert!(e.evicted().is_cancelled(), "e was kept");
        assert!(!d.evicted().is_cancelled(), "a busy connection was evicted");
        assert_eq!(c.evicted(), 3);
        assert_eq!(c.idle(), 2, "idle: f and g");
        // An evicted connection cannot start a request, and frees nothing on release.
        let mut b = b;
        assert!(
            !c.enter_at(&mut b, Phase::Busy, s(9)),
            "an evicted connection went on"
        );
        c.release(&b);
        assert_eq!(
            c.open(),
            3,
            "an evicted connection's release freed a place twice"
        );
        c.release(&d);
        assert_eq!(c.open(), 2, "a closed connection's place was not freed");
    }

    #[test]
    fn requests_in_progress_give_way_only_once_stalled_and_after_idle_ones() {
        let c = Connections::default();
        let t0 = Instant::now();
        let mut p = admitted(c.admit_at(2, t0));
        assert!(c.enter_at(&mut p, Phase::Partial, t0));
        let mut q = admitted(c.admit_at(2, t0));
        assert!(c.enter_at(&mut q, Phase::Busy, t0));
        // A fresh request in progress and a busy one: nobody gives way.
        assert!(
            matches!(c.admit_at(2, t0 + STALLED_AFTER / 2), Admission::Refused),
            "a request in progress that is not stalled gave way"
        );
        // Once stalled it does, but an idle connection goes before it.
        assert!(c.enter_at(&mut q, Phase::Idle, t0 + STALLED_AFTER));
        let (mut r, v) = replaced(c.admit_at(2, t0 + STALLED_AFTER * 2));
        assert_eq!(
            v.phase,
            Phase::Idle,
            "the stalled request went before an idle one"
        );
        assert!(!p.evicted().is_cancelled());
        assert!(c.enter_at(&mut r, Phase::Busy, t0 + STALLED_AFTER * 2));
        let (_s, v) = replaced(c.admit_at(2, t0 + STALLED_AFTER * 3));
        assert_eq!(v.phase, Phase::Partial);
        assert!(p.evicted().is_cancelled(), "the stalled request was kept");
        // More bytes of the same request do not restart its clock.
        let c = Connections::default();
        let mut p = admitted(c.admit_at(1, t0));
        assert!(c.enter_at(&mut p, Phase::Partial, t0));
        assert!(c.enter_at(&mut p, Phase::Partial, t0 + STALLED_AFTER));
        let (_x, v) = replaced(c.admit_at(1, t0 + STALLED_AFTER));
        assert_eq!((v.phase, v.waited), (Phase::Partial, STALLED_AFTER));
    }

    #[test]
    fn evict_one_frees_a_place() {
        let c = Connections::default();
        let t0 = Instant::now();
        let a = admitted(c.admit_at(5, t0));
        let v = c.evict_one_at(t0).expect("an idle connection to evict");
        assert!(a.evicted().is_cancelled());
        assert_eq!(c.open(), 0);
        assert!(
            c.evict_one_at(t0).is_none(),
            "evicted from an empty listener"
        );
        c.release(&a);
        assert_eq!(c.open(), 0, "released twice");
        // The victim's release is what `closed` waits for.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), v.closed())
                .await
                .expect("closed() did not resolve after release");
        });
    }
}
