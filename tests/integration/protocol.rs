//! Raw-byte tests of the policy protocol and the chain, against an in-process daemon on
//! 127.0.0.1:0 with fake modules.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use valvula_policy::Action;
use valvula_tests::client::{Answer, Client, postfix_request};
use valvula_tests::daemon::{parse_config, start};
use valvula_tests::eventually;

use crate::fakes::{Behaviour, Fake, reply, set};

/// How long an answer (or a close) may take: generous, for a loaded 2-core machine; an
/// answer that comes sooner ends the wait at once.
const W: Duration = Duration::from_secs(20);

/// Waits until listener "l" counts `n` connections waiting between requests: a client
/// has its reply a moment before the daemon files its connection as idle.
async fn wait_idle(d: &valvulad::server::Daemon, n: usize) {
    let want = format!("valvulad_connections_idle{{listener=\"l\"}} {n}\n");
    assert!(
        eventually(W, || valvulad::admin::metrics::render(d).contains(&want)).await,
        "not {n} idle connections:\n{}",
        valvulad::admin::metrics::render(d)
    );
}

fn one_listener(chain: &[&str], extra: &str) -> String {
    let chain: Vec<String> = chain.iter().map(|c| format!("{c:?}")).collect();
    format!(
        "[[listener]]\nname = \"l\"\naddress = \"127.0.0.1:0\"\nmodules = [{}]\n{extra}\n",
        chain.join(", ")
    )
}

async fn echo_daemon(
    attr: &'static str,
    extra_top: &str,
) -> (valvulad::server::Daemon, String, Arc<Fake>) {
    echo_daemon_with(attr, extra_top, "").await
}

/// An echo daemon whose listener has `listener_extra` keys.
async fn echo_daemon_with(
    attr: &'static str,
    extra_top: &str,
    listener_extra: &str,
) -> (valvulad::server::Daemon, String, Arc<Fake>) {
    let m = Fake::new("echo", Behaviour::Echo(attr));
    let cfg = parse_config(&format!(
        "{extra_top}\n{}",
        one_listener(&["echo"], listener_extra)
    ));
    let (d, a) = start(cfg, set(vec![m.clone()], 2000)).await;
    (d, a[0].clone(), m)
}

#[tokio::test]
async fn postfix_request_keepalive() {
    let cfg = parse_config(&one_listener(&[], ""));
    let (_d, a) = start(cfg, set(vec![], 1000)).await;
    let mut c = Client::connect(&a[0]).await;
    for i in 0..3 {
        let r = c.ask(&postfix_request(&[])).await;
        assert_eq!(
            r, "action=dunno\n\n",
            "request {i} on the kept connection got {r:?}"
        );
    }
    // The connection is still open and idle: nothing more arrives.
    let a = c.answer(Duration::from_millis(200)).await;
    assert_eq!(
        a,
        Answer::Silence,
        "after the last reply the connection gave {a:?}"
    );
}

#[tokio::test]
async fn back_to_back_requests_answered_in_order() {
    let (_d, a, _) = echo_daemon("n", "").await;
    let mut c = Client::connect(&a).await;
    let mut all = Vec::new();
    for i in 0..20 {
        all.extend_from_slice(format!("request=smtpd_access_policy\nn={i}\n\n").as_bytes());
    }
    c.send(&all).await;
    for i in 0..20 {
        let a = c.answer(W).await;
        assert_eq!(
            a,
            Answer::Reply(format!("action=info n={i}\n\n")),
            "reply {i} of 20 back-to-back requests was {a:?}"
        );
    }
}

#[tokio::test]
async fn codec_rules_on_the_wire() {
    let (_d, a, _) = echo_daemon("sender", "").await;
    let mut c = Client::connect(&a).await;
    for (what, request, want) in [
        (
            "a value may contain '='",
            &b"sender=prvs=6199d1e9f=kd5fet@dkg3t5.com\n\n"[..],
            "action=info sender=prvs=6199d1e9f=kd5fet@dkg3t5.com\n\n",
        ),
        (
            "CRLF is accepted",
            b"sender=a@b\r\nfoo=1\r\n\r\n",
            "action=info sender=a@b\n\n",
        ),
        (
            "the last duplicate wins; unknown attributes do not disturb",
            b"sender=x@y\nx_new=1\nsender=z@w\n\n",
            "action=info sender=z@w\n\n",
        ),
        (
            "no trimming around '=': \"sender \" is another attribute",
            b"sender = u@v\n\n",
            "action=info sender=<absent>\n\n",
        ),
        (
            "an empty request (just the empty line) is a request",
            b"\n",
            "action=info sender=<absent>\n\n",
        ),
        (
            "an empty value is present and empty",
            b"sender=\n\n",
            "action=info sender=\n\n",
        ),
    ] {
        let r = c.ask(request).await;
        assert_eq!(r, want, "{what}: got {r:?}");
    }
}

