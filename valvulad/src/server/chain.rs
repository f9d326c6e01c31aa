//! A listener's chain: the first answer that is not DUNNO wins; and the decision line
//! in valvula's format.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

use valvula_config::ListenAddr;
use valvula_policy::{Action, Reply, Request};

use super::shared::ListenerRuntime;

/// Runs the chain: the first answer that is not DUNNO wins. `None`: close the
/// connection without a reply (on-error = disconnect).
pub(super) async fn run(rt: &ListenerRuntime, req: Request) -> Option<Reply> {
    let started = Instant::now();
    let req = Arc::new(req);
    let mut decided: (Option<Reply>, &str) = (Some(Reply::dunno()), "");
    for m in &rt.chain {
        match m.call(&req).await {
            Ok(None) => continue,
            Ok(Some(r)) => {
                decided = (Some(r), m.name());
                break;
            }
            Err(e) => {
                // Once a second per module at most: an outage fails every request.
                if let Some(more) = m.failure_log.allow() {
                    tracing::error!(
                        listener = %rt.config.name,
                        module = m.name(),
                        queue_id = req.get("queue_id").unwrap_or(""),
                        failed_since_last_line = more,
                        "module failed, answering the listener's on-error action: {e}"
                    );
                }
                decided = (rt.on_error_reply(), m.name());
                break;
            }
        }
    }
    let (reply, module) = decided;
    if rt.valvula_lines {
        let port = match &rt.config.address {
            ListenAddr::Tcp(a) => a.port(),
            ListenAddr::Unix(_) => 0,
        };
        tracing::info!("{}", valvula_line(&req, reply.as_ref(), port));
        return reply;
    }
    tracing::info!(
        listener = %rt.config.name,
        module,
        queue_id = req.get("queue_id").unwrap_or(""),
        sasl_username = req.get("sasl_username").unwrap_or(""),
        sender = req.get("sender").unwrap_or(""),
        client = req.get("client_address").unwrap_or(""),
        action = reply.as_ref().map_or("disconnect", |r| r.action().verb()),
        text = reply.as_ref().map_or("", |r| r.text()),
        us = started.elapsed().as_micros() as u64,
        "decision"
    );
    reply
}

/// A decision as valvula logs it: `REJECT: s -> r (sasl_user=u), port P, queue-id Q,
/// from IP: text` for refusals (valvulad_reject's line), and the final-state line for
/// the rest (without valvula's local-delivery lookup, which needed a database query
/// per request).
pub fn valvula_line(req: &Request, reply: Option<&Reply>, port: u16) -> String {
    let g = |k: &str| req.get(k).unwrap_or("");
    let state = reply.map_or("DISCONNECT".to_owned(), |r| match r.action() {
        Action::Raw => r.text().split(' ').next().unwrap_or("").to_owned(),
        a => a.verb().to_ascii_uppercase(),
    });
    let sasl = match (req.get("sasl_method"), req.get("sasl_username")) {
        (Some(_), Some(u)) => format!(" (sasl_user={u})"),
        _ => String::new(),
    };
    let mut line = format!(
        "{state}: {} -> {}{sasl}, port {port}",
        g("sender"),
        g("recipient")
    );
    let text = reply.map_or("", |r| {
        if r.action() == Action::Raw {
            ""
        } else {
            r.text()
        }
    });
    let queue = req.get_nonempty("queue_id");
    let refusal = matches!(
        reply.map(|r| r.action()),
        Some(
            Action::Reject
                | Action::Defer
                | Action::DeferIfPermit
                | Action::DeferIfReject
                | Action::Discard
                | Action::Hold
                | Action::Raw
        )
    );
    if refusal {
        let _ = write!(
            line,
            ", queue-id {}, from {}: {}",
            queue.unwrap_or("<undef>"),
            g("client_address"),
            reply.map_or("", |r| r.text())
        );
        return line;
    }
    let _ = write!(
        line,
        ", rcpt count={}, ",
        req.get("recipient_count").unwrap_or("0")
    );
    match queue {
        Some(q) => {
            let _ = write!(line, "queue-id {q}");
        }
        None => line.push_str("still-msg-not-queued "),
    }
    if let Some(ip) = req.get("client_address") {
        let _ = write!(line, ", from {ip}");
    }
    match req.get_nonempty("encryption_protocol") {
        Some(p) => {
            let _ = write!(line, ", tls={p}");
        }
        None => line.push_str(", no-tls"),
    }
    if let Some(c) = req.get_nonempty("encryption_cipher") {
        let _ = write!(line, ", cipher={c}");
    }
    if let Some(k) = req.get("encryption_keysize").filter(|k| k.len() > 1) {
        let _ = write!(line, ", keysize={k}");
    }
    if queue.is_some() {
        match reply.map(|r| r.action()) {
            Some(Action::Filter) => {
                let _ = write!(line, ", transport-changed-to={text}");
            }
            _ => line.push_str(", transport=default"),
        }
    }
    if !text.is_empty() {
        let _ = write!(line, ": {text}");
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valvula_log_lines() {
        let req = Request::from_pairs([
            ("sender", "francis@aspl.es"),
            ("recipient", "francis@aspl.es"),
            ("sasl_method", "PLAIN"),
            ("sasl_username", ""),
            ("recipient_count", "1"),
            ("queue_id", "ABC123"),
            ("client_address", "127.0.0.9"),
            ("encryption_keysize", "0"),
        ]);
        // The example valvula's documentation shows [run].
        assert_eq!(
            valvula_line(&req, Some(&Reply::dunno()), 14581),
            "DUNNO: francis@aspl.es -> francis@aspl.es (sasl_user=), port 14581, rcpt count=1, queue-id ABC123, from 127.0.0.9, no-tls, transport=default"
        );
        let rej = Reply::new(
            Action::Reject,
            "Rejecting operation because day limit reached (4)",
        )
        .unwrap();
        assert_eq!(
            valvula_line(&req, Some(&rej), 3579),
            "REJECT: francis@aspl.es -> francis@aspl.es (sasl_user=), port 3579, queue-id ABC123, from 127.0.0.9: Rejecting operation because day limit reached (4)"
        );
        let f = Reply::new(Action::Filter, "transport11:").unwrap();
        assert!(
            valvula_line(&req, Some(&f), 1)
                .ends_with(", transport-changed-to=transport11:: transport11:")
        );
    }
}
