//! `valvulad.toml`: loading and validation.
//!
//! Every problem is collected with its key path (`listener[1].allow[0]: ...`) before the
//! daemon refuses to start, so an operator fixes a file in one pass; unknown keys are
//! warnings, because a typo in an optional key must not go unnoticed either.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use toml::{Table, Value};
use valvula_policy::Limits;

use crate::store::{Backend, StorageConfig, Zone};

/// Default config file, as packaged.
pub const DEFAULT_PATH: &str = "/etc/valvula/valvulad.toml";
/// Where packaged modules are installed.
pub const DEFAULT_MODULE_DIR: &str = "/usr/lib/valvulad/modules";
/// Default admin socket.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/valvulad/admin.sock";
/// The longest timeout or period any key takes: a day.
const MAX_DURATION: Duration = Duration::from_secs(86_400);

/// Default SQLite file.
pub const DEFAULT_SQLITE_PATH: &str = "/var/lib/valvula/valvula.db";

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

/// Every error of a config file, each with its key path.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub errors: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} error{}",
            self.file.display(),
            self.errors.len(),
            if self.errors.len() == 1 { "" } else { "s" }
        )?;
        for e in &self.errors {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

/// A loaded config and the warnings found on the way.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    pub warnings: Vec<String>,
}

/// Loads valvulad.toml, or valvula's XML valvula.conf (told apart by their content).
pub fn load_file(path: &Path) -> Result<Loaded, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_owned(),
        errors: vec![format!("cannot read the file: {e}")],
    })?;
    if crate::valvula_conf::is_xml(&text) {
        let t = crate::valvula_conf::translate(&text, path).map_err(|e| ConfigError {
            file: path.to_owned(),
            errors: vec![e.to_string()],
        })?;
        let mut loaded = parse(&t.toml, path)?;
        loaded.warnings.extend(t.warnings);
        return Ok(loaded);
    }
    parse(&text, path)
}

/// Parses config text; `file` is only used in messages.
pub fn parse(text: &str, file: &Path) -> Result<Loaded, ConfigError> {
    let fail = |errors| ConfigError {
        file: file.to_owned(),
        errors,
    };
    let root: Table = text.parse().map_err(|e: toml::de::Error| {
        fail(vec![format!("not valid TOML: {}", e.to_string().trim())])
    })?;
    let mut w = Walker {
        base: file.parent().map(Path::to_path_buf).unwrap_or_default(),
        ..Walker::default()
    };
    let config = w.root(&root);
    if w.errors.is_empty() {
        Ok(Loaded {
            config,
            warnings: w.warnings,
        })
    } else {
        Err(fail(w.errors))
    }
}

#[derive(Default)]
struct Walker {
    /// Directory of the config file: relative paths in it are relative to it.
    base: PathBuf,
    errors: Vec<String>,
    warnings: Vec<String>,
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

impl Walker {
    fn err(&mut self, path: &str, msg: impl fmt::Display) {
        self.errors.push(format!("{path}: {msg}"));
    }

    fn unknown_keys(&mut self, path: &str, t: &Table, known: &[&str]) {
        for k in t.keys() {
            if !known.contains(&k.as_str()) {
                self.warnings
                    .push(format!("{}: unknown key, ignored", join(path, k)));
            }
        }
    }

