//! The filing registry: entries, the immutable snapshot the data path reads, and the handle
//! through which a new snapshot is published.

mod entry;
mod service;
mod snapshot;
mod store;

use std::path::Path;
use std::sync::Arc;

use arc_swap::{ArcSwap, Guard};

pub(crate) use entry::RawEntry;
pub use entry::{
    Entry, EntryError, FileError, LineError, MAX_ICP_BYTES, Status, normalize_domain,
    read_ndjson_file,
};
pub use service::{Applied, OnPublish, RegistryWriter, WriteError, WriteKind};
pub use snapshot::{BuildError, EntryRef, Op, SHARDS, Snapshot, SnapshotBuilder};
pub use store::{
    MAX_RECORD as MAX_JOURNAL_RECORD, Recovered, Store, StoreError, read_state,
    record_len as journal_record_len, write_snapshot,
};

/// The published registry. Readers take the current snapshot without locking (`arc-swap`); a
/// writer builds the next snapshot aside and swaps it in with one atomic store, so a reader sees
/// either all of an update or none of it.
pub struct Registry {
    current: ArcSwap<Snapshot>,
}

impl Registry {
    pub fn new(snapshot: Snapshot) -> Registry {
        Registry {
            current: ArcSwap::from_pointee(snapshot),
        }
    }

    /// The snapshot to decide with. Cheap: no lock, no reference-count traffic in the common case.
    pub fn load(&self) -> Guard<Arc<Snapshot>> {
        self.current.load()
    }

    /// A snapshot handle that may be kept across awaits.
    pub fn load_full(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Publishes `next`: every lookup that starts after this returns decides with it.
    pub fn publish(&self, next: Snapshot) {
        self.publish_arc(Arc::new(next));
    }

    pub fn publish_arc(&self, next: Arc<Snapshot>) {
        self.current.store(next);
    }
}

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
