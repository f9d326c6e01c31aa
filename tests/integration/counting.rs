//! Exact, durable counting through whole daemons: many connections, two daemons on one
//! MariaDB database, SIGKILL under load. (MariaDB restarted or stalled under load: in
//! outage.rs.)

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use valvula_tests::client::{self, Answer, Client, postfix_request};
use valvula_tests::daemon::Proc;
use valvula_tests::db::TestDb;
use valvula_tests::module_path;

fn config(storage: &str, extra: &str) -> String {
    format!(
        "[server]\nmodule_dirs = [{:?}]\nmodule_timeout = \"10s\"\n\
         [log]\nlevel = \"warn,valvulad=info\"\n\
         [[listener]]\nname = \"main\"\naddress = \"127.0.0.1:0\"\nmodules = [\"mod-test\"]\nmax_connections = 2000\n{extra}\n\
         {storage}\n",
        module_path("mod_test")
            .parent()
            .unwrap()
            .display()
            .to_string()
    )
}

fn mysql_storage(url: &str) -> String {
    format!("[storage]\nbackend = \"mysql\"\nurl = \"{url}\"\npool_size = 32\n")
}

fn charge(key: &str, limit: i64, amount: i64) -> Vec<u8> {
    postfix_request(&[
        ("x_test_consume", key),
        ("x_test_limit", &limit.to_string()),
        ("x_test_amount", &amount.to_string()),
        ("x_test_window", "day,3600"),
    ])
}

/// `used` of a key, asked through the daemon with a zero charge.
async fn stored(addr: &str, key: &str) -> i64 {
    let mut c = Client::connect(addr).await;
    let r = c.ask(&charge(key, i64::MAX / 2, 0)).await;
    r.trim_end()
        .rsplit("used=")
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {r:?}"))
}

