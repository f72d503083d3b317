//! The QUIC listener (`kind = "quic"`): decides each flow on the SNI of the client's Initial
//! packets without terminating QUIC (docs/behaviour.md#quic-http3-sni-from-the-initial-packets).
//!
//! One task per listening socket owns a bounded flow table keyed by the client's address (and, on
//! a wildcard bind, the address it sent to, which picks the route as for TCP). A new
//! flow must start with an Initial packet in a datagram of at least 1 200 bytes; its datagrams are
//! held, unrelayed, while [`crate::wire::quic::InitialReader`] reassembles the ClientHello, and the
//! SNI is decided with the same [`decide`] as TCP. On allow a per-flow task connects a UDP socket
//! to the route's `quic_origin`, sends the held datagrams in order, and relays the origin's
//! datagrams back (a burst read as one GRO run goes on in one GSO send); the listener task relays
//! the client's to it, until the flow is idle for
//! `quic.flow_idle_timeout`. On block the client gets a server Initial with CONNECTION_CLOSE
//! (`quic.block = "close"`) or nothing, and nothing of the flow reaches the origin.
//!
//! An allowed flow stays checked: a client Initial that contradicts the ClientHello already
//! decided cuts it, and one that starts a connection under a new Destination Connection ID (a new
//! connection from the same address, or the client's answer to a Retry) or in another version (the
//! client's answer to the origin's Version Negotiation) is decided afresh before any of it is
//! relayed.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::config::{Origin, QuicBlock, QuicConfig};
use crate::core::decision::{Decision, HostInput, Reason, decide};
use crate::observe::logging::{Access, RequestId};
use crate::observe::metrics::{ListenerMetrics, QuicDrop, UpstreamError};
use crate::proxy::state::{Generation, ListenerSpec, Shared};
use crate::proxy::tunnels::TunnelGuard;
use crate::wire::host;
use crate::wire::quic::{self, InitialReader, MIN_INITIAL_DATAGRAM, Peek, Read};

/// Largest UDP payload, and the most a GRO run of a client's datagrams holds (the kernel caps a
/// run below 64 KiB).
const MAX_DATAGRAM: usize = 65_535;
/// How often undecided flows are timed out and finished flows removed.
const SWEEP: Duration = Duration::from_millis(100);
/// What one undecided flow may hold: a 16 KiB ClientHello fills about 15 datagrams.
const MAX_HELD_DATAGRAMS: usize = 48;
const MAX_HELD_BYTES: usize = 64 * 1024;
/// Undecided flows one source address may have at once (clients behind one NAT share it, and a
/// flow is undecided for about a round trip at most).
pub(crate) const MAX_PENDING_PER_SOURCE: usize = 256;
/// Names besides the first that connections on one flow may be allowed for.
const MAX_NAMES_PER_FLOW: usize = 16;
/// Memory all undecided flows of one socket may hold (datagrams and CRYPTO buffers); past it the
/// oldest undecided flows are evicted. With `quic.max_flows` it bounds a flood's state.
pub(crate) const PENDING_BUDGET: usize = 32 << 20;

/// Serves one listening socket until `stop` or the drain: then it takes no new flow, and returns
/// once its allowed flows have ended (idle, revoked, or the process exits).
pub(crate) async fn serve(
    socket: std::net::UdpSocket,
    local: SocketAddr,
    spec: Arc<ArcSwap<ListenerSpec>>,
    stop: CancellationToken,
    shared: Arc<Shared>,
) {
    let socket = match UdpSocket::from_std(socket) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            warn!(listener = %spec.load().config.name, addr = %local, error = %e, "cannot register udp socket");
            return;
        }
    };
    // A wildcard bind learns each datagram's destination (which picks the route) from
    // IP_PKTINFO, through quinn-udp's receive and send with control messages (and GRO where the
    // kernel has it). A socket bound to one address needs none of that, and plain recvfrom(2)
    // measured cheaper there (docs/performance.md, "Batched receive, measured and not adopted");
    // its quinn-udp state comes from a socket of its own, so that the options it sets (GRO above
    // all) stay off the listening socket. Flows use it for the origin's GRO runs, sent on to the
    // client with GSO.
    let io = if local.ip().is_unspecified() {
        quinn_udp::UdpSocketState::new((&*socket).into())
    } else {
        let any = SocketAddr::new(unspecified(local), 0);
        std::net::UdpSocket::bind(any).and_then(|own| quinn_udp::UdpSocketState::new((&own).into()))
    };
    let io = match io {
        Ok(io) => Arc::new(io),
        Err(e) => {
            warn!(listener = %spec.load().config.name, addr = %local, error = %e, "cannot set up udp socket");
            return;
        }
    };
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let mut listener = Listener {
        socket,
        io,
        local,
        spec,
        shared,
        flows: HashMap::new(),
        pending_per_source: HashMap::new(),
        pending_cost: 0,
        order: VecDeque::new(),
        new_flows: Bucket::default(),
        events: events_tx,
        next_id: 0,
    };
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut sweep = tokio::time::interval(SWEEP);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Made once, not at every wake-up: each one made and dropped takes the token's lock twice.
    let stopped = stop.cancelled();
    let drain = listener.shared.drain.token();
    let drained = drain.cancelled();
    tokio::pin!(stopped, drained);
    loop {
        let closing = stop.is_cancelled() || listener.shared.drain.is_cancelled();
        if closing && !listener.relaying() {
            return;
        }
        tokio::select! {
            biased;
            Some(event) = events.recv() => listener.on_event(event),
            r = listener.recv(&mut buf) => match r {
                Ok(meta) => listener.on_received(&buf[..meta.len], meta, closing),
                Err(e) => debug!(error = %e, "udp receive failed"),
            },
            _ = sweep.tick() => listener.sweep(closing),
            // Not polled again once it has fired: `closing` stays true from then on.
            _ = &mut stopped, if !closing => {}
            _ = &mut drained, if !closing => {}
        }
    }
}

