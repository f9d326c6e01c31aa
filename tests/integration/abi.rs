//! The C ABI, proved with a real compiler: the header in three language modes, a C
//! module answering through the daemon, one fixture per load error, and modules that
//! panic or hang while the daemon serves on.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use valvula_tests::client::{Answer, Client, postfix_request};
use valvula_tests::daemon::{parse_config, start};
use valvula_tests::{cc_shared, fixture, module_path, module_tempdir, repo_root, valvulad_bin};
use valvulad::host::{LoadError, ModuleSet, Services};

/// The host's ABI minor, as the header compiled into the fixtures says.
fn valvula_abi_minor() -> u16 {
    let h = std::fs::read_to_string(repo_root().join("include/valvula/module.h")).unwrap();
    let line = h
        .lines()
        .find(|l| l.starts_with("#define VLV_ABI_MINOR "))
        .unwrap();
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

fn compile_header(compiler: &str, std: &str, lang: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("h.o");
    let o = Command::new(compiler)
        .args(lang)
        .arg(format!("-std={std}"))
        .args(["-Wall", "-Wextra", "-pedantic", "-Werror", "-c", "-o"])
        .arg(&out)
        .arg("-I")
        .arg(repo_root().join("include"))
        .arg(fixture("c/header_all.c"))
        .output()
        .expect("run the compiler");
    assert!(
        o.status.success(),
        "{compiler} -std={std} rejects module.h:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn header_compiles_as_c99_c11_and_cxx11() {
    compile_header("cc", "c99", &[]);
    compile_header("cc", "c11", &[]);
    compile_header("c++", "c++11", &["-x", "c++"]);
}

/// Builds a C fixture into `dir`.
fn build(dir: &Path, src: &str, out: &str, defines: &[&str]) -> PathBuf {
    let p = dir.join(out);
    let src = if src.starts_with("examples/") {
        repo_root().join(src)
    } else {
        fixture(src)
    };
    cc_shared(&[&src], &p, defines);
    p
}

fn config_for(modules: &[&Path], chain: &[&str], extra: &str) -> valvula_config::Config {
    let mods: Vec<String> = modules
        .iter()
        .map(|m| format!("{:?}", m.display().to_string()))
        .collect();
    let chain: Vec<String> = chain.iter().map(|c| format!("{c:?}")).collect();
    parse_config(&format!(
        "[server]\nmodules = [{}]\nmodule_timeout = \"500ms\"\n\
         [[listener]]\nname=\"l\"\naddress=\"127.0.0.1:0\"\nmodules=[{}]\non_error=\"defer\"\n{extra}",
        mods.join(","),
        chain.join(",")
    ))
}

/// A valvulad process loading `modules` (files), with one listener per `(name, chain)`
/// (on_error defer) and `extra` TOML after them.
fn daemon_with(
    modules: &[&Path],
    listeners: &[(&str, &str)],
    server: &str,
    extra: &str,
) -> valvula_tests::daemon::Proc {
    let mods: Vec<String> = modules
        .iter()
        .map(|m| format!("{:?}", m.display().to_string()))
        .collect();
    let ls: String = listeners
        .iter()
        .map(|(name, chain)| {
            format!(
                "[[listener]]\nname = {name:?}\naddress = \"127.0.0.1:0\"\nmodules = [{chain}]\non_error = \"defer\"\n"
            )
        })
        .collect();
    valvula_tests::daemon::Proc::start(
        &format!(
            "[server]\nmodules = [{}]\n{server}{ls}{extra}",
            mods.join(", ")
        ),
        &[],
    )
}

/// One request with `attrs` on a new connection, from a test without a runtime.
fn ask_blocking(addr: &str, attrs: &[(&str, &str)]) -> String {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = Client::connect(addr).await;
        c.ask(&postfix_request(attrs)).await
    })
}

