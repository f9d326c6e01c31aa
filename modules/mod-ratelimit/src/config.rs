//! `[module.mod-ratelimit]`: policies, their rules, and what happens at each stage.

use std::collections::BTreeMap;

use ipnet::IpNet;
use serde::Deserialize;
use valvula_module::{Action, Error, WindowKind};

#[derive(Deserialize, Debug, Clone)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub policy: Vec<PolicyConfig>,
    /// Client networks never limited.
    pub exempt_networks: Vec<String>,
    /// SASL users or senders never limited.
    pub exempt_users: Vec<String>,
    /// `protocol_state`s whose requests are charged; requests in other states are only
    /// checked ("refuse early"). Empty: every request is charged.
    pub charge_at: Vec<String>,
    /// Charge refused attempts too (ratelimit-policyd's behaviour).
    pub count_refused: bool,
    /// Run this program (no shell) on the first refusal of an identity in a window, with
    /// VALVULA_* variables describing it.
    pub notify_command: Option<String>,
    /// Keep per-identity accounting (messages, recipients, bytes per period).
    pub accounting: bool,
    /// `day`, `week` or `month` rows in the accounting table.
    pub accounting_period: String,
    /// Accounting rows older than this many days are deleted (0: kept).
    pub accounting_retention_days: i64,
    /// Postfix's `recipient_delimiter` characters (e.g. "+"): sender addresses count
    /// without their extension (`alice+news@` as `alice@`), so rotating extensions
    /// does not make new identities. Empty (the default): addresses count as they are.
    pub recipient_delimiter: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            policy: Vec::new(),
            exempt_networks: Vec::new(),
            exempt_users: Vec::new(),
            charge_at: Vec::new(),
            count_refused: false,
            notify_command: None,
            accounting: true,
            accounting_period: "day".into(),
            accounting_retention_days: 90,
            recipient_delimiter: String::new(),
        }
    }
}

#[derive(Deserialize, Debug, Clone)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    pub name: String,
    /// `authenticated`, `unauthenticated` or `all`.
    pub applies_to: String,
    /// Identity: one key, a list tried in order (the first present wins), each key
    /// possibly a combination `a+b`. Keys: sasl_user, sasl_domain, sender,
    /// sender_domain, client_address, client_network[/prefix].
    pub key: KeySpec,
    /// messages, recipients, bytes, bytes_x_recipients.
    pub metric: String,
    /// The rule for identities without a more specific one.
    pub default: RuleConfig,
    /// Rules by user address, domain or network; the most specific wins.
    pub rules: BTreeMap<String, RuleConfig>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            name: String::new(),
            applies_to: "all".into(),
            key: KeySpec::One("sasl_user".into()),
            metric: "recipients".into(),
            default: RuleConfig::default(),
            rules: BTreeMap::new(),
        }
    }
}

#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum KeySpec {
    One(String),
    Fallback(Vec<String>),
}

#[derive(Deserialize, Debug, Clone, Default)]
#[serde(default, deny_unknown_fields)]
pub struct RuleConfig {
    /// `[[window, limit], ...]`: window is hour, day, week, month or a duration
    /// ("3600s", "10m") for a sliding window. Empty: unlimited.
    pub limits: Vec<(String, i64)>,
    pub action: Option<String>,
    /// Placeholders: {identity} {limit} {used} {remaining} {window} {retry_after}.
    pub text: Option<String>,
    /// Percent of a limit from which `soft_action` answers admitted mail.
    pub soft_at: Option<u32>,
    pub soft_action: Option<String>,
    pub soft_text: Option<String>,
}

/// One identity key: the parts of a combination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    SaslUser,
    SaslDomain,
    Sender,
    SenderDomain,
    ClientAddress,
    ClientNetwork(u8, u8),
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Part::SaslUser => f.write_str("sasl_user"),
            Part::SaslDomain => f.write_str("sasl_domain"),
            Part::Sender => f.write_str("sender"),
            Part::SenderDomain => f.write_str("sender_domain"),
            Part::ClientAddress => f.write_str("client_address"),
            Part::ClientNetwork(v4, _) => write!(f, "client_network/{v4}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applies {
    Authenticated,
    Unauthenticated,
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    Messages,
    Recipients,
    Bytes,
    BytesXRecipients,
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub limits: Vec<(WindowKind, i64, String)>,
    pub action: Action,
    /// For a raw action: the code (and DSN) written before the text, e.g. "450 4.7.1".
    pub code: String,
    pub text: String,
    pub soft_at: Option<u32>,
    pub soft_action: Action,
    pub soft_text: String,
}

