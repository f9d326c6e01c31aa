//! Where things are, as packaged, and what may sit at the admin socket's path.

use std::path::Path;

/// Default config file, as packaged.
pub const DEFAULT_PATH: &str = "/etc/valvula/valvulad.toml";
/// Where packaged modules are installed.
pub const DEFAULT_MODULE_DIR: &str = "/usr/lib/valvulad/modules";
/// Default admin socket.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/valvulad/admin.sock";

/// Default SQLite file.
pub const DEFAULT_SQLITE_PATH: &str = "/var/lib/valvula/valvula.db";

/// Why `path` cannot be the admin socket, if something that is not a socket is there.
/// valvulad replaces a stale socket at startup; anything else (a regular file, a
/// directory, a symbolic link, wherever it points) belongs to someone else and is never
/// removed. `valvulad -t` reports the same text under `server.admin_socket`.
pub fn admin_socket_problem(path: &Path) -> Option<String> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::FileTypeExt;
    // sockaddr_un holds 108 bytes, the final NUL included.
    if path.as_os_str().as_bytes().len() > 107 {
        return Some(format!(
            "{} is longer than a unix socket path may be (107 bytes): choose a shorter one",
            path.display()
        ));
    }
    // symlink_metadata: a symbolic link is judged as the link, never followed.
    let t = std::fs::symlink_metadata(path).ok()?.file_type();
    if t.is_socket() {
        return None;
    }
    let kind = if t.is_symlink() {
        "a symbolic link"
    } else if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else {
        "not a socket"
    };
    Some(format!(
        "{} exists and is {kind}; valvulad only replaces a stale socket there: remove it or choose another path",
        path.display()
    ))
}
