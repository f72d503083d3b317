//! The `/v1` registry API end to end: every call and error path, ack-implies-enforced,
//! concurrent writers, atomic full replace, and revocation closing live tunnels.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TOKEN: &str = "test-token";

async fn api(gate: &Gate, method: &str, path: &str, body: &str) -> (u16, Value) {
    let auth = format!("Bearer {TOKEN}");
    let (status, _, text) = http1(
        gate.admin,
        method,
        path,
        &[("host", "admin"), ("authorization", &auth)],
        body.as_bytes(),
    )
    .await;
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn entry(domain: &str, status: &str, access_here: bool) -> String {
    json!({"domain": domain, "icp": "京ICP备99999999号-1", "status": status, "access_here": access_here}).to_string()
}

async fn host_status(gate: &Gate, host: &str) -> u16 {
    http1(gate.http, "GET", "/", &[("host", host)], b"").await.0
}

#[tokio::test]
async fn authentication() {
    let origin = Origin::start().await;
    let gate = Gate::start(&config(origin.addr, "")).await;
    let (status, headers, _) =
        http1(gate.admin, "GET", "/v1/registry", &[("host", "a")], b"").await;
    assert_eq!(status, 401);
    assert_eq!(headers["www-authenticate"], "Bearer");
    let (status, _, body) = http1(
        gate.admin,
        "GET",
        "/v1/registry",
        &[("host", "a"), ("authorization", "Bearer nope")],
        b"",
    )
    .await;
    assert_eq!(status, 403, "{body}");
    let (status, _, _) = http1(
        gate.admin,
        "GET",
        "/v1/registry",
        &[("host", "a"), ("authorization", "Basic dGVzdA==")],
        b"",
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(
        {
            let (status, body) = api(&gate, "GET", "/v1/registry", "").await;
            (status, without_digest(body))
        },
        (200, json!({"revision": 0, "entries": 6}))
    );
    // Health and metrics stay open.
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(
            http1(gate.admin, "GET", path, &[("host", "a")], b"")
                .await
                .0,
            200,
            "{path}"
        );
    }

    let no_token = config(origin.addr, "").replace("token_file = \"admin.token\"\n", "");
    let gate = Gate::start(&no_token).await;
    let (status, body) = api(&gate, "GET", "/v1/registry", "").await;
    assert_eq!(status, 403);
    assert!(body["error"].as_str().unwrap().contains("admin.token_file"));
}

#[tokio::test]
async fn entries_read_write_delete_and_ack_implies_enforced() {
    let origin = Origin::start().await;
    let gate = Gate::start(&config(origin.addr, "")).await;

    let (status, body) = api(
        &gate,
        "GET",
        "/v1/registry/entries/%E4%BE%8B%E5%AD%90.%E4%B8%AD%E5%9B%BD",
        "",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["domain"], "xn--fsqu00a.xn--fiqs8s");
    assert_eq!(body["status"], "filed");
    assert_eq!(
        api(&gate, "GET", "/v1/registry/entries/nothing.cn", "")
            .await
            .0,
        404
    );
    assert_eq!(
        api(&gate, "GET", "/v1/registry/entries/com.cn", "").await.0,
        400
    );

    // A newly filed and accessed site is open on the very next request.
    assert_eq!(host_status(&gate, "www.new.cn").await, 403);
    let (status, body) = api(
        &gate,
        "PUT",
        "/v1/registry/entries/New.CN",
        &entry("new.cn", "filed", true),
    )
    .await;
    assert_eq!(
        (status, body.clone()),
        (200, json!({"revision": 1})),
        "{body}"
    );
    assert_eq!(host_status(&gate, "www.new.cn").await, 200);

    // Revocation blocks on the very next request.
    let (status, _) = api(
        &gate,
        "PUT",
        "/v1/registry/entries/new.cn",
        &entry("new.cn", "revoked", true),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(host_status(&gate, "www.new.cn").await, 403);

    let (status, body) = api(&gate, "DELETE", "/v1/registry/entries/filed.cn", "").await;
    assert_eq!((status, body), (200, json!({"revision": 3})));
    assert_eq!(host_status(&gate, "filed.cn").await, 403);
    assert_eq!(
        api(&gate, "DELETE", "/v1/registry/entries/filed.cn", "")
            .await
            .0,
        404
    );

    // Errors name the problem.
    let (status, body) = api(
        &gate,
        "PUT",
        "/v1/registry/entries/other.cn",
        &entry("new.cn", "filed", true),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap().contains("differs"),
        "{body}"
    );
    let (status, body) = api(
        &gate,
        "PUT",
        "/v1/registry/entries/a.cn",
        r#"{"domain":"a.cn","icp":"x","status":"filed","access_here":true,"owner":"x"}"#,
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("unknown field `owner`"),
        "{body}"
    );
    let (status, body) = api(
        &gate,
        "PUT",
        "/v1/registry/entries/a.cn",
        r#"{"domain":"a.cn","icp":"x","status":"maybe","access_here":true}"#,
    )
    .await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("maybe"), "{body}");

    // Optimistic concurrency.
    let (status, body) = api(
        &gate,
        "PUT",
        "/v1/registry/entries/b.cn?expect_revision=1",
        &entry("b.cn", "filed", true),
    )
    .await;
    assert_eq!(status, 409);
    assert_eq!(body["revision"], 3);
    let (status, body) = api(
        &gate,
        "PUT",
        "/v1/registry/entries/b.cn?expect_revision=3",
        &entry("b.cn", "filed", true),
    )
    .await;
    assert_eq!((status, body), (200, json!({"revision": 4})));
    assert_eq!(
        without_digest(api(&gate, "GET", "/v1/registry", "").await.1),
        json!({"revision": 4, "entries": 7})
    );

    let metrics = gate.metrics().await;
    for line in [
        r#"icp_gate_registry_updates_total{op="put",result="ok"} 3"#,
        r#"icp_gate_registry_updates_total{op="put",result="conflict"} 1"#,
        r#"icp_gate_registry_updates_total{op="put",result="invalid"} 3"#,
        r#"icp_gate_registry_updates_total{op="delete",result="not_found"} 1"#,
        "icp_gate_registry_revision 4",
        "icp_gate_registry_entries 7",
    ] {
        assert!(metrics.contains(line), "missing {line}\n{metrics}");
    }
}

#[tokio::test]
async fn batches_are_all_or_nothing() {
    let origin = Origin::start().await;
    let gate = Gate::start(&config(origin.addr, "")).await;
    let good = format!(
        "{}\n{}\n\n{}\n",
        json!({"op": "put", "entry": {"domain": "b1.cn", "icp": "x", "status": "filed", "access_here": true}}),
        json!({"op": "delete", "domain": "filed.cn"}),
        json!({"op": "put", "entry": {"domain": "b2.cn", "icp": "x", "status": "filed", "access_here": true}}),
    );
    // It removes one of six entries: more than admin.max_shrink lets a batch remove unasked.
    let (status, body) = api(&gate, "POST", "/v1/registry/batch", &good).await;
    assert_eq!(status, 409, "{body}");
    let (status, body) = api(&gate, "POST", "/v1/registry/batch?allow_shrink=true", &good).await;
    assert_eq!(
        (status, body),
        (200, json!({"revision": 1, "applied": 3, "absent": 0}))
    );
    assert_eq!(host_status(&gate, "b2.cn").await, 200);
    assert_eq!(host_status(&gate, "filed.cn").await, 403);

    let bad = format!(
        "{}\n{}\n",
        json!({"op": "put", "entry": {"domain": "b3.cn", "icp": "x", "status": "filed", "access_here": true}}),
        json!({"op": "upsert", "domain": "b4.cn"}),
    );
    let (status, body) = api(&gate, "POST", "/v1/registry/batch", &bad).await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap().starts_with("line 2: "),
        "{body}"
    );
    assert_eq!(
        without_digest(api(&gate, "GET", "/v1/registry", "").await.1),
        json!({"revision": 1, "entries": 7})
    );
    assert_eq!(
        host_status(&gate, "b3.cn").await,
        403,
        "nothing of a bad batch is applied"
    );

    let (status, body) = api(
        &gate,
        "POST",
        "/v1/registry/batch",
        "{\"op\":\"delete\",\"domain\":\"1.2.3.4\"}",
    )
    .await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("line 1"), "{body}");
    assert_eq!(
        api(&gate, "POST", "/v1/registry/batch?expect_revision=0", &good)
            .await
            .0,
        409
    );
}

