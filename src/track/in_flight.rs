//! In-flight tracking: per-thread single-writer counters with a `#[must_use]` guard.
//!
//! # Design
//!
//! Acquire + release must cost about one uncontended atomic operation, take no lock, make no
//! allocation and stay cheap when many threads track requests at once. A shared counter (even a
//! sharded one) needs two read-modify-write instructions per request, and those serialise the
//! cores that share a cache line. So:
//!
//! - Every thread that tracks work gets its own [`Slot`] per tracker: two monotonic counters,
//!   `acquired` and `released`, written **only by that thread**. An update is therefore a plain
//!   load and a plain store (no `lock` prefix on x86, no exclusive pair on ARM), on a cache line no
//!   other thread writes.
//! - A guard is released on whichever thread drops it, into *that* thread's slot: tasks migrate
//!   between workers, so acquisitions and releases of one request often land in different slots.
//!   The live count is `Σ acquired − Σ released`.
//! - The guard holds a `&'static` reference instead of an `Arc`: cloning an `Arc` per request
//!   would be a contended read-modify-write on one shared cache line. Trackers and slots are
//!   allocated once and never freed; a slot is returned to its tracker's free list when its
//!   thread exits and reused by the next new thread, so memory stays bounded by the largest
//!   number of threads that tracked work at the same time (128 bytes each).
//! - No waiter is registered per request. Only the drain waiter waits.
//!
//! # Invariants
//!
//! - Each slot has one writer at a time (its thread; the free list's mutex hands it over).
//! - The scan reads every `released` (Acquire) before any `acquired`. A release is stored with
//!   Release ordering after the guard travelled from the acquiring thread, so the scan that sees a
//!   release also sees its acquisition: the count never goes below the number of live guards
//!   the scan could observe, and never reads zero while one of them is alive. The test
//!   `scan_model_every_interleaving` checks every interleaving of a migrating guard with the scan.
//! - Wake-ups: a release that sees `draining` notifies the drain waiter. A release racing with
//!   the start of the drain may miss it (its store and the flag's load are not ordered, on
//!   purpose: ordering them would cost the fence we avoid), so the waiter also re-scans every
//!   [`RESCAN`]. The common case wakes at once; the rare race costs at most one period.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// How often the drain waiter re-scans in case a release raced with the start of the drain.
const RESCAN: Duration = Duration::from_millis(1);

/// One thread's counters for one tracker. 128 bytes: adjacent-line prefetching pairs 64-byte
/// lines on x86, so a neighbour's writes would still disturb a 64-byte slot.
#[repr(align(128))]
struct Slot {
    acquired: AtomicU64,
    released: AtomicU64,
}

impl Slot {
    fn new() -> Self {
        Self {
            acquired: AtomicU64::new(0),
            released: AtomicU64::new(0),
        }
    }

    /// Single writer: a plain load and store, no read-modify-write.
    #[inline]
    fn acquire(&self) {
        let n = self.acquired.load(Ordering::Relaxed);
        self.acquired.store(n.wrapping_add(1), Ordering::Relaxed);
    }

    /// Single writer. Release: whoever sees this release also sees the acquisition that
    /// happened before the guard reached this thread.
    #[inline]
    fn release(&self) {
        let n = self.released.load(Ordering::Relaxed);
        self.released.store(n.wrapping_add(1), Ordering::Release);
    }
}

/// Read access to a set of per-thread counters, so that the scan can be model-checked.
trait Counters {
    fn len(&self) -> usize;
    fn released(&self, i: usize) -> u64;
    fn acquired(&self, i: usize) -> u64;
}

/// Counts live guards: reads **all releases first, then all acquisitions**. Any release the scan
/// sees happened after its acquisition (the guard travelled from the acquiring thread, and the
/// release is stored with Release ordering, read with Acquire), so reading it first guarantees
/// the acquisition is seen too: the count never drops below the guards still alive.
fn live(c: &impl Counters) -> usize {
    let released = (0..c.len()).fold(0u64, |sum, i| sum.wrapping_add(c.released(i)));
    let acquired = (0..c.len()).fold(0u64, |sum, i| sum.wrapping_add(c.acquired(i)));
    // Wrapping arithmetic on monotonic counters; a guard acquired after the `released` pass is
    // counted as live, which only errs on the safe side.
    acquired.wrapping_sub(released) as usize
}

