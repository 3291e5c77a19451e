//! systemd with real parts: the `systemd_service` example as a child process, a Unix datagram
//! socket standing in for systemd's notify socket (the protocol is the real one: the child only
//! sees `$NOTIFY_SOCKET`), and Debian's `systemd-socket-activate` handing the child a real
//! listening socket.
//!
//! Every wait is bounded (`recv_timeout`, a bounded poll); ports are free loopback ports; only
//! the processes started here are signalled or killed, by their PID.

#![cfg(target_os = "linux")]
#![allow(clippy::print_stderr)]

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::components::{free_port, http_request, require};
use common::logfmt::{get, parse as logfmt};

const SOCKET_ACTIVATE: &str = "systemd-socket-activate";

/// The child's budget: total 5 s + safety margin 1 s, so every `EXTEND_TIMEOUT_USEC` is at most
/// 6 s and shrinks as the shutdown goes.
const BUDGET: [(&str, &str); 3] = [
    ("FINALE_TOTAL_BUDGET", "5s"),
    ("FINALE_TELEMETRY_RESERVE", "1s"),
    ("FINALE_SAFETY_MARGIN", "1s"),
];
const TOTAL_PLUS_MARGIN_USEC: u64 = 6_000_000;
/// Bound for anything that should take milliseconds.
const SOON: Duration = Duration::from_secs(10);

/// Examples are built by one test at a time (cargo's lock would serialise them anyway).
fn example() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    static BUILD: Mutex<()> = Mutex::new(());
    let _one = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    PATH.get_or_init(|| common::examples::example("systemd_service"))
        .clone()
}

/// A fresh directory of this test's own under the system temp dir; removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "finale-sd-{label}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The stand-in for systemd's notify socket.
struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
}

/// One datagram and when it arrived.
#[derive(Clone, Debug)]
struct Datagram {
    text: String,
    at: Instant,
}

impl NotifySocket {
    fn bind(dir: &TempDir) -> Self {
        let path = dir.path("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        Self { socket, path }
    }

    /// The next datagram within `within`, or `None`.
    fn recv(&self, within: Duration) -> Option<Datagram> {
        self.socket
            .set_read_timeout(Some(within.max(Duration::from_millis(1))))
            .unwrap();
        let mut buf = vec![0u8; 4096];
        match self.socket.recv(&mut buf) {
            Ok(n) => Some(Datagram {
                text: String::from_utf8(buf[..n].to_vec()).expect("UTF-8 datagram"),
                at: Instant::now(),
            }),
            Err(_) => None,
        }
    }

    /// Every datagram queued now, without waiting: once the sender has exited, all it sent.
    fn queued(&self) -> Vec<String> {
        self.socket.set_nonblocking(true).unwrap();
        let mut buf = vec![0u8; 4096];
        let mut all = Vec::new();
        while let Ok(n) = self.socket.recv(&mut buf) {
            all.push(String::from_utf8(buf[..n].to_vec()).expect("UTF-8 datagram"));
        }
        self.socket.set_nonblocking(false).unwrap();
        all
    }

    /// Datagrams until one satisfies `until` (included), within `within`; panics otherwise.
    fn until(&self, within: Duration, seen: &mut Vec<Datagram>, until: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(d) = self.recv(left) else {
                panic!("no matching datagram within {within:?}; seen: {seen:#?}");
            };
            let done = until(&d.text);
            seen.push(d);
            if done {
                return;
            }
        }
    }
}

/// The example (or `systemd-socket-activate` exec'ing it: the same PID), its stderr as lines.
struct Service {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    status: Option<ExitStatus>,
}

