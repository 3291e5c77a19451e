//! A wedged runtime still delivers its telemetry: the full service on a `current_thread`
//! runtime whose only thread a Workers hook blocks for 8 s, with a 3 s budget. The sequence
//! cannot reach its Telemetry slot; the supervisor takes over, pushes to the real Pushgateway on
//! a runtime of its own, flushes the OTLP providers to the real collector (HTTP exporter) and
//! releases the log file, then exits with the deadline-overrun code — well before the hook
//! would have let go. Over OTLP/HTTP and over gRPC (exporters built on finale's exporter
//! runtime). Its takeover counter reaches both the Pushgateway and the collector.

#![cfg(unix)]
#![allow(clippy::print_stderr)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::components::{Collector, Pushgateway, full_service, wait_until};

#[test]
fn a_wedged_runtime_still_pushes_flushes_and_writes_its_log() {
    wedged("http/protobuf");
}

/// The same with the gRPC (tonic) exporters, built on finale's exporter runtime as the
/// full_service example does: their tasks do not live on the wedged runtime.
#[test]
fn a_wedged_runtime_still_delivers_over_grpc() {
    wedged("grpc");
}

fn wedged(protocol: &str) {
    let (Some(gateway), Some(collector)) = (Pushgateway::start(), Collector::start_with_metrics())
    else {
        return;
    };
    let endpoint = match protocol {
        "grpc" => collector.grpc_endpoint(),
        _ => collector.http_endpoint(),
    };
    let dir = std::env::temp_dir().join(format!("finale-wedged-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("service.log");
    let mut child = full_service(&gateway, "wedged", &endpoint, &log)
        .env("FULL_SERVICE_RUNTIME", "current_thread")
        .env("FULL_SERVICE_BLOCK_WORKERS_MS", "8000")
        .env("FINALE_TOTAL_BUDGET", "3s")
        .env("FINALE_TELEMETRY_RESERVE", "2s")
        .env("FINALE_SAFETY_MARGIN", "1s")
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
        .env("FINALE_TERMINATION_LOG", dir.join("termination.log"))
        .spawn()
        .unwrap();
    let (tx, lines) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| {
                let _ = child.kill();
                panic!("never ready:\n{}", seen.join("\n"))
            });
        let ready = line.contains("started: ready");
        seen.push(line);
        if ready {
            break;
        }
    }
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let sent = Instant::now();
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if sent.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            panic!("did not exit");
        }
        std::thread::sleep(Duration::from_millis(10)); // polling a condition with a bound
    };
    let elapsed = sent.elapsed();
    while let Ok(line) = lines.recv_timeout(Duration::from_secs(1)) {
        seen.push(line);
    }
    let out = seen.join("\n");
    let file = std::fs::read_to_string(&log).unwrap_or_default();
    let message = std::fs::read_to_string(dir.join("termination.log")).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        code,
        Some(finale::ShutdownStatus::DeadlineOverrun.default_code()),
        "{out}"
    );
    // By total + safety margin / 2 (3.5 s), with room for a loaded machine; the hook blocks 8 s.
    assert!(elapsed < Duration::from_millis(5500), "{elapsed:?}\n{out}");
    assert!(out.contains("the shutdown overran its budget"), "{out}");
    // Pushed by the supervisor's own push: the counter exists only once it took over.
    assert_eq!(
        gateway.sample("finale_supervisor_takeovers_total", &[("job", "wedged")]),
        Some(1.0),
        "{}\n{out}",
        gateway.metrics_text()
    );
    // The takeover's log line reached the collector (OTLP logs) and the file (released last).
    assert!(
        wait_until(Duration::from_secs(5), || collector.log_record_count() > 0),
        "no log record at the collector\n{out}"
    );
    assert!(file.contains("the shutdown overran its budget"), "{file}");
    // The termination message says which stages the supervisor delivered (in the order they
    // ended, which within one order is a race).
    let mut delivered: Vec<&str> = message
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("delivered="))
        .unwrap_or_default()
        .split(',')
        .collect();
    delivered.sort_unstable();
    assert_eq!(
        delivered,
        [
            "log-writer",
            "otlp-logs",
            "otlp-metrics",
            "otlp-traces",
            "pushgateway"
        ],
        "{message}"
    );
    assert!(!message.contains("not_delivered="), "{message}");
    // Each stage's outcome is logged before the log writer is released: in the file too.
    for stage in ["pushgateway", "otlp-metrics", "otlp-traces", "otlp-logs"] {
        assert!(
            file.lines()
                .any(|l| l.contains("delivered by the supervisor") && l.contains(stage)),
            "{stage}:\n{file}"
        );
    }
    // The same counter through the OTLP meter provider, flushed by the supervisor too.
    let takeovers = |collector: &Collector| {
        collector
            .metrics()
            .iter()
            .rev()
            .find(|m| m.name == "finale_supervisor_takeovers_total")
            .and_then(|m| m.points.first().map(|p| p.value))
    };
    assert!(
        wait_until(Duration::from_secs(5), || takeovers(&collector).is_some()),
        "no takeover counter at the collector\n{out}"
    );
    assert_eq!(takeovers(&collector), Some(1.0), "{out}");
    eprintln!(
        "wedged runtime ({protocol}): exit code 5 after {elapsed:?}, telemetry delivered by the \
         supervisor"
    );
}