struct Listener {
    socket: Arc<UdpSocket>,
    /// quinn-udp's batched and control-message I/O (see [`serve`]).
    io: Arc<quinn_udp::UdpSocketState>,
    /// The bound address; its IP is unspecified on a wildcard bind.
    local: SocketAddr,
    spec: Arc<ArcSwap<ListenerSpec>>,
    shared: Arc<Shared>,
    flows: HashMap<Peer, Flow>,
    /// Undecided flows by [`source`], for [`MAX_PENDING_PER_SOURCE`].
    pending_per_source: HashMap<IpAddr, usize>,
    /// Memory held by undecided flows, for [`PENDING_BUDGET`].
    pending_cost: usize,
    /// Undecided and refused flows, oldest first (by serial), the ones evicted to make room.
    /// Entries whose flow has moved on are skipped and swept.
    order: VecDeque<(Peer, u64)>,
    /// Admission of new flows, for `quic.new_flows_per_second`.
    new_flows: Bucket,
    events: mpsc::UnboundedSender<Event>,
    next_id: u64,
}

/// What a flow is keyed by: the client's address and, on a wildcard bind, the address its
/// datagrams were sent to (IP_PKTINFO), which is the flow's destination ([`Listener::dst`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct Peer {
    addr: SocketAddr,
    /// On a wildcard bind, the address the client sent to, as the socket reported it: answers
    /// leave from it.
    reply_from: Option<IpAddr>,
}

/// Boxed, so that the many refused or undecided flows of a flood take little room each.
enum Flow {
    Pending(Box<Pending>),
    Allowed(Box<Allowed>),
    /// A refused flow, remembered until `until` so that the rest of its first flight is dropped
    /// (and answered with `close` again when it is an Initial) rather than decided once more.
    Refused {
        serial: u64,
        until: Instant,
        dcid: Vec<u8>,
        close: Option<Vec<u8>>,
    },
}

impl Flow {
    /// The eviction-order serial of an undecided or refused flow.
    fn evictable(&self) -> Option<u64> {
        match self {
            Flow::Pending(p) => Some(p.serial),
            Flow::Refused { serial, .. } => Some(*serial),
            Flow::Allowed(_) => None,
        }
    }
}

/// A flow whose ClientHello is not complete yet.
struct Pending {
    serial: u64,
    reader: InitialReader,
    held: Vec<Vec<u8>>,
    held_bytes: usize,
    started: Instant,
    /// What it held when last counted in `Listener::pending_cost`.
    cost: usize,
}

impl Pending {
    fn new(serial: u64, max_crypto: usize) -> Pending {
        Pending {
            serial,
            reader: InitialReader::new(max_crypto),
            held: Vec::new(),
            held_bytes: 0,
            started: Instant::now(),
            cost: 0,
        }
    }

    fn current_cost(&self) -> usize {
        self.held_bytes + self.reader.buffered()
    }

    fn hold(&mut self, datagram: &[u8]) -> bool {
        if self.held.len() >= MAX_HELD_DATAGRAMS
            || self.held_bytes + datagram.len() > MAX_HELD_BYTES
        {
            return false;
        }
        self.held_bytes += datagram.len();
        self.held.push(datagram.to_vec());
        true
    }
}

/// A flow being relayed.
struct Allowed {
    id: u64,
    /// The connected socket toward the origin, once the flow's task has opened it; until then the
    /// client's datagrams wait in `queue`.
    origin: Option<Arc<UdpSocket>>,
    queue: Vec<Vec<u8>>,
    queue_bytes: usize,
    /// Cancelled when the flow ends: idle, revoked, origin unreachable, or cut here.
    stop: CancellationToken,
    /// Milliseconds since `epoch` of the last datagram either way.
    activity: Arc<AtomicU64>,
    epoch: Instant,
    /// The client's first Destination Connection ID, which its Initials keep until the server
    /// answers.
    original_dcid: Vec<u8>,
    /// The version of the decided first flight: an Initial in another one (a client starting
    /// over after the origin's Version Negotiation) is another connection, decided afresh even
    /// under the same connection ID.
    version: Option<quic::Version>,
    /// The reader that decided the flow, still fed the client's Initials under that ID; dropped
    /// once the client sends Handshake or 1-RTT packets (it has then discarded its Initial keys,
    /// and the server does so on receiving them).
    reader: Option<InitialReader>,
    /// A connection started under another Destination Connection ID, being decided.
    recheck: Option<Pending>,
    /// The name that opened the flow (its tunnel registration is the flow task's).
    sni: String,
    /// Registrations of the other names that connections on this flow were allowed for (one
    /// client socket, several connections): revoking any of them stops the whole flow.
    more_names: Vec<TunnelGuard>,
}

impl Allowed {
    fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.activity.store(ms, Ordering::Relaxed);
    }
}

/// From a flow's task to the listener task.
enum Event {
    /// The origin socket is connected and the held datagrams were sent.
    Ready {
        client: Peer,
        id: u64,
        origin: Arc<UdpSocket>,
    },
}

/// Why an undecided flow is being decided.
enum Settle {
    Read(Read),
    TimedOut,
}

/// A decision on one ClientHello, owned.
struct Decided {
    decision: Decision,
    reason: Reason,
    protocol_error: bool,
    origin: Option<Origin>,
    /// Set when a registry entry allowed the flow: revocation re-decides it.
    registrable: Option<String>,
    sni: String,
}

