//! The testing kit in process, on paused time: virtual signals read like real ones, durations are
//! exact, a load through the drain loses nothing, and the assertions say what went wrong.

use std::time::Duration;

use finale::testing::{self, Call, Load, Run, SignalEffect};
use finale::{EntryKind, Hook, Phase, PhaseOutcome, Reason, ShutdownStatus, Signal, Task};

/// A service that is ready at once and stops when told.
async fn service(ctx: finale::TaskContext) {
    ctx.set_ready();
    ctx.stopped().await;
}

#[tokio::test(start_paused = true)]
async fn a_virtual_sigterm_reads_like_a_real_one_and_a_second_escalates() {
    let finale = testing::builder().build().unwrap();
    finale.spawn(Task::service("api", service)).unwrap();
    finale
        .hook(Hook::new(Phase::Drain, "endless", |_| {
            std::future::pending::<()>()
        }))
        .unwrap();
    let run = Run::start(finale);
    run.started().await;
    assert_eq!(run.sigterm(), SignalEffect::Requested);
    run.handle().phase_started(Phase::Drain).await;
    assert_eq!(run.signal(Signal::Interrupt), SignalEffect::Escalated);
    assert_eq!(run.sigterm(), SignalEffect::WouldExit);
    let report = run.report().await;
    assert_eq!(report.reason, Reason::Signal(Signal::Terminate));
    assert!(
        report
            .to_string()
            .starts_with("finale: shutdown after signal SIGTERM")
    );
    assert_eq!(report.status, ShutdownStatus::Forced, "{report}");
    assert_eq!(report.exit_code, ShutdownStatus::Forced.default_code());
}

#[tokio::test(start_paused = true)]
async fn phase_durations_are_exact_on_paused_time() {
    let finale = testing::builder()
        .drain_delay(Duration::from_secs(5))
        .build()
        .unwrap();
    finale.spawn(Task::service("api", service)).unwrap();
    finale
        .hook(Hook::new(Phase::Workers, "flush-queue", |_| async {
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }))
        .unwrap();
    let run = Run::start(finale);
    run.started().await;
    let t0 = tokio::time::Instant::now();
    run.sigterm();
    let report = run.report().await;
    testing::assert_clean(&report);
    let took = |phase| report.phase(phase).unwrap().duration;
    assert_eq!(took(Phase::Announce), Duration::from_secs(5));
    assert_eq!(took(Phase::Workers), Duration::from_millis(1500));
    assert_eq!(
        report.entry("flush-queue").unwrap().duration,
        Duration::from_millis(1500)
    );
    assert_eq!(report.total, Duration::from_millis(6500));
    assert_eq!(t0.elapsed(), Duration::from_millis(6500));
}

#[tokio::test(start_paused = true)]
async fn a_load_through_the_drain_is_waited_for_and_refused_never_dropped() {
    let finale = testing::builder().build().unwrap();
    let in_flight = finale.handle().in_flight();
    finale.spawn(Task::service("api", service)).unwrap();
    let run = Run::start(finale);
    run.started().await;
    let load = Load::new(10_000)
        .concurrency(8)
        .interval(Duration::from_millis(5))
        .spawn(move |_| async move {
            let Some(_guard) = in_flight.try_acquire() else {
                return Call::Refused;
            };
            tokio::time::sleep(Duration::from_millis(200)).await;
            Call::Served
        });
    assert!(load.until_served(50).await);
    run.sigterm();
    let report = run.report().await;
    let load = load.stop().await;
    testing::assert_clean(&report);
    testing::assert_nothing_dropped(&load);
    assert!(load.served >= 50 && load.refused > 0, "{load}");
    assert_eq!(load.sent, load.served + load.refused, "{load}");
    // Every request in flight at the drain's start was waited for: it takes one request's time.
    assert!(report.in_flight_at_drain_start > 0, "{report}");
    let wait = report
        .phase(Phase::Drain)
        .unwrap()
        .entries
        .iter()
        .find(|e| e.kind == EntryKind::InFlight)
        .unwrap()
        .duration;
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_millis(200),
        "{report}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_load_counts_timeouts_and_errors_as_dropped() {
    let load = Load::new(6)
        .concurrency(3)
        .timeout(Duration::from_secs(1))
        .spawn(|i| async move {
            match i % 3 {
                0 => Ok(()),
                1 => Err(std::io::Error::other("connection reset")),
                _ => std::future::pending().await,
            }
        })
        .finish()
        .await;
    assert_eq!(
        (load.sent, load.served, load.refused, load.dropped),
        (6, 2, 0, 4)
    );
    assert_eq!(load.dropped_by["connection reset"], 2);
    assert_eq!(load.dropped_by["no answer within 1s"], 2);
    let failed = std::panic::catch_unwind(|| testing::assert_nothing_dropped(&load));
    let message = *failed.unwrap_err().downcast::<String>().unwrap();
    assert!(message.contains("dropped 2: connection reset"), "{message}");
}

#[tokio::test(start_paused = true)]
async fn assert_clean_says_what_was_not_clean() {
    let finale = testing::builder().build().unwrap();
    finale
        .hook(Hook::new(Phase::Workers, "close-db", |_| async {
            Err::<(), _>(std::io::Error::other("pool already closed"))
        }))
        .unwrap();
    let run = Run::start(finale);
    run.sigterm();
    let report = run.report().await;
    assert_eq!(report.status, ShutdownStatus::ComponentFailure);
    assert_eq!(
        report.phase(Phase::Workers).unwrap().outcome,
        PhaseOutcome::Completed
    );
    let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        testing::assert_clean(&report)
    }));
    let message = *failed.unwrap_err().downcast::<String>().unwrap();
    assert!(message.contains("status component failure"), "{message}");
    assert!(
        message.contains("\"close-db\" failed: pool already closed"),
        "{message}"
    );
}

#[tokio::test(start_paused = true)]
#[should_panic(expected = "before graceful start completed: startup of \"listener\" failed")]
async fn started_fails_with_the_reason_of_a_failed_start() {
    let finale = testing::builder().build().unwrap();
    finale
        .spawn(Task::service("listener", |_| async {
            Err::<(), _>(std::io::Error::other("address already in use"))
        }))
        .unwrap();
    Run::start(finale).started().await;
}

#[tokio::test(start_paused = true)]
async fn a_failed_start_gives_its_report() {
    let finale = testing::builder().build().unwrap();
    finale
        .spawn(Task::service("listener", |_| async {
            Err::<(), _>(std::io::Error::other("address already in use"))
        }))
        .unwrap();
    let report = Run::start(finale).report().await;
    assert_eq!(report.status, ShutdownStatus::StartupFailure, "{report}");
    assert_eq!(report.exit_code, 3);
}
