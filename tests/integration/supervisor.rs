//! Master and worker: a module that crashes the worker (a real C module dereferencing
//! NULL, or calling abort) never takes the policy service down; the master names the
//! module, restarts the worker at once on the same sockets, and disables a module that
//! keeps crashing until the next reload. The worker never outlives the master.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use valvula_tests::client::{Answer, Client, postfix_request};
use valvula_tests::daemon::Proc;
use valvula_tests::{cc_shared, fixture, module_path, module_tempdir, valvulad_bin};

/// Two listeners: `crashy` runs the crashing C module, `healthy` runs mod-test.
fn config(so: &std::path::Path, extra: &str) -> String {
    format!(
        "[server]\nmodules = [{:?}, {:?}]\nmodule_timeout = \"3s\"\ncrash_limit = 3\n\
         crash_window = \"10m\"\n{extra}\
         [log]\nlevel = \"info\"\n\
         [[listener]]\nname = \"crashy\"\naddress = \"127.0.0.1:0\"\nmodules = [\"crash\"]\non_error = \"defer\"\n\
         [[listener]]\nname = \"healthy\"\naddress = \"127.0.0.1:0\"\nmodules = [\"mod-test\"]\n",
        so.display().to_string(),
        module_path("mod_test").display().to_string(),
    )
}

fn sender(s: &str) -> Vec<u8> {
    postfix_request(&[("sender", s)])
}

/// The listeners' addresses from the first worker's "listening" lines: crashy, healthy.
fn listeners(p: &Proc) -> (String, String) {
    let log = p.log();
    let find = |name: &str| {
        log.lines()
            .find(|l| l.contains(" listening ") && l.contains(&format!("listener={name}")))
            .and_then(|l| l.split("address=").nth(1))
            .and_then(|a| a.split_whitespace().next())
            .unwrap_or_else(|| panic!("no listening line for {name}:\n{log}"))
            .to_owned()
    };
    (find("crashy"), find("healthy"))
}

