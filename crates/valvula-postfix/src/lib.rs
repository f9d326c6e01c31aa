//! Postfix `main.cf` as Postfix reads it, edited the way an operator would by hand.
//!
//! The model follows Postfix's own reader (`readlline()`): a logical line starts with a
//! non-blank character in column 0; a line starting with white space continues it;
//! blank lines and comment lines (`#` as the first non-blank character) are skipped and
//! do not end a logical line. A parameter is `name = value`, split at the first `=`
//! (values may contain `=`, as in `default_action=DUNNO`).
//!
//! Restriction lists are split on white space and commas, with `{ ... }` grouping an
//! item and its options (`check_policy_service { inet:h:p, default_action=DUNNO }`).
//! Hooks are found by whole tokens, so `:3579` never matches `:35790`. Edits change only
//! the bytes they must: the rest of the file, comments and layout included, is kept.

#![forbid(unsafe_code)]

use std::fmt;

/// The restriction stages a policy service can be hooked into, with what each is for.
pub const STAGES: [(&str, &str); 7] = [
    (
        "smtpd_client_restrictions",
        "when the client connects (with smtpd_delay_reject=yes: at each RCPT TO)",
    ),
    (
        "smtpd_helo_restrictions",
        "after HELO/EHLO (with smtpd_delay_reject=yes: at each RCPT TO)",
    ),
    (
        "smtpd_sender_restrictions",
        "after MAIL FROM (with smtpd_delay_reject=yes: at each RCPT TO)",
    ),
    (
        "smtpd_relay_restrictions",
        "at each RCPT TO, before the recipient restrictions: relay control",
    ),
    (
        "smtpd_recipient_restrictions",
        "at each RCPT TO: one request per recipient, recipient_count=0",
    ),
    (
        "smtpd_data_restrictions",
        "at DATA: one request per message with recipient_count (recommended for quotas)",
    ),
    (
        "smtpd_end_of_data_restrictions",
        "after the message: recipient_count and the real size",
    ),
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EditError {
    #[error("{0} is not a restriction stage valvula-ctl edits (see -s)")]
    UnknownStage(String),
    #[error(
        "{stage} is defined {count} times (lines {lines}); Postfix uses the last one. Remove the duplicates first"
    )]
    Duplicate {
        stage: String,
        count: usize,
        lines: String,
    },
    #[error("the value of {stage} (line {line}) has unbalanced {{ }} braces; fix it first")]
    Unbalanced { stage: String, line: usize },
    #[error("the file is not UTF-8 text")]
    NotText,
    #[error(
        "line {line} is not `name = value` ({why}); Postfix refuses this file too. Fix it first"
    )]
    Syntax { line: usize, why: &'static str },
}

/// Where to put a new hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    First,
    Last,
}

impl std::str::FromStr for Position {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "first" => Ok(Position::First),
            "last" => Ok(Position::Last),
            o => Err(format!("{o:?}: the order must be first or last")),
        }
    }
}

/// One physical line: its text without the newline, and whether a newline ended it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Line {
    text: String,
    newline: bool,
}

/// A parameter definition: the line it starts on and every line of its value.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Param {
    name: String,
    /// First line (index).
    start: usize,
    /// Continuation lines that carry value text (blank and comment lines excluded).
    continuations: Vec<usize>,
}

/// A parsed main.cf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MainCf {
    lines: Vec<Line>,
}

fn is_skipped(text: &str) -> bool {
    let t = text.trim_start();
    t.is_empty() || t.starts_with('#')
}

/// A token of a value: its text and where it is (line, byte start, byte end).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Token {
    text: String,
    line: usize,
    start: usize,
    end: usize,
    /// For `{`-groups: where the closing brace is.
    group_end: Option<(usize, usize)>,
}

