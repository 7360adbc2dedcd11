//! Instruction-set selection and execution options.
//!
//! Every kernel exists twice: a portable scalar version that runs anywhere and an AVX2+FMA
//! version for x86-64. The choice is a runtime value ([`Isa`]) rather than a compile-time
//! feature so that one binary runs on any x86-64 machine and so that the tests can exercise
//! *both* paths on the machine they run on. Asking for [`Isa::Avx2Fma`] on a CPU without it is
//! safe: [`Isa::effective`] downgrades to [`Isa::Portable`] (the result is the same, only
//! slower), which is what keeps the `unsafe` SIMD entry points sound.

/// Which implementation of a kernel to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Plain Rust, no explicit SIMD. Always available; the reference for the vector paths.
    Portable,
    /// x86-64 AVX2 + FMA intrinsics (256-bit vectors, fused multiply-add). Detection also
    /// requires POPCNT, which every AVX2 CPU has and the bitmap kernel uses.
    Avx2Fma,
    /// [`Isa::Avx2Fma`] plus AVX-512F. Kernels with an AVX-512 variant (the bitmap GEMV's
    /// masked expand, the dense GEMV and small-batch tiles, the f32 GEMMs, bf16 prefill with
    /// AVX512-BF16, block training) run it; every other kernel runs its AVX2 code.
    Avx512,
}

impl Isa {
    /// The best instruction set this CPU supports (detected once, then cached by std).
    pub fn detect() -> Isa {
        if avx512_available() {
            Isa::Avx512
        } else if avx2_fma_available() {
            Isa::Avx2Fma
        } else {
            Isa::Portable
        }
    }

    /// Whether this instruction set can run on this CPU.
    pub fn is_available(self) -> bool {
        match self {
            Isa::Portable => true,
            Isa::Avx2Fma => avx2_fma_available(),
            Isa::Avx512 => avx512_available(),
        }
    }

    /// Whether this ISA includes AVX2+FMA (the x86 kernels' baseline).
    pub fn has_avx2(self) -> bool {
        matches!(self, Isa::Avx2Fma | Isa::Avx512)
    }

    /// `self` if the CPU supports it, else the best supported ISA below it. Kernels dispatch on
    /// this value, never on the raw request, so an unsupported request cannot reach SIMD code.
    pub fn effective(self) -> Isa {
        if self.is_available() {
            self
        } else if self == Isa::Avx512 && Isa::Avx2Fma.is_available() {
            Isa::Avx2Fma
        } else {
            Isa::Portable
        }
    }

    /// Every instruction set usable on this CPU (tests iterate over this).
    pub fn all_available() -> Vec<Isa> {
        [Isa::Portable, Isa::Avx2Fma, Isa::Avx512]
            .into_iter()
            .filter(|isa| isa.is_available())
            .collect()
    }
}

#[cfg(target_arch = "x86_64")]
fn avx2_fma_available() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("popcnt")
}

#[cfg(not(target_arch = "x86_64"))]
fn avx2_fma_available() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
fn avx512_available() -> bool {
    avx2_fma_available() && std::arch::is_x86_feature_detected!("avx512f")
}

#[cfg(not(target_arch = "x86_64"))]
fn avx512_available() -> bool {
    false
}

/// How to run a kernel: instruction set and whether it may use the rayon pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exec {
    /// Requested instruction set (downgraded at run time if unavailable).
    pub isa: Isa,
    /// Allow splitting the work over rayon's global pool. Even when `true`, small problems run
    /// on the calling thread because waking workers costs more than it saves.
    pub parallel: bool,
}

impl Exec {
    /// Best ISA, multi-threaded: what the engine should use.
    pub fn auto() -> Exec {
        Exec {
            isa: Isa::detect(),
            parallel: true,
        }
    }

    /// Given ISA, on the calling thread only.
    pub fn single(isa: Isa) -> Exec {
        Exec {
            isa,
            parallel: false,
        }
    }

    /// Given ISA, multi-threaded.
    pub fn threaded(isa: Isa) -> Exec {
        Exec {
            isa,
            parallel: true,
        }
    }
}

impl Default for Exec {
    fn default() -> Self {
        Exec::auto()
    }
}
