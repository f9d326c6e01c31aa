//! The command tree: valvula's letters (`-o -l -a -m -e -d -c -r -s -n -y -t`) with
//! readable long names, and subcommands for administration and the daemon.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};

use crate::conf;
use crate::daemon::TestRequest;
use crate::session::{Global, Io};
use crate::{daemon, database, maincf};

#[derive(Parser, Debug)]
#[command(
    name = "valvula-ctl",
    version,
    about = "Manage valvulad: Postfix hooks, listeners, modules, plans, tickets, limits"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(flatten)]
    pub verbs: Verbs,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Args, Debug, Default)]
pub struct Verbs {
    /// -o: the modules available in the module directories.
    #[arg(short = 'o', long = "list-modules")]
    pub list_modules: bool,
    /// -l: the listeners and the modules each runs.
    #[arg(short = 'l', long = "list-listeners")]
    pub list_listeners: bool,
    /// -a: add a listener (HOST:PORT, [IPv6]:PORT, PORT or unix:/path).
    #[arg(short = 'a', long = "add-listener", value_name = "ADDRESS")]
    pub add_listener: Option<String>,
    /// -m: add a module to the end of a listener's chain.
    #[arg(short = 'm', long = "add-module", num_args = 2, value_names = ["MODULE", "LISTENER"])]
    pub add_module: Option<Vec<String>>,
    /// -e: load a module (add it to server.modules).
    #[arg(short = 'e', long = "enable-module", value_name = "MODULE")]
    pub enable: Option<String>,
    /// -d: stop loading a module (and take it out of every chain).
    #[arg(short = 'd', long = "disable-module", value_name = "MODULE")]
    pub disable: Option<String>,
    /// -c: hook a listener into a Postfix restriction stage, first or last.
    #[arg(short = 'c', long = "connect-postfix", num_args = 3, value_names = ["STAGE", "LISTENER", "first|last"])]
    pub connect: Option<Vec<String>>,
    /// -r: remove a listener's hook from a Postfix restriction stage.
    #[arg(short = 'r', long = "disconnect", num_args = 2, value_names = ["STAGE", "LISTENER"])]
    pub disconnect: Option<Vec<String>>,
    /// -s: the restriction stages and what each is for.
    #[arg(short = 's', long = "show-postfix-sections")]
    pub stages: bool,
    /// -n: Postfix's settings from main.cf (as postconf -n lists them).
    #[arg(short = 'n', long = "show-postfix-conf")]
    pub show_postfix: bool,
    /// -y: use MySQL/MariaDB database DBNAME as DBUSER (tested before saving); the
    /// password is asked for, or read from standard input or --password-file, never
    /// taken from the command line.
    // Up to 3 values so that valvula's old `-y DBNAME DBUSER DBPASS` gets a sentence
    // saying where the password goes now, not a generic usage error.
    #[arg(short = 'y', long = "config-mysql", num_args = 2..=3, value_names = ["DBNAME", "DBUSER"])]
    pub mysql: Option<Vec<String>>,
    /// -y: read the password from the first line of standard input.
    #[arg(
        long = "password-stdin",
        conflicts_with = "password_file",
        requires = "mysql"
    )]
    pub password_stdin: bool,
    /// -y: read the password from this file.
    #[arg(long = "password-file", value_name = "FILE", requires = "mysql")]
    pub password_file: Option<PathBuf>,
    /// The MySQL server for -y.
    #[arg(long = "db-host", default_value = "127.0.0.1:3306")]
    pub db_host: String,
    /// -u: run valvulad as USER:GROUP after it binds its sockets (takes effect at restart).
    #[arg(short = 'u', long = "set-user", num_args = 2, value_names = ["USER", "GROUP"])]
    pub user: Option<Vec<String>>,
    /// -t: send a test policy request to a listener and show the reply and its time.
    #[arg(short = 't', long = "test-server", value_name = "LISTENER")]
    pub test: Option<String>,
    #[command(flatten)]
    pub request: TestRequest,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// mod-ticket plans.
    #[command(subcommand)]
    Plan(database::PlanCmd),
    /// mod-ticket tickets: who sends on which plan.
    #[command(subcommand)]
    Ticket(database::TicketCmd),
    /// mod-ratelimit per-identity overrides.
    #[command(subcommand)]
    Override(database::OverrideCmd),
    /// Used, limit, remaining and next reset per window (mod-ticket and mod-ratelimit).
    Usage {
        /// A SASL user, sender, domain or address; all with usage when omitted.
        identity: Option<String>,
    },
    /// Forget every counter of an identity (mod-ticket's counters are set to zero).
    Reset { identity: String },
    /// The running daemon: listeners, modules, requests, latency, uptime.
    Status,
    /// Ask the running daemon to reload its configuration.
    Reload,
    /// Translate valvula's XML valvula.conf into valvulad.toml (printed, or written to --output).
    Import {
        file: PathBuf,
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Leave the shell.
    #[command(alias = "quit")]
    Exit,
}

