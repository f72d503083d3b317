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
pub(crate) struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    pub(crate) fn new(prefix: Bytes, inner: S) -> Self {
        Prefixed { prefix, inner }
    }

    pub(crate) fn into_parts(self) -> (Bytes, S) {
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
pub(crate) async fn write_all_two<W: AsyncWrite + Unpin>(
    w: &mut W,
    a: &[u8],
    b: &[u8],
) -> io::Result<()> {
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

/// Writes `a` then `b` as the last bytes before the connection closes (a `Connection: close`
/// answer, a TLS alert). The first attempt tells the kernel more follows ([`SendLast`]), so the
/// FIN of the close right after leaves in the same segment as the end of the answer: one segment
/// and one ACK fewer per connection. What the socket does not take at once is written as usual.
///
/// The caller must close the connection straight after; until then the tail may stay queued.
pub(crate) async fn write_all_last<W>(w: &mut W, a: &[u8], b: &[u8]) -> io::Result<()>
where
    W: AsyncWrite + SendLast + Unpin,
{
    let n = w.send_last(a, b);
    let from_a = n.min(a.len());
    write_all_two(w, &a[from_a..], &b[n - from_a..]).await
}

/// Streams that can queue their last bytes for the FIN to carry.
pub(crate) trait SendLast {
    /// Sends what the socket takes at once of `a` then `b`, without blocking, holding the tail
    /// back for the FIN; returns how many bytes it took (0 when it cannot do this).
    fn send_last(&self, a: &[u8], b: &[u8]) -> usize;
}

impl SendLast for tokio::net::TcpStream {
    fn send_last(&self, a: &[u8], b: &[u8]) -> usize {
        // Bypassing tokio's readiness is harmless: a socket that is full says EAGAIN, and the
        // ordinary write after this one waits for it.
        send_more(self, a, b)
    }
}

/// Sends what a non-blocking socket takes at once of `a` then `b` with MSG_MORE, which corks
/// the tail: close(2) then sets FIN on the queued segment and sends it. Returns the bytes
/// taken (0 on EAGAIN or any error: the caller's ordinary write then sees it).
#[cfg(target_os = "linux")]
pub(crate) fn send_more(socket: &impl std::os::fd::AsFd, a: &[u8], b: &[u8]) -> usize {
    let bufs = [io::IoSlice::new(a), io::IoSlice::new(b)];
    socket2::SockRef::from(socket)
        .send_vectored_with_flags(&bufs, libc::MSG_MORE)
        .unwrap_or(0)
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn send_more(_: &impl std::os::fd::AsFd, _: &[u8], _: &[u8]) -> usize {
    0
}

impl<S: SendLast> SendLast for Prefixed<S> {
    fn send_last(&self, a: &[u8], b: &[u8]) -> usize {
        self.inner.send_last(a, b)
    }
}

impl<S: SendLast> SendLast for Watched<S> {
    fn send_last(&self, a: &[u8], b: &[u8]) -> usize {
        let n = self.inner.send_last(a, b);
        if n > 0 {
            self.activity.mark_moved();
        }
        n
    }
}

/// What a connection has been doing, for the idle watchdog: bytes moved since the last check,
/// requests in flight, and whether a first request has arrived.
#[derive(Default)]
pub(crate) struct Activity {
    moved: AtomicBool,
    in_flight: AtomicUsize,
    seen_request: AtomicBool,
}

impl Activity {
    /// Marks a request as in flight until the returned guard is dropped. The guard borrows:
    /// every request takes one, and a reference count more was two atomic operations more.
    pub(crate) fn request(&self) -> InFlight<'_> {
        self.seen_request.store(true, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self)
    }

    /// Counts the connection as past its first request (tunnels: the handshake is done).
    pub(crate) fn mark_started(&self) {
        self.seen_request.store(true, Ordering::Relaxed);
    }

    /// Records that bytes moved (for relays that do their own I/O, like the splice relay).
    pub(crate) fn mark_moved(&self) {
        self.moved.store(true, Ordering::Relaxed);
    }

    fn busy(&self) -> bool {
        self.moved.swap(false, Ordering::Relaxed) || self.in_flight.load(Ordering::Relaxed) > 0
    }
}

pub(crate) struct InFlight<'a>(&'a Activity);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        // The end of a request is activity: the idle time counts from it.
        self.0.mark_moved();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Resolves when the connection should be dropped: no complete first request within
/// `first_request` (a client that connects and sends nothing, or trickles a header byte by byte),
/// or, later, no bytes and no request in flight for `idle`.
pub(crate) async fn watchdog(activity: Arc<Activity>, first_request: Duration, idle: Duration) {
    // Tunnels pass zero. A zero sleep is not free: it is registered with the timer wheel, due at
    // the next millisecond, so it wakes the driver and the runtime parks with a 1 ms timeout until
    // it fires. Skipping it cut a TLS tunnel's CPU by about a tenth.
    if !first_request.is_zero() {
        tokio::time::sleep(first_request).await;
    }
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

/// How often [`metronome`] ticks: more often than any per-connection timeout of the default
/// config (the shortest, `origin_connect_timeout`, is 3 s).
const METRONOME_TICK: Duration = Duration::from_secs(1);

/// Keeps a timer due within `METRONOME_TICK` (1 s) in the runtime it runs on, forever.
///
/// tokio wakes its I/O driver (an eventfd write, and one more `epoll_wait` return) whenever a
/// timer is registered with a deadline before the driver's next planned wake-up, even while the
/// driver is busy running tasks (tokio-rs/tokio#5207). A new connection's timers (header read,
/// origin connect) usually come before every older connection's, so each new connection paid
/// for a wake-up it did not need. With a tick always due within a second, a timer of a second or
/// more never comes first. Costs one wake-up a second when idle.
pub(crate) async fn metronome() {
    loop {
        tokio::time::sleep(METRONOME_TICK).await;
    }
}

/// A stream that records activity for the watchdog.
pub(crate) struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> Watched<S> {
    pub(crate) fn new(inner: S, activity: Arc<Activity>) -> Self {
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

    /// Segments this socket has received, from the kernel's TCP_INFO.
    #[cfg(target_os = "linux")]
    #[allow(unsafe_code)]
    fn segments_in(s: &tokio::net::TcpStream) -> u32 {
        use std::os::fd::AsRawFd;
        // SAFETY: tcp_info is plain integers; getsockopt writes at most `len` bytes into it.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        // SAFETY: the descriptor is open for the call; `info` and `len` outlive it.
        let rc = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&mut info as *mut libc::tcp_info).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        info.tcpi_segs_in
    }

    /// Writes `head` and `body` as an answer (the last one or not), closes, and returns what the
    /// client read up to the FIN and how many segments that took.
    #[cfg(target_os = "linux")]
    async fn answer_and_close(last: bool, head: &[u8], body: &[u8]) -> (Vec<u8>, u32) {
        use tokio::net::{TcpListener, TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        // As on accepted sockets, which inherit it from the listener.
        server.set_nodelay(true).unwrap();
        let write = async move {
            if last {
                write_all_last(&mut server, head, body).await.unwrap();
            } else {
                write_all_two(&mut server, head, body).await.unwrap();
            }
        };
        let mut got = Vec::new();
        let (_, read) = tokio::join!(write, client.read_to_end(&mut got));
        read.unwrap();
        (got, segments_in(&client))
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn last_answer_carries_the_fin() {
        let (plain, plain_segments) =
            answer_and_close(false, b"HTTP/1.1 403 \r\n\r\n", b"page").await;
        let (last, last_segments) = answer_and_close(true, b"HTTP/1.1 403 \r\n\r\n", b"page").await;
        assert_eq!(plain, b"HTTP/1.1 403 \r\n\r\npage");
        assert_eq!(last, plain);
        // SYN-ACK, answer, FIN — or SYN-ACK, answer with the FIN.
        assert_eq!((plain_segments, last_segments), (3, 2));
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn last_answer_larger_than_the_socket_takes_arrives_whole() {
        let body: Vec<u8> = (0..16 << 20).map(|i| (i % 251) as u8).collect();
        let (got, _) = answer_and_close(true, b"head", &body).await;
        assert_eq!(got.len(), 4 + body.len());
        assert!(got[4..] == body[..], "body differs");
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

    #[tokio::test(start_paused = true)]
    async fn watchdog_of_a_tunnel_counts_idle_time_from_the_start() {
        // Tunnels: no first-request wait, the handshake counts as started.
        let act = Arc::new(Activity::default());
        act.mark_started();
        let start = tokio::time::Instant::now();
        watchdog(act, Duration::ZERO, Duration::from_secs(8)).await;
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_secs(8) && waited <= Duration::from_secs(10),
            "{waited:?}"
        );
        // Not started and no first-request wait: ends at once.
        let start = tokio::time::Instant::now();
        watchdog(Arc::default(), Duration::ZERO, Duration::from_secs(8)).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    /// Write system calls made by this thread so far (the eventfd write that wakes tokio's driver
    /// is one).
    #[cfg(target_os = "linux")]
    fn writes_by_this_thread() -> u64 {
        let io = std::fs::read_to_string("/proc/thread-self/io").expect("/proc/thread-self/io");
        io.lines()
            .find_map(|l| l.strip_prefix("syscw: "))
            .and_then(|n| n.trim().parse().ok())
            .expect("syscw in /proc/thread-self/io")
    }

    /// Registers 100 timers as connections do (polled once, then dropped) and counts the writes.
    #[cfg(target_os = "linux")]
    fn writes_for_100_timers(with_metronome: bool) -> u64 {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            if with_metronome {
                tokio::spawn(metronome());
            }
            // Park once, so the driver has planned its next wake-up.
            tokio::time::sleep(Duration::from_millis(5)).await;
            let before = writes_by_this_thread();
            for i in 0..100 {
                // Alternately a connection's header timer and a tunnel's watchdog.
                let mut timer: Pin<Box<dyn Future<Output = ()>>> = if i % 2 == 0 {
                    Box::pin(tokio::time::sleep(Duration::from_secs(3)))
                } else {
                    let act = Arc::new(Activity::default());
                    act.mark_started();
                    Box::pin(watchdog(act, Duration::ZERO, Duration::from_secs(60)))
                };
                std::future::poll_fn(|cx| {
                    assert!(timer.as_mut().poll(cx).is_pending());
                    Poll::Ready(())
                })
                .await;
            }
            writes_by_this_thread() - before
        })
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn with_the_metronome_new_timers_do_not_wake_the_driver() {
        // Without it, tokio writes its eventfd for each (the reason the metronome exists).
        assert!(writes_for_100_timers(false) >= 50);
        assert!(writes_for_100_timers(true) <= 2);
    }
}