/// The takeover racing a runtime that unblocks right after it: a child process (this test
/// binary, re-run with `FINALE_RACE_CHILD` set) on a `current_thread` runtime, total 2 s, reserve
/// 1 s, margin 500 ms (takeover at about 1.25 s); a Workers hook blocks the only thread until
/// 1.35 s; an OTLP span exporter takes 300 ms, so the supervisor's flush is in flight when the
/// runtime comes back. The child calls `report.exit()` if `run()` returns. In every run the
/// supervisor owns the end (it claimed it before the sequence ended): `run()` never returns
/// into an exit of its own under it, and the termination message is one whole message that
/// ends with the supervisor's line, holding the report before it when the sequence ended before
/// the supervisor wrote. That order is read from the child's log: `run()` logs that it waits
/// for the supervisor after it handed the report over, and the supervisor's write logs that it
/// is done while it still holds the lock the report is handed over under; a run whose log has
/// the first line before the second handed the report over before the write, and its message
/// must hold it (a run whose log shows the other order may hold it or not: the message is
/// still one whole message). No real collector: the exporter's delay is what matters here, and
/// it stands in for one.
#[test]
fn a_takeover_racing_an_unblocked_runtime_leaves_one_whole_termination_message() {
    const NAME: &str =
        "a_takeover_racing_an_unblocked_runtime_leaves_one_whole_termination_message";
    const RUNS: usize = 12;
    if let Ok(path) = std::env::var("FINALE_RACE_CHILD") {
        race_child(&path, false);
    }
    let mut broken = Vec::new();
    let mut report_promised = 0;
    for i in 0..RUNS {
        let run = race_run(NAME, "FINALE_RACE_CHILD", i);
        let RaceRun {
            elapsed,
            ref stderr,
            ref message,
            ..
        } = run;
        let ended = stderr.contains("RUN-ENDED");
        let has_report = message
            .lines()
            .next()
            .is_some_and(|l| l.starts_with("finale status="));
        // The report was handed to the supervisor's writer before `run()` logged its wait; the
        // supervisor's write was logged before the writer's lock was released. A report that
        // came after the write would have waited for that release, so it would be logged after.
        let handed = stderr.find(WAITING_FOR_THE_SUPERVISOR);
        let written = stderr.find(TERMINATION_MESSAGE_WRITTEN);
        let promised = matches!((handed, written), (Some(h), Some(w)) if h < w);
        eprintln!(
            "run {i}: {:?} in {elapsed:?}, run() ended: {ended}, report handed before the \
             write: {promised}, report in the message: {has_report}\n{message}\n---",
            run.code
        );
        if !run.one_supervisor_message() || ended || (promised && !has_report) {
            broken.push(format!(
                "run {i}: run() ended: {ended}, report handed before the write: {promised}, \
                 message:\n{message}\nstderr:\n{stderr}"
            ));
        }
        report_promised += usize::from(promised);
        // The bound: total + margin / 2 = 2.25 s after the trigger, plus the process's start.
        assert!(
            elapsed < Duration::from_millis(2900),
            "run {i}: {elapsed:?}"
        );
    }
    // Not asserted above zero: the sequence's OTLP hook waits for the supervisor's flush, so
    // the supervisor's write usually comes first (about one run in twelve hands the report
    // over before it).
    eprintln!("runs whose report was handed over before the supervisor wrote: {report_promised}");
    assert!(broken.is_empty(), "{}", broken.join("\n=====\n"));
}

