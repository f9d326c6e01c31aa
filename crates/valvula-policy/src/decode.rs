use bytes::{Buf, BytesMut};

use crate::request::Request;

/// Bounds on what one client may make the daemon hold. A violation closes the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Bytes in one line, without its LF (and CR). Postfix's attributes are short; the
    /// longest real ones are certificate subjects, well under 1 KiB.
    pub max_line_bytes: usize,
    /// Bytes in one request, every line and its newline counted.
    pub max_request_bytes: usize,
    /// Attribute lines in one request. Postfix 3.7 sends 30 and 3.8 two more; valvula
    /// allowed 40 lines.
    pub max_attributes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_line_bytes: 8 * 1024,
            max_request_bytes: 64 * 1024,
            max_attributes: 128,
        }
    }
}

/// What one call of [`Decoder::decode`] produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// A complete request, ended by its empty line.
    Request(Request),
    /// A line starting with `checkserver` where a request would start (no attribute of
    /// the current request read yet): answer [`crate::CHECKSERVER_REPLY`] and close.
    CheckServer,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("line {line} of the request has no '='")]
    MissingEquals { line: usize },
    #[error("line {line} of the request has an empty attribute name")]
    EmptyName { line: usize },
    #[error("a line is longer than {limit} bytes")]
    LineTooLong { limit: usize },
    #[error("the request is larger than {limit} bytes")]
    RequestTooLarge { limit: usize },
    #[error("the request has more than {limit} attributes")]
    TooManyAttributes { limit: usize },
    #[error("line {line} of the request holds a NUL byte")]
    Nul { line: usize },
}

/// Incremental request decoder: feed it the connection's read buffer after each read.
///
/// It consumes complete lines from the buffer and keeps the attributes of the request in
/// progress, so partial reads cost nothing and back-to-back requests in one buffer come
/// out one per call, in order.
#[derive(Debug)]
pub struct Decoder {
    limits: Limits,
    current: Request,
    request_bytes: usize,
    lines: usize,
    /// Where the search for the next LF resumes: bytes before it were already scanned.
    scanned: usize,
}

