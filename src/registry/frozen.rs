//! The read-only base of one registry shard: entries packed into a string arena, found through
//! a table of cache-line buckets.
//!
//! A lookup is a chain of dependent cache misses, and at a million entries and more nothing of
//! the table stays in cache under load (profiled: the registry lookups were the largest user-space
//! item of the mixed HTTP load). A general hash table (hashbrown) costs three misses for a found
//! name: its control bytes, the record, then the name in the arena. Here a bucket is one cache
//! line holding eight slots' tags, flags and arena positions side by side, so a found name costs
//! two (the bucket, the arena) and a name that is not there one. Entries are only ever added
//! (a changed shard is re-frozen whole), so the table needs no deletion marks.
//!
//! Lookups come in two steps, [`Frozen::home`] then [`Frozen::find`], so that a caller with
//! several names to look up (a name and its parents) can fetch all their buckets before it
//! compares any: the misses then overlap instead of following one another.

use std::hash::BuildHasher;
use std::sync::{Arc, LazyLock};

use super::entry::{BuildError, EntryRef, Status};

/// One hasher for the life of the process, randomly seeded: lookups hash client-supplied names.
static HASHER: LazyLock<foldhash::fast::RandomState> = LazyLock::new(Default::default);

/// The hash the tables place and find a name by.
pub(super) fn hash(domain: &str) -> u64 {
    HASHER.hash_one(domain.as_bytes())
}

/// Slots per bucket: 8 × (2 + 4 + 1 + 1) bytes fill one 64-byte line.
const SLOTS: usize = 8;
/// Buckets are filled to at most 6 of their 8 slots on average: a bucket then overflows into the
/// next rarely (~15 % of buckets at a Poisson load of 6), and a table costs 10.7 bytes an entry
/// against hashbrown's ~15 for the same records.
const PER_BUCKET: usize = 6;

/// `meta` of a used slot; an empty slot's meta is 0.
const USED: u16 = 1 << 15;
const ACCESS_HERE: u16 = 1 << 14;
const REVOKED: u16 = 1 << 13;
/// The low bits of the name's hash kept in `meta`: a slot of another name passes for this one
/// (and costs a comparison in the arena) once in 8 192.
const TAG: u16 = (1 << 13) - 1;

#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
struct Bucket {
    meta: [u16; SLOTS],
    /// Where the slot's domain starts in the arena; its filing number follows it.
    offset: [u32; SLOTS],
    domain_len: [u8; SLOTS],
    icp_len: [u8; SLOTS],
}

impl Bucket {
    fn put(&mut self, slot: usize, meta: u16, offset: u32, domain_len: u8, icp_len: u8) {
        self.meta[slot] = meta;
        self.offset[slot] = offset;
        self.domain_len[slot] = domain_len;
        self.icp_len[slot] = icp_len;
    }
}

/// The bits of a name's hash its slot keeps.
fn tag(hash: u64) -> u16 {
    hash as u16 & TAG
}

/// Packed, read-only entries of one shard; a clone shares them.
///
/// Held in the shard itself rather than behind one more pointer: a lookup goes from the shard
/// straight to the bucket, and fetches the arena's address beside it. The buckets and the arena's
/// address are aligned to a cache line, so inside their `Arc`s they do not share a line with the
/// reference counts that every published update increments and decrements (measured: without
/// that, lookups under a stream of updates ran 2.1-2.2× slower than idle).
#[derive(Clone, Default)]
pub(super) struct Frozen {
    buckets: Arc<[Bucket]>,
    arena: Arc<Arena>,
    len: usize,
}

/// The names and numbers, boxed inside the `Arc` so that freezing moves the built string rather
/// than copying it.
#[derive(Default)]
#[repr(align(64))]
struct Arena(Box<str>);

/// A name's home bucket, fetched: its index, a copy of its slots' meta, and the arena.
#[derive(Clone, Copy)]
pub(super) struct Home<'a> {
    bucket: usize,
    meta: [u16; SLOTS],
    arena: &'a str,
}

impl Frozen {
    /// Fetches the bucket where a name hashing to `hash` is, or where its search starts.
    pub(super) fn home(&self, hash: u64) -> Option<Home<'_>> {
        let bucket = bucket_of(hash, self.buckets.len())?;
        Some(Home {
            bucket,
            meta: self.buckets[bucket].meta,
            arena: &self.arena.0,
        })
    }

    /// The entry for `domain` (hashing to `hash`), searched from `home` (its [`Frozen::home`]).
    pub(super) fn find<'a>(
        &'a self,
        home: Home<'a>,
        hash: u64,
        domain: &str,
    ) -> Option<EntryRef<'a>> {
        let (b, slot) = find_slot(&self.buckets, home.bucket, home.meta, hash, |b, s| {
            domain_at(home.arena, &self.buckets[b], s) == domain
        })
        .ok()?;
        Some(entry_at(home.arena, &self.buckets[b], slot))
    }

    pub(super) fn get(&self, hash: u64, domain: &str) -> Option<EntryRef<'_>> {
        self.find(self.home(hash)?, hash, domain)
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = EntryRef<'_>> {
        let arena: &str = &self.arena.0;
        self.buckets.iter().flat_map(move |bucket| {
            (0..SLOTS)
                .filter(|&slot| bucket.meta[slot] != 0)
                .map(move |slot| entry_at(arena, bucket, slot))
        })
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn heap_bytes(&self) -> usize {
        std::mem::size_of_val::<[Bucket]>(&self.buckets) + self.arena.0.len()
    }
}

