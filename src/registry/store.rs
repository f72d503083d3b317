//! Durable registry state in `state_dir`: a snapshot file plus append-only, checksummed journals.
//!
//! Files:
//! - `snapshot.bin`: the whole registry at revision S. Layout: magic `ICPGSNP1`, revision (u64
//!   LE), entry count (u64 LE), then per entry `[u8 len][domain][u8 len][icp][u8 flags]` (flags:
//!   bit 0 revoked, bit 1 access_here), then a CRC32 of everything before it. Written to
//!   `snapshot.bin.tmp`, fsynced, renamed over, and the folder fsynced, so a crash leaves either
//!   the old file or the new one.
//! - `journal-<base>.log`: the writes after revision `base`, one record each:
//!   `[u32 len][u32 crc32(payload)][payload]`, payload = revision (u64), op count (u32), then per op
//!   `[u8 0=put|1=delete][u8 len][domain]` and for a put `[u8 len][icp][u8 flags]`. All integers
//!   little-endian.
//!
//! Recovery loads the snapshot and replays the journals in order, skipping records at or below
//! S and requiring the rest to follow each other without gaps. The last record of the last
//! journal may be torn by a crash mid-append (it was never acknowledged): it is dropped, cut off
//! the file, and logged. Any other damage — a bad snapshot, a bad record with a valid one after
//! it, a gap — stops start-up with an error naming the file and the byte: acknowledged records
//! are never dropped, and the registry is never silently emptied.
//!
//! Compaction: the writer rotates to a new journal after revision R, writes the snapshot of R in
//! the background ([`write_snapshot`]), then removes the journals R covers. A crash between any
//! two steps recovers the same state: the old snapshot plus every journal, or the new one plus
//! the records after it.
//!
//! A write that fails (disk full, I/O error) may leave part of a record behind. Before anything
//! more is appended, [`Store::reopen`] cuts the journal back to its last sync and continues in a
//! fresh journal, so a partial record is never followed by others and the folder holds exactly
//! what was acknowledged.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use tracing::warn;

use super::entry::{Entry, EntryRef, Status};
use super::snapshot::{Op, Snapshot, SnapshotBuilder};

const SNAPSHOT: &str = "snapshot.bin";
const SNAPSHOT_TMP: &str = "snapshot.bin.tmp";
const FLEET_MARKER: &str = "fleet.json";
const FLEET_MARKER_TMP: &str = "fleet.json.tmp";
/// Written and removed by [`Store::reopen`] to see that the folder takes writes again.
const PROBE: &str = "probe.tmp";
const PROBE_BYTES: usize = 64 * 1024;
/// Appended records are written to the file once this many bytes wait (and at every sync).
const FLUSH_AT: usize = 64 * 1024;
const MAGIC: &[u8; 8] = b"ICPGSNP1";
/// Bound on one journal record (a batch of roughly a million entries), so a corrupt length field
/// cannot make recovery allocate gigabytes. A batch over it is refused before it is queued.
pub(crate) const MAX_RECORD: u32 = 256 << 20;
/// Ops replayed per snapshot application during recovery.
const REPLAY_CHUNK: usize = 200_000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: corrupt: {why}", path.display())]
    Corrupt { path: PathBuf, why: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn corrupt(path: &Path, why: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        path: path.to_path_buf(),
        why: why.into(),
    }
}

/// What start-up found in `state_dir`.
pub(crate) struct Recovered {
    /// `None`: the folder held no state at all (the caller seeds it).
    pub snapshot: Option<Snapshot>,
    pub records_replayed: usize,
    pub torn_tail_dropped: bool,
}

/// The open journal of a state folder. Owned by the registry writer; not shared.
pub(crate) struct Store {
    dir: PathBuf,
    journal: File,
    journal_path: PathBuf,
    /// Records appended but not yet written to the file. Not a `BufWriter`: after a failed write
    /// its bytes must be thrown away, never written out later.
    pending: Vec<u8>,
    /// Length of the journal through its last sync: what a failed write is cut back to.
    synced_len: u64,
    /// Length of the journal with what was written since.
    written_len: u64,
    /// Revision of the last record appended or recovered.
    last: u64,
    /// Records after the snapshot found at open.
    recovered_records: u64,
}

