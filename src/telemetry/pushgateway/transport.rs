//! The Pushgateway client's transport: TCP for `http://`, TCP plus rustls for `https://`
//! (feature `pushgateway-tls`), and [`TransportError`], which keeps the HTTP client's error
//! types out of finale's API.
//!
//! # Invariants
//!
//! - No proxy: the connector dials the Pushgateway's host itself. `HTTP_PROXY`, `HTTPS_PROXY`
//!   and `NO_PROXY` are not read (hyper-util's connector does not read them either).
//! - No process-wide state: the TLS configuration carries its crypto provider (ring), so
//!   nothing depends on, or installs, rustls's default provider.
//! - A URL is `https://` exactly when the connector holds a TLS configuration: the builder
//!   checks it, so an `https://` request never goes out in clear text.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

pub(super) type HttpClient = Client<Connector, Full<Bytes>>;

pub(super) fn new_client(connector: Connector) -> HttpClient {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector)
}

/// Dials the Pushgateway: TCP, then the TLS handshake for `https://`.
#[derive(Clone)]
pub(super) struct Connector {
    tcp: HttpConnector,
    #[cfg(feature = "pushgateway-tls")]
    tls: Option<tls::Tls>,
}

impl Connector {
    /// A plain-HTTP connector.
    pub(super) fn plain(connect_timeout: Duration) -> Connector {
        let mut tcp = HttpConnector::new();
        tcp.set_connect_timeout(Some(connect_timeout));
        // A push is a request and one answer: whatever the request is written in (a head and a
        // body, TLS records) goes out at once. With Nagle's algorithm a second small write
        // waits for the ACK of the first, which the receiver may delay by up to 40 ms.
        tcp.set_nodelay(true);
        // The scheme is checked by the builder, and `https://` goes through TLS below.
        tcp.enforce_http(false);
        Connector {
            tcp,
            #[cfg(feature = "pushgateway-tls")]
            tls: None,
        }
    }

    #[cfg(feature = "pushgateway-tls")]
    pub(super) fn with_tls(mut self, tls: tls::Tls) -> Connector {
        self.tls = Some(tls);
        self
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = Stream;
    type Error = ConnectFailure;
    type Future = Pin<Box<dyn Future<Output = Result<Stream, ConnectFailure>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConnectFailure>> {
        self.tcp
            .poll_ready(cx)
            .map_err(|e| ConnectFailure::Tcp(e.into()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.tcp.call(uri);
        #[cfg(feature = "pushgateway-tls")]
        let tls = self.tls.clone();
        Box::pin(async move {
            let tcp = connecting
                .await
                .map_err(|e| ConnectFailure::Tcp(e.into()))?;
            #[cfg(feature = "pushgateway-tls")]
            if let Some(tls) = tls {
                let stream = tls.handshake(tcp.into_inner()).await?;
                return Ok(Stream::Tls(Box::new(TokioIo::new(stream))));
            }
            Ok(Stream::Plain(tcp))
        })
    }
}

/// Why the connector could not hand the client a connection. Reaches the user only as the
/// source of a [`TransportError`].
#[derive(Debug)]
pub(super) enum ConnectFailure {
    /// Resolving or connecting failed (hyper-util's connector's error).
    Tcp(Box<dyn StdError + Send + Sync>),
    /// The TLS handshake failed: rustls refused the peer, or the peer refused us.
    #[cfg_attr(not(feature = "pushgateway-tls"), allow(dead_code))]
    Tls(io::Error),
    /// The TLS handshake did not complete: the connection broke during it.
    #[cfg_attr(not(feature = "pushgateway-tls"), allow(dead_code))]
    TlsIo(io::Error),
}

impl fmt::Display for ConnectFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectFailure::Tcp(_) => f.write_str("connecting failed"),
            ConnectFailure::Tls(_) => f.write_str("the TLS handshake failed"),
            ConnectFailure::TlsIo(_) => {
                f.write_str("the connection broke during the TLS handshake")
            }
        }
    }
}

impl StdError for ConnectFailure {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            ConnectFailure::Tcp(e) => Some(&**e),
            ConnectFailure::Tls(e) | ConnectFailure::TlsIo(e) => Some(e),
        }
    }
}

