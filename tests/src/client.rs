//! A policy client that speaks raw bytes, so tests assert exactly what goes over the wire.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct Client {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

/// What the server did after we sent something.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    Reply(String),
    /// The connection closed with these bytes unread (usually none).
    Closed(String),
    /// Nothing within the wait.
    Silence,
}

impl Client {
    pub async fn connect(addr: &str) -> Client {
        let stream = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    /// A client on a connection opened elsewhere.
    pub fn from_stream(stream: TcpStream) -> Client {
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("send");
    }

    /// Reads one reply (up to and including "\n\n").
    pub async fn answer(&mut self, wait: Duration) -> Answer {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let r: Vec<u8> = self.buf.drain(..i + 2).collect();
                return Answer::Reply(String::from_utf8_lossy(&r).into_owned());
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return Answer::Silence,
                Ok(Ok(0)) | Ok(Err(_)) => {
                    let rest = String::from_utf8_lossy(&self.buf).into_owned();
                    self.buf.clear();
                    return Answer::Closed(rest);
                }
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Sends a request and returns the reply text, panicking on anything else.
    pub async fn ask(&mut self, request: &[u8]) -> String {
        self.send(request).await;
        match self.answer(Duration::from_secs(10)).await {
            Answer::Reply(r) => r,
            other => panic!(
                "expected a reply to {:?}, got {other:?}",
                String::from_utf8_lossy(request)
            ),
        }
    }
}

/// A realistic request, as Postfix 3.7 sends it at RCPT (reference postfix-samples).
pub fn postfix_request(extra: &[(&str, &str)]) -> Vec<u8> {
    let mut attrs: Vec<(String, String)> = [
        ("request", "smtpd_access_policy"),
        ("protocol_state", "RCPT"),
        ("protocol_name", "ESMTP"),
        ("client_address", "127.0.0.1"),
        ("client_name", "localhost"),
        ("client_port", "40502"),
        ("reverse_client_name", "localhost"),
        ("server_address", "127.0.0.1"),
        ("server_port", "48953"),
        ("helo_name", "client.harness.test"),
        ("sender", "alice@example.com"),
        ("recipient", "bob@example.com"),
        ("recipient_count", "0"),
        ("queue_id", ""),
        ("instance", "7e86.6b025e43.3573.0"),
        ("size", "0"),
        ("etrn_domain", ""),
        ("stress", ""),
        ("sasl_method", "PLAIN"),
        ("sasl_username", "alice@example.com"),
        ("sasl_sender", ""),
        ("ccert_subject", ""),
        ("ccert_issuer", ""),
        ("ccert_fingerprint", ""),
        ("ccert_pubkey_fingerprint", ""),
        ("encryption_protocol", ""),
        ("encryption_cipher", ""),
        ("encryption_keysize", "0"),
        ("policy_context", ""),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    for (k, v) in extra {
        match attrs.iter_mut().find(|(n, _)| n == k) {
            Some(slot) => slot.1 = v.to_string(),
            None => attrs.push((k.to_string(), v.to_string())),
        }
    }
    let mut out = Vec::new();
    for (k, v) in attrs {
        out.extend_from_slice(format!("{k}={v}\n").as_bytes());
    }
    out.push(b'\n');
    out
}

/// Opens `conns` connections spread over `addrs`, each sending `per_conn` requests made
/// by `request(connection, n)`; every reply must be `admitted` or `refused` (a prefix).
/// Returns how many were admitted.
pub async fn hammer(
    addrs: &[String],
    conns: usize,
    per_conn: usize,
    request: impl Fn(usize, usize) -> Vec<u8> + Send + Sync + 'static,
    admitted: &'static str,
    refused: &'static str,
) -> u64 {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    let count = Arc::new(AtomicU64::new(0));
    let request = Arc::new(request);
    let mut tasks = Vec::new();
    for i in 0..conns {
        let (addr, count, request) = (
            addrs[i % addrs.len()].clone(),
            count.clone(),
            request.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(&addr).await;
            for j in 0..per_conn {
                let r = c.ask(&request(i, j)).await;
                if r.starts_with(admitted) {
                    count.fetch_add(1, Ordering::SeqCst);
                } else {
                    assert!(r.starts_with(refused), "unexpected reply {r:?}");
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    count.load(Ordering::SeqCst)
}
