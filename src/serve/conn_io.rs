//! A served connection's socket as hyper reads and writes it: reachable (weakly) by the
//! connection's task after an HTTP/1 upgrade handed it to a handler, and telling HTTP/1 from
//! HTTP/2 by its first bytes (the whole HTTP/2 preface).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};

use crate::serve::tower::ConnWatch;
use crate::serve::transport::Transport;

/// A served connection's socket: a TCP or Unix stream the server's connection task can still
/// reach (weakly) after an HTTP/1 upgrade handed it to the handler, to shut it down at the
/// drain deadline; its drop tells that task the upgraded connection ended.
pub(super) struct ConnIo<T> {
    pub(super) stream: Arc<T>,
    pub(super) watch: Arc<ConnWatch>,
    /// How many bytes of the HTTP/2 preface the connection sent so far; [`SNIFFED`] once its
    /// bytes decided (or under TLS, whose bytes are the handshake's).
    pub(super) sniffed: u8,
}

/// The first bytes of every HTTP/2 connection (prior knowledge): the client's preface, whole.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// [`ConnIo::sniffed`] once the first bytes decided: no more looking.
pub(super) const SNIFFED: u8 = u8::MAX;

impl<T> ConnIo<T> {
    /// Looks at the bytes read until they decide: the whole HTTP/2 preface (in as many reads
    /// as the client splits it into) makes the connection known HTTP/2; anything else leaves it
    /// bounded by the header-read timeout, as every connection is until then.
    fn sniff(&mut self, read: &[u8]) {
        let at = usize::from(self.sniffed);
        let n = read.len().min(H2_PREFACE.len() - at);
        if read[..n] != H2_PREFACE[at..at + n] {
            self.sniffed = SNIFFED;
        } else if at + n == H2_PREFACE.len() {
            self.watch.h2_preface.store(true, Ordering::Relaxed);
            self.sniffed = SNIFFED;
        } else {
            // At most 24: fits.
            self.sniffed = (at + n) as u8;
        }
    }
}

impl<T> Drop for ConnIo<T> {
    fn drop(&mut self) {
        self.watch.io_dropped.notify_one();
    }
}

impl<T: Transport> tokio::io::AsyncRead for ConnIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = self.as_mut().poll_read_inner(cx, buf);
        if self.sniffed != SNIFFED && buf.filled().len() > before {
            let this = self.get_mut();
            this.sniff(&buf.filled()[before..]);
        }
        polled
    }
}

impl<T: Transport> ConnIo<T> {
    fn poll_read_inner(
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
    /// One write by `write` (tokio's `try_write`, which clears the readiness when the socket
    /// would block): the task waits for the reactor only then. A partial write (the send
    /// buffer full) leaves the readiness set, so the next write finds out with one more
    /// system call; rare, where the read side's short read is the usual case.
    fn poll_write_with(
        &self,
        cx: &mut Context<'_>,
        mut write: impl FnMut(&T) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.stream.poll_write_ready(cx))?;
            match write(&self.stream) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                written => return Poll::Ready(written),
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
        self.poll_write_with(cx, |stream| stream.try_write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_with(cx, |stream| stream.try_write_vectored(bufs))
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
