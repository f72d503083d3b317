//! The immutable registry snapshot the data path reads.
//!
//! Sized for China's whole filing base (10 million domains): entries are packed into one string
//! arena per shard with an index table of `u32`s (about 60 bytes an entry instead of ~150 for a
//! `HashMap<String, Entry>`), and the snapshot is split into [`SHARDS`] shards so that an update
//! copies only what it touches. Each shard is a frozen base plus a small delta of recent changes;
//! when the delta grows past a fraction of its base, the shard is re-frozen. A single upsert
//! therefore costs a few microseconds whatever the registry's size, and a batch produces a new
//! snapshot that shares every untouched shard with the old one.

use std::hash::BuildHasher;
use std::sync::{Arc, LazyLock};

use hashbrown::HashTable;

use super::entry::{Entry, Status};

/// Number of shards (a power of two). 4096 keeps a shard at ~2,500 entries at 10 M.
pub const SHARDS: usize = 1 << SHARD_BITS;
const SHARD_BITS: u32 = 12;

/// One hasher for the life of the process, randomly seeded: lookups hash client-supplied names.
static HASHER: LazyLock<foldhash::fast::RandomState> = LazyLock::new(Default::default);

fn hash(domain: &str) -> u64 {
    HASHER.hash_one(domain.as_bytes())
}

/// Shard from the middle bits: hashbrown uses the top 7 bits and the low bits itself.
fn shard_of(hash: u64) -> usize {
    ((hash >> 32) as usize) & (SHARDS - 1)
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

/// One write to the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put(Entry),
    Delete(String),
}

impl Op {
    pub fn domain(&self) -> &str {
        match self {
            Op::Put(e) => &e.domain,
            Op::Delete(d) => d,
        }
    }
}

/// A whole registry at one revision. Cheap to share (`Arc`), never mutated.
pub struct Snapshot {
    shards: Box<[Shard]>,
    len: usize,
    revision: u64,
}

#[derive(Clone)]
struct Shard {
    base: Arc<Frozen>,
    /// Recent changes on top of `base`; `None` when there are none (the common case).
    delta: Option<Arc<Delta>>,
}

/// Packed, read-only entries: `arena` holds each domain followed by its filing number.
#[derive(Default)]
struct Frozen {
    table: HashTable<u32>,
    recs: Vec<Rec>,
    arena: String,
}

#[derive(Clone, Copy)]
struct Rec {
    offset: u32,
    domain_len: u8,
    icp_len: u8,
    status: Status,
    access_here: bool,
}

/// Changes since the base was frozen: `None` marks a deletion of a base entry.
#[derive(Clone, Default)]
struct Delta {
    table: HashTable<(Box<str>, Option<Value>)>,
}

#[derive(Clone)]
struct Value {
    icp: Box<str>,
    status: Status,
    access_here: bool,
}

/// Refused when building a snapshot from a list of entries.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    #[error("duplicate entry for {0}")]
    Duplicate(String),
    #[error("registry shard arena over 4 GiB")]
    TooLarge,
}

impl Frozen {
    fn get(&self, hash: u64, domain: &str) -> Option<EntryRef<'_>> {
        let idx = self
            .table
            .find(hash, |&i| self.domain_at(i) == domain.as_bytes())?;
        Some(self.entry_at(*idx))
    }

    fn domain_at(&self, i: u32) -> &[u8] {
        let r = &self.recs[i as usize];
        let start = r.offset as usize;
        &self.arena.as_bytes()[start..start + r.domain_len as usize]
    }

    fn entry_at(&self, i: u32) -> EntryRef<'_> {
        let r = self.recs[i as usize];
        let start = r.offset as usize;
        let mid = start + r.domain_len as usize;
        EntryRef {
            domain: &self.arena[start..mid],
            icp: &self.arena[mid..mid + r.icp_len as usize],
            status: r.status,
            access_here: r.access_here,
        }
    }

    fn iter(&self) -> impl Iterator<Item = EntryRef<'_>> {
        (0..self.recs.len() as u32).map(|i| self.entry_at(i))
    }

    fn len(&self) -> usize {
        self.recs.len()
    }
}

