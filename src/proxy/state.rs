//! State shared by every connection task: the config generation in force, the registry, metrics,
//! the drain signal and the live tunnels. The runtime builds it; listeners and the admin API read it.

use crate::observe::blocked::Blocked;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tokio_util::task::TaskTracker;

use crate::config::{self, Config, Limits, ListenerConfig};
use crate::core::decision::Policy;
use crate::core::routes::RouteTable;
use crate::fleet::Fleet;
use crate::observe::metrics::{ListenerMetrics, Metrics};
use crate::proxy::block_page::{BlockPage, BlockPageError};
use crate::proxy::forward::{self, OriginClient, RawOrigins, origin_client};
use crate::proxy::tunnels::LiveTunnels;
use crate::registry::{Registry, RegistryWriter, Snapshot};

/// A config that cannot be put in force.
#[derive(Debug, thiserror::Error)]
pub enum GenerationError {
    #[error(transparent)]
    BlockPage(#[from] BlockPageError),
    #[error("tls: {0}")]
    Tls(String),
}

/// Everything derived from one config that the data path reads. Swapped as a whole on reload,
/// so a request never sees half of an old config and half of a new one.
pub(crate) struct Generation {
    pub config: Config,
    pub policy: Policy,
    pub block_page: BlockPage,
    /// The shared keep-alive pool toward origins (hyper path).
    pub origins: OriginClient,
    /// The same for the HTTP fast path.
    pub raw_origins: RawOrigins,
    pub http: auto::Builder<TokioExecutor>,
    /// Serves the block page to refused TLS clients, when `tls.block_cert` is configured.
    pub block_acceptor: Option<TlsAcceptor>,
}

impl Generation {
    pub(crate) fn new(config: Config) -> Result<Generation, GenerationError> {
        let policy = Policy::new(RouteTable::new(config.routes.clone()), &config.policy);
        let block_page = BlockPage::load(&config.block_page)?;
        let origins = origin_client(&config.limits, None);
        let raw_origins = forward::raw_origins(&config.limits);
        let http = http_builder(&config.limits);
        let block_acceptor = match (&config.tls.block_cert, &config.tls.block_key) {
            (Some(cert), Some(key)) => Some(
                acceptor(cert, key)
                    .map_err(|e| GenerationError::Tls(format!("tls.block_cert/block_key: {e}")))?,
            ),
            _ => None,
        };
        Ok(Generation {
            config,
            policy,
            block_page,
            origins,
            raw_origins,
            http,
            block_acceptor,
        })
    }
}

/// State shared by every task of the process.
pub(crate) struct Shared {
    /// The config generation in force.
    pub generation: ArcSwap<Generation>,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    /// Client connections open across all listeners (for `limits.max_connections`).
    connections: AtomicUsize,
    /// Set when the process starts draining.
    pub drain: Drain,
    /// Every connection task, so draining can wait for them.
    pub tasks: TaskTracker,
    ready: AtomicBool,
    /// Registry writes go through here once the registry is loaded.
    writer: OnceLock<RegistryWriter>,
    /// With `[fleet]`: `/v1` writes go through the fleet's stream instead.
    fleet: OnceLock<Fleet>,
    /// Tunnels a registry entry allowed, closed when an update blocks their host.
    pub tunnels: Arc<LiveTunnels>,
    /// The hosts blocked most in the last hour (`/v1/blocked`).
    pub blocked: Blocked,
}

/// The drain signal. `CancellationToken::is_cancelled` takes a lock, and the HTTP fast path
/// asks twice per request; a flag set beside the token answers that with one load.
#[derive(Default)]
pub(crate) struct Drain {
    started: AtomicBool,
    token: CancellationToken,
}

impl Drain {
    pub(crate) fn cancel(&self) {
        self.started.store(true, Ordering::Release);
        self.token.cancel();
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        self.started.load(Ordering::Acquire)
    }

    /// Completes once the drain has started.
    pub(crate) fn cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.token.cancelled()
    }

    /// A token cancelled by the drain, and cancellable on its own (a tunnel's).
    pub(crate) fn child_token(&self) -> CancellationToken {
        self.token.child_token()
    }

    /// The drain's token itself, for a task that holds its own.
    pub(crate) fn token(&self) -> CancellationToken {
        self.token.clone()
    }
}

impl Shared {
    pub(crate) fn new(generation: Generation, metrics: Arc<Metrics>) -> Shared {
        Shared {
            generation: ArcSwap::from_pointee(generation),
            registry: Arc::new(Registry::new(Snapshot::empty())),
            metrics,
            connections: AtomicUsize::new(0),
            drain: Drain::default(),
            tasks: TaskTracker::new(),
            ready: AtomicBool::new(false),
            writer: OnceLock::new(),
            fleet: OnceLock::new(),
            tunnels: Arc::default(),
            blocked: Blocked::new(),
        }
    }

    /// Marks the registry loaded: `/readyz` answers 200 from now on.
    pub(crate) fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// Installs the registry writer, once, when the registry is loaded.
    pub(crate) fn set_writer(&self, writer: RegistryWriter) {
        let _ = self.writer.set(writer);
    }

    /// Installs the fleet handle, once, for a node with `[fleet]`.
    pub(crate) fn set_fleet(&self, fleet: Fleet) {
        let _ = self.fleet.set(fleet);
    }

    pub(crate) fn fleet(&self) -> Option<&Fleet> {
        self.fleet.get()
    }

    /// Client connections open across all listeners.
    pub(crate) fn open_connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    pub(crate) fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub(crate) fn writer(&self) -> Option<&RegistryWriter> {
        self.writer.get()
    }

    /// Records a published snapshot in the registry gauges.
    pub(crate) fn registry_published(&self, snapshot: &Snapshot) {
        let m = &self.metrics;
        m.registry_entries.set(snapshot.len() as i64);
        m.registry_revision.set(snapshot.revision() as i64);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        m.registry_last_update.set(now.as_secs_f64());
    }
}

/// The listener config an accept loop serves with, replaceable on reload.
pub(crate) struct ListenerSpec {
    pub config: ListenerConfig,
    pub metrics: Arc<ListenerMetrics>,
}

/// Counts a connection as open for its lifetime.
pub(crate) struct ConnectionGuard {
    shared: Arc<Shared>,
    metrics: Arc<ListenerMetrics>,
}

impl ConnectionGuard {
    pub(crate) fn new(shared: &Arc<Shared>, metrics: &Arc<ListenerMetrics>) -> Self {
        shared.connections.fetch_add(1, Ordering::Relaxed);
        metrics.active.inc();
        ConnectionGuard {
            shared: shared.clone(),
            metrics: metrics.clone(),
        }
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.shared.connections.fetch_sub(1, Ordering::Relaxed);
        self.metrics.active.dec();
    }
}

/// Where a connection came from and where it was going, after any PROXY header.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Endpoints {
    pub client: SocketAddr,
    pub dst: SocketAddr,
}

/// The HTTP/1 and HTTP/2 server settings for the given limits.
fn http_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // The read buffer bounds the request head (bodies stream past it): hyper answers 431.
        .max_buf_size(limits.max_header_bytes)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(250);
    b
}

/// A TLS acceptor for a PEM certificate chain and key, offering h2 and http/1.1.
pub(crate) fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, String> {
    let config = config::tls::server_config(cert, key, None, &[b"h2", b"http/1.1"])?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}
