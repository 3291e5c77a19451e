//! Zero-downtime restart by socket hand-off, with no load balancer in front: a single instance
//! (the `zero_downtime` example, a real child process) is upgraded three times by `SIGUSR2`
//! while a real HTTP client keeps a steady keep-alive load and a second one opens a new
//! connection per request. Every request is answered `200`: no refused connection, no reset.
//! The same load across a plain stop-and-start shows the errors the hand-off avoids.

#![cfg(unix)]
// The tests report what they measured (run with `--no-capture` to see it).
#![allow(clippy::print_stderr)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use common::components::{free_ports, http_request, wait_until};
use common::load::{LoadReport, steady_in_background};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BOUND: Duration = Duration::from_secs(20);
/// Keep-alive requests per second, and at most this many in all.
const RATE: u32 = 200;
const MAX_REQUESTS: u64 = 20_000;
/// New-connection requests: one every this often, at most this many.
const FRESH_EVERY: Duration = Duration::from_millis(5);
const MAX_FRESH: u64 = 10_000;
const ROUNDS: usize = 3;

fn zero_downtime() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| common::examples::example("zero_downtime"))
        .clone()
}

/// The service's processes: the first is this test's child; each successor is started by its
/// predecessor, and found from the log line that names it. All write to the same stderr pipe.
struct Service {
    addr: SocketAddr,
    first: Option<Child>,
    /// The process serving now.
    pid: u32,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    /// How many upgrades led to the process serving now.
    generation: u32,
}

impl Service {
    fn start(addr: SocketAddr, env: &[(&str, &str)]) -> Self {
        Self::start_with(addr, env, None)
    }

    fn start_with(
        addr: SocketAddr,
        env: &[(&str, &str)],
        notify: Option<&std::path::Path>,
    ) -> Self {
        let mut cmd = Command::new(zero_downtime());
        cmd.env("ZERO_DOWNTIME_ADDR", addr.to_string())
            .env("RUST_LOG", "info")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("ECS_CONTAINER_METADATA_URI_V4")
            .env_remove("ECS_CONTAINER_METADATA_URI")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("FINALE_LISTEN_PARENT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        if let Some(path) = notify {
            cmd.env("NOTIFY_SOCKET", path);
        }
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let pid = child.id();
        let service = Self {
            addr,
            first: Some(child),
            pid,
            lines,
            seen: Vec::new(),
            generation: 0,
        };
        service.wait_ready();
        service
    }

    fn wait_ready(&self) {
        let url = format!("http://{}/readyz", self.addr);
        assert!(
            wait_until(BOUND, || http_request("GET", &url, &[], b"")
                .is_ok_and(|r| r.status == 200)),
            "the service never became ready"
        );
    }

