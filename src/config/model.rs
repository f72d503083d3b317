//! The validated configuration: what every other layer reads.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::uri::Authority;
use ipnet::IpNet;
use serde::Deserialize;

use crate::wire::host::{self, Host};
pub use crate::wire::proxy_protocol::ProxyProtocolVersion;

/// A configuration error. The message always starts with the file, then the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read: {source}", file.display())]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {message}", file.display())]
    Syntax { file: PathBuf, message: String },
    #[error("{}: {key}: {message}", file.display())]
    Invalid {
        file: PathBuf,
        key: String,
        message: String,
    },
}

/// `enforce` blocks; `report` lets everything through but counts and logs what would have been
/// blocked (how an operator rolls enforcement out without an outage).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Enforce,
    Report,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Report => "report",
        }
    }
}

/// What to do with a request the registry cannot decide (IP literal, TLS without SNI).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Block,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerKind {
    Http,
    Tls,
    /// QUIC on UDP, decided on the SNI of the client's Initial packets.
    Quic,
}

impl ListenerKind {
    /// Whether the listener binds a UDP socket (else TCP): a UDP and a TCP listener may share
    /// an address.
    pub fn is_udp(self) -> bool {
        self == ListenerKind::Quic
    }
}

/// How a QUIC flow whose SNI is blocked is ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuicBlock {
    /// A server Initial with CONNECTION_CLOSE: the client sees a refused connection at once.
    Close,
    /// Nothing: the client times out.
    Drop,
}

/// How a refused TLS connection is ended when no block certificate is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsBlock {
    /// A fatal `access_denied` alert, then close.
    Alert,
    /// A TCP reset (SO_LINGER 0).
    Reset,
}

/// A validated configuration. Paths are absolute or relative to the working directory (they were
/// resolved against the config file's folder).
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from, for error messages and reloads.
    pub path: PathBuf,
    pub registry: RegistryConfig,
    pub policy: PolicyConfig,
    pub listeners: Vec<ListenerConfig>,
    pub routes: Vec<RouteConfig>,
    pub block_page: BlockPageConfig,
    pub tls: TlsConfig,
    pub quic: QuicConfig,
    pub limits: Limits,
    pub admin: Option<AdminConfig>,
    pub demo_origin: Option<DemoOriginConfig>,
    /// `None`: a standalone node.
    pub fleet: Option<FleetConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryConfig {
    pub state_dir: PathBuf,
    pub seed: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyConfig {
    pub mode: Mode,
    pub ip_literal: Action,
    pub no_sni: Action,
    /// Normalised names; a request for one of them or any sub-domain is always allowed.
    pub exempt: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    pub name: String,
    pub bind: SocketAddr,
    pub kind: ListenerKind,
    pub proxy_protocol: bool,
    /// `TCP_DEFER_ACCEPT` on the listening sockets (on by default for TCP kinds): every client of
    /// a TCP listener speaks first, so a connection is accepted once its first bytes are in.
    pub defer_accept: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    pub dst: IpNet,
    pub mainland: bool,
    pub x_forwarded_for: bool,
    pub send_proxy_protocol: Option<ProxyProtocolVersion>,
    /// Overrides `policy.mode` for destinations in this route.
    pub mode: Option<Mode>,
    /// `false`: a filed name whose access (接入) is registered with another provider is allowed
    /// (`filed_elsewhere`) instead of blocked (`not_accessed`). Always `true` off the mainland.
    pub require_access_here: bool,
    pub http_origin: Option<Origin>,
    pub tls_origin: Option<Origin>,
    /// UDP address of the tenant's HTTP/3 server, for `quic` listeners.
    pub quic_origin: Option<Origin>,
}

/// An origin address as written (`10.0.0.5:80` or `origin.internal:80`). Names are resolved at
/// connect time, as nginx does with a variable `proxy_pass`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Origin {
    authority: Authority,
    /// The address, when the origin is written as one (parsed here, not per connection).
    addr: Option<SocketAddr>,
}

