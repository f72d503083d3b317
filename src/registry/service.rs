//! The registry writer: the single place where updates are applied, made durable and published.
//!
//! Admin requests queue writes on a channel; one writer thread drains the queue, applies each
//! write to the next snapshot in order (checking `expect_revision`), appends them to the journal,
//! fsyncs **once for the whole group** (group commit: writers that arrived during the previous
//! fsync share the next one), publishes the new snapshot, and only then answers. So a 2xx means
//! durable *and* enforced, and a crash loses nothing that was acknowledged.
//!
//! The journal is compacted into a new snapshot file in the background when it grows; a full
//! replace writes its snapshot directly.
//!
//! When storage fails (disk full, I/O error), nothing of the failed group is acknowledged, writes
//! are refused and [`RegistryWriter::storage_failure`] says why (`/readyz` is 503). The writer
//! retries by itself — at the next write, and on a timer backing off to [`RETRY_MAX`] — by cutting
//! the journal back to what was acknowledged and starting a fresh one ([`Store::reopen`]); it
//! accepts writes again as soon as the folder takes them, without a restart.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use super::published::Registry;
use super::snapshot::{Op, Snapshot, SnapshotBuilder};
use super::store::{MAX_RECORD, Store, StoreError, record_len, write_snapshot};
use crate::config::Share;

/// Journal records after which a background compaction starts.
const COMPACT_AFTER_RECORDS: u64 = 100_000;
/// Most writes applied under one fsync.
const MAX_GROUP: usize = 4096;
/// First wait before retrying failed storage; it doubles up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Which API call a write came from (the `op` label of `icp_gate_registry_updates_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WriteKind {
    Put,
    Delete,
    Batch,
    Replace,
}

/// What a list of operations does to a snapshot: deletes that find nothing, and entries removed.
struct Effect {
    absent: usize,
    removed: usize,
}

impl Effect {
    fn of(current: &Snapshot, ops: &[Op]) -> Effect {
        // Whether each touched domain has an entry after the operations so far.
        let mut present: HashMap<&str, bool> = HashMap::new();
        let mut absent = 0;
        for op in ops {
            let domain = op.domain();
            let there = *present
                .entry(domain)
                .or_insert_with(|| current.get(domain).is_some());
            match op {
                Op::Put(_) => {
                    present.insert(domain, true);
                }
                Op::Delete(_) => {
                    absent += usize::from(!there);
                    present.insert(domain, false);
                }
            }
        }
        let removed = present
            .iter()
            .filter(|&(d, &there)| !there && current.get(d).is_some())
            .count();
        Effect { absent, removed }
    }
}

impl WriteKind {
    /// What the write is called in messages.
    pub(crate) fn noun(self) -> &'static str {
        match self {
            WriteKind::Put => "put",
            WriteKind::Delete => "delete",
            WriteKind::Batch => "batch",
            WriteKind::Replace => "full replace",
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            WriteKind::Put => "put",
            WriteKind::Delete => "delete",
            WriteKind::Batch => "batch",
            WriteKind::Replace => "replace",
        }
    }
}

