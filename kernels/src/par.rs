//! Work splitting over rayon's pool, or over a spinning [`team`](crate::team) of its threads
//! inside a decode step.
//!
//! Kernels split their *output rows* (or block rows) into a few contiguous ranges, one task per
//! pool thread. Contiguous ranges keep each thread's weight stream sequential (what the hardware
//! prefetcher wants) and make the outputs disjoint, so no synchronisation is needed. We never
//! create more tasks than threads: at batch 1 the work per layer is tens of microseconds, and
//! every extra task is scheduling overhead. Below [`MIN_TASK_BYTES`] of work per task the call
//! stays on the calling thread, since waking a worker would cost more than it saves. Work is
//! bytes read plus, for kernels bound by their instructions (the bitmap's expand, CSR's
//! gathers), that compute in bytes-equivalent ([`work_bytes`]), so a sparse layer that reads
//! few bytes but has much to compute still splits.
//! The regions run through [`crate::team::for_each_index`]: on a team when the calling thread
//! drives one (there [`task_count`] cuts finer tasks, claimed as threads come), else on rayon.
//! Running inside an outer rayon job is fine: rayon's work stealing shares the same pool, so
//! there is no nested oversubscription.

use crate::isa::Exec;
use std::mem::MaybeUninit;
use std::ops::Range;

/// Minimum work a task must do for a split to pay off, in bytes of weights streamed (kernels
/// whose instructions, not their bytes, bound them count their compute in the same unit, see
/// [`work_bytes`]). 96 KiB is about 5 µs of one core's streaming here, a few times what waking
/// a parked rayon worker costs on an idle machine, so every SmolLM2 layer splits over 2 threads
/// (the smallest, 192x576, is 216 KiB in dense bf16 and about 230 KiB of bitmap work at 50%)
/// while tiny layers stay on the calling thread. (It was 256 KiB of *bytes*: a 50%-sparse
/// bf16 bitmap 576x576 reads only 368 KiB, so it ran on one thread although its expand work
/// is that of a much larger matrix.)
pub(crate) const MIN_TASK_BYTES: usize = 96 * 1024;

/// The work of a GEMV pass in [`MIN_TASK_BYTES`] units: the bytes it reads plus
/// `compute_per_weight` bytes-equivalent for each of the `weights` it has to step over.
pub(crate) fn work_bytes(bytes: usize, weights: usize, compute_per_weight: f64) -> usize {
    bytes.saturating_add((weights as f64 * compute_per_weight) as usize)
}

/// Minimum multiply-adds per task for compute-bound kernels (GEMM) before splitting.
pub(crate) const MIN_TASK_FLOPS: usize = 256 * 1024;

/// How many tasks to split `units` work units into, given the work measured in `amount` and the
/// per-task minimum `min_per_task`.
///
/// Inside a [`team`](crate::team) (a decode step), where a region costs a few atomic
/// operations instead of a wake-up, the work is cut into up to [`TEAM_TASKS_PER_THREAD`]
/// tasks per thread of at least a quarter of the minimum: threads claim them as they come, so
/// one that starts late or streams slower takes fewer and nobody waits at the end for a fixed
/// half.
pub(crate) fn task_count(exec: Exec, units: usize, amount: usize, min_per_task: usize) -> usize {
    if !exec.parallel || units <= 1 {
        return 1;
    }
    let threads = rayon::current_num_threads();
    let (most, min) = if crate::team::driving() {
        (threads * TEAM_TASKS_PER_THREAD, (min_per_task / 4).max(1))
    } else {
        (threads, min_per_task.max(1))
    };
    most.min(amount / min).min(units).max(1)
}

/// Tasks per thread a region is cut into inside a team (see [`task_count`]). 2 and 4
/// measured alike in `bench_forward` decode (noise +-5%), 8 about 8% slower (more claims, and
/// each task restarts the prefetcher's stream); 2 keeps each thread's stream longest.
pub(crate) const TEAM_TASKS_PER_THREAD: usize = 2;

