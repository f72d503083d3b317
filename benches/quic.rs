//! QUIC enforcement costs:
//!
//! - `quic_initial`: reading the SNI out of a client's first flight, per flow: the RFC 9001
//!   client Initial (one 1 200-byte packet: key derivation, header protection, decryption,
//!   frames, ClientHello), the same with the decision (`decide`) on its SNI, and a 5 KB ClientHello
//!   in five Initial packets (per packet: divide by five);
//! - `quic_relay`: one 1 200-byte datagram from a client, through the relay to a UDP echo origin
//!   and back, over an allowed flow: icp-gate's quic listener (in-process, one worker) side by
//!   side with a bare UDP relay that does nothing but forward (the floor: a socket task
//!   forwarding to a connected origin socket, a flow task forwarding back). After criterion's
//!   runs, a paired comparison alternates both (`ICP_GATE_QUIC_ROUNDS` rounds, default 20) and
//!   prints the process CPU time per round trip (getrusage, user + system: client, relay and echo
//!   origin; the client and origin are the same in both) and the ratio.
//!
//! - a burst: the origin answers each client datagram with 16 full-size datagrams in one GSO
//!   send (a QUIC server's download), through icp-gate and through the bare relay in alternating
//!   blocks; it prints the process CPU per datagram relayed back and the ratio.
//!
//! - a flood: for `ICP_GATE_QUIC_FLOOD_SECS` seconds (default 5), two threads send Initials at
//!   `ICP_GATE_QUIC_FLOOD_RATE` datagrams a second in all (default 100 000, the issue's flood; 0:
//!   as fast as they can, which on two cores mostly measures the senders taking the relay's CPU)
//!   from 512 client sockets (half random bytes that do not decrypt, half genuine
//!   Initials of ClientHellos that never complete, each socket a new DCID every round, so every
//!   one costs a key derivation) while the bench thread measures round trips over an allowed flow;
//!   it prints the flood's rate, the round-trip p50/p99 idle and under the flood, and the process's
//!   resident memory before and after. The same flood is first aimed at a socket that only drains
//!   it (the control: what the flood costs the probes through the machine alone). On two or more
//!   cores the senders run on the last core and the relay, probes and origin on the others, as a
//!   load generator on another machine would (loopback delivery runs in the sender's context, so
//!   the kernel's receive work for the flood is charged to the senders' core; the copy into
//!   icp-gate stays on its own).
//!
//! `cargo bench --bench quic`; `-- quic_initial` for the parser alone.

use std::hint::black_box;
use std::net::{IpAddr, SocketAddr, UdpSocket as StdUdp};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use icp_gate::config::{Action, Config, Mode, Origin, PolicyConfig, RouteConfig};
use icp_gate::core::decision::{HostInput, Policy, decide};
use icp_gate::core::routes::RouteTable;
use icp_gate::registry::{Entry, Snapshot, Status};
use icp_gate::wire::host;
use icp_gate::wire::quic::{
    InitialReader, Read, Version, client_hello, client_initial, crypto_frame,
};
use icp_gate::{Listeners, ServerHandle};
use tokio::net::UdpSocket;
use tokio::runtime::Runtime;

const TESTDATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/quic");
const DATAGRAM: usize = 1200;

fn hex_file(name: &str) -> Vec<u8> {
    let path = format!("{TESTDATA}/{name}");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let digits: Vec<u8> = text.bytes().filter(u8::is_ascii_hexdigit).collect();
    digits
        .chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
        .collect()
}

fn policy() -> Policy {
    let route = RouteConfig {
        dst: "10.0.0.0/8".parse().unwrap(),
        mainland: true,
        x_forwarded_for: true,
        send_proxy_protocol: None,
        mode: None,
        require_access_here: true,
        http_origin: None,
        tls_origin: None,
        quic_origin: Origin::parse("127.0.0.1:443"),
    };
    Policy::new(
        RouteTable::new(vec![route]),
        &PolicyConfig {
            mode: Mode::Enforce,
            ip_literal: Action::Allow,
            no_sni: Action::Block,
            exempt: vec![],
        },
    )
}

