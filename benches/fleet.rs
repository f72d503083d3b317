//! Fleet benchmark (not a timed test): a real `nats-server -js` and real icp-gate processes on
//! loopback.
//!
//! 1. `PUT` latency on node A: publish ack + local apply, sequential.
//! 2. Convergence: changes published to the stream at a fixed rate (1 000 and 10 000 a second,
//!    as a filing system publishing directly would), and the time from each publish ack to node
//!    B showing that revision (B's `/v1/registry` polled every millisecond, so the figures are
//!    up to about a millisecond high).
//! 3. A new node joining a fleet of `FLEET_BENCH_ENTRIES` entries (default 1 000 000; the issue's
//!    figure is 10 000 000): process start until `/readyz` answers 200.
//! 4. Catch-up: node B stopped (SIGKILL), `FLEET_BENCH_CATCH_UP` changes (default 10 000, one
//!    `PUT` each) published to the stream meanwhile, B started again: process start until
//!    `/readyz` (its own registry loaded from `state_dir`) and until its
//!    `icp_gate_fleet_applied_sequence` reaches the stream's last sequence (`/metrics` polled
//!    every 2 ms, so up to about 2 ms high).
//!
//! `cargo bench --bench fleet`. Needs `nats-server` (Debian package `nats-server`).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_icp-gate");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn nats_server() -> PathBuf {
    [
        "/usr/sbin/nats-server",
        "/usr/bin/nats-server",
        "/usr/local/bin/nats-server",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
    .expect("nats-server not found: apt-get install -y nats-server")
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts icp-gate on `dir` (config written there); answers the process and its admin address.
fn node(dir: &Path, nats: &str, name: &str, seed: Option<&Path>) -> (Killed, SocketAddr) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("admin.token"), "t\n").unwrap();
    let seed = seed
        .map(|s| format!("seed = \"{}\"\n", s.display()))
        .unwrap_or_default();
    let config = dir.join("icp-gate.toml");
    std::fs::write(
        &config,
        format!(
            "[registry]\nstate_dir = \"state\"\n{seed}\n\
             [[listener]]\nname = \"http\"\nbind = \"127.0.0.1:0\"\nkind = \"http\"\n\
             [[route]]\ndst = \"127.0.0.1/32\"\nmainland = true\nhttp_origin = \"127.0.0.1:9\"\n\
             [admin]\nbind = \"127.0.0.1:0\"\ntoken_file = \"admin.token\"\n\
             [fleet]\nservers = [\"{nats}\"]\nnode = \"{name}\"\nsnapshot_every = 0\n"
        ),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args(["run", "--log-format", "json", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn,icp_gate=info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("\"admin listening\"") {
                let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                let _ = tx.send(v["addr"].as_str().unwrap().parse::<SocketAddr>().unwrap());
            }
        }
    });
    let admin = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("admin listening");
    (Killed(child), admin)
}

