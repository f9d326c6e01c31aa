//! Hostile clients against a real valvulad process: idle hordes, slow senders, partial
//! requests, oversized lines and requests, binary garbage, NUL bytes, invalid UTF-8,
//! 10,000 attributes and a flood beyond the connection cap, all at once, while a
//! well-behaved client keeps asking. It must get every answer, right and in time; the
//! daemon's memory must stay bounded; every hostile input is closed without a reply; at
//! the cap the connections idle longest give way, so new clients are still served.
//!
//! `VALVULA_LONG=1` runs the long variant (10,000 idle connections, one byte per second
//! for a minute) for the figures in RELIABILITY.md.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use valvula_tests::client::{Answer, Client, postfix_request};
use valvula_tests::daemon::Proc;
use valvula_tests::module_path;

fn long() -> bool {
    std::env::var_os("VALVULA_LONG").is_some()
}

fn config(cap: usize) -> String {
    format!(
        "[server]\nmodule_dirs = [{:?}]\nmetrics_listen = \"127.0.0.1:0\"\n\
         [limits]\nmax_line_bytes = 4096\nmax_request_bytes = 65536\nmax_attributes = 1000\n\
         request_timeout = \"5s\"\n\
         [log]\nlevel = \"warn,valvulad=info\"\n\
         [[listener]]\nname = \"main\"\naddress = \"127.0.0.1:0\"\nmodules = [\"mod-test\"]\n\
         max_connections = {cap}\n",
        module_path("mod_test")
            .parent()
            .unwrap()
            .display()
            .to_string()
    )
}

/// Resident memory of a process, in MB.
fn rss_mb(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// Latencies (ms) of `n` requests of a well-behaved client, each checked.
async fn good_client(addr: &str, n: usize) -> Vec<f64> {
    let mut c = Client::connect(addr).await;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let req = postfix_request(&[("x_test_action", "ok"), ("x_test_text", &format!("n{i}"))]);
        let t = Instant::now();
        let r = c.ask(&req).await;
        out.push(t.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(r, format!("action=ok n{i}\n\n"), "answer {i} was {r:?}");
    }
    out
}

fn p99(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * 0.99) as usize]
}

async fn open(addr: &str) -> Option<TcpStream> {
    TcpStream::connect(addr).await.ok()
}

