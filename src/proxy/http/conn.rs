//! What every request on one HTTP connection shares, for the hyper path and the fast path alike.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use http::header::HeaderValue;

use crate::core::decision::{Decision, Reason};
use crate::observe::logging::{Access, RequestId};
use crate::proxy::forward::OriginClient;
use crate::proxy::io::Activity;
use crate::proxy::state::{Endpoints, ListenerSpec, Shared};

/// What every request on one connection shares.
pub(super) struct ConnCtx {
    pub(super) ends: Endpoints,
    pub(super) spec: Arc<ListenerSpec>,
    pub(super) shared: Arc<Shared>,
    pub(super) activity: Arc<Activity>,
    /// Origin pool private to this connection, for routes that send a PROXY header.
    pub(super) proxied: OnceLock<OriginClient>,
    /// The client address as appended to `X-Forwarded-For`.
    pub(super) client_ip: OnceLock<HeaderValue>,
    /// The fast path is between reading a request and finishing its answer: draining lets it
    /// finish.
    pub(super) answering: AtomicBool,
}

/// Writes the access-log line of one request.
pub(super) fn log(
    ctx: &ConnCtx,
    host: &str,
    decision: Decision,
    reason: Reason,
    status: Option<u16>,
    id: &RequestId,
    duration: Duration,
) {
    ctx.shared.blocked.record(
        ctx.spec.metrics.name(),
        decision,
        host,
        reason,
        ctx.ends.dst.ip(),
    );
    Access {
        listener: ctx.spec.metrics.name(),
        client: ctx.ends.client,
        dst: ctx.ends.dst,
        host,
        decision,
        reason,
        status,
        request_id: id,
        duration,
    }
    .log();
}
