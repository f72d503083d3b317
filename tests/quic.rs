//! QUIC listeners (`kind = "quic"`): the config, `check` and `explain`, and real QUIC clients and
//! origins (quinn) through icp-gate on loopback.

mod common;

use std::net::SocketAddr;
use std::process::Command;

use common::SEED;
use common::process::BIN;

/// A config with a QUIC listener (and the HTTP one the harness expects), routing 127.0.0.1 to
/// `origin` over UDP; `extra` is appended.
fn quic_config(origin: SocketAddr, extra: &str) -> String {
    format!(
        r#"
[registry]
state_dir = "{{dir}}/state"
seed = "seed.ndjson"

[[listener]]
name = "http"
bind = "127.0.0.1:0"
kind = "http"

[[listener]]
name = "quic"
bind = "127.0.0.1:0"
kind = "quic"

[[route]]
dst = "127.0.0.1/32"
mainland = true
http_origin = "127.0.0.1:9"
quic_origin = "{origin}"

[admin]
bind = "127.0.0.1:0"
token_file = "admin.token"
{extra}
"#
    )
}

fn write(dir: &std::path::Path, text: &str) -> std::path::PathBuf {
    std::fs::write(dir.join("seed.ndjson"), SEED).unwrap();
    std::fs::write(dir.join("admin.token"), "test-token\n").unwrap();
    let path = dir.join("icp-gate.toml");
    std::fs::write(&path, text.replace("{dir}", &dir.display().to_string())).unwrap();
    path
}

#[test]
fn check_accepts_a_quic_listener_and_names_a_missing_quic_origin() {
    let dir = tempfile::tempdir().unwrap();
    let text = quic_config(
        "127.0.0.1:9443".parse().unwrap(),
        "[quic]\nblock = \"drop\"\nmax_flows = 1000\n",
    );
    let path = write(dir.path(), &text);
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("listeners: 2"));

    let path = write(
        dir.path(),
        &text.replace("quic_origin = \"127.0.0.1:9443\"\n", ""),
    );
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("route[0].quic_origin: required"), "{err}");
}

#[test]
fn explain_answers_for_a_quic_config_as_for_tls() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        &quic_config("127.0.0.1:9443".parse().unwrap(), ""),
    );
    let explain = |host: &str| {
        let out = Command::new(BIN)
            .args(["explain", "--config"])
            .arg(&path)
            .args([host, "--dst", "127.0.0.1"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let out = explain("www.filed.cn");
    assert!(
        out.contains("decision:    allow") && out.contains("reason:      filed"),
        "{out}"
    );
    let out = explain("www.unfiled.cn");
    assert!(
        out.contains("decision:    block") && out.contains("reason:      unfiled"),
        "{out}"
    );
}

// ---- real QUIC endpoints through the proxy -------------------------------------------------

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::pki::Pki;
use common::{Gate, http1};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use tokio::net::UdpSocket;

const FILED: &str = "www.filed.cn";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A QUIC origin (quinn) answering each bidirectional stream with
/// `origin <sni> got <request>`; counts the connections it accepted.
struct QuicOrigin {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    _endpoint: quinn::Endpoint,
}

impl QuicOrigin {
    fn start(pki: &Pki, names: &[&str], alpn: &[Vec<u8>]) -> QuicOrigin {
        QuicOrigin::launch(pki, names, alpn, false)
    }

    /// `retry`: answer every first Initial with a Retry, as a server validating addresses does.
    fn launch(pki: &Pki, names: &[&str], alpn: &[Vec<u8>], retry: bool) -> QuicOrigin {
        let (chain, key, _, _) = pki.leaf(names);
        let mut tls = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        tls.alpn_protocols = alpn.to_vec();
        let crypto = QuicServerConfig::try_from(tls).unwrap();
        let config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = endpoint.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let (ep, count) = (endpoint.clone(), connections.clone());
        tokio::spawn(async move {
            while let Some(incoming) = ep.accept().await {
                if retry && !incoming.remote_address_validated() {
                    let _ = incoming.retry();
                    continue;
                }
                let count = count.clone();
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    count.fetch_add(1, Ordering::SeqCst);
                    let sni = conn
                        .handshake_data()
                        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
                        .and_then(|d| d.server_name)
                        .unwrap_or_default();
                    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                        let sni = sni.clone();
                        tokio::spawn(async move {
                            let request = recv.read_to_end(1 << 20).await.unwrap_or_default();
                            let answer =
                                format!("origin {sni} got {}", String::from_utf8_lossy(&request));
                            let _ = send.write_all(answer.as_bytes()).await;
                            let _ = send.finish();
                            let _ = send.stopped().await;
                        });
                    }
                });
            }
        });
        QuicOrigin {
            addr,
            connections,
            _endpoint: endpoint,
        }
    }
}

/// A client endpoint trusting `pki`, offering `alpn`, giving up after `idle` of silence.
fn client(pki: &Pki, alpn: &[Vec<u8>], idle: Duration) -> (quinn::Endpoint, quinn::ClientConfig) {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.der().clone()).unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = alpn.to_vec();
    let mut config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(idle.try_into().unwrap()));
    config.transport_config(Arc::new(transport));
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    (endpoint, config)
}

/// One request on a new bidirectional stream; the answer, read to its end.
async fn exchange(conn: &quinn::Connection, request: &str) -> Result<String, String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())?;
    let answer = recv.read_to_end(1 << 20).await.map_err(|e| e.to_string())?;
    Ok(String::from_utf8(answer).unwrap())
}

/// One exchange on `conn`, answered by the test origin serving `name`.
async fn assert_echoed(conn: &quinn::Connection, name: &str, request: &str) {
    assert_eq!(
        exchange(conn, request).await.unwrap(),
        format!("origin {name} got {request}")
    );
}

async fn gate(origin: SocketAddr, extra: &str) -> (Gate, SocketAddr) {
    let gate = Gate::start(&quic_config(origin, extra)).await;
    let addr = gate.server.listener_addr("quic").await.unwrap();
    (gate, addr)
}

/// A UDP socket standing in for an origin, to see whether anything at all reaches it.
async fn udp_spy() -> (UdpSocket, SocketAddr) {
    let spy = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = spy.local_addr().unwrap();
    (spy, addr)
}

async fn nothing_arrives(spy: &UdpSocket, wait: Duration) -> bool {
    let mut buf = [0u8; 2048];
    tokio::time::timeout(wait, spy.recv_from(&mut buf))
        .await
        .is_err()
}

/// Connects `endpoint` to the proxy at `addr` with `name` as the SNI.
async fn dial(
    endpoint: &quinn::Endpoint,
    config: quinn::ClientConfig,
    addr: SocketAddr,
    name: &str,
) -> Result<quinn::Connection, quinn::ConnectionError> {
    endpoint.connect_with(config, addr, name).unwrap().await
}

/// Asserts that the metrics text holds `line` (a sample with its value).
fn assert_counted(metrics: &str, line: &str) {
    assert!(metrics.contains(line), "missing {line}\n{metrics}");
}

