//! An accepted TCP connection that is registered with the reactor only once it has to wait.
//!
//! With `TCP_DEFER_ACCEPT` a connection is accepted with its first bytes already in, and a
//! one-shot request (`Connection: close`, an unfiled host) is often answered from them at once.
//! Such a connection never waits, so registering it with epoll (`epoll_ctl` add, then delete at
//! close: two of its six system calls) would be pure cost. [`Accepted`] reads and writes the
//! socket directly until an operation would block; only then does it register the socket, and
//! that operation and every one after it go through tokio as usual.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use socket2::SockRef;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

use crate::proxy::io::SendLast;

/// A listening socket whose connections are accepted as [`Accepted`], not yet registered.
pub(crate) struct Listener(AsyncFd<std::net::TcpListener>);

impl Listener {
    /// Registers non-blocking `listener` with the current runtime's reactor.
    #[allow(unsafe_code)]
    pub(crate) fn new(listener: std::net::TcpListener) -> io::Result<Listener> {
        // SAFETY: the AsyncFd owns the listener, so its descriptor stays open, and is the same
        // descriptor, until the AsyncFd is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(listener, Interest::READABLE) }?;
        Ok(Listener(fd))
    }

    /// Accepts one connection (non-blocking, close-on-exec) and its peer's address.
    pub(crate) async fn accept(&self) -> io::Result<(Accepted, SocketAddr)> {
        loop {
            let mut ready = self.0.readable().await?;
            let accepted = ready.try_io(|l| {
                SockRef::from(l.get_ref()).accept4(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
            });
            // Err: nothing to accept after all; the readiness was cleared, so wait again.
            let Ok(accepted) = accepted else { continue };
            let (socket, addr) = accepted?;
            let peer = addr
                .as_socket()
                .ok_or_else(|| io::Error::other("accepted a socket without an IP address"))?;
            return Ok((Accepted::new(socket.into()), peer));
        }
    }
}

/// An accepted, non-blocking TCP socket: used directly, or registered with the reactor.
pub(crate) enum Accepted {
    /// Not registered yet; every operation so far completed at once.
    Direct(std::net::TcpStream),
    Registered(TcpStream),
    /// Registering failed; the error was returned to the operation that needed it.
    Broken,
}

impl Accepted {
    /// `stream` must be non-blocking (accepted with `SOCK_NONBLOCK`).
    pub(crate) fn new(stream: std::net::TcpStream) -> Self {
        Accepted::Direct(stream)
    }

    pub(crate) fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Accepted::Direct(s) => s.local_addr(),
            Accepted::Registered(s) => s.local_addr(),
            Accepted::Broken => Err(broken()),
        }
    }

    /// The socket, for its options (`None` once registering it failed).
    pub(crate) fn socket(&self) -> Option<SockRef<'_>> {
        match self {
            Accepted::Direct(s) => Some(SockRef::from(s)),
            Accepted::Registered(s) => Some(SockRef::from(s)),
            Accepted::Broken => None,
        }
    }

    /// The tokio stream, registering the socket now if it is not yet.
    pub(crate) fn into_tokio(mut self) -> io::Result<TcpStream> {
        self.register()?;
        match self {
            Accepted::Registered(s) => Ok(s),
            _ => Err(broken()),
        }
    }

    /// Registers the socket with the current runtime's reactor (once).
    fn register(&mut self) -> io::Result<&mut TcpStream> {
        if let Accepted::Direct(_) = self
            && let Accepted::Direct(s) = std::mem::replace(self, Accepted::Broken)
        {
            *self = Accepted::Registered(TcpStream::from_std(s)?);
        }
        match self {
            Accepted::Registered(s) => Ok(s),
            _ => Err(broken()),
        }
    }

    /// One operation on `arg`: `direct` on the unregistered socket; when that would block, or
    /// the socket is registered already, `registered` through tokio.
    fn poll_io<A, T>(
        &mut self,
        mut arg: A,
        direct: impl FnOnce(&mut &std::net::TcpStream, &mut A) -> io::Result<T>,
        registered: impl FnOnce(Pin<&mut TcpStream>, &mut A) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if let Accepted::Direct(s) = self {
            match direct(&mut &*s, &mut arg) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return Poll::Ready(r),
            }
        }
        match self.register() {
            Ok(s) => registered(Pin::new(s), &mut arg),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

fn broken() -> io::Error {
    io::Error::other("the socket could not be registered with the reactor")
}

impl AsyncRead for Accepted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.get_mut().poll_io(
            buf,
            |s, buf| recv_uninit(s, buf),
            |s, buf| s.poll_read(cx, buf),
        )
    }
}

