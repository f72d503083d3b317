//! Shared harness for the integration tests: a real icp-gate server started in-process on
//! loopback ports picked by the kernel, real origins, and real clients.
#![allow(dead_code)]

pub mod nats;
pub mod pki;
pub mod process;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use icp_gate::config::Config;
use icp_gate::{Listeners, ServerHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The test registry: one entry per registry outcome, plus a gov.cn sub-domain override.
pub const SEED: &str = r#"{"domain":"filed.cn","icp":"京ICP备00000001号-1","status":"filed","access_here":true}
{"domain":"elsewhere.cn","icp":"沪ICP备00000002号-1","status":"filed","access_here":false}
{"domain":"gone.cn","icp":"粤ICP备00000003号-1","status":"revoked","access_here":true}
{"domain":"x.gov.cn","icp":"京ICP备00000004号-1","status":"filed","access_here":true}
{"domain":"edu.x.gov.cn","icp":"京ICP备00000005号-1","status":"revoked","access_here":true}
{"domain":"例子.中国","icp":"京ICP备00000006号-1","status":"filed","access_here":true}
"#;

/// What an origin received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// A real HTTP origin on loopback that records every request and answers `origin saw <host><path>`.
/// Paths with special behaviour: `/slow` answers after 3 s; `/echo` answers with the request body;
/// `/chunked` answers with a chunked body; `/ws` accepts an `Upgrade` and then echoes bytes.
pub struct Origin {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl Origin {
    pub async fn start() -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let log = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let log = log.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| origin_answer(req, log.clone()));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Origin { addr, seen }
    }

    pub fn last(&self) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("origin saw a request")
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

async fn origin_answer(
    mut req: Request<Incoming>,
    log: Arc<Mutex<Vec<Seen>>>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let upgrade = req.uri().path() == "/ws";
    let on_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let body = if upgrade {
        Bytes::new()
    } else {
        body.collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default()
    };
    let host = parts
        .headers
        .get("host")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    log.lock().unwrap().push(Seen {
        method: parts.method.clone(),
        uri: parts.uri.clone(),
        version: parts.version,
        headers: parts.headers.clone(),
        body: body.clone(),
    });
    match parts.uri.path() {
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(3)).await;
            Ok(Response::new(Full::new(Bytes::from("slow"))))
        }
        "/echo" => Ok(Response::new(Full::new(body))),
        "/chunked" => Ok(Response::builder()
            .header("transfer-encoding", "chunked")
            .body(Full::new(Bytes::from("a chunked answer")))
            .unwrap()),
        "/ws" => {
            if let Some(on) = on_upgrade {
                tokio::spawn(async move {
                    if let Ok(upgraded) = on.await {
                        let mut io = TokioIo::new(upgraded);
                        let mut buf = [0u8; 1024];
                        loop {
                            match io.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => {
                                    if io.write_all(&buf[..n]).await.is_err() {
                                        return;
                                    }
                                }
                            }
                        }
                    }
                });
            }
            Ok(Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("connection", "upgrade")
                .header("upgrade", "echo")
                .body(Full::new(Bytes::new()))
                .unwrap())
        }
        path => Ok(Response::builder()
            .header("x-origin", "yes")
            .header("connection", "x-origin-private")
            .header("x-origin-private", "hop")
            .body(Full::new(Bytes::from(format!("origin saw {host}{path}"))))
            .unwrap()),
    }
}

/// A raw origin on loopback: answers the first request on each connection with `answer`, byte
/// for byte, then sends nothing more and holds the connection until the other side closes it.
pub async fn raw_origin(answer: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(answer).await;
                while let Ok(1..) = s.read(&mut buf).await {}
            });
        }
    });
    addr
}

/// A running icp-gate with its temporary folder.
pub struct Gate {
    pub server: ServerHandle,
    pub http: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl Gate {
    /// Starts icp-gate with `config` (TOML; `{dir}` is replaced by the temporary folder) and the
    /// test registry as seed.
    pub async fn start(config: &str) -> Gate {
        Gate::start_with_seed(config, SEED).await
    }

    /// Like [`Gate::start`] with another seed registry.
    pub async fn start_with_seed(config: &str, seed: &str) -> Gate {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("seed.ndjson"), seed).unwrap();
        std::fs::write(dir.path().join("admin.token"), "test-token\n").unwrap();
        let path = dir.path().join("icp-gate.toml");
        std::fs::write(
            &path,
            config.replace("{dir}", &dir.path().display().to_string()),
        )
        .unwrap();
        let config = Config::load(&path).unwrap();
        let listeners = Listeners::bind(&config).unwrap();
        let server = ServerHandle::start(config, listeners).await.unwrap();
        let http = server
            .listener_addr("http")
            .await
            .unwrap_or(([0, 0, 0, 0], 0).into());
        let admin = server.admin_addr().unwrap();
        Gate {
            server,
            http,
            admin,
            dir,
        }
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("icp-gate.toml")
    }

