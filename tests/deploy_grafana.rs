//! `deploy/grafana/icp-gate.json` against real data: Debian's `prometheus` server, started on
//! loopback with the shipped scrape config (`deploy/prometheus/prometheus.yml`), scrapes a real
//! icp-gate while it serves a little traffic of every kind; then every query of the dashboard
//! (panels, the instance variable, the annotation) is evaluated through Prometheus' HTTP API
//! and must answer without error, with data, and with at least one number that is not NaN.
//! `prometheus` comes from the README's setup step (Debian's `prometheus` package).

mod common;

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::pki::Pki;
use common::process::{Proc, write_config};
use common::{Origin, http1, raw, raw_origin, testdata};
use serde_json::Value;

const DASHBOARD: &str = include_str!("../deploy/grafana/icp-gate.json");
const SCRAPE: &str = include_str!("../deploy/prometheus/prometheus.yml");
const RULES: &str = include_str!("../deploy/prometheus/icp-gate.rules.yml");

/// The Prometheus server, stopped (by its pid) when dropped.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

impl Prometheus {
    /// The shipped scrape config, pointed at `target` and scraping every second.
    fn start(target: SocketAddr) -> Prometheus {
        let version = Command::new("prometheus").arg("--version").output();
        assert!(
            version.is_ok_and(|o| o.status.success()),
            "prometheus not found: install Debian's prometheus package (the README's setup step)"
        );
        let dir = tempfile::tempdir().unwrap();
        let config = SCRAPE
            .replace("scrape_interval: 15s", "scrape_interval: 1s")
            .replace("evaluation_interval: 15s", "evaluation_interval: 1s")
            .replace(
                "          - edge1.example:9090\n          - edge2.example:9090\n",
                &format!("          - {target}\n"),
            );
        assert!(config.contains(&target.to_string()), "{config}");
        std::fs::write(dir.path().join("prometheus.yml"), &config).unwrap();
        std::fs::write(dir.path().join("icp-gate.rules.yml"), RULES).unwrap();
        let addr = free_port();
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Prometheus {
            child,
            addr,
            _dir: dir,
        }
    }

    /// An instant query through the HTTP API: the JSON answer.
    async fn query(&self, promql: &str) -> Value {
        let path = format!("/api/v1/query?query={}", percent_encode(promql));
        let (status, _, body) =
            http1(self.addr, "GET", &path, &[("host", "prometheus")], b"").await;
        let answer: Value = serde_json::from_str(&body)
            .unwrap_or_else(|_| panic!("{promql}: HTTP {status}: {body}"));
        assert_eq!(answer["status"], "success", "{promql}: {answer}");
        answer
    }

