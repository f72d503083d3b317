//! The process: binding sockets, worker threads, accept loops, reload and drain.

pub mod demo_origin;
pub mod server;
pub mod workers;
