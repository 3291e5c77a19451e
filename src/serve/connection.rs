//! One connection's life on finale's server: the TLS handshake, the drive loop through the
//! drain (the idle grace, `Connection: close`, GOAWAY, slow clients, the maximum age), an
//! upgraded connection held until its handler lets go, and the cut at the deadline.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::serve::conn_io::ConnIo;
#[cfg(feature = "tls")]
use crate::serve::conn_io::SNIFFED;
use crate::serve::conn_service::ConnService;
use crate::serve::gate::Gate;
use crate::serve::timers::SlowTimers;
use crate::serve::tower::ConnWatch;
use crate::serve::transport::Transport;

pub(super) type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Clone, Copy, Debug)]
pub(super) struct Settings {
    pub(super) idle_grace: Duration,
    pub(super) cut_margin: Duration,
    pub(super) header_read_timeout: Duration,
    pub(super) goaway_on_announce: bool,
    pub(super) tcp_nodelay: bool,
    pub(super) max_connection_age: Option<Duration>,
    #[cfg(feature = "tls")]
    pub(super) tls_handshake_timeout: Duration,
}

/// What a connection's drive loop reads of the server's [`Settings`]: every connection's task
/// keeps these, not the whole of them.
#[derive(Clone, Copy, Debug)]
struct LoopSettings {
    idle_grace: Duration,
    header_read_timeout: Duration,
    max_connection_age: Option<Duration>,
    goaway_on_announce: bool,
}

impl From<Settings> for LoopSettings {
    fn from(settings: Settings) -> Self {
        Self {
            idle_grace: settings.idle_grace,
            header_read_timeout: settings.header_read_timeout,
            max_connection_age: settings.max_connection_age,
            goaway_on_announce: settings.goaway_on_announce,
        }
    }
}

/// Where the server is, as every connection task sees it: one `watch` channel for all of them
/// (a receiver per connection, no per-connection channel or map entry).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Stage {
    Serving,
    /// The shutdown is announced (the drain delay): move persistent clients politely.
    Announced,
    /// The drain started: connections not known to be HTTP/2 get their idle grace, never past
    /// `grace_until` (the drain start plus the grace, capped by the cut).
    Draining {
        grace_until: Instant,
    },
    /// The deadline: close now.
    Cut,
}

/// Serves one plain (not TLS) connection through the drain. Plain and TLS connections are
/// separate futures (the accept loop spawns one or the other), so that a plain connection's
/// task holds no room for a TLS session.
///
/// Everything but the drive loop is done before the task starts: the task's future holds the
/// loop's own state and nothing twice (an `async fn`'s arguments keep their room in its future
/// after they are moved on).
pub(super) fn serve_plain<T, S, B>(
    builder: &auto::Builder<TokioExecutor>,
    stream: T,
    service: ConnService<S>,
    stage: watch::Receiver<Stage>,
    settings: Settings,
    timers: SlowTimers,
) -> impl Future<Output = ()> + use<T, S, B>
where
    T: Transport,
    S: tower::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let (io, socket) = open(stream, &service.conn, settings, 0);
    serve_http(builder, io, service, socket, stage, settings, timers)
}

/// Serves one TLS connection through the drain: the handshake, then as [`serve_plain`].
#[cfg(feature = "tls")]
pub(super) async fn serve_tls<T, S, B>(
    builder: auto::Builder<TokioExecutor>,
    stream: T,
    service: ConnService<S>,
    mut stage: watch::Receiver<Stage>,
    settings: Settings,
    timers: SlowTimers,
    acceptor: tokio_rustls::TlsAcceptor,
) where
    T: Transport,
    S: tower::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    // The bytes are the handshake's: its ALPN tells instead.
    let (io, socket) = open(stream, &service.conn, settings, SNIFFED);
    let Some(io) = handshake(&acceptor, io, &service.conn, &mut stage, settings).await else {
        return;
    };
    // Without ALPN (or with `http/1.1`) the connection stays bounded by the header-read
    // timeout until its first HTTP/2 request, if any, says otherwise.
    if io.get_ref().1.alpn_protocol() == Some(b"h2") {
        service.conn.h2_preface.store(true, Ordering::Relaxed);
    }
    serve_http(&builder, io, service, socket, stage, settings, timers).await;
}

