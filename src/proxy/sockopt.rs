//! Socket options that socket2 does not wrap: the one place that calls setsockopt(2) directly.

use std::os::fd::AsRawFd;
use std::time::Duration;

/// `TCP_DEFER_ACCEPT`: the kernel queues a connection for `accept` only once its first bytes
/// have arrived (or `wait` has passed), so a client-speaks-first listener is woken once per
/// connection, with the request already readable, instead of once to accept and once to read.
pub(crate) fn set_defer_accept(socket: &impl AsRawFd, wait: Duration) -> std::io::Result<()> {
    let secs = libc::c_int::try_from(wait.as_secs().max(1)).unwrap_or(libc::c_int::MAX);
    set_int(socket, libc::IPPROTO_TCP, libc::TCP_DEFER_ACCEPT, secs)
}

/// `UDP_GRO` (Linux 5.0+): the kernel hands over runs of datagrams of one sender with their
/// size, which a QUIC flow sends on to the client with GSO.
pub(crate) fn enable_udp_gro(socket: &impl AsRawFd) -> std::io::Result<()> {
    /// From linux/udp.h; libc does not export it for glibc targets.
    const UDP_GRO: libc::c_int = 104;
    set_int(socket, libc::SOL_UDP, UDP_GRO, 1)
}

/// setsockopt(2) with an int value.
#[allow(unsafe_code)]
fn set_int(
    socket: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> std::io::Result<()> {
    // SAFETY: setsockopt(2) reads `size_of::<c_int>()` bytes from a live local; the descriptor
    // is borrowed from an open socket.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
