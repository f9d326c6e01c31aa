//! Opening a module file so that the file checked is the file loaded.
//!
//! A module runs inside the daemon, as root while it starts. Checking a path with `stat`
//! and then loading it by name leaves a window in which anyone who can write to a
//! directory on the way can swap the file; so does a directory that others can write to
//! even with a perfect file. Here the path is walked one component at a time from `/`
//! with `openat(O_PATH | O_NOFOLLOW)`: every directory passed through is checked on its
//! open descriptor (owned by root or the daemon's user, not group- or world-writable; the
//! sticky bit does not help, anyone may still add files), symbolic links are read
//! through their descriptors and followed by the walk itself (so the directories of
//! their targets are checked as well: operators symlink modules), and the file is
//! checked on the descriptor that `dlopen` then loads as `/proc/self/fd/N`. Since nobody
//! but root and the daemon's user can change anything on the way, nothing can be swapped
//! between the check and the load.

use std::collections::{BTreeMap, VecDeque};
use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

use rustix::fs::{FileType, Mode, OFlags};

use super::LoadError;
use valvula_store::sync::Unpoisoned;

/// Symbolic links followed in one walk before giving up (Linux's own limit).
const MAX_LINKS: u32 = 40;

/// Who may own a module file and every directory above it.
#[derive(Clone, Debug)]
pub struct Trust {
    uids: Vec<u32>,
    described: String,
}

impl Trust {
    /// Root, the user the daemon runs as, and the user it drops to (`server.user`): the
    /// only users who can change the daemon's code anyway.
    pub fn new(user: Option<&str>) -> Trust {
        let mut uids = vec![0];
        let configured = user
            .and_then(|u| nix::unistd::User::from_name(u).ok().flatten())
            .map(|u| u.uid.as_raw());
        for uid in [Some(nix::unistd::geteuid().as_raw()), configured]
            .into_iter()
            .flatten()
        {
            if !uids.contains(&uid) {
                uids.push(uid);
            }
        }
        let described = uids
            .iter()
            .map(|&u| super::error::owner(u))
            .collect::<Vec<_>>()
            .join(" or ");
        Trust { uids, described }
    }

    fn trusts(&self, uid: u32) -> bool {
        self.uids.contains(&uid)
    }
}

impl std::fmt::Display for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.described)
    }
}

/// A file's identity while it exists: device and inode.
pub type FileId = (u64, u64);

/// A module file that passed every check, held open.
#[derive(Debug)]
pub struct Checked {
    fd: OwnedFd,
    pub id: FileId,
    /// The file's path with every symbolic link resolved, as the walk went.
    pub real: PathBuf,
}

enum Step {
    Root,
    Parent,
    Name(OsString),
}

fn steps_of(path: &Path) -> VecDeque<Step> {
    path.components()
        .filter_map(|c| match c {
            Component::RootDir | Component::Prefix(_) => Some(Step::Root),
            Component::CurDir => None,
            Component::ParentDir => Some(Step::Parent),
            Component::Normal(n) => Some(Step::Name(n.to_owned())),
        })
        .collect()
}

fn kind(ft: FileType) -> &'static str {
    match ft {
        FileType::RegularFile => "regular file",
        FileType::Directory => "directory",
        FileType::Symlink => "symbolic link",
        FileType::Fifo => "named pipe",
        FileType::Socket => "socket",
        FileType::CharacterDevice => "character device",
        FileType::BlockDevice => "block device",
        FileType::Unknown => "file of unknown type",
    }
}

