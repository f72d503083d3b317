//! Forwarding for the HTTP listener's fast path ([`crate::wire::http1`]): the request head is written
//! to a plain pooled TCP connection and the response is relayed to the client as it arrives,
//! its body bytes unchanged, with the framing checked so the connection is reused only when the
//! response ended exactly where its framing said.

use std::io;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use http::uri::Authority;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::debug;

use super::origin::connect;
use super::pool::{Parked, Pool};
use crate::observe::metrics::UpstreamError;
use crate::proxy::deadline::Deadline;
use crate::proxy::io::write_all_two;
use crate::wire::http1::{self, BadResponse, ChunkedEnd, Framing, ResponseHead};

/// Longest origin response head accepted.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Read size for origin responses.
const READ_CHUNK: usize = 16 * 1024;

/// A plain connection to an origin and the bytes read from it but not yet relayed.
pub(super) struct RawConn {
    stream: TcpStream,
    buf: BytesMut,
    /// The response head as the client gets it, rewritten for each response.
    client_head: Vec<u8>,
}

impl Parked for RawConn {
    fn usable(&mut self) -> bool {
        // An idle connection must stay silent: readable means EOF, an error or stray bytes.
        // The readiness check is free; the read only runs when readiness is set, and a
        // `WouldBlock` clears it, so the next check is free again.
        let mut cx = Context::from_waker(Waker::noop());
        match self.stream.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => matches!(
                self.stream.try_read(&mut [0u8; 1]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock
            ),
        }
    }
}

/// Plain origin connections, pooled per origin. Cheap to clone.
#[derive(Clone)]
pub(crate) struct RawOrigins {
    pool: Pool<RawConn>,
    connect_timeout: Duration,
}

/// The request to send.
pub(crate) struct Outgoing<'a> {
    pub origin: &'a Authority,
    /// The whole request (it has no body).
    pub head: &'a [u8],
    /// May be sent again if a pooled connection closes before answering.
    pub idempotent: bool,
    pub head_request: bool,
    /// The client connection closes after this response.
    pub close: bool,
}

/// How a relayed exchange ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Exchanged {
    pub status: u16,
    /// The client connection must close (it was told `connection: close`).
    pub close: bool,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ExchangeError {
    /// Nothing was sent to the client: it gets a 502 or 504.
    #[error("origin: {0:?}")]
    Upstream(UpstreamError),
    /// Nothing was sent to the client: it gets a 502.
    #[error("origin response: {0}")]
    Bad(BadResponse),
    /// The response was cut off after its head went to the client (origin or client failed):
    /// the client connection must close.
    #[error("relay broken after {status}")]
    Broken { status: u16 },
}

impl RawOrigins {
    pub(crate) fn new(connect_timeout: Duration, idle_timeout: Duration) -> RawOrigins {
        RawOrigins {
            pool: Pool::new(idle_timeout),
            connect_timeout,
        }
    }

    /// Sends `req` and relays the response to `client`. `deadline` bounds the wait for the
    /// response head, connecting included; `on_head` runs once the head has arrived, before
    /// anything is written to the client.
    pub(crate) async fn exchange<W: AsyncWrite + Unpin>(
        &self,
        req: &Outgoing<'_>,
        deadline: &mut Deadline<'_>,
        client: &mut W,
        on_head: impl FnOnce(),
    ) -> Result<Exchanged, ExchangeError> {
        let (mut conn, head) = deadline
            .within(self.head(req))
            .await
            .ok_or(ExchangeError::Upstream(UpstreamError::Timeout))??;
        on_head();
        let status = head.status;
        let framing = head.framing;
        let close = req.close || framing == Framing::UntilClose;
        http1::finish_client_head(&mut conn.client_head, close);

        // Past this point the client has (part of) a response: any failure closes it.
        let mut body = Body::new(framing);
        let (take, mut done) = body.take(&conn.buf).map_err(cut(status))?;
        write_all_two(client, &conn.client_head, &conn.buf[..take])
            .await
            .map_err(cut(status))?;
        conn.buf.advance(take);
        while !done {
            conn.buf.reserve(READ_CHUNK);
            let n = conn
                .stream
                .read_buf(&mut conn.buf)
                .await
                .map_err(cut(status))?;
            if n == 0 {
                if framing == Framing::UntilClose {
                    break;
                }
                return Err(ExchangeError::Broken { status });
            }
            let (take, end) = body.take(&conn.buf).map_err(cut(status))?;
            client
                .write_all(&conn.buf[..take])
                .await
                .map_err(cut(status))?;
            conn.buf.advance(take);
            done = end;
        }
        // Bytes past the end of the response mean the origin and we disagree on framing.
        if head.reusable && conn.buf.is_empty() {
            self.pool.checkin(req.origin.as_str(), conn);
        }
        Ok(Exchanged { status, close })
    }