/// Asks `addr` on a new connection until it answers (the connection may meet a worker
/// that is dying); returns the answer and how long it took.
async fn answer_soon(addr: &str, req: &[u8], within: Duration) -> (String, Duration) {
    let t = Instant::now();
    let mut last = String::new();
    while t.elapsed() < within {
        let mut c = Client::connect(addr).await;
        c.send(req).await;
        match c.answer(Duration::from_secs(5)).await {
            Answer::Reply(r) => return (r, t.elapsed()),
            other => last = format!("{other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{addr} gave no answer within {within:?} (last: {last})");
}

/// The crash: the request that crashes the worker gets no answer, its connection
/// closes.
async fn crash_it(addr: &str, who: &str) {
    let mut c = Client::connect(addr).await;
    c.send(&sender(who)).await;
    let a = c.answer(Duration::from_secs(10)).await;
    assert!(
        matches!(a, Answer::Closed(_)),
        "the crashing request got {a:?}"
    );
}

/// A crash by `who` on `crashy`, then both listeners answering again: returns how
/// long after the crash the healthy listener answered.
async fn crash_and_recover(crashy: &str, healthy: &str, who: &str, p: &Proc) -> Duration {
    crash_it(crashy, who).await;
    let crashed = Instant::now();
    let (a, _) = answer_soon(healthy, &sender("bob@example.com"), Duration::from_secs(10)).await;
    assert_eq!(a, "action=dunno\n\n", "the healthy listener after a crash");
    let took = crashed.elapsed();
    let (a, _) = answer_soon(
        crashy,
        &sender("alice@example.com"),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        a,
        "action=ok crash-module\n\n",
        "the module runs again after a crash:\n{}",
        p.log()
    );
    took
}

fn status(p: &Proc) -> serde_json::Value {
    let o = std::process::Command::new(valvulad_bin())
        .arg("-c")
        .arg(&p.config_path)
        .arg("--status")
        .output()
        .expect("valvulad --status");
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("status {text:?}: {e}"))
}

fn module_status<'a>(s: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    s["modules"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == name))
        .unwrap_or_else(|| panic!("no module {name} in {s}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_that_segfaults_on_one_sender_never_takes_the_service_down() {
    let dir = module_tempdir();
    let so = dir.path().join("crash.so");
    cc_shared(&[&fixture("c/crash.c")], &so, &[]);
    let mut p = Proc::start(&config(&so, ""), &[]);
    let (crashy, healthy) = listeners(&p);
    let first_worker = p.worker_pid();
    assert_eq!(
        answer_soon(
            &crashy,
            &sender("alice@example.com"),
            Duration::from_secs(5)
        )
        .await
        .0,
        "action=ok crash-module\n\n"
    );
    // An open connection of the healthy listener: it dies with the worker (Postfix
    // reconnects); new connections are what must be answered at once.
    let mut kept = Client::connect(&healthy).await;
    assert_eq!(
        kept.ask(&sender("bob@example.com")).await,
        "action=dunno\n\n"
    );

    let took = crash_and_recover(&crashy, &healthy, "crash@example.com", &p).await;
    assert!(
        took < Duration::from_secs(1),
        "the healthy listener answered {took:?} after the crash (within 1 s wanted):\n{}",
        p.log()
    );
    assert!(
        p.wait_for_log(
            "died of SIGSEGV in module crash (process)",
            Duration::from_secs(5)
        ),
        "the master's log names the signal, module and hook:\n{}",
        p.log()
    );
    assert_ne!(p.worker_pid(), first_worker, "a new worker");
    assert!(p.child.try_wait().unwrap().is_none(), "the master runs on");
    let s = status(&p);
    assert_eq!(s["worker_restarts"], 1, "{s}");
    assert!(module_status(&s, "crash")["disabled"].is_null(), "{s}");

    // Two more crashes within the window (one by abort): the third disables it.
    crash_it(&crashy, "abort@example.com").await;
    assert!(
        p.wait_for_log(
            "died of SIGABRT in module crash (process)",
            Duration::from_secs(10)
        ),
        "{}",
        p.log()
    );
    let _ = answer_soon(
        &healthy,
        &sender("bob@example.com"),
        Duration::from_secs(10),
    )
    .await;
    crash_it(&crashy, "crash@example.com").await;
    assert!(
        p.wait_for_log("module crash disabled", Duration::from_secs(10)),
        "{}",
        p.log()
    );
    // Disabled: its requests get the listener's on-error action, the crashing sender's
    // too (the module is not called); the other listener is not affected.
    for who in ["alice@example.com", "crash@example.com"] {
        let (a, _) = answer_soon(&crashy, &sender(who), Duration::from_secs(10)).await;
        assert_eq!(
            a,
            "action=defer Policy service error, try again later\n\n",
            "{who} while the module is disabled:\n{}",
            p.log()
        );
    }
    let (a, _) = answer_soon(&healthy, &sender("bob@example.com"), Duration::from_secs(5)).await;
    assert_eq!(a, "action=dunno\n\n");
    let s = status(&p);
    let why = module_status(&s, "crash")["disabled"]
        .as_str()
        .unwrap_or_default();
    assert!(
        why.contains("3 times"),
        "status says why it is disabled: {s}"
    );
    assert_eq!(s["worker_restarts"], 3, "{s}");
    assert!(
        p.log().contains("module crash started DISABLED"),
        "the worker says so too:\n{}",
        p.log()
    );
    let o = std::process::Command::new(valvula_tests::ctl_bin())
        .arg("--config")
        .arg(&p.config_path)
        .arg("status")
        .output()
        .expect("valvula-ctl status");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("worker restarted 3 times")
            && out.contains("Module: crash 1 DISABLED (crashed the worker 3 times"),
        "valvula-ctl status shows it:\n{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // A reload enables it again, in the running worker.
    let worker = p.worker_pid();
    p.signal(Signal::SIGHUP);
    assert!(p.wait_for_log("configuration reloaded", Duration::from_secs(10)));
    let (a, _) = answer_soon(
        &crashy,
        &sender("alice@example.com"),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(a, "action=ok crash-module\n\n", "{}", p.log());
    assert_eq!(p.worker_pid(), worker, "a reload restarts nothing");
    assert!(module_status(&status(&p), "crash")["disabled"].is_null());
    // The count starts again: one crash does not disable it.
    crash_and_recover(&crashy, &healthy, "crash@example.com", &p).await;

    p.signal(Signal::SIGTERM);
    let st = p.wait_exit(Duration::from_secs(30));
    assert!(
        st.success(),
        "SIGTERM stops master and worker: {st}\n{}",
        p.log()
    );
    assert!(p.log().contains("valvulad stopped"), "{}", p.log());
}

/// A worker killed from outside is restarted and said to be; a master killed takes
/// its worker along (no orphan keeps the sockets or the database).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_is_restarted_when_killed_and_never_outlives_the_master() {
    let dir = module_tempdir();
    let so = dir.path().join("crash.so");
    cc_shared(&[&fixture("c/crash.c")], &so, &[]);
    let mut p = Proc::start(&config(&so, ""), &[]);
    let (_, healthy) = listeners(&p);
    let w = p.worker_pid();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(w as i32), Signal::SIGKILL).unwrap();
    let (a, took) = answer_soon(
        &healthy,
        &sender("bob@example.com"),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(a, "action=dunno\n\n");
    assert!(
        p.wait_for_log("killed by SIGKILL", Duration::from_secs(5)),
        "{took:?}\n{}",
        p.log()
    );
    let w2 = p.worker_pid();
    assert_ne!(w, w2);

    p.signal(Signal::SIGKILL);
    let _ = p.wait_exit(Duration::from_secs(10));
    let end = Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{w2}")).exists()
        && !std::fs::read_to_string(format!("/proc/{w2}/stat"))
            .unwrap_or_default()
            .contains(") Z")
    {
        assert!(
            Instant::now() < end,
            "the worker {w2} outlived its master by 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Nobody answers on the port any more.
    assert!(
        tokio::net::TcpStream::connect(&healthy).await.is_err(),
        "{healthy} still accepts connections"
    );
}

/// `--single-process` serves without a master: what debuggers and valgrind need.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_process_serves_without_a_master() {
    let dir = module_tempdir();
    let so = dir.path().join("crash.so");
    cc_shared(&[&fixture("c/crash.c")], &so, &[]);
    let mut p = Proc::start(&config(&so, ""), &["--single-process"]);
    assert_eq!(p.worker_pid(), p.child.id());
    let (_, healthy) = listeners(&p);
    let (a, _) = answer_soon(&healthy, &sender("bob@example.com"), Duration::from_secs(5)).await;
    assert_eq!(a, "action=dunno\n\n");
    p.signal(Signal::SIGTERM);
    assert!(
        p.wait_exit(Duration::from_secs(20)).success(),
        "{}",
        p.log()
    );
}

/// systemd hears READY=1 from the master (its MAINPID), once the worker serves; and
/// not again when a worker is restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_readiness_comes_from_the_master_once_the_worker_serves() {
    let dir = module_tempdir();
    let so = dir.path().join("crash.so");
    cc_shared(&[&fixture("c/crash.c")], &so, &[]);
    let sock_dir = tempfile::tempdir().unwrap();
    let sock_path = sock_dir.path().join("notify");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let p = Proc::spawn_env(
        &config(&so, ""),
        &[],
        &[("NOTIFY_SOCKET", &sock_path.display().to_string())],
    );
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).expect("no READY=1 from valvulad");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(
        msg.contains("READY=1") && msg.contains(&format!("MAINPID={}\n", p.child.id())),
        "{msg:?}: READY=1 with the master's pid {} wanted",
        p.child.id()
    );
    assert!(
        p.log().contains("valvulad ready"),
        "READY=1 before the worker served:\n{}",
        p.log()
    );
    let (crashy, healthy) = listeners(&p);
    crash_it(&crashy, "crash@example.com").await;
    let _ = answer_soon(
        &healthy,
        &sender("bob@example.com"),
        Duration::from_secs(10),
    )
    .await;
    assert!(p.wait_for_count("worker ready", 2, Duration::from_secs(10)));
    sock.set_nonblocking(true).unwrap();
    assert!(
        sock.recv(&mut buf).is_err(),
        "a second READY=1 after a restart"
    );
}

/// A module that crashes in its init, from the very first start: the service starts
/// all the same, with that module disabled once it reached the crash limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_that_crashes_in_init_is_disabled_and_the_service_starts() {
    let dir = module_tempdir();
    let so = dir.path().join("crash.so");
    cc_shared(&[&fixture("c/crash.c")], &so, &["CRASH_IN_INIT"]);
    let p = Proc::start(&config(&so, ""), &[]);
    let (crashy, healthy) = listeners(&p);
    assert!(
        p.log().contains("died of SIGSEGV in module crash (init)")
            && p.log().contains("module crash started DISABLED"),
        "{}",
        p.log()
    );
    let (a, _) = answer_soon(&healthy, &sender("bob@example.com"), Duration::from_secs(5)).await;
    assert_eq!(a, "action=dunno\n\n");
    let (a, _) = answer_soon(&crashy, &sender("bob@example.com"), Duration::from_secs(5)).await;
    assert_eq!(a, "action=defer Policy service error, try again later\n\n");
}