/// One more exchange on a flow the proxy should have ended: the client's answer, once its idle
/// timeout has run out (it must, within 5 s).
async fn after_quiet(conn: &quinn::Connection) -> Result<String, String> {
    tokio::time::timeout(Duration::from_secs(5), exchange(conn, "after"))
        .await
        .expect("the client gives up within its idle timeout")
}

/// The forged CONNECTION_CLOSE of a block: CONNECTION_REFUSED with `icp-gate: <reason>`.
fn assert_refused(err: &quinn::ConnectionError, reason: &str) {
    match err {
        quinn::ConnectionError::ConnectionClosed(close) => {
            assert_eq!(
                close.error_code,
                quinn::TransportErrorCode::CONNECTION_REFUSED,
                "{close:?}"
            );
            assert_eq!(close.reason[..], *format!("icp-gate: {reason}").as_bytes());
        }
        other => panic!("expected a CONNECTION_CLOSE, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filed_name_reaches_its_http3_origin_end_to_end() {
    let pki = Pki::new();
    let h3 = vec![b"h3".to_vec()];
    let origin = QuicOrigin::start(&pki, &[FILED], &h3);
    let (gate, addr) = gate(origin.addr, "").await;
    let (endpoint, config) = client(&pki, &h3, Duration::from_secs(5));
    let started = Instant::now();
    let conn = dial(&endpoint, config, addr, FILED)
        .await
        .expect("the origin's handshake completes through the proxy");
    // Tens of milliseconds on loopback; a lost first flight would cost the client's 1 s probe
    // timeout before its retransmission got through.
    let took = started.elapsed();
    assert!(took < Duration::from_millis(900), "handshake took {took:?}");
    for i in 0..3 {
        let answer = exchange(&conn, &format!("request {i}")).await.unwrap();
        assert_eq!(answer, format!("origin {FILED} got request {i}"));
    }
    assert_eq!(origin.connections.load(Ordering::SeqCst), 1);
    assert_eq!(gate.server.live_tunnels(), 1, "registered for revocation");
    let metrics = gate.metrics().await;
    for line in [
        r#"icp_gate_quic_flows_total{decision="allow",listener="quic",reason="filed"} 1"#,
        r#"icp_gate_quic_flows_active{listener="quic"} 1"#,
    ] {
        assert_counted(&metrics, line);
    }
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfiled_name_is_refused_at_once_with_close_and_nothing_reaches_the_origin() {
    let pki = Pki::new();
    let (spy, spy_addr) = udp_spy().await;
    let (gate, addr) = gate(spy_addr, "").await;
    let (endpoint, config) = client(&pki, &[b"h3".to_vec()], Duration::from_secs(10));
    let started = Instant::now();
    let err = dial(&endpoint, config, addr, "www.unfiled.cn")
        .await
        .expect_err("an unfiled name must not connect");
    let took = started.elapsed();
    assert_refused(&err, "unfiled");
    assert!(took < Duration::from_secs(1), "refused after {took:?}");
    assert!(nothing_arrives(&spy, Duration::from_millis(300)).await);
    assert_eq!(gate.server.live_tunnels(), 0);
    let metrics = gate.metrics().await;
    assert_counted(
        &metrics,
        r#"icp_gate_quic_flows_total{decision="block",listener="quic",reason="unfiled"} 1"#,
    );
    // And the provider sees it among the names turned away, as for HTTP and TLS.
    let auth = [("host", "admin"), ("authorization", "Bearer test-token")];
    let blocked = loop {
        let (code, _, body) = http1(gate.admin, "GET", "/v1/blocked", &auth, b"").await;
        assert_eq!(code, 200, "{body}");
        if body.contains("www.unfiled.cn") || started.elapsed() > Duration::from_secs(5) {
            break body;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let blocked: serde_json::Value = serde_json::from_str(&blocked).unwrap();
    let host = &blocked["hosts"][0];
    assert_eq!(host["host"], "www.unfiled.cn", "{blocked}");
    assert_eq!(host["listeners"]["quic"], 1, "{blocked}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_drop_sends_nothing_to_either_side() {
    let pki = Pki::new();
    let (spy, spy_addr) = udp_spy().await;
    let (gate, addr) = gate(spy_addr, "[quic]\nblock = \"drop\"\n").await;
    let (endpoint, config) = client(&pki, &[b"h3".to_vec()], Duration::from_millis(1500));
    let err = dial(&endpoint, config, addr, "gone.cn")
        .await
        .expect_err("a revoked name must not connect");
    assert!(
        matches!(err, quinn::ConnectionError::TimedOut),
        "the client hears nothing: {err:?}"
    );
    assert!(nothing_arrives(&spy, Duration::from_millis(100)).await);
    let metrics = gate.metrics().await;
    assert_counted(
        &metrics,
        r#"icp_gate_quic_flows_total{decision="block",listener="quic",reason="revoked"} 1"#,
    );
    assert!(
        metrics
            .contains(r#"icp_gate_quic_datagrams_dropped_total{listener="quic",reason="blocked"}"#),
        "{metrics}"
    );
}

/// Hundreds of ALPN values make a ClientHello of several kilobytes, which the client has to
/// send in several Initial packets: it is reassembled, decided and relayed whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_hello_spanning_several_initials_is_reassembled() {
    let pki = Pki::new();
    let many: Vec<Vec<u8>> = (0..400)
        .map(|i| format!("proto-{i:05}").into_bytes())
        .collect();
    let origin = QuicOrigin::start(&pki, &[FILED], &[b"proto-00399".to_vec()]);
    let (gate, addr) = gate(origin.addr, "").await;
    let (endpoint, config) = client(&pki, &many, Duration::from_secs(5));
    let conn = dial(&endpoint, config, addr, FILED)
        .await
        .expect("connects through the proxy");
    assert_echoed(&conn, FILED, "big hello").await;
    let metrics = gate.metrics().await;
    assert_counted(
        &metrics,
        r#"icp_gate_quic_flows_total{decision="allow",listener="quic",reason="filed"} 1"#,
    );
}

/// Revoking a filed name ends its live QUIC flows within a second: nothing more reaches the
/// origin, and the stream the client opens afterwards gets no answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_name_cuts_its_live_flows_within_a_second() {
    let pki = Pki::new();
    let h3 = vec![b"h3".to_vec()];
    let origin = QuicOrigin::start(&pki, &[FILED], &h3);
    let (gate, addr) = gate(origin.addr, "").await;
    let (endpoint, config) = client(&pki, &h3, Duration::from_secs(3));
    let conn = dial(&endpoint, config, addr, FILED).await.unwrap();
    assert!(exchange(&conn, "before").await.is_ok());
    assert_eq!(gate.server.live_tunnels(), 1);

    let entry = r#"{"domain":"filed.cn","icp":"京ICP备00000001号-1","status":"revoked","access_here":true}"#;
    let auth = [("host", "admin"), ("authorization", "Bearer test-token")];
    let (code, _, body) = http1(
        gate.admin,
        "PUT",
        "/v1/registry/entries/filed.cn",
        &auth,
        entry.as_bytes(),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let revoked = Instant::now();
    while gate.server.live_tunnels() > 0 {
        assert!(
            revoked.elapsed() < Duration::from_secs(1),
            "the flow outlived the revocation"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let after = after_quiet(&conn).await;
    assert!(after.is_err(), "{after:?}");
    let metrics = gate.metrics().await;
    assert!(
        metrics.contains(r#"icp_gate_quic_flows_active{listener="quic"} 0"#),
        "{metrics}"
    );
}

/// UDP sockets of process `pid` bound to `port`.
fn udp_sockets(pid: u32, port: u16) -> usize {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|link| {
            let link = link.to_string_lossy().into_owned();
            Some(
                link.strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_string(),
            )
        })
        .collect();
    let table = std::fs::read_to_string("/proc/net/udp").unwrap();
    let local = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f[1].ends_with(&local) && inodes.iter().any(|i| i == f[9]))
        .count()
}

/// The real binary with three per-thread workers: each has its own `SO_REUSEPORT` UDP socket,
/// flows from many client ports (hashed over the sockets) are each decided and relayed, each
/// flow has its access-log line, and SIGTERM exits cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_thread_workers_each_serve_a_udp_socket_and_log_each_flow() {
    use common::process::Proc;
    let pki = Pki::new();
    let h3 = vec![b"h3".to_vec()];
    let origin = QuicOrigin::start(&pki, &[FILED], &h3);
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), &quic_config(origin.addr, ""));
    let mut proc = Proc::start_with(&path, &["--threads", "3", "--runtime", "per-thread"]);
    let addr: SocketAddr = loop {
        let line = proc.wait_for("listening");
        if line["listener"] == "quic" {
            break line["addr"].as_str().unwrap().parse().unwrap();
        }
    };
    proc.wait_for("ready");
    // /proc/net/udp is read in pieces, and a socket opened or closed meanwhile (here, by other
    // tests, or by a worker setting up) can shift a line out of the read: read until it shows 3.
    let started = Instant::now();
    let mut sockets = udp_sockets(proc.pid(), addr.port());
    while sockets != 3 && started.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        sockets = udp_sockets(proc.pid(), addr.port());
    }
    assert_eq!(sockets, 3, "one SO_REUSEPORT socket per worker");

    let clients = (0..12).map(|i| {
        let (endpoint, config) = client(&pki, &h3, Duration::from_secs(5));
        tokio::spawn(async move {
            let conn = dial(&endpoint, config, addr, FILED).await.unwrap();
            let answer = exchange(&conn, &format!("client {i}")).await.unwrap();
            conn.close(0u32.into(), b"");
            endpoint.wait_idle().await;
            answer
        })
    });
    for (i, c) in clients.collect::<Vec<_>>().into_iter().enumerate() {
        assert_eq!(c.await.unwrap(), format!("origin {FILED} got client {i}"));
    }
    assert_eq!(origin.connections.load(Ordering::SeqCst), 12);
    let line = proc.access_line(FILED);
    assert_eq!(line["listener"], "quic");
    assert_eq!(line["decision"], "allow");
    assert_eq!(line["reason"], "filed");
    assert_eq!(line["dst"], addr.to_string());

    proc.signal(libc::SIGTERM);
    assert_eq!(proc.wait_exit(Duration::from_secs(10)), Some(0));
}

/// This process's resident memory, in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A flood of Initials from 400 addresses — random bytes that do not decrypt, and genuine
/// Initials whose ClientHello never completes, sent again and again — keeps the flow table at
/// `quic.max_flows` (the oldest undecided flows make way), holds memory bounded, never reaches the
/// origin, and a filed client connecting in the middle of it still gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_initials_keeps_state_bounded_and_filed_flows_working() {
    use icp_gate::wire::quic::{Version, client_initial, crypto_frame};
    let pki = Pki::new();
    let h3 = vec![b"h3".to_vec()];
    let origin = QuicOrigin::start(&pki, &[FILED], &h3);
    let (gate, addr) = gate(origin.addr, "[quic]\nmax_flows = 200\n").await;
    let rss_before = rss_kib();

    let mut sockets = Vec::new();
    for ip in 10..26u8 {
        for _ in 0..25 {
            sockets.push(
                UdpSocket::bind((std::net::Ipv4Addr::new(127, 0, 0, ip), 0))
                    .await
                    .unwrap(),
            );
        }
    }
    // The first 600 bytes of a 4 KiB ClientHello: never complete.
    let partial = [&[1u8, 0, 0x10, 0][..], &[0x42; 596]].concat();
    let frames = [crypto_frame(0, &partial), vec![0; 600]].concat();
    let flood = tokio::spawn(async move {
        let mut sent = 0u64;
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..20u16 {
            for (i, s) in sockets.iter().enumerate() {
                let dcid = (i as u64).to_be_bytes();
                let genuine = client_initial(Version::V1, &dcid, &[1, 2, 3, 4], round, &frames);
                let mut random = vec![0u8; 1200];
                for chunk in random.chunks_mut(8) {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    chunk.copy_from_slice(&seed.to_be_bytes()[..chunk.len()]);
                }
                random[0] = 0xc0 | (random[0] & 0x0f);
                random[1..5].copy_from_slice(&1u32.to_be_bytes());
                random[5] = 8;
                random[14] = 0;
                let _ = s.send_to(&genuine, addr).await;
                let _ = s.send_to(&random, addr).await;
                sent += 2;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        sent
    });

    tokio::time::sleep(Duration::from_millis(100)).await;
    let (endpoint, config) = client(&pki, &h3, Duration::from_secs(5));
    let conn = dial(&endpoint, config, addr, FILED)
        .await
        .expect("a filed client gets through the flood");
    assert_echoed(&conn, FILED, "during the flood").await;
    let sent = flood.await.unwrap();
    assert_eq!(sent, 16_000);
    assert_eq!(
        origin.connections.load(Ordering::SeqCst),
        1,
        "only the filed client"
    );

    let grown = rss_kib().saturating_sub(rss_before);
    assert!(grown < 64 * 1024, "memory grew by {grown} KiB");
    let metrics = gate.metrics().await;
    for reason in ["undecryptable", "evicted"] {
        let line = format!(
            r#"icp_gate_quic_datagrams_dropped_total{{listener="quic",reason="{reason}"}}"#
        );
        assert_counted(&metrics, &line);
    }
    assert_counted(
        &metrics,
        r#"icp_gate_quic_flows_total{decision="allow",listener="quic",reason="filed"} 1"#,
    );
}

/// One client socket, several connections (quinn multiplexes them on one endpoint, as a client
/// may): a second filed name goes through the same flow, an unfiled one is refused at once
/// without disturbing the others, and nothing of it reaches the origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_sharing_a_client_socket_are_each_decided() {
    let pki = Pki::new();
    let h3 = vec![b"h3".to_vec()];
    let origin = QuicOrigin::start(&pki, &[FILED, "x.gov.cn", "www.unfiled.cn"], &h3);
    let (gate, addr) = gate(origin.addr, "").await;
    let (endpoint, config) = client(&pki, &h3, Duration::from_secs(5));
    let first = dial(&endpoint, config.clone(), addr, FILED).await.unwrap();
    assert!(exchange(&first, "one").await.is_ok());

    let err = dial(&endpoint, config.clone(), addr, "www.unfiled.cn")
        .await
        .expect_err("unfiled");
    assert!(
        matches!(&err, quinn::ConnectionError::ConnectionClosed(c) if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED),
        "{err:?}"
    );
    assert_echoed(&first, FILED, "two").await;

    let second = dial(&endpoint, config, addr, "x.gov.cn")
        .await
        .expect("a second filed name on the same client socket");
    assert_eq!(
        exchange(&second, "three").await.unwrap(),
        "origin x.gov.cn got three"
    );
    assert_echoed(&first, FILED, "four").await;
    assert_eq!(
        origin.connections.load(Ordering::SeqCst),
        2,
        "never the unfiled one"
    );
    assert_eq!(gate.server.live_tunnels(), 2, "both names registered");
    let metrics = gate.metrics().await;
    for line in [
        r#"icp_gate_quic_flows_total{decision="allow",listener="quic",reason="filed"} 2"#,
        r#"icp_gate_quic_flows_total{decision="block",listener="quic",reason="unfiled"} 1"#,
    ] {
        assert_counted(&metrics, line);
    }
}

/// An origin that validates addresses with a Retry: the Retry is relayed to the client, whose
/// new Initial (under the Retry's connection ID, with new keys) is decided again and goes out
/// through the same origin socket, so the token validates and the connection completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_retry_is_relayed_and_the_connection_completes() {
    let pki = Pki::new();
    let h3 = vec![b"h3".to_vec()];
    let origin = QuicOrigin::launch(&pki, &[FILED], &h3, true);
    let (gate, addr) = gate(origin.addr, "").await;
    let (endpoint, config) = client(&pki, &h3, Duration::from_secs(5));
    let conn = dial(&endpoint, config, addr, FILED)
        .await
        .expect("connects after the Retry");
    assert_echoed(&conn, FILED, "after retry").await;
    assert_eq!(origin.connections.load(Ordering::SeqCst), 1);
    let metrics = gate.metrics().await;
    // The first flight, then the one answering the Retry: both decided, both allowed.
    assert_counted(
        &metrics,
        r#"icp_gate_quic_flows_total{decision="allow",listener="quic",reason="filed"} 2"#,
    );
}

/// A UDP hop in front of `to` that delivers the client's first `n` datagrams in reverse order
/// (then the rest as they come) and relays the answers back: the network reordering a first
/// flight.
async fn reversing_hop(
    to: SocketAddr,
    n: usize,
) -> (SocketAddr, Arc<std::sync::atomic::AtomicBool>) {
    let front = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let back = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    back.connect(to).await.unwrap();
    let addr = front.local_addr().unwrap();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = done.clone();
    tokio::spawn(async move {
        let mut client = None;
        let mut held: Vec<Vec<u8>> = Vec::new();
        let mut reversed = false;
        let (mut a, mut b) = (vec![0u8; 65536], vec![0u8; 65536]);
        loop {
            tokio::select! {
                Ok((len, from)) = front.recv_from(&mut a) => {
                    client = Some(from);
                    if reversed {
                        let _ = back.send(&a[..len]).await;
                        continue;
                    }
                    held.push(a[..len].to_vec());
                    if held.len() == n {
                        for d in held.drain(..).rev() {
                            let _ = back.send(&d).await;
                        }
                        reversed = true;
                        flag.store(true, Ordering::SeqCst);
                    }
                }
                Ok(len) = back.recv(&mut b) => {
                    if let Some(c) = client {
                        let _ = front.send_to(&b[..len], c).await;
                    }
                }
            }
        }
    });
    (addr, done)
}

/// A ClientHello of several Initial datagrams that arrive in reverse order is reassembled by
/// offset, decided once whole, and relayed in the order received.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_flight_arriving_in_reverse_order_is_reassembled() {
    let pki = Pki::new();
    let many: Vec<Vec<u8>> = (0..400)
        .map(|i| format!("proto-{i:05}").into_bytes())
        .collect();
    let origin = QuicOrigin::start(&pki, &[FILED], &[b"proto-00399".to_vec()]);
    let (gate, addr) = gate(origin.addr, "").await;
    let (hop, reversed) = reversing_hop(addr, 3).await;
    let (endpoint, config) = client(&pki, &many, Duration::from_secs(5));
    let conn = dial(&endpoint, config, hop, FILED)
        .await
        .expect("connects through the reordering hop and the proxy");
    assert!(
        reversed.load(Ordering::SeqCst),
        "the first three datagrams went out reversed"
    );
    assert_echoed(&conn, FILED, "reordered").await;
    let metrics = gate.metrics().await;
    assert_counted(
        &metrics,
        r#"icp_gate_quic_flows_total{decision="allow",listener="quic",reason="filed"} 1"#,
    );
}

/// Report mode on QUIC: an unfiled name is relayed end to end, and counted and logged with its
/// would-be reason as `report`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_mode_relays_an_unfiled_name_and_counts_it() {
    let pki = Pki::new();
    let h3 = vec![b"h3".to_vec()];
    let origin = QuicOrigin::start(&pki, &["www.unfiled.cn"], &h3);
    let (gate, addr) = gate(origin.addr, "[policy]\nmode = \"report\"\n").await;
    let (endpoint, config) = client(&pki, &h3, Duration::from_secs(5));
    let conn = dial(&endpoint, config, addr, "www.unfiled.cn")
        .await
        .expect("report mode relays");
    assert_eq!(
        exchange(&conn, "reported").await.unwrap(),
        "origin www.unfiled.cn got reported"
    );
    let metrics = gate.metrics().await;
    assert_counted(
        &metrics,
        r#"icp_gate_quic_flows_total{decision="report",listener="quic",reason="unfiled"} 1"#,
    );
}

