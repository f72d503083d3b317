//! The change messages on the fleet's stream (docs/fleet.md#messages): what a node publishes for
//! each `/v1` write, and what a filing system may publish itself.
//!
//! One message is one write, on the stream's one subject, with headers:
//!
//! | header | value |
//! |---|---|
//! | `Icp-Gate-Format` | `1` (required; another value stops the nodes: never guessed at) |
//! | `Icp-Gate-Change` | `ops` (a batch of puts and deletes) or `replace` (the whole registry) |
//! | `Icp-Gate-Encoding` | `ndjson` (default) or, for `replace`, `snapshot` (the `snapshot.bin` format) |
//! | `Icp-Gate-Object` | optional: the body is this object of the snapshots bucket, the message's own body is empty |
//! | `Icp-Gate-Sha256` | with `Icp-Gate-Object`: the object's SHA-256, hex |
//! | `Icp-Gate-Node` | optional: the node that published it (logs only) |
//!
//! `ops` bodies are the lines of `POST /v1/registry/batch`; `replace` bodies in NDJSON are the
//! lines of `PUT /v1/registry`.

use async_nats::HeaderMap;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::registry::{Entry, Op, RawEntry, Snapshot, SnapshotBuilder, normalize_domain};

pub(crate) const FORMAT: &str = "Icp-Gate-Format";
pub(crate) const CHANGE: &str = "Icp-Gate-Change";
pub(crate) const ENCODING: &str = "Icp-Gate-Encoding";
pub(crate) const OBJECT: &str = "Icp-Gate-Object";
pub(crate) const SHA256: &str = "Icp-Gate-Sha256";
pub(crate) const NODE: &str = "Icp-Gate-Node";

/// What a message asks for, read from its headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Header {
    pub kind: Kind,
    pub encoding: Encoding,
    /// The object holding the body, and its SHA-256 (hex).
    pub object: Option<(String, String)>,
    pub node: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Ops,
    Replace,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Encoding {
    Ndjson,
    Snapshot,
}

/// A decoded change, ready for the registry writer.
pub(crate) enum Change {
    Ops(Vec<Op>),
    Replace(Snapshot),
}

/// Reads the headers of a message. Anything this version does not know is an error.
pub(crate) fn header(headers: Option<&HeaderMap>) -> Result<Header, String> {
    let get = |name: &str| headers.and_then(|h| h.get(name)).map(|v| v.as_str());
    match get(FORMAT) {
        Some("1") => {}
        Some(other) => {
            return Err(format!(
                "{FORMAT}: {other:?} is not a format this node reads"
            ));
        }
        None => return Err(format!("no {FORMAT} header")),
    }
    let kind = match get(CHANGE) {
        Some("ops") => Kind::Ops,
        Some("replace") => Kind::Replace,
        Some(other) => return Err(format!("{CHANGE}: unknown change {other:?}")),
        None => return Err(format!("no {CHANGE} header")),
    };
    let encoding = match (get(ENCODING), kind) {
        (None | Some("ndjson"), _) => Encoding::Ndjson,
        (Some("snapshot"), Kind::Replace) => Encoding::Snapshot,
        (Some(other), _) => {
            return Err(format!(
                "{ENCODING}: {other:?} is not an encoding of this change"
            ));
        }
    };
    let object = match (get(OBJECT), get(SHA256)) {
        (Some(name), Some(sha)) => {
            if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!("{SHA256}: not a hex SHA-256"));
            }
            Some((name.to_string(), sha.to_ascii_lowercase()))
        }
        (Some(_), None) => return Err(format!("{OBJECT} without {SHA256}")),
        (None, Some(_)) => return Err(format!("{SHA256} without {OBJECT}")),
        (None, None) => None,
    };
    Ok(Header {
        kind,
        encoding,
        object,
        node: get(NODE).map(str::to_string),
    })
}

/// The headers of a message this node publishes.
pub(crate) fn headers(
    kind: Kind,
    encoding: Encoding,
    object: Option<(&str, &str)>,
    node: &str,
) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(FORMAT, "1");
    h.insert(
        CHANGE,
        match kind {
            Kind::Ops => "ops",
            Kind::Replace => "replace",
        },
    );
    if encoding == Encoding::Snapshot {
        h.insert(ENCODING, "snapshot");
    }
    if let Some((name, sha)) = object {
        h.insert(OBJECT, name);
        h.insert(SHA256, sha);
    }
    h.insert(NODE, node);
    h
}

/// One line of an `ops` body.
#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
enum OpLine {
    Put { entry: RawEntry },
    Delete { domain: String },
}

/// The body of an `ops` message: one `{"op":…}` line per operation.
pub(crate) fn encode_ops(ops: &[Op]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ops.len() * 100);
    for op in ops {
        let line = match op {
            Op::Put(e) => serde_json::json!({"op": "put", "entry": e}),
            Op::Delete(d) => serde_json::json!({"op": "delete", "domain": d}),
        };
        // Serialising a JSON value into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut out, &line);
        out.push(b'\n');
    }
    out
}

