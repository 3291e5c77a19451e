//! The Telemetry phase end to end: the `full_service` example as a child process, a real
//! Pushgateway and a real OTLP collector (rotel) on free loopback ports, a real SIGTERM.
//!
//! - Lossless under load: every request the client saw succeed is counted at the Pushgateway,
//!   has its span and its log record at the collector and its line in the log file.
//! - Every runtime flavour and both OTLP transports deliver.
//! - Faults (collector refused or blackholed, Pushgateway down, answering 500, rejecting with
//!   400): the process exits within its budget with the "telemetry not delivered" code, and the
//!   report names what failed.
//! - A second SIGTERM cuts a hung flush short to the escalation budget.

#![cfg(unix)]
// The tests report what they measured (run with `--nocapture` to see it).
#![allow(clippy::print_stderr)]

mod common;

/// From the report on stderr: what the `delivered  <stage>` line counts as exported (run and
/// at exit) and as failed or dropped.
fn delivered(out: &str, stage: &str) -> (u64, u64) {
    let line = out
        .lines()
        .find(|l| l.contains(&format!("delivered  {stage} ")))
        .unwrap_or_else(|| panic!("no delivery line for {stage}: {out}"));
    let (mut exported, mut lost) = (0, 0);
    let words: Vec<&str> = line.split_whitespace().collect();
    for pair in words.windows(2) {
        let n: u64 = pair[0].parse().unwrap_or(0);
        match pair[1].trim_end_matches([',', ';']) {
            "exported" => exported += n,
            "failed" | "sent" | "dropped" => lost += n,
            _ => {}
        }
    }
    (exported, lost)
}

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, ExitStatus};

use std::time::{Duration, Instant};

use finale::Signal;
use finale::testing::Process;

use common::components::{Collector, Pushgateway, free_port, http_request, wait_until};
use common::load;
use common::scratch::{Scratch, full_service};
use common::tls_gateway::{PASSWORD, TempDir, USER, tls_gateway};

/// Wide bound for anything that should take a second or two.
const BOUND: Duration = Duration::from_secs(20);
/// The budget the fault runs use: short, so the tests stay fast.
const FAULT_ENV: [(&str, &str); 2] = [
    ("FINALE_TOTAL_BUDGET", "6s"),
    ("FINALE_TELEMETRY_RESERVE", "3s"),
];
const FAULT_TOTAL: Duration = Duration::from_secs(6);
const EXIT_TELEMETRY_NOT_DELIVERED: i32 = 6;
/// The lossless test's load: requests per second, and at most this many in all.
const LOAD_RATE: u32 = 400;
const LOAD_MAX: u64 = 10_000;

/// The `full_service` example as a child process, through the testing kit (which keeps the
/// test's own `FINALE_*` and orchestrator variables out of it, and kills it if the test fails).
struct Service {
    process: Process,
    addr: String,
}

impl Service {
    /// Starts the service and waits until it is listening and ready.
    fn start(log: &Path, env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(full_service());
        cmd.env("FULL_SERVICE_ADDR", "127.0.0.1:0")
            .env("FULL_SERVICE_LOG", log)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env_remove("PUSHGATEWAY_URL")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_PROTOCOL");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut process = Process::spawn(cmd).unwrap();
        let listening = process.wait_for("listening on ", BOUND);
        let addr = listening
            .split("listening on ")
            .nth(1)
            .unwrap()
            .trim()
            .to_owned();
        process.wait_for("started: ready", BOUND);
        Self { process, addr }
    }

    /// Waits (bounded) for a stderr line containing `needle` and returns it.
    fn wait_for(&mut self, needle: &str) -> String {
        self.process.wait_for(needle, BOUND)
    }

    fn work_url(&self) -> String {
        format!("{}/work", self.addr)
    }

    fn sigterm(&mut self) {
        self.process.signal(Signal::Terminate);
    }

    /// Waits (bounded) for the exit; returns the status, everything written to stderr and the
    /// time it took after the signal.
    fn wait_exit(self) -> (ExitStatus, String, Duration) {
        let exit = self.process.wait_exit(BOUND);
        let status = exit
            .status
            .unwrap_or_else(|| panic!("did not exit within {BOUND:?}; saw:\n{}", exit.stderr));
        (status, exit.stderr, exit.elapsed)
    }