/// The same takeover with the child's runtime on paused tokio time (`start_paused`, as the
/// testing kit runs services): `run()` waits for the supervisor's exit on the real clock, which
/// the paused clock's jump to the next timer cannot shorten. The process exits with the
/// supervisor's code and leaves one whole termination message, its line last.
#[test]
fn a_takeover_on_paused_time_still_ends_with_the_supervisors_exit() {
    const NAME: &str = "a_takeover_on_paused_time_still_ends_with_the_supervisors_exit";
    const RUNS: usize = 3;
    if let Ok(path) = std::env::var("FINALE_PAUSED_RACE_CHILD") {
        race_child(&path, true);
    }
    for i in 0..RUNS {
        let run = race_run(NAME, "FINALE_PAUSED_RACE_CHILD", i);
        let out = format!("run {i}: {run:#?}");
        assert!(!run.stderr.contains("RUN-ENDED"), "{out}");
        assert_eq!(run.code, Some(5), "{out}");
        assert!(run.one_supervisor_message(), "{out}");
        assert!(run.elapsed < Duration::from_millis(2900), "{out}");
    }
}

/// What `run()` logs (debug) once the report was handed over and it waits for the supervisor.
const WAITING_FOR_THE_SUPERVISOR: &str = "before the sequence ended: it ends the process";
/// What the termination message's writer logs (debug) once the message is written, still
/// holding the lock the report is handed over under.
const TERMINATION_MESSAGE_WRITTEN: &str = "termination message written";

/// One run of a racing child.
#[derive(Debug)]
struct RaceRun {
    code: Option<i32>,
    elapsed: Duration,
    stderr: String,
    message: String,
}

impl RaceRun {
    /// The termination message is one whole message by the supervisor: its line last and
    /// once, at most one report (first), within the 4 KiB.
    fn one_supervisor_message(&self) -> bool {
        let lines: Vec<&str> = self.message.lines().collect();
        let supervisor = lines
            .iter()
            .filter(|l| l.starts_with("finale supervisor="))
            .count();
        let reports: Vec<usize> = (0..lines.len())
            .filter(|&i| lines[i].starts_with("finale status="))
            .collect();
        supervisor == 1
            && lines
                .last()
                .is_some_and(|l| l.starts_with("finale supervisor=took_over exit_code=5"))
            && (reports.is_empty() || reports == [0])
            && self.message.len() <= 4096
    }
}