impl Store {
    /// Creates `dir` if missing, recovers its state, and opens a journal for appending.
    pub(crate) fn open(dir: &Path) -> Result<(Store, Recovered), StoreError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        // An interrupted snapshot write (the rename never happened) or probe: they hold nothing.
        for leftover in [SNAPSHOT_TMP, PROBE] {
            let path = dir.join(leftover);
            if path.exists() {
                fs::remove_file(&path).map_err(io_err(&path))?;
            }
        }
        let state = recover(dir, true)?;
        let (journal_path, file) = match state.journals.last() {
            Some((_, path)) => {
                let file = OpenOptions::new()
                    .append(true)
                    .open(path)
                    .map_err(io_err(path))?;
                (path.clone(), file)
            }
            None => create_journal(dir, state.revision)?,
        };
        let len = file.metadata().map_err(io_err(&journal_path))?.len();
        let mut store = Store {
            dir: dir.to_path_buf(),
            journal: file,
            journal_path,
            pending: Vec::new(),
            synced_len: len,
            written_len: len,
            last: state.revision,
            recovered_records: state.recovered.records_replayed as u64,
        };
        // Journals the snapshot covers, whose removal a restart interrupted, only cost replay.
        if let Err(e) = store.remove_journals_through(state.snapshot_revision) {
            warn!(error = %e, "could not remove journals the snapshot covers");
        }
        Ok((store, state.recovered))
    }

    /// Journal records after the snapshot when the store was opened: they count toward the next
    /// compaction as much as the ones appended since.
    pub(crate) fn recovered_records(&self) -> u64 {
        self.recovered_records
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends one batch as revision `revision` (the next after the last). Buffered: durable only
    /// after [`Store::sync`].
    pub(crate) fn append(&mut self, revision: u64, ops: &[Op]) -> Result<(), StoreError> {
        if revision != self.last + 1 {
            return Err(corrupt(
                &self.journal_path,
                format!("append of revision {revision} after {}", self.last),
            ));
        }
        if record_len(ops) > MAX_RECORD as usize {
            return Err(corrupt(
                &self.journal_path,
                "batch too large for one journal record",
            ));
        }
        let start = self.pending.len();
        self.pending.extend_from_slice(&[0; 8]);
        encode_record(&mut self.pending, revision, ops);
        let payload = &self.pending[start + 8..];
        let len = (payload.len() as u32).to_le_bytes();
        let crc = crc32fast::hash(payload).to_le_bytes();
        self.pending[start..start + 4].copy_from_slice(&len);
        self.pending[start + 4..start + 8].copy_from_slice(&crc);
        self.last = revision;
        if self.pending.len() >= FLUSH_AT {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StoreError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.journal
            .write_all(&self.pending)
            .map_err(io_err(&self.journal_path))?;
        self.written_len += self.pending.len() as u64;
        self.pending.clear();
        // One huge batch must not keep its buffer for good.
        self.pending.shrink_to(FLUSH_AT * 2);
        Ok(())
    }

    /// Makes every append so far durable (one fsync for however many records: group commit).
    pub(crate) fn sync(&mut self) -> Result<(), StoreError> {
        self.flush()?;
        self.journal
            .sync_data()
            .map_err(io_err(&self.journal_path))?;
        self.synced_len = self.written_len;
        Ok(())
    }

    /// Starts a new journal for the records after `revision` (a snapshot of it is being written).
    pub(crate) fn rotate(&mut self, revision: u64) -> Result<(), StoreError> {
        self.sync()?;
        let (path, file) = create_journal(&self.dir, revision)?;
        self.use_journal(path, file, revision)
    }

    fn use_journal(&mut self, path: PathBuf, file: File, revision: u64) -> Result<(), StoreError> {
        let len = file.metadata().map_err(io_err(&path))?.len();
        self.journal = file;
        self.journal_path = path;
        self.synced_len = len;
        self.written_len = len;
        self.last = revision;
        Ok(())
    }

    /// After a failed write, makes the folder hold exactly the revisions through `acknowledged`
    /// (the last one made durable) and continues in a fresh journal after it, once the folder
    /// takes writes again; an error means it does not yet, and changes nothing acknowledged.
    ///
    /// Returns the folder's state when it turns out newer than `acknowledged`: a full replace
    /// whose snapshot was renamed into place before a later step failed. A restart would load
    /// that snapshot, so the writer must continue from it, never reuse its revision.
    pub(crate) fn reopen(&mut self, acknowledged: u64) -> Result<Option<Snapshot>, StoreError> {
        // What the failed write left in memory or in the file — part of a record, records never
        // acknowledged — goes, so nothing is ever appended after it.
        self.pending.clear();
        let path = &self.journal_path;
        let len = self.journal.metadata().map_err(io_err(path))?.len();
        if len < self.synced_len {
            return Err(corrupt(
                path,
                format!("{len} bytes, shorter than the {} synced", self.synced_len),
            ));
        }
        self.journal
            .set_len(self.synced_len)
            .map_err(io_err(path))?;
        self.journal.sync_all().map_err(io_err(path))?;
        self.written_len = self.synced_len;

        let snapshot_path = self.dir.join(SNAPSHOT);
        let newer = if read_snapshot_revision(&snapshot_path)? > acknowledged {
            recover(&self.dir, false)?.recovered.snapshot
        } else {
            None
        };
        let revision = newer.as_ref().map_or(acknowledged, Snapshot::revision);
        // A journal started after `revision` (by a full replace that then failed) holds nothing.
        for (base, path) in list_journals(&self.dir)? {
            if base > revision {
                if fs::metadata(&path).map_err(io_err(&path))?.len() > 0 {
                    return Err(corrupt(
                        &path,
                        format!("records after revision {revision}, which was the last stored"),
                    ));
                }
                fs::remove_file(&path).map_err(io_err(&path))?;
            }
        }
        probe(&self.dir)?;
        let (path, file) = create_journal(&self.dir, revision)?;
        self.use_journal(path, file, revision)?;
        Ok(newer)
    }

    /// Deletes every journal, the current one too, and continues in a new, empty journal after
    /// `revision`: the registry is being replaced by one from another history (a fleet's), whose
    /// revisions the old records do not share. The caller writes the snapshot of `revision` next;
    /// until then a crash recovers the old snapshot alone.
    pub(crate) fn reset(&mut self, revision: u64) -> Result<(), StoreError> {
        self.pending.clear();
        for (_, path) in list_journals(&self.dir)? {
            fs::remove_file(&path).map_err(io_err(&path))?;
        }
        let (path, file) = create_journal(&self.dir, revision)?;
        self.use_journal(path, file, revision)?;
        sync_dir(&self.dir)
    }

    /// Deletes the journals whose records all lie at or below `revision`, now that a snapshot of
    /// it is durable. The current journal always stays.
    pub(crate) fn remove_journals_through(&mut self, revision: u64) -> Result<(), StoreError> {
        let journals = list_journals(&self.dir)?;
        let mut removed = false;
        for pair in journals.windows(2) {
            let ((_, path), (next_base, _)) = (&pair[0], &pair[1]);
            // A journal holds the records after its base up to the next journal's base.
            if *next_base <= revision && *path != self.journal_path {
                fs::remove_file(path).map_err(io_err(path))?;
                removed = true;
            }
        }
        if removed {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }
}

/// Reads the state of `dir` without changing anything (for `icp-gate explain` and `check` while
/// the proxy may be running). A torn tail is ignored, as start-up would drop it.
pub fn read_state(dir: &Path) -> Result<Option<Snapshot>, StoreError> {
    if !dir.exists() {
        return Ok(None);
    }
    Ok(recover(dir, false)?.recovered.snapshot)
}

/// Writes `snapshot` as `dir/snapshot.bin`, durably and atomically.
pub fn write_snapshot(dir: &Path, snapshot: &Snapshot) -> Result<(), StoreError> {
    let tmp = dir.join(SNAPSHOT_TMP);
    let written = write_snapshot_tmp(&tmp, snapshot);
    if written.is_err() {
        // A part-written file would hold on to the space a full disk needs back.
        let _ = fs::remove_file(&tmp);
    }
    written?;
    let path = dir.join(SNAPSHOT);
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    sync_dir(dir)
}

fn write_snapshot_tmp(tmp: &Path, snapshot: &Snapshot) -> Result<(), StoreError> {
    let file = File::create(tmp).map_err(io_err(tmp))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut write = || -> io::Result<()> {
        encode_snapshot(&mut out, snapshot)?;
        out.flush()?;
        out.get_ref().sync_all()
    };
    write().map_err(io_err(tmp))
}

/// Writes `snapshot` in the `snapshot.bin` format to `out` (a file, or an object in the fleet's
/// bucket).
pub(crate) fn encode_snapshot(out: impl Write, snapshot: &Snapshot) -> io::Result<()> {
    let mut out = CrcWriter {
        inner: out,
        crc: crc32fast::Hasher::new(),
    };
    out.write_all(MAGIC)?;
    out.write_all(&snapshot.revision().to_le_bytes())?;
    out.write_all(&(snapshot.len() as u64).to_le_bytes())?;
    let mut buf = Vec::with_capacity(600);
    for e in snapshot.iter() {
        buf.clear();
        put_str(&mut buf, e.domain);
        put_str(&mut buf, e.icp);
        buf.push(flags(e.status, e.access_here));
        out.write_all(&buf)?;
    }
    let crc = out.crc.clone().finalize();
    out.inner.write_all(&crc.to_le_bytes())
}

/// Reads a registry in the `snapshot.bin` format from memory; `name` (a file or an object)
/// names it in errors.
pub(crate) fn decode_snapshot(bytes: &[u8], name: &Path) -> Result<Snapshot, StoreError> {
    read_snapshot_from(bytes, bytes.len() as u64, name)
}

/// The revision `snapshot.bin` holds, from its header alone.
fn read_snapshot_revision(path: &Path) -> Result<u64, StoreError> {
    let mut header = [0u8; 16];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut header))
        .map_err(io_err(path))?;
    if &header[..8] != MAGIC {
        return Err(corrupt(
            path,
            "not an icp-gate snapshot (bad magic at byte 0)",
        ));
    }
    let mut revision = [0u8; 8];
    revision.copy_from_slice(&header[8..]);
    Ok(u64::from_le_bytes(revision))
}

