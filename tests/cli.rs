//! The real binary: `check`, `explain`, SIGHUP reload, SIGTERM drain and the runtime shapes.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use common::process::{BIN, Proc, run_command, write_config};

#[test]
fn check_accepts_a_good_config_and_names_file_and_key_of_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "127.0.0.1:9".parse().unwrap(), "");
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));

    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/icp-gate.toml");
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&shipped)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the shipped config must pass check: {out:?}"
    );

    let bad = write_config(
        dir.path(),
        "127.0.0.1:9".parse().unwrap(),
        "[limits]\nidle_timout = \"5s\"",
    );
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("icp-gate.toml") && err.contains("idle_timout"),
        "{err}"
    );

    std::fs::write(dir.path().join("seed.ndjson"), "{\"domain\":\"a.cn\"}\n").unwrap();
    let good_again = write_config(dir.path(), "127.0.0.1:9".parse().unwrap(), "");
    std::fs::write(
        dir.path().join("seed.ndjson"),
        format!(
            "{SEED}{{\"domain\":\"b.cn\",\"icp\":\"x\",\"status\":\"filed\",\"access_here\":1}}\n"
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&good_again)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("seed.ndjson: line 7"), "{err}");
}

#[test]
fn explain_prints_the_decision() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "127.0.0.1:9".parse().unwrap(), "");
    let explain = |host: &str, dst: &str| {
        let out = Command::new(BIN)
            .args(["explain", "--config"])
            .arg(&path)
            .args([host, "--dst", dst])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let out = explain("A.EDU.X.GOV.CN.", "127.0.0.1");
    for want in [
        "decision:    block",
        "reason:      revoked",
        "matched:     edu.x.gov.cn",
        "registrable: x.gov.cn",
    ] {
        assert!(out.contains(want), "{want}\n{out}");
    }
    let out = explain("www.例子.中国", "127.0.0.1");
    assert!(
        out.contains("decision:    allow") && out.contains("xn--fsqu00a.xn--fiqs8s"),
        "{out}"
    );
    let out = explain("filed.cn", "10.0.0.1");
    assert!(
        out.contains("decision:    refuse") && out.contains("reason:      no_route"),
        "{out}"
    );
}