/// A fresh connection's socket as hyper will see it, and the connection task's weak reach to
/// it.
fn open<T: Transport>(
    stream: T,
    watch: &Arc<ConnWatch>,
    settings: Settings,
    sniffed: u8,
) -> (ConnIo<T>, std::sync::Weak<T>) {
    stream.prepare(settings.tcp_nodelay);
    let stream = Arc::new(stream);
    let socket = Arc::downgrade(&stream);
    let io = ConnIo {
        stream,
        watch: watch.clone(),
        sniffed,
    };
    (io, socket)
}

/// hyper serves `io` (a plain socket, or a TLS session over one) through the drain; an HTTP/1
/// upgrade's socket is held after.
fn serve_http<I, S, B, T>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    service: ConnService<S>,
    socket: std::sync::Weak<T>,
    mut stage: watch::Receiver<Stage>,
    settings: Settings,
    timers: SlowTimers,
) -> impl Future<Output = ()> + use<I, S, B, T>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: tower::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    T: Transport,
{
    let watch = service.conn.clone();
    let settings = LoopSettings::from(settings);
    // Boxed: one allocation the size of hyper's connection, and the task's future holds the
    // drive loop's state only.
    let conn = Box::pin(Some(
        builder
            .serve_connection_with_upgrades(TokioIo::new(io), service)
            .into_owned(),
    ));
    async move {
        let mut conn = conn;
        let ended = drive(
            conn.as_mut(),
            &watch,
            &socket,
            &mut stage,
            &settings,
            &timers,
        )
        .await;
        // hyper's connection goes first: what it still holds (an upgrade's socket not yet
        // taken by its handler, the streams of an HTTP/2 connection) is released with it.
        drop(conn);
        if ended {
            hold_upgraded(&watch, &socket, &mut stage).await;
        }
    }
}

/// The TLS handshake of a fresh connection, bounded by the handshake timeout, and, once the
/// drain started, by the connection's idle grace (it has sent no request yet); cut at the
/// deadline.
#[cfg(feature = "tls")]
async fn handshake<T: Transport>(
    acceptor: &tokio_rustls::TlsAcceptor,
    io: ConnIo<T>,
    watch: &ConnWatch,
    stage: &mut watch::Receiver<Stage>,
    settings: Settings,
) -> Option<tokio_rustls::server::TlsStream<ConnIo<T>>> {
    let drained = async {
        let grace_until = loop {
            let now = *stage.borrow_and_update();
            match now {
                Stage::Draining { grace_until } => break grace_until,
                Stage::Cut => break Instant::now(),
                Stage::Serving | Stage::Announced => {}
            }
            if stage.changed().await.is_err() {
                break Instant::now();
            }
        };
        tokio::time::sleep_until(grace_until.min(after(watch.last_active(), settings.idle_grace)))
            .await;
    };
    tokio::select! {
        accepted = tokio::time::timeout(settings.tls_handshake_timeout, acceptor.accept(io)) => {
            match accepted {
                Ok(Ok(stream)) => Some(stream),
                Ok(Err(error)) => {
                    tracing::debug!(target: "finale", peer = %watch.peer, %error, "TLS handshake failed");
                    None
                }
                Err(_) => {
                    tracing::debug!(target: "finale", peer = %watch.peer, "TLS handshake timed out");
                    None
                }
            }
        }
        () = drained => None,
    }
}

type Connection<I, S> =
    auto::UpgradeableConnection<'static, TokioIo<I>, ConnService<S>, TokioExecutor>;

