//! Kubernetes' termination message: a short summary of the report, written at the end of
//! [`Finale::run`](crate::Finale::run) to the file the kubelet reads when the container ends, so
//! that `kubectl describe pod` and `kubectl get pod -o yaml`
//! (`status.containerStatuses[].lastState.terminated.message`) say how the last shutdown went.
//!
//! # Why at the end of `run()`
//!
//! The report is complete there, whatever the caller does next: [`ShutdownReport::exit`], a
//! return from `main`, or a test that reads the report. `ShutdownReport::exit` would miss the
//! last two and knows nothing of the configuration. The write happens once the sequence has
//! claimed the end of the process (see below), so the supervisor no longer takes over: what
//! bounds it is its own wait. It runs on a thread of its own and is waited for at most 500 ms,
//! and not past the process's last moment (`total + safety_margin / 2` after the trigger) but
//! for 10 ms at least (a file that takes writes needs microseconds), so a file system that
//! hangs (NFS, FUSE, a FIFO with no reader) costs that and no more; the exit follows. When the supervisor takes over a
//! wedged shutdown it writes a one-line message of its own, the same way, before it exits:
//! `finale supervisor=took_over exit_code=5 reason=… stuck=… delivered=pushgateway,otlp-traces
//! not_delivered=otlp-logs` (the telemetry stages the supervisor delivered, and those it did
//! not; a list with no stage is left out), written once its delivery ended, its values shortened like the
//! end-of-run message's, so that it too parses and fits.
//!
//! **One writer of the final message.** The sequence and the supervisor decide who owns the end
//! of the process once, by one atomic claim that each takes before it writes anything final or
//! exits: the sequence as `run()` ends, the supervisor before it takes over. Whichever claims
//! first writes the message, and the other writes none:
//!
//! - the sequence first (even in the instant the supervisor's deadline passes): its report is
//!   the message, `run()` returns it, and the supervisor does not take over;
//! - the supervisor first: its line is the message. If the runtime unblocks and the sequence
//!   still ends while the supervisor delivers, the report goes to the supervisor, whose message
//!   then holds the report and its line last, within the 4 KiB (a report that comes after the
//!   supervisor wrote is left out). `run()` writes nothing and does not return into an exit
//!   under the supervisor's write: it waits until the supervisor ends the process (bounded:
//!   half a second past the process's last moment, on the real clock, also when tokio's is
//!   paused).
//!
//! The report and the line are handed over under one lock, so the supervisor's write sees a
//! report stored before it.
//!
//! # The format
//!
//! Lines of `logfmt` (`key=value`, values with spaces or quotes in double quotes with `\"`,
//! `\\`, `\n`, `\r`, `\t` escaped), at most [`TERMINATION_MESSAGE_MAX`] bytes, cut at a line end, durations in seconds:
//!
//! ```text
//! finale status=component_failure exit_code=4 reason="signal SIGTERM" total=0.0124s escalated=false over_budget=false in_flight_at_drain_start=2 requests_rejected=0 requests_panicked=0
//! phase=announce outcome=completed duration=0.0001s entries=0
//! phase=drain outcome=completed duration=0.0030s entries=1
//! phase=workers outcome=completed duration=0.0081s entries=2
//! phase=telemetry outcome=completed duration=0.0011s entries=0
//! entry=close-db kind=hook phase=workers outcome=failed duration=0.0080s error="connection refused"
//! entry="in-flight work" kind=in_flight phase=drain outcome=completed duration=0.0029s
//! entry=ticker kind=task phase=workers outcome=completed duration=0.0002s
//! ```
//!
//! The header and the phases always come first; then every entry that did not complete, what
//! was cut at a deadline, each telemetry stage that lost something (`delivery=otlp-traces
//! items=spans run_exported=488 run_failed=512 run_unconfirmed=0 run_dropped=0
//! exit_exported=12 exit_failed=0 exit_unconfirmed=0 exit_dropped=0`, see
//! [`Delivery`](crate::Delivery)), each final scrape (`scrape=final-scrape
//! outcome=scraped waited=0.4120s at=0.9050s peer=10.0.0.7:51234 agent=Prometheus/2.42.0
//! samples=143`, or `why=…` when the stage did not wait), and the three slowest entries that
//! completed, as many as fit. When
//! something did not fit, the last line is `omitted entries=N cut=M`. Long values (a reason, an
//! error, a name) are shortened at a character boundary and end in `…`. `status` is the
//! snake-case name of [`ShutdownStatus`](crate::ShutdownStatus) (`clean`, `startup_failure`,
//! `component_failure`, `deadline_overrun`, `telemetry_not_delivered`, `forced`, `immediate`).