/// A quic listener added by a reload binds its UDP socket and serves; removed again, it takes
/// no new flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_listener_added_by_reload_serves() {
    let pki = Pki::new();
    let h3 = vec![b"h3".to_vec()];
    let origin = QuicOrigin::start(&pki, &[FILED], &h3);
    let without = quic_config(origin.addr, "").replace(
        "[[listener]]\nname = \"quic\"\nbind = \"127.0.0.1:0\"\nkind = \"quic\"\n",
        "",
    );
    let gate = Gate::start(&without).await;
    assert!(gate.server.listener_addr("quic").await.is_none());
    let path = gate.config_path();
    std::fs::write(
        &path,
        quic_config(origin.addr, "").replace("{dir}", &gate.dir.path().display().to_string()),
    )
    .unwrap();
    gate.server
        .reload(icp_gate::config::Config::load(&path).unwrap())
        .await
        .unwrap();
    let addr = gate
        .server
        .listener_addr("quic")
        .await
        .expect("bound by the reload");
    let (endpoint, config) = client(&pki, &h3, Duration::from_secs(5));
    let conn = dial(&endpoint, config, addr, FILED).await.unwrap();
    assert!(exchange(&conn, "after reload").await.is_ok());
    conn.close(0u32.into(), b"");

    std::fs::write(
        &path,
        without.replace("{dir}", &gate.dir.path().display().to_string()),
    )
    .unwrap();
    gate.server
        .reload(icp_gate::config::Config::load(&path).unwrap())
        .await
        .unwrap();
    let (endpoint, short) = client(&pki, &h3, Duration::from_millis(800));
    let err = dial(&endpoint, short, addr, FILED)
        .await
        .expect_err("the removed listener takes no new flow");
    assert!(matches!(err, quinn::ConnectionError::TimedOut), "{err:?}");
}

