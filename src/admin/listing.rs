//! Reading the whole registry: pages of entries in domain order, and the export of every entry
//! at one revision as NDJSON (the seed format), which a full replace restores.

use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Response, StatusCode};
use serde_json::json;
use tokio::sync::mpsc;
use tracing::warn;

use super::answer::{Answer, AnswerBody, error, json_answer};
use super::query::Query;
use crate::registry::Snapshot;

/// Entries in a page when the call names no `limit`.
pub(super) const PAGE_DEFAULT: usize = 1000;
/// The largest `limit` taken.
pub(super) const PAGE_MAX: usize = 10_000;
/// Bytes of NDJSON the export sends at a time.
const EXPORT_CHUNK: usize = 256 * 1024;
/// How long the export waits for a client that stopped reading before it cuts the transfer.
const EXPORT_STALL: Duration = Duration::from_secs(60);

/// `GET /v1/registry/entries?after=D&limit=N`: the first `N` entries whose domain sorts after
/// `D`, from one snapshot.
pub(super) async fn page(query: &Query, snapshot: Arc<Snapshot>) -> Answer {
    let limit = match query.get("limit").map(str::parse::<usize>) {
        None => PAGE_DEFAULT,
        Some(Ok(n)) if (1..=PAGE_MAX).contains(&n) => n,
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("limit: a number from 1 to {PAGE_MAX}"),
            );
        }
    };
    let after = query.get("after").unwrap_or("").to_string();
    // One pass over the snapshot keeping the `limit` smallest domains after the cursor: no
    // sorted copy of the registry is kept, and the data path is not touched.
    let page = tokio::task::spawn_blocking(move || {
        let mut heap: BinaryHeap<&str> = BinaryHeap::with_capacity(limit + 1);
        let mut more = false;
        for e in snapshot.iter() {
            if e.domain <= after.as_str() {
                continue;
            }
            if heap.len() < limit {
                heap.push(e.domain);
            } else if heap.peek().is_some_and(|top| e.domain < *top) {
                heap.pop();
                heap.push(e.domain);
                more = true;
            } else {
                more = true;
            }
        }
        let domains = heap.into_sorted_vec();
        let entries: Vec<serde_json::Value> = domains
            .iter()
            .filter_map(|d| snapshot.get(d))
            .map(|e| serde_json::to_value(e.to_entry()).unwrap_or_default())
            .collect();
        let next = more
            .then(|| domains.last().map(|d| d.to_string()))
            .flatten();
        json!({"revision": snapshot.revision(), "entries": entries, "next": next})
    })
    .await;
    match page {
        Ok(body) => json_answer(StatusCode::OK, body),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("listing failed: {e}"),
        ),
    }
}

/// `GET /v1/registry/export`: every entry of one snapshot as NDJSON, streamed. The headers
/// carry the revision and the entry count, so a backup can be checked for completeness.
pub(super) fn export(snapshot: Arc<Snapshot>) -> Answer {
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let revision = snapshot.revision();
    let entries = snapshot.len();
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let send = |chunk: Result<Bytes, std::io::Error>| {
            handle.block_on(async { tokio::time::timeout(EXPORT_STALL, tx.send(chunk)).await })
        };
        let mut buf = BytesMut::with_capacity(EXPORT_CHUNK + 1024);
        for e in snapshot.iter() {
            let mut w = (&mut buf).writer();
            if serde_json::to_writer(&mut w, &e.to_entry()).is_err() {
                continue;
            }
            buf.put_u8(b'\n');
            if buf.len() >= EXPORT_CHUNK {
                match send(Ok(buf.split().freeze())) {
                    Ok(Ok(())) => {}
                    // The client went away.
                    Ok(Err(_)) => return,
                    Err(_) => {
                        warn!(
                            revision,
                            "registry export cut off: the client stopped reading"
                        );
                        let _ = tx.try_send(Err(std::io::Error::other("client stalled")));
                        return;
                    }
                }
            }
        }
        if !buf.is_empty() {
            let _ = send(Ok(buf.freeze()));
        }
    });
    let mut resp = Response::new(AnswerBody::Stream(rx));
    let headers = resp.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    headers.insert("icp-gate-revision", HeaderValue::from(revision));
    headers.insert("icp-gate-entries", HeaderValue::from(entries as u64));
    resp
}
