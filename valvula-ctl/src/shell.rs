//! The interactive `>> ` shell: the same command tree, one line at a time, with history
//! and completion of verbs, stage names, listeners and modules.

use std::borrow::Cow;
use std::path::PathBuf;

use clap::{CommandFactory, Parser};
use rustyline::completion::{Completer, Pair};
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::validate::Validator;
use rustyline::{Context, Editor, Helper};

use crate::cli::{self, Cli};
use crate::session::Io;

struct Complete {
    words: Vec<String>,
}

impl Completer for Complete {
    type Candidate = Pair;
    fn complete(
        &self,
        line: &str,
        pos: usize,
        _: &Context<'_>,
    ) -> rustyline::Result<(usize, Vec<Pair>)> {
        let start = line[..pos].rfind(' ').map_or(0, |i| i + 1);
        let word = &line[start..pos];
        let c = self
            .words
            .iter()
            .filter(|w| w.starts_with(word))
            .map(|w| Pair {
                display: w.clone(),
                replacement: w.clone(),
            })
            .collect();
        Ok((start, c))
    }
}

impl Hinter for Complete {
    type Hint = String;
}
impl Highlighter for Complete {
    fn highlight_prompt<'b, 's: 'b, 'p: 'b>(
        &'s self,
        prompt: &'p str,
        _default: bool,
    ) -> Cow<'b, str> {
        Cow::Borrowed(prompt)
    }
}
impl Validator for Complete {}
impl Helper for Complete {}

/// Verbs, subcommands, stage names, listeners and modules, for completion.
fn vocabulary(globals: &[String]) -> Vec<String> {
    let mut words: Vec<String> = Vec::new();
    let cmd = Cli::command();
    for a in cmd.get_arguments() {
        if let Some(s) = a.get_short() {
            words.push(format!("-{s}"));
        }
        if let Some(l) = a.get_long() {
            words.push(format!("--{l}"));
        }
    }
    for s in cmd.get_subcommands() {
        words.push(s.get_name().to_owned());
        for sub in s.get_subcommands() {
            words.push(sub.get_name().to_owned());
        }
    }
    words.extend(valvula_postfix::STAGES.iter().map(|(s, _)| (*s).to_owned()));
    words.extend(["first", "last", "help"].map(String::from));
    if let Ok(c) = Cli::try_parse_from(
        std::iter::once("valvula-ctl".to_owned())
            .chain(globals.iter().cloned())
            .chain(["status".into()]),
    ) && let Ok(l) = valvula_config::load_file(&c.global.config)
    {
        for li in &l.config.listeners {
            words.push(li.name.clone());
            words.push(li.address.to_string());
            words.extend(li.modules.iter().cloned());
        }
    }
    words.sort();
    words.dedup();
    words
}

fn history_file() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".valvula-ctl_history"))
}

/// Runs the shell; `globals` (e.g. `--config FILE`) apply to every line.
pub fn run(globals: &[String]) -> anyhow::Result<()> {
    let mut ed: Editor<Complete, rustyline::history::DefaultHistory> = Editor::new()?;
    ed.set_helper(Some(Complete {
        words: vocabulary(globals),
    }));
    let hist = history_file();
    if let Some(h) = &hist {
        let _ = ed.load_history(h);
    }
    println!(
        "valvula-ctl {}: type help for the commands, exit to leave",
        env!("CARGO_PKG_VERSION")
    );
    loop {
        let line = match ed.readline(">> ") {
            Ok(l) => l,
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(e.into()),
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let _ = ed.add_history_entry(line);
        let Some(words) = shlex::split(line) else {
            eprintln!("valvula-ctl: unbalanced quotes");
            continue;
        };
        if words[0] == "help" || words[0] == "?" {
            let _ = Cli::command().print_help();
            continue;
        }
        if matches!(words[0].as_str(), "exit" | "quit") {
            break;
        }
        let args = std::iter::once("valvula-ctl".to_owned())
            .chain(globals.iter().cloned())
            .chain(words);
        match Cli::try_parse_from(args) {
            Ok(c) => {
                if let Err(e) = cli::run(&c, &mut Io { interactive: true }) {
                    eprintln!("valvula-ctl: {e:#}");
                }
            }
            Err(e) => {
                let _ = e.print();
            }
        }
    }
    if let Some(h) = &hist {
        let _ = ed.save_history(h);
    }
    Ok(())
}
