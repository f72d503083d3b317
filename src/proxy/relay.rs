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
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::proxy::io::{Activity, Watched, watchdog};

mod copy;
mod outcome;
#[cfg(target_os = "linux")]
mod splice;

use copy::Unsent;
pub use outcome::{End, Relayed};

/// [`relay`] between two TCP sockets (TLS passthrough tunnels). On Linux, bulk moves with
/// splice(2), never entering user space, while small reads are copied (see `relay/splice.rs`);
/// elsewhere it is [`relay`].
pub async fn relay_tcp(
    client: TcpStream,
    origin: TcpStream,
    idle: Duration,
    stop: CancellationToken,
) -> Relayed {
    #[cfg(target_os = "linux")]
    return splice::relay(client, origin, idle, stop).await;
    #[cfg(not(target_os = "linux"))]
    return relay(client, origin, idle, stop).await;
}

/// Relays until both directions finish, `idle` passes without traffic, or `stop` fires. Each
/// direction reads into its thread's scratch buffer and holds bytes of its own only while its
/// destination cannot take them (see `relay/copy.rs`).
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
        r = copy_both(&mut client, &mut origin) => {
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

/// Copies both ways until both directions have ended (each shuts its destination's write side
/// down when its source ends), or one fails.
async fn copy_both<A, B>(a: &mut A, b: &mut B) -> io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut up = Direction::default();
    let mut down = Direction::default();
    std::future::poll_fn(|cx| {
        let up_done = up.poll(cx, a, b)?.is_ready();
        let down_done = down.poll(cx, b, a)?.is_ready();
        if up_done && down_done {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await
}

/// One direction of [`copy_both`].
#[derive(Default)]
struct Direction {
    unsent: Unsent,
    /// Bytes read (so written, or queued in `unsent`) since the last flush.
    unflushed: bool,
    ended: Ended,
}

#[derive(Default, PartialEq)]
enum Ended {
    #[default]
    No,
    /// The source ended: the destination's write side is being shut down.
    Source,
    /// The destination's write side is shut down.
    Done,
}

impl Direction {
    fn poll<R, W>(&mut self, cx: &mut Context<'_>, src: &mut R, dst: &mut W) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            match self.ended {
                Ended::Done => return Poll::Ready(Ok(())),
                Ended::Source => {
                    ready!(Pin::new(&mut *dst).poll_shutdown(cx))?;
                    self.ended = Ended::Done;
                    return Poll::Ready(Ok(()));
                }
                Ended::No => {}
            }
            ready!(self.unsent.poll_send(cx, dst))?;
            match self.unsent.poll_read(cx, src, dst) {
                Poll::Ready(Ok(0)) => self.ended = Ended::Source,
                Poll::Ready(Ok(_)) => self.unflushed = true,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    if self.unflushed {
                        ready!(Pin::new(&mut *dst).poll_flush(cx))?;
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
            }
        }
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

    /// A direction passes its source's end on as a shutdown of its destination once, and is done.
    #[tokio::test]
    async fn a_direction_shuts_its_destination_down_when_its_source_ends() {
        use std::task::Waker;
        let mut cx = Context::from_waker(Waker::noop());
        let (mut src, mut src_peer) = tokio::io::duplex(64);
        let (mut dst, mut dst_peer) = tokio::io::duplex(64);
        let mut dir = Direction::default();
        src_peer.write_all(b"last").await.unwrap();
        drop(src_peer);
        assert!(dir.poll(&mut cx, &mut src, &mut dst).is_ready());
        assert!(dir.poll(&mut cx, &mut src, &mut dst).is_ready());
        let mut got = Vec::new();
        dst_peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"last");
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

    // The same semantics on real loopback sockets, for both relays: `relay` (copy) and
    // `relay_tcp` (splice on Linux).

    use std::net::Shutdown;
    use tokio::net::TcpListener;

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Via {
        Copy,
        Tcp,
    }

    const BOTH: [Via; 2] = [Via::Copy, Via::Tcp];

    /// The relay tests on sockets run one at a time, so that the pipes they see are their own.
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    /// A connected loopback pair: (the relay's end, the peer's end).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = TcpStream::connect(listener.local_addr().unwrap());
        let (peer, accepted) = tokio::join!(peer, listener.accept());
        (accepted.unwrap().0, peer.unwrap())
    }

    /// Relays a fresh client pair and origin pair; returns the relay's task and the two peers.
    async fn tunnel(
        via: Via,
        idle: Duration,
        stop: CancellationToken,
    ) -> (tokio::task::JoinHandle<Relayed>, TcpStream, TcpStream) {
        let (client, client_peer) = pair().await;
        let (origin, origin_peer) = pair().await;
        let task = match via {
            Via::Copy => tokio::spawn(relay(client, origin, idle, stop)),
            Via::Tcp => tokio::spawn(relay_tcp(client, origin, idle, stop)),
        };
        (task, client_peer, origin_peer)
    }

    /// Pipes open in this process (only the splice relay makes any).
    fn pipes_open() -> usize {
        std::fs::read_dir("/proc/self/fd").map_or(0, |dir| {
            dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|target| target.to_string_lossy().starts_with("pipe:"))
                .count()
        })
    }

    /// While a tunnel runs: on Linux the TCP relay holds a pipe (two descriptors) for each
    /// direction that has spliced; the copy relay none.
    fn expect_pipes(via: Via, before: usize, spliced_directions: usize) {
        let own = if via == Via::Tcp && cfg!(target_os = "linux") {
            2 * spliced_directions
        } else {
            0
        };
        assert_eq!(pipes_open(), before + own, "{via:?}");
    }

    #[tokio::test]
    async fn sockets_relay_both_ways_with_half_close() {
        let _serial = SERIAL.lock().await;
        let pipes = pipes_open();
        for via in BOTH {
            let (task, mut client_peer, mut origin_peer) =
                tunnel(via, Duration::from_secs(5), CancellationToken::new()).await;
            client_peer.write_all(b"hello").await.unwrap();
            client_peer.shutdown().await.unwrap();
            let mut got = Vec::new();
            origin_peer.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"hello", "{via:?}");
            // Small reads are copied: no pipe.
            expect_pipes(via, pipes, 0);
            // The other direction still flows after the client's half-close.
            origin_peer.write_all(b"world!").await.unwrap();
            origin_peer.shutdown().await.unwrap();
            let mut back = Vec::new();
            client_peer.read_to_end(&mut back).await.unwrap();
            assert_eq!(back, b"world!", "{via:?}");
            let r = task.await.unwrap();
            assert_eq!(
                (r.client_to_origin, r.origin_to_client, r.end),
                (5, 6, End::Closed),
                "{via:?}"
            );
            assert_eq!(pipes_open(), pipes, "{via:?}");
        }
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[tokio::test]
    async fn sockets_relay_bulk_both_ways_at_once() {
        let _serial = SERIAL.lock().await;
        const LEN: usize = 8 << 20;
        let pipes = pipes_open();
        for via in BOTH {
            let (task, client_peer, origin_peer) =
                tunnel(via, Duration::from_secs(30), CancellationToken::new()).await;
            let up = pattern(LEN, 1);
            let down = pattern(LEN + 12_345, 7);
            // Each peer writes its side while reading the other's, the readers in small slow
            // reads so that the relay meets full send buffers and partial splices.
            let side = |mut s: TcpStream, out: Vec<u8>| async move {
                let (mut r, mut w) = s.split();
                let write = async {
                    w.write_all(&out).await.unwrap();
                    w.shutdown().await.unwrap();
                };
                let read = async {
                    let mut got = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let n = r.read(&mut chunk).await.unwrap();
                        if n == 0 {
                            break got;
                        }
                        got.extend_from_slice(&chunk[..n]);
                        if got.len() % 7 == 0 {
                            tokio::task::yield_now().await;
                        }
                    }
                };
                tokio::join!(write, read).1
            };
            let (at_client, at_origin) = tokio::join!(
                tokio::spawn(side(client_peer, up.clone())),
                tokio::spawn(side(origin_peer, down.clone())),
            );
            assert!(at_client.unwrap() == down, "{via:?}: origin to client");
            assert!(at_origin.unwrap() == up, "{via:?}: client to origin");
            let r = task.await.unwrap();
            assert_eq!(
                (r.client_to_origin, r.origin_to_client, r.end),
                (up.len() as u64, down.len() as u64, End::Closed),
                "{via:?}"
            );
            assert_eq!(pipes_open(), pipes, "{via:?}");
        }
    }

    #[tokio::test]
    async fn sockets_relay_switches_between_copy_and_splice_in_order() {
        let _serial = SERIAL.lock().await;
        let pipes = pipes_open();
        // Sizes around the 8 KiB switch, each read by the origin before the next is sent, so
        // both directions go from copying to splicing and back, several times.
        let sizes = [
            1000, 200_000, 10, 8192, 8191, 500_000, 1, 65_536, 8193, 3, 300_000,
        ];
        for via in BOTH {
            let (task, mut client_peer, mut origin_peer) =
                tunnel(via, Duration::from_secs(30), CancellationToken::new()).await;
            let (mut up, mut down) = (0, 0);
            for (i, &len) in sizes.iter().enumerate() {
                let data = pattern(len, i as u8);
                let (from, to, count) = if i % 3 == 2 {
                    (&mut origin_peer, &mut client_peer, &mut down)
                } else {
                    (&mut client_peer, &mut origin_peer, &mut up)
                };
                from.write_all(&data).await.unwrap();
                let mut got = vec![0u8; len];
                to.read_exact(&mut got).await.unwrap();
                assert!(got == data, "{via:?}: chunk {i}");
                *count += len as u64;
            }
            expect_pipes(via, pipes, 2);
            client_peer.shutdown().await.unwrap();
            origin_peer.shutdown().await.unwrap();
            let mut rest = Vec::new();
            assert_eq!(client_peer.read_to_end(&mut rest).await.unwrap(), 0);
            assert_eq!(origin_peer.read_to_end(&mut rest).await.unwrap(), 0);
            let r = task.await.unwrap();
            assert_eq!(
                (r.client_to_origin, r.origin_to_client, r.end),
                (up, down, End::Closed),
                "{via:?}"
            );
            assert_eq!(pipes_open(), pipes, "{via:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn sockets_idle_tunnels_end() {
        let _serial = SERIAL.lock().await;
        let pipes = pipes_open();
        for via in BOTH {
            let started = tokio::time::Instant::now();
            let (task, _client_peer, _origin_peer) =
                tunnel(via, Duration::from_secs(60), CancellationToken::new()).await;
            let r = task.await.unwrap();
            let waited = started.elapsed();
            assert_eq!(r.end, End::Idle, "{via:?}");
            assert!(
                waited >= Duration::from_secs(60) && waited <= Duration::from_secs(90),
                "{via:?}: {waited:?}"
            );
            assert_eq!(pipes_open(), pipes, "{via:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn sockets_traffic_either_way_defers_the_idle_end() {
        let _serial = SERIAL.lock().await;
        let pipes = pipes_open();
        for via in BOTH {
            let started = tokio::time::Instant::now();
            let (task, mut client_peer, mut origin_peer) =
                tunnel(via, Duration::from_secs(60), CancellationToken::new()).await;
            let mut byte = [0u8; 1];
            for i in 0..4u8 {
                tokio::time::sleep(Duration::from_secs(40)).await;
                assert!(!task.is_finished(), "{via:?}: ended before write {i}");
                let (w, r) = if i % 2 == 0 {
                    (&mut client_peer, &mut origin_peer)
                } else {
                    (&mut origin_peer, &mut client_peer)
                };
                w.write_all(&[i]).await.unwrap();
                r.read_exact(&mut byte).await.unwrap();
                assert_eq!(byte[0], i, "{via:?}");
            }
            // 160 s in, then quiet: ends 60 to 75 s after the last byte (four quiet checks, a
            // quarter of the timeout apart, after the one that saw it).
            let r = task.await.unwrap();
            let waited = started.elapsed();
            assert_eq!(
                (r.client_to_origin, r.origin_to_client, r.end),
                (2, 2, End::Idle),
                "{via:?}"
            );
            assert!(
                waited >= Duration::from_secs(220) && waited <= Duration::from_secs(235),
                "{via:?}: {waited:?}"
            );
            assert_eq!(pipes_open(), pipes, "{via:?}");
        }
    }

    #[tokio::test]
    async fn sockets_stop_ends_the_tunnel_and_keeps_the_counts() {
        let _serial = SERIAL.lock().await;
        let pipes = pipes_open();
        for via in BOTH {
            let stop = CancellationToken::new();
            let (task, mut client_peer, mut origin_peer) =
                tunnel(via, Duration::from_secs(60), stop.clone()).await;
            // A megabyte up (spliced on Linux), a few bytes down (copied).
            let up = pattern(1 << 20, 3);
            client_peer.write_all(&up).await.unwrap();
            let mut got = vec![0u8; up.len()];
            origin_peer.read_exact(&mut got).await.unwrap();
            assert!(got == up, "{via:?}");
            origin_peer.write_all(b"0123456").await.unwrap();
            let mut back = [0u8; 7];
            client_peer.read_exact(&mut back).await.unwrap();
            expect_pipes(via, pipes, 1);
            stop.cancel();
            let r = task.await.unwrap();
            assert_eq!(
                (r.client_to_origin, r.origin_to_client, r.end),
                (1 << 20, 7, End::Stopped),
                "{via:?}"
            );
            // Both sockets were closed.
            let mut rest = Vec::new();
            assert_eq!(client_peer.read_to_end(&mut rest).await.unwrap(), 0);
            assert_eq!(origin_peer.read_to_end(&mut rest).await.unwrap(), 0);
            assert_eq!(pipes_open(), pipes, "{via:?}");
        }
    }

    #[tokio::test]
    async fn sockets_a_reset_ends_the_tunnel_with_an_error() {
        let _serial = SERIAL.lock().await;
        let pipes = pipes_open();
        for via in BOTH {
            let (task, mut client_peer, origin_peer) =
                tunnel(via, Duration::from_secs(60), CancellationToken::new()).await;
            client_peer.write_all(b"x").await.unwrap();
            // SO_LINGER 0: the origin's close sends RST.
            socket2::SockRef::from(&origin_peer)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
            drop(origin_peer);
            let r = task.await.unwrap();
            assert_eq!(r.end, End::Error, "{via:?}");
            assert_eq!(pipes_open(), pipes, "{via:?}");
            // The client's side is closed too.
            let mut rest = Vec::new();
            let _ = client_peer.read_to_end(&mut rest).await;
            let _ = client_peer.shutdown().await;
            let _ = socket2::SockRef::from(&client_peer).shutdown(Shutdown::Both);
        }
    }
}
