//! In-flight tracking: a sharded counter with a `#[must_use]` guard.
//!
//! # Design
//!
//! Acquire + release must cost about one uncontended atomic operation each, take no lock, make
//! no allocation and stay cheap when many threads track requests at once. So:
//!
//! - The count is split into cache-line-padded shards; a thread always uses "its" shard (picked
//!   round-robin the first time the thread tracks anything), so two threads rarely write the
//!   same cache line.
//! - The guard holds `&'static` references instead of an `Arc`: cloning an `Arc` per request
//!   would be a second contended atomic on one shared cache line. The shards are therefore
//!   allocated once per tracker and never freed (a few hundred bytes to a few KiB per
//!   [`Finale`](crate::Finale); see [`InFlight::new`]).
//! - No waiter is registered per request. Only the drain waiter waits, and a release wakes it only
//!   once draining has started.
//!
//! # Invariants
//!
//! - A guard decrements exactly the shard it incremented, so no shard ever goes below zero and
//!   the sum over shards is the number of live guards (modulo guards created during a scan).
//! - No lost wake-up: the drain waiter sets `draining` and then reads the shards; a guard
//!   decrements its shard and then reads `draining`. All four accesses are `SeqCst`, so in every
//!   interleaving either the waiter sees the decrement (and finds zero) or the guard sees
//!   `draining` (and notifies). The waiter registers for the notification before it reads the
//!   shards, and `Notify::notify_one` stores a permit when nobody waits. The `finale_loom` model
//!   below checks this protocol.

use std::fmt;

#[cfg(not(finale_loom))]
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

#[cfg(finale_loom)]
use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Upper bound of shards; more than this buys nothing on common machines.
const MAX_SHARDS: usize = 64;

/// One padded counter. 128 bytes: adjacent-line prefetching pairs 64-byte lines on x86.
#[repr(align(128))]
struct Shard {
    count: AtomicUsize,
}

/// The counting protocol, separate from the waking so that the loom model can check it.
struct Shards {
    shards: Box<[Shard]>,
    mask: usize,
    draining: AtomicBool,
}

impl Shards {
    fn new(n: usize) -> Self {
        let n = n.clamp(1, MAX_SHARDS).next_power_of_two();
        Self {
            shards: (0..n)
                .map(|_| Shard {
                    count: AtomicUsize::new(0),
                })
                .collect(),
            mask: n - 1,
            draining: AtomicBool::new(false),
        }
    }

    fn shard(&self, thread_index: usize) -> &Shard {
        &self.shards[thread_index & self.mask]
    }

    fn increment(shard: &Shard) {
        // Relaxed is enough: the increment only has to be visible to the drain waiter's scan,
        // which happens-after it through the request's own synchronisation (or the scan just
        // misses a request that started after draining began, which the drain does not wait for).
        shard.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Decrements and returns whether the drain waiter must be woken.
    fn decrement(&self, shard: &Shard) -> bool {
        shard.count.fetch_sub(1, Ordering::SeqCst);
        self.draining.load(Ordering::SeqCst)
    }

    fn begin_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    fn sum(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.count.load(Ordering::SeqCst))
            .sum()
    }
}

struct TrackerShared {
    shards: Shards,
    zero: tokio::sync::Notify,
}

