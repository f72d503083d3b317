//! The audit trail: one line (tracing target `audit`) per `/v1` write and per refused call, and
//! `icp_gate_admin_requests_total{op,result}` for every `/v1` call.

use super::auth::{Caller, Peer, Refused};
use crate::proxy::state::Shared;

/// What a `/v1` call did, for its audit line.
pub(super) struct Outcome {
    pub op: &'static str,
    /// `ok`, or why not (`invalid`, `conflict`, `shrink`, `not_found`, `too_large`, `timeout`,
    /// `unavailable`, `not_allowed`, …).
    pub result: &'static str,
    pub status: u16,
    /// Entries (or operations) the call carried; 0 when its body was not read whole.
    pub entries: usize,
    pub revision_before: u64,
    pub revision_after: u64,
    /// The refusal or error message, if any.
    pub error: Option<String>,
}

/// Counts a call, and writes its audit line when it is a write.
pub(super) fn record(shared: &Shared, caller: &Caller<'_>, write: bool, o: &Outcome) {
    shared
        .metrics
        .admin_requests
        .with_label_values(&[o.op, o.result])
        .inc();
    if !write {
        return;
    }
    tracing::info!(
        target: "audit",
        caller = caller.name.as_str(),
        role = caller.role.as_str(),
        subject = caller.peer.subject.as_deref(),
        peer = %caller.peer.addr,
        op = o.op,
        entries = o.entries as u64,
        revision_before = o.revision_before,
        revision_after = o.revision_after,
        result = o.result,
        status = o.status,
        error = o.error.as_deref(),
        "registry write"
    );
}

/// Counts a refused call and writes its audit line (reads included: a refusal is always worth a
/// line).
pub(super) fn refused(shared: &Shared, peer: &Peer, op: &'static str, r: &Refused) {
    shared
        .metrics
        .admin_requests
        .with_label_values(&[op, r.result])
        .inc();
    tracing::warn!(
        target: "audit",
        caller = r.token.as_deref().unwrap_or("-"),
        subject = peer.subject.as_deref(),
        peer = %peer.addr,
        op,
        result = r.result,
        status = r.answer.status().as_u16(),
        error = r.why.as_str(),
        "authentication refused"
    );
}