/// One request on a fresh connection; the status and the body.
async fn request(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: a\r\nauthorization: Bearer t\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// `icp_gate_fleet_applied_sequence` from `/metrics` (cheap: no digest).
async fn applied_sequence(admin: SocketAddr) -> u64 {
    let (_, body) = request(admin, "GET", "/metrics", "").await;
    body.lines()
        .find_map(|l| {
            l.strip_prefix("icp_gate_fleet_applied_sequence ")?
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map_or(0, |v| v as u64)
}

/// Publishes `n` one-`PUT` changes straight to the stream, at most 256 unacknowledged; answers
/// the last sequence.
async fn publish_changes(js: &async_nats::jetstream::Context, tag: &str, n: usize) -> u64 {
    let mut pending = std::collections::VecDeque::new();
    let mut last = 0;
    for i in 0..n {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Icp-Gate-Format", "1");
        h.insert("Icp-Gate-Change", "ops");
        let body = format!(
            "{{\"op\":\"put\",\"entry\":{}}}\n",
            entry(&format!("{tag}-{i}.cn"))
        );
        pending.push_back(
            js.publish_with_headers("icp.registry.changes", h, body.into())
                .await
                .unwrap(),
        );
        if pending.len() >= 256 {
            last = pending.pop_front().unwrap().await.unwrap().sequence;
        }
    }
    while let Some(ack) = pending.pop_front() {
        last = ack.await.unwrap().sequence;
    }
    last
}

async fn revision(admin: SocketAddr) -> u64 {
    let (_, body) = request(admin, "GET", "/v1/registry", "").await;
    serde_json::from_str::<serde_json::Value>(&body)
        .map_or(0, |v| v["revision"].as_u64().unwrap_or(0))
}

async fn ready(admin: SocketAddr, within: Duration) {
    let deadline = Instant::now() + within;
    while request(admin, "GET", "/readyz", "").await.0 != 200 {
        assert!(Instant::now() < deadline, "not ready within {within:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn entry(domain: &str) -> String {
    format!(
        r#"{{"domain":"{domain}","icp":"京ICP备12345678号-1","status":"filed","access_here":true}}"#
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let entries: usize = std::env::var("FLEET_BENCH_ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _nats = Killed(
        Command::new(nats_server())
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir.path().join("js"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let url = format!("nats://127.0.0.1:{port}");
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(Duration::from_millis(20));
    }

    // The fleet's registry: node A bootstraps the stream with a seed of `entries` entries.
    let seed = dir.path().join("seed.ndjson");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&seed).unwrap());
        for i in 0..entries {
            writeln!(f, "{}", entry(&format!("d{i:08}.com.cn"))).unwrap();
        }
    }
    let started = Instant::now();
    let (_a, a) = node(&dir.path().join("a"), &url, "a", Some(&seed));
    ready(a, Duration::from_secs(600)).await;
    println!(
        "node A seeded the stream with {entries} entries: {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    let (mut b_process, mut b) = node(&dir.path().join("b"), &url, "b", None);
    ready(b, Duration::from_secs(600)).await;
    println!(
        "node B joined a fleet of {entries} entries (download + load) until /readyz: {:?}",
        started.elapsed()
    );

    // 1. PUT latency on A, sequential.
    let mut put = Vec::new();
    for i in 0..2000 {
        let d = format!("p{i}.cn");
        let t = Instant::now();
        let (status, body) =
            request(a, "PUT", &format!("/v1/registry/entries/{d}"), &entry(&d)).await;
        assert_eq!(status, 200, "{body}");
        put.push(t.elapsed());
    }
    put.sort();
    println!(
        "PUT on a fleet node (publish ack + local apply), 2000 sequential: p50 {:?} p99 {:?}",
        percentile(&put, 0.5),
        percentile(&put, 0.99)
    );

    // 2. Convergence at a fixed rate, published straight to the stream. B's first
    // `/v1/registry` computes its digest (a pass over every entry); done before measuring.
    let digest_started = Instant::now();
    revision(b).await;
    println!(
        "first digest of {entries} entries on B: {:?}",
        digest_started.elapsed()
    );
    let client = async_nats::connect(&url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    for rate in [1_000u64, 10_000] {
        let seconds = 3;
        let total = rate * seconds;
        let acks: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::default();
        let seen: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::default();
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let poller = {
            let (seen, done) = (seen.clone(), done.clone());
            tokio::spawn(async move {
                // Every millisecond: polling flat out would take the CPU B applies with.
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    let r = revision(b).await;
                    seen.lock().unwrap().push((r, Instant::now()));
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
        };
        let start = Instant::now();
        let mut pending = Vec::new();
        for i in 0..total {
            let due = start + Duration::from_nanos(i * 1_000_000_000 / rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                tokio::time::sleep(wait).await;
            }
            let mut h = async_nats::HeaderMap::new();
            h.insert("Icp-Gate-Format", "1");
            h.insert("Icp-Gate-Change", "ops");
            let body = format!(
                "{{\"op\":\"put\",\"entry\":{}}}\n",
                entry(&format!("r{rate}-{i}.cn"))
            );
            let ack = js
                .publish_with_headers("icp.registry.changes", h, body.into())
                .await
                .unwrap();
            let acks = acks.clone();
            pending.push(tokio::spawn(async move {
                let ack = ack.await.unwrap();
                acks.lock().unwrap().push((ack.sequence, Instant::now()));
            }));
        }
        for p in pending {
            p.await.unwrap();
        }
        let achieved = total as f64 / start.elapsed().as_secs_f64();
        let last = acks.lock().unwrap().iter().map(|(s, _)| *s).max().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while seen.lock().unwrap().last().is_none_or(|(r, _)| *r < last) {
            assert!(Instant::now() < deadline, "B did not reach {last}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        poller.await.unwrap();
        let seen = seen.lock().unwrap().clone();
        let mut lags: Vec<Duration> = acks
            .lock()
            .unwrap()
            .iter()
            .map(|(seq, acked)| {
                let i = seen.partition_point(|(r, _)| r < seq);
                seen[i].1.saturating_duration_since(*acked)
            })
            .collect();
        lags.sort();
        println!(
            "convergence at {rate}/s ({achieved:.0}/s achieved, {total} changes): ack -> applied on B \
             p50 {:?} p99 {:?} max {:?} (B polled {} times)",
            percentile(&lags, 0.5),
            percentile(&lags, 0.99),
            lags.last().unwrap(),
            seen.len()
        );
    }

    // 4. Catch-up of a restarted node.
    let changes: usize = std::env::var("FLEET_BENCH_CATCH_UP")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    for round in 0..3 {
        let was = applied_sequence(b).await;
        drop(b_process);
        let published = Instant::now();
        let last = publish_changes(&js, &format!("c{round}"), changes).await;
        let published = published.elapsed();
        let started = Instant::now();
        let (process, b_again) = node(&dir.path().join("b"), &url, "b", None);
        ready(b_again, Duration::from_secs(600)).await;
        let serving = started.elapsed();
        let deadline = Instant::now() + Duration::from_secs(120);
        while applied_sequence(b_again).await < last {
            assert!(Instant::now() < deadline, "B did not catch up to {last}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let caught_up = started.elapsed();
        println!(
            "catch-up {round}: B down at sequence {was}, {changes} changes published meanwhile \
             ({published:?}); B restarted: /readyz after {serving:?}, applied {last} after \
             {caught_up:?} ({:?} after /readyz)",
            caught_up - serving
        );
        b_process = process;
        b = b_again;
    }
}