    /// Sends the request and reads the final response head, on a pooled connection or a new
    /// one. A pooled connection that closes before answering is replaced once, if the request
    /// may be sent twice.
    async fn head(&self, req: &Outgoing<'_>) -> Result<(RawConn, http1::Final), ExchangeError> {
        let mut retried = false;
        loop {
            let (mut conn, pooled) = match self.pool.checkout(req.origin.as_str()) {
                Some(conn) if !retried => (conn, true),
                _ => (self.connect(req.origin).await?, false),
            };
            let result = match conn.stream.write_all(req.head).await {
                Ok(()) => read_head(&mut conn, req.head_request).await,
                Err(e) => Err(Failed::Io(e)),
            };
            match result {
                Ok(head) => return Ok((conn, head)),
                Err(Failed::Bad(bad)) => {
                    debug!(origin = %req.origin, error = %bad, "bad origin response");
                    return Err(ExchangeError::Bad(bad));
                }
                Err(Failed::Io(_) | Failed::Closed) if pooled && req.idempotent => {
                    retried = true;
                }
                Err(e) => {
                    debug!(origin = %req.origin, error = %e, "origin request failed");
                    return Err(ExchangeError::Upstream(UpstreamError::Reset));
                }
            }
        }
    }

    async fn connect(&self, origin: &Authority) -> Result<RawConn, ExchangeError> {
        match connect(origin.as_str(), self.connect_timeout).await {
            Ok(stream) => Ok(RawConn {
                stream,
                buf: BytesMut::with_capacity(READ_CHUNK),
                client_head: Vec::new(),
            }),
            Err(e) => {
                debug!(%origin, error = %e, "origin connect failed");
                Err(ExchangeError::Upstream(UpstreamError::Connect))
            }
        }
    }

    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.pool.idle_count()
    }
}

/// For errors after the response head went to the client.
fn cut<E>(status: u16) -> impl FnOnce(E) -> ExchangeError {
    move |_| ExchangeError::Broken { status }
}

#[derive(Debug, thiserror::Error)]
enum Failed {
    #[error(transparent)]
    Io(io::Error),
    #[error("closed before a response head")]
    Closed,
    #[error(transparent)]
    Bad(BadResponse),
}

/// Reads until the buffer starts with a final response head; interim (1xx) heads are skipped.
async fn read_head(conn: &mut RawConn, head_request: bool) -> Result<http1::Final, Failed> {
    loop {
        if !conn.buf.is_empty() {
            let parsed = http1::parse_response(&conn.buf, head_request, &mut conn.client_head);
            match parsed.map_err(Failed::Bad)? {
                ResponseHead::Final(head) => {
                    conn.buf.advance(head.len);
                    return Ok(head);
                }
                ResponseHead::Interim { len } => {
                    conn.buf.advance(len);
                    continue;
                }
                ResponseHead::Partial if conn.buf.len() >= MAX_RESPONSE_HEAD => {
                    return Err(Failed::Bad(BadResponse::Head));
                }
                ResponseHead::Partial => {}
            }
        }
        conn.buf.reserve(READ_CHUNK);
        if conn
            .stream
            .read_buf(&mut conn.buf)
            .await
            .map_err(Failed::Io)?
            == 0
        {
            return Err(if conn.buf.is_empty() {
                Failed::Closed
            } else {
                Failed::Bad(BadResponse::Head)
            });
        }
    }
}

