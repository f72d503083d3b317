//! Registry writes that storage cannot take, with the real binary: a batch too large for one
//! journal record is the request's fault (413) and later writes go through; a full disk refuses
//! writes, says so on `/readyz` and in `icp_gate_registry_writable`, and the writer recovers by
//! itself once there is space again, with nothing acknowledged lost.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::process::{Proc, write_config};
use common::*;
use serde_json::{Value, json};

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

/// A small tmpfs mounted over a folder for as long as it lives: a disk that really fills up.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(at).unwrap();
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "icp-gate-test",
            ])
            .arg(at)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

async fn readyz(admin: std::net::SocketAddr) -> (u16, String) {
    let (status, _, body) = http1(admin, "GET", "/readyz", &[("host", "admin")], b"").await;
    (status, body)
}

async fn writable_metric(admin: std::net::SocketAddr) -> String {
    let metrics = http1(admin, "GET", "/metrics", &[("host", "admin")], b"")
        .await
        .2;
    metrics
        .lines()
        .find(|l| l.starts_with("icp_gate_registry_writable "))
        .unwrap_or("icp_gate_registry_writable missing")
        .to_string()
}

/// Fills the file system of `dir` to the last byte; returns the file that takes the space.
fn fill(dir: &Path) -> PathBuf {
    let filler = dir.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 4096];
    while f.write_all(&chunk).is_ok() {}
    while f.write_all(&chunk[..1]).is_ok() {}
    filler
}

/// A batch of 300 puts: larger than what is left of the journal's last page, so on a full disk
/// part of it gets written before the write fails.
fn batch(prefix: &str) -> String {
    (0..300)
        .map(|i| {
            let d = format!("{prefix}{i}.cn");
            let e: Value = serde_json::from_str(&entry(&d)).unwrap();
            format!("{}\n", json!({"op": "put", "entry": e}))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_until_space_returns_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    // CI and the development machines run as root; elsewhere this fails and says why, rather
    // than passing without having filled a disk.
    let _tmpfs = Tmpfs::mount(&state, "1m").unwrap_or_else(|e| {
        panic!("cannot mount a 1 MiB tmpfs for the state folder (needs root): {e}")
    });
    let config = write_config(dir.path(), "127.0.0.1:9".parse().unwrap(), "");
    let (mut p, admin) = start(&config);
    assert_eq!(writable_metric(admin).await, "icp_gate_registry_writable 1");
    for i in 0..20 {
        let d = format!("kept{i}.cn");
        let path = format!("/v1/registry/entries/{d}");
        assert_eq!(api(admin, "PUT", &path, &entry(&d)).await.0, 200);
    }

    let filler = fill(&state);
    let (status, answer) = api(admin, "POST", "/v1/registry/batch", &batch("refused")).await;
    assert_eq!(status, 503, "{answer}");
    let (status, answer) = api(
        admin,
        "PUT",
        "/v1/registry/entries/refused.cn",
        &entry("refused.cn"),
    )
    .await;
    assert_eq!(status, 503, "refused while the disk is full: {answer}");
    let (status, body) = readyz(admin).await;
    assert_eq!(status, 503, "/readyz while writes are refused: {body}");
    assert!(body.contains("No space left on device"), "say why: {body}");
    assert_eq!(writable_metric(admin).await, "icp_gate_registry_writable 0");

    // Space returns: the writer notices by itself, without a write or a restart.
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while readyz(admin).await.0 != 200 {
        assert!(
            Instant::now() < deadline,
            "still not ready: {:?}",
            readyz(admin).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(writable_metric(admin).await, "icp_gate_registry_writable 1");
    let (status, answer) = api(
        admin,
        "PUT",
        "/v1/registry/entries/after.cn",
        &entry("after.cn"),
    )
    .await;
    assert_eq!((status, answer), (200, json!({"revision": 21})));

    // Full again; this time a write is what finds the space back, at once.
    let filler = fill(&state);
    let (status, answer) = api(admin, "POST", "/v1/registry/batch", &batch("refusedtoo")).await;
    assert_eq!(status, 503, "{answer}");
    assert_eq!(readyz(admin).await.0, 503);
    std::fs::remove_file(&filler).unwrap();
    let (status, answer) = api(
        admin,
        "PUT",
        "/v1/registry/entries/after2.cn",
        &entry("after2.cn"),
    )
    .await;
    assert_eq!((status, answer), (200, json!({"revision": 22})));
    assert_eq!(readyz(admin).await.0, 200);

    // After a crash, every acknowledged write is there and none of the refused ones.
    p.signal(libc::SIGKILL);
    p.wait_exit(Duration::from_secs(5));
    let (mut p, admin) = start(&config);
    let recovered = p.logged("registry recovered");
    assert_eq!(recovered["torn_tail_dropped"], false, "{recovered}");
    assert_eq!(
        without_digest(api(admin, "GET", "/v1/registry", "").await.1),
        json!({"revision": 22, "entries": 28})
    );
    for d in ["kept0.cn", "kept19.cn", "after.cn", "after2.cn"] {
        let path = format!("/v1/registry/entries/{d}");
        assert_eq!(api(admin, "GET", &path, "").await.0, 200, "{d} lost");
    }
    for d in [
        "refused0.cn",
        "refused299.cn",
        "refused.cn",
        "refusedtoo0.cn",
    ] {
        let path = format!("/v1/registry/entries/{d}");
        assert_eq!(api(admin, "GET", &path, "").await.0, 404, "{d} applied");
    }
    p.signal(libc::SIGTERM);
    assert_eq!(p.wait_exit(Duration::from_secs(10)), Some(0));
}
