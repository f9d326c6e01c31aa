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
pub mod inspect;
mod tables;

// Requests allocate many small short-lived values; glibc's malloc and free were a
// quarter of a charged request's instructions (BENCHMARKS.md). A module has its own
// allocator: nothing allocated here is freed by the daemon, or the other way round.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use config::{Applies, Match, Metric, Part, Policy, Rule, Settings};
use valvula_module::{
    Action, Charge, Consumption, Error, Host, Module, Request, Ticks, Verdict, Window,
    export_module,
};

struct RateLimit {
    host: Host,
    settings: RwLock<Arc<Settings>>,
    /// The zone of the daemon's calendar windows: temporary overrides end with them.
    zone: valvula_calendar::Zone,
    /// Warnings about unusable override rows, and about accounting rows not written, at
    /// most one a minute each.
    bad_override_warned: std::sync::atomic::AtomicI64,
    accounting_warned: std::sync::atomic::AtomicI64,
    /// The housekeeping index exists; a tick is making it.
    indexed: std::sync::atomic::AtomicBool,
    indexing: std::sync::atomic::AtomicBool,
}

/// True at most once a minute (of the host clock) per `last`.
fn once_a_minute(last: &std::sync::atomic::AtomicI64, now: i64) -> bool {
    use std::sync::atomic::Ordering::Relaxed;
    let l = last.load(Relaxed);
    now.saturating_sub(l) >= 60 && last.compare_exchange(l, now, Relaxed, Relaxed).is_ok()
}

fn load(host: &Host) -> Result<Settings, Error> {
    config::settings(host.config()?)
}

/// What one request is worth in a metric: recipients are `recipient_count` (1 per RCPT
/// request, where Postfix sends 0), bytes are `size`.
fn amount(metric: Metric, req: &Request<'_>) -> i64 {
    // Saturated, never wrapped: a size of 2^64-1 is huge, not negative.
    let rcpts = i64::try_from(req.recipient_count().max(1)).unwrap_or(i64::MAX);
    let size = i64::try_from(req.size()).unwrap_or(i64::MAX);
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

/// `alice+news@example.com` as `alice@example.com` when `delimiters` (Postfix's
/// `recipient_delimiter` characters) has `+`: the extension is cut at the first
/// delimiter of the local part. A local part that starts with a delimiter keeps it (it
/// has no base mailbox to fold to), as Postfix does.
fn fold(addr: &str, delimiters: &str) -> String {
    if delimiters.is_empty() {
        return addr.to_owned();
    }
    let (local, domain) = match addr.rsplit_once('@') {
        Some((l, d)) => (l, Some(d)),
        None => (addr, None),
    };
    let base = match local.char_indices().find(|(_, c)| delimiters.contains(*c)) {
        Some((i, _)) if i > 0 => &local[..i],
        _ => local,
    };
    match domain {
        Some(d) => format!("{base}@{d}"),
        None => base.to_owned(),
    }
}

/// An envelope address as Postfix resolves it for its sender checks: lower case, a
/// source route dropped, a UUCP path `host!user` as `user@host` (`swap_bangpath`) and
/// `user%host` as `user@host` (`allow_percent_hack`, both on by default), and the
/// domain without trailing dots. `alice@example.com.` or `example.com!alice` must not be
/// an identity of its own with a quota of its own.
fn canonical(addr: &str) -> String {
    let mut a = addr.trim().to_ascii_lowercase();
    if a.starts_with('@')
        && let Some((_, rest)) = a.split_once(':')
    {
        a = rest.to_owned();
    }
    if !a.contains('@') {
        if let Some((host, user)) = a.split_once('!') {
            a = format!("{user}@{host}");
        } else if let Some((user, host)) = a.rsplit_once('%') {
            a = format!("{user}@{host}");
        }
    }
    if let Some((local, domain)) = a.rsplit_once('@') {
        a = format!("{local}@{}", domain.trim_end_matches('.'));
    }
    a
}

/// The sender a policy counts: the envelope sender in its canonical form (extension
/// folded with `recipient_delimiter`). For authenticated mail, a sender that names no
/// domain (the null sender `<>`, or `<alice>`, which Postfix qualifies and accepts as
/// the login's own) counts as the login: else it would escape every sender limit.
fn sender_of(req: &Request<'_>, sasl: Option<&str>, delimiters: &str) -> Option<String> {
    let raw = req.sender().map(canonical).filter(|s| !s.is_empty());
    let qualified = raw.as_deref().is_some_and(|s| domain_of(s).is_some());
    let sender = match (qualified, sasl) {
        (false, Some(login)) => Some(login.to_owned()),
        _ => raw,
    };
    sender.map(|v| fold(&v, delimiters))
}

/// A request's identity under one policy: the values of the key's parts, kept apart.
/// (Joined into one string and split again, `alice+bulk@example.com` once became the
/// two parts `alice` and `bulk@example.com` and borrowed the rule of the latter.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ident {
    parts: Vec<String>,
    /// The policy has keys of several parts, so a part's own `+` must be escaped in
    /// the stored form for `a+b` (one part) and `a`,`b` (two) to stay apart.
    escaped: bool,
    /// The key that matched (`sender`, `sasl_user+client_address`), when the policy has
    /// a fallback list: an unauthenticated sender `alice@example.com` is not the SASL
    /// user alice, and a sender `198.51.100.0/24` is not that network.
    key: Option<String>,
}

