//! The HTTP listener (`kind = "http"`): HTTP/1.1 with keep-alive and pipelining, and HTTP/2 with
//! prior knowledge (h2c). Every request is decided on its own — a kept-alive or multiplexed
//! connection earns no trust from its first request.
//!
//! Simple HTTP/1.1 requests are served by the hand-written fast path ([`fast`]); the first
//! request that is not simple, and the rest of its connection, by hyper (here).
//!
//! Per request: find the host (docs/behaviour.md#host-normalisation), [`decide`], then answer with the block page, a 400 for a
//! malformed request, or forward to the route's origin.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bytes::Bytes;
use http::header::HOST;
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

mod conn;
mod fast;

use conn::{ConnCtx, log};

use crate::config::Limits;
use crate::core::decision::{Decision, HostInput, decide};
use crate::observe::logging::RequestId;
use crate::proxy::block_page::{BlockContext, error_response, upstream_error_answer, wants_json};
use crate::proxy::forward::{self, ForwardError, ForwardOptions, OriginBody, OriginClient};
use crate::proxy::io::{Activity, Prefixed, SendLast, Watched, watchdog};
use crate::proxy::relay;
use crate::proxy::state::{Endpoints, ListenerSpec, Shared};
use crate::wire::host::{self, Host};

/// Response bodies: icp-gate's own answers, or the origin's streamed body.
pub(crate) type Body = Either<Full<Bytes>, OriginBody>;

/// Serves one client connection until it closes, idles out or the process drains: the fast
/// path ([`fast`]) while requests are simple, then hyper for the rest of the connection.
pub(crate) async fn serve<S>(io: S, ends: Endpoints, spec: Arc<ListenerSpec>, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + SendLast + Unpin + Send + 'static,
{
    let limits = shared.generation.load().config.limits.clone();
    let activity = Arc::new(Activity::default());
    let drain = shared.drain.token();
    let ctx = Arc::new(ConnCtx {
        ends,
        spec,
        shared,
        activity: activity.clone(),
        proxied: OnceLock::new(),
        client_ip: OnceLock::new(),
        answering: AtomicBool::new(false),
    });
    let mut io = Watched::new(io, activity.clone());
    let dog = watchdog(
        activity.clone(),
        limits.header_read_timeout,
        limits.idle_timeout,
    );
    tokio::pin!(dog);

    let rest = {
        let fast = fast::serve(&mut io, &ctx, &limits);
        tokio::pin!(fast);
        let mut draining = false;
        loop {
            // Biased: a connection answered at its first poll (one request, `Connection:
            // close`) never registers the drain waiter or the watchdog's timer.
            tokio::select! {
                biased;
                rest = fast.as_mut() => break rest,
                // A request in flight finishes (with `connection: close`); an idle connection
                // closes now.
                _ = drain.cancelled(), if !draining => {
                    if !ctx.answering.load(Ordering::Relaxed) {
                        return;
                    }
                    draining = true;
                }
                _ = &mut dog => {
                    debug!(client = %ends.client, "closing idle http connection");
                    return;
                }
            }
        }
    };
    let Some(rest) = rest else { return };

    // A copy, so a long-lived connection does not pin the config it started under.
    let http = ctx.shared.generation.load().http.clone();
    let svc = service_fn(move |req| {
        let ctx = ctx.clone();
        async move { handle(req, &ctx).await }
    });
    let conn =
        http.serve_connection_with_upgrades(TokioIo::new(Prefixed::new(rest.freeze(), io)), svc);
    tokio::pin!(conn);
    let mut draining = false;
    loop {
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    debug!(client = %ends.client, error = %e, "http connection ended with an error");
                }
                return;
            }
            _ = drain.cancelled(), if !draining => {
                // Finish the request in flight, then close.
                conn.as_mut().graceful_shutdown();
                draining = true;
            }
            _ = &mut dog, if !draining => {
                debug!(client = %ends.client, "closing idle http connection");
                return;
            }
        }
    }
}

/// Returned to hyper to close the connection without an answer (no route).
#[derive(Debug, thiserror::Error)]
#[error("no route for the destination")]
struct Refused;

