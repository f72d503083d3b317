//! The `/v1` registry API: read, write and decide, each write acknowledged only once durable
//! and enforced.

use std::net::IpAddr;

use http::header::ALLOW;
use http::{HeaderValue, Method, Request, StatusCode};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::json;
use tracing::warn;

use super::answer::{Answer, ErrorText, error, json_answer};
use super::audit::{self, Outcome};
use super::auth::Caller;
use super::body::{Body, content_length};
use super::listing;
use super::ndjson::read_ndjson;
use super::query::{Query, percent_decode};
use crate::core::decision::{HostInput, decide};
use crate::observe::blocked::Query as BlockedQuery;
use crate::proxy::state::Shared;
use crate::registry::{
    Applied, Entry, EntryError, Guard, MAX_JOURNAL_RECORD, Op, RawEntry, SnapshotBuilder,
    WriteError, WriteKind, journal_record_len, json_problem, normalize_domain,
};
use crate::wire::host;

/// Largest body of a single-entry PUT.
const MAX_ENTRY_BODY: usize = 64 * 1024;

/// The `/v1` endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Registry,
    List,
    Export,
    Entry,
    Batch,
    Decision,
    Blocked,
}

impl Endpoint {
    fn of(path: &str) -> Option<Endpoint> {
        Some(match path {
            "/v1/registry" => Endpoint::Registry,
            "/v1/registry/batch" => Endpoint::Batch,
            "/v1/registry/entries" => Endpoint::List,
            "/v1/registry/export" => Endpoint::Export,
            "/v1/decision" => Endpoint::Decision,
            "/v1/blocked" => Endpoint::Blocked,
            p if p.starts_with("/v1/registry/entries/") => Endpoint::Entry,
            _ => return None,
        })
    }

    /// The methods it takes, as the `Allow` header lists them.
    fn allow(self) -> &'static str {
        match self {
            Endpoint::Registry => "GET, PUT",
            Endpoint::Entry => "GET, PUT, DELETE",
            Endpoint::Batch => "POST",
            Endpoint::Decision | Endpoint::List | Endpoint::Export | Endpoint::Blocked => "GET",
        }
    }

    /// The query parameters `method` takes here; `None` when the method is not allowed.
    fn params(self, method: &Method) -> Option<&'static [&'static str]> {
        const WRITE: &[&str] = &["expect_revision"];
        const GUARDED: &[&str] = &["expect_revision", "allow_shrink"];
        Some(match (self, method.as_str()) {
            (Endpoint::Registry | Endpoint::Entry | Endpoint::Export, "GET") => &[],
            (Endpoint::List, "GET") => &["after", "limit"],
            (Endpoint::Blocked, "GET") => &["top", "listener", "dst"],
            (Endpoint::Registry, "PUT") | (Endpoint::Batch, "POST") => GUARDED,
            (Endpoint::Entry, "PUT" | "DELETE") => WRITE,
            (Endpoint::Decision, "GET") => &["host", "dst"],
            _ => return None,
        })
    }
}

/// The operation a `/v1` request asks for: the `op` of its audit line and metric.
pub(super) fn op_name(method: &Method, path: &str) -> &'static str {
    match (method.as_str(), Endpoint::of(path)) {
        ("PUT", Some(Endpoint::Registry)) => "replace",
        ("GET", Some(Endpoint::Registry)) => "status",
        ("POST", Some(Endpoint::Batch)) => "batch",
        ("PUT", Some(Endpoint::Entry)) => "put",
        ("DELETE", Some(Endpoint::Entry)) => "delete",
        ("GET", Some(Endpoint::Entry)) => "get",
        ("GET", Some(Endpoint::Decision)) => "decision",
        ("GET", Some(Endpoint::List)) => "list",
        ("GET", Some(Endpoint::Export)) => "export",
        ("GET", Some(Endpoint::Blocked)) => "blocked",
        _ => "other",
    }
}

/// What a handler reports for the audit line, besides its answer.
#[derive(Default)]
struct Note {
    /// Entries or operations the call carried.
    entries: usize,
    /// The write that was applied.
    applied: Option<Applied>,
    /// A result more precise than the status says (`shrink` for a 409).
    result: Option<&'static str>,
}

/// Serves one authenticated `/v1` call, counted and (for writes) audited.
pub(super) async fn v1(
    req: Request<Incoming>,
    path: &str,
    shared: &Shared,
    caller: &Caller<'_>,
    op: &'static str,
) -> Answer {
    let mut note = Note::default();
    let answer = handle(req, path, shared, &mut note).await;
    let status = answer.status();
    let result = note.result.unwrap_or(match status.as_u16() {
        200 => "ok",
        400 => "invalid",
        404 => "not_found",
        405 => "not_allowed",
        408 => "timeout",
        409 => "conflict",
        403 => "forbidden",
        413 => "too_large",
        503 => "unavailable",
        _ => "error",
    });
    let (revision_before, revision_after) = match note.applied {
        Some(a) => (a.revision - 1, a.revision),
        None => {
            let now = shared.registry.load().revision();
            (now, now)
        }
    };
    let error = (!status.is_success()).then(|| error_text(&answer));
    let outcome = Outcome {
        op,
        result,
        status: status.as_u16(),
        entries: note.entries,
        revision_before,
        revision_after,
        error,
    };
    let write = matches!(op, "put" | "delete" | "batch" | "replace");
    audit::record(shared, caller, write, &outcome);
    answer
}

