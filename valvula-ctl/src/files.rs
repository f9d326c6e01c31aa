//! Replacing a configuration file safely when other programs (a second valvula-ctl,
//! `postconf -e`, a local user with write access somewhere) may be at it too.
//!
//! - An edit runs under an exclusive lock on a file next to the one it changes, and
//!   reads the file only once it holds the lock, so concurrent edits queue up instead
//!   of overwriting each other.
//! - Every file valvula-ctl creates (the new version, a backup, a password file) is
//!   created with `O_CREAT|O_EXCL|O_NOFOLLOW` and mode 0600, and gets its final owner
//!   and mode only once it is complete: a planted symbolic link is never followed and an
//!   existing file is never overwritten.
//! - Just before the rename the file is read again: if something that does not take the
//!   lock changed it meanwhile, nothing is written.

use std::fs::{File, Metadata, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::fcntl::{Flock, FlockArg};

/// How long an edit waits for another one to finish before it gives up.
pub const LOCK_WAIT: Duration = Duration::from_secs(120);

/// The real file behind `path`: a symbolic link is followed only while it stays inside
/// `path`'s own directory tree (a link elsewhere would let the edit land in a place the
/// operator did not name).
pub fn real_file(path: &Path) -> anyhow::Result<PathBuf> {
    let meta = std::fs::symlink_metadata(path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let dir = parent(path);
    let real = if meta.file_type().is_symlink() {
        let real = std::fs::canonicalize(path)
            .with_context(|| format!("{} is a symbolic link that leads nowhere", path.display()))?;
        let home = std::fs::canonicalize(dir)?;
        if !real.starts_with(&home) {
            bail!(
                "{} is a symbolic link to {}, outside {}; edit the real file's directory instead",
                path.display(),
                real.display(),
                home.display()
            );
        }
        real
    } else {
        path.to_owned()
    };
    let meta = std::fs::symlink_metadata(&real)?;
    if !meta.is_file() {
        bail!("{} is not a regular file", real.display());
    }
    if meta.nlink() > 1 {
        bail!(
            "{} has {} hard links; replacing it would leave the other names with the old text. Make it a single file (or a symbolic link) first",
            real.display(),
            meta.nlink()
        );
    }
    Ok(real)
}

pub fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Refuses a directory in which someone other than root and the user running
/// valvula-ctl could replace files: there neither the lock nor the atomic rename would
/// protect anything.
pub fn check_dir(dir: &Path) -> anyhow::Result<()> {
    let meta = std::fs::metadata(dir)
        .with_context(|| format!("cannot read directory {}", dir.display()))?;
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != me {
        bail!(
            "{} belongs to uid {}, neither root nor you (uid {me}): that user could replace files there while valvula-ctl edits them. Give it to root (chown root {})",
            dir.display(),
            meta.uid(),
            dir.display()
        );
    }
    if meta.mode() & 0o002 != 0 {
        bail!(
            "{} is writable by every user (mode {:04o}): any of them could replace files there while valvula-ctl edits them. Remove that (chmod o-w {})",
            dir.display(),
            meta.mode() & 0o7777,
            dir.display()
        );
    }
    Ok(())
}

/// An exclusive lock for editing one file, held until dropped.
///
/// The lock is a `flock` on `<file><suffix>` in the file's directory: for main.cf that is
/// `main.cf.tmp`, the file Postfix's own `postconf -e` locks (and then renames over
/// main.cf) in its edit protocol, so valvula-ctl and postconf wait for each other. A
/// holder removes the lock file before it lets go; whoever got the lock on a file that
/// is no longer under that name tries again (as Postfix's edit_file.c does).
pub struct EditLock {
    _lock: Flock<File>,
    path: PathBuf,
    id: (u64, u64),
}

impl EditLock {
    pub fn acquire(file: &Path, suffix: &str, wait: Duration) -> anyhow::Result<EditLock> {
        let mut name = file
            .file_name()
            .context("a file name is needed")?
            .to_os_string();
        name.push(suffix);
        let path = parent(file).join(name);
        let start = Instant::now();
        let mut told = false;
        loop {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .mode(0o600)
                .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
                .open(&path)
                .map_err(|e| {
                    let why = if e.raw_os_error() == Some(nix::libc::ELOOP) {
                        "it is a symbolic link; remove it".to_owned()
                    } else {
                        e.to_string()
                    };
                    anyhow::anyhow!(
                        "cannot create the lock file {} ({why}); valvula-ctl locks {} there before editing it, and must be able to create files in {}",
                        path.display(),
                        file.display(),
                        parent(file).display()
                    )
                })?;
            let lock = match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
                Ok(l) => l,
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                    if start.elapsed() >= wait {
                        bail!(
                            "{} is being edited by another valvula-ctl or postconf -e (it has held {} for {} s); nothing changed, try again",
                            file.display(),
                            path.display(),
                            wait.as_secs()
                        );
                    }
                    if !told && start.elapsed() > Duration::from_secs(2) {
                        eprintln!(
                            "valvula-ctl: waiting for another edit of {} to finish",
                            file.display()
                        );
                        told = true;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                Err((_, e)) => bail!("cannot lock {}: {e}", path.display()),
            };
            let held = lock.metadata()?;
            // The previous holder may have removed (or postconf renamed) the file while
            // this process waited: a lock on a file no longer under that name locks
            // nothing.
            match std::fs::symlink_metadata(&path) {
                Ok(now) if now.dev() == held.dev() && now.ino() == held.ino() => {}
                _ => continue,
            }
            if !held.is_file() {
                bail!("the lock file {} is not a regular file", path.display());
            }
            return Ok(EditLock {
                _lock: lock,
                id: (held.dev(), held.ino()),
                path,
            });
        }
    }
}

impl Drop for EditLock {
    fn drop(&mut self) {
        // Removed while still locked, and only if it is still ours: a waiter then sees
        // that its file is gone and starts again.
        if let Ok(m) = std::fs::symlink_metadata(&self.path)
            && (m.dev(), m.ino()) == self.id
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Creates `dir/name` exclusively (never through a symbolic link, never over an existing
/// file), mode 0600.
fn create_exclusive(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(path)
}

/// A new file in `dir` named `{prefix}{n}` for the first free n, created exclusively.
fn create_numbered(
    dir: &Path,
    prefix: &str,
    first: Option<&str>,
) -> anyhow::Result<(File, PathBuf)> {
    let candidates = first
        .map(str::to_owned)
        .into_iter()
        .chain((1..1000).map(|n| format!("{prefix}{n}")));
    for name in candidates {
        let p = dir.join(&name);
        match create_exclusive(&p) {
            Ok(f) => return Ok((f, p)),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot create {}", p.display())),
        }
    }
    bail!(
        "cannot create a new file {prefix}N in {}: 1000 names taken",
        dir.display()
    )
}

/// Writes and syncs `bytes`, then gives the file `owner` and `mode`.
fn fill(
    f: &mut File,
    path: &Path,
    bytes: &[u8],
    owner: (u32, u32),
    mode: u32,
) -> anyhow::Result<()> {
    f.write_all(bytes)?;
    let m = f.metadata()?;
    if (m.uid(), m.gid()) != owner {
        std::os::unix::fs::fchown(&*f, Some(owner.0), Some(owner.1)).with_context(|| {
            format!(
                "cannot give {} the owner {}:{}",
                path.display(),
                owner.0,
                owner.1
            )
        })?;
    }
    f.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))?;
    f.sync_all()?;
    Ok(())
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// `<file>.valvula-ctl.YYYYmmdd-HHMMSS[.N]`, a copy of `bytes` (the file before the
/// change) with the file's owner and mode.
pub fn backup(path: &Path, bytes: &[u8], like: &Metadata) -> anyhow::Result<PathBuf> {
    let name = path
        .file_name()
        .context("a file name is needed")?
        .to_string_lossy();
    let stamp = chrono::Local::now().format("%Y%m%d-%H%M%S");
    let base = format!("{name}.valvula-ctl.{stamp}");
    let (mut f, b) = create_numbered(parent(path), &format!("{base}."), Some(&base))
        .context("cannot write the backup")?;
    if let Err(e) = fill(&mut f, &b, bytes, (like.uid(), like.gid()), like.mode()) {
        let _ = std::fs::remove_file(&b);
        return Err(e.context(format!("cannot write the backup {}", b.display())));
    }
    Ok(b)
}

/// Replaces `path` with `bytes` through a new file and a rename, giving it `owner` and
/// `mode`: readers see the old file or the new one, never half of one. With `expected`,
/// the file must still hold exactly that (what the edit started from) just before the
/// rename; otherwise nothing is written.
pub fn replace(
    path: &Path,
    bytes: &[u8],
    owner: (u32, u32),
    mode: u32,
    expected: Option<&[u8]>,
) -> anyhow::Result<()> {
    let dir = parent(path);
    let name = path
        .file_name()
        .context("a file name is needed")?
        .to_string_lossy();
    let (mut f, tmp) = create_numbered(
        dir,
        &format!(".{name}.valvula-ctl.{}.", std::process::id()),
        None,
    )?;
    let result = (|| -> anyhow::Result<()> {
        fill(&mut f, &tmp, bytes, owner, mode)?;
        if let Some(expected) = expected {
            let mut now = Vec::new();
            File::open(path)
                .and_then(|mut f| f.read_to_end(&mut now))
                .with_context(|| format!("cannot read {} again", path.display()))?;
            if now != expected {
                bail!(
                    "{} changed while valvula-ctl was editing it (by a program that does not take the lock); nothing written, run the command again",
                    path.display()
                );
            }
        }
        std::fs::rename(&tmp, path)?;
        sync_dir(dir);
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("{} not changed", path.display()))
}

/// [`replace`] keeping the file's own owner and mode.
pub fn replace_like(
    path: &Path,
    bytes: &[u8],
    like: &Metadata,
    expected: &[u8],
) -> anyhow::Result<()> {
    replace(
        path,
        bytes,
        (like.uid(), like.gid()),
        like.mode(),
        Some(expected),
    )
}

/// Creates `path`, which must not exist yet, with `bytes` and `mode` (owned by the user
/// running valvula-ctl); never through a symbolic link.
pub fn create_new(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let mut f = create_exclusive(path).map_err(|e| {
        if e.kind() == ErrorKind::AlreadyExists {
            anyhow::anyhow!("{} exists; not overwritten", path.display())
        } else {
            anyhow::anyhow!("cannot create {}: {e}", path.display())
        }
    })?;
    let me = (
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    );
    if let Err(e) = fill(&mut f, path, bytes, me, mode) {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn setup() -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("main.cf");
        std::fs::write(&p, "a = 1\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        (d, p)
    }

    /// The temporary file's first names are taken by planted links (one dangling, one to
    /// a file outside): neither is followed, and the file is still replaced.
    #[test]
    fn replace_never_follows_a_planted_link() {
        let (d, p) = setup();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, "precious\n").unwrap();
        let dangling = outside.path().join("created-by-valvula-ctl");
        let prefix = format!(".main.cf.valvula-ctl.{}.", std::process::id());
        symlink(&dangling, d.path().join(format!("{prefix}1"))).unwrap();
        symlink(&victim, d.path().join(format!("{prefix}2"))).unwrap();
        let like = std::fs::metadata(&p).unwrap();
        replace_like(&p, b"a = 2\n", &like, b"a = 1\n").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "a = 2\n");
        assert_eq!(
            std::fs::metadata(&p).unwrap().mode() & 0o7777,
            0o640,
            "mode not kept"
        );
        assert_eq!(
            std::fs::read_to_string(&victim).unwrap(),
            "precious\n",
            "a link to an outside file was written through"
        );
        assert!(
            !dangling.exists(),
            "a dangling link was followed: {} created",
            dangling.display()
        );
    }

    /// The backup's name is a dangling link, and the next one a link to a file outside:
    /// the backup goes under a third name, with the original's mode.
    #[test]
    fn backup_never_follows_a_planted_link() {
        let (d, p) = setup();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, "precious\n").unwrap();
        let dangling = outside.path().join("created-by-valvula-ctl");
        // Plant links for this second and the next few, in case the clock ticks.
        let now = chrono::Local::now();
        for s in 0..5 {
            let stamp = (now + chrono::Duration::seconds(s)).format("%Y%m%d-%H%M%S");
            let base = d.path().join(format!("main.cf.valvula-ctl.{stamp}"));
            symlink(&dangling, &base).unwrap();
            symlink(&victim, format!("{}.1", base.display())).unwrap();
        }
        let like = std::fs::metadata(&p).unwrap();
        let b = backup(&p, b"a = 1\n", &like).unwrap();
        let bm = std::fs::symlink_metadata(&b).unwrap();
        assert!(bm.is_file(), "backup {} is not a regular file", b.display());
        assert_eq!(bm.mode() & 0o7777, 0o640, "backup mode");
        assert_eq!(std::fs::read_to_string(&b).unwrap(), "a = 1\n");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
        assert!(!dangling.exists(), "a dangling link was followed");
    }

    #[test]
    fn replace_refuses_when_the_file_changed_meanwhile() {
        let (_d, p) = setup();
        let like = std::fs::metadata(&p).unwrap();
        let e = replace_like(&p, b"a = 2\n", &like, b"a = 0\n").unwrap_err();
        assert!(
            format!("{e:#}").contains("changed while valvula-ctl was editing it"),
            "{e:#}"
        );
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "a = 1\n");
        let left: Vec<_> = std::fs::read_dir(p.parent().unwrap())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left.len(), 1, "temporary files left behind: {left:?}");
    }

    /// A second holder waits; the lock file is gone afterwards.
    #[test]
    fn the_lock_excludes_and_cleans_up() {
        let (d, p) = setup();
        let first = EditLock::acquire(&p, ".tmp", LOCK_WAIT).unwrap();
        let e = EditLock::acquire(&p, ".tmp", Duration::from_millis(100))
            .err()
            .expect("a second lock was granted while the first was held");
        assert!(
            format!("{e:#}").contains("being edited by another"),
            "{e:#}"
        );
        drop(first);
        assert!(
            !d.path().join("main.cf.tmp").exists(),
            "lock file left behind"
        );
        let again = EditLock::acquire(&p, ".tmp", Duration::from_millis(100));
        assert!(again.is_ok(), "{:?}", again.err());
    }

    #[test]
    fn a_planted_lock_link_is_refused() {
        let (d, p) = setup();
        let outside = tempfile::tempdir().unwrap();
        symlink(outside.path().join("x"), d.path().join("main.cf.tmp")).unwrap();
        let e = EditLock::acquire(&p, ".tmp", LOCK_WAIT)
            .err()
            .expect("locked through a symbolic link");
        assert!(format!("{e:#}").contains("symbolic link"), "{e:#}");
        assert!(!outside.path().join("x").exists(), "link followed");
    }
}
