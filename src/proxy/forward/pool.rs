//! Keep-alive HTTP/1.1 connections to origins, pooled per origin address.
//!
//! A connection goes back to its pool the moment the origin's response body ends, straight from
//! the body that streamed it. (hyper-util's pool instead spawns a task per request to notice
//! when a connection is idle again; on the forwarded path that task, its wake-ups and the pool's
//! SipHash keying were a measurable share of the proxy's CPU.) Idle connections are closed after
//! between `idle_timeout` and 1.25 × `idle_timeout` by a sweeper that counts ticks, so checking a
//! connection in or out never reads the clock.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::Authority;
use http::{Request, Response, StatusCode};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tracing::debug;

use super::origin::{ForwardError, client_body_failed, connect};
use crate::observe::metrics::UpstreamError;
use crate::proxy::worker;

type Sender = SendRequest<Incoming>;

/// A connection a [`Pool`] can park.
pub(super) trait Parked: Send + 'static {
    /// Still open, and nothing arrived on it while it was idle.
    fn usable(&mut self) -> bool;
}

impl Parked for Sender {
    fn usable(&mut self) -> bool {
        // hyper's connection task reads the socket while idle and closes on EOF or data.
        !self.is_closed()
    }
}

/// Idle connections per origin address. Cheap to clone (clones share the pool).
pub(super) struct Pool<C> {
    inner: Arc<PoolInner<C>>,
}

impl<C> Clone for Pool<C> {
    fn clone(&self) -> Self {
        Pool {
            inner: self.inner.clone(),
        }
    }
}

/// Keyed by the origin as configured (`host:port`): hashing and comparing its bytes is several
/// times cheaper than `Authority`'s case-insensitive `Hash` and `Eq`, and each checkout and checkin
/// pays it. Two spellings of one origin in the config only get two pools.
type IdleMap<C> = HashMap<Box<str>, Vec<Idle<C>>, foldhash::fast::RandomState>;

struct PoolInner<C> {
    /// One map per worker thread ([`crate::runtime::workers`]): a connection is only reused on the thread
    /// whose runtime drives its socket, so a reused connection never wakes another thread.
    idle: Box<[Mutex<IdleMap<C>>]>,
    idle_timeout: Duration,
    /// Sweeper ticks so far; an idle connection remembers the tick it was parked at.
    tick: AtomicU64,
    sweeper_started: AtomicBool,
}

struct Idle<C> {
    conn: C,
    parked_at: u64,
}

/// An idle connection is closed at the first sweeper tick (one every `idle_timeout / 4`) after
/// this many full ticks have passed since it was parked: after (1, 1.25] × `idle_timeout`.
const IDLE_TICKS: u64 = 4;

impl<C: Parked> Pool<C> {
    pub(super) fn new(idle_timeout: Duration) -> Pool<C> {
        Pool {
            inner: Arc::new(PoolInner {
                idle: (0..worker::count()).map(|_| Mutex::default()).collect(),
                idle_timeout,
                tick: AtomicU64::new(0),
                sweeper_started: AtomicBool::new(false),
            }),
        }
    }