/// A write that was applied, made durable and published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Applied {
    pub revision: u64,
    /// Operations applied (1 for a single put/delete).
    pub applied: usize,
    /// Entries in the registry after the write.
    pub entries: usize,
    /// Deletes that found no entry (they change nothing and are not counted in `applied`).
    pub absent: usize,
    /// Entries the write removed (for an unguarded full replace, the fall in the entry count).
    pub removed: usize,
    /// Entries in the registry before the write.
    pub before: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum WriteError {
    #[error("registry is at revision {current}, not {expected}")]
    Conflict { expected: u64, current: u64 },
    #[error("no entry for {0}")]
    NotFound(String),
    /// The request's fault, not storage's: it is refused and the writer goes on.
    #[error(
        "the batch takes {bytes} bytes in the journal, over the {limit} bytes one journal record \
         holds: split it"
    )]
    TooLarge { bytes: usize, limit: u32 },
    /// A batch or full replace would remove more of the registry than the guard allows.
    #[error(
        "the {what} would remove {removed} of the {entries} entries, more than admin.max_shrink \
         ({limit}): check its input, or send it with ?allow_shrink=true"
    )]
    Shrink {
        what: &'static str,
        removed: usize,
        entries: usize,
        limit: Share,
        current: u64,
    },
    /// The write could not be made durable; writes are refused until storage works again.
    #[error("registry storage failed: {0}")]
    Storage(String),
    /// A fleet node cannot take writes now (JetStream unreachable, or this node is not applying
    /// the stream); the registry in force is unchanged.
    #[error("{0}")]
    Unavailable(String),
    /// A fleet node whose NATS user may not publish the change (a read-only node).
    #[error("{0}")]
    Forbidden(String),
    /// A fleet change that does not follow the registry's revision: never applied out of order.
    #[error("change at sequence {got} does not follow revision {current}")]
    OutOfOrder { current: u64, got: u64 },
}

/// A change from a fleet's stream, applied at its stream sequence.
pub(crate) enum FleetChange {
    /// Operations applied in order; deleting an absent entry does nothing (the stream is
    /// applied as written, whatever this node held when it was published).
    Ops(Vec<Op>),
    /// The whole registry (a full replace, or a snapshot from the fleet's bucket).
    Replace(Snapshot),
}

/// Called after every publication, with the new snapshot and the entry domains the writes touched
/// (`None` after a full replace): revocation of live tunnels and the registry gauges hang here.
pub(crate) type OnPublish = Box<dyn Fn(&Snapshot, Option<&[&str]>) + Send>;

enum Request {
    Ops {
        ops: Vec<Op>,
        kind: WriteKind,
        guard: Guard,
        reply: oneshot::Sender<Result<Applied, WriteError>>,
    },
    Replace {
        entries: SnapshotBuilder,
        guard: Guard,
        reply: oneshot::Sender<Result<Applied, WriteError>>,
    },
    /// A change from a fleet's stream at sequence `seq`: ops must follow the current revision;
    /// a replace may jump ahead (history trimmed) and, with `adopt`, replaces a registry from
    /// another history whatever its revision.
    Fleet {
        seq: u64,
        change: FleetChange,
        adopt: bool,
        reply: oneshot::Sender<Result<Arc<Snapshot>, WriteError>>,
    },
    /// A background compaction made a snapshot at this revision durable.
    Compacted(u64),
    /// Time to try failed storage again.
    Retry,
}

/// The shrink guard for a batch of `ops` against `current`, for writes that are checked before
/// they reach this writer (a fleet node checks against its registry before publishing). Answers
/// the deletes that find no entry and the entries the write removes.
pub(crate) fn check_ops_shrink(
    current: &Snapshot,
    kind: WriteKind,
    ops: &[Op],
    guard: &Guard,
) -> Result<(usize, usize), WriteError> {
    let effect = Effect::of(current, ops);
    match guard.max_shrink {
        Some(limit) if !limit.admits(effect.removed, current.len()) => Err(WriteError::Shrink {
            what: kind.noun(),
            removed: effect.removed,
            entries: current.len(),
            limit,
            current: current.revision(),
        }),
        _ => Ok((effect.absent, effect.removed)),
    }
}

/// The shrink guard for a full replace by `next`, as [`check_ops_shrink`]. Answers the entries
/// it removes.
pub(crate) fn check_replace_shrink(
    current: &Snapshot,
    next: &Snapshot,
    guard: &Guard,
) -> Result<usize, WriteError> {
    let removed = current
        .iter()
        .filter(|e| next.get(e.domain).is_none())
        .count();
    match guard.max_shrink {
        Some(limit) if !limit.admits(removed, current.len()) => Err(WriteError::Shrink {
            what: WriteKind::Replace.noun(),
            removed,
            entries: current.len(),
            limit,
            current: current.revision(),
        }),
        _ => Ok(removed),
    }
}