/// `cargo build --quiet` with `args` in `dir` (this test's cargo, no inherited target
/// directory); fails the test with `what` and cargo's output.
fn cargo_build(dir: &Path, args: &[&str], env: &[(&str, &str)], what: &str) {
    let o = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--quiet"])
        .args(args)
        .envs(env.iter().copied())
        .env_remove("CARGO_TARGET_DIR")
        .current_dir(dir)
        .output()
        .expect("run cargo");
    assert!(
        o.status.success(),
        "{what}:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Loads the modules `cfg` names (for real, with dlopen) and starts a daemon on them.
async fn start_loaded(cfg: valvula_config::Config) -> (valvulad::server::Daemon, Vec<String>) {
    let (modules, _) =
        ModuleSet::load(&cfg, None, &Services::default()).unwrap_or_else(|e| panic!("{e:?}"));
    start(cfg, modules).await
}

/// The errors loading `modules` gives, without the config keys they are reported at.
fn load_errors(modules: &[&Path]) -> Vec<LoadError> {
    match ModuleSet::load(&config_for(modules, &[], ""), None, &Services::default()) {
        Ok(_) => panic!("{modules:?} loaded but should not"),
        Err(e) => e.into_iter().map(uncover).collect(),
    }
}

fn uncover(e: LoadError) -> LoadError {
    match e {
        LoadError::At { source, .. } => uncover(*source),
        other => other,
    }
}

#[tokio::test]
async fn c_module_answers_through_the_daemon() {
    let dir = module_tempdir();
    let so = build(
        dir.path(),
        "examples/c/mod_example.c",
        "mod_example.so",
        &[],
    );
    let cfg = config_for(
        &[&so],
        &["mod-example"],
        "[module.mod-example]\nblocked_sender = \"spammer@example.com\"\n",
    );
    let (_d, a) = start_loaded(cfg).await;
    let mut c = Client::connect(&a[0]).await;
    assert_eq!(
        c.ask(&postfix_request(&[("sender", "spammer@example.com")]))
            .await,
        "action=reject sender blocked by mod-example\n\n"
    );
    assert_eq!(c.ask(&postfix_request(&[])).await, "action=dunno\n\n");
}

/// A C++ module loads and answers, built as the header says: an idiomatic C++11
/// module, and the C example compiled as C++ (the definition must get C linkage and
/// stay visible; `const` at namespace scope alone is internal in C++).
#[tokio::test]
async fn cxx_modules_built_as_the_header_says_load_and_answer() {
    let dir = module_tempdir();
    let cxx = dir.path().join("mod_cxx.so");
    valvula_tests::cxx_shared(&[&fixture("cxx/mod_cxx.cpp")], &cxx);
    let example = dir.path().join("mod_example_cxx.so");
    valvula_tests::cxx_shared(&[&repo_root().join("examples/c/mod_example.c")], &example);
    let cfg = config_for(
        &[&cxx, &example],
        &["mod-cxx", "mod-example"],
        "[module.mod-cxx]\nsuffix = \"@spam.example\"\n\
         [module.mod-example]\nblocked_sender = \"spammer@example.com\"\n",
    );
    let (_d, a) = start_loaded(cfg).await;
    let mut c = Client::connect(&a[0]).await;
    assert_eq!(
        c.ask(&postfix_request(&[("sender", "x@spam.example")]))
            .await,
        "action=reject sender ends with @spam.example (mod-cxx)\n\n",
        "the C++ module's answer"
    );
    assert_eq!(
        c.ask(&postfix_request(&[("sender", "spammer@example.com")]))
            .await,
        "action=reject sender blocked by mod-example\n\n",
        "the example compiled as C++"
    );
    assert_eq!(
        c.ask(&postfix_request(&[("sender", "a@b.example")])).await,
        "action=dunno\n\n"
    );
}

#[test]
fn each_load_error_is_specific() {
    let dir = module_tempdir();
    let d = dir.path();
    let one = |src: &str| {
        let so = build(d, &format!("c/{src}.c"), &format!("{src}.so"), &[]);
        let e = match ModuleSet::load(&config_for(&[&so], &[], ""), None, &Services::default()) {
            Ok(_) => panic!("{so:?} loaded but should not"),
            Err(e) => e,
        };
        assert_eq!(e.len(), 1, "{e:?}");
        let text = e[0].to_string();
        assert!(
            text.starts_with(&format!("server.modules[0]: {}: ", so.display())),
            "error does not name the key and the file: {text}"
        );
        (uncover(e.into_iter().next().unwrap()), text)
    };

    let (e, t) = one("no_symbol");
    assert!(matches!(e, LoadError::MissingSymbol { .. }), "{t}");
    let (e, t) = one("bad_magic");
    assert!(
        matches!(
            e,
            LoadError::BadMagic {
                found: 0xDEADBEEF,
                ..
            }
        ),
        "{t}"
    );
    let (e, t) = one("wrong_major");
    let host = format!("ABI 1.{}", valvula_abi_minor());
    assert!(matches!(e, LoadError::WrongMajor { major: 2, .. }), "{t}");
    assert!(
        t.contains("ABI 2.0") && t.contains(&host),
        "both versions named: {t}"
    );
    let (e, t) = one("newer_minor");
    assert!(
        matches!(e, LoadError::NewerMinor { minor, .. } if minor == valvula_abi_minor() + 1),
        "{t}"
    );
    let module = format!("ABI 1.{}", valvula_abi_minor() + 1);
    assert!(
        t.contains(&module) && t.contains(&host),
        "both versions named: {t}"
    );
    let (e, t) = one("short_struct");
    assert!(
        matches!(
            e,
            LoadError::ShortStruct {
                size: 32,
                need: 120,
                ..
            }
        ),
        "{t}"
    );
    // A struct_size larger than the symbol: the symbol table's size wins.
    let (e, t) = one("lying_size");
    assert!(
        matches!(
            e,
            LoadError::ShortStruct {
                size: 104,
                need: 120,
                ..
            }
        ),
        "{t}"
    );
    let (e, t) = one("init_fail");
    assert!(matches!(e, LoadError::InitFailed { status: -5, .. }), "{t}");

    // Duplicate names: two files defining "dup".
    let a = build(d, "c/named.c", "dup_a.so", &["FIXTURE_NAME=\"dup\""]);
    let b = build(d, "c/named.c", "dup_b.so", &["FIXTURE_NAME=\"dup\""]);
    let e = load_errors(&[&a, &b]);
    assert!(
        matches!(&e[..], [LoadError::Duplicate { name, first, second }] if name == "dup" && first.ends_with("dup_a.so") && second == &b),
        "{e:?}"
    );

    // Group- and world-writable files are refused before anything is loaded.
    use std::os::unix::fs::PermissionsExt;
    for mode in [0o664, 0o646] {
        let w = build(
            d,
            "c/named.c",
            &format!("w{mode:o}.so"),
            &["FIXTURE_NAME=\"writable\""],
        );
        std::fs::set_permissions(&w, std::fs::Permissions::from_mode(mode)).unwrap();
        let e = load_errors(&[&w]);
        assert!(
            matches!(&e[..], [LoadError::Writable { mode: m, .. }] if *m == mode),
            "{e:?}"
        );
    }
    // Owned by someone else than root or the daemon's user.
    if nix::unistd::geteuid().is_root() {
        let o = build(d, "c/named.c", "owner.so", &["FIXTURE_NAME=\"owner\""]);
        std::os::unix::fs::chown(&o, Some(65534), None).unwrap();
        let e = load_errors(&[&o]);
        assert!(
            matches!(&e[..], [LoadError::Owner { uid: 65534, .. }]),
            "{e:?}"
        );
    }
    // Several broken modules: every one is reported, not just the first.
    let x = build(d, "c/bad_magic.c", "again_magic.so", &[]);
    let y = build(d, "c/wrong_major.c", "again_major.so", &[]);
    assert_eq!(load_errors(&[&x, &y]).len(), 2);
}

#[tokio::test]
async fn sdk_module_panic_leaves_the_daemon_serving() {
    let so = module_path("mod_test");
    let cfg = config_for(
        &[&so],
        &["mod-test"],
        "[module.mod-test]\naction = \"reject\"\ntext = \"configured\"\n",
    );
    let (_d, a) = start_loaded(cfg).await;
    let mut c = Client::connect(&a[0]).await;
    assert_eq!(
        c.ask(&postfix_request(&[])).await,
        "action=reject configured\n\n"
    );
    assert_eq!(
        c.ask(&postfix_request(&[("x_test_panic", "1")])).await,
        "action=defer Policy service error, try again later\n\n"
    );
    // Errors and invalid replies go the same way; the same connection serves on.
    assert!(
        c.ask(&postfix_request(&[("x_test_error", "1")]))
            .await
            .starts_with("action=defer")
    );
    assert!(
        c.ask(&postfix_request(&[("x_test_invalid", "1")]))
            .await
            .starts_with("action=defer")
    );
    assert_eq!(
        c.ask(&postfix_request(&[])).await,
        "action=reject configured\n\n"
    );
    assert_eq!(
        c.ask(&postfix_request(&[
            ("x_test_action", "hold"),
            ("x_test_text", "check this")
        ]))
        .await,
        "action=hold check this\n\n"
    );
}

#[tokio::test]
async fn hanging_c_module_is_timed_out() {
    let dir = module_tempdir();
    let so = build(dir.path(), "c/hang.c", "hang.so", &[]);
    let cfg = config_for(&[&so], &["hang"], "");
    let (_d, a) = start_loaded(cfg).await;
    let mut hung = Client::connect(&a[0]).await;
    let t = std::time::Instant::now();
    assert_eq!(
        hung.ask(&postfix_request(&[("x_hang", "1")])).await,
        "action=defer Policy service error, try again later\n\n"
    );
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "timeout took {:?}",
        t.elapsed()
    );
    // Other requests, on other connections, still get the module's own answer.
    let mut other = Client::connect(&a[0]).await;
    assert_eq!(
        other.ask(&postfix_request(&[])).await,
        "action=ok hang-module\n\n"
    );
    assert_eq!(
        hung.ask(&postfix_request(&[])).await,
        "action=ok hang-module\n\n"
    );
    let _ = Answer::Silence;
}

#[tokio::test]
async fn ticks_reach_modules_with_their_boundaries() {
    let so = module_path("mod_test");
    let cfg = config_for(&[&so], &["mod-test"], "");
    let (d, a) = start_loaded(cfg).await;
    let mut c = Client::connect(&a[0]).await;
    let ask = postfix_request(&[("x_test_ticks", "1")]);
    assert_eq!(c.ask(&ask).await, "action=info ticks=0 kinds=0x0 now=0\n\n");
    // A UTC midnight, then one minute later: a minute tick only (in any time zone).
    let t = 1_700_000_000 - 1_700_000_000 % 86_400;
    d.tick_between(t + 30, t + 90).await;
    assert_eq!(
        c.ask(&ask).await,
        format!("action=info ticks=1 kinds=0x1 now={}\n\n", t + 90)
    );
    // Forty days on: minute, hour, day and month boundaries all crossed.
    d.tick_between(t + 90, t + 40 * 86_400).await;
    assert_eq!(
        c.ask(&ask).await,
        format!("action=info ticks=2 kinds=0xf now={}\n\n", t + 40 * 86_400)
    );
    // No boundary crossed: no call.
    d.tick_between(t + 10, t + 20).await;
    assert!(c.ask(&ask).await.starts_with("action=info ticks=2 "));
}

// ---- Where modules are loaded from: the file checked is the file loaded, every directory
// ---- above it is checked, relative paths follow the config file.

fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", p.display()));
}

