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

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;

use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use super::store::{MAX_RECORD, Store, StoreError, record_len, write_snapshot};
use super::{Op, Registry, Snapshot, SnapshotBuilder};

/// Journal records after which a background compaction starts.
const COMPACT_AFTER_RECORDS: u64 = 100_000;
/// Most writes applied under one fsync.
const MAX_GROUP: usize = 4096;

/// Which API call a write came from (the `op` label of `icp_gate_registry_updates_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteKind {
    Put,
    Delete,
    Batch,
    Replace,
}

impl WriteKind {
    pub fn as_str(self) -> &'static str {
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
pub struct Applied {
    pub revision: u64,
    /// Operations applied (1 for a single put/delete).
    pub applied: usize,
    /// Entries in the registry after the write.
    pub entries: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
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
    /// The write could not be made durable; the registry refuses further writes until restarted.
    #[error("registry storage failed: {0}")]
    Storage(String),
}

/// Called after every publication, with the new snapshot and the entry domains the writes touched
/// (`None` after a full replace): revocation of live tunnels and the registry gauges hang here.
pub type OnPublish = Box<dyn Fn(&Snapshot, Option<&[&str]>) + Send>;

enum Request {
    Ops {
        ops: Vec<Op>,
        kind: WriteKind,
        expect_revision: Option<u64>,
        reply: oneshot::Sender<Result<Applied, WriteError>>,
    },
    Replace {
        entries: SnapshotBuilder,
        expect_revision: Option<u64>,
        reply: oneshot::Sender<Result<Applied, WriteError>>,
    },
    /// A background compaction made a snapshot at this revision durable.
    Compacted(u64),
}

/// A handle for submitting writes; cheap to clone.
#[derive(Clone)]
pub struct RegistryWriter {
    tx: mpsc::Sender<Request>,
}

impl RegistryWriter {
    /// Starts the writer thread over `store`, whose recovered state `current` is already
    /// published in `registry`.
    pub fn start(
        store: Store,
        current: Arc<Snapshot>,
        registry: Arc<Registry>,
        on_publish: OnPublish,
    ) -> RegistryWriter {
        let (tx, rx) = mpsc::channel(MAX_GROUP);
        let writer = Writer {
            store,
            current,
            registry,
            on_publish,
            rx,
            compactions: tx.downgrade(),
            snapshot_file: Arc::default(),
            records_since_snapshot: 0,
            failed: None,
        };
        thread::Builder::new()
            .name("registry-writer".into())
            .spawn(move || writer.run())
            .expect("spawning the registry writer thread");
        RegistryWriter { tx }
    }

    /// Applies `ops` all-or-nothing as one revision.
    pub async fn write(
        &self,
        kind: WriteKind,
        ops: Vec<Op>,
        expect_revision: Option<u64>,
    ) -> Result<Applied, WriteError> {
        let (reply, answer) = oneshot::channel();
        self.submit(
            Request::Ops {
                ops,
                kind,
                expect_revision,
                reply,
            },
            answer,
        )
        .await
    }

    /// Replaces the whole registry with `entries` as one revision.
    pub async fn replace(
        &self,
        entries: SnapshotBuilder,
        expect_revision: Option<u64>,
    ) -> Result<Applied, WriteError> {
        let (reply, answer) = oneshot::channel();
        self.submit(
            Request::Replace {
                entries,
                expect_revision,
                reply,
            },
            answer,
        )
        .await
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
    registry: Arc<Registry>,
    on_publish: OnPublish,
    rx: mpsc::Receiver<Request>,
    compactions: mpsc::WeakSender<Request>,
    snapshot_file: Arc<SnapshotFile>,
    records_since_snapshot: u64,
    /// Set after a storage failure: the on-disk state is uncertain, so no more writes.
    failed: Option<String>,
}

type Reply = (
    oneshot::Sender<Result<Applied, WriteError>>,
    Result<Applied, WriteError>,
);

impl Writer {
    fn run(mut self) {
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
    }

