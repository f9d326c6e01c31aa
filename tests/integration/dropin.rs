//! Drop-in for valvula installations: valvula's own XML configuration and database.

use valvula_tests::client::{Client, postfix_request};
use valvula_tests::daemon::Proc;
use valvula_tests::db::TestDb;
use valvula_tests::{ctl, fixture, free_port, module_path};

/// A mods-enabled directory with pointer files, as valvula's packages make it.
fn mods_enabled(dir: &std::path::Path, names: &[&str]) -> std::path::PathBuf {
    let d = dir.join("mods-enabled");
    std::fs::create_dir_all(&d).unwrap();
    let location = module_path("mod_ticket").parent().unwrap().to_owned();
    for n in names {
        std::fs::write(
            d.join(format!("{n}.xml")),
            format!(
                "<mod-valvulad location=\"{}/{n}.so\"/>\n",
                location.display()
            ),
        )
        .unwrap();
    }
    d
}

/// valvula's shipped example (reference §4.1), with this test's port, database and
/// module directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valvula_example_config_and_database_work_unchanged() {
    let db = TestDb::new();
    let schema = std::fs::read_to_string(fixture("mod-ticket/valvula-schema.sql")).unwrap();
    db.sql(
        &schema
            .lines()
            .filter(|l| !l.starts_with("--"))
            .collect::<Vec<_>>()
            .join("\n"),
    );
    db.sql("INSERT INTO ticket_plan (name, description, total_limit, day_limit, month_limit) VALUES ('basic', 'plan', 100000, 3, 10000)");
    db.sql("INSERT INTO domain_ticket (sasl_user, valid_until, ticket_plan_id) VALUES ('francis@aspl.es', -1, 1)");
    let work = tempfile::tempdir().unwrap();
    let mods = mods_enabled(work.path(), &["mod-ticket", "mod-mquota", "mod-slm"]);
    let port = free_port();
    let conf = format!(
        r#"<?xml version='1.0' ?>
<!-- valvula.example.conf, as the Debian package installs it -->
<valvula>
  <global-settings>
    <running user="valvulad" group="valvulad" enabled="no"/>
    <!-- <debug-queries debug="yes"/> -->
    <log-reporting enabled="yes" use-syslog="yes"/>
    <signal action="reexec"/>
    <request-line limit="80"/>
  </global-settings>
  <general>
    <listen host="127.0.0.1" port="{port}">
      <run module="mod-ticket"/>
    </listen>
  </general>
  <database>
    <config driver="mysql" dbname="{db}" user="root" password="" host="127.0.0.1" port="3306"/>
  </database>
  <modules>
    <directory src="{mods}"/>
  </modules>
  <enviroment>
    <local-domains config="autodetect"/>
    <sender-login-mismatch mode="same-domain" allow-empty-mail-from="yes"/>
    <default-sending-quota status="full" if-no-match="first" debug="yes">
      <limit label="day quota" from="9:00" to="21:00" status="full" minute-limit="150" hour-limit="250" global-limit="750" domain-minute-limit="300" domain-hour-limit="500" domain-global-limit="2500"/>
    </default-sending-quota>
  </enviroment>
</valvula>
"#,
        db = db.name,
        mods = mods.display()
    );
    let p = Proc::start_exact(&conf, "valvula.conf", &[]);
    assert!(
        p.log()
            .contains(&format!("address=127.0.0.1:{port} chain=[\"mod-ticket\"]")),
        "{}",
        p.log()
    );
    assert!(
        p.log().contains("valvulad has no module mod-mquota"),
        "{}",
        p.log()
    );
    let mut c = Client::connect(&format!("127.0.0.1:{port}")).await;
    let req = |n: usize| {
        postfix_request(&[
            ("sasl_username", "francis@aspl.es"),
            ("protocol_state", "DATA"),
            ("recipient_count", "1"),
            ("instance", &format!("msg{n}")),
        ])
    };
    for n in 0..3 {
        assert_eq!(c.ask(&req(n)).await, "action=dunno\n\n");
    }
    assert_eq!(
        c.ask(&req(3)).await,
        "action=reject Rejecting operation because day limit reached (3)\n\n"
    );
    assert_eq!(
        db.sql("SELECT total_used, current_day_usage FROM domain_ticket")
            .trim(),
        "3\t3"
    );
    // valvula's health probe, as `valvulad -p` and the cron watchdog use it.
    let mut probe = Client::connect(&format!("127.0.0.1:{port}")).await;
    probe.send(b"checkserver\n").await;
    assert_eq!(
        probe.answer(std::time::Duration::from_secs(5)).await,
        valvula_tests::client::Answer::Closed("I'm running right".into())
    );
}

/// A file as valvulad-mgr.py writes it (test_02.conf.ref): read by valvulad and by
/// valvula-ctl, and importable as TOML.
#[test]
fn valvulad_mgr_style_config() {
    let work = tempfile::tempdir().unwrap();
    let mods = mods_enabled(work.path(), &["mod-ticket", "mod-test"]);
    let conf = format!(
        "<?xml version='1.0' ?>\n<valvula>\n    <global-settings>\n        <log-reporting enabled='yes' use-syslog='no' />\n    </global-settings>\n    \
         <general>\n        <listen host='127.0.0.1' port='3579'>\n            <run module='mod-test' />\n            <!-- comment -->\n            \
         <run module='mod-ticket' />\n        </listen>\n        <listen host='127.0.0.1' port='3800'>\n            <run module='mod-ticket' />\n        </listen>\n    \
         </general>\n    <database>\n        <config driver='mysql' dbname='valvula' user='valvula' password='valvula' host='127.0.0.1' port='' />\n    </database>\n    \
         <modules>\n        <directory src='{}' />\n    </modules>\n</valvula>\n",
        mods.display()
    );
    let path = work.path().join("valvula.conf");
    std::fs::write(&path, conf).unwrap();
    let cfg = path.display().to_string();
    let (code, out, err) = ctl(&["--config", &cfg, "-l"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        "Listen: 127.0.0.1:3579 (127.0.0.1:3579)\n  Mod: mod-test\n  Mod: mod-ticket\nListen: 127.0.0.1:3800 (127.0.0.1:3800)\n  Mod: mod-ticket\n"
    );
    let out_toml = work.path().join("valvulad.toml");
    let (code, _, err) = ctl(&["import", &cfg, "--output", &out_toml.display().to_string()]);
    assert_eq!(code, 0, "{err}");
    let toml = std::fs::read_to_string(&out_toml).unwrap();
    assert!(
        toml.contains("url = \"mysql://valvula@127.0.0.1:3306/valvula\"")
            && toml.contains("password = \"valvula\""),
        "{toml}"
    );
    let loaded = valvula_config::load_file(&out_toml).unwrap().config;
    assert_eq!(loaded.listeners.len(), 2);
    assert_eq!(loaded.listeners[0].modules, vec!["mod-test", "mod-ticket"]);
}
