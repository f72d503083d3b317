//! The admin API against the real binary: body deadlines and limits, guarded writes, the audit
//! trail, named tokens with roles, listing and export, and the most-blocked hosts.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::process::{Proc, write_config};
use common::*;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const TOKEN: &str = "test-token";

/// The real binary with the standard test config plus `extra`, and its admin address.
fn start(extra: &str) -> (tempfile::TempDir, Proc, SocketAddr) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "127.0.0.1:9".parse().unwrap(), extra);
    let mut proc = Proc::start(&path);
    let admin = proc.admin_addr();
    proc.wait_for("ready");
    (dir, proc, admin)
}

async fn call(
    admin: SocketAddr,
    token: &str,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, Value) {
    let auth = format!("Bearer {token}");
    let (status, _, text) = http1(
        admin,
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

async fn api(admin: SocketAddr, method: &str, path: &str, body: &str) -> (u16, Value) {
    call(admin, TOKEN, method, path, body).await
}

fn entry(domain: &str) -> String {
    json!({"domain": domain, "icp": "京ICP备99999999号-1", "status": "filed", "access_here": true})
        .to_string()
}

fn entries(prefix: &str, n: usize) -> String {
    (0..n)
        .map(|i| entry(&format!("{prefix}{i}.cn")) + "\n")
        .collect()
}

/// Sends a request head declaring `length` body bytes, then `trickle` one byte at a time with
/// `gap` between them; returns how long until the server closed, and what it sent.
async fn held_for(
    admin: SocketAddr,
    method: &str,
    path: &str,
    length: u64,
    gap: Duration,
) -> (Duration, String) {
    let mut stream = TcpStream::connect(admin).await.unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: admin\r\nauthorization: Bearer {TOKEN}\r\n\
         content-length: {length}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let (mut reader, mut writer) = stream.into_split();
    let trickle = tokio::spawn(async move {
        if gap.is_zero() {
            // Send nothing, but keep the connection open (dropping the half would close it).
            tokio::time::sleep(Duration::from_secs(60)).await;
            drop(writer);
            return;
        }
        loop {
            tokio::time::sleep(gap).await;
            if writer.write_all(b"{").await.is_err() {
                return;
            }
        }
    });
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(40), async {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 4096];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    trickle.abort();
    (
        started.elapsed(),
        String::from_utf8_lossy(&out).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_absent_bodies_are_cut_off_and_large_ones_are_413() {
    let (_dir, _proc, admin) = start("");
    let cases = [
        ("PUT", "/v1/registry", 1_000_000, Duration::from_secs(5)),
        (
            "POST",
            "/v1/registry/batch",
            1_000_000_000_000,
            Duration::ZERO,
        ),
        ("PUT", "/v1/registry", 1_000_000_000_000, Duration::ZERO),
        (
            "PUT",
            "/v1/registry/entries/slow.cn",
            100,
            Duration::from_secs(5),
        ),
    ];
    let runs = cases.map(|(method, path, length, gap)| {
        tokio::spawn(async move { (path, held_for(admin, method, path, length, gap).await) })
    });
    for run in runs {
        let (path, (took, answer)) = run.await.unwrap();
        assert!(
            took < Duration::from_secs(15),
            "{path}: held {took:?}: {answer}"
        );
        assert!(
            took >= Duration::from_secs(9),
            "{path}: cut at {took:?}: {answer}"
        );
        assert_eq!(statuses(&answer), [408], "{path}: {answer}");
        assert!(answer.contains("too slow"), "{answer}");
    }

    // One entry's body over 64 KiB is 413, declared or not.
    let big = format!(
        "{{\"domain\":\"big.cn\",\"icp\":\"{}\",\"status\":\"filed\",\"access_here\":true}}",
        "x".repeat(100_000)
    );
    let (status, body) = api(admin, "PUT", "/v1/registry/entries/big.cn", &big).await;
    assert_eq!(status, 413, "{body}");
    assert!(body["error"].as_str().unwrap().contains("65536"), "{body}");
    let started = Instant::now();
    let (took, answer) = held_for(
        admin,
        "PUT",
        "/v1/registry/entries/big.cn",
        100_000_000,
        Duration::ZERO,
    )
    .await;
    assert_eq!(statuses(&answer), [413], "{answer}");
    assert!(
        took < Duration::from_secs(2),
        "declared too large: {took:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(api(admin, "GET", "/v1/registry", "").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_body_at_a_steady_rate_is_taken() {
    let (_dir, _proc, admin) = start("");
    // 2.4 MB over about 12 s: longer than the first 10 s, and far above the minimum rate.
    let body = entries("steady", 30_000);
    let mut stream = TcpStream::connect(admin).await.unwrap();
    let head = format!(
        "PUT /v1/registry?allow_shrink=true HTTP/1.1\r\nhost: admin\r\nauthorization: Bearer {TOKEN}\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    for chunk in body.as_bytes().chunks(body.len() / 24 + 1) {
        stream.write_all(chunk).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let answer = read_for(&mut stream, Duration::from_secs(30)).await;
    assert!(started.elapsed() > Duration::from_secs(11));
    assert_eq!(statuses(&answer), [200], "{answer}");
    assert!(answer.contains("\"entries\":30000"), "{answer}");
}
