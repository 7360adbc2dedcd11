//! The host byte budget of one plugin call, and the checked size arithmetic every host import
//! uses to book an allocation *before* making it.
//!
//! A plugin can make the host allocate in three ways: results it keeps (kernel outputs, masks,
//! uploads, handles), scratch a kernel needs while it runs (copies, histograms, group scores),
//! and buffers that only live until the call returns (the data of a `read`). All three are
//! booked here first; nothing sized by a plugin-supplied value is allocated unless the booking
//! succeeded. Sizes are computed with checked arithmetic, so a shape whose element count
//! overflows is refused instead of wrapping to a small (or zero) number.

use std::fmt;

/// Bytes charged for every live handle, on top of its data: the resource-table entry and the
/// tensor's or mask's bookkeeping. Without it a plugin could hold millions of zero-byte handles
/// (model weights share storage) and grow the table without bound.
pub const HANDLE_BYTES: usize = 256;

/// Most dimensions a plugin-made tensor or mask may have. Weights are 1-D or 2-D; a bound keeps
/// a shape list from being a cost of its own.
pub const MAX_RANK: usize = 8;

/// Why an allocation was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BudgetError {
    /// The size does not fit in memory arithmetic at all (an overflowing shape).
    Overflow(String),
    /// The booking would exceed the budget.
    Exhausted {
        /// What the bytes were for.
        what: String,
        /// Bytes asked for.
        bytes: usize,
        /// Bytes already held.
        used: usize,
        /// The limit.
        limit: usize,
    },
}

impl fmt::Display for BudgetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BudgetError::Overflow(what) => write!(f, "{what}: size overflows"),
            BudgetError::Exhausted {
                what,
                bytes,
                used,
                limit,
            } => write!(
                f,
                "host tensor budget of {} MiB exhausted: {what} needs {} more (holding {}; \
                 drop handles you no longer need, or raise [sandbox] host_memory_mb)",
                limit >> 20,
                human(*bytes),
                human(*used),
            ),
        }
    }
}

impl From<BudgetError> for String {
    fn from(e: BudgetError) -> String {
        e.to_string()
    }
}

fn human(bytes: usize) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    } else {
        format!("{bytes} B")
    }
}

/// Bytes held for a plugin, against a limit.
#[derive(Debug, Clone)]
pub struct HostBudget {
    limit: usize,
    used: usize,
    peak: usize,
}

impl HostBudget {
    /// An empty budget of `limit` bytes.
    pub fn new(limit: usize) -> Self {
        HostBudget {
            limit,
            used: 0,
            peak: 0,
        }
    }

    /// Books `bytes`, or refuses without changing anything.
    pub fn book(&mut self, bytes: usize, what: &str) -> Result<(), BudgetError> {
        match self.used.checked_add(bytes) {
            Some(total) if total <= self.limit => {
                self.used = total;
                self.peak = self.peak.max(total);
                Ok(())
            }
            _ => Err(BudgetError::Exhausted {
                what: what.to_string(),
                bytes,
                used: self.used,
                limit: self.limit,
            }),
        }
    }

    /// Returns bytes booked earlier.
    pub fn release(&mut self, bytes: usize) {
        self.used = self.used.saturating_sub(bytes);
    }

    /// Runs `f` with `bytes` of scratch booked, released when `f` returns.
    pub fn with_scratch<R>(
        &mut self,
        bytes: usize,
        what: &str,
        f: impl FnOnce() -> R,
    ) -> Result<R, BudgetError> {
        self.book(bytes, what)?;
        let r = f();
        self.release(bytes);
        Ok(r)
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used
    }

    /// The most bytes held at once.
    pub fn peak(&self) -> usize {
        self.peak
    }

    /// The limit.
    pub fn limit(&self) -> usize {
        self.limit
    }
}