/// The `error` of an error answer.
fn error_text(answer: &Answer) -> String {
    answer
        .extensions()
        .get::<ErrorText>()
        .map(|e| e.0.clone())
        .unwrap_or_default()
}

async fn handle(req: Request<Incoming>, path: &str, shared: &Shared, note: &mut Note) -> Answer {
    let Some(endpoint) = Endpoint::of(path) else {
        return error(StatusCode::NOT_FOUND, format!("no such endpoint: {path}"));
    };
    let method = req.method().clone();
    let Some(known) = endpoint.params(&method) else {
        let mut resp = error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!(
                "{method} is not allowed on {path}: use {}",
                endpoint.allow()
            ),
        );
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static(endpoint.allow()));
        return resp;
    };
    let query = Query::parse(req.uri().query());
    let unknown = query.unknown(known);
    if !unknown.is_empty() {
        let takes = if known.is_empty() {
            "none".to_string()
        } else {
            known.join(", ")
        };
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "unknown query parameter{} {}: {method} {path} takes {takes}",
                if unknown.len() > 1 { "s" } else { "" },
                unknown.join(", "),
            ),
        );
    }
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
    let allow_shrink = match query.get("allow_shrink") {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return error(StatusCode::BAD_REQUEST, "allow_shrink: true or false"),
    };
    let max_shrink = shared
        .generation
        .load()
        .config
        .admin
        .as_ref()
        .map(|a| a.max_shrink)
        .filter(|_| !allow_shrink);
    let guard = Guard {
        expect_revision: expect,
        max_shrink,
    };
    match endpoint {
        Endpoint::Entry => {
            let raw = path.strip_prefix("/v1/registry/entries/").unwrap_or("");
            let Some(decoded) = percent_decode(raw) else {
                return error(StatusCode::BAD_REQUEST, "domain: bad percent-encoding");
            };
            let domain = match normalize_domain(&decoded) {
                Ok(d) => d,
                Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
            };
            // One entry at a time is not guarded against shrinking the registry.
            let guard = Guard {
                max_shrink: None,
                ..guard
            };
            match method {
                Method::PUT => put_entry(req, domain, guard, shared, note).await,
                Method::DELETE => {
                    note.entries = 1;
                    let result =
                        write(shared, WriteKind::Delete, vec![Op::Delete(domain)], guard).await;
                    written(
                        shared,
                        WriteKind::Delete,
                        result,
                        note,
                        |a| json!({"revision": a.revision}),
                    )
                }
                _ => match shared.registry.load().get(&domain) {
                    Some(e) => json_answer(
                        StatusCode::OK,
                        serde_json::to_value(e.to_entry()).unwrap_or_default(),
                    ),
                    None => error(StatusCode::NOT_FOUND, format!("no entry for {domain}")),
                },
            }
        }
        Endpoint::Registry if method == Method::PUT => replace(req, guard, shared, note).await,
        Endpoint::Registry => {
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
        Endpoint::Batch => batch(req, guard, shared, note).await,
        Endpoint::List => listing::page(&query, shared.registry.load_full()).await,
        Endpoint::Export => listing::export(shared.registry.load_full()),
        Endpoint::Decision => decision(&query, shared),
        Endpoint::Blocked => blocked(&query, shared),
    }
}

