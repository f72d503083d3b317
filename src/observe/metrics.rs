//! Prometheus metrics (docs/operations.md#metrics). Label values come only from the config (listener names) and
//! from fixed code sets (decisions, reasons, error kinds): never from a client.
//!
//! The data path does not look labels up per request: each listener resolves its counters once
//! into [`ListenerMetrics`], and an increment is a single atomic add.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::core::decision::{Decision, Reason};
use crate::observe::ops::OpsMetrics;

/// Request latency buckets, from a cached block page (~10 µs) to a slow origin.
const DURATION_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

/// Fleet apply lag buckets: from a change applied at once on loopback to one applied late.
const LAG_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The `icp_gate_fleet_*` metrics (docs/fleet.md#metrics).
#[derive(Clone)]
pub(crate) struct FleetMetrics {
    pub connected: IntGauge,
    pub applied_sequence: IntGauge,
    pub stream_sequence: IntGauge,
    pub apply_lag: Histogram,
    pub snapshot_loads: IntCounter,
    pub snapshot_writes: IntCounter,
    pub apply_stopped: IntGauge,
}

/// Why talking to an origin failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UpstreamError {
    Connect,
    Timeout,
    Reset,
}

impl UpstreamError {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            UpstreamError::Connect => "connect",
            UpstreamError::Timeout => "timeout",
            UpstreamError::Reset => "reset",
        }
    }
}

/// Why a QUIC listener dropped a datagram (the `reason` of
/// `icp_gate_quic_datagrams_dropped_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QuicDrop {
    /// Not a QUIC packet, or not an Initial where a flow must start with one.
    NotQuic,
    /// A long header with a version icp-gate cannot read (no Version Negotiation is sent).
    UnknownVersion,
    /// An Initial in a datagram shorter than 1 200 bytes (RFC 9000 §14.1).
    ShortInitial,
    /// An Initial that does not decrypt with the flow's keys, or repeats a packet number.
    Undecryptable,
    /// A new flow while `quic.max_flows` flows are tracked.
    MaxFlows,
    /// A new flow past `quic.new_flows_per_second` (dropped before any cryptography).
    NewFlowRate,
    /// A new flow from a source address that already has its share of undecided flows.
    SourceLimit,
    /// More than an undecided flow may hold.
    HeldLimit,
    /// Held by an undecided flow evicted to make room (`quic.max_flows`, or the memory bound of
    /// undecided flows).
    Evicted,
    /// Of a flow that was blocked (held ones included).
    Blocked,
    /// Held by a flow whose ClientHello was not complete within `quic.initial_timeout`.
    Undecided,
    /// While draining or after the listener was removed: no new flows.
    Draining,
    /// The socket refused it (buffer full, origin unreachable).
    SendFailed,
}

impl QuicDrop {
    pub(crate) const ALL: [QuicDrop; 13] = [
        QuicDrop::NotQuic,
        QuicDrop::UnknownVersion,
        QuicDrop::ShortInitial,
        QuicDrop::Undecryptable,
        QuicDrop::MaxFlows,
        QuicDrop::NewFlowRate,
        QuicDrop::SourceLimit,
        QuicDrop::HeldLimit,
        QuicDrop::Evicted,
        QuicDrop::Blocked,
        QuicDrop::Undecided,
        QuicDrop::Draining,
        QuicDrop::SendFailed,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            QuicDrop::NotQuic => "not_quic",
            QuicDrop::UnknownVersion => "unknown_version",
            QuicDrop::ShortInitial => "short_initial",
            QuicDrop::Undecryptable => "undecryptable",
            QuicDrop::MaxFlows => "max_flows",
            QuicDrop::NewFlowRate => "new_flow_rate",
            QuicDrop::SourceLimit => "source_limit",
            QuicDrop::HeldLimit => "held_limit",
            QuicDrop::Evicted => "evicted",
            QuicDrop::Blocked => "blocked",
            QuicDrop::Undecided => "undecided",
            QuicDrop::Draining => "draining",
            QuicDrop::SendFailed => "send_failed",
        }
    }
}

