//! The byte relay between real loopback TCP sockets: the copy relay (`relay::relay`, used for
//! upgraded WebSocket connections) side by side with the TCP relay (`relay::relay_tcp`, splice(2)
//! for bulk on Linux, used for TLS passthrough tunnels) and with tokio's `copy_bidirectional`
//! (what the copy relay used until 2026-12-06, with two 8 KiB buffers per connection for its life):
//!
//! - `relay_bulk`: one tunnel, 64 MiB one way (throughput);
//! - `relay_ping_pong`: 1 KiB request, 1 KiB response over one open tunnel (time per round trip);
//! - `relay_short_tunnels`: open, send 4 KiB, close, 16 tunnels at a time (time per tunnel).
//!
//! The relay runs alone on its own thread (a current-thread runtime, like one worker of the
//! proxy), the clients and origins on the bench thread. After criterion's runs, a paired
//! comparison alternates blocks of both relays (8 rounds, `ICP_GATE_RELAY_ROUNDS`) and prints
//! per workload the median time per iteration, the relay thread's CPU time (getrusage
//! RUSAGE_THREAD, user + system: splice's work is in the kernel) per iteration and per byte, the
//! whole process's (RUSAGE_SELF: the relay, its clients and origins — a relay's choices can move
//! work to its peers), and the splice / copy and copy / tokio ratios with their range over the
//! rounds: on a shared machine, drift weighs on all alike there.
//!
//! `cargo bench --bench relay`; `-- nothing` skips criterion and runs only the paired
//! comparison; `ICP_GATE_RELAY_ORDER=tcp-first` puts the TCP relay first.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use icp_gate::internals as relay;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::{Handle, Runtime};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

const BULK: usize = 64 << 20;
const MESSAGE: usize = 1024;
const SHORT: usize = 4096;
const SHORT_IN_FLIGHT: usize = 16;
const IDLE: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Variant {
    /// `relay::relay`: copies through the thread's scratch buffer.
    Copy,
    /// `relay::relay_tcp`: splice(2) through a pipe per direction for bulk, copy for small reads.
    Tcp,
    /// tokio's `copy_bidirectional`, alone (no idle watchdog, no byte counts).
    Tokio,
}

impl Variant {
    const ALL: [Variant; 3] = [Variant::Copy, Variant::Tcp, Variant::Tokio];

    fn name(self) -> &'static str {
        match self {
            Variant::Copy => "copy",
            Variant::Tcp => "splice",
            Variant::Tokio => "tokio copy_bidir.",
        }
    }
}

/// User + system CPU time of the calling thread (`RUSAGE_THREAD`) or of the whole process
/// (`RUSAGE_SELF`).
fn cpu_time(who: libc::c_int) -> Duration {
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage for the call to fill in.
    let rc = unsafe { libc::getrusage(who, &mut ru) };
    assert_eq!(rc, 0, "getrusage: {}", std::io::Error::last_os_error());
    let d = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    d(ru.ru_utime) + d(ru.ru_stime)
}

/// What a measurement returns, by index: wall time, the relay thread's CPU, the whole process's.
const WALL: usize = 0;
const RELAY: usize = 1;
const ALL: usize = 2;

/// The relay thread: a current-thread runtime that only accepts tunnels and relays them.
struct RelayThread {
    handle: Handle,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl RelayThread {
    fn start() -> RelayThread {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("relay".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("relay runtime");
                tx.send(rt.handle().clone()).expect("hand over the handle");
                let _ = rt.block_on(stopped);
            })
            .expect("relay thread");
        RelayThread {
            handle: rx.recv().expect("relay runtime handle"),
            _stop: stop,
        }
    }

    /// A listener whose connections are relayed to `origin` with `variant`.
    fn listen(&self, variant: Variant, origin: SocketAddr) -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind relay");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("relay addr");
        self.handle.spawn(async move {
            let listener = TcpListener::from_std(listener).expect("register relay listener");
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let _ = client.set_nodelay(true);
                    let Ok(upstream) = TcpStream::connect(origin).await else {
                        return;
                    };
                    let _ = upstream.set_nodelay(true);
                    let stop = CancellationToken::new();
                    match variant {
                        Variant::Copy => {
                            relay::relay(client, upstream, IDLE, stop).await;
                        }
                        Variant::Tcp => {
                            relay::relay_tcp(client, upstream, IDLE, stop).await;
                        }
                        Variant::Tokio => {
                            let (mut client, mut upstream) = (client, upstream);
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                        }
                    }
                });
            }
        });
        addr
    }

    /// The relay thread's CPU time so far.
    async fn cpu(&self) -> Duration {
        self.handle
            .spawn(async { cpu_time(libc::RUSAGE_THREAD) })
            .await
            .expect("cpu probe")
    }
}

