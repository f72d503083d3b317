//! What SREs see: Prometheus metrics, the access and event logs.

pub mod logging;
pub mod metrics;
