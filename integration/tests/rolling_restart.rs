//! Zero-error rolling restarts behind a real load balancer.
//!
//! Two instances of a finale-run axum service sit behind haproxy, which health-checks
//! `/readyz`. A real HTTP client sends a steady, bounded load through haproxy while each instance
//! is restarted in turn (SIGTERM, wait for the exit, start again, wait until haproxy sees it up).
//! With finale's drain delay the client sees zero non-2xx responses and zero connection errors;
//! the same run without the drain delay fails, which shows that the delay is what matters.
//!
//! The instances are the `axum_service` example (finale + axum, `/readyz` from
//! `finale::axum::health_router`), run as child processes.

#![cfg(unix)]
// The tests report what they measured (run with `--nocapture` to see it).
#![allow(clippy::print_stderr)]

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{OnceLock, mpsc};
use std::time::{Duration, Instant};

use common::components::{find_binary, free_ports, http_request, in_ci, wait_until};
use common::load::{LoadReport, steady_in_background};

const BOUND: Duration = Duration::from_secs(20);
/// haproxy's health check interval; it marks a server down after one failed check.
const CHECK_INTER_MS: u64 = 300;
/// Requests per second through the load balancer, and at most this many in all.
const RATE: u32 = 200;
const MAX_REQUESTS: u64 = 20_000;
/// Each instance is restarted this many times.
const ROUNDS: usize = 3;

fn axum_service() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| common::examples::example("axum_service"))
        .clone()
}

