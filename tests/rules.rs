//! The rules of the sequence on every path, in process: each test here failed on the code before
//! the supervisor (issue "guarantees that hold when things go wrong"). Paused tokio time where
//! the rule is about deadlines; real time, with small budgets, where a thread really blocks.
//! The same rules across real processes and real signals: tests/faults_process.rs.

use std::time::Duration;

use finale::{
    EntryKind, Finale, Hook, Outcome, Phase, PhaseOutcome, Reason, ShutdownStatus, State, Task,
};
use tokio::time::Instant;

fn builder() -> finale::Builder {
    Finale::builder()
        .read_env(false)
        .no_signals()
        .environment(finale::Environment::Local)
}

#[tokio::test(start_paused = true)]
async fn a_late_second_signal_never_runs_past_the_total_budget() {
    // Escalation budget (2.5 s) longer than the reserve (1 s): a second signal late in Workers
    // must not push the end beyond t0 + total (3 s).
    let finale = builder()
        .total_budget(Duration::from_secs(3))
        .telemetry_reserve(Duration::from_secs(1))
        .escalation_budget(Duration::from_millis(2500))
        .workers_timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    finale
        .hook(Hook::new(Phase::Workers, "slow", |_| {
            std::future::pending::<()>()
        }))
        .unwrap();
    finale
        .hook(Hook::new(Phase::Telemetry, "hung-flush", |_| {
            std::future::pending::<()>()
        }))
        .unwrap();
    let handle = finale.handle();
    let t0 = Instant::now();
    handle.trigger("test");
    let run = tokio::spawn(finale.run());
    tokio::time::sleep(Duration::from_millis(1800)).await;
    assert_eq!(handle.state(), State::ShuttingDown(Phase::Workers));
    assert!(handle.escalate());
    let report = run.await.unwrap();
    assert_eq!(t0.elapsed(), Duration::from_secs(3), "{report}");
    assert!(report.total <= Duration::from_secs(3), "{report}");
    assert_eq!(report.status, ShutdownStatus::Forced);
}

#[tokio::test(start_paused = true)]
async fn two_signals_back_to_back_still_announce_drain_and_fire_every_token() {
    let finale = builder().build().unwrap();
    let handle = finale.handle();
    // Tasks finale does not spawn, told to stop by the phase tokens.
    let external: Vec<_> = Phase::ALL
        .iter()
        .map(|&p| tokio::spawn(handle.phase_started(p)))
        .collect();
    let run = tokio::spawn(finale.run());
    handle.health().started().await;
    assert!(handle.health().is_ready());
    handle.trigger("first");
    assert!(handle.escalate());
    let report = run.await.unwrap();
    assert!(!handle.health().is_ready(), "readiness off on every path");
    assert!(
        handle.in_flight().is_draining(),
        "drain flag set on every path"
    );
    for (phase, task) in Phase::ALL.iter().zip(external) {
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .unwrap_or_else(|_| panic!("the {phase} token never fired"))
            .unwrap();
    }
    for phase in [Phase::Announce, Phase::Drain, Phase::Workers] {
        assert_eq!(report.phase(phase).unwrap().outcome, PhaseOutcome::Skipped);
    }
    assert_eq!(report.status, ShutdownStatus::Forced);
    // And a guard taken now is refused: the drain has started.
    assert!(handle.in_flight().try_acquire().is_none());
}

#[tokio::test(start_paused = true)]
async fn a_hook_closure_that_panics_before_its_future_is_isolated() {
    let finale = builder().build().unwrap();
    #[allow(unreachable_code)]
    finale
        .hook(Hook::new(Phase::Workers, "eager", |_| {
            panic!("panicked in the closure");
            async {}
        }))
        .unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    finale
        .hook(Hook::new(Phase::Telemetry, "flush", move |_| async move {
            tx.send(()).unwrap();
        }))
        .unwrap();
    finale.handle().trigger("test");
    let report = finale.run().await;
    rx.await.expect("the Telemetry phase still ran");
    assert!(
        matches!(&report.entry("eager").unwrap().outcome, Outcome::Panicked(m) if m == "panicked in the closure"),
        "{report}"
    );
    assert_eq!(report.status, ShutdownStatus::ComponentFailure);
}

