//! The shutdown sequence on paused tokio time: order, concurrency, deadlines, the telemetry
//! reserve, isolation, escalation, graceful start, in-flight draining and the report.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use finale::{
    ConfigError, DrainDelay, EntryKind, ExitCodes, Finale, Hook, Outcome, Phase, PhaseOutcome,
    Reason, ShutdownStatus, State, Task,
};
use tokio::sync::{Barrier, oneshot};
use tokio::time::Instant;

fn builder() -> finale::Builder {
    Finale::builder()
        .read_env(false)
        .no_signals()
        .environment(finale::Environment::Local)
}

type Log = Arc<Mutex<Vec<String>>>;

fn log_hook(log: &Log, phase: Phase, name: &'static str) -> Hook {
    let log = log.clone();
    Hook::new(phase, name, move |ctx| async move {
        assert_eq!(ctx.phase(), phase);
        log.lock().unwrap().push(name.to_owned());
    })
}

#[tokio::test(start_paused = true)]
async fn phases_run_in_order_and_tasks_stop_in_theirs() {
    let log: Log = Default::default();
    let finale = builder().build().unwrap();
    for (phase, name) in [
        (Phase::Telemetry, "telemetry"),
        (Phase::Workers, "workers"),
        (Phase::Drain, "drain"),
        (Phase::Announce, "announce"),
    ] {
        finale.hook(log_hook(&log, phase, name)).unwrap();
    }
    let (l1, l2) = (log.clone(), log.clone());
    finale
        .spawn(Task::service("server", move |ctx| async move {
            ctx.set_ready();
            ctx.stopped().await;
            l1.lock().unwrap().push("server stopped".into());
        }))
        .unwrap();
    finale
        .spawn(Task::worker("worker", move |ctx| async move {
            ctx.stopped().await;
            l2.lock().unwrap().push("worker stopped".into());
        }))
        .unwrap();
    let handle = finale.handle();
    let run = tokio::spawn(finale.run());
    // Graceful start reports ready.
    while handle.state() != State::Running {
        tokio::task::yield_now().await;
    }
    assert!(handle.health().is_ready());
    handle.trigger("test");
    let report = run.await.unwrap();
    let log = log.lock().unwrap().clone();
    let pos = |s: &str| log.iter().position(|x| x == s).unwrap();
    assert!(pos("announce") < pos("drain"));
    assert!(pos("drain") < pos("workers"));
    assert!(
        pos("server stopped") < pos("workers") || pos("server stopped") < pos("worker stopped")
    );
    assert!(pos("drain") < pos("worker stopped"));
    assert!(pos("workers") < pos("telemetry"));
    assert!(pos("worker stopped") < pos("telemetry"));
    assert_eq!(report.status, ShutdownStatus::Clean);
    assert_eq!(report.exit_code, 0);
    assert_eq!(report.reason, Reason::Requested("test".into()));
    assert_eq!(report.phases.len(), 4);
    for (p, phase) in report.phases.iter().zip(Phase::ALL) {
        assert_eq!(p.phase, phase);
        assert_eq!(p.outcome, PhaseOutcome::Completed);
    }
    let server = report.entry("server").unwrap();
    assert_eq!(server.kind, EntryKind::Task);
    assert!(report.phase(Phase::Drain).unwrap().entries.contains(server));
    assert!(handle.state() == State::Finished);
    assert!(!handle.health().is_ready());
}

#[tokio::test(start_paused = true)]
async fn hooks_in_one_phase_run_concurrently() {
    let finale = builder().build().unwrap();
    // Each hook waits for all three: only concurrent execution completes.
    let barrier = Arc::new(Barrier::new(3));
    for name in ["a", "b", "c"] {
        let b = barrier.clone();
        finale
            .hook(Hook::new(Phase::Workers, name, move |_| async move {
                b.wait().await;
            }))
            .unwrap();
    }
    finale.handle().trigger("test");
    let report = finale.run().await;
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
}