impl Ident {
    /// The identity a stored form names under policy `p`: the inverse of
    /// [`Ident::stored`], for tools that start from a counter or override row.
    pub(crate) fn from_stored(p: &Policy, stored: &str) -> Ident {
        let escaped = p.keys.iter().any(|k| k.len() > 1);
        let (key, body) = match stored.split_once('=') {
            Some((k, body)) if p.keys.len() > 1 && inspect::bare_identity(stored) == body => {
                (Some(k.to_owned()), body)
            }
            _ => (None, stored),
        };
        let parts = if escaped {
            let mut parts = vec![String::new()];
            let mut chars = body.chars();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => parts.last_mut().unwrap().extend(chars.next()),
                    '+' => parts.push(String::new()),
                    c => parts.last_mut().unwrap().push(c),
                }
            }
            parts
        } else {
            vec![body.to_owned()]
        };
        Ident {
            parts,
            escaped,
            key,
        }
    }

    /// For logs and reply texts: the parts joined by `+`.
    fn shown(&self) -> String {
        self.parts.join("+")
    }

    /// The stored form (counter keys, override and accounting rows): the value itself
    /// for keys of one part; for policies with combination keys, each part with `\` and
    /// `+` escaped, joined by `+`.
    fn stored(&self) -> String {
        let body = if self.escaped {
            self.parts
                .iter()
                .map(|p| p.replace('\\', "\\\\").replace('+', "\\+"))
                .collect::<Vec<_>>()
                .join("+")
        } else {
            self.parts.join("+")
        };
        match &self.key {
            Some(k) => format!("{k}={body}"),
            None => body,
        }
    }
}

/// The request's identity for a policy: the first key of the list whose parts are all
/// present.
fn identity(p: &Policy, s: &Settings, req: &Request<'_>) -> Option<Ident> {
    let sasl = req.sasl_username().map(str::to_ascii_lowercase);
    let sender = sender_of(req, sasl.as_deref(), &s.recipient_delimiter);
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
        return Some(Ident {
            parts,
            escaped: p.keys.iter().any(|k| k.len() > 1),
            key: (p.keys.len() > 1).then(|| {
                key.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("+")
            }),
        });
    }
    None
}

