//! PROXY protocol (HAProxy's v1 text and v2 binary headers), parsed and built with `ppp`.
//!
//! Inbound, on a listener with `proxy_protocol = true`, the header must come first: it names the
//! real client and the destination the client connected to, which then drive routing and
//! `X-Forwarded-For`. Outbound, a route with `send_proxy_protocol` prepends a header to every
//! origin connection so the origin learns the client address without trusting HTTP headers.

use std::net::SocketAddr;

use ppp::v2::{Builder, Command, Protocol, Version};
use ppp::{PartialResult, v1, v2};
use serde::Deserialize;

/// The v2 signature, the first 12 bytes of every v2 header.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// What every v1 header starts with.
const V1_PREFIX: &[u8; 6] = b"PROXY ";
/// Longest v1 header, its CRLF included (`PROXY UNKNOWN` with the most the spec allows after it).
const V1_MAX: usize = 107;

/// PROXY protocol version prepended toward origins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocolVersion {
    V1,
    V2,
}

/// The addresses a PROXY header carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addresses {
    pub client: SocketAddr,
    pub dst: SocketAddr,
}

/// What the start of a connection holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
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
/// bytes after [`Parsed::Incomplete`], which is only answered while `buf` can still become a
/// valid header. Bytes after the header are not looked at.
pub fn parse(buf: &[u8]) -> Parsed {
    if agrees_with(buf, V2_SIGNATURE) {
        // Also the empty buffer. The signature and `PROXY ` differ in their first byte.
        parse_v2(buf)
    } else if agrees_with(buf, V1_PREFIX) {
        parse_v1(buf)
    } else {
        Parsed::Invalid("not a PROXY protocol header".into())
    }
}

/// `buf` and `start` agree on the bytes both have: `buf` is a prefix of `start` or starts with it.
fn agrees_with(buf: &[u8], start: &[u8]) -> bool {
    let n = buf.len().min(start.len());
    buf[..n] == start[..n]
}

/// A v1 header ends at its first CRLF, within 107 bytes: decided there, on exactly that line.
/// (`ppp` alone, given the whole buffer, takes a line cut after the source port's space for a bad
/// destination port, and a complete line missing its ports for one still to come.)
fn parse_v1(buf: &[u8]) -> Parsed {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(cr) = window.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Parsed::Invalid(format!(
                "v1 header without CRLF in its first {V1_MAX} bytes"
            ))
        } else {
            Parsed::Incomplete
        };
    };
    let len = cr + 2;
    let line = &buf[..len];
    // `UNKNOWN` may be followed by anything up to the CRLF, which the receiver must ignore.
    if let Some(rest) = line.strip_prefix(b"PROXY UNKNOWN") {
        if rest.starts_with(b" ") || rest == b"\r\n" {
            return Parsed::Header {
                len,
                addresses: None,
            };
        }
    }
    match v1::Header::try_from(line) {
        Ok(h) if h.header.len() == len && !matches!(h.addresses, v1::Addresses::Unknown) => {
            Parsed::Header {
                len,
                addresses: v1_addresses(&h.addresses),
            }
        }
        Ok(_) => Parsed::Invalid("malformed v1 header".into()),
        Err(e) => Parsed::Invalid(e.to_string()),
    }
}