#[tokio::test]
async fn full_replace_and_decision_endpoint() {
    let origin = Origin::start().await;
    let gate = Gate::start(&config(origin.addr, "")).await;
    let replacement = format!(
        "{}\n{}\n",
        entry("only.cn", "filed", true),
        entry("elsewhere.cn", "filed", true)
    );
    let (status, body) = api(&gate, "PUT", "/v1/registry", &replacement).await;
    assert_eq!(status, 409, "it removes every entry: {body}");
    let (status, body) = api(&gate, "PUT", "/v1/registry?allow_shrink=true", &replacement).await;
    assert_eq!((status, body), (200, json!({"revision": 1, "entries": 2})));
    assert_eq!(host_status(&gate, "filed.cn").await, 403, "replaced away");
    assert_eq!(host_status(&gate, "elsewhere.cn").await, 200);

    let dup = format!(
        "{}\n{}\n",
        entry("d.cn", "filed", true),
        entry("D.cn.", "filed", true)
    );
    let (status, body) = api(&gate, "PUT", "/v1/registry?allow_shrink=true", &dup).await;
    assert_eq!(status, 400);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("line 2: duplicate entry for d.cn"),
        "{body}"
    );
    assert_eq!(
        without_digest(api(&gate, "GET", "/v1/registry", "").await.1),
        json!({"revision": 1, "entries": 2})
    );

    let decision = |q: &'static str| {
        let gate = &gate;
        async move { api(gate, "GET", &format!("/v1/decision?{q}"), "").await }
    };
    assert_eq!(
        decision("host=www.only.cn&dst=127.0.0.1").await,
        (
            200,
            json!({"decision": "allow", "reason": "filed", "matched": "only.cn", "registrable": "only.cn"})
        )
    );
    assert_eq!(
        decision("host=nope.cn:443&dst=127.0.0.1").await.1,
        json!({"decision": "block", "reason": "unfiled", "matched": null, "registrable": "nope.cn"})
    );
    assert_eq!(
        decision("host=x.cn&dst=10.9.9.9").await.1["decision"],
        "refuse"
    );
    assert_eq!(
        decision("host=a@b.cn&dst=127.0.0.1").await.1["reason"],
        "invalid_host"
    );
    assert_eq!(decision("host=x.cn").await.0, 400);

    let report =
        Gate::start(&config(origin.addr, "").replace("[policy]", "[policy]\nmode = \"report\""))
            .await;
    let (_, body) = api(
        &report,
        "GET",
        "/v1/decision?host=nope.cn&dst=127.0.0.1",
        "",
    )
    .await;
    assert_eq!(
        (body["decision"].as_str(), body["reason"].as_str()),
        (Some("report"), Some("unfiled"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_each_get_their_own_revision() {
    let origin = Origin::start().await;
    let gate = Arc::new(Gate::start(&config(origin.addr, "")).await);
    let mut tasks = Vec::new();
    for w in 0..40 {
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            let mut revisions = Vec::new();
            for i in 0..10 {
                let d = format!("w{w}-{i}.cn");
                let (status, body) = api(
                    &gate,
                    "PUT",
                    &format!("/v1/registry/entries/{d}"),
                    &entry(&d, "filed", true),
                )
                .await;
                assert_eq!(status, 200, "{body}");
                revisions.push(body["revision"].as_u64().unwrap());
            }
            revisions
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_unstable();
    assert_eq!(all, (1..=400).collect::<Vec<u64>>());
    assert_eq!(
        without_digest(api(&gate, "GET", "/v1/registry", "").await.1),
        json!({"revision": 400, "entries": 406})
    );
    for w in [0, 39] {
        assert_eq!(host_status(&gate, &format!("w{w}-9.cn")).await, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_never_see_a_half_applied_replace() {
    let origin = Origin::start().await;
    let gate = Gate::start(&config(origin.addr, "")).await;
    let set = |prefix: &str| {
        (0..2000)
            .map(|i| entry(&format!("{prefix}{i}.cn"), "filed", true) + "\n")
            .collect::<String>()
    };
    let (a, b) = (set("a"), set("b"));
    let put = "/v1/registry?allow_shrink=true";
    assert_eq!(api(&gate, "PUT", put, &a).await.0, 200);

    let registry = gate.server.registry();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        tokio::task::spawn_blocking(move || {
            let mut seen = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let s = registry.load();
                let (a_first, a_last) = (s.get("a0.cn").is_some(), s.get("a1999.cn").is_some());
                let (b_first, b_last) = (s.get("b0.cn").is_some(), s.get("b1999.cn").is_some());
                assert_eq!(s.len(), 2000);
                assert!(
                    a_first == a_last && b_first == b_last && a_first != b_first,
                    "half-applied at revision {}",
                    s.revision()
                );
                seen += 1;
            }
            seen
        })
    };
    for round in 0..10 {
        let body = if round % 2 == 0 { &b } else { &a };
        assert_eq!(api(&gate, "PUT", put, body).await.0, 200);
    }
    stop.store(true, Ordering::Relaxed);
    assert!(reader.await.unwrap() > 0);
}

/// An origin that echoes bytes forever (a stand-in for a long-lived TLS or WebSocket session).
async fn echo_origin() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_closes_live_tunnels_within_a_second() {
    let origin = Origin::start().await;
    let echo = echo_origin().await;
    let cfg = config(origin.addr, "").replace(
        "mainland = true",
        &format!("mainland = true\ntls_origin = \"{echo}\""),
    ) + "\n[[listener]]\nname = \"tls\"\nbind = \"127.0.0.1:0\"\nkind = \"tls\"\n";
    let gate = Gate::start_with_seed(
        &cfg,
        &format!("{SEED}{}\n", entry("filed-example.com.cn", "filed", true)),
    )
    .await;
    let tls = gate.server.listener_addr("tls").await.unwrap();
    let hello = std::fs::read(testdata("clienthello/curl.bin")).unwrap();

    // Two tunnels for the filed name, one for an unrelated filed name.
    let mut tunnels = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(tls).await.unwrap();
        s.write_all(&hello).await.unwrap();
        let mut back = vec![0u8; hello.len()];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(back, hello, "tunnel is up and echoing");
        tunnels.push(s);
    }
    // A WebSocket-style upgraded connection to the same domain over HTTP.
    let mut ws = TcpStream::connect(gate.http).await.unwrap();
    ws.write_all(b"GET /ws HTTP/1.1\r\nHost: www.filed-example.com.cn\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let mut head = vec![0u8; 12];
    ws.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 101");
    let mut other = TcpStream::connect(gate.http).await.unwrap();
    other
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: filed.cn\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
        )
        .await
        .unwrap();
    other.read_exact(&mut head).await.unwrap();
    assert_eq!(gate.server.live_tunnels(), 4);

    let revoked = Instant::now();
    let (status, _) = api(
        &gate,
        "PUT",
        "/v1/registry/entries/filed-example.com.cn",
        &entry("filed-example.com.cn", "revoked", true),
    )
    .await;
    assert_eq!(status, 200);
    for mut t in tunnels.into_iter().chain([ws]) {
        assert!(
            closed_within(&mut t, Duration::from_secs(1)).await,
            "tunnel outlived the revocation"
        );
    }
    assert!(revoked.elapsed() < Duration::from_secs(2));
    // The unrelated upgraded connection lives on.
    let mut rest_of_head = Vec::new();
    while !rest_of_head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        other.read_exact(&mut byte).await.unwrap();
        rest_of_head.push(byte[0]);
    }
    other.write_all(b"still here").await.unwrap();
    let mut echoed = [0u8; 10];
    tokio::time::timeout(Duration::from_secs(2), other.read_exact(&mut echoed))
        .await
        .expect("unrelated tunnel closed")
        .unwrap();
    assert_eq!(&echoed, b"still here");
}

#[tokio::test]
async fn mutual_tls_for_the_filing_system() {
    use common::pki::Pki;
    use rustls::pki_types::ServerName;

    let filing_ca = Pki::new();
    let server_ca = Pki::new();
    let stranger_ca = Pki::new();
    let (_, _, cert, key) = server_ca.leaf(&["admin.icp-gate.test"]);
    let dir = tempfile::tempdir().unwrap();
    for (name, pem) in [
        ("admin.crt", cert),
        ("admin.key", key),
        ("filing-ca.pem", filing_ca.ca.pem()),
    ] {
        std::fs::write(dir.path().join(name), pem).unwrap();
    }
    let d = dir.path().display();
    let origin = Origin::start().await;
    let cfg = config(origin.addr, "").replace(
        "token_file = \"admin.token\"",
        &format!("token_file = \"admin.token\"\ntls_cert = \"{d}/admin.crt\"\ntls_key = \"{d}/admin.key\"\nclient_ca = \"{d}/filing-ca.pem\""),
    );
    let gate = Gate::start(&cfg).await;

    async fn call(
        connector: &tokio_rustls::TlsConnector,
        addr: SocketAddr,
        path: &str,
    ) -> std::io::Result<u16> {
        let tcp = TcpStream::connect(addr).await?;
        let tls = connector
            .connect(ServerName::try_from("admin.icp-gate.test").unwrap(), tcp)
            .await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(std::io::Error::other)?;
        tokio::spawn(conn);
        let req = http::Request::get(path)
            .header("host", "admin")
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let resp = sender
            .send_request(req)
            .await
            .map_err(std::io::Error::other)?;
        Ok(resp.status().as_u16())
    }

    let anonymous = server_ca.client(&[]);
    assert_eq!(
        call(&anonymous, gate.admin, "/metrics").await.unwrap(),
        200,
        "scraping needs no certificate"
    );
    assert_eq!(
        call(&anonymous, gate.admin, "/v1/registry").await.unwrap(),
        403
    );
    let filing = filing_ca.client_with_cert(&server_ca, "filing-system");
    assert_eq!(
        call(&filing, gate.admin, "/v1/registry").await.unwrap(),
        200
    );
    let stranger = stranger_ca.client_with_cert(&server_ca, "filing-system");
    assert!(
        call(&stranger, gate.admin, "/v1/registry").await.is_err(),
        "an unknown CA's certificate is refused"
    );
}
