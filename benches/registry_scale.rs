//! Registry at China-scale: 10 million entries (docs/performance.md#registry-at-10-million-entries).
//!
//! Measures, on this machine, in one run:
//! - building the snapshot and its heap size per entry;
//! - the real binary's cold start from `state_dir` until `/readyz` answers 200, and its RSS;
//! - lookup cost (normalised host, longest match) idle and under a concurrent update stream;
//! - single PUT acknowledgement latency (p50/p99, each fsynced), sequential and with 32
//!   concurrent writers (group commit);
//! - batch throughput (10 000-op batches).
//!
//! `cargo bench --bench registry_scale` (10 M entries, a few minutes);
//! `ICP_GATE_BENCH_ENTRIES=1000000` for a quicker run.

use std::hint::black_box;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use icp_gate::core::decision::{HostInput, Policy, decide};
use icp_gate::registry::{Entry, Op, Registry, SnapshotBuilder, Status, write_snapshot};

const BIN: &str = env!("CARGO_BIN_EXE_icp-gate");

fn entry(i: u64) -> Entry {
    Entry {
        domain: format!("d{i:08}.com.cn"),
        icp: format!("京ICP备{:08}号-1", i % 100_000_000),
        status: Status::Filed,
        access_here: i % 10 != 0,
    }
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// Current and peak resident memory of `pid`.
fn rss(pid: u32) -> String {
    format!(
        "{} MiB (peak {} MiB)",
        rss_kib(pid, "VmRSS:") / 1024,
        rss_kib(pid, "VmHWM:") / 1024
    )
}

fn p50_p99(mut lat: Vec<Duration>) -> String {
    lat.sort();
    format!(
        "p50 {:.2} ms, p99 {:.2} ms",
        ms(percentile(&lat, 0.5)),
        ms(percentile(&lat, 0.99))
    )
}

/// PUTs the entries numbered `ids` one after another over one connection; the time each took to
/// be acknowledged.
async fn put_each(admin: SocketAddr, ids: std::ops::Range<u64>) -> Vec<Duration> {
    let mut client = Admin::connect(admin).await;
    let mut lat = Vec::new();
    for i in ids {
        let e = entry(i);
        let t = Instant::now();
        let status = client
            .send(
                "PUT",
                &format!("/v1/registry/entries/{}", e.domain),
                serde_json::to_string(&e).unwrap(),
            )
            .await;
        lat.push(t.elapsed());
        assert_eq!(status, 200);
    }
    lat
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let n: u64 = std::env::var("ICP_GATE_BENCH_ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let mut rows: Vec<(String, String)> = Vec::new();

    // Build and persist.
    let t = Instant::now();
    let mut b = SnapshotBuilder::new();
    for i in 0..n {
        b.push_entry(&entry(i)).unwrap();
    }
    let snapshot = Arc::new(b.finish(0));
    let built = t.elapsed();
    rows.push((
        "snapshot build".into(),
        format!(
            "{:.2} s ({:.0} ns/entry)",
            built.as_secs_f64(),
            built.as_nanos() as f64 / n as f64
        ),
    ));
    rows.push((
        "snapshot heap".into(),
        format!(
            "{:.0} MiB ({:.1} bytes/entry)",
            snapshot.heap_bytes() as f64 / 1048576.0,
            snapshot.heap_bytes() as f64 / n as f64
        ),
    ));
    let t = Instant::now();
    write_snapshot(&state, &snapshot).unwrap();
    let file = std::fs::metadata(state.join("snapshot.bin")).unwrap().len();
    rows.push((
        "snapshot.bin write".into(),
        format!(
            "{:.2} s, {:.0} MiB",
            t.elapsed().as_secs_f64(),
            file as f64 / 1048576.0
        ),
    ));

    // Lookups idle and under a stream of single-entry updates published one by one.
    let policy = policy();
    let registry = Arc::new(Registry::new((*snapshot).clone()));
    let hosts: Vec<String> = (0..200_000u64)
        .map(|k| format!("www.d{:08}.com.cn", (k * 7919) % n))
        .collect();
    let idle = lookup_ns(&registry, &policy, &hosts, Duration::from_secs(3));
    // Under updates: single-entry snapshots published one after another from the other core,
    // first at 10 000 a second (above the write path's measured peak publish rate, which fsync
    // and group commit bound), then as fast as one core can build them.
    let paced = under_updates(&registry, &policy, &hosts, n, Some(10_000));
    let flat_out = under_updates(&registry, &policy, &hosts, n, None);
    // Control: the other core busy with unrelated memory traffic, no update at all. The machine's
    // two cores share caches and memory bandwidth, so some slowdown is not the registry's.
    let control = {
        let stop = Arc::new(AtomicBool::new(false));
        let busy = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u64; 8 << 20];
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    i = (i + 4099) & (buf.len() - 1);
                    buf[i] = buf[i].wrapping_add(1);
                }
                black_box(buf);
            })
        };
        let ns = lookup_ns(&registry, &policy, &hosts, Duration::from_secs(3));
        stop.store(true, Ordering::Relaxed);
        let _ = busy.join();
        ns
    };
    rows.push(("lookup, idle".into(), format!("{idle:.0} ns/op")));
    for (what, (ns, rate)) in [
        ("lookup, under 10k updates/s", paced),
        ("lookup, under updates flat out", flat_out),
    ] {
        rows.push((
            what.into(),
            format!(
                "{ns:.0} ns/op ({:.2}x idle; {rate:.0} updates/s published meanwhile)",
                ns / idle
            ),
        ));
    }
    rows.push((
        "lookup, other core busy (control)".into(),
        format!("{control:.0} ns/op ({:.2}x idle)", control / idle),
    ));
    drop(registry);

    // The real binary: cold start from state_dir, then the write path over the admin API.
    std::fs::write(dir.path().join("admin.token"), "bench\n").unwrap();
    let config = dir.path().join("icp-gate.toml");
    std::fs::write(
        &config,
        format!(
            "[registry]\nstate_dir = \"{}\"\n\n[[listener]]\nname = \"http\"\nbind = \"127.0.0.1:0\"\nkind = \"http\"\n\n[[route]]\ndst = \"127.0.0.0/8\"\nmainland = true\nhttp_origin = \"127.0.0.1:9\"\n\n[admin]\nbind = \"127.0.0.1:0\"\ntoken_file = \"admin.token\"\n",
            state.display()
        ),
    )
    .unwrap();
    let started = Instant::now();
    let mut child = KillOnDrop(
        Command::new(BIN)
            .args(["run", "--log-format", "json", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id();
    let mut lines = BufReader::new(child.0.stderr.take().unwrap()).lines();
    let admin: SocketAddr = loop {
        let line = lines.next().expect("binary exited").unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v["msg"] == "admin listening" {
            break v["addr"].as_str().unwrap().parse().unwrap();
        }
    };
    // Warnings and errors from the binary show up in the bench output.
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if !line.contains("\"level\":\"INFO\"") {
                eprintln!("icp-gate: {line}");
            }
        }
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        loop {
            if get(admin, "/readyz").await == 200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let ready = started.elapsed();
    rows.push((
        "cold start to /readyz".into(),
        format!("{:.2} s", ready.as_secs_f64()),
    ));
    rows.push(("RSS when ready".into(), rss(pid)));

    rt.block_on(async {
        let lat = put_each(admin, n..n + 2000).await;
        rows.push(("PUT ack, sequential".into(), p50_p99(lat)));

        let t = Instant::now();
        let writers: Vec<_> = (0..32u64)
            .map(|w| {
                let first = 2 * n + w * 1000;
                tokio::spawn(put_each(admin, first..first + 100))
            })
            .collect();
        let mut lat = Vec::new();
        for w in writers {
            lat.extend(w.await.unwrap());
        }
        let acks = lat.len() as f64 / t.elapsed().as_secs_f64();
        rows.push((
            "PUT ack, 32 concurrent writers".into(),
            format!("{}, {acks:.0} acks/s", p50_p99(lat)),
        ));

        let mut client = Admin::connect(admin).await;
        let batches = 20u64;
        let per = 10_000u64;
        let t = Instant::now();
        for b in 0..batches {
            let body: String = (0..per)
                .map(|i| {
                    let e = entry(3 * n + b * per + i);
                    format!("{}\n", serde_json::json!({"op": "put", "entry": e}))
                })
                .collect();
            assert_eq!(client.send("POST", "/v1/registry/batch", body).await, 200);
        }
        let took = t.elapsed();
        rows.push((
            "batch throughput (10 000-op batches)".into(),
            format!("{:.0} ops/s", (batches * per) as f64 / took.as_secs_f64()),
        ));
    });
    rows.push(("RSS after the writes".into(), rss(pid)));
    drop(child);

    println!("\nregistry at {n} entries\n");
    println!("| measure | figure |\n|---|---|");
    for (k, v) in rows {
        println!("| {k} | {v} |");
    }
}

/// The binary under test, killed however the bench ends (a failed assertion included).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn policy() -> Policy {
    let route = icp_gate::config::RouteConfig {
        dst: "10.0.0.0/8".parse().unwrap(),
        mainland: true,
        x_forwarded_for: true,
        send_proxy_protocol: None,
        mode: None,
        require_access_here: true,
        http_origin: None,
        tls_origin: None,
        quic_origin: None,
    };
    Policy::new(
        icp_gate::core::routes::RouteTable::new(vec![route]),
        &icp_gate::config::PolicyConfig {
            mode: icp_gate::config::Mode::Enforce,
            ip_literal: icp_gate::config::Action::Allow,
            no_sni: icp_gate::config::Action::Block,
            exempt: vec![],
        },
    )
}

/// Lookup cost while another thread publishes single-entry updates, `pace` a second or flat
/// out; returns (ns per lookup, updates published per second).
fn under_updates(
    registry: &Arc<Registry>,
    policy: &Policy,
    hosts: &[String],
    n: u64,
    pace: Option<u32>,
) -> (f64, f64) {
    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));
    let writer = {
        let (registry, stop, published) = (registry.clone(), stop.clone(), published.clone());
        std::thread::spawn(move || {
            let start = Instant::now();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if let Some(rate) = pace {
                    let due = start + Duration::from_secs(1) * i as u32 / rate;
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
                let current = registry.load_full();
                let op = Op::Put(entry((i * 104_729) % n));
                registry.publish(current.apply(&[op], current.revision() + 1));
                published.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        })
    };
    let run = Duration::from_secs(3);
    let ns = lookup_ns(registry, policy, hosts, run);
    stop.store(true, Ordering::Relaxed);
    let _ = writer.join();
    (
        ns,
        published.load(Ordering::Relaxed) as f64 / run.as_secs_f64(),
    )
}

