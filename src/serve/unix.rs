//! Unix domain sockets for finale's servers: binding a path (and what to do with a file
//! already there), the listener the accept loop serves, and the socket file's removal. See
//! [`Listen`](crate::axum::Listen#unix-domain-sockets) for what users are promised.

use std::fmt;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::net::{UnixListener, UnixStream};

use crate::serve::tower::Peer;
use crate::serve::transport::{Acceptor, Transport, delegate_readiness, is_connection_error};

impl Transport for UnixStream {
    type Read = tokio::net::unix::OwnedReadHalf;
    type Reach = tokio::net::unix::OwnedWriteHalf;

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
///
/// Telling a stale file from a live one (a refused connect) and removing it are two steps: two
/// instances starting at once on the same stale file could each see it refused, and the second
/// remove the socket the first had just bound. So those steps run under an exclusive lock on
/// `<path>.lock` (created next to the socket, and left there: removing a lock file reopens the
/// race it closes); when that file cannot be created, they run without it.
pub(crate) fn bind(path: &Path, name: &str) -> io::Result<(UnixListener, SocketFile)> {
    // Kept absolute: the file is removed at the stop, whatever the working directory is then.
    let path = &std::path::absolute(path)?;
    let failed = |e: io::Error| {
        io::Error::new(
            e.kind(),
            format!("cannot bind the Unix socket {}: {e}", path.display()),
        )
    };
    match UnixListener::bind(path) {
        Ok(listener) => return Ok((listener, SocketFile::new(path))),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {}
        Err(e) => return Err(failed(e)),
    }
    let lock = lock_file(path);
    // The file may go between two steps (an old instance removing its own at its stop): the
    // path is then free, so bind again, a few times at most.
    for _ in 0..3 {
        match replace_stale(path, name) {
            Ok(listener) => {
                drop(lock);
                return Ok((listener, SocketFile::new(path)));
            }
            Err(Stale::Gone) => {}
            Err(Stale::Failed(e)) => return Err(e),
        }
    }
    Err(failed(io::Error::new(
        io::ErrorKind::AddrInUse,
        "the path kept changing while it was bound",
    )))
}

/// What stopped [`replace_stale`].
enum Stale {
    /// The path changed between two steps (the file went, or another instance bound it):
    /// look again.
    Gone,
    Failed(io::Error),
}

/// One attempt: bind; if the path is taken, tell a stale socket file from anything else,
/// remove the stale one and bind.
fn replace_stale(path: &Path, name: &str) -> Result<UnixListener, Stale> {
    let in_use = |why: String| {
        Stale::Failed(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("cannot bind the Unix socket {}: {why}", path.display()),
        ))
    };
    let failed = |e: io::Error| {
        if e.kind() == io::ErrorKind::NotFound {
            return Stale::Gone;
        }
        Stale::Failed(io::Error::new(
            e.kind(),
            format!("cannot bind the Unix socket {}: {e}", path.display()),
        ))
    };
    match UnixListener::bind(path) {
        Ok(listener) => return Ok(listener),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {}
        Err(e) => return Err(failed(e)),
    }
    let meta = std::fs::symlink_metadata(path).map_err(failed)?;
    if !meta.file_type().is_socket() {
        return Err(in_use(
            "the path exists and is not a socket (left as it is)".into(),
        ));
    }
    // A non-blocking connect: refused means nothing listens (a file left by an instance that
    // is gone); accepted, or a full accept queue (`EAGAIN`), means something serves it.
    let probe =
        socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).map_err(failed)?;
    probe.set_nonblocking(true).map_err(failed)?;
    match probe.connect(&socket2::SockAddr::unix(path).map_err(failed)?) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(Stale::Gone),
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
    std::fs::remove_file(path).map_err(failed)?;
    tracing::info!(
        target: "finale",
        server = name,
        path = %path.display(),
        "removed a stale socket file (nothing accepted on it)"
    );
    match UnixListener::bind(path) {
        // Another instance bound the path in the moment it was free (its first bind takes no
        // lock): look again, it is now a live socket.
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(Stale::Gone),
        bound => bound.map_err(failed),
    }
}

/// An exclusive lock on `<path>.lock`, held while a stale socket file is told and replaced;
/// `None` if the lock file cannot be opened or locked (a read-only directory, say).
fn lock_file(path: &Path) -> Option<std::fs::File> {
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .ok()?;
    // Blocking, but only for as long as another instance takes to do the same few syscalls.
    file.lock().ok()?;
    Some(file)
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
