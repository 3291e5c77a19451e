//! Real components for integration tests: a Prometheus Pushgateway and an
//! OTLP collector (`rotel`), each started as a child process on free loopback
//! ports and killed by PID when its handle is dropped.
//!
//! std only, so any test can `mod common;` it without extra dev-dependencies.
//!
//! Missing binaries: outside CI a test that cannot find a component says so
//! loudly on stderr and skips (the `start` functions return `None`); under
//! `CI=true` a missing component is a failure (panic), never a silent skip.
//! `.ci/run` installs both components.
//!
//! A component whose binary exists but does not come up is always a failure.

// Each test binary uses only part of this module.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Binary of the Debian package `prometheus-pushgateway`.
pub(crate) const PUSHGATEWAY_BIN: &str = "prometheus-pushgateway";
/// Binary shipped in the PyPI wheel `rotel` (pinned in `.ci/run`).
pub(crate) const ROTEL_BIN: &str = "rotel-agent";

/// How long a component may take to answer on its ports after spawn.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Port races (another process grabbing a port between our probe and the
/// child's bind) are retried with fresh ports this many times.
const START_ATTEMPTS: usize = 3;
const POLL_INTERVAL: Duration = Duration::from_millis(20);
const HTTP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const HTTP_IO_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Generic helpers
// ---------------------------------------------------------------------------

/// Whether this run is under CI (`CI=true` or `CI=1`).
pub(crate) fn in_ci() -> bool {
    std::env::var("CI")
        .map(|v| v.eq_ignore_ascii_case("true") || v == "1")
        .unwrap_or(false)
}

/// Finds an executable named `name` on `PATH`.
pub(crate) fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

#[cfg(unix)]
fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(not(unix))]
fn is_executable(path: &Path) -> bool {
    path.is_file() || path.with_extension("exe").is_file()
}

/// Returns whether the binary `name` is on `PATH`.
///
/// When it is missing: under CI (`CI=true`) this panics, because a missing
/// component must fail CI; otherwise it prints a loud message to stderr and
/// returns `false` so the caller can skip.
pub(crate) fn require(name: &str) -> bool {
    if find_binary(name).is_some() {
        return true;
    }
    if in_ci() {
        panic!(
            "required test component `{name}` is not on PATH; under CI=true a missing \
             component is a failure (.ci/run installs it)"
        );
    }
    let banner = "!".repeat(78);
    let _ = writeln!(
        io::stderr(),
        "{banner}\nSKIPPING: test component `{name}` is not on PATH.\n\
         Run .ci/run (or install it) to run this test for real.\n{banner}"
    );
    false
}

/// Polls `cond` every few milliseconds until it returns `true` or `timeout`
/// has passed; returns the last result. For waiting on an observable
/// condition with a bound, never as a sleep to synchronise.
pub(crate) fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Asks the kernel for `n` distinct free loopback ports. All listeners are
/// held until every port is chosen, so the ports differ from each other.
pub(crate) fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local_addr").port())
        .collect()
}

/// One free loopback port (bind `127.0.0.1:0`, read the port, drop).
pub(crate) fn free_port() -> u16 {
    free_ports(1)[0]
}