/// What a write must find to be applied, checked by the writer in order with the other writes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Guard {
    /// `?expect_revision=N`: the registry must be at this revision.
    pub expect_revision: Option<u64>,
    /// The largest share of the entries a batch or full replace may remove (`None`: any).
    pub max_shrink: Option<Share>,
}

/// A handle for submitting writes; cheap to clone.
#[derive(Clone)]
pub(crate) struct RegistryWriter {
    tx: mpsc::Sender<Request>,
    failure: Arc<Mutex<Option<String>>>,
}

impl RegistryWriter {
    /// Starts the writer thread over `store`, whose recovered state `current` is already
    /// published in `registry`.
    pub(crate) fn start(
        store: Store,
        current: Arc<Snapshot>,
        registry: Arc<Registry>,
        on_publish: OnPublish,
    ) -> RegistryWriter {
        Self::spawn(store, current, registry, on_publish, COMPACT_AFTER_RECORDS).0
    }

    /// [`RegistryWriter::start`] with a compaction threshold of its own (tests); also returns the
    /// writer thread, which ends (after any compaction it started) once every handle is gone.
    fn spawn(
        store: Store,
        current: Arc<Snapshot>,
        registry: Arc<Registry>,
        on_publish: OnPublish,
        compact_after: u64,
    ) -> (RegistryWriter, thread::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(MAX_GROUP);
        let failure: Arc<Mutex<Option<String>>> = Arc::default();
        // The records a start replays count too: counting from zero at every start, a proxy
        // restarted more often than every 100 000 writes never compacted.
        let records_since_snapshot = store.recovered_records();
        let writer = Writer {
            store,
            durable: current.clone(),
            current,
            registry,
            on_publish,
            rx,
            to_self: tx.downgrade(),
            snapshot_file: Arc::default(),
            records_since_snapshot,
            compact_after,
            compaction: None,
            failed: None,
            failure: failure.clone(),
            retry_after: RETRY_FIRST,
            retry_pending: false,
        };
        let thread = thread::Builder::new()
            .name("registry-writer".into())
            .spawn(move || writer.run())
            .expect("spawning the registry writer thread");
        (RegistryWriter { tx, failure }, thread)
    }

    /// Why writes are refused, while storage is failing; `None` when they are accepted.
    pub(crate) fn storage_failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Applies `ops` all-or-nothing as one revision.
    pub(crate) async fn write(
        &self,
        kind: WriteKind,
        ops: Vec<Op>,
        guard: Guard,
    ) -> Result<Applied, WriteError> {
        let (reply, answer) = oneshot::channel();
        self.submit(
            Request::Ops {
                ops,
                kind,
                guard,
                reply,
            },
            answer,
        )
        .await
    }

    /// Replaces the whole registry with `entries` as one revision.
    pub(crate) async fn replace(
        &self,
        entries: SnapshotBuilder,
        guard: Guard,
    ) -> Result<Applied, WriteError> {
        let (reply, answer) = oneshot::channel();
        self.submit(
            Request::Replace {
                entries,
                guard,
                reply,
            },
            answer,
        )
        .await
    }