    /// SIGTERM, then the exit.
    fn stop(mut self) -> (ExitStatus, String, Duration) {
        self.sigterm();
        self.wait_exit()
    }
}

/// `n` sequential requests that must all succeed.
fn requests(url: &str, n: usize) {
    for _ in 0..n {
        let r = http_request("GET", url, &[], &[]).unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
}

/// Log records whose body is `body`, in the collector's detailed dump.
fn log_records_with_body(collector: &Collector, body: &str) -> usize {
    let line = format!("Body: Str({body})");
    collector
        .output()
        .lines()
        .filter(|l| l.trim() == line)
        .count()
}

fn spans_named(collector: &Collector, name: &str) -> usize {
    collector.span_names().iter().filter(|n| *n == name).count()
}

fn lines_containing(path: &Path, needle: &str) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

#[test]
fn lossless_under_load_across_sigterm() {
    let (Some(gateway), Some(collector)) = (Pushgateway::start(), Collector::start()) else {
        return;
    };
    lossless(
        "lossless",
        &collector,
        &[("PUSHGATEWAY_URL", &gateway.url())],
        &|name, labels| gateway.sample(name, labels),
        &|| gateway.metrics_text(),
    );
}

/// The same with the service's runtime wedged in its Workers phase (`current_thread`, a hook
/// that blocks its only thread for 8 s, a 3 s budget): the supervisor takes over, and its
/// delivery is just as lossless, over gRPC (the exporters are built on finale's exporter
/// runtime, as the full_service example does).
#[test]
fn lossless_under_load_across_sigterm_with_a_wedged_runtime() {
    let (Some(gateway), Some(collector)) = (Pushgateway::start(), Collector::start()) else {
        return;
    };
    lossless(
        "lossless-wedged",
        &collector,
        &[
            ("PUSHGATEWAY_URL", &gateway.url()),
            ("FULL_SERVICE_RUNTIME", "current_thread"),
            ("FULL_SERVICE_BLOCK_WORKERS_MS", "8000"),
            ("FINALE_TOTAL_BUDGET", "3s"),
            ("FINALE_TELEMETRY_RESERVE", "2s"),
            ("FINALE_SAFETY_MARGIN", "1s"),
        ],
        &|name, labels| gateway.sample(name, labels),
        &|| gateway.metrics_text(),
    );
}

#[test]
fn lossless_under_load_across_sigterm_with_the_pushgateway_over_tls() {
    // The Pushgateway behind TLS and basic auth (its own `--web.config.file`, certificates made
    // by the test): the same counts, read back over TLS.
    let (Some(tls), Some(collector)) = (tls_gateway(false), Collector::start()) else {
        return;
    };
    let dir = TempDir::new("lossless-tls");
    let ca = dir.write("ca.pem", &tls.pki.ca);
    let ca = ca.to_str().unwrap();
    lossless(
        "lossless-tls",
        &collector,
        &[
            ("PUSHGATEWAY_URL", &tls.gateway.url()),
            ("PUSHGATEWAY_CA_FILE", ca),
            ("PUSHGATEWAY_USER", USER),
            ("PUSHGATEWAY_PASSWORD", PASSWORD),
        ],
        &|name, labels| tls.sample(false, name, labels),
        &|| tls.metrics_text(false),
    );
}

/// Reads one sample from the Pushgateway: its name and some of its labels.
type Sample<'a> = dyn Fn(&str, &[(&str, &str)]) -> Option<f64> + 'a;

/// The lossless run: a steady load across SIGTERM; every request a client saw answered 2xx is
/// in the Pushgateway's counter (read with `sample`), one span, one log record and one log line.
fn lossless(
    job: &str,
    collector: &Collector,
    gateway_env: &[(&str, &str)],
    sample: &Sample<'_>,
    metrics_text: &dyn Fn() -> String,
) {
    let scratch = Scratch::new(job);
    let endpoint = collector.grpc_endpoint();
    let mut env = vec![
        ("PUSHGATEWAY_JOB", job),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
    ];
    env.extend_from_slice(gateway_env);
    // A runtime wedged in the Workers phase: the supervisor delivers, and exits with 5.
    let wedged = gateway_env
        .iter()
        .any(|(k, _)| *k == "FULL_SERVICE_BLOCK_WORKERS_MS");
    let mut service = Service::start(&scratch.log(), &env);

    // A steady load from a real keep-alive HTTP client, on its own thread and runtime, until the
    // service has exited.
    let (stop_load, stopped) = tokio::sync::oneshot::channel::<()>();
    let url = service.work_url();
    let load = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(load::steady(
                &url,
                LOAD_RATE,
                LOAD_MAX,
                Duration::from_secs(5),
                async {
                    let _ = stopped.await;
                },
            ))
    });
    // SIGTERM mid-load: once a good part of it has been served.
    assert!(
        wait_until(BOUND, || lines_containing(&scratch.log(), "request served")
            >= 300),
        "the load did not get going"
    );
    service.sigterm();
    let (status, out, elapsed) = service.wait_exit();
    let _ = stop_load.send(());
    let report = load.join().unwrap();
    let ok = report.ok();
    eprintln!(
        "lossless: sent {}, {ok} answered 2xx, statuses {:?}, failures {:?}; exit {elapsed:?} after SIGTERM",
        report.sent, report.statuses, report.errors
    );
    if wedged {
        assert_eq!(status.code(), Some(5), "{out}");
        assert!(out.contains("the shutdown overran its budget"), "{out}");
    } else {
        assert_eq!(status.code(), Some(0), "{out}");
        assert!(out.contains("clean, exit code 0"), "{out}");
    }
    assert!(
        report.sent < LOAD_MAX,
        "the load ended before the service did"
    );
    assert!(
        report.failures() > 0,
        "some requests came after the listener closed"
    );

    // Metrics: the counter at the Pushgateway is exactly what the clients saw.
    let pushed = sample("requests_total", &[("job", job)]);
    assert_eq!(pushed, Some(ok as f64), "{}", metrics_text());
    if wedged {
        // The sequence never reached its Telemetry phase; the supervisor's own counter did.
        assert_eq!(
            sample("finale_supervisor_takeovers_total", &[("job", job)]),
            Some(1.0)
        );
    } else {
        // finale's own shutdown metrics made it too.
        assert_eq!(
            sample(
                "finale_shutdowns_total",
                &[("job", job), ("reason", "signal")]
            ),
            Some(1.0)
        );
        assert!(sample("finale_shutdown_duration_seconds", &[("job", job)]).is_some());
    }

    // Traces and logs: exactly one span and one log record per successful request.
    let n = ok as usize;
    wait_until(BOUND, || {
        spans_named(collector, "request") >= n
            && log_records_with_body(collector, "request served") >= n
            && (wedged || spans_named(collector, "finale.shutdown") >= 1)
    });
    assert_eq!(
        spans_named(collector, "request"),
        n,
        "{}",
        collector.diagnostics()
    );
    assert_eq!(log_records_with_body(collector, "request served"), n);
    if wedged {
        // The supervisor's flush: the sequence never closed its span, so none is exported;
        // the file has the lines of every request served and the takeover's.
        assert_eq!(lines_containing(&scratch.log(), "request served"), n);
        assert!(lines_containing(&scratch.log(), "the shutdown overran its budget") >= 1);
        return;
    }
    assert_eq!(spans_named(collector, "finale.shutdown"), 1);
    // The report's counts are the collector's: every span and log record it received, and
    // nothing failed or dropped.
    for (stage, received) in [
        ("otlp-traces", collector.span_count()),
        ("otlp-logs", collector.log_record_count()),
    ] {
        let (exported, lost) = delivered(&out, stage);
        eprintln!("lossless: {stage}: {exported} exported per the report, {received} received");
        assert_eq!(exported, received, "{stage}: {out}");
        assert_eq!(lost, 0, "{stage}: {out}");
    }

    // The log file: one line per successful request.
    assert_eq!(lines_containing(&scratch.log(), "request served"), n);
    assert!(lines_containing(&scratch.log(), "finale: shutdown after signal SIGTERM") >= 1);
}

