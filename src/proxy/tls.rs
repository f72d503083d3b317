//! The TLS listener (`kind = "tls"`): decides on the ClientHello's SNI without terminating TLS
//! (docs/behaviour.md#tls-sni-without-terminating).
//!
//! The ClientHello is read into a bounded buffer (reassembled across TCP segments and TLS records
//! by [`crate::wire::clienthello`]), decided, and then either passed through — the buffered bytes first,
//! exactly as received, then a byte relay — or refused: a block page over TLS with the block
//! certificate, a fatal `access_denied` alert, or a TCP reset.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use http_body_util::{Either, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tracing::debug;

use crate::config::{Limits, Origin, TlsBlock};
use crate::core::decision::{Decision, HostInput, Reason, decide};
use crate::core::routes::Route;
use crate::observe::logging::{Access, RequestId};
use crate::observe::metrics::UpstreamError;
use crate::proxy::accepted::Accepted;
use crate::proxy::block_page::{BlockContext, wants_json};
use crate::proxy::forward;
use crate::proxy::io::{Prefixed, write_all_last};
use crate::proxy::relay;
use crate::proxy::state::{Endpoints, ListenerSpec, Shared};
use crate::wire::clienthello::{ClientHelloParser, Parse};
use crate::wire::host::{self, Host, HostError};
use crate::wire::proxy_protocol;

/// A fatal `access_denied` alert record (RFC 8446 §6): level 2, description 49.
const ACCESS_DENIED_ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x31];

/// Buffer growth per ClientHello read.
const HELLO_READ: usize = 4096;

/// What reading the ClientHello produced.
enum Hello {
    Parsed(Parse),
    /// The client closed before sending a byte (port scanners, TCP health checks).
    Nothing,
    /// The client closed or stalled mid-ClientHello.
    Truncated,
}

/// Serves one TLS connection.
pub(crate) async fn serve(
    stream: Prefixed<Accepted>,
    ends: Endpoints,
    spec: Arc<ListenerSpec>,
    shared: Arc<Shared>,
) {
    let started = Instant::now();
    let runtime = shared.generation.load_full();
    let tls = &runtime.config.tls;
    let (prefix, mut tcp) = stream.into_parts();
    let mut buf = BytesMut::with_capacity(HELLO_READ.max(prefix.len()));
    buf.extend_from_slice(&prefix);
    let hello = read_client_hello(
        &mut tcp,
        &mut buf,
        tls.max_client_hello,
        tls.client_hello_timeout,
    )
    .await;

    let sni = match &hello {
        Hello::Parsed(Parse::Done(info)) => info
            .sni
            .as_deref()
            .map(|raw| (raw, host::parse_host(raw.as_bytes()))),
        _ => None,
    };
    let input = sni_input(&hello, &sni, &ends);
    let (decision, reason, protocol_error, route, registrable) = {
        let snapshot = shared.registry.load();
        let v = decide(ends.dst.ip(), input, &snapshot, &runtime.policy);
        (
            v.decision,
            v.reason,
            v.protocol_error,
            v.route,
            v.registrable,
        )
    };
    // Logged as the normalised name, or as sent when it did not parse.
    let sni = match &sni {
        Some((_, Ok(h))) => h.to_text().into_owned(),
        Some((raw, Err(_))) => raw.to_string(),
        None => String::new(),
    };
    spec.metrics.tls_connection(decision, reason);
    shared
        .blocked
        .record(spec.metrics.name(), decision, &sni, reason, ends.dst.ip());
    let id = RequestId::next();
    Access {
        listener: spec.metrics.name(),
        client: ends.client,
        dst: ends.dst,
        host: &sni,
        decision,
        reason,
        status: None,
        request_id: &id,
        duration: started.elapsed(),
    }
    .log();

    match decision {
        Decision::Allow | Decision::Report => {
            let Some((route, origin)) = route.and_then(|r| r.tls_origin.as_ref().map(|o| (r, o)))
            else {
                return;
            };
            let limits = &runtime.config.limits;
            let Some(upstream) = open_tunnel(origin, route, &ends, &buf, limits, &spec).await
            else {
                return;
            };
            let idle = limits.idle_timeout;
            // The ClientHello is with the origin now: its buffer is not held for the tunnel's life.
            drop(buf);
            drop(runtime);
            // The relay splices between two registered sockets.
            let tcp = match tcp.into_tokio() {
                Ok(tcp) => tcp,
                Err(e) => {
                    debug!(client = %ends.client, error = %e, "closing: cannot register the socket");
                    return;
                }
            };
            // A tunnel a registry entry allowed closes when an update blocks its host.
            let stop = shared.drain.child_token();
            let _registered = registrable.filter(|_| reason.registry_allowed()).map(|r| {
                shared
                    .tunnels
                    .register(&sni, r, ends.dst.ip(), stop.clone())
            });
            let r = Box::pin(relay::relay_tcp(tcp, upstream, idle, stop)).await;
            spec.metrics.relayed[0].inc_by(r.client_to_origin);
            spec.metrics.relayed[1].inc_by(r.origin_to_client);
            debug!(client = %ends.client, sni = %sni, ?r, "tunnel closed");
        }
        Decision::Block if protocol_error => {}
        Decision::Block => match &runtime.block_acceptor {
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                let page = BlockPageJob {
                    host: sni,
                    reason,
                    shared: shared.clone(),
                };
                let io = Prefixed::new(buf.freeze(), tcp);
                drop(runtime);
                Box::pin(serve_block_page(acceptor, io, page)).await;
            }
            None => refuse(tcp, tls.block).await,
        },
        Decision::Refuse => {}
    }
}