    /// Waits (bounded) for a log line containing `needle`.
    fn wait_line(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + BOUND;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no line with {needle:?} within {BOUND:?}:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// A line seen already (a unique needle), or the next one, bounded.
    fn seen_or_wait(&mut self, needle: &str) -> String {
        match self.seen.iter().find(|l| l.contains(needle)) {
            Some(line) => line.clone(),
            None => self.wait_line(needle),
        }
    }

    fn signal(&self, signal: &str) {
        assert!(
            Command::new("kill")
                .args([signal, &self.pid.to_string()])
                .status()
                .unwrap()
                .success()
        );
    }

    /// Waits (bounded) until the process `pid` is gone; reaps it when it is this test's child.
    fn wait_gone(&mut self, pid: u32) {
        if let Some(child) = self.first.as_mut().filter(|c| c.id() == pid) {
            let start = Instant::now();
            loop {
                if let Some(status) = child.try_wait().unwrap() {
                    assert_eq!(status.code(), Some(0), "process {pid} exit");
                    self.first = None;
                    return;
                }
                assert!(start.elapsed() < BOUND, "process {pid} did not exit");
                std::thread::sleep(Duration::from_millis(5)); // polling a condition with a bound
            }
        }
        assert!(
            wait_until(BOUND, || !alive(pid)),
            "process {pid} did not exit"
        );
    }

    /// One upgrade: SIGUSR2, the successor's pid from the old process's log, the old process
    /// gone. Returns the time from the signal to the successor's `READY=1`.
    fn upgrade(&mut self) -> Duration {
        let old = self.pid;
        let start = Instant::now();
        self.signal("-USR2");
        let line = self.wait_line("the successor is ready");
        let ready = start.elapsed();
        self.pid = field(&line, "successor_pid=").parse().expect("a pid");
        assert_ne!(self.pid, old);
        // The successor knows it is one more generation (a label for its telemetry).
        let starting = self.seen_or_wait(&format!("starting pid={}", self.pid));
        self.generation += 1;
        assert_eq!(
            field(&starting, "generation="),
            self.generation.to_string(),
            "{starting}"
        );
        self.wait_line("shutdown after upgrade");
        self.wait_gone(old);
        ready
    }

    /// A plain restart: SIGTERM, wait for the exit, start a new process, wait until ready.
    fn stop_and_start(&mut self, env: &[(&str, &str)]) {
        self.signal("-TERM");
        let pid = self.pid;
        self.wait_gone(pid);
        let next = Service::start(self.addr, env);
        *self = next;
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        // Ends only the processes this test started (directly, or through an upgrade).
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        let _ = wait_until(Duration::from_secs(5), || !alive(self.pid));
        if alive(self.pid) {
            let _ = Command::new("kill")
                .args(["-KILL", &self.pid.to_string()])
                .status();
        }
        if let Some(mut child) = self.first.take() {
            let _ = child.wait();
        }
    }
}

fn alive(pid: u32) -> bool {
    Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let start = line.find(key).map(|i| i + key.len()).unwrap_or(line.len());
    line[start..].split_whitespace().next().unwrap_or("")
}

/// What the new-connection client saw: outcomes by kind, and the pids that answered.
#[derive(Debug, Default)]
struct Fresh {
    outcomes: BTreeMap<String, u64>,
    pids: BTreeSet<String>,
}

/// One request per new connection (`Connection: close`), every [`FRESH_EVERY`], until `stop`.
async fn fresh_connections(addr: SocketAddr, stop: tokio::sync::oneshot::Receiver<()>) -> Fresh {
    let seen = Arc::new(Mutex::new(Fresh::default()));
    let mut tick = tokio::time::interval(FRESH_EVERY);
    let mut tasks = tokio::task::JoinSet::new();
    let mut stop = std::pin::pin!(stop);
    for _ in 0..MAX_FRESH {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut stop => break,
        }
        let seen = seen.clone();
        tasks.spawn(async move {
            let outcome = tokio::time::timeout(BOUND, async {
                let mut conn = match tokio::net::TcpStream::connect(addr).await {
                    Ok(conn) => conn,
                    Err(e) => return (format!("connect: {:?}", e.kind()), None),
                };
                let request =
                    format!("GET /hello HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
                if let Err(e) = conn.write_all(request.as_bytes()).await {
                    return (format!("write: {:?}", e.kind()), None);
                }
                let mut buf = Vec::new();
                match conn.read_to_end(&mut buf).await {
                    Ok(_) if buf.starts_with(b"HTTP/1.1 200") => {
                        let text = String::from_utf8_lossy(&buf);
                        let pid = text
                            .rsplit("hello from ")
                            .next()
                            .map(|p| p.trim().to_owned());
                        ("ok".to_owned(), pid)
                    }
                    Ok(_) => (format!("answer {:?}", String::from_utf8_lossy(&buf)), None),
                    Err(e) => (format!("read: {:?}", e.kind()), None),
                }
            })
            .await
            .unwrap_or_else(|_| ("timeout".to_owned(), None));
            let mut seen = seen.lock().unwrap();
            *seen.outcomes.entry(outcome.0).or_insert(0) += 1;
            if let Some(pid) = outcome.1 {
                seen.pids.insert(pid);
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    Arc::into_inner(seen).unwrap().into_inner().unwrap()
}

/// Runs both loads across `restart`, three times; returns what each client saw.
fn under_load(
    service: &mut Service,
    mut restart: impl FnMut(&mut Service) -> Option<Duration>,
) -> (LoadReport, Fresh, Vec<Duration>) {
    let addr = service.addr;
    let (stop_keep_tx, keep) = steady_in_background(
        format!("http://{addr}/hello"),
        RATE,
        MAX_REQUESTS,
        Duration::from_secs(10),
    );
    let (stop_fresh_tx, stop_fresh_rx) = tokio::sync::oneshot::channel::<()>();
    let fresh = std::thread::spawn(move || {
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(fresh_connections(addr, stop_fresh_rx))
    });
    // Load flowing before the first restart, and between restarts.
    let settle = || std::thread::sleep(Duration::from_millis(300)); // the scenario: time under load
    settle();
    let mut times = Vec::new();
    for _ in 0..ROUNDS {
        if let Some(t) = restart(service) {
            times.push(t);
        }
        settle();
    }
    let _ = stop_keep_tx.send(());
    let _ = stop_fresh_tx.send(());
    (keep.join().unwrap(), fresh.join().unwrap(), times)
}

#[test]
fn three_upgrades_under_load_refuse_nothing() {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_ports(1)[0]));
    let mut service = Service::start(addr, &[]);
    let first = service.pid;
    let (keep, fresh, ready) = under_load(&mut service, |s| Some(s.upgrade()));
    eprintln!(
        "upgrades: {ROUNDS} rounds, trigger-to-successor-ready {ready:?}\n  keep-alive: {keep:?}\n  new connections: {:?}, answered by pids {:?}",
        fresh.outcomes, fresh.pids
    );
    assert_ne!(service.pid, first);
    assert!(keep.ok() > u64::from(RATE), "too little load: {keep:?}");
    assert_eq!(keep.non_2xx(), 0, "{keep:?}");
    assert_eq!(keep.failures(), 0, "{keep:?}");
    let ok = fresh.outcomes.get("ok").copied().unwrap_or(0);
    assert!(ok > 100, "too little load: {fresh:?}");
    assert_eq!(
        fresh.outcomes.len(),
        1,
        "every new connection answered 200: {fresh:?}"
    );
    // Each of the four processes served some of the new connections.
    assert_eq!(fresh.pids.len(), ROUNDS + 1, "{fresh:?}");
}

#[test]
fn three_plain_restarts_under_the_same_load_refuse_connections() {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_ports(1)[0]));
    let env = [("FINALE_DRAIN_DELAY", "0s")];
    let mut service = Service::start(addr, &env);
    let (keep, fresh, _) = under_load(&mut service, |s| {
        s.stop_and_start(&env);
        None
    });
    eprintln!(
        "plain restarts: {ROUNDS} rounds\n  keep-alive: {keep:?}\n  new connections: {:?}",
        fresh.outcomes
    );
    let errors = keep.non_2xx()
        + keep.failures()
        + fresh
            .outcomes
            .iter()
            .filter(|(k, _)| k.as_str() != "ok")
            .map(|(_, n)| n)
            .sum::<u64>();
    assert!(
        errors > 0,
        "expected errors without the hand-off: {keep:?} {fresh:?}"
    );
}

/// `GET /hello` over a fresh connection to the Unix socket at `path`: the answer's pid.
fn hello_over_unix(path: &std::path::Path) -> Result<u32, String> {
    use std::io::{Read, Write};
    let mut conn =
        std::os::unix::net::UnixStream::connect(path).map_err(|e| format!("connect: {e}"))?;
    conn.set_read_timeout(Some(BOUND)).unwrap();
    conn.write_all(b"GET /hello HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer)
        .map_err(|e| format!("read: {e}"))?;
    if !answer.starts_with("HTTP/1.1 200") {
        return Err(format!("answer: {answer:?}"));
    }
    let pid = answer
        .rsplit("hello from ")
        .next()
        .and_then(|rest| rest.trim().parse().ok());
    pid.ok_or_else(|| format!("answer: {answer:?}"))
}

#[test]
fn a_unix_socket_server_is_handed_over_and_refuses_nothing() {
    // The service serves a Unix socket next to its TCP port; a client opens a new connection
    // to the socket per request all through two upgrades: every one is answered, the last by
    // the second successor, and the socket file is the same one throughout.
    let dir = std::env::temp_dir().join(format!("finale-upgrade-uds-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("http.sock");
    let addr = SocketAddr::from(([127, 0, 0, 1], free_ports(1)[0]));
    let mut service = Service::start(addr, &[("ZERO_DOWNTIME_UNIX", path.to_str().unwrap())]);
    let first = hello_over_unix(&path).unwrap();
    assert_eq!(first, service.pid);
    let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&path).unwrap());

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = std::thread::spawn({
        let (path, stop) = (path.clone(), stop.clone());
        move || {
            let mut answers: Vec<Result<u32, String>> = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                answers.push(hello_over_unix(&path));
            }
            answers
        }
    });
    service.upgrade();
    service.upgrade();
    // One more answer from the process serving now, then the client stops.
    assert!(
        wait_until(BOUND, || hello_over_unix(&path) == Ok(service.pid)),
        "the second successor serves the socket"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let answers = client.join().unwrap();
    let failed: Vec<_> = answers.iter().filter(|a| a.is_err()).collect();
    let pids: BTreeSet<u32> = answers.iter().filter_map(|a| a.clone().ok()).collect();
    eprintln!(
        "{} requests over the Unix socket, answered by {pids:?}, failed: {failed:?}",
        answers.len()
    );
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&path).unwrap()),
        inode,
        "the same socket file, handed over, not bound again"
    );
    let pid = service.pid;
    service.signal("-TERM");
    service.wait_gone(pid);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_successor_that_fails_leaves_the_old_process_serving() {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_ports(1)[0]));
    // Inherited by the successor, which exits with 3 before it is ready.
    let mut service = Service::start(addr, &[("ZERO_DOWNTIME_FAIL_SUCCESSOR", "1")]);
    let pid = service.pid;
    service.signal("-USR2");
    let line = service.wait_line("upgrade failed");
    eprintln!("failed upgrade: {line}");
    assert!(line.contains("ended before it was ready"), "{line}");
    assert!(line.contains("exit status: 3"), "{line}");
    // Still serving, still the same process, and ready.
    let hello = http_request("GET", &format!("http://{addr}/hello"), &[], b"").unwrap();
    assert_eq!(hello.status, 200);
    assert!(
        hello.text().contains(&format!("hello from {pid}")),
        "{}",
        hello.text()
    );
    service.wait_ready();
    // The report at the end says so.
    service.signal("-TERM");
    let report = service.wait_line("upgrade failed: ");
    assert!(report.contains("exit status: 3"), "{report}");
    service.wait_gone(pid);
}

