//! Editing valvulad.toml with toml_edit, so comments and layout survive; each change is
//! backed up, written atomically, and followed by a reload request to the daemon.

use std::path::Path;

use anyhow::{Context, bail};
use toml_edit::{Array, ArrayOfTables, DocumentMut, Item, Table, value};

use crate::cli::Global;
use crate::{daemonio, maincf};

fn read(config: &Path) -> anyhow::Result<DocumentMut> {
    let text = std::fs::read_to_string(config)
        .with_context(|| format!("cannot read {}", config.display()))?;
    text.parse::<DocumentMut>()
        .with_context(|| format!("{} is not valid TOML; fix it first", config.display()))
}

/// Checks the edited text as valvulad would, then writes it (backup first) and asks a
/// running daemon to reload.
fn save(g: &Global, doc: &DocumentMut, what: &str) -> anyhow::Result<()> {
    let text = doc.to_string();
    if let Err(e) = valvulad::config::parse(&text, &g.config) {
        bail!("the change would make the configuration invalid, nothing written:\n{e}");
    }
    if g.dry_run {
        print!(
            "{}",
            valvula_postfix::diff(&std::fs::read_to_string(&g.config)?, &text)
        );
        println!("INFO: dry run, {} not changed", g.config.display());
        return Ok(());
    }
    let b = maincf::backup(&g.config)?;
    maincf::write_atomically(&g.config, &text)?;
    println!("INFO: {what}; backup in {}", b.display());
    match daemonio::reload(&g.config) {
        Ok(()) => println!("INFO: valvulad reloaded"),
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
    let wanted = valvulad::config::parse_address(which).ok();
    let all = listeners(doc)?;
    all.iter_mut()
        .find(|t| {
            let addr = t.get("address").and_then(Item::as_str);
            t.get("name").and_then(Item::as_str) == Some(which)
                || addr == Some(which)
                || (wanted.is_some()
                    && addr.and_then(|a| valvulad::config::parse_address(a).ok()) == wanted)
        })
        .with_context(|| format!("no listener {which}; add it first (-a)"))
}

pub fn list_listeners(config: &Path) -> anyhow::Result<()> {
    let c = valvulad::config::load_file(config)?.config;
    for l in &c.listeners {
        println!("Listen: {} ({})", l.address, l.name);
        for m in &l.modules {
            println!("  Mod: {m}");
        }
    }
    Ok(())
}

pub fn list_modules(config: &Path) -> anyhow::Result<()> {
    let c = valvulad::config::load_file(config)?.config;
    let loaded = valvulad::host::wanted(&c);
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
    let parsed = valvulad::config::parse_address(address).map_err(anyhow::Error::msg)?;
    let mut doc = read(&g.config)?;
    let exists = listeners(&mut doc)?.iter().any(|t| {
        t.get("address")
            .and_then(Item::as_str)
            .and_then(|a| valvulad::config::parse_address(a).ok())
            == Some(parsed.clone())
    });
    if exists {
        println!("INFO: a listener at {parsed} already exists, nothing to do");
        return Ok(());
    }
    let mut t = Table::new();
    t.insert("name", value(parsed.to_string()));
    t.insert("address", value(parsed.to_string()));
    t.insert("modules", value(Array::new()));
    listeners(&mut doc)?.push(t);
    save(g, &doc, &format!("listener {parsed} added"))
}

pub fn add_module(g: &Global, module: &str, listener: &str) -> anyhow::Result<()> {
    let mut doc = read(&g.config)?;
    let t = find_listener(&mut doc, listener)?;
    if !t.contains_key("modules") {
        t.insert("modules", value(Array::new()));
    }
    let chain = t["modules"]
        .as_array_mut()
        .context("modules is not a list")?;
    if chain.iter().any(|v| v.as_str() == Some(module)) {
        println!("INFO: {module} already runs on {listener}, nothing to do");
        return Ok(());
    }
    chain.push(module);
    save(
        g,
        &doc,
        &format!("{module} added to the end of {listener}'s chain"),
    )
}

/// The `server.modules` list, created from the chains when the file relied on them.
fn server_modules<'d>(doc: &'d mut DocumentMut, config: &Path) -> anyhow::Result<&'d mut Array> {
    let current = valvulad::config::load_file(config)?.config;
    let from_chains = valvulad::host::wanted(&current);
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
    let mut doc = read(&g.config)?;
    let list = server_modules(&mut doc, &g.config)?;
    if list.iter().any(|v| v.as_str() == Some(module)) {
        println!("INFO: {module} is already enabled");
        return Ok(());
    }
    list.push(module);
    save(g, &doc, &format!("module {module} enabled"))
}

