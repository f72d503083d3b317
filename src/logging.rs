//! Logs: the access log (one line per decision, SPEC §8) and diagnostics, both through `tracing`.
//!
//! `run --log-format json` writes one JSON object per line with the access fields at the top level
//! (`ts`, `listener`, `client`, `dst`, `host`, `decision`, `reason`, `status`, `request_id`), which
//! is what log shippers expect; the default text format is for humans. `RUST_LOG` filters as usual;
//! access lines have the target `access` (`RUST_LOG=info,access=off` silences them).

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::decision::{Decision, Reason};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber. Default filter: `info`.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    // A second init (tests) is harmless.
    let _ = match format {
        LogFormat::Text => builder.with_target(true).try_init(),
        LogFormat::Json => builder.event_format(JsonLine).try_init(),
    };
}

/// One decided request or connection.
pub struct Access<'a> {
    pub listener: &'a str,
    pub client: SocketAddr,
    pub dst: SocketAddr,
    /// The normalised host, or the raw one when it did not parse (empty when absent).
    pub host: &'a str,
    pub decision: Decision,
    pub reason: Reason,
    /// HTTP status sent to the client (`None` on TLS listeners).
    pub status: Option<u16>,
    pub request_id: &'a str,
    pub duration: Duration,
}

impl Access<'_> {
    pub fn log(&self) {
        tracing::info!(
            target: "access",
            listener = self.listener,
            client = %self.client.ip().to_canonical(),
            dst = %self.dst,
            host = self.host,
            decision = self.decision.as_str(),
            reason = self.reason.as_str(),
            status = self.status,
            request_id = self.request_id,
            duration_us = self.duration.as_micros() as u64,
        );
    }
}

/// A request id: a per-process random prefix and a scrambled counter, 20 hex digits. Unique
/// within a process, unlikely to repeat across processes, and cheap (no syscall, no lock).
#[derive(Clone, Copy)]
pub struct RequestId([u8; 20]);

static ID_SEED: LazyLock<u64> = LazyLock::new(|| RandomState::new().build_hasher().finish());
static ID_COUNTER: AtomicU64 = AtomicU64::new(0);

impl RequestId {
    pub fn next() -> RequestId {
        let n = ID_COUNTER.fetch_add(1, Ordering::Relaxed);
        // An odd multiplier is a bijection on u64, so ids stay unique while looking random.
        let scrambled = n.wrapping_add(*ID_SEED).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let prefix = (*ID_SEED >> 48) as u16;
        let mut out = [0u8; 20];
        hex(&mut out[..4], u64::from(prefix), 4);
        hex(&mut out[4..], scrambled, 16);
        RequestId(out)
    }

    pub fn as_str(&self) -> &str {
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
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut obj = serde_json::Map::new();
        obj.insert(
            "ts".into(),
            humantime::format_rfc3339_micros(SystemTime::now())
                .to_string()
                .into(),
        );
        obj.insert("level".into(), meta.level().as_str().into());
        obj.insert("target".into(), meta.target().into());
        event.record(&mut JsonFields(&mut obj));
        writeln!(writer, "{}", serde_json::Value::Object(obj))
    }
}

struct JsonFields<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl JsonFields<'_> {
    fn put(&mut self, field: &Field, value: serde_json::Value) {
        let name = match field.name() {
            "message" => "msg",
            other => other,
        };
        self.0.insert(name.to_string(), value);
    }
}

impl Visit for JsonFields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, format!("{value:?}").into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, value.to_string().into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

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
