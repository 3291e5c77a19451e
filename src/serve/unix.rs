//! Unix domain sockets for finale's servers: binding a path (and what to do with a file
//! already there), the listener the accept loop serves, and the socket file's removal. See
//! [`Listen`](crate::axum::Listen#unix-domain-sockets) for what users are promised.

use std::fmt;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{Interest, ReadBuf};
use tokio::net::{UnixListener, UnixStream};

use crate::serve::tower::Peer;
use crate::serve::transport::{Acceptor, Transport, delegate_readiness, is_connection_error};

impl Transport for UnixStream {
    fn prepare(&self, _tcp_nodelay: bool) {}

    delegate_readiness!();
}

/// The socket file finale created for a server: removed when the server stops accepting (or
/// its task ends), if it is still the same file.
#[derive(Debug)]
pub(crate) struct SocketFile {
    path: PathBuf,
    /// Device and inode of the file finale bound: a file found at the path later that is not
    /// this one (a new instance removed it as stale and bound its own) is not removed.
    id: Option<(u64, u64)>,
}

impl SocketFile {
    fn new(path: &Path) -> Self {
        let id = std::fs::symlink_metadata(path)
            .ok()
            .map(|meta| (meta.dev(), meta.ino()));
        Self {
            path: path.to_owned(),
            id,
        }
    }

    /// Leaves the file where it is (the socket now belongs to an upgrade's successor).
    fn keep(mut self) {
        self.id = None;
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        // One `lstat` and one `unlink`: nothing that waits.
        let Some(id) = self.id else { return };
        let same = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|meta| meta.file_type().is_socket() && (meta.dev(), meta.ino()) == id);
        if same && std::fs::remove_file(&self.path).is_ok() {
            tracing::debug!(target: "finale", path = %self.path.display(), "socket file removed");
        }
    }
}

/// Binds `path` for the server `name`. A socket file nothing accepts on (the instance that
/// created it is gone) is removed and the path bound again; anything else at the path is left
/// alone and the bind fails with `AddrInUse`, saying why.
pub(crate) fn bind(path: &Path, name: &str) -> io::Result<(UnixListener, SocketFile)> {
    let in_use = |why: String| {
        io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("cannot bind the Unix socket {}: {why}", path.display()),
        )
    };
    match UnixListener::bind(path) {
        Ok(listener) => return Ok((listener, SocketFile::new(path))),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {}
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!("cannot bind the Unix socket {}: {e}", path.display()),
            ));
        }
    }
    let meta = std::fs::symlink_metadata(path)?;
    if !meta.file_type().is_socket() {
        return Err(in_use(
            "the path exists and is not a socket (left as it is)".into(),
        ));
    }
    // A non-blocking connect: refused means nothing listens (a file left by an instance that
    // is gone); accepted, or a full accept queue (`EAGAIN`), means something serves it.
    let probe = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
    probe.set_nonblocking(true)?;
    match probe.connect(&socket2::SockAddr::unix(path)?) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
        Ok(()) => {
            return Err(in_use(
                "another process accepts connections on it (left as it is)".into(),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            return Err(in_use(
                "another process listens on it, its accept queue full (left as it is)".into(),
            ));
        }
        Err(e) => {
            return Err(in_use(format!(
                "it cannot be told whether something accepts on it ({e}); left as it is"
            )));
        }
    }
    drop(probe);
    std::fs::remove_file(path)?;
    tracing::info!(
        target: "finale",
        server = name,
        path = %path.display(),
        "removed a stale socket file (nothing accepted on it)"
    );
    let listener = UnixListener::bind(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot bind the Unix socket {}: {e}", path.display()),
        )
    })?;
    Ok((listener, SocketFile::new(path)))
}

/// A Unix socket listener the accept loop serves; `file` is the socket file finale created.
pub(crate) struct UnixAcceptor {
    listener: UnixListener,
    /// `unix:/run/app.sock`: how the log and the report name the server's end.
    server: Arc<str>,
    file: Option<SocketFile>,
}

impl UnixAcceptor {
    pub(crate) fn new(listener: UnixListener, file: Option<SocketFile>) -> io::Result<Self> {
        let local = listener.local_addr()?;
        let server: Arc<str> = match local.as_pathname() {
            Some(path) => format!("unix:{}", path.display()).into(),
            None => abstract_name(&local).map_or_else(
                || "unix:(unnamed)".into(),
                |name| format!("unix:@{}", String::from_utf8_lossy(name)).into(),
            ),
        };
        Ok(Self {
            listener,
            server,
            file,
        })
    }
}

fn peer(server: &Arc<str>, stream: &UnixStream, addr: tokio::net::unix::SocketAddr) -> Peer {
    Peer::Unix {
        addr: Arc::new(addr),
        cred: stream.peer_cred().ok(),
        server: server.clone(),
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_name(addr: &tokio::net::unix::SocketAddr) -> Option<&[u8]> {
    addr.as_abstract_name()
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn abstract_name(_addr: &tokio::net::unix::SocketAddr) -> Option<&[u8]> {
    None
}

impl Acceptor for UnixAcceptor {
    type Stream = UnixStream;

    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<(UnixStream, Peer)>> {
        self.listener.poll_accept(cx).map_ok(|(stream, addr)| {
            let peer = peer(&self.server, &stream, addr);
            (stream, peer)
        })
    }

    fn local(&self) -> &dyn fmt::Display {
        &self.server
    }

    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.listener)
    }

    fn close(self, handed_off: bool, mut accept: impl FnMut(UnixStream, Peer)) -> usize {
        let Self {
            listener,
            server,
            file,
        } = self;
        if handed_off {
            // The successor serves this socket and its file.
            if let Some(file) = file {
                file.keep();
            }
            return 0;
        }
        let mut queued = 0;
        if let Ok(listener) = listener.into_std() {
            loop {
                match listener.accept() {
                    Ok((stream, addr)) => {
                        let Ok(stream) = stream
                            .set_nonblocking(true)
                            .and_then(|()| UnixStream::from_std(stream))
                        else {
                            continue;
                        };
                        queued += 1;
                        let peer = peer(&server, &stream, addr.into());
                        accept(stream, peer);
                    }
                    Err(e) if is_connection_error(&e) => {}
                    Err(_) => break, // WouldBlock: the queue is empty
                }
            }
        }
        // The listener is closed: new clients are refused; then the file goes.
        drop(file);
        queued
    }
}
