//! The runner of the modules' behaviour scripts (`tests/fixtures/*/*.test`): each line
//! a command, run against a real daemon that loaded the module, on SQLite or MariaDB.
//!
//! ```text
//!   case NAME                  a new case (see Script::daemon_per_case)
//!   config ... end             the module's section; starts the case's daemon
//!   zone NAME                  before config: calendar windows in NAME (default UTC)
//!   setup SQL                  before config: SQL run on the new database first
//!   ask [xN] ATTRS => REPLY    N requests (default 1), each must get REPLY
//!   clock +N                   the module's clock moves N seconds (ticks delivered)
//!   sql STATEMENT              plain SQL on the database ({now}, {now+N} expanded)
//!   value SQL => TEXT          a query's first row, tab-separated
//! ```
//!
//! A module's own commands (mod-ticket's `row`, mod-ratelimit's `used`) are given by
//! the test as [`Script::command`].

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::fixture;
use crate::inproc::{Env, attrs, expand, request};

/// A module command: `(env, arguments, where in the file)`; panics on a failure.
pub type Command<'a> = Box<dyn Fn(&mut Env, &str, &str) + 'a>;

/// One module's script and how to run it.
pub struct Script<'a> {
    /// Under tests/fixtures: `mod-ticket/conformance.test`.
    pub file: &'a str,
    /// The cargo crate (`mod_ticket`) and the module's name (`mod-ticket`).
    pub crate_name: &'a str,
    pub module: &'a str,
    /// The request every `ask` changes.
    pub base: &'a [(&'a str, &'a str)],
    /// Each request gets its own Postfix `instance` (a new message).
    pub new_instance: bool,
    /// `true`: every case starts its own daemon and database (`config ... end`).
    /// `false`: one daemon with `section` for the whole file; a case empties `tables`.
    pub daemon_per_case: bool,
    pub section: &'a str,
    pub tables: &'a [&'a str],
    /// The clock the module starts at.
    pub now: i64,
    /// The module's own commands, by name.
    pub commands: Vec<(&'a str, Command<'a>)>,
}

impl Script<'_> {
    /// Runs every line of the script on one backend; panics with the file, line and
    /// case of the first line that fails.
    pub fn run(&self, mysql: bool) {
        let text = std::fs::read_to_string(fixture(self.file)).unwrap();
        let file = self.file.rsplit('/').next().unwrap_or(self.file);
        let backend = if mysql { "mariadb" } else { "sqlite" };
        static INSTANCE: AtomicUsize = AtomicUsize::new(0);
        let start = |section: &str, zone: &str, setup: &str| {
            Env::start_with(
                mysql,
                self.crate_name,
                self.module,
                section,
                self.now,
                zone,
                setup,
            )
        };
        let mut env: Option<Env> = None;
        let mut case = String::new();
        let mut zone = "UTC".to_owned();
        let mut setup = String::new();
        let mut lines = text.lines().enumerate();
        while let Some((no, line)) = lines.next() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = format!("{backend}, {file}:{} ({case})", no + 1);
            let (cmd, rest) = line.split_once(' ').unwrap_or((line, ""));
            match cmd {
                "case" => {
                    case = rest.to_owned();
                    zone = "UTC".to_owned();
                    setup.clear();
                    if self.daemon_per_case {
                        env = None;
                    } else if let Some(e) = &env {
                        for t in self.tables {
                            e.raw.exec(&format!("DELETE FROM {t}"));
                        }
                    }
                }
                "zone" => zone = rest.to_owned(),
                "setup" => {
                    setup.push_str(&expand(rest, self.now));
                    setup.push_str(";\n");
                }
                "config" => {
                    let mut section = String::new();
                    for (_, l) in lines.by_ref() {
                        if l.trim() == "end" {
                            break;
                        }
                        section.push_str(l.trim());
                        section.push('\n');
                    }
                    env = Some(start(&section, &zone, &setup));
                }
                _ => {
                    if env.is_none() {
                        assert!(
                            !self.daemon_per_case,
                            "{at}: {cmd} before the case's config"
                        );
                        env = Some(start(self.section, &zone, &setup));
                    }
                    let e = env.as_mut().expect("started above");
                    self.line(e, cmd, rest, &at, &INSTANCE);
                }
            }
        }
    }

    fn line(&self, e: &mut Env, cmd: &str, rest: &str, at: &str, instance: &AtomicUsize) {
        let now = e.now;
        match cmd {
            "ask" => {
                let spaced = format!(" {rest}");
                let (req, want) = spaced
                    .split_once(" => ")
                    .unwrap_or_else(|| panic!("{at}: ask needs =>"));
                let req = req.trim();
                let (times, req) = match req.strip_prefix('x') {
                    Some(r) => {
                        let (n, r) = r.split_once(' ').unwrap_or((r, ""));
                        let n = n
                            .parse::<usize>()
                            .unwrap_or_else(|_| panic!("{at}: x{n} is not a count"));
                        (n, r)
                    }
                    None => (1, req),
                };
                let want = expand(want, now);
                for i in 0..times {
                    let mut over = Vec::new();
                    if self.new_instance {
                        let n = instance.fetch_add(1, Ordering::SeqCst);
                        over.push(("instance".to_owned(), Some(format!("inst.{n}"))));
                    }
                    over.extend(attrs(req));
                    assert_eq!(
                        e.ask(&request(self.base, &over)),
                        want,
                        "{at}, request {}",
                        i + 1
                    );
                }
            }
            "clock" => {
                let by = rest
                    .trim_start_matches('+')
                    .parse()
                    .unwrap_or_else(|_| panic!("{at}: clock +SECONDS"));
                e.advance(by);
            }
            "sql" => e.raw.exec(&expand(rest, now)),
            "value" => {
                let (sql, want) = rest
                    .split_once(" => ")
                    .unwrap_or_else(|| panic!("{at}: value needs =>"));
                assert_eq!(e.raw.row(&expand(sql, now)), want, "{at}: {sql}");
            }
            other => match self.commands.iter().find(|(name, _)| *name == other) {
                Some((_, f)) => f(e, rest, at),
                None => panic!("{at}: unknown command {other}"),
            },
        }
    }
}