#[derive(Debug, Clone)]
pub struct Policy {
    pub name: String,
    pub applies: Applies,
    pub keys: Vec<Vec<Part>>,
    pub metric: Metric,
    pub default: Rule,
    /// (match, rule), most specific first: users, then domains, then networks by prefix.
    pub rules: Vec<(Match, Rule)>,
}

#[derive(Debug, Clone)]
pub enum Match {
    User(String),
    Domain(String),
    Network(IpNet),
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub policies: Vec<Policy>,
    pub exempt_networks: Vec<IpNet>,
    pub exempt_users: Vec<String>,
    pub charge_at: Vec<String>,
    pub count_refused: bool,
    pub notify_command: Option<String>,
    pub accounting: bool,
    pub accounting_period: WindowKind,
    pub accounting_retention_days: i64,
    pub recipient_delimiter: String,
}

pub const DEFAULT_TEXT: &str =
    "Rate limit reached ({used}/{limit} per {window}), retry in {retry_after}s";

pub fn window(s: &str) -> Result<WindowKind, Error> {
    WindowKind::parse(s).map_err(|e| format!("window {e}").into())
}

pub(crate) fn part(s: &str) -> Result<Part, Error> {
    Ok(match s {
        "sasl_user" => Part::SaslUser,
        "sasl_domain" => Part::SaslDomain,
        "sender" => Part::Sender,
        "sender_domain" => Part::SenderDomain,
        "client_address" => Part::ClientAddress,
        "client_network" => Part::ClientNetwork(24, 64),
        other => match other.strip_prefix("client_network/") {
            Some(p) => {
                let p: u8 = p
                    .parse()
                    .map_err(|_| format!("key {other:?}: bad prefix"))?;
                if p > 32 {
                    // One prefix for IPv6 too: /N of IPv4 maps to /(N+32) of IPv6 is
                    // no better than a fixed /64, which is what providers hand out.
                    return Err(format!("key {other:?}: an IPv4 prefix is 0-32").into());
                }
                Part::ClientNetwork(p, 64)
            }
            None => return Err(format!("unknown key {other:?}").into()),
        },
    })
}

fn action(s: Option<&str>, default: Action) -> Result<Action, Error> {
    match s {
        None => Ok(default),
        Some(a) => {
            // A numeric code ("450", "554 5.7.1") is a raw action.
            if a.starts_with(['4', '5']) {
                return Ok(Action::Raw);
            }
            Ok(a.parse::<Action>()?)
        }
    }
}

fn rule(r: &RuleConfig, base: Option<&Rule>, at: &str) -> Result<Rule, Error> {
    let limits = if r.limits.is_empty() {
        base.map(|b| b.limits.clone()).unwrap_or_default()
    } else {
        r.limits
            .iter()
            .map(|(w, l)| Ok((window(w).map_err(|e| format!("{at}: {e}"))?, *l, w.clone())))
            .collect::<Result<Vec<_>, Error>>()?
    };
    let raw_action = r.action.clone().or_else(|| {
        base.map(|b| match b.action {
            Action::Raw => b.code.clone(),
            a => a.verb().to_owned(),
        })
    });
    let act =
        action(raw_action.as_deref(), Action::DeferIfPermit).map_err(|e| format!("{at}: {e}"))?;
    let code = if act == Action::Raw {
        raw_action.unwrap_or_default()
    } else {
        String::new()
    };
    // A raw action may carry its whole reply ("450 4.7.1 slow down") and no text.
    let text = r
        .text
        .clone()
        .or_else(|| base.map(|b| b.text.clone()))
        .unwrap_or_else(|| {
            if act == Action::Raw {
                String::new()
            } else {
                DEFAULT_TEXT.to_owned()
            }
        });
    Ok(Rule {
        limits,
        action: act,
        code,
        text,
        soft_at: r.soft_at.or(base.and_then(|b| b.soft_at)),
        soft_action: action(
            r.soft_action.as_deref(),
            base.map_or(Action::Warn, |b| b.soft_action),
        )?,
        soft_text: r
            .soft_text
            .clone()
            .or_else(|| base.map(|b| b.soft_text.clone()))
            .unwrap_or_else(|| "Close to the rate limit ({used}/{limit} per {window})".into()),
    })
}

