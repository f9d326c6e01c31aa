//! Editing valvulad.toml with toml_edit, so comments and layout survive; each change is
//! made under the file's lock on the file as it is then, backed up, written atomically,
//! and followed by a reload request to the daemon.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use toml_edit::{Array, ArrayOfTables, DocumentMut, Item, Table, value};

use crate::session::Global;
use crate::{daemon, files};

fn parse(text: &str, config: &Path) -> anyhow::Result<DocumentMut> {
    text.parse::<DocumentMut>()
        .with_context(|| format!("{} is not valid TOML; fix it first", config.display()))
}

/// What an edit of the document came to.
enum Outcome {
    /// Nothing to change (the edit said why).
    Nothing,
    /// Save, and say `what`.
    Save {
        what: String,
        /// Puts back what the edit did outside the document (a password file), should
        /// the document not be saved after all.
        undo: Option<Box<dyn FnOnce()>>,
        /// The text to check instead of the edited one (a dry run of `-y`, whose
        /// password file does not exist yet).
        check_as: Option<String>,
    },
}

fn save_as(what: impl Into<String>) -> anyhow::Result<Outcome> {
    Ok(Outcome::Save {
        what: what.into(),
        undo: None,
        check_as: None,
    })
}

/// One change of valvulad.toml: under the file's lock, read it as it is now, apply
/// `change`, check the result as valvulad would, back the file up, replace it
/// atomically; then ask a running daemon to reload.
fn edit(
    g: &Global,
    change: impl FnOnce(&mut DocumentMut, &Path) -> anyhow::Result<Outcome>,
) -> anyhow::Result<()> {
    let path = files::real_file(&g.config)?;
    let lock = if g.dry_run {
        None
    } else {
        files::check_dir(files::parent(&path))?;
        Some(files::EditLock::acquire(&path, ".lock", files::LOCK_WAIT)?)
    };
    let path = files::real_file(&g.config)?;
    let meta = std::fs::metadata(&path)?;
    let original = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mut doc = parse(&original, &path)?;
    let (what, undo, check_as) = match change(&mut doc, &path)? {
        Outcome::Nothing => return Ok(()),
        Outcome::Save {
            what,
            undo,
            check_as,
        } => (what, undo, check_as),
    };
    let text = doc.to_string();
    let written = (|| -> anyhow::Result<Option<PathBuf>> {
        if let Err(e) = valvula_config::parse(check_as.as_deref().unwrap_or(&text), &path) {
            bail!("the change would make the configuration invalid, nothing written:\n{e}");
        }
        if g.dry_run {
            print!("{}", valvula_postfix::diff(&original, &text));
            println!("INFO: dry run, {} not changed", g.config.display());
            return Ok(None);
        }
        let b = files::backup(&path, original.as_bytes(), &meta)?;
        files::replace_like(&path, text.as_bytes(), &meta, original.as_bytes())?;
        Ok(Some(b))
    })();
    let b = match written {
        Ok(Some(b)) => b,
        Ok(None) => return Ok(()),
        Err(e) => {
            if let Some(undo) = undo {
                undo();
            }
            return Err(e);
        }
    };
    drop(lock);
    println!("INFO: {what}; backup in {}", b.display());
    match daemon::reload(&g.config) {
        Ok(Ok(note)) => {
            println!("INFO: valvulad reloaded");
            if !note.is_empty() {
                println!("INFO: {note}");
            }
        }
        // The file is changed and valid, but the running daemon cannot take it (a port
        // in use, a module's refusal): its next start would fail the same way.
        Ok(Err(why)) => anyhow::bail!(
            "valvulad refused the changed configuration: {why}; {} is changed (backup in {}): \
             correct it or put the backup back before valvulad next starts",
            path.display(),
            b.display()
        ),
        Err(e) => println!(
            "INFO: valvulad was not reloaded ({e:#}); it reads the change at its next start or reload"
        ),
    }
    Ok(())
}

fn listeners(doc: &mut DocumentMut) -> anyhow::Result<&mut ArrayOfTables> {
    if !doc.contains_key("listener") {
        doc.insert("listener", Item::ArrayOfTables(ArrayOfTables::new()));
    }
    doc["listener"]
        .as_array_of_tables_mut()
        .context("listener is not a [[listener]] list")
}

/// The listener given by name or address.
fn find_listener<'d>(doc: &'d mut DocumentMut, which: &str) -> anyhow::Result<&'d mut Table> {
    let wanted = valvula_config::parse_address(which).ok();
    let all = listeners(doc)?;
    all.iter_mut()
        .find(|t| {
            let addr = t.get("address").and_then(Item::as_str);
            t.get("name").and_then(Item::as_str) == Some(which)
                || addr == Some(which)
                || (wanted.is_some()
                    && addr.and_then(|a| valvula_config::parse_address(a).ok()) == wanted)
        })
        .with_context(|| format!("no listener {which}; add it first (-a)"))
}

