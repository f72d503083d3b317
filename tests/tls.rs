//! TLS enforcement by SNI end to end: real rustls clients and origins, the captured ClientHellos
//! of real browsers and libraries, byte-exact passthrough, and every way of refusing.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::pki::Pki;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// A rustls HTTPS origin answering `tls origin saw <host>`.
async fn tls_origin(pki: &Pki) -> SocketAddr {
    let (chain, key, _, _) = pki.leaf(&[
        "www.filed.cn",
        "www.filed-example.com.cn",
        "mail.elsewhere.cn",
    ]);
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                    let host = req
                        .headers()
                        .get("host")
                        .map(|h| h.to_str().unwrap().to_string());
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from(
                        format!("tls origin saw {}", host.unwrap_or_default()),
                    ))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

/// A plain TCP origin that records every byte until the client half-closes, then answers.
async fn recording_origin() -> (SocketAddr, Arc<Mutex<Vec<Vec<u8>>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let log = log.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                let _ = s.read_to_end(&mut got).await;
                log.lock().unwrap().push(got);
                let _ = s.write_all(b"origin reply after half-close").await;
            });
        }
    });
    (addr, seen)
}

fn tls_config(origin: SocketAddr, tls_origin: SocketAddr, extra: &str) -> String {
    format!(
        r#"
[registry]
state_dir = "{{dir}}/state"
seed = "seed.ndjson"

[[listener]]
name = "tls"
bind = "127.0.0.1:0"
kind = "tls"

[[route]]
dst = "127.0.0.1/32"
mainland = true
http_origin = "{origin}"
tls_origin = "{tls_origin}"

[admin]
bind = "127.0.0.1:0"
{extra}
"#
    )
}

const FIXTURE_SEED: &str = r#"{"domain":"filed-example.com.cn","icp":"京ICP备00000009号-1","status":"filed","access_here":true}
"#;

async fn start(cfg: &str) -> (Gate, SocketAddr) {
    let gate = Gate::start_with_seed(cfg, &format!("{SEED}{FIXTURE_SEED}")).await;
    let addr = gate.server.listener_addr("tls").await.unwrap();
    (gate, addr)
}

async fn https_get(
    connector: &TlsConnector,
    addr: SocketAddr,
    sni: &str,
) -> Result<(u16, http::HeaderMap, String), std::io::Error> {
    let tcp = TcpStream::connect(addr).await?;
    let tls = connector
        .connect(ServerName::try_from(sni.to_string()).unwrap(), tcp)
        .await?;
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let req = http::Request::get(format!("https://{sni}/"))
        .header("host", sni)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = if h2 {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .map_err(std::io::Error::other)?;
        tokio::spawn(conn);
        let mut req = req;
        req.headers_mut().remove("host");
        sender
            .send_request(req)
            .await
            .map_err(std::io::Error::other)?
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(conn);
        sender
            .send_request(req)
            .await
            .map_err(std::io::Error::other)?
    };
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    Ok((status, headers, String::from_utf8_lossy(&body).into_owned()))
}

#[tokio::test]
async fn filed_sni_gets_a_verified_tls_session_with_the_origin() {
    let pki = Pki::new();
    let origin = Origin::start().await;
    let tls_origin = tls_origin(&pki).await;
    let (gate, addr) = start(&tls_config(origin.addr, tls_origin, "")).await;
    let (status, _, body) = https_get(&pki.client(&[b"http/1.1"]), addr, "www.filed.cn")
        .await
        .unwrap();
    assert_eq!(
        (status, body.as_str()),
        (200, "tls origin saw www.filed.cn")
    );
    let metrics = gate.metrics().await;
    assert!(
        metrics.contains(
            r#"icp_gate_tls_connections_total{decision="allow",listener="tls",reason="filed"} 1"#
        ),
        "{metrics}"
    );
    assert!(!metrics.contains(
        r#"icp_gate_relayed_bytes_total{direction="client_to_origin",listener="tls"} 0"#
    ));
}

