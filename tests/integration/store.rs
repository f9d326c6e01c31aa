//! The storage service on both real backends: SQLite in a temporary file and a real
//! MariaDB (a database of the test's own). Every test runs on both.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use valvula_store::{
    Backend, Charge, Consumption, Stmt, StorageConfig, Store, StoreError, Value, Window,
    WindowKind, Zone,
};
use valvula_tests::db::TestDb;

/// An open store and what keeps it alive.
struct Bench {
    store: Arc<Store>,
    label: &'static str,
    _rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
    _db: Option<TestDb>,
}

fn open(mysql: bool) -> Bench {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (backend, db, label) = if mysql {
        let db = TestDb::new();
        (
            Backend::Mysql {
                url: db.url(),
                password: None,
                pool_size: 16,
            },
            Some(db),
            "mysql",
        )
    } else {
        (
            Backend::Sqlite {
                path: dir.path().join("v.db"),
                synchronous_full: true,
            },
            None,
            "sqlite",
        )
    };
    let cfg = StorageConfig {
        backend,
        zone: Zone::parse("UTC").unwrap(),
        timeout: std::time::Duration::from_secs(10),
        record_zone: true,
    };
    let store = Store::open(&cfg, rt.handle().clone()).unwrap();
    store.ping().unwrap_or_else(|e| panic!("{label}: {e}"));
    Bench {
        store,
        label,
        _rt: rt,
        _dir: dir,
        _db: db,
    }
}

/// Another store on the bench's database (another daemon), with calendar zone `zone`.
fn reopen(b: &Bench, zone: Zone) -> Arc<Store> {
    let backend = match &b._db {
        Some(db) => Backend::Mysql {
            url: db.url(),
            password: None,
            pool_size: 8,
        },
        None => Backend::Sqlite {
            path: b._dir.path().join("v.db"),
            synchronous_full: true,
        },
    };
    let cfg = StorageConfig {
        backend,
        zone,
        timeout: std::time::Duration::from_secs(10),
        record_zone: true,
    };
    Store::open(&cfg, b._rt.handle().clone()).unwrap()
}

/// On MariaDB, a second daemon's store on the same database.
fn second(b: &Bench) -> Option<Arc<Store>> {
    b._db.as_ref().map(|_| reopen(b, Zone::UTC))
}

fn both(f: impl Fn(&Bench)) {
    for mysql in [false, true] {
        f(&open(mysql));
    }
}

fn w(kind: WindowKind, limit: i64) -> Window {
    Window { kind, limit }
}

/// 2026-11-22 13:45:10 UTC, a Sunday.
const T0: i64 = 1_795_355_110;

fn used(c: &Consumption) -> Vec<i64> {
    c.windows.iter().map(|s| s.used).collect()
}

#[test]
fn calendar_windows_count_and_roll_over() {
    both(|b| {
        let s = &b.store;
        for (kind, end) in [
            (WindowKind::Hour, 1_795_356_000),
            (WindowKind::Day, 1_795_392_000),
            (WindowKind::Week, 1_795_392_000),
            (WindowKind::Month, 1_796_083_200),
        ] {
            let key = format!("user@example.com/{kind:?}");
            let ws = [w(kind, 5)];
            let c = s.consume("m", &key, 3, &ws, T0).unwrap();
            assert!(c.admitted, "{}", b.label);
            assert_eq!(
                (
                    c.windows[0].used,
                    c.windows[0].remaining,
                    c.windows[0].resets_at
                ),
                (3, 2, end),
                "{} {kind:?}",
                b.label
            );
            assert!(s.consume("m", &key, 2, &ws, T0 + 1).unwrap().admitted);
            let c = s.consume("m", &key, 1, &ws, end - 1).unwrap();
            assert!(!c.admitted, "{} {kind:?}: over the limit admitted", b.label);
            assert_eq!((c.windows[0].used, c.windows[0].remaining), (5, 0));
            // The boundary: a new period starts from zero.
            let c = s.consume("m", &key, 5, &ws, end).unwrap();
            assert!(c.admitted, "{} {kind:?}: new period refused", b.label);
            assert_eq!(used(&c), vec![5]);
            assert!(c.windows[0].resets_at > end);
        }
    });
}