/// Which fleet history the revisions in `dir` belong to (`fleet.json`, written by a fleet node
/// once its registry is the fleet's); `None` when the file is absent.
pub(crate) fn read_fleet_marker(dir: &Path) -> Result<Option<String>, StoreError> {
    let path = dir.join(FLEET_MARKER);
    match fs::read_to_string(&path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::Io { path, source: e }),
    }
}

/// Writes `fleet.json` durably and atomically (temp file, fsync, rename, fsync of the folder).
pub(crate) fn write_fleet_marker(dir: &Path, text: &str) -> Result<(), StoreError> {
    let tmp = dir.join(FLEET_MARKER_TMP);
    let write = || -> io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()
    };
    write().map_err(io_err(&tmp))?;
    let path = dir.join(FLEET_MARKER);
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    sync_dir(dir)
}

/// Whether `dir` takes writes: a small file written, synced and removed.
fn probe(dir: &Path) -> Result<(), StoreError> {
    let path = dir.join(PROBE);
    let written = File::create(&path)
        .and_then(|mut f| f.write_all(&[0; PROBE_BYTES]).and_then(|()| f.sync_data()));
    let _ = fs::remove_file(&path);
    written.map_err(io_err(&path))
}

struct State {
    recovered: Recovered,
    /// Revision of `snapshot.bin` (0 without one).
    snapshot_revision: u64,
    /// Revision after recovery.
    revision: u64,
    journals: Vec<(u64, PathBuf)>,
}

/// Loads the snapshot and replays the journals. With `repair`, a torn tail is cut off the file.
fn recover(dir: &Path, repair: bool) -> Result<State, StoreError> {
    let snapshot_path = dir.join(SNAPSHOT);
    let base = if snapshot_path.exists() {
        Some(read_snapshot(&snapshot_path)?)
    } else {
        None
    };
    let journals = list_journals(dir)?;
    let snapshot_revision = base.as_ref().map(Snapshot::revision);
    let mut revision = snapshot_revision.unwrap_or(0);
    let mut pending: Vec<Op> = Vec::new();
    let mut current = base;
    let mut replayed = 0;
    let mut torn = false;
    let last_index = journals.len().saturating_sub(1);
    for (i, (_, path)) in journals.iter().enumerate() {
        let records = read_journal(path, i == last_index, repair)?;
        for (at, rev, ops) in records.records {
            match snapshot_revision {
                // The seed snapshot is written before any record: records alone are damage.
                None => {
                    return Err(corrupt(
                        path,
                        format!("journal records without a snapshot (the record at byte {at})"),
                    ));
                }
                Some(s) if rev <= s => continue,
                Some(_) => {}
            }
            if rev != revision + 1 {
                return Err(corrupt(
                    path,
                    format!("revision {rev} follows {revision} (the record at byte {at})"),
                ));
            }
            revision = rev;
            replayed += 1;
            pending.extend(ops);
            if pending.len() >= REPLAY_CHUNK {
                current = current.map(|s| s.apply(&std::mem::take(&mut pending), revision));
            }
        }
        if let Some(tail) = records.torn {
            torn = true;
            // Never fewer records without a word: the operator sees what was dropped.
            warn!(
                file = %path.display(),
                offset = tail.at,
                bytes = tail.bytes,
                revision = revision + 1,
                cut = repair,
                "journal ends in a torn record (a crash mid-write, never acknowledged); dropped"
            );
        }
    }
    if let Some(s) = &current {
        if !pending.is_empty() || s.revision() != revision {
            current = Some(s.apply(&pending, revision));
        }
    }
    Ok(State {
        recovered: Recovered {
            snapshot: current,
            records_replayed: replayed,
            torn_tail_dropped: torn,
        },
        snapshot_revision: snapshot_revision.unwrap_or(0),
        revision,
        journals,
    })
}

