//! Connection-level behaviour: PROXY protocol in and out, slowloris and size limits, the
//! connection limit.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use ppp::v2::{Builder, Command, Protocol, Version};
use ppp::{HeaderResult, PartialResult};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn v2_header(client: &str, dst: &str) -> Vec<u8> {
    let client: SocketAddr = client.parse().unwrap();
    let dst: SocketAddr = dst.parse().unwrap();
    Builder::with_addresses(
        Version::Two as u8 | Command::Proxy as u8,
        Protocol::Stream,
        (client, dst),
    )
    .build()
    .unwrap()
}

fn proxied_config(origin: SocketAddr) -> String {
    config(origin, "").replace("kind = \"http\"", "kind = \"http\"\nproxy_protocol = true")
}

#[tokio::test]
async fn proxy_header_sets_client_and_destination() {
    let origin = Origin::start().await;
    let gate = Gate::start(&proxied_config(origin.addr)).await;

    let mut req = b"PROXY TCP4 198.51.100.7 127.0.0.1 40000 80\r\n".to_vec();
    req.extend_from_slice(b"GET /v1 HTTP/1.1\r\nHost: filed.cn\r\nConnection: close\r\n\r\n");
    let resp = raw(gate.http, &req, Duration::from_secs(5)).await;
    assert_eq!(statuses(&resp), [200], "{resp}");
    assert_eq!(origin.last().headers["x-forwarded-for"], "198.51.100.7");

    let mut req = v2_header("[2001:db8::7]:5000", "[::ffff:127.0.0.1]:80");
    req.extend_from_slice(b"GET /v2 HTTP/1.1\r\nHost: filed.cn\r\nConnection: close\r\n\r\n");
    let resp = raw(gate.http, &req, Duration::from_secs(5)).await;
    assert_eq!(statuses(&resp), [200], "{resp}");
    assert_eq!(origin.last().headers["x-forwarded-for"], "2001:db8::7");

    // The destination comes from the header: one without a route is refused.
    let mut req = v2_header("198.51.100.7:5000", "192.0.2.80:80");
    req.extend_from_slice(b"GET / HTTP/1.1\r\nHost: filed.cn\r\n\r\n");
    assert_eq!(raw(gate.http, &req, Duration::from_secs(5)).await, "");
    assert_eq!(origin.count(), 2);
}

