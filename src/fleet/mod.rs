//! Fleet: one registry for every node, distributed over a NATS JetStream stream (docs/fleet.md).
//!
//! The stream is the source of truth. Every `/v1` write on a fleet node is published to it as
//! one message ([`message`]) and answered once JetStream acknowledged it *and* this node applied
//! it; every node applies every message, in stream order, through the registry writer, so a
//! node's registry revision is the stream sequence of the last message it applied. What a node
//! applied is in its `state_dir` like any write (journal, group commit), so a restart resumes at
//! the next sequence. When the stream no longer holds it (history trimmed), the node loads the
//! newest snapshot from the object store bucket ([`snapshots`]) and tails from there.
//!
//! Layer: above `registry` and `observe`, below `proxy` (whose shared state holds the
//! [`Fleet`] handle), `admin` (whose `/v1` writes go through it) and `runtime` (which starts it).

mod message;
mod node;
mod snapshots;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind};
use bytes::Bytes;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::FleetConfig;
use crate::observe::metrics::FleetMetrics;
use crate::registry::{
    Applied, Guard, Op, Registry, RegistryWriter, SnapshotBuilder, WriteError, WriteKind,
    check_ops_shrink, check_replace_shrink,
};
use message::{Encoding, Kind};

/// How long a write waits for JetStream's acknowledgement.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a write waits, after the acknowledgement, for this node to apply its message.
const APPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Room left in a NATS message for headers; a body larger than the server's `max_payload` less
/// this travels as an object.
const HEADER_ROOM: usize = 16 * 1024;

/// The fleet side of a node: writes through the stream, and the task that applies it.
#[derive(Clone)]
pub(crate) struct Fleet {
    inner: Arc<Inner>,
}

struct Inner {
    config: FleetConfig,
    writer: RegistryWriter,
    registry: Arc<Registry>,
    metrics: FleetMetrics,
    client: async_nats::Client,
    /// JetStream where `stream` and `snapshots` live (through `domain` when set).
    js: jetstream::Context,
    /// JetStream of the stream this node consumes (`read_stream`: the local one).
    js_read: jetstream::Context,
    /// The stream sequence applied here, for writes waiting on their own message.
    applied: watch::Sender<u64>,
    /// Whether this node's registry is the fleet's (false while a new node joins).
    synced: watch::Sender<bool>,
    /// Whether the stream and bucket were reached by the applying task since the last
    /// disconnection.
    attached: AtomicBool,
    /// What the NATS client reported (connection failures, publish permission violations).
    reported: Arc<node::Reported>,
    /// Why this node cannot apply the stream now, if it cannot (writes answer 503 meanwhile).
    stopped: Mutex<Option<String>>,
}

impl Fleet {
    /// Connects (in the background: an unreachable server is retried with backoff, and the node
    /// serves its local registry meanwhile) and starts applying the stream. `joined`: the
    /// registry in `state_dir` is already this fleet's, so the node is ready at once; otherwise
    /// [`Fleet::synced`] turns true once it holds the fleet's registry.
    pub(crate) async fn start(
        config: FleetConfig,
        writer: RegistryWriter,
        registry: Arc<Registry>,
        metrics: FleetMetrics,
        state_dir: std::path::PathBuf,
        joined: bool,
    ) -> Result<Fleet, String> {
        let reported = Arc::new(node::Reported::default());
        let client = node::connect(&config, metrics.clone(), reported.clone()).await?;
        let js = match &config.domain {
            Some(domain) => jetstream::with_domain(client.clone(), domain),
            None => jetstream::new(client.clone()),
        };
        let js_read = match &config.read_stream {
            Some(_) => jetstream::new(client.clone()),
            None => js.clone(),
        };
        let revision = registry.load().revision();
        metrics.applied_sequence.set(revision as i64);
        let fleet = Fleet {
            inner: Arc::new(Inner {
                config,
                writer,
                registry,
                metrics,
                client,
                js,
                js_read,
                applied: watch::Sender::new(revision),
                synced: watch::Sender::new(joined),
                attached: AtomicBool::new(false),
                reported,
                stopped: Mutex::new(None),
            }),
        };
        tokio::spawn(node::run(fleet.clone(), state_dir, joined));
        Ok(fleet)
    }

