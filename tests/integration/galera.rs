//! MariaDB Galera (Debian's galera-4) as the shared store of several mail servers: a
//! three-node cluster on loopback, one valvulad on node 0 and one on node 1, the same
//! database. Two daemons admit exactly a limit (conflicting charges on two nodes fail
//! certification at COMMIT, error 1213, and are retried), and a node killed under load
//! costs no admitted charge; its daemon serves again by itself once it has rejoined.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use valvula_tests::client::{Answer, Client, postfix_request};
use valvula_tests::daemon::Proc;
use valvula_tests::galera::GaleraCluster;
use valvula_tests::module_path;

const USER: &str = "galera@example.com";
const ON_ERROR: &str = "action=defer 4.3.0 db down\n\n";
const REFUSED: &str = "action=defer_if_permit";

/// mod-ratelimit with one limit (messages a day for each SASL user: a calendar day, so
/// a test never straddles a period) on database `valvula` of the node at `url`.
fn config(url: &str, limit: u64) -> String {
    format!(
        "[server]\nmodule_dirs = [{:?}]\nmodule_timeout = \"10s\"\n\
         [log]\nlevel = \"warn,valvulad=info\"\n\
         [[listener]]\nname = \"main\"\naddress = \"127.0.0.1:0\"\nmodules = [\"mod-ratelimit\"]\n\
         max_connections = 2000\non_error = \"defer\"\non_error_text = \"4.3.0 db down\"\n\
         [module.mod-ratelimit]\n\
         [[module.mod-ratelimit.policy]]\nname = \"g\"\nkey = \"sasl_user\"\nmetric = \"messages\"\n\
         default = {{ limits = [[\"day\", {limit}]] }}\n\
         [storage]\nbackend = \"mysql\"\nurl = \"{url}/valvula\"\npool_size = 32\ntime_zone = \"UTC\"\n",
        module_path("mod_ratelimit")
            .parent()
            .unwrap()
            .display()
            .to_string()
    )
}

/// One message of `USER` at DATA, its instance unique.
fn message(instance: &str) -> Vec<u8> {
    postfix_request(&[
        ("sasl_username", USER),
        ("protocol_state", "DATA"),
        ("recipient_count", "1"),
        ("instance", instance),
    ])
}

/// A cluster of three with database `valvula`, daemon A on node 0 and B on node 1.
fn setup(limit: u64) -> (GaleraCluster, Proc, Proc) {
    let t = Instant::now();
    let cluster = GaleraCluster::start(3);
    eprintln!("three-node cluster synced in {:?}", t.elapsed());
    cluster.sql(0, None, "CREATE DATABASE valvula");
    let a = Proc::start(&config(&cluster.url(0), limit), &[]);
    let b = Proc::start(&config(&cluster.url(1), limit), &[]);
    (cluster, a, b)
}

/// The stored count of `USER` today, read on `node` after every transaction committed
/// anywhere in the cluster has been applied there (`wsrep_sync_wait`).
fn counter(cluster: &GaleraCluster, node: usize) -> u64 {
    let v = cluster.sql(
        node,
        Some("valvula"),
        &format!(
            "SET SESSION wsrep_sync_wait = 1; SELECT COALESCE(SUM(used), 0) FROM vlv_counter \
             WHERE ns = 'mod-ratelimit' AND ckey = 'g:{USER}' AND win = 'day'"
        ),
    );
    v.trim()
        .parse()
        .unwrap_or_else(|_| panic!("counter on node {node}: {v:?}"))
}

/// `wsrep_local_cert_failures/wsrep_local_bf_aborts` of `node`: how often a
/// transaction begun there lost to one from another node (certification at COMMIT)
/// or was aborted by one being applied.
fn conflicts(cluster: &GaleraCluster, node: usize) -> String {
    cluster
        .sql(
            node,
            None,
            "SELECT VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS WHERE VARIABLE_NAME IN \
             ('WSREP_LOCAL_CERT_FAILURES', 'WSREP_LOCAL_BF_ABORTS') ORDER BY VARIABLE_NAME DESC",
        )
        .split_whitespace()
        .collect::<Vec<_>>()
        .join("/")
}

