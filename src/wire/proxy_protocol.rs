//! PROXY protocol (HAProxy's v1 text and v2 binary headers), parsed and built with `ppp`.
//!
//! Inbound, on a listener with `proxy_protocol = true`, the header must come first: it names the
//! real client and the destination the client connected to, which then drive routing and
//! `X-Forwarded-For`. Outbound, a route with `send_proxy_protocol` prepends a header to every
//! origin connection so the origin learns the client address without trusting HTTP headers.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ppp::v2::{Builder, Command, Protocol, Version};
use ppp::{HeaderResult, PartialResult, v1, v2};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::config::ProxyProtocolVersion;

/// Largest header accepted: a v2 header with its 16-byte preamble and the maximum TLV payload.
const MAX_HEADER: usize = 16 + 65535;

/// The addresses a PROXY header carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addresses {
    pub client: SocketAddr,
    pub dst: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("no PROXY header within {0:?}")]
    Timeout(Duration),
    #[error("connection closed before the PROXY header was complete")]
    Eof,
    #[error("bad PROXY header: {0}")]
    Invalid(String),
    #[error("reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads a PROXY v1 or v2 header from the start of `stream`. Returns the addresses it names
/// (`None` for `LOCAL`/`UNKNOWN`, e.g. a load balancer's health check: the socket's own addresses
/// then apply) and whatever bytes arrived after the header.
pub async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
    timeout: Duration,
) -> Result<(Option<Addresses>, Bytes), ProxyHeaderError> {
    tokio::time::timeout(timeout, read_header_inner(stream))
        .await
        .map_err(|_| ProxyHeaderError::Timeout(timeout))?
}

async fn read_header_inner<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<(Option<Addresses>, Bytes), ProxyHeaderError> {
    let mut buf = BytesMut::with_capacity(512);
    loop {
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(ProxyHeaderError::Eof);
        }
        let parsed = HeaderResult::parse(&buf);
        if parsed.is_incomplete() {
            if buf.len() >= MAX_HEADER {
                return Err(ProxyHeaderError::Invalid("header too long".into()));
            }
            continue;
        }
        let (len, addresses) = match parsed {
            HeaderResult::V1(Ok(h)) => (h.header.len(), v1_addresses(&h.addresses)),
            HeaderResult::V2(Ok(h)) => (h.len(), v2_addresses(&h)),
            HeaderResult::V1(Err(e)) => return Err(ProxyHeaderError::Invalid(e.to_string())),
            HeaderResult::V2(Err(e)) => return Err(ProxyHeaderError::Invalid(e.to_string())),
        };
        let rest = buf.split_off(len).freeze();
        return Ok((addresses, rest));
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
pub fn encode(version: ProxyProtocolVersion, client: SocketAddr, dst: SocketAddr) -> Vec<u8> {
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

    fn addrs() -> (SocketAddr, SocketAddr) {
        (
            "198.51.100.7:40000".parse().unwrap(),
            "10.1.2.3:443".parse().unwrap(),
        )
    }

    async fn read(bytes: &[u8]) -> Result<(Option<Addresses>, Bytes), ProxyHeaderError> {
        let mut s = bytes;
        read_header(&mut s, Duration::from_secs(1)).await
    }

    #[tokio::test]
    async fn round_trips_both_versions_and_keeps_what_follows() {
        let (client, dst) = addrs();
        for version in [ProxyProtocolVersion::V1, ProxyProtocolVersion::V2] {
            let mut wire = encode(version, client, dst);
            wire.extend_from_slice(b"GET / HTTP/1.1\r\n");
            let (got, rest) = read(&wire).await.unwrap();
            assert_eq!(got, Some(Addresses { client, dst }), "{version:?}");
            assert_eq!(&rest[..], b"GET / HTTP/1.1\r\n");
        }
    }

    #[tokio::test]
    async fn header_split_across_reads() {
        let (client, dst) = addrs();
        let wire = encode(ProxyProtocolVersion::V2, client, dst);
        let (mut tx, mut rx) = tokio::io::duplex(1024);
        let writer = tokio::spawn(async move {
            for b in wire {
                tokio::io::AsyncWriteExt::write_all(&mut tx, &[b])
                    .await
                    .unwrap();
                tokio::task::yield_now().await;
            }
            tx
        });
        let (got, rest) = read_header(&mut rx, Duration::from_secs(5)).await.unwrap();
        assert_eq!(got, Some(Addresses { client, dst }));
        assert!(rest.is_empty());
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn unknown_and_local_mean_socket_addresses() {
        assert_eq!(read(b"PROXY UNKNOWN\r\nGET").await.unwrap().0, None);
        let local = Builder::with_addresses(
            Version::Two as u8 | Command::Local as u8,
            Protocol::Stream,
            addrs(),
        )
        .build()
        .unwrap();
        assert_eq!(read(&local).await.unwrap().0, None);
    }

    #[tokio::test]
    async fn missing_or_bad_header_is_an_error() {
        assert!(matches!(
            read(b"GET / HTTP/1.1\r\n\r\n").await,
            Err(ProxyHeaderError::Invalid(_))
        ));
        assert!(matches!(
            read(b"PROXY TCP4 1.2.3.4 x 1 2\r\n").await,
            Err(ProxyHeaderError::Invalid(_))
        ));
        assert!(matches!(
            read(b"PROXY TCP4 1.2").await,
            Err(ProxyHeaderError::Eof)
        ));
        let (_tx, mut rx) = tokio::io::duplex(64);
        let slow = read_header(&mut rx, Duration::from_millis(50)).await;
        assert!(matches!(slow, Err(ProxyHeaderError::Timeout(_))));
    }

    #[test]
    fn mixed_families_are_mapped_to_ipv6() {
        let client: SocketAddr = "[2001:db8::1]:5000".parse().unwrap();
        let dst: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let v1 = String::from_utf8(encode(ProxyProtocolVersion::V1, client, dst)).unwrap();
        assert_eq!(v1, "PROXY TCP6 2001:db8::1 ::ffff:10.0.0.1 5000 80\r\n");
    }
}
