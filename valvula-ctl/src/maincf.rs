//! Hooking listeners into Postfix's main.cf: find the file, edit it with
//! `valvula_postfix`, show the diff, keep a timestamped backup, write atomically, and
//! check with Postfix's own `postconf` that it reads what was meant (else restore).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use valvula_postfix::{MainCf, Position, diff};

use crate::cli::{Global, Io};

/// `inet:HOST:PORT` for a listener given as HOST:PORT, PORT or its name, checked against
/// valvulad's configuration.
pub fn policy_target(config: &Path, listener: &str) -> anyhow::Result<String> {
    let loaded = valvulad::config::load_file(config)?;
    let wanted = valvulad::config::parse_address(listener).ok();
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
        valvulad::config::ListenAddr::Tcp(a) => Ok(match a.ip() {
            std::net::IpAddr::V6(ip) => format!("inet:[{ip}]:{}", a.port()),
            ip => format!("inet:{ip}:{}", a.port()),
        }),
        valvulad::config::ListenAddr::Unix(p) => Ok(format!("unix:{}", p.display())),
    }
}

/// main.cf in `dir`, refusing a symlink that leads out of the Postfix directory.
fn main_cf(dir: &Path) -> anyhow::Result<PathBuf> {
    let path = dir.join("main.cf");
    let meta = std::fs::symlink_metadata(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if meta.file_type().is_symlink() {
        let real = std::fs::canonicalize(&path)?;
        let home = std::fs::canonicalize(dir)?;
        if !real.starts_with(&home) {
            bail!(
                "{} is a symbolic link to {}, outside {}; edit the real file's directory with --postfix-dir",
                path.display(),
                real.display(),
                home.display()
            );
        }
        return Ok(real);
    }
    if !meta.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    Ok(path)
}

/// Writes `text` to `path` through a temporary file and a rename, keeping the file's
/// mode and owner: readers see the old file or the new one, never half of one.
pub fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let meta = std::fs::metadata(path)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.valvula-ctl.{}",
        path.file_name().unwrap().to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> anyhow::Result<()> {
        let mut f = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(meta.mode() & 0o7777))?;
        std::os::unix::fs::chown(&tmp, Some(meta.uid()), Some(meta.gid()))?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write {}", path.display()))
}

/// `main.cf.valvula-ctl.YYYYmmdd-HHMMSS[.N]`, a copy of the file before the change.
pub fn backup(path: &Path) -> anyhow::Result<PathBuf> {
    let stamp = chrono::Local::now().format("%Y%m%d-%H%M%S");
    let base = format!("{}.valvula-ctl.{stamp}", path.display());
    let mut b = PathBuf::from(&base);
    let mut n = 1;
    while b.exists() {
        b = PathBuf::from(format!("{base}.{n}"));
        n += 1;
    }
    std::fs::copy(path, &b).with_context(|| format!("cannot write the backup {}", b.display()))?;
    Ok(b)
}

/// What Postfix reads for `stage` from the configuration in `dir`, if postconf exists.
fn postconf(dir: &Path, stage: &str) -> Option<anyhow::Result<String>> {
    let out = Command::new("postconf")
        .arg("-c")
        .arg(dir)
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
    let b = backup(&path)?;
    write_atomically(&path, &new)?;
    if let Some(read) = postconf(path.parent().unwrap_or(&g.postfix_dir), stage) {
        let value = read.unwrap_or_else(|e| format!("<{e}>"));
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
            write_atomically(&path, &old)?;
            bail!(
                "postconf reads {stage} = {value:?}, not what was meant; {} restored (backup {})",
                path.display(),
                b.display()
            );
        }
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
