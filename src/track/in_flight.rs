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
//!   therefore never freed: they are **pooled**. A slot is returned to its tracker's free list
//!   when its thread exits and reused by the next new thread (128 bytes each); a tracker is
//!   returned to the process-wide pool when its owner is dropped and reused by the next new
//!   tracker once nothing counts in it any more (see "Lifetime").
//! - No waiter is registered per request. Only the drain waiter waits.
//!
//! # Lifetime: owner, generations, the pool
//!
//! - A tracker has one owner, an [`InFlightTracker`] (each `Finale`'s state holds one). An
//!   [`InFlight`] is a `Copy` handle: the tracker's address and the *generation* it was handed
//!   out for. The tracker's `state` word holds its current generation and the draining bit.
//! - Dropping the owner *retires* the tracker: its generation moves on, so every handle of the
//!   old generation is stale from then on. A stale handle counts nowhere: `acquire` returns a
//!   guard counted in [`SINK`] (a tracker nobody drains), `try_acquire` refuses, `count` reads 0
//!   and `is_draining` reads `true`. Guards taken before the retirement stay counted in the
//!   tracker until they are released.
//! - The retired tracker goes to the pool. [`InFlightTracker::new`] reuses a retired tracker once
//!   **two scans, in two different calls**, both read zero; otherwise it allocates a new one. A
//!   reused tracker keeps its slots and its monotonic counters as they are (at zero, they count
//!   on from where they stand), so every thread's slot-table entry for it stays valid. Memory is
//!   bounded by the number of trackers alive at once, plus retired ones that still hold live
//!   guards or wait for their second scan, not by how many were ever created.
//!
//! # Invariants
//!
//! - Each slot has one writer at a time (its thread; the free list's mutex hands it over).
//! - The scan reads every `released` (Acquire) before any `acquired`. A release is stored with
//!   Release ordering after the guard travelled from the acquiring thread, so the scan that sees a
//!   release also sees its acquisition: the count never goes below the number of live guards
//!   the scan could observe, and never reads zero while one of them is alive. The test
//!   `scan_model_every_interleaving` checks every interleaving of a migrating guard with the scan.
//! - Wake-ups: a release that sees the draining bit notifies the drain waiter. A release racing
//!   with the start of the drain may miss it (its store and the flag's load are not ordered, on
//!   purpose: ordering them would cost the fence we avoid), so the waiter also re-scans every
//!   [`RESCAN`]. The common case wakes at once; the rare race costs at most one period.
//! - A handle counts into its tracker only while the tracker's generation is the handle's:
//!   checked before the acquisition's store and again after it (a compiler fence keeps the
//!   re-check after the store). An acquisition whose re-check sees the retirement undoes itself
//!   (a release in its own slot) and returns a `SINK` guard. One whose re-check still saw its
//!   generation came before the retirement; its store is at most in the core's store buffer at
//!   that moment (a context switch drains it), which is why the pool wants two scans at zero, as
//!   the drain does: the second sees any guard the first missed, so **a tracker with a live
//!   guard is never reused**. `retire_model_every_interleaving` checks this against every
//!   interleaving, preemption and late store, and shows that one scan, or no re-check, fails.
//! - An undone acquisition may land in a tracker that was just reused (a stale handle preempted
//!   between its check and its store): it is an acquisition and a release in one slot, so the new
//!   owner may count one more for that instant, never fewer, and the release's wake-up at most
//!   makes the drain waiter scan again. Likewise a release that reads the draining bit after its
//!   tracker was reused costs the next owner at most one spurious wake-up, and a `record_panic`
//!   racing the retirement may count one panic in the next owner's report.
//! - The hot-path helpers are `#[inline]`: they cross the crate boundary into the servers and
//!   the user's code, and out-of-line calls for the generation check doubled the guard's cost.
//! - Nothing is ever freed, so every `&'static` stays valid: no unsafe code.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering, compiler_fence};
use std::time::Duration;

/// How often the drain waiter re-scans in case a release raced with the start of the drain.
const RESCAN: Duration = Duration::from_millis(1);

/// The draining bit of [`TrackerShared::state`]; the generation is the rest, shifted by one.
const DRAINING: u64 = 1;

