//! The HTTP server shared by the axum, hyper and tonic integrations: a hyper-util accept loop
//! (HTTP/1 and HTTP/2, auto) whose drain finale orders and bounds.
//!
//! # Why finale runs its own accept loop
//!
//! `axum::serve(..).with_graceful_shutdown(..)` and tonic's `serve_with_shutdown` close the
//! listener and ask every connection to shut down gracefully the moment their signal resolves,
//! then wait for the connections **without a deadline**; their connection tasks are detached, so
//! dropping the serve future does not close them either (an SSE stream keeps the process alive).
//! They also close idle HTTP/1 keep-alive connections at once, which races with a client (or a
//! load balancer's pool) sending its next request on them: the client sees a reset. Here:
//!
//! 1. **Announce** (before anything here happens): readiness is off, the server serves normally
//!    through the drain delay.
//! 2. **Drain starts**: the listener is closed (new connections are refused). HTTP/2 connections
//!    get GOAWAY; their streams in flight finish. HTTP/1 connections stay open for the
//!    [idle grace](HttpServer::idle_grace): a request that arrives on one gets `503` with
//!    `Connection: close`, a response to a request admitted before carries `Connection: close`,
//!    and each connection closes after that response. Then idle HTTP/1 connections are closed.
//! 3. **Drain deadline** minus the [cut margin](HttpServer::cut_margin): connections still open
//!    are closed; each request still in flight on them is named in the report
//!    (`GET /events from 127.0.0.1:5555 (stream open at the drain deadline)`), which makes the
//!    exit status [`DeadlineOverrun`](crate::ShutdownStatus::DeadlineOverrun).
//!
//! # Invariants
//!
//! - The accept loop is the only task that waits for the drain signal; each connection task
//!   waits on its own oneshot channels, so no waiter list is shared between connections.
//! - A connection is cut by its own task: it sets `cutting` and then drops the connection on the
//!   same task, so every request dropped with it sees the flag and names itself.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use pin_project_lite::pin_project;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::Finale;
use crate::config::ConfigError;
use crate::phase::Phase;
use crate::serve::tower::{
    Admission, ConnWatch, DrainBody, LayerShared, Rejection, ResponseFuture, admit,
};
use crate::task::{Task, TaskContext};
use crate::track::InFlight;

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// How long idle HTTP/1 connections stay open after the drain started, when a drain delay is
/// configured (behind a load balancer): 1 second.
pub const DEFAULT_IDLE_GRACE: Duration = Duration::from_secs(1);
/// How long before the Drain phase's deadline the remaining connections are cut: 100 ms.
pub const DEFAULT_CUT_MARGIN: Duration = Duration::from_millis(100);

/// Where a server listens: a socket address to bind (inside the server's task, so that a bind
/// error fails graceful start) or a listener bound already.
///
/// # Examples
///
/// ```
/// use finale::axum::Listen;
///
/// let by_address: Listen = "127.0.0.1:3000".parse::<std::net::SocketAddr>().unwrap().into();
/// let bound: Listen = std::net::TcpListener::bind("127.0.0.1:0").unwrap().into();
/// # let _ = (by_address, bound);
/// ```
#[derive(Debug)]
pub struct Listen(ListenKind);

#[derive(Debug)]
enum ListenKind {
    Addr(SocketAddr),
    Std(std::net::TcpListener),
    Tokio(TcpListener),
}

impl From<SocketAddr> for Listen {
    fn from(addr: SocketAddr) -> Self {
        Self(ListenKind::Addr(addr))
    }
}

impl From<([u8; 4], u16)> for Listen {
    fn from(addr: ([u8; 4], u16)) -> Self {
        Self(ListenKind::Addr(addr.into()))
    }
}

impl From<std::net::TcpListener> for Listen {
    fn from(listener: std::net::TcpListener) -> Self {
        Self(ListenKind::Std(listener))
    }
}

impl From<TcpListener> for Listen {
    fn from(listener: TcpListener) -> Self {
        Self(ListenKind::Tokio(listener))
    }
}

