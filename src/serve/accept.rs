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
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::layer::util::{Identity, Stack};

use crate::Finale;
use crate::config::ConfigError;
use crate::phase::Phase;
use crate::serve::conn_service::ConnService;
#[cfg(feature = "hyper")]
pub(crate) use crate::serve::conn_service::HyperToTower;
#[cfg(feature = "tls")]
use crate::serve::connection::serve_tls;
use crate::serve::connection::{BoxError, Settings, Stage, after, serve_plain};
use crate::serve::listening::{BindError, Binding, Listening, LocalAddr};
use crate::serve::timers::SlowTimers;
use crate::serve::tower::{ConnWatch, LayerShared, Peer, Rejection, Responder, ServerLayers};
use crate::serve::transport::{Acceptor, TcpAcceptor, is_connection_error};
#[cfg(unix)]
use crate::serve::unix;
use crate::task::{Task, TaskContext};

/// How long connections not known to be HTTP/2 stay open after the drain started, so that a
/// request on its way is served (with `Connection: close`) instead of reset: 1 second.
pub const DEFAULT_IDLE_GRACE: Duration = Duration::from_secs(1);
/// How long a client may take to send a request's headers: 10 seconds. A slow or stalled
/// client (not known to be HTTP/2) is disconnected after it, whatever the drain is doing (see
/// [`HttpServer::header_read_timeout`]).
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long before the Drain phase's deadline the remaining connections are cut: 100 ms.
pub const DEFAULT_CUT_MARGIN: Duration = Duration::from_millis(100);

/// Where a server listens: an address to bind (inside the server's task, so that a bind error
/// fails graceful start) or a listener bound already; on Unix also a Unix domain socket, by
/// path ([`Listen::unix`]) or bound already.
///
/// An address is a [`SocketAddr`], `([0, 0, 0, 0], 3000)`, or a `"host:port"` string
/// (`"localhost:3031"`, `"127.0.0.1:0"`, `"[::1]:8080"`, `"0.0.0.0:3000"`): the string is
/// resolved and bound in the server's task, trying each address the name resolves to, as
/// `TcpListener::bind` does, and listening on the first that binds (one socket, not one per
/// address). A string that does not resolve, has no port, or whose port is in use on every
/// address it resolves to fails the start with a [`BindError`](crate::axum::BindError) naming
/// it (exit code 3). A name resolving to several addresses (`localhost` to `127.0.0.1` and
/// `::1`) whose port is taken on the first binds the next one: give an IP address to listen on
/// exactly one, and to fail the start when its port is in use.
/// A string is never a Unix socket path: use [`Listen::unix`].
///
/// # Examples
///
/// ```
/// use finale::axum::Listen;
///
/// let by_name: Listen = "localhost:3031".into();
/// let from_env: Listen = std::env::var("BIND_ADDRESS").unwrap_or("[::1]:0".into()).into();
/// let by_address: Listen = "127.0.0.1:3000".parse::<std::net::SocketAddr>().unwrap().into();
/// let bound: Listen = std::net::TcpListener::bind("127.0.0.1:0").unwrap().into();
/// # #[cfg(unix)]
/// let unix = Listen::unix("/run/my-service/http.sock");
/// # let _ = (by_name, from_env, by_address, bound);
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
    /// `"host:port"`, resolved at the bind.
    Host(String),
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

/// `"host:port"`: resolved and bound in the server's task.
impl From<&str> for Listen {
    fn from(addr: &str) -> Self {
        Self(ListenKind::Host(addr.to_owned()))
    }
}