#[test]
fn every_runtime_and_transport_delivers() {
    let Some(collector) = Collector::start() else {
        return;
    };
    let mut expected = 0;
    for (runtime, protocol, endpoint) in [
        ("current_thread", "grpc", collector.grpc_endpoint()),
        ("one_worker", "grpc", collector.grpc_endpoint()),
        ("multi_thread", "grpc", collector.grpc_endpoint()),
        ("current_thread", "http/protobuf", collector.http_endpoint()),
        ("multi_thread", "http/protobuf", collector.http_endpoint()),
    ] {
        let scratch = Scratch::new("runtimes");
        let service = Service::start(
            &scratch.log(),
            &[
                ("FULL_SERVICE_RUNTIME", runtime),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
            ],
        );
        requests(&service.work_url(), 5);
        let (status, out, elapsed) = service.stop();
        eprintln!("{runtime} {protocol}: exit after {elapsed:?}");
        assert_eq!(status.code(), Some(0), "{runtime} {protocol}: {out}");
        expected += 5;
        wait_until(BOUND, || spans_named(&collector, "request") >= expected);
        assert_eq!(
            spans_named(&collector, "request"),
            expected,
            "{runtime} {protocol}"
        );
        assert_eq!(
            log_records_with_body(&collector, "request served"),
            expected,
            "{runtime} {protocol}"
        );
        // Nothing here should take a timeout: delivery is immediate.
        assert!(
            elapsed < Duration::from_secs(3),
            "{runtime} {protocol}: {elapsed:?}\n{out}"
        );
    }
}

