//! The sections of valvulad.toml, each read by the walker: `[server]`, `[limits]`,
//! `[log]`, `[storage]`, `[[listener]]` and the `[module.NAME]` tables.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use toml::{Table, Value};
use valvula_policy::Limits;
use valvula_store::{Backend, StorageConfig, Zone};

use crate::paths::{DEFAULT_ADMIN_SOCKET, DEFAULT_MODULE_DIR, DEFAULT_SQLITE_PATH};
use crate::types::*;
use crate::walker::{Walker, join};

impl Walker {
    pub(crate) fn root(&mut self, root: &Table) -> Config {
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
            storage.timeout = valvula_store::DEFAULT_TIMEOUT.min(server.module_timeout / 2);
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

    pub(crate) fn storage(&mut self, t: &Table) -> StorageConfig {
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
                        format!(
                            "{:?} does not start with mysql://",
                            valvula_store::redact_url(&url)
                        ),
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

    pub(crate) fn server(&mut self, t: &Table) -> ServerConfig {
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
                "crash_limit",
                "crash_window",
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
            .and_then(crate::paths::admin_socket_problem)
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
            crash_limit: self.integer(t, p, "crash_limit", 1, 1000).unwrap_or(3) as u32,
            crash_window: self
                .duration(t, p, "crash_window")
                .unwrap_or(Duration::from_secs(600)),
            shutdown_grace: self
                .duration(t, p, "shutdown_grace")
                .unwrap_or(Duration::from_secs(10)),
        }
    }

    pub(crate) fn limits(&mut self, t: &Table) -> LimitsConfig {
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

    pub(crate) fn log(&mut self, t: &Table) -> LogConfig {
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

    pub(crate) fn listener(&mut self, t: &Table, p: &str) -> Option<ListenerConfig> {
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

fn parse_net(s: &str) -> Result<IpNet, String> {
    if let Ok(n) = s.parse::<IpNet>() {
        return Ok(n);
    }
    s.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("{s:?} is not an address or network such as 192.0.2.0/24"))
}
