//! Where a server listens ([`Listen`]: an address, a `"host:port"` string, a listener bound
//! already, a Unix socket path) and its bind, in the server's task, to one transport's
//! [`Acceptor`](super::transport::Acceptor).

use std::io;
use std::net::SocketAddr;

use tokio::net::TcpListener;

use crate::serve::transport::TcpAcceptor;
#[cfg(unix)]
use crate::serve::unix;

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
/// ([`tcp_nodelay`](super::server::HttpServer::tcp_nodelay), the backlog shrink before the
/// sweep) does not apply. Handlers see who connected as the frameworks' own servers tell it
/// for a `UnixListener`: axum's `ConnectInfo<tokio::net::unix::SocketAddr>` (what
/// `axum::serve` on a `tokio::net::UnixListener` gives), tonic's
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

    /// The address as given, for a [`BindError`](super::listening::BindError).
    pub(super) fn describe(&self) -> String {
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
    pub(super) async fn bind(self, name: &str) -> io::Result<Bound> {
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
pub(super) enum Bound {
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