/// The configured rule for an identity: user, then domain, then the narrowest network.
/// A user rule applies to an identity part that is that very address; a domain rule to
/// a part that is the domain or an address in it.
pub(crate) fn config_rule<'a>(p: &'a Policy, ident: &Ident, ip: Option<IpAddr>) -> &'a Rule {
    for (m, r) in &p.rules {
        let hit = match m {
            Match::User(u) => ident.parts.iter().any(|a| a == u),
            Match::Domain(d) => ident
                .parts
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
/// Bytes of an identity written into a reply text: a sender of 2,000 bytes must not
/// push the reply past what the host accepts (which would fail the request).
const IDENTITY_IN_TEXT: usize = 200;

fn render(
    text: &str,
    ident: &str,
    limit: i64,
    used: i64,
    window: &str,
    retry_after: i64,
) -> String {
    let ident = if ident.len() > IDENTITY_IN_TEXT {
        let mut cut = IDENTITY_IN_TEXT;
        while !ident.is_char_boundary(cut) {
            cut -= 1;
        }
        format!("{}...", &ident[..cut])
    } else {
        ident.to_owned()
    };
    text.replace("{identity}", &ident)
        .replace("{limit}", &limit.to_string())
        .replace("{used}", &used.to_string())
        .replace(
            "{remaining}",
            &limit.saturating_sub(used).max(0).to_string(),
        )
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

/// The once-token of a charge: the message, stage and recipient (Postfix's `instance`
/// and the rest, as a re-sent request repeats them) and what is charged, so a client
/// that reuses another message's `instance` is not let through for free.
fn token_of(req: &Request<'_>, scope: &str, charges: &[Charge<'_>]) -> Option<String> {
    let mut t = req.once_token(scope)?;
    for c in charges {
        t.push('\x1f');
        t.push_str(c.key);
        t.push('\x1e');
        t.push_str(&c.amount.to_string());
    }
    Some(t)
}

/// One policy that applies to the request, with its identity and rule.
struct Applied<'p> {
    policy: &'p Policy,
    ident: Ident,
    rule: Rule,
    windows: Vec<Window>,
    /// The counter key: `policy:identity` (stored form).
    key: String,
    amount: i64,
}

/// What each applied policy charges.
fn charges_of<'a>(applied: &'a [Applied<'_>]) -> Vec<Charge<'a>> {
    applied
        .iter()
        .map(|a| Charge {
            key: &a.key,
            amount: a.amount,
            windows: &a.windows,
        })
        .collect()
}

impl RateLimit {
    fn settings(&self) -> Result<Arc<Settings>, Error> {
        Ok(self.settings.read().map_err(|_| "poisoned")?.clone())
    }

    /// The policies that apply to the request, with what each counts.
    async fn applied<'s>(
        &self,
        s: &'s Settings,
        req: &Request<'_>,
        authenticated: bool,
        now: i64,
    ) -> Result<Vec<Applied<'s>>, Error> {
        let mut out = Vec::new();
        for p in &s.policies {
            let applies = match p.applies {
                Applies::All => true,
                Applies::Authenticated => authenticated,
                Applies::Unauthenticated => !authenticated,
            };
            if !applies {
                continue;
            }
            let Some(ident) = identity(p, s, req) else {
                continue;
            };
            let base = config_rule(p, &ident, req.client_address().and_then(|a| a.parse().ok()));
            let rule = tables::effective_rule(self, req, p, &ident.stored(), base, now).await?;
            if rule.limits.is_empty() {
                continue;
            }
            let windows = rule
                .limits
                .iter()
                .map(|(k, l, _)| Window {
                    kind: *k,
                    limit: *l,
                })
                .collect();
            out.push(Applied {
                key: inspect::counter_key(&p.name, &ident.stored()),
                amount: amount(p.metric, req),
                policy: p,
                ident,
                rule,
                windows,
            });
        }
        Ok(out)
    }

    /// Logs an override row that cannot be used, at most once a minute.
    fn warn_bad_override(&self, policy: &str, identity: &str, error: &str, now: i64) {
        if once_a_minute(&self.bad_override_warned, now) {
            tracing::error!(
                policy,
                identity,
                "ratelimit_override row unusable ({error}); the configured rule applies until it is fixed"
            );
        }
    }

    /// Logs an accounting row that could not be written, at most once a minute.
    fn warn_accounting(&self, policy: &str, error: &str, now: i64) {
        if once_a_minute(&self.accounting_warned, now) {
            tracing::warn!(
                policy,
                "accounting not written ({error}); the charge stands and the request was admitted"
            );
        }
    }

    /// The soft-limit verdict of an admitted charge, if a window is past its mark.
    fn soft(a: &Applied<'_>, c: &Consumption, now: i64) -> Option<Verdict> {
        let pct = a.rule.soft_at?;
        c.windows
            .iter()
            .zip(&a.rule.limits)
            .find_map(|(st, (_, limit, name))| {
                (*limit > 0 && st.used.saturating_mul(100) >= limit.saturating_mul(pct as i64))
                    .then(|| {
                        verdict(
                            a.rule.soft_action,
                            "",
                            render(
                                &a.rule.soft_text,
                                &a.ident.shown(),
                                *limit,
                                st.used,
                                name,
                                st.resets_at - now,
                            ),
                        )
                    })
            })
    }

    /// Charges every applied policy together (all or none) and answers.
    async fn charge(
        &self,
        s: &Settings,
        applied: &[Applied<'_>],
        req: &Request<'_>,
        state: &str,
        now: i64,
    ) -> Result<Verdict, Error> {
        let charges = charges_of(applied);
        // One charge per message (and recipient, for per-RCPT counting) and stage, for
        // all policies at once: the host records the token with the charges, in one
        // transaction.
        let token = token_of(req, "ratelimit", &charges);
        // The accounting rows go in the charge's own transaction: no second commit.
        let accounting: Vec<(String, Vec<valvula_module::Value>)> = if s.accounting {
            let dialect = self.host.dialect();
            applied
                .iter()
                .map(|a| {
                    tables::account(
                        dialect,
                        self.zone,
                        s,
                        &a.policy.name,
                        &a.ident.stored(),
                        req,
                        now,
                    )
                })
                .collect()
        } else {
            Vec::new()
        };
        let then: Vec<(&str, &[valvula_module::Value])> = accounting
            .iter()
            .map(|(sql, p)| (sql.as_str(), p.as_slice()))
            .collect();
        let (c, accounted) = self
            .host
            .consume_all_then_async(req, token.as_deref(), &charges, &then)
            .await?;
        // The charge is committed: the request is admitted whatever happened to its
        // accounting rows. Failing it now would answer the on-error action for mail
        // whose quota is already used.
        for (a, r) in applied.iter().zip(&accounted) {
            if let Err(e) = r {
                self.warn_accounting(&a.policy.name, &e.to_string(), now);
            }
        }
        if c.repeated {
            tracing::info!(
                instance = req.instance().unwrap_or(""),
                state,
                "already charged for this message; not charged again"
            );
            return Ok(Verdict::dunno());
        }
        if !c.admitted {
            let (a, part) = applied
                .iter()
                .zip(&c.charges)
                .find(|(_, p)| !p.admitted)
                .unwrap_or((&applied[0], &c.charges[0]));
            if s.count_refused {
                // ratelimit-policyd's way: a refused attempt counts too, once per message
                // and stage, in the policy that refused it only: in a shared one (the
                // domain's) one user's retries would refuse everybody else.
                let unlimited: Vec<Window> = a
                    .windows
                    .iter()
                    .map(|w| Window {
                        kind: w.kind,
                        limit: -1,
                    })
                    .collect();
                let counted = [Charge {
                    key: &a.key,
                    amount: a.amount,
                    windows: &unlimited,
                }];
                self.host
                    .consume_all_async(
                        req,
                        token_of(req, "ratelimit-refused", &counted).as_deref(),
                        &counted,
                    )
                    .await?;
            }
            return Ok(self.refusal(s, a, part, req, now).await);
        }
        let mut soft = None;
        for (a, part) in applied.iter().zip(&c.charges) {
            soft = soft.or_else(|| Self::soft(a, part, now));
            tracing::info!(
                policy = %a.policy.name,
                identity = %a.ident.shown(),
                amount = a.amount,
                used = ?part.windows.iter().zip(&a.rule.limits).map(|(w, (_, l, name))| format!("{}/{l} {name}", w.used)).collect::<Vec<_>>(),
                "rate charged"
            );
        }
        Ok(soft.unwrap_or_else(Verdict::dunno))
    }

    /// The reply for a refusal, the log line, and the first-refusal notification.
    async fn refusal(
        &self,
        s: &Settings,
        a: &Applied<'_>,
        c: &Consumption,
        req: &Request<'_>,
        now: i64,
    ) -> Verdict {
        let (p, rule, ident) = (a.policy, &a.rule, a.ident.shown());
        let (i, st) = c
            .windows
            .iter()
            .enumerate()
            .find(|(_, w)| !w.admitted)
            .unwrap_or((0, &c.windows[0]));
        let (kind, limit, name) = &rule.limits[i];
        let retry = st.resets_at - now;
        let text = render(&rule.text, &ident, *limit, st.used, name, retry);
        tracing::warn!(policy = %p.name, identity = %ident, window = %name, used = st.used, limit, retry_after = retry, "rate limit reached");
        // Once per identity and window: a log event and the notification command.
        let key = inspect::notify_key(&p.name, &a.ident.stored());
        let once = [Window {
            kind: *kind,
            limit: 1,
        }];
        let first = Charge {
            key: &key,
            amount: 1,
            windows: &once,
        };
        if let Ok(first) = self.host.consume_async(req, first).await
            && first.admitted
        {
            tracing::warn!(policy = %p.name, identity = %ident, window = %name, limit, "rate limit reached for the first time in this window");
            if let Some(cmd) = &s.notify_command {
                let spawned = std::process::Command::new(cmd)
                    .env("VALVULA_POLICY", &p.name)
                    .env("VALVULA_IDENTITY", &ident)
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
    // Requests wait for their commit on the daemon's event loop (ABI 0.5), not on a
    // worker thread each.
    const ASYNC: bool = true;

    fn init(host: Host) -> Result<Self, Error> {
        let settings = load(&host)?;
        if let Err(e) = tables::ensure(&host) {
            tracing::error!("cannot prepare the rate-limit tables now (retried each minute): {e}");
        }
        tracing::info!(policies = settings.policies.len(), "mod-ratelimit ready");
        // The daemon's zone (ABI 0.4); the calendar of counters and of overrides agree.
        let zone = host
            .time_zone()
            .and_then(|z| valvula_calendar::Zone::parse(&z).ok())
            .unwrap_or_default();
        Ok(RateLimit {
            host,
            settings: RwLock::new(Arc::new(settings)),
            zone,
            bad_override_warned: std::sync::atomic::AtomicI64::new(i64::MIN),
            accounting_warned: std::sync::atomic::AtomicI64::new(i64::MIN),
            indexed: std::sync::atomic::AtomicBool::new(false),
            indexing: std::sync::atomic::AtomicBool::new(false),
        })
    }

    async fn process_async(&self, req: &Request<'_>) -> Result<Verdict, Error> {
        let s = self.settings()?;
        let ip: Option<IpAddr> = req.client_address().and_then(|a| a.parse().ok());
        if ip.is_some_and(|i| s.exempt_networks.iter().any(|n| n.contains(&i))) {
            return Ok(Verdict::dunno());
        }
        let sasl = req.sasl_username().map(str::to_ascii_lowercase);
        // Only a login exempts: an envelope sender is whatever the client writes.
        if sasl.as_ref().is_some_and(|u| s.exempt_users.contains(u)) {
            return Ok(Verdict::dunno());
        }
        let state = req.protocol_state().unwrap_or("").to_ascii_uppercase();
        let charge = s.charge_at.is_empty() || s.charge_at.contains(&state);
        let now = self.host.now();
        let applied = self.applied(&s, req, sasl.is_some(), now).await?;
        if applied.is_empty() {
            return Ok(Verdict::dunno());
        }
        if charge {
            return self.charge(&s, &applied, req, &state, now).await;
        }
        // Not a charging stage: refuse early what the charge would refuse.
        let charges = charges_of(&applied);
        let c = self.host.peek_all_async(req, &charges).await?;
        if let Some((a, c)) = applied.iter().zip(&c.charges).find(|(_, c)| !c.admitted) {
            return Ok(self.refusal(&s, a, c, req, now).await);
        }
        Ok(Verdict::dunno())
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
        // The index housekeeping needs, built from a tick (one at a time), not at start.
        if !self.indexed.load(std::sync::atomic::Ordering::Acquire)
            && !self
                .indexing
                .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            match tables::ensure_indexes(&self.host) {
                Ok(()) => self
                    .indexed
                    .store(true, std::sync::atomic::Ordering::Release),
                Err(e) => tracing::warn!("index of ratelimit_accounting not made yet: {e}"),
            }
            self.indexing
                .store(false, std::sync::atomic::Ordering::Release);
        }
        if ticks.minute()
            && self.indexed.load(std::sync::atomic::Ordering::Acquire)
            && let Ok(s) = self.settings()
        {
            match tables::expire(&self.host, &s, now) {
                Ok(n) if n > 0 => tracing::debug!(rows = n, "rate-limit housekeeping"),
                Ok(_) => {}
                Err(e) => tracing::warn!("rate-limit housekeeping failed: {e}"),
            }
        }
    }
}

export_module!(
    RateLimit,
    name = "mod-ratelimit",
    description =
        "sender rate limits: messages, recipients, bytes per user, domain, sender or network"
);