/// The state word of `generation`, live and not draining.
#[inline]
const fn live(generation: u64) -> u64 {
    generation << 1
}

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
fn live_guards(c: &impl Counters) -> usize {
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
    /// Index of this tracker in each thread's slot table; the same for every generation.
    id: usize,
    /// `generation << 1 | DRAINING`. Read on every acquisition and release; written only when
    /// the drain starts and when the owner goes.
    state: AtomicU64,
    /// Every slot ever handed out; only the scan and new threads lock it.
    slots: Mutex<Vec<&'static Slot>>,
    /// Slots whose thread exited, ready for the next thread.
    free: Mutex<Vec<&'static Slot>>,
    /// Acquisitions and releases made where a thread's slot table is gone (during thread-local
    /// destruction): shared counters, read-modify-write, rare.
    orphans_acquired: AtomicU64,
    orphans_released: AtomicU64,
    /// Requests whose handler panicked (counted by the server integrations).
    panicked: AtomicU64,
    /// `generation + 1` once the owner's shutdown is announced (0: never): a response answered
    /// from then on closes its HTTP/1 connection, whoever admitted it. A reused tracker's new
    /// generation does not match an old mark.
    announced: AtomicU64,
    /// The drain waiter is parked and wants one wake-up; the first release that sees it takes it.
    waiting: AtomicBool,
    zero: tokio::sync::Notify,
}

/// Where the guards of stale handles count: a tracker that is never drained, never retired and
/// never read. Counting there keeps the guard's release path the same for every guard.
static SINK: TrackerShared = TrackerShared::new(usize::MAX);

impl TrackerShared {
    const fn new(id: usize) -> Self {
        Self {
            id,
            state: AtomicU64::new(live(0)),
            slots: Mutex::new(Vec::new()),
            free: Mutex::new(Vec::new()),
            orphans_acquired: AtomicU64::new(0),
            orphans_released: AtomicU64::new(0),
            panicked: AtomicU64::new(0),
            announced: AtomicU64::new(0),
            waiting: AtomicBool::new(false),
            zero: tokio::sync::Notify::const_new(),
        }
    }

    #[inline]
    fn generation(&self) -> u64 {
        self.state.load(Ordering::Relaxed) >> 1
    }

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
        live_guards(&Scan {
            slots: &slots,
            orphans_acquired: &self.orphans_acquired,
            orphans_released: &self.orphans_released,
        })
    }

    /// Counts one guard in this thread's slot; the caller has checked the generation.
    #[inline]
    fn count_guard(&'static self) -> InFlightGuard {
        if !with_slot(self, Slot::acquire) {
            self.orphans_acquired.fetch_add(1, Ordering::AcqRel);
        }
        InFlightGuard { shared: self }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Undoes an acquisition that the re-check refused (retired, or draining for `try_acquire`):
/// a release in this thread's own slot. Out of line, so that the hot path stays small.
#[cold]
#[inline(never)]
fn undo(guard: InFlightGuard) {
    drop(guard);
}

/// A guard of a stale handle: counted in [`SINK`].
#[cold]
#[inline(never)]
fn detached() -> InFlightGuard {
    SINK.count_guard()
}

/// The process-wide pool of trackers. Nothing is ever removed from `allocated`'s count: a
/// tracker, once allocated, lives in use or here.
struct Pool {
    /// Retired trackers, each with whether the previous scan found it idle.
    retired: Vec<(&'static TrackerShared, bool)>,
    /// Trackers allocated so far.
    allocated: usize,
}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    retired: Vec::new(),
    allocated: 0,
});

/// Ids of allocated trackers (each thread's slot table is keyed by them).
static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

/// A retired tracker that two scans in two calls found idle, or a new one.
fn reuse_or_allocate() -> &'static TrackerShared {
    let mut pool = lock(&POOL);
    let mut reused = None;
    // Every retired tracker is scanned, so each gets its first scan as early as possible.
    pool.retired.retain_mut(|(tracker, idle_before)| {
        let idle = tracker.count() == 0;
        if idle && *idle_before && reused.is_none() {
            reused = Some(*tracker);
            return false;
        }
        *idle_before = idle;
        true
    });
    if let Some(tracker) = reused {
        // Its state already holds the new generation (set at retirement), not draining.
        tracker.panicked.store(0, Ordering::Relaxed);
        tracker.waiting.store(false, Ordering::Relaxed);
        return tracker;
    }
    pool.allocated += 1;
    drop(pool);
    Box::leak(Box::new(TrackerShared::new(
        NEXT_ID.fetch_add(1, Ordering::Relaxed),
    )))
}