/// Frames padded so that the Initial carrying them fills a 1 200-byte datagram.
fn padded(frames: Vec<u8>) -> Vec<u8> {
    let mut f = frames;
    f.resize(f.len().max(1160), 0);
    f
}

/// A crafted first flight: the filed name's ClientHello in two Initials, and between them a
/// datagram whose first packet is a 0-RTT packet, with an Initial behind it carrying another
/// name's ClientHello at the same offsets. The hidden Initial is read (it contradicts the
/// first), the flow is refused, and nothing at all reaches the origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_initial_hidden_behind_another_packet_is_read_before_anything_is_relayed() {
    use icp_gate::wire::quic::{Version, client_hello, client_initial, crypto_frame};
    let (spy, spy_addr) = udp_spy().await;
    let (gate, addr) = gate(spy_addr, "").await;
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (dcid, scid) = ([0x11u8; 8], [1u8, 2, 3, 4]);
    let filed = client_hello(FILED, 2000);
    let unfiled = client_hello("www.unfiled.cn", 2000);

    let first = client_initial(
        Version::V1,
        &dcid,
        &scid,
        0,
        &padded(crypto_frame(0, &filed[..1000])),
    );
    // A 0-RTT long header (v1 type 1) with an opaque payload, then the hidden Initial.
    let mut zero_rtt = vec![0xd1, 0, 0, 0, 1, 8];
    zero_rtt.extend(dcid);
    zero_rtt.push(4);
    zero_rtt.extend(scid);
    zero_rtt.extend([0x40, 40]);
    zero_rtt.extend([0xaa; 40]);
    let hidden = [
        zero_rtt,
        client_initial(
            Version::V1,
            &dcid,
            &scid,
            1,
            &padded(crypto_frame(0, &unfiled[..1000])),
        ),
    ]
    .concat();
    let rest = client_initial(
        Version::V1,
        &dcid,
        &scid,
        2,
        &padded(crypto_frame(1000, &filed[1000..])),
    );
    for datagram in [&first, &hidden, &rest] {
        socket.send_to(datagram, addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(nothing_arrives(&spy, Duration::from_millis(500)).await);
    let metrics = gate.metrics().await;
    assert_counted(
        &metrics,
        r#"icp_gate_quic_flows_total{decision="block",listener="quic",reason="invalid_sni"} 1"#,
    );
    assert!(!metrics.contains(r#"decision="allow""#), "{metrics}");
}

/// An allowed flow without a datagram either way for `quic.flow_idle_timeout` ends: it is no
/// longer active nor registered, and what the client sends afterwards is not relayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_flow_ends_after_flow_idle_timeout() {
    let pki = Pki::new();
    let h3 = vec![b"h3".to_vec()];
    let origin = QuicOrigin::start(&pki, &[FILED], &h3);
    let (gate, addr) = gate(origin.addr, "[quic]\nflow_idle_timeout = \"500ms\"\n").await;
    let (endpoint, config) = client(&pki, &h3, Duration::from_secs(3));
    let conn = dial(&endpoint, config, addr, FILED).await.unwrap();
    assert!(exchange(&conn, "before").await.is_ok());
    // Let the handshake's last acknowledgements pass, then stay quiet past the idle timeout.
    let started = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if gate.server.live_tunnels() == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "the idle flow lives on"
        );
    }
    let metrics = gate.metrics().await;
    assert!(
        metrics.contains(r#"icp_gate_quic_flows_active{listener="quic"} 0"#),
        "{metrics}"
    );
    let after = after_quiet(&conn).await;
    assert!(after.is_err(), "{after:?}");
}

/// Past `quic.new_flows_per_second`, new flows are dropped before any cryptography (counted as
/// `new_flow_rate`), while a flow already relayed goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_flows_past_the_rate_are_dropped_and_relayed_flows_go_on() {
    use icp_gate::wire::quic::{Version, client_initial, crypto_frame};
    let pki = Pki::new();
    let h3 = vec![b"h3".to_vec()];
    let origin = QuicOrigin::start(&pki, &[FILED], &h3);
    let (gate, addr) = gate(origin.addr, "[quic]\nnew_flows_per_second = 50\n").await;
    let (endpoint, config) = client(&pki, &h3, Duration::from_secs(5));
    let conn = dial(&endpoint, config, addr, FILED).await.unwrap();

    let partial = [&[1u8, 0, 0x10, 0][..], &[0x42; 596]].concat();
    let frames = padded(crypto_frame(0, &partial));
    for i in 0..200u64 {
        let s = UdpSocket::bind(("127.0.0.3", 0)).await.unwrap();
        let initial = client_initial(Version::V1, &i.to_be_bytes(), &[1, 2, 3, 4], 0, &frames);
        s.send_to(&initial, addr).await.unwrap();
    }
    assert_echoed(&conn, FILED, "still here").await;
    let metrics = gate.metrics().await;
    let dropped: u64 = metrics
        .lines()
        .find(|l| {
            l.starts_with(
                r#"icp_gate_quic_datagrams_dropped_total{listener="quic",reason="new_flow_rate"}"#,
            )
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no new_flow_rate drops\n{metrics}"));
    assert!(
        (100..=200).contains(&dropped),
        "{dropped} dropped\n{metrics}"
    );
}

/// `require_access_here` on QUIC, as on TLS: a name filed with another provider
/// (`access_here = false`) is refused as `not_accessed` on a route that requires the access here
/// (the client sees the reason in the CONNECTION_CLOSE, the origin never sees the connection),
/// and relayed as `filed_elsewhere` on a route that waives it, where the flow is registered like
/// any allowed by an entry: revoking the filing cuts it. Both are counted and logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_filed_elsewhere_is_not_accessed_here_unless_the_route_waives_the_access() {
    use common::process::Proc;
    const NAME: &str = "mail.elsewhere.cn";
    let pki = Pki::new();
    let h3 = vec![b"h3".to_vec()];
    let origin = QuicOrigin::start(&pki, &[NAME], &h3);
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"
[registry]
state_dir = "{{dir}}/state"
seed = "seed.ndjson"

[[listener]]
name = "quic-waived"
bind = "127.0.0.1:0"
kind = "quic"

[[listener]]
name = "quic-default"
bind = "127.0.0.5:0"
kind = "quic"

[[route]]
dst = "127.0.0.1/32"
mainland = true
require_access_here = false
quic_origin = "{origin}"

[[route]]
dst = "127.0.0.5/32"
mainland = true
quic_origin = "{origin}"

[admin]
bind = "127.0.0.1:0"
token_file = "admin.token"
"#,
        origin = origin.addr
    );
    let path = write(dir.path(), &text);
    let mut proc = Proc::start(&path);
    let (mut waived, mut default) = (None, None);
    while waived.is_none() || default.is_none() {
        let line = proc.wait_for("listening");
        let addr: SocketAddr = line["addr"].as_str().unwrap().parse().unwrap();
        match line["listener"].as_str() {
            Some("quic-waived") => waived = Some(addr),
            Some("quic-default") => default = Some(addr),
            _ => {}
        }
    }
    let (waived, default) = (waived.unwrap(), default.unwrap());
    proc.wait_for("ready");
    let admin = proc.admin_addr();

    let (endpoint, config) = client(&pki, &h3, Duration::from_secs(3));
    let conn = dial(&endpoint, config, waived, NAME)
        .await
        .expect("the waived route relays a name filed elsewhere");
    assert_echoed(&conn, NAME, "mail").await;
    let line = proc.access_line(NAME);
    assert_eq!(line["listener"], "quic-waived", "{line}");
    assert_eq!(line["decision"], "allow", "{line}");
    assert_eq!(line["reason"], "filed_elsewhere", "{line}");

    let (refused_endpoint, config) = client(&pki, &h3, Duration::from_secs(10));
    let started = Instant::now();
    let err = dial(&refused_endpoint, config, default, NAME)
        .await
        .expect_err("the access is not here");
    assert_refused(&err, "not_accessed");
    assert!(started.elapsed() < Duration::from_secs(1));
    let line = proc.access_line(NAME);
    assert_eq!(line["listener"], "quic-default", "{line}");
    assert_eq!(line["decision"], "block", "{line}");
    assert_eq!(line["reason"], "not_accessed", "{line}");
    assert_eq!(
        origin.connections.load(Ordering::SeqCst),
        1,
        "the refused connection never reached the origin"
    );
    let (_, _, metrics) = http1(admin, "GET", "/metrics", &[("host", "admin")], b"").await;
    for line in [
        r#"icp_gate_quic_flows_total{decision="allow",listener="quic-waived",reason="filed_elsewhere"} 1"#,
        r#"icp_gate_quic_flows_total{decision="block",listener="quic-default",reason="not_accessed"} 1"#,
    ] {
        assert_counted(&metrics, line);
    }

    // The waiver needs the filing: revoked, the live flow is cut.
    let entry = r#"{"domain":"elsewhere.cn","icp":"沪ICP备00000002号-1","status":"revoked","access_here":false}"#;
    let auth = [("host", "admin"), ("authorization", "Bearer test-token")];
    let (code, _, body) = http1(
        admin,
        "PUT",
        "/v1/registry/entries/elsewhere.cn",
        &auth,
        entry.as_bytes(),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = after_quiet(&conn).await;
    assert!(after.is_err(), "the revoked flow still relays: {after:?}");
    assert_eq!(origin.connections.load(Ordering::SeqCst), 1);
}

/// A client Initial datagram of `version` (any 32-bit value) whose payload is `fill`: for
/// versions the proxy cannot read, the bytes after the header are opaque.
fn long_header_datagram(version: u32, dcid: &[u8], scid: &[u8], fill: u8) -> Vec<u8> {
    let mut d = vec![0xc3];
    d.extend(version.to_be_bytes());
    d.push(dcid.len() as u8);
    d.extend(dcid);
    d.push(scid.len() as u8);
    d.extend(scid);
    d.resize(1200, fill);
    d
}

/// A Version Negotiation packet (RFC 9000 §17.2.1) answering a client that used `dcid` and
/// `scid`: addressed back to the client's source connection ID, listing `versions`.
fn version_negotiation(dcid: &[u8], scid: &[u8], versions: &[u32]) -> Vec<u8> {
    let mut p = vec![0x80 | 0x2a, 0, 0, 0, 0];
    p.push(scid.len() as u8);
    p.extend(scid);
    p.push(dcid.len() as u8);
    p.extend(dcid);
    for v in versions {
        p.extend(v.to_be_bytes());
    }
    p
}

async fn recv_within(socket: &UdpSocket, wait: Duration) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 65536];
    let (n, _) = tokio::time::timeout(wait, socket.recv_from(&mut buf))
        .await
        .ok()?
        .ok()?;
    buf.truncate(n);
    Some(buf)
}

