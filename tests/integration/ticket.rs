//! mod-ticket, loaded for real (dlopen) by a daemon on each backend: valvula's
//! conformance cases from a data file, stage control, an existing valvula database,
//! exact counting across daemons, and a real Postfix.

use valvula_tests::client::{Client, hammer};
use valvula_tests::daemon::Proc;
use valvula_tests::db::TestDb;
use valvula_tests::fixture;
use valvula_tests::inproc::{self, Env, Raw, request};
use valvula_tests::postfix::{PASSWORD, PASSWORD2, Postfix, USER, USER2, send_mail};
use valvula_tests::script::Script;

/// 2026-11-22 12:00:00 UTC.
const NOW: i64 = 1_795_348_800;

fn daemon_toml(raw: &Raw, section: &str) -> String {
    inproc::daemon_toml(
        raw,
        "mod_ticket",
        "mod-ticket",
        &format!("time_zone = \"UTC\"\n{section}"),
    )
}

fn env(mysql: bool, section: &str) -> Env {
    Env::start(
        mysql,
        "mod_ticket",
        "mod-ticket",
        &format!("time_zone = \"UTC\"\n{section}"),
        NOW,
    )
}

/// valvula's regression-suite request (test_03), changed by the case's attributes.
const BASE: [(&str, &str); 11] = [
    ("request", "smtpd_access_policy"),
    ("protocol_state", "RCPT"),
    ("protocol_name", "ESMTP"),
    ("client_address", "127.0.0.1"),
    ("sender", "francis@aspl.es"),
    ("recipient", "francis@aspl.es"),
    ("recipient_count", "1"),
    ("queue_id", "935jfe534"),
    ("size", "235"),
    ("sasl_method", "PLAIN"),
    ("sasl_username", ""),
];

fn ask(e: &Env, over: &[(String, Option<String>)]) -> String {
    e.ask(&request(&BASE, over))
}

fn run_conformance(mysql: bool) {
    Script {
        file: "mod-ticket/conformance.test",
        crate_name: "mod_ticket",
        module: "mod-ticket",
        base: &BASE,
        new_instance: false,
        daemon_per_case: false,
        section: "time_zone = \"UTC\"\n",
        tables: &[
            "domain_ticket",
            "ticket_plan",
            "outgoing_ip",
            "domain_ticket_history",
            "domain_month_ticket_history",
        ],
        now: NOW,
        commands: vec![
            (
                // row ID T/D/M: the counters of domain_ticket ID (- for NULL).
                "row",
                Box::new(|e: &mut Env, rest: &str, at: &str| {
                    let (id, want) = rest.split_once(' ').unwrap();
                    let got = e.raw.row(&format!(
                        "SELECT total_used, current_day_usage, current_month_usage FROM domain_ticket WHERE id = {id}"
                    ));
                    let got = got.replace("NULL", "-").replace('\t', "/");
                    assert_eq!(got, want, "{at}: counters of row {id}");
                }),
            ),
            (
                // rollover day|month|none: time_tracking made stale, then the tick.
                "rollover",
                Box::new(|e: &mut Env, rest: &str, at: &str| {
                    match rest {
                        "day" => e.raw.exec("UPDATE time_tracking SET day = 0"),
                        "month" => e.raw.exec("UPDATE time_tracking SET month = -1"),
                        "none" => {}
                        other => panic!("{at}: rollover {other}?"),
                    }
                    e.tick();
                }),
            ),
        ],
    }
    .run(mysql);
}

#[test]
fn conformance_sqlite() {
    run_conformance(false);
}

#[test]
fn conformance_mariadb() {
    run_conformance(true);
}

