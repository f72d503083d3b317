//! Small stream adapters shared by the listeners.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

/// A stream whose first bytes were already read (a PROXY protocol header's leftovers, a buffered
/// ClientHello): reads return those first, then continue on the stream.
pub struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Bytes, inner: S) -> Self {
        Prefixed { prefix, inner }
    }

    pub fn into_parts(self) -> (Bytes, S) {
        (self.prefix, self.inner)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Writes `a` then `b`, in one system call when the socket takes both (a head and a body).
pub async fn write_all_two<W: AsyncWrite + Unpin>(w: &mut W, a: &[u8], b: &[u8]) -> io::Result<()> {
    let mut a = a;
    let mut b = b;
    while !a.is_empty() {
        let n = w
            .write_vectored(&[io::IoSlice::new(a), io::IoSlice::new(b)])
            .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let from_a = n.min(a.len());
        a = &a[from_a..];
        b = &b[n - from_a..];
    }
    w.write_all(b).await
}

/// What a connection has been doing, for the idle watchdog: bytes moved since the last check,
/// requests in flight, and whether a first request has arrived.
#[derive(Default)]
pub struct Activity {
    moved: AtomicBool,
    in_flight: AtomicUsize,
    seen_request: AtomicBool,
}

impl Activity {
    /// Marks a request as in flight until the returned guard is dropped.
    pub fn request(self: &Arc<Self>) -> InFlight {
        self.seen_request.store(true, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Counts the connection as past its first request (tunnels: the handshake is done).
    pub fn mark_started(&self) {
        self.seen_request.store(true, Ordering::Relaxed);
    }

    /// Records that bytes moved (for relays that do their own I/O, like the splice relay).
    pub fn mark_moved(&self) {
        self.moved.store(true, Ordering::Relaxed);
    }

    fn busy(&self) -> bool {
        self.moved.swap(false, Ordering::Relaxed) || self.in_flight.load(Ordering::Relaxed) > 0
    }
}

pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        // The end of a request is activity: the idle time counts from it.
        self.0.mark_moved();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Resolves when the connection should be dropped: no complete first request within
/// `first_request` (a client that connects and sends nothing, or trickles a header byte by byte),
/// or, later, no bytes and no request in flight for `idle`.
pub async fn watchdog(activity: Arc<Activity>, first_request: Duration, idle: Duration) {
    tokio::time::sleep(first_request).await;
    if !activity.seen_request.load(Ordering::Relaxed) {
        return;
    }
    // Checked four times per timeout. The last activity fell inside the window before the last
    // busy check, so four quiet checks after it mean at least `idle` and at most 1.25 × `idle`
    // passed since then.
    let tick = idle / 4;
    let mut quiet = 0;
    loop {
        tokio::time::sleep(tick).await;
        if activity.busy() {
            quiet = 0;
        } else {
            quiet += 1;
            if quiet >= 4 {
                return;
            }
        }
    }
}

/// A stream that records activity for the watchdog.
pub struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> Watched<S> {
    pub fn new(inner: S, activity: Arc<Activity>) -> Self {
        Watched { inner, activity }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.mark_moved();
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.mark_moved();
        }
        res
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.mark_moved();
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
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
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn prefixed_reads_prefix_then_stream() {
        let (mut a, b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, b" world")
            .await
            .unwrap();
        drop(a);
        let mut s = Prefixed::new(Bytes::from_static(b"hello"), b);
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello world");
    }

    #[tokio::test(start_paused = true)]
    async fn watchdog_fires_without_a_first_request() {
        let act = Arc::new(Activity::default());
        let start = tokio::time::Instant::now();
        watchdog(act, Duration::from_secs(10), Duration::from_secs(60)).await;
        assert_eq!(start.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn watchdog_waits_while_a_request_is_in_flight() {
        let act = Arc::new(Activity::default());
        let guard = act.request();
        let start = tokio::time::Instant::now();
        let dog = tokio::spawn(watchdog(
            act.clone(),
            Duration::from_secs(1),
            Duration::from_secs(8),
        ));
        tokio::time::sleep(Duration::from_secs(100)).await;
        assert!(!dog.is_finished());
        drop(guard);
        dog.await.unwrap();
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_secs(108) && waited <= Duration::from_secs(111),
            "{waited:?}"
        );
    }
}