#[test]
fn under_systemd_the_old_process_hands_over_its_main_pid_and_then_says_nothing() {
    let dir = std::env::temp_dir().join(format!("finale-upgrade-notify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("notify");
    let _ = std::fs::remove_file(&path);
    let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    let recv = |within: Duration| -> Option<String> {
        socket.set_read_timeout(Some(within)).unwrap();
        let mut buf = vec![0u8; 4096];
        socket
            .recv(&mut buf)
            .ok()
            .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], free_ports(1)[0]));
    let mut service = Service::start_with(addr, &[], Some(&path));
    let old = service.pid;
    assert!(recv(BOUND).is_some_and(|d| d.starts_with("READY=1")));
    service.upgrade();
    let successor = service.pid;
    // Everything up to the old process's exit: the successor's READY=1 and the hand-over.
    let mut seen = Vec::new();
    while let Some(d) = recv(Duration::from_millis(300)) {
        seen.push(d);
    }
    eprintln!("datagrams across the upgrade (old {old}, successor {successor}): {seen:?}");
    assert!(
        seen.iter()
            .any(|d| d.starts_with(&format!("MAINPID={successor}\n"))),
        "{seen:?}"
    );
    // The old process stepped down without STOPPING=1 (which would stop the service).
    assert!(!seen.iter().any(|d| d.contains("STOPPING=1")), "{seen:?}");
    // The successor's own stop does say it.
    service.signal("-TERM");
    let mut stopping = false;
    while let Some(d) = recv(Duration::from_secs(5)) {
        if d.contains("STOPPING=1") {
            stopping = true;
            break;
        }
    }
    assert!(stopping, "the successor's shutdown is announced");
    service.wait_gone(successor);
    drop(service);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The datagrams a notify socket receives across one upgrade of a service started with `env`,
/// up to the old process's exit; and that exit's code.
fn datagrams_across_an_upgrade(label: &str, env: &[(&str, &str)]) -> (Vec<String>, Option<i32>) {
    let dir = std::env::temp_dir().join(format!("finale-upgrade-{label}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("notify");
    let _ = std::fs::remove_file(&path);
    let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], free_ports(1)[0]));
    let mut service = Service::start_with(addr, env, Some(&path));
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 4096];
    let mut drain = |seen: &mut Vec<String>| {
        while let Ok(n) = socket.recv(&mut buf) {
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    };
    service.signal("-USR2");
    let line = service.wait_line("the successor is ready");
    let successor: u32 = field(&line, "successor_pid=").parse().expect("a pid");
    let mut old = service.first.take().unwrap();
    service.pid = successor;
    let start = Instant::now();
    let code = loop {
        drain(&mut seen);
        if let Some(status) = old.try_wait().unwrap() {
            break status.code();
        }
        assert!(start.elapsed() < BOUND, "the old process did not exit");
    };
    // What the old process sent just before its exit.
    drain(&mut seen);
    drop(service);
    let _ = std::fs::remove_dir_all(&dir);
    (seen, code)
}

