//! The task that keeps a node's registry on the stream: connects (retrying with backoff and
//! jitter), joins the fleet once, then applies every message in stream order, from the sequence
//! after the one it applied last, resuming there after any disconnection.
//!
//! A message is never skipped: a sequence missing from the stream, a malformed message or one
//! the registry refuses stops applying (the node keeps enforcing what it has, writes answer 503,
//! `icp_gate_fleet_apply_stopped` is 1, the log names the sequence) and is tried again every
//! [`STOPPED_RETRY`]. A position the stream no longer holds (history trimmed) is reached from the
//! newest snapshot in the bucket.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::object_store::{self, ObjectStore};
use async_nats::jetstream::stream::{self, Stream};
use async_nats::jetstream::{self, Message};
use async_nats::{Client, ConnectOptions, Event};
use futures_util::{FutureExt, StreamExt};
use tracing::{debug, error, info, warn};

use super::message::{self, Change};
use super::{Fleet, snapshots};
use crate::config::FleetConfig;
use crate::observe::metrics::FleetMetrics;
use crate::registry::{FleetChange, Snapshot, WriteError, read_fleet_marker, write_fleet_marker};

/// Wait before trying again after the node stopped on a change it cannot apply.
const STOPPED_RETRY: Duration = Duration::from_secs(30);
/// Backoff between attempts to reach the stream: doubles from the first to the last, with
/// ±25 % jitter so that a fleet does not reconnect in lockstep.
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// Messages applied under one group commit at most.
const BATCH: usize = 1024;
/// An idle consumer is removed by the server after this long, so a node that vanished or
/// reconnected leaves none behind.
const CONSUMER_INACTIVE: Duration = Duration::from_secs(30);

/// Why a session with the stream ended.
enum Stop {
    /// Try again soon (disconnected, server errors, history trimmed).
    Retry(String),
    /// This node cannot go on applying: said loudly, tried again after [`STOPPED_RETRY`].
    Stopped(String),
}

fn retry(e: impl std::fmt::Display) -> Stop {
    Stop::Retry(e.to_string())
}

/// `base` doubled `attempt` times up to `max`, with ±25 % jitter.
fn backoff(attempt: u32, base: Duration, max: Duration) -> Duration {
    let plain = base.saturating_mul(1 << attempt.min(16)).min(max);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    // 0.75 .. 1.25 of the plain wait.
    plain.mul_f64(0.75 + f64::from(nanos % 1000) / 2000.0)
}

/// What the NATS client reported that the node's answers and log should name: why it cannot
/// connect, and the server refusing this node's user a publish.
#[derive(Default)]
pub(super) struct Reported {
    /// The last failed connection attempt ("authorization violation", "timed out", a TLS
    /// error...); cleared once connected.
    connect_error: std::sync::Mutex<Option<String>>,
    /// Publish permission violations: a count (watched by writes waiting for their ack) and
    /// the server's words for the last one.
    denied: tokio::sync::watch::Sender<(u64, String)>,
}

impl Reported {
    pub(super) fn connect_error(&self) -> Option<String> {
        self.connect_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_connect_error(&self, e: Option<String>) {
        *self.connect_error.lock().unwrap_or_else(|p| p.into_inner()) = e;
    }

    /// Resolves with the server's words once it refuses this node a publish to a subject
    /// `concerns` accepts (after this call).
    pub(super) fn denied(
        &self,
        concerns: impl Fn(&str) -> bool + Send + 'static,
    ) -> impl std::future::Future<Output = String> + 'static {
        let mut rx = self.denied.subscribe();
        rx.mark_unchanged();
        async move {
            loop {
                if rx.changed().await.is_err() {
                    // Never: the sender lives as long as the node.
                    return std::future::pending().await;
                }
                let text = rx.borrow_and_update().1.clone();
                if concerns(&text) {
                    return text;
                }
            }
        }
    }
}