#[tokio::test]
async fn unknown_attributes_reach_modules() {
    let (_d, a, _) = echo_daemon("policy_context", "").await;
    let mut c = Client::connect(&a).await;
    let r = c
        .ask(&postfix_request(&[("policy_context", "submission")]))
        .await;
    assert_eq!(
        r, "action=info policy_context=submission\n\n",
        "the module saw {r:?}"
    );
}

#[tokio::test]
async fn malformed_lines_close_without_reply() {
    let (d, a, m) = echo_daemon("sender", "").await;
    let bad: [&[u8]; 6] = [
        b"request=x\nthis line has no equals\n\n",
        b"=foo\n\n",
        // NUL anywhere in a line: Postfix never sends one.
        b"request=smtpd_access_policy\nsender=a\0b@example.com\n\n",
        b"request=smtpd_access_policy\nsend\0er=a@example.com\n\n",
        b"\0\n\n",
        b"request=smtpd_access_policy\nsender=a@example.com\0\n\n",
    ];
    for bad in bad {
        let mut c = Client::connect(&a).await;
        c.send(bad).await;
        let got = c.answer(W).await;
        assert_eq!(
            got,
            Answer::Closed(String::new()),
            "{:?} was not closed without a reply",
            String::from_utf8_lossy(bad)
        );
    }
    // A good request before the bad line on the same connection is still answered.
    let mut c = Client::connect(&a).await;
    c.send(b"sender=a@b\n\nnonsense\n\n").await;
    let got = c.answer(W).await;
    assert_eq!(
        got,
        Answer::Reply("action=info sender=a@b\n\n".into()),
        "the good request before a bad line got {got:?}"
    );
    let got = c.answer(W).await;
    assert_eq!(
        got,
        Answer::Closed(String::new()),
        "the bad line after it gave {got:?}"
    );
    assert_eq!(
        m.calls(),
        1,
        "the module was called for a malformed request"
    );
    let metrics = valvulad::admin::metrics::render(&d);
    assert!(
        metrics
            .lines()
            .any(|l| l == "valvulad_malformed_requests_total{listener=\"l\"} 7"),
        "every malformed request is counted:\n{metrics}"
    );
}

#[tokio::test]
async fn eof_mid_request_is_dropped_not_processed() {
    let (_d, a, m) = echo_daemon("sender", "").await;
    let mut c = Client::connect(&a).await;
    c.send(b"request=smtpd_access_policy\nsender=a@b\n").await;
    c.stream.shutdown().await.unwrap();
    let got = c.answer(W).await;
    assert_eq!(
        got,
        Answer::Closed(String::new()),
        "EOF after attributes: {got:?}"
    );
    // A partial line, too.
    let mut c = Client::connect(&a).await;
    c.send(b"sender=a@").await;
    c.stream.shutdown().await.unwrap();
    let got = c.answer(W).await;
    assert_eq!(got, Answer::Closed(String::new()), "EOF in a line: {got:?}");
    assert_eq!(m.calls(), 0, "a partial request reached a module");
}