/// Unknown versions (RFC 9000 §6, §15): the proxy cannot read the SNI of a version it does not
/// know, so a first flight in one is dropped and counted as `unknown_version`, and nothing
/// reaches the origin or comes back (the proxy does not answer Version Negotiation on the
/// origin's behalf: it cannot know which versions the origin speaks), on a new flow as on one
/// already allowed. On an allowed flow, the origin's own Version Negotiation packet is relayed to
/// the client unchanged, and the client's new first flight in the version it then picks is
/// decided afresh before any of it is relayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_versions_are_dropped_and_the_origins_version_negotiation_is_relayed() {
    use icp_gate::wire::quic::{VERSION_2, Version, client_hello, client_initial, crypto_frame};
    const GREASE: u32 = 0x1a2a_3a4a;
    let origin = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (gate, addr) = gate(origin.local_addr().unwrap(), "").await;
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (dcid, scid) = ([0x5au8; 8], [7u8, 7, 7, 7]);

    // A first flight in an unknown version: dropped, counted, unanswered.
    let unknown = long_header_datagram(GREASE, &dcid, &scid, 0x33);
    client.send_to(&unknown, addr).await.unwrap();
    assert!(nothing_arrives(&origin, Duration::from_millis(300)).await);
    assert_eq!(recv_within(&client, Duration::from_millis(100)).await, None);
    let metrics = gate.metrics().await;
    assert_counted(
        &metrics,
        r#"icp_gate_quic_datagrams_dropped_total{listener="quic",reason="unknown_version"} 1"#,
    );
    assert!(!metrics.contains("icp_gate_quic_flows_total{"), "{metrics}");

    // A filed v1 first flight is relayed as sent; the origin answers it with Version Negotiation.
    let v1 = client_initial(
        Version::V1,
        &dcid,
        &scid,
        0,
        &padded(crypto_frame(0, &client_hello(FILED, 0))),
    );
    client.send_to(&v1, addr).await.unwrap();
    let mut buf = vec![0u8; 65536];
    let (n, flow) = tokio::time::timeout(Duration::from_secs(2), origin.recv_from(&mut buf))
        .await
        .expect("the filed first flight reaches the origin")
        .unwrap();
    assert_eq!(&buf[..n], &v1[..], "relayed unchanged");
    let vn = version_negotiation(&dcid, &scid, &[VERSION_2, GREASE]);
    origin.send_to(&vn, flow).await.unwrap();
    assert_eq!(
        recv_within(&client, Duration::from_secs(2))
            .await
            .as_deref(),
        Some(&vn[..]),
        "the origin's Version Negotiation reaches the client unchanged"
    );
    // A first flight in a version the proxy cannot read is not relayed on the allowed flow
    // either: the origin might speak it, and its SNI was never decided.
    client.send_to(&unknown, addr).await.unwrap();
    assert!(nothing_arrives(&origin, Duration::from_millis(300)).await);

    // The client starts over in v2, under the same connection ID: an unfiled name is not
    // relayed (the v1 decision does not cover it) and is refused with a v2 close.
    let unfiled = client_initial(
        Version::V2,
        &dcid,
        &scid,
        0,
        &padded(crypto_frame(0, &client_hello("www.unfiled.cn", 0))),
    );
    client.send_to(&unfiled, addr).await.unwrap();
    assert!(nothing_arrives(&origin, Duration::from_millis(300)).await);
    let close = recv_within(&client, Duration::from_secs(1))
        .await
        .expect("a close for the refused connection");
    assert_eq!(
        &close[1..5],
        &VERSION_2.to_be_bytes(),
        "in the client's new version"
    );
    // The filed name in v2 is decided and relayed.
    let v2 = client_initial(
        Version::V2,
        &dcid,
        &scid,
        1,
        &padded(crypto_frame(0, &client_hello(FILED, 0))),
    );
    client.send_to(&v2, addr).await.unwrap();
    let (n, _) = tokio::time::timeout(Duration::from_secs(2), origin.recv_from(&mut buf))
        .await
        .expect("the filed v2 first flight reaches the origin")
        .unwrap();
    assert_eq!(&buf[..n], &v2[..]);
    let metrics = gate.metrics().await;
    for line in [
        r#"icp_gate_quic_flows_total{decision="allow",listener="quic",reason="filed"} 2"#,
        r#"icp_gate_quic_flows_total{decision="block",listener="quic",reason="unfiled"} 1"#,
        r#"icp_gate_quic_datagrams_dropped_total{listener="quic",reason="unknown_version"} 2"#,
    ] {
        assert_counted(&metrics, line);
    }
}