/// Appends entries to one shard, refusing duplicates as they come.
#[derive(Default)]
struct FrozenBuilder(Frozen);

impl FrozenBuilder {
    fn push(&mut self, hash: u64, e: EntryRef<'_>) -> Result<(), BuildError> {
        let f = &mut self.0;
        if f.table
            .find(hash, |&i| f.domain_at(i) == e.domain.as_bytes())
            .is_some()
        {
            return Err(BuildError::Duplicate(e.domain.to_string()));
        }
        let offset = u32::try_from(f.arena.len()).map_err(|_| BuildError::TooLarge)?;
        // Lengths were bounded when the entry was validated (253-byte names, 255-byte numbers).
        let (Ok(domain_len), Ok(icp_len)) =
            (u8::try_from(e.domain.len()), u8::try_from(e.icp.len()))
        else {
            return Err(BuildError::TooLarge);
        };
        f.arena.push_str(e.domain);
        f.arena.push_str(e.icp);
        let idx = f.recs.len() as u32;
        f.recs.push(Rec {
            offset,
            domain_len,
            icp_len,
            status: e.status,
            access_here: e.access_here,
        });
        let Frozen { table, recs, arena } = f;
        table.insert_unique(hash, idx, |&i| {
            let r = &recs[i as usize];
            hash_str(&arena[r.offset as usize..r.offset as usize + r.domain_len as usize])
        });
        Ok(())
    }

    fn finish(mut self) -> Frozen {
        self.0.recs.shrink_to_fit();
        self.0.arena.shrink_to_fit();
        let Frozen { table, recs, arena } = &mut self.0;
        table.shrink_to_fit(|&i| {
            let r = &recs[i as usize];
            hash_str(&arena[r.offset as usize..r.offset as usize + r.domain_len as usize])
        });
        self.0
    }
}

fn hash_str(s: &str) -> u64 {
    hash(s)
}

/// Builds a snapshot from entries arriving one by one (a seed file, a full replace, a snapshot
/// file), without holding them all as separate strings first.
pub struct SnapshotBuilder {
    shards: Vec<FrozenBuilder>,
    len: usize,
}

impl Default for SnapshotBuilder {
    fn default() -> Self {
        SnapshotBuilder {
            shards: (0..SHARDS).map(|_| FrozenBuilder::default()).collect(),
            len: 0,
        }
    }
}