impl Listener {
    fn relaying(&self) -> bool {
        self.flows.values().any(|f| matches!(f, Flow::Allowed(_)))
    }

    fn on_event(&mut self, event: Event) {
        let Event::Ready { client, id, origin } = event;
        let Some(Flow::Allowed(flow)) = self.flows.get_mut(&client) else {
            return;
        };
        if flow.id != id || flow.stop.is_cancelled() {
            return;
        }
        let metrics = self.spec.load().metrics.clone();
        for datagram in flow.queue.drain(..) {
            send_to_origin(&origin, &datagram, &metrics);
        }
        flow.queue_bytes = 0;
        flow.origin = Some(origin);
    }

    /// Receives one datagram, or on a wildcard socket with GRO one run of a client's datagrams,
    /// with the address it was sent to. One at a time: reading batches of up to 32 per
    /// recvmmsg(2), or per wake-up, measured no cheaper here and delayed the flows' own tasks
    /// behind a flood (docs/performance.md, "Batched receive, measured and not adopted").
    async fn recv(&self, buf: &mut [u8]) -> std::io::Result<quinn_udp::RecvMeta> {
        if !self.wildcard() {
            let (len, addr) = self.socket.recv_from(buf).await?;
            return Ok(quinn_udp::RecvMeta {
                addr,
                len,
                stride: len,
                ecn: None,
                dst_ip: None,
            });
        }
        recv_run(&self.io, &self.socket, buf).await
    }

    /// Handles what [`Listener::recv`] read.
    fn on_received(&mut self, received: &[u8], meta: quinn_udp::RecvMeta, closing: bool) {
        let Some(peer) = self.peer(meta.addr, meta.dst_ip) else {
            // Linux reports it for every datagram once IP_PKTINFO is on; without it the route is
            // unknown, and a flow is never decided on a guessed destination.
            debug!(client = %meta.addr, "no destination address on a wildcard socket: dropped");
            self.spec.load().metrics.quic_dropped(QuicDrop::NotQuic, 1);
            return;
        };
        for datagram in datagrams(received, meta.stride) {
            self.on_datagram(peer, datagram, closing);
        }
    }

    /// The flow key of a datagram from `addr` sent to `dst_ip` (which only a wildcard socket
    /// reports, and must).
    fn peer(&self, addr: SocketAddr, dst_ip: Option<IpAddr>) -> Option<Peer> {
        if self.wildcard() && dst_ip.is_none() {
            return None;
        }
        Some(Peer {
            addr,
            reply_from: dst_ip,
        })
    }

    /// The destination of `peer`'s flow: the bound address, or on a wildcard bind the one the
    /// client sent to, canonical (an IPv4 address received on a dual-stack socket is IPv4) as
    /// the decision, the access log and the tunnel index take it.
    fn dst(&self, peer: Peer) -> SocketAddr {
        peer.reply_from.map_or(self.local, |ip| {
            SocketAddr::new(ip.to_canonical(), self.local.port())
        })
    }

    /// Bound to the wildcard: each datagram's destination comes with it (IP_PKTINFO).
    fn wildcard(&self) -> bool {
        self.local.ip().is_unspecified()
    }

    fn on_datagram(&mut self, from: Peer, datagram: &[u8], closing: bool) {
        let spec = self.spec.load_full();
        let metrics = &spec.metrics;
        let head = quic::peek(datagram);
        // Wherever it sits among the coalesced packets (clients put it first; a crafted datagram
        // need not).
        let initial = quic::first_initial(datagram);
        if initial.is_some() && datagram.len() < MIN_INITIAL_DATAGRAM {
            // RFC 9000 §14.1: before any cryptography, so a flood of small Initials costs nothing.
            metrics.quic_dropped(QuicDrop::ShortInitial, 1);
            return;
        }
        let Some(flow) = self.flows.get_mut(&from) else {
            self.new_flow(from, datagram, &head, closing, &spec);
            return;
        };
        match flow {
            Flow::Pending(pending) => {
                // Every datagram is read: an Initial behind a 0-RTT packet is still an Initial,
                // and nothing the reader did not read is held (so never relayed).
                let fed = pending.reader.feed(datagram);
                if fed.unread {
                    metrics.quic_dropped(QuicDrop::Undecryptable, 1);
                } else if !pending.hold(datagram) {
                    metrics.quic_dropped(QuicDrop::HeldLimit, 1);
                }
                if !matches!(fed.read, Read::Incomplete) {
                    self.settle_pending(from, Settle::Read(fed.read), &spec);
                    return;
                }
                self.recost(from);
                self.make_room(0, metrics);
            }
            Flow::Allowed(allowed) => {
                if allowed.stop.is_cancelled() {
                    // Ended (idle, revoked): what follows is not relayed; a new Initial starts over.
                    self.end_flow(from);
                    self.new_flow(from, datagram, &head, closing, &spec);
                    return;
                }
                if let Peek::UnknownVersion(_) = head {
                    // A connection in a version whose Initials cannot be read (a client's packets
                    // of a connection already relayed are v1 or v2): relayed, it would reach the
                    // origin undecided.
                    metrics.quic_dropped(QuicDrop::UnknownVersion, 1);
                    return;
                }
                allowed.touch();
                if let Some((version, dcid)) = initial {
                    if allowed.recheck.is_some()
                        || allowed.original_dcid != dcid
                        || allowed.version != Some(version)
                    {
                        self.recheck(from, datagram, &spec);
                        return;
                    }
                    let changed = allowed
                        .reader
                        .as_mut()
                        .map(|r| r.feed(datagram).read)
                        .filter(|read| matches!(read, Read::Invalid(_)));
                    if let Some(Read::Invalid(why)) = changed {
                        debug!(client = %from.addr, why, "allowed flow's client hello changed: cut");
                        metrics.quic_dropped(QuicDrop::Blocked, 1);
                        self.refuse(from, None, Instant::now() + Duration::from_secs(10), &[]);
                        return;
                    }
                } else if allowed.reader.is_some()
                    && matches!(
                        head,
                        Peek::Short
                            | Peek::Long {
                                kind: quic::LongType::Handshake,
                                ..
                            }
                    )
                {
                    allowed.reader = None;
                }
                relay_to_origin(allowed, datagram, metrics);
            }
            Flow::Refused {
                until, dcid, close, ..
            } => {
                if *until <= Instant::now() {
                    self.end_flow(from);
                    self.new_flow(from, datagram, &head, closing, &spec);
                    return;
                }
                if let Some((_, d)) = initial {
                    if d != dcid.as_slice() && d.len() >= 8 {
                        // Another connection from the same address: decided on its own.
                        self.end_flow(from);
                        self.new_flow(from, datagram, &head, closing, &spec);
                        return;
                    }
                    if let Some(close) = close {
                        // No larger than the client's datagram: no amplification.
                        let _ = send_to_client(&self.io, &self.socket, from, close, None);
                    }
                }
                metrics.quic_dropped(QuicDrop::Blocked, 1);
            }
        }
    }

