//! One served connection as its requests see it: who is on the other end, whether it is being
//! cut, and the name a request cut at the deadline gets in the report.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use http::uri::PathAndQuery;
use http::{Method, Uri};

use crate::Handle;
use crate::track::InFlightGuard;

/// Who is on the other end of a served connection, as its requests and the report name it.
#[derive(Clone, Debug)]
#[cfg_attr(not(feature = "tonic"), allow(dead_code))]
pub(crate) enum Peer {
    /// A TCP connection: the client's address (`127.0.0.1:5555` in the report) and the
    /// server's own end (tonic's `local_addr()`).
    Tcp { peer: SocketAddr, local: SocketAddr },
    /// A Unix domain socket connection. A client's socket rarely has a path of its own, so the
    /// report names the server's socket and, when the kernel tells it, the client's process:
    /// `pid 4321 on unix:/run/app.sock`.
    #[cfg(all(unix, any(feature = "axum", feature = "hyper", feature = "tonic")))]
    Unix {
        /// The client's address, as `accept` gave it (usually unnamed).
        addr: Arc<tokio::net::unix::SocketAddr>,
        /// The client's credentials (`SO_PEERCRED`), if the kernel gave them.
        cred: Option<tokio::net::unix::UCred>,
        /// The server's socket: `unix:/run/app.sock`.
        server: Arc<str>,
    },
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Tcp { peer, .. } => peer.fmt(f),
            #[cfg(all(unix, any(feature = "axum", feature = "hyper", feature = "tonic")))]
            Peer::Unix { cred, server, .. } => match cred.and_then(|cred| cred.pid()) {
                Some(pid) if pid > 0 => write!(f, "pid {pid} on {server}"),
                _ => f.write_str(server),
            },
        }
    }
}

/// One served connection, as the requests on it see it: who is on the other end, and whether
/// the server is cutting it at the drain deadline. Only finale's own servers make these.
#[derive(Debug)]
pub(crate) struct ConnWatch {
    pub(crate) peer: Peer,
    pub(crate) handle: Handle,
    /// Set by the first HTTP/2 request: connections not known to be HTTP/2 get a grace period.
    pub(crate) http2: AtomicBool,
    /// Set once the connection is known to be HTTP/2 before any request: its first bytes were
    /// the whole HTTP/2 preface, or its TLS handshake chose `h2`. Until then (or a first
    /// HTTP/2 request, `http2`) the header-read timeout bounds it, silent or not (an HTTP/2
    /// connection with no stream open is idle, not slow).
    #[cfg_attr(
        not(any(feature = "axum", feature = "hyper", feature = "tonic")),
        allow(dead_code)
    )]
    pub(crate) h2_preface: AtomicBool,
    /// Set just before the connection is dropped at the deadline: unfinished requests name
    /// themselves in the report as they are dropped.
    pub(crate) cutting: AtomicBool,
    /// How many requests of this connection named themselves.
    pub(crate) named: AtomicUsize,
    /// Requests of this connection admitted and not yet answered to their last byte. A
    /// connection with none and nothing left to write holds nothing: the drain may close it
    /// after the grace.
    pub(crate) active: AtomicUsize,
    /// Set while the socket takes no more of what the server writes (the client reads slower
    /// than the server writes): hyper still holds bytes of a response, possibly one whose body
    /// has ended (hyper takes a body's last chunk whole and drops the body). Such a connection
    /// is not idle, nor slow to send its next request.
    #[cfg_attr(
        not(any(feature = "axum", feature = "hyper", feature = "tonic")),
        allow(dead_code)
    )]
    pub(crate) write_blocked: AtomicBool,
    /// The name of this connection's HTTP/1 request in flight (HTTP/1 has one at a time: hyper
    /// reads the next request once the last one's response body has ended or been dropped),
    /// written as it is admitted into a buffer the connection keeps, so that naming a request
    /// costs no allocation of its own. (The name lives in the request's future, then in its
    /// response body, which is always the outermost one hyper holds, layers or not.)
    current: Mutex<Http1Name>,
    /// When the connection was accepted.
    accepted: tokio::time::Instant,
    /// When it was accepted, or its last request ended; not kept once the connection is known
    /// to be HTTP/2, where nothing reads it. (A lock, never contended: an `Instant` as is costs
    /// fewer instructions per request than one made a number.)
    last_active: Mutex<tokio::time::Instant>,
    /// Requests answered with an upgrade (`101`, or a `2xx` to an HTTP/2 extended CONNECT):
    /// each counts as in flight, and is named if cut, until the server's connection task lets
    /// it go (the upgraded socket closed, or the connection ended).
    pub(crate) upgrades: Mutex<Vec<Upgrade>>,
    /// Notified when the connection's socket is dropped: by hyper, or, after an HTTP/1
    /// upgrade, by the handler that took it over.
    #[cfg_attr(
        not(any(feature = "axum", feature = "hyper", feature = "tonic")),
        allow(dead_code)
    )]
    pub(crate) io_dropped: tokio::sync::Notify,
}

