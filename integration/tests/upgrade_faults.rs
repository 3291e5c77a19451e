//! Upgrades when things go wrong: a binary replaced by rename, a successor stopped at its ready
//! timeout, a SIGTERM while the successor starts, a server the new version removed, children
//! of the successor, bad programs, fast generations with two servers, the ready outcome
//! counted before the shutdown. Real child processes (`integration/examples/upgrade_probe.rs`,
//! `examples/zero_downtime.rs`), real
//! signals. Every process a test causes (successors, their children) is ended by pid.

#![cfg(unix)]
#![allow(clippy::print_stderr)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::components::{free_ports, http_request, wait_until};

const BOUND: Duration = Duration::from_secs(20);

/// A chain of processes sharing one stderr pipe; every pid named in a line is ended at drop.
struct Chain {
    first: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    pids: Vec<u32>,
}

impl Chain {
    fn start(program: &Path, env: &[(&str, String)]) -> Self {
        let mut cmd = Command::new(program);
        for k in [
            "NOTIFY_SOCKET",
            "LISTEN_FDS",
            "LISTEN_PID",
            "LISTEN_FDNAMES",
            "FINALE_LISTEN_PARENT",
            "FINALE_UPGRADE_GENERATION",
            "KUBERNETES_SERVICE_HOST",
        ] {
            cmd.env_remove(k);
        }
        cmd.env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut first = cmd.spawn().unwrap();
        let stderr = first.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let pid = first.id();
        Self {
            first,
            lines,
            seen: Vec::new(),
            pids: vec![pid],
        }
    }

    fn wait_line(&mut self, needle: &str) -> String {
        self.wait_any(&[needle])
    }