/// With `authenticated_only`, a stranger forging a customer's domain as sender
/// (inbound mail through the same listener) neither uses up nor meets its ticket; the
/// customer's own authenticated mail is counted.
#[test]
fn authenticated_only_ignores_forged_inbound_senders() {
    let e = env(false, "authenticated_only = true");
    e.raw.exec(
        "INSERT INTO ticket_plan (id, total_limit, day_limit, month_limit) VALUES (1, -1, 2, -1)",
    );
    e.raw.exec("INSERT INTO domain_ticket (id, domain, valid_until, ticket_plan_id) VALUES (1, 'example.com', -1, 1)");
    let stranger = [
        ("sasl_method".to_owned(), None),
        ("sasl_username".to_owned(), None),
        ("sender".to_owned(), Some("ceo@example.com".to_owned())),
    ];
    for i in 0..3 {
        assert_eq!(ask(&e, &stranger), "action=dunno", "forged request {i}");
    }
    let counters = e
        .raw
        .row("SELECT COALESCE(total_used, 0) FROM domain_ticket WHERE id = 1");
    assert_eq!(counters, "0", "a forged sender used the ticket");
    let own = [
        (
            "sasl_username".to_owned(),
            Some("alice@example.com".to_owned()),
        ),
        ("sender".to_owned(), Some("alice@example.com".to_owned())),
    ];
    assert_eq!(ask(&e, &own), "action=dunno");
    assert_eq!(ask(&e, &own), "action=dunno");
    assert_eq!(
        ask(&e, &own),
        "action=reject Rejecting operation because day limit reached (2)"
    );
}

/// Senders without a ticket are remembered (SQLite), yet every edit applies to the
/// next request: a ticket inserted, deleted, or renamed to the sender (a list row
/// included), by another connection; and when the triggers that announce edits are
/// dropped or their table rebuilt, the next request looks the sender up again and the
/// triggers are made again.
#[test]
fn senders_without_a_ticket_see_every_edit_on_the_next_request() {
    let mut e = env(false, "");
    e.raw.exec(
        "INSERT INTO ticket_plan (id, total_limit, day_limit, month_limit) VALUES (1, -1, 5, -1)",
    );
    let as_user = |u: &str| {
        [
            ("sasl_username".to_owned(), Some(u.to_owned())),
            ("sender".to_owned(), Some(u.to_owned())),
        ]
    };
    let blocked = |who: &str| {
        format!(
            "action=reject Rejecting operation because ticket (1) is blocked(7) for user ({who})"
        )
    };
    let (bob, carol) = (as_user("bob@example.net"), as_user("carol@example.org"));
    for step in ["first lookup", "remembered"] {
        assert_eq!(ask(&e, &bob), "action=dunno", "bob, {step}");
        assert_eq!(ask(&e, &carol), "action=dunno", "carol, {step}");
    }
    let triggers = || {
        e.raw.row(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'domain_ticket'",
        )
    };
    assert_eq!(triggers(), "3", "the generation triggers were not made");

    e.raw.exec("INSERT INTO domain_ticket (id, sasl_user, valid_until, ticket_plan_id, block_ticket) VALUES (1, 'bob@example.net', -1, 1, 7)");
    assert_eq!(
        ask(&e, &bob),
        blocked("<unknown>"),
        "ticket inserted for bob"
    );
    e.raw.exec("DELETE FROM domain_ticket WHERE id = 1");
    assert_eq!(ask(&e, &bob), "action=dunno", "bob's ticket deleted");
    assert_eq!(ask(&e, &bob), "action=dunno", "bob remembered again");

    // A charge changes the row's counters, not its identity: nothing is forgotten, and
    // a row renamed to carol's list applies to her at once.
    e.raw.exec("INSERT INTO domain_ticket (id, sasl_user, valid_until, ticket_plan_id, block_ticket) VALUES (2, 'x@example.com', -1, 1, 7)");
    assert_eq!(
        ask(&e, &carol),
        "action=dunno",
        "carol, another user's ticket"
    );
    e.raw.exec(
        "UPDATE domain_ticket SET sasl_user = 'x@example.com, carol@example.org' WHERE id = 2",
    );
    assert_eq!(
        ask(&e, &carol),
        blocked("carol@example.org"),
        "list row renamed to include carol"
    );
    e.raw.exec("DELETE FROM domain_ticket");

    // A careless operator drops a trigger, then inserts: nothing bumps the generation,
    // but the schema changed, so the sender is looked up. Requests never write: the
    // trigger is made again by the minute tick.
    assert_eq!(ask(&e, &bob), "action=dunno", "bob before the drop");
    assert_eq!(
        ask(&e, &bob),
        "action=dunno",
        "bob remembered before the drop"
    );
    e.raw.exec("DROP TRIGGER domain_ticket_gen_insert");
    e.raw.exec("INSERT INTO domain_ticket (id, sasl_user, valid_until, ticket_plan_id, block_ticket) VALUES (3, 'bob@example.net', -1, 1, 7)");
    assert_eq!(
        ask(&e, &bob),
        blocked("<unknown>"),
        "ticket inserted with a trigger dropped"
    );
    assert_eq!(ask(&e, &carol), "action=dunno", "carol after the drop");
    assert_eq!(triggers(), "2", "a request made the trigger again");
    e.tick();
    assert_eq!(
        triggers(),
        "3",
        "the minute tick did not make the dropped trigger again"
    );

    // A restore: the table rebuilt (its triggers go with it) and filled.
    assert_eq!(ask(&e, &carol), "action=dunno", "carol after the tick");
    assert_eq!(
        ask(&e, &carol),
        "action=dunno",
        "carol remembered before the restore"
    );
    e.raw.exec(
        "ALTER TABLE domain_ticket RENAME TO old_ticket; \
         CREATE TABLE domain_ticket AS SELECT * FROM old_ticket; DROP TABLE old_ticket; \
         INSERT INTO domain_ticket (id, sasl_user, valid_until, ticket_plan_id, block_ticket) VALUES (4, 'carol@example.org', -1, 1, 7)",
    );
    assert_eq!(
        ask(&e, &carol),
        blocked("<unknown>"),
        "carol's ticket in the restored table"
    );
    assert_eq!(
        ask(&e, &carol),
        blocked("<unknown>"),
        "carol, triggers still missing"
    );
    e.tick();
    assert_eq!(
        triggers(),
        "3",
        "the restored table did not get its triggers back"
    );

    // The table renamed away and copied back: the triggers went with the old name, and
    // are moved back to domain_ticket.
    e.raw.exec(
        "ALTER TABLE domain_ticket RENAME TO kept_ticket; \
         CREATE TABLE domain_ticket AS SELECT * FROM kept_ticket",
    );
    assert_eq!(
        ask(&e, &carol),
        blocked("<unknown>"),
        "carol after the rename"
    );
    e.tick();
    assert_eq!(
        triggers(),
        "3",
        "the triggers were not moved back from the renamed table"
    );

    // An index added changes the schema but not the triggers: a read (at most once a
    // second, no write) turns the memory on again, without waiting for the tick. That
    // it is on shows when the generation is set back by hand in the same transaction
    // as an insert (never do this): a remembered sender does not see the new list row
    // (exact matches are always read; the memory spares the scan of the list rows).
    e.raw.exec("CREATE INDEX plan_name ON ticket_plan (name)");
    let dave = as_user("dave@example.net");
    assert_eq!(ask(&e, &dave), "action=dunno", "dave, the schema changed");
    e.jump(1);
    assert_eq!(ask(&e, &dave), "action=dunno", "dave, triggers read again");
    assert_eq!(ask(&e, &dave), "action=dunno", "dave, remembered");
    e.raw.exec(
        "BEGIN; INSERT INTO domain_ticket (id, sasl_user, valid_until, ticket_plan_id, block_ticket) VALUES (5, 'z@example.com, dave@example.net', -1, 1, 7); \
         UPDATE domain_ticket_generation SET gen = gen - 1; COMMIT",
    );
    assert_eq!(
        ask(&e, &dave),
        "action=dunno",
        "dave was looked up: the memory did not come back after the index"
    );
}

