//! Registry writes that storage cannot take, with the real binary: a batch too large for one
//! journal record is the request's fault (413) and later writes go through.

mod common;

use std::path::Path;
use std::time::Duration;

use common::process::{Proc, write_config};
use common::*;
use serde_json::{Value, json};

async fn api(admin: std::net::SocketAddr, method: &str, path: &str, body: &str) -> (u16, Value) {
    let (status, _, text) = http1(
        admin,
        method,
        path,
        &[("host", "admin"), ("authorization", "Bearer test-token")],
        body.as_bytes(),
    )
    .await;
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn entry(domain: &str) -> String {
    json!({"domain": domain, "icp": "京ICP备99999999号-1", "status": "filed", "access_here": true})
        .to_string()
}

/// Starts the binary and waits until it is ready; returns it with its admin address.
fn start(config: &Path) -> (Proc, std::net::SocketAddr) {
    let mut p = Proc::start(config);
    p.wait_for("ready");
    let admin = p.admin_addr();
    (p, admin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_too_large_for_the_journal_is_413_and_writing_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "127.0.0.1:9".parse().unwrap(), "");
    let (mut p, admin) = start(&config);

    // 2^19 puts of the longest name (253 bytes) and filing number (255 bytes) take 512 bytes each
    // in a journal record: with the record's own 12 bytes, just over the 256 MiB one can hold.
    let icp = "9".repeat(255);
    let pad = |n: usize| "a".repeat(n);
    let mut body = String::with_capacity(320 << 20);
    for i in 0..1usize << 19 {
        let domain = format!("x{i:07}{}.{}.{}.{}.cn", pad(55), pad(63), pad(63), pad(58));
        assert_eq!(domain.len(), 253);
        body.push_str(
            &json!({"op": "put", "entry": {"domain": domain, "icp": icp, "status": "filed", "access_here": true}})
                .to_string(),
        );
        body.push('\n');
    }
    let (status, answer) = api(admin, "POST", "/v1/registry/batch", &body).await;
    drop(body);
    assert_eq!(status, 413, "{answer}");
    let message = answer["error"].as_str().unwrap();
    assert!(message.contains("268435456"), "name the limit: {message}");

    // The writer did not stop: the next write is applied, and the proxy is ready.
    let (status, answer) = api(
        admin,
        "PUT",
        "/v1/registry/entries/after.cn",
        &entry("after.cn"),
    )
    .await;
    assert_eq!((status, answer), (200, json!({"revision": 1})));
    let (status, _, _) = http1(admin, "GET", "/readyz", &[("host", "admin")], b"").await;
    assert_eq!(status, 200);
    let metrics = http1(admin, "GET", "/metrics", &[("host", "admin")], b"")
        .await
        .2;
    assert!(
        metrics.contains(r#"icp_gate_registry_updates_total{op="batch",result="too_large"} 1"#),
        "{metrics}"
    );
    p.signal(libc::SIGTERM);
    assert_eq!(p.wait_exit(Duration::from_secs(10)), Some(0));
}