#[tokio::test]
async fn limits_close_the_connection() {
    let top = "[limits]\nmax_line_bytes = 100\nmax_request_bytes = 300\nmax_attributes = 5\n";
    let (_d, a, m) = echo_daemon("sender", top).await;
    let closed = |what: &str, got: Answer| {
        assert_eq!(
            got,
            Answer::Closed(String::new()),
            "{what}: expected a close without a reply"
        );
    };

    // Exactly at the line limit: answered.
    let mut c = Client::connect(&a).await;
    let line = format!("sender={}\n\n", "x".repeat(100 - 7));
    let r = c.ask(line.as_bytes()).await;
    assert!(
        r.starts_with("action=info sender=xxx"),
        "a line at the limit got {r:?}"
    );
    // One byte over, with or without its newline yet.
    let mut c = Client::connect(&a).await;
    c.send(format!("sender={}\n\n", "x".repeat(94)).as_bytes())
        .await;
    closed("a line one byte over", c.answer(W).await);
    let mut c = Client::connect(&a).await;
    c.send("x".repeat(5000).as_bytes()).await;
    closed("5000 bytes without a newline", c.answer(W).await);

    // Attributes: 5 pass, 6 close.
    let five: String = (0..5).map(|i| format!("a{i}=1\n")).collect();
    let mut c = Client::connect(&a).await;
    let r = c.ask(format!("{five}\n").as_bytes()).await;
    assert!(r.starts_with("action=info"), "5 attributes got {r:?}");
    let mut c = Client::connect(&a).await;
    c.send(format!("{five}a5=1\n\n").as_bytes()).await;
    closed("6 attributes", c.answer(W).await);

    // Request bytes: four 80-byte lines exceed 300 even though each line is fine.
    let mut c = Client::connect(&a).await;
    let big: String = (0..4)
        .map(|i| format!("a{i}={}\n", "y".repeat(76)))
        .collect();
    c.send(format!("{big}\n").as_bytes()).await;
    closed("a 325-byte request", c.answer(W).await);

    assert_eq!(
        m.calls(),
        2,
        "only the requests within limits were processed"
    );
}

#[tokio::test]
async fn checkserver_health_probe() {
    let (_d, a, m) = echo_daemon("sender", "").await;
    // As the first line of a connection, and after a complete request on it.
    for probe in [
        &b"checkserver\n"[..],
        b"checkserverfoo=1\n",
        b"sender=a@b\n\ncheckserver\n",
    ] {
        let mut c = Client::connect(&a).await;
        c.send(probe).await;
        let mut got = c.answer(W).await;
        if probe.starts_with(b"sender") {
            assert_eq!(
                got,
                Answer::Reply("action=info sender=a@b\n\n".into()),
                "the request before the probe got {got:?}"
            );
            got = c.answer(W).await;
        }
        assert_eq!(
            got,
            Answer::Closed("I'm running right".into()),
            "probe {:?} got {got:?}",
            String::from_utf8_lossy(probe)
        );
    }
    // Inside a request it is an ordinary line: an attribute when it has '='...
    let mut c = Client::connect(&a).await;
    let r = c
        .ask(b"request=smtpd_access_policy\ncheckserver=1\nsender=a@b\n\n")
        .await;
    assert_eq!(
        r, "action=info sender=a@b\n\n",
        "a checkserver attribute inside a request dropped it: {r:?}"
    );
    let r = c.ask(b"request=smtpd_access_policy\nsender=c@d\n\n").await;
    assert_eq!(
        r, "action=info sender=c@d\n\n",
        "the connection did not go on after it: {r:?}"
    );
    // ...and a malformed line without one.
    let mut c = Client::connect(&a).await;
    c.send(b"request=smtpd_access_policy\ncheckserver\nsender=a@b\n\n")
        .await;
    let got = c.answer(W).await;
    assert_eq!(
        got,
        Answer::Closed(String::new()),
        "a bare checkserver line inside a request got {got:?}"
    );
    assert_eq!(m.calls(), 3, "requests processed");
}