/// True when the arguments are only global options (so the shell starts).
pub fn only_globals(args: &[String]) -> bool {
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--config" | "--postfix-dir" => i += 2,
            a if a.starts_with("--config=") || a.starts_with("--postfix-dir=") => i += 1,
            "--dry-run" | "--reload" | "--yes" => i += 1,
            _ => return false,
        }
    }
    true
}

pub fn run(c: &Cli, io: &mut Io) -> anyhow::Result<()> {
    let g = &c.global;
    let v = &c.verbs;
    let mut did = false;
    let mut step = |f: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<()> {
        did = true;
        f()
    };
    if v.list_modules {
        step(&mut || conf::list_modules(&g.config))?;
    }
    if v.list_listeners {
        step(&mut || conf::list_listeners(&g.config))?;
    }
    if let Some(a) = &v.add_listener {
        step(&mut || conf::add_listener(g, a))?;
    }
    if let Some(m) = &v.add_module {
        step(&mut || conf::add_module(g, &m[0], &m[1]))?;
    }
    if let Some(m) = &v.enable {
        step(&mut || conf::enable(g, m))?;
    }
    if let Some(m) = &v.disable {
        step(&mut || conf::disable(g, m))?;
    }
    if v.stages {
        step(&mut || {
            for (s, what) in valvula_postfix::STAGES {
                println!("{s:32} {what}");
            }
            Ok(())
        })?;
    }
    if v.show_postfix {
        step(&mut || maincf::show(&g.postfix_dir))?;
    }
    if let Some(c) = &v.connect {
        did = true;
        let pos: valvula_postfix::Position = c[2].parse().map_err(anyhow::Error::msg)?;
        maincf::connect(g, io, &c[0], &c[1], pos)?;
    }
    if let Some(c) = &v.disconnect {
        did = true;
        maincf::disconnect(g, io, &c[0], &c[1])?;
    }
    if let Some(y) = &v.mysql {
        did = true;
        if y.len() > 2 {
            bail!(
                "-y takes DBNAME DBUSER only: a password on the command line is visible to every local user (ps). Give it at the prompt, on standard input (--password-stdin), or in a file (--password-file FILE); nothing changed"
            );
        }
        let from = match (&v.password_file, v.password_stdin) {
            (Some(f), _) => conf::PasswordFrom::File(f.clone()),
            (None, true) => conf::PasswordFrom::Stdin,
            (None, false) if io.interactive => conf::PasswordFrom::Prompt,
            (None, false) => conf::PasswordFrom::Stdin,
        };
        let pass = conf::read_password(
            &from,
            &format!(
                "Password of {}@{} for {} (empty for none): ",
                y[1], v.db_host, y[0]
            ),
        )?;
        conf::set_mysql(g, &v.db_host, &y[0], &y[1], &pass)?;
    }
    if let Some(u) = &v.user {
        did = true;
        conf::set_user(g, &u[0], &u[1])?;
    }
    if let Some(t) = &v.test {
        did = true;
        daemon::test_server(&g.config, t, &v.request)?;
    }
    match &c.command {
        None if !did => bail!("nothing to do: give a verb (valvula-ctl --help lists them)"),
        None => Ok(()),
        Some(Command::Plan(p)) => database::plan(&g.config, p),
        Some(Command::Ticket(t)) => database::ticket(&g.config, t),
        Some(Command::Override(o)) => database::override_cmd(&g.config, o),
        Some(Command::Usage { identity }) => database::usage(&g.config, identity.as_deref()),
        Some(Command::Reset { identity }) => database::reset(&g.config, identity),
        Some(Command::Status) => daemon::status(&g.config),
        Some(Command::Reload) => match daemon::reload(&g.config).context("reload")? {
            Ok(note) => {
                println!("INFO: valvulad reloaded its configuration");
                if !note.is_empty() {
                    println!("INFO: {note}");
                }
                Ok(())
            }
            Err(why) => bail!("valvulad did not reload: {why}"),
        },
        Some(Command::Import { file, output }) => conf::import(file, output.as_deref()),
        Some(Command::Exit) => Ok(()),
    }
}
