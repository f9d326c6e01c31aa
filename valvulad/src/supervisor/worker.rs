//! The worker's side of the link to its master.

use std::collections::HashMap;
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::{Mutex, OnceLock};

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use valvula_store::sync::Unpoisoned;

use super::{CONFIG_ENV, DISABLED_ENV, LISTEN_ENV, WORKER_ENV, fd, unhex};

/// This process as a worker: its link to the master and what it inherited.
#[derive(Debug)]
pub struct Link {
    ctl: OwnedFd,
    master: i32,
    /// Workers started before this one (0: the first).
    pub restarts: u64,
    /// Listening sockets by [`super::listen_key`], until a listener takes its own.
    inherited: Mutex<HashMap<String, OwnedFd>>,
    /// Modules to start disabled, with why.
    pub disabled: HashMap<String, String>,
    /// The configuration the previous worker ran, for this worker's start (`None`: the
    /// first worker, which reads the file).
    config: Option<String>,
}

static LINK: OnceLock<Option<Link>> = OnceLock::new();

/// The link, when this process is a worker (its master set [`WORKER_ENV`]).
pub fn link() -> Option<&'static Link> {
    LINK.get_or_init(from_env).as_ref()
}

fn from_env() -> Option<Link> {
    let v = std::env::var(WORKER_ENV).ok()?;
    let mut it = v.split(' ');
    let ctl: RawFd = it.next()?.parse().ok()?;
    let master: i32 = it.next()?.parse().ok()?;
    let restarts: u64 = it.next()?.parse().ok()?;
    let ctl = fd::adopt(ctl)?;
    die_with(master);
    let mut inherited = HashMap::new();
    for entry in std::env::var(LISTEN_ENV).unwrap_or_default().split(';') {
        if let Some((n, key)) = entry.split_once(' ')
            && let (Ok(n), Some(key)) = (n.parse::<RawFd>(), unhex(key))
            && let Some(f) = fd::adopt(n)
        {
            inherited.insert(key, f);
        }
    }
    let mut disabled = HashMap::new();
    for entry in std::env::var(DISABLED_ENV).unwrap_or_default().split(';') {
        if let Some((n, why)) = entry.split_once(':')
            && let (Some(n), Some(why)) = (unhex(n), unhex(why))
        {
            disabled.insert(n, why);
        }
    }
    let config = std::env::var(CONFIG_ENV)
        .ok()
        .and_then(|n| n.parse::<RawFd>().ok())
        .and_then(fd::adopt)
        .and_then(|f| {
            use std::io::Read;
            let mut text = String::new();
            std::fs::File::from(f).read_to_string(&mut text).ok()?;
            Some(text)
        });
    crate::host::crash::install(ctl.as_raw_fd());
    Some(Link {
        config,
        ctl,
        master,
        restarts,
        inherited: Mutex::new(inherited),
        disabled,
    })
}

/// The worker never outlives its master: a master killed (SIGKILL by an operator or
/// the OOM killer) takes its worker along, as one process did before. The master may
/// have died already: then our parent is no longer it.
fn die_with(master: i32) {
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
    if nix::unistd::getppid().as_raw() != master {
        std::process::exit(1);
    }
}

impl Link {
    /// Watches the modules' polls: one that has run past `limit()` (the module timeout
    /// and a second) holds an event-loop thread nothing can take back, and the requests
    /// queued behind it on every listener. The worker is ended as by a crash in that
    /// poll, so the master starts a new one at once and counts the crash against the
    /// module. Only in a worker: a process without a master would end for good.
    pub fn spawn_poll_watchdog(&self, limit: impl Fn() -> std::time::Duration + Send + 'static) {
        let spawned = std::thread::Builder::new()
            .name("vlv-watchdog".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    let limit = limit();
                    if let Some((thread, module)) =
                        crate::host::crash::stuck_polls(limit).into_iter().next()
                    {
                        tracing::error!(
                            module = %module,
                            "process_poll of module {module} has run for over {} ms on an event-loop \
                             thread, where nothing can stop it: ending the worker as a crash in it",
                            limit.as_millis()
                        );
                        crate::host::crash::abort_thread(thread);
                        std::thread::sleep(std::time::Duration::from_secs(5));
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot start the poll watchdog: {e}");
        }
    }

    /// After a change of user: Linux clears the parent-death signal on setuid, and a
    /// worker left behind would keep the ports (its copies of the sockets) until its
    /// requests finished.
    pub fn after_privilege_drop(&self) {
        die_with(self.master);
    }

    /// The listening socket the master holds for this configured address, if any.
    pub fn take_listener(&self, key: &str) -> Option<OwnedFd> {
        self.inherited.locked().remove(key)
    }

    /// The configuration the previous worker ran: what this worker starts with (its
    /// reloads read the file).
    pub fn start_config(&self) -> Option<&str> {
        self.config.as_deref()
    }

    /// Closes the inherited sockets no listener took (the configuration changed since
    /// the master bound them); the master closes its copies once told the new set.
    pub fn drop_unclaimed(&self) {
        let left: Vec<String> = self.inherited.locked().drain().map(|(k, _)| k).collect();
        if !left.is_empty() {
            tracing::info!(
                addresses = ?left,
                "sockets the master held for listeners no longer configured are closed"
            );
        }
    }

    fn send(&self, msg: &[u8], fds: &[RawFd]) {
        let iov = [IoSlice::new(msg)];
        let cmsg = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
        if let Err(e) = sendmsg::<()>(self.ctl.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None) {
            tracing::warn!("cannot tell the master: {e}");
        }
    }

    /// Serving: the master tells systemd and a `--detach` parent.
    pub fn ready(&self) {
        self.send(b"ready", &[]);
    }

    /// A reload succeeded: the master forgets the crashes it counted.
    pub fn reloaded(&self) {
        self.send(b"reloaded", &[]);
    }

    /// The listening sockets now in use, so the next worker inherits exactly these.
    pub fn listeners(&self, socks: &[(String, BorrowedFd<'_>)]) {
        let mut msg = b"listeners".to_vec();
        for (key, _) in socks {
            msg.push(b'\n');
            msg.extend_from_slice(key.as_bytes());
        }
        let fds: Vec<RawFd> = socks.iter().map(|(_, f)| f.as_raw_fd()).collect();
        self.send(&msg, &fds);
    }

    /// Returns when the master is gone (its end of the link closed).
    pub async fn master_gone(&self) {
        let watch = self
            .ctl
            .as_fd()
            .try_clone_to_owned()
            .map(std::os::unix::net::UnixDatagram::from)
            .and_then(|d| {
                // The descriptions are shared: the link is non-blocking for the
                // worker's sends too, which only matters were its buffer ever full.
                d.set_nonblocking(true)?;
                tokio::net::UnixDatagram::from_std(d)
            });
        let Ok(watch) = watch else {
            return std::future::pending().await;
        };
        let fd = watch.as_raw_fd();
        loop {
            if watch.readable().await.is_err() {
                return std::future::pending().await;
            }
            let mut b = [0u8; 1];
            let r = watch.try_io(tokio::io::Interest::READABLE, || {
                nix::sys::socket::recv(fd, &mut b, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT)
                    .map_err(std::io::Error::from)
            });
            match r {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                // End of file: the master closed its end. The master never writes, so
                // anything else means the link is broken too.
                _ => return,
            }
        }
    }
}
