//! The process shell: binds listeners, loads the registry, runs accept loops, reloads the config
//! and drains on shutdown. Connection handling itself lives in the listener modules.

use std::collections::HashMap;
use std::future::Future;
use std::net::{SocketAddr, TcpListener as StdListener, UdpSocket as StdUdpSocket};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use arc_swap::ArcSwap;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::runtime::{Handle, RuntimeFlavor};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::admin;
use crate::config::{Config, ListenerConfig, RegistryConfig};
use crate::fleet::Fleet;
use crate::observe::metrics::Metrics;
use crate::proxy::accepted::Listener;
use crate::proxy::sockopt::set_defer_accept;
use crate::proxy::state::{ConnectionGuard, Generation, GenerationError, ListenerSpec, Shared};
use crate::proxy::{preamble, quic};
use crate::registry::{self, OnPublish, Registry, RegistryWriter, Snapshot, Store, write_snapshot};
use crate::runtime::demo_origin;
use crate::runtime::rlimit::fit_descriptor_limit;
use crate::runtime::workers::Workers;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("listener {name}: cannot bind {addr}: {source}")]
    Bind {
        name: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Generation(#[from] GenerationError),
    #[error("tls: {0}")]
    DemoOrigin(String),
    #[error(transparent)]
    Registry(#[from] registry::FileError),
    #[error(transparent)]
    Store(#[from] registry::StoreError),
    #[error(transparent)]
    Admin(#[from] crate::admin::AdminError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("fleet: {0}")]
    Fleet(String),
}

/// Sockets bound for a config, before anything is served on them. Binding port 0 picks a free
/// port; [`ServerHandle::listener_addr`] tells which.
pub struct Listeners {
    /// Per data listener, one socket per place its accept loop runs.
    data: Vec<(ListenerConfig, Sockets)>,
    admin: Option<TcpListener>,
    demo_origin: Vec<(TcpListener, Option<tokio_rustls::TlsAcceptor>)>,
    placement: Placement,
}

/// Where data listeners accept and their connections run.
#[derive(Clone)]
enum Placement {
    /// On the runtime that starts the server (one socket per listener).
    Here,
    /// On every worker, each with its own `SO_REUSEPORT` socket per listener: the kernel spreads
    /// new connections over the workers by their address hash.
    Workers(Arc<[Handle]>),
}

impl Placement {
    fn sockets(&self) -> usize {
        match self {
            Placement::Here => 1,
            Placement::Workers(h) => h.len(),
        }
    }
}

impl Listeners {
    /// Binds every address in the config for serving on the current runtime (must run inside a
    /// tokio runtime).
    pub fn bind(config: &Config) -> Result<Listeners, ServerError> {
        Listeners::bind_at(config, Placement::Here)
    }

    /// Like [`Listeners::bind`], but data listeners are served by `workers`, one socket each.
    pub fn bind_for_workers(config: &Config, workers: &Workers) -> Result<Listeners, ServerError> {
        Listeners::bind_at(config, Placement::Workers(workers.handles().into()))
    }

    fn bind_at(config: &Config, placement: Placement) -> Result<Listeners, ServerError> {
        let mut data = Vec::new();
        for l in &config.listeners {
            let sockets = bind_sockets(l, placement.sockets(), config.limits.header_read_timeout)?;
            data.push((l.clone(), sockets));
        }
        let admin = match &config.admin {
            Some(a) => Some(bind_here("admin", a.bind)?),
            None => None,
        };
        let mut demo_origin = Vec::new();
        if let Some(demo) = &config.demo_origin {
            if let Some(addr) = demo.http {
                demo_origin.push((bind_here("demo_origin", addr)?, None));
            }
            if let Some((addr, cert, key)) = &demo.tls {
                let acceptor = crate::proxy::state::acceptor(cert, key)
                    .map_err(|e| ServerError::DemoOrigin(format!("demo_origin: {e}")))?;
                demo_origin.push((bind_here("demo_origin", *addr)?, Some(acceptor)));
            }
        }
        Ok(Listeners {
            data,
            admin,
            demo_origin,
            placement,
        })
    }
}

/// A listening socket on `addr`, not yet registered with any runtime: whichever runtime serves it
/// registers it (`TcpListener::from_std`), so a worker's socket is registered once, by the worker.
fn bind(name: &str, addr: SocketAddr, reuseport: bool) -> Result<StdListener, ServerError> {
    let err = |source| ServerError::Bind {
        name: name.to_string(),
        addr,
        source,
    };
    let socket =
        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(err)?;
    socket.set_reuse_address(true).map_err(err)?;
    if reuseport {
        socket.set_reuse_port(true).map_err(err)?;
    }
    socket.set_tcp_nodelay(true).map_err(err)?;
    socket.set_nonblocking(true).map_err(err)?;
    socket.bind(&addr.into()).map_err(err)?;
    socket.listen(4096).map_err(err)?;
    Ok(socket.into())
}

/// A data listener's sockets: TCP listening sockets, or UDP ones for `quic` listeners.
enum Sockets {
    Tcp(Vec<StdListener>),
    Udp(Vec<StdUdpSocket>),
}

impl Sockets {
    fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Sockets::Tcp(s) => s.first()?.local_addr().ok(),
            Sockets::Udp(s) => s.first()?.local_addr().ok(),
        }
    }

    fn len(&self) -> usize {
        match self {
            Sockets::Tcp(s) => s.len(),
            Sockets::Udp(s) => s.len(),
        }
    }
}

/// The `n` sockets of a data listener, of its kind's transport. A connection that sends nothing
/// waits in the kernel up to `defer_wait` (the header read timeout) before it is accepted and
/// that timeout starts, as with nginx's `deferred`.
fn bind_sockets(
    l: &ListenerConfig,
    n: usize,
    defer_wait: Duration,
) -> Result<Sockets, ServerError> {
    if l.kind.is_udp() {
        bind_group(&l.name, l.bind, n, bind_udp, StdUdpSocket::local_addr).map(Sockets::Udp)
    } else {
        let group = bind_group(&l.name, l.bind, n, bind, StdListener::local_addr)?;
        if l.defer_accept {
            for socket in &group {
                set_defer_accept(socket, defer_wait).map_err(|source| ServerError::Bind {
                    name: l.name.clone(),
                    addr: l.bind,
                    source,
                })?;
            }
        }
        Ok(Sockets::Tcp(group))
    }
}

/// A UDP socket on `addr` for a `quic` listener, not yet registered with any runtime.
fn bind_udp(name: &str, addr: SocketAddr, reuseport: bool) -> Result<StdUdpSocket, ServerError> {
    let err = |source| ServerError::Bind {
        name: name.to_string(),
        addr,
        source,
    };
    let socket =
        Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
    if reuseport {
        socket.set_reuse_port(true).map_err(err)?;
    }
    // Room for bursts of Initials while the listener task decides: 4 MiB asked, the kernel
    // caps it at net.core.rmem_max.
    let _ = socket.set_recv_buffer_size(4 << 20);
    socket.set_nonblocking(true).map_err(err)?;
    socket.bind(&addr.into()).map_err(err)?;
    Ok(socket.into())
}

/// [`bind`] for a socket served on the current runtime (admin, demo origin).
fn bind_here(name: &str, addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::from_std(bind(name, addr, false)?).map_err(|source| ServerError::Bind {
        name: name.to_string(),
        addr,
        source,
    })
}

/// `n` sockets on `addr` (listening TCP ones, or UDP ones), for accept loops that each register
/// their own with the runtime they run on. Several share the address through `SO_REUSEPORT`,
/// which for UDP spreads datagrams by the hash of their addresses, so a client's flow stays on
/// one socket; for port 0 the first picks the port and the others join it. One socket does
/// without the option, so no other process can join it.
fn bind_group<S>(
    name: &str,
    addr: SocketAddr,
    n: usize,
    bind_one: fn(&str, SocketAddr, bool) -> Result<S, ServerError>,
    local_addr: fn(&S) -> std::io::Result<SocketAddr>,
) -> Result<Vec<S>, ServerError> {
    let reuseport = n > 1;
    let first = bind_one(name, addr, reuseport)?;
    let addr = local_addr(&first).map_err(|source| ServerError::Bind {
        name: name.to_string(),
        addr,
        source,
    })?;
    let mut group = vec![first];
    for _ in 1..n {
        group.push(bind_one(name, addr, reuseport)?);
    }
    Ok(group)
}

/// What makes a listener "the same" across a reload: its bind address and transport (UDP or
/// not); for port 0 (pick any) also its name, since several such listeners share the configured
/// address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ListenerKey(SocketAddr, bool, Option<String>);

impl ListenerKey {
    fn of(cfg: &ListenerConfig) -> ListenerKey {
        ListenerKey(
            cfg.bind,
            cfg.kind.is_udp(),
            (cfg.bind.port() == 0).then(|| cfg.name.clone()),
        )
    }
}

struct AcceptLoop {
    spec: Arc<ArcSwap<ListenerSpec>>,
    stop: CancellationToken,
    local_addr: SocketAddr,
    /// One per socket; each ends (closing its socket) once `stop` or the drain token is cancelled.
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// A running server.
pub struct ServerHandle {
    shared: Arc<Shared>,
    /// Accept loops by identity (kept across reloads).
    loops: Arc<tokio::sync::Mutex<HashMap<ListenerKey, AcceptLoop>>>,
    admin_addr: Option<SocketAddr>,
    /// The admin listener's tokens, read again at each reload.
    admin_auth: Option<Arc<admin::AdminAuth>>,
    placement: Placement,
}

impl ServerHandle {
    /// Loads the registry, then serves. The admin listener answers (`/readyz` 503) while the
    /// registry loads; data listeners are bound but accept only once it is loaded, so no request is
    /// ever decided against a half-loaded registry.
    pub async fn start(config: Config, listeners: Listeners) -> Result<ServerHandle, ServerError> {
        let metrics = Metrics::new();
        let generation = Generation::new(config)?;
        fit_descriptor_limit(generation.config.limits.max_connections);
        let shared = Arc::new(Shared::new(generation, metrics));
        shared.metrics.ops.started(&shared.generation.load().config);

        let (admin_addr, admin_auth) =
            match (listeners.admin, &shared.generation.load().config.admin) {
                (Some(l), Some(cfg)) => {
                    let auth = Arc::new(admin::AdminAuth::load(cfg)?);
                    let addr = l.local_addr().ok();
                    tokio::spawn(admin::serve(l, shared.clone(), auth.clone()));
                    (addr, Some(auth))
                }
                _ => (None, None),
            };
        for (l, tls) in listeners.demo_origin {
            tokio::spawn(demo_origin::serve(l, tls, shared.drain.token()));
        }

        let registry_config = shared.generation.load().config.registry.clone();
        let state_dir = registry_config.state_dir.clone();
        let (store, snapshot) =
            tokio::task::spawn_blocking(move || open_registry(&registry_config))
                .await
                .unwrap_or_else(|join| std::panic::resume_unwind(join.into_panic()))?;
        shared.registry_published(&snapshot);
        shared.registry.publish_arc(snapshot.clone());
        let weak = Arc::downgrade(&shared);
        let on_publish: OnPublish = Box::new(move |snapshot, changed| {
            let Some(shared) = weak.upgrade() else { return };
            shared.registry_published(snapshot);
            let stopped =
                shared
                    .tunnels
                    .revoke(changed, snapshot, &shared.generation.load().policy);
            if stopped > 0 {
                info!(stopped, "closed tunnels whose host an update blocked");
            }
        });
        let writer = RegistryWriter::start(store, snapshot, shared.registry.clone(), on_publish);
        shared.set_writer(writer.clone());
        crate::wire::host::warm_up();

        // A fleet node whose state_dir holds no registry of the fleet yet serves nothing until
        // it holds the fleet's: never a request decided against a registry it is replacing.
        let mut joining = None;
        if let Some(fleet_config) = shared.generation.load().config.fleet.clone() {
            let joined = registry::read_fleet_marker(&state_dir)?.is_some();
            let fleet = Fleet::start(
                fleet_config,
                writer,
                shared.registry.clone(),
                shared.metrics.fleet(),
                state_dir,
                joined,
            )
            .await
            .map_err(ServerError::Fleet)?;
            shared.set_fleet(fleet.clone());
            if !joined {
                joining = Some(fleet);
            }
        }

        let placement = listeners.placement;
        let loops = Arc::new(tokio::sync::Mutex::new(HashMap::new()));
        match joining {
            None => serve_data(&shared, &loops, listeners.data, &placement).await,
            Some(fleet) => {
                let (shared, loops, placement) = (shared.clone(), loops.clone(), placement.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        () = fleet.synced() => {}
                        () = shared.drain.cancelled() => return,
                    }
                    serve_data(&shared, &loops, listeners.data, &placement).await;
                    info!("fleet: joined; serving");
                });
            }
        }
        Ok(ServerHandle {
            shared,
            loops,
            admin_addr,
            admin_auth,
            placement,
        })
    }

    /// The registry the data path decides with (its current snapshot, swapped whole on update).
    pub fn registry(&self) -> Arc<Registry> {
        self.shared.registry.clone()
    }

    /// Tunnels and upgraded connections open under a registry entry, which an update that
    /// blocks their host would close.
    pub fn live_tunnels(&self) -> usize {
        self.shared.tunnels.len()
    }

    /// The address a data listener is bound to, by name.
    pub async fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        let loops = self.loops.lock().await;
        loops
            .values()
            .find(|l| l.spec.load().config.name == name)
            .map(|l| l.local_addr)
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Applies a new config without dropping connections. Listeners whose bind address is
    /// unchanged keep their socket (their name, kind and PROXY setting may change); new ones are
    /// bound; removed ones stop accepting while their connections finish. On any error nothing
    /// changes and the old config keeps serving. Counted in `icp_gate_config_reloads_total`.
    pub async fn reload(&self, config: Config) -> Result<(), ServerError> {
        let result = self.apply(config).await;
        let ops = &self.shared.metrics.ops;
        match &result {
            Ok(()) => ops.reloaded(Some(&self.shared.generation.load().config)),
            Err(_) => ops.reloaded(None),
        }
        result
    }

    /// Reads the config at `path` and [reloads](ServerHandle::reload) it; a file that does not
    /// load is a rejected reload too (SIGHUP).
    pub async fn reload_from(&self, path: &std::path::Path) -> Result<(), ServerError> {
        match Config::load(path) {
            Ok(config) => self.reload(config).await,
            Err(e) => {
                self.shared.metrics.ops.reloaded(None);
                Err(e.into())
            }
        }
    }

    async fn apply(&self, config: Config) -> Result<(), ServerError> {
        let old = self.shared.generation.load_full();
        for (what, changed) in [
            ("registry", old.config.registry != config.registry),
            ("demo_origin", old.config.demo_origin != config.demo_origin),
            ("fleet", old.config.fleet != config.fleet),
        ] {
            if changed {
                warn!("reload: [{what}] changed; it takes effect at the next restart");
            }
        }
        let generation = Generation::new(config)?;
        fit_descriptor_limit(generation.config.limits.max_connections);
        let mut loops = self.loops.lock().await;
        let mut bound = Vec::new();
        for l in &generation.config.listeners {
            if !loops.contains_key(&ListenerKey::of(l)) {
                let sockets = bind_sockets(
                    l,
                    self.placement.sockets(),
                    generation.config.limits.header_read_timeout,
                )?;
                bound.push((l.clone(), sockets));
            }
        }
        // Tokens are read again whether or not the config changed: rotating one is editing its
        // file. A bad token file fails the reload, and the tokens in force stay.
        let admin_restart = match (&self.admin_auth, &generation.config.admin) {
            (Some(auth), Some(cfg)) => auth.reload(cfg)?,
            (None, None) => false,
            _ => true,
        };
        if admin_restart {
            warn!(
                "reload: the admin listener's bind, TLS or client CA changed; that takes effect at \
                 the next restart (tokens and max_shrink apply now)"
            );
        }
        let new_config = generation.config.clone();
        self.shared.generation.store(Arc::new(generation));
        for l in &new_config.listeners {
            if let Some(existing) = loops.get(&ListenerKey::of(l)) {
                let current = existing.spec.load();
                if current.config.defer_accept != l.defer_accept {
                    warn!(
                        listener = %l.name,
                        "reload: defer_accept changed; it takes effect at the next restart"
                    );
                }
                if current.config != *l {
                    existing.spec.store(Arc::new(ListenerSpec {
                        metrics: self.shared.metrics.listener(&l.name),
                        config: l.clone(),
                    }));
                }
            }
        }
        for (cfg, sockets) in bound {
            loops.insert(
                ListenerKey::of(&cfg),
                spawn_accept_loop(&self.shared, cfg, sockets, &self.placement),
            );
        }
        loops.retain(|key, l| {
            let keep = new_config
                .listeners
                .iter()
                .any(|c| ListenerKey::of(c) == *key);
            if !keep {
                l.stop.cancel();
            }
            keep
        });
        info!(path = %new_config.path.display(), "config reloaded");
        Ok(())
    }

    /// Stops accepting, lets in-flight requests finish for up to `limits.drain_timeout`, then
    /// returns (remaining connections are dropped with the process).
    pub async fn shutdown(&self) {
        let deadline = self.shared.generation.load().config.limits.drain_timeout;
        self.shared.drain.cancel();
        // Every listening socket is closed before "draining" is logged: from then on a new
        // connection is refused by the kernel.
        let loops: Vec<AcceptLoop> = self.loops.lock().await.drain().map(|(_, l)| l).collect();
        for task in loops.into_iter().flat_map(|l| l.tasks) {
            let _ = task.await;
        }
        self.shared.tasks.close();
        let open = self.shared.open_connections();
        info!(open_connections = open, ?deadline, "draining");
        if tokio::time::timeout(deadline, self.shared.tasks.wait())
            .await
            .is_err()
        {
            warn!(
                open_connections = self.shared.open_connections(),
                "drain deadline reached; closing the rest"
            );
        }
    }
}

/// Recovers the registry from `state_dir` (snapshot + journal). When it holds no state yet, the
/// seed (or nothing) becomes revision 0 and is written there first, so the next start recovers
/// it from disk.
fn open_registry(config: &RegistryConfig) -> Result<(Store, Arc<Snapshot>), ServerError> {
    let (store, recovered) = Store::open(&config.state_dir)?;
    let snapshot = match recovered.snapshot {
        Some(snapshot) => {
            info!(
                entries = snapshot.len(),
                revision = snapshot.revision(),
                replayed = recovered.records_replayed,
                torn_tail_dropped = recovered.torn_tail_dropped,
                "registry recovered"
            );
            snapshot
        }
        None => {
            let snapshot = match &config.seed {
                Some(seed) => registry::load_seed(seed)?,
                None => Snapshot::empty(),
            };
            write_snapshot(store.dir(), &snapshot)?;
            info!(entries = snapshot.len(), "registry seeded");
            snapshot
        }
    };
    Ok((store, Arc::new(snapshot)))
}

/// Starts an accept loop on each bound data listener, then marks the server ready.
async fn serve_data(
    shared: &Arc<Shared>,
    loops: &tokio::sync::Mutex<HashMap<ListenerKey, AcceptLoop>>,
    data: Vec<(ListenerConfig, Sockets)>,
    placement: &Placement,
) {
    let mut map = loops.lock().await;
    for (cfg, sockets) in data {
        map.insert(
            ListenerKey::of(&cfg),
            spawn_accept_loop(shared, cfg, sockets, placement),
        );
    }
    shared.set_ready();
}

fn spawn_accept_loop(
    shared: &Arc<Shared>,
    cfg: ListenerConfig,
    sockets: Sockets,
    placement: &Placement,
) -> AcceptLoop {
    let local_addr = sockets.local_addr().unwrap_or(cfg.bind);
    info!(listener = %cfg.name, kind = ?cfg.kind, addr = %local_addr, sockets = sockets.len(), "listening");
    let spec = Arc::new(ArcSwap::from_pointee(ListenerSpec {
        metrics: shared.metrics.listener(&cfg.name),
        config: cfg,
    }));
    let stop = CancellationToken::new();
    let sockets = match sockets {
        Sockets::Tcp(s) => s,
        Sockets::Udp(s) => {
            return AcceptLoop {
                tasks: spawn_quic(shared, s, local_addr, &spec, &stop, placement),
                spec,
                stop,
                local_addr,
            };
        }
    };
    let tasks = sockets
        .into_iter()
        .enumerate()
        .map(|(i, socket)| {
            let task = accept_loop(
                socket,
                local_addr,
                spec.clone(),
                stop.clone(),
                shared.clone(),
            );
            match placement {
                Placement::Here => tokio::spawn(task),
                Placement::Workers(handles) => handles[i % handles.len()].spawn(task),
            }
        })
        .collect();
    AcceptLoop {
        spec,
        stop,
        local_addr,
        tasks,
    }
}

/// Serves a `quic` listener's sockets, one per place. Each socket's task runs in the connection
/// task tracker (draining waits for it, as for connections); the handles returned end at once on
/// `stop` or the drain, as an accept loop does, so that closing listeners never waits on flows.
fn spawn_quic(
    shared: &Arc<Shared>,
    sockets: Vec<StdUdpSocket>,
    local_addr: SocketAddr,
    spec: &Arc<ArcSwap<ListenerSpec>>,
    stop: &CancellationToken,
    placement: &Placement,
) -> Vec<tokio::task::JoinHandle<()>> {
    sockets
        .into_iter()
        .enumerate()
        .map(|(i, socket)| {
            let serve = quic::serve(
                socket,
                local_addr,
                spec.clone(),
                stop.clone(),
                shared.clone(),
            );
            let (stop, shared) = (stop.clone(), shared.clone());
            let task = async move {
                shared.tasks.spawn(serve);
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = shared.drain.cancelled() => {}
                }
            };
            match placement {
                Placement::Here => tokio::spawn(task),
                Placement::Workers(handles) => handles[i % handles.len()].spawn(task),
            }
        })
        .collect()
}

