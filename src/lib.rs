//! icp-gate: an edge proxy that enforces China's ICP filing rules (ICP备案).
//!
//! For each request it reads the HTTP Host or the TLS SNI, looks the domain up in the filing
//! registry and either forwards the traffic to the tenant's origin untouched or answers with a
//! "not filed" block page. The rules live in [`decision`]; everything else extracts inputs for it
//! or acts on its verdict.

pub mod admin;
pub mod block_page;
pub mod clienthello;
pub mod clock;
pub mod config;
pub mod decision;
pub mod demo_origin;
pub mod forward;
pub mod host;
pub mod http1;
pub mod http_listener;
pub mod io;
pub mod logging;
pub mod metrics;
pub mod proxy_protocol;
pub mod registry;
pub mod relay;
pub mod routes;
pub mod server;
pub mod tls_listener;
pub mod tunnels;
pub mod workers;
