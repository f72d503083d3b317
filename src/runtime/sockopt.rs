//! Socket options that socket2 does not wrap.

use std::os::fd::AsRawFd;
use std::time::Duration;

/// `TCP_DEFER_ACCEPT`: the kernel queues a connection for `accept` only once its first bytes
/// have arrived (or `wait` has passed), so a client-speaks-first listener is woken once per
/// connection, with the request already readable, instead of once to accept and once to read.
#[allow(unsafe_code)]
pub(super) fn set_defer_accept(socket: &impl AsRawFd, wait: Duration) -> std::io::Result<()> {
    let secs = libc::c_int::try_from(wait.as_secs().max(1)).unwrap_or(libc::c_int::MAX);
    // SAFETY: setsockopt(2) reads `size_of::<c_int>()` bytes from a live local; the descriptor
    // is borrowed from an open socket.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&secs as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