    /// Resolves once this node holds the fleet's registry (at once for a node that had joined).
    pub(crate) async fn synced(&self) {
        let mut rx = self.inner.synced.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Applies `ops` as one write through the stream. 2xx only after the publish ack and after
    /// this node applied the message.
    pub(crate) async fn write(
        &self,
        kind: WriteKind,
        ops: Vec<Op>,
        guard: Guard,
    ) -> Result<Applied, WriteError> {
        self.writable()?;
        // Checked against this node's registry before publishing: the stream carries writes,
        // not guards, and with expect_revision the check holds for the revision it names.
        let current = self.inner.registry.load_full();
        let (absent, removed) = check_ops_shrink(&current, kind, &ops, &guard)?;
        if kind == WriteKind::Delete {
            let current = self.inner.registry.load();
            if let Some(op) = ops.iter().find(|op| current.get(op.domain()).is_none()) {
                return Err(WriteError::NotFound(op.domain().to_string()));
            }
        }
        let body = message::encode_ops(&ops);
        let sequence = self
            .publish(Kind::Ops, Encoding::Ndjson, body, guard.expect_revision)
            .await?;
        self.wait_applied(sequence).await?;
        Ok(Applied {
            revision: sequence,
            applied: ops.len() - absent,
            entries: self.inner.registry.load().len(),
            absent,
            removed,
            before: current.len(),
        })
    }

    /// Replaces the whole registry through the stream; the node that published it also writes
    /// the snapshot of it to the bucket.
    pub(crate) async fn replace(
        &self,
        entries: SnapshotBuilder,
        guard: Guard,
    ) -> Result<Applied, WriteError> {
        self.writable()?;
        let count = entries.len();
        let current = self.inner.registry.load_full();
        let before = current.len();
        let (body, removed) = tokio::task::spawn_blocking(move || {
            let snapshot = entries.finish(0);
            let removed = check_replace_shrink(&current, &snapshot, &guard)?;
            let mut out = Vec::with_capacity(snapshot.len() * 48 + 64);
            crate::registry::encode_snapshot(&mut out, &snapshot)
                .map(|()| (out, removed))
                .map_err(|e| WriteError::Unavailable(e.to_string()))
        })
        .await
        .map_err(|e| WriteError::Unavailable(e.to_string()))??;
        let sequence = self
            .publish(
                Kind::Replace,
                Encoding::Snapshot,
                body,
                guard.expect_revision,
            )
            .await?;
        self.wait_applied(sequence).await?;
        if self.inner.config.snapshot_every > 0 {
            let snapshot = self.inner.registry.load_full();
            if snapshot.revision() == sequence {
                let fleet = self.clone();
                tokio::spawn(async move { fleet.write_snapshot(snapshot).await });
            }
        }
        Ok(Applied {
            revision: sequence,
            applied: count,
            entries: count,
            absent: 0,
            removed,
            before,
        })
    }

    /// Refuses writes this node could not see through: no JetStream, not yet the fleet's
    /// registry, or stopped on a change it cannot apply.
    fn writable(&self) -> Result<(), WriteError> {
        let inner = &self.inner;
        if let Some(why) = inner
            .stopped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return Err(WriteError::Unavailable(format!(
                "fleet: this node stopped applying the stream: {why}"
            )));
        }
        if inner.client.connection_state() != async_nats::connection::State::Connected
            || !inner.attached.load(Ordering::Acquire)
        {
            return Err(WriteError::Unavailable(
                "fleet: JetStream is unreachable; writes are refused, the registry in force stays"
                    .into(),
            ));
        }
        if !*inner.synced.borrow() {
            return Err(WriteError::Unavailable(
                "fleet: this node is still loading the fleet's registry".into(),
            ));
        }
        Ok(())
    }

    /// Publishes one change (as an object when it is too large for a message) and answers its
    /// stream sequence. The server refusing this node's user the publish (a read-only node)
    /// answers [`WriteError::Forbidden`] at once, rather than waiting for an ack that never
    /// comes.
    async fn publish(
        &self,
        kind: Kind,
        encoding: Encoding,
        body: Vec<u8>,
        expect_revision: Option<u64>,
    ) -> Result<u64, WriteError> {
        // The server names the subject in quotes: the change's, or an object's chunks.
        let (subject, chunks) = (
            format!("\"{}\"", self.inner.config.subject),
            format!("\"$O.{}.", self.inner.config.snapshots),
        );
        let denied = self
            .inner
            .reported
            .denied(move |text| text.contains(&subject) || text.contains(&chunks));
        tokio::select! {
            published = self.publish_change(kind, encoding, body, expect_revision) => published,
            why = denied => Err(WriteError::Forbidden(format!(
                "fleet: the NATS server does not let this node's user publish the change ({why}); \
                 this node reads the stream and enforces it, but writes go to a node whose user \
                 may publish to {:?}", self.inner.config.subject
            ))),
        }
    }