/// A schema change (a VACUUM) and then another connection holding the write lock for
/// seconds: senders without a ticket are still answered at once, never with the
/// on-error action (a request that made the triggers again waited for the lock, timed
/// out and got the module quarantined; found by review).
#[test]
fn a_schema_change_and_a_held_write_lock_delay_no_request() {
    let e = env(false, "");
    let as_user = |u: &str| {
        [
            ("sasl_username".to_owned(), Some(u.to_owned())),
            ("sender".to_owned(), Some(u.to_owned())),
        ]
    };
    assert_eq!(
        ask(&e, &as_user("k0@ex.org")),
        "action=dunno",
        "before the VACUUM"
    );
    e.raw.exec("VACUUM");
    assert_eq!(
        ask(&e, &as_user("k0@ex.org")),
        "action=dunno",
        "after the VACUUM"
    );
    let Raw::Sqlite(path) = &e.raw else {
        unreachable!()
    };
    let path = path.clone();
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        let c = rusqlite::Connection::open(path).unwrap();
        c.execute_batch("BEGIN IMMEDIATE; UPDATE time_tracking SET day = day")
            .unwrap();
        locked_tx.send(()).unwrap();
        let _ = release_rx.recv_timeout(std::time::Duration::from_secs(30));
        c.execute_batch("COMMIT").unwrap();
    });
    locked_rx.recv().unwrap();
    for i in 0..10 {
        let started = std::time::Instant::now();
        let answer = ask(&e, &as_user(&format!("u{i}@ex.org")));
        let took = started.elapsed();
        assert_eq!(
            answer, "action=dunno",
            "request {i} while the lock was held"
        );
        assert!(
            took < std::time::Duration::from_millis(1500),
            "request {i} took {took:?} while another connection held the write lock"
        );
    }
    release_tx.send(()).unwrap();
    holder.join().unwrap();
}