/// Reads to EOF, answers with the number of bytes read (8 bytes, big endian), closes.
async fn sink(listener: TcpListener) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let _ = s.set_nodelay(true);
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0u64;
            loop {
                match s.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => total += n as u64,
                    Err(_) => return,
                }
            }
            let _ = s.write_all(&total.to_be_bytes()).await;
            let _ = s.shutdown().await;
        });
    }
}

/// Echoes everything back until EOF.
async fn echo(listener: TcpListener) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let _ = s.set_nodelay(true);
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        });
    }
}

/// Sends `data` `times` times, half-closes, and checks the sink's count.
async fn send_to_sink(relay: SocketAddr, data: &[u8], times: usize) {
    let mut s = TcpStream::connect(relay).await.expect("connect relay");
    s.set_nodelay(true).expect("nodelay");
    for _ in 0..times {
        s.write_all(data).await.expect("send");
    }
    s.shutdown().await.expect("half-close");
    let mut answer = Vec::with_capacity(8);
    s.read_to_end(&mut answer).await.expect("read count");
    let expected = (data.len() * times) as u64;
    assert_eq!(answer, expected.to_be_bytes(), "sink count");
}

/// Time for `iters` round trips of 1 KiB over one tunnel (set up before the clock starts).
async fn ping_pong(relay: SocketAddr, iters: u64) -> Duration {
    let request = [0xa5u8; MESSAGE];
    let mut response = [0u8; MESSAGE];
    let mut t = TcpStream::connect(relay).await.expect("connect relay");
    t.set_nodelay(true).expect("nodelay");
    t.write_all(&request).await.expect("send");
    t.read_exact(&mut response).await.expect("receive");
    let start = Instant::now();
    for _ in 0..iters {
        t.write_all(&request).await.expect("send");
        t.read_exact(&mut response).await.expect("receive");
    }
    let wall = start.elapsed();
    assert_eq!(response, request);
    t.shutdown().await.expect("half-close");
    let mut rest = Vec::new();
    t.read_to_end(&mut rest).await.expect("close");
    wall
}

