//! The admin listener (docs/registry-api.md): Prometheus metrics, health checks, and the `/v1` registry API
//! the filing system calls.
//!
//! `/metrics`, `/healthz` and `/readyz` are open. `/v1` needs the bearer token from
//! `admin.token_file` (401 without, 403 when wrong; compared in constant time) and, when
//! `admin.client_ca` is set, a client certificate signed by that CA. Errors are JSON objects
//! `{"error": "..."}` naming the problem; NDJSON errors name the 1-based line.

use std::convert::Infallible;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::config::{AdminConfig, tls};
use crate::core::decision::{HostInput, decide};
use crate::proxy::state::Shared;
use crate::registry::{
    Applied, Entry, EntryError, MAX_JOURNAL_RECORD, Op, RawEntry, SnapshotBuilder, WriteError,
    WriteKind, journal_record_len, normalize_domain,
};
use crate::wire::host::{self};

/// Largest body of a single-entry PUT.
const MAX_ENTRY_BODY: usize = 64 * 1024;
/// Longest NDJSON line accepted in a batch or replace.
const MAX_LINE: usize = 64 * 1024;

/// How the admin listener authenticates `/v1`.
pub(crate) struct AdminAuth {
    token: Option<Vec<u8>>,
    tls: Option<TlsAcceptor>,
    require_client_cert: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin.token_file {}: {source}", path.display())]
    Token {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("admin.token_file {}: the token is empty", .0.display())]
    EmptyToken(std::path::PathBuf),
    #[error("admin TLS: {0}")]
    Tls(String),
}

impl AdminAuth {
    pub(crate) fn load(cfg: &AdminConfig) -> Result<AdminAuth, AdminError> {
        let token = match &cfg.token_file {
            Some(path) => {
                let text = std::fs::read(path).map_err(|source| AdminError::Token {
                    path: path.clone(),
                    source,
                })?;
                let token = text.trim_ascii().to_vec();
                if token.is_empty() {
                    return Err(AdminError::EmptyToken(path.clone()));
                }
                Some(token)
            }
            None => None,
        };
        let tls = match &cfg.tls {
            Some((cert, key)) => {
                Some(admin_acceptor(cert, key, cfg.client_ca.as_deref()).map_err(AdminError::Tls)?)
            }
            None => None,
        };
        Ok(AdminAuth {
            token,
            tls,
            require_client_cert: cfg.client_ca.is_some(),
        })
    }
}

/// TLS for the admin listener. With a client CA, certificates are verified when offered but not
/// demanded at the handshake, so Prometheus can scrape `/metrics` without one; `/v1` then
/// requires a verified certificate.
fn admin_acceptor(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<TlsAcceptor, String> {
    let config = tls::server_config(cert, key, client_ca, &[])?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Serves the admin listener until the process drains.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>, auth: AdminAuth) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, tls = auth.tls.is_some(), "admin listening");
    }
    let auth = Arc::new(auth);
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
                None => connection(stream, false, shared, auth.clone()).await,
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(tls) => {
                        let verified = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .is_some_and(|c| !c.is_empty());
                        connection(tls, verified, shared, auth.clone()).await
                    }
                    Err(e) => debug!(client = %peer, error = %e, "admin TLS handshake failed"),
                },
            }
        });
    }
}