/// `"host:port"`: resolved and bound in the server's task.
impl From<String> for Listen {
    fn from(addr: String) -> Self {
        Self(ListenKind::Host(addr))
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

    /// The address as given, for a [`BindError`].
    fn describe(&self) -> String {
        match &self.0 {
            ListenKind::Addr(addr) => addr.to_string(),
            ListenKind::Host(host) => host.clone(),
            ListenKind::Std(l) => l
                .local_addr()
                .map_or("a TCP listener".into(), |a| a.to_string()),
            ListenKind::Tokio(l) => l
                .local_addr()
                .map_or("a TCP listener".into(), |a| a.to_string()),
            #[cfg(unix)]
            ListenKind::UnixPath(path) => format!("unix:{}", path.display()),
            #[cfg(unix)]
            ListenKind::UnixStd(_) | ListenKind::UnixTokio(_) => "a Unix listener".into(),
        }
    }

    /// The listener, and whether finale bound it itself (no other process or descriptor
    /// shares it). A server given an address serves a socket passed to the process under its
    /// own name instead (systemd socket activation, an upgrade's hand-off), if there is one.
    async fn bind(self, name: &str) -> io::Result<Bound> {
        let std_listener = match self.0 {
            ListenKind::Host(host) => {
                #[cfg(all(feature = "systemd", unix))]
                if let Some(passed) = crate::platform::systemd::take_named_if_passed(name) {
                    tracing::info!(
                        target: "finale",
                        server = name,
                        configured = %host,
                        local = %passed.local_addr()?,
                        "serving the socket passed as {name:?} instead of binding"
                    );
                    passed.set_nonblocking(true)?;
                    return Bound::tcp(TcpListener::from_std(passed)?, false);
                }
                // Resolves, then tries each address in turn.
                return Bound::tcp(TcpListener::bind(host.as_str()).await?, true);
            }
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
    ///
    /// # Caveats
    ///
    /// Closing an idle HTTP/1 connection always leaves a window: a request the client sends as
    /// the close happens is reset (the client sees the connection end without an answer). A
    /// client that sends on a fixed period equal to the grace (a poller every second, with the
    /// default) aims at that window: seen 4 times in 1,460 upgrades with a 1 s poller, never
    /// with periods of 0.5, 0.98, 1.02 or 1.5 s. Pick a grace apart from your clients' periods.
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
    /// HTTP/2) after finale has set its own (the timers, hyper's own header-read timeout off:
    /// finale's [`header_read_timeout`](HttpServer::header_read_timeout) bounds slow clients;
    /// extended CONNECT), so it may change those too. For example HTTP/2 limits and keep-alive pings:
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
    /// send elsewhere (tonic's `Server::max_connection_age`). Off by default. A connection
    /// known to be HTTP/2 before its first request (its whole preface, or its TLS ALPN `h2`)
    /// counts, idle or not; one whose version is not known yet when it reaches the age is left
    /// alone. HTTP/1 connections are left alone: a load balancer balances their requests
    /// already, and closing an idle one would race its client's next request. An age too large
    /// for the clock (`Duration::MAX`) means none.
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

    /// How long a client may take to send a request's headers: a connection not known to be
    /// HTTP/2, with no request in flight, that has not sent a complete request head within
    /// this time after it last did something (accepted, or its last request ended) is closed,
    /// whatever the drain is doing: a silent one, a partial head, a partial HTTP/2 preface. An
    /// idle keep-alive connection is closed after it too, as hyper's own header-read timeout
    /// does. finale's connection loop keeps one timer per connection for this (moved only when
    /// it fires), not hyper's timer per request. A connection is known to be HTTP/2 by its
    /// whole preface (in however many reads), its TLS ALPN `h2`, or its first HTTP/2 request
    /// (TLS without ALPN); with no stream open it is idle, not slow, and is left alone. A
    /// timeout too large for the clock (`Duration::MAX`) means none.
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
    /// behaviour is built in: every request is tracked and, once draining, served with
    /// `Connection: close` (`503` + `Retry-After` only near the deadline).
    ///
    /// Binding happens in the task: a bind error (an address that does not resolve, a port in
    /// use) fails graceful start with a [`BindError`](crate::axum::BindError), which stops the
    /// other servers and ends with [`StartupFailure`](crate::ShutdownStatus::StartupFailure).
    /// The returned [`Listening`](crate::axum::Listening) says where the server listens once it
    /// has bound (port `0` resolved), for a "listening on …" line at the right time.
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
    ) -> Result<Listening, ConfigError>
    where
        S: 'static,
        L: ServerLayers<S>,
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
        if let Err(misfit) = crate::config::plan_late_answers(
            &finale.handle().shared.budget,
            rejection.late_margin_value(),
            settings.cut_margin,
        ) {
            tracing::warn!(target: "finale", server = %name, "{misfit}");
        }
        let shared = Arc::new(LayerShared {
            handle: finale.handle(),
            rejection,
            cut_margin: settings.cut_margin,
        });
        let service = crate::serve::prepare::prepared(service);
        let bare = L::BARE;
        let service = layer.around(Responder::new(service, shared.clone()));
        let (listening, binding) = Listening::new(name.clone());
        finale.spawn(Task::service(name, move |ctx| {
            run(
                ctx, listen, binding, service, bare, shared, settings, tls, configure,
            )
        }))?;
        Ok(listening)
    }
}

/// The TLS acceptor of an HTTPS server (nothing without the `tls` feature).
#[cfg(feature = "tls")]
type Tls = Option<tokio_rustls::TlsAcceptor>;
#[cfg(not(feature = "tls"))]
type Tls = Option<std::convert::Infallible>;

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

#[allow(clippy::too_many_arguments)]
async fn run<S, B>(
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
            serve_on(ctx, acceptor, service, bare, shared, settings, tls, configure).await
        }
        #[cfg(unix)]
        Bound::Unix(acceptor) => {
            binding.send(Ok(LocalAddr::Unix(acceptor.local().to_string())));
            serve_on(ctx, acceptor, service, bare, shared, settings, tls, configure).await
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