fn read_snapshot(path: &Path) -> Result<Snapshot, StoreError> {
    let file = File::open(path).map_err(io_err(path))?;
    let file_len = file.metadata().map_err(io_err(path))?.len();
    read_snapshot_from(BufReader::with_capacity(1 << 20, file), file_len, path)
}

fn read_snapshot_from(
    input: impl Read,
    file_len: u64,
    path: &Path,
) -> Result<Snapshot, StoreError> {
    let mut r = CrcReader {
        inner: input,
        crc: crc32fast::Hasher::new(),
        at: 0,
    };
    let truncated = |e: io::Error| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            corrupt(path, format!("truncated: ends at byte {file_len}"))
        } else {
            StoreError::Io {
                path: path.to_path_buf(),
                source: e,
            }
        }
    };
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic).map_err(truncated)?;
    if &magic != MAGIC {
        return Err(corrupt(
            path,
            "not an icp-gate snapshot (bad magic at byte 0)",
        ));
    }
    let revision = r.u64().map_err(truncated)?;
    let count = r.u64().map_err(truncated)?;
    // Each entry takes at least 5 bytes: a bad count cannot make us loop for long.
    if count > file_len / 5 {
        return Err(corrupt(
            path,
            format!("entry count {count} at byte 16 does not fit the file"),
        ));
    }
    // Every entry carries 3 bytes of framing besides its name and number.
    let payload = (file_len as usize).saturating_sub(count as usize * 3);
    let mut builder = SnapshotBuilder::with_capacity(count as usize, payload);
    let (mut domain, mut icp) = (Vec::with_capacity(256), Vec::with_capacity(256));
    for i in 0..count {
        let at = r.at;
        r.string(&mut domain).map_err(truncated)?;
        r.string(&mut icp).map_err(truncated)?;
        let flags = r.u8().map_err(truncated)?;
        let bad = |why: &str| corrupt(path, format!("entry {i} at byte {at}: {why}"));
        let (Ok(domain), Ok(icp)) = (std::str::from_utf8(&domain), std::str::from_utf8(&icp))
        else {
            return Err(bad("not UTF-8"));
        };
        let (status, access_here) = unflags(flags).ok_or_else(|| bad("bad flags"))?;
        builder
            .push(EntryRef {
                domain,
                icp,
                status,
                access_here,
            })
            .map_err(|e| bad(&e.to_string()))?;
    }
    let computed = r.crc.clone().finalize();
    let mut stored = [0u8; 4];
    r.inner.read_exact(&mut stored).map_err(truncated)?;
    if u32::from_le_bytes(stored) != computed {
        return Err(corrupt(
            path,
            format!("checksum mismatch (the checksum at byte {})", r.at),
        ));
    }
    if r.inner.read(&mut [0u8; 1]).map_err(io_err(path))? != 0 {
        return Err(corrupt(
            path,
            format!("data after the checksum at byte {}", r.at + 4),
        ));
    }
    Ok(builder.finish(revision))
}

struct JournalRecords {
    /// Byte offset, revision and operations of each record.
    records: Vec<(usize, u64, Vec<Op>)>,
    torn: Option<TornTail>,
}

/// The torn record a crash left at the end of the last journal.
struct TornTail {
    at: usize,
    bytes: usize,
}

/// The record at the start of some bytes, as far as its frame tells.
enum Frame<'a> {
    /// Complete, and its checksum matches.
    Whole { payload: &'a [u8], len: usize },
    /// Complete, and its checksum does not match.
    BadChecksum { len: usize },
    /// The header, or the length it states, runs past the bytes (or over [`MAX_RECORD`]).
    Incomplete(String),
}

fn frame(bytes: &[u8]) -> Frame<'_> {
    let Some(header) = bytes.get(..8) else {
        return Frame::Incomplete(format!("only {} bytes of a record header", bytes.len()));
    };
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    let payload = (len <= MAX_RECORD)
        .then(|| bytes.get(8..8 + len as usize))
        .flatten();
    match payload {
        None => Frame::Incomplete(format!(
            "record length {len} runs past the end of the file ({} bytes left)",
            bytes.len() - 8
        )),
        Some(payload) if crc32fast::hash(payload) != crc => Frame::BadChecksum {
            len: 8 + len as usize,
        },
        Some(payload) => Frame::Whole {
            payload,
            len: 8 + len as usize,
        },
    }
}

/// Where a complete, checksummed, decodable record starts after `from`, if anywhere.
fn valid_record_after(bytes: &[u8], from: usize) -> Option<usize> {
    (from + 1..bytes.len()).find(|&at| {
        matches!(frame(&bytes[at..]), Frame::Whole { payload, .. } if decode_record(payload).is_some())
    })
}

/// Reads every record of one journal.
///
/// A torn append leaves a prefix of one record at the very end of the last journal: a record
/// that is incomplete, or complete with a bad checksum, and ends the file. Only then is it torn —
/// dropped (and, with `repair`, cut off). A flipped bit in a length field looks the same (the
/// record seems to run past the end of the file), but acknowledged records follow it: so if a
/// valid record starts anywhere after the bad one, it is damage, and recovery refuses rather than
/// cut them off. Damage anywhere else refuses too, naming the byte.
fn read_journal(path: &Path, last: bool, repair: bool) -> Result<JournalRecords, StoreError> {
    let bytes = fs::read(path).map_err(io_err(path))?;
    let mut records = Vec::new();
    let mut at = 0usize;
    let mut torn = None;
    while at < bytes.len() {
        let why = match frame(&bytes[at..]) {
            Frame::Whole { payload, len } => {
                let (revision, ops) = decode_record(payload)
                    .ok_or_else(|| corrupt(path, format!("undecodable record at byte {at}")))?;
                records.push((at, revision, ops));
                at += len;
                continue;
            }
            Frame::BadChecksum { len } if at + len < bytes.len() => {
                return Err(corrupt(
                    path,
                    format!("checksum mismatch in the record at byte {at}"),
                ));
            }
            Frame::BadChecksum { .. } => "checksum mismatch".to_string(),
            Frame::Incomplete(why) => why,
        };
        if !last {
            return Err(corrupt(
                path,
                format!("damaged record at byte {at}: {why}, in a journal that is not the last"),
            ));
        }
        if let Some(next) = valid_record_after(&bytes, at) {
            return Err(corrupt(
                path,
                format!(
                    "damaged record at byte {at}: {why}, yet a valid record follows at byte {next}"
                ),
            ));
        }
        torn = Some(TornTail {
            at,
            bytes: bytes.len() - at,
        });
        break;
    }
    if let (Some(tail), true) = (&torn, repair) {
        let file = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io_err(path))?;
        file.set_len(tail.at as u64).map_err(io_err(path))?;
        file.sync_all().map_err(io_err(path))?;
    }
    Ok(JournalRecords { records, torn })
}