/// Walks `path` from `/` checking every directory, and opens the file it names (without
/// reading or running anything in it). Relative paths are taken from the current
/// directory, whose own path is walked and checked from `/` as well.
pub fn open_checked(path: &Path, trust: &Trust) -> Result<Checked, LoadError> {
    let fail = |at: &Path, source: std::io::Error| LoadError::Walk {
        path: path.to_owned(),
        at: at.to_owned(),
        source,
    };
    let absolute = if path.is_absolute() {
        path.to_owned()
    } else {
        let cwd = std::env::current_dir().map_err(|e| fail(Path::new("."), e))?;
        cwd.join(path)
    };
    let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let root = PathBuf::from("/");
    let root_fd = rustix::fs::open("/", flags | OFlags::DIRECTORY, Mode::empty())
        .map_err(|e| fail(&root, e.into()))?;
    check_dir(path, &root, &root_fd, trust)?;
    // The directories the walk is in, each checked, each from its parent: `..` goes
    // back one, as the kernel would (nobody untrusted can move them meanwhile).
    let mut stack: Vec<(OwnedFd, PathBuf)> = vec![(root_fd, root)];
    let mut steps = steps_of(&absolute);
    let mut links = 0;
    while let Some(step) = steps.pop_front() {
        let name = match step {
            Step::Root => {
                stack.truncate(1);
                continue;
            }
            Step::Parent => {
                if stack.len() > 1 {
                    stack.pop();
                }
                continue;
            }
            Step::Name(n) => n,
        };
        let (dir, dir_path) = stack.last().expect("the root is never popped");
        let at = dir_path.join(&name);
        let fd = rustix::fs::openat(dir, name.as_os_str(), flags, Mode::empty())
            .map_err(|e| fail(&at, e.into()))?;
        let st = rustix::fs::fstat(&fd).map_err(|e| fail(&at, e.into()))?;
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Symlink => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(fail(&at, rustix::io::Errno::LOOP.into()));
                }
                // Read through the link's own descriptor: what was opened is what is
                // followed. Its directory was checked, so only trusted users wrote it.
                let target =
                    rustix::fs::readlinkat(&fd, "", Vec::new()).map_err(|e| fail(&at, e.into()))?;
                let target = PathBuf::from(OsString::from_vec(target.into_bytes()));
                let mut next = steps_of(&target);
                next.extend(steps.drain(..));
                steps = next;
            }
            FileType::Directory => {
                check_dir(path, &at, &fd, trust)?;
                stack.push((fd, at));
            }
            _ if !steps.is_empty() => {
                return Err(fail(&at, rustix::io::Errno::NOTDIR.into()));
            }
            FileType::RegularFile => {
                let (uid, mode) = (st.st_uid, st.st_mode & 0o7777);
                if !trust.trusts(uid) {
                    return Err(LoadError::Owner {
                        path: path.to_owned(),
                        file: at,
                        uid,
                        mode,
                        trusted: trust.to_string(),
                    });
                }
                if mode & 0o022 != 0 {
                    return Err(LoadError::Writable {
                        path: path.to_owned(),
                        file: at,
                        uid,
                        mode,
                    });
                }
                // The kernel's types: u64 on 64-bit Linux, narrower on some others.
                #[allow(clippy::useless_conversion)]
                let id = (u64::from(st.st_dev), u64::from(st.st_ino));
                return Ok(Checked { fd, id, real: at });
            }
            other => {
                return Err(LoadError::NotAFile {
                    path: path.to_owned(),
                    file: at,
                    kind: kind(other),
                });
            }
        }
    }
    let (_, last) = stack.pop().expect("the root is never popped");
    Err(LoadError::NotAFile {
        path: path.to_owned(),
        file: last,
        kind: "directory",
    })
}

fn check_dir(path: &Path, dir: &Path, fd: &OwnedFd, trust: &Trust) -> Result<(), LoadError> {
    let st = rustix::fs::fstat(fd).map_err(|e| LoadError::Walk {
        path: path.to_owned(),
        at: dir.to_owned(),
        source: e.into(),
    })?;
    let (uid, mode) = (st.st_uid, st.st_mode & 0o7777);
    if !trust.trusts(uid) {
        return Err(LoadError::DirOwner {
            path: path.to_owned(),
            dir: dir.to_owned(),
            uid,
            mode,
            trusted: trust.to_string(),
        });
    }
    if mode & 0o022 != 0 {
        return Err(LoadError::DirWritable {
            path: path.to_owned(),
            dir: dir.to_owned(),
            uid,
            mode,
        });
    }
    Ok(())
}

/// Descriptors of every file `dlopen` was given, by identity, kept open for good.
///
/// glibc finds an already loaded library by the *name* it was opened with before it
/// looks at any file, so once `/proc/self/fd/7` is loaded, a later `dlopen` of
/// `/proc/self/fd/7` returns that library whatever descriptor 7 then is. Keeping the
/// descriptor open keeps the name meaning the same file for as long as the library
/// stays (modules are never unloaded); one descriptor per module file.
static KEPT: Mutex<BTreeMap<FileId, OwnedFd>> = Mutex::new(BTreeMap::new());

/// Runs `load` (the `dlopen`) with a name for exactly the file `checked` holds open:
/// `/proc/self/fd/N`. The descriptor stays open while `load` runs, and for good once it
/// has succeeded.
pub fn load_checked<T, E>(
    checked: Checked,
    load: impl FnOnce(&str) -> Result<T, E>,
) -> Result<T, E> {
    let mut kept = KEPT.locked();
    // The same file loaded before: its name already means it (and only it).
    let fd = kept
        .get(&checked.id)
        .map_or(checked.fd.as_raw_fd(), AsRawFd::as_raw_fd);
    let result = load(&proc_name(fd));
    if result.is_ok() {
        kept.entry(checked.id).or_insert(checked.fd);
    }
    result
}

/// The name under which the kernel opens the file behind descriptor `fd` of this process.
pub fn proc_name(fd: i32) -> String {
    format!("/proc/self/fd/{fd}")
}