impl SnapshotBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one entry; a second entry for the same domain is refused.
    pub fn push(&mut self, e: EntryRef<'_>) -> Result<(), BuildError> {
        let h = hash(e.domain);
        self.shards[shard_of(h)].push(h, e)?;
        self.len += 1;
        Ok(())
    }

    pub fn push_entry(&mut self, e: &Entry) -> Result<(), BuildError> {
        self.push(e.as_ref())
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn finish(self, revision: u64) -> Snapshot {
        let empty = Arc::new(Frozen::default());
        let shards = self
            .shards
            .into_iter()
            .map(|b| Shard {
                base: if b.0.recs.is_empty() {
                    empty.clone()
                } else {
                    Arc::new(b.finish())
                },
                delta: None,
            })
            .collect();
        Snapshot {
            shards,
            len: self.len,
            revision,
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
}

impl Snapshot {
    /// An empty registry at revision 0.
    pub fn empty() -> Snapshot {
        SnapshotBuilder::new().finish(0)
    }

    /// Builds a snapshot from a list of entries (tests, small registries).
    pub fn from_entries<'a>(
        entries: impl IntoIterator<Item = &'a Entry>,
        revision: u64,
    ) -> Result<Snapshot, BuildError> {
        let mut b = SnapshotBuilder::new();
        for e in entries {
            b.push_entry(e)?;
        }
        Ok(b.finish(revision))
    }

    /// The entry for exactly `domain` (already normalised). Lock-free and allocation-free.
    pub fn get(&self, domain: &str) -> Option<EntryRef<'_>> {
        let h = hash(domain);
        let shard = &self.shards[shard_of(h)];
        if let Some(delta) = &shard.delta {
            if let Some((name, value)) = delta.table.find(h, |(d, _)| &**d == domain) {
                return value.as_ref().map(|v| EntryRef {
                    domain: name,
                    icp: &v.icp,
                    status: v.status,
                    access_here: v.access_here,
                });
            }
        }
        shard.base.get(h, domain)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Every entry, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = EntryRef<'_>> {
        self.shards.iter().flat_map(|shard| {
            let delta = shard.delta.as_deref();
            let base = shard.base.iter().filter(move |e| {
                delta.is_none_or(|d| {
                    d.table
                        .find(hash(e.domain), |(n, _)| **n == *e.domain)
                        .is_none()
                })
            });
            let changed = delta.into_iter().flat_map(|d| {
                d.table.iter().filter_map(|(name, value)| {
                    value.as_ref().map(|v| EntryRef {
                        domain: name,
                        icp: &v.icp,
                        status: v.status,
                        access_here: v.access_here,
                    })
                })
            });
            base.chain(changed)
        })
    }

    /// A new snapshot with `ops` applied in order, at `revision`. Shards no op touches are shared
    /// with `self`; `self` is unchanged, so readers of it are never disturbed.
    pub fn apply(&self, ops: &[Op], revision: u64) -> Snapshot {
        let mut shards = self.shards.to_vec();
        let mut len = self.len;
        let mut touched: Vec<Option<Delta>> = Vec::new();
        touched.resize_with(SHARDS, || None);
        let mut touched_ids = Vec::new();
        for op in ops {
            let h = hash(op.domain());
            let s = shard_of(h);
            let delta = touched[s].get_or_insert_with(|| {
                touched_ids.push(s);
                shards[s].delta.as_deref().cloned().unwrap_or_default()
            });
            let base = &shards[s].base;
            let in_base = base.get(h, op.domain()).is_some();
            let existed = match delta.table.find(h, |(d, _)| &**d == op.domain()) {
                Some((_, v)) => v.is_some(),
                None => in_base,
            };
            let value = match op {
                Op::Put(e) => {
                    len += usize::from(!existed);
                    Some(Value {
                        icp: e.icp.as_str().into(),
                        status: e.status,
                        access_here: e.access_here,
                    })
                }
                Op::Delete(_) => {
                    len -= usize::from(existed);
                    None
                }
            };
            let domain = op.domain();
            match delta.table.find_entry(h, |(d, _)| &**d == domain) {
                Ok(mut slot) => {
                    if value.is_none() && !in_base {
                        slot.remove();
                    } else {
                        slot.get_mut().1 = value;
                    }
                }
                Err(_) => {
                    // Deleting what does not exist leaves nothing to record.
                    if value.is_some() || in_base {
                        delta
                            .table
                            .insert_unique(h, (domain.into(), value), |(d, _)| hash(d));
                    }
                }
            }
        }
        for s in touched_ids {
            let Some(delta) = touched[s].take() else {
                continue;
            };
            let base = &shards[s].base;
            shards[s] = if delta.table.len() > 64 + base.len() / 8 {
                Shard {
                    base: Arc::new(refreeze(base, &delta)),
                    delta: None,
                }
            } else {
                Shard {
                    base: base.clone(),
                    delta: (!delta.table.is_empty()).then(|| Arc::new(delta)),
                }
            };
        }
        Snapshot {
            shards: shards.into_boxed_slice(),
            len,
            revision,
        }
    }

    /// Approximate heap bytes held (for sizing and the bench; shared shards counted once here).
    pub fn heap_bytes(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                let b = &s.base;
                b.arena.capacity()
                    + b.recs.capacity() * std::mem::size_of::<Rec>()
                    + b.table.allocation_size()
                    + s.delta.as_ref().map_or(0, |d| d.table.allocation_size())
            })
            .sum::<usize>()
            + self.shards.len() * std::mem::size_of::<Shard>()
    }
}