/// `tasks + 1` boundaries splitting `0..units` into near-equal contiguous ranges.
pub(crate) fn even_bounds(units: usize, tasks: usize) -> Vec<usize> {
    let tasks = tasks.clamp(1, units.max(1));
    (0..=tasks).map(|k| k * units / tasks).collect()
}

/// `tasks + 1` boundaries splitting `0..units` so each range holds about the same amount of
/// work, where `prefix[u]` is the work of units `0..u` (e.g. a CSR row pointer). Balances
/// matrices whose rows have very different non-zero counts.
pub(crate) fn weighted_bounds(prefix: &[u32], tasks: usize) -> Vec<usize> {
    let units = prefix.len().saturating_sub(1);
    let tasks = tasks.clamp(1, units.max(1));
    let total = u64::from(prefix.last().copied().unwrap_or(0));
    if total == 0 {
        return even_bounds(units, tasks);
    }
    let mut bounds = Vec::with_capacity(tasks + 1);
    bounds.push(0);
    for k in 1..tasks {
        let target = total * k as u64 / tasks as u64;
        let u = prefix
            .partition_point(|&p| u64::from(p) < target)
            .min(units);
        bounds.push(u.max(*bounds.last().unwrap_or(&0)));
    }
    bounds.push(units);
    bounds
}

/// Runs `f(unit_range, y_part)` for each range of `bounds`, where unit `u` owns
/// `y[u * unit_len ..]` up to the next unit (the last range takes the rest of `y`, which is how
/// a ragged last block row is handled). Runs inline when there is a single range.
pub(crate) fn for_each_range<F>(y: &mut [f32], unit_len: usize, bounds: &[usize], f: F)
where
    F: Fn(Range<usize>, &mut [f32]) + Sync + Send,
{
    let n = bounds.len().saturating_sub(1);
    if n <= 1 {
        let units = bounds.last().copied().unwrap_or(0);
        f(0..units, y);
        return;
    }
    let mut parts = Vec::with_capacity(n);
    let mut rest = y;
    for w in bounds.windows(2) {
        let (lo, hi) = (w[0], w[1]);
        let len = if hi == bounds[n] {
            rest.len()
        } else {
            ((hi - lo) * unit_len).min(rest.len())
        };
        let (head, tail) = rest.split_at_mut(len);
        parts.push((lo..hi, head));
        rest = tail;
    }
    crate::team::for_each_mut(&mut parts, |_, (range, part)| f(range.clone(), part));
}

/// Runs `f(unit_range)` for each range of `bounds` (inline when there is a single range). Used
/// by GEMM, whose tasks write disjoint *column* ranges of `Y` through [`SharedOut`].
pub(crate) fn for_each_bound<F>(bounds: &[usize], f: F)
where
    F: Fn(Range<usize>) + Sync + Send,
{
    let n = bounds.len().saturating_sub(1);
    if n <= 1 {
        f(0..bounds.last().copied().unwrap_or(0));
        return;
    }
    crate::team::for_each_index(n, |k| f(bounds[k]..bounds[k + 1]));
}

/// The output of a product: a caller's initialized buffer, or fresh memory (a vector's spare
/// capacity) that the product must write whole before it returns `Ok`. Kernels that write
/// every output take either as it is ([`Out::shared`]); the others ask for initialized floats
/// ([`Out::init`]), which zeroes fresh memory first. Zeroing a 128-token prefill's outputs
/// before the tokens-in-lanes GEMM overwrote them was 2.5% of the prefill.
pub(crate) enum Out<'a> {
    /// Initialized floats, overwritten.
    Init(&'a mut [f32]),
    /// Memory to be written whole.
    Fresh(&'a mut [MaybeUninit<f32>]),
}

impl<'a> Out<'a> {
    /// Elements of the buffer.
    pub(crate) fn len(&self) -> usize {
        match self {
            Out::Init(y) => y.len(),
            Out::Fresh(y) => y.len(),
        }
    }

    /// The buffer as initialized floats, fresh memory zeroed first.
    pub(crate) fn init(self) -> &'a mut [f32] {
        match self {
            Out::Init(y) => y,
            Out::Fresh(y) => {
                y.fill(MaybeUninit::new(0.0));
                // SAFETY: every element was just written; `MaybeUninit<f32>` has the layout of
                // `f32`.
                unsafe { std::slice::from_raw_parts_mut(y.as_mut_ptr().cast::<f32>(), y.len()) }
            }
        }
    }

    /// A view for tasks that between them write every element (what makes fresh memory
    /// initialized).
    pub(crate) fn shared(self) -> SharedOut {
        match self {
            Out::Init(y) => SharedOut::new(y),
            Out::Fresh(y) => SharedOut {
                ptr: y.as_mut_ptr().cast::<f32>(),
                len: y.len(),
            },
        }
    }
}

