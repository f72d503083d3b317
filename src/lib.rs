//! icp-gate: an edge proxy that enforces China's ICP filing rules (ICP备案).
//!
//! For each request it reads the HTTP Host or the TLS SNI, looks the domain up in the filing
//! registry and either forwards the traffic to the tenant's origin untouched or answers with a
//! "not filed" block page. The rules live in [`core::decision`]; everything else extracts inputs for it
//! or acts on its verdict.

pub mod admin;
pub mod config;
pub mod core;
pub mod observe;
pub mod proxy;
pub mod registry;
pub mod runtime;
pub mod wire;
