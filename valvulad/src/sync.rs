//! Blocking hand-offs between threads that park at once instead of spinning.
//!
//! crossbeam's channels spin and call `sched_yield` before they park. With 64 module
//! threads waiting on one machine of 2 cores, that spinning took a fifth of the CPU
//! (measured with perf under the benchmark), time the SQLite writer and the async
//! runtime needed. A mutex and a condition variable go to sleep on the futex directly.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave the data half-changed (push/pop).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct QueueInner<T> {
    items: VecDeque<T>,
    closed: bool,
}

/// A many-producer, many-consumer queue; consumers block until an item arrives or the
/// queue is closed (and empty).
pub struct Queue<T> {
    inner: Mutex<QueueInner<T>>,
    ready: Condvar,
}

impl<T> Queue<T> {
    pub fn new() -> Arc<Queue<T>> {
        Arc::new(Queue {
            inner: Mutex::new(QueueInner {
                items: VecDeque::new(),
                closed: false,
            }),
            ready: Condvar::new(),
        })
    }

    /// Adds an item; gives it back when the queue is closed.
    pub fn push(&self, item: T) -> Result<(), T> {
        let mut q = lock(&self.inner);
        if q.closed {
            return Err(item);
        }
        q.items.push_back(item);
        drop(q);
        self.ready.notify_one();
        Ok(())
    }

    /// Waits for an item; `None` once the queue is closed and drained.
    pub fn pop(&self) -> Option<T> {
        let mut q = lock(&self.inner);
        loop {
            if let Some(item) = q.items.pop_front() {
                return Some(item);
            }
            if q.closed {
                return None;
            }
            q = self.ready.wait(q).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Waits for at least one item, then takes up to `max` of them.
    pub fn pop_many(&self, max: usize) -> Option<Vec<T>> {
        let mut q = lock(&self.inner);
        loop {
            if !q.items.is_empty() {
                let n = q.items.len().min(max);
                return Some(q.items.drain(..n).collect());
            }
            if q.closed {
                return None;
            }
            q = self.ready.wait(q).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Refuses new items and wakes every consumer; queued items are still handed out.
    pub fn close(&self) {
        lock(&self.inner).closed = true;
        self.ready.notify_all();
    }
}

struct Slot<T> {
    /// `None` until answered; `Some(None)` when the promise was dropped unanswered.
    value: Mutex<Option<Option<T>>>,
    ready: Condvar,
}

/// The sending half of a one-value hand-off.
pub struct Promise<T>(Option<Arc<Slot<T>>>);

/// The receiving half: [`Answer::wait`] blocks until the value arrives.
pub struct Answer<T>(Arc<Slot<T>>);

/// A hand-off of exactly one value.
pub fn oneshot<T>() -> (Promise<T>, Answer<T>) {
    let slot = Arc::new(Slot {
        value: Mutex::new(None),
        ready: Condvar::new(),
    });
    (Promise(Some(slot.clone())), Answer(slot))
}

impl<T> Promise<T> {
    fn fill(&mut self, value: Option<T>) {
        if let Some(slot) = self.0.take() {
            *lock(&slot.value) = Some(value);
            slot.ready.notify_one();
        }
    }

    pub fn send(mut self, value: T) {
        self.fill(Some(value));
    }
}

impl<T> Drop for Promise<T> {
    /// A sender that goes away unanswered (a task cancelled at shutdown) must not leave
    /// its waiter blocked for good.
    fn drop(&mut self) {
        self.fill(None);
    }
}

impl<T> Answer<T> {
    /// The value, or `None` when the sender went away without answering.
    pub fn wait(self) -> Option<T> {
        let mut v = lock(&self.0.value);
        loop {
            if let Some(value) = v.take() {
                return value;
            }
            v = self.0.ready.wait(v).unwrap_or_else(|e| e.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_hands_every_item_to_one_consumer_and_drains_on_close() {
        let q = Queue::new();
        let consumers: Vec<_> = (0..4)
            .map(|_| {
                let q = q.clone();
                std::thread::spawn(move || {
                    let mut got = Vec::new();
                    while let Some(i) = q.pop() {
                        got.push(i);
                    }
                    got
                })
            })
            .collect();
        for i in 0..10_000 {
            q.push(i).unwrap();
        }
        q.close();
        assert_eq!(q.push(1), Err(1));
        let mut all: Vec<i32> = consumers
            .into_iter()
            .flat_map(|c| c.join().unwrap())
            .collect();
        all.sort();
        assert_eq!(all, (0..10_000).collect::<Vec<_>>());
    }

    #[test]
    fn pop_many_takes_at_most_max() {
        let q = Queue::new();
        for i in 0..5 {
            q.push(i).unwrap();
        }
        assert_eq!(q.pop_many(3), Some(vec![0, 1, 2]));
        assert_eq!(q.pop_many(3), Some(vec![3, 4]));
        q.close();
        assert_eq!(q.pop_many(3), None);
    }

    #[test]
    fn oneshot_delivers_across_threads_and_reports_a_dropped_sender() {
        let (p, a) = oneshot();
        std::thread::spawn(move || p.send(7));
        assert_eq!(a.wait(), Some(7));
        let (p, a) = oneshot::<i32>();
        std::thread::spawn(move || drop(p));
        assert_eq!(a.wait(), None);
    }
}
