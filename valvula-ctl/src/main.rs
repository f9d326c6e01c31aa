//! valvula-ctl: wire valvulad into Postfix, edit its configuration, administer plans,
//! tickets and rate-limit overrides without SQL, and ask the running daemon.
//!
//! One clap command tree serves both uses: `valvula-ctl -l` once, or `valvula-ctl` alone
//! for a `>> ` shell where the same verbs are typed (with history and completion). An
//! error is a sentence and a non-zero exit status; in the shell it never ends the shell.

mod cli;
mod conf;
mod daemon;
mod database;
mod files;
mod maincf;
mod session;
mod shell;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    // No verb at all (global options only): the interactive shell.
    if cli::only_globals(&args[1..]) {
        return match shell::run(&args[1..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("valvula-ctl: {e:#}");
                ExitCode::from(1)
            }
        };
    }
    let parsed = match cli::Cli::try_parse_from(&args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    match cli::run(&parsed, &mut session::Io::terminal()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("valvula-ctl: {e:#}");
            ExitCode::from(1)
        }
    }
}