#[test]
fn several_windows_are_all_or_nothing() {
    both(|b| {
        let s = &b.store;
        let ws = [
            w(WindowKind::Day, 10),
            w(WindowKind::Hour, 3),
            w(WindowKind::Sliding(600), 4),
        ];
        assert!(s.consume("m", "k", 3, &ws, T0).unwrap().admitted);
        // The hour window refuses: nothing is charged anywhere.
        let c = s.consume("m", "k", 1, &ws, T0 + 10).unwrap();
        assert!(!c.admitted);
        assert_eq!(used(&c), vec![3, 3, 3], "{}", b.label);
        assert_eq!(
            c.windows.iter().map(|x| x.admitted).collect::<Vec<_>>(),
            vec![true, false, true]
        );
        let p = s.peek("m", "k", 0, &ws, T0 + 10).unwrap();
        assert_eq!(
            used(&p),
            vec![3, 3, 3],
            "{}: a refused consumption charged something",
            b.label
        );
        // Next hour: the sliding window (600 s) has long forgotten, the day has not.
        let c = s.consume("m", "k", 2, &ws, T0 + 3600).unwrap();
        assert!(c.admitted, "{}", b.label);
        assert_eq!(used(&c), vec![5, 2, 2]);
        // The order windows are given in does not matter.
        let rev = [ws[2], ws[1], ws[0]];
        let c = s.peek("m", "k", 0, &rev, T0 + 3600).unwrap();
        assert_eq!(used(&c), vec![2, 2, 5]);
    });
}

/// A small deterministic generator, so failures reproduce.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

#[test]
fn sliding_window_never_admits_more_than_its_limit() {
    both(|b| {
        let s = &b.store;
        let (width, limit) = (120, 7);
        let ws = [w(WindowKind::Sliding(width), limit)];
        let mut rng = Lcg(42);
        let mut t = T0;
        let mut admitted: Vec<(i64, i64)> = Vec::new();
        for _ in 0..300 {
            t += rng.next(12) as i64;
            let amount = 1 + rng.next(3) as i64;
            if s.consume("m", "slide", amount, &ws, t).unwrap().admitted {
                admitted.push((t, amount));
            }
        }
        assert!(
            admitted.len() > 50,
            "{}: too few admitted to prove anything",
            b.label
        );
        for &(start, _) in &admitted {
            let inside: i64 = admitted
                .iter()
                .filter(|(x, _)| *x >= start && *x <= start + width)
                .map(|(_, a)| a)
                .sum();
            assert!(
                inside <= limit,
                "{}: {inside} admitted in [{start}, {}]",
                b.label,
                start + width
            );
        }
        // After a full window and one bucket of silence, the whole limit is free again.
        let later = t + width + 2;
        assert!(
            s.consume("m", "slide", limit, &ws, later).unwrap().admitted,
            "{}",
            b.label
        );
        // And maintenance drops buckets no window counts.
        assert!(s.maintain(later + 10 * width).unwrap() > 0, "{}", b.label);
    });
}

#[test]
fn peek_reset_unlimited_and_namespaces() {
    both(|b| {
        let s = &b.store;
        let ws = [w(WindowKind::Day, 2)];
        let p = s.peek("m", "k", 2, &ws, T0).unwrap();
        assert!(p.admitted);
        assert_eq!(used(&p), vec![0]);
        assert!(s.consume("m", "k", 2, &ws, T0).unwrap().admitted);
        assert!(!s.peek("m", "k", 1, &ws, T0).unwrap().admitted);
        // Another module's counter for the same key is separate.
        assert!(s.consume("other", "k", 2, &ws, T0).unwrap().admitted);
        assert!(s.reset("m", "k").unwrap() >= 1);
        assert!(
            s.consume("m", "k", 2, &ws, T0).unwrap().admitted,
            "{}: reset did not clear",
            b.label
        );
        assert!(
            !s.consume("other", "k", 1, &ws, T0).unwrap().admitted,
            "{}: reset crossed namespaces",
            b.label
        );
        // A negative limit counts without limiting; limit 0 admits nothing.
        let c = s
            .consume("m", "u", 1_000_000, &[w(WindowKind::Month, -1)], T0)
            .unwrap();
        assert!(c.admitted);
        assert_eq!((c.windows[0].used, c.windows[0].remaining), (1_000_000, -1));
        assert!(
            !s.consume("m", "z", 1, &[w(WindowKind::Month, 0)], T0)
                .unwrap()
                .admitted
        );
        // Zero is always a question, never a charge.
        let c = s.consume("m", "k", 0, &ws, T0).unwrap();
        assert!(c.admitted);
        assert_eq!(used(&c), vec![2]);
    });
}