async fn connection<S>(io: S, client_verified: bool, shared: Arc<Shared>, auth: Arc<AdminAuth>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| {
        let shared = shared.clone();
        let auth = auth.clone();
        async move { Ok::<_, Infallible>(route(req, &shared, &auth, client_verified).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .serve_connection(TokioIo::new(io), svc);
    if let Err(e) = conn.await {
        debug!(error = %e, "admin connection error");
    }
}

type Answer = Response<Full<Bytes>>;

async fn route(
    req: Request<Incoming>,
    shared: &Shared,
    auth: &AdminAuth,
    client_verified: bool,
) -> Answer {
    let path = req.uri().path().to_string();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/metrics") => {
            let writable = shared
                .writer()
                .is_some_and(|w| w.storage_failure().is_none());
            shared.metrics.registry_writable.set(i64::from(writable));
            let mut resp = Response::new(Full::new(Bytes::from(shared.metrics.render())));
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
            if let Some(denied) = refusal(&req, auth, client_verified) {
                return denied;
            }
            v1(req, &path, shared).await
        }
        _ => error(StatusCode::NOT_FOUND, format!("no such endpoint: {path}")),
    }
}

/// The answer refusing a `/v1` request, or `None` when it may proceed.
fn refusal(req: &Request<Incoming>, auth: &AdminAuth, client_verified: bool) -> Option<Answer> {
    let Some(token) = &auth.token else {
        return Some(error(
            StatusCode::FORBIDDEN,
            "the registry API is disabled: set admin.token_file",
        ));
    };
    if auth.require_client_cert && !client_verified {
        return Some(error(
            StatusCode::FORBIDDEN,
            "a client certificate signed by admin.client_ca is required",
        ));
    }
    let presented = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .map(<[u8]>::trim_ascii);
    match presented {
        None => {
            let mut resp = error(StatusCode::UNAUTHORIZED, "missing bearer token");
            resp.headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            Some(resp)
        }
        Some(p) if bool::from(p.ct_eq(token)) => None,
        Some(_) => Some(error(StatusCode::FORBIDDEN, "wrong bearer token")),
    }
}

async fn v1(req: Request<Incoming>, path: &str, shared: &Shared) -> Answer {
    let query = Query::parse(req.uri().query());
    let expect = match query.get("expect_revision").map(str::parse::<u64>) {
        None => None,
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "expect_revision: not a revision number",
            );
        }
    };
    let method = req.method().clone();
    if let Some(raw) = path.strip_prefix("/v1/registry/entries/") {
        let Some(decoded) = percent_decode(raw) else {
            return error(StatusCode::BAD_REQUEST, "domain: bad percent-encoding");
        };
        let domain = match normalize_domain(&decoded) {
            Ok(d) => d,
            Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
        };
        return match method {
            Method::GET => match shared.registry.load().get(&domain) {
                Some(e) => json_answer(
                    StatusCode::OK,
                    serde_json::to_value(e.to_entry()).unwrap_or_default(),
                ),
                None => error(StatusCode::NOT_FOUND, format!("no entry for {domain}")),
            },
            Method::PUT => put_entry(req, domain, expect, shared).await,
            Method::DELETE => {
                let result =
                    write(shared, WriteKind::Delete, vec![Op::Delete(domain)], expect).await;
                written(
                    shared,
                    WriteKind::Delete,
                    result,
                    |a| json!({"revision": a.revision}),
                )
            }
            _ => error(StatusCode::METHOD_NOT_ALLOWED, "use GET, PUT or DELETE"),
        };
    }
    match (method, path) {
        (Method::GET, "/v1/registry") => {
            let s = shared.registry.load();
            json_answer(
                StatusCode::OK,
                json!({"revision": s.revision(), "entries": s.len()}),
            )
        }
        (Method::PUT, "/v1/registry") => replace(req, expect, shared).await,
        (Method::POST, "/v1/registry/batch") => batch(req, expect, shared).await,
        (Method::GET, "/v1/decision") => decision(&query, shared),
        (_, "/v1/registry" | "/v1/registry/batch" | "/v1/decision") => error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("method not allowed on {path}"),
        ),
        _ => error(StatusCode::NOT_FOUND, format!("no such endpoint: {path}")),
    }
}

async fn put_entry(
    req: Request<Incoming>,
    domain: String,
    expect: Option<u64>,
    shared: &Shared,
) -> Answer {
    let body = match Limited::new(req.into_body(), MAX_ENTRY_BODY)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("body: {e}")),
    };
    let entry = match serde_json::from_slice::<RawEntry>(&body)
        .map_err(|e| EntryError::Json(e.to_string()))
        .and_then(RawEntry::validate)
    {
        Ok(e) => e,
        Err(e) => {
            count(shared, WriteKind::Put, "invalid");
            return error(StatusCode::BAD_REQUEST, e.to_string());
        }
    };
    if entry.domain != domain {
        count(shared, WriteKind::Put, "invalid");
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "body domain {} differs from the path's {domain}",
                entry.domain
            ),
        );
    }
    let result = write(shared, WriteKind::Put, vec![Op::Put(entry)], expect).await;
    written(
        shared,
        WriteKind::Put,
        result,
        |a| json!({"revision": a.revision}),
    )
}

