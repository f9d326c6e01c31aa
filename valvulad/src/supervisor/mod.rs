//! Master and worker, as Postfix, nginx and Dovecot run: a small master holds the
//! listening sockets and the pid file, and restarts the worker (the policy service
//! with its modules) the moment it dies, without closing a socket. Clients that
//! connect meanwhile wait in the listen queue.
//!
//! - `master`: binds, starts the worker, forwards SIGHUP and SIGTERM, learns from the
//!   worker's crash packet which module crashed, and starts a module that crashed
//!   repeatedly disabled until the next reload;
//! - `worker`: the worker's side of the link: inherited sockets, the crash reporter,
//!   readiness and reloads told to the master, and the master's death noticed;
//! - `fd`: file descriptors inherited through exec taken into ownership (the one place
//!   outside the module boundary that needs `unsafe`).
//!
//! The link is a `SOCK_SEQPACKET` socket pair: one packet per message, so the crash
//! handler's single write(2) is a whole message. Worker to master only:
//! `ready`, `reloaded`, `listeners` (their descriptors attached, their addresses one per
//! line after the word), and `crash SIGNO HOOK MODULE`.

mod fd;
pub mod master;
pub mod worker;

/// Set in the worker's environment: `CTL_FD MASTER_PID RESTARTS`.
pub const WORKER_ENV: &str = "VALVULAD_WORKER";
/// The listening sockets a worker inherits: `FD HEX(address)` entries, `;`-separated.
pub const LISTEN_ENV: &str = "VALVULAD_LISTEN_FDS";
/// Modules the worker starts disabled: `HEX(name):HEX(reason)` entries, `;`-separated.
pub const DISABLED_ENV: &str = "VALVULAD_DISABLED";
/// A descriptor holding the configuration the last worker ran (a restart is not a
/// reload: a file edited meanwhile, or broken, waits for SIGHUP).
pub const CONFIG_ENV: &str = "VALVULAD_CONFIG_FD";

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<String> {
    if s.len() % 2 != 0 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

/// The key a listening socket is known by between master and worker: the listener's
/// name and configured address (`127.0.0.1:0` stays that, whatever port it got, so the
/// name tells two such listeners apart; a listener renamed or moved by a reload gets a
/// socket of its own, as a reload gives it).
pub fn listen_key(name: &str, a: &valvula_config::ListenAddr) -> String {
    format!("{name} {a}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn hex_round_trips_any_text() {
        for s in ["", "unix:/run/a b;c:d\n", "mod-ticket", "ü"] {
            assert_eq!(super::unhex(&super::hex(s)).as_deref(), Some(s));
        }
        assert_eq!(super::unhex("0"), None);
        assert_eq!(super::unhex("zz"), None);
    }
}