async fn put_entry(
    req: Request<Incoming>,
    domain: String,
    guard: Guard,
    shared: &Shared,
    note: &mut Note,
) -> Answer {
    note.entries = 1;
    let declared = content_length(req.headers()).cloned();
    let body = match Body::new(req.into_body())
        .collect(declared.as_ref(), MAX_ENTRY_BODY)
        .await
    {
        Ok(b) => b,
        Err(fault) => {
            count(shared, WriteKind::Put, "invalid");
            return fault.answer();
        }
    };
    let entry = match serde_json::from_slice::<RawEntry>(&body)
        .map_err(|e| EntryError::Json(json_problem(&e)))
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
    let result = write(shared, WriteKind::Put, vec![Op::Put(entry)], guard).await;
    written(
        shared,
        WriteKind::Put,
        result,
        note,
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

async fn batch(req: Request<Incoming>, guard: Guard, shared: &Shared, note: &mut Note) -> Answer {
    let parsed = read_ndjson(
        Body::new(req.into_body()),
        Vec::new(),
        |ops: &mut Vec<Op>, line| {
            let op = match serde_json::from_str::<BatchLine>(line).map_err(|e| json_problem(&e))? {
                BatchLine::Put { entry } => Op::Put(entry.validate().map_err(|e| e.to_string())?),
                BatchLine::Delete { domain } => {
                    Op::Delete(normalize_domain(&domain).map_err(|e| e.to_string())?)
                }
            };
            ops.push(op);
            Ok(())
        },
    )
    .await;
    let ops = match parsed {
        Ok(ops) if ops.is_empty() => {
            count(shared, WriteKind::Batch, "invalid");
            return error(StatusCode::BAD_REQUEST, "empty batch");
        }
        Ok(ops) => ops,
        Err(refused) => {
            count(shared, WriteKind::Batch, "invalid");
            return refused;
        }
    };
    note.entries = ops.len();
    // Refused here, not queued: it could never be stored.
    let bytes = journal_record_len(&ops);
    let result = if bytes > MAX_JOURNAL_RECORD as usize {
        Err(WriteError::TooLarge {
            bytes,
            limit: MAX_JOURNAL_RECORD,
        })
    } else {
        write(shared, WriteKind::Batch, ops, guard).await
    };
    written(
        shared,
        WriteKind::Batch,
        result,
        note,
        |a| json!({"revision": a.revision, "applied": a.applied, "absent": a.absent}),
    )
}

async fn replace(req: Request<Incoming>, guard: Guard, shared: &Shared, note: &mut Note) -> Answer {
    let parsed = read_ndjson(
        Body::new(req.into_body()),
        SnapshotBuilder::new(),
        |builder, line| {
            let entry = Entry::from_json(line).map_err(|e| e.to_string())?;
            builder.push_entry(&entry).map_err(|e| e.to_string())
        },
    )
    .await;
    let builder = match parsed {
        Ok(b) => b,
        Err(refused) => {
            count(shared, WriteKind::Replace, "invalid");
            return refused;
        }
    };
    note.entries = builder.len();
    if builder.is_empty() {
        count(shared, WriteKind::Replace, "invalid");
        warn!(
            entries = shared.registry.load().len(),
            "refused a full replace with no entries"
        );
        return error(
            StatusCode::BAD_REQUEST,
            "a full replace with no entries is refused: it would remove every entry (delete \
             entries with DELETE or a batch instead)",
        );
    }
    let Some(writer) = shared.writer() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "registry still loading");
    };
    let result = match shared.fleet() {
        Some(fleet) => fleet.replace(builder, guard).await,
        None => writer.replace(builder, guard).await,
    };
    written(
        shared,
        WriteKind::Replace,
        result,
        note,
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

/// Most hosts `GET /v1/blocked` lists.
const BLOCKED_TOP_MAX: usize = 1000;

fn blocked(query: &Query, shared: &Shared) -> Answer {
    let top = match query.get("top").map(str::parse::<usize>) {
        None => 10,
        Some(Ok(n)) if (1..=BLOCKED_TOP_MAX).contains(&n) => n,
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("top: a number from 1 to {BLOCKED_TOP_MAX}"),
            );
        }
    };
    let dst = match query.get("dst") {
        None => None,
        Some(text) => match text
            .parse::<ipnet::IpNet>()
            .or_else(|_| text.parse::<IpAddr>().map(ipnet::IpNet::from))
        {
            Ok(net) => Some(net.trunc()),
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "dst: an address or prefix (10.0.0.0/8)",
                );
            }
        },
    };
    let q = BlockedQuery {
        top,
        listener: query.get("listener"),
        dst,
    };
    json_answer(StatusCode::OK, shared.blocked.top(&q))
}

async fn write(
    shared: &Shared,
    kind: WriteKind,
    ops: Vec<Op>,
    guard: Guard,
) -> Result<Applied, WriteError> {
    match (shared.writer(), shared.fleet()) {
        (Some(_), Some(fleet)) => fleet.write(kind, ops, guard).await,
        (Some(writer), None) => writer.write(kind, ops, guard).await,
        (None, _) => Err(WriteError::Storage("registry still loading".into())),
    }
}

/// The answer to a write, counted in `icp_gate_registry_updates_total`.
fn written(
    shared: &Shared,
    kind: WriteKind,
    result: Result<Applied, WriteError>,
    note: &mut Note,
    body: impl FnOnce(&Applied) -> serde_json::Value,
) -> Answer {
    match result {
        Ok(applied) => {
            note.applied = Some(applied);
            count(shared, kind, "ok");
            json_answer(StatusCode::OK, body(&applied))
        }
        Err(e @ WriteError::Conflict { current, .. }) => {
            count(shared, kind, "conflict");
            let mut resp = json_answer(
                StatusCode::CONFLICT,
                json!({"error": e.to_string(), "revision": current}),
            );
            resp.extensions_mut().insert(ErrorText(e.to_string()));
            resp
        }
        Err(
            e @ WriteError::Shrink {
                removed,
                entries,
                current,
                ..
            },
        ) => {
            count(shared, kind, "shrink");
            note.result = Some("shrink");
            warn!(
                op = kind.as_str(),
                removed,
                entries,
                "refused a write that would remove more entries than admin.max_shrink allows"
            );
            let mut resp = json_answer(
                StatusCode::CONFLICT,
                json!({"error": e.to_string(), "removed": removed, "entries": entries, "revision": current}),
            );
            resp.extensions_mut().insert(ErrorText(e.to_string()));
            resp
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
        Err(e @ WriteError::Forbidden(_)) => {
            count(shared, kind, "forbidden");
            error(StatusCode::FORBIDDEN, e.to_string())
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