/// Time for `iters` tunnels that each carry 4 KiB, `SHORT_IN_FLIGHT` at a time.
async fn short_tunnels(relay: SocketAddr, iters: u64) -> Duration {
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    let workers = SHORT_IN_FLIGHT as u64;
    for w in 0..workers {
        let n = iters / workers + u64::from(w < iters % workers);
        tasks.spawn(async move {
            let data = [0x3cu8; SHORT];
            for _ in 0..n {
                send_to_sink(relay, &data, 1).await;
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("tunnel task");
    }
    start.elapsed()
}

/// Time for `iters` tunnels that each carry 64 MiB one way.
async fn bulk(relay: SocketAddr, iters: u64, data: &[u8]) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        send_to_sink(relay, data, BULK / data.len()).await;
    }
    start.elapsed()
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Workload {
    Bulk,
    PingPong,
    Short,
}

impl Workload {
    const ALL: [Workload; 3] = [Workload::Bulk, Workload::PingPong, Workload::Short];

    fn group(self) -> &'static str {
        match self {
            Workload::Bulk => "relay_bulk",
            Workload::PingPong => "relay_ping_pong",
            Workload::Short => "relay_short_tunnels",
        }
    }

    /// Bytes through the relay per iteration (both ways).
    fn bytes(self) -> u64 {
        match self {
            Workload::Bulk => BULK as u64,
            Workload::PingPong => 2 * MESSAGE as u64,
            Workload::Short => SHORT as u64 + 8,
        }
    }

    /// Iterations per block of the paired comparison.
    fn block(self) -> u64 {
        match self {
            Workload::Bulk => 2,
            Workload::PingPong => 2000,
            Workload::Short => 400,
        }
    }

    fn rate(self, per_iter: f64) -> String {
        match self {
            Workload::Bulk => format!("{:.0} MiB/s", BULK as f64 / per_iter / 1048576.0),
            Workload::PingPong => format!("{:.0} rt/s", 1.0 / per_iter),
            Workload::Short => format!("{:.0} tunnels/s", 1.0 / per_iter),
        }
    }
}

struct Bench {
    rt: Runtime,
    relay: RelayThread,
    order: Vec<Variant>,
    /// The relay listener for each workload and variant.
    addrs: BTreeMap<(Workload, Variant), SocketAddr>,
    data: Vec<u8>,
}

impl Bench {
    fn start() -> Bench {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("bench runtime");
        let relay = RelayThread::start();
        let mut addrs = BTreeMap::new();
        for w in Workload::ALL {
            for v in Variant::ALL {
                let listener = rt
                    .block_on(TcpListener::bind("127.0.0.1:0"))
                    .expect("bind origin");
                let origin = listener.local_addr().expect("origin addr");
                // On the bench thread's current-thread runtime: it serves while a measurement
                // runs.
                match w {
                    Workload::PingPong => rt.spawn(echo(listener)),
                    Workload::Bulk | Workload::Short => rt.spawn(sink(listener)),
                };
                addrs.insert((w, v), relay.listen(v, origin));
            }
        }
        let order = match std::env::var("ICP_GATE_RELAY_ORDER").as_deref() {
            Ok("tcp-first") => vec![Variant::Tcp, Variant::Copy, Variant::Tokio],
            _ => Variant::ALL.to_vec(),
        };
        Bench {
            rt,
            relay,
            order,
            addrs,
            data: vec![0x5au8; 1 << 20],
        }
    }

    /// Runs `iters` iterations of `w` through `v`: wall time, the relay thread's CPU time and
    /// the whole process's (relay, clients and origins), indexed by [`WALL`], [`RELAY`], [`ALL`].
    fn measure(&self, w: Workload, v: Variant, iters: u64) -> [Duration; 3] {
        let addr = self.addrs[&(w, v)];
        self.rt.block_on(async {
            let relay = self.relay.cpu().await;
            let all = cpu_time(libc::RUSAGE_SELF);
            let wall = match w {
                Workload::Bulk => bulk(addr, iters, &self.data).await,
                Workload::PingPong => ping_pong(addr, iters).await,
                Workload::Short => short_tunnels(addr, iters).await,
            };
            let relay = self.relay.cpu().await - relay;
            [wall, relay, cpu_time(libc::RUSAGE_SELF) - all]
        })
    }

    fn criterion(&self, c: &mut Criterion) {
        for w in Workload::ALL {
            let mut group = c.benchmark_group(w.group());
            group.warm_up_time(Duration::from_secs(1));
            match w {
                Workload::Bulk => group
                    .throughput(Throughput::Bytes(w.bytes()))
                    .sample_size(10)
                    .measurement_time(Duration::from_secs(8)),
                Workload::PingPong => group
                    .throughput(Throughput::Bytes(w.bytes()))
                    .sample_size(30)
                    .measurement_time(Duration::from_secs(4)),
                Workload::Short => group
                    .throughput(Throughput::Elements(1))
                    .sample_size(20)
                    .measurement_time(Duration::from_secs(4)),
            };
            for &v in &self.order {
                group.bench_function(v.name(), |b| {
                    b.iter_custom(|iters| self.measure(w, v, iters)[WALL])
                });
            }
            group.finish();
        }
    }

    /// The relays in alternating blocks (the order reversed every other round), so that a machine
    /// whose load drifts weighs on all alike; ratios are taken per round.
    fn paired(&self, rounds: usize) {
        println!();
        println!(
            "paired comparison: {rounds} rounds of alternating blocks per workload; relay CPU = the relay thread's user + system time, all CPU = the whole process's (relay, clients, origins)"
        );
        println!(
            "{:<16} {:<19} {:>12} {:>16} {:>14} {:>12} {:>14}",
            "workload", "relay", "median/iter", "rate", "CPU/iter", "CPU ns/byte", "all CPU/iter"
        );
        for w in Workload::ALL {
            let mut per: BTreeMap<Variant, Vec<[f64; 3]>> = BTreeMap::new();
            for round in 0..rounds {
                let mut order = self.order.clone();
                if round % 2 == 1 {
                    order.reverse();
                }
                for v in order {
                    let n = w.block() as f64;
                    let per_iter = self.measure(w, v, w.block()).map(|d| d.as_secs_f64() / n);
                    per.entry(v).or_default().push(per_iter);
                }
            }
            for (v, samples) in &per {
                let [time, cpu, all] =
                    [WALL, RELAY, ALL].map(|i| median(samples.iter().map(|s| s[i]).collect()));
                println!(
                    "{:<16} {:<19} {:>9.1} µs {:>16} {:>11.1} µs {:>12.3} {:>11.1} µs",
                    w.group().trim_start_matches("relay_"),
                    v.name(),
                    time * 1e6,
                    w.rate(time),
                    cpu * 1e6,
                    cpu * 1e9 / w.bytes() as f64,
                    all * 1e6
                );
            }
            for (label, a, b) in [
                ("splice / copy", Variant::Tcp, Variant::Copy),
                ("copy / tokio", Variant::Copy, Variant::Tokio),
            ] {
                let (a, b) = (&per[&a], &per[&b]);
                let ratios = |i: usize| {
                    let r: Vec<f64> = a.iter().zip(b).map(|(x, y)| x[i] / y[i]).collect();
                    let (lo, hi) = r
                        .iter()
                        .fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
                    format!("{:.2}x ({lo:.2}-{hi:.2})", median(r))
                };
                println!(
                    "{:<16} {:<19} time {}, CPU {}, all CPU {}",
                    "",
                    label,
                    ratios(WALL),
                    ratios(RELAY),
                    ratios(ALL)
                );
            }
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let bench = Bench::start();
    let mut c = Criterion::default().configure_from_args();
    bench.criterion(&mut c);
    c.final_summary();
    let rounds = std::env::var("ICP_GATE_RELAY_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(8);
    bench.paired(rounds);
}