/// Sends `bytes` (as much as the server takes), then reads whatever comes back until the
/// server closes: a hostile input must get nothing at all.
async fn send_hostile(addr: &str, bytes: &[u8]) -> Vec<u8> {
    let Some(s) = open(addr).await else {
        return Vec::new();
    };
    let (mut r, mut w) = s.into_split();
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(30), r.read_to_end(&mut got)).await;
        got
    });
    if w.write_all(bytes).await.is_ok() {
        let _ = w.shutdown().await;
    }
    let got = reader.await.unwrap();
    drop(w);
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_do_not_stop_or_slow_the_others() {
    let (idle, slow_secs, byte_every) = if long() {
        (10_000, 60, Duration::from_secs(1))
    } else {
        (2_000, 6, Duration::from_millis(200))
    };
    let cap = idle + 500;
    let p = Proc::start(&config(cap), &[]);
    let addr = p.addrs()[0].clone();
    let pid = p.worker_pid();
    let mut base = good_client(&addr, 300).await;
    let base_p99 = p99(&mut base);
    let rss_before = rss_mb(pid);

    let mut attackers = tokio::task::JoinSet::new();
    // Idle hordes: connect and say nothing.
    let mut held = Vec::new();
    for _ in 0..idle {
        if let Some(s) = open(&addr).await {
            held.push(s);
        }
    }
    let held_count = held.len();
    // Slow senders: a valid request, one byte at a time.
    for _ in 0..20 {
        let addr = addr.clone();
        attackers.spawn(async move {
            let Some(mut s) = open(&addr).await else {
                return;
            };
            for b in postfix_request(&[]) {
                if s.write_all(&[b]).await.is_err() {
                    return; // request_timeout closed it: expected
                }
                tokio::time::sleep(byte_every).await;
            }
        });
    }
    // Partial requests, then silence.
    for _ in 0..20 {
        let addr = addr.clone();
        attackers.spawn(async move {
            let Some(mut s) = open(&addr).await else {
                return;
            };
            let _ = s
                .write_all(b"request=smtpd_access_policy\nprotocol_state=RC")
                .await;
            tokio::time::sleep(Duration::from_secs(slow_secs)).await;
        });
    }
    // Oversized lines and requests, garbage, NUL bytes, invalid UTF-8, 10,000 attributes.
    let mut nasty: Vec<Vec<u8>> = vec![
        vec![b'a'; 1 << 20],
        [
            b"request=smtpd_access_policy\n".as_slice(),
            &vec![b'x'; 100_000],
        ]
        .concat(),
        (0..5000)
            .flat_map(|i| format!("x_pad{i}={}\n", "y".repeat(30)).into_bytes())
            .collect(),
        (0..10_000)
            .flat_map(|i| format!("a{i}=b\n").into_bytes())
            .chain(*b"\n")
            .collect(),
        b"request=smtpd_access_policy\nsender=a\0b@example.com\n\n".to_vec(),
        b"request=smtpd_access_policy\nsender=\xff\xfe\xc3\x28@example.com\n\n".to_vec(),
        b"\0\0\0\0\n\n".to_vec(),
        b"no equals sign here\n\n".to_vec(),
    ];
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    nasty.push(
        (0..200_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect(),
    );
    let tried = nasty.len();
    // Invalid UTF-8 is the one input that is not hostile: values are converted lossily,
    // so a legacy 8-bit value does not cost the client its mail. It is answered.
    let utf8_kind = nasty
        .iter()
        .position(|b| b.starts_with(b"request=smtpd_access_policy\nsender=\xff"))
        .unwrap();
    let mut replies = tokio::task::JoinSet::new();
    for (kind, bytes) in nasty.into_iter().enumerate() {
        let addr = addr.clone();
        replies.spawn(async move {
            let mut got = Vec::new();
            for _ in 0..5 {
                got.push(send_hostile(&addr, &bytes).await);
            }
            (kind, got)
        });
    }
    // A flood beyond the cap: the connections idle longest give way, nobody else harmed.
    let flood = {
        let addr = addr.clone();
        tokio::spawn(async move {
            let mut extra = Vec::new();
            for _ in 0..1000 {
                if let Some(s) = open(&addr).await {
                    extra.push(s);
                }
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            extra.len()
        })
    };

    // Meanwhile, the well-behaved client.
    let t = Instant::now();
    let mut during = good_client(&addr, 1000).await;
    let during_p99 = p99(&mut during);
    let during_max = during.iter().copied().fold(0.0, f64::max);
    let rss_during = rss_mb(pid);
    let flooded = flood.await.unwrap();
    while attackers.join_next().await.is_some() {}
    while let Some(r) = replies.join_next().await {
        let (kind, got) = r.unwrap();
        for (i, bytes) in got.iter().enumerate() {
            if kind == utf8_kind {
                assert_eq!(
                    bytes,
                    b"action=dunno\n\n",
                    "invalid UTF-8, connection {i}, got {:?}",
                    String::from_utf8_lossy(bytes)
                );
                continue;
            }
            assert!(
                bytes.is_empty(),
                "hostile input {kind}, connection {i}, was answered: {:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }
    eprintln!(
        "RELIABILITY: idle connections held {held_count}, hostile inputs {tried} kinds x5, \
         flood {flooded} connects beyond {cap}; good client p99 {base_p99:.2} ms before, \
         {during_p99:.2} ms during (max {during_max:.1} ms, {:.1} s); rss {rss_before:.1} MB \
         before, {rss_during:.1} MB during",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(
        held_count, idle,
        "the daemon refused idle connections under its cap"
    );
    // Postfix's own policy timeout is 100 s; an answer within 2 s is no harm to SMTP.
    assert!(during_max < 2000.0, "a good request waited {during_max} ms");
    assert!(rss_during < 200.0, "resident memory {rss_during} MB");
    // The flood went beyond the cap: the connection idle longest gave way...
    let mut oldest = Client::from_stream(held.remove(0));
    let got = oldest.answer(Duration::from_secs(20)).await;
    assert_eq!(
        got,
        Answer::Closed(String::new()),
        "the connection idle longest was not closed for the flood"
    );
    // ...and the idle connections opened last are still served.
    let mut c = Client::from_stream(held.pop().unwrap());
    let r = c.ask(&postfix_request(&[("x_test_action", "dunno")])).await;
    assert_eq!(
        r, "action=dunno\n\n",
        "an idle connection was not served after the attack: {r:?}"
    );
    let got = c.answer(Duration::from_millis(50)).await;
    assert!(
        matches!(got, Answer::Silence),
        "one reply per request, then {got:?}"
    );
    assert!(
        p.count_log("connection cap") > 0,
        "the flood beyond the cap was not logged:\n{}",
        p.log()
    );
    // Each closed and counted; logged, at most once a second.
    let malformed = malformed_total(&p).await;
    assert!(
        malformed >= ((tried - 1) * 5) as u64,
        "{malformed} hostile inputs counted as closed without a reply, of {} kinds x5:\n{}",
        tried - 1,
        p.log()
    );
    let lines = p.count_log("closing connection without a reply");
    assert!(
        lines >= 1 && (lines as u64) < malformed,
        "{lines} log lines for {malformed} malformed requests (once a second wanted)"
    );
}

/// `valvulad_malformed_requests_total` of the listener, from /metrics.
async fn malformed_total(p: &Proc) -> u64 {
    let addr = p.metrics_addr();
    let mut s = TcpStream::connect(&addr).await.expect("metrics");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_string(&mut out)).await;
    out.lines()
        .find(|l| l.starts_with("valvulad_malformed_requests_total{listener=\"main\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no malformed count in:\n{out}"))
}

/// A request that trickles in (one byte every 200 ms, each read well inside the timeout)
/// is still cut at request_timeout from its first byte: no slowloris.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_request_is_cut_at_request_timeout() {
    let cfg = config(100).replace("request_timeout = \"5s\"", "request_timeout = \"1s\"");
    let p = Proc::start(&cfg, &[]);
    let addr = p.addrs()[0].clone();
    let mut s = open(&addr).await.unwrap();
    let t = Instant::now();
    let mut sent = 0;
    for b in postfix_request(&[]) {
        if s.write_all(&[b]).await.is_err() {
            break;
        }
        sent += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
        if t.elapsed() > Duration::from_secs(20) {
            break;
        }
    }
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "still open after {:?} and {sent} bytes",
        t.elapsed()
    );
    assert!(
        p.wait_for_log("request not completed in time", Duration::from_secs(20)),
        "the cut was not logged:\n{}",
        p.log()
    );
}

/// A module that leaks memory on every call (2 MiB x 50), one that returns an invalid
/// reply, one that panics and one that fails, interleaved with good requests: the
/// daemon answers every good request and stays up; the leak shows in its memory, which
/// is the operator's to see (modules share the daemon's process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_module_calls_leave_the_daemon_serving() {
    let cfg = config(100).replace(
        "modules = [\"mod-test\"]\n",
        "modules = [\"mod-test\"]\non_error = \"defer\"\non_error_text = \"4.3.0 try later\"\n",
    );
    let p = Proc::start(&cfg, &[]);
    let addr = p.addrs()[0].clone();
    let before = rss_mb(p.worker_pid());
    let mut c = Client::connect(&addr).await;
    for i in 0..50 {
        let bad = match i % 4 {
            0 => ("x_test_leak_mb", "2"),
            1 => ("x_test_invalid", "1"),
            2 => ("x_test_panic", "1"),
            _ => ("x_test_error", "1"),
        };
        let r = c
            .ask(&postfix_request(&[bad, ("x_test_action", "ok")]))
            .await;
        if bad.0 == "x_test_leak_mb" {
            assert_eq!(r, "action=ok\n\n", "call {i} got {r:?}");
        } else {
            assert_eq!(
                r, "action=defer 4.3.0 try later\n\n",
                "call {i}: {bad:?} got {r:?}"
            );
        }
        let r = c.ask(&postfix_request(&[("x_test_action", "dunno")])).await;
        assert_eq!(
            r, "action=dunno\n\n",
            "good request after call {i} got {r:?}"
        );
    }
    let after = rss_mb(p.worker_pid());
    assert!(
        after - before > 15.0,
        "the leak did not show: {before} -> {after} MB"
    );
    eprintln!(
        "RELIABILITY: misbehaving module: 50 bad calls, 50 good answered; rss {before:.1} -> {after:.1} MB"
    );
}

/// The packaged configuration's cap (1,000) against 2,000 idle connections and 200
/// trickling ones from an allowed address: each new client (Postfix opening its policy
/// connection) is served at once, as the connections idle longest give way. The requests
/// trickling in are never cut while an idle connection can go instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_trickling_hordes_do_not_lock_postfix_out() {
    let cfg = config(1000).replace("request_timeout = \"5s\"", "request_timeout = \"30s\"");
    let p = Proc::start(&cfg, &[]);
    let addr = p.addrs()[0].clone();
    let pid = p.worker_pid();
    let mut held = Vec::new();
    for _ in 0..2000 {
        if let Some(s) = open(&addr).await {
            held.push(s);
        }
    }
    assert_eq!(held.len(), 2000, "connects failed: {} made", held.len());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Tricklers that have sent their first byte (their request is arriving).
    let started = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tricklers = tokio::task::JoinSet::new();
    for i in 0..200 {
        let (addr, stop, started) = (addr.clone(), stop.clone(), started.clone());
        tricklers.spawn(async move {
            let mut s = TcpStream::connect(&addr).await.unwrap();
            let request = postfix_request(&[("x_trickler", &i.to_string())]);
            let mut sent = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && sent < request.len() - 1 {
                if s.write_all(&request[sent..sent + 1]).await.is_err() {
                    return (i, sent, false);
                }
                if sent == 0 {
                    started.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                sent += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            // Still open: nothing to read, no end of stream.
            let mut buf = [0u8; 1];
            let open = matches!(s.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
            (i, sent, open)
        });
    }
    // Once every trickler's request is arriving, Postfix connects, again and again.
    let end = Instant::now() + Duration::from_secs(30);
    while started.load(std::sync::atomic::Ordering::Relaxed) < 200 {
        assert!(
            Instant::now() < end,
            "only {} of 200 tricklers started in 30 s",
            started.load(std::sync::atomic::Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut waits = Vec::new();
    let mut postfix = Vec::new();
    for n in 0..20 {
        let t = Instant::now();
        let mut c = Client::connect(&addr).await;
        let text = format!("postfix{n}");
        c.send(&postfix_request(&[
            ("x_test_action", "ok"),
            ("x_test_text", &text),
        ]))
        .await;
        let got = c.answer(Duration::from_secs(20)).await;
        waits.push(t.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(
            got,
            Answer::Reply(format!("action=ok {text}\n\n")),
            "new client {n} under 2,000 idle and 200 trickling connections"
        );
        postfix.push(c);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rss = rss_mb(pid);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut cut = Vec::new();
    while let Some(r) = tricklers.join_next().await {
        let (i, sent, open) = r.unwrap();
        if !open {
            cut.push((i, sent));
        }
    }
    let max_wait = waits.iter().copied().fold(0.0, f64::max);
    eprintln!(
        "RELIABILITY: max_connections 1000, 2000 idle + 200 trickling connections: 20 new clients served, slowest in {max_wait:.1} ms; rss {rss:.1} MB; evictions {}",
        p.count_log("closed the connection idle longest")
    );
    assert!(
        max_wait < 2000.0,
        "a new client waited {max_wait:.0} ms: {waits:?}"
    );
    assert!(cut.is_empty(), "trickling requests were cut: {cut:?}");
    assert!(rss < 200.0, "resident memory {rss} MB");
    // The connections idle longest went first; the newest idle ones are still served.
    let mut first = Client::from_stream(held.remove(0));
    let got = first.answer(Duration::from_secs(20)).await;
    assert_eq!(
        got,
        Answer::Closed(String::new()),
        "the connection idle longest was not closed"
    );
    let mut last = Client::from_stream(held.pop().unwrap());
    let r = last.ask(&postfix_request(&[])).await;
    assert_eq!(
        r, "action=dunno\n\n",
        "the newest idle connection got {r:?}"
    );
    for (n, c) in postfix.iter_mut().enumerate().rev().take(5) {
        let r = c.ask(&postfix_request(&[])).await;
        assert_eq!(
            r, "action=dunno\n\n",
            "postfix connection {n} afterwards got {r:?}"
        );
    }
}