/// One HTTP/1.1 request on an open client connection; returns status and body text.
async fn send(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    host: &str,
) -> (u16, String) {
    let req = http::Request::get("/")
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn alert_of(err: &std::io::Error) -> Option<rustls::Error> {
    err.get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .cloned()
}

/// Hosted mail over TLS: on a route with `require_access_here = false` a name filed with another
/// provider passes through to the real TLS origin (verified end to end); another route refuses
/// it. The live tunnel survives `access_here` changing either way and is closed within a second
/// when the filing is revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_that_waives_the_access_passes_names_filed_elsewhere_through() {
    let pki = Pki::new();
    let tls_origin = tls_origin(&pki).await;
    let cfg = format!(
        r#"
[registry]
state_dir = "{{dir}}/state"
seed = "seed.ndjson"

[[listener]]
name = "tls"
bind = "127.0.0.1:0"
kind = "tls"

[[listener]]
name = "tls-default"
bind = "127.0.0.5:0"
kind = "tls"

[[route]]
dst = "127.0.0.1/32"
mainland = true
require_access_here = false
tls_origin = "{tls_origin}"

[[route]]
dst = "127.0.0.5/32"
mainland = true
tls_origin = "{tls_origin}"

[admin]
bind = "127.0.0.1:0"
token_file = "admin.token"
"#
    );
    let (gate, waived) = start(&cfg).await;
    let default = gate.server.listener_addr("tls-default").await.unwrap();

    let tcp = TcpStream::connect(waived).await.unwrap();
    let tls = pki
        .client(&[b"http/1.1"])
        .connect(ServerName::try_from("mail.elsewhere.cn").unwrap(), tcp)
        .await
        .expect("the origin's certificate verifies through the tunnel");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    let mut conn = tokio::spawn(conn);
    assert_eq!(
        send(&mut sender, "mail.elsewhere.cn").await,
        (200, "tls origin saw mail.elsewhere.cn".to_string())
    );
    assert_eq!(gate.server.live_tunnels(), 1, "registered for revocation");

    let err = https_get(&pki.client(&[]), default, "mail.elsewhere.cn")
        .await
        .unwrap_err();
    assert_eq!(
        alert_of(&err),
        Some(rustls::Error::AlertReceived(
            rustls::AlertDescription::AccessDenied
        )),
        "{err}"
    );
    let metrics = gate.metrics().await;
    for line in [
        r#"icp_gate_tls_connections_total{decision="allow",listener="tls",reason="filed_elsewhere"} 1"#,
        r#"icp_gate_tls_connections_total{decision="block",listener="tls-default",reason="not_accessed"} 1"#,
    ] {
        assert!(metrics.contains(line), "missing {line}\n{metrics}");
    }

    let put = |status: &'static str, access_here: bool| {
        let admin = gate.admin;
        async move {
            let entry = format!(
                r#"{{"domain":"elsewhere.cn","icp":"沪ICP备00000002号-1","status":"{status}","access_here":{access_here}}}"#
            );
            let auth = [("host", "admin"), ("authorization", "Bearer test-token")];
            let path = "/v1/registry/entries/elsewhere.cn";
            let (code, _, body) = http1(admin, "PUT", path, &auth, entry.as_bytes()).await;
            assert_eq!(code, 200, "{body}");
        }
    };
    // The access moving here and away again leaves the tunnel open.
    for access_here in [true, false] {
        put("filed", access_here).await;
        assert_eq!(
            send(&mut sender, "mail.elsewhere.cn").await.0,
            200,
            "access_here = {access_here}"
        );
    }

    put("revoked", false).await;
    tokio::time::timeout(Duration::from_secs(1), &mut conn)
        .await
        .expect("the tunnel outlived the revocation")
        .unwrap()
        .ok();
    let err = https_get(&pki.client(&[]), waived, "mail.elsewhere.cn")
        .await
        .unwrap_err();
    assert!(alert_of(&err).is_some(), "{err}");
    assert!(gate.metrics().await.contains(
        r#"icp_gate_tls_connections_total{decision="block",listener="tls",reason="revoked"} 1"#
    ));
}