async fn accept_loop(
    socket: StdListener,
    local_addr: SocketAddr,
    spec: Arc<ArcSwap<ListenerSpec>>,
    stop: CancellationToken,
    shared: Arc<Shared>,
) {
    // Registered here, with the runtime this loop (and every connection it spawns) runs on.
    let listener = match Listener::new(socket) {
        Ok(l) => l,
        Err(e) => {
            warn!(listener = %spec.load().config.name, addr = %local_addr, error = %e, "cannot register listening socket");
            return;
        }
    };
    // A listener bound to one address needs no getsockname(2) per connection to know it.
    let bound = (!local_addr.ip().is_unspecified()).then_some(local_addr);
    // On a current-thread runtime (one thread, or the per-thread shape) a connection's first
    // step runs here, in this loop: a one-shot request answered from the bytes that came with
    // the connection is done without a task of its own. With work stealing, every connection
    // gets its task at once, so that other threads can take it.
    let inline = Handle::current().runtime_flavor() == RuntimeFlavor::CurrentThread;
    let mut failures = AcceptFailures::default();
    // Made once, not at every wait for a connection: each one made and dropped takes its token's
    // lock twice.
    let stopped = stop.cancelled();
    let drained = shared.drain.cancelled();
    tokio::pin!(stopped, drained);
    loop {
        // Checked before each accept, so a steady stream of connections cannot keep the loop
        // from seeing a stop; the select below is biased so that an accept that is ready at
        // once never polls the two cancellation waiters.
        if stop.is_cancelled() || shared.drain.is_cancelled() {
            return;
        }
        let accepted = tokio::select! {
            biased;
            r = listener.accept() => r,
            _ = &mut stopped => return,
            _ = &mut drained => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                failures.note(&e, &spec.load().config.name, local_addr);
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        let spec = spec.load_full();
        let limit = shared.generation.load().config.limits.max_connections;
        if shared.open_connections() >= limit {
            spec.metrics.rejected.inc();
            debug!(listener = %spec.config.name, client = %peer, "connection limit reached");
            continue;
        }
        let guard = ConnectionGuard::new(&shared, &spec.metrics);
        let shared2 = shared.clone();
        // Boxed once here: the connection's state is large, and the box is what moves into a
        // task if it has to wait.
        let mut connection = Box::pin(async move {
            let _guard = guard;
            preamble::connection(stream, peer, bound, spec, shared2).await;
        });
        // A connection that has to wait moves to its own task; its first poll there hands the
        // wakers it registered to that task.
        if inline {
            match poll_once(connection.as_mut()).await {
                Poll::Pending => {}
                Poll::Ready(Ok(())) => continue,
                Poll::Ready(Err(_)) => {
                    // As a task's panic ends only that task: the connection is dropped (closing
                    // it and releasing its slot) and this loop goes on.
                    warn!(addr = %local_addr, client = %peer, "connection handler panicked; connection closed");
                    continue;
                }
            }
        }
        shared.tasks.spawn(connection);
    }
}

/// Polls `f` once: its output, `Pending`, or the panic it raised.
async fn poll_once<F: Future + ?Sized>(mut f: Pin<&mut F>) -> Poll<std::thread::Result<F::Output>> {
    std::future::poll_fn(|cx| {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f.as_mut().poll(cx))) {
            Ok(Poll::Pending) => Poll::Ready(Poll::Pending),
            Ok(Poll::Ready(out)) => Poll::Ready(Poll::Ready(Ok(out))),
            Err(panic) => Poll::Ready(Poll::Ready(Err(panic))),
        }
    })
    .await
}