use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use crate::config::Environment;
use crate::phase::Phase;
use crate::report::{EntryReport, Outcome, ShutdownReport};
use crate::state::{EndOwner, Observer, Shared, StageOutcome};
use crate::termination_log::{DEFAULT_TERMINATION_LOG, TerminationLog};

/// The most Kubernetes keeps of a container's termination message: 4096 bytes. finale's
/// message never exceeds it.
pub const TERMINATION_MESSAGE_MAX: usize = 4096;

/// Writes the termination message at the end of the run.
#[derive(Debug)]
pub(crate) struct Writer {
    path: PathBuf,
    /// An explicit path is created if missing, and a failure is a warning; the automatic one
    /// is only ever the kubelet's file.
    explicit: bool,
    /// What the message holds so far: the end-of-run report and the supervisor's line. Only
    /// the owner of the end writes (see the module docs); the lock hands the report to a
    /// supervisor that owns it.
    both: std::sync::Mutex<Both>,
}

/// The two sides of one termination message.
#[derive(Debug, Default)]
struct Both {
    /// The end-of-run report, once `run()` ended.
    report: Option<ShutdownReport>,
    /// The supervisor's line, once it took over and delivered.
    line: Option<String>,
}

/// The writer `setting` (or the environment's `env`, which wins) asks for, if any.
pub(crate) fn writer(
    setting: &TerminationLog,
    env: Option<String>,
    environment: Environment,
) -> Option<Writer> {
    let setting = env
        .as_deref()
        .and_then(TerminationLog::from_env)
        .unwrap_or_else(|| setting.clone());
    match setting {
        TerminationLog::Off => None,
        TerminationLog::Path(path) => Some(Writer {
            path,
            explicit: true,
            both: std::sync::Mutex::default(),
        }),
        TerminationLog::Auto if environment == Environment::Kubernetes => {
            // The kubelet mounts the file into every container; opening it does not change it.
            match OpenOptions::new().write(true).open(DEFAULT_TERMINATION_LOG) {
                Ok(_) => Some(Writer {
                    path: PathBuf::from(DEFAULT_TERMINATION_LOG),
                    explicit: false,
                    both: std::sync::Mutex::default(),
                }),
                Err(error) => {
                    tracing::debug!(
                        target: "finale",
                        path = DEFAULT_TERMINATION_LOG,
                        %error,
                        "no termination message: the file is not writable"
                    );
                    None
                }
            }
        }
        TerminationLog::Auto => None,
    }
}

/// How long the end of `run()` or the supervisor's takeover waits for the message to be written.
/// A file system that hangs (NFS, FUSE, a FIFO with no reader) must not keep the process alive:
/// past this the write is left to its own thread and the process goes on to exit.
const WRITE_WAIT: std::time::Duration = std::time::Duration::from_millis(500);
/// The least a write is waited for, even at the process's last moment: enough for a file that
/// takes writes (microseconds), so a takeover at that moment still leaves its message.
const WRITE_FLOOR: std::time::Duration = std::time::Duration::from_millis(10);