/// Runs the test `name` of this binary as a racing child (`child_env` names its termination
/// log) and collects what it left.
fn race_run(name: &str, child_env: &str, i: usize) -> RaceRun {
    let path = std::env::temp_dir().join(format!("finale-race-{}-{name}-{i}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let start = Instant::now();
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture"])
        .env(child_env, &path)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let elapsed = start.elapsed();
    let message = std::fs::read_to_string(&path).unwrap_or_default();
    let _ = std::fs::remove_file(&path);
    RaceRun {
        code: out.status.code(),
        elapsed,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        message,
    }
}

#[derive(Debug)]
struct SlowExporter;

impl opentelemetry_sdk::trace::SpanExporter for SlowExporter {
    fn export(
        &self,
        _: Vec<opentelemetry_sdk::trace::SpanData>,
    ) -> impl Future<Output = opentelemetry_sdk::error::OTelSdkResult> + Send {
        std::thread::sleep(Duration::from_millis(300));
        std::future::ready(Ok(()))
    }
}

/// The racing child; on paused tokio time if `paused`.
fn race_child(path: &str, paused: bool) -> ! {
    use finale::otlp::Otlp;
    use finale::{Environment, Finale, Hook, Phase, TerminationLog};
    use opentelemetry::trace::{Tracer as _, TracerProvider as _};
    // finale's log, for the parent: the wait of `run()` (debug) and the supervisor's stages.
    let runtime = common::child::logged_runtime(Some("finale=debug"), paused);
    runtime.block_on(async {
        let finale = Finale::builder()
            .no_signals()
            .read_env(false)
            .environment(Environment::Local)
            .total_budget(Duration::from_secs(2))
            .telemetry_reserve(Duration::from_secs(1))
            .safety_margin(Duration::from_millis(500))
            .termination_log(TerminationLog::Path(path.into()))
            .build()
            .unwrap();
        let tracer = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_batch_exporter(SlowExporter)
            .build();
        tracer.tracer("race").in_span("work", |_| {});
        Otlp::new()
            .tracer_provider(tracer)
            .finale_metrics(false)
            .register(&finale)
            .unwrap();
        let t0 = Instant::now();
        finale
            .hook(Hook::new(Phase::Workers, "blocker", move |_| async move {
                // Blocks the runtime's only thread: the scenario, not a synchronisation.
                let until = t0 + Duration::from_millis(1350);
                std::thread::sleep(until.saturating_duration_since(Instant::now()));
            }))
            .unwrap();
        finale.handle().trigger("race");
        let report = finale.run().await;
        eprintln!("RUN-ENDED at {:?} code {}", t0.elapsed(), report.exit_code);
        report.exit()
    })
}

/// The sequence's end landing on the supervisor's deadline: exactly one of them owns the end of
/// the process, whichever claims it first. A child process (this test binary, re-run with
/// `FINALE_END_RACE_CHILD` set) on a `current_thread` runtime, total 400 ms, reserve 200 ms,
/// margin 200 ms: the supervisor takes over if the sequence has not ended 50 ms (its grace) past
/// the total, at 450 ms. A Telemetry hook blocks the only thread until `FINALE_END_RACE_AT_US`
/// after the trigger; the sequence then ends at once. Each run bisects that instant towards the
/// one where the outcome flips, so most runs end the sequence within a timer tick of the
/// supervisor's decision. Whatever the interleaving, one of two things holds, never a mix:
///
/// - the sequence owns the end: the supervisor does not take over (no takeover logged), `run()`
///   returns, the process exits with the report's code, and the termination message is the
///   report alone;
/// - the supervisor owns it: the takeover is logged, `run()` never returns under it, the process
///   exits with the supervisor's code (5), and the termination message ends with its line.
///
/// The timing makes the window likely, not certain: what makes the two outcomes exclusive is
/// that both sides take one atomic decision (`Life::claim_end`) before either writes or exits.
#[test]
fn a_sequence_ending_at_the_takeover_deadline_leaves_one_owner_of_the_end() {
    const RUNS: usize = 32;
    if let Ok(path) = std::env::var("FINALE_END_RACE_CHILD") {
        end_race_child(&path);
    }
    // The hook's end, in µs after the trigger: the sequence surely owns the end at the low
    // bound, the supervisor surely at the high one.
    let (mut lo, mut hi) = (300_000u64, 600_000u64);
    let (mut by_sequence, mut by_supervisor) = (0, 0);
    let mut broken = Vec::new();
    for i in 0..RUNS {
        let at = (lo + hi) / 2;
        let path = std::env::temp_dir().join(format!("finale-end-race-{}-{i}", std::process::id()));
        let start = Instant::now();
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "a_sequence_ending_at_the_takeover_deadline_leaves_one_owner_of_the_end",
                "--nocapture",
            ])
            .env("FINALE_END_RACE_CHILD", &path)
            .env("FINALE_END_RACE_AT_US", at.to_string())
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        let elapsed = start.elapsed();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let message = std::fs::read_to_string(&path).unwrap_or_default();
        let _ = std::fs::remove_file(&path);
        let took_over = stderr.contains("the shutdown overran its budget");
        let ended: Option<i32> = stderr
            .lines()
            .find_map(|l| l.split("RUN-ENDED code ").nth(1))
            .and_then(|c| c.trim().parse().ok());
        let code = out.status.code();
        let first = message.lines().next().unwrap_or_default();
        let last = message.lines().last().unwrap_or_default();
        let supervisor_lines = message
            .lines()
            .filter(|l| l.starts_with("finale supervisor="))
            .count();
        let whole = match (took_over, ended) {
            (false, Some(ended)) => {
                by_sequence += 1;
                code == Some(ended) && first.starts_with("finale status=") && supervisor_lines == 0
            }
            (true, None) => {
                by_supervisor += 1;
                code == Some(5)
                    && last.starts_with("finale supervisor=took_over exit_code=5")
                    && supervisor_lines == 1
            }
            _ => false,
        };
        eprintln!(
            "run {i}: hook until {at} µs: took over {took_over}, run() ended {ended:?}, exit \
             {code:?}, in {elapsed:?}\n{message}\n---"
        );
        if !whole || message.len() > 4096 {
            broken.push(format!(
                "run {i} (hook until {at} µs): took over: {took_over}, run() ended: {ended:?}, \
                 exit code: {code:?}, message:\n{message}\nstderr:\n{stderr}"
            ));
        }
        if took_over {
            hi = at;
        } else {
            lo = at;
        }
        // Bisected to below the timers' resolution: widen a little, so that the next runs
        // still straddle the instant where the outcome flips.
        if hi - lo < 200 {
            lo -= 1_000;
            hi += 1_000;
        }
        // The bound: total + margin / 2 = 500 ms after the trigger (the sequence's own end, when
        // it owns it, comes by 600 ms), plus the process's start.
        assert!(
            elapsed < Duration::from_millis(1500),
            "run {i}: {elapsed:?}"
        );
    }
    eprintln!(
        "the end owned by the sequence {by_sequence} times, by the supervisor {by_supervisor} times"
    );
    assert!(broken.is_empty(), "{}", broken.join("\n=====\n"));
    assert!(
        by_sequence > 0 && by_supervisor > 0,
        "the runs did not straddle the supervisor's decision: {by_sequence} by the sequence, \
         {by_supervisor} by the supervisor"
    );
}