/// All metric families, registered in one registry.
pub(crate) struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    tls_connections: IntCounterVec,
    quic_flows: IntCounterVec,
    quic_flows_active: IntGaugeVec,
    quic_dropped: IntCounterVec,
    request_duration: HistogramVec,
    upstream_errors: IntCounterVec,
    connections_active: IntGaugeVec,
    connections_rejected: IntCounterVec,
    relayed_bytes: IntCounterVec,
    pub registry_entries: IntGauge,
    pub registry_revision: IntGauge,
    pub registry_last_update: Gauge,
    pub registry_updates: IntCounterVec,
    /// `/v1` calls by operation and result (`icp_gate_admin_requests_total`).
    pub admin_requests: IntCounterVec,
    /// 1 while registry writes are accepted; 0 while storage fails (or before the registry is
    /// loaded). Set at each scrape.
    pub registry_writable: IntGauge,
    log_dropped: IntCounter,
    /// The drop count `log_dropped` has caught up to.
    log_dropped_seen: AtomicU64,
    /// Build, config reloads, certificate expiry, the connection limit.
    pub ops: OpsMetrics,
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    r.register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

impl Metrics {
    pub(crate) fn new() -> Arc<Metrics> {
        let r = Registry::new();
        #[cfg(target_os = "linux")]
        r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .expect("process collector registered once");
        let requests = counter_vec(
            &r,
            "icp_gate_requests_total",
            "HTTP requests decided, by listener, decision and reason.",
            &["listener", "decision", "reason"],
        );
        let tls_connections = counter_vec(
            &r,
            "icp_gate_tls_connections_total",
            "TLS connections decided by SNI, by listener, decision and reason.",
            &["listener", "decision", "reason"],
        );
        let quic_flows = counter_vec(
            &r,
            "icp_gate_quic_flows_total",
            "QUIC flows decided by the SNI of their Initial packets, by listener, decision and reason.",
            &["listener", "decision", "reason"],
        );
        let quic_flows_active = IntGaugeVec::new(
            Opts::new(
                "icp_gate_quic_flows_active",
                "QUIC flows allowed and being relayed, by listener.",
            ),
            &["listener"],
        )
        .expect("valid metric definition");
        r.register(Box::new(quic_flows_active.clone()))
            .expect("metric registered once");
        let quic_dropped = counter_vec(
            &r,
            "icp_gate_quic_datagrams_dropped_total",
            "Datagrams a QUIC listener dropped instead of relaying, by listener and reason.",
            &["listener", "reason"],
        );
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "icp_gate_request_duration_seconds",
                "Time from request head to response head, by listener and decision.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["listener", "decision"],
        )
        .expect("valid metric definition");
        r.register(Box::new(request_duration.clone()))
            .expect("metric registered once");
        let upstream_errors = counter_vec(
            &r,
            "icp_gate_upstream_errors_total",
            "Failures talking to origins, by listener and kind (connect, timeout, reset).",
            &["listener", "kind"],
        );
        let connections_active = IntGaugeVec::new(
            Opts::new(
                "icp_gate_connections_active",
                "Client connections open, by listener.",
            ),
            &["listener"],
        )
        .expect("valid metric definition");
        r.register(Box::new(connections_active.clone()))
            .expect("metric registered once");
        let connections_rejected = counter_vec(
            &r,
            "icp_gate_connections_rejected_total",
            "Connections closed at accept because limits.max_connections was reached.",
            &["listener"],
        );
        let relayed_bytes = counter_vec(
            &r,
            "icp_gate_relayed_bytes_total",
            "Bytes relayed through TLS passthrough tunnels and QUIC flows, by listener and direction.",
            &["listener", "direction"],
        );
        let registry_entries =
            IntGauge::new("icp_gate_registry_entries", "Entries in the registry.")
                .expect("valid metric definition");
        let registry_revision = IntGauge::new(
            "icp_gate_registry_revision",
            "Registry revision (one per applied write).",
        )
        .expect("valid metric definition");
        let registry_last_update = Gauge::new(
            "icp_gate_registry_last_update_timestamp_seconds",
            "Unix time of the last applied registry write (or of the load at start-up).",
        )
        .expect("valid metric definition");
        let registry_writable = IntGauge::new(
            "icp_gate_registry_writable",
            "1 while registry writes are accepted, 0 while its storage fails (see /readyz).",
        )
        .expect("valid metric definition");
        for g in [&registry_entries, &registry_revision, &registry_writable] {
            r.register(Box::new(g.clone()))
                .expect("metric registered once");
        }
        r.register(Box::new(registry_last_update.clone()))
            .expect("metric registered once");
        let admin_requests = counter_vec(
            &r,
            "icp_gate_admin_requests_total",
            "Registry API calls, by operation and result (refused authentication included).",
            &["op", "result"],
        );
        let registry_updates = counter_vec(
            &r,
            "icp_gate_registry_updates_total",
            "Registry writes, by operation and result.",
            &["op", "result"],
        );
        let log_dropped = IntCounter::new(
            "icp_gate_log_lines_dropped_total",
            "Log lines (access log included) dropped because the reader of stderr fell behind.",
        )
        .expect("valid metric definition");
        r.register(Box::new(log_dropped.clone()))
            .expect("metric registered once");
        let ops = OpsMetrics::register(&r);
        Arc::new(Metrics {
            registry: r,
            requests,
            tls_connections,
            quic_flows,
            quic_flows_active,
            quic_dropped,
            request_duration,
            upstream_errors,
            connections_active,
            connections_rejected,
            relayed_bytes,
            registry_entries,
            registry_revision,
            registry_last_update,
            registry_updates,
            admin_requests,
            registry_writable,
            log_dropped,
            log_dropped_seen: AtomicU64::new(0),
            ops,
        })
    }

    /// Counters of one listener, resolved once.
    pub(crate) fn listener(self: &Arc<Self>, name: &str) -> Arc<ListenerMetrics> {
        Arc::new(ListenerMetrics {
            name: name.to_string(),
            metrics: self.clone(),
            decided: Default::default(),
            tls_decided: Default::default(),
            quic_decided: Default::default(),
            quic_active: OnceLock::new(),
            quic_dropped: Default::default(),
            durations: Default::default(),
            upstream_errors: [
                UpstreamError::Connect,
                UpstreamError::Timeout,
                UpstreamError::Reset,
            ]
            .map(|k| self.upstream_errors.with_label_values(&[name, k.as_str()])),
            active: self.connections_active.with_label_values(&[name]),
            rejected: self.connections_rejected.with_label_values(&[name]),
            relayed: ["client_to_origin", "origin_to_client"]
                .map(|d| self.relayed_bytes.with_label_values(&[name, d])),
        })
    }

    /// Registers the `icp_gate_fleet_*` metrics (a node with `[fleet]`; call once).
    pub(crate) fn fleet(&self) -> FleetMetrics {
        let r = &self.registry;
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric definition");
            r.register(Box::new(g.clone()))
                .expect("metric registered once");
            g
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric definition");
            r.register(Box::new(c.clone()))
                .expect("metric registered once");
            c
        };
        let apply_lag = Histogram::with_opts(
            HistogramOpts::new(
                "icp_gate_fleet_apply_lag_seconds",
                "Time from a change stored in the stream to applied on this node.",
            )
            .buckets(LAG_BUCKETS.to_vec()),
        )
        .expect("valid metric definition");
        r.register(Box::new(apply_lag.clone()))
            .expect("metric registered once");
        FleetMetrics {
            connected: gauge(
                "icp_gate_fleet_connected",
                "1 while connected to NATS with the stream reachable, 0 otherwise.",
            ),
            applied_sequence: gauge(
                "icp_gate_fleet_applied_sequence",
                "Stream sequence of the last change applied here (the registry revision).",
            ),
            stream_sequence: gauge(
                "icp_gate_fleet_stream_sequence",
                "Last sequence of the stream, as last seen by this node.",
            ),
            apply_lag,
            snapshot_loads: counter(
                "icp_gate_fleet_snapshot_loads_total",
                "Snapshots loaded from the bucket (history trimmed past this node, or joining).",
            ),
            snapshot_writes: counter(
                "icp_gate_fleet_snapshot_writes_total",
                "Snapshots this node wrote to the bucket.",
            ),
            apply_stopped: gauge(
                "icp_gate_fleet_apply_stopped",
                "1 while this node cannot apply the next change (malformed, missing, refused).",
            ),
        }
    }

    /// The Prometheus text exposition of every metric.
    pub(crate) fn render(&self) -> Vec<u8> {
        // The log thread counts its drops; the counter catches up at each scrape, by the part
        // no concurrent scrape has added yet.
        let dropped = crate::observe::logging::dropped_lines();
        let seen = self.log_dropped_seen.fetch_max(dropped, Ordering::Relaxed);
        if dropped > seen {
            self.log_dropped.inc_by(dropped - seen);
        }
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

/// The handles one listener increments. Cells are filled on first use, so `/metrics` lists the
/// combinations that happened rather than every impossible one.
pub(crate) struct ListenerMetrics {
    name: String,
    metrics: Arc<Metrics>,
    decided: [[OnceLock<IntCounter>; Reason::ALL.len()]; Decision::ALL.len()],
    tls_decided: [[OnceLock<IntCounter>; Reason::ALL.len()]; Decision::ALL.len()],
    quic_decided: [[OnceLock<IntCounter>; Reason::ALL.len()]; Decision::ALL.len()],
    /// QUIC flows allowed and being relayed (created with the listener's first flow, so only
    /// quic listeners show it).
    quic_active: OnceLock<IntGauge>,
    quic_dropped: [OnceLock<IntCounter>; QuicDrop::ALL.len()],
    durations: [OnceLock<Histogram>; Decision::ALL.len()],
    upstream_errors: [IntCounter; 3],
    pub active: IntGauge,
    pub rejected: IntCounter,
    /// `[client_to_origin, origin_to_client]`.
    pub relayed: [IntCounter; 2],
}

fn decision_index(d: Decision) -> usize {
    Decision::ALL.iter().position(|x| *x == d).unwrap_or(0)
}

fn reason_index(r: Reason) -> usize {
    Reason::ALL.iter().position(|x| *x == r).unwrap_or(0)
}

impl ListenerMetrics {
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Counts one decided HTTP request.
    pub(crate) fn request(&self, decision: Decision, reason: Reason) {
        self.decided[decision_index(decision)][reason_index(reason)]
            .get_or_init(|| {
                self.metrics.requests.with_label_values(&[
                    self.name.as_str(),
                    decision.as_str(),
                    reason.as_str(),
                ])
            })
            .inc();
    }

    /// Counts one decided TLS connection.
    pub(crate) fn tls_connection(&self, decision: Decision, reason: Reason) {
        self.tls_decided[decision_index(decision)][reason_index(reason)]
            .get_or_init(|| {
                self.metrics.tls_connections.with_label_values(&[
                    self.name.as_str(),
                    decision.as_str(),
                    reason.as_str(),
                ])
            })
            .inc();
    }

    /// The gauge of QUIC flows being relayed.
    pub(crate) fn quic_active(&self) -> &IntGauge {
        self.quic_active.get_or_init(|| {
            self.metrics
                .quic_flows_active
                .with_label_values(&[self.name.as_str()])
        })
    }

    /// Counts one decided QUIC flow.
    pub(crate) fn quic_flow(&self, decision: Decision, reason: Reason) {
        self.quic_decided[decision_index(decision)][reason_index(reason)]
            .get_or_init(|| {
                self.metrics.quic_flows.with_label_values(&[
                    self.name.as_str(),
                    decision.as_str(),
                    reason.as_str(),
                ])
            })
            .inc();
    }

    /// Counts `n` datagrams a QUIC listener dropped.
    pub(crate) fn quic_dropped(&self, why: QuicDrop, n: u64) {
        let i = QuicDrop::ALL.iter().position(|x| *x == why).unwrap_or(0);
        self.quic_dropped[i]
            .get_or_init(|| {
                self.metrics
                    .quic_dropped
                    .with_label_values(&[self.name.as_str(), why.as_str()])
            })
            .inc_by(n);
    }

    pub(crate) fn observe_duration(&self, decision: Decision, seconds: f64) {
        self.durations[decision_index(decision)]
            .get_or_init(|| {
                self.metrics
                    .request_duration
                    .with_label_values(&[self.name.as_str(), decision.as_str()])
            })
            .observe(seconds);
    }

    pub(crate) fn upstream_error(&self, kind: UpstreamError) {
        self.upstream_errors[kind as usize].inc();
    }
}
