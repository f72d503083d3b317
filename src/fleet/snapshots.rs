//! Full snapshots in the fleet's object store bucket: written by nodes every `snapshot_every`
//! changes and after a full replace they published, read by a node whose position the stream
//! no longer holds.
//!
//! An object `snapshot-<sequence, 20 digits>` holds the registry after that stream sequence in
//! the `snapshot.bin` format, with metadata `sequence`, `sha256` (hex, of the object's bytes),
//! `entries`, `digest` and `node`. A snapshot whose SHA-256 does not match is refused.

use std::path::Path;
use std::sync::Arc;

use async_nats::jetstream::object_store::{ObjectMetadata, ObjectStore};
use futures_util::StreamExt;
use tokio::io::AsyncReadExt;
use tracing::{info, warn};

use super::message::sha256_hex;
use crate::registry::{Snapshot, decode_snapshot, encode_snapshot};

const PREFIX: &str = "snapshot-";
/// Snapshots kept in the bucket: the newest, and one before it should the newest be damaged.
const KEEP: usize = 2;

pub(crate) fn name(sequence: u64) -> String {
    format!("{PREFIX}{sequence:020}")
}

fn sequence_of(name: &str) -> Option<u64> {
    name.strip_prefix(PREFIX)?.parse().ok()
}

/// Sequences of the snapshots in the bucket, newest first.
pub(crate) async fn list(bucket: &ObjectStore) -> Result<Vec<u64>, String> {
    let mut list = bucket.list().await.map_err(|e| e.to_string())?;
    let mut sequences = Vec::new();
    while let Some(info) = list.next().await {
        let info = info.map_err(|e| e.to_string())?;
        if !info.deleted {
            if let Some(seq) = sequence_of(&info.name) {
                sequences.push(seq);
            }
        }
    }
    sequences.sort_unstable_by(|a, b| b.cmp(a));
    Ok(sequences)
}

/// How long before the stream's first message a change object must have been stored to be
/// removed: its message was published after it, and this leaves room for a publisher that
/// stored an object and published its message late.
const CHANGE_MARGIN_NANOS: i128 = 3600 * 1_000_000_000;

/// Removes `change-*` objects stored more than an hour before the stream's first message
/// (`first_nanos`, Unix time): the messages naming them are gone from the stream, and every
/// node past them holds their changes or starts from a snapshot.
pub(crate) async fn remove_old_changes(
    bucket: &ObjectStore,
    first_nanos: i128,
) -> Result<usize, String> {
    let mut list = bucket.list().await.map_err(|e| e.to_string())?;
    let mut old = Vec::new();
    while let Some(info) = list.next().await {
        let info = info.map_err(|e| e.to_string())?;
        let stored = info.modified.map(|t| t.unix_timestamp_nanos());
        if info.name.starts_with("change-")
            && !info.deleted
            && stored.is_some_and(|t| t < first_nanos - CHANGE_MARGIN_NANOS)
        {
            old.push(info.name);
        }
    }
    for name in &old {
        bucket
            .delete(name)
            .await
            .map_err(|e| format!("{name}: {e}"))?;
    }
    Ok(old.len())
}

/// Reads an object whole and checks it against `sha256` (hex).
pub(crate) async fn read_object(
    bucket: &ObjectStore,
    name: &str,
    sha256: Option<&str>,
) -> Result<Vec<u8>, String> {
    let mut object = bucket.get(name).await.map_err(|e| e.to_string())?;
    let expected = match sha256 {
        Some(s) => Some(s.to_string()),
        None => object.info().metadata.get("sha256").cloned(),
    };
    let mut bytes = Vec::with_capacity(object.info().size);
    object
        .read_to_end(&mut bytes)
        .await
        .map_err(|e| format!("reading object {name}: {e}"))?;
    let Some(expected) = expected else {
        return Err(format!("object {name} has no sha256"));
    };
    let actual = tokio::task::spawn_blocking({
        let bytes = std::mem::take(&mut bytes);
        move || (sha256_hex(&bytes), bytes)
    })
    .await
    .map_err(|e| e.to_string())?;
    let (actual, bytes) = actual;
    if !actual.eq_ignore_ascii_case(&expected) {
        return Err(format!(
            "object {name}: SHA-256 {actual} does not match the expected {expected}; refused"
        ));
    }
    Ok(bytes)
}

/// The newest snapshot at or after `at_least` that reads back intact, if any.
pub(crate) async fn load_newest(
    bucket: &ObjectStore,
    at_least: u64,
) -> Result<Option<Snapshot>, String> {
    for sequence in list(bucket).await? {
        if sequence < at_least {
            break;
        }
        let name = name(sequence);
        let bytes = match read_object(bucket, &name, None).await {
            Ok(b) => b,
            Err(e) => {
                warn!(snapshot = %name, error = %e, "fleet snapshot refused; trying an older one");
                continue;
            }
        };
        let decoded = tokio::task::spawn_blocking(move || {
            decode_snapshot(&bytes, Path::new(&name)).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())?;
        match decoded {
            Ok(s) if s.revision() == sequence => return Ok(Some(s)),
            Ok(s) => warn!(
                sequence,
                revision = s.revision(),
                "fleet snapshot holds another revision than its name; refused"
            ),
            Err(e) => warn!(sequence, error = %e, "fleet snapshot refused"),
        }
    }
    Ok(None)
}

/// Writes `snapshot` (at its revision, a stream sequence) to the bucket and removes older ones
/// beyond the newest [`KEEP`].
pub(crate) async fn write(
    bucket: &ObjectStore,
    snapshot: Arc<Snapshot>,
    node: &str,
) -> Result<(), String> {
    let sequence = snapshot.revision();
    let (bytes, sha, digest) = tokio::task::spawn_blocking(move || {
        let mut bytes = Vec::with_capacity(snapshot.len() * 48 + 64);
        encode_snapshot(&mut bytes, &snapshot).map(|()| {
            let sha = sha256_hex(&bytes);
            (bytes, sha, snapshot.digest_hex())
        })
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    let entries = bytes.len();
    let meta = ObjectMetadata {
        name: name(sequence),
        description: Some(format!(
            "icp-gate registry after stream sequence {sequence}"
        )),
        metadata: [
            ("sequence".to_string(), sequence.to_string()),
            ("sha256".to_string(), sha),
            ("digest".to_string(), digest),
            ("node".to_string(), node.to_string()),
        ]
        .into_iter()
        .collect(),
        ..Default::default()
    };
    bucket
        .put(meta, &mut &bytes[..])
        .await
        .map_err(|e| e.to_string())?;
    info!(sequence, bytes = entries, "fleet snapshot written");
    for old in list(bucket).await?.into_iter().skip(KEEP) {
        if let Err(e) = bucket.delete(name(old)).await {
            warn!(sequence = old, error = %e, "could not remove an old fleet snapshot");
        }
    }
    Ok(())
}
