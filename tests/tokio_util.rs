//! The tokio-util bridges: a phase's token as a `CancellationToken`, and a `TaskTracker`
//! awaited in a phase, before the Workers phase's cleanup hooks.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use finale::{Finale, Hook, Outcome, Phase, ShutdownStatus};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

fn builder() -> finale::Builder {
    Finale::builder()
        .read_env(false)
        .no_signals()
        .environment(finale::Environment::Local)
}

#[tokio::test(start_paused = true)]
async fn tracked_tasks_stop_on_the_phase_token_and_finish_before_the_cleanup_hooks() {
    let finale = builder().build().unwrap();
    let closed = Arc::new(AtomicBool::new(false));
    let writes: Arc<Mutex<Vec<bool>>> = Default::default();
    let tracker = TaskTracker::new();
    let stop: CancellationToken = finale
        .handle()
        .phase_token(Phase::Workers)
        .cancellation_token();
    for _ in 0..3 {
        let (stop, closed, writes) = (stop.clone(), closed.clone(), writes.clone());
        tracker.spawn(async move {
            stop.cancelled().await;
            // The last write, a little after the stop, as a real flush would be.
            tokio::time::sleep(Duration::from_millis(20)).await;
            writes.lock().unwrap().push(!closed.load(Ordering::SeqCst));
        });
    }
    finale.track(Phase::Workers, "jobs", tracker).unwrap();
    let hook_closed = closed.clone();
    finale
        .hook(Hook::new(Phase::Workers, "close-db", move |_| async move {
            hook_closed.store(true, Ordering::SeqCst);
        }))
        .unwrap();
    // Not cancelled before its phase.
    assert!(!stop.is_cancelled());
    finale.handle().trigger("test");
    let report = finale.run().await;
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
    assert_eq!(*writes.lock().unwrap(), [true, true, true], "{report}");
    let names: Vec<_> = report
        .phase(Phase::Workers)
        .unwrap()
        .entries
        .iter()
        .map(|e| e.name.to_string())
        .collect();
    assert_eq!(names, ["jobs", "close-db"]);
}

#[tokio::test(start_paused = true)]
async fn a_tracked_task_that_ignores_the_token_is_abandoned_at_the_deadline() {
    let finale = builder()
        .workers_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let tracker = TaskTracker::new();
    tracker.spawn(std::future::pending::<()>());
    finale.track(Phase::Workers, "stuck", tracker).unwrap();
    finale.handle().trigger("test");
    let report = finale.run().await;
    assert_eq!(
        report.entry("stuck").unwrap().outcome,
        Outcome::Abandoned,
        "{report}"
    );
    assert_eq!(report.status, ShutdownStatus::DeadlineOverrun, "{report}");
}

#[tokio::test(start_paused = true)]
async fn a_tracker_awaited_by_a_hook_with_a_timeout_frees_the_cleanup_hooks() {
    // `track` has no timeout of its own: the pattern its docs give for one.
    let finale = builder()
        .workers_timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let tracker = TaskTracker::new();
    tracker.spawn(std::future::pending::<()>());
    finale
        .hook(
            Hook::new(Phase::Workers, "jobs", move |_| async move {
                tracker.close();
                tracker.wait().await;
            })
            .alongside_tasks()
            .timeout(Duration::from_secs(1)),
        )
        .unwrap();
    let started = Arc::new(Mutex::new(None));
    let started_in_hook = started.clone();
    finale
        .hook(Hook::new(Phase::Workers, "close-db", move |_| async move {
            *started_in_hook.lock().unwrap() = Some(tokio::time::Instant::now());
        }))
        .unwrap();
    let t0 = tokio::time::Instant::now();
    finale.handle().trigger("test");
    let report = finale.run().await;
    assert_eq!(report.entry("jobs").unwrap().outcome, Outcome::TimedOut);
    assert_eq!(
        report.entry("close-db").unwrap().outcome,
        Outcome::Completed,
        "{report}"
    );
    let started = started.lock().unwrap().expect("the cleanup hook ran");
    assert_eq!(started - t0, Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_root_token_requests_the_shutdown() {
    let finale = builder().build().unwrap();
    let root = CancellationToken::new();
    finale
        .handle()
        .trigger_on_cancel(root.child_token(), "root cancelled")
        .unwrap();
    let handle = finale.handle();
    let run = tokio::spawn(finale.run());
    tokio::task::yield_now().await;
    assert!(!handle.is_shutdown_requested());
    root.cancel();
    let report = run.await.unwrap();
    assert_eq!(
        report.reason,
        finale::Reason::Requested("root cancelled".into())
    );
}

#[tokio::test]
async fn a_token_taken_after_its_phase_started_is_cancelled_already() {
    let finale = builder().build().unwrap();
    let handle = finale.handle();
    handle.trigger("test");
    finale.run().await;
    assert!(CancellationToken::from(handle.phase_token(Phase::Drain)).is_cancelled());
}
