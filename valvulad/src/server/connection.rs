//! One connection: requests read and framed within their limits, each run through
//! the chain and answered in order, until the client closes, a limit or timeout is hit,
//! or the daemon stops (between requests).

use std::sync::atomic::Ordering;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use valvula_policy::{CHECKSERVER_REPLY, Decoder, Frame};

use super::connections::{Phase, Slot};
use super::shared::ListenerShared;

/// Serves one connection until the client closes, a limit or timeout is hit, or the
/// daemon stops (between requests).
pub(super) async fn serve<S>(
    mut stream: S,
    peer: &str,
    shared: &ListenerShared,
    shutdown: &CancellationToken,
    slot: &mut Slot,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let limits = shared.runtime.load().limits.clone();
    let mut decoder = Decoder::new(limits.codec);
    let mut buf = BytesMut::with_capacity(4096);
    let mut out = Vec::with_capacity(256);
    let mut request_deadline: Option<tokio::time::Instant> = None;
    loop {
        let decoded = decoder.decode(&mut buf);
        if matches!(decoded, Ok(Some(_))) {
            // The next request gets its own request_timeout.
            request_deadline = None;
        }
        match decoded {
            Err(e) => {
                let rt = shared.runtime.load();
                shared.malformed.fetch_add(1, Ordering::Relaxed);
                if let Some(more) = shared.malformed_log.allow() {
                    tracing::warn!(listener = %rt.config.name, client = %peer, closed_since_last_line = more, "closing connection without a reply: {e}");
                }
                return;
            }
            Ok(Some(Frame::CheckServer)) => {
                if !shared.conns.enter(slot, Phase::Busy) {
                    return;
                }
                let _ = stream.write_all(CHECKSERVER_REPLY).await;
                let _ = stream.shutdown().await;
                return;
            }
            Ok(Some(Frame::Request(req))) => {
                // From here on the connection is never evicted; if it already was (it
                // was idle or stalled when a new connection took its place), the request
                // is dropped unanswered and Postfix sends it again on a new connection.
                if !shared.conns.enter(slot, Phase::Busy) {
                    tracing::debug!(client = %peer, "connection evicted before its request was processed");
                    return;
                }
                let rt = shared.runtime.load_full();
                let reply = super::chain::run(&rt, req).await;
                shared.answers.count(reply.as_ref());
                let Some(reply) = reply else {
                    return;
                };
                out.clear();
                reply.encode(&mut out);
                match tokio::time::timeout(limits.request_timeout, stream.write_all(&out)).await {
                    Ok(Ok(())) => continue,
                    Ok(Err(e)) => {
                        tracing::info!(listener = %rt.config.name, client = %peer, "client went away before the reply: {e}");
                        return;
                    }
                    Err(_) => {
                        tracing::warn!(listener = %rt.config.name, client = %peer, "client does not read its replies; closing");
                        return;
                    }
                }
            }
            Ok(None) => {}
        }
        let partial = decoder.in_progress(&buf);
        if !shared
            .conns
            .enter(slot, if partial { Phase::Partial } else { Phase::Idle })
        {
            return;
        }
        // A request must be complete within request_timeout of its first byte, however
        // it trickles in: a timeout per read would let one byte every few seconds hold
        // the connection for ever (slowloris).
        let deadline = if partial {
            *request_deadline
                .get_or_insert_with(|| tokio::time::Instant::now() + limits.request_timeout)
        } else {
            request_deadline = None;
            tokio::time::Instant::now() + limits.idle_timeout
        };
        let wait = if partial {
            limits.request_timeout
        } else {
            limits.idle_timeout
        };
        let read = tokio::select! {
            biased;
            _ = shutdown.cancelled(), if !partial => return,
            _ = slot.evicted().cancelled() => {
                tracing::debug!(client = %peer, partial, "connection closed to make room for a new one");
                return;
            }
            r = tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)) => r,
        };
        match read {
            Ok(Ok(0)) => {
                if partial {
                    let rt = shared.runtime.load();
                    tracing::warn!(listener = %rt.config.name, client = %peer, "connection closed in the middle of a request; request dropped");
                }
                return;
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::debug!(client = %peer, "read failed: {e}");
                return;
            }
            Err(_) => {
                let rt = shared.runtime.load();
                if partial {
                    tracing::warn!(listener = %rt.config.name, client = %peer, timeout = ?wait, "request not completed in time; closing without a reply");
                } else {
                    tracing::debug!(listener = %rt.config.name, client = %peer, "idle connection closed");
                }
                return;
            }
        }
    }
}