    /// A datagram from an address without a flow: only a readable Initial starts one.
    fn new_flow(
        &mut self,
        from: Peer,
        datagram: &[u8],
        head: &Peek<'_>,
        closing: bool,
        spec: &ListenerSpec,
    ) {
        let metrics = &spec.metrics;
        let drop_reason = match head {
            Peek::Long {
                kind: quic::LongType::Initial,
                ..
            } => None,
            Peek::UnknownVersion(_) => Some(QuicDrop::UnknownVersion),
            _ => Some(QuicDrop::NotQuic),
        };
        if let Some(why) = drop_reason {
            metrics.quic_dropped(why, 1);
            return;
        }
        if datagram.len() < MIN_INITIAL_DATAGRAM {
            metrics.quic_dropped(QuicDrop::ShortInitial, 1);
            return;
        }
        if closing {
            metrics.quic_dropped(QuicDrop::Draining, 1);
            return;
        }
        let generation = self.shared.generation.load_full();
        let config = &generation.config;
        let per_source = self
            .pending_per_source
            .get(&source(from.addr))
            .copied()
            .unwrap_or(0);
        if per_source >= MAX_PENDING_PER_SOURCE {
            metrics.quic_dropped(QuicDrop::SourceLimit, 1);
            return;
        }
        // Each new flow costs a key derivation and a decryption, which random Initials cost as
        // much as real ones: past the rate they are dropped before any of it, so that a flood
        // cannot take the time the flows being relayed need.
        if !self.new_flows.take(config.quic.new_flows_per_second) {
            metrics.quic_dropped(QuicDrop::NewFlowRate, 1);
            return;
        }
        self.next_id += 1;
        let mut pending = Pending::new(self.next_id, config.tls.max_client_hello);
        let fed = pending.reader.feed(datagram);
        if !fed.accepted || fed.unread {
            metrics.quic_dropped(QuicDrop::Undecryptable, 1);
            return;
        }
        // Room for one more: the oldest undecided or refused flows make way (a ClientHello that
        // fits one datagram, as nearly all do, is decided on arrival and never waits).
        if !self.make_room(1, metrics) {
            metrics.quic_dropped(QuicDrop::MaxFlows, 1);
            return;
        }
        pending.hold(datagram);
        *self
            .pending_per_source
            .entry(source(from.addr))
            .or_default() += 1;
        self.order.push_back((from, pending.serial));
        self.flows.insert(from, Flow::Pending(Box::new(pending)));
        if !matches!(fed.read, Read::Incomplete) {
            self.settle_pending(from, Settle::Read(fed.read), spec);
            return;
        }
        self.recost(from);
        self.make_room(0, metrics);
    }

    /// Updates `pending_cost` for the undecided flow of `client`.
    fn recost(&mut self, client: Peer) {
        if let Some(Flow::Pending(p)) = self.flows.get_mut(&client) {
            let now = p.current_cost();
            self.pending_cost = self.pending_cost - p.cost + now;
            p.cost = now;
        }
    }

    /// Evicts the oldest undecided or refused flows until `extra` more flows fit in
    /// `quic.max_flows` and undecided flows hold at most [`PENDING_BUDGET`]. `false` when that
    /// is not possible (every flow is being relayed).
    fn make_room(&mut self, extra: usize, metrics: &ListenerMetrics) -> bool {
        let max_flows = self.shared.generation.load().config.quic.max_flows;
        while self.flows.len() + extra > max_flows || self.pending_cost > PENDING_BUDGET {
            let Some((client, serial)) = self.order.pop_front() else {
                return false;
            };
            if self.flows.get(&client).and_then(Flow::evictable) != Some(serial) {
                continue; // moved on
            }
            if let Some(Flow::Pending(p)) = self.end_flow(client) {
                metrics.quic_dropped(QuicDrop::Evicted, p.held.len() as u64);
            }
        }
        true
    }

    /// Removes `client`'s flow, keeping the per-source count of undecided flows right.
    fn end_flow(&mut self, client: Peer) -> Option<Flow> {
        let flow = self.flows.remove(&client)?;
        if let Flow::Pending(p) = &flow {
            self.pending_cost -= p.cost;
            self.pending_done(source(client.addr));
        }
        if let Flow::Allowed(a) = &flow {
            a.stop.cancel();
        }
        Some(flow)
    }

