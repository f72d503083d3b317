//! The immutable registry snapshot the data path reads.
//!
//! Sized for China's whole filing base (10 million domains): entries are packed into one string
//! arena per shard with a table of cache-line buckets ([`super::frozen`]; about 51 bytes an
//! entry instead of ~150 for a `HashMap<String, Entry>`), and the snapshot is split into
//! [`SHARDS`] shards so that an update copies only what it touches. Each shard is a frozen base
//! plus a small delta of recent changes; when the delta grows past a fraction of its base, the
//! shard is re-frozen. Shards are held in groups of [`GROUP`], each group shared by `Arc`:
//! publishing a single upsert copies one group and the list of groups, and touches ~200
//! reference counts rather than two per shard, which is what kept lookups on the other core slow
//! under a stream of updates. A batch produces a new snapshot that shares every untouched group
//! with the old one.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, OnceLock};

use hashbrown::HashTable;
use sha2::{Digest, Sha256};

use super::entry::{BuildError, Entry, EntryRef, Status};
use super::frozen::{Frozen, FrozenBuilder, Home, hash};

/// Number of shards (a power of two). 4096 keeps a shard at ~2,500 entries at 10 M.
pub const SHARDS: usize = 1 << SHARD_BITS;
const SHARD_BITS: u32 = 12;
/// Shards per shared group.
const GROUP: usize = 64;