impl Service {
    fn spawn(mut cmd: Command) -> Self {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
            status: None,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (bounded) for a stderr line containing `needle`.
    fn wait_for(&mut self, needle: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = line.contains(needle);
                    self.seen.push(line);
                    if found {
                        return;
                    }
                }
                Err(_) => self.fail(&format!("no stderr line with {needle:?} within {within:?}")),
            }
        }
    }

    fn signal(&mut self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        if !ok {
            self.fail(&format!("kill -{sig} failed"));
        }
    }

    /// Waits (bounded) for the exit; returns the code and the whole stderr.
    fn wait_exit(&mut self, within: Duration) -> (i32, String) {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                self.status = Some(status);
                // The reader thread ends with the pipe; collect what is left.
                while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(2)) {
                    self.seen.push(line);
                }
                return (status.code().unwrap_or(-1), self.seen.join("\n"));
            }
            if Instant::now() >= deadline {
                self.fail(&format!("still running {within:?} after the signal"));
            }
            // A bounded poll of the child's state, not a synchronisation point.
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn fail(&mut self, why: &str) -> ! {
        self.kill();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(500)) {
            self.seen.push(line);
        }
        panic!("{why}\n--- child stderr ---\n{}", self.seen.join("\n"));
    }

    fn kill(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The example with a clean environment: no inherited `FINALE_*`, orchestrator or systemd
/// variables.
fn example_command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if key.starts_with("FINALE_")
            || key.starts_with("LISTEN_")
            || key.starts_with("WATCHDOG_")
            || key == "NOTIFY_SOCKET"
            || key == "KUBERNETES_SERVICE_HOST"
            || key.starts_with("ECS_CONTAINER_METADATA_URI")
        {
            cmd.env_remove(key);
        }
    }
    cmd.env("RUST_LOG", "info").env("NO_COLOR", "1");
    cmd.envs(BUDGET);
    cmd
}

/// The value of `KEY=` in a datagram.
fn field<'a>(datagram: &'a str, key: &str) -> Option<&'a str> {
    datagram
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

/// The datagram without its `EXTEND_TIMEOUT_USEC=` and `WATCHDOG_USEC=` lines, whose values
/// depend on the clock.
fn fixed_part(datagram: &str) -> String {
    datagram
        .lines()
        .filter(|l| !l.starts_with("EXTEND_TIMEOUT_USEC=") && !l.starts_with("WATCHDOG_USEC="))
        .collect::<Vec<_>>()
        .join("\n")
}