    fn pending_done(&mut self, ip: IpAddr) {
        if let Some(n) = self.pending_per_source.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.pending_per_source.remove(&ip);
            }
        }
    }

    /// Decides an undecided flow and acts on it.
    fn settle_pending(&mut self, client: Peer, why: Settle, spec: &ListenerSpec) {
        let Some(Flow::Pending(pending)) = self.end_flow(client) else {
            return;
        };
        let generation = self.shared.generation.load_full();
        let d = self.decide(client, &pending, why, &generation, spec);
        let pending = *pending;
        if d.decision.forwards() {
            let Some(origin) = d.origin.clone() else {
                spec.metrics
                    .quic_dropped(QuicDrop::Blocked, pending.held.len() as u64);
                return;
            };
            self.allow(client, pending, d, origin, &generation, spec);
        } else {
            spec.metrics
                .quic_dropped(QuicDrop::Blocked, pending.held.len() as u64);
            let close = self.close_for(&d, &pending.reader, &generation.config.quic);
            if let Some(close) = &close {
                let _ = send_to_client(&self.io, &self.socket, client, close, None);
            }
            let dcid = pending.reader.original_dcid().unwrap_or_default().to_vec();
            self.refuse(
                client,
                close,
                Instant::now() + generation.config.quic.initial_timeout,
                &dcid,
            );
        }
    }

    /// The CONNECTION_CLOSE for a blocked flow, when `quic.block = "close"` and the block is a
    /// policy answer (a malformed first flight gets nothing, as TLS closes without an alert).
    fn close_for(
        &self,
        d: &Decided,
        reader: &InitialReader,
        config: &QuicConfig,
    ) -> Option<Vec<u8>> {
        if config.block != QuicBlock::Close || d.decision != Decision::Block || d.protocol_error {
            return None;
        }
        let version = reader.version()?;
        let dcid = reader.original_dcid()?;
        let scid = reader.client_scid()?;
        let reason = format!("icp-gate: {}", d.reason.as_str());
        // The server's connection ID: the client's own choice back is as good as any.
        Some(quic::close_packet(
            version,
            dcid,
            scid,
            dcid,
            reason.as_bytes(),
        ))
    }

    fn refuse(&mut self, client: Peer, close: Option<Vec<u8>>, until: Instant, dcid: &[u8]) {
        self.end_flow(client);
        self.next_id += 1;
        self.order.push_back((client, self.next_id));
        self.flows.insert(
            client,
            Flow::Refused {
                serial: self.next_id,
                until,
                dcid: dcid.to_vec(),
                close,
            },
        );
    }

    /// Decides on what the reader read, counts it and writes its access-log line.
    fn decide(
        &self,
        client: Peer,
        pending: &Pending,
        why: Settle,
        generation: &Generation,
        spec: &ListenerSpec,
    ) -> Decided {
        let raw = match &why {
            Settle::Read(Read::Done(info)) => info.sni.clone(),
            _ => None,
        };
        let parsed = raw.as_deref().map(|r| host::parse_host(r.as_bytes()));
        let input = match (&why, &parsed) {
            (_, Some(Ok(h))) => HostInput::from(h),
            (_, Some(Err(_))) => HostInput::InvalidSni,
            (Settle::Read(Read::Done(_)), None) => HostInput::NoSni,
            (Settle::Read(Read::Invalid(why)), None) => {
                debug!(client = %client.addr, why, "invalid quic first flight");
                HostInput::InvalidSni
            }
            (Settle::Read(Read::Incomplete) | Settle::TimedOut, None) => HostInput::InvalidSni,
        };
        let dst = self.dst(client);
        let snapshot = self.shared.registry.load();
        let v = decide(dst.ip(), input, &snapshot, &generation.policy);
        let sni = match (&parsed, &raw) {
            (Some(Ok(h)), _) => h.to_text().into_owned(),
            (_, Some(raw)) => raw.clone(),
            _ => String::new(),
        };
        spec.metrics.quic_flow(v.decision, v.reason);
        self.shared
            .blocked
            .record(spec.metrics.name(), v.decision, &sni, v.reason, dst.ip());
        Access {
            listener: spec.metrics.name(),
            client: client.addr,
            dst,
            host: &sni,
            decision: v.decision,
            reason: v.reason,
            status: None,
            request_id: &RequestId::next(),
            duration: pending.started.elapsed(),
        }
        .log();
        Decided {
            decision: v.decision,
            reason: v.reason,
            protocol_error: v.protocol_error,
            origin: v.route.and_then(|r| r.quic_origin.clone()),
            registrable: v
                .registrable
                .filter(|_| v.reason.registry_allowed())
                .map(str::to_owned),
            sni,
        }
    }

    /// Starts relaying an allowed flow: its task opens the origin socket and sends the held
    /// datagrams first.
    fn allow(
        &mut self,
        client: Peer,
        pending: Pending,
        d: Decided,
        origin: Origin,
        generation: &Generation,
        spec: &ListenerSpec,
    ) {
        self.next_id += 1;
        let id = self.next_id;
        let stop = self.shared.drain.child_token();
        let activity = Arc::new(AtomicU64::new(0));
        let epoch = Instant::now();
        let guard = d.registrable.as_deref().map(|r| {
            self.shared
                .tunnels
                .register(&d.sni, r, self.dst(client).ip(), stop.clone())
        });
        let task = FlowTask {
            client,
            id,
            origin,
            held: pending.held,
            socket: self.socket.clone(),
            io: self.io.clone(),
            stop: stop.clone(),
            activity: activity.clone(),
            epoch,
            idle: generation.config.quic.flow_idle_timeout,
            connect_timeout: generation.config.limits.origin_connect_timeout,
            metrics: spec.metrics.clone(),
            events: self.events.clone(),
            _guard: guard,
        };
        self.shared.tasks.spawn(task.run());
        self.flows.insert(
            client,
            Flow::Allowed(Box::new(Allowed {
                id,
                origin: None,
                queue: Vec::new(),
                queue_bytes: 0,
                stop,
                activity,
                epoch,
                original_dcid: pending.reader.original_dcid().unwrap_or_default().to_vec(),
                version: pending.reader.version(),
                reader: Some(pending.reader),
                recheck: None,
                sni: d.sni,
                more_names: Vec::new(),
            })),
        );
    }

    /// A client Initial on an allowed flow under another Destination Connection ID or version. If it does
    /// not read as a connection's first flight (the client addressing the server's chosen ID,
    /// under the original keys) it is relayed; if it does, it is a new connection (or the answer
    /// to a Retry), held and decided before anything of it is relayed.
    fn recheck(&mut self, client: Peer, datagram: &[u8], spec: &ListenerSpec) {
        let metrics = &spec.metrics;
        let max_crypto = self.shared.generation.load().config.tls.max_client_hello;
        let Some(Flow::Allowed(allowed)) = self.flows.get_mut(&client) else {
            return;
        };
        let fresh = allowed.recheck.is_none();
        if fresh
            && !self.new_flows.take(
                self.shared
                    .generation
                    .load()
                    .config
                    .quic
                    .new_flows_per_second,
            )
        {
            // Reading it would take a key derivation, as for a new flow: the same admission.
            metrics.quic_dropped(QuicDrop::NewFlowRate, 1);
            return;
        }
        let pending = allowed
            .recheck
            .get_or_insert_with(|| Pending::new(0, max_crypto));
        let fed = pending.reader.feed(datagram);
        if !fed.accepted && !matches!(fed.read, Read::Invalid(_)) {
            if fresh {
                allowed.recheck = None;
                relay_to_origin(allowed, datagram, metrics);
            } else {
                metrics.quic_dropped(QuicDrop::Undecryptable, 1);
            }
            return;
        }
        if fed.unread {
            metrics.quic_dropped(QuicDrop::Undecryptable, 1);
        } else if fed.accepted && !pending.hold(datagram) {
            metrics.quic_dropped(QuicDrop::HeldLimit, 1);
        }
        if matches!(fed.read, Read::Incomplete) {
            return;
        }
        let Some(pending) = allowed.recheck.take() else {
            return;
        };
        let sni_before = allowed.sni.clone();
        let generation = self.shared.generation.load_full();
        let d = self.decide(client, &pending, Settle::Read(fed.read), &generation, spec);
        let dst = self.dst(client);
        let Some(Flow::Allowed(allowed)) = self.flows.get_mut(&client) else {
            return;
        };
        let room = allowed.more_names.len() < MAX_NAMES_PER_FLOW;
        if d.decision.forwards() && (d.sni == sni_before || room) {
            // A Retry answered, or another connection from the same client socket: on through
            // the same origin socket (a Retry token is bound to its address). Another name is
            // registered too, so that its revocation stops the flow.
            if let Some(r) = d.registrable.as_deref().filter(|_| d.sni != sni_before) {
                let guard = self
                    .shared
                    .tunnels
                    .register(&d.sni, r, dst.ip(), allowed.stop.clone());
                allowed.more_names.push(guard);
            }
            for held in &pending.held {
                relay_to_origin(allowed, held, metrics);
            }
            allowed.original_dcid = pending.reader.original_dcid().unwrap_or_default().to_vec();
            allowed.version = pending.reader.version();
            allowed.reader = Some(pending.reader);
            return;
        }
        // Refused: nothing of the new connection reached the origin. The flow already relayed
        // stays, so that an Initial spoofed from a client's address cannot end its connection.
        metrics.quic_dropped(QuicDrop::Blocked, pending.held.len() as u64);
        if let Some(close) = self.close_for(&d, &pending.reader, &generation.config.quic) {
            let _ = send_to_client(&self.io, &self.socket, client, &close, None);
        }
    }

    /// Times out undecided flows, forgets refused ones, and removes flows whose task ended.
    fn sweep(&mut self, closing: bool) {
        let now = Instant::now();
        let spec = self.spec.load_full();
        let timeout = self.shared.generation.load().config.quic.initial_timeout;
        let mut late = Vec::new();
        let mut gone = Vec::new();
        for (client, flow) in &self.flows {
            match flow {
                Flow::Pending(p) if now.duration_since(p.started) >= timeout || closing => {
                    late.push(*client);
                }
                Flow::Allowed(a) if a.stop.is_cancelled() => gone.push(*client),
                Flow::Refused { until, .. } if *until <= now => gone.push(*client),
                _ => {}
            }
        }
        for client in gone {
            self.end_flow(client);
        }
        // Forget eviction entries whose flow has moved on (decided, allowed, gone).
        while let Some(&(client, serial)) = self.order.front() {
            if self.flows.get(&client).and_then(Flow::evictable) == Some(serial) {
                break;
            }
            self.order.pop_front();
        }
        for client in late {
            if let Some(Flow::Pending(p)) = self.flows.get(&client) {
                spec.metrics
                    .quic_dropped(QuicDrop::Undecided, p.held.len() as u64);
            }
            self.settle_pending(client, Settle::TimedOut, &spec);
        }
    }
}

