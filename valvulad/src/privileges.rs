//! Dropping root after the sockets are bound: the run-as user's supplementary groups
//! (initgroups, which valvula forgot), then the group, then the user. Files the daemon
//! made as root and must keep using (the SQLite database, unix sockets) are handed over
//! first.

use std::ffi::CString;
use std::path::Path;

use anyhow::{Context, bail};
use nix::unistd::{Gid, Group, Uid, User};

/// The user and group ids the configuration asks for.
pub fn resolve(user: &str, group: Option<&str>) -> anyhow::Result<(User, Gid)> {
    let u = User::from_name(user)?.with_context(|| format!("no user {user:?}"))?;
    let gid = match group {
        Some(g) => {
            Group::from_name(g)?
                .with_context(|| format!("no group {g:?}"))?
                .gid
        }
        None => u.gid,
    };
    Ok((u, gid))
}

/// Gives `path` (and SQLite's -wal/-shm companions) to the run-as user.
pub fn hand_over(path: &Path, uid: Uid, gid: Gid) {
    let mut paths = vec![path.to_path_buf()];
    for suffix in ["-wal", "-shm", "-journal"] {
        paths.push(std::path::PathBuf::from(format!(
            "{}{suffix}",
            path.display()
        )));
    }
    for p in paths.iter().filter(|p| p.exists()) {
        if let Err(e) = nix::unistd::chown(p.as_path(), Some(uid), Some(gid)) {
            tracing::warn!(path = %p.display(), "cannot give the file to the run-as user: {e}");
        }
    }
}

/// Becomes `user`:`gid` for good. Only root can; anyone else is told so.
pub fn drop_to(user: &User, gid: Gid) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        if nix::unistd::geteuid() == user.uid {
            return Ok(());
        }
        bail!(
            "server.user = {:?} needs valvulad to be started as root",
            user.name
        );
    }
    let name = CString::new(user.name.as_str())?;
    nix::unistd::initgroups(&name, gid).context("initgroups")?;
    nix::unistd::setgid(gid).context("setgid")?;
    nix::unistd::setuid(user.uid).context("setuid")?;
    if nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
        bail!("root privileges could be regained after setuid; refusing to run");
    }
    tracing::info!(user = %user.name, uid = user.uid.as_raw(), gid = gid.as_raw(), "now running as {}", user.name);
    Ok(())
}