/// The decision input for what the ClientHello read produced: its SNI when it has one, else why
/// there is none.
fn sni_input<'h>(
    hello: &Hello,
    sni: &'h Option<(&str, Result<Host<'_>, HostError>)>,
    ends: &Endpoints,
) -> HostInput<'h> {
    match (hello, sni) {
        (_, Some((_, Ok(host)))) => HostInput::from(host),
        (_, Some((_, Err(_)))) => HostInput::InvalidSni,
        (Hello::Parsed(Parse::Done(_)), None) => HostInput::NoSni,
        (Hello::Parsed(Parse::NotTls) | Hello::Nothing, None) => HostInput::NotTls,
        (Hello::Parsed(Parse::Invalid(why)), None) => {
            debug!(client = %ends.client, why, "invalid client hello");
            HostInput::InvalidSni
        }
        (Hello::Parsed(Parse::Incomplete) | Hello::Truncated, None) => HostInput::InvalidSni,
    }
}

/// Connects to the route's TLS origin and sends it the PROXY header (when the route asks for
/// one) and the client's bytes so far, exactly as received. `None` when that failed (counted).
async fn open_tunnel(
    origin: &Origin,
    route: &Route,
    ends: &Endpoints,
    hello: &[u8],
    limits: &Limits,
    spec: &ListenerSpec,
) -> Option<TcpStream> {
    let mut upstream = match forward::connect_origin(origin, limits.origin_connect_timeout).await {
        Ok(s) => s,
        Err(e) => {
            let kind = if e.kind() == std::io::ErrorKind::TimedOut {
                UpstreamError::Timeout
            } else {
                UpstreamError::Connect
            };
            spec.metrics.upstream_error(kind);
            debug!(%origin, error = %e, "tls origin unreachable");
            return None;
        }
    };
    if let Some(version) = route.send_proxy_protocol {
        let header = proxy_protocol::encode(version, ends.client, ends.dst);
        upstream.write_all(&header).await.ok()?;
    }
    if upstream.write_all(hello).await.is_err() {
        spec.metrics.upstream_error(UpstreamError::Reset);
        return None;
    }
    spec.metrics.relayed[0].inc_by(hello.len() as u64);
    Some(upstream)
}

/// Refuses a blocked connection when no block certificate is configured: a TLS alert, or a reset.
async fn refuse(mut tcp: Accepted, how: TlsBlock) {
    match how {
        TlsBlock::Alert => {
            // Closing right after sends the FIN, in the alert's segment; a shutdown(2) first
            // would only add a syscall.
            let _ = write_all_last(&mut tcp, &ACCESS_DENIED_ALERT, &[]).await;
        }
        TlsBlock::Reset => {
            // SO_LINGER 0: close sends RST instead of FIN.
            if let Some(socket) = tcp.socket() {
                let _ = socket.set_linger(Some(Duration::ZERO));
            }
        }
    }
}

/// Reads until the ClientHello is complete, invalid, over `max` bytes, or `timeout` passes.
async fn read_client_hello(
    tcp: &mut Accepted,
    buf: &mut BytesMut,
    max: usize,
    timeout: Duration,
) -> Hello {
    let mut parser = ClientHelloParser::new(max);
    let read = async {
        loop {
            match parser.advance(buf) {
                Parse::Incomplete => {}
                done => return Hello::Parsed(done),
            }
            // Never buffer past the limit: the parser reports oversize once it is reached.
            // Grown a read at a time: nearly every ClientHello fits the first 4 KiB, and
            // reserving the whole limit up front cost a second allocation per connection.
            let room = max.saturating_sub(buf.len()).max(1);
            buf.reserve(room.min(HELLO_READ));
            let mut limited = (&mut *tcp).take(room as u64);
            match limited.read_buf(buf).await {
                Ok(0) | Err(_) if buf.is_empty() => return Hello::Nothing,
                Ok(0) | Err(_) => return Hello::Truncated,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .unwrap_or(Hello::Truncated)
}

struct BlockPageJob {
    host: String,
    reason: Reason,
    shared: Arc<Shared>,
}

/// Completes the handshake with the block certificate and answers every request on the
/// connection with the block page for the SNI's reason.
async fn serve_block_page(acceptor: TlsAcceptor, io: Prefixed<Accepted>, job: BlockPageJob) {
    let handshake_timeout = job
        .shared
        .generation
        .load()
        .config
        .limits
        .header_read_timeout;
    let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(io)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            debug!(error = %e, "block page handshake failed");
            return;
        }
        Err(_) => return,
    };
    let job = Arc::new(job);
    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let job = job.clone();
        async move {
            let id = RequestId::next();
            let json = wants_json(&req);
            let ctx = BlockContext {
                host: &job.host,
                reason: job.reason,
                request_id: id.as_str(),
            };
            let resp = job.shared.generation.load().block_page.response(&ctx, json);
            Ok::<_, std::convert::Infallible>(
                resp.map(|b| Either::<_, hyper::body::Incoming>::Left(Full::new(b))),
            )
        }
    });
    let _ = auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(tls), svc)
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alert_is_a_fatal_access_denied() {
        assert_eq!(ACCESS_DENIED_ALERT[0], 21, "alert content type");
        assert_eq!(ACCESS_DENIED_ALERT[5], 2, "fatal");
        assert_eq!(ACCESS_DENIED_ALERT[6], 49, "access_denied");
    }
}
