//! mod-test: the module valvulad's own tests load, and a template for module authors.
//!
//! It answers its configured verdict (`[module.mod-test] action = "reject"`,
//! `text = "..."`, default DUNNO), to every request or, with a `when` table
//! (`[module.mod-test.when] sender = "x@y"`), only to requests whose attributes all have
//! the given values. Requests can steer it with attributes a real Postfix
//! never sends, so tests can make a module misbehave on purpose:
//! `x_test_action`/`x_test_text` (answer this), `x_test_panic=1`, `x_test_error=1`,
//! `x_test_sleep_ms=N`, `x_test_invalid=1` (a reply text with a newline),
//! `x_test_leak_mb=N` (leaks N MiB, at most 256, per call),
//! `x_test_config=KEY` (answer `info` with the current config value, to observe reloads),
//! `x_test_ticks=1` (answer `info` with the ticks received: count, last kinds, last time),
//! `x_test_consume=KEY` with `x_test_limit` (default 10), `x_test_amount` (default 1) and
//! `x_test_window` (`hour`, `day`, `week`, `month` or seconds of a sliding window; several
//! separated by commas, each with the same limit): charge the host's counters and answer
//! `ok used=N` or `reject limit reached used=N`.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use serde::Deserialize;
use valvula_module::{
    Action, Error, Host, Module, Request, Ticks, Verdict, Window, WindowKind, export_module,
};

#[derive(Deserialize, Default, Clone)]
#[serde(default, deny_unknown_fields)]
struct Config {
    action: Option<String>,
    text: String,
    when: BTreeMap<String, String>,
    /// Make init fail, to test how the daemon refuses a module.
    fail_init: bool,
}

struct TestModule {
    host: Host,
    config: RwLock<Answer>,
    ticks: AtomicU64,
    last_kinds: AtomicU32,
    last_now: AtomicI64,
}

#[derive(Clone)]
struct Answer {
    action: Action,
    text: String,
    when: BTreeMap<String, String>,
}

fn load(host: &Host) -> Result<Answer, Error> {
    let c: Config = host.config()?;
    if c.fail_init {
        return Err("fail_init is set".into());
    }
    let action = match c.action {
        Some(a) => a.parse::<Action>()?,
        None => Action::Dunno,
    };
    Ok(Answer {
        action,
        text: c.text,
        when: c.when,
    })
}

impl Module for TestModule {
    fn init(host: Host) -> Result<Self, Error> {
        let config = load(&host)?;
        tracing::info!(action = %config.action, "mod-test ready");
        Ok(TestModule {
            host,
            config: RwLock::new(config),
            ticks: AtomicU64::new(0),
            last_kinds: AtomicU32::new(0),
            last_now: AtomicI64::new(0),
        })
    }

    fn process(&self, req: &Request<'_>) -> Result<Verdict, Error> {
        if let Some(ms) = req.get("x_test_sleep_ms").and_then(|v| v.parse().ok()) {
            std::thread::sleep(Duration::from_millis(ms));
        }
        if req.get("x_test_panic") == Some("1") {
            panic!("x_test_panic asked for a panic");
        }
        if let Some(mb) = req
            .get("x_test_leak_mb")
            .and_then(|v| v.parse::<usize>().ok())
        {
            // A module that leaks: touched pages, never freed.
            std::mem::forget(vec![0x5au8; mb.min(256) << 20]);
        }
        if req.get("x_test_error") == Some("1") {
            return Err("x_test_error asked for an error".into());
        }
        if req.get("x_test_invalid") == Some("1") {
            return Ok(Verdict::reject("two\nlines"));
        }
        if let Some(key) = req.get("x_test_config") {
            let v = self.host.config_raw(key).unwrap_or_else(|| "<none>".into());
            return Ok(Verdict::new(Action::Info, v));
        }
        if let Some(key) = req.get("x_test_consume") {
            let num = |name: &str, default: i64| {
                req.get(name)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(default)
            };
            let limit = num("x_test_limit", 10);
            let windows = req
                .get("x_test_window")
                .unwrap_or("day")
                .split(',')
                .map(|w| {
                    let kind = match w {
                        "hour" => WindowKind::Hour,
                        "day" => WindowKind::Day,
                        "week" => WindowKind::Week,
                        "month" => WindowKind::Month,
                        secs => WindowKind::Sliding(secs.parse()?),
                    };
                    Ok(Window { kind, limit })
                })
                .collect::<Result<Vec<_>, std::num::ParseIntError>>()?;
            let c = self.host.consume(key, num("x_test_amount", 1), &windows)?;
            let used = c.windows[0].used;
            return Ok(if c.admitted {
                Verdict::ok_with(format!("used={used}"))
            } else {
                Verdict::reject(format!("limit reached used={used}"))
            });
        }
        if req.get("x_test_ticks") == Some("1") {
            return Ok(Verdict::new(
                Action::Info,
                format!(
                    "ticks={} kinds={:#x} now={}",
                    self.ticks.load(Ordering::SeqCst),
                    self.last_kinds.load(Ordering::SeqCst),
                    self.last_now.load(Ordering::SeqCst)
                ),
            ));
        }
        if let Some(a) = req.get("x_test_action") {
            let text = req.get("x_test_text").unwrap_or_default();
            return Ok(Verdict::new(a.parse()?, text));
        }
        let a = self.config.read().map_err(|_| "poisoned")?.clone();
        if a.when.iter().all(|(k, v)| req.get(k) == Some(v.as_str())) {
            Ok(Verdict::new(a.action, a.text))
        } else {
            Ok(Verdict::dunno())
        }
    }

    fn tick(&self, ticks: Ticks, now: i64) {
        self.ticks.fetch_add(1, Ordering::SeqCst);
        self.last_kinds.store(ticks.0, Ordering::SeqCst);
        self.last_now.store(now, Ordering::SeqCst);
    }

    fn reconf(&self) -> Result<(), Error> {
        let c = load(&self.host)?;
        *self.config.write().map_err(|_| "poisoned")? = c;
        Ok(())
    }

    fn close(self) {
        // Tests read this line: a module loaded for a reload that was refused is closed.
        tracing::info!("mod-test closed");
    }
}

export_module!(
    TestModule,
    name = "mod-test",
    description = "test and template module"
);
