//! What mod-ratelimit applies, answered by the module itself for tools (valvula-ctl's
//! `usage` and `override`): its own configuration reader, rule choice, override grammar
//! and counter keys. A tool that read the TOML by hand and knew the key formats broke
//! silently whenever the module changed; through this library it cannot.

use std::net::IpAddr;

use valvula_module::Window;

use crate::config::{self, Policy, Settings};
use crate::{Ident, config_rule, tables};

/// The namespace of the module's counters in the host's store.
pub const NAMESPACE: &str = "mod-ratelimit";

/// The counter key of a policy's identity (its stored form).
pub fn counter_key(policy: &str, stored_identity: &str) -> String {
    format!("{policy}:{stored_identity}")
}

/// The key that remembers a refusal was notified, once per identity and window.
pub fn notify_key(policy: &str, stored_identity: &str) -> String {
    format!("notify:{policy}:{stored_identity}")
}

/// The policy and stored identity of a counter key; `None` for the module's other
/// counters (notifications).
pub fn parse_counter_key(key: &str) -> Option<(&str, &str)> {
    if key.starts_with("notify:") {
        return None;
    }
    key.split_once(':')
}

/// The identity without the key a fallback list stores it under
/// (`sender=alice@example.com` is `alice@example.com`).
pub fn bare_identity(stored: &str) -> &str {
    match stored.split_once('=') {
        Some((key, rest)) if key.split('+').all(|p| config::part(p).is_ok()) => rest,
        _ => stored,
    }
}

/// An identity as the override table holds it (lower case, bounded as the module bounds
/// it).
pub fn override_identity(identity: &str) -> String {
    tables::stored_identity(&identity.to_ascii_lowercase()).into_owned()
}

/// The override limits of one policy and stored identity (parameters: policy,
/// identity), `limits` as written; see [`Inspect::effective_limits`].
pub const OVERRIDE_LIMITS_QUERY: &str = "SELECT limits FROM ratelimit_override WHERE policy = ? AND identity = ? AND limits IS NOT NULL";

/// The limits of an override row (`hour=100, day=1000`), as the module reads them.
pub fn parse_override_limits(text: &str) -> Result<Vec<Window>, String> {
    let limits = tables::parse_limits(text).map_err(|e| e.to_string())?;
    if limits.is_empty() {
        return Err(format!("limits {text:?} names no window"));
    }
    Ok(limits
        .into_iter()
        .map(|(kind, limit, _)| Window { kind, limit })
        .collect())
}

/// The module's settings, read as the module reads them.
#[derive(Debug)]
pub struct Inspect {
    settings: Settings,
}

impl Inspect {
    /// From the module's section as the daemon hands it over: the JSON rendering of
    /// `[module.mod-ratelimit]`.
    pub fn from_section_json(json: &str) -> Result<Inspect, String> {
        let c: config::Config =
            serde_json::from_str(json).map_err(|e| format!("module configuration: {e}"))?;
        let settings = config::settings(c).map_err(|e| e.to_string())?;
        Ok(Inspect { settings })
    }

    pub fn policies(&self) -> Vec<&str> {
        self.settings
            .policies
            .iter()
            .map(|p| p.name.as_str())
            .collect()
    }