impl Listen {
    async fn bind(self) -> io::Result<TcpListener> {
        match self.0 {
            ListenKind::Addr(addr) => TcpListener::bind(addr).await,
            ListenKind::Std(listener) => {
                listener.set_nonblocking(true)?;
                TcpListener::from_std(listener)
            }
            ListenKind::Tokio(listener) => Ok(listener),
        }
    }
}

/// An HTTP server (HTTP/1 and HTTP/2, auto-detected) run as a finale
/// [`Task::service`]: ready once bound, drained in the Drain phase, bounded by its deadline.
/// See the [`finale::axum`](crate::axum) module docs for the sequence.
///
/// [`finale::axum::serve`](crate::axum::serve) and [`finale::hyper::serve`](crate::hyper::serve)
/// are shorthands for `HttpServer::new(name).serve(..)` with the defaults.
///
/// # Default values
///
/// | setting | default |
/// |---|---|
/// | [`rejection`](HttpServer::rejection) | [`Rejection::default`]: `503`, `Retry-After: 1` |
/// | [`idle_grace`](HttpServer::idle_grace) | [`DEFAULT_IDLE_GRACE`] if a drain delay is configured (an orchestrator was detected or one was set), else none |
/// | [`cut_margin`](HttpServer::cut_margin) | [`DEFAULT_CUT_MARGIN`] |
#[derive(Debug)]
#[must_use = "a server does nothing until `serve` is called"]
pub struct HttpServer {
    name: Cow<'static, str>,
    rejection: Rejection,
    idle_grace: Option<Duration>,
    cut_margin: Duration,
}

impl HttpServer {
    /// A server named `name` (the name of its task in the report).
    pub fn new(name: impl Into<Cow<'static, str>>) -> Self {
        Self {
            name: name.into(),
            rejection: Rejection::default(),
            idle_grace: None,
            cut_margin: DEFAULT_CUT_MARGIN,
        }
    }

    /// The response to requests that arrive once the drain started.
    pub fn rejection(mut self, rejection: Rejection) -> Self {
        self.rejection = rejection;
        self
    }

    /// How long idle HTTP/1 keep-alive connections stay open after the drain started, so that a
    /// request racing the close gets a `503` with `Connection: close` instead of a reset.
    /// The drain ends earlier if every connection has closed.
    pub fn idle_grace(mut self, grace: Duration) -> Self {
        self.idle_grace = Some(grace);
        self
    }

    /// How long before the Drain phase's deadline the remaining connections are cut.
    pub fn cut_margin(mut self, margin: Duration) -> Self {
        self.cut_margin = margin;
        self
    }

    /// Registers the server with `finale` as a [`Task::service`] serving `service` (a tower
    /// service over hyper requests: an axum `Router`, a tonic `Routes`, any
    /// `tower::Service<Request<Incoming>>`) on `listen`. The [`DrainLayer`](crate::tower::DrainLayer)
    /// behaviour is built in: every request is tracked and, once draining, rejected.
    ///
    /// Binding happens in the task: a bind error (port in use) fails graceful start, which stops
    /// the other servers and ends with [`StartupFailure`](crate::ShutdownStatus::StartupFailure).
    ///
    /// # Errors
    ///
    /// As [`Finale::spawn`]: a duplicate or empty name.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn serve<S, B>(
        self,
        finale: &Finale,
        listen: impl Into<Listen>,
        service: S,
    ) -> Result<(), ConfigError>
    where
        S: tower::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let listen = listen.into();
        let HttpServer {
            name,
            rejection,
            idle_grace,
            cut_margin,
        } = self;
        let idle_grace = idle_grace.unwrap_or_else(|| {
            if finale.handle().budget().drain_delay.max().is_zero() {
                Duration::ZERO
            } else {
                DEFAULT_IDLE_GRACE
            }
        });
        let settings = Settings {
            idle_grace,
            cut_margin,
        };
        finale.spawn(Task::service(name, move |ctx| {
            run(ctx, listen, service, rejection, settings)
        }))
    }
}

#[derive(Clone, Copy, Debug)]
struct Settings {
    idle_grace: Duration,
    cut_margin: Duration,
}