#[test]
fn invalid_calls_are_refused() {
    let b = open(false);
    let s = &b.store;
    let ws = [w(WindowKind::Day, 1)];
    let invalid = |r: Result<Consumption, StoreError>| {
        assert!(matches!(r, Err(StoreError::Invalid(_))), "{r:?}")
    };
    invalid(s.consume("m", "k", -1, &ws, T0));
    invalid(s.consume("m", "", 1, &ws, T0));
    invalid(s.consume("", "k", 1, &ws, T0));
    invalid(s.consume("m", "k", 1, &[], T0));
    invalid(s.consume("m", "k", 1, &[ws[0], ws[0]], T0));
    invalid(s.consume("m", "k", 1, &[w(WindowKind::Sliding(0), 1)], T0));
    let e = s
        .exec(Stmt::new("INSERT INTO t VALUES ('x')", vec![]))
        .unwrap_err();
    assert!(
        matches!(e, StoreError::Invalid(ref m) if m.contains("parameters")),
        "{e:?}"
    );
}

const HOSTILE: [&str; 10] = [
    "o'brien@example.com",
    "back\\slash@example.com",
    "100%@example.com",
    "under_score@example.com",
    "hash#tag@example.com",
    "semi;colon@example.com",
    "dash--dash@example.com",
    "nul\0byte@example.com",
    "x' OR '1'='1",
    "\"; DROP TABLE vlv_counter; --",
];

#[test]
fn sql_with_parameters_null_empty_and_hostile_values() {
    both(|b| {
        let s = &b.store;
        let ddl = match s.dialect() {
            valvula_store::Dialect::Sqlite => {
                "CREATE TABLE people (id INTEGER PRIMARY KEY, name TEXT, note TEXT)"
            }
            valvula_store::Dialect::Mysql => {
                "CREATE TABLE people (id INT AUTO_INCREMENT PRIMARY KEY, name VARCHAR(255), note TEXT)"
            }
        };
        s.exec(Stmt::new(ddl, vec![])).unwrap();
        for (i, name) in HOSTILE.iter().enumerate() {
            let note = if i % 2 == 0 {
                Value::Null
            } else {
                Value::Text(String::new())
            };
            let e = s
                .exec(Stmt::new(
                    "INSERT INTO people (name, note) VALUES (?, ?)",
                    vec![Value::Text((*name).into()), note],
                ))
                .unwrap();
            assert_eq!(e.affected, 1);
            assert!(e.last_insert_id > 0, "{}", b.label);
        }
        for (i, name) in HOSTILE.iter().enumerate() {
            let r = s
                .query(Stmt::new(
                    "SELECT name, note FROM people WHERE name = ?",
                    vec![Value::Text((*name).into())],
                ))
                .unwrap();
            assert_eq!(r.columns, vec!["name", "note"]);
            assert_eq!(
                r.rows.len(),
                1,
                "{}: {name:?} matched {} rows",
                b.label,
                r.rows.len()
            );
            assert_eq!(r.rows[0][0], Value::Text((*name).into()), "{}", b.label);
            let want = if i % 2 == 0 {
                Value::Null
            } else {
                Value::Text(String::new())
            };
            assert_eq!(
                r.rows[0][1], want,
                "{}: NULL and empty must differ",
                b.label
            );
        }
        let all = s
            .query(Stmt::new("SELECT COUNT(*) FROM people", vec![]))
            .unwrap();
        assert_eq!(all.rows[0][0], Value::Int(HOSTILE.len() as i64));
        // Hostile keys in counters are keys like any other.
        for k in HOSTILE {
            assert!(
                s.consume("m", k, 1, &[w(WindowKind::Day, 1)], T0)
                    .unwrap()
                    .admitted,
                "{}",
                b.label
            );
            assert!(
                !s.consume("m", k, 1, &[w(WindowKind::Day, 1)], T0)
                    .unwrap()
                    .admitted
            );
        }
        // A batch is all or nothing.
        let r = s.batch(vec![
            Stmt::new(
                "INSERT INTO people (name) VALUES (?)",
                vec![Value::Text("batch".into())],
            ),
            Stmt::new(
                "INSERT INTO no_such_table (name) VALUES (?)",
                vec![Value::Int(1)],
            ),
        ]);
        assert!(matches!(r, Err(StoreError::Sql(_))), "{r:?}");
        let n = s
            .query(Stmt::new(
                "SELECT COUNT(*) FROM people WHERE name = ?",
                vec![Value::Text("batch".into())],
            ))
            .unwrap();
        assert_eq!(
            n.rows[0][0],
            Value::Int(0),
            "{}: half a batch was kept",
            b.label
        );
        let ok = s
            .batch(vec![
                Stmt::new(
                    "INSERT INTO people (name) VALUES (?)",
                    vec![Value::Text("b1".into())],
                ),
                Stmt::new(
                    "UPDATE people SET note = ? WHERE name = ?",
                    vec![Value::Text("n".into()), Value::Text("b1".into())],
                ),
            ])
            .unwrap();
        assert_eq!(
            ok.iter().map(|e| e.affected).collect::<Vec<_>>(),
            vec![1, 1]
        );
    });
}

