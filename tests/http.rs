//! HTTP enforcement end to end: the real server on loopback, a real origin, real clients.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

async fn get(gate: &Gate, host: &str) -> (u16, http::HeaderMap, String) {
    http1(gate.http, "GET", "/page?q=1", &[("host", host)], b"").await
}

fn reason(headers: &http::HeaderMap) -> &str {
    headers
        .get("icp-gate-reason")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
}

#[tokio::test]
async fn every_registry_reason() {
    let origin = Origin::start().await;
    let gate = Gate::start(&config(origin.addr, "")).await;

    let (status, headers, body) = get(&gate, "filed.cn").await;
    assert_eq!((status, body.as_str()), (200, "origin saw filed.cn/page"));
    assert!(
        headers.get("icp-gate-reason").is_none(),
        "forwarded answers are untouched"
    );
    assert_eq!(origin.last().uri, "/page?q=1");

    for (host, want, zh) in [
        ("unfiled.cn", "unfiled", "未备案"),
        ("elsewhere.cn", "not_accessed", "已备案但未接入本服务商"),
        ("gone.cn", "revoked", "备案已注销"),
        ("edu.x.gov.cn", "revoked", "备案已注销"),
    ] {
        let (status, headers, body) = get(&gate, host).await;
        assert_eq!(status, 403, "{host}");
        assert_eq!(reason(&headers), want, "{host}");
        assert_eq!(headers["cache-control"], "no-store");
        assert_eq!(headers["content-type"], "text/html; charset=utf-8");
        let id = headers["x-request-id"].to_str().unwrap();
        assert!(
            body.contains(host) && body.contains(zh) && body.contains(id),
            "{host}: {body}"
        );
    }
    // A filed sub-domain entry under gov.cn opens only its subtree.
    assert_eq!(get(&gate, "www.x.gov.cn").await.0, 200);
    assert_eq!(origin.count(), 2, "blocked requests never reach the origin");

    // IP literal (allowed by default), exempt names, public suffixes.
    assert_eq!(get(&gate, "127.0.0.1:8080").await.0, 200);
    assert_eq!(get(&gate, "a.console.example").await.0, 200);
    let (status, headers, _) = get(&gate, "com.cn").await;
    assert_eq!((status, reason(&headers)), (403, "invalid_host"));

    let metrics = gate.metrics().await;
    for line in [
        r#"icp_gate_requests_total{decision="allow",listener="http",reason="filed"} 2"#,
        r#"icp_gate_requests_total{decision="block",listener="http",reason="revoked"} 2"#,
        r#"icp_gate_requests_total{decision="allow",listener="http",reason="ip_literal"} 1"#,
        r#"icp_gate_requests_total{decision="allow",listener="http",reason="exempt"} 1"#,
        r#"icp_gate_requests_total{decision="block",listener="http",reason="invalid_host"} 1"#,
    ] {
        assert!(metrics.contains(line), "missing {line}\n{metrics}");
    }
}