#[tokio::test]
async fn missing_or_bad_proxy_header_closes() {
    let origin = Origin::start().await;
    let gate = Gate::start(&proxied_config(origin.addr)).await;
    let plain = raw(
        gate.http,
        b"GET / HTTP/1.1\r\nHost: filed.cn\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(plain, "");
    let bad = raw(
        gate.http,
        b"PROXY TCP4 nonsense\r\nGET / HTTP/1.1\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(bad, "");
    assert_eq!(origin.count(), 0);
}

/// Issue #19 item 4: a complete but malformed PROXY v1 line is refused as soon as it arrives,
/// long before `header_read_timeout` (10 s by default), while the client keeps the connection
/// open; and a valid one split right after the source port is accepted.
#[tokio::test]
async fn proxy_v1_is_decided_at_its_first_crlf() {
    let origin = Origin::start().await;
    let gate = Gate::start(&proxied_config(origin.addr)).await;

    let mut bad = TcpStream::connect(gate.http).await.unwrap();
    bad.write_all(b"PROXY TCP4 198.51.100.7\r\nGET / HTTP/1.1\r\nHost: filed.cn\r\n\r\n")
        .await
        .unwrap();
    assert!(
        closed_within(&mut bad, Duration::from_secs(3)).await,
        "malformed PROXY line kept open"
    );

    let mut split = TcpStream::connect(gate.http).await.unwrap();
    split.set_nodelay(true).unwrap();
    split
        .write_all(b"PROXY TCP4 198.51.100.7 127.0.0.1 40000 ")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    split
        .write_all(b"80\r\nGET /split HTTP/1.1\r\nHost: filed.cn\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let resp = read_until_closed(&mut split, Duration::from_secs(5)).await;
    assert_eq!(statuses(&resp), [200], "{resp}");
    assert_eq!(origin.last().headers["x-forwarded-for"], "198.51.100.7");
    assert_eq!(origin.count(), 1);
}

/// An origin that requires a PROXY v2 header, records it, then serves HTTP on the rest.
async fn proxy_aware_origin() -> (SocketAddr, Arc<Mutex<Vec<(SocketAddr, SocketAddr)>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<(SocketAddr, SocketAddr)>>> = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let log = log.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let len = loop {
                    let mut chunk = [0u8; 512];
                    let n = stream.read(&mut chunk).await.unwrap();
                    assert!(n > 0, "closed before a PROXY header");
                    buf.extend_from_slice(&chunk[..n]);
                    let parsed = HeaderResult::parse(&buf);
                    if parsed.is_incomplete() {
                        continue;
                    }
                    let HeaderResult::V2(Ok(h)) = parsed else {
                        panic!("not a v2 header: {parsed:?}")
                    };
                    let ppp::v2::Addresses::IPv4(a) = h.addresses else {
                        panic!("not IPv4")
                    };
                    log.lock().unwrap().push((
                        SocketAddr::from((a.source_address, a.source_port)),
                        SocketAddr::from((a.destination_address, a.destination_port)),
                    ));
                    break h.len();
                };
                // What came after the header is read first, then the rest of the stream.
                let rest = std::io::Cursor::new(buf[len..].to_vec());
                let (read, write) = stream.into_split();
                let io = tokio::io::join(tokio::io::AsyncReadExt::chain(rest, read), write);
                let svc = service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from("proxied origin")),
                    ))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(io), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn send_proxy_protocol_v2_toward_origin_never_shares_a_connection_between_clients() {
    let (origin, seen) = proxy_aware_origin().await;
    let cfg = proxied_config(origin).replace(
        "mainland = true",
        "mainland = true\nsend_proxy_protocol = \"v2\"",
    );
    let gate = Gate::start(&cfg).await;
    for client in ["198.51.100.1", "198.51.100.2"] {
        let mut s = TcpStream::connect(gate.http).await.unwrap();
        s.write_all(format!("PROXY TCP4 {client} 127.0.0.1 40000 80\r\n").as_bytes())
            .await
            .unwrap();
        // Two requests on one kept-alive client connection.
        s.write_all(b"GET /a HTTP/1.1\r\nHost: filed.cn\r\n\r\nGET /b HTTP/1.1\r\nHost: filed.cn\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let resp = read_for(&mut s, Duration::from_secs(5)).await;
        assert_eq!(statuses(&resp), [200, 200], "{resp}");
    }
    let seen = seen.lock().unwrap().clone();
    let clients: Vec<String> = seen.iter().map(|(c, _)| c.ip().to_string()).collect();
    assert_eq!(
        clients,
        ["198.51.100.1", "198.51.100.2"],
        "one origin connection per client"
    );
    assert!(seen.iter().all(|(_, d)| d.to_string() == "127.0.0.1:80"));
}

#[tokio::test]
async fn slowloris_client_is_cut_off() {
    let origin = Origin::start().await;
    let gate = Gate::start(&config(
        origin.addr,
        "[limits]\nheader_read_timeout = \"500ms\"",
    ))
    .await;
    // Sends nothing at all.
    let mut silent = TcpStream::connect(gate.http).await.unwrap();
    // Trickles a header byte by byte, never finishing.
    let mut trickle = TcpStream::connect(gate.http).await.unwrap();
    let trickler = tokio::spawn(async move {
        for b in b"GET / HTTP/1.1\r\nHost: filed.cn\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
            if trickle.write_all(&[*b]).await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    });
    assert!(
        closed_within(&mut silent, Duration::from_secs(3)).await,
        "silent client kept"
    );
    assert!(
        tokio::time::timeout(Duration::from_secs(5), trickler)
            .await
            .unwrap()
            .unwrap(),
        "trickling client kept past header_read_timeout"
    );
    // A kept-alive connection that goes quiet after a request is closed too.
    let mut kept = TcpStream::connect(gate.http).await.unwrap();
    kept.write_all(b"GET / HTTP/1.1\r\nHost: filed.cn\r\n\r\n")
        .await
        .unwrap();
    assert!(closed_within(&mut kept, Duration::from_secs(3)).await);
}

/// The time a kept-alive connection has for its next request head counts from the last answer,
/// not from when the connection opened: requests 300 ms apart under a 500 ms limit are all
/// answered, and the connection closes once it goes quiet.
#[tokio::test]
async fn head_timeout_counts_from_the_last_answer() {
    let origin = Origin::start().await;
    let gate = Gate::start(&config(
        origin.addr,
        "[limits]\nheader_read_timeout = \"500ms\"",
    ))
    .await;
    let mut kept = TcpStream::connect(gate.http).await.unwrap();
    for i in 0..5 {
        kept.write_all(b"GET / HTTP/1.1\r\nHost: unfiled.example\r\n\r\n")
            .await
            .unwrap();
        let answer = read_answer(&mut kept, Duration::from_secs(3), &format!("request {i}")).await;
        assert_eq!(statuses(&answer), [403]);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(closed_within(&mut kept, Duration::from_secs(3)).await);
}

/// One timer serves both deadlines of a kept-alive connection: a forwarded request whose answer
/// takes longer than `header_read_timeout` is answered (its wait is bounded by
/// `origin_response_timeout`, 60 s), the connection goes on serving, and once it goes quiet it
/// closes after `header_read_timeout` again, not after the longer origin deadline.
#[tokio::test]
async fn a_slow_answer_outlasts_the_head_timeout_and_the_head_timeout_returns() {
    let origin = Origin::start().await;
    let gate = Gate::start(&config(
        origin.addr,
        "[limits]\nheader_read_timeout = \"1s\"",
    ))
    .await;
    let mut kept = TcpStream::connect(gate.http).await.unwrap();
    // `/slow` answers after 3 s.
    for path in ["/", "/slow", "/"] {
        let req = format!("GET {path} HTTP/1.1\r\nHost: filed.cn\r\n\r\n");
        kept.write_all(req.as_bytes()).await.unwrap();
        let answer = read_answer(&mut kept, Duration::from_secs(6), path).await;
        assert_eq!(statuses(&answer), [200], "{path}: {answer}");
    }
    assert!(closed_within(&mut kept, Duration::from_secs(4)).await);
    assert_eq!(origin.count(), 3);
}

/// Reads one answer from a kept-alive connection: the head, then the body its content-length
/// announces. Panics naming `what` when none comes within `wait`.
async fn read_answer(conn: &mut TcpStream, wait: Duration, what: &str) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let complete = |got: &[u8]| {
        let text = String::from_utf8_lossy(got);
        let Some(end) = text.find("\r\n\r\n") else {
            return false;
        };
        let len: usize = text[..end]
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length").then_some(value)
            })
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        got.len() >= end + 4 + len
    };
    while !complete(&got) {
        let n = tokio::time::timeout(wait, conn.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no answer to {what}"))
            .unwrap();
        assert_ne!(n, 0, "closed before answering {what}");
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn oversized_request_head_is_431() {
    let origin = Origin::start().await;
    let gate = Gate::start(&config(origin.addr, "[limits]\nmax_header_bytes = 8192")).await;
    let big = format!(
        "GET / HTTP/1.1\r\nHost: filed.cn\r\nCookie: {}\r\n\r\n",
        "c".repeat(20_000)
    );
    let resp = raw(gate.http, big.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(statuses(&resp), [431], "{resp}");
    // Just over the limit, and complete, so a read may hold all of it at once.
    let over = format!(
        "GET / HTTP/1.1\r\nHost: filed.cn\r\nCookie: {}\r\n\r\n",
        "c".repeat(8200)
    );
    let resp = raw(gate.http, over.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(statuses(&resp), [431], "{resp}");
    let ok = format!(
        "GET / HTTP/1.1\r\nHost: filed.cn\r\nCookie: {}\r\nConnection: close\r\n\r\n",
        "c".repeat(4000)
    );
    assert_eq!(
        statuses(&raw(gate.http, ok.as_bytes(), Duration::from_secs(5)).await),
        [200]
    );
}

#[tokio::test]
async fn connection_limit_refuses_the_extra_connection() {
    let origin = Origin::start().await;
    let gate = Gate::start(&config(origin.addr, "[limits]\nmax_connections = 2")).await;
    // Each says something, so deferred accept hands both to the proxy (a silent connection
    // waits in the kernel and holds no slot: deferred_accept_waits_for_the_first_bytes).
    let mut _a = TcpStream::connect(gate.http).await.unwrap();
    let mut _b = TcpStream::connect(gate.http).await.unwrap();
    for s in [&mut _a, &mut _b] {
        s.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut c = TcpStream::connect(gate.http).await.unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: filed.cn\r\n\r\n")
        .await
        .unwrap();
    assert!(closed_within(&mut c, Duration::from_secs(2)).await);
    assert!(
        gate.metrics()
            .await
            .contains(r#"icp_gate_connections_rejected_total{listener="http"} 1"#)
    );
    drop((_a, _b));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, _, _) = http1(gate.http, "GET", "/", &[("host", "filed.cn")], b"").await;
    assert_eq!(status, 200, "capacity comes back when connections close");
}

/// A client that pipelines requests and stops reading the answers is closed after
/// `idle_timeout` like any idle connection: a write the client never drains holds nothing open.
#[tokio::test]
async fn client_that_stops_reading_is_closed() {
    let origin = Origin::start().await;
    let gate = Gate::start(&config(
        origin.addr,
        "[limits]\nidle_timeout = \"1s\"\nheader_read_timeout = \"500ms\"",
    ))
    .await;
    let sent = 3000;
    let mut s = TcpStream::connect(gate.http).await.unwrap();
    let burst = "GET / HTTP/1.1\r\nHost: unfiled.cn\r\n\r\n".repeat(sent);
    // Far more answer bytes (~7 MB) than the socket buffers hold, so icp-gate's writes stall.
    let _ = tokio::time::timeout(Duration::from_secs(2), s.write_all(burst.as_bytes())).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let text = read_until_closed(&mut s, Duration::from_secs(5)).await;
    let answered = statuses(&text).len();
    assert!(
        answered < sent,
        "all {sent} answered: the connection was kept"
    );
}

/// An origin that stalls in the middle of a body does not hold the client connection past
/// `idle_timeout`.
#[tokio::test]
async fn origin_stalled_mid_body_is_cut_off() {
    let addr = raw_origin(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten..").await;
    let gate = Gate::start(&config(
        addr,
        "[limits]\nidle_timeout = \"1s\"\nheader_read_timeout = \"500ms\"",
    ))
    .await;
    let mut s = TcpStream::connect(gate.http).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: filed.cn\r\n\r\n")
        .await
        .unwrap();
    let text = read_until_closed(&mut s, Duration::from_secs(5)).await;
    assert!(
        text.starts_with("HTTP/1.1 200") && text.ends_with("only ten.."),
        "{text}"
    );
}

/// `defer_accept` (on by default): a connection is accepted once its first bytes are in, so a
/// silent one holds no worker and no connection slot; with it off, it is accepted at once.
#[tokio::test]
async fn deferred_accept_waits_for_the_first_bytes() {
    let origin = Origin::start().await;
    for (extra, accepted_while_silent) in [("", 0), ("defer_accept = false", 1)] {
        let config = config(origin.addr, "")
            .replace("kind = \"http\"", &format!("kind = \"http\"\n{extra}"));
        let gate = Gate::start(&config).await;
        let active = "icp_gate_connections_active{listener=\"http\"} ";
        let mut silent = TcpStream::connect(gate.http).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let metrics = gate.metrics().await;
        assert!(
            metrics.contains(&format!("{active}{accepted_while_silent}\n")),
            "{extra:?}: {}",
            metrics
                .lines()
                .filter(|l| l.starts_with(active))
                .collect::<String>()
        );
        silent
            .write_all(b"GET / HTTP/1.1\r\nHost: filed.cn\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let answer = read_until_closed(&mut silent, Duration::from_secs(5)).await;
        assert_eq!(statuses(&answer), [200], "{extra:?}: {answer}");
    }
}

/// A connection is served in the accept loop until it has to wait, then in its own task
/// (proxy/accepted.rs): one whose request head is still incomplete waits without holding up the
/// connections after it, a one-shot request is answered from its first bytes, and a keep-alive
/// connection answered at once is served again later.
async fn a_connection_that_waits_holds_up_no_other() {
    let origin = Origin::start().await;
    let gate = Gate::start(&config(origin.addr, "")).await;
    let mut slow = TcpStream::connect(gate.http).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: unfi")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    for (host, status) in [("unfiled.cn", 403), ("filed.cn", 200)] {
        let mut once = TcpStream::connect(gate.http).await.unwrap();
        let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        once.write_all(request.as_bytes()).await.unwrap();
        let answer = read_until_closed(&mut once, Duration::from_secs(5)).await;
        assert_eq!(statuses(&answer), [status], "{host}: {answer}");
    }

    let mut kept = TcpStream::connect(gate.http).await.unwrap();
    kept.write_all(b"GET / HTTP/1.1\r\nHost: filed.cn\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    kept.write_all(b"GET / HTTP/1.1\r\nHost: unfiled.cn\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let answer = read_until_closed(&mut kept, Duration::from_secs(5)).await;
    assert_eq!(statuses(&answer), [200, 403], "{answer}");

    slow.write_all(b"led.cn\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let answer = read_until_closed(&mut slow, Duration::from_secs(5)).await;
    assert_eq!(statuses(&answer), [403], "{answer}");
}

/// One thread: the accept loop serves each connection's first step itself.
#[tokio::test]
async fn a_connection_that_waits_holds_up_no_other_on_one_thread() {
    a_connection_that_waits_holds_up_no_other().await;
}

/// Work stealing: every connection gets its own task at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_waits_holds_up_no_other_with_work_stealing() {
    a_connection_that_waits_holds_up_no_other().await;
}