#[tokio::test(start_paused = true)]
async fn order_groups_run_one_after_another() {
    let log: Log = Default::default();
    let finale = builder().build().unwrap();
    finale
        .hook(log_hook(&log, Phase::Telemetry, "last").order(10))
        .unwrap();
    finale
        .hook(log_hook(&log, Phase::Telemetry, "first").order(-10))
        .unwrap();
    finale
        .hook(log_hook(&log, Phase::Telemetry, "middle"))
        .unwrap();
    finale.handle().trigger("test");
    let report = finale.run().await;
    assert_eq!(*log.lock().unwrap(), ["first", "middle", "last"]);
    // The report lists them in the order they ran (the log writer, order last, shows last).
    let names: Vec<_> = report
        .phase(Phase::Telemetry)
        .unwrap()
        .entries
        .iter()
        .map(|e| e.name.to_string())
        .collect();
    assert_eq!(names, ["first", "middle", "last"]);
}

/// A pool that a worker writes to until it stops and a Workers hook closes.
#[derive(Clone, Default)]
struct Pool {
    closed: Arc<std::sync::atomic::AtomicBool>,
    writes: Arc<Mutex<Vec<Result<(), &'static str>>>>,
}

impl Pool {
    fn write(&self) {
        let result = if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            Err("closed pool")
        } else {
            Ok(())
        };
        self.writes.lock().unwrap().push(result);
    }
}

#[tokio::test(start_paused = true)]
async fn workers_hooks_run_after_the_phases_tasks_have_ended() {
    let finale = builder().build().unwrap();
    let pool = Pool::default();
    let worker_pool = pool.clone();
    finale
        .spawn(Task::worker("writer", move |ctx| async move {
            ctx.stopped().await;
            // The last write after the stop signal: several turns of the scheduler and a
            // timer later, as a real flush would be.
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            worker_pool.write();
        }))
        .unwrap();
    let hook_pool = pool.clone();
    finale
        .hook(Hook::new(Phase::Workers, "close-db", move |_| async move {
            hook_pool
                .closed
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }))
        .unwrap();
    finale.handle().trigger("test");
    let report = finale.run().await;
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
    assert_eq!(*pool.writes.lock().unwrap(), [Ok(())], "{report}");
    // The report shows the run order: the task, then the hook.
    let names: Vec<_> = report
        .phase(Phase::Workers)
        .unwrap()
        .entries
        .iter()
        .map(|e| e.name.to_string())
        .collect();
    assert_eq!(names, ["writer", "close-db"]);
}

#[tokio::test(start_paused = true)]
async fn a_worker_that_hangs_past_its_own_timeout_leaves_the_hooks_the_rest_of_the_phase() {
    let finale = builder()
        .workers_timeout(Duration::from_secs(4))
        .build()
        .unwrap();
    finale
        .spawn(
            Task::worker("stuck", |_| std::future::pending::<()>()).timeout(Duration::from_secs(1)),
        )
        .unwrap();
    let ran_at: Arc<Mutex<Option<Instant>>> = Default::default();
    let hook_ran_at = ran_at.clone();
    finale
        .hook(Hook::new(Phase::Workers, "close-db", move |_| async move {
            *hook_ran_at.lock().unwrap() = Some(Instant::now());
        }))
        .unwrap();
    finale.handle().trigger("test");
    let start = Instant::now();
    let report = finale.run().await;
    assert_eq!(report.entry("stuck").unwrap().outcome, Outcome::TimedOut);
    assert_eq!(
        report.entry("close-db").unwrap().outcome,
        Outcome::Completed
    );
    let ran_at = ran_at.lock().unwrap().expect("the hook ran");
    assert_eq!(ran_at - start, Duration::from_secs(1), "{report}");
}

#[tokio::test(start_paused = true)]
async fn a_hook_alongside_tasks_runs_while_they_stop() {
    let finale = builder().build().unwrap();
    // The worker stops only once the hook has run: only concurrent execution completes.
    let (tx, rx) = oneshot::channel::<()>();
    finale
        .spawn(Task::worker("consumer", move |ctx| async move {
            ctx.stopped().await;
            rx.await.unwrap();
        }))
        .unwrap();
    finale
        .hook(
            Hook::new(Phase::Workers, "close-queue", move |_| async move {
                tx.send(()).unwrap();
            })
            .alongside_tasks(),
        )
        .unwrap();
    finale.handle().trigger("test");
    let report = finale.run().await;
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
}