/// One line of a batch body.
#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
enum BatchLine {
    Put { entry: RawEntry },
    Delete { domain: String },
}

async fn batch(req: Request<Incoming>, expect: Option<u64>, shared: &Shared) -> Answer {
    let parsed = read_ndjson(req.into_body(), Vec::new(), |ops: &mut Vec<Op>, line| {
        let op = match serde_json::from_str::<BatchLine>(line).map_err(|e| e.to_string())? {
            BatchLine::Put { entry } => Op::Put(entry.validate().map_err(|e| e.to_string())?),
            BatchLine::Delete { domain } => {
                Op::Delete(normalize_domain(&domain).map_err(|e| e.to_string())?)
            }
        };
        ops.push(op);
        Ok(())
    })
    .await;
    let ops = match parsed {
        Ok(ops) if ops.is_empty() => {
            count(shared, WriteKind::Batch, "invalid");
            return error(StatusCode::BAD_REQUEST, "empty batch");
        }
        Ok(ops) => ops,
        Err(e) => {
            count(shared, WriteKind::Batch, "invalid");
            return error(StatusCode::BAD_REQUEST, e);
        }
    };
    // Refused here, not queued: it could never be stored.
    let bytes = journal_record_len(&ops);
    let result = if bytes > MAX_JOURNAL_RECORD as usize {
        Err(WriteError::TooLarge {
            bytes,
            limit: MAX_JOURNAL_RECORD,
        })
    } else {
        write(shared, WriteKind::Batch, ops, expect).await
    };
    written(
        shared,
        WriteKind::Batch,
        result,
        |a| json!({"revision": a.revision, "applied": a.applied}),
    )
}

async fn replace(req: Request<Incoming>, expect: Option<u64>, shared: &Shared) -> Answer {
    let parsed = read_ndjson(req.into_body(), SnapshotBuilder::new(), |builder, line| {
        let entry = Entry::from_json(line).map_err(|e| e.to_string())?;
        builder.push_entry(&entry).map_err(|e| e.to_string())
    })
    .await;
    let builder = match parsed {
        Ok(b) => b,
        Err(e) => {
            count(shared, WriteKind::Replace, "invalid");
            return error(StatusCode::BAD_REQUEST, e);
        }
    };
    let Some(writer) = shared.writer() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "registry still loading");
    };
    let result = writer.replace(builder, expect).await;
    written(
        shared,
        WriteKind::Replace,
        result,
        |a| json!({"revision": a.revision, "entries": a.entries}),
    )
}

fn decision(query: &Query, shared: &Shared) -> Answer {
    let Some(raw_host) = query.get("host") else {
        return error(StatusCode::BAD_REQUEST, "host: required");
    };
    let dst: IpAddr = match query.get("dst").map(str::parse) {
        Some(Ok(ip)) => ip,
        Some(Err(_)) => return error(StatusCode::BAD_REQUEST, "dst: not an IP address"),
        None => return error(StatusCode::BAD_REQUEST, "dst: required"),
    };
    let parsed = host::parse_authority(raw_host.as_bytes());
    let input = HostInput::typed(raw_host, &parsed);
    let runtime = shared.generation.load();
    let snapshot = shared.registry.load();
    let v = decide(dst, input, &snapshot, &runtime.policy);
    json_answer(
        StatusCode::OK,
        json!({
            "decision": v.decision.as_str(),
            "reason": v.reason.as_str(),
            "matched": v.matched.map(|e| e.domain),
            "registrable": v.registrable,
        }),
    )
}

async fn write(
    shared: &Shared,
    kind: WriteKind,
    ops: Vec<Op>,
    expect: Option<u64>,
) -> Result<Applied, WriteError> {
    match shared.writer() {
        Some(writer) => writer.write(kind, ops, expect).await,
        None => Err(WriteError::Storage("registry still loading".into())),
    }
}