/// The slots of a tracker plus its orphan counters (index `slots.len()`).
struct Scan<'a> {
    slots: &'a [&'static Slot],
    orphans_acquired: &'a AtomicU64,
    orphans_released: &'a AtomicU64,
}

impl Counters for Scan<'_> {
    fn len(&self) -> usize {
        self.slots.len() + 1
    }

    fn released(&self, i: usize) -> u64 {
        match self.slots.get(i) {
            Some(s) => s.released.load(Ordering::Acquire),
            None => self.orphans_released.load(Ordering::Acquire),
        }
    }

    fn acquired(&self, i: usize) -> u64 {
        match self.slots.get(i) {
            Some(s) => s.acquired.load(Ordering::Acquire),
            None => self.orphans_acquired.load(Ordering::Acquire),
        }
    }
}

struct TrackerShared {
    /// Index of this tracker in each thread's slot table.
    id: usize,
    /// Every slot ever handed out; only the scan and new threads lock it.
    slots: Mutex<Vec<&'static Slot>>,
    /// Slots whose thread exited, ready for the next thread.
    free: Mutex<Vec<&'static Slot>>,
    /// Acquisitions and releases made where a thread's slot table is gone (during thread-local
    /// destruction): shared counters, read-modify-write, rare.
    orphans_acquired: AtomicU64,
    orphans_released: AtomicU64,
    draining: AtomicBool,
    /// Requests whose handler panicked (counted by the server integrations).
    panicked: AtomicU64,
    /// The drain waiter is parked and wants one wake-up; the first release that sees it takes it.
    waiting: AtomicBool,
    zero: tokio::sync::Notify,
}

