//! valvulad as a process: the command line, exit codes, SIGHUP reload, graceful SIGTERM.

use std::time::Duration;

use nix::sys::signal::Signal;
use valvula_tests::client::{Answer, Client, postfix_request};
use valvula_tests::daemon::Proc;
use valvula_tests::{module_path, valvulad_bin};

fn base(chain: &str, extra: &str) -> String {
    format!(
        "[server]\nmodule_dirs = [{:?}]\nmodule_timeout = \"3s\"\nshutdown_grace = \"5s\"\n\
         [log]\nlevel = \"info\"\n\
         [[listener]]\nname = \"main\"\naddress = \"127.0.0.1:0\"\nmodules = [{chain}]\n{extra}",
        module_path("mod_test")
            .parent()
            .unwrap()
            .display()
            .to_string()
    )
}

#[test]
fn check_mode_validates_and_exits() {
    let mut p = Proc::spawn(&base("\"mod-test\"", ""), &["-t"]);
    let s = p.wait_exit(Duration::from_secs(20));
    assert!(s.success(), "{}", p.log());
    assert!(
        p.log().contains("is valid: 1 listener(s), 1 module(s)"),
        "{}",
        p.log()
    );

    // Every config error, each with its key, and exit status 1.
    let bad = "[server]\nmodule_timeout = \"later\"\n[[listener]]\naddress = \"nowhere:x\"\non_error = \"boom\"\n";
    let mut p = Proc::spawn(bad, &["-t"]);
    let s = p.wait_exit(Duration::from_secs(20));
    assert_eq!(s.code(), Some(1));
    let log = p.log();
    for key in [
        "server.module_timeout:",
        "listener[0].address:",
        "listener[0].on_error:",
        "3 errors",
    ] {
        assert!(log.contains(key), "{key} missing from:\n{log}");
    }

    // A chain naming a module that is not there, and a module whose init fails.
    let mut p = Proc::spawn(&base("\"mod-nothing\"", ""), &["-t"]);
    assert_eq!(p.wait_exit(Duration::from_secs(20)).code(), Some(1));
    assert!(p.log().contains("mod-nothing"), "{}", p.log());
    let mut p = Proc::spawn(
        &base("\"mod-test\"", "[module.mod-test]\nfail_init = true\n"),
        &["-t"],
    );
    assert_eq!(p.wait_exit(Duration::from_secs(20)).code(), Some(1));
    assert!(p.log().contains("failed to initialise"), "{}", p.log());
    // With the packaged `[log] target = "syslog"`, -t still tells the operator at the
    // terminal why a module refused its settings.
    let syslog = base("\"mod-ratelimit\"", "").replace(
        "[log]\n",
        "[log]\ntarget = \"syslog\"\nsyslog_socket = \"/nonexistent/log\"\n",
    ) + "[[module.mod-ratelimit.policy]]\nname = \"u\"\nkey = \"sasl_usr\"\n\
           metric = \"messages\"\ndefault = { limits = [[\"hour\", 3]] }\n";
    let mut p = Proc::spawn(&syslog, &["-t"]);
    assert_eq!(p.wait_exit(Duration::from_secs(20)).code(), Some(1));
    assert!(
        p.log().contains("sasl_usr"),
        "-t with syslog logging did not say why:\n{}",
        p.log()
    );

    // Usage errors exit 2; -v prints the version.
    let o = std::process::Command::new(valvulad_bin())
        .arg("--nonsense")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let o = std::process::Command::new(valvulad_bin())
        .arg("-v")
        .output()
        .unwrap();
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[tokio::test]
async fn sighup_reloads_without_dropping_connections() {
    let p = Proc::start(&base("", ""), &[]);
    let addr = p.addrs()[0].clone();
    let mut c = Client::connect(&addr).await;
    assert_eq!(c.ask(&postfix_request(&[])).await, "action=dunno\n\n");

    // New chain on the same listener, a module section, and a second listener.
    let new = base(
        "\"mod-test\"",
        "[module.mod-test]\naction = \"reject\"\ntext = \"reloaded\"\n\
         [[listener]]\nname = \"second\"\naddress = \"127.0.0.1:0\"\nmodules = []\n",
    );
    p.rewrite_config(&new);
    p.signal(Signal::SIGHUP);
    assert!(
        p.wait_for_log("configuration reloaded", Duration::from_secs(10)),
        "{}",
        p.log()
    );
    // The open connection survived and now runs the new chain.
    assert_eq!(
        c.ask(&postfix_request(&[])).await,
        "action=reject reloaded\n\n"
    );
    let second = p.addrs().last().unwrap().clone();
    assert_ne!(second, addr);
    let mut c2 = Client::connect(&second).await;
    assert_eq!(c2.ask(&postfix_request(&[])).await, "action=dunno\n\n");

    // reconf: a changed module section reaches the loaded module.
    p.rewrite_config(&new.replace("text = \"reloaded\"", "text = \"again\""));
    p.signal(Signal::SIGHUP);
    assert!(
        p.wait_for_count("configuration reloaded", 2, Duration::from_secs(10)),
        "{}",
        p.log()
    );
    assert_eq!(
        c.ask(&postfix_request(&[])).await,
        "action=reject again\n\n"
    );

    // Removing the second listener: it stops accepting, the first one serves on.
    p.rewrite_config(&base(
        "\"mod-test\"",
        "[module.mod-test]\naction = \"reject\"\ntext = \"again\"\n",
    ));
    p.signal(Signal::SIGHUP);
    assert!(
        p.wait_for_count("configuration reloaded", 3, Duration::from_secs(10)),
        "{}",
        p.log()
    );
    assert!(p.wait_for_log("listener removed", Duration::from_secs(5)));
    assert!(
        tokio::net::TcpStream::connect(&second).await.is_err(),
        "removed listener still accepts"
    );
    assert_eq!(
        c.ask(&postfix_request(&[])).await,
        "action=reject again\n\n"
    );

    // A broken config is refused and the running one stays.
    p.rewrite_config("[[listener]]\naddress = 5\n");
    p.signal(Signal::SIGHUP);
    assert!(
        p.wait_for_log("reload refused", Duration::from_secs(10)),
        "{}",
        p.log()
    );
    assert_eq!(
        c.ask(&postfix_request(&[])).await,
        "action=reject again\n\n"
    );
}

/// A reload whose new listener cannot open changes nothing: the modules keep their
/// sections (reconf used to run before the binds, so a failed reload left them on the
/// new settings while the listeners stayed on the old configuration).
#[tokio::test]
async fn a_reload_that_cannot_bind_leaves_the_modules_as_they_were() {
    let p = Proc::start(
        &base(
            "\"mod-test\"",
            "[module.mod-test]\naction = \"reject\"\ntext = \"before\"\n",
        ),
        &[],
    );
    let addr = p.addrs()[0].clone();
    let mut c = Client::connect(&addr).await;
    assert_eq!(
        c.ask(&postfix_request(&[])).await,
        "action=reject before\n\n"
    );
    // A port another socket holds: the new listener cannot bind.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_at = taken.local_addr().unwrap();
    // ...and a module timeout the reload would shorten to 1 s.
    p.rewrite_config(
        &base(
            "\"mod-test\"",
            &format!(
                "[module.mod-test]\naction = \"reject\"\ntext = \"after\"\n\
                 [[listener]]\nname = \"second\"\naddress = \"{taken_at}\"\nmodules = []\n"
            ),
        )
        .replace("module_timeout = \"3s\"", "module_timeout = \"1s\""),
    );
    p.signal(Signal::SIGHUP);
    assert!(
        p.wait_for_log("reload refused", Duration::from_secs(10)),
        "the reload was not refused:\n{}",
        p.log()
    );
    assert_eq!(
        c.ask(&postfix_request(&[])).await,
        "action=reject before\n\n",
        "the module took the section of a refused reload:\n{}",
        p.log()
    );
    // The module timeout is still 3 s: a call of 1.5 s is answered, not timed out.
    assert_eq!(
        c.ask(&postfix_request(&[("x_test_sleep_ms", "1500")]))
            .await,
        "action=reject before\n\n",
        "the refused reload's module timeout applied:\n{}",
        p.log()
    );
    drop(taken);
}

/// A reload refused because one module is missing closes the modules it had already
/// loaded for it, instead of leaving them initialised and unreachable.
#[test]
fn a_refused_reload_closes_the_modules_it_loaded() {
    let p = Proc::start(&base("", ""), &[]);
    p.rewrite_config(&base("\"mod-test\", \"no-such-module\"", ""));
    p.signal(Signal::SIGHUP);
    assert!(
        p.wait_for_log("reload refused", Duration::from_secs(10)),
        "the reload was not refused:\n{}",
        p.log()
    );
    assert!(
        p.wait_for_log("mod-test closed", Duration::from_secs(10)),
        "the module loaded for the refused reload was not closed:\n{}",
        p.log()
    );
}

#[tokio::test]
async fn sigterm_finishes_requests_in_flight_then_exits_zero() {
    let mut p = Proc::start(&base("\"mod-test\"", ""), &[]);
    let addr = p.addrs()[0].clone();
    let mut idle = Client::connect(&addr).await;
    assert_eq!(idle.ask(&postfix_request(&[])).await, "action=dunno\n\n");
    let mut busy = Client::connect(&addr).await;
    busy.send(&postfix_request(&[
        ("x_test_sleep_ms", "800"),
        ("x_test_action", "ok"),
    ]))
    .await;
    // Signal once the module is running the request (its second call).
    let sock = p.dir.path().join("admin.sock");
    let t = std::time::Instant::now();
    let mut last = String::new();
    while !last.contains("\"calls\":2") {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the request never reached the module; status: {last}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
        last = admin_status(&sock);
    }
    p.signal(Signal::SIGTERM);
    // The request in flight is answered; the idle connection is closed.
    let got = busy.answer(Duration::from_secs(20)).await;
    assert_eq!(
        got,
        Answer::Reply("action=ok\n\n".into()),
        "the request in flight at SIGTERM got {got:?}"
    );
    let got = idle.answer(Duration::from_secs(20)).await;
    assert_eq!(
        got,
        Answer::Closed(String::new()),
        "the idle connection at SIGTERM gave {got:?}"
    );
    let status = tokio::task::spawn_blocking(move || {
        let s = p.wait_exit(Duration::from_secs(10));
        (s, p.log())
    })
    .await
    .unwrap();
    assert!(status.0.success(), "exit {:?}\n{}", status.0, status.1);
    assert!(status.1.contains("valvulad stopped"));
    // No new connections after the stop.
    assert!(tokio::net::TcpStream::connect(&addr).await.is_err());
}

#[tokio::test]
async fn syslog_lines_use_facility_mail_and_valvula_prefixes() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("log.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let p = Proc::spawn(
        &format!(
            "[log]\ntarget = \"syslog\"\nsyslog_socket = {:?}\n\
             [[listener]]\nname = \"main\"\naddress = \"127.0.0.1:0\"\n",
            sock_path.display().to_string()
        ),
        &[],
    );
    let pid = p.worker_pid();
    let mut lines = Vec::new();
    let mut buf = [0u8; 4096];
    while !lines.iter().any(|l: &String| l.contains("valvulad ready")) {
        let n = sock.recv(&mut buf).expect("no syslog line from valvulad");
        lines.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    // facility mail (2) * 8 + info (6) = 22; valvula's "info: " prefix.
    let ready = lines.iter().find(|l| l.contains("valvulad ready")).unwrap();
    assert!(
        ready.starts_with(&format!("<22>valvulad[{pid}]: info: ")),
        "{ready}"
    );
    let addr = lines
        .iter()
        .find_map(|l| {
            l.split("address=")
                .nth(1)
                .map(|a| a.split_whitespace().next().unwrap().to_owned())
        })
        .unwrap();
    let mut c = Client::connect(&addr).await;
    assert_eq!(
        c.ask(&postfix_request(&[("queue_id", "ABC123")])).await,
        "action=dunno\n\n"
    );
    let decision = loop {
        let n = sock.recv(&mut buf).unwrap();
        let line = String::from_utf8_lossy(&buf[..n]).into_owned();
        if line.contains(" decision") {
            break line;
        }
    };
    assert!(
        decision.starts_with(&format!("<22>valvulad[{pid}]: info: decision")),
        "{decision}"
    );
    for field in [
        "queue_id=\"ABC123\"",
        "sasl_username=\"alice@example.com\"",
        "action=\"dunno\"",
    ] {
        assert!(decision.contains(field), "{field} not in {decision}");
    }
}

/// After binding, the daemon runs as the configured user, with that user's groups only.
#[tokio::test]
async fn drops_privileges_after_binding() {
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(data.path(), Some(65534), Some(65534)).unwrap();
    let cfg = format!(
        "[server]\nuser = \"nobody\"\ngroup = \"nogroup\"\nmodule_dirs = [{:?}]\nadmin_socket = \"{}/admin.sock\"\n\
         [[listener]]\nname = \"main\"\naddress = \"127.0.0.1:0\"\nmodules = [\"mod-test\"]\n\
         [storage]\npath = \"{}/v.db\"\n",
        module_path("mod_test")
            .parent()
            .unwrap()
            .display()
            .to_string(),
        data.path().display(),
        data.path().display()
    );
    let p = Proc::start(&cfg, &[]);
    let status = std::fs::read_to_string(format!("/proc/{}/status", p.worker_pid())).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap()
            .split_whitespace()
            .skip(1)
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(field("Uid:"), "65534 65534 65534 65534", "{status}");
    assert_eq!(field("Gid:"), "65534 65534 65534 65534", "{status}");
    assert!(
        !field("Groups:").split(' ').any(|g| g == "0"),
        "root's groups kept: {status}"
    );
    // It still answers, and still counts in its database.
    let mut c = Client::connect(&p.addrs()[0]).await;
    for _ in 0..3 {
        let r = c
            .ask(&postfix_request(&[
                ("x_test_consume", "k"),
                ("x_test_limit", "2"),
            ]))
            .await;
        assert!(
            r.starts_with("action=ok") || r.starts_with("action=reject limit reached"),
            "{r}\n{}",
            p.log()
        );
    }
    assert_eq!(
        c.ask(&postfix_request(&[
            ("x_test_consume", "k"),
            ("x_test_amount", "0")
        ]))
        .await,
        "action=ok used=2\n\n"
    );
    // The worker changed user, which clears Linux's parent-death signal: it must still
    // die with its master at once, not linger holding the ports.
    let mut p = p;
    let worker = p.worker_pid();
    let addr = p.addrs()[0].clone();
    p.signal(Signal::SIGKILL);
    let _ = p.wait_exit(Duration::from_secs(10));
    let gone = std::time::Instant::now();
    while std::fs::read_to_string(format!("/proc/{worker}/stat")).is_ok_and(|s| !s.contains(") Z "))
    {
        assert!(
            gone.elapsed() < Duration::from_secs(2),
            "the worker {worker} outlived its killed master"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        std::net::TcpStream::connect(&addr).is_err(),
        "{addr} still accepts connections"
    );
    // An unknown user is a configuration error with its key.
    let mut bad = Proc::spawn(
        "[server]\nuser = \"no-such-user-here\"\n[[listener]]\naddress = \"127.0.0.1:0\"\n",
        &["-t"],
    );
    assert_eq!(bad.wait_exit(Duration::from_secs(20)).code(), Some(1));
    assert!(bad.log().contains("server.user: no user"), "{}", bad.log());
}

/// A running daemon whose config names its real port (as an operator's file does).
fn pinned(extra: &str) -> Proc {
    let p = Proc::start(&base("", extra), &[]);
    let addr = p.addrs()[0].clone();
    let text = std::fs::read_to_string(&p.config_path)
        .unwrap()
        .replace("127.0.0.1:0", &addr);
    std::fs::write(&p.config_path, text).unwrap();
    p
}

fn valvulad(args: &[&str]) -> (i32, String) {
    let o = std::process::Command::new(valvulad_bin())
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

#[test]
fn valvula_command_line_ping_check_db_status() {
    let p = pinned("");
    let cfg = p.config_path.display().to_string();
    let addr = p.addrs()[0].clone();
    let (code, out) = valvulad(&["-c", &cfg, "-p"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out,
        format!("{addr} working right!\nValvula server working OK\n")
    );
    let (code, out) = valvulad(&["-c", &cfg, "-b"]);
    assert_eq!(
        (code, out.as_str()),
        (0, "INFO: Database connection working OK\n")
    );
    let (code, out) = valvulad(&["-c", &cfg, "-s"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("\"listeners\"") && out.contains("\"uptime_s\""),
        "{out}"
    );
    // Stopped: the same file (kept) now fails the probe.
    let keep = tempfile::tempdir().unwrap();
    let cfg = keep.path().join("valvulad.toml").display().to_string();
    std::fs::copy(&p.config_path, &cfg).unwrap();
    drop(p);
    let (code, out) = valvulad(&["-c", &cfg, "-p"]);
    assert_eq!(code, 255, "{out}");
    assert!(
        out.starts_with(&format!("ERROR: {addr} is not working")),
        "{out}"
    );
    // -b against a database nobody serves.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[listener]]\naddress = \"127.0.0.1:0\"\n[storage]\nbackend = \"mysql\"\nurl = \"mysql://u@127.0.0.1:1/db\"\n",
    )
    .unwrap();
    let (code, out) = valvulad(&["-c", &bad.display().to_string(), "-b"]);
    assert_eq!(code, 255, "{out}");
    assert!(out.starts_with("ERROR: Database connection isn't working. Please check database server and/or credentials"), "{out}");
}

#[test]
fn detach_and_pid_file() {
    let p = pinned("");
    let cfg_text = std::fs::read_to_string(&p.config_path).unwrap();
    let addr = p.addrs()[0].clone();
    drop(p);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("valvulad.toml");
    std::fs::write(&cfg, cfg_text).unwrap();
    let cfg = cfg.display().to_string();
    let pidf = dir.path().join("valvulad.pid");
    let pids = pidf.display().to_string();
    // A stale pid file (no such process) is replaced.
    std::fs::write(&pidf, "999999\n").unwrap();
    let t = std::time::Instant::now();
    let (code, out) = valvulad(&["-c", &cfg, "--detach", "--pid-file", &pids]);
    assert_eq!(code, 0, "{out}");
    assert!(t.elapsed() < Duration::from_secs(15));
    let pid: i32 = std::fs::read_to_string(&pidf)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(out.contains(&format!("pid {pid}")), "{out}");
    // It serves as soon as --detach returned.
    let (code, out) = valvulad(&["-c", &cfg, "-p"]);
    assert_eq!(code, 0, "{out}");
    // And answers requests, logging each to a stderr whose reader (the --detach
    // parent) is gone: a log line that could not be written once lost the request.
    for _ in 0..3 {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"request=smtpd_access_policy\nprotocol_state=RCPT\nsender=a@b\n\n")
            .unwrap();
        let mut got = [0u8; 64];
        let n = s.read(&mut got).unwrap_or(0);
        assert_eq!(
            String::from_utf8_lossy(&got[..n]),
            "action=dunno\n\n",
            "a detached daemon's answer"
        );
    }
    // A second daemon with the same pid file is refused.
    let (code, out) = valvulad(&["-c", &cfg, "--pid-file", &pids]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("running as pid {pid}")), "{out}");
    // SIGTERM stops it cleanly, and the pid file goes with it.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGTERM).unwrap();
    for _ in 0..100 {
        if !pidf.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!pidf.exists(), "the pid file was left behind");
    assert!(std::net::TcpStream::connect(&addr).is_err());
    // A start that fails is reported by --detach, with its reason.
    std::fs::write(
        dir.path().join("broken.toml"),
        "[[listener]]\naddress = 5\n",
    )
    .unwrap();
    let (code, out) = valvulad(&[
        "-c",
        &dir.path().join("broken.toml").display().to_string(),
        "--detach",
        "--pid-file",
        &pids,
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("listener[0].address"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_shows_the_counts_of_a_run() {
    let p = Proc::start(
        &base("\"mod-test\"", "")
            .replace("[server]\n", "[server]\nmetrics_listen = \"127.0.0.1:0\"\n"),
        &[],
    );
    let log = p.log();
    let metrics = log
        .lines()
        .find(|l| l.contains("metrics listener ready"))
        .and_then(|l| l.split("address=").nth(1))
        .map(|a| a.split_whitespace().next().unwrap().to_owned())
        .unwrap_or_else(|| panic!("no metrics listener:\n{log}"));
    let mut c = Client::connect(&p.addrs()[0]).await;
    c.ask(&postfix_request(&[])).await;
    c.ask(&postfix_request(&[])).await;
    c.ask(&postfix_request(&[
        ("x_test_action", "reject"),
        ("x_test_text", "no"),
    ]))
    .await;
    c.ask(&postfix_request(&[("x_test_error", "1")])).await;
    let mut bad = Client::connect(&p.addrs()[0]).await;
    bad.send(b"no equals sign here\n\n").await;
    assert_eq!(
        bad.answer(Duration::from_secs(5)).await,
        Answer::Closed(String::new())
    );
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl")
            .args(["-sf", &format!("http://{metrics}/metrics")])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "curl failed");
    let text = String::from_utf8_lossy(&out.stdout);
    for line in [
        "valvulad_requests_total{listener=\"main\",action=\"dunno\"} 3",
        "valvulad_requests_total{listener=\"main\",action=\"reject\"} 1",
        "valvulad_malformed_requests_total{listener=\"main\"} 1",
        "valvulad_module_calls_total{module=\"mod-test\"} 4",
        "valvulad_module_failures_total{module=\"mod-test\"} 1",
        "valvulad_module_latency_seconds_count{module=\"mod-test\"} 4",
        "# TYPE valvulad_module_latency_seconds histogram",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line} missing from:\n{text}"
        );
    }
}

#[test]
fn is_local_destination_asks_postfix() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("vdomains"), "maps.example.org ok\n").unwrap();
    std::fs::write(d.join("vmailbox"), "alice@example.com example.com/alice/\n").unwrap();
    std::fs::write(
        d.join("main.cf"),
        format!(
            "myhostname = mx.example.test\nmydestination = localhost, $myhostname\n\
             virtual_mailbox_domains = example.com, texthash:{}/vdomains\n\
             virtual_mailbox_maps = texthash:{}/vmailbox\n",
            d.display(),
            d.display()
        ),
    )
    .unwrap();
    std::fs::write(d.join("master.cf"), "").unwrap();
    let f = std::fs::File::options()
        .write(true)
        .open(d.join("main.cf"))
        .unwrap();
    f.set_modified(std::time::SystemTime::now() - Duration::from_secs(120))
        .unwrap();
    let pf = d.display().to_string();
    let cfg = d.join("v.toml");
    std::fs::write(&cfg, "[[listener]]\naddress = \"127.0.0.1:0\"\n").unwrap();
    let cfg = cfg.display().to_string();
    for (what, code, says) in [
        (
            "alice@example.com",
            0,
            "INFO: alice@example.com is a local address",
        ),
        (
            "bob@example.com",
            0,
            "INFO: bob@example.com is a local domain",
        ),
        (
            "mx.example.test",
            0,
            "INFO: mx.example.test is a local domain",
        ),
        (
            "maps.example.org",
            0,
            "INFO: maps.example.org is a local domain",
        ),
        (
            "someone@other.org",
            255,
            "ERROR: someone@other.org is not a local domain nor a local address",
        ),
    ] {
        let (c, out) = valvulad(&["-c", &cfg, "--postfix-dir", &pf, "-l", what]);
        assert_eq!((c, out.trim()), (code, says), "{what}");
    }
}

/// The admin socket answers root and the daemon's user only: even with the socket file
/// opened to everyone, a client running as `nobody` is refused by its peer credentials.
#[test]
fn admin_socket_refuses_other_users() {
    let p = Proc::start(&base("", ""), &[]);
    let sock = p.dir.path().join("admin.sock");
    let ask = |as_nobody: bool| {
        let script = format!(
            "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({:?})\n\
             try:\n    s.sendall(b'status\\n')\n    d = s.recv(65536)\n\
             except (ConnectionResetError, BrokenPipeError):\n    d = b''\n\
             print(d.decode() or 'CLOSED')",
            sock.display().to_string()
        );
        let mut cmd = if as_nobody {
            let mut c = std::process::Command::new("setpriv");
            c.args([
                "--reuid=nobody",
                "--regid=nogroup",
                "--clear-groups",
                "/usr/bin/python3",
                "-c",
            ]);
            c
        } else {
            let mut c = std::process::Command::new("/usr/bin/python3");
            c.arg("-c");
            c
        };
        let out = cmd.arg(&script).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    assert!(ask(false).contains("listeners"), "root was not answered");
    // The file itself is 0600: nobody cannot even connect.
    std::fs::set_permissions(p.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let r = ask(true);
    assert!(r.contains("PermissionError"), "socket open to others: {r}");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let r = ask(true);
    assert!(r.trim() == "CLOSED", "{r}");
    assert!(
        p.wait_for_log("admin socket: refused", Duration::from_secs(5)),
        "{}",
        p.log()
    );
}

fn with_metrics() -> String {
    base("\"mod-test\"", "").replace("[server]\n", "[server]\nmetrics_listen = \"127.0.0.1:0\"\n")
}

/// Sends `request` and returns everything the server sends until it closes (or 20 s).
async fn http(addr: &str, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.write_all(request).await.expect("send the request");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Resident memory of a process, in MB.
fn rss_mb(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// GET and HEAD on /metrics, 404 elsewhere, 405 for other methods, 431 for oversized
/// headers, keep-alive, and connections beyond the cap closed at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_listener_speaks_bounded_http() {
    let p = Proc::start(&with_metrics(), &[]);
    let m = p.metrics_addr();
    let r = http(
        &m,
        b"GET /metrics?x=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        r.starts_with("HTTP/1.1 200 OK\r\n")
            && r.to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4\r\n")
            && r.contains("\nvalvulad_uptime_seconds "),
        "GET /metrics answered:\n{r}"
    );
    let r = http(
        &m,
        b"HEAD /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        r.starts_with("HTTP/1.1 200 OK\r\n") && r.ends_with("\r\n\r\n") && !r.contains("valvulad_"),
        "HEAD /metrics answered:\n{r}"
    );
    let r = http(
        &m,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 404 "), "GET / answered:\n{r}");
    let r = http(
        &m,
        b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nab",
    )
    .await;
    assert!(
        r.starts_with("HTTP/1.1 405 ") && r.to_ascii_lowercase().contains("allow: get, head\r\n"),
        "POST /metrics answered:\n{r}"
    );
    let big = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "y".repeat(20_000)
    );
    let r = http(&m, big.as_bytes()).await;
    assert!(
        r.starts_with("HTTP/1.1 431 "),
        "a 20 KB header answered:\n{r}"
    );
    // Two requests on one connection (the second closes it).
    let r = http(
        &m,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\nGET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(
        r.matches("HTTP/1.1 200 OK\r\n").count(),
        2,
        "two requests on one connection answered:\n{r}"
    );
    // 64 connections are served at once; the 65th and later are closed straight away,
    // and a connection that sends no request is closed after the header timeout.
    let mut held = Vec::new();
    for _ in 0..64 {
        held.push(tokio::net::TcpStream::connect(&m).await.unwrap());
    }
    let t = std::time::Instant::now();
    let r = http(
        &m,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r, "", "a connection beyond the cap was answered:\n{r}");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "a connection beyond the cap was kept {:?}",
        t.elapsed()
    );
    let mut buf = [0u8; 16];
    use tokio::io::AsyncReadExt;
    let n = tokio::time::timeout(Duration::from_secs(30), held[0].read(&mut buf)).await;
    assert!(
        matches!(n, Ok(Ok(0)) | Ok(Err(_))),
        "a silent connection was not closed: {n:?}"
    );
    drop(held);
    let mut answered = false;
    let t = std::time::Instant::now();
    while !answered && t.elapsed() < Duration::from_secs(20) {
        let r = http(
            &m,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        answered = r.starts_with("HTTP/1.1 200 OK\r\n");
    }
    assert!(
        answered,
        "no scrape answered once the silent connections were gone"
    );
}

/// Clients streaming bytes without a newline and one sending its headers a byte at a
/// time cost the daemon no memory to speak of; scrapes and policy requests are answered
/// throughout. (A hand-written reader once buffered such a line: 2.7 GB in 4.7 s.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_listener_survives_endless_and_slow_requests() {
    use tokio::io::AsyncWriteExt;
    let p = Proc::start(&with_metrics(), &[]);
    let m = p.metrics_addr();
    let pid = p.worker_pid();
    let rss_before = rss_mb(pid);
    let mut streams = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let m = m.clone();
        streams.spawn(async move {
            let mut s = tokio::net::TcpStream::connect(&m).await.unwrap();
            let chunk = vec![b'a'; 64 * 1024];
            let mut sent = 0usize;
            // Bounded (48 MiB each), yet far beyond what a bounded reader keeps.
            while sent < 48 << 20 {
                match tokio::time::timeout(Duration::from_secs(10), s.write_all(&chunk)).await {
                    Ok(Ok(())) => sent += chunk.len(),
                    _ => break,
                }
            }
            sent
        });
    }
    let slow = {
        let m = m.clone();
        tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(&m).await.unwrap();
            let t = std::time::Instant::now();
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap();
            while t.elapsed() < Duration::from_secs(60) {
                if s.write_all(b"X").await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            t.elapsed()
        })
    };
    let mut c = Client::connect(&p.addrs()[0]).await;
    let t = std::time::Instant::now();
    let mut max_rss = rss_before;
    let mut rounds = 0;
    while t.elapsed() < Duration::from_secs(4) || !slow.is_finished() {
        max_rss = max_rss.max(rss_mb(pid));
        let r = http(
            &m,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(
            r.starts_with("HTTP/1.1 200 OK\r\n") && r.contains("\nvalvulad_uptime_seconds "),
            "a scrape during the attack (round {rounds}) got:\n{r}"
        );
        let r = c.ask(&postfix_request(&[])).await;
        assert_eq!(
            r, "action=dunno\n\n",
            "a policy request during the attack got {r:?}"
        );
        rounds += 1;
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the slow-headers client was never cut"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let slow_for = slow.await.unwrap();
    let mut sent = Vec::new();
    while let Some(s) = streams.join_next().await {
        sent.push(s.unwrap());
    }
    eprintln!(
        "RELIABILITY: /metrics under 8 endless lines and a slow-headers client: rss {rss_before:.1} MB before, at most {max_rss:.1} MB during; {rounds} scrapes and policy requests answered; slow client cut after {slow_for:?}; bytes taken per stream {sent:?}"
    );
    assert!(
        max_rss < 100.0,
        "resident memory reached {max_rss:.1} MB (from {rss_before:.1} MB)"
    );
    assert!(
        sent.iter().all(|&s| s < 48 << 20),
        "a stream without a newline was read to its end: {sent:?}"
    );
    assert!(
        slow_for < Duration::from_secs(20),
        "the slow-headers client was kept {slow_for:?}"
    );
    assert!(
        p.worker_pid() == pid && rss_mb(pid) > 0.0,
        "the daemon is gone:\n{}",
        p.log()
    );
}

/// A path at `server.admin_socket` that is not a socket (a regular file, a symbolic
/// link to anything) is a configuration error for `-t` and for startup alike, and is
/// left as it is; a stale socket there is replaced.
#[test]
fn admin_socket_path_that_is_not_a_socket_is_refused_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let precious = dir.path().join("precious.txt");
    std::fs::write(&precious, "do not delete").unwrap();
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let cases = [
        ("a regular file", dir.path().join("file.sock"), None),
        (
            "a symbolic link",
            dir.path().join("link-to-file.sock"),
            Some(&precious),
        ),
        (
            "a symbolic link",
            dir.path().join("link-to-socket.sock"),
            Some(&stale),
        ),
    ];
    for (kind, path, target) in &cases {
        match target {
            None => std::fs::copy(&precious, path).map(|_| ()).unwrap(),
            Some(t) => std::os::unix::fs::symlink(t, path).unwrap(),
        }
        let cfg = base("", "").replace(
            "[server]\n",
            &format!(
                "[server]\nadmin_socket = {:?}\n",
                path.display().to_string()
            ),
        );
        for args in [&["-t"][..], &[]] {
            let mut p = Proc::spawn(&cfg, args);
            let s = p.wait_exit(Duration::from_secs(20));
            let log = p.log();
            let want = format!(
                "server.admin_socket: {} exists and is {kind}",
                path.display()
            );
            assert_eq!(
                s.code(),
                Some(1),
                "valvulad {args:?} with {kind} there: {s:?}\n{log}"
            );
            assert!(
                log.contains(&want),
                "valvulad {args:?}: {want:?} missing from:\n{log}"
            );
            let meta = std::fs::symlink_metadata(path).unwrap();
            assert_eq!(
                meta.file_type().is_symlink(),
                target.is_some(),
                "{} was replaced",
                path.display()
            );
        }
        if target.is_none() {
            assert_eq!(
                std::fs::read_to_string(path).unwrap(),
                "do not delete",
                "the regular file was changed"
            );
        }
    }
    assert_eq!(
        std::fs::read_to_string(&precious).unwrap(),
        "do not delete",
        "a link's target was changed"
    );
    use std::os::unix::fs::FileTypeExt;
    assert!(
        std::fs::symlink_metadata(&stale)
            .unwrap()
            .file_type()
            .is_socket(),
        "a link's target socket was removed"
    );
    // The stale socket itself (nobody listening) is replaced, and served.
    let cfg = base("", "").replace(
        "[server]\n",
        &format!(
            "[server]\nadmin_socket = {:?}\n",
            stale.display().to_string()
        ),
    );
    let p = Proc::start(&cfg, &[]);
    let mut s = std::os::unix::net::UnixStream::connect(&stale)
        .unwrap_or_else(|e| panic!("the replaced socket does not answer: {e}\n{}", p.log()));
    use std::io::{Read, Write};
    s.write_all(b"status\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(
        out.contains("\"listeners\""),
        "status over the replaced socket: {out}"
    );
    // A second daemon on the same admin socket (a copied configuration) refuses to
    // start: it would take the socket, and `valvula-ctl reload` would reach it instead.
    let mut second = Proc::spawn(&cfg, &[]);
    let s = second.wait_exit(Duration::from_secs(20));
    assert_eq!(s.code(), Some(1), "second daemon: {s:?}\n{}", second.log());
    assert!(
        second.log().contains("is in use by another valvulad"),
        "second daemon:\n{}",
        second.log()
    );
    let mut s = std::os::unix::net::UnixStream::connect(&stale).unwrap();
    s.write_all(b"status\n").unwrap();
    let mut again = String::new();
    s.read_to_string(&mut again).unwrap();
    assert!(
        again.contains("\"listeners\""),
        "the first daemon lost its socket: {again}\n{}",
        p.log()
    );
}

/// The admin socket reads at most one short line, within a few seconds: a command that
/// never ends is answered with an error instead of being buffered, and a silent client
/// is closed.
#[test]
fn admin_socket_reads_a_bounded_command_in_bounded_time() {
    use std::io::{Read, Write};
    let p = Proc::start(&base("", ""), &[]);
    let sock = p.dir.path().join("admin.sock");
    let read_all = |s: &mut std::os::unix::net::UnixStream| {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("no answer ({e}); got {:?}", String::from_utf8_lossy(&out)),
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    let pid = p.worker_pid();
    let before = rss_mb(pid);
    let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let chunk = vec![b'x'; 1 << 20];
        let mut sent = 0;
        while sent < 64 && w.write_all(&chunk).is_ok() {
            sent += 1;
        }
        sent
    });
    let got = read_all(&mut s);
    let sent = writer.join().unwrap();
    let after = rss_mb(pid);
    assert_eq!(
        got, "error command longer than 1024 bytes\n",
        "a command without end ({sent} MiB sent) got {got:?}; rss {before:.1} -> {after:.1} MB"
    );
    assert!(sent < 64, "the daemon read all 64 MiB of one command");
    let t = std::time::Instant::now();
    let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    let got = read_all(&mut s);
    assert_eq!(
        got,
        "error no command within 5s\n",
        "a silent client got {got:?} after {:?}",
        t.elapsed()
    );
    let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    s.write_all(b"status\n").unwrap();
    let got = read_all(&mut s);
    assert!(got.contains("\"listeners\""), "status afterwards: {got}");
}

/// Out of file descriptors (the hard limit lowered under a running daemon), a new
/// client is still served: the connection idle longest is closed to make room, and the
/// failing accept is logged once a second, not on every retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_the_longest_idle_connection_gives_way() {
    let p = Proc::start(&base("\"mod-test\"", ""), &[]);
    let pid = p.worker_pid();
    let addr = p.addrs()[0].clone();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let limit = open + 3;
    let o = std::process::Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            &format!("--nofile={limit}:{limit}"),
        ])
        .output()
        .expect("run prlimit");
    assert!(
        o.status.success(),
        "prlimit failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let t = std::time::Instant::now();
    let mut conns = Vec::new();
    for i in 0..10 {
        let mut c = Client::connect(&addr).await;
        let text = format!("c{i}");
        c.send(&postfix_request(&[
            ("x_test_action", "ok"),
            ("x_test_text", &text),
        ]))
        .await;
        let got = c.answer(Duration::from_secs(20)).await;
        assert_eq!(
            got,
            Answer::Reply(format!("action=ok c{i}\n\n")),
            "connection {i} with {open} descriptors open and a limit of {limit}:\n{}",
            p.log()
        );
        conns.push(c);
    }
    let got = conns[0].answer(Duration::from_secs(20)).await;
    assert_eq!(
        got,
        Answer::Closed(String::new()),
        "the connection idle longest was not closed"
    );
    let r = conns[9].ask(&postfix_request(&[])).await;
    assert_eq!(
        r, "action=dunno\n\n",
        "the newest connection afterwards got {r:?}"
    );
    let made_room = p.count_log("closed the connection idle longest to make room");
    let warnings = p.count_log("accept failed");
    assert!(made_room >= 1, "no eviction logged:\n{}", p.log());
    assert!(
        warnings as u64 <= t.elapsed().as_secs() + 2,
        "{warnings} accept warnings in {:?}:\n{}",
        t.elapsed(),
        p.log()
    );
}