impl Origin {
    /// Accepts `ip:port`, `[v6]:port` or `name:port`.
    pub fn parse(text: &str) -> Option<Origin> {
        let authority: Authority = text.parse().ok()?;
        authority.port_u16()?;
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Some(Origin {
                authority,
                addr: Some(addr),
            });
        }
        match host::parse_host(authority.host().as_bytes()) {
            Ok(Host::Name(_)) => Some(Origin {
                authority,
                addr: None,
            }),
            _ => None,
        }
    }

    pub fn as_str(&self) -> &str {
        self.authority.as_str()
    }

    /// The origin as a URI authority (cheap to clone), for building upstream request URIs.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// The socket address when the origin is an `ip:port`; `None` for a name, resolved at connect.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        self.addr
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockPageConfig {
    pub status: u16,
    /// `None`: the built-in page (the shipped `config/block.html`).
    pub template: Option<PathBuf>,
    pub redirect: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub block: TlsBlock,
    pub max_client_hello: usize,
    pub client_hello_timeout: Duration,
    pub block_cert: Option<PathBuf>,
    pub block_key: Option<PathBuf>,
}

/// The `[quic]` section: how `quic` listeners treat flows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuicConfig {
    pub block: QuicBlock,
    /// An allowed flow ends after this long without a datagram either way.
    pub flow_idle_timeout: Duration,
    /// Flows (pending and allowed) one listener socket tracks at once; more new flows are dropped.
    pub max_flows: usize,
    /// The ClientHello must be complete within this from a flow's first datagram.
    pub initial_timeout: Duration,
    /// New flows (each a key derivation and a decryption) one listening socket starts per
    /// second, with a burst of as many; Initials past it are dropped before any cryptography.
    pub new_flows_per_second: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub idle_timeout: Duration,
    pub origin_connect_timeout: Duration,
    pub origin_response_timeout: Duration,
    pub drain_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub bind: SocketAddr,
    /// One token with the role `write` (named `token_file` in the audit log).
    pub token_file: Option<PathBuf>,
    /// Named tokens with roles, one `NAME ROLE TOKEN` a line; read again on SIGHUP.
    pub tokens_file: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
    /// Certificate and key (PEM) to serve the admin listener over TLS; required with `client_ca`.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// The largest share of the entries a full replace or a batch may remove without
    /// `?allow_shrink=true`.
    pub max_shrink: Share,
}

/// A share of a whole, in parts per million (`max_shrink = "10%"` is 100 000).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share(pub u32);

impl Share {
    pub const WHOLE: u32 = 1_000_000;

    /// Whether `part` of `whole` is at most this share.
    pub fn admits(self, part: usize, whole: usize) -> bool {
        part as u128 * u128::from(Share::WHOLE) <= whole as u128 * u128::from(self.0)
    }
}

impl std::fmt::Display for Share {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pct = f64::from(self.0) / 10_000.0;
        write!(f, "{pct}%")
    }
}

/// A built-in origin for demonstrations: answers every request with a short text page naming
/// the host it received. Not for production; it exists so the README's first command shows a
/// forwarded request with nothing else running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoOriginConfig {
    pub http: Option<SocketAddr>,
    /// HTTPS side, with its certificate and key (PEM).
    pub tls: Option<(SocketAddr, PathBuf, PathBuf)>,
}

/// `[fleet]`: the registry comes from a NATS JetStream stream shared by every node
/// (docs/fleet.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetConfig {
    /// NATS server URLs (`nats://host:port`, `tls://host:port`).
    pub servers: Vec<String>,
    /// The change stream, created when missing (with `subject` as its one subject).
    pub stream: String,
    pub subject: String,
    /// The object store bucket for snapshots and large changes.
    pub snapshots: String,
    /// This node's name in logs, metrics and snapshot metadata.
    pub node: String,
    /// JetStream domain of `stream` and `snapshots`, when they live behind a leaf node.
    pub domain: Option<String>,
    /// A stream holding the same messages as `stream` (a site-local mirror) to consume from.
    pub read_stream: Option<String>,
    /// NATS credentials file (user JWT and nkey seed).
    pub credentials: Option<PathBuf>,
    /// NATS user name and the file holding its password (the server's `authorization.users`).
    pub user: Option<(String, PathBuf)>,
    /// CA to verify the NATS server with (PEM).
    pub tls_ca: Option<PathBuf>,
    /// Client certificate and key for mutual TLS (PEM).
    pub tls_client: Option<(PathBuf, PathBuf)>,
    /// Changes between snapshots this node writes to the bucket; 0: it writes none.
    pub snapshot_every: u64,
    /// Replicas of the stream and bucket when this node creates them.
    pub replicas: usize,
}

impl Config {
    /// The listener called `name`.
    pub fn listener(&self, name: &str) -> Option<&ListenerConfig> {
        self.listeners.iter().find(|l| l.name == name)
    }
}