impl ConnWatch {
    #[cfg_attr(
        not(any(feature = "axum", feature = "hyper", feature = "tonic")),
        allow(dead_code)
    )]
    pub(crate) fn new(peer: Peer, handle: Handle) -> Self {
        let accepted = tokio::time::Instant::now();
        Self {
            peer,
            handle,
            http2: AtomicBool::new(false),
            h2_preface: AtomicBool::new(false),
            cutting: AtomicBool::new(false),
            named: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            write_blocked: AtomicBool::new(false),
            current: Mutex::new(Http1Name::default()),
            accepted,
            last_active: Mutex::new(accepted),
            upgrades: Mutex::new(Vec::new()),
            io_dropped: tokio::sync::Notify::new(),
        }
    }

    /// When the connection was accepted.
    #[cfg_attr(
        not(any(feature = "axum", feature = "hyper", feature = "tonic")),
        allow(dead_code)
    )]
    pub(crate) fn accepted(&self) -> tokio::time::Instant {
        self.accepted
    }

    /// The name of this connection's last HTTP/1 request (its one in flight, if any): on an
    /// HTTP/1 connection, the request whose response is going out. `None` on a connection
    /// known to be HTTP/2, or before its first request.
    #[cfg_attr(
        not(any(feature = "axum", feature = "hyper", feature = "tonic")),
        allow(dead_code)
    )]
    pub(crate) fn http1_request_name(&self) -> Option<String> {
        if self.http2.load(Ordering::Relaxed) || self.h2_preface.load(Ordering::Relaxed) {
            return None;
        }
        let current = crate::state::lock(&self.current);
        (!current.target.is_empty())
            .then(|| request_name(&current.method, &current.target, &self.peer))
    }

    /// This connection did something now (a request ended, a response's last bytes went to
    /// the socket). Not kept once it is known to be HTTP/2, where nothing reads it.
    #[inline]
    pub(crate) fn touch(&self) {
        if !self.http2.load(Ordering::Relaxed) {
            *crate::state::lock(&self.last_active) = tokio::time::Instant::now();
        }
    }

    /// When this connection last did something: accepted, or its last request ended.
    #[cfg_attr(
        not(any(feature = "axum", feature = "hyper", feature = "tonic")),
        allow(dead_code)
    )]
    pub(crate) fn last_active(&self) -> tokio::time::Instant {
        *crate::state::lock(&self.last_active)
    }
}

/// How many HTTP/2 extended CONNECT streams a connection remembers, to name them if it is cut.
const MAX_H2_UPGRADE_NAMES: usize = 16;

/// A request whose connection was upgraded (a WebSocket, an HTTP/2 extended CONNECT): in
/// flight while it lives, and named if it is cut.
#[derive(Debug)]
pub(crate) struct Upgrade {
    _guard: Option<InFlightGuard>,
    /// `GET /ws from 127.0.0.1:5555`: method and path, never the query.
    #[cfg_attr(
        not(any(feature = "axum", feature = "hyper", feature = "tonic")),
        allow(dead_code)
    )]
    pub(crate) name: String,
}

