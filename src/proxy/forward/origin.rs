//! Reaching an origin: the connect both origin pools share, and why a forward got no answer.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::config::Origin;
use crate::observe::metrics::UpstreamError;

/// Connects to `host:port` within `timeout`, trying each resolved address in turn.
pub(crate) async fn connect(authority: &str, timeout: Duration) -> std::io::Result<TcpStream> {
    within(authority, timeout, async {
        first_of(authority, tokio::net::lookup_host(authority).await?).await
    })
    .await
}

/// [`connect`] to a configured origin; one written as an address is not parsed again.
pub(crate) async fn connect_origin(
    origin: &Origin,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    match origin.socket_addr() {
        Some(addr) => within(origin.as_str(), timeout, first_of(origin.as_str(), [addr])).await,
        None => connect(origin.as_str(), timeout).await,
    }
}

/// The first of `addrs` that accepts the connection (with `TCP_NODELAY` set).
async fn first_of(
    authority: &str,
    addrs: impl IntoIterator<Item = SocketAddr>,
) -> std::io::Result<TcpStream> {
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => {
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{authority}: no address"),
        )
    }))
}

/// `attempt`, failed with `TimedOut` (naming the origin) when it takes longer than `timeout`.
async fn within(
    authority: &str,
    timeout: Duration,
    attempt: impl Future<Output = std::io::Result<TcpStream>>,
) -> std::io::Result<TcpStream> {
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connect to {authority} timed out after {timeout:?}"),
            ))
        })
}

/// Why a forwarded request got no response head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ForwardError {
    /// The origin failed: answered 502 or 504 and counted by kind.
    Upstream(UpstreamError),
    /// The client's request body broke off or was malformed (a bad chunk) while it was being
    /// sent: answered 400, and not counted against the origin.
    ClientBody,
}

impl From<UpstreamError> for ForwardError {
    fn from(kind: UpstreamError) -> Self {
        ForwardError::Upstream(kind)
    }
}

/// The error of sending a request is the client's body failing, not the origin: hyper reports
/// a body's own error as a user error caused by it, and the body here is the client's
/// `Incoming`, whose errors are hyper errors.
pub(super) fn client_body_failed(e: &hyper::Error) -> bool {
    e.is_user() && std::error::Error::source(e).is_some_and(|cause| cause.is::<hyper::Error>())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An origin written as an address is connected to as parsed at load; one written as a name
    /// is resolved at connect. Both reach the same listener; a closed port is an error.
    #[tokio::test]
    async fn origins_by_address_and_by_name_connect() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let by_addr = Origin::parse(&format!("127.0.0.1:{port}")).unwrap();
        let by_name = Origin::parse(&format!("localhost:{port}")).unwrap();
        assert_eq!(by_addr.socket_addr(), Some(([127, 0, 0, 1], port).into()));
        assert_eq!(by_name.socket_addr(), None);
        let timeout = Duration::from_secs(5);
        for origin in [&by_addr, &by_name] {
            let stream = connect_origin(origin, timeout).await.unwrap();
            assert!(stream.nodelay().unwrap());
            let (_, peer) = listener.accept().await.unwrap();
            assert_eq!(peer, stream.local_addr().unwrap());
        }
        drop(listener);
        assert!(connect_origin(&by_addr, timeout).await.is_err());
    }
}