pub fn list_listeners(config: &Path) -> anyhow::Result<()> {
    let c = valvula_config::load_file(config)?.config;
    for l in &c.listeners {
        println!("Listen: {} ({})", l.address, l.name);
        for m in &l.modules {
            println!("  Mod: {m}");
        }
    }
    Ok(())
}

pub fn list_modules(config: &Path) -> anyhow::Result<()> {
    let c = valvula_config::load_file(config)?.config;
    let loaded = c.wanted_modules();
    let mut found = Vec::new();
    for dir in &c.server.module_dirs {
        let Ok(rd) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(stem) = name.strip_suffix(".so") {
                let module = stem.strip_prefix("lib").unwrap_or(stem).replace('_', "-");
                if module.starts_with("mod-") && !found.iter().any(|(m, _)| *m == module) {
                    found.push((module, e.path()));
                }
            }
        }
    }
    found.sort();
    if found.is_empty() {
        println!(
            "INFO: no modules in {}",
            c.server
                .module_dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for (m, p) in found {
        let state = if loaded.contains(&m) {
            "enabled"
        } else {
            "available"
        };
        println!("Module: {m} ({state}, {})", p.display());
    }
    Ok(())
}

pub fn add_listener(g: &Global, address: &str) -> anyhow::Result<()> {
    let parsed = valvula_config::parse_address(address).map_err(anyhow::Error::msg)?;
    edit(g, |doc, _| {
        let exists = listeners(doc)?.iter().any(|t| {
            t.get("address")
                .and_then(Item::as_str)
                .and_then(|a| valvula_config::parse_address(a).ok())
                == Some(parsed.clone())
        });
        if exists {
            println!("INFO: a listener at {parsed} already exists, nothing to do");
            return Ok(Outcome::Nothing);
        }
        let mut t = Table::new();
        t.insert("name", value(parsed.to_string()));
        t.insert("address", value(parsed.to_string()));
        t.insert("modules", value(Array::new()));
        listeners(doc)?.push(t);
        save_as(format!("listener {parsed} added"))
    })
}

pub fn add_module(g: &Global, module: &str, listener: &str) -> anyhow::Result<()> {
    edit(g, |doc, _| {
        let t = find_listener(doc, listener)?;
        if !t.contains_key("modules") {
            t.insert("modules", value(Array::new()));
        }
        let chain = t["modules"]
            .as_array_mut()
            .context("modules is not a list")?;
        if chain.iter().any(|v| v.as_str() == Some(module)) {
            println!("INFO: {module} already runs on {listener}, nothing to do");
            return Ok(Outcome::Nothing);
        }
        chain.push(module);
        save_as(format!("{module} added to the end of {listener}'s chain"))
    })
}

/// The `server.modules` list, created from the chains when the file relied on them.
fn server_modules<'d>(doc: &'d mut DocumentMut, config: &Path) -> anyhow::Result<&'d mut Array> {
    let current = valvula_config::load_file(config)?.config;
    let from_chains = current.wanted_modules();
    if !doc.contains_key("server") {
        doc.insert("server", Item::Table(Table::new()));
    }
    let server = doc["server"]
        .as_table_mut()
        .context("server is not a table")?;
    if !server.contains_key("modules") {
        let mut a = Array::new();
        for m in from_chains {
            a.push(m);
        }
        server.insert("modules", value(a));
    }
    server["modules"]
        .as_array_mut()
        .context("server.modules is not a list")
}

pub fn enable(g: &Global, module: &str) -> anyhow::Result<()> {
    edit(g, |doc, path| {
        let list = server_modules(doc, path)?;
        if list.iter().any(|v| v.as_str() == Some(module)) {
            println!("INFO: {module} is already enabled");
            return Ok(Outcome::Nothing);
        }
        list.push(module);
        save_as(format!("module {module} enabled"))
    })
}

pub fn disable(g: &Global, module: &str) -> anyhow::Result<()> {
    edit(g, |doc, path| {
        let list = server_modules(doc, path)?;
        let before = list.len();
        list.retain(|v| v.as_str() != Some(module));
        let mut removed_from = Vec::new();
        for t in listeners(doc)?.iter_mut() {
            let name = t
                .get("name")
                .or(t.get("address"))
                .and_then(Item::as_str)
                .unwrap_or("?")
                .to_owned();
            if let Some(chain) = t.get_mut("modules").and_then(Item::as_array_mut) {
                let n = chain.len();
                chain.retain(|v| v.as_str() != Some(module));
                if chain.len() != n {
                    removed_from.push(name);
                }
            }
        }
        let was = before != doc["server"]["modules"].as_array().map_or(0, Array::len);
        if !was && removed_from.is_empty() {
            println!("INFO: {module} is not enabled, nothing to do");
            return Ok(Outcome::Nothing);
        }
        if !removed_from.is_empty() {
            println!(
                "INFO: {module} taken out of the chain of {}",
                removed_from.join(", ")
            );
        }
        save_as(format!("module {module} disabled"))
    })
}

