//! The endpoint's server: a plain thread with a `current_thread` runtime of its own, so it
//! serves whatever the user's runtime does (a wedged runtime, a drained server), and a small
//! HTTP/1.1 server that knows when an answer was written in full.
//!
//! # Why not hyper
//!
//! The final-scrape stage must know that the last byte of an answer was written to the socket.
//! hyper hands a body frame to its buffer and flushes it later, out of sight; here the answer is
//! one `write_all` of the head and the body, and its return is the moment. A scrape is a `GET`
//! without a body, so the server reads one request head at a time (keep-alive, pipelining),
//! answers `GET`/`HEAD` on its path and `404`/`405`/`400` otherwise, never `503`.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use super::scrapers::{Request, Scrapers};

/// The largest request head read: 16 KiB.
const MAX_HEAD: usize = 16 * 1024;
/// A request head must arrive in full this soon after its first byte, as for finale's servers.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection with no request under way is closed after this long: longer than any usual
/// scrape interval, so a scraper's kept-alive connection stays between scrapes.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Connections served at once; past this, new ones are closed at accept.
const MAX_CONNECTIONS: usize = 256;

pub(crate) type Render = Arc<dyn Fn() -> String + Send + Sync>;
pub(crate) type Upkeep = Box<dyn Fn() + Send>;

/// What the server serves.
pub(crate) struct App {
    pub(crate) path: String,
    pub(crate) render: Render,
    pub(crate) scrapers: Arc<Scrapers>,
}

/// The running server: closed by [`Server::close`] (or with the process).
#[derive(Debug)]
pub(crate) struct Server {
    close: watch::Sender<bool>,
    runtime: tokio::runtime::Handle,
}

impl Server {
    /// Starts serving `listener` on a new thread.
    ///
    /// The runtime is built on that thread and never leaves it: a runtime dropped inside the
    /// caller's async context (if the thread could not start, say) would panic.
    pub(crate) fn start(
        listener: std::net::TcpListener,
        app: App,
        upkeep: Option<(Duration, Upkeep)>,
    ) -> io::Result<Server> {
        listener.set_nonblocking(true)?;
        let (close, closed) = watch::channel(false);
        let (started, start) = std::sync::mpsc::channel();
        let app = Arc::new(app);
        std::thread::Builder::new()
            .name("finale-metrics".to_owned())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .enable_time()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = started.send(Err(e));
                        return;
                    }
                };
                let listener = {
                    let _entered = runtime.enter();
                    TcpListener::from_std(listener)
                };
                match listener {
                    Ok(listener) => {
                        let _ = started.send(Ok(runtime.handle().clone()));
                        runtime.block_on(serve(listener, app, upkeep, closed));
                        // Dropping the runtime drops every connection task: the sockets close.
                    }
                    Err(e) => {
                        let _ = started.send(Err(e));
                    }
                }
            })?;
        // The thread answers at once: it builds a runtime and registers one socket.
        let runtime = start
            .recv()
            .map_err(|_| io::Error::other("the endpoint's thread ended before it started"))??;
        Ok(Server { close, runtime })
    }

    /// Stops accepting and closes every connection. Returns whether this call closed it.
    pub(crate) fn close(&self) -> bool {
        !self.close.send_replace(true)
    }

    /// The server's runtime, for work that must not depend on the user's.
    pub(crate) fn runtime(&self) -> &tokio::runtime::Handle {
        &self.runtime
    }
}

