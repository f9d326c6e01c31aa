//! Talking to the running daemon: its admin socket (status, reload) and, for `-t`, a
//! listener, as Postfix would.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use clap::Args;

fn admin_socket(config: &Path) -> anyhow::Result<PathBuf> {
    valvula_config::load_file(config)?
        .config
        .server
        .admin_socket
        .context("the configuration has no admin socket (server.admin_socket = \"\")")
}

fn ask(config: &Path, command: &str) -> anyhow::Result<String> {
    let path = admin_socket(config)?;
    let mut s = UnixStream::connect(&path).with_context(|| {
        format!(
            "valvulad is not running or not reachable at {}",
            path.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.write_all(format!("{command}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    Ok(line.trim_end().to_owned())
}

/// Asks the daemon to reload. `Err`: it could not be asked (not running, no admin
/// socket); `Ok(Err(why))`: it refused (its file has an error, a module refused its new
/// settings: the next start would fail on them); `Ok(Ok(note))`: reloaded, with the
/// settings only a restart applies, if any.
pub fn reload(config: &Path) -> anyhow::Result<Result<String, String>> {
    let a = ask(config, "reload")?;
    if a.trim().is_empty() {
        // The connection closed without an answer: the worker died during the reload
        // (a module crashing in its reconf); the master started a new one.
        return Ok(Err(
            "no answer: its worker stopped during the reload (a module crashed?); see the log"
                .into(),
        ));
    }
    Ok(match a.strip_prefix("ok configuration reloaded") {
        Some(note) => Ok(note.trim_start_matches([';', ' ']).to_owned()),
        None => Err(a.trim_start_matches("error ").to_owned()),
    })
}

pub fn status(config: &Path) -> anyhow::Result<()> {
    let a = ask(config, "status")?;
    let v: serde_json::Value =
        serde_json::from_str(&a).with_context(|| format!("unexpected answer {a:?}"))?;
    let up = v["uptime_s"].as_u64().unwrap_or(0);
    println!(
        "valvulad pid {} up {}d {:02}:{:02}:{:02}{}",
        v["pid"],
        up / 86_400,
        up / 3600 % 24,
        up / 60 % 60,
        up % 60,
        match v["worker_restarts"].as_u64() {
            Some(n) if n > 0 => format!(" (worker restarted {n} times: see the log)"),
            _ => String::new(),
        }
    );
    for l in v["listeners"].as_array().into_iter().flatten() {
        let mods: Vec<&str> = l["modules"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m.as_str())
            .collect();
        println!(
            "Listen: {} ({}) connections={} modules=[{}]",
            l["address"].as_str().unwrap_or(""),
            l["name"].as_str().unwrap_or(""),
            l["connections"],
            mods.join(", ")
        );
    }
    for m in v["modules"].as_array().into_iter().flatten() {
        let lat = &m["latency_us"];
        let state = match m["disabled"].as_str() {
            Some(why) => format!(" DISABLED ({why}; a reload enables it)"),
            None if m["quarantined"].as_bool() == Some(true) => " QUARANTINED".to_owned(),
            None => String::new(),
        };
        println!(
            "Module: {} {}{} requests={} answers={} failures={} timeouts={} latency_us min/avg/max={}/{}/{}",
            m["name"].as_str().unwrap_or(""),
            m["version"].as_str().unwrap_or(""),
            state,
            m["calls"],
            m["answers"],
            m["failures"],
            m["timeouts"],
            lat["min"],
            lat["avg"],
            lat["max"]
        );
    }
    Ok(())
}

/// `-t`: one or more requests to a listener over TCP, as Postfix sends them.
pub fn test_server(config: &Path, listener: &str, r: &TestRequest) -> anyhow::Result<()> {
    // A configured listener (name or address), or any address given directly.
    let target = match crate::maincf::policy_target(config, listener) {
        Ok(t) => t,
        Err(e) => match valvula_config::parse_address(listener) {
            Ok(valvula_config::ListenAddr::Tcp(a)) => format!("inet:{a}"),
            _ => return Err(e),
        },
    };
    let Some(addr) = target.strip_prefix("inet:") else {
        bail!("-t speaks TCP; {listener} is {target}");
    };
    let addr = addr.replace(['[', ']'], "");
    let (host, port) = addr.rsplit_once(':').context("bad address")?;
    for i in 0..r.count.max(1) {
        let queue_id = format!("{:09X}", (std::process::id() as u64) << 8 | u64::from(i));
        let req = valvula_policy::Request::from_pairs([
            ("request", "smtpd_access_policy"),
            ("protocol_state", r.state.as_str()),
            ("protocol_name", "ESMTP"),
            ("client_address", "127.0.0.1"),
            ("client_name", "localhost"),
            ("sender", r.sender.as_str()),
            ("recipient", r.recipient.as_str()),
            ("recipient_count", &r.rcpt_count.to_string()),
            ("queue_id", &queue_id),
            ("size", "2819"),
            (
                "sasl_method",
                if r.sasl_user.is_empty() { "" } else { "PLAIN" },
            ),
            ("sasl_username", r.sasl_user.as_str()),
        ]);
        let mut bytes = Vec::new();
        req.encode(&mut bytes);
        let t = Instant::now();
        let mut s = std::net::TcpStream::connect((host, port.parse::<u16>()?))
            .with_context(|| format!("cannot connect to {host}:{port}"))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.write_all(&bytes)?;
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.ends_with(b"\n\n") {
            let n = s.read(&mut buf)?;
            if n == 0 {
                bail!("the server closed the connection without a reply");
            }
            got.extend_from_slice(&buf[..n]);
        }
        println!(
            "INFO: message received: {}",
            String::from_utf8_lossy(&got).trim_end()
        );
        println!(
            "INFO: reply in {:.3} milliseconds",
            t.elapsed().as_secs_f64() * 1000.0
        );
    }
    Ok(())
}

#[derive(Args, Debug, Default, Clone)]
pub struct TestRequest {
    /// -t: the envelope sender.
    #[arg(long, default_value = "test@example.com")]
    pub sender: String,
    /// -t: the recipient.
    #[arg(long, default_value = "")]
    pub recipient: String,
    /// -t: the SASL user ("" for none).
    #[arg(long = "sasl-user", default_value = "")]
    pub sasl_user: String,
    /// -t: recipient_count.
    #[arg(long = "rcpt-count", default_value_t = 1)]
    pub rcpt_count: u32,
    /// -t: protocol_state.
    #[arg(long, default_value = "DATA")]
    pub state: String,
    /// -t: how many requests.
    #[arg(long, default_value_t = 1)]
    pub count: u32,
}