fn list_journals(dir: &Path) -> Result<Vec<(u64, PathBuf)>, StoreError> {
    let mut journals = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if let Some(base) = name
            .strip_prefix("journal-")
            .and_then(|n| n.strip_suffix(".log"))
        {
            let base = base
                .parse::<u64>()
                .map_err(|_| corrupt(&path, "journal name without a revision"))?;
            journals.push((base, path));
        }
    }
    journals.sort();
    Ok(journals)
}

fn create_journal(dir: &Path, base: u64) -> Result<(PathBuf, File), StoreError> {
    let path = dir.join(format!("journal-{base:020}.log"));
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(io_err(&path))?;
    sync_dir(dir)?;
    Ok((path, file))
}

/// Makes a created, renamed or removed file name durable.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

fn flags(status: Status, access_here: bool) -> u8 {
    u8::from(status == Status::Revoked) | (u8::from(access_here) << 1)
}

fn unflags(flags: u8) -> Option<(Status, bool)> {
    if flags > 3 {
        return None;
    }
    let status = if flags & 1 == 1 {
        Status::Revoked
    } else {
        Status::Filed
    };
    Some((status, flags & 2 == 2))
}

/// Strings are at most 255 bytes: entries were validated (253-byte names, 255-byte numbers).
fn put_str(buf: &mut Vec<u8>, s: &str) {
    let len = s.len().min(255);
    buf.push(len as u8);
    buf.extend_from_slice(&s.as_bytes()[..len]);
}

/// Bytes `ops` take as the payload of one journal record (what [`MAX_RECORD`] bounds), without
/// encoding them.
pub(crate) fn record_len(ops: &[Op]) -> usize {
    let str_len = |s: &str| 1 + s.len().min(255);
    12 + ops
        .iter()
        .map(|op| match op {
            Op::Put(e) => 1 + str_len(&e.domain) + str_len(&e.icp) + 1,
            Op::Delete(domain) => 1 + str_len(domain),
        })
        .sum::<usize>()
}

fn encode_record(buf: &mut Vec<u8>, revision: u64, ops: &[Op]) {
    buf.extend_from_slice(&revision.to_le_bytes());
    buf.extend_from_slice(&(ops.len() as u32).to_le_bytes());
    for op in ops {
        match op {
            Op::Put(e) => {
                buf.push(0);
                put_str(buf, &e.domain);
                put_str(buf, &e.icp);
                buf.push(flags(e.status, e.access_here));
            }
            Op::Delete(domain) => {
                buf.push(1);
                put_str(buf, domain);
            }
        }
    }
}

fn decode_record(payload: &[u8]) -> Option<(u64, Vec<Op>)> {
    let mut r = Cursor(payload);
    let revision = u64::from_le_bytes(r.take(8)?.try_into().ok()?);
    let count = u32::from_le_bytes(r.take(4)?.try_into().ok()?);
    let mut ops = Vec::with_capacity((count as usize).min(payload.len() / 2));
    for _ in 0..count {
        let kind = r.take(1)?[0];
        let domain = r.string()?;
        ops.push(match kind {
            0 => {
                let icp = r.string()?;
                let (status, access_here) = unflags(r.take(1)?[0])?;
                Op::Put(Entry {
                    domain,
                    icp,
                    status,
                    access_here,
                })
            }
            1 => Op::Delete(domain),
            _ => return None,
        });
    }
    r.0.is_empty().then_some((revision, ops))
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    fn string(&mut self) -> Option<String> {
        let len = self.take(1)?[0] as usize;
        String::from_utf8(self.take(len)?.to_vec()).ok()
    }
}

/// A writer that checksums what passes through it.
struct CrcWriter<W> {
    inner: W,
    crc: crc32fast::Hasher,
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that checksums what passes through it.
struct CrcReader<R> {
    inner: R,
    crc: crc32fast::Hasher,
    /// Bytes read so far (for errors that name where the damage is).
    at: u64,
}

impl<R: Read> CrcReader<R> {
    fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_exact(buf)?;
        self.crc.update(buf);
        self.at += buf.len() as u64;
        Ok(())
    }

    fn u8(&mut self) -> io::Result<u8> {
        let mut b = [0u8; 1];
        self.read_exact(&mut b)?;
        Ok(b[0])
    }