fn end_race_child(path: &str) -> ! {
    use finale::{Environment, Finale, Hook, Phase, TerminationLog};
    let at = Duration::from_micros(
        std::env::var("FINALE_END_RACE_AT_US")
            .unwrap()
            .parse()
            .unwrap(),
    );
    // The supervisor's takeover is logged; the parent reads it on stderr.
    let runtime = common::child::logged_runtime(None, false);
    runtime.block_on(async {
        let finale = Finale::builder()
            .no_signals()
            .read_env(false)
            .environment(Environment::Local)
            .total_budget(Duration::from_millis(400))
            .escalation_budget(Duration::from_millis(200))
            .telemetry_reserve(Duration::from_millis(200))
            .safety_margin(Duration::from_millis(200))
            .termination_log(TerminationLog::Path(path.into()))
            .build()
            .unwrap();
        let t0 = Instant::now();
        finale
            .hook(Hook::new(
                Phase::Telemetry,
                "blocker",
                move |_| async move {
                    // Blocks the runtime's only thread: the scenario, not a synchronisation.
                    std::thread::sleep((t0 + at).saturating_duration_since(Instant::now()));
                },
            ))
            .unwrap();
        finale.handle().trigger("end race");
        let report = finale.run().await;
        eprintln!("RUN-ENDED code {}", report.exit_code);
        report.exit()
    })
}