/// Decodes a message body (the message's own, or its object's) as `header` says. Errors name
/// the 1-based line.
pub(crate) fn decode(header: &Header, body: &[u8]) -> Result<Change, String> {
    match (header.kind, header.encoding) {
        (Kind::Ops, _) => {
            let mut ops = Vec::new();
            lines(body, |line| {
                let op = match serde_json::from_str::<OpLine>(line).map_err(|e| e.to_string())? {
                    OpLine::Put { entry } => Op::Put(entry.validate().map_err(|e| e.to_string())?),
                    OpLine::Delete { domain } => {
                        Op::Delete(normalize_domain(&domain).map_err(|e| e.to_string())?)
                    }
                };
                ops.push(op);
                Ok(())
            })?;
            if ops.is_empty() {
                return Err("no operations".into());
            }
            Ok(Change::Ops(ops))
        }
        (Kind::Replace, Encoding::Ndjson) => {
            let mut builder = SnapshotBuilder::new();
            lines(body, |line| {
                let entry = Entry::from_json(line).map_err(|e| e.to_string())?;
                builder.push_entry(&entry).map_err(|e| e.to_string())
            })?;
            if builder.is_empty() {
                return Err(
                    "a replace with no entries (refused, as an empty PUT /v1/registry is)".into(),
                );
            }
            Ok(Change::Replace(builder.finish(0)))
        }
        (Kind::Replace, Encoding::Snapshot) => {
            let snapshot = crate::registry::decode_snapshot(body, std::path::Path::new("message"))
                .map_err(|e| e.to_string())?;
            if snapshot.is_empty() {
                return Err("a replace with no entries".into());
            }
            Ok(Change::Replace(snapshot))
        }
    }
}

fn lines(body: &[u8], mut each: impl FnMut(&str) -> Result<(), String>) -> Result<(), String> {
    for (i, raw) in body.split(|&b| b == b'\n').enumerate() {
        let text = std::str::from_utf8(raw).map_err(|_| format!("line {}: not UTF-8", i + 1))?;
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        each(text).map_err(|e| format!("line {}: {e}", i + 1))?;
    }
    Ok(())
}

/// SHA-256 of `bytes`, lowercase hex.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut out = String::with_capacity(64);
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Status;

    fn entry(domain: &str) -> Entry {
        Entry {
            domain: domain.into(),
            icp: "京ICP备1号-1".into(),
            status: Status::Filed,
            access_here: true,
        }
    }

    #[test]
    fn ops_round_trip() {
        let ops = vec![Op::Put(entry("a.cn")), Op::Delete("b.cn".into())];
        let h = header(Some(&headers(Kind::Ops, Encoding::Ndjson, None, "n1"))).unwrap();
        assert_eq!(h.node.as_deref(), Some("n1"));
        let Change::Ops(back) = decode(&h, &encode_ops(&ops)).unwrap() else {
            panic!("not ops")
        };
        assert_eq!(back, ops);
    }

    #[test]
    fn what_a_filing_system_writes_is_read() {
        let mut h = HeaderMap::new();
        h.insert(FORMAT, "1");
        h.insert(CHANGE, "replace");
        let h = header(Some(&h)).unwrap();
        let body = b"{\"domain\":\"\xe4\xbe\x8b\xe5\xad\x90.\xe4\xb8\xad\xe5\x9b\xbd\",\"icp\":\"x\",\"status\":\"filed\",\"access_here\":true}\n\n{\"domain\":\"b.cn\",\"icp\":\"y\",\"status\":\"revoked\",\"access_here\":false}\n";
        let Change::Replace(s) = decode(&h, body).unwrap() else {
            panic!("not a replace")
        };
        assert_eq!(s.len(), 2);
        assert!(s.get("xn--fsqu00a.xn--fiqs8s").is_some());
    }

    #[test]
    fn bad_messages_are_refused_with_the_reason() {
        let ops = Some(headers(Kind::Ops, Encoding::Ndjson, None, "n"));
        let h = header(ops.as_ref()).unwrap();
        for (body, why) in [
            (&b"{\"op\":\"put\",\"entry\":{}}"[..], "line 1: "),
            (b"\n{\"op\":\"frobnicate\",\"domain\":\"a.cn\"}", "line 2: "),
            (b"not json", "line 1: "),
            (b"", "no operations"),
            (
                b"{\"op\":\"delete\",\"domain\":\"com.cn\"}",
                "public suffix",
            ),
        ] {
            let e = decode(&h, body).err().unwrap();
            assert!(e.contains(why), "{e}");
        }
        for (k, v, why) in [
            (FORMAT, "2", "not a format"),
            (CHANGE, "merge", "unknown change"),
            (ENCODING, "xml", "not an encoding"),
            (OBJECT, "x", "without"),
        ] {
            let mut h = headers(Kind::Ops, Encoding::Ndjson, None, "n");
            h.insert(k, v);
            assert!(header(Some(&h)).err().unwrap().contains(why));
        }
        assert!(header(None).err().unwrap().contains(FORMAT));
        let mut h = headers(Kind::Replace, Encoding::Ndjson, None, "n");
        h.insert(ENCODING, "snapshot");
        let h = header(Some(&h)).unwrap();
        assert!(decode(&h, b"ICPGSNP1 truncated").is_err());
    }
}
