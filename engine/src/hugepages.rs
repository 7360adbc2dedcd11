//! The process allocator of the `espalier` binary (and the engine's benchmarks): large buffers
//! on transparent huge pages, scratch buffers reused instead of mapped afresh.
//!
//! Decoding streams every weight matrix once per token, so its speed is the memory bandwidth
//! the GEMV kernels reach. On 4 KiB pages a 540 MB model spans ~130k pages: the TLB misses on
//! every page and the hardware prefetchers stop at every page boundary. Linux backs memory
//! with 2 MiB pages when asked (`MADV_HUGEPAGE`; most distributions, Debian included, set
//! transparent huge pages to `madvise`, so nothing is backed that way unless asked), but only
//! for a region asked *before* it is first touched, and glibc's `malloc` never asks.
//!
//! [`HugePageAlloc`] therefore serves every allocation of at least [`THRESHOLD`] bytes from its
//! own anonymous mapping, 2 MiB aligned, its length rounded up to whole 2 MiB pages, advised
//! `MADV_HUGEPAGE` before anything is written to it, and unmapped when freed; everything
//! smaller goes to the system allocator unchanged. Weight matrices, packed sparse arrays and
//! KV caches are all above the threshold; per-token scratch vectors are below it. Rounding up
//! costs at most one partly used huge page per large buffer, in exchange for every byte of the
//! buffer being on huge pages.
//!
//! A forward pass frees and asks again for the same large scratch buffers many times per token
//! (a 16-sequence step's logits are 3 MiB; a batched prefill's activations several MiB): a
//! fresh mapping each time costs three system calls, a fault and the kernel zeroing each huge
//! page. Freed mappings of up to [`CACHE_ENTRY_MAX`] bytes are therefore kept, up to
//! [`CACHE_SLOTS`] of them and [`CACHE_BYTES`] in all, and handed to the next request of the
//! same mapped length (zeroed by a pass over it when `alloc_zeroed` asks). Weights and KV
//! caches above that size are unmapped when freed, as before.
//!
//! Below the threshold glibc's `malloc` serves; by default it maps buffers from 128 KiB up
//! afresh (the threshold then adapts upward) and returns freed heap tops to the kernel, so a
//! 128-token prefill spent about a quarter of its time in page faults and zeroing of its
//! per-op buffers (`perf`: `clear_page_erms`, `do_anonymous_page`). [`HugePageAlloc::configure`]
//! fixes glibc's mapping threshold at [`THRESHOLD`] and its trim threshold at
//! [`CACHE_BYTES`], so those buffers are reused from the heap.
//!
//! `ESPALIER_HUGE_PAGES=0` in the environment turns it off (everything goes to the system
//! allocator), for a same-run comparison and for systems where it does not pay.
//! [`HugePageAlloc::configure`] reads that once, first thing in `main`: which path served a
//! buffer is decided from its layout and that flag, so the flag must not change while any large
//! buffer is alive.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// Buffers of at least this many bytes get their own huge-page mapping.
pub const THRESHOLD: usize = 1 << 20;
/// The huge page size on x86-64 and (with 4 KiB base pages) aarch64 Linux.
const HUGE_PAGE: usize = 2 << 20;
/// The base page size (the alignment mremap keeps).
const PAGE: usize = 4096;

/// Largest freed mapping kept for reuse: per-step scratch, not weights.
pub const CACHE_ENTRY_MAX: usize = 16 << 20;
/// Freed mappings kept at most.
pub const CACHE_SLOTS: usize = 16;
/// Bytes of freed mappings kept at most (and glibc's trim threshold).
pub const CACHE_BYTES: usize = 64 << 20;

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Freed mappings kept for reuse: `(address, mapped length)`, address 0 for an empty slot. A
/// fixed array behind a futex mutex: the allocator must not allocate.
static CACHE: Mutex<[(usize, usize); CACHE_SLOTS]> = Mutex::new([(0, 0); CACHE_SLOTS]);

