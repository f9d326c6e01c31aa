//! Blocking hand-offs between threads that park at once instead of spinning.
//!
//! crossbeam's channels spin and call `sched_yield` before they park. With 64 module
//! threads waiting on one machine of 2 cores, that spinning took a fifth of the CPU
//! (measured with perf under the benchmark), time the SQLite writer and the async
//! runtime needed. A mutex and a condition variable go to sleep on the futex directly.

use std::collections::VecDeque;
use std::future::Future as _;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Locking that goes on after a panic elsewhere. A thread that panicked while holding
/// a lock (a module's panic, caught) poisons it; every lock in valvula guards data that
/// is whole between statements (a queue, a map, a counter), so the next holder uses it
/// as it is rather than taking the daemon down.
pub trait Unpoisoned<T: ?Sized> {
    fn locked(&self) -> MutexGuard<'_, T>;
}

impl<T: ?Sized> Unpoisoned<T> for Mutex<T> {
    fn locked(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Read and write locking that goes on after a panic elsewhere (see [`Unpoisoned`]).
pub trait UnpoisonedRw<T: ?Sized> {
    fn read_now(&self) -> std::sync::RwLockReadGuard<'_, T>;
    fn write_now(&self) -> std::sync::RwLockWriteGuard<'_, T>;
}

impl<T: ?Sized> UnpoisonedRw<T> for std::sync::RwLock<T> {
    fn read_now(&self) -> std::sync::RwLockReadGuard<'_, T> {
        self.read().unwrap_or_else(|e| e.into_inner())
    }
    fn write_now(&self) -> std::sync::RwLockWriteGuard<'_, T> {
        self.write().unwrap_or_else(|e| e.into_inner())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.locked()
}

/// The message of a caught panic, for the log.
pub fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned())
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

    /// Adds an item without waking a consumer: the caller wakes one later
    /// ([`Queue::wake`]), once more items have joined it. A consumer that is awake takes
    /// it with the others anyway.
    pub fn push_quiet(&self, item: T) -> Result<(), T> {
        let mut q = lock(&self.inner);
        if q.closed {
            return Err(item);
        }
        q.items.push_back(item);
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        lock(&self.inner).items.is_empty()
    }

    /// Wakes one waiting consumer.
    pub fn wake(&self) {
        self.ready.notify_one();
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

    /// Takes up to `max` items without waiting (none: an empty list).
    pub fn take_now(&self, max: usize) -> Vec<T> {
        let mut q = lock(&self.inner);
        let n = q.items.len().min(max);
        q.items.drain(..n).collect()
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

enum SlotState<T> {
    /// Not yet taken up by the producer: the waiter may still give up.
    Pending,
    /// The producer has started on it (e.g. it is in a running transaction): the
    /// waiter must wait for the outcome, since giving up could not undo it.
    Claimed,
    /// The waiter gave up before the producer started; the producer must skip it.
    Cancelled,
    /// Answered; `None` when the promise was dropped unanswered.
    Done(Option<T>),
}

struct Slot<T> {
    state: Mutex<SlotState<T>>,
    ready: Condvar,
    /// The task awaiting the value (async waiters); set under the `state` lock, so an
    /// answer given between the waiter's check and its registration is not missed.
    waker: Mutex<Option<std::task::Waker>>,
}

/// The sending half of a one-value hand-off.
pub struct Promise<T>(Option<Arc<Slot<T>>>);

/// The receiving half: [`Answer::wait`] blocks until the value arrives.
pub struct Answer<T>(Arc<Slot<T>>);

/// A hand-off of exactly one value.
pub fn oneshot<T>() -> (Promise<T>, Answer<T>) {
    let slot = Arc::new(Slot {
        state: Mutex::new(SlotState::Pending),
        ready: Condvar::new(),
        waker: Mutex::new(None),
    });
    (Promise(Some(slot.clone())), Answer(slot))
}

impl<T> Promise<T> {
    fn fill(&mut self, value: Option<T>) {
        if let Some(slot) = self.0.take() {
            let mut st = lock(&slot.state);
            if !matches!(*st, SlotState::Cancelled) {
                *st = SlotState::Done(value);
            }
            drop(st);
            slot.ready.notify_all();
            if let Some(w) = lock(&slot.waker).take() {
                w.wake();
            }
        }
    }

    pub fn send(mut self, value: T) {
        self.fill(Some(value));
    }

    /// The producer starts on this job: from now on the waiter waits for its outcome.
    /// False when the waiter already gave up (the job must not run).
    pub fn claim(&self) -> bool {
        let Some(slot) = &self.0 else {
            return false;
        };
        let mut st = lock(&slot.state);
        match *st {
            SlotState::Pending => {
                *st = SlotState::Claimed;
                true
            }
            SlotState::Claimed => true,
            SlotState::Cancelled | SlotState::Done(_) => false,
        }
    }
}

impl<T> Drop for Promise<T> {
    /// A sender that goes away unanswered (a task cancelled at shutdown) must not leave
    /// its waiter blocked for good.
    fn drop(&mut self) {
        self.fill(None);
    }
}

/// How [`Answer::wait_until`] ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Waited<T> {
    Value(T),
    /// The sender went away without answering.
    Dropped,
    /// The deadline passed before the producer started; the job will not run.
    GaveUp,
}

impl<T> Answer<T> {
    /// The value, or `None` when the sender went away without answering.
    pub fn wait(self) -> Option<T> {
        let mut st = lock(&self.0.state);
        loop {
            if matches!(*st, SlotState::Done(_))
                && let SlotState::Done(v) = std::mem::replace(&mut *st, SlotState::Cancelled)
            {
                return v;
            }
            st = self.0.ready.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Waits for the value until `deadline`. If the producer has not started on the job
    /// by then, the job is cancelled ([`Waited::GaveUp`]: it will never run). If it has
    /// started, the outcome is waited for past the deadline, because a job that may
    /// already have taken effect must not be reported as failed.
    pub fn wait_until(self, deadline: std::time::Instant) -> Waited<T> {
        let mut st = lock(&self.0.state);
        loop {
            match &*st {
                SlotState::Done(_) => {
                    let SlotState::Done(v) = std::mem::replace(&mut *st, SlotState::Cancelled)
                    else {
                        unreachable!("matched Done")
                    };
                    return v.map_or(Waited::Dropped, Waited::Value);
                }
                SlotState::Pending => {
                    let now = std::time::Instant::now();
                    if now >= deadline {
                        *st = SlotState::Cancelled;
                        return Waited::GaveUp;
                    }
                    st = self
                        .0
                        .ready
                        .wait_timeout(st, deadline - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                SlotState::Claimed | SlotState::Cancelled => {
                    st = self.0.ready.wait(st).unwrap_or_else(|e| e.into_inner());
                }
            }
        }
    }
}

impl<T> Answer<T> {
    fn poll_waited(
        &self,
        cx: &mut std::task::Context<'_>,
        expired: bool,
    ) -> std::task::Poll<Waited<T>> {
        let mut st = lock(&self.0.state);
        match &*st {
            SlotState::Done(_) => {
                let SlotState::Done(v) = std::mem::replace(&mut *st, SlotState::Cancelled) else {
                    unreachable!("matched Done")
                };
                std::task::Poll::Ready(v.map_or(Waited::Dropped, Waited::Value))
            }
            SlotState::Pending if expired => {
                *st = SlotState::Cancelled;
                std::task::Poll::Ready(Waited::GaveUp)
            }
            _ => {
                *lock(&self.0.waker) = Some(cx.waker().clone());
                std::task::Poll::Pending
            }
        }
    }

    /// [`Answer::wait_until`] for a task: the same rules (an unclaimed job is cancelled
    /// at the deadline, a claimed one is waited for past it) without holding a thread.
    pub async fn wait_until_async(self, deadline: std::time::Instant) -> Waited<T> {
        let sleep = tokio::time::sleep_until(deadline.into());
        let mut sleep = std::pin::pin!(sleep);
        std::future::poll_fn(|cx| {
            let expired = sleep.as_mut().poll(cx).is_ready();
            self.poll_waited(cx, expired)
        })
        .await
    }
}

impl<T> Drop for Answer<T> {
    /// A waiter that goes away (its request was answered on a timeout, its task was
    /// dropped) cancels a job the producer has not started: it must not take effect
    /// after its request was answered without it.
    fn drop(&mut self) {
        let mut st = lock(&self.0.state);
        if matches!(*st, SlotState::Pending) {
            *st = SlotState::Cancelled;
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
    fn a_waiter_gives_up_only_before_the_job_is_claimed() {
        use std::time::{Duration, Instant};
        // Unclaimed at the deadline: cancelled, and the producer learns it must skip.
        let (p, a) = oneshot::<i32>();
        let w =
            std::thread::spawn(move || a.wait_until(Instant::now() + Duration::from_millis(20)));
        assert_eq!(w.join().unwrap(), Waited::GaveUp);
        assert!(!p.claim(), "a cancelled job was claimed");
        p.send(1);
        // Claimed before the deadline: the waiter waits for the outcome past it.
        let (p, a) = oneshot::<i32>();
        assert!(p.claim());
        let w = std::thread::spawn(move || a.wait_until(Instant::now() + Duration::from_millis(1)));
        std::thread::sleep(Duration::from_millis(30));
        p.send(7);
        assert_eq!(w.join().unwrap(), Waited::Value(7));
        let (p, a) = oneshot::<i32>();
        assert!(p.claim());
        drop(p);
        assert_eq!(a.wait_until(Instant::now()), Waited::Dropped);
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
