//! The master: holds the listening sockets, runs one worker at a time, restarts it when
//! it dies, and disables a module that keeps crashing it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::IoSliceMut;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::sys::signal::Signal;
use nix::sys::socket::{
    AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg, socketpair,
};
use tokio::signal::unix::{SignalKind, signal};
use valvula_config::Config;

use super::{CONFIG_ENV, DISABLED_ENV, LISTEN_ENV, WORKER_ENV, fd, hex};

/// How the master was started.
#[derive(Debug)]
pub struct MasterArgs {
    /// The worker's arguments: this program's own, less `--detach`.
    pub args: Vec<String>,
    pub config_path: PathBuf,
}

/// Crashes counted per module, and the modules disabled for them.
#[derive(Debug, Default)]
struct Crashes {
    limit: u32,
    window: Duration,
    seen: HashMap<String, VecDeque<Instant>>,
    /// Module name → why it is disabled (sorted, so the environment is stable).
    disabled: BTreeMap<String, String>,
}

impl Crashes {
    /// Counts a crash of `module`; true when this one disables it.
    fn count(&mut self, module: &str, what: &str) -> bool {
        let now = Instant::now();
        let q = self.seen.entry(module.to_owned()).or_default();
        while q
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.window)
        {
            q.pop_front();
        }
        q.push_back(now);
        if q.len() as u32 >= self.limit && !self.disabled.contains_key(module) {
            self.disabled.insert(
                module.to_owned(),
                format!(
                    "crashed the worker {} times within {}s (last: {what})",
                    q.len(),
                    self.window.as_secs()
                ),
            );
            return true;
        }
        false
    }
}

/// What one worker told the master.
#[derive(Debug)]
enum Message {
    Ready,
    Reloaded,
    Listeners(Vec<(String, OwnedFd)>),
    Crash {
        signal: i32,
        hook: Option<String>,
        module: Option<String>,
    },
}

fn parse(bytes: &[u8], fds: Vec<OwnedFd>) -> Option<Message> {
    let text = String::from_utf8_lossy(bytes);
    if text == "ready" {
        return Some(Message::Ready);
    }
    if text == "reloaded" {
        return Some(Message::Reloaded);
    }
    if let Some(rest) = text.strip_prefix("listeners") {
        let keys: Vec<String> = rest
            .split('\n')
            .skip(1)
            .map(str::to_owned)
            .collect::<Vec<_>>();
        if keys.len() != fds.len() {
            tracing::warn!(
                "the worker sent {} socket(s) for {} address(es); ignored",
                fds.len(),
                keys.len()
            );
            return None;
        }
        return Some(Message::Listeners(keys.into_iter().zip(fds).collect()));
    }
    if let Some(rest) = text.strip_prefix("crash ") {
        let mut it = rest.splitn(3, ' ');
        let signal = it.next()?.parse().ok()?;
        let hook = it.next().filter(|h| *h != "-").map(str::to_owned);
        let module = it.next().filter(|m| *m != "-").map(str::to_owned);
        return Some(Message::Crash {
            signal,
            hook,
            module,
        });
    }
    None
}

/// One packet from the worker: `WouldBlock` when none is waiting, `None` for one that
/// means nothing.
fn try_recv(ctl: RawFd) -> std::io::Result<Option<Message>> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut space = nix::cmsg_space!([RawFd; 253]);
    let (n, fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            ctl,
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
        )?;
        let mut fds = Vec::new();
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(v) = c {
                    fds.extend(v.into_iter().map(fd::received));
                }
            }
        }
        (msg.bytes, fds)
    };
    Ok(parse(&buf[..n], fds))
}

fn signal_name(sig: i32) -> String {
    Signal::try_from(sig).map_or_else(|_| format!("signal {sig}"), |s| s.as_str().to_owned())
}

fn inheritable(f: &impl AsFd) -> std::io::Result<()> {
    fcntl(f.as_fd().as_raw_fd(), FcntlArg::F_SETFD(FdFlag::empty()))?;
    Ok(())
}