    fn policy(&self, name: &str) -> Result<&Policy, String> {
        self.settings
            .policies
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| {
                let names = self.policies();
                format!(
                    "mod-ratelimit has no policy {name:?} (its policies: {})",
                    if names.is_empty() {
                        "none".to_owned()
                    } else {
                        names.join(", ")
                    }
                )
            })
    }

    /// Refuses an override the module would never apply: a policy it does not have, or,
    /// for a policy with a fallback list of keys, an identity without the key it counts
    /// under (`sender=alice@example.com`).
    pub fn check_override_target(&self, policy: &str, identity: &str) -> Result<(), String> {
        let p = self.policy(policy)?;
        if p.keys.len() > 1 && bare_identity(identity) == identity {
            return Err(format!(
                "policy {policy} counts under a list of keys: write the identity with its key, e.g. sender={identity} or sasl_user={identity}"
            ));
        }
        Ok(())
    }

    /// The limits the configuration gives a stored identity of `policy`: its user rule,
    /// else its domain rule, else the narrowest network rule holding an address part of
    /// it, else the default, as the module chooses for a request.
    pub fn configured_limits(&self, policy: &str, identity: &str) -> Result<Vec<Window>, String> {
        let p = self.policy(policy)?;
        let ident = Ident::from_stored(p, identity);
        // The address part of the identity: a client address, or the network a
        // `client_network/N` key stores (its first address lies in the same rules).
        let ip = ident.parts.iter().find_map(|a| {
            a.parse::<IpAddr>()
                .ok()
                .or_else(|| a.parse::<ipnet::IpNet>().ok().map(|n| n.addr()))
        });
        Ok(config_rule(p, &ident, ip)
            .limits
            .iter()
            .map(|(kind, limit, _)| Window {
                kind: *kind,
                limit: *limit,
            })
            .collect())
    }

    /// The limits in force: an override row's limits when it has usable ones (a
    /// mistyped row is skipped by the module, so here too), else the configured ones.
    pub fn effective_limits(
        &self,
        policy: &str,
        identity: &str,
        override_limits: Option<&str>,
    ) -> Result<Vec<Window>, String> {
        if let Some(Ok(w)) = override_limits.map(parse_override_limits) {
            return Ok(w);
        }
        self.configured_limits(policy, identity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use valvula_module::WindowKind;

    const SECTION: &str = r#"{"policy": [
        {"name": "out", "key": "sasl_user",
         "default": {"limits": [["day", 100]]},
         "rules": {"example.com": {"limits": [["day", 50]]},
                   "vip@example.com": {"limits": [["hour", 5], ["day", 500]]},
                   "192.0.2.0/24": {"limits": [["day", 7]]}}},
        {"name": "any", "key": ["sasl_user", "sender"], "default": {"limits": [["90s", 3]]}},
        {"name": "net", "key": "client_address",
         "default": {"limits": [["day", 100]]},
         "rules": {"192.0.2.0/24": {"limits": [["day", 7]]}}},
        {"name": "nets", "key": "client_network/24",
         "default": {"limits": [["day", 100]]},
         "rules": {"198.51.100.0/24": {"limits": [["day", 8]]}}},
        {"name": "combo", "key": "sasl_user+client_address",
         "default": {"limits": [["day", 100]]},
         "rules": {"a+b@example.com": {"limits": [["day", 5]]}}}
    ]}"#;

    fn day(limit: i64) -> Window {
        Window {
            kind: WindowKind::Day,
            limit,
        }
    }

    #[test]
    fn rules_chosen_as_the_module_chooses_them() {
        let i = Inspect::from_section_json(SECTION).unwrap();
        assert_eq!(i.policies(), ["out", "any", "net", "nets", "combo"]);
        let l = |p: &str, who: &str| i.configured_limits(p, who).unwrap();
        assert_eq!(l("out", "vip@example.com").len(), 2, "user rule");
        assert_eq!(l("out", "bob@example.com"), [day(50)], "domain rule");
        assert_eq!(
            l("out", "vip+bulk@example.com"),
            [day(50)],
            "a sub-address gets its domain's rule, never vip's"
        );
        assert_eq!(l("out", "carol@example.org"), [day(100)], "default");
        assert_eq!(l("net", "192.0.2.9"), [day(7)], "network rule");
        assert_eq!(
            l("nets", "198.51.100.0/24"),
            [day(8)],
            "a stored network's rule"
        );
        assert_eq!(l("nets", "203.0.113.0/24"), [day(100)], "another network");
        assert_eq!(
            l("any", "sender=alice@example.com"),
            [Window {
                kind: WindowKind::Sliding(90),
                limit: 3
            }]
        );
        // Parts of a combination stored with `+` escaped inside a part.
        assert_eq!(
            l("combo", "a\\+b@example.com+192.0.2.1"),
            [day(5)],
            "combination"
        );
        assert_eq!(
            l("combo", "a+b@example.com"),
            [day(100)],
            "two parts, neither a+b"
        );
        assert!(i.configured_limits("nope", "x").is_err());
    }

    #[test]
    fn overrides_and_keys() {
        let i = Inspect::from_section_json(SECTION).unwrap();
        assert_eq!(
            i.effective_limits("out", "bob@example.com", Some("day=9")),
            Ok(vec![day(9)])
        );
        assert_eq!(
            i.effective_limits("out", "bob@example.com", Some("fortnight=9")),
            Ok(vec![day(50)]),
            "a mistyped override is skipped"
        );
        assert!(i.check_override_target("any", "alice@example.com").is_err());
        assert!(
            i.check_override_target("any", "sender=alice@example.com")
                .is_ok()
        );
        assert!(i.check_override_target("out", "alice@example.com").is_ok());
        let e = i.check_override_target("gone", "a").unwrap_err();
        assert!(e.contains("out, any, net, nets, combo"), "{e}");
        assert_eq!(
            parse_counter_key(&counter_key("out", "a:b@c")),
            Some(("out", "a:b@c"))
        );
        assert_eq!(parse_counter_key(&notify_key("out", "a")), None);
        assert_eq!(
            bare_identity("sender=alice@example.com"),
            "alice@example.com"
        );
        assert_eq!(bare_identity("x=y@example.com"), "x=y@example.com");
    }
}