/// How long an accept loop waits after a failed accept (out of descriptors, say) before trying
/// again: the condition clears when connections close, which a sleep cannot hurry.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// Failed accepts, logged at most once a second per accept loop: out of descriptors, a loop
/// retries 20 times a second, and one line for each would flood the log when it matters most.
#[derive(Default)]
struct AcceptFailures {
    logged: Option<std::time::Instant>,
    unlogged: u64,
}

impl AcceptFailures {
    fn note(&mut self, e: &std::io::Error, listener: &str, addr: SocketAddr) {
        self.unlogged += 1;
        if self
            .logged
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        warn!(
            listener,
            %addr,
            error = %e,
            failures = self.unlogged,
            "accept failed; retrying every 50 ms (failures: since the last such line)"
        );
        self.logged = Some(std::time::Instant::now());
        self.unlogged = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpStream;

    /// A connection whose first poll runs in the accept loop: what it returns, that it waits,
    /// or its panic, which must not end the accept loop.
    #[tokio::test]
    async fn a_first_poll_reports_the_output_the_wait_or_the_panic() {
        let mut done = Box::pin(async { 7 });
        assert!(matches!(poll_once(done.as_mut()).await, Poll::Ready(Ok(7))));
        let mut waits = Box::pin(std::future::pending::<()>());
        assert!(poll_once(waits.as_mut()).await.is_pending());
        let mut panics = Box::pin(async { panic!("a handler bug") });
        assert!(matches!(
            poll_once(panics.as_mut()).await,
            Poll::Ready(Err(_))
        ));
    }

    /// `preamble::connection` relies on accepted sockets inheriting TCP_NODELAY from the listener.
    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay() {
        let listener = bind_here("test", "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap());
        drop(client);
    }
}