/// The answer to a write, counted in `icp_gate_registry_updates_total`.
fn written(
    shared: &Shared,
    kind: WriteKind,
    result: Result<Applied, WriteError>,
    body: impl FnOnce(&Applied) -> serde_json::Value,
) -> Answer {
    match result {
        Ok(applied) => {
            count(shared, kind, "ok");
            json_answer(StatusCode::OK, body(&applied))
        }
        Err(e @ WriteError::Conflict { current, .. }) => {
            count(shared, kind, "conflict");
            json_answer(
                StatusCode::CONFLICT,
                json!({"error": e.to_string(), "revision": current}),
            )
        }
        Err(e @ WriteError::NotFound(_)) => {
            count(shared, kind, "not_found");
            error(StatusCode::NOT_FOUND, e.to_string())
        }
        Err(e @ WriteError::TooLarge { .. }) => {
            count(shared, kind, "too_large");
            error(StatusCode::PAYLOAD_TOO_LARGE, e.to_string())
        }
        Err(e @ WriteError::Storage(_)) => {
            count(shared, kind, "error");
            error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
    }
}

fn count(shared: &Shared, kind: WriteKind, result: &str) {
    shared
        .metrics
        .registry_updates
        .with_label_values(&[kind.as_str(), result])
        .inc();
}

/// Streams an NDJSON body to `each` on a blocking thread (a full replace can carry 10 million
/// lines), stopping at the first bad line with `line N: problem`.
async fn read_ndjson<T, F>(mut body: Incoming, init: T, mut each: F) -> Result<T, String>
where
    T: Send + 'static,
    F: FnMut(&mut T, &str) -> Result<(), String> + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    let parser = tokio::task::spawn_blocking(move || {
        let mut state = init;
        let mut pending = BytesMut::new();
        let mut line_no = 0usize;
        let mut line = |state: &mut T, raw: &[u8], line_no: usize| -> Result<(), String> {
            let text =
                std::str::from_utf8(raw).map_err(|_| format!("line {line_no}: not UTF-8"))?;
            let text = text.trim();
            if text.is_empty() {
                return Ok(());
            }
            each(state, text).map_err(|e| format!("line {line_no}: {e}"))
        };
        while let Some(chunk) = rx.blocking_recv() {
            pending.extend_from_slice(&chunk);
            while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
                let raw = pending.split_to(nl + 1);
                line_no += 1;
                line(&mut state, &raw[..nl], line_no)?;
            }
            if pending.len() > MAX_LINE {
                return Err(format!(
                    "line {}: longer than {MAX_LINE} bytes",
                    line_no + 1
                ));
            }
        }
        if !pending.is_empty() {
            line(&mut state, &pending, line_no + 1)?;
        }
        Ok(state)
    });
    let mut body_error = None;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    // The parser stopped at a bad line: its error is the answer.
                    if tx.send(data).await.is_err() {
                        break;
                    }
                }
            }
            Err(e) => {
                body_error = Some(format!("body: {e}"));
                break;
            }
        }
    }
    drop(tx);
    let parsed = parser
        .await
        .map_err(|e| format!("body parser failed: {e}"))?;
    match (parsed, body_error) {
        (Err(e), _) => Err(e),
        (Ok(_), Some(e)) => Err(e),
        (Ok(state), None) => Ok(state),
    }
}

/// Query parameters, percent-decoded.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(raw: Option<&str>) -> Query {
        Query(
            raw.unwrap_or("")
                .split('&')
                .filter(|p| !p.is_empty())
                .filter_map(|pair| {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    Some((percent_decode(k)?, percent_decode(&v.replace('+', " "))?))
                })
                .collect(),
        )
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn json_answer(status: StatusCode, value: serde_json::Value) -> Answer {
    let mut resp = Response::new(Full::new(Bytes::from(value.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn error(status: StatusCode, message: impl Into<String>) -> Answer {
    json_answer(status, json!({"error": message.into()}))
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Answer {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_and_percent_decoding() {
        let q = Query::parse(Some(
            "host=%E4%BE%8B%E5%AD%90.%E4%B8%AD%E5%9B%BD&dst=10.0.0.1&expect_revision=3",
        ));
        assert_eq!(q.get("host"), Some("例子.中国"));
        assert_eq!(q.get("dst"), Some("10.0.0.1"));
        assert_eq!(q.get("expect_revision"), Some("3"));
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%e4"), None, "not UTF-8");
    }
}