    /// Applies a change from the fleet's stream at its sequence, durably; answers the registry
    /// it produced. Requests are applied in the order they are queued, so a caller may queue
    /// many before awaiting the first answer.
    pub(crate) async fn apply_fleet(
        &self,
        seq: u64,
        change: FleetChange,
        adopt: bool,
    ) -> Result<oneshot::Receiver<Result<Arc<Snapshot>, WriteError>>, WriteError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Request::Fleet {
                seq,
                change,
                adopt,
                reply,
            })
            .await
            .map_err(|_| WriteError::Storage("registry writer stopped".into()))?;
        Ok(answer)
    }

    async fn submit(
        &self,
        request: Request,
        answer: oneshot::Receiver<Result<Applied, WriteError>>,
    ) -> Result<Applied, WriteError> {
        let gone = || WriteError::Storage("registry writer stopped".into());
        self.tx.send(request).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

struct Writer {
    store: Store,
    /// The newest snapshot: published, or about to be once its group is durable.
    current: Arc<Snapshot>,
    /// The state the store holds through its last sync: where a failed write falls back to.
    durable: Arc<Snapshot>,
    registry: Arc<Registry>,
    on_publish: OnPublish,
    rx: mpsc::Receiver<Request>,
    /// For background work (compactions, retry timers) to report back.
    to_self: mpsc::WeakSender<Request>,
    snapshot_file: Arc<SnapshotFile>,
    records_since_snapshot: u64,
    /// Journal records after which a background compaction starts.
    compact_after: u64,
    /// The latest background compaction.
    compaction: Option<thread::JoinHandle<()>>,
    /// Set after a storage failure, until [`Store::reopen`] succeeds: no writes meanwhile.
    failed: Option<String>,
    /// `failed`, for [`RegistryWriter::storage_failure`].
    failure: Arc<Mutex<Option<String>>>,
    retry_after: Duration,
    /// A retry timer is running (there is one while storage is failing).
    retry_pending: bool,
}

type Reply = (
    oneshot::Sender<Result<Applied, WriteError>>,
    Result<Applied, WriteError>,
);

type FleetReply = (
    oneshot::Sender<Result<Arc<Snapshot>, WriteError>>,
    Result<Arc<Snapshot>, WriteError>,
);

impl Writer {
    fn run(mut self) {
        // A journal already over the threshold (older versions never compacted across
        // restarts) is compacted now, not at the next write.
        self.maybe_compact();
        while let Some(first) = self.rx.blocking_recv() {
            let mut group = vec![first];
            while group.len() < MAX_GROUP {
                match self.rx.try_recv() {
                    Ok(r) => group.push(r),
                    Err(_) => break,
                }
            }
            self.apply_group(group);
        }
        if let Some(compaction) = self.compaction.take() {
            let _ = compaction.join();
        }
    }

    fn apply_group(&mut self, group: Vec<Request>) {
        // A write is the moment to see whether storage works again. Only here, between groups,
        // where what is in memory is what is durable.
        let writes = group
            .iter()
            .any(|r| matches!(r, Request::Ops { .. } | Request::Replace { .. }));
        if self.failed.is_some() && writes {
            self.retry_storage();
        }
        let published = self.current.clone();
        let mut replies: Vec<Reply> = Vec::with_capacity(group.len());
        let mut fleet_replies: Vec<FleetReply> = Vec::new();
        let mut changed: Vec<String> = Vec::new();
        let mut replaced = false;
        let mut retry = false;
        for request in group {
            match request {
                Request::Compacted(revision) => {
                    if let Err(e) = self.store.remove_journals_through(revision) {
                        warn!(error = %e, "could not remove compacted journals");
                    }
                }
                Request::Retry => {
                    self.retry_pending = false;
                    retry = true;
                }
                Request::Ops {
                    ops,
                    kind,
                    guard,
                    reply,
                } => {
                    let result = self.apply_ops(&ops, kind, guard);
                    if result.is_ok() {
                        changed.extend(ops.iter().map(|op| op.domain().to_string()));
                    }
                    replies.push((reply, result));
                }
                Request::Replace {
                    entries,
                    guard,
                    reply,
                } => {
                    let result = self.apply_replace(entries, guard);
                    replaced |= result.is_ok();
                    replies.push((reply, result));
                }
                Request::Fleet {
                    seq,
                    change,
                    adopt,
                    reply,
                } => {
                    let result = match change {
                        FleetChange::Ops(ops) => {
                            let result = self.apply_fleet_ops(seq, &ops);
                            if result.is_ok() {
                                changed.extend(ops.iter().map(|op| op.domain().to_string()));
                            }
                            result
                        }
                        FleetChange::Replace(snapshot) => {
                            let result = self.apply_fleet_replace(seq, snapshot, adopt);
                            replaced |= result.is_ok();
                            result
                        }
                    };
                    fleet_replies.push((reply, result.map(|()| self.current.clone())));
                }
            }
        }

        if self.current.revision() != self.durable.revision() && self.failed.is_none() {
            match self.store.sync() {
                Ok(()) => self.durable = self.current.clone(),
                Err(e) => self.fail(&e),
            }
        }
        if let Some(why) = &self.failed {
            // Nothing of this group past the last sync is acknowledged or published (a full
            // replace syncs what came before it in the group: that stands).
            self.current = self.durable.clone();
            for (_, result) in &mut replies {
                if matches!(result, Ok(a) if a.revision > self.durable.revision()) {
                    *result = Err(WriteError::Storage(why.clone()));
                }
            }
            for (_, result) in &mut fleet_replies {
                if matches!(result, Ok(s) if s.revision() > self.durable.revision()) {
                    *result = Err(WriteError::Storage(why.clone()));
                }
            }
        }
        if self.current.revision() != published.revision() {
            self.registry.publish_arc(self.current.clone());
            let touched: Vec<&str> = changed.iter().map(String::as_str).collect();
            (self.on_publish)(&self.current, (!replaced).then_some(&touched[..]));
            if self.failed.is_none() {
                self.maybe_compact();
            }
        }
        for (reply, result) in replies {
            // The requester may have gone away; the write stands regardless.
            let _ = reply.send(result);
        }
        for (reply, result) in fleet_replies {
            let _ = reply.send(result);
        }
        if retry && self.failed.is_some() {
            self.retry_storage();
            if let Some(why) = &self.failed {
                warn!(error = %why, retry_in = ?self.retry_after, "registry storage still failing");
                self.schedule_retry();
            }
        }
    }

    /// Tries to make storage take writes again ([`Store::reopen`]); on success writes are
    /// accepted from the next one on.
    fn retry_storage(&mut self) {
        match self.store.reopen(self.durable.revision()) {
            Ok(newer) => {
                if let Some(snapshot) = newer {
                    // A full replace answered as failed was stored after all; a restart would
                    // load it, so continue from it rather than reuse its revision.
                    warn!(
                        revision = snapshot.revision(),
                        "the folder holds a full replace that failed after its snapshot was \
                         renamed into place; continuing from it"
                    );
                    self.current = Arc::new(snapshot);
                    self.durable = self.current.clone();
                    self.records_since_snapshot = 0;
                    self.registry.publish_arc(self.current.clone());
                    (self.on_publish)(&self.current, None);
                }
                info!(
                    revision = self.durable.revision(),
                    "registry storage works again; writes are accepted"
                );
                self.set_failed(None);
                self.retry_after = RETRY_FIRST;
            }
            Err(e) => self.set_failed(Some(e.to_string())),
        }
    }

    /// Sends [`Request::Retry`] after the current back-off, unless a timer already runs.
    fn schedule_retry(&mut self) {
        if self.retry_pending {
            return;
        }
        self.retry_pending = true;
        let wait = self.retry_after;
        self.retry_after = (wait * 2).min(RETRY_MAX);
        let to_self = self.to_self.clone();
        thread::spawn(move || {
            thread::sleep(wait);
            if let Some(tx) = to_self.upgrade() {
                let _ = tx.blocking_send(Request::Retry);
            }
        });
    }

    fn set_failed(&mut self, why: Option<String>) {
        *self.failure.lock().unwrap_or_else(|p| p.into_inner()) = why.clone();
        self.failed = why;
    }

    fn check(&self, expect_revision: Option<u64>) -> Result<(), WriteError> {
        if let Some(why) = &self.failed {
            return Err(WriteError::Storage(why.clone()));
        }
        match expect_revision {
            Some(expected) if expected != self.current.revision() => Err(WriteError::Conflict {
                expected,
                current: self.current.revision(),
            }),
            _ => Ok(()),
        }
    }

    fn apply_ops(
        &mut self,
        ops: &[Op],
        kind: WriteKind,
        guard: Guard,
    ) -> Result<Applied, WriteError> {
        self.check(guard.expect_revision)?;
        if kind == WriteKind::Delete {
            if let Some(op) = ops
                .iter()
                .find(|op| self.current.get(op.domain()).is_none())
            {
                return Err(WriteError::NotFound(op.domain().to_string()));
            }
        }
        let bytes = record_len(ops);
        if bytes > MAX_RECORD as usize {
            return Err(WriteError::TooLarge {
                bytes,
                limit: MAX_RECORD,
            });
        }
        let effect = Effect::of(&self.current, ops);
        let before = self.current.len();
        if let Some(limit) = guard.max_shrink {
            if !limit.admits(effect.removed, before) {
                return Err(WriteError::Shrink {
                    what: kind.noun(),
                    removed: effect.removed,
                    entries: before,
                    limit,
                    current: self.current.revision(),
                });
            }
        }
        let revision = self.current.revision() + 1;
        if let Err(e) = self.store.append(revision, ops) {
            self.fail(&e);
            return Err(WriteError::Storage(e.to_string()));
        }
        self.records_since_snapshot += 1;
        self.current = Arc::new(self.current.apply(ops, revision));
        Ok(Applied {
            revision,
            applied: ops.len() - effect.absent,
            entries: self.current.len(),
            absent: effect.absent,
            removed: effect.removed,
            before,
        })
    }

    /// A fleet change of operations at stream sequence `seq`, which must be the next revision.
    fn apply_fleet_ops(&mut self, seq: u64, ops: &[Op]) -> Result<(), WriteError> {
        self.check(None)?;
        if seq != self.current.revision() + 1 {
            return Err(WriteError::OutOfOrder {
                current: self.current.revision(),
                got: seq,
            });
        }
        let bytes = record_len(ops);
        if bytes > MAX_RECORD as usize {
            return Err(WriteError::TooLarge {
                bytes,
                limit: MAX_RECORD,
            });
        }
        if let Err(e) = self.store.append(seq, ops) {
            self.fail(&e);
            return Err(WriteError::Storage(e.to_string()));
        }
        self.records_since_snapshot += 1;
        self.current = Arc::new(self.current.apply(ops, seq));
        Ok(())
    }

    /// A whole registry from the fleet at stream sequence `seq`: the next revision (a full
    /// replace), or further on (a snapshot, when the stream no longer holds what came between).
    /// With `adopt`, the registry in `state_dir` is from another history: its journals go and
    /// the fleet's registry replaces it whatever the revisions.
    fn apply_fleet_replace(
        &mut self,
        seq: u64,
        snapshot: Snapshot,
        adopt: bool,
    ) -> Result<(), WriteError> {
        self.check(None)?;
        if !adopt && seq <= self.current.revision() {
            return Err(WriteError::OutOfOrder {
                current: self.current.revision(),
                got: seq,
            });
        }
        let next = Arc::new(snapshot.at_revision(seq));
        if let Err(e) = self.store.sync() {
            self.fail(&e);
            return Err(WriteError::Storage(e.to_string()));
        }
        self.durable = self.current.clone();
        let durable = if adopt {
            self.store
                .reset(seq)
                .and_then(|()| self.snapshot_file.write_over(self.store.dir(), &next))
        } else {
            self.store
                .rotate(seq)
                .and_then(|()| self.snapshot_file.write(self.store.dir(), &next))
        };
        if let Err(e) = durable {
            self.fail(&e);
            return Err(WriteError::Storage(e.to_string()));
        }
        self.durable = next.clone();
        if let Err(e) = self.store.remove_journals_through(seq) {
            warn!(error = %e, "could not remove the journals a fleet snapshot covers");
        }
        self.records_since_snapshot = 0;
        self.current = next;
        Ok(())
    }

    /// A full replace is written as a snapshot (durable before the group's replies), with the
    /// journal rotated so replay starts after it.
    fn apply_replace(
        &mut self,
        entries: SnapshotBuilder,
        guard: Guard,
    ) -> Result<Applied, WriteError> {
        self.check(guard.expect_revision)?;
        let revision = self.current.revision() + 1;
        let next = Arc::new(entries.finish(revision));
        let before = self.current.len();
        // One lookup per entry (about a second at 10 million in a release build): only when the
        // call is guarded.
        let removed = match guard.max_shrink {
            Some(_) => self
                .current
                .iter()
                .filter(|e| next.get(e.domain).is_none())
                .count(),
            None => before.saturating_sub(next.len()),
        };
        if let Some(limit) = guard.max_shrink {
            if !limit.admits(removed, before) {
                return Err(WriteError::Shrink {
                    what: WriteKind::Replace.noun(),
                    removed,
                    entries: before,
                    limit,
                    current: self.current.revision(),
                });
            }
        }
        if let Err(e) = self.store.sync() {
            self.fail(&e);
            return Err(WriteError::Storage(e.to_string()));
        }
        self.durable = self.current.clone();
        let durable = self
            .store
            .rotate(revision)
            .and_then(|()| self.snapshot_file.write(self.store.dir(), &next));
        if let Err(e) = durable {
            self.fail(&e);
            return Err(WriteError::Storage(e.to_string()));
        }
        self.durable = next.clone();
        // The replace stands; journals left behind are only replayed (and skipped) until the
        // next compaction removes them.
        if let Err(e) = self.store.remove_journals_through(revision) {
            warn!(error = %e, "could not remove the journals a full replace covers");
        }
        self.records_since_snapshot = 0;
        let applied = next.len();
        self.current = next;
        Ok(Applied {
            revision,
            applied,
            entries: applied,
            absent: 0,
            removed,
            before,
        })
    }

    /// Starts a background snapshot once the journal is long, so restarts stay fast. The
    /// snapshot is immutable, so writing it needs no lock; new writes go to a rotated journal.
    fn maybe_compact(&mut self) {
        if self.records_since_snapshot < self.compact_after {
            return;
        }
        let revision = self.current.revision();
        if let Err(e) = self.store.rotate(revision) {
            warn!(error = %e, "could not rotate the journal; compaction postponed");
            return;
        }
        self.records_since_snapshot = 0;
        let snapshot = self.current.clone();
        let dir: PathBuf = self.store.dir().to_path_buf();
        let done = self.to_self.clone();
        let file = self.snapshot_file.clone();
        self.compaction = Some(thread::spawn(move || match file.write(&dir, &snapshot) {
            Ok(()) => {
                info!(revision, "registry compacted");
                if let Some(tx) = done.upgrade() {
                    let _ = tx.blocking_send(Request::Compacted(revision));
                }
            }
            // The journals stay, so nothing is lost; the next compaction tries again.
            Err(e) => warn!(error = %e, "registry compaction failed"),
        }));
    }

    fn fail(&mut self, e: &StoreError) {
        if self.failed.is_none() {
            error!(
                error = %e,
                "registry storage failed; writes are refused until it works again (retried by itself)"
            );
        }
        self.set_failed(Some(e.to_string()));
        self.schedule_retry();
    }
}

/// Serialises writes of `snapshot.bin` between the writer (full replace) and background
/// compactions, and never lets an older snapshot overwrite a newer one: a compaction that
/// finishes after a replace must not roll the file back.
#[derive(Default)]
struct SnapshotFile {
    /// Revision of the snapshot on disk (0 before any write this run).
    written: Mutex<u64>,
}

impl SnapshotFile {
    fn write(&self, dir: &Path, snapshot: &Snapshot) -> Result<(), StoreError> {
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        if *written > snapshot.revision() {
            return Ok(());
        }
        write_snapshot(dir, snapshot)?;
        *written = snapshot.revision();
        Ok(())
    }

    /// Writes `snapshot` even over a newer revision: a registry from another history replaces
    /// the one on disk.
    fn write_over(&self, dir: &Path, snapshot: &Snapshot) -> Result<(), StoreError> {
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        write_snapshot(dir, snapshot)?;
        *written = snapshot.revision();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{Entry, Status};

    /// Starts a writer on `dir` as the server does (seeding an empty registry the first time).
    fn start(dir: &Path, compact_after: u64) -> (RegistryWriter, thread::JoinHandle<()>) {
        let (store, recovered) = Store::open(dir).unwrap();
        let snapshot = recovered.snapshot.unwrap_or_else(|| {
            write_snapshot(dir, &Snapshot::empty()).unwrap();
            Snapshot::empty()
        });
        let current = Arc::new(snapshot);
        let registry = Arc::new(Registry::new(Snapshot::empty()));
        registry.publish_arc(current.clone());
        RegistryWriter::spawn(store, current, registry, Box::new(|_, _| {}), compact_after)
    }

    /// Writes `n` single puts, then stops the writer as a restart would.
    fn run(dir: &Path, compact_after: u64, n: usize, tag: u64) {
        let (writer, thread) = start(dir, compact_after);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for i in 0..n {
            let entry = Entry {
                domain: format!("r{tag}-{i}.cn"),
                icp: "京ICP备1号-1".into(),
                status: Status::Filed,
                access_here: true,
            };
            rt.block_on(writer.write(WriteKind::Put, vec![Op::Put(entry)], Guard::default()))
                .unwrap();
        }
        drop(writer);
        thread.join().unwrap();
    }

    fn snapshot_revision(dir: &Path) -> u64 {
        let bytes = std::fs::read(dir.join("snapshot.bin")).unwrap();
        u64::from_le_bytes(bytes[8..16].try_into().unwrap())
    }

    /// Journal records a start would replay (after the snapshot), and the revision it reaches.
    fn replay(dir: &Path) -> (usize, u64) {
        let (_, recovered) = Store::open(dir).unwrap();
        (
            recovered.records_replayed,
            recovered.snapshot.unwrap().revision(),
        )
    }

    fn journals(dir: &Path) -> usize {
        std::fs::read_dir(dir)
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                name.to_string_lossy().starts_with("journal-")
            })
            .count()
    }

    #[test]
    fn records_found_at_start_count_toward_compaction() {
        const COMPACT_AFTER: u64 = 10;
        // Each run writes 7 records, under the threshold on its own: only counting what the
        // journal held at start ever compacts it.
        let dir = tempfile::tempdir().unwrap();
        let mut snapshots = Vec::new();
        for tag in 0..6u64 {
            run(dir.path(), COMPACT_AFTER, 7, tag);
            let (replayed, revision) = replay(dir.path());
            assert_eq!(revision, (tag + 1) * 7);
            assert!(
                (replayed as u64) < COMPACT_AFTER && journals(dir.path()) <= 2,
                "run {tag}: {replayed} records in {} journals to replay at revision {revision}",
                journals(dir.path())
            );
            snapshots.push(snapshot_revision(dir.path()));
        }
        assert!(snapshots.windows(2).all(|w| w[0] <= w[1]), "{snapshots:?}");
        assert!(
            *snapshots.last().unwrap() > 42 - COMPACT_AFTER,
            "{snapshots:?}"
        );
    }

    #[test]
    fn a_journal_over_the_threshold_at_start_is_compacted_at_once() {
        // Written by a writer that never compacted (as before this was fixed).
        let dir = tempfile::tempdir().unwrap();
        run(dir.path(), u64::MAX, 15, 0);
        assert_eq!(replay(dir.path()), (15, 15));
        // A start with nothing written compacts.
        run(dir.path(), 10, 0, 1);
        assert_eq!(snapshot_revision(dir.path()), 15);
        assert_eq!(replay(dir.path()), (0, 15));
        assert_eq!(journals(dir.path()), 1);
    }
}