impl Writer {
    /// Writes `message` on a thread of its own and waits for it at most [`WRITE_WAIT`], and
    /// not past the process's last moment (`trigger + total + safety_margin / 2`, the
    /// supervisor's bound) but for [`WRITE_FLOOR`]: a write that hangs is left to its thread,
    /// which the exit ends.
    fn write(&self, shared: &Shared, message: &str) {
        let wait = match shared.life.trigger() {
            Some(t0) => {
                let b = &shared.budget;
                let last = t0 + b.total + b.safety_margin / 2;
                WRITE_WAIT
                    .min(last.saturating_duration_since(std::time::Instant::now()))
                    .max(WRITE_FLOOR)
            }
            None => WRITE_WAIT,
        };
        let (path, explicit, message) = (self.path.clone(), self.explicit, message.to_owned());
        let (tx, rx) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("finale-termination-log".to_owned())
            .spawn(move || {
                let written = OpenOptions::new()
                    .write(true)
                    .truncate(true)
                    .create(explicit)
                    .open(&path)
                    .and_then(|mut file| file.write_all(message.as_bytes()));
                let _ = tx.send(written.map(|()| message.len()));
            });
        let written = match spawned {
            Ok(_) => rx.recv_timeout(wait).unwrap_or_else(|_| {
                Err(std::io::Error::other(format!(
                    "the write did not finish in {wait:?}; left to its thread"
                )))
            }),
            Err(error) => Err(error),
        };
        match written.map(|_| ()) {
            Ok(()) => tracing::debug!(
                target: "finale",
                path = %self.path.display(),
                "termination message written"
            ),
            Err(error) => tracing::warn!(
                target: "finale",
                path = %self.path.display(),
                %error,
                "termination message not written"
            ),
        }
    }
}

impl Writer {
    /// Writes what `both` holds. Called by the owner of the end only, with the lock held.
    fn write_both(&self, shared: &Shared, both: &Both) {
        let text = match (&both.report, &both.line) {
            // The runtime unblocked after the takeover and the sequence ended too: its report,
            // then the supervisor's line, in one message that still fits.
            (Some(report), Some(line)) => {
                let mut text = message(report, TERMINATION_MESSAGE_MAX - line.len() - 1);
                text.push('\n');
                text.push_str(line);
                text
            }
            (Some(report), None) => message(report, TERMINATION_MESSAGE_MAX),
            (None, Some(line)) => line.clone(),
            (None, None) => return,
        };
        self.write(shared, &text);
    }
}

impl Observer for Writer {
    fn finished(&self, shared: &Shared, report: &ShutdownReport) {
        let mut both = crate::state::lock(&self.both);
        both.report = Some(report.clone());
        // The supervisor owns the end: its write (if it has not written yet) takes the report
        // along; `run()` then waits for its exit.
        if shared.life.end_owner() == Some(EndOwner::Supervisor) {
            return;
        }
        self.write_both(shared, &both);
    }

    fn took_over(&self, shared: &Shared, why: &str, code: i32, stages: &[StageOutcome]) {
        let mut line = String::from("finale supervisor=took_over");
        kv(&mut line, "exit_code", &code.to_string());
        // Shortened like the end-of-run message's values, so the line always ends with its
        // closing quote and `stuck=`, and parses: at most 512 + 192 bytes before quoting,
        // which at most doubles them, and two stage lists of at most 192: within half the
        // 4 KiB, the other half being kept for the end-of-run message if the sequence ends.
        if let Some(reason) = shared.reason() {
            kv(
                &mut line,
                "reason",
                &shorten(&reason.to_string(), REASON_MAX),
            );
        }
        kv(&mut line, "stuck", &shorten(why, STUCK_MAX));
        // Which telemetry stages the supervisor delivered, and which not: comma-separated
        // names, each list shortened like a value.
        for (key, delivered) in [("delivered", true), ("not_delivered", false)] {
            let names: Vec<&str> = stages
                .iter()
                .filter(|(_, r)| r.is_ok() == delivered)
                .map(|(name, _)| name.as_ref())
                .collect();
            if !names.is_empty() {
                kv(&mut line, key, &shorten(&names.join(","), STAGES_MAX));
            }
        }
        debug_assert!(line.len() <= TERMINATION_MESSAGE_MAX / 2);
        truncate(&mut line, TERMINATION_MESSAGE_MAX / 2);
        let mut both = crate::state::lock(&self.both);
        both.line = Some(line);
        self.write_both(shared, &both);
    }
}

