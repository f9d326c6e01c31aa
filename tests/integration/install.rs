//! Running as a service and installing: the systemd unit, the install script into a
//! scratch root, and man pages that cannot drift from the command lines.

use std::path::Path;
use std::process::Command;

use valvula_tests::{ctl_bin, repo_root, target_dir, valvulad_bin};

#[test]
fn systemd_unit_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(repo_root().join("dist/valvulad.service")).unwrap();
    assert!(unit.contains("Type=notify") && unit.contains("Restart=on-failure"));
    // verify checks that the programs exist: point them at the build.
    let unit = unit.replace("/usr/sbin/valvulad", &valvulad_bin().display().to_string());
    let path = dir.path().join("valvulad.service");
    std::fs::write(&path, unit).unwrap();
    let o = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian package systemd)");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "{all}");
    assert!(
        !all.contains("valvulad.service"),
        "warnings about the unit:\n{all}"
    );
}

/// Every file the install puts in place, relative to the root.
pub const INSTALLED: [&str; 18] = [
    "usr/sbin/valvulad",
    "usr/sbin/valvula-ctl",
    "usr/lib/valvulad/modules/mod-ticket.so",
    "usr/lib/valvulad/modules/mod-ratelimit.so",
    "usr/include/valvula/module.h",
    "usr/share/man/man3/valvula-module.3",
    "usr/share/man/man5/valvulad.toml.5",
    "usr/share/man/man8/valvulad.8",
    "usr/share/man/man8/valvula-ctl.8",
    "usr/share/doc/valvula/README.md",
    "usr/share/doc/valvula/mod_example.c",
    "usr/share/doc/valvula/valvulad.toml.development",
    "usr/share/doc/valvula/prometheus/valvulad-alerts.yml",
    "usr/share/doc/valvula/prometheus/valvulad-alerts.test.yml",
    "usr/share/doc/valvula/grafana/valvulad-dashboard.json",
    "etc/valvula/valvulad.toml",
    "lib/systemd/system/valvulad.service",
    "var/lib/valvula",
];

#[test]
fn install_into_a_scratch_root() {
    // Not under /tmp: the daemon refuses modules below a directory others can write to.
    let root = valvula_tests::module_tempdir();
    let o = Command::new(repo_root().join("scripts/install.sh"))
        .env("DESTDIR", root.path())
        .env("BUILD", "no")
        .env("PROFILE", "dev")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in INSTALLED {
        assert!(root.path().join(f).exists(), "{f} not installed");
    }
    // The installed daemon loads the installed modules by name.
    let r = root.path();
    let cfg = r.join("test.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nmodule_dirs = [\"{}/usr/lib/valvulad/modules\"]\n[[listener]]\naddress = \"127.0.0.1:0\"\nmodules = [\"mod-ticket\", \"mod-ratelimit\"]\n[storage]\npath = \"{}/v.db\"\n",
            r.display(),
            r.display()
        ),
    )
    .unwrap();
    let o = Command::new(r.join("usr/sbin/valvulad"))
        .arg("-c")
        .arg(&cfg)
        .arg("-t")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("2 module(s) loaded"));
    // The packaged configuration is valid as it is (its user may not exist here).
    let packaged = std::fs::read_to_string(r.join("etc/valvula/valvulad.toml")).unwrap();
    let without_user = packaged.replace("user = \"valvula\"\ngroup = \"valvula\"\n", "");
    valvula_config::parse(&without_user, Path::new("valvulad.toml")).unwrap();
}

/// The long options a program's --help lists.
fn long_options(bin: &Path, args: &[&str]) -> Vec<String> {
    let o = Command::new(bin).args(args).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&o.stdout).into_owned();
    let mut opts: Vec<String> = help
        .split(|c: char| c.is_whitespace() || c == ',' || c == '=' || c == '[' || c == '<')
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| w.trim_end_matches([']', '>', '.', ')']).to_owned())
        .filter(|w| w != "--help")
        .collect();
    opts.sort();
    opts.dedup();
    opts
}