/// A connection to the Pushgateway, in clear or under TLS.
pub(super) enum Stream {
    Plain(TokioIo<TcpStream>),
    #[cfg(feature = "pushgateway-tls")]
    Tls(Box<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>),
}

/// Calls `$call` on the stream inside, whichever it is.
macro_rules! each {
    ($self:expr, $s:ident => $call:expr) => {
        match $self.get_mut() {
            Stream::Plain($s) => {
                let $s = Pin::new($s);
                $call
            }
            #[cfg(feature = "pushgateway-tls")]
            Stream::Tls($s) => {
                let $s = Pin::new(&mut **$s);
                $call
            }
        }
    };
}

impl hyper::rt::Read for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        each!(self, s => s.poll_read(cx, buf))
    }
}

impl hyper::rt::Write for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each!(self, s => s.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => s.poll_shutdown(cx))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            #[cfg(feature = "pushgateway-tls")]
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        each!(self, s => s.poll_write_vectored(cx, bufs))
    }
}

impl Connection for Stream {
    fn connected(&self) -> Connected {
        match self {
            Stream::Plain(s) => s.connected(),
            #[cfg(feature = "pushgateway-tls")]
            Stream::Tls(s) => s.inner().get_ref().0.connected(),
        }
    }
}

/// Why a request to the Pushgateway did not get an answer, below HTTP: connecting failed, the
/// TLS handshake failed, or the connection broke.
///
/// Its [`Display`](fmt::Display) says which; [`source`](StdError::source) chains down to the
/// operating system's or rustls's error (the HTTP client's own error types are not part of
/// finale's API).
#[derive(Debug)]
pub struct TransportError {
    kind: Kind,
    source: hyper_util::client::legacy::Error,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Connect,
    Tls,
    Other,
}

impl TransportError {
    pub(super) fn new(source: hyper_util::client::legacy::Error) -> TransportError {
        let mut kind = if source.is_connect() {
            Kind::Connect
        } else {
            Kind::Other
        };
        let mut cause: Option<&(dyn StdError + 'static)> = source.source();
        while let Some(c) = cause {
            if let Some(ConnectFailure::Tls(_)) = c.downcast_ref::<ConnectFailure>() {
                kind = Kind::Tls;
                break;
            }
            // With TLS 1.3 the server judges the client's certificate after the client's side
            // of the handshake is done: its refusal arrives as an alert on the first read.
            #[cfg(feature = "pushgateway-tls")]
            if c.downcast_ref::<io::Error>()
                .and_then(|e| e.get_ref())
                .is_some_and(|inner| inner.is::<rustls::Error>())
            {
                kind = Kind::Tls;
                break;
            }
            cause = c.source();
        }
        TransportError { kind, source }
    }

    /// Whether the TCP connection (or the name lookup) failed: refused, unreachable, timed out.
    pub fn is_connect(&self) -> bool {
        self.kind == Kind::Connect
    }

    /// Whether the TLS handshake failed because one side refused the other: the Pushgateway's
    /// certificate is not trusted or does not name its host, or it refused finale's client
    /// certificate. Trying again does not help, so such a push is not retried.
    pub fn is_tls(&self) -> bool {
        self.kind == Kind::Tls
    }
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.kind {
            Kind::Connect => "connecting to the Pushgateway failed",
            Kind::Tls => "the TLS handshake with the Pushgateway failed",
            Kind::Other => "the request to the Pushgateway failed",
        })
    }
}

impl StdError for TransportError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&self.source)
    }
}

#[cfg(feature = "pushgateway-tls")]
pub(super) mod tls {
    //! The rustls client configuration, built once by the Pushgateway builder.

