//! From the file as written to a [`Config`]: paths resolved against the config's folder, files
//! the config names checked readable now, and what types cannot express refused with the key.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;

use super::file::*;
use super::model::*;
use super::template;
use crate::wire::host::{self, Host};

impl Config {
    /// Reads, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates TOML text; `path` names the file in errors and anchors relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            file: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        Validator {
            file: path,
            base: path.parent().unwrap_or(Path::new("")),
        }
        .validate(raw)
    }
}

struct Validator<'a> {
    file: &'a Path,
    base: &'a Path,
}

impl Validator<'_> {
    fn err(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_path_buf(),
            key: key.into(),
            message: message.into(),
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.base.join(p)
    }

    /// A file the config names must exist and be readable now, not at the first request.
    fn readable_file(&self, key: &str, p: &str) -> Result<PathBuf, ConfigError> {
        let path = self.path(p);
        std::fs::File::open(&path)
            .map_err(|e| self.err(key, format!("cannot read {}: {e}", path.display())))?;
        Ok(path)
    }

    fn validate(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let registry = RegistryConfig {
            state_dir: self.path(&raw.registry.state_dir),
            seed: match &raw.registry.seed {
                Some(seed) => Some(self.readable_file("registry.seed", seed)?),
                None => None,
            },
        };
        let policy = self.policy(raw.policy)?;
        let listeners = self.listeners(raw.listener)?;
        let routes = self.routes(raw.route, &listeners)?;
        let block_page = self.block_page(raw.block_page)?;
        let tls = self.tls(raw.tls)?;
        let quic = self.quic(raw.quic)?;
        let limits = self.limits(raw.limits)?;
        let admin = raw.admin.map(|a| self.admin(a)).transpose()?;
        let demo_origin = raw.demo_origin.map(|d| self.demo_origin(d)).transpose()?;
        let fleet = raw.fleet.map(|f| self.fleet(f)).transpose()?;
        self.distinct_binds(&listeners, admin.as_ref(), demo_origin.as_ref())?;
        Ok(Config {
            path: self.file.to_path_buf(),
            registry,
            policy,
            listeners,
            routes,
            block_page,
            tls,
            quic,
            limits,
            admin,
            demo_origin,
            fleet,
        })
    }

    fn policy(&self, raw: RawPolicy) -> Result<PolicyConfig, ConfigError> {
        let mut exempt = Vec::new();
        for (i, name) in raw.exempt.iter().enumerate() {
            match host::parse_host(name.as_bytes()) {
                // Rule 5 comes before the registry: a suffix would let every site under it pass.
                Ok(Host::Name(n)) if host::registrable_domain(&n).is_none() => {
                    return Err(self.err(
                        format!("policy.exempt[{i}]"),
                        format!(
                            "{name:?} is a public suffix (or has no registrable domain): it would \
                             exempt every site under it; exempt a registrable domain such as \
                             example.{n}"
                        ),
                    ));
                }
                Ok(Host::Name(n)) => exempt.push(n.into_owned()),
                Ok(Host::Ip(_)) => {
                    return Err(self.err(
                        format!("policy.exempt[{i}]"),
                        format!("{name:?} is an IP address; exemptions are domain names"),
                    ));
                }
                Err(e) => {
                    return Err(self.err(format!("policy.exempt[{i}]"), format!("{name:?}: {e}")));
                }
            }
        }
        Ok(PolicyConfig {
            mode: raw.mode,
            ip_literal: raw.ip_literal,
            no_sni: raw.no_sni,
            exempt,
        })
    }

    fn share(&self, key: &str, raw: &RawShare) -> Result<Share, ConfigError> {
        let fraction = match raw {
            RawShare::Fraction(f) => Some(*f),
            RawShare::Text(t) => t
                .trim()
                .strip_suffix('%')
                .and_then(|n| n.trim().parse::<f64>().ok())
                .map(|pct| pct / 100.0),
        };
        match fraction {
            Some(f) if (0.0..=1.0).contains(&f) => {
                Ok(Share((f * f64::from(Share::WHOLE)).round() as u32))
            }
            _ => Err(self.err(
                key,
                "a share from 0 to 1 (0.1) or a percentage from 0% to 100% (\"10%\")",
            )),
        }
    }

    fn admin(&self, a: RawAdmin) -> Result<AdminConfig, ConfigError> {
        Ok(AdminConfig {
            max_shrink: match &a.max_shrink {
                Some(raw) => self.share("admin.max_shrink", raw)?,
                None => Share(Share::WHOLE / 10),
            },
            bind: a.bind,
            token_file: match &a.token_file {
                Some(p) => Some(self.readable_file("admin.token_file", p)?),
                None => None,
            },
            tokens_file: match &a.tokens_file {
                Some(p) => Some(self.readable_file("admin.tokens_file", p)?),
                None => None,
            },
            client_ca: match &a.client_ca {
                Some(p) => Some(self.readable_file("admin.client_ca", p)?),
                None => None,
            },
            tls: match (&a.tls_cert, &a.tls_key, &a.client_ca) {
                (Some(c), Some(k), _) => Some((
                    self.readable_file("admin.tls_cert", c)?,
                    self.readable_file("admin.tls_key", k)?,
                )),
                (None, None, None) => None,
                (None, None, Some(_)) => {
                    return Err(self.err(
                        "admin.client_ca",
                        "mTLS needs admin.tls_cert and admin.tls_key for the listener itself",
                    ));
                }
                (Some(_), None, _) => {
                    return Err(self.err("admin.tls_key", "required with admin.tls_cert"));
                }
                (None, Some(_), _) => {
                    return Err(self.err("admin.tls_cert", "required with admin.tls_key"));
                }
            },
        })
    }

    fn demo_origin(&self, d: RawDemoOrigin) -> Result<DemoOriginConfig, ConfigError> {
        Ok(DemoOriginConfig {
            http: d.http,
            tls: match (d.tls, &d.tls_cert, &d.tls_key) {
                (Some(addr), Some(cert), Some(key)) => Some((
                    addr,
                    self.readable_file("demo_origin.tls_cert", cert)?,
                    self.readable_file("demo_origin.tls_key", key)?,
                )),
                (None, None, None) => None,
                _ => {
                    return Err(
                        self.err("demo_origin.tls", "tls, tls_cert and tls_key go together")
                    );
                }
            },
        })
    }

    fn fleet(&self, f: RawFleet) -> Result<FleetConfig, ConfigError> {
        if f.servers.is_empty() {
            return Err(self.err("fleet.servers", "at least one NATS server URL"));
        }
        for (i, url) in f.servers.iter().enumerate() {
            match url.parse::<async_nats::ServerAddr>() {
                Ok(addr) if !addr.host().is_empty() => {}
                Ok(_) => {
                    return Err(
                        self.err(format!("fleet.servers[{i}]"), format!("{url:?}: no host"))
                    );
                }
                Err(e) => {
                    return Err(self.err(format!("fleet.servers[{i}]"), format!("{url:?}: {e}")));
                }
            }
        }
        let name = |key: &str, v: &str| -> Result<(), ConfigError> {
            if v.is_empty()
                || !v
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return Err(self.err(
                    key,
                    format!("{v:?}: letters, digits, '_' and '-' only (a JetStream name)"),
                ));
            }
            Ok(())
        };
        name("fleet.stream", &f.stream)?;
        name("fleet.snapshots", &f.snapshots)?;
        if let Some(d) = &f.domain {
            name("fleet.domain", d)?;
        }
        if let Some(r) = &f.read_stream {
            name("fleet.read_stream", r)?;
        }
        if f.subject.is_empty()
            || f.subject.split('.').any(|t| {
                t.is_empty() || t == "*" || t == ">" || t.bytes().any(|b| b.is_ascii_whitespace())
            })
        {
            return Err(self.err(
                "fleet.subject",
                format!(
                    "{:?}: one subject, dot-separated tokens, no wildcards",
                    f.subject
                ),
            ));
        }
        let node = match f.node {
            Some(n) if n.trim().is_empty() => return Err(self.err("fleet.node", "empty")),
            Some(n) => n,
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "icp-gate".into()),
        };
        if !(1..=5).contains(&f.replicas) {
            return Err(self.err("fleet.replicas", "1 to 5"));
        }
        let file = |key: &str, p: &Option<String>| -> Result<Option<PathBuf>, ConfigError> {
            p.as_deref().map(|p| self.readable_file(key, p)).transpose()
        };
        let tls_client = match (&f.tls_cert, &f.tls_key) {
            (Some(c), Some(k)) => Some((
                self.readable_file("fleet.tls_cert", c)?,
                self.readable_file("fleet.tls_key", k)?,
            )),
            (None, None) => None,
            (Some(_), None) => {
                return Err(self.err("fleet.tls_key", "required with fleet.tls_cert"));
            }
            (None, Some(_)) => {
                return Err(self.err("fleet.tls_cert", "required with fleet.tls_key"));
            }
        };
        let user = match (f.user, &f.password_file) {
            (Some(u), Some(p)) if !u.is_empty() => {
                Some((u, self.readable_file("fleet.password_file", p)?))
            }
            (Some(_), Some(_)) => return Err(self.err("fleet.user", "empty")),
            (None, None) => None,
            (Some(_), None) => {
                return Err(self.err("fleet.password_file", "required with fleet.user"));
            }
            (None, Some(_)) => {
                return Err(self.err("fleet.user", "required with fleet.password_file"));
            }
        };
        if user.is_some() && f.credentials.is_some() {
            return Err(self.err(
                "fleet.user",
                "either fleet.credentials or fleet.user, not both",
            ));
        }
        Ok(FleetConfig {
            servers: f.servers,
            stream: f.stream,
            subject: f.subject,
            snapshots: f.snapshots,
            node,
            domain: f.domain,
            read_stream: f.read_stream,
            credentials: file("fleet.credentials", &f.credentials)?,
            user,
            tls_ca: file("fleet.tls_ca", &f.tls_ca)?,
            tls_client,
            snapshot_every: f.snapshot_every,
            replicas: f.replicas,
        })
    }

    /// Every socket the process binds must be distinct.
    fn distinct_binds(
        &self,
        listeners: &[ListenerConfig],
        admin: Option<&AdminConfig>,
        demo_origin: Option<&DemoOriginConfig>,
    ) -> Result<(), ConfigError> {
        // (key, address, UDP): a UDP listener may share a TCP listener's address.
        let mut binds: Vec<(String, SocketAddr, bool)> = listeners
            .iter()
            .enumerate()
            .map(|(i, l)| (format!("listener[{i}].bind"), l.bind, l.kind.is_udp()))
            .collect();
        if let Some(a) = admin {
            binds.push(("admin.bind".into(), a.bind, false));
        }
        if let Some(addr) = demo_origin.and_then(|d| d.http) {
            binds.push(("demo_origin.http".into(), addr, false));
        }
        if let Some((addr, _, _)) = demo_origin.and_then(|d| d.tls.as_ref()) {
            binds.push(("demo_origin.tls".into(), *addr, false));
        }
        for (i, (key, addr, udp)) in binds.iter().enumerate() {
            if let Some((other, _, _)) = binds[..i]
                .iter()
                .find(|(_, a, u)| u == udp && binds_overlap(*a, *addr))
            {
                return Err(self.err(key, format!("{addr} overlaps {other}")));
            }
        }
        Ok(())
    }

    fn listeners(&self, raw: Vec<RawListener>) -> Result<Vec<ListenerConfig>, ConfigError> {
        if raw.is_empty() {
            return Err(self.err("listener", "at least one [[listener]] is required"));
        }
        let mut names = HashSet::new();
        let mut out = Vec::with_capacity(raw.len());
        for (i, l) in raw.into_iter().enumerate() {
            // Names become metric label values and log fields: keep them plain.
            let plain = !l.name.is_empty()
                && l.name.len() <= 64
                && l.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !plain {
                return Err(self.err(
                    format!("listener[{i}].name"),
                    format!("{:?}: use 1-64 letters, digits, '-' or '_'", l.name),
                ));
            }
            if l.kind == ListenerKind::Quic && l.proxy_protocol {
                return Err(self.err(
                    format!("listener[{i}].proxy_protocol"),
                    "not for quic listeners: PROXY protocol headers come on TCP connections",
                ));
            }
            if l.kind == ListenerKind::Quic && l.defer_accept == Some(true) {
                return Err(self.err(
                    format!("listener[{i}].defer_accept"),
                    "not for quic listeners: UDP has no connections to accept",
                ));
            }
            if !names.insert(l.name.clone()) {
                return Err(self.err(
                    format!("listener[{i}].name"),
                    format!("{:?} is used by another listener", l.name),
                ));
            }
            out.push(ListenerConfig {
                name: l.name,
                bind: l.bind,
                kind: l.kind,
                proxy_protocol: l.proxy_protocol,
                defer_accept: l.defer_accept.unwrap_or(!l.kind.is_udp()),
            });
        }
        Ok(out)
    }

    fn routes(
        &self,
        raw: Vec<RawRoute>,
        listeners: &[ListenerConfig],
    ) -> Result<Vec<RouteConfig>, ConfigError> {
        if raw.is_empty() {
            return Err(self.err("route", "at least one [[route]] is required"));
        }
        let has_http = listeners.iter().any(|l| l.kind == ListenerKind::Http);
        let has_tls = listeners.iter().any(|l| l.kind == ListenerKind::Tls);
        let has_quic = listeners.iter().any(|l| l.kind == ListenerKind::Quic);
        let mut seen = HashSet::new();
        let mut out = Vec::with_capacity(raw.len());
        for (i, r) in raw.into_iter().enumerate() {
            let dst: IpNet = r.dst.parse().map_err(|_| {
                self.err(
                    format!("route[{i}].dst"),
                    format!("{:?} is not an IP prefix like 10.0.0.0/8", r.dst),
                )
            })?;
            if dst != dst.trunc() {
                return Err(self.err(
                    format!("route[{i}].dst"),
                    format!("{dst} has host bits set; did you mean {}?", dst.trunc()),
                ));
            }
            if !seen.insert(dst) {
                return Err(self.err(format!("route[{i}].dst"), format!("{dst} is listed twice")));
            }
            let http_origin = self.origin(&format!("route[{i}].http_origin"), r.http_origin)?;
            let tls_origin = self.origin(&format!("route[{i}].tls_origin"), r.tls_origin)?;
            let quic_origin = self.origin(&format!("route[{i}].quic_origin"), r.quic_origin)?;
            if has_http && http_origin.is_none() {
                return Err(self.err(
                    format!("route[{i}].http_origin"),
                    "required: an http listener forwards allowed requests there",
                ));
            }
            if has_tls && tls_origin.is_none() {
                return Err(self.err(
                    format!("route[{i}].tls_origin"),
                    "required: a tls listener passes allowed connections through there",
                ));
            }
            if has_quic && quic_origin.is_none() {
                return Err(self.err(
                    format!("route[{i}].quic_origin"),
                    "required: a quic listener relays allowed flows there",
                ));
            }
            // Off the mainland nothing is looked up, so the key would be silently ignored.
            if !r.mainland && r.require_access_here.is_some() {
                return Err(self.err(
                    format!("route[{i}].require_access_here"),
                    "only for mainland routes: a route with mainland = false looks nothing up",
                ));
            }
            out.push(RouteConfig {
                dst,
                mainland: r.mainland,
                x_forwarded_for: r.x_forwarded_for,
                send_proxy_protocol: r.send_proxy_protocol,
                mode: r.mode,
                require_access_here: r.require_access_here.unwrap_or(true),
                http_origin,
                tls_origin,
                quic_origin,
            });
        }
        Ok(out)
    }

    fn origin(&self, key: &str, raw: Option<String>) -> Result<Option<Origin>, ConfigError> {
        let Some(text) = raw else { return Ok(None) };
        match Origin::parse(&text) {
            Some(origin) => Ok(Some(origin)),
            None => Err(self.err(key, format!("{text:?} is not host:port"))),
        }
    }

    fn block_page(&self, raw: RawBlockPage) -> Result<BlockPageConfig, ConfigError> {
        // A block answer must carry a body, so statuses that forbid one are refused.
        if !(200..=599).contains(&raw.status) || matches!(raw.status, 204 | 205 | 304) {
            return Err(self.err(
                "block_page.status",
                format!(
                    "{} cannot carry a block page (use 200-599 except 204, 205, 3xx)",
                    raw.status
                ),
            ));
        }
        if (300..400).contains(&raw.status) {
            return Err(self.err(
                "block_page.status",
                format!("{}: for a redirect set block_page.redirect", raw.status),
            ));
        }
        let template = match &raw.template {
            Some(p) => {
                let path = self.readable_file("block_page.template", p)?;
                template::check_template_file(&path)
                    .map_err(|e| self.err("block_page.template", e))?;
                Some(path)
            }
            None => None,
        };
        if let Some(url) = &raw.redirect {
            let ok = (url.starts_with("https://") || url.starts_with("http://"))
                && url.bytes().all(|b| b.is_ascii_graphic());
            if !ok {
                return Err(self.err(
                    "block_page.redirect",
                    format!("{url:?} is not an absolute http(s) URL without spaces"),
                ));
            }
            template::check_redirect(url).map_err(|e| self.err("block_page.redirect", e))?;
        }
        Ok(BlockPageConfig {
            status: raw.status,
            template,
            redirect: raw.redirect,
        })
    }

    fn tls(&self, raw: RawTls) -> Result<TlsConfig, ConfigError> {
        if !(512..=1 << 20).contains(&raw.max_client_hello) {
            return Err(self.err(
                "tls.max_client_hello",
                format!("{} is outside 512..=1048576 bytes", raw.max_client_hello),
            ));
        }
        if raw.client_hello_timeout.0.is_zero() {
            return Err(self.err("tls.client_hello_timeout", "must be more than 0"));
        }
        let (block_cert, block_key) = match (&raw.block_cert, &raw.block_key) {
            (Some(c), Some(k)) => (
                Some(self.readable_file("tls.block_cert", c)?),
                Some(self.readable_file("tls.block_key", k)?),
            ),
            (None, None) => (None, None),
            (Some(_), None) => {
                return Err(self.err("tls.block_key", "required with tls.block_cert"));
            }
            (None, Some(_)) => {
                return Err(self.err("tls.block_cert", "required with tls.block_key"));
            }
        };
        Ok(TlsConfig {
            block: raw.block,
            max_client_hello: raw.max_client_hello,
            client_hello_timeout: raw.client_hello_timeout.0,
            block_cert,
            block_key,
        })
    }

    fn quic(&self, raw: RawQuic) -> Result<QuicConfig, ConfigError> {
        if raw.max_flows == 0 {
            return Err(self.err("quic.max_flows", "must be at least 1"));
        }
        if raw.new_flows_per_second == 0 {
            return Err(self.err("quic.new_flows_per_second", "must be at least 1"));
        }
        for (key, d) in [
            ("quic.flow_idle_timeout", raw.flow_idle_timeout),
            ("quic.initial_timeout", raw.initial_timeout),
        ] {
            if d.0.is_zero() {
                return Err(self.err(key, "must be more than 0"));
            }
        }
        Ok(QuicConfig {
            block: raw.block,
            flow_idle_timeout: raw.flow_idle_timeout.0,
            max_flows: raw.max_flows,
            initial_timeout: raw.initial_timeout.0,
            new_flows_per_second: raw.new_flows_per_second,
        })
    }

    fn limits(&self, raw: RawLimits) -> Result<Limits, ConfigError> {
        if raw.max_connections == 0 {
            return Err(self.err("limits.max_connections", "must be at least 1"));
        }
        // hyper's HTTP/1 read buffer cannot be smaller than 8 KiB.
        if !(8192..=16 << 20).contains(&raw.max_header_bytes) {
            return Err(self.err(
                "limits.max_header_bytes",
                format!("{} is outside 8192..=16777216", raw.max_header_bytes),
            ));
        }
        for (key, d) in [
            ("limits.header_read_timeout", raw.header_read_timeout),
            ("limits.idle_timeout", raw.idle_timeout),
            ("limits.origin_connect_timeout", raw.origin_connect_timeout),
            (
                "limits.origin_response_timeout",
                raw.origin_response_timeout,
            ),
        ] {
            if d.0.is_zero() {
                return Err(self.err(key, "must be more than 0"));
            }
        }
        Ok(Limits {
            max_connections: raw.max_connections,
            header_read_timeout: raw.header_read_timeout.0,
            max_header_bytes: raw.max_header_bytes,
            idle_timeout: raw.idle_timeout.0,
            origin_connect_timeout: raw.origin_connect_timeout.0,
            origin_response_timeout: raw.origin_response_timeout.0,
            drain_timeout: raw.drain_timeout.0,
        })
    }
}

