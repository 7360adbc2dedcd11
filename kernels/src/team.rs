//! A spinning team of the pool's threads for latency-bound forward passes.
//!
//! A decode step of SmolLM2 opens about 211 parallel regions (one per linear) of 5 to 60 µs
//! each. On rayon's pool every region pays a wake-up: an idle worker spins through
//! `sched_yield` calls and then sleeps on a futex, so the second half of a split starts 1 to
//! several µs late and the caller waits for it at the join (perf showed each of the 2 threads
//! about 20% of a decode step in `sched_yield`/`__schedule`). llama.cpp avoids this with a
//! thread pool whose threads spin on an atomic between the operations of one graph.
//!
//! [`with_team`] does the same for one forward pass: it asks every other thread of the
//! current rayon pool (one broadcast) to join a team and spin until the pass is over. Inside
//! it, [`for_each_index`] publishes its tasks in one atomic word and the driver and its
//! helpers claim them one at a time (self-scheduling: a helper that starts late simply claims
//! fewer, so a region ends when the work does, not when the slowest fixed half does). The
//! driver never waits for helpers to *arrive*: a helper still busy elsewhere (another job of a
//! shared pool) just does not help, and the driver runs every task itself.
//!
//! Measured on the 2-core EPYC against the rayon-only build, alternating: 16-sequence decode
//! steps (`bench_forward --batch 16`) 4-13% more tokens/s on dense bf16 and 4% on the 50%
//! bf16 bitmap; `bench serve` single-stream tokens/s 1.0-1.2x; single-token decode in
//! `bench_forward` unchanged within its noise (+-5%): there the step is bound by the weights'
//! bandwidth, which two threads barely raise on this VM (a 256 MiB read: 30 GB/s on one
//! thread, 36 on two).
//!
//! Outside a team (prefill, training, a pool of one thread) [`for_each_index`] runs on rayon
//! as before. Inside a task it runs inline, since the team is busy with the enclosing region.
//! Rayon calls made by the driver while it leads a team still work (its helpers do not steal,
//! so the driver runs those jobs itself): correct, only not parallel.

use std::any::Any;
use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, ThreadId};

use rayon::prelude::*;

/// Spins between checks after which an idle helper yields its core once: on a machine where
/// the helper shares a core with the driver (a CPU quota below the pool size), it must not
/// hold that core for a whole time slice. A few hundred µs of spinning on Zen 4.
const SPINS_BEFORE_YIELD: u32 = 1 << 14;

