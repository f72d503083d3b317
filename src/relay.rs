//! Relaying bytes both ways between a client and an origin: TLS passthrough tunnels and upgraded
//! (WebSocket) HTTP connections.
//!
//! Half-close is passed on (a side that finishes writing gets its peer's write side shut down, and
//! the other direction keeps flowing); the tunnel ends when both directions are done, when no
//! byte moves for `idle`, or when `stop` is cancelled (drain, revocation).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

use crate::io::{Activity, Watched, watchdog};

/// How a relay ended, and what it moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Relayed {
    pub client_to_origin: u64,
    pub origin_to_client: u64,
    pub end: End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both sides closed.
    Closed,
    /// An I/O error (usually a reset) on either side.
    Error,
    /// No bytes for the idle timeout.
    Idle,
    /// Stopped from outside.
    Stopped,
}

/// Relays until both directions finish, `idle` passes without traffic, or `stop` fires.
pub async fn relay<C, O>(client: C, origin: O, idle: Duration, stop: CancellationToken) -> Relayed
where
    C: AsyncRead + AsyncWrite + Unpin,
    O: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Arc::new(Activity::default());
    activity.mark_started();
    let from_client = Arc::new(AtomicU64::new(0));
    let from_origin = Arc::new(AtomicU64::new(0));
    let mut client = Watched::new(Counted::new(client, from_client.clone()), activity.clone());
    let mut origin = Watched::new(Counted::new(origin, from_origin.clone()), activity.clone());
    let end = tokio::select! {
        r = tokio::io::copy_bidirectional(&mut client, &mut origin) => {
            if r.is_ok() { End::Closed } else { End::Error }
        }
        _ = watchdog(activity, Duration::ZERO, idle) => End::Idle,
        _ = stop.cancelled() => End::Stopped,
    };
    Relayed {
        client_to_origin: from_client.load(Ordering::Relaxed),
        origin_to_client: from_origin.load(Ordering::Relaxed),
        end,
    }
}

/// Counts the bytes read from a stream.
struct Counted<S> {
    inner: S,
    read: Arc<AtomicU64>,
}

impl<S> Counted<S> {
    fn new(inner: S, read: Arc<AtomicU64>) -> Self {
        Counted { inner, read }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.read.fetch_add(n as u64, Ordering::Relaxed);
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn relays_both_ways_with_half_close() {
        let (client, mut client_peer) = tokio::io::duplex(1024);
        let (origin, mut origin_peer) = tokio::io::duplex(1024);
        let task = tokio::spawn(relay(
            client,
            origin,
            Duration::from_secs(5),
            CancellationToken::new(),
        ));
        client_peer.write_all(b"hello").await.unwrap();
        client_peer.shutdown().await.unwrap();
        let mut got = Vec::new();
        origin_peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello");
        // The other direction still flows after the client's half-close.
        origin_peer.write_all(b"world!").await.unwrap();
        origin_peer.shutdown().await.unwrap();
        let mut back = Vec::new();
        client_peer.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"world!");
        let r = task.await.unwrap();
        assert_eq!(
            (r.client_to_origin, r.origin_to_client, r.end),
            (5, 6, End::Closed)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_tunnels_end() {
        let (client, _client_peer) = tokio::io::duplex(64);
        let (origin, _origin_peer) = tokio::io::duplex(64);
        let r = relay(
            client,
            origin,
            Duration::from_secs(60),
            CancellationToken::new(),
        )
        .await;
        assert_eq!(r.end, End::Idle);
    }

    #[tokio::test]
    async fn stop_ends_the_tunnel() {
        let (client, _client_peer) = tokio::io::duplex(64);
        let (origin, _origin_peer) = tokio::io::duplex(64);
        let stop = CancellationToken::new();
        stop.cancel();
        let r = relay(client, origin, Duration::from_secs(60), stop).await;
        assert_eq!(r.end, End::Stopped);
    }
}
