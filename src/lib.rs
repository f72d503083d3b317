//! icp-gate: an edge proxy that enforces China's ICP filing rules (ICP备案).
//!
//! For each request it reads the HTTP Host or the TLS SNI, looks the domain up in the filing
//! registry and either forwards the traffic to the tenant's origin untouched or answers with a
//! "not filed" block page. The rules live in [`core::decision`]; everything else extracts inputs for it
//! or acts on its verdict.

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
}
