//! [`HttpServer`]: a server's settings, its layers and its `serve`, which registers the accept
//! loop as a finale task.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use tower::layer::util::{Identity, Stack};

use crate::Finale;
use crate::config::ConfigError;
use crate::serve::accept::{Configure, run};
use crate::serve::connection::{BoxError, Settings};
use crate::serve::listen::Listen;
use crate::serve::listening::Listening;
use crate::serve::tower::{LayerShared, Rejection, Responder, ServerLayers};
use crate::task::Task;

/// How long connections not known to be HTTP/2 stay open after the drain started, so that a
/// request on its way is served (with `Connection: close`) instead of reset: 1 second.
pub const DEFAULT_IDLE_GRACE: Duration = Duration::from_secs(1);
/// How long a client may take to send a request's headers: 10 seconds. A slow or stalled
/// client (not known to be HTTP/2) is disconnected after it, whatever the drain is doing (see
/// [`HttpServer::header_read_timeout`]).
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long before the Drain phase's deadline the remaining connections are cut: 100 ms.
pub const DEFAULT_CUT_MARGIN: Duration = Duration::from_millis(100);

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
    /// connection with no request in flight and no response still going out is closed: one
    /// idle for longer than the grace when the drain starts is closed at once (a client that
    /// never sent a complete request does not hold the drain either). One whose client is
    /// still reading a response (hyper holds bytes the socket has not taken, the handler's
    /// body done) is closed once the response is out, or cut at the drain's deadline and
    /// named in the report (`GET /big from … (response still being written at the drain
    /// deadline)`). The drain ends earlier if every connection has closed.
    ///
    /// # Caveats
    ///
    /// Closing an idle HTTP/1 connection always leaves a window: a request the client sends as
    /// the close happens is not answered (the client sees the connection end). HTTP/1 allows a
    /// server to close an idle connection at any time, and has clients retry (RFC 9112,
    /// section 9.3.1). The window is at the grace's end, which the server counts from when it
    /// finished the last response (its client reads it a moment later): on an idle loopback
    /// the first request not served went out 0.1–0.9 ms after the end as the client saw it,
    /// and on a busy machine some went out up to tens of milliseconds before it (the test
    /// `a_request_sent_before_the_idle_grace_ends_is_served_and_the_window_is_bounded`
    /// measures it, and asserts that requests sent 50 ms before the end are served, and that
    /// the grace ends). A client that sends on a fixed period equal to the grace (a poller
    /// every second, with the default) aims at that window: a 1 s poller saw it 4 times in
    /// 1,460 upgrades, and periods of 0.5, 0.98, 1.02 or 1.5 s never did (reported against an
    /// earlier version of the server). Pick a grace apart from your clients' periods.
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
    ///
    /// A call the client was about to send as the connection went away never reaches the
    /// server, and tonic's channel does not retry it: it fails with `Cancelled` ("operation was
    /// canceled", the connection closed) or `Internal` (an h2 `GoAway` error: the stream came
    /// after the server's last GOAWAY), in about one run in five of the tests here (a call every
    /// 20 ms, an age of 300 ms). It is safe to retry; gRPC clients with transparent retries
    /// (grpc-go, grpc-java) do so themselves.
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
    /// does. A connection whose client is still reading a response is not slow to send its
    /// next request, however slowly it reads: while the server still holds bytes of the
    /// response that the socket has not taken (the handler's body done), it stays open (until
    /// the drain's deadline cuts it), and the timeout counts from when the socket took the
    /// last of them. The kernel's own buffers (a few MiB) may still be on their way then: a
    /// client that takes longer than the timeout to read them finds the connection closed
    /// after the response's last byte (nothing of it lost) and sends its next request on a
    /// new one. finale sets no timeout on a client's reading, as `axum::serve` sets none. finale's connection loop keeps one timer per connection for this (moved only when
    /// it fires), not hyper's timer per request. A connection is known to be HTTP/2 by its
    /// whole preface (in however many reads), its TLS ALPN `h2`, or its first HTTP/2 request
    /// (TLS without ALPN); with no stream open it is idle, not slow, and is left alone. A
    /// timeout too large for the clock (`Duration::MAX`) means none.
    pub fn header_read_timeout(mut self, timeout: Duration) -> Self {
        self.settings.header_read_timeout = timeout;
        self
    }

    /// How long before the Drain phase's deadline the remaining connections are cut. Keep it
    /// above zero: the cut is what names, in the report, the requests it ends. With no margin
    /// (or a runtime too busy to run a connection's task between the cut and the deadline) the
    /// server's task can be aborted at the deadline before its connections saw the cut: what
    /// they held is let go (an upgraded connection's socket shut down), but may be missing from
    /// the report.
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
    /// As [`Finale::spawn`]: a duplicate or empty name; [`ConfigError::ServerName`] for a name
    /// its socket cannot be passed under (systemd's and an upgrade's `LISTEN_FDNAMES`): one with
    /// `:` (their separator) or a NUL byte, or `finale.ready` (an upgrade's own).
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
        if let Some(reason) = unpassable(&self.name) {
            return Err(ConfigError::ServerName {
                name: self.name.into_owned(),
                reason,
            });
        }
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

/// The name of the socket an upgrade's successor reports ready on, passed beside the servers'
/// (the upgrade's `READY_NAME`).
const READY_SOCKET_NAME: &str = "finale.ready";

/// Why a server cannot be named `name`: its socket is passed under its name
/// (`LISTEN_FDNAMES`, systemd's and an upgrade's), where `:` separates the names, an
/// environment variable holds no NUL byte, and `finale.ready` is the upgrade's own.
fn unpassable(name: &str) -> Option<&'static str> {
    if name.contains(':') {
        Some("':' separates the names of passed sockets (LISTEN_FDNAMES)")
    } else if name.contains('\0') {
        Some("a NUL byte cannot go into LISTEN_FDNAMES")
    } else if name == READY_SOCKET_NAME {
        Some("an upgrade passes its own socket under that name")
    } else {
        None
    }
}

#[cfg(all(test, feature = "upgrade", unix))]
mod tests {
    #[test]
    fn the_reserved_name_is_the_upgrades() {
        assert_eq!(super::READY_SOCKET_NAME, crate::upgrade::READY_NAME);
    }
}
