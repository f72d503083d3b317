//! Logs: the access log (one line per decision, docs/operations.md#logs) and diagnostics, both through `tracing`.
//!
//! `run --log-format json` writes one JSON object per line with the access fields at the top level
//! (`ts`, `listener`, `client`, `dst`, `host`, `decision`, `reason`, `status`, `request_id`), which
//! is what log shippers expect; the default text format is for humans. `RUST_LOG` filters as usual;
//! access lines have the target `access` (`RUST_LOG=info,access=off` silences them).

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::io::{BufWriter, IsTerminal};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, OnceLock};
use std::time::{Duration, SystemTime};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::core::decision::{Decision, Reason};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Lines the log thread may hold before new ones are dropped (~5 MB of access lines): a log
/// consumer that stalls for this long costs log lines, never a stalled data path.
const LOG_QUEUE_LINES: usize = 16 * 1024;

/// Lines dropped because the log queue was full (`icp_gate_log_lines_dropped_total`).
static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// How many log lines have been dropped since start because the queue was full.
pub(crate) fn dropped_lines() -> u64 {
    DROPPED.get().map_or(0, |d| d.dropped_lines() as u64)
}

/// Keeps the log thread; dropping it writes out what is queued.
#[must_use = "dropping the guard stops the log thread"]
pub(crate) struct LogGuard {
    _worker: Option<WorkerGuard>,
}

/// Installs the global subscriber. Default filter: `info`. Lines are formatted where they
/// happen and written by a thread of their own, in batches (one write(2) per batch, not per
/// line): with the access log on, writing each line from the data path cost a system call per
/// request, and a slow reader of stderr (journald, a full pipe) stalled every connection of the
/// thread that blocked on it.
pub(crate) fn init(format: LogFormat) -> LogGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .thread_name("icp-gate-log")
        .finish(BufWriter::with_capacity(64 * 1024, std::io::stderr()));
    let dropped = writer.error_counter();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer);
    let installed = match format {
        LogFormat::Text => builder.with_target(true).try_init(),
        LogFormat::Json => builder.event_format(JsonLine).try_init(),
    };
    // A second init (tests) keeps the first subscriber and its thread.
    match installed {
        Ok(()) => {
            let _ = DROPPED.set(dropped);
            LogGuard {
                _worker: Some(guard),
            }
        }
        Err(_) => LogGuard { _worker: None },
    }
}

/// One decided request or connection.
pub(crate) struct Access<'a> {
    pub listener: &'a str,
    pub client: SocketAddr,
    pub dst: SocketAddr,
    /// The normalised host, or the raw one when it did not parse (empty when absent).
    pub host: &'a str,
    pub decision: Decision,
    pub reason: Reason,
    /// HTTP status sent to the client (`None` on TLS listeners).
    pub status: Option<u16>,
    /// Turned into text only when the access log is on.
    pub request_id: &'a RequestId,
    pub duration: Duration,
}

impl Access<'_> {
    pub(crate) fn log(&self) {
        tracing::info!(
            target: "access",
            listener = self.listener,
            client = %self.client.ip().to_canonical(),
            dst = %self.dst,
            host = self.host,
            decision = self.decision.as_str(),
            reason = self.reason.as_str(),
            status = self.status,
            request_id = self.request_id.as_str(),
            duration_us = self.duration.as_micros() as u64,
        );
    }
}

/// A request id: a per-process random prefix and a scrambled counter, 20 hex digits. Unique
/// within a process, unlikely to repeat across processes, and cheap (no syscall, no lock).
#[derive(Clone, Copy)]
pub(crate) struct RequestId([u8; 20]);

static ID_SEED: LazyLock<u64> = LazyLock::new(|| RandomState::new().build_hasher().finish());
static ID_COUNTER: AtomicU64 = AtomicU64::new(0);

impl RequestId {
    pub(crate) fn next() -> RequestId {
        let n = ID_COUNTER.fetch_add(1, Ordering::Relaxed);
        // An odd multiplier is a bijection on u64, so ids stay unique while looking random.
        let scrambled = n.wrapping_add(*ID_SEED).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let prefix = (*ID_SEED >> 48) as u16;
        let mut out = [0u8; 20];
        hex(&mut out[..4], u64::from(prefix), 4);
        hex(&mut out[4..], scrambled, 16);
        RequestId(out)
    }

    pub(crate) fn as_str(&self) -> &str {
        // Only ASCII hex digits are ever written.
        std::str::from_utf8(&self.0).unwrap_or("0")
    }
}

fn hex(out: &mut [u8], mut v: u64, digits: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for i in (0..digits).rev() {
        out[i] = HEX[(v & 15) as usize];
        v >>= 4;
    }
}

/// Formats an event as one JSON object: `ts`, `level`, `target`, then every field (the message,
/// if any, as `msg`).
struct JsonLine;