/// READY=1 after start, WATCHDOG=1 pings that stop while the runtime is blocked, then after
/// SIGTERM exactly STOPPING=1, one STATUS= per phase and the final status, each with an
/// EXTEND_TIMEOUT_USEC within the budget and shrinking; and the termination message the same
/// process wrote at exit.
#[test]
fn systemd_notify_datagrams_from_a_real_service_and_its_termination_message() {
    let dir = TempDir::new("notify");
    let notify = NotifySocket::bind(&dir);
    let termination_log = dir.path("termination-log");
    let port = free_port();
    let mut cmd = example_command(&example());
    cmd.env("NOTIFY_SOCKET", &notify.path)
        // 300 ms: a ping every 150 ms.
        .env("WATCHDOG_USEC", "300000")
        .env("FINALE_TERMINATION_LOG", &termination_log)
        .env("SYSTEMD_SERVICE_ADDR", format!("127.0.0.1:{port}"));
    let mut service = Service::spawn(cmd);

    // READY=1 first: nothing is sent before graceful start completes.
    let first = notify
        .recv(SOON)
        .unwrap_or_else(|| service.fail("no READY=1"));
    assert_eq!(first.text, "READY=1\nSTATUS=running");
    service.wait_for("started: ready", SOON);

    // Pings at about half of WATCHDOG_USEC.
    let mut seen = Vec::new();
    for _ in 0..3 {
        notify.until(SOON, &mut seen, |t| t == "WATCHDOG=1");
    }
    assert!(seen.iter().all(|d| d.text == "WATCHDOG=1"), "{seen:#?}");

    // Block the runtime's only thread for 1.2 s: no ping meanwhile.
    let url = format!("http://127.0.0.1:{port}");
    let before_block = Instant::now();
    let blocked = http_request("GET", &format!("{url}/block/1200"), &[], b"").unwrap();
    assert_eq!(blocked.status, 200);
    let after_block = Instant::now();
    let mut pings = Vec::new();
    notify.until(SOON, &mut pings, |t| t == "WATCHDOG=1");
    let pings: Vec<Instant> = seen
        .iter()
        .chain(&pings)
        .filter(|d| d.text == "WATCHDOG=1")
        .map(|d| d.at)
        .collect();
    let widest_gap = pings
        .windows(2)
        .filter(|w| w[1] >= before_block)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap();
    eprintln!(
        "watchdog: widest gap between pings around a {} ms block: {} ms",
        (after_block - before_block).as_millis(),
        widest_gap.as_millis()
    );
    assert!(
        widest_gap >= Duration::from_millis(1000),
        "pings went on while the runtime was blocked: widest gap {widest_gap:?}"
    );

    // SIGTERM: the shutdown's datagrams, in order.
    service.signal("TERM");
    let mut shutdown = Vec::new();
    notify.until(SOON, &mut shutdown, |t| t.starts_with("STATUS=stopped:"));
    let (code, stderr) = service.wait_exit(SOON);
    assert_eq!(code, 0, "{stderr}");

    let steps: Vec<&Datagram> = shutdown.iter().filter(|d| d.text != "WATCHDOG=1").collect();
    let fixed: Vec<String> = steps.iter().map(|d| fixed_part(&d.text)).collect();
    assert_eq!(
        fixed,
        [
            "STOPPING=1\nSTATUS=stopping: signal SIGTERM",
            "STATUS=stopping: announce",
            "STATUS=stopping: drain",
            "STATUS=stopping: workers",
            "STATUS=stopping: telemetry",
            "STATUS=stopped: clean, exit code 0",
        ],
        "{shutdown:#?}"
    );
    // Every step but the last extends systemd's stop timeout to what is left of the budget.
    let mut previous = TOTAL_PLUS_MARGIN_USEC;
    for d in &steps[..steps.len() - 1] {
        let extend: u64 = field(&d.text, "EXTEND_TIMEOUT_USEC")
            .unwrap_or_else(|| panic!("no EXTEND_TIMEOUT_USEC in {:?}", d.text))
            .parse()
            .unwrap();
        assert!(
            extend <= previous && extend > TOTAL_PLUS_MARGIN_USEC - 2_000_000,
            "EXTEND_TIMEOUT_USEC={extend} after {previous}: not within the budget, or growing"
        );
        previous = extend;
    }
    // The trigger also stretches the watchdog over the shutdown.
    let watchdog_usec: u64 = field(&steps[0].text, "WATCHDOG_USEC")
        .unwrap()
        .parse()
        .unwrap();
    assert!(watchdog_usec <= TOTAL_PLUS_MARGIN_USEC && watchdog_usec > 4_000_000);
    // Pings stop at the trigger: none once the phases run.
    let announce = shutdown
        .iter()
        .position(|d| d.text.starts_with("STATUS=stopping: announce"))
        .unwrap();
    assert!(
        shutdown[announce..].iter().all(|d| d.text != "WATCHDOG=1"),
        "{shutdown:#?}"
    );
    assert!(
        notify.recv(Duration::from_millis(50)).is_none(),
        "a datagram after the exit"
    );

    // The termination message, written by the same process at the end of run().
    let message = std::fs::read_to_string(&termination_log).unwrap();
    assert!(message.len() <= 4096);
    let lines: Vec<Vec<(String, String)>> = message.lines().map(logfmt).collect();
    assert_eq!(lines[0][0].0, "finale", "{message}");
    assert_eq!(get(&lines[0], "status"), Some("clean"), "{message}");
    assert_eq!(get(&lines[0], "exit_code"), Some("0"));
    assert_eq!(get(&lines[0], "reason"), Some("signal SIGTERM"));
    let phases: Vec<&str> = lines
        .iter()
        .filter_map(|l| get(l, "phase").filter(|_| l[0].0 == "phase"))
        .collect();
    assert_eq!(phases, ["announce", "drain", "workers", "telemetry"]);
    assert!(
        lines
            .iter()
            .any(|l| get(l, "entry") == Some("cache-refresher") && get(l, "kind") == Some("task")),
        "{message}"
    );
}

/// Starts `systemd-socket-activate` listening on a free loopback port and handing it to the
/// example as `http`; the first connection starts the example. `None` (after a loud message)
/// when the binary is missing outside CI.
fn socket_activated(notify: &NotifySocket, listen: &str) -> Option<Service> {
    if !require(SOCKET_ACTIVATE) {
        return None;
    }
    let mut cmd = Command::new(SOCKET_ACTIVATE);
    // It passes on only the variables named with -E (and TERM, PATH, USER, HOME).
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("NOTIFY_SOCKET", &notify.path)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .envs(BUDGET)
        .args(["--listen", listen, "--fdname=http"])
        .args(["-E", "NOTIFY_SOCKET", "-E", "RUST_LOG", "-E", "NO_COLOR"]);
    for (key, _) in BUDGET {
        cmd.args(["-E", key]);
    }
    cmd.arg(example());
    Some(Service::spawn(cmd))
}