impl TrackerShared {
    fn new_slot(&'static self) -> &'static Slot {
        if let Some(slot) = lock(&self.free).pop() {
            return slot;
        }
        let slot: &'static Slot = Box::leak(Box::new(Slot::new()));
        lock(&self.slots).push(slot);
        slot
    }

    fn count(&self) -> usize {
        let slots = lock(&self.slots);
        live(&Scan {
            slots: &slots,
            orphans_acquired: &self.orphans_acquired,
            orphans_released: &self.orphans_released,
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// This thread's slots, by tracker id. The most recently used one sits in `fast`.
struct LocalSlots {
    fast: Cell<Option<(usize, &'static Slot)>>,
    all: RefCell<Vec<(usize, &'static Slot, &'static TrackerShared)>>,
}

impl Drop for LocalSlots {
    fn drop(&mut self) {
        // The thread is exiting: hand its slots to the next new thread. Their counts stay; the
        // next owner goes on counting from them.
        for (_, slot, owner) in self.all.borrow_mut().drain(..) {
            lock(&owner.free).push(slot);
        }
    }
}

thread_local! {
    static LOCAL: LocalSlots = const {
        LocalSlots {
            fast: Cell::new(None),
            all: RefCell::new(Vec::new()),
        }
    };
}

/// Runs `f` on this thread's slot for `tracker`, or returns `false` if the thread's slot table is
/// already destroyed.
#[inline]
fn with_slot(tracker: &'static TrackerShared, f: impl FnOnce(&Slot)) -> bool {
    LOCAL
        .try_with(|local| {
            if let Some((id, slot)) = local.fast.get()
                && id == tracker.id
            {
                return f(slot);
            }
            slow_slot(local, tracker, f);
        })
        .is_ok()
}

#[cold]
fn slow_slot(local: &LocalSlots, tracker: &'static TrackerShared, f: impl FnOnce(&Slot)) {
    let mut all = local.all.borrow_mut();
    // Most recently used last, so a thread that moved on to a new tracker (tests and benches
    // build one per run) finds it at once.
    let slot = match all.iter().rposition(|(id, ..)| *id == tracker.id) {
        Some(i) => all[i].1,
        None => {
            let slot = tracker.new_slot();
            all.push((tracker.id, slot, tracker));
            slot
        }
    };
    drop(all);
    local.fast.set(Some((tracker.id, slot)));
    f(slot)
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
    /// The tracker and its per-thread slots (128 bytes for each thread that tracks work, reused
    /// after the thread exits) are allocated once and **never freed**, so that guards need no
    /// reference count. Create trackers once (each [`Finale`](crate::Finale) makes one), not per
    /// request.
    pub fn new() -> Self {
        static NEXT_ID: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let shared = Box::new(TrackerShared {
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            slots: Mutex::new(Vec::new()),
            free: Mutex::new(Vec::new()),
            orphans_acquired: AtomicU64::new(0),
            orphans_released: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            panicked: AtomicU64::new(0),
            waiting: AtomicBool::new(false),
            zero: tokio::sync::Notify::new(),
        });
        Self {
            shared: Box::leak(shared),
        }
    }

    /// Marks one unit of work as in flight until the returned guard is dropped.
    ///
    /// Costs a load and a store on this thread's own counter: no read-modify-write, no lock, no
    /// allocation (after the thread's first use of the tracker).
    #[inline]
    pub fn acquire(&self) -> InFlightGuard {
        if !with_slot(self.shared, Slot::acquire) {
            self.shared.orphans_acquired.fetch_add(1, Ordering::AcqRel);
        }
        InFlightGuard {
            shared: self.shared,
        }
    }

    /// Like [`acquire`](InFlight::acquire), but refuses new work once the Drain phase has
    /// started: `None` then. Use it where work can be turned away (a message left on its queue, a
    /// request answered `503`), so nothing starts that the drain would have to wait for.
    ///
    /// The guard is taken before the check, so work that passes the check was counted first.
    /// Neither side fences (that would cost the hot path), so the memory model alone does not
    /// order this store against the drain's scan; what closes the gap is the drain's second
    /// scan (see `wait_idle`): a guard that missed the first scan from a store buffer is seen by
    /// the second, and the Drain phase waits for it.
    #[inline]
    pub fn try_acquire(&self) -> Option<InFlightGuard> {
        let guard = self.acquire();
        if self.is_draining() {
            drop(guard);
            return None;
        }
        Some(guard)
    }

    /// The number of live guards. Takes a lock and reads every thread's counters: not for the
    /// hot path.
    pub fn count(&self) -> usize {
        self.shared.count()
    }

    /// Whether the Drain phase has started waiting on this tracker. One atomic load.
    #[inline]
    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(Ordering::Relaxed)
    }

    /// Counts a request whose handler panicked (the server answered 500 and kept serving).
    #[cfg_attr(not(feature = "tower"), allow(dead_code))]
    pub(crate) fn record_panic(&self) {
        self.shared.panicked.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(crate::report::names::REQUEST_PANICS).increment(1);
    }

    /// How many requests panicked.
    pub(crate) fn panicked(&self) -> u64 {
        self.shared.panicked.load(Ordering::Relaxed)
    }

    /// Starts draining: from now on releases wake [`wait_idle`](InFlight::wait_idle).
    pub(crate) fn begin_drain(&self) {
        self.shared.draining.store(true, Ordering::SeqCst);
    }

    /// Waits until no guard is alive. Call [`begin_drain`](InFlight::begin_drain) first.
    ///
    /// Zero must be seen on two scans with a yield between them: a guard acquired on another
    /// core just as the drain started may still sit in that core's store buffer during the first
    /// scan (its store and our load of it are not ordered, on purpose: ordering them would cost
    /// the acquirer a fence). A store buffer drains in nanoseconds; by the second scan it is
    /// visible. Work acquired later than that is waited for by the sequence's final check of the
    /// Drain phase.
    pub(crate) async fn wait_idle(&self) {
        loop {
            self.wait_zero().await;
            tokio::task::yield_now().await;
            if self.count() == 0 {
                return;
            }
        }
    }

    async fn wait_zero(&self) {
        loop {
            let notified = self.shared.zero.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            self.shared.waiting.store(true, Ordering::SeqCst);
            if self.count() == 0 {
                return;
            }
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep(RESCAN) => {}
            }
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
/// guard is one pointer, holds no heap memory and its drop never blocks.
#[must_use = "the work counts as in flight only while the guard is alive"]
pub struct InFlightGuard {
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
        let shared = self.shared;
        if !with_slot(shared, Slot::release) {
            shared.orphans_released.fetch_add(1, Ordering::AcqRel);
        }
        // Draining and the waiter is parked: wake it once so it re-counts. Only the first
        // release after each park pays for the wake-up; the rest see `waiting == false` with a
        // plain load. `notify_one` keeps a permit if the waiter is between its registration and
        // its await.
        if shared.draining.load(Ordering::Relaxed)
            && shared.waiting.load(Ordering::Relaxed)
            && shared.waiting.swap(false, Ordering::AcqRel)
        {
            shared.zero.notify_one();
        }
    }
}

impl fmt::Debug for InFlightGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InFlightGuard").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_is_one_pointer() {
        assert_eq!(
            std::mem::size_of::<InFlightGuard>(),
            std::mem::size_of::<usize>()
        );
    }

    #[test]
    fn counts_across_threads_and_reuses_slots() {
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
        // Released on another thread than they were acquired on.
        std::thread::spawn(move || drop(guards)).join().unwrap();
        assert_eq!(t.count(), 0);
        let slots = lock(&t.shared.slots).len();
        // New threads reuse the slots of exited ones.
        for _ in 0..4 {
            std::thread::spawn(move || drop(t.acquire()))
                .join()
                .unwrap();
        }
        assert_eq!(lock(&t.shared.slots).len(), slots);
        assert_eq!(t.count(), 0);
    }

    #[test]
    fn two_trackers_on_one_thread_stay_apart() {
        let (a, b, c) = (InFlight::new(), InFlight::new(), InFlight::new());
        let ga = a.acquire();
        let gb = (b.acquire(), b.acquire());
        let gc = c.acquire();
        assert_eq!((a.count(), b.count(), c.count()), (1, 2, 1));
        drop((ga, gb, gc));
        assert_eq!((a.count(), b.count(), c.count()), (0, 0, 0));
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

    /// The scan interleaved with a guard that is acquired on thread A and released on thread B,
    /// while another guard (G0) stays alive: every placement of the two events between the scan's
    /// loads. The scan must always see G0 and never count the release without its acquisition.
    /// (Reading acquisitions first fails this: it can see B's release but not A's acquisition.)
    #[test]
    fn scan_model_every_interleaving() {
        use std::cell::Cell;

        struct Model {
            acquired: [Cell<u64>; 3],
            released: [Cell<u64>; 3],
            loads: Cell<usize>,
            acquire_before: usize,
            release_before: usize,
        }
        impl Model {
            fn step(&self) {
                let k = self.loads.get();
                if k == self.acquire_before {
                    self.acquired[0].set(self.acquired[0].get() + 1); // A acquires G1
                }
                if k == self.release_before {
                    self.released[1].set(self.released[1].get() + 1); // B releases G1
                }
                self.loads.set(k + 1);
            }
        }
        impl Counters for Model {
            fn len(&self) -> usize {
                3
            }
            fn released(&self, i: usize) -> u64 {
                self.step();
                self.released[i].get()
            }
            fn acquired(&self, i: usize) -> u64 {
                self.step();
                self.acquired[i].get()
            }
        }

        let loads = 6;
        let mut checked = 0;
        // The release comes after the acquisition (the guard travels from A to B).
        for acquire_before in 0..=loads {
            for release_before in acquire_before..=loads {
                let model = Model {
                    acquired: [Cell::new(0), Cell::new(0), Cell::new(1)], // G0 on thread C
                    released: Default::default(),
                    loads: Cell::new(0),
                    acquire_before,
                    release_before,
                };
                let seen = live(&model);
                assert!(
                    (1..=2).contains(&seen),
                    "acquire before load {acquire_before}, release before load {release_before}: saw {seen}"
                );
                checked += 1;
            }
        }
        assert_eq!(checked, 28);
    }
}
