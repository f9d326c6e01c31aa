//! A real module (dlopen) in an in-process daemon on either backend, with the host
//! clock frozen, plus plain-SQL access to its database as an operator would have it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use valvula_store::Store;
use valvulad::host::{ModuleSet, Services};
use valvulad::server::Daemon;

use crate::client::Client;
use crate::daemon::{parse_config, start};
use crate::db::TestDb;

/// Direct database access for test set-up, as an operator would use it (plain SQL).
pub enum Raw {
    Sqlite(PathBuf),
    Mysql(TestDb),
}

impl Raw {
    pub fn exec(&self, sql: &str) {
        match self {
            Raw::Sqlite(p) => {
                let c = rusqlite::Connection::open(p).unwrap();
                c.busy_timeout(Duration::from_secs(5)).unwrap();
                c.execute_batch(sql)
                    .unwrap_or_else(|e| panic!("{sql}: {e}"));
            }
            Raw::Mysql(db) => {
                db.sql(sql);
            }
        }
    }

    /// The first row of a query as tab-separated text (`NULL` for NULL).
    pub fn row(&self, sql: &str) -> String {
        match self {
            Raw::Sqlite(p) => {
                let c = rusqlite::Connection::open(p).unwrap();
                let mut st = c.prepare(sql).unwrap();
                let n = st.column_count();
                st.query_row([], |r| {
                    Ok((0..n)
                        .map(|i| match r.get_ref(i).unwrap() {
                            rusqlite::types::ValueRef::Null => "NULL".to_owned(),
                            rusqlite::types::ValueRef::Integer(v) => v.to_string(),
                            rusqlite::types::ValueRef::Real(v) => v.to_string(),
                            rusqlite::types::ValueRef::Text(t) => {
                                String::from_utf8_lossy(t).into_owned()
                            }
                            rusqlite::types::ValueRef::Blob(_) => "<blob>".into(),
                        })
                        .collect::<Vec<_>>()
                        .join("\t"))
                })
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
            }
            Raw::Mysql(db) => db.sql(sql).lines().next().unwrap_or("").to_owned(),
        }
    }
}

impl Raw {
    /// The `[storage]` section that points valvulad at this database (calendar windows
    /// in UTC, so tests do not depend on the machine's zone).
    pub fn storage_toml(&self) -> String {
        self.storage_toml_in("UTC")
    }

    /// The `[storage]` section with calendar windows in `zone`.
    pub fn storage_toml_in(&self, zone: &str) -> String {
        match self {
            Raw::Sqlite(p) => format!(
                "[storage]\npath = {:?}\ntime_zone = \"{zone}\"\n",
                p.display().to_string()
            ),
            Raw::Mysql(db) => format!(
                "[storage]\nbackend = \"mysql\"\nurl = \"{}\"\ntime_zone = \"{zone}\"\n",
                db.url()
            ),
        }
    }
}

