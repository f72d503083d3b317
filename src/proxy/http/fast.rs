//! The HTTP/1.1 fast path: serves simple requests ([`http1::parse_request`]) without hyper —
//! the same decision, block page, metrics and log line as the hyper path, and forwards over
//! [`RawOrigins`]. At the first request it does not serve (or cannot read within the limits) it
//! returns the bytes it has read, and hyper serves them and the rest of the connection.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::{Buf, BytesMut};
use http::uri::Authority;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use super::conn::{ConnCtx, log};
use crate::config::Limits;
use crate::core::decision::{Decision, Reason, decide};
use crate::observe::logging::RequestId;
use crate::observe::metrics::UpstreamError;
use crate::proxy::block_page::{BlockContext, upstream_error_answer};
use crate::proxy::deadline::Deadline;
use crate::proxy::forward::{self, ExchangeError, Outgoing};
use crate::proxy::io::{InFlight, SendLast, Watched, write_all_last, write_all_two};
use crate::proxy::state::Generation;
use crate::wire::host::{self};
use crate::wire::http1::{self, RequestHead};

/// First read buffer of a connection; it grows up to `limits.max_header_bytes` for a long head.
const INITIAL_BUFFER: usize = 4096;

/// Serves requests until the connection ends (`None`) or a request needs hyper: then returns
/// everything read from the client that has not been answered, that request first.
pub(super) async fn serve<S>(
    io: &mut Watched<S>,
    ctx: &ConnCtx,
    limits: &Limits,
) -> Option<BytesMut>
where
    S: AsyncRead + AsyncWrite + SendLast + Unpin,
{
    let mut buf = BytesMut::with_capacity(INITIAL_BUFFER);
    // Heads (answers, origin requests) and, beside them, the body of a block answer; both
    // reused from one request to the next.
    let mut out = Vec::with_capacity(1024);
    let mut body = Vec::new();
    // One timer per connection ([`Deadline`]) for, in turn: the next request head, complete by
    // `header_read_timeout` after the connection opened or the last answer (an idle keep-alive
    // connection closes then, as with hyper), and a forwarded request's response head, by
    // `origin_response_timeout` after the request.
    let timer = tokio::time::sleep(limits.header_read_timeout);
    tokio::pin!(timer);
    let mut deadline = Deadline::new(timer);
    loop {
        let step = if buf.is_empty() {
            Step::Partial
        } else {
            out.clear();
            prepare(&buf, ctx, limits, &mut out, &mut body)
        };
        let answering = !matches!(step, Step::Partial | Step::Handoff);
        ctx.answering.store(answering, Ordering::Relaxed);
        let done = match step {
            Step::Partial => {
                if buf.len() >= limits.max_header_bytes {
                    // hyper answers 431.
                    return Some(buf);
                }
                buf.reserve(INITIAL_BUFFER);
                tokio::select! {
                    biased;
                    read = io.read_buf(&mut buf) => match read {
                        Ok(0) | Err(_) => return None,
                        Ok(_) => continue,
                    },
                    () = deadline.passed() => return None,
                }
            }
            Step::Handoff => return Some(buf),
            Step::Answer(mut request, status) => {
                request.in_flight = None;
                request.close |= write_answer(io, &out, &body, request.close).await.is_err();
                request.finish(ctx, status)
            }
            Step::Forward(mut request, forward) => {
                let outgoing = Outgoing {
                    origin: &forward.origin,
                    head: &out,
                    idempotent: forward.idempotent,
                    head_request: request.head_request,
                    close: request.close,
                };
                let timeout = forward.runtime.config.limits.origin_response_timeout;
                deadline.set(tokio::time::Instant::from_std(request.started) + timeout);
                let raw = &forward.runtime.raw_origins;
                let in_flight = request.in_flight.take();
                match raw
                    .exchange(&outgoing, &mut deadline, io, || drop(in_flight))
                    .await
                {
                    Ok(relayed) => {
                        request.close |= relayed.close;
                        request.finish(ctx, relayed.status)
                    }
                    Err(ExchangeError::Broken { status }) => {
                        request.close = true;
                        request.finish(ctx, status)
                    }
                    Err(ExchangeError::Upstream(kind)) => {
                        answer_upstream_error(io, ctx, request, kind, &mut out).await
                    }
                    Err(ExchangeError::Bad(_)) => {
                        answer_upstream_error(io, ctx, request, UpstreamError::Reset, &mut out)
                            .await
                    }
                }
            }
        };
        ctx.answering.store(false, Ordering::Relaxed);
        buf.advance(done.len);
        deadline.set(tokio::time::Instant::from_std(done.at) + limits.header_read_timeout);
        if done.close || ctx.shared.drain.is_cancelled() {
            return None;
        }
    }
}

/// The origin failed before sending a response: 502 or 504.
async fn answer_upstream_error<S>(
    io: &mut Watched<S>,
    ctx: &ConnCtx,
    mut request: Request<'_>,
    kind: UpstreamError,
    out: &mut Vec<u8>,
) -> Finished
where
    S: AsyncRead + AsyncWrite + SendLast + Unpin,
{
    ctx.spec.metrics.upstream_error(kind);
    out.clear();
    let answer = upstream_error_answer(kind, request.id.as_str());
    let status = answer.status.as_u16();
    answer.write_head(out, request.close);
    let body = if request.head_request {
        &[][..]
    } else {
        &answer.body[..]
    };
    request.close |= write_answer(io, out, body, request.close).await.is_err();
    request.finish(ctx, status)
}