impl MainCf {
    pub fn parse(text: &str) -> MainCf {
        let mut lines = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            match rest.find('\n') {
                Some(i) => {
                    lines.push(Line {
                        text: rest[..i].to_owned(),
                        newline: true,
                    });
                    rest = &rest[i + 1..];
                }
                None => {
                    lines.push(Line {
                        text: rest.to_owned(),
                        newline: false,
                    });
                    rest = "";
                }
            }
        }
        MainCf { lines }
    }

    pub fn parse_bytes(bytes: &[u8]) -> Result<MainCf, EditError> {
        std::str::from_utf8(bytes)
            .map(MainCf::parse)
            .map_err(|_| EditError::NotText)
    }

    pub fn to_text(&self) -> String {
        let mut s = String::new();
        for l in &self.lines {
            s.push_str(&l.text);
            if l.newline {
                s.push('\n');
            }
        }
        s
    }

    /// Refuses a file Postfix itself would not read: every logical line must be
    /// `name = value`, with a name free of white space (Postfix's `split_nameval()` stops
    /// with a fatal error on anything else, so editing around such a line would hand
    /// Postfix a file it cannot load).
    pub fn check_syntax(&self) -> Result<(), EditError> {
        for (i, l) in self.lines.iter().enumerate() {
            if is_skipped(&l.text) || l.text.starts_with([' ', '\t']) {
                continue;
            }
            let t = l.text.as_str();
            let name_end = t
                .find(|c: char| c.is_ascii_whitespace() || c == '=')
                .unwrap_or(t.len());
            let why = if name_end == 0 {
                "missing name before '='"
            } else if !t[name_end..].trim_start().starts_with('=') {
                "missing '=' after the name"
            } else {
                continue;
            };
            return Err(EditError::Syntax { line: i + 1, why });
        }
        Ok(())
    }

    fn params(&self) -> Vec<Param> {
        let mut out: Vec<Param> = Vec::new();
        let mut current: Option<Param> = None;
        for (i, l) in self.lines.iter().enumerate() {
            if is_skipped(&l.text) {
                continue;
            }
            if l.text.starts_with([' ', '\t']) {
                if let Some(p) = current.as_mut() {
                    p.continuations.push(i);
                }
                continue;
            }
            if let Some(p) = current.take() {
                out.push(p);
            }
            let name = l.text.split('=').next().unwrap_or("").trim().to_owned();
            if l.text.contains('=') && !name.is_empty() {
                current = Some(Param {
                    name,
                    start: i,
                    continuations: Vec::new(),
                });
            }
        }
        if let Some(p) = current {
            out.push(p);
        }
        out
    }

    fn find(&self, name: &str) -> Result<Option<Param>, EditError> {
        let found: Vec<Param> = self
            .params()
            .into_iter()
            .filter(|p| p.name == name)
            .collect();
        match found.len() {
            0 => Ok(None),
            1 => Ok(found.into_iter().next()),
            n => Err(EditError::Duplicate {
                stage: name.to_owned(),
                count: n,
                lines: found
                    .iter()
                    .map(|p| (p.start + 1).to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// The parameter's value as Postfix sees it (lines joined by a space), if defined.
    pub fn value(&self, name: &str) -> Option<String> {
        let p = self.params().into_iter().rev().find(|p| p.name == name)?;
        let first = &self.lines[p.start].text;
        let mut v = first[first.find('=')? + 1..].trim().to_owned();
        for &c in &p.continuations {
            let t = self.lines[c].text.trim();
            if !t.is_empty() {
                if !v.is_empty() {
                    v.push(' ');
                }
                v.push_str(t);
            }
        }
        Some(v)
    }

    /// Every `name = value` as Postfix would list it (`postconf -n` without expansion).
    pub fn settings(&self) -> Vec<(String, String)> {
        let mut seen: Vec<(String, String)> = Vec::new();
        for p in self.params() {
            let v = self.value(&p.name).unwrap_or_default();
            match seen.iter_mut().find(|(n, _)| *n == p.name) {
                Some(slot) => slot.1 = v,
                None => seen.push((p.name, v)),
            }
        }
        seen
    }

    /// The value's tokens, with `{ ... }` groups as one token each.
    fn tokens(&self, p: &Param) -> Result<Vec<Token>, EditError> {
        let first = &self.lines[p.start].text;
        let eq = first.find('=').expect("a parameter line has '='");
        let mut segments = vec![(p.start, eq + 1)];
        segments.extend(p.continuations.iter().map(|&c| (c, 0)));
        let mut out = Vec::new();
        let mut depth = 0usize;
        let mut group: Option<Token> = None;
        for (line, from) in segments {
            let text = &self.lines[line].text;
            let b = text.as_bytes();
            let mut i = from;
            while i < b.len() {
                let c = b[i];
                if c == b' ' || c == b'\t' || c == b',' || c == b'\r' {
                    i += 1;
                    continue;
                }
                if c == b'{' {
                    depth += 1;
                    if depth == 1 {
                        group = Some(Token {
                            text: String::new(),
                            line,
                            start: i,
                            end: i + 1,
                            group_end: None,
                        });
                    }
                    i += 1;
                    continue;
                }
                if c == b'}' {
                    if depth == 0 {
                        return Err(EditError::Unbalanced {
                            stage: p.name.clone(),
                            line: p.start + 1,
                        });
                    }
                    depth -= 1;
                    if depth == 0
                        && let Some(mut g) = group.take()
                    {
                        g.group_end = Some((line, i + 1));
                        g.text = g.text.trim().to_owned();
                        out.push(g);
                    }
                    i += 1;
                    continue;
                }
                let s = i;
                while i < b.len() && !matches!(b[i], b' ' | b'\t' | b',' | b'{' | b'}' | b'\r') {
                    i += 1;
                }
                let word = &text[s..i];
                match group.as_mut() {
                    Some(g) => {
                        if !g.text.is_empty() {
                            g.text.push(' ');
                        }
                        g.text.push_str(word);
                    }
                    None => out.push(Token {
                        text: word.to_owned(),
                        line,
                        start: s,
                        end: i,
                        group_end: None,
                    }),
                }
            }
        }
        if depth != 0 {
            return Err(EditError::Unbalanced {
                stage: p.name.clone(),
                line: p.start + 1,
            });
        }
        Ok(out)
    }

    /// Index of the `check_policy_service` token hooking `target` (`inet:h:p`): followed
    /// by exactly that token, or by a `{ }` group whose first element is it.
    fn hook_index(tokens: &[Token], target: &str) -> Option<usize> {
        tokens.windows(2).position(|w| {
            w[0].text == "check_policy_service"
                && w[0].group_end.is_none()
                && if w[1].group_end.is_some() {
                    w[1].text.split([' ', ',']).find(|s| !s.is_empty()) == Some(target)
                } else {
                    w[1].text == target
                }
        })
    }

    /// Whether `stage` already hooks `target` anywhere in its value.
    pub fn has_hook(&self, stage: &str, target: &str) -> Result<bool, EditError> {
        match self.find(stage)? {
            None => Ok(false),
            Some(p) => Ok(Self::hook_index(&self.tokens(&p)?, target).is_some()),
        }
    }

    /// Adds `check_policy_service <target>` to `stage`. Returns false (and changes
    /// nothing) when the hook is already there.
    pub fn add_hook(
        &mut self,
        stage: &str,
        target: &str,
        pos: Position,
    ) -> Result<bool, EditError> {
        check_stage(stage)?;
        self.check_syntax()?;
        let decl = format!("check_policy_service {target}");
        let Some(p) = self.find(stage)? else {
            let value = match (stage, pos) {
                ("smtpd_recipient_restrictions", Position::First) => {
                    format!("{decl}, permit_mynetworks, reject_unauth_destination")
                }
                ("smtpd_recipient_restrictions", Position::Last) => {
                    format!("permit_mynetworks, reject_unauth_destination, {decl}")
                }
                ("smtpd_relay_restrictions", Position::First) => {
                    format!(
                        "{decl}, permit_mynetworks, permit_sasl_authenticated, defer_unauth_destination"
                    )
                }
                ("smtpd_relay_restrictions", Position::Last) => {
                    format!(
                        "permit_mynetworks, permit_sasl_authenticated, defer_unauth_destination, {decl}"
                    )
                }
                _ => decl,
            };
            if let Some(last) = self.lines.last_mut() {
                last.newline = true;
            }
            self.lines.push(Line {
                text: format!("{stage} = {value}"),
                newline: true,
            });
            return Ok(true);
        };
        let tokens = self.tokens(&p)?;
        if Self::hook_index(&tokens, target).is_some() {
            return Ok(false);
        }
        let Some(last) = tokens.last() else {
            // Defined but empty: the value goes on the first line.
            let line = &mut self.lines[p.start];
            let eq = line.text.find('=').expect("'='");
            let rest = line.text[eq + 1..].to_owned();
            let tail = if rest.trim().is_empty() {
                String::new()
            } else {
                rest.clone()
            };
            line.text = format!(
                "{}= {decl}{}",
                &line.text[..eq],
                if tail.is_empty() {
                    String::new()
                } else {
                    format!(",{tail}")
                }
            );
            return Ok(true);
        };
        match pos {
            Position::First => {
                let line = &mut self.lines[p.start];
                let eq = line.text.find('=').expect("'='");
                let after = &line.text[eq + 1..];
                let value = after.trim_start();
                line.text = if value.is_empty() {
                    // Value on the continuation lines: "name = DECL," keeps what followed.
                    format!("{}= {decl},{}", &line.text[..eq], after)
                } else {
                    format!("{}= {decl}, {value}", &line.text[..eq])
                };
            }
            Position::Last => {
                let (line, end) = match last.group_end {
                    Some(g) => g,
                    None => (last.line, last.end),
                };
                let text = &mut self.lines[line].text;
                let rest = text[end..].to_owned();
                let trailing_comma = rest.trim_start().starts_with(',');
                let insert = if trailing_comma {
                    format!(" {decl}")
                } else {
                    format!(", {decl}")
                };
                if trailing_comma {
                    let comma = end + rest.find(',').expect("comma") + 1;
                    text.insert_str(comma, &insert);
                } else {
                    text.insert_str(end, &insert);
                }
            }
        }
        Ok(true)
    }

    /// Removes `check_policy_service <target>` (and its separator) from `stage`. Returns
    /// false when it was not there.
    pub fn remove_hook(&mut self, stage: &str, target: &str) -> Result<bool, EditError> {
        check_stage(stage)?;
        self.check_syntax()?;
        let Some(p) = self.find(stage)? else {
            return Ok(false);
        };
        let tokens = self.tokens(&p)?;
        let Some(i) = Self::hook_index(&tokens, target) else {
            return Ok(false);
        };
        let (a, b) = (&tokens[i], &tokens[i + 1]);
        let (end_line, end) = b.group_end.unwrap_or((b.line, b.end));
        if a.line == end_line {
            let text = &mut self.lines[a.line].text;
            let lower = if a.line == p.start {
                text.find('=').expect("'='") + 1
            } else {
                0
            };
            // Take the separator after the item (", "), or the one before it when the
            // item ends its line.
            let after = &text[end..];
            let sep_after = after.len() - after.trim_start_matches([' ', '\t', ',']).len();
            let (from, to) = if sep_after > 0 {
                (a.start, end + sep_after)
            } else {
                let before = &text[lower..a.start];
                (lower + before.trim_end_matches([' ', '\t', ',']).len(), end)
            };
            text.replace_range(from..to, "");
            if a.line == p.start {
                let eq = text.find('=').expect("'='");
                if text[eq + 1..].trim().is_empty() {
                    *text = format!("{} =", text[..eq].trim_end());
                } else if !text[eq + 1..].starts_with(' ') {
                    text.insert(eq + 1, ' ');
                }
            } else if text.trim().is_empty() {
                self.lines.remove(a.line);
            }
            return Ok(true);
        }
        // A group spread over several lines: remove those lines' parts.
        self.lines[a.line].text.truncate(a.start);
        let tail = self.lines[end_line].text[end..]
            .trim_start_matches([' ', '\t', ','])
            .to_owned();
        self.lines[end_line].text = if tail.is_empty() {
            String::new()
        } else {
            format!("    {tail}")
        };
        for l in (a.line + 1..end_line).rev() {
            self.lines.remove(l);
        }
        Ok(true)
    }
}

fn check_stage(stage: &str) -> Result<(), EditError> {
    if STAGES.iter().any(|(s, _)| *s == stage) {
        Ok(())
    } else {
        Err(EditError::UnknownStage(stage.to_owned()))
    }
}

/// A minimal line diff: the changed block between the common head and tail, with line
/// numbers, as `-`/`+` lines.
pub struct Diff(pub String);

impl fmt::Display for Diff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

pub fn diff(old: &str, new: &str) -> Diff {
    let a: Vec<&str> = old.split_inclusive('\n').collect();
    let b: Vec<&str> = new.split_inclusive('\n').collect();
    let head = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let tail = a[head..]
        .iter()
        .rev()
        .zip(b[head..].iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    let mut out = String::new();
    if head == a.len() && head == b.len() {
        return Diff(out);
    }
    out.push_str(&format!("@@ line {} @@\n", head + 1));
    for l in &a[head..a.len() - tail] {
        out.push_str(&format!("-{}", l.trim_end_matches('\n')));
        out.push('\n');
    }
    for l in &b[head..b.len() - tail] {
        out.push_str(&format!("+{}", l.trim_end_matches('\n')));
        out.push('\n');
    }
    Diff(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "inet:127.0.0.1:3579";

    fn edit(input: &str, stage: &str, pos: Position) -> String {
        let mut m = MainCf::parse(input);
        m.add_hook(stage, T, pos).unwrap();
        m.to_text()
    }

    #[test]
    fn untouched_file_roundtrips() {
        for s in ["", "a = b", "a = b\n", "# c\n\n  x\n\tb = c\n  d\n"] {
            assert_eq!(MainCf::parse(s).to_text(), s);
        }
    }

    #[test]
    fn values_as_postfix_reads_them() {
        let m = MainCf::parse("a = 1\n# comment\nb =\n  x,\n\n  # inner comment\n  y\nc = k=v\n");
        assert_eq!(m.value("b").as_deref(), Some("x, y"));
        assert_eq!(m.value("c").as_deref(), Some("k=v"));
        assert_eq!(m.settings().len(), 3);
    }

    #[test]
    fn tokens_match_whole_words_and_groups() {
        let m = MainCf::parse(
            "smtpd_data_restrictions = check_policy_service inet:127.0.0.1:35790,\n  check_policy_service { inet:127.0.0.1:4000, default_action=DUNNO }\n",
        );
        assert!(!m.has_hook("smtpd_data_restrictions", T).unwrap());
        assert!(
            m.has_hook("smtpd_data_restrictions", "inet:127.0.0.1:4000")
                .unwrap()
        );
        assert!(
            m.has_hook("smtpd_data_restrictions", "inet:127.0.0.1:35790")
                .unwrap()
        );
    }

    #[test]
    fn first_last_and_idempotent() {
        let s = "smtpd_data_restrictions = reject_unauth_operation, spamblock\n";
        assert_eq!(
            edit(s, "smtpd_data_restrictions", Position::First),
            "smtpd_data_restrictions = check_policy_service inet:127.0.0.1:3579, reject_unauth_operation, spamblock\n"
        );
        let once = edit(s, "smtpd_data_restrictions", Position::Last);
        assert_eq!(
            once,
            "smtpd_data_restrictions = reject_unauth_operation, spamblock, check_policy_service inet:127.0.0.1:3579\n"
        );
        let mut m = MainCf::parse(&once);
        assert!(
            !m.add_hook("smtpd_data_restrictions", T, Position::First)
                .unwrap()
        );
        assert_eq!(m.to_text(), once);
    }

    #[test]
    fn remove_restores_the_value() {
        for pos in [Position::First, Position::Last] {
            let s =
                "x = 1\nsmtpd_data_restrictions = reject_unauth_operation,\n    spamblock\ny = 2\n";
            let mut m = MainCf::parse(s);
            assert!(m.add_hook("smtpd_data_restrictions", T, pos).unwrap());
            assert!(m.remove_hook("smtpd_data_restrictions", T).unwrap());
            assert_eq!(
                m.value("smtpd_data_restrictions").as_deref(),
                Some("reject_unauth_operation, spamblock"),
                "{pos:?}"
            );
            assert!(!m.remove_hook("smtpd_data_restrictions", T).unwrap());
        }
    }

    #[test]
    fn refuses_what_it_cannot_edit_safely() {
        let mut m = MainCf::parse("smtpd_data_restrictions = a\nsmtpd_data_restrictions = b\n");
        assert!(matches!(
            m.add_hook("smtpd_data_restrictions", T, Position::First),
            Err(EditError::Duplicate { count: 2, .. })
        ));
        let mut m = MainCf::parse("smtpd_data_restrictions = check_policy_service { inet:x:1\n");
        assert!(matches!(
            m.add_hook("smtpd_data_restrictions", T, Position::First),
            Err(EditError::Unbalanced { .. })
        ));
        let mut m = MainCf::parse("");
        assert!(matches!(
            m.add_hook("mydestination", T, Position::First),
            Err(EditError::UnknownStage(_))
        ));
        assert!(MainCf::parse_bytes(b"a = \xff\n").is_err());
        for (text, line) in [
            ("a = 1\ngarbage\n", 2),
            ("a b = c\n", 1),
            ("= c\n", 1),
            ("x = 1\n  y\nstray words\n", 3),
        ] {
            let mut m = MainCf::parse(text);
            assert!(
                matches!(
                    m.add_hook("smtpd_data_restrictions", T, Position::Last),
                    Err(EditError::Syntax { line: l, .. }) if l == line
                ),
                "{text:?} was not refused at line {line}"
            );
            assert!(
                matches!(
                    m.remove_hook("smtpd_data_restrictions", T),
                    Err(EditError::Syntax { .. })
                ),
                "{text:?}"
            );
            assert_eq!(m.to_text(), text, "a refused file must not change");
        }
        // White space before the first parameter and "name=value" are fine for Postfix.
        let mut m = MainCf::parse("  stray indented\nsmtpd_data_restrictions=permit\n");
        assert_eq!(
            m.add_hook("smtpd_data_restrictions", T, Position::Last),
            Ok(true)
        );
    }

    #[test]
    fn diff_shows_the_changed_block() {
        let d = diff("a\nb\nc\n", "a\nB\nc\n");
        assert_eq!(d.0, "@@ line 2 @@\n-b\n+B\n");
        assert_eq!(diff("a\n", "a\n").0, "");
    }
}