struct Instance {
    addr: SocketAddr,
    child: Option<Child>,
    env: Vec<(&'static str, String)>,
}

impl Instance {
    fn start(addr: SocketAddr, env: &[(&'static str, String)]) -> Self {
        let mut instance = Self {
            addr,
            child: None,
            env: env.to_vec(),
        };
        instance.spawn();
        instance
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(axum_service());
        cmd.env("AXUM_SERVICE_ADDR", self.addr.to_string())
            .env("RUST_LOG", "info")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("ECS_CONTAINER_METADATA_URI_V4")
            .env_remove("ECS_CONTAINER_METADATA_URI")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        self.child = Some(child);
        // Ready once it answers /readyz with 200.
        let url = format!("http://{}/readyz", self.addr);
        assert!(
            wait_until(BOUND, || http_request("GET", &url, &[], b"")
                .is_ok_and(|r| r.status == 200)),
            "instance {} never became ready: {:?}",
            self.addr,
            rx.try_iter().collect::<Vec<_>>()
        );
    }

    /// SIGTERM, then wait (bounded) for a clean exit; how long it took.
    fn stop(&mut self) -> Duration {
        let mut child = self.child.take().expect("running");
        let pid = child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert_eq!(status.code(), Some(0), "instance {} exit", self.addr);
                return start.elapsed();
            }
            if start.elapsed() > BOUND {
                child.kill().unwrap();
                panic!("instance {} did not exit", self.addr);
            }
            std::thread::sleep(Duration::from_millis(10)); // polling a condition with a bound
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

struct Haproxy {
    child: Child,
    stats: String,
    dir: PathBuf,
}

impl Haproxy {
    fn start(front: u16, stats: u16, backends: &[(&str, SocketAddr)]) -> Option<Self> {
        let Some(bin) = find_binary("haproxy") else {
            assert!(
                !in_ci(),
                "haproxy is missing (scripts/install-components.sh installs it)"
            );
            eprintln!("SKIPPING: haproxy is not installed (scripts/install-components.sh)");
            return None;
        };
        let dir =
            std::env::temp_dir().join(format!("finale-haproxy-{}-{front}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let servers: String = backends
            .iter()
            .map(|(name, addr)| format!("  server {name} {addr} check\n"))
            .collect();
        let config = format!(
            "global\n  maxconn 2000\n\
             defaults\n  mode http\n  timeout connect 1s\n  timeout client 10s\n  timeout server 10s\n\
             \x20 retries 0\n\
             frontend fe\n  bind 127.0.0.1:{front}\n  default_backend be\n\
             frontend stats\n  bind 127.0.0.1:{stats}\n  stats enable\n  stats uri /stats\n\
             backend be\n  balance roundrobin\n  option httpchk GET /readyz\n\
             \x20 http-check expect status 200\n\
             \x20 default-server inter {CHECK_INTER_MS}ms fall 1 rise 1\n{servers}"
        );
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(&cfg, config).unwrap();
        let child = Command::new(bin)
            .arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Some(Self {
            child,
            stats: format!("http://127.0.0.1:{stats}/stats;csv"),
            dir,
        })
    }

    /// Whether haproxy has server `name` up.
    fn is_up(&self, name: &str) -> bool {
        let Ok(r) = http_request("GET", &self.stats, &[], b"") else {
            return false;
        };
        r.text().lines().any(|l| {
            let f: Vec<&str> = l.split(',').collect();
            f.len() > 17 && f[0] == "be" && f[1] == name && f[17].starts_with("UP")
        })
    }

    fn wait_up(&self, name: &str) {
        assert!(
            wait_until(BOUND, || self.is_up(name)),
            "haproxy never saw {name} up"
        );
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs the restarts under load; returns what the client saw, the number of restarts, how long
/// they took, and the longest SIGTERM-to-exit of an instance.
fn rolling_restarts(
    env: &[(&'static str, String)],
) -> Option<(LoadReport, usize, Duration, Duration)> {
    let ports = free_ports(4);
    let (front, stats) = (ports[0], ports[1]);
    let addrs: Vec<SocketAddr> = ports[2..]
        .iter()
        .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
        .collect();
    let names = ["a", "b"];
    let backends: Vec<(&str, SocketAddr)> =
        names.iter().copied().zip(addrs.iter().copied()).collect();
    let haproxy = Haproxy::start(front, stats, &backends)?;
    let mut instances: Vec<Instance> = addrs.iter().map(|a| Instance::start(*a, env)).collect();
    for name in names {
        haproxy.wait_up(name);
    }

    let (stop_tx, load) = steady_in_background(
        format!("http://127.0.0.1:{front}/hello"),
        RATE,
        MAX_REQUESTS,
        Duration::from_secs(10),
    );
    let start = Instant::now();
    let mut restarts = 0;
    let mut longest_stop = Duration::ZERO;
    for _ in 0..ROUNDS {
        for (i, instance) in instances.iter_mut().enumerate() {
            longest_stop = longest_stop.max(instance.stop());
            instance.spawn();
            haproxy.wait_up(names[i]);
            restarts += 1;
        }
    }
    let elapsed = start.elapsed();
    stop_tx.send(()).unwrap();
    let report = load.join().unwrap();
    Some((report, restarts, elapsed, longest_stop))
}

#[test]
fn rolling_restarts_with_the_drain_delay_drop_nothing() {
    // The delay ends once haproxy has seen /readyz answer 503 twice (it marks the server down
    // at the first), and lasts at most 5 s.
    let env = [
        ("FINALE_DRAIN_DELAY", "5s".to_owned()),
        ("FINALE_DRAIN_PROBES", "2".to_owned()),
    ];
    let Some((report, restarts, elapsed, _)) = rolling_restarts(&env) else {
        return;
    };
    eprintln!("with drain delay: {restarts} restarts in {elapsed:?} at {RATE} req/s: {report:?}");
    assert!(report.ok() > u64::from(RATE), "too little load: {report:?}");
    assert_eq!(report.non_2xx(), 0, "{report:?}");
    assert_eq!(report.failures(), 0, "{report:?}");
    assert_eq!(report.ok(), report.sent);
}

#[test]
fn rolling_restarts_without_the_drain_delay_lose_requests() {
    let env = [("FINALE_DRAIN_DELAY", "0s".to_owned())];
    let Some((report, restarts, elapsed, _)) = rolling_restarts(&env) else {
        return;
    };
    eprintln!(
        "without drain delay: {restarts} restarts in {elapsed:?} at {RATE} req/s: {report:?}"
    );
    assert!(
        report.non_2xx() + report.failures() > 0,
        "expected errors without the drain delay: {report:?}"
    );
}

/// The quiet delay's settings: at most 10 s, over once no request has arrived for 300 ms.
const QUIET_ENV: [(&str, &str); 2] = [
    ("FINALE_DRAIN_DELAY", "10s"),
    ("FINALE_DRAIN_IDLE", "300ms"),
];

fn quiet_env() -> Vec<(&'static str, String)> {
    QUIET_ENV
        .iter()
        .map(|(k, v)| (*k, (*v).to_owned()))
        .collect()
}

#[test]
fn behind_haproxy_the_quiet_drain_delay_ends_when_the_traffic_stops() {
    // No probe count: the delay ends once haproxy, which marks the instance down at its first
    // 503 on /readyz (checks every 300 ms), sends it no more requests for 300 ms. Its health
    // checks do not count as traffic.
    let Some((report, restarts, elapsed, longest_stop)) = rolling_restarts(&quiet_env()) else {
        return;
    };
    eprintln!(
        "quiet drain delay behind haproxy: {restarts} restarts in {elapsed:?} at {RATE} req/s, \
         longest SIGTERM-to-exit {longest_stop:?} (max delay 10 s): {report:?}"
    );
    assert_eq!(report.non_2xx(), 0, "{report:?}");
    assert_eq!(report.failures(), 0, "{report:?}");
    assert_eq!(report.ok(), report.sent);
    // Ended by the quiet, not by the 10 s cap: a correct run takes about a check interval plus
    // the quiet time.
    assert!(
        longest_stop < Duration::from_secs(5),
        "an instance took {longest_stop:?} to stop"
    );
}

#[test]
fn a_client_that_ignores_health_checks_keeps_the_quiet_drain_delay_to_its_cap() {
    // The same settings, one instance, a client that talks to it directly (an L4 proxy, a
    // client with a cached address): traffic never stops, so the delay lasts its 10 s, 3 s here.
    let env = [
        ("FINALE_DRAIN_DELAY", "3s".to_owned()),
        ("FINALE_DRAIN_IDLE", "300ms".to_owned()),
    ];
    let addr = SocketAddr::from(([127, 0, 0, 1], free_ports(1)[0]));
    let mut instance = Instance::start(addr, &env);
    let (stop_tx, load) = steady_in_background(
        format!("http://{addr}/hello"),
        RATE,
        MAX_REQUESTS,
        Duration::from_secs(10),
    );
    // Load is flowing before the stop.
    let hello = format!("http://{addr}/hello");
    assert!(wait_until(BOUND, || http_request("GET", &hello, &[], b"")
        .is_ok_and(|r| r.status == 200)));
    let took = instance.stop();
    stop_tx.send(()).unwrap();
    let stopped = Instant::now();
    let report = load.join().unwrap();
    eprintln!("load ended {:?} after the stop", stopped.elapsed());
    eprintln!("quiet drain delay, direct client: SIGTERM-to-exit {took:?} (cap 3 s): {report:?}");
    assert!(report.ok() > u64::from(RATE), "too little load: {report:?}");
    // Served through the whole delay: every answer was a 2xx (refusals come after the
    // listener closed, where this client should not have been).
    assert_eq!(report.non_2xx(), 0, "{report:?}");
    assert!(
        took >= Duration::from_millis(2900),
        "the delay ended after {took:?} although requests kept arriving"
    );
}