/// Element count of a shape, refusing overflow and over-long shapes. The product of the
/// non-zero dimensions must fit too: candle multiplies the dimensions in both directions
/// (element count, strides) without overflow checks, so `[0, 2^32, 2^32]` and `[2^32, 2^32,
/// 0]` hold no element yet overflow there.
pub fn numel(shape: &[usize]) -> Result<usize, BudgetError> {
    if shape.len() > MAX_RANK {
        return Err(BudgetError::Overflow(format!(
            "shape {} has {} dimensions (at most {MAX_RANK})",
            short_shape(shape),
            shape.len()
        )));
    }
    let nonzero = shape
        .iter()
        .filter(|&&d| d != 0)
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| BudgetError::Overflow(format!("shape {}", short_shape(shape))))?;
    Ok(if shape.contains(&0) { 0 } else { nonzero })
}

/// `count * size` bytes, refusing overflow.
pub fn bytes_of(count: usize, size: usize, what: &str) -> Result<usize, BudgetError> {
    count
        .checked_mul(size)
        .ok_or_else(|| BudgetError::Overflow(what.to_string()))
}

/// Sums byte counts, refusing overflow.
pub fn sum(parts: &[usize], what: &str) -> Result<usize, BudgetError> {
    parts
        .iter()
        .try_fold(0usize, |acc, &p| acc.checked_add(p))
        .ok_or_else(|| BudgetError::Overflow(what.to_string()))
}

/// The NumPy broadcast of two shapes (aligned at the trailing dimension), without allocating
/// anything of the result's size.
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Result<Vec<usize>, String> {
    let rank = a.len().max(b.len());
    let mut out = vec![0; rank];
    for i in 0..rank {
        let da = if i < rank - a.len() {
            1
        } else {
            a[i - (rank - a.len())]
        };
        let db = if i < rank - b.len() {
            1
        } else {
            b[i - (rank - b.len())]
        };
        out[i] = if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            return Err(format!(
                "cannot broadcast shapes {} and {}",
                short_shape(a),
                short_shape(b)
            ));
        };
    }
    Ok(out)
}

/// A shape for messages: at most the first 8 dimensions.
pub fn short_shape(shape: &[usize]) -> String {
    if shape.len() <= MAX_RANK {
        format!("{shape:?}")
    } else {
        format!("{:?}… ({} dims)", &shape[..MAX_RANK], shape.len())
    }
}

/// Caps a Store's wasm memories and tables *together*. wasmtime's `StoreLimits` caps each
/// linear memory on its own, so a component with many core instances could hold the cap once
/// per memory; this limiter books every growth of any memory against one total.
#[derive(Debug)]
pub struct GuestLimiter {
    memory_cap: usize,
    memory: usize,
    table_cap: usize,
    table_elements: usize,
}

/// Most core instances, memories and tables one plugin Store may create. A Rust guest built by
/// the SDK has a handful of each; the bound keeps their fixed costs small.
pub const MAX_GUEST_INSTANCES: usize = 32;

/// Most table elements (function references, 8 bytes each) over all of a Store's tables.
pub const MAX_TABLE_ELEMENTS: usize = 1 << 20;

impl GuestLimiter {
    /// A limiter allowing `memory_cap` bytes of linear memory in total.
    pub fn new(memory_cap: usize) -> Self {
        GuestLimiter {
            memory_cap,
            memory: 0,
            table_cap: MAX_TABLE_ELEMENTS,
            table_elements: 0,
        }
    }

    /// Bytes of linear memory the guest holds over all its memories.
    pub fn memory(&self) -> usize {
        self.memory
    }
}

/// Adds `desired - current` to `total` if the sum stays within `cap`. A refusal is an error
/// (not `false`), which traps the guest at once: a Rust guest would otherwise abort on the
/// failed allocation with a less useful message.
fn grow_within(
    total: &mut usize,
    cap: usize,
    current: usize,
    desired: usize,
    refusal: impl FnOnce(usize) -> String,
) -> wasmtime::Result<bool> {
    let grow = desired.saturating_sub(current);
    match total.checked_add(grow) {
        Some(t) if t <= cap => {
            *total = t;
            Ok(true)
        }
        _ => Err(wasmtime::Error::msg(refusal(total.saturating_add(grow)))),
    }
}

