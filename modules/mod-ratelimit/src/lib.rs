//! mod-ratelimit: every sender-limit scheme of today's policy daemons, in one module.
//!
//! Policies each name an identity (SASL user, its domain, envelope sender, sender
//! domain, client address or network, a combination, or a fallback list), a metric
//! (messages, recipients, bytes, bytes x recipients) and rules: a default, per-domain,
//! per-user and per-network rules (most specific wins), and per-identity overrides in the
//! `ratelimit_override` table, editable live. Limits are (window, limit) pairs over
//! calendar or sliding windows, charged together through the host's atomic `consume`.
//!
//! Stages: requests in `charge_at` states are charged; others only refuse early. A
//! charge is recorded under Postfix's `instance` (plus stage and recipient), so the same
//! message is never charged twice, not even when Postfix re-sends a request after a
//! policy timeout.

#![forbid(unsafe_code)]

mod config;
mod tables;

use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use config::{Applies, Match, Metric, Part, Policy, Rule, Settings};
use valvula_module::{
    Action, Consumption, Error, Host, Module, Request, Ticks, Verdict, Window, export_module,
};

struct RateLimit {
    host: Host,
    settings: RwLock<Arc<Settings>>,
}

fn load(host: &Host) -> Result<Settings, Error> {
    config::settings(host.config()?)
}

/// What one request is worth in a metric: recipients are `recipient_count` (1 per RCPT
/// request, where Postfix sends 0), bytes are `size`.
fn amount(metric: Metric, req: &Request<'_>) -> i64 {
    let rcpts = req.recipient_count().max(1) as i64;
    let size = req.size() as i64;
    match metric {
        Metric::Messages => 1,
        Metric::Recipients => rcpts,
        Metric::Bytes => size,
        Metric::BytesXRecipients => size.saturating_mul(rcpts),
    }
}

fn domain_of(addr: &str) -> Option<String> {
    addr.rsplit_once('@')
        .map(|(_, d)| d.to_owned())
        .filter(|d| !d.is_empty())
}

fn network(ip: IpAddr, v4: u8, v6: u8) -> Option<String> {
    let n = match ip {
        IpAddr::V4(_) => ipnet::IpNet::new(ip, v4).ok()?,
        IpAddr::V6(_) => ipnet::IpNet::new(ip, v6).ok()?,
    };
    Some(n.trunc().to_string())
}

/// The request's identity for a policy: the first key of the list whose parts are all
/// present, parts joined by `+`.
fn identity(p: &Policy, req: &Request<'_>) -> Option<String> {
    let sasl = req.sasl_username().map(str::to_ascii_lowercase);
    let sender = req
        .sender()
        .filter(|s| !s.is_empty())
        .map(str::to_ascii_lowercase);
    let ip: Option<IpAddr> = req.client_address().and_then(|a| a.parse().ok());
    'keys: for key in &p.keys {
        let mut parts = Vec::new();
        for part in key {
            let v = match part {
                Part::SaslUser => sasl.clone(),
                Part::SaslDomain => sasl.as_deref().and_then(domain_of),
                Part::Sender => sender.clone(),
                Part::SenderDomain => sender.as_deref().and_then(domain_of),
                Part::ClientAddress => ip.map(|i| i.to_string()),
                Part::ClientNetwork(v4, v6) => ip.and_then(|i| network(i, *v4, *v6)),
            };
            match v {
                Some(v) => parts.push(v),
                None => continue 'keys,
            }
        }
        return Some(parts.join("+"));
    }
    None
}

/// The configured rule for an identity: user, then domain, then the narrowest network.
fn config_rule<'a>(p: &'a Policy, ident: &str, req: &Request<'_>) -> &'a Rule {
    let ip: Option<IpAddr> = req.client_address().and_then(|a| a.parse().ok());
    let addrs: Vec<String> = ident.split('+').map(str::to_owned).collect();
    for (m, r) in &p.rules {
        let hit = match m {
            Match::User(u) => addrs.iter().any(|a| a == u),
            Match::Domain(d) => addrs
                .iter()
                .any(|a| a == d || domain_of(a).as_deref() == Some(d.as_str())),
            Match::Network(n) => ip.is_some_and(|i| n.contains(&i)),
        };
        if hit {
            return r;
        }
    }
    &p.default
}