/// Control of one connection task, held by the accept loop.
struct ConnControl {
    /// Drain started: shut down gracefully, HTTP/1 after the grace ending at this instant.
    graceful: Option<oneshot::Sender<Instant>>,
    /// The deadline: close now.
    cut: Option<oneshot::Sender<()>>,
}

async fn run<S, B>(
    ctx: TaskContext,
    listen: Listen,
    service: S,
    rejection: Rejection,
    settings: Settings,
) -> io::Result<()>
where
    S: tower::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let listener = listen.bind().await?;
    let local = listener.local_addr()?;
    let handle = ctx.handle().clone();
    tracing::info!(target: "finale", server = ctx.name(), %local, "listening");
    ctx.set_ready();

    let shared = Arc::new(LayerShared {
        handle: handle.clone(),
        rejection,
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let mut conns: JoinSet<()> = JoinSet::new();
    let mut controls: std::collections::HashMap<tokio::task::Id, ConnControl> =
        std::collections::HashMap::new();
    let stop = ctx.stop_token();

    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            Some(joined) = conns.join_next_with_id(), if !conns.is_empty() => {
                controls.remove(&joined_id(&joined));
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let (graceful_tx, graceful_rx) = oneshot::channel();
                    let (cut_tx, cut_rx) = oneshot::channel();
                    let service = ConnService {
                        inner: service.clone(),
                        in_flight: handle.in_flight(),
                        shared: shared.clone(),
                        conn: Arc::new(ConnWatch::new(peer, handle.clone())),
                    };
                    let conn = builder.clone();
                    let id = conns
                        .spawn(serve_connection(conn, stream, service, graceful_rx, cut_rx))
                        .id();
                    controls.insert(id, ConnControl { graceful: Some(graceful_tx), cut: Some(cut_tx) });
                }
                Err(e) if is_connection_error(&e) => {}
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(target: "finale", server = ctx.name(), error = %e, "accept failed");
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                }
            },
        }
    }
    // New connections are refused from here on.
    drop(listener);

    let now = Instant::now();
    let cut_at = handle.phase_deadline(Phase::Drain).map(|deadline| {
        deadline
            .checked_sub(settings.cut_margin)
            .unwrap_or(now)
            .max(now)
    });
    let grace_until = {
        let end = now + settings.idle_grace;
        cut_at.map_or(end, |cut| end.min(cut))
    };
    tracing::debug!(target: "finale", server = ctx.name(), connections = controls.len(), "draining");
    for control in controls.values_mut() {
        if let Some(tx) = control.graceful.take() {
            let _ = tx.send(grace_until);
        }
    }

    let cut = async {
        match cut_at {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(cut);
    loop {
        tokio::select! {
            joined = conns.join_next_with_id() => match joined {
                Some(joined) => { controls.remove(&joined_id(&joined)); }
                None => break,
            },
            () = &mut cut => {
                tracing::warn!(
                    target: "finale",
                    server = ctx.name(),
                    connections = controls.len(),
                    "cutting the connections still open at the drain deadline",
                );
                for control in controls.values_mut() {
                    if let Some(tx) = control.cut.take() {
                        let _ = tx.send(());
                    }
                }
                // Each task drops its connection and ends at once.
                while conns.join_next().await.is_some() {}
                break;
            }
        }
    }
    tracing::debug!(target: "finale", server = ctx.name(), "drained");
    Ok(())
}

fn joined_id(joined: &Result<(tokio::task::Id, ()), tokio::task::JoinError>) -> tokio::task::Id {
    match joined {
        Ok((id, ())) => *id,
        Err(e) => e.id(),
    }
}

/// Errors of one incoming connection, not of the listener.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

async fn serve_connection<S, B>(
    builder: auto::Builder<TokioExecutor>,
    stream: TcpStream,
    service: ConnService<S>,
    mut graceful: oneshot::Receiver<Instant>,
    mut cut: oneshot::Receiver<()>,
) where
    S: tower::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let _ = stream.set_nodelay(true);
    let watch = service.conn.clone();
    let mut conn = Box::pin(
        builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned(),
    );
    let grace_until = tokio::select! {
        result = conn.as_mut() => return log_end(&watch, result),
        // An error means the accept loop is gone (aborted): shut down at once.
        at = &mut graceful => at.unwrap_or_else(|_| Instant::now()),
    };
    // Every connection not known to be HTTP/2 gets the grace: an HTTP/1 connection, and one
    // whose first request may still be on its way (closing it now would reset that request).
    if !watch.http2.load(Ordering::Relaxed) && grace_until > Instant::now() {
        tokio::select! {
            result = conn.as_mut() => return log_end(&watch, result),
            () = tokio::time::sleep_until(grace_until) => {}
            _ = &mut cut => return cut_connection(conn, &watch),
        }
    }
    // HTTP/2: GOAWAY, streams in flight finish. HTTP/1: closes if idle, else after the response.
    conn.as_mut().graceful_shutdown();
    tokio::select! {
        result = conn.as_mut() => log_end(&watch, result),
        _ = &mut cut => cut_connection(conn, &watch),
    }
}