#[tokio::test(start_paused = true)]
async fn a_hook_alongside_tasks_with_a_later_order_still_runs_while_they_stop() {
    let finale = builder().build().unwrap();
    // The worker stops only once the hook has run: a hook of order 1 that waited for the
    // tasks (order 0) would leave both waiting until the phase's deadline.
    let (tx, rx) = oneshot::channel::<()>();
    finale
        .spawn(Task::worker("consumer", move |ctx| async move {
            ctx.stopped().await;
            rx.await.unwrap();
        }))
        .unwrap();
    finale
        .hook(
            Hook::new(Phase::Workers, "close-queue", move |_| async move {
                tx.send(()).unwrap();
            })
            .alongside_tasks()
            .order(1),
        )
        .unwrap();
    finale.handle().trigger("test");
    let report = finale.run().await;
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
}

#[tokio::test(start_paused = true)]
async fn a_drain_hook_of_a_later_order_runs_while_the_drain_tasks_stop() {
    let finale = builder().build().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    finale
        .spawn(
            Task::worker("stream", move |ctx| async move {
                ctx.stopped().await;
                rx.await.unwrap();
            })
            .stop_in(Phase::Drain),
        )
        .unwrap();
    finale
        .hook(
            Hook::new(Phase::Drain, "end-streams", move |_| async move {
                tx.send(()).unwrap();
            })
            .order(1),
        )
        .unwrap();
    finale.handle().trigger("test");
    let report = finale.run().await;
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
    assert_eq!(
        report.phase(Phase::Drain).unwrap().duration,
        Duration::ZERO,
        "{report}"
    );
}