/// Room kept for the `omitted` line.
const OMITTED_LINE: usize = 64;
/// How many of the slowest completed entries the message names.
const SLOWEST: usize = 3;
/// The longest a value (a reason, an error, a name) may be before it is shortened, in bytes.
const REASON_MAX: usize = 512;
const VALUE_MAX: usize = 256;
const NAME_MAX: usize = 128;
/// The longest the supervisor's `stuck=` value may be before it is shortened, in bytes.
const STUCK_MAX: usize = 192;
/// The longest each of the supervisor's stage lists may be before it is shortened, in bytes.
const STAGES_MAX: usize = 192;

/// The termination message for `report`, at most `max` bytes (`max` of at least a few hundred
/// bytes; the header alone is never longer than about 1.2 KiB).
pub(crate) fn message(report: &ShutdownReport, max: usize) -> String {
    let mut out = String::from("finale");
    kv(&mut out, "status", report.status.key());
    kv(&mut out, "exit_code", &report.exit_code.to_string());
    kv(
        &mut out,
        "reason",
        &shorten(&report.reason.to_string(), REASON_MAX),
    );
    kv(&mut out, "total", &seconds(report.total));
    kv(&mut out, "escalated", bool_str(report.escalated));
    kv(&mut out, "over_budget", bool_str(report.over_budget));
    kv(
        &mut out,
        "in_flight_at_drain_start",
        &report.in_flight_at_drain_start.to_string(),
    );
    kv(
        &mut out,
        "requests_rejected",
        &report.requests_rejected.to_string(),
    );
    kv(
        &mut out,
        "requests_panicked",
        &report.requests_panicked.to_string(),
    );
    for p in &report.phases {
        let mut line = String::new();
        line.push_str("phase=");
        line.push_str(p.phase.as_str());
        kv(&mut line, "outcome", p.outcome.as_str());
        kv(&mut line, "duration", &seconds(p.duration));
        kv(&mut line, "entries", &p.entries.len().to_string());
        out.push('\n');
        out.push_str(&line);
    }

    let entries = || {
        report
            .phases
            .iter()
            .flat_map(|p| p.entries.iter().map(move |e| (p.phase, e)))
    };
    let room = max.saturating_sub(OMITTED_LINE);
    let mut omitted_entries = 0usize;
    let mut omitted_cut = 0usize;
    let push = |out: &mut String, line: String| {
        if out.len() + 1 + line.len() <= room {
            out.push('\n');
            out.push_str(&line);
            true
        } else {
            false
        }
    };
    for (phase, e) in entries().filter(|(_, e)| !e.outcome.is_completed()) {
        if !push(&mut out, entry_line(phase, e)) {
            omitted_entries += 1;
        }
    }
    for c in &report.cut {
        let mut line = String::from("cut=");
        line.push_str(&quote(&shorten(c, VALUE_MAX)));
        if !push(&mut out, line) {
            omitted_cut += 1;
        }
    }
    // What a stage lost, before the slowest: why a run exits 6 with every entry completed.
    for d in report
        .delivery
        .iter()
        .filter(|d| d.total().not_confirmed() > 0)
    {
        let mut line = String::from("delivery=");
        line.push_str(&quote(&shorten(&d.stage, VALUE_MAX)));
        kv(&mut line, "items", d.items.as_str());
        for (key, n) in [
            ("run_exported", d.run.exported),
            ("run_failed", d.run.failed),
            ("run_unconfirmed", d.run.unconfirmed),
            ("run_dropped", d.run.dropped),
            ("exit_exported", d.at_exit.exported),
            ("exit_failed", d.at_exit.failed),
            ("exit_unconfirmed", d.at_exit.unconfirmed),
            ("exit_dropped", d.at_exit.dropped),
        ] {
            kv(&mut line, key, &n.to_string());
        }
        push(&mut out, line);
    }
    // The final scrape: when it came and who made it, or why the stage did not wait.
    for f in &report.final_scrapes {
        let mut line = String::from("scrape=");
        line.push_str(&quote(&shorten(&f.stage, NAME_MAX)));
        kv(&mut line, "outcome", f.outcome.as_str());
        kv(&mut line, "waited", &seconds(f.waited));
        if let Some(first) = f.scrapes.first() {
            kv(&mut line, "at", &seconds(first.at));
            kv(&mut line, "peer", &first.peer.to_string());
            if let Some(agent) = &first.user_agent {
                kv(&mut line, "agent", &shorten(agent, VALUE_MAX));
            }
            kv(&mut line, "samples", &first.samples.to_string());
        }
        // Whenever the final scrape did not come, why: a missed one names those waited for.
        if f.outcome != crate::ScrapeOutcome::Scraped {
            kv(
                &mut line,
                "why",
                &shorten(&f.outcome.to_string(), VALUE_MAX),
            );
        }
        push(&mut out, line);
    }
    let mut completed: Vec<(Phase, &EntryReport)> = entries()
        .filter(|(_, e)| e.outcome.is_completed())
        .collect();
    completed.sort_by_key(|(_, e)| std::cmp::Reverse(e.duration));
    for (phase, e) in completed.into_iter().take(SLOWEST) {
        // The slowest are a bonus: one that does not fit is not worth an `omitted` count.
        push(&mut out, entry_line(phase, e));
    }
    if omitted_entries + omitted_cut > 0 {
        let _ = write!(out, "\nomitted entries={omitted_entries} cut={omitted_cut}");
    }
    truncate(&mut out, max);
    out
}