/// Serves one connection through the drain; `true` if it ended on its own (not cut), which
/// after an HTTP/1 upgrade means the socket now belongs to the upgrade's handler.
async fn drive<I, S, B, T>(
    mut conn: Pin<&mut Option<Connection<I, S>>>,
    watch: &ConnWatch,
    socket: &std::sync::Weak<T>,
    stage: &mut watch::Receiver<Stage>,
    // By reference: the task's future holds the settings once, not once more for the loop.
    settings: &LoopSettings,
    timers: &SlowTimers,
) -> bool
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: tower::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    T: Transport,
{
    // Slow clients: a connection not known to be HTTP/2 with no request in flight that has not
    // sent a request's headers within the header-read timeout after it last did something
    // (accepted, or its last request ended) is closed: a silent one, a partial head, a partial
    // HTTP/2 preface. One timer per connection, moved only when it fires, kept by the server's
    // timer thread (see `timers.rs`).
    let slow = timers.sleep_until(after(watch.last_active(), settings.header_read_timeout));
    tokio::pin!(slow);
    let gate = Gate::new();
    // GOAWAY sent already (an HTTP/2 connection moved during the drain delay, or old enough).
    let mut moved = false;
    // The maximum age's timer, boxed (rarely set: no room in every connection's task), until
    // it fired (once).
    let mut aged = settings
        .max_connection_age
        .map(|age| Box::pin(tokio::time::sleep_until(after(watch.accepted(), age))));
    let grace_until = loop {
        match *stage.borrow_and_update() {
            Stage::Serving => {}
            Stage::Announced => {
                if settings.goaway_on_announce && !moved && known_http2(watch) {
                    // The peer learns to open new streams elsewhere while this connection
                    // still serves the ones it has.
                    live(conn.as_mut()).graceful_shutdown();
                    moved = true;
                }
            }
            Stage::Draining { grace_until } => break grace_until,
            Stage::Cut => return cut_connection(conn, watch),
        }
        let event = {
            let aged = async {
                match &mut aged {
                    Some(sleep) if !moved => sleep.await,
                    _ => std::future::pending().await,
                }
            };
            // The drain's signals: looked at only when one of them fired, not at every
            // wake-up of the connection (one per request).
            let signals = async {
                tokio::select! {
                    biased;
                    changed = stage.changed() => Event::Stage { closed: changed.is_err() },
                    () = &mut slow => Event::Slow,
                    () = aged => Event::Aged,
                }
            };
            tokio::pin!(signals);
            gate.open();
            tokio::select! {
                biased;
                result = live(conn.as_mut()) => return log_end(watch, result),
                event = std::future::poll_fn(|cx| gate.poll(signals.as_mut(), cx)) => event,
            }
        };
        match event {
            Event::Stage { closed: false } => {}
            // The accept loop is gone (aborted): close at once.
            Event::Stage { closed: true } => return cut_connection(conn, watch),
            Event::Slow => match slow_due(watch, settings) {
                Some(due) => slow.as_mut().reset(rearm(due, settings)),
                None => return true,
            },
            Event::Aged => {
                aged = None;
                // Known HTTP/2 by a request or before any (its preface, its ALPN): an idle one
                // is moved too. (A connection whose version is not known yet at its age is
                // not: HTTP/1 has no GOAWAY.)
                if known_http2(watch) {
                    // Old enough: GOAWAY, the streams it has finish, the client reconnects
                    // (to another instance, behind an L4 balancer).
                    live(conn.as_mut()).graceful_shutdown();
                    moved = true;
                }
            }
        }
    };
    // A connection not known to be HTTP/2 stays open for the idle grace after it last did
    // something (accepted, or its last request ended): a fresh connection's first request, or
    // a keep-alive client's next one, may be on its way, and closing now would reset it. A
    // request that arrives is served, with `Connection: close`. One idle for longer than the
    // grace is closed at once: its client is no likelier to use it in the next moment.
    // Bytes the kernel received and hyper has not read yet (this task may not have run since
    // they arrived) are a request on its way: closing now would reset it, so it gets the grace.
    let mut waiting = false;
    if !watch.http2.load(Ordering::Relaxed) {
        let mut until = grace_until.min(after(watch.last_active(), settings.idle_grace));
        if until <= Instant::now() && unread(socket) {
            until = grace_until;
        }
        if until > Instant::now() {
            tokio::select! {
                // The connection first: bytes that arrived are read (a request begun) before
                // the grace's end is looked at.
                biased;
                result = live(conn.as_mut()) => return log_end(watch, result),
                () = tokio::time::sleep_until(until) => {}
                _ = stage.wait_for(|s| *s == Stage::Cut) => return cut_connection(conn, watch),
            }
        }
        if watch.active.load(Ordering::Relaxed) == 0 {
            waiting = unread(socket);
            if !waiting {
                // Nothing in flight after the grace (idle, or a client that never sent a
                // complete request): this connection holds nothing, close it.
                return false;
            }
        }
    }
    // HTTP/2: GOAWAY, streams in flight finish. HTTP/1: closes after the response in flight
    // (its `Connection: close`); with a request still unread hyper would take the connection
    // for idle and close it, so it is left to read it (the response closes it).
    if !moved && !waiting {
        live(conn.as_mut()).graceful_shutdown();
    }
    // Slow clients stay bounded through the drain: a partial request head (or one still
    // unread) is closed at the header-read timeout, as while serving, not held to the cut.
    loop {
        tokio::select! {
            biased;
            result = live(conn.as_mut()) => return log_end(watch, result),
            _ = stage.wait_for(|s| *s == Stage::Cut) => return cut_connection(conn, watch),
            () = &mut slow => match slow_due(watch, settings) {
                Some(due) => slow.as_mut().reset(rearm(due, settings)),
                None => return true,
            },
        }
    }
}