    pub async fn metrics(&self) -> String {
        let (status, _, body) =
            http1(self.admin, "GET", "/metrics", &[("host", "admin")], b"").await;
        assert_eq!(status, 200);
        body
    }
}

/// The standard config: one http listener on 127.0.0.1, a mainland route to `origin`.
pub fn config(origin: SocketAddr, extra: &str) -> String {
    format!(
        r#"
[registry]
state_dir = "{{dir}}/state"
seed = "seed.ndjson"

[policy]
exempt = ["console.example"]

[[listener]]
name = "http"
bind = "127.0.0.1:0"
kind = "http"

[[route]]
dst = "127.0.0.1/32"
mainland = true
http_origin = "{origin}"

[admin]
bind = "127.0.0.1:0"
token_file = "admin.token"
{extra}
"#
    )
}

/// One HTTP/1.1 request over a fresh connection; returns status, headers and body text.
pub async fn http1(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, HeaderMap, String) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = Request::builder().method(method).uri(path);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = sender
        .send_request(req.body(Full::new(Bytes::copy_from_slice(body))).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

/// [`http1`] that answers `None` when the connection fails (a server being killed).
pub async fn try_http1(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Option<(u16, String)> {
    let stream = TcpStream::connect(addr).await.ok()?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(conn);
    let mut req = Request::builder().method(method).uri(path);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = sender
        .send_request(req.body(Full::new(Bytes::copy_from_slice(body))).ok()?)
        .await
        .ok()?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Writes raw bytes on a fresh connection and reads until the server closes or `wait` passes.
pub async fn raw(addr: SocketAddr, request: &[u8], wait: Duration) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    read_for(&mut stream, wait).await
}

/// Reads what arrives on `stream` until it closes or `wait` passes.
pub async fn read_for(stream: &mut TcpStream, wait: Duration) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, read_to_close(stream, &mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads until the server closes the connection; panics if it is still open after `wait`.
pub async fn read_until_closed(stream: &mut TcpStream, wait: Duration) -> String {
    let mut out = Vec::new();
    tokio::time::timeout(wait, read_to_close(stream, &mut out))
        .await
        .expect("connection still open");
    String::from_utf8_lossy(&out).into_owned()
}

/// Appends what `stream` sends until it closes (or fails).
async fn read_to_close(stream: &mut TcpStream, out: &mut Vec<u8>) {
    let mut buf = [0u8; 65536];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// The status codes of every HTTP/1.1 response in `text`, in order.
pub fn statuses(text: &str) -> Vec<u16> {
    text.match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| text.get(i + 9..i + 12)?.parse().ok())
        .collect()
}

/// Whether the server closed the connection (EOF or reset) within `wait`.
pub async fn closed_within(stream: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 1024];
    matches!(
        tokio::time::timeout(wait, async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await,
        Ok(())
    )
}

pub fn testdata(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(path)
}

/// A `GET /v1/registry` answer without its `digest`, after checking that the digest is 32
/// lowercase hex digits (the digest's value is checked where it matters: equal registries).
pub fn without_digest(mut v: serde_json::Value) -> serde_json::Value {
    let digest = v
        .as_object_mut()
        .and_then(|o| o.remove("digest"))
        .unwrap_or_else(|| panic!("no digest in {v}"));
    let digest = digest.as_str().unwrap_or_default();
    assert!(
        digest.len() == 32
            && digest
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "digest {digest:?}"
    );
    v
}

/// `method path` on the admin API at `admin` with the tests' write token (`test-token`); the
/// answer as JSON, or as a JSON string when it is not JSON.
pub async fn api(
    admin: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, serde_json::Value) {
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
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    )
}

/// A filed entry for `domain`, its access here, as the admin API takes it.
pub fn entry(domain: &str) -> String {
    serde_json::json!({"domain": domain, "icp": "京ICP备99999999号-1", "status": "filed", "access_here": true})
        .to_string()
}