/// Where `-y` takes the database password from: never the command line, where every
/// local user sees it (`ps`, /proc/PID/cmdline).
#[derive(Debug, Clone)]
pub enum PasswordFrom {
    /// Asked on the terminal, without echo.
    Prompt,
    /// The first line of standard input.
    Stdin,
    /// A file's text (its trailing newline dropped).
    File(PathBuf),
}

/// The password, from where `from` says.
pub fn read_password(from: &PasswordFrom, prompt: &str) -> anyhow::Result<String> {
    use std::io::BufRead;
    let strip = |s: &str| s.trim_end_matches(['\r', '\n']).to_owned();
    match from {
        PasswordFrom::File(f) => {
            Ok(strip(&std::fs::read_to_string(f).with_context(|| {
                format!("cannot read the password file {}", f.display())
            })?))
        }
        PasswordFrom::Stdin => {
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .context("cannot read the password from standard input")?;
            Ok(strip(&line))
        }
        PasswordFrom::Prompt => {
            use nix::sys::termios::{LocalFlags, SetArg, tcgetattr, tcsetattr};
            use std::io::Write;
            let stdin = std::io::stdin();
            let saved = tcgetattr(&stdin).context("cannot read the terminal's settings")?;
            let mut quiet = saved.clone();
            quiet.local_flags.remove(LocalFlags::ECHO);
            quiet.local_flags.insert(LocalFlags::ECHONL);
            eprint!("{prompt}");
            let _ = std::io::stderr().flush();
            tcsetattr(&stdin, SetArg::TCSAFLUSH, &quiet)
                .context("cannot turn the terminal's echo off")?;
            let mut line = String::new();
            let read = stdin.lock().read_line(&mut line);
            let restored = tcsetattr(&stdin, SetArg::TCSAFLUSH, &saved);
            read.context("cannot read the password")?;
            restored.context("cannot turn the terminal's echo back on")?;
            Ok(strip(&line))
        }
    }
}

/// `valvulad.db-password` for `valvulad.toml`: the file `-y` keeps the password in, next
/// to the configuration (valvulad reads `password_file` relative to it).
fn password_file_name(config: &Path) -> String {
    let stem = config
        .file_stem()
        .map_or("valvulad".into(), |s| s.to_string_lossy());
    format!("{stem}.db-password")
}

/// Owner and mode for the password file: the configuration's owner; readable by the
/// group valvulad runs as when it drops privileges (it reads the file again at each
/// reload), by nobody else otherwise.
fn password_file_access(doc: &DocumentMut, config: &std::fs::Metadata) -> (u32, u32, u32) {
    let server = doc.get("server");
    let name = |k: &str| server.and_then(|s| s.get(k)).and_then(Item::as_str);
    let gid = match (name("user"), name("group")) {
        (_, Some(g)) => nix::unistd::Group::from_name(g)
            .ok()
            .flatten()
            .map(|g| g.gid.as_raw()),
        (Some(u), None) => nix::unistd::User::from_name(u)
            .ok()
            .flatten()
            .map(|u| u.gid.as_raw()),
        (None, None) => None,
    };
    match gid {
        Some(gid) => (config.uid(), gid, 0o640),
        None => (config.uid(), config.gid(), 0o600),
    }
}