#[tokio::test(start_paused = true)]
async fn the_report_lists_a_phases_tasks_first_then_its_hooks_group_by_group() {
    let finale = builder().build().unwrap();
    let hook = |name: &'static str| Hook::new(Phase::Workers, name, |_| async {});
    finale.hook(hook("cleanup")).unwrap();
    finale
        .hook(hook("helper-late").alongside_tasks().order(1))
        .unwrap();
    finale
        .spawn(Task::worker("first-task", |ctx| async move {
            ctx.stopped().await
        }))
        .unwrap();
    finale.hook(hook("helper").alongside_tasks()).unwrap();
    finale
        .spawn(Task::worker("second-task", |ctx| async move {
            ctx.stopped().await
        }))
        .unwrap();
    finale.hook(hook("cleanup-early").order(-1)).unwrap();
    finale.handle().trigger("test");
    let report = finale.run().await;
    let names: Vec<&str> = report
        .phase(Phase::Workers)
        .unwrap()
        .entries
        .iter()
        .map(|e| &*e.name)
        .collect();
    assert_eq!(
        names,
        [
            "first-task",
            "second-task",
            "helper",
            "helper-late",
            "cleanup-early",
            "cleanup"
        ],
        "{report}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_hanging_drain_is_abandoned_at_its_deadline() {
    let finale = builder()
        .drain_timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    finale
        .hook(Hook::new(Phase::Drain, "stuck", |_| {
            std::future::pending::<()>()
        }))
        .unwrap();
    finale
        .hook(Hook::new(Phase::Drain, "quick", |_| async {}))
        .unwrap();
    let start = Instant::now();
    finale.handle().trigger("test");
    let report = finale.run().await;
    let drain = report.phase(Phase::Drain).unwrap();
    assert_eq!(drain.outcome, PhaseOutcome::DeadlineReached);
    assert_eq!(drain.duration, Duration::from_secs(3));
    assert_eq!(report.entry("stuck").unwrap().outcome, Outcome::Abandoned);
    assert_eq!(report.entry("quick").unwrap().outcome, Outcome::Completed);
    assert_eq!(report.status, ShutdownStatus::DeadlineOverrun);
    assert_eq!(
        report.exit_code,
        finale::ShutdownStatus::DeadlineOverrun.default_code()
    );
    assert_eq!(start.elapsed(), Duration::from_secs(3));
}

#[tokio::test(start_paused = true)]
async fn the_telemetry_reserve_survives_an_overrunning_drain() {
    // Drain may last 20 s by its own timeout, but must end by total - reserve = 7 s.
    let finale = builder()
        .total_budget(Duration::from_secs(10))
        .telemetry_reserve(Duration::from_secs(3))
        .drain_timeout(Duration::from_secs(20))
        .workers_timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let t0 = Instant::now();
    finale
        .hook(Hook::new(Phase::Drain, "endless-stream", |_| {
            std::future::pending::<()>()
        }))
        .unwrap();
    finale
        .hook(Hook::new(Phase::Workers, "slow-worker", |_| {
            std::future::pending::<()>()
        }))
        .unwrap();
    let (tx, rx) = oneshot::channel();
    finale
        .hook(
            Hook::new(Phase::Telemetry, "flush", move |ctx| async move {
                let started = Instant::now();
                // The flush gets at least the reserve.
                assert!(ctx.remaining() >= Duration::from_secs(3));
                tokio::time::sleep(Duration::from_millis(2900)).await;
                tx.send(started).unwrap();
            })
            .timeout(Duration::from_secs(3)),
        )
        .unwrap();
    finale.handle().trigger("test");
    let report = finale.run().await;
    let flush_started = rx.await.unwrap();
    assert_eq!(flush_started - t0, Duration::from_secs(7));
    assert_eq!(report.entry("flush").unwrap().outcome, Outcome::Completed);
    assert_eq!(
        report.entry("endless-stream").unwrap().outcome,
        Outcome::Abandoned
    );
    assert_eq!(
        report.entry("slow-worker").unwrap().outcome,
        Outcome::Abandoned
    );
    assert_eq!(
        report.phase(Phase::Workers).unwrap().duration,
        Duration::ZERO
    );
    assert!(report.total <= Duration::from_secs(10));
    assert_eq!(report.status, ShutdownStatus::DeadlineOverrun);
}

#[tokio::test(start_paused = true)]
async fn a_failing_panicking_or_hanging_hook_is_isolated_in_every_phase() {
    for phase in Phase::ALL {
        let finale = builder().build().unwrap();
        finale
            .hook(Hook::new(phase, "errors", |_| async {
                Err::<(), _>(std::io::Error::other("disk full"))
            }))
            .unwrap();
        finale
            .hook(Hook::new(phase, "panics", |_| async {
                if true {
                    panic!("boom")
                }
            }))
            .unwrap();
        finale
            .hook(
                Hook::new(phase, "hangs", |_| std::future::pending::<()>())
                    .timeout(Duration::from_millis(500)),
            )
            .unwrap();
        finale.hook(Hook::new(phase, "fine", |_| async {})).unwrap();
        let later = Phase::ALL.iter().copied().find(|p| *p > phase);
        if let Some(later) = later {
            finale
                .hook(Hook::new(later, "later", |_| async {}))
                .unwrap();
        }
        finale.handle().trigger("test");
        let report = finale.run().await;
        let o = |n: &str| report.entry(n).unwrap().outcome.clone();
        match o("errors") {
            Outcome::Failed(e) => assert_eq!(e.to_string(), "disk full"),
            other => panic!("{other:?}"),
        }
        assert_eq!(o("panics"), Outcome::Panicked("boom".into()));
        assert_eq!(o("hangs"), Outcome::TimedOut);
        assert_eq!(o("fine"), Outcome::Completed);
        if later.is_some() {
            assert_eq!(o("later"), Outcome::Completed);
        }
        let expected = if phase == Phase::Telemetry {
            ShutdownStatus::TelemetryNotDelivered
        } else {
            ShutdownStatus::ComponentFailure
        };
        assert_eq!(report.status, expected, "{phase}: {report}");
        // Every phase ran.
        assert!(
            report
                .phases
                .iter()
                .all(|p| p.outcome != PhaseOutcome::Skipped)
        );
    }
}

#[tokio::test(start_paused = true)]
async fn escalation_abandons_the_drain_and_flushes_with_the_short_budget() {
    let finale = builder()
        .escalation_budget(Duration::from_secs(1))
        .build()
        .unwrap();
    let (entered_tx, entered_rx) = oneshot::channel();
    finale
        .hook(Hook::new(Phase::Drain, "slow-drain", |_| async move {
            entered_tx.send(()).unwrap();
            std::future::pending::<()>().await
        }))
        .unwrap();
    finale
        .hook(Hook::new(Phase::Workers, "cleanup", |_| async {}))
        .unwrap();
    finale
        .hook(Hook::new(Phase::Telemetry, "flush", |ctx| async move {
            assert!(ctx.remaining() <= Duration::from_secs(1));
        }))
        .unwrap();
    finale
        .hook(Hook::new(Phase::Telemetry, "hung-flush", |_| {
            std::future::pending::<()>()
        }))
        .unwrap();
    let handle = finale.handle();
    assert!(
        !handle.escalate(),
        "nothing to escalate before the shutdown"
    );
    let run = tokio::spawn(finale.run());
    handle.trigger("first");
    entered_rx.await.unwrap();
    let t = Instant::now();
    assert!(handle.escalate());
    let report = run.await.unwrap();
    assert!(report.escalated);
    assert_eq!(
        report.phase(Phase::Drain).unwrap().outcome,
        PhaseOutcome::Escalated
    );
    assert_eq!(
        report.phase(Phase::Workers).unwrap().outcome,
        PhaseOutcome::Skipped
    );
    assert_eq!(report.entry("cleanup").unwrap().outcome, Outcome::Abandoned);
    assert_eq!(report.entry("flush").unwrap().outcome, Outcome::Completed);
    assert_eq!(
        report.entry("hung-flush").unwrap().outcome,
        Outcome::Abandoned
    );
    assert_eq!(t.elapsed(), Duration::from_secs(1));
    assert_eq!(report.status, ShutdownStatus::Forced);
    assert_eq!(
        report.exit_code,
        finale::ShutdownStatus::Forced.default_code()
    );
}

#[tokio::test(start_paused = true)]
async fn escalation_while_workers_wait_for_their_tasks_abandons_the_cleanup_hooks() {
    let finale = builder().build().unwrap();
    let (stopping_tx, stopping_rx) = oneshot::channel();
    finale
        .spawn(Task::worker("stubborn", move |ctx| async move {
            ctx.stopped().await;
            stopping_tx.send(()).unwrap();
            std::future::pending::<()>().await
        }))
        .unwrap();
    let ran = Arc::new(Mutex::new(false));
    let ran_in_hook = ran.clone();
    finale
        .hook(Hook::new(Phase::Workers, "close-db", move |_| async move {
            *ran_in_hook.lock().unwrap() = true;
        }))
        .unwrap();
    let handle = finale.handle();
    let run = tokio::spawn(finale.run());
    handle.trigger("first");
    stopping_rx.await.unwrap();
    assert!(handle.escalate());
    let report = run.await.unwrap();
    assert_eq!(
        report.phase(Phase::Workers).unwrap().outcome,
        PhaseOutcome::Escalated
    );
    assert_eq!(
        report.entry("stubborn").unwrap().outcome,
        Outcome::Abandoned
    );
    let cleanup = report.entry("close-db").unwrap();
    assert_eq!(cleanup.outcome, Outcome::Abandoned, "{report}");
    assert_eq!(cleanup.duration, Duration::ZERO);
    assert!(!*ran.lock().unwrap(), "the cleanup hook never starts");
}

#[tokio::test(start_paused = true)]
async fn escalation_during_telemetry_shortens_it() {
    let finale = builder()
        .escalation_budget(Duration::from_secs(1))
        .build()
        .unwrap();
    let (entered_tx, entered_rx) = oneshot::channel();
    finale
        .hook(Hook::new(Phase::Telemetry, "hung-flush", |_| async move {
            entered_tx.send(()).unwrap();
            std::future::pending::<()>().await
        }))
        .unwrap();
    let handle = finale.handle();
    let run = tokio::spawn(finale.run());
    handle.trigger("first");
    entered_rx.await.unwrap();
    let t = Instant::now();
    handle.escalate();
    let report = run.await.unwrap();
    assert_eq!(t.elapsed(), Duration::from_secs(1));
    assert_eq!(report.status, ShutdownStatus::Forced);
}

#[tokio::test(start_paused = true)]
async fn a_service_that_fails_to_start_shuts_the_others_down() {
    let finale = builder().build().unwrap();
    let (stopped_tx, stopped_rx) = oneshot::channel();
    finale
        .spawn(Task::service("healthy", move |ctx| async move {
            ctx.set_ready();
            ctx.stopped().await;
            stopped_tx.send(()).unwrap();
        }))
        .unwrap();
    finale
        .spawn(Task::service("bind", |_| async {
            Err::<(), _>(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "address in use",
            ))
        }))
        .unwrap();
    let handle = finale.handle();
    let report = finale.run().await;
    stopped_rx.await.expect("the healthy service was stopped");
    match &report.reason {
        Reason::StartupFailed { name, error } => {
            assert_eq!(name, "bind");
            assert_eq!(error.to_string(), "address in use");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(report.status, ShutdownStatus::StartupFailure);
    assert_eq!(
        report.exit_code,
        finale::ShutdownStatus::StartupFailure.default_code()
    );
    assert!(!handle.health().is_ready(), "never became ready");
    assert_eq!(report.entry("healthy").unwrap().outcome, Outcome::Completed);
}

#[tokio::test(start_paused = true)]
async fn a_service_never_ready_fails_the_start_at_the_startup_timeout() {
    let finale = builder()
        .startup_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    finale
        .spawn(Task::service(
            "slow",
            |ctx| async move { ctx.stopped().await },
        ))
        .unwrap();
    let t = Instant::now();
    let report = finale.run().await;
    assert_eq!(t.elapsed(), Duration::from_secs(2));
    assert!(matches!(&report.reason, Reason::StartupFailed { name, .. } if name == "slow"));
    assert_eq!(report.status, ShutdownStatus::StartupFailure);
}

#[tokio::test(start_paused = true)]
async fn a_failed_critical_worker_triggers_the_shutdown() {
    let finale = builder().build().unwrap();
    finale
        .spawn(Task::worker("optional", |_| async {
            Err::<(), _>("ignored")
        }))
        .unwrap();
    finale
        .spawn(
            Task::worker("consumer", |_| async {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if true {
                    panic!("lost the queue")
                }
            })
            .critical(true),
        )
        .unwrap();
    let report = finale.run().await;
    match &report.reason {
        Reason::TaskFailed { name, error } => {
            assert_eq!(name, "consumer");
            assert!(error.to_string().contains("lost the queue"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(report.status, ShutdownStatus::ComponentFailure);
    assert!(matches!(
        report.entry("optional").unwrap().outcome,
        Outcome::Failed(_)
    ));
    assert!(matches!(
        report.entry("consumer").unwrap().outcome,
        Outcome::Panicked(_)
    ));
}

#[tokio::test(start_paused = true)]
async fn a_worker_that_ignores_its_stop_is_aborted() {
    let finale = builder()
        .workers_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let (dropped_tx, dropped_rx) = oneshot::channel::<()>();
    finale
        .spawn(Task::worker("deaf", |_| async move {
            let _dropped_on_abort = dropped_tx;
            std::future::pending::<()>().await
        }))
        .unwrap();
    finale.handle().trigger("test");
    let report = finale.run().await;
    assert_eq!(report.entry("deaf").unwrap().outcome, Outcome::Abandoned);
    // The task was aborted: its future (and the sender) were dropped.
    assert!(dropped_rx.await.is_err());
}

#[tokio::test(start_paused = true)]
async fn drain_waits_for_in_flight_work() {
    let finale = builder().build().unwrap();
    let handle = finale.handle();
    let guard = handle.in_flight().acquire();
    let _idle = handle.in_flight().acquire();
    drop(_idle);
    let run = tokio::spawn(finale.run());
    handle.trigger("test");
    handle.phase_started(finale::Phase::Drain).await;
    assert!(handle.in_flight().is_draining());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(handle.state(), State::ShuttingDown(Phase::Drain));
    guard.release();
    let report = run.await.unwrap();
    assert_eq!(report.in_flight_at_drain_start, 1);
    let wait = report
        .phase(Phase::Drain)
        .unwrap()
        .entries
        .iter()
        .find(|e| e.kind == EntryKind::InFlight)
        .unwrap();
    assert_eq!(wait.outcome, Outcome::Completed);
    assert_eq!(wait.duration, Duration::from_secs(2));
    assert!(report.to_string().contains("in flight at start: 1"));
}

#[tokio::test(start_paused = true)]
async fn readiness_is_off_during_the_drain_delay_while_serving_goes_on() {
    let finale = builder()
        .drain_delay(Duration::from_secs(5))
        .build()
        .unwrap();
    let handle = finale.handle();
    let run = tokio::spawn(finale.run());
    while handle.state() != State::Running {
        tokio::task::yield_now().await;
    }
    assert!(handle.health().is_ready());
    let t = Instant::now();
    handle.trigger("test");
    handle.phase_started(Phase::Announce).await;
    assert!(!handle.health().is_ready());
    assert!(!handle.in_flight().is_draining());
    handle.phase_started(finale::Phase::Drain).await;
    assert_eq!(t.elapsed(), Duration::from_secs(5));
    let report = run.await.unwrap();
    assert_eq!(
        report.phase(Phase::Announce).unwrap().duration,
        Duration::from_secs(5)
    );
}

#[tokio::test(start_paused = true)]
async fn the_drain_delay_ends_early_once_the_load_balancer_saw_enough_503s() {
    let finale = builder()
        .drain_delay(DrainDelay::UntilProbed {
            answers: 3,
            max: Duration::from_secs(30),
        })
        .total_budget(Duration::from_secs(60))
        .build()
        .unwrap();
    let handle = finale.handle();
    let run = tokio::spawn(finale.run());
    let health = handle.health();
    health.record_not_ready_answer(); // before the announce: not counted
    handle.trigger("test");
    handle.phase_started(Phase::Announce).await;
    let t = Instant::now();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        health.record_not_ready_answer();
    }
    handle.phase_started(finale::Phase::Drain).await;
    assert_eq!(t.elapsed(), Duration::from_secs(6));
    assert_eq!(health.not_ready_answers(), 3);
    let report = run.await.unwrap();
    assert_eq!(report.status, ShutdownStatus::Clean);
}

#[tokio::test(start_paused = true)]
async fn handle_tokens_fire_at_their_phases() {
    let finale = builder().build().unwrap();
    let handle = finale.handle();
    let token = handle.phase_token(finale::Phase::Workers);
    let drain = handle.phase_token(Phase::Drain);
    let run = tokio::spawn(finale.run());
    assert!(!handle.is_shutdown_requested());
    handle.trigger("test");
    handle.shutdown_requested().await;
    token.cancelled().await;
    assert!(drain.is_cancelled());
    let report = run.await.unwrap();
    assert_eq!(report.exit_code, 0);
    assert_eq!(handle.reason(), Some(Reason::Requested("test".into())));
}

#[tokio::test(start_paused = true)]
async fn exit_codes_can_be_remapped() {
    let finale = builder()
        .exit_codes(ExitCodes::default().with(ShutdownStatus::TelemetryNotDelivered, 0))
        .build()
        .unwrap();
    finale
        .hook(Hook::new(Phase::Telemetry, "push", |_| async {
            Err::<(), _>("refused")
        }))
        .unwrap();
    finale.handle().trigger("test");
    let report = finale.run().await;
    assert_eq!(report.status, ShutdownStatus::TelemetryNotDelivered);
    assert_eq!(report.exit_code, 0);
}

#[tokio::test]
async fn bad_registrations_are_typed_errors() {
    let finale = builder()
        .workers_timeout(Duration::from_secs(4))
        .build()
        .unwrap();
    finale
        .hook(Hook::new(Phase::Workers, "x", |_| async {}))
        .unwrap();
    assert_eq!(
        finale.hook(Hook::new(Phase::Drain, "x", |_| async {})),
        Err(ConfigError::DuplicateName { name: "x".into() })
    );
    assert_eq!(
        finale.spawn(Task::worker("x", |_| async {})),
        Err(ConfigError::DuplicateName { name: "x".into() })
    );
    assert_eq!(
        finale.hook(Hook::new(Phase::Workers, " ", |_| async {})),
        Err(ConfigError::EmptyName)
    );
    let err = finale
        .hook(Hook::new(Phase::Workers, "slow", |_| async {}).timeout(Duration::from_secs(5)))
        .unwrap_err();
    assert!(matches!(
        err,
        ConfigError::TimeoutBeyondPhase {
            phase: Phase::Workers,
            ..
        }
    ));
    assert!(err.to_string().contains("longer than the workers phase"));
    // An empty signal list is a mistake with a name: `no_signals()` says "none" on purpose.
    let err = Finale::builder()
        .read_env(false)
        .signals(&[])
        .build()
        .unwrap_err();
    assert!(matches!(err, ConfigError::NoSignalsGiven));
    let err = builder()
        .total_budget(Duration::from_secs(5))
        .telemetry_reserve(Duration::from_secs(5))
        .build()
        .unwrap_err();
    assert!(matches!(err, ConfigError::ReserveNotBelowTotal { .. }));
    let err = builder()
        .grace_period(Duration::from_secs(10))
        .build()
        .unwrap_err();
    assert!(matches!(err, ConfigError::DoesNotFit(_)));
    builder()
        .grace_period(Duration::from_secs(10))
        .on_misfit(finale::Misfit::Warn)
        .build()
        .expect("a warning only");
}

#[tokio::test(start_paused = true)]
async fn the_report_reads_as_a_timeline() {
    let finale = builder().build().unwrap();
    finale
        .spawn(Task::worker(
            "ticker",
            |ctx| async move { ctx.stopped().await },
        ))
        .unwrap();
    finale
        .hook(Hook::new(Phase::Workers, "close-db", |_| async {
            Err::<(), _>("pool gone")
        }))
        .unwrap();
    finale.handle().trigger("maintenance");
    let text = finale.run().await.to_string();
    assert!(
        text.starts_with(
            "finale: shutdown after requested: maintenance: component failure, exit code 4"
        ),
        "{text}"
    );
    for needle in [
        "announce",
        "drain",
        "workers",
        "telemetry",
        "task \"ticker\"",
        "hook \"close-db\"",
        "pool gone",
    ] {
        assert!(text.contains(needle), "{needle} missing in\n{text}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_service_sees_its_deadline() {
    let finale = builder()
        .drain_timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    let handle = finale.handle();
    finale
        .spawn(Task::service("http", |ctx| async move {
            ctx.set_ready();
            ctx.stopped().await;
            let deadline = ctx
                .handle()
                .phase_deadline(Phase::Drain)
                .expect("set before the stop");
            // Cut the stream that never ends a little before the phase deadline (finale's own
            // servers name what they cut in the report: tests/servers_http.rs).
            tokio::time::sleep_until(deadline - Duration::from_millis(100)).await;
        }))
        .unwrap();
    let t = Instant::now();
    handle.trigger("test");
    let report = finale.run().await;
    assert_eq!(t.elapsed(), Duration::from_millis(2900));
    assert_eq!(report.entry("http").unwrap().outcome, Outcome::Completed);
    assert_eq!(report.status, ShutdownStatus::Clean);
}

#[tokio::test(start_paused = true)]
async fn announce_hooks_run_before_during_and_after_the_drain_delay_by_order() {
    let finale = builder()
        .drain_delay(Duration::from_secs(5))
        .build()
        .unwrap();
    let t0 = Instant::now();
    let seen: Arc<Mutex<Vec<(&'static str, Duration)>>> = Default::default();
    for (name, order) in [("before", -1), ("during", 0), ("after", 1)] {
        let seen = seen.clone();
        finale
            .hook(
                Hook::new(Phase::Announce, name, move |_| async move {
                    seen.lock().unwrap().push((name, t0.elapsed()));
                })
                .order(order),
            )
            .unwrap();
    }
    // Started first: a service that never became ready skips the drain delay.
    let handle = finale.handle();
    let run = tokio::spawn(finale.run());
    handle.health().started().await;
    handle.trigger("test");
    let report = run.await.unwrap();
    assert_eq!(report.status, ShutdownStatus::Clean);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [
            ("before", Duration::ZERO),
            ("during", Duration::ZERO),
            ("after", Duration::from_secs(5))
        ]
    );
}

/// A buffer the log lines of one test go to.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn the_logged_report_says_finale_once() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let finale = builder().build().unwrap();
    finale.handle().trigger("test");
    finale.run().await;
    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("shutdown after"))
        .unwrap_or_else(|| panic!("no report line in\n{text}"));
    assert!(
        line.contains(" finale: shutdown after requested: test: clean"),
        "{line}"
    );
    assert!(!line.contains("finale: finale:"), "{line}");
}