#[tokio::test(start_paused = true)]
async fn a_task_closure_that_panics_before_its_future_is_isolated() {
    let finale = builder().build().unwrap();
    #[allow(unreachable_code)]
    let spawned = finale.spawn(Task::worker("eager", |_| {
        panic!("panicked in the closure");
        async {}
    }));
    assert!(
        spawned.is_ok(),
        "spawn returns; the panic is the task's outcome"
    );
    finale.handle().trigger("test");
    let report = finale.run().await;
    assert!(
        matches!(&report.entry("eager").unwrap().outcome, Outcome::Panicked(m) if m == "panicked in the closure"),
        "{report}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_start_that_failed_skips_the_drain_delay() {
    // The Kubernetes default delay is 5 s; a service that never became ready was never in the
    // load balancer's rotation, so a crash loop must not pay it.
    let finale = builder()
        .environment(finale::Environment::Kubernetes)
        .build()
        .unwrap();
    finale
        .spawn(Task::service("listener", |_| async {
            Err::<(), _>(std::io::Error::other("address already in use"))
        }))
        .unwrap();
    let t = Instant::now();
    let report = finale.run().await;
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(report.status, ShutdownStatus::StartupFailure);
    assert!(
        !report
            .phase(Phase::Announce)
            .unwrap()
            .entries
            .iter()
            .any(|e| e.kind == EntryKind::DrainDelay),
        "{report}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_critical_service_that_ends_on_its_own_requests_the_shutdown() {
    let finale = builder().build().unwrap();
    finale
        .spawn(Task::service("http", |ctx| async move {
            ctx.set_ready();
            tokio::time::sleep(Duration::from_secs(1)).await;
            // Returns Ok: the listener is gone, but nobody asked it to stop.
        }))
        .unwrap();
    let report = finale.run().await;
    assert!(
        matches!(&report.reason, Reason::TaskFailed { name, .. } if name == "http"),
        "{report}"
    );
    assert_eq!(report.status, ShutdownStatus::ComponentFailure);
}

#[tokio::test(start_paused = true)]
async fn a_non_critical_service_that_ends_turns_readiness_off() {
    let finale = builder().build().unwrap();
    let (ended_tx, ended_rx) = tokio::sync::oneshot::channel();
    finale
        .spawn(
            Task::service("admin", |ctx| async move {
                ctx.set_ready();
                let _ = ended_rx.await;
            })
            .critical(false),
        )
        .unwrap();
    let handle = finale.handle();
    let run = tokio::spawn(finale.run());
    handle.health().started().await;
    assert!(handle.health().is_ready());
    ended_tx.send(()).unwrap();
    while handle.health().is_ready() {
        tokio::task::yield_now().await;
    }
    assert!(
        !handle.is_shutdown_requested(),
        "no shutdown for a non-critical service"
    );
    handle.trigger("test");
    run.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn work_acquired_just_after_the_drain_started_is_waited_for() {
    let finale = builder().build().unwrap();
    let handle = finale.handle();
    let in_flight = handle.in_flight();
    let run = tokio::spawn(finale.run());
    handle.trigger("test");
    handle.phase_started(Phase::Drain).await;
    // Nothing was in flight at the drain's start; this arrives a moment later.
    let guard = in_flight.acquire();
    let t = Instant::now();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        drop(guard);
    });
    let report = run.await.unwrap();
    assert!(t.elapsed() >= Duration::from_secs(2), "{report}");
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
    // try_acquire refuses it instead, once draining.
    assert!(in_flight.try_acquire().is_none());
}

#[tokio::test(start_paused = true)]
async fn work_acquired_while_the_drain_ran_is_waited_for_at_its_end() {
    // A request on a connection still open, acquired after the in-flight wait saw zero while a
    // server was still draining: the phase's final check waits for it.
    let finale = builder().build().unwrap();
    let handle = finale.handle();
    let in_flight = handle.in_flight();
    finale
        .spawn(Task::service("server", move |ctx| async move {
            ctx.set_ready();
            ctx.stopped().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let guard = in_flight.acquire();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(2)).await;
                drop(guard);
            });
        }))
        .unwrap();
    let run = tokio::spawn(finale.run());
    handle.health().started().await;
    let t = Instant::now();
    handle.trigger("test");
    let report = run.await.unwrap();
    assert!(t.elapsed() >= Duration::from_secs(3), "{report}");
    assert!(report.entry("in-flight work (late)").is_some(), "{report}");
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_that_blocks_past_its_timeout_is_reported_as_overrun() {
    let finale = builder().build().unwrap();
    finale
        .hook(
            Hook::new(Phase::Workers, "blocking", |_| async {
                std::thread::sleep(Duration::from_millis(300));
            })
            .timeout(Duration::from_millis(50)),
        )
        .unwrap();
    finale.handle().trigger("test");
    let report = finale.run().await;
    assert_eq!(report.entry("blocking").unwrap().outcome, Outcome::Overran);
    assert_eq!(
        report.phase(Phase::Workers).unwrap().outcome,
        PhaseOutcome::DeadlineReached
    );
    assert_eq!(report.status, ShutdownStatus::DeadlineOverrun, "{report}");
}

