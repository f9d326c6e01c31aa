//! mod-ratelimit, loaded for real by a daemon on each backend: the peers' behaviours as
//! data (tests/fixtures/mod-ratelimit/peers.test), notifications, exact counting across
//! daemons, and a real Postfix.

use valvula_tests::client::{hammer, postfix_request};
use valvula_tests::daemon::Proc;
use valvula_tests::db::TestDb;
use valvula_tests::inproc::{self, Env, Raw, request};
use valvula_tests::postfix::{PASSWORD, Postfix, USER, send_mail};
use valvula_tests::script::Script;

/// 2026-11-22 12:00:00 UTC.
const NOW: i64 = 1_795_348_800;

const BASE: [(&str, &str); 11] = [
    ("request", "smtpd_access_policy"),
    ("protocol_state", "DATA"),
    ("protocol_name", "ESMTP"),
    ("client_address", "192.0.2.10"),
    ("sender", "alice@example.com"),
    ("recipient", ""),
    ("recipient_count", "1"),
    ("size", "1000"),
    ("sasl_method", "PLAIN"),
    ("sasl_username", "alice@example.com"),
    ("queue_id", "ABC123"),
];

fn run_peers(mysql: bool) {
    Script {
        file: "mod-ratelimit/peers.test",
        crate_name: "mod_ratelimit",
        module: "mod-ratelimit",
        base: &BASE,
        new_instance: true,
        daemon_per_case: true,
        section: "",
        tables: &[],
        now: NOW,
        commands: vec![(
            // used KEY WINDOW => N: the host counter of policy:identity KEY in WINDOW.
            "used",
            Box::new(|e: &mut Env, rest: &str, at: &str| {
                let (what, want) = rest
                    .split_once(" => ")
                    .unwrap_or_else(|| panic!("{at}: used needs =>"));
                let (key, window) = what.rsplit_once(' ').unwrap();
                let sql = if window.parse::<i64>().is_ok() {
                    format!(
                        "SELECT COALESCE(SUM(used), 0) FROM vlv_slide WHERE ns = 'mod-ratelimit' AND ckey = '{key}' AND win = 'sliding:{window}'"
                    )
                } else {
                    format!(
                        "SELECT used FROM vlv_counter WHERE ns = 'mod-ratelimit' AND ckey = '{key}' AND win = '{window}'"
                    )
                };
                assert_eq!(e.raw.row(&sql), want, "{at}");
            }),
        )],
    }
    .run(mysql);
}

#[test]
fn peers_sqlite() {
    run_peers(false);
}

#[test]
fn peers_mariadb() {
    run_peers(true);
}

