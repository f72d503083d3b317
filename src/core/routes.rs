//! Destination routes: which origin serves a destination IP, and whether enforcement applies there.

use std::collections::HashMap;
use std::net::IpAddr;

use foldhash::fast::RandomState;

use crate::config::RouteConfig;

/// A route as configured (`[[route]]`).
pub type Route = RouteConfig;

/// Masked network → route index, for one prefix length. foldhash, not SipHash: every connection
/// and request looks its destination up, and the keys come from the config, not from clients.
type Nets<K> = HashMap<K, usize, RandomState>;

/// Routes indexed for longest-prefix match. A provider may list one route per tenant address, so
/// lookups go through one hash probe per distinct prefix length instead of a scan of all routes.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
    /// Per address family: (prefix length, masked network → route index), longest first.
    v4: Vec<(u8, Nets<u32>)>,
    v6: Vec<(u8, Nets<u128>)>,
}

impl RouteTable {
    pub fn new(routes: Vec<Route>) -> RouteTable {
        let mut v4: Vec<(u8, Nets<u32>)> = Vec::new();
        let mut v6: Vec<(u8, Nets<u128>)> = Vec::new();
        for (i, r) in routes.iter().enumerate() {
            let len = r.dst.prefix_len();
            match r.dst.network() {
                IpAddr::V4(net) => level(&mut v4, len).insert(u32::from(net), i),
                IpAddr::V6(net) => level(&mut v6, len).insert(u128::from(net), i),
            };
        }
        v4.sort_by_key(|level| std::cmp::Reverse(level.0));
        v6.sort_by_key(|level| std::cmp::Reverse(level.0));
        RouteTable { routes, v4, v6 }
    }

    /// The route with the longest prefix containing `dst`. An IPv4-mapped IPv6 address (a dual-stack
    /// socket's view of an IPv4 client) is matched as the IPv4 address it is.
    pub fn lookup(&self, dst: IpAddr) -> Option<&Route> {
        let idx = match dst.to_canonical() {
            IpAddr::V4(ip) => {
                let ip = u32::from(ip);
                self.v4
                    .iter()
                    .find_map(|(len, nets)| nets.get(&(ip & mask32(*len))))
            }
            IpAddr::V6(ip) => {
                let ip = u128::from(ip);
                self.v6
                    .iter()
                    .find_map(|(len, nets)| nets.get(&(ip & mask128(*len))))
            }
        }?;
        self.routes.get(*idx)
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }
}

fn level<K>(levels: &mut Vec<(u8, Nets<K>)>, len: u8) -> &mut Nets<K> {
    let pos = match levels.iter().position(|(l, _)| *l == len) {
        Some(pos) => pos,
        None => {
            levels.push((len, Nets::default()));
            levels.len() - 1
        }
    };
    &mut levels[pos].1
}

fn mask32(len: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)
}

fn mask128(len: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(dst: &str, mainland: bool) -> Route {
        Route {
            dst: dst.parse().unwrap(),
            mainland,
            x_forwarded_for: true,
            send_proxy_protocol: None,
            mode: None,
            require_access_here: true,
            http_origin: None,
            tls_origin: None,
            quic_origin: None,
        }
    }

    #[test]
    fn longest_prefix_wins() {
        let t = RouteTable::new(vec![
            route("0.0.0.0/0", false),
            route("10.0.0.0/8", true),
            route("10.1.2.0/24", false),
            route("10.1.2.3/32", true),
            route("2001:db8::/32", true),
        ]);
        let dst = |ip: &str| t.lookup(ip.parse().unwrap()).map(|r| r.dst.to_string());
        assert_eq!(dst("10.1.2.3").as_deref(), Some("10.1.2.3/32"));
        assert_eq!(dst("10.1.2.4").as_deref(), Some("10.1.2.0/24"));
        assert_eq!(dst("10.9.9.9").as_deref(), Some("10.0.0.0/8"));
        assert_eq!(dst("192.0.2.1").as_deref(), Some("0.0.0.0/0"));
        assert_eq!(dst("::ffff:10.1.2.3").as_deref(), Some("10.1.2.3/32"));
        assert_eq!(dst("2001:db8::1").as_deref(), Some("2001:db8::/32"));
        assert_eq!(dst("2001:db9::1"), None);
    }

    #[test]
    fn no_route_without_default() {
        let t = RouteTable::new(vec![route("127.0.0.0/8", true)]);
        assert!(t.lookup("192.0.2.1".parse().unwrap()).is_none());
        assert!(t.lookup("127.5.5.5".parse().unwrap()).is_some());
    }
}