/// Which shard holds a name: a hash with a fixed seed, unlike the tables' randomly seeded one,
/// so that a snapshot file (written shard by shard) is read back shard by shard after a restart,
/// each shard's table and arena hot in cache while they fill (at 10 M entries, random order
/// made every insert a cache miss and cold start twice as slow). Tables inside a shard still
/// use the random seed.
fn shard_of(domain: &str) -> usize {
    const SHARD_HASHER: foldhash::fast::FixedState =
        foldhash::fast::FixedState::with_seed(0x1c9_9a7e_5eed);
    (SHARD_HASHER.hash_one(domain.as_bytes()) >> (64 - SHARD_BITS)) as usize
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

/// A whole registry at one revision. Cheap to share (`Arc`), never mutated; a clone shares every
/// shard.
#[derive(Clone)]
pub struct Snapshot {
    /// `SHARDS / GROUP` groups of `GROUP` shards; shard `s` is `groups[s / GROUP][s % GROUP]`.
    groups: Box<[Arc<[Shard]>]>,
    len: usize,
    revision: u64,
    /// [`Snapshot::digest`], once asked for; kept up to date by [`Snapshot::apply`] from then on.
    digest: OnceLock<u128>,
}

/// One entry's share of [`Snapshot::digest`]: the first 16 bytes (big-endian) of the SHA-256 of
/// `domain \n icp \n status \n access_here` (`filed`/`revoked`, `true`/`false`).
fn entry_digest(domain: &str, icp: &str, status: Status, access_here: bool) -> u128 {
    let mut h = Sha256::new();
    h.update(domain.as_bytes());
    h.update(b"\n");
    h.update(icp.as_bytes());
    h.update(b"\n");
    h.update(status.as_str().as_bytes());
    h.update(if access_here {
        b"\ntrue" as &[u8]
    } else {
        b"\nfalse"
    });
    let out = h.finalize();
    let mut first = [0u8; 16];
    first.copy_from_slice(&out[..16]);
    u128::from_be_bytes(first)
}

/// A lookup under way: the name, its hash, its shard and its base bucket, fetched.
struct Probe<'s, 'n> {
    name: &'n str,
    hash: u64,
    shard: &'s Shard,
    home: Option<Home<'s>>,
}

#[derive(Clone)]
struct Shard {
    base: Frozen,
    /// Recent changes on top of `base`; `None` when there are none (the common case).
    delta: Option<Arc<Delta>>,
}

/// Changes since the base was frozen: `None` marks a deletion of a base entry. Aligned to a cache
/// line so that, inside its `Arc`, the table readers use does not share a line with the reference
/// count every published update touches.
#[derive(Clone, Default)]
#[repr(align(64))]
struct Delta {
    table: HashTable<(Box<str>, Option<Value>)>,
}

#[derive(Clone)]
struct Value {
    icp: Box<str>,
    status: Status,
    access_here: bool,
}

impl Value {
    fn entry<'a>(&'a self, domain: &'a str) -> EntryRef<'a> {
        EntryRef {
            domain,
            icp: &self.icp,
            status: self.status,
            access_here: self.access_here,
        }
    }
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

    /// A builder for about `entries` entries taking about `bytes` of names and numbers: every
    /// shard's table and arena are sized up front, so loading 10 million entries never rehashes
    /// (a rehash re-reads every name already in the shard, at a cache miss each).
    pub fn with_capacity(entries: usize, bytes: usize) -> Self {
        // Shards fill unevenly; an eighth more than the mean absorbs that in nearly all.
        let per_shard = entries.div_ceil(SHARDS);
        let per_shard = per_shard + per_shard / 8;
        let arena = bytes.div_ceil(SHARDS);
        let arena = arena + arena / 8;
        let mut b = Self::default();
        for shard in &mut b.shards {
            shard.reserve(per_shard, arena);
        }
        b
    }

    /// Adds one entry; a second entry for the same domain is refused.
    pub fn push(&mut self, e: EntryRef<'_>) -> Result<(), BuildError> {
        let h = hash(e.domain);
        self.shards[shard_of(e.domain)].push(h, e)?;
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
        // Empty shards (most of them in a small registry) share one empty base.
        let empty = Frozen::default();
        let mut shards = self.shards.into_iter().map(|b| Shard {
            base: if b.is_empty() {
                empty.clone()
            } else {
                b.finish()
            },
            delta: None,
        });
        let groups = (0..SHARDS / GROUP)
            .map(|_| shards.by_ref().take(GROUP).collect())
            .collect();
        Snapshot {
            groups,
            len: self.len,
            revision,
            digest: OnceLock::new(),
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
        self.resolve(&self.probe(domain))
    }

    /// The first of `names` that the registry holds: given a name and then its parents, the
    /// longest match. The buckets of up to four names are fetched before any is compared, so
    /// their cache misses overlap instead of following one another (a sub-domain's lookup is a
    /// miss, then its parent).
    pub fn find_first<'n>(&self, names: impl IntoIterator<Item = &'n str>) -> Option<EntryRef<'_>> {
        const AHEAD: usize = 4;
        let mut names = names.into_iter();
        loop {
            let mut batch: [Option<Probe<'_, 'n>>; AHEAD] = [None, None, None, None];
            for (slot, name) in batch.iter_mut().zip(names.by_ref()) {
                *slot = Some(self.probe(name));
            }
            batch[0].as_ref()?;
            if let Some(e) = batch.iter().flatten().find_map(|p| self.resolve(p)) {
                return Some(e);
            }
        }
    }

    /// Starts looking `name` up: hashes it and fetches its bucket.
    fn probe<'n>(&self, name: &'n str) -> Probe<'_, 'n> {
        let hash = hash(name);
        let shard = self.shard(shard_of(name));
        Probe {
            name,
            hash,
            shard,
            home: shard.base.home(hash),
        }
    }

    /// Finishes a [`Snapshot::probe`]: the shard's recent changes first, then its base.
    fn resolve<'s>(&'s self, p: &Probe<'s, '_>) -> Option<EntryRef<'s>> {
        if let Some(delta) = &p.shard.delta
            && let Some((name, value)) = delta.table.find(p.hash, |(d, _)| &**d == p.name)
        {
            return value.as_ref().map(|v| v.entry(name));
        }
        p.shard.base.find(p.home?, p.hash, p.name)
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

    /// The same entries at another revision (a fleet change installed at its stream sequence).
    pub fn at_revision(mut self, revision: u64) -> Snapshot {
        self.revision = revision;
        self
    }

    /// An order-independent digest of every entry: the sum modulo 2^128 of each entry's
    /// SHA-256-based share. Two registries holding the same entries have the same digest,
    /// whatever their history. Computed on first use (a pass over every entry), then carried
    /// from snapshot to snapshot by [`Snapshot::apply`] at the cost of the entries it changes.
    pub fn digest(&self) -> u128 {
        *self.digest.get_or_init(|| {
            self.iter().fold(0u128, |d, e| {
                d.wrapping_add(entry_digest(e.domain, e.icp, e.status, e.access_here))
            })
        })
    }

    /// [`Snapshot::digest`] as 32 lowercase hex digits.
    pub fn digest_hex(&self) -> String {
        format!("{:032x}", self.digest())
    }

    /// Every entry, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = EntryRef<'_>> {
        self.groups.iter().flat_map(|g| g.iter()).flat_map(|shard| {
            let delta = shard.delta.as_deref();
            let base = shard.base.iter().filter(move |e| {
                delta.is_none_or(|d| {
                    d.table
                        .find(hash(e.domain), |(n, _)| **n == *e.domain)
                        .is_none()
                })
            });
            let changed = delta.into_iter().flat_map(|d| {
                d.table
                    .iter()
                    .filter_map(|(name, value)| value.as_ref().map(|v| v.entry(name)))
            });
            base.chain(changed)
        })
    }

    /// A new snapshot with `ops` applied in order, at `revision`. Shards no op touches are shared
    /// with `self`; `self` is unchanged, so readers of it are never disturbed.
    pub fn apply(&self, ops: &[Op], revision: u64) -> Snapshot {
        let mut groups = self.groups.to_vec();
        let mut len = self.len;
        // Copies of the deltas of the shards this update touches (a handful for a single write).
        let mut touched: HashMap<usize, Delta> = HashMap::new();
        let mut digest = self.digest.get().copied();
        for op in ops {
            let h = hash(op.domain());
            let s = shard_of(op.domain());
            let delta = touched
                .entry(s)
                .or_insert_with(|| self.shard(s).delta.as_deref().cloned().unwrap_or_default());
            let base_entry = self.shard(s).base.get(h, op.domain());
            let in_base = base_entry.is_some();
            // The entry as it stands before this op: the delta's word, else the base's.
            let current = match delta.table.find(h, |(d, _)| &**d == op.domain()) {
                Some((name, v)) => v.as_ref().map(|v| v.entry(name)),
                None => base_entry,
            };
            let existed = current.is_some();
            if let Some(d) = &mut digest {
                let old = current.map(|e| entry_digest(e.domain, e.icp, e.status, e.access_here));
                let new = match op {
                    Op::Put(e) => entry_digest(&e.domain, &e.icp, e.status, e.access_here),
                    Op::Delete(_) => 0,
                };
                *d = d.wrapping_sub(old.unwrap_or(0)).wrapping_add(new);
            }
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
        for (s, delta) in touched {
            let base = &self.shard(s).base;
            // The first change to a group copies it; later ones in the same update reuse the copy.
            Arc::make_mut(&mut groups[s / GROUP])[s % GROUP] =
                if delta.table.len() > 64 + base.len() / 8 {
                    Shard {
                        base: refreeze(base, &delta),
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
            groups: groups.into_boxed_slice(),
            len,
            revision,
            digest: digest.map(OnceLock::from).unwrap_or_default(),
        }
    }

    fn shard(&self, s: usize) -> &Shard {
        &self.groups[s / GROUP][s % GROUP]
    }

    /// Approximate heap bytes held (for sizing and the bench; shared shards counted once here).
    pub fn heap_bytes(&self) -> usize {
        self.groups
            .iter()
            .flat_map(|g| g.iter())
            .map(|s| {
                s.base.heap_bytes() + s.delta.as_ref().map_or(0, |d| d.table.allocation_size())
            })
            .sum::<usize>()
            + SHARDS * std::mem::size_of::<Shard>()
    }
}

/// Merges a shard's delta into a new frozen base.
fn refreeze(base: &Frozen, delta: &Delta) -> Frozen {
    let mut b = FrozenBuilder::default();
    b.reserve(base.len() + delta.table.len(), 0);
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
            let _ = b.push(hash(domain), v.entry(domain));
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
    fn find_first_is_the_first_name_held_past_a_batch_and_through_the_delta() {
        let names: Vec<String> = (0..9).map(|i| format!("n{i}.cn")).collect();
        let held = |idx: &[usize]| {
            let entries: Vec<Entry> = idx
                .iter()
                .map(|&i| entry(&names[i], Status::Filed, true))
                .collect();
            Snapshot::from_entries(&entries, 1).unwrap()
        };
        let first = |s: &Snapshot| {
            s.find_first(names.iter().map(String::as_str))
                .map(|e| e.domain.to_string())
        };
        assert_eq!(first(&held(&[])), None);
        assert_eq!(first(&held(&[1, 4])), Some("n1.cn".to_string()));
        // Past the first batch of four names.
        assert_eq!(first(&held(&[6, 8])), Some("n6.cn".to_string()));
        assert_eq!(first(&held(&[8])), Some("n8.cn".to_string()));
        // A deletion in the delta hides the base entry; a put in the delta is found.
        let s = held(&[2, 7]).apply(&[Op::Delete("n2.cn".into())], 2);
        assert_eq!(first(&s), Some("n7.cn".to_string()));
        let s = s.apply(&[Op::Put(entry("n5.cn", Status::Revoked, false))], 3);
        assert_eq!(first(&s), Some("n5.cn".to_string()));
        assert_eq!(s.get("n5.cn").map(|e| e.status), Some(Status::Revoked));
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
    fn digest_is_order_independent_and_follows_apply() {
        let entries: Vec<Entry> = (0..500)
            .map(|i| entry(&format!("d{i}.cn"), Status::Filed, i % 3 == 0))
            .collect();
        let forward = Snapshot::from_entries(&entries, 1).unwrap();
        let backward = Snapshot::from_entries(entries.iter().rev(), 9).unwrap();
        assert_eq!(forward.digest(), backward.digest());
        assert_ne!(forward.digest(), Snapshot::empty().digest());
        assert_eq!(Snapshot::empty().digest(), 0);
        // Carried through apply (the digest was computed), and equal to a fresh computation.
        let ops = vec![
            Op::Put(entry("d1.cn", Status::Revoked, false)),
            Op::Delete("d2.cn".into()),
            Op::Delete("absent.cn".into()),
            Op::Put(entry("new.cn", Status::Filed, true)),
            Op::Put(entry("new.cn", Status::Filed, false)),
            Op::Delete("d3.cn".into()),
            Op::Put(entry("d3.cn", Status::Filed, true)),
        ];
        let next = forward.apply(&ops, 2);
        let carried = next.digest();
        let fresh =
            Snapshot::from_entries(&next.iter().map(|e| e.to_entry()).collect::<Vec<_>>(), 2)
                .unwrap()
                .digest();
        assert_eq!(carried, fresh);
        assert_ne!(carried, forward.digest());
        // Undoing the changes comes back to the same digest.
        let undo: Vec<Op> = ["d1.cn", "d2.cn", "d3.cn"]
            .iter()
            .map(|d| Op::Put(entries.iter().find(|e| e.domain == *d).unwrap().clone()))
            .chain([Op::Delete("new.cn".into())])
            .collect();
        assert_eq!(next.apply(&undo, 3).digest(), forward.digest());
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