impl<S, N> FormatEvent<S, N> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    /// Writes the object straight out, key by key: with the access log on this runs once per
    /// request, and building a `serde_json::Value` map first cost an allocation per field.
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let ts = humantime::format_rfc3339_micros(SystemTime::now());
        write!(
            writer,
            "{{\"ts\":\"{ts}\",\"level\":\"{}\",\"target\":",
            meta.level()
        )?;
        JsonString::quoted(&mut writer, format_args!("{}", meta.target()))?;
        let mut fields = JsonFields {
            out: &mut writer,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        writeln!(writer, "}}")
    }
}

/// Writes what is formatted into it as the inside of a JSON string, escaped.
struct JsonString<'w, W: fmt::Write>(&'w mut W);

impl<W: fmt::Write> JsonString<'_, W> {
    fn quoted(out: &mut W, value: fmt::Arguments<'_>) -> fmt::Result {
        out.write_char('"')?;
        fmt::write(&mut JsonString(out), value)?;
        out.write_char('"')
    }
}

impl<W: fmt::Write> fmt::Write for JsonString<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut plain = 0;
        for (i, b) in s.bytes().enumerate() {
            let escaped = match b {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0..0x20 | 0x7f => "",
                _ => continue,
            };
            self.0.write_str(&s[plain..i])?;
            if escaped.is_empty() {
                write!(self.0, "\\u{b:04x}")?;
            } else {
                self.0.write_str(escaped)?;
            }
            plain = i + 1;
        }
        self.0.write_str(&s[plain..])
    }
}

/// Writes each field as `,"name":value`; `message` is named `msg`.
struct JsonFields<'w, W: fmt::Write> {
    out: &'w mut W,
    result: fmt::Result,
}

impl<W: fmt::Write> JsonFields<'_, W> {
    fn put(&mut self, field: &Field, value: fmt::Arguments<'_>, quoted: bool) {
        if self.result.is_err() {
            return;
        }
        let name = match field.name() {
            "message" => "msg",
            other => other,
        };
        self.result = write!(self.out, ",\"{name}\":").and_then(|()| {
            if quoted {
                JsonString::quoted(self.out, value)
            } else {
                self.out.write_fmt(value)
            }
        });
    }
}

impl<W: fmt::Write> Visit for JsonFields<'_, W> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, format_args!("{value}"), true);
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, format_args!("{value}"), false);
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, format_args!("{value}"), false);
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        if value.is_finite() {
            self.put(field, format_args!("{value}"), false);
        } else {
            self.put(field, format_args!("null"), false);
        }
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, format_args!("{value}"), false);
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, format_args!("{value:?}"), true);
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, format_args!("{value}"), true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::{Arc, Mutex};

    /// The JSON lines [`JsonLine`] writes for what `emit` logs.
    fn json_lines(emit: impl FnOnce()) -> Vec<serde_json::Value> {
        let out = Arc::new(Mutex::new(Vec::new()));
        let sink = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || Capture(sink.clone()))
            .event_format(JsonLine)
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_lines_carry_every_field_escaped() {
        let error = std::io::Error::other("disk \"full\"");
        let lines = json_lines(|| {
            tracing::info!(target: "access", host = "a\"b\\c\n\u{1}\u{7f}é例", status = 403u16, "");
            tracing::warn!(
                n = -3i64,
                ratio = 0.5f64,
                nan = f64::NAN,
                ok = true,
                addr = ?"x\ty",
                error = &error as &(dyn std::error::Error + 'static),
                "accept failed"
            );
        });
        assert_eq!(lines.len(), 2);
        let access = &lines[0];
        assert_eq!(access["level"], "INFO");
        assert_eq!(access["target"], "access");
        assert_eq!(access["host"], "a\"b\\c\n\u{1}\u{7f}é例");
        assert_eq!(access["status"], 403);
        assert!(access["ts"].as_str().unwrap().ends_with('Z'), "{access}");
        let warn = &lines[1];
        assert_eq!(warn["level"], "WARN");
        assert_eq!(warn["msg"], "accept failed");
        assert_eq!(warn["n"], -3);
        assert_eq!(warn["ratio"], 0.5);
        assert_eq!(warn["nan"], serde_json::Value::Null);
        assert_eq!(warn["ok"], true);
        assert_eq!(warn["addr"], "\"x\\ty\"");
        assert_eq!(warn["error"], "disk \"full\"");
    }

    proptest::proptest! {
        #[test]
        fn any_string_survives_json_escaping(s in ".*") {
            let mut out = String::new();
            JsonString::quoted(&mut out, format_args!("{s}")).unwrap();
            let back: String = serde_json::from_str(&out).unwrap();
            proptest::prop_assert_eq!(back, s);
        }
    }

    #[test]
    fn request_ids_are_unique_hex() {
        let ids: HashSet<String> = (0..10_000)
            .map(|_| RequestId::next().as_str().to_string())
            .collect();
        assert_eq!(ids.len(), 10_000);
        assert!(
            ids.iter()
                .all(|id| id.len() == 20 && id.bytes().all(|b| b.is_ascii_hexdigit()))
        );
    }
}
