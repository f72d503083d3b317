//! What SREs see: Prometheus metrics, the access and event logs, and the clock they stamp.

pub mod clock;
pub mod logging;
pub mod metrics;