/// A client that connects in the background and reconnects by itself, forever.
pub(super) async fn connect(
    config: &FleetConfig,
    metrics: FleetMetrics,
    reported: std::sync::Arc<Reported>,
) -> Result<Client, String> {
    let node = config.node.clone();
    let mut options = ConnectOptions::new()
        .name(format!("icp-gate {node}"))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(2))
        .ping_interval(Duration::from_secs(10))
        // The client sleeps this long before every attempt, the first one at start-up
        // included (attempt 1): that one goes at once, the next ones back off.
        .reconnect_delay_callback(|attempt| match attempt {
            0 | 1 => Duration::ZERO,
            n => backoff((n - 2) as u32, RETRY_FIRST, RETRY_MAX),
        })
        .event_callback(move |event| {
            let metrics = metrics.clone();
            let reported = reported.clone();
            async move {
                match event {
                    Event::Connected => {
                        reported.set_connect_error(None);
                        info!("fleet: connected to NATS");
                    }
                    Event::Disconnected => {
                        metrics.connected.set(0);
                        warn!("fleet: disconnected from NATS; reconnecting, the registry in force stays");
                    }
                    Event::ServerError(async_nats::ServerError::Other(e))
                        if e.to_ascii_lowercase().contains("permissions violation for publish") =>
                    {
                        warn!(error = %e, "fleet: the NATS server refused this node's user a publish");
                        reported.denied.send_modify(|(n, text)| {
                            *n += 1;
                            *text = e;
                        });
                    }
                    Event::ServerError(e) => warn!(error = %e, "fleet: NATS server error"),
                    // Each failed connection attempt; the run loop says it (every 30 s, and
                    // whenever the reason changes).
                    Event::ClientError(e) => {
                        debug!(error = %e, "fleet: NATS client error");
                        reported.set_connect_error(Some(e.to_string()));
                    }
                    other => info!(event = %other, "fleet: NATS"),
                }
            }
        });
    if let Some(creds) = &config.credentials {
        options = options
            .credentials_file(creds)
            .await
            .map_err(|e| format!("fleet.credentials {}: {e}", creds.display()))?;
    }
    if let Some((user, file)) = &config.user {
        let password = std::fs::read_to_string(file)
            .map_err(|e| format!("fleet.password_file {}: {e}", file.display()))?;
        options = options.user_and_password(user.clone(), password.trim_end().to_string());
    }
    if let Some(ca) = &config.tls_ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let Some((cert, key)) = &config.tls_client {
        options = options
            .add_client_certificate(cert.clone(), key.clone())
            .require_tls(true);
    }
    options
        .connect(config.servers.clone())
        .await
        .map_err(|e| format!("fleet.servers: {e}"))
}

/// The change stream, created (one subject, file storage) when missing.
async fn ensure_stream(js: &jetstream::Context, config: &FleetConfig) -> Result<Stream, String> {
    js.get_or_create_stream(stream::Config {
        name: config.stream.clone(),
        description: Some("icp-gate registry changes, one message per write".into()),
        subjects: vec![config.subject.clone()],
        storage: stream::StorageType::File,
        num_replicas: config.replicas,
        allow_direct: true,
        ..Default::default()
    })
    .await
    .map_err(|e| format!("stream {}: {e}", config.stream))
}