/// Whether something accepts TCP connections on `127.0.0.1:port`.
pub(crate) fn port_open(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// A fresh, uniquely named directory under the system temp dir.
fn fresh_temp_dir(component: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    loop {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!(
            "finale-test-{component}-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(name);
        match fs::create_dir(&dir) {
            Ok(()) => return dir,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => panic!("cannot create temp dir {}: {e}", dir.display()),
        }
    }
}

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// The last `max_lines` lines of `text`, for failure messages.
fn tail(text: &str, max_lines: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(max_lines)..].join("\n")
}

/// A child process in its own temp dir, with stdout/stderr sent to files
/// there (files, not pipes: nobody has to keep reading them). Killed by PID
/// and its dir removed on drop.
#[derive(Debug)]
struct Proc {
    child: Option<Child>,
    dir: PathBuf,
    name: &'static str,
}

impl Proc {
    fn spawn(name: &'static str, dir: PathBuf, args: &[String]) -> Proc {
        let stdout = File::create(dir.join("stdout.log")).expect("create stdout.log");
        let stderr = File::create(dir.join("stderr.log")).expect("create stderr.log");
        let child = Command::new(name)
            .args(args)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn `{name}`: {e}"));
        Proc {
            child: Some(child),
            dir,
            name,
        }
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `Some(status)` once the child has exited (or was stopped).
    fn exited(&mut self) -> Option<String> {
        match self.child.as_mut() {
            None => Some("stopped".to_owned()),
            Some(child) => match child.try_wait() {
                Ok(Some(status)) => Some(status.to_string()),
                Ok(None) => None,
                Err(e) => Some(format!("try_wait failed: {e}")),
            },
        }
    }

    fn stdout(&self) -> String {
        read_lossy(&self.dir.join("stdout.log"))
    }

    fn stderr(&self) -> String {
        read_lossy(&self.dir.join("stderr.log"))
    }

    fn diagnostics(&self) -> String {
        format!(
            "--- {} stdout (tail) ---\n{}\n--- {} stderr (tail) ---\n{}",
            self.name,
            tail(&self.stdout(), 30),
            self.name,
            tail(&self.stderr(), 30)
        )
    }

    /// Kills the child by PID (SIGKILL) and reaps it. Idempotent.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits until `ready` holds while the child stays alive.
    /// `Ok(())` when ready, `Err(exit)` if the child exited first; panics on
    /// timeout.
    fn wait_ready(&mut self, mut ready: impl FnMut() -> bool) -> Result<(), String> {
        let mut exit = None;
        let ok = wait_until(READY_TIMEOUT, || {
            exit = self.exited();
            exit.is_some() || ready()
        });
        // The port may answer from someone else if the child lost the bind
        // race: only a live child counts as ready.
        if let Some(status) = exit.or_else(|| self.exited()) {
            return Err(status);
        }
        if !ok {
            let diag = self.diagnostics();
            self.stop();
            panic!(
                "`{}` did not become ready within {READY_TIMEOUT:?}\n{diag}",
                self.name
            );
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Spawns a component with fresh ports until it becomes ready, retrying a
/// few times when the child exits early (e.g. a port taken in between).
fn start_with_retries(
    name: &'static str,
    component: &str,
    port_count: usize,
    args: impl Fn(&[u16], &Path) -> Vec<String>,
    ready: impl Fn(&[u16]) -> bool,
) -> (Proc, Vec<u16>) {
    let mut failures = String::new();
    for attempt in 1..=START_ATTEMPTS {
        let ports = free_ports(port_count);
        let dir = fresh_temp_dir(component);
        let argv = args(&ports, &dir);
        let mut proc = Proc::spawn(name, dir, &argv);
        match proc.wait_ready(|| ready(&ports)) {
            Ok(()) => return (proc, ports),
            Err(status) => {
                let _ = write!(
                    failures,
                    "\nattempt {attempt}: `{name} {}` exited early ({status})\n{}",
                    argv.join(" "),
                    proc.diagnostics()
                );
            }
        }
    }
    panic!("`{name}` failed to start {START_ATTEMPTS} times:{failures}");
}

// ---------------------------------------------------------------------------
// A tiny HTTP/1.1 client (std only, with timeouts, `Connection: close`)
// ---------------------------------------------------------------------------

/// A complete HTTP response.
#[derive(Debug, Clone)]
pub(crate) struct HttpResponse {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
}

impl HttpResponse {
    /// The first header named `name` (case-insensitive).
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as (lossy) UTF-8.
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends one HTTP/1.1 request to `url` (`http://host:port/path`) and reads
/// the whole response. Connect timeout 5 s, read/write timeouts 10 s.
pub(crate) fn http_request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<HttpResponse> {
    let invalid = |msg: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("{msg}: {url}"));
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| invalid("only http:// URLs are supported"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = authority
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| invalid("cannot resolve"))?;

    let mut stream = TcpStream::connect_timeout(&addr, HTTP_CONNECT_TIMEOUT)?;
    stream.set_read_timeout(Some(HTTP_IO_TIMEOUT))?;
    stream.set_write_timeout(Some(HTTP_IO_TIMEOUT))?;

    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\
         Content-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        let _ = write!(request, "{name}: {value}\r\n");
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes())?;
    stream.write_all(body)?;
    stream.flush()?;

    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> io::Result<HttpResponse> {
    let bad = |msg: &str| io::Error::new(io::ErrorKind::InvalidData, msg.to_owned());
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of HTTP head"))?;
    let head = String::from_utf8_lossy(&raw[..head_end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or_else(|| bad("empty response"))?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut response = HttpResponse {
        status,
        headers,
        body: Vec::new(),
    };
    let payload = &raw[head_end + 4..];
    let chunked = response
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    response.body = if chunked {
        decode_chunked(payload).ok_or_else(|| bad("bad chunked body"))?
    } else if let Some(len) = response
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        payload
            .get(..len)
            .ok_or_else(|| bad("short body"))?
            .to_vec()
    } else {
        payload.to_vec()
    };
    Ok(response)
}

fn decode_chunked(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..line_end]).ok()?;
        let size_hex = size_text.split(';').next()?.trim();
        let size = usize::from_str_radix(size_hex, 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

// ---------------------------------------------------------------------------
// Prometheus text format
// ---------------------------------------------------------------------------

/// One sample of the Prometheus text exposition format.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Sample {
    pub(crate) name: String,
    pub(crate) labels: Vec<(String, String)>,
    pub(crate) value: f64,
}

impl Sample {
    /// Whether every `(name, value)` in `wanted` is among this sample's labels.
    pub(crate) fn has_labels(&self, wanted: &[(&str, &str)]) -> bool {
        wanted
            .iter()
            .all(|(k, v)| self.labels.iter().any(|(lk, lv)| lk == k && lv == v))
    }
}

/// Parses every sample line of a Prometheus text exposition (comments and
/// malformed lines are skipped).
pub(crate) fn parse_samples(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_sample_line).collect()
}

fn parse_sample_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .unwrap_or(line.len());
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        let mut chars = after_brace.char_indices().peekable();
        let consumed = loop {
            // Skip separators, find the label name.
            while let Some(&(_, c)) = chars.peek() {
                if c == ',' || c.is_whitespace() {
                    chars.next();
                } else {
                    break;
                }
            }
            let &(start, c) = chars.peek()?;
            if c == '}' {
                break start + 1;
            }
            let mut key_end = start;
            for (i, c) in chars.by_ref() {
                if c == '=' {
                    key_end = i;
                    break;
                }
            }
            let key = after_brace[start..key_end].trim().to_owned();
            if chars.next()?.1 != '"' {
                return None;
            }
            let mut value = String::new();
            loop {
                let (_, c) = chars.next()?;
                match c {
                    '"' => break,
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    other => value.push(other),
                }
            }
            labels.push((key, value));
        };
        rest = &after_brace[consumed..];
    }
    let value = rest.split_whitespace().next()?.parse::<f64>().ok()?;
    Some(Sample {
        name,
        labels,
        value,
    })
}

// ---------------------------------------------------------------------------
// Prometheus Pushgateway
// ---------------------------------------------------------------------------

/// A `prometheus-pushgateway` on a free loopback port, in-memory only
/// (`--persistence.file=` empty), with the admin API enabled.
#[derive(Debug)]
pub(crate) struct Pushgateway {
    proc: Proc,
    port: u16,
    scheme: &'static str,
}

impl Pushgateway {
    /// Starts a Pushgateway and waits until `GET /-/ready` answers 200.
    ///
    /// `None` (after a loud message) if the binary is missing outside CI;
    /// panics under CI or if it does not come up.
    pub(crate) fn start() -> Option<Pushgateway> {
        if !require(PUSHGATEWAY_BIN) {
            return None;
        }
        let (proc, ports) = start_with_retries(
            PUSHGATEWAY_BIN,
            "pushgateway",
            1,
            |ports, _dir| {
                vec![
                    format!("--web.listen-address=127.0.0.1:{}", ports[0]),
                    // Empty value (no quotes: there is no shell here) keeps
                    // metrics in memory only.
                    "--persistence.file=".to_owned(),
                    "--web.enable-admin-api".to_owned(),
                    "--log.level=warn".to_owned(),
                ]
            },
            |ports| {
                http_request(
                    "GET",
                    &format!("http://127.0.0.1:{}/-/ready", ports[0]),
                    &[],
                    &[],
                )
                .is_ok_and(|r| r.status == 200)
            },
        );
        Some(Pushgateway {
            proc,
            port: ports[0],
            scheme: "http",
        })
    }

    /// Starts a Pushgateway with `--web.config.file=<web_config>`: TLS (`tls_server_config`)
    /// and/or basic auth (`basic_auth_users`), in the Prometheus exporter-toolkit format.
    /// `https` says whether the file turns TLS on, for [`url`](Self::url).
    ///
    /// Every endpoint then needs the same TLS and credentials, which this std-only module does
    /// not speak: the Pushgateway counts as ready once its port accepts connections (it reads
    /// and checks the web config before it listens), and [`metrics_text`](Self::metrics_text)
    /// and the other readers do not work on it.
    pub(crate) fn start_with_web_config(web_config: &Path, https: bool) -> Option<Pushgateway> {
        if !require(PUSHGATEWAY_BIN) {
            return None;
        }
        let (proc, ports) = start_with_retries(
            PUSHGATEWAY_BIN,
            "pushgateway",
            1,
            |ports, _dir| {
                vec![
                    format!("--web.listen-address=127.0.0.1:{}", ports[0]),
                    format!("--web.config.file={}", web_config.display()),
                    "--persistence.file=".to_owned(),
                    "--log.level=warn".to_owned(),
                ]
            },
            |ports| port_open(ports[0]),
        );
        Some(Pushgateway {
            proc,
            port: ports[0],
            scheme: if https { "https" } else { "http" },
        })
    }

    /// Base URL, e.g. `http://127.0.0.1:PORT` (no trailing slash).
    pub(crate) fn url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme, self.port)
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// `PUT /metrics/job/<job>` with a text-format body (replaces the group).
    /// Returns the HTTP status.
    pub(crate) fn put(&self, job: &str, body: &str) -> io::Result<u16> {
        http_request(
            "PUT",
            &format!("{}/metrics/job/{job}", self.url()),
            &[("Content-Type", "text/plain; version=0.0.4")],
            body.as_bytes(),
        )
        .map(|r| r.status)
    }

    /// The Pushgateway's `/metrics` text (pushed groups plus its own metrics).
    pub(crate) fn metrics_text(&self) -> String {
        let url = format!("{}/metrics", self.url());
        match http_request("GET", &url, &[], &[]) {
            Ok(r) if r.status == 200 => r.text(),
            Ok(r) => panic!("GET {url} answered {}: {}", r.status, r.text()),
            Err(e) => panic!("GET {url} failed: {e}\n{}", self.proc.diagnostics()),
        }
    }

    /// Every sample named `name` whose labels include all of `labels`.
    pub(crate) fn samples(&self, name: &str, labels: &[(&str, &str)]) -> Vec<Sample> {
        parse_samples(&self.metrics_text())
            .into_iter()
            .filter(|s| s.name == name && s.has_labels(labels))
            .collect()
    }

    /// The value of the first sample named `name` whose labels include all
    /// of `labels` (a subset match: `job`, `instance`, ... may be extra).
    pub(crate) fn sample(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples(name, labels).first().map(|s| s.value)
    }

    /// Kills the Pushgateway now (SIGKILL), e.g. to test a backend going away.
    pub(crate) fn stop(&mut self) {
        self.proc.stop();
    }

    /// The Pushgateway's own log output, for failure messages.
    pub(crate) fn diagnostics(&self) -> String {
        self.proc.diagnostics()
    }
}

// ---------------------------------------------------------------------------
// OTLP collector: rotel
// ---------------------------------------------------------------------------

/// How much rotel prints per received request (its `--debug-log-verbosity`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verbosity {
    /// One JSON line per received request with its item count, e.g.
    /// `{"msg":"Received traces.",...,"resource_spans":1,"spans":3}`.
    /// Counts are exact whatever the payload holds; no span names.
    Basic,
    /// A multi-line plain-text dump of every span and log record (the
    /// OpenTelemetry collector debug exporter's format). Gives span names.
    Detailed,
}

