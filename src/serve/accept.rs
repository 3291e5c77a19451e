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
//! 1. **Announce**: readiness is off; the server goes on serving through the drain delay, and
//!    moves persistent clients politely while it does: HTTP/1 responses carry
//!    `Connection: close`, so a client that reconnects goes, through the load balancer, to an
//!    instance that stays (HTTP/2 connections too, with
//!    [`goaway_on_announce`](super::server::HttpServer::goaway_on_announce)).
//! 2. **Drain starts**: connections already in the kernel's accept queue are accepted (they get
//!    an answer, not the reset that closing the listener gives them); then the listener is
//!    closed (new connections are refused). HTTP/2 connections get GOAWAY: streams the peer
//!    opened before the final GOAWAY are served, later ones are refused by h2 itself
//!    (`REFUSED_STREAM`, which clients retry). Connections not known to be HTTP/2 (HTTP/1, or a
//!    fresh one whose first request may be on its way) stay open for the
//!    [idle grace](super::server::HttpServer::idle_grace) after they last did something
//!    (accepted, or their last request ended): a request that arrives on one is served with
//!    `Connection: close` (a `503` only within the late margin of the deadline). A connection
//!    with nothing in flight and nothing left to write is closed once its grace is over: at
//!    once if it has been idle for longer than that (its client is no likelier to use it in
//!    the next moment), and a client that never sent a complete request does not hold the
//!    drain (slow clients are bounded by the
//!    [header-read timeout](super::server::HttpServer::header_read_timeout) anyway). One whose
//!    client still reads a response (hyper holds bytes the socket has not taken) is closed
//!    after it, however long that takes, until the deadline. A connection hyper closed with
//!    the client's bytes still unread (a pipelined request) keeps its socket open, reading and
//!    dropping them, until the client closes its end (at most 2 s): closed with bytes unread,
//!    the socket would be reset, and the end of the response thrown away.
//!    Upgraded connections (a WebSocket) count as in flight until their handler closes them
//!    (see [WebSockets](crate::axum#websockets)).
//! 3. **Drain deadline** minus the [cut margin](super::server::HttpServer::cut_margin):
//!    connections still open are closed; each request still in flight on them is named in the
//!    report by method and path, never the query (`GET /events from 127.0.0.1:5555 (stream
//!    open at the drain deadline)`), which makes the exit status
//!    [`DeadlineOverrun`](crate::ShutdownStatus::DeadlineOverrun).
//!
//! # Invariants
//!
//! - The accept loop is the only task that waits for the phase tokens; it tells every
//!   connection task through one `watch` channel, so no waiter list or map is kept per
//!   connection.
//! - A connection is cut by its own task: it sets `cutting` and then drops the connection on the
//!   same task, so every request dropped with it sees the flag and names itself; the
//!   connection names itself only if it has no request in flight, so nothing is named twice.
//! - An upgraded request's in-flight guard and name live on its connection's `ConnWatch`
//!   until that connection's task lets them go; after an HTTP/1 upgrade the task stays, holding
//!   the socket's other half (to shut it down at the cut) and woken when the handler drops its
//!   own.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::phase::Phase;
use crate::serve::conn_service::ConnService;
#[cfg(feature = "tls")]
use crate::serve::connection::serve_tls;
use crate::serve::connection::{BoxError, Settings, Stage, after, serve_plain};
use crate::serve::listen::{Bound, Listen};
use crate::serve::listening::{BindError, Binding, LocalAddr};
use crate::serve::timers::SlowTimers;
use crate::serve::tower::{ConnWatch, LayerShared, Peer};
use crate::serve::transport::{Acceptor, is_connection_error};
use crate::task::TaskContext;

/// The TLS acceptor of an HTTPS server (nothing without the `tls` feature).
#[cfg(feature = "tls")]
type Tls = Option<tokio_rustls::TlsAcceptor>;
#[cfg(not(feature = "tls"))]
type Tls = Option<std::convert::Infallible>;

/// hyper-util's connection builder, as finale's servers use it.
type ConnBuilder = auto::Builder<TokioExecutor>;

/// The user's hyper settings ([`HttpServer::hyper`](super::server::HttpServer::hyper)), applied
/// by the accept loop to its connection builder.
#[derive(Clone)]
pub(super) struct Configure(pub(super) Arc<dyn Fn(&mut ConnBuilder) + Send + Sync>);

impl fmt::Debug for Configure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Configure(..)")
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn run<S, B>(
    ctx: TaskContext,
    listen: Listen,
    binding: Binding,
    service: S,
    bare: bool,
    shared: Arc<LayerShared>,
    settings: Settings,
    tls: Tls,
    configure: Option<Configure>,
) -> Result<(), BoxError>
where
    S: tower::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let address = listen.describe();
    let bound = match listen.bind(ctx.name()).await {
        Ok(bound) => bound,
        Err(e) => {
            let error = BindError::new(ctx.name(), address, e);
            binding.send(Err(error.clone()));
            return Err(error.into());
        }
    };
    let served = match bound {
        Bound::Tcp(acceptor) => {
            binding.send(Ok(LocalAddr::Tcp(acceptor.local)));
            serve_on(
                ctx, acceptor, service, bare, shared, settings, tls, configure,
            )
            .await
        }
        #[cfg(unix)]
        Bound::Unix(acceptor) => {
            binding.send(Ok(LocalAddr::Unix(acceptor.local().to_string())));
            serve_on(
                ctx, acceptor, service, bare, shared, settings, tls, configure,
            )
            .await
        }
    };
    Ok(served?)
}