/// The snapshots bucket, created when missing.
pub(super) async fn bucket(
    js: &jetstream::Context,
    config: &FleetConfig,
) -> Result<ObjectStore, String> {
    if let Ok(b) = js.get_object_store(&config.snapshots).await {
        return Ok(b);
    }
    js.create_object_store(object_store::Config {
        bucket: config.snapshots.clone(),
        description: Some("icp-gate registry snapshots and large changes".into()),
        storage: stream::StorageType::File,
        num_replicas: config.replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| format!("bucket {}: {e}", config.snapshots))
}

/// What `fleet.json` says for this stream: its name and creation time, so that a stream
/// deleted and created again is not taken for the one whose sequences the registry counts.
fn identity(info: &stream::Info) -> String {
    serde_json::json!({
        "stream": info.config.name,
        "created_ns": info.created.unix_timestamp_nanos().to_string(),
    })
    .to_string()
}

pub(super) async fn run(fleet: Fleet, state_dir: PathBuf, joined: bool) {
    if !joined {
        info!(
            "fleet: this node's registry is not the fleet's yet; it joins once JetStream answers"
        );
    }
    let mut attempt = 0u32;
    loop {
        let mut said: Option<(std::time::Instant, Option<String>)> = None;
        let since = std::time::Instant::now();
        while fleet.inner.client.connection_state() != async_nats::connection::State::Connected {
            fleet.set_attached(false);
            let why = fleet.inner.reported.connect_error();
            // Said once it is more than a moment, then every 30 s and whenever the reason
            // changes.
            let worth = why.is_some() || since.elapsed() >= Duration::from_secs(1);
            if worth
                && said
                    .as_ref()
                    .is_none_or(|(t, was)| t.elapsed() >= Duration::from_secs(30) || *was != why)
            {
                warn!(
                    servers = ?fleet.inner.config.servers,
                    error = why.as_deref().unwrap_or("not connected yet"),
                    revision = fleet.inner.registry.load().revision(),
                    "fleet: NATS unreachable; serving the registry this node has, writes refused, \
                     retrying"
                );
                said = Some((std::time::Instant::now(), why));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let stop = session(&fleet, &state_dir, &mut attempt).await;
        match stop {
            Stop::Retry(why) => {
                fleet.set_attached(false);
                let wait = backoff(attempt, RETRY_FIRST, RETRY_MAX);
                warn!(error = %why, retry_in = ?wait, "fleet: stream session ended");
                attempt = attempt.saturating_add(1);
                tokio::time::sleep(wait).await;
            }
            Stop::Stopped(why) => {
                error!(
                    error = %why,
                    revision = fleet.inner.registry.load().revision(),
                    retry_in = ?STOPPED_RETRY,
                    "fleet: applying the stream stopped; this node keeps enforcing its registry \
                     and refuses writes"
                );
                fleet.set_stopped(Some(why));
                tokio::time::sleep(STOPPED_RETRY).await;
            }
        }
    }
}

async fn session(fleet: &Fleet, state_dir: &Path, attempt: &mut u32) -> Stop {
    let inner = &fleet.inner;
    let config = &inner.config;
    // The stream written to and the bucket: in the hub's domain when this node reads a mirror.
    let hub = async {
        let mut stream = ensure_stream(&inner.js, config).await?;
        let bucket = bucket(&inner.js, config).await?;
        let identity = match stream.info().await {
            Ok(info) => identity(info),
            Err(e) => return Err(format!("stream {}: {e}", config.stream)),
        };
        Ok((stream, bucket, identity))
    }
    .await;
    let mut read = match (&config.read_stream, &hub) {
        (Some(name), _) => match inner.js_read.get_stream(name).await {
            Ok(s) => s,
            Err(e) => return Stop::Retry(format!("read_stream {name}: {e}")),
        },
        (None, Ok((stream, _, _))) => stream.clone(),
        (None, Err(e)) => return Stop::Retry(e.clone()),
    };
    let marker = match read_fleet_marker(state_dir) {
        Ok(m) => m,
        Err(e) => return Stop::Stopped(format!("reading the fleet marker: {e}")),
    };
    let bucket = match hub {
        Ok((mut stream, bucket, identity)) => {
            fleet.set_attached(true);
            *attempt = 0;
            if marker.as_deref() != Some(identity.as_str()) {
                if marker.is_some() {
                    warn!(
                        marker = marker.as_deref().unwrap_or_default(),
                        stream = %identity,
                        "fleet: state_dir holds the registry of another stream (deleted and \
                         created again?); joining this one"
                    );
                }
                if let Err(stop) = join(fleet, &mut stream, &mut read, &bucket).await {
                    return stop;
                }
                if let Err(e) = write_fleet_marker(state_dir, &identity) {
                    return Stop::Stopped(format!("writing the fleet marker: {e}"));
                }
            }
            Some(bucket)
        }
        // Reading a site's mirror, with the hub out of reach: a node that joined this fleet
        // before goes on applying what the mirror holds; writes wait for the hub.
        Err(why) if marker.is_some() => {
            *attempt = 0;
            warn!(
                error = %why,
                read_stream = config.read_stream.as_deref().unwrap_or_default(),
                "fleet: the stream's JetStream (the hub) is unreachable; applying the site's \
                 mirror meanwhile, writes refused"
            );
            None
        }
        Err(why) => {
            return Stop::Retry(format!(
                "{why} (this node has not joined the fleet yet, so it waits for the hub)"
            ));
        }
    };
    fleet.set_stopped(None);
    match tail(fleet, &mut read, bucket.as_ref()).await {
        Ok(never) => match never {},
        Err(stop) => stop,
    }
}

/// Makes this node's registry the fleet's, built aside and installed whole: the newest
/// snapshot (or nothing, when the stream still starts at 1) plus every message after it. When
/// the stream is empty, the node's own registry becomes its first message (one node wins:
/// the publish expects an empty stream).
async fn join(
    fleet: &Fleet,
    stream: &mut Stream,
    read: &mut Stream,
    bucket: &ObjectStore,
) -> Result<(), Stop> {
    let inner = &fleet.inner;
    let local = inner.registry.load_full();
    let written = stream.info().await.map_err(retry)?.state.last_sequence;
    if written == 0 && !local.is_empty() {
        let body = tokio::task::spawn_blocking({
            let local = local.clone();
            move || {
                let mut out = Vec::new();
                crate::registry::encode_snapshot(&mut out, &local).map(|()| out)
            }
        })
        .await
        .map_err(retry)?
        .map_err(retry)?;
        match fleet
            .publish(
                message::Kind::Replace,
                message::Encoding::Snapshot,
                body,
                Some(0),
            )
            .await
        {
            Ok(sequence) => info!(
                sequence,
                entries = local.len(),
                "fleet: the stream was empty; this node's registry is its first change"
            ),
            Err(WriteError::Conflict { .. }) => {}
            Err(e) => return Err(Stop::Retry(format!("publishing this node's registry: {e}"))),
        }
    }
    let state = read.info().await.map_err(retry)?.state.clone();
    let (first, last) = (state.first_sequence, state.last_sequence);
    let (mut current, source) = match snapshots::load_newest(bucket, first.saturating_sub(1))
        .await
        .map_err(Stop::Retry)?
    {
        Some(s) => {
            inner.metrics.snapshot_loads.inc();
            let source = format!("snapshot at sequence {}", s.revision());
            (s, source)
        }
        None if first <= 1 || last == 0 => (Snapshot::empty(), "the start of the stream".into()),
        None => {
            return Err(Stop::Stopped(format!(
                "the stream starts at sequence {first} and the bucket holds no snapshot at or \
                 after {}: this node cannot join",
                first - 1
            )));
        }
    };
    if last == 0 && !local.is_empty() {
        return Err(Stop::Retry(
            "the stream is empty and this node's registry is not in it yet".into(),
        ));
    }
    if current.revision() < last {
        let from = current.revision() + 1;
        let consumer = consumer(read, from).await?;
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(BATCH)
            .messages()
            .await
            .map_err(retry)?;
        while current.revision() < last {
            let m = match tokio::time::timeout(Duration::from_secs(10), messages.next()).await {
                Ok(Some(Ok(m))) => m,
                Ok(Some(Err(e))) => return Err(retry(e)),
                Ok(None) | Err(_) => return Err(Stop::Retry("no message while joining".into())),
            };
            let seq = sequence(&m)?;
            if seq <= current.revision() {
                continue;
            }
            if seq != current.revision() + 1 {
                return Err(Stop::Retry(format!(
                    "sequence {} missing while joining (got {seq})",
                    current.revision() + 1
                )));
            }
            current = match decode(&m, seq, Some(bucket)).await? {
                Change::Ops(ops) => current.apply(&ops, seq),
                Change::Replace(s) => s.at_revision(seq),
            };
        }
        let _ = read.delete_consumer(&consumer_name(&consumer)).await;
    }
    let target = current.revision();
    let entries = current.len();
    let answer = inner
        .writer
        .apply_fleet(target, FleetChange::Replace(current), true)
        .await
        .map_err(retry)?;
    match answer.await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(Stop::Retry(format!("installing the fleet's registry: {e}"))),
        Err(_) => return Err(Stop::Retry("registry writer stopped".into())),
    }
    applied(fleet, target, None);
    info!(
        sequence = target,
        entries,
        from = %source,
        "fleet: joined; this node's registry is the fleet's"
    );
    Ok(())
}

async fn consumer(
    read: &Stream,
    from: u64,
) -> Result<jetstream::consumer::Consumer<pull::Config>, Stop> {
    read.create_consumer(pull::Config {
        deliver_policy: DeliverPolicy::ByStartSequence {
            start_sequence: from.max(1),
        },
        ack_policy: AckPolicy::None,
        inactive_threshold: CONSUMER_INACTIVE,
        memory_storage: true,
        ..Default::default()
    })
    .await
    .map_err(|e| Stop::Retry(format!("creating a consumer from sequence {from}: {e}")))
}

fn consumer_name(consumer: &jetstream::consumer::Consumer<pull::Config>) -> String {
    consumer.cached_info().name.clone()
}

fn sequence(m: &Message) -> Result<u64, Stop> {
    m.info()
        .map(|i| i.stream_sequence)
        .map_err(|e| Stop::Retry(format!("a message without stream metadata: {e}")))
}

/// Decodes a message (fetching its object when it names one). A malformed message stops the
/// node: it is never half-applied nor skipped.
async fn decode(m: &Message, seq: u64, bucket: Option<&ObjectStore>) -> Result<Change, Stop> {
    let stopped = |why: String| Stop::Stopped(format!("the message at sequence {seq}: {why}"));
    let header = message::header(m.headers.as_ref()).map_err(stopped)?;
    let body = match (&header.object, bucket) {
        (Some((name, _)), None) => {
            return Err(Stop::Retry(format!(
                "the message at sequence {seq} names object {name}, and the bucket (in the \
                 hub's domain) is unreachable"
            )));
        }
        (Some((name, sha)), Some(bucket)) => snapshots::read_object(bucket, name, Some(sha))
            .await
            .map_err(stopped)?,
        (None, _) => m.payload.to_vec(),
    };
    let decoded = if body.len() > 64 * 1024 {
        tokio::task::spawn_blocking(move || message::decode(&header, &body))
            .await
            .map_err(retry)?
    } else {
        message::decode(&header, &body)
    };
    decoded.map_err(stopped)
}

/// Records `seq` as applied; `stored` is when the stream stored it (for the lag histogram).
fn applied(fleet: &Fleet, seq: u64, stored: Option<time_stored::Stored>) {
    let inner = &fleet.inner;
    inner.applied.send_replace(seq);
    inner.metrics.applied_sequence.set(seq as i64);
    if let Some(stored) = stored {
        inner.metrics.apply_lag.observe(stored.elapsed());
    }
}

/// Applies the stream from the sequence after this node's revision, for as long as it can.
async fn tail(
    fleet: &Fleet,
    read: &mut Stream,
    bucket: Option<&ObjectStore>,
) -> Result<std::convert::Infallible, Stop> {
    let inner = &fleet.inner;
    let state = read.info().await.map_err(retry)?.state.clone();
    let (first, last) = (state.first_sequence, state.last_sequence);
    inner.metrics.stream_sequence.set(last as i64);
    let mut revision = inner.registry.load().revision();
    if revision + 1 < first {
        let Some(bucket) = bucket else {
            return Err(Stop::Retry(format!(
                "the stream starts at sequence {first}, past this node's {revision}, and the \
                 bucket of snapshots (in the hub's domain) is unreachable"
            )));
        };
        let snapshot = snapshots::load_newest(bucket, first - 1)
            .await
            .map_err(Stop::Retry)?
            .ok_or_else(|| {
                Stop::Stopped(format!(
                    "the stream starts at sequence {first}, past this node's {revision}, and the \
                     bucket holds no snapshot at or after {}",
                    first - 1
                ))
            })?;
        let at = snapshot.revision();
        let entries = snapshot.len();
        let answer = inner
            .writer
            .apply_fleet(at, FleetChange::Replace(snapshot), false)
            .await
            .map_err(retry)?;
        match answer.await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(Stop::Retry(format!("installing a snapshot: {e}"))),
            Err(_) => return Err(Stop::Retry("registry writer stopped".into())),
        }
        inner.metrics.snapshot_loads.inc();
        applied(fleet, at, None);
        info!(
            was = revision,
            stream_first = first,
            snapshot = at,
            entries,
            "fleet: the stream no longer holds this node's position; loaded the newest snapshot"
        );
        revision = at;
    }
    info!(
        from = revision + 1,
        stream_last = last,
        behind = last.saturating_sub(revision),
        "fleet: applying the stream"
    );
    if revision >= last {
        inner.synced.send_replace(true);
    }
    let consumer = consumer(read, revision + 1).await?;
    let name = consumer_name(&consumer);
    let result = tail_consumer(fleet, &consumer, read, bucket, revision, last).await;
    // Best effort: gone already if the server went away, and the server drops it when idle.
    let _ = tokio::time::timeout(Duration::from_secs(1), read.delete_consumer(&name)).await;
    result
}

async fn tail_consumer(
    fleet: &Fleet,
    consumer: &jetstream::consumer::Consumer<pull::Config>,
    read: &mut Stream,
    bucket: Option<&ObjectStore>,
    revision: u64,
    sync_target: u64,
) -> Result<std::convert::Infallible, Stop> {
    let inner = &fleet.inner;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(BATCH)
        .heartbeat(Duration::from_secs(2))
        .expires(Duration::from_secs(10))
        .messages()
        .await
        .map_err(retry)?;
    let mut check = tokio::time::interval(Duration::from_millis(250));
    let mut ticks = 0u32;
    // Messages queued to the registry writer and not yet durable, in stream order. The next
    // messages are read and queued while the writer commits earlier ones, so that a node
    // catching up fills each group commit rather than waiting for one per batch it reads.
    let mut pending = std::collections::VecDeque::new();
    let mut queued = revision;
    loop {
        let room = pending.len() < MAX_PENDING;
        let event = tokio::select! {
            biased;
            settled = next_settled(&mut pending) => Ok(settled),
            m = messages.next(), if room => Err(Some(m)),
            _ = check.tick() => Err(None),
        };
        let first = match event {
            Ok((seq, stored, answer)) => {
                if let Err(stop) = settle(fleet, seq, stored, answer) {
                    return Err(drained(fleet, &mut pending, stop).await);
                }
                if seq >= sync_target && !*inner.synced.borrow() {
                    inner.synced.send_replace(true);
                }
                continue;
            }
            Err(Some(Some(Ok(m)))) => m,
            Err(Some(Some(Err(e)))) => {
                let stop = Stop::Retry(format!("consumer: {e}"));
                return Err(drained(fleet, &mut pending, stop).await);
            }
            Err(Some(None)) => {
                let stop = Stop::Retry("consumer ended".into());
                return Err(drained(fleet, &mut pending, stop).await);
            }
            Err(None) => {
                if inner.client.connection_state() != async_nats::connection::State::Connected {
                    let stop = Stop::Retry("disconnected from NATS".into());
                    return Err(drained(fleet, &mut pending, stop).await);
                }
                // Applying a site's mirror without the hub: attach again once it answers.
                if bucket.is_none() {
                    ticks += 1;
                    if ticks % 8 == 0 && hub_answers(fleet).await {
                        let stop = Stop::Retry("the hub answers again; attaching".into());
                        return Err(drained(fleet, &mut pending, stop).await);
                    }
                }
                continue;
            }
        };
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match messages.next().now_or_never() {
                Some(Some(Ok(m))) => batch.push(m),
                _ => break,
            }
        }
        if let Err(stop) = queue_batch(fleet, read, bucket, batch, &mut queued, &mut pending).await
        {
            return Err(drained(fleet, &mut pending, stop).await);
        }
    }
}