fn mkdir(p: &Path, mode: u32) -> PathBuf {
    std::fs::create_dir(p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
    chmod(p, mode);
    p.to_owned()
}

/// The stat-then-dlopen race: the path names a good module when checked and an
/// attacker's module (world-writable, so refused by the checks) when loaded. The
/// attacker's constructor must never run: every load gets the good module or a refusal.
#[test]
fn symlink_flip_never_runs_the_swapped_in_module() {
    use nix::fcntl::{RenameFlags, renameat2};
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = module_tempdir();
    let d = dir.path();
    let marker = d.join("evil-ran");
    let good = build(d, "c/named.c", "good.so", &["FIXTURE_NAME=\"good\""]);
    let evil = build(
        d,
        "c/marker.c",
        "evil.so",
        &[
            "FIXTURE_NAME=\"evil\"",
            &format!("MARKER={:?}", marker.display().to_string()),
        ],
    );
    // Refused by the file checks, so only a swap after the check could load it.
    chmod(&evil, 0o666);
    let flips = mkdir(&d.join("flips"), 0o755);
    let link = flips.join("module.so");
    let spare = flips.join("spare.so");
    std::os::unix::fs::symlink(&good, &link).unwrap();
    std::os::unix::fs::symlink(&evil, &spare).unwrap();
    // Each attempt names the file differently, through its own link to the directory:
    // glibc hands out a library already loaded under the same name without opening
    // anything, which would hide the race after the first load. The detour through
    // `s/..` many times widens the window between a check and a load by path (as a
    // loaded machine would), so that a loader with one shows it within a few attempts.
    let attempts = 2000;
    mkdir(&flips.join("s"), 0o755);
    let detour = "s/../".repeat(250);
    let aliases = mkdir(&d.join("aliases"), 0o755);
    let paths: Vec<PathBuf> = (0..attempts)
        .map(|i| {
            let via = aliases.join(format!("via{i}"));
            std::os::unix::fs::symlink(&flips, &via).unwrap();
            via.join(&detour).join("module.so")
        })
        .collect();

    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let flipper = {
        let (stop, link, spare) = (stop.clone(), link.clone(), spare.clone());
        std::thread::spawn(move || {
            let mut flips = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // One atomic step: the two links trade places.
                if renameat2(None, &link, None, &spare, RenameFlags::RENAME_EXCHANGE).is_err() {
                    break;
                }
                flips += 1;
            }
            flips
        })
    };
    let (mut loaded, mut refused) = (0, 0);
    for (i, path) in paths.iter().enumerate() {
        let result = valvulad::host::open(path);
        assert!(
            !marker.exists(),
            "the evil module's constructor ran (attempt {i}: {loaded} good loads, {refused} refusals before)"
        );
        match result {
            Ok(o) => {
                assert_eq!(o.name, "good", "attempt {i} loaded {:?}", o.path);
                loaded += 1;
            }
            Err(e) => {
                let e = uncover(e);
                assert!(
                    matches!(&e, LoadError::Writable { mode: 0o666, file, .. } if file == &evil),
                    "attempt {i}: neither the good module nor a refusal of the evil one: {e}"
                );
                refused += 1;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let flips = flipper.join().unwrap();
    // Both outcomes, many times: the race was really run.
    assert!(
        loaded >= 50 && refused >= 50,
        "the race did not run: {loaded} good loads, {refused} refusals, {flips} flips"
    );
    assert!(!marker.exists(), "the evil module's constructor ran");
}

/// A module below a directory others can write to (world-writable, sticky like /tmp,
/// group-writable, or owned by another user) is refused, naming that directory, its
/// owner and mode, and what to do; symbolic links are followed, and their targets'
/// directories checked too.
#[test]
fn module_below_a_directory_others_control_is_refused() {
    let dir = module_tempdir();
    let base = dir.path();
    let trusted = mkdir(&base.join("trusted"), 0o755);
    let good = build(&trusted, "c/named.c", "good.so", &["FIXTURE_NAME=\"good\""]);
    let refused = |so: &Path, dir: &Path, mode: u32| {
        let e = load_errors(&[so]);
        assert!(
            matches!(&e[..], [LoadError::DirWritable { dir: d, mode: m, .. }] if d == dir && *m == mode),
            "{} below {} (mode {mode:o}): {e:?}",
            so.display(),
            dir.display()
        );
        let text = e[0].to_string();
        for want in [
            &so.display().to_string(),
            &dir.display().to_string(),
            &format!("mode {mode:04o}"),
            "owner root",
            &format!("chmod go-w {}", dir.display()),
        ] {
            assert!(text.contains(want), "{want:?} missing: {text}");
        }
        text
    };
    for (name, mode) in [("world", 0o777), ("sticky", 0o1777)] {
        let d = mkdir(&base.join(name), mode);
        let so = build(
            &d,
            "c/named.c",
            "m.so",
            &[&format!("FIXTURE_NAME=\"{name}\"")],
        );
        let text = refused(&so, &d, mode);
        assert_eq!(
            text.contains("sticky bit"),
            mode & 0o1000 != 0,
            "the sticky bit is explained when set: {text}"
        );
        // Through a symbolic link in a safe directory, or `..` from one: still refused.
        let link = trusted.join(format!("{name}-link.so"));
        std::os::unix::fs::symlink(&so, &link).unwrap();
        refused(&link, &d, mode);
        refused(&trusted.join("..").join(name).join("m.so"), &d, mode);
    }
    // A group-writable directory higher up (a group such as `valvula` could swap it).
    let group = mkdir(&base.join("group"), 0o775);
    let sub = mkdir(&group.join("sub"), 0o755);
    let so = build(&sub, "c/named.c", "m.so", &["FIXTURE_NAME=\"group\""]);
    refused(&so, &group, 0o775);
    // The system's temporary directory (mode 1777 on any usual system).
    let tmp = std::fs::canonicalize(std::env::temp_dir()).unwrap();
    {
        use std::os::unix::fs::MetadataExt;
        let mode = std::fs::metadata(&tmp).unwrap().mode() & 0o7777;
        if mode & 0o022 != 0 {
            let t = tempfile::tempdir_in(&tmp).unwrap();
            chmod(t.path(), 0o755);
            let so = build(t.path(), "c/named.c", "m.so", &["FIXTURE_NAME=\"tmp\""]);
            let e = load_errors(&[&so]);
            assert!(
                matches!(&e[..], [LoadError::DirWritable { dir, .. }] if dir == &tmp),
                "{e:?}"
            );
        }
    }
    // A directory owned by another user (its owner could swap the module).
    if nix::unistd::geteuid().is_root() {
        let foreign = mkdir(&base.join("foreign"), 0o755);
        let so = build(&foreign, "c/named.c", "m.so", &["FIXTURE_NAME=\"foreign\""]);
        std::os::unix::fs::chown(&foreign, Some(65534), None).unwrap();
        let e = load_errors(&[&so]);
        assert!(
            matches!(&e[..], [LoadError::DirOwner { dir, uid: 65534, mode: 0o755, .. }] if dir == &foreign),
            "{e:?}"
        );
        let text = e[0].to_string();
        assert!(
            text.contains(&foreign.display().to_string())
                && text.contains("uid 65534")
                && text.contains("not by root")
                && text.contains("chown root"),
            "{text}"
        );
    }
    // What operators do: a symlink in a safe directory to a module in another safe one.
    let enabled = mkdir(&base.join("enabled"), 0o755);
    let link = enabled.join("good.so");
    std::os::unix::fs::symlink("../trusted/good.so", &link).unwrap();
    let (set, _) = ModuleSet::load(&config_for(&[&link], &[], ""), None, &Services::default())
        .unwrap_or_else(|e| panic!("a symlink to a safe module is refused: {e:?}"));
    assert_eq!(set.order, ["good"]);
    // The same file by two names is one module given twice.
    let e = load_errors(&[&link, &good]);
    assert!(
        matches!(&e[..], [LoadError::Duplicate { name, first, second }] if name == "good" && first == &good && second == &good),
        "{e:?}"
    );
}

/// A daemon reload checks every file again, and never loads a file that replaced a
/// loaded module (it cannot be unloaded): the loaded module stays.
#[test]
fn reload_checks_again_and_keeps_a_replaced_module() {
    let dir = module_tempdir();
    let d = mkdir(&dir.path().join("mods"), 0o755);
    let so = build(&d, "c/named.c", "swap.so", &["FIXTURE_NAME=\"swap\""]);
    let cfg = config_for(&[&so], &[], "");
    let (first, _) =
        ModuleSet::load(&cfg, None, &Services::default()).unwrap_or_else(|e| panic!("{e:?}"));
    // The directory became world-writable: the reload says so, as a restart would.
    chmod(&d, 0o777);
    match ModuleSet::load(&cfg, Some(&first), &Services::default()) {
        Ok(_) => panic!("a reload accepted a module in a world-writable directory"),
        Err(e) => {
            let e: Vec<_> = e.into_iter().map(uncover).collect();
            assert!(
                matches!(&e[..], [LoadError::DirWritable { dir, .. }] if dir == &d),
                "{e:?}"
            );
        }
    }
    chmod(&d, 0o755);
    // A new build put in its place: the loaded one is kept, the new one never runs.
    let marker = dir.path().join("replacement-ran");
    let new = build(
        &d,
        "c/marker.c",
        "swap.so.new",
        &[
            "FIXTURE_NAME=\"swap\"",
            &format!("MARKER={:?}", marker.display().to_string()),
        ],
    );
    std::fs::rename(&new, &so).unwrap();
    let (second, reused) = ModuleSet::load(&cfg, Some(&first), &Services::default())
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(reused, ["swap"]);
    assert_eq!(second.order, ["swap"]);
    assert!(
        !marker.exists(),
        "the replacement was loaded into the running daemon"
    );
}

/// A chain may name a module by its file: it is loaded and answers.
#[tokio::test]
async fn chain_entry_with_a_path_answers() {
    let dir = module_tempdir();
    let so = build(
        dir.path(),
        "examples/c/mod_example.c",
        "mod_example.so",
        &[],
    );
    let cfg = parse_config(&format!(
        "[[listener]]\nname=\"l\"\naddress=\"127.0.0.1:0\"\nmodules=[{:?}]\n\
         [module.mod-example]\nblocked_sender = \"spammer@example.com\"\n",
        so.display().to_string()
    ));
    let (modules, _) =
        ModuleSet::load(&cfg, None, &Services::default()).unwrap_or_else(|e| panic!("{e:?}"));
    let chain_errors = valvulad::host::check_chains(&cfg, &modules);
    assert!(chain_errors.is_empty(), "{chain_errors:?}");
    let (_d, a) = start(cfg, modules).await;
    let mut c = Client::connect(&a[0]).await;
    assert_eq!(
        c.ask(&postfix_request(&[("sender", "spammer@example.com")]))
            .await,
        "action=reject sender blocked by mod-example\n\n"
    );
}

/// Runs `valvulad -t -c config` from `cwd`; returns (exit code, stdout + stderr).
fn check_from(cwd: &Path, config: &Path) -> (i32, String) {
    let o = Command::new(valvulad_bin())
        .arg("-t")
        .arg("-c")
        .arg(config)
        .current_dir(cwd)
        .output()
        .expect("run valvulad -t");
    (
        o.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// Relative `module_dirs` and module paths are relative to the config file, not to the
/// directory the daemon happens to be started from.
#[test]
fn relative_module_paths_follow_the_config_file() {
    let dir = module_tempdir();
    let etc = mkdir(&dir.path().join("etc"), 0o755);
    let mods = mkdir(&dir.path().join("mods"), 0o755);
    build(&mods, "c/named.c", "rel.so", &["FIXTURE_NAME=\"rel\""]);
    build(
        &mods,
        "c/named.c",
        "bypath.so",
        &["FIXTURE_NAME=\"bypath\""],
    );
    let config = etc.join("valvulad.toml");
    let write = |server: &str, chain: &str| {
        std::fs::write(
            &config,
            format!(
                "[server]\n{server}\nadmin_socket = \"\"\n[storage]\npath = \"v.db\"\n\
                 [[listener]]\naddress = \"127.0.0.1:0\"\nmodules = [{chain}]\n"
            ),
        )
        .unwrap();
    };
    let elsewhere = tempfile::tempdir().unwrap();
    // By name, in a directory given relative to the config file.
    write("module_dirs = [\"../mods\"]", "\"rel\"");
    let (code, out) = check_from(elsewhere.path(), &config);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("1 module(s) loaded"), "{out}");
    // By path, in server.modules and in a chain.
    write(
        "module_dirs = []\nmodules = [\"../mods/bypath.so\"]",
        "\"bypath\"",
    );
    let (code, out) = check_from(elsewhere.path(), &config);
    assert_eq!(code, 0, "{out}");
    write("module_dirs = []", "\"../mods/bypath.so\"");
    let (code, out) = check_from(elsewhere.path(), &config);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("1 module(s) loaded"), "{out}");
    // And the config's own directory, found relative to where valvulad starts.
    let (code, out) = check_from(dir.path(), Path::new("etc/valvulad.toml"));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("1 module(s) loaded"), "{out}");
}

/// The ready configuration finds the workspace's modules wherever valvulad is started
/// from, as the README runs it (`./target/debug/valvulad -c etc/valvulad.toml`).
#[test]
fn ready_config_finds_the_workspace_modules() {
    let dir = module_tempdir();
    let etc = mkdir(&dir.path().join("etc"), 0o755);
    std::fs::copy(
        repo_root().join("etc/valvulad.toml"),
        etc.join("valvulad.toml"),
    )
    .unwrap();
    let target = valvula_tests::target_dir();
    std::os::unix::fs::symlink(target.parent().unwrap(), dir.path().join("target")).unwrap();
    for (cwd, config) in [
        (dir.path(), PathBuf::from("etc/valvulad.toml")),
        (Path::new("/"), etc.join("valvulad.toml")),
    ] {
        let (code, out) = check_from(cwd, &config);
        assert_eq!(code, 0, "from {}: {out}", cwd.display());
        assert!(out.contains("1 module(s) loaded"), "{out}");
    }
}

/// `valvulad -t` refuses a module below a world-writable directory, naming the config
/// key, the module, the directory with its owner and mode, and the fix.
#[test]
fn check_mode_names_the_key_and_the_directory() {
    let dir = module_tempdir();
    let world = mkdir(&dir.path().join("world"), 0o777);
    build(&world, "c/named.c", "w.so", &["FIXTURE_NAME=\"w\""]);
    let config = dir.path().join("valvulad.toml");
    std::fs::write(
        &config,
        "[server]\nmodule_dirs = [\"world\"]\nadmin_socket = \"\"\n[storage]\npath = \"v.db\"\n\
         [[listener]]\naddress = \"127.0.0.1:0\"\nmodules = [\"w\"]\n",
    )
    .unwrap();
    let (code, out) = check_from(Path::new("/"), &config);
    assert_eq!(code, 1, "{out}");
    for want in [
        "listener[0].modules[0]: ",
        &world.join("w.so").display().to_string(),
        &format!("the directory {} (owner root, mode 0777)", world.display()),
        &format!("chmod go-w {}", world.display()),
    ] {
        assert!(out.contains(want), "{want:?} missing:\n{out}");
    }
}

/// A Rust module built with panic = "abort" would end the daemon, and every listener,
/// at its first panic (the SDK's hooks catch panics; with abort there is nothing to
/// catch): the SDK refuses to initialise it, and the daemon's log says why.
#[test]
fn a_rust_module_built_with_panic_abort_is_refused_and_told_why() {
    let out_dir = valvula_tests::target_dir()
        .parent()
        .expect("target directory")
        .join("panic-abort");
    cargo_build(
        &repo_root(),
        &[
            "--locked",
            "-p",
            "mod-test",
            "--target-dir",
            &out_dir.display().to_string(),
        ],
        &[("CARGO_PROFILE_DEV_PANIC", "abort")],
        "cargo build with panic = abort",
    );
    let dir = module_tempdir();
    let mods = mkdir(&dir.path().join("mods"), 0o755);
    std::fs::copy(
        out_dir.join("debug/libmod_test.so"),
        mods.join("libmod_test.so"),
    )
    .expect("copy the module");
    let config = dir.path().join("valvulad.toml");
    std::fs::write(
        &config,
        "[server]\nmodule_dirs = [\"mods\"]\nadmin_socket = \"\"\n[storage]\npath = \"v.db\"\n\
         [[listener]]\naddress = \"127.0.0.1:0\"\nmodules = [\"mod-test\"]\n",
    )
    .unwrap();
    let (code, out) = check_from(dir.path(), &config);
    assert_ne!(code, 0, "a panic = abort module passed the check:\n{out}");
    assert!(
        out.contains("built with panic = \"abort\"") && out.contains("panic = \"unwind\""),
        "the log does not say why the module was refused:\n{out}"
    );
}

/// After dropping privileges, a reload still loads new modules (through the checked
/// descriptor), and keeps a module whose file was replaced, saying so.
#[tokio::test]
async fn reload_as_the_daemon_user_loads_through_the_checked_descriptor() {
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    let dir = module_tempdir();
    let mods = mkdir(&dir.path().join("mods"), 0o755);
    let data = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(data.path(), Some(65534), Some(65534)).unwrap();
    let first = build(&mods, "c/named.c", "first.so", &["FIXTURE_NAME=\"first\""]);
    build(&mods, "examples/c/mod_example.c", "mod-example.so", &[]);
    let config = |chain: &str| {
        format!(
            "[server]\nuser = \"nobody\"\ngroup = \"nogroup\"\nmodule_dirs = [{:?}]\n\
             admin_socket = \"{{dir}}/admin.sock\"\n\
             [[listener]]\nname = \"main\"\naddress = \"127.0.0.1:0\"\nmodules = [{chain}]\n\
             [module.mod-example]\nblocked_sender = \"spammer@example.com\"\n\
             [storage]\npath = \"{}/v.db\"\n",
            mods.display().to_string(),
            data.path().display()
        )
    };
    let p = valvula_tests::daemon::Proc::start(&config("\"first\""), &[]);
    let marker = dir.path().join("replacement-ran");
    let new = build(
        &mods,
        "c/marker.c",
        "first.so.new",
        &[
            "FIXTURE_NAME=\"first\"",
            &format!("MARKER={:?}", marker.display().to_string()),
        ],
    );
    std::fs::rename(&new, &first).unwrap();
    p.rewrite_config(&config("\"first\", \"mod-example\""));
    p.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(
        p.wait_for_log("configuration reloaded", Duration::from_secs(20)),
        "{}",
        p.log()
    );
    assert!(
        p.log().contains("replaced since it was loaded"),
        "{}",
        p.log()
    );
    assert!(!marker.exists(), "the replacement was loaded");
    let mut c = Client::connect(&p.addrs()[0]).await;
    assert_eq!(
        c.ask(&postfix_request(&[("sender", "spammer@example.com")]))
            .await,
        "action=reject sender blocked by mod-example\n\n",
        "{}",
        p.log()
    );
}

#[tokio::test]
async fn c_module_built_for_abi_0_4_loads_and_answers() {
    let dir = module_tempdir();
    let so = build(dir.path(), "c/abi_0_4.c", "abi_0_4.so", &[]);
    let cfg = config_for(&[&so], &["abi-0-4"], "");
    let (_d, a) = start_loaded(cfg).await;
    let mut c = Client::connect(&a[0]).await;
    assert_eq!(
        c.ask(&postfix_request(&[("sender", "old@x")])).await,
        "action=reject old module says no\n\n"
    );
    assert_eq!(c.ask(&postfix_request(&[])).await, "action=dunno\n\n");
}

/// A daemon on the ABI 0.5 C fixture (async-counter) with an SQLite store, on a runtime
/// of `workers` threads. `config` gets the module's and the database's paths.
struct AsyncCounter {
    rt: tokio::runtime::Runtime,
    daemon: valvulad::server::Daemon,
    addrs: Vec<String>,
    store: std::sync::Arc<valvula_store::Store>,
    db: PathBuf,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

fn async_counter(
    workers: usize,
    defines: &[&str],
    config: impl FnOnce(&Path, &Path) -> valvula_config::Config,
) -> AsyncCounter {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap();
    let dir = module_tempdir();
    let so = build(dir.path(), "c/async_counter.c", "async_counter.so", defines);
    let dbdir = tempfile::tempdir().unwrap();
    let db = dbdir.path().join("v.db");
    let cfg = config(&so, &db);
    let store = valvula_store::Store::open(&cfg.storage, rt.handle().clone()).unwrap();
    let (modules, _) = ModuleSet::load(
        &cfg,
        None,
        &Services::new(store.clone(), valvula_store::Clock::system()),
    )
    .unwrap_or_else(|e| panic!("{e:?}"));
    let (daemon, addrs) = rt.block_on(start(cfg, modules));
    AsyncCounter {
        rt,
        daemon,
        addrs,
        store,
        db,
        _dirs: (dir, dbdir),
    }
}

/// Waits until the async-counter module has taken `n` calls in all (each has submitted
/// its charge by the time the next poll of the runtime runs).
fn wait_for_calls(daemon: &valvulad::server::Daemon, n: u64) {
    let modules = daemon.modules();
    let calls = &modules.get("async-counter").expect("loaded").stats.calls;
    valvula_tests::wait_until(
        &format!("{n} calls of async-counter"),
        Duration::from_secs(30),
        || calls.load(std::sync::atomic::Ordering::Relaxed) >= n,
    );
}

/// ABI 0.5 from C: a module on process_poll and consume_async counts exactly under
/// concurrency, is charged once per instance, and its mistakes (VLV_PENDING with
/// nothing submitted) cost the request, not the daemon; VLV_BLOCKING reaches process().
#[test]
fn c_module_on_the_completion_api_counts_exactly_and_survives_its_bugs() {
    let AsyncCounter {
        rt,
        daemon: _daemon,
        addrs: a,
        store,
        ..
    } = async_counter(2, &["FIXTURE_LIMIT=50"], |so, db| {
        config_for(
            &[so],
            &["async-counter"],
            &format!("[storage]\npath = {db:?}\n"),
        )
    });
    rt.block_on(async {
        let mut tasks = Vec::new();
        for conn in 0..16 {
            let addr = a[0].clone();
            tasks.push(tokio::spawn(async move {
                let mut c = Client::connect(&addr).await;
                let mut answers = Vec::new();
                for i in 0..10 {
                    let instance = format!("{conn}.{i}");
                    let r = c
                        .ask(&postfix_request(&[
                            ("sender", "s@x"),
                            ("instance", &instance),
                        ]))
                        .await;
                    answers.push(r);
                }
                answers
            }));
        }
        let mut answers = Vec::new();
        for t in tasks {
            answers.extend(t.await.unwrap());
        }
        let admitted = answers.iter().filter(|r| *r == "action=dunno\n\n").count();
        let refused = answers
            .iter()
            .filter(|r| *r == "action=reject limit reached\n\n")
            .count();
        assert_eq!(
            (admitted, refused),
            (50, 110),
            "160 requests against a limit of 50; answers: {answers:?}"
        );

        let mut c = Client::connect(&a[0]).await;
        for _ in 0..3 {
            let r = c
                .ask(&postfix_request(&[("sender", "t@x"), ("instance", "same")]))
                .await;
            assert_eq!(r, "action=dunno\n\n", "a re-sent request");
        }
        let r = c.ask(&postfix_request(&[("sender", "block@x")])).await;
        assert_eq!(r, "action=ok blocking\n\n", "VLV_BLOCKING runs process()");
        let r = c
            .ask(&postfix_request(&[
                ("sender", "blocklate@x"),
                ("instance", "bl"),
            ]))
            .await;
        assert!(
            r.starts_with("action=defer"),
            "VLV_BLOCKING after a submitted charge is refused, process() not run: {r:?}"
        );
        let r = c.ask(&postfix_request(&[("sender", "pending@x")])).await;
        assert!(
            r.starts_with("action=defer"),
            "VLV_PENDING with nothing submitted gets the on-error action: {r:?}"
        );
        let r = c
            .ask(&postfix_request(&[("sender", "u@x"), ("instance", "u1")]))
            .await;
        assert_eq!(
            r, "action=warn a call was dropped\n\n",
            "the abandoned call was handed back through process_drop"
        );
    });
    let used = store
        .peek(
            "async-counter",
            "t@x",
            0,
            &[valvula_store::Window {
                kind: valvula_store::WindowKind::Day,
                limit: 50,
            }],
            valvula_store::Clock::system().now(),
        )
        .unwrap();
    assert_eq!(
        used.windows[0].used, 1,
        "one instance sent three times is charged once: {used:?}"
    );
}

/// Another connection holding the SQLite write lock (a second daemon, valvula-ctl)
/// makes charges wait; it must not stall the event loop, so a listener that needs no
/// database answers at once meanwhile, even with a single runtime thread.
#[test]
fn a_locked_sqlite_file_never_stalls_other_listeners() {
    let AsyncCounter {
        rt,
        daemon,
        addrs: a,
        db: path,
        ..
    } = async_counter(1, &[], |so, path| {
        parse_config(&format!(
            "[server]\nmodules = [{so:?}]\nmodule_timeout = \"3s\"\n\
             [[listener]]\nname=\"charging\"\naddress=\"127.0.0.1:0\"\nmodules=[\"async-counter\"]\non_error=\"defer\"\n\
             [[listener]]\nname=\"plain\"\naddress=\"127.0.0.1:0\"\nmodules=[]\n\
             [storage]\npath = {path:?}\ntimeout = \"2s\"\n"
        ))
    });
    // One charge first, so the tables exist and the writer has its connection.
    let r = rt.block_on(async {
        Client::connect(&a[0])
            .await
            .ask(&postfix_request(&[
                ("sender", "s@x"),
                ("instance", "first"),
            ]))
            .await
    });
    assert_eq!(r, "action=dunno\n\n");
    let other = rusqlite::Connection::open(&path).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let waiting: Vec<_> = (0..5)
        .map(|i| {
            let addr = a[0].clone();
            rt.spawn(async move {
                let instance = format!("locked{i}");
                Client::connect(&addr)
                    .await
                    .ask(&postfix_request(&[
                        ("sender", "s@x"),
                        ("instance", &instance),
                    ]))
                    .await
            })
        })
        .collect();
    // The first charge and these five have reached the module (and the store, which
    // waits on the lock).
    wait_for_calls(&daemon, 6);
    let worst = rt.block_on(async {
        let mut worst = Duration::ZERO;
        for _ in 0..5 {
            let started = std::time::Instant::now();
            let r = Client::connect(&a[1])
                .await
                .ask(&postfix_request(&[]))
                .await;
            assert_eq!(r, "action=dunno\n\n");
            worst = worst.max(started.elapsed());
        }
        worst
    });
    other.execute_batch("COMMIT").unwrap();
    let answers: Vec<String> = waiting
        .into_iter()
        .map(|t| rt.block_on(t).unwrap())
        .collect();
    assert!(
        // A stall lasts the storage timeout (2 s); a loaded machine may be slow, not
        // that slow.
        worst < Duration::from_millis(750),
        "a listener without a database waited {worst:?} while the SQLite file was locked"
    );
    assert!(
        answers
            .iter()
            .all(|r| r == "action=dunno\n\n" || r.starts_with("action=defer")),
        "{answers:?}"
    );
}

/// Requests still waiting on the database when the shutdown grace ends: the module is
/// closed, and its pending calls, dropped afterwards with their tasks, never reach
/// process_drop (the fixture aborts the process if one does).
#[test]
fn no_hook_runs_after_close_even_for_calls_still_pending() {
    let AsyncCounter {
        rt,
        daemon,
        addrs: a,
        db: path,
        ..
    } = async_counter(2, &[], |so, path| {
        parse_config(&format!(
            "[server]\nmodules = [{so:?}]\nmodule_timeout = \"10s\"\n\
             [[listener]]\nname=\"charging\"\naddress=\"127.0.0.1:0\"\nmodules=[\"async-counter\"]\n\
             [storage]\npath = {path:?}\ntimeout = \"8s\"\n"
        ))
    });
    let r = rt.block_on(async {
        Client::connect(&a[0])
            .await
            .ask(&postfix_request(&[
                ("sender", "s@x"),
                ("instance", "first"),
            ]))
            .await
    });
    assert_eq!(r, "action=dunno\n\n");
    // Charges that cannot commit: another connection holds the write lock.
    let other = rusqlite::Connection::open(&path).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    for i in 0..4 {
        let addr = a[0].clone();
        rt.spawn(async move {
            let instance = format!("pending{i}");
            Client::connect(&addr)
                .await
                .ask(&postfix_request(&[
                    ("sender", "s@x"),
                    ("instance", &instance),
                ]))
                .await
        });
    }
    wait_for_calls(&daemon, 5);
    rt.block_on(daemon.shutdown(Duration::from_millis(100)));
    // The tasks (and their pending calls) go with the runtime, after close.
    rt.shutdown_timeout(Duration::from_secs(1));
    other.execute_batch("ROLLBACK").unwrap();
}

/// A NONBLOCKING module that sleeps 3 s under a 500 ms module timeout: each call is
/// answered within the timeout (four at once too), another listener answers at once
/// meanwhile, and the module's blocking storage calls are refused outside init.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_nonblocking_module_is_bounded_and_stalls_no_other_listener() {
    let dir = module_tempdir();
    let so = build(dir.path(), "c/nonblocking.c", "nonblocking.so", &[]);
    let p = daemon_with(
        &[&so],
        &[("nb", "\"nonblocking\""), ("empty", "")],
        "module_timeout = \"500ms\"\nquarantine_after = 100\n",
        "",
    );
    let addrs = p.addrs();
    let (nb, empty) = (addrs[0].clone(), addrs[1].clone());
    let mut c = Client::connect(&nb).await;
    assert_eq!(
        c.ask(&postfix_request(&[])).await,
        "action=ok nonblocking init_sql=0\n\n",
        "init may use storage"
    );
    assert_eq!(
        c.ask(&postfix_request(&[("x_sql", "1")])).await,
        "action=ok sql=-2\n\n",
        "a storage call from process is VLV_E_INVALID"
    );
    let t = std::time::Instant::now();
    let mut sleepers = Vec::new();
    for _ in 0..4 {
        let nb = nb.clone();
        sleepers.push(tokio::spawn(async move {
            let mut c = Client::connect(&nb).await;
            let a = c.ask(&postfix_request(&[("x_sleep", "1")])).await;
            (a, t.elapsed())
        }));
    }
    // Meanwhile the other listener answers at once, again and again.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut worst = Duration::ZERO;
    while t.elapsed() < Duration::from_millis(400) {
        let s = std::time::Instant::now();
        let mut c = Client::connect(&empty).await;
        assert_eq!(c.ask(&postfix_request(&[])).await, "action=dunno\n\n");
        worst = worst.max(s.elapsed());
    }
    assert!(
        worst < Duration::from_millis(250),
        "the empty chain took {worst:?} while the module slept"
    );
    for s in sleepers {
        let (a, took) = s.await.unwrap();
        assert_eq!(a, "action=defer Policy service error, try again later\n\n");
        assert!(
            took < Duration::from_millis(1500),
            "a sleeping call was answered after {took:?} (timeout 500 ms)"
        );
    }
}

/// A VLV_FLAG_SERIALIZE module whose call hung holds its lock for good: SIGTERM still
/// stops the daemon (close is skipped, and the log says why), instead of waiting for
/// ever.
#[test]
fn shutdown_never_waits_for_a_hung_serialized_call() {
    let dir = module_tempdir();
    let so = build(dir.path(), "c/hang.c", "hang.so", &["HANG_SERIALIZE"]);
    let mut p = daemon_with(
        &[&so],
        &[("l", "\"hang\"")],
        "module_timeout = \"300ms\"\nshutdown_grace = \"1s\"\n",
        "",
    );
    assert_eq!(
        ask_blocking(&p.addrs()[0], &[("x_hang", "1")]),
        "action=defer Policy service error, try again later\n\n"
    );
    let t = std::time::Instant::now();
    p.signal(nix::sys::signal::Signal::SIGTERM);
    let st = p.wait_exit(Duration::from_secs(30));
    assert!(st.success(), "{st}\n{}", p.log());
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "stopping took {:?}",
        t.elapsed()
    );
    assert!(
        p.log().contains("close skipped"),
        "the log says why close did not run:\n{}",
        p.log()
    );
}

/// Each module has its own tables: another module's table or the host's (`vlv_...`)
/// is refused (VLV_E_INVALID) whatever the statement, on both backends; a module's DDL
/// may quote (`DEFAULT ''`).
#[test]
fn a_module_cannot_name_another_modules_tables_or_the_hosts() {
    let dir = module_tempdir();
    let a = build(
        dir.path(),
        "c/sqlns.c",
        "sqlns_a.so",
        &["MODNAME=\"sqlns_a\""],
    );
    let b = build(
        dir.path(),
        "c/sqlns.c",
        "sqlns_b.so",
        &["MODNAME=\"sqlns_b\""],
    );
    let db = valvula_tests::db::TestDb::new();
    for storage in [
        String::new(),
        format!("[storage]\nbackend = \"mysql\"\nurl = \"{}\"\n", db.url()),
    ] {
        let p = daemon_with(
            &[&a, &b],
            &[("a", "\"sqlns_a\""), ("b", "\"sqlns_b\"")],
            "",
            &storage,
        );
        let addrs = p.addrs();
        let ask = |addr: &str, sql: &str| ask_blocking(addr, &[("x_sql", sql)]);
        let (la, lb) = (&addrs[0], &addrs[1]);
        for (addr, sql, status) in [
            (la, "INSERT INTO sqlns_a_t (id) VALUES (1)", 0),
            (lb, "INSERT INTO sqlns_b_t (id) VALUES (2)", 0),
            (lb, "DROP TABLE sqlns_a_t", -2),
            (lb, "DELETE FROM SQLNS_A_T", -2),
            (
                lb,
                "UPDATE sqlns_b_t SET id = (SELECT MAX(id) FROM sqlns_a_t)",
                -2,
            ),
            (la, "DELETE FROM sqlns_b_t", -2),
            (lb, "DELETE FROM vlv_counter", -2),
            (la, "DROP TABLE vlv_meta", -2),
            (la, "INSERT INTO sqlns_a_t (id) VALUES (3)", 0),
        ] {
            assert_eq!(
                ask(addr, sql),
                format!("action=ok init=0 status={status}\n\n"),
                "{sql} ({}):\n{}",
                if storage.is_empty() {
                    "SQLite"
                } else {
                    "MariaDB"
                },
                p.log()
            );
        }
        assert!(
            p.log()
                .contains("table sqlns_a_t belongs to module sqlns_a"),
            "the log says why:\n{}",
            p.log()
        );
    }
    assert_eq!(
        db.sql("SELECT COUNT(*) FROM sqlns_a_t").trim(),
        "2",
        "module a's table is whole"
    );
}

/// A verdict the host refuses (a reply text with a newline, from a Rust module) is
/// logged by the daemon with what was wrong with it, not only as a status number.
#[test]
fn a_refused_verdict_is_logged_with_its_reason() {
    let p = daemon_with(
        &[&module_path("mod_test")],
        &[("l", "\"mod-test\"")],
        "",
        "[log]\nlevel = \"info\"\n",
    );
    assert!(ask_blocking(&p.addrs()[0], &[("x_test_invalid", "1")]).starts_with("action=defer"));
    assert!(
        p.wait_for_log(
            "module gave an invalid reply: reply text contains a CR, LF or NUL byte",
            Duration::from_secs(10)
        ),
        "{}",
        p.log()
    );
}

/// The Rust module template builds out of valvula's tree, as it is (only the path to
/// the SDK changed, as its Cargo.toml says), and loads and answers through the daemon,
/// reload included.
#[test]
fn the_rust_template_builds_out_of_tree_and_answers() {
    let tmpl = repo_root().join("examples/rust/mod-template");
    let work = valvula_tests::target_dir()
        .parent()
        .expect("target directory")
        .join("template-test");
    let _ = std::fs::remove_dir_all(work.join("src"));
    std::fs::create_dir_all(work.join("src")).unwrap();
    let manifest = std::fs::read_to_string(tmpl.join("Cargo.toml")).unwrap();
    let sdk = repo_root().join("crates/valvula-module");
    let edited = manifest.replace(
        "path = \"../../../crates/valvula-module\"",
        &format!("path = {:?}", sdk.display().to_string()),
    );
    assert_ne!(edited, manifest, "the template names the SDK's path");
    std::fs::write(work.join("Cargo.toml"), edited).unwrap();
    std::fs::copy(tmpl.join("src/lib.rs"), work.join("src/lib.rs")).unwrap();
    // The versions valvula itself is tested with (and no registry needed).
    std::fs::copy(repo_root().join("Cargo.lock"), work.join("Cargo.lock")).unwrap();
    cargo_build(
        &work,
        &["--offline"],
        &[],
        "the template does not build out of tree",
    );
    let dir = module_tempdir();
    let so = dir.path().join("mod-template.so");
    std::fs::copy(work.join("target/debug/libmod_template.so"), &so).unwrap();
    let p = daemon_with(
        &[&so],
        &[("l", "\"mod-template\"")],
        "",
        "[module.mod-template]\nblocked_senders = [\"Spammer@example.com\"]\ntext = \"go away\"\n",
    );
    let addr = p.addrs()[0].clone();
    let ask = |sender: &str| ask_blocking(&addr, &[("sender", sender)]);
    assert_eq!(ask("spammer@example.com"), "action=reject go away\n\n");
    assert_eq!(ask("friend@example.com"), "action=dunno\n\n");
    // A reload with a new list takes effect.
    let cfg = std::fs::read_to_string(&p.config_path).unwrap();
    std::fs::write(
        &p.config_path,
        cfg.replace("Spammer@example.com", "friend@example.com"),
    )
    .unwrap();
    p.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(p.wait_for_log("configuration reloaded", Duration::from_secs(10)));
    assert_eq!(ask("friend@example.com"), "action=reject go away\n\n");
    assert_eq!(ask("spammer@example.com"), "action=dunno\n\n");
}

/// The members of `typedef struct NAME { ... } NAME;` in a header, in order.
fn struct_members(header: &str, name: &str) -> Vec<String> {
    let start = header
        .find(&format!("typedef struct {name} {{"))
        .unwrap_or_else(|| panic!("no struct {name}"));
    let body = &header[start..];
    let end = body
        .find(&format!("}} {name};"))
        .unwrap_or_else(|| panic!("struct {name} not closed"));
    // Drop comments, then take each declaration's name: `(*name)(` or the last word.
    let mut text = String::new();
    let mut rest = &body[..end];
    while let Some(i) = rest.find("/*") {
        text.push_str(&rest[..i]);
        rest = &rest[i + rest[i..].find("*/").expect("comment closed") + 2..];
    }
    text.push_str(rest);
    let body = &text[text.find('{').unwrap() + 1..];
    body.split(';')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| {
            if let Some(i) = d.find("(*") {
                d[i + 2..d[i..].find(')').unwrap() + i].to_owned()
            } else {
                d.split_whitespace().last().unwrap().to_owned()
            }
        })
        .collect()
}