/// A worker started after a crash runs the configuration the dead one ran, not the file
/// as it is now: an edit waiting for SIGHUP (here a broken file, then a renamed
/// listener) must not take the listeners down with the crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_after_a_crash_is_not_a_reload() {
    let dir = module_tempdir();
    let so = dir.path().join("crash.so");
    cc_shared(&[&fixture("c/crash.c")], &so, &[]);
    let p = Proc::start(&config(&so, ""), &[]);
    let (crashy, healthy) = listeners(&p);
    let good = std::fs::read_to_string(&p.config_path).unwrap();
    for (what, edited) in [
        (
            "a broken file",
            good.replace("[[listener]]", "[[listener]]\naddress = 5\n"),
        ),
        (
            "a renamed listener",
            good.replace("name = \"healthy\"", "name = \"healthy2\""),
        ),
    ] {
        std::fs::write(&p.config_path, &edited).unwrap();
        let took = crash_and_recover(&crashy, &healthy, "crash@example.com", &p).await;
        assert!(
            took < Duration::from_secs(2),
            "after a crash with {what} on disk the healthy listener took {took:?}:\n{}",
            p.log()
        );
    }
    std::fs::write(&p.config_path, &good).unwrap();
}

/// Descriptors the worker inherited from the master (the listening sockets, its link
/// to the master) are close-on-exec again: a program a module starts must not hold the
/// ports open after valvulad is gone.
#[test]
fn a_workers_sockets_are_close_on_exec() {
    let dir = module_tempdir();
    let so = dir.path().join("crash.so");
    cc_shared(&[&fixture("c/crash.c")], &so, &[]);
    let p = Proc::start(&config(&so, ""), &[]);
    let w = p.worker_pid();
    let mut sockets = 0;
    for e in std::fs::read_dir(format!("/proc/{w}/fd"))
        .unwrap()
        .flatten()
    {
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        if !target.to_string_lossy().starts_with("socket:") {
            continue;
        }
        sockets += 1;
        let n = e.file_name().to_string_lossy().into_owned();
        let info = std::fs::read_to_string(format!("/proc/{w}/fdinfo/{n}")).unwrap();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
            .expect("flags");
        assert!(
            flags & 0o2_000_000 != 0,
            "socket descriptor {n} of the worker is inherited by the programs it starts ({info})"
        );
    }
    assert!(sockets >= 3, "the worker's sockets: {sockets}");
}