    fn table<'t>(&mut self, parent: &'t Table, path: &str, key: &str) -> Option<&'t Table> {
        match parent.get(key)? {
            Value::Table(t) => Some(t),
            v => {
                self.err(
                    &join(path, key),
                    format!("expected a table, found {}", v.type_str()),
                );
                None
            }
        }
    }

    fn string(&mut self, t: &Table, path: &str, key: &str) -> Option<String> {
        match t.get(key)? {
            Value::String(s) => Some(s.clone()),
            v => {
                self.err(
                    &join(path, key),
                    format!("expected a string, found {}", v.type_str()),
                );
                None
            }
        }
    }

    fn strings(&mut self, t: &Table, path: &str, key: &str) -> Option<Vec<String>> {
        let p = join(path, key);
        match t.get(key)? {
            Value::Array(a) => {
                let mut out = Vec::new();
                for (i, v) in a.iter().enumerate() {
                    match v {
                        Value::String(s) => out.push(s.clone()),
                        v => self.err(
                            &format!("{p}[{i}]"),
                            format!("expected a string, found {}", v.type_str()),
                        ),
                    }
                }
                Some(out)
            }
            v => {
                self.err(
                    &p,
                    format!("expected an array of strings, found {}", v.type_str()),
                );
                None
            }
        }
    }

    fn integer(&mut self, t: &Table, path: &str, key: &str, min: i64, max: i64) -> Option<i64> {
        let p = join(path, key);
        match t.get(key)? {
            Value::Integer(i) if (min..=max).contains(i) => Some(*i),
            Value::Integer(i) => {
                self.err(&p, format!("{i} is out of range ({min} to {max})"));
                None
            }
            v => {
                self.err(&p, format!("expected an integer, found {}", v.type_str()));
                None
            }
        }
    }

    /// A duration: `"30s"`, `"5m"`, `"250ms"` (humantime), or an integer of seconds.
    fn duration(&mut self, t: &Table, path: &str, key: &str) -> Option<Duration> {
        let p = join(path, key);
        let d = match t.get(key)? {
            Value::Integer(i) if *i >= 0 => Duration::from_secs(*i as u64),
            Value::String(s) => match humantime::parse_duration(s) {
                Ok(d) => d,
                Err(e) => {
                    self.err(
                        &p,
                        format!("{s:?} is not a duration ({e}); write e.g. \"30s\" or \"5m\""),
                    );
                    return None;
                }
            },
            v => {
                self.err(
                    &p,
                    format!(
                        "expected a duration such as \"30s\", found {}",
                        v.type_str()
                    ),
                );
                return None;
            }
        };
        if d.is_zero() {
            self.err(&p, "must be more than zero");
            return None;
        }
        // A deadline that far away overflows the clock (every connection panicked).
        if d > MAX_DURATION {
            self.err(
                &p,
                format!("{d:?} is more than the most allowed, {MAX_DURATION:?}"),
            );
            return None;
        }
        Some(d)
    }

    fn root(&mut self, root: &Table) -> Config {
        self.unknown_keys(
            "",
            root,
            &["server", "limits", "log", "listener", "module", "storage"],
        );
        let empty = Table::new();
        let server = self.table(root, "", "server").unwrap_or(&empty);
        let server = self.server(server);
        let limits = self.table(root, "", "limits").unwrap_or(&empty);
        let limits = self.limits(limits);
        let log = self.table(root, "", "log").unwrap_or(&empty);
        let log = self.log(log);
        let storage = self.table(root, "", "storage").unwrap_or(&empty);
        let storage = self.storage(storage);

        let mut listeners = Vec::new();
        match root.get("listener") {
            None => self.err(
                "listener",
                "no listener configured; add a [[listener]] with an address",
            ),
            Some(Value::Array(a)) => {
                for (i, v) in a.iter().enumerate() {
                    let p = format!("listener[{i}]");
                    match v {
                        Value::Table(t) => {
                            if let Some(l) = self.listener(t, &p) {
                                listeners.push(l);
                            }
                        }
                        v => self.err(&p, format!("expected a table, found {}", v.type_str())),
                    }
                }
            }
            Some(v) => self.err(
                "listener",
                format!("expected [[listener]] tables, found {}", v.type_str()),
            ),
        }
        let mut storage = storage;
        if storage.timeout.is_zero() {
            storage.timeout = crate::store::DEFAULT_TIMEOUT.min(server.module_timeout / 2);
        } else if storage.timeout >= server.module_timeout {
            self.err(
                "storage.timeout",
                format!(
                    "{:?} must be shorter than server.module_timeout ({:?}): a stalled database must fail a call before the module's time is up",
                    storage.timeout, server.module_timeout
                ),
            );
        }
        let mut seen = BTreeMap::new();
        for (i, l) in listeners.iter().enumerate() {
            // Port 0 means "any free port", so several such listeners do not collide.
            if matches!(&l.address, ListenAddr::Tcp(a) if a.port() == 0) {
                continue;
            }
            if let Some(j) = seen.insert(l.address.clone(), i) {
                self.err(
                    &format!("listener[{i}].address"),
                    format!("{} is also listener[{j}]'s address", l.address),
                );
            }
        }
        let mut names = BTreeMap::new();
        for (i, l) in listeners.iter().enumerate() {
            if let Some(j) = names.insert(l.name.clone(), i) {
                self.err(
                    &format!("listener[{i}].name"),
                    format!("{:?} is also listener[{j}]'s name", l.name),
                );
            }
        }

        let mut module_sections = BTreeMap::new();
        if let Some(m) = self.table(root, "", "module") {
            for (name, v) in m {
                match v {
                    Value::Table(t) => {
                        module_sections.insert(name.clone(), t.clone());
                    }
                    v => self.err(
                        &format!("module.{name}"),
                        format!("expected a table, found {}", v.type_str()),
                    ),
                }
            }
        }
        Config {
            server,
            limits,
            log,
            listeners,
            storage,
            module_sections,
        }
    }

    fn storage(&mut self, t: &Table) -> StorageConfig {
        let p = "storage";
        self.unknown_keys(
            p,
            t,
            &[
                "backend",
                "path",
                "synchronous",
                "url",
                "password",
                "password_env",
                "password_file",
                "pool_size",
                "time_zone",
                "timeout",
            ],
        );
        // "local" becomes the system's zone name here, once: what daemons sharing a
        // database compare is a name, never "whatever this machine says".
        let zone_name = self
            .string(t, p, "time_zone")
            .unwrap_or_else(|| "local".to_owned());
        let zone = Zone::parse(&zone_name).unwrap_or_else(|e| {
            self.err("storage.time_zone", e);
            Zone::UTC
        });
        // Unset: DEFAULT_TIMEOUT, shortened to half the module timeout by root().
        let timeout = self.duration(t, p, "timeout").unwrap_or(Duration::ZERO);
        let backend = match self.string(t, p, "backend").as_deref() {
            None | Some("sqlite") => {
                let path = self
                    .string(t, p, "path")
                    .map_or_else(|| PathBuf::from(DEFAULT_SQLITE_PATH), PathBuf::from);
                let path = if path.is_relative() {
                    self.base.join(path)
                } else {
                    path
                };
                let synchronous_full = match self.string(t, p, "synchronous").as_deref() {
                    None | Some("full") => true,
                    Some("normal") => false,
                    Some(o) => {
                        self.err(
                            "storage.synchronous",
                            format!("{o:?} is not \"full\" or \"normal\""),
                        );
                        true
                    }
                };
                Backend::Sqlite {
                    path,
                    synchronous_full,
                }
            }
            Some("mysql") => {
                let url = self.string(t, p, "url").unwrap_or_else(|| {
                    self.err(
                        "storage.url",
                        "missing; write e.g. \"mysql://valvula@127.0.0.1:3306/valvula\"",
                    );
                    String::new()
                });
                if !url.is_empty() && !url.starts_with("mysql://") {
                    self.err(
                        "storage.url",
                        format!("{:?} does not start with mysql://", redact_url(&url)),
                    );
                }
                let mut password = self.string(t, p, "password");
                if let Some(var) = self.string(t, p, "password_env") {
                    match std::env::var(&var) {
                        Ok(v) => password = Some(v),
                        Err(_) => self.err(
                            "storage.password_env",
                            format!("environment variable {var} is not set"),
                        ),
                    }
                }
                if let Some(f) = self.string(t, p, "password_file") {
                    let f = self.base.join(f);
                    match std::fs::read_to_string(&f) {
                        Ok(v) => password = Some(v.trim_end_matches(['\r', '\n']).to_owned()),
                        Err(e) => self.err(
                            "storage.password_file",
                            format!("cannot read {}: {e}", f.display()),
                        ),
                    }
                }
                let pool_size = self.integer(t, p, "pool_size", 1, 1024).unwrap_or(16) as usize;
                Backend::Mysql {
                    url,
                    password,
                    pool_size,
                }
            }
            Some(o) => {
                self.err(
                    "storage.backend",
                    format!("{o:?} is not \"sqlite\" or \"mysql\""),
                );
                Backend::Sqlite {
                    path: PathBuf::from(DEFAULT_SQLITE_PATH),
                    synchronous_full: true,
                }
            }
        };
        StorageConfig {
            backend,
            zone,
            timeout,
            record_zone: true,
        }
    }

    /// A path as the config file means it: relative to the file's directory, never to
    /// whatever directory the daemon was started from (a module loaded from there would
    /// be whatever that directory holds).
    fn relative_to_config(&self, path: &str) -> PathBuf {
        if Path::new(path).is_relative() {
            self.base.join(path)
        } else {
            PathBuf::from(path)
        }
    }

    /// Module entries: a name stays a name (searched in `module_dirs`); one with a `/` is
    /// a file, relative to the config file's directory.
    fn module_entries(&mut self, t: &Table, path: &str, key: &str) -> Option<Vec<String>> {
        let entries = self.strings(t, path, key)?;
        let mut out = Vec::with_capacity(entries.len());
        for (i, entry) in entries.into_iter().enumerate() {
            if !entry.contains('/') {
                out.push(entry);
                continue;
            }
            match self
                .relative_to_config(&entry)
                .into_os_string()
                .into_string()
            {
                Ok(file) => out.push(file),
                Err(_) => {
                    self.err(
                        &format!("{}[{i}]", join(path, key)),
                        format!(
                            "{entry:?} is relative to the config file's directory, whose name is not UTF-8; give the module's absolute path"
                        ),
                    );
                    out.push(entry);
                }
            }
        }
        Some(out)
    }

    fn server(&mut self, t: &Table) -> ServerConfig {
        let p = "server";
        self.unknown_keys(
            p,
            t,
            &[
                "module_dirs",
                "modules",
                "module_timeout",
                "module_threads",
                "quarantine_after",
                "quarantine_for",
                "shutdown_grace",
                "admin_socket",
                "user",
                "group",
                "metrics_listen",
            ],
        );
        let metrics_listen = self
            .string(t, p, "metrics_listen")
            .and_then(|m| match parse_address(&m) {
                Ok(ListenAddr::Tcp(a)) => Some(a),
                _ => {
                    self.err("server.metrics_listen", format!("{m:?} is not host:port"));
                    None
                }
            });
        let user = self.string(t, p, "user");
        let group = self.string(t, p, "group");
        if let Some(u) = &user
            && nix::unistd::User::from_name(u).ok().flatten().is_none()
        {
            self.err("server.user", format!("no user {u:?} on this system"));
        }
        if let Some(g) = &group
            && nix::unistd::Group::from_name(g).ok().flatten().is_none()
        {
            self.err("server.group", format!("no group {g:?} on this system"));
        }
        if group.is_some() && user.is_none() {
            self.err("server.group", "needs server.user as well");
        }
        let admin_socket = match self.string(t, p, "admin_socket") {
            None => Some(PathBuf::from(DEFAULT_ADMIN_SOCKET)),
            Some(s) if s.is_empty() => None,
            Some(s) => Some(if Path::new(&s).is_relative() {
                self.base.join(s)
            } else {
                PathBuf::from(s)
            }),
        };
        if let Some(problem) = admin_socket
            .as_deref()
            .and_then(crate::admin::admin_socket_problem)
        {
            self.err("server.admin_socket", problem);
        }
        ServerConfig {
            metrics_listen,
            admin_socket,
            user,
            group,
            module_dirs: self
                .strings(t, p, "module_dirs")
                .map(|v| v.iter().map(|d| self.relative_to_config(d)).collect())
                .unwrap_or_else(|| vec![PathBuf::from(DEFAULT_MODULE_DIR)]),
            modules: self.module_entries(t, p, "modules"),
            module_timeout: self
                .duration(t, p, "module_timeout")
                .unwrap_or(Duration::from_secs(5)),
            module_threads: self.integer(t, p, "module_threads", 1, 1024).unwrap_or(16) as usize,
            quarantine_after: self
                .integer(t, p, "quarantine_after", 1, 1_000_000)
                .unwrap_or(5) as u32,
            quarantine_for: self
                .duration(t, p, "quarantine_for")
                .unwrap_or(Duration::from_secs(30)),
            shutdown_grace: self
                .duration(t, p, "shutdown_grace")
                .unwrap_or(Duration::from_secs(10)),
        }
    }

    fn limits(&mut self, t: &Table) -> LimitsConfig {
        let p = "limits";
        self.unknown_keys(
            p,
            t,
            &[
                "max_line_bytes",
                "max_request_bytes",
                "max_attributes",
                "idle_timeout",
                "request_timeout",
            ],
        );
        let d = Limits::default();
        let codec = Limits {
            max_line_bytes: self
                .integer(t, p, "max_line_bytes", 64, 1 << 20)
                .map_or(d.max_line_bytes, |v| v as usize),
            max_request_bytes: self
                .integer(t, p, "max_request_bytes", 64, 16 << 20)
                .map_or(d.max_request_bytes, |v| v as usize),
            max_attributes: self
                .integer(t, p, "max_attributes", 1, 100_000)
                .map_or(d.max_attributes, |v| v as usize),
        };
        LimitsConfig {
            codec,
            idle_timeout: self
                .duration(t, p, "idle_timeout")
                .unwrap_or(Duration::from_secs(600)),
            request_timeout: self
                .duration(t, p, "request_timeout")
                .unwrap_or(Duration::from_secs(30)),
        }
    }

    fn log(&mut self, t: &Table) -> LogConfig {
        let p = "log";
        self.unknown_keys(p, t, &["target", "level", "syslog_socket", "format"]);
        let valvula_lines = match self.string(t, p, "format").as_deref() {
            None | Some("fields") => false,
            Some("valvula") => true,
            Some(o) => {
                self.err(
                    "log.format",
                    format!("{o:?} is not \"fields\" or \"valvula\""),
                );
                false
            }
        };
        let target = match self.string(t, p, "target").as_deref() {
            None | Some("stderr") => LogTarget::Stderr,
            Some("syslog") => LogTarget::Syslog,
            Some(other) => {
                self.err(
                    "log.target",
                    format!("{other:?} is not \"stderr\" or \"syslog\""),
                );
                LogTarget::Stderr
            }
        };
        let level = self
            .string(t, p, "level")
            .unwrap_or_else(|| "info".to_owned());
        if let Err(e) = level.parse::<tracing_subscriber::EnvFilter>() {
            self.err("log.level", format!("{level:?} is not a log filter: {e}"));
        }
        let syslog_socket = self
            .string(t, p, "syslog_socket")
            .map_or_else(|| PathBuf::from("/dev/log"), PathBuf::from);
        LogConfig {
            target,
            level,
            syslog_socket,
            valvula_lines,
        }
    }

    fn listener(&mut self, t: &Table, p: &str) -> Option<ListenerConfig> {
        self.unknown_keys(
            p,
            t,
            &[
                "name",
                "address",
                "modules",
                "on_error",
                "on_error_text",
                "allow",
                "max_connections",
                "socket_mode",
            ],
        );
        let errors_before = self.errors.len();
        let address = match self.string(t, p, "address") {
            None if !t.contains_key("address") => {
                self.err(
                    &join(p, "address"),
                    "missing; write e.g. \"127.0.0.1:3579\" or \"unix:/run/valvulad/policy.sock\"",
                );
                None
            }
            None => None,
            Some(s) => match parse_address(&s) {
                // `unix:./x`: relative to this file, as every other path in it.
                Ok(ListenAddr::Unix(path)) if path.is_relative() => {
                    Some(ListenAddr::Unix(self.base.join(path)))
                }
                Ok(a) => Some(a),
                Err(e) => {
                    self.err(&join(p, "address"), e);
                    None
                }
            },
        };
        let modules = self.module_entries(t, p, "modules").unwrap_or_default();
        let on_error = match self.string(t, p, "on_error").as_deref() {
            None | Some("dunno") => OnError::Dunno,
            Some("defer") => OnError::Defer,
            Some("reject") => OnError::Reject,
            Some("disconnect") => OnError::Disconnect,
            Some(o) => {
                self.err(
                    &join(p, "on_error"),
                    format!("{o:?} is not one of dunno, defer, reject, disconnect"),
                );
                OnError::Dunno
            }
        };
        let on_error_text = self
            .string(t, p, "on_error_text")
            .unwrap_or_else(|| "Policy service error, try again later".to_owned());
        if let Err(e) =
            valvula_policy::Reply::new(valvula_policy::Action::Defer, on_error_text.clone())
        {
            self.err(&join(p, "on_error_text"), e);
        }
        let allow = match self.strings(t, p, "allow") {
            None => vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()],
            Some(list) => {
                let mut nets = Vec::new();
                for (i, s) in list.iter().enumerate() {
                    match parse_net(s) {
                        Ok(n) => nets.push(n),
                        Err(e) => self.err(&format!("{p}.allow[{i}]"), e),
                    }
                }
                nets
            }
        };
        let max_connections = self
            .integer(t, p, "max_connections", 1, 1_000_000)
            .unwrap_or(1000) as usize;
        let socket_mode = match t.get("socket_mode") {
            None => 0o666,
            Some(Value::String(s)) => match u32::from_str_radix(s.trim_start_matches("0o"), 8) {
                Ok(m) if m <= 0o777 => m,
                _ => {
                    self.err(
                        &join(p, "socket_mode"),
                        format!("{s:?} is not an octal file mode such as \"0660\""),
                    );
                    0o666
                }
            },
            Some(v) => {
                self.err(
                    &join(p, "socket_mode"),
                    format!(
                        "expected an octal string such as \"0660\", found {}",
                        v.type_str()
                    ),
                );
                0o666
            }
        };
        let address = address?;
        let name = self
            .string(t, p, "name")
            .unwrap_or_else(|| address.to_string());
        (self.errors.len() == errors_before).then_some(ListenerConfig {
            name,
            address,
            modules,
            on_error,
            on_error_text,
            allow,
            max_connections,
            socket_mode,
        })
    }
}