#[tokio::test]
async fn chain_order_first_non_dunno_wins() {
    let trail = Arc::new(Mutex::new(Vec::new()));
    let a = Fake::with_trail("a", Behaviour::Answer(None), &trail);
    let b = Fake::with_trail(
        "b",
        Behaviour::Answer(reply(Action::Reject, "from b")),
        &trail,
    );
    let c = Fake::with_trail(
        "c",
        Behaviour::Answer(reply(Action::Reject, "from c")),
        &trail,
    );
    let ok = Fake::with_trail("ok", Behaviour::Answer(reply(Action::Ok, "")), &trail);
    let cfg = parse_config(
        "[[listener]]\nname=\"abc\"\naddress=\"127.0.0.1:0\"\nmodules=[\"a\",\"b\",\"c\"]\n\
         [[listener]]\nname=\"cb\"\naddress=\"127.0.0.1:0\"\nmodules=[\"a\",\"c\",\"b\"]\n\
         [[listener]]\nname=\"okfirst\"\naddress=\"127.0.0.1:0\"\nmodules=[\"ok\",\"b\"]\n\
         [[listener]]\nname=\"dunnos\"\naddress=\"127.0.0.1:0\"\nmodules=[\"a\",\"a\"]\n\
         [[listener]]\nname=\"empty\"\naddress=\"127.0.0.1:0\"\nmodules=[]\n",
    );
    let (_d, addrs) = start(
        cfg,
        set(vec![a.clone(), b.clone(), c.clone(), ok.clone()], 1000),
    )
    .await;
    let req = postfix_request(&[]);
    let expect = [
        ("action=reject from b\n\n", vec!["a", "b"]),
        ("action=reject from c\n\n", vec!["a", "c"]),
        ("action=ok\n\n", vec!["ok"]),
        ("action=dunno\n\n", vec!["a", "a"]),
        ("action=dunno\n\n", vec![]),
    ];
    for (addr, (want, called)) in addrs.iter().zip(expect) {
        trail.lock().unwrap().clear();
        let mut cl = Client::connect(addr).await;
        let got = cl.ask(&req).await;
        assert_eq!(got, want, "listener {addr} answered {got:?}");
        let trail = trail.lock().unwrap().clone();
        assert_eq!(trail, called, "listener {addr} called {trail:?}");
    }
}

async fn on_error_case(on_error: &str, behaviour: Behaviour) -> Answer {
    let bad = Fake::new("bad", behaviour);
    let after = Fake::new("after", Behaviour::Answer(reply(Action::Ok, "")));
    let cfg = parse_config(&one_listener(
        &["bad", "after"],
        &format!("on_error = \"{on_error}\"\non_error_text = \"4.3.0 try later\""),
    ));
    let (_d, a) = start(cfg, set(vec![bad, after.clone()], 300)).await;
    let mut c = Client::connect(&a[0]).await;
    c.send(&postfix_request(&[])).await;
    let answer = c.answer(W).await;
    assert_eq!(
        after.calls(),
        0,
        "the chain went on after a failure (answer {answer:?})"
    );
    answer
}

#[tokio::test]
async fn on_error_actions() {
    let r = |s: &str| Answer::Reply(s.to_owned());
    for (on_error, behaviour, want) in [
        ("dunno", Behaviour::Fail, r("action=dunno\n\n")),
        (
            "defer",
            Behaviour::Fail,
            r("action=defer 4.3.0 try later\n\n"),
        ),
        (
            "reject",
            Behaviour::Fail,
            r("action=reject 4.3.0 try later\n\n"),
        ),
        ("disconnect", Behaviour::Fail, Answer::Closed(String::new())),
        // Panics and timeouts are failures too.
        (
            "defer",
            Behaviour::Panic,
            r("action=defer 4.3.0 try later\n\n"),
        ),
        (
            "defer",
            Behaviour::Sleep(Duration::from_secs(3)),
            r("action=defer 4.3.0 try later\n\n"),
        ),
    ] {
        let what = match &behaviour {
            Behaviour::Fail => "an error",
            Behaviour::Panic => "a panic",
            _ => "a timeout",
        };
        let got = on_error_case(on_error, behaviour).await;
        assert_eq!(got, want, "on_error = {on_error} after {what} gave {got:?}");
    }
}

#[tokio::test]
async fn panicking_module_does_not_stop_the_daemon() {
    let boom = Fake::new("boom", Behaviour::Panic);
    let fine = Fake::new("fine", Behaviour::Answer(reply(Action::Reject, "fine")));
    let cfg = parse_config(
        "[[listener]]\nname=\"p\"\naddress=\"127.0.0.1:0\"\nmodules=[\"boom\"]\n\
         [[listener]]\nname=\"f\"\naddress=\"127.0.0.1:0\"\nmodules=[\"fine\"]\n",
    );
    let (_d, a) = start(cfg, set(vec![boom, fine], 1000)).await;
    let mut p = Client::connect(&a[0]).await;
    let mut f = Client::connect(&a[1]).await;
    for i in 0..3 {
        let got = p.ask(b"x=1\n\n").await;
        assert_eq!(
            got, "action=dunno\n\n",
            "panicking listener, round {i}: {got:?}"
        );
        let got = f.ask(b"x=1\n\n").await;
        assert_eq!(
            got, "action=reject fine\n\n",
            "other listener, round {i}: {got:?}"
        );
    }
}

