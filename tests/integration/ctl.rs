//! valvula-ctl: main.cf hooks, daemon config edits, administration on both backends,
//! the running daemon, the shell in a real terminal, and a real Postfix.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use valvula_tests::daemon::Proc;
use valvula_tests::db::{TestDb, mariadb, server_url};
use valvula_tests::postfix::{PASSWORD, Postfix, USER, send_mail};
use valvula_tests::{ctl, ctl_bin, module_path, wait_until};

const MAIN_CF: &str = concat!(
    "# Postfix main.cf of a test host\n",
    "myhostname = mx.example.test\n",
    "\n",
    "# restrictions, kept as the operator wrote them\n",
    "smtpd_data_restrictions = reject_unauth_pipelining,\n",
    "    # a comment inside the value\n",
    "    permit\n",
    "mynetworks = 127.0.0.0/8\n",
);

fn config_file(dir: &Path, extra: &str) -> String {
    let p = dir.join("valvulad.toml");
    std::fs::write(
        &p,
        format!(
            "# valvulad configuration (comments must survive valvula-ctl)\n\
             [server]\nmodule_dirs = [{:?}]\nadmin_socket = \"{}/admin.sock\"\n\n\
             # the listener Postfix talks to\n\
             [[listener]]\nname = \"main\"\naddress = \"127.0.0.1:3579\"\nmodules = []\n\n\
             [storage]\npath = \"{}/v.db\"\n{extra}",
            module_path("mod_test")
                .parent()
                .unwrap()
                .display()
                .to_string(),
            dir.display(),
            dir.display()
        ),
    )
    .unwrap();
    p.display().to_string()
}

/// What the real Postfix reads for `stages` (one line each) from `dir`/main.cf.
fn postconf_all(dir: &Path, stages: &[&str]) -> Vec<String> {
    // Postfix's reader waits while main.cf is younger than ~2 s: make it look older.
    let main = dir.join("main.cf");
    std::fs::File::options()
        .write(true)
        .open(&main)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - Duration::from_secs(120))
        .unwrap();
    let o = Command::new("postconf")
        .arg("-c")
        .arg(dir)
        .arg("-h")
        .args(stages)
        .output()
        .expect("postconf (Debian package postfix) must be installed");
    assert!(
        o.status.success(),
        "postconf -c {} failed: {}",
        dir.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let lines: Vec<String> = out.lines().map(|l| l.trim().to_owned()).collect();
    assert_eq!(lines.len(), stages.len(), "postconf printed {out:?}");
    lines
}

fn postconf(dir: &Path, stage: &str) -> String {
    postconf_all(dir, &[stage]).remove(0)
}