/// Messages queued to the registry writer at most, not yet durable.
const MAX_PENDING: usize = 4 * BATCH;

/// A message queued to the registry writer: its sequence, when it was stored, the answer.
type Pending = (
    u64,
    Option<time_stored::Stored>,
    tokio::sync::oneshot::Receiver<Result<std::sync::Arc<Snapshot>, WriteError>>,
);
type Answer =
    Result<Result<std::sync::Arc<Snapshot>, WriteError>, tokio::sync::oneshot::error::RecvError>;

/// The writer's answer for the oldest pending message (never resolves when none is). Safe to
/// cancel: the message leaves `pending` only with its answer.
async fn next_settled(
    pending: &mut std::collections::VecDeque<Pending>,
) -> (u64, Option<time_stored::Stored>, Answer) {
    let answer = match pending.front_mut() {
        Some((_, _, answer)) => answer.await,
        None => std::future::pending().await,
    };
    match pending.pop_front() {
        Some((seq, stored, _)) => (seq, stored, answer),
        None => std::future::pending().await,
    }
}

/// Records a message the writer answered for: applied (and durable), or why not.
fn settle(
    fleet: &Fleet,
    seq: u64,
    stored: Option<time_stored::Stored>,
    answer: Answer,
) -> Result<(), Stop> {
    match answer {
        Ok(Ok(snapshot)) => {
            applied(fleet, seq, stored);
            let every = fleet.inner.config.snapshot_every;
            if every > 0 && seq % every == 0 {
                let fleet = fleet.clone();
                tokio::spawn(async move { fleet.write_snapshot(snapshot).await });
            }
            Ok(())
        }
        Ok(Err(e @ WriteError::Storage(_))) => Err(Stop::Retry(format!("sequence {seq}: {e}"))),
        Ok(Err(e)) => Err(Stop::Stopped(format!(
            "the registry refused sequence {seq}: {e}"
        ))),
        Err(_) => Err(Stop::Retry("registry writer stopped".into())),
    }
}