impl Decoder {
    pub fn new(limits: Limits) -> Self {
        Decoder {
            limits,
            current: Request::new(),
            request_bytes: 0,
            lines: 0,
            scanned: 0,
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// True when part of a request has arrived: attributes already decoded, or bytes of
    /// an unfinished line in `buf`. At EOF such a request must be dropped, not processed.
    pub fn in_progress(&self, buf: &BytesMut) -> bool {
        self.lines > 0 || !buf.is_empty()
    }

    /// Decodes the next frame from `buf`, consuming the lines it used. `Ok(None)` means
    /// more bytes are needed. After an error the connection must be closed: the stream
    /// position is no longer trustworthy.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
        loop {
            let Some(off) = buf[self.scanned..].iter().position(|&b| b == b'\n') else {
                self.scanned = buf.len();
                if buf.len() > self.limits.max_line_bytes + 1 {
                    return Err(DecodeError::LineTooLong {
                        limit: self.limits.max_line_bytes,
                    });
                }
                if self.request_bytes + buf.len() > self.limits.max_request_bytes {
                    return Err(DecodeError::RequestTooLarge {
                        limit: self.limits.max_request_bytes,
                    });
                }
                return Ok(None);
            };
            let end = self.scanned + off;
            self.scanned = 0;
            let mut content = &buf[..end];
            if let [rest @ .., b'\r'] = content {
                content = rest;
            }
            if content.len() > self.limits.max_line_bytes {
                return Err(DecodeError::LineTooLong {
                    limit: self.limits.max_line_bytes,
                });
            }
            self.request_bytes += end + 1;
            if self.request_bytes > self.limits.max_request_bytes {
                return Err(DecodeError::RequestTooLarge {
                    limit: self.limits.max_request_bytes,
                });
            }
            // valvula's probe is the first line of what would be a request; inside a
            // request the same bytes are an ordinary line, so an attribute value or name
            // that happens to start with it cannot make the daemon drop the request.
            let first_line = self.lines == 0;
            self.lines += 1;
            let line_no = self.lines;

            // Postfix never sends a NUL (its attributes are C strings); one on the wire
            // means a broken or hostile client, and the modules would see a name or value
            // that Postfix and C modules read as cut short at the NUL.
            if content.contains(&0) {
                return Err(DecodeError::Nul { line: line_no });
            }
            if first_line && content.starts_with(b"checkserver") {
                buf.advance(end + 1);
                self.reset();
                return Ok(Some(Frame::CheckServer));
            }
            if content.iter().all(|&b| b == b' ' || b == b'\t') {
                buf.advance(end + 1);
                let req = std::mem::take(&mut self.current);
                self.reset();
                return Ok(Some(Frame::Request(req)));
            }
            let Some(eq) = content.iter().position(|&b| b == b'=') else {
                return Err(DecodeError::MissingEquals { line: line_no });
            };
            if eq == 0 {
                return Err(DecodeError::EmptyName { line: line_no });
            }
            if self.current.len() >= self.limits.max_attributes {
                return Err(DecodeError::TooManyAttributes {
                    limit: self.limits.max_attributes,
                });
            }
            let name = text(&content[..eq]);
            let value = text(&content[eq + 1..]);
            self.current.push(name, value);
            buf.advance(end + 1);
        }
    }

    fn reset(&mut self) {
        self.current = Request::new();
        self.request_bytes = 0;
        self.lines = 0;
        self.scanned = 0;
    }
}

/// The bytes as text, invalid UTF-8 replaced. `from_utf8` first: its ASCII fast path
/// is several times quicker than `from_utf8_lossy`'s chunking on the valid text Postfix
/// sends (about 7,000 instructions per request, 58 calls).
fn text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_owned(),
        Err(_) => String::from_utf8_lossy(bytes).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8], limits: Limits) -> (Vec<Frame>, Option<DecodeError>, BytesMut) {
        let mut d = Decoder::new(limits);
        let mut buf = BytesMut::from(input);
        let mut frames = Vec::new();
        loop {
            match d.decode(&mut buf) {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => return (frames, None, buf),
                Err(e) => return (frames, Some(e), buf),
            }
        }
    }

    fn req(frames: &[Frame], i: usize) -> &Request {
        match &frames[i] {
            Frame::Request(r) => r,
            f => panic!("frame {i} is {f:?}"),
        }
    }

    #[test]
    fn text_that_is_not_utf8_is_replaced_and_the_rest_kept() {
        let (f, e, _) = decode_all(
            b"request=smtpd_access_policy\nsender=\xff\xfe\xc3\x28@example.com\nx\xe9=caf\xc3\xa9\n\n",
            Limits::default(),
        );
        assert!(e.is_none(), "{e:?}");
        let r = req(&f, 0);
        assert_eq!(
            r.get("sender"),
            Some("\u{fffd}\u{fffd}\u{fffd}(@example.com")
        );
        assert_eq!(r.get("x\u{fffd}"), Some("caf\u{e9}"));
    }

    #[test]
    fn keeps_wire_order_unknowns_and_last_duplicate() {
        let (f, e, rest) = decode_all(
            b"request=smtpd_access_policy\nfoo=1\nsender=a@b\nsender=c@d\n\n",
            Limits::default(),
        );
        assert!(e.is_none());
        assert!(rest.is_empty());
        let r = req(&f, 0);
        let names: Vec<_> = r.attributes().iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["request", "foo", "sender", "sender"]);
        assert_eq!(r.get("sender"), Some("c@d"));
        assert_eq!(r.get("foo"), Some("1"));
        assert_eq!(r.get("bar"), None);
    }

    #[test]
    fn splits_at_first_equals_without_trimming() {
        let (f, _, _) = decode_all(
            b"sender=prvs=6199d1e9f=kd5fet.gfj3t6@dkg3t5.com\nsasl_username = u\nempty=\n\n",
            Limits::default(),
        );
        let r = req(&f, 0);
        assert_eq!(
            r.get("sender"),
            Some("prvs=6199d1e9f=kd5fet.gfj3t6@dkg3t5.com")
        );
        assert_eq!(r.get("sasl_username"), None);
        assert_eq!(r.get("sasl_username "), Some(" u"));
        assert_eq!(r.get("empty"), Some(""));
        assert_eq!(r.get_nonempty("empty"), None);
    }

    #[test]
    fn accepts_crlf_and_blank_terminators() {
        let (f, e, _) = decode_all(b"a=1\r\nb=2\r\n\r\nc=3\n \t\n", Limits::default());
        assert!(e.is_none());
        assert_eq!(f.len(), 2);
        assert_eq!(req(&f, 0).get("b"), Some("2"));
        assert_eq!(req(&f, 1).get("c"), Some("3"));
    }

    #[test]
    fn empty_request_is_a_request() {
        let (f, _, _) = decode_all(b"\n", Limits::default());
        assert_eq!(f, vec![Frame::Request(Request::new())]);
    }

    #[test]
    fn back_to_back_requests_in_order() {
        let (f, e, rest) = decode_all(b"n=1\n\nn=2\n\nn=3\n\nn=4", Limits::default());
        assert!(e.is_none());
        assert_eq!(f.len(), 3);
        for i in 0..3 {
            assert_eq!(req(&f, i).get("n"), Some((i + 1).to_string().as_str()));
        }
        assert_eq!(&rest[..], b"n=4");
    }

    #[test]
    fn partial_input_resumes() {
        let mut d = Decoder::new(Limits::default());
        let mut buf = BytesMut::new();
        let input = b"sender=a@b\nrecipient=c@d\n\n";
        let mut out = None;
        for &b in input {
            buf.extend_from_slice(&[b]);
            assert!(out.is_none());
            out = d.decode(&mut buf).unwrap();
            if out.is_none() {
                assert!(d.in_progress(&buf));
            }
        }
        let Some(Frame::Request(r)) = out else {
            panic!()
        };
        assert_eq!(r.get("recipient"), Some("c@d"));
        assert!(!d.in_progress(&buf));
    }

    #[test]
    fn malformed_lines() {
        let (_, e, _) = decode_all(b"request=x\nthis line has no equals\n\n", Limits::default());
        assert_eq!(e, Some(DecodeError::MissingEquals { line: 2 }));
        let (_, e, _) = decode_all(b"=foo\n\n", Limits::default());
        assert_eq!(e, Some(DecodeError::EmptyName { line: 1 }));
    }

    #[test]
    fn checkserver_only_where_a_request_starts() {
        let (f, e, _) = decode_all(b"checkserver\n", Limits::default());
        assert_eq!((f.clone(), e.clone()), (vec![Frame::CheckServer], None));
        // valvula's probe matches on the first 11 bytes.
        let (f, e, _) = decode_all(b"checkserverfoo=1\n", Limits::default());
        assert_eq!((f.clone(), e.clone()), (vec![Frame::CheckServer], None));
        // After a complete request, the next line starts a request again.
        let (f, e, _) = decode_all(b"a=1\n\ncheckserver\n", Limits::default());
        assert_eq!(e, None, "frames {f:?}");
        assert_eq!(f.len(), 2, "frames {f:?}");
        assert_eq!(f[1], Frame::CheckServer, "frames {f:?}");
        // Inside a request it is an attribute like any other...
        let (f, e, rest) = decode_all(b"a=1\ncheckserverfoo=1\nb=2\n\n", Limits::default());
        assert_eq!(e, None, "frames {f:?}");
        assert!(rest.is_empty(), "left over: {rest:?}");
        assert_eq!(f.len(), 1, "frames {f:?}");
        let r = req(&f, 0);
        assert_eq!(r.get("checkserverfoo"), Some("1"), "request {r:?}");
        assert_eq!(r.get("b"), Some("2"), "request {r:?}");
        // ...and without '=' a malformed line.
        let (f, e, _) = decode_all(b"a=1\ncheckserver\n\n", Limits::default());
        assert_eq!(
            e,
            Some(DecodeError::MissingEquals { line: 2 }),
            "frames {f:?}"
        );
        assert!(f.is_empty(), "frames {f:?}");
    }

    #[test]
    fn line_limit_with_and_without_newline() {
        let l = Limits {
            max_line_bytes: 10,
            ..Limits::default()
        };
        let (f, e, _) = decode_all(b"a=12345678\n\n", l);
        assert!(e.is_none(), "{e:?}");
        assert_eq!(f.len(), 1);
        let (_, e, _) = decode_all(b"a=123456789\n\n", l);
        assert_eq!(e, Some(DecodeError::LineTooLong { limit: 10 }));
        // No newline yet: refused as soon as the line is provably too long.
        let (_, e, _) = decode_all(b"a=1234567890123", l);
        assert_eq!(e, Some(DecodeError::LineTooLong { limit: 10 }));
        // CRLF does not count against the limit.
        let (_, e, _) = decode_all(b"a=12345678\r\n\r\n", l);
        assert!(e.is_none());
    }

    #[test]
    fn request_and_attribute_limits() {
        let l = Limits {
            max_request_bytes: 13,
            ..Limits::default()
        };
        let (f, e, _) = decode_all(b"a=1\nb=2\nc=3\n\n", l);
        assert!(e.is_none());
        assert_eq!(f.len(), 1);
        let (_, e, _) = decode_all(b"a=1\nb=2\nc=34\n\n", l);
        assert_eq!(e, Some(DecodeError::RequestTooLarge { limit: 13 }));
        let l = Limits {
            max_attributes: 2,
            ..Limits::default()
        };
        let (f, e, _) = decode_all(b"a=1\nb=2\n\n", l);
        assert!(e.is_none());
        assert_eq!(f.len(), 1);
        let (_, e, _) = decode_all(b"a=1\nb=2\nc=3\n\n", l);
        assert_eq!(e, Some(DecodeError::TooManyAttributes { limit: 2 }));
        // The limits apply per request, not per connection.
        let (f, e, _) = decode_all(b"a=1\nb=2\n\na=1\nb=2\n\n", l);
        assert!(e.is_none());
        assert_eq!(f.len(), 2);
    }

    #[test]
    fn non_utf8_survives() {
        let (f, e, _) = decode_all(b"helo_name=caf\xe9\n\n", Limits::default());
        assert!(e.is_none(), "{e:?}");
        let r = req(&f, 0);
        assert_eq!(r.get("helo_name"), Some("caf\u{fffd}"), "request {r:?}");
    }

    #[test]
    fn nul_is_refused_in_names_values_and_probes() {
        for (input, line) in [
            (&b"request=x\nx=a\0b\n\n"[..], 2),
            (b"a\0=b\n\n", 1),
            (b"\0\n\n", 1),
            (b"checkserver\0\n", 1),
            (b"a=1\r\nb=\0\r\n\r\n", 2),
        ] {
            let (f, e, _) = decode_all(input, Limits::default());
            assert_eq!(e, Some(DecodeError::Nul { line }), "{input:?} gave {f:?}");
            assert!(f.is_empty(), "{input:?} gave {f:?}");
        }
        // A NUL in a line still arriving is refused once its line is complete.
        let mut d = Decoder::new(Limits::default());
        let mut buf = BytesMut::from(&b"x=a\0"[..]);
        assert_eq!(d.decode(&mut buf), Ok(None));
        buf.extend_from_slice(b"b\n");
        assert_eq!(d.decode(&mut buf), Err(DecodeError::Nul { line: 1 }));
    }

    #[test]
    fn encode_roundtrip() {
        let r = Request::from_pairs([("a", "1"), ("b", "x=y")]);
        let mut out = Vec::new();
        r.encode(&mut out);
        let (f, _, _) = decode_all(&out, Limits::default());
        assert_eq!(req(&f, 0), &r);
    }
}
