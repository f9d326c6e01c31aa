//! The daemon as a process: pid file, detaching, systemd readiness, and valvula's
//! `-p` (ping every listener) and `-b` (check the database).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};

use valvula_config::{Config, ListenAddr};

/// Default pid file of a detached daemon (valvula's is /var/run/valvulad.pid; /var/run
/// is a link to /run on current systems).
pub const DEFAULT_PID_FILE: &str = "/run/valvulad.pid";

/// Set in the environment of the child a `--detach` parent starts.
pub const DETACHED_ENV: &str = "VALVULAD_DETACHED";

/// A pid file this process owns; removed when dropped.
#[derive(Debug)]
pub struct PidFile(PathBuf);

fn alive(pid: i32) -> bool {
    pid > 0 && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

impl PidFile {
    /// Writes this process's pid. An existing file naming a live process refuses the
    /// start unless `force` (valvula's -f); one naming a dead process is stale and
    /// replaced.
    pub fn create(path: &Path, force: bool) -> anyhow::Result<PidFile> {
        if let Ok(text) = std::fs::read_to_string(path) {
            let pid: i32 = text.trim().parse().unwrap_or(0);
            if alive(pid) && pid != std::process::id() as i32 && !force {
                bail!(
                    "{} says valvulad is running as pid {pid}; stop it first, or start with -f to ignore the file",
                    path.display()
                );
            }
            tracing::warn!(pid_file = %path.display(), old_pid = pid, "replacing a pid file left behind");
        }
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).ok();
        }
        let tmp = path.with_extension("pid.tmp");
        std::fs::write(&tmp, format!("{}\n", std::process::id()))
            .and_then(|()| std::fs::rename(&tmp, path))
            .with_context(|| format!("cannot write the pid file {}", path.display()))?;
        Ok(PidFile(path.to_owned()))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        // Only our own: a -f start may have replaced it.
        let mine = std::fs::read_to_string(&self.0)
            .is_ok_and(|t| t.trim() == std::process::id().to_string());
        if mine && let Err(e) = std::fs::remove_file(&self.0) {
            tracing::warn!(pid_file = %self.0.display(), "cannot remove the pid file: {e}");
        }
    }
}

/// `--detach`: starts this program again in a new session with the same arguments
/// (less `--detach`), waits until it is serving, and returns its pid. The child's
/// failure to start is reported with what it printed.
pub fn detach(args: &[String]) -> anyhow::Result<u32> {
    let exe = std::env::current_exe().context("cannot find this program")?;
    let rest: Vec<&String> = args
        .iter()
        .skip(1)
        .filter(|a| a.as_str() != "--detach")
        .collect();
    let mut child = std::process::Command::new(exe)
        .args(rest)
        .env(DETACHED_ENV, "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("cannot start the daemon")?;
    let mut out = child.stdout.take().expect("piped");
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        let n = out.read(&mut buf).unwrap_or(0);
        if n == 0 {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            let status = child.wait()?;
            bail!("the daemon did not start ({status}):\n{}", err.trim_end());
        }
        seen.extend_from_slice(&buf[..n]);
        if seen.windows(6).any(|w| w == b"READY\n") {
            return Ok(child.id());
        }
    }
}

/// In a detached child: a session of its own, away from the terminal.
/// Raises the soft limit on open files to the hard limit: every Postfix smtpd process
/// holds a connection, and the usual soft limit of 1024 is far below a busy server's
/// (10,000 connections are tested). Returns the limit now in force.
pub fn raise_open_files() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                tracing::warn!("cannot raise the open-files limit from {soft} to {hard}: {e}");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(_) => 0,
    }
}

pub fn become_detached() {
    let _ = nix::unistd::setsid();
}

/// A detached process, once its `--detach` parent has what it waited for: stdout and
/// stderr (pipes to that parent, which has exited) go to /dev/null. Writing to them
/// would fail with EPIPE, and a log line that cannot be written panics the logger.
pub fn quiet_after_detach() {
    if std::env::var_os(DETACHED_ENV).is_none() {
        return;
    }
    use std::os::fd::AsRawFd;
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        let _ = std::io::Write::flush(&mut std::io::stdout());
        for fd in [1, 2] {
            let _ = nix::unistd::dup2(null.as_raw_fd(), fd);
        }
    }
}

/// Tells a `--detach` parent (through stdout) and systemd (`NOTIFY_SOCKET`) that the
/// daemon is serving.
pub fn notify_ready() {
    if std::env::var_os(DETACHED_ENV).is_some() {
        let mut o = std::io::stdout();
        let _ = o.write_all(b"READY\n");
        let _ = o.flush();
        quiet_after_detach();
    }
    if let Some(sock) = std::env::var_os("NOTIFY_SOCKET") {
        let s = sock.to_string_lossy();
        let d = std::os::unix::net::UnixDatagram::unbound();
        let msg = format!("READY=1\nMAINPID={}\n", std::process::id());
        if let Ok(d) = d {
            // An abstract socket name starts with '@'.
            let r = if let Some(name) = s.strip_prefix('@') {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
                    .and_then(|a| d.send_to_addr(msg.as_bytes(), &a))
            } else {
                d.send_to(msg.as_bytes(), s.as_ref())
            };
            if let Err(e) = r {
                tracing::warn!("cannot notify systemd: {e}");
            }
        }
    }
}

