//! Log output: tracing to stderr, or to syslog (ident `valvulad`, facility mail) for
//! operators whose tools read `/var/log/mail.log`.

use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use tracing::{Level, Metadata};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

use valvula_config::{LogConfig, LogTarget};

/// Installs the global subscriber. `level_override` (from `-d`) wins over the config.
pub fn init(cfg: &LogConfig, level_override: Option<&str>) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(level_override.unwrap_or(&cfg.level))?;
    match cfg.target {
        LogTarget::Stderr => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_target(false)
            .try_init()
            .map_err(|e| anyhow::anyhow!("{e}"))?,
        LogTarget::Syslog => {
            let sock = match Syslog::connect(&cfg.syslog_socket) {
                Ok(s) => s,
                Err(e) => {
                    // No syslog (a container, a test): log to stderr rather than not at all.
                    eprintln!("valvulad: warning: {e:#}; logging to stderr instead");
                    let stderr_cfg = LogConfig {
                        target: LogTarget::Stderr,
                        ..cfg.clone()
                    };
                    return init(&stderr_cfg, level_override);
                }
            };
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(sock)
                .with_ansi(false)
                .without_time()
                .with_level(false)
                .with_target(false)
                .try_init()
                .map_err(|e| anyhow::anyhow!("{e}"))?
        }
    }
    Ok(())
}

/// Sends each event as one datagram to the local syslog socket.
#[derive(Clone)]
struct Syslog {
    sock: Arc<UnixDatagram>,
    pid: u32,
}

impl Syslog {
    fn connect(path: &std::path::Path) -> anyhow::Result<Self> {
        let sock = UnixDatagram::unbound()?;
        sock.connect(path).map_err(|e| {
            anyhow::anyhow!(
                "log.target = \"syslog\": cannot connect to {}: {e}",
                path.display()
            )
        })?;
        Ok(Syslog {
            sock: Arc::new(sock),
            pid: std::process::id(),
        })
    }
}

/// Collects one event's text and sends it on drop.
struct Line {
    sys: Syslog,
    severity: u8,
    prefix: &'static str,
    buf: Vec<u8>,
}

impl Write for Line {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        const MAIL: u8 = 2;
        let text = String::from_utf8_lossy(&self.buf);
        let msg = format!(
            "<{}>valvulad[{}]: {}{}",
            MAIL * 8 + self.severity,
            self.sys.pid,
            self.prefix,
            text.trim_end()
        );
        let _ = self.sys.sock.send(msg.as_bytes());
    }
}

impl<'a> MakeWriter<'a> for Syslog {
    type Writer = Line;
    fn make_writer(&'a self) -> Line {
        Line {
            sys: self.clone(),
            severity: 6,
            prefix: "info: ",
            buf: Vec::new(),
        }
    }
    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Line {
        // Prefixes as valvula writes them, so existing log greps keep matching.
        let (severity, prefix) = match *meta.level() {
            Level::ERROR => (3, "**ERROR**: "),
            Level::WARN => (4, "warning: "),
            Level::INFO => (6, "info: "),
            _ => (7, "debug: "),
        };
        Line {
            sys: self.clone(),
            severity,
            prefix,
            buf: Vec::new(),
        }
    }
}
