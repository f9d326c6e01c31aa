//! valvula-ctl: main.cf hooks, daemon config edits, administration on both backends,
//! the running daemon, the shell in a real terminal, and a real Postfix.

use std::path::Path;
use std::time::Duration;

use valvula_tests::daemon::Proc;
use valvula_tests::db::TestDb;
use valvula_tests::postfix::{PASSWORD, Postfix, USER, send_mail};
use valvula_tests::{ctl, ctl_bin, module_path};

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

fn postconf(dir: &Path, stage: &str) -> String {
    let o = std::process::Command::new("postconf")
        .arg("-c")
        .arg(dir)
        .arg("-h")
        .arg(stage)
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
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
    assert_eq!(std::fs::read_to_string(&main).unwrap(), MAIN_CF);

    // The real edit: last means after the last continuation line.
    let (code, out, err) = run(&["-c", "smtpd_data_restrictions", "3579", "last"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("postconf agrees"), "{out}");
    assert_eq!(
        postconf(&pf, "smtpd_data_restrictions"),
        "reject_unauth_pipelining, permit, check_policy_service inet:127.0.0.1:3579"
    );
    let edited = std::fs::read_to_string(&main).unwrap();
    assert!(
        edited.contains("    # a comment inside the value\n"),
        "{edited}"
    );
    let backups: Vec<_> = std::fs::read_dir(&pf)
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("main.cf.valvula-ctl.")
        })
        .collect();
    assert_eq!(backups.len(), 1);
    assert_eq!(std::fs::read_to_string(backups[0].path()).unwrap(), MAIN_CF);

    // Idempotent, by name too.
    let (code, out, _) = run(&[
        "--connect-postfix",
        "smtpd_data_restrictions",
        "main",
        "first",
    ]);
    assert_eq!(code, 0);
    assert!(out.contains("already in smtpd_data_restrictions"), "{out}");
    assert_eq!(std::fs::read_to_string(&main).unwrap(), edited);

    // Disconnect gives Postfix its list back.
    let (code, out, err) = run(&["-r", "smtpd_data_restrictions", "3579"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        postconf(&pf, "smtpd_data_restrictions"),
        "reject_unauth_pipelining, permit"
    );

    // A missing stage is created with valvula's safe defaults.
    let (code, _, err) = run(&["-c", "smtpd_recipient_restrictions", "3579", "first"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        postconf(&pf, "smtpd_recipient_restrictions"),
        "check_policy_service inet:127.0.0.1:3579, permit_mynetworks, reject_unauth_destination"
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
    assert_eq!(code, 1);
    assert!(
        err.contains("defined 2 times") && err.contains("left untouched"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&main).unwrap(), dup);

    // A main.cf that is a link out of the Postfix directory is refused.
    let outside = dir.path().join("elsewhere.cf");
    std::fs::write(&outside, MAIN_CF).unwrap();
    std::fs::remove_file(&main).unwrap();
    std::os::unix::fs::symlink(&outside, &main).unwrap();
    let (code, _, err) = run(&["-c", "smtpd_data_restrictions", "3579", "first"]);
    assert_eq!(code, 1);
    assert!(err.contains("symbolic link"), "{err}");
    assert_eq!(std::fs::read_to_string(&outside).unwrap(), MAIN_CF);
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
    assert_eq!(run(&["-a", "3600"]).0, 0);
    assert!(run(&["-a", "127.0.0.1:3600"]).1.contains("already exists"));
    assert_eq!(run(&["-m", "mod-test", "127.0.0.1:3600"]).0, 0);
    assert_eq!(run(&["-e", "mod-ratelimit"]).0, 0);
    assert_eq!(run(&["-u", "nobody", "nogroup"]).0, 0);
    let (code, _, err) = run(&["-u", "no-such-user-here", "nogroup"]);
    assert_eq!(code, 1);
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
        valvulad::config::parse(&text, Path::new(&cfg)).is_ok(),
        "{text}"
    );
    // A change that would break the configuration is refused.
    let (code, _, err) = run(&["-m", "mod-test", "9999"]);
    assert_eq!(code, 1);
    assert!(err.contains("no listener 9999"), "{err}");
    // -y tests the database before saving; on failure the old values stay.
    let (code, _, err) = run(&["-y", "nodb", "nouser", "nopass", "--db-host", "127.0.0.1:1"]);
    assert_eq!(code, 1);
    assert!(err.contains("previous values kept"), "{err}");
    assert!(!std::fs::read_to_string(&cfg).unwrap().contains("nodb"));
    let db = TestDb::new();
    let (code, out, err) = run(&["-y", &db.name, "root", ""]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        std::fs::read_to_string(&cfg)
            .unwrap()
            .contains(&format!("/{}", db.name))
    );
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
    let run = |more: &[&str]| {
        let mut a = vec!["--config", cfg.as_str()];
        a.extend_from_slice(more);
        let r = ctl(&a);
        assert_eq!(r.0, 0, "{more:?}: {}{}", r.1, r.2);
        r.1
    };
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
    assert!(run(&["reload"]).contains("reloaded") || p.log().contains("configuration reloaded"));
    let (code, _, err) = ctl(&["--config", &cfg, "ticket", "valid", "1", "2099-01-01"]);
    assert_eq!(code, 1);
    assert!(err.contains("32-bit"), "{err}");
    let (code, _, err) = ctl(&["--config", &cfg, "plan", "remove", "1"]);
    assert_eq!(code, 1);
    assert!(err.contains("used by 1 ticket"), "{err}");
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
    // mod-ticket on the listener; `valvulad -t` runs its init, which makes its tables.
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("modules = []", "modules = [\"mod-ticket\"]");
    std::fs::write(&cfg, text).unwrap();
    let check = std::process::Command::new(valvula_tests::valvulad_bin())
        .args(["-c", &cfg, "-t"])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let pf = dir.path().join("postfix");
    std::fs::create_dir(&pf).unwrap();
    std::fs::write(pf.join("main.cf"), MAIN_CF).unwrap();
    let session = format!("vlvctl{}", std::process::id());
    let tmux = |args: &[&str]| {
        std::process::Command::new("tmux")
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
    assert!(
        tmux(&[
            "new-session",
            "-d",
            "-s",
            "s",
            "-x",
            "200",
            "-y",
            "50",
            &cmd
        ])
        .status
        .success()
    );
    let screen = || {
        String::from_utf8_lossy(&tmux(&["capture-pane", "-p", "-t", "s", "-S", "-200"]).stdout)
            .into_owned()
    };
    let wait = |needle: &str| {
        for _ in 0..100 {
            if screen().contains(needle) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{needle:?} not on screen:\n{}", screen());
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
        tmux(&["send-keys", "-t", "s", "-l", "--", line]);
        tmux(&["send-keys", "-t", "s", "Enter"]);
        wait(expect);
    }
    // Completion of a stage name.
    tmux(&["send-keys", "-t", "s", "-l", "--", "-s smtpd_end_of"]);
    tmux(&["send-keys", "-t", "s", "Tab"]);
    wait("smtpd_end_of_data_restrictions");
    tmux(&["send-keys", "-t", "s", "C-u", "exit", "Enter"]);
    for _ in 0..50 {
        if !tmux(&["has-session", "-t", "s"]).status.success() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = tmux(&["kill-server"]);
    assert_eq!(
        postconf(&pf, "smtpd_data_restrictions"),
        "check_policy_service inet:127.0.0.1:3579, reject_unauth_pipelining, permit"
    );
    assert!(dir.path().join(".valvula-ctl_history").exists());
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
        assert_eq!(ctl(&args).0, 0);
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
    std::thread::sleep(Duration::from_millis(500));
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