#[test]
fn sixty_four_threads_on_one_key_admit_exactly_the_limit() {
    both(|b| {
        for (ws, limit) in [
            (vec![w(WindowKind::Day, 100)], 100),
            (
                vec![w(WindowKind::Day, 100), w(WindowKind::Sliding(3600), 80)],
                80,
            ),
        ] {
            let admitted = Arc::new(AtomicI64::new(0));
            let key = format!("hammer-{}", ws.len());
            std::thread::scope(|scope| {
                for _ in 0..64 {
                    let (s, ws, admitted, key) = (&b.store, &ws, admitted.clone(), &key);
                    scope.spawn(move || {
                        for _ in 0..4 {
                            if s.consume("m", key, 1, ws, T0).unwrap().admitted {
                                admitted.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                    });
                }
            });
            assert_eq!(
                admitted.load(Ordering::SeqCst),
                limit,
                "{}: {ws:?}",
                b.label
            );
            let p = b.store.peek("m", &key, 0, &ws, T0).unwrap();
            assert_eq!(
                p.windows.last().unwrap().used,
                limit,
                "{}: stored count differs",
                b.label
            );
        }
    });
}

#[test]
fn consume_once_charges_a_token_once_and_forgets_refusals() {
    both(|b| {
        let s = &b.store;
        let ws = [w(WindowKind::Day, 3)];
        let c = s.consume_once("m", "k", "msg1", 2, &ws, T0).unwrap();
        assert!(c.admitted && !c.repeated, "{}: {c:?}", b.label);
        assert_eq!(used(&c), [2]);
        // Postfix re-sends the same request: admitted, not charged again.
        let c = s.consume_once("m", "k", "msg1", 2, &ws, T0 + 5).unwrap();
        assert!(c.admitted && c.repeated, "{}: {c:?}", b.label);
        assert_eq!(used(&c), [2], "{}", b.label);
        // Another message is charged; a refused one records nothing...
        let c = s.consume_once("m", "k", "msg2", 2, &ws, T0).unwrap();
        assert!(!c.admitted && !c.repeated, "{}: {c:?}", b.label);
        // ... so when it fits later, it is charged.
        let c = s.consume_once("m", "k", "msg2", 1, &ws, T0).unwrap();
        assert!(c.admitted && !c.repeated, "{}: {c:?}", b.label);
        assert_eq!(used(&c), [3]);
        // Tokens are per namespace; plain consume ignores them.
        let c = s.consume_once("other", "k", "msg1", 1, &ws, T0).unwrap();
        assert!(c.admitted && !c.repeated, "{}: {c:?}", b.label);
        // Expired an hour later by the housekeeping (VLV_ONCE_KEEP_SECONDS).
        s.maintain(T0 + 3 * 86_400).unwrap();
        let c = s.consume_once("m", "k", "msg1", 0, &ws, T0).unwrap();
        assert!(!c.repeated, "{}", b.label);
        let c = s
            .consume_once("m", "k2", "msg1", 1, &ws, T0 + 3 * 86_400)
            .unwrap();
        assert!(c.admitted && !c.repeated, "{}: token kept: {c:?}", b.label);
        assert!(matches!(
            s.consume_once("m", "k", "", 1, &ws, T0),
            Err(StoreError::Invalid(_))
        ));
        // A token longer than the column is kept as a digest: still once.
        let long = "t".repeat(3000);
        let c = s.consume_once("m", "k3", &long, 1, &ws, T0).unwrap();
        assert!(c.admitted && !c.repeated, "{}: {c:?}", b.label);
        let c = s.consume_once("m", "k3", &long, 1, &ws, T0).unwrap();
        assert!(
            c.repeated,
            "{}: a long token was charged twice: {c:?}",
            b.label
        );
    });
}

/// The same message sent from many connections at once (and, on MariaDB, through two
/// daemons' stores on one database) is charged exactly once per token.
#[test]
fn consume_once_is_exact_under_concurrency_and_across_daemons() {
    both(|b| {
        let second = second(b);
        let ws = [w(WindowKind::Day, -1), w(WindowKind::Sliding(600), -1)];
        let repeats = Arc::new(AtomicI64::new(0));
        std::thread::scope(|scope| {
            for t in 0..32 {
                let s = match &second {
                    Some(other) if t % 2 == 1 => other,
                    _ => &b.store,
                };
                let repeats = repeats.clone();
                scope.spawn(move || {
                    // 20 messages, each sent by every thread.
                    for m in 0..20 {
                        let c = s
                            .consume_once("m", "sender", &format!("Q{m}"), 1, &ws, T0)
                            .unwrap();
                        assert!(c.admitted);
                        if c.repeated {
                            repeats.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                });
            }
        });
        let p = b.store.peek("m", "sender", 0, &ws, T0).unwrap();
        assert_eq!(used(&p), [20, 20], "{}", b.label);
        assert_eq!(repeats.load(Ordering::SeqCst), 32 * 20 - 20, "{}", b.label);
    });
}

/// exec_once: a conditional write runs once per token; a refused one (no row changed)
/// keeps no token; concurrent callers with one token, through two daemons' stores on
/// MariaDB, run it once.
#[test]
fn exec_once_runs_a_write_once_per_token() {
    both(|b| {
        let s = &b.store;
        s.exec(Stmt::new(
            "CREATE TABLE quota (id INTEGER PRIMARY KEY, used INTEGER NOT NULL)",
            vec![],
        ))
        .unwrap();
        s.exec(Stmt::new(
            "INSERT INTO quota (id, used) VALUES (?, ?)",
            vec![1.into(), 0.into()],
        ))
        .unwrap();
        let charge = |limit: i64| {
            Stmt::new(
                "UPDATE quota SET used = used + 1 WHERE id = ? AND used + 1 <= ?",
                vec![1.into(), limit.into()],
            )
        };
        let once = |token: &str, limit: i64| s.exec_once("m", token, charge(limit), T0).unwrap();
        assert_eq!(once("q1", 2).map(|e| e.affected), Some(1), "{}", b.label);
        assert_eq!(once("q1", 2), None, "{}: a re-send ran again", b.label);
        assert_eq!(once("q2", 2).map(|e| e.affected), Some(1));
        // Refused by its condition: runs, changes nothing, keeps no token...
        assert_eq!(once("q3", 2).map(|e| e.affected), Some(0), "{}", b.label);
        // ... so with room again, the same request is charged.
        assert_eq!(once("q3", 3).map(|e| e.affected), Some(1), "{}", b.label);
        let used = s
            .query(Stmt::new(
                "SELECT used FROM quota WHERE id = ?",
                vec![1.into()],
            ))
            .unwrap();
        assert_eq!(used.rows[0][0], Value::Int(3), "{}", b.label);
        assert!(matches!(
            s.exec_once("m", "t", Stmt::new("SELECT 1", vec![]), T0),
            Err(StoreError::Invalid(_))
        ));
        assert!(matches!(
            s.exec_once("m", "", charge(9), T0),
            Err(StoreError::Invalid(_))
        ));

        // Many callers, ten tokens each sent by all of them.
        let second = second(b);
        std::thread::scope(|scope| {
            for t in 0..24 {
                let st = match &second {
                    Some(other) if t % 2 == 1 => other,
                    _ => &b.store,
                };
                scope.spawn(move || {
                    for m in 0..10 {
                        st.exec_once("m", &format!("msg{m}"), charge(1_000), T0)
                            .unwrap();
                    }
                });
            }
        });
        let used = s
            .query(Stmt::new(
                "SELECT used FROM quota WHERE id = ?",
                vec![1.into()],
            ))
            .unwrap();
        assert_eq!(used.rows[0][0], Value::Int(13), "{}", b.label);
    });
}

fn count(s: &Store, sql: &str) -> i64 {
    match s.query(Stmt::new(sql, vec![])).unwrap().rows[0][0] {
        Value::Int(n) => n,
        ref v => panic!("{sql}: {v:?}"),
    }
}

/// Issue 13, defect 1: a key is request data (a sender Postfix accepts can be 2,000
/// bytes long). Such a key is limited like any other, two long keys that share their
/// first 1,500 bytes are two identities, and no length makes the call fail.
#[test]
fn keys_of_any_length_are_limited_and_counted_apart() {
    both(|b| {
        let s = &b.store;
        let ws = [w(WindowKind::Day, 2), w(WindowKind::Sliding(600), 2)];
        let common = "x".repeat(1500);
        let a = format!("{common}a@example.com");
        let z = format!("{common}z@example.com");
        for key in [&a, &z] {
            for i in 0..2 {
                let c = s.consume("m", key, 1, &ws, T0 + i).unwrap_or_else(|e| {
                    panic!("{}: a {}-byte key failed: {e}", b.label, key.len())
                });
                assert!(c.admitted, "{}: charge {i} refused: {c:?}", b.label);
            }
            let c = s.consume("m", key, 1, &ws, T0 + 2).unwrap();
            assert!(
                !c.admitted,
                "{}: a long key escaped its limit: {c:?}",
                b.label
            );
            assert_eq!(used(&c), [2, 2], "{}", b.label);
        }
        // The stored key is bounded and readable by its start.
        let longest = count(s, "SELECT MAX(LENGTH(ckey)) FROM vlv_counter");
        assert!(longest <= 512, "{}: stored key of {longest} bytes", b.label);
        let removed = s.reset("m", &a).unwrap();
        assert!(
            removed >= 2,
            "{}: reset of a long key removed {removed} rows",
            b.label
        );
        assert!(s.consume("m", &a, 1, &ws, T0 + 3).unwrap().admitted);
        assert!(!s.consume("m", &z, 1, &ws, T0 + 3).unwrap().admitted);
    });
}

/// Issue 13, defect 4: the charges of one request across several keys (a domain's
/// limit and a user's) commit together or not at all, across threads and, on MariaDB,
/// two daemons' stores on one database.
#[test]
fn consume_all_charges_every_key_or_none() {
    both(|b| {
        let s = &b.store;
        let domain = [w(WindowKind::Day, 20)];
        let user = [w(WindowKind::Day, 3)];
        let group = |who: &'static str| {
            [
                Charge {
                    key: "domain:example.com",
                    amount: 1,
                    windows: &domain,
                },
                Charge {
                    key: who,
                    amount: 1,
                    windows: &user,
                },
            ]
        };
        let mut admitted = 0;
        for i in 0..20 {
            let o = s.consume_all("m", None, &group("bob"), T0 + i).unwrap();
            admitted += i64::from(o.admitted);
            if !o.admitted {
                assert!(
                    o.parts[0].admitted && !o.parts[1].admitted,
                    "{}: {o:?}",
                    b.label
                );
            }
        }
        assert_eq!(admitted, 3, "{}", b.label);
        let d = s.peek("m", "domain:example.com", 0, &domain, T0).unwrap();
        assert_eq!(
            used(&d),
            [3],
            "{}: refused requests used up the domain",
            b.label
        );
        // Carol, who has sent nothing, is not refused because of bob.
        let o = s.consume_all("m", None, &group("carol"), T0).unwrap();
        assert!(o.admitted, "{}: {o:?}", b.label);
        // With a token: once, all of it.
        let o = s
            .consume_all("m", Some("msg-1"), &group("dave"), T0)
            .unwrap();
        assert!(o.admitted && !o.repeated, "{}", b.label);
        let o = s
            .consume_all("m", Some("msg-1"), &group("dave"), T0)
            .unwrap();
        assert!(o.admitted && o.repeated, "{}: {o:?}", b.label);
        assert_eq!(used(&o.parts[0]), [5], "{}", b.label);
        assert!(matches!(
            s.consume_all("m", None, &[group("x")[1], group("x")[1]], T0),
            Err(StoreError::Invalid(_))
        ));

        // Many callers: the domain's count is the sum of its users', never above 40.
        let second = second(b);
        let domain = [w(WindowKind::Day, 40)];
        let users = [w(WindowKind::Day, 4)];
        std::thread::scope(|scope| {
            for t in 0..24 {
                let st = match &second {
                    Some(other) if t % 2 == 1 => other,
                    _ => &b.store,
                };
                let (domain, users) = (&domain, &users);
                scope.spawn(move || {
                    for m in 0..10 {
                        let user = format!("u{}", (t * 7 + m) % 16);
                        st.consume_all(
                            "busy",
                            None,
                            &[
                                Charge {
                                    key: "d",
                                    amount: 1,
                                    windows: domain,
                                },
                                Charge {
                                    key: &user,
                                    amount: 1,
                                    windows: users,
                                },
                            ],
                            T0,
                        )
                        .unwrap();
                    }
                });
            }
        });
        let d = s.peek("busy", "d", 0, &domain, T0).unwrap().windows[0].used;
        let per_user: i64 = (0..16)
            .map(|u| {
                s.peek("busy", &format!("u{u}"), 0, &users, T0)
                    .unwrap()
                    .windows[0]
                    .used
            })
            .sum();
        assert_eq!(d, per_user, "{}: domain {d} != users {per_user}", b.label);
        assert!(d <= 40, "{}: domain admitted {d} of 40", b.label);
        assert!(d >= 40, "{}: 240 requests admitted only {d} of 40", b.label);
    });
}

/// Issue 13, defect 10: what serves no purpose any more is deleted, in transactions of
/// at most EXPIRE_BATCH rows: calendar rows of past periods, expired buckets, sliding
/// heads, and tokens older than VLV_ONCE_KEEP_SECONDS. What still counts stays.
#[test]
fn maintenance_deletes_what_no_longer_counts() {
    both(|b| {
        let s = &b.store;
        let n = 1_300;
        let hour = [w(WindowKind::Hour, -1), w(WindowKind::Sliding(60), -1)];
        for i in 0..n {
            s.consume_once("m", &format!("id{i}"), &format!("t{i}"), 1, &hour, T0)
                .unwrap();
        }
        // One identity still active two hours later.
        s.consume_once("m", "id0", "late", 1, &hour, T0 + 7200)
            .unwrap();
        let later = T0 + 7200 + 1;
        let deleted = s.maintain(later).unwrap();
        let counters = count(s, "SELECT COUNT(*) FROM vlv_counter");
        let tokens = count(s, "SELECT COUNT(*) FROM vlv_once");
        let buckets = count(s, "SELECT COUNT(*) FROM vlv_slide");
        // id0's hour row and (MariaDB) its sliding head; its bucket; its late token.
        let heads = if b.label == "mysql" { 1 } else { 0 };
        assert_eq!(
            (counters, buckets, tokens),
            (1 + heads, 1, 1),
            "{}: rows left after maintenance ({deleted} deleted)",
            b.label
        );
        let c = s.peek("m", "id0", 0, &hour, later).unwrap();
        assert_eq!(used(&c), [1, 1], "{}: an active count was lost", b.label);
        // Every identity's hour row but id0's, every bucket of T0, every token of T0.
        assert!(
            deleted >= 3 * n as u64 - 1,
            "{}: {deleted} deleted",
            b.label
        );
    });
}

/// Issue 13, defect 3: the calendar zone is recorded in the database by the first
/// daemon; a daemon configured with another calendar is refused (clearly), one with the
/// same calendar under another name is accepted.
#[test]
fn a_daemon_with_another_calendar_zone_is_refused() {
    both(|b| {
        let tokyo = Zone::parse("Asia/Tokyo").unwrap();
        let open_with = |zone: Zone| reopen(b, zone);
        // The bench's store (UTC) recorded the zone.
        let same = open_with(Zone::parse("Etc/UTC").unwrap());
        same.ping()
            .unwrap_or_else(|e| panic!("{}: Etc/UTC is UTC's calendar: {e}", b.label));
        let other = open_with(tokyo);
        let e = other.ping().unwrap_err();
        assert!(
            matches!(&e, StoreError::Refused(m) if m.contains("\"UTC\"") && m.contains("Asia/Tokyo") && m.contains("vlv_meta")),
            "{}: {e:?}",
            b.label
        );
        let e = other
            .consume("m", "k", 1, &[w(WindowKind::Day, 5)], T0)
            .unwrap_err();
        assert!(matches!(e, StoreError::Refused(_)), "{}: {e:?}", b.label);
    });
}

/// A day window with a limit of 10, and one unit of key `k` charged against it.
const DAY_OF_10: [Window; 1] = [Window {
    kind: WindowKind::Day,
    limit: 10,
}];

fn one_charge(day: &[Window]) -> [Charge<'_>; 1] {
    [Charge {
        key: "k",
        amount: 1,
        windows: day,
    }]
}

/// A write after a charge that meets a deadlock (InnoDB rolls the whole transaction
/// back, charge and token with it) must fail the charge or retry it, never answer it
/// as admitted. The deadlock is raised by a trigger, as InnoDB raises it (error 1213).
#[test]
fn a_deadlock_in_a_write_after_a_charge_never_answers_a_lost_charge() {
    let b = open(true);
    let db = b._db.as_ref().expect("mysql");
    db.sql("CREATE TABLE t (id INT PRIMARY KEY)");
    db.sql(
        "CREATE TRIGGER t_deadlock BEFORE INSERT ON t FOR EACH ROW \
         SIGNAL SQLSTATE '40001' SET MYSQL_ERRNO = 1213, MESSAGE_TEXT = 'Deadlock found when trying to get lock'",
    );
    let day = DAY_OF_10;
    let c = one_charge(&day);
    let now = valvula_store::Clock::system().now();
    let started = std::time::Instant::now();
    let r = b._rt.block_on(b.store.consume_all_async(
        "ns",
        Some("tok"),
        &c,
        false,
        now,
        vec![Stmt::new("INSERT INTO t (id) VALUES (1)", vec![])],
    ));
    let took = started.elapsed();
    assert!(
        r.is_err(),
        "{}: a charge whose transaction a deadlock ended was answered: {r:?}",
        b.label
    );
    // A deadlock that never clears is retried for a bounded time (about 0.6 s), not
    // for the whole storage timeout (10 s here): every request of the batch waits.
    assert!(
        took < std::time::Duration::from_secs(5),
        "{}: a deadlock that never clears held the charge {took:?}",
        b.label
    );
    let peek = b.store.peek("ns", "k", 1, &day, now).unwrap();
    assert_eq!(
        peek.windows[0].used, 0,
        "{}: nothing charged for a failed request: {peek:?}",
        b.label
    );
}

/// The same on SQLite: a write after a charge that ends the transaction (an OR
/// ROLLBACK conflict) fails the charge, and no later write of it is kept on its own
/// (it would have autocommitted). One that fails alone leaves the charge standing.
#[test]
fn a_write_that_ends_the_transaction_fails_the_charge_on_sqlite() {
    let b = open(false);
    b.store
        .exec(Stmt::new("CREATE TABLE t (id INTEGER PRIMARY KEY)", vec![]))
        .unwrap();
    b.store
        .exec(Stmt::new("INSERT INTO t (id) VALUES (1)", vec![]))
        .unwrap();
    let now = valvula_store::Clock::system().now();
    let day = DAY_OF_10;
    let c = one_charge(&day);
    let charge = |then: &[&str]| {
        b._rt.block_on(b.store.consume_all_async(
            "ns",
            None,
            &c,
            false,
            now,
            then.iter().map(|t| Stmt::new(*t, vec![])).collect(),
        ))
    };
    let r = charge(&[
        "INSERT OR ROLLBACK INTO t (id) VALUES (1)",
        "INSERT INTO t (id) VALUES (2)",
    ]);
    assert!(r.is_err(), "a rolled-back charge was answered: {r:?}");
    let after = b
        .store
        .query(Stmt::new("SELECT COUNT(*) FROM t WHERE id = 2", vec![]))
        .unwrap();
    assert_eq!(
        after.rows[0][0],
        Value::Int(0),
        "a write after the rollback was kept on its own"
    );
    let o = charge(&["INSERT INTO t (id) VALUES (1)"]).expect("the charge itself is fine");
    assert!(o.admitted, "{o:?}");
    assert!(
        o.then[0].is_err(),
        "the duplicate failed on its own: {:?}",
        o.then
    );
    assert_eq!(
        o.parts[0].windows[0].used, 1,
        "only the second charge stands: {o:?}"
    );
}