fn bench_initial(c: &mut Criterion) {
    let rfc = hex_file("rfc9001-a2-client-initial.hex");
    let hello = client_hello("www.example.com", 5000);
    let dcid = [7u8; 8];
    let packets: Vec<Vec<u8>> = hello
        .chunks(1100)
        .enumerate()
        .map(|(pn, chunk)| {
            let frame = crypto_frame((pn * 1100) as u64, chunk);
            let padded = [frame, vec![0; 1150usize.saturating_sub(chunk.len())]].concat();
            client_initial(Version::V1, &dcid, &[1, 2, 3, 4], pn as u16, &padded)
        })
        .collect();
    let entries = [Entry {
        domain: "example.com".into(),
        icp: "京ICP备1号-1".into(),
        status: Status::Filed,
        access_here: true,
    }];
    let snapshot = Snapshot::from_entries(&entries, 1).unwrap();
    let policy = policy();
    let dst: IpAddr = "10.1.2.3".parse().unwrap();

    let mut group = c.benchmark_group("quic_initial");
    group.throughput(Throughput::Elements(1));
    group.bench_function("rfc9001_one_packet", |b| {
        b.iter(|| {
            let mut reader = InitialReader::new(16384);
            let fed = reader.feed(black_box(&rfc));
            assert!(matches!(fed.read, Read::Done(_)));
        })
    });
    group.bench_function("rfc9001_one_packet_and_decide", |b| {
        b.iter(|| {
            let mut reader = InitialReader::new(16384);
            let Read::Done(info) = reader.feed(black_box(&rfc)).read else {
                panic!("not done");
            };
            let sni = info.sni.unwrap();
            let parsed = host::parse_host(sni.as_bytes()).unwrap();
            let v = decide(dst, HostInput::from(&parsed), &snapshot, &policy);
            assert!(v.decision.forwards());
        })
    });
    group.bench_function(format!("hello_in_{}_packets", packets.len()), |b| {
        b.iter(|| {
            let mut reader = InitialReader::new(16384);
            let mut last = Read::Incomplete;
            for p in &packets {
                last = reader.feed(black_box(p)).read;
            }
            assert!(matches!(last, Read::Done(_)));
        })
    });
    group.finish();
}

/// A UDP echo origin on its own thread.
fn echo_origin() -> SocketAddr {
    let socket = StdUdp::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(&buf[..n], from);
        }
    });
    addr
}

/// Datagrams in one burst of the burst origin.
const BURST: usize = 16;

/// An origin that answers each datagram with a burst of [`BURST`] full-size datagrams in one GSO
/// send, as a QUIC server sending a download does.
fn burst_origin() -> SocketAddr {
    let socket = StdUdp::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    let state = quinn_udp::UdpSocketState::new((&socket).into()).unwrap();
    assert!(state.max_gso_segments() >= BURST, "no UDP GSO here");
    socket.set_nonblocking(false).unwrap();
    let burst = [&[0x40u8][..], &[0x5b; DATAGRAM - 1]]
        .concat()
        .repeat(BURST);
    std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while let Ok((_, from)) = socket.recv_from(&mut buf) {
            let _ = state.send(
                (&socket).into(),
                &quinn_udp::Transmit {
                    destination: from,
                    ecn: None,
                    contents: &burst,
                    segment_size: Some(DATAGRAM),
                    src_ip: None,
                },
            );
        }
    });
    addr
}

/// The floor: forwards a client's datagrams to a connected origin socket and back, nothing else.
async fn bare_relay(origin: SocketAddr) -> SocketAddr {
    let listen = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let addr = listen.local_addr().unwrap();
    tokio::spawn(async move {
        let mut flows: std::collections::HashMap<SocketAddr, Arc<UdpSocket>> =
            std::collections::HashMap::new();
        let mut buf = vec![0u8; 65536];
        loop {
            let Ok((n, from)) = listen.recv_from(&mut buf).await else {
                return;
            };
            let up = match flows.get(&from) {
                Some(up) => up.clone(),
                None => {
                    let up = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
                    up.connect(origin).await.unwrap();
                    let (back, listen) = (up.clone(), listen.clone());
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 65536];
                        while let Ok(n) = back.recv(&mut buf).await {
                            let _ = listen.send_to(&buf[..n], from).await;
                        }
                    });
                    flows.insert(from, up.clone());
                    up
                }
            };
            // A direct send(2), as icp-gate does: tokio's try_send would drop the first
            // datagram on a socket the reactor has not yet seen writable.
            let _ = socket2::SockRef::from(&*up).send(&buf[..n]);
        }
    });
    addr
}

