//! Reaching an origin: the connect both origin pools share, and why a forward got no answer.

use std::time::Duration;

use tokio::net::TcpStream;

use crate::observe::metrics::UpstreamError;

/// Connects to `host:port` within `timeout`, trying each resolved address in turn.
pub(crate) async fn connect(authority: &str, timeout: Duration) -> std::io::Result<TcpStream> {
    let attempt = async {
        let mut last = None;
        for addr in tokio::net::lookup_host(authority).await? {
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
    };
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