/// How many trackers this process has allocated (in use or pooled).
#[cfg(test)]
pub(crate) fn allocated_trackers() -> usize {
    lock(&POOL).allocated
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
/// `InFlight` is a `Copy` handle: pass it around freely. [`acquire`](InFlight::acquire) returns a
/// guard; the work counts as in flight until the guard is dropped or
/// [`released`](InFlightGuard::release). The Drain phase waits for the count to reach zero, or for
/// its deadline.
///
/// The tower layer of the server integrations uses this tracker; use it directly for anything
/// else that must finish before the process exits (a message being handled, a file being written).
///
/// A handle counts while its owner lives: the [`Finale`](crate::Finale)'s state (alive as long as
/// the `Finale` or one of its [`Handle`](crate::Handle)s is), or the [`InFlightTracker`] it came
/// from. Once the owner is gone the handle is *retired*: [`acquire`](InFlight::acquire) returns a
/// guard that counts nowhere, [`try_acquire`](InFlight::try_acquire) refuses,
/// [`count`](InFlight::count) is 0 and [`is_draining`](InFlight::is_draining) is `true`.
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
    generation: u64,
}

impl InFlight {
    /// Marks one unit of work as in flight until the returned guard is dropped.
    ///
    /// Costs a load and a store on this thread's own counter, plus two loads of the tracker's
    /// read-mostly state: no read-modify-write, no lock, no allocation (after the thread's first
    /// use of the tracker).
    #[inline]
    pub fn acquire(&self) -> InFlightGuard {
        let shared = self.shared;
        if shared.generation() != self.generation {
            return detached();
        }
        let guard = shared.count_guard();
        // The re-check must not move above the store (see the module's invariants).
        compiler_fence(Ordering::SeqCst);
        if shared.generation() != self.generation {
            undo(guard);
            return detached();
        }
        guard
    }

    /// Like [`acquire`](InFlight::acquire), but refuses new work once the Drain phase has
    /// started (or the tracker's owner is gone): `None` then. Use it where work can be turned
    /// away (a message left on its queue, a request answered `503`), so nothing starts that the
    /// drain would have to wait for.
    ///
    /// The guard is taken before the check, so work that passes the check was counted first.
    /// Neither side fences (that would cost the hot path), so the memory model alone does not
    /// order this store against the drain's scan; what closes the gap is the drain's second
    /// scan (see `wait_idle`): a guard that missed the first scan from a store buffer is seen by
    /// the second, and the Drain phase waits for it.
    #[inline]
    pub fn try_acquire(&self) -> Option<InFlightGuard> {
        let shared = self.shared;
        let open = live(self.generation);
        if shared.state.load(Ordering::Relaxed) != open {
            return None;
        }
        let guard = shared.count_guard();
        compiler_fence(Ordering::SeqCst);
        if shared.state.load(Ordering::Relaxed) != open {
            undo(guard);
            return None;
        }
        Some(guard)
    }

    /// The number of live guards; 0 once the owner is gone. Takes a lock and reads every
    /// thread's counters: not for the hot path.
    pub fn count(&self) -> usize {
        if self.is_retired() {
            return 0;
        }
        let n = self.shared.count();
        // Retired (and perhaps reused) during the scan: the scan may have read the next
        // generation's counters.
        if self.is_retired() { 0 } else { n }
    }

    /// Whether the Drain phase has started waiting on this tracker (or its owner is gone). One
    /// atomic load.
    #[inline]
    pub fn is_draining(&self) -> bool {
        self.shared.state.load(Ordering::Relaxed) != live(self.generation)
    }

    /// Whether the owner is gone.
    #[inline]
    fn is_retired(&self) -> bool {
        self.shared.generation() != self.generation
    }

    /// Counts a request whose handler panicked (the server answered 500 and kept serving).
    #[cfg_attr(not(feature = "tower"), allow(dead_code))]
    pub(crate) fn record_panic(&self) {
        if !self.is_retired() {
            self.shared.panicked.fetch_add(1, Ordering::Relaxed);
        }
        metrics::counter!(crate::report::names::metric::REQUEST_PANICS.name).increment(1);
    }

