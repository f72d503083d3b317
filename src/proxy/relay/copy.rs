//! The copy step both relays share: read what the source has into the thread's scratch buffer,
//! write it on at once, and keep bytes of one's own only while the destination cannot take them.
//!
//! A relay that keeps a read buffer per direction for the connection's life (tokio's
//! `copy_bidirectional`: two 8 KiB buffers) spends most of an idle tunnel's memory on them; one
//! that takes a buffer from the allocator at every burst pays for it on every exchange (an 8 KiB
//! malloc first consolidates glibc's small-chunk bins: ~1 400 instructions per TLS tunnel).

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The size of a relay read (tokio's `copy_bidirectional` uses the same). The splice relay takes
/// a read that fills it as the sign of a burst.
pub(super) const READ_SIZE: usize = 8 * 1024;

thread_local! {
    /// The buffer every relay direction on this thread reads into.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(READ_SIZE));
}

/// Runs `f` on the thread's scratch buffer; on a buffer of its own when that one is in use (a
/// relay polled from inside another one's write: no stream here does that) or gone (a relay
/// polled while its thread exits).
fn with_scratch<T>(f: impl FnOnce(&mut Vec<u8>) -> T) -> T {
    if SCRATCH.try_with(|_| ()).is_err() {
        return f(&mut Vec::with_capacity(READ_SIZE));
    }
    SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
        Ok(mut buf) => f(&mut buf),
        Err(_) => f(&mut Vec::with_capacity(READ_SIZE)),
    })
}

/// A direction's bytes that were read but not yet taken by the destination: allocated only when
/// a write could not take a whole read at once, freed when the source has nothing to read.
#[derive(Default)]
pub(super) struct Unsent {
    bytes: Vec<u8>,
    sent: usize,
}

impl Unsent {
    /// Writes the rest of the last read to `dst`; ready once all of it is written.
    pub(super) fn poll_send<W>(&mut self, cx: &mut Context<'_>, dst: &mut W) -> Poll<io::Result<()>>
    where
        W: AsyncWrite + Unpin,
    {
        while self.sent < self.bytes.len() {
            let n = ready!(Pin::new(&mut *dst).poll_write(cx, &self.bytes[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        // Kept while bytes move, so a busy direction allocates at most once per burst.
        self.bytes.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Reads what `src` has and writes as much of it to `dst` as it takes now, keeping the rest
    /// for [`Unsent::poll_send`], which must have finished first. The number of bytes read (0:
    /// `src` ended).
    pub(super) fn poll_read<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut R,
        dst: &mut W,
    ) -> Poll<io::Result<usize>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        debug_assert_eq!(self.remaining(), 0, "read before the last one was sent");
        let read = with_scratch(|buf| {
            buf.clear();
            let mut read = ReadBuf::uninit(&mut buf.spare_capacity_mut()[..READ_SIZE]);
            ready!(Pin::new(&mut *src).poll_read(cx, &mut read))?;
            let data = read.filled();
            if data.is_empty() {
                return Poll::Ready(Ok(0));
            }
            let written = match Pin::new(&mut *dst).poll_write(cx, data) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(w)) => w,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => 0,
            };
            self.bytes.extend_from_slice(&data[written..]);
            Poll::Ready(Ok(data.len()))
        });
        if read.is_pending() {
            self.bytes = Vec::new();
        }
        read
    }

    /// Bytes read and not yet written.
    pub(super) fn remaining(&self) -> usize {
        self.bytes.len() - self.sent
    }

    /// Bytes held (the buffer's capacity).
    #[cfg(test)]
    pub(super) fn held(&self) -> usize {
        self.bytes.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Holds bytes only while the destination cannot take them: none while waiting to read, the
    /// unwritten rest of a read while the destination is full, none again once the source waits.
    #[tokio::test]
    async fn holds_bytes_only_while_the_destination_is_full() {
        let mut cx = Context::from_waker(Waker::noop());
        let (mut src, mut src_peer) = tokio::io::duplex(4096);
        let (mut dst, mut dst_peer) = tokio::io::duplex(16);
        let mut unsent = Unsent::default();

        assert!(unsent.poll_read(&mut cx, &mut src, &mut dst).is_pending());
        assert_eq!(unsent.held(), 0, "holds a buffer while waiting to read");

        src_peer.write_all(&[7u8; 100]).await.unwrap();
        let read = unsent.poll_read(&mut cx, &mut src, &mut dst);
        assert!(matches!(read, Poll::Ready(Ok(100))), "{read:?}");
        assert_eq!(
            unsent.remaining(),
            84,
            "the 16 the destination took are gone"
        );

        // Each send fills the destination again; what it did not take is always still held.
        let mut got = Vec::new();
        while got.len() < 100 {
            let _ = unsent.poll_send(&mut cx, &mut dst);
            let mut chunk = [0u8; 16];
            let n = dst_peer.read(&mut chunk).await.unwrap();
            got.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(got, [7u8; 100]);
        assert!(unsent.poll_send(&mut cx, &mut dst).is_ready());
        assert_eq!(unsent.remaining(), 0);
        assert!(unsent.poll_read(&mut cx, &mut src, &mut dst).is_pending());
        assert_eq!(unsent.held(), 0, "kept the written bytes' buffer");

        drop(src_peer);
        let ended = unsent.poll_read(&mut cx, &mut src, &mut dst);
        assert!(matches!(ended, Poll::Ready(Ok(0))), "{ended:?}");
    }
}