#[tokio::test(flavor = "current_thread")]
async fn a_run_that_ends_after_its_total_budget_is_never_clean() {
    // The Telemetry hook blocks the only thread until 50 ms past the total: the sequence ends
    // late, before the supervisor's checkpoint (250 ms later), and says so.
    let total = Duration::from_millis(1500);
    let finale = builder()
        .total_budget(total)
        .telemetry_reserve(Duration::from_secs(1))
        .escalation_budget(Duration::from_millis(500))
        .build()
        .unwrap();
    let t0 = std::time::Instant::now();
    finale
        .hook(Hook::new(
            Phase::Telemetry,
            "blocking-flush",
            move |_| async move {
                std::thread::sleep(
                    (t0 + total + Duration::from_millis(50)) - std::time::Instant::now(),
                );
            },
        ))
        .unwrap();
    finale.handle().trigger("test");
    let report = finale.run().await;
    assert!(report.over_budget, "{report}");
    assert_eq!(report.status, ShutdownStatus::DeadlineOverrun, "{report}");
    assert!(
        report.to_string().contains("over its total budget"),
        "{report}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_telemetry_hook_that_hangs_to_the_deadline_is_not_delivered_not_overrun() {
    // The Telemetry phase ends at exactly t0 + total: that is its deadline kept, not overrun.
    let finale = builder().build().unwrap();
    finale
        .hook(Hook::new(Phase::Telemetry, "hung-flush", |_| {
            std::future::pending::<()>()
        }))
        .unwrap();
    finale.handle().trigger("test");
    let report = finale.run().await;
    assert!(!report.over_budget, "{report}");
    assert_eq!(
        report.status,
        ShutdownStatus::TelemetryNotDelivered,
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_escalation_as_a_phase_starts_abandons_it() {
    // A task told by the Drain token escalates at once, on another worker: it may land between
    // the sequence's check and the phase's first wait. The phase is abandoned either way, well
    // before its own timeout (and before the supervisor would take over).
    for _ in 0..50 {
        let finale = builder()
            .total_budget(Duration::from_secs(20))
            .drain_timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        finale
            .hook(Hook::new(Phase::Drain, "endless", |_| {
                std::future::pending::<()>()
            }))
            .unwrap();
        let handle = finale.handle();
        let escalator = {
            let handle = handle.clone();
            tokio::spawn(async move {
                handle.phase_started(Phase::Drain).await;
                handle.escalate();
            })
        };
        handle.trigger("test");
        let started = std::time::Instant::now();
        let report = finale.run().await;
        escalator.await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(2), "{report}");
        assert_eq!(report.status, ShutdownStatus::Forced, "{report}");
    }
}