/// A `rotel-agent` OTLP collector on free loopback ports (gRPC and HTTP),
/// exporting to a blackhole and logging every received trace and log request
/// to its stdout, which is captured in a file and parsed here.
///
/// The line for a request lands shortly after rotel answered it (on receipt,
/// before rotel's own batching): poll counts with [`wait_until`], and read
/// them before `stop()` or drop.
///
/// What rotel 0.0.1a15 (it reports itself as `0.0.1-alpha10`) prints, to
/// stdout (stderr stays empty; `--log-file`/`--pid-file` are used only with
/// `--daemon`, which is not used here, but are passed so that the defaults in
/// the shared temp dir are never touched):
///
/// - `Basic`: one JSON line per received request (via rotel's logger), e.g.
///   `{"v":0,...,"msg":"Received traces.",...,"data_type":"traces","resource_spans":1,"spans":3}`
///   and `{"v":0,...,"msg":"Received logs.",...,"logs":2,"data_type":"logs","resource_logs":1}`.
/// - `Detailed`: a block per request written with one `print!`:
///   `ResourceSpans #0`, ..., `Span #0`, `    Trace ID       : ...`,
///   `    Parent ID      : ...`, `    ID             : ...`,
///   `    Name           : <name>`, ...; logs: `ResourceLog #0`, ...,
///   `LogRecord #0`, `ObservedTimestamp: ...`, ..., `Body: Str(...)`.
#[derive(Debug)]
pub(crate) struct Collector {
    proc: Proc,
    grpc_port: u16,
    http_port: u16,
    verbosity: Verbosity,
}

