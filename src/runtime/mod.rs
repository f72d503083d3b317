//! The process: binding sockets, worker threads, accept loops, reload and drain.

pub(crate) mod demo_origin;
pub(crate) mod offline;
pub(crate) mod process;
mod rlimit;
pub(crate) mod server;
pub(crate) mod workers;