/// The daemon's status JSON from its admin socket ("" if it does not answer).
fn admin_status(sock: &std::path::Path) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(sock) else {
        return String::new();
    };
    let mut out = String::new();
    let _ = s.write_all(b"status\n");
    let _ = s.read_to_string(&mut out);
    out
}

/// A flood of connections from outside the allowed networks is refused and counted, and
/// logged once a second, not once per connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_by_network_are_logged_once_a_second() {
    let p = Proc::start(&base("", "allow = [\"192.0.2.0/24\"]\n"), &[]);
    let addr = p.addrs()[0].clone();
    let t = std::time::Instant::now();
    for i in 0..200 {
        let mut c = Client::connect(&addr).await;
        let got = c.answer(Duration::from_secs(20)).await;
        assert_eq!(
            got,
            Answer::Closed(String::new()),
            "connection {i} from outside the allowed networks gave {got:?}"
        );
    }
    let took = t.elapsed();
    assert!(
        p.wait_for_log(
            "not in the listener's allowed networks",
            Duration::from_secs(20)
        ),
        "no refusal logged:\n{}",
        p.log()
    );
    let lines = p.count_log("not in the listener's allowed networks");
    assert!(
        lines as u64 <= took.as_secs() + 2,
        "{lines} refusal lines for 200 connections in {took:?}"
    );
    let status = admin_status(&p.dir.path().join("admin.sock"));
    assert!(status.contains("\"listeners\""), "status: {status}");
}