impl wasmtime::ResourceLimiter for GuestLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let cap = self.memory_cap;
        // The wording is what the runtime recognises as a memory-limit trap.
        grow_within(&mut self.memory, cap, current, desired, |asked| {
            format!(
                "forcing trap when growing memory to {} MiB: the guest memory cap is {} MiB",
                asked >> 20,
                cap >> 20
            )
        })
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        Err(error)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let cap = self.table_cap;
        grow_within(&mut self.table_elements, cap, current, desired, |_| {
            format!("forcing trap when growing tables beyond {cap} elements")
        })
    }

    fn instances(&self) -> usize {
        MAX_GUEST_INSTANCES
    }

    fn tables(&self) -> usize {
        MAX_GUEST_INSTANCES
    }

    fn memories(&self) -> usize {
        MAX_GUEST_INSTANCES
    }
}

/// Bytes a mask of `numel` elements holds while it lives in the resource table.
pub fn mask_bytes(numel: usize) -> usize {
    numel.saturating_add(HANDLE_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn booking_refuses_beyond_the_limit_and_releases() {
        let mut b = HostBudget::new(1000);
        b.book(600, "a").unwrap();
        let e = b.book(500, "b").unwrap_err();
        assert!(matches!(
            e,
            BudgetError::Exhausted {
                bytes: 500,
                used: 600,
                ..
            }
        ));
        assert_eq!(b.used(), 600);
        b.release(600);
        b.book(1000, "c").unwrap();
        assert_eq!(b.peak(), 1000);
        // usize overflow in the sum is a refusal, not a wrap.
        assert!(b.book(usize::MAX, "d").is_err());
        assert_eq!(b.used(), 1000);
    }

    #[test]
    fn scratch_is_released_after_the_call() {
        let mut b = HostBudget::new(100);
        assert_eq!(b.with_scratch(80, "x", || 7).unwrap(), 7);
        assert_eq!(b.used(), 0);
        assert_eq!(b.peak(), 80);
        assert!(b.with_scratch(101, "y", || ()).is_err());
    }

    #[test]
    fn guest_memory_is_capped_over_all_memories() {
        use wasmtime::ResourceLimiter;
        let mut l = GuestLimiter::new(10 << 20);
        // Two memories of 6 MiB each: the second one no longer fits in the shared cap.
        assert!(l.memory_growing(0, 6 << 20, None).unwrap());
        assert!(l.memory_growing(0, 6 << 20, None).is_err());
        assert!(l.memory_growing(6 << 20, 10 << 20, None).unwrap());
        assert_eq!(l.memory(), 10 << 20);
        assert!(l.table_growing(0, MAX_TABLE_ELEMENTS, None).unwrap());
        assert!(l.table_growing(0, 1, None).is_err());
    }

    #[test]
    fn numel_refuses_overflow_and_deep_shapes() {
        assert_eq!(numel(&[3, 4]).unwrap(), 12);
        assert_eq!(numel(&[]).unwrap(), 1);
        assert_eq!(numel(&[0, usize::MAX]).unwrap(), 0);
        // 2^64 wraps to 0 in unchecked arithmetic: it must be refused.
        assert!(numel(&[1 << 32, 1 << 32]).is_err());
        assert!(numel(&[1 << 16, 1 << 16, 1 << 16, 1 << 16]).is_err());
        assert!(numel(&[1; MAX_RANK + 1]).is_err());
        // No element, but strides that overflow (found by the host_imports fuzzer).
        assert!(numel(&[0, 1 << 32, 1 << 32]).is_err());
        assert!(numel(&[1 << 32, 1 << 32, 0]).is_err());
    }

    #[test]
    fn broadcast_follows_numpy() {
        assert_eq!(broadcast_shape(&[1, 5], &[3, 1]).unwrap(), vec![3, 5]);
        assert_eq!(broadcast_shape(&[4, 5], &[5]).unwrap(), vec![4, 5]);
        assert_eq!(broadcast_shape(&[0, 5], &[1, 5]).unwrap(), vec![0, 5]);
        assert!(broadcast_shape(&[2, 5], &[3, 5]).is_err());
        // The result's size is only described, never allocated.
        let huge = broadcast_shape(&[1, 1 << 20], &[1 << 20, 1]).unwrap();
        assert_eq!(huge, vec![1 << 20, 1 << 20]);
    }
}