/// A route with `require_access_here = false`: `explain` shows the waiver and `filed_elsewhere`,
/// and the served request's access-log line carries the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waived_access_is_explained_and_logged_as_filed_elsewhere() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        "[[listener]]\nname = \"mail\"\nbind = \"127.0.0.4:0\"\nkind = \"http\"\n\n\
         [[route]]\ndst = \"127.0.0.4/32\"\nmainland = true\nrequire_access_here = false\n\
         http_origin = \"{}\"\n",
        origin.addr
    );
    let path = write_config(dir.path(), origin.addr, &extra);
    let explain = |dst: &str| {
        let out = Command::new(BIN)
            .args(["explain", "--config"])
            .arg(&path)
            .args(["mail.elsewhere.cn", "--dst", dst])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let out = explain("127.0.0.4");
    for want in [
        "route:       127.0.0.4/32 (mainland, enforce, require_access_here = false)",
        "decision:    allow",
        "reason:      filed_elsewhere",
        "matched:     elsewhere.cn (沪ICP备00000002号-1, filed, access_here=false)",
    ] {
        assert!(out.contains(want), "{want}\n{out}");
    }
    let out = explain("127.0.0.1");
    for want in [
        "route:       127.0.0.1/32 (mainland, enforce)\n",
        "decision:    block",
        "reason:      not_accessed",
    ] {
        assert!(out.contains(want), "{want}\n{out}");
    }

    let mut proc = Proc::start(&path);
    let mail = loop {
        let line = proc.wait_for("listening");
        if line["listener"] == "mail" {
            break line["addr"].as_str().unwrap().parse().unwrap();
        }
    };
    proc.wait_for("ready");
    let (status, _, _) = http1(mail, "GET", "/", &[("host", "mail.elsewhere.cn")], b"").await;
    assert_eq!(status, 200);
    let line = proc.access_line("mail.elsewhere.cn");
    assert_eq!(
        (
            &line["listener"],
            &line["decision"],
            &line["reason"],
            &line["status"]
        ),
        (
            &serde_json::json!("mail"),
            &serde_json::json!("allow"),
            &serde_json::json!("filed_elsewhere"),
            &serde_json::json!(200)
        ),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_without_rebinding_and_keeps_old_config_on_error() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), origin.addr, "");
    let mut proc = Proc::start(&path);
    let addr = proc.listener_addr();
    proc.wait_for("ready");
    let get =
        |host: &'static str| async move { http1(addr, "GET", "/", &[("host", host)], b"").await.0 };
    assert_eq!(get("unfiled.cn").await, 403);

    // A connection opened before the reload keeps working after it.
    let mut kept = TcpStream::connect(addr).await.unwrap();
    kept.write_all(b"GET / HTTP/1.1\r\nHost: filed.cn\r\n\r\n")
        .await
        .unwrap();

    // The new config keeps port 0 for the listener: rebinding would pick another port.
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("[policy]", "[policy]\nmode = \"report\"");
    std::fs::write(&path, text).unwrap();
    proc.signal(libc::SIGHUP);
    proc.wait_for("config reloaded");
    assert_eq!(
        get("unfiled.cn").await,
        200,
        "report mode after reload, same address"
    );
    kept.write_all(b"GET / HTTP/1.1\r\nHost: filed.cn\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let resp = read_for(&mut kept, Duration::from_secs(5)).await;
    assert_eq!(statuses(&resp), [200, 200], "{resp}");

    std::fs::write(&path, "[registry]\nstate_dir = 5\n").unwrap();
    proc.signal(libc::SIGHUP);
    let rejected = proc.wait_for("reload rejected; the old config keeps serving");
    assert!(
        rejected["error"].as_str().unwrap().contains("state_dir"),
        "{rejected}"
    );
    assert_eq!(get("unfiled.cn").await, 200, "old config still serving");

    proc.signal(libc::SIGTERM);
    assert_eq!(proc.wait_exit(Duration::from_secs(10)), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_then_exits_zero() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), origin.addr, "[limits]\ndrain_timeout = \"10s\"");
    let mut proc = Proc::start(&path);
    let addr = proc.listener_addr();
    proc.wait_for("ready");
    let slow = tokio::spawn(async move {
        http1(addr, "GET", "/slow", &[("host", "filed.cn")], b"")
            .await
            .0
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    proc.signal(libc::SIGTERM);
    proc.wait_for("draining");
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "still accepting while draining"
    );
    assert_eq!(slow.await.unwrap(), 200, "in-flight request finished");
    assert_eq!(proc.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(started.elapsed() < Duration::from_secs(8));
}

/// The `Max open files` soft and hard limits of a process.
fn open_file_limits(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let numbers: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (numbers[0], numbers[1])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_file_limit_is_raised_for_max_connections_or_warned_about() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    // 2 × 1000 + 256 spare descriptors.
    let path = write_config(dir.path(), origin.addr, "[limits]\nmax_connections = 1000");
    let start = |nofile: &str| {
        let limit = format!("--nofile={nofile}");
        let mut proc = Proc::spawn(run_command(&["prlimit", &limit], &path, &[]));
        let addr = proc.listener_addr();
        proc.wait_for("ready");
        (proc, addr)
    };

    let low = "the open-file limit is below 2 × limits.max_connections + 256; raise its hard \
               limit (LimitNOFILE=, ulimit -Hn) or lower limits.max_connections";

    // A hard limit with room: the soft limit is raised to what the config needs, no warning.
    let (mut roomy, addr) = start("500:3000");
    let raised = roomy.logged("raised the open-file limit");
    assert_eq!(
        (raised["from"].as_u64(), raised["to"].as_u64()),
        (Some(500), Some(2256))
    );
    assert_eq!(open_file_limits(roomy.pid()), (2256, 3000));
    assert!(roomy.seen(low).is_none());
    let (status, _, _) = http1(addr, "GET", "/", &[("host", "filed.cn")], b"").await;
    assert_eq!(status, 200);
    roomy.signal(libc::SIGTERM);
    assert_eq!(roomy.wait_exit(Duration::from_secs(10)), Some(0));

    // Too low a hard limit: raised as far as it goes, and the operator is told what is needed.
    let (mut tight, _) = start("500:1000");
    assert_eq!(open_file_limits(tight.pid()), (1000, 1000));
    let warned = tight.logged(low);
    assert_eq!(
        (warned["open_files"].as_u64(), warned["needed"].as_u64()),
        (Some(1000), Some(2256))
    );
    assert_eq!(warned["level"], "WARN");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_accepts_fail_quietly_and_recover() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), origin.addr, "[limits]\nmax_connections = 1000");
    // 48 descriptors in all: a few dozen client connections use them up.
    let prlimit = ["prlimit", "--nofile=48:48"];
    let mut gate = Proc::spawn(run_command(&prlimit, &path, &["--threads", "1"]));
    let addr = gate.listener_addr();
    gate.wait_for("ready");

    // The kernel queues connections the process cannot accept; hold them for 2.5 s.
    let held: Vec<std::net::TcpStream> = (0..80)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect();
    let failed = "accept failed; retrying every 50 ms (failures: since the last such line)";
    gate.wait_for(failed);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // Retried 20 times a second, logged about once a second with the count in between.
    let lines = gate.received(failed);
    assert!((2..=4).contains(&lines.len()), "{lines:#?}");
    assert_eq!(lines[0]["level"], "WARN");
    assert_eq!(lines[0]["error"], "Too many open files (os error 24)");
    assert_eq!(lines[0]["failures"], 1);
    assert!(lines[1]["failures"].as_u64().unwrap() >= 5, "{lines:#?}");

    // Descriptors come back when clients leave, and so does service.
    drop(held);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, _, _) = http1(addr, "GET", "/", &[("host", "unfiled.cn")], b"").await;
    assert_eq!(status, 403);
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_reader_that_stops_reading_costs_log_lines_not_service() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (http, admin) = (free_port(), free_port());
    let path = write_config(dir.path(), origin.addr, "");
    let text = std::fs::read_to_string(&path).unwrap();
    let text = text.replacen("127.0.0.1:0", &format!("127.0.0.1:{http}"), 1);
    let text = text.replacen("127.0.0.1:0", &format!("127.0.0.1:{admin}"), 1);
    std::fs::write(&path, text).unwrap();
    // stderr is a pipe nobody reads: it fills after a few hundred lines, as a stalled journald
    // or log shipper would leave it.
    let mut child = KillOnDrop(
        run_command(&[], &path, &["--threads", "1"])
            .env("RUST_LOG", "info")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let _unread = child.0.stderr.take();
    let http: std::net::SocketAddr = ([127, 0, 0, 1], http).into();
    let admin: std::net::SocketAddr = ([127, 0, 0, 1], admin).into();
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(http).await.is_err() {
        assert!(Instant::now() < deadline, "never listened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // 20 000 requests, each an access-log line: far more than the pipe and the log queue hold.
    let request = b"GET / HTTP/1.1\r\nHost: unfiled.cn\r\n\r\n".repeat(2_000);
    let answered = tokio::time::timeout(Duration::from_secs(60), async {
        let mut clients = Vec::new();
        for _ in 0..10 {
            let request = request.clone();
            clients.push(tokio::spawn(async move {
                let mut s = TcpStream::connect(http).await.unwrap();
                s.write_all(&request).await.unwrap();
                let mut buf = vec![0u8; 64 * 1024];
                let marker = b"HTTP/1.1 403";
                // Counted as the bytes arrive, a marker cut between two reads included.
                let (mut answers, mut window) = (0, Vec::new());
                while answers < 2_000 {
                    use tokio::io::AsyncReadExt;
                    let n = s.read(&mut buf).await.unwrap();
                    assert!(n > 0, "closed after {answers} answers");
                    window.extend_from_slice(&buf[..n]);
                    answers += window.windows(marker.len()).filter(|w| w == marker).count();
                    window.drain(..window.len().saturating_sub(marker.len() - 1));
                }
                answers
            }));
        }
        let mut total = 0;
        for c in clients {
            total += c.await.unwrap();
        }
        total
    })
    .await
    .expect("the data path stalled behind its log");
    assert_eq!(answered, 20_000);

    let (status, _, metrics) = http1(admin, "GET", "/metrics", &[("host", "admin")], b"").await;
    assert_eq!(status, 200);
    let dropped: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("icp_gate_log_lines_dropped_total "))
        .unwrap_or_else(|| panic!("{metrics}"))
        .parse()
        .unwrap();
    assert!(dropped > 0, "{metrics}");
}

/// A child process ended with the test, failed or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_has_a_hard_deadline() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        origin.addr,
        "[limits]\ndrain_timeout = \"500ms\"",
    );
    let mut proc = Proc::start(&path);
    let addr = proc.listener_addr();
    proc.wait_for("ready");
    let _slow =
        tokio::spawn(
            async move { http1(addr, "GET", "/slow", &[("host", "filed.cn")], b"").await },
        );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    proc.signal(libc::SIGTERM);
    assert_eq!(proc.wait_exit(Duration::from_secs(5)), Some(0));
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(2500),
        "exited after {took:?}, before the 3 s origin answered"
    );
}

