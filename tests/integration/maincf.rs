//! main.cf editing: valvula's fixtures and the cases valvula gets wrong, byte for byte,
//! each result also read back by the real `postconf`.

use std::process::Command;

use valvula_postfix::{MainCf, Position};
use valvula_tests::fixture;

const TARGET: &str = "inet:127.0.0.1:3579";
const DECL: &str = "check_policy_service inet:127.0.0.1:3579";

/// What Postfix itself reads from a main.cf: the value, or postconf's error.
fn postconf_result(text: &str, stage: &str) -> Result<String, String> {
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
    if o.status.success() {
        Ok(String::from_utf8_lossy(&o.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&o.stderr).trim().to_owned())
    }
}

fn postconf(text: &str, stage: &str) -> String {
    postconf_result(text, stage).unwrap_or_else(|e| panic!("postconf on {text:?}: {e}"))
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
        let mut field = || {
            f.next()
                .unwrap_or_else(|| panic!("cases.txt: short line {line:?}"))
        };
        let (name, stage, pos) = (field(), field(), field());
        let pos: Position = pos
            .parse()
            .unwrap_or_else(|e| panic!("cases.txt: {line:?}: {e}"));
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
        assert_eq!(
            m.value(stage).unwrap_or_default(),
            value,
            "{name}: the parser and postconf read the value differently"
        );
        // Idempotent: a second run changes nothing.
        assert_eq!(
            m.add_hook(stage, TARGET, pos),
            Ok(false),
            "{name}: added twice"
        );
        // Removing the hook gives Postfix the list it had before.
        let mut r = MainCf::parse(&got);
        let removed = r.remove_hook(stage, TARGET);
        assert_eq!(removed, Ok(true), "{name}: remove after add");
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

/// valvula-postfix refuses to edit exactly the files Postfix cannot read (a line that
/// is not `name = value`), and edits the odd ones Postfix reads fine, as Postfix reads
/// them.
#[test]
fn refuses_what_postfix_refuses() {
    const S: &str = "smtpd_data_restrictions";
    for bad in [
        "smtpd_data_restrictions = permit\nstray words\n",
        "a b = c\nsmtpd_data_restrictions = permit\n",
        "= c\nsmtpd_data_restrictions = permit\n",
        "x = 1\n  continued\nno_equals_sign\n",
    ] {
        let pf = postconf_result(bad, S);
        assert!(pf.is_err(), "postconf read {bad:?} as {pf:?}");
        let mut m = MainCf::parse(bad);
        let r = m.add_hook(S, TARGET, Position::Last);
        assert!(
            matches!(r, Err(valvula_postfix::EditError::Syntax { .. })),
            "{bad:?}: postconf says {pf:?}, the parser {r:?}"
        );
        assert_eq!(m.to_text(), bad, "a refused text changed");
    }
    for odd in [
        "  indented before any parameter\nsmtpd_data_restrictions = permit\n",
        "smtpd_data_restrictions=permit\n",
        "smtpd_data_restrictions\t= permit, # not a comment\n  reject\n",
        "smtpd_data_restrictions = permit\r\n",
        "# comment\n\nsmtpd_data_restrictions =\n\n  # inner\n  permit\n",
    ] {
        let mut m = MainCf::parse(odd);
        let r = m.add_hook(S, TARGET, Position::Last);
        assert_eq!(r, Ok(true), "{odd:?}");
        let got = m.to_text();
        let value = postconf(&got, S);
        assert!(
            value.ends_with(DECL),
            "{odd:?} became {got:?}: postconf reads {value:?}"
        );
        assert_eq!(
            m.value(S).unwrap_or_default(),
            value,
            "{odd:?}: the parser and postconf differ"
        );
    }
}
