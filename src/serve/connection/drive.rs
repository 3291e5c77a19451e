//! The drive loop of one connection: served while the server serves, moved politely once the
//! shutdown is announced (GOAWAY), kept for its idle grace when the drain starts, then closed
//! after what it has in flight, bounded throughout against slow clients, until it ends or is
//! cut at the deadline.

use std::pin::Pin;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::serve::conn_service::ConnService;
use crate::serve::gate::Gate;
use crate::serve::timers::SlowTimers;
use crate::serve::tower::ConnWatch;
use crate::serve::transport::{SocketReach, Transport};

use super::cut::cut_connection;
use super::slow::{rearm, slow_due};
use super::{BoxError, LoopSettings, Stage, after};

pub(super) type Connection<I, S> =
    auto::UpgradeableConnection<'static, TokioIo<I>, ConnService<S>, TokioExecutor>;

/// Serves one connection through the drain; `true` if it ended on its own (not cut), which
/// after an HTTP/1 upgrade means the socket now belongs to the upgrade's handler.
pub(super) async fn drive<I, S, B, T>(
    mut conn: Pin<&mut Option<Connection<I, S>>>,
    watch: &ConnWatch,
    socket: &SocketReach<T>,
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
            if !waiting && !watch.write_blocked.load(Ordering::Relaxed) {
                // Nothing in flight after the grace (idle, or a client that never sent a
                // complete request) and nothing left to write: this connection holds nothing,
                // close it.
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

/// Whether the connection is known to be HTTP/2: by a request, or before any by its whole
/// preface or its TLS ALPN.
fn known_http2(watch: &ConnWatch) -> bool {
    watch.http2.load(Ordering::Relaxed) || watch.h2_preface.load(Ordering::Relaxed)
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
pub(super) fn unread<T: Transport>(socket: &SocketReach<T>) -> bool {
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    matches!(socket.get().sock_ref().peek(&mut byte), Ok(n) if n > 0)
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