    fn u64(&mut self) -> io::Result<u64> {
        let mut b = [0u8; 8];
        self.read_exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn string(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        let len = self.u8()? as usize;
        out.resize(len, 0);
        self.read_exact(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(domain: &str, status: Status) -> Entry {
        Entry {
            domain: domain.into(),
            icp: format!("京ICP备{}号-1", domain.len()),
            status,
            access_here: domain.len() % 2 == 0,
        }
    }

    fn model(s: &Snapshot) -> Vec<Entry> {
        let mut v: Vec<Entry> = s.iter().map(|e| e.to_entry()).collect();
        v.sort_by(|a, b| a.domain.cmp(&b.domain));
        v
    }

    fn seeded(dir: &Path, n: usize) -> (Store, Snapshot) {
        let (store, rec) = Store::open(dir).unwrap();
        assert!(rec.snapshot.is_none());
        let entries: Vec<Entry> = (0..n)
            .map(|i| entry(&format!("s{i}.cn"), Status::Filed))
            .collect();
        let snap = Snapshot::from_entries(&entries, 0).unwrap();
        write_snapshot(dir, &snap).unwrap();
        (store, snap)
    }

    /// Applies `ops` to the store and the in-memory snapshot, as the writer does.
    fn write(store: &mut Store, snap: Snapshot, ops: Vec<Op>) -> Snapshot {
        let rev = snap.revision() + 1;
        store.append(rev, &ops).unwrap();
        store.sync().unwrap();
        snap.apply(&ops, rev)
    }

    fn reopen(dir: &Path) -> Recovered {
        Store::open(dir).unwrap().1
    }

    #[test]
    fn empty_folder_has_no_state() {
        let dir = tempfile::tempdir().unwrap();
        let rec = reopen(&dir.path().join("new"));
        assert!(rec.snapshot.is_none());
        assert!(read_state(&dir.path().join("missing")).unwrap().is_none());
    }

    #[test]
    fn snapshot_round_trip_including_unicode_and_empty() {
        let dir = tempfile::tempdir().unwrap();
        let entries = vec![
            entry("xn--fsqu00a.xn--fiqs8s", Status::Filed),
            entry("gone.cn", Status::Revoked),
        ];
        let snap = Snapshot::from_entries(&entries, 41).unwrap();
        write_snapshot(dir.path(), &snap).unwrap();
        let back = read_snapshot(&dir.path().join(SNAPSHOT)).unwrap();
        assert_eq!(back.revision(), 41);
        assert_eq!(model(&back), model(&snap));

        write_snapshot(dir.path(), &Snapshot::empty()).unwrap();
        let back = read_snapshot(&dir.path().join(SNAPSHOT)).unwrap();
        assert_eq!((back.len(), back.revision()), (0, 0));
    }

    #[test]
    fn journal_replay_puts_deletes_and_skips_what_the_snapshot_holds() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, mut snap) = seeded(dir.path(), 10);
        snap = write(
            &mut store,
            snap,
            vec![
                Op::Put(entry("a.cn", Status::Filed)),
                Op::Delete("s1.cn".into()),
            ],
        );
        snap = write(
            &mut store,
            snap,
            vec![Op::Put(entry("a.cn", Status::Revoked))],
        );
        drop(store);
        let rec = reopen(dir.path());
        let back = rec.snapshot.unwrap();
        assert_eq!((back.revision(), rec.records_replayed), (2, 2));
        assert_eq!(model(&back), model(&snap));

        // A compaction at revision 2, then more writes in the rotated journal.
        let (mut store, _) = Store::open(dir.path()).unwrap();
        store.rotate(2).unwrap();
        write_snapshot(dir.path(), &snap).unwrap();
        store.remove_journals_through(2).unwrap();
        snap = write(&mut store, snap, vec![Op::Delete("a.cn".into())]);
        drop(store);
        let rec = reopen(dir.path());
        assert_eq!(rec.records_replayed, 1);
        assert_eq!(model(&rec.snapshot.unwrap()), model(&snap));
        assert_eq!(list_journals(dir.path()).unwrap().len(), 1);
    }

    #[test]
    fn every_compaction_crash_point_recovers_the_same_state() {
        for crash_after in ["rotate", "tmp_written", "renamed", "journals_removed"] {
            let dir = tempfile::tempdir().unwrap();
            let (mut store, mut snap) = seeded(dir.path(), 5);
            for i in 0..3 {
                snap = write(
                    &mut store,
                    snap,
                    vec![Op::Put(entry(&format!("w{i}.cn"), Status::Filed))],
                );
            }
            let at_three = snap.apply(&[], 3);
            store.rotate(3).unwrap();
            snap = write(&mut store, snap, vec![Op::Delete("s0.cn".into())]);
            if crash_after == "tmp_written" {
                // The snapshot was being written when the process died.
                fs::write(dir.path().join(SNAPSHOT_TMP), b"ICPGSNP1 partial").unwrap();
            }
            if crash_after == "renamed" || crash_after == "journals_removed" {
                write_snapshot(dir.path(), &at_three).unwrap();
            }
            if crash_after == "journals_removed" {
                store.remove_journals_through(3).unwrap();
            }
            drop(store);
            let rec = reopen(dir.path());
            assert_eq!(model(&rec.snapshot.unwrap()), model(&snap), "{crash_after}");
            assert!(!dir.path().join(SNAPSHOT_TMP).exists());
        }
    }

    #[test]
    fn a_torn_tail_is_dropped_at_every_cut_point() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, mut snap) = seeded(dir.path(), 3);
        snap = write(
            &mut store,
            snap,
            vec![Op::Put(entry("kept.cn", Status::Filed))],
        );
        let journal = store.journal_path.clone();
        let good_len = fs::metadata(&journal).unwrap().len() as usize;
        let before = model(&snap);
        let _ = write(
            &mut store,
            snap.apply(&[], 1),
            vec![Op::Put(entry("torn.cn", Status::Filed))],
        );
        drop(store);
        let full = fs::read(&journal).unwrap();
        for cut in good_len..full.len() {
            fs::write(&journal, &full[..cut]).unwrap();
            let (mut store, rec) = Store::open(dir.path()).unwrap();
            assert_eq!(rec.torn_tail_dropped, cut > good_len, "cut at {cut}");
            let back = rec.snapshot.unwrap();
            assert_eq!(model(&back), before, "cut at {cut}");
            assert_eq!(fs::metadata(&journal).unwrap().len() as usize, good_len);
            // Appending after recovery works.
            let next = write(
                &mut store,
                back,
                vec![Op::Put(entry("after.cn", Status::Filed))],
            );
            drop(store);
            assert_eq!(model(&reopen(dir.path()).snapshot.unwrap()), model(&next));
            fs::write(&journal, &full[..good_len]).unwrap();
        }
    }

    #[test]
    fn a_checksum_flip_in_the_last_record_is_torn_but_in_a_middle_one_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, mut snap) = seeded(dir.path(), 3);
        snap = write(
            &mut store,
            snap,
            vec![Op::Put(entry("one.cn", Status::Filed))],
        );
        let after_first = fs::metadata(&store.journal_path).unwrap().len() as usize;
        snap = write(
            &mut store,
            snap,
            vec![Op::Put(entry("two.cn", Status::Filed))],
        );
        let journal = store.journal_path.clone();
        drop(store);
        let _ = snap;
        let full = fs::read(&journal).unwrap();

        let mut last_flipped = full.clone();
        *last_flipped.last_mut().unwrap() ^= 1;
        fs::write(&journal, &last_flipped).unwrap();
        let rec = reopen(dir.path());
        assert!(rec.torn_tail_dropped);
        assert_eq!(rec.snapshot.unwrap().revision(), 1);

        let mut middle_flipped = full.clone();
        middle_flipped[after_first - 1] ^= 1;
        fs::write(&journal, &middle_flipped).unwrap();
        let err = Store::open(dir.path())
            .err()
            .expect("corruption must refuse to start");
        assert!(
            err.to_string().contains("journal-") && err.to_string().contains("checksum"),
            "{err}"
        );
        assert!(read_state(dir.path()).is_err());
    }

    /// What `open` logs at WARN and above, as text.
    fn open_logging(dir: &Path) -> (Result<(Store, Recovered), StoreError>, String) {
        let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .with_writer(move || LogCapture(sink.clone()))
            .finish();
        let result = tracing::subscriber::with_default(subscriber, || Store::open(dir));
        let text = String::from_utf8_lossy(&out.lock().unwrap()).into_owned();
        (result, text)
    }

    struct LogCapture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl Write for LogCapture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Bit rot or a stray write anywhere in a small journal or snapshot: start-up refuses with
    /// an error naming the file and the byte, or — only for damage inside the very last record of
    /// the last journal, which is what a torn append looks like — drops that one record with a
    /// warning. It never comes up with fewer acknowledged records silently.
    #[test]
    fn a_flipped_byte_anywhere_refuses_or_drops_only_the_last_record() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, mut snap) = seeded(dir.path(), 3);
        let journal = store.journal_path.clone();
        let mut starts = Vec::new();
        let mut states = vec![model(&snap)];
        for i in 0..4 {
            starts.push(fs::metadata(&journal).unwrap().len() as usize);
            let mut ops = vec![Op::Put(entry(&format!("w{i}.cn"), Status::Filed))];
            if i % 2 == 1 {
                ops.push(Op::Delete(format!("s{i}.cn")));
            }
            snap = write(&mut store, snap, ops);
            states.push(model(&snap));
        }
        drop(store);
        let name = journal.file_name().unwrap().to_string_lossy().into_owned();
        let full = fs::read(&journal).unwrap();
        let last_start = starts[3];
        let (mut refused, mut dropped) = (0, 0);
        for at in 0..full.len() {
            for mask in [0x01u8, 0x80, 0xff] {
                let mut damaged = full.clone();
                damaged[at] ^= mask;
                fs::write(&journal, &damaged).unwrap();
                let (result, logged) = open_logging(dir.path());
                let case = format!("byte {at} ^ {mask:#04x}");
                match result {
                    Err(e) => {
                        let msg = e.to_string();
                        assert!(
                            msg.contains(&name) && msg.contains("byte "),
                            "{case}: the error must name the file and the offset: {msg}"
                        );
                        assert_eq!(fs::read(&journal).unwrap(), damaged, "{case}: file changed");
                        refused += 1;
                    }
                    Ok((_, rec)) => {
                        assert!(
                            at >= last_start,
                            "{case}: damage before the last record came up without refusing"
                        );
                        assert!(rec.torn_tail_dropped, "{case}");
                        assert_eq!(rec.records_replayed, 3, "{case}");
                        assert_eq!(model(&rec.snapshot.unwrap()), states[3], "{case}");
                        assert!(
                            logged.contains("WARN")
                                && logged.contains(&name)
                                && logged.contains(&format!("offset={last_start}")),
                            "{case}: the dropped record must be logged: {logged:?}"
                        );
                        assert_eq!(fs::read(&journal).unwrap(), full[..last_start], "{case}");
                        dropped += 1;
                    }
                }
            }
        }
        // Both outcomes happened: this walked through the last record and the ones before it.
        assert!(
            refused > 0 && dropped > 0,
            "{refused} refused, {dropped} dropped"
        );
        fs::write(&journal, &full).unwrap();
        assert_eq!(model(&reopen(dir.path()).snapshot.unwrap()), states[4]);

        let path = dir.path().join(SNAPSHOT);
        let good = fs::read(&path).unwrap();
        for at in 0..good.len() {
            for mask in [0x01u8, 0x80, 0xff] {
                let mut damaged = good.clone();
                damaged[at] ^= mask;
                fs::write(&path, &damaged).unwrap();
                let msg = match Store::open(dir.path()) {
                    Ok(_) => panic!("snapshot byte {at} ^ {mask:#04x}: came up"),
                    Err(e) => e.to_string(),
                };
                assert!(
                    msg.contains("snapshot.bin") && msg.contains("byte "),
                    "snapshot byte {at} ^ {mask:#04x}: {msg}"
                );
            }
        }
    }

    #[test]
    fn reopen_cuts_what_a_failed_write_left_and_continues_in_a_fresh_journal() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, mut snap) = seeded(dir.path(), 3);
        for i in 0..2 {
            snap = write(
                &mut store,
                snap,
                vec![Op::Put(entry(&format!("ok{i}.cn"), Status::Filed))],
            );
        }
        let old = store.journal_path.clone();
        let synced = fs::metadata(&old).unwrap().len();
        // A write that failed: one whole record and part of another reached the file, and one
        // more waits in memory; none of them acknowledged.
        store
            .append(3, &[Op::Put(entry("lost.cn", Status::Filed))])
            .unwrap();
        store.flush().unwrap();
        OpenOptions::new()
            .append(true)
            .open(&old)
            .unwrap()
            .write_all(&[40, 0, 0, 0, 1, 2])
            .unwrap();
        store
            .append(4, &[Op::Put(entry("lost2.cn", Status::Filed))])
            .unwrap();

        assert!(store.reopen(2).unwrap().is_none());
        assert_eq!(fs::metadata(&old).unwrap().len(), synced, "cut back");
        assert_ne!(store.journal_path, old, "a fresh journal");
        snap = write(
            &mut store,
            snap,
            vec![Op::Put(entry("after.cn", Status::Filed))],
        );
        drop(store);
        let rec = reopen(dir.path());
        assert!(!rec.torn_tail_dropped);
        assert_eq!(model(&rec.snapshot.unwrap()), model(&snap));
        assert!(!dir.path().join(PROBE).exists());
    }

    #[test]
    fn reopen_after_a_failed_full_replace_follows_what_the_folder_holds() {
        // The replace's snapshot never got into place: its empty journal goes.
        let dir = tempfile::tempdir().unwrap();
        let (mut store, mut snap) = seeded(dir.path(), 3);
        snap = write(&mut store, snap, vec![Op::Delete("s0.cn".into())]);
        store.rotate(2).unwrap();
        assert!(store.reopen(1).unwrap().is_none());
        assert_eq!(list_journals(dir.path()).unwrap().len(), 2);
        assert!(!dir.path().join("journal-00000000000000000002.log").exists());
        snap = write(&mut store, snap, vec![Op::Delete("s1.cn".into())]);
        drop(store);
        assert_eq!(model(&reopen(dir.path()).snapshot.unwrap()), model(&snap));

        // It did (renamed, then a later step failed): the writer must continue from it, or its
        // next write would reuse revision 2 and vanish behind the snapshot after a restart.
        let dir = tempfile::tempdir().unwrap();
        let (mut store, snap) = seeded(dir.path(), 3);
        let snap = write(&mut store, snap, vec![Op::Delete("s0.cn".into())]);
        store.rotate(2).unwrap();
        let replaced = Snapshot::from_entries(&[entry("only.cn", Status::Filed)], 2).unwrap();
        write_snapshot(dir.path(), &replaced).unwrap();
        let newer = store
            .reopen(1)
            .unwrap()
            .expect("the folder is at revision 2");
        assert_eq!(newer.revision(), 2);
        assert_eq!(model(&newer), model(&replaced));
        let after = write(
            &mut store,
            newer,
            vec![Op::Put(entry("after.cn", Status::Filed))],
        );
        drop((store, snap));
        assert_eq!(model(&reopen(dir.path()).snapshot.unwrap()), model(&after));
    }

    #[test]
    fn a_corrupt_snapshot_is_an_error_never_an_empty_registry() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = seeded(dir.path(), 100);
        drop(store);
        let path = dir.path().join(SNAPSHOT);
        let good = fs::read(&path).unwrap();
        let mut flipped = good.clone();
        flipped[good.len() / 2] ^= 0x20;
        let cases: [(&str, Vec<u8>); 4] = [
            ("corrupt", flipped),
            ("truncated", good[..good.len() - 9].to_vec()),
            ("bad magic", [b"XXXXXXXX", &good[8..]].concat()),
            ("truncated", Vec::new()),
        ];
        for (want, bytes) in cases {
            fs::write(&path, &bytes).unwrap();
            let err = Store::open(dir.path()).err().expect("must refuse");
            let msg = err.to_string();
            assert!(
                msg.contains("snapshot.bin") && msg.contains(want),
                "{want}: {msg}"
            );
        }
    }

    #[test]
    fn gaps_and_records_without_a_snapshot_are_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, snap) = seeded(dir.path(), 1);
        let _ = write(&mut store, snap, vec![Op::Delete("s0.cn".into())]);
        let journal = store.journal_path.clone();
        drop(store);
        // Rewrite the record as revision 5: a gap after the snapshot's revision 0.
        let mut payload = Vec::new();
        encode_record(&mut payload, 5, &[Op::Delete("s0.cn".into())]);
        let mut bytes = (payload.len() as u32).to_le_bytes().to_vec();
        bytes.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        bytes.extend_from_slice(&payload);
        fs::write(&journal, &bytes).unwrap();
        assert!(
            Store::open(dir.path())
                .err()
                .unwrap()
                .to_string()
                .contains("revision 5 follows 0")
        );

        fs::remove_file(dir.path().join(SNAPSHOT)).unwrap();
        let err = Store::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("without a snapshot"), "{err}");
    }

    #[test]
    fn decoder_rejects_garbage_without_panicking() {
        for payload in [
            &b""[..],
            b"\x01",
            &[0u8; 11][..],
            b"\x01\0\0\0\0\0\0\0\x01\0\0\0\x07\x01a",
        ] {
            assert!(decode_record(payload).is_none(), "{payload:?}");
        }
        let mut ok = Vec::new();
        encode_record(
            &mut ok,
            9,
            &[
                Op::Put(entry("a.cn", Status::Revoked)),
                Op::Delete("b.cn".into()),
            ],
        );
        let (rev, ops) = decode_record(&ok).unwrap();
        assert_eq!((rev, ops.len()), (9, 2));
        assert_eq!(record_len(&ops), ok.len());
        assert_eq!(record_len(&[]), 12);
        ok.push(0);
        assert!(decode_record(&ok).is_none(), "trailing bytes");
    }

    #[test]
    fn size_and_speed_at_one_million_entries() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = SnapshotBuilder::new();
        for i in 0..1_000_000u32 {
            let e = Entry {
                domain: format!("d{i:07}.com.cn"),
                icp: format!("京ICP备{i:08}号-1"),
                status: Status::Filed,
                access_here: true,
            };
            b.push_entry(&e).unwrap();
        }
        let snap = b.finish(7);
        let t = std::time::Instant::now();
        write_snapshot(dir.path(), &snap).unwrap();
        let written = t.elapsed();
        let bytes = fs::metadata(dir.path().join(SNAPSHOT)).unwrap().len();
        let t = std::time::Instant::now();
        let back = read_snapshot(&dir.path().join(SNAPSHOT)).unwrap();
        eprintln!(
            "1M entries: {:.1} bytes/entry on disk, write {written:?}, load {:?}",
            bytes as f64 / 1e6,
            t.elapsed()
        );
        assert_eq!(back.len(), 1_000_000);
        assert_eq!(
            back.get("d0999999.com.cn").map(|e| e.icp),
            Some("京ICP备00999999号-1")
        );
    }
}
