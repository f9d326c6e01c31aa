//! What the master learns when a module brings the worker down.
//!
//! Before each call into a module the calling thread records which module and hook it
//! enters. A fatal signal (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT) runs
//! [`on_fatal`] on the faulting thread: it sends one packet, `crash SIGNO HOOK NAME`, on
//! the master's control socket, then lets the signal kill the process as it would have.
//! Only the faulting thread's record is read, so with many calls in flight the module
//! named is the one that crashed, not merely one that was running.

use std::cell::Cell;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicI32, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The module call running on this thread: its name (borrowed from the module, which
/// outlives the call) and hook.
#[derive(Clone, Copy)]
struct Current {
    name: *const u8,
    len: usize,
    hook: &'static str,
}

const NONE: Current = Current {
    name: std::ptr::null(),
    len: 0,
    hook: "",
};

thread_local! {
    // Const-initialised and without a destructor: reading it in a signal handler
    // neither allocates nor registers anything.
    static CURRENT: Cell<Current> = const { Cell::new(NONE) };
}

/// The control socket the crash packet goes to (-1: none, a process without a master).
static CRASH_FD: AtomicI32 = AtomicI32::new(-1);

/// Where each loaded module's code is mapped: a crash on a thread that is in no module
/// call (a thread the module started itself) is blamed on the module whose code the
/// faulting instruction is in. Filled at load, read lock-free by the signal handler.
struct Range {
    start: AtomicUsize,
    end: AtomicUsize,
    name: AtomicPtr<u8>,
    /// Written last: a slot is complete once this is not 0.
    len: AtomicUsize,
}

const RANGES_MAX: usize = 512;
static RANGES: [Range; RANGES_MAX] = [const {
    Range {
        start: AtomicUsize::new(0),
        end: AtomicUsize::new(0),
        name: AtomicPtr::new(std::ptr::null_mut()),
        len: AtomicUsize::new(0),
    }
}; RANGES_MAX];
static RANGES_USED: AtomicUsize = AtomicUsize::new(0);

/// Records where the module `name`, loaded from the file `(dev, ino)`, has its code
/// (its executable mappings in /proc/self/maps).
pub fn register_module(name: &str, dev: u64, ino: u64) {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return;
    };
    let (major, minor) = (
        libc::major(dev as libc::dev_t),
        libc::minor(dev as libc::dev_t),
    );
    // Leaked once per module load: the handler may read it at any time.
    let name: &'static str = Box::leak(name.to_owned().into_boxed_str());
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms), Some(_), Some(devs), Some(inode)) =
            (f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        let same_dev = devs.split_once(':').is_some_and(|(a, b)| {
            u32::from_str_radix(a, 16).ok() == Some(major)
                && u32::from_str_radix(b, 16).ok() == Some(minor)
        });
        if !perms.contains('x') || !same_dev || inode.parse::<u64>().ok() != Some(ino) {
            continue;
        }
        let Some((s, e)) = range.split_once('-') else {
            continue;
        };
        let (Ok(s), Ok(e)) = (usize::from_str_radix(s, 16), usize::from_str_radix(e, 16)) else {
            continue;
        };
        let i = RANGES_USED.fetch_add(1, Ordering::AcqRel);
        let Some(slot) = RANGES.get(i) else {
            return;
        };
        slot.start.store(s, Ordering::Relaxed);
        slot.end.store(e, Ordering::Relaxed);
        slot.name.store(name.as_ptr().cast_mut(), Ordering::Relaxed);
        slot.len.store(name.len(), Ordering::Release);
    }
}

/// The module whose code holds address `pc`, if any (async-signal-safe).
fn module_at(pc: usize) -> Option<(*const u8, usize)> {
    let n = RANGES_USED.load(Ordering::Acquire).min(RANGES_MAX);
    RANGES[..n].iter().find_map(|r| {
        let len = r.len.load(Ordering::Acquire);
        (len != 0 && r.start.load(Ordering::Relaxed) <= pc && pc < r.end.load(Ordering::Relaxed))
            .then(|| (r.name.load(Ordering::Relaxed).cast_const(), len))
    })
}

/// The address of the faulting instruction, from the signal's context.
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
fn faulting_pc(ctx: *mut libc::c_void) -> usize {
    if ctx.is_null() {
        return 0;
    }
    // SAFETY: with SA_SIGINFO the kernel passes a valid ucontext_t as the third
    // argument; only the saved instruction pointer is read.
    unsafe { (*ctx.cast::<libc::ucontext_t>()).uc_mcontext.gregs[libc::REG_RIP as usize] as usize }
}

#[cfg(all(target_os = "linux", target_arch = "aarch64"))]
fn faulting_pc(ctx: *mut libc::c_void) -> usize {
    if ctx.is_null() {
        return 0;
    }
    // SAFETY: with SA_SIGINFO the kernel passes a valid ucontext_t as the third
    // argument; only the saved program counter is read.
    unsafe { (*ctx.cast::<libc::ucontext_t>()).uc_mcontext.pc as usize }
}

