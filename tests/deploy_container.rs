//! `deploy/container/build.sh`: the image built with Debian's buildah from scratch (no base
//! image pulled), exported with podman, and its root file system run under `chroot` as the
//! image's own user — this machine's container runtime refuses to start containers (cgroups),
//! so chroot stands in for it — serving a blocked and a forwarded request. buildah and podman
//! come from the README's setup step; the test needs root, as building an image from scratch
//! and chroot do. Images and containers go to a storage of the test's own, removed at the end.

mod common;

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::process::{BIN, Proc};
use common::{Origin, http1, raw_origin};

const IMAGE: &str = "localhost/icp-gate:deploy-test";
const USER: u32 = 65532;

/// A container storage of the test's own (graph root and run root in a temporary folder), for
/// buildah and podman alike.
struct Storage {
    dir: tempfile::TempDir,
}

impl Storage {
    fn new() -> Storage {
        let dir = tempfile::tempdir().unwrap();
        let conf = format!(
            "[storage]\ndriver = \"overlay\"\ngraphroot = \"{0}/graph\"\nrunroot = \"{0}/run\"\n",
            dir.path().display()
        );
        std::fs::write(dir.path().join("storage.conf"), conf).unwrap();
        Storage { dir }
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env(
            "CONTAINERS_STORAGE_CONF",
            self.dir.path().join("storage.conf"),
        );
        c
    }
}

impl Drop for Storage {
    fn drop(&mut self) {
        // Nothing mounted may stay behind the folder's removal.
        let _ = self.command("podman").args(["rm", "-a", "-f"]).output();
        let _ = self.command("buildah").args(["rm", "-a"]).output();
        let _ = self.command("podman").args(["rmi", "-a", "-f"]).output();
    }
}

fn succeeds(command: &mut Command) -> Output {
    let shown = format!("{command:?}");
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{shown}: {e} (installed by the README's setup step)"));
    assert!(
        out.status.success(),
        "{shown}: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A free port below 1024 on 127.0.0.1.
fn privileged_port(not: u16) -> u16 {
    let start = 700 + (std::process::id() % 250) as u16;
    (start..1024)
        .chain(600..start)
        .find(|&port| port != not && TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok())
        .expect("a free port below 1024")
}

/// Every file and folder under `root`, relative to it.
fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            out.push(path.strip_prefix(root).unwrap().to_path_buf());
            if path.is_dir() && !path.is_symlink() {
                todo.push(path);
            }
        }
    }
    out.sort();
    out
}

fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_built_from_scratch_serves_from_its_root_file_system() {
    assert!(is_root(), "building from scratch and chroot need root");
    let storage = Storage::new();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/container/build.sh");
    let built = succeeds(storage.command("bash").arg(&script).args([BIN, IMAGE]));
    assert_eq!(String::from_utf8_lossy(&built.stdout).trim(), IMAGE);

    // From scratch: one layer, nothing pulled.
    let inspect = succeeds(storage.command("podman").args(["image", "inspect", IMAGE]));
    let image: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    let image = &image[0];
    assert_eq!(image["RootFS"]["Layers"].as_array().unwrap().len(), 1);
    let config = &image["Config"];
    assert_eq!(config["User"], format!("{USER}:{USER}"));
    assert_eq!(config["Entrypoint"][0], "/usr/local/bin/icp-gate");
    assert_eq!(config["Cmd"][0], "run");
    assert_eq!(config["StopSignal"], "SIGTERM");
    let images = succeeds(storage.command("podman").args(["images", "-q"]));
    assert_eq!(
        String::from_utf8_lossy(&images.stdout).lines().count(),
        1,
        "no base image in the storage"
    );

    // The image's root file system, as `podman export` writes it (file capabilities kept).
    let created = succeeds(storage.command("podman").args(["create", IMAGE]));
    let container = String::from_utf8_lossy(&created.stdout).trim().to_string();
    let work = tempfile::tempdir().unwrap();
    let tar = work.path().join("rootfs.tar");
    succeeds(
        storage
            .command("podman")
            .args(["export", "-o"])
            .arg(&tar)
            .arg(&container),
    );
    let root = work.path().join("rootfs");
    std::fs::create_dir(&root).unwrap();
    succeeds(
        Command::new("tar")
            .args(["--xattrs", "--xattrs-include=*", "-xf"])
            .arg(&tar)
            .arg("-C")
            .arg(&root),
    );

    // The binary, its loader and libraries, the config, the user and its folder; no shell.
    let files = walk(&root);
    for expected in [
        "usr/local/bin/icp-gate",
        "etc/icp-gate/icp-gate.toml",
        "etc/passwd",
        "var/lib/icp-gate",
    ] {
        assert!(
            files.iter().any(|f| f == Path::new(expected)),
            "{expected}: {files:?}"
        );
    }
    let ldd = succeeds(Command::new("ldd").arg(BIN));
    for lib in String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        assert!(root.join(&lib[1..]).is_file(), "{lib} missing");
    }
    for file in &files {
        let name = file.file_name().unwrap().to_string_lossy();
        assert!(
            !["sh", "bash", "dash", "busybox", "ash"].contains(&name.as_ref()),
            "a shell: {}",
            file.display()
        );
    }
    assert!(files.len() < 40, "only what icp-gate needs: {files:?}");
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    assert!(
        passwd.starts_with(&format!("icp-gate:x:{USER}:{USER}:")),
        "{passwd}"
    );
    assert_eq!(
        std::fs::metadata(root.join("var/lib/icp-gate"))
            .unwrap()
            .uid(),
        USER
    );
    let caps = succeeds(Command::new("getcap").arg(root.join("usr/local/bin/icp-gate")));
    assert!(
        String::from_utf8_lossy(&caps.stdout).contains("cap_net_bind_service=ep"),
        "{caps:?}"
    );
    // The config the image ships is the production one.
    assert_eq!(
        std::fs::read_to_string(root.join("etc/icp-gate/icp-gate.toml")).unwrap(),
        include_str!("../deploy/icp-gate.toml")
    );

    // Run it from that root, as the image's user, on ports below 1024 (the file capability)
    // with the shipped config moved to loopback and test origins, as a mounted config would be.
    let origin = Origin::start().await;
    let tls_origin = raw_origin(b"tls origin").await;
    let http_port = privileged_port(0);
    let tls_port = privileged_port(http_port);
    let http = SocketAddr::from((Ipv4Addr::LOCALHOST, http_port));
    let text = include_str!("../deploy/icp-gate.toml")
        .replace("0.0.0.0:80\"", &format!("{http}\""))
        .replace("0.0.0.0:443\"", &format!("127.0.0.1:{tls_port}\""))
        .replace("127.0.0.1:9090", "127.0.0.1:0")
        .replace("203.0.113.0/24", "127.0.0.0/8")
        .replace("10.0.0.10:80\"", &format!("{}\"", origin.addr))
        .replace("10.0.0.10:443\"", &format!("{tls_origin}\""));
    std::fs::write(root.join("etc/icp-gate/icp-gate.toml"), text).unwrap();
    std::fs::write(
        root.join("etc/icp-gate/admin.token"),
        "container-test-token\n",
    )
    .unwrap();
    let mut chroot = Command::new("chroot");
    chroot
        .arg(format!("--userspec={USER}:{USER}"))
        .arg(&root)
        .args([
            "/usr/local/bin/icp-gate",
            "run",
            "--config",
            "/etc/icp-gate/icp-gate.toml",
            "--log-format",
            "json",
        ]);
    let mut gate = Proc::spawn(chroot);
    let admin = gate.admin_addr();
    gate.wait_for("ready");
    let status = std::fs::read_to_string(format!("/proc/{}/status", gate.pid())).unwrap();
    assert!(
        status.contains(&format!("Uid:\t{USER}\t{USER}")),
        "{status}"
    );

    // Blocked: a fresh registry has no filings.
    let host = [("host", "www.filed-example.com.cn")];
    let (code, headers, body) = http1(http, "GET", "/", &host, b"").await;
    assert_eq!(code, 403, "{body}");
    assert_eq!(headers["icp-gate-reason"], "unfiled");
    assert!(body.contains("未备案"), "{body}");

    // The filing system files it; written into the image's state folder, then forwarded.
    let entry = r#"{"domain":"filed-example.com.cn","icp":"京ICP备12345678号-1","status":"filed","access_here":true}"#;
    let auth = [
        ("host", "admin"),
        ("authorization", "Bearer container-test-token"),
    ];
    let (code, _, body) = http1(
        admin,
        "PUT",
        "/v1/registry/entries/filed-example.com.cn",
        &auth,
        entry.as_bytes(),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let (code, _, body) = http1(http, "GET", "/in-the-image", &host, b"").await;
    assert_eq!(
        (code, body.as_str()),
        (200, "origin saw www.filed-example.com.cn/in-the-image")
    );
    let state = root.join("var/lib/icp-gate/registry");
    assert!(
        std::fs::read_dir(&state)
            .unwrap()
            .all(|f| f.unwrap().metadata().unwrap().uid() == USER)
    );

    gate.signal(libc::SIGTERM);
    assert_eq!(gate.wait_exit(Duration::from_secs(10)), Some(0));
    drop(storage);
}
