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

/// The values of `keys` in `v`, as one JSON array: several fields of a log line in one assertion.
fn pick(v: &Value, keys: &[&str]) -> Value {
    Value::Array(keys.iter().map(|k| v[*k].clone()).collect())
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

fn deletes(prefix: &str, range: std::ops::Range<usize>) -> String {
    range
        .map(|i| json!({"op": "delete", "domain": format!("{prefix}{i}.cn")}).to_string() + "\n")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_that_would_gut_the_registry_are_refused_and_logged() {
    let (_dir, mut proc, admin) = start("");
    let count =
        |admin| async move { api(admin, "GET", "/v1/registry", "").await.1["entries"].clone() };

    // An empty replace is refused, whatever the call says.
    for (path, body) in [
        ("/v1/registry", ""),
        ("/v1/registry", "\n  \n\n"),
        ("/v1/registry?allow_shrink=true", ""),
    ] {
        let (status, answer) = api(admin, "PUT", path, body).await;
        assert_eq!(status, 400, "{path} {body:?}: {answer}");
        assert!(
            answer["error"].as_str().unwrap().contains("no entries"),
            "{answer}"
        );
    }
    assert_eq!(count(admin).await, 6);

    // A replace that removes 6 of 6 entries names both counts.
    let hundred = entries("e", 100);
    let (status, answer) = api(admin, "PUT", "/v1/registry", &hundred).await;
    assert_eq!(status, 409, "{answer}");
    assert_eq!(pick(&answer, &["removed", "entries"]), json!([6, 6]));
    let message = answer["error"].as_str().unwrap();
    assert!(
        message.contains("remove 6 of the 6 entries") && message.contains("10%"),
        "{message}"
    );
    assert!(message.contains("allow_shrink=true"), "{message}");
    assert_eq!(count(admin).await, 6);
    let (status, answer) = api(admin, "PUT", "/v1/registry?allow_shrink=true", &hundred).await;
    assert_eq!((status, answer["entries"].clone()), (200, json!(100)));

    // Removing 10 % is allowed; 11 % is not, by batch or by replace.
    let (status, answer) = api(admin, "POST", "/v1/registry/batch", &deletes("e", 0..11)).await;
    assert_eq!(status, 409, "{answer}");
    assert_eq!(pick(&answer, &["removed", "entries"]), json!([11, 100]));
    // A delete of a name the same batch puts first counts as removing nothing that was there.
    let put_then_delete = format!(
        "{}\n{}",
        json!({"op": "put", "entry": serde_json::from_str::<Value>(&entry("fresh.cn")).unwrap()}),
        deletes("fresh", 0..0) + &json!({"op": "delete", "domain": "fresh.cn"}).to_string()
    );
    let (status, answer) = api(admin, "POST", "/v1/registry/batch", &put_then_delete).await;
    assert_eq!(
        (status, answer["applied"].clone()),
        (200, json!(2)),
        "{answer}"
    );
    let (status, answer) = api(admin, "POST", "/v1/registry/batch", &deletes("e", 0..10)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(count(admin).await, 90);
    let without_ten: String = (10..90)
        .map(|i| entry(&format!("e{i}.cn")) + "\n")
        .collect();
    let (status, answer) = api(admin, "PUT", "/v1/registry", &without_ten).await;
    assert_eq!(status, 409, "{answer}");
    assert_eq!(answer["removed"], 10);
    let without_nine: String = (10..91)
        .map(|i| entry(&format!("e{i}.cn")) + "\n")
        .collect();
    let (status, answer) = api(admin, "PUT", "/v1/registry", &without_nine).await;
    assert_eq!(
        (status, answer["entries"].clone()),
        (200, json!(81)),
        "{answer}"
    );

    // Every refusal left a line (the log is written by a thread of its own: wait for it).
    let lines = lines_with(
        &mut proc,
        "refused a write that would remove more entries than admin.max_shrink allows",
        3,
    );
    assert_eq!(lines[0]["level"], "WARN");
    lines_with(&mut proc, "refused a full replace with no entries", 3);
    // And an audit line for each of the ten writes, the three refused among them.
    let audit = lines_with(&mut proc, "registry write", 10);
    let shrink = audit.iter().filter(|l| l["result"] == "shrink").count();
    assert_eq!(shrink, 3, "{audit:?}");
}

/// Waits until `n` lines with `msg` have arrived, and returns them all.
fn lines_with(proc: &mut Proc, msg: &str, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let lines = proc.received(msg);
        if lines.len() >= n {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} {msg:?} lines",
            lines.len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_shrink_is_configurable() {
    let (_dir, _proc, admin) = start("max_shrink = \"50%\"");
    let (status, answer) = api(admin, "PUT", "/v1/registry", &entries("e", 3)).await;
    assert_eq!(status, 409, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("(50%)"),
        "{answer}"
    );
    let seed_half: String = common::SEED
        .lines()
        .take(3)
        .map(|l| format!("{l}\n"))
        .collect();
    let (status, answer) = api(admin, "PUT", "/v1/registry", &seed_half).await;
    assert_eq!(
        (status, answer["entries"].clone()),
        (200, json!(3)),
        "{answer}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_parameters_absent_deletes_allow_and_line_numbers() {
    let (_dir, _proc, admin) = start("");
    // A misspelt guard is not ignored: nothing is applied.
    let (status, answer) = api(
        admin,
        "PUT",
        "/v1/registry/entries/typo.cn?expected_revision=1",
        &entry("typo.cn"),
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    let message = answer["error"].as_str().unwrap();
    assert!(message.contains("expected_revision"), "{message}");
    assert!(
        message.contains("expect_revision"),
        "names what it takes: {message}"
    );
    assert_eq!(
        api(admin, "GET", "/v1/registry/entries/typo.cn", "")
            .await
            .0,
        404
    );
    for (method, path) in [
        ("GET", "/v1/registry?verbose=1"),
        ("GET", "/v1/registry/entries/filed.cn?x=1"),
        ("DELETE", "/v1/registry/entries/filed.cn?allow_shrink=true"),
        ("POST", "/v1/registry/batch?dry_run=true"),
        ("PUT", "/v1/registry?expect=0"),
        ("GET", "/v1/decision?host=a.cn&dst=127.0.0.1&listener=http"),
    ] {
        let (status, answer) = api(admin, method, path, "").await;
        assert_eq!(status, 400, "{method} {path}: {answer}");
        assert!(
            answer["error"]
                .as_str()
                .unwrap()
                .contains("unknown query parameter"),
            "{answer}"
        );
    }
    assert_eq!(api(admin, "GET", "/v1/registry", "").await.1["revision"], 0);
    assert_eq!(
        api(admin, "PUT", "/v1/registry?allow_shrink=maybe", "")
            .await
            .0,
        400
    );

    // A batch delete of an absent domain changes nothing and is not counted as applied.
    let batch = format!(
        "{}\n{}\n",
        json!({"op": "delete", "domain": "absent.cn"}),
        json!({"op": "put", "entry": serde_json::from_str::<Value>(&entry("new.cn")).unwrap()}),
    );
    let (status, answer) = api(admin, "POST", "/v1/registry/batch", &batch).await;
    assert_eq!(
        (status, answer),
        (200, json!({"revision": 1, "applied": 1, "absent": 1}))
    );
    assert_eq!(
        api(admin, "DELETE", "/v1/registry/entries/absent.cn", "")
            .await
            .0,
        404
    );

    // 405 says what the endpoint takes.
    for (method, path, allow) in [
        ("POST", "/v1/registry", "GET, PUT"),
        ("PATCH", "/v1/registry/entries/filed.cn", "GET, PUT, DELETE"),
        ("GET", "/v1/registry/batch", "POST"),
        ("POST", "/v1/decision", "GET"),
    ] {
        let (status, headers, body) = http1(
            admin,
            method,
            path,
            &[("host", "a"), ("authorization", "Bearer test-token")],
            b"",
        )
        .await;
        assert_eq!(status, 405, "{method} {path}: {body}");
        assert_eq!(headers["allow"], allow, "{method} {path}");
    }

    // A bad batch line is named once, by its line in the body.
    let bad = format!(
        "{}\n{{\"op\":\"put\",\"entry\":{{\"domain\":\"x.cn\",\"icp\":\"x\",\"status\":\"filed\",\"access_here\":true,\"extra\":1}}}}\n",
        json!({"op": "delete", "domain": "filed.cn"})
    );
    let (status, answer) = api(admin, "POST", "/v1/registry/batch", &bad).await;
    assert_eq!(status, 400);
    let message = answer["error"].as_str().unwrap();
    assert!(message.starts_with("line 2: "), "{message}");
    assert!(message.contains("extra"), "{message}");
    assert_eq!(message.matches("line").count(), 1, "{message}");
    let upsert = format!(
        "{}\n{{\"op\":\"upsert\",\"domain\":\"b4.cn\"}}\n",
        json!({"op": "delete", "domain": "filed.cn"})
    );
    let (_, answer) = api(admin, "POST", "/v1/registry/batch", &upsert).await;
    assert_eq!(
        answer["error"],
        "line 2: unknown variant `upsert`, expected `put` or `delete` (column 14)"
    );
    let (_, answer) = api(admin, "PUT", "/v1/registry", "{\"domain\": 1}\n").await;
    let message = answer["error"].as_str().unwrap();
    assert!(
        message.starts_with("line 1: ") && message.matches("line").count() == 1,
        "{message}"
    );
}

const TOKENS: &str =
    "# name role token\nfiling write filing-secret-1\nmonitor read monitor-secret-1\n";

/// The next line of target `audit`, waiting for it.
fn audit_line(proc: &mut Proc, msg: &str) -> Value {
    loop {
        let line = proc.wait_for(msg);
        if line["target"] == "audit" {
            return line;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_write_and_refusal_leaves_an_audit_line_and_a_count() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("admin.tokens"), TOKENS).unwrap();
    let path = write_config(
        dir.path(),
        "127.0.0.1:9".parse().unwrap(),
        "tokens_file = \"admin.tokens\"",
    );
    let mut proc = Proc::start(&path);
    let admin = proc.admin_addr();
    proc.wait_for("ready");

    let (status, _) = call(
        admin,
        "filing-secret-1",
        "PUT",
        "/v1/registry/entries/audited.cn",
        &entry("audited.cn"),
    )
    .await;
    assert_eq!(status, 200);
    let line = audit_line(&mut proc, "registry write");
    assert_eq!(line["level"], "INFO");
    assert_eq!(line["caller"], "filing");
    assert_eq!(line["role"], "write");
    assert_eq!(line["op"], "put");
    assert_eq!(line["entries"], 1);
    assert_eq!(
        pick(&line, &["revision_before", "revision_after"]),
        json!([0, 1])
    );
    assert_eq!(pick(&line, &["result", "status"]), json!(["ok", 200]));
    assert!(
        line["peer"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{line}"
    );

    // The old single token still writes, as `token_file`.
    let batch = format!(
        "{}\n{}\n",
        json!({"op": "put", "entry": serde_json::from_str::<Value>(&entry("b1.cn")).unwrap()}),
        json!({"op": "put", "entry": serde_json::from_str::<Value>(&entry("b2.cn")).unwrap()}),
    );
    assert_eq!(
        api(admin, "POST", "/v1/registry/batch", &batch).await.0,
        200
    );
    let line = audit_line(&mut proc, "registry write");
    assert_eq!(
        pick(&line, &["caller", "op", "entries"]),
        json!(["token_file", "batch", 2])
    );
    assert_eq!(
        pick(&line, &["revision_before", "revision_after"]),
        json!([1, 2])
    );

    // A refused write is a line too, with what refused it.
    let (status, _) = api(admin, "PUT", "/v1/registry", &entries("x", 3)).await;
    assert_eq!(status, 409);
    let line = audit_line(&mut proc, "registry write");
    assert_eq!(
        pick(&line, &["op", "result", "entries"]),
        json!(["replace", "shrink", 3])
    );
    assert_eq!(
        pick(&line, &["revision_before", "revision_after"]),
        json!([2, 2])
    );
    assert!(
        line["error"]
            .as_str()
            .unwrap()
            .contains("remove 9 of the 9"),
        "{line}"
    );

    // The read token reads and decides, and may not write.
    assert_eq!(
        call(admin, "monitor-secret-1", "GET", "/v1/registry", "")
            .await
            .0,
        200
    );
    assert_eq!(
        call(
            admin,
            "monitor-secret-1",
            "GET",
            "/v1/decision?host=audited.cn&dst=127.0.0.1",
            ""
        )
        .await
        .1["decision"],
        "allow"
    );
    let (status, answer) = call(
        admin,
        "monitor-secret-1",
        "DELETE",
        "/v1/registry/entries/audited.cn",
        "",
    )
    .await;
    assert_eq!(status, 403, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("read"),
        "{answer}"
    );
    let line = audit_line(&mut proc, "authentication refused");
    assert_eq!(line["level"], "WARN");
    assert_eq!(
        pick(&line, &["caller", "op", "result"]),
        json!(["monitor", "delete", "forbidden"])
    );

    // No token, and a wrong one.
    let (status, _, _) = http1(
        admin,
        "PUT",
        "/v1/registry/entries/a.cn",
        &[("host", "a")],
        b"",
    )
    .await;
    assert_eq!(status, 401);
    let line = audit_line(&mut proc, "authentication refused");
    assert_eq!(
        pick(&line, &["caller", "result", "status"]),
        json!(["-", "unauthorized", 401])
    );
    assert!(
        line["peer"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{line}"
    );
    assert_eq!(call(admin, "guess", "GET", "/v1/registry", "").await.0, 403);
    let line = audit_line(&mut proc, "authentication refused");
    assert_eq!(
        (
            line["op"].clone(),
            line["result"].clone(),
            line["error"].clone()
        ),
        (
            json!("status"),
            json!("forbidden"),
            json!("wrong bearer token")
        )
    );

    let metrics = String::from_utf8(
        http1(admin, "GET", "/metrics", &[("host", "a")], b"")
            .await
            .2
            .into_bytes(),
    )
    .unwrap();
    for line in [
        r#"icp_gate_admin_requests_total{op="put",result="ok"} 1"#,
        r#"icp_gate_admin_requests_total{op="batch",result="ok"} 1"#,
        r#"icp_gate_admin_requests_total{op="replace",result="shrink"} 1"#,
        r#"icp_gate_admin_requests_total{op="status",result="ok"} 1"#,
        r#"icp_gate_admin_requests_total{op="decision",result="ok"} 1"#,
        r#"icp_gate_admin_requests_total{op="delete",result="forbidden"} 1"#,
        r#"icp_gate_admin_requests_total{op="put",result="unauthorized"} 1"#,
        r#"icp_gate_admin_requests_total{op="status",result="forbidden"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_rotate_on_sighup_with_old_and_new_overlapping() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("admin.tokens");
    std::fs::write(&tokens, "filing write old-secret\n").unwrap();
    let path = write_config(
        dir.path(),
        "127.0.0.1:9".parse().unwrap(),
        "tokens_file = \"admin.tokens\"",
    );
    let mut proc = Proc::start(&path);
    let admin = proc.admin_addr();
    proc.wait_for("ready");
    let works =
        |token: &'static str| async move { call(admin, token, "GET", "/v1/registry", "").await.0 };
    assert_eq!(works("old-secret").await, 200);
    assert_eq!(works("new-secret").await, 403);

    // Add the new token: both work while callers move over.
    std::fs::write(
        &tokens,
        "filing write old-secret\nfiling-next write new-secret\n",
    )
    .unwrap();
    proc.signal(libc::SIGHUP);
    proc.wait_for("config reloaded");
    assert_eq!(
        (works("old-secret").await, works("new-secret").await),
        (200, 200)
    );

    // A broken file is refused and the tokens in force stay.
    std::fs::write(&tokens, "filing-next writer new-secret\n").unwrap();
    proc.signal(libc::SIGHUP);
    let line = proc.wait_for("reload rejected; the old config keeps serving");
    assert!(
        line["error"].as_str().unwrap().contains("admin.tokens:1"),
        "{line}"
    );
    assert_eq!(
        (works("old-secret").await, works("new-secret").await),
        (200, 200)
    );

    // Retire the old one.
    std::fs::write(&tokens, "filing-next write new-secret\n").unwrap();
    proc.signal(libc::SIGHUP);
    proc.wait_for("config reloaded");
    assert_eq!(
        (works("old-secret").await, works("new-secret").await),
        (403, 200)
    );

    // admin.token_file is read again too.
    assert_eq!(works(TOKEN).await, 200);
    std::fs::write(dir.path().join("admin.token"), "rotated-token\n").unwrap();
    proc.signal(libc::SIGHUP);
    proc.wait_for("config reloaded");
    assert_eq!(
        (works(TOKEN).await, works("rotated-token").await),
        (403, 200)
    );
}

/// A GET with the test token: status, headers and body text.
async fn get(admin: SocketAddr, token: &str, path: &str) -> (u16, http::HeaderMap, String) {
    let auth = format!("Bearer {token}");
    http1(
        admin,
        "GET",
        path,
        &[("host", "admin"), ("authorization", &auth)],
        b"",
    )
    .await
}

/// The domains of an NDJSON export, sorted.
fn exported_lines(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    lines.sort_unstable();
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_page_in_domain_order_and_export_at_one_revision() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("admin.tokens"), TOKENS).unwrap();
    let path = write_config(
        dir.path(),
        "127.0.0.1:9".parse().unwrap(),
        "tokens_file = \"admin.tokens\"",
    );
    let mut proc = Proc::start(&path);
    let admin = proc.admin_addr();
    proc.wait_for("ready");
    let batch: String = (0..2500)
        .map(|i| {
            let e: Value = serde_json::from_str(&entry(&format!("p{i}.cn"))).unwrap();
            json!({"op": "put", "entry": e}).to_string() + "\n"
        })
        .collect();
    assert_eq!(
        api(admin, "POST", "/v1/registry/batch", &batch).await.0,
        200
    );

    // Pages with the read token, following `next`.
    let mut seen: Vec<String> = Vec::new();
    let mut pages = 0;
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            None => "/v1/registry/entries".to_string(),
            Some(after) => format!("/v1/registry/entries?limit=1000&after={after}"),
        };
        let (status, _, text) = get(admin, "monitor-secret-1", &path).await;
        assert_eq!(status, 200, "{text}");
        let page: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(page["revision"], 1);
        pages += 1;
        let entries = page["entries"].as_array().unwrap();
        assert!(entries.len() <= 1000);
        seen.extend(
            entries
                .iter()
                .map(|e| e["domain"].as_str().unwrap().to_string()),
        );
        match page["next"].as_str() {
            Some(next) => {
                assert_eq!(next, seen.last().unwrap());
                cursor = Some(next.to_string());
            }
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 2506);
    let mut sorted = seen.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(seen, sorted, "domain order, each once");
    let (_, _, text) = get(admin, TOKEN, "/v1/registry/entries?after=p999.cn&limit=1").await;
    let page: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(page["entries"][0]["domain"], "x.gov.cn");
    assert_eq!(page["entries"][0]["status"], "filed");
    assert_eq!(page["next"], "x.gov.cn");
    let (_, _, text) = get(admin, TOKEN, "/v1/registry/entries?after=x.gov.cn&limit=2").await;
    let page: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(page["entries"][0]["domain"], "xn--fsqu00a.xn--fiqs8s");
    assert_eq!(page["entries"].as_array().unwrap().len(), 1);
    assert_eq!(page["next"], Value::Null);
    for bad in ["limit=0", "limit=10001", "limit=ten", "cursor=a"] {
        let (status, _, text) = get(admin, TOKEN, &format!("/v1/registry/entries?{bad}")).await;
        assert_eq!(status, 400, "{bad}: {text}");
    }

    // The export: every entry once, in the seed format, with its revision and count.
    let (status, headers, text) = get(admin, "monitor-secret-1", "/v1/registry/export").await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "application/x-ndjson");
    assert_eq!(headers["icp-gate-revision"], "1");
    assert_eq!(headers["icp-gate-entries"], "2506");
    let mut domains: Vec<String> = text
        .lines()
        .map(|l| {
            let e: Value = serde_json::from_str(l).unwrap();
            assert_eq!(e.as_object().unwrap().len(), 4, "{l}");
            e["domain"].as_str().unwrap().to_string()
        })
        .collect();
    domains.sort_unstable();
    assert_eq!(domains, sorted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_and_restore_round_trip_at_a_million_entries() {
    let (_dir, _proc, admin) = start("");
    let started = Instant::now();
    let million: String = (0..1_000_000)
        .map(|i| {
            // Fields in the order the export writes them, to compare lines as text.
            format!(
                "{{\"domain\":\"d{i:07}.cn\",\"icp\":\"京ICP备{i:08}号-{}\",\"status\":\"{}\",\"access_here\":{}}}\n",
                i % 7 + 1,
                if i % 13 == 0 { "revoked" } else { "filed" },
                i % 5 != 0,
            )
        })
        .collect();
    let (status, answer) = api(admin, "PUT", "/v1/registry?allow_shrink=true", &million).await;
    assert_eq!(
        (status, answer["entries"].clone()),
        (200, json!(1_000_000)),
        "{answer}"
    );
    let loaded = started.elapsed();

    // Back up.
    let (status, headers, backup) = get(admin, TOKEN, "/v1/registry/export").await;
    assert_eq!(status, 200);
    assert_eq!(headers["icp-gate-revision"], "1");
    assert_eq!(headers["icp-gate-entries"], "1000000");
    let backup_lines = exported_lines(&backup);
    assert_eq!(backup_lines.len(), 1_000_000);
    assert!(
        backup_lines == exported_lines(&million),
        "the export is the registry"
    );
    let exported = started.elapsed();

    // Lose most of it (a bad replace, let through), then restore the backup as it is.
    let few: String = backup.lines().take(10).map(|l| format!("{l}\n")).collect();
    assert_eq!(
        api(admin, "PUT", "/v1/registry?allow_shrink=true", &few)
            .await
            .0,
        200
    );
    assert_eq!(api(admin, "GET", "/v1/registry", "").await.1["entries"], 10);
    let (status, answer) = api(admin, "PUT", "/v1/registry", &backup).await;
    assert_eq!(
        (status, answer.clone()),
        (200, json!({"revision": 3, "entries": 1_000_000}))
    );
    let (_, headers, again) = get(admin, TOKEN, "/v1/registry/export").await;
    assert_eq!(headers["icp-gate-revision"], "3");
    assert!(
        exported_lines(&again) == backup_lines,
        "restored entry for entry"
    );
    let (_, decision) = api(
        admin,
        "GET",
        "/v1/decision?host=www.d0000001.cn&dst=127.0.0.1",
        "",
    )
    .await;
    assert_eq!(decision["decision"], "allow");
    let (_, decision) = api(
        admin,
        "GET",
        "/v1/decision?host=d0000013.cn&dst=127.0.0.1",
        "",
    )
    .await;
    assert_eq!(decision["reason"], "revoked");
    eprintln!(
        "1 M entries: loaded in {loaded:?}, exported in {:?}, round trip in {:?}",
        exported - loaded,
        started.elapsed()
    );
}

/// Sends one `GET /` per host over `connections` pipelined keep-alive connections and waits for
/// every answer; returns how many were 403.
async fn flood(addr: SocketAddr, hosts: Vec<String>, connections: usize) -> usize {
    use tokio::io::AsyncReadExt;
    let per = hosts.len().div_ceil(connections);
    let mut tasks = Vec::new();
    for part in hosts.chunks(per) {
        let part = part.to_vec();
        tasks.push(tokio::spawn(async move {
            let stream = TcpStream::connect(addr).await.unwrap();
            let (mut reader, mut writer) = stream.into_split();
            let expected = part.len();
            let sending = tokio::spawn(async move {
                for chunk in part.chunks(200) {
                    let mut out = String::new();
                    for h in chunk {
                        out.push_str(&format!("GET / HTTP/1.1\r\nhost: {h}\r\n\r\n"));
                    }
                    writer.write_all(out.as_bytes()).await.unwrap();
                }
                writer
            });
            let (mut answers, mut forbidden) = (0, 0);
            let mut pending: Vec<u8> = Vec::new();
            let mut buf = vec![0u8; 64 * 1024];
            while answers < expected {
                let n = tokio::time::timeout(Duration::from_secs(60), reader.read(&mut buf))
                    .await
                    .expect("answers stalled")
                    .unwrap();
                assert!(n > 0, "closed after {answers} answers");
                pending.extend_from_slice(&buf[..n]);
                // Count every complete status line; keep what may be the start of the next.
                let mut done = 0;
                let mut partial = None;
                while let Some(i) = pending[done..].windows(9).position(|w| w == b"HTTP/1.1 ") {
                    let at = done + i;
                    if at + 12 > pending.len() {
                        partial = Some(at);
                        break;
                    }
                    answers += 1;
                    forbidden += usize::from(&pending[at + 9..at + 12] == b"403");
                    done = at + 12;
                }
                let keep_from =
                    partial.unwrap_or_else(|| done.max(pending.len().saturating_sub(8)));
                pending.drain(..keep_from);
            }
            drop(sending.await.unwrap());
            forbidden
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn most_blocked_hosts_in_bounded_memory_under_a_flood_of_random_names() {
    let (_dir, mut proc, admin) = start("");
    let http: SocketAddr = proc.logged("listening")["addr"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let blocked = |q: &'static str| async move {
        let (status, _, text) = get(admin, TOKEN, &format!("/v1/blocked{q}")).await;
        assert_eq!(status, 200, "{text}");
        serde_json::from_str::<Value>(&text).unwrap()
    };
    assert_eq!(blocked("").await["hosts"], json!([]));

    // Three heavy hitters among 20 000 random unfiled names, twice over.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let round = |state: &mut u64| {
        let mut hosts = Vec::new();
        for i in 0..20_000 {
            *state ^= *state << 13;
            *state ^= *state >> 7;
            *state ^= *state << 17;
            hosts.push(format!("r{:x}.cn", *state));
            if i % 20 == 0 {
                hosts.push("heavy.cn".to_string());
            }
            if i % 40 == 0 {
                hosts.push("gone.cn".to_string());
            }
            if i % 80 == 0 {
                hosts.push("elsewhere.cn".to_string());
            }
        }
        hosts
    };
    let rss_before = rss_kib(proc.pid());
    let sent = round(&mut state);
    let total = sent.len();
    // The sketch is drained every 20 ms: wait until every block is counted (or dropped).
    let settled = |expected: u64| async move {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let a = blocked("?top=3").await;
            let seen = a["blocks"].as_u64().unwrap() + a["dropped"].as_u64().unwrap();
            if seen >= expected {
                return a;
            }
            assert!(
                Instant::now() < deadline,
                "{seen} of {expected} blocks counted"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    assert_eq!(flood(http, sent, 4).await, total, "every name is blocked");
    let first = settled(total as u64).await;
    let sent = round(&mut state);
    assert_eq!(flood(http, sent, 4).await, total);
    let answer = settled(2 * total as u64).await;
    let rss_after = rss_kib(proc.pid());

    // Bounded: 40 000 distinct names, a few thousand keys held.
    let capacity = answer["capacity"].as_u64().unwrap();
    for a in [&first, &answer] {
        let tracked = a["tracked"].as_u64().unwrap();
        assert!(tracked <= capacity, "{tracked} > {capacity}");
        assert!(
            tracked < 2 * 1024,
            "one window holds under 2 × 1 024 keys: {tracked}"
        );
    }
    let dropped = answer["dropped"].as_u64().unwrap();
    let error = answer["error"].as_u64().unwrap();
    assert_eq!(
        answer["blocks"].as_u64().unwrap() + dropped,
        2 * total as u64
    );
    // The top three, in order, with counts within the sketch's error.
    let hosts = answer["hosts"].as_array().unwrap();
    assert_eq!(hosts.len(), 3, "{answer}");
    for (h, (name, sent, reason)) in hosts.iter().zip([
        ("heavy.cn", 2000, "unfiled"),
        ("gone.cn", 1000, "revoked"),
        ("elsewhere.cn", 500, "not_accessed"),
    ]) {
        assert_eq!(h["host"], name, "{answer}");
        let count = h["count"].as_u64().unwrap();
        assert!(
            count + dropped >= sent && count <= sent + error,
            "{name}: {count} for {sent} sent (error {error}, dropped {dropped})"
        );
        assert_eq!(
            h["reasons"].as_object().unwrap().keys().collect::<Vec<_>>(),
            [reason],
            "{h}"
        );
        assert_eq!(h["dst"]["127.0.0.0/24"], h["count"], "{h}");
        assert_eq!(h["listeners"]["http"], h["count"], "{h}");
    }
    eprintln!(
        "blocked sketch: {} blocks, {} keys held, error {error}, dropped {dropped}, RSS {rss_before} → {rss_after} KiB",
        answer["blocks"], answer["tracked"]
    );
    assert!(
        rss_after < rss_before + 64 * 1024,
        "RSS {rss_before} → {rss_after} KiB"
    );

    // Filters, and what the call refuses.
    assert_eq!(blocked("?top=3&listener=other").await["hosts"], json!([]));
    assert_eq!(blocked("?top=3&dst=10.0.0.0/8").await["hosts"], json!([]));
    assert_eq!(
        blocked("?top=1&dst=127.0.0.1").await["hosts"][0]["host"],
        "heavy.cn"
    );
    assert_eq!(
        blocked("?top=1&listener=http").await["hosts"][0]["host"],
        "heavy.cn"
    );
    for bad in ["?top=0", "?top=1001", "?dst=nowhere", "?host=heavy.cn"] {
        let (status, _, text) = get(admin, TOKEN, &format!("/v1/blocked{bad}")).await;
        assert_eq!(status, 400, "{bad}: {text}");
    }
}

#[test]
fn check_reads_the_tokens_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("admin.tokens"), TOKENS).unwrap();
    let path = write_config(
        dir.path(),
        "127.0.0.1:9".parse().unwrap(),
        "tokens_file = \"admin.tokens\"\nmax_shrink = 0.2",
    );
    let check = || {
        std::process::Command::new(common::process::BIN)
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap()
    };
    assert!(check().status.success());
    std::fs::write(
        dir.path().join("admin.tokens"),
        "filing write a\nfiling read b\n",
    )
    .unwrap();
    let out = check();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("admin.tokens_file")
            && stderr.contains("admin.tokens:2: name filing is used twice"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_line_names_the_client_certificate() {
    use common::pki::Pki;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

    let filing_ca = Pki::new();
    let server_ca = Pki::new();
    let (_, _, cert, key) = server_ca.leaf(&["admin.icp-gate.test"]);
    let dir = tempfile::tempdir().unwrap();
    for (name, pem) in [
        ("admin.crt", cert),
        ("admin.key", key),
        ("filing-ca.pem", filing_ca.ca.pem()),
    ] {
        std::fs::write(dir.path().join(name), pem).unwrap();
    }
    let path = write_config(
        dir.path(),
        "127.0.0.1:9".parse().unwrap(),
        "tls_cert = \"admin.crt\"\ntls_key = \"admin.key\"\nclient_ca = \"filing-ca.pem\"",
    );
    let mut proc = Proc::start(&path);
    let admin = proc.admin_addr();
    proc.wait_for("ready");

    // The filing system's certificate, with a subject of its own.
    let mut params = rcgen::CertificateParams::new(vec!["filing.example".to_string()]).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "Filing Bureau");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "filing-system");
    let client_key = rcgen::KeyPair::generate().unwrap();
    let client_cert = params.signed_by(&client_key, &filing_ca.ca).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(server_ca.ca.der().clone()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(
        vec![CertificateDer::from(client_cert.der().to_vec())],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(client_key.serialize_der())),
    )
    .unwrap();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg));
    let tcp = TcpStream::connect(admin).await.unwrap();
    let tls = connector
        .connect(ServerName::try_from("admin.icp-gate.test").unwrap(), tcp)
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::put("/v1/registry/entries/bureau.cn")
        .header("host", "admin")
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(http_body_util::Full::new(bytes::Bytes::from(entry(
            "bureau.cn",
        ))))
        .unwrap();
    assert_eq!(sender.send_request(req).await.unwrap().status(), 200);
    let line = audit_line(&mut proc, "registry write");
    assert_eq!(line["caller"], "token_file");
    assert_eq!(
        line["subject"], "O=Filing Bureau,CN=filing-system",
        "{line}"
    );
    assert_eq!(line["result"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_mode_counts_would_be_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "127.0.0.1:9".parse().unwrap(), "");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace("[policy]", "[policy]\nmode = \"report\""),
    )
    .unwrap();
    let mut proc = Proc::start(&path);
    let admin = proc.admin_addr();
    let http: SocketAddr = proc.logged("listening")["addr"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    proc.wait_for("ready");
    for _ in 0..3 {
        // Let through (to an origin that is not there), but counted.
        http1(http, "GET", "/", &[("host", "would.cn")], b"").await;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, _, text) = get(admin, TOKEN, "/v1/blocked").await;
        let answer: Value = serde_json::from_str(&text).unwrap();
        if answer["hosts"][0]["count"] == 3 {
            assert_eq!(answer["hosts"][0]["host"], "would.cn");
            assert_eq!(answer["hosts"][0]["reasons"]["unfiled"], 3);
            break;
        }
        assert!(Instant::now() < deadline, "{answer}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
