//! Clients that read a response slower than the server writes it. hyper takes a body's last
//! chunk (a whole `Bytes`, say) into its write buffer and drops the body before the socket has
//! taken those bytes: the request has ended for finale, and the response is still going out.
//! Such a connection is neither idle (the drain's idle grace) nor slow to send its next request
//! (the header-read timeout): it stays open while the response goes out, however slowly the
//! client reads it, and the drain's deadline cuts what is left, named in the report.
#![cfg(unix)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use bytes::Bytes;
use finale::{Finale, Handle, ShutdownReport};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use common::served::{builder, finish, serve_axum, started};

const BOUND: Duration = Duration::from_secs(20);

/// Larger than what the kernel's buffers hold on loopback (a few MiB): hyper still holds the
/// rest of it when its body has ended.
const BIG: usize = 12 << 20;

/// The header-read timeout of the servers here: the slow client's bound.
const TIMEOUT: Duration = Duration::from_millis(200);

/// A server of one large response, `GET /big`, as one chunk.
async fn serve_big(finale: Finale) -> (std::net::SocketAddr, Handle, JoinHandle<ShutdownReport>) {
    let body = Bytes::from(vec![b'x'; BIG]);
    let app = Router::new()
        .route("/big", get(move || std::future::ready(body.clone())))
        .route("/small", get(|| async { "small" }));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    finale::axum::HttpServer::new("big")
        .header_read_timeout(TIMEOUT)
        .idle_grace(Duration::from_millis(100))
        .serve(&finale, listener, app)
        .unwrap();
    let (handle, run) = started(finale).await;
    (addr, handle, run)
}