/// [`quic_config`] with the quic listener bound to `bind` (a wildcard) instead of 127.0.0.1:0.
fn quic_config_on(bind: &str, origin: SocketAddr) -> String {
    let text = quic_config(origin, "").replacen(
        "bind = \"127.0.0.1:0\"\nkind = \"quic\"",
        &format!("bind = \"{bind}\"\nkind = \"quic\""),
        1,
    );
    assert!(text.contains(&format!("\"{bind}\"")), "{text}");
    text
}

/// A v1 client first flight for `name` in one padded Initial under `dcid`.
fn first_flight(name: &str, dcid: &[u8]) -> Vec<u8> {
    use icp_gate::wire::quic::{Version, client_hello, client_initial, crypto_frame};
    client_initial(
        Version::V1,
        dcid,
        &[1, 2, 3, 4],
        0,
        &padded(crypto_frame(0, &client_hello(name, 0))),
    )
}

/// A quic listener on the wildcard: each datagram's destination address (IP_PKTINFO) picks its
/// route, as for a TCP listener on `0.0.0.0`, and answers leave from the address the client sent
/// to (a connected client socket hears nothing from any other).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wildcard_quic_listener_decides_by_the_address_each_datagram_was_sent_to() {
    const UNFILED: &str = "www.unfiled.cn";
    let pki = Pki::new();
    let h3 = vec![b"h3".to_vec()];
    let origin = QuicOrigin::start(&pki, &[FILED, UNFILED], &h3);
    let text = quic_config_on("0.0.0.0:0", origin.addr).replacen(
        "dst = \"127.0.0.1/32\"",
        "dst = \"127.0.0.0/30\"",
        1,
    ) + &format!(
        "\n[[route]]\ndst = \"127.0.0.3/32\"\nmainland = false\nhttp_origin = \"127.0.0.1:9\"\nquic_origin = \"{}\"\n",
        origin.addr
    );
    assert!(text.contains("127.0.0.0/30"));
    let gate = Gate::start(&text).await;
    let bound = gate.server.listener_addr("quic").await.unwrap();
    assert!(bound.ip().is_unspecified(), "{bound}");
    let enforced = SocketAddr::from(([127, 0, 0, 1], bound.port()));
    let not_mainland = SocketAddr::from(([127, 0, 0, 3], bound.port()));

    // Sent to 127.0.0.1 (the mainland route 127.0.0.0/30): the filed name goes through, the
    // unfiled one is refused; sent to 127.0.0.3 (its own route, not mainland): the unfiled name
    // goes through.
    let (endpoint, config) = client(&pki, &h3, Duration::from_secs(5));
    let conn = dial(&endpoint, config.clone(), enforced, FILED)
        .await
        .unwrap();
    assert_echoed(&conn, FILED, "one").await;
    let err = dial(&endpoint, config.clone(), enforced, UNFILED)
        .await
        .expect_err("unfiled on a mainland address");
    assert_refused(&err, "unfiled");
    let conn2 = dial(&endpoint, config, not_mainland, UNFILED)
        .await
        .expect("not enforced on a non-mainland address");
    assert_echoed(&conn2, UNFILED, "two").await;
    let metrics = gate.metrics().await;
    for line in [
        r#"icp_gate_quic_flows_total{decision="allow",listener="quic",reason="filed"} 1"#,
        r#"icp_gate_quic_flows_total{decision="block",listener="quic",reason="unfiled"} 1"#,
        r#"icp_gate_quic_flows_total{decision="allow",listener="quic",reason="non_mainland"} 1"#,
    ] {
        assert_counted(&metrics, line);
    }

    // The close of a refusal comes from the address the client sent to: a socket connected to
    // 127.0.0.1 hears it, and so does one connected to 127.0.0.2 (same route, another address).
    for to in [enforced, SocketAddr::from(([127, 0, 0, 2], bound.port()))] {
        let raw = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        raw.connect(to).await.unwrap();
        raw.send(&first_flight(UNFILED, &[0x77; 8])).await.unwrap();
        let mut buf = [0u8; 2048];
        let n = tokio::time::timeout(Duration::from_secs(2), raw.recv(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no close from {to}"))
            .unwrap();
        assert_eq!(
            buf[0] & 0xf0,
            0xc0,
            "a long-header Initial: {:02x?}",
            &buf[..n.min(8)]
        );
    }
    conn.close(0u32.into(), b"done");
    conn2.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
}

/// A dual-stack `[::]` quic listener: an IPv4 client's datagrams arrive with IPv4-mapped
/// addresses, and are routed by the IPv4 address they were sent to (routes are written in IPv4),
/// with the close sent back from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dual_stack_wildcard_routes_ipv4_clients_by_their_ipv4_destination() {
    let (spy, spy_addr) = udp_spy().await;
    let gate = Gate::start(&quic_config_on("[::]:0", spy_addr)).await;
    let port = gate.server.listener_addr("quic").await.unwrap().port();
    let raw = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    raw.connect(("127.0.0.1", port)).await.unwrap();
    raw.send(&first_flight("www.unfiled.cn", &[0x66; 8]))
        .await
        .unwrap();
    let mut buf = [0u8; 2048];
    let n = tokio::time::timeout(Duration::from_secs(2), raw.recv(&mut buf))
        .await
        .expect("the close comes back from 127.0.0.1")
        .unwrap();
    assert_eq!(buf[0] & 0xf0, 0xc0, "{:02x?}", &buf[..n.min(8)]);
    assert!(nothing_arrives(&spy, Duration::from_millis(300)).await);
    assert_counted(
        &gate.metrics().await,
        r#"icp_gate_quic_flows_total{decision="block",listener="quic",reason="unfiled"} 1"#,
    );
}