/// Writes an answer; the last one on the connection so that the FIN goes with it.
async fn write_answer<S>(
    io: &mut Watched<S>,
    head: &[u8],
    body: &[u8],
    last: bool,
) -> std::io::Result<()>
where
    S: AsyncWrite + SendLast + Unpin,
{
    if last {
        write_all_last(io, head, body).await
    } else {
        write_all_two(io, head, body).await
    }
}

enum Step<'c> {
    /// No complete request head yet.
    Partial,
    /// hyper serves this request and the rest of the connection.
    Handoff,
    /// The answer, with this status, is in `out` (head) and `body`.
    Answer(Request<'c>, u16),
    /// The request for the origin is in `out`.
    Forward(Request<'c>, Forward),
}

/// A request being served, for its log line.
struct Request<'c> {
    /// Its length in the buffer.
    len: usize,
    head_request: bool,
    /// The connection closes after the answer.
    close: bool,
    host: String,
    decision: Decision,
    reason: Reason,
    id: RequestId,
    started: Instant,
    /// Held while the request is being decided and, when forwarded, until the origin's head
    /// arrives; dropped before anything is written, as on hyper's path, so a client that stops
    /// reading is closed by the idle watchdog.
    in_flight: Option<InFlight<'c>>,
}

impl Request<'_> {
    /// Records the request (metrics, access log).
    fn finish(self, ctx: &ConnCtx, status: u16) -> Finished {
        let now = Instant::now();
        let took = now - self.started;
        ctx.spec
            .metrics
            .observe_duration(self.decision, took.as_secs_f64());
        log(
            ctx,
            &self.host,
            self.decision,
            self.reason,
            Some(status),
            &self.id,
            took,
        );
        Finished {
            len: self.len,
            close: self.close,
            at: now,
        }
    }
}

/// A request answered.
struct Finished {
    len: usize,
    close: bool,
    at: Instant,
}

struct Forward {
    origin: Authority,
    idempotent: bool,
    /// For the origin pool and timeout: the config the request was decided under.
    runtime: Arc<Generation>,
}

/// Decides the request at the start of `buf` and writes what to send into `out` (the answer's
/// head, its body into `body`, or the origin request). Nothing is counted or logged for a
/// request handed to hyper, which decides it again.
fn prepare<'c>(
    buf: &[u8],
    ctx: &'c ConnCtx,
    limits: &Limits,
    out: &mut Vec<u8>,
    body: &mut Vec<u8>,
) -> Step<'c> {
    let mut headers = http1::header_slots();
    let req = match http1::parse_request(buf, &mut headers) {
        RequestHead::Partial => return Step::Partial,
        RequestHead::Other => return Step::Handoff,
        // Over the limit: hyper answers 431.
        RequestHead::Simple(req) if req.len > limits.max_header_bytes => return Step::Handoff,
        RequestHead::Simple(req) => req,
    };
    // A host that does not parse is a 400 from the hyper path.
    let Ok(host) = host::parse_authority(req.host) else {
        return Step::Handoff;
    };
    let started = Instant::now();
    // Borrowed for the decision; only a forward keeps its own reference.
    let runtime = ctx.shared.generation.load();
    let snapshot = ctx.shared.registry.load();
    let verdict = decide(
        ctx.ends.dst.ip(),
        (&host).into(),
        &snapshot,
        &runtime.policy,
    );
    let forward = match verdict.decision {
        Decision::Refuse => return Step::Handoff,
        Decision::Block if verdict.protocol_error => return Step::Handoff,
        Decision::Block => None,
        Decision::Allow | Decision::Report => match verdict.route {
            Some(route) if route.send_proxy_protocol.is_none() => match &route.http_origin {
                Some(origin) => Some((route, origin.authority().clone())),
                None => return Step::Handoff,
            },
            _ => return Step::Handoff,
        },
    };
    ctx.spec.metrics.request(verdict.decision, verdict.reason);
    let request = Request {
        len: req.len,
        head_request: req.is_head(),
        close: req.close || ctx.shared.drain.is_cancelled(),
        host: host.to_text().into_owned(),
        decision: verdict.decision,
        reason: verdict.reason,
        id: RequestId::next(),
        started,
        in_flight: Some(ctx.activity.request()),
    };
    match forward {
        None => {
            let page = BlockContext {
                host: &request.host,
                reason: verdict.reason,
                request_id: request.id.as_str(),
            };
            let answer = runtime.block_page.answer_in(&page, req.json, body);
            let status = answer.status.as_u16();
            answer.write_head(out, request.close);
            if request.head_request {
                body.clear();
            }
            Step::Answer(request, status)
        }
        Some((route, origin)) => {
            let forwarded_for = route.x_forwarded_for.then(|| {
                ctx.client_ip
                    .get_or_init(|| forward::client_ip_value(ctx.ends.client))
                    .as_bytes()
            });
            http1::write_origin_request(out, &req, forwarded_for);
            Step::Forward(
                request,
                Forward {
                    origin,
                    idempotent: req.is_idempotent(),
                    runtime: Arc::clone(&runtime),
                },
            )
        }
    }
}