    use std::path::PathBuf;
    use std::sync::Arc;

    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, RootCertStore};
    use tokio::net::TcpStream;
    use tokio_rustls::TlsConnector;

    use super::ConnectFailure;
    use crate::pem::{certificates, private_key};
    use crate::telemetry::pushgateway::PushgatewayConfigError;

    /// Where a PEM document comes from.
    #[derive(Clone, Debug)]
    pub(in crate::telemetry::pushgateway) enum Pem {
        Bytes(Vec<u8>),
        File(PathBuf),
    }

    impl Pem {
        fn read(
            &self,
            what: &'static str,
        ) -> Result<(Vec<u8>, Option<PathBuf>), PushgatewayConfigError> {
            match self {
                Pem::Bytes(b) => Ok((b.clone(), None)),
                Pem::File(path) => std::fs::read(path)
                    .map(|b| (b, Some(path.clone())))
                    .map_err(|e| PushgatewayConfigError::InvalidTls {
                        what,
                        path: Some(path.clone()),
                        reason: format!("cannot read it: {e}"),
                    }),
            }
        }
    }

    /// The TLS settings as given to the builder.
    #[derive(Clone, Debug, Default)]
    pub(in crate::telemetry::pushgateway) struct TlsSettings {
        pub(in crate::telemetry::pushgateway) ca: Option<Pem>,
        pub(in crate::telemetry::pushgateway) client: Option<(Pem, Pem)>,
    }

    impl TlsSettings {
        pub(in crate::telemetry::pushgateway) fn is_set(&self) -> bool {
            self.ca.is_some() || self.client.is_some()
        }
    }

    /// What the connector needs for the handshake.
    #[derive(Clone)]
    pub(in crate::telemetry::pushgateway) struct Tls {
        connector: TlsConnector,
        server_name: ServerName<'static>,
    }

    impl Tls {
        /// Reads and checks the certificates and key; `host` is the URL's host (a DNS name or
        /// an IP address, IPv6 in brackets).
        pub(in crate::telemetry::pushgateway) fn new(
            settings: &TlsSettings,
            host: &str,
        ) -> Result<Tls, PushgatewayConfigError> {
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let server_name = ServerName::try_from(host.to_owned()).map_err(|_| {
                PushgatewayConfigError::InvalidTls {
                    what: "server name",
                    path: None,
                    reason: format!("{host:?} is neither a DNS name nor an IP address"),
                }
            })?;
            // The provider goes with the configuration: no process-wide default is used.
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let builder = ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| PushgatewayConfigError::InvalidTls {
                    what: "configuration",
                    path: None,
                    reason: e.to_string(),
                })?;
            let roots = match &settings.ca {
                None => RootCertStore {
                    roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
                },
                Some(pem) => {
                    const WHAT: &str = "CA certificate";
                    let (bytes, path) = pem.read(WHAT)?;
                    let invalid = |reason: String| PushgatewayConfigError::InvalidTls {
                        what: WHAT,
                        path: path.clone(),
                        reason,
                    };
                    let mut roots = RootCertStore::empty();
                    for cert in certificates(&bytes).map_err(&invalid)? {
                        roots
                            .add(cert)
                            .map_err(|e| invalid(format!("it is not a usable CA: {e}")))?;
                    }
                    roots
                }
            };
            let builder = builder.with_root_certificates(roots);
            let config = match &settings.client {
                None => builder.with_no_client_auth(),
                Some((cert, key)) => {
                    let (cert_bytes, cert_path) = cert.read("client certificate")?;
                    let chain = certificates(&cert_bytes).map_err(|reason| {
                        PushgatewayConfigError::InvalidTls {
                            what: "client certificate",
                            path: cert_path.clone(),
                            reason,
                        }
                    })?;
                    let (key_bytes, key_path) = key.read("client key")?;
                    let key = private_key(&key_bytes).map_err(|reason| {
                        PushgatewayConfigError::InvalidTls {
                            what: "client key",
                            path: key_path.clone(),
                            reason,
                        }
                    })?;
                    builder.with_client_auth_cert(chain, key).map_err(|e| {
                        PushgatewayConfigError::InvalidTls {
                            what: "client certificate",
                            path: cert_path,
                            reason: format!("it does not go with the key: {e}"),
                        }
                    })?
                }
            };
            Ok(Tls {
                connector: TlsConnector::from(Arc::new(config)),
                server_name,
            })
        }

        pub(super) async fn handshake(
            &self,
            tcp: TcpStream,
        ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ConnectFailure> {
            self.connector
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(|e| {
                    // tokio-rustls wraps rustls's verdicts in `InvalidData`; anything else is
                    // the connection itself failing, which another attempt may get past.
                    if e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()) {
                        ConnectFailure::Tls(e)
                    } else {
                        ConnectFailure::TlsIo(e)
                    }
                })
        }
    }
}
