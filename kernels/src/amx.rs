//! Intel AMX-BF16 tiles for the bf16 GEMM ([`crate::gemm_bf16`]).
//!
//! AVX512-BF16's `vdpbf16ps` does 32 bf16 multiply-adds per instruction; one AMX `tdpbf16ps`
//! multiplies a 16 × 32 bf16 tile by a 32 × 16 one into a 16 × 16 f32 tile: 8192
//! multiply-adds, 256 times a `vdpbf16ps`'s (measured on SmolLM2's prefill shapes the whole
//! kernel is 2.0–2.7× the AVX512-BF16 one: packing, loads and stores now bound it). Sapphire
//! Rapids and later Xeons have it. The operands are the ones the AVX512-BF16 kernel already builds:
//! the activations as bf16 pairs per token (an A tile is 16 tokens × 16 pairs) and a weight
//! panel as `panel[k * NR + r]` pairs (a B tile is 16 pairs × 16 output rows, the "VNNI"
//! layout AMX reads), so only the inner kernel changes. The products are the same bf16
//! products with f32 accumulation; only the order of the additions differs. Batched decode
//! steps (up to 16 tokens) use the tiles the other way round ([`Tiles::rows_step`], for
//! [`crate::lanes_amx`]): the weights as A tiles read in place, the tokens-in-lanes GEMM's
//! 16-lane token panel as the B tile.
//!
//! Using AMX takes three things std does not offer on stable Rust: detection (CPUID leaf 7
//! and the tile palette of leaf 0x1D, since `is_x86_feature_detected!("amx-bf16")` is still
//! unstable), the kernel's permission (Linux hands out the 8 KiB tile state only after
//! `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, once per process), and the
//! instructions themselves, written as inline assembly (the intrinsics are unstable too). The
//! tile configuration is per thread: each task loads it ([`Tiles::configure`]) and releases it
//! when done, so a thread that never runs a tile kernel never carries tile state.
//!
//! `ESPALIER_AMX=0` in the environment, or [`set_enabled`]`(false)`, keeps the AVX512-BF16
//! kernel (benchmarks time both in one run that way).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

/// Tokens per A tile and output rows per B tile (tile rows).
pub(crate) const TILE: usize = 16;
/// Tokens per product: two A tiles (the activations are padded with zero tokens to a multiple;
/// a last half-empty step costs less than a second kernel for it).
pub(crate) const TOKENS: usize = 2 * TILE;
/// bf16 pairs per tile row (64 bytes).
pub(crate) const PAIRS: usize = 16;
/// Groups of [`TILE`] weight rows per [`Tiles::rows_step`]: four accumulators share each
/// load of the token panel's B tile.
pub(crate) const ROW_GROUPS: usize = 4;

static OFF: AtomicBool = AtomicBool::new(false);
static SUPPORTED: OnceLock<bool> = OnceLock::new();

/// Turns the AMX path off (`false`) or back on for the whole process (it is on wherever the
/// CPU and the OS allow it). For benchmarks that time the AVX512-BF16 kernel beside it.
pub fn set_enabled(on: bool) {
    OFF.store(!on, Ordering::Relaxed);
}

/// Whether the bf16 GEMM runs on AMX tiles: the CPU has AMX-BF16 with the standard palette,
/// the OS granted the tile state, and neither `ESPALIER_AMX=0` nor [`set_enabled`] turned it
/// off.
pub fn enabled() -> bool {
    !OFF.load(Ordering::Relaxed) && *SUPPORTED.get_or_init(detect)
}

fn detect() -> bool {
    if std::env::var_os("ESPALIER_AMX").is_some_and(|v| v == "0") {
        return false;
    }
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        x86::supported() && x86::request_permission()
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        false
    }
}

/// The tile configuration loaded on this thread for the GEMM's kernels, released on drop.
/// Every tile is 16 rows of 64 bytes. Tiles 0–3 are 16 × 16 f32 accumulators; in the
/// prefill product 4–5 are A tiles (16 tokens × 16 pairs) and 6–7 B tiles (16 pairs × 16
/// rows), in the decode step ([`Tiles::rows_step`]) 4 is the B tile (16 pairs × 16 tokens)
/// and 5–7 A tiles (16 weight rows × 16 pairs).
/// Not `Send`: the configuration belongs to the thread that loaded it.
pub(crate) struct Tiles(std::marker::PhantomData<*const ()>);

