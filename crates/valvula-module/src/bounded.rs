//! Texts of any length in columns of bounded size.

use std::borrow::Cow;

use sha2::{Digest, Sha256};

/// Bytes of the digest suffix [`bounded`] appends: `#` and 64 hex digits.
const SUFFIX: usize = 65;

/// `text` itself when it has at most `max` bytes; otherwise a prefix of it followed by
/// `#` and the SHA-256 of the whole text in hex, `max` bytes in all. A sender address
/// can be as long as Postfix's `line_length_limit` (2048 bytes) while keys and columns
/// are shorter: this keeps every identity distinct (two texts share a bounded form only
/// if they share a SHA-256) and still readable by its start. `max` must be at least 80.
pub fn bounded(text: &str, max: usize) -> Cow<'_, str> {
    assert!(
        max >= 80,
        "bounded: max {max} leaves no room for the digest"
    );
    if text.len() <= max {
        return Cow::Borrowed(text);
    }
    let mut cut = max - SUFFIX;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let digest = Sha256::digest(text.as_bytes());
    let mut out = String::with_capacity(max);
    out.push_str(&text[..cut]);
    out.push('#');
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_texts_stay_long_ones_are_bounded_and_distinct() {
        assert_eq!(bounded("alice@example.com", 255), "alice@example.com");
        let a = format!("{}@example.com", "a".repeat(2000));
        let b = format!("{}@example.org", "a".repeat(2000));
        let (ba, bb) = (bounded(&a, 255), bounded(&b, 255));
        assert_eq!(ba.len(), 255);
        assert_ne!(ba, bb, "same prefix, different texts must stay apart");
        assert!(ba.starts_with("aaaa"));
        assert_eq!(bounded(&a, 255), ba, "stable");
        // Multi-byte characters are never cut in half.
        let wide = "é".repeat(400);
        let w = bounded(&wide, 255);
        assert!(w.len() <= 255, "{}", w.len());
        assert!(w.is_char_boundary(w.len() - SUFFIX));
    }
}
