//! Raw-byte tests of the policy protocol and the chain, against an in-process daemon on
//! 127.0.0.1:0 with fake modules.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use valvula_policy::Action;
use valvula_tests::client::{Answer, Client, postfix_request};
use valvula_tests::daemon::{parse_config, start};

use crate::fakes::{Behaviour, Fake, reply, set};

const W: Duration = Duration::from_secs(5);

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
    let m = Fake::new("echo", Behaviour::Echo(attr));
    let cfg = parse_config(&format!("{extra_top}\n{}", one_listener(&["echo"], "")));
    let (d, a) = start(cfg, set(vec![m.clone()], 2000)).await;
    (d, a[0].clone(), m)
}

#[tokio::test]
async fn postfix_request_keepalive() {
    let cfg = parse_config(&one_listener(&[], ""));
    let (_d, a) = start(cfg, set(vec![], 1000)).await;
    let mut c = Client::connect(&a[0]).await;
    for _ in 0..3 {
        assert_eq!(c.ask(&postfix_request(&[])).await, "action=dunno\n\n");
    }
    // The connection is still open and idle: nothing more arrives.
    assert_eq!(c.answer(Duration::from_millis(200)).await, Answer::Silence);
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
        assert_eq!(
            c.answer(W).await,
            Answer::Reply(format!("action=info n={i}\n\n"))
        );
    }
}

#[tokio::test]
async fn codec_rules_on_the_wire() {
    let (_d, a, _) = echo_daemon("sender", "").await;
    let mut c = Client::connect(&a).await;
    // A value may contain '='.
    assert_eq!(
        c.ask(b"sender=prvs=6199d1e9f=kd5fet@dkg3t5.com\n\n").await,
        "action=info sender=prvs=6199d1e9f=kd5fet@dkg3t5.com\n\n"
    );
    // CRLF is accepted.
    assert_eq!(
        c.ask(b"sender=a@b\r\nfoo=1\r\n\r\n").await,
        "action=info sender=a@b\n\n"
    );
    // The last duplicate wins; unknown attributes are kept but do not disturb.
    assert_eq!(
        c.ask(b"sender=x@y\nx_new=1\nsender=z@w\n\n").await,
        "action=info sender=z@w\n\n"
    );
    // No trimming around '=': "sender " is another attribute.
    assert_eq!(
        c.ask(b"sender = u@v\n\n").await,
        "action=info sender=<absent>\n\n"
    );
    // An empty request (just the empty line) is a request.
    assert_eq!(c.ask(b"\n").await, "action=info sender=<absent>\n\n");
    // Empty value is present and empty.
    assert_eq!(c.ask(b"sender=\n\n").await, "action=info sender=\n\n");
}

#[tokio::test]
async fn unknown_attributes_reach_modules() {
    let (_d, a, _) = echo_daemon("policy_context", "").await;
    let mut c = Client::connect(&a).await;
    assert_eq!(
        c.ask(&postfix_request(&[("policy_context", "submission")]))
            .await,
        "action=info policy_context=submission\n\n"
    );
}

#[tokio::test]
async fn malformed_lines_close_without_reply() {
    let (_d, a, m) = echo_daemon("sender", "").await;
    for bad in [&b"request=x\nthis line has no equals\n\n"[..], b"=foo\n\n"] {
        let mut c = Client::connect(&a).await;
        c.send(bad).await;
        assert_eq!(c.answer(W).await, Answer::Closed(String::new()), "{bad:?}");
    }
    // A good request before the bad line on the same connection is still answered.
    let mut c = Client::connect(&a).await;
    c.send(b"sender=a@b\n\nnonsense\n\n").await;
    assert_eq!(
        c.answer(W).await,
        Answer::Reply("action=info sender=a@b\n\n".into())
    );
    assert_eq!(c.answer(W).await, Answer::Closed(String::new()));
    assert_eq!(m.calls(), 1);
}

#[tokio::test]
async fn eof_mid_request_is_dropped_not_processed() {
    let (_d, a, m) = echo_daemon("sender", "").await;
    let mut c = Client::connect(&a).await;
    c.send(b"request=smtpd_access_policy\nsender=a@b\n").await;
    c.stream.shutdown().await.unwrap();
    assert_eq!(c.answer(W).await, Answer::Closed(String::new()));
    // A partial line, too.
    let mut c = Client::connect(&a).await;
    c.send(b"sender=a@").await;
    c.stream.shutdown().await.unwrap();
    assert_eq!(c.answer(W).await, Answer::Closed(String::new()));
    assert_eq!(m.calls(), 0, "a partial request reached a module");
}

