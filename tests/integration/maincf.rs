//! main.cf editing: valvula's fixtures and the cases valvula gets wrong, byte for byte,
//! each result also read back by the real `postconf`.

use std::process::Command;

use valvula_postfix::{MainCf, Position};
use valvula_tests::fixture;

const TARGET: &str = "inet:127.0.0.1:3579";
const DECL: &str = "check_policy_service inet:127.0.0.1:3579";

/// What Postfix itself reads from a main.cf.
fn postconf(text: &str, stage: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    // A fixed myhostname spares postconf a lookup of this machine's name.
    let sep = if text.is_empty() || text.ends_with('\n') {
        ""
    } else {
        "\n"
    };
    std::fs::write(
        dir.path().join("main.cf"),
        format!("{text}{sep}myhostname = mx.example.test\n"),
    )
    .unwrap();
    std::fs::write(dir.path().join("master.cf"), "").unwrap();
    // Postfix tools wait ~2 s for a main.cf modified "just now": make it look older.
    let f = std::fs::File::options()
        .write(true)
        .open(dir.path().join("main.cf"))
        .unwrap();
    f.set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(120))
        .unwrap();
    let o = Command::new("postconf")
        .arg("-c")
        .arg(dir.path())
        .arg("-h")
        .arg(stage)
        .output()
        .expect("postconf (Debian package postfix) must be installed");
    assert!(
        o.status.success(),
        "postconf: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

#[test]
fn golden_edits_agree_with_postconf() {
    let cases = std::fs::read_to_string(fixture("maincf/cases.txt")).unwrap();
    let mut n = 0;
    for line in cases
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let spec = line.split('#').next().unwrap();
        let mut f = spec.split_whitespace();
        let (name, stage, pos) = (f.next().unwrap(), f.next().unwrap(), f.next().unwrap());
        let pos: Position = pos.parse().unwrap();
        let before = std::fs::read_to_string(fixture(&format!("maincf/{name}.cf"))).unwrap();
        let want = std::fs::read_to_string(fixture(&format!("maincf/{name}.cf.ref"))).unwrap();
        let mut m = MainCf::parse(&before);
        let changed = m
            .add_hook(stage, TARGET, pos)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let got = m.to_text();
        assert_eq!(got, want, "{name}: not byte for byte");
        assert_eq!(changed, before != want, "{name}: change reported wrongly");
        // Postfix agrees: the hook is where it was asked for, and only once.
        let value = postconf(&got, stage);
        assert_eq!(
            value.matches(DECL).count() - value.matches(&format!("{DECL}0")).count(),
            1,
            "{name}: {value}"
        );
        // Where it was asked for (an existing hook stays where it was).
        match pos {
            _ if !changed => {}
            Position::First => assert!(value.starts_with(DECL), "{name}: postconf says {value}"),
            Position::Last => assert!(value.ends_with(DECL), "{name}: postconf says {value}"),
        }
        // And what the parser reads is what Postfix reads.
        assert_eq!(m.value(stage).unwrap_or_default(), value, "{name}");
        // Idempotent: a second run changes nothing.
        assert!(
            !m.add_hook(stage, TARGET, pos).unwrap(),
            "{name}: added twice"
        );
        // Removing the hook gives Postfix the list it had before.
        let mut r = MainCf::parse(&got);
        assert!(r.remove_hook(stage, TARGET).unwrap());
        let left = postconf(&r.to_text(), stage);
        let original = if MainCf::parse(&before).value(stage).is_some() {
            postconf(&before, stage)
        } else {
            String::new()
        };
        if changed && MainCf::parse(&before).value(stage).is_some() {
            assert_eq!(left, original, "{name}: remove did not restore");
        }
        n += 1;
    }
    assert!(n >= 15, "only {n} cases");
}
