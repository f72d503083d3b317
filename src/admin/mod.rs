//! The admin listener (docs/registry-api.md): Prometheus metrics, health checks, and the `/v1` registry API
//! the filing system calls.
//!
//! `/metrics`, `/healthz` and `/readyz` are open. `/v1` needs the bearer token from
//! `admin.token_file` (401 without, 403 when wrong; compared in constant time) and, when
//! `admin.client_ca` is set, a client certificate signed by that CA. Errors are JSON objects
//! `{"error": "..."}` naming the problem; NDJSON errors name the 1-based line.

mod answer;
mod api;
mod audit;
mod auth;
mod body;
mod listing;
mod ndjson;
mod query;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::proxy::state::Shared;
use answer::{Answer, AnswerBody, error, text};
use auth::Peer;
pub(crate) use auth::{AdminAuth, AdminError};

/// Serves the admin listener until the process drains.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>, auth: Arc<AdminAuth>) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, tls = auth.tls.is_some(), "admin listening");
    }
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shared.drain.cancelled() => return,
        };
        let shared = shared.clone();
        let auth = auth.clone();
        tokio::spawn(async move {
            match &auth.tls {
                None => connection(stream, Peer::plain(peer), shared, auth.clone()).await,
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(tls) => {
                        // Only a verified certificate is ever presented here: one from another
                        // CA fails the handshake.
                        let cert = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
                        let peer = Peer {
                            addr: peer,
                            verified: cert.is_some(),
                            subject: cert.and_then(|c| auth::subject(c.as_ref())),
                        };
                        connection(tls, peer, shared, auth.clone()).await
                    }
                    Err(e) => debug!(client = %peer, error = %e, "admin TLS handshake failed"),
                },
            }
        });
    }
}

async fn connection<S>(io: S, peer: Peer, shared: Arc<Shared>, auth: Arc<AdminAuth>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let peer = Arc::new(peer);
    let svc = service_fn(move |req| {
        let shared = shared.clone();
        let auth = auth.clone();
        let peer = peer.clone();
        async move { Ok::<_, Infallible>(route(req, &shared, &auth, &peer).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .serve_connection(TokioIo::new(io), svc);
    if let Err(e) = conn.await {
        debug!(error = %e, "admin connection error");
    }
}

async fn route(req: Request<Incoming>, shared: &Shared, auth: &AdminAuth, peer: &Peer) -> Answer {
    let path = req.uri().path().to_string();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/metrics") => {
            let writable = shared
                .writer()
                .is_some_and(|w| w.storage_failure().is_none());
            shared.metrics.registry_writable.set(i64::from(writable));
            let mut resp = Response::new(AnswerBody::full(shared.metrics.render()));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") if shared.is_ready() => {
            match shared.writer().and_then(|w| w.storage_failure()) {
                None => text(StatusCode::OK, "ready\n"),
                Some(why) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("registry writes refused: storage failed: {why}\n"),
                ),
            }
        }
        (&Method::GET, "/readyz") => text(StatusCode::SERVICE_UNAVAILABLE, "loading\n"),
        (_, p) if p == "/v1" || p.starts_with("/v1/") => {
            let op = api::op_name(req.method(), &path);
            match auth.caller(&req, peer) {
                Ok(caller) => api::v1(req, &path, shared, &caller, op).await,
                Err(refused) => {
                    audit::refused(shared, peer, op, &refused);
                    refused.answer
                }
            }
        }
        _ => error(StatusCode::NOT_FOUND, format!("no such endpoint: {path}")),
    }
}