/// The master's state across workers.
struct Master {
    args: MasterArgs,
    grace: Duration,
    /// The listening sockets, by configured address.
    held: Vec<(String, OwnedFd)>,
    /// The master's end of the link (a SOCK_SEQPACKET socket; tokio's datagram type
    /// only waits for readiness, every read is a recvmsg).
    ctl: tokio::net::UnixDatagram,
    /// The worker's end of the link, inherited by every worker.
    theirs: OwnedFd,
    crashes: Crashes,
    /// Whether any worker became ready (before that, a dying worker is a failed start).
    ready_once: bool,
    /// Whether the running worker became ready.
    worker_ready: bool,
    /// A SIGHUP that came before the worker was ready: passed on once it is (it may
    /// have read the configuration before the edit the SIGHUP announces).
    pending_hup: Option<i32>,
    restarts: u64,
    /// The last crash packet of the running worker.
    crash: Option<(i32, Option<String>, Option<String>)>,
    /// The configuration file as the running worker read it (at its start or its last
    /// reload): a worker started after a crash runs this, not whatever the file says
    /// now (an edit waiting for SIGHUP, or a broken file, would take every listener
    /// down with it).
    last_good: Option<String>,
}

impl Master {
    fn spawn(&self) -> anyhow::Result<tokio::process::Child> {
        let exe = std::env::current_exe().context("cannot find this program")?;
        // Unlinked already: gone with the last descriptor.
        let config = match &self.last_good {
            Some(text) => {
                use std::io::{Seek, Write};
                let mut f = tempfile::tempfile().context("a file for the configuration")?;
                f.write_all(text.as_bytes())
                    .and_then(|()| f.rewind())
                    .context("a file for the configuration")?;
                inheritable(&f).context("the configuration file")?;
                Some(f)
            }
            None => None,
        };
        inheritable(&self.theirs).context("the worker link")?;
        let mut listen = Vec::new();
        for (key, f) in &self.held {
            inheritable(f).context("a listening socket")?;
            listen.push(format!("{} {}", f.as_raw_fd(), hex(key)));
        }
        let disabled: Vec<String> = self
            .crashes
            .disabled
            .iter()
            .map(|(n, why)| format!("{}:{}", hex(n), hex(why)))
            .collect();
        let child = tokio::process::Command::new(exe)
            .args(self.args.args.iter().skip(1))
            .env(
                WORKER_ENV,
                format!(
                    "{} {} {}",
                    self.theirs.as_raw_fd(),
                    std::process::id(),
                    self.restarts
                ),
            )
            .env(LISTEN_ENV, listen.join(";"))
            .env(DISABLED_ENV, disabled.join(";"))
            .env(
                CONFIG_ENV,
                config
                    .as_ref()
                    .map(|f| f.as_raw_fd().to_string())
                    .unwrap_or_default(),
            )
            // Readiness is the master's to tell.
            .env_remove("NOTIFY_SOCKET")
            .stdin(std::process::Stdio::null())
            .spawn()
            .context("cannot start the worker")?;
        Ok(child)
    }

    fn on_message(&mut self, m: Message) {
        match m {
            Message::Ready => {
                self.worker_ready = true;
                if self.last_good.is_none() {
                    self.last_good = std::fs::read_to_string(&self.args.config_path).ok();
                }
                if let Some(pid) = self.pending_hup.take() {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGHUP);
                }
                if !self.ready_once {
                    self.ready_once = true;
                    crate::process::notify_ready();
                }
                tracing::info!(restarts = self.restarts, "worker ready");
            }
            Message::Reloaded => {
                if !self.crashes.disabled.is_empty() {
                    tracing::info!(
                        modules = ?self.crashes.disabled.keys().collect::<Vec<_>>(),
                        "reloaded: modules disabled for crashing are enabled again"
                    );
                }
                self.crashes.disabled.clear();
                self.crashes.seen.clear();
                self.last_good = std::fs::read_to_string(&self.args.config_path).ok();
                if let Some(Ok(l)) = self
                    .last_good
                    .as_deref()
                    .map(|t| valvula_config::load_text(t, &self.args.config_path))
                {
                    self.crashes.limit = l.config.server.crash_limit;
                    self.crashes.window = l.config.server.crash_window;
                    self.grace = l.config.server.shutdown_grace;
                }
            }
            Message::Listeners(v) => self.held = v,
            Message::Crash {
                signal,
                hook,
                module,
            } => self.crash = Some((signal, hook, module)),
        }
    }

    /// Reads every waiting packet. Through tokio's `try_io`, so that the EAGAIN which
    /// ends it also clears the readiness `readable()` waited for.
    fn drain(&mut self) {
        let fd = self.ctl.as_raw_fd();
        loop {
            match self
                .ctl
                .try_io(tokio::io::Interest::READABLE, || try_recv(fd))
            {
                Ok(Some(m)) => self.on_message(m),
                Ok(None) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    // tokio may not have seen readiness yet (after the worker's exit):
                    // ask the socket itself once more.
                    match try_recv(fd) {
                        Ok(Some(m)) => self.on_message(m),
                        Ok(None) => {}
                        Err(_) => return,
                    }
                }
                Err(e) => {
                    tracing::warn!("worker link: {e}");
                    return;
                }
            }
        }
    }

    /// Stops the worker: SIGTERM, then SIGKILL if it is still there well after its
    /// grace period.
    async fn stop(&mut self, child: &mut tokio::process::Child) {
        if let Some(pid) = child.id() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
        // Stopping: new clients are refused at once (Postfix tries its next server or
        // its default action) instead of waiting in a queue nobody will read.
        self.held.clear();
        let wait = self.grace + Duration::from_secs(5);
        match tokio::time::timeout(wait, child.wait()).await {
            Err(_) => {
                tracing::error!(
                    seconds = wait.as_secs(),
                    "the worker did not stop in time; killing it"
                );
                let _ = child.kill().await;
            }
            Ok(Ok(status)) => {
                use std::os::unix::process::ExitStatusExt;
                if let Some(sig) = status.signal() {
                    self.drain();
                    let module = match self.crash.take() {
                        Some((_, Some(hook), Some(module))) => {
                            format!(" in module {module} ({hook})")
                        }
                        _ => String::new(),
                    };
                    tracing::error!(
                        "the worker died of {}{module} while stopping",
                        signal_name(sig)
                    );
                }
            }
            Ok(Err(e)) => tracing::warn!("waiting for the worker: {e}"),
        }
    }
}

