//! Registry durability with the real binary: `kill -9` right after a 2xx loses nothing, a torn
//! journal tail is dropped with a warning, a damaged record length or a corrupt snapshot refuses
//! to start, and the seed is read only once.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::process::{BIN, Proc, write_config};
use common::*;
use serde_json::json;

fn state_dir(dir: &Path) -> PathBuf {
    dir.join("state")
}

/// Starts the binary and waits until it is ready; returns it with its admin address.
fn start(config: &Path) -> (Proc, std::net::SocketAddr) {
    let mut p = Proc::start(config);
    p.wait_for("ready");
    let admin = p.admin_addr();
    (p, admin)
}

fn kill9(p: &mut Proc) {
    p.signal(libc::SIGKILL);
    assert_eq!(
        p.wait_exit(Duration::from_secs(5)),
        None,
        "SIGKILL has no exit code"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_right_after_acks_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "127.0.0.1:9".parse().unwrap(), "");
    let (mut p, admin) = start(&config);

    // Concurrent writers; kill -9 the moment the last ack arrives.
    let mut tasks = Vec::new();
    for w in 0..8 {
        tasks.push(tokio::spawn(async move {
            for i in 0..25 {
                let d = format!("k{w}-{i}.cn");
                let (status, _) = api(
                    admin,
                    "PUT",
                    &format!("/v1/registry/entries/{d}"),
                    &entry(&d),
                )
                .await;
                assert_eq!(status, 200);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (status, _) = api(admin, "DELETE", "/v1/registry/entries/filed.cn", "").await;
    assert_eq!(status, 200);
    let batch = format!(
        "{}\n",
        json!({"op": "put", "entry": {"domain": "last.cn", "icp": "x", "status": "revoked", "access_here": true}})
    );
    let (status, body) = api(admin, "POST", "/v1/registry/batch", &batch).await;
    assert_eq!(status, 200);
    kill9(&mut p);
    assert_eq!(body["revision"], 202);

    let (mut p, admin) = start(&config);
    assert_eq!(
        without_digest(api(admin, "GET", "/v1/registry", "").await.1),
        json!({"revision": 202, "entries": 206})
    );
    for d in ["k0-0.cn", "k7-24.cn", "last.cn"] {
        assert_eq!(
            api(admin, "GET", &format!("/v1/registry/entries/{d}"), "")
                .await
                .0,
            200,
            "{d} lost"
        );
    }
    assert_eq!(
        api(admin, "GET", "/v1/registry/entries/filed.cn", "")
            .await
            .0,
        404,
        "delete lost"
    );
    p.signal(libc::SIGTERM);
    assert_eq!(p.wait_exit(Duration::from_secs(10)), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_journal_tail_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "127.0.0.1:9".parse().unwrap(), "");
    let (mut p, admin) = start(&config);
    assert_eq!(
        api(
            admin,
            "PUT",
            "/v1/registry/entries/kept.cn",
            &entry("kept.cn")
        )
        .await
        .0,
        200
    );
    kill9(&mut p);

    // A crash in the middle of the next append leaves half a record behind.
    let journal = newest_journal(&state_dir(dir.path()));
    let mut bytes = std::fs::read(&journal).unwrap();
    let good_len = bytes.len();
    bytes.extend_from_slice(&[200, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3]);
    std::fs::write(&journal, bytes).unwrap();

    let (mut p, admin) = start(&config);
    let recovered = p.logged("registry recovered");
    assert_eq!(recovered["torn_tail_dropped"], true, "{recovered}");
    // Never dropped silently: the warning says where, and which revision it would have been.
    let warned =
        p.logged("journal ends in a torn record (a crash mid-write, never acknowledged); dropped");
    assert_eq!(warned["level"], "WARN", "{warned}");
    assert_eq!(warned["file"], journal.display().to_string(), "{warned}");
    assert_eq!(warned["offset"], good_len, "{warned}");
    assert_eq!(warned["revision"], 2, "{warned}");
    assert_eq!(std::fs::metadata(&journal).unwrap().len(), good_len as u64);
    assert_eq!(
        api(admin, "GET", "/v1/registry/entries/kept.cn", "")
            .await
            .0,
        200
    );
    // Writing after recovery works and survives another restart.
    assert_eq!(
        api(
            admin,
            "PUT",
            "/v1/registry/entries/after.cn",
            &entry("after.cn")
        )
        .await
        .0,
        200
    );
    kill9(&mut p);
    let (_p, admin) = start(&config);
    assert_eq!(
        without_digest(api(admin, "GET", "/v1/registry", "").await.1),
        json!({"revision": 2, "entries": 8})
    );
}

/// Runs `icp-gate run` on `config`, which must refuse to start (exit 1); returns its stderr.
fn refuses_to_start(config: &Path) -> String {
    let mut child = std::process::Command::new(BIN)
        .args(["run", "--config"])
        .arg(config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("icp-gate started instead of refusing");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "must refuse to start");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_record_length_refuses_to_start_and_truncates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "127.0.0.1:9".parse().unwrap(), "");
    let (mut p, admin) = start(&config);
    for d in ["one.cn", "two.cn", "three.cn"] {
        let path = format!("/v1/registry/entries/{d}");
        assert_eq!(api(admin, "PUT", &path, &entry(d)).await.0, 200);
    }
    p.signal(libc::SIGTERM);
    assert_eq!(p.wait_exit(Duration::from_secs(10)), Some(0));

    // One flipped bit in the first record's length: it now claims more bytes than the file
    // holds, like a torn tail would, but two acknowledged records follow it.
    let journal = newest_journal(&state_dir(dir.path()));
    let good = std::fs::read(&journal).unwrap();
    let mut damaged = good.clone();
    damaged[3] ^= 0x01;
    std::fs::write(&journal, &damaged).unwrap();

    let err = refuses_to_start(&config);
    let name = journal.file_name().unwrap().to_string_lossy();
    assert!(
        err.contains(&*name) && err.contains("byte 0"),
        "error must name the file and the offset: {err}"
    );
    assert_eq!(
        std::fs::read(&journal).unwrap(),
        damaged,
        "acknowledged records were cut off"
    );

    // Once the operator repairs the byte, everything acknowledged is there.
    std::fs::write(&journal, &good).unwrap();
    let (_p, admin) = start(&config);
    assert_eq!(
        without_digest(api(admin, "GET", "/v1/registry", "").await.1),
        json!({"revision": 3, "entries": 9})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_snapshot_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "127.0.0.1:9".parse().unwrap(), "");
    let (mut p, _) = start(&config);
    p.signal(libc::SIGTERM);
    assert_eq!(p.wait_exit(Duration::from_secs(10)), Some(0));

    let snapshot = state_dir(dir.path()).join("snapshot.bin");
    let mut bytes = std::fs::read(&snapshot).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&snapshot, bytes).unwrap();

    let out = std::process::Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "must refuse to start");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("snapshot.bin"),
        "error must name the file: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_is_read_only_while_state_dir_is_empty() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "127.0.0.1:9".parse().unwrap(), "");
    let (mut p, admin) = start(&config);
    assert_eq!(
        api(admin, "DELETE", "/v1/registry/entries/filed.cn", "")
            .await
            .0,
        200
    );
    p.signal(libc::SIGTERM);
    assert_eq!(p.wait_exit(Duration::from_secs(10)), Some(0));

    // A different seed on the next start changes nothing: the state on disk wins.
    std::fs::write(
        dir.path().join("seed.ndjson"),
        format!("{}\n", entry("seedonly.cn")),
    )
    .unwrap();
    let (_p, admin) = start(&config);
    assert_eq!(
        without_digest(api(admin, "GET", "/v1/registry", "").await.1),
        json!({"revision": 1, "entries": 5})
    );
    assert_eq!(
        api(admin, "GET", "/v1/registry/entries/seedonly.cn", "")
            .await
            .0,
        404
    );
}

fn newest_journal(dir: &Path) -> PathBuf {
    let mut journals: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("journal-")
        })
        .collect();
    journals.sort();
    journals.pop().expect("a journal file")
}