/// Listening TCP sockets of process `pid` on `port` (from /proc: the process's socket inodes,
/// matched against the kernel's table of IPv4 sockets in state LISTEN).
fn listening_sockets(pid: u32, port: u16) -> usize {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|link| {
            let link = link.to_string_lossy().into_owned();
            Some(
                link.strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_string(),
            )
        })
        .collect();
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let local = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f[1].ends_with(&local) && f[3] == "0A" && inodes.iter().any(|i| i == f[9]))
        .count()
}

/// Both runtime shapes with three threads. Per-thread: every worker accepts on its own
/// `SO_REUSEPORT` socket (three on the port), connections spread over them are each decided
/// and forwarded, a listener added by a reload gets a socket per worker too, and SIGTERM drains
/// every worker. Work-stealing: one socket per listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_shapes_bind_a_socket_per_worker_and_serve_on_each() {
    for (shape, sockets) in [("per-thread", 3), ("work-stealing", 1)] {
        let origin = Origin::start().await;
        let dir = tempfile::tempdir().unwrap();
        let path = write_config(dir.path(), origin.addr, "");
        let mut proc = Proc::start_with(&path, &["--threads", "3", "--runtime", shape]);
        let addr = proc.listener_addr();
        proc.wait_for("ready");
        assert_eq!(
            listening_sockets(proc.pid(), addr.port()),
            sockets,
            "{shape}"
        );

        // 60 connections at once, each from its own port: the kernel hashes them over the
        // sockets. Filed hosts go through the per-worker origin pools.
        let answers = async |addr| {
            let requests = (0..60).map(|i| {
                tokio::spawn(async move {
                    let host = if i % 2 == 0 { "filed.cn" } else { "unfiled.cn" };
                    (
                        host,
                        http1(addr, "GET", "/", &[("host", host)], b"").await.0,
                    )
                })
            });
            let mut seen = Vec::new();
            for r in requests.collect::<Vec<_>>() {
                seen.push(r.await.unwrap());
            }
            seen
        };
        for (host, status) in answers(addr).await {
            assert_eq!(
                status,
                if host == "filed.cn" { 200 } else { 403 },
                "{shape}"
            );
        }

        let text = std::fs::read_to_string(&path).unwrap()
            + "\n[[listener]]\nname = \"second\"\nbind = \"127.0.0.1:0\"\nkind = \"http\"\n";
        std::fs::write(&path, text).unwrap();
        proc.signal(libc::SIGHUP);
        let second: std::net::SocketAddr = proc.wait_for("listening")["addr"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        proc.wait_for("config reloaded");
        assert_eq!(
            listening_sockets(proc.pid(), second.port()),
            sockets,
            "{shape}"
        );
        for (host, status) in answers(second).await {
            assert_eq!(
                status,
                if host == "filed.cn" { 200 } else { 403 },
                "{shape}"
            );
        }
        assert_eq!(
            listening_sockets(proc.pid(), addr.port()),
            sockets,
            "{shape}"
        );

        proc.signal(libc::SIGTERM);
        proc.wait_for("draining");
        assert_eq!(listening_sockets(proc.pid(), addr.port()), 0, "{shape}");
        assert_eq!(proc.wait_exit(Duration::from_secs(10)), Some(0), "{shape}");
    }
}