fn log_end(watch: &ConnWatch, result: Result<(), BoxError>) {
    if let Err(error) = result {
        tracing::debug!(target: "finale", peer = %watch.peer, %error, "connection ended with an error");
    }
}

fn cut_connection<C>(conn: C, watch: &ConnWatch) {
    // Set before the drop: every request dropped with the connection names itself.
    watch.cutting.store(true, Ordering::Relaxed);
    drop(conn);
    if watch.named.load(Ordering::Relaxed) == 0 {
        // Nothing in flight to name (a client stuck sending its request, for example).
        watch.handle.shared.record_cut(format!(
            "connection from {} (open at the drain deadline)",
            watch.peer
        ));
    }
}

/// One connection's service: the drain logic of [`DrainLayer`](crate::tower::DrainLayer) in
/// front of a clone of the user's service per request.
struct ConnService<S> {
    inner: S,
    in_flight: InFlight,
    shared: Arc<LayerShared>,
    conn: Arc<ConnWatch>,
}

impl<S> fmt::Debug for ConnService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnService")
            .field("peer", &self.conn.peer)
            .finish_non_exhaustive()
    }
}

impl<S, B> hyper::service::Service<Request<Incoming>> for ConnService<S>
where
    S: tower::Service<Request<Incoming>, Response = Response<B>> + Clone,
    B: Body<Data = Bytes>,
{
    type Response = Response<DrainBody<B>>;
    type Error = S::Error;
    type Future = ResponseFuture<Oneshot<S, Request<Incoming>>, B>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        match admit(self.in_flight, &self.shared, Some(&self.conn), &req) {
            Admission::Rejected(response) => ResponseFuture::rejected(response),
            Admission::Admitted(admitted) => {
                ResponseFuture::admitted(Oneshot::new(self.inner.clone(), req), admitted)
            }
        }
    }
}

pin_project! {
    /// `poll_ready`, then `call`, on an owned tower service.
    pub(crate) struct Oneshot<S, Req>
    where
        S: tower::Service<Req>,
    {
        pending: Option<(S, Req)>,
        #[pin]
        fut: Option<S::Future>,
    }
}

impl<S: tower::Service<Req>, Req> Oneshot<S, Req> {
    fn new(service: S, req: Req) -> Self {
        Self {
            pending: Some((service, req)),
            fut: None,
        }
    }
}

impl<S: tower::Service<Req>, Req> Future for Oneshot<S, Req> {
    type Output = Result<S::Response, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            if let Some(fut) = this.fut.as_mut().as_pin_mut() {
                return fut.poll(cx);
            }
            let (service, _) = this.pending.as_mut().expect("polled after completion");
            ready!(service.poll_ready(cx))?;
            let (mut service, req) = this.pending.take().expect("checked above");
            this.fut.set(Some(service.call(req)));
        }
    }
}

/// Adapts a hyper service (`call(&self)`) to tower, for [`HttpServer::serve`].
#[cfg(feature = "hyper")]
#[derive(Clone, Debug)]
pub(crate) struct HyperToTower<S>(pub(crate) S);

#[cfg(feature = "hyper")]
impl<S, Req> tower::Service<Req> for HyperToTower<S>
where
    S: hyper::service::Service<Req>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        self.0.call(req)
    }
}