#[test]
fn man_pages_document_every_option() {
    for (bin, page, subcommands) in [
        (valvulad_bin(), "valvulad.8", vec![]),
        (
            ctl_bin(),
            "valvula-ctl.8",
            vec![
                vec!["plan", "add"],
                vec!["ticket", "add"],
                vec!["override", "set"],
                vec!["import"],
            ],
        ),
    ] {
        let man = std::fs::read_to_string(repo_root().join("man").join(page)).unwrap();
        // groff escapes the hyphens of options as \-.
        let man = man.replace("\\-", "-");
        let mut missing = Vec::new();
        for args in std::iter::once(vec![]).chain(subcommands) {
            for opt in long_options(&bin, &args) {
                if !man.contains(&opt) {
                    missing.push(format!("{} {opt}", args.join(" ")));
                }
            }
        }
        assert!(
            missing.is_empty(),
            "man/{page} does not document: {missing:?}"
        );
    }
    // Every key valvulad.toml accepts is in valvulad.toml(5).
    let man = std::fs::read_to_string(repo_root().join("man/valvulad.toml.5"))
        .unwrap()
        .replace("\\-", "-");
    let src =
        std::fs::read_to_string(repo_root().join("crates/valvula-config/src/sections.rs")).unwrap();
    let keys: Vec<&str> = src
        .split("unknown_keys(")
        .skip(1)
        .flat_map(|s| {
            let list = &s[s.find("&[").unwrap() + 2..s.find(']').unwrap()];
            list.split(',')
                .map(|k| k.trim())
                .filter(|k| k.starts_with('"'))
                .map(|k| k.trim_matches('"'))
        })
        .collect();
    assert!(keys.len() > 20, "{keys:?}");
    for k in keys {
        assert!(man.contains(k), "valvulad.toml.5 does not document {k}");
    }
    let _ = target_dir();
}

/// The Debian package (built by scripts/test.sh from this build, by
/// scripts/build-deb.sh for releases) carries every installed file and its scripts.
#[test]
fn debian_package_contents() {
    let dir = target_dir().parent().unwrap().join("debian");
    let deb = std::fs::read_dir(&dir)
        .unwrap_or_else(|_| {
            panic!(
                "no {}: run scripts/test.sh (it builds the package)",
                dir.display()
            )
        })
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("a .deb in target/debian");
    let info = Command::new("dpkg-deb")
        .arg("-I")
        .arg(&deb)
        .output()
        .unwrap();
    let info = String::from_utf8_lossy(&info.stdout).into_owned();
    for want in [
        "Package: valvula",
        "Section: mail",
        "Depends:",
        "adduser",
        "postinst",
        "prerm",
        "conffiles",
        // valvula (C)'s packages own /usr/bin/valvulad, its init script and
        // /usr/lib/valvulad/modules/mod-ticket.so, which this package ships too.
        "Conflicts: valvulad-server, valvulad-mod-ticket",
        "Replaces: valvulad-server, valvulad-mod-ticket",
    ] {
        assert!(
            info.contains(want),
            "{want} missing from the control data:\n{info}"
        );
    }
    let root = tempfile::tempdir().unwrap();
    let x = Command::new("dpkg")
        .arg("-x")
        .arg(&deb)
        .arg(root.path())
        .output()
        .unwrap();
    assert!(x.status.success(), "{}", String::from_utf8_lossy(&x.stderr));
    // The state directory is made by postinst and systemd, not shipped.
    for f in INSTALLED.iter().filter(|f| **f != "var/lib/valvula") {
        // Debian compresses man pages.
        let found = root.path().join(f).exists()
            || (f.contains("/man/") && root.path().join(format!("{f}.gz")).exists());
        assert!(found, "{f} is not in the package");
    }
    let ctl_dir = tempfile::tempdir().unwrap();
    let control = Command::new("dpkg-deb")
        .arg("-e")
        .arg(&deb)
        .arg(ctl_dir.path().join("c"))
        .output()
        .unwrap();
    assert!(control.status.success());
    let conffiles = std::fs::read_to_string(ctl_dir.path().join("c/conffiles")).unwrap();
    assert_eq!(conffiles.trim(), "/etc/valvula/valvulad.toml");
    let post = std::fs::read_to_string(ctl_dir.path().join("c/postinst")).unwrap();
    assert!(post.contains("adduser --system"), "{post}");
    let prerm = std::fs::read_to_string(ctl_dir.path().join("c/prerm")).unwrap();
    assert!(prerm.contains("systemctl stop valvulad.service"), "{prerm}");
    for script in ["postinst", "prerm"] {
        let o = Command::new("sh")
            .arg("-n")
            .arg(ctl_dir.path().join("c").join(script))
            .output()
            .unwrap();
        assert!(o.status.success(), "{script} is not valid sh: {o:?}");
    }
    let v = Command::new(root.path().join("usr/sbin/valvulad"))
        .arg("-v")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&v.stdout).contains(env!("CARGO_PKG_VERSION")));
}

