//! In-flight tracking on the hot path: acquire + release of one unit of work, at 1, 2 and 4
//! threads, against what users would pick instead, in the same run.
//!
//! ```sh
//! cargo bench --bench in_flight
//! python3 scripts/bench_ratios.py in_flight   # ratios against finale's guard
//! ```
//!
//! Each sample runs N threads that each do `iters` operations on one shared instance, released
//! together by a barrier; the time per iteration is the wall time of the slowest thread divided
//! by `iters`, so contention shows up directly.

use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

const THREADS: [usize; 3] = [1, 2, 4];

/// Runs `op` `iters` times on each of `threads` threads and returns the wall time.
fn contended<S: Sync>(threads: usize, iters: u64, shared: &S, op: impl Fn(&S) + Sync) -> Duration {
    let barrier = Barrier::new(threads + 1);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                barrier.wait();
                for _ in 0..iters {
                    op(shared);
                }
            });
        }
        barrier.wait();
        let start = Instant::now();
        // Leaving the scope joins every thread.
        start
    })
    .elapsed()
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("in_flight");
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();

    let in_flight_tracker = finale::InFlightTracker::new();
    let in_flight = in_flight_tracker.in_flight();
    let tracker = tokio_util::task::TaskTracker::new();
    let token = tokio_util::sync::CancellationToken::new();
    let graceful = runtime.block_on(async { tokio_graceful::Shutdown::no_signal() });
    let graceful_guard = graceful.guard();
    let tgs_token = tgs_subsystem_token(&runtime);

    for threads in THREADS {
        group.bench_with_input(
            BenchmarkId::new("finale_guard", threads),
            &threads,
            |b, &t| {
                b.iter_custom(|iters| {
                    contended(t, iters, &in_flight, |f| drop(black_box(f.acquire())))
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("tokio_util_task_tracker_token", threads),
            &threads,
            |b, &t| {
                b.iter_custom(|iters| {
                    contended(t, iters, &tracker, |tt| drop(black_box(tt.token())))
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("tokio_util_cancellation_token_clone", threads),
            &threads,
            |b, &t| {
                b.iter_custom(|iters| contended(t, iters, &token, |ct| drop(black_box(ct.clone()))))
            },
        );
        group.bench_with_input(
            BenchmarkId::new("tokio_graceful_guard_clone", threads),
            &threads,
            |b, &t| {
                b.iter_custom(|iters| {
                    contended(t, iters, &graceful_guard, |g| drop(black_box(g.clone())))
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("tokio_graceful_shutdown_request_token", threads),
            &threads,
            |b, &t| {
                b.iter_custom(|iters| {
                    contended(t, iters, &tgs_token, |ct| drop(black_box(ct.child_token())))
                })
            },
        );
    }
    group.finish();
    drop(graceful_guard);
    runtime.block_on(async move {
        let _ = graceful.shutdown_with_limit(Duration::from_secs(1)).await;
    });
}

/// tokio-graceful-shutdown's per-request pattern is `SubsystemHandle::create_cancellation_token`,
/// which is `child_token()` of the subsystem's token. Get that token from a real subsystem.
fn tgs_subsystem_token(runtime: &tokio::runtime::Runtime) -> tokio_util::sync::CancellationToken {
    use tokio_graceful_shutdown::{SubsystemBuilder, SubsystemHandle, Toplevel};
    let (tx, rx) = std::sync::mpsc::channel();
    runtime.spawn(async move {
        let _ = Toplevel::new(async move |s: &mut SubsystemHandle| {
            s.start(SubsystemBuilder::new(
                "server",
                async move |sub: &mut SubsystemHandle| {
                    tx.send(sub.create_cancellation_token()).unwrap();
                    sub.on_shutdown_requested().await;
                    Ok::<(), std::io::Error>(())
                },
            ));
        })
        .handle_shutdown_requests(Duration::from_secs(1))
        .await;
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("subsystem started")
}

criterion_group!(benches, bench);
criterion_main!(benches);