/// icp-gate with one quic listener toward `origin`, `example.com` filed.
async fn gate(
    origin: SocketAddr,
    dir: &std::path::Path,
    extra: &str,
) -> (ServerHandle, SocketAddr) {
    std::fs::write(
        dir.join("seed.ndjson"),
        r#"{"domain":"example.com","icp":"京ICP备1号-1","status":"filed","access_here":true}"#,
    )
    .unwrap();
    let path = dir.join("icp-gate.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[registry]
state_dir = "state"
seed = "seed.ndjson"

[[listener]]
name = "quic"
bind = "127.0.0.1:0"
kind = "quic"

[[route]]
dst = "127.0.0.1/32"
mainland = true
quic_origin = "{origin}"

[quic]
flow_idle_timeout = "10m"
{extra}
"#
        ),
    )
    .unwrap();
    let config = Config::load(&path).unwrap();
    let listeners = Listeners::bind(&config).unwrap();
    let server = ServerHandle::start(config, listeners).await.unwrap();
    let addr = server.listener_addr("quic").await.unwrap();
    (server, addr)
}

/// A client whose flow through `relay` is open: the RFC 9001 Initial (SNI example.com) first,
/// answered with `answers` datagrams once the flow is allowed (1 by the echo origin, a burst by
/// the burst origin).
fn open_flow(relay: SocketAddr, answers: usize) -> StdUdp {
    let client = StdUdp::bind("127.0.0.1:0").unwrap();
    client.connect(relay).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    client
        .send(&hex_file("rfc9001-a2-client-initial.hex"))
        .unwrap();
    let mut buf = [0u8; 65536];
    for _ in 0..answers {
        client.recv(&mut buf).expect("the first flight is answered");
    }
    client
}

/// `ICP_GATE_QUIC_ROUNDS`: blocks of each relay in the paired comparisons (default 20).
fn rounds() -> usize {
    std::env::var("ICP_GATE_QUIC_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(20)
}

/// Alternates `measure` (CPU per operation over one block) between the bare relay's client and
/// icp-gate's for [`rounds`] blocks each, and describes both minimums and medians and their ratios.
fn paired(bare: &StdUdp, icp: &StdUdp, mut measure: impl FnMut(&StdUdp) -> Duration) -> String {
    let rounds = rounds();
    let (mut b, mut i) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        b.push(measure(bare));
        i.push(measure(icp));
    }
    b.sort();
    i.sort();
    let (b_min, i_min, b_med, i_med) = (b[0], i[0], b[rounds / 2], i[rounds / 2]);
    format!(
        "{rounds} alternating blocks: bare relay min {b_min:?} median {b_med:?}; icp-gate min {i_min:?} median {i_med:?}; icp-gate / bare: {:.3} by the minimums, {:.3} by the medians",
        i_min.as_secs_f64() / b_min.as_secs_f64(),
        i_med.as_secs_f64() / b_med.as_secs_f64(),
    )
}

fn round_trip(client: &StdUdp, datagram: &[u8], buf: &mut [u8]) {
    client.send(datagram).unwrap();
    let n = client.recv(buf).expect("echo");
    assert_eq!(n, datagram.len());
}

/// A round trip that may be lost (a flood overflows socket buffers): the datagram carries
/// `seq`, late answers to earlier ones are skipped, and `None` means no answer within the read
/// timeout.
fn numbered_round_trip(
    client: &StdUdp,
    datagram: &mut [u8],
    seq: u64,
    buf: &mut [u8],
) -> Option<Duration> {
    datagram[1..9].copy_from_slice(&seq.to_be_bytes());
    let started = Instant::now();
    client.send(datagram).ok()?;
    loop {
        let n = client.recv(buf).ok()?;
        if n == datagram.len() && buf[1..9] == seq.to_be_bytes() {
            return Some(started.elapsed());
        }
    }
}