    /// How many requests panicked.
    pub(crate) fn panicked(&self) -> u64 {
        if self.is_retired() {
            return 0;
        }
        self.shared.panicked.load(Ordering::Relaxed)
    }

    /// Marks the owner's shutdown announced (the Announce phase started). One way: nothing
    /// unmarks it.
    pub(crate) fn announce(&self) {
        self.shared
            .announced
            .store(self.generation.wrapping_add(1), Ordering::Relaxed);
    }

    /// Whether the owner's shutdown is announced (or its drain started). One atomic load.
    #[inline]
    #[cfg_attr(not(feature = "tower"), allow(dead_code))]
    pub(crate) fn is_announced(&self) -> bool {
        self.shared.announced.load(Ordering::Relaxed) == self.generation.wrapping_add(1)
    }

    /// Starts draining: from now on releases wake [`wait_idle`](InFlight::wait_idle). Does
    /// nothing once the owner is gone.
    pub(crate) fn begin_drain(&self) {
        let open = live(self.generation);
        let _ = self.shared.state.compare_exchange(
            open,
            open | DRAINING,
            Ordering::SeqCst,
            Ordering::Relaxed,
        );
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

impl fmt::Debug for InFlight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InFlight")
            .field("count", &self.count())
            .field("draining", &self.is_draining())
            .field("retired", &self.is_retired())
            .finish()
    }
}

/// Owns an in-flight tracker outside a [`Finale`](crate::Finale) (each `Finale` has one of its
/// own, reached through [`Handle::in_flight`](crate::Handle::in_flight)).
///
/// Hand out its [`InFlight`] handles; they count for as long as the owner lives. Dropping it
/// retires them (see [`InFlight`]) and returns the tracker to a process-wide pool: the next
/// `InFlightTracker` (or `Finale`) reuses it once its last guard is released, so building one
/// per test or per run costs no memory for good.
///
/// # Examples
///
/// ```
/// let tracker = finale::InFlightTracker::new();
/// let in_flight = tracker.in_flight();
/// let guard = in_flight.acquire();
/// assert_eq!(in_flight.count(), 1);
/// drop(guard);
/// drop(tracker); // retires every handle
/// assert!(in_flight.try_acquire().is_none());
/// assert_eq!(in_flight.count(), 0);
/// ```
pub struct InFlightTracker {
    in_flight: InFlight,
}

impl InFlightTracker {
    /// A tracker: a retired one from the pool whose work is all released, or a new one.
    ///
    /// The tracker and its per-thread slots (128 bytes for each thread that tracks work, reused
    /// after the thread exits) are never freed, so that guards need no reference count; they are
    /// reused instead, so memory stays bounded by the number of trackers alive at once. Create
    /// trackers once per service or test, not per request: this takes a process-wide lock.
    pub fn new() -> Self {
        let shared = reuse_or_allocate();
        Self {
            in_flight: InFlight {
                shared,
                generation: shared.generation(),
            },
        }
    }

    /// A handle that counts into this tracker while it lives.
    pub fn in_flight(&self) -> InFlight {
        self.in_flight
    }
}

impl Default for InFlightTracker {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for InFlightTracker {
    fn drop(&mut self) {
        let InFlight { shared, generation } = self.in_flight;
        // Every handle of this generation is stale from here on; the next owner gets the next.
        shared.state.store(live(generation + 1), Ordering::SeqCst);
        lock(&POOL).retired.push((shared, false));
    }
}

impl fmt::Debug for InFlightTracker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("InFlightTracker")
            .field(&self.in_flight)
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
        if shared.state.load(Ordering::Relaxed) & DRAINING != 0
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
        let tracker = InFlightTracker::new();
        let t = tracker.in_flight();
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
        let trackers = [(); 3].map(|()| InFlightTracker::new());
        let [a, b, c] = [0, 1, 2].map(|i| trackers[i].in_flight());
        let ga = a.acquire();
        let gb = (b.acquire(), b.acquire());
        let gc = c.acquire();
        assert_eq!((a.count(), b.count(), c.count()), (1, 2, 1));
        drop((ga, gb, gc));
        assert_eq!((a.count(), b.count(), c.count()), (0, 0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_the_last_guard() {
        let tracker = InFlightTracker::new();
        let t = tracker.in_flight();
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
            let tracker = InFlightTracker::new();
            let t = tracker.in_flight();
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
                let seen = live_guards(&model);
                assert!(
                    (1..=2).contains(&seen),
                    "acquire before load {acquire_before}, release before load {release_before}: saw {seen}"
                );
                checked += 1;
            }
        }
        assert_eq!(checked, 28);
    }