async fn handle(req: Request<Incoming>, ctx: &ConnCtx) -> Result<Response<Body>, Refused> {
    let started = Instant::now();
    let _in_flight = ctx.activity.request();
    let id = RequestId::next();
    let runtime = ctx.shared.generation.load_full();
    let json = wants_json(&req);

    let target = target(&req);
    let (decision, reason, protocol_error, route, host_text) = {
        let input = match &target {
            Target::Host(host) => HostInput::from(host),
            Target::Missing { required } => HostInput::Missing {
                required: *required,
            },
            Target::Invalid(_) => HostInput::Invalid,
        };
        let snapshot = ctx.shared.registry.load();
        let v = decide(ctx.ends.dst.ip(), input, &snapshot, &runtime.policy);
        (
            v.decision,
            v.reason,
            v.protocol_error,
            v.route,
            target.text(),
        )
    };
    drop(target);
    ctx.spec.metrics.request(decision, reason);

    let resp: Response<Body> = match decision {
        Decision::Refuse => {
            log(
                ctx,
                &host_text,
                decision,
                reason,
                None,
                &id,
                started.elapsed(),
            );
            return Err(Refused);
        }
        Decision::Block if protocol_error => {
            error_response(StatusCode::BAD_REQUEST, Some(reason), id.as_str()).map(own)
        }
        Decision::Block => {
            let page = BlockContext {
                host: &host_text,
                reason,
                request_id: id.as_str(),
            };
            runtime.block_page.response(&page, json).map(own)
        }
        Decision::Allow | Decision::Report => match route
            .and_then(|r| r.http_origin.as_ref().map(|o| (r, o)))
        {
            _ if req.method() == Method::CONNECT => {
                error_response(StatusCode::METHOD_NOT_ALLOWED, None, id.as_str()).map(own)
            }
            // The config requires an http_origin on every route when an http listener exists.
            None => error_response(StatusCode::BAD_GATEWAY, None, id.as_str()).map(own),
            Some((route, origin)) => {
                let client = match route.send_proxy_protocol {
                    Some(version) => ctx.proxied.get_or_init(|| {
                        forward::proxied_origin_client(
                            &runtime.config.limits,
                            version,
                            ctx.ends.client,
                            ctx.ends.dst,
                        )
                    }),
                    None => &runtime.origins,
                };
                let forwarded_for = route.x_forwarded_for.then(|| {
                    ctx.client_ip
                        .get_or_init(|| forward::client_ip_value(ctx.ends.client))
                });
                let opts = ForwardOptions {
                    origin,
                    forwarded_for,
                    upgrade: forward::upgrade_offer(req.headers()),
                };
                let tunnel = reason.registry_allowed().then_some(host_text.as_str());
                forward_request(req, client, opts, ctx, &runtime.config.limits, &id, tunnel).await
            }
        },
    };
    let status = resp.status().as_u16();
    let took = started.elapsed();
    ctx.spec
        .metrics
        .observe_duration(decision, took.as_secs_f64());
    log(ctx, &host_text, decision, reason, Some(status), &id, took);
    Ok(resp)
}

async fn forward_request(
    mut req: Request<Incoming>,
    client: &OriginClient,
    opts: ForwardOptions<'_>,
    ctx: &ConnCtx,
    limits: &Limits,
    id: &RequestId,
    // The host, when a registry entry allowed it: an upgraded connection then closes if an
    // update blocks the host.
    tunnel_host: Option<&str>,
) -> Response<Body> {
    let client_upgrade = opts.upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
    let origin = opts.origin;
    match forward::forward(client, req, opts, limits.origin_response_timeout).await {
        Ok(mut resp) => {
            if let (Some(client_side), StatusCode::SWITCHING_PROTOCOLS) =
                (client_upgrade, resp.status())
            {
                let origin_side = hyper::upgrade::on(&mut resp);
                let idle = limits.idle_timeout;
                let stop = ctx.shared.drain.child_token();
                let registered = tunnel_host.and_then(|host| {
                    let registrable = host::registrable_domain(host)?;
                    Some(ctx.shared.tunnels.register(
                        host,
                        registrable,
                        ctx.ends.dst.ip(),
                        stop.clone(),
                    ))
                });
                ctx.shared.tasks.spawn(async move {
                    let _registered = registered;
                    match tokio::try_join!(client_side, origin_side) {
                        Ok((c, o)) => {
                            relay::relay(TokioIo::new(c), TokioIo::new(o), idle, stop).await;
                        }
                        Err(e) => debug!(error = %e, "upgrade failed"),
                    }
                });
            }
            resp.map(Either::Right)
        }
        Err(ForwardError::Upstream(kind)) => {
            ctx.spec.metrics.upstream_error(kind);
            debug!(%origin, kind = kind.as_str(), "origin error");
            upstream_error_answer(kind, id.as_str())
                .into_response()
                .map(own)
        }
        Err(ForwardError::ClientBody) => {
            error_response(StatusCode::BAD_REQUEST, None, id.as_str()).map(own)
        }
    }
}

/// One of icp-gate's own answers as a response body.
fn own(body: Bytes) -> Body {
    Either::Left(Full::new(body))
}