/// Nests a module section's own table headers (`[[policy]]`) under `[module.NAME]`.
fn nest(module: &str, section: &str) -> String {
    section
        .lines()
        .map(|l| {
            let t = l.trim_start();
            if let Some(rest) = t.strip_prefix("[[") {
                format!("[[module.{module}.{rest}")
            } else if let Some(rest) = t.strip_prefix('[') {
                format!("[module.{module}.{rest}")
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// valvulad.toml running one module on one listener.
pub fn daemon_toml(raw: &Raw, crate_name: &str, module: &str, section: &str) -> String {
    daemon_toml_in(raw, crate_name, module, section, "UTC")
}

/// [`daemon_toml`] with calendar windows in `zone`.
pub fn daemon_toml_in(
    raw: &Raw,
    crate_name: &str,
    module: &str,
    section: &str,
    zone: &str,
) -> String {
    let section = nest(module, section);
    format!(
        "[server]\nmodules = [{:?}]\nmodule_timeout = \"10s\"\n\
         [[listener]]\nname = \"main\"\naddress = \"127.0.0.1:0\"\nmodules = [\"{module}\"]\n\
         [module.{module}]\n{section}\n{}",
        crate::module_path(crate_name).display().to_string(),
        raw.storage_toml_in(zone)
    )
}

/// A daemon running one real module in this process, with the clock frozen at `now`.
pub struct Env {
    pub rt: tokio::runtime::Runtime,
    pub daemon: Daemon,
    pub addr: String,
    pub raw: Raw,
    pub now: i64,
    /// The clock the modules read: this environment's own, moved by the test.
    clock: valvula_store::Clock,
    _store: Arc<Store>,
    _dir: tempfile::TempDir,
}

impl Env {
    pub fn start(mysql: bool, crate_name: &str, module: &str, section: &str, now: i64) -> Env {
        Self::start_with(mysql, crate_name, module, section, now, "UTC", "")
    }

    /// [`Env::start`] with calendar windows in `zone`, after running `setup` (SQL, `;`
    /// separated) on the new database: tables and rows of an older version, say.
    pub fn start_with(
        mysql: bool,
        crate_name: &str,
        module: &str,
        section: &str,
        now: i64,
        zone: &str,
        setup: &str,
    ) -> Env {
        let clock = valvula_store::Clock::manual(now);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let raw = if mysql {
            Raw::Mysql(TestDb::new())
        } else {
            Raw::Sqlite(dir.path().join("module.db"))
        };
        if !setup.trim().is_empty() {
            raw.exec(setup);
        }
        let config = parse_config(&daemon_toml_in(&raw, crate_name, module, section, zone));
        let store = Store::open(&config.storage, rt.handle().clone()).unwrap();
        let (modules, _) =
            ModuleSet::load(&config, None, &Services::new(store.clone(), clock.clone()))
                .unwrap_or_else(|e| panic!("{e:?}"));
        let (daemon, addrs) = rt.block_on(start(config, modules));
        Env {
            addr: addrs[0].clone(),
            rt,
            daemon,
            raw,
            now,
            clock,
            _store: store,
            _dir: dir,
        }
    }

    /// Sends one request (attribute pairs) and returns the reply without its "\n\n".
    pub fn ask(&self, attrs: &[(String, String)]) -> String {
        let mut bytes = Vec::new();
        for (k, v) in attrs {
            bytes.extend_from_slice(format!("{k}={v}\n").as_bytes());
        }
        bytes.push(b'\n');
        let addr = self.addr.clone();
        let r = self
            .rt
            .block_on(async move { Client::connect(&addr).await.ask(&bytes).await });
        r.trim_end_matches('\n').to_owned()
    }

    /// Runs the modules' minute tick at the current frozen time.
    pub fn tick(&self) {
        self.rt
            .block_on(self.daemon.tick_between(self.now - 60, self.now));
    }

    /// Moves the frozen clock without delivering ticks: what requests see first.
    pub fn jump(&mut self, seconds: i64) {
        self.now += seconds;
        self.clock.set(self.now);
    }

    /// Moves the frozen clock and delivers the ticks of the boundaries crossed.
    pub fn advance(&mut self, seconds: i64) {
        let before = self.now;
        self.now += seconds;
        self.clock.set(self.now);
        self.rt.block_on(self.daemon.tick_between(before, self.now));
    }
}

/// Applies `name=value` / `-name` overrides to a base request.
pub fn request(
    base: &[(&str, &str)],
    overrides: &[(String, Option<String>)],
) -> Vec<(String, String)> {
    let mut r: Vec<(String, String)> = base
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    for (k, v) in overrides {
        r.retain(|(n, _)| n != k);
        if let Some(v) = v {
            r.push((k.clone(), v.clone()));
        }
    }
    r
}

/// Parses `name=value -name ...` tokens.
pub fn attrs(tokens: &str) -> Vec<(String, Option<String>)> {
    tokens
        .split_whitespace()
        .map(|t| match t.strip_prefix('-') {
            Some(name) => (name.to_owned(), None),
            None => {
                let (k, v) = t
                    .split_once('=')
                    .unwrap_or_else(|| panic!("bad attribute {t}"));
                (k.to_owned(), Some(long(v)))
            }
        })
        .collect()
}

/// `{long:N:C}` in a value: the character C N times (hostile lengths in test data).
fn long(v: &str) -> String {
    let mut out = String::new();
    let mut rest = v;
    while let Some(i) = rest.find("{long:") {
        out.push_str(&rest[..i]);
        let end = rest[i..].find('}').expect("unclosed {long:") + i;
        let (n, c) = rest[i + 6..end].split_once(':').expect("{long:N:C}");
        out.push_str(&c.repeat(n.parse().expect("{long:N:C}: N")));
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

/// `{now}`, `{now+N}`, `{now-N}` in test data → numbers (and `{long:N:C}` → C N times).
pub fn expand(s: &str, now: i64) -> String {
    long(&expand_now(s, now))
}

fn expand_now(s: &str, now: i64) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("{now") {
        out.push_str(&rest[..i]);
        let end = rest[i..].find('}').expect("unclosed {now") + i;
        let expr = &rest[i + 4..end];
        let v = if expr.is_empty() {
            now
        } else {
            now + expr.parse::<i64>().expect("{now+N}")
        };
        out.push_str(&v.to_string());
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}
