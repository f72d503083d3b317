//! The start of every accepted connection, before a listener reads it: the PROXY header (when the
//! listener expects one), then rule 1 at the door (a destination without a route gets nothing
//! read and nothing forwarded), then the listener for its kind.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};
use tracing::debug;

use crate::config::ListenerKind;
use crate::core::decision::{Decision, Reason};
use crate::observe::logging::{Access, RequestId};
use crate::proxy::accepted::Accepted;
use crate::proxy::io::Prefixed;
use crate::proxy::state::{Endpoints, ListenerSpec, Shared};
use crate::proxy::{http, tls};
use crate::wire::proxy_protocol::{self, Addresses, Parsed};

#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyHeaderError {
    #[error("no PROXY header within {0:?}")]
    Timeout(Duration),
    #[error("connection closed before the PROXY header was complete")]
    Eof,
    #[error("bad PROXY header: {0}")]
    Invalid(String),
    #[error("reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
}

/// Serves one accepted connection. `local`: the listener's address when it is bound to one
/// (else read from the socket). TCP_NODELAY comes from the listening socket: Linux copies it to
/// every accepted socket (tested below).
pub(crate) async fn connection(
    mut stream: Accepted,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    spec: Arc<ListenerSpec>,
    shared: Arc<Shared>,
) {
    let local = match local.map_or_else(|| stream.local_addr(), Ok) {
        Ok(a) => a,
        Err(_) => return,
    };
    let generation = shared.generation.load_full();
    let (ends, prefix) = if spec.config.proxy_protocol {
        let timeout = generation.config.limits.header_read_timeout;
        match read_proxy_header(&mut stream, timeout).await {
            Ok((addrs, rest)) => {
                let ends = addrs.map_or(
                    Endpoints {
                        client: peer,
                        dst: local,
                    },
                    |a| Endpoints {
                        client: a.client,
                        dst: a.dst,
                    },
                );
                (ends, rest)
            }
            Err(e) => {
                debug!(listener = %spec.config.name, client = %peer, error = %e, "closing: PROXY header");
                return;
            }
        }
    } else {
        (
            Endpoints {
                client: peer,
                dst: local,
            },
            Bytes::new(),
        )
    };

    // Rule 1 at the door: a destination without a route gets nothing read and nothing forwarded.
    if generation.policy.route(ends.dst.ip()).is_none() {
        let tls = spec.config.kind == ListenerKind::Tls;
        if tls {
            spec.metrics
                .tls_connection(Decision::Refuse, Reason::NoRoute);
        } else {
            spec.metrics.request(Decision::Refuse, Reason::NoRoute);
        }
        Access {
            listener: &spec.config.name,
            client: ends.client,
            dst: ends.dst,
            host: "",
            decision: Decision::Refuse,
            reason: Reason::NoRoute,
            status: None,
            request_id: &RequestId::next(),
            duration: Duration::ZERO,
        }
        .log();
        return;
    }
    drop(generation);

    let stream = Prefixed::new(prefix, stream);
    // Not boxed: the accept loop boxes the whole connection once.
    match spec.config.kind {
        ListenerKind::Http => http::serve(stream, ends, spec, shared).await,
        ListenerKind::Tls => tls::serve(stream, ends, spec, shared).await,
        // UDP: served by `proxy::quic`, never by a TCP accept loop.
        ListenerKind::Quic => {}
    }
}

/// Reads a PROXY v1 or v2 header from the start of `stream`. Returns the addresses it names
/// (`None` for `LOCAL`/`UNKNOWN`: the socket's own addresses then apply) and whatever bytes
/// arrived after the header.
pub(crate) async fn read_proxy_header<S: AsyncRead + Unpin>(
    stream: &mut S,
    timeout: Duration,
) -> Result<(Option<Addresses>, Bytes), ProxyHeaderError> {
    tokio::time::timeout(timeout, read_proxy_header_inner(stream))
        .await
        .map_err(|_| ProxyHeaderError::Timeout(timeout))?
}

async fn read_proxy_header_inner<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<(Option<Addresses>, Bytes), ProxyHeaderError> {
    let mut buf = BytesMut::with_capacity(512);
    loop {
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(ProxyHeaderError::Eof);
        }
        match proxy_protocol::parse(&buf) {
            Parsed::Incomplete => continue,
            Parsed::Invalid(why) => return Err(ProxyHeaderError::Invalid(why)),
            Parsed::Header { len, addresses } => {
                let rest = buf.split_off(len).freeze();
                return Ok((addresses, rest));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ProxyProtocolVersion;
    use ppp::v2::{Builder, Command, Protocol, Version};
    use proxy_protocol::encode;

    fn addrs() -> (SocketAddr, SocketAddr) {
        (
            "198.51.100.7:40000".parse().unwrap(),
            "10.1.2.3:443".parse().unwrap(),
        )
    }

    async fn read(bytes: &[u8]) -> Result<(Option<Addresses>, Bytes), ProxyHeaderError> {
        let mut s = bytes;
        read_proxy_header(&mut s, Duration::from_secs(1)).await
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
        let (got, rest) = read_proxy_header(&mut rx, Duration::from_secs(5))
            .await
            .unwrap();
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
        let slow = read_proxy_header(&mut rx, Duration::from_millis(50)).await;
        assert!(matches!(slow, Err(ProxyHeaderError::Timeout(_))));
    }

    /// Issue #19 item 4: the header's two TCP reads split it right after the source port's
    /// trailing space.
    #[tokio::test]
    async fn v1_split_after_the_source_port_is_read() {
        for (first, client, dst) in [
            (
                "PROXY TCP4 1.2.3.4 5.6.7.8 5555 ",
                "1.2.3.4:5555",
                "5.6.7.8:80",
            ),
            (
                "PROXY TCP6 2001:db8::1 2001:db8::2 5555 ",
                "[2001:db8::1]:5555",
                "[2001:db8::2]:80",
            ),
        ] {
            let (mut tx, mut rx) = tokio::io::duplex(1024);
            let writer = tokio::spawn(async move {
                tokio::io::AsyncWriteExt::write_all(&mut tx, first.as_bytes())
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
                tokio::io::AsyncWriteExt::write_all(&mut tx, b"80\r\nGET")
                    .await
                    .unwrap();
                tx
            });
            let (got, rest) = read_proxy_header(&mut rx, Duration::from_secs(5))
                .await
                .unwrap_or_else(|e| panic!("{first:?}: {e}"));
            let want = Addresses {
                client: client.parse().unwrap(),
                dst: dst.parse().unwrap(),
            };
            assert_eq!(got, Some(want));
            assert_eq!(&rest[..], b"GET");
            drop(writer.await.unwrap());
        }
    }

    /// Issue #19 item 4: a complete but malformed v1 line on a connection that stays open is
    /// refused as soon as it arrives, not when the header timeout runs out.
    #[tokio::test]
    async fn complete_malformed_v1_line_is_refused_before_the_timeout() {
        let (mut tx, mut rx) = tokio::io::duplex(1024);
        tokio::io::AsyncWriteExt::write_all(
            &mut tx,
            b"PROXY TCP4 1.2.3.4\r\nGET / HTTP/1.1\r\nHost: a.cn\r\n\r\n",
        )
        .await
        .unwrap();
        let started = std::time::Instant::now();
        let got = read_proxy_header(&mut rx, Duration::from_secs(10)).await;
        assert!(
            matches!(got, Err(ProxyHeaderError::Invalid(_))),
            "{got:?} after {:?}",
            started.elapsed()
        );
        assert!(started.elapsed() < Duration::from_secs(1));
        drop(tx);
    }
}
