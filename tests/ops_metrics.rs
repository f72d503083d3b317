//! The metrics an operator asks of the process itself, read from the real binary's /metrics:
//! the build, config reloads (a rejected SIGHUP included) and certificate expiry.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::pki::Pki;
use common::process::{BIN, Proc, write_config};
use common::{Origin, http1};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

/// A certificate for `name` issued by `pki`, valid until midnight UTC of `ymd`: (cert, key) PEM.
fn cert_until(pki: &Pki, name: &str, (y, m, d): (i32, u8, u8)) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
    params.not_after = rcgen::date_time_ymd(y, m, d);
    let cert = params.signed_by(&key, &pki.ca).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn unix(date: &str) -> i64 {
    humantime::parse_rfc3339(&format!("{date}T00:00:00Z"))
        .unwrap()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// The value of the sample `series` (name and labels exactly as exposed), if exported.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

async fn scrape(admin: SocketAddr) -> String {
    let (status, _, body) = http1(admin, "GET", "/metrics", &[("host", "admin")], b"").await;
    assert_eq!(status, 200);
    body
}

/// What build.rs records: the commit of the source tree, or "unknown" outside git.
fn expected_commit() -> String {
    let out = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8(o.stdout).unwrap().trim().to_string(),
        _ => "unknown".to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_info_reloads_and_the_block_certificate_expiry() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    for (file, until) in [("2031.crt", (2031, 5, 17)), ("2032.crt", (2032, 1, 2))] {
        let (cert, key) = cert_until(&pki, "www.unfiled.cn", until);
        std::fs::write(dir.path().join(file), cert).unwrap();
        std::fs::write(dir.path().join(file.replace("crt", "key")), key).unwrap();
    }
    let block =
        |year: &str| format!("[tls]\nblock_cert = \"{year}.crt\"\nblock_key = \"{year}.key\"\n");
    let config = write_config(dir.path(), origin.addr, &block("2031"));
    let good = std::fs::read_to_string(&config).unwrap();
    let mut gate = Proc::start(&config);
    let admin = gate.admin_addr();
    gate.wait_for("ready");
    let started = now();

    let m = scrape(admin).await;
    let build = format!(
        "icp_gate_build_info{{commit=\"{}\",version=\"{}\"}}",
        expected_commit(),
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(sample(&m, &build), Some(1.0), "{build} in\n{m}");
    let (ok, error) = (
        "icp_gate_config_reloads_total{result=\"ok\"}",
        "icp_gate_config_reloads_total{result=\"error\"}",
    );
    assert_eq!(sample(&m, ok), Some(0.0), "{m}");
    assert_eq!(sample(&m, error), Some(0.0), "{m}");
    let last = "icp_gate_config_last_reload_success_timestamp_seconds";
    let loaded = sample(&m, last).unwrap();
    assert!((started - 30.0..=started).contains(&loaded), "{loaded}");
    let expiry = "icp_gate_certificate_expiry_timestamp_seconds{cert=\"tls.block_cert\"}";
    assert_eq!(sample(&m, expiry), Some(unix("2031-05-17") as f64), "{m}");
    assert!(
        !m.contains("cert=\"admin.tls_cert\""),
        "no admin certificate"
    );
    assert_eq!(sample(&m, "icp_gate_connections_limit"), Some(100_000.0));

    // A config that does not parse: rejected, counted, and the old one keeps its timestamp.
    std::fs::write(&config, "[registry\n").unwrap();
    gate.signal(libc::SIGHUP);
    gate.wait_for("reload rejected; the old config keeps serving");
    let m = scrape(admin).await;
    assert_eq!(sample(&m, error), Some(1.0), "{m}");
    assert_eq!(sample(&m, ok), Some(0.0), "{m}");
    assert_eq!(sample(&m, last), Some(loaded));

    // One that parses but cannot be applied (its block certificate is gone) is an error too.
    std::fs::write(&config, good.replace("2031.crt", "missing.crt")).unwrap();
    gate.signal(libc::SIGHUP);
    gate.wait_for("reload rejected; the old config keeps serving");
    assert_eq!(sample(&scrape(admin).await, error), Some(2.0));

    // A good one: counted, the timestamp moves, the new certificate's expiry and connection
    // limit show.
    std::thread::sleep(Duration::from_millis(20));
    let bigger = good.replace("2031", "2032") + "[limits]\nmax_connections = 5000\n";
    std::fs::write(&config, bigger).unwrap();
    gate.signal(libc::SIGHUP);
    gate.wait_for("config reloaded");
    let m = scrape(admin).await;
    assert_eq!(sample(&m, ok), Some(1.0), "{m}");
    assert!(sample(&m, last).unwrap() > loaded, "{m}");
    assert_eq!(sample(&m, expiry), Some(unix("2032-01-02") as f64), "{m}");
    assert_eq!(
        sample(&m, "icp_gate_connections_limit"),
        Some(5000.0),
        "{m}"
    );

    // Without a block certificate the series goes away rather than going stale.
    std::fs::write(&config, good.replace(&block("2031"), "")).unwrap();
    gate.signal(libc::SIGHUP);
    gate.wait_for("config reloaded");
    let m = scrape(admin).await;
    assert_eq!(sample(&m, ok), Some(2.0), "{m}");
    assert!(!m.contains("tls.block_cert"), "{m}");
}

/// GET /metrics over TLS, trusting `pki`.
async fn scrape_tls(pki: &Pki, admin: SocketAddr) -> String {
    use http_body_util::BodyExt;
    let tcp = TcpStream::connect(admin).await.unwrap();
    let tls = pki
        .client(&[])
        .connect(ServerName::try_from("admin.icp-gate.test").unwrap(), tcp)
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("/metrics")
        .header("host", "admin")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_certificate_expiry() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let (cert, key) = cert_until(&pki, "admin.icp-gate.test", (2030, 7, 1));
    std::fs::write(dir.path().join("admin.crt"), cert).unwrap();
    std::fs::write(dir.path().join("admin.key"), key).unwrap();
    let config = write_config(dir.path(), origin.addr, "");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "token_file = \"admin.token\"",
        "token_file = \"admin.token\"\ntls_cert = \"admin.crt\"\ntls_key = \"admin.key\"",
    );
    std::fs::write(&config, text).unwrap();
    let mut gate = Proc::start(&config);
    let admin = gate.admin_addr();
    gate.wait_for("ready");
    let m = scrape_tls(&pki, admin).await;
    let expiry = "icp_gate_certificate_expiry_timestamp_seconds{cert=\"admin.tls_cert\"}";
    assert_eq!(sample(&m, expiry), Some(unix("2030-07-01") as f64), "{m}");
    assert!(!m.contains("tls.block_cert"), "{m}");
}

/// `run` in the default text format: a rejected reload is one line that says so and names the
/// file, even for a syntax error, whose message quotes the source over several lines.
#[test]
fn a_rejected_reload_is_one_line_of_the_text_log() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let origin = rt.block_on(Origin::start());
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), origin.addr, "");
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let wait = |what: &str| -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            let line = lines
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|_| panic!("no {what:?} line; saw {seen:#?}"));
            let found = line.contains(what);
            seen.push(line);
            if found {
                return seen;
            }
        }
    };
    wait(" ready");
    std::fs::write(&config, "[registry]\nstate_dir = \"state\"\n[limits\n").unwrap();
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGHUP) }, 0);
    let seen = wait("reload rejected");
    let line = seen.last().unwrap();
    assert!(line.contains(" ERROR "), "{line}");
    assert!(line.contains(&config.display().to_string()), "{line}");
    assert!(line.contains("line 3"), "{line}");
    // Nothing of the error follows on lines of its own: the next line is the next event.
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let rest = wait("stopped");
    for l in &rest {
        assert!(
            l.contains(" INFO ") || l.contains(" WARN ") || l.contains(" ERROR "),
            "a line that is not an event: {l:?} (after {line:?})"
        );
    }
    assert!(child.wait().unwrap().success());
}