/// `systemd-socket-activate` hands a real listening socket to the example, which serves on it
/// (the first connection, made before the example even ran, included), keeps a slow request
/// going through SIGTERM, drains it and exits cleanly; READY=1 and STOPPING=1 reach the notify
/// socket through the activator's environment.
#[test]
fn systemd_socket_activation_serves_and_drains() {
    let dir = TempDir::new("activate");
    let notify = NotifySocket::bind(&dir);
    let port = free_port();
    let Some(mut service) = socket_activated(&notify, &format!("127.0.0.1:{port}")) else {
        return;
    };
    let url = format!("http://127.0.0.1:{port}");

    // The activator listens, then execs the example on the first connection: poll (bounded)
    // until a connection is accepted; that one triggers the start and is served.
    let deadline = Instant::now() + SOON;
    let hello = loop {
        match http_request("GET", &format!("{url}/hello"), &[], b"") {
            Ok(response) => break response,
            // Refused until the activator listens: a bounded poll.
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => service.fail(&format!("no answer on the activated socket: {e}")),
        }
    };
    assert_eq!(hello.status, 200);
    assert_eq!(hello.text(), "hello\n");
    service.wait_for("serving on the socket systemd passed (http)", SOON);
    let ready = notify
        .recv(SOON)
        .unwrap_or_else(|| service.fail("no READY=1"));
    assert_eq!(ready.text, "READY=1\nSTATUS=running");

    // A slow request in flight when SIGTERM arrives is drained, not dropped.
    let slow = std::thread::spawn({
        let url = url.clone();
        move || http_request("GET", &format!("{url}/slow/1500"), &[], b"")
    });
    service.wait_for("slow request started", SOON);
    service.signal("TERM");
    let mut seen = Vec::new();
    notify.until(SOON, &mut seen, |t| t.starts_with("STOPPING=1"));
    let slow = slow.join().unwrap().expect("the slow request was answered");
    assert_eq!(slow.status, 200);
    assert_eq!(slow.text(), "done after 1500 ms\n");
    let (code, stderr) = service.wait_exit(SOON);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("(in flight at start: 1)"), "{stderr}");
    notify.until(SOON, &mut seen, |t| {
        t == "STATUS=stopped: clean, exit code 0"
    });
    // The passed socket was the only one: closed with the service.
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
}

/// A socket that is not a TCP listener, and sockets meant for another process, are typed errors
/// that the example reports (exit code 2), never a server on the wrong socket.
#[test]
fn systemd_socket_activation_errors_are_typed() {
    let dir = TempDir::new("errors");
    let notify = NotifySocket::bind(&dir);

    // LISTEN_PID names another process.
    let mut cmd = example_command(&example());
    cmd.env("LISTEN_FDS", "1").env("LISTEN_PID", "1");
    let mut service = Service::spawn(cmd);
    let (code, stderr) = service.wait_exit(SOON);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("are meant for process \"1\" (LISTEN_PID)"),
        "{stderr}"
    );

    // A Unix stream socket passed as "http".
    let unix = dir.path("http.sock");
    let Some(mut service) = socket_activated(&notify, unix.to_str().unwrap()) else {
        return;
    };
    let deadline = Instant::now() + SOON;
    let _trigger = loop {
        match UnixStream::connect(&unix) {
            Ok(stream) => break stream,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => service.fail(&format!("the activator does not listen on {unix:?}: {e}")),
        }
    };
    let (code, stderr) = service.wait_exit(SOON);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("the socket passed at index 0 (\"http\") is not a listening TCP socket"),
        "{stderr}"
    );
    assert!(
        notify.recv(Duration::from_millis(50)).is_none(),
        "no READY=1 from a service that never started"
    );
}

