//! The tracing-appender integration: the writer is released last, gets what is left of the slot
//! (not tracing-appender's fixed 1 s), and the report says whether it drained and what it
//! wrote, failed to write and dropped, during the run and at exit.

// The tests report what they measured (run with `--nocapture` to see it).
#![allow(clippy::print_stderr)]

use std::error::Error as _;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use finale::appender::{HOOK_NAME, LogWriterError, LogWriterGuard};
use finale::{Environment, Finale, Items, Outcome, ShutdownStatus};
use tracing_appender::non_blocking::NonBlockingBuilder;

/// A writer that takes `per_line` for each line, like a slow disk or a remote log sink.
struct Slow {
    lines: Arc<AtomicUsize>,
    per_line: Duration,
}

impl Write for Slow {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.iter().filter(|&&b| b == b'\n').count();
        // Simulated device time, not synchronisation.
        std::thread::sleep(self.per_line * n as u32);
        self.lines.fetch_add(n, Ordering::SeqCst);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn slow(per_line: Duration) -> (Slow, Arc<AtomicUsize>) {
    let lines = Arc::new(AtomicUsize::new(0));
    (
        Slow {
            lines: lines.clone(),
            per_line,
        },
        lines,
    )
}

fn finale(total: Duration, reserve: Duration) -> Finale {
    Finale::builder()
        .no_signals()
        .read_env(false)
        .environment(Environment::Local)
        .total_budget(total)
        .telemetry_reserve(reserve)
        .build()
        .unwrap()
}

fn write_lines(mut writer: impl Write, n: usize) {
    for i in 0..n {
        writer.write_all(format!("line {i}\n").as_bytes()).unwrap();
    }
}

#[tokio::test]
async fn every_line_reaches_the_file() {
    let dir = std::env::temp_dir().join(format!("finale-appender-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("all.log");
    let file = std::fs::File::create(&path).unwrap();
    let (writer, guard) = finale::appender::non_blocking(file);
    let finale = finale(Duration::from_secs(10), Duration::from_secs(5));
    guard.register(&finale).unwrap();
    write_lines(writer, 20_000);
    finale.handle().trigger("test");
    let report = finale.run().await;
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
    let written = std::fs::read_to_string(&path).unwrap().lines().count();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(written, 20_000);
}

#[tokio::test]
async fn a_slow_writer_gets_the_slot_not_one_second() {
    // 1500 lines at 1 ms: about 1.5 s of writing, past tracing-appender's own 1 s wait.
    let (writer, lines) = slow(Duration::from_millis(1));
    let (non_blocking, guard) = finale::appender::non_blocking(writer);
    let finale = finale(Duration::from_secs(10), Duration::from_secs(5));
    guard.register(&finale).unwrap();
    write_lines(non_blocking, 1500);
    finale.handle().trigger("test");
    let report = finale.run().await;
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
    assert_eq!(lines.load(Ordering::SeqCst), 1500);
}

#[tokio::test]
async fn a_writer_that_cannot_drain_in_time_is_reported() {
    let (writer, lines) = slow(Duration::from_millis(2));
    let (non_blocking, guard) = finale::appender::non_blocking(writer);
    let total = Duration::from_secs(2);
    let finale = finale(total, Duration::from_secs(1));
    guard.register(&finale).unwrap();
    write_lines(non_blocking, 5000); // about 10 s of writing
    finale.handle().trigger("test");
    let start = Instant::now();
    let report = finale.run().await;
    let elapsed = start.elapsed();
    assert_eq!(
        report.status,
        ShutdownStatus::TelemetryNotDelivered,
        "{report}"
    );
    let Outcome::Failed(error) = &report.entry(HOOK_NAME).unwrap().outcome else {
        panic!("{report}");
    };
    let error = error
        .source()
        .and_then(|e| e.downcast_ref::<LogWriterError>())
        .expect("a LogWriterError");
    assert!(
        matches!(error, LogWriterError::NotDrained { .. }),
        "{error}"
    );
    assert!(elapsed < total, "{elapsed:?}");
    assert!(lines.load(Ordering::SeqCst) < 5000);
}

/// A writer whose first write waits until `open` is dropped: a disk that stalls, while the
/// lines pile up in tracing-appender's queue. Each line written is told on `written`.
struct Stalled {
    gate: Option<mpsc::Receiver<()>>,
    lines: Arc<AtomicUsize>,
    written: mpsc::Sender<()>,
}

fn stalled() -> (Stalled, mpsc::Sender<()>, Arc<AtomicUsize>) {
    let (writer, open, lines, _) = stalled_told();
    (writer, open, lines)
}

fn stalled_told() -> (
    Stalled,
    mpsc::Sender<()>,
    Arc<AtomicUsize>,
    mpsc::Receiver<()>,
) {
    let (open, gate) = mpsc::channel();
    let (written, told) = mpsc::channel();
    let lines = Arc::new(AtomicUsize::new(0));
    let writer = Stalled {
        gate: Some(gate),
        lines: lines.clone(),
        written,
    };
    (writer, open, lines, told)
}

impl Write for Stalled {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(gate) = self.gate.take() {
            let _ = gate.recv();
        }
        let n = buf.iter().filter(|&&b| b == b'\n').count();
        self.lines.fetch_add(n, Ordering::SeqCst);
        for _ in 0..n {
            let _ = self.written.send(());
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn lines_dropped_at_exit_are_not_delivered() {
    let (writer, open, _) = stalled();
    let (non_blocking, guard) = finale::appender::non_blocking_with(
        NonBlockingBuilder::default().buffered_lines_limit(8),
        writer,
    );
    let finale = finale(Duration::from_secs(10), Duration::from_secs(5));
    guard.register(&finale).unwrap();
    finale.handle().trigger("test");
    // The shutdown's own burst, into a stalled writer: the queue overflows.
    write_lines(non_blocking, 200);
    drop(open);
    let report = finale.run().await;
    eprintln!("dropped at exit:\n{report}");
    assert_eq!(
        report.status,
        ShutdownStatus::TelemetryNotDelivered,
        "{report}"
    );
    let delivery = report.delivery(HOOK_NAME).expect("counted");
    assert_eq!(delivery.items, Items::LogLines);
    assert_eq!(delivery.run.dropped, 0, "{report}");
    assert!(delivery.at_exit.dropped >= 200 - 9, "{report}");
    assert_eq!(
        delivery.at_exit.exported + delivery.at_exit.dropped,
        200,
        "{report}"
    );
    assert!(
        report.to_string().contains("delivered  log-writer"),
        "{report}"
    );
}

#[tokio::test]
async fn a_burst_long_before_the_shutdown_is_reported_but_leaves_the_exit_code_alone() {
    let (writer, open, lines, written) = stalled_told();
    let (non_blocking, guard) = finale::appender::non_blocking_with(
        NonBlockingBuilder::default().buffered_lines_limit(8),
        writer,
    );
    let finale = finale(Duration::from_secs(10), Duration::from_secs(5));
    guard.register(&finale).unwrap();
    // During the run: a burst into a stalled writer drops lines; the writer then catches up.
    write_lines(non_blocking.clone(), 200);
    drop(open);
    let queued = 200 - non_blocking.error_counter().dropped_lines();
    for _ in 0..queued {
        written.recv().unwrap();
    }
    finale.handle().trigger("test");
    // After the trigger: a few lines, fewer than the queue holds, all get through.
    write_lines(non_blocking, 5);
    let report = finale.run().await;
    eprintln!("burst during the run:\n{report}");
    let delivery = report.delivery(HOOK_NAME).expect("counted");
    assert!(delivery.run.dropped >= 200 - 9, "{report}");
    assert_eq!(delivery.at_exit.dropped, 0, "{report}");
    assert_eq!(delivery.at_exit.failed, 0, "{report}");
    assert_eq!(
        delivery.total().exported,
        lines.load(Ordering::SeqCst) as u64,
        "{report}"
    );
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
}

/// A writer on a full disk: every write fails with ENOSPC.
struct Full;

impl Write for Full {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        Err(std::io::Error::from_raw_os_error(28))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_writer_that_writes_nothing_is_not_delivered() {
    let (non_blocking, guard) = finale::appender::non_blocking(Full);
    let finale = finale(Duration::from_secs(10), Duration::from_secs(5));
    guard.register(&finale).unwrap();
    finale.handle().trigger("test");
    write_lines(non_blocking, 100);
    let report = finale.run().await;
    eprintln!("full disk:\n{report}");
    // The writer drained (it let go of every line), but wrote none.
    assert!(report.entry(HOOK_NAME).unwrap().outcome.is_completed());
    let delivery = report.delivery(HOOK_NAME).expect("counted");
    assert_eq!(delivery.at_exit.failed, 100, "{report}");
    assert_eq!(delivery.total().exported, 0, "{report}");
    assert_eq!(
        report.status,
        ShutdownStatus::TelemetryNotDelivered,
        "{report}"
    );
}

/// A buffered writer on a full disk (a `BufWriter` over a file, say): every write fills the
/// buffer and succeeds, every flush fails with ENOSPC and loses what was buffered.
struct FullOnFlush(usize);

impl Write for FullOnFlush {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.0 == 0 {
            return Ok(());
        }
        self.0 = 0;
        Err(std::io::Error::from_raw_os_error(28))
    }
}

#[tokio::test]
async fn lines_lost_by_a_failed_flush_are_not_delivered() {
    let (non_blocking, guard) = finale::appender::non_blocking(FullOnFlush(0));
    let finale = finale(Duration::from_secs(10), Duration::from_secs(5));
    guard.register(&finale).unwrap();
    finale.handle().trigger("test");
    write_lines(non_blocking, 100);
    let report = finale.run().await;
    eprintln!("full disk at flush:\n{report}");
    let delivery = report.delivery(HOOK_NAME).expect("counted");
    assert_eq!(delivery.total().exported, 0, "{report}");
    assert_eq!(delivery.total().failed, 100, "{report}");
    assert_eq!(
        report.status,
        ShutdownStatus::TelemetryNotDelivered,
        "{report}"
    );
}

#[tokio::test]
async fn a_plain_worker_guard_reports_its_drops_with_its_error_counter() {
    let (writer, open, _) = stalled();
    let (non_blocking, guard) = NonBlockingBuilder::default()
        .buffered_lines_limit(8)
        .finish(writer);
    let finale = finale(Duration::from_secs(10), Duration::from_secs(5));
    LogWriterGuard::from_worker_guard(guard)
        .error_counter(non_blocking.error_counter())
        .register(&finale)
        .unwrap();
    finale.handle().trigger("test");
    write_lines(non_blocking, 200);
    drop(open);
    let report = finale.run().await;
    let delivery = report.delivery(HOOK_NAME).expect("counted");
    assert!(delivery.at_exit.dropped >= 200 - 9, "{report}");
    assert_eq!(
        report.status,
        ShutdownStatus::TelemetryNotDelivered,
        "{report}"
    );
}

#[tokio::test]
async fn a_plain_worker_guard_is_released_too() {
    let (writer, lines) = slow(Duration::ZERO);
    let (non_blocking, guard) = tracing_appender::non_blocking(writer);
    let finale = finale(Duration::from_secs(10), Duration::from_secs(5));
    LogWriterGuard::from_worker_guard(guard)
        .register(&finale)
        .unwrap();
    write_lines(non_blocking, 100);
    finale.handle().trigger("test");
    let report = finale.run().await;
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
    assert_eq!(lines.load(Ordering::SeqCst), 100);
}