/// The accept loop and the drain, on one transport's listener.
#[allow(clippy::too_many_arguments)]
async fn serve_on<A, S, B>(
    ctx: TaskContext,
    acceptor: A,
    service: S,
    bare: bool,
    shared: Arc<LayerShared>,
    settings: Settings,
    tls: Tls,
    configure: Option<Configure>,
) -> io::Result<()>
where
    A: Acceptor,
    S: tower::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    // Offered to an upgrade's successor while this server accepts.
    #[cfg(all(feature = "upgrade", unix))]
    let offered = match crate::upgrade::state(&ctx.handle().shared) {
        Some(upgrade) => Some(upgrade.register(ctx.name(), &acceptor.fd())?),
        None => None,
    };
    let handle = ctx.handle().clone();
    tracing::info!(target: "finale", server = ctx.name(), local = %acceptor.local(), "listening");
    ctx.set_ready();

    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Slow clients are bounded by the connection's own loop (`drive`), once per connection;
    // hyper's header-read timeout would allocate and register a timer for every request.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None);
    builder
        .http2()
        .timer(TokioTimer::new())
        .enable_connect_protocol();
    if let Some(Configure(configure)) = &configure {
        configure(&mut builder);
    }
    let (stage_tx, stage_rx) = watch::channel(Stage::Serving);
    let timers = SlowTimers::start(ctx.name());
    let mut conns: JoinSet<()> = JoinSet::new();
    let stop = ctx.stop_token();
    let announced = handle.phase_token(Phase::Announce);
    let accept = {
        let handle = handle.clone();
        move |stream: A::Stream, peer: Peer, conns: &mut JoinSet<()>| {
            let service = ConnService {
                inner: service.clone(),
                in_flight: handle.in_flight(),
                shared: shared.clone(),
                conn: Arc::new(ConnWatch::new(peer, handle.clone())),
                bare,
            };
            let stage = stage_rx.clone();
            match &tls {
                #[cfg(feature = "tls")]
                Some(acceptor) => conns.spawn(serve_tls(
                    builder.clone(),
                    stream,
                    service,
                    stage,
                    settings,
                    timers.clone(),
                    acceptor.clone(),
                )),
                #[cfg(not(feature = "tls"))]
                Some(never) => match *never {},
                None => conns.spawn(serve_plain(
                    &builder,
                    stream,
                    service,
                    stage,
                    settings,
                    timers.clone(),
                )),
            };
        }
    };

    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            () = announced.cancelled(), if *stage_tx.borrow() == Stage::Serving => {
                stage_tx.send_replace(Stage::Announced);
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = std::future::poll_fn(|cx| acceptor.poll_accept(cx)) => match accepted {
                Ok((stream, peer)) => {
                    handle.shared.health.record_activity();
                    accept(stream, peer, &mut conns);
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
    #[cfg(all(feature = "upgrade", unix))]
    drop(offered);
    // After an upgrade the successor serves this same socket, its accept queue included: leave
    // both as they are, just stop accepting here. Otherwise connections the kernel already
    // completed (in the accept queue) get an answer, not the reset that closing the listener
    // would give them (see `Acceptor::close`).
    let handed_off = handle.shared.handed_off();
    let queued = acceptor.close(handed_off, |stream, peer| accept(stream, peer, &mut conns));

    let now = Instant::now();
    let cut_at = handle.phase_deadline(Phase::Drain).map(|deadline| {
        deadline
            .checked_sub(settings.cut_margin)
            .unwrap_or(now)
            .max(now)
    });
    let grace_until = {
        let end = after(now, settings.idle_grace);
        cut_at.map_or(end, |cut| end.min(cut))
    };
    tracing::debug!(target: "finale", server = ctx.name(), connections = conns.len(), queued, "draining");
    stage_tx.send_replace(Stage::Draining { grace_until });

    let cut = async {
        match cut_at {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(cut);
    loop {
        tokio::select! {
            joined = conns.join_next() => if joined.is_none() { break },
            () = &mut cut => {
                tracing::warn!(
                    target: "finale",
                    server = ctx.name(),
                    connections = conns.len(),
                    "cutting the connections still open at the drain deadline",
                );
                stage_tx.send_replace(Stage::Cut);
                // Each task drops its connection and ends at once.
                while conns.join_next().await.is_some() {}
                break;
            }
        }
    }
    tracing::debug!(target: "finale", server = ctx.name(), "drained");
    Ok(())
}
