//! A served connection's socket as hyper reads and writes it: read through tokio's own stream
//! code, its other half kept by the connection's task (to reach the socket after an HTTP/1
//! upgrade handed it to a handler), and telling HTTP/1 from HTTP/2 by its first bytes (the
//! whole HTTP/2 preface).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};

use crate::serve::tower::ConnWatch;
use crate::serve::transport::Transport;

/// A served connection's socket as hyper reads and writes it: the read half of a TCP or Unix
/// stream, whose other half the server's connection task keeps, to reach the socket after an
/// HTTP/1 upgrade handed this one to the handler (to shut it down at the drain deadline); its
/// drop tells that task the upgraded connection ended.
pub(super) struct ConnIo<T: Transport> {
    pub(super) read: T::Read,
    pub(super) watch: Arc<ConnWatch>,
    /// How many bytes of the HTTP/2 preface the connection sent so far; [`SNIFFED`] once its
    /// bytes decided (or under TLS, whose bytes are the handshake's).
    pub(super) sniffed: u8,
    /// The last write waited for the socket: [`ConnWatch::write_blocked`], as this end last
    /// told it.
    pub(super) blocked: bool,
}

/// The first bytes of every HTTP/2 connection (prior knowledge): the client's preface, whole.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// [`ConnIo::sniffed`] once the first bytes decided: no more looking.
pub(super) const SNIFFED: u8 = u8::MAX;

impl<T: Transport> ConnIo<T> {
    /// The socket itself.
    fn stream(&self) -> &T {
        self.read.as_ref()
    }

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

impl<T: Transport> Drop for ConnIo<T> {
    fn drop(&mut self) {
        self.watch.io_dropped.notify_one();
    }
}

impl<T: Transport> tokio::io::AsyncRead for ConnIo<T> {
    /// tokio's own read (a short read clears the readiness, so that hyper's next read, for the
    /// next request, waits for the reactor instead of failing once more), once the first bytes
    /// decided; until then, looking at them too.
    #[inline]
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.sniffed != SNIFFED {
            return self.poll_read_sniffing(cx, buf);
        }
        Pin::new(&mut self.read).poll_read(cx, buf)
    }
}

impl<T: Transport> ConnIo<T> {
    /// A read before the first bytes decided.
    #[inline(never)]
    fn poll_read_sniffing(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.sniffed == 0 && buf.remaining() == H2_PREFACE.len() {
            // Nothing read yet, and a reader the preface's size: hyper-util's.
            if ready!(self.as_mut().poll_first_bytes(cx))? {
                return Poll::Ready(Ok(()));
            }
        }
        let before = buf.filled().len();
        let polled = tokio::io::AsyncRead::poll_read(Pin::new(&mut self.read), cx, buf);
        if buf.filled().len() > before {
            let this = self.get_mut();
            this.sniff(&buf.filled()[before..]);
        }
        polled
    }
}

impl<T: Transport> ConnIo<T> {
    /// The connection's first read is hyper-util's, which looks for the HTTP/2 preface (into a
    /// buffer the preface's size): on TCP the first bytes are peeked at, not read. If they are
    /// not the preface, the read ends with nothing read, which hyper-util takes for HTTP/1 with
    /// no bytes to hand over, and hyper reads the request itself, from its first byte, into its
    /// own read buffer. (Handed bytes read apart, hyper would grow that buffer from 8 KiB to
    /// 16 KiB to read the rest of the request, for every connection.) The preface, a part of it,
    /// or the end of the stream is read as usual. `Ready(true)`: HTTP/1, nothing read.
    fn poll_first_bytes(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        let mut first = [0; H2_PREFACE.len()];
        let mut peeked = tokio::io::ReadBuf::new(&mut first);
        let Some(polled) = self.stream().poll_peek(cx, &mut peeked) else {
            return Poll::Ready(Ok(false));
        };
        ready!(polled)?;
        let bytes = peeked.filled();
        if bytes.is_empty() || bytes == &H2_PREFACE[..bytes.len()] {
            return Poll::Ready(Ok(false));
        }
        self.get_mut().sniffed = SNIFFED;
        Poll::Ready(Ok(true))
    }
}