/// SIGTERM: while a request finishes, new clients are refused at once (the master
/// and the worker close their copies of the listening sockets first), not left
/// waiting in a queue nobody reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_refuses_new_clients_at_once() {
    let dir = module_tempdir();
    let hang = dir.path().join("hang.so");
    cc_shared(&[&fixture("c/hang.c")], &hang, &[]);
    let mut p = Proc::start(
        &format!(
            "[server]\nmodules = [{:?}]\nmodule_timeout = \"20s\"\nshutdown_grace = \"3s\"\n\
             [[listener]]\nname = \"h\"\naddress = \"127.0.0.1:0\"\nmodules = [\"hang\"]\n\
             [[listener]]\nname = \"other\"\naddress = \"127.0.0.1:0\"\n",
            hang.display().to_string()
        ),
        &[],
    );
    let addrs = p.addrs();
    let mut busy = Client::connect(&addrs[0]).await;
    busy.send(&postfix_request(&[("x_hang", "1")])).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    p.signal(Signal::SIGTERM);
    assert!(p.wait_for_log("shutting down", Duration::from_secs(5)));
    let t = Instant::now();
    let mut refused = false;
    while t.elapsed() < Duration::from_secs(2) {
        if tokio::net::TcpStream::connect(&addrs[1]).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        refused,
        "a new client was not refused while the daemon stopped:\n{}",
        p.log()
    );
    let _ = p.wait_exit(Duration::from_secs(30));
}

