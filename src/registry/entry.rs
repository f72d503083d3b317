//! Registry entries and their NDJSON form (docs/registry-api.md#entry-format).

use std::io::BufRead;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::wire::host::{self, Host};

/// Longest filing number kept (`京ICP备12345678号-1` is 24 bytes); a bound keeps entries packable.
pub const MAX_ICP_BYTES: usize = 255;

/// Whether the filing stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Filed,
    Revoked,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Filed => "filed",
            Status::Revoked => "revoked",
        }
    }
}

/// One filing: the domain (normalised), its filing number, status, and whether its access (接入)
/// goes through this provider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    pub domain: String,
    pub icp: String,
    pub status: Status,
    pub access_here: bool,
}

/// The entry as written: unknown fields are an error, not silently dropped.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEntry {
    domain: String,
    icp: String,
    status: Status,
    access_here: bool,
}

/// Why an entry was refused. The caller adds where it came from (file and line, or batch line).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    #[error("{0}")]
    Json(String),
    #[error("domain {domain:?}: {why}")]
    Domain { domain: String, why: String },
    #[error("icp: longer than {MAX_ICP_BYTES} bytes")]
    IcpTooLong,
    #[error("icp: must not be empty")]
    IcpEmpty,
}

impl RawEntry {
    pub(crate) fn validate(self) -> Result<Entry, EntryError> {
        let domain = normalize_domain(&self.domain)?;
        if self.icp.trim().is_empty() {
            return Err(EntryError::IcpEmpty);
        }
        if self.icp.len() > MAX_ICP_BYTES {
            return Err(EntryError::IcpTooLong);
        }
        Ok(Entry {
            domain,
            icp: self.icp,
            status: self.status,
            access_here: self.access_here,
        })
    }
}

/// A JSON error without serde's `at line 1 column 14`: one NDJSON line is always line 1 to
/// serde, and the caller names the real line, so only the column is kept.
pub(crate) fn json_problem(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let position = format!(" at line {} column {}", e.line(), e.column());
    match text.strip_suffix(&position) {
        Some(problem) if e.line() > 0 => format!("{problem} (column {})", e.column()),
        _ => text,
    }
}

/// A borrowed view of one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryRef<'a> {
    pub domain: &'a str,
    pub icp: &'a str,
    pub status: Status,
    pub access_here: bool,
}

impl EntryRef<'_> {
    pub fn to_entry(&self) -> Entry {
        Entry {
            domain: self.domain.to_string(),
            icp: self.icp.to_string(),
            status: self.status,
            access_here: self.access_here,
        }
    }
}

impl Entry {
    pub fn as_ref(&self) -> EntryRef<'_> {
        EntryRef {
            domain: &self.domain,
            icp: &self.icp,
            status: self.status,
            access_here: self.access_here,
        }
    }

    /// Parses one NDJSON line into a validated entry.
    pub fn from_json(line: &str) -> Result<Entry, EntryError> {
        serde_json::from_str::<RawEntry>(line)
            .map_err(|e| EntryError::Json(json_problem(&e)))?
            .validate()
    }

    /// Whether this entry lets traffic through.
    pub fn allows(&self) -> bool {
        self.status == Status::Filed && self.access_here
    }
}

/// Normalises a registry domain like a request host, and refuses what could never match: IP
/// addresses, and public suffixes (lookups stop at the registrable domain, so an entry for
/// `com.cn` would silently do nothing).
pub fn normalize_domain(raw: &str) -> Result<String, EntryError> {
    let bad = |why: String| EntryError::Domain {
        domain: raw.to_string(),
        why,
    };
    match host::parse_host(raw.as_bytes()) {
        Ok(Host::Name(name)) => {
            if host::registrable_domain(&name).is_none() {
                return Err(bad(
                    "is a public suffix (or has no registrable domain); file the domain under it"
                        .into(),
                ));
            }
            Ok(name.into_owned())
        }
        Ok(Host::Ip(_)) => Err(bad("is an IP address, not a domain".into())),
        Err(e) => Err(bad(e.to_string())),
    }
}