/// The host a request is for.
enum Target<'a> {
    Host(Host<'a>),
    Missing {
        required: bool,
    },
    /// Unparseable, several `Host` headers, or `:authority` and `Host` that disagree.
    Invalid(&'a [u8]),
}

impl Target<'_> {
    /// The host as logged and shown on the block page.
    fn text(&self) -> String {
        match self {
            Target::Host(h) => h.to_text().into_owned(),
            Target::Missing { .. } => String::new(),
            Target::Invalid(raw) => String::from_utf8_lossy(raw).into_owned(),
        }
    }
}

/// The absolute-form target's authority wins over `Host` in HTTP/1.x (RFC 9112 §3.2.2);
/// in HTTP/2 `:authority` wins, and a `Host` that names something else is an error. More than
/// one `Host` header is always an error.
fn target<B>(req: &Request<B>) -> Target<'_> {
    let mut hosts = req.headers().get_all(HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Target::Invalid(host.map_or(&[][..], |h| h.as_bytes()));
    }
    let authority = req.uri().authority().map(|a| a.as_str().as_bytes());
    match (req.version(), authority, host) {
        (Version::HTTP_2 | Version::HTTP_3, Some(auth), host) => {
            let Ok(from_authority) = parse(auth) else {
                return Target::Invalid(auth);
            };
            if let Some(h) = host {
                if parse(h.as_bytes()).ok().as_ref() != Some(&from_authority) {
                    return Target::Invalid(h.as_bytes());
                }
            }
            Target::Host(from_authority)
        }
        (_, Some(auth), _) => match parse(auth) {
            Ok(h) => Target::Host(h),
            Err(()) => Target::Invalid(auth),
        },
        (_, None, Some(h)) if h.is_empty() => Target::Missing { required: false },
        (_, None, Some(h)) => match parse(h.as_bytes()) {
            Ok(host) => Target::Host(host),
            Err(()) => Target::Invalid(h.as_bytes()),
        },
        (version, None, None) => Target::Missing {
            // HTTP/1.0 may omit Host; HTTP/1.1 and HTTP/2 requests must name one.
            required: version != Version::HTTP_10 && version != Version::HTTP_09,
        },
    }
}

fn parse(raw: &[u8]) -> Result<Host<'_>, ()> {
    host::parse_authority(raw).map_err(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(version: Version, uri: &str, hosts: &[&str]) -> Request<()> {
        let mut b = Request::builder().version(version).uri(uri);
        for h in hosts {
            b = b.header(HOST, *h);
        }
        b.body(()).unwrap()
    }

    fn name(t: Target<'_>) -> Option<String> {
        match t {
            Target::Host(h) => Some(h.to_text().into_owned()),
            _ => None,
        }
    }

    #[test]
    fn host_header_is_normalised() {
        assert_eq!(
            name(target(&req(Version::HTTP_11, "/", &["WWW.Filed.CN.:8080"]))).as_deref(),
            Some("www.filed.cn")
        );
    }

    #[test]
    fn absolute_form_wins_over_host() {
        let r = req(Version::HTTP_11, "http://unfiled.cn/x", &["filed.cn"]);
        assert_eq!(name(target(&r)).as_deref(), Some("unfiled.cn"));
        let r = req(
            Version::HTTP_11,
            "http://filed.cn@unfiled.cn/x",
            &["filed.cn"],
        );
        assert!(matches!(target(&r), Target::Invalid(_)));
    }

    #[test]
    fn duplicate_host_is_invalid() {
        assert!(matches!(
            target(&req(Version::HTTP_11, "/", &["a.cn", "a.cn"])),
            Target::Invalid(_)
        ));
    }

    #[test]
    fn http2_authority_must_agree_with_host() {
        let ok = req(Version::HTTP_2, "https://Filed.cn/", &["filed.cn:443"]);
        assert_eq!(name(target(&ok)).as_deref(), Some("filed.cn"));
        let bad = req(Version::HTTP_2, "https://filed.cn/", &["unfiled.cn"]);
        assert!(matches!(target(&bad), Target::Invalid(_)));
        let host_only = req(Version::HTTP_2, "/", &["filed.cn"]);
        assert_eq!(name(target(&host_only)).as_deref(), Some("filed.cn"));
    }

    #[test]
    fn missing_host() {
        assert!(matches!(
            target(&req(Version::HTTP_10, "/", &[])),
            Target::Missing { required: false }
        ));
        assert!(matches!(
            target(&req(Version::HTTP_11, "/", &[])),
            Target::Missing { required: true }
        ));
        assert!(matches!(
            target(&req(Version::HTTP_11, "/", &[""])),
            Target::Missing { required: false }
        ));
    }
}