/// Walks from bucket `b` (whose meta is `meta`) to the slot `is_it` accepts among those tagged
/// like `hash`: `Ok((bucket, slot))`, or `Err((bucket, slot))`, the first free slot, where such
/// an entry would go. Entries go to the first free slot from their home on, so the first bucket
/// with a free slot ends the search; the table always has one.
fn find_slot(
    buckets: &[Bucket],
    mut b: usize,
    mut meta: [u16; SLOTS],
    hash: u64,
    is_it: impl Fn(usize, usize) -> bool,
) -> Result<(usize, usize), (usize, usize)> {
    let want = USED | tag(hash);
    loop {
        for (slot, &m) in meta.iter().enumerate() {
            if m & (USED | TAG) == want && is_it(b, slot) {
                return Ok((b, slot));
            }
        }
        if let Some(free) = meta.iter().position(|&m| m == 0) {
            return Err((b, free));
        }
        b = (b + 1) % buckets.len();
        meta = buckets[b].meta;
    }
}

fn domain_at<'a>(arena: &'a str, bucket: &Bucket, slot: usize) -> &'a str {
    let start = bucket.offset[slot] as usize;
    arena
        .get(start..start + usize::from(bucket.domain_len[slot]))
        .unwrap_or_default()
}

fn entry_at<'a>(arena: &'a str, bucket: &Bucket, slot: usize) -> EntryRef<'a> {
    let start = bucket.offset[slot] as usize;
    let mid = start + usize::from(bucket.domain_len[slot]);
    let end = mid + usize::from(bucket.icp_len[slot]);
    let meta = bucket.meta[slot];
    EntryRef {
        domain: arena.get(start..mid).unwrap_or_default(),
        icp: arena.get(mid..end).unwrap_or_default(),
        status: if meta & REVOKED != 0 {
            Status::Revoked
        } else {
            Status::Filed
        },
        access_here: meta & ACCESS_HERE != 0,
    }
}

/// The bucket for `hash` among `buckets` (`None` when there are none): the hash's high bits
/// scaled to the table, so the table needs no power-of-two size; the tag uses the low bits.
fn bucket_of(hash: u64, buckets: usize) -> Option<usize> {
    if buckets == 0 {
        return None;
    }
    Some(((u128::from(hash) * buckets as u128) >> 64) as usize)
}

/// Fills one shard's table, refusing duplicates as they come, then freezes it.
#[derive(Default)]
pub(super) struct FrozenBuilder {
    /// Filled in place (never shared while building), so that freezing copies nothing: a copy
    /// left the builder's tables behind as holes in the heap (+37 MiB RSS at 10 M entries).
    buckets: Arc<[Bucket]>,
    arena: String,
    len: usize,
    /// Buckets to start with, from [`FrozenBuilder::reserve`]. The table is made at the first
    /// push, not at once: a snapshot file fills one shard after another, and a table made when
    /// its entries arrive is still in cache while they fill it (made up front, the 4096 tables
    /// of a 10 M registry were out of cache again by then: +0.3 s at start).
    planned: usize,
}