#[tokio::test]
async fn unfiled_sni_is_refused_with_an_access_denied_alert() {
    let pki = Pki::new();
    let origin = Origin::start().await;
    let (gate, addr) = start(&tls_config(origin.addr, tls_origin(&pki).await, "")).await;
    for (sni, reason) in [
        ("www.unfiled.cn", "unfiled"),
        ("gone.cn", "revoked"),
        ("elsewhere.cn", "not_accessed"),
    ] {
        let err = https_get(&pki.client(&[]), addr, sni).await.unwrap_err();
        let alert = err
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
            .cloned();
        assert_eq!(
            alert,
            Some(rustls::Error::AlertReceived(
                rustls::AlertDescription::AccessDenied
            )),
            "{sni}: {err}"
        );
        let line = format!(
            r#"icp_gate_tls_connections_total{{decision="block",listener="tls",reason="{reason}"}} 1"#
        );
        assert!(gate.metrics().await.contains(&line), "{line}");
    }
}

#[tokio::test]
async fn reset_mode_sends_a_tcp_reset() {
    let pki = Pki::new();
    let origin = Origin::start().await;
    let (_gate, addr) = start(&tls_config(
        origin.addr,
        tls_origin(&pki).await,
        "[tls]\nblock = \"reset\"",
    ))
    .await;
    let err = https_get(&pki.client(&[]), addr, "www.unfiled.cn")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
}

#[tokio::test]
async fn block_certificate_serves_the_block_page_over_h1_and_h2() {
    let pki = Pki::new();
    let origin = Origin::start().await;
    let (_, _, cert_pem, key_pem) = pki.leaf(&["www.unfiled.cn"]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("block.crt"), cert_pem).unwrap();
    std::fs::write(dir.path().join("block.key"), key_pem).unwrap();
    let extra = format!(
        "[tls]\nblock_cert = \"{0}/block.crt\"\nblock_key = \"{0}/block.key\"",
        dir.path().display()
    );
    let (_gate, addr) = start(&tls_config(origin.addr, tls_origin(&pki).await, &extra)).await;
    for alpn in [&b"http/1.1"[..], &b"h2"[..]] {
        let (status, headers, body) = https_get(&pki.client(&[alpn]), addr, "www.unfiled.cn")
            .await
            .unwrap();
        assert_eq!(status, 403, "{}", String::from_utf8_lossy(alpn));
        assert_eq!(headers["icp-gate-reason"], "unfiled");
        assert!(headers.contains_key("x-request-id"));
        assert!(body.contains("未备案") && body.contains("www.unfiled.cn"));
    }
}

#[tokio::test]
async fn missing_sni_follows_policy_no_sni() {
    let (origin_addr, seen) = recording_origin().await;
    let nosni = std::fs::read(testdata("clienthello/openssl-nosni.bin")).unwrap();

    let (gate, addr) = start(&tls_config(origin_addr, origin_addr, "")).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&nosni).await.unwrap();
    let answer = read_for(&mut s, Duration::from_secs(3)).await;
    assert_eq!(
        answer.as_bytes(),
        [0x15, 3, 3, 0, 2, 2, 49],
        "fatal access_denied alert"
    );
    assert!(gate.metrics().await.contains(r#"reason="no_sni""#));

    let cfg = tls_config(origin_addr, origin_addr, "").replace(
        "[[listener]]",
        "[policy]\nno_sni = \"allow\"\n\n[[listener]]",
    );
    let (_gate, addr) = start(&cfg).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&nosni).await.unwrap();
    s.shutdown().await.unwrap();
    read_for(&mut s, Duration::from_secs(3)).await;
    assert_eq!(seen.lock().unwrap().last().unwrap(), &nosni);
}