/// A v2 header is a 16-byte preamble and as many bytes again as its bytes 14..16 say; `ppp`
/// answers incomplete until it has them all.
fn parse_v2(buf: &[u8]) -> Parsed {
    match v2::Header::try_from(buf) {
        Ok(h) => Parsed::Header {
            len: h.len(),
            addresses: v2_addresses(&h),
        },
        Err(e) if e.is_incomplete() => Parsed::Incomplete,
        Err(e) => Parsed::Invalid(e.to_string()),
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

    fn header(client: &str, dst: &str) -> Parsed {
        Parsed::Header {
            len: 0,
            addresses: Some(Addresses {
                client: client.parse().unwrap(),
                dst: dst.parse().unwrap(),
            }),
        }
    }

    /// `Header` with its length replaced by 0, to compare addresses alone.
    fn addresses_of(parsed: Parsed) -> Parsed {
        match parsed {
            Parsed::Header { addresses, .. } => Parsed::Header { len: 0, addresses },
            other => other,
        }
    }

    /// Issue #19 item 4: TCP may split a v1 line anywhere, also right after the source port's
    /// trailing space, where the destination port is still to come.
    #[test]
    fn v1_split_after_the_source_port_waits_for_the_rest() {
        for (first, want) in [
            (
                &b"PROXY TCP4 1.2.3.4 5.6.7.8 5555 "[..],
                header("1.2.3.4:5555", "5.6.7.8:80"),
            ),
            (
                b"PROXY TCP6 2001:db8::1 2001:db8::2 5555 ",
                header("[2001:db8::1]:5555", "[2001:db8::2]:80"),
            ),
        ] {
            let text = String::from_utf8_lossy(first).into_owned();
            assert_eq!(parse(first), Parsed::Incomplete, "{text:?}");
            let mut whole = first.to_vec();
            whole.extend_from_slice(b"80\r\nGET / HTTP/1.1\r\n");
            let parsed = parse(&whole);
            assert!(
                matches!(parsed, Parsed::Header { len, .. } if len == first.len() + 4),
                "{text:?}: {parsed:?}"
            );
            assert_eq!(addresses_of(parsed), want, "{text:?}");
        }
    }

    /// Issue #19 item 4: a v1 header ends at its first CRLF, so a complete but malformed line is
    /// refused at once, however many bytes follow it or are still to come.
    #[test]
    fn a_complete_malformed_v1_line_is_refused_at_once() {
        for line in [
            &b"PROXY TCP4 1.2.3.4\r\n"[..],
            b"PROXY TCP4 1.2.3.4 5.6.7.8\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 5555\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 5555 \r\n",
            b"PROXY TCP6 2001:db8::1\r\n",
            b"PROXY TCP4 nonsense\r\n",
            b"PROXY \r\n",
            b"PROXY TCP\r\n",
            b"PROXY UNKNOWNX\r\n",
        ] {
            let text = String::from_utf8_lossy(line).into_owned();
            assert!(matches!(parse(line), Parsed::Invalid(_)), "{text:?}");
            let mut more = line.to_vec();
            more.extend_from_slice(b"GET / HTTP/1.1\r\nHost: a.cn\r\n\r\n");
            assert!(
                matches!(parse(&more), Parsed::Invalid(_)),
                "{text:?} + request"
            );
        }
    }

    /// A v1 header is at most 107 bytes: without a CRLF by then it never will be one.
    #[test]
    fn v1_is_decided_within_107_bytes() {
        let longest = format!(
            "PROXY TCP6 {a} {a} 65535 65535\r\n",
            a = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
        );
        assert_eq!(longest.len(), 104);
        assert!(matches!(
            parse(longest.as_bytes()),
            Parsed::Header { len: 104, .. }
        ));
        let unknown = format!("PROXY UNKNOWN {}\r\n", "x".repeat(107 - 16));
        assert_eq!(unknown.len(), 107);
        assert_eq!(
            parse(unknown.as_bytes()),
            Parsed::Header {
                len: 107,
                addresses: None
            }
        );
        assert_eq!(parse(&unknown.as_bytes()[..106]), Parsed::Incomplete);
        let too_long = format!("PROXY UNKNOWN {}\r\n", "x".repeat(107 - 15));
        assert!(matches!(
            parse(&too_long.as_bytes()[..107]),
            Parsed::Invalid(_)
        ));
        assert!(matches!(parse(too_long.as_bytes()), Parsed::Invalid(_)));
    }

    /// `UNKNOWN` may carry anything up to the CRLF, which the receiver ignores.
    #[test]
    fn v1_unknown_ignores_the_rest_of_its_line() {
        for line in [
            &b"PROXY UNKNOWN\r\n"[..],
            b"PROXY UNKNOWN \r\n",
            b"PROXY UNKNOWN 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY UNKNOWN a b c d e f g h\r\n",
        ] {
            let mut buf = line.to_vec();
            buf.extend_from_slice(b"GET");
            assert_eq!(
                parse(&buf),
                Parsed::Header {
                    len: line.len(),
                    addresses: None
                },
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    /// What cannot start a v1 or a v2 header is refused from its first wrong byte; a prefix of
    /// either waits for more.
    #[test]
    fn neither_v1_nor_v2_is_refused_at_once() {
        let v2 = encode(
            ProxyProtocolVersion::V2,
            "1.2.3.4:1".parse().unwrap(),
            "5.6.7.8:2".parse().unwrap(),
        );
        for n in 0..v2.len() {
            assert_eq!(parse(&v2[..n]), Parsed::Incomplete, "v2 prefix of {n}");
        }
        for n in 0..=6 {
            assert_eq!(
                parse(&b"PROXY "[..n]),
                Parsed::Incomplete,
                "v1 prefix of {n}"
            );
        }
        for bad in [
            &b"G"[..],
            b"GET / HTTP/1.1\r\n",
            b"PROXX",
            b"PROXY\r\n",
            b"proxy ",
            b"\r\n\r\n\0\r\nQUIX",
            b"\r\n\r\n\r\n",
            b"\x16\x03\x01",
        ] {
            assert!(
                matches!(parse(bad), Parsed::Invalid(_)),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
