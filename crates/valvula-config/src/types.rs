//! What valvulad.toml says, once read.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use toml::Table;
use valvula_policy::Limits;
use valvula_store::StorageConfig;

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub server: ServerConfig,
    pub limits: LimitsConfig,
    pub log: LogConfig,
    pub listeners: Vec<ListenerConfig>,
    pub storage: StorageConfig,
    /// `[module.NAME]`: each module's own section, handed to it through `config_get`.
    pub module_sections: BTreeMap<String, Table>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ServerConfig {
    /// Directories searched for a module given by name.
    pub module_dirs: Vec<PathBuf>,
    /// Modules to load (names or paths), in order. `None`: the ones the chains name.
    pub modules: Option<Vec<String>>,
    pub module_timeout: Duration,
    /// Calls of one module running at once on the blocking pool.
    pub module_threads: usize,
    /// Consecutive failures (errors, panics, timeouts) that quarantine a module.
    pub quarantine_after: u32,
    pub quarantine_for: Duration,
    /// A module whose calls crash the worker process this many times within
    /// `crash_window` is started disabled (its chain slots answer `on_error`) until the
    /// next reload.
    pub crash_limit: u32,
    pub crash_window: Duration,
    /// How long a stopping daemon waits for in-flight requests.
    pub shutdown_grace: Duration,
    /// The admin socket `valvula-ctl` talks to (`None`: none).
    pub admin_socket: Option<PathBuf>,
    /// Where Prometheus scrapes `/metrics` (`None`: no metrics listener).
    pub metrics_listen: Option<SocketAddr>,
    /// Run as this user and group once the sockets are bound (`None`: stay as started).
    pub user: Option<String>,
    pub group: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LimitsConfig {
    pub codec: Limits,
    /// A connection with no request in progress is closed after this long. Postfix's own
    /// `smtpd_policy_service_max_idle` is 300 s, so the default lets Postfix close first.
    pub idle_timeout: Duration,
    /// Time allowed from the first byte of a request to its empty line (and for writing
    /// the reply).
    pub request_timeout: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogTarget {
    Stderr,
    Syslog,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LogConfig {
    pub target: LogTarget,
    /// A tracing filter: `info`, `debug`, `valvulad=debug,warn`...
    pub level: String,
    /// The syslog socket (`/dev/log`).
    pub syslog_socket: PathBuf,
    /// Decision lines in valvula's format (`REJECT: sender -> rcpt ...`) instead of
    /// key=value fields, for log parsers written for valvula.
    pub valvula_lines: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// What a listener answers when a module fails (error, panic, invalid reply, timeout,
/// quarantine).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnError {
    /// Fail open, as valvula does.
    Dunno,
    Defer,
    Reject,
    /// Close without a reply: Postfix retries, then applies its own
    /// `smtpd_policy_service_default_action`.
    Disconnect,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ListenerConfig {
    pub name: String,
    pub address: ListenAddr,
    /// The chain, in order.
    pub modules: Vec<String>,
    pub on_error: OnError,
    pub on_error_text: String,
    /// Client networks allowed to connect (TCP only; unix sockets use file modes).
    pub allow: Vec<IpNet>,
    pub max_connections: usize,
    /// Mode of a unix socket file.
    pub socket_mode: u32,
}

impl ListenerConfig {
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.allow.iter().any(|n| n.contains(&ip))
    }
}

/// `host:port`, `[v6]:port`, a bare port (valvula's `-a 3579`: on 127.0.0.1), or
/// `unix:/path`.
pub fn parse_address(s: &str) -> Result<ListenAddr, String> {
    if let Some(path) = s.strip_prefix("unix:") {
        if !path.starts_with('/') && !path.starts_with('.') {
            return Err(format!(
                "{s:?}: a unix socket path must be absolute or start with ./"
            ));
        }
        return Ok(ListenAddr::Unix(PathBuf::from(path)));
    }
    if let Ok(port) = s.parse::<u16>() {
        return Ok(ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], port))));
    }
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(ListenAddr::Tcp(a));
    }
    match s.to_socket_addrs() {
        Ok(mut it) => it
            .next()
            .map(ListenAddr::Tcp)
            .ok_or_else(|| format!("{s:?} resolves to no address")),
        Err(e) => Err(format!(
            "{s:?} is not host:port, [ipv6]:port, a port or unix:/path ({e})"
        )),
    }
}