/// One metric as rotel's detailed metrics dump shows it (`--debug-log metrics`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ReceivedMetric {
    /// The instrumentation scope (`InstrumentationScope <name> <version>`).
    pub(crate) scope: String,
    pub(crate) name: String,
    pub(crate) unit: String,
    pub(crate) description: String,
    /// `Gauge`, `Sum`, `Histogram`, ...
    pub(crate) data_type: String,
    /// `IsMonotonic: true` (sums only).
    pub(crate) monotonic: bool,
    pub(crate) points: Vec<ReceivedPoint>,
}

/// One number data point: its attributes (string values as rotel prints them, `Str(x)` → `x`)
/// and its value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ReceivedPoint {
    pub(crate) attributes: Vec<(String, String)>,
    pub(crate) value: f64,
}

impl ReceivedPoint {
    /// Whether every `(key, value)` in `wanted` is among the attributes.
    pub(crate) fn has(&self, wanted: &[(&str, &str)]) -> bool {
        wanted
            .iter()
            .all(|(k, v)| self.attributes.iter().any(|(ak, av)| ak == k && av == v))
    }
}

impl Collector {
    /// Starts rotel with `Verbosity::Detailed` (counts and span names).
    ///
    /// `None` (after a loud message) if the binary is missing outside CI;
    /// panics under CI or if it does not come up.
    pub(crate) fn start() -> Option<Collector> {
        Self::start_with(Verbosity::Detailed)
    }