    /// This thread's idle map.
    fn idle(&self) -> MutexGuard<'_, IdleMap<C>> {
        let shards = &self.inner.idle;
        lock(&shards[worker::index() % shards.len()])
    }

    /// The most recently parked connection to `origin` that is still usable.
    pub(super) fn checkout(&self, origin: &str) -> Option<C> {
        let mut idle = self.idle();
        let parked = idle.get_mut(origin)?;
        while let Some(mut idle) = parked.pop() {
            if idle.conn.usable() {
                return Some(idle.conn);
            }
        }
        None
    }

    /// Parks `conn` as idle. The first connection parked starts the sweeper.
    pub(super) fn checkin(&self, origin: &str, mut conn: C) {
        if !conn.usable() {
            return;
        }
        let conn = Idle {
            conn,
            parked_at: self.inner.tick.load(Ordering::Relaxed),
        };
        let mut idle = self.idle();
        match idle.get_mut(origin) {
            Some(parked) => parked.push(conn),
            None => {
                idle.insert(origin.into(), vec![conn]);
            }
        }
        drop(idle);
        self.start_sweeper();
    }

    /// Starts the task that closes idle connections, once per pool; it ends with the pool.
    fn start_sweeper(&self) {
        if self.inner.sweeper_started.load(Ordering::Relaxed)
            || self.inner.sweeper_started.swap(true, Ordering::Relaxed)
        {
            return;
        }
        let weak: Weak<PoolInner<C>> = Arc::downgrade(&self.inner);
        let period = (self.inner.idle_timeout / 4).max(Duration::from_millis(10));
        tokio::spawn(async move {
            let mut every = tokio::time::interval(period);
            every.tick().await;
            loop {
                every.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                Pool { inner }.sweep();
            }
        });
    }

    fn sweep(&self) {
        let now = self.inner.tick.fetch_add(1, Ordering::Relaxed) + 1;
        for shard in &self.inner.idle {
            let mut idle = lock(shard);
            for parked in idle.values_mut() {
                parked.retain_mut(|c| now - c.parked_at <= IDLE_TICKS && c.conn.usable());
            }
            idle.retain(|_, parked| !parked.is_empty());
        }
    }

    /// Idle connections parked right now (for tests).
    #[cfg(test)]
    pub(super) fn idle_count(&self) -> usize {
        let shards = self.inner.idle.iter();
        shards
            .map(|s| lock(s).values().map(Vec::len).sum::<usize>())
            .sum()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The maps are consistent after any panic (pushes and pops only), so poison is harmless.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// hyper client connections to origins, for the requests hyper serves (bodies, upgrades, HTTP/2,
/// routes with a PROXY header). Cheap to clone (clones share the pool).
#[derive(Clone)]
pub(crate) struct OriginClient {
    pool: Pool<Sender>,
    connect_timeout: Duration,
    /// Written at the start of every new connection (a PROXY header), if set.
    proxy_header: Option<Arc<[u8]>>,
}

impl OriginClient {
    pub(crate) fn new(
        connect_timeout: Duration,
        idle_timeout: Duration,
        proxy_header: Option<Vec<u8>>,
    ) -> OriginClient {
        OriginClient {
            pool: Pool::new(idle_timeout),
            connect_timeout,
            proxy_header: proxy_header.map(Arc::from),
        }
    }

    /// Sends `req` (origin-form target) to `origin` on an idle connection, or a new one, and
    /// returns the response head; the body streams and returns the connection to the pool when
    /// it ends. A pooled connection that turns out to be closed before the request was written
    /// is dropped and the request goes on another one.
    pub(crate) async fn send(
        &self,
        origin: &Authority,
        mut req: Request<Incoming>,
    ) -> Result<Response<OriginBody>, ForwardError> {
        loop {
            let (mut sender, pooled) = match self.pool.checkout(origin.as_str()) {
                Some(sender) => (sender, true),
                None => (self.connect(origin).await?, false),
            };
            if sender.ready().await.is_err() {
                if pooled {
                    continue;
                }
                return Err(UpstreamError::Reset.into());
            }
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    // After a 101 the connection belongs to the upgraded tunnel.
                    let keep = resp.status() != StatusCode::SWITCHING_PROTOCOLS;
                    let back = keep.then(|| (sender, self.pool.clone(), origin.clone()));
                    return Ok(resp.map(|body| OriginBody {
                        body,
                        ended: false,
                        back,
                    }));
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if pooled => req = unsent,
                    _ if client_body_failed(e.error()) => {
                        debug!(%origin, error = %e.error(), "client request body failed");
                        return Err(ForwardError::ClientBody);
                    }
                    _ => {
                        debug!(%origin, error = %e.error(), "origin request failed");
                        return Err(UpstreamError::Reset.into());
                    }
                },
            }
        }
    }

    async fn connect(&self, origin: &Authority) -> Result<Sender, UpstreamError> {
        let failed = |e: std::io::Error| {
            debug!(%origin, error = %e, "origin connect failed");
            UpstreamError::Connect
        };
        let mut stream = connect(origin.as_str(), self.connect_timeout)
            .await
            .map_err(failed)?;
        if let Some(header) = &self.proxy_header {
            stream.write_all(header).await.map_err(failed)?;
        }
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.map_err(|e| {
            debug!(%origin, error = %e, "origin handshake failed");
            UpstreamError::Connect
        })?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!(error = %e, "origin connection ended with an error");
            }
        });
        Ok(sender)
    }

    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.pool.idle_count()
    }
}

/// An origin's response body. When it has been read to the end, its connection goes back to the
/// pool; dropped before that, the connection closes with it.
pub(crate) struct OriginBody {
    body: Incoming,
    ended: bool,
    back: Option<(Sender, Pool<Sender>, Authority)>,
}

impl OriginBody {
    fn give_back(&mut self) {
        if let Some((sender, pool, origin)) = self.back.take() {
            pool.checkin(origin.as_str(), sender);
        }
    }
}