/// Merges a shard's delta into a new frozen base.
fn refreeze(base: &Frozen, delta: &Delta) -> Frozen {
    let mut b = FrozenBuilder::default();
    b.0.recs.reserve(base.len() + delta.table.len());
    for e in base.iter() {
        if delta
            .table
            .find(hash(e.domain), |(d, _)| **d == *e.domain)
            .is_none()
        {
            // A base never holds duplicates, so this cannot fail.
            let _ = b.push(hash(e.domain), e);
        }
    }
    for (domain, value) in delta.table.iter() {
        if let Some(v) = value {
            let e = EntryRef {
                domain,
                icp: &v.icp,
                status: v.status,
                access_here: v.access_here,
            };
            let _ = b.push(hash(domain), e);
        }
    }
    b.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn entry(domain: &str, status: Status, access_here: bool) -> Entry {
        Entry {
            domain: domain.into(),
            icp: format!("京ICP备{}号-1", domain.len()),
            status,
            access_here,
        }
    }

    fn model_of(s: &Snapshot) -> BTreeMap<String, Entry> {
        s.iter()
            .map(|e| (e.domain.to_string(), e.to_entry()))
            .collect()
    }

    #[test]
    fn build_and_get() {
        let entries: Vec<Entry> = (0..10_000)
            .map(|i| entry(&format!("d{i}.example.com"), Status::Filed, i % 2 == 0))
            .collect();
        let s = Snapshot::from_entries(&entries, 7).unwrap();
        assert_eq!(s.len(), 10_000);
        assert_eq!(s.revision(), 7);
        for e in &entries {
            assert_eq!(s.get(&e.domain), Some(e.as_ref()));
        }
        assert_eq!(s.get("d10000.example.com"), None);
        assert_eq!(s.iter().count(), 10_000);
    }

    #[test]
    fn duplicates_are_refused() {
        let e = entry("a.com", Status::Filed, true);
        let err = Snapshot::from_entries([&e, &e], 1).err().unwrap();
        assert_eq!(err, BuildError::Duplicate("a.com".into()));
    }

    #[test]
    fn apply_matches_a_simple_model_and_leaves_the_old_snapshot_alone() {
        let initial: Vec<Entry> = (0..3000)
            .map(|i| entry(&format!("d{i}.cn"), Status::Filed, true))
            .collect();
        let mut snap = Snapshot::from_entries(&initial, 1).unwrap();
        let mut model = model_of(&snap);
        // Enough rounds on a small key space to force deltas, tombstones and re-freezes.
        let mut x: u64 = 42;
        for round in 0..200u64 {
            let mut ops = Vec::new();
            for _ in 0..50 {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let d = format!("d{}.cn", (x >> 33) % 4000);
                if (x >> 20) % 3 == 0 {
                    ops.push(Op::Delete(d));
                } else {
                    ops.push(Op::Put(entry(&d, Status::Revoked, round % 2 == 0)));
                }
            }
            let before = model_of(&snap);
            let next = snap.apply(&ops, round + 2);
            for op in &ops {
                match op {
                    Op::Put(e) => {
                        model.insert(e.domain.clone(), e.clone());
                    }
                    Op::Delete(d) => {
                        model.remove(d);
                    }
                }
            }
            assert_eq!(model_of(&snap), before, "old snapshot changed");
            assert_eq!(model_of(&next), model);
            assert_eq!(next.len(), model.len());
            for (d, e) in &model {
                assert_eq!(next.get(d), Some(e.as_ref()));
            }
            snap = next;
        }
        for i in 0..4000 {
            let d = format!("d{i}.cn");
            assert_eq!(snap.get(&d).map(|e| e.to_entry()), model.get(&d).cloned());
        }
    }

    #[test]
    fn packed_size_per_entry_is_small() {
        let entries: Vec<Entry> = (0..200_000)
            .map(|i| Entry {
                domain: format!("d{i:07}.com.cn"),
                icp: format!("京ICP备{:08}号-1", i),
                status: Status::Filed,
                access_here: true,
            })
            .collect();
        let s = Snapshot::from_entries(&entries, 1).unwrap();
        let per_entry = s.heap_bytes() / entries.len();
        // 15-byte domain + 24-byte number + 12-byte record + ~6 bytes of table.
        assert!(per_entry < 80, "{per_entry} bytes per entry");
    }
}