#[tokio::test]
async fn failing_module_is_quarantined_then_retried() {
    let bad = Fake::new("bad", Behaviour::Fail);
    let cfg = parse_config(&one_listener(&["bad"], "on_error = \"defer\""));
    // settings(): quarantine after 3 failures, for 300 ms.
    let (_d, a) = start(cfg, set(vec![bad.clone()], 1000)).await;
    let mut c = Client::connect(&a[0]).await;
    for i in 0..6 {
        let got = c.ask(b"x=1\n\n").await;
        assert!(got.starts_with("action=defer"), "request {i} got {got:?}");
    }
    assert_eq!(bad.calls(), 3, "a quarantined module was still called");
    // Once the quarantine is over, the next request tries the module again. Each
    // request during the quarantine is answered without calling it.
    let end = Instant::now() + W;
    while bad.calls() == 3 && Instant::now() < end {
        let got = c.ask(b"x=1\n\n").await;
        assert!(
            got.starts_with("action=defer"),
            "a request while quarantined got {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        bad.calls(),
        4,
        "the module was not retried (once) after its quarantine"
    );
}

#[tokio::test]
async fn idle_and_partial_request_timeouts() {
    let top = "[limits]\nidle_timeout = \"300ms\"\nrequest_timeout = \"300ms\"\n";
    let (_d, a, m) = echo_daemon("sender", top).await;
    // Idle: answered, then closed once idle for the timeout.
    let mut c = Client::connect(&a).await;
    let got = c.ask(b"sender=a@b\n\n").await;
    assert!(got.starts_with("action=info"), "request got {got:?}");
    let got = c.answer(W).await;
    assert_eq!(
        got,
        Answer::Closed(String::new()),
        "an idle connection past idle_timeout gave {got:?}"
    );
    // A request that stops half-way: closed without a reply and not processed.
    let mut c = Client::connect(&a).await;
    c.send(b"sender=a@b\nrecipient=").await;
    let got = c.answer(W).await;
    assert_eq!(
        got,
        Answer::Closed(String::new()),
        "a request stopped half-way gave {got:?}"
    );
    assert_eq!(m.calls(), 1, "a partial request reached the module");
}

#[tokio::test]
async fn clients_outside_allowed_networks_are_refused() {
    let cfg = parse_config(&one_listener(&[], "allow = [\"192.0.2.0/24\"]"));
    let (_d, a) = start(cfg, set(vec![], 1000)).await;
    let mut c = Client::connect(&a[0]).await;
    c.send(b"x=1\n\n").await;
    let got = c.answer(W).await;
    assert_eq!(
        got,
        Answer::Closed(String::new()),
        "a client outside the allowed networks got {got:?}"
    );
}

/// A connection that has been answered and waits for its next request gives way to a
/// new connection at the cap: Postfix reconnects when it finds its cached connection
/// closed, while a new client refused would get no answer at all.
#[tokio::test]
async fn connection_cap() {
    let cfg = parse_config(&one_listener(&[], "max_connections = 2"));
    let (d, a) = start(cfg, set(vec![], 1000)).await;
    let mut c1 = Client::connect(&a[0]).await;
    let mut c2 = Client::connect(&a[0]).await;
    let got = c1.ask(b"x=1\n\n").await;
    assert_eq!(got, "action=dunno\n\n", "c1 got {got:?}");
    wait_idle(&d, 2).await;
    let got = c2.ask(b"x=1\n\n").await;
    assert_eq!(got, "action=dunno\n\n", "c2 got {got:?}");
    wait_idle(&d, 2).await;
    // At the cap: c1, idle longest, is closed and c3 is served.
    let mut c3 = Client::connect(&a[0]).await;
    let got = c3.ask(b"x=1\n\n").await;
    assert_eq!(
        got, "action=dunno\n\n",
        "a new client at the cap got {got:?}"
    );
    let got = c1.answer(W).await;
    assert_eq!(
        got,
        Answer::Closed(String::new()),
        "the connection idle longest was not the one closed: it gave {got:?}"
    );
    let got = c2.ask(b"x=1\n\n").await;
    assert_eq!(got, "action=dunno\n\n", "c2 after the eviction got {got:?}");
    let m = valvulad::admin::metrics::render(&d);
    for line in [
        "valvulad_connections_evicted_total{listener=\"l\"} 1",
        "valvulad_connections{listener=\"l\"} 2",
        "valvulad_connections_refused_total{listener=\"l\",reason=\"cap\"} 0",
    ] {
        assert!(m.lines().any(|l| l == line), "{line} missing from:\n{m}");
    }
    // A place freed by a client that leaves is not taken from anyone.
    drop(c3);
    assert!(
        eventually(W, || valvulad::admin::metrics::render(&d)
            .contains("valvulad_connections{listener=\"l\"} 1\n"))
        .await,
        "the connection count did not drop when a client left:\n{}",
        valvulad::admin::metrics::render(&d)
    );
    let mut c4 = Client::connect(&a[0]).await;
    let got = c4.ask(b"x=1\n\n").await;
    assert_eq!(got, "action=dunno\n\n", "c4 got {got:?}");
    let got = c2.ask(b"x=1\n\n").await;
    assert_eq!(got, "action=dunno\n\n", "c2 was closed for c4: {got:?}");
}

/// A listener at its cap (50) with 48 idle connections and 2 in the middle of a request:
/// each new client is served at once, the idle connections give way in the order they
/// became idle, and the two requests in progress are never cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_cap_the_longest_idle_connection_gives_way() {
    let (d, a, m) = echo_daemon_with(
        "sender",
        "[limits]\nrequest_timeout = \"120s\"",
        "max_connections = 50",
    )
    .await;
    let mut idle = Vec::new();
    for i in 0..48 {
        let mut c = Client::connect(&a).await;
        let r = c.ask(format!("sender=idle{i}\n\n").as_bytes()).await;
        assert_eq!(
            r,
            format!("action=info sender=idle{i}\n\n"),
            "idle {i} got {r:?}"
        );
        // Idle before the next one connects, so the order they became idle is known.
        wait_idle(&d, i + 1).await;
        idle.push(c);
    }
    let mut partial = Vec::new();
    for i in 0..2 {
        let mut c = Client::connect(&a).await;
        c.send(format!("request=smtpd_access_policy\nsender=partial{i}\n").as_bytes())
            .await;
        partial.push(c);
    }
    let before = m.calls();
    assert!(
        eventually(W, || valvulad::admin::metrics::render(&d)
            .contains("valvulad_connections{listener=\"l\"} 50\n"))
        .await,
        "the listener is not full:\n{}",
        valvulad::admin::metrics::render(&d)
    );
    let mut fresh = Vec::new();
    for i in 0..10 {
        let mut c = Client::connect(&a).await;
        let r = c.ask(format!("sender=new{i}\n\n").as_bytes()).await;
        assert_eq!(
            r,
            format!("action=info sender=new{i}\n\n"),
            "new client {i} got {r:?}"
        );
        fresh.push(c);
    }
    // The ten that had been idle longest are closed...
    for (i, c) in idle.iter_mut().enumerate().take(10) {
        let got = c.answer(W).await;
        assert_eq!(
            got,
            Answer::Closed(String::new()),
            "idle connection {i} (among the 10 idle longest) gave {got:?}"
        );
    }
    // ...the requests in progress are complete and answered...
    for (i, c) in partial.iter_mut().enumerate() {
        let r = c.ask(b"\n").await;
        assert_eq!(
            r,
            format!("action=info sender=partial{i}\n\n"),
            "the request in progress {i} got {r:?}"
        );
    }
    // ...and every other connection is still served.
    for (i, c) in idle.iter_mut().enumerate().skip(10) {
        let r = c.ask(b"sender=again\n\n").await;
        assert_eq!(
            r, "action=info sender=again\n\n",
            "idle connection {i} got {r:?}"
        );
    }
    assert_eq!(
        m.calls(),
        before + 10 + 2 + 38,
        "module calls: a request was lost or doubled"
    );
    let metrics = valvulad::admin::metrics::render(&d);
    assert!(
        metrics
            .lines()
            .any(|l| l == "valvulad_connections_evicted_total{listener=\"l\"} 10"),
        "evictions not counted:\n{metrics}"
    );
}