#[test]
fn a_wedged_old_process_says_nothing_to_systemd_after_the_hand_over() {
    // The old process's supervisor takes over its wedged shutdown after MAINPID=<successor>:
    // with NotifyAccess=all its STATUS= would show on the healthy successor.
    let (seen, code) = datagrams_across_an_upgrade(
        "wedged",
        &[
            ("ZERO_DOWNTIME_WEDGE_OLD", "1"),
            ("FINALE_TOTAL_BUDGET", "2s"),
            ("FINALE_TELEMETRY_RESERVE", "500ms"),
        ],
    );
    eprintln!("datagrams: {seen:?}");
    assert_eq!(code, Some(5), "the supervisor took over");
    let handed = seen
        .iter()
        .position(|d| d.starts_with("MAINPID="))
        .expect("MAINPID= sent");
    assert!(
        seen[handed + 1..].is_empty(),
        "sent after the hand-over: {seen:?}"
    );
}

#[test]
fn without_systemd_notify_no_main_pid_is_sent() {
    let (seen, code) = datagrams_across_an_upgrade("silent", &[("ZERO_DOWNTIME_NO_NOTIFY", "1")]);
    assert_eq!(code, Some(0));
    assert!(seen.is_empty(), "{seen:?}");
}

/// A successor that never reports ready (it ignores its arguments and sleeps).
fn sleeper(dir: &std::path::Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("sleeper");
    std::fs::write(&path, "#!/bin/sh\nexec sleep 30\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_upgrade_is_refused_and_a_successor_not_ready_in_time_is_killed() {
    use finale::upgrade::{Upgrade, UpgradeError};
    let dir = std::env::temp_dir().join(format!("finale-upgrade-sleeper-{}", std::process::id()));
    let program = sleeper(&dir);
    let finale = finale::Finale::builder()
        .read_env(false)
        .no_signals()
        .environment(finale::Environment::Local)
        .upgrade(
            Upgrade::new()
                .signal(None)
                .program(&program)
                .ready_timeout(Duration::from_millis(500)),
        )
        .build()
        .unwrap();
    let handle = finale.handle();
    let run = tokio::spawn(finale.run());
    handle.health().started().await;

    // Both at once: the first one polled takes the upgrade, the other is refused.
    let (first, second) = tokio::join!(handle.upgrade(), handle.upgrade());
    eprintln!("two at once: {first:?} / {second:?}");
    assert_eq!(second, Err(UpgradeError::InProgress));
    let Err(UpgradeError::NotReady { pid, waited }) = first else {
        panic!("expected NotReady, got {first:?}");
    };
    assert_eq!(waited, Duration::from_millis(500));
    // Killed and reaped: the pid is gone.
    assert!(!alive(pid), "the successor {pid} still runs");
    // Not stuck: the next upgrade runs (and fails the same way).
    assert!(matches!(
        handle.upgrade().await,
        Err(UpgradeError::NotReady { .. })
    ));
    // Still serving: the shutdown was never requested.
    assert!(!handle.is_shutdown_requested());
    handle.trigger("test");
    assert_eq!(handle.upgrade().await, Err(UpgradeError::ShuttingDown));
    let report = run.await.unwrap();
    eprintln!("{report}");
    assert_eq!(report.upgrades_failed.len(), 2, "{report}");
    assert!(
        report.upgrades_failed[0].contains("was not ready within 500ms"),
        "{report}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn upgrade_settings_that_cannot_work_are_refused_at_build() {
    use finale::upgrade::{Upgrade, UpgradeError};
    let err = finale::Finale::builder()
        .read_env(false)
        .upgrade(Upgrade::new().signal(Some(finale::Signal::Terminate)))
        .build()
        .unwrap_err();
    assert_eq!(
        err,
        finale::ConfigError::UpgradeSignal {
            signal: finale::Signal::Terminate
        }
    );
    eprintln!("{err}");
    let err = finale::Finale::builder()
        .read_env(false)
        .no_signals()
        .upgrade(Upgrade::new().ready_timeout(Duration::ZERO))
        .build()
        .unwrap_err();
    assert!(
        matches!(err, finale::ConfigError::UpgradeReadyTimeout { .. }),
        "{err}"
    );
    // Without Builder::upgrade, Handle::upgrade says so.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let finale = finale::Finale::builder()
        .read_env(false)
        .no_signals()
        .build()
        .unwrap();
    assert_eq!(
        rt.block_on(finale.handle().upgrade()),
        Err(UpgradeError::NotEnabled)
    );
}
