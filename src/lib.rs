//! icp-gate: an edge proxy that enforces China's ICP filing rules (ICP备案).
//!
//! For each request it reads the HTTP Host or the TLS SNI, looks the domain up in the filing
//! registry and either forwards the traffic to the tenant's origin untouched or answers with a
//! "not filed" block page. The rules live in [`core::decision`]; everything else extracts inputs
//! for it or acts on its verdict.
//!
//! The layers, each using only those before it: `wire` (parsers of untrusted bytes), `config`,
//! `registry`, `core` (the decision), `observe` (metrics, logs), `fleet` (the registry over NATS),
//! `proxy` (the data path), `admin` (the control API), `runtime` (the process). docs/design.md
//! says why.

#![deny(unsafe_code)]
#![warn(unreachable_pub)]

mod admin;
pub mod config;
pub mod core;
mod fleet;
mod observe;
mod proxy;
pub mod registry;
mod runtime;
pub mod wire;

pub use observe::logging::LogFormat;
pub use runtime::offline::{check, explain};
pub use runtime::process::{Error, Shape, run};
pub use runtime::server::{Listeners, ServerError, ServerHandle};

/// For the crate's own benches and fuzz targets, which drive internals a user of the crate has
/// no need for. Not a stable API.
#[doc(hidden)]
pub mod internals {
    pub use crate::proxy::relay::{End, Relayed, relay, relay_tcp};
    pub use crate::registry::damage::{check_damaged_state, check_state_bytes};
    pub use crate::wire::http1::{
        BadResponse, ChunkedEnd, Final, Framing, MAX_HEADERS, RequestHead, ResponseHead, Simple,
        finish_client_head, header_slots, is_hop_by_hop, parse_request, parse_response,
        write_origin_request,
    };
    pub use crate::wire::proxy_protocol::{Addresses, Parsed, parse as parse_proxy_header};
}
