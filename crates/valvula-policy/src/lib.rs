//! The Postfix policy delegation protocol (Postfix's `SMTPD_POLICY_README`), without I/O.
//!
//! A request is a block of `name=value` lines ended by an empty line. The reply is
//! `action=<verb>[ <text>]` followed by an empty line. This crate turns bytes into
//! [`Frame`]s with [`Decoder`] and [`Reply`]s into bytes; sockets, timeouts and modules
//! belong to the daemon.
//!
//! Rules (and where they differ from valvula, the C daemon this replaces):
//! - a line is split at its first `=`; the name must not be empty; the value may contain
//!   `=` and may be empty; nothing is trimmed around the `=`;
//! - a trailing CR is removed (CRLF is accepted); a line of only blanks ends the request,
//!   as in valvula;
//! - attributes are kept in wire order, unknown ones included; lookups take the last
//!   duplicate;
//! - a line starting with `checkserver` where a request starts (no attribute of the
//!   current request read yet) is valvula's health probe ([`Frame::CheckServer`]); inside
//!   a request it is an ordinary line;
//! - a line holding a NUL byte is an error (Postfix never sends one);
//! - bytes per line, bytes per request and attributes per request are limited
//!   ([`Limits`]); a violation is an error and the caller closes the connection without
//!   a reply, which makes Postfix retry and then apply its default action;
//! - values that are not UTF-8 are converted lossily (U+FFFD), so a legacy 8-bit
//!   `helo_name` does not cost the client its mail.

#![forbid(unsafe_code)]

mod decode;
mod reply;
mod request;

pub use decode::{DecodeError, Decoder, Frame, Limits};
pub use reply::{Action, REPLY_TEXT_MAX, Reply, ReplyError};
pub use request::{Attribute, Request};

/// valvula's answer to a `checkserver` probe: 17 bytes, no newline, then the server closes.
pub const CHECKSERVER_REPLY: &[u8] = b"I'm running right";
