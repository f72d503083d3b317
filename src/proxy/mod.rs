//! The data path: listeners that read the destination and host of each connection or request,
//! call the decision core, and forward, relay or answer.

pub(crate) mod accepted;
pub(crate) mod block_page;
pub(crate) mod deadline;
pub(crate) mod forward;
pub(crate) mod http;
pub(crate) mod io;
pub(crate) mod preamble;
pub(crate) mod quic;
pub(crate) mod relay;
pub(crate) mod sockopt;
pub(crate) mod state;
pub(crate) mod tls;
pub(crate) mod tunnels;
pub(crate) mod worker;