#[tokio::test]
async fn limits_close_the_connection() {
    let top = "[limits]\nmax_line_bytes = 100\nmax_request_bytes = 300\nmax_attributes = 5\n";
    let (_d, a, m) = echo_daemon("sender", top).await;

    // Exactly at the line limit: answered.
    let mut c = Client::connect(&a).await;
    let line = format!("sender={}\n\n", "x".repeat(100 - 7));
    assert!(
        c.ask(line.as_bytes())
            .await
            .starts_with("action=info sender=xxx")
    );
    // One byte over, with or without its newline yet.
    let mut c = Client::connect(&a).await;
    c.send(format!("sender={}\n\n", "x".repeat(94)).as_bytes())
        .await;
    assert_eq!(c.answer(W).await, Answer::Closed(String::new()));
    let mut c = Client::connect(&a).await;
    c.send("x".repeat(5000).as_bytes()).await;
    assert_eq!(c.answer(W).await, Answer::Closed(String::new()));

    // Attributes: 5 pass, 6 close.
    let five: String = (0..5).map(|i| format!("a{i}=1\n")).collect();
    let mut c = Client::connect(&a).await;
    assert!(
        c.ask(format!("{five}\n").as_bytes())
            .await
            .starts_with("action=info")
    );
    let mut c = Client::connect(&a).await;
    c.send(format!("{five}a5=1\n\n").as_bytes()).await;
    assert_eq!(c.answer(W).await, Answer::Closed(String::new()));

    // Request bytes: four 80-byte lines exceed 300 even though each line is fine.
    let mut c = Client::connect(&a).await;
    let big: String = (0..4)
        .map(|i| format!("a{i}={}\n", "y".repeat(76)))
        .collect();
    c.send(format!("{big}\n").as_bytes()).await;
    assert_eq!(c.answer(W).await, Answer::Closed(String::new()));

    assert_eq!(
        m.calls(),
        2,
        "only the requests within limits were processed"
    );
}

#[tokio::test]
async fn checkserver_health_probe() {
    let (_d, a, _) = echo_daemon("sender", "").await;
    for probe in [&b"checkserver\n"[..], b"checkserverfoo=1\n"] {
        let mut c = Client::connect(&a).await;
        c.send(probe).await;
        assert_eq!(
            c.answer(W).await,
            Answer::Closed("I'm running right".into())
        );
    }
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
        assert_eq!(cl.ask(&req).await, want, "listener {addr}");
        assert_eq!(*trail.lock().unwrap(), called, "listener {addr}");
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
    assert_eq!(after.calls(), 0, "the chain went on after a failure");
    answer
}

#[tokio::test]
async fn on_error_actions() {
    let r = |s: &str| Answer::Reply(s.to_owned());
    assert_eq!(
        on_error_case("dunno", Behaviour::Fail).await,
        r("action=dunno\n\n")
    );
    assert_eq!(
        on_error_case("defer", Behaviour::Fail).await,
        r("action=defer 4.3.0 try later\n\n")
    );
    assert_eq!(
        on_error_case("reject", Behaviour::Fail).await,
        r("action=reject 4.3.0 try later\n\n")
    );
    assert_eq!(
        on_error_case("disconnect", Behaviour::Fail).await,
        Answer::Closed(String::new())
    );
    // Panics and timeouts are failures too.
    assert_eq!(
        on_error_case("defer", Behaviour::Panic).await,
        r("action=defer 4.3.0 try later\n\n")
    );
    assert_eq!(
        on_error_case("defer", Behaviour::Sleep(Duration::from_secs(3))).await,
        r("action=defer 4.3.0 try later\n\n")
    );
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
    for _ in 0..3 {
        assert_eq!(p.ask(b"x=1\n\n").await, "action=dunno\n\n");
        assert_eq!(f.ask(b"x=1\n\n").await, "action=reject fine\n\n");
    }
}

