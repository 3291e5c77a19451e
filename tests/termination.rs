//! The Kubernetes termination message, written by `run()` to a real file and read back the way
//! a log pipeline would (logfmt), without kubectl: it fits the 4 KiB Kubernetes keeps whatever
//! the report holds, is cut at character and line boundaries, and names what went wrong first.

mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::logfmt::{get, parse};
use finale::{Finale, Hook, Phase, ShutdownStatus, TERMINATION_MESSAGE_MAX, TerminationLog};

fn builder() -> finale::Builder {
    Finale::builder()
        .read_env(false)
        .no_signals()
        .environment(finale::Environment::Local)
}

/// A path of this test's own in the system temp dir (the file does not exist yet).
fn fresh_path(label: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    std::env::temp_dir().join(format!(
        "finale-termination-{label}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ))
}

#[tokio::test]
async fn termination_message_fits_4_kib_with_10k_hooks_and_parses() {
    let path = fresh_path("10k");
    let finale = builder()
        .termination_log(TerminationLog::Path(path.clone()))
        .build()
        .unwrap();
    // 10 000 hooks: every second one fails with a long error in multi-byte characters, and
    // every name is long and multi-byte too, so any cut lands inside a character unless it is
    // made at a boundary.
    let failing = 5_000;
    for i in 0..10_000 {
        let name = format!("hook-ünïcödé-{i:05}-{}", "ß".repeat(80));
        let fails = i % 2 == 0;
        finale
            .hook(Hook::new(Phase::Workers, name, move |_| async move {
                if fails {
                    Err(format!("échec «{i}» {}", "→".repeat(200)))
                } else {
                    Ok(())
                }
            }))
            .unwrap();
    }
    let handle = finale.handle();
    handle.trigger("deploy \"v2\"\nrollout");
    let report = finale.run().await;
    assert_eq!(report.status, ShutdownStatus::ComponentFailure);

    let bytes = std::fs::read(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(
        bytes.len() <= TERMINATION_MESSAGE_MAX,
        "{} bytes",
        bytes.len()
    );
    assert!(
        bytes.len() > TERMINATION_MESSAGE_MAX / 2,
        "{} bytes",
        bytes.len()
    );
    let message = String::from_utf8(bytes).expect("cut at a character boundary");
    let lines: Vec<Vec<(String, String)>> = message.lines().map(parse).collect();

    let header = &lines[0];
    assert_eq!(header[0], ("finale".to_owned(), String::new()));
    assert_eq!(get(header, "status"), Some("component_failure"));
    assert_eq!(get(header, "exit_code"), Some("4"));
    assert_eq!(
        get(header, "reason"),
        Some("requested: deploy \"v2\"\nrollout"),
        "quotes and newlines survive the round trip"
    );
    let phases: Vec<(&str, &str)> = lines
        .iter()
        .filter(|l| l[0].0 == "phase")
        .map(|l| (get(l, "phase").unwrap(), get(l, "entries").unwrap()))
        .collect();
    assert_eq!(
        phases,
        [
            ("announce", "0"),
            ("drain", "1"),
            ("workers", "10000"),
            ("telemetry", "0")
        ]
    );

    // The failures come first, as many as fit; the rest are counted, never silently dropped.
    let failed: Vec<&Vec<(String, String)>> = lines
        .iter()
        .filter(|l| l[0].0 == "entry" && get(l, "outcome") == Some("failed"))
        .collect();
    assert!(!failed.is_empty());
    for entry in &failed {
        assert_eq!(get(entry, "kind"), Some("hook"));
        assert_eq!(get(entry, "phase"), Some("workers"));
        let error = get(entry, "error").unwrap();
        assert!(
            error.starts_with("échec «") && error.ends_with('…'),
            "{error}"
        );
        assert!(get(entry, "entry").unwrap().starts_with("hook-ünïcödé-"));
        assert!(get(entry, "duration").unwrap().ends_with('s'));
    }
    let last = lines.last().unwrap();
    assert_eq!(last[0].0, "omitted", "{message}");
    let omitted: usize = get(last, "entries").unwrap().parse().unwrap();
    assert_eq!(failed.len() + omitted, failing, "{message}");
    assert_eq!(get(last, "cut"), Some("0"));
}

#[tokio::test(start_paused = true)]
async fn termination_message_names_the_slowest_entries_of_a_clean_run() {
    let path = fresh_path("slowest");
    let finale = builder()
        .termination_log(TerminationLog::Path(path.clone()))
        .build()
        .unwrap();
    for (name, ms) in [
        ("fast", 1),
        ("slowest", 300),
        ("slow", 200),
        ("middle", 100),
    ] {
        finale
            .hook(Hook::new(Phase::Workers, name, move |_| async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }))
            .unwrap();
    }
    finale.handle().trigger("test");
    let report = finale.run().await;
    assert!(report.is_clean(), "{report}");

    let message = std::fs::read_to_string(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    let lines: Vec<Vec<(String, String)>> = message.lines().map(parse).collect();
    assert_eq!(get(&lines[0], "status"), Some("clean"));
    assert_eq!(get(&lines[0], "exit_code"), Some("0"));
    let named: Vec<&str> = lines
        .iter()
        .filter(|l| l[0].0 == "entry")
        .map(|l| get(l, "entry").unwrap())
        .collect();
    assert_eq!(named, ["slowest", "slow", "middle"], "{message}");
    assert!(!message.contains("omitted"), "{message}");
}

#[tokio::test]
async fn termination_message_names_what_a_stage_lost() {
    let path = fresh_path("delivery");
    let finale = builder()
        .termination_log(TerminationLog::Path(path.clone()))
        .build()
        .unwrap();
    let sink = finale::Sink::blocking("lossy", |ctx| {
        ctx.counter().exported(12);
        ctx.counter().dropped(3);
    })
    .counts(finale::Items::Other);
    sink.counter().failed(512);
    sink.register(&finale).unwrap();
    finale.handle().trigger("test");
    let report = finale.run().await;
    assert_eq!(
        report.status,
        finale::ShutdownStatus::TelemetryNotDelivered,
        "{report}"
    );

    let message = std::fs::read_to_string(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    let lines: Vec<Vec<(String, String)>> = message.lines().map(parse).collect();
    let delivery = lines
        .iter()
        .find(|l| l[0].0 == "delivery")
        .unwrap_or_else(|| panic!("{message}"));
    assert_eq!(get(delivery, "delivery"), Some("lossy"));
    assert_eq!(get(delivery, "items"), Some("other"));
    assert_eq!(get(delivery, "run_failed"), Some("512"));
    assert_eq!(get(delivery, "exit_exported"), Some("12"));
    assert_eq!(get(delivery, "exit_dropped"), Some("3"));
}

/// A real process whose Workers hooks block the runtime's only thread: the supervisor takes over
/// and, before it exits with code 5, writes its own one-line termination message.
#[cfg(unix)]
#[test]
fn termination_message_from_the_supervisor_of_a_wedged_process() {
    let message = takeover_message(None);
    assert_eq!(message.lines().count(), 1, "{message}");
    let pairs = parse(&message);
    assert_eq!(get(&pairs, "supervisor"), Some("took_over"), "{message}");
    assert_eq!(get(&pairs, "exit_code"), Some("5"));
    assert_eq!(get(&pairs, "reason"), Some("signal SIGTERM"));
    assert_eq!(
        get(&pairs, "stuck"),
        Some("the Telemetry phase did not start in time"),
        "{message}"
    );
}

/// The takeover's message is shortened like the end-of-run one: a 5,000-byte reason does not
/// push out the rest, and the line still parses.
#[cfg(unix)]
#[test]
fn the_supervisors_termination_message_shortens_a_long_reason() {
    let reason = format!("deploy \"{}\" done", "x".repeat(5000));
    let message = takeover_message(Some(&reason));
    assert!(
        message.len() <= TERMINATION_MESSAGE_MAX,
        "{}",
        message.len()
    );
    assert_eq!(message.lines().count(), 1, "{message}");
    let pairs = parse(&message);
    assert_eq!(get(&pairs, "supervisor"), Some("took_over"), "{message}");
    assert_eq!(get(&pairs, "exit_code"), Some("5"), "{message}");
    let shown = get(&pairs, "reason").unwrap();
    assert!(shown.len() < 1024, "{}", shown.len());
    assert!(shown.starts_with("requested: deploy \"xxx"), "{shown}");
    assert!(shown.ends_with('…'), "{shown}");
    assert_eq!(
        get(&pairs, "stuck"),
        Some("the Telemetry phase did not start in time"),
        "{message}"
    );
}

/// Runs the faults example with a Workers hook that blocks the runtime's only thread, stops it
/// (with SIGTERM, or `trigger` if given) and returns the termination message the supervisor
/// wrote before it exited with code 5.
#[cfg(unix)]
fn takeover_message(trigger: Option<&str>) -> String {
    let path = fresh_path("takeover");
    let (code, _) = takeover(&path, trigger, &[]);
    assert_eq!(code, Some(5));
    let message = std::fs::read_to_string(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    message
}

/// A termination log that never takes a write (a FIFO with no reader; a hung file system
/// behaves alike) must not keep the supervisor past its bound, `total + safety_margin / 2`.
#[cfg(unix)]
#[test]
fn a_termination_log_that_hangs_does_not_delay_the_supervisors_exit() {
    let path = fresh_path("fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&path)
        .status()
        .unwrap();
    assert!(made.success());
    // The Telemetry phase starts and wedges, so the supervisor takes over at the process's last
    // moment (total 2 s + margin / 2 = 2.1 s): the write's wait is all that could add to it.
    let (code, elapsed) = takeover(
        &path,
        None,
        &[
            ("FAULT", "block-telemetry"),
            ("FINALE_TELEMETRY_RESERVE", "400ms"),
            ("FINALE_SAFETY_MARGIN", "200ms"),
        ],
    );
    let _ = std::fs::remove_file(&path);
    assert_eq!(code, Some(5));
    // 2.1 s, plus what the kernel and a loaded machine add between the signal and the wait.
    assert!(elapsed < Duration::from_millis(2400), "{elapsed:?}");
}

/// Runs the faults example with a hook that blocks the runtime's only thread (Workers, unless
/// `env` says otherwise), stops it with SIGTERM (or `trigger`, if given) and returns its exit
/// code and how long after the stop it exited.
#[cfg(unix)]
fn takeover(
    path: &std::path::Path,
    trigger: Option<&str>,
    env: &[(&str, &str)],
) -> (Option<i32>, Duration) {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    use std::time::Instant;

    let mut cmd = Command::new(common::examples::example("faults"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("FINALE_") {
            cmd.env_remove(key);
        }
    }
    if let Some(reason) = trigger {
        cmd.env("FAULT_TRIGGER", reason);
    }
    let mut child = cmd
        .env("FAULT", "block-workers")
        .env("FAULT_RUNTIME", "current_thread")
        .env("FINALE_TOTAL_BUDGET", "2s")
        .env("FINALE_TELEMETRY_RESERVE", "500ms")
        .env("FINALE_SAFETY_MARGIN", "500ms")
        .env("FINALE_TERMINATION_LOG", path)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .envs(env.iter().copied())
        .spawn()
        .unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if trigger.is_none() && line.contains("started: ready") => break,
            Ok(line) if trigger.is_some() && line.contains("blocker started") => break,
            Ok(_) => {}
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the faults example never got ready: {e}");
            }
        }
    }
    let stopped = Instant::now();
    if trigger.is_none() {
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("still running 10 s after SIGTERM");
        }
        // A bounded poll of the child's state, not a synchronisation point.
        std::thread::sleep(Duration::from_millis(10));
    };
    (status.code(), stopped.elapsed())
}
