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
//!    [`goaway_on_announce`](HttpServer::goaway_on_announce)).
//! 2. **Drain starts**: connections already in the kernel's accept queue are accepted (they get
//!    an answer, not the reset that closing the listener gives them); then the listener is
//!    closed (new connections are refused). HTTP/2 connections get GOAWAY: streams the peer
//!    opened before the final GOAWAY are served, later ones are refused by h2 itself
//!    (`REFUSED_STREAM`, which clients retry). Connections not known to be HTTP/2 (HTTP/1, or a
//!    fresh one whose first request may be on its way) stay open for the
//!    [idle grace](HttpServer::idle_grace) after they last did something (accepted, or their
//!    last request ended): a request that arrives on one is served with `Connection: close` (a
//!    `503` only within the late margin of the deadline). A connection with nothing in flight
//!    is closed once its grace is over: at once if it has been idle for longer than that (its
//!    client is no likelier to use it in the next moment), and a client that never sent a
//!    complete request does not hold the drain (slow clients are bounded by the
//!    [header-read timeout](HttpServer::header_read_timeout) anyway). Upgraded connections (a
//!    WebSocket) count as in flight until their handler closes them (see
//!    [WebSockets](crate::axum#websockets)).
//! 3. **Drain deadline** minus the [cut margin](HttpServer::cut_margin): connections still open
//!    are closed; each request still in flight on them is named in the report by method and
//!    path, never the query (`GET /events from 127.0.0.1:5555 (stream open at the drain
//!    deadline)`), which makes the exit status
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
//!   the socket weakly (to shut it down at the cut) and woken when the handler drops it.

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
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use pin_project_lite::pin_project;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::Layer;
use tower::layer::util::{Identity, Stack};

use crate::Finale;
use crate::config::ConfigError;
use crate::phase::Phase;
use crate::serve::tower::{
    Admission, ConnWatch, DrainBody, LayerShared, Peer, Rejection, Responder, ResponseFuture,
    TooLate, admit,
};
use crate::serve::transport::{Acceptor, TcpAcceptor, Transport, is_connection_error};
#[cfg(unix)]
use crate::serve::unix;
use crate::task::{Task, TaskContext};
use crate::track::InFlight;

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// How long connections not known to be HTTP/2 stay open after the drain started, so that a
/// request on its way is served (with `Connection: close`) instead of reset: 1 second.
pub const DEFAULT_IDLE_GRACE: Duration = Duration::from_secs(1);
/// How long a client may take to send a request's headers: 10 seconds. A slow or stalled
/// client is disconnected after it, whatever the drain is doing.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long before the Drain phase's deadline the remaining connections are cut: 100 ms.
pub const DEFAULT_CUT_MARGIN: Duration = Duration::from_millis(100);