/// What an admitted request on one of finale's connections remembers so that, if it is cut at
/// the deadline, the report can name it ("GET /events from 127.0.0.1:5555"), and that its
/// connection counts it as active while it lives.
///
/// The name is the method and the path only: a query string may carry a token or a signed URL,
/// and the report goes to logs and telemetry.
pub(crate) struct CutName {
    pub(super) conn: Arc<ConnWatch>,
    /// An HTTP/2 stream's own name (streams run side by side), made on the stream's task
    /// ([`name_stream`](Self::name_stream)). `None` on HTTP/1: the name is the connection's
    /// [`current`](ConnWatch::current).
    own: Option<Box<(Method, Target)>>,
}

/// What an HTTP/2 stream's name keeps of its URI: the path and query of the usual request (one
/// shared buffer, cheap to keep), the whole URI otherwise (an authority-form CONNECT).
#[cfg_attr(
    not(any(feature = "axum", feature = "hyper", feature = "tonic")),
    allow(dead_code)
)]
enum Target {
    Path(PathAndQuery),
    Uri(Box<Uri>),
}

/// The name of a connection's HTTP/1 request in flight: its method, and its target as the
/// report shows it ([`uri_target`]), at most a few bytes past [`MAX_NAME_PART`] (enough for
/// [`bounded`] to see it was longer). The target's buffer is the connection's, reused by each
/// request.
#[derive(Debug, Default)]
struct Http1Name {
    method: Method,
    target: String,
}

impl Http1Name {
    #[inline(always)]
    fn set(&mut self, method: &Method, uri: &Uri) {
        if self.method != *method {
            method.clone_into(&mut self.method);
        }
        let target = uri_target(uri);
        // A character is at most 4 bytes: the cut keeps more than `MAX_NAME_PART` bytes of a
        // longer target.
        let mut end = target.len().min(MAX_NAME_PART + 4);
        while !target.is_char_boundary(end) {
            end -= 1;
        }
        self.target.clear();
        self.target.push_str(&target[..end]);
    }
}

impl CutName {
    /// An admitted request's name, counted as active on its connection. On HTTP/1, written into
    /// the connection's buffer now; an HTTP/2 stream's own is made on the stream's task, by
    /// [`name_stream`](Self::name_stream).
    #[inline(always)]
    pub(super) fn new(method: &Method, uri: &Uri, conn: Arc<ConnWatch>, http1: bool) -> Self {
        conn.active.fetch_add(1, Ordering::Relaxed);
        if http1 {
            crate::state::lock(&conn.current).set(method, uri);
        }
        Self { conn, own: None }
    }

    /// An HTTP/2 stream's own name, kept before its request goes to the service.
    #[cfg(any(feature = "axum", feature = "hyper", feature = "tonic"))]
    #[inline]
    pub(super) fn name_stream(&mut self, method: &Method, uri: &Uri) {
        let target = match uri.path_and_query() {
            Some(path) if !path.as_str().is_empty() => Target::Path(path.clone()),
            _ => Target::Uri(Box::new(uri.clone())),
        };
        self.own = Some(Box::new((method.clone(), target)));
    }

    /// Called on drop of an unfinished request or body: names it in the report if its
    /// connection is being cut. `request`: the request itself, if it never reached the service
    /// (an HTTP/2 stream has no name of its own until then).
    #[inline]
    pub(super) fn record_if_cut(&self, what: &str, request: Option<(&Method, &Uri)>) {
        if self.conn.cutting.load(Ordering::Relaxed) || self.conn.handle.shared.is_escalated() {
            self.record_cut(what, request);
        }
    }

    #[cold]
    fn record_cut(&self, what: &str, request: Option<(&Method, &Uri)>) {
        // Relaxed: the server sets `cutting` and then drops the connection on the same task,
        // so this drop is sequenced after the store. (HTTP/2 streams run on tasks of their own
        // and are dropped later; `cutting` was set before, and the connection does not name
        // itself while it has active requests, so each stream is named once.)
        //
        // A second signal abandons the drain: the server's task is aborted, its connections
        // are dropped without a cut, and an unfinished request names itself as it is dropped.
        let when = if self.conn.cutting.load(Ordering::Relaxed) {
            "at the drain deadline"
        } else if self.conn.handle.shared.is_escalated() {
            "when a second signal abandoned the drain"
        } else {
            return;
        };
        self.conn.named.fetch_add(1, Ordering::Relaxed);
        self.conn
            .handle
            .shared
            .record_cut(format!("{} ({what} {when})", self.name(request)));
    }
}

