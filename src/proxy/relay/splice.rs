//! The TCP↔TCP relay on Linux: bulk goes through splice(2), from one socket's receive queue into
//! a pipe and from the pipe into the other socket's send queue as page references, never through
//! user space; small reads are copied, because for them splice costs more than it saves (measured
//! by `benches/relay.rs`), with the copy relay's step (`relay/copy.rs`: through the thread's
//! scratch buffer).
//!
//! Each direction picks per read: a read that filled the 8 KiB buffer (or a splice that moved at
//! least as much) means more is queued, so the next one is spliced; a shorter one means the burst
//! is over, so the next one is copied. A direction's pipe is made at its first splice, so
//! interactive and short tunnels never hold one.
//!
//! Every spliced chunk is drained from the pipe before the next is read, which keeps `EAGAIN`
//! unambiguous (on the way in it can only mean "the source has nothing", on the way out only "the
//! destination is full"), so tokio's readiness is cleared for the right socket, and lets a
//! direction go back to copying at any read.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio_util::sync::CancellationToken;

use super::copy::{READ_SIZE, Unsent};
use super::outcome::{End, Relayed};
use crate::proxy::io::{Activity, watchdog};

/// The most one splice asks to move; the pipe's capacity (64 KiB by default) caps it anyway.
const CHUNK: usize = 1 << 20;

/// A pipe, both ends closed when dropped.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    #[allow(unsafe_code)]
    fn new() -> io::Result<Pipe> {
        let mut fds = [-1 as libc::c_int; 2];
        // SAFETY: `fds` is a writable array of two c_ints, which is what pipe2 fills in.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and nothing else owns them.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok(Pipe { read, write })
    }
}

/// Moves up to `len` bytes from `from` to `to` without blocking; one of them must be a pipe.
/// Into a socket whose peer is gone it raises SIGPIPE, as write(2) does: Rust programs ignore it.
#[allow(unsafe_code)]
fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are borrowed, so open for the call; null offsets are what splice
    // takes for pipes and sockets; nothing else is passed by pointer.
    let n = unsafe {
        libc::splice(
            from.as_raw_fd(),
            ptr::null_mut(),
            to.as_raw_fd(),
            ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// A direction's pipe: not made yet, made, or not to be had (descriptor limit: copy only).
enum Lazy {
    NotYet,
    Ready(Pipe),
    Unavailable,
}

/// One direction, until `src` ends; then `dst`'s write side is shut down, unless the other
/// direction has already ended: the relay then returns and closing `dst` sends the same FIN, so
/// a `shutdown(2)` would only add a system call per tunnel. `ended` counts the directions that
/// reached their end. `read` counts the bytes taken from `src`; `activity` is marked whenever
/// bytes move (for the idle watchdog).
///
/// Copies go through tokio's `poll_read`/`poll_write` (on the split halves), which, unlike
/// `try_io`, clear readiness after a short read or write: a relayed message then costs no extra
/// `EAGAIN` read, exactly as in `copy_bidirectional`.
async fn pump(
    mut src: ReadHalf<'_>,
    mut dst: WriteHalf<'_>,
    read: &AtomicU64,
    ended: &AtomicU8,
    activity: &Activity,
) -> io::Result<()> {
    let mut unsent = Unsent::default();
    let mut pipe = Lazy::NotYet;
    let mut splicing = false;
    loop {
        let n = match &pipe {
            Lazy::Ready(p) if splicing => {
                let s = src.as_ref();
                s.readable().await?;
                // The pipe is empty here: EAGAIN can only mean that `src` has nothing.
                match s.try_io(Interest::READABLE, || {
                    splice(s.as_fd(), p.write.as_fd(), CHUNK)
                }) {
                    Ok(n) => n,
                    Err(e) if retry(&e) => continue,
                    Err(e) => return Err(e),
                }
            }
            _ => std::future::poll_fn(|cx| unsent.poll_read(cx, &mut src, &mut dst)).await?,
        };
        if n == 0 {
            break;
        }
        read.fetch_add(n as u64, Ordering::Relaxed);
        activity.mark_moved();
        match &pipe {
            Lazy::Ready(p) if splicing => drain(p, dst.as_ref(), n, activity).await?,
            _ => send(&mut unsent, &mut dst, activity).await?,
        }
        splicing = n >= READ_SIZE;
        if splicing && matches!(pipe, Lazy::NotYet) {
            pipe = Pipe::new().map_or(Lazy::Unavailable, Lazy::Ready);
        }
        // Readiness and try_io take nothing from tokio's cooperative budget (poll_read does):
        // without this, a spliced direction that always finds data would keep the worker.
        tokio::task::consume_budget().await;
    }
    // Both receive queues are empty now (each source read to its end), so the close sends a FIN,
    // not a reset.
    if ended.fetch_add(1, Ordering::Relaxed) == 1 {
        return Ok(());
    }
    dst.shutdown().await
}

/// Splices the `pending` bytes in `pipe` into `dst`.
async fn drain(
    pipe: &Pipe,
    dst: &TcpStream,
    mut pending: usize,
    activity: &Activity,
) -> io::Result<()> {
    while pending > 0 {
        dst.writable().await?;
        // The pipe is not empty here: EAGAIN can only mean that `dst` is full.
        match dst.try_io(Interest::WRITABLE, || {
            splice(pipe.read.as_fd(), dst.as_fd(), pending)
        }) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                pending -= n;
                activity.mark_moved();
            }
            Err(e) if retry(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes what the copy step's write did not take.
async fn send(unsent: &mut Unsent, dst: &mut WriteHalf<'_>, activity: &Activity) -> io::Result<()> {
    std::future::poll_fn(|cx| {
        let before = unsent.remaining();
        let sent = unsent.poll_send(cx, dst);
        if unsent.remaining() < before {
            activity.mark_moved();
        }
        sent
    })
    .await
}

/// The relay; the sockets, buffers and pipes are released when it returns, on every path (the
/// pipes belong to the direction futures, dropped with them).
pub(super) async fn relay(
    mut client: TcpStream,
    mut origin: TcpStream,
    idle: Duration,
    stop: CancellationToken,
) -> Relayed {
    let (client_read, client_write) = client.split();
    let (origin_read, origin_write) = origin.split();
    let from_client = AtomicU64::new(0);
    let from_origin = AtomicU64::new(0);
    let ended = AtomicU8::new(0);
    // The same idle watchdog as every other connection.
    let activity = Arc::new(Activity::default());
    activity.mark_started();
    let both = async {
        tokio::try_join!(
            pump(client_read, origin_write, &from_client, &ended, &activity),
            pump(origin_read, client_write, &from_origin, &ended, &activity),
        )
    };
    let end = tokio::select! {
        r = both => if r.is_ok() { End::Closed } else { End::Error },
        _ = watchdog(activity.clone(), Duration::ZERO, idle) => End::Idle,
        _ = stop.cancelled() => End::Stopped,
    };
    Relayed {
        client_to_origin: from_client.load(Ordering::Relaxed),
        origin_to_client: from_origin.load(Ordering::Relaxed),
        end,
    }
}
