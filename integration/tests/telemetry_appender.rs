//! The tracing-appender integration: the writer is released last, gets what is left of the slot
//! (not tracing-appender's fixed 1 s), and the report says whether it drained.

use std::error::Error as _;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use finale::appender::{HOOK_NAME, LogWriterError, LogWriterGuard};
use finale::{Environment, Finale, Outcome, ShutdownStatus};
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

#[tokio::test]
async fn dropped_lines_are_reported() {
    let (writer, _) = slow(Duration::from_millis(1));
    let (non_blocking, guard) = finale::appender::non_blocking_with(
        NonBlockingBuilder::default().buffered_lines_limit(8),
        writer,
    );
    let finale = finale(Duration::from_secs(10), Duration::from_secs(5));
    guard.register(&finale).unwrap();
    write_lines(non_blocking, 200);
    finale.handle().trigger("test");
    let report = finale.run().await;
    assert_eq!(
        report.status,
        ShutdownStatus::TelemetryNotDelivered,
        "{report}"
    );
    let shown = report.to_string();
    assert!(
        shown.contains("log lines were dropped because the writer's queue was full"),
        "{shown}"
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