/// On a wildcard socket (where quinn-udp turns GRO on) a client's same-size datagrams can arrive
/// as one GRO run; here the client sends its two-Initial first flight in one GSO send. The
/// listener splits the run by its stride: the origin gets the two datagrams as sent, not one
/// datagram of both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gro_run_on_a_wildcard_socket_is_relayed_as_the_datagrams_it_holds() {
    use icp_gate::wire::quic::{Version, client_hello, client_initial, crypto_frame};
    let (spy, spy_addr) = udp_spy().await;
    let gate = Gate::start(&quic_config_on("0.0.0.0:0", spy_addr)).await;
    let port = gate.server.listener_addr("quic").await.unwrap().port();

    let hello = client_hello(FILED, 1500);
    let (dcid, scid) = ([0x44u8; 8], [5u8, 6, 7, 8]);
    let first = client_initial(
        Version::V1,
        &dcid,
        &scid,
        0,
        &padded(crypto_frame(0, &hello[..1000])),
    );
    let second = client_initial(
        Version::V1,
        &dcid,
        &scid,
        1,
        &padded(crypto_frame(1000, &hello[1000..])),
    );
    assert_eq!(first.len(), second.len(), "GSO segments of one size");
    let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let state = quinn_udp::UdpSocketState::new((&client).into()).unwrap();
    assert!(
        state.max_gso_segments() > 1,
        "this kernel has no UDP GSO, so the test cannot make a GRO run"
    );
    let run = [first.clone(), second.clone()].concat();
    state
        .send(
            (&client).into(),
            &quinn_udp::Transmit {
                destination: SocketAddr::from(([127, 0, 0, 1], port)),
                ecn: None,
                contents: &run,
                segment_size: Some(first.len()),
                src_ip: None,
            },
        )
        .unwrap();
    let mut buf = vec![0u8; 65536];
    for (i, sent) in [&first, &second].into_iter().enumerate() {
        let (n, _) = tokio::time::timeout(Duration::from_secs(2), spy.recv_from(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("datagram {i} never reached the origin"))
            .unwrap();
        assert_eq!(n, sent.len(), "datagram {i}: relayed as sent, not merged");
        assert_eq!(&buf[..n], &sent[..]);
    }
    assert_counted(
        &gate.metrics().await,
        r#"icp_gate_quic_flows_total{decision="allow",listener="quic",reason="filed"} 1"#,
    );
}

