//! Descriptors a worker inherits from its master through exec, by number.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Takes inherited descriptor `raw` into ownership, if it is open. Callers take each
/// number once (the worker reads its environment once, into a `OnceLock`).
pub(super) fn adopt(raw: RawFd) -> Option<OwnedFd> {
    if raw < 3 {
        return None;
    }
    // F_GETFD fails with EBADF for a number that is not open: nothing to adopt.
    // SAFETY: fcntl(F_GETFD) only reads the descriptor's flags.
    if unsafe { libc::fcntl(raw, libc::F_GETFD) } < 0 {
        return None;
    }
    // SAFETY: the master put this open descriptor at this number for this process
    // alone (checked open above), nothing else in the worker knows its number, and it
    // is adopted once, so the OwnedFd is its only owner.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // Inherited without close-on-exec (that is how it got here): set it again, or every
    // program a module starts (a notify_command) would hold the listening sockets and
    // the master's link open after valvulad is gone.
    if let Err(e) = nix::fcntl::fcntl(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    ) {
        tracing::warn!("cannot set close-on-exec on an inherited descriptor: {e}");
    }
    Some(fd)
}

/// Received with a message (SCM_RIGHTS): new descriptors this process now holds.
pub(super) fn received(raw: RawFd) -> OwnedFd {
    // SAFETY: the kernel installed this descriptor in our table for this message; no
    // other code has its number.
    unsafe { OwnedFd::from_raw_fd(raw) }
}
