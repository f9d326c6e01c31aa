use std::fmt;
use std::str::FromStr;

/// Longest reply text accepted. Postfix reads policy replies with `line_length_limit`
/// (2048 by default) and the line also holds `action=` and the verb.
pub const REPLY_TEXT_MAX: usize = 2000;

/// The actions of Postfix's access(5) table that a policy server may return.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Dunno,
    Ok,
    Reject,
    Defer,
    DeferIfPermit,
    DeferIfReject,
    Discard,
    Hold,
    Prepend,
    Redirect,
    Bcc,
    Filter,
    Warn,
    Info,
    /// The text is the whole action: a numeric `4xx`/`5xx` reply, or the name of a
    /// restriction class defined in main.cf.
    Raw,
}

impl Action {
    pub const ALL: [Action; 15] = [
        Action::Dunno,
        Action::Ok,
        Action::Reject,
        Action::Defer,
        Action::DeferIfPermit,
        Action::DeferIfReject,
        Action::Discard,
        Action::Hold,
        Action::Prepend,
        Action::Redirect,
        Action::Bcc,
        Action::Filter,
        Action::Warn,
        Action::Info,
        Action::Raw,
    ];

    /// The lower-case verb sent on the wire (`raw` has none of its own).
    pub fn verb(self) -> &'static str {
        match self {
            Action::Dunno => "dunno",
            Action::Ok => "ok",
            Action::Reject => "reject",
            Action::Defer => "defer",
            Action::DeferIfPermit => "defer_if_permit",
            Action::DeferIfReject => "defer_if_reject",
            Action::Discard => "discard",
            Action::Hold => "hold",
            Action::Prepend => "prepend",
            Action::Redirect => "redirect",
            Action::Bcc => "bcc",
            Action::Filter => "filter",
            Action::Warn => "warn",
            Action::Info => "info",
            Action::Raw => "raw",
        }
    }

    /// Actions that mean nothing without their argument (a header, an address, a
    /// transport); Postfix logs them as errors when the argument is missing.
    pub fn needs_text(self) -> bool {
        matches!(
            self,
            Action::Prepend | Action::Redirect | Action::Bcc | Action::Filter | Action::Raw
        )
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.verb())
    }
}

impl FromStr for Action {
    type Err = ReplyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.to_ascii_lowercase();
        Action::ALL
            .into_iter()
            .find(|a| a.verb() == lower)
            .ok_or_else(|| ReplyError::UnknownAction(s.to_owned()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("unknown action {0:?}")]
    UnknownAction(String),
    #[error("reply text contains a CR, LF or NUL byte")]
    ControlCharacter,
    #[error("reply text is {0} bytes, more than the {REPLY_TEXT_MAX} allowed")]
    TooLong(usize),
    #[error("action {0} needs a text (header, address, transport or code)")]
    MissingText(Action),
    #[error("raw action {0:?} is neither a 4xx/5xx reply nor a restriction class name")]
    BadRaw(String),
}

/// A validated policy reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    action: Action,
    text: String,
}

impl Reply {
    pub fn dunno() -> Self {
        Reply {
            action: Action::Dunno,
            text: String::new(),
        }
    }

    /// Validates and builds a reply. The text may be empty except where the action
    /// needs it ([`Action::needs_text`]).
    pub fn new(action: Action, text: impl Into<String>) -> Result<Self, ReplyError> {
        let text = text.into();
        if text.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
            return Err(ReplyError::ControlCharacter);
        }
        if text.len() > REPLY_TEXT_MAX {
            return Err(ReplyError::TooLong(text.len()));
        }
        if action.needs_text() && text.trim().is_empty() {
            return Err(ReplyError::MissingText(action));
        }
        if action == Action::Raw && !raw_is_valid(&text) {
            return Err(ReplyError::BadRaw(text));
        }
        Ok(Reply { action, text })
    }

    pub fn action(&self) -> Action {
        self.action
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// `action=<verb>[ <text>]\n\n`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"action=");
        if self.action == Action::Raw {
            out.extend_from_slice(self.text.as_bytes());
        } else {
            out.extend_from_slice(self.action.verb().as_bytes());
            if !self.text.is_empty() {
                out.push(b' ');
                out.extend_from_slice(self.text.as_bytes());
            }
        }
        out.extend_from_slice(b"\n\n");
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(16 + self.text.len());
        self.encode(&mut v);
        v
    }
}

/// A numeric reply (`450 ...`, `554 5.7.1 ...`) or a restriction class name.
fn raw_is_valid(text: &str) -> bool {
    let first = text.split(' ').next().unwrap_or("");
    let b = first.as_bytes();
    let numeric =
        b.len() == 3 && matches!(b[0], b'4' | b'5') && b[1..].iter().all(u8::is_ascii_digit);
    let class = !first.is_empty()
        && !b[0].is_ascii_digit()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'))
        && first.len() == text.len();
    numeric || class
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_every_verb() {
        for a in Action::ALL {
            let text = match a {
                Action::Raw => "450 4.7.1 slow down",
                a if a.needs_text() => "x",
                _ => "",
            };
            let r = Reply::new(a, text).unwrap();
            let s = String::from_utf8(r.to_bytes()).unwrap();
            assert!(s.starts_with("action="));
            assert!(s.ends_with("\n\n"));
            if a == Action::Raw {
                assert_eq!(s, "action=450 4.7.1 slow down\n\n");
            } else if text.is_empty() {
                assert_eq!(s, format!("action={}\n\n", a.verb()));
            }
        }
        assert_eq!(
            Reply::new(Action::Reject, "no").unwrap().to_bytes(),
            b"action=reject no\n\n"
        );
        assert_eq!(
            Reply::new(Action::DeferIfReject, "").unwrap().to_bytes(),
            b"action=defer_if_reject\n\n"
        );
    }

    #[test]
    fn refuses_bad_text() {
        assert_eq!(
            Reply::new(Action::Reject, "a\nb"),
            Err(ReplyError::ControlCharacter)
        );
        assert_eq!(
            Reply::new(Action::Reject, "a\rb"),
            Err(ReplyError::ControlCharacter)
        );
        assert_eq!(
            Reply::new(Action::Reject, "a\0b"),
            Err(ReplyError::ControlCharacter)
        );
        assert!(matches!(
            Reply::new(Action::Reject, "x".repeat(REPLY_TEXT_MAX + 1)),
            Err(ReplyError::TooLong(_))
        ));
        assert_eq!(
            Reply::new(Action::Filter, " "),
            Err(ReplyError::MissingText(Action::Filter))
        );
        assert!(Reply::new(Action::Raw, "250 ok").is_err());
        assert!(Reply::new(Action::Raw, "my_class").is_ok());
        assert!(Reply::new(Action::Raw, "my class").is_err());
        assert!(Reply::new(Action::Raw, "550").is_ok());
    }

    #[test]
    fn parses_verbs_case_insensitively() {
        assert_eq!(
            "DEFER_IF_PERMIT".parse::<Action>().unwrap(),
            Action::DeferIfPermit
        );
        assert!("defer_is_reject".parse::<Action>().is_err());
    }
}
