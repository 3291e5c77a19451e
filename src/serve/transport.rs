//! What the accept loop needs from a transport: a listener that accepts and, at the drain,
//! hands over its accept queue and closes ([`Acceptor`]), and a connected socket with tokio's
//! readiness API ([`Transport`]). Implemented for TCP here and for Unix domain sockets in
//! `unix.rs`; the accept loop is generic over them, so each transport gets its own
//! monomorphized copy (no dynamic dispatch, no extra allocation on a read or a write).

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::task::{Context, Poll};

use tokio::io::ReadBuf;
use tokio::net::{TcpListener, TcpStream};

use crate::serve::tower::Peer;

/// A listening socket the accept loop serves.
pub(crate) trait Acceptor: Send + 'static {
    /// Its connections.
    type Stream: Transport;

    /// The next connection and who is on its other end.
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<(Self::Stream, Peer)>>;

    /// Where it listens, for the log.
    fn local(&self) -> &dyn fmt::Display;

    /// The socket, to offer to an upgrade's successor.
    #[cfg(unix)]
    #[cfg_attr(not(feature = "upgrade"), allow(dead_code))]
    fn fd(&self) -> std::os::fd::BorrowedFd<'_>;

    /// Stops accepting. Unless the socket now belongs to an upgrade's successor
    /// (`handed_off`: it serves the same socket, its accept queue included, so it is left as
    /// it is), the connections the kernel already completed are taken straight from the socket
    /// (tokio's readiness may not have seen the latest arrivals) and handed to `accept`; then
    /// the listener closes and new connections are refused. How many were queued.
    fn close(self, handed_off: bool, accept: impl FnMut(Self::Stream, Peer)) -> usize;
}

/// A connected socket, split in two owned halves (tokio's): the read half is `ConnIo`'s,
/// read through tokio's own stream code and written through tokio's readiness API; the other
/// is the connection task's reach to the socket (to peek at unread bytes, to shut an upgraded
/// socket down at the cut), let go without a shutdown.
pub(crate) trait Transport: Send + Sync + Sized + 'static {
    /// The half hyper reads (and, through [`AsRef`], writes).
    type Read: tokio::io::AsyncRead + AsRef<Self> + Unpin + Send + Sync + 'static;
    /// The half the connection task keeps.
    type Reach: AsRef<Self> + Send + Sync + 'static;
    /// Per-connection socket options (`TCP_NODELAY` on TCP; nothing on a Unix socket).
    fn prepare(&self, tcp_nodelay: bool);
    fn split(self) -> (Self::Read, Self::Reach);
    /// Lets go of the reach without shutting the socket's writing down (as dropping tokio's
    /// write half would).
    fn release(reach: Self::Reach);
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize>;
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    fn try_write(&self, buf: &[u8]) -> io::Result<usize>;
    fn try_write_vectored(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize>;
    /// The socket itself (to peek at unread bytes, to shut it down at the cut).
    fn sock_ref(&self) -> socket2::SockRef<'_>;
    /// Copies the socket's unread bytes into `buf` without taking them; `None` where the
    /// transport cannot (a Unix socket: tokio's has no peek).
    fn poll_peek(
        &self,
        _cx: &mut Context<'_>,
        _buf: &mut ReadBuf<'_>,
    ) -> Option<Poll<io::Result<usize>>> {
        None
    }
}

/// The readiness methods both tokio streams have, with the same names and meaning.
macro_rules! delegate_readiness {
    () => {
        #[inline]
        fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Self::poll_read_ready(self, cx)
        }
        #[inline]
        fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
            Self::try_read(self, buf)
        }
        #[inline]
        fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Self::poll_write_ready(self, cx)
        }
        #[inline]
        fn split(self) -> (Self::Read, Self::Reach) {
            Self::into_split(self)
        }
        #[inline]
        fn release(reach: Self::Reach) {
            reach.forget();
        }
        #[inline]
        fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
            Self::try_write(self, buf)
        }
        #[inline]
        fn try_write_vectored(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
            Self::try_write_vectored(self, bufs)
        }
        #[inline]
        fn sock_ref(&self) -> socket2::SockRef<'_> {
            socket2::SockRef::from(self)
        }
    };
}
pub(crate) use delegate_readiness;

impl Transport for TcpStream {
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Reach = tokio::net::tcp::OwnedWriteHalf;

    fn prepare(&self, tcp_nodelay: bool) {
        if tcp_nodelay {
            let _ = self.set_nodelay(true);
        }
    }

    fn poll_peek(
        &self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Option<Poll<io::Result<usize>>> {
        Some(Self::poll_peek(self, cx, buf))
    }

    delegate_readiness!();
}

/// A TCP listener: bound by finale (`owned`), or the user's, systemd's, a predecessor's.
pub(crate) struct TcpAcceptor {
    pub(crate) listener: TcpListener,
    pub(crate) local: SocketAddr,
    pub(crate) owned: bool,
}

impl Acceptor for TcpAcceptor {
    type Stream = TcpStream;

    #[inline]
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<(TcpStream, Peer)>> {
        self.listener.poll_accept(cx).map_ok(|(stream, peer)| {
            (
                stream,
                Peer::Tcp {
                    peer,
                    local: self.local,
                },
            )
        })
    }

    fn local(&self) -> &dyn fmt::Display {
        &self.local
    }

    #[cfg(unix)]
    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.listener)
    }

    fn close(self, handed_off: bool, mut accept: impl FnMut(TcpStream, Peer)) -> usize {
        if handed_off {
            return 0;
        }
        // A socket finale bound itself has its backlog shrunk first, which narrows (not
        // closes: Linux still completes one connection into an empty queue) the window in
        // which a handshake lands between the last accept and the close and is reset. An
        // inherited socket (systemd's, a hand-off) keeps its backlog: the same kernel socket
        // serves the next instance, which must find it as it was.
        if self.owned {
            let _ = socket2::SockRef::from(&self.listener).listen(0);
        }
        let mut queued = 0;
        let local = self.local;
        if let Ok(listener) = self.listener.into_std() {
            loop {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        let Ok(stream) = stream
                            .set_nonblocking(true)
                            .and_then(|()| TcpStream::from_std(stream))
                        else {
                            continue;
                        };
                        queued += 1;
                        accept(stream, Peer::Tcp { peer, local });
                    }
                    Err(e) if is_connection_error(&e) => {}
                    Err(_) => break, // WouldBlock: the queue is empty
                }
            }
        }
        queued
    }
}

/// Errors of one incoming connection, not of the listener.
pub(crate) fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// The connection task's reach to its socket ([`Transport::Reach`]), let go without a
/// shutdown: the socket closes once hyper (or an upgrade's handler) and this are both done
/// with it.
pub(crate) struct SocketReach<T: Transport>(Option<T::Reach>);

impl<T: Transport> SocketReach<T> {
    pub(crate) fn new(reach: T::Reach) -> Self {
        Self(Some(reach))
    }

    /// The socket.
    pub(crate) fn get(&self) -> &T {
        self.0.as_ref().expect("taken only when dropped").as_ref()
    }
}

impl<T: Transport> Drop for SocketReach<T> {
    fn drop(&mut self) {
        if let Some(reach) = self.0.take() {
            T::release(reach);
        }
    }
}