/// Fills a reply text's placeholders from the window that decided.
fn render(
    text: &str,
    ident: &str,
    limit: i64,
    used: i64,
    window: &str,
    retry_after: i64,
) -> String {
    text.replace("{identity}", ident)
        .replace("{limit}", &limit.to_string())
        .replace("{used}", &used.to_string())
        .replace("{remaining}", &(limit - used).max(0).to_string())
        .replace("{window}", window)
        .replace("{retry_after}", &retry_after.max(0).to_string())
        .replace(['\r', '\n'], " ")
}

/// The reply: a raw action writes its code before the text.
fn verdict(action: Action, code: &str, text: String) -> Verdict {
    match action {
        Action::Raw if text.is_empty() => Verdict::new(Action::Raw, code),
        Action::Raw => Verdict::new(Action::Raw, format!("{code} {text}")),
        a => Verdict::new(a, text),
    }
}

struct Outcome {
    refusal: Option<Verdict>,
    soft: Option<Verdict>,
}

impl RateLimit {
    fn settings(&self) -> Result<Arc<Settings>, Error> {
        Ok(self.settings.read().map_err(|_| "poisoned")?.clone())
    }

    /// Checks (and, at a charging stage, charges) one policy.
    #[allow(clippy::too_many_arguments)]
    fn policy(
        &self,
        s: &Settings,
        p: &Policy,
        req: &Request<'_>,
        charge: bool,
        state: &str,
        now: i64,
    ) -> Result<Outcome, Error> {
        let none = Outcome {
            refusal: None,
            soft: None,
        };
        let Some(ident) = identity(p, req) else {
            return Ok(none);
        };
        let base = config_rule(p, &ident, req);
        let rule = tables::effective_rule(&self.host, p, &ident, base, now)?;
        if rule.limits.is_empty() {
            return Ok(none);
        }
        let windows: Vec<Window> = rule
            .limits
            .iter()
            .map(|(k, l, _)| Window {
                kind: *k,
                limit: *l,
            })
            .collect();
        let key = format!("{}:{ident}", p.name);
        let n = amount(p.metric, req);
        if !charge {
            let c = self.host.peek(&key, n, &windows)?;
            return Ok(Outcome {
                refusal: (!c.admitted).then(|| self.refusal(s, p, &rule, &ident, &c, now)),
                soft: None,
            });
        }
        // One charge per message (and recipient, for per-RCPT counting) and stage: the
        // host records the token with the charge, in one transaction.
        let c = match &req.once_token(&p.name) {
            Some(t) => self.host.consume_once(&key, t, n, &windows)?,
            None => self.host.consume(&key, n, &windows)?,
        };
        if c.repeated {
            tracing::info!(policy = %p.name, identity = %ident, instance = req.instance().unwrap_or(""), state, "already charged for this message; not charged again");
            return Ok(none);
        }
        if !c.admitted {
            if s.count_refused {
                let unlimited: Vec<Window> = windows
                    .iter()
                    .map(|w| Window {
                        kind: w.kind,
                        limit: -1,
                    })
                    .collect();
                self.host.consume(&key, n, &unlimited)?;
            }
            return Ok(Outcome {
                refusal: Some(self.refusal(s, p, &rule, &ident, &c, now)),
                soft: None,
            });
        }
        if s.accounting {
            tables::account(&self.host, s, &p.name, &ident, req, now)?;
        }
        let soft = rule.soft_at.and_then(|pct| {
            c.windows
                .iter()
                .zip(&rule.limits)
                .find_map(|(st, (_, limit, name))| {
                    (*limit > 0 && st.used * 100 >= *limit * pct as i64).then(|| {
                        verdict(
                            rule.soft_action,
                            "",
                            render(
                                &rule.soft_text,
                                &ident,
                                *limit,
                                st.used,
                                name,
                                st.resets_at - now,
                            ),
                        )
                    })
                })
        });
        tracing::info!(
            policy = %p.name,
            identity = %ident,
            amount = n,
            used = ?c.windows.iter().zip(&rule.limits).map(|(w, (_, l, name))| format!("{}/{l} {name}", w.used)).collect::<Vec<_>>(),
            "rate charged"
        );
        Ok(Outcome {
            refusal: None,
            soft,
        })
    }