/// `#define VLV_NAME value` lines of a header.
fn defines(header: &str) -> Vec<(String, String)> {
    header
        .lines()
        .filter_map(|l| l.strip_prefix("#define VLV_"))
        .filter(|l| !l.contains('('))
        .filter_map(|l| {
            let (n, v) = l.split_once(' ')?;
            Some((
                n.to_owned(),
                v.split("/*").next().unwrap().trim().to_owned(),
            ))
        })
        .collect()
}

/// ABI 1.0 is frozen: the current header only appended to the 1.0 header kept in
/// tests/fixtures/abi-1.0 (same struct members in the same order, same constants),
/// and modules built against that header (the C example, and a module on the
/// completion API) load and answer on this host, whatever its minor.
#[test]
fn modules_built_against_the_frozen_1_0_header_load_on_this_host() {
    let frozen_dir = fixture("abi-1.0");
    let frozen = std::fs::read_to_string(frozen_dir.join("valvula/module.h")).unwrap();
    let current = std::fs::read_to_string(repo_root().join("include/valvula/module.h")).unwrap();
    for s in [
        "vlv_host_api",
        "vlv_module_def",
        "vlv_value",
        "vlv_window",
        "vlv_charge",
        "vlv_stmt",
    ] {
        let (old, new) = (struct_members(&frozen, s), struct_members(&current, s));
        assert!(
            new.len() >= old.len() && new[..old.len()] == old[..],
            "{s} changed other than by appending:\n1.0: {old:?}\nnow: {new:?}"
        );
    }
    let now: std::collections::HashMap<_, _> = defines(&current).into_iter().collect();
    for (name, value) in defines(&frozen) {
        if name == "ABI_MINOR" {
            continue;
        }
        assert_eq!(now.get(&name), Some(&value), "VLV_{name} is {value} in 1.0");
    }
    assert_eq!(
        now["ABI_MAJOR"], "1",
        "a new major needs a new frozen header"
    );

    let dir = module_tempdir();
    let example = dir.path().join("mod_example_1_0.so");
    valvula_tests::cc_shared_against(
        &frozen_dir,
        &[&repo_root().join("examples/c/mod_example.c")],
        &example,
        &[],
    );
    let counter = dir.path().join("async_counter_1_0.so");
    valvula_tests::cc_shared_against(
        &frozen_dir,
        &[&fixture("c/async_counter.c")],
        &counter,
        &["FIXTURE_LIMIT=2"],
    );
    let p = daemon_with(
        &[&example, &counter],
        &[("l", "\"mod-example\", \"async-counter\"")],
        "",
        "[module.mod-example]\nblocked_sender = \"spammer@example.com\"\n",
    );
    let addr = p.addrs()[0].clone();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = Client::connect(&addr).await;
        assert_eq!(
            c.ask(&postfix_request(&[("sender", "spammer@example.com")]))
                .await,
            "action=reject sender blocked by mod-example\n\n"
        );
        let mut answers = Vec::new();
        for i in 0..3 {
            let instance = format!("compat-{i}");
            answers.push(
                c.ask(&postfix_request(&[
                    ("sender", "a@x"),
                    ("instance", &instance),
                ]))
                .await,
            );
        }
        assert_eq!(
            answers,
            [
                "action=dunno\n\n",
                "action=dunno\n\n",
                "action=reject limit reached\n\n"
            ],
            "{}",
            p.log()
        );
    });
}

/// A process_poll that blocks (300 ms, a module bug) is logged, and from then on that
/// module's requests go to process() on its own threads under the module timeout: one
/// stalled poll, not a stalled event loop for every request after it.
#[test]
fn a_blocking_poll_sends_the_module_to_its_threads() {
    let AsyncCounter {
        rt,
        daemon: _daemon,
        addrs: a,
        ..
    } = async_counter(2, &["FIXTURE_LIMIT=50"], |so, db| {
        config_for(
            &[so],
            &["async-counter"],
            &format!("[storage]\npath = {db:?}\n"),
        )
    });
    rt.block_on(async {
        let mut c = Client::connect(&a[0]).await;
        let ask =
            |s: &'static str, i: &'static str| postfix_request(&[("sender", s), ("instance", i)]);
        assert_eq!(c.ask(&ask("a@x", "1")).await, "action=dunno\n\n", "polled");
        assert_eq!(
            c.ask(&ask("sleep@x", "2")).await,
            "action=ok blocking\n\n",
            "the blocking poll's own request"
        );
        // Every later request is decided by process(): this module's process() says so.
        assert_eq!(
            c.ask(&ask("a@x", "3")).await,
            "action=ok blocking\n\n",
            "process() on the module's threads"
        );
    });
}