/// A request whose modules are running is never cut: with every place taken by it, a new
/// client is refused; once it is answered and idle, it gives way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_being_processed_is_never_evicted() {
    let slow = Fake::new("slow", Behaviour::Sleep(Duration::from_secs(2)));
    let cfg = parse_config(&one_listener(&["slow"], "max_connections = 1"));
    let (d, a) = start(cfg, set(vec![slow.clone()], 20_000)).await;
    let mut c1 = Client::connect(&a[0]).await;
    c1.send(b"x=1\n\n").await;
    assert!(
        eventually(W, || slow.calls() == 1).await,
        "the module was not called"
    );
    let mut c2 = Client::connect(&a[0]).await;
    c2.send(b"x=1\n\n").await;
    let got = c2.answer(W).await;
    assert_eq!(
        got,
        Answer::Closed(String::new()),
        "a new client was admitted while the only place was processing: {got:?}"
    );
    let got = c1.answer(W).await;
    assert_eq!(
        got,
        Answer::Reply("action=ok slept\n\n".into()),
        "the request being processed got {got:?}"
    );
    // c1 turns idle just after its reply leaves: a client may be refused until then.
    let t = Instant::now();
    let mut refused = 0;
    loop {
        let mut c3 = Client::connect(&a[0]).await;
        c3.send(b"x=1\n\n").await;
        match c3.answer(W).await {
            Answer::Closed(s) if s.is_empty() && t.elapsed() < W => refused += 1,
            got => {
                assert_eq!(
                    got,
                    Answer::Reply("action=ok slept\n\n".into()),
                    "a new client once the only connection was idle got {got:?}"
                );
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = c1.answer(W).await;
    assert_eq!(
        got,
        Answer::Closed(String::new()),
        "the idle connection did not give way: {got:?}"
    );
    let m = valvulad::admin::metrics::render(&d);
    assert!(
        m.lines().any(|l| l
            == format!(
                "valvulad_connections_refused_total{{listener=\"l\",reason=\"cap\"}} {}",
                1 + refused
            )),
        "the refusal was not counted:\n{m}"
    );
}

/// A listener full of requests that trickle in (one byte now and then, never complete):
/// once they have stalled (Postfix sends a request in one write), the oldest gives way to
/// a new client, which is served well before request_timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_requests_give_way_when_no_connection_is_idle() {
    let (d, a, _) = echo_daemon_with(
        "sender",
        "[limits]\nrequest_timeout = \"120s\"",
        "max_connections = 3",
    )
    .await;
    let mut tricklers = Vec::new();
    for i in 0..3 {
        let mut c = Client::connect(&a).await;
        c.send(format!("request=smtpd_access_policy\nsender=t{i}").as_bytes())
            .await;
        // Its bytes read (a connection whose bytes are still unread counts as idle).
        assert!(
            eventually(W, || {
                let m = valvulad::admin::metrics::render(&d);
                m.contains(&format!(
                    "valvulad_connections{{listener=\"l\"}} {}\n",
                    i + 1
                )) && m.contains("valvulad_connections_idle{listener=\"l\"} 0\n")
            })
            .await,
            "trickler {i} is not in a request:\n{}",
            valvulad::admin::metrics::render(&d)
        );
        tricklers.push(c);
    }
    let t = Instant::now();
    let mut served = None;
    while served.is_none() && t.elapsed() < W {
        let mut c = Client::connect(&a).await;
        c.send(b"sender=new\n\n").await;
        match c.answer(W).await {
            Answer::Reply(r) => {
                assert_eq!(r, "action=info sender=new\n\n", "the new client got {r:?}");
                served = Some(c);
            }
            Answer::Closed(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            Answer::Silence => panic!("a new connection got neither a reply nor a close"),
        }
    }
    assert!(
        served.is_some(),
        "no new client was served in {:?} with the listener full of stalled requests",
        t.elapsed()
    );
    let got = tricklers[0].answer(W).await;
    assert_eq!(
        got,
        Answer::Closed(String::new()),
        "the oldest stalled request was not the one closed: {got:?}"
    );
    for (i, c) in tricklers.iter_mut().enumerate().skip(1) {
        let r = c.ask(b"\n\n").await;
        assert_eq!(
            r,
            format!("action=info sender=t{i}\n\n"),
            "stalled request {i}, completed, got {r:?}"
        );
    }
}

/// A client that sends requests and never reads its replies: once its socket buffers
/// are full the reply cannot be written, and the connection is closed after
/// request_timeout instead of holding its task (and the requests behind it) for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_its_replies_is_closed() {
    let (d, a, m) = echo_daemon("sender", "[limits]\nrequest_timeout = \"1s\"").await;
    let mut c = Client::connect(&a).await;
    let batch: Vec<u8> = (0..1000)
        .flat_map(|_| b"sender=a@b\n\n".iter().copied())
        .collect();
    let t = Instant::now();
    let mut sent = 0usize;
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(5), c.stream.write_all(&batch)).await {
            Ok(Ok(())) => sent += 1000,
            Ok(Err(_)) => break true,
            // Both directions are full: the daemon waits on its write, we on ours.
            Err(_) => {}
        }
        if t.elapsed() > Duration::from_secs(120) {
            break false;
        }
    };
    assert!(
        closed,
        "still open after {:?}, {sent} requests sent, {} processed",
        t.elapsed(),
        m.calls()
    );
    assert!(
        eventually(W, || valvulad::admin::metrics::render(&d)
            .contains("valvulad_connections{listener=\"l\"} 0\n"))
        .await,
        "the connection is still counted open:\n{}",
        valvulad::admin::metrics::render(&d)
    );
}