    fn wait_any(&mut self, needles: &[&str]) -> String {
        if let Some(l) = self
            .seen
            .iter()
            .find(|l| needles.iter().any(|n| l.contains(n)))
        {
            return l.clone();
        }
        let deadline = Instant::now() + BOUND;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    for key in ["successor_pid=", "child pid=", "probe starting pid="] {
                        if let Ok(p) = field(&line, key).parse::<u32>()
                            && !self.pids.contains(&p)
                        {
                            self.pids.push(p);
                        }
                    }
                    self.seen.push(line.clone());
                    if needles.iter().any(|n| line.contains(n)) {
                        return line;
                    }
                }
                Err(_) => panic!("no line with {needles:?}:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// The `n`th line (1-based) containing `needle`.
    fn wait_nth(&mut self, needle: &str, n: usize) -> String {
        loop {
            let found: Vec<&String> = self.seen.iter().filter(|l| l.contains(needle)).collect();
            if found.len() >= n {
                return found[n - 1].clone();
            }
            match self.lines.recv_timeout(BOUND) {
                Ok(line) => {
                    if let Ok(p) = field(&line, "successor_pid=").parse::<u32>()
                        && !self.pids.contains(&p)
                    {
                        self.pids.push(p);
                    }
                    self.seen.push(line);
                }
                Err(_) => panic!("no {n}th line with {needle:?}:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// Every line that arrives within `d` (the log after an event has settled).
    fn drain_lines(&mut self, d: Duration) {
        let deadline = Instant::now() + d;
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.seen.push(line);
        }
    }
}

impl Drop for Chain {
    fn drop(&mut self) {
        for pid in self.pids.iter().rev() {
            if alive(*pid) {
                kill("-KILL", *pid);
            }
        }
        let _ = self.first.wait();
    }
}

fn kill(signal: &str, pid: u32) {
    let _ = Command::new("kill")
        .args([signal, &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// Alive and not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| !r.trim_start().starts_with('Z'))
    })
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let start = line.find(key).map(|i| i + key.len()).unwrap_or(line.len());
    line[start..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap_or("")
}

fn probe() -> PathBuf {
    common::examples::example("upgrade_probe")
}

fn addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_ports(1)[0]))
}

fn ready(addr: SocketAddr) {
    let url = format!("http://{addr}/readyz");
    assert!(wait_until(BOUND, || http_request("GET", &url, &[], b"")
        .is_ok_and(|r| r.status == 200)));
}

/// The backlog of the listening socket on `port` (`ss`'s Send-Q for a LISTEN socket).
fn backlog(port: u16) -> Option<u32> {
    let out = Command::new("ss")
        .args(["-Hltn", &format!("sport = :{port}")])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines().next()?.split_whitespace().nth(2)?.parse().ok()
}

/// One request on a new connection: `Ok(body)` for a 200, `Err(what)` otherwise.
fn fresh_get(addr: SocketAddr, path: &str) -> Result<String, String> {
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .map_err(|e| format!("connect: {:?}", e.kind()))?;
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    conn.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .map_err(|e| format!("write: {:?}", e.kind()))?;
    let mut buf = Vec::new();
    match conn.read_to_end(&mut buf) {
        Ok(_) if buf.starts_with(b"HTTP/1.1 200") => Ok(String::from_utf8_lossy(&buf).into_owned()),
        Ok(0) => Err("closed without an answer".to_owned()),
        Ok(_) => Err(format!("answer {:?}", String::from_utf8_lossy(&buf))),
        Err(e) => Err(format!("read: {:?}", e.kind())),
    }
}

/// Sends `GET /slow` on a new connection and returns once the server has read it (the
/// server's end of the connection has nothing left unread, per `ss`); the answer is read on a
/// thread: `Ok(body)` for a 200, `Err(what)` otherwise.
fn slow_in_flight(addr: SocketAddr) -> std::thread::JoinHandle<Result<String, String>> {
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).unwrap();
    let client_port = conn.local_addr().unwrap().port();
    conn.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let read = wait_until(BOUND, || {
        let out = Command::new("ss")
            .args([
                "-Htn",
                &format!("sport = :{} and dport = :{client_port}", addr.port()),
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        // State Recv-Q Send-Q Local Peer: an accepted connection whose request was read.
        text.lines()
            .next()
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u32>().ok())
            == Some(0)
    });
    assert!(read, "the server read the request");
    std::thread::spawn(move || {
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = Vec::new();
        match conn.read_to_end(&mut buf) {
            Ok(_) if buf.starts_with(b"HTTP/1.1 200") => {
                Ok(String::from_utf8_lossy(&buf).into_owned())
            }
            Ok(0) => Err("closed without an answer".to_owned()),
            Ok(_) => Err(format!("answer {:?}", String::from_utf8_lossy(&buf))),
            Err(e) => Err(format!("read: {:?}", e.kind())),
        }
    })
}

/// `Upgrade::program`'s default is the executable found when the finale was built: a new
/// release installed by rename (writing a running binary in place fails with ETXTBSY) is the
/// successor, although the running process's own path then names a deleted file.
#[test]
fn a_binary_replaced_by_rename_is_the_successor() {
    let dir = std::env::temp_dir().join(format!("finale-upgrade-replaced-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let installed = dir.join("svc");
    std::fs::copy(common::examples::example("zero_downtime"), &installed).unwrap();
    let addr = addr();
    let mut chain = Chain::start(&installed, &[("ZERO_DOWNTIME_ADDR", addr.to_string())]);
    ready(addr);
    // A new release installed the usual way: write next to it, rename over it.
    let staged = dir.join("svc.new");
    std::fs::copy(&installed, &staged).unwrap();
    std::fs::rename(&staged, &installed).unwrap();
    kill("-USR2", chain.first.id());
    let line = chain.wait_any(&["upgrade failed", "the successor is ready"]);
    eprintln!("{line}");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        !line.contains("upgrade failed"),
        "the replaced binary was not started: {line}"
    );
}

/// A successor whose graceful start outlasts `ready_timeout` has been accepting from the
/// shared queue since its server was up: it is stopped with SIGTERM (its own finale drains
/// what it accepted), not killed, and no request is lost.
#[test]
fn a_successor_killed_at_ready_timeout_loses_the_connections_it_accepted() {
    let addr = addr();
    let mut chain = Chain::start(
        &probe(),
        &[
            ("PROBE_ADDR", addr.to_string()),
            ("PROBE_SUCCESSOR_SLOW_START_MS", "5000".to_owned()),
            ("PROBE_READY_TIMEOUT_MS", "1000".to_owned()),
            ("FINALE_DRAIN_DELAY", "0s".to_owned()),
        ],
    );
    ready(addr);
    kill("-USR2", chain.first.id());
    chain.wait_line("probe serving pid=");
    // Requests on new connections while the successor starts (its server is up, its warm-up
    // is not): some land in the successor.
    let mut clients = Vec::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(900) {
        clients.push(std::thread::spawn(move || fresh_get(addr, "/slow")));
        std::thread::sleep(Duration::from_millis(30)); // the scenario: a steady client
    }
    let line = chain.wait_line("upgrade failed");
    assert!(line.contains("was not ready within"), "{line}");
    let results: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    eprintln!(
        "{} requests, {} failed: {failed:?}",
        results.len(),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "{} of {} lost: {failed:?}",
        failed.len(),
        results.len()
    );
}

/// SIGTERM while the old process waits for its successor: the service is to stop, so the
/// upgrade is abandoned, the successor stopped (no orphan serves on), the report says so, and
/// the servers leave the shared socket alone while the successor still holds it.
#[test]
fn sigterm_while_waiting_for_the_successor() {
    let addr = addr();
    let mut chain = Chain::start(
        &probe(),
        &[
            ("PROBE_ADDR", addr.to_string()),
            ("PROBE_SUCCESSOR_SLOW_START_MS", "1500".to_owned()),
            ("PROBE_READY_TIMEOUT_MS", "10000".to_owned()),
            ("FINALE_DRAIN_DELAY", "0s".to_owned()),
        ],
    );
    ready(addr);
    let before = backlog(addr.port());
    let old = chain.first.id();
    kill("-USR2", old);
    let started = chain.wait_line("upgrade: successor started");
    let successor: u32 = field(&started, "successor_pid=").parse().unwrap();
    kill("-TERM", old);
    let report = chain.wait_line(&format!("probe report pid={old}"));
    let abandoned = chain.wait_line("upgrade failed: the shutdown started while the successor");
    let _ = chain.first.wait();
    assert!(
        wait_until(BOUND, || !alive(successor)),
        "the successor {successor} serves on (orphan)"
    );
    let serving = fresh_get(addr, "/hello");
    eprintln!(
        "old report: {report}\n  {abandoned}\nbacklog before {before:?}\nsuccessor {successor} alive: {}, serving: {serving:?}",
        alive(successor)
    );
    assert!(
        abandoned.contains(&format!("pid {successor}")),
        "{abandoned}"
    );
    assert!(
        !alive(successor),
        "the successor {successor} serves on (orphan): {serving:?}"
    );
    // Stopped as asked: nobody serves the port.
    assert_eq!(serving, Err("connect: ConnectionRefused".to_owned()));
}

/// A new version without one of the old servers (`admin`): its passed socket is closed once
/// the successor's graceful start is done, so connections to the removed port are refused
/// instead of hanging in a queue nobody accepts from.
#[test]
fn a_server_the_successor_no_longer_has_refuses_connections() {
    let (http, admin) = (addr(), addr());
    let mut chain = Chain::start(
        &probe(),
        &[
            ("PROBE_ADDR", http.to_string()),
            ("PROBE_ADMIN_ADDR", admin.to_string()),
            ("PROBE_SUCCESSOR_DROPS_ADMIN", "1".to_owned()),
            ("FINALE_DRAIN_DELAY", "0s".to_owned()),
        ],
    );
    ready(http);
    let old = chain.first.id();
    kill("-USR2", old);
    chain.wait_line("the successor is ready");
    chain.wait_line(&format!("probe report pid={old}"));
    let _ = chain.first.wait();
    let got = fresh_get(admin, "/hello");
    eprintln!("admin after the upgrade: {got:?}");
    assert_eq!(got, Err("connect: ConnectionRefused".to_owned()));
}

/// The successor's passed sockets are close-on-exec from the moment they are read (at
/// `build()`): a process the successor starts before its servers bind does not inherit the
/// service's listening socket, so the port is free once the successor stops.
#[test]
fn the_successors_children_do_not_inherit_the_listening_socket() {
    let http = addr();
    let mut chain = Chain::start(
        &probe(),
        &[
            ("PROBE_ADDR", http.to_string()),
            ("PROBE_SPAWN_CHILD", "1".to_owned()),
            ("FINALE_DRAIN_DELAY", "0s".to_owned()),
        ],
    );
    ready(http);
    let old = chain.first.id();
    kill("-USR2", old);
    let line = chain.wait_line("the successor is ready");
    let successor: u32 = field(&line, "successor_pid=").parse().unwrap();
    chain.wait_line(&format!("probe report pid={old}"));
    let _ = chain.first.wait();
    // The successor's own child.
    let children: Vec<u32> = chain
        .seen
        .iter()
        .filter(|l| l.contains("child pid="))
        .filter_map(|l| field(l, "child pid=").parse().ok())
        .collect();
    let grandchild = *children.last().unwrap();
    let sockets: Vec<String> = std::fs::read_dir(format!("/proc/{grandchild}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|p| p.display().to_string())
        .filter(|p| p.starts_with("socket:"))
        .collect();
    let env = std::fs::read(format!("/proc/{grandchild}/environ")).unwrap();
    let env: Vec<String> = env
        .split(|b| *b == 0)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .filter(|v| v.starts_with("LISTEN_") || v.starts_with("FINALE_LISTEN"))
        .collect();
    // Stop the successor: is the port refused now?
    kill("-TERM", successor);
    assert!(wait_until(BOUND, || !alive(successor)));
    let after = fresh_get(http, "/hello");
    eprintln!(
        "successor's child {grandchild}: sockets {sockets:?}, env {env:?}; after the successor stopped: {after:?}, backlog {:?}",
        backlog(http.port())
    );
    assert!(sockets.is_empty(), "inherited: {sockets:?}");
    assert_eq!(after, Err("connect: ConnectionRefused".to_owned()));
}

/// A missing program, a non-executable file and a directory are `Spawn` errors; the process
/// goes on, and the next upgrade is not refused as `InProgress`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_programs_are_spawn_errors() {
    use finale::upgrade::{Upgrade, UpgradeError};
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("finale-upgrade-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let plain = dir.join("plain");
    std::fs::write(&plain, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
    for program in [dir.join("missing"), plain, dir.clone()] {
        let finale = finale::Finale::builder()
            .read_env(false)
            .no_signals()
            .install(false)
            .environment(finale::Environment::Local)
            .upgrade(Upgrade::new().signal(None).program(&program))
            .build()
            .unwrap();
        let handle = finale.handle();
        let run = tokio::spawn(finale.run());
        handle.health().started().await;
        for _ in 0..2 {
            let got = handle.upgrade().await;
            eprintln!("{}: {got:?}", program.display());
            assert!(matches!(got, Err(UpgradeError::Spawn { .. })), "{got:?}");
        }
        handle.trigger("test");
        let report = run.await.unwrap();
        assert_eq!(report.upgrades_failed.len(), 2, "{report}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Three upgrades in a row, each signalled as soon as the previous successor is ready, two
/// servers handed over each time: generations 1..3, both ports served by the last process
/// once its predecessors are gone.
#[test]
fn fast_generations_with_two_servers() {
    let (http, admin) = (addr(), addr());
    let mut chain = Chain::start(
        &probe(),
        &[
            ("PROBE_ADDR", http.to_string()),
            ("PROBE_ADMIN_ADDR", admin.to_string()),
        ],
    );
    ready(http);
    let mut pid = chain.first.id();
    for generation in 1..=3 {
        kill("-USR2", pid);
        let line = chain.wait_nth(
            "shutdown requested reason=upgrade: handed over to pid",
            generation,
        );
        let next: u32 = field(&line, "handed over to pid ").parse().unwrap();
        let starting = chain.wait_line(&format!("probe starting pid={next}"));
        assert!(
            starting.contains(&format!("generation={generation}")),
            "{starting}"
        );
        if generation == 3 {
            // Its predecessor accepts until its Drain starts: let it finish.
            chain.wait_line(&format!("probe report pid={pid}"));
            assert!(wait_until(BOUND, || !alive(pid)));
        }
        pid = next;
    }
    for a in [http, admin] {
        let got = fresh_get(a, "/hello").unwrap();
        if !got.contains(&format!("hello from {pid}")) {
            chain.drain_lines(Duration::from_millis(500));
            panic!("expected {pid}: {got}\n{}", chain.seen.join("\n"));
        }
    }
    kill("-TERM", pid);
    assert!(wait_until(BOUND, || !alive(pid)));
}

/// The `ready` outcome is counted (`finale_upgrades_total{outcome="ready"}`) and logged
/// ("upgrade: the successor is ready") before the shutdown is requested: an old process with
/// nothing to drain may exit a millisecond later.
#[test]
fn the_ready_outcome_is_counted_before_the_shutdown_runs() {
    let http = addr();
    let mut chain = Chain::start(&probe(), &[("PROBE_ADDR", http.to_string())]);
    ready(http);
    let mut pid = chain.first.id();
    let rounds = 5;
    for generation in 1..=rounds {
        kill("-USR2", pid);
        let line = chain.wait_nth(
            "shutdown requested reason=upgrade: handed over to pid",
            generation,
        );
        let next: u32 = field(&line, "handed over to pid ").parse().unwrap();
        chain.wait_line(&format!("probe report pid={pid}"));
        assert!(wait_until(BOUND, || !alive(pid)));
        pid = next;
    }
    chain.drain_lines(Duration::from_millis(300));
    let logged = chain
        .seen
        .iter()
        .filter(|l| l.contains("upgrade: the successor is ready"))
        .count();
    eprintln!("{rounds} hand-offs, {logged} 'the successor is ready' lines");
    kill("-TERM", pid);
    assert!(wait_until(BOUND, || !alive(pid)));
    assert_eq!(logged, rounds, "{}", chain.seen.join("\n"));
}

/// A SIGTERM recorded while the successor starts wins, even when the successor reports ready
/// a moment later (before the old process looked at the shutdown again): the upgrade is
/// abandoned, the successor stopped, nobody serves on. The successor here becomes ready only
/// when told (SIGUSR1), right after the old process logged the shutdown request. Five rounds:
/// the old wait looked at the shutdown only every 20 ms, and a `READY=1` in that slice won.
#[test]
fn a_sigterm_just_before_the_successor_is_ready_wins() {
    for round in 1..=5 {
        let addr = addr();
        let mut chain = Chain::start(
            &probe(),
            &[
                ("PROBE_ADDR", addr.to_string()),
                ("PROBE_SUCCESSOR_READY_ON_USR1", "1".to_owned()),
                ("PROBE_READY_TIMEOUT_MS", "10000".to_owned()),
                ("FINALE_DRAIN_DELAY", "0s".to_owned()),
            ],
        );
        ready(addr);
        let old = chain.first.id();
        kill("-USR2", old);
        let warming = chain.wait_line("probe warming pid=");
        let successor: u32 = field(&warming, "probe warming pid=").parse().unwrap();
        kill("-TERM", old);
        chain.wait_line("shutdown requested reason=signal");
        kill("-USR1", successor);
        let report = chain.wait_line(&format!("probe report pid={old}"));
        let _ = chain.first.wait();
        let gone = wait_until(BOUND, || !alive(successor));
        let serving = fresh_get(addr, "/hello");
        eprintln!("round {round}: {report}\n  successor gone: {gone}, serving: {serving:?}");
        assert!(
            gone,
            "round {round}: the successor {successor} serves on (orphan): {serving:?}\n{}",
            chain.seen.join("\n")
        );
        assert!(
            chain.seen.iter().any(|l| l.contains("upgrade abandoned")),
            "round {round}: {}",
            chain.seen.join("\n")
        );
        assert_eq!(serving, Err("connect: ConnectionRefused".to_owned()));
    }
}

/// A SIGTERM and the successor's `READY=1` swept across each other (the SIGTERM first, then
/// 0 to ~300 µs of a busy loop, then the successor told to get ready): exactly one wins, in
/// every round. Either the shutdown won (logged as `reason=signal`): the upgrade is abandoned
/// and the successor stopped. Or the hand-off won: the old process shuts down with reason
/// `upgrade`, the SIGTERM counts as the first signal after the hand-off (or, when the old
/// process's drain takes under a millisecond, the process has exited before its supervisor
/// reads the signal), never as a second one; the old process ends clean and the successor
/// serves.
/// Never both: before, a SIGTERM logged just before the ready line (3 of 30 rounds) let the
/// successor serve while the old process stopped for the signal, "clean", an orphan.
#[test]
fn a_sigterm_racing_the_successors_ready_line_has_one_winner() {
    // Built once: every `probe()` runs cargo.
    let program = probe();
    for round in 0..12u64 {
        let addr = addr();
        let mut chain = Chain::start(
            &program,
            &[
                ("PROBE_ADDR", addr.to_string()),
                ("PROBE_SUCCESSOR_READY_ON_USR1", "1".to_owned()),
                ("PROBE_READY_TIMEOUT_MS", "10000".to_owned()),
                ("FINALE_DRAIN_DELAY", "0s".to_owned()),
            ],
        );
        ready(addr);
        let old = chain.first.id();
        kill("-USR2", old);
        let warming = chain.wait_line("probe warming pid=");
        let successor: u32 = field(&warming, "probe warming pid=").parse().unwrap();
        let spin = round * 24;
        let script = format!(
            "kill -TERM {old}; i=0; while [ $i -lt {spin} ]; do i=$((i+1)); done; kill -USR1 {successor}"
        );
        assert!(
            Command::new("sh")
                .arg("-c")
                .arg(script)
                .status()
                .unwrap()
                .success()
        );
        let report = chain.wait_line(&format!("probe report pid={old}"));
        let _ = chain.first.wait();
        let seen = |what: &str| chain.seen.iter().any(|l| l.contains(what));
        let by_signal = seen("shutdown requested reason=signal");
        let by_upgrade = seen("shutdown requested reason=upgrade");
        let log = chain.seen.join("\n");
        assert!(
            by_signal != by_upgrade,
            "round {round}: one reason, not {by_signal}/{by_upgrade}\n{log}"
        );
        if by_signal {
            assert!(seen("upgrade abandoned"), "round {round}: {log}");
            assert!(
                wait_until(BOUND, || !alive(successor)),
                "round {round}: the successor {successor} serves on (orphan)\n{log}"
            );
        } else {
            assert!(
                !seen("second signal"),
                "round {round}: a second signal\n{log}"
            );
            assert!(
                report.contains(": clean, exit code 0"),
                "round {round}: not clean\n{log}"
            );
            assert!(
                !seen("upgrade abandoned"),
                "round {round}: the upgrade won, yet is called abandoned\n{log}"
            );
            if !alive(successor) {
                // What the successor said on its way out, if anything.
                chain.drain_lines(Duration::from_secs(2));
                panic!(
                    "round {round}: the successor {successor} is gone after the hand-off\n{}",
                    chain.seen.join("\n")
                );
            }
            assert_eq!(
                fresh_get(addr, "/hello").map(|_| ()),
                Ok(()),
                "round {round}"
            );
            kill("-KILL", successor);
        }
        eprintln!("round {round} spin {spin}: signal won: {by_signal}; {report}");
    }
}

/// After a hand-off the old process drains what it has in flight; `systemctl stop` (one
/// SIGTERM to it, `KillMode=control-group`) is the first signal, not a second one: its
/// requests finish (a 1.5 s request here), the exit is not "forced".
#[test]
fn one_sigterm_after_the_hand_off_does_not_cut_the_old_processes_requests() {
    let addr = addr();
    let mut chain = Chain::start(
        &probe(),
        &[
            ("PROBE_ADDR", addr.to_string()),
            ("FINALE_DRAIN_DELAY", "0s".to_owned()),
        ],
    );
    ready(addr);
    let old = chain.first.id();
    // In flight in the old process before the upgrade.
    let slow = slow_in_flight(addr);
    kill("-USR2", old);
    chain.wait_line("shutdown requested reason=upgrade");
    kill("-TERM", old);
    let answer = slow.join().unwrap();
    let report = chain.wait_line(&format!("probe report pid={old}"));
    let status = chain.first.wait().unwrap();
    eprintln!("{report}\n  old exit: {status}, the slow request: {answer:?}");
    assert!(
        answer
            .as_ref()
            .is_ok_and(|a| a.contains(&format!("hello from {old}"))),
        "cut: {answer:?}\n{}",
        chain.seen.join("\n")
    );
    assert_eq!(status.code(), Some(0), "{report}");
    // The successor serves.
    assert!(fresh_get(addr, "/hello").is_ok());
}

/// A second signal abandons the drain: the requests it cuts are named in the report, as those
/// cut at the drain deadline are.
#[test]
fn a_second_sigterm_names_the_requests_it_cuts() {
    let addr = addr();
    let mut chain = Chain::start(
        &probe(),
        &[
            ("PROBE_ADDR", addr.to_string()),
            ("FINALE_DRAIN_DELAY", "0s".to_owned()),
        ],
    );
    ready(addr);
    let old = chain.first.id();
    let slow = slow_in_flight(addr);
    kill("-TERM", old);
    chain.wait_line("shutdown requested reason=signal");
    kill("-TERM", old);
    let report = chain.wait_line(&format!("probe report pid={old}"));
    let _ = chain.first.wait();
    let answer = slow.join().unwrap();
    chain.drain_lines(Duration::from_millis(300));
    eprintln!("{report}\n  the slow request: {answer:?}");
    assert!(answer.is_err(), "cut by the second signal: {answer:?}");
    assert!(
        chain
            .seen
            .iter()
            .any(|l| l.contains("GET /slow from 127.0.0.1:")),
        "the cut request is named:\n{}",
        chain.seen.join("\n")
    );
}
