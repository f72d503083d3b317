//! A built-in origin for demonstrations (`[demo_origin]`): it answers every request with a short
//! page naming the host and client it saw, so the README's first command shows a forwarded
//! request with nothing else running. Not for production.

use std::convert::Infallible;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST};
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub async fn serve(listener: TcpListener, stop: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "demo origin listening");
    }
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r { Ok(a) => a, Err(_) => continue },
            _ = stop.cancelled() => return,
        };
        tokio::spawn(async move {
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service_fn(answer))
                .await;
        });
    }
}

async fn answer(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_string()
    };
    let body = format!(
        "Hello from the icp-gate demo origin.\nhost: {}\npath: {}\nx-forwarded-for: {}\n",
        header(HOST.as_str()),
        req.uri().path(),
        header("x-forwarded-for"),
    );
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    Ok(resp)
}