pub fn settings(c: Config) -> Result<Settings, Error> {
    let mut policies = Vec::new();
    for (i, p) in c.policy.iter().enumerate() {
        let at = format!("policy[{i}]");
        let name = if p.name.is_empty() {
            format!("policy{i}")
        } else {
            p.name.clone()
        };
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(format!("{at}.name {name:?}: letters, digits, _ and - only").into());
        }
        let applies = match p.applies_to.as_str() {
            "authenticated" => Applies::Authenticated,
            "unauthenticated" => Applies::Unauthenticated,
            "all" => Applies::All,
            o => {
                return Err(format!(
                    "{at}.applies_to {o:?}: authenticated, unauthenticated or all"
                )
                .into());
            }
        };
        let specs = match &p.key {
            KeySpec::One(k) => vec![k.clone()],
            KeySpec::Fallback(v) => v.clone(),
        };
        let keys = specs
            .iter()
            .map(|k| k.split('+').map(part).collect::<Result<Vec<_>, _>>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{at}.key: {e}"))?;
        let metric = match p.metric.as_str() {
            "messages" => Metric::Messages,
            "recipients" => Metric::Recipients,
            "bytes" => Metric::Bytes,
            "bytes_x_recipients" => Metric::BytesXRecipients,
            o => {
                return Err(format!(
                    "{at}.metric {o:?}: messages, recipients, bytes or bytes_x_recipients"
                )
                .into());
            }
        };
        let default = rule(&p.default, None, &format!("{at}.default"))?;
        let mut rules = Vec::new();
        for (k, r) in &p.rules {
            let m = if let Ok(n) = k.parse::<IpNet>() {
                Match::Network(n)
            } else if let Ok(ip) = k.parse::<std::net::IpAddr>() {
                Match::Network(IpNet::from(ip))
            } else if k.contains('@') {
                Match::User(k.to_ascii_lowercase())
            } else {
                Match::Domain(k.to_ascii_lowercase())
            };
            rules.push((m, rule(r, Some(&default), &format!("{at}.rules.{k}"))?));
        }
        rules.sort_by_key(|(m, _)| match m {
            Match::User(_) => (0, 0),
            Match::Domain(_) => (1, 0),
            Match::Network(n) => (2, 255 - n.prefix_len() as i32),
        });
        if policies.iter().any(|q: &Policy| q.name == name) {
            return Err(format!(
                "{at}.name {name:?}: another policy has this name (they would share counters and overrides)"
            )
            .into());
        }
        policies.push(Policy {
            name,
            applies,
            keys,
            metric,
            default,
            rules,
        });
    }
    let exempt_networks = c
        .exempt_networks
        .iter()
        .map(|n| {
            n.parse::<IpNet>()
                .or_else(|_| n.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| format!("exempt_networks: {n:?} is not a network"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if c.recipient_delimiter
        .chars()
        .any(|ch| ch == '@' || ch.is_whitespace() || ch.is_control())
    {
        return Err(format!(
            "recipient_delimiter {:?}: delimiter characters such as \"+\" or \"+-\" (not @, spaces or control characters)",
            c.recipient_delimiter
        )
        .into());
    }
    let accounting_period = match c.accounting_period.as_str() {
        "day" => WindowKind::Day,
        "week" => WindowKind::Week,
        "month" => WindowKind::Month,
        o => return Err(format!("accounting_period {o:?}: day, week or month").into()),
    };
    Ok(Settings {
        policies,
        exempt_networks,
        exempt_users: c
            .exempt_users
            .iter()
            .map(|u| u.to_ascii_lowercase())
            .collect(),
        charge_at: c.charge_at.iter().map(|s| s.to_ascii_uppercase()).collect(),
        count_refused: c.count_refused,
        notify_command: c.notify_command,
        accounting: c.accounting,
        accounting_period,
        accounting_retention_days: c.accounting_retention_days,
        recipient_delimiter: c.recipient_delimiter,
    })
}
