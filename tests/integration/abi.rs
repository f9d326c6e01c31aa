//! The C ABI, proved with a real compiler: the header in three language modes, a C
//! module answering through the daemon, one fixture per load error, and modules that
//! panic or hang while the daemon serves on.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use valvula_tests::client::{Answer, Client, postfix_request};
use valvula_tests::daemon::{parse_config, start};
use valvula_tests::{cc_shared, fixture, module_path, repo_root};
use valvulad::host::{LoadError, ModuleSet};

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

fn config_for(modules: &[&Path], chain: &[&str], extra: &str) -> valvulad::config::Config {
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

/// Loads the modules `cfg` names (for real, with dlopen) and starts a daemon on them.
async fn start_loaded(cfg: valvulad::config::Config) -> (valvulad::server::Daemon, Vec<String>) {
    let (modules, _) = ModuleSet::load(&cfg, None, None).unwrap_or_else(|e| panic!("{e:?}"));
    start(cfg, modules).await
}

fn load_errors(modules: &[&Path]) -> Vec<LoadError> {
    match ModuleSet::load(&config_for(modules, &[], ""), None, None) {
        Ok(_) => panic!("{modules:?} loaded but should not"),
        Err(e) => e,
    }
}

#[tokio::test]
async fn c_module_answers_through_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
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

#[test]
fn each_load_error_is_specific() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let one = |src: &str| {
        let so = build(d, &format!("c/{src}.c"), &format!("{src}.so"), &[]);
        let e = load_errors(&[&so]);
        assert_eq!(e.len(), 1, "{e:?}");
        let text = e[0].to_string();
        assert!(
            text.starts_with(&so.display().to_string()),
            "error does not name the file: {text}"
        );
        (e.into_iter().next().unwrap(), text)
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
    let host = format!("ABI 0.{}", valvula_abi_minor());
    assert!(matches!(e, LoadError::WrongMajor { major: 1, .. }), "{t}");
    assert!(
        t.contains("ABI 1.0") && t.contains(&host),
        "both versions named: {t}"
    );
    let (e, t) = one("newer_minor");
    assert!(
        matches!(e, LoadError::NewerMinor { minor, .. } if minor == valvula_abi_minor() + 1),
        "{t}"
    );
    let module = format!("ABI 0.{}", valvula_abi_minor() + 1);
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
                need: 104,
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
    let dir = tempfile::tempdir().unwrap();
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
