//! Long-lived connections allowed by a registry entry: TLS passthrough tunnels and upgraded
//! (WebSocket) HTTP connections. When an update turns a host from allowed to blocked,
//! these close within a second — new requests are decided afresh anyway, tunnels are not.
//!
//! Tunnels are indexed by registrable domain, because every entry that can change a host's
//! decision lies between the host and its registrable domain. After each registry write the
//! writer re-decides only the tunnels under the registrable domains it touched.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use tokio_util::sync::CancellationToken;

use crate::core::decision::{HostInput, Policy, decide};
use crate::registry::Snapshot;
use crate::wire::host;

#[derive(Clone)]
struct Tunnel {
    id: u64,
    host: Arc<str>,
    dst: IpAddr,
    stop: CancellationToken,
}

/// The open tunnels that a registry entry allowed.
#[derive(Default)]
pub(crate) struct LiveTunnels {
    /// foldhash, not SipHash: every filed TLS tunnel registers and unregisters here on its
    /// connection's path. Keys are registrable domains of filed names only, so clients cannot
    /// choose colliding keys beyond what the filing system admits.
    by_registrable: DashMap<Arc<str>, Vec<Tunnel>, foldhash::fast::RandomState>,
    next_id: AtomicU64,
}

/// Keeps a tunnel registered; dropping it unregisters.
pub(crate) struct TunnelGuard {
    tunnels: Arc<LiveTunnels>,
    registrable: Arc<str>,
    id: u64,
}

impl LiveTunnels {
    /// Registers a tunnel to `host` (normalised) at `dst`; `registrable` is the host's
    /// registrable domain (the decision's [`Verdict::registrable`](crate::core::decision::Verdict),
    /// so the suffix list is not walked twice). `stop` is cancelled if a later registry update
    /// blocks the host.
    pub(crate) fn register(
        self: &Arc<Self>,
        host: &str,
        registrable: &str,
        dst: IpAddr,
        stop: CancellationToken,
    ) -> TunnelGuard {
        let registrable: Arc<str> = registrable.into();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.by_registrable
            .entry(registrable.clone())
            .or_default()
            .push(Tunnel {
                id,
                host: host.into(),
                dst,
                stop,
            });
        TunnelGuard {
            tunnels: self.clone(),
            registrable,
            id,
        }
    }

    /// Re-decides the tunnels under the registrable domains of `changed` (entry domains touched by
    /// an update; `None`: a full replace, check all) and stops those no longer allowed. Returns how
    /// many were stopped.
    pub(crate) fn revoke(
        &self,
        changed: Option<&[&str]>,
        snapshot: &Snapshot,
        policy: &Policy,
    ) -> usize {
        let mut stopped = 0;
        let mut check = |tunnels: &[Tunnel]| {
            for t in tunnels {
                let v = decide(t.dst, HostInput::Name(&t.host), snapshot, policy);
                if !v.decision.forwards() {
                    t.stop.cancel();
                    stopped += 1;
                }
            }
        };
        match changed {
            None => {
                for entry in self.by_registrable.iter() {
                    check(entry.value());
                }
            }
            // No tunnel open: nothing to re-decide (the usual case for a large batch at night).
            Some(_) if self.by_registrable.is_empty() => {}
            Some(domains) => {
                let mut seen: HashSet<&str> = HashSet::with_capacity(domains.len());
                for d in domains {
                    let Some(r) = host::registrable_domain(d) else {
                        continue;
                    };
                    if !seen.insert(r) {
                        continue;
                    }
                    if let Some(entry) = self.by_registrable.get(r) {
                        check(entry.value());
                    }
                }
            }
        }
        stopped
    }

    /// Tunnels currently registered.
    pub(crate) fn len(&self) -> usize {
        self.by_registrable.iter().map(|e| e.value().len()).sum()
    }
}

impl Drop for TunnelGuard {
    fn drop(&mut self) {
        self.tunnels
            .by_registrable
            .remove_if_mut(&self.registrable, |_, list| {
                list.retain(|t| t.id != self.id);
                list.is_empty()
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Action, Mode, PolicyConfig, RouteConfig};
    use crate::core::routes::RouteTable;
    use crate::registry::{Entry, Status};

    fn snapshot(entries: &[(&str, Status, bool)]) -> Snapshot {
        let entries: Vec<Entry> = entries
            .iter()
            .map(|&(domain, status, access_here)| Entry {
                domain: domain.into(),
                icp: "京ICP备1号-1".into(),
                status,
                access_here,
            })
            .collect();
        Snapshot::from_entries(&entries, 1).unwrap()
    }

    /// 10.0.0.0/8 requires the access here; 10.7.0.0/16 does not.
    fn policy() -> Policy {
        let route = |dst: &str, require_access_here| RouteConfig {
            dst: dst.parse().unwrap(),
            mainland: true,
            x_forwarded_for: true,
            send_proxy_protocol: None,
            mode: None,
            require_access_here,
            http_origin: None,
            tls_origin: None,
            quic_origin: None,
        };
        Policy::new(
            RouteTable::new(vec![route("10.0.0.0/8", true), route("10.7.0.0/16", false)]),
            &PolicyConfig {
                mode: Mode::Enforce,
                ip_literal: Action::Allow,
                no_sni: Action::Block,
                exempt: Vec::new(),
            },
        )
    }

    #[test]
    fn revocation_re_decides_with_the_routes_access_setting() {
        let p = policy();
        let tunnels = Arc::new(LiveTunnels::default());
        let waived = CancellationToken::new();
        let _w = tunnels.register(
            "mail.elsewhere.cn",
            "elsewhere.cn",
            "10.7.0.1".parse().unwrap(),
            waived.clone(),
        );
        let here = CancellationToken::new();
        let _h = tunnels.register(
            "www.filed.cn",
            "filed.cn",
            "10.0.0.1".parse().unwrap(),
            here.clone(),
        );
        let changed = Some(&["elsewhere.cn", "filed.cn"][..]);

        // The access moving here, or away again, keeps a tunnel on the waiving route open.
        for access_here in [true, false] {
            let snap = snapshot(&[
                ("elsewhere.cn", Status::Filed, access_here),
                ("filed.cn", Status::Filed, true),
            ]);
            assert_eq!(tunnels.revoke(changed, &snap, &p), 0, "{access_here}");
            assert_eq!(tunnels.revoke(None, &snap, &p), 0, "{access_here}");
        }
        assert!(!waived.is_cancelled() && !here.is_cancelled());

        // On a route that requires it, the access moving away closes the tunnel.
        let snap = snapshot(&[
            ("elsewhere.cn", Status::Filed, false),
            ("filed.cn", Status::Filed, false),
        ]);
        assert_eq!(tunnels.revoke(changed, &snap, &p), 1);
        assert!(here.is_cancelled() && !waived.is_cancelled());

        // A revocation closes the filed-elsewhere tunnel: the waiver never covers the filing.
        let snap = snapshot(&[("elsewhere.cn", Status::Revoked, false)]);
        assert_eq!(tunnels.revoke(Some(&["elsewhere.cn"]), &snap, &p), 1);
        assert!(waived.is_cancelled());
    }
}