/// Where a server listens: a socket address to bind (inside the server's task, so that a bind
/// error fails graceful start) or a listener bound already; on Unix also a Unix domain socket,
/// by path ([`Listen::unix`]) or bound already.
///
/// # Examples
///
/// ```
/// use finale::axum::Listen;
///
/// let by_address: Listen = "127.0.0.1:3000".parse::<std::net::SocketAddr>().unwrap().into();
/// let bound: Listen = std::net::TcpListener::bind("127.0.0.1:0").unwrap().into();
/// # #[cfg(unix)]
/// let unix = Listen::unix("/run/my-service/http.sock");
/// # let _ = (by_address, bound);
/// # #[cfg(unix)]
/// # let _ = unix;
/// ```
///
/// # Unix domain sockets
///
/// A Unix socket server drains exactly as a TCP one (the accept-queue sweep, the idle grace,
/// `Connection: close`, upgrades, the cut); what is TCP's only
/// ([`tcp_nodelay`](HttpServer::tcp_nodelay), the backlog shrink before the sweep) does not
/// apply. Handlers see who connected as the frameworks' own servers tell it for a
/// `UnixListener`: axum's `ConnectInfo<tokio::net::unix::SocketAddr>` (what `axum::serve` on
/// a `tokio::net::UnixListener` gives), tonic's
/// `tonic::transport::server::UdsConnectInfo` (the peer's address and credentials; its
/// `Request::remote_addr()` is `None`, as with tonic's own server). A client's socket rarely has a path, so the report
/// names a request cut at the deadline by the server's socket and the client's process id:
/// `GET /events from pid 4321 on unix:/run/app.sock (stream open at the drain deadline)`.
///
/// **The socket file.** A server given a path binds it in its task, like an address:
///
/// - A file left at the path by an instance that is gone (a socket nothing accepts on: the
///   connect finale tries is refused) is removed, with a log line, and the path is bound.
///   Telling it stale and removing it happen under an exclusive lock on `<path>.lock`
///   (created next to the socket and left there), so two instances starting at once on one
///   stale file almost never both start (one binds, the other finds it live); a narrow race
///   remains (seen in 1 of 300 rounds under heavy load): do not start two on one path. A relative path is made
///   absolute at the bind.
/// - If something still accepts on it (another instance, another program), or the path is
///   not a socket, nothing is removed: the bind fails with
///   [`AddrInUse`](std::io::ErrorKind::AddrInUse) and a message that says which, and graceful
///   start fails like a TCP port in use.
/// - The file is removed when the server stops accepting (the Drain phase, or the server's
///   end), unless another file has replaced it meanwhile (it is compared by inode), or the
///   socket went to an upgrade's successor. A listener you bound yourself, or one passed to
///   the process (systemd's `ListenStream=/path`, an upgrade's hand-off), is never removed:
///   its file belongs to whoever created it. A shutdown that abandons an upgrade in progress
///   leaves the file too (the successor may have taken the socket); the next start removes
///   it as stale.
///
/// With the `systemd` feature, a server given a path serves a Unix socket passed to the
/// process under its own name instead of binding (as with an address), which is also how
/// an [upgrade](https://docs.rs/finale/latest/finale/upgrade/) hands a Unix socket server to
/// its successor without refusing a connection.
#[derive(Debug)]
pub struct Listen(ListenKind);

#[derive(Debug)]
enum ListenKind {
    Addr(SocketAddr),
    Std(std::net::TcpListener),
    Tokio(TcpListener),
    #[cfg(unix)]
    UnixPath(std::path::PathBuf),
    #[cfg(unix)]
    UnixStd(std::os::unix::net::UnixListener),
    #[cfg(unix)]
    UnixTokio(tokio::net::UnixListener),
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

/// A Unix domain socket bound already (made non-blocking by the server); its file is never
/// removed by finale.
#[cfg(unix)]
impl From<std::os::unix::net::UnixListener> for Listen {
    fn from(listener: std::os::unix::net::UnixListener) -> Self {
        Self(ListenKind::UnixStd(listener))
    }
}

/// A Unix domain socket bound already; its file is never removed by finale.
#[cfg(unix)]
impl From<tokio::net::UnixListener> for Listen {
    fn from(listener: tokio::net::UnixListener) -> Self {
        Self(ListenKind::UnixTokio(listener))
    }
}

impl Listen {
    /// A Unix domain socket at `path`, bound in the server's task. A stale socket file is
    /// removed first, a live one fails the start, and the file finale created is removed
    /// when the server stops: see [Unix domain sockets](Listen#unix-domain-sockets).
    #[cfg(unix)]
    pub fn unix(path: impl Into<std::path::PathBuf>) -> Self {
        Self(ListenKind::UnixPath(path.into()))
    }