    #[test]
    fn a_retired_handle_counts_nowhere() {
        let tracker = InFlightTracker::new();
        let t = tracker.in_flight();
        let kept = t.acquire();
        drop(tracker);
        assert!(t.is_draining());
        assert!(t.try_acquire().is_none());
        assert_eq!(t.count(), 0);
        // A guard of a stale handle is counted in the sink, not in the retired tracker.
        let stale = t.acquire();
        assert!(std::ptr::eq(stale.shared, &SINK));
        assert_eq!(
            kept.shared.count(),
            1,
            "only the guard taken while the owner lived"
        );
        drop((kept, stale));
        assert_eq!(t.shared.count(), 0);
        // Whoever reuses the tracker gets the next generation: the old handle stays stale.
        let next = reuse_until(t.shared);
        assert!(!next.in_flight().is_draining());
        assert!(t.is_draining());
        assert!(t.try_acquire().is_none());
        let g = next.in_flight().acquire();
        assert_eq!((next.in_flight().count(), t.count()), (1, 0));
        drop(g);
    }

    /// Builds trackers until one of them is `shared` (each `new` scans the pool once).
    fn reuse_until(shared: &'static TrackerShared) -> InFlightTracker {
        let mut others = Vec::new();
        for _ in 0..64 {
            let t = InFlightTracker::new();
            if std::ptr::eq(t.in_flight.shared, shared) {
                return t;
            }
            others.push(t);
        }
        panic!("the retired tracker was never reused");
    }

    #[test]
    fn a_tracker_with_a_live_guard_is_never_reused() {
        let tracker = InFlightTracker::new();
        let shared = tracker.in_flight.shared;
        let guard = tracker.in_flight().acquire();
        drop(tracker);
        // Many scans while the guard lives, on a thread other than the one that will release it.
        let reused = std::thread::spawn(|| {
            (0..100)
                .map(|_| InFlightTracker::new())
                .any(|t| std::ptr::eq(t.in_flight.shared, shared))
        })
        .join()
        .unwrap();
        assert!(!reused);
        std::thread::spawn(move || drop(guard)).join().unwrap();
        // Released: two scans later it is reused, its counts at zero, its panics forgotten.
        let next = reuse_until(shared);
        assert_eq!(next.in_flight().count(), 0);
        assert_eq!(next.in_flight().panicked(), 0);
    }

    #[test]
    fn building_and_dropping_10_000_trackers_allocates_a_bounded_number() {
        let before = allocated_trackers();
        for _ in 0..10_000 {
            let tracker = InFlightTracker::new();
            let in_flight = tracker.in_flight();
            let guard = in_flight.acquire();
            in_flight.begin_drain();
            // Released on another thread than the one that acquired it, as tasks migrate.
            std::thread::scope(|s| {
                s.spawn(move || drop(guard));
            });
            assert_eq!(in_flight.count(), 0);
        }
        let grown = allocated_trackers() - before;
        // One in use and one waiting for its second scan; the rest is slack for tests that run
        // at the same time in this process (cargo test runs them on threads).
        assert!(
            grown <= 16,
            "{grown} trackers allocated for 10 000 built one after another"
        );
    }

    #[test]
    fn building_and_dropping_10_000_finales_allocates_a_bounded_number_of_trackers() {
        let before = allocated_trackers();
        for _ in 0..10_000 {
            let finale = crate::Finale::builder()
                .read_env(false)
                .no_signals()
                .build()
                .unwrap();
            drop(finale.handle().in_flight().acquire());
        }
        let grown = allocated_trackers() - before;
        assert!(grown <= 16, "{grown} trackers allocated for 10 000 finales");
    }