/// When the slow-client timer of a connection is next due, or `None` if the connection is
/// slow: not known to be HTTP/2, no request in flight, and no request's headers within the
/// header-read timeout after it last did something.
fn slow_due(watch: &ConnWatch, settings: &LoopSettings) -> Option<Instant> {
    let now = Instant::now();
    if watch.active.load(Ordering::Relaxed) > 0
        || watch.h2_preface.load(Ordering::Relaxed)
        || watch.http2.load(Ordering::Relaxed)
    {
        // A request in flight (its body, its response), or HTTP/2: look again one timeout
        // from now.
        return Some(after(now, settings.header_read_timeout));
    }
    let due = after(watch.last_active(), settings.header_read_timeout);
    if due <= now {
        tracing::debug!(target: "finale", peer = %watch.peer, "no request headers within the header-read timeout: closing");
        return None;
    }
    Some(due)
}

/// Whether the connection is known to be HTTP/2: by a request, or before any by its whole
/// preface or its TLS ALPN.
fn known_http2(watch: &ConnWatch) -> bool {
    watch.http2.load(Ordering::Relaxed) || watch.h2_preface.load(Ordering::Relaxed)
}

/// When the slow-client timer looks again after it fired and found the connection due (at
/// the earliest) at `due`. `due` is on the runtime's clock and the timer may be on the real
/// one (the server's timer thread): if the runtime's clock was paused after the server
/// started, a `due` the real clock has passed would make the timer fire again at once, for
/// ever; it then looks again a quarter of the timeout later, on the real clock. On one clock
/// `due` is always ahead (a connection found past it is closed), and is kept.
fn rearm(due: Instant, settings: &LoopSettings) -> Instant {
    let real_now = Instant::from_std(std::time::Instant::now());
    if due > real_now {
        due
    } else {
        after(real_now, settings.header_read_timeout / 4)
    }
}