    /// Waits until `promql` has a result (Prometheus answering, the target scraped, …).
    async fn until_result(&self, promql: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let ready = match self.ready().await {
                true => Some(self.query(promql).await),
                false => None,
            };
            if let Some(answer) = ready
                && !answer["data"]["result"].as_array().unwrap().is_empty()
            {
                return answer;
            }
            assert!(Instant::now() < deadline, "no result for {promql}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The time of the last scrape of icp-gate.
    async fn last_scrape(&self) -> f64 {
        let answer = self.query("timestamp(up{job=\"icp-gate\"})").await;
        answer["data"]["result"][0]["value"][1]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    /// Waits for `n` more scrapes of icp-gate.
    async fn scrapes(&self, n: u32) {
        let from = self.last_scrape().await;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.last_scrape().await < from + f64::from(n) - 0.1 {
            assert!(Instant::now() < deadline, "Prometheus stopped scraping");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn ready(&self) -> bool {
        if tokio::net::TcpStream::connect(self.addr).await.is_err() {
            return false;
        }
        let (status, _, _) =
            http1(self.addr, "GET", "/-/ready", &[("host", "prometheus")], b"").await;
        status == 200
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every PromQL query of the dashboard, with what it belongs to, Grafana's variables replaced
/// as Grafana would for "All instances" and a one-minute rate window.
fn dashboard_queries() -> Vec<(String, String)> {
    let dashboard: Value = serde_json::from_str(DASHBOARD).unwrap();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] == "row" {
            continue;
        }
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{} has no query", panel["title"]);
        for target in targets {
            queries.push((
                format!("panel {:?} {}", panel["title"], target["refId"]),
                target["expr"].as_str().unwrap().to_string(),
            ));
        }
    }
    for annotation in dashboard["annotations"]["list"].as_array().unwrap() {
        queries.push((
            format!("annotation {}", annotation["name"]),
            annotation["expr"].as_str().unwrap().to_string(),
        ));
    }
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        if variable["type"] != "query" {
            continue;
        }
        // label_values(SELECTOR, LABEL): the series of SELECTOR, which must carry LABEL.
        let definition = variable["definition"].as_str().unwrap();
        let inner = definition
            .strip_prefix("label_values(")
            .and_then(|d| d.strip_suffix(')'))
            .unwrap();
        let (selector, label) = inner.rsplit_once(',').unwrap();
        queries.push((
            format!("variable {} (label {})", variable["name"], label.trim()),
            format!("count by ({}) ({selector})", label.trim()),
        ));
    }
    queries
        .into_iter()
        .map(|(what, q)| {
            let q = q
                .replace("$__rate_interval", "1m")
                .replace("$__range", "5m")
                .replace("$instance", ".*");
            assert!(
                !q.contains('$'),
                "{what}: a variable the test does not know: {q}"
            );
            (what, q)
        })
        .collect()
}

#[test]
fn dashboard_is_importable_grafana_json() {
    let dashboard: Value = serde_json::from_str(DASHBOARD).unwrap();
    assert_eq!(dashboard["uid"], "icp-gate");
    assert!(dashboard["schemaVersion"].as_u64().unwrap() >= 36);
    // The datasource is chosen at import (a variable), not a uid of the author's Grafana.
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    assert!(variables.iter().any(|v| v["type"] == "datasource"
        && v["name"] == "datasource"
        && v["query"] == "prometheus"));
    let mut ids = std::collections::HashSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        assert!(ids.insert(panel["id"].as_u64().unwrap()), "duplicate id");
        let grid = &panel["gridPos"];
        assert!(grid["x"].as_u64().unwrap() + grid["w"].as_u64().unwrap() <= 24);
        if panel["type"] != "row" {
            assert_eq!(
                panel["datasource"]["uid"], "${datasource}",
                "{}",
                panel["title"]
            );
            assert!(!panel["description"].as_str().unwrap().is_empty());
        }
    }
    // What issue 23 asked the dashboard to show, each by the metric that shows it.
    let queries: String = dashboard_queries()
        .into_iter()
        .map(|(_, q)| q + "\n")
        .collect();
    for metric in [
        "icp_gate_requests_total",
        "icp_gate_tls_connections_total",
        "icp_gate_request_duration_seconds_bucket",
        "icp_gate_upstream_errors_total",
        "icp_gate_registry_revision",
        "icp_gate_registry_last_update_timestamp_seconds",
        "icp_gate_registry_updates_total",
        "icp_gate_connections_active",
        "icp_gate_connections_limit",
        "icp_gate_log_lines_dropped_total",
        "icp_gate_certificate_expiry_timestamp_seconds",
        "icp_gate_config_reloads_total",
        "icp_gate_build_info",
    ] {
        assert!(queries.contains(metric), "no panel shows {metric}");
    }
}

#[test]
fn shipped_scrape_config_passes_promtool() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus");
    let out = Command::new("promtool")
        .args(["check", "config", "prometheus.yml"])
        .current_dir(&dir)
        .output()
        .expect("promtool (Debian's prometheus package, the README's setup step)");
    assert!(out.status.success(), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_panel_has_data_in_a_real_prometheus() {
    // icp-gate with an HTTP and a TLS listener, a block certificate, and origins that answer
    // (and one path of the HTTP origin too slow for the response timeout).
    let origin = Origin::start().await;
    let tls_origin = raw_origin(b"tls origin").await;
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let (_, _, cert, key) = pki.leaf(&["block.example"]);
    std::fs::write(dir.path().join("block.crt"), cert).unwrap();
    std::fs::write(dir.path().join("block.key"), key).unwrap();
    let extra = "[[listener]]\nname = \"tls\"\nbind = \"127.0.0.1:0\"\nkind = \"tls\"\n\
        [tls]\nblock_cert = \"block.crt\"\nblock_key = \"block.key\"\n\
        [limits]\norigin_response_timeout = \"1s\"\n";
    let config = write_config(dir.path(), origin.addr, extra);
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "mainland = true\n",
        &format!("mainland = true\ntls_origin = \"{tls_origin}\"\n"),
    );
    std::fs::write(&config, text).unwrap();
    let mut gate = Proc::start(&config);
    let admin = gate.admin_addr();
    let mut listeners = std::collections::HashMap::new();
    for _ in 0..2 {
        let line = gate.wait_for("listening");
        let addr: SocketAddr = line["addr"].as_str().unwrap().parse().unwrap();
        listeners.insert(line["listener"].as_str().unwrap().to_string(), addr);
    }
    gate.wait_for("ready");

    let prometheus = Prometheus::start(admin);
    prometheus
        .until_result("up{job=\"icp-gate\"} == 1", Duration::from_secs(60))
        .await;
    prometheus.scrapes(1).await;

    // A reload, then traffic of every kind, twice with a scrape between: a counter's first
    // sample is where rate() starts, so only the second round shows as a rate.
    gate.signal(libc::SIGHUP);
    gate.wait_for("config reloaded");
    let filed = std::fs::read(testdata("clienthello/chromium.bin")).unwrap();
    let unfiled = replace(
        &filed,
        b"www.filed-example.com.cn",
        b"www.unfil-example.com.cn",
    );
    for _ in 0..2 {
        traffic(listeners["http"], listeners["tls"], admin, &filed, &unfiled).await;
        prometheus.scrapes(2).await;
    }

    let mut failures = Vec::new();
    let queries = dashboard_queries();
    assert!(queries.len() >= 20, "{}", queries.len());
    for (what, promql) in &queries {
        let answer = prometheus.query(promql).await;
        let result = answer["data"]["result"].as_array().unwrap();
        let numbers: Vec<f64> = result
            .iter()
            .filter_map(|r| r["value"][1].as_str()?.parse().ok())
            .collect();
        if result.is_empty() {
            failures.push(format!("{what}: no data: {promql}"));
        } else if numbers.iter().all(|v| v.is_nan()) {
            failures.push(format!("{what}: only NaN: {promql} = {result:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// One round of every kind of traffic: HTTP allowed, blocked for each registry reason, exempt,
/// an IP literal, an origin too slow (504); TLS refused and passed through; a registry write.
async fn traffic(
    http: SocketAddr,
    tls: SocketAddr,
    admin: SocketAddr,
    filed: &[u8],
    unfiled: &[u8],
) {
    for (host, path, status) in [
        ("www.filed.cn", "/", 200),
        ("unfiled.cn", "/", 403),
        ("gone.cn", "/", 403),
        ("mail.elsewhere.cn", "/", 403),
        ("console.example", "/", 200),
        ("127.0.0.1", "/", 200),
        ("www.filed.cn", "/slow", 504),
    ] {
        let (code, _, body) = http1(http, "GET", path, &[("host", host)], b"").await;
        assert_eq!(code, status, "{host}{path}: {body}");
    }
    let refused = raw(tls, unfiled, Duration::from_secs(2)).await;
    assert!(!refused.contains("tls origin"), "{refused}");
    let auth = [("host", "admin"), ("authorization", "Bearer test-token")];
    let entry = r#"{"domain":"filed-example.com.cn","icp":"京ICP备1号-1","status":"filed","access_here":true}"#;
    let (code, _, body) = http1(
        admin,
        "PUT",
        "/v1/registry/entries/filed-example.com.cn",
        &auth,
        entry.as_bytes(),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let passed = raw(tls, filed, Duration::from_secs(1)).await;
    assert_eq!(passed, "tls origin");
}

/// `bytes` with its one occurrence of `from` replaced by `to` (of the same length).
fn replace(bytes: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let at = bytes
        .windows(from.len())
        .position(|w| w == from)
        .expect("present");
    let mut out = bytes.to_vec();
    out[at..at + to.len()].copy_from_slice(to);
    out
}