/// A MySQL URL with any password replaced, for messages and logs.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}")
        }
        _ => url.to_owned(),
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

fn parse_net(s: &str) -> Result<IpNet, String> {
    if let Ok(n) = s.parse::<IpNet>() {
        return Ok(n);
    }
    s.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("{s:?} is not an address or network such as 192.0.2.0/24"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Loaded, ConfigError> {
        parse(s, Path::new("t.toml"))
    }

    #[test]
    fn minimal_and_defaults() {
        let l = p("[[listener]]\naddress = \"127.0.0.1:3579\"\n").unwrap();
        let c = l.config;
        assert!(l.warnings.is_empty());
        assert_eq!(c.listeners.len(), 1);
        let li = &c.listeners[0];
        assert_eq!(li.name, "127.0.0.1:3579");
        assert_eq!(li.on_error, OnError::Dunno);
        assert!(li.allows("127.0.0.5".parse().unwrap()));
        assert!(li.allows("::1".parse().unwrap()));
        assert!(li.allows("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!li.allows("192.0.2.1".parse().unwrap()));
        assert_eq!(c.limits.codec, Limits::default());
        assert_eq!(
            c.server.module_dirs,
            vec![PathBuf::from(DEFAULT_MODULE_DIR)]
        );
    }

    #[test]
    fn every_error_with_its_key() {
        let e = p(r#"
[server]
module_timeout = "soon"
module_threads = 0
[limits]
max_line_bytes = "big"
[log]
target = "file"
[[listener]]
address = "nowhere"
on_error = "explode"
allow = ["10.0.0.0/33", "::1"]
[[listener]]
modules = ["x"]
"#)
        .unwrap_err();
        let all = e.errors.join("\n");
        for key in [
            "server.module_timeout:",
            "server.module_threads:",
            "limits.max_line_bytes:",
            "log.target:",
            "listener[0].address:",
            "listener[0].on_error:",
            "listener[0].allow[0]:",
            "listener[1].address: missing",
        ] {
            assert!(all.contains(key), "{key} not in\n{all}");
        }
        assert!(!all.contains("allow[1]"), "{all}");
        assert_eq!(e.errors.len(), 8, "{all}");
    }

    #[test]
    fn unknown_keys_warn() {
        let l = p("typo = 1\n[[listener]]\naddress = \"3579\"\nmodule = [\"x\"]\n").unwrap();
        assert_eq!(l.warnings.len(), 2, "{:?}", l.warnings);
        assert!(
            l.warnings
                .iter()
                .any(|w| w.starts_with("listener[0].module:"))
        );
        assert_eq!(
            l.config.listeners[0].address,
            ListenAddr::Tcp("127.0.0.1:3579".parse().unwrap())
        );
    }

    #[test]
    fn addresses() {
        assert_eq!(
            parse_address("[::1]:25").unwrap(),
            ListenAddr::Tcp("[::1]:25".parse().unwrap())
        );
        assert_eq!(
            parse_address("unix:/run/v.sock").unwrap(),
            ListenAddr::Unix("/run/v.sock".into())
        );
        assert!(parse_address("unix:rel.sock").is_err());
        assert!(parse_address("localhost:3579").is_ok());
    }

    #[test]
    fn duplicate_listeners() {
        let e = p("[[listener]]\naddress = \"3579\"\n[[listener]]\naddress = \"127.0.0.1:3579\"\n")
            .unwrap_err();
        assert!(
            e.errors[0].starts_with("listener[1].address:"),
            "{:?}",
            e.errors
        );
    }

    #[test]
    fn storage_section() {
        let l = p("[[listener]]\naddress = \"3579\"\n").unwrap();
        assert_eq!(
            l.config.storage.backend,
            Backend::Sqlite {
                path: DEFAULT_SQLITE_PATH.into(),
                synchronous_full: true
            }
        );
        let l = parse(
            "[storage]\npath = \"db/v.db\"\ntime_zone = \"UTC\"\n[[listener]]\naddress = \"3579\"\n",
            Path::new("/etc/valvula/valvulad.toml"),
        )
        .unwrap();
        assert!(
            matches!(&l.config.storage.backend, Backend::Sqlite { path, .. } if path == Path::new("/etc/valvula/db/v.db"))
        );
        // SAFETY-free env use: a variable no one else sets.
        let e = p("[storage]\nbackend = \"mysql\"\npassword_env = \"VALVULA_TEST_UNSET_VAR\"\ntime_zone = \"Nowhere/City\"\n[[listener]]\naddress = \"3579\"\n")
            .unwrap_err();
        let all = e.errors.join("\n");
        for k in [
            "storage.url:",
            "storage.password_env:",
            "storage.time_zone:",
        ] {
            assert!(all.contains(k), "{k} missing: {all}");
        }
        assert_eq!(
            redact_url("mysql://u:secret@h:3306/db"),
            "mysql://u:***@h:3306/db"
        );
        assert_eq!(redact_url("mysql://u@h/db"), "mysql://u@h/db");
    }

    #[test]
    fn hostile_settings_of_a_careless_operator() {
        // A timeout so long its deadline overflows the clock.
        let e = p("[server]\nmodule_timeout = 9223372036854775807\n[limits]\nidle_timeout = \"400 years\"\n[[listener]]\naddress = \"3579\"\n").unwrap_err();
        let all = e.errors.join("\n");
        assert!(all.contains("server.module_timeout:"), "{all}");
        assert!(all.contains("limits.idle_timeout:"), "{all}");
        // An admin socket path longer than a socket path may be.
        let long = format!("/tmp/{}/admin.sock", "d".repeat(120));
        let e = p(&format!(
            "[server]\nadmin_socket = {long:?}\n[[listener]]\naddress = \"3579\"\n"
        ))
        .unwrap_err();
        assert!(
            e.errors.join("\n").contains("server.admin_socket:"),
            "{:?}",
            e.errors
        );
        // A storage timeout that is not under the module timeout.
        let e = p("[server]\nmodule_timeout = \"1s\"\n[storage]\ntimeout = \"2s\"\n[[listener]]\naddress = \"3579\"\n").unwrap_err();
        assert!(
            e.errors.join("\n").contains("storage.timeout:"),
            "{:?}",
            e.errors
        );
        // A relative unix socket is relative to the file, as every other path.
        let l = parse(
            "[[listener]]\naddress = \"unix:./policy.sock\"\n",
            Path::new("/etc/valvula/valvulad.toml"),
        )
        .unwrap();
        assert_eq!(
            l.config.listeners[0].address,
            ListenAddr::Unix("/etc/valvula/./policy.sock".into())
        );
    }

    #[test]
    fn module_sections_are_kept() {
        let l = p("[[listener]]\naddress = \"3579\"\nmodules=[\"mod-test\"]\n[module.mod-test]\naction = \"reject\"\n").unwrap();
        assert_eq!(
            l.config.module_sections["mod-test"]["action"].as_str(),
            Some("reject")
        );
    }

    #[test]
    fn module_paths_are_relative_to_the_config_file() {
        let l = parse(
            "[server]\nmodule_dirs = [\"../target/debug\", \"/usr/lib/valvulad/modules\", \"mods\"]\n\
             modules = [\"mod-ticket\", \"./x.so\", \"/abs/y.so\"]\n\
             [[listener]]\naddress = \"3579\"\nmodules = [\"mod-ticket\", \"../z.so\"]\n",
            Path::new("/srv/valvula/etc/valvulad.toml"),
        )
        .unwrap();
        let s = &l.config.server;
        assert_eq!(
            s.module_dirs,
            [
                PathBuf::from("/srv/valvula/etc/../target/debug"),
                PathBuf::from("/usr/lib/valvulad/modules"),
                PathBuf::from("/srv/valvula/etc/mods"),
            ]
        );
        assert_eq!(
            s.modules.as_deref(),
            Some(
                &[
                    "mod-ticket".to_owned(),
                    "/srv/valvula/etc/./x.so".to_owned(),
                    "/abs/y.so".to_owned()
                ][..]
            )
        );
        assert_eq!(
            l.config.listeners[0].modules,
            ["mod-ticket", "/srv/valvula/etc/../z.so"]
        );
    }
}