/// valvula's `-p`: every listener must answer `checkserver` with "I'm running right".
pub fn ping(config: &Config) -> Result<(), String> {
    for l in &config.listeners {
        let answer = match &l.address {
            ListenAddr::Tcp(a) => {
                let host = if a.ip().is_unspecified() {
                    "127.0.0.1".parse().unwrap()
                } else {
                    a.ip()
                };
                std::net::TcpStream::connect_timeout(
                    &std::net::SocketAddr::new(host, a.port()),
                    Duration::from_secs(10),
                )
                .map_err(|e| e.to_string())
                .and_then(|s| probe(s).map_err(|e| e.to_string()))
            }
            ListenAddr::Unix(p) => std::os::unix::net::UnixStream::connect(p)
                .map_err(|e| e.to_string())
                .and_then(|s| probe(s).map_err(|e| e.to_string())),
        };
        match answer {
            Ok(a) if a.as_bytes() == valvula_policy::CHECKSERVER_REPLY => {
                println!("{} working right!", l.address)
            }
            Ok(a) => return Err(format!("ERROR: {} answered {a:?}", l.address)),
            Err(e) => return Err(format!("ERROR: {} is not working: {e}", l.address)),
        }
    }
    println!("Valvula server working OK");
    Ok(())
}

fn probe<S: Read + Write + SocketTimeouts>(mut s: S) -> std::io::Result<String> {
    s.timeouts(Duration::from_secs(10))?;
    s.write_all(b"checkserver\n")?;
    let mut got = Vec::new();
    s.read_to_end(&mut got)?;
    Ok(String::from_utf8_lossy(&got).into_owned())
}

trait SocketTimeouts {
    fn timeouts(&self, d: Duration) -> std::io::Result<()>;
}

impl SocketTimeouts for std::net::TcpStream {
    fn timeouts(&self, d: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(d))?;
        self.set_write_timeout(Some(d))
    }
}

impl SocketTimeouts for std::os::unix::net::UnixStream {
    fn timeouts(&self, d: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(d))?;
        self.set_write_timeout(Some(d))
    }
}

/// What valvula's `-l` found.
#[derive(Debug, PartialEq, Eq)]
pub enum Local {
    Address,
    Domain,
    No,
}

fn postconf(dir: &Path, params: &[&str]) -> anyhow::Result<Vec<String>> {
    let o = std::process::Command::new("postconf")
        .arg("-c")
        .arg(dir)
        .args(["-h", "-x"])
        .args(params)
        .output()
        .context("cannot run postconf (is Postfix installed?)")?;
    if !o.status.success() {
        bail!("postconf: {}", String::from_utf8_lossy(&o.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(str::to_owned)
        .collect())
}

/// Whether `key` is in one of a parameter's items: a literal (compared without case)
/// or a map, asked with Postfix's own `postmap -q` (so every map type Postfix knows
/// works: hash, texthash, mysql, ldap...).
fn listed(dir: &Path, value: &str, key: &str) -> bool {
    value
        .split([' ', ',', '\t'])
        .filter(|i| !i.is_empty())
        .any(|item| {
            if item.contains(':') {
                std::process::Command::new("postmap")
                    .arg("-c")
                    .arg(dir)
                    .args(["-q", key, item])
                    .output()
                    .is_ok_and(|o| o.status.success() && !o.stdout.trim_ascii().is_empty())
            } else {
                item.eq_ignore_ascii_case(key)
            }
        })
}

/// valvula's `-l`: is `what` (an address or a domain) delivered here, as Postfix is
/// configured in `dir`?
pub fn local_destination(dir: &Path, what: &str) -> anyhow::Result<Local> {
    let domain = what
        .rsplit_once('@')
        .map_or(what, |(_, d)| d)
        .to_ascii_lowercase();
    let v = postconf(
        dir,
        &[
            "mydestination",
            "virtual_mailbox_domains",
            "virtual_alias_domains",
            "virtual_mailbox_maps",
            "virtual_alias_maps",
        ],
    )?;
    let get = |i: usize| v.get(i).map(String::as_str).unwrap_or("");
    if what.contains('@') && (listed(dir, get(3), what) || listed(dir, get(4), what)) {
        return Ok(Local::Address);
    }
    if (0..3).any(|i| listed(dir, get(i), &domain)) {
        return Ok(Local::Domain);
    }
    Ok(Local::No)
}
