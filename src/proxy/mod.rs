//! The data path: listeners that read the destination and host of each connection or request,
//! call the decision core, and forward, relay or answer.

pub mod block_page;
pub mod forward;
pub mod http;
pub mod io;
pub mod preamble;
pub mod relay;
pub mod state;
pub mod tls;
pub mod tunnels;
pub mod worker;