/// Charges of one unit from `conns` connections over `addrs`; the number admitted.
async fn charge_from(
    addrs: &[String],
    key: &str,
    limit: i64,
    conns: usize,
    per_conn: usize,
) -> u64 {
    let key = key.to_owned();
    client::hammer(
        addrs,
        conns,
        per_conn,
        move |_, _| charge(&key, limit, 1),
        "action=ok",
        "action=reject limit reached",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_connections_admit_exactly_the_limit_sqlite() {
    let p = Proc::start(&config("", ""), &[]);
    let addr = p.addrs()[0].clone();
    let n = charge_from(std::slice::from_ref(&addr), "alice@example.com", 150, 64, 4).await;
    assert_eq!(n, 150, "{}", p.log());
    assert_eq!(stored(&addr, "alice@example.com").await, 150);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_on_one_mariadb_admit_exactly_the_limit() {
    let db = TestDb::new();
    let cfg = config(&mysql_storage(&db.url()), "");
    let a = Proc::start(&cfg, &[]);
    let b = Proc::start(&cfg, &[]);
    let addrs = vec![a.addrs()[0].clone(), b.addrs()[0].clone()];
    let n = charge_from(&addrs, "shared@example.com", 200, 64, 5).await;
    assert_eq!(n, 200, "a:\n{}\nb:\n{}", a.log(), b.log());
    assert_eq!(stored(&addrs[1], "shared@example.com").await, 200);
    // The database agrees, read independently of valvulad.
    let rows = db.sql("SELECT win, used FROM vlv_counter WHERE ns = 'mod-test' AND ckey = 'shared@example.com' ORDER BY win");
    assert_eq!(rows, "day\t200\nsliding:3600\t0\n", "{rows}");
    let slide = db.sql(
        "SELECT SUM(used) FROM vlv_slide WHERE ns = 'mod-test' AND ckey = 'shared@example.com'",
    );
    assert_eq!(slide.trim(), "200");
}

/// Clients charge as fast as they can; SIGKILL the daemon; every admitting reply a
/// client received must be in the stored count after a restart on the same database.
async fn kill_under_load(storage: &str) {
    let cfg = config(storage, "");
    let mut p = Proc::start(&cfg, &[]);
    let addr = p.addrs()[0].clone();
    let admitted = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (addr, admitted, stop) = (addr.clone(), admitted.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(&addr).await;
            while !stop.load(Ordering::SeqCst) {
                c.send(&charge("killme", 1_000_000_000, 1)).await;
                match c.answer(Duration::from_secs(10)).await {
                    Answer::Reply(r) if r.starts_with("action=ok") => {
                        admitted.fetch_add(1, Ordering::SeqCst);
                    }
                    _ => return,
                }
            }
        }));
    }
    // Kill it under load: once a good number of charges were admitted.
    let end = Instant::now() + Duration::from_secs(30);
    while admitted.load(Ordering::SeqCst) <= 20 {
        assert!(
            Instant::now() < end,
            "only {} charges admitted in 30 s\n{}",
            admitted.load(Ordering::SeqCst),
            p.log()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    p.signal(Signal::SIGKILL);
    let _ = tokio::task::spawn_blocking(move || {
        p.wait_exit(Duration::from_secs(10));
        p
    })
    .await
    .unwrap();
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        let _ = t.await;
    }
    let seen = admitted.load(Ordering::SeqCst);
    assert!(seen > 20, "too little load before the kill ({seen})");
    // Same database, new daemon.
    let q = Proc::start(&cfg, &[]);
    let used = stored(&q.addrs()[0], "killme").await;
    assert!(
        used >= seen as i64,
        "stored {used} < {seen} admitted replies: a charge was lost"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_no_admitted_charge_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    kill_under_load(&format!(
        "[storage]\npath = \"{}/kill.db\"\n",
        dir.path().display()
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_no_admitted_charge_mariadb() {
    let db = TestDb::new();
    kill_under_load(&mysql_storage(&db.url())).await;
}

#[test]
fn check_mode_reports_the_database() {
    let mut p = Proc::spawn(&config("", ""), &["-t"]);
    assert!(
        p.wait_exit(Duration::from_secs(20)).success(),
        "{}",
        p.log()
    );
    assert!(p.log().contains("is reachable"), "{}", p.log());
    let db = TestDb::new();
    let mut p = Proc::spawn(&config(&mysql_storage(&db.url()), ""), &["-t"]);
    assert!(
        p.wait_exit(Duration::from_secs(20)).success(),
        "{}",
        p.log()
    );
    assert!(p.log().contains("is reachable"), "{}", p.log());
    assert!(!p.log().contains("NOT REACHABLE"), "{}", p.log());
    // A MariaDB nobody listens on: -t says so and fails; the password never shows.
    let port = valvula_tests::free_port();
    let cfg = config(
        &format!(
            "[storage]\nbackend = \"mysql\"\nurl = \"mysql://valvula@127.0.0.1:{port}/valvula\"\npassword = \"s3cret-pw\"\n"
        ),
        "",
    );
    let mut p = Proc::spawn(&cfg, &["-t"]);
    assert_eq!(
        p.wait_exit(Duration::from_secs(30)).code(),
        Some(1),
        "{}",
        p.log()
    );
    assert!(p.log().contains("DATABASE NOT REACHABLE"), "{}", p.log());
    assert!(p.log().contains("is not reachable"), "{}", p.log());
    assert!(
        !p.log().contains("s3cret-pw"),
        "the password was logged:\n{}",
        p.log()
    );
    // Without -t the daemon starts anyway and answers with the on-error action.
    let p = Proc::start(
        &cfg.replace(
            "modules = [\"mod-test\"]",
            "modules = [\"mod-test\"]\non_error = \"defer\"",
        ),
        &[],
    );
    let addr = p.addrs()[0].clone();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = Client::connect(&addr).await;
        assert!(c.ask(&charge("k", 10, 1)).await.starts_with("action=defer"));
        // Requests that need no database are still answered by the module.
        assert_eq!(c.ask(&postfix_request(&[])).await, "action=dunno\n\n");
    });
    assert!(!p.log().contains("s3cret-pw"));
}
