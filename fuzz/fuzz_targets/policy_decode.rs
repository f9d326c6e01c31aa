//! The policy codec on arbitrary bytes, fed in arbitrary chunks as a socket would: no
//! panic, the buffer never holds more than the limits allow, and no decoded attribute
//! holds a NUL byte.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use valvula_policy::{Decoder, Frame, Limits};

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_line_bytes: 512,
        max_request_bytes: 4096,
        max_attributes: 64,
    };
    let mut d = Decoder::new(limits);
    let mut buf = BytesMut::new();
    // The first byte picks the chunk size, the rest is the stream.
    let (size, rest) = data
        .split_first()
        .map_or((1, data), |(s, r)| (*s as usize % 64 + 1, r));
    for chunk in rest.chunks(size) {
        buf.extend_from_slice(chunk);
        loop {
            match d.decode(&mut buf) {
                Ok(Some(Frame::Request(r))) => {
                    for a in r.attributes() {
                        assert!(
                            !a.name.contains('\0') && !a.value.contains('\0'),
                            "a NUL got through: {a:?}"
                        );
                    }
                }
                Ok(Some(Frame::CheckServer)) => continue,
                Ok(None) => break,
                Err(_) => return,
            }
        }
        // What waits for more input is bounded by the request limit.
        assert!(buf.len() <= limits.max_request_bytes + limits.max_line_bytes + size);
    }
});
