//! The state folder's promise, checked against damage, for the fuzz targets (`store_damage`,
//! `store_bytes`) and the tests: a folder with one byte changed anywhere either refuses to load,
//! or — only when the byte lies in the last record of the last journal, which is what an append
//! cut off by a crash looks like — loads without exactly that record. Never a shorter registry
//! otherwise, and never a panic on any bytes at all.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::entry::{Entry, Status};
use super::snapshot::{Op, Snapshot};
use super::store::{Store, read_state, write_snapshot};

const JOURNAL_PREFIX: &str = "journal-";

/// A scratch folder per process and thread, emptied at each call: fuzz targets call this
/// millions of times, tests from several threads at once.
fn scratch() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SLOT: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    let slot = SLOT.with(|s| *s);
    // On tmpfs where there is one: the store fsyncs every write, which a disk makes slow.
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("icp-gate-damage-{}-{slot}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    // A scratch folder that cannot be made is the machine's fault, not the input's.
    fs::create_dir_all(&dir).expect("scratch folder");
    dir
}

fn journal_in(dir: &Path) -> Option<PathBuf> {
    fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(JOURNAL_PREFIX))
        })
}

fn sorted(s: &Snapshot) -> (u64, Vec<Entry>) {
    let mut v: Vec<Entry> = s.iter().map(|e| e.to_entry()).collect();
    v.sort_by(|a, b| a.domain.cmp(&b.domain));
    (s.revision(), v)
}

/// Reads bytes two at a time as the writes to make, so a fuzzer steers them.
fn ops_from(bytes: &[u8]) -> Vec<Op> {
    bytes
        .chunks(2)
        .map(|c| {
            let domain = format!("d{}.cn", c[0] % 16);
            match c.get(1).copied().unwrap_or(0) % 4 {
                0 => Op::Delete(domain),
                n => Op::Put(Entry {
                    domain,
                    icp: format!("京ICP备{n}号"),
                    status: if n == 3 {
                        Status::Revoked
                    } else {
                        Status::Filed
                    },
                    access_here: n != 2,
                }),
            }
        })
        .collect()
}

/// Builds a state folder from `data` (a seed snapshot and up to 8 journal records), changes one
/// byte of its snapshot or its journal as `data` says, and checks what loading it gives.
///
/// # Panics
/// When the damaged folder loads as anything but the whole registry or, for damage in the last
/// journal record, the registry without that record.
pub fn check_damaged_state(data: &[u8]) {
    let [
        target,
        position_hi,
        position_lo,
        xor,
        records,
        seed,
        rest @ ..,
    ] = data
    else {
        return;
    };
    let xor = if *xor == 0 { 1 } else { *xor };
    let dir = scratch();
    let (mut store, _) = Store::open(&dir).expect("open a fresh state folder");
    let seed_entries: Vec<Entry> = ops_from(&[*seed, 1, seed.wrapping_add(5), 2])
        .into_iter()
        .filter_map(|op| match op {
            Op::Put(e) => Some(e),
            Op::Delete(_) => None,
        })
        .collect();
    let mut deduped: Vec<Entry> = Vec::new();
    for e in seed_entries {
        if !deduped.iter().any(|d| d.domain == e.domain) {
            deduped.push(e);
        }
    }
    let mut snapshot = Snapshot::from_entries(&deduped, 0).expect("distinct seed entries");
    write_snapshot(&dir, &snapshot).expect("write the seed snapshot");
    let mut states = vec![sorted(&snapshot)];
    let n = usize::from(records % 8) + 1;
    for (i, chunk) in rest.chunks(6).take(n).enumerate() {
        let ops = ops_from(chunk);
        let revision = i as u64 + 1;
        store.append(revision, &ops).expect("append");
        store.sync().expect("sync");
        snapshot = snapshot.apply(&ops, revision);
        states.push(sorted(&snapshot));
    }
    drop(store);

    let journal = journal_in(&dir).expect("the store made a journal");
    let file = if target % 2 == 0 {
        dir.join("snapshot.bin")
    } else {
        journal.clone()
    };
    let mut bytes = fs::read(&file).expect("read back");
    if bytes.is_empty() {
        return;
    }
    let last_record = if file == journal {
        last_record_start(&bytes)
    } else {
        None
    };
    let at = usize::from(u16::from_be_bytes([*position_hi, *position_lo])) % bytes.len();
    bytes[at] ^= xor;
    fs::write(&file, &bytes).expect("write the damage");

    let full = states.last().cloned().expect("at least the seed");
    match read_state(&dir) {
        Err(_) => {}
        Ok(None) => panic!("a damaged folder loaded as no state at all"),
        Ok(Some(loaded)) => {
            let loaded = sorted(&loaded);
            let torn_ok = last_record.is_some_and(|start| at >= start)
                && states.len() >= 2
                && loaded == states[states.len() - 2];
            assert!(
                loaded == full || torn_ok,
                "byte {at} of {} ^ {xor:#04x}: loaded revision {} with {} entries; \
                 the registry was revision {} with {} entries",
                file.display(),
                loaded.0,
                loaded.1.len(),
                full.0,
                full.1.len()
            );
        }
    }
    let _ = fs::remove_dir_all(&dir);
}

/// Where the last record of an intact journal starts: records are `[u32 len][u32 crc][payload]`.
fn last_record_start(bytes: &[u8]) -> Option<usize> {
    let mut off = 0usize;
    let mut last = None;
    while off + 8 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[off..off + 4].try_into().ok()?) as usize;
        last = Some(off);
        off = off.checked_add(8)?.checked_add(len)?;
    }
    last
}

/// Arbitrary bytes as `snapshot.bin` and as a journal: loading never panics, and a folder it
/// accepts holds a registry that iterates.
pub fn check_state_bytes(data: &[u8]) {
    let dir = scratch();
    let (snapshot, journal) = data.split_at(data.len() / 2);
    let _ = fs::write(dir.join("snapshot.bin"), snapshot);
    let _ = fs::write(dir.join(format!("{JOURNAL_PREFIX}{:020}.log", 0)), journal);
    if let Ok(Some(s)) = read_state(&dir) {
        assert_eq!(s.iter().count(), s.len());
    }
    let _ = fs::remove_dir_all(&dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fuzz targets' checks, run over every byte of a small folder's snapshot and journal.
    #[test]
    fn one_damaged_byte_anywhere_refuses_or_drops_only_the_last_record() {
        let writes = [
            1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18,
        ];
        for target in [0u8, 1] {
            for at in (0u16..400).step_by(7) {
                let [hi, lo] = at.to_be_bytes();
                let mut data = vec![target, hi, lo, 0x41, 2, 9];
                data.extend_from_slice(&writes);
                check_damaged_state(&data);
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        for data in [
            &b""[..],
            b"ICPGSNP1",
            &[0xff; 64],
            b"ICPGSNP1\x01\0\0\0\0\0\0\0\x05",
        ] {
            check_state_bytes(data);
        }
    }
}
