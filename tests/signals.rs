//! Real signals sent to a real child process (the quickstart example), on both runtime flavours.

#![cfg(unix)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const RUNTIMES: [&str; 3] = ["current_thread", "multi_thread_1", "multi_thread"];
/// Wide bound for anything that should take milliseconds.
const BOUND: Duration = Duration::from_secs(10);

fn quickstart() -> PathBuf {
    // target/<profile>/deps/signals-<hash> -> target/<profile>/examples/quickstart
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().join("examples");
    let path = dir.join("quickstart");
    if !path.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--example", "quickstart"])
            .status()
            .unwrap();
        assert!(status.success());
    }
    path
}

struct Service {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Service {
    fn start(runtime: &str, env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(quickstart());
        cmd.env("QUICKSTART_RUNTIME", runtime)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("ECS_CONTAINER_METADATA_URI_V4")
            .env_remove("ECS_CONTAINER_METADATA_URI")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
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
        }
    }

    /// Waits (bounded) for a stderr line containing `needle`.
    fn wait_for(&mut self, needle: &str) {
        let deadline = Instant::now() + BOUND;
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
                Err(_) => panic!("no line with {needle:?}; saw:\n{}", self.seen.join("\n")),
            }
        }
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits (bounded) for the exit; returns the status and everything it wrote to stderr.
    fn wait_exit(mut self) -> (ExitStatus, String, Duration) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let elapsed = start.elapsed();
                while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(2)) {
                    self.seen.push(line);
                }
                return (status, self.seen.join("\n"), elapsed);
            }
            if start.elapsed() > BOUND {
                self.child.kill().unwrap();
                panic!("did not exit; saw:\n{}", self.seen.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(5)); // polling a condition with a bound
        }
    }
}

#[test]
fn sigterm_runs_the_sequence_and_exits_clean_at_once() {
    for runtime in RUNTIMES {
        let mut s = Service::start(runtime, &[]);
        s.wait_for("started: ready");
        s.signal("TERM");
        let (status, out, elapsed) = s.wait_exit();
        assert_eq!(status.code(), Some(0), "{runtime}: {out}");
        assert!(
            out.contains("finale: shutdown after signal SIGTERM: clean, exit code 0"),
            "{out}"
        );
        assert!(out.contains("task \"ticker\""), "{out}");
        assert!(out.contains("hook \"close-db\""), "{out}");
        // Ctrl-C on a laptop must feel instant: an idle service leaves well under a second.
        assert!(
            elapsed < Duration::from_secs(1),
            "{runtime}: took {elapsed:?}"
        );
    }
}

#[test]
fn sigint_is_a_clean_shutdown_too() {
    for runtime in RUNTIMES {
        let mut s = Service::start(runtime, &[]);
        s.wait_for("started: ready");
        s.signal("INT");
        let (status, out, _) = s.wait_exit();
        assert_eq!(status.code(), Some(0), "{runtime}: {out}");
        assert!(out.contains("shutdown after signal SIGINT"), "{out}");
    }
}

#[test]
fn a_second_signal_skips_to_telemetry_and_exits_forced() {
    for runtime in RUNTIMES {
        let mut s = Service::start(
            runtime,
            &[
                ("QUICKSTART_SLOW_DRAIN", "1"),
                ("FINALE_ESCALATION_BUDGET", "300ms"),
            ],
        );
        s.wait_for("started: ready");
        s.signal("TERM");
        s.wait_for("shutdown requested");
        s.signal("TERM");
        let (status, out, _) = s.wait_exit();
        assert_eq!(
            status.code(),
            Some(finale::ShutdownStatus::Forced.default_code()),
            "{runtime}: {out}"
        );
        assert!(out.contains("second signal"), "{out}");
        assert!(out.contains("forced by second signal"), "{out}");
    }
}

#[test]
fn a_third_signal_exits_at_once() {
    for runtime in RUNTIMES {
        let mut s = Service::start(
            runtime,
            &[
                ("QUICKSTART_SLOW_DRAIN", "1"),
                ("FINALE_ESCALATION_BUDGET", "20s"),
                ("FINALE_TOTAL_BUDGET", "40s"),
            ],
        );
        s.wait_for("started: ready");
        s.signal("TERM");
        s.wait_for("shutdown requested");
        s.signal("INT");
        s.wait_for("second signal");
        s.signal("TERM");
        let (status, out, elapsed) = s.wait_exit();
        assert_eq!(
            status.code(),
            Some(finale::ShutdownStatus::Immediate.default_code()),
            "{runtime}: {out}"
        );
        assert!(out.contains("third signal"), "{out}");
        assert!(elapsed < Duration::from_secs(5), "{runtime}: {elapsed:?}");
    }
}

#[test]
fn a_panic_triggers_the_shutdown_through_the_panic_hook() {
    for runtime in RUNTIMES {
        let s = Service::start(runtime, &[("QUICKSTART_PANIC_AFTER_MS", "50")]);
        let (status, out, _) = s.wait_exit();
        assert_eq!(
            status.code(),
            Some(finale::ShutdownStatus::ComponentFailure.default_code()),
            "{runtime}: {out}"
        );
        assert!(out.contains("shutdown after panic at"), "{out}");
        assert!(out.contains("the fragile worker gave up"), "{out}");
        // The sequence still ran to the end.
        assert!(out.contains("telemetry"), "{out}");
    }
}

#[test]
fn a_failed_start_exits_with_the_startup_failure_code() {
    for runtime in RUNTIMES {
        let s = Service::start(runtime, &[("QUICKSTART_FAIL_START", "1")]);
        let (status, out, _) = s.wait_exit();
        assert_eq!(
            status.code(),
            Some(finale::ShutdownStatus::StartupFailure.default_code()),
            "{runtime}: {out}"
        );
        assert!(
            out.contains("startup of \"listener\" failed: address already in use"),
            "{out}"
        );
        assert!(!out.contains("started: ready"), "{out}");
    }
}

#[test]
fn a_signal_during_graceful_start_shuts_down_what_started() {
    for runtime in RUNTIMES {
        let mut s = Service::start(runtime, &[("QUICKSTART_SLOW_START", "1")]);
        s.wait_for("listening for signals");
        s.signal("TERM");
        let (status, out, _) = s.wait_exit();
        assert_eq!(status.code(), Some(0), "{runtime}: {out}");
        assert!(out.contains("shutdown after signal SIGTERM"), "{out}");
        assert!(out.contains("task \"warming-cache\""), "{out}");
        assert!(!out.contains("started: ready"), "{out}");
    }
}

#[test]
fn a_bad_environment_variable_is_reported_before_anything_runs() {
    let s = Service::start("multi_thread", &[("FINALE_TOTAL_BUDGET", "soon")]);
    let (status, out, _) = s.wait_exit();
    assert_eq!(status.code(), Some(2), "{out}");
    assert!(
        out.contains("FINALE_TOTAL_BUDGET=\"soon\" is invalid"),
        "{out}"
    );
}