impl CutName {
    /// The name of this request in the report: method and path (a tunnel's target for an
    /// HTTP/1 CONNECT), never the query. `request`: the request itself, if it is still at hand.
    fn name(&self, request: Option<(&Method, &Uri)>) -> String {
        let peer = &self.conn.peer;
        match (self.own.as_deref(), request) {
            (Some((method, Target::Path(path))), _) => request_name(method, path.path(), peer),
            (Some((method, Target::Uri(uri))), _) => request_name(method, uri_target(uri), peer),
            (None, Some((method, uri))) => request_name(method, uri_target(uri), peer),
            (None, None) => {
                let current = crate::state::lock(&self.conn.current);
                request_name(&current.method, &current.target, peer)
            }
        }
    }

    /// The request was answered with an upgrade. HTTP/1: the connection's task keeps `guard`
    /// (the request stays in flight) until the upgraded socket is dropped, and names it if cut.
    /// HTTP/2: finale cannot see one upgraded stream end, only its connection; the guard goes
    /// now (the connection, which the drain waits for, stays open while the stream does) and
    /// the name is kept, for at most [`MAX_H2_UPGRADE_NAMES`] streams per connection.
    pub(super) fn upgraded(&self, guard: InFlightGuard, http1: bool) {
        let mut upgrades = crate::state::lock(&self.conn.upgrades);
        if http1 {
            upgrades.push(Upgrade {
                _guard: Some(guard),
                name: self.name(None),
            });
            return;
        }
        drop(guard);
        if upgrades.len() >= MAX_H2_UPGRADE_NAMES {
            upgrades.remove(0);
        }
        upgrades.push(Upgrade {
            _guard: None,
            name: self.name(None),
        });
    }
}

impl Drop for CutName {
    #[inline]
    fn drop(&mut self) {
        // The last activity is read only of connections not known to be HTTP/2 (the idle
        // grace, the slow-client timer): an HTTP/2 stream's end does not read the clock.
        self.conn.touch();
        // Release: whoever sees the count drop also sees this request's `named` increment.
        self.conn.active.fetch_sub(1, Ordering::Release);
    }
}

/// How many bytes of a method, and of a path or authority, a request's name in the report
/// keeps; a longer one is cut there and ends with `…`.
const MAX_NAME_PART: usize = 128;

/// A request's name in the report: `GET /events from 127.0.0.1:5555`. The method and `target`, the path
/// (a tunnel's target for an HTTP/1 CONNECT), never the query, nor the userinfo of an authority
/// (`CONNECT user:password@host:443` is named `CONNECT host:443`): the report goes to logs and
/// telemetry. Each part is bounded ([`MAX_NAME_PART`] bytes).
fn request_name(method: &Method, target: &str, peer: &Peer) -> String {
    format!(
        "{} {} from {peer}",
        bounded(method.as_str()),
        bounded(target)
    )
}

/// What a request's name shows of `uri`: its path, or a tunnel's target without userinfo.
#[inline(always)]
fn uri_target(uri: &Uri) -> &str {
    match uri.authority() {
        Some(authority) if uri.path().is_empty() => {
            let authority = authority.as_str();
            // The userinfo ends at the last `@` (a password may hold one too).
            authority
                .rsplit_once('@')
                .map_or(authority, |(_, host)| host)
        }
        _ => uri.path(),
    }
}

/// `text` cut to at most [`MAX_NAME_PART`] bytes (on a character boundary), marked with `…`.
fn bounded(text: &str) -> std::borrow::Cow<'_, str> {
    if text.len() <= MAX_NAME_PART {
        return text.into();
    }
    let mut end = MAX_NAME_PART;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end]).into()
}
