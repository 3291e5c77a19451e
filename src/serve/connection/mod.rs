//! One connection's life on finale's server: opened (the TLS handshake first, if any) and
//! handed to hyper, driven through the drain (the idle grace, `Connection: close`, GOAWAY, slow
//! clients, the maximum age), an upgraded connection held until its handler lets go, and the
//! cut at the deadline.
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | the server's `Settings` and `Stage` as a connection sees them; a connection opened and handed to hyper (plain or TLS) |
//! | `handshake.rs` | the TLS handshake, bounded by its timeout and by the drain (feature `tls`) |
//! | `drive.rs` | the drive loop: serving, the drain delay, the idle grace, the drain, until the connection ends or is cut |
//! | `slow.rs` | the timing of slow clients: when the header-read timer is due, when it looks again; `after` |
//! | `cut.rs` | the end at the deadline: the cut and its names in the report, an upgraded connection held until then |
//! | `linger.rs` | the end of a connection hyper closed with the client's bytes unread: read and dropped first, so that the close is not a reset |

use std::future::Future;
use std::sync::Arc;
#[cfg(feature = "tls")]
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
use crate::serve::timers::SlowTimers;
use crate::serve::tower::ConnWatch;
use crate::serve::transport::{SocketReach, Transport};

mod cut;
mod drive;
#[cfg(feature = "tls")]
mod handshake;
mod linger;
mod slow;

use cut::{Abandoned, hold_upgraded};
use drive::drive;
#[cfg(feature = "tls")]
use handshake::handshake;
pub(super) use slow::after;

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
pub(super) struct LoopSettings {
    pub(super) idle_grace: Duration,
    pub(super) header_read_timeout: Duration,
    pub(super) max_connection_age: Option<Duration>,
    pub(super) goaway_on_announce: bool,
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

/// A fresh connection's socket as hyper will see it, and the connection task's reach to it.
fn open<T: Transport>(
    stream: T,
    watch: &Arc<ConnWatch>,
    settings: Settings,
    sniffed: u8,
) -> (ConnIo<T>, SocketReach<T>) {
    stream.prepare(settings.tcp_nodelay);
    let (read, reach) = stream.split();
    let io = ConnIo {
        read,
        watch: watch.clone(),
        sniffed,
        blocked: false,
    };
    (io, SocketReach::new(reach))
}

/// hyper serves `io` (a plain socket, or a TLS session over one) through the drain; an HTTP/1
/// upgrade's socket is held after.
fn serve_http<I, S, B, T>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    service: ConnService<S>,
    socket: SocketReach<T>,
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
        // Declared first, dropped last: when the task is aborted, hyper's connection (and the
        // requests it holds, which name themselves) goes before the upgrades are named.
        let mut abandoned = Abandoned {
            watch: &watch,
            socket: &socket,
            ended: false,
        };
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
            let upgraded = hold_upgraded(&watch, &socket, &mut stage).await;
            if !upgraded && drive::unread(&socket) {
                // Boxed: room in the task's future only for connections that linger.
                Box::pin(linger::linger(&socket, &mut stage)).await;
            }
        }
        abandoned.ended = true;
    }
}