#[tokio::test]
async fn host_normalisation() {
    let origin = Origin::start().await;
    let gate = Gate::start(&config(origin.addr, "")).await;
    for host in [
        "FILED.CN",
        "filed.cn:8080",
        "filed.cn.",
        "WWW.Filed.Cn.:443",
        "xn--fsqu00a.xn--fiqs8s",
    ] {
        assert_eq!(get(&gate, host).await.0, 200, "{host}");
        assert_eq!(
            origin.last().headers["host"],
            host,
            "the origin sees the Host as sent"
        );
    }
    for host in ["unfiled.cn.", "UNFILED.CN:80", "filed.cn.evil.cn"] {
        assert_eq!(get(&gate, host).await.0, 403, "{host}");
    }
    // Unicode Host bytes on the wire equal their punycode form.
    let resp = raw(
        gate.http,
        "GET / HTTP/1.1\r\nHost: www.例子.中国\r\nConnection: close\r\n\r\n".as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(statuses(&resp), [200], "{resp}");
    // Malformed hosts are protocol errors: 400, with the reason.
    for host in [
        "filed.cn@unfiled.cn",
        "user@filed.cn",
        "a..cn",
        "filed.cn:99999",
        "exa mple.cn",
        "[::1",
    ] {
        let (status, headers, _) = get(&gate, host).await;
        assert_eq!((status, reason(&headers)), (400, "invalid_host"), "{host}");
    }
}

#[tokio::test]
async fn absolute_form_target_wins_both_ways() {
    let origin = Origin::start().await;
    let gate = Gate::start(&config(origin.addr, "")).await;
    let resp = raw(
        gate.http,
        b"GET http://filed.cn/abs?x=1 HTTP/1.1\r\nHost: unfiled.cn\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(statuses(&resp), [200], "{resp}");
    let seen = origin.last();
    assert_eq!(seen.uri, "/abs?x=1", "origin-form toward the origin");
    assert_eq!(
        seen.headers["host"], "filed.cn",
        "Host set to the target's authority"
    );

    let resp = raw(
        gate.http,
        b"GET http://unfiled.cn/abs HTTP/1.1\r\nHost: filed.cn\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(statuses(&resp), [403], "{resp}");
    assert!(resp.contains("icp-gate-reason: unfiled"));
    assert_eq!(origin.count(), 1);
}

#[tokio::test]
async fn duplicate_and_missing_host() {
    let origin = Origin::start().await;
    let gate = Gate::start(&config(origin.addr, "")).await;
    let dup = raw(
        gate.http,
        b"GET / HTTP/1.1\r\nHost: filed.cn\r\nHost: unfiled.cn\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(statuses(&dup), [400], "{dup}");
    assert!(dup.contains("icp-gate-reason: invalid_host"));
    // Even two identical Host headers are refused: smuggling starts with ambiguity.
    let same = raw(
        gate.http,
        b"GET / HTTP/1.1\r\nHost: filed.cn\r\nHost: filed.cn\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(statuses(&same), [400]);

    let v11 = raw(
        gate.http,
        b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(statuses(&v11), [400], "{v11}");
    assert!(v11.contains("icp-gate-reason: missing_host"));
    let v10 = raw(gate.http, b"GET / HTTP/1.0\r\n\r\n", Duration::from_secs(5)).await;
    assert!(
        v10.starts_with("HTTP/1.0 403") || v10.starts_with("HTTP/1.1 403"),
        "{v10}"
    );
    assert!(v10.contains("icp-gate-reason: missing_host"));
    assert_eq!(origin.count(), 0);
}

#[tokio::test]
async fn kept_alive_connection_decides_every_request() {
    let origin = Origin::start().await;
    let gate = Gate::start(&config(origin.addr, "")).await;
    let stream = TcpStream::connect(gate.http).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    for (host, want) in [
        ("filed.cn", 200),
        ("unfiled.cn", 403),
        ("filed.cn", 200),
        ("gone.cn", 403),
    ] {
        let req = Request::get("/")
            .header("host", host)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), want, "{host}");
        resp.into_body().collect().await.unwrap();
    }
    assert_eq!(origin.count(), 2);
}

#[tokio::test]
async fn pipelined_requests_with_different_hosts() {
    let origin = Origin::start().await;
    let gate = Gate::start(&config(origin.addr, "")).await;
    let burst = b"GET /1 HTTP/1.1\r\nHost: filed.cn\r\n\r\n\
GET /2 HTTP/1.1\r\nHost: unfiled.cn\r\n\r\n\
GET /3 HTTP/1.1\r\nHost: www.filed.cn\r\n\r\n\
GET /4 HTTP/1.1\r\nHost: elsewhere.cn\r\nConnection: close\r\n\r\n";
    let resp = raw(gate.http, burst, Duration::from_secs(5)).await;
    assert_eq!(statuses(&resp), [200, 403, 200, 403], "{resp}");
    let paths: Vec<String> = origin
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.uri.to_string())
        .collect();
    assert_eq!(paths, ["/1", "/3"]);
}

#[tokio::test]
async fn h2c_prior_knowledge_decides_each_stream() {
    let origin = Origin::start().await;
    let gate = Gate::start(&config(origin.addr, "")).await;
    let stream = TcpStream::connect(gate.http).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let send = |authority: &str, host: Option<&str>| {
        let mut sender = sender.clone();
        let mut req = Request::get(format!("http://{authority}/h2"));
        if let Some(h) = host {
            req = req.header("host", h);
        }
        let req = req.body(Full::new(Bytes::new())).unwrap();
        async move {
            let resp = sender.send_request(req).await.unwrap();
            let status = resp.status().as_u16();
            let reason = resp
                .headers()
                .get("icp-gate-reason")
                .map(|v| v.to_str().unwrap().to_string());
            resp.into_body().collect().await.unwrap();
            (status, reason)
        }
    };
    assert_eq!(send("filed.cn", None).await, (200, None));
    let seen = origin.last();
    assert_eq!(
        seen.headers["host"], "filed.cn",
        "HTTP/1.1 toward the origin gets Host from :authority"
    );
    assert_eq!(
        send("unfiled.cn", None).await,
        (403, Some("unfiled".into()))
    );
    assert_eq!(
        send("filed.cn", Some("unfiled.cn")).await,
        (400, Some("invalid_host".into()))
    );
    assert_eq!(send("filed.cn", Some("FILED.cn")).await.0, 200);
    assert_eq!(origin.count(), 2);
}

#[tokio::test]
async fn report_mode_forwards_and_counts() {
    let origin = Origin::start().await;
    let gate =
        Gate::start(&config(origin.addr, "").replace("[policy]", "[policy]\nmode = \"report\""))
            .await;
    let (status, _, body) = get(&gate, "unfiled.cn").await;
    assert_eq!((status, body.as_str()), (200, "origin saw unfiled.cn/page"));
    assert_eq!(get(&gate, "filed.cn").await.0, 200);
    // Protocol errors stay 400 in report mode.
    assert_eq!(get(&gate, "a@b.cn").await.0, 400);
    let metrics = gate.metrics().await;
    assert!(
        metrics.contains(
            r#"icp_gate_requests_total{decision="report",listener="http",reason="unfiled"} 1"#
        ),
        "{metrics}"
    );
    assert!(metrics.contains(
        r#"icp_gate_requests_total{decision="block",listener="http",reason="invalid_host"} 1"#
    ));
}

#[tokio::test]
async fn report_mode_per_route() {
    let origin = Origin::start().await;
    let cfg =
        config(origin.addr, "").replace("mainland = true", "mainland = true\nmode = \"report\"");
    let gate = Gate::start(&cfg).await;
    assert_eq!(get(&gate, "unfiled.cn").await.0, 200);
}

#[tokio::test]
async fn origin_down_is_502_and_slow_origin_is_504() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let gate = Gate::start(&config(closed, "")).await;
    let (status, headers, _) = get(&gate, "filed.cn").await;
    assert_eq!(status, 502);
    assert!(headers.contains_key("x-request-id"));
    let metrics = gate.metrics().await;
    assert!(
        metrics.contains(r#"icp_gate_upstream_errors_total{kind="connect",listener="http"} 1"#),
        "{metrics}"
    );

    let origin = Origin::start().await;
    let gate = Gate::start(&config(
        origin.addr,
        "[limits]\norigin_response_timeout = \"300ms\"",
    ))
    .await;
    let (status, _, _) = http1(gate.http, "GET", "/slow", &[("host", "filed.cn")], b"").await;
    assert_eq!(status, 504);
    assert!(
        gate.metrics()
            .await
            .contains(r#"icp_gate_upstream_errors_total{kind="timeout",listener="http"} 1"#)
    );
}

#[tokio::test]
async fn a_malformed_request_body_is_the_clients_400_not_the_origins_502() {
    let origin = Origin::start().await;
    let gate = Gate::start(&config(origin.addr, "")).await;
    for bad_chunk in ["0x4", "FFFFFFFFFFFFFFFFF1", "4 4"] {
        let request = format!(
            "POST /echo HTTP/1.1\r\nHost: filed.cn\r\nTransfer-Encoding: chunked\r\n\r\n\
             {bad_chunk}\r\nabcd\r\n0\r\n\r\n"
        );
        let answer = raw(gate.http, request.as_bytes(), Duration::from_secs(2)).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{bad_chunk}: {answer}");
    }
    let metrics = gate.metrics().await;
    let upstream: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("icp_gate_upstream_errors_total{"))
        .collect();
    assert_eq!(upstream.len(), 3, "{metrics}");
    for line in upstream {
        assert!(line.ends_with(" 0"), "the origin did nothing wrong: {line}");
    }
}

#[tokio::test]
async fn forwarding_headers_and_streamed_bodies() {
    let origin = Origin::start().await;
    let gate = Gate::start(&config(origin.addr, "")).await;
    let body = vec![b'x'; 3 * 1024 * 1024 + 7];
    let (status, _, echoed) = http1(
        gate.http,
        "POST",
        "/echo",
        &[
            ("host", "filed.cn"),
            ("x-forwarded-for", "203.0.113.9"),
            ("connection", "keep-alive, x-private"),
            ("x-private", "hop"),
            ("keep-alive", "timeout=5"),
            ("x-custom", "kept"),
        ],
        &body,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(echoed.len(), body.len());
    let seen = origin.last();
    assert_eq!(seen.headers["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(seen.headers["x-custom"], "kept");
    for hop in ["x-private", "keep-alive"] {
        assert!(!seen.headers.contains_key(hop), "{hop} forwarded");
    }
    let (_, headers, _) = http1(gate.http, "GET", "/", &[("host", "filed.cn")], b"").await;
    assert_eq!(headers["x-origin"], "yes");
    assert!(
        !headers.contains_key("x-origin-private"),
        "response hop-by-hop header forwarded"
    );

    let gate = Gate::start(&config(origin.addr, "").replace(
        "mainland = true",
        "mainland = true\nx_forwarded_for = false",
    ))
    .await;
    http1(gate.http, "GET", "/", &[("host", "filed.cn")], b"").await;
    assert!(!origin.last().headers.contains_key("x-forwarded-for"));
}

#[tokio::test]
async fn websocket_style_upgrade_is_relayed() {
    let origin = Origin::start().await;
    let gate = Gate::start(&config(origin.addr, "")).await;
    let mut s = TcpStream::connect(gate.http).await.unwrap();
    let head = ask(
        &mut s,
        b"GET /ws HTTP/1.1\r\nHost: filed.cn\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
        b"\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let echoed = ask(&mut s, b"ping through the tunnel", b"tunnel").await;
    assert_eq!(echoed, "ping through the tunnel");

    let mut s = TcpStream::connect(gate.http).await.unwrap();
    let head = ask(
        &mut s,
        b"GET /ws HTTP/1.1\r\nHost: unfiled.cn\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
        b"\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
}

/// An origin that speaks h2c the way the "h2c smuggling" trick needs: it switches any request
/// that offers `Upgrade: h2c`, then keeps every byte that follows; other requests get `plain`.
/// Returns its address and everything it received.
async fn h2c_origin() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
) {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = received.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                log.lock().unwrap().extend_from_slice(&head);
                let offers_h2c = String::from_utf8_lossy(&head)
                    .to_ascii_lowercase()
                    .contains("upgrade: h2c");
                if !offers_h2c {
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nplain")
                        .await;
                }
                let switched = b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n";
                if offers_h2c && s.write_all(switched).await.is_err() {
                    return;
                }
                while let Ok(n @ 1..) = s.read(&mut buf).await {
                    log.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
        }
    });
    (addr, received)
}

#[tokio::test]
async fn an_h2c_upgrade_cannot_carry_requests_past_the_decision() {
    let (origin, received) = h2c_origin().await;
    let gate = Gate::start(&config(origin, "")).await;
    let mut s = TcpStream::connect(gate.http).await.unwrap();
    // A filed host asks to switch to h2c; were it switched, what follows would be relayed to
    // the origin unread: here an HTTP/1.1 request for an unfiled host stands in for the HTTP/2
    // streams a real client would send.
    let answer = ask(
        &mut s,
        b"GET / HTTP/1.1\r\nHost: filed.cn\r\nConnection: Upgrade, HTTP2-Settings\r\n\
          Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
        b"plain",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    let answer = ask(
        &mut s,
        b"GET / HTTP/1.1\r\nHost: unfiled.cn\r\n\r\n",
        b"\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");

    let seen = String::from_utf8_lossy(&received.lock().unwrap()).to_ascii_lowercase();
    assert!(seen.contains("host: filed.cn"), "{seen}");
    for never in ["unfiled", "upgrade", "h2c", "http2-settings"] {
        assert!(!seen.contains(never), "origin saw {never:?}: {seen}");
    }
}

#[tokio::test]
async fn an_upgrade_offering_h2c_among_others_offers_only_the_others() {
    let origin = Origin::start().await;
    let gate = Gate::start(&config(origin.addr, "")).await;
    let mut s = TcpStream::connect(gate.http).await.unwrap();
    let head = ask(
        &mut s,
        b"GET /ws HTTP/1.1\r\nHost: filed.cn\r\nConnection: Upgrade, HTTP2-Settings\r\n\
          Upgrade: h2c, echo\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
        b"\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let seen = origin.last().headers;
    assert_eq!(seen["upgrade"], "echo");
    assert!(!seen.contains_key("http2-settings"), "{seen:?}");
}

/// Writes `request` on `s`, then reads until `end` has arrived.
async fn ask(s: &mut TcpStream, request: &[u8], end: &[u8]) -> String {
    s.write_all(request).await.unwrap();
    read_until(s, end).await
}

async fn read_until(s: &mut TcpStream, end: &[u8]) -> String {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let mut byte = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(5), async {
        while !out.ends_with(end) {
            if s.read(&mut byte).await.unwrap() == 0 {
                break;
            }
            out.push(byte[0]);
        }
    })
    .await
    .expect("read timed out");
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn no_route_closes_and_non_mainland_forwards_without_lookup() {
    let origin = Origin::start().await;
    let cfg = config(origin.addr, "")
        + r#"
[[listener]]
name = "unrouted"
bind = "127.0.0.2:0"
kind = "http"

[[listener]]
name = "abroad"
bind = "127.0.0.3:0"
kind = "http"

[[route]]
dst = "127.0.0.3/32"
mainland = false
http_origin = "ORIGIN"
"#
        .replace("ORIGIN", &origin.addr.to_string())
        .as_str();
    let gate = Gate::start(&cfg).await;
    let unrouted = gate.server.listener_addr("unrouted").await.unwrap();
    let abroad = gate.server.listener_addr("abroad").await.unwrap();

    let resp = raw(
        unrouted,
        b"GET / HTTP/1.1\r\nHost: filed.cn\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(resp, "", "no route: closed without an answer");
    let (status, _, _) = http1(abroad, "GET", "/", &[("host", "unfiled.cn")], b"").await;
    assert_eq!(status, 200);
    let metrics = gate.metrics().await;
    assert!(
        metrics.contains(
            r#"icp_gate_requests_total{decision="refuse",listener="unrouted",reason="no_route"} 1"#
        ),
        "{metrics}"
    );
    assert!(metrics.contains(
        r#"icp_gate_requests_total{decision="allow",listener="abroad",reason="non_mainland"} 1"#
    ));
}

#[tokio::test]
async fn block_page_variants() {
    let origin = Origin::start().await;
    let gate = Gate::start(&config(origin.addr, "[block_page]\nstatus = 451")).await;
    let (status, headers, body) = http1(
        gate.http,
        "GET",
        "/",
        &[("host", "unfiled.cn"), ("accept", "application/json")],
        b"",
    )
    .await;
    assert_eq!(status, 451);
    assert_eq!(headers["content-type"], "application/json");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["host"], "unfiled.cn");
    assert_eq!(v["reason"], "unfiled");
    assert_eq!(v["request_id"], headers["x-request-id"].to_str().unwrap());

    let (status, headers, body) =
        http1(gate.http, "HEAD", "/", &[("host", "unfiled.cn")], b"").await;
    assert_eq!((status, body.as_str()), (451, ""));
    assert_eq!(reason(&headers), "unfiled");

    let gate = Gate::start(&config(
        origin.addr,
        "[block_page]\nredirect = \"https://beian.example/blocked?d={host}\"",
    ))
    .await;
    let (status, headers, _) = get(&gate, "gone.cn").await;
    assert_eq!(status, 302);
    assert_eq!(
        headers["location"],
        "https://beian.example/blocked?d=gone.cn"
    );
    assert_eq!(reason(&headers), "revoked");
}

#[tokio::test]
async fn metric_labels_never_carry_client_values() {
    let origin = Origin::start().await;
    let gate = Gate::start(&config(origin.addr, "")).await;
    for host in ["evil-label-value.cn", "filed.cn"] {
        get(&gate, host).await;
    }
    raw(
        gate.http,
        b"GET / HTTP/1.1\r\nHost: bad host\r\nConnection: close\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    let metrics = gate.metrics().await;
    assert!(!metrics.contains("evil-label-value") && !metrics.contains("bad host"));
}

/// Simple requests are served by the hand-written fast path, others by hyper; one connection can
/// carry both, in order, and what hyper serves first stays with hyper.
#[tokio::test]
async fn fast_path_and_hyper_share_a_connection_in_order() {
    let origin = Origin::start().await;
    let gate = Gate::start(&config(origin.addr, "")).await;
    let burst: &[u8] =
        b"GET /fast HTTP/1.1\r\nHost: filed.cn\r\nX-Forwarded-For: 203.0.113.9\r\n\r\n\
GET /chunked HTTP/1.1\r\nHost: filed.cn\r\n\r\n\
HEAD /head HTTP/1.1\r\nHost: unfiled.cn\r\n\r\n\
POST /echo HTTP/1.1\r\nHost: filed.cn\r\nContent-Length: 5\r\n\r\nhello\
GET /after HTTP/1.1\r\nHost: filed.cn\r\n\r\n\
GET /last HTTP/1.1\r\nHost: unfiled.cn\r\nConnection: close\r\n\r\n";
    let mut s = TcpStream::connect(gate.http).await.unwrap();
    // The first head arrives in two pieces.
    s.write_all(&burst[..20]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.write_all(&burst[20..]).await.unwrap();
    let resp = read_for(&mut s, Duration::from_secs(5)).await;
    assert_eq!(statuses(&resp), [200, 200, 403, 200, 200, 403], "{resp}");
    assert!(resp.contains("origin saw filed.cn/fast"), "{resp}");
    assert!(
        resp.contains("transfer-encoding: chunked\r\n") && resp.contains("a chunked answer"),
        "{resp}"
    );
    let head = &resp[resp.find("HTTP/1.1 403").unwrap()..];
    let head = &head[..head.find("HTTP/1.1 200").unwrap()];
    assert!(
        head.contains("content-length: ") && head.ends_with("\r\n\r\n"),
        "HEAD got a body: {head}"
    );
    assert!(resp.contains("\r\n\r\nhello"), "{resp}");
    assert!(resp.contains("origin saw filed.cn/after"), "{resp}");
    let seen = origin.seen.lock().unwrap().clone();
    let paths: Vec<String> = seen.iter().map(|s| s.uri.to_string()).collect();
    assert_eq!(paths, ["/fast", "/chunked", "/echo", "/after"]);
    assert_eq!(seen[0].headers["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(seen[0].headers["host"], "filed.cn");
    assert!(!seen[0].headers.contains_key("connection"));
}

/// An origin response the fast path cannot frame is a 502, counted, and the client connection
/// stays usable; the origin connection is not reused.
#[tokio::test]
async fn malformed_origin_response_is_502() {
    let addr =
        raw_origin(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd").await;
    let gate = Gate::start(&config(addr, "")).await;
    let resp = raw(
        gate.http,
        b"GET / HTTP/1.1\r\nHost: filed.cn\r\n\r\nGET / HTTP/1.1\r\nHost: unfiled.cn\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(statuses(&resp), [502, 403], "{resp}");
    assert!(resp.contains("x-request-id: "), "{resp}");
    assert!(!resp.contains("abcd"), "{resp}");
    assert!(
        gate.metrics()
            .await
            .contains(r#"icp_gate_upstream_errors_total{kind="reset",listener="http"} 1"#)
    );
}

/// Hosted mail: on a route with `require_access_here = false` a name filed with another
/// provider reaches the origin (`filed_elsewhere`), the default route still blocks it
/// (`not_accessed`), the waiver never covers a missing or revoked filing, and a revocation
/// closes an upgraded connection it allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_that_waives_the_access_forwards_names_filed_elsewhere() {
    let origin = Origin::start().await;
    let cfg = config(origin.addr, "")
        + r#"
[[listener]]
name = "mail"
bind = "127.0.0.4:0"
kind = "http"

[[route]]
dst = "127.0.0.4/32"
mainland = true
require_access_here = false
http_origin = "ORIGIN"
"#
        .replace("ORIGIN", &origin.addr.to_string())
        .as_str();
    let gate = Gate::start(&cfg).await;
    let mail = gate.server.listener_addr("mail").await.unwrap();
    let get_mail = |host: &'static str| async move {
        http1(mail, "GET", "/owa/", &[("host", host)], b"").await
    };

    let (status, headers, body) = get_mail("mail.elsewhere.cn").await;
    assert_eq!(
        (status, body.as_str()),
        (200, "origin saw mail.elsewhere.cn/owa/")
    );
    assert!(headers.get("icp-gate-reason").is_none());
    let (status, headers, _) = get(&gate, "mail.elsewhere.cn").await;
    assert_eq!((status, reason(&headers)), (403, "not_accessed"));
    for (host, want) in [
        ("unfiled.cn", "unfiled"),
        ("gone.cn", "revoked"),
        ("edu.x.gov.cn", "revoked"),
    ] {
        let (status, headers, _) = get_mail(host).await;
        assert_eq!((status, reason(&headers)), (403, want), "{host}");
    }
    assert_eq!(get_mail("filed.cn").await.0, 200);
    assert_eq!(origin.count(), 2, "blocked requests never reach the origin");

    let auth = [("host", "admin"), ("authorization", "Bearer test-token")];
    for (dst, decision, why) in [
        ("127.0.0.4", "allow", "filed_elsewhere"),
        ("127.0.0.1", "block", "not_accessed"),
    ] {
        let path = format!("/v1/decision?host=mail.elsewhere.cn&dst={dst}");
        let (status, _, body) = http1(gate.admin, "GET", &path, &auth, b"").await;
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"decision": decision, "reason": why, "matched": "elsewhere.cn", "registrable": "elsewhere.cn"}),
            "{dst}"
        );
    }

    let metrics = gate.metrics().await;
    for line in [
        r#"icp_gate_requests_total{decision="allow",listener="mail",reason="filed_elsewhere"} 1"#,
        r#"icp_gate_requests_total{decision="block",listener="http",reason="not_accessed"} 1"#,
        r#"icp_gate_requests_total{decision="allow",listener="mail",reason="filed"} 1"#,
    ] {
        assert!(metrics.contains(line), "missing {line}\n{metrics}");
    }

    // An upgraded connection the waiver allowed is closed when the filing is revoked.
    let mut ws = TcpStream::connect(mail).await.unwrap();
    let head = ask(
        &mut ws,
        b"GET /ws HTTP/1.1\r\nHost: mail.elsewhere.cn\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
        b"\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(gate.server.live_tunnels(), 1);
    let entry = r#"{"domain":"elsewhere.cn","icp":"沪ICP备00000002号-1","status":"revoked","access_here":false}"#;
    let (status, _, body) = http1(
        gate.admin,
        "PUT",
        "/v1/registry/entries/elsewhere.cn",
        &auth,
        entry.as_bytes(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        closed_within(&mut ws, Duration::from_secs(1)).await,
        "the upgraded connection outlived the revocation"
    );
    let (status, headers, _) = get_mail("mail.elsewhere.cn").await;
    assert_eq!((status, reason(&headers)), (403, "revoked"));
}
