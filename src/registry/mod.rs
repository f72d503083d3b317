//! The filing registry: entries, the immutable snapshot the data path reads, and the handle
//! through which a new snapshot is published.

pub(crate) mod damage;
mod entry;
mod frozen;
mod published;
mod service;
mod snapshot;
mod store;

use std::path::Path;

pub use entry::{
    BuildError, Entry, EntryError, EntryRef, FileError, LineError, MAX_ICP_BYTES, Status,
    normalize_domain, read_ndjson_file,
};
pub(crate) use entry::{RawEntry, json_problem};
pub use published::Registry;
pub(crate) use service::{
    Applied, FleetChange, Guard, OnPublish, RegistryWriter, WriteError, WriteKind,
    check_ops_shrink, check_replace_shrink,
};
pub use snapshot::{Op, SHARDS, Snapshot, SnapshotBuilder};
pub(crate) use store::{
    MAX_RECORD as MAX_JOURNAL_RECORD, Store, decode_snapshot, encode_snapshot, read_fleet_marker,
    record_len as journal_record_len, write_fleet_marker,
};
pub use store::{StoreError, read_state, write_snapshot};

/// The registry as the proxy would start with it, read without changing anything: the state in
/// `state_dir`, or the seed when there is none yet (for `explain` and `check`).
pub fn inspect(
    config: &crate::config::RegistryConfig,
) -> Result<Snapshot, Box<dyn std::error::Error>> {
    if let Some(snapshot) = read_state(&config.state_dir)? {
        return Ok(snapshot);
    }
    Ok(match &config.seed {
        Some(seed) => load_seed(seed)?,
        None => Snapshot::empty(),
    })
}

/// Reads an NDJSON seed file into a snapshot at revision 0. A bad or duplicate line stops the load
/// with an error naming the file and the line.
pub fn load_seed(path: &Path) -> Result<Snapshot, FileError> {
    let mut builder = SnapshotBuilder::new();
    read_ndjson_file(path, |_, entry| {
        builder.push_entry(&entry).map_err(LineError::from)
    })?;
    Ok(builder.finish(0))
}