/// Takes a kept mapping of exactly `len` bytes, if there is one.
fn cache_take(len: usize) -> Option<*mut u8> {
    let mut slots = CACHE.lock().ok()?;
    let slot = slots.iter_mut().find(|(at, l)| *at != 0 && *l == len)?;
    let at = std::mem::take(slot).0;
    Some(at as *mut u8)
}

/// Keeps a freed mapping for reuse when it is small enough and there is room; false when the
/// caller must unmap it.
fn cache_put(at: *mut u8, len: usize) -> bool {
    if len > CACHE_ENTRY_MAX {
        return false;
    }
    let Ok(mut slots) = CACHE.lock() else {
        return false;
    };
    let held: usize = slots.iter().filter(|(a, _)| *a != 0).map(|(_, l)| l).sum();
    if held + len > CACHE_BYTES {
        return false;
    }
    match slots.iter_mut().find(|(a, _)| *a == 0) {
        Some(slot) => {
            *slot = (at as usize, len);
            true
        }
        None => false,
    }
}

/// See the module documentation.
pub struct HugePageAlloc;

impl HugePageAlloc {
    /// Reads `ESPALIER_HUGE_PAGES` (`0`, `off`, `false` or `no` turn huge pages off). Call it
    /// before any large allocation: `main`'s first statement.
    pub fn configure() {
        // `var_os` allocates only small buffers, which never take the huge-page path.
        let off = std::env::var_os("ESPALIER_HUGE_PAGES").is_some_and(|v| {
            matches!(
                v.to_str().map(str::to_ascii_lowercase).as_deref(),
                Some("0" | "off" | "false" | "no")
            )
        });
        ENABLED.store(!off, Ordering::Relaxed);
        #[cfg(target_env = "gnu")]
        // SAFETY: mallopt only sets glibc's tuning parameters; it is called before any other
        // thread exists. A refusal (returns 0) leaves glibc's defaults, which are only slower.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, THRESHOLD as libc::c_int);
            libc::mallopt(libc::M_TRIM_THRESHOLD, CACHE_BYTES as libc::c_int);
        }
    }

    /// Whether huge pages are on for this process.
    pub fn enabled() -> bool {
        ENABLED.load(Ordering::Relaxed)
    }

    /// The mapping length for `layout` when it takes the huge-page path, `None` when the system
    /// allocator serves it.
    fn mapped_len(layout: Layout) -> Option<usize> {
        if !Self::enabled() || layout.size() < THRESHOLD || layout.align() > HUGE_PAGE {
            return None;
        }
        layout.size().checked_next_multiple_of(HUGE_PAGE)
    }

    /// A fresh zeroed mapping of `len` bytes (a multiple of [`HUGE_PAGE`]) that starts on a
    /// huge-page boundary, advised as huge before it is touched; null when the kernel refuses.
    unsafe fn map(len: usize) -> *mut u8 {
        // Map one huge page more than needed, then cut the unaligned head and the tail off so
        // the kept part starts on a 2 MiB boundary (mmap only promises 4 KiB alignment).
        let Some(span) = len.checked_add(HUGE_PAGE) else {
            return ptr::null_mut();
        };
        // SAFETY: an anonymous private mapping at an address of the kernel's choosing.
        let raw = unsafe {
            libc::mmap(
                ptr::null_mut(),
                span,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return ptr::null_mut();
        }
        let start = raw as usize;
        let aligned = start.next_multiple_of(HUGE_PAGE);
        let head = aligned - start;
        let tail = span - head - len;
        // SAFETY: both ranges lie inside the mapping just made and are page aligned (mmap
        // returns page-aligned addresses, and `len` and `HUGE_PAGE` are page multiples).
        unsafe {
            if head > 0 {
                libc::munmap(raw, head);
            }
            if tail > 0 {
                libc::munmap((aligned + len) as *mut libc::c_void, tail);
            }
            // Advice only: when the kernel has huge pages off, the mapping still works on small
            // pages, so the result is deliberately not checked.
            libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
        }
        aligned as *mut u8
    }
}