#[cfg(not(finale_loom))]
fn thread_index() -> usize {
    use std::cell::Cell;
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    thread_local! {
        static INDEX: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    INDEX.with(|i| {
        let v = i.get();
        if v != usize::MAX {
            return v;
        }
        let v = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        i.set(v);
        v
    })
}

#[cfg(finale_loom)]
fn thread_index() -> usize {
    0
}

/// Counts requests, connections or any unit of in-flight work, so that the
/// [`Drain`](crate::Phase::Drain) phase can wait until all of it has finished.
///
/// `InFlight` is `Copy`: pass it around freely. [`acquire`](InFlight::acquire) returns a guard;
/// the work counts as in flight until the guard is dropped or [`released`](InFlightGuard::release).
/// The Drain phase waits for the count to reach zero, or for its deadline.
///
/// The tower layer of the server integrations uses this tracker; use it directly for anything
/// else that must finish before the process exits (a message being handled, a file being written).
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let finale = finale::Finale::builder().build().unwrap();
/// let in_flight = finale.handle().in_flight();
/// let guard = in_flight.acquire();
/// assert_eq!(in_flight.count(), 1);
/// guard.release();
/// assert_eq!(in_flight.count(), 0);
/// # }
/// ```
#[derive(Clone, Copy)]
pub struct InFlight {
    shared: &'static TrackerShared,
}

impl InFlight {
    /// Creates a tracker.
    ///
    /// Its shards (one 128-byte counter per shard, about four per CPU, at most 64) are allocated
    /// once and **never freed**, so that guards need no reference count. Create trackers once
    /// (each [`Finale`](crate::Finale) makes one), not per request.
    pub fn new() -> Self {
        let cpus = std::thread::available_parallelism().map_or(4, |n| n.get());
        let shared = Box::new(TrackerShared {
            shards: Shards::new(cpus * 4),
            zero: tokio::sync::Notify::new(),
        });
        Self {
            shared: Box::leak(shared),
        }
    }

    /// Marks one unit of work as in flight until the returned guard is dropped.
    ///
    /// Costs one atomic increment on this thread's shard: no lock, no allocation.
    #[inline]
    pub fn acquire(&self) -> InFlightGuard {
        let shard = self.shared.shards.shard(thread_index());
        Shards::increment(shard);
        InFlightGuard {
            shard,
            shared: self.shared,
        }
    }

    /// The number of live guards.
    pub fn count(&self) -> usize {
        self.shared.shards.sum()
    }

    /// Whether the Drain phase has started waiting on this tracker. One atomic load.
    #[inline]
    pub fn is_draining(&self) -> bool {
        self.shared.shards.draining.load(Ordering::Relaxed)
    }

    /// Starts draining: from now on each release wakes [`wait_idle`](InFlight::wait_idle).
    pub(crate) fn begin_drain(&self) {
        self.shared.shards.begin_drain();
    }

    /// Waits until no guard is alive. Call [`begin_drain`](InFlight::begin_drain) first.
    pub(crate) async fn wait_idle(&self) {
        loop {
            let notified = self.shared.zero.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Default for InFlight {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for InFlight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InFlight")
            .field("count", &self.count())
            .field("draining", &self.is_draining())
            .finish()
    }
}

/// Keeps one unit of work counted as in flight; see [`InFlight`].
///
/// Dropping the guard releases it; [`release`](InFlightGuard::release) says so explicitly. The
/// guard is 16 bytes, holds no heap memory and its drop never blocks.
#[must_use = "the work counts as in flight only while the guard is alive"]
pub struct InFlightGuard {
    shard: &'static Shard,
    shared: &'static TrackerShared,
}

impl InFlightGuard {
    /// Releases the guard: the work is no longer in flight.
    #[inline]
    pub fn release(self) {
        drop(self);
    }
}

impl Drop for InFlightGuard {
    #[inline]
    fn drop(&mut self) {
        if self.shared.shards.decrement(self.shard) {
            // Draining: wake the drain waiter so it re-counts. `notify_one` keeps a permit if
            // the waiter is between its registration and its await.
            self.shared.zero.notify_one();
        }
    }
}

impl fmt::Debug for InFlightGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InFlightGuard").finish_non_exhaustive()
    }
}

#[cfg(all(test, not(finale_loom)))]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn guard_is_small() {
        assert_eq!(std::mem::size_of::<InFlightGuard>(), 16);
    }

    #[test]
    fn counts_across_threads() {
        let t = InFlight::new();
        let guards: Vec<_> = std::thread::scope(|s| {
            (0..8)
                .map(|_| s.spawn(|| (0..100).map(|_| t.acquire()).collect::<Vec<_>>()))
                .collect::<Vec<_>>()
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect()
        });
        assert_eq!(t.count(), 800);
        drop(guards);
        assert_eq!(t.count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_the_last_guard() {
        let t = InFlight::new();
        let g1 = t.acquire();
        let g2 = t.acquire();
        t.begin_drain();
        let waiter = tokio::spawn(async move { t.wait_idle().await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(g1);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        // A guard moved to another thread is released there.
        std::thread::spawn(move || drop(g2)).join().unwrap();
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("drain waiter woke")
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn drain_never_misses_the_last_release() {
        // Races releases on other threads against the waiter's scan, many times.
        for _ in 0..200 {
            let t = InFlight::new();
            let guards: Vec<_> = (0..4).map(|_| t.acquire()).collect();
            t.begin_drain();
            let releasers: Vec<_> = guards
                .into_iter()
                .map(|g| std::thread::spawn(move || drop(g)))
                .collect();
            tokio::time::timeout(Duration::from_secs(5), t.wait_idle())
                .await
                .expect("no lost wake-up");
            for r in releasers {
                r.join().unwrap();
            }
        }
    }
}

/// Model check of the counting protocol: `RUSTFLAGS="--cfg finale_loom" cargo test --lib --release loom`.
#[cfg(all(test, finale_loom))]
mod loom_model {
    use super::*;
    use loom::sync::Arc;

    #[test]
    fn release_during_drain_is_never_lost() {
        loom::model(|| {
            let shards = Arc::new(Shards::new(2));
            // Two guards on two shards, released on two threads.
            Shards::increment(shards.shard(0));
            Shards::increment(shards.shard(1));
            let handles: Vec<_> = (0..2)
                .map(|i| {
                    let shards = shards.clone();
                    loom::thread::spawn(move || shards.decrement(shards.shard(i)))
                })
                .collect();
            // The drain waiter: set `draining`, then scan.
            shards.begin_drain();
            let seen: Vec<usize> = (0..2)
                .map(|i| shards.shard(i).count.load(Ordering::SeqCst))
                .collect();
            let woke: Vec<bool> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            // Every guard the scan saw alive must wake the waiter when it is released; so a
            // scan that does not find zero is always followed by a wake-up and a re-scan.
            for i in 0..2 {
                assert!(seen[i] == 0 || woke[i], "release {i} was lost");
            }
            assert_eq!(shards.sum(), 0);
        });
    }
}