/// Runs promtool; its output when it fails.
fn promtool(args: &[&str], dir: &Path) -> Result<String, String> {
    let o = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool (Debian package prometheus; scripts/test-deps.sh installs it)");
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    if o.status.success() {
        Ok(out)
    } else {
        Err(out)
    }
}

/// The `valvulad_*` metric names in a text.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("valvulad_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// The monitoring in dist/: the alerting rules pass `promtool check rules` and their
/// unit tests; every query of the Grafana dashboard is valid PromQL (checked as a
/// recording rule by promtool); and every metric either of them names is one a running
/// valvulad really exports, whose /metrics passes `promtool check metrics`.
#[test]
fn monitoring_rules_and_dashboard_match_the_metrics() {
    let prom = repo_root().join("dist/prometheus");
    promtool(&["check", "rules", "valvulad-alerts.yml"], &prom).unwrap_or_else(|e| panic!("{e}"));
    promtool(&["test", "rules", "valvulad-alerts.test.yml"], &prom)
        .unwrap_or_else(|e| panic!("{e}"));

    let text =
        std::fs::read_to_string(repo_root().join("dist/grafana/valvulad-dashboard.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().expect("targets") {
            exprs.push(t["expr"].as_str().expect("expr").to_owned());
        }
    }
    assert!(exprs.len() >= 10, "{exprs:?}");
    // Grafana's variables, as Grafana would put them in.
    let rules: Vec<String> = exprs
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let e = e
                .replace("$__rate_interval", "5m")
                .replace("$__range", "6h")
                .replace("$instance", ".*");
            format!(
                "      - record: dashboard:query{i}\n        expr: {}\n",
                serde_json::to_string(&e).unwrap()
            )
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("dashboard.yml"),
        format!(
            "groups:\n  - name: dashboard\n    rules:\n{}",
            rules.concat()
        ),
    )
    .unwrap();
    promtool(&["check", "rules", "dashboard.yml"], dir.path())
        .unwrap_or_else(|e| panic!("a dashboard query is not valid PromQL: {e}"));

    // What a running daemon exports (a module, so the per-module series are there).
    let p = valvula_tests::daemon::Proc::start(
        &format!(
            "[server]\nmodule_dirs = [{:?}]\nmetrics_listen = \"127.0.0.1:0\"\n\
             [[listener]]\nname = \"main\"\naddress = \"127.0.0.1:0\"\nmodules = [\"mod-test\"]\n",
            valvula_tests::module_path("mod_test")
                .parent()
                .unwrap()
                .display()
                .to_string()
        ),
        &[],
    );
    let scrape = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(p.metrics_addr()).expect("metrics listener");
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out.split_once("\r\n\r\n")
            .expect("an HTTP answer")
            .1
            .to_owned()
    };
    std::fs::write(dir.path().join("metrics.txt"), &scrape).unwrap();
    let lint = Command::new("sh")
        .arg("-c")
        .arg("promtool check metrics < metrics.txt")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        lint.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );
    let exported: std::collections::BTreeSet<String> = scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .flat_map(metric_names)
        .collect();
    let alerts = std::fs::read_to_string(prom.join("valvulad-alerts.yml")).unwrap();
    for (what, used) in [
        ("the alerting rules", metric_names(&alerts)),
        ("the dashboard", metric_names(&exprs.join("\n"))),
    ] {
        let unknown: Vec<_> = used.difference(&exported).collect();
        assert!(
            unknown.is_empty(),
            "{what} name metrics valvulad does not export: {unknown:?}\n(exported: {exported:?})\n{}",
            p.log()
        );
    }
}