impl Tiles {
    /// Loads the configuration on the calling thread; `None` where the CPU or the OS has no
    /// AMX (the caller decided on [`enabled`]; a concurrent [`set_enabled`] does not matter).
    pub(crate) fn configure() -> Option<Tiles> {
        if !*SUPPORTED.get_or_init(detect) {
            return None;
        }
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: `enabled` checked the CPU (AMX-TILE, palette 1 with 8 tiles of 16 rows
            // of 64 bytes) and the OS permission.
            unsafe { x86::load_config() };
            Some(Tiles(std::marker::PhantomData))
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            None
        }
    }

    /// `c[t][r] = Σ_k a[t][k] · b[k][r]` for `a`: [`TOKENS`] tokens of `k_tiles × PAIRS`
    /// pairs at `a_stride` pairs per token, and `b`: `k_tiles × PAIRS` pairs × `2 × TILE`
    /// rows at `b_stride` pairs per pair-row (a weight panel); `c` gets [`TOKENS`] rows of
    /// `2 × TILE` f32, overwritten: four 16 × 16 accumulators.
    ///
    /// # Safety
    /// `a` readable for [`TOKENS`] rows of `k_tiles · PAIRS` pairs at `a_stride`; `b`
    /// readable for `k_tiles · PAIRS` rows of `2 · TILE` pairs at `b_stride`.
    pub(crate) unsafe fn product(
        &self,
        a: *const u32,
        a_stride: usize,
        b: *const u32,
        b_stride: usize,
        k_tiles: usize,
        c: &mut [f32; TOKENS * 2 * TILE],
    ) {
        // SAFETY: the caller's contract; `c` is TOKENS rows of 2 · TILE floats.
        unsafe {
            self.product_at(
                a,
                a_stride,
                b,
                b_stride,
                k_tiles,
                c.as_mut_ptr(),
                2 * TILE,
                false,
            )
        };
    }

    /// [`Tiles::product`] straight into an output: `c` is the first of [`TOKENS`] rows of
    /// `2 × TILE` f32 at `c_stride` floats per row (a block of a `[tokens, rows]` output),
    /// overwritten, or added to with `add` (the tiles start from what `c` holds instead of
    /// zero). No copy through a buffer: for a whole block, storing the tiles' 1024 values one
    /// by one took about as long as the products of a 576-column reduction.
    ///
    /// # Safety
    /// As [`Tiles::product`], and `c` readable and writable for [`TOKENS`] rows of `2 · TILE`
    /// floats at `c_stride`, which no other thread accesses meanwhile.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn product_at(
        &self,
        a: *const u32,
        a_stride: usize,
        b: *const u32,
        b_stride: usize,
        k_tiles: usize,
        c: *mut f32,
        c_stride: usize,
        add: bool,
    ) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller's contract; the configuration is loaded (`self` exists).
        unsafe {
            x86::product(a, a_stride, b, b_stride, k_tiles, c, c_stride, add);
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (a, a_stride, b, b_stride, k_tiles, c, c_stride, add);
            unreachable!("no AMX tiles are configured off x86-64");
        }
    }
}