    /// The listener, and whether finale bound it itself (no other process or descriptor
    /// shares it). A server given an address serves a socket passed to the process under its
    /// own name instead (systemd socket activation, an upgrade's hand-off), if there is one.
    async fn bind(self, name: &str) -> io::Result<Bound> {
        let std_listener = match self.0 {
            ListenKind::Addr(addr) => {
                #[cfg(all(feature = "systemd", unix))]
                if let Some(passed) = crate::platform::systemd::take_named_if_passed(name) {
                    let local = passed.local_addr()?;
                    if addr.port() != 0 && local != addr {
                        tracing::warn!(
                            target: "finale",
                            server = name,
                            configured = %addr,
                            %local,
                            "serving the socket passed as {name:?}, not the configured address \
                             (a new address needs a restart, not an upgrade)"
                        );
                    } else {
                        tracing::info!(
                            target: "finale",
                            server = name,
                            %local,
                            "serving the socket passed as {name:?} instead of binding"
                        );
                    }
                    passed.set_nonblocking(true)?;
                    return Bound::tcp(TcpListener::from_std(passed)?, false);
                }
                let _ = name;
                return Bound::tcp(TcpListener::bind(addr).await?, true);
            }
            ListenKind::Std(listener) => listener,
            ListenKind::Tokio(listener) => return Bound::tcp(listener, false),
            #[cfg(unix)]
            ListenKind::UnixPath(path) => {
                #[cfg(feature = "systemd")]
                if let Some(passed) = crate::platform::systemd::take_unix_named_if_passed(name) {
                    let local = passed.local_addr()?;
                    if local.as_pathname() != Some(path.as_path()) {
                        tracing::warn!(
                            target: "finale",
                            server = name,
                            configured = %path.display(),
                            local = ?local,
                            "serving the socket passed as {name:?}, not the configured path \
                             (a new path needs a restart, not an upgrade)"
                        );
                    } else {
                        tracing::info!(
                            target: "finale",
                            server = name,
                            path = %path.display(),
                            "serving the socket passed as {name:?} instead of binding"
                        );
                    }
                    passed.set_nonblocking(true)?;
                    return unix::UnixAcceptor::new(
                        tokio::net::UnixListener::from_std(passed)?,
                        None,
                    )
                    .map(Bound::Unix);
                }
                let (listener, file) = unix::bind(&path, name)?;
                return unix::UnixAcceptor::new(listener, Some(file)).map(Bound::Unix);
            }
            #[cfg(unix)]
            ListenKind::UnixStd(listener) => {
                listener.set_nonblocking(true)?;
                return unix::UnixAcceptor::new(
                    tokio::net::UnixListener::from_std(listener)?,
                    None,
                )
                .map(Bound::Unix);
            }
            #[cfg(unix)]
            ListenKind::UnixTokio(listener) => {
                return unix::UnixAcceptor::new(listener, None).map(Bound::Unix);
            }
        };
        std_listener.set_nonblocking(true)?;
        Bound::tcp(TcpListener::from_std(std_listener)?, false)
    }
}

/// A bound listener, of either transport.
enum Bound {
    Tcp(TcpAcceptor),
    #[cfg(unix)]
    Unix(unix::UnixAcceptor),
}

impl Bound {
    fn tcp(listener: TcpListener, owned: bool) -> io::Result<Self> {
        let local = listener.local_addr()?;
        Ok(Self::Tcp(TcpAcceptor {
            listener,
            local,
            owned,
        }))
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
/// | [`idle_grace`](HttpServer::idle_grace) | [`DEFAULT_IDLE_GRACE`] |
/// | [`cut_margin`](HttpServer::cut_margin) | [`DEFAULT_CUT_MARGIN`] |
/// | [`header_read_timeout`](HttpServer::header_read_timeout) | [`DEFAULT_HEADER_READ_TIMEOUT`] |
/// | [`goaway_on_announce`](HttpServer::goaway_on_announce) | off |
/// | [`tcp_nodelay`](HttpServer::tcp_nodelay) | on |
/// | [`max_connection_age`](HttpServer::max_connection_age) | off |
#[derive(Debug)]
#[must_use = "a server does nothing until `serve` is called"]
pub struct HttpServer<L = Identity> {
    name: Cow<'static, str>,
    layer: L,
    settings: Settings,
    rejection: Rejection,
    configure: Option<Configure>,
    #[cfg(feature = "tls")]
    tls: Option<crate::tls::TlsConfig>,
}

impl HttpServer {
    /// A server named `name` (the name of its task in the report).
    pub fn new(name: impl Into<Cow<'static, str>>) -> Self {
        Self {
            name: name.into(),
            layer: Identity::new(),
            settings: Settings {
                idle_grace: DEFAULT_IDLE_GRACE,
                cut_margin: DEFAULT_CUT_MARGIN,
                header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
                goaway_on_announce: false,
                tcp_nodelay: true,
                max_connection_age: None,
                #[cfg(feature = "tls")]
                tls_handshake_timeout: crate::tls::DEFAULT_TLS_HANDSHAKE_TIMEOUT,
            },
            rejection: Rejection::default(),
            configure: None,
            #[cfg(feature = "tls")]
            tls: None,
        }
    }
}

impl<L> HttpServer<L> {
    /// Adds a tower layer around the service, **outside** finale's drain answers: the requests
    /// finale answers itself (the [`Rejection`] of a request too late in the drain, the `500` of
    /// a handler that panicked) pass through it like any other, so the service's tracing,
    /// metrics, CORS or compression layers see them. Layers on the service itself (axum's
    /// `Router::layer`) sit inside and see only what reached the service.
    ///
    /// Either way the tracking stays outermost: a request is in flight from the moment it is
    /// read until the last byte of its response, whatever the layers do, and a request cut at
    /// the deadline is named in the report. Called more than once, the last layer added is the
    /// outermost (as `tower::ServiceBuilder::layer`).
    ///
    /// A layer here holds finale's answers as it holds any request: one that waits (a
    /// concurrency or rate limit) delays a rejection too, and one still waiting at the drain
    /// deadline is cut and named like any other request, so put limits on the service itself,
    /// where a request too late in the drain is answered without waiting for the service to be
    /// ready. A layer that answers by itself (a timeout, an auth check, a load shed) answers as
    /// it would anywhere, and only a rejection finale answered is counted as one. A layer that
    /// replaces the request drops finale's mark on it: a request too late in the drain is then
    /// served instead of rejected.
    ///
    /// ```
    /// use finale::tower::DrainBody;
    /// use tower::util::MapResponseLayer;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let finale = finale::Finale::builder().read_env(false).build().unwrap();
    /// let app = axum::Router::new().route("/", axum::routing::get(|| async { "hello" }));
    /// // Sees every response, finale's own 503s and 500s included (the body is finale's
    /// // `DrainBody` around the service's).
    /// finale::axum::HttpServer::new("http")
    ///     .layer(MapResponseLayer::new(
    ///         |response: http::Response<DrainBody<axum::body::Body>>| {
    ///             let _status = response.status(); // count it, log it, ...
    ///             response
    ///         },
    ///     ))
    ///     .serve(&finale, ([127, 0, 0, 1], 0), app)
    ///     .unwrap();
    /// # }
    /// ```
    pub fn layer<N>(self, layer: N) -> HttpServer<Stack<N, L>> {
        HttpServer {
            name: self.name,
            layer: Stack::new(layer, self.layer),
            settings: self.settings,
            rejection: self.rejection,
            configure: self.configure,
            #[cfg(feature = "tls")]
            tls: self.tls,
        }
    }

    /// Serves HTTPS with `config` (feature `tls`; see [`finale::tls`](crate::tls)). The drain
    /// is the same; a connection still in its handshake is treated like a fresh one.
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub fn tls(mut self, config: crate::tls::TlsConfig) -> Self {
        self.tls = Some(config);
        self
    }

    /// How long a client may take over its TLS handshake
    /// ([`DEFAULT_TLS_HANDSHAKE_TIMEOUT`](crate::tls::DEFAULT_TLS_HANDSHAKE_TIMEOUT)).
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub fn tls_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.settings.tls_handshake_timeout = timeout;
        self
    }

    /// The response to requests that arrive once the drain started.
    pub fn rejection(mut self, rejection: Rejection) -> Self {
        self.rejection = rejection;
        self
    }

    /// How long connections not known to be HTTP/2 (HTTP/1 keep-alive, and fresh ones whose
    /// first request may still be on its way) stay open after they last did something
    /// (accepted, or their last request ended), once the drain started, so that a request
    /// racing the close is served, with `Connection: close`, instead of reset. After it, a
    /// connection with no request in flight is closed: one idle for longer than the grace when
    /// the drain starts is closed at once (a client that never sent a complete request does not
    /// hold the drain either). The drain ends earlier if every connection has closed.
    pub fn idle_grace(mut self, grace: Duration) -> Self {
        self.settings.idle_grace = grace;
        self
    }

    /// Whether HTTP/2 connections get GOAWAY already at the Announce phase (the drain delay),
    /// not only when the drain starts. Off by default.
    ///
    /// On, it moves HTTP/2 clients behind an L4 proxy (which balances connections, not
    /// requests) to another instance while this one still serves. A client that connects
    /// directly reconnects to this same instance, and a few of its calls that race each GOAWAY
    /// are cancelled by its own h2 stack (tonic's client does not retry them): measured with 16
    /// concurrent unary loops, it added `h2 protocol error`s that draining alone does not give.
    pub fn goaway_on_announce(mut self, goaway: bool) -> Self {
        self.settings.goaway_on_announce = goaway;
        self
    }

    /// Every other hyper setting: `configure` gets hyper-util's connection builder (HTTP/1 and
    /// HTTP/2) after finale has set its own (the timers, the header-read timeout, extended
    /// CONNECT), so it may change those too. For example HTTP/2 limits and keep-alive pings:
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let server = finale::axum::HttpServer::new("http").hyper(|builder| {
    ///     builder
    ///         .http2()
    ///         .max_concurrent_streams(64)
    ///         .keep_alive_interval(Duration::from_secs(20));
    ///     builder.http1().max_buf_size(64 * 1024);
    /// });
    /// # let _ = server;
    /// ```
    ///
    /// What finale's own accept loop decides is not there: concurrency limits (wrap the whole
    /// service in `tower::limit::ConcurrencyLimit`; axum's `Router::layer` does not keep its
    /// permit; a limit given to [`layer`](HttpServer::layer) would hold finale's own answers
    /// too), connection limits (at the load balancer or the OS), TLS
    /// ([`tls`](HttpServer::tls), feature `tls`) and the drain.
    pub fn hyper(
        mut self,
        configure: impl Fn(&mut auto::Builder<TokioExecutor>) + Send + Sync + 'static,
    ) -> Self {
        self.configure = Some(Configure(Arc::new(configure)));
        self
    }

    /// How long an HTTP/2 connection (gRPC) may live: once it is this old it gets GOAWAY, its
    /// streams finish, and the client opens a new connection, which an L4 load balancer can
    /// send elsewhere (tonic's `Server::max_connection_age`). Off by default. HTTP/1
    /// connections are left alone: a load balancer balances their requests already, and closing
    /// an idle one would race its client's next request.
    pub fn max_connection_age(mut self, age: Duration) -> Self {
        self.settings.max_connection_age = Some(age);
        self
    }

    /// Whether accepted connections get `TCP_NODELAY` (on by default: a response goes out as
    /// soon as it is written, not when the kernel has coalesced enough of it; off trades that
    /// latency for fewer packets under heavy HTTP/2 multiplexing).
    pub fn tcp_nodelay(mut self, nodelay: bool) -> Self {
        self.settings.tcp_nodelay = nodelay;
        self
    }

    /// How long a client may take to send a request's headers (hyper's header-read timeout):
    /// a slow or stalled client is disconnected after it.
    pub fn header_read_timeout(mut self, timeout: Duration) -> Self {
        self.settings.header_read_timeout = timeout;
        self
    }

    /// How long before the Drain phase's deadline the remaining connections are cut.
    pub fn cut_margin(mut self, margin: Duration) -> Self {
        self.settings.cut_margin = margin;
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
        L: Layer<Responder<S>>,
        L::Service:
            tower::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
        <L::Service as tower::Service<Request<Incoming>>>::Future: Send + 'static,
        <L::Service as tower::Service<Request<Incoming>>>::Error: Into<BoxError>,
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let listen = listen.into();
        let HttpServer {
            name,
            layer,
            settings,
            rejection,
            configure,
            #[cfg(feature = "tls")]
            tls,
        } = self;
        #[cfg(feature = "tls")]
        let tls = tls.map(|config| tokio_rustls::TlsAcceptor::from(config.config));
        #[cfg(not(feature = "tls"))]
        let tls = None;
        let shared = Arc::new(LayerShared {
            handle: finale.handle(),
            rejection,
            cut_margin: settings.cut_margin,
        });
        let service = layer.layer(Responder::new(service, shared.clone()));
        finale.spawn(Task::service(name, move |ctx| {
            run(ctx, listen, service, shared, settings, tls, configure)
        }))
    }
}

/// hyper-util's connection builder, as finale's servers use it.
type ConnBuilder = auto::Builder<TokioExecutor>;

/// The user's hyper settings ([`HttpServer::hyper`]).
#[derive(Clone)]
struct Configure(Arc<dyn Fn(&mut ConnBuilder) + Send + Sync>);

impl fmt::Debug for Configure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Configure(..)")
    }
}

#[derive(Clone, Copy, Debug)]
struct Settings {
    idle_grace: Duration,
    cut_margin: Duration,
    header_read_timeout: Duration,
    goaway_on_announce: bool,
    tcp_nodelay: bool,
    max_connection_age: Option<Duration>,
    #[cfg(feature = "tls")]
    tls_handshake_timeout: Duration,
}

/// The TLS acceptor of an HTTPS server (nothing without the `tls` feature).
#[cfg(feature = "tls")]
type Tls = Option<tokio_rustls::TlsAcceptor>;
#[cfg(not(feature = "tls"))]
type Tls = Option<std::convert::Infallible>;

/// Where the server is, as every connection task sees it: one `watch` channel for all of them
/// (a receiver per connection, no per-connection channel or map entry).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
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

async fn run<S, B>(
    ctx: TaskContext,
    listen: Listen,
    service: S,
    shared: Arc<LayerShared>,
    settings: Settings,
    tls: Tls,
    configure: Option<Configure>,
) -> io::Result<()>
where
    S: tower::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    match listen.bind(ctx.name()).await? {
        Bound::Tcp(acceptor) => {
            serve_on(ctx, acceptor, service, shared, settings, tls, configure).await
        }
        #[cfg(unix)]
        Bound::Unix(acceptor) => {
            serve_on(ctx, acceptor, service, shared, settings, tls, configure).await
        }
    }
}

/// The accept loop and the drain, on one transport's listener.
async fn serve_on<A, S, B>(
    ctx: TaskContext,
    acceptor: A,
    service: S,
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
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .enable_connect_protocol();
    if let Some(Configure(configure)) = &configure {
        configure(&mut builder);
    }
    let (stage_tx, stage_rx) = watch::channel(Stage::Serving);
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
            };
            // (A `Copy` type without the `tls` feature.)
            #[cfg_attr(not(feature = "tls"), allow(clippy::clone_on_copy))]
            let tls = tls.clone();
            conns.spawn(serve_connection(
                builder.clone(),
                stream,
                service,
                stage_rx.clone(),
                settings,
                tls,
            ));
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
        let end = now + settings.idle_grace;
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

async fn serve_connection<T, S, B>(
    builder: auto::Builder<TokioExecutor>,
    stream: T,
    service: ConnService<S>,
    mut stage: watch::Receiver<Stage>,
    settings: Settings,
    tls: Tls,
) where
    T: Transport,
    S: tower::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    stream.prepare(settings.tcp_nodelay);
    let watch = service.conn.clone();
    let stream = Arc::new(stream);
    let socket = Arc::downgrade(&stream);
    let io = ConnIo {
        stream,
        watch: watch.clone(),
    };
    let ended = match tls {
        #[cfg(feature = "tls")]
        Some(acceptor) => {
            let Some(io) = handshake(&acceptor, io, &watch, &mut stage, settings).await else {
                return;
            };
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(io), service)
                .into_owned();
            drive(Box::pin(conn), &watch, &socket, &mut stage, settings).await
        }
        #[cfg(not(feature = "tls"))]
        Some(never) => match never {},
        None => {
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(io), service)
                .into_owned();
            drive(Box::pin(conn), &watch, &socket, &mut stage, settings).await
        }
    };
    if ended {
        hold_upgraded(&watch, &socket, &mut stage).await;
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
        tokio::time::sleep_until(grace_until.min(watch.last_active() + settings.idle_grace)).await;
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
    mut conn: Pin<Box<Connection<I, S>>>,
    watch: &ConnWatch,
    socket: &std::sync::Weak<T>,
    stage: &mut watch::Receiver<Stage>,
    settings: Settings,
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
    // GOAWAY sent already (an HTTP/2 connection moved during the drain delay, or old enough).
    let mut moved = false;
    // The connection age was looked at (once).
    let mut aged_checked = settings.max_connection_age.is_none();
    let grace_until = loop {
        match *stage.borrow_and_update() {
            Stage::Serving => {}
            Stage::Announced => {
                if settings.goaway_on_announce && !moved && watch.http2.load(Ordering::Relaxed) {
                    // The peer learns to open new streams elsewhere while this connection
                    // still serves the ones it has.
                    conn.as_mut().graceful_shutdown();
                    moved = true;
                }
            }
            Stage::Draining { grace_until } => break grace_until,
            Stage::Cut => return cut_connection(conn, watch),
        }
        let aged = async {
            match settings.max_connection_age {
                Some(age) if !aged_checked && !moved => {
                    tokio::time::sleep_until(watch.accepted() + age).await;
                }
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            result = conn.as_mut() => return log_end(watch, result),
            changed = stage.changed() => if changed.is_err() {
                // The accept loop is gone (aborted): close at once.
                return cut_connection(conn, watch);
            },
            () = aged => {
                aged_checked = true;
                if watch.http2.load(Ordering::Relaxed) {
                    // Old enough: GOAWAY, the streams it has finish, the client reconnects
                    // (to another instance, behind an L4 balancer).
                    conn.as_mut().graceful_shutdown();
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
        let mut until = grace_until.min(watch.last_active() + settings.idle_grace);
        if until <= Instant::now() && unread(socket) {
            until = grace_until;
        }
        if until > Instant::now() {
            tokio::select! {
                result = conn.as_mut() => return log_end(watch, result),
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
        conn.as_mut().graceful_shutdown();
    }
    tokio::select! {
        result = conn.as_mut() => log_end(watch, result),
        _ = stage.wait_for(|s| *s == Stage::Cut) => cut_connection(conn, watch),
    }
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

/// A served connection's socket: a TCP or Unix stream the server's connection task can still
/// reach (weakly) after an HTTP/1 upgrade handed it to the handler, to shut it down at the
/// drain deadline; its drop tells that task the upgraded connection ended.
struct ConnIo<T> {
    stream: Arc<T>,
    watch: Arc<ConnWatch>,
}

impl<T> Drop for ConnIo<T> {
    fn drop(&mut self) {
        self.watch.io_dropped.notify_one();
    }
}

impl<T: Transport> tokio::io::AsyncRead for ConnIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            ready!(self.stream.poll_read_ready(cx))?;
            // As tokio's own `TcpStream`: a short read means the socket is drained, so the
            // readiness is cleared (the closure says WouldBlock) and the next read waits for the
            // reactor instead of trying (and failing) once more.
            let mut read = None;
            let result = self.stream.try_io(tokio::io::Interest::READABLE, || {
                let wanted = buf.remaining();
                let n = self.stream.try_read_buf(buf)?;
                read = Some(n);
                if n > 0 && n < wanted {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(())
            });
            match (result, read) {
                (_, Some(_)) | (Ok(()), None) => return Poll::Ready(Ok(())),
                (Err(e), None) if e.kind() == io::ErrorKind::WouldBlock => {}
                (Err(e), None) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl<T: Transport> ConnIo<T> {
    /// One write of `total` bytes by `write`. As tokio's own `TcpStream`: a partial write means
    /// the send buffer is full, so the readiness is cleared (the closure says WouldBlock) and the
    /// next write waits for the reactor; the bytes written are still reported.
    fn poll_write_with(
        &self,
        cx: &mut Context<'_>,
        total: usize,
        mut write: impl FnMut(&T) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.stream.poll_write_ready(cx))?;
            let mut written = None;
            let result = self.stream.try_io(tokio::io::Interest::WRITABLE, || {
                let n = write(&self.stream)?;
                written = Some(n);
                if n > 0 && n < total {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(())
            });
            match (result, written) {
                (_, Some(n)) => return Poll::Ready(Ok(n)),
                (Err(e), None) if e.kind() == io::ErrorKind::WouldBlock => {}
                (Err(e), None) => return Poll::Ready(Err(e)),
                (Ok(()), None) => return Poll::Ready(Ok(0)),
            }
        }
    }
}

impl<T: Transport> tokio::io::AsyncWrite for ConnIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_with(cx, buf.len(), |stream| stream.try_write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let total = bufs.iter().map(|b| b.len()).sum();
        self.poll_write_with(cx, total, |stream| stream.try_write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.stream.sock_ref().shutdown(std::net::Shutdown::Write))
    }
}

fn log_end(watch: &ConnWatch, result: Result<(), BoxError>) -> bool {
    if let Err(error) = result {
        tracing::debug!(target: "finale", peer = %watch.peer, %error, "connection ended with an error");
    }
    true
}

fn cut_connection<C>(conn: C, watch: &ConnWatch) -> bool {
    // Set before the drop: every request dropped with the connection names itself.
    watch.cutting.store(true, Ordering::Relaxed);
    drop(conn);
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

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        // Who is on the other end, as the frameworks' own servers tell their handlers: axum's
        // `ConnectInfo<SocketAddr>` extractor, tonic's `Request::remote_addr()`.
        // On a Unix socket, what they give for a `UnixListener`: axum's
        // `ConnectInfo<tokio::net::unix::SocketAddr>`, tonic's `UdsConnectInfo`.
        match &self.conn.peer {
            Peer::Tcp { peer, local } => {
                #[cfg(feature = "axum")]
                req.extensions_mut()
                    .insert(::axum::extract::ConnectInfo(*peer));
                #[cfg(feature = "tonic")]
                req.extensions_mut()
                    .insert(::tonic::transport::server::TcpConnectInfo {
                        local_addr: Some(*local),
                        remote_addr: Some(*peer),
                    });
                let _ = (peer, local);
            }
            #[cfg(unix)]
            Peer::Unix { addr, cred, .. } => {
                #[cfg(feature = "axum")]
                req.extensions_mut().insert(::axum::extract::ConnectInfo(
                    tokio::net::unix::SocketAddr::clone(addr),
                ));
                #[cfg(feature = "tonic")]
                req.extensions_mut()
                    .insert(::tonic::transport::server::UdsConnectInfo {
                        peer_addr: Some(addr.clone()),
                        peer_cred: *cred,
                    });
                let _ = (addr, cred);
            }
        }
        match admit(self.in_flight, &self.shared, Some(&self.conn), &req) {
            Admission::Rejected(response) => ResponseFuture::rejected(response),
            Admission::Admitted(admitted) => {
                if admitted.too_late {
                    // Answered by the `Responder`, inside the user's layers.
                    req.extensions_mut().insert(TooLate);
                }
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