/// `len` outputs written by `product` into a new vector, without zeroing it first
/// where `product` writes every element itself (see [`Out`]).
pub(crate) fn new_output(
    len: usize,
    product: impl FnOnce(Out<'_>) -> crate::Result<()>,
) -> crate::Result<Vec<f32>> {
    let mut y: Vec<f32> = Vec::with_capacity(len);
    product(Out::Fresh(&mut y.spare_capacity_mut()[..len]))?;
    // SAFETY: a product given `Out::Fresh` writes all `len` elements before returning `Ok`
    // (directly, or after `Out::init` zeroed them); they lie within the capacity reserved above.
    unsafe { y.set_len(len) };
    Ok(y)
}

/// A raw view of an output buffer shared by GEMM tasks.
///
/// `Y` is `[tokens, rows]` row-major and tasks own disjoint *row ranges of W*, i.e. disjoint
/// column ranges of `Y`, which are not contiguous slices; hence a pointer instead of
/// `split_at_mut`. Soundness rests on every task writing only the columns of its own range,
/// which each kernel documents at its write site.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: `SharedOut` is only handed to tasks that write disjoint index sets (see above) while
// the `&mut [f32]` it came from is borrowed for the whole parallel region.
unsafe impl Send for SharedOut {}
// SAFETY: as above; no two tasks write the same index and none reads another's output.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    pub(crate) fn new(y: &mut [f32]) -> SharedOut {
        SharedOut {
            ptr: y.as_mut_ptr(),
            len: y.len(),
        }
    }

    /// Elements of the output.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Writes `v` at `i`.
    ///
    /// # Safety
    /// No other task may access index `i` during the parallel region.
    #[inline(always)]
    pub(crate) unsafe fn write(&self, i: usize, v: f32) {
        assert!(
            i < self.len,
            "SharedOut index {i} out of bounds {}",
            self.len
        );
        // SAFETY: in bounds (checked above); exclusivity is the caller's contract.
        unsafe { self.ptr.add(i).write(v) }
    }

    /// The address of the run `start..start + n`, its bounds checked, for a kernel that stores
    /// the run with vector instructions.
    ///
    /// # Safety
    /// The caller writes only within the run, and no other task may access it during the
    /// parallel region.
    #[inline(always)]
    pub(crate) unsafe fn run_ptr(&self, start: usize, n: usize) -> *mut f32 {
        assert!(
            start.checked_add(n).is_some_and(|end| end <= self.len),
            "SharedOut run {start}+{n} out of bounds {}",
            self.len
        );
        // SAFETY: start <= len (checked above), so the offset stays within the allocation.
        unsafe { self.ptr.add(start) }
    }

    /// Writes `n` values `value(0..n)` at `start..start + n`, checking the bounds once (a
    /// register tile's column, stored in a loop the compiler keeps free of checks).
    ///
    /// # Safety
    /// No other task may access indices `start..start + n` during the parallel region.
    #[inline(always)]
    pub(crate) unsafe fn write_run(&self, start: usize, n: usize, value: impl Fn(usize) -> f32) {
        assert!(
            start.checked_add(n).is_some_and(|end| end <= self.len),
            "SharedOut run {start}+{n} out of bounds {}",
            self.len
        );
        for k in 0..n {
            // SAFETY: start + k < start + n <= len (checked above); exclusivity as above.
            unsafe { self.ptr.add(start + k).write(value(k)) }
        }
    }
}