#[test]
fn charge_states_stop_double_counting() {
    for mysql in [false, true] {
        let e = env(mysql, "charge_states = [\"DATA\"]");
        e.raw.exec("INSERT INTO ticket_plan (id, total_limit, day_limit, month_limit) VALUES (1, -1, 3, -1)");
        e.raw.exec("INSERT INTO domain_ticket (id, sasl_user, valid_until, ticket_plan_id) VALUES (1, 'a@x.com', -1, 1)");
        let user = ("sasl_username".to_owned(), Some("a@x.com".to_owned()));
        let ask = |a: &[(String, Option<String>)]| ask(&e, a);
        let state = |s: &str| ("protocol_state".to_owned(), Some(s.to_owned()));
        let count = |n: &str| ("recipient_count".to_owned(), Some(n.to_owned()));
        // One message to two recipients: two RCPT requests, then DATA with the count.
        for _ in 0..2 {
            assert_eq!(
                ask(&[user.clone(), state("RCPT"), count("0")]),
                "action=dunno"
            );
        }
        assert_eq!(
            ask(&[user.clone(), state("DATA"), count("2")]),
            "action=dunno"
        );
        assert_eq!(
            e.raw
                .row("SELECT current_day_usage FROM domain_ticket WHERE id = 1"),
            "2"
        );
        // Uncharged stages still refuse what would not fit.
        assert_eq!(
            ask(&[user.clone(), state("RCPT"), count("2")]),
            "action=reject Rejecting operation because day limit reached (3)"
        );
        assert_eq!(
            ask(&[user.clone(), state("RCPT"), count("0")]),
            "action=dunno"
        );
        assert_eq!(
            e.raw
                .row("SELECT current_day_usage FROM domain_ticket WHERE id = 1"),
            "2"
        );
    }
}