/// User + system CPU time of the whole process.
fn cpu() -> Duration {
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage for the call to fill in.
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) }, 0);
    let d = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    d(ru.ru_utime) + d(ru.ru_stime)
}

fn bench_relay(c: &mut Criterion, runtime: &Runtime) {
    let origin = echo_origin();
    let dir = tempfile::tempdir().unwrap();
    let (_server, gate_addr) = runtime.block_on(gate(origin, dir.path(), ""));
    let bare_addr = runtime.block_on(bare_relay(origin));
    let through_gate = open_flow(gate_addr, 1);
    let through_bare = open_flow(bare_addr, 1);
    // A short-header-looking datagram, as 1-RTT packets are.
    let datagram = [&[0x40u8][..], &[0x5a; DATAGRAM - 1]].concat();
    let mut buf = vec![0u8; 65536];

    let mut group = c.benchmark_group("quic_relay");
    group.throughput(Throughput::Elements(1));
    group.bench_function("bare_udp_relay", |b| {
        b.iter(|| round_trip(&through_bare, &datagram, &mut buf))
    });
    group.bench_function("icp_gate", |b| {
        b.iter(|| round_trip(&through_gate, &datagram, &mut buf))
    });
    group.finish();

    const PER_BLOCK: u32 = 5_000;
    let compared = paired(&through_bare, &through_gate, |client| {
        let cpu0 = cpu();
        for _ in 0..PER_BLOCK {
            round_trip(client, &datagram, &mut buf);
        }
        (cpu() - cpu0) / PER_BLOCK
    });
    println!("process CPU per round trip over blocks of {PER_BLOCK}, {compared}");
}

/// A download's direction: one datagram up, a burst of [`BURST`] back (sent by GSO), per
/// operation, through icp-gate and through the bare relay in alternating blocks; prints the
/// process CPU per datagram relayed back.
fn bench_burst(runtime: &Runtime) {
    let origin = burst_origin();
    let dir = tempfile::tempdir().unwrap();
    let (_server, gate_addr) = runtime.block_on(gate(origin, dir.path(), ""));
    let bare_addr = runtime.block_on(bare_relay(origin));
    let (through_gate, through_bare) = (open_flow(gate_addr, BURST), open_flow(bare_addr, BURST));
    let request = [&[0x40u8][..], &[0x5a; 99]].concat();
    let mut buf = vec![0u8; 65536];
    const PER_BLOCK: u32 = 2_000;
    let compared = paired(&through_bare, &through_gate, |client| {
        let cpu0 = cpu();
        for _ in 0..PER_BLOCK {
            client.send(&request).unwrap();
            for _ in 0..BURST {
                let n = client.recv(&mut buf).expect("burst");
                assert_eq!(n, DATAGRAM, "relayed as the datagrams the origin sent");
            }
        }
        (cpu() - cpu0) / (PER_BLOCK * BURST as u32)
    });
    println!(
        "burst: process CPU per datagram of {BURST}-datagram GSO bursts from the origin, blocks of {PER_BLOCK}, {compared}"
    );
}

/// Resident memory of this process, in MiB.
fn rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        / 1024
}

fn percentiles(mut samples: Vec<Duration>) -> (Duration, Duration) {
    if samples.is_empty() {
        return (Duration::ZERO, Duration::ZERO);
    }
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    (at(0.5), at(0.99))
}

/// Pins the calling thread to `cpus` (Linux); the flood's senders get a core of their own, as a
/// load generator on another machine would, and the relay, the probes and the echo origin share the
/// rest.
fn pin(cpus: std::ops::Range<usize>) {
    // SAFETY: an all-zero cpu_set_t is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for cpu in cpus {
        // SAFETY: `cpu` is below the machine's CPU count, within the set's size.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: `set` is a valid cpu_set_t of the size given; 0 is the calling thread.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    assert_eq!(
        r,
        0,
        "sched_setaffinity: {}",
        std::io::Error::last_os_error()
    );
}

