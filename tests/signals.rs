//! Real signals sent to a real child process (the quickstart example), on both runtime flavours,
//! through the testing kit's `Process`.

#![cfg(unix)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use finale::Signal;
use finale::testing::Process;

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

/// The quickstart example on `runtime`, with `env`; the kit keeps the test's own `FINALE_*` and
/// orchestrator variables out of it.
fn start(runtime: &str, env: &[(&str, &str)]) -> Process {
    let mut cmd = Command::new(quickstart());
    cmd.env("QUICKSTART_RUNTIME", runtime)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    Process::spawn(cmd).unwrap()
}

#[test]
fn sigterm_runs_the_sequence_and_exits_clean_at_once() {
    for runtime in RUNTIMES {
        let mut s = start(runtime, &[]);
        s.wait_for("started: ready", BOUND);
        s.signal(Signal::Terminate);
        let exit = s.wait_exit(BOUND);
        let (out, elapsed) = (&exit.stderr, exit.elapsed);
        assert_eq!(exit.code(), Some(0), "{runtime}: {out}");
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
        let mut s = start(runtime, &[]);
        s.wait_for("started: ready", BOUND);
        s.signal(Signal::Interrupt);
        let exit = s.wait_exit(BOUND);
        let out = &exit.stderr;
        assert_eq!(exit.code(), Some(0), "{runtime}: {out}");
        assert!(out.contains("shutdown after signal SIGINT"), "{out}");
    }
}

#[test]
fn a_second_signal_skips_to_telemetry_and_exits_forced() {
    for runtime in RUNTIMES {
        let mut s = start(
            runtime,
            &[
                ("QUICKSTART_SLOW_DRAIN", "1"),
                ("FINALE_ESCALATION_BUDGET", "300ms"),
            ],
        );
        s.wait_for("started: ready", BOUND);
        s.signal(Signal::Terminate);
        s.wait_for("shutdown requested", BOUND);
        s.signal(Signal::Terminate);
        let exit = s.wait_exit(BOUND);
        let out = &exit.stderr;
        assert_eq!(
            exit.code(),
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
        let mut s = start(
            runtime,
            &[
                ("QUICKSTART_SLOW_DRAIN", "1"),
                ("FINALE_ESCALATION_BUDGET", "20s"),
                ("FINALE_TOTAL_BUDGET", "40s"),
            ],
        );
        s.wait_for("started: ready", BOUND);
        s.signal(Signal::Terminate);
        s.wait_for("shutdown requested", BOUND);
        s.signal(Signal::Interrupt);
        s.wait_for("second signal", BOUND);
        s.signal(Signal::Terminate);
        let exit = s.wait_exit(BOUND);
        let (out, elapsed) = (&exit.stderr, exit.elapsed);
        assert_eq!(
            exit.code(),
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
        let exit = start(runtime, &[("QUICKSTART_PANIC_AFTER_MS", "50")]).wait_exit(BOUND);
        let out = &exit.stderr;
        assert_eq!(
            exit.code(),
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
        let exit = start(runtime, &[("QUICKSTART_FAIL_START", "1")]).wait_exit(BOUND);
        let out = &exit.stderr;
        assert_eq!(
            exit.code(),
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
        let mut s = start(runtime, &[("QUICKSTART_SLOW_START", "1")]);
        s.wait_for("listening for signals", BOUND);
        s.signal(Signal::Terminate);
        let exit = s.wait_exit(BOUND);
        let out = &exit.stderr;
        assert_eq!(exit.code(), Some(0), "{runtime}: {out}");
        assert!(out.contains("shutdown after signal SIGTERM"), "{out}");
        assert!(out.contains("task \"warming-cache\""), "{out}");
        assert!(!out.contains("started: ready"), "{out}");
    }
}

#[test]
fn a_bad_environment_variable_is_reported_before_anything_runs() {
    let exit = start("multi_thread", &[("FINALE_TOTAL_BUDGET", "soon")]).wait_exit(BOUND);
    let out = &exit.stderr;
    assert_eq!(exit.code(), Some(2), "{out}");
    assert!(
        out.contains("FINALE_TOTAL_BUDGET=\"soon\" is invalid"),
        "{out}"
    );
}