/// Issue 13, defect 7: the rollover is one transaction, redone until it is done, and
/// the first request of a new day is charged against the new day without waiting for
/// a tick. A rollover that failed half-way used to leave `time_tracking` moved on and
/// the counters not reset: a user at 2 of 2 stayed refused into the new day, for good.
#[test]
fn rollover_is_atomic_retried_and_done_by_the_first_request_of_a_day() {
    for mysql in [false, true] {
        let label = if mysql { "mariadb" } else { "sqlite" };
        let mut e = env(mysql, "");
        e.raw.exec("INSERT INTO ticket_plan (id, total_limit, day_limit, month_limit) VALUES (1, -1, 2, -1)");
        e.raw.exec("INSERT INTO domain_ticket (id, sasl_user, valid_until, ticket_plan_id) VALUES (1, 'a@x.com', -1, 1)");
        // A row whose counters are NULL (made by hand): valvula writes 0 at rollover.
        e.raw.exec("INSERT INTO domain_ticket (id, sasl_user, valid_until, ticket_plan_id) VALUES (2, 'n@x.com', -1, 1)");
        let user = [("sasl_username".to_owned(), Some("a@x.com".to_owned()))];
        let counters = |e: &Env| {
            e.raw.row(
                "SELECT d.current_day_usage, t.day FROM domain_ticket d, time_tracking t WHERE d.id = 1",
            )
        };
        for i in 0..2 {
            assert_eq!(ask(&e, &user), "action=dunno", "{label}: request {i}");
        }
        let full = "action=reject Rejecting operation because day limit reached (2)";
        assert_eq!(ask(&e, &user), full, "{label}");
        assert_eq!(counters(&e), "2\t22", "{label}");

        // The history table is gone when the day changes: the rollover fails...
        e.raw
            .exec("ALTER TABLE domain_ticket_history RENAME TO history_away");
        e.advance(12 * 3600 + 30); // 2026-11-23 00:00:30 UTC, with the ticks
        let answer = ask(&e, &user);
        // ... and leaves nothing half-done: neither the tracking row nor the counters.
        assert_eq!(
            counters(&e),
            "2\t22",
            "{label}: a failed rollover left a half-done state (answer {answer:?})"
        );
        // Repaired: the next request rolls over first and is charged in the new day,
        // with no tick in between.
        e.raw
            .exec("ALTER TABLE history_away RENAME TO domain_ticket_history");
        e.jump(1);
        assert_eq!(
            ask(&e, &user),
            "action=dunno",
            "{label}: still refused after repair"
        );
        assert_eq!(counters(&e), "1\t23", "{label}");
        assert_eq!(
            e.raw
                .row("SELECT day_usage FROM domain_ticket_history WHERE domain_ticket_id = 1"),
            "2",
            "{label}: history of the day that ended"
        );
        assert_eq!(
            e.raw.row(
                "SELECT current_day_usage, current_month_usage FROM domain_ticket WHERE id = 2"
            ),
            "0\tNULL",
            "{label}: NULL day counter not set to 0 (the month did not change)"
        );

        // The next midnight, no tick at all: the first request of the day rolls over.
        e.raw
            .exec("UPDATE domain_ticket SET current_day_usage = 2 WHERE id = 1");
        assert_eq!(ask(&e, &user), full, "{label}");
        e.jump(86_400);
        assert_eq!(
            ask(&e, &user),
            "action=dunno",
            "{label}: the first request of a new day was refused by the old day's count"
        );
        assert_eq!(counters(&e), "1\t24", "{label}");
    }
}