/// Two binds collide when they share a port and one address covers the other. Port 0 (pick any)
/// never collides, so tests can bind several ephemeral ports.
fn binds_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MINIMAL: &str = r#"
[registry]
state_dir = "var/registry"

[[listener]]
name = "http"
bind = "127.0.0.1:8080"
kind = "http"

[[route]]
dst = "127.0.0.0/8"
mainland = true
http_origin = "127.0.0.1:9080"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/icp-gate/icp-gate.toml"))
    }

    fn error(text: &str) -> String {
        parse(text)
            .expect_err("config must be rejected")
            .to_string()
    }

    #[test]
    fn minimal_config_gets_the_spec_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(
            c.registry.state_dir,
            Path::new("/etc/icp-gate/var/registry")
        );
        assert_eq!(c.policy.mode, Mode::Enforce);
        assert_eq!(c.policy.ip_literal, Action::Allow);
        assert_eq!(c.policy.no_sni, Action::Block);
        assert_eq!(c.block_page.status, 403);
        assert_eq!(c.tls.block, TlsBlock::Alert);
        assert_eq!(c.tls.max_client_hello, 16384);
        assert_eq!(c.tls.client_hello_timeout, Duration::from_secs(10));
        assert_eq!(c.limits.max_connections, 100_000);
        assert_eq!(c.limits.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.limits.max_header_bytes, 65536);
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.limits.origin_connect_timeout, Duration::from_secs(3));
        assert_eq!(c.limits.origin_response_timeout, Duration::from_secs(60));
        assert_eq!(c.limits.drain_timeout, Duration::from_secs(30));
        assert!(c.routes[0].x_forwarded_for);
        assert_eq!(c.routes[0].send_proxy_protocol, None);
        assert!(c.routes[0].require_access_here);
    }

    #[test]
    fn require_access_here_is_a_mainland_route_key() {
        let waived = MINIMAL.replace(
            "mainland = true",
            "mainland = true\nrequire_access_here = false",
        );
        assert!(!parse(&waived).unwrap().routes[0].require_access_here);
        let explicit = MINIMAL.replace(
            "mainland = true",
            "mainland = true\nrequire_access_here = true",
        );
        assert!(parse(&explicit).unwrap().routes[0].require_access_here);

        // Where nothing is looked up the key means nothing: refused, either value.
        for value in ["false", "true"] {
            let abroad = format!(
                "{MINIMAL}\n[[route]]\ndst = \"192.0.2.0/24\"\nmainland = false\nrequire_access_here = {value}\nhttp_origin = \"127.0.0.1:1\"\n"
            );
            let e = error(&abroad);
            assert!(
                e.starts_with("/etc/icp-gate/icp-gate.toml: route[1].require_access_here: "),
                "{e}"
            );
        }
        let abroad = format!(
            "{MINIMAL}\n[[route]]\ndst = \"192.0.2.0/24\"\nmainland = false\nhttp_origin = \"127.0.0.1:1\"\n"
        );
        assert!(parse(&abroad).unwrap().routes[1].require_access_here);
        let e = error(&MINIMAL.replace(
            "mainland = true",
            "mainland = true\nrequire_access_here = \"no\"",
        ));
        assert!(e.contains("require_access_here"), "{e}");
    }

    #[test]
    fn fleet_keys_have_defaults_and_errors_name_the_key() {
        assert_eq!(parse(MINIMAL).unwrap().fleet, None);
        let c = parse(&format!(
            "{MINIMAL}\n[fleet]\nservers = [\"nats://127.0.0.1:4222\"]\nnode = \"edge-1\"\n"
        ))
        .unwrap();
        let f = c.fleet.unwrap();
        assert_eq!(f.servers, ["nats://127.0.0.1:4222"]);
        assert_eq!(f.stream, "ICP_REGISTRY");
        assert_eq!(f.subject, "icp.registry.changes");
        assert_eq!(f.snapshots, "ICP_REGISTRY_SNAPSHOTS");
        assert_eq!(f.node, "edge-1");
        assert_eq!(f.snapshot_every, 100_000);
        assert_eq!(f.replicas, 1);
        assert_eq!((f.domain, f.read_stream, f.credentials), (None, None, None));
        for (fleet, key) in [
            ("servers = []", "fleet.servers"),
            ("servers = [\"nats://\"]", "fleet.servers[0]"),
            (
                "servers = [\"nats://a:1\", \"http://b:2\"]",
                "fleet.servers[1]",
            ),
            (
                "servers = [\"nats://a:1\"]\nstream = \"A.B\"",
                "fleet.stream",
            ),
            (
                "servers = [\"nats://a:1\"]\nsubject = \"icp.*\"",
                "fleet.subject",
            ),
            ("servers = [\"nats://a:1\"]\nreplicas = 7", "fleet.replicas"),
            (
                "servers = [\"nats://a:1\"]\ncredentials = \"nope.creds\"",
                "fleet.credentials",
            ),
            (
                "servers = [\"nats://a:1\"]\ntls_cert = \"c.pem\"",
                "fleet.tls_key",
            ),
            (
                "servers = [\"nats://a:1\"]\nuser = \"reader\"",
                "fleet.password_file",
            ),
            (
                "servers = [\"nats://a:1\"]\npassword_file = \"/etc/hostname\"",
                "fleet.user",
            ),
            (
                "servers = [\"nats://a:1\"]\nuser = \"r\"\npassword_file = \"nope\"",
                "fleet.password_file",
            ),
            ("servers = [\"nats://a:1\"]\nstrem = \"X\"", "strem"),
        ] {
            let e = error(&format!("{MINIMAL}\n[fleet]\n{fleet}\n"));
            assert!(e.starts_with("/etc/icp-gate/icp-gate.toml: "), "{e}");
            assert!(e.contains(key), "{fleet}: {e}");
        }
    }

    #[test]
    fn unknown_keys_name_the_file_and_key() {
        let e = error(&format!("{MINIMAL}\n[limits]\nmax_conections = 5\n"));
        assert!(e.starts_with("/etc/icp-gate/icp-gate.toml: "), "{e}");
        assert!(e.contains("max_conections"), "{e}");
        let e = error(&MINIMAL.replace("mainland = true", "mainland = true\nmainlnd = 1"));
        assert!(e.contains("mainlnd"), "{e}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let cases = [
            (
                MINIMAL.replace("127.0.0.0/8", "127.0.0.0/33"),
                "route[0].dst",
            ),
            (
                MINIMAL.replace("127.0.0.0/8", "127.0.0.1/8"),
                "route[0].dst",
            ),
            (
                MINIMAL.replace("\"127.0.0.1:9080\"", "\"nope\""),
                "route[0].http_origin",
            ),
            (
                MINIMAL.replace("name = \"http\"", "name = \"h t\""),
                "listener[0].name",
            ),
            (
                format!("{MINIMAL}[limits]\nmax_header_bytes = 100\n"),
                "limits.max_header_bytes",
            ),
            (
                format!("{MINIMAL}[limits]\nmax_connections = 0\n"),
                "limits.max_connections",
            ),
            (
                format!("{MINIMAL}[block_page]\nstatus = 302\n"),
                "block_page.status",
            ),
            (
                format!("{MINIMAL}[block_page]\nredirect = \"ftp://x\"\n"),
                "block_page.redirect",
            ),
            (
                format!("{MINIMAL}[policy]\nexempt = [\"a..b\"]\n"),
                "policy.exempt[0]",
            ),
            (
                format!("{MINIMAL}[tls]\nblock_cert = \"x.pem\"\n"),
                "tls.block_key",
            ),
            (
                format!("{MINIMAL}[block_page]\ntemplate = \"missing.html\"\n"),
                "block_page.template",
            ),
        ];
        for (text, key) in cases {
            let e = error(&text);
            assert!(
                e.contains(&format!(": {key}: ")),
                "expected key {key} in {e}"
            );
        }
        let e = error(&format!("{MINIMAL}[limits]\nidle_timeout = \"soon\"\n"));
        assert!(
            e.contains("idle_timeout") && e.contains("bad duration"),
            "{e}"
        );
        let e = error(&MINIMAL.replace("kind = \"http\"", "kind = \"udp\""));
        assert!(e.contains("udp"), "{e}");
    }

    #[test]
    fn exempting_a_public_suffix_is_an_error() {
        for (suffix, key) in [
            ("cn", "policy.exempt[0]"),
            ("com.cn", "policy.exempt[0]"),
            ("COM.CN.", "policy.exempt[0]"),
            ("公司.cn", "policy.exempt[0]"),
        ] {
            let e = error(&format!("{MINIMAL}[policy]\nexempt = [{suffix:?}]\n"));
            assert!(
                e.starts_with(&format!("/etc/icp-gate/icp-gate.toml: {key}: ")),
                "{e}"
            );
            assert!(e.contains("public suffix"), "{e}");
        }
        let e = error(&format!(
            "{MINIMAL}[policy]\nexempt = [\"console.example.com.cn\", \"gov.cn\"]\n"
        ));
        assert!(
            e.contains("policy.exempt[1]: \"gov.cn\" is a public suffix"),
            "{e}"
        );
        // A registrable domain or a name under one is fine.
        let c = parse(&format!(
            "{MINIMAL}[policy]\nexempt = [\"example.com.cn\", \"a.b.example.cn\"]\n"
        ))
        .unwrap();
        assert_eq!(c.policy.exempt, ["example.com.cn", "a.b.example.cn"]);
    }

    #[test]
    fn block_page_templates_must_be_filled_and_use_known_placeholders() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("icp-gate.toml");
        let template = dir.path().join("block.html");
        let with = |page: &str| {
            std::fs::write(&template, page).unwrap();
            Config::parse(
                &format!("{MINIMAL}[block_page]\ntemplate = \"block.html\"\n"),
                &config,
            )
        };
        let key = format!("{}: block_page.template: ", config.display());
        let e = with("<p>{host}</p>\n<p>{hots}</p>\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with(&key), "{e}");
        assert!(
            e.contains(&format!(
                "{} line 2: unknown placeholder {{hots}}; did you mean {{host}}?",
                template.display()
            )),
            "{e}"
        );
        for empty in ["", "\n  \n"] {
            let e = with(empty).unwrap_err().to_string();
            assert!(e.starts_with(&key) && e.contains("is empty"), "{e}");
        }
        // CSS braces and every real placeholder are fine, as is the built-in page.
        with("<style>p { color: red }</style>{host}{reason}{time}").unwrap();
        with(include_str!("../../config/block.html")).unwrap();

        let e = error(&format!(
            "{MINIMAL}[block_page]\nredirect = \"https://beian.example/?d={{hots}}\"\n"
        ));
        assert!(
            e.contains(": block_page.redirect: ") && e.contains("unknown placeholder {hots}"),
            "{e}"
        );
    }

    #[test]
    fn admin_max_shrink_as_a_fraction_or_a_percentage() {
        let with = |v: &str| format!("{MINIMAL}\n[admin]\nbind = \"127.0.0.1:9\"\n{v}");
        let share = |v: &str| parse(&with(v)).unwrap().admin.unwrap().max_shrink;
        assert_eq!(share(""), Share(100_000), "default 10 %");
        assert_eq!(share("max_shrink = 0.25"), Share(250_000));
        assert_eq!(share("max_shrink = \"2.5%\""), Share(25_000));
        assert_eq!(share("max_shrink = 1"), Share(1_000_000));
        for bad in [
            "max_shrink = 1.5",
            "max_shrink = \"ten\"",
            "max_shrink = \"-1%\"",
        ] {
            let e = error(&with(bad));
            assert!(e.contains(": admin.max_shrink: "), "{bad}: {e}");
        }
        assert!(Share(100_000).admits(1, 10));
        assert!(!Share(100_000).admits(2, 10));
        assert!(Share(0).admits(0, 0));
        assert_eq!(Share(25_000).to_string(), "2.5%");
    }

    #[test]
    fn overlapping_binds_and_duplicate_prefixes_are_rejected() {
        let two = format!(
            "{MINIMAL}\n[[listener]]\nname = \"other\"\nbind = \"0.0.0.0:8080\"\nkind = \"http\"\n"
        );
        assert!(error(&two).contains("listener[1].bind: 0.0.0.0:8080 overlaps listener[0].bind"));
        let admin = format!("{MINIMAL}\n[admin]\nbind = \"127.0.0.1:8080\"\n");
        assert!(error(&admin).contains("admin.bind"));
        let dup = format!(
            "{MINIMAL}\n[[route]]\ndst = \"127.0.0.0/8\"\nmainland = false\nhttp_origin = \"127.0.0.1:1\"\n"
        );
        assert!(error(&dup).contains("route[1].dst: 127.0.0.0/8 is listed twice"));
        let ephemeral = MINIMAL.replace("127.0.0.1:8080", "127.0.0.1:0")
            + "\n[[listener]]\nname = \"b\"\nbind = \"127.0.0.1:0\"\nkind = \"http\"\n";
        assert!(parse(&ephemeral).is_ok());
    }

    #[test]
    fn tls_listener_requires_tls_origin() {
        let text = format!(
            "{MINIMAL}\n[[listener]]\nname = \"tls\"\nbind = \"127.0.0.1:8443\"\nkind = \"tls\"\n"
        );
        assert!(error(&text).contains("route[0].tls_origin: required"));
    }

    const QUIC: &str =
        "\n[[listener]]\nname = \"quic\"\nbind = \"127.0.0.1:8080\"\nkind = \"quic\"\n";

    #[test]
    fn quic_listener_gets_the_spec_defaults_and_may_share_a_tcp_port() {
        let text = MINIMAL.replace(
            "http_origin = \"127.0.0.1:9080\"",
            "http_origin = \"127.0.0.1:9080\"\nquic_origin = \"127.0.0.1:9443\"",
        ) + QUIC;
        let c = parse(&text).unwrap();
        let l = c.listener("quic").unwrap();
        assert_eq!(l.kind, ListenerKind::Quic);
        assert!(l.kind.is_udp());
        assert_eq!(
            c.routes[0].quic_origin.as_ref().unwrap().as_str(),
            "127.0.0.1:9443"
        );
        assert_eq!(c.quic.block, QuicBlock::Close);
        assert_eq!(c.quic.flow_idle_timeout, Duration::from_secs(30));
        assert_eq!(c.quic.max_flows, 100_000);
        assert_eq!(c.quic.initial_timeout, Duration::from_secs(5));
        assert_eq!(c.quic.new_flows_per_second, 20_000);

        let tuned = format!(
            "{text}\n[quic]\nblock = \"drop\"\nflow_idle_timeout = \"2m\"\nmax_flows = 10\ninitial_timeout = \"250ms\"\nnew_flows_per_second = 7\n"
        );
        let c = parse(&tuned).unwrap();
        assert_eq!(
            c.quic,
            QuicConfig {
                block: QuicBlock::Drop,
                flow_idle_timeout: Duration::from_secs(120),
                max_flows: 10,
                initial_timeout: Duration::from_millis(250),
                new_flows_per_second: 7,
            }
        );

        // Two UDP listeners on one address do collide.
        let twice = format!(
            "{text}{}",
            QUIC.replace("\"quic\"\nbind", "\"quic2\"\nbind")
        );
        assert!(
            error(&twice).contains("listener[2].bind: 127.0.0.1:8080 overlaps listener[1].bind"),
            "{}",
            error(&twice)
        );
    }

    #[test]
    fn quic_keys_are_validated_by_name() {
        let with_origin = MINIMAL.replace(
            "http_origin = \"127.0.0.1:9080\"",
            "http_origin = \"127.0.0.1:9080\"\nquic_origin = \"127.0.0.1:9443\"",
        ) + QUIC;
        let cases = [
            (format!("{MINIMAL}{QUIC}"), "route[0].quic_origin"),
            (
                with_origin.replace("127.0.0.1:9443", "nope"),
                "route[0].quic_origin",
            ),
            (
                with_origin.replace("kind = \"quic\"", "kind = \"quic\"\ndefer_accept = true"),
                "listener[1].defer_accept",
            ),
            (
                with_origin.replace("kind = \"quic\"", "kind = \"quic\"\nproxy_protocol = true"),
                "listener[1].proxy_protocol",
            ),
            (
                format!("{with_origin}[quic]\nmax_flows = 0\n"),
                "quic.max_flows",
            ),
            (
                format!("{with_origin}[quic]\nflow_idle_timeout = \"0s\"\n"),
                "quic.flow_idle_timeout",
            ),
            (
                format!("{with_origin}[quic]\ninitial_timeout = \"0s\"\n"),
                "quic.initial_timeout",
            ),
            (
                format!("{with_origin}[quic]\nnew_flows_per_second = 0\n"),
                "quic.new_flows_per_second",
            ),
        ];
        for (text, key) in cases {
            let e = error(&text);
            assert!(
                e.contains(&format!(": {key}: ")),
                "expected key {key} in {e}"
            );
        }
        let e = error(&format!("{with_origin}[quic]\nblock = \"reset\"\n"));
        assert!(e.contains("reset") && e.contains("block"), "{e}");
        let e = error(&format!("{with_origin}[quic]\nmax_flow = 3\n"));
        assert!(e.contains("max_flow"), "{e}");
        // A wildcard bind is fine: each datagram's destination comes from IP_PKTINFO.
        let wildcard = with_origin.replace(
            "bind = \"127.0.0.1:8080\"\nkind = \"quic\"",
            "bind = \"0.0.0.0:8443\"\nkind = \"quic\"",
        );
        assert_ne!(wildcard, with_origin);
        assert_eq!(
            parse(&wildcard).unwrap().listeners[1].bind.to_string(),
            "0.0.0.0:8443"
        );
    }

    #[test]
    fn exempt_names_are_normalised_and_origins_may_be_names() {
        let text = MINIMAL.replace("\"127.0.0.1:9080\"", "\"origin.internal:80\"")
            + "[policy]\nexempt = [\"Console.例子.中国.\"]\nmode = \"report\"\n";
        let c = parse(&text).unwrap();
        assert_eq!(
            c.policy.exempt,
            vec!["console.xn--fsqu00a.xn--fiqs8s".to_string()]
        );
        assert_eq!(c.policy.mode, Mode::Report);
        assert_eq!(
            c.routes[0].http_origin.as_ref().unwrap().as_str(),
            "origin.internal:80"
        );
    }
}