#[cfg(not(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
)))]
fn faulting_pc(_ctx: *mut libc::c_void) -> usize {
    0
}

/// Polls in progress, one slot per event-loop thread that ever polled: the thread, the
/// module, and since when (milliseconds after [`epoch`], 0: none). A poll runs on an
/// event-loop thread, where no timeout can stop it: the watchdog reads these.
const POLL_SLOTS: usize = 256;
struct PollSlot {
    thread: AtomicUsize,
    since_ms: AtomicU64,
    name: AtomicPtr<u8>,
    len: AtomicUsize,
}
static POLLS: [PollSlot; POLL_SLOTS] = [const {
    PollSlot {
        thread: AtomicUsize::new(0),
        since_ms: AtomicU64::new(0),
        name: AtomicPtr::new(std::ptr::null_mut()),
        len: AtomicUsize::new(0),
    }
}; POLL_SLOTS];
static POLL_SLOTS_USED: AtomicUsize = AtomicUsize::new(0);
thread_local! {
    static POLL_SLOT: Cell<usize> = const { Cell::new(usize::MAX) };
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    // At least 1: 0 means "no poll".
    epoch().elapsed().as_millis() as u64 + 1
}

/// This thread's poll slot, taken the first time it polls.
fn poll_slot() -> Option<&'static PollSlot> {
    let mut i = POLL_SLOT.with(Cell::get);
    if i == usize::MAX {
        i = POLL_SLOTS_USED.fetch_add(1, Ordering::AcqRel);
        POLL_SLOT.with(|c| c.set(i));
        if let Some(s) = POLLS.get(i) {
            // SAFETY: pthread_self has no preconditions.
            s.thread
                .store(unsafe { libc::pthread_self() } as usize, Ordering::Release);
        }
    }
    POLLS.get(i)
}

/// The module polls that have run longer than `limit`: (thread, module name).
pub fn stuck_polls(limit: Duration) -> Vec<(usize, String)> {
    let now = now_ms();
    let n = POLL_SLOTS_USED.load(Ordering::Acquire).min(POLL_SLOTS);
    POLLS[..n]
        .iter()
        .filter_map(|s| {
            let since = s.since_ms.load(Ordering::Acquire);
            if since == 0 || now.saturating_sub(since) <= limit.as_millis() as u64 {
                return None;
            }
            let (ptr, len) = (
                s.name.load(Ordering::Acquire),
                s.len.load(Ordering::Acquire),
            );
            // SAFETY: a module's name leaked by the loader (`'static`), stored with its
            // length before `since_ms` was set.
            let name = unsafe { std::slice::from_raw_parts(ptr.cast_const(), len) };
            Some((
                s.thread.load(Ordering::Acquire),
                String::from_utf8_lossy(name).into_owned(),
            ))
        })
        .collect()
}

/// Ends the worker the way a crash in that poll would: SIGABRT on the polling thread,
/// whose crash record names the module, so the master counts it against the module.
pub fn abort_thread(thread: usize) {
    // SAFETY: `thread` is a live event-loop thread's pthread_t (those threads run until
    // the process ends), and SIGABRT's handler is the crash reporter.
    unsafe {
        libc::pthread_kill(thread as libc::pthread_t, libc::SIGABRT);
    }
}