/// What one daemon's clients saw.
#[derive(Default)]
struct Tally {
    admitted: AtomicU64,
    refused: AtomicU64,
    /// The on-error answer: the charge failed, or its outcome is unknown.
    failed: AtomicU64,
    /// Sent, never answered (the connection closed or stayed silent).
    unanswered: AtomicU64,
}

impl Tally {
    fn get(&self) -> (u64, u64, u64, u64) {
        (
            self.admitted.load(Ordering::SeqCst),
            self.refused.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
            self.unanswered.load(Ordering::SeqCst),
        )
    }

    fn admitted(&self) -> u64 {
        self.admitted.load(Ordering::SeqCst)
    }

    /// Charges that may be stored without an admitting answer.
    fn in_doubt(&self) -> u64 {
        self.failed.load(Ordering::SeqCst) + self.unanswered.load(Ordering::SeqCst)
    }

    fn describe(&self) -> String {
        let (a, r, f, u) = self.get();
        format!("admitted {a}, refused {r}, on-error {f}, unanswered {u}")
    }
}

/// `conns` connections to `addr`, each sending messages (instances `TAG.conn.n`) until
/// it sent `per_conn` or `stop` is set; every answer is counted in the tally. With
/// `give_up`, a connection ends at its first on-error answer (a mail server backing
/// off), so a daemon whose database is gone does not pile up answers in doubt.
fn load(
    rt: &tokio::runtime::Runtime,
    addr: &str,
    tag: &'static str,
    conns: usize,
    per_conn: usize,
    give_up: bool,
    stop: &Arc<AtomicBool>,
) -> (Arc<Tally>, Vec<tokio::task::JoinHandle<()>>) {
    let tally = Arc::new(Tally::default());
    let tasks = (0..conns)
        .map(|i| {
            let (addr, tally, stop) = (addr.to_owned(), tally.clone(), stop.clone());
            rt.spawn(async move {
                let mut c = Client::connect(&addr).await;
                for j in 0..per_conn {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    c.send(&message(&format!("{tag}.{i}.{j}"))).await;
                    match c.answer(Duration::from_secs(60)).await {
                        Answer::Reply(r) if r.starts_with("action=dunno") => {
                            tally.admitted.fetch_add(1, Ordering::SeqCst);
                        }
                        Answer::Reply(r) if r.starts_with(REFUSED) => {
                            tally.refused.fetch_add(1, Ordering::SeqCst);
                        }
                        Answer::Reply(r) => {
                            assert_eq!(
                                r, ON_ERROR,
                                "daemon {tag}: neither admitted, refused nor the on-error answer"
                            );
                            tally.failed.fetch_add(1, Ordering::SeqCst);
                            if give_up {
                                return;
                            }
                            // The store may be failing fast: do not spin on it.
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        Answer::Closed(_) | Answer::Silence => {
                            tally.unanswered.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                    }
                }
            })
        })
        .collect();
    (tally, tasks)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Polls `cond` every 20 ms; panics with `what()` after `within`.
fn until(within: Duration, what: impl Fn() -> String, cond: impl Fn() -> bool) {
    let end = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < end, "{} within {within:?}", what());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn galera_two_daemons_admit_exactly_the_limit() {
    const LIMIT: u64 = 300;
    let (cluster, a, b) = setup(LIMIT);
    let rt = runtime();
    let stop = Arc::new(AtomicBool::new(false));
    // 64 connections on each daemon, 640 messages in all for a limit of 300.
    let t = Instant::now();
    let (ta, ja) = load(&rt, &a.addrs()[0], "a", 64, 5, false, &stop);
    let (tb, jb) = load(&rt, &b.addrs()[0], "b", 64, 5, false, &stop);
    rt.block_on(async {
        for j in ja.into_iter().chain(jb) {
            j.await.expect("load task");
        }
    });
    let seen = format!(
        "daemon A (node 0): {}; daemon B (node 1): {}",
        ta.describe(),
        tb.describe()
    );
    eprintln!("{seen} in {:?}", t.elapsed());
    let admitted = ta.admitted() + tb.admitted();
    assert_eq!(
        (ta.in_doubt(), tb.in_doubt()),
        (0, 0),
        "answers that were neither admitted nor refused (conflicts not retried?): {seen}\na:\n{}\nb:\n{}",
        a.log(),
        b.log()
    );
    assert_eq!(
        admitted,
        LIMIT,
        "admitted {admitted} for a limit of {LIMIT}: {seen}\na:\n{}\nb:\n{}",
        a.log(),
        b.log()
    );
    eprintln!(
        "certification failures / brute-force aborts: node 0 {}, node 1 {}",
        conflicts(&cluster, 0),
        conflicts(&cluster, 1)
    );
    // The third node, which no daemon wrote to, holds the same count.
    let stored = counter(&cluster, 2);
    assert_eq!(
        stored, LIMIT,
        "counter on node 2 is {stored}, limit {LIMIT}, admitted {admitted}: {seen}"
    );
    let accounted = cluster.sql(
        2,
        Some("valvula"),
        &format!(
            "SELECT COALESCE(SUM(messages), 0) FROM ratelimit_accounting WHERE identity = '{USER}'"
        ),
    );
    assert_eq!(
        accounted.trim(),
        LIMIT.to_string(),
        "accounting rows on node 2 count {} messages, limit {LIMIT}: {seen}",
        accounted.trim()
    );
}

#[test]
fn galera_node_killed_under_load_loses_no_admitted_charge_and_rejoins() {
    const LIMIT: u64 = 1_000_000_000;
    let (mut cluster, a, b) = setup(LIMIT);
    let rt = runtime();
    let stop = Arc::new(AtomicBool::new(false));
    let (ta, ja) = load(&rt, &a.addrs()[0], "a", 64, usize::MAX, false, &stop);
    let (tb, jb) = load(&rt, &b.addrs()[0], "b", 64, usize::MAX, true, &stop);
    let seen = || {
        format!(
            "daemon A (node 0): {}; daemon B (node 1): {}",
            ta.describe(),
            tb.describe()
        )
    };
    until(
        Duration::from_secs(60),
        || format!("both daemons admitting before the kill: {}", seen()),
        || ta.admitted() > 100 && tb.admitted() > 100,
    );
    // Node 1 dies under load: daemon B loses its database, A's node goes on with node 2
    // (two of three: the primary component, quorum kept).
    let before = seen();
    let t = Instant::now();
    cluster.kill(1);
    cluster.wait_synced(0, 2);
    eprintln!(
        "node 1 killed ({before} before); node 0 synced in a cluster of 2 after {:?}",
        t.elapsed()
    );
    let then = ta.admitted();
    until(
        Duration::from_secs(60),
        || {
            format!(
                "daemon A admitting again after the kill (from {then}): {}\na:\n{}",
                seen(),
                a.log()
            )
        },
        || ta.admitted() >= then + 200,
    );
    // Node 1 comes back (it answers 1047 while it joins): daemon B serves again by
    // itself, without a restart.
    rt.block_on(async {
        for j in jb {
            j.await.expect("load task");
        }
    });
    cluster.restart(1);
    cluster.wait_synced(1, 3);
    let again = Arc::new(AtomicBool::new(false));
    let (tb2, jb2) = load(&rt, &b.addrs()[0], "b2", 8, usize::MAX, false, &again);
    until(
        Duration::from_secs(60),
        || {
            format!(
                "daemon B admitting again after node 1 rejoined: {}\nb:\n{}",
                tb2.describe(),
                b.log()
            )
        },
        || tb2.admitted() >= 100,
    );
    again.store(true, Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);
    rt.block_on(async {
        for j in ja.into_iter().chain(jb2) {
            j.await.expect("load task");
        }
    });
    let seen = format!("{}; daemon B after the rejoin: {}", seen(), tb2.describe());
    eprintln!("after the kill, 200 more on A and the rejoin: {seen}");
    let admitted = ta.admitted() + tb.admitted() + tb2.admitted();
    let in_doubt = ta.in_doubt() + tb.in_doubt() + tb2.in_doubt();
    for node in [0, 2] {
        let stored = counter(&cluster, node);
        eprintln!("node {node} counts {stored}: {admitted} admitted, {in_doubt} in doubt");
        assert!(
            stored >= admitted,
            "node {node} counts {stored} < {admitted} admitted answers: an admitted charge was lost ({seen})\na:\n{}\nb:\n{}",
            a.log(),
            b.log()
        );
        assert!(
            stored <= admitted + in_doubt,
            "node {node} counts {stored} > {admitted} admitted + {in_doubt} answered with an error or not at all: \
             a charge was kept that no request left in doubt ({seen})"
        );
    }
}