    /// A stale handle's acquisition (A) against its tracker's retirement and the pool's scans
    /// (R), in every interleaving, with A preempted anywhere and its store visible late: the
    /// tracker is never reused while A holds a guard counted in it. The store-buffer assumption
    /// the drain also rests on bounds the late store: issued before the first scan, it is visible
    /// by the second. One scan only, or no re-check after the store, fails this.
    #[test]
    fn retire_model_every_interleaving() {
        #[derive(Clone, Copy, PartialEq, Debug)]
        enum Ev {
            /// A: the generation check before the store.
            Check,
            /// A: the store of `acquired` (into the store buffer).
            Store,
            /// A's store becomes visible to other cores.
            Visible,
            /// A: the re-check after the store (may run before `Visible`).
            Recheck,
            /// A: the undo's release, if the re-check saw the retirement.
            Undo,
            /// R: the owner's drop moves the generation on.
            Retire,
            /// R: a pool scan (the count at one instant; the scan's own order is the other model).
            Scan1,
            Scan2,
        }
        use Ev::*;

        /// Runs one interleaving; returns whether the tracker was reused while A kept a guard
        /// counted in it, and the final count.
        fn run(order: &[Ev], two_scans: bool, recheck: bool) -> (bool, i64) {
            let (mut generation, mut acquired_visible, mut released_visible) = (0, 0, 0);
            let (mut stale, mut stored, mut visible) = (false, false, false);
            let (mut undo, mut undone, mut kept) = (false, false, false);
            let mut scans = Vec::new();
            for ev in order {
                match ev {
                    Check => stale = generation != 0,
                    Store if !stale => stored = true,
                    Visible if stored => {
                        visible = true;
                        acquired_visible += 1;
                        // A release stored before the acquisition was visible: it is ordered
                        // after it (Release), so it shows with it.
                        if undone {
                            released_visible += 1;
                        }
                    }
                    Recheck if stored => {
                        if recheck && generation != 0 {
                            undo = true;
                        } else {
                            kept = true;
                        }
                    }
                    Undo if undo => {
                        undone = true;
                        if visible {
                            released_visible += 1;
                        }
                    }
                    Retire => generation = 1,
                    Scan1 | Scan2 => scans.push(acquired_visible - released_visible),
                    _ => {}
                }
            }
            let idle = |n: &i64| *n == 0;
            let reused = if two_scans {
                scans.iter().all(idle)
            } else {
                idle(&scans[0])
            };
            (reused && kept, acquired_visible - released_visible)
        }

        fn permutations(rest: &mut Vec<Ev>, order: &mut Vec<Ev>, out: &mut Vec<Vec<Ev>>) {
            if rest.is_empty() {
                out.push(order.clone());
                return;
            }
            for i in 0..rest.len() {
                let ev = rest.remove(i);
                order.push(ev);
                permutations(rest, order, out);
                order.pop();
                rest.insert(i, ev);
            }
        }
        let mut all = Vec::new();
        permutations(
            &mut vec![Check, Store, Visible, Recheck, Undo, Retire, Scan1, Scan2],
            &mut Vec::new(),
            &mut all,
        );
        let pos = |order: &[Ev], ev: Ev| order.iter().position(|e| *e == ev).unwrap();
        let orders: Vec<_> = all
            .into_iter()
            .filter(|o| {
                let p = |ev| pos(o, ev);
                // Program order on each side; a store is visible after it is issued.
                p(Check) < p(Store)
                    && p(Store) < p(Recheck)
                    && p(Recheck) < p(Undo)
                    && p(Store) < p(Visible)
                    && p(Retire) < p(Scan1)
                    && p(Scan1) < p(Scan2)
                    // The store-buffer bound: issued before the first scan, visible by the second.
                    && (p(Store) > p(Scan1) || p(Visible) < p(Scan2))
            })
            .collect();
        let violations = |two_scans, recheck| {
            orders
                .iter()
                .filter(|o| run(o, two_scans, recheck).0)
                .count()
        };
        assert_eq!(violations(true, true), 0, "two scans and the re-check");
        assert!(violations(false, true) > 0, "one scan is not enough");
        assert!(violations(true, false) > 0, "the re-check is needed");
        // An undone acquisition leaves the count where it was.
        for o in &orders {
            let (_, end) = run(o, true, true);
            assert!((0..=1).contains(&end), "{o:?}: {end}");
        }
        assert!(orders.len() > 100, "{}", orders.len());
    }
}
