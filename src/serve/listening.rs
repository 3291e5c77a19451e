//! What a server tells the code that registered it about its socket: the address it bound
//! (port `0` resolved), or the typed reason it could not bind.

use std::borrow::Cow;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::watch;

/// Why a server could not listen: the address did not parse or resolve, the port is in use,
/// the socket file is live, permission was denied.
///
/// The server's start fails with it, so graceful start fails and the run ends with
/// [`StartupFailure`](crate::ShutdownStatus::StartupFailure) (exit code 3); the report's
/// [`Reason::StartupFailed`](crate::Reason::StartupFailed) error has it as its
/// [`source`](std::error::Error::source), and [`Listening::local_addr`] returns it.
#[derive(Clone, Debug)]
pub struct BindError {
    server: Cow<'static, str>,
    address: String,
    source: Arc<io::Error>,
}

impl BindError {
    pub(crate) fn new(server: &str, address: String, source: io::Error) -> Self {
        Self {
            server: Cow::Owned(server.to_owned()),
            address,
            source: Arc::new(source),
        }
    }

    /// The server's name.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The address as it was given (`"localhost:3031"`, `"[::1]:8080"`, `unix:/run/app.sock`);
    /// `"(not bound)"` when [`Listening::local_addr`] finds the server stopped before it bound
    /// (the error's kind is then [`Interrupted`](io::ErrorKind::Interrupted)).
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The kind of the underlying error: [`AddrInUse`](io::ErrorKind::AddrInUse) for a port in
    /// use, [`InvalidInput`](io::ErrorKind::InvalidInput) for an address without a port, ...
    pub fn kind(&self) -> io::ErrorKind {
        self.source.kind()
    }
}

impl fmt::Display for BindError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "server {:?} cannot listen on {}: {}",
            self.server, self.address, self.source
        )
    }
}

impl std::error::Error for BindError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

/// Where a server listens, once it has bound its socket.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LocalAddr {
    /// A TCP socket; with port `0` given, the port the kernel chose.
    Tcp(SocketAddr),
    /// A Unix domain socket, as the server names it: `unix:/run/app.sock`.
    Unix(String),
}

impl LocalAddr {
    /// The TCP address, if it is one.
    pub fn tcp(&self) -> Option<SocketAddr> {
        match self {
            LocalAddr::Tcp(addr) => Some(*addr),
            LocalAddr::Unix(_) => None,
        }
    }
}

/// `127.0.0.1:3031`, `[::1]:8080`, `unix:/run/app.sock`.
impl fmt::Display for LocalAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LocalAddr::Tcp(addr) => addr.fmt(f),
            LocalAddr::Unix(name) => f.write_str(name),
        }
    }
}

type Slot = Option<Result<LocalAddr, BindError>>;

/// A server registered with finale (what `serve` returns): the address it bound, once it has.
///
/// The server binds in its task, which starts at once, so graceful start fails on a bind error;
/// [`local_addr`](Listening::local_addr) waits for that bind. Cheap to clone; dropping it
/// changes nothing.
///
/// # Examples
///
/// ```no_run
/// # #[cfg(feature = "axum")]
/// #[tokio::main]
/// async fn main() -> Result<(), Box<dyn std::error::Error>> {
///     let finale = finale::Finale::builder().build()?;
///     let app = axum::Router::new();
///     let bind = std::env::var("BIND_ADDRESS").unwrap_or_else(|_| "localhost:3031".into());
///     let listening = finale::axum::serve(&finale, "http", bind, app)?;
///     // After the bind, not before it; port 0 resolved. Not `?`: a bind error is `run`'s to
///     // report, with exit code 3 (returned from `main`, it would exit 1 with no report).
///     if let Ok(addr) = listening.local_addr().await {
///         tracing::info!("listening on {addr}");
///     }
///     finale.run_and_exit().await
/// }
/// # #[cfg(not(feature = "axum"))]
/// # fn main() {}
/// ```
#[derive(Clone, Debug)]
pub struct Listening {
    rx: watch::Receiver<Slot>,
    server: Cow<'static, str>,
}

/// The server's side: says once where it listens, or why it could not.
#[derive(Debug)]
pub(crate) struct Binding(watch::Sender<Slot>);

impl Binding {
    pub(crate) fn send(self, result: Result<LocalAddr, BindError>) {
        self.0.send_replace(Some(result));
    }
}

impl Listening {
    pub(crate) fn new(server: Cow<'static, str>) -> (Self, Binding) {
        let (tx, rx) = watch::channel(None);
        (Self { rx, server }, Binding(tx))
    }

    /// Waits until the server has bound its socket and returns where it listens.
    ///
    /// # Errors
    ///
    /// The [`BindError`] the server failed with; also when the server stopped before it bound
    /// (the shutdown came first): then its kind is
    /// [`Interrupted`](io::ErrorKind::Interrupted).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropping the future loses nothing, call it again.
    pub async fn local_addr(&self) -> Result<LocalAddr, BindError> {
        let mut rx = self.rx.clone();
        match rx.wait_for(Option::is_some).await {
            Ok(slot) => slot.clone().expect("waited for a value"),
            Err(_) => Err(BindError {
                server: self.server.clone(),
                address: "(not bound)".to_owned(),
                source: Arc::new(io::Error::new(
                    io::ErrorKind::Interrupted,
                    "the server stopped before it bound its socket",
                )),
            }),
        }
    }
}
