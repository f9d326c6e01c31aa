//! mod-template: refuses mail from the senders listed in its section, and shows what
//! every module needs: configuration read at init and again on reload, a verdict per
//! request, logging, and no `unsafe`.
//!
//! ```toml
//! [module.mod-template]
//! blocked_senders = ["spammer@example.com"]
//! text = "you may not send mail here"
//! ```

use std::sync::RwLock;

use valvula_module::{export_module, Error, Host, Module, Request, Verdict};

#[derive(serde::Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct Config {
    blocked_senders: Vec<String>,
    text: Option<String>,
}

struct Settings {
    blocked: Vec<String>,
    text: String,
}

fn load(host: &Host) -> Result<Settings, Error> {
    let c: Config = host.config()?;
    Ok(Settings {
        blocked: c
            .blocked_senders
            .iter()
            .map(|s| s.to_ascii_lowercase())
            .collect(),
        text: c.text.unwrap_or_else(|| "sender blocked".into()),
    })
}

struct Template {
    host: Host,
    // process() runs on several threads at once while reconf() replaces the settings.
    settings: RwLock<Settings>,
}

impl Module for Template {
    fn init(host: Host) -> Result<Self, Error> {
        let settings = load(&host)?;
        tracing::info!(blocked = settings.blocked.len(), "mod-template ready");
        Ok(Template {
            host,
            settings: RwLock::new(settings),
        })
    }

    fn process(&self, req: &Request<'_>) -> Result<Verdict, Error> {
        let sender = req.sender().unwrap_or("").to_ascii_lowercase();
        let s = self.settings.read().map_err(|_| "settings lock poisoned")?;
        if s.blocked.iter().any(|b| *b == sender) {
            tracing::info!(sender = %sender, "blocked");
            return Ok(Verdict::reject(&s.text));
        }
        Ok(Verdict::dunno())
    }

    fn reconf(&self) -> Result<(), Error> {
        // A new configuration that does not parse keeps the old one (and says why).
        let fresh = load(&self.host)?;
        *self.settings.write().map_err(|_| "settings lock poisoned")? = fresh;
        Ok(())
    }
}

export_module!(
    Template,
    name = "mod-template",
    description = "refuses the senders listed in its configuration"
);
