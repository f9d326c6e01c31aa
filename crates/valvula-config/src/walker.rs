//! The per-key walker: typed reads of a TOML table that record every error with its
//! key path (`listener[1].allow[0]: ...`) and every unknown key as a warning, so an
//! operator fixes a file in one pass.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::{Table, Value};

/// The longest timeout or period any key takes: a day.
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(86_400);

#[derive(Default)]
pub(crate) struct Walker {
    /// Directory of the config file: relative paths in it are relative to it.
    pub(crate) base: PathBuf,
    pub(crate) errors: Vec<String>,
    pub(crate) warnings: Vec<String>,
}

pub(crate) fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

impl Walker {
    pub(crate) fn err(&mut self, path: &str, msg: impl fmt::Display) {
        self.errors.push(format!("{path}: {msg}"));
    }

    pub(crate) fn unknown_keys(&mut self, path: &str, t: &Table, known: &[&str]) {
        for k in t.keys() {
            if !known.contains(&k.as_str()) {
                self.warnings
                    .push(format!("{}: unknown key, ignored", join(path, k)));
            }
        }
    }

    pub(crate) fn table<'t>(
        &mut self,
        parent: &'t Table,
        path: &str,
        key: &str,
    ) -> Option<&'t Table> {
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

    pub(crate) fn string(&mut self, t: &Table, path: &str, key: &str) -> Option<String> {
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

    pub(crate) fn strings(&mut self, t: &Table, path: &str, key: &str) -> Option<Vec<String>> {
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

    pub(crate) fn integer(
        &mut self,
        t: &Table,
        path: &str,
        key: &str,
        min: i64,
        max: i64,
    ) -> Option<i64> {
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
    pub(crate) fn duration(&mut self, t: &Table, path: &str, key: &str) -> Option<Duration> {
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

    /// A path as the config file means it: relative to the file's directory, never to
    /// whatever directory the daemon was started from (a module loaded from there would
    /// be whatever that directory holds).
    pub(crate) fn relative_to_config(&self, path: &str) -> PathBuf {
        if Path::new(path).is_relative() {
            self.base.join(path)
        } else {
            PathBuf::from(path)
        }
    }

    /// Module entries: a name stays a name (searched in `module_dirs`); one with a `/` is
    /// a file, relative to the config file's directory.
    pub(crate) fn module_entries(
        &mut self,
        t: &Table,
        path: &str,
        key: &str,
    ) -> Option<Vec<String>> {
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
}
