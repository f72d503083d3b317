//! What SREs see: Prometheus metrics, the access and event logs.

pub(crate) mod blocked;
pub(crate) mod logging;
pub(crate) mod metrics;
pub(crate) mod ops;