/// Mean cost of one decision (two lookups: `www.` then the filed name) over `hosts`.
fn lookup_ns(registry: &Registry, policy: &Policy, hosts: &[String], run: Duration) -> f64 {
    let dst = "10.0.0.1".parse().unwrap();
    let start = Instant::now();
    let mut done = 0u64;
    while start.elapsed() < run {
        for h in hosts.iter().take(10_000) {
            let snapshot = registry.load();
            black_box(decide(dst, HostInput::Name(black_box(h)), &snapshot, policy).decision);
        }
        done += 10_000;
    }
    start.elapsed().as_nanos() as f64 / done as f64
}

async fn get(addr: SocketAddr, path: &str) -> u16 {
    let Ok(mut c) = tokio::time::timeout(Duration::from_secs(1), Admin::try_connect(addr)).await
    else {
        return 0;
    };
    match c.as_mut() {
        Some(c) => c.send("GET", path, String::new()).await,
        None => 0,
    }
}

/// A kept-alive HTTP/1.1 connection to the admin listener.
struct Admin {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl Admin {
    async fn try_connect(addr: SocketAddr) -> Option<Admin> {
        let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .ok()?;
        tokio::spawn(conn);
        Some(Admin { sender })
    }

    async fn connect(addr: SocketAddr) -> Admin {
        Admin::try_connect(addr).await.expect("admin connection")
    }

    async fn send(&mut self, method: &str, path: &str, body: String) -> u16 {
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "admin")
            .header("authorization", "Bearer bench")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        // A kept-alive HTTP/1.1 connection takes the next request only once the last one is done.
        self.sender
            .ready()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: connection lost: {e:?}"));
        let resp = self
            .sender
            .send_request(req)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e:?}"));
        let status = resp.status().as_u16();
        resp.into_body().collect().await.unwrap();
        status
    }
}