/// The notification command runs once per identity and window, with the details.
#[test]
fn first_refusal_notifies_once() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("notified");
    let script = dir.path().join("notify.sh");
    std::fs::write(
        &script,
        format!("#!/bin/sh\necho \"$VALVULA_POLICY $VALVULA_IDENTITY $VALVULA_WINDOW $VALVULA_LIMIT\" >> {}\n", out.display()),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let section = format!(
        "notify_command = {:?}\n[[policy]]\nname = \"n\"\nkey = \"sasl_user\"\ndefault = {{ limits = [[\"hour\", 1]] }}\n",
        script.display().to_string()
    );
    let e = Env::start(false, "mod_ratelimit", "mod-ratelimit", &section, NOW);
    let ask = |i: usize| {
        e.ask(&request(
            &BASE,
            &[("instance".into(), Some(format!("n{i}")))],
        ))
    };
    assert_eq!(ask(0), "action=dunno");
    for i in 1..4 {
        assert!(ask(i).starts_with("action=defer_if_permit"));
    }
    // The command runs exactly when the once-per-window notification counter admits
    // it, before the reply: one admission, one run.
    assert_eq!(
        e.raw.row(
            "SELECT used FROM vlv_counter WHERE ns = 'mod-ratelimit' AND ckey = 'notify:n:alice@example.com'"
        ),
        "1",
        "notifications decided for three refusals"
    );
    let end = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut text = String::new();
    while text.is_empty() && std::time::Instant::now() < end {
        text = std::fs::read_to_string(&out).unwrap_or_default();
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(
        text, "n alice@example.com hour 1\n",
        "what the command wrote"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_connections_and_two_daemons_never_exceed_a_limit() {
    let raw = Raw::Mysql(TestDb::new());
    let section = "[[policy]]\nname = \"h\"\nkey = \"sasl_user\"\nmetric = \"recipients\"\n\
                   default = { limits = [[\"hour\", 120], [\"600s\", 100]] }\n";
    let cfg = inproc::daemon_toml(&raw, "mod_ratelimit", "mod-ratelimit", section);
    let a = Proc::start(&cfg, &[]);
    let b = Proc::start(&cfg, &[]);
    let addrs = [a.addrs()[0].clone(), b.addrs()[0].clone()];
    let admitted = hammer(
        &addrs,
        64,
        4,
        |i, j| {
            let inst = format!("{i}.{j}");
            postfix_request(&[
                ("sasl_username", "many@example.com"),
                ("protocol_state", "DATA"),
                ("recipient_count", "1"),
                ("instance", &inst),
            ])
        },
        "action=dunno\n\n",
        "action=defer_if_permit Rate limit reached",
    )
    .await;
    assert_eq!(admitted, 100, "a:\n{}\nb:\n{}", a.log(), b.log());
    let Raw::Mysql(db) = &raw else { unreachable!() };
    assert_eq!(
        db.sql("SELECT used FROM vlv_counter WHERE ns = 'mod-ratelimit' AND ckey = 'h:many@example.com' AND win = 'hour'").trim(),
        "100"
    );
}

#[test]
fn real_postfix_limits_recipients_networks_and_counts_once() {
    let dir = tempfile::tempdir().unwrap();
    let raw = Raw::Sqlite(dir.path().join("rl.db"));
    let section = "charge_at = [\"END-OF-MESSAGE\"]\n\
                   [[policy]]\nname = \"users\"\napplies_to = \"authenticated\"\nkey = \"sasl_user\"\nmetric = \"recipients\"\n\
                   default = { limits = [[\"hour\", 5]], text = \"{identity} may send {limit} recipients per {window}\" }\n\
                   [[policy]]\nname = \"nets\"\napplies_to = \"unauthenticated\"\nkey = \"client_network/24\"\nmetric = \"messages\"\n\
                   default = { limits = [[\"hour\", 2]], action = \"defer\", text = \"network {identity} is over its hourly limit\" }\n";
    let v = Proc::start(
        &inproc::daemon_toml(&raw, "mod_ratelimit", "mod-ratelimit", section),
        &[],
    );
    // Hooked at RCPT (refuse early) and END-OF-DATA (charge once).
    let pf = Postfix::start(
        &v.addrs()[0],
        &[
            "smtpd_recipient_restrictions",
            "smtpd_end_of_data_restrictions",
        ],
        "",
    );
    let log = || format!("maillog:\n{}\nvalvulad:\n{}", pf.maillog(), v.log());
    let r = send_mail(
        pf.port,
        Some((USER, PASSWORD)),
        USER,
        &["a@example.com", "b@example.com", "c@remote.test"],
    );
    assert!(r.accepted(), "{r:?}\n{}", log());
    let r = send_mail(
        pf.port,
        Some((USER, PASSWORD)),
        USER,
        &["d@example.com", "e@example.com"],
    );
    assert!(r.accepted(), "{r:?}\n{}", log());
    // Counted once per message although asked at RCPT (per recipient) and END-OF-DATA.
    assert_eq!(
        raw.row(
            "SELECT used FROM vlv_counter WHERE ckey = 'users:alice@example.com' AND win = 'hour'"
        ),
        "5"
    );
    let r = send_mail(pf.port, Some((USER, PASSWORD)), USER, &["f@example.com"]);
    assert_eq!((r.step.as_str(), r.code), ("RCPT", 450), "{r:?}\n{}", log());
    assert!(
        r.text
            .contains("alice@example.com may send 5 recipients per hour"),
        "{r:?}"
    );
    // Unauthenticated: limited by client network, two messages an hour.
    for _ in 0..2 {
        let r = send_mail(pf.port, None, "someone@remote.test", &["bob@example.com"]);
        assert!(r.accepted(), "{r:?}\n{}", log());
    }
    let r = send_mail(pf.port, None, "someone@remote.test", &["bob@example.com"]);
    assert_eq!(r.code, 450, "{r:?}\n{}", log());
    assert!(
        r.text
            .contains("network 127.0.0.0/24 is over its hourly limit"),
        "{r:?}"
    );
    assert_eq!(
        raw.row("SELECT messages, recipients FROM ratelimit_accounting WHERE identity = 'alice@example.com'"),
        "2\t5"
    );
}