/// [`running`] for a `process_poll` call, also timed for the watchdog, which can see
/// it from another thread: returns what `f` returned and how long it ran.
pub fn polling<R>(name: &'static str, f: impl FnOnce() -> R) -> (R, Duration) {
    let slot = poll_slot();
    let since = now_ms();
    if let Some(s) = slot {
        s.name.store(name.as_ptr().cast_mut(), Ordering::Relaxed);
        s.len.store(name.len(), Ordering::Relaxed);
        s.since_ms.store(since, Ordering::Release);
    }
    // Cleared even when `f` unwinds.
    struct Done(Option<&'static PollSlot>);
    impl Drop for Done {
        fn drop(&mut self) {
            if let Some(s) = self.0 {
                s.since_ms.store(0, Ordering::Release);
            }
        }
    }
    let done = Done(slot);
    let r = running(name, "process_poll", f);
    drop(done);
    (r, Duration::from_millis(now_ms() - since))
}

/// Runs `f`, a call into module `name`'s `hook`, recorded as this thread's current
/// module call.
pub fn running<R>(name: &str, hook: &'static str, f: impl FnOnce() -> R) -> R {
    let before = CURRENT.with(|c| {
        c.replace(Current {
            name: name.as_ptr(),
            len: name.len(),
            hook,
        })
    });
    // Restored even when `f` unwinds (a Rust module's panic is caught further out).
    struct Restore(Current);
    impl Drop for Restore {
        fn drop(&mut self) {
            CURRENT.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(before);
    f()
}

/// The hook of the module call running on this thread ("" outside any).
pub fn current_hook() -> &'static str {
    CURRENT.with(Cell::get).hook
}

const FATAL: [libc::c_int; 5] = [
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGILL,
    libc::SIGFPE,
    libc::SIGABRT,
];

/// Installs the fatal-signal handlers, reporting to `fd` (the worker's end of the
/// master's control socket, kept open for the life of the process).
pub fn install(fd: std::os::fd::RawFd) {
    CRASH_FD.store(fd, Ordering::Release);
    for sig in FATAL {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value, filled in
        // before use; `on_fatal` only does async-signal-safe work (see there).
        // SA_ONSTACK: std gives its threads an alternate signal stack, so a stack
        // overflow in a module still reaches the handler. SA_RESETHAND: a second fault
        // while reporting kills the process at once.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_fatal
                as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void)
                as usize;
            act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_RESETHAND;
            libc::sigemptyset(&mut act.sa_mask);
            if libc::sigaction(sig, &act, std::ptr::null_mut()) != 0 {
                tracing::warn!(
                    signal = sig,
                    "cannot install the crash reporter: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

/// Appends `b` to `buf` at `*n`, as much as fits.
fn put(buf: &mut [u8], n: &mut usize, b: &[u8]) {
    let k = b.len().min(buf.len() - *n);
    buf[*n..*n + k].copy_from_slice(&b[..k]);
    *n += k;
}

/// The packet for a crash by `sig` during `cur`: `crash SIGNO HOOK NAME` (`- -` outside
/// any module call). Formatted by hand: no allocation in a signal handler.
fn packet(buf: &mut [u8; 320], sig: libc::c_int, cur: Current, name: &[u8]) -> usize {
    let mut n = 0;
    put(buf, &mut n, b"crash ");
    let mut digits = [0u8; 12];
    let mut d = digits.len();
    let mut v = sig.unsigned_abs();
    loop {
        d -= 1;
        digits[d] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    put(buf, &mut n, &digits[d..]);
    if cur.len == 0 {
        put(buf, &mut n, b" - -");
    } else {
        put(buf, &mut n, b" ");
        put(buf, &mut n, cur.hook.as_bytes());
        put(buf, &mut n, b" ");
        put(buf, &mut n, &name[..name.len().min(256)]);
    }
    n
}

/// Async-signal-safe: reads a thread-local `Cell` and atomics, formats into a stack
/// buffer, and calls write(2), signal(2) and raise(3) only.
extern "C" fn on_fatal(sig: libc::c_int, _info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let fd = CRASH_FD.load(Ordering::Acquire);
    if fd >= 0 {
        let mut cur = CURRENT.try_with(Cell::get).unwrap_or(NONE);
        if cur.len == 0
            && let Some((name, len)) = module_at(faulting_pc(ctx))
        {
            // Not in a module call, but in a module's code: a thread it started.
            cur = Current {
                name,
                len,
                hook: "thread",
            };
        }
        let name: &[u8] = if cur.len == 0 {
            &[]
        } else {
            // SAFETY: `running` stored a pointer and length of a name that outlives
            // the call this thread is in (the module owns it), and we are in that call.
            unsafe { std::slice::from_raw_parts(cur.name, cur.len) }
        };
        let mut buf = [0u8; 320];
        let n = packet(&mut buf, sig, cur, name);
        // SAFETY: write(2) of an initialised stack buffer to a descriptor we own; one
        // call, so one packet on the SOCK_SEQPACKET socket.
        unsafe {
            libc::write(fd, buf.as_ptr().cast(), n);
        }
    }
    // SAFETY: restoring the default action and raising the signal again are both
    // async-signal-safe; the process then ends by this signal, as without the handler
    // (its status tells the master which one).
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_name_signal_hook_and_module() {
        let mut buf = [0u8; 320];
        let name = "mod-crash";
        let cur = Current {
            name: name.as_ptr(),
            len: name.len(),
            hook: "process",
        };
        let n = packet(&mut buf, 11, cur, name.as_bytes());
        assert_eq!(&buf[..n], b"crash 11 process mod-crash");
        let n = packet(&mut buf, 6, NONE, &[]);
        assert_eq!(&buf[..n], b"crash 6 - -");
        let long = "m".repeat(400);
        let n = packet(&mut buf, 7, cur, long.as_bytes());
        assert_eq!(
            n,
            "crash 7 process ".len() + 256,
            "names are cut at 256 bytes"
        );
    }

    #[test]
    fn the_record_is_restored_after_a_call_even_one_that_panics() {
        let seen = running("outer", "process", || {
            let _ = std::panic::catch_unwind(|| running("inner", "tick", || panic!("x")));
            CURRENT.with(Cell::get).hook
        });
        assert_eq!(seen, "process");
        assert_eq!(CURRENT.with(Cell::get).len, 0);
    }
}
