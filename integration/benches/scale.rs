//! Scale: draining 100k in-flight guards, scheduling 10k hooks in one phase, and the memory a
//! tracked request and a hook cost.
//!
//! ```sh
//! cargo bench --bench scale
//! ```

// A bench reports on stdout; the library itself never prints.
#![allow(clippy::print_stdout)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use finale::{Finale, Hook, InFlightGuard, Phase};

fn finale() -> Finale {
    Finale::builder()
        .read_env(false)
        .no_signals()
        .environment(finale::Environment::Local)
        .build()
        .unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn bench(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("scale");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(4));

    // From releasing the last of 100k guards (held while the Drain phase started) to the end
    // of the sequence.
    group.bench_function("drain_100k_guards", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                total += rt.block_on(async {
                    let finale = finale();
                    let handle = finale.handle();
                    let in_flight = handle.in_flight();
                    let guards: Vec<InFlightGuard> =
                        (0..100_000).map(|_| in_flight.acquire()).collect();
                    let run = tokio::spawn(finale.run());
                    handle.trigger("bench");
                    handle.phase_started(finale::Phase::Drain).await;
                    let start = Instant::now();
                    drop(guards);
                    let report = run.await.unwrap();
                    let elapsed = start.elapsed();
                    assert_eq!(report.in_flight_at_drain_start, 100_000);
                    elapsed
                });
            }
            total
        })
    });

    // From the trigger to the end of a sequence with 10k trivial hooks in the Workers phase.
    group.bench_function("run_10k_hooks_in_one_phase", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                total += rt.block_on(async {
                    let finale = finale();
                    for i in 0..10_000 {
                        finale
                            .hook(Hook::new(Phase::Workers, format!("hook-{i}"), |_| async {}))
                            .unwrap();
                    }
                    let start = Instant::now();
                    finale.handle().trigger("bench");
                    let report = finale.run().await;
                    assert!(report.is_clean());
                    black_box(report);
                    start.elapsed()
                });
            }
            total
        })
    });
    group.finish();

    memory();
}

/// Resident memory growth per tracked request and per registered hook, from /proc.
fn memory() {
    let Some(before) = rss_kib() else {
        return;
    };
    let tracker = finale::InFlightTracker::new();
    let in_flight = tracker.in_flight();
    let guards: Vec<InFlightGuard> = (0..1_000_000).map(|_| in_flight.acquire()).collect();
    let after_guards = rss_kib().unwrap();
    let per_guard = (after_guards - before) as f64 * 1024.0 / 1e6;
    drop(guards);

    let rt = runtime();
    let before = rss_kib().unwrap();
    let finale = rt.block_on(async { finale() });
    for i in 0..100_000 {
        finale
            .hook(Hook::new(
                Phase::Workers,
                format!("hook-{i:06}"),
                |_| async {},
            ))
            .unwrap();
    }
    let after_hooks = rss_kib().unwrap();
    let per_hook = (after_hooks - before) as f64 * 1024.0 / 1e5;
    println!(
        "memory: {per_guard:.1} bytes per tracked request (a guard is {} bytes, no heap); \
         {per_hook:.0} bytes per registered hook (including its 11-byte name)",
        std::mem::size_of::<InFlightGuard>()
    );
    drop(finale);
}

fn rss_kib() -> Option<i64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

criterion_group!(benches, bench);
criterion_main!(benches);