/// `-y`: the database, tested before it is saved; on failure the old values stay. The
/// password goes to a file of its own (mode 0600, or 0640 for valvulad's group), never
/// into valvulad.toml, which is usually world-readable.
pub fn set_mysql(g: &Global, host: &str, db: &str, user: &str, pass: &str) -> anyhow::Result<()> {
    let url = format!("mysql://{user}@{host}/{db}");
    let storage = valvula_store::StorageConfig {
        backend: valvula_store::Backend::Mysql {
            url: url.clone(),
            password: (!pass.is_empty()).then(|| pass.to_owned()),
            pool_size: 2,
        },
        // The zone the daemon will count in: the database must agree with it.
        zone: valvula_config::load_file(&g.config)
            .map(|l| l.config.storage.zone)
            .or_else(|_| valvula_store::Zone::local())
            .unwrap_or_default(),
        timeout: valvula_store::DEFAULT_TIMEOUT,
        record_zone: false,
    };
    crate::database::with_store(&storage, |s| match s.ping() {
        Err(e @ valvula_store::StoreError::Refused(_)) => Err(anyhow::anyhow!(
            "ERROR: {url} belongs to other daemons: {e}"
        )),
        r => r.with_context(|| {
            format!("ERROR: credentials provided aren't working for {url}; previous values kept")
        }),
    })?;
    edit(g, |doc, path| {
        if !doc.contains_key("storage") {
            doc.insert("storage", Item::Table(Table::new()));
        }
        let st = doc["storage"]
            .as_table_mut()
            .context("storage is not a table")?;
        st.insert("backend", value("mysql"));
        st.insert("url", value(url.clone()));
        for k in ["path", "password", "password_env", "password_file"] {
            st.remove(k);
        }
        let mut undo: Option<Box<dyn FnOnce()>> = None;
        let mut check_as = None;
        let mut what = format!("database set to {url} (connection tested)");
        if !pass.is_empty() {
            let name = password_file_name(path);
            let file = files::parent(path).join(&name);
            st.insert("password_file", value(&name));
            let (uid, gid, mode) = password_file_access(doc, &std::fs::metadata(path)?);
            if g.dry_run {
                println!(
                    "INFO: dry run: the password would go to {} (mode {mode:04o})",
                    file.display()
                );
                // valvulad's check reads the file, which is not written: a stand-in.
                let mut stand_in = doc.clone();
                stand_in["storage"]["password_file"] = value("/dev/null");
                check_as = Some(stand_in.to_string());
            } else {
                let previous = std::fs::read(&file).ok();
                files::replace(
                    &file,
                    format!("{pass}\n").as_bytes(),
                    (uid, gid),
                    mode,
                    None,
                )
                .context("cannot write the password file; previous values kept")?;
                undo = Some(Box::new(move || match previous {
                    Some(p) => {
                        let _ = files::replace(&file, &p, (uid, gid), mode, None);
                    }
                    None => {
                        let _ = std::fs::remove_file(&file);
                    }
                }));
                what = format!(
                    "{what}; password in {} (mode {mode:04o})",
                    files::parent(path).join(&name).display()
                );
            }
        }
        Ok(Outcome::Save {
            what,
            undo,
            check_as,
        })
    })
}

/// `-u`: the run-as user and group (checked to exist). The password file `-y` wrote is
/// given to that group, since valvulad reads it again at each reload.
pub fn set_user(g: &Global, user: &str, group: &str) -> anyhow::Result<()> {
    edit(g, |doc, path| {
        if !doc.contains_key("server") {
            doc.insert("server", Item::Table(Table::new()));
        }
        let server = doc["server"]
            .as_table_mut()
            .context("server is not a table")?;
        server.insert("user", value(user));
        server.insert("group", value(group));
        let ours = password_file_name(path);
        let uses_ours = doc
            .get("storage")
            .and_then(|s| s.get("password_file"))
            .and_then(Item::as_str)
            == Some(ours.as_str());
        // Only for a user and group that exist: otherwise the check below refuses the
        // change, and the file must stay as it was.
        let gid = nix::unistd::Group::from_name(group)
            .ok()
            .flatten()
            .filter(|_| nix::unistd::User::from_name(user).ok().flatten().is_some());
        let mut what = format!("valvulad will run as {user}:{group} from its next start");
        if let (true, Some(gid), false) = (uses_ours, gid, g.dry_run) {
            let file = files::parent(path).join(&ours);
            if let Ok(text) = std::fs::read(&file) {
                let (uid, _, _) = password_file_access(doc, &std::fs::metadata(path)?);
                files::replace(&file, &text, (uid, gid.gid.as_raw()), 0o640, Some(&text))?;
                what = format!("{what}; {} readable by group {group}", file.display());
            }
        }
        save_as(what)
    })
}

/// `import`: valvula.conf (XML) as valvulad.toml, checked as valvulad would load it.
pub fn import(file: &Path, output: Option<&Path>) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    if !valvula_config::valvula_conf::is_xml(&text) {
        bail!("{} is not valvula's XML configuration", file.display());
    }
    let t = valvula_config::valvula_conf::translate(&text, file)?;
    for w in &t.warnings {
        eprintln!("warning: {w}");
    }
    valvula_config::parse(&t.toml, file).map_err(|e| anyhow::anyhow!("{e}"))?;
    match output {
        None => print!("{}", t.toml),
        Some(o) => {
            // Never through a planted link, never over a file; a database password in
            // the text keeps it from other users.
            let secret = valvula_config::parse(&t.toml, file).ok().is_some_and(|c| {
                matches!(
                    c.config.storage.backend,
                    valvula_store::Backend::Mysql {
                        password: Some(_),
                        ..
                    }
                )
            });
            files::create_new(o, t.toml.as_bytes(), if secret { 0o600 } else { 0o644 })?;
            println!("INFO: {} written from {}", o.display(), file.display());
        }
    }
    Ok(())
}