/// Runs valvula-ctl with `input` on its standard input (a pipe, not a terminal).
fn ctl_with_stdin(args: &[&str], input: &str) -> (i32, String, String) {
    let mut c = Command::new(ctl_bin())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run valvula-ctl");
    c.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let o = c.wait_with_output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Files in `dir` whose names start with `prefix`.
fn named(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

#[test]
fn connect_and_disconnect_postfix_safely() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_file(dir.path(), "");
    let pf = dir.path().join("postfix");
    std::fs::create_dir(&pf).unwrap();
    let main = pf.join("main.cf");
    std::fs::write(&main, MAIN_CF).unwrap();
    let pfd = pf.display().to_string();
    let base = ["--config", &cfg, "--postfix-dir", &pfd, "--yes"];
    let run = |more: &[&str]| {
        let mut a = base.to_vec();
        a.extend_from_slice(more);
        ctl(&a)
    };

    // Dry run: the diff, and nothing written.
    let (code, out, err) = run(&["--dry-run", "-c", "smtpd_data_restrictions", "3579", "last"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("+    permit, check_policy_service inet:127.0.0.1:3579"),
        "{out}"
    );
    assert_eq!(
        std::fs::read_to_string(&main).unwrap(),
        MAIN_CF,
        "a dry run changed main.cf"
    );

    // The real edit: last means after the last continuation line.
    let (code, out, err) = run(&["-c", "smtpd_data_restrictions", "3579", "last"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("postconf agrees"), "{out}");
    let read = postconf(&pf, "smtpd_data_restrictions");
    assert_eq!(
        read, "reject_unauth_pipelining, permit, check_policy_service inet:127.0.0.1:3579",
        "postconf reads {read:?}"
    );
    let edited = std::fs::read_to_string(&main).unwrap();
    assert!(
        edited.contains("    # a comment inside the value\n"),
        "{edited}"
    );
    let backups = named(&pf, "main.cf.valvula-ctl.");
    assert_eq!(backups.len(), 1, "backups: {backups:?}");
    let saved = std::fs::read_to_string(&backups[0]).unwrap();
    assert_eq!(saved, MAIN_CF, "the backup holds {saved:?}");
    // Nothing else left behind: no temporary file, no lock.
    let all = named(&pf, "");
    assert_eq!(all.len(), 2, "files in the Postfix directory: {all:?}");

    // Idempotent, by name too.
    let (code, out, _) = run(&[
        "--connect-postfix",
        "smtpd_data_restrictions",
        "main",
        "first",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("already in smtpd_data_restrictions"), "{out}");
    assert_eq!(
        std::fs::read_to_string(&main).unwrap(),
        edited,
        "an edit with nothing to do changed main.cf"
    );

    // Disconnect gives Postfix its list back.
    let (code, out, err) = run(&["-r", "smtpd_data_restrictions", "3579"]);
    assert_eq!(code, 0, "{out}{err}");
    let read = postconf(&pf, "smtpd_data_restrictions");
    assert_eq!(
        read, "reject_unauth_pipelining, permit",
        "postconf reads {read:?}"
    );

    // A missing stage is created with valvula's safe defaults.
    let (code, _, err) = run(&["-c", "smtpd_recipient_restrictions", "3579", "first"]);
    assert_eq!(code, 0, "{err}");
    let read = postconf(&pf, "smtpd_recipient_restrictions");
    assert_eq!(
        read,
        "check_policy_service inet:127.0.0.1:3579, permit_mynetworks, reject_unauth_destination",
        "postconf reads {read:?}"
    );

    // Errors are sentences, with a non-zero status, and leave the file alone.
    let before = std::fs::read_to_string(&main).unwrap();
    for (args, says) in [
        (
            vec!["-c", "smtpd_data_restrictions", "4000", "first"],
            "no listener 4000",
        ),
        (
            vec!["-c", "mydestination", "3579", "first"],
            "is not a restriction stage",
        ),
        (
            vec!["-c", "smtpd_data_restrictions", "3579", "middle"],
            "first or last",
        ),
    ] {
        let (code, out, err) = run(&args);
        assert_ne!(code, 0, "{args:?}: {out}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    std::fs::write(&main, format!("{before}smtpd_data_restrictions = permit\n")).unwrap();
    let dup = std::fs::read_to_string(&main).unwrap();
    let (code, _, err) = run(&["-c", "smtpd_data_restrictions", "3579", "first"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("defined 2 times") && err.contains("left untouched"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(&main).unwrap(),
        dup,
        "a refused file was changed"
    );
    // A line Postfix itself cannot read: refused, file untouched.
    let broken = format!("{before}stray words without an equals sign\n");
    std::fs::write(&main, &broken).unwrap();
    let (code, _, err) = run(&["-c", "smtpd_sender_restrictions", "3579", "first"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("is not `name = value`") && err.contains("left untouched"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(&main).unwrap(),
        broken,
        "a refused file was changed"
    );
    // A main.cf with a second hard link would be split by the rename: refused.
    std::fs::write(&main, &before).unwrap();
    let twin = dir.path().join("main.cf.hardlink");
    std::fs::hard_link(&main, &twin).unwrap();
    let (code, _, err) = run(&["-c", "smtpd_sender_restrictions", "3579", "first"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("hard links"), "{err}");
    std::fs::remove_file(&twin).unwrap();

    // A main.cf that is a link out of the Postfix directory is refused.
    let outside = dir.path().join("elsewhere.cf");
    std::fs::write(&outside, MAIN_CF).unwrap();
    std::fs::remove_file(&main).unwrap();
    std::os::unix::fs::symlink(&outside, &main).unwrap();
    let (code, _, err) = run(&["-c", "smtpd_data_restrictions", "3579", "first"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("symbolic link"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&outside).unwrap(),
        MAIN_CF,
        "the file outside was changed"
    );
}

#[test]
fn daemon_config_edits_keep_comments() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_file(dir.path(), "");
    let g = ["--config", cfg.as_str()];
    let run = |more: &[&str]| {
        let mut a = g.to_vec();
        a.extend_from_slice(more);
        ctl(&a)
    };
    for args in [
        &["-a", "3600"][..],
        &["-m", "mod-test", "127.0.0.1:3600"],
        &["-e", "mod-ratelimit"],
        &["-u", "nobody", "nogroup"],
    ] {
        let (code, out, err) = run(args);
        assert_eq!(code, 0, "{args:?}: {out}{err}");
    }
    let (_, out, _) = run(&["-a", "127.0.0.1:3600"]);
    assert!(out.contains("already exists"), "{out}");
    let (code, _, err) = run(&["-u", "no-such-user-here", "nogroup"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("server.user: no user"), "{err}");
    let (_, out, _) = run(&["-l"]);
    assert!(
        out.contains("Listen: 127.0.0.1:3600") && out.contains("  Mod: mod-test"),
        "{out}"
    );
    let (_, out, _) = run(&["-o"]);
    assert!(
        out.contains("Module: mod-test (enabled") && out.contains("Module: mod-ratelimit (enabled"),
        "{out}"
    );
    let (code, out, err) = run(&["-d", "mod-test"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("taken out of the chain of 127.0.0.1:3600"),
        "{out}"
    );
    let text = std::fs::read_to_string(&cfg).unwrap();
    for c in [
        "# valvulad configuration (comments must survive valvula-ctl)",
        "# the listener Postfix talks to",
    ] {
        assert!(text.contains(c), "comment lost:\n{text}");
    }
    assert!(
        valvula_config::parse(&text, Path::new(&cfg)).is_ok(),
        "{text}"
    );
    // A change that would break the configuration is refused.
    let (code, _, err) = run(&["-m", "mod-test", "9999"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no listener 9999"), "{err}");
    // -y tests the database before saving; on failure the old values stay.
    let (code, _, err) = ctl_with_stdin(
        &[
            "--config",
            &cfg,
            "-y",
            "nodb",
            "nouser",
            "--db-host",
            "127.0.0.1:1",
        ],
        "nopass\n",
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("previous values kept"), "{err}");
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(
        !text.contains("nodb"),
        "a failed -y changed the file:\n{text}"
    );
    // Root has no password on the test server: an empty line on standard input.
    let db = TestDb::new();
    let (code, out, err) = ctl_with_stdin(&["--config", &cfg, "-y", &db.name, "root"], "\n");
    assert_eq!(code, 0, "{out}{err}");
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(text.contains(&format!("/{}", db.name)), "{text}");
    assert!(!text.contains("password"), "no password, no key:\n{text}");
}

fn admin_session(storage: &str) {
    let modules = format!(
        "[server]\nmodule_dirs = [{:?}]\n\
         [[listener]]\nname = \"main\"\naddress = \"127.0.0.1:0\"\nmodules = [\"mod-ticket\", \"mod-ratelimit\"]\n\
         [module.mod-ticket]\ncharge_states = [\"DATA\"]\n\
         [[module.mod-ratelimit.policy]]\nname = \"users\"\nkey = \"sasl_user\"\nmetric = \"recipients\"\n\
         default = {{ limits = [[\"hour\", 10]] }}\n{storage}",
        module_path("mod_ticket")
            .parent()
            .unwrap()
            .display()
            .to_string()
    );
    let p = Proc::start(&modules, &[]);
    let cfg = p.config_path.display().to_string();
    let run = |more: &[&str]| ctl_ok(&cfg, more).0;
    assert!(
        run(&["plan", "add", "basic", "--day", "3", "--month", "100"]).contains("plan 1 added")
    );
    assert!(run(&["plan", "list"]).contains("basic"));
    assert!(
        run(&[
            "ticket",
            "add",
            "--user",
            "alice@example.com",
            "--plan",
            "1",
            "--valid-until",
            "2037-12-31"
        ])
        .contains("ticket 1 added")
    );
    assert!(run(&["ticket", "list"]).contains("alice@example.com"));
    let addr = p.addrs()[0].clone();
    // Two messages through the daemon, with -t.
    let out = run(&[
        "-t",
        &addr,
        "--sasl-user",
        "alice@example.com",
        "--sender",
        "alice@example.com",
        "--count",
        "2",
        "--rcpt-count",
        "1",
    ]);
    assert_eq!(
        out.matches("INFO: message received: action=dunno").count(),
        2,
        "{out}"
    );
    assert!(out.contains("milliseconds"), "{out}");
    let out = run(&["usage", "alice@example.com"]);
    assert!(
        out.contains("mod-ticket #1 user alice@example.com"),
        "{out}"
    );
    assert!(out.contains("day      used 2 / 3, remaining 1"), "{out}");
    assert!(
        out.contains("mod-ratelimit users alice@example.com"),
        "{out}"
    );
    assert!(out.contains("hour     used 2 / 10, remaining 8"), "{out}");
    run(&[
        "override",
        "set",
        "users",
        "alice@example.com",
        "hour=3",
        "--persist",
    ]);
    assert!(run(&["override", "list"]).contains("hour=3"));
    // What mod-ratelimit would never match or refuses is refused here, with its reason.
    for (args, why) in [
        (
            &["override", "set", "user", "alice@example.com", "hour=3"][..],
            "has no policy \"user\"",
        ),
        (
            &[
                "override",
                "set",
                "users",
                "alice@example.com",
                "fortnight=3",
            ][..],
            "fortnight",
        ),
    ] {
        let mut a = vec!["--config", cfg.as_str()];
        a.extend_from_slice(args);
        let (code, out, err) = ctl(&a);
        assert!(
            code != 0 && err.contains(why),
            "{args:?}: exit {code}, {out}{err}"
        );
    }
    assert!(run(&["usage", "alice@example.com"]).contains("used 2 / 3, remaining 1, resets"));
    run(&["ticket", "block", "1"]);
    let out = run(&["-t", &addr, "--sasl-user", "alice@example.com"]);
    assert!(
        out.contains("action=reject Rejecting operation because ticket (1) is blocked(1)"),
        "{out}"
    );
    run(&["ticket", "unblock", "1"]);
    assert!(run(&["reset", "alice@example.com"]).contains("reset"));
    let out = run(&["usage", "alice@example.com"]);
    assert!(out.contains("day      used 0 / 3"), "{out}");
    run(&["override", "remove", "users", "alice@example.com"]);
    // The running daemon.
    let out = run(&["status"]);
    assert!(
        out.contains("Listen: ") && out.contains("Module: mod-ticket") && out.contains("requests="),
        "{out}"
    );
    // valvula-ctl says so itself once the daemon answered: the daemon's log line is
    // written by another thread and may reach the test later.
    let out = run(&["reload"]);
    assert!(
        out.contains("valvulad reloaded its configuration"),
        "{out:?}"
    );
    assert!(
        p.wait_for_log("configuration reloaded", Duration::from_secs(60)),
        "the daemon did not log its reload:\n{}",
        p.log()
    );
    let (code, _, err) = ctl(&["--config", &cfg, "ticket", "valid", "1", "2099-01-01"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("32-bit"), "{err}");
    let (code, _, err) = ctl(&["--config", &cfg, "plan", "remove", "1"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("used by 1 ticket"), "{err}");
    // A listener the running daemon cannot open (its port is taken): the edit is valid
    // and written, but the daemon refuses it, and so would its next start.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let (code, out, err) = ctl(&["--config", &cfg, "-a", &format!("127.0.0.1:{port}")]);
    assert!(
        code == 1
            && err.contains("valvulad refused the changed configuration")
            && err.contains("backup in"),
        "-a on a port in use: exit {code}, {out}{err}"
    );
}

/// `usage`, `reset` and `override` see what mod-ratelimit applies: a network rule for a
/// `client_network` key, a sliding window (buckets only on SQLite), and, while the
/// module's section is one it would refuse, the override rows still.
#[test]
fn usage_follows_the_module_on_networks_sliding_windows_and_a_broken_section() {
    let cfg_text = format!(
        "[server]\nmodule_dirs = [{:?}]\n\
         [[listener]]\nname = \"main\"\naddress = \"127.0.0.1:0\"\nmodules = [\"mod-ratelimit\"]\n\
         [[module.mod-ratelimit.policy]]\nname = \"nets\"\nkey = \"client_network/24\"\nmetric = \"messages\"\n\
         default = {{ limits = [[\"day\", 100]] }}\n\
         rules = {{ \"127.0.0.0/24\" = {{ limits = [[\"day\", 2]] }} }}\n\
         [[module.mod-ratelimit.policy]]\nname = \"slide\"\nkey = \"sasl_user\"\nmetric = \"messages\"\n\
         default = {{ limits = [[\"90s\", 5]] }}\n",
        module_path("mod_ratelimit")
            .parent()
            .unwrap()
            .display()
            .to_string()
    );
    let p = Proc::start(&cfg_text, &[]);
    let cfg = p.config_path.display().to_string();
    let run = |more: &[&str]| ctl_ok(&cfg, more);
    let addr = p.addrs()[0].clone();
    let (out, _) = run(&["-t", &addr, "--sasl-user", "alice@example.com"]);
    assert!(out.contains("action=dunno"), "{out}");
    let (out, _) = run(&["usage", "127.0.0.0/24"]);
    assert!(
        out.contains("day      used 1 / 2, remaining 1"),
        "network rule: {out}"
    );
    let (out, _) = run(&["usage", "alice@example.com"]);
    assert!(
        out.contains("90s      used 1 / 5, remaining 4"),
        "sliding window: {out}"
    );
    // A section mod-ratelimit would refuse (the daemon keeps its previous settings):
    // usage still answers, overrides still show and can be set.
    let broken = std::fs::read_to_string(&p.config_path)
        .unwrap()
        .replace("[[\"day\", 100]]", "[[\"fortnight\", 100]]");
    std::fs::write(&p.config_path, broken).unwrap();
    let (_, err) = run(&["override", "set", "slide", "alice@example.com", "90s=9"]);
    assert!(
        err.contains("WARNING") && err.contains("fortnight"),
        "{err}"
    );
    let (out, err) = run(&["usage", "alice@example.com"]);
    assert!(err.contains("WARNING"), "{err}");
    assert!(
        out.contains("90s      used 1 / 9"),
        "override limits shown: {out}"
    );
    // Reset reaches the sliding window's buckets.
    let (out, _) = run(&["reset", "alice@example.com"]);
    assert!(out.contains("reset"), "{out}");
    let (out, _) = run(&["usage", "alice@example.com"]);
    assert!(
        !out.contains("used 1"),
        "the sliding count was not reset: {out}"
    );
}

#[test]
fn administration_on_sqlite() {
    admin_session("");
}

#[test]
fn administration_on_mariadb() {
    let db = TestDb::new();
    admin_session(&format!(
        "[storage]\nbackend = \"mysql\"\nurl = \"{}\"\n",
        db.url()
    ));
}

/// Types into the shell in a real terminal (tmux) and reads the screen.
#[test]
fn shell_in_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_file(dir.path(), "");
    // mod-ticket on the listener; a daemon's first run makes its tables (`valvulad -t`
    // writes nothing), here on a port of its own.
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("modules = []", "modules = [\"mod-ticket\"]");
    std::fs::write(&cfg, &text).unwrap();
    let mut first = valvula_tests::daemon::Proc::start_exact(
        &text.replace("127.0.0.1:3579", "127.0.0.1:0"),
        "valvulad.toml",
        &[],
    );
    first.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(
        first.wait_exit(Duration::from_secs(30)).success(),
        "{}",
        first.log()
    );
    let pf = dir.path().join("postfix");
    std::fs::create_dir(&pf).unwrap();
    std::fs::write(pf.join("main.cf"), MAIN_CF).unwrap();
    let session = format!("vlvctl{}", std::process::id());
    // The tmux server outlives a failed assertion unless something stops it.
    struct KillServer(String);
    impl Drop for KillServer {
        fn drop(&mut self) {
            let _ = Command::new("tmux")
                .args(["-L", &self.0, "kill-server"])
                .output();
        }
    }
    let _server = KillServer(session.clone());
    let tmux = |args: &[&str]| {
        Command::new("tmux")
            .args(["-L", &session])
            .args(args)
            .output()
            .expect("tmux")
    };
    let cmd = format!(
        "HOME={} {} --config {cfg} --postfix-dir {} --yes",
        dir.path().display(),
        ctl_bin().display(),
        pf.display()
    );
    let started = tmux(&[
        "new-session",
        "-d",
        "-s",
        "s",
        "-x",
        "200",
        "-y",
        "50",
        &cmd,
    ]);
    assert!(
        started.status.success(),
        "tmux new-session: {}",
        String::from_utf8_lossy(&started.stderr)
    );
    let screen = || {
        String::from_utf8_lossy(&tmux(&["capture-pane", "-p", "-t", "s", "-S", "-200"]).stdout)
            .into_owned()
    };
    // Polls the pane until the text appears, with a deadline generous enough for a
    // loaded machine.
    let wait = |needle: &str| {
        let end = Instant::now() + Duration::from_secs(60);
        while Instant::now() < end {
            if screen().contains(needle) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("{needle:?} not on screen:\n{}", screen());
    };
    // Polls until `needle` is on screen more often than `before` times: the answer
    // to a command that prints what an earlier one did (two `-l`) is its own.
    let wait_more = |needle: &str, before: usize| {
        let end = Instant::now() + Duration::from_secs(60);
        while Instant::now() < end {
            if screen().matches(needle).count() > before {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "{needle:?} not on screen {} times:\n{}",
            before + 1,
            screen()
        );
    };
    // tmux drops the prompt's trailing space.
    wait(">>");
    for (line, expect) in [
        ("-o", "Module: mod-ticket (enabled"),
        ("-l", "Listen: 127.0.0.1:3579 (main)"),
        ("-c smtpd_data_restrictions 3579 first", "postconf agrees"),
        ("plan add gold --day 2", "plan 1 added"),
        (
            "ticket add --user bob@example.com --plan 1",
            "ticket 1 added",
        ),
        ("usage bob@example.com", "day      used 0 / 2, remaining 2"),
        ("no-such-verb", "error"),
        ("-l", "Listen: 127.0.0.1:3579 (main)"),
    ] {
        // Each command is typed at a fresh prompt, after the previous one answered.
        let prompts = screen().matches(">>").count();
        let seen = screen().matches(expect).count();
        tmux(&["send-keys", "-t", "s", "-l", "--", line]);
        tmux(&["send-keys", "-t", "s", "Enter"]);
        wait_more(expect, seen);
        wait_more(">>", prompts);
    }
    // Completion of a stage name.
    tmux(&["send-keys", "-t", "s", "-l", "--", "-s smtpd_end_of"]);
    tmux(&["send-keys", "-t", "s", "Tab"]);
    wait("smtpd_end_of_data_restrictions");
    tmux(&["send-keys", "-t", "s", "C-u"]);
    // -y asks for the password on the terminal, without echo.
    let db = TestDb::new();
    let account = DbAccount::new(&db, "Sh3ll-pw");
    tmux(&[
        "send-keys",
        "-t",
        "s",
        "-l",
        "--",
        &format!("-y {} {}", db.name, account.user),
    ]);
    tmux(&["send-keys", "-t", "s", "Enter"]);
    wait(&format!("Password of {}@", account.user));
    tmux(&["send-keys", "-t", "s", "-l", "--", "Sh3ll-pw"]);
    tmux(&["send-keys", "-t", "s", "Enter"]);
    wait("connection tested");
    let shown = screen();
    assert!(
        !shown.contains("Sh3ll-pw"),
        "the password was echoed:\n{shown}"
    );
    tmux(&["send-keys", "-t", "s", "-l", "--", "exit"]);
    tmux(&["send-keys", "-t", "s", "Enter"]);
    wait_until("the shell to exit", Duration::from_secs(60), || {
        !tmux(&["has-session", "-t", "s"]).status.success()
    });
    let _ = tmux(&["kill-server"]);
    let read = postconf(&pf, "smtpd_data_restrictions");
    assert_eq!(
        read, "check_policy_service inet:127.0.0.1:3579, reject_unauth_pipelining, permit",
        "postconf reads {read:?}"
    );
    let history = dir.path().join(".valvula-ctl_history");
    assert!(history.exists(), "{} missing", history.display());
    let kept = std::fs::read_to_string(&history).unwrap_or_default();
    assert!(!kept.contains("Sh3ll-pw"), "the password is in the history");
    let stored = valvula_config::load_file(Path::new(&cfg)).unwrap().config;
    match stored.storage.backend {
        valvula_store::Backend::Mysql { password, .. } => {
            assert_eq!(password.as_deref(), Some("Sh3ll-pw"), "password read back")
        }
        other => panic!("-y did not set mysql: {other:?}"),
    }
}

/// valvula-ctl hooks valvulad into a running Postfix, reloads it, and the next mail
/// meets the ticket limit.
#[test]
fn hooks_a_real_postfix() {
    let cfgtext = format!(
        "[server]\nmodule_dirs = [{:?}]\n\
         [[listener]]\nname = \"main\"\naddress = \"127.0.0.1:0\"\nmodules = [\"mod-ticket\"]\n",
        module_path("mod_ticket")
            .parent()
            .unwrap()
            .display()
            .to_string()
    );
    let v = Proc::start(&cfgtext, &[]);
    // Pin the listener's real port in the config, as an operator's file would have it.
    let addr = v.addrs()[0].clone();
    let fixed = std::fs::read_to_string(&v.config_path)
        .unwrap()
        .replace("127.0.0.1:0", &addr);
    std::fs::write(&v.config_path, fixed).unwrap();
    let cfg = v.config_path.display().to_string();
    let pf = Postfix::start_with("");
    let pfd = pf.config_dir().display().to_string();
    for a in [
        vec!["plan", "add", "tiny", "--day", "1"],
        vec!["ticket", "add", "--user", USER, "--plan", "1"],
    ] {
        let mut args = vec!["--config", cfg.as_str()];
        args.extend(a);
        let (code, out, err) = ctl(&args);
        assert_eq!(code, 0, "{args:?}: {out}{err}");
    }
    let r = send_mail(pf.port, Some((USER, PASSWORD)), USER, &["bob@example.com"]);
    assert!(r.accepted(), "{r:?}");
    let (code, out, err) = ctl(&[
        "--config",
        &cfg,
        "--postfix-dir",
        &pfd,
        "--reload",
        "-c",
        "smtpd_data_restrictions",
        &addr,
        "first",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("postfix reloaded"), "{out}");
    // `postfix reload` only signals the master: wait until new sessions see the hook.
    pf.wait_reloaded();
    let r = send_mail(pf.port, Some((USER, PASSWORD)), USER, &["bob@example.com"]);
    assert!(
        r.accepted(),
        "first mail after the hook: {r:?}\n{}",
        pf.maillog()
    );
    let r = send_mail(pf.port, Some((USER, PASSWORD)), USER, &["bob@example.com"]);
    assert_eq!(
        (r.step.as_str(), r.code),
        ("DATA", 554),
        "{r:?}\n{}",
        pf.maillog()
    );
    assert!(
        r.text
            .contains("Rejecting operation because day limit reached (1)"),
        "{r:?}"
    );
}

/// valvula-ctl with `--config cfg` and `args`, which must succeed: (stdout, stderr).
fn ctl_ok(cfg: &str, args: &[&str]) -> (String, String) {
    let mut a = vec!["--config", cfg];
    a.extend_from_slice(args);
    let (code, out, err) = ctl(&a);
    assert_eq!(code, 0, "{args:?}: {out}{err}");
    (out, err)
}

/// A MariaDB account with a password, allowed on one test database; dropped afterwards.
struct DbAccount {
    user: String,
}

impl DbAccount {
    fn new(db: &TestDb, password: &str) -> DbAccount {
        // The database names are unique per test; the account is named after it.
        let user = format!("u{}", &db.name[db.name.len().saturating_sub(20)..]);
        mariadb(
            &server_url(),
            None,
            &format!(
                "CREATE USER '{user}'@'%' IDENTIFIED BY '{password}'; \
                 CREATE USER '{user}'@'localhost' IDENTIFIED BY '{password}'; \
                 GRANT ALL ON {db}.* TO '{user}'@'%'; GRANT ALL ON {db}.* TO '{user}'@'localhost'",
                db = db.name
            ),
        );
        DbAccount { user }
    }
}

impl Drop for DbAccount {
    fn drop(&mut self) {
        let _ = std::panic::catch_unwind(|| {
            mariadb(
                &server_url(),
                None,
                &format!(
                    "DROP USER IF EXISTS '{u}'@'%'; DROP USER IF EXISTS '{u}'@'localhost'",
                    u = self.user
                ),
            )
        });
    }
}

/// `-y DBNAME DBUSER`: the password comes from standard input or a file, never from
/// the command line; it goes to a file of mode 0600 next to valvulad.toml, not into the
/// (world-readable) TOML; valvula's old three-argument form is refused with a sentence.
#[test]
fn config_mysql_keeps_the_password_off_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_file(dir.path(), "");
    let db = TestDb::new();
    let account = DbAccount::new(&db, "s3cret-Pw");
    let before = std::fs::read_to_string(&cfg).unwrap();

    // The old form: refused, with where the password goes now; nothing changed.
    let (code, out, err) = ctl(&["--config", &cfg, "-y", &db.name, &account.user, "s3cret-Pw"]);
    assert_ne!(code, 0, "the password was taken from argv: {out}{err}");
    assert!(
        err.contains("--password-file") && err.contains("--password-stdin"),
        "{err}"
    );
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert_eq!(text, before, "the refused -y changed the file");

    // A wrong password: the connection test fails, nothing written.
    let (code, _, err) = ctl_with_stdin(
        &[
            "--config",
            &cfg,
            "-y",
            &db.name,
            &account.user,
            "--password-stdin",
        ],
        "wrong\n",
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("previous values kept"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&cfg).unwrap(),
        before,
        "file changed"
    );
    let pwfile = dir.path().join("valvulad.db-password");
    assert!(
        !pwfile.exists(),
        "a password file was written for a failed -y"
    );

    // Standard input that is not a terminal is read without --password-stdin.
    let (code, out, err) = ctl_with_stdin(
        &["--config", &cfg, "-y", &db.name, &account.user],
        "s3cret-Pw\n",
    );
    assert_eq!(code, 0, "{out}{err}");
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(
        !text.contains("s3cret-Pw"),
        "password in valvulad.toml:\n{text}"
    );
    assert!(
        text.contains("password_file = \"valvulad.db-password\""),
        "{text}"
    );
    assert!(
        text.contains("# valvulad configuration (comments must survive valvula-ctl)"),
        "{text}"
    );
    let m = std::fs::symlink_metadata(&pwfile).unwrap();
    assert!(m.is_file(), "{} is not a regular file", pwfile.display());
    assert_eq!(
        m.mode() & 0o7777,
        0o600,
        "password file mode {:o}",
        m.mode()
    );
    let stored = valvula_config::load_file(Path::new(&cfg)).unwrap().config;
    match &stored.storage.backend {
        valvula_store::Backend::Mysql { url, password, .. } => {
            assert!(url.ends_with(&format!("/{}", db.name)), "{url}");
            assert_eq!(password.as_deref(), Some("s3cret-Pw"), "password read back");
        }
        other => panic!("-y did not set mysql: {other:?}"),
    }
    // The backups of valvulad.toml never held the password either.
    for b in named(dir.path(), "valvulad.toml.valvula-ctl.") {
        let t = std::fs::read_to_string(&b).unwrap();
        assert!(!t.contains("s3cret-Pw"), "password in {}", b.display());
    }

    // --password-file, and the administration verbs then use that account.
    let given = dir.path().join("given-password");
    std::fs::write(&given, "s3cret-Pw\n").unwrap();
    let (code, out, err) = ctl(&[
        "--config",
        &cfg,
        "-y",
        &db.name,
        &account.user,
        "--password-file",
        &given.display().to_string(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        std::fs::read_to_string(&pwfile).unwrap(),
        "s3cret-Pw\n",
        "password file content"
    );
    let (code, out, err) = ctl(&["--config", &cfg, "plan", "list"]);
    // mod-ticket's tables do not exist yet: an error from MariaDB, not a login failure.
    assert!(
        !err.contains("Access denied"),
        "the stored password did not log in: {code} {out}{err}"
    );
}

/// Many valvula-ctl processes at once on one main.cf (different stages and listeners,
/// first and last): every one that says it succeeded finds its hook in the final file,
/// and the real postconf reads them all.
#[test]
fn concurrent_main_cf_edits_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut listeners = String::new();
    for i in 0..8 {
        listeners.push_str(&format!(
            "[[listener]]\nname = \"l{i}\"\naddress = \"127.0.0.1:{}\"\nmodules = []\n",
            3600 + i
        ));
    }
    let cfg = config_file(dir.path(), &listeners);
    let pf = dir.path().join("postfix");
    std::fs::create_dir(&pf).unwrap();
    std::fs::write(pf.join("main.cf"), MAIN_CF).unwrap();
    let pfd = pf.display().to_string();
    let stages: Vec<&str> = valvula_postfix::STAGES.iter().map(|(s, _)| *s).collect();
    let mut jobs = Vec::new();
    for i in 0..14 {
        let stage = stages[i % 7];
        let port = (3600 + i % 8).to_string();
        let pos = if i < 7 { "first" } else { "last" };
        let child = Command::new(ctl_bin())
            .args(["--config", &cfg, "--postfix-dir", &pfd, "--yes", "-c"])
            .args([stage, &port, pos])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        jobs.push((stage, port, child));
    }
    let mut done = Vec::new();
    for (stage, port, child) in jobs {
        let o = child.wait_with_output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        done.push((stage, port, o.status.success(), text));
    }
    let read = postconf_all(&pf, &stages);
    let file = std::fs::read_to_string(pf.join("main.cf")).unwrap();
    for (stage, port, ok, text) in &done {
        assert!(ok, "-c {stage} {port} failed:\n{text}");
        let decl = format!("check_policy_service inet:127.0.0.1:{port}");
        let value = &read[stages.iter().position(|s| s == stage).unwrap()];
        assert_eq!(
            value.matches(&decl).count(),
            1,
            "{stage}: {decl} reported done but postconf reads {value:?}\n{text}\nmain.cf:\n{file}"
        );
    }
    assert_eq!(
        named(&pf, "main.cf.valvula-ctl.").len(),
        14,
        "one backup per edit: {:?}",
        named(&pf, "")
    );
    let stray: Vec<PathBuf> = named(&pf, "")
        .into_iter()
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n != "main.cf" && !n.starts_with("main.cf.valvula-ctl.")
        })
        .collect();
    assert!(stray.is_empty(), "left behind: {stray:?}");
}

/// The same for valvulad.toml: parallel -a, -m, -e, -u (and one that fails) keep every
/// change that was reported.
#[test]
fn concurrent_config_edits_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_file(dir.path(), "");
    let mut runs: Vec<Vec<String>> = (0..8)
        .map(|i| vec!["-a".into(), format!("127.0.0.1:{}", 4100 + i)])
        .collect();
    for a in [
        &["-e", "mod-ratelimit"][..],
        &["-e", "mod-ticket"],
        &["-m", "mod-test", "main"],
        &["-u", "nobody", "nogroup"],
        &["-m", "mod-test", "9999"],
    ] {
        runs.push(a.iter().map(|s| s.to_string()).collect());
    }
    let jobs: Vec<_> = runs
        .iter()
        .map(|args| {
            Command::new(ctl_bin())
                .args(["--config", &cfg])
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let results: Vec<_> = jobs
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let text = std::fs::read_to_string(&cfg).unwrap();
    let c = valvula_config::parse(&text, Path::new(&cfg))
        .unwrap_or_else(|e| panic!("the result does not load: {e}\n{text}"))
        .config;
    for (args, o) in runs.iter().zip(&results) {
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        if args.last().is_some_and(|a| a == "9999") {
            assert!(!o.status.success(), "{args:?} succeeded: {said}");
            continue;
        }
        assert!(o.status.success(), "{args:?} failed: {said}");
        let there = match args[0].as_str() {
            "-a" => c.listeners.iter().any(|l| l.address.to_string() == args[1]),
            "-e" => text.contains(&format!("\"{}\"", args[1])),
            "-m" => c
                .listeners
                .iter()
                .any(|l| l.name == "main" && l.modules.contains(&args[1])),
            "-u" => c.server.user.as_deref() == Some("nobody"),
            _ => unreachable!(),
        };
        assert!(
            there,
            "{args:?} reported done but is not in the file:\n{text}\n{said}"
        );
    }
    let comment = "# the listener Postfix talks to";
    assert!(text.contains(comment), "comment lost:\n{text}");
    assert_eq!(
        named(dir.path(), "valvulad.toml.valvula-ctl.").len(),
        12,
        "one backup per change: {:?}",
        named(dir.path(), "")
    );
    assert!(
        named(dir.path(), ".valvulad.toml").is_empty()
            && !dir.path().join("valvulad.toml.lock").exists(),
        "temporary or lock files left: {:?}",
        named(dir.path(), "")
    );
}

/// Writes an executable script.
fn script(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Two admins at once. Admin A's edit fails its postconf check while admin B runs
/// valvula-ctl too: A must not put back a stale copy over B's edit. Postfix and
/// valvula-postfix read every main.cf the tests know alike, so A's disagreement is
/// staged with a `postconf` earlier in A's PATH: it starts B, gives B time to write,
/// then answers what Postfix would read if the hook were missing. Then a program that
/// does not take the lock (an editor) changes main.cf while A edits: A writes nothing
/// and says so.
/// Admin A: `-c smtpd_data_restrictions 3579 last` with `bin` first in PATH (its
/// `postconf`); its output and what it said.
fn admin_a_hooks(cfg: &str, pf: &Path, bin: &Path, path: &str) -> (std::process::Output, String) {
    let a = Command::new(ctl_bin())
        .args(["--config", cfg, "--postfix-dir"])
        .arg(pf)
        .args(["--yes", "-c", "smtpd_data_restrictions", "3579", "last"])
        .env("PATH", format!("{}:{path}", bin.display()))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&a.stdout),
        String::from_utf8_lossy(&a.stderr)
    );
    (a, said)
}

#[test]
fn a_failed_edit_never_undoes_another_admins() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_file(
        dir.path(),
        "[[listener]]\nname = \"b\"\naddress = \"127.0.0.1:3580\"\nmodules = []\n",
    );
    let pf = dir.path().join("postfix");
    std::fs::create_dir(&pf).unwrap();
    let main = pf.join("main.cf");
    std::fs::write(&main, MAIN_CF).unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let path = std::env::var("PATH").unwrap_or_default();
    let b_out = dir.path().join("b.out");
    let b_code = dir.path().join("b.code");
    script(
        &bin.join("postconf"),
        &format!(
            "#!/bin/sh\n\
             # Admin B, with the real postconf.\n\
             (PATH='{path}' '{ctl}' --config '{cfg}' --postfix-dir '{pf}' --yes \
                 -c smtpd_sender_restrictions 3580 last > '{bout}' 2>&1; echo $? > '{bcode}') < /dev/null > /dev/null 2>&1 &\n\
             i=0\n\
             while [ $i -lt 150 ] && ! grep -q ':3580' '{main}'; do sleep 0.02; i=$((i+1)); done\n\
             echo reject_unauth_pipelining, permit\n",
            ctl = ctl_bin().display(),
            pf = pf.display(),
            bout = b_out.display(),
            bcode = b_code.display(),
            main = main.display(),
        ),
    );
    let (a, a_said) = admin_a_hooks(&cfg, &pf, &bin, &path);
    assert_eq!(a.status.code(), Some(1), "admin A: {a_said}");
    assert!(a_said.contains("not what was meant"), "admin A: {a_said}");
    wait_until("admin B to finish", Duration::from_secs(60), || {
        std::fs::read_to_string(&b_code).is_ok_and(|c| c.ends_with('\n'))
    });
    let b_said = std::fs::read_to_string(&b_out).unwrap();
    let code = std::fs::read_to_string(&b_code).unwrap();
    assert_eq!(code.trim(), "0", "admin B: {b_said}");
    let read = postconf_all(
        &pf,
        &["smtpd_sender_restrictions", "smtpd_data_restrictions"],
    );
    assert_eq!(
        read,
        [
            "check_policy_service inet:127.0.0.1:3580",
            "reject_unauth_pipelining, permit"
        ],
        "B's hook must be there, A's not\nA: {a_said}\nB: {b_said}\n{}",
        std::fs::read_to_string(&main).unwrap()
    );

    // An editor that ignores the lock saves main.cf while A's edit is under way.
    let by_hand = "# edited by hand meanwhile\n";
    script(
        &bin.join("postconf"),
        &format!(
            "#!/bin/sh\nprintf '%s\\n' '{line}' >> '{main}'\nPATH='{path}' exec postconf \"$@\"\n",
            line = by_hand.trim_end(),
            main = main.display()
        ),
    );
    let before = std::fs::read_to_string(&main).unwrap();
    let (a, a_said) = admin_a_hooks(&cfg, &pf, &bin, &path);
    assert_eq!(a.status.code(), Some(1), "admin A: {a_said}");
    assert!(
        a_said.contains("changed while valvula-ctl was editing it"),
        "admin A: {a_said}"
    );
    let after = std::fs::read_to_string(&main).unwrap();
    assert_eq!(
        after,
        format!("{before}{by_hand}"),
        "the other edit must stay, A's must not be written"
    );
}

/// A layout where locking cannot protect the edit is refused with a sentence, and the
/// file is left alone: a directory every user can write, one that belongs to another
/// user, and (for a user who may change main.cf but not create files beside it) a lock
/// file that cannot be created.
#[test]
fn a_careless_layout_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let cfg = config_file(dir.path(), "");
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644)).unwrap();
    let pf = dir.path().join("postfix");
    std::fs::create_dir(&pf).unwrap();
    let main = pf.join("main.cf");
    std::fs::write(&main, MAIN_CF).unwrap();
    let pfd = pf.display().to_string();
    let edit = ["--config", &cfg, "--postfix-dir", &pfd, "--yes", "-c"];
    let args = [&edit[..], &["smtpd_data_restrictions", "3579", "first"]].concat();

    std::fs::set_permissions(&pf, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (code, out, err) = ctl(&args);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("writable by every user"), "{err}");
    assert_eq!(std::fs::read_to_string(&main).unwrap(), MAIN_CF, "changed");
    std::fs::set_permissions(&pf, std::fs::Permissions::from_mode(0o755)).unwrap();
    // The same for valvulad.toml's directory.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let before = std::fs::read_to_string(&cfg).unwrap();
    let (code, out, err) = ctl(&["--config", &cfg, "-a", "3700"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("writable by every user"), "{err}");
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), before, "changed");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();

    if !nix::unistd::geteuid().is_root() {
        eprintln!("not root: the parts with another user's files are skipped");
        return;
    }
    let nobody = 65534;
    // Another user's directory.
    std::os::unix::fs::chown(&pf, Some(nobody), Some(nobody)).unwrap();
    let (code, out, err) = ctl(&args);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("belongs to uid 65534"), "{err}");
    assert_eq!(std::fs::read_to_string(&main).unwrap(), MAIN_CF, "changed");
    std::os::unix::fs::chown(&pf, Some(0), Some(0)).unwrap();
    // A user who may write main.cf but not create the lock (or anything) beside it.
    std::os::unix::fs::chown(&main, Some(nobody), Some(nobody)).unwrap();
    let o = Command::new(ctl_bin())
        .args(&args)
        .uid(nobody)
        .gid(nobody)
        .env("HOME", dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot create the lock file") && err.contains(&pfd),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&main).unwrap(), MAIN_CF, "changed");
}

/// Backups never go through a planted symbolic link (dangling, or to a file outside),
/// for main.cf and for valvulad.toml, and keep the original's mode.
#[test]
fn backups_never_follow_planted_links() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_file(dir.path(), "");
    let pf = dir.path().join("postfix");
    std::fs::create_dir(&pf).unwrap();
    let main = pf.join("main.cf");
    std::fs::write(&main, MAIN_CF).unwrap();
    std::fs::set_permissions(&main, std::fs::Permissions::from_mode(0o640)).unwrap();
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o640)).unwrap();
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("victim");
    std::fs::write(&victim, "precious\n").unwrap();
    let dangling = outside.path().join("created-through-a-link");
    // The backup's name has the time to the second: plant links for the next minute.
    let now = chrono_free_stamps(60);
    for (d, name) in [(&pf, "main.cf"), (&dir.path().to_owned(), "valvulad.toml")] {
        for stamp in &now {
            let base = d.join(format!("{name}.valvula-ctl.{stamp}"));
            std::os::unix::fs::symlink(&dangling, &base).unwrap();
            std::os::unix::fs::symlink(&victim, format!("{}.1", base.display())).unwrap();
        }
    }
    let pfd = pf.display().to_string();
    let (code, out, err) = ctl(&[
        "--config",
        &cfg,
        "--postfix-dir",
        &pfd,
        "--yes",
        "-c",
        "smtpd_data_restrictions",
        "3579",
        "first",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let before = std::fs::read_to_string(&cfg).unwrap();
    let (code, out2, err) = ctl(&["--config", &cfg, "-a", "3700"]);
    assert_eq!(code, 0, "{out2}{err}");
    assert_eq!(
        std::fs::read_to_string(&victim).unwrap(),
        "precious\n",
        "a link to a file outside was written through"
    );
    assert!(
        !dangling.exists(),
        "a dangling link was followed: {} created",
        dangling.display()
    );
    for (said, original, name) in [
        (&out, MAIN_CF, "main.cf"),
        (&out2, before.as_str(), "valvulad.toml"),
    ] {
        let b = said
            .lines()
            .find_map(|l| l.split("backup in ").nth(1))
            .unwrap_or_else(|| panic!("no backup named in {said}"));
        let m = std::fs::symlink_metadata(b).unwrap();
        assert!(m.is_file(), "{name}: backup {b} is not a regular file");
        assert_eq!(
            m.mode() & 0o7777,
            0o640,
            "{name}: backup mode {:o}",
            m.mode()
        );
        assert_eq!(
            std::fs::read_to_string(b).unwrap(),
            original,
            "{name}: backup {b}"
        );
    }
    for (f, name) in [(&main, "main.cf"), (&PathBuf::from(&cfg), "valvulad.toml")] {
        let m = std::fs::metadata(f).unwrap();
        assert_eq!(
            m.mode() & 0o7777,
            0o640,
            "{name}: mode {:o} after the edit",
            m.mode()
        );
    }
}

/// `YYYYmmdd-HHMMSS` local time stamps for the next `n` seconds (as valvula-ctl names
/// its backups), from `date`, so the test needs no time crate.
fn chrono_free_stamps(n: i64) -> Vec<String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    (-1..n)
        .map(|s| {
            let o = Command::new("date")
                .arg("-d")
                .arg(format!("@{}", now + s))
                .arg("+%Y%m%d-%H%M%S")
                .output()
                .unwrap();
            String::from_utf8_lossy(&o.stdout).trim().to_owned()
        })
        .collect()
}

/// `import --output` never writes through a planted link, nor over a file.
#[test]
fn import_output_never_follows_a_link() {
    let dir = tempfile::tempdir().unwrap();
    let xml = dir.path().join("valvula.conf");
    std::fs::write(
        &xml,
        "<?xml version='1.0' ?>\n<valvula>\n  <general>\n    <listen host='127.0.0.1' port='3579'>\n    </listen>\n  </general>\n</valvula>\n",
    )
    .unwrap();
    let dangling = dir.path().join("somewhere-else");
    let out = dir.path().join("valvulad.toml");
    std::os::unix::fs::symlink(&dangling, &out).unwrap();
    let (code, o, err) = ctl(&[
        "import",
        &xml.display().to_string(),
        "--output",
        &out.display().to_string(),
    ]);
    assert_eq!(code, 1, "{o}{err}");
    assert!(err.contains("exists; not overwritten"), "{err}");
    assert!(!dangling.exists(), "the dangling link was followed");
}

/// valvulad.toml kept as a symbolic link (to a file in the same directory) stays a link:
/// the edit goes to the real file. A link out of the directory is refused.
#[test]
fn a_symlinked_config_stays_a_link() {
    let dir = tempfile::tempdir().unwrap();
    let real = config_file(dir.path(), "");
    let versioned = dir.path().join("valvulad-v2.toml");
    std::fs::rename(&real, &versioned).unwrap();
    std::os::unix::fs::symlink("valvulad-v2.toml", &real).unwrap();
    let (code, out, err) = ctl(&["--config", &real, "-a", "3700"]);
    assert_eq!(code, 0, "{out}{err}");
    let link = std::fs::symlink_metadata(&real).unwrap();
    assert!(
        link.file_type().is_symlink(),
        "{real} was replaced by a regular file"
    );
    let text = std::fs::read_to_string(&versioned).unwrap();
    assert!(text.contains("127.0.0.1:3700"), "the real file:\n{text}");

    let elsewhere = tempfile::tempdir().unwrap();
    let outside = elsewhere.path().join("valvulad.toml");
    std::fs::copy(&versioned, &outside).unwrap();
    std::fs::remove_file(&real).unwrap();
    std::os::unix::fs::symlink(&outside, &real).unwrap();
    let before = std::fs::read_to_string(&outside).unwrap();
    let (code, out, err) = ctl(&["--config", &real, "-a", "3701"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("symbolic link"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&outside).unwrap(),
        before,
        "the file outside was changed"
    );
}

/// Found in review: `valvula-ctl usage` (or `valvulad -t`) run first on a new or
/// upgraded database recorded its configuration's calendar zone there, and the daemon,
/// configured otherwise, then refused to start. Only a serving daemon records it.
#[test]
fn tools_never_record_their_zone() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("valvula.db");
    let cfg_in = |zone: &str| {
        let path = dir.path().join(format!("{}.toml", zone.replace('/', "-")));
        std::fs::write(
            &path,
            format!(
                "[server]\nmodule_dirs = [{:?}]\nadmin_socket = \"\"\n\
                 [storage]\npath = {:?}\ntime_zone = {zone:?}\n\
                 [[listener]]\naddress = \"127.0.0.1:0\"\nmodules = [\"mod-ratelimit\"]\n\
                 [[module.mod-ratelimit.policy]]\nname = \"users\"\nkey = \"sasl_user\"\n\
                 metric = \"messages\"\ndefault = {{ limits = [[\"day\", 10]] }}\n",
                module_path("mod_ratelimit")
                    .parent()
                    .unwrap()
                    .display()
                    .to_string(),
                db.display().to_string()
            ),
        )
        .unwrap();
        path.display().to_string()
    };
    let tokyo = cfg_in("Asia/Tokyo");
    let check = Command::new(valvula_tests::valvulad_bin())
        .args(["-c", &tokyo, "-t"])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "valvulad -t: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let (code, out, err) = ctl(&["--config", &tokyo, "usage"]);
    assert_eq!(code, 0, "usage: {out}{err}");
    let (_, out, err) = ctl(&["--config", &tokyo, "reset", "alice@example.com"]);
    assert!(
        !err.contains("time_zone") && !out.contains("time_zone"),
        "reset: {out}{err}"
    );
    // The daemon, in another zone, is the first to serve: its zone is the database's.
    let utc = cfg_in("UTC");
    let mut p = Command::new(valvula_tests::valvulad_bin())
        .args(["-c", &utc, "-t"])
        .output()
        .unwrap();
    assert!(p.status.success(), "{}", String::from_utf8_lossy(&p.stderr));
    let d = Proc::start_exact(
        &std::fs::read_to_string(&utc).unwrap(),
        "valvulad.toml",
        &[],
    );
    drop(d);
    // ...and from now on a tool configured otherwise is told.
    p = Command::new(valvula_tests::valvulad_bin())
        .args(["-c", &tokyo, "-t"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&p.stderr).into_owned();
    assert!(
        !p.status.success() && said.contains("Asia/Tokyo") && said.contains("UTC"),
        "valvulad -t in Tokyo after a UTC daemon: {:?} {said}",
        p.status
    );
}