    /// The reply for a refusal, the log line, and the first-refusal notification.
    fn refusal(
        &self,
        s: &Settings,
        p: &Policy,
        rule: &Rule,
        ident: &str,
        c: &Consumption,
        now: i64,
    ) -> Verdict {
        let (i, st) = c
            .windows
            .iter()
            .enumerate()
            .find(|(_, w)| !w.admitted)
            .unwrap_or((0, &c.windows[0]));
        let (kind, limit, name) = &rule.limits[i];
        let retry = st.resets_at - now;
        let text = render(&rule.text, ident, *limit, st.used, name, retry);
        tracing::warn!(policy = %p.name, identity = %ident, window = %name, used = st.used, limit, retry_after = retry, "rate limit reached");
        // Once per identity and window: a log event and the notification command.
        let key = format!("notify:{}:{ident}", p.name);
        if let Ok(first) = self.host.consume(
            &key,
            1,
            &[Window {
                kind: *kind,
                limit: 1,
            }],
        ) && first.admitted
        {
            tracing::warn!(policy = %p.name, identity = %ident, window = %name, limit, "rate limit reached for the first time in this window");
            if let Some(cmd) = &s.notify_command {
                let spawned = std::process::Command::new(cmd)
                    .env("VALVULA_POLICY", &p.name)
                    .env("VALVULA_IDENTITY", ident)
                    .env("VALVULA_WINDOW", name)
                    .env("VALVULA_LIMIT", limit.to_string())
                    .env("VALVULA_USED", st.used.to_string())
                    .env("VALVULA_RETRY_AFTER", retry.max(0).to_string())
                    .stdin(std::process::Stdio::null())
                    .spawn();
                match spawned {
                    // Reap it in the background so no zombie is left.
                    Ok(mut child) => drop(std::thread::spawn(move || child.wait())),
                    Err(e) => tracing::error!("notify_command {cmd}: {e}"),
                }
            }
        }
        verdict(rule.action, &rule.code, text)
    }
}

impl Module for RateLimit {
    fn init(host: Host) -> Result<Self, Error> {
        let settings = load(&host)?;
        if let Err(e) = tables::ensure(&host) {
            tracing::error!("cannot prepare the rate-limit tables now (retried each minute): {e}");
        }
        tracing::info!(policies = settings.policies.len(), "mod-ratelimit ready");
        Ok(RateLimit {
            host,
            settings: RwLock::new(Arc::new(settings)),
        })
    }

    fn process(&self, req: &Request<'_>) -> Result<Verdict, Error> {
        let s = self.settings()?;
        let ip: Option<IpAddr> = req.client_address().and_then(|a| a.parse().ok());
        if ip.is_some_and(|i| s.exempt_networks.iter().any(|n| n.contains(&i))) {
            return Ok(Verdict::dunno());
        }
        let sasl = req.sasl_username().map(str::to_ascii_lowercase);
        let sender = req.sender().map(str::to_ascii_lowercase);
        if [&sasl, &sender]
            .iter()
            .any(|v| v.as_ref().is_some_and(|v| s.exempt_users.contains(v)))
        {
            return Ok(Verdict::dunno());
        }
        let state = req.protocol_state().unwrap_or("").to_ascii_uppercase();
        let charge = s.charge_at.is_empty() || s.charge_at.contains(&state);
        let now = self.host.now();
        let mut soft = None;
        for p in &s.policies {
            let applies = match p.applies {
                Applies::All => true,
                Applies::Authenticated => sasl.is_some(),
                Applies::Unauthenticated => sasl.is_none(),
            };
            if !applies {
                continue;
            }
            let o = self.policy(&s, p, req, charge, &state, now)?;
            if let Some(r) = o.refusal {
                return Ok(r);
            }
            soft = soft.or(o.soft);
        }
        Ok(soft.unwrap_or_else(Verdict::dunno))
    }

    fn reconf(&self) -> Result<(), Error> {
        let s = load(&self.host)?;
        *self.settings.write().map_err(|_| "poisoned")? = Arc::new(s);
        Ok(())
    }

    fn tick(&self, ticks: Ticks, now: i64) {
        if let Err(e) = tables::ensure(&self.host) {
            tracing::debug!("tables not checked: {e}");
            return;
        }
        if ticks.hour()
            && let Ok(s) = self.settings()
            && let Err(e) = tables::expire(&self.host, &s, now)
        {
            tracing::warn!("rate-limit housekeeping failed: {e}");
        }
    }
}

export_module!(
    RateLimit,
    name = "mod-ratelimit",
    description =
        "sender rate limits: messages, recipients, bytes per user, domain, sender or network"
);