#[tokio::test]
async fn ipv6_and_unix_socket_listeners() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("policy.sock");
    let cfg = parse_config(&format!(
        "[[listener]]\nname=\"v6\"\naddress=\"[::1]:0\"\nmodules=[\"rej\"]\n\
         [[listener]]\nname=\"unix\"\naddress=\"unix:{}\"\nmodules=[\"rej\"]\nsocket_mode=\"0660\"\n",
        sock.display()
    ));
    let rej = Fake::new("rej", Behaviour::Answer(reply(Action::Reject, "no")));
    let (d, a) = start(cfg, set(vec![rej], 1000)).await;
    let mut c = Client::connect(&a[0]).await;
    let got = c.ask(b"x=1\n\n").await;
    assert_eq!(
        got, "action=reject no\n\n",
        "IPv6 listener answered {got:?}"
    );

    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "socket mode {mode:o}");
    let mut u = tokio::net::UnixStream::connect(&sock).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    u.write_all(b"x=1\n\n").await.unwrap();
    let mut buf = [0u8; 64];
    let n = u.read(&mut buf).await.unwrap();
    assert_eq!(
        &buf[..n],
        b"action=reject no\n\n",
        "unix listener answered {:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    drop(u);
    d.shutdown(Duration::from_secs(2)).await;
    assert!(!sock.exists(), "the socket file was left behind");
}

