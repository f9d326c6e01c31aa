//! Why a module was not loaded, precisely enough to say what to do.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A load error of the entry at `key` (`server.modules[0]`, `listener[1].modules[0]`).
    #[error("{key}: {source}")]
    At {
        key: String,
        #[source]
        source: Box<LoadError>,
    },
    #[error(
        "module {name:?}: no {candidates} in {dirs} (install it there, or add its directory to server.module_dirs)"
    )]
    NotFound {
        name: String,
        candidates: String,
        dirs: String,
    },
    #[error("{path}: cannot open {at}: {source}")]
    Walk {
        path: PathBuf,
        /// The component that failed, symbolic links resolved.
        at: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: refused: {file} is a {kind}, not a regular file")]
    NotAFile {
        path: PathBuf,
        file: PathBuf,
        kind: &'static str,
    },
    #[error(
        "{path}: refused: the file {file} (owner {}, mode {mode:04o}) is group- or world-writable; a module runs inside the daemon, so only its owner may change it: chmod go-w {file}",
        owner(*.uid)
    )]
    Writable {
        path: PathBuf,
        /// The file, symbolic links resolved.
        file: PathBuf,
        uid: u32,
        mode: u32,
    },
    #[error(
        "{path}: refused: the file {file} is owned by {} (mode {mode:04o}), not by {trusted}, who alone may change the daemon's code: chown root {file}",
        owner(*.uid)
    )]
    Owner {
        path: PathBuf,
        file: PathBuf,
        uid: u32,
        mode: u32,
        /// Who may own it, as words.
        trusted: String,
    },
    #[error(
        "{path}: refused: the directory {dir} (owner {}, mode {mode:04o}) is group- or world-writable{}, so others can put their own code in the module's place: chmod go-w {dir}, or install the module in a directory only root can write, such as {}",
        owner(*.uid),
        if *.mode & 0o1000 != 0 { " (the sticky bit does not stop others adding files)" } else { "" },
        valvula_config::DEFAULT_MODULE_DIR
    )]
    DirWritable {
        path: PathBuf,
        /// The directory, symbolic links resolved.
        dir: PathBuf,
        uid: u32,
        mode: u32,
    },
    #[error(
        "{path}: refused: the directory {dir} is owned by {} (mode {mode:04o}), not by {trusted}, and its owner can put other code in the module's place: chown root {dir}, or install the module elsewhere, such as {}",
        owner(*.uid),
        valvula_config::DEFAULT_MODULE_DIR
    )]
    DirOwner {
        path: PathBuf,
        dir: PathBuf,
        uid: u32,
        mode: u32,
        trusted: String,
    },
    #[error("{path}: cannot be loaded: {error}")]
    Open { path: PathBuf, error: String },
    #[error("{path}: not a valvulad module: no symbol vlv_module_v1")]
    MissingSymbol { path: PathBuf },
    #[error("{path}: not a valvulad module: bad magic {found:#010x} (expected {expected:#010x})")]
    BadMagic {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error(
        "{path}: built for module ABI {major}.{minor}, but this valvulad speaks ABI {host_major}.{host_minor} (major versions must match)"
    )]
    WrongMajor {
        path: PathBuf,
        major: u16,
        minor: u16,
        host_major: u16,
        host_minor: u16,
    },
    #[error(
        "{path}: built for module ABI {major}.{minor}, newer than this valvulad's ABI {host_major}.{host_minor}; upgrade valvulad"
    )]
    NewerMinor {
        path: PathBuf,
        major: u16,
        minor: u16,
        host_major: u16,
        host_minor: u16,
    },
    #[error(
        "{path}: module definition is {size} bytes, but ABI {major}.{minor} needs at least {need} (built against a broken header?)"
    )]
    ShortStruct {
        path: PathBuf,
        size: u32,
        need: usize,
        major: u16,
        minor: u16,
    },
    #[error(
        "{path}: unknown flags {flags:#x} in the module definition (ABI {host_major}.{host_minor} knows {known:#x})"
    )]
    UnknownFlags {
        path: PathBuf,
        flags: u32,
        known: u32,
        host_major: u16,
        host_minor: u16,
    },
    #[error("{path}: invalid module name {name:?} (1-64 bytes of A-Z a-z 0-9 _ . -)")]
    BadName { path: PathBuf, name: String },
    #[error("{path}: the module definition has no {hook} function")]
    MissingHook { path: PathBuf, hook: &'static str },
    #[error("{second}: module name {name:?} is already taken by {first}")]
    Duplicate {
        name: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("{path}: module {name:?} failed to initialise (init returned {status})")]
    InitFailed {
        path: PathBuf,
        name: String,
        status: i32,
    },
}

impl LoadError {
    /// The error itself, without the config key it was reported at.
    pub fn cause(&self) -> &LoadError {
        match self {
            LoadError::At { source, .. } => source.cause(),
            other => other,
        }
    }
}

/// `root`, `nobody (uid 65534)`, or `uid 4242` when no user has that uid.
pub fn owner(uid: u32) -> String {
    if uid == 0 {
        return "root".into();
    }
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(u)) => format!("{} (uid {uid})", u.name),
        _ => format!("uid {uid}"),
    }
}