impl Body for OriginBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let frame = std::task::ready!(Pin::new(&mut this.body).poll_frame(cx));
        match &frame {
            None => this.ended = true,
            Some(Ok(_)) => this.ended = this.body.is_end_stream(),
            Some(Err(_)) => this.back = None,
        }
        if this.ended {
            this.give_back();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for OriginBody {
    fn drop(&mut self) {
        // A body with nothing to read (204, 304, HEAD, Content-Length: 0) is never polled.
        if self.is_end_stream() {
            self.give_back();
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use hyper::server::conn::http1 as server;
    use hyper::service::service_fn;
    use std::convert::Infallible;
    use std::future::Future;
    use std::sync::atomic::AtomicUsize;
    use tokio::net::{TcpListener, TcpStream};

    struct Fake(u32);

    impl Parked for Fake {
        fn usable(&mut self) -> bool {
            true
        }
    }

    /// A connection parked on one worker is reused on that worker only: its socket is registered
    /// with that worker's runtime.
    #[test]
    fn each_worker_reuses_its_own_connections() {
        use crate::runtime::workers::{Workers, run_on};
        let workers = Workers::start(2).unwrap();
        let [w0, w1] = workers.handles() else {
            panic!("two workers")
        };
        let pool = Pool::<Fake>::new(Duration::from_secs(60));
        let origin: Authority = "127.0.0.1:80".parse().unwrap();
        let (p, o) = (pool.clone(), origin.clone());
        run_on(w0, move || p.checkin(o.as_str(), Fake(7)));
        let (p, o) = (pool.clone(), origin.clone());
        assert!(
            run_on(w1, move || p.checkout(o.as_str()).is_none()),
            "taken by worker 1"
        );
        let (p, o) = (pool.clone(), origin.clone());
        assert_eq!(
            run_on(w0, move || p.checkout(o.as_str()).map(|c| c.0)),
            Some(7)
        );
        workers.stop();
    }

    /// An origin on loopback that counts the connections it accepted.
    async fn origin() -> (Authority, Arc<AtomicUsize>) {
        counting_origin(|stream| async move {
            let svc = service_fn(|req: Request<Incoming>| async move {
                let body = match req.uri().path() {
                    "/empty" => String::new(),
                    path => format!("hello {path}"),
                };
                Ok::<_, Infallible>(Response::new(http_body_util::Full::new(Bytes::from(body))))
            });
            let _ = server::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        })
        .await
    }

    /// An origin on loopback that runs `serve` on each connection and counts the connections.
    pub(in crate::proxy::forward) async fn counting_origin<F, Fut>(
        serve: F,
    ) -> (Authority, Arc<AtomicUsize>)
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream));
            }
        });
        (addr.to_string().parse().unwrap(), accepted)
    }

    /// A request with a real `Incoming` body (empty), as the listener hands over.
    async fn request(path: &str) -> Request<Incoming> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tx = Mutex::new(Some(tx));
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let svc = service_fn(move |req: Request<Incoming>| {
                if let Some(tx) = tx.lock().unwrap().take() {
                    let _ = tx.send(req);
                }
                async { Ok::<_, Infallible>(Response::new(http_body_util::Empty::<Bytes>::new())) }
            });
            let _ = server::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        client
            .write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        rx.await.unwrap()
    }

    /// A pool with a 1 s connect timeout and the given idle timeout, no PROXY header.
    fn pool(idle: Duration) -> OriginClient {
        OriginClient::new(Duration::from_secs(1), idle, None)
    }

    async fn get(pool: &OriginClient, origin: &Authority, path: &str) -> String {
        let resp = pool.send(origin, request(path).await).await.unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn a_connection_is_reused_once_its_body_ended() {
        let (origin, accepted) = origin().await;
        let pool = pool(Duration::from_secs(60));
        assert_eq!(get(&pool, &origin, "/a").await, "hello /a");
        assert_eq!(pool.idle_count(), 1);
        assert_eq!(get(&pool, &origin, "/b").await, "hello /b");
        assert_eq!(get(&pool, &origin, "/empty").await, "");
        assert_eq!(get(&pool, &origin, "/c").await, "hello /c");
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_body_dropped_unread_takes_its_connection_with_it() {
        let (origin, accepted) = origin().await;
        let pool = pool(Duration::from_secs(60));
        let resp = pool.send(&origin, request("/x").await).await.unwrap();
        drop(resp);
        assert_eq!(pool.idle_count(), 0);
        assert_eq!(get(&pool, &origin, "/y").await, "hello /y");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn idle_connections_are_closed_after_the_idle_timeout() {
        let (origin, _) = origin().await;
        let pool = pool(Duration::from_millis(400));
        get(&pool, &origin, "/a").await;
        assert_eq!(pool.idle_count(), 1);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(pool.idle_count(), 1, "closed before idle_timeout");
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            pool.idle_count(),
            0,
            "still parked after 1.25 × idle_timeout"
        );
    }

    /// An origin that answers one request per connection, keep-alive style, then closes the
    /// connection shortly after (as origins do with idle keep-alive connections).
    async fn closing_origin() -> (Authority, Arc<AtomicUsize>) {
        use tokio::io::AsyncReadExt;
        counting_origin(|mut stream| async move {
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf).await;
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        })
        .await
    }

    #[tokio::test]
    async fn a_parked_connection_the_origin_closed_is_replaced() {
        let (origin, accepted) = closing_origin().await;
        let pool = pool(Duration::from_secs(60));
        let get_ok = async |path| {
            tokio::time::timeout(Duration::from_secs(5), get(&pool, &origin, path))
                .await
                .expect("answered")
        };
        assert_eq!(get_ok("/a").await, "ok");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(get_ok("/b").await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_refused_connect_is_a_connect_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let pool = pool(Duration::from_secs(60));
        let origin: Authority = addr.to_string().parse().unwrap();
        let err = pool.send(&origin, request("/").await).await.err();
        assert_eq!(err, Some(ForwardError::Upstream(UpstreamError::Connect)));
    }
}