impl<T: Transport> ConnIo<T> {
    /// One write by `write` (tokio's `try_write`, which clears the readiness when the socket
    /// would block): the task waits for the reactor only then. A partial write (the send
    /// buffer full) leaves the readiness set, so the next write finds out with one more
    /// system call; rare, where the read side's short read is the usual case.
    ///
    /// A write that waits for the socket tells the connection ([`ConnWatch::write_blocked`])
    /// until one goes through.
    fn poll_write_with(
        &mut self,
        cx: &mut Context<'_>,
        mut write: impl FnMut(&T) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            match self.stream().poll_write_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    self.set_blocked(true);
                    return Poll::Pending;
                }
            }
            match write(self.stream()) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                written => {
                    if self.blocked {
                        self.set_blocked(false);
                    }
                    return Poll::Ready(written);
                }
            }
        }
    }

    /// A write waited for the socket (`blocked`), or one went through after: the connection
    /// did something then (the header-read timeout of its next request counts from the last
    /// bytes of a response the socket took, not from its body's end).
    #[cold]
    fn set_blocked(&mut self, blocked: bool) {
        if self.blocked != blocked {
            self.blocked = blocked;
            self.watch.write_blocked.store(blocked, Ordering::Relaxed);
            if !blocked {
                self.watch.touch();
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
        self.get_mut()
            .poll_write_with(cx, |stream| stream.try_write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_write_with(cx, |stream| stream.try_write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.stream().sock_ref().shutdown(std::net::Shutdown::Write))
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::mem::MaybeUninit;

    use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// A connected loopback pair: the client's end, and the server's wrapped as hyper sees it
    /// (with the other half, as the connection task keeps it).
    async fn pair() -> (
        TcpStream,
        ConnIo<TcpStream>,
        tokio::net::tcp::OwnedWriteHalf,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, peer) = listener.accept().await.unwrap();
        let finale = crate::Finale::builder().read_env(false).build().unwrap();
        let peer = crate::serve::tower::Peer::Tcp {
            peer,
            local: server.local_addr().unwrap(),
        };
        let watch = Arc::new(ConnWatch::new(peer, finale.handle()));
        let (read, reach) = server.into_split();
        let io = ConnIo {
            read,
            watch,
            sniffed: 0,
            blocked: false,
        };
        (client, io, reach)
    }

    /// One read into a buffer of `size` bytes (hyper-util's first read: the preface's size),
    /// once the server's end has something to read; what it read.
    async fn read(io: &mut ConnIo<TcpStream>, size: usize) -> Vec<u8> {
        io.stream().readable().await.unwrap();
        let mut storage = vec![MaybeUninit::uninit(); size];
        let mut buf = ReadBuf::uninit(&mut storage);
        poll_fn(|cx| Pin::new(&mut *io).poll_read(cx, &mut buf))
            .await
            .unwrap();
        buf.filled().to_vec()
    }

    #[tokio::test]
    async fn an_http1_request_is_peeked_at_first_and_then_read_whole() {
        let (mut client, mut io, _reach) = pair().await;
        let request = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n";
        client.write_all(request).await.unwrap();
        assert_eq!(
            read(&mut io, H2_PREFACE.len()).await,
            b"",
            "peeked, not read"
        );
        assert_eq!(io.sniffed, SNIFFED);
        assert_eq!(read(&mut io, 8192).await, request, "the request, whole");
        assert!(!io.watch.h2_preface.load(Ordering::Relaxed));
    }

    #[tokio::test]
    async fn what_may_still_be_the_preface_is_read_as_before() {
        // `P` alone, then the rest of an HTTP/1 request: `P` is read, and tells nothing yet.
        let (mut client, mut io, _reach) = pair().await;
        client.write_all(b"P").await.unwrap();
        assert_eq!(read(&mut io, H2_PREFACE.len()).await, b"P");
        client.write_all(b"OST / HTTP/1.1\r\n\r\n").await.unwrap();
        assert_eq!(
            read(&mut io, H2_PREFACE.len() - 1).await,
            b"OST / HTTP/1.1\r\n\r\n"
        );
        assert_eq!(io.sniffed, SNIFFED);
        assert!(!io.watch.h2_preface.load(Ordering::Relaxed));

        // The HTTP/2 preface in two parts: read, and the connection known HTTP/2.
        let (mut client, mut io, _reach) = pair().await;
        client.write_all(&H2_PREFACE[..16]).await.unwrap();
        assert_eq!(read(&mut io, H2_PREFACE.len()).await, &H2_PREFACE[..16]);
        client.write_all(&H2_PREFACE[16..]).await.unwrap();
        assert_eq!(read(&mut io, 8).await, &H2_PREFACE[16..]);
        assert!(io.watch.h2_preface.load(Ordering::Relaxed));

        // A client gone before sending anything: the end of the stream, as read.
        let (client, mut io, _reach) = pair().await;
        drop(client);
        assert_eq!(read(&mut io, H2_PREFACE.len()).await, b"");
        assert_ne!(io.sniffed, SNIFFED, "nothing told");
    }
}