    fn apply_group(&mut self, group: Vec<Request>) {
        let published = self.current.clone();
        let mut replies: Vec<Reply> = Vec::with_capacity(group.len());
        let mut changed: Vec<String> = Vec::new();
        let mut replaced = false;
        for request in group {
            match request {
                Request::Compacted(revision) => {
                    if let Err(e) = self.store.remove_journals_through(revision) {
                        warn!(error = %e, "could not remove compacted journals");
                    }
                }
                Request::Ops {
                    ops,
                    kind,
                    expect_revision,
                    reply,
                } => {
                    let result = self.apply_ops(&ops, kind, expect_revision);
                    if result.is_ok() {
                        changed.extend(ops.iter().map(|op| op.domain().to_string()));
                    }
                    replies.push((reply, result));
                }
                Request::Replace {
                    entries,
                    expect_revision,
                    reply,
                } => {
                    let result = self.apply_replace(entries, expect_revision);
                    replaced |= result.is_ok();
                    replies.push((reply, result));
                }
            }
        }

        if self.current.revision() != published.revision() {
            if let Err(e) = self.store.sync() {
                self.fail(&e);
            }
            match &self.failed {
                Some(why) => {
                    // Nothing of this group is acknowledged or published.
                    self.current = published;
                    for (_, result) in &mut replies {
                        if result.is_ok() {
                            *result = Err(WriteError::Storage(why.clone()));
                        }
                    }
                }
                None => {
                    self.registry.publish_arc(self.current.clone());
                    let touched: Vec<&str> = changed.iter().map(String::as_str).collect();
                    (self.on_publish)(&self.current, (!replaced).then_some(&touched[..]));
                    self.maybe_compact();
                }
            }
        }
        for (reply, result) in replies {
            // The requester may have gone away; the write stands regardless.
            let _ = reply.send(result);
        }
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
        expect_revision: Option<u64>,
    ) -> Result<Applied, WriteError> {
        self.check(expect_revision)?;
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
        let revision = self.current.revision() + 1;
        if let Err(e) = self.store.append(revision, ops) {
            self.fail(&e);
            return Err(WriteError::Storage(e.to_string()));
        }
        self.records_since_snapshot += 1;
        self.current = Arc::new(self.current.apply(ops, revision));
        Ok(Applied {
            revision,
            applied: ops.len(),
            entries: self.current.len(),
        })
    }

    /// A full replace is written as a snapshot (durable before the group's replies), with the
    /// journal rotated so replay starts after it.
    fn apply_replace(
        &mut self,
        entries: SnapshotBuilder,
        expect_revision: Option<u64>,
    ) -> Result<Applied, WriteError> {
        self.check(expect_revision)?;
        let revision = self.current.revision() + 1;
        let next = Arc::new(entries.finish(revision));
        let durable = self
            .store
            .sync()
            .and_then(|()| self.store.rotate(revision))
            .and_then(|()| self.snapshot_file.write(self.store.dir(), &next))
            .and_then(|()| self.store.remove_journals_through(revision));
        if let Err(e) = durable {
            self.fail(&e);
            return Err(WriteError::Storage(e.to_string()));
        }
        self.records_since_snapshot = 0;
        let applied = next.len();
        self.current = next;
        Ok(Applied {
            revision,
            applied,
            entries: applied,
        })
    }

    /// Starts a background snapshot once the journal is long, so restarts stay fast. The
    /// snapshot is immutable, so writing it needs no lock; new writes go to a rotated journal.
    fn maybe_compact(&mut self) {
        if self.records_since_snapshot < COMPACT_AFTER_RECORDS {
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
        let done = self.compactions.clone();
        let file = self.snapshot_file.clone();
        thread::spawn(move || match file.write(&dir, &snapshot) {
            Ok(()) => {
                info!(revision, "registry compacted");
                if let Some(tx) = done.upgrade() {
                    let _ = tx.blocking_send(Request::Compacted(revision));
                }
            }
            // The journals stay, so nothing is lost; the next compaction tries again.
            Err(e) => warn!(error = %e, "registry compaction failed"),
        });
    }

    fn fail(&mut self, e: &StoreError) {
        error!(error = %e, "registry storage failed; refusing further writes until restart");
        self.failed.get_or_insert_with(|| e.to_string());
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
}