    async fn publish_change(
        &self,
        kind: Kind,
        encoding: Encoding,
        body: Vec<u8>,
        expect_revision: Option<u64>,
    ) -> Result<u64, WriteError> {
        let inner = &self.inner;
        let unavailable = |e: String| WriteError::Unavailable(format!("fleet: {e}"));
        let max = (inner.client.server_info().max_payload).saturating_sub(HEADER_ROOM);
        let (headers, payload) = if body.len() > max {
            let sha = message::sha256_hex(&body);
            let name = format!("change-{}", nuid_like());
            let bucket = node::bucket(&inner.js, &inner.config)
                .await
                .map_err(unavailable)?;
            bucket
                .put(name.as_str(), &mut &body[..])
                .await
                .map_err(|e| unavailable(format!("storing the change as object {name}: {e}")))?;
            let h = message::headers(kind, encoding, Some((&name, &sha)), &inner.config.node);
            (h, Bytes::new())
        } else {
            let h = message::headers(kind, encoding, None, &inner.config.node);
            (h, Bytes::from(body))
        };
        let mut publish = jetstream::message::PublishMessage::build()
            .headers(headers)
            .payload(payload);
        if let Some(n) = expect_revision {
            publish = publish.expected_last_sequence(n);
        }
        let sent = tokio::time::timeout(PUBLISH_TIMEOUT, async {
            inner
                .js
                .send_publish(inner.config.subject.clone(), publish)
                .await?
                .await
        })
        .await;
        match sent {
            Ok(Ok(ack)) => {
                inner.metrics.stream_sequence.set(ack.sequence as i64);
                Ok(ack.sequence)
            }
            Ok(Err(e)) if e.kind() == PublishErrorKind::WrongLastSequence => {
                let current = match inner.js.get_stream(&inner.config.stream).await {
                    Ok(mut s) => match s.info().await {
                        Ok(info) => info.state.last_sequence,
                        Err(_) => inner.registry.load().revision(),
                    },
                    Err(_) => inner.registry.load().revision(),
                };
                Err(WriteError::Conflict {
                    expected: expect_revision.unwrap_or_default(),
                    current,
                })
            }
            Ok(Err(e)) => Err(unavailable(format!("publishing to JetStream: {e}"))),
            Err(_) => Err(unavailable(format!(
                "JetStream did not acknowledge within {PUBLISH_TIMEOUT:?}"
            ))),
        }
    }

    async fn wait_applied(&self, sequence: u64) -> Result<(), WriteError> {
        let mut rx = self.inner.applied.subscribe();
        match tokio::time::timeout(APPLY_TIMEOUT, rx.wait_for(|a| *a >= sequence)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(WriteError::Unavailable(format!(
                "fleet: stored in the stream at sequence {sequence} but not applied on this node \
                 within {APPLY_TIMEOUT:?}; every node applies it once it can"
            ))),
        }
    }

    /// Writes a snapshot to the bucket, unless one at least as new is there already.
    async fn write_snapshot(&self, snapshot: Arc<crate::registry::Snapshot>) {
        let inner = &self.inner;
        let bucket = match node::bucket(&inner.js, &inner.config).await {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "fleet snapshot not written: no bucket");
                return;
            }
        };
        match snapshots::list(&bucket).await {
            Ok(existing) if existing.first().is_some_and(|s| *s >= snapshot.revision()) => return,
            Ok(_) => {}
            Err(e) => {
                warn!(error = %e, "fleet snapshot not written: cannot list the bucket");
                return;
            }
        }
        let sequence = snapshot.revision();
        match snapshots::write(&bucket, snapshot, &inner.config.node).await {
            Ok(()) => inner.metrics.snapshot_writes.inc(),
            Err(e) => {
                warn!(sequence, error = %e, "fleet snapshot not written");
                return;
            }
        }
        // Large changes whose messages the stream no longer holds.
        let first = match inner.js.get_stream(&inner.config.stream).await {
            Ok(mut s) => match s.info().await {
                Ok(info) if info.state.first_sequence > 1 => {
                    Some(info.state.first_timestamp.unix_timestamp_nanos())
                }
                _ => None,
            },
            Err(_) => None,
        };
        if let Some(first) = first {
            match snapshots::remove_old_changes(&bucket, first).await {
                Ok(0) => {}
                Ok(removed) => info!(
                    removed,
                    "fleet: removed change objects the stream no longer names"
                ),
                Err(e) => warn!(error = %e, "fleet: could not remove old change objects"),
            }
        }
    }

    fn set_stopped(&self, why: Option<String>) {
        let inner = &self.inner;
        inner.metrics.apply_stopped.set(i64::from(why.is_some()));
        *inner.stopped.lock().unwrap_or_else(|p| p.into_inner()) = why;
    }

    fn set_attached(&self, attached: bool) {
        let inner = &self.inner;
        if inner.attached.swap(attached, Ordering::AcqRel) != attached {
            inner.metrics.connected.set(i64::from(attached));
            if attached {
                info!(stream = %inner.config.stream, "fleet: attached to the stream");
            }
        }
    }
}

/// A unique-enough object name part: time and a process-wide counter.
fn nuid_like() -> String {
    use std::sync::atomic::AtomicU64;
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!(
        "{now:x}-{:x}-{:x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}