#[tokio::test]
async fn real_client_hellos_pass_through_byte_for_byte_however_fragmented() {
    let (origin_addr, seen) = recording_origin().await;
    let (gate, addr) = start(&tls_config(origin_addr, origin_addr, "")).await;
    for name in [
        "chromium.bin",
        "curl.bin",
        "python.bin",
        "openssl.bin",
        "node.bin",
    ] {
        let hello = std::fs::read(testdata(&format!("clienthello/{name}"))).unwrap();
        for (how, wire, segment) in [
            ("as captured", hello.clone(), usize::MAX),
            ("1-byte TCP writes", hello.clone(), 1),
            ("7-byte records", into_records(&hello, 7), 13),
            ("1-byte records", into_records(&hello, 1), 500),
        ] {
            let mut sent = wire.clone();
            sent.extend_from_slice(b"\x17\x03\x03\x00\x05later");
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.set_nodelay(true).unwrap();
            for chunk in sent.chunks(segment.min(sent.len())) {
                s.write_all(chunk).await.unwrap();
                if segment < 16 {
                    tokio::time::sleep(Duration::from_micros(200)).await;
                }
            }
            s.shutdown().await.unwrap();
            let reply = read_for(&mut s, Duration::from_secs(5)).await;
            assert_eq!(reply, "origin reply after half-close", "{name} {how}");
            assert!(
                seen.lock().unwrap().last().unwrap() == &sent,
                "{name} {how}: bytes changed in passthrough"
            );
        }
    }
    let metrics = gate.metrics().await;
    assert!(
        metrics.contains(
            r#"icp_gate_tls_connections_total{decision="allow",listener="tls",reason="filed"} 20"#
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn real_client_hellos_with_an_unfiled_name_are_refused_however_fragmented() {
    let (origin_addr, seen) = recording_origin().await;
    let (_gate, addr) = start(&tls_config(origin_addr, origin_addr, "")).await;
    for name in ["chromium.bin", "curl.bin", "openssl.bin"] {
        // Same length, so every length field stays valid: filed-example → unfil-example.
        let hello = replace(
            &std::fs::read(testdata(&format!("clienthello/{name}"))).unwrap(),
            b"www.filed-example",
            b"www.unfil-example",
        );
        for wire in [hello.clone(), into_records(&hello, 3)] {
            let mut s = TcpStream::connect(addr).await.unwrap();
            for chunk in wire.chunks(5) {
                s.write_all(chunk).await.unwrap();
            }
            let answer = read_for(&mut s, Duration::from_secs(3)).await;
            assert_eq!(answer.as_bytes(), [0x15, 3, 3, 0, 2, 2, 49], "{name}");
        }
    }
    assert!(
        seen.lock().unwrap().is_empty(),
        "nothing reached the origin"
    );
}

/// Many clients at once, filed and unfiled interleaved, each writing its whole ClientHello as
/// soon as it is connected: every refused one gets the alert and the close (the FIN sent with
/// the alert), every filed one reaches the origin byte for byte, and each is counted once.
#[tokio::test]
async fn a_burst_of_filed_and_refused_connections_is_answered_on_each() {
    let (origin_addr, seen) = recording_origin().await;
    let (gate, addr) = start(&tls_config(origin_addr, origin_addr, "")).await;
    let filed = std::fs::read(testdata("clienthello/openssl.bin")).unwrap();
    let unfiled = replace(&filed, b"www.filed-example", b"www.unfil-example");
    let clients: Vec<_> = (0..64)
        .map(|i| {
            let hello = if i % 2 == 0 { &unfiled } else { &filed }.clone();
            tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.unwrap();
                s.write_all(&hello).await.unwrap();
                if i % 2 == 1 {
                    s.shutdown().await.unwrap();
                }
                read_until_closed(&mut s, Duration::from_secs(5)).await
            })
        })
        .collect();
    for (i, client) in clients.into_iter().enumerate() {
        let answer = client.await.unwrap();
        if i % 2 == 0 {
            assert_eq!(answer.as_bytes(), [0x15, 3, 3, 0, 2, 2, 49], "client {i}");
        } else {
            assert_eq!(answer, "origin reply after half-close", "client {i}");
        }
    }
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    assert_eq!(seen.len(), 32);
    assert!(
        seen.iter().all(|got| got == &filed),
        "bytes changed in passthrough"
    );
    let metrics = gate.metrics().await;
    for line in [
        r#"icp_gate_tls_connections_total{decision="allow",listener="tls",reason="filed"} 32"#,
        r#"icp_gate_tls_connections_total{decision="block",listener="tls",reason="unfiled"} 32"#,
    ] {
        assert!(metrics.contains(line), "{line}\n{metrics}");
    }
}

#[tokio::test]
async fn malformed_oversize_slow_and_non_tls_are_closed() {
    let (origin_addr, seen) = recording_origin().await;
    let extra = "[tls]\nmax_client_hello = 1024\nclient_hello_timeout = \"500ms\"";
    let (gate, addr) = start(&tls_config(origin_addr, origin_addr, extra)).await;
    let openssl = std::fs::read(testdata("clienthello/openssl.bin")).unwrap();
    let chromium = std::fs::read(testdata("clienthello/chromium.bin")).unwrap();
    let cases: [(&str, Vec<u8>); 3] = [
        (
            "invalid_sni",
            replace(&openssl, b"www.filed-example", b"www.filed_example"),
        ),
        ("invalid_sni", chromium.clone()),
        (
            "not_tls",
            b"GET / HTTP/1.1\r\nHost: filed-example.com.cn\r\n\r\n".to_vec(),
        ),
    ];
    for (reason, wire) in &cases {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let _ = s.write_all(wire).await;
        assert_eq!(
            read_for(&mut s, Duration::from_secs(3)).await,
            "",
            "{reason}: closed without an answer"
        );
    }
    // Half a ClientHello, then silence: closed after client_hello_timeout.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&openssl[..100]).await.unwrap();
    assert!(closed_within(&mut s, Duration::from_secs(3)).await);
    let metrics = gate.metrics().await;
    assert!(metrics.contains(r#"icp_gate_tls_connections_total{decision="block",listener="tls",reason="invalid_sni"} 3"#), "{metrics}");
    assert!(metrics.contains(
        r#"icp_gate_tls_connections_total{decision="block",listener="tls",reason="not_tls"} 1"#
    ));
    assert!(seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn openssl_s_client_is_passed_through_or_refused() {
    // openssl comes with the README's setup step (and .ci/run); without it this fails.
    assert!(
        std::process::Command::new("openssl")
            .arg("version")
            .output()
            .is_ok(),
        "openssl not found: install Debian's openssl package (see the README's setup step)"
    );
    let pki = Pki::new();
    let origin = Origin::start().await;
    let (_gate, addr) = start(&tls_config(origin.addr, tls_origin(&pki).await, "")).await;
    let ca = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca.path(), pki.ca.pem()).unwrap();
    let run = |sni: &'static str| {
        let ca = ca.path().to_path_buf();
        tokio::task::spawn_blocking(move || {
            let out = std::process::Command::new("openssl")
                .args([
                    "s_client",
                    "-connect",
                    &addr.to_string(),
                    "-servername",
                    sni,
                    "-verify_return_error",
                    "-CAfile",
                ])
                .arg(ca)
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr)
        })
    };
    let filed = run("www.filed.cn").await.unwrap();
    assert!(filed.contains("Verify return code: 0 (ok)"), "{filed}");
    let unfiled = run("www.unfiled.cn").await.unwrap();
    assert!(unfiled.contains("access denied"), "{unfiled}");
}

/// Re-splits the single handshake record of `hello` into records of `size` payload bytes.
fn into_records(hello: &[u8], size: usize) -> Vec<u8> {
    let (header, payload) = hello.split_at(5);
    payload
        .chunks(size)
        .flat_map(|chunk| {
            let mut r = vec![
                header[0],
                header[1],
                header[2],
                (chunk.len() >> 8) as u8,
                chunk.len() as u8,
            ];
            r.extend_from_slice(chunk);
            r
        })
        .collect()
}

fn replace(bytes: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let at = bytes
        .windows(from.len())
        .position(|w| w == from)
        .expect("pattern present");
    let mut out = bytes.to_vec();
    out[at..at + from.len()].copy_from_slice(to);
    out
}