/// A crash on a thread the module started itself (in no hook) is blamed on the module
/// whose code faulted, counted, and the module disabled like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_on_a_modules_own_thread_is_blamed_on_it() {
    let dir = module_tempdir();
    let so = dir.path().join("crash.so");
    cc_shared(&[&fixture("c/crash.c")], &so, &["CRASH_IN_THREAD"]);
    let p = Proc::spawn(&config(&so, ""), &[]);
    assert!(
        p.wait_for_log("module crash started DISABLED", Duration::from_secs(30)),
        "{}",
        p.log()
    );
    assert!(
        p.log().contains("died of SIGSEGV in module crash (thread)"),
        "{}",
        p.log()
    );
    let (crashy, healthy) = listeners(&p);
    let (a, _) = answer_soon(
        &healthy,
        &sender("bob@example.com"),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(a, "action=dunno\n\n");
    let (a, _) = answer_soon(&crashy, &sender("bob@example.com"), Duration::from_secs(10)).await;
    assert_eq!(a, "action=defer Policy service error, try again later\n\n");
}

/// A process_poll that never returns holds an event-loop thread nothing can stop: the
/// watchdog ends the worker as a crash in that poll (the module timeout and a second
/// later), the master starts a new one, and the crash counts against the module.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poll_that_never_returns_ends_the_worker_not_the_service() {
    let dir = module_tempdir();
    let so = dir.path().join("async_counter.so");
    cc_shared(&[&fixture("c/async_counter.c")], &so, &[]);
    let p = Proc::start(
        &format!(
            "[server]\nmodules = [{:?}]\nmodule_timeout = \"500ms\"\n\
             [[listener]]\nname = \"poll\"\naddress = \"127.0.0.1:0\"\nmodules = [\"async-counter\"]\n\
             [[listener]]\nname = \"other\"\naddress = \"127.0.0.1:0\"\n",
            so.display().to_string()
        ),
        &[],
    );
    let addrs = p.addrs();
    let t = Instant::now();
    let mut c = Client::connect(&addrs[0]).await;
    c.send(&postfix_request(&[
        ("sender", "hang@x"),
        ("instance", "h1"),
    ]))
    .await;
    let a = c.answer(Duration::from_secs(20)).await;
    assert!(matches!(a, Answer::Closed(_)), "the hung request got {a:?}");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "the worker was ended after {:?}",
        t.elapsed()
    );
    assert!(
        p.wait_for_log(
            "died of SIGABRT in module async-counter (process_poll)",
            Duration::from_secs(10)
        ),
        "{}",
        p.log()
    );
    assert!(
        p.log()
            .contains("process_poll of module async-counter has run for over 1500 ms")
    );
    let (a, _) = answer_soon(&addrs[1], &postfix_request(&[]), Duration::from_secs(10)).await;
    assert_eq!(a, "action=dunno\n\n");
    let (a, _) = answer_soon(
        &addrs[0],
        &postfix_request(&[("sender", "a@x"), ("instance", "a1")]),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        a,
        "action=dunno\n\n",
        "the module serves again:\n{}",
        p.log()
    );
}