/// The state shared by a team's driver and helpers.
struct Shared {
    /// `epoch << 32 | total << 16 | next`: the region in progress, its task count and the next
    /// task to claim. One word, so a claim (a compare-exchange) only succeeds for the region
    /// it read, and a helper never runs a task of a region that has moved on.
    state: AtomicU64,
    /// The region's task runner (`unsafe fn(*const (), usize)`), as an address.
    call: AtomicUsize,
    /// The region's closure, on the driver's stack.
    data: AtomicPtr<()>,
    /// Tasks of the current region that have finished.
    done: AtomicU32,
    /// False once the driver's pass is over: helpers go back to the pool.
    open: AtomicBool,
    /// The driving thread (its own broadcast job must not spin for itself).
    driver: ThreadId,
    /// The first panic of a task of the current region, re-raised on the driver.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

/// The most tasks one region can have (`next` and `total` are 16 bits of `state`); a
/// [`for_each_index`] over more indices gives each task a run of them.
pub const MAX_TASKS: usize = u16::MAX as usize;

fn pack(epoch: u32, total: usize, next: usize) -> u64 {
    (u64::from(epoch) << 32) | ((total as u64) << 16) | next as u64
}

fn unpack(s: u64) -> (u32, usize, usize) {
    (
        (s >> 32) as u32,
        ((s >> 16) & 0xffff) as usize,
        (s & 0xffff) as usize,
    )
}

thread_local! {
    /// The team this thread drives, while it is outside a task.
    static DRIVING: Cell<*const Shared> = const { Cell::new(std::ptr::null()) };
    /// True while this thread runs a team task (nested regions then run inline).
    static IN_TASK: Cell<bool> = const { Cell::new(false) };
}

/// Runs `task(i)` with `IN_TASK` set, catching a panic into `shared.panic`, and counts it done.
///
/// # Safety
/// `call` and `data` must be a region's runner and closure whose region is still running
/// (the caller claimed task `i` of it, so the driver waits for this call to return).
unsafe fn run_task(shared: &Shared, call: usize, data: *const (), i: usize) {
    // SAFETY: `call` was stored from an `unsafe fn(*const (), usize)` by `Team::run`.
    let runner: unsafe fn(*const (), usize) = unsafe { std::mem::transmute(call) };
    let was = IN_TASK.with(|t| t.replace(true));
    // SAFETY: `data` is the closure `runner` was instantiated for, alive for the region.
    let result = catch_unwind(AssertUnwindSafe(|| unsafe { runner(data, i) }));
    IN_TASK.with(|t| t.set(was));
    if let Err(payload) = result
        && let Ok(mut first) = shared.panic.lock()
    {
        first.get_or_insert(payload);
    }
    shared.done.fetch_add(1, Ordering::Release);
}

/// Claims and runs one task of the region in progress, if one is left. Returns whether it did.
fn claim_and_run(shared: &Shared) -> bool {
    let s = shared.state.load(Ordering::Acquire);
    let (epoch, total, next) = unpack(s);
    if next >= total {
        return false;
    }
    // Read before claiming: a successful claim proves these are this region's values (the
    // driver replaces them only after every task of the region, including ours, is done).
    let call = shared.call.load(Ordering::Relaxed);
    let data = shared.data.load(Ordering::Relaxed) as *const ();
    if shared
        .state
        .compare_exchange_weak(
            s,
            pack(epoch, total, next + 1),
            Ordering::AcqRel,
            Ordering::Relaxed,
        )
        .is_err()
    {
        return true; // someone else claimed it (or the region moved on): look again at once
    }
    // SAFETY: task `next` of the region that `call`/`data` belong to is ours.
    unsafe { run_task(shared, call, data, next) };
    true
}

/// A helper's loop: claim tasks until the driver closes the team.
fn help(shared: &Shared) {
    let mut idle = 0u32;
    while shared.open.load(Ordering::Acquire) {
        if claim_and_run(shared) {
            idle = 0;
            continue;
        }
        idle += 1;
        if idle >= SPINS_BEFORE_YIELD {
            idle = 0;
            thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
}

/// Monomorphised task runner stored in [`Shared::call`].
///
/// # Safety
/// `data` must point at a live `F`.
unsafe fn trampoline<F: Fn(usize) + Sync>(data: *const (), i: usize) {
    // SAFETY: the caller passes the `F` this runner was instantiated for.
    let f = unsafe { &*(data as *const F) };
    f(i)
}

/// Runs one region of `n` tasks on the team `shared` (the calling thread is its driver).
fn run_region<F: Fn(usize) + Sync>(shared: &Shared, n: usize, f: &F) {
    debug_assert!(n <= MAX_TASKS);
    let (epoch, _, _) = unpack(shared.state.load(Ordering::Relaxed));
    let epoch = epoch.wrapping_add(1);
    shared.call.store(
        trampoline::<F> as unsafe fn(*const (), usize) as usize,
        Ordering::Relaxed,
    );
    shared
        .data
        .store(f as *const F as *const () as *mut (), Ordering::Relaxed);
    shared.done.store(0, Ordering::Relaxed);
    // Publishes call, data and the reset count with the new epoch.
    shared.state.store(pack(epoch, n, 0), Ordering::Release);
    while claim_and_run(shared) {}
    // Every task is claimed; wait for the helpers' ones to finish (they are running now).
    while (shared.done.load(Ordering::Acquire) as usize) < n {
        std::hint::spin_loop();
    }
    let payload = shared.panic.lock().ok().and_then(|mut p| p.take());
    if let Some(payload) = payload {
        resume_unwind(payload);
    }
}

/// Closes the team and stops routing regions to it when the driver's pass ends (or unwinds).
struct DriveGuard {
    shared: Arc<Shared>,
    previous: *const Shared,
}

impl Drop for DriveGuard {
    fn drop(&mut self) {
        self.shared.open.store(false, Ordering::Release);
        DRIVING.with(|d| d.set(self.previous));
    }
}

/// Runs `f` with the other threads of the current rayon pool spinning as its helpers, so the
/// parallel regions [`for_each_index`] opens inside cost a few atomic operations instead of
/// a wake-up each. For short passes whose regions are small (decoding a few tokens); the
/// helpers hold their cores until `f` returns.
///
/// Runs `f` alone when the pool has one thread, or when the calling thread already drives a
/// team or runs a team task. Call it from a thread of the pool (as the engine's forward passes
/// are), since the helpers are that pool's threads.
pub fn with_team<R>(f: impl FnOnce() -> R) -> R {
    let inside = IN_TASK.with(Cell::get) || !DRIVING.with(Cell::get).is_null();
    if inside || rayon::current_num_threads() < 2 || rayon::current_thread_index().is_none() {
        return f();
    }
    let shared = Arc::new(Shared {
        state: AtomicU64::new(0),
        call: AtomicUsize::new(0),
        data: AtomicPtr::new(std::ptr::null_mut()),
        done: AtomicU32::new(0),
        open: AtomicBool::new(true),
        driver: thread::current().id(),
        panic: Mutex::new(None),
    });
    let helpers = Arc::clone(&shared);
    rayon::spawn_broadcast(move |_| {
        // A thread that drives a team of its own (or runs a task) must not spin for another:
        // two drivers each helping the other would wait for each other forever.
        let busy = IN_TASK.with(Cell::get) || !DRIVING.with(Cell::get).is_null();
        if thread::current().id() != helpers.driver && !busy {
            help(&helpers);
        }
    });
    let previous = DRIVING.with(|d| d.replace(Arc::as_ptr(&shared)));
    let _guard = DriveGuard { shared, previous };
    f()
}

/// Whether the calling thread leads a team (outside a task): regions it opens are cheap, so
/// kernels may split them into more, smaller tasks.
pub fn driving() -> bool {
    !DRIVING.with(Cell::get).is_null() && !IN_TASK.with(Cell::get)
}

/// Runs `task(i)` for every `i` in `0..n`: on the calling thread's team when it drives one,
/// inline inside a team task (the team is busy with the enclosing region), else on rayon's
/// pool. Each index runs exactly once; a task's panic is re-raised here after every task
/// has finished.
pub fn for_each_index<F: Fn(usize) + Sync + Send>(n: usize, task: F) {
    if n == 0 {
        return;
    }
    if n == 1 || IN_TASK.with(Cell::get) {
        (0..n).for_each(task);
        return;
    }
    let driving = DRIVING.with(Cell::get);
    if !driving.is_null() {
        // SAFETY: `DRIVING` points into the `Arc` that `with_team`'s guard holds for as long
        // as it is set.
        let shared = unsafe { &*driving };
        // More indices than a region has tasks: each task takes a contiguous run of them.
        let tasks = n.min(MAX_TASKS);
        run_region(shared, tasks, &|k: usize| {
            (k * n / tasks..(k + 1) * n / tasks).for_each(&task)
        });
        return;
    }
    (0..n).into_par_iter().for_each(task);
}

/// Runs `task(i, &mut items[i])` for every item, in parallel as [`for_each_index`] does.
pub fn for_each_mut<T: Send, F: Fn(usize, &mut T) + Sync + Send>(items: &mut [T], task: F) {
    let base = SendPtr(items.as_mut_ptr());
    let len = items.len();
    for_each_index(len, move |i| {
        assert!(i < len);
        // SAFETY: `for_each_index` runs each index exactly once, so the `&mut` to item `i` is
        // unique; `items` stays mutably borrowed until every task has returned.
        let item = unsafe { &mut *base.get().add(i) };
        task(i, item)
    });
}

/// Runs `task(i, chunk)` for the `i`-th `chunk_len`-long chunk of `out` (the last may be
/// shorter), in parallel as [`for_each_index`] does: `par_chunks_mut` that also runs on a team.
pub fn for_each_chunk_mut<T: Send, F: Fn(usize, &mut [T]) + Sync + Send>(
    out: &mut [T],
    chunk_len: usize,
    task: F,
) {
    let mut chunks: Vec<&mut [T]> = out.chunks_mut(chunk_len.max(1)).collect();
    for_each_mut(&mut chunks, |i, chunk| task(i, chunk));
}

/// A raw pointer that may cross threads (see the safety notes where it is dereferenced).
struct SendPtr<T>(*mut T);
impl<T> Clone for SendPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SendPtr<T> {}
// SAFETY: only dereferenced at indices handed to exactly one task (see `for_each_mut`).
unsafe impl<T: Send> Send for SendPtr<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    fn get(self) -> *mut T {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("a test pool")
    }

    #[test]
    fn every_index_runs_exactly_once_in_a_team() {
        pool(3).install(|| {
            with_team(|| {
                assert!(driving());
                for n in [1usize, 2, 7, 64, 1000, MAX_TASKS + 3] {
                    let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                    for_each_index(n, |i| {
                        hits[i].fetch_add(1, Ordering::Relaxed);
                    });
                    assert!(
                        hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                        "n = {n}"
                    );
                }
            });
            assert!(!driving(), "the team ends with the pass");
        });
    }

    #[test]
    fn helpers_take_part() {
        // With tasks that take a while, a helper claims some of them (on a pool of 2 the
        // other worker joins within a wake-up; 200 tasks of ~50 µs leave it ~10 ms to come).
        pool(2).install(|| {
            with_team(|| {
                let driver = thread::current().id();
                let others = AtomicUsize::new(0);
                for_each_index(200, |_| {
                    let t = std::time::Instant::now();
                    while t.elapsed() < std::time::Duration::from_micros(50) {
                        std::hint::spin_loop();
                    }
                    if thread::current().id() != driver {
                        others.fetch_add(1, Ordering::Relaxed);
                    }
                });
                assert!(others.load(Ordering::Relaxed) > 0, "no helper ran a task");
            });
        });
    }

    #[test]
    fn nested_regions_run_inline_and_mut_items_are_disjoint() {
        pool(2).install(|| {
            with_team(|| {
                let mut rows = vec![vec![0u32; 8]; 16];
                for_each_mut(&mut rows, |i, row| {
                    assert!(!driving(), "a task does not drive");
                    for_each_mut(row, |j, v| *v = (i * 8 + j) as u32);
                });
                let flat: Vec<u32> = rows.concat();
                assert_eq!(flat, (0..128).collect::<Vec<u32>>());
            });
        });
    }

    #[test]
    fn a_task_panic_reaches_the_driver_and_the_team_still_works() {
        pool(2).install(|| {
            with_team(|| {
                let caught = catch_unwind(AssertUnwindSafe(|| {
                    for_each_index(16, |i| assert!(i != 11, "task 11 fails"));
                }));
                assert!(caught.is_err());
                let count = AtomicUsize::new(0);
                for_each_index(16, |_| {
                    count.fetch_add(1, Ordering::Relaxed);
                });
                assert_eq!(count.load(Ordering::Relaxed), 16);
            });
        });
    }

    #[test]
    fn outside_a_team_regions_use_rayon_and_one_thread_needs_no_team() {
        let sum = AtomicUsize::new(0);
        for_each_index(10, |i| {
            sum.fetch_add(i, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 45);
        pool(1).install(|| {
            with_team(|| assert!(!driving(), "a pool of one has no helpers"));
        });
    }
}