/// Waits for every pending message (what the writer applied is recorded as applied, so
/// that writes waiting for it are answered), then answers why the session ends: the first
/// pending message that failed, or `stop`.
async fn drained(
    fleet: &Fleet,
    pending: &mut std::collections::VecDeque<Pending>,
    stop: Stop,
) -> Stop {
    while let Some((seq, stored, answer)) = pending.pop_front() {
        if let Err(failed) = settle(fleet, seq, stored, answer.await) {
            return failed;
        }
    }
    stop
}

/// Whether the stream's JetStream (the hub, through the leaf) answers now.
async fn hub_answers(fleet: &Fleet) -> bool {
    let inner = &fleet.inner;
    matches!(
        tokio::time::timeout(
            Duration::from_secs(1),
            inner.js.get_stream(&inner.config.stream)
        )
        .await,
        Ok(Ok(_))
    )
}

/// Queues every message of `batch` to the registry writer, after `queued` (the last sequence
/// queued), onto `pending`. Stops at the first that cannot be applied, after queuing what came
/// before it: never a gap, never a message half-decoded.
async fn queue_batch(
    fleet: &Fleet,
    read: &mut Stream,
    bucket: Option<&ObjectStore>,
    batch: Vec<Message>,
    queued: &mut u64,
    pending: &mut std::collections::VecDeque<Pending>,
) -> Result<(), Stop> {
    let inner = &fleet.inner;
    for m in batch {
        let seq = sequence(&m)?;
        if let Ok(info) = m.info() {
            inner
                .metrics
                .stream_sequence
                .set((seq + info.pending) as i64);
        }
        if seq <= *queued {
            continue;
        }
        if seq != *queued + 1 {
            return Err(match read.info().await {
                Ok(info) if info.state.first_sequence > *queued + 1 => Stop::Retry(format!(
                    "the stream no longer holds sequence {} (it starts at {})",
                    *queued + 1,
                    info.state.first_sequence
                )),
                Ok(_) => Stop::Stopped(format!(
                    "sequence {} is missing from the stream (the next is {seq}); a change is \
                     never skipped",
                    *queued + 1
                )),
                Err(e) => retry(e),
            });
        }
        let stored = m
            .info()
            .ok()
            .map(|i| time_stored::Stored::at(i.published.unix_timestamp_nanos()));
        let change = match decode(&m, seq, bucket).await? {
            Change::Ops(ops) => FleetChange::Ops(ops),
            Change::Replace(s) => FleetChange::Replace(s),
        };
        let answer = inner
            .writer
            .apply_fleet(seq, change, false)
            .await
            .map_err(retry)?;
        pending.push_back((seq, stored, answer));
        *queued = seq;
    }
    Ok(())
}

/// When a message was stored, from the stream's timestamp, for the lag histogram.
mod time_stored {
    pub(super) struct Stored(i128);

    impl Stored {
        pub(super) fn at(unix_nanos: i128) -> Stored {
            Stored(unix_nanos)
        }

        /// Seconds since, never negative (clocks of server and node may differ a little).
        pub(super) fn elapsed(&self) -> f64 {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos() as i128;
            ((now - self.0).max(0) as f64) / 1e9
        }
    }
}