/// Runs the service with `env` plus the short fault budget, makes a few requests, stops it and
/// checks the exit: in time, "telemetry not delivered", and the report line naming the failure.
fn assert_not_delivered(name: &str, env: &[(&str, &str)], expect: &[&str]) -> Duration {
    let scratch = Scratch::new(name);
    let mut all = FAULT_ENV.to_vec();
    all.extend_from_slice(env);
    let service = Service::start(&scratch.log(), &all);
    requests(&service.work_url(), 3);
    let (status, out, elapsed) = service.stop();
    eprintln!("{name}: exit code {:?} after {elapsed:?}", status.code());
    assert_eq!(
        status.code(),
        Some(EXIT_TELEMETRY_NOT_DELIVERED),
        "{name}: {out}"
    );
    assert!(
        out.contains("telemetry not delivered, exit code 6"),
        "{name}: {out}"
    );
    for needle in expect {
        assert!(out.contains(needle), "{name}: no {needle:?} in:\n{out}");
    }
    // Wide bound: the whole sequence is bounded by the total budget.
    assert!(
        elapsed < FAULT_TOTAL + Duration::from_secs(1),
        "{name}: took {elapsed:?}\n{out}"
    );
    // The log file still got every line, the failure's own included.
    assert_eq!(
        lines_containing(&scratch.log(), "request served"),
        3,
        "{name}"
    );
    elapsed
}

/// A TCP server that accepts connections and never answers.
fn blackhole() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        // Bounded: the exporters open a handful of connections.
        for stream in listener.incoming().take(256) {
            held.push(stream);
        }
    });
    port
}

/// An HTTP server that reads each request and answers it with `status` and `body`.
fn answering(status: &'static str, body: &'static str) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(256) {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || serve_one(&mut stream, status, body));
        }
    });
    port
}

fn serve_one(stream: &mut TcpStream, status: &str, body: &str) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    // Read the head, then as much body as announced, so the answer is not cut by a reset.
    let head_end = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while raw.len() < head_end + length {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
    }
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

#[test]
fn collector_refusing_connections() {
    let port = free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    for protocol in ["grpc", "http/protobuf"] {
        assert_not_delivered(
            &format!("collector-refused-{}", protocol.replace('/', "-")),
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
            ],
            &[
                "hook \"otlp-traces\"",
                "OTLP traces not delivered",
                "OTLP logs not delivered",
                "OTLP metrics not delivered",
            ],
        );
    }
}

#[test]
fn collector_blackholed() {
    let endpoint = format!("http://127.0.0.1:{}", blackhole());
    for protocol in ["grpc", "http/protobuf"] {
        assert_not_delivered(
            &format!("collector-blackholed-{}", protocol.replace('/', "-")),
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
            ],
            &[
                "OTLP traces not delivered",
                "OTLP logs not delivered",
                "OTLP metrics not delivered",
            ],
        );
    }
}