/// A client with a small receive buffer that has asked for `/big` and read its head.
async fn ask_big(addr: std::net::SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let mut conn = socket.connect(addr).await.unwrap();
    conn.write_all(b"GET /big HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut conn).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains(&format!("content-length: {BIG}")), "{head}");
    conn
}

async fn read_head<S: AsyncRead + Unpin>(conn: &mut S) -> String {
    let mut head = Vec::new();
    let mut byte = [0; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(BOUND, conn.read(&mut byte))
            .await
            .expect("the head within the bound")
            .unwrap();
        assert_eq!(n, 1, "closed in the head: {head:?}");
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).to_ascii_lowercase()
}

/// Reads the body at most 16 KiB (its receive buffer) every 3 ms, about 5 MiB/s (a slow
/// client's pace, far slower than loopback's), until `BIG` bytes (no byte past them) or the end
/// of the stream; how many bytes it read.
async fn read_slowly(conn: &mut TcpStream) -> usize {
    let mut read = 0;
    let mut buf = vec![0; 64 * 1024];
    let mut pace = tokio::time::interval(Duration::from_millis(3));
    let reading = async {
        while read < BIG {
            pace.tick().await;
            let room = buf.len().min(BIG - read);
            match conn.read(&mut buf[..room]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => read += n,
            }
        }
    };
    tokio::time::timeout(BOUND, reading)
        .await
        .expect("the body, or the end of the stream, within the bound");
    read
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_response_read_slowly_arrives_whole_while_serving() {
    let (addr, handle, run) = serve_big(builder(Duration::from_secs(5)).build().unwrap()).await;
    let mut conn = ask_big(addr).await;
    // Seconds of reading, many header-read timeouts long, the client reading all along.
    let read = read_slowly(&mut conn).await;
    handle.trigger("test");
    let report = finish(run).await;
    assert_eq!(read, BIG, "the response was cut short; {report}");
    assert!(report.is_clean(), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_response_read_slowly_arrives_whole_across_the_drain() {
    let (addr, handle, run) = serve_big(builder(Duration::from_secs(10)).build().unwrap()).await;
    let mut conn = ask_big(addr).await;
    // The drain starts with the response on its way: its request has ended for finale (hyper
    // holds the body's bytes), the idle grace (100 ms) ends long before the client has read.
    handle.trigger("test");
    let read = read_slowly(&mut conn).await;
    let report = finish(run).await;
    assert_eq!(read, BIG, "the response was cut short; {report}");
    assert!(report.is_clean(), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_still_unread_at_the_drain_deadline_is_cut_and_named() {
    let (addr, handle, run) =
        serve_big(builder(Duration::from_millis(1500)).build().unwrap()).await;
    let _conn = ask_big(addr).await;
    // The client reads nothing more: the connection holds the drain until its deadline.
    handle.trigger("test");
    let report = finish(run).await;
    assert_eq!(report.cut.len(), 1, "{report}");
    assert!(
        report.cut[0].starts_with("GET /big from 127.0.0.1:")
            && report.cut[0].ends_with("(response still being written at the drain deadline)"),
        "{report}"
    );
}

/// A request pipelined while its predecessor's handler runs, after hyper read that one: it
/// stays in the kernel, and nothing has told tokio's reactor it came (one runtime thread,
/// busy). The answer before it (`Connection: close`, 512 KiB, all of it in the socket's
/// buffers at once) still reaches a client that reads it slowly: the socket is not closed with
/// the request unread under it (which would reset the connection and throw the answer's end
/// away).
#[tokio::test(flavor = "current_thread")]
async fn a_request_pipelined_while_the_answer_before_it_is_made_does_not_reset_that_answer() {
    const ANSWER: usize = 512 << 10;
    let started = Arc::new(Notify::new());
    let go = Arc::new(Notify::new());
    let app = {
        let (started, go) = (started.clone(), go.clone());
        Router::new()
            .route(
                "/gated",
                get(move || {
                    let (started, go) = (started.clone(), go.clone());
                    async move {
                        started.notify_one();
                        go.notified().await;
                        Bytes::from(vec![b'x'; ANSWER])
                    }
                }),
            )
            .route("/small", get(|| async { "small" }))
    };
    let (addr, handle, run) =
        serve_axum(builder(Duration::from_secs(5)).build().unwrap(), app).await;
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let mut conn = socket.connect(addr).await.unwrap();
    conn.write_all(
        b"GET /gated HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\nGET /small HTTP/1.1\r\nHost: t\r\n\r\n",
    )
    .await
    .unwrap();
    started.notified().await;
    conn.write_all(b"GET /small HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    go.notify_one();
    let head = read_head(&mut conn).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let mut read = 0;
    let mut buf = vec![0; 16 * 1024];
    let mut pace = tokio::time::interval(Duration::from_millis(3));
    let mut ended = Ok(());
    while read < ANSWER {
        pace.tick().await;
        match conn.read(&mut buf[..(ANSWER - read).min(16 * 1024)]).await {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(e) => {
                ended = Err(e);
                break;
            }
        }
    }
    handle.trigger("test");
    let report = finish(run).await;
    assert_eq!(
        read, ANSWER,
        "the answer was cut short: {ended:?}; {report}"
    );
}

/// `/big` and `/small` in one write (hyper reads both), then `/small` again once `/big`'s head
/// has come: hyper's read buffer is not empty, so that one stays in the kernel.
async fn pipeline_three(addr: std::net::SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let mut conn = socket.connect(addr).await.unwrap();
    conn.write_all(
        b"GET /big HTTP/1.1\r\nHost: test\r\n\r\nGET /small HTTP/1.1\r\nHost: test\r\n\r\n",
    )
    .await
    .unwrap();
    let head = read_head(&mut conn).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    conn.write_all(b"GET /small HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    conn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_pipelined_behind_a_slowly_read_response_does_not_cut_it_at_the_drain() {
    let (addr, handle, run) = serve_big(builder(Duration::from_secs(10)).build().unwrap()).await;
    let mut conn = pipeline_three(addr).await;
    // The drain starts with `/big` going out and a request unread in the kernel: the
    // connection is left to read its next request (a request on its way is served, with
    // `Connection: close`) and closed after it, and the socket not before the client is done.
    handle.trigger("test");
    let read = read_slowly(&mut conn).await;
    assert_eq!(read, BIG, "the response was cut short");
    let next = read_head(&mut conn).await;
    let report = finish(run).await;
    assert!(
        next.starts_with("http/1.1 200") && next.contains("connection: close"),
        "{next}"
    );
    assert!(report.is_clean(), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_pipelined_behind_a_slowly_read_response_does_not_cut_it_in_the_drain_delay() {
    let finale = builder(Duration::from_secs(10))
        .drain_delay(Duration::from_secs(3))
        .total_budget(Duration::from_secs(20))
        .build()
        .unwrap();
    let (addr, handle, run) = serve_big(finale).await;
    handle.trigger("test");
    handle.phase_started(finale::Phase::Announce).await;
    // Answered with `Connection: close` (the shutdown is announced): hyper closes the
    // connection after `/big`, with the third request unread in the socket.
    let mut conn = pipeline_three(addr).await;
    let read = read_slowly(&mut conn).await;
    let report = finish(run).await;
    assert_eq!(read, BIG, "the response was cut short; {report}");
}

/// A client's socket that reads at most `budget` bytes, then nothing more: a client that stops
/// reading a response. A stand-in around a real socket, because hyper's HTTP/2 client reads all
/// its window allows as soon as it arrives, and cannot be told to stop.
struct StopsReading {
    inner: TcpStream,
    budget: usize,
}

impl AsyncRead for StopsReading {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.budget == 0 {
            // Never woken for reading again: the client reads nothing more.
            return std::task::Poll::Pending;
        }
        let room = buf.remaining().min(self.budget);
        let mut part = tokio::io::ReadBuf::new(buf.initialize_unfilled_to(room));
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, &mut part);
        let n = part.filled().len();
        buf.advance(n);
        self.budget -= n;
        polled
    }
}

impl tokio::io::AsyncWrite for StopsReading {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_response_still_unread_at_the_drain_deadline_names_its_connection() {
    // An HTTP/2 client with a window larger than the response: hyper takes the body's one
    // chunk whole and the stream ends for finale, its bytes still waiting for the socket. The
    // connection's streams are not one request: the report names the connection.
    let (addr, handle, run) =
        serve_big(builder(Duration::from_millis(1500)).build().unwrap()).await;
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let io = StopsReading {
        inner: socket.connect(addr).await.unwrap(),
        // The server's settings, the response's head, a little of its body.
        budget: 64 * 1024,
    };
    let (mut send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(32 << 20)
            .initial_connection_window_size(32 << 20)
            .handshake(hyper_util::rt::TokioIo::new(io))
            .await
            .unwrap();
    tokio::spawn(conn);
    let request = http::Request::get("http://test/big")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let response = tokio::time::timeout(BOUND, send.send_request(request))
        .await
        .expect("the response's head within the bound")
        .unwrap();
    assert_eq!(response.status(), 200);
    // The stream has ended for finale: nothing in flight, its bytes in hyper's buffers.
    assert_eq!(common::served::wait_in_flight(&handle, 0).await, 0);
    handle.trigger("test");
    let report = finish(run).await;
    assert_eq!(report.cut.len(), 1, "{report}");
    assert!(
        report.cut[0].starts_with("connection from 127.0.0.1:")
            && report.cut[0].ends_with("(a response still being written at the drain deadline)"),
        "{report}"
    );
    drop(response);
}