/// The modules both shipped modules, ready to create their tables.
fn both_modules(storage: &str) -> String {
    format!(
        "[server]\nmodule_dirs = [{:?}]\n\
         [[listener]]\nname = \"main\"\naddress = \"127.0.0.1:0\"\nmodules = [\"mod-ticket\", \"mod-ratelimit\"]\n\
         [module.mod-ratelimit]\n[[module.mod-ratelimit.policy]]\nname = \"p\"\nkey = \"sasl_user\"\n\
         default = {{ limits = [[\"hour\", 10]] }}\n{storage}",
        module_path("mod_test")
            .parent()
            .unwrap()
            .display()
            .to_string()
    )
}

/// Every file under `dir` with its bytes, and its modification time unless it is
/// SQLite's shared-memory index (`-shm`), which every reader writes its read marks to.
fn files_of(dir: &std::path::Path) -> Vec<(String, Vec<u8>, Option<std::time::SystemTime>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let shm = name.ends_with("-shm");
            let m = e.metadata().unwrap();
            (
                name,
                if shm {
                    Vec::new()
                } else {
                    std::fs::read(e.path()).unwrap()
                },
                (!shm).then(|| m.modified().unwrap()),
            )
        })
        .collect();
    v.sort();
    v
}

/// `valvulad -t` (and `-b`) write nothing: no SQLite file or directory is created, an
/// existing file is left byte for byte as it was (its modules' init ran against a
/// snapshot), and on MariaDB no table is created; the check still reports success.
#[test]
fn checks_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db_dir = dir.path().join("state");
    let cfg = both_modules(&format!(
        "[storage]\npath = \"{}/valvula.db\"\n",
        db_dir.display()
    ));
    let cfg_path = dir.path().join("valvulad.toml");
    std::fs::write(&cfg_path, &cfg).unwrap();
    // Where a check would put a copy of the database: it must be gone afterwards.
    let scratch = dir.path().join("tmp");
    std::fs::create_dir(&scratch).unwrap();
    let run = |args: &[&str]| {
        let o = std::process::Command::new(valvulad_bin())
            .arg("-c")
            .arg(&cfg_path)
            .args(args)
            .env("TMPDIR", &scratch)
            .output()
            .unwrap();
        assert_eq!(
            std::fs::read_dir(&scratch).unwrap().count(),
            0,
            "valvulad {args:?} left its copy of the database behind"
        );
        (
            o.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        )
    };
    for args in [&["-t"][..], &["-b"]] {
        let (code, out) = run(args);
        assert_eq!(code, Some(0), "valvulad {args:?}: {out}");
        assert!(
            !db_dir.exists(),
            "valvulad {args:?} created {}: {out}",
            db_dir.display()
        );
    }
    // A database a daemon made: the check leaves every byte of it, and, closed cleanly
    // (no -wal file), gets no -wal or -shm file beside it either.
    let mut p = Proc::start(&cfg, &[]);
    p.signal(Signal::SIGTERM);
    assert!(
        p.wait_exit(Duration::from_secs(30)).success(),
        "{}",
        p.log()
    );
    rusqlite::Connection::open(db_dir.join("valvula.db"))
        .and_then(|c| c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);"))
        .unwrap();
    assert!(
        !db_dir.join("valvula.db-wal").exists(),
        "the last connection removes the -wal file"
    );
    std::fs::write(db_dir.join("marker"), "").unwrap();
    let before = files_of(&db_dir);
    std::thread::sleep(Duration::from_millis(20));
    for args in [&["-t"][..], &["-b"]] {
        let (code, out) = run(args);
        assert_eq!(code, Some(0), "{out}");
        let after = files_of(&db_dir);
        let names = |v: &[(String, Vec<u8>, Option<std::time::SystemTime>)]| {
            v.iter().map(|f| f.0.clone()).collect::<Vec<_>>()
        };
        assert_eq!(
            names(&after),
            names(&before),
            "valvulad {args:?} added or removed files: {out}"
        );
        assert!(
            after == before,
            "valvulad {args:?} changed the database's files: {out}"
        );
    }

    // A path valvulad could not create is an error, not "checked against an empty
    // database".
    std::fs::write(
        &cfg_path,
        both_modules(&format!(
            "[storage]\npath = \"{}/v.db\"\n",
            cfg_path.display()
        )),
    )
    .unwrap();
    for args in [&["-t"][..], &["-b"]] {
        let (code, out) = run(args);
        assert_ne!(
            code,
            Some(0),
            "valvulad {args:?} under a regular file: {out}"
        );
        assert!(out.contains("is not a directory"), "{out}");
    }

    // MariaDB: a fresh database stays empty.
    let db = valvula_tests::db::TestDb::new();
    std::fs::write(
        &cfg_path,
        both_modules(&format!(
            "[storage]\nbackend = \"mysql\"\nurl = \"{}\"\n",
            db.url()
        )),
    )
    .unwrap();
    for args in [&["-t"][..], &["-b"]] {
        let (code, out) = run(args);
        assert_eq!(code, Some(0), "valvulad {args:?} on MariaDB: {out}");
        let tables = db
            .sql("SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = DATABASE()");
        assert_eq!(
            tables.trim(),
            "0",
            "valvulad {args:?} created tables on MariaDB: {out}"
        );
    }
}

/// A module's configuration error names the key of its `[module.NAME]` section, as
/// the operator wrote it, not a position in the JSON the section travels as.
#[test]
fn module_config_errors_name_the_toml_key() {
    let mut p = Proc::spawn(
        &base(
            "\"mod-ratelimit\"",
            "[module.mod-ratelimit]\n[[module.mod-ratelimit.policy]]\nname = \"p\"\nkey = \"sasl_user\"\n\
             default = { limits = [[\"hour\", 10]] }\n\
             [[module.mod-ratelimit.policy]]\nname = \"q\"\nkey = \"sasl_user\"\nmetric = 5\n",
        ),
        &["-t"],
    );
    assert_eq!(p.wait_exit(Duration::from_secs(20)).code(), Some(1));
    let log = p.log();
    assert!(
        log.contains("key policy[1].metric: invalid type"),
        "the error names the key:\n{log}"
    );
    assert!(
        !log.contains(" column "),
        "no position in a JSON text:\n{log}"
    );
}