/// User + system CPU time of one thread of this process, from /proc (in clock ticks of 10 ms).
fn thread_cpu(tid: libc::pid_t) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
    // Fields after the command name in parentheses; utime and stime are the 14th and 15th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

/// One flood run's figures.
struct Flooded {
    sent: u64,
    elapsed: Duration,
    p50: Duration,
    p99: Duration,
    lost: u64,
    probes: u64,
}

/// Floods `target` for `secs` at `rate` from two sender threads on `flood_cpus` while the calling
/// thread measures round trips over `client`'s allowed flow.
fn flood_at(
    target: SocketAddr,
    secs: u64,
    rate: u64,
    flood_cpus: Option<std::ops::Range<usize>>,
    probe: &mut dyn FnMut(usize, &mut u64) -> Vec<Duration>,
) -> Flooded {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let senders: Vec<_> = (0..2u8)
        .map(|t| {
            let stop = stop.clone();
            let flood_cpus = flood_cpus.clone();
            std::thread::spawn(move || {
                if let Some(cpus) = flood_cpus {
                    pin(cpus);
                }
                let sockets: Vec<StdUdp> = (0..256)
                    .map(|_| StdUdp::bind(("127.0.0.2", 0)).unwrap())
                    .collect();
                let partial = [&[1u8, 0, 0x10, 0][..], &[0x42; 596]].concat();
                let frames = [crypto_frame(0, &partial), vec![0; 600]].concat();
                let mut random = vec![0u8; DATAGRAM];
                let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(t);
                let mut sent = 0u64;
                let mut round = 0u64;
                let began = Instant::now();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // Paced: this thread's half of `rate`, checked once a round (512 datagrams).
                    if rate > 0 {
                        let due = began + Duration::from_secs_f64(sent as f64 / (rate / 2) as f64);
                        if let Some(wait) = due.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                    }
                    round += 1;
                    for (i, s) in sockets.iter().enumerate() {
                        let mut dcid = [0u8; 8];
                        dcid[..4].copy_from_slice(&(round as u32).to_be_bytes());
                        dcid[4..6].copy_from_slice(&(i as u16).to_be_bytes());
                        dcid[6] = t;
                        let genuine = client_initial(Version::V1, &dcid, &[1, 2, 3, 4], 0, &frames);
                        for chunk in random.chunks_mut(8) {
                            seed ^= seed << 13;
                            seed ^= seed >> 7;
                            seed ^= seed << 17;
                            chunk.copy_from_slice(&seed.to_be_bytes()[..chunk.len()]);
                        }
                        random[0] = 0xc0;
                        random[1..5].copy_from_slice(&1u32.to_be_bytes());
                        random[5] = 8;
                        random[14] = 0;
                        let _ = s.send_to(&genuine, target);
                        let _ = s.send_to(&random, target);
                        sent += 2;
                    }
                }
                sent
            })
        })
        .collect();
    let started = Instant::now();
    let mut loaded = Vec::new();
    let mut probes = 0;
    let mut lost = 0;
    while started.elapsed() < Duration::from_secs(secs) {
        loaded.extend(probe(100, &mut lost));
        probes += 100;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent: u64 = senders.into_iter().map(|h| h.join().unwrap()).sum();
    let elapsed = started.elapsed();
    let (p50, p99) = percentiles(loaded);
    Flooded {
        sent,
        elapsed,
        p50,
        p99,
        lost,
        probes,
    }
}