// SAFETY: every pointer handed out is either the system allocator's (and returned to it with
// the caller's layout) or a fresh mapping of at least `layout.size()` bytes aligned to 2 MiB
// (≥ any alignment routed there), unmapped with the same length it was mapped with, since
// `mapped_len` depends only on the layout and the flag that never changes after `configure`.
unsafe impl GlobalAlloc for HugePageAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match Self::mapped_len(layout) {
            Some(len) => match cache_take(len) {
                Some(p) => p,
                // SAFETY: `len` is a non-zero multiple of the huge page size.
                None => unsafe { Self::map(len) },
            },
            // SAFETY: forwarded with the caller's layout.
            None => unsafe { System.alloc(layout) },
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match Self::mapped_len(layout) {
            Some(len) => match cache_take(len) {
                // A kept mapping holds its last user's bytes: zero what is asked for.
                // SAFETY: the mapping is `len >= layout.size()` bytes, owned by no one else.
                Some(p) => unsafe {
                    ptr::write_bytes(p, 0, layout.size());
                    p
                },
                // Fresh anonymous memory is already zero: no pass over it, no page touched.
                // SAFETY: as in `alloc`.
                None => unsafe { Self::map(len) },
            },
            // SAFETY: forwarded with the caller's layout.
            None => unsafe { System.alloc_zeroed(layout) },
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        match Self::mapped_len(layout) {
            // SAFETY: `ptr` came from `map(len)` (or the cache, which holds such mappings) with
            // this same length; kept or unmapped, the caller never touches it again.
            Some(len) => {
                if !cache_put(ptr, len) {
                    unsafe {
                        libc::munmap(ptr.cast(), len);
                    }
                }
            }
            // SAFETY: `ptr` came from the system allocator with this layout.
            None => unsafe { System.dealloc(ptr, layout) },
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees `new_size` with `layout.align()` forms a valid layout.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (Self::mapped_len(layout), Self::mapped_len(new_layout)) {
            // Small to small: the system allocator may grow in place.
            // SAFETY: forwarded with the caller's arguments.
            (None, None) => unsafe { System.realloc(ptr, layout, new_size) },
            // Within the same mapping: nothing to move.
            (Some(old), Some(new)) if old == new => ptr,
            // Mapping to mapping (a KV cache or a vector growing): the kernel moves the pages
            // instead of copying and zeroing them; the advice travels with the mapping. A
            // 2 MiB-multiple mapping is placed on a huge-page boundary by the kernel (Linux
            // aligns anonymous mappings of at least one huge page since 6.7); where it is
            // not, the buffer is still correct, on small pages. mremap promises page alignment
            // only, so larger alignments take the copying path below.
            (Some(old), Some(new)) if layout.align() <= PAGE => {
                // SAFETY: `ptr` is a mapping of exactly `old` bytes made by `map`; on success
                // the old range is gone and the new one holds its bytes.
                let moved = unsafe { libc::mremap(ptr.cast(), old, new, libc::MREMAP_MAYMOVE) };
                if moved == libc::MAP_FAILED {
                    ptr::null_mut()
                } else {
                    moved.cast()
                }
            }
            _ => {
                // SAFETY: a new block for the new layout, the common prefix copied, the old
                // block freed by the path that served it.
                unsafe {
                    let fresh = self.alloc(new_layout);
                    if !fresh.is_null() {
                        ptr::copy_nonoverlapping(ptr, fresh, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                    fresh
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The binary installs the allocator; the tests call it directly, with huge pages on (the
    /// default; no test turns them off).
    fn roundtrip(size: usize, align: usize) {
        let layout = Layout::from_size_align(size, align).unwrap();
        unsafe {
            let p = HugePageAlloc.alloc_zeroed(layout);
            assert!(!p.is_null());
            assert_eq!(p as usize % align, 0);
            if size >= THRESHOLD {
                assert_eq!(
                    p as usize % HUGE_PAGE,
                    0,
                    "large buffers start on a huge page"
                );
            }
            let bytes = std::slice::from_raw_parts_mut(p, size);
            assert!(bytes.iter().all(|&b| b == 0), "alloc_zeroed gives zeros");
            for (i, b) in bytes.iter_mut().enumerate() {
                *b = (i % 251) as u8;
            }
            // Grow across the threshold and the page rounding, then shrink back below it:
            // every move keeps the common prefix.
            let grown = HugePageAlloc.realloc(p, layout, size * 3 + 17);
            assert!(!grown.is_null());
            let kept = std::slice::from_raw_parts(grown, size);
            assert!(kept.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
            let grown_layout = Layout::from_size_align(size * 3 + 17, align).unwrap();
            let small = HugePageAlloc.realloc(grown, grown_layout, 1000.min(size));
            assert!(!small.is_null());
            let kept = std::slice::from_raw_parts(small, 1000.min(size));
            assert!(kept.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
            HugePageAlloc.dealloc(
                small,
                Layout::from_size_align(1000.min(size), align).unwrap(),
            );
        }
    }

    #[test]
    fn small_and_large_buffers_keep_their_bytes_through_realloc() {
        roundtrip(100, 8);
        roundtrip(THRESHOLD - 1, 16);
        roundtrip(THRESHOLD, 4);
        roundtrip(HUGE_PAGE + 4096 + 3, 64);
        roundtrip(5 * HUGE_PAGE, 4096);
    }

    #[test]
    fn freed_scratch_mappings_are_reused_and_zeroed_again() {
        // A mapped length no other test uses (14 MiB), so the cache slot is this test's.
        let layout = Layout::from_size_align(13 * (1 << 20) + 1, 8).unwrap();
        unsafe {
            let p = HugePageAlloc.alloc_zeroed(layout);
            assert!(!p.is_null());
            ptr::write_bytes(p, 0xA5, layout.size());
            HugePageAlloc.dealloc(p, layout);
            let q = HugePageAlloc.alloc_zeroed(layout);
            assert_eq!(q, p, "the freed mapping is handed out again");
            let bytes = std::slice::from_raw_parts(q, layout.size());
            assert!(bytes.iter().all(|&b| b == 0), "a reused mapping is zeroed");
            HugePageAlloc.dealloc(q, layout);
            // Too large to keep: unmapped, never handed out from the cache.
            let big = Layout::from_size_align(CACHE_ENTRY_MAX + 1, 8).unwrap();
            let b = HugePageAlloc.alloc(big);
            HugePageAlloc.dealloc(b, big);
            assert!(cache_take(CACHE_ENTRY_MAX + HUGE_PAGE).is_none());
        }
    }

    #[test]
    fn large_buffers_are_advised_as_huge_pages() {
        let layout = Layout::from_size_align(3 * HUGE_PAGE, 4).unwrap();
        unsafe {
            let p = HugePageAlloc.alloc(layout);
            assert!(!p.is_null());
            ptr::write_bytes(p, 1, layout.size());
            // The kernel lists the region holding the buffer with the huge-page advice ("hg").
            let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
            let addr = p as usize;
            let mut in_region = false;
            let mut flags = None;
            for line in smaps.lines() {
                if let Some((range, _)) = line.split_once(' ')
                    && let Some((a, b)) = range.split_once('-')
                    && let (Ok(a), Ok(b)) =
                        (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                {
                    in_region = a <= addr && addr < b;
                } else if in_region && line.starts_with("VmFlags:") {
                    flags = Some(line.to_string());
                }
            }
            let flags = flags.expect("the buffer's region is listed in /proc/self/smaps");
            assert!(flags.contains(" hg"), "no huge-page advice: {flags}");
            HugePageAlloc.dealloc(p, layout);
        }
    }
}