#[tokio::test]
async fn apply_swaps_the_chain_for_open_connections() {
    let rej = Fake::new(
        "rej",
        Behaviour::Answer(reply(Action::Reject, "now rejecting")),
    );
    let cfg1 = parse_config("[[listener]]\nname=\"l\"\naddress=\"127.0.0.1:0\"\nmodules=[]\n");
    let modules = set(vec![rej], 1000);
    let (d, a) = start(cfg1, modules.clone()).await;
    let mut c = Client::connect(&a[0]).await;
    let got = c.ask(b"x=1\n\n").await;
    assert_eq!(got, "action=dunno\n\n", "before the swap: {got:?}");
    // Same name and address: the listener (and this connection) is kept; new chain.
    let cfg2 = parse_config(
        "[[listener]]\nname=\"l\"\naddress=\"127.0.0.1:0\"\nmodules=[\"rej\"]\n\
         [[listener]]\nname=\"new\"\naddress=\"127.0.0.1:0\"\nmodules=[]\n",
    );
    d.apply(cfg2, modules).await.unwrap();
    let got = c.ask(b"x=1\n\n").await;
    assert_eq!(
        got, "action=reject now rejecting\n\n",
        "after the swap: {got:?}"
    );
    let bound = d.bound();
    assert_eq!(bound.len(), 2, "listeners bound: {bound:?}");
}

use tokio::io::AsyncWriteExt as _;