async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    upkeep: Option<(Duration, Upkeep)>,
    mut closed: watch::Receiver<bool>,
) {
    let (period, upkeep) = match upkeep {
        Some((period, f)) => (period, Some(f)),
        None => (Duration::from_secs(3600), None),
    };
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_conn = 0u64;
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    // Closed by `close()` only: every handle dropped (an endpoint built and not registered)
    // leaves it serving until the process exits.
    let close = async move {
        if closed.wait_for(|c| *c).await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let mut close = std::pin::pin!(close);
    loop {
        tokio::select! {
            () = &mut close => return,
            _ = tick.tick() => {
                if let Some(f) = &upkeep {
                    f();
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        tracing::debug!(target: "finale", %peer, "metrics endpoint: too many connections");
                        continue;
                    };
                    next_conn += 1;
                    let app = app.clone();
                    tokio::spawn(async move {
                        connection(stream, peer, next_conn, app).await;
                        drop(slot);
                    });
                }
                Err(error) => {
                    // Out of file descriptors, say: try again shortly rather than spin.
                    tracing::debug!(target: "finale", %error, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        }
    }
}

async fn connection(mut stream: TcpStream, peer: SocketAddr, conn: u64, app: Arc<App>) {
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::with_capacity(1024);
    while let Some(keep_alive) = exchange(&mut stream, &mut buf, peer, conn, &app).await {
        if !keep_alive {
            break;
        }
    }
    app.scrapers.closed(conn);
}

/// Reads one request and answers it; `None` when the connection is done.
async fn exchange(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    peer: SocketAddr,
    conn: u64,
    app: &App,
) -> Option<bool> {
    // Idle until the first byte of a head, then `HEAD_TIMEOUT` for the rest of it.
    let mut by = tokio::time::Instant::now()
        + if buf.is_empty() {
            IDLE_TIMEOUT
        } else {
            HEAD_TIMEOUT
        };
    let head_end = loop {
        if let Some(end) = find_head_end(buf) {
            break end;
        }
        if buf.len() > MAX_HEAD {
            let _ = respond(
                stream,
                "431 Request Header Fields Too Large",
                "",
                false,
                true,
            )
            .await;
            return None;
        }
        let mut chunk = [0u8; 4096];
        let was_empty = buf.is_empty();
        match tokio::time::timeout_at(by, stream.read(&mut chunk)).await {
            Ok(Ok(0) | Err(_)) | Err(_) => return None,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
        if was_empty {
            by = tokio::time::Instant::now() + HEAD_TIMEOUT;
        }
    };
    let at = Instant::now();
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut headers);
    if !matches!(
        parsed.parse(&buf[..head_end]),
        Ok(httparse::Status::Complete(_))
    ) {
        let _ = respond(stream, "400 Bad Request", "", false, true).await;
        return None;
    }
    let header = |name: &str| {
        parsed
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(str::trim)
    };
    let close = header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
    let keep_alive = parsed.version == Some(1) && !close;
    let has_body =
        header("transfer-encoding").is_some() || header("content-length").is_some_and(|v| v != "0");
    let user_agent = header("user-agent").map(str::to_owned);
    let timeout = header("x-prometheus-scrape-timeout-seconds")
        .and_then(|v| v.parse::<f64>().ok())
        .and_then(|s| Duration::try_from_secs_f64(s).ok());
    let method = parsed.method.unwrap_or("").to_owned();
    let path = parsed
        .path
        .unwrap_or("")
        .split('?')
        .next()
        .unwrap_or("")
        .to_owned();
    buf.drain(..head_end);
    if has_body {
        // A scrape has no body; reading one is not worth the risk.
        let _ = respond(stream, "400 Bad Request", "", false, true).await;
        return None;
    }
    if path != app.path {
        return respond(stream, "404 Not Found", "", keep_alive, true)
            .await
            .ok()
            .map(|()| keep_alive);
    }
    let head_only = match method.as_str() {
        "GET" => false,
        "HEAD" => true,
        _ => {
            return respond(stream, "405 Method Not Allowed", "", keep_alive, true)
                .await
                .ok()
                .map(|()| keep_alive);
        }
    };
    let req = Request {
        conn,
        peer,
        user_agent,
        timeout,
        at,
    };
    // Only a GET is a scrape; it is recorded before the render, so a scrape that started after
    // the Telemetry phase began renders the final values.
    let scraper = (!head_only).then(|| app.scrapers.started(&req));
    let render = app.render.clone();
    let Ok(body) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| render())) else {
        tracing::error!(target: "finale", "metrics endpoint: the render panicked");
        let _ = respond(stream, "500 Internal Server Error", "", false, true).await;
        return None;
    };
    respond(stream, "200 OK", &body, keep_alive, head_only)
        .await
        .ok()?;
    if let Some(scraper) = scraper {
        app.scrapers
            .answered(scraper, &req, Instant::now(), count_samples(&body));
    }
    Some(keep_alive)
}

/// Writes one answer; returns once its last byte was handed to the socket.
async fn respond(
    stream: &mut TcpStream,
    status: &str,
    body: &str,
    keep_alive: bool,
    head_only: bool,
) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4; charset=utf-8\r\n\
         content-length: {}\r\n{}\r\n",
        body.len(),
        if keep_alive {
            ""
        } else {
            "connection: close\r\n"
        }
    );
    stream.write_all(head.as_bytes()).await?;
    if !head_only {
        stream.write_all(body.as_bytes()).await?;
    }
    stream.flush().await
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// The samples in an exposition: its lines that are neither comments nor empty.
pub(crate) fn count_samples(body: &str) -> u64 {
    body.lines()
        .filter(|l| {
            let l = l.trim_start();
            !l.is_empty() && !l.starts_with('#')
        })
        .count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_upkeep_runs_periodically_on_the_endpoint_thread() {
        use std::sync::atomic::{AtomicU64, Ordering};
        let runs = Arc::new(AtomicU64::new(0));
        let counted = runs.clone();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let app = App {
            path: "/metrics".to_owned(),
            render: Arc::new(String::new),
            scrapers: Arc::new(Scrapers::default()),
        };
        let upkeep: Upkeep = Box::new(move || {
            counted.fetch_add(1, Ordering::Relaxed);
        });
        let server =
            Server::start(listener, app, Some((Duration::from_millis(5), upkeep))).unwrap();
        // Bounded poll: three runs of a 5 ms period come well within 10 s.
        let deadline = Instant::now() + Duration::from_secs(10);
        while runs.load(Ordering::Relaxed) < 3 && Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert!(runs.load(Ordering::Relaxed) >= 3);
        assert!(server.close());
        assert!(!server.close());
    }

    #[test]
    fn samples_are_the_lines_that_are_not_comments() {
        let body = "# HELP a x\n# TYPE a counter\na 1\n\nb{x=\"1\"} 2\n";
        assert_eq!(count_samples(body), 2);
    }
}
