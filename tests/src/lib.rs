//! Test harness: an in-process daemon on 127.0.0.1:0, a raw-byte policy client, the C
//! compiler, a `valvulad` process under test, and a throw-away Postfix.

pub mod client;
pub mod daemon;
pub mod db;
pub mod galera;
pub mod inproc;
pub mod postfix;
pub mod script;

use std::path::{Path, PathBuf};
use std::process::Command;

/// `target/debug` (or the profile in use): where cargo put the binaries and module
/// cdylibs this test binary was built with.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("deps dir");
    deps.parent().expect("profile dir").to_owned()
}

/// Repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// Polls `f` every 20 ms until it holds; panics naming `what` after `timeout`. Tests
/// wait for conditions, never for a time that usually suffices (a loaded machine takes
/// longer).
pub fn wait_until(what: &str, timeout: std::time::Duration, mut f: impl FnMut() -> bool) {
    let end = std::time::Instant::now() + timeout;
    while !f() {
        assert!(
            std::time::Instant::now() < end,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// [`wait_until`] for async tests: polls `cond` every 20 ms until it holds or
/// `timeout` passes, and says whether it held (the caller's assertion gives context).
pub async fn eventually(timeout: std::time::Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < end {
        if cond() {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    cond()
}

/// A port free a moment ago, for servers that take a port number rather than a bound
/// socket (Postfix, a private mariadbd, valvula's XML configuration): valvulad's own
/// listeners bind `:0` and report the port they got instead. Another process may take
/// it in between; the callers' servers then fail to start and say so.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port on 127.0.0.1")
}

/// A module built by cargo, e.g. `module_path("mod_test")` → target/debug/libmod_test.so.
pub fn module_path(crate_name: &str) -> PathBuf {
    let p = target_dir().join(format!("lib{crate_name}.so"));
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (scripts/test.sh does: cargo build --workspace)",
        p.display()
    );
    p
}

pub fn valvulad_bin() -> PathBuf {
    let p = target_dir().join("valvulad");
    assert!(
        p.exists(),
        "{} is missing: cargo build --workspace",
        p.display()
    );
    p
}

/// Compiles C `sources` into a shared object `out` against include/valvula/module.h.
pub fn cc_shared(sources: &[&Path], out: &Path, defines: &[&str]) {
    let defines: Vec<String> = defines.iter().map(|d| format!("-D{d}")).collect();
    let mut flags = vec!["-std=c99"];
    flags.extend(defines.iter().map(String::as_str));
    compile_shared("CC", "cc", &flags, sources, out);
}

/// Compiles C `sources` into a shared object `out` against the header in
/// `include_dir` (an older, frozen header) instead of include/valvula/module.h.
pub fn cc_shared_against(include_dir: &Path, sources: &[&Path], out: &Path, defines: &[&str]) {
    let defines: Vec<String> = defines.iter().map(|d| format!("-D{d}")).collect();
    let inc = format!("-I{}", include_dir.display());
    let mut flags = vec!["-std=c99", inc.as_str()];
    flags.extend(defines.iter().map(String::as_str));
    compile_shared("CC", "cc", &flags, sources, out);
}

/// Compiles C++ `sources` into a shared object `out` against include/valvula/module.h,
/// as the header tells a C++ author to (C++11, symbols hidden unless exported).
pub fn cxx_shared(sources: &[&Path], out: &Path) {
    compile_shared(
        "CXX",
        "c++",
        &["-x", "c++", "-std=c++11", "-fvisibility=hidden"],
        sources,
        out,
    );
}

/// `$env` (else `default`) with `flags`, warnings as errors, into a shared object.
fn compile_shared(env: &str, default: &str, flags: &[&str], sources: &[&Path], out: &Path) {
    let compiler = std::env::var(env).unwrap_or_else(|_| default.into());
    let o = Command::new(&compiler)
        .args(flags)
        .args([
            "-Wall",
            "-Wextra",
            "-pedantic",
            "-Werror",
            "-shared",
            "-fPIC",
            "-o",
        ])
        .arg(out)
        .arg("-I")
        .arg(repo_root().join("include"))
        .args(sources)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {compiler}: {e}"));
    assert!(
        o.status.success(),
        "{compiler} failed for {sources:?}:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A temporary directory the daemon accepts modules from: under `target/`, mode 0755.
/// The system's temporary directory (`/tmp`, mode 1777) is refused, as any directory
/// others can write to: they could put their own code in a module's place.
pub fn module_tempdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let base = target_dir()
        .parent()
        .expect("target dir")
        .join("module-tests");
    std::fs::create_dir_all(&base).expect("create target/module-tests");
    let dir = tempfile::Builder::new()
        .prefix("modules-")
        .tempdir_in(&base)
        .expect("tempdir under target/module-tests");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod 0755");
    dir
}

/// Path of a fixture under tests/fixtures.
pub fn fixture(rel: &str) -> PathBuf {
    repo_root().join("tests/fixtures").join(rel)
}

pub fn ctl_bin() -> PathBuf {
    let p = target_dir().join("valvula-ctl");
    assert!(
        p.exists(),
        "{} is missing: cargo build --workspace",
        p.display()
    );
    p
}

/// Runs valvula-ctl; returns (exit code, stdout, stderr).
pub fn ctl(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(ctl_bin())
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run valvula-ctl");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}