/// The origin's burst (a GSO send, as a QUIC server sends a download) reaches the proxy's origin
/// socket as one GRO run and goes on to the client in one GSO send: the client gets each datagram
/// as the origin sent it, in order, the shorter last one included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origins_gso_burst_reaches_the_client_as_the_datagrams_it_sent() {
    let origin = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    origin
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let origin_state = quinn_udp::UdpSocketState::new((&origin).into()).unwrap();
    assert!(
        origin_state.max_gso_segments() >= 8,
        "this kernel has no UDP GSO, so the test cannot send a burst as one run"
    );
    origin.set_nonblocking(false).unwrap();
    let (gate, addr) = gate(origin.local_addr().unwrap(), "").await;
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.connect(addr).await.unwrap();
    let first = first_flight(FILED, &[0x31; 8]);
    client.send(&first).await.unwrap();
    let origin = tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; 65536];
        let (n, flow) = origin
            .recv_from(&mut buf)
            .expect("the filed flight arrives");
        assert_eq!(n, first.len());
        // Seven full datagrams and a shorter eighth, each its own bytes.
        let burst: Vec<Vec<u8>> = (0..8u8)
            .map(|i| {
                let len = if i == 7 { 500 } else { 1200 };
                [&[0x40u8, i][..], &vec![i; len - 2]].concat()
            })
            .collect();
        let run = burst.concat();
        origin_state
            .try_send(
                (&origin).into(),
                &quinn_udp::Transmit {
                    destination: flow,
                    ecn: None,
                    contents: &run,
                    segment_size: Some(1200),
                    src_ip: None,
                },
            )
            .unwrap();
        burst
    })
    .await
    .unwrap();
    let mut buf = [0u8; 65536];
    for (i, sent) in origin.iter().enumerate() {
        let n = tokio::time::timeout(Duration::from_secs(2), client.recv(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("datagram {i} of the burst never arrived"))
            .unwrap();
        assert!(
            buf[..n] == sent[..],
            "datagram {i}: {n} bytes arrived, {} sent",
            sent.len()
        );
    }
    let relayed = 7 * 1200 + 500;
    assert_counted(
        &gate.metrics().await,
        &format!(
            r#"icp_gate_relayed_bytes_total{{direction="origin_to_client",listener="quic"}} {relayed}"#
        ),
    );
}

/// An empty datagram, on a bound and on a wildcard listener, is dropped and counted as not QUIC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_datagram_is_counted_as_not_quic_on_bound_and_wildcard_listeners() {
    let (spy, spy_addr) = udp_spy().await;
    for bind in ["127.0.0.1:0", "0.0.0.0:0"] {
        let gate = Gate::start(&quic_config_on(bind, spy_addr)).await;
        let port = gate.server.listener_addr("quic").await.unwrap().port();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.send_to(&[], ("127.0.0.1", port)).await.unwrap();
        let line = r#"icp_gate_quic_datagrams_dropped_total{listener="quic",reason="not_quic"} 1"#;
        let started = Instant::now();
        loop {
            let metrics = gate.metrics().await;
            if metrics.contains(line) {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "{bind}: missing {line}\n{metrics}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(nothing_arrives(&spy, Duration::from_millis(100)).await);
    }
}
