//! The registry the data path reads: one immutable snapshot at a time, swapped whole.

use std::sync::Arc;

use arc_swap::{ArcSwap, Guard};

use super::snapshot::Snapshot;

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
