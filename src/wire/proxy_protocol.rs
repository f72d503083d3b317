//! PROXY protocol (HAProxy's v1 text and v2 binary headers), parsed and built with `ppp`.
//!
//! Inbound, on a listener with `proxy_protocol = true`, the header must come first: it names the
//! real client and the destination the client connected to, which then drive routing and
//! `X-Forwarded-For`. Outbound, a route with `send_proxy_protocol` prepends a header to every
//! origin connection so the origin learns the client address without trusting HTTP headers.

use std::net::SocketAddr;

use ppp::v2::{Builder, Command, Protocol, Version};
use ppp::{HeaderResult, PartialResult, v1, v2};
use serde::Deserialize;

/// Largest header accepted: a v2 header with its 16-byte preamble and the maximum TLV payload.
pub(crate) const MAX_HEADER: usize = 16 + 65535;

/// PROXY protocol version prepended toward origins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocolVersion {
    V1,
    V2,
}

/// The addresses a PROXY header carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Addresses {
    pub client: SocketAddr,
    pub dst: SocketAddr,
}

/// What the start of a connection holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Parsed {
    /// Not a complete header yet: read more.
    Incomplete,
    /// A header of `len` bytes naming these addresses (`None` for `LOCAL`/`UNKNOWN`, e.g. a load
    /// balancer's health check: the socket's own addresses then apply).
    Header {
        len: usize,
        addresses: Option<Addresses>,
    },
    /// Not a valid PROXY header, with why.
    Invalid(String),
}

/// Parses a PROXY v1 or v2 header at the start of `buf`. Pure and resumable: call again with more
/// bytes after [`Parsed::Incomplete`].
pub(crate) fn parse(buf: &[u8]) -> Parsed {
    let parsed = HeaderResult::parse(buf);
    if parsed.is_incomplete() {
        return if buf.len() >= MAX_HEADER {
            Parsed::Invalid("header too long".into())
        } else {
            Parsed::Incomplete
        };
    }
    match parsed {
        HeaderResult::V1(Ok(h)) => Parsed::Header {
            len: h.header.len(),
            addresses: v1_addresses(&h.addresses),
        },
        HeaderResult::V2(Ok(h)) => Parsed::Header {
            len: h.len(),
            addresses: v2_addresses(&h),
        },
        HeaderResult::V1(Err(e)) => Parsed::Invalid(e.to_string()),
        HeaderResult::V2(Err(e)) => Parsed::Invalid(e.to_string()),
    }
}

fn v1_addresses(a: &v1::Addresses) -> Option<Addresses> {
    match a {
        v1::Addresses::Tcp4(a) => Some(Addresses {
            client: SocketAddr::from((a.source_address, a.source_port)),
            dst: SocketAddr::from((a.destination_address, a.destination_port)),
        }),
        v1::Addresses::Tcp6(a) => Some(Addresses {
            client: SocketAddr::from((a.source_address, a.source_port)),
            dst: SocketAddr::from((a.destination_address, a.destination_port)),
        }),
        v1::Addresses::Unknown => None,
    }
}

fn v2_addresses(h: &v2::Header<'_>) -> Option<Addresses> {
    if h.command == Command::Local {
        return None;
    }
    match h.addresses {
        v2::Addresses::IPv4(a) => Some(Addresses {
            client: SocketAddr::from((a.source_address, a.source_port)),
            dst: SocketAddr::from((a.destination_address, a.destination_port)),
        }),
        v2::Addresses::IPv6(a) => Some(Addresses {
            client: SocketAddr::from((a.source_address, a.source_port)),
            dst: SocketAddr::from((a.destination_address, a.destination_port)),
        }),
        v2::Addresses::Unspecified | v2::Addresses::Unix(_) => None,
    }
}

/// The header to prepend toward an origin for a client connection. Mixed address families (an
/// IPv6 client routed to an IPv4 destination) cannot be expressed, so they map the IPv4 side into
/// IPv6 first.
pub(crate) fn encode(
    version: ProxyProtocolVersion,
    client: SocketAddr,
    dst: SocketAddr,
) -> Vec<u8> {
    let (client, dst) = same_family(client, dst);
    match version {
        ProxyProtocolVersion::V1 => v1::Addresses::from((client, dst)).to_string().into_bytes(),
        ProxyProtocolVersion::V2 => Builder::with_addresses(
            Version::Two as u8 | Command::Proxy as u8,
            Protocol::Stream,
            (client, dst),
        )
        .build()
        // Building into a Vec cannot fail for TCP addresses.
        .unwrap_or_default(),
    }
}

fn same_family(client: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    fn v6(a: SocketAddr) -> SocketAddr {
        match a {
            SocketAddr::V4(v4) => SocketAddr::from((v4.ip().to_ipv6_mapped(), v4.port())),
            v6 => v6,
        }
    }
    if client.is_ipv4() == dst.is_ipv4() {
        (client, dst)
    } else {
        (v6(client), v6(dst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixed_families_are_mapped_to_ipv6() {
        let client: SocketAddr = "[2001:db8::1]:5000".parse().unwrap();
        let dst: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let v1 = String::from_utf8(encode(ProxyProtocolVersion::V1, client, dst)).unwrap();
        assert_eq!(v1, "PROXY TCP6 2001:db8::1 ::ffff:10.0.0.1 5000 80\r\n");
    }
}
