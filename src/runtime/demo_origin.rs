//! A built-in origin for demonstrations (`[demo_origin]`), over HTTP and HTTPS: it answers every
//! request with a short page naming the host and client it saw, so the README's first command shows a forwarded
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
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Serves plain HTTP, or HTTPS when `tls` is given, until `stop`.
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    stop: CancellationToken,
) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, tls = tls.is_some(), "demo origin listening");
    }
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r { Ok(a) => a, Err(_) => continue },
            _ = stop.cancelled() => return,
        };
        let tls = tls.clone();
        tokio::spawn(async move {
            let http = auto::Builder::new(TokioExecutor::new());
            let _ = match tls {
                None => {
                    http.serve_connection(TokioIo::new(stream), service_fn(answer))
                        .await
                }
                Some(tls) => match tls.accept(stream).await {
                    Ok(stream) => {
                        http.serve_connection(TokioIo::new(stream), service_fn(answer))
                            .await
                    }
                    Err(_) => return,
                },
            };
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
    // HTTP/2 carries the host as :authority, not as a header.
    let host = req
        .uri()
        .authority()
        .map_or_else(|| header(HOST.as_str()), |a| a.to_string());
    let body = format!(
        "Hello from the icp-gate demo origin.\nhost: {host}\npath: {}\nx-forwarded-for: {}\n",
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
