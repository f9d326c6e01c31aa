//! Hooking listeners into Postfix's main.cf: find the file, lock it, edit it with
//! `valvula_postfix`, show the diff, check with Postfix's own `postconf` that it would
//! read what was meant, keep a timestamped backup and replace the file atomically.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use valvula_postfix::{MainCf, Position, diff};

use crate::files;
use crate::session::{Global, Io};

/// `inet:HOST:PORT` for a listener given as HOST:PORT, PORT or its name, checked against
/// valvulad's configuration.
pub fn policy_target(config: &Path, listener: &str) -> anyhow::Result<String> {
    let loaded = valvula_config::load_file(config)?;
    let wanted = valvula_config::parse_address(listener).ok();
    let l = loaded
        .config
        .listeners
        .iter()
        .find(|l| l.name == listener || Some(&l.address) == wanted.as_ref())
        .with_context(|| {
            format!(
                "no listener {listener} in {}; add it first (-a)",
                config.display()
            )
        })?;
    match &l.address {
        valvula_config::ListenAddr::Tcp(a) => Ok(match a.ip() {
            std::net::IpAddr::V6(ip) => format!("inet:[{ip}]:{}", a.port()),
            ip => format!("inet:{ip}:{}", a.port()),
        }),
        valvula_config::ListenAddr::Unix(p) => Ok(format!("unix:{}", p.display())),
    }
}

/// main.cf in `dir`, refusing a symlink that leads out of the Postfix directory.
fn main_cf(dir: &Path) -> anyhow::Result<PathBuf> {
    files::real_file(&dir.join("main.cf"))
}

/// What Postfix reads for `stage` from `text`, if postconf exists. Postfix is asked
/// before the file is replaced, on a private copy (back-dated: Postfix's reader waits
/// while a main.cf is younger than a few seconds), so a text Postfix would read wrongly
/// is never installed and nothing ever has to be put back.
fn postconf(text: &str, stage: &str) -> Option<anyhow::Result<String>> {
    let dir = match tempfile::Builder::new()
        .prefix("valvula-ctl-postconf.")
        .tempdir()
    {
        Ok(d) => d,
        Err(e) => {
            return Some(Err(
                anyhow::Error::new(e).context("cannot make a directory for postconf's check")
            ));
        }
    };
    let prepared = (|| -> std::io::Result<()> {
        let main = dir.path().join("main.cf");
        std::fs::write(&main, text)?;
        std::fs::write(dir.path().join("master.cf"), "")?;
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(600);
        std::fs::File::options()
            .write(true)
            .open(&main)?
            .set_modified(old)
    })();
    if let Err(e) = prepared {
        return Some(Err(
            anyhow::Error::new(e).context("cannot prepare postconf's check")
        ));
    }
    let out = Command::new("postconf")
        .arg("-c")
        .arg(dir.path())
        .arg("-h")
        .arg(stage)
        .output();
    match out {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => Some(Err(e.into())),
        Ok(o) if !o.status.success() => Some(Err(anyhow::anyhow!(
            "postconf failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ))),
        Ok(o) => Some(Ok(String::from_utf8_lossy(&o.stdout).trim().to_owned())),
    }
}

enum Change {
    Add(Position),
    Remove,
}

fn edit(
    g: &Global,
    io: &mut Io,
    stage: &str,
    listener: &str,
    change: Change,
) -> anyhow::Result<()> {
    if !valvula_postfix::STAGES.iter().any(|(s, _)| *s == stage) {
        bail!("{stage} is not a restriction stage (-s lists them)");
    }
    let target = policy_target(&g.config, listener)?;
    let decl = format!("check_policy_service {target}");
    let path = main_cf(&g.postfix_dir)?;
    let dir = files::parent(&path).to_owned();
    if !g.dry_run {
        files::check_dir(&dir)?;
    }
    // main.cf.tmp: the lock `postconf -e` takes too. Held from the read to the rename, so
    // the edit applies to the file as it is now and no other edit slips in between.
    let lock = if g.dry_run {
        None
    } else {
        Some(files::EditLock::acquire(&path, ".tmp", files::LOCK_WAIT)?)
    };
    // Read again under the lock (the file may have been replaced while this process
    // waited).
    let path = main_cf(&dir)?;
    let meta = std::fs::metadata(&path)?;
    let original =
        std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut cf = MainCf::parse_bytes(&original)
        .with_context(|| format!("{} cannot be edited safely", path.display()))?;
    let changed = match change {
        Change::Add(pos) => cf.add_hook(stage, &target, pos),
        Change::Remove => cf.remove_hook(stage, &target),
    }
    .with_context(|| format!("{} left untouched", path.display()))?;
    if !changed {
        match change {
            Change::Add(_) => println!("INFO: {decl} is already in {stage}; nothing to do"),
            Change::Remove => println!("INFO: {stage} has no {decl}; nothing to do"),
        }
        return Ok(());
    }
    let old = String::from_utf8_lossy(&original).into_owned();
    let new = cf.to_text();
    print!(
        "--- {}\n+++ {}\n{}",
        path.display(),
        path.display(),
        diff(&old, &new)
    );
    if g.dry_run {
        println!("INFO: dry run, {} not changed", path.display());
        return Ok(());
    }
    let agreed = match postconf(&new, stage) {
        None => {
            println!("INFO: postconf not found; the change is not checked against Postfix");
            None
        }
        Some(read) => {
            let value = read.with_context(|| {
                format!(
                    "Postfix cannot read the edited file; {} left untouched",
                    path.display()
                )
            })?;
            let ok = match change {
                Change::Add(Position::First) => value.starts_with(&decl),
                Change::Add(Position::Last) => value.ends_with(&decl),
                Change::Remove => !value
                    .split([',', ' '])
                    .collect::<Vec<_>>()
                    .windows(2)
                    .any(|w| w[0] == "check_policy_service" && w[1] == target),
            };
            if !ok {
                bail!(
                    "postconf would read {stage} = {value:?}, not what was meant; {} left untouched",
                    path.display()
                );
            }
            Some(value)
        }
    };
    let b = files::backup(&path, &original, &meta)?;
    files::replace_like(&path, new.as_bytes(), &meta, &original)?;
    drop(lock);
    if let Some(value) = agreed {
        println!("INFO: postconf agrees: {stage} = {value}");
    }
    println!(
        "INFO: {} changed; backup in {}",
        path.display(),
        b.display()
    );
    if g.reload || (!g.yes && io.confirm("Run postfix reload now?")) {
        let st = Command::new("postfix")
            .arg("-c")
            .arg(&g.postfix_dir)
            .arg("reload")
            .status()
            .context("cannot run postfix")?;
        if !st.success() {
            bail!("postfix reload failed ({st}); run it by hand");
        }
        println!("INFO: postfix reloaded");
    } else {
        println!("INFO: now run: postfix reload");
    }
    Ok(())
}

pub fn connect(
    g: &Global,
    io: &mut Io,
    stage: &str,
    listener: &str,
    pos: Position,
) -> anyhow::Result<()> {
    edit(g, io, stage, listener, Change::Add(pos))
}

pub fn disconnect(g: &Global, io: &mut Io, stage: &str, listener: &str) -> anyhow::Result<()> {
    edit(g, io, stage, listener, Change::Remove)
}

/// `-n`: every setting of main.cf, continuation lines joined, comments left out.
pub fn show(dir: &Path) -> anyhow::Result<()> {
    let path = main_cf(dir)?;
    let cf = MainCf::parse_bytes(&std::fs::read(&path)?)?;
    for (k, v) in cf.settings() {
        println!("{k} = {v}");
    }
    Ok(())
}
