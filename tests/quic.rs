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