/// One recv(2) into `buf`'s unfilled part, which may be uninitialised: a read buffer is spare
/// capacity (4 KiB for a ClientHello), and zeroing it first, as `initialize_unfilled` does,
/// was an eighth of a TLS tunnel's instructions. tokio's own `poll_read` reads the same way.
#[allow(unsafe_code)]
fn recv_uninit(s: &std::net::TcpStream, buf: &mut ReadBuf<'_>) -> io::Result<()> {
    // SAFETY: recv(2) only writes into the slice, never de-initialises it.
    let unfilled = unsafe { buf.unfilled_mut() };
    let n = SockRef::from(s).recv(unfilled)?;
    // SAFETY: recv(2) returned n, so it wrote the first n bytes of `unfilled`.
    unsafe { buf.assume_init(n) };
    buf.advance(n);
    Ok(())
}

impl AsyncWrite for Accepted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_io(buf, |s, buf| s.write(buf), |s, buf| s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_io(
            bufs,
            |s, bufs| s.write_vectored(bufs),
            |s, bufs| s.poll_write_vectored(cx, bufs),
        )
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // TCP has nothing to flush.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Accepted::Direct(s) => Poll::Ready(s.shutdown(std::net::Shutdown::Write)),
            Accepted::Registered(s) => Pin::new(s).poll_shutdown(cx),
            Accepted::Broken => Poll::Ready(Err(broken())),
        }
    }
}

impl SendLast for Accepted {
    fn send_last(&self, a: &[u8], b: &[u8]) -> usize {
        match self {
            Accepted::Direct(s) => crate::proxy::io::send_more(s, a, b),
            Accepted::Registered(s) => s.send_last(a, b),
            Accepted::Broken => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A connected pair: the accepted end as [`Accepted`], and the client's end.
    async fn pair() -> (Accepted, TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        (Accepted::new(server), client)
    }

    #[tokio::test]
    async fn bytes_already_in_are_read_without_registering() {
        let (mut server, mut client) = pair().await;
        client.write_all(b"hello").await.unwrap();
        // Until the bytes are in, a read would register; wait for them from the client's side.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let mut buf = [0u8; 16];
        let n = server.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"hello");
        server.write_all(b"back").await.unwrap();
        assert!(matches!(server, Accepted::Direct(_)), "nothing had to wait");
        drop(server);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"back");
    }

    #[tokio::test]
    async fn a_read_that_must_wait_registers_and_is_woken() {
        let (mut server, mut client) = pair().await;
        let read = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            let n = server.read(&mut buf).await.unwrap();
            (buf[..n].to_vec(), matches!(server, Accepted::Registered(_)))
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        client.write_all(b"late").await.unwrap();
        let (got, registered) = read.await.unwrap();
        assert_eq!(got, b"late");
        assert!(registered);
    }

    #[tokio::test]
    async fn a_write_that_must_wait_registers_and_completes() {
        let (mut server, mut client) = pair().await;
        // More than the socket buffers hold: the direct write fills them and then has to wait
        // for the client to read.
        let big = vec![7u8; 16 << 20];
        let write = tokio::spawn(async move {
            server.write_all(&big).await.unwrap();
            server.shutdown().await.unwrap();
            matches!(server, Accepted::Registered(_))
        });
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), 16 << 20);
        assert!(got.iter().all(|&b| b == 7));
        assert!(write.await.unwrap());
    }
}
