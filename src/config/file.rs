//! The config file as written, for serde. Defaults live here, next to the key they belong to.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::model::{Action, ListenerKind, Mode, ProxyProtocolVersion, QuicBlock, TlsBlock};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) registry: RawRegistry,
    #[serde(default)]
    pub(super) policy: RawPolicy,
    #[serde(default)]
    pub(super) listener: Vec<RawListener>,
    #[serde(default)]
    pub(super) route: Vec<RawRoute>,
    #[serde(default)]
    pub(super) block_page: RawBlockPage,
    #[serde(default)]
    pub(super) tls: RawTls,
    #[serde(default)]
    pub(super) quic: RawQuic,
    #[serde(default)]
    pub(super) limits: RawLimits,
    pub(super) admin: Option<RawAdmin>,
    pub(super) demo_origin: Option<RawDemoOrigin>,
    pub(super) fleet: Option<RawFleet>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRegistry {
    pub(super) state_dir: String,
    pub(super) seed: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawPolicy {
    pub(super) mode: Mode,
    pub(super) ip_literal: Action,
    pub(super) no_sni: Action,
    pub(super) exempt: Vec<String>,
}

impl Default for RawPolicy {
    fn default() -> Self {
        RawPolicy {
            mode: Mode::Enforce,
            ip_literal: Action::Allow,
            no_sni: Action::Block,
            exempt: Vec::new(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListener {
    pub(super) name: String,
    pub(super) bind: SocketAddr,
    pub(super) kind: ListenerKind,
    #[serde(default)]
    pub(super) proxy_protocol: bool,
    pub(super) defer_accept: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    pub(super) dst: String,
    pub(super) mainland: bool,
    #[serde(default = "yes")]
    pub(super) x_forwarded_for: bool,
    pub(super) send_proxy_protocol: Option<ProxyProtocolVersion>,
    pub(super) mode: Option<Mode>,
    /// Defaults to `true`; an `Option` so that setting it where nothing is looked up is an error.
    pub(super) require_access_here: Option<bool>,
    pub(super) http_origin: Option<String>,
    pub(super) tls_origin: Option<String>,
    pub(super) quic_origin: Option<String>,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawBlockPage {
    pub(super) status: u16,
    pub(super) template: Option<String>,
    pub(super) redirect: Option<String>,
}

impl Default for RawBlockPage {
    fn default() -> Self {
        RawBlockPage {
            status: 403,
            template: None,
            redirect: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawTls {
    pub(super) block: TlsBlock,
    pub(super) max_client_hello: usize,
    pub(super) client_hello_timeout: Dur,
    pub(super) block_cert: Option<String>,
    pub(super) block_key: Option<String>,
}

impl Default for RawTls {
    fn default() -> Self {
        RawTls {
            block: TlsBlock::Alert,
            max_client_hello: 16384,
            client_hello_timeout: Dur(Duration::from_secs(10)),
            block_cert: None,
            block_key: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawQuic {
    pub(super) block: QuicBlock,
    pub(super) flow_idle_timeout: Dur,
    pub(super) max_flows: usize,
    pub(super) initial_timeout: Dur,
    pub(super) new_flows_per_second: u32,
}

impl Default for RawQuic {
    fn default() -> Self {
        RawQuic {
            block: QuicBlock::Close,
            flow_idle_timeout: Dur(Duration::from_secs(30)),
            max_flows: 100_000,
            initial_timeout: Dur(Duration::from_secs(5)),
            new_flows_per_second: 20_000,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLimits {
    pub(super) max_connections: usize,
    pub(super) header_read_timeout: Dur,
    pub(super) max_header_bytes: usize,
    pub(super) idle_timeout: Dur,
    pub(super) origin_connect_timeout: Dur,
    pub(super) origin_response_timeout: Dur,
    pub(super) drain_timeout: Dur,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            max_connections: 100_000,
            header_read_timeout: Dur(Duration::from_secs(10)),
            max_header_bytes: 65536,
            idle_timeout: Dur(Duration::from_secs(60)),
            origin_connect_timeout: Dur(Duration::from_secs(3)),
            origin_response_timeout: Dur(Duration::from_secs(60)),
            drain_timeout: Dur(Duration::from_secs(30)),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub(super) bind: SocketAddr,
    pub(super) token_file: Option<String>,
    pub(super) tokens_file: Option<String>,
    pub(super) client_ca: Option<String>,
    pub(super) tls_cert: Option<String>,
    pub(super) tls_key: Option<String>,
    pub(super) max_shrink: Option<RawShare>,
}

/// A share written as `"10%"` or as a fraction, `0.1`.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum RawShare {
    Fraction(f64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDemoOrigin {
    pub(super) http: Option<SocketAddr>,
    pub(super) tls: Option<SocketAddr>,
    pub(super) tls_cert: Option<String>,
    pub(super) tls_key: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFleet {
    pub(super) servers: Vec<String>,
    #[serde(default = "default_stream")]
    pub(super) stream: String,
    #[serde(default = "default_subject")]
    pub(super) subject: String,
    #[serde(default = "default_snapshots")]
    pub(super) snapshots: String,
    pub(super) node: Option<String>,
    pub(super) domain: Option<String>,
    pub(super) read_stream: Option<String>,
    pub(super) credentials: Option<String>,
    pub(super) user: Option<String>,
    pub(super) password_file: Option<String>,
    pub(super) tls_ca: Option<String>,
    pub(super) tls_cert: Option<String>,
    pub(super) tls_key: Option<String>,
    #[serde(default = "default_snapshot_every")]
    pub(super) snapshot_every: u64,
    #[serde(default = "default_replicas")]
    pub(super) replicas: usize,
}

fn default_stream() -> String {
    "ICP_REGISTRY".into()
}

fn default_subject() -> String {
    "icp.registry.changes".into()
}

fn default_snapshots() -> String {
    "ICP_REGISTRY_SNAPSHOTS".into()
}

fn default_snapshot_every() -> u64 {
    100_000
}

fn default_replicas() -> usize {
    1
}

/// A duration written as `"10s"`, `"250ms"`, `"1m 30s"`.
#[derive(Clone, Copy)]
pub(super) struct Dur(pub(super) Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text)
            .map(Dur)
            .map_err(|e| serde::de::Error::custom(format!("bad duration {text:?}: {e}")))
    }
}