#[tokio::test]
async fn failing_module_is_quarantined_then_retried() {
    let bad = Fake::new("bad", Behaviour::Fail);
    let cfg = parse_config(&one_listener(&["bad"], "on_error = \"defer\""));
    // settings(): quarantine after 3 failures, for 300 ms.
    let (_d, a) = start(cfg, set(vec![bad.clone()], 1000)).await;
    let mut c = Client::connect(&a[0]).await;
    for _ in 0..6 {
        assert!(c.ask(b"x=1\n\n").await.starts_with("action=defer"));
    }
    assert_eq!(bad.calls(), 3, "a quarantined module was still called");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(c.ask(b"x=1\n\n").await.starts_with("action=defer"));
    assert_eq!(
        bad.calls(),
        4,
        "the module was not retried after its quarantine"
    );
}

#[tokio::test]
async fn idle_and_partial_request_timeouts() {
    let top = "[limits]\nidle_timeout = \"300ms\"\nrequest_timeout = \"300ms\"\n";
    let (_d, a, m) = echo_daemon("sender", top).await;
    // Idle: answered, then closed once idle for the timeout.
    let mut c = Client::connect(&a).await;
    assert!(c.ask(b"sender=a@b\n\n").await.starts_with("action=info"));
    assert_eq!(
        c.answer(Duration::from_secs(3)).await,
        Answer::Closed(String::new())
    );
    // A request that stops half-way: closed without a reply and not processed.
    let mut c = Client::connect(&a).await;
    c.send(b"sender=a@b\nrecipient=").await;
    assert_eq!(
        c.answer(Duration::from_secs(3)).await,
        Answer::Closed(String::new())
    );
    assert_eq!(m.calls(), 1);
}

#[tokio::test]
async fn clients_outside_allowed_networks_are_refused() {
    let cfg = parse_config(&one_listener(&[], "allow = [\"192.0.2.0/24\"]"));
    let (_d, a) = start(cfg, set(vec![], 1000)).await;
    let mut c = Client::connect(&a[0]).await;
    c.send(b"x=1\n\n").await;
    assert_eq!(c.answer(W).await, Answer::Closed(String::new()));
}

#[tokio::test]
async fn connection_cap() {
    let cfg = parse_config(&one_listener(&[], "max_connections = 2"));
    let (_d, a) = start(cfg, set(vec![], 1000)).await;
    let mut c1 = Client::connect(&a[0]).await;
    let mut c2 = Client::connect(&a[0]).await;
    assert_eq!(c1.ask(b"x=1\n\n").await, "action=dunno\n\n");
    assert_eq!(c2.ask(b"x=1\n\n").await, "action=dunno\n\n");
    let mut c3 = Client::connect(&a[0]).await;
    c3.send(b"x=1\n\n").await;
    assert_eq!(c3.answer(W).await, Answer::Closed(String::new()));
    // Existing connections keep working, and a slot frees when one closes.
    assert_eq!(c1.ask(b"x=1\n\n").await, "action=dunno\n\n");
    drop(c2);
    let mut c4 = None;
    for _ in 0..50 {
        let mut c = Client::connect(&a[0]).await;
        c.send(b"x=1\n\n").await;
        if let Answer::Reply(r) = c.answer(W).await {
            assert_eq!(r, "action=dunno\n\n");
            c4 = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(c4.is_some(), "the freed slot was never reused");
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
    assert_eq!(c.ask(b"x=1\n\n").await, "action=reject no\n\n");

    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o660
    );
    let mut u = tokio::net::UnixStream::connect(&sock).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    u.write_all(b"x=1\n\n").await.unwrap();
    let mut buf = [0u8; 64];
    let n = u.read(&mut buf).await.unwrap();
    assert_eq!(&buf[..n], b"action=reject no\n\n");
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
    assert_eq!(c.ask(b"x=1\n\n").await, "action=dunno\n\n");
    // Same name and address: the listener (and this connection) is kept; new chain.
    let cfg2 = parse_config(
        "[[listener]]\nname=\"l\"\naddress=\"127.0.0.1:0\"\nmodules=[\"rej\"]\n\
         [[listener]]\nname=\"new\"\naddress=\"127.0.0.1:0\"\nmodules=[]\n",
    );
    d.apply(cfg2, modules).await.unwrap();
    assert_eq!(c.ask(b"x=1\n\n").await, "action=reject now rejecting\n\n");
    assert_eq!(d.bound().len(), 2);
}

use tokio::io::AsyncWriteExt as _;