/// Rollovers while charges pour in (MariaDB, READ COMMITTED): every unit charged is in
/// the day's history or in the new day's counter, never lost between the history's
/// read and the reset (the reset now locks the rows first).
#[test]
fn rollover_under_load_loses_no_charge() {
    let e = env(true, "");
    e.raw.exec(
        "INSERT INTO ticket_plan (id, total_limit, day_limit, month_limit) VALUES (1, -1, -1, -1)",
    );
    e.raw.exec("INSERT INTO domain_ticket (id, sasl_user, valid_until, ticket_plan_id, total_used, current_day_usage) VALUES (1, 'a@x.com', -1, 1, 0, 0)");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let admitted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..6 {
        let (addr, stop, admitted) = (e.addr.clone(), stop.clone(), admitted.clone());
        tasks.push(e.rt.spawn(async move {
            let mut client = Client::connect(&addr).await;
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let req = valvula_tests::client::postfix_request(&[
                    ("sasl_username", "a@x.com"),
                    ("recipient_count", "1"),
                    ("instance", &format!("c{c}.{i}")),
                ]);
                let r = client.ask(&req).await;
                assert_eq!(r, "action=dunno\n\n");
                admitted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                i += 1;
            }
        }));
    }
    let charged = || admitted.load(std::sync::atomic::Ordering::SeqCst);
    for round in 0..8 {
        let end = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let before = charged();
        while charged() < before + 30 {
            assert!(std::time::Instant::now() < end, "no load in round {round}");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        e.raw.exec("UPDATE time_tracking SET day = 0");
        e.tick();
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for t in tasks {
        e.rt.block_on(t).unwrap();
    }
    let total: u64 = e
        .raw
        .row("SELECT total_used FROM domain_ticket WHERE id = 1")
        .parse()
        .unwrap();
    let day: u64 = e
        .raw
        .row("SELECT current_day_usage FROM domain_ticket WHERE id = 1")
        .parse()
        .unwrap();
    let history: u64 = e
        .raw
        .row("SELECT COALESCE(SUM(day_usage), 0) FROM domain_ticket_history WHERE domain_ticket_id = 1")
        .parse()
        .unwrap();
    let rounds = e
        .raw
        .row("SELECT COUNT(*) FROM domain_ticket_history WHERE domain_ticket_id = 1");
    assert_eq!(total, charged(), "total_used is not what was admitted");
    assert_eq!(
        history + day,
        total,
        "history {history} + current day {day} != total {total} ({rounds} rollovers): charges lost in a rollover"
    );
}

/// valvula's documented administration SQL, on a database valvula itself created
/// (reference schema, with rows), works unchanged; missing columns are added.
#[test]
fn existing_valvula_database_and_operator_sql() {
    let db = TestDb::new();
    // The DDL valvula 1.0.11 created (SHOW CREATE TABLE), kept as a fixture.
    let schema = std::fs::read_to_string(fixture("mod-ticket/valvula-schema.sql")).unwrap();
    let ddl: String = schema
        .lines()
        .filter(|l| !l.starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    db.sql(&ddl);
    // One column missing, as in a database made by an older valvula: it must be added
    // without touching the rest.
    db.sql("ALTER TABLE domain_ticket DROP COLUMN outgoing_ip_id");
    db.sql("INSERT INTO ticket_plan (name, description, total_limit, day_limit, month_limit) VALUES ('basic', 'Basic plan', 100000, 3, 10000)");
    db.sql("INSERT INTO domain_ticket (sasl_user, valid_until, ticket_plan_id) VALUES ('user@example.com', -1, 1)");
    db.sql("INSERT INTO time_tracking (day, month) VALUES (22, 10)");
    let raw = Raw::Mysql(db);
    let p = Proc::start(&daemon_toml(&raw, ""), &[]);
    let Raw::Mysql(db) = &raw else { unreachable!() };
    let cols = db.sql("SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = DATABASE() AND table_name = 'domain_ticket' AND column_name = 'outgoing_ip_id'");
    assert_eq!(
        cols.trim(),
        "1",
        "the missing column was not added\n{}",
        p.log()
    );
    let addr = p.addrs()[0].clone();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sent = std::cell::Cell::new(0);
    let ask_as = |user: &str, instance: &str| {
        let req = valvula_tests::client::postfix_request(&[
            ("sasl_username", user),
            ("protocol_state", "DATA"),
            ("recipient_count", "1"),
            ("instance", instance),
        ]);
        let addr = addr.clone();
        rt.block_on(async move { Client::connect(&addr).await.ask(&req).await })
    };
    // Each message its own Postfix instance.
    let ask = |user: &str| {
        sent.set(sent.get() + 1);
        ask_as(user, &format!("m{}", sent.get()))
    };
    for _ in 0..3 {
        assert_eq!(ask("user@example.com"), "action=dunno\n\n");
    }
    // Postfix re-sends message 2's request after its policy timeout: answered as
    // before, not charged again (valvula charged it twice).
    assert_eq!(ask_as("user@example.com", "m2"), "action=dunno\n\n");
    assert_eq!(
        ask("user@example.com"),
        "action=reject Rejecting operation because day limit reached (3)\n\n"
    );
    // An edit by plain SQL applies to the next request, without a restart.
    db.sql("UPDATE ticket_plan SET day_limit = 5 WHERE id = 1");
    assert_eq!(ask("user@example.com"), "action=dunno\n\n");
    db.sql("INSERT INTO domain_ticket (sasl_user, valid_until, ticket_plan_id, block_ticket) VALUES ('new@example.com', -1, 1, 2)");
    assert_eq!(
        ask("new@example.com"),
        "action=reject Rejecting operation because ticket (1) is blocked(2) for user (<unknown>)\n\n"
    );
    assert_eq!(
        db.sql("SELECT total_used, current_day_usage FROM domain_ticket WHERE id = 1")
            .trim(),
        "4\t4"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_connections_and_two_daemons_admit_exactly_the_plan() {
    let db = TestDb::new();
    db.sql("CREATE TABLE ticket_plan (id INT AUTO_INCREMENT PRIMARY KEY, name VARCHAR(250), description VARCHAR(500), total_limit INT, day_limit INT, month_limit INT)");
    db.sql("INSERT INTO ticket_plan (name, total_limit, day_limit, month_limit) VALUES ('p', 1000, 150, 1000)");
    let raw = Raw::Mysql(db);
    let cfg = daemon_toml(&raw, "");
    let a = Proc::start(&cfg, &[]);
    let b = Proc::start(&cfg, &[]);
    let Raw::Mysql(db) = &raw else { unreachable!() };
    db.sql("INSERT INTO domain_ticket (sasl_user, valid_until, ticket_plan_id) VALUES ('busy@example.com', -1, 1)");
    let addrs = [a.addrs()[0].clone(), b.addrs()[0].clone()];
    let admitted = hammer(
        &addrs,
        64,
        4,
        move |i, j| {
            valvula_tests::client::postfix_request(&[
                ("sasl_username", "busy@example.com"),
                ("instance", &format!("c{i}.{j}")),
            ])
        },
        "action=dunno\n\n",
        "action=reject Rejecting operation because day limit reached (150)\n\n",
    )
    .await;
    assert_eq!(admitted, 150, "a:\n{}\nb:\n{}", a.log(), b.log());
    assert_eq!(
        db.sql("SELECT total_used, current_day_usage, current_month_usage FROM domain_ticket")
            .trim(),
        "150\t150\t150"
    );
}

#[test]
fn real_postfix_enforces_tickets_at_data() {
    let dir = tempfile::tempdir().unwrap();
    let raw = Raw::Sqlite(dir.path().join("tickets.db"));
    let v = Proc::start(&daemon_toml(&raw, ""), &[]);
    raw.exec(&format!(
        "INSERT INTO ticket_plan (name, description, total_limit, day_limit, month_limit) VALUES ('small', '', -1, 3, -1);
         INSERT INTO ticket_plan (name, description, total_limit, day_limit, month_limit) VALUES ('big', '', -1, 100, -1);
         INSERT INTO domain_ticket (sasl_user, valid_until, ticket_plan_id) VALUES ('{USER}', -1, 1);
         INSERT INTO domain_ticket (sasl_user, valid_until, ticket_plan_id) VALUES ('{USER2}', -1, 2);"
    ));
    let pf = Postfix::start(&v.addrs()[0], &["smtpd_data_restrictions"], "");
    let log = || format!("maillog:\n{}\nvalvulad:\n{}", pf.maillog(), v.log());
    for i in 0..3 {
        let r = send_mail(pf.port, Some((USER, PASSWORD)), USER, &["bob@example.com"]);
        assert!(r.accepted(), "message {i}: {r:?}\n{}", log());
    }
    let r = send_mail(pf.port, Some((USER, PASSWORD)), USER, &["bob@example.com"]);
    assert_eq!((r.step.as_str(), r.code), ("DATA", 554), "{r:?}\n{}", log());
    assert!(
        r.text
            .contains("Rejecting operation because day limit reached (3)"),
        "{r:?}"
    );
    // A message to three recipients is charged three.
    let r = send_mail(
        pf.port,
        Some((USER2, PASSWORD2)),
        USER2,
        &["a@example.com", "b@example.com", "c@remote.test"],
    );
    assert!(r.accepted(), "{r:?}\n{}", log());
    assert_eq!(
        raw.row(&format!(
            "SELECT current_day_usage FROM domain_ticket WHERE sasl_user = '{USER2}'"
        )),
        "3"
    );
    // Expired and blocked tickets, with valvula's texts.
    raw.exec(&format!(
        "UPDATE domain_ticket SET valid_until = 1000 WHERE sasl_user = '{USER2}'"
    ));
    let r = send_mail(pf.port, Some((USER2, PASSWORD2)), USER2, &["a@example.com"]);
    assert_eq!(r.code, 554, "{r:?}");
    assert!(
        r.text
            .contains("Rejecting operation because tickets are expired (valid_until 1000 < "),
        "{r:?}"
    );
    raw.exec(&format!(
        "UPDATE domain_ticket SET valid_until = -1, block_ticket = 1 WHERE sasl_user = '{USER2}'"
    ));
    let r = send_mail(pf.port, Some((USER2, PASSWORD2)), USER2, &["a@example.com"]);
    assert!(
        r.text
            .contains("Rejecting operation because ticket (2) is blocked(1) for user (<unknown>)"),
        "{r:?}"
    );
    // An unauthenticated sender of a domain without a ticket passes.
    let r = send_mail(
        pf.port,
        None,
        "someone@unknown-domain.test",
        &["bob@example.com"],
    );
    assert!(r.accepted(), "{r:?}\n{}", log());
}