fn flood(runtime: &Runtime) {
    let secs: u64 = std::env::var("ICP_GATE_QUIC_FLOOD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let rate: u64 = std::env::var("ICP_GATE_QUIC_FLOOD_RATE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    // The senders on the last core, everything else on the others (with one core, no pinning):
    // the flood's own cost to generate is not the relay's, and on two cores unpinned senders take
    // the relay's, the probes' and the origin's CPU whatever the relay does.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (service_cpus, flood_cpus) = if cpus >= 2 {
        (Some(0..cpus - 1), Some(cpus - 1..cpus))
    } else {
        (None, None)
    };
    if let Some(service) = service_cpus.clone() {
        pin(service);
    }
    // The runtime's one worker runs the relay's tasks: pinned too, and its CPU time read.
    let worker = runtime.block_on(async move {
        tokio::spawn(async move {
            if let Some(service) = service_cpus {
                pin(service);
            }
            // SAFETY: gettid has no preconditions.
            unsafe { libc::gettid() }
        })
        .await
        .unwrap()
    });
    let origin = echo_origin();
    let dir = tempfile::tempdir().unwrap();
    // 512 flooding addresses for 256 flows: each genuine Initial evicts an older undecided flow
    // and costs a key derivation, the flood's worst case.
    let (_server, gate_addr) = runtime.block_on(gate(origin, dir.path(), "max_flows = 256"));
    let client = open_flow(gate_addr, 1);
    client
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut datagram = [&[0x40u8][..], &[0x5a; DATAGRAM - 1]].concat();
    let mut buf = vec![0u8; 65536];
    let mut seq = 0u64;
    let mut sample = |n: usize, lost: &mut u64| {
        (0..n)
            .filter_map(|_| {
                seq += 1;
                let r = numbered_round_trip(&client, &mut datagram, seq, &mut buf);
                *lost += u64::from(r.is_none());
                r
            })
            .collect::<Vec<_>>()
    };
    let mut idle_lost = 0;
    let idle = percentiles(sample(20_000, &mut idle_lost));
    // The control: the same flood at a socket that only drains it, so that what the flood costs
    // the probes through the machine alone (the kernel, the cores' sharing) shows beside what it
    // costs through icp-gate.
    let sink = StdUdp::bind("127.0.0.1:0").unwrap();
    let sink_addr = sink.local_addr().unwrap();
    let sink_cpus = flood_cpus.clone();
    std::thread::spawn(move || {
        if let Some(cpus) = sink_cpus {
            pin(cpus);
        }
        let mut buf = [0u8; 65536];
        while sink.recv_from(&mut buf).is_ok() {}
    });
    let worker_cpu = || thread_cpu(worker);
    let cpu0 = worker_cpu();
    let control = flood_at(sink_addr, secs, rate, flood_cpus.clone(), &mut sample);
    let cpu1 = worker_cpu();
    let rss_before = rss_mib();
    let at_gate = flood_at(gate_addr, secs, rate, flood_cpus, &mut sample);
    let rss_after = rss_mib();
    let cpu2 = worker_cpu();
    let pinned = if cpus >= 2 {
        format!(
            "senders pinned to cpu {}, the rest to cpus 0-{}",
            cpus - 1,
            cpus - 2
        )
    } else {
        "one cpu, nothing pinned".to_owned()
    };
    println!(
        "flood ({pinned}); round trip over an allowed flow idle p50 {:?} p99 {:?} ({idle_lost} of 20000 lost)",
        idle.0, idle.1
    );
    for (what, f, cpu) in [
        ("at a sink (control)", &control, cpu1 - cpu0),
        ("at icp-gate", &at_gate, cpu2 - cpu1),
    ] {
        println!(
            "flood {what}: {} Initials in {:.1?} ({:.0}/s); round trip p50 {:?} p99 {:?} ({} of {} lost); p99 / idle p99 {:.2}; the relay's worker busy {:.0} % of a core",
            f.sent,
            f.elapsed,
            f.sent as f64 / f.elapsed.as_secs_f64(),
            f.p50,
            f.p99,
            f.lost,
            f.probes,
            f.p99.as_secs_f64() / idle.1.as_secs_f64(),
            100.0 * cpu.as_secs_f64() / f.elapsed.as_secs_f64(),
        );
    }
    println!("flood: RSS {rss_before} MiB before the flood at icp-gate, {rss_after} MiB after");
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench_initial(&mut c);
    // `-- quic_initial` (or any filter naming only the parser group) runs the parser alone: the
    // relay's paired rounds and the flood ignore criterion's filter, so they are skipped here.
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    if filter.is_some_and(|f| f.starts_with("quic_initial")) {
        c.final_summary();
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    bench_relay(&mut c, &runtime);
    bench_burst(&runtime);
    flood(&runtime);
    c.final_summary();
}