impl Tiles {
    /// Zeroes the [`ROW_GROUPS`] accumulators of a batched decode step's product
    /// ([`Tiles::rows_step`]).
    pub(crate) fn rows_zero(&self) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the configuration is loaded (`self` exists); touches tiles only.
        unsafe {
            x86::rows_zero()
        };
    }

    /// One reduction step of a batched decode step's product, the weights as the A operand
    /// read where they lie: `c[g][m][t] += Σ_k a[16g + m][k] · x[t][k]` over 32 columns, for
    /// [`ROW_GROUPS`] groups of [`TILE`] rows at `a` (`a_stride` bf16 values per row: the
    /// row length for weights in place, 32 for rows expanded into a buffer) and the token
    /// panel's step `b` ([`PAIRS`] pair-rows of [`TILE`] tokens, 64 bytes each: the
    /// tokens-in-lanes GEMM's bf16 panel of 16 lanes, which is AMX's pair layout).
    ///
    /// # Safety
    /// `a` readable for `ROW_GROUPS · TILE` rows of 32 bf16 at `a_stride`; `b` for
    /// `PAIRS · TILE` pairs.
    pub(crate) unsafe fn rows_step(&self, a: *const u16, a_stride: usize, b: *const u32) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller's contract; the configuration is loaded (`self` exists).
        unsafe {
            x86::rows_step(a, a_stride, b)
        };
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (a, a_stride, b);
            unreachable!("no AMX tiles are configured off x86-64");
        }
    }

    /// Stores the accumulators: `c` gets the [`ROW_GROUPS`] 16 × 16 f32 tiles (rows ×
    /// tokens) one after another, row-major.
    pub(crate) fn rows_store(&self, c: &mut [f32; ROW_GROUPS * TILE * TILE]) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the configuration is loaded; `c` holds the four 1 KiB tiles stored.
        unsafe {
            x86::rows_store(c.as_mut_ptr())
        };
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = c;
            unreachable!("no AMX tiles are configured off x86-64");
        }
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the configuration was loaded by `configure` on this thread (`Tiles` is not
        // `Send`, so it is dropped where it was made).
        unsafe {
            x86::release()
        };
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{PAIRS, ROW_GROUPS, TILE};
    use std::arch::asm;
    use std::arch::x86_64::__cpuid_count;

    /// `arch_prctl` codes (`asm/prctl.h`) and the tile data's state component number.
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;

    /// AMX-TILE and AMX-BF16 (CPUID.7.0:EDX bits 24 and 22), and palette 1 as the kernels
    /// assume it: 8 tiles of 16 rows × 64 bytes (CPUID.0x1D.1).
    pub(super) fn supported() -> bool {
        // CPUID is available on every x86-64 CPU; leaf 0 says how far it goes.
        let max_leaf = __cpuid_count(0, 0).eax;
        if max_leaf < 0x1d {
            return false;
        }
        let (l7, palette) = (__cpuid_count(7, 0), __cpuid_count(0x1d, 1));
        let tile = l7.edx & (1 << 24) != 0;
        let bf16 = l7.edx & (1 << 22) != 0;
        let bytes_per_row = palette.ebx & 0xffff;
        let names = palette.ebx >> 16;
        let max_rows = palette.ecx & 0xffff;
        tile && bf16 && bytes_per_row >= 64 && names >= 8 && max_rows >= 16
    }

    /// Asks Linux for the tile data state (once per process; every thread then has it).
    #[cfg(target_os = "linux")]
    pub(super) fn request_permission() -> bool {
        // SAFETY: arch_prctl with two integers; no memory is passed.
        let r = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        r == 0
    }

    /// The 64-byte tile configuration (`ldtilecfg`'s operand), palette 1.
    #[repr(C, align(64))]
    struct Config {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    /// # Safety
    /// AMX-TILE present and permitted.
    pub(super) unsafe fn load_config() {
        let mut cfg = Config {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb: [0; 16],
            rows: [0; 16],
        };
        for t in 0..8 {
            cfg.colsb[t] = 64;
            cfg.rows[t] = TILE as u8;
        }
        // SAFETY: the caller's contract; `cfg` is 64 aligned bytes.
        unsafe { asm!("ldtilecfg [{}]", in(reg) &cfg, options(nostack, readonly)) };
    }

    /// # Safety
    /// AMX-TILE present and permitted.
    pub(super) unsafe fn release() {
        // SAFETY: the caller's contract.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }

    // The assembly below names one accumulator per row group.
    const _: () = assert!(ROW_GROUPS == 4);

    /// Zeroes the four accumulators `tmm0`-`tmm3` (both kernels keep theirs there).
    ///
    /// # Safety
    /// The configuration is loaded.
    pub(super) unsafe fn rows_zero() {
        // SAFETY: the caller's contract; tiles only.
        unsafe {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            )
        };
    }

    /// Loads the four accumulators `tmm0`-`tmm3` from `c[i]`, 16 rows at `stride` bytes each.
    ///
    /// # Safety
    /// The configuration is loaded; each `c[i]` readable for 16 rows of 64 bytes at `stride`.
    unsafe fn load_acc(c: [*const f32; 4], stride: usize) {
        // SAFETY: the caller's contract.
        unsafe {
            asm!(
                "tileloadd tmm0, [{c0} + {s}*1]",
                "tileloadd tmm1, [{c1} + {s}*1]",
                "tileloadd tmm2, [{c2} + {s}*1]",
                "tileloadd tmm3, [{c3} + {s}*1]",
                c0 = in(reg) c[0],
                c1 = in(reg) c[1],
                c2 = in(reg) c[2],
                c3 = in(reg) c[3],
                s = in(reg) stride,
                options(nostack, readonly)
            )
        };
    }

    /// Stores the four accumulators `tmm0`-`tmm3` to `c[i]`, 16 rows at `stride` bytes each.
    ///
    /// # Safety
    /// The configuration is loaded; each `c[i]` writable for 16 rows of 64 bytes at `stride`.
    unsafe fn store_acc(c: [*mut f32; 4], stride: usize) {
        // SAFETY: the caller's contract.
        unsafe {
            asm!(
                "tilestored [{c0} + {s}*1], tmm0",
                "tilestored [{c1} + {s}*1], tmm1",
                "tilestored [{c2} + {s}*1], tmm2",
                "tilestored [{c3} + {s}*1], tmm3",
                c0 = in(reg) c[0],
                c1 = in(reg) c[1],
                c2 = in(reg) c[2],
                c3 = in(reg) c[3],
                s = in(reg) stride,
                options(nostack)
            )
        };
    }

    /// [`ROW_GROUPS`] accumulators (`tmm0`-`tmm3`), the token panel's B tile in `tmm4`, the
    /// weights' A tiles in `tmm5`-`tmm7`, the fourth reusing `tmm5`. Measured slower on a
    /// 2-core Xeon (weights from L2, one core): two row groups with two sets of operand tiles,
    /// so that a step's loads need not wait for the last step's products (26.6 against 31
    /// GB/s); three groups with no reuse (27.2); requesting the block's next step into L1
    /// too (no gain in L2, 30-32 against 33-35 GB/s from memory on two cores).
    ///
    /// # Safety
    /// See [`super::Tiles::rows_step`]; the configuration is loaded.
    pub(super) unsafe fn rows_step(a: *const u16, a_stride: usize, b: *const u32) {
        let group = TILE * a_stride;
        // SAFETY: the caller's bounds: rows 0..64 of 32 values at `a_stride`, 16 pair-rows of
        // 64 bytes at `b`.
        unsafe {
            asm!(
                "tileloadd tmm4, [{b} + {s64}*1]",
                "tileloadd tmm5, [{a0} + {sa}*1]",
                "tileloadd tmm6, [{a1} + {sa}*1]",
                "tileloadd tmm7, [{a2} + {sa}*1]",
                "tdpbf16ps tmm0, tmm5, tmm4",
                "tdpbf16ps tmm1, tmm6, tmm4",
                "tileloadd tmm5, [{a3} + {sa}*1]",
                "tdpbf16ps tmm2, tmm7, tmm4",
                "tdpbf16ps tmm3, tmm5, tmm4",
                b = in(reg) b,
                s64 = in(reg) 64usize,
                a0 = in(reg) a,
                a1 = in(reg) a.add(group),
                a2 = in(reg) a.add(2 * group),
                a3 = in(reg) a.add(3 * group),
                sa = in(reg) a_stride * 2,
                options(nostack, readonly)
            );
        }
    }

    /// # Safety
    /// The configuration is loaded; `c` writable for four tiles of 16 rows of 64 bytes.
    pub(super) unsafe fn rows_store(c: *mut f32) {
        // SAFETY: the caller's contract: four 1 KiB tiles one after another.
        unsafe {
            let tiles = [0, 1, 2, 3].map(|g| c.add(g * TILE * TILE));
            store_acc(tiles, 64);
        }
    }

    /// 2 × 2 tiles: 32 tokens × 32 rows, into (or, with `add`, onto) `c` at `c_stride`
    /// floats per row.
    ///
    /// # Safety
    /// See [`super::Tiles::product_at`]; the configuration is loaded.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn product(
        a: *const u32,
        a_stride: usize,
        b: *const u32,
        b_stride: usize,
        k_tiles: usize,
        c: *mut f32,
        c_stride: usize,
        add: bool,
    ) {
        let (sa, sb, sc) = (a_stride * 4, b_stride * 4, c_stride * 4);
        // SAFETY: every access stays within the caller's bounds: A rows 0..32 of
        // k_tiles·PAIRS pairs, B rows 0..k_tiles·PAIRS of 32 pairs; C 32 rows of 32 f32.
        unsafe {
            // The 2 × 2 accumulators' corners in `c`.
            let corners = [0, TILE, TILE * c_stride, TILE * c_stride + TILE].map(|o| c.add(o));
            if add {
                load_acc(corners.map(|p| p.cast_const()), sc);
            } else {
                rows_zero();
            }
            for k in 0..k_tiles {
                let a0 = a.add(k * PAIRS);
                let a1 = a0.add(TILE * a_stride);
                let b0 = b.add(k * PAIRS * b_stride);
                let b1 = b0.add(TILE);
                asm!(
                    "tileloadd tmm4, [{a0} + {sa}*1]",
                    "tileloadd tmm5, [{a1} + {sa}*1]",
                    "tileloadd tmm6, [{b0} + {sb}*1]",
                    "tileloadd tmm7, [{b1} + {sb}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a0 = in(reg) a0,
                    a1 = in(reg) a1,
                    b0 = in(reg) b0,
                    b1 = in(reg) b1,
                    sa = in(reg) sa,
                    sb = in(reg) sb,
                    options(nostack, readonly)
                );
            }
            store_acc(corners, sc);
        }
    }
}
