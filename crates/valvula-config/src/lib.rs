//! valvulad's configuration: `valvulad.toml` (or valvula's XML `valvula.conf`,
//! translated), read into [`Config`].
//!
//! Every problem is collected with its key path (`listener[1].allow[0]: ...`) before the
//! daemon refuses to start, so an operator fixes a file in one pass; unknown keys are
//! warnings, because a typo in an optional key must not go unnoticed either. The daemon
//! and valvula-ctl both read the file through this crate.
//!
//! - [`types`]: what the file says; [`paths`]: default places;
//! - `walker`: typed reads that record errors by key; `sections`: each section;
//! - [`valvula_conf`]: valvula's XML, translated.

pub mod paths;
mod sections;
pub mod types;
pub mod valvula_conf;
mod walker;

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use toml::Table;

pub use paths::*;
pub use types::*;
use walker::Walker;

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
    load_text(&text, path)
}

/// [`load_file`] of `text`, as if read from `path` (relative paths, valvula's XML
/// includes and pointer files are found from there): a configuration kept in memory.
pub fn load_text(text: &str, path: &Path) -> Result<Loaded, ConfigError> {
    let text = text.to_owned();
    if valvula_conf::is_xml(&text) {
        let t = valvula_conf::translate(&text, path).map_err(|e| ConfigError {
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

impl Config {
    /// The modules to load, each with the key it is first given at
    /// (`server.modules[0]`, `listener[1].modules[0]`): `[server] modules` when set,
    /// else every module the chains name, once, in order of first mention.
    pub fn module_entries(&self) -> Vec<(String, String)> {
        if let Some(m) = &self.server.modules {
            return m
                .iter()
                .enumerate()
                .map(|(i, m)| (format!("server.modules[{i}]"), m.clone()))
                .collect();
        }
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for (i, l) in self.listeners.iter().enumerate() {
            for (j, m) in l.modules.iter().enumerate() {
                if seen.insert(m.clone()) {
                    out.push((format!("listener[{i}].modules[{j}]"), m.clone()));
                }
            }
        }
        out
    }

    /// [`Config::module_entries`] without the keys.
    pub fn wanted_modules(&self) -> Vec<String> {
        self.module_entries().into_iter().map(|(_, e)| e).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use valvula_policy::Limits;
    use valvula_store::{Backend, redact_url};

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