/// `at + duration`, or about thirty years after `at` if that does not fit in an `Instant`
/// (`Duration::MAX` as a timeout means none).
pub(super) fn after(at: Instant, duration: Duration) -> Instant {
    at.checked_add(duration)
        .unwrap_or_else(|| at + Duration::from_secs(86_400 * 365 * 30))
}

/// What woke a serving connection's drain signals.
enum Event {
    /// The server's stage changed (or its sender is gone: `closed`).
    Stage { closed: bool },
    /// The slow-client timer fired.
    Slow,
    /// The connection reached its maximum age.
    Aged,
}

/// Whether the connection's socket holds bytes nobody has read yet.
fn unread<T: Transport>(socket: &std::sync::Weak<T>) -> bool {
    socket.upgrade().is_some_and(|stream| {
        let mut byte = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        matches!(stream.sock_ref().peek(&mut byte), Ok(n) if n > 0)
    })
}

/// After the connection ended on its own: if a request on it was upgraded (HTTP/1: the
/// socket now belongs to the upgrade's handler, a WebSocket say), it stays in flight until the
/// handler drops the socket; at the drain deadline the socket is shut down and the request
/// named. The handler learns that the drain started from the Drain phase's token, and can
/// send its close frame (see the module docs).
async fn hold_upgraded<T: Transport>(
    watch: &ConnWatch,
    socket: &std::sync::Weak<T>,
    stage: &mut watch::Receiver<Stage>,
) {
    if crate::state::lock(&watch.upgrades).is_empty() {
        return;
    }
    tokio::select! {
        () = watch.io_dropped.notified() => {}
        _ = stage.wait_for(|s| *s == Stage::Cut) => {
            if let Some(stream) = socket.upgrade() {
                // Both directions: the handler's next read ends, the peer sees the close now.
                let _ = stream.sock_ref().shutdown(std::net::Shutdown::Both);
            }
            name_upgrades(watch, "upgraded connection open");
        }
    }
    // Drops the in-flight guards.
    crate::state::lock(&watch.upgrades).clear();
}

/// Names every upgraded request of a connection cut at the deadline; how many were named.
fn name_upgrades(watch: &ConnWatch, what: &str) -> usize {
    let upgrades = std::mem::take(&mut *crate::state::lock(&watch.upgrades));
    for upgrade in &upgrades {
        watch
            .handle
            .shared
            .record_cut(format!("{} ({what} at the drain deadline)", upgrade.name));
    }
    upgrades.len()
}

fn log_end(watch: &ConnWatch, result: Result<(), BoxError>) -> bool {
    if let Err(error) = result {
        tracing::debug!(target: "finale", peer = %watch.peer, %error, "connection ended with an error");
    }
    true
}

/// The connection, while it is not cut.
fn live<C>(conn: Pin<&mut Option<C>>) -> Pin<&mut C> {
    conn.as_pin_mut()
        .expect("the connection is polled only until it is cut")
}

fn cut_connection<C>(mut conn: Pin<&mut Option<C>>, watch: &ConnWatch) -> bool {
    // Set before the drop: every request dropped with the connection names itself.
    watch.cutting.store(true, Ordering::Relaxed);
    conn.set(None);
    // Upgraded requests (a 101 not yet handed over, HTTP/2 extended CONNECT streams) are
    // named here: their responses have ended, so nothing else names them.
    let upgrades = name_upgrades(watch, "upgraded stream open");
    // A connection with requests in flight is named by them (HTTP/2 streams, on tasks of their
    // own, name themselves when they are dropped, a moment later); only one with none is named
    // here, so nothing is reported twice.
    // `active` first (Acquire, paired with the Release decrement): a stream that named itself
    // and then went inactive between the two loads is then seen as named.
    if upgrades == 0
        && watch.active.load(Ordering::Acquire) == 0
        && watch.named.load(Ordering::Relaxed) == 0
    {
        watch.handle.shared.record_cut(format!(
            "connection from {} (open at the drain deadline)",
            watch.peer
        ));
    }
    false
}
