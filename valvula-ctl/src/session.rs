//! What every command works with: the global options (which files) and the terminal.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use clap::Args;

#[derive(Args, Debug, Clone)]
pub struct Global {
    /// valvulad's configuration file.
    #[arg(long, global = true, default_value = valvula_config::DEFAULT_PATH)]
    pub config: PathBuf,
    /// Postfix's configuration directory.
    #[arg(long = "postfix-dir", global = true, default_value = "/etc/postfix")]
    pub postfix_dir: PathBuf,
    /// Show the change without writing it.
    #[arg(long = "dry-run", global = true)]
    pub dry_run: bool,
    /// Run `postfix reload` after a main.cf change without asking.
    #[arg(long, global = true)]
    pub reload: bool,
    /// Never ask; do not run `postfix reload` unless --reload is given.
    #[arg(long, global = true)]
    pub yes: bool,
}

/// Where a command reads answers and writes its output (the terminal, or the shell).
pub struct Io {
    pub interactive: bool,
}

impl Io {
    pub fn terminal() -> Io {
        use std::io::IsTerminal;
        Io {
            interactive: std::io::stdin().is_terminal(),
        }
    }

    /// Asks a yes/no question; no terminal means no.
    pub fn confirm(&mut self, question: &str) -> bool {
        if !self.interactive {
            return false;
        }
        print!("{question} [y/N] ");
        let _ = std::io::stdout().flush();
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line).is_ok()
            && matches!(line.trim(), "y" | "Y" | "yes")
    }
}