fn entry_line(phase: Phase, e: &EntryReport) -> String {
    let mut line = String::from("entry=");
    line.push_str(&quote(&shorten(&e.name, NAME_MAX)));
    kv(&mut line, "kind", e.kind.key());
    kv(&mut line, "phase", phase.as_str());
    kv(&mut line, "outcome", e.outcome.as_str());
    kv(&mut line, "duration", &seconds(e.duration));
    match &e.outcome {
        Outcome::Failed(error) => kv(&mut line, "error", &shorten(&error.to_string(), VALUE_MAX)),
        Outcome::Panicked(message) => kv(&mut line, "panic", &shorten(message, VALUE_MAX)),
        _ => {}
    }
    line
}

/// Appends ` key=value`, quoting the value when it needs it.
fn kv(out: &mut String, key: &str, value: &str) {
    out.push(' ');
    out.push_str(key);
    out.push('=');
    out.push_str(&quote(value));
}

/// The value as logfmt writes it: bare when it can be, else in double quotes with escapes.
fn quote(value: &str) -> String {
    let bare = !value.is_empty()
        && !value
            .chars()
            .any(|c| c == ' ' || c == '=' || c == '"' || c == '\\' || c.is_control());
    if bare {
        return value.to_owned();
    }
    let mut quoted = String::with_capacity(value.len() + 2);
    quoted.push('"');
    for c in value.chars() {
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            '\n' => quoted.push_str("\\n"),
            '\r' => quoted.push_str("\\r"),
            '\t' => quoted.push_str("\\t"),
            c if c.is_control() => quoted.push(' '),
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

/// At most `max` bytes of `value`, cut at a character boundary and marked with `…`.
fn shorten(value: &str, max: usize) -> String {
    if value.len() <= max {
        return value.to_owned();
    }
    let mut cut = value.to_owned();
    truncate(&mut cut, max.saturating_sub('…'.len_utf8()));
    cut.push('…');
    cut
}

/// Truncates to at most `max` bytes, at a character boundary.
fn truncate(s: &mut String, max: usize) {
    if s.len() <= max {
        return;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
}

fn seconds(d: Duration) -> String {
    format!("{:.4}s", d.as_secs_f64())
}

fn bool_str(b: bool) -> &'static str {
    if b { "true" } else { "false" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_termination_message_has_a_line_per_final_scrape() {
        use crate::report::{DeliveryPolicy, ExitCodes, Reason, ShutdownStatus};
        let mut report = ShutdownReport {
            reason: Reason::Requested("test".into()),
            phases: Vec::new(),
            in_flight_at_drain_start: 0,
            last_request_after_announce: None,
            last_probe_after_announce: None,
            requests_rejected: 0,
            requests_panicked: 0,
            cut: Vec::new(),
            upgrades_failed: Vec::new(),
            escalated: false,
            total: Duration::from_secs(1),
            over_budget: false,
            delivery: Vec::new(),
            final_scrapes: crate::report::scrape::samples(),
            status: ShutdownStatus::Clean,
            exit_code: 0,
        };
        report.classify(&ExitCodes::default(), DeliveryPolicy::default());
        let m = message(&report, crate::platform::TERMINATION_MESSAGE_MAX);
        assert!(
            m.contains(
                "scrape=final-scrape outcome=scraped waited=0.4120s at=0.9050s \
                 peer=10.0.0.7:51234 agent=Prometheus/2.42.0 samples=143"
            ),
            "{m}"
        );
        assert!(
            m.contains("scrape=second outcome=too_late waited=0.0000s why=\"did not wait: "),
            "{m}"
        );
    }

    #[test]
    fn termination_log_env_values() {
        assert_eq!(TerminationLog::from_env(" "), None);
        assert_eq!(TerminationLog::from_env("off"), Some(TerminationLog::Off));
        assert_eq!(TerminationLog::from_env("auto"), Some(TerminationLog::Auto));
        assert_eq!(
            TerminationLog::from_env("termination.log"),
            Some(TerminationLog::Path(PathBuf::from("termination.log")))
        );
    }

    #[test]
    fn termination_log_is_off_outside_kubernetes_and_env_wins() {
        assert!(writer(&TerminationLog::Auto, None, Environment::Local).is_none());
        assert!(writer(&TerminationLog::Auto, None, Environment::Ecs).is_none());
        let w = writer(
            &TerminationLog::Auto,
            Some("elsewhere.log".into()),
            Environment::Local,
        )
        .unwrap();
        assert_eq!(w.path, PathBuf::from("elsewhere.log"));
        assert!(w.explicit);
        assert!(
            writer(
                &TerminationLog::Path("termination.log".into()),
                Some("off".into()),
                Environment::Kubernetes
            )
            .is_none()
        );
    }

    /// A report as the sequence ends with it, classified.
    fn report(reason: &str) -> ShutdownReport {
        use crate::report::{DeliveryPolicy, ExitCodes, Reason, ShutdownStatus};
        let mut report = ShutdownReport {
            reason: Reason::Requested(reason.to_owned().into()),
            phases: Vec::new(),
            in_flight_at_drain_start: 0,
            last_request_after_announce: None,
            last_probe_after_announce: None,
            requests_rejected: 0,
            requests_panicked: 0,
            cut: Vec::new(),
            upgrades_failed: Vec::new(),
            escalated: false,
            total: Duration::from_secs(1),
            over_budget: false,
            delivery: Vec::new(),
            final_scrapes: Vec::new(),
            status: ShutdownStatus::Clean,
            exit_code: 0,
        };
        report.classify(&ExitCodes::default(), DeliveryPolicy::default());
        report
    }

    /// A writer to a file of its own, and the state of a shutdown requested with a long reason.
    fn writer_and_state(name: &str) -> (Writer, PathBuf, crate::Finale) {
        let path =
            std::env::temp_dir().join(format!("finale-termination-{name}-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let finale = crate::Finale::builder()
            .no_signals()
            .read_env(false)
            .build()
            .unwrap();
        finale.handle().trigger("x".repeat(5000));
        let writer = writer(
            &TerminationLog::Path(path.clone()),
            None,
            Environment::Local,
        )
        .unwrap();
        (writer, path, finale)
    }

    fn took_over(writer: &Writer, shared: &Shared) {
        let stages = [
            (std::borrow::Cow::Borrowed("otlp-traces"), Ok(())),
            (
                std::borrow::Cow::Borrowed("otlp-logs"),
                Err("timed out".to_owned()),
            ),
        ];
        writer.took_over(
            shared,
            "the Telemetry phase did not start in time",
            5,
            &stages,
        );
    }

    /// The supervisor claimed the end and took over; the runtime unblocked and the sequence
    /// ended while it delivered: the sequence writes nothing, and the supervisor's message
    /// holds the report it was handed and its own line last, within the 4 KiB.
    #[test]
    fn one_termination_message_holds_the_takeover_and_the_report() {
        let (writer, path, finale) = writer_and_state("both");
        let shared = &finale.shared;
        assert!(shared.life.claim_end(EndOwner::Supervisor));
        writer.finished(shared, &report(&"x".repeat(5000)));
        assert!(
            !path.exists(),
            "the sequence wrote while the supervisor owned the end"
        );
        took_over(&writer, shared);
        let text = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(text.len() <= TERMINATION_MESSAGE_MAX, "{}", text.len());
        let first = text.lines().next().unwrap();
        assert!(first.starts_with("finale status=clean"), "{text}");
        let last = text.lines().last().unwrap();
        assert!(
            last.starts_with("finale supervisor=took_over exit_code=5 "),
            "{text}"
        );
        assert!(
            last.ends_with(
                "stuck=\"the Telemetry phase did not start in time\" delivered=otlp-traces \
                 not_delivered=otlp-logs"
            ),
            "{text}"
        );
    }

    /// A report that comes after the supervisor wrote its line changes nothing: the line is the
    /// whole message.
    #[test]
    fn a_report_after_the_supervisors_line_leaves_the_line_alone() {
        let (writer, path, finale) = writer_and_state("late");
        let shared = &finale.shared;
        assert!(shared.life.claim_end(EndOwner::Supervisor));
        took_over(&writer, shared);
        let line = std::fs::read_to_string(&path).unwrap();
        writer.finished(shared, &report("late"));
        let text = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(text, line);
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.starts_with("finale supervisor=took_over"), "{text}");
    }

    /// The sequence claimed the end: its report is the message (the supervisor, which lost the
    /// claim, never takes over, see `run::supervisor`).
    #[test]
    fn the_sequence_that_owns_the_end_writes_its_report() {
        let (writer, path, finale) = writer_and_state("sequence");
        let shared = &finale.shared;
        assert!(shared.life.claim_end(EndOwner::Sequence));
        assert!(!shared.life.claim_end(EndOwner::Supervisor));
        writer.finished(shared, &report("ended"));
        let text = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(text.starts_with("finale status=clean"), "{text}");
        assert!(!text.contains("supervisor="), "{text}");
    }

    #[test]
    fn termination_values_are_quoted_escaped_and_shortened_at_char_boundaries() {
        assert_eq!(quote("plain"), "plain");
        assert_eq!(quote(""), "\"\"");
        assert_eq!(quote("a b"), "\"a b\"");
        assert_eq!(quote("say \"hi\"\n\\"), "\"say \\\"hi\\\"\\n\\\\\"");
        let s = "é".repeat(100); // 200 bytes, 2 per char
        let short = shorten(&s, 11);
        assert!(short.len() <= 11, "{}", short.len());
        assert!(short.ends_with('…'));
        let mut t = "aé".to_owned();
        truncate(&mut t, 2);
        assert_eq!(t, "a");
    }
}