/// A token bucket: `rate` tokens a second, at most `rate` held (a second's burst).
#[derive(Default)]
struct Bucket {
    tokens: f64,
    last: Option<Instant>,
}

impl Bucket {
    fn take(&mut self, rate: u32) -> bool {
        let now = Instant::now();
        let rate = f64::from(rate);
        let refill = self
            .last
            .map_or(rate, |t| now.duration_since(t).as_secs_f64() * rate);
        self.tokens = (self.tokens + refill).min(rate);
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What [`MAX_PENDING_PER_SOURCE`] counts by: the client's IPv4 address, or the /64 of its IPv6
/// one (a single host commonly holds a whole /64).
fn source(client: SocketAddr) -> IpAddr {
    match client.ip() {
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
            let mut octets = v6.octets();
            octets[8..].fill(0);
            IpAddr::from(octets)
        }
        ip => ip.to_canonical(),
    }
}

/// Sends one datagram to an allowed flow's origin, or queues it until the socket is open.
fn relay_to_origin(allowed: &mut Allowed, datagram: &[u8], metrics: &ListenerMetrics) {
    match &allowed.origin {
        Some(origin) => send_to_origin(origin, datagram, metrics),
        None if allowed.queue.len() < MAX_HELD_DATAGRAMS
            && allowed.queue_bytes + datagram.len() <= MAX_HELD_BYTES =>
        {
            allowed.queue_bytes += datagram.len();
            allowed.queue.push(datagram.to_vec());
        }
        None => metrics.quic_dropped(QuicDrop::HeldLimit, 1),
    }
}

fn send_to_origin(origin: &UdpSocket, datagram: &[u8], metrics: &ListenerMetrics) {
    match send_now(origin, datagram) {
        Ok(n) => metrics.relayed[0].inc_by(n as u64),
        Err(_) => metrics.quic_dropped(QuicDrop::SendFailed, 1),
    }
}

/// Sends a datagram to an origin at once, or fails (a full socket buffer drops it, as a router
/// would).
///
/// A direct non-blocking send(2), not tokio's `try_send`: that one answers "would block"
/// without trying until the reactor has seen the socket writable, which a socket opened a moment
/// ago has not, and the held first flight sent right after opening the origin socket was lost
/// (the client's retransmission a second later got through).
fn send_now(socket: &UdpSocket, datagram: &[u8]) -> std::io::Result<usize> {
    socket2::SockRef::from(socket).send(datagram)
}

/// Sends a datagram to a client through the listening socket, from the address the client sent
/// to (on a wildcard bind, through IP_PKTINFO), at once or not at all; with `segment`, a run of
/// datagrams of that size in one GSO send.
fn send_to_client(
    io: &quinn_udp::UdpSocketState,
    socket: &UdpSocket,
    peer: Peer,
    datagram: &[u8],
    segment: Option<usize>,
) -> std::io::Result<()> {
    if peer.reply_from.is_none() && segment.is_none() {
        // Plain sendto(2): no control messages to build or for the kernel to read.
        return socket2::SockRef::from(socket)
            .send_to(datagram, &peer.addr.into())
            .map(drop);
    }
    let transmit = quinn_udp::Transmit {
        destination: peer.addr,
        ecn: None,
        contents: datagram,
        segment_size: segment,
        src_ip: peer.reply_from,
    };
    io.try_send(socket.into(), &transmit)
}

/// Sends what the origin sent in one receive to the client: a GRO run (several datagrams of
/// `stride` bytes, the last maybe shorter) in one GSO send where the socket allows it, else one
/// datagram at a time.
async fn relay_run(
    io: &quinn_udp::UdpSocketState,
    socket: &UdpSocket,
    peer: Peer,
    run: &[u8],
    stride: usize,
) -> std::io::Result<()> {
    let send = async |data: &[u8], segment| {
        socket
            .async_io(tokio::io::Interest::WRITABLE, || {
                send_to_client(io, socket, peer, data, segment)
            })
            .await
    };
    // A refused GSO send (a device without segmentation offload answers EIO) is sent again
    // datagram by datagram below.
    if is_run(run, stride)
        && run.len().div_ceil(stride) <= io.max_gso_segments()
        && send(run, Some(stride)).await.is_ok()
    {
        return Ok(());
    }
    for datagram in datagrams(run, stride) {
        send(datagram, None).await?;
    }
    Ok(())
}

/// Whether `received` is a GRO run: several datagrams of `stride` bytes (the last may be shorter).
fn is_run(received: &[u8], stride: usize) -> bool {
    stride > 0 && stride < received.len()
}

/// The datagrams of what one receive returned: a GRO run's, or the one datagram (an empty one
/// included: from a client it is counted as not QUIC, from an origin relayed as it came).
fn datagrams(received: &[u8], stride: usize) -> impl Iterator<Item = &[u8]> {
    let size = if is_run(received, stride) {
        stride
    } else {
        received.len().max(1)
    };
    received
        .chunks(size)
        .chain(received.is_empty().then_some(received))
}

/// Receives one datagram, or one GRO run of them, with its stride and (where IP_PKTINFO is on)
/// its destination address.
async fn recv_run(
    io: &quinn_udp::UdpSocketState,
    socket: &UdpSocket,
    buf: &mut [u8],
) -> std::io::Result<quinn_udp::RecvMeta> {
    let mut meta = [quinn_udp::RecvMeta::default()];
    socket
        .async_io(tokio::io::Interest::READABLE, || {
            let mut slots = [std::io::IoSliceMut::new(&mut *buf)];
            io.recv(socket.into(), &mut slots, &mut meta)
        })
        .await?;
    Ok(meta[0])
}

/// The task of one allowed flow: opens the origin socket, sends the held datagrams, then relays
/// the origin's datagrams to the client until the flow is idle or stopped.
struct FlowTask {
    client: Peer,
    id: u64,
    origin: Origin,
    held: Vec<Vec<u8>>,
    socket: Arc<UdpSocket>,
    io: Arc<quinn_udp::UdpSocketState>,
    stop: CancellationToken,
    activity: Arc<AtomicU64>,
    epoch: Instant,
    idle: Duration,
    connect_timeout: Duration,
    metrics: Arc<ListenerMetrics>,
    events: mpsc::UnboundedSender<Event>,
    /// Keeps the flow in the tunnel index (closed on revocation) while the task runs.
    _guard: Option<TunnelGuard>,
}

impl FlowTask {
    async fn run(self) {
        let _active = Active::new(&self.metrics);
        let origin =
            match tokio::time::timeout(self.connect_timeout, open_origin(&self.origin)).await {
                Ok(Ok(s)) => Arc::new(s),
                Ok(Err(e)) => {
                    self.metrics.upstream_error(UpstreamError::Connect);
                    debug!(origin = %self.origin, error = %e, "quic origin unusable");
                    self.stop.cancel();
                    return;
                }
                Err(_) => {
                    self.metrics.upstream_error(UpstreamError::Timeout);
                    self.stop.cancel();
                    return;
                }
            };
        if self.stop.is_cancelled() {
            // Revoked (or drained) while the socket was being opened: nothing is sent.
            return;
        }
        for datagram in &self.held {
            send_to_origin(&origin, datagram, &self.metrics);
        }
        let _ = self.events.send(Event::Ready {
            client: self.client,
            id: self.id,
            origin: origin.clone(),
        });
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let idle = tokio::time::sleep(self.idle);
        // Made once (see `serve`).
        let stopped = self.stop.cancelled();
        tokio::pin!(idle, stopped);
        loop {
            tokio::select! {
                r = recv_run(&self.io, &origin, &mut buf) => match r {
                    Ok(meta) => {
                        let ms = self.epoch.elapsed().as_millis() as u64;
                        self.activity.store(ms, Ordering::Relaxed);
                        let run = &buf[..meta.len];
                        match relay_run(&self.io, &self.socket, self.client, run, meta.stride).await {
                            Ok(()) => self.metrics.relayed[1].inc_by(run.len() as u64),
                            Err(_) => self.metrics.quic_dropped(QuicDrop::SendFailed, 1),
                        }
                    }
                    // An ICMP error from the origin (port unreachable): the client retries.
                    Err(_) => self.metrics.upstream_error(UpstreamError::Reset),
                },
                _ = &mut stopped => return,
                _ = &mut idle => {
                    let last = Duration::from_millis(self.activity.load(Ordering::Relaxed));
                    let since = self.epoch.elapsed().saturating_sub(last);
                    if since >= self.idle {
                        self.stop.cancel();
                        return;
                    }
                    idle.as_mut().reset(tokio::time::Instant::now() + (self.idle - since));
                }
            }
        }
    }
}

/// Counts a flow in `icp_gate_quic_flows_active` while it is relayed.
struct Active(prometheus::IntGauge);

impl Active {
    fn new(metrics: &ListenerMetrics) -> Active {
        metrics.quic_active().inc();
        Active(metrics.quic_active().clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The wildcard address of `addr`'s family.
fn unspecified(addr: SocketAddr) -> IpAddr {
    match addr {
        SocketAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
    }
}

/// A UDP socket connected to `origin` (its name resolved now, as the TLS listener does).
async fn open_origin(origin: &Origin) -> std::io::Result<UdpSocket> {
    let addr = tokio::net::lookup_host(origin.as_str())
        .await?
        .next()
        .ok_or_else(|| std::io::Error::other("origin name resolves to nothing"))?;
    let socket = UdpSocket::bind(SocketAddr::new(unspecified(addr), 0)).await?;
    socket.connect(addr).await?;
    // A burst from the origin (servers send full-size datagrams back to back, often by GSO) is
    // then read in one receive and sent on in one; without GRO, one datagram at a time.
    let _ = crate::proxy::sockopt::enable_udp_gro(&socket);
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_flows_are_admitted_at_the_rate_with_a_second_of_burst() {
        let mut bucket = Bucket::default();
        let admitted = (0..150).filter(|_| bucket.take(100)).count();
        assert_eq!(admitted, 100, "a full second's burst, then nothing");
        std::thread::sleep(Duration::from_millis(50));
        let later = (0..150).filter(|_| bucket.take(100)).count();
        assert!((3..100).contains(&later), "about 5 in 50 ms, got {later}");
    }

    #[test]
    fn a_receive_is_split_into_the_datagrams_it_holds() {
        let lens = |received: &[u8], stride| -> Vec<usize> {
            datagrams(received, stride).map(<[u8]>::len).collect()
        };
        assert_eq!(lens(&[0; 2900], 1200), [1200, 1200, 500]);
        assert_eq!(lens(&[0; 2400], 1200), [1200, 1200]);
        assert_eq!(lens(&[0; 1200], 1200), [1200]);
        assert_eq!(lens(&[0; 700], 0), [700]);
        assert_eq!(lens(&[], 0), [0]);
        assert!(is_run(&[0; 2400], 1200) && !is_run(&[0; 1200], 1200) && !is_run(&[], 0));
    }

    #[test]
    fn undecided_flows_are_counted_per_ipv4_address_and_per_ipv6_64() {
        let a: SocketAddr = "192.0.2.7:1000".parse().unwrap();
        let b: SocketAddr = "192.0.2.7:2000".parse().unwrap();
        assert_eq!(source(a), source(b));
        let v6a: SocketAddr = "[2001:db8:1:2:aaaa::1]:443".parse().unwrap();
        let v6b: SocketAddr = "[2001:db8:1:2:bbbb::9]:443".parse().unwrap();
        let v6c: SocketAddr = "[2001:db8:1:3::1]:443".parse().unwrap();
        assert_eq!(source(v6a), source(v6b));
        assert_ne!(source(v6a), source(v6c));
        let mapped: SocketAddr = "[::ffff:192.0.2.7]:5".parse().unwrap();
        assert_eq!(source(mapped), source(a));
    }
}