/// The supervisor's status is systemd's last word once it owns the end of the process. A child
/// process (this test binary, re-run with `FINALE_SD_TAKEOVER_CHILD` set) with
/// `systemd_notify(true)` and this test's datagram socket as `$NOTIFY_SOCKET`, on a
/// `current_thread` runtime, total 2 s, reserve 1 s, margin 500 ms: a Workers hook blocks the
/// only thread until 1.40 s after the trigger, so the supervisor takes over at about 1.25 s,
/// sends `STATUS=stopped by the supervisor…`, then blocks writing its termination message to
/// a FIFO nobody reads (for up to 500 ms) before it exits. The runtime comes back meanwhile and
/// the sequence enters its Telemetry phase: it sends nothing more to systemd, so the last
/// status the service manager holds is the supervisor's.
#[test]
fn systemd_last_status_is_the_supervisors_when_it_owns_the_end() {
    const NAME: &str = "systemd_last_status_is_the_supervisors_when_it_owns_the_end";
    if let Ok(fifo) = std::env::var("FINALE_SD_TAKEOVER_CHILD") {
        takeover_child(&fifo);
    }
    let dir = TempDir::new("takeover");
    let notify = NotifySocket::bind(&dir);
    let fifo = dir.path("termination-log");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let mut cmd = example_command(&std::env::current_exe().unwrap());
    cmd.args(["--exact", NAME, "--nocapture"])
        .env("FINALE_SD_TAKEOVER_CHILD", &fifo)
        .env("NOTIFY_SOCKET", &notify.path);
    let mut service = Service::spawn(cmd);
    let (code, stderr) = service.wait_exit(SOON);
    assert_eq!(code, 5, "{stderr}");
    // The scenario: the supervisor took over, then the runtime came back and the sequence
    // reached its Telemetry phase before the supervisor's exit.
    let took_over = stderr
        .find("the shutdown overran its budget")
        .unwrap_or_else(|| panic!("no takeover:\n{stderr}"));
    let telemetry = stderr
        .find("TELEMETRY-REACHED")
        .unwrap_or_else(|| panic!("the sequence never reached Telemetry:\n{stderr}"));
    assert!(took_over < telemetry, "{stderr}");
    assert!(!stderr.contains("RUN-ENDED"), "{stderr}");

    // The child has exited: every datagram it sent is queued.
    let datagrams = notify.queued();
    let statuses: Vec<&str> = datagrams
        .iter()
        .filter_map(|d| d.lines().find(|l| l.starts_with("STATUS=")))
        .collect();
    assert!(
        statuses.contains(&"STATUS=stopping: workers"),
        "{datagrams:#?}"
    );
    assert_eq!(
        statuses.last().copied(),
        Some(
            "STATUS=stopped by the supervisor: the Telemetry phase did not start in time, exit \
             code 5"
        ),
        "{datagrams:#?}\n{stderr}"
    );
    assert_eq!(
        statuses
            .iter()
            .filter(|s| s.starts_with("STATUS=stopped"))
            .count(),
        1,
        "{datagrams:#?}"
    );
}

fn takeover_child(fifo: &str) -> ! {
    use finale::{Environment, Finale, Hook, Phase, TerminationLog};
    // The supervisor's takeover is logged; the parent reads it on stderr.
    let runtime = common::child::logged_runtime(None, false);
    runtime.block_on(async {
        let finale = Finale::builder()
            .no_signals()
            .read_env(false)
            .environment(Environment::Local)
            .total_budget(Duration::from_secs(2))
            .telemetry_reserve(Duration::from_secs(1))
            .safety_margin(Duration::from_millis(500))
            .systemd_notify(true)
            .termination_log(TerminationLog::Path(fifo.into()))
            .build()
            .unwrap();
        let t0 = Instant::now();
        finale
            .hook(Hook::new(Phase::Workers, "blocker", move |_| async move {
                // Blocks the runtime's only thread: the scenario, not a synchronisation.
                let until = t0 + Duration::from_millis(1400);
                std::thread::sleep(until.saturating_duration_since(Instant::now()));
            }))
            .unwrap();
        finale
            .hook(Hook::new(Phase::Telemetry, "marker", |_| async {
                eprintln!("TELEMETRY-REACHED");
            }))
            .unwrap();
        finale.handle().trigger("takeover");
        let report = finale.run().await;
        eprintln!("RUN-ENDED code {}", report.exit_code);
        report.exit()
    })
}