/// An error in a registry file, naming the file and the 1-based line.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{}: line {line}: {source}", path.display())]
    Line {
        path: std::path::PathBuf,
        line: usize,
        source: LineError,
    },
}

/// Refused when building a snapshot from a list of entries.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    #[error("duplicate entry for {0}")]
    Duplicate(String),
    #[error("registry shard arena over 4 GiB")]
    TooLarge,
}

/// A problem on one line of NDJSON.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    #[error(transparent)]
    Entry(#[from] EntryError),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("not UTF-8: {0}")]
    Encoding(std::io::Error),
}

/// Reads an NDJSON file of entries, calling `each(line_number, entry)` in order. Blank lines are
/// skipped. Stops at the first bad line, naming it.
pub fn read_ndjson_file(
    path: &Path,
    mut each: impl FnMut(usize, Entry) -> Result<(), LineError>,
) -> Result<usize, FileError> {
    let file = std::fs::File::open(path).map_err(|source| FileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let reader = std::io::BufReader::with_capacity(1 << 20, file);
    let mut count = 0;
    for (i, line) in reader.lines().enumerate() {
        let at = |source: LineError| FileError::Line {
            path: path.to_path_buf(),
            line: i + 1,
            source,
        };
        let line = line.map_err(|e| {
            if e.kind() == std::io::ErrorKind::InvalidData {
                at(LineError::Encoding(e))
            } else {
                FileError::Read {
                    path: path.to_path_buf(),
                    source: e,
                }
            }
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let entry = Entry::from_json(&line).map_err(|e| at(e.into()))?;
        each(i + 1, entry).map_err(at)?;
        count += 1;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_normalises() {
        let e = Entry::from_json(
            r#"{"domain":"WWW.例子.中国.","icp":"京ICP备12345678号-1","status":"filed","access_here":true}"#,
        )
        .unwrap();
        assert_eq!(e.domain, "www.xn--fsqu00a.xn--fiqs8s");
        assert!(e.allows());
    }

    #[test]
    fn errors_name_the_problem() {
        let cases = [
            (
                r#"{"domain":"a.com","icp":"x","status":"filed","access_here":true,"extra":1}"#,
                "unknown field `extra`",
            ),
            (
                r#"{"domain":"a.com","icp":"x","status":"pending","access_here":true}"#,
                "unknown variant `pending`",
            ),
            (
                r#"{"domain":"a.com","icp":"x","status":"filed"}"#,
                "missing field `access_here`",
            ),
            (
                r#"{"domain":"com.cn","icp":"x","status":"filed","access_here":true}"#,
                "public suffix",
            ),
            (
                r#"{"domain":"1.2.3.4","icp":"x","status":"filed","access_here":true}"#,
                "IP address",
            ),
            // Full-width digits normalise to an address (caught by the ndjson_entry fuzz target).
            (
                r#"{"domain":"１０.０.０.１","icp":"x","status":"filed","access_here":true}"#,
                "IP address",
            ),
            (
                r#"{"domain":"a_b.com","icp":"x","status":"filed","access_here":true}"#,
                "character",
            ),
            (
                r#"{"domain":"a.com","icp":" ","status":"filed","access_here":true}"#,
                "icp",
            ),
            ("not json", "expected"),
        ];
        for (line, want) in cases {
            let e = Entry::from_json(line).unwrap_err().to_string();
            assert!(e.contains(want), "{line}: {e}");
        }
    }

    #[test]
    fn file_errors_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seed.ndjson");
        std::fs::write(
            &path,
            "{\"domain\":\"a.com\",\"icp\":\"x\",\"status\":\"filed\",\"access_here\":true}\n\n{\"domain\":\"b.com\"}\n",
        )
        .unwrap();
        let err = read_ndjson_file(&path, |_, _| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("seed.ndjson: line 3: missing field"), "{err}");
    }
}