impl FrozenBuilder {
    /// Room for `entries` more entries taking `bytes` of names and numbers, so that loading a
    /// large registry never re-packs (which re-reads every name already in the shard).
    pub(super) fn reserve(&mut self, entries: usize, bytes: usize) {
        let needed = (self.len + entries).div_ceil(PER_BUCKET);
        if self.buckets.is_empty() {
            self.planned = self.planned.max(needed);
        } else if needed > self.buckets.len() {
            self.repack(needed, hash);
        }
        self.arena.reserve(bytes);
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(super) fn push(&mut self, hash: u64, e: EntryRef<'_>) -> Result<(), BuildError> {
        if self.len >= self.buckets.len() * PER_BUCKET {
            let size = (self.buckets.len() * 2).max(self.planned).max(1);
            self.repack(size, self::hash);
        }
        // Lengths were bounded when the entry was validated (253-byte names, 255-byte numbers).
        let (Ok(domain_len), Ok(icp_len)) =
            (u8::try_from(e.domain.len()), u8::try_from(e.icp.len()))
        else {
            return Err(BuildError::TooLarge);
        };
        let offset = u32::try_from(self.arena.len()).map_err(|_| BuildError::TooLarge)?;
        let Some(home) = bucket_of(hash, self.buckets.len()) else {
            return Err(BuildError::TooLarge);
        };
        let FrozenBuilder { buckets, arena, .. } = &*self;
        let found = find_slot(buckets, home, buckets[home].meta, hash, |b, s| {
            domain_at(arena, &buckets[b], s) == e.domain
        });
        let Err((b, slot)) = found else {
            return Err(BuildError::Duplicate(e.domain.to_string()));
        };
        self.arena.push_str(e.domain);
        self.arena.push_str(e.icp);
        let flags = if e.status == Status::Revoked {
            REVOKED
        } else {
            0
        } | if e.access_here { ACCESS_HERE } else { 0 };
        Arc::make_mut(&mut self.buckets)[b].put(
            slot,
            USED | flags | tag(hash),
            offset,
            domain_len,
            icp_len,
        );
        self.len += 1;
        Ok(())
    }

    /// Moves every entry into a table of `size` buckets, with its name hashed by `hash`.
    fn repack(&mut self, size: usize, hash: impl Fn(&str) -> u64) {
        let old = std::mem::replace(
            &mut self.buckets,
            (0..size).map(|_| Bucket::default()).collect(),
        );
        let new = Arc::make_mut(&mut self.buckets);
        for bucket in old.iter() {
            for slot in (0..SLOTS).filter(|&s| bucket.meta[s] != 0) {
                let h = hash(domain_at(&self.arena, bucket, slot));
                let Some(home) = bucket_of(h, size) else {
                    return;
                };
                // Names in a built table are distinct: only the first free slot is wanted.
                let (Ok((b, free)) | Err((b, free))) =
                    find_slot(new, home, new[home].meta, h, |_, _| false);
                new[b].put(
                    free,
                    bucket.meta[slot] & !TAG | tag(h),
                    bucket.offset[slot],
                    bucket.domain_len[slot],
                    bucket.icp_len[slot],
                );
            }
        }
    }

    /// The finished table, shrunk first when filling it left it less than half used (a registry
    /// built without a size hint grows by doubling).
    pub(super) fn finish(mut self) -> Frozen {
        let fits = self.len.div_ceil(PER_BUCKET);
        if self.buckets.len() > 2 * fits {
            self.repack(fits, hash);
        }
        Frozen {
            buckets: self.buckets,
            arena: Arc::new(Arena(self.arena.into_boxed_str())),
            len: self.len,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn built(n: usize) -> (Frozen, Vec<(String, String)>) {
        let mut b = FrozenBuilder::default();
        let names: Vec<(String, String)> = (0..n)
            .map(|i| (format!("n{i}.example.cn"), format!("京ICP备{i:08}号")))
            .collect();
        for (i, (d, icp)) in names.iter().enumerate() {
            let e = EntryRef {
                domain: d,
                icp,
                status: if i % 3 == 0 {
                    Status::Revoked
                } else {
                    Status::Filed
                },
                access_here: i % 2 == 0,
            };
            b.push(hash(d), e).unwrap();
        }
        (b.finish(), names)
    }

    #[test]
    fn every_entry_is_found_with_its_fields_and_no_other_name_is() {
        for n in [0, 1, 5, 6, 7, 8, 9, 100, 5000] {
            let (f, names) = built(n);
            assert_eq!(f.len(), n);
            assert_eq!(f.iter().count(), n);
            for (i, (d, icp)) in names.iter().enumerate() {
                let e = f.get(hash(d), d).unwrap_or_else(|| panic!("{d} of {n}"));
                assert_eq!((e.domain, e.icp), (d.as_str(), icp.as_str()));
                assert_eq!(e.status == Status::Revoked, i % 3 == 0);
                assert_eq!(e.access_here, i % 2 == 0);
            }
            for i in n..n + 200 {
                let d = format!("n{i}.example.cn");
                assert_eq!(f.get(hash(&d), &d), None);
            }
            assert_eq!(f.get(hash("example.cn"), "example.cn"), None);
        }
    }

    #[test]
    fn a_tag_match_alone_is_not_a_hit() {
        // Every entry stored under one hash: all share a home bucket and a tag, overflow into
        // the following buckets (from the last one, round to the first), and only the arena
        // comparison tells them apart.
        let names: Vec<String> = (0..40).map(|i| format!("same{i}.cn")).collect();
        for h in [7, u64::MAX] {
            let mut b = FrozenBuilder::default();
            for d in &names {
                let e = EntryRef {
                    domain: d,
                    icp: "icp",
                    status: Status::Filed,
                    access_here: true,
                };
                b.push(h, e).unwrap();
            }
            b.repack(b.buckets.len(), |_| h);
            let f = b.finish();
            for d in &names {
                assert_eq!(f.get(h, d).map(|e| e.domain), Some(d.as_str()));
            }
            assert_eq!(f.get(h, "same40.cn"), None);
            assert_eq!(f.get(h, "same1.c"), None);
        }
    }

    #[test]
    fn a_bucket_is_one_cache_line() {
        assert_eq!(std::mem::size_of::<Bucket>(), 64);
    }
}