    /// Starts rotel with the given verbosity. `Basic` is the choice for high
    /// volumes or for payloads whose text could mimic the detailed dump.
    pub(crate) fn start_with(verbosity: Verbosity) -> Option<Collector> {
        Self::start_logging(verbosity, false)
    }

    /// Starts rotel with `Verbosity::Detailed` that also dumps every received metric (read
    /// them with [`metrics`](Collector::metrics)).
    pub(crate) fn start_with_metrics() -> Option<Collector> {
        Self::start_logging(Verbosity::Detailed, true)
    }

    fn start_logging(verbosity: Verbosity, metrics: bool) -> Option<Collector> {
        if !require(ROTEL_BIN) {
            return None;
        }
        let (proc, ports) = start_with_retries(
            ROTEL_BIN,
            "rotel",
            2,
            |ports, dir| {
                vec![
                    "start".into(),
                    "--otlp-grpc-endpoint".into(),
                    format!("127.0.0.1:{}", ports[0]),
                    "--otlp-http-endpoint".into(),
                    format!("127.0.0.1:{}", ports[1]),
                    "--exporter".into(),
                    "blackhole".into(),
                    "--log-format".into(),
                    "json".into(),
                    "--debug-log".into(),
                    "traces".into(),
                    "--debug-log".into(),
                    "logs".into(),
                ]
                .into_iter()
                .chain(
                    metrics
                        .then(|| ["--debug-log".into(), "metrics".into()])
                        .into_iter()
                        .flatten(),
                )
                .chain([
                    "--debug-log-verbosity".into(),
                    match verbosity {
                        Verbosity::Basic => "basic".into(),
                        Verbosity::Detailed => "detailed".into(),
                    },
                    "--pid-file".into(),
                    dir.join("rotel.pid").display().to_string(),
                    "--log-file".into(),
                    dir.join("rotel.log").display().to_string(),
                ])
                .collect()
            },
            |ports| port_open(ports[0]) && port_open(ports[1]),
        );
        Some(Collector {
            proc,
            grpc_port: ports[0],
            http_port: ports[1],
            verbosity,
        })
    }