#[test]
fn pushgateway_down() {
    let url = format!("http://127.0.0.1:{}", free_port());
    assert_not_delivered(
        "pushgateway-down",
        &[("PUSHGATEWAY_URL", &url)],
        &["hook \"pushgateway\"", "Pushgateway unreachable"],
    );
}

#[test]
fn pushgateway_answering_500() {
    let url = format!(
        "http://127.0.0.1:{}",
        answering("500 Internal Server Error", "storage on fire")
    );
    assert_not_delivered(
        "pushgateway-500",
        &[("PUSHGATEWAY_URL", &url)],
        &[
            "Pushgateway answered 500 Internal Server Error",
            "storage on fire",
            "3 attempts",
        ],
    );
}

#[test]
fn pushgateway_rejecting_with_400() {
    let Some(gateway) = Pushgateway::start() else {
        return;
    };
    // Another group already has `requests_total` as a gauge: the service's counter of the same
    // name is inconsistent, and the Pushgateway rejects the whole push.
    assert_eq!(
        gateway
            .put("other", "# TYPE requests_total gauge\nrequests_total 1\n")
            .unwrap(),
        200
    );
    assert_not_delivered(
        "pushgateway-400",
        &[("PUSHGATEWAY_URL", &gateway.url())],
        &["Pushgateway answered 400 Bad Request"],
    );
}

#[test]
fn the_instance_label_is_the_pod_or_host_name_not_the_pid() {
    // A restarted pod (or process) must land in the group it pushed before, not add a new group
    // that lives in the Pushgateway forever.
    let Some(gateway) = Pushgateway::start() else {
        return;
    };
    let system = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    for (name, env, instance) in [
        (
            "pod",
            vec![("POD_NAME", "web-7"), ("HOSTNAME", "ignored")],
            "web-7",
        ),
        ("host", vec![("HOSTNAME", "host-b")], "host-b"),
        ("system", vec![], system.as_str()),
    ] {
        if instance.is_empty() {
            continue; // no /proc here: nothing to compare the system's name with
        }
        let scratch = Scratch::new(&format!("instance-{name}"));
        let job = format!("instance-{name}");
        let mut vars = vec![
            ("PUSHGATEWAY_URL", gateway.url()),
            ("PUSHGATEWAY_JOB", job.clone()),
        ];
        vars.extend(env.iter().map(|(k, v)| (*k, (*v).to_owned())));
        let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut cmd_env = vars.clone();
        // The test's own environment must not decide: unset what the case does not set.
        for key in ["POD_NAME", "HOSTNAME"] {
            if !vars.iter().any(|(k, _)| *k == key) {
                cmd_env.push((key, ""));
            }
        }
        let service = Service::start(&scratch.log(), &cmd_env);
        let (status, stderr, _) = service.stop();
        assert!(status.success(), "{stderr}");
        let groups: Vec<_> = gateway
            .samples("finale_shutdowns_total", &[("job", &job)])
            .into_iter()
            .map(|s| s.labels)
            .collect();
        assert!(
            gateway
                .sample(
                    "finale_shutdowns_total",
                    &[("job", &job), ("instance", instance)]
                )
                .is_some(),
            "{name}: expected instance {instance:?}, the Pushgateway has {groups:?}"
        );
    }
}

#[test]
fn a_second_sigterm_cuts_a_hung_flush_to_the_escalation_budget() {
    let scratch = Scratch::new("escalation");
    let endpoint = format!("http://127.0.0.1:{}", blackhole());
    let mut service = Service::start(
        &scratch.log(),
        &[
            ("FINALE_TOTAL_BUDGET", "20s"),
            ("FINALE_TELEMETRY_RESERVE", "10s"),
            ("FINALE_ESCALATION_BUDGET", "1s"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
        ],
    );
    requests(&service.work_url(), 3);
    service.sigterm();
    // The report line is logged just before the Telemetry phase starts.
    service.wait_for("finale: shutdown after signal SIGTERM");
    let second = Instant::now();
    service.sigterm();
    let (status, out, _) = service.wait_exit();
    let elapsed = second.elapsed();
    eprintln!(
        "escalation: exit code {:?} {elapsed:?} after the second SIGTERM",
        status.code()
    );
    assert_eq!(status.code(), Some(7), "{out}");
    assert!(out.contains("forced by second signal"), "{out}");
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}\n{out}");
}