/// Runs the master until SIGTERM or SIGINT (or a worker that stops by itself).
/// `held`: the listening sockets of `config`, bound, by [`super::listen_key`].
pub async fn run(
    args: MasterArgs,
    config: &Config,
    held: Vec<(String, OwnedFd)>,
) -> anyhow::Result<()> {
    let (mine, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .context("cannot create the worker link")?;
    let mine = std::os::unix::net::UnixDatagram::from(mine);
    mine.set_nonblocking(true).context("the worker link")?;
    let mut m = Master {
        args,
        grace: config.server.shutdown_grace,
        held,
        ctl: tokio::net::UnixDatagram::from_std(mine).context("the worker link")?,
        theirs,
        crashes: Crashes {
            limit: config.server.crash_limit,
            window: config.server.crash_window,
            ..Crashes::default()
        },
        ready_once: false,
        worker_ready: false,
        last_good: None,
        pending_hup: None,
        restarts: 0,
        crash: None,
    };
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    // Workers that died before they were ready, in a row: their restarts are spaced.
    let mut failed_starts = 0u32;
    // Every worker death of the last minute: a worker that keeps dying for a reason no
    // module is named for (a crash in a library, the OOM killer) is restarted less and
    // less often too.
    let mut deaths: VecDeque<Instant> = VecDeque::new();
    loop {
        m.crash = None;
        m.worker_ready = false;
        m.pending_hup = None;
        let mut child = m.spawn()?;
        let pid = child.id().unwrap_or(0);
        tracing::debug!(pid, restarts = m.restarts, "worker started");
        let status = loop {
            tokio::select! {
                s = child.wait() => break s.context("waiting for the worker")?,
                _ = m.ctl.readable() => m.drain(),
                _ = term.recv() => { m.stop(&mut child).await; return Ok(()); }
                _ = int.recv() => { m.stop(&mut child).await; return Ok(()); }
                _ = hup.recv() => {
                    if m.worker_ready {
                        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGHUP);
                    } else {
                        m.pending_hup = Some(pid as i32);
                    }
                }
            }
        };
        m.drain();
        use std::os::unix::process::ExitStatusExt;
        if !m.ready_once && status.signal().is_none() {
            // The first worker refused to start (a configuration it cannot use): it
            // said why on stderr or in the log. A crash (a module's init) is restarted
            // below instead, until that module is disabled.
            anyhow::bail!("the worker did not start ({status})");
        }
        let crash = m.crash.take();
        match (status.signal(), status.code()) {
            (None, Some(0)) => {
                // Stopped on purpose (a signal sent to it directly): so does the service.
                tracing::info!(pid, "the worker stopped; valvulad stops");
                return Ok(());
            }
            (Some(sig), _) => match crash {
                Some((_, Some(hook), Some(module))) => {
                    tracing::error!(
                        pid,
                        signal = %signal_name(sig),
                        module = %module,
                        hook = %hook,
                        "the worker died of {} in module {module} ({hook}); restarting it, the listening sockets stay open",
                        signal_name(sig)
                    );
                    let what = format!("{} in {hook}", signal_name(sig));
                    if m.crashes.count(&module, &what) {
                        tracing::error!(
                            module = %module,
                            limit = m.crashes.limit,
                            window_s = m.crashes.window.as_secs(),
                            "module {module} disabled: it {}; its requests get the listener's on-error action until the next reload",
                            m.crashes.disabled[&module]
                        );
                    }
                }
                Some(_) => tracing::error!(
                    pid,
                    signal = %signal_name(sig),
                    "the worker died of {} outside any module call; restarting it",
                    signal_name(sig)
                ),
                None => tracing::error!(
                    pid,
                    signal = %signal_name(sig),
                    "the worker was killed by {} (no module call recorded it: sent from outside, e.g. the OOM killer); restarting it",
                    signal_name(sig)
                ),
            },
            (None, code) => tracing::error!(
                pid,
                code = code.unwrap_or(-1),
                "the worker exited with status {}; restarting it",
                code.unwrap_or(-1)
            ),
        }
        m.restarts += 1;
        // A worker that dies before it is ready again and again (a module crashing in
        // init before it reaches the crash limit, a database refusing the schema)
        // is restarted less and less often, up to every 10 s.
        if m.worker_ready {
            failed_starts = 0;
        } else {
            failed_starts += 1;
        }
        if failed_starts >= 3 && !m.held.is_empty() {
            // No worker can start (a database refusing it, a module's init failing):
            // with the sockets held, Postfix would wait in their queues for its policy
            // timeout on every message. Closed, it is refused at once and falls back to
            // its default action; the next worker that starts binds them again.
            tracing::error!(
                failed_starts,
                "no worker could start {failed_starts} times in a row: the listening sockets are closed until one does"
            );
            m.held.clear();
        }
        let now = Instant::now();
        deaths.push_back(now);
        while deaths
            .front()
            .is_some_and(|t| now.duration_since(*t) > Duration::from_secs(60))
        {
            deaths.pop_front();
        }
        if deaths.len() >= 5 && failed_starts <= 1 {
            let pause = Duration::from_millis(250u64 << (deaths.len() - 5).min(6))
                .min(Duration::from_secs(10));
            tracing::warn!(
                deaths = deaths.len(),
                pause_ms = pause.as_millis() as u64,
                "the worker died {} times in the last minute; pausing before the next start",
                deaths.len()
            );
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = term.recv() => return Ok(()),
                _ = int.recv() => return Ok(()),
            }
        }
        if failed_starts > 1 {
            let pause =
                Duration::from_millis(100u64 << failed_starts.min(7)).min(Duration::from_secs(10));
            tracing::warn!(
                failed_starts,
                pause_ms = pause.as_millis() as u64,
                "the worker keeps dying before it is ready; pausing before the next start"
            );
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = term.recv() => return Ok(()),
                _ = int.recv() => return Ok(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_packets_parse() {
        let m = parse(b"crash 11 process mod-crash", vec![]);
        assert!(
            matches!(&m, Some(Message::Crash { signal: 11, hook: Some(h), module: Some(n) })
                if h == "process" && n == "mod-crash"),
            "{m:?}"
        );
        let m = parse(b"crash 6 - -", vec![]);
        assert!(
            matches!(
                m,
                Some(Message::Crash {
                    signal: 6,
                    hook: None,
                    module: None
                })
            ),
            "{m:?}"
        );
        assert!(matches!(parse(b"ready", vec![]), Some(Message::Ready)));
        assert!(parse(b"nonsense", vec![]).is_none());
        assert!(
            parse(b"listeners\na", vec![]).is_none(),
            "an address without its socket"
        );
    }

    #[test]
    fn a_module_is_disabled_at_the_limit_within_the_window() {
        let mut c = Crashes {
            limit: 3,
            window: Duration::from_secs(600),
            ..Crashes::default()
        };
        assert!(!c.count("m", "SIGSEGV in process"));
        assert!(!c.count("m", "SIGSEGV in process"));
        assert!(!c.count("other", "SIGSEGV in process"));
        assert!(c.count("m", "SIGSEGV in process"));
        assert!(c.disabled["m"].contains("3 times"), "{:?}", c.disabled);
        assert!(!c.count("m", "SIGSEGV in process"), "disabled once");
        let mut c = Crashes {
            limit: 2,
            window: Duration::ZERO,
            ..Crashes::default()
        };
        assert!(!c.count("m", "x"));
        std::thread::sleep(Duration::from_millis(2));
        assert!(!c.count("m", "x"), "the first crash is out of the window");
    }
}