    /// OTLP/gRPC endpoint, `http://127.0.0.1:P1`.
    pub(crate) fn grpc_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }

    /// OTLP/HTTP base endpoint, `http://127.0.0.1:P2` (signals are at
    /// `/v1/traces`, `/v1/logs`, `/v1/metrics`).
    pub(crate) fn http_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    pub(crate) fn grpc_port(&self) -> u16 {
        self.grpc_port
    }

    pub(crate) fn http_port(&self) -> u16 {
        self.http_port
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    pub(crate) fn verbosity(&self) -> Verbosity {
        self.verbosity
    }

    /// Complete lines rotel has written to stdout so far (a trailing partial
    /// line is left out, so a count is never read half-written).
    fn complete_lines(&self) -> Vec<String> {
        let out = self.proc.stdout();
        let complete = match out.rfind('\n') {
            Some(i) => &out[..=i],
            None => "",
        };
        complete.lines().map(str::to_owned).collect()
    }

    /// Total number of spans received so far (gRPC and HTTP).
    pub(crate) fn span_count(&self) -> u64 {
        self.count(Signal::Traces)
    }

    /// Total number of log records received so far (gRPC and HTTP).
    pub(crate) fn log_record_count(&self) -> u64 {
        self.count(Signal::Logs)
    }

    fn count(&self, signal: Signal) -> u64 {
        let lines = self.complete_lines();
        match self.verbosity {
            Verbosity::Basic => basic_count(&lines, signal),
            Verbosity::Detailed => detailed_items(&lines)
                .iter()
                .filter(|(s, _)| *s == signal)
                .count() as u64,
        }
    }

    /// Names of all spans received so far, in arrival order. Always empty
    /// with `Verbosity::Basic`, which does not print names.
    pub(crate) fn span_names(&self) -> Vec<String> {
        if self.verbosity == Verbosity::Basic {
            return Vec::new();
        }
        let lines = self.complete_lines();
        detailed_items(&lines)
            .into_iter()
            .filter(|(s, _)| *s == Signal::Traces)
            .filter_map(|(_, i)| {
                // The header is followed by Trace ID, Parent ID, ID, Name.
                lines
                    .iter()
                    .skip(i + 1)
                    .take(4)
                    .find_map(|l| l.strip_prefix(SPAN_NAME_PREFIX))
                    .map(str::to_owned)
            })
            .collect()
    }

    /// Every metric received so far, one entry per metric per request, in arrival order.
    /// Empty unless started with [`start_with_metrics`](Collector::start_with_metrics).
    pub(crate) fn metrics(&self) -> Vec<ReceivedMetric> {
        parse_metrics(&self.complete_lines())
    }

    /// Everything rotel has printed so far.
    pub(crate) fn output(&self) -> String {
        self.proc.stdout()
    }

    /// Kills the collector now (SIGKILL), e.g. to test a backend going away.
    pub(crate) fn stop(&mut self) {
        self.proc.stop();
    }

    /// rotel's output tails, for failure messages.
    pub(crate) fn diagnostics(&self) -> String {
        self.proc.diagnostics()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    Traces,
    Logs,
}

const SPAN_NAME_PREFIX: &str = "    Name           : ";

/// Basic verbosity: sums the counts of rotel's own JSON lines, e.g.
/// `{...,"msg":"Received traces.",...,"spans":3}`. Payload text is never
/// printed in this mode, so nothing can mimic these lines.
fn basic_count(lines: &[String], signal: Signal) -> u64 {
    let (msg, field) = match signal {
        Signal::Traces => ("\"msg\":\"Received traces.\"", "spans"),
        Signal::Logs => ("\"msg\":\"Received logs.\"", "logs"),
    };
    lines
        .iter()
        .filter(|line| line.starts_with('{') && line.contains(msg))
        .filter_map(|line| json_u64_field(line, field))
        .sum()
}

/// Detailed verbosity: the `(signal, line index)` of every `Span #N` and
/// `LogRecord #N` header in rotel's dump.
///
/// The dump is structural: `ResourceSpans #R` / `ResourceLog #R`, then
/// `ScopeSpans #S` / `ScopeLogs #S`, then items numbered from 0 within each
/// scope. A header counts only inside the matching section, with the next
/// expected number and followed by the line rotel always prints next, so
/// payload text (a multi-line log body, an event name) that merely contains
/// such a header is not counted. Each request's dump is written with a single
/// `print!`, so dumps do not interleave line by line.
fn detailed_items(lines: &[String]) -> Vec<(Signal, usize)> {
    let followed_by = |i: usize, next: &str| lines.get(i + 1).is_some_and(|l| l.starts_with(next));
    let mut items = Vec::new();
    let mut section: Option<Signal> = None;
    let mut expected = 0u64;
    for (i, line) in lines.iter().enumerate() {
        let line = line.as_str();
        if numbered(line, "ResourceSpans #").is_some() && followed_by(i, "Resource SchemaURL:") {
            section = Some(Signal::Traces);
            expected = 0;
        } else if numbered(line, "ResourceLog #").is_some() && followed_by(i, "Resource SchemaURL:")
        {
            section = Some(Signal::Logs);
            expected = 0;
        } else if numbered(line, "ResourceMetrics #").is_some()
            && followed_by(i, "Resource SchemaURL:")
        {
            section = None;
        } else {
            let (scope, item, next) = match section {
                Some(Signal::Traces) => ("ScopeSpans #", "Span #", "    Trace ID       : "),
                Some(Signal::Logs) => ("ScopeLogs #", "LogRecord #", "ObservedTimestamp: "),
                None => continue,
            };
            if numbered(line, scope).is_some() && followed_by(i, scope.trim_end_matches(" #")) {
                expected = 0;
            } else if numbered(line, item) == Some(expected) && followed_by(i, next) {
                items.extend(section.map(|s| (s, i)));
                expected += 1;
            }
        }
    }
    items
}

/// rotel's detailed metrics dump (the OpenTelemetry collector debug exporter's format):
///
/// ```text
/// ResourceMetrics #0
/// Resource SchemaURL:
/// ...
/// ScopeMetrics #0
/// ScopeMetrics SchemaURL:
/// InstrumentationScope finale 0.1.0
/// Metric #0
/// Descriptor:
///      -> Name: finale_phase_duration_seconds
///      -> Description: duration of each phase
///      -> Unit: s
///      -> DataType: Gauge
/// NumberDataPoints #0
/// Data point attributes:
///      -> phase: Str(drain)
/// StartTimestamp: ...
/// Timestamp: ...
/// Value: 0.000213
/// ```
///
/// Sections of other signals end a metric; only number data points are read.
fn parse_metrics(lines: &[String]) -> Vec<ReceivedMetric> {
    #[derive(PartialEq)]
    enum In {
        Nothing,
        Descriptor,
        Point,
    }
    let followed_by = |i: usize, next: &str| lines.get(i + 1).is_some_and(|l| l.starts_with(next));
    let mut out: Vec<ReceivedMetric> = Vec::new();
    let mut scope = String::new();
    let mut current: Option<ReceivedMetric> = None;
    let mut point: Option<ReceivedPoint> = None;
    let mut state = In::Nothing;
    let finish_point = |current: &mut Option<ReceivedMetric>, point: &mut Option<ReceivedPoint>| {
        if let (Some(m), Some(p)) = (current.as_mut(), point.take()) {
            m.points.push(p);
        }
    };
    for (i, line) in lines.iter().enumerate() {
        let line = line.as_str();
        let section_start = ["ResourceMetrics #", "ResourceSpans #", "ResourceLog #"]
            .iter()
            .any(|p| numbered(line, p).is_some())
            && followed_by(i, "Resource SchemaURL:");
        if section_start || (numbered(line, "Metric #").is_some() && followed_by(i, "Descriptor:"))
        {
            finish_point(&mut current, &mut point);
            out.extend(current.take());
            state = In::Nothing;
            if section_start {
                scope.clear();
                continue;
            }
            current = Some(ReceivedMetric {
                scope: scope.clone(),
                name: String::new(),
                unit: String::new(),
                description: String::new(),
                data_type: String::new(),
                monotonic: false,
                points: Vec::new(),
            });
            continue;
        }
        if let Some(rest) = line.strip_prefix("InstrumentationScope ") {
            scope = rest.split_whitespace().next().unwrap_or("").to_owned();
            continue;
        }
        let Some(metric) = current.as_mut() else {
            continue;
        };
        if line == "Descriptor:" {
            state = In::Descriptor;
        } else if numbered(line, "NumberDataPoints #").is_some() {
            finish_point(&mut current, &mut point);
            point = Some(ReceivedPoint {
                attributes: Vec::new(),
                value: f64::NAN,
            });
            state = In::Point;
        } else if let Some(attr) = line.strip_prefix("     -> ") {
            let Some((key, value)) = attr.split_once(": ") else {
                continue;
            };
            match state {
                In::Descriptor => match key {
                    "Name" => metric.name = value.to_owned(),
                    "Description" => metric.description = value.to_owned(),
                    "Unit" => metric.unit = value.to_owned(),
                    "DataType" => metric.data_type = value.to_owned(),
                    "IsMonotonic" => metric.monotonic = value == "true",
                    _ => {}
                },
                In::Point => {
                    let value = value
                        .strip_prefix("Str(")
                        .and_then(|v| v.strip_suffix(')'))
                        .unwrap_or(value);
                    if let Some(p) = point.as_mut() {
                        p.attributes.push((key.to_owned(), value.to_owned()));
                    }
                }
                In::Nothing => {}
            }
        } else if let (In::Point, Some(v), Some(p)) =
            (&state, line.strip_prefix("Value: "), point.as_mut())
        {
            p.value = v.trim().parse().unwrap_or(f64::NAN);
        }
    }
    finish_point(&mut current, &mut point);
    out.extend(current);
    out
}

/// `N` if `line` is exactly `prefix` followed by a decimal number.
fn numbered(line: &str, prefix: &str) -> Option<u64> {
    let n = line.strip_prefix(prefix)?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

/// The unsigned integer value of `"key":N` in a flat JSON line.
fn json_u64_field(line: &str, key: &str) -> Option<u64> {
    let pattern = format!("\"{key}\":");
    let start = line.find(&pattern)? + pattern.len();
    let digits: String = line[start..]
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// The `full_service` example as a child process against `gateway` (job `job`) and
/// `collector`, logging to `log`: loopback port 0, info logs on stderr (piped), no orchestrator
/// variables inherited. The caller adds the scenario's own variables and spawns it.
pub(crate) fn full_service(
    gateway: &Pushgateway,
    job: &str,
    collector_endpoint: &str,
    log: &std::path::Path,
) -> Command {
    let mut cmd = Command::new(crate::common::examples::example("full_service"));
    cmd.env("FULL_SERVICE_ADDR", "127.0.0.1:0")
        .env("FULL_SERVICE_LOG", log)
        .env("PUSHGATEWAY_URL", gateway.url())
        .env("PUSHGATEWAY_JOB", job)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", collector_endpoint)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("ECS_CONTAINER_METADATA_URI_V4")
        .env_remove("ECS_CONTAINER_METADATA_URI")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

// ---------------------------------------------------------------------------
// Prometheus server
// ---------------------------------------------------------------------------

/// Binary of the Debian package `prometheus`.
pub(crate) const PROMETHEUS_BIN: &str = "prometheus";

/// A Prometheus server on a free loopback port, scraping `targets` (job `svc`) every
/// `interval`, with its own TSDB in its temp dir; killed by PID on drop.
#[derive(Debug)]
pub(crate) struct Prometheus {
    proc: Proc,
    port: u16,
}

impl Prometheus {
    /// Starts Prometheus with a generated config and waits until `/-/ready` answers 200.
    ///
    /// `None` (after a loud message) if the binary is missing outside CI; panics under CI or
    /// if it does not come up.
    pub(crate) fn start(targets: &[SocketAddr], interval: Duration) -> Option<Prometheus> {
        if !require(PROMETHEUS_BIN) {
            return None;
        }
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let ms = interval.as_millis();
        let config = format!(
            "global:\n  scrape_interval: {ms}ms\n  scrape_timeout: {}ms\n\
             scrape_configs:\n  - job_name: svc\n    static_configs:\n      - targets: [{}]\n",
            (ms / 2).max(100),
            targets.join(", ")
        );
        let (proc, ports) = start_with_retries(
            PROMETHEUS_BIN,
            "prometheus",
            1,
            |ports, dir| {
                let file = dir.join("prometheus.yml");
                fs::write(&file, &config).expect("write prometheus.yml");
                vec![
                    format!("--config.file={}", file.display()),
                    format!("--storage.tsdb.path={}", dir.join("data").display()),
                    format!("--web.listen-address=127.0.0.1:{}", ports[0]),
                    "--log.level=warn".to_owned(),
                ]
            },
            |ports| {
                http_request(
                    "GET",
                    &format!("http://127.0.0.1:{}/-/ready", ports[0]),
                    &[],
                    &[],
                )
                .is_ok_and(|r| r.status == 200)
            },
        );
        Some(Prometheus {
            proc,
            port: ports[0],
        })
    }

    /// Base URL, e.g. `http://127.0.0.1:PORT`.
    pub(crate) fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The first value of an instant query, `None` for an empty result.
    pub(crate) fn query(&self, promql: &str) -> Option<f64> {
        let url = format!("{}/api/v1/query?query={}", self.url(), url_encode(promql));
        let r = http_request("GET", &url, &[], &[]).ok()?;
        let json: serde_json::Value = serde_json::from_slice(&r.body).ok()?;
        json["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|v| v.parse().ok())
    }

    /// Every series of an instant query, as `(labels, value)`.
    pub(crate) fn query_all(&self, promql: &str) -> Vec<(serde_json::Value, f64)> {
        let url = format!("{}/api/v1/query?query={}", self.url(), url_encode(promql));
        let Ok(r) = http_request("GET", &url, &[], &[]) else {
            return Vec::new();
        };
        let json: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
        json["data"]["result"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| {
                        let v = s["value"][1].as_str()?.parse().ok()?;
                        Some((s["metric"].clone(), v))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// How many scrapes of job `svc` succeeded so far (`up == 1` samples in the last 10 m).
    pub(crate) fn successful_scrapes(&self) -> u64 {
        self.query("sum_over_time(up{job=\"svc\"}[10m])")
            .map_or(0, |v| v as u64)
    }

    /// Whether a scrape of job `svc` has failed (the target went away): every scrape before it
    /// has been stored.
    pub(crate) fn saw_target_down(&self) -> bool {
        self.query("min_over_time(up{job=\"svc\"}[10m])") == Some(0.0)
    }

    /// The scrape's start of the last scrape of `target`, from `/api/v1/targets`.
    pub(crate) fn last_scrape(&self) -> Option<String> {
        let r = http_request("GET", &format!("{}/api/v1/targets", self.url()), &[], &[]).ok()?;
        let json: serde_json::Value = serde_json::from_slice(&r.body).ok()?;
        json["data"]["activeTargets"][0]["lastScrape"]
            .as_str()
            .map(str::to_owned)
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    pub(crate) fn diagnostics(&self) -> String {
        self.proc.diagnostics()
    }
}

/// Percent-encodes a query parameter's value.
pub(crate) fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}
