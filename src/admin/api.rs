//! The `/v1` registry API: read, write and decide, each write acknowledged only once durable
//! and enforced.

use std::net::IpAddr;

use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::json;

use super::answer::{Answer, error, json_answer};
use super::ndjson::read_ndjson;
use super::query::{Query, percent_decode};
use crate::core::decision::{HostInput, decide};
use crate::proxy::state::Shared;
use crate::registry::{
    Applied, Entry, EntryError, MAX_JOURNAL_RECORD, Op, RawEntry, SnapshotBuilder, WriteError,
    WriteKind, journal_record_len, normalize_domain,
};
use crate::wire::host;

/// Largest body of a single-entry PUT.
const MAX_ENTRY_BODY: usize = 64 * 1024;

pub(super) async fn v1(req: Request<Incoming>, path: &str, shared: &Shared) -> Answer {
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
            let s = shared.registry.load_full();
            // The first digest of a large registry is a pass over every entry: off the runtime.
            let digest = {
                let s = s.clone();
                tokio::task::spawn_blocking(move || s.digest_hex())
                    .await
                    .unwrap_or_default()
            };
            json_answer(
                StatusCode::OK,
                json!({"revision": s.revision(), "entries": s.len(), "digest": digest}),
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
    let result = match shared.fleet() {
        Some(fleet) => fleet.replace(builder, expect).await,
        None => writer.replace(builder, expect).await,
    };
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
    match (shared.writer(), shared.fleet()) {
        (Some(_), Some(fleet)) => fleet.write(kind, ops, expect).await,
        (Some(writer), None) => writer.write(kind, ops, expect).await,
        (None, _) => Err(WriteError::Storage("registry still loading".into())),
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
        Err(e @ (WriteError::Storage(_) | WriteError::OutOfOrder { .. })) => {
            count(shared, kind, "error");
            error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
        Err(e @ WriteError::Unavailable(_)) => {
            count(shared, kind, "unavailable");
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