/// Where the body of the response being relayed ends.
enum Body {
    Left(u64),
    Chunked(ChunkedEnd),
    UntilClose,
}

impl Body {
    fn new(framing: Framing) -> Body {
        match framing {
            Framing::Empty => Body::Left(0),
            Framing::Length(n) => Body::Left(n),
            Framing::Chunked => Body::Chunked(ChunkedEnd::default()),
            Framing::UntilClose => Body::UntilClose,
        }
    }

    /// How many of `data`'s bytes belong to the body, and whether the body ends with them.
    fn take(&mut self, data: &[u8]) -> Result<(usize, bool), BadResponse> {
        match self {
            Body::Left(left) => {
                let take = usize::try_from(*left).map_or(data.len(), |l| l.min(data.len()));
                *left -= take as u64;
                Ok((take, *left == 0))
            }
            Body::Chunked(chunks) => chunks.scan(data),
            Body::UntilClose => Ok((data.len(), false)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::pool::tests::counting_origin;
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// What a scripted origin does with a connection after its answers.
    #[derive(Clone, Copy, PartialEq)]
    enum After {
        /// Keeps it open until the client closes it.
        Hold,
        /// Closes it at once.
        Close,
        /// Reads the next request head, then closes without answering.
        CloseOnNextRequest,
    }

    /// An origin that answers each request head on a connection with the next of `answers`,
    /// counting connections.
    async fn scripted(answers: Vec<&'static [u8]>, after: After) -> (Authority, Arc<AtomicUsize>) {
        counting_origin(move |mut s| {
            let answers = answers.clone();
            async move {
                let mut buf = Vec::new();
                let heads = answers.len() + usize::from(after == After::CloseOnNextRequest);
                for i in 0..heads {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        let mut chunk = [0u8; 1024];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    buf.drain(..end);
                    let Some(answer) = answers.get(i) else { return };
                    if s.write_all(answer).await.is_err() {
                        return;
                    }
                }
                if after == After::Hold {
                    let _ = s.read(&mut [0u8; 1]).await;
                    std::future::pending::<()>().await;
                }
            }
        })
        .await
    }

    fn origins() -> RawOrigins {
        RawOrigins::new(Duration::from_secs(1), Duration::from_secs(60))
    }

    async fn get(
        raw: &RawOrigins,
        origin: &Authority,
        method: &str,
    ) -> (Result<Exchanged, ExchangeError>, String) {
        get_within(raw, origin, method, Duration::from_secs(5)).await
    }

    /// A request, with `timeout` for the response head.
    async fn get_within(
        raw: &RawOrigins,
        origin: &Authority,
        method: &str,
        timeout: Duration,
    ) -> (Result<Exchanged, ExchangeError>, String) {
        let head = format!("{method} / HTTP/1.1\r\nhost: a.cn\r\n\r\n");
        let req = Outgoing {
            origin,
            head: head.as_bytes(),
            idempotent: method != "POST",
            head_request: method == "HEAD",
            close: false,
        };
        let mut client = Vec::new();
        let timer = tokio::time::sleep(timeout);
        tokio::pin!(timer);
        let mut deadline = Deadline::new(timer);
        let res = raw.exchange(&req, &mut deadline, &mut client, || {}).await;
        (res, String::from_utf8(client).unwrap())
    }

    #[tokio::test]
    async fn length_and_chunked_bodies_relay_unchanged_on_one_connection() {
        let (origin, accepted) = scripted(
            vec![
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nDate: x\r\n\r\nhello",
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nDate: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nT: 1\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nDate: x\r\n\r\n",
            ],
            After::Hold,
        )
        .await;
        let raw = origins();
        let (res, text) = get(&raw, &origin, "GET").await;
        assert_eq!(
            res.unwrap(),
            Exchanged {
                status: 200,
                close: false
            }
        );
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nDate: x\r\n\r\nhello"
        );
        assert_eq!(raw.idle_count(), 1);
        let (res, text) = get(&raw, &origin, "GET").await;
        assert_eq!(res.unwrap().status, 201);
        assert_eq!(
            text,
            "HTTP/1.1 201 Created\r\nDate: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nT: 1\r\n\r\n"
        );
        let (res, text) = get(&raw, &origin, "HEAD").await;
        assert_eq!(res.unwrap().status, 200);
        assert!(text.ends_with("\r\n\r\n"));
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(raw.idle_count(), 1);
    }

    #[tokio::test]
    async fn a_body_until_close_closes_the_client_and_is_not_pooled() {
        let (origin, _) = scripted(
            vec![b"HTTP/1.1 200 OK\r\nDate: x\r\n\r\nall of it"],
            After::Close,
        )
        .await;
        let raw = origins();
        let (res, text) = get(&raw, &origin, "GET").await;
        assert_eq!(
            res.unwrap(),
            Exchanged {
                status: 200,
                close: true
            }
        );
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\nDate: x\r\nconnection: close\r\n\r\nall of it"
        );
        assert_eq!(raw.idle_count(), 0);
    }

    #[tokio::test]
    async fn bytes_past_the_response_end_keep_the_connection_out_of_the_pool() {
        let (origin, _) = scripted(
            vec![b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nDate: x\r\n\r\nokHTTP/1.1 200 OK\r\n"],
            After::Hold,
        )
        .await;
        let raw = origins();
        let (res, text) = get(&raw, &origin, "GET").await;
        assert_eq!(res.unwrap().status, 200);
        assert!(text.ends_with("\r\n\r\nok"), "{text}");
        assert_eq!(raw.idle_count(), 0);
    }

    #[tokio::test]
    async fn a_cut_body_breaks_and_a_bad_head_is_refused() {
        let (origin, _) = scripted(
            vec![b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nDate: x\r\n\r\nshort"],
            After::Close,
        )
        .await;
        let raw = origins();
        let (res, _) = get(&raw, &origin, "GET").await;
        assert!(matches!(res, Err(ExchangeError::Broken { status: 200 })));
        assert_eq!(raw.idle_count(), 0);

        let (origin, _) = scripted(
            vec![b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"],
            After::Close,
        )
        .await;
        let (res, text) = get(&raw, &origin, "GET").await;
        assert!(matches!(
            res,
            Err(ExchangeError::Bad(BadResponse::ContentLength))
        ));
        assert_eq!(text, "", "nothing reaches the client");

        let (origin, _) = scripted(
            vec![b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nDate: x\r\n\r\nzz\r\n"],
            After::Close,
        )
        .await;
        let (res, _) = get(&raw, &origin, "GET").await;
        assert!(matches!(res, Err(ExchangeError::Broken { status: 200 })));
    }

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nDate: x\r\n\r\nok";

    #[tokio::test]
    async fn a_parked_connection_the_origin_closed_is_replaced() {
        let (origin, accepted) = scripted(vec![OK], After::Close).await;
        let raw = origins();
        assert_eq!(get(&raw, &origin, "GET").await.0.unwrap().status, 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(get(&raw, &origin, "GET").await.0.unwrap().status, 200);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn only_idempotent_requests_are_sent_again() {
        // The pooled connection closes only once the next request arrived on it.
        let (origin, accepted) = scripted(vec![OK], After::CloseOnNextRequest).await;
        let raw = origins();
        assert_eq!(get(&raw, &origin, "GET").await.0.unwrap().status, 200);
        assert_eq!(get(&raw, &origin, "GET").await.0.unwrap().status, 200);
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "GET sent again");
        let (res, text) = get(&raw, &origin, "POST").await;
        assert!(matches!(
            res,
            Err(ExchangeError::Upstream(UpstreamError::Reset))
        ));
        assert_eq!(text, "");
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "POST sent twice");
    }

    #[tokio::test]
    async fn connect_errors_and_silence() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let raw = origins();
        let origin: Authority = addr.to_string().parse().unwrap();
        let (res, _) = get(&raw, &origin, "GET").await;
        assert!(matches!(
            res,
            Err(ExchangeError::Upstream(UpstreamError::Connect))
        ));

        let (origin, _) = scripted(vec![], After::Hold).await;
        let (res, _) = get_within(&raw, &origin, "GET", Duration::from_millis(200)).await;
        assert!(matches!(
            res,
            Err(ExchangeError::Upstream(UpstreamError::Timeout))
        ));
    }
}