pub fn disable(g: &Global, module: &str) -> anyhow::Result<()> {
    let mut doc = read(&g.config)?;
    let list = server_modules(&mut doc, &g.config)?;
    let before = list.len();
    list.retain(|v| v.as_str() != Some(module));
    let mut removed_from = Vec::new();
    for t in listeners(&mut doc)?.iter_mut() {
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
        return Ok(());
    }
    if !removed_from.is_empty() {
        println!(
            "INFO: {module} taken out of the chain of {}",
            removed_from.join(", ")
        );
    }
    save(g, &doc, &format!("module {module} disabled"))
}

/// `-y`: the database, tested before it is saved; on failure the old values stay.
pub fn set_mysql(g: &Global, host: &str, db: &str, user: &str, pass: &str) -> anyhow::Result<()> {
    let url = format!("mysql://{user}@{host}/{db}");
    let storage = valvulad::store::StorageConfig {
        backend: valvulad::store::Backend::Mysql {
            url: url.clone(),
            password: (!pass.is_empty()).then(|| pass.to_owned()),
            pool_size: 2,
        },
        zone: valvulad::store::Zone::local().unwrap_or_default(),
        timeout: valvulad::store::DEFAULT_TIMEOUT,
    };
    crate::admin::with_store(&storage, |s| s.ping().map_err(anyhow::Error::from)).with_context(
        || format!("ERROR: credentials provided aren't working for {url}; previous values kept"),
    )?;
    let mut doc = read(&g.config)?;
    if !doc.contains_key("storage") {
        doc.insert("storage", Item::Table(Table::new()));
    }
    let st = doc["storage"]
        .as_table_mut()
        .context("storage is not a table")?;
    st.insert("backend", value("mysql"));
    st.insert("url", value(url.clone()));
    st.remove("path");
    st.remove("password_env");
    st.remove("password_file");
    if pass.is_empty() {
        st.remove("password");
    } else {
        st.insert("password", value(pass));
    }
    save(
        g,
        &doc,
        &format!("database set to {url} (connection tested)"),
    )
}

/// `-u`: the run-as user and group (checked to exist).
pub fn set_user(g: &Global, user: &str, group: &str) -> anyhow::Result<()> {
    let mut doc = read(&g.config)?;
    if !doc.contains_key("server") {
        doc.insert("server", Item::Table(Table::new()));
    }
    let server = doc["server"]
        .as_table_mut()
        .context("server is not a table")?;
    server.insert("user", value(user));
    server.insert("group", value(group));
    save(
        g,
        &doc,
        &format!("valvulad will run as {user}:{group} from its next start"),
    )
}

/// `import`: valvula.conf (XML) as valvulad.toml, checked as valvulad would load it.
pub fn import(file: &Path, output: Option<&Path>) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    if !valvulad::valvula_conf::is_xml(&text) {
        bail!("{} is not valvula's XML configuration", file.display());
    }
    let t = valvulad::valvula_conf::translate(&text, file)?;
    for w in &t.warnings {
        eprintln!("warning: {w}");
    }
    valvulad::config::parse(&t.toml, file).map_err(|e| anyhow::anyhow!("{e}"))?;
    match output {
        None => print!("{}", t.toml),
        Some(o) => {
            if o.exists() {
                bail!("{} exists; not overwritten", o.display());
            }
            std::fs::write(o, &t.toml).with_context(|| format!("cannot write {}", o.display()))?;
            println!("INFO: {} written from {}", o.display(), file.display());
        }
    }
    Ok(())
}
